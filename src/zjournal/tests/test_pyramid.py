"""zjournal.pyramid: the include, its settings, request.execute, retries.

The applications here are real Pyramid applications (pyramid_tm,
pyramid_retry, pyramid_zodbconn on a FileStorage or a ZEO server) driven
through WebTest.  The two-process test kills a real process after its
journal vote (``ZJOURNAL_KILL_AT``); this module is also that process's
program (``python -m zjournal.tests.test_pyramid worker SETTINGS``).
"""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("pyramid_zodbconn")
pytest.importorskip("pyramid_retry")
pytest.importorskip("webtest")

import webtest  # noqa: E402
import ZODB  # noqa: E402
import ZODB.Connection  # noqa: E402
import ZODB.FileStorage  # noqa: E402
import ZODB.POSException  # noqa: E402
from pyramid.config import Configurator  # noqa: E402
from pyramid.exceptions import ConfigurationError  # noqa: E402
from pyramid.scripting import prepare  # noqa: E402
from pyramid_zodbconn import get_connection  # noqa: E402

import zjournal  # noqa: E402
from zjournal import commands  # noqa: E402
from zjournal import pyramid as zpyramid  # noqa: E402
from zjournal.datamanager import journaled_seqs  # noqa: E402
from zjournal.tests.examples import Fail  # noqa: E402
from zjournal.tests.examples import Increment  # noqa: E402
from zjournal.tests.examples import Put  # noqa: E402
from zjournal.tests.examples import state  # noqa: E402
from zjournal.tests.test_db import tree  # noqa: E402

EXPLICIT = "pyramid_tm.explicit_manager"


class HeaderUser:
    """A security policy: the user is whoever the X-User header names."""

    def identity(self, request):
        return request.headers.get("X-User")

    def authenticated_userid(self, request):
        return self.identity(request)

    def permits(self, request, context, permission):
        return True

    def remember(self, request, userid, **kw):
        return []

    def forget(self, request, **kw):
        return []


def make_app(settings, hooks=None, error_view=False):
    """A small application: commands from zjournal.tests.examples behind
    JSON views.  ``hooks`` maps a view name to a callable run by that view
    with the request ("bump", "direct": after its command).
    ``error_view``: an error page for any exception, as applications
    have."""
    hooks = hooks or {}

    def hook(name, request):
        request.environ.setdefault("test.attempts", []).append(
            request.environ.get("retry.attempt"))
        if name in hooks:
            hooks[name](request)

    def put(request):
        hook("put", request)
        key, value = request.matchdict["key"], request.matchdict["value"]
        return {"result": request.execute(Put(key, value),
                                          metadata={"via": "put"})}

    def bump(request):
        result = request.execute(Increment("n"))
        hook("bump", request)  # after the command: the snapshot is taken
        return {"result": result,
                "attempts": request.environ["test.attempts"]}

    def direct(request):
        # The public function on the request's connection, not
        # request.execute.
        result = zjournal.execute(get_connection(request), Increment("n"))
        hook("direct", request)
        return {"result": result,
                "attempts": request.environ["test.attempts"]}

    def unmanaged(request):
        # pyramid_tm leaves these alone (unmanaged_only).
        if request.matchdict["how"] == "touch":
            # Anything that looks at the transaction first, e.g. to
            # annotate it; nobody commits it.
            request.tm.get().note("looked at")
            return {"result": request.execute(Increment("n"))}
        with request.tm:
            return {"result": request.execute(Increment("n"))}

    def error_page(exc, request):
        request.response.status = 500
        return {"error": type(exc).__name__}

    def put_then_fail(request):
        request.execute(Put("before", 1))
        try:
            request.execute(Fail("failed"))
        except RuntimeError as e:
            # The view carries on and returns normally: the doomed
            # transaction is aborted anyway.
            return {"error": str(e)}
        raise AssertionError("Fail did not fail")

    def show(request):
        root = get_connection(request).root()
        return {"state": state(root),
                "seq": root[zjournal.MARKER_KEY].last_seq,
                "attempts": request.environ.get("test.attempts")}

    config = Configurator(settings=settings)
    config.include("zjournal.pyramid")
    config.set_security_policy(HeaderUser())
    for name, pattern, view in [("put", "/put/{key}/{value}", put),
                                ("bump", "/bump", bump),
                                ("direct", "/direct", direct),
                                ("unmanaged", "/unmanaged/{how}", unmanaged),
                                ("fail", "/fail", put_then_fail),
                                ("show", "/show", show)]:
        config.add_route(name, pattern)
        config.add_view(view, route_name=name, renderer="json")
    if error_view:
        config.add_exception_view(error_page, context=Exception,
                                  renderer="json")
    return config.make_wsgi_app()


@pytest.fixture
def settings(site):
    return {
        "zodbconn.uri": "file://%s" % site.data_fs,
        "zjournal.uri": site.journal_dir,
        "zjournal.fsync": "never",
        "retry.attempts": "3",
    }


@pytest.fixture
def apps():
    """Make applications; close their JournaledDBs when the test ends."""
    made = []

    def make(settings, hooks=None, **kw):
        app = make_app(settings, hooks, **kw)
        made.append(zpyramid.get_journaled_db(app.registry))
        return app

    yield make
    for jdb in made:
        jdb.close()


def shown(testapp):
    """(state, seq) as the application's own view reports them."""
    data = testapp.get("/show").json
    table, counters = data["state"]
    return (table, counters), data["seq"]


# -- settings ----------------------------------------------------------------

class TestSettings:

    def test_everything_parsed_and_typed(self):
        uri, imports, journal_kw, db_kw = zpyramid.parse_settings({
            "zjournal.uri": " sqlite:///x.sqlite ", "zjournal.fsync": "batch",
            "zjournal.imports": "a.commands\n  b.commands c",
            "zjournal.allow_unjournaled": "yes",
            "zjournal.journal_queries": "false",
            "zjournal.batch_size": "50", "zjournal.retries": "0",
            "tm.manager_hook": EXPLICIT})
        assert uri == "sqlite:///x.sqlite"
        assert imports == ["a.commands", "b.commands", "c"]
        assert journal_kw == {"fsync": "batch"}
        assert db_kw == {"allow_unjournaled": True, "journal_queries": False,
                         "batch_size": 50, "retries": 0}

    def test_only_the_uri_is_required(self):
        assert zpyramid.parse_settings({"zjournal.uri": "j"}) == (
            "j", [], {}, {})

    @pytest.mark.parametrize("settings, named", [
        ({}, "zjournal.uri is not set"),
        ({"zjournal.uri": "  "}, "zjournal.uri is not set"),
        ({"zjournal.uri": "j", "zjournal.fsync": "sometimes"},
         "zjournal.fsync = 'sometimes'"),
        ({"zjournal.uri": "j", "zjournal.allow_unjournaled": "perhaps"},
         "zjournal.allow_unjournaled = 'perhaps'"),
        ({"zjournal.uri": "j", "zjournal.batch_size": "0"},
         "zjournal.batch_size = '0'"),
        ({"zjournal.uri": "j", "zjournal.retries": "many"},
         "zjournal.retries = 'many'"),
        ({"zjournal.uri": "j", "zjournal.allow_unjurnaled": "true"},
         "unknown setting zjournal.allow_unjurnaled"),
    ])
    def test_a_bad_setting_is_named(self, settings, named):
        with pytest.raises(zpyramid.PyramidConfigurationError) as raised:
            zpyramid.parse_settings(settings)
        assert named in str(raised.value)
        # Both a zjournal refusal and what Pyramid users catch.
        assert isinstance(raised.value, zjournal.ZJournalError)
        assert isinstance(raised.value, ConfigurationError)

    def test_a_bad_setting_opens_nothing(self, site, settings):
        settings["zjournal.batch_size"] = "lots"
        with pytest.raises(zpyramid.PyramidConfigurationError):
            make_app(settings)
        assert not os.path.exists(site.journal_dir)
        assert not os.path.exists(site.data_fs)

    def test_settings_reach_the_journaled_db(self, settings, apps):
        settings.update({"zjournal.allow_unjournaled": "true",
                         "zjournal.retries": "4",
                         "zjournal.batch_size": "7",
                         "zjournal.digest_interval": "100"})
        jdb = zpyramid.get_journaled_db(apps(settings).registry)
        assert (jdb.allow_unjournaled, jdb.retries, jdb.batch_size,
                jdb.digest_interval) == (True, 4, 7, 100)
        assert jdb.journal.fsync == "never"
        assert jdb.db.klass.journaled_db is jdb

    def test_zodbconn_uri_is_required(self, site, settings):
        del settings["zodbconn.uri"]
        with pytest.raises(zpyramid.PyramidConfigurationError,
                           match="zodbconn.uri"):
            make_app(settings)
        assert not os.path.exists(site.journal_dir)

    def test_no_include_no_journaled_db(self):
        with pytest.raises(zpyramid.PyramidConfigurationError,
                           match="include zjournal.pyramid"):
            zpyramid.get_journaled_db(Configurator().registry)


# -- startup -----------------------------------------------------------------

class TestStartup:

    def test_rebuilds_a_deleted_zodb_at_startup(self, site, settings, apps):
        jdb = site.open()
        for i in range(5):
            jdb.execute(Increment("n"))
        jdb.execute(Put("a", "b"))
        jdb.close()
        site.remove_zodb()
        app = apps(settings)
        found = zpyramid.get_journaled_db(app.registry).recovery
        assert (found.action, found.replayed) == ("rebuilt", 6)
        assert shown(webtest.TestApp(app)) == (({"a": "b"}, {"n": 5}), 6)

    def test_a_refusal_stops_the_application_and_frees_the_files(
            self, tmp_path, site, settings):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        # The Data.fs was built from another journal.
        settings["zjournal.uri"] = str(tmp_path / "other-journal")
        with pytest.raises(zjournal.WrongJournalError):
            make_app(settings)
        # Nothing is left locked: both open again.
        site.open().close()
        zjournal.FileJournal(str(tmp_path / "other-journal")).close()

    @pytest.mark.parametrize("typo", ["journal2", "var/journal2"])
    def test_a_mistyped_journal_uri_leaves_the_disk_as_it_was(
            self, site, settings, typo):
        # A typo in zjournal.uri next to an existing Data.fs: the journal
        # the open created, and the parents it created, go again.
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        before = tree(site.root)
        settings["zjournal.uri"] = os.path.join(site.root, typo)
        with pytest.raises(zjournal.WrongJournalError):
            make_app(settings)
        assert tree(site.root) == before

    def test_a_locked_journal_stops_the_application(self, site, settings):
        holder = site.journal()
        try:
            with pytest.raises(zjournal.JournalLockedError):
                make_app(settings)
        finally:
            holder.close()
        # The ZODB pyramid_zodbconn opened was closed again.
        ZODB.FileStorage.FileStorage(site.data_fs).close()

    @pytest.mark.parametrize("imports", [None, "zjournal.demo"])
    def test_imports_register_commands_before_recovery(
            self, site, settings, imports):
        """A fresh process whose application has not imported the
        commands when it includes zjournal.pyramid: recovery cannot
        replay them unless zjournal.imports names their module."""
        from zjournal import demo
        jdb = site.open()
        jdb.execute(demo.OpenAccount("alice", 5))
        jdb.execute(demo.Deposit("alice", 7))
        jdb.close()
        site.remove_zodb()
        if imports:
            settings["zjournal.imports"] = imports
        proc = subprocess.run(
            [sys.executable, "-m", "zjournal.tests.test_pyramid", "start",
             json.dumps(settings)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=120)
        if imports:
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == ["rebuilt", 2]
        else:
            assert proc.returncode == 1
            assert ("ReplayError: replay stopped at seq 1 (demo.bank.open):"
                    " UnknownCommandError" in proc.stderr), proc.stderr

    def test_imports_that_fail_are_named(self, site, settings):
        settings["zjournal.imports"] = "zjournal.demo zjournal.no_such_module"
        with pytest.raises(zpyramid.PyramidConfigurationError,
                           match="cannot import zjournal.no_such_module"):
            make_app(settings)
        assert not os.path.exists(site.journal_dir)

    def test_an_application_that_includes_the_packages_itself(
            self, settings):
        config = Configurator(settings=settings)
        config.include("pyramid_zodbconn")
        config.include("pyramid_tm")
        config.include("zjournal.pyramid")  # opens the same ZODB, once
        app = config.make_wsgi_app()
        jdb = zpyramid.get_journaled_db(app.registry)
        try:
            assert app.registry._zodb_databases[""] is jdb.db
        finally:
            jdb.close()


# -- request.execute ---------------------------------------------------------

@pytest.mark.parametrize("manager", [None, EXPLICIT])
class TestExecute:

    def test_commits_with_the_request(self, settings, apps, manager):
        if manager:
            settings["tm.manager_hook"] = manager
        testapp = webtest.TestApp(apps(settings))
        res = testapp.get("/put/k/v", headers={"X-User": "alice"})
        assert res.json == {"result": "v"}
        testapp.get("/bump")
        jdb = zpyramid.get_journaled_db(testapp.app.registry)
        entries = list(jdb.journal.entries())
        assert [e.command_name for e in entries] == ["tests.put",
                                                     "tests.increment"]
        # Who and where, from pyramid_tm's annotations, and the view's own.
        assert entries[0].metadata == {"user": "alice",
                                       "description": "/put/k/v",
                                       "via": "put"}
        assert entries[1].metadata == {"description": "/bump"}
        assert shown(testapp) == (({"k": "v"}, {"n": 1}), 2)

    def test_a_failing_command_leaves_nothing(self, site, settings, apps,
                                              manager):
        if manager:
            settings["tm.manager_hook"] = manager
        testapp = webtest.TestApp(apps(settings))
        testapp.get("/put/k/v")
        size = os.path.getsize(site.data_fs)
        res = testapp.get("/fail")
        assert res.json == {"error": "Fail always fails"}
        # Neither the failed command nor the one before it in the request.
        jdb = zpyramid.get_journaled_db(testapp.app.registry)
        assert jdb.journal.last_seq == 1
        assert os.path.getsize(site.data_fs) == size
        assert shown(testapp) == (({"k": "v"}, {}), 1)

    def test_a_conflict_is_retried(self, settings, apps, manager):
        if manager:
            settings["tm.manager_hook"] = manager
        conflicts = []

        def conflict_once(request):
            if request.environ["retry.attempt"] == 0:
                # Another thread commits the same counter while this
                # request is running: its commit conflicts.
                other = threading.Thread(
                    target=jdb.execute, args=(Increment("n", 10),))
                other.start()
                other.join()
                conflicts.append(jdb.journal.last_seq)

        app = apps(settings, {"bump": conflict_once})
        jdb = zpyramid.get_journaled_db(app.registry)
        res = webtest.TestApp(app).get("/bump")
        assert res.json == {"result": 11, "attempts": [0, 1]}
        assert conflicts == [1]
        assert [e.command.by for e in jdb.journal.entries()] == [10, 1]
        assert shown(webtest.TestApp(app))[0] == ({}, {"n": 11})

    def test_without_retries_the_conflict_reaches_the_client(
            self, settings, apps, manager):
        if manager:
            settings["tm.manager_hook"] = manager
        settings["retry.attempts"] = "1"

        def conflict(request):
            other = threading.Thread(target=jdb.execute,
                                     args=(Increment("n", 10),))
            other.start()
            other.join()

        app = apps(settings, {"bump": conflict})
        jdb = zpyramid.get_journaled_db(app.registry)
        with pytest.raises(ZODB.POSException.ConflictError):
            webtest.TestApp(app).get("/bump")
        assert [e.command.by for e in jdb.journal.entries()] == [10]

    def test_journal_ahead_is_caught_up_before_the_retry(
            self, settings, apps, manager):
        # Two attempts are enough: the first finds the journal ahead at
        # its vote, the second starts from a caught-up ZODB.
        if manager:
            settings["tm.manager_hook"] = manager
        settings["retry.attempts"] = "2"
        app = apps(settings)
        jdb = zpyramid.get_journaled_db(app.registry)
        testapp = webtest.TestApp(app)
        testapp.get("/bump")
        # What a process sharing the journal leaves when it dies after its
        # journal vote, before its ZODB commit.
        name, version, payload = commands.encode(Increment("n", 10))
        jdb.journal.append(jdb.journal.prepare(
            [(2, 0.0, version, name, payload)], jdb.journal.head))
        assert shown(testapp) == (({}, {"n": 1}), 1)  # the ZODB is behind
        res = testapp.get("/bump")
        assert res.json == {"result": 12, "attempts": [0, 1]}
        assert [e.command.by for e in jdb.journal.entries()] == [1, 10, 1]
        assert shown(testapp) == (({}, {"n": 12}), 3)

    def test_outside_a_managed_request(self, settings, apps, manager):
        if manager:
            settings["tm.manager_hook"] = manager
        app = apps(settings)
        env = prepare(registry=app.registry)
        try:
            request = env["request"]
            # No transaction begun: nobody would commit the command.  (The
            # thread-local manager would hand out one on request.tm.get().)
            with pytest.raises(zpyramid.NoRequestTransactionError,
                               match="with request.tm"):
                request.execute(Put("script", 1))
            with request.tm:
                request.execute(Put("script", 2))
        finally:
            env["closer"]()
        jdb = zpyramid.get_journaled_db(app.registry)
        assert [e.command.value for e in jdb.journal.entries()] == [2]


    def test_a_request_pyramid_tm_does_not_manage(self, settings, apps,
                                                  manager):
        if manager:
            settings["tm.manager_hook"] = manager
        settings["tm.activate_hook"] = __name__ + ".not_for_bump"
        app = apps(settings)
        testapp = webtest.TestApp(app)
        with pytest.raises(zpyramid.NoRequestTransactionError,
                           match="not managing /bump"):
            testapp.get("/bump")
        jdb = zpyramid.get_journaled_db(app.registry)
        assert jdb.journal.last_seq == 0
        assert shown(testapp) == (({}, {}), 0)

    def test_a_change_after_a_command_to_its_object_is_refused(
            self, settings, apps, manager):
        # The counters mapping is the command's; the view changes it again.
        if manager:
            settings["tm.manager_hook"] = manager

        def sneak(request):
            counters = get_connection(request).root()["counters"]
            counters["sneaky"] = 1

        app = apps(settings, {"bump": sneak})
        testapp = webtest.TestApp(app)
        with pytest.raises(zjournal.UnjournaledChangeError):
            testapp.get("/bump")
        jdb = zpyramid.get_journaled_db(app.registry)
        assert jdb.journal.last_seq == 0
        assert shown(testapp) == (({}, {}), 0)

    @pytest.mark.parametrize("error", [
        "ZEO.Exceptions.ClientDisconnected",  # a TransientError
        "ZODB.POSException.StorageSystemError",
    ])
    def test_a_failure_after_the_journal_vote_is_a_success(
            self, settings, apps, manager, monkeypatch, error):
        # The journal is the decision: the command is committed.  A
        # retry would apply it twice; a 500 would be a lie.
        if manager:
            settings["tm.manager_hook"] = manager
        module, name = error.rsplit(".", 1)
        error = getattr(pytest.importorskip(module), name)
        app = apps(settings)
        jdb = zpyramid.get_journaled_db(app.registry)
        testapp = webtest.TestApp(app)
        real = ZODB.Connection.Connection.tpc_finish
        failures = []

        def tpc_finish(conn, txn, *args, **kw):
            if conn is not None and getattr(conn, "journaled_db", None) \
                    and not failures:
                failures.append(txn)
                raise error("lost the storage during tpc_finish")
            return real(conn, txn, *args, **kw)

        monkeypatch.setattr(ZODB.Connection.Connection, "tpc_finish",
                            tpc_finish)
        res = testapp.get("/bump")
        assert res.json == {"result": 1, "attempts": [0]}
        assert len(failures) == 1
        assert [e.command.by for e in jdb.journal.entries()] == [1]
        assert jdb.needs_catch_up
        # The next request catches the ZODB up before it begins.
        assert shown(testapp) == (({}, {"n": 1}), 1)
        assert testapp.get("/bump").json["result"] == 2
        assert jdb.journal.last_seq == 2

    def test_an_error_after_the_commit_completed_is_not_retried(
            self, settings, apps, manager, monkeypatch):
        # transaction runs the synchronizers' afterCompletion after the
        # two-phase commit, outside its error handling: a storage that
        # polls its server there (RelStorage) can raise a TransientError
        # although journal and ZODB both committed.
        ClientDisconnected = pytest.importorskip(
            "ZEO.Exceptions").ClientDisconnected
        if manager:
            settings["tm.manager_hook"] = manager
        app = apps(settings)
        jdb = zpyramid.get_journaled_db(app.registry)
        testapp = webtest.TestApp(app)
        real = ZODB.Connection.Connection.afterCompletion
        raised = []

        def afterCompletion(conn, txn):
            real(conn, txn)
            if getattr(conn, "journaled_db", None) is not None \
                    and not raised and journaled_seqs(txn):
                raised.append(txn)
                raise ClientDisconnected("lost the server while polling")

        monkeypatch.setattr(ZODB.Connection.Connection, "afterCompletion",
                            afterCompletion)
        res = testapp.get("/bump")
        assert raised
        assert res.json == {"result": 1, "attempts": [0]}
        assert [e.command.by for e in jdb.journal.entries()] == [1]
        assert shown(testapp) == (({}, {"n": 1}), 1)

    @pytest.mark.parametrize("path, error_view", [
        ("/bump", True),     # pyramid_tm renders the commit error
        ("/direct", False),  # zjournal.execute, not request.execute
        ("/direct", True),
    ])
    def test_the_commit_is_decided_from_its_transaction(
            self, settings, apps, manager, monkeypatch, path, error_view):
        # The ZODB fails to finish after the journal's vote: however the
        # command was executed and whatever renders the error, the
        # request is neither retried (a second application of the
        # command) nor reported failed.
        if manager:
            settings["tm.manager_hook"] = manager
        app = apps(settings, error_view=error_view)
        jdb = zpyramid.get_journaled_db(app.registry)
        testapp = webtest.TestApp(app)
        failures = fail_next_finish(monkeypatch)
        res = testapp.get(path)
        assert res.json == {"result": 1, "attempts": [0]}
        assert len(failures) == 1
        assert [e.command.by for e in jdb.journal.entries()] == [1]
        assert shown(testapp) == (({}, {"n": 1}), 1)

    def test_a_view_that_commits_a_transaction_itself(
            self, settings, apps, manager, monkeypatch):
        # Only the transaction pyramid_tm commits decides the request:
        # the view's own first commit succeeded, the second transaction
        # conflicts before the journal's vote and must be retried (the
        # retry runs the whole view again).
        if manager:
            settings["tm.manager_hook"] = manager
        conflicts = []

        def commit_and_go_on(request):
            request.tm.commit()
            request.tm.begin()
            request.execute(Put("second", request.environ["retry.attempt"]))

        real = ZODB.Connection.Connection.tpc_vote

        def tpc_vote(conn, txn, *args, **kw):
            if getattr(conn, "journaled_db", None) is not None \
                    and jdb.journal.last_seq == 1 and not conflicts:
                conflicts.append(txn)
                raise ZODB.POSException.ConflictError("second transaction")
            return real(conn, txn, *args, **kw)

        app = apps(settings, {"bump": commit_and_go_on})
        jdb = zpyramid.get_journaled_db(app.registry)
        monkeypatch.setattr(ZODB.Connection.Connection, "tpc_vote", tpc_vote)
        res = webtest.TestApp(app).get("/bump")
        assert len(conflicts) == 1
        assert res.json["attempts"] == [0, 1]
        assert [(e.command_name, getattr(e.command, "value", None))
                for e in jdb.journal.entries()] == [
            ("tests.increment", None), ("tests.increment", None),
            ("tests.put", 1)]

    def test_an_unmanaged_request_is_refused_unless_explicitly_begun(
            self, settings, apps, manager):
        if manager:
            settings["tm.manager_hook"] = manager
        settings["tm.activate_hook"] = __name__ + ".unmanaged_only"
        app = apps(settings)
        testapp = webtest.TestApp(app)
        jdb = zpyramid.get_journaled_db(app.registry)
        if manager:
            # An explicit manager's begun transaction is committed by
            # the block that began it.
            res = testapp.get("/unmanaged/with")
            assert res.json == {"result": 1}
            assert jdb.journal.last_seq == 1
            assert shown(testapp) == (({}, {"n": 1}), 1)
            return
        # The thread-local manager: a transaction it holds may be one
        # that a get() created; refused however it came to be there.
        for how in ("touch", "with"):
            with pytest.raises(zpyramid.NoRequestTransactionError,
                               match="explicit_manager"):
                testapp.get("/unmanaged/" + how)
        assert jdb.journal.last_seq == 0
        assert shown(testapp) == (({}, {}), 0)


def fail_next_finish(monkeypatch, error=None):
    """Make the next journaled ZODB connection's tpc_finish fail (with
    ZEO's ClientDisconnected, a TransientError); returns the list of the
    transactions it failed."""
    if error is None:
        error = pytest.importorskip("ZEO.Exceptions").ClientDisconnected
    real = ZODB.Connection.Connection.tpc_finish
    failures = []

    def tpc_finish(conn, txn, *args, **kw):
        if getattr(conn, "journaled_db", None) is not None \
                and not failures:
            failures.append(txn)
            raise error("lost the storage during tpc_finish")
        return real(conn, txn, *args, **kw)

    monkeypatch.setattr(ZODB.Connection.Connection, "tpc_finish", tpc_finish)
    return failures


def not_for_bump(request):
    """tm.activate_hook: pyramid_tm leaves /bump alone."""
    return request.path != "/bump"


def unmanaged_only(request):
    """tm.activate_hook: pyramid_tm leaves /unmanaged/* alone."""
    return not request.path.startswith("/unmanaged/")


def test_a_redirect_after_a_command_commits_without_an_error_log(
        settings, apps, caplog):
    # tm.commit_veto lets pyramid_tm commit a request whose view raised
    # HTTPFound (rendered by the exception view tween): a success.
    from pyramid.httpexceptions import HTTPFound

    def redirect(request):
        raise HTTPFound(location="/show")

    settings["tm.commit_veto"] = "pyramid_tm.default_commit_veto"
    app = apps(settings, {"bump": redirect})
    jdb = zpyramid.get_journaled_db(app.registry)
    with caplog.at_level("ERROR", logger="zjournal"):
        res = webtest.TestApp(app).get("/bump")
    assert res.status_int == 302
    assert [e.command.by for e in jdb.journal.entries()] == [1]
    assert not jdb.needs_catch_up
    assert [r.getMessage() for r in caplog.records
            if r.name.startswith("zjournal")] == []


class TestExplicitTweens:
    """pyramid.tweens set: Pyramid ignores add_tween, zjournal's tweens
    must be listed."""

    def test_a_list_without_them_is_refused_with_the_lines_to_add(
            self, settings):
        settings["pyramid.tweens"] = ("pyramid_tm.tm_tween_factory\n"
                                      "pyramid.tweens.excview_tween_factory")
        with pytest.raises(zpyramid.PyramidConfigurationError) as found:
            make_app(settings)
        message = str(found.value)
        assert "\n    zjournal.pyramid.catch_up_tween_factory\n" \
            "    pyramid_tm.tm_tween_factory\n" \
            "    zjournal.pyramid.view_response_tween_factory\n" in message

    @pytest.mark.parametrize("tweens", [
        # the view response tween above pyramid_tm, not below
        [zpyramid.CATCH_UP_TWEEN, zpyramid.VIEW_RESPONSE_TWEEN,
         zpyramid.TM_TWEEN, "pyramid.tweens.excview_tween_factory"],
        # another tween between pyramid_tm and the catch-up tween
        [zpyramid.CATCH_UP_TWEEN, "pyramid.tweens.excview_tween_factory",
         zpyramid.TM_TWEEN, zpyramid.VIEW_RESPONSE_TWEEN],
    ])
    def test_misplaced_tweens_are_refused(self, settings, tweens):
        settings["pyramid.tweens"] = "\n".join(tweens)
        with pytest.raises(zpyramid.PyramidConfigurationError,
                           match="is not the line right"):
            make_app(settings)

    def test_the_documented_list_works(self, settings, apps, monkeypatch):
        settings["pyramid.tweens"] = "\n".join([
            "zjournal.pyramid:catch_up_tween_factory",  # either spelling
            zpyramid.TM_TWEEN, zpyramid.VIEW_RESPONSE_TWEEN,
            "pyramid.tweens.excview_tween_factory"])
        app = apps(settings)
        jdb = zpyramid.get_journaled_db(app.registry)
        testapp = webtest.TestApp(app)
        failures = fail_next_finish(monkeypatch)
        assert testapp.get("/bump").json == {"result": 1, "attempts": [0]}
        assert len(failures) == 1
        assert jdb.journal.last_seq == 1


class Read(zjournal.Command):
    """A query: reads one key of the table."""
    command_name = "tests.pyramid.read"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        return root["table"][self.key]


@pytest.mark.parametrize("journal_queries", [False, True])
def test_request_query_reads_and_is_journaled_when_asked(
        settings, apps, journal_queries):
    results = []

    def read(request):
        results.append(request.query(Read("k")))

    settings["zjournal.journal_queries"] = str(journal_queries).lower()
    app = apps(settings, {"bump": read})
    testapp = webtest.TestApp(app)
    testapp.get("/put/k/v")
    testapp.get("/bump")
    jdb = zpyramid.get_journaled_db(app.registry)
    assert results == ["v"]
    expected = ["tests.put", "tests.increment"]
    if journal_queries:
        expected.append(Read.command_name)
    assert [e.command_name for e in jdb.journal.entries()] == expected


# -- two processes, one journal, one ZEO server ------------------------------

def worker(settings):
    """Run one request in an application of this module (another
    process): ZJOURNAL_KILL_AT decides where it dies."""
    app = make_app(settings)
    webtest.TestApp(app).get("/bump")
    print("finished")  # not reached when killed at the vote


def test_another_process_died_after_its_journal_vote(tmp_path):
    """A process of the application dies after its journal vote, before
    its ZODB commit: the journal is ahead of the shared ZODB.  The next
    request of another process finds it at its vote, is retried, catches
    up (replaying the dead process's command) and commits."""
    ZEO = pytest.importorskip("ZEO")
    pytest.importorskip("zodburi")
    address, stop = ZEO.server(path=str(tmp_path / "Data.fs"))
    try:
        settings = {
            "zodbconn.uri": "zeo://%s:%d" % address,
            "zjournal.uri": "sqlite://%s" % (tmp_path / "journal.sqlite"),
            "zjournal.fsync": "never",
            "tm.manager_hook": EXPLICIT,
            "retry.attempts": "2",
        }
        app = make_app(settings)
        jdb = zpyramid.get_journaled_db(app.registry)
        try:
            testapp = webtest.TestApp(app)
            assert testapp.get("/bump").json == {"result": 1,
                                                 "attempts": [0]}
            env = dict(os.environ, ZJOURNAL_KILL_AT="vote.after-sync")
            proc = subprocess.run(
                [sys.executable, "-m", "zjournal.tests.test_pyramid",
                 "worker", json.dumps(settings)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, timeout=120)
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            assert "finished" not in proc.stdout
            assert jdb.journal.last_seq == 2  # journaled, never in the ZODB
            data = testapp.get("/show").json
            assert (data["state"], data["seq"]) == ([{}, {"n": 1}], 1)
            res = testapp.get("/bump")
            assert res.json == {"result": 3, "attempts": [0, 1]}
            data = testapp.get("/show").json
            assert (data["state"], data["seq"]) == ([{}, {"n": 3}], 3)
            assert [e.command_name for e in jdb.journal.entries()] == [
                "tests.increment"] * 3
        finally:
            jdb.close()
    finally:
        stop()


def start(settings):
    """Start an application of this module (another process) and report
    what recovery did."""
    app = make_app(settings)
    found = zpyramid.get_journaled_db(app.registry).recovery
    print(json.dumps([found.action, found.replayed]))


if __name__ == "__main__":
    {"worker": worker, "start": start}[sys.argv[1]](json.loads(sys.argv[2]))


def test_a_retryable_view_exception_committed_anyway_is_not_retried(
        settings):
    # The view raises a TransientError after its command; an exception
    # view renders it as a redirect, which commit_veto lets commit.  The
    # command is committed: running the view again would apply it twice.
    from pyramid.httpexceptions import HTTPFound
    attempts = []

    def bump(request):
        attempts.append(request.environ.get("retry.attempt", 0))
        request.execute(Increment("n"))
        raise ZODB.POSException.ConflictError("raised by the view")

    def busy(exc, request):
        return HTTPFound(location="/")

    settings["tm.commit_veto"] = "pyramid_tm.default_commit_veto"
    config = Configurator(settings=settings)
    config.include("zjournal.pyramid")
    config.add_route("bump", "/bump")
    config.add_view(bump, route_name="bump", renderer="json")
    config.add_exception_view(busy, context=ZODB.POSException.ConflictError)
    app = config.make_wsgi_app()
    jdb = zpyramid.get_journaled_db(app.registry)
    try:
        res = webtest.TestApp(app).get("/bump")
        assert res.status_int == 302
        assert attempts == [0]
        assert [e.command.by for e in jdb.journal.entries()] == [1]
    finally:
        jdb.close()
