"""JournaledDB: a ZODB whose every change is a journaled command.

Entry points, from the most managed to the least:

* :meth:`JournaledDB.execute` -- one command, its own transaction,
  conflicts retried;
* :meth:`JournaledDB.transaction` -- several commands, one commit;
* :func:`execute` -- a command inside a transaction somebody else commits
  (``pyramid_tm``, Zope's publisher).

All three run the command the same way: its arguments are encoded before
it runs (so what is journaled is what it was called with), it gets the
next sequence number from the ZODB marker, and the marker is advanced in
the same transaction.
"""
import contextlib
import logging
import random
import threading
import time

import transaction
import transaction.interfaces
from transaction._transaction import NoRollbackSavepoint
import ZODB.Connection
from zope.interface import implementer

from zjournal import commands
from zjournal import digest
from zjournal import recovery
from zjournal.datamanager import JournalDataManager
from zjournal.errors import EncodeError
from zjournal.errors import JournalSequenceError
from zjournal.errors import NestedCommandError
from zjournal.errors import NotJournaledConnectionError
from zjournal.errors import QueryWriteError
from zjournal.errors import RecoveryError
from zjournal.groupcommit import GroupCommitter
from zjournal.interfaces import IJournaledDB
from zjournal.uri import open_journal
from zjournal.format import FLAG_QUERY
from zjournal.format import encode_meta
from zjournal.marker import MARKER_KEY

logger = logging.getLogger(__name__)


class JournaledConnection(ZODB.Connection.Connection):
    """A ZODB connection that reports every changed object to zjournal.

    ZODB calls ``_register`` for each object that becomes dirty (and for
    each object added).  Reporting it lets the journal refuse a
    transaction whose changes did not come from a command.  ZODB reports
    an object only on its first change in a transaction (or since the
    last savepoint): :func:`execute` takes a savepoint after each
    command (unless ``watch_after_command=False``), so that an object a
    command changed is reported again when the application changes it
    afterwards.
    """

    journaled_db = None  # set on the per-database subclass
    # True while a command executes on this connection (live or replayed):
    # its changes are accounted for by the journal.
    zjournal_in_command = False
    # True while a query executes: it may read, never change.
    zjournal_in_query = False

    def _register(self, obj=None):
        super()._register(obj)
        if obj is not None and not self.zjournal_in_command:
            if self.zjournal_in_query:
                # Registered first, so that aborting the transaction
                # undoes the change in the cache too; doomed, so that a
                # query catching the error cannot get the change committed.
                self.transaction_manager.get().doom()
                raise QueryWriteError(
                    "a query changed %s (oid %r); queries are skipped by"
                    " replay, so make changes in a command"
                    % (type(obj).__name__, getattr(obj, "_p_oid", None)))
            self.journaled_db._data_manager(self).note_change(obj)


@implementer(IJournaledDB)
class JournaledDB:
    """Wrap a ``ZODB.DB`` and a journal; recover when opened.

    ``journal`` is an :class:`~zjournal.interfaces.IJournal`, or a
    directory path or journal URI (see :func:`zjournal.open_journal`).
    The JournaledDB owns both: :meth:`close` closes them, and so does a
    failure to open (a refusal by recovery, a bad option), which leaves
    the journal unlocked.

    Options:

    ``allow_unjournaled``
        Accept transactions that change objects outside commands.  Such
        changes are lost by a rebuild; use it only for data that may be
        (sessions, caches).  Default False: they are refused.
    ``retries``
        How many times :meth:`execute` retries a transient error (a
        ``ConflictError``) before raising it.  Default 10.
    ``batch_size``
        Commands per ZODB commit during rebuild and catch-up.
    ``progress``
        A callable ``progress(done, total)`` called during long replays.
    ``batch_window``
        With a journal opened with ``fsync="batch"``, how long (seconds)
        :meth:`execute` may wait for other threads' commands to commit them
        together.  Default 0: groups form from the commands that queue up
        while the previous group commits.
    ``journal_queries``
        Journal the queries run with :func:`query` too, for a record of
        every read.  Each journaled query costs what a command costs (a
        journal record and sync, a ZODB commit of the marker) and
        serializes with commands.  Default False: queries just run.
    ``digest_interval``
        Record a digest of the whole state (:mod:`zjournal.digest`) in
        the journal after each command whose seq is a multiple of N, as
        an entry of its own (``zjournal.state-digest``) in the same
        transaction, so that ``zodb-journal check-replay`` can tell
        after which commands a replay stopped matching the live
        database.  N counts journal entries, digests included: a
        journal of commands only gets a digest after every N - 1
        commands (1 and 2 both mean after every command).  The schedule
        follows from the seq alone, so that every process sharing the
        journal keeps the same one.  Each digest reads every object
        reachable from the root: see :doc:`checkreplay` for what that
        costs.  Default None: no digests.
    ``watch_after_command``
        After each command run with :func:`zjournal.execute` (in a
        transaction the application commits, or in a
        :meth:`transaction` block), take an optimistic savepoint so
        that a later change outside a command to an object the command
        changed is still refused at commit.  That savepoint pickles the
        objects changed since the previous one: N commands that each
        change one large object cost N picklings of it (and as much
        temporary storage).  False skips it: such a later change is then
        committed unnoticed (and lost by a rebuild), while changes to
        objects no command touched are still refused.  :meth:`execute`
        and group commit never take it.  Default True.
    """

    def __init__(self, db, journal, allow_unjournaled=False, retries=10,
                 batch_size=1000, progress=None, batch_window=0.0,
                 journal_queries=False, digest_interval=None,
                 watch_after_command=True):
        if isinstance(journal, str):
            journal = open_journal(journal)
        self.db = db
        self.journal = journal
        self.allow_unjournaled = allow_unjournaled
        self.retries = retries
        self.batch_size = batch_size
        self.progress = progress
        self.journal_queries = journal_queries
        self.digest_interval = digest_interval
        self.watch_after_command = watch_after_command
        # Journaled transactions are serialized at commit anyway (they all
        # write the marker); serializing them here turns would-be
        # conflicts between threads into a short wait.
        self._lock = threading.RLock()
        # needs_catch_up, and how many times it was set: catch_up() clears
        # it only if nobody set it again while it replayed.
        self._flag_lock = threading.Lock()
        self._behind = False
        self._behind_count = 0
        # Transient errors (conflicts, a journal found ahead) retried by
        # execute(), for operators and benchmarks.
        self.retried = 0
        self._exec_tm = None
        self._exec_conn = None
        self._closed = False
        self._group = None
        if getattr(journal, "fsync", None) == "batch":
            self._group = GroupCommitter(self, batch_window)
        owner = getattr(db.klass, "journaled_db", None)
        if owner is not None:
            if journal is not owner.journal:
                getattr(journal, "close_refused", journal.close)()
            raise RecoveryError("%r is already wrapped by a JournaledDB"
                                % (db,))
        try:
            _check_interval(digest_interval)
            self._install_connection_class()
            self.recovery = self._recover()
        except BaseException:
            # The caller handed both over, often without keeping a name for
            # them: a refusal must not leave the journal's lock held.
            self._closed = True
            try:
                db.close()
            finally:
                getattr(journal, "close_refused", journal.close)()
            raise

    def _recover(self):
        """Recover on open; a conflict with another process is retried.

        With a shared journal, another process may be between its journal
        commit and its ZODB finish right now: replaying its command here
        then conflicts once it finishes, and the retry finds the ZODB
        current.
        """
        for attempt in range(self.retries + 1):
            try:
                return recovery.recover(self.db, self.journal,
                                        batch_size=self.batch_size,
                                        progress=self.progress)
            except transaction.interfaces.TransientError as e:
                if attempt == self.retries:
                    raise
                self._pause(attempt, e)

    def _install_connection_class(self):
        self.db.klass = type("JournaledConnection", (JournaledConnection,),
                             {"journaled_db": self})
        # Connections pooled before now (DB() opens one to create the root)
        # are of the plain class; drop them so that every connection
        # handed out from now on reports its changes.  Shrinking the pool
        # to nothing releases what each held (a storage view; with
        # RelStorage, a database session): clearing it would leak them.
        size = self.db.getPoolSize()
        self.db.setPoolSize(0)
        self.db.setPoolSize(size)

    # -- running commands ----------------------------------------------

    def execute(self, command, metadata=None):
        """Run ``command`` in its own transaction; return its result.

        Transient errors (conflicts with other processes) are retried up to
        ``retries`` times with a growing, jittered pause.  Under
        ``fsync="batch"``, concurrent calls share one commit
        (:mod:`zjournal.groupcommit`).  ``metadata``, a dict of JSON
        values, is journaled with the command (see :func:`execute`).
        """
        _refuse_nesting("JournaledDB.execute()")
        if self._group is not None:
            self._check_open()
            return self._group.execute(command, metadata)
        return self._alone(command, metadata, False)

    def query(self, query, metadata=None):
        """Run a read-only command in its own transaction.

        Journaled (and committed) only with ``journal_queries=True``; see
        :func:`query`.
        """
        _refuse_nesting("JournaledDB.query()")
        return self._alone(query, metadata, True)

    def _alone(self, command, metadata, is_query):
        with self._lock:
            for attempt in range(self.retries + 1):
                if not self._caught_up(attempt):
                    continue
                tm, conn = self._executor()
                tm.begin()
                try:
                    result = self._run(conn, command, metadata, is_query)
                    if is_query and not self.journal_queries:
                        tm.abort()
                    else:
                        self._commit(tm)
                    return result
                except transaction.interfaces.TransientError as e:
                    tm.abort()
                    if attempt == self.retries:
                        raise
                    self._pause(attempt, e)
                except BaseException:
                    tm.abort()
                    raise

    def _caught_up(self, attempt):
        """Catch up if a previous attempt found the journal ahead.

        Another process may be catching up or committing at the same
        time: a conflict here is retried like any other (False: pause
        and try again).
        """
        if not self._needs_catch_up:
            return True
        try:
            self.catch_up()
        except transaction.interfaces.TransientError as e:
            self._note_behind()
            if attempt == self.retries:
                raise
            self._pause(attempt, e)
            return False
        return True

    def _pause(self, attempt, error):
        """Back off before retrying after a transient error."""
        self.retried += 1
        if isinstance(error, JournalSequenceError):
            self._note_behind()
        logger.debug("retrying after %s", error)
        time.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 8)))

    def _commit(self, tm):
        """Commit; a ZODB failure after the journal's vote is no failure.

        Once the journal holds a transaction's records the commands are
        committed (the journal is the decision): if the ZODB then fails
        to finish, telling the caller "failed" would invite a retry that
        applies the command twice.  The ZODB catches up instead.
        """
        txn = tm.get()
        try:
            dm = txn.data(self)
        except KeyError:
            dm = None
        try:
            tm.commit()
        except BaseException as e:
            tm.abort()
            if dm is None or dm.committed is None:
                raise
            self._note_behind()
            logger.error(
                "seq %d..%d are committed in the journal, but the ZODB failed"
                " to finish (%s: %s); it catches up from the journal before"
                " the next command", dm.committed[0], dm.committed[1],
                type(e).__name__, e)

    def _executor(self):
        # One connection serves execute() and transaction(): both are
        # serialized, and a connection kept open keeps its cache warm.
        if self._exec_conn is None or self._exec_conn.opened is None:
            # (None, or closed by a caller of transaction() who thought
            # the connection was theirs to close.)
            self._check_open()
            self._exec_tm = transaction.TransactionManager()
            self._exec_conn = self.db.open(self._exec_tm)
        return self._exec_tm, self._exec_conn

    @contextlib.contextmanager
    def transaction(self):
        """Yield a connection; commit its commands when the block ends.

        The block runs in its own transaction (not the thread's); an
        exception aborts it.  Conflicts are not retried: the block cannot
        be rerun by zjournal.  Inside the block, run commands with
        :func:`zjournal.execute` on the connection, not with
        :meth:`execute` (which would need a transaction of its own).
        """
        _refuse_nesting("JournaledDB.transaction()")
        with self._lock:
            self._check_open()
            if self._needs_catch_up:
                self.catch_up()
            tm, conn = self._executor()
            tm.begin()
            _state.block = True
            try:
                yield conn
                self._commit(tm)
            except BaseException:
                tm.abort()
                raise
            finally:
                _state.block = False

    def open(self, *args, **kw):
        """An ordinary ZODB connection; changes go through :func:`execute`."""
        self._check_open()
        return self.db.open(*args, **kw)

    def _note_behind(self):
        """Record that the journal holds commands the ZODB lacks.

        Called from any thread (a data manager's vote or abort), without
        the JournaledDB's lock: the count lets a catch-up that is
        running meanwhile tell that its replay may have come too early.
        """
        with self._flag_lock:
            self._behind = True
            self._behind_count += 1

    @property
    def _needs_catch_up(self):
        return self._behind

    @_needs_catch_up.setter
    def _needs_catch_up(self, value):
        # Kept for code that assigns the flag (True: _note_behind).
        if value:
            self._note_behind()
        else:
            with self._flag_lock:
                self._behind = False

    @property
    def needs_catch_up(self):
        """True when the journal holds commands the ZODB lacks.

        A commit found the journal ahead (another process journaled and
        had not yet finished its ZODB commit), or a ZODB commit failed
        after the journal's vote.  :meth:`catch_up` clears it; an
        integration that owns the transaction (``zjournal.pyramid``)
        calls it before the retried work begins.
        """
        return self._needs_catch_up

    def catch_up(self):
        """Replay journal entries the ZODB lacks (normally none).

        The flag stays set until the replay succeeded: a thread that
        checks it meanwhile (a retried request passing the Pyramid
        tween) then waits here for the lock instead of starting from the
        stale snapshot the replay is about to replace.
        """
        with self._lock:
            with self._flag_lock:
                seen = self._behind_count
            try:
                found = recovery.recover(self.db, self.journal,
                                         batch_size=self.batch_size,
                                         progress=self.progress)
            except BaseException:
                # Still behind (a conflict with another process catching
                # up, an interrupted replay): the next attempt must
                # catch up again.
                self._note_behind()
                raise
            with self._flag_lock:
                # Set again while the replay ran (another thread's vote
                # found the journal further ahead): that request stands.
                if self._behind_count == seen:
                    self._behind = False
            return found

    def close(self):
        """Close the ZODB and the journal (releasing its lock).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._exec_conn is not None:
                    self._exec_tm.abort()
                    self._exec_conn.close()
                    self._exec_conn = None
                self.db.close()
            finally:
                self.journal.close()

    def _check_open(self):
        if self._closed:
            raise RecoveryError("this JournaledDB is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the per-transaction data manager ------------------------------

    def _data_manager(self, conn):
        txn = conn.transaction_manager.get()
        try:
            dm = txn.data(self)
        except KeyError:
            try:
                first = txn.data(JournalDataManager)
            except KeyError:
                txn.set_data(JournalDataManager, self)
            else:
                # Two journals cannot commit atomically: one could vote
                # its records durable while the other's vote fails, and
                # the transaction would be neither committed nor not.
                raise NotJournaledConnectionError(
                    "this transaction already journals into %s; the"
                    " commands of one transaction must go to one journal,"
                    " not also to %s" % (first.journal.path,
                                         self.journal.path))
            dm = JournalDataManager(self, txn, conn.transaction_manager)
            txn.set_data(self, dm)
        dm.join()
        return dm

    def _run(self, conn, command, metadata=None, is_query=False,
             shared=False):
        """Run one command (or query) in ``conn``'s transaction.

        ``shared``: the transaction is the application's, which may go on
        changing objects after the command; see :meth:`_watch_again`.
        """
        running = getattr(_state, "command", None)
        if running is not None:
            raise NestedCommandError(
                "%s tried to run %s as a command of its own while executing;"
                " call its execute(root, context) directly instead, so that"
                " it is journaled as part of %s"
                % (running.command_name, command.command_name,
                   running.command_name))
        if not conn.opened:
            raise NotJournaledConnectionError(
                "%r is closed; use JournaledDB.open() for a connection whose"
                " transaction the application commits" % (conn,))
        if self._needs_catch_up:
            # A ZODB commit failed after its journal vote.  Catching up
            # commits the marker, so this transaction's stale marker will
            # conflict and the application's retry sees the caught-up state.
            self.catch_up()
        if metadata is not None:
            _check_metadata(command, metadata)
        if is_query:
            return self._run_query(conn, command, metadata)
        name, version, payload = commands.encode(command)
        dm = self._joined_data_manager(conn)
        root = conn.root()
        marker = root[MARKER_KEY]
        seq = marker.last_seq + 1
        now = time.time()
        context = commands.Context(seq, now)
        _state.command = command
        conn.zjournal_in_command = True
        try:
            result = command.execute(root, context)
            marker.last_seq = seq
        except BaseException:
            # Half a command must never be committed: the transaction can
            # only be aborted now.  (One whose commit already failed cannot
            # be doomed, nor committed.)
            try:
                conn.transaction_manager.get().doom()
            except ValueError:
                pass  # its commit failed: it can only be aborted anyway
            raise
        finally:
            conn.zjournal_in_command = False
            _state.command = None
        dm.pending.append((seq, now, version, name, payload, 0, metadata))
        if self.digest_interval and seq % self.digest_interval == 0:
            self._record_digest(conn, dm, marker, seq)
        if shared and self.watch_after_command:
            self._watch_again(conn)
        return result

    def _watch_again(self, conn):
        """Make the connection report the command's objects again.

        ZODB tells the connection about an object only on its first
        change in a transaction (or since the last savepoint).  Without
        this, a change the application makes after the command to an
        object the command changed would go unreported, be committed and
        be lost by a rebuild.  An optimistic savepoint empties the
        connection's list of changed objects (moving their state to its
        temporary store), so the next change to any of them is reported
        and checked like a first one.

        The savepoint pickles every object changed since the previous
        one, whatever its size: a command that changes one entry of a
        large mapping pickles the whole mapping again, and N such
        commands in one transaction cost N picklings and N copies in the
        connection's temporary store.  ``watch_after_command=False``
        trades the check for that cost.
        """
        if not getattr(conn, "_registered_objects", None):
            return
        try:
            conn.transaction_manager.get().savepoint(optimistic=True)
        except transaction.interfaces.TransactionFailedError:
            pass  # it can only be aborted: nothing more will be committed

    def _record_digest(self, conn, dm, marker, seq):
        """Journal the digest of the state after ``seq``, as seq + 1.

        Computed here, before anything else runs in the transaction, so
        that it describes exactly the state after ``seq`` even when the
        transaction goes on with more commands; and inside the
        transaction that ends at ``seq``, so that with several processes
        it is still the state the journal order produced (a conflict
        retries the transaction, digest included).  A digest that cannot
        be made is logged and skipped: it never fails the command.  It is
        journaled as a query: it changes nothing, so replay (even by code
        that predates digests) passes over it.
        """
        record = digest.journal_entry(conn.root(), seq)
        if record is None:
            return
        conn.zjournal_in_command = True
        try:
            marker.last_seq = seq + 1
        finally:
            conn.zjournal_in_command = False
        dm.pending.append(record)

    def _joined_data_manager(self, conn):
        dm = self._data_manager(conn)
        if dm.connection is None:
            dm.connection = conn
        elif dm.connection is not conn:
            raise NotJournaledConnectionError(
                "commands of one transaction must run on one connection")
        return dm

    def _run_query(self, conn, query, metadata):
        """Run a query: it reads, it never changes anything.

        A write is caught as it happens (QueryWriteError, the
        transaction doomed).  An object a command already changed in this
        transaction would not tell the connection about a second change;
        a savepoint taken before the query makes it tell again.  It is an
        optimistic one, so that a resource without savepoint support
        joined to the transaction (a mail queue, say) does not fail it:
        the check on first changes does not need a rollback.  A query
        that raises is rolled back to it, when every resource can roll
        back, so that it leaves the transaction as it was.
        """
        journaled = self.journal_queries
        if journaled:
            name, version, payload = commands.encode(query)
            dm = self._joined_data_manager(conn)
        root = conn.root()
        marker = root[MARKER_KEY]
        seq = marker.last_seq + 1 if journaled else marker.last_seq
        now = time.time()
        savepoint = None
        if getattr(conn, "_registered_objects", True):
            try:
                savepoint = conn.transaction_manager.get().savepoint(
                    optimistic=True)
            except transaction.interfaces.TransactionFailedError:
                pass  # it can only be aborted: nothing will be committed
        conn.zjournal_in_query = True
        _state.command = query
        try:
            result = query.execute(root, commands.Context(seq, now))
        except BaseException:
            if savepoint is not None and _can_roll_back(savepoint):
                savepoint.rollback()
            raise
        finally:
            conn.zjournal_in_query = False
            _state.command = None
        if journaled:
            conn.zjournal_in_command = True
            try:
                marker.last_seq = seq
            finally:
                conn.zjournal_in_command = False
            dm.pending.append((seq, now, version, name, payload, FLAG_QUERY,
                               metadata))
        return result


def _can_roll_back(savepoint):
    """Whether rolling ``savepoint`` back would work: rolling back a
    resource that has no savepoints fails the whole transaction."""
    return not any(isinstance(part, NoRollbackSavepoint)
                   for part in getattr(savepoint, "_savepoints", ()))


def _check_interval(digest_interval):
    if digest_interval is not None and (
            isinstance(digest_interval, bool)
            or not isinstance(digest_interval, int) or digest_interval < 1):
        raise ValueError("digest_interval must be a positive number of"
                         " journal entries or None, not %r"
                         % (digest_interval,))


def _check_metadata(command, metadata):
    """Refuse metadata the journal could not store, before the command
    runs: under group commit, a failure at commit time would fail every
    command of the group."""
    if not isinstance(metadata, dict):
        raise EncodeError("%s: metadata must be a dict, not %r"
                          % (command.command_name, metadata))
    try:
        encode_meta(metadata)
    except ValueError as e:
        raise EncodeError("%s: %s" % (command.command_name, e)) from e


# Per thread: the command executing now, and whether a transaction()
# block is open, so that nested use fails clearly instead of deadlocking
# or committing half a command.
_state = threading.local()


def _refuse_nesting(what):
    running = getattr(_state, "command", None)
    if running is not None:
        raise NestedCommandError(
            "%s called while %s executes: a command may not start or commit"
            " a transaction; call the other command's execute(root, context)"
            " directly" % (what, running.command_name))
    if getattr(_state, "block", False):
        raise NestedCommandError(
            "%s called inside a JournaledDB.transaction() block; use"
            " zjournal.execute(conn, command) there" % what)


def execute(conn, command, metadata=None):
    """Execute ``command`` in ``conn``'s current transaction.

    The command is journaled when that transaction commits, atomically with
    its effects, and is forgotten if the transaction aborts (or if a
    savepoint from before it is rolled back).  If the command raises, the
    transaction is doomed: it can be aborted, never committed.

    After the command, the transaction takes an optimistic savepoint, so
    that a change the caller then makes outside a command, even to an
    object the command changed, is refused at commit
    (:class:`~zjournal.errors.UnjournaledChangeError`).  That savepoint
    stores the objects changed so far in the connection's temporary
    store, which has consequences:

    * it costs a pickling of every object changed since the previous
      savepoint, however large (see ``watch_after_command`` of
      :class:`JournaledDB`, which turns it off);
    * what the savepoint raises comes out of this function after the
      command ran, and fails the transaction: a ``ConflictError`` (a
      read conflict while storing), an object that cannot be pickled,
      or ``ValueError: Can't commit with opened blobs`` when the command
      leaves a blob open (returns an open blob file, say).  A command
      whose result stays open until after it returns (and is closed
      before the commit) needs a JournaledDB with
      ``watch_after_command=False``.

    ``metadata`` (a dict of JSON values: who, why, a request id) is
    journaled with the command, beside the transaction's ``user`` and
    ``description``, which are recorded for every command; its keys win
    over those two.
    """
    return _journaled_db(conn)._run(conn, command, metadata, shared=True)


def query(conn, query, metadata=None):
    """Run ``query``, a command that only reads, on ``conn``; return its
    result.

    With ``JournaledDB(journal_queries=True)`` the query is journaled when
    the transaction commits, for the record (replay skips it); otherwise
    it just runs.  Either way a query that changes an object raises
    :class:`~zjournal.errors.QueryWriteError` and dooms the transaction.
    """
    return _journaled_db(conn)._run(conn, query, metadata, True)


def _journaled_db(conn):
    jdb = getattr(conn, "journaled_db", None)
    if jdb is None:
        raise NotJournaledConnectionError(
            "%r does not belong to a JournaledDB; open it with"
            " JournaledDB.open()" % (conn,))
    return jdb
