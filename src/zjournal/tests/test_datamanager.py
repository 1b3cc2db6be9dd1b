import pytest
import transaction
from transaction.interfaces import IDataManager
from transaction.interfaces import ISavepointDataManager
from zope.interface.verify import verifyObject

import zjournal
from zjournal.datamanager import SORT_KEY
from zjournal.datamanager import JournalDataManager
from zjournal.datamanager import finish_failed
from zjournal.datamanager import journaled_seqs
from zjournal.tests import examples
from zjournal.tests.examples import Put
from zjournal.tests.helpers import DiskFull


class Resource:
    """A peer resource that fails in a chosen phase."""

    def __init__(self, key, fail_in=None):
        self.key = key
        self.fail_in = fail_in
        self.transaction_manager = None
        self.calls = []

    def sortKey(self):
        return self.key

    def _phase(self, name):
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError("%s failed in %s" % (self.key, name))

    def abort(self, txn):
        self._phase("abort")

    def tpc_begin(self, txn):
        self._phase("tpc_begin")

    def commit(self, txn):
        self._phase("commit")

    def tpc_vote(self, txn):
        self._phase("tpc_vote")

    def tpc_finish(self, txn):
        self._phase("tpc_finish")

    def tpc_abort(self, txn):
        self._phase("tpc_abort")


def zodb_state(jdb):
    conn = jdb.open()
    try:
        return examples.state(conn.root()), conn.root()[
            zjournal.MARKER_KEY].last_seq
    finally:
        conn.close()


@pytest.fixture
def jdb(site):
    jdb = site.open()
    yield jdb
    jdb.close()


def _dm(jdb):
    tm = transaction.TransactionManager()
    return JournalDataManager(jdb, tm.begin(), tm)


class TestProtocol:

    def test_interfaces(self, jdb):
        dm = _dm(jdb)
        assert verifyObject(IDataManager, dm)
        assert verifyObject(ISavepointDataManager, dm)

    def test_sorts_after_zodb_connections_and_sql_sessions(self, jdb):
        conn = jdb.open()
        keys = sorted([SORT_KEY, conn.sortKey(), "~sqlalchemy:1",
                       "\uffff" + conn.sortKey()])
        assert keys[-1] == SORT_KEY
        conn.close()

    def test_abort_and_tpc_abort_are_legal_in_any_phase(self, jdb):
        for phases in ([], ["tpc_begin"], ["tpc_begin", "commit"],
                       ["tpc_begin", "commit", "tpc_vote"]):
            dm = _dm(jdb)
            dm.pending.append((jdb.journal.last_seq + 1, 0.0, 1, "tests.put",
                               b"\x80\x04}\x94.", 0, None))
            dm.connection = jdb.open(dm.transaction_manager)
            txn = dm._txn
            for phase in phases:
                getattr(dm, phase)(txn)
            dm.abort(txn)
            dm.abort(txn)
            dm.tpc_abort(txn)
            dm.tpc_abort(txn)
            assert dm.pending == []
            dm.transaction_manager.abort()

    def test_nothing_to_journal_writes_nothing(self, jdb):
        dm = _dm(jdb)
        size = [p for p in jdb.journal.segments()]
        dm.tpc_begin(dm._txn)
        dm.commit(dm._txn)
        dm.tpc_vote(dm._txn)
        dm.tpc_finish(dm._txn)
        assert jdb.journal.last_seq == 0
        assert jdb.journal.segments() == size


class TestPeers:

    def test_a_peer_failing_its_vote_first_leaves_nothing(self, jdb):
        peer = Resource("!peer", fail_in="tpc_vote")
        with pytest.raises(RuntimeError):
            with jdb.transaction() as conn:
                conn.transaction_manager.get().join(peer)
                zjournal.execute(conn, Put("a", 1))
        assert jdb.journal.last_seq == 0
        assert zodb_state(jdb) == ((({}, {})), 0)

    def test_a_failing_journal_write_aborts_the_zodb(self, site):
        io = DiskFull()
        jdb = zjournal.JournaledDB(site.db(), site.journal(io=io))
        io.fail = True
        with pytest.raises(zjournal.JournalWriteError):
            jdb.execute(Put("b", 2))
        assert zodb_state(jdb) == (({}, {}), 0)
        io.fail = False
        # Fail-stop: the journal refuses appends until reopened.
        with pytest.raises(zjournal.JournalFailedError):
            jdb.execute(Put("b", 2))
        jdb.close()
        jdb = site.open()
        jdb.execute(Put("c", 3))
        assert zodb_state(jdb) == (({"c": 3}, {}), 1)
        assert [e.args["key"] for e in jdb.journal.entries()] == ["c"]
        jdb.close()

    def test_zodb_finish_failure_after_the_vote_is_caught_up(self, jdb):
        # The peer finishes before the ZODB connection ("!" sorts before a
        # path) and fails: the ZODB aborts although the journal has the
        # record.  The record is the decision.
        # The block does not report a failure: its command is committed,
        # and a caller told otherwise might run it again.
        peer = Resource("!peer", fail_in="tpc_finish")
        with jdb.transaction() as conn:
            conn.transaction_manager.get().join(peer)
            zjournal.execute(conn, Put("a", 1))
        assert "tpc_finish" in peer.calls
        assert jdb.journal.last_seq == 1
        assert zodb_state(jdb) == (({}, {}), 0)
        assert jdb._needs_catch_up
        jdb.execute(Put("b", 2))
        assert zodb_state(jdb) == (({"a": 1, "b": 2}, {}), 2)
        assert [e.seq for e in jdb.journal.entries()] == [1, 2]

    def test_journal_ahead_found_at_vote_is_caught_up(self, jdb):
        # Someone appended behind the ZODB's back (here: directly).
        from zjournal import commands
        name, version, payload = commands.encode(Put("direct", 1))
        jdb.journal.append([(1, 0.0, version, name, payload)])
        conn = jdb.open()
        zjournal.execute(conn, Put("app", 2))
        with pytest.raises(zjournal.JournalSequenceError):
            transaction.commit()
        transaction.abort()
        conn.close()
        assert jdb._needs_catch_up
        jdb.execute(Put("next", 3))
        assert zodb_state(jdb) == (({"direct": 1, "next": 3}, {}), 2)

    def test_application_transactions_catch_up_too(self, jdb):
        peer = Resource("!peer", fail_in="tpc_finish")
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        transaction.get().join(peer)
        with pytest.raises(RuntimeError):
            transaction.commit()
        transaction.abort()
        assert zodb_state(jdb) == (({}, {}), 0)
        # The next application transaction catches up first; its own
        # commit then conflicts on the marker, and its retry succeeds.
        for attempt in transaction.manager.attempts(3):
            with attempt:
                zjournal.execute(conn, Put("b", 2))
        conn.close()
        assert zodb_state(jdb) == (({"a": 1, "b": 2}, {}), 2)


class TestOutcome:
    """journaled_seqs/finish_failed: what integrations ask a transaction
    after its commit, to decide whether a failed request may run again."""

    def test_a_committed_transaction(self, jdb):
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        zjournal.execute(conn, Put("b", 2))
        txn = transaction.get()
        txn.commit()
        conn.close()
        assert journaled_seqs(txn) == (1, 2)
        assert not finish_failed(txn)

    def test_a_failure_after_the_journal_vote(self, jdb):
        peer = Resource("!peer", fail_in="tpc_finish")
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        txn = transaction.get()
        txn.join(peer)
        with pytest.raises(RuntimeError):
            txn.commit()
        transaction.abort()
        conn.close()
        # Asked after the transaction ended (it forgets its own data).
        assert journaled_seqs(txn) == (1, 1)
        assert finish_failed(txn)
        # The next transaction is a new question.
        assert journaled_seqs(transaction.get()) is None
        assert not finish_failed(transaction.get())

    def test_a_failure_before_the_journal_vote(self, jdb):
        peer = Resource("!peer", fail_in="tpc_vote")
        conn = jdb.open()
        zjournal.execute(conn, Put("a", 1))
        txn = transaction.get()
        txn.join(peer)
        with pytest.raises(RuntimeError):
            txn.commit()
        transaction.abort()
        conn.close()
        assert jdb.journal.last_seq == 0
        assert journaled_seqs(txn) is None
        assert not finish_failed(txn)

    def test_a_command_in_a_before_commit_hook_counts(self, jdb):
        peer = Resource("!peer", fail_in="tpc_finish")
        conn = jdb.open()
        txn = transaction.get()
        txn.join(peer)
        conn.root()  # the connection joins nothing until a change
        txn.addBeforeCommitHook(zjournal.execute, (conn, Put("late", 1)))
        with pytest.raises(RuntimeError):
            txn.commit()
        transaction.abort()
        conn.close()
        assert journaled_seqs(txn) == (1, 1)
        assert finish_failed(txn)
