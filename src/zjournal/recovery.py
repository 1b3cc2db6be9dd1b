"""Recovery: bring a ZODB in line with its journal, or refuse to.

Compare the ZODB marker M with the journal's last sequence number N:

================================  ==========================================
found                             action
================================  ==========================================
empty ZODB, empty journal         write a marker naming the journal
empty ZODB, N > 0                 rebuild: replay 1..N
M < N                             catch up: replay M+1..N
M == N                            nothing (the journal is not read)
M > N                             refuse: the journal lost commands
marker names another journal      refuse
data in the ZODB, no marker       refuse: not built from a journal
================================  ==========================================

Replay commits in batches; each batch advances the marker in the same ZODB
transaction, so a replay that is interrupted (killed, or stopped by a
command that fails) leaves a consistent ZODB that the next recovery
resumes from.
"""
import contextlib
import datetime
import itertools
import logging
import sys
import time

import transaction

from zjournal import commands
from zjournal import faults
from zjournal.errors import CommandError
from zjournal.errors import NotJournaledError
from zjournal.errors import ReplayError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZODBAheadError
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker

logger = logging.getLogger(__name__)


class Recovery:
    """What :func:`recover` found and did."""

    def __init__(self, action, marker_seq, journal_seq, replayed=0,
                 seconds=0.0):
        self.action = action          # "initialized", "rebuilt", ...
        self.marker_seq = marker_seq  # M before recovery (None: no marker)
        self.journal_seq = journal_seq
        self.replayed = replayed
        self.seconds = seconds

    def __repr__(self):
        return "<Recovery %s marker=%s journal=%d replayed=%d>" % (
            self.action, self.marker_seq, self.journal_seq, self.replayed)


class Progress:
    """Reports a long replay: a status line on a terminal, else log lines.

    Called as ``progress(done, total)``; throttled, so calling it after
    every batch costs nothing.
    """

    def __init__(self, label="replay", tty=False, stream=None,
                 interval=None):
        self.label = label
        self.tty = tty
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval if interval is not None else (
            0.2 if tty else 5.0)
        self.began = time.perf_counter()
        self.shown = self.began

    def __call__(self, done, total):
        now = time.perf_counter()
        if now - self.shown < self.interval and done != total:
            return
        self.shown = now
        text = "%s: %s/%s commands (%.0f/s)" % (
            self.label, format(done, ","), format(total or 0, ","),
            done / max(now - self.began, 1e-9))
        if self.tty:
            self.stream.write("\r" + text)
            self.stream.flush()
        else:
            logger.info(text)

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def _system_connection(db):
    """A connection for recovery's own writes, in a private transaction."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.zjournal_in_command = True
    try:
        tm.begin()
        yield tm, conn
    finally:
        tm.abort()
        conn.zjournal_in_command = False
        conn.close()


def recover(db, journal, batch_size=1000, progress=None):
    """Make the ZODB ``db`` reflect every command in ``journal``.

    Returns a :class:`Recovery`.  Refusals raise a
    :class:`~zjournal.errors.RecoveryError` and change nothing.
    """
    began = time.perf_counter()
    last = journal.last_seq
    with _system_connection(db) as (tm, conn):
        root = conn.root()
        marker = root.get(MARKER_KEY)
        if marker is None:
            if len(root):
                raise NotJournaledError(
                    "the ZODB holds data (root keys: %s) but no zjournal"
                    " marker, so it was not built from journal %s; open an"
                    " empty ZODB to rebuild from the journal, or move the"
                    " data in through commands"
                    % (", ".join(sorted(map(str, root))[:5]), journal.path))
            root[MARKER_KEY] = Marker(journal.identity, 0)
            if last == 0:
                tm.commit()
                logger.info("initialized the ZODB for journal %s",
                            journal.path)
                return Recovery("initialized", None, 0)
            action, start = "rebuilt", 1
            found = None
        else:
            found = marker.last_seq
            _check_marker(marker, journal)
            if found == last:
                return Recovery("current", found, last)
            action, start = "caught up", found + 1
        logger.info("%s: replaying seq %d..%d of journal %s into the ZODB",
                    action, start, last, journal.path)
        check_replayable(journal.entries(start, last + 1))
        n = replay(tm, conn, journal.entries(start, last + 1),
                   batch_size=batch_size, progress=progress,
                   total=last - start + 1)
    seconds = time.perf_counter() - began
    logger.info("%s %d commands in %.2fs", action, n, seconds)
    return Recovery(action, found, last, n, seconds)


def rebuild(db, journal, until_seq=None, until_time=None, batch_size=1000,
            progress=None):
    """Replay ``journal`` into the empty ZODB ``db``; return a Recovery.

    ``until_seq`` (inclusive) or ``until_time`` (seconds since the
    epoch, or an aware ``datetime``; inclusive) stop the replay early:
    the result is the state right after that command, with a marker
    saying so.  ``journal`` may be read-only.
    """
    began = time.perf_counter()
    last = journal.last_seq if until_seq is None else min(
        until_seq, journal.last_seq)
    with _system_connection(db) as (tm, conn):
        root = conn.root()
        if len(root):
            raise NotJournaledError(
                "the target ZODB is not empty (root keys: %s); rebuild"
                " into a new, empty storage"
                % ", ".join(sorted(map(str, root))[:5]))
        root[MARKER_KEY] = Marker(journal.identity, 0)
        entries = journal.entries(1, last + 1)
        if isinstance(until_time, datetime.datetime):
            # Compare at the precision a person saw the time with (dump
            # prints microseconds), not the float's last bits.
            entries = itertools.takewhile(
                lambda entry: datetime.datetime.fromtimestamp(
                    entry.time, datetime.timezone.utc) <= until_time,
                entries)
        elif until_time is not None:
            entries = itertools.takewhile(
                lambda entry: entry.time <= until_time, entries)
        n = replay(tm, conn, entries, batch_size=batch_size,
                   progress=progress, total=last)
        if n == 0:
            tm.commit()
    seconds = time.perf_counter() - began
    logger.info("rebuilt %d commands in %.2fs", n, seconds)
    return Recovery("rebuilt", None, journal.last_seq, n, seconds)


def check_replayable(entries):
    """Refuse, before the ZODB is touched, entries this code cannot decode.

    An unknown command name or a version without an upcaster is a gap in
    the code: finding it halfway through a replay would leave the ZODB
    changed by the commands before it.  This reads the entries once,
    looking only at names and versions (payloads were checked to decode
    when they were written), and reads through the journal's framing
    checks, so damage is found before anything changes too.
    """
    known = set()
    for entry in entries:
        key = (entry.command_name, entry.version)
        if key in known:
            continue
        try:
            cls = commands.lookup(entry.command_name, entry.seq)
            default = commands.Command.upcast.__func__
            if (entry.version != cls.command_version
                    and cls.upcast.__func__ is default):
                cls.upcast(entry.version, {})  # raises: no upcaster
        except CommandError as e:
            raise ReplayError(entry.seq, entry.command_name, e) from e
        known.add(key)


def _check_marker(marker, journal):
    if marker.journal_id != journal.identity:
        raise WrongJournalError(
            "the ZODB was built from journal %s, but journal %s is %s;"
            " open the ZODB with its own journal, or rebuild an empty ZODB"
            " from this one" % (marker.journal_id, journal.path,
                                journal.identity))
    torn = getattr(journal, "torn_tail", None)
    if marker.last_seq > journal.last_seq and torn is not None:
        raise ZODBAheadError(
            "the ZODB has applied commands up to seq %d, but journal %s ends"
            " at seq %d followed by %d bytes at %s:%d that do not validate"
            " (%s): those bytes held acknowledged commands and are damaged."
            " Nothing was changed. Salvage the journal (zodb-journal"
            " salvage) or restore it from a backup"
            % (marker.last_seq, journal.path, journal.last_seq, torn.size,
               torn.path, torn.offset, torn.reason))
    if marker.last_seq > journal.last_seq:
        raise ZODBAheadError(
            "the ZODB has applied commands up to seq %d, but journal %s ends"
            " at seq %d: %d acknowledged commands are missing from the"
            " journal (restored from an older backup? written with"
            " fsync='never'?). Restore the journal's missing records, or"
            " rebuild an empty ZODB from the journal, accepting that those"
            " commands are lost"
            % (marker.last_seq, journal.path, journal.last_seq,
               marker.last_seq - journal.last_seq))


def replay(tm, conn, entries, batch_size=1000, progress=None, total=None):
    """Execute journal ``entries`` against ``conn``'s root, in batches.

    The root must hold a marker.  Each batch is one ZODB transaction that
    also advances the marker; the last partial batch is committed too.
    Returns the number of commands replayed.

    ``entries`` are :class:`~zjournal.journal.Entry` tuples.  The loop
    looks each command class up once per name, not once per entry: it
    runs once per command in the journal.
    """
    if progress is None:
        progress = Progress()
    root = conn.root()
    marker = root[MARKER_KEY]
    builders = {}
    Context = commands.Context
    n = 0
    in_batch = 0
    last = marker.last_seq
    try:
        # Entries are (seq, time, flags, version, name, payload, ...)
        # tuples; unpacking them is cheaper than their named fields.
        for seq, t, _, version, name, payload, _, _ in entries:
            if seq != last + 1:
                raise ReplayError(seq, name, ValueError(
                    "expected seq %d: the journal has a gap" % (last + 1)))
            last = seq
            try:
                make = builders.get(name)
                if make is None:
                    make = builders[name] = commands.builder(
                        commands.lookup(name, seq))
                command = make(version, payload, seq)
            except CommandError as e:
                raise ReplayError(seq, name, e) from e
            try:
                command.execute(root, Context(seq, t, True))
            except Exception as e:
                raise ReplayError(seq, name, e) from e
            n += 1
            in_batch += 1
            if in_batch >= batch_size:
                marker.last_seq = last
                tm.commit()
                faults.point("replay.after-commit")
                conn.cacheGC()
                in_batch = 0
                progress(n, total)
        if in_batch:
            marker.last_seq = last
            tm.commit()
            progress(n, total)
    except BaseException:
        tm.abort()
        raise
    return n
