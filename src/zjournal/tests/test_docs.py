"""The documentation builds without warnings, and its examples run.

The docs live in the checkout (``docs/`` beside ``src/``), not in the
installed package, so these tests skip when run against an installed
copy; they also skip when Sphinx is not installed (``pip install -e
'.[docs]'``).

Each builder runs once per test session (a module fixture): the pages
are then read as HTML, the way a reader gets them, to check that the
generated references are complete.
"""
import argparse
import html
import html.parser
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import zjournal
from zjournal import cli

DOCS = pathlib.Path(__file__).resolve().parents[3] / "docs"

# Pages whose examples must run as doctests (a page without its
# "Document:" line in the report ran nothing).
DOCTESTED_PAGES = ("tutorial", "pointintime", "evolving", "cli")


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
         "-d", str(tmp_path / ("doctrees-" + builder)), str(DOCS), str(out)],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    return proc.returncode, proc.stdout, out


@pytest.fixture(scope="module")
def html_build(tmp_path_factory):
    return _sphinx("html", tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def built_html(html_build):
    status, output, out = html_build
    if status != 0:
        pytest.fail("the HTML build failed:\n" + output)
    return out


def test_html_builds_without_warnings(html_build):
    status, output, out = html_build
    assert status == 0, output
    assert (out / "index.html").is_file(), output


def test_examples_pass_as_doctests(tmp_path):
    status, output, out = _sphinx("doctest", tmp_path)
    report = (out / "output.txt").read_text() if (
        out / "output.txt").is_file() else ""
    assert status == 0, output + report
    # Guard against a configuration that silently runs nothing.
    for page in DOCTESTED_PAGES:
        assert "Document: %s\n" % page in report, (page, report)
    assert " 0 failures in tests" in report, report


# -- reading the built HTML --------------------------------------------

class Page(html.parser.HTMLParser):
    """The sections of a built page: their ids, text and signatures.

    Only ``<section>`` elements are tracked as a tree (they nest properly
    in Sphinx's output); text and ``<dt>`` signatures are credited to
    every section open around them.  A section's further ids (its labels)
    are ``<span id=...>`` elements right at its start.
    """

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.sections = {}        # id -> {"text": [...], "dts": [...]}
        self.ids = set()
        self.links = set()        # href of every <a>
        self._open = []           # ids of the open sections
        self._dt = None
        self._fresh = None        # a section that has shown nothing yet
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.add(attrs["href"])
        if tag == "span" and self._fresh and attrs.get("id"):
            self.sections[attrs["id"]] = self.sections[self._fresh]
            return
        self._fresh = None
        if tag == "section":
            ident = attrs.get("id") or "?%d" % len(self.sections)
            self.sections.setdefault(ident, {"text": [], "dts": []})
            self._open.append(ident)
            self._fresh = ident
        elif tag == "dt":
            self._dt = []

    def handle_endtag(self, tag):
        if tag == "section" and self._open:
            self._open.pop()
        elif tag == "dt" and self._dt is not None:
            dt = _normal("".join(self._dt)).replace("\xb6", "").strip()
            for ident in self._open:
                self.sections[ident]["dts"].append(dt)
            self._dt = None

    def handle_data(self, data):
        if data.strip():
            self._fresh = None
        if self._dt is not None:
            self._dt.append(data)
        for ident in self._open:
            self.sections[ident]["text"].append(data)

    def text(self, ident):
        return _normal("".join(self.sections[ident]["text"]))


def _normal(text):
    """Text as the page shows it, minus typography and line breaks."""
    text = html.unescape(text)
    for fancy, plain in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'),
                         ("\u201d", '"'), ("\u2014", "---"),
                         ("\u2013", "--")):
        text = text.replace(fancy, plain)
    return " ".join(text.split())


def _read(path):
    return Page(path.read_text(encoding="utf-8"))


# -- the command line reference ------------------------------------------

def _subparsers(parser):
    """``[(name, subparser, help)]``, each parser once (not its aliases)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    found.append((name, sub, helps.get(name)))
    return found


def _options(parser):
    return [a for a in parser._actions
            if a.help is not argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction,
                                   argparse._SubParsersAction))]


def _help(parser, action):
    text = action.help or ""
    if "%" in text:
        text = parser._get_formatter()._expand_help(action)
    return _normal(text).rstrip(".")


def _shown(spelling, dts):
    pattern = re.compile(r"(^|[\s,])%s($|[\s,=])" % re.escape(spelling))
    return any(pattern.search(dt) for dt in dts)


def missing_from_cli_page(page, parser, prefix="cli-"):
    """What the built CLI page lacks of ``parser``; empty when complete."""
    missing = []
    page_text = page.text("zodb-journal") if (
        "zodb-journal" in page.sections) else ""
    for name, sub, help_ in _subparsers(parser):
        label = prefix + name
        if label not in page.sections:
            missing.append("no section with id %s for %r" % (label, name))
            continue
        text = page.text(label)
        dts = page.sections[label]["dts"]
        if help_ and _normal(help_).rstrip(".").lower() not in (
                page_text.lower()):
            missing.append("the help of %r" % name)
        usage = _normal(sub.format_usage().replace("usage: ", "", 1))
        if usage not in text:
            missing.append("the usage of %r (%s)" % (name, usage))
        for action in _options(sub):
            for spelling in action.option_strings or [
                    action.metavar or action.dest.upper()]:
                if not _shown(spelling, dts):
                    missing.append("%s %s" % (sub.prog, spelling))
            help_text = _help(sub, action)
            if help_text and help_text.lower() not in text.lower():
                missing.append("the help of %s %s" % (
                    sub.prog, "/".join(action.option_strings)
                    or action.dest))
        missing += missing_from_cli_page(
            page, sub, prefix=label + "-")
    return missing


@pytest.fixture(scope="module")
def cli_page(built_html):
    return _read(built_html / "cli.html")


def test_cli_page_documents_every_subcommand_and_option(cli_page):
    parser = cli._parser()
    assert _subparsers(parser), "the parser has no subcommands?"
    assert missing_from_cli_page(cli_page, parser) == []
    dts = cli_page.sections["zodb-journal"]["dts"]
    for action in parser._actions:
        for spelling in action.option_strings:
            assert _shown(spelling, dts), spelling


def test_cli_page_check_notices_what_is_missing(cli_page):
    # The check above must be able to fail: a parser with one more
    # subcommand, and one more option, than the page documents.
    parser = cli._parser()
    sub = dict((n, p) for n, p, _ in _subparsers(parser))["rebuild"]
    sub.add_argument("--not-documented", help="nowhere on the page")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.add_parser("undocumented", help="nowhere either")
    missing = missing_from_cli_page(cli_page, parser)
    assert "zodb-journal rebuild --not-documented" in missing
    assert "the help of zodb-journal rebuild --not-documented" in missing
    assert "no section with id cli-undocumented for 'undocumented'" in (
        missing)
    usage = [m for m in missing if m.startswith("the usage of 'rebuild'")]
    assert len(usage) == 1 and "--not-documented" in usage[0], missing
    assert len(missing) == 4, missing


def test_cli_options_can_be_cross_referenced(cli_page):
    # :option:`zodb-journal rebuild --until` resolves to this anchor.
    assert "cmdoption-zodb-journal-rebuild-until" in cli_page.ids


# -- the API reference -----------------------------------------------------

def _documented(built_html, page, name):
    """Whether the API page documents ``zjournal.<name>``: its own entry,
    or a link to the entry on the page that has it (the SQL journals')."""
    obj = getattr(zjournal, name)
    candidates = {"zjournal." + name}
    home = getattr(obj, "__module__", None)
    if home:
        candidates.add("%s.%s" % (home, name))
    if candidates & page.ids:
        return True
    for link in page.links:
        target, _, anchor = link.partition("#")
        if anchor in candidates and target and "/" not in target:
            if anchor in _read(built_html / target).ids:
                return True
    return False


def test_api_page_documents_every_public_name(built_html):
    page = _read(built_html / "api.html")
    assert zjournal.__all__
    missing = [name for name in zjournal.__all__
               if not _documented(built_html, page, name)]
    assert missing == [], "not documented in api.rst: %s" % missing


def test_api_check_notices_an_undocumented_name(built_html, monkeypatch):
    page = _read(built_html / "api.html")
    monkeypatch.setattr(zjournal, "Undocumented", type(
        "Undocumented", (), {"__module__": "zjournal.nowhere"}),
        raising=False)
    assert not _documented(built_html, page, "Undocumented")
    assert _documented(built_html, page, "Command")


# -- the extensions fail when the docs are wrong -------------------------

MINI_CONF = """
import sys
sys.path[:0] = [%(ext)r, %(src)r]
extensions = ["sphinx.ext.doctest", "argparsedoc", "consoledoc"]
exclude_patterns = ["_build"]
"""


def _mini_project(tmp_path, page):
    docs = tmp_path / "mini"
    docs.mkdir()
    (docs / "conf.py").write_text(MINI_CONF % {
        "ext": str(DOCS / "_ext"), "src": str(DOCS.parent / "src")})
    (docs / "index.rst").write_text("Mini\n====\n\n" + page)
    return docs


def _mini_sphinx(builder, docs):
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed (pip install 'zjournal[docs]')")
    if not (DOCS / "_ext").is_dir():
        pytest.skip("no docs directory at %s" % DOCS)
    out = docs / "_build" / builder
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-E", "-b", builder,
         str(docs), str(out)], cwd=str(docs), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    return proc.returncode, proc.stdout, out


def test_console_sessions_are_run_and_compared(tmp_path):
    # Two true commands, one false claim: exactly the false one fails,
    # which shows that the sessions really run and their output counts.
    docs = _mini_project(tmp_path, """
.. zodb-journal-console::

   $ zodb-journal verify nowhere
   zodb-journal verify: error: no journal at .../nowhere (no such directory)
   $ echo $?
   1

.. zodb-journal-console::

   $ zodb-journal dump nowhere
   1 2026-01-01T00:00:00Z a.command that is not there
""")
    status, output, out = _mini_sphinx("doctest", docs)
    report = (out / "output.txt").read_text()
    assert status != 0, output
    assert re.search(r"\b3 tests\b", report), report
    assert re.search(r"\b1 failures? in tests", report), report
    assert "no journal at %s" % (docs / "nowhere") in report, report


def test_cli_details_must_name_a_real_option(tmp_path):
    docs = _mini_project(tmp_path, """
.. zodb-journal-cli:: rebuild

   ``--until``
      Exists.

   ``--no-such-option``
      Does not.
""")
    status, output, _ = _mini_sphinx("html", docs)
    assert status != 0
    assert "zodb-journal rebuild has no option '--no-such-option'" in output


README = DOCS.parent / "README.rst"


def test_readme_python_sample_runs(tmp_path):
    # The first thing a visitor copies: it must run as written, in an
    # empty directory, with nothing else defined.
    if not README.is_file():
        pytest.skip("no README.rst at %s (an installed package, not a"
                    " checkout)" % README)
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)",
                        README.read_text())
    assert blocks, "README.rst has no python code block"
    script = tmp_path / "sample.py"
    script.write_text(textwrap.dedent(blocks[0]))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=str(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, proc.stdout
    with zjournal.FileJournal(str(tmp_path / "journal"),
                              readonly=True) as journal:
        names = [e.command_name for e in journal.entries()]
    assert names == ["bank.open", "bank.deposit", "bank.open",
                     "bank.deposit", "bank.deposit"], names


BANK = DOCS.parent / "examples" / "bank"
CURL = re.compile(r"^\s*curl(?: -X (?P<method>\w+))?(?: -d '(?P<body>[^']*)')?"
                  r" http://127\.0\.0\.1:6543(?P<path>\S+)\s*$")


def test_bank_readme_curl_sequence_succeeds(tmp_path, monkeypatch):
    # Every curl line of the example's README, in order, against the
    # example's own ini: each must succeed (a transfer to an account the
    # sequence never opened answers 400).
    for name in ("pyramid_zodbconn", "pyramid_retry", "webtest"):
        pytest.importorskip(name)
    if not (BANK / "development.ini").is_file():
        pytest.skip("no examples/bank at %s" % BANK)
    import webtest
    from pyramid.paster import get_app
    from zjournal.pyramid import get_journaled_db
    lines = [line for line in (BANK / "README.rst").read_text().splitlines()
             if line.strip().startswith("curl ")]
    calls = [CURL.match(line) for line in lines]
    assert lines and all(calls), lines
    monkeypatch.syspath_prepend(str(BANK))
    ini = tmp_path / "development.ini"
    shutil.copy(str(BANK / "development.ini"), str(ini))
    app = get_app(str(ini))
    try:
        client = webtest.TestApp(app)
        for call in calls:
            if call.group("method") == "POST":
                response = client.post(
                    call.group("path"), call.group("body") or "",
                    content_type="application/json", expect_errors=True)
            else:
                response = client.get(call.group("path"),
                                      expect_errors=True)
            assert response.status_int < 400, (call.group(0),
                                               response.text)
    finally:
        get_journaled_db(app.registry).close()
