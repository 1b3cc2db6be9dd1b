"""The documentation builds without warnings, and its examples run.

The docs live in the checkout (``docs/`` beside ``src/``), not in the
installed package, so these tests skip when run against an installed
copy; they also skip when Sphinx is not installed (``pip install -e
'.[docs]'``).
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[3] / "docs"


def _sphinx(builder, tmp_path):
    """Run sphinx-build with warnings as errors; return (status, output)."""
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed (pip install 'zjournal[docs]')")
    if not (DOCS / "conf.py").is_file():
        pytest.skip("no docs directory at %s (an installed package, not a"
                    " checkout)" % DOCS)
    out = tmp_path / builder
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-E", "-b", builder,
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    return proc.returncode, proc.stdout, out


def test_html_builds_without_warnings(tmp_path):
    status, output, out = _sphinx("html", tmp_path)
    assert status == 0, output
    assert (out / "index.html").is_file(), output


def test_tutorial_doctests_pass(tmp_path):
    status, output, out = _sphinx("doctest", tmp_path)
    report = (out / "output.txt").read_text() if (
        out / "output.txt").is_file() else ""
    assert status == 0, output + report
    # Guard against a configuration that silently runs nothing.
    assert "Document: tutorial" in report, output + report
    assert " 0 failures in tests" in report, report
