"""Console sessions that the doctest builder runs.

A ``code-block:: console`` is only as true as the day it was pasted.  This
directive shows the same thing, a shell session, and hands the doctest
builder a test that runs each command and compares its output::

    .. zodb-journal-console::

       $ zodb-journal dump journal --start 4
       4 ...Z bank.withdraw amount=30 owner='alice'
       $ echo $?
       0

Each ``$`` line runs in its own ``/bin/sh`` subprocess, the way a reader
would run it: in the doctest group's current directory (the page's
``testsetup`` usually moves to a temporary one), with the Python of the
build first on ``PATH`` (so ``zodb-journal`` and ``python`` are the ones
being documented), with the ``consoledoc_pythonpath`` directories of
``conf.py`` on ``PYTHONPATH``, and with standard error shown beside
standard output, as a terminal shows them.  ``$ echo $?`` prints the exit
status of the command before.  Output is compared with the doctest flags
of ``conf.py`` (``...`` matches anything).

The page shows the session as written; the test runs in the page's
``default`` doctest group, or the group given as the argument, after the
page's ``doctest`` blocks that come before it.
"""
import os
import shutil
import subprocess
import sys

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

PROMPT = "$ "
# Printed before an output whose expected text starts with "...", which
# doctest would otherwise take for a continuation of the command.
LEAD = "<output>"
TIMEOUT = 120
_state = {"status": 0, "path": ()}


def run(line, lead=False):
    """Run one console line; print what a terminal would show."""
    if lead:
        print(LEAD)
    if line.strip() == "echo $?":
        print(_state["status"])
        return
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", os.defpath)])
    env["PYTHONPATH"] = os.pathsep.join(
        list(_state["path"]) + ([env["PYTHONPATH"]]
                                if env.get("PYTHONPATH") else []))
    env.pop("ZJOURNAL_HMAC_KEY", None)
    env["COLUMNS"] = "79"
    if shutil.which("zodb-journal", path=env["PATH"]) is None:
        raise RuntimeError("no zodb-journal script beside %s: install"
                           " zjournal (pip install -e .)" % sys.executable)
    proc = subprocess.run(
        line, shell=True, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=TIMEOUT)
    _state["status"] = proc.returncode
    sys.stdout.write(proc.stdout)


def to_doctest(lines):
    """The doctest that runs a console session written as ``lines``."""
    test = []
    for line, after in zip(lines, lines[1:] + [""]):
        if line.startswith(PROMPT):
            lead = after.startswith("...")
            test.append(">>> __import__(%r).run(%r%s)"
                        % (__name__, line[len(PROMPT):],
                           ", lead=True" if lead else ""))
            if lead:
                test.append(LEAD)
        elif line.strip():
            test.append(line)
        else:
            test.append("<BLANKLINE>")
    return "\n".join(test)


class ConsoleDirective(SphinxDirective):
    has_content = True
    optional_arguments = 1

    def run(self):
        lines = list(self.content)
        if not lines or not lines[0].startswith(PROMPT):
            raise self.error("a zodb-journal-console block starts with a"
                             " '$ ' command line")
        text = "\n".join(lines)
        node = nodes.literal_block(
            text, text, testnodetype="doctest",
            groups=[self.arguments[0] if self.arguments else "default"])
        node["language"] = "console"
        node["test"] = to_doctest(lines)
        node["options"] = {}
        self.set_source_info(node)
        return [node]


def _configure(app, config):
    _state["path"] = tuple(os.path.join(app.confdir, p)
                           for p in config.consoledoc_pythonpath)


def setup(app):
    app.add_config_value("consoledoc_pythonpath", [], "env")
    app.add_directive("zodb-journal-console", ConsoleDirective)
    app.connect("config-inited", _configure)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
