"""zjournal in a real Zope 6 instance (zjournal.zope).

Each instance is a directory with etc/zope.conf (``%import zjournal`` and
a ``<zjournal>`` section), etc/zope.ini and etc/site.zcml, made from the
templates in examples/zope/etc; the example add-on examples/zope/zjexample
is put on PYTHONPATH.  Zope runs in subprocesses: ``Zope2.Startup.serve``
(what ``runwsgi`` runs) serving over HTTP on a free port, Zope's
``addzopeuser`` and ``python -m zjournal.zope.adduser``.  Servers are
stopped with SIGTERM.
"""
import base64
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from zjournal import FileJournal
from zjournal import codec
from zjournal.tests.helpers import digest
from zjournal.tests.helpers import snapshot

if importlib.util.find_spec("Zope2") is None:
    pytest.skip("Zope is not installed (pip install Zope)",
                allow_module_level=True)

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples" / "zope"
STARTUP_TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    not (EXAMPLES / "zjexample").is_dir(),
    reason="no examples/zope at %s (an installed package, not a checkout)"
    % EXAMPLES)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """A Zope instance home made from examples/zope/etc."""

    def __init__(self, home, journal=None, database="main"):
        self.home = pathlib.Path(home)
        self.journal = str(journal or self.home / "var" / "journal")
        self.data_fs = self.home / "var" / "Data.fs"
        self.port = _free_port()
        (self.home / "etc").mkdir(parents=True, exist_ok=True)
        (self.home / "var").mkdir(exist_ok=True)
        self.configure(database=database)
        (self.home / "etc" / "site.zcml").write_text(
            (EXAMPLES / "etc" / "site.zcml").read_text())

    def configure(self, journal=None, database="main"):
        if journal is not None:
            self.journal = str(journal)
        values = dict(instance=self.home, journal=self.journal,
                      port=self.port)
        for name in ("zope.conf", "zope.ini"):
            text = (EXAMPLES / "etc" / (name + ".in")).read_text()
            text = text.format(**values)
            if database != "main":
                text = text.replace("database main", "database " + database)
            (self.home / "etc" / name).write_text(text)

    @property
    def conf(self):
        return str(self.home / "etc" / "zope.conf")

    def env(self, **extra):
        path = [str(EXAMPLES)] + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
                   PYTHONDONTWRITEBYTECODE="1")
        # Only the test that asks for a kill point gets one.
        env.pop("ZJOURNAL_KILL_AT", None)
        env.update(extra)
        return env

    def run(self, *args):
        """Run ``python args...`` to completion; return the process."""
        return subprocess.run(
            [sys.executable] + list(args), env=self.env(),
            cwd=str(self.home), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True,
            timeout=STARTUP_TIMEOUT)

    def start(self, **env):
        return Server(self, **env)

    def remove_zodb(self):
        for path in self.data_fs.parent.glob("Data.fs*"):
            path.unlink()

    def journal_entries(self):
        """(seq, command name, arguments) of every entry.

        The arguments are decoded without the command classes, which live
        in the instance's processes, not in this one.
        """
        journal = FileJournal(self.journal, readonly=True)
        try:
            return [(e.seq, e.command_name, codec.loads(e.payload))
                    for e in journal.entries()]
        finally:
            journal.close()


    def journal_users(self):
        """(seq, metadata user) of every entry."""
        journal = FileJournal(self.journal, readonly=True)
        try:
            return [(e.seq, e.user) for e in journal.entries()]
        finally:
            journal.close()


class Server:
    """``python -m Zope2.Startup.serve etc/zope.ini``, until stopped."""

    def __init__(self, instance, **env):
        self.instance = instance
        self.log = instance.home / ("server-%d.log" % time.monotonic_ns())
        self._log = open(str(self.log), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "Zope2.Startup.serve",
             str(instance.home / "etc" / "zope.ini")],
            env=instance.env(**env), cwd=str(instance.home),
            stdout=self._log,
            stderr=subprocess.STDOUT)
        self.url = "http://127.0.0.1:%d" % instance.port
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("Zope exited with %s:\n%s"
                                     % (self.proc.returncode, self.output()))
            try:
                socket.create_connection(
                    ("127.0.0.1", self.instance.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("Zope did not listen within %ds:\n%s"
                             % (STARTUP_TIMEOUT, self.output()))

    def output(self):
        self._log.flush()
        return self.log.read_text()

    def get(self, path, user="admin", password="secret"):
        """(status, body) of a GET, with basic auth unless user is None."""
        request = urllib.request.Request(self.url + path)
        if user is not None:
            token = base64.b64encode(
                ("%s:%s" % (user, password)).encode()).decode()
            request.add_header("Authorization", "Basic " + token)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ok(self, path, **kw):
        status, body = self.get(path, **kw)
        assert status == 200, (path, status, body, self.output()[-3000:])
        return body

    def dump(self):
        """The example's JSON view of the OFS tree and the meta types."""
        return json.loads(self.ok("/@@zj-dump"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _find(node, *path):
    for name in path:
        node = {c["id"]: c for c in node["children"]}[name]
    return node


def _adduser(instance, name, password):
    proc = instance.run("-m", "zjournal.zope.adduser", "-c", instance.conf,
                        name, password)
    assert proc.returncode == 0, proc.stdout
    return proc


@pytest.fixture
def instance(tmp_path):
    return Instance(tmp_path / "instance")


def test_commands_through_the_publisher_survive_restart_and_rebuild(
        instance):
    # The initial user comes from Zope's inituser file, read at the first
    # startup (here: the one zjournal.zope.adduser makes).
    (instance.home / "inituser").write_text("admin:secret\n")
    _adduser(instance, "editor", "editpw")
    assert not (instance.home / "inituser").exists()
    entries = instance.journal_entries()
    assert [(seq, name) for seq, name, _ in entries] == [
        (1, "zjournal.zope.initialize"), (2, "zjournal.zope.add_user")]
    init_user = entries[0][2]["inituser"]
    assert init_user[0] == "admin" and "secret" not in init_user[1]
    assert "editpw" not in entries[1][2]["password"]

    # Zope's own addzopeuser commits outside any command: refused.
    refused = instance.run("-m", "Zope2.utilities.adduser", "-c",
                           instance.conf, "mallory", "pw")
    assert refused.returncode != 0
    assert "UnjournaledChangeError" in refused.stdout, refused.stdout
    assert "python -m zjournal.zope.adduser" in refused.stdout
    assert len(instance.journal_entries()) == 2

    with instance.start() as server:
        assert "current (ZODB at seq 2, journal at seq 2" in server.output()
        assert server.ok("/@@zj-add-folder?id=docs&title=Docs") == "/docs"
        server.ok("/docs/@@zj-set-property?name=color&value=blue")
        server.ok("/docs/@@zj-add-folder?id=drafts",
                  user="editor", password="editpw")
        server.ok("/docs/@@zj-rename?old=drafts&new=published")
        # Refused requests journal nothing and change nothing.
        assert server.get("/@@zj-add-folder?id=anon", user=None)[0] == 401
        assert server.get("/@@zj-unjournaled")[0] == 500
        assert "UnjournaledChangeError" in server.output()
        # Viewing writes nothing (it would be refused).
        assert "Auto-generated default page" in server.ok("/", user=None)
        before = server.dump()
    entries = instance.journal_entries()
    assert [name for _, name, _ in entries[2:]] == [
        "zjexample.add_folder", "zjexample.set_property",
        "zjexample.add_folder", "zjexample.rename"]
    assert entries[2][2]["acting_user"] == ("/acl_users", "admin")
    assert entries[4][2]["acting_user"] == ("/acl_users", "editor")
    # Who, as the journal's metadata says: the root user folder's empty
    # path leaves no leading space.
    assert [user for _, user in instance.journal_users()[2:]] == [
        "admin", "admin", "editor", "admin"]

    assert len(before["meta_types"]) == len(set(before["meta_types"]))
    tree = before["tree"]
    docs = _find(tree, "docs")
    assert docs["owner"] == [["acl_users"], "admin"]
    assert ["color", "blue"] in docs["properties"]
    assert _find(tree, "docs", "published")["owner"] == [
        ["acl_users"], "editor"]
    assert _find(tree, "acl_users")["users"] == ["admin", "editor"]
    assert tree["title"] == "Zope"  # the refused change is not there
    assert "anon" not in [c["id"] for c in tree["children"]]

    # Restart: the ZODB is current, nothing is replayed.
    with instance.start() as server:
        assert "current (ZODB at seq 6, journal at seq 6" in server.output()
        assert server.dump() == before

    # Without its Data.fs, Zope starts from the journal alone.
    instance.remove_zodb()
    with instance.start() as server:
        log = server.output()
        assert "rebuilt (ZODB empty, journal at seq 6, 6 commands" \
            in log, log
        # (Products were installed before the replay, and once only.)
        assert server.dump() == before
        # The rebuilt instance goes on journaling where the journal ends.
        server.ok("/docs/@@zj-add-folder?id=after", user="editor",
                  password="editpw")
    assert [seq for seq, _, _ in instance.journal_entries()] == list(
        range(1, 8))
    verify = instance.run("-m", "zjournal.cli", "verify", instance.journal)
    assert verify.returncode == 0, verify.stdout


def test_a_kill_after_the_journal_commit_is_caught_up_at_restart(
        instance):
    _adduser(instance, "admin", "secret")
    server = instance.start(ZJOURNAL_KILL_AT="vote.after-sync")
    try:
        # The server dies by SIGKILL once the journal holds the record and
        # before the ZODB has committed: the request gets no answer.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            server.get("/@@zj-add-folder?id=docs")
        assert server.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        server.stop()
    assert [name for _, name, _ in instance.journal_entries()][-1] == \
        "zjexample.add_folder"
    with instance.start() as server:
        assert "caught up (ZODB at seq 2, journal at seq 3, 1 commands" \
            in server.output(), server.output()
        docs = _find(server.dump()["tree"], "docs")
        assert docs["owner"] == [["acl_users"], "admin"]


def test_recover_script_rebuilds_offline(instance):
    _adduser(instance, "admin", "secret")
    instance.remove_zodb()
    first = instance.run("-m", "zjournal.zope.recover", "-c", instance.conf)
    assert first.returncode == 0, first.stdout
    assert "database main: rebuilt, 2 commands replayed" in first.stdout
    assert instance.data_fs.exists()
    again = instance.run("-m", "zjournal.zope.recover", "-c", instance.conf)
    assert again.returncode == 0, again.stdout
    assert "database main: current, 0 commands replayed" in again.stdout
    # The rebuilt database has the user the journal says was added.
    with instance.start() as server:
        assert _find(server.dump()["tree"], "acl_users")["users"] == [
            "admin"]


def test_recover_on_a_new_instance_reports_the_journaled_initialization(
        instance):
    proc = instance.run("-m", "zjournal.zope.recover", "-c", instance.conf)
    assert proc.returncode == 0, proc.stdout
    # Zope's initialization was journaled after recovery found nothing.
    entries = instance.journal_entries()
    assert [e[1] for e in entries] == ["zjournal.zope.initialize"]
    assert "; at seq %d of journal %s" % (entries[-1][0], instance.journal) \
        in proc.stdout, proc.stdout


def test_recover_reports_a_zcml_error_clearly(instance):
    zcml = instance.home / "etc" / "site.zcml"
    zcml.write_text(zcml.read_text().replace(
        '<include package="zjexample" />',
        '<include package="zjexample" file="missing.zcml" />'))
    proc = instance.run("-m", "zjournal.zope.recover", "-c", instance.conf)
    assert proc.returncode == 1, proc.stdout
    assert "zjournal.zope.recover: the instance's ZCML does not load:" \
        in proc.stdout, proc.stdout
    assert "missing.zcml" in proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout


def test_recover_closes_the_guarded_databases_when_a_later_section_fails(
        instance):
    conf = pathlib.Path(instance.conf)
    conf.write_text(conf.read_text() + (
        "\n<zjournal other>\n  uri %s\n  database catalog\n</zjournal>\n"
        % (instance.home / "var" / "other")))
    proc = instance.run("-m", "zjournal.zope.recover", "-c", instance.conf)
    assert proc.returncode == 1, proc.stdout
    assert "zjournal.zope.recover: <zjournal other> guards database" \
        " 'catalog'" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    # The main database was guarded (its initialization journaled), then
    # closed: FileStorage saves its index, up to the end of Data.fs, when
    # it is closed (an index saved earlier ends before the commit).
    assert [e[1] for e in instance.journal_entries()] == [
        "zjournal.zope.initialize"]
    from ZODB.fsIndex import fsIndex
    index = fsIndex.load(str(instance.data_fs) + ".index")
    assert index["pos"] == instance.data_fs.stat().st_size


def test_a_journal_of_another_database_stops_startup(tmp_path):
    ours = Instance(tmp_path / "ours")
    _adduser(ours, "admin", "secret")
    theirs = Instance(tmp_path / "theirs")
    _adduser(theirs, "admin", "secret")
    data_fs = digest(ours.data_fs)
    # (The lock file records the pid of its last holder.)
    journal = snapshot(theirs.journal, skip=("journal.lock",))
    ours.configure(journal=theirs.journal)
    proc = ours.run("-m", "Zope2.Startup.serve", str(ours.home / "etc" /
                                                     "zope.ini"))
    assert proc.returncode != 0
    assert "CRITICAL [zjournal.zope.config] Zope cannot start" in proc.stdout
    assert "WrongJournalError: the ZODB was built from journal" \
        in proc.stdout, proc.stdout
    assert digest(ours.data_fs) == data_fs
    assert snapshot(theirs.journal, skip=("journal.lock",)) == journal


def test_a_section_naming_no_database_stops_startup(tmp_path):
    instance = Instance(tmp_path / "instance", database="catalog")
    proc = instance.run("-m", "Zope2.Startup.serve",
                        str(instance.home / "etc" / "zope.ini"))
    assert proc.returncode != 0
    assert "ZopeConfigurationError: <zjournal journal> guards database" \
        " 'catalog', but zope.conf opens no <zodb_db catalog>" \
        in proc.stdout, proc.stdout
    assert not os.path.exists(instance.journal)


class TestSection:
    """The <zjournal> section as Zope's own schema reads zope.conf."""

    def _load(self, tmp_path, body):
        from Zope2.Startup.options import ZopeWSGIOptions
        import zope.component
        from zjournal.zope import config
        conf = tmp_path / "zope.conf"
        conf.write_text(
            "instancehome %s\n%%import zjournal\n<zodb_db main>\n"
            "  <mappingstorage/>\n  mount-point /\n</zodb_db>\n%s\n"
            % (tmp_path, body))
        try:
            root = ZopeWSGIOptions(configfile=str(conf))().configroot
        finally:
            gsm = zope.component.getGlobalSiteManager()
            gsm.unregisterHandler(config.database_opened,
                                  (config.IDatabaseOpened,))
            gsm.unregisterHandler(config.database_opened_with_root,
                                  (config.IDatabaseOpenedWithRoot,))
        return root.product_config

    def test_defaults(self, tmp_path):
        found = self._load(tmp_path, "<zjournal j>\n  uri /x/journal\n"
                           "</zjournal>")
        section = found["j"]
        assert (section.uri, section.database, section.allow_unjournaled,
                section.batch_size, section.retries) == (
                    "/x/journal", "main", False, 1000, 10)

    def test_options(self, tmp_path):
        found = self._load(
            tmp_path, "<zjournal j>\n  uri sqlite:///x.sqlite\n"
            "  database cache\n  allow-unjournaled on\n  batch-size 50\n"
            "  retries 3\n</zjournal>")
        section = found["j"]
        assert (section.uri, section.database, section.allow_unjournaled,
                section.batch_size, section.retries) == (
                    "sqlite:///x.sqlite", "cache", True, 50, 3)

    def test_uri_is_required(self, tmp_path):
        import ZConfig
        with pytest.raises(ZConfig.ConfigurationError, match="uri"):
            self._load(tmp_path, "<zjournal j>\n</zjournal>")

    def test_batch_size_must_be_positive(self, tmp_path):
        import ZConfig
        with pytest.raises(ZConfig.ConfigurationError,
                           match="batch-size must be at least 1"):
            self._load(tmp_path, "<zjournal j>\n  uri /x\n  batch-size 0\n"
                       "</zjournal>")


# What the server process imports at startup (as sitecustomize) for the
# retry test: the ZODB's tpc_finish fails once, with ZEO's
# ClientDisconnected (a TransientError), when the flag file exists --
# after the journal's vote made the request's command durable.  With the
# "hook" flag, @@zj-set-property runs its command in a before-commit hook
# instead (deferred work, joining after the publisher's PubBeforeCommit).
FAIL_FINISH = """
import os
import transaction
import ZODB.Connection
from ZEO.Exceptions import ClientDisconnected

_flag = os.environ["ZJ_TEST_FAIL_FINISH"]
_hook_flag = os.environ["ZJ_TEST_IN_HOOK"]
_real = ZODB.Connection.Connection.tpc_finish


def tpc_finish(self, txn, *args, **kw):
    if getattr(self, "journaled_db", None) is not None \\
            and os.path.exists(_flag):
        os.remove(_flag)
        raise ClientDisconnected("lost the ZEO server during tpc_finish")
    return _real(self, txn, *args, **kw)


ZODB.Connection.Connection.tpc_finish = tpc_finish

import zjexample.views
from zjexample import commands
from zjournal.zope import execute

_set_property = zjexample.views.SetProperty.__call__


def deferred(view, name, value):
    if not os.path.exists(_hook_flag):
        return _set_property(view, name, value)
    os.remove(_hook_flag)
    context = view.context
    command = commands.SetProperty(
        zjexample.views._path(context), name, value)
    transaction.get().addBeforeCommitHook(execute, (context, command))
    return "deferred"


zjexample.views.SetProperty.__call__ = deferred
"""


def test_a_request_is_not_retried_after_its_journal_commit(instance,
                                                           tmp_path):
    pytest.importorskip("ZEO")
    _adduser(instance, "admin", "secret")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_FINISH)
    flag = tmp_path / "fail-next-finish"
    in_hook = tmp_path / "next-in-a-hook"
    path = os.pathsep.join([str(site)] + [
        p for p in instance.env()["PYTHONPATH"].split(os.pathsep) if p])
    with instance.start(PYTHONPATH=path, ZJ_TEST_FAIL_FINISH=str(flag),
                        ZJ_TEST_IN_HOOK=str(in_hook)) as server:
        server.ok("/@@zj-add-folder?id=docs")
        flag.write_text("")
        status, _ = server.get("/docs/@@zj-set-property?name=n&value=1")
        assert not flag.exists(), server.output()[-3000:]
        # The client hears of the failure; the command is committed
        # once, not once per retry.
        assert status == 500
        assert server.output().count("not retrying the request") == 1
        server.ok("/docs/@@zj-set-property?name=m&value=2")
        # The same, for a command that joins the transaction in a
        # before-commit hook, after the publisher's PubBeforeCommit.
        flag.write_text("")
        in_hook.write_text("")
        status, _ = server.get("/docs/@@zj-set-property?name=h&value=3")
        assert not flag.exists() and not in_hook.exists()
        assert status == 500
        assert server.output().count("not retrying the request") == 2
        server.ok("/docs/@@zj-set-property?name=k&value=4")
        docs = _find(server.dump()["tree"], "docs")
    names = [(name, args.get("name")) for _, name, args
             in instance.journal_entries()[2:]]
    assert names == [("zjexample.add_folder", None),
                     ("zjexample.set_property", "n"),
                     ("zjexample.set_property", "m"),
                     ("zjexample.set_property", "h"),
                     ("zjexample.set_property", "k")]
    # The ZODB caught up with the journaled commands before the next one.
    for prop in (["n", "1"], ["m", "2"], ["h", "3"], ["k", "4"]):
        assert prop in docs["properties"]


def test_an_inituser_that_cannot_be_removed_stops_the_first_start(
        instance):
    # Zope would add the user again outside any command, and each start
    # would journal another initialization.  An immutable directory is
    # one that even root cannot remove a file from.
    (instance.home / "inituser").write_text("admin:secret\n")
    home = str(instance.home)
    try:
        subprocess.run(["chattr", "+i", home], check=True,
                       stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip("cannot make the instance directory immutable: %s" % e)
    try:
        proc = instance.run("-m", "zjournal.zope.adduser", "-c",
                            instance.conf, "editor", "editpw")
    finally:
        subprocess.run(["chattr", "-i", home], check=True)
    assert proc.returncode != 0
    assert "the inituser file %s cannot be removed" % (
        instance.home / "inituser") in proc.stdout, proc.stdout
    assert "nothing was journaled" in proc.stdout
    assert not os.path.exists(instance.journal) or \
        instance.journal_entries() == []
    # Once it can be removed, the start goes on as usual.
    _adduser(instance, "editor", "editpw")
    assert not (instance.home / "inituser").exists()
    assert [name for _, name, _ in instance.journal_entries()] == [
        "zjournal.zope.initialize", "zjournal.zope.add_user"]


def test_an_unsalted_inituser_hash_is_journaled_as_it_is_with_a_warning(
        instance):
    # mkwsgiinstance writes the initial user's password as {SHA256}: a
    # hash cannot be salted afterwards, so the journal holds it unchanged
    # -- and startup says so.
    from AuthEncoding.AuthEncoding import pw_encrypt
    hashed = pw_encrypt("secret", "SHA256").decode("ascii")
    (instance.home / "inituser").write_text("admin:%s\n" % hashed)
    with instance.start() as server:
        log = server.output()
        assert "WARNING [zjournal.zope.config]" in log, log
        assert "unsalted {SHA256} password hash" in log
        # While the server holds the database, the scripts say so.
        for script in ("zjournal.zope.adduser", "zjournal.zope.recover"):
            args = ["-m", script, "-c", instance.conf]
            if script.endswith("adduser"):
                args += ["editor", "pw"]
            proc = instance.run(*args)
            assert proc.returncode == 1, proc.stdout
            assert "the database is in use" in proc.stdout
            assert "stop the Zope instance first" in proc.stdout
            assert "Traceback" not in proc.stdout, proc.stdout
    entries = instance.journal_entries()
    assert entries[0][2]["inituser"][:2] == ("admin", hashed)
    assert len(entries) == 1
    # A plain-text inituser password is salted, and nothing is said.
    other = Instance(instance.home.parent / "plain")
    (other.home / "inituser").write_text("admin:secret\n")
    proc = _adduser(other, "editor", "pw")
    assert "unsalted" not in proc.stdout
    assert other.journal_entries()[0][2]["inituser"][1].startswith("{SSHA}")


class MadeInstance(Instance):
    """An instance home made by a tool, not by :class:`Instance`."""

    def __init__(self, home):
        self.home = pathlib.Path(home)
        self.journal = str(self.home / "var" / "journal")
        self.data_fs = self.home / "var" / "Data.fs"
        self.port = _free_port()
        self.home.mkdir(parents=True)  # where the tools run


def _needs_paste():
    # The zope.ini mkwsgiinstance writes loads Paste's translogger:
    # Zope's "wsgi" extra, which zjournal's "zope" extra asks for.
    if importlib.util.find_spec("paste") is None and not os.environ.get(
            "CI"):
        pytest.skip("Paste is not installed (pip install 'Zope[wsgi]')")


def test_the_documented_mkwsgiinstance_steps_make_a_journaled_instance(
        tmp_path):
    # docs/zope.rst, "Creating an instance", step by step.
    _needs_paste()
    made = MadeInstance(tmp_path / "zinst")
    proc = made.run("-m", "Zope2.utilities.mkwsgiinstance", "-d",
                    str(made.home), "-u", "admin:secret")
    assert proc.returncode == 0, proc.stdout
    (made.home / "inituser").unlink()
    conf = made.home / "etc" / "zope.conf"
    text = conf.read_text()
    assert "instancehome $INSTANCE\n" in text
    text = text.replace("instancehome $INSTANCE\n",
                        "instancehome $INSTANCE\n\n%import zjournal\n", 1)
    conf.write_text(text + "\n<zjournal journal>\n"
                    "  uri $INSTANCE/var/journal\n  database main\n"
                    "</zjournal>\n")
    zcml = made.home / "etc" / "site.zcml"
    zcml.write_text(zcml.read_text().replace(
        "</configure>", '  <include package="zjexample" />\n</configure>'))
    ini = made.home / "etc" / "zope.ini"
    assert "port = 8080\n" in ini.read_text()
    ini.write_text(ini.read_text().replace(
        "port = 8080\n", "port = %d\n" % made.port))
    _adduser(made, "admin", "secret")
    with made.start() as server:
        assert server.ok("/@@zj-add-folder?id=docs") == "/docs"
    assert [name for _, name, _ in made.journal_entries()] == [
        "zjournal.zope.initialize", "zjournal.zope.add_user",
        "zjexample.add_folder"]
    assert made.journal_entries()[1][2]["password"].startswith("{SSHA}")


def test_make_instance_fills_the_templates_inside_the_given_directory(
        tmp_path):
    # examples/zope/make_instance.py, as its README uses it.
    made = MadeInstance(tmp_path / "zj")
    script = str(EXAMPLES / "make_instance.py")
    proc = made.run(script, str(made.home), "--port", str(made.port))
    assert proc.returncode == 0, proc.stdout
    for name in ("zope.conf", "zope.ini", "site.zcml"):
        text = (made.home / "etc" / name).read_text()
        assert "{" not in text.replace("${", ""), (name, text)
    assert "uri %s" % made.journal in (made.home / "etc" / "zope.conf"
                                       ).read_text()
    # A second run refuses to overwrite the instance.
    again = made.run(script, str(made.home))
    assert again.returncode != 0
    assert "already holds an instance" in again.stdout
    _adduser(made, "admin", "secret")
    with made.start() as server:
        assert server.ok("/@@zj-add-folder?id=docs") == "/docs"
    assert sorted(os.listdir(str(tmp_path))) == ["zj"]


from OFS.SimpleItem import SimpleItem  # noqa: E402 (Zope is installed)


class PluggedUserFolder(SimpleItem):
    """A user folder that is not Zope's standard one: like a
    PluggableAuthService, it keeps no ``data``.  (Defined at module level:
    the ZODB pickles it.)"""

    id = "acl_users"

    def _createInitialUser(self):
        raise AssertionError("not to be called")


def test_an_inituser_beside_a_non_standard_user_folder_is_ignored(caplog):
    """A root user folder other than Zope's must not make the
    initialization fail."""
    import transaction
    import ZODB
    from zjournal.zope.commands import APPLICATION_KEY
    from zjournal.zope.commands import initialize

    inituser = ("admin", "{SHA256}c2VjcmV0", ())
    db = ZODB.DB(None)
    try:
        conn = db.open()
        root = conn.root()
        assert initialize(root, inituser) == "admin"
        transaction.commit()
        app = root[APPLICATION_KEY]
        app._delObject("acl_users")
        app._setObject("acl_users", PluggedUserFolder())
        transaction.commit()
        assert initialize(root, inituser) is None
        transaction.commit()
        assert type(app.acl_users.aq_base).__name__ == "PluggedUserFolder"
        assert "the inituser file is ignored" in caplog.text
    finally:
        transaction.abort()
        db.close()
