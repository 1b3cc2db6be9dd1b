import os
import threading

import pytest
import transaction
import ZODB
from ZODB.POSException import ConflictError

import zjournal
from zjournal import JournaledDB
from zjournal.tests import examples
from zjournal.tests.examples import Fail
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.helpers import snapshot


def journal_state(jdb):
    return [(e.seq, e.command_name, e.args) for e in jdb.journal.entries()]


def zodb_state(jdb):
    conn = jdb.open()
    try:
        return examples.state(conn.root())
    finally:
        conn.close()


def tree(directory):
    """Every directory and file below ``directory``, files with their
    sha256: a refusal must leave it exactly as it was."""
    # Data.fs.tmp is FileStorage's scratch file, emptied whenever the
    # storage opens: not something a refusal of zjournal's could keep.
    found = snapshot(directory, skip=("Data.fs.tmp",))
    for base, dirs, _ in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(base, name), directory)] = None
    return found


def marker_seq(jdb):
    conn = jdb.open()
    try:
        return conn.root()[zjournal.MARKER_KEY].last_seq
    finally:
        conn.close()


@pytest.fixture
def jdb(site):
    jdb = site.open(journal_kw={"fsync": "never"})
    yield jdb
    jdb.close()


class TestExecute:

    def test_returns_the_result_and_journals_the_command(self, jdb):
        assert jdb.execute(Increment("a", 5)) == 5
        assert jdb.execute(Increment("a", 2)) == 7
        assert journal_state(jdb) == [
            (1, "tests.increment", {"name": "a", "by": 5}),
            (2, "tests.increment", {"name": "a", "by": 2})]
        assert jdb.journal.last_seq == 2 == marker_seq(jdb)
        assert zodb_state(jdb)[1] == {"a": 7}

    def test_entry_time_is_what_the_command_saw(self, jdb):
        seq, seen_time, _, _ = jdb.execute(Stamp("k"))
        entry, = jdb.journal.entries(seq, seq + 1)
        assert entry.seq == seq == 1
        assert entry.time == seen_time

    def test_arguments_are_taken_before_execute(self, jdb):
        class Mutating(zjournal.Command):
            command_name = "tests.db.mutating"

            def __init__(self):
                self.n = 1

            def execute(self, root, context):
                self.n = 99

        jdb.execute(Mutating())
        entry, = jdb.journal.entries()
        assert entry.args == {"n": 1}

    def test_a_failing_command_leaves_nothing(self, jdb):
        jdb.execute(Put("before", 1))
        with pytest.raises(RuntimeError):
            jdb.execute(Fail("failed"))
        assert jdb.journal.last_seq == 1 == marker_seq(jdb)
        assert zodb_state(jdb)[0] == {"before": 1}
        assert jdb.execute(Put("after", 2)) == 2
        assert [e.seq for e in jdb.journal.entries()] == [1, 2]

    def test_threads_do_not_see_conflicts(self, jdb):
        errors = []

        def work():
            try:
                for _ in range(25):
                    jdb.execute(Increment("shared"))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert zodb_state(jdb)[1] == {"shared": 100}
        assert [e.seq for e in jdb.journal.entries()] == list(range(1, 101))

    def test_conflicts_are_retried(self, site):
        jdb = site.open(journal_kw={"fsync": "never"},
                        allow_unjournaled=True)
        jdb.execute(Increment("c"))
        attempts = []

        class Contended(zjournal.Command):
            command_name = "tests.db.contended"

            def execute(self, root, context):
                attempts.append(context.seq)
                root["counters"]["c"].value += 10
                if len(attempts) == 1:
                    # Another writer commits the same object meanwhile.
                    tm = transaction.TransactionManager()
                    other = jdb.db.open(tm)
                    other.root()["counters"]["c"].value += 100
                    tm.commit()
                    other.close()

        jdb.execute(Contended())
        assert len(attempts) == 2
        assert zodb_state(jdb)[1] == {"c": 111}
        assert jdb.journal.last_seq == 2
        jdb.close()

    def test_retries_are_bounded(self, site):
        jdb = site.open(journal_kw={"fsync": "never"}, retries=2)

        class AlwaysConflicts(zjournal.Command):
            calls = 0

            def execute(self, root, context):
                type(self).calls += 1
                raise ConflictError("always")

        with pytest.raises(ConflictError):
            jdb.execute(AlwaysConflicts())
        assert AlwaysConflicts.calls == 3
        assert jdb.journal.last_seq == 0
        jdb.close()


class TestTransaction:

    def test_several_commands_one_commit_consecutive_seqs(self, jdb):
        jdb.execute(Put("x", 0))
        with jdb.transaction() as conn:
            zjournal.execute(conn, Increment("a"))
            zjournal.execute(conn, Increment("a"))
            zjournal.execute(conn, Put("y", 1))
            assert jdb.journal.last_seq == 1  # nothing before the commit
        assert [e.seq for e in jdb.journal.entries()] == [1, 2, 3, 4]
        assert marker_seq(jdb) == 4
        assert zodb_state(jdb) == ({"x": 0, "y": 1}, {"a": 2})

    def test_an_exception_aborts_everything(self, jdb):
        with pytest.raises(KeyError):
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("y", 1))
                raise KeyError("boom")
        assert jdb.journal.last_seq == 0
        assert zodb_state(jdb) == ({}, {})

    def test_a_caught_command_failure_dooms_the_transaction(self, jdb):
        with pytest.raises(transaction.interfaces.DoomedTransaction):
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("y", 1))
                with pytest.raises(RuntimeError):
                    zjournal.execute(conn, Fail("half"))
        assert jdb.journal.last_seq == 0
        assert zodb_state(jdb) == ({}, {})

    def test_closing_the_blocks_connection_does_no_harm(self, jdb):
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("a", 1))
        conn.close()  # a habit from plain ZODB code
        assert jdb.execute(Put("b", 2)) == 2
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("c", 3))
        assert zodb_state(jdb) == ({"a": 1, "b": 2, "c": 3}, {})

    def test_savepoint_rollback_forgets_commands(self, jdb):
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("kept", 1))
            sp = conn.transaction_manager.savepoint()
            zjournal.execute(conn, Put("dropped", 2))
            zjournal.execute(conn, Increment("dropped"))
            sp.rollback()
            zjournal.execute(conn, Put("later", 3))
        assert journal_state(jdb) == [
            (1, "tests.put", {"key": "kept", "value": 1}),
            (2, "tests.put", {"key": "later", "value": 3})]
        assert zodb_state(jdb) == ({"kept": 1, "later": 3}, {})
        assert marker_seq(jdb) == 2

    def test_savepoint_taken_before_the_first_command(self, jdb):
        with jdb.transaction() as conn:
            sp = conn.transaction_manager.savepoint()
            zjournal.execute(conn, Put("dropped", 1))
            sp.rollback()
            zjournal.execute(conn, Put("kept", 2))
        assert journal_state(jdb) == [
            (1, "tests.put", {"key": "kept", "value": 2})]
        assert zodb_state(jdb) == ({"kept": 2}, {})


class TestApplicationManagedTransaction:

    def test_commit_is_the_applications(self, jdb):
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        zjournal.execute(conn, Put("b", 2))
        assert jdb.journal.last_seq == 0
        transaction.commit()
        assert jdb.journal.last_seq == 2
        conn.close()
        assert zodb_state(jdb) == ({"a": 1, "b": 2}, {})

    def test_abort_journals_nothing(self, jdb):
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        transaction.abort()
        conn.close()
        assert jdb.journal.last_seq == 0
        assert zodb_state(jdb) == ({}, {})

    def test_plain_connection_is_refused(self, jdb):
        db = ZODB.DB(None)
        conn = db.open()
        with pytest.raises(zjournal.NotJournaledConnectionError):
            zjournal.execute(conn, Put("a", 1))
        conn.close()
        db.close()


class TestUnjournaledChanges:

    def test_a_change_without_command_is_refused(self, jdb, site):
        conn = jdb.open()
        conn.root()["sneaky"] = 1
        with pytest.raises(zjournal.UnjournaledChangeError) as e:
            transaction.commit()
        assert "PersistentMapping" in str(e.value)
        transaction.abort()
        conn.close()
        assert jdb.journal.last_seq == 0
        conn = jdb.open()
        assert "sneaky" not in conn.root()
        conn.close()

    def test_the_refusal_names_every_way_to_allow_such_changes(self, jdb):
        # The advice must fit however the JournaledDB was opened: by the
        # application, by the Pyramid include, by zope.conf.
        conn = jdb.open()
        conn.root()["sneaky"] = 1
        with pytest.raises(zjournal.UnjournaledChangeError) as e:
            transaction.commit()
        transaction.abort()
        conn.close()
        message = str(e.value)
        for way in ("allow_unjournaled=True", "zjournal.allow_unjournaled",
                    "allow-unjournaled on", "zjournal.Command"):
            assert way in message, message

    def test_a_change_beside_a_command_is_refused(self, jdb):
        jdb.execute(Put("a", 1))
        with pytest.raises(zjournal.UnjournaledChangeError):
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("b", 2))
                # The root was not changed by the command: its first
                # change in this transaction happens outside any command.
                conn.root()["elsewhere"] = 3
        assert jdb.journal.last_seq == 1
        assert zodb_state(jdb) == ({"a": 1}, {})

    def test_a_second_change_to_a_commands_object_is_refused(self, jdb):
        # ZODB reports an object only on its first change in a
        # transaction: the table, changed by the command, must be
        # reported again when the block changes it afterwards.
        jdb.execute(Put("a", 1))
        with pytest.raises(zjournal.UnjournaledChangeError):
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("b", 2))
                conn.root()["table"]["sneaky"] = 3
        assert jdb.journal.last_seq == 1
        assert zodb_state(jdb) == ({"a": 1}, {})

    def test_same_in_an_application_managed_transaction(self, jdb):
        tm = transaction.TransactionManager(explicit=True)
        conn = jdb.open(tm)
        try:
            tm.begin()
            zjournal.execute(conn, Put("a", 1))
            zjournal.execute(conn, Put("b", 2))  # a command may, again
            conn.root()["table"]["sneaky"] = 3
            with pytest.raises(zjournal.UnjournaledChangeError):
                tm.commit()
            tm.abort()
            # Commands that change the same objects commit normally.
            tm.begin()
            zjournal.execute(conn, Put("a", 1))
            zjournal.execute(conn, Put("a", 2))
            tm.commit()
        finally:
            conn.close()
        assert journal_state(jdb) == [
            (1, "tests.put", {"key": "a", "value": 1}),
            (2, "tests.put", {"key": "a", "value": 2})]
        assert zodb_state(jdb) == ({"a": 2}, {})

    def test_connections_opened_on_the_raw_db_are_guarded_too(self, jdb):
        tm = transaction.TransactionManager()
        conn = jdb.db.open(tm)
        conn.root()["sneaky"] = 1
        with pytest.raises(zjournal.UnjournaledChangeError):
            tm.commit()
        tm.abort()
        conn.close()

    def test_opt_out(self, site):
        jdb = site.open(journal_kw={"fsync": "never"},
                        allow_unjournaled=True)
        conn = jdb.open()
        conn.root()["cache"] = 1
        transaction.commit()
        conn.close()
        assert jdb.journal.last_seq == 0
        jdb.close()

    def test_rolled_back_unjournaled_change_is_forgotten(self, jdb):
        jdb.execute(Put("a", 1))
        with jdb.transaction() as conn:
            sp = conn.transaction_manager.savepoint()
            conn.root()["table"]["b"] = 2
            sp.rollback()
            zjournal.execute(conn, Put("c", 3))
        assert zodb_state(jdb) == ({"a": 1, "c": 3}, {})


class Big(zjournal.Command):
    """Sets one key of a mapping of many: a small change to a large
    object."""
    command_name = "tests.db.big"

    def __init__(self, key, size=0):
        self.key = key
        self.size = size

    def execute(self, root, context):
        from persistent.mapping import PersistentMapping
        if self.size:
            root["big"] = PersistentMapping(
                ("k%05d" % i, "v" * 20) for i in range(self.size))
        root["big"][self.key] = context.seq


class TestWatchAfterCommand:
    """The savepoint after each zjournal.execute(), its cost, and the
    option that trades the check for that cost."""

    def _block_of_commands(self, jdb, monkeypatch, count):
        """Run ``count`` commands in one transaction() block; return the
        savepoints taken and the size of the connection's temporary
        store at the end of the block."""
        taken = []
        real = transaction._transaction.Transaction.savepoint

        def counted(txn, optimistic=False):
            taken.append(optimistic)
            return real(txn, optimistic)
        monkeypatch.setattr(transaction._transaction.Transaction,
                            "savepoint", counted)
        with jdb.transaction() as conn:
            for i in range(count):
                zjournal.execute(conn, Big("n%d" % i))
            tmp = conn._savepoint_storage
            stored = 0 if tmp is None else tmp.position
        monkeypatch.undo()
        return taken, stored

    @pytest.mark.parametrize("watch", [True, False])
    def test_cost_per_command(self, site, monkeypatch, watch):
        jdb = site.open(journal_kw={"fsync": "never"},
                        watch_after_command=watch)
        try:
            jdb.execute(Big("first", size=2000))
            _, one = self._block_of_commands(jdb, monkeypatch, 1)
            taken, stored = self._block_of_commands(jdb, monkeypatch, 10)
            assert jdb.journal.last_seq == 12
            if watch:
                # One pickling of the whole mapping (2000 entries, more
                # than 10 bytes each) per command.
                assert taken == [True] * 10
                assert one > 2000 * 10
                assert stored >= 10 * one
            else:
                assert (taken, one, stored) == ([], 0, 0)
        finally:
            jdb.close()

    def test_execute_takes_no_savepoint_either_way(self, jdb, monkeypatch):
        taken = []
        real = transaction._transaction.Transaction.savepoint
        monkeypatch.setattr(transaction._transaction.Transaction,
                            "savepoint",
                            lambda txn, optimistic=False: taken.append(1)
                            or real(txn, optimistic))
        assert jdb.watch_after_command
        jdb.execute(Big("a", size=10))
        jdb.execute(Big("b"))
        assert taken == []

    def test_off_a_later_change_to_a_commands_object_goes_unnoticed(
            self, site):
        jdb = site.open(journal_kw={"fsync": "never"},
                        watch_after_command=False)
        try:
            jdb.execute(Put("a", 1))
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("b", 2))
                conn.root()["table"]["unnoticed"] = 3  # the documented loss
            assert journal_state(jdb)[-1] == (
                2, "tests.put", {"key": "b", "value": 2})
            assert zodb_state(jdb)[0] == {"a": 1, "b": 2, "unnoticed": 3}
            # A first change outside a command is still refused.
            with pytest.raises(zjournal.UnjournaledChangeError):
                with jdb.transaction() as conn:
                    zjournal.execute(conn, Put("c", 4))
                    conn.root()["elsewhere"] = 5
            assert jdb.journal.last_seq == 2
        finally:
            jdb.close()

    def test_on_the_same_change_is_refused(self, site):
        jdb = site.open(journal_kw={"fsync": "never"})
        try:
            jdb.execute(Put("a", 1))
            with pytest.raises(zjournal.UnjournaledChangeError):
                with jdb.transaction() as conn:
                    zjournal.execute(conn, Put("b", 2))
                    conn.root()["table"]["unnoticed"] = 3
            assert jdb.journal.last_seq == 1
        finally:
            jdb.close()


class TestDigestInterval:

    def test_a_digest_every_n_journal_entries(self, site):
        # Documented as N journal entries, digests included: N - 1
        # commands between two digests once the schedule runs.
        from zjournal.digest import DIGEST_COMMAND
        jdb = site.open(journal_kw={"fsync": "never"}, digest_interval=5)
        try:
            for i in range(22):
                jdb.execute(Put("k%d" % i, i))
            names = [e.command_name for e in jdb.journal.entries()]
        finally:
            jdb.close()
        digests = [i + 1 for i, n in enumerate(names)
                   if n == DIGEST_COMMAND]
        assert digests and all(seq % 5 == 1 for seq in digests)
        between = [b - a - 1 for a, b in zip(digests, digests[1:])]
        assert between and set(between) == {4}


class TestLifecycle:

    def test_close_releases_the_lock(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        jdb.close()  # idempotent
        jdb = site.open()
        assert jdb.recovery.action == "current"
        assert zodb_state(jdb) == ({"a": 1}, {})
        jdb.close()

    def test_journal_may_be_given_as_a_path(self, site):
        with JournaledDB(site.db(), site.journal_dir) as jdb:
            jdb.execute(Put("a", 1))
            assert isinstance(jdb.journal, zjournal.FileJournal)
        assert os.path.isdir(site.journal_dir)

    def test_a_db_is_wrapped_once(self, site, jdb):
        with pytest.raises(zjournal.RecoveryError):
            JournaledDB(jdb.db, jdb.journal)
        # The refusal did not take the first wrapper's db or journal away.
        assert jdb.execute(Put("a", 1)) == 1

    def test_a_refused_open_releases_the_journal(self, site, tmp_path):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        other = str(tmp_path / "other")
        zjournal.FileJournal(other).close()
        with pytest.raises(zjournal.WrongJournalError):
            JournaledDB(site.db(), zjournal.FileJournal(other))
        zjournal.FileJournal(other).close()  # not locked any more
        site.open().close()  # neither is the Data.fs

    def test_a_refusal_takes_back_the_journal_it_created(self, site,
                                                         tmp_path):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        typo = str(tmp_path / "jornal")
        with pytest.raises(zjournal.WrongJournalError):
            JournaledDB(site.db(), zjournal.FileJournal(typo))
        assert not os.path.exists(typo)

    @pytest.mark.parametrize("typo", [
        "journal2", os.path.join("var", "journal2"),
        os.path.join("var", "lib", "journal2")])
    def test_a_refusal_leaves_the_directory_tree_as_it_was(self, site,
                                                            typo):
        # A mistyped path may create parents too ("var/journal" where the
        # instance has no var/): they are taken back with the journal.
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        before = tree(site.root)
        with pytest.raises(zjournal.WrongJournalError):
            JournaledDB(site.db(), os.path.join(site.root, typo))
        assert tree(site.root) == before

    def test_a_refusal_keeps_a_created_parent_that_is_now_in_use(
            self, site, monkeypatch):
        # Between the open and the refusal something else put a file in
        # the parent the open made: that parent stays, with the file.
        from zjournal import recovery
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        real = recovery.recover

        def meddling(*args, **kw):
            with open(os.path.join(site.root, "var", "other"), "w") as f:
                f.write("x")
            return real(*args, **kw)

        monkeypatch.setattr(recovery, "recover", meddling)
        with pytest.raises(zjournal.WrongJournalError):
            JournaledDB(site.db(), os.path.join(site.root, "var", "j2"))
        assert os.listdir(os.path.join(site.root, "var")) == ["other"]

    def test_closed_db_refuses_work(self, site):
        jdb = site.open()
        jdb.close()
        with pytest.raises(zjournal.RecoveryError):
            jdb.execute(Put("a", 1))

    def test_interfaces(self, jdb):
        from zope.interface.verify import verifyObject
        from zjournal.interfaces import IJournal
        from zjournal.interfaces import IJournaledDB
        assert verifyObject(IJournaledDB, jdb)
        assert verifyObject(IJournal, jdb.journal)


class TestCatchUp:

    def test_a_failed_catch_up_is_tried_again(self, jdb, monkeypatch):
        from zjournal import recovery
        jdb.execute(Increment("n"))
        assert not jdb.needs_catch_up
        real = recovery.recover
        calls = []

        def conflicting(*args, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise ConflictError("another process is catching up")
            return real(*args, **kw)

        monkeypatch.setattr(recovery, "recover", conflicting)
        jdb._needs_catch_up = True  # as a vote that found the journal ahead
        with pytest.raises(ConflictError):
            jdb.catch_up()
        assert jdb.needs_catch_up
        assert jdb.catch_up().action == "current"
        assert not jdb.needs_catch_up
        assert len(calls) == 2

    @pytest.mark.parametrize("how", ["assignment", "method"])
    def test_a_flag_set_during_the_replay_survives_it(self, jdb,
                                                      monkeypatch, how):
        # Another thread's data manager finds the journal ahead while
        # this catch-up replays: its request must not be cleared by it.
        from zjournal import recovery
        real = recovery.recover

        def another_thread_falls_behind():
            if how == "assignment":  # as datamanager.py does today
                jdb._needs_catch_up = True
            else:
                jdb._note_behind()

        def replay_while_another_thread_votes(*args, **kw):
            found = real(*args, **kw)
            other = threading.Thread(target=another_thread_falls_behind)
            other.start()
            other.join()
            return found

        monkeypatch.setattr(recovery, "recover",
                            replay_while_another_thread_votes)
        jdb._needs_catch_up = True
        jdb.catch_up()
        assert jdb.needs_catch_up
        monkeypatch.setattr(recovery, "recover", real)
        jdb.catch_up()
        assert not jdb.needs_catch_up

    def test_the_flag_stays_set_until_the_replay_is_done(self, jdb,
                                                          monkeypatch):
        # Another thread's retry that looks at the flag while the replay
        # runs must wait for it (catch_up), not start from the old state.
        from zjournal import recovery
        real = recovery.recover
        seen = []

        def watched(*args, **kw):
            seen.append(jdb.needs_catch_up)
            return real(*args, **kw)

        monkeypatch.setattr(recovery, "recover", watched)
        jdb._needs_catch_up = True
        jdb.catch_up()
        assert seen == [True]
        assert not jdb.needs_catch_up


def test_one_transaction_journals_into_one_journal(site, tmp_path):
    # Two journals cannot commit atomically: one could vote its records
    # durable while the other's vote fails.
    from zjournal.errors import NotJournaledConnectionError
    from zjournal.tests.conftest import Site
    (tmp_path / "other").mkdir()
    other_site = Site(tmp_path / "other")
    first = site.open(journal_kw={"fsync": "never"})
    second = other_site.open(journal_kw={"fsync": "never"})
    tm = transaction.TransactionManager()
    try:
        conn1, conn2 = first.db.open(tm), second.db.open(tm)
        tm.begin()
        zjournal.execute(conn1, Increment("n"))
        with pytest.raises(NotJournaledConnectionError) as e:
            zjournal.execute(conn2, Increment("m"))
        assert "must go to one journal" in str(e.value)
        tm.abort()
        assert first.journal.last_seq == second.journal.last_seq == 0
        conn1.close()
        conn2.close()
    finally:
        first.close()
        second.close()
