"""The data manager that makes the journal one resource of a transaction.

Two-phase commit, as the ``transaction`` package drives it (the journal is
the *last resource*: its vote is the commit point)::

    tpc_begin   ZODB connections, then the journal: it encodes the records
                and stores the chain hash they end with in the marker
                (every tpc_begin runs before any commit, so the ZODB
                connection stores the marker with it)
    commit      ZODB stores objects; the journal refuses a transaction that
                changed objects outside any command
    tpc_vote    ZODB votes first (conflicts surface here), then the journal
                appends the transaction's records and syncs them: from
                here on the transaction *is* committed
    tpc_finish  ZODB finishes; the journal has nothing left to do

A crash between the journal's vote and the ZODB's finish leaves the ZODB
behind the journal by this transaction; recovery replays it.  A failure
before the journal's vote leaves nothing in the journal.
"""
import logging
import weakref

import transaction.interfaces
from zope.interface import implementer

from zjournal import faults
from zjournal.errors import JournalError
from zjournal.errors import JournalSequenceError
from zjournal.errors import NestedCommandError
from zjournal.errors import UnjournaledChangeError
from zjournal.marker import MARKER_KEY

logger = logging.getLogger(__name__)

# ZODB connections sort by "<storage name>:<id>".  This key sorts after any
# string that does not itself start with the last code point, so the
# journal votes after every ZODB connection (and after zope.sqlalchemy's
# "~sqlalchemy:" sessions, which commit in their own vote).
SORT_KEY = "\U0010ffff zjournal"

# What the journal did in a transaction, kept beside it and not in its
# data (the transaction forgets its data when it ends, and the callers
# that must know ask afterwards); gone with the transaction.
_outcomes = weakref.WeakKeyDictionary()


class _Outcome:
    def __init__(self):
        self.journaled = []          # (first, last) per journal that voted
        self.failed_after = False    # aborted after a journal's vote


def _outcome(txn):
    found = _outcomes.get(txn)
    if found is None:
        found = _outcomes[txn] = _Outcome()
    return found


def journaled_seqs(txn):
    """``(first, last)`` seq of the records ``txn`` made durable, or None.

    Once the journal's vote synced them, ``txn``'s commands are committed,
    whatever happens to the rest of its two-phase commit; an integration
    that retries failed requests asks this (with :func:`finish_failed`)
    before running one again.  (A transaction journals into one journal
    only: :class:`~zjournal.JournaledDB` refuses a second.)  Answers after
    ``txn`` ended.
    """
    found = _outcomes.get(txn)
    if found is None or not found.journaled:
        return None
    return found.journaled[0]


def finish_failed(txn):
    """Whether ``txn`` failed after a journal had voted its records.

    Such a failure must not be retried: the commands are committed in the
    journal, and the ZODB catches up from it.  (An error raised after the
    whole two-phase commit, by a synchronizer's ``afterCompletion``, must
    not be either: there ``finish_failed`` is False but
    :func:`journaled_seqs` answers.)  False for a transaction that
    committed, or that failed before any journal voted.
    """
    found = _outcomes.get(txn)
    return found is not None and found.failed_after


@implementer(transaction.interfaces.IDataManager,
             transaction.interfaces.ISavepointDataManager)
class JournalDataManager:
    """Collects one transaction's commands and journals them at vote.

    One instance per (transaction, JournaledDB).  It joins the transaction
    when a command executes or when a journaled connection changes an
    object, whichever comes first.
    """

    def __init__(self, jdb, txn, transaction_manager):
        self.jdb = jdb
        self.transaction_manager = transaction_manager
        self._txn = txn
        self.connection = None
        # (seq, time, version, name, payload, flags, metadata)
        self.pending = []
        self.batch = None        # the encoded records, once prepared
        self.unjournaled = None  # first object changed outside a command
        self.joined = False
        self.voted = False
        # (first, last) seq once journaled; kept after the transaction
        # ends, for callers that must know whether it committed.
        self.committed = None

    def join(self):
        if not self.joined:
            self._txn.join(self)
            self.joined = True

    def _prepare(self):
        """Encode the records and put their chain head in the marker.

        Called from tpc_begin: after every command (before-commit hooks
        included), before any resource commits, so the marker the ZODB
        stores names the hash of the last record journaled with it.  Who
        and why (the transaction's user and description) are read here,
        as late as they can be.
        """
        txn = self._txn
        common = {}
        if txn.user:
            common["user"] = txn.user
        if txn.description:
            common["description"] = txn.description
        items = []
        for seq, t, version, name, payload, flags, meta in self.pending:
            if meta:
                meta, extra = dict(common), meta
                meta.update(extra)
            items.append((seq, t, version, name, payload, flags,
                          meta or common or None))
        conn = self.connection
        marker = conn.root()[MARKER_KEY]
        journal = self.jdb.journal
        prev = marker.head if marker.head is not None else journal.head
        self.batch = journal.prepare(items, prev)
        conn.zjournal_in_command = True
        try:
            marker.head = self.batch.head
        finally:
            conn.zjournal_in_command = False

    def note_change(self, obj):
        """An object changed outside any command."""
        if self.unjournaled is None:
            self.unjournaled = obj

    # -- IDataManager --------------------------------------------------

    def sortKey(self):
        return SORT_KEY

    def abort(self, txn):
        """Forget everything.  Legal in any phase, and idempotent.

        After a successful vote (the vote itself failed past its sync)
        the records stand, as in :meth:`tpc_abort`.
        """
        if self.voted:
            _outcome(txn).failed_after = True
            self.jdb._note_behind()
        self._reset()

    def tpc_begin(self, txn):
        conn = self.connection
        if conn is not None and conn.zjournal_in_command:
            raise NestedCommandError(
                "a command tried to commit the transaction it runs in; that"
                " would commit half a command")
        self.batch = None
        if self.pending:
            self._prepare()

    def commit(self, txn):
        if self.unjournaled is not None and not self.jdb.allow_unjournaled:
            raise UnjournaledChangeError.for_object(self.unjournaled)

    def tpc_vote(self, txn):
        """The commit point: append and sync the transaction's records."""
        if not self.pending:
            return
        batch = self.batch
        if batch is None or batch.last != self.pending[-1][0]:
            raise JournalError(
                "a command ran during the two-phase commit of its own"
                " transaction; it cannot be journaled")
        faults.point("vote.before-append")
        try:
            self.jdb.journal.append(batch)
        except JournalSequenceError:
            # The journal holds records the ZODB lacks (a ZODB finish
            # failed after a journal vote): catch up, then retry.
            self.jdb._note_behind()
            raise
        self.voted = True
        self.committed = (batch.first, batch.last)
        _outcome(txn).journaled.append(self.committed)
        faults.point("vote.after-sync")

    def tpc_finish(self, txn):
        if self.voted:
            faults.point("finish.after-zodb")
        self._reset()

    def tpc_abort(self, txn):
        """Abort; after a successful vote the journal's record stands.

        The journal sorts last, so ``tpc_abort`` after its vote means a
        ZODB ``tpc_finish`` failed: the record is the decision, and the
        ZODB catches up from the journal on the next command or open.
        """
        if self.voted:
            logger.critical(
                "the ZODB failed to finish a transaction whose commands are"
                " journaled (seq %d..%d); they will be replayed into the"
                " ZODB", self.pending[0][0], self.pending[-1][0])
            self.jdb._note_behind()
            _outcome(txn).failed_after = True
        self._reset()

    # -- ISavepointDataManager -----------------------------------------

    def savepoint(self):
        return JournalSavepoint(self)

    def _reset(self):
        self.pending = []
        self.batch = None
        self.unjournaled = None
        self.voted = False
        self.connection = None
        self.joined = False

    def __repr__(self):
        return "<JournalDataManager %d pending>" % len(self.pending)


@implementer(transaction.interfaces.IDataManagerSavepoint)
class JournalSavepoint:
    """Rolling back forgets the commands executed since the savepoint.

    Their effects on objects are rolled back by the ZODB connection's own
    savepoint, the marker's sequence number included.
    """

    def __init__(self, dm):
        self.dm = dm
        self.pending = len(dm.pending)
        self.unjournaled = dm.unjournaled

    def rollback(self):
        del self.dm.pending[self.pending:]
        self.dm.unjournaled = self.unjournaled
