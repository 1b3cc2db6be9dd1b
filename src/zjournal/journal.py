"""The file journal: segmented, append-only, durable.

Lifecycle of a writer (a :class:`FileJournal` opened without
``readonly``):

1. take the directory's writer lock (``zc.lockfile``);
2. list the segment names (no segment is read but the first's header and
   the last);
3. find the end of the last segment from its end: the trailing length of
   the last record leads to its start, and a record that validates and
   ends a transaction proves the tail is clean.  Only when it does not is
   the last segment scanned forward, to tell a torn tail (cut back, the
   cut bytes kept in ``<segment>.torn-<offset>``) from corruption (an
   error, nothing changed);
4. append each transaction with one ``write`` on an ``O_APPEND``
   descriptor, then ``fdatasync`` under the ``always`` policy.

Old segments may be archived (:mod:`zjournal.archive`): each is then a
gzip file ``<segment>.gz`` holding exactly the segment's bytes, in the
journal's ``archive/`` subdirectory or in the directory ``pruned.json``
names.  Readers list both places and read either transparently, the
segment in the journal directory winning when both exist (an archiving
run interrupted between writing the archive and removing the original).
Segments may also be removed; ``pruned.json`` then says the journal
starts at a later seq on purpose, with the chain hash of the last removed
record, and reading before that seq raises :class:`JournalPrunedError`.
A journal that lacks its first segments without that file is damaged, as
before.

The safety argument for cutting a torn tail: records are acknowledged
only after the whole transaction was written and synced, and nothing valid
follows the cut, so the cut bytes were never acknowledged.  They are kept
anyway, because the argument assumes the disk did what it was told.

Any error from ``write`` or ``fsync`` puts the journal in a failed state:
it refuses appends until it is closed and opened again, because after a
failed fsync the kernel may have dropped the dirty pages, and a retry that
succeeds proves nothing.
"""
import bisect
import contextlib
import errno
import gzip
import hashlib
import json
import logging
import os
import threading
import time as _time
import uuid
import zlib

import zc.lockfile
from zope.interface import implementer

from zjournal import commands
from zjournal import faults
from zjournal import codec
from zjournal.errors import CorruptJournalError
from zjournal.errors import DecodeError
from zjournal.errors import EncodeError
from zjournal.errors import JournalError
from zjournal.errors import JournalFailedError
from zjournal.errors import JournalKeyError
from zjournal.errors import JournalLockedError
from zjournal.errors import JournalPrunedError
from zjournal.errors import JournalSequenceError
from zjournal.errors import JournalWriteError
from zjournal.errors import OutcomeUnknownError
from zjournal.errors import ReadOnlyJournalError
from zjournal.errors import TamperedJournalError
from zjournal.format import BODY_HEAD_SIZE
from zjournal.format import MAX_BODY_SIZE
from zjournal.format import MAX_NAME_SIZE
from zjournal.format import RECORD_HEAD
from zjournal.format import RECORD_HEAD_SIZE
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.format import FLAG_END
from zjournal.format import FLAG_MAC
from zjournal.format import FLAG_QUERY
from zjournal.format import FLAGS_EXTRA
from zjournal.format import FORMAT_VERSION
from zjournal.format import GENESIS
from zjournal.format import HASH_SIZE
from zjournal.format import MAC_SIZE
from zjournal.format import KNOWN_FLAGS
from zjournal.format import FLAGS_OFFSET
from zjournal.format import LOCK_NAME
from zjournal.format import TORN_SUFFIX
from zjournal.format import TRAILER
from zjournal.format import BadRecord
from zjournal.format import Record
from zjournal.format import check_record
from zjournal.format import _extras
from zjournal.format import decode_header
from zjournal.format import encode_chain
from zjournal.format import encode_header
from zjournal.format import encode_meta
from zjournal.format import record_hash
from zjournal.format import sign
from zjournal.format import find_valid_record
from zjournal.format import parse_segment_name
from zjournal.format import segment_name
from zjournal.interfaces import IEntry
from zjournal.interfaces import IJournal

try:
    from zjournal._speedups import check_run as _check_run
    from zjournal._speedups import read_run as _read_run
except ImportError:  # not built: the Python loop does it all
    _check_run = _read_run = None

logger = logging.getLogger(__name__)

# "batch" syncs like "always"; it tells a JournaledDB to group concurrent
# commands into one commit (see zjournal.groupcommit).
FSYNC_POLICIES = ("always", "batch", "never")
# A segment is closed once it reaches this size; the next transaction
# starts a new one.  Small enough that a scan of the last segment after a
# crash is quick, large enough that a directory stays short.
DEFAULT_SEGMENT_SIZE = 64 << 20
# How much of the end of the last segment opening reads to prove the tail
# clean; a last transaction larger than this is checked by a scan.
TAIL_WINDOW = 1 << 16
# The C scan takes seqs as unsigned 64-bit integers; it is used for
# journals whose seqs are far from wrapping.
_MAX_SEQ = (1 << 64) - 1
_C_SEQ_LIMIT = 1 << 62

# Reads go through buffers of this size: a replay's memory does not grow
# with the size of a segment.
READ_CHUNK = 1 << 20
# Journal files and directories are created owner-only: a journal holds
# every argument of every command ever run.
FILE_MODE = 0o600
# Archived segments: <segment name> + ARCHIVE_SUFFIX, in ARCHIVE_DIR of
# the journal unless PRUNE_STATE names another directory.
ARCHIVE_DIR = "archive"
ARCHIVE_SUFFIX = ".gz"
# What pruning did, written by zjournal.archive (JSON): where archived
# segments are, and before which seq records were removed on purpose.
PRUNE_STATE = "pruned.json"
# Where a signing key comes from when none is passed (never the journal).
HMAC_KEY_ENV = "ZJOURNAL_HMAC_KEY"


def read_prune_state(path):
    """The journal directory's prune state (a dict), or None."""
    state_path = os.path.join(path, PRUNE_STATE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise JournalError("%s is unreadable (%s); it records what"
                           " zodb-journal prune did: restore it from a"
                           " backup of the journal" % (state_path, e)) from e
    if not isinstance(state, dict) or not isinstance(
            state.get("removed_before", 1), int):
        raise JournalError("%s does not hold a prune state" % state_path)
    return state


def archived_name(first_seq):
    """The file name of an archived segment."""
    return segment_name(first_seq) + ARCHIVE_SUFFIX


def archive_dir_of(path, state=None):
    """Where a journal's archived segments are."""
    if state and state.get("archive"):
        return os.path.join(path, state["archive"])
    return os.path.join(path, ARCHIVE_DIR)


def list_archived(archive_dir):
    """``{first_seq: path}`` of the complete archived segments in a
    directory (a ``.tmp`` one is an interrupted archiving, not read)."""
    found = {}
    try:
        names = os.listdir(archive_dir)
    except FileNotFoundError:
        return found
    for name in names:
        if name.endswith(ARCHIVE_SUFFIX):
            seq = parse_segment_name(name[:-len(ARCHIVE_SUFFIX)])
            if seq is not None:
                found[seq] = os.path.join(archive_dir, name)
    return found


def sync_dir(path):
    """Make a directory's entries durable: a file created, renamed or
    removed in it survives a power loss only once the directory is
    synced.  The one copy every module that writes files uses."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileIO:
    """The system calls the journal writes through.

    Everything that changes bytes on disk goes through one instance, so
    fault-injection tests can replace it with one that fails, writes short
    or forgets unsynced data, while the journal code stays the production
    code.
    """

    def open_append(self, path):
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    file_mode = FILE_MODE

    def create(self, path, data):
        """Write a new file holding ``data`` and sync it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     self.file_mode)
        try:
            self.write(fd, data)
            self.sync(fd)
        finally:
            os.close(fd)

    def write(self, fd, data):
        """Write all of ``data``; ``os.write`` may write less than asked."""
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "write returned %d" % n)
            view = view[n:]

    def sync(self, fd):
        # fdatasync also flushes the file size, which is all an append
        # changes besides the data.
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)

    def sync_dir(self, path):
        sync_dir(path)

    def truncate(self, fd, size):
        os.ftruncate(fd, size)

    def mkdir(self, path):
        # The directory gets a search bit wherever files get a read bit.
        mode = self.file_mode
        os.mkdir(path, mode | (mode & 0o444) >> 2)

    def rename(self, src, dst):
        os.rename(src, dst)

    def remove(self, path):
        os.remove(path)

    def close(self, fd):
        os.close(fd)


@implementer(IEntry)
class Entry(Record):
    """A journal entry.

    :meth:`~zjournal.journal.FileJournal.entries` yields these.
    """

    __slots__ = ()

    @property
    def command_name(self):
        return self.name

    @property
    def args(self):
        """The command's arguments, decoded without the command's code."""
        try:
            return codec.loads(self.payload)
        except DecodeError as e:
            raise DecodeError(str(e), self.seq, self.name) from e

    @property
    def command(self):
        return commands.decode(self.name, self.version, self.payload, self.seq)

    @property
    def is_query(self):
        """A journaled query: kept for the record, skipped by replay."""
        return bool(self[2] & FLAG_QUERY)

    @property
    def metadata(self):
        """Who and why: a dict (empty when the record carries none).

        Plain JSON, so reading it never runs code.
        """
        if self[9] is None:
            return {}
        try:
            meta = json.loads(self[9].decode("utf-8"))
        except ValueError as e:
            raise DecodeError("undecodable metadata: %s" % e, self.seq,
                              self.name) from e
        if not isinstance(meta, dict):
            raise DecodeError("metadata is not a JSON object", self.seq,
                              self.name)
        return meta

    @property
    def user(self):
        return self.metadata.get("user", "")

    @property
    def description(self):
        return self.metadata.get("description", "")

    def __repr__(self):
        return "<Entry seq=%d %s%s>" % (self.seq, self.name,
                                        " query" if self.is_query else "")


class Batch:
    """One transaction's records, encoded and chained, ready to append.

    Encoding before the vote lets the caller know the chain hash the
    journal will end with (``head``) and store it in the ZODB marker in
    the same transaction as the commands' effects.
    """

    __slots__ = ("first", "last", "prev", "head", "data")

    def __init__(self, first, last, prev, head, data):
        self.first = first
        self.last = last
        self.prev = prev
        self.head = head
        self.data = data


class TornTail:
    """What was found (and, for a writer, cut) at the end of the journal."""

    def __init__(self, path, offset, size, reason, saved_as=None):
        self.path = path
        self.offset = offset
        self.size = size
        self.reason = reason
        self.saved_as = saved_as

    def __repr__(self):
        return "<TornTail %s at %d: %d bytes, %s>" % (
            self.path, self.offset, self.size, self.reason)


class ScanReport:
    """The result of :meth:`~zjournal.journal.FileJournal.verify`."""

    def __init__(self):
        self.segments = 0
        self.records = 0
        self.bytes = 0
        self.first_seq = None
        self.last_seq = 0
        self.torn_tail = None
        self.seconds = 0.0
        self.head = GENESIS   # chain hash of the last record checked
        self.signed = 0       # records carrying a MAC
        self.unsigned = 0
        self.queries = 0


@implementer(IJournal)
class FileJournal:
    """A journal kept in a directory of segment files.

    ``fsync`` is ``"always"`` (the default: a record is on disk before the
    commit returns), ``"batch"`` (the same, and a
    :class:`~zjournal.JournaledDB` groups concurrent commands into one
    commit and one sync) or ``"never"`` (for tests and bulk loads: a crash
    may lose recent records).  ``readonly=True`` opens without the writer lock
    and never modifies a file; a torn tail is then reported, not cut.

    ``hmac_key`` (bytes or str; default: the environment variable
    ``ZJOURNAL_HMAC_KEY`` when set; False: no key, whatever the
    environment says) signs every appended record and makes
    :meth:`verify` check signatures.  The key is never written to the
    journal.  ``identity`` (a UUID string) names a journal being created,
    for an import that must keep the identity ZODB markers refer to.
    ``file_mode`` is the permission of new files (directories get the
    matching search bits): owner-only by default.  ``archive`` is the
    directory of archived segments when it is neither the journal's
    ``archive/`` nor the one ``pruned.json`` names.
    """

    def __init__(self, path, fsync="always", readonly=False,
                 segment_size=DEFAULT_SEGMENT_SIZE, io=None, identity=None,
                 hmac_key=None, file_mode=FILE_MODE, archive=None):
        if fsync not in FSYNC_POLICIES:
            raise ValueError("fsync must be one of %s, not %r"
                             % (", ".join(FSYNC_POLICIES), fsync))
        if segment_size < SEGMENT_HEADER_SIZE:
            raise ValueError("segment_size is too small: %r" % segment_size)
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self.readonly = readonly
        self.segment_size = segment_size
        self._archive = None if archive is None else os.path.abspath(archive)
        self._archived = {}
        self._pruned = None
        self._io = io if io is not None else FileIO()
        if file_mode != FILE_MODE:
            self._io.file_mode = file_mode
        if hmac_key is None:
            hmac_key = os.environ.get(HMAC_KEY_ENV) or None
        elif hmac_key is False:
            hmac_key = None
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode("utf-8")
        self._key = hmac_key
        self._new_identity = (uuid.UUID(identity).bytes if identity
                              is not None else None)
        self.head = GENESIS
        self._lock = None
        self._made_dir = self._made_segment = self._made_lock = False
        self._new_header_size = 0
        self._cut_now = None  # a TornTail this open cut
        self._fd = None
        self._failed = None
        self._closed = False
        self._append_lock = threading.Lock()
        self.torn_tail = None
        try:
            self._open()
        except BaseException:
            if self._cut_now is not None:
                # Refused after cutting a torn tail (a wrong key, say):
                # leave the disk as it was found.
                try:
                    self._restore_tail()
                except OSError:
                    logger.exception("journal %s: could not put a cut tail"
                                     " back", self.path)
            if self._made_lock and self._lock is not None:
                # Refused before anything was written: leave no lock file.
                # Unlinked while still locked, never after: see
                # _take_lock for why that order is the safe one.
                self._unlink_lock_file()
            self._release()
            raise

    # -- opening -------------------------------------------------------

    def _open(self):
        if self.readonly:
            if not os.path.isdir(self.path):
                raise JournalError("no journal at %s (no such directory)"
                                   % self.path)
        else:
            self._make_dirs_and_lock()
        self._segments = self._all_segments()
        if not self._segments:
            if self.readonly:
                raise JournalError("no journal at %s (no segment files)"
                                   % self.path)
            self._create()
        if self._segments[-1] in self._archived:
            raise JournalError(
                "journal %s: its last segment is archived (%s); only"
                " segments before the last may be, since the last is the one"
                " appended to. Move it back into the journal directory,"
                " decompressed" % (self.path,
                                   self._archived[self._segments[-1]]))
        first = self._read_header(self._segments[0])
        self.identity_bytes = first.identity
        self.created = (self._pruned or {}).get("created", first.created)
        if self._new_identity not in (None, self.identity_bytes):
            raise JournalError(
                "journal %s is %s, not %s as asked" % (
                    self.path, self.identity,
                    uuid.UUID(bytes=self._new_identity)))
        self._open_tail()
        if not self.readonly:
            self._fd = self._io.open_append(
                self._segment_path(self._segments[-1]))

    def _make_dirs_and_lock(self, attempts=10):
        """Create the journal's directory if need be, and take its lock.

        A refused open of the same new journal in another process removes
        the directories it created once it let go of the lock; one that
        vanishes between here creating (or finding) it and locking is
        made again.
        """
        self._made_dir = []
        for attempt in range(attempts):
            try:
                made = self._make_dirs(self.path)
                # Directories an earlier attempt made and that are still
                # there are this open's too (parents first).
                self._made_dir = [d for d in self._made_dir
                                  if os.path.isdir(d) and d not in made]
                self._made_dir += made
                self._made_lock = not os.path.exists(
                    os.path.join(self.path, LOCK_NAME))
                self._lock = _take_lock(self.path)
                return
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise JournalError(
                        "journal %s: its directory keeps vanishing while"
                        " it is being opened (another process removing"
                        " it?)" % self.path) from None
                logger.debug("journal %s: its directory vanished while"
                             " being opened; making it again", self.path)

    def _make_dirs(self, path):
        """Create ``path`` and missing parents, syncing each new entry.

        A directory entry is durable only once its parent is synced: a
        journal whose directory vanishes in a power loss loses everything.
        Returns the directories created, parents first, so that a refused
        open can take all of them away again (:meth:`close_refused`).
        """
        if os.path.isdir(path):
            return []
        parent = os.path.dirname(path)
        made = self._make_dirs(parent)
        try:
            self._io.mkdir(path)
        except FileExistsError:
            return made
        self._io.sync_dir(parent)
        return made + [path]

    def _list_segments(self):
        """First seqs of the segments in the journal directory itself.

        For code that opens segment files by path (a follower keeping its
        place in the last segments): an archived segment is not one, and
        is left out as if it were gone.
        """
        segs = self._all_segments()
        return [seq for seq in segs if seq not in self._archived]

    def _all_segments(self, cleanup=True):
        """First seqs of every segment, in the journal or in its archive.

        ``cleanup=False`` lists without removing leftovers: for a writer
        listing again after it opened, when a half-made segment may be
        its own rollover in progress.
        """
        found = []
        for name in os.listdir(self.path):
            seq = parse_segment_name(name)
            if seq is not None:
                found.append(seq)
            elif (name.endswith(".tmp") and not self.readonly and cleanup
                  and parse_segment_name(name[:-len(".tmp")]) is not None):
                # A segment whose creation was interrupted: never renamed,
                # so never part of the journal.  Only those: other .tmp
                # files (prune's pruned.json.tmp) belong to a process that
                # may be about to rename them.
                try:
                    self._io.remove(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
        self._pruned = read_prune_state(self.path)
        self._archive_dir = self._archive or archive_dir_of(self.path,
                                                            self._pruned)
        live = set(found)
        self._archived = {seq: p for seq, p in
                          list_archived(self._archive_dir).items()
                          if seq not in live}
        found.extend(self._archived)
        found.sort()
        return found

    def _start_seq(self, segs):
        """The first seq the journal holds on purpose: 1, unless prune
        removed the segments before its first one."""
        removed = (self._pruned or {}).get("removed_before", 1)
        if segs and 1 < segs[0] <= removed:
            return segs[0]
        return 1

    @property
    def prune_state(self):
        """What ``pruned.json`` said when the journal was last listed (a
        dict, empty when nothing was pruned)."""
        return dict(self._pruned or {})

    @property
    def start_seq(self):
        """The first seq still in the journal (above 1 once pruned)."""
        return self._start_seq(self._segments)

    def _create(self):
        identity = self._new_identity or uuid.uuid4().bytes
        header = encode_header(identity, 1, _time.time())
        try:
            self._install_segment(1, header)
            self._made_segment = True
            self._new_header_size = len(header)
        except OSError as e:
            raise JournalWriteError("could not create journal %s: %s"
                                    % (self.path, e)) from e
        logger.info("created journal %s", self.path)

    def _install_segment(self, first_seq, header):
        final = self._segment_path(first_seq)
        tmp = final + ".tmp"
        self._io.create(tmp, header)
        self._io.rename(tmp, final)
        self._io.sync_dir(self.path)
        self._segments.append(first_seq)

    def _segment_path(self, first_seq):
        archived = self._archived.get(first_seq)
        if archived is not None:
            return archived
        return os.path.join(self.path, segment_name(first_seq))

    def _open_segment(self, first_seq):
        """Open a segment for reading, wherever it is; return (file, path).

        The journal directory comes first, then the archive: a segment
        being archived right now exists in one place or both, the archive
        being complete before the original goes.
        """
        live = os.path.join(self.path, segment_name(first_seq))
        try:
            return open(live, "rb"), live
        except FileNotFoundError:
            pass
        archived = os.path.join(self._archive_dir, archived_name(first_seq))
        try:
            return gzip.open(archived, "rb"), archived
        except FileNotFoundError:
            pass
        state = read_prune_state(self.path) or {}
        if state.get("removed_before", 1) > first_seq:
            raise JournalPrunedError(self.path, state["removed_before"],
                                     first_seq, state.get("covered_by"))
        raise CorruptJournalError(live, 0, first_seq, "the segment file is"
                                  " missing (neither in the journal nor in"
                                  " its archive %s)" % self._archive_dir)

    def _read_header(self, first_seq, f=None):
        """Read and check a segment's header (from ``f`` if given)."""
        path = self._segment_path(first_seq)
        if f is None:
            f, path = self._open_segment(first_seq)
            with f:
                return self._read_header(first_seq, f)
        with _archive_errors(path):
            data = f.read(SEGMENT_HEADER_SIZE)
        header = decode_header(data, path)
        if header.first_seq != first_seq:
            raise CorruptJournalError(
                path, 0, first_seq, "segment header says it starts at seq %d"
                % header.first_seq)
        identity = getattr(self, "identity_bytes", header.identity)
        if header.identity != identity:
            raise CorruptJournalError(
                path, 0, first_seq, "segment belongs to journal %s, but the"
                " first segment, %s, says the journal is %s; one of the two"
                " is from another journal"
                % (uuid.UUID(bytes=header.identity),
                   segment_name(self._segments[0]), self.identity))
        return header

    def _open_tail(self):
        first_seq = self._segments[-1]
        header = self._read_header(first_seq)
        path = self._segment_path(first_seq)
        size = os.path.getsize(path)
        self._header_size = header.size
        found = self._tail_from_end(path, header, size)
        if found is None:
            found = self._tail_by_scan(path, header, size)
        self.last_seq, self._end, last = found
        if last is not None:
            self.head = record_hash(last)
            self._check_key(last, path)

    def _check_key(self, record, path):
        """A writer with a key must hold the key that signed the journal.

        Checked on the last record only (verify checks them all): it
        catches the mistyped or rotated key before records signed with
        two keys are mixed.
        """
        if not self.readonly:
            check_writer_key(self._key, record, self.path, self.last_seq,
                             path)

    def _tail_from_end(self, path, header, size):
        """Find the last record from the end; None unless the tail is clean.

        Walks back from the end of the file, through the trailing lengths,
        over the whole last transaction and the record before it: each
        must validate, span exactly to the next, and carry the seq before
        the next one's; the last must end a transaction, and the walk must
        stop at an earlier transaction's end or at the header.  That costs
        one transaction's reading, and proves the tail needs no repair.
        Anything else returns None, and the segment is scanned.
        """
        if size == header.size:
            last = self._check_previous_end(header.first_seq)
            return header.first_seq - 1, size, last
        return self._last_transaction_end(path, header, size)

    def _last_transaction_end(self, path, header, size):
        """``(last_seq, size, last record)`` if a segment ends with a whole,
        valid transaction (see _tail_from_end), else None."""
        window = TAIL_WINDOW
        while True:
            window = min(size - header.size, window)
            found = self._walk_back(path, header, size, window)
            if found != "more" or window == size - header.size:
                return None if found == "more" else found
            # The last transaction is larger than what was read: read
            # more of it, not the whole segment.
            window *= 8

    def _walk_back(self, path, header, size, window):
        """Walk back over the last ``window`` bytes; see _tail_from_end.

        Returns ``(last_seq, size, last record's bytes)``, None (scan the
        segment), or "more" when the walk needs bytes before the window.
        """
        with open(path, "rb") as f:
            f.seek(size - window)
            data = f.read(window)
        base = size - window  # file offset of data[0]
        end = len(data)
        last_seq = next_seq = last = None
        while True:
            if end < RECORD_HEAD_SIZE + TRAILER.size:
                if base + end != header.size:
                    return "more" if base > header.size else None
                # The walk reached the header: the segment's first record
                # must be the one it names.
                if next_seq is None or next_seq != header.first_seq:
                    return None
                return last_seq, size, last
            (n,) = TRAILER.unpack_from(data, end - TRAILER.size)
            start = end - n - 12
            if start < 0:
                if base > header.size and 0 < n <= MAX_BODY_SIZE:
                    return "more"
                return None
            try:
                if check_record(data, start) != end - start:
                    return None
            except BadRecord:
                return None
            _, _, seq, _, flags, _, _, _, _ = RECORD_HEAD.unpack_from(
                data, start)
            if next_seq is None:
                if not flags & FLAG_END:
                    return None  # an unfinished transaction at the end
                last_seq = seq
                last = data[start:end]
            elif seq != next_seq - 1:
                return None
            elif flags & FLAG_END:
                return last_seq, size, last  # the previous transaction's end
            next_seq = seq
            end = start

    def _check_previous_end(self, first_seq):
        """An empty last segment must follow its predecessor's last record.

        Returns that record's bytes (None for a new journal).

        A segment is only ever started right after the previous one's last
        record, so an empty one named otherwise means lost records (or a
        stray file); without this check, the journal would go on from a
        sequence number nobody wrote.
        """
        if len(self._segments) < 2:
            if first_seq == 1:
                return None
            state = self._pruned or {}
            if first_seq == state.get("removed_before") and state.get(
                    "removed_head"):
                # Pruned down to an empty segment: the chain goes on from
                # the last removed record, which the state remembers.
                self.head = bytes.fromhex(state["removed_head"])
                return None
            raise CorruptJournalError(
                self._segment_path(first_seq), 0, 1,
                "the only segment starts at seq %d" % first_seq)
        previous = self._segments[-2]
        path = self._segment_path(previous)
        found = None
        if previous in self._archived:
            found = self._archived_end(previous)
        else:
            try:
                size = os.path.getsize(path)
                if size > SEGMENT_HEADER_SIZE:
                    found = self._last_transaction_end(
                        path, self._read_header(previous), size)
            except FileNotFoundError:
                # A prune running beside us archived it since the listing
                # (it takes no writer lock): read its end in the archive.
                found = self._archived_end(previous)
        last = None if found is None else found[0]
        if last != first_seq - 1:
            raise CorruptJournalError(
                self._segment_path(first_seq), 0,
                first_seq if last is None else last + 1,
                "the last segment is empty and starts at seq %d, but the"
                " segment before it, %s, ends at %s" % (
                    first_seq, segment_name(previous),
                    "an unreadable record" if last is None else
                    "seq %d" % last))
        return found[2]

    def _archived_end(self, first_seq):
        """``(last_seq, None, last record)`` of an archived segment, read
        through (a gzip file cannot be walked back from its end)."""
        last = None
        for last in self._read_segment(first_seq, first_seq, float("inf"),
                                       False):
            pass
        return None if last is None else (last.seq, None, last.encoded())

    def _tail_by_scan(self, path, header, size):
        """Scan the last segment forward; cut (or report) a torn tail."""
        with open(path, "rb") as f:
            f.seek(header.size)
            buf = f.read()
        pos = 0
        expected = header.first_seq
        boundary, boundary_seq = 0, expected - 1
        last_start = None
        reason = None
        while pos < len(buf):
            try:
                size = check_record(buf, pos, expected)
            except BadRecord as e:
                if e.misplaced:
                    raise CorruptJournalError(
                        path, header.size + pos, expected, e.reason)
                reason = e.reason
                break
            flags = buf[pos + FLAGS_OFFSET]
            if flags & FLAG_END:
                last_start = pos
            pos += size
            if flags & FLAG_END:
                boundary, boundary_seq = pos, expected
            expected += 1
        last = None if last_start is None else buf[last_start:boundary]
        if last is None and boundary_seq == header.first_seq - 1:
            last = self._check_previous_end(header.first_seq)
        if reason is None and boundary == len(buf):
            return boundary_seq, header.size + boundary, last
        if reason is not None:
            later = find_valid_record(buf, pos, expected)
            if later is not None:
                raise CorruptJournalError(
                    path, header.size + pos, expected,
                    "%s, and a valid record follows at offset %d"
                    % (reason, header.size + later))
        else:
            reason = "transaction without its last record"
        torn = TornTail(path, header.size + boundary, len(buf) - boundary,
                        reason)
        if not self.readonly:
            self._cut(torn, buf[boundary:])
        else:
            logger.info("journal %s has an incomplete tail at offset %d"
                        " (%d bytes: %s); a writer will cut it when it opens",
                        path, torn.offset, torn.size, reason)
        self.torn_tail = torn
        return boundary_seq, torn.offset, last

    def _cut(self, torn, data):
        """Keep the torn bytes aside, then truncate them away."""
        torn.saved_as = _aside_name(torn.path, torn.offset, data)
        if not os.path.exists(torn.saved_as):
            self._io.create(torn.saved_as, data)
            self._io.sync_dir(self.path)
        faults.point("repair.after-save")
        fd = self._io.open_append(torn.path)
        try:
            self._io.truncate(fd, torn.offset)
            self._io.sync(fd)
        finally:
            self._io.close(fd)
        self._cut_now = torn
        logger.warning(
            "journal %s: cut a torn tail of %d bytes at offset %d (%s);"
            " the bytes are kept in %s", torn.path, torn.size, torn.offset,
            torn.reason, torn.saved_as)

    # -- writing -------------------------------------------------------

    @property
    def identity(self):
        return str(uuid.UUID(bytes=self.identity_bytes))

    def tail(self):
        """``(last_seq, head)``, as one consistent pair."""
        with self._append_lock:
            return self.last_seq, self.head

    def prepare(self, items, prev=None):
        """Encode one transaction's records into a :class:`Batch`.

        ``items`` are ``(seq, time, version, name, payload)`` or ``(seq,
        time, version, name, payload, flags, metadata)`` tuples (``flags``
        0 or FLAG_QUERY, ``metadata`` a JSON-able dict or None).  The
        records are chained after ``prev``, by default the journal's head
        now; :meth:`append` refuses the batch if the journal has moved on.
        """
        first = check_transaction(self.path, items)
        if prev is None:
            prev = self.head
        data, head = encode_chain(_checked(items), prev, self._key)
        return Batch(first, items[-1][0], prev, head, data)

    def append(self, items):
        """Durably append one transaction's records.

        ``items`` is a :class:`Batch` from :meth:`prepare`, or what
        :meth:`prepare` takes.  See
        :class:`~zjournal.interfaces.IJournal`.
        """
        if self.readonly:
            raise ReadOnlyJournalError("journal %s is open read-only"
                                       % self.path)
        with self._append_lock:
            if self._closed:
                raise JournalError("journal %s is closed" % self.path)
            if self._failed is not None:
                raise JournalFailedError(self.path, self._failed)
            batch = items if isinstance(items, Batch) else None
            first = batch.first if batch is not None else items[0][0]
            if first != self.last_seq + 1:
                raise JournalSequenceError(
                    "journal %s ends at seq %d, cannot append seq %d"
                    % (self.path, self.last_seq, first))
            if batch is None:
                batch = self.prepare(items)
            elif batch.prev != self.head:
                raise JournalSequenceError(
                    "journal %s: seq %d was chained after another record"
                    " than the journal's last one" % (self.path, first))
            if self._end >= self.segment_size and (
                    self._end > self._header_size):
                # (A segment that holds no record yet is never rolled:
                # it would be replaced by a segment of the same name.)
                self._roll(first)
            self._write(batch.data)
            faults.point("append.after-write")
            if self.fsync != "never":
                self._sync()
            self._end += len(batch.data)
            self.last_seq = batch.last
            self.head = batch.head
        return batch

    def sync(self):
        """Make every appended record durable now.

        For bulk loads under ``fsync="never"``: one sync at the end instead
        of one per transaction.  A failure is fail-stop, as in append.
        """
        with self._append_lock:
            if self._failed is not None:
                raise JournalFailedError(self.path, self._failed)
            if self._fd is not None:
                self._sync()

    def _write(self, data):
        try:
            self._io.write(self._fd, data)
        except OSError as e:
            self._failed = e
            # Leave nothing half-written: a partial record would be read
            # as a torn tail, but only after a reopen.
            try:
                self._io.truncate(self._fd, self._end)
                self._io.sync(self._fd)
            except OSError:
                logger.exception("journal %s: could not cut back a failed"
                                 " write; reopening will cut it", self.path)
            raise JournalWriteError(
                "journal %s: write failed (%s); the records were not"
                " journaled" % (self.path, e)) from e

    def _sync(self):
        try:
            self._io.sync(self._fd)
        except OSError as e:
            self._failed = e
            raise OutcomeUnknownError(
                "journal %s: fsync failed (%s); whether the last transaction"
                " is durable is unknown. Reopen the journal: recovery will"
                " apply it if the journal holds it" % (self.path, e)) from e

    def _roll(self, first_seq):
        """Close the current segment and start one named ``first_seq``."""
        try:
            # Under "never" the old segment may hold unsynced records; a
            # later segment must never exist beside a torn earlier one.
            self._io.sync(self._fd)
            self._install_segment(first_seq, encode_header(
                self.identity_bytes, first_seq, _time.time()))
            faults.point("roll.after-create")
            old, self._fd = self._fd, None
            self._io.close(old)
            self._fd = self._io.open_append(self._segment_path(first_seq))
        except OSError as e:
            self._failed = e
            raise JournalWriteError(
                "journal %s: could not start segment %s (%s)"
                % (self.path, segment_name(first_seq), e)) from e
        self._end = self._header_size = SEGMENT_HEADER_SIZE
        logger.info("journal %s: started segment %s", self.path,
                    segment_name(first_seq))

    # -- reading -------------------------------------------------------

    @property
    def first_seq(self):
        return self._segments[0]

    def segments(self):
        """Paths of the segment files, oldest first."""
        return [self._segment_path(s) for s in self._segments]

    def segment_layout(self):
        """``(first_seq, path, archived)`` of every segment, oldest first,
        as the directory holds them now (what pruning plans with)."""
        segs = self._all_segments() if self.readonly else list(self._segments)
        return [(seq, self._segment_path(seq), seq in self._archived)
                for seq in segs]

    @property
    def archive_dir(self):
        """Where archived segments are (whether or not there are any)."""
        return self._archive_dir

    def entries(self, start=1, stop=None):
        """Yield entries with ``start <= seq < stop``, oldest first.

        A writer yields what was durable when the iteration started; a
        read-only journal reads on to the last complete transaction it
        finds, so a follower sees what a writer appends meanwhile.
        """
        if stop is None:
            stop = self.last_seq + 1 if not self.readonly else float("inf")
        elif not self.readonly:
            stop = min(stop, self.last_seq + 1)
        start = max(start, 1)
        if start >= stop:
            return
        segs = self._all_segments() if self.readonly else list(self._segments)
        first = self._start_seq(segs)
        if start < first:
            raise JournalPrunedError(self.path, first, start,
                                     (self._pruned or {}).get("covered_by"))
        if start < segs[0]:
            raise CorruptJournalError(
                self._segment_path(segs[0]), 0, start,
                "the journal starts at seq %d: seq %d..%d are missing"
                % (segs[0], start, segs[0] - 1))
        i = max(bisect.bisect_right(segs, start) - 1, 0)
        expected = segs[i]
        for j in range(i, len(segs)):
            _check_continuity(self._segment_path(segs[j]), segs[j], expected)
            expected = yield from self._read_segment(
                segs[j], start, stop, j == len(segs) - 1)
            if expected is None:  # reached stop, or an incomplete tail
                return

    def _read_segment(self, first_seq, start, stop, is_last, report=None,
                      build=True):
        f, path = self._open_segment(first_seq)
        with f, _archive_errors(path):
            header = self._read_header(first_seq, f)
            f.seek(header.size)
            return (yield from _scan(f, path, header.size, first_seq, start,
                                     stop, is_last and self.readonly, report,
                                     build, self._key))

    def verify(self):
        """Read and check every record; return a report.

        The report is a :class:`~zjournal.journal.ScanReport`.

        Raises :class:`~zjournal.errors.CorruptJournalError` at the first
        damage, :class:`~zjournal.errors.TamperedJournalError` (one of
        them) where the hash chain breaks, and with a key where a
        signature is wrong or missing.  Records written before signing was
        turned on are counted in ``report.unsigned``; a journal with a key
        and no signed record at all fails.  A torn tail is reported in
        ``report.torn_tail``.
        """
        report = ScanReport()
        began = _time.perf_counter()
        segs = self._listed_now()
        stop = float("inf") if self.readonly else self.last_seq + 1
        expected = self._start_seq(segs)
        if expected > 1:
            report.head = self._pruned_prev(segs[0])
        for j, first_seq in enumerate(segs):
            path = self._segment_path(first_seq)
            _check_continuity(path, first_seq, expected)
            report.segments += 1
            report.bytes += _size(path, self._archive_dir)
            checker = self._read_segment(first_seq, 1, stop,
                                         j == len(segs) - 1, report,
                                         build=False)
            try:
                next(checker)  # it yields nothing: this runs it through
            except StopIteration as done:
                expected = done.value
            if expected > first_seq:
                report.records += expected - first_seq
                if report.first_seq is None:
                    report.first_seq = first_seq
                report.last_seq = expected - 1
        report.seconds = _time.perf_counter() - began
        if self._key is not None and report.records and not report.signed:
            raise TamperedJournalError(
                self._segment_path(segs[0]), SEGMENT_HEADER_SIZE, 1,
                "a signing key was given but every record is unsigned: the"
                " signatures were stripped, or the journal was never signed")
        return report

    def _pruned_prev(self, first_seq):
        """The chain hash a pruned journal's first record must follow.

        The first record's own ``prev`` is all there is to go on; when
        the state remembers the last removed record's hash, the two must
        agree, or the first segment is not the one the prune left.
        """
        f, path = self._open_segment(first_seq)
        with f, _archive_errors(path):
            header = self._read_header(first_seq, f)
            f.seek(header.size)
            head = f.read(RECORD_HEAD_SIZE)
        state = self._pruned or {}
        known = state.get("removed_head")
        known = (bytes.fromhex(known) if known and state.get(
            "removed_before") == first_seq else None)
        if len(head) < RECORD_HEAD_SIZE:
            return known if known is not None else GENESIS
        prev = RECORD_HEAD.unpack_from(head)[8]
        if known is not None and prev != known:
            raise TamperedJournalError(
                path, header.size, first_seq, "the first record after the"
                " pruned ones does not follow the last pruned record (the"
                " chain hash differs from the one %s remembers)"
                % PRUNE_STATE)
        return prev

    def _listed_now(self):
        """The segments as the directory holds them now.

        A prune run by another process (``zodb-journal prune --remove``)
        may have removed or archived segments since this journal was
        opened: a summary or a check must not look for them where they
        were.  A writer lists no segment past its own last one.
        """
        segs = self._all_segments(cleanup=False)
        if not self.readonly:
            segs = [seq for seq in segs if seq <= self._segments[-1]]
        return segs

    def info(self):
        """A summary for operators; reads only headers and the tail."""
        listed = self._listed_now()
        segs = [self._segment_path(seq) for seq in listed]
        start = self._start_seq(listed)
        return {
            "start_seq": start,
            "pruned_before": start if start > 1 else None,
            "archived_segments": len(self._archived),
            "archive": self._archive_dir if self._archived else None,
            "path": self.path,
            "identity": self.identity,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "segments": len(segs),
            "first_seq": listed[0],
            "last_seq": self.last_seq,
            "bytes": sum(_size(p, self._archive_dir) for p in segs),
            "torn_tail": None if self.torn_tail is None else {
                "file": self.torn_tail.path, "offset": self.torn_tail.offset,
                "bytes": self.torn_tail.size, "reason": self.torn_tail.reason,
                "saved_as": self.torn_tail.saved_as},
            "writer_active": writer_active(self.path) if self.readonly
            else True,
        }

    # -- closing -------------------------------------------------------

    def close(self):
        """Close the segment and release the writer lock.  Idempotent."""
        with self._append_lock:
            self._closed = True
            self._release()

    def _release(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._io.close(fd)
            except OSError:
                logger.exception("journal %s: error closing segment",
                                 self.path)
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.close()

    def close_refused(self):
        """Close after a refusal, leaving the disk as this open found it.

        A refusal must change nothing on disk: a tail this open cut is put
        back (it may hold acknowledged records that were damaged, which an
        operator must see where they were), and a journal this open
        created, still empty, is taken away again (an application pointed
        at a mistyped path).
        """
        with self._append_lock:
            self._closed = True
            removed = False
            try:
                if self._cut_now is not None:
                    self._restore_tail()
                # Decided and done while the writer lock is held: once it
                # is released another process may open this (valid, empty)
                # journal and commit to it, and nothing of it may be
                # removed from then on.
                removed = self._remove_new_journal()
            finally:
                self._release()
            if removed:
                self._remove_made_dirs()

    def _restore_tail(self):
        torn, self._cut_now = self._cut_now, None
        with open(torn.saved_as, "rb") as f:
            data = f.read()
        fd = self._io.open_append(torn.path)
        try:
            if os.fstat(fd).st_size == torn.offset:
                self._io.write(fd, data)
                self._io.sync(fd)
        finally:
            self._io.close(fd)
        self._io.remove(torn.saved_as)
        self._io.sync_dir(self.path)
        logger.info("journal %s: put the %d bytes cut at offset %d back",
                    torn.path, torn.size, torn.offset)

    def _remove_new_journal(self):
        """Take away the segment and lock file this open created, if the
        segment still holds nothing but its header; return whether it did.

        Called with the writer lock held, so no other writer can append
        meanwhile.  The size is taken from the descriptor and checked to
        be the file at the segment's name: what was written matters, not
        what this object believes it wrote.
        """
        if not self._made_segment or self._lock is None or self.last_seq:
            return False
        path = os.path.join(self.path, segment_name(1))
        try:
            on_disk = os.stat(path)
            mine = os.fstat(self._fd) if self._fd is not None else on_disk
        except OSError:
            return False
        if ((on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)
                or mine.st_size > self._new_header_size):
            logger.warning("journal %s: not removing the new journal, its"
                           " first segment is no longer empty", self.path)
            return False
        try:
            os.remove(path)
        except OSError:
            return False
        if self._made_lock:
            self._unlink_lock_file()
        return True

    def _unlink_lock_file(self):
        """Unlink the lock file; only ever while holding the lock on it.

        A process that opened the file before this unlink and locks it
        after our release holds a lock on a file that no longer has a
        name, while a third process may create and lock a new one:
        :func:`_take_lock` notices that (the locked file is not the one
        at the lock's name) and tries again on the new file.  Unlinking
        after the release instead could remove a lock file another
        writer has just locked, leaving the next opener free to lock a
        fresh one beside it.
        """
        try:
            os.remove(os.path.join(self.path, LOCK_NAME))
        except OSError:
            pass

    def _remove_made_dirs(self):
        # The directory, and the parents the open created for it (a
        # mistyped "var/journal" makes "var" too), deepest first.  Safe
        # after the lock is released: rmdir fails on a directory something
        # else has put files in since, and that one stays.
        for path in reversed(self._made_dir or []):
            try:
                os.rmdir(path)
            except OSError:
                return

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<FileJournal %s last_seq=%s%s>" % (
            self.path, getattr(self, "last_seq", "?"),
            " readonly" if self.readonly else "")


def _size(path, archive_dir):
    """A segment's size on disk, found in the archive if it was archived
    since it was listed."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        pass
    try:
        return os.path.getsize(os.path.join(
            archive_dir, os.path.basename(path) + ARCHIVE_SUFFIX))
    except FileNotFoundError:
        raise JournalError(
            "segment %s went away while the journal was being read (a prune"
            " running now?): try again" % path) from None


@contextlib.contextmanager
def _archive_errors(path):
    """Report an archived segment that does not decompress as damage."""
    if not path.endswith(ARCHIVE_SUFFIX):
        yield
        return
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptJournalError(
            path, 0, None, "the archived segment does not decompress (%s):"
            " restore it from a backup of the archive" % e) from e


def _check_continuity(path, first_seq, expected):
    if first_seq != expected:
        what = ("the journal must start at seq 1" if expected == 1 else
                "the previous segment ends at seq %d" % (expected - 1))
        raise CorruptJournalError(
            path, 0, expected, "segment starts at seq %d, but %s: records"
            " are missing" % (first_seq, what))


def _scan(f, path, base, expected, start, stop, lenient_tail, report,
          build=True, key=None):
    """Yield validated entries of one open segment, read in chunks.

    Returns the sequence number the next segment must start with, or None
    when it stopped before the end of the segment.
    ``lenient_tail``: for a reader of the last segment, stop quietly at an
    incomplete tail (a writer may be in the middle of a write) unless a
    valid record follows it.

    This is the replay's inner loop: the checks of
    :func:`~zjournal.format.check_record` are inlined, and only a record
    that fails them goes through that function, to learn why.

    With ``build=False`` (verify) it checks without building entries and
    yields nothing; it returns the seq after the last whole transaction
    in every case, and the seqs being contiguous, that counts them.  It
    also checks the hash chain, from ``report.head`` on, and with a
    ``key`` every record's signature; ``report.head`` ends as the hash of
    the last whole transaction's last record.
    """
    last_end = expected - 1
    names = {}
    buf = b""
    view = memoryview(buf)
    pos = 0
    offset = base  # file offset of buf[0]
    held = []  # records of a transaction whose END is not read yet
    eof = False
    unpack = RECORD_HEAD.unpack_from
    trailer = TRAILER.unpack_from
    crc32 = zlib.crc32
    make = tuple.__new__
    if not build:
        sha256 = hashlib.sha256
        chain = report.head
        signed = unsigned = queries = 0
        # Signatures are checked by the Python loop only.
        fast = _check_run if key is None else None
    else:
        fast = _read_run
    fast_stop = min(stop, _MAX_SEQ)
    if not (type(start) is int and 0 <= start <= _MAX_SEQ
            and expected < _C_SEQ_LIMIT):
        # Outside what the C loop's unsigned 64-bit seqs can hold: the
        # Python loop alone, which takes any int.
        fast = None
    while True:
        if not eof and len(buf) - pos < READ_CHUNK:
            chunk = f.read(READ_CHUNK)
            if chunk:
                buf = buf[pos:] + chunk
                view = memoryview(buf)
                offset += pos
                pos = 0
            else:
                eof = True
        size = len(buf)
        if not build and fast is not None:
            # The C loop runs the happy path; the loop below takes over
            # at the first record it stops at (see zjournal._speedups).
            (pos, expected, chain, end_pos, end_seq, end_chain, held_pos,
             held_seq, s_done, u_done, q_done, signed, unsigned,
             queries) = fast(buf, pos, expected, fast_stop, chain, signed,
                             unsigned, queries)
            if end_pos >= 0:
                last_end = end_seq
                report.head = end_chain
                report.signed += s_done
                report.unsigned += u_done
                report.queries += q_done
                del held[:]
                if end_seq + 1 >= stop:
                    return end_seq + 1
            if held_pos >= 0 and not held:
                held.append(make(Entry, (held_seq, 0.0, 0, 0, "", b"",
                                         offset + held_pos, 0, GENESIS,
                                         None, None)))
        elif fast is not None and not held:
            # Whole transactions in C; the loop below reads what it
            # leaves (a transaction split across reads, or damage).
            pos, expected, got, reached = fast(
                buf, pos, expected, max(start, 0), fast_stop, offset, names,
                Entry)
            yield from got
            if reached:
                return None
        while pos + RECORD_HEAD_SIZE <= size:
            (crc, n, seq, t, flags, reserved, version, k,
             prev) = unpack(buf, pos)
            end = pos + 8 + n
            if (end + 4 > size or seq != expected or flags & ~KNOWN_FLAGS
                    or reserved or k > n - BODY_HEAD_SIZE
                    or k > MAX_NAME_SIZE or n > MAX_BODY_SIZE
                    or crc32(view[pos + 4:end]) != crc
                    or trailer(buf, end)[0] != n):
                break
            if flags & FLAGS_EXTRA:
                extras = _extras(buf, pos, n, k, flags)
                if extras is None:
                    break
                at, stop_at, meta, mac = extras
            else:
                at, stop_at, meta, mac = pos + RECORD_HEAD_SIZE + k, end, None, None
            if not build:
                if prev != chain:
                    raise TamperedJournalError(
                        path, offset + pos, seq, "the hash chain is broken:"
                        " this record follows another record than the one"
                        " before it (records edited, deleted, inserted or"
                        " reordered)")
                chain = sha256(view[pos + 4:end]).digest()[:HASH_SIZE]
                if mac is not None:
                    signed += 1
                    if key is not None and sign(
                            key, view[pos + 4:end - MAC_SIZE]) != mac:
                        raise TamperedJournalError(
                            path, offset + pos, seq, "bad signature: the"
                            " record was changed or signed with another"
                            " key")
                else:
                    unsigned += 1
                    if key is not None and signed + report.signed:
                        # Signing, once on, is never turned off: an
                        # unsigned record after a signed one had its
                        # signature stripped.
                        raise TamperedJournalError(
                            path, offset + pos, seq, "unsigned record after"
                            " signed ones (a signature was stripped)")
                if flags & FLAG_QUERY:
                    queries += 1
                if flags & FLAG_END:
                    last_end = seq
                    report.signed += signed
                    report.unsigned += unsigned
                    report.queries += queries
                    signed = unsigned = queries = 0
                    report.head = chain
                    del held[:]
                    if seq + 1 >= stop:
                        return seq + 1
                else:
                    held.append(make(Entry, (seq, t, flags, version, "", b"",
                                             offset + pos, n + 12, prev,
                                             None, None)))
                pos = end + 4
                expected += 1
                continue
            name_at = pos + RECORD_HEAD_SIZE
            raw = buf[name_at:name_at + k]
            name = names.get(raw)
            if name is None:
                name = names[raw] = raw.decode("utf-8", "replace")
            entry = make(Entry, (seq, t, flags, version, name,
                                 buf[at:stop_at], offset + pos, n + 12,
                                 prev, meta, mac))
            pos = end + 4
            expected += 1
            if not flags & FLAG_END:
                held.append(entry)
                continue
            if held:
                # A transaction is yielded only once it is known complete.
                held.append(entry)
                for h in held:
                    if start <= h[0] < stop:
                        yield h
                del held[:]
            elif start <= seq:
                yield entry
            if seq + 1 >= stop:
                return None
        if pos + RECORD_HEAD_SIZE > size:
            if not eof:
                continue  # less than a record header left: read on
            if pos >= size:
                break  # the clean end of the segment
        # A record failed a check or needs more bytes: learn which.
        try:
            check_record(buf, pos, expected)
        except BadRecord as e:
            if e.truncated and not eof:
                # A record larger than what the buffer holds.
                more = f.read(max(READ_CHUNK, 1 << 20))
                if more:
                    buf = buf[pos:] + more
                    view = memoryview(buf)
                    offset += pos
                    pos = 0
                    continue
                eof = True
            _bad_tail(f, path, buf, pos, offset, expected, e, lenient_tail,
                      report, held)
            return None if build else last_end + 1
        raise AssertionError("record at %s:%d passed check_record but not"
                             " the scan" % (path, offset + pos))
    if held:
        # The segment ends inside a transaction.
        _bad_tail(f, path, buf, pos, offset, expected,
                  BadRecord("transaction without its last record", True),
                  lenient_tail, report, held)
        return last_end + 1 if not build else expected
    return expected


def _bad_tail(f, path, buf, pos, offset, expected, err, lenient_tail,
              report, held):
    """Decide what an invalid record at ``buf[pos]`` is, and act on it.

    A record cut short by the end of the file is judged on the bytes read
    so far: bytes below the end of the file never change, but a writer
    may be appending right now, and what it appends after the moment the
    end was read must not make a write in progress look like damage.
    """
    if err.misplaced:
        raise CorruptJournalError(path, offset + pos, expected, err.reason)
    rest = buf[pos:] if err.truncated else buf[pos:] + f.read()
    later = None if not rest else find_valid_record(rest, 0, expected)
    at = held[0][6] if held else offset + pos
    seq = held[0][0] if held else expected
    if later is None and lenient_tail:
        size = offset + pos + len(rest) - at
        logger.debug("%s: stopping at an incomplete tail at offset %d", path,
                     at)
        if report is not None:
            report.torn_tail = TornTail(path, at, size, err.reason)
        return
    if later is not None:
        # Name the damaged record itself, not the start of its transaction.
        at, seq = offset + pos, expected
        reason = "%s, and a valid record follows at offset %d" % (
            err.reason, offset + pos + later)
    else:
        reason = err.reason
    raise CorruptJournalError(path, at, seq, reason)


def check_writer_key(key, record, path, seq, where=None):
    """Refuse a writer whose key does not fit the journal's last record.

    ``record`` is that record's bytes (seq ``seq``; ``where`` names the
    file holding it, if any).  Without a key, a signed journal is refused:
    unsigned records after signed ones are what stripping signatures
    leaves, and verify would report them forever.  With another key than
    the one that signed, it is refused before two keys' signatures mix.
    """
    flags = record[FLAGS_OFFSET]
    if key is None:
        if flags & FLAG_MAC:
            raise JournalKeyError(
                "journal %s is signed (its last record, seq %d, carries a"
                " signature), but no key was given; pass hmac_key or set %s"
                % (path, seq, HMAC_KEY_ENV))
        return
    if not flags & FLAG_MAC:
        logger.warning("journal %s: records up to seq %d were written"
                       " without a key; they are signed from now on",
                       path, seq)
        return
    body = memoryview(record)[4:-4 - MAC_SIZE]
    if sign(key, body) != record[-4 - MAC_SIZE:-4]:
        raise JournalKeyError(
            "journal %s: the last record (seq %d%s) was signed with another"
            " key than the one given; check the key (or the %s environment"
            " variable)" % (path, seq, "" if where is None else " in " + where,
                            HMAC_KEY_ENV))


def check_transaction(path, items):
    """The first seq of one transaction's items, whose seqs must be
    consecutive (every journal backend refuses anything else)."""
    if not items:
        raise ValueError("a transaction has at least one record")
    first = items[0][0]
    for i, item in enumerate(items):
        if item[0] != first + i:
            raise JournalSequenceError(
                "journal %s: the records of one transaction must have"
                " consecutive seqs, got %s" % (path, [it[0] for it in items]))
    return first


def _checked(items):
    """Encode names and metadata, refusing records a reader would not
    believe.

    A reader rejects a name over MAX_NAME_SIZE or a body over
    MAX_BODY_SIZE as damage; writing one would turn an acknowledged
    command into a "torn tail" at the next open.
    """
    out = []
    for item in items:
        if len(item) == 5:
            seq, t, version, name, payload = item
            flags, meta = 0, None
        else:
            seq, t, version, name, payload, flags, meta = item
            if flags & ~FLAG_QUERY:
                raise ValueError("flags may only hold FLAG_QUERY, not %#x"
                                 % flags)
            if meta is not None and not isinstance(meta, bytes):
                try:
                    meta = encode_meta(meta)
                except ValueError as e:
                    raise EncodeError("command %s: %s" % (name, e)) from e
        raw = name.encode("utf-8")
        if len(raw) > MAX_NAME_SIZE:
            raise EncodeError("command name of %d bytes is longer than %d"
                              % (len(raw), MAX_NAME_SIZE))
        extra = MAC_SIZE + (0 if meta is None else 4 + len(meta))
        if BODY_HEAD_SIZE + len(raw) + len(payload) + extra > MAX_BODY_SIZE:
            raise EncodeError("command %s: arguments of %d bytes exceed the"
                              " record limit of %d bytes"
                              % (name, len(payload), MAX_BODY_SIZE))
        out.append((seq, t, version, raw, payload, flags, meta))
    return out


def _aside_name(segment, offset, data):
    """A file name for torn bytes cut at ``offset`` that keeps older ones.

    The same offset can be torn twice (a retried transaction torn again);
    each cut keeps its own file.  An existing file with the same bytes is
    this very cut, interrupted before the truncation: it is reused.
    """
    base = "%s%s%d" % (segment, TORN_SUFFIX, offset)
    name, n = base, 0
    while os.path.exists(name):
        with open(name, "rb") as f:
            if f.read() == data:
                return name
        n += 1
        name = "%s.%d" % (base, n)
    return name


def _take_lock(path, attempts=10):
    """Lock the journal's lock file, the one that has its name now.

    A refused open of a new journal unlinks the lock file while holding
    the lock (:meth:`FileJournal._unlink_lock_file`).  A process that
    opened the old file just before then locks a file without a name,
    which would not keep out the next process to create and lock the
    name: a lock is kept only when the locked file is the one at the
    name, otherwise it is dropped and taken again.
    """
    lock_path = os.path.join(path, LOCK_NAME)
    for _ in range(attempts):
        try:
            lock = zc.lockfile.LockFile(
                lock_path, content_template="{pid} on {hostname}")
        except zc.lockfile.LockError:
            raise JournalLockedError(path, _lock_holder(lock_path)) from None
        if _is_named(lock, lock_path):
            return lock
        lock.close()
        logger.debug("journal %s: the lock file was replaced while being"
                     " locked; locking the new one", path)
    raise JournalLockedError(path, _lock_holder(lock_path))


def _is_named(lock, lock_path):
    fp = getattr(lock, "_fp", None)
    if fp is None:  # pragma: no cover (a zc.lockfile without _fp)
        return True
    try:
        held, named = os.fstat(fp.fileno()), os.stat(lock_path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _lock_holder(lock_path):
    try:
        with open(lock_path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return "process %s" % text if text else None


def writer_active(path):
    """Whether some process holds the journal's writer lock right now."""
    return lock_held(os.path.join(path, LOCK_NAME))


def lock_held(lock_path):
    """Whether some process holds the lock file ``lock_path`` (zc.lockfile)
    right now; None where it cannot be told.

    Asked without writing anything: a shared lock attempt on a read-only
    descriptor fails exactly while a writer holds the exclusive lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
