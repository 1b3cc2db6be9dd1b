from setuptools import find_packages
from setuptools import setup

setup(
    name="zjournal_bank",
    version="0.1",
    description="A small bank on Pyramid and zjournal: the example"
                " application of zjournal's Pyramid integration",
    license="ZPL-2.1",
    packages=find_packages(),
    python_requires=">=3.9",
    install_requires=[
        "zjournal[pyramid]",
        "waitress",
    ],
    extras_require={"test": ["WebTest", "pytest"]},
    entry_points={
        "paste.app_factory": ["main = zjournal_bank:main"],
    },
)
