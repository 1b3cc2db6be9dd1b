"""The contracts between zjournal's parts, as the Zope world states them.

A journal backend (a directory of files, SQLite or PostgreSQL) provides
:class:`IJournal`; the recovery code and the data manager talk to nothing
else, which is what lets backends be swapped without touching the commit
protocol.
"""
from zope.interface import Attribute
from zope.interface import Interface


class ICommand(Interface):
    """A serializable change to the application's state."""

    command_name = Attribute(
        "Stable name stored in the journal; default '<module>.<qualname>'.")
    command_version = Attribute(
        "Version of the argument layout, for upcasting old entries.")
    command_aliases = Attribute(
        "Former names the class still answers to in the journal.")
    command_retired = Attribute(
        "True (or what replaces it) for a command kept only to replay old"
        " entries: executing it is refused.")

    def execute(root, context):
        """Apply the change to the ZODB root mapping and return a result.

        Must be deterministic given the ZODB state, the command's
        arguments and ``context``: replay executes it again.
        """


class IContext(Interface):
    """Deterministic facts given to a command, identical on replay."""

    seq = Attribute("The command's journal sequence number.")
    time = Attribute("Seconds since the epoch when the command first ran.")
    random = Attribute("A random.Random seeded from the journal entry.")
    replaying = Attribute("True while the journal is being replayed.")


class IEntry(Interface):
    """One command as recorded in a journal."""

    seq = Attribute("Sequence number, 1, 2, 3, ... without gaps.")
    time = Attribute("The context.time the command saw.")
    command_name = Attribute("The registered name of the command.")
    version = Attribute("The command_version it was written with.")
    payload = Attribute("The encoded arguments, as bytes.")
    args = Attribute("The decoded arguments (a dict for ordinary commands).")
    command = Attribute("The command, rebuilt through the registry.")
    prev = Attribute("The chain hash of the record before this one.")
    is_query = Attribute("True for a journaled query, which replay skips.")
    metadata = Attribute("Who and why: a dict (transaction user and"
                         " description, application keys).")


class IJournal(Interface):
    """An append-only, durable sequence of command records."""

    identity = Attribute("Unique identity of the journal (a UUID string).")
    last_seq = Attribute("Sequence number of the last durable record, or 0.")
    readonly = Attribute("True when the journal was opened for reading.")
    head = Attribute("The chain hash of the last record (16 zero bytes for"
                     " an empty journal).")

    def tail():
        """``(last_seq, head)``, read as one consistent pair (a journal
        shared by several processes may grow between two reads)."""

    def prepare(items, prev=None):
        """Encode one transaction's records, chained after ``prev``.

        Returns a batch whose ``head`` is the chain hash the journal will
        end with once it is appended: the data manager stores it in the
        ZODB marker before the ZODB votes.
        """

    def append(items):
        """Durably append the records of one transaction, atomically.

        ``items`` is a batch from :meth:`prepare`, or a sequence of ``(seq,
        time, version, name, payload[, flags, metadata])``; the first seq
        must be ``last_seq + 1``.  When this returns (under the default
        fsync policy), the records survive a crash.
        """

    def entries(start=1, stop=None):
        """Iterate over entries with ``start <= seq < stop``.

        Entries provide :class:`IEntry` and are tuples
        ``(seq, time, flags, version, command_name, payload, offset,
        size, prev, meta, mac)``: replay unpacks them.
        """

    def close():
        """Release files and the writer lock.  Idempotent."""


class IJournaledDB(Interface):
    """A ZODB whose every change is a journaled command."""

    db = Attribute("The wrapped ZODB.DB.")
    journal = Attribute("The IJournal the commands go to.")

    def execute(command):
        """Run one command in its own transaction and return its result."""

    def transaction():
        """Context manager: a connection for several commands, one commit."""

    def open():
        """Return an ordinary ZODB connection (thread's transaction)."""

    digest_interval = Attribute(
        "Journal a state digest after each command whose seq is a multiple"
        " of this (None: never): every this many journal entries, digests"
        " included, so N - 1 commands apart in a journal of commands only"
        " (1 and 2 both mean after every command).  zodb-journal"
        " check-replay compares them on replay.")
    watch_after_command = Attribute(
        "Whether zjournal.execute() takes a savepoint after each command,"
        " so that a later change outside a command to an object the"
        " command changed is refused; it costs a pickling of the objects"
        " changed since the last savepoint, per command.")
    needs_catch_up = Attribute(
        "True when the journal holds commands the ZODB lacks; catch_up()"
        " replays them.")

    def catch_up():
        """Replay journal entries the ZODB lacks; return a Recovery."""

    def close():
        """Close the database and the journal."""
