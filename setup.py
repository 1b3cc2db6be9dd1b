import os

from setuptools import Extension
from setuptools import find_packages
from setuptools import setup

# Optional C speedups for the journal scan (zlib's CRC-32 and OpenSSL's
# SHA-256, both libraries CPython itself links).  A machine that cannot
# build it still installs zjournal: the pure-Python scan does the same
# checks, slower.  ZJOURNAL_PURE_PYTHON=1 skips the build.
speedups = [] if os.environ.get("ZJOURNAL_PURE_PYTHON") else [
    Extension("zjournal._speedups", ["src/zjournal/_speedups.c"],
              libraries=["z", "crypto"], optional=True,
              define_macros=[("OPENSSL_API_COMPAT", "0x10100000L")]),
]


def read(name):
    with open(os.path.join(os.path.dirname(__file__), name)) as f:
        return f.read()


setup(
    name="zjournal",
    version="0.1.0.dev0",
    description="Journaled commands for ZODB: an append-only command log"
                " committed with the ZODB in one two-phase commit, and"
                " rebuilds by replay",
    long_description=read("README.rst") + "\n\n" + read("CHANGES.rst"),
    long_description_content_type="text/x-rst",
    license="ZPL-2.1",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Framework :: ZODB",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
    package_dir={"": "src"},
    packages=find_packages("src"),
    ext_modules=speedups,
    include_package_data=True,
    # %import zjournal in zope.conf reads this ZConfig component.
    package_data={"zjournal": ["component.xml"]},
    zip_safe=False,
    python_requires=">=3.9",
    install_requires=[
        "ZODB >= 5.8",
        "transaction >= 3.0",
        "persistent >= 4.9",
        "zc.lockfile >= 2.0",
        "zope.interface",
    ],
    extras_require={
        "uri": ["zodburi"],
        # The PostgreSQL journal; psycopg2 is the driver RelStorage uses.
        "postgresql": ["psycopg2-binary"],
        "relstorage": ["RelStorage", "psycopg2-binary"],
        "zeo": ["ZEO"],
        # Integrations: zjournal.pyramid, zjournal.zope, the buildout recipe.
        "pyramid": ["pyramid", "pyramid_tm", "pyramid_zodbconn",
                    "pyramid_retry"],
        "zope": ["Zope[wsgi]"],
        "buildout": ["zc.buildout"],
        "test": [
            "pytest",
            "hypothesis",
            "zodburi",
            "Sphinx",  # test_docs builds the docs with -W
            "psycopg2-binary",
            "RelStorage",
            "ZEO",
            # the integrations and the example applications
            "pyramid", "pyramid_tm", "pyramid_zodbconn", "pyramid_retry",
            "waitress", "WebTest",
            "Zope[wsgi]",
            "zc.buildout", "zc.recipe.egg",
        ],
        # The pages document (autodoc) and run the Pyramid integration
        # and the buildout recipe.
        "docs": ["Sphinx", "pyramid", "pyramid_tm", "pyramid_zodbconn",
                 "pyramid_retry", "WebTest", "zc.buildout"],
        # benchmarks/run.py: the peers it measures zjournal against
        "bench": ["eventsourcing", "coopy"],
    },
    entry_points={
        "console_scripts": [
            "zodb-journal = zjournal.cli:main",
        ],
        "zc.buildout": [
            "default = zjournal.recipe:Recipe",
        ],
    },
)
