"""Followers: keep a read-only replica's ZODB current with a journal.

Usage::

    zodb-journal follow JOURNAL --zodb REPLICA --import MODULE ...
                        [--interval SECONDS] [--once] [--batch-size N]
                        [--lag-report SECONDS] [--status-file FILE]

A follower is recovery that never ends: it replays the journal's new
entries into the replica as they arrive, in ZODB transactions that
advance the replica's marker, exactly as a catch-up does.  The replica
is an ordinary ZODB with a zjournal marker: an empty one is built from
seq 1, a copy of the primary (or a restored backup) catches up from its
marker.  The journal is only read: a follower takes no lock and never
changes a byte of it.

How it learns of new entries:

* a file journal is polled every ``--interval`` seconds.  Each read
  starts where the previous one ended (segment and offset), so a poll
  costs the new records, not the segment; it moves on to the next
  segment when the writer rolls over;
* a PostgreSQL journal notifies each append (see
  :class:`~zjournal.sqljournal.PostgresJournal`): the follower waits on
  the channel and reads as soon as a notification arrives, polling every
  ``--interval`` seconds as well in case one was lost;
* an SQLite journal is polled.

What it applies: whole transactions only.  A file journal's last
transaction may be in the middle of being written, or torn by a writer
that died; a reader cannot tell which, and needs not: it is "not yet",
and the writer cuts a torn one when it restarts.  Damage anywhere else
is an error.  A restarting writer may cut and rewrite the tail while the
follower reads it, which can look like damage for one read; damage in
the last segment is believed once it is found at the same place for
``DAMAGE_SECONDS`` (``--once`` reads again for that long before it
fails).  No writer touches a segment it rolled over from, so damage there
is believed at once (after one more read, in case the writer rolled over
while the follower read).

Batches end at transaction boundaries and each commits the marker with
the effects, so a reader of the replica never sees part of a journal
transaction, and a follower killed at any moment resumes from its
marker.  SIGTERM and SIGINT end the current batch (it commits) and stop
the follower; it closes the replica and exits 0.

Refusals, before anything is applied: a replica that holds data but no
marker, a marker naming another journal, a replica ahead of the journal,
a journal whose history (chain hash) is not the one the replica applied.
"""
import bisect
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time

import transaction

from zjournal.errors import CorruptJournalError
from zjournal.errors import NotJournaledError
from zjournal.errors import ZJournalError
from zjournal.errors import ZODBAheadError
from zjournal.format import FLAG_END
from zjournal.format import segment_name
from zjournal.journal import FileJournal
# The file journal's own scanner, started at an offset: one reader of
# the format, not two.
from zjournal.journal import _scan
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker
from zjournal.recovery import _check_marker
from zjournal.recovery import check_replayable
from zjournal.recovery import replay

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
DEFAULT_BATCH_SIZE = 1000
DEFAULT_LAG_REPORT = 60.0
# While catching up, the lag is logged at least this often: it is the
# progress report of a long replay.
CATCH_UP_REPORT = 5.0
# How long damage must stay at one place of a file journal before it is
# believed (see the module docstring), and how many reads must find it.
DAMAGE_SECONDS = 2.0
DAMAGE_READS = 3
# The status file is rewritten at most this often (and when stopping).
STATUS_INTERVAL = 1.0


class FollowerError(ZJournalError):
    """The follower cannot go on with this replica or this journal."""


class ReplicaLockedError(FollowerError):
    """Another process has the replica open for writing."""


# -- reading the journal --------------------------------------------------

class _Source:
    """What both sources share: a read that fails reads again."""

    def read(self, limit):
        """Entries of the whole transactions after the last read, at least
        ``limit`` of them if there are (the last transaction is never
        split), fewer when the journal holds no more.

        A read that fails leaves the position where it was: the entries it
        had read are not returned, so they must be read again.
        """
        saved = self.position()
        try:
            return self._read(limit)
        except BaseException:
            self.rewind(saved)
            raise


class FileSource(_Source):
    """Reads a file journal's new whole transactions, where the last read
    stopped.

    Re-reading a segment from its start at every poll would cost the
    whole segment (64 MB by default) for each handful of new records; the
    position of the next record -- segment and offset -- is kept instead.
    It is found once, at start, by reading the segment that holds the
    replica's last applied seq.

    Archived segments (compressed, no longer in the journal directory)
    cannot be read from an offset cheaply, and are never appended to: a
    replica that needs them -- a new one, or one that fell behind a prune
    -- reads them through :meth:`FileJournal.entries`, one stream kept
    across reads, until it reaches the first segment still in place.
    """

    # How many times a read lists the segments again when one it listed
    # moved into the archive before it could be opened.
    RELISTS = 5

    def __init__(self, journal, applied):
        self.journal = journal
        self.next_seq = applied + 1
        self.caught_up = False
        self._stream = None   # (entries generator, its next seq)
        self.at = self._locate(applied)

    def _locate(self, applied):
        """``(segment, offset)`` of the record after seq ``applied``, or
        None when it is in an archived segment."""
        journal = self.journal
        wanted = applied + 1
        for _ in range(self.RELISTS):
            every = journal._all_segments()
            segs = [seq for seq in every if seq not in journal._archived]
            start = journal._start_seq(every)
            if wanted < start:
                raise FollowerError(
                    "journal %s starts at seq %d (prune removed the seqs"
                    " before it), but the replica needs seq %d next. Seed"
                    " the replica from a backup taken at seq %d or later"
                    " (zodb-journal restore)" % (journal.path, start,
                                                 wanted, start - 1))
            if wanted < every[0]:
                raise FollowerError(
                    "journal %s starts at seq %d, but the replica needs seq"
                    " %d next, and nothing (no prune state) says why the"
                    " seqs before are missing: is the archive directory"
                    " missing? Rebuild needs them too" % (
                        journal.path, every[0], wanted))
            if wanted < segs[0]:
                if applied >= start:
                    self._check_applied_end(applied)
                return None
            i = bisect.bisect_right(segs, wanted) - 1
            first = segs[i]
            try:
                return self._locate_in(first, applied, first == segs[-1])
            except FileNotFoundError:
                continue  # archived since the listing: list again
        raise self._moving(first)

    def _locate_in(self, first, applied, is_last):
        journal = self.journal
        wanted = applied + 1
        path = os.path.join(journal.path, segment_name(first))
        with open(path, "rb") as f:
            header = journal._read_header(first, f)
            if first == wanted:
                return first, header.size
            found = None
            for entry in _scan(f, path, header.size, first, applied,
                               wanted, is_last, None):
                found = first, entry[6] + entry[7]
        if found is None:
            raise self._ahead(applied)
        return found

    def _check_applied_end(self, applied):
        """The replica's last seq must end a transaction the journal
        holds, as in a segment still in place."""
        entry = next(iter(self.journal.entries(applied, applied + 1)), None)
        if entry is None or not entry[2] & FLAG_END:
            raise self._ahead(applied)

    def _ahead(self, applied):
        return ZODBAheadError(
            "the replica has applied commands up to seq %d, but journal"
            " %s holds no whole transaction with seq %d; nothing was"
            " changed. Rebuild the replica from the journal, or restore"
            " the journal's missing records" % (applied, self.journal.path,
                                                applied))

    def _moving(self, first):
        return FollowerError(
            "journal %s: segment %s kept moving while the follower tried to"
            " open it (is a prune running in a loop?); try again"
            % (self.journal.path, segment_name(first)))

    def position(self):
        """What :meth:`rewind` needs to read the same entries again."""
        return self.at, self.next_seq, self.caught_up

    def rewind(self, position):
        """Go back to a :meth:`position`: the entries read since were not
        applied (the replica's commit failed), so they must be read
        again."""
        self.at, self.next_seq, self.caught_up = position

    def _read(self, limit):
        journal = self.journal
        out = []
        reread = False
        moved = 0
        while True:
            segs = journal._list_segments()
            if self.next_seq < segs[0]:
                # In an archived segment: read the archive's stream up to
                # the first segment in place.
                if self._from_archive(out, limit, segs[0]):
                    self.caught_up = False
                    return out
                self.at = None
                if self.next_seq != segs[0]:
                    # The stream ended early: more was archived meanwhile.
                    continue
            if self.at is None or self.at[0] not in segs:
                if self.next_seq not in segs:
                    raise FollowerError(
                        "journal %s: the segment holding seq %d, which the"
                        " follower reads next, is gone (removed while in"
                        " use?)" % (journal.path, self.next_seq))
                try:
                    self.at = self.next_seq, self._header_size(self.next_seq)
                except FileNotFoundError:
                    moved += 1
                    if moved >= self.RELISTS:
                        raise self._moving(self.next_seq) from None
                    continue
            first, offset = self.at
            path = os.path.join(journal.path, segment_name(first))
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                # Archived between the listing and the open (a prune takes
                # no writer lock): list again, it is in the archive now.
                moved += 1
                if moved >= self.RELISTS:
                    raise self._moving(first) from None
                continue
            with f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:
                    raise ZODBAheadError(
                        "journal %s: segment %s is %d bytes, but the replica"
                        " applied records up to offset %d of it: the journal"
                        " was truncated or replaced. Nothing was changed;"
                        " rebuild the replica from the journal you trust"
                        % (journal.path, path, size, offset))
                f.seek(offset)
                scan = _scan(f, path, offset, self.next_seq, self.next_seq,
                             float("inf"), first == segs[-1] and not reread,
                             None)
                full, ended = self._take(scan, first, out, limit)
            if full:
                self.caught_up = False
                return out
            after = [s for s in journal._list_segments() if s > first]
            if not ended or not after:
                self.caught_up = True
                return out
            if after[0] == self.next_seq:
                try:
                    self.at = after[0], self._header_size(after[0])
                except FileNotFoundError:
                    self.at = None  # archived meanwhile: list again
                reread = False
            elif not reread:
                # The writer appended to this segment and rolled over
                # since it was read: read the rest of it first.
                reread = True
            else:
                raise CorruptJournalError(
                    journal._segment_path(after[0]), 0, self.next_seq,
                    "segment starts at seq %d, but the previous segment"
                    " ends at seq %d: records are missing"
                    % (after[0], self.next_seq - 1))

    def _header_size(self, first):
        """A segment's header size, read from the journal directory."""
        path = os.path.join(self.journal.path, segment_name(first))
        with open(path, "rb") as f:
            return self.journal._read_header(first, f).size

    def _from_archive(self, out, limit, stop):
        """Move the entries of whole transactions before seq ``stop`` from
        the archive's stream to ``out``; return whether ``limit`` was
        reached.

        The stream is kept between reads (a gzip file cannot seek back
        cheaply), and started again only when the position is not where
        it stands (after a rewind, or when the archive grew).
        """
        if self._stream is None or self._stream[1] != self.next_seq:
            self._close_stream()
            self._stream = [self.journal.entries(self.next_seq, stop),
                            self.next_seq]
        stream = self._stream
        pending = []
        for entry in stream[0]:
            pending.append(entry)
            if entry[2] & FLAG_END:
                out.extend(pending)
                pending = []
                self.next_seq = stream[1] = entry[0] + 1
                if len(out) >= limit:
                    return True
        # Archived segments hold whole transactions only; a stream that
        # ends inside one ended at ``stop``: the rest is in place.
        if pending:
            raise CorruptJournalError(
                self.journal._segment_path(pending[0][0]), pending[0][6],
                pending[0][0], "the archived segments end inside a"
                " transaction (seq %d..%d have no end)"
                % (pending[0][0], pending[-1][0]))
        self._close_stream()
        return False

    def _close_stream(self):
        if self._stream is not None:
            self._stream[0].close()
            self._stream = None

    def _take(self, scan, first, out, limit):
        """Move entries from ``scan`` to ``out``; return ``(full, ended)``:
        whether ``limit`` was reached, whether the segment ended cleanly."""
        try:
            while True:
                try:
                    entry = next(scan)
                except StopIteration as stop:
                    return False, stop.value is not None
                out.append(entry)
                if entry[2] & FLAG_END:
                    self.at = first, entry[6] + entry[7]
                    self.next_seq = entry[0] + 1
                    if len(out) >= limit:
                        return True, False
        finally:
            scan.close()

    def last_seq(self):
        """The journal's last seq now: a fresh read-only open reads just
        the tail (the open journal's ``last_seq`` is the one it opened
        with)."""
        with FileJournal(self.journal.path, readonly=True,
                         hmac_key=False) as fresh:
            return max(fresh.last_seq, self.next_seq - 1)

    def wait(self, timeout, wake):
        select.select([wake], [], [], timeout)

    def is_closed(self, path):
        """Whether ``path`` is a segment that the writer rolled over
        from, so that no writer repairs it."""
        if path is None or os.path.dirname(os.path.abspath(path)) != (
                os.path.abspath(self.journal.path)):
            return False
        segs = self.journal._list_segments()
        return os.path.basename(path) in {segment_name(s)
                                          for s in segs[:-1]}

    def close(self):
        self._close_stream()


class SQLSource(_Source):
    """Reads an SQL journal's new entries; waits on notifications where
    the journal sends them (PostgreSQL)."""

    def __init__(self, journal, applied, listen=True):
        self.journal = journal
        self.next_seq = applied + 1
        self.caught_up = False
        listen = getattr(journal, "listen", None) if listen else None
        self.listener = listen() if listen is not None else None

    def position(self):
        return self.next_seq, self.caught_up

    def rewind(self, position):
        self.next_seq, self.caught_up = position

    def _read(self, limit):
        out = []
        entries = self.journal.entries(self.next_seq)
        try:
            for entry in entries:
                out.append(entry)
                if entry[2] & FLAG_END:
                    self.next_seq = entry[0] + 1
                    if len(out) >= limit:
                        self.caught_up = False
                        return out
        finally:
            entries.close()
        # Rows are committed by whole transactions; a last row without
        # END would be a journal cut inside one: not applied.
        while out and not out[-1][2] & FLAG_END:
            out.pop()
        self.caught_up = True
        return out

    def last_seq(self):
        return max(self.journal.last_seq, self.next_seq - 1)

    def is_closed(self, path):
        return False

    def wait(self, timeout, wake):
        if self.listener is None:
            select.select([wake], [], [], timeout)
            return
        self.listener.wait(timeout, wake)

    def close(self):
        if self.listener is not None:
            self.listener.close()


def source_for(journal, applied, listen=True):
    """The reader that suits ``journal``'s backend."""
    if getattr(journal, "backend", "file") == "file":
        return FileSource(journal, applied)
    return SQLSource(journal, applied, listen)


# -- the follower ----------------------------------------------------------

class Follower:
    """Apply a journal's new entries to a replica ZODB as they arrive.

    ``journal`` is a journal opened read-only; ``db`` the replica's
    ``ZODB.DB``.  Neither is closed by the follower.  Call :meth:`run`
    (until :meth:`stop`, which any thread or a signal handler may call),
    or :meth:`start` and then :meth:`poll` as often as you like.

    ``interval`` is the polling period in seconds; ``batch_size`` the
    commands per replica commit (a batch ends at a transaction's end, so
    one may hold more); ``lag_report`` how often the lag is logged;
    ``status_file`` a path where :meth:`status` is kept as JSON.
    ``replica`` names the replica in messages.  ``listen=False`` polls a
    PostgreSQL journal instead of waiting for its notifications (behind
    a pooler that does not pass LISTEN on, such as PgBouncer in
    transaction mode).
    """

    def __init__(self, journal, db, batch_size=DEFAULT_BATCH_SIZE,
                 interval=DEFAULT_INTERVAL, lag_report=DEFAULT_LAG_REPORT,
                 status_file=None, replica=None, listen=True):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if interval <= 0 or lag_report <= 0:
            raise ValueError("interval and lag_report must be positive")
        self.journal = journal
        self.db = db
        self.batch_size = batch_size
        self.interval = interval
        self.lag_report = lag_report
        self.status_file = status_file
        self.listen = listen
        self.replica = replica or db.storage.getName()
        self.state = "starting"
        self.applied_seq = None   # the replica's marker
        self.applied_time = None  # entry time of that command
        self.applied = 0          # commands applied since start
        self.stop_reason = None
        self.error = None
        self._source = None
        self._stopping = False
        self._tm = transaction.TransactionManager()
        self._conn = None
        self._damage = None       # (where, first seen, reads)
        self._began = None
        self._checked = None      # when the journal was last read
        self._logged = self._written = 0.0
        self._written_seq = None  # applied_seq in the status file
        self._wake, self._waker = os.pipe()
        os.set_blocking(self._wake, False)
        os.set_blocking(self._waker, False)

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        """Check the replica against the journal; mark an empty one."""
        if self._source is not None:
            return
        self._conn = self.db.open(self._tm)
        tm = self._tm
        try:
            tm.begin()
            root = self._conn.root()
            marker = root.get(MARKER_KEY)
            if marker is None:
                if len(root):
                    raise NotJournaledError(
                        "the replica %s holds data (root keys: %s) but no"
                        " zjournal marker, so it was not built from journal"
                        " %s; follow into an empty ZODB, or into a copy of"
                        " the primary's" % (
                            self.replica,
                            ", ".join(sorted(map(str, root))[:5]),
                            self.journal.path))
                # The source first: a journal this replica cannot follow
                # (its start was pruned away) is refused before the
                # replica is marked, and it stays an empty ZODB.
                source = source_for(self.journal, 0, self.listen)
                try:
                    root[MARKER_KEY] = Marker(self.journal.identity, 0)
                    tm.commit()
                except BaseException:
                    source.close()
                    raise
                logger.info("replica %s is empty: building it from seq 1 of"
                            " journal %s", self.replica, self.journal.path)
                marker = root[MARKER_KEY]
            else:
                _check_marker(marker, self.journal)
                source = source_for(self.journal, marker.last_seq,
                                    self.listen)
            self.applied_seq = marker.last_seq
            self._source = source
        finally:
            tm.abort()
        self._began = time.monotonic()
        self.state = "catching up"
        logger.info("following journal %s (%s) into replica %s from seq %d",
                    self.journal.path, self.journal.identity, self.replica,
                    self.applied_seq + 1)

    def run(self, once=False):
        """Follow until :meth:`stop` (or, with ``once``, until current).

        Returns the number of commands applied.
        """
        try:
            self.start()
            while not self._stopping:
                self.poll()
                self._report()
                if self._stopping:
                    break
                if once:
                    if self._damage is None:
                        break
                    # Damage, perhaps a writer repairing its tail: read
                    # again until it is gone or believed (and raised);
                    # exiting now would call a damaged journal current.
                    self._source.wait(min(self.interval, DAMAGE_SECONDS
                                          / DAMAGE_READS), self._wake)
                else:
                    self._source.wait(min(self.interval, self._due()),
                                      self._wake)
                self._drain()
        except BaseException as e:
            self.state = "failed"
            self.error = "%s: %s" % (type(e).__name__, e)
            self._report(force=True, log=False)
            raise
        self.state = "stopped"
        logger.info("stopped%s at seq %d; applied %d commands",
                    "" if self.stop_reason is None else
                    " (%s)" % self.stop_reason, self.applied_seq,
                    self.applied)
        self._report(force=True, log=False)
        return self.applied

    def stop(self, reason=None):
        """Ask :meth:`run` to stop after the current batch.

        Safe from a signal handler and from another thread: it only sets
        a flag and writes one byte to a pipe the follower waits on.
        """
        self.stop_reason = reason
        self._stopping = True
        try:
            os.write(self._waker, b"s")
        except OSError:
            pass  # the pipe is full (it is woken anyway) or closed

    def close(self):
        """Release the connection, the listener and the pipe."""
        if self._source is not None:
            self._source.close()
        if self._conn is not None:
            self._tm.abort()
            self._conn.close()
            self._conn = None
        for fd in (self._wake, self._waker):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake = self._waker = -1

    def _drain(self):
        try:
            while os.read(self._wake, 64):
                pass
        except OSError:
            pass

    # -- applying ----------------------------------------------------------

    def poll(self):
        """Apply every whole transaction the journal holds now.

        Returns the number of commands applied.  Stops early, between two
        batches, when asked to stop.
        """
        self.start()
        n = 0
        while not self._stopping:
            before = self._source.position()
            batch = self._read()
            self._checked = time.time()
            if not batch:
                break
            try:
                n += self._apply(batch)
            except BaseException:
                # Not applied: the next poll must read this batch again,
                # or it would go on after records the replica lacks.
                self._source.rewind(before)
                raise
            if self._source.caught_up:
                break
            self._report()
        if self._source.caught_up:
            self.state = "following"
        return n

    def _read(self):
        try:
            try:
                batch = self._source.read(self.batch_size)
            except CorruptJournalError as e:
                if not self._source.is_closed(e.path):
                    raise
                # A closed segment changes no more: one more read tells a
                # roll-over during the read from damage, which it raises.
                batch = self._source.read(self.batch_size)
        except CorruptJournalError as e:
            if self._source.is_closed(e.path):
                self._damage = None
                raise
            where = (e.path, e.offset, e.seq)
            now = time.monotonic()
            if self._damage is None or self._damage[0] != where:
                self._damage = (where, now, 0)
            seen, reads = self._damage[1], self._damage[2] + 1
            self._damage = (where, seen, reads)
            if reads >= DAMAGE_READS and now - seen >= DAMAGE_SECONDS:
                raise
            logger.info("journal %s: %s; reading it again, as a writer may"
                        " be repairing its tail", self.journal.path, e)
            return []
        self._damage = None
        return batch

    def _apply(self, batch):
        """Replay one batch in one replica transaction with the marker."""
        tm = self._tm
        tm.begin()
        try:
            root = self._conn.root()
            marker = root.get(MARKER_KEY)
            if marker is None or marker.last_seq != self.applied_seq:
                raise FollowerError(
                    "the replica %s was changed by another process: its"
                    " marker says seq %s, but this follower left it at seq"
                    " %d. A replica has one writer, its follower" % (
                        self.replica, getattr(marker, "last_seq", None),
                        self.applied_seq))
            check_replayable(batch, marker.head)
            n = replay(tm, self._conn, batch, batch_size=len(batch) + 1,
                       progress=_quiet, total=len(batch))
        except BaseException:
            tm.abort()
            raise
        last = batch[-1]
        self.applied_seq = last[0]
        self.applied_time = last[1]
        self.applied += n
        return n

    # -- lag ------------------------------------------------------------------

    def status(self):
        """Where the replica is, and how far behind the journal.

        ``behind_seqs`` counts commands the journal holds and the replica
        does not; ``behind_seconds`` is 0 when there are none, else how
        old the replica's last command is (an upper bound on how stale a
        read of the replica is).  ``checked`` is when the journal was
        last read: a current replica is current as of then.
        """
        now = time.time()
        journal_seq = (self._source.last_seq() if self._source is not None
                       else None)
        behind = seconds = None
        if journal_seq is not None and self.applied_seq is not None:
            behind = max(journal_seq - self.applied_seq, 0)
            if behind == 0:
                seconds = 0.0
            elif self.applied_time is not None:
                seconds = max(now - self.applied_time, 0.0)
        elapsed = (time.monotonic() - self._began if self._began is not None
                   else 0.0)
        return {
            "state": self.state,
            "journal": self.journal.path,
            "journal_id": self.journal.identity,
            "replica": self.replica,
            "applied_seq": self.applied_seq,
            "applied_time": self.applied_time,
            "journal_seq": journal_seq,
            "behind_seqs": behind,
            "behind_seconds": seconds,
            "applied": self.applied,
            "rate": self.applied / elapsed if elapsed > 0 else 0.0,
            "checked": self._checked,
            "updated": now,
            "pid": os.getpid(),
            "error": self.error,
        }

    def _log_every(self):
        if self.state == "catching up":
            return min(self.lag_report, CATCH_UP_REPORT)
        return self.lag_report

    def _status_every(self):
        """A changed status is written within a second; an unchanged one
        is refreshed as often as the lag is logged, so that its
        ``updated`` shows the follower alive."""
        if self._written_seq != self.applied_seq:
            return STATUS_INTERVAL
        return self.lag_report

    def _due(self):
        """Seconds until the next report is due: a follower waiting for
        entries wakes up for it, or a status file would lag behind the
        replica until the next entry arrives."""
        now = time.monotonic()
        due = self._logged + self._log_every() - now
        if self.status_file is not None:
            due = min(due, self._written + self._status_every() - now)
        return max(due, 0.0)

    def _report(self, force=False, log=True):
        """Log the lag and refresh the status file, when they are due."""
        now = time.monotonic()
        log = log and (force or now - self._logged >= self._log_every())
        write = self.status_file is not None and (
            force or now - self._written >= self._status_every())
        if not (log or write):
            return
        if log:
            self._logged = now
        if write:
            self._written = now
        try:
            status = self.status()
        except (ZJournalError, OSError) as e:
            logger.warning("cannot read the journal's tail for the lag"
                           " report: %s", e)
            return
        if log:
            logger.info(_describe(status))
        if write:
            self._written_seq = status["applied_seq"]
            try:
                write_status(self.status_file, status)
            except OSError as e:
                logger.warning("cannot write the status file %s: %s",
                               self.status_file, e)


def _quiet(done, total):
    """Replay's progress callback: the follower reports lag instead."""


def _describe(status):
    if status["behind_seqs"] is None:
        return "replica %s at seq %s (%s)" % (
            status["replica"], status["applied_seq"], status["state"])
    if status["behind_seqs"] == 0:
        return ("replica %s is current at seq %d (%s); %d commands applied"
                " since start" % (status["replica"], status["applied_seq"],
                                  status["state"], status["applied"]))
    seconds = status["behind_seconds"]
    return ("replica %s at seq %d, journal at seq %d: behind by %d commands"
            "%s (%s, %.0f commands/s)" % (
                status["replica"], status["applied_seq"],
                status["journal_seq"], status["behind_seqs"],
                "" if seconds is None else " and %.1fs" % seconds,
                status["state"], status["rate"]))


def write_status(path, status):
    """Replace ``path`` with ``status`` as JSON, atomically: a monitor
    reads the old file or the new one, never half of one."""
    part = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump(status, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(part, path)
    except BaseException:
        try:
            os.remove(part)
        except OSError:
            pass
        raise


def check_status_file(path):
    """Refuse, before following, a status file that cannot be written.

    Writing it later only logs a warning (a monitor's file must not stop
    the replica), so a typo in the path would otherwise go unnoticed
    until someone looks for the file.
    """
    if os.path.isdir(path):
        raise FollowerError("--status-file %s is a directory; give a file"
                            " path" % path)
    part = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(part, "w", encoding="utf-8"):
            pass
        os.remove(part)
    except OSError as e:
        raise FollowerError(
            "cannot write --status-file %s (%s): the follower writes the"
            " file beside it and renames it into place, so its directory"
            " must exist and be writable" % (path, e.strerror or e)) from e


def _missing_files(spec):
    """The files of a FileStorage replica that do not exist yet: the ones
    to remove if the follower refuses it before applying anything."""
    if "://" in spec:
        if not spec.startswith("file://"):
            return []
        import urllib.parse
        spec = urllib.parse.urlsplit(spec).path
    return [spec + suffix for suffix in (".index", ".lock", ".tmp", "")
            if not os.path.exists(spec + suffix)]


def _remove_files(paths):
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)


# -- opening the replica -----------------------------------------------------

def open_replica(spec):
    """A ``ZODB.DB`` on a FileStorage path (created if missing) or a
    zodburi URI."""
    import ZODB
    import zc.lockfile
    try:
        if "://" not in spec:
            import ZODB.FileStorage
            from ZODB.FileStorage.FileStorage import FileStorageError
            from ZODB.FileStorage.format import CorruptedError
            try:
                return ZODB.DB(ZODB.FileStorage.FileStorage(spec))
            except (FileStorageError, CorruptedError) as e:
                raise FollowerError(
                    "the replica %s is not a FileStorage this follower can"
                    " use (%s: %s): give --zodb the Data.fs file itself"
                    " (not its .index, .lock or .tmp), or a new path for an"
                    " empty replica" % (spec, type(e).__name__, e)) from e
        try:
            import zodburi
        except ImportError:
            raise FollowerError("--zodb URIs need zodburi: pip install"
                                " 'zjournal[uri]'") from None
        try:
            factory, dbkw = zodburi.resolve_uri(spec)
        except (KeyError, ValueError) as e:
            raise FollowerError("cannot open --zodb %s: %s"
                                % (spec, e)) from e
        storage = factory()
        try:
            return ZODB.DB(storage, **dbkw)
        except BaseException:
            storage.close()
            raise
    except zc.lockfile.LockError as e:
        raise ReplicaLockedError(
            "the replica %s is open for writing by another process (%s): a"
            " replica has one writer, its follower; readers open it"
            " read-only" % (spec, e)) from e


# -- the command line ---------------------------------------------------------

def add_subcommands(sub):
    from zjournal.cli import import_option
    from zjournal.cli import journal_argument
    p = sub.add_parser(
        "follow", help="keep a replica ZODB current with a journal, applying"
        " new entries as they arrive")
    journal_argument(p)
    p.add_argument("--zodb", required=True, metavar="REPLICA",
                   help="FileStorage path or zodburi URI of the replica: an"
                        " empty ZODB (built from seq 1) or one with a"
                        " zjournal marker (catches up)")
    import_option(p, required=True)
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   metavar="SECONDS",
                   help="how often to look for new entries (default %g; a"
                        " PostgreSQL journal also wakes the follower at"
                        " each append)" % DEFAULT_INTERVAL)
    p.add_argument("--no-listen", dest="listen", action="store_false",
                   help="poll a PostgreSQL journal instead of waiting for"
                        " its notifications (behind a pooler that does not"
                        " pass LISTEN on)")
    p.add_argument("--once", action="store_true",
                   help="apply what the journal holds now, then exit")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   metavar="N", help="commands per replica commit (default"
                   " %d; a batch always ends with a transaction)"
                   % DEFAULT_BATCH_SIZE)
    p.add_argument("--lag-report", type=float, default=DEFAULT_LAG_REPORT,
                   metavar="SECONDS",
                   help="log the lag this often (default %g)"
                        % DEFAULT_LAG_REPORT)
    p.add_argument("--status-file", metavar="FILE",
                   help="keep the follower's status here as JSON, replaced"
                        " atomically (at most once a second)")
    p.set_defaults(run=cmd_follow)


def cmd_follow(args):
    from zjournal.cli import CLIError
    from zjournal.cli import EXIT_OK
    from zjournal.cli import import_modules
    from zjournal.cli import open_journal
    if args.interval <= 0 or args.lag_report <= 0:
        raise CLIError("--interval and --lag-report must be positive")
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    import_modules(args.imports)
    if args.status_file is not None:
        check_status_file(args.status_file)
    if args.verbose == 0:
        # A follower runs for months: its lag lines are its output.
        logger.setLevel(logging.INFO)
    with open_journal(args.journal) as journal:
        # A replica refused at start is left as it was found: the files
        # opening it created go again, as a failed restore's do.
        created = _missing_files(args.zodb)
        follower = None
        try:
            db = open_replica(args.zodb)
            try:
                follower = Follower(
                    journal, db, batch_size=args.batch_size,
                    interval=args.interval, lag_report=args.lag_report,
                    status_file=args.status_file, replica=args.zodb,
                    listen=args.listen)
                try:
                    with stop_on_signals(follower):
                        follower.run(once=args.once)
                finally:
                    follower.close()
            finally:
                db.close()
        except ReplicaLockedError:
            raise  # another process's files: not ours to remove
        except BaseException:
            if follower is None or follower.applied_seq is None:
                _remove_files(created)
            raise
    print("replica %s at seq %d; %s commands applied" % (
        args.zodb, follower.applied_seq, format(follower.applied, ",")),
        file=sys.stderr)
    return EXIT_OK


@contextlib.contextmanager
def stop_on_signals(follower, signals=(signal.SIGTERM, signal.SIGINT)):
    """Make ``signals`` stop ``follower`` cleanly while in effect.

    The handler only asks the follower to stop: the batch being applied
    commits, then :meth:`Follower.run` returns.
    """
    def handle(signum, frame):
        follower.stop(signal.Signals(signum).name)

    saved = {number: signal.signal(number, handle) for number in signals}
    try:
        yield follower
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
