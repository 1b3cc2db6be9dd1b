"""Sphinx configuration of the zjournal documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html``.
Run the examples (doctest blocks and zodb-journal-console sessions):
``sphinx-build -b doctest docs docs/_build/doctest``.
"""
import doctest
import importlib.metadata
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout's code, even when another copy is installed; the local
# extensions (docs/_ext); the example commands (docs/examples).
sys.path[:0] = [os.path.join(HERE, os.pardir, "src"),
                os.path.join(HERE, "_ext"),
                os.path.join(HERE, "examples")]

project = "zjournal"
author = "zjournal contributors"
copyright = "zjournal contributors"
try:
    release = importlib.metadata.version("zjournal")
except importlib.metadata.PackageNotFoundError:
    release = "dev"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "zopeinterface",
    "argparsedoc",
    "consoledoc",
    "classtree",
]

# The console sessions the doctest builder runs (docs/_ext/consoledoc.py)
# see the checkout's code and the example commands too.
consoledoc_pythonpath = [os.path.join(os.pardir, "src"), "examples"]

# The command line reference is generated from this parser (docs/_ext/
# argparsedoc.py), so it lists whatever subcommands exist.
argparsedoc_parser = "zjournal.cli:_parser"

exclude_patterns = ["_build"]
# Names in the code are literals unless a role says otherwise.
default_role = "literal"

autodoc_member_order = "bysource"

# Exception messages are part of what the tutorial shows: check them.
doctest_default_flags = (doctest.ELLIPSIS | doctest.DONT_ACCEPT_TRUE_FOR_1)
# The tutorial and the how-to guides work in temporary directories (their
# testsetup blocks); this makes sure no transaction is left open, whatever
# an example did.
doctest_global_cleanup = """
import transaction
transaction.abort()
"""

html_theme = "alabaster"
html_theme_options = {
    "description": "Journaled commands for ZODB",
    "fixed_sidebar": False,
}
html_static_path = []
