"""A stateful property test: a JournaledDB driven against a plain model.

Hypothesis runs random sequences of the ways an application changes a
JournaledDB (one command, a block of commands, blocks that abort, fail or
roll back a savepoint, transactions the application commits itself), of
failures around the commit point (a resource that fails to vote or to
finish), and of lifecycle events (close and reopen, a lost or outdated
Data.fs, a rebuild into another storage).  A model made of two dicts and a
list of the committed commands says what must be true afterwards; the
invariants compare it with the journal, with a replay of the journal, and
with the live ZODB after every step.

The command-journal discipline the model encodes:

* a transaction's commands are committed exactly when the journal holds
  them: the journal's vote is the decision, even when the ZODB fails to
  finish afterwards;
* a ZODB left behind by such a failure shows the state of the journal's
  prefix its marker names, and the next operation (or the next open)
  catches it up;
* sequence numbers are 1..N without gaps, and a Stamp command sees the
  sequence number and time its journal entry records.

``ZJOURNAL_LONG_TESTS=1`` runs many more and longer examples.
"""
import os
import shutil
import tempfile

import transaction
import transaction.interfaces
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import invariant
from hypothesis.stateful import rule

import zjournal
from zjournal import recovery
from zjournal.datamanager import SORT_KEY
from zjournal.journal import DEFAULT_SEGMENT_SIZE
from zjournal.tests import examples
from zjournal.tests.examples import Fail
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp

LONG = bool(os.environ.get("ZJOURNAL_LONG_TESTS"))

# Few keys and counters, so that commands overwrite each other's work.
keys = st.sampled_from(["a", "b", "c", "d"])
values = st.one_of(st.integers(-5, 5), st.text("xyz", max_size=3))
counter_names = st.sampled_from(["x", "y"])
commands = st.one_of(
    st.builds(Put, keys, values),
    st.builds(Increment, counter_names, st.integers(-3, 5)),
    st.builds(Stamp, keys),
)


def command_lists(min_size=0, max_size=4):
    return st.lists(commands, min_size=min_size, max_size=max_size)


def stamp_value(seq, time):
    """What a Stamp executed as ``seq`` at ``time`` must write and return."""
    rng = zjournal.Context(seq, time, replaying=True).random
    return (seq, time, rng.random(), rng.randrange(1 << 30))


class Model:
    """The committed state: the table, the counters and the command log.

    ``log[i]`` is ``(command, time)`` for sequence number ``i + 1``; the
    time is known (from the command's result) only for Stamp commands.
    """

    def __init__(self):
        self.table = {}
        self.counters = {}
        self.log = []

    def copy(self):
        other = Model()
        other.table = dict(self.table)
        other.counters = dict(self.counters)
        other.log = list(self.log)
        return other

    @property
    def last_seq(self):
        return len(self.log)

    def state(self):
        """The same shape as ``examples.state(root)``."""
        return dict(self.table), dict(self.counters)

    def apply(self, command, time):
        """Apply ``command`` as the next seq; return its expected result."""
        seq = self.last_seq + 1
        if isinstance(command, Put):
            self.table[command.key] = result = command.value
        elif isinstance(command, Increment):
            result = self.counters.get(command.name, 0) + command.by
            self.counters[command.name] = result
        elif isinstance(command, Stamp):
            self.table[command.key] = result = stamp_value(seq, time)
        else:  # pragma: no cover - the strategies make no other kind
            raise AssertionError("unexpected command %r" % (command,))
        self.log.append((command, time))
        return result

    def run(self, command, live_result):
        """Apply a command the live system ran; check what it returned."""
        seq = self.last_seq + 1
        time = None
        if isinstance(command, Stamp):
            assert live_result[0] == seq, (
                "%r ran as seq %r, expected %d" % (command, live_result[0],
                                                   seq))
            time = live_result[1]
        expected = self.apply(command, time)
        assert live_result == expected, (
            "%r (seq %d) returned %r, the model expects %r"
            % (command, seq, live_result, expected))

    def run_all(self, pairs):
        for command, result in pairs:
            self.run(command, result)

    def prefix(self, seq):
        """The model as it was right after command ``seq``."""
        prefix = Model()
        for command, time in self.log[:seq]:
            prefix.apply(command, time)
        return prefix

    def state_at(self, seq):
        """The state right after command ``seq``."""
        return self.prefix(seq).state()


class PeerError(Exception):
    """Raised by a peer resource in the phase it was told to fail in."""


class Peer:
    """Another resource of the transaction, failing in one phase.

    ``key`` decides where it sorts: "!peer" before the ZODB connection
    (a FileStorage's sort key is its absolute path), a key above the
    journal's after everything.
    """

    transaction_manager = None

    def __init__(self, key, fail_in):
        self.key = key
        self.fail_in = fail_in

    def sortKey(self):
        return self.key

    def _phase(self, name):
        if name == self.fail_in:
            raise PeerError("peer %s fails in %s" % (self.key, name))

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        self._phase("tpc_begin")

    def commit(self, txn):
        self._phase("commit")

    def tpc_vote(self, txn):
        self._phase("tpc_vote")

    def tpc_finish(self, txn):
        self._phase("tpc_finish")

    def tpc_abort(self, txn):
        pass


EARLY = "!peer"                 # sorts before ZODB connections
LATE = SORT_KEY + "~peer"       # sorts after the journal


class BlockAborted(Exception):
    """Raised inside a ``jdb.transaction()`` block to abort it."""


class JournaledDBMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="zjournal-sm-")
        self.data_fs = os.path.join(self.dir, "Data.fs")
        self.backup_fs = os.path.join(self.dir, "Data.fs.backup")
        self.journal_dir = os.path.join(self.dir, "journal")
        self.model = Model()
        # The marker the ZODB holds when a ZODB finish failed after the
        # journal's vote (None: the ZODB is current with the journal).
        self.behind = None
        # Small segments make the journal roll every few transactions, so
        # reading, appending and recovery also run across segment files.
        self.segment_size = DEFAULT_SEGMENT_SIZE
        # "batch" sends execute() through group commit (zjournal.groupcommit).
        self.fsync = "never"
        self.jdb = None
        self.jdb = self._open()
        assert self.jdb.recovery.action == "initialized"

    def teardown(self):
        try:
            transaction.abort()
            if self.jdb is not None:
                self.jdb.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------

    def _open(self):
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs))
        journal = zjournal.FileJournal(self.journal_dir, fsync=self.fsync,
                                       segment_size=self.segment_size)
        return zjournal.JournaledDB(db, journal)

    def _close(self):
        jdb, self.jdb = self.jdb, None
        jdb.close()

    def _reopen(self):
        """Open again; check what recovery did against the model."""
        marker = self.behind
        self.jdb = self._open()
        self.behind = None
        found = self.jdb.recovery
        event("reopen: %s" % found.action)
        last = self.model.last_seq
        if marker is None:
            assert (found.action, found.replayed) == ("current", 0), found
        elif marker == last:
            assert found.action == "current", found
        else:
            assert found.action == "caught up", found
            assert found.marker_seq == marker, found
            assert found.replayed == last - marker, found
        assert found.journal_seq == last, found

    def _remove_zodb_files(self):
        for suffix in ("", ".index", ".lock", ".tmp"):
            if os.path.exists(self.data_fs + suffix):
                os.remove(self.data_fs + suffix)

    def _zodb_model(self):
        """A model of what the ZODB holds now (behind or not)."""
        if self.behind is None:
            return self.model.copy()
        return self.model.prefix(self.behind)

    def _operation_done(self):
        # Every operation on the JournaledDB catches a ZODB up first.
        self.behind = None

    # -- rules: ordinary work ------------------------------------------

    @rule(command=commands)
    def execute_one(self, command):
        result = self.jdb.execute(command)
        self._operation_done()
        self.model.run(command, result)

    @rule(key=keys)
    def execute_failing(self, key):
        try:
            self.jdb.execute(Fail(key))
        except RuntimeError:
            pass
        else:  # pragma: no cover - reported as a failure
            raise AssertionError("Fail did not raise")
        self._operation_done()

    @rule(cmds=command_lists(1, 4))
    def transaction_block(self, cmds):
        with self.jdb.transaction() as conn:
            results = [zjournal.execute(conn, c) for c in cmds]
        self._operation_done()
        self.model.run_all(zip(cmds, results))

    @rule(cmds=command_lists(1, 4))
    def transaction_block_raises(self, cmds):
        results = []
        try:
            with self.jdb.transaction() as conn:
                for c in cmds:
                    results.append(zjournal.execute(conn, c))
                raise BlockAborted()
        except BlockAborted:
            pass
        self._operation_done()
        # What the commands returned was right, although nothing remains.
        self.model.copy().run_all(zip(cmds, results))

    @rule(before=command_lists(0, 3), key=keys, after=command_lists(0, 2))
    def transaction_block_doomed(self, before, key, after):
        tentative = self.model.copy()
        try:
            with self.jdb.transaction() as conn:
                tentative.run_all(
                    (c, zjournal.execute(conn, c)) for c in before)
                try:
                    zjournal.execute(conn, Fail(key))
                except RuntimeError:
                    pass
                else:  # pragma: no cover - reported as a failure
                    raise AssertionError("Fail did not raise")
                tentative.run_all(
                    (c, zjournal.execute(conn, c)) for c in after)
        except transaction.interfaces.DoomedTransaction:
            pass
        else:
            raise AssertionError(
                "a block whose command failed was committed")
        self._operation_done()

    @rule(pre=command_lists(0, 2), span=command_lists(1, 3),
          mid=command_lists(0, 2), post=command_lists(0, 2),
          rollbacks=st.integers(0, 2))
    def savepoint_block(self, pre, span, mid, post, rollbacks):
        """pre, savepoint, span, [rollback], mid, [rollback], post.

        With 0 rollbacks everything is kept; with 1 the span is dropped;
        with 2 the same savepoint is rolled back twice, dropping the span
        and mid.
        """
        tentative = self.model.copy()
        with self.jdb.transaction() as conn:
            tentative.run_all((c, zjournal.execute(conn, c)) for c in pre)
            sp = conn.transaction_manager.savepoint()
            at_savepoint = tentative.copy()
            tentative.run_all((c, zjournal.execute(conn, c)) for c in span)
            if rollbacks >= 1:
                sp.rollback()
                tentative = at_savepoint.copy()
            tentative.run_all((c, zjournal.execute(conn, c)) for c in mid)
            if rollbacks >= 2:
                sp.rollback()
                tentative = at_savepoint.copy()
            tentative.run_all((c, zjournal.execute(conn, c)) for c in post)
        self._operation_done()
        self.model = tentative

    @rule(cmds=command_lists(1, 4), commit=st.booleans())
    def app_managed(self, cmds, commit):
        """The application (pyramid_tm, Zope) owns the transaction."""
        results, seen, error = self._app_transaction(cmds, commit=commit)
        assert error is None, error
        if commit:
            self.model.run_all(zip(cmds, results))
        else:
            seen.run_all(zip(cmds, results))

    def _app_transaction(self, cmds, commit=True, peer=None):
        """Run ``cmds`` in the thread's transaction, as an application does.

        Transient errors are retried, as pyramid_retry or Zope's publisher
        would: after a failed ZODB finish the first attempt conflicts on
        the marker.  Returns the last attempt's results, a model of the
        snapshot it saw, and the PeerError that ended it, if any.
        """
        tm = transaction.manager
        conn = self.jdb.open()
        try:
            for attempt in range(3):
                tm.begin()
                # The snapshot is taken now.  If the ZODB is behind, the
                # first command catches it up (in a transaction of its
                # own), but this transaction still sees the state it began
                # with, and conflicts if it tries to commit.
                seen = self._zodb_model()
                results = []
                try:
                    for c in cmds:
                        results.append(zjournal.execute(conn, c))
                    self._operation_done()
                    if peer is not None:
                        self._check_sort_order(conn, peer.key)
                        tm.get().join(peer)
                    if commit:
                        tm.commit()
                    else:
                        tm.abort()
                    return results, seen, None
                except transaction.interfaces.TransientError as e:
                    tm.abort()
                    event("app transaction retried %s" % type(e).__name__)
                    assert attempt < 2, "conflicts after catching up"
                    # What the commands saw was the snapshot, consistently.
                    seen.run_all(zip(cmds, results))
                except PeerError as e:
                    tm.abort()
                    return results, seen, e
                except BaseException:
                    tm.abort()
                    raise
        finally:
            conn.close()

    # -- rules: failures around the commit point -----------------------

    @rule(cmds=command_lists(1, 3),
          where=st.sampled_from(["early-vote", "early-finish",
                                 "late-finish"]),
          app=st.booleans())
    def peer_fails(self, cmds, where, app):
        """Another resource of the transaction fails.

        ``early-vote``: it votes no before the ZODB and the journal vote,
        so nothing is committed.  ``early-finish``: it fails to finish
        after the journal's vote, before the ZODB finishes; the ZODB
        aborts, but the journal's record is the decision, so the commands
        are committed and the ZODB is behind until the next operation.
        ``late-finish``: it fails after the ZODB and the journal finished.

        The application's own commit raises the peer's error in every
        case; a ``jdb.transaction()`` block raises it only for
        ``early-vote``.
        """
        key, phase = {
            "early-vote": (EARLY, "tpc_vote"),
            "early-finish": (EARLY, "tpc_finish"),
            "late-finish": (LATE, "tpc_finish"),
        }[where]
        marker_before = self.model.last_seq
        if app:
            results, seen, error = self._app_transaction(
                cmds, peer=Peer(key, phase))
            assert isinstance(error, PeerError), (
                "the application's commit did not raise the peer's error")
        else:
            # A block reports a failure only when its commands were not
            # committed: after the journal's vote they are, and a caller
            # told otherwise might run them again.
            results = []
            seen = self.model.copy()  # the block catches up before it begins
            try:
                with self.jdb.transaction() as conn:
                    for c in cmds:
                        results.append(zjournal.execute(conn, c))
                    self._check_sort_order(conn, key)
                    conn.transaction_manager.get().join(Peer(key, phase))
            except PeerError:
                assert where == "early-vote", (
                    "the block raised although its commands are journaled")
            else:
                assert where != "early-vote", (
                    "the block succeeded although the peer voted no")
        self._operation_done()
        if where == "early-vote":
            seen.run_all(zip(cmds, results))
        else:
            self.model.run_all(zip(cmds, results))
        if where == "early-finish":
            self.behind = marker_before

    def _check_sort_order(self, conn, key):
        # The scenario is only what it claims if the peer sorts where
        # it is meant to.
        if key == EARLY:
            assert key < conn.sortKey() < SORT_KEY
        else:
            assert conn.sortKey() < SORT_KEY < key

    # -- rules: lifecycle ----------------------------------------------

    @rule(segment_size=st.sampled_from([DEFAULT_SEGMENT_SIZE, 400]),
          fsync=st.sampled_from(["never", "batch"]))
    def close_and_reopen(self, segment_size, fsync):
        self._close()
        self.segment_size = segment_size
        self.fsync = fsync
        self._reopen()
        event("reopened with fsync=%s, segments: %s" % (
            fsync, min(len(self.jdb.journal.segments()), 3)))

    @rule(cmds=command_lists(0, 3))
    def zodb_restored_from_backup(self, cmds):
        """The Data.fs loses its last commits (restored from a backup).

        The journal still has them: opening catches up, as after a crash
        between the journal's vote and the ZODB's finish.
        """
        self._close()
        shutil.copyfile(self.data_fs, self.backup_fs)
        backup_marker = (self.model.last_seq if self.behind is None
                         else self.behind)
        self._reopen()
        for command in cmds:
            self.model.run(command, self.jdb.execute(command))
        self._close()
        self._remove_zodb_files()
        os.rename(self.backup_fs, self.data_fs)
        self.behind = backup_marker
        self._reopen()

    @rule()
    def zodb_deleted(self):
        """Throw the Data.fs away: opening rebuilds it from the journal."""
        self._close()
        self._remove_zodb_files()
        self.behind = None
        self.jdb = self._open()
        found = self.jdb.recovery
        if self.model.last_seq == 0:
            assert found.action == "initialized", found
        else:
            assert found.action == "rebuilt", found
            assert found.replayed == self.model.last_seq, found

    @rule(data=st.data())
    def rebuild_elsewhere(self, data):
        """Rebuild into a MappingStorage, up to the end or to some seq."""
        last = self.model.last_seq
        until = data.draw(st.one_of(st.none(), st.integers(0, last)),
                          label="until_seq")
        expected_seq = last if until is None else until
        db = ZODB.DB(ZODB.MappingStorage.MappingStorage())
        try:
            with zjournal.FileJournal(self.journal_dir,
                                      readonly=True) as journal:
                found = recovery.rebuild(db, journal, until_seq=until)
                identity = journal.identity
            assert found.replayed == expected_seq, found
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            try:
                root = conn.root()
                assert examples.state(root) == self.model.state_at(
                    expected_seq)
                marker = root[zjournal.MARKER_KEY]
                assert marker.last_seq == expected_seq
                assert marker.journal_id == identity
            finally:
                tm.abort()
                conn.close()
        finally:
            db.close()

    # -- invariants ----------------------------------------------------

    @invariant()
    def journal_is_the_model_log(self):
        journal = self.jdb.journal
        entries = list(journal.entries())
        assert journal.last_seq == self.model.last_seq
        assert [e.seq for e in entries] == list(
            range(1, self.model.last_seq + 1))
        for entry, (command, time) in zip(entries, self.model.log):
            assert entry.command_name == command.command_name, entry
            assert entry.args == vars(command), entry
            if time is not None:
                # The time the Stamp saw (and returned) is the entry's.
                assert entry.time == time, entry

    @invariant()
    def journal_replays_to_the_model(self):
        replayed = Model()
        for entry in self.jdb.journal.entries():
            replayed.apply(entry.command, entry.time)
        assert replayed.state() == self.model.state()

    @invariant()
    def live_zodb_matches(self):
        if self.behind is None:
            expected_seq = self.model.last_seq
        else:
            expected_seq = self.behind
        tm = transaction.TransactionManager()
        conn = self.jdb.open(tm)
        try:
            root = conn.root()
            marker = root[zjournal.MARKER_KEY]
            assert marker.last_seq == expected_seq
            assert marker.journal_id == self.jdb.journal.identity
            assert examples.state(root) == self.model.state_at(expected_seq)
            if self.behind is None:
                assert examples.state(root) == self.model.state()
                assert marker.last_seq == self.jdb.journal.last_seq
        finally:
            tm.abort()
            conn.close()


JournaledDBMachine.TestCase.settings = settings(
    max_examples=1000 if LONG else 50,
    stateful_step_count=60 if LONG else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestJournaledDBStateMachine = JournaledDBMachine.TestCase
