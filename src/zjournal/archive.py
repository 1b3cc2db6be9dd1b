"""Pruning: archive or remove the journal segments a backup covers.

``zodb-journal prune JOURNAL --covered-by BACKUP (--archive [DIR] |
--remove) [--yes] [--dry-run]`` reads the marker of BACKUP (a repozo
repository, a FileStorage file or a zodburi URI), checks that it belongs
to this journal and this history, and picks the segments wholly covered
by it: those whose last seq is at or below the marker's.  The last
segment (the one a writer appends to) is never picked, nor the one before
it while the last holds no record yet.  The command prints the plan and
what it means for a later rebuild, and acts only with ``--yes`` (or a
"y" typed at a terminal).

``--archive`` compresses each picked segment into ``<segment>.gz`` (plain
gzip: ``zcat`` gives back the segment's exact bytes) in DIR, by default
the journal's ``archive/`` subdirectory.  :class:`~zjournal.FileJournal`
reads archived segments transparently, so rebuild, verify, dump and stats
work as before; an archive elsewhere than ``archive/`` is recorded in the
journal's ``pruned.json`` and found through it.  A journal has one
archive, since readers look in one place: DIR may differ from the
recorded one only while neither holds an archived segment.
``--remove`` deletes the picked segments (and their archived copies):
the journal then starts at a later seq, ``pruned.json`` says so on
purpose, and a ZODB can only be restored from that backup or a later
one.

Each segment is archived so that a crash at any moment leaves either the
original or a complete archive, and never neither:

1. write ``<segment>.gz.tmp`` and fsync it;
2. decompress it and compare with the original, byte for byte;
3. rename it to ``<segment>.gz`` and fsync the archive directory;
4. remove the original and fsync the journal directory.

A reader prefers the original while both exist; a ``.tmp`` is never read,
and the next prune removes it.  Removal writes ``pruned.json`` (fsynced,
renamed into place) before deleting anything, oldest segment first, so a
journal interrupted halfway starts at a segment boundary that the state
file allows.

Pruning is safe beside a running writer without taking its lock: a
writer only appends to the last segment and creates new ones, so the
segments pruned are never written again, and a reader that lists a
segment just before it moves into the archive finds it there.  Two
prunes at once are kept apart by ``prune.lock``.
"""
import gzip
import json
import logging
import os
import sys
import time
import urllib.parse

import zc.lockfile

from zjournal import cli
from zjournal import faults
from zjournal.cli import CLIError
from zjournal.cli import EXIT_FAILURE
from zjournal.cli import EXIT_OK
from zjournal.errors import HistoryMismatchError
from zjournal.errors import PruneError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZODBAheadError
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.format import segment_name
from zjournal.journal import ARCHIVE_DIR
from zjournal.journal import ARCHIVE_SUFFIX
from zjournal.journal import FILE_MODE
from zjournal.journal import PRUNE_STATE
from zjournal.journal import FileJournal
from zjournal.journal import archive_dir_of
from zjournal.journal import list_archived
from zjournal.journal import lock_held
from zjournal.journal import read_prune_state
from zjournal.journal import sync_dir

logger = logging.getLogger(__name__)

PRUNE_LOCK = "prune.lock"
CHUNK = 1 << 20


class Segment:
    """One segment a plan picked."""

    def __init__(self, first, last, path, archived):
        self.first = first
        self.last = last
        self.path = path
        self.archived = archived
        self.size = os.path.getsize(path)

    @property
    def name(self):
        return segment_name(self.first)


class Plan:
    """What a prune will do, and what a later rebuild will need."""

    def __init__(self, journal, covered_seq, covered_by, action,
                 archive_dir, segments, kept_from):
        self.journal = journal        # the FileJournal (read-only)
        self.covered_seq = covered_seq
        self.covered_by = covered_by
        self.action = action          # "archive" or "remove"
        self.archive_dir = archive_dir
        self.segments = segments      # [Segment], oldest first
        self.kept_from = kept_from    # first seq left in the journal dir

    def describe(self):
        """The lines printed before acting."""
        j = self.journal
        lines = ["journal %s (%s): seq %d..%d; backup %s is at seq %d"
                 % (j.path, j.identity, j.start_seq, j.last_seq,
                    self.covered_by, self.covered_seq)]
        if not self.segments:
            lines.append("nothing to prune: no segment before the last one"
                         " ends at or before seq %d" % self.covered_seq)
            return lines
        total = sum(s.size for s in self.segments)
        verb = ("archive into %s" % self.archive_dir
                if self.action == "archive" else "REMOVE")
        lines.append("will %s %d segments, seq %d..%d (%s bytes):" % (
            verb, len(self.segments), self.segments[0].first,
            self.segments[-1].last, format(total, ",")))
        for s in self.segments:
            lines.append("  %s  seq %d..%d  %s bytes%s" % (
                os.path.basename(s.path), s.first, s.last,
                format(s.size, ","), "  (archived)" if s.archived else ""))
        lines.append("the segments from seq %d on stay where they are"
                     % self.kept_from)
        if self.action == "archive":
            lines.append(
                "consequence: after this, a rebuild from seq 1 needs the"
                " archive at %s; zjournal reads it there by itself. Keep it"
                " with the journal and back it up as carefully"
                % self.archive_dir)
        else:
            lines.append(
                "consequence: after removal, the ZODB can only be rebuilt"
                " from that backup (seq %d) or a later one, with zodb-journal"
                " restore; rebuild from scratch is no longer possible, and"
                " seq %d..%d are gone from the journal for good"
                % (self.covered_seq, self.segments[0].first,
                   self.segments[-1].last))
            lines.append(
                "consequence: zodb-journal check-replay, and replay or"
                " rebuild from seq 1, stop working on this journal: they"
                " need every record from seq 1 (archive instead of removing"
                " to keep them)")
        return lines


def add_subcommands(sub):
    p = sub.add_parser(
        "prune", help="archive or remove the journal segments a backup"
        " covers")
    cli.journal_argument(p, help="a journal directory (file journals"
                                 " only)")
    p.add_argument("--covered-by", required=True, metavar="BACKUP",
                   help="a repozo repository, FileStorage file or zodburi"
                        " URI of a ZODB built from this journal: segments"
                        " it covers wholly are pruned")
    p.add_argument("--backup-date", metavar="DATE",
                   help="repozo only: use the last backup at or before"
                        " DATE, not the latest")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--archive", nargs="?", const="", metavar="DIR",
                      help="compress the segments into DIR (default: the"
                           " journal's %s/ subdirectory)" % ARCHIVE_DIR)
    what.add_argument("--remove", action="store_true",
                      help="delete the segments: the journal then starts"
                           " after them, for good")
    p.add_argument("--yes", action="store_true",
                   help="act without asking")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and change nothing")
    p.set_defaults(run=cmd_prune)


def cmd_prune(args):
    directory = cli._journal_path(args.journal)
    if not os.path.isdir(directory):
        raise CLIError("prune takes a file journal's directory; %s is not"
                       " one" % args.journal)
    archive = args.archive or None
    # Opened on its own archive (pruned.json's, or archive/), not on DIR:
    # the plan must see the segments already archived to refuse a second
    # archive place that would hide them.
    with FileJournal(directory, readonly=True, hmac_key=False) as journal:
        seq, described = covered_seq(journal, args.covered_by,
                                     args.backup_date)
        p = plan(journal, seq, described,
                 "remove" if args.remove else "archive", archive)
        print("\n".join(p.describe()))
        if not p.segments or args.dry_run:
            return EXIT_OK
        if not args.yes and not _confirmed():
            sys.stdout.flush()
            print("nothing changed: pass --yes to %s these segments"
                  % p.action, file=sys.stderr)
            return EXIT_FAILURE
        began = time.perf_counter()
        done = execute(p, report=print)
    seconds = time.perf_counter() - began
    if p.action == "archive":
        print("archived %d segments (%s bytes into %s bytes) in %.2fs"
              % (len(done), format(sum(s.size for s in done), ","),
                 format(sum(os.path.getsize(_archived_path(p, s))
                            for s in done), ","), seconds))
    else:
        print("removed %d segments in %.2fs; the journal starts at seq %d"
              % (len(done), seconds, p.kept_from))
    return EXIT_OK


def _confirmed():
    if not sys.stdin.isatty():
        return False
    try:
        answer = input("proceed? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# -- what a backup covers ---------------------------------------------------

def covered_seq(journal, spec, backup_date=None):
    """The seq up to which the backup ``spec`` holds the journal's effects.

    Returns ``(seq, description)``.  The backup's marker must name this
    journal and follow its history (the chain hash it stores must be the
    journal's record at that seq): a backup of another journal, or of a
    history the journal no longer is, covers nothing.
    """
    if os.path.isdir(spec):
        from zjournal.restore import _repozo_date
        backup_date = _repozo_date(backup_date)
    else:
        if backup_date:
            raise CLIError("--backup-date applies to a repozo repository")
        _refuse_live(spec)
    marker, described = cli.read_backup_marker(spec, backup_date)
    if marker is None:
        raise PruneError("%s holds no zjournal marker: it says nothing about"
                         " which commands it holds, so it covers no segment"
                         % spec)
    journal_id, applied, head = marker
    if journal_id != journal.identity:
        raise WrongJournalError(
            "%s was built from journal %s, not from %s (%s); it covers none"
            " of its segments" % (spec, journal_id, journal.path,
                                  journal.identity))
    if applied > journal.last_seq:
        raise ZODBAheadError(
            "%s is at seq %d, beyond the end of journal %s (seq %d): the"
            " journal lacks commands the backup holds; prune nothing and"
            " look into that first" % (spec, applied, journal.path,
                                       journal.last_seq))
    if head is not None and applied >= journal.start_seq:
        found = (journal.head if applied == journal.last_seq else
                 next(iter(journal.entries(applied + 1, applied + 2))).prev)
        if found != head:
            raise HistoryMismatchError(
                "%s applied seq %d with chain hash %s, but the journal's"
                " record %d hashes to %s: the backup is of another history"
                " of this journal, and covers none of it"
                % (spec, applied, head.hex(), applied, found.hex()))
    return applied, described


def _refuse_live(spec):
    """A ZODB another process has open is a live database, not a backup.

    Its marker says what it holds now, but the segments pruned on its
    word would be lost with it: the disk failure a backup guards against
    takes both.  FileStorage holds ``<file>.lock`` while open for
    writing; the lock is tried with ``flock`` on a read-only descriptor
    and released at once, so nothing is written or created.
    """
    if "://" in spec:
        if not spec.startswith("file://"):
            return  # a server's storage: nothing to tell from here
        spec = urllib.parse.urlsplit(spec).path
    lock_path = spec + ".lock"
    if lock_held(lock_path):
        raise PruneError(
            "%s is open for writing by another process (%s is locked): it"
            " is a live database, not a backup, and segments pruned on its"
            " word would be lost with it; give --covered-by a repozo"
            " repository or a copy of the ZODB (one that nothing writes"
            " to)" % (spec, lock_path))


def plan(journal, covered, covered_by, action, archive_dir=None):
    """Pick the segments a backup at seq ``covered`` makes prunable."""
    layout = journal.segment_layout()
    recorded = os.path.abspath(archive_dir_of(journal.path,
                                              read_prune_state(journal.path)))
    target = os.path.abspath(archive_dir) if archive_dir else recorded
    if action == "archive" and target != recorded:
        _refuse_second_archive(journal, recorded, target)
    # Never the last segment (appended to), nor the one before an empty
    # last segment: opening the journal reads that one's end.
    limit = len(layout) - 1
    last_seq, last_path, _ = layout[-1]
    if limit > 0 and os.path.getsize(last_path) <= SEGMENT_HEADER_SIZE:
        limit -= 1
    picked = []
    kept_from = layout[0][0]
    for i in range(limit):
        first, path, archived = layout[i]
        end = layout[i + 1][0] - 1
        if end > covered:
            break
        kept_from = layout[i + 1][0]
        if action == "archive" and archived:
            continue
        picked.append(Segment(first, end, path, archived))
    return Plan(journal, covered, covered_by, action, target, picked,
                kept_from)


def _refuse_second_archive(journal, recorded, target):
    """One archive per journal: a reader looks in one place only.

    Moving the archive elsewhere is allowed while nothing is archived
    yet; afterwards, segments archived in the old place would drop out
    of sight the moment ``pruned.json`` named the new one.
    """
    default = os.path.join(os.path.abspath(journal.path), ARCHIVE_DIR)
    for place in dict.fromkeys((recorded, default, target)):
        found = list_archived(place)
        if not found:
            continue
        first = os.path.basename(found[min(found)])
        if place == recorded:
            raise PruneError(
                "you asked to archive into %s, but journal %s keeps its"
                " archive in %s (%d archived segments, the first: %s), and"
                " a journal has one archive, because readers look in one"
                " place: run prune without DIR (or with --archive %s)"
                % (target, journal.path, recorded, len(found), first,
                   recorded))
        raise PruneError(
            "you asked to archive into %s; journal %s keeps its archive in"
            " %s, but %s holds %d archived segments (the first: %s) that"
            " readers do not look for there, and a journal has one archive:"
            " move them into %s, then run prune without DIR (or with"
            " --archive %s)" % (target, journal.path, recorded, place,
                                len(found), first, recorded, recorded))


# -- doing it ---------------------------------------------------------------

def execute(plan, report=None):
    """Carry out a plan; return the segments done.

    Holds ``prune.lock`` so that two prunes never interleave.
    """
    directory = plan.journal.path
    try:
        lock = zc.lockfile.LockFile(os.path.join(directory, PRUNE_LOCK))
    except zc.lockfile.LockError:
        raise PruneError("another zodb-journal prune is running on %s"
                         % directory) from None
    try:
        if plan.action == "archive":
            return _archive_all(plan, report)
        return _remove_all(plan, report)
    finally:
        lock.close()


def _archived_path(plan, segment):
    return os.path.join(plan.archive_dir,
                        segment_name(segment.first) + ARCHIVE_SUFFIX)


def _archive_all(plan, report):
    directory = plan.journal.path
    _make_dir(plan.archive_dir)
    _clear_leftovers(plan.archive_dir)
    state = read_prune_state(directory) or {}
    recorded = os.path.abspath(archive_dir_of(directory, state))
    moved = recorded != os.path.abspath(plan.archive_dir)
    if moved:
        # Named before the first segment leaves the journal directory: a
        # reader must find it in the archive from that moment on.  The
        # default place goes unnamed, so a stale name (a first attempt
        # into another place that archived nothing) goes with it.
        _set_archive(directory, plan.journal.created, None if (
            os.path.abspath(plan.archive_dir) == os.path.abspath(
                os.path.join(directory, ARCHIVE_DIR)))
            else plan.archive_dir)
    done = []
    try:
        for segment in plan.segments:
            archive_segment(segment.path, _archived_path(plan, segment),
                            directory)
            done.append(segment)
            if report is not None:
                report("archived %s" % os.path.basename(segment.path))
    except BaseException:
        if moved and not any(os.path.exists(_archived_path(plan, segment))
                             for segment in plan.segments):
            # Nothing reached the new place: name the old one again,
            # rather than an empty directory a retry may not use.
            if state:
                _set_archive(directory, plan.journal.created,
                             state.get("archive"))
            else:
                _unlink(os.path.join(directory, PRUNE_STATE))
                sync_dir(directory)
        raise
    logger.info("archived %d segments of %s into %s", len(done), directory,
                plan.archive_dir)
    return done


def archive_segment(source, target, journal_dir):
    """Replace segment ``source`` by its gzip ``target`` (see the module
    docstring for the order of steps and why)."""
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        with open(fd, "wb") as raw:
            with gzip.GzipFile(filename=os.path.basename(source), mode="wb",
                               fileobj=raw, mtime=0) as out, \
                    open(source, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    out.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        faults.point("archive.after-write")
        if not _same_bytes(source, tmp):
            raise PruneError(
                "%s does not decompress to the bytes of %s; nothing was"
                " removed (is the disk healthy?)" % (tmp, source))
        os.rename(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise
    sync_dir(os.path.dirname(target))
    faults.point("archive.after-rename")
    os.remove(source)
    sync_dir(journal_dir)
    faults.point("archive.after-remove")


def _same_bytes(path, gz_path):
    with open(path, "rb") as a, gzip.open(gz_path, "rb") as b:
        while True:
            x = a.read(CHUNK)
            try:
                y = b.read(CHUNK)
            except (OSError, EOFError):
                return False
            if x != y:
                return False
            if not x:
                return True


def _remove_all(plan, report):
    directory = plan.journal.path
    last = plan.segments[-1]
    entry = next(iter(plan.journal.entries(last.last, last.last + 1)))
    state = read_prune_state(directory) or {}
    removed_before = max(plan.kept_from, state.get("removed_before", 1))
    _update_state(directory, plan.journal.created,
                  removed_before=removed_before,
                  removed_head=entry.hash.hex(),
                  covered_by=plan.covered_by)
    faults.point("prune.after-state")
    done = []
    for segment in plan.segments:
        live = os.path.join(directory, segment_name(segment.first))
        archived = _archived_path(plan, segment)
        for path in (live, archived):
            if os.path.exists(path):
                os.remove(path)
                sync_dir(os.path.dirname(path))
        done.append(segment)
        if report is not None:
            report("removed %s" % os.path.basename(segment.path))
    logger.warning("removed %d segments of %s (seq %d..%d), covered by %s",
                   len(done), directory, plan.segments[0].first, last.last,
                   plan.covered_by)
    return done


def _set_archive(directory, created, place):
    """Name ``place`` as the archive in ``pruned.json`` (None: the
    default place, which goes unnamed)."""
    if place is None:
        _update_state(directory, created, drop=("archive",))
    else:
        _update_state(directory, created, archive=place)


def _update_state(directory, created, drop=(), **changes):
    """Write ``pruned.json`` with ``changes``, without the keys in
    ``drop``, atomically and durably."""
    state = read_prune_state(directory) or {}
    state.setdefault("created", created)
    state.update(changes)
    for key in drop:
        state.pop(key, None)
    state["updated"] = time.time()
    path = os.path.join(directory, PRUNE_STATE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                 FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    sync_dir(directory)


def _make_dir(path):
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700)
        sync_dir(os.path.dirname(path))


def _clear_leftovers(archive_dir):
    """Remove the ``.tmp`` files of an interrupted archiving."""
    for name in os.listdir(archive_dir):
        if name.endswith(ARCHIVE_SUFFIX + ".tmp"):
            _unlink(os.path.join(archive_dir, name))


def _unlink(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
