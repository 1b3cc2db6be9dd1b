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

:func:`catch_up` is the same catch-up, stopped at a seq or a time, for a
ZODB copied from a backup (``zodb-journal restore``): the backup's marker
says where the journal resumes, so it need not start at seq 1.

Replay commits in batches; each batch advances the marker in the same ZODB
transaction, so a replay that is interrupted (killed, or stopped by a
command that fails) leaves a consistent ZODB that the next recovery
resumes from.
"""
import contextlib
import datetime
import logging
import sys
import time
from time import perf_counter

import transaction

from zjournal import commands
from zjournal import faults
from zjournal.errors import CommandError
from zjournal.errors import BackupTooNewError
from zjournal.errors import ForensicZODBError
from zjournal.errors import HistoryMismatchError
from zjournal.errors import JournalPrunedError
from zjournal.errors import NotJournaledError
from zjournal.errors import ReplayError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZODBAheadError
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker

logger = logging.getLogger(__name__)


class Recovery:
    """What :func:`recover` found and did."""

    def __init__(self, action, marker_seq, journal_seq, replayed=0,
                 seconds=0.0, skipped=()):
        self.action = action          # "initialized", "rebuilt", ...
        self.marker_seq = marker_seq  # M before recovery (None: no marker)
        self.journal_seq = journal_seq
        self.replayed = replayed      # entries applied or passed over
        self.seconds = seconds
        # (seq, command name, reason) of entries a forensic rebuild
        # skipped because this code cannot decode them.
        self.skipped = list(skipped)
        # (first, last) of the journal transaction an --until seq cut
        # through: the result holds a state no one ever committed.
        self.partial_transaction = None
        # What an operator must hear although the replay succeeded (a cut
        # transaction, an --until past the journal's end): the CLI prints
        # these on stderr; they were logged as warnings too.
        self.warnings = []

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
    with _system_connection(db) as (tm, conn):
        root = conn.root()
        marker = root.get(MARKER_KEY)
        # Read after the marker: a journal shared with other processes
        # only grows, so it is then at least where the marker says.
        last = _tail(journal)[0]
        if marker is None:
            if len(root):
                raise NotJournaledError(
                    "the ZODB holds data (root keys: %s) but no zjournal"
                    " marker, so it was not built from journal %s; open an"
                    " empty ZODB to rebuild from the journal, or move the"
                    " data in through commands"
                    % (", ".join(sorted(map(str, root))[:5]), journal.path))
            _check_from_scratch(journal)
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
        check_replayable(journal.entries(start, last + 1),
                         marker.head if found else None)
        n = replay(tm, conn, journal.entries(start, last + 1),
                   batch_size=batch_size, progress=progress,
                   total=last - start + 1)
    seconds = time.perf_counter() - began
    logger.info("%s %d commands in %.2fs", action, n, seconds)
    return Recovery(action, found, last, n, seconds)


def rebuild(db, journal, until_seq=None, until_time=None, batch_size=1000,
            progress=None, skip_unknown=False, observe=None):
    """Replay ``journal`` into the empty ZODB ``db``; return a Recovery.

    ``until_seq`` (inclusive) or ``until_time`` (seconds since the
    epoch, or an aware ``datetime``; inclusive) stop the replay early,
    with a marker saying where.  A seq is exact, since recovery to any
    single command is the point: a seq inside a journal transaction gives
    a state the live system never committed, which the result's
    ``partial_transaction`` and ``warnings`` say (and the log).  A time
    is transaction-granular: the state as of that time holds the
    transactions whose last command ran at or before it, and nothing of
    the one in progress then.  ``journal`` may be read-only.

    ``skip_unknown`` is for forensics: entries this code cannot decode
    (an unknown name or version, hostile or damaged arguments) are passed
    over instead of stopping the rebuild, and listed in the result's
    ``skipped``.  The result is not the state the journal describes.

    ``observe`` is passed on to :func:`replay`.
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
        _check_from_scratch(journal)
        notes = _until_seq_notes(journal, until_seq)
        root[MARKER_KEY] = Marker(journal.identity, 0)
        entries = _until(journal.entries(1, last + 1), until_time)
        skipped = [] if skip_unknown else None
        n = replay(tm, conn, entries, batch_size=batch_size,
                   progress=progress, total=last, skipped=skipped,
                   observe=observe)
        if n == 0:
            tm.commit()
    seconds = time.perf_counter() - began
    logger.info("rebuilt %d commands in %.2fs", n, seconds)
    if skipped:
        logger.warning("rebuild skipped %d entries it could not decode",
                       len(skipped))
    result = Recovery("rebuilt", None, journal.last_seq, n, seconds,
                      skipped or ())
    _attach_notes(result, notes)
    return result


def _check_from_scratch(journal):
    """Refuse to build from seq 1 a journal whose start was pruned."""
    start = getattr(journal, "start_seq", 1)
    if start > 1:
        raise JournalPrunedError(journal.path, start, covered_by=getattr(
            journal, "prune_state", {}).get("covered_by"))


def _until(entries, until_time):
    """``entries`` of the transactions committed by ``until_time``
    (seconds since the epoch, or an aware datetime compared at the
    precision dump shows, microseconds).

    A transaction counts when its last record (the one with FLAG_END) ran
    at or before that time: a command of a transaction still in progress
    then was not yet part of any state someone could see, and stopping
    after it would give one the live system never had.
    """
    if until_time is None:
        return entries
    return _committed_by(entries, until_time)


def _committed_by(entries, until_time):
    pending = []
    for entry in entries:
        pending.append(entry)
        if entry[2] & FLAG_END:
            if _after(entry[1], until_time):
                return
            yield from pending
            pending = []


def _transaction_of(journal, seq):
    """``(first, last)``: the seqs of the journal transaction holding
    ``seq``, as far as the journal still holds it.

    Read backwards in growing windows for the previous FLAG_END, since
    entries are read forwards only; transactions are short, so this reads
    a few records.
    """
    last = None
    for entry in journal.entries(seq):
        if entry[2] & FLAG_END:
            last = entry[0]
            break
    floor = max(getattr(journal, "start_seq", 1), 1)
    high, window = seq, 16
    while high > floor:
        low = max(floor, high - window)
        try:
            ends = [e[0] for e in journal.entries(low, high)
                    if e[2] & FLAG_END]
        except JournalPrunedError:
            return high, last
        if ends:
            return ends[-1] + 1, last
        high, window = low, window * 2
    return floor, last


def _until_seq_notes(journal, until_seq):
    """Warnings about an ``--until`` seq that is no committed state:
    ``[(message, partial_transaction)]``."""
    if until_seq is None:
        return []
    end = journal.last_seq
    if until_seq > end:
        return [("the journal ends at seq %d, before the requested seq %d:"
                 " the result is the state at seq %d. Is this a stale copy"
                 " of the journal?" % (end, until_seq, end), None)]
    try:
        entry = next(iter(journal.entries(until_seq, until_seq + 1)), None)
    except JournalPrunedError:
        return []  # a backup's own seq, removed by prune: a commit point
    if entry is None or entry[2] & FLAG_END:
        return []
    first, last = _transaction_of(journal, until_seq)
    if last is not None and all(
            e[2] & FLAG_QUERY
            for e in journal.entries(until_seq + 1, last + 1)):
        # Only queries follow in the transaction: they change nothing,
        # so the state after until_seq is the committed one.
        return []
    if last is None:
        # A transaction the journal does not finish: a torn tail that a
        # reader leaves in place is not read at all, so this is unusual.
        return [("seq %d is inside a transaction that starts at seq %d and"
                 " that the journal does not finish: the result holds part"
                 " of it, a state the live system never committed; --until"
                 " %d gives a committed state"
                 % (until_seq, first, first - 1), (first, None))]
    if first > 1:
        advice = "--until %d or --until %d give committed states" % (
            first - 1, last)
    else:
        advice = "--until %d gives a committed state" % last
    return [("seq %d is inside transaction %d..%d: the result holds part of"
             " it, a state the live system never committed; %s"
             % (until_seq, first, last, advice), (first, last))]


def _attach_notes(result, notes):
    for message, partial in notes:
        logger.warning("%s", message)
        result.warnings.append(message)
        if partial is not None:
            result.partial_transaction = partial


def _after(time, until_time):
    if isinstance(until_time, datetime.datetime):
        return datetime.datetime.fromtimestamp(
            time, datetime.timezone.utc) > until_time
    return time > until_time


def catch_up(db, journal, until_seq=None, until_time=None, batch_size=1000,
             progress=None, observe=None):
    """Replay into ``db`` what its marker lacks, up to a point.

    The point-in-time half of a restore: ``db`` is a copy of a backup,
    whose marker says where the journal resumes.  ``until_seq`` and
    ``until_time`` are inclusive and mean what they mean for
    :func:`rebuild` (a seq is exact and a cut transaction is reported; a
    time counts whole transactions); a marker
    already beyond them raises :class:`BackupTooNewError`, since replay
    cannot go back.  Everything is checked (journal identity, history,
    decodability) before the first commit.  Returns a :class:`Recovery`
    whose ``marker_seq`` is where the backup was.
    """
    began = time.perf_counter()
    with _system_connection(db) as (tm, conn):
        marker = conn.root().get(MARKER_KEY)
        if marker is None:
            raise NotJournaledError(
                "the ZODB holds no zjournal marker, so nothing says where in"
                " journal %s it stands; restore from a backup of a ZODB"
                " that a JournaledDB wrote" % journal.path)
        _check_marker(marker, journal)
        found = marker.last_seq
        last = journal.last_seq if until_seq is None else min(
            until_seq, journal.last_seq)
        if until_seq is not None and found > until_seq:
            raise BackupTooNewError(
                "the backup holds the state at seq %d, after the requested"
                " seq %d, and replay cannot go back: restore from an older"
                " backup, one whose marker is at seq %d or earlier"
                % (found, until_seq, until_seq))
        if until_time is not None and found > 0:
            _check_not_after(journal, found, until_time, db.storage)
        notes = _until_seq_notes(journal, until_seq)
        if found < journal.last_seq:
            # Whether or not anything will be replayed: a backup of
            # another history must be refused even when the requested
            # point is the backup's own.
            _check_link(journal, marker)
        if found < last:
            # Only what will be replayed: an entry after the requested
            # time (a command this code does not know, damage) is none of
            # this restore's business.
            check_replayable(_until(journal.entries(found + 1, last + 1),
                                    until_time), marker.head)
        logger.info("catching up seq %d..%d of journal %s", found + 1,
                    last, journal.path)
        n = replay(tm, conn, _until(journal.entries(found + 1, last + 1),
                                    until_time),
                   batch_size=batch_size, progress=progress,
                   total=max(last - found, 0), observe=observe)
        last = conn.root()[MARKER_KEY].last_seq
    seconds = time.perf_counter() - began
    logger.info("caught up %d commands in %.2fs", n, seconds)
    result = Recovery("caught up" if n else "current", found,
                      journal.last_seq, n, seconds)
    result.restored_seq = last
    _attach_notes(result, notes)
    return result


def _check_not_after(journal, seq, until_time, storage=None):
    """Refuse a backup whose last command ran after ``until_time``.

    The journal says when seq ``seq`` ran, unless prune removed it (a
    backup taken exactly at a removed segment's end).  Then the backup's
    storage bounds it: the command's effects were committed with it, so
    it ran no later than the storage's last transaction.  A bound at or
    before ``until_time`` proves the backup old enough; anything else
    proves nothing, and a restore that cannot show it matches the
    requested time must not pretend to.
    """
    try:
        entry = next(iter(journal.entries(seq, seq + 1)), None)
    except JournalPrunedError:
        entry = None
    if entry is not None:
        if _after(entry.time, until_time):
            raise BackupTooNewError(
                "the backup holds the state at seq %d, whose command ran at"
                " %s, after the requested time %s, and replay cannot go"
                " back: restore from an older backup, taken before that"
                " time" % (seq, _iso(entry.time), _iso(until_time)))
        return
    bound = _last_commit_time(storage)
    if bound is not None and not _after(bound, until_time):
        logger.info("the journal no longer holds seq %d, the backup's last"
                    " command; the backup's last commit, at %s, shows it ran"
                    " before %s", seq, _iso(bound), _iso(until_time))
        return
    raise BackupTooNewError(
        "the backup holds the state at seq %d, which prune removed from"
        " journal %s, so when that command ran cannot be read there; the"
        " backup's last commit%s is after the requested time %s, so the"
        " backup may hold commands from after it, and replay cannot go"
        " back: restore from an older backup, or ask for a seq (--until"
        " %d or later) instead of a time" % (
            seq, journal.path, "" if bound is None else " (%s)" % _iso(bound),
            _iso(until_time), seq))


def _last_commit_time(storage):
    """When ``storage`` last committed (seconds since the epoch), or None."""
    if storage is None:
        return None
    tid = storage.lastTransaction()
    if not tid or tid == b"\0" * 8:
        return None
    from persistent.TimeStamp import TimeStamp
    return TimeStamp(tid).timeTime()


def _iso(when):
    if isinstance(when, datetime.datetime):
        return when.isoformat()
    return datetime.datetime.fromtimestamp(
        when, datetime.timezone.utc).isoformat()


def _check_link(journal, marker):
    """The next record must follow the one the marker applied."""
    if marker.head is None:
        return
    entry = next(iter(journal.entries(marker.last_seq + 1,
                                      marker.last_seq + 2)), None)
    if entry is not None and entry.prev != marker.head:
        check_replayable([entry], marker.head)


def check_replayable(entries, head=None):
    """Refuse, before the ZODB is touched, entries this code cannot decode.

    An unknown command name or a version without an upcaster is a gap in
    the code: finding it halfway through a replay would leave the ZODB
    changed by the commands before it.  This reads the entries once,
    looking only at names and versions (payloads were checked to decode
    when they were written), and reads through the journal's framing
    checks, so damage is found before anything changes too.

    ``head``, the chain hash the ZODB marker stores, must be the first
    entry's ``prev``: otherwise the journal is not the history the ZODB
    was built from.
    """
    known = set()
    for entry in entries:
        if head is not None:
            if entry.prev != head:
                raise HistoryMismatchError(
                    "seq %d of the journal does not follow the record the"
                    " ZODB applied last (seq %d): the chain hash differs, so"
                    " the journal was edited or replaced by another history."
                    " Nothing was changed; run zodb-journal verify, and"
                    " rebuild from the journal you trust"
                    % (entry.seq, entry.seq - 1))
            head = None
        if entry.flags & FLAG_QUERY:
            continue
        key = (entry.command_name, entry.version)
        if key in known:
            continue
        try:
            cls = commands.lookup(entry.command_name, entry.seq)
            commands.check_version(cls, entry.version, entry.seq)
        except CommandError as e:
            raise ReplayError(entry.seq, entry.command_name, e) from e
        known.add(key)


def _tail(journal):
    """The journal's (last_seq, head), in one read where it can."""
    tail = getattr(journal, "tail", None)
    if tail is not None:
        return tail()
    return journal.last_seq, getattr(journal, "head", None)


def _check_marker(marker, journal):
    if marker.skipped:
        raise ForensicZODBError(
            "the ZODB was rebuilt with --skip-unknown and lacks %d entries"
            " of journal %s (first: seq %d); it is for inspection only."
            " Rebuild an empty ZODB with the code that knows every command"
            % (len(marker.skipped), journal.path, marker.skipped[0]))
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
    last_seq, head = _tail(journal)
    if (marker.last_seq == last_seq and marker.head is not None
            and head is not None and marker.head != head):
        raise HistoryMismatchError(
            "journal %s ends at seq %d, as the ZODB does, but its last"
            " record is not the one the ZODB applied (the chain hash"
            " differs): the journal was edited or replaced by another"
            " history. Nothing was changed; run zodb-journal verify, and"
            " rebuild from the journal you trust" % (journal.path,
                                                    journal.last_seq))


def _advance(marker, entry, skipped):
    """Make the marker say the ZODB holds everything up to ``entry``."""
    marker.last_seq = entry.seq
    marker.head = entry.hash
    if skipped:
        marker.skipped = [s[0] for s in skipped]


def replay(tm, conn, entries, batch_size=1000, progress=None, total=None,
           skipped=None, observe=None):
    """Execute journal ``entries`` against ``conn``'s root, in batches.

    The root must hold a marker.  Each batch is one ZODB transaction that
    also advances the marker; the last partial batch is committed too.
    Returns the number of commands replayed.

    ``entries`` are :class:`~zjournal.journal.Entry` tuples.  The loop
    looks each command class up once per name, not once per entry: it
    runs once per command in the journal.  Queries are passed over.  With
    a ``skipped`` list, entries that cannot be decoded are passed over
    and listed there as ``(seq, name, reason)`` instead of stopping the
    replay.

    ``observe(entry, seconds)``, when given, is called after each command
    has executed, with the time its ``execute`` took: what a profile of a
    replayed session (``zodb-journal replay --profile``) is made of.
    Without it the loop reads no clock.
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
    entry = None
    try:
        # Entries are (seq, time, flags, version, name, payload, ...)
        # tuples; unpacking them is cheaper than their named fields.
        for entry in entries:
            seq, t, flags, version, name, payload, _, _, _, _, _ = entry
            if seq != last + 1:
                raise ReplayError(seq, name, ValueError(
                    "expected seq %d: the journal has a gap" % (last + 1)))
            last = seq
            n += 1
            in_batch += 1
            if flags & FLAG_QUERY:
                pass
            else:
                try:
                    make = builders.get(name)
                    if make is None:
                        make = builders[name] = commands.builder(
                            commands.lookup(name, seq))
                    command = make(version, payload, seq)
                except CommandError as e:
                    if skipped is None:
                        raise ReplayError(seq, name, e) from e
                    skipped.append((seq, name, str(e)))
                    logger.info("skipped seq %d (%s): %s", seq, name, e)
                    command = None
                if command is not None:
                    context = Context(seq, t, True)
                    began = None if observe is None else perf_counter()
                    try:
                        command.execute(root, context)
                    except Exception as e:
                        raise ReplayError(seq, name, e) from e
                    if began is not None:
                        observe(entry, perf_counter() - began)
            if in_batch >= batch_size:
                _advance(marker, entry, skipped)
                tm.commit()
                faults.point("replay.after-commit")
                conn.cacheGC()
                in_batch = 0
                progress(n, total)
        if in_batch:
            _advance(marker, entry, skipped)
            tm.commit()
            progress(n, total)
    except BaseException:
        tm.abort()
        raise
    return n
