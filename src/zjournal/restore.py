"""Point-in-time restore: a backup of the ZODB, then the journal after it.

``zodb-journal restore JOURNAL --from BACKUP --zodb TARGET --import M
[--until SEQ_OR_ISOTIME] [--backup-date DATE]`` builds TARGET, a new
ZODB, in two steps:

1. copy the backup into TARGET.  BACKUP is a repozo repository (a
   directory: the latest backup, or the last one at or before
   ``--backup-date``, is recovered with ZODB's repozo), a FileStorage file,
   or a zodburi URI (copied transaction by transaction, read-only, so a
   copy of a storage in use is read consistently);
2. read the marker the copy carries (the journal identity, the last seq
   applied and its chain hash), check that it belongs to this journal and
   this history, and replay the journal from the seq after it up to
   ``--until`` (the journal's end by default).

A backup whose marker is already past ``--until`` cannot go back: the
restore refuses and says which backup would do.  TARGET must not exist or
be empty.  When the restore fails, the FileStorage files it created (a
path or a ``file://`` URI) are removed, and an empty file that was there
is made empty again, so it can simply be run again; a
storage behind another URI (ZEO, RelStorage...) cannot be deleted by
zjournal, so it is left as the failure left it, possibly holding part of
the backup, and the error says to empty it (or pick another) before the
next try, which would otherwise refuse it as not empty.

Unlike ``rebuild``, a restore does not need the journal from seq 1, so it
works on a journal whose old segments were removed by ``zodb-journal
prune``, and it replays only what happened since the backup.
"""
import logging
import os
import re
import shutil
import sys
import tempfile
import time

from zjournal import cli
from zjournal import recovery
from zjournal.cli import CLIError
from zjournal.cli import EXIT_OK

logger = logging.getLogger(__name__)

# repozo's own date format for --date: yyyy-mm-dd[-hh[-mm[-ss]]], UTC.
REPOZO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(-\d{2}){0,3}$")
# The files repozo writes, named by the UTC time of the backup.
REPOZO_FILE = re.compile(r"(\d{4}(?:-\d{2}){5})\.(fs|fsz|deltafs|deltafsz)$")


def add_subcommands(sub):
    from zjournal.cli import journal_argument
    p = sub.add_parser(
        "restore", help="restore a ZODB as of a seq or a time: a backup,"
        " then the journal after it")
    journal_argument(p)
    p.add_argument("--from", dest="source", required=True, metavar="BACKUP",
                   help="a repozo repository (directory), a FileStorage"
                        " file or a zodburi URI, holding a ZODB a"
                        " JournaledDB wrote")
    p.add_argument("--zodb", required=True, metavar="PATH_OR_URI",
                   help="the new ZODB: a FileStorage path or a zodburi URI"
                        " that must not exist or be empty")
    cli.import_option(p, required=True)
    p.add_argument("--until", metavar="SEQ_OR_ISOTIME",
                   help="stop after this seq (exact: a seq inside a"
                        " transaction is warned about), or after the"
                        " last transaction that committed at or before"
                        " this time (default: the end of the journal)")
    p.add_argument("--backup-date", metavar="DATE",
                   help="repozo only: recover the last backup taken at or"
                        " before DATE (ISO 8601 or yyyy-mm-dd-hh-mm-ss, UTC)"
                        " instead of the latest")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="commands per ZODB commit (default 1000)")
    p.set_defaults(run=cmd_restore)


def cmd_restore(args):
    until_seq, until_time = cli.parse_until(args.until)
    cli.import_modules(args.imports)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    if args.backup_date and not os.path.isdir(args.source):
        raise CLIError("--backup-date applies to a repozo repository (a"
                       " directory), not to %s" % args.source)
    began = time.perf_counter()
    with cli.open_journal(args.journal) as journal:
        created, kept = _refuse_occupied(args.zodb)
        progress = recovery.Progress("restore", tty=sys.stderr.isatty())
        ok = False
        try:
            copied = copy_backup(args.source, args.zodb,
                                 _repozo_date(args.backup_date))
            db = _open(args.zodb)
            try:
                result = recovery.catch_up(
                    db, journal, until_seq=until_seq, until_time=until_time,
                    batch_size=args.batch_size, progress=progress)
            except recovery.BackupTooNewError as e:
                raise recovery.BackupTooNewError(
                    "%s%s" % (e, _older_backups(args.source))) from None
            finally:
                db.close()
            ok = True
        finally:
            progress.close()
            if not ok:
                for path in created:
                    _remove(path)
                for path, content in kept.items():
                    _put_back(path, content)
                if "://" in args.zodb and not args.zodb.startswith(
                        "file://"):
                    _warn_partial(args.zodb)
    seconds = time.perf_counter() - began
    cli.note_torn_tail(journal)
    cli.note_warnings("restore", result)
    print("restored %s from %s (%s): the backup was at seq %d"
          % (args.zodb, args.source, copied, result.marker_seq))
    if result.replayed:
        print("replayed seq %d..%d of %s: %s commands in %.2fs"
              % (result.marker_seq + 1, result.restored_seq, journal.path,
                 format(result.replayed, ","), result.seconds))
    else:
        print("nothing to replay: the backup is the requested state")
    print("%s is at seq %d of %d (%.2fs in all)"
          % (args.zodb, result.restored_seq, result.journal_seq, seconds))
    return EXIT_OK


def copy_backup(source, target, date=None):
    """Put the backup ``source`` into the new ZODB ``target``.

    Returns what was copied, for the report.
    """
    if os.path.isdir(source):
        return _from_repozo(source, target, date)
    if "://" not in source and not os.path.isfile(source):
        raise CLIError("no backup at %s (neither a repozo repository nor a"
                       " FileStorage file)" % source)
    _copy_storage(cli.open_storage_readonly(source), target)
    return "a copy of the storage"


def _from_repozo(repository, target, date):
    if "://" in target:
        # repozo writes a file; a storage behind a URI gets a copy of it.
        with tempfile.TemporaryDirectory(prefix="zjournal-restore-") as tmp:
            data_fs = os.path.join(tmp, "Data.fs")
            used = _repozo_recover(repository, data_fs, date)
            import ZODB.FileStorage
            _copy_storage(ZODB.FileStorage.FileStorage(data_fs,
                                                       read_only=True),
                          target)
        return used
    return _repozo_recover(repository, target, date)


def _repozo_recover(repository, output, date):
    """Recover a repozo backup into the file ``output``; return which."""
    from ZODB.scripts import repozo
    argv = ["--recover", "--repository", repository, "--output", output]
    if date:
        argv += ["--date", date]
    try:
        options = repozo.parseargs(argv)
    except SystemExit:
        raise CLIError("repozo refused the options %s" % " ".join(argv))
    try:
        files = repozo.find_files(options)
        repozo.do_recover(options)
    except repozo.RepozoError as e:
        raise CLIError("repozo cannot recover from %s: %s"
                       % (repository, e)) from e
    used = os.path.basename(files[-1]) if files else "?"
    logger.info("recovered repozo backup %s of %s into %s", used,
                repository, output)
    return "repozo backup %s" % used


def _copy_storage(source, target):
    """Copy every transaction of the open storage ``source`` into the new
    ZODB ``target``, then close both.

    The target storage is opened bare, not through ``ZODB.DB``, which
    would write a root object before the copied transactions.
    """
    try:
        storage = _open_storage(target)
    except BaseException:
        source.close()
        raise
    try:
        storage.copyTransactionsFrom(source)
    finally:
        source.close()
        storage.close()


def _open_storage(spec):
    return _open_storage_kw(spec)[0]


def _open_storage_kw(spec):
    if "://" not in spec:
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(spec), {}
    return cli.open_storage_uri(spec)


def _open(spec):
    import ZODB
    storage, dbkw = _open_storage_kw(spec)
    return ZODB.DB(storage, **dbkw)


def _refuse_occupied(target):
    """Refuse a non-empty target.

    Returns ``(created, kept)``: the files a failure removes, and
    ``{path: content}`` of the empty files that were there (a failure
    puts their content back, so that the retry finds them as empty as
    the first try did).
    """
    if target.startswith("file://"):
        # Looked at, not opened: opening a FileStorage read-write may
        # write its index, and a refusal changes nothing.
        import urllib.parse
        target = urllib.parse.urlsplit(target).path
    elif "://" in target:
        created = []
        storage = _open_storage(target)
        try:
            empty = storage.lastTransaction() == b"\0" * 8
        finally:
            storage.close()
        if not empty:
            raise CLIError("%s is not empty; restore into a new, empty"
                           " storage" % target)
        return created, {}
    kept = {}
    if os.path.exists(target):
        if os.path.getsize(target) > 4:
            raise CLIError("%s exists and is not empty; restore into a new"
                           " path" % target)
        with open(target, "rb") as f:
            kept[target] = f.read()
    return [target + s for s in cli.FILESTORAGE_SUFFIXES + (".part",)
            if not os.path.exists(target + s)], kept


def _warn_partial(target):
    """Say what a failed restore left in a storage zjournal cannot delete."""
    try:
        storage = _open_storage(target)
        try:
            empty = storage.lastTransaction() == b"\0" * 8
        finally:
            storage.close()
    except Exception:
        empty = False  # unknown: say what may be there
    if empty:
        return
    logger.error("the restore failed after writing into %s, which may hold"
                 " part of the backup; empty that storage (or restore into"
                 " another, empty one) before trying again", target)
    print("zodb-journal restore: %s now holds a partial restore: empty it"
          " before trying again" % target, file=sys.stderr)


def _repozo_date(text):
    """repozo's --date from ISO 8601 (or repozo's own format)."""
    if not text:
        return None
    if REPOZO_DATE.match(text):
        return text
    _, when = cli.parse_until(text, "--backup-date")
    if when is None:
        raise CLIError("--backup-date takes a date, not %r" % text)
    import datetime
    return when.astimezone(datetime.timezone.utc).strftime(
        "%Y-%m-%d-%H-%M-%S")


def _older_backups(source):
    """A hint naming the backups of a repozo repository."""
    if not os.path.isdir(source):
        return ""
    dates = sorted(m.group(1) for m in map(REPOZO_FILE.match,
                                           os.listdir(source)) if m)
    if not dates:
        return ""
    return ("; backups in %s were taken at (UTC): %s; pick one with"
            " --backup-date" % (source, ", ".join(dates)))


def _put_back(path, content):
    """Return a file that was there, empty, to what it held."""
    try:
        with open(path, "r+b") as f:
            f.write(content)
            f.truncate(len(content))
    except FileNotFoundError:
        with open(path, "wb") as f:
            f.write(content)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
