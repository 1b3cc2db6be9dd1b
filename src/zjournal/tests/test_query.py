"""The query log and the metadata journaled with each entry."""
import pytest
import transaction

import zjournal
from zjournal import Command
from zjournal.errors import QueryWriteError
from zjournal.marker import MARKER_KEY
from zjournal.tests.examples import Put
from zjournal.tests.helpers import replayed_state
from zjournal.tests.helpers import zodb_view


class Lookup(Command):
    """Reads one key."""
    command_name = "tests.query.lookup"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        table = root.get("table")
        return None if table is None else table.get(self.key)


class SneakyWrite(Command):
    """A "query" that changes something: refused."""
    command_name = "tests.query.sneaky"

    def __init__(self, swallow=False):
        self.swallow = swallow

    def execute(self, root, context):
        try:
            root["table"]["sneaky"] = 1
        except QueryWriteError:
            if not self.swallow:
                raise
        return "done"


def _entries(jdb):
    return [(e.seq, e.command_name, e.is_query) for e in jdb.journal.entries()]


class TestQueries:

    def test_off_by_default_a_query_runs_and_journals_nothing(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        assert jdb.query(Lookup("a")) == 1
        conn = jdb.open()
        assert zjournal.query(conn, Lookup("a")) == 1
        transaction.commit()
        conn.close()
        assert _entries(jdb) == [(1, "tests.put", False)]
        jdb.close()

    def test_journaled_queries_are_recorded_and_skipped_by_replay(
            self, site):
        jdb = site.open(journal_queries=True)
        jdb.execute(Put("a", 1))
        assert jdb.query(Lookup("a")) == 1
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("b", 2))
            assert zjournal.query(conn, Lookup("b")) == 2
        assert _entries(jdb) == [(1, "tests.put", False),
                                 (2, "tests.query.lookup", True),
                                 (3, "tests.put", False),
                                 (4, "tests.query.lookup", True)]
        # The marker counts them too: the ZODB is current.
        assert zodb_view(jdb)[1] == 4
        state = zodb_view(jdb)[0]
        jdb.close()
        site.remove_zodb()
        jdb = site.open()
        assert jdb.recovery.action == "rebuilt"
        assert jdb.recovery.replayed == 4
        assert zodb_view(jdb)[0] == state
        jdb.close()

    def test_replay_does_not_need_the_query_classes(self, site):
        jdb = site.open(journal_queries=True)
        jdb.execute(Put("a", 1))
        jdb.query(Lookup("a"))
        # An entry whose name no code registers: replay must skip it
        # without looking it up.
        jdb.journal.append([(3, 0.0, 1, "gone.query", b"\x80\x04}\x94.",
                             zjournal.format.FLAG_QUERY, None)])
        journal = jdb.journal
        assert replayed_state(journal) == ({"a": 1}, {})
        jdb.close()

    def test_a_query_that_writes_is_refused(self, site):
        for journal_queries in (False, True):
            jdb = site.open(journal_queries=journal_queries)
            jdb.execute(Put("x", 1))
            last = jdb.journal.last_seq
            with pytest.raises(QueryWriteError):
                jdb.query(SneakyWrite())
            assert "sneaky" not in zodb_view(jdb)[0][0]
            assert jdb.journal.last_seq == last
            jdb.close()

    def test_a_query_swallowing_the_error_cannot_commit(self, site):
        jdb = site.open(allow_unjournaled=True)
        jdb.execute(Put("x", 1))
        conn = jdb.open()
        assert zjournal.query(conn, SneakyWrite(swallow=True)) == "done"
        with pytest.raises(transaction.interfaces.DoomedTransaction):
            transaction.commit()
        transaction.abort()
        assert "sneaky" not in conn.root()["table"]
        conn.close()
        assert "sneaky" not in zodb_view(jdb)[0][0]
        jdb.close()


class TestMetadata:

    def test_transaction_user_and_description_are_journaled(self, site):
        jdb = site.open()
        conn = jdb.open()
        txn = transaction.get()
        txn.user = "alice"
        zjournal.execute(conn, Put("a", 1))
        txn.note("deposit from the web form")  # set after the command
        transaction.commit()
        conn.close()
        (entry,) = jdb.journal.entries()
        assert (entry.user, entry.description) == (
            "alice", "deposit from the web form")
        jdb.close()

    def test_application_metadata_per_command(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1), metadata={"request": "r-17", "ip": "::1"})
        jdb.execute(Put("b", 2))
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("c", 3), metadata={"user": "bob"})
        entries = list(jdb.journal.entries())
        assert entries[0].metadata == {"request": "r-17", "ip": "::1"}
        assert entries[1].metadata == {}
        assert entries[1].meta is None  # nothing stored at all
        assert entries[2].user == "bob"
        jdb.close()
        # Metadata survives a reopen, and a rebuild ignores it.
        site.remove_zodb()
        jdb = site.open()
        assert zodb_view(jdb)[0][0] == {"a": 1, "b": 2, "c": 3}
        assert list(jdb.journal.entries())[0].metadata["request"] == "r-17"
        jdb.close()

    def test_metadata_that_is_not_json_is_refused_before_journaling(
            self, site):
        jdb = site.open()
        with pytest.raises(zjournal.errors.EncodeError):
            jdb.execute(Put("a", 1), metadata={"when": object()})
        assert jdb.journal.last_seq == 0
        assert zodb_view(jdb)[0] == ({}, {})
        jdb.execute(Put("a", 1))
        assert jdb.journal.last_seq == 1
        jdb.close()

    def test_group_commit_keeps_each_commands_metadata(self, site):
        jdb = site.open({"fsync": "batch"})
        jdb.execute(Put("a", 1), metadata={"n": 1})
        jdb.execute(Put("b", 2), metadata={"n": 2})
        assert [e.metadata for e in jdb.journal.entries()] == [
            {"n": 1}, {"n": 2}]
        jdb.close()

    def test_marker_key_is_untouched_by_metadata(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1), metadata={"x": 1})
        conn = jdb.open()
        assert conn.root()[MARKER_KEY].head == jdb.journal.head
        conn.close()
        jdb.close()


class NoSavepoints:
    """A resource without savepoint support, as many mail and queue data
    managers are."""

    def __init__(self):
        self.calls = []

    def abort(self, txn):
        self.calls.append("abort")

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        self.calls.append("commit")

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        self.calls.append("finish")

    def tpc_abort(self, txn):
        self.calls.append("tpc_abort")

    def sortKey(self):
        return "tests.query.nosavepoints"


class Failing(Command):
    """A query that fails after reading."""
    command_name = "tests.query.failing"

    def execute(self, root, context):
        root.get("table")
        raise KeyError("not there")


class TestQueryBesideAResourceWithoutSavepoints:

    def test_the_transaction_still_commits(self, site):
        jdb = site.open(allow_unjournaled=True)
        tm = transaction.TransactionManager(explicit=True)
        conn = jdb.open(tm)
        try:
            jdb.execute(Put("a", 1))
            tm.begin()
            other = NoSavepoints()
            tm.get().join(other)
            conn.root()["cache"] = 1  # allowed, and changed before the query
            assert zjournal.query(conn, Lookup("a")) == 1
            with pytest.raises(KeyError):
                zjournal.query(conn, Failing())
            tm.commit()
            assert other.calls == ["commit", "finish"]
        finally:
            conn.close()
        view = jdb.open()
        try:
            assert view.root()["cache"] == 1
        finally:
            view.close()
            jdb.close()

    def test_a_write_is_still_refused(self, site):
        jdb = site.open()
        tm = transaction.TransactionManager(explicit=True)
        conn = jdb.open(tm)
        try:
            tm.begin()
            tm.get().join(NoSavepoints())
            zjournal.execute(conn, Put("a", 1))
            # The table was changed by the command: the query's change to
            # it is seen all the same.
            with pytest.raises(QueryWriteError):
                zjournal.query(conn, SneakyWrite())
            with pytest.raises(Exception):
                tm.commit()
            tm.abort()
        finally:
            conn.close()
        assert jdb.journal.last_seq == 0
        jdb.close()
