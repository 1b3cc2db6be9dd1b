"""Exceptions raised by zjournal.

Every refusal zjournal makes is one of these classes, so an application or
an operator's script can tell "zjournal said no, and changed nothing" apart
from a bug.  Each message says what was found and what to do about it;
the structured fields (file, offset, seq, ...) are kept on the exception
for programs.
"""
import transaction.interfaces


class ZJournalError(Exception):
    """Base class of every error zjournal raises on purpose."""


# -- journal files -----------------------------------------------------------

class JournalError(ZJournalError):
    """A journal cannot be opened, read or written."""


class JournalLockedError(JournalError):
    """Another writer holds the journal's lock.

    A journal has one writer at a time.  Readers (``zodb-journal info``,
    ``verify``, ``dump``, ``rebuild``) never need the lock.
    """

    def __init__(self, path, holder):
        self.path = path
        self.holder = holder
        super().__init__(
            "journal %s is locked by another writer (%s); stop that process,"
            " or open the journal read-only"
            % (path, holder or "unknown holder"))


class CorruptJournalError(JournalError):
    """The journal holds damaged bytes that are not a torn tail.

    Nothing is truncated when this is raised: the bytes after the damage
    may be acknowledged commands.  ``zodb-journal verify`` reports the
    first damaged place.
    """

    def __init__(self, path, offset, seq, reason):
        self.path = path
        self.offset = offset
        self.seq = seq
        self.reason = reason
        where = "%s at offset %d" % (path, offset)
        if seq is not None:
            where += " (expected seq %d)" % seq
        super().__init__(
            "corrupt journal: %s: %s; the journal was not modified."
            " Restore the damaged segment from a backup: records after the"
            " damage may be acknowledged commands" % (where, reason))


class TamperedJournalError(CorruptJournalError):
    """Records whose checksums hold but whose chain or signature does not.

    Accidental damage does not do this: a record was edited, deleted,
    inserted or reordered and its checksum recomputed, or it was signed
    with another key.
    """


class JournalKeyError(JournalError):
    """The signing key given does not match the journal's signatures."""


class UnsupportedFormatError(JournalError):
    """A segment was written by a newer (or unknown) journal format."""


class JournalFailedError(JournalError):
    """The journal refuses appends after an I/O error (fail-stop).

    Retrying a failed write or fsync and trusting the result is how logs
    lose data (the kernel may have dropped the dirty pages).  Close the
    journal and open it again: opening re-reads what is really on disk.
    """

    def __init__(self, path, cause):
        self.path = path
        self.cause = cause
        super().__init__(
            "journal %s refuses appends after an earlier I/O error (%s);"
            " close it and open it again" % (path, cause))


class JournalWriteError(JournalError):
    """Writing a record failed; the record is not in the journal."""


class OutcomeUnknownError(JournalError):
    """Making a record durable failed: it may or may not be committed.

    The record was written but fsync reported an error, so nobody can say
    whether it survives a crash.  The ZODB transaction was aborted; when
    the journal is reopened, recovery decides by what the journal holds:
    if the record is there, the command is applied then.
    """


class JournalSequenceError(JournalError, transaction.interfaces.TransientError):
    """The journal's last sequence number is not what the ZODB expects.

    This happens when the journal got ahead of the ZODB (a ZODB commit
    failed after the journal had the record); the database catches up and
    the transaction can be retried.
    """


class ReadOnlyJournalError(JournalError):
    """An append was attempted on a journal opened read-only."""


# -- commands ----------------------------------------------------------------


class JournalPrunedError(JournalError):
    """Records were asked for that ``zodb-journal prune`` removed.

    Not damage: an operator removed the segments a stated backup covers.
    A ZODB can only be built from that backup, or a later one, by
    catching up (``zodb-journal restore``); a rebuild from seq 1 is no
    longer possible.
    """

    def __init__(self, path, first_seq, wanted=None, covered_by=None):
        self.path = path
        self.first_seq = first_seq
        self.wanted = wanted
        what = ("seq %d is" % wanted if wanted is not None
                else "seq 1..%d are" % (first_seq - 1))
        by = " (covered by backup %s)" % covered_by if covered_by else ""
        super().__init__(
            "journal %s starts at seq %d: %s no longer in it, removed by"
            " zodb-journal prune%s. A ZODB can only be restored from a"
            " backup whose marker is at seq %d or later (zodb-journal"
            " restore); a rebuild from an empty ZODB is not possible"
            % (path, first_seq, what, by, first_seq - 1))


class PruneError(JournalError):
    """Pruning was refused; nothing was changed."""


class CommandError(ZJournalError):
    """A command class or a journaled command is unusable."""


class NestedCommandError(CommandError):
    """A command tried to run another command, or to commit, by itself.

    A command runs inside a transaction it does not own; everything it
    changes is journaled as that command.  To reuse another command's
    logic, call its ``execute(root, context)`` directly.
    """


class CommandNameConflictError(CommandError):
    """Two different command classes claim one command name."""


class UnknownCommandError(CommandError):
    """A journal entry names a command that no imported module registered.

    This is a gap in the code, not in the journal: import the module that
    defines the command (``--import`` for ``zodb-journal``).
    """

    def __init__(self, command_name, seq=None):
        self.command_name = command_name
        self.seq = seq
        at = " at seq %d" % seq if seq is not None else ""
        super().__init__(
            "unknown command %r%s: import the module that defines it"
            % (command_name, at))


class DecodeError(CommandError):
    """An entry's payload cannot be decoded safely.

    Raised, among others, when the payload refers to a type outside the
    allow-list: journal bytes are never allowed to run arbitrary code.
    """

    def __init__(self, message, seq=None, command_name=None):
        self.seq = seq
        self.command_name = command_name
        if seq is not None:
            message = "seq %d (%s): %s" % (seq, command_name, message)
        super().__init__(message)


class EncodeError(CommandError):
    """A command's arguments cannot be written to the journal."""


# -- the database ------------------------------------------------------------

class RecoveryError(ZJournalError):
    """The ZODB and the journal do not belong together as found."""


class WrongJournalError(RecoveryError):
    """The ZODB's marker names another journal."""


class ZODBAheadError(RecoveryError):
    """The ZODB has applied commands that the journal does not hold."""


class BackupTooNewError(RecoveryError):
    """A restore was asked for a point before the backup's own state.

    Replay only goes forward: the state at an earlier point is reached
    from an older backup (or, if the journal still starts at seq 1, by a
    rebuild).
    """


class NotJournaledError(RecoveryError):
    """The ZODB holds data but no zjournal marker."""


class HistoryMismatchError(RecoveryError):
    """The journal's records are not the ones the ZODB was built from.

    The identity matches, but the chain hash the ZODB marker stores does
    not: the journal was edited, or replaced by another history of the
    same journal (an older backup that diverged, say).
    """


class ForensicZODBError(RecoveryError):
    """The ZODB was built by a rebuild that skipped entries.

    It is for inspection only: it is not the state the journal describes,
    and commands must not be journaled on top of it.
    """


class ReplayError(RecoveryError):
    """Replaying an entry failed: a gap in, or divergence from, the code.

    ``seq`` and ``command_name`` name the entry; the original exception is
    chained as ``__cause__``.  An entry that cannot be decoded is found
    before recovery changes anything.  A command that raises while
    replayed is found by running it: the batches before it stay applied,
    and the ZODB's marker says so, so a rerun with fixed code resumes there.
    """

    def __init__(self, seq, command_name, cause):
        self.seq = seq
        self.command_name = command_name
        super().__init__(
            "replay stopped at seq %d (%s): %s: %s"
            % (seq, command_name, type(cause).__name__, cause))


class UnjournaledChangeError(ZJournalError):
    """A transaction changed persistent objects outside any command.

    Such a change is not in the journal, so a rebuild would silently lose
    it.  Make the change inside a :class:`zjournal.Command`, or allow
    unjournaled changes if that data may be lost on rebuild (caches,
    sessions): ``JournaledDB(..., allow_unjournaled=True)``, the
    ``zjournal.allow_unjournaled`` setting in Pyramid, or
    ``allow-unjournaled on`` in a ``<zjournal>`` section of ``zope.conf``.
    """

    @classmethod
    def for_object(cls, obj):
        """The error for ``obj``, changed outside any command.

        The way out depends on how the JournaledDB was set up, which the
        data manager does not know: the message names each way, and
        Zope's ``addzopeuser``, the usual first encounter in Zope.
        """
        return cls(
            "the transaction changed %s (oid %r) outside any journaled"
            " command; a rebuild from the journal would lose that change."
            " Make it inside a zjournal.Command.  If such changes may be"
            " lost, allow them: JournaledDB(..., allow_unjournaled=True),"
            " 'zjournal.allow_unjournaled = true' in Pyramid's settings,"
            " or 'allow-unjournaled on' in zope.conf's <zjournal> section."
            "  (In Zope, add users with 'python -m zjournal.zope.adduser',"
            " not addzopeuser.)"
            % (type(obj).__name__, getattr(obj, "_p_oid", None)))


class QueryWriteError(CommandError):
    """A query changed a persistent object.

    Queries are journaled for the record and skipped by replay, so a
    change made by one would be lost by a rebuild.  Its transaction is
    doomed.
    """


class NotJournaledConnectionError(ZJournalError):
    """A connection that does not belong to a JournaledDB was used."""

