"""zodb-journal: inspect journals and rebuild ZODBs from them.

Usage::

    zodb-journal info JOURNAL [--json]
    zodb-journal verify JOURNAL [--decode] [--zodb PATH_OR_URI]
                        [--hmac-key-env VAR]
    zodb-journal dump JOURNAL [--start N] [--stop N] [--json] [--import M]
    zodb-journal stats JOURNAL [--json] [--since SEQ_OR_ISOTIME]
                       [--until SEQ_OR_ISOTIME] [--by command|hour|day|user]
                       [--html FILE [--gap SECONDS]]
    zodb-journal rebuild JOURNAL --zodb PATH_OR_URI --import MODULE ...
                         [--until SEQ_OR_ISOTIME] [--batch-size N]
                         [--skip-unknown]
    zodb-journal export JOURNAL [--format jsonl] [--output FILE|-]
                        [--start N] [--stop N] [--import M]
    zodb-journal import FILE JOURNAL [--hmac-key-env VAR] [--import M]
    zodb-journal salvage SRC DST [--json]
    zodb-journal restore JOURNAL --from BACKUP --zodb PATH_OR_URI
                         --import MODULE ... [--until SEQ_OR_ISOTIME]
                         [--backup-date DATE] [--batch-size N]
    zodb-journal prune JOURNAL --covered-by BACKUP (--archive [DIR] | --remove)
                       [--backup-date DATE] [--yes] [--dry-run]
    zodb-journal check-replay JOURNAL --zodb PATH_OR_URI --import MODULE ...
                              [--scratch PATH_OR_URI] [--batch-size N]
                              [--json]
    zodb-journal follow JOURNAL --zodb REPLICA --import MODULE ...
                        [--interval SECONDS] [--no-listen] [--once]
                        [--batch-size N] [--lag-report SECONDS]
                        [--status-file FILE]
    zodb-journal replay JOURNAL --import MODULE ... [--zodb SCRATCH]
                        [--profile] [--json] [--compare PROFILE.json]
                        [--start SEQ_OR_ISOTIME] [--until SEQ_OR_ISOTIME]
    zodb-journal demo [--dir DIR] [--commands N]

The operations subcommands (restore, prune, check-replay, follow, replay)
are defined in the modules that do the work (:mod:`zjournal.restore`,
:mod:`zjournal.archive`, :mod:`zjournal.checkreplay`,
:mod:`zjournal.follower`, :mod:`zjournal.sessionreplay`).

``JOURNAL`` is a journal directory or a journal URI. Every subcommand but
``demo``, ``import`` and ``prune`` opens the journal read-only: it takes no
lock, so it works beside a running application, and it never changes a byte
of the journal.

``verify`` reads every record and checks its checksum, framing, sequence
number and chain hash (and signature, given the key); it prints nothing
alarming and exits 0 when all is well.  With ``--zodb`` it also checks
that the ZODB's marker belongs to this journal and to this history.
``rebuild`` replays the journal into a new, empty ZODB (it refuses a
non-empty one), committing in batches, showing progress on a terminal and
logging it otherwise; ``--until`` stops after a sequence number, or after
the last command executed at or before an ISO 8601 time (UTC unless the
time says otherwise).

``stats`` counts entries, transactions, bytes and rates by command, user,
hour or day, reading names, times and sizes only; ``--html FILE`` writes
a self-contained HTML report with charts to FILE instead of printing the
text (see :mod:`zjournal.report`).  ``export`` writes the records as JSON
lines; ``import`` turns such a file back into a journal of
identical records, after checking every line (see :mod:`zjournal.export`).

``salvage`` copies every intact transaction of a damaged journal SRC into
a new journal DST and lists what it dropped (file, offset, sequence
numbers); SRC is only read.  See :mod:`zjournal.salvage` for what the copy
is and is not.

Exit status: 0 success; 1 the journal failed verification, did not match
the ZODB, or zjournal refused (the message says why and what to do); 2 bad
usage.
"""
import argparse
import contextlib
import datetime
import importlib
import io
import json
import logging
import os
import sys
import urllib.parse

from zjournal.export import iso
from zjournal.export import jsonable
from zjournal.journal import HMAC_KEY_ENV
from zjournal.stats import GROUPINGS

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

logger = logging.getLogger("zjournal.cli")


#: Modules that define their subcommands beside the code they run, as
#: pip keeps one module per command: each has ``add_subcommands(sub)``,
#: called with the parser's subparsers.
SUBCOMMAND_MODULES = (
    "zjournal.restore",
    "zjournal.archive",
    "zjournal.checkreplay",
    "zjournal.follower",
    "zjournal.sessionreplay",
)


class CLIError(Exception):
    """A refusal of the command line itself (bad target, bad --until)."""


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[
            min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s")
    from zjournal.errors import ZJournalError
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error
        # worth a message.  Point stdout at nothing so that the final
        # flush does not fail again.
        _silence_stdout()
        return EXIT_FAILURE
    except (ZJournalError, CLIError, OSError, ImportError) as e:
        logger.debug("failed", exc_info=True)
        print("zodb-journal %s: error: %s" % (args.subcommand, e),
              file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("zodb-journal: interrupted", file=sys.stderr)
        return 130


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
    finally:
        os.close(devnull)


def _parser():
    parser = argparse.ArgumentParser(
        prog="zodb-journal",
        description="Inspect zjournal journals and rebuild ZODBs from them.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-vv: debug, with tracebacks)")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="summarize a journal")
    journal_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("verify", help="check every record of a journal")
    journal_argument(p)
    p.add_argument("--decode", action="store_true",
                   help="also decode every payload (safe: no code runs)")
    p.add_argument("--zodb", metavar="PATH_OR_URI",
                   help="also check that this ZODB (opened read-only) was"
                        " built from this journal and this history; a"
                        " directory is a repozo repository, whose last"
                        " backup is checked")
    _key_option(p, "check record signatures with the key in environment"
                   " variable VAR (default: %s, when set)" % HMAC_KEY_ENV)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("dump", help="print journal entries")
    journal_argument(p)
    p.add_argument("--start", type=int, default=None, metavar="N",
                   help="first seq to print (default: the journal's first,"
                        " 1 unless it was pruned)")
    p.add_argument("--stop", type=int, default=None, metavar="N",
                   help="print seqs below N (exclusive, as in range)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line")
    import_option(p, required=False)
    p.set_defaults(run=cmd_dump)

    p = sub.add_parser("stats", help="count commands, transactions, bytes"
                       " and rates, by command, hour, day or user")
    journal_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object")
    p.add_argument("--since", metavar="SEQ_OR_ISOTIME",
                   help="count from this seq, or from this time on")
    p.add_argument("--until", metavar="SEQ_OR_ISOTIME",
                   help="count up to this seq, or up to this time"
                        " (inclusive)")
    p.add_argument("--by", choices=GROUPINGS, default="command",
                   help="group by command name (default), UTC hour or day,"
                        " or the user in the records' metadata")
    p.add_argument("--html", metavar="FILE",
                   help="also write a self-contained HTML report (charts"
                        " of commands over time, sizes, gaps) to FILE")
    p.add_argument("--gap", type=float, default=3600.0, metavar="SECONDS",
                   help="with --html: count the periods without entries"
                        " this long or longer as idle (default 3600)")
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("rebuild", help="replay a journal into an empty ZODB")
    journal_argument(p)
    p.add_argument("--zodb", required=True, metavar="PATH_OR_URI",
                   help="FileStorage path or zodburi URI of the new ZODB")
    import_option(p, required=True)
    p.add_argument("--until", metavar="SEQ_OR_ISOTIME",
                   help="stop after this seq (exact: a seq inside a"
                        " transaction is warned about), or after the"
                        " last transaction that committed at or before"
                        " this time")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="commands per ZODB commit (default 1000)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="forensics only: skip entries whose command is"
                        " unknown or undecodable instead of stopping, and"
                        " list them; the result is NOT the journal's state"
                        " (exit status 0, with a warning)")
    p.set_defaults(run=cmd_rebuild)

    p = sub.add_parser("export", help="write a journal's records as JSON"
                       " lines")
    journal_argument(p)
    p.add_argument("--format", choices=["jsonl"], default="jsonl",
                   help="jsonl (the default and only format): a header"
                        " line, one line per record, an end line")
    p.add_argument("--output", "-o", default="-", metavar="FILE",
                   help="write here (replaced only once the export is"
                        " complete); - for standard output (the default)")
    p.add_argument("--start", type=int, default=None, metavar="N",
                   help="first seq to export (default: the journal's first,"
                        " 1 unless it was pruned; import takes only exports"
                        " from seq 1)")
    p.add_argument("--stop", type=int, default=None, metavar="N",
                   help="export seqs below N (exclusive, as in range)")
    import_option(p, required=False)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="create a journal from an export,"
                       " checking every record")
    p.add_argument("source", metavar="FILE",
                   help="an export of zodb-journal export; - for standard"
                        " input")
    p.add_argument("target", metavar="JOURNAL",
                   help="the new journal: a directory (that must not exist"
                        " or be empty) or an sqlite:// or postgresql:// URI"
                        " naming a journal that does not exist yet")
    _key_option(p, "sign the records with the key in environment variable"
                   " VAR, as the original journal's were (default: %s, when"
                   " set)" % HMAC_KEY_ENV)
    import_option(p, required=False)
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("salvage", help="copy the intact transactions of a"
                       " damaged journal into a new one")
    journal_argument(p, help="the damaged journal (only read)")
    p.add_argument("target", metavar="DST",
                   help="directory for the new journal (must not exist or"
                        " be empty)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_salvage)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)

    p = sub.add_parser("demo", help="run the bank demo: journal, throw the"
                       " ZODB away, rebuild, compare")
    p.add_argument("--dir", metavar="DIR",
                   help="keep the demo's files here (default: a temporary"
                        " directory, removed afterwards)")
    p.add_argument("--commands", type=int, default=3000, metavar="N",
                   help="how many commands to run (default 3000)")
    p.set_defaults(run=cmd_demo)
    return parser


JOURNAL_HELP = ("a journal directory, or a journal URI (file://, sqlite://,"
                " postgresql://)")


def journal_argument(p, help=JOURNAL_HELP):
    """The JOURNAL argument every subcommand but demo takes."""
    p.add_argument("journal", metavar="JOURNAL", help=help)


def import_option(p, required):
    """The repeatable --import MODULE option the replaying subcommands
    take."""
    p.add_argument("--import", dest="imports", action="append", default=[],
                   required=required, metavar="MODULE",
                   help="module defining command classes (repeatable)")


def _key_option(p, help):
    p.add_argument("--hmac-key-env", metavar="VAR", help=help)


# -- helpers -------------------------------------------------------------

def _journal_path(spec):
    """The directory a journal argument names (a path or a file:// URI)."""
    if "://" in spec:
        scheme, _, rest = spec.partition("://")
        if scheme != "file":
            raise CLIError("journal URI scheme %r is not supported (use a"
                           " directory or file:///path)" % scheme)
        return rest
    return spec


def open_journal(spec, hmac_key=None):
    """Open a journal read-only from a directory path or a URI."""
    from zjournal.uri import open_journal
    return open_journal(spec, readonly=True, hmac_key=hmac_key)


def hmac_key(var):
    """The key in environment variable ``var``; None without ``var``
    (FileJournal then reads ZJOURNAL_HMAC_KEY itself)."""
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise CLIError("--hmac-key-env: environment variable %s is not set"
                       " or empty" % var)
    return key


def import_modules(names):
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise CLIError("cannot import %s: %s" % (name, e)) from e


def parse_until(text, option="--until"):
    """Return ``(seq, None)`` or ``(None, aware_datetime)``.

    Parses ``--until`` (and ``--since``): a sequence number, or an ISO
    8601 time, UTC unless it says otherwise.
    """
    if text is None:
        return None, None
    if text.isdigit():
        return int(text), None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CLIError("%s takes a sequence number or an ISO 8601 time,"
                       " not %r" % (option, text)) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return None, when


# -- subcommands ---------------------------------------------------------

def cmd_info(args):
    # A directory made for a journal that no writer has opened yet (the
    # buildout recipe makes it at install) is an empty journal, not a
    # missing one; it has no identity until its first writer gives it
    # one, and a reader must not create anything to make it look whole.
    from zjournal.format import FORMAT_VERSION
    from zjournal.format import LOCK_NAME
    from zjournal.journal import writer_active
    from zjournal.uri import parse_journal_uri
    kind, location, _ = parse_journal_uri(args.journal)
    if (kind == "file" and os.path.isdir(location)
            and not set(os.listdir(location)) - {LOCK_NAME}):
        path = os.path.abspath(location)
        info = {"path": path, "identity": None,
                "format_version": FORMAT_VERSION, "created": None,
                "segments": 0, "bytes": 0, "first_seq": 1, "last_seq": 0,
                "start_seq": 1, "pruned_before": None,
                "archived_segments": 0, "archive": None, "torn_tail": None,
                "writer_active": writer_active(path)}
    else:
        with open_journal(args.journal) as journal:
            info = journal.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    print("journal:    %s" % info["path"])
    if info["identity"] is None:
        print("identity:   none yet (an empty directory: the first process"
              " that opens the journal for writing creates it)")
    else:
        print("identity:   %s" % info["identity"])
    print("format:     %d" % info["format_version"])
    if info["created"] is not None:
        print("created:    %s" % iso(info["created"]))
    backend = info.get("backend", "file")
    if backend == "file":
        print("segments:   %d (%s bytes)" % (info["segments"],
                                             format(info["bytes"], ",")))
    else:
        print("backend:    %s (%s bytes)" % (backend,
                                             format(info["bytes"], ",")))
    print("seq:        %d .. %d" % (info["first_seq"], info["last_seq"]))
    if info.get("pruned_before"):
        print("pruned:     seq 1 .. %d removed (zodb-journal prune)"
              % (info["pruned_before"] - 1))
    if info.get("archived_segments"):
        print("archived:   %d segments in %s"
              % (info["archived_segments"], info["archive"]))
    if info["writer_active"] is not None:
        print("writer:     %s" % ("active" if info["writer_active"]
                                  else "none"))
    torn = info["torn_tail"]
    if torn:
        print("tail:       incomplete, %d bytes at %s:%d (%s)"
              % (torn["bytes"], torn["file"], torn["offset"], torn["reason"]))
    return EXIT_OK


def _start(journal, start):
    """The seq a read starts at: as asked, else the journal's first.

    A journal whose early segments ``zodb-journal prune`` removed starts
    above 1; reading from 1 would only be refused.
    """
    if start is not None:
        return start
    return getattr(journal, "start_seq", 1)


def cmd_verify(args):
    from zjournal.errors import CorruptJournalError
    from zjournal.errors import DecodeError
    from zjournal.errors import JournalKeyError
    from zjournal.journal import FileJournal
    from zjournal.journal import writer_active
    with open_journal(args.journal, hmac_key(args.hmac_key_env)) as journal:
        try:
            report = journal.verify()
            if args.decode:
                for entry in journal.entries(1, report.last_seq + 1):
                    entry.args
        except (CorruptJournalError, DecodeError, JournalKeyError) as e:
            print("FAILED: %s" % e)
            return EXIT_FAILURE
        # SQL journals are shared by design: no lock to ask about.
        busy = (writer_active(journal.path)
                if isinstance(journal, FileJournal) else None)
        zodb = None if args.zodb is None else check_zodb(
            args.zodb, journal, report)
    rate = report.records / max(report.seconds, 1e-9)
    where = ("%d segment(s)" % report.segments
             if isinstance(journal, FileJournal) else "the database")
    print("%s: %s records in %s, %s bytes, seq %s..%d"
          " (%.0f records/s)" % (
              journal.path, format(report.records, ","), where,
              format(report.bytes, ","), report.first_seq or "-",
              report.last_seq, rate))
    print("chain head %s; %s signed, %s unsigned records" % (
        report.head.hex(), format(report.signed, ","),
        format(report.unsigned, ",")))
    status = EXIT_OK
    if zodb is not None:
        ok, text = zodb
        print(("%s" if ok else "FAILED: %s") % text)
        status = EXIT_OK if ok else EXIT_FAILURE
    torn = report.torn_tail
    if torn is None:
        if status == EXIT_OK:
            print("OK")
        return status
    if busy:
        print("OK; %d bytes at %s:%d are a write in progress (a writer is"
              " active)" % (torn.size, torn.path, torn.offset))
        return status
    print("FAILED: incomplete tail of %d bytes at %s:%d (%s); no valid"
          " record follows it, so it is a torn write that was never"
          " acknowledged: the next writer to open the journal cuts it and"
          " keeps the bytes aside" % (torn.size, torn.path, torn.offset,
                                      torn.reason))
    return EXIT_FAILURE


def check_zodb(spec, journal, report):
    """Compare a ZODB's marker with a verified journal.

    Returns ``(ok, message)``.  The marker's ``head`` is the chain hash
    of the last record the ZODB applied: the journal's record at that seq
    must still hash to it (the next record's ``prev`` says what it hashes
    to), or the journal's history is not the one the ZODB was built from,
    whatever its identity says.
    """
    marker = read_marker(spec)
    if marker is None:
        return False, ("the ZODB %s holds no zjournal marker: it was not"
                       " built from a journal" % spec)
    journal_id, applied, head = marker
    last = report.last_seq
    where = "the ZODB %s" % spec
    if journal_id != journal.identity:
        return False, ("%s was built from journal %s, not from this one (%s)"
                       % (where, journal_id, journal.identity))
    if applied > last:
        return False, ("%s has applied commands up to seq %d, but the"
                       " journal ends at seq %d: %d acknowledged commands"
                       " are missing from the journal"
                       % (where, applied, last, applied - last))
    if head is None:
        return True, ("%s is at seq %d of %d; its marker predates chain"
                      " hashes, so only identity and seq were compared"
                      % (where, applied, last))
    if applied == last:
        found = report.head
    else:
        found = next(iter(journal.entries(applied + 1, applied + 2))).prev
    if found != head:
        return False, (
            "journal head no longer matches the ZODB: %s applied seq %d"
            " with chain hash %s, but the journal's record %d hashes to %s;"
            " the journal was changed, or replaced by another copy, after"
            " the ZODB applied it" % (where, applied, head.hex(), applied,
                                      found.hex()))
    if applied == last:
        return True, "%s is current: seq %d, chain hash %s" % (
            where, applied, head.hex())
    return True, ("%s is at seq %d, behind the journal by %d commands (the"
                  " chain links: opening it catches up)"
                  % (where, applied, last - applied))


def read_marker(spec, backup_date=None):
    """``(journal_id, last_seq, head)`` of a ZODB's marker, or None.

    The ZODB is opened read-only: checking must not change it.  A
    directory is taken for a repozo repository (see
    :func:`read_backup_marker`).
    """
    return read_backup_marker(spec, backup_date)[0]


def read_backup_marker(spec, backup_date=None):
    """``(marker, description)`` of a ZODB or of a backup of one.

    A directory is taken for a repozo repository: its last backup (or the
    last at or before ``backup_date``, repozo's own date format) is
    recovered into a temporary file, read, and thrown away -- what an
    operator checking each night's backup against the journal needs.
    The description names the backup file that was read.
    """
    if "://" not in spec and os.path.isdir(spec):
        import tempfile
        from zjournal.restore import _repozo_recover
        with tempfile.TemporaryDirectory(prefix="zjournal-backup-") as tmp:
            data_fs = os.path.join(tmp, "Data.fs")
            used = _repozo_recover(spec, data_fs, backup_date)
            logger.info("read the marker of %s", used)
            return _read_marker(data_fs), "%s (%s)" % (spec, used)
    return _read_marker(spec), spec


def _read_marker(spec):
    import ZODB
    from zjournal.marker import get_marker
    storage = open_storage_readonly(spec)
    try:
        if storage.lastTransaction() == b"\0" * 8:
            return None  # an empty storage: not even a root
        db = ZODB.DB(storage)
    except BaseException:
        storage.close()
        raise
    try:
        conn = db.open()
        try:
            marker = get_marker(conn.root())
            if marker is None:
                return None
            return marker.journal_id, marker.last_seq, marker.head
        finally:
            conn.close()
    finally:
        db.close()


def open_storage_readonly(spec):
    if "://" not in spec:
        import ZODB.FileStorage
        # The module, not the class the package re-exports by that name.
        from ZODB.FileStorage.FileStorage import FileStorageError
        if not os.path.isfile(spec):
            raise CLIError("no ZODB at %s (no such file)" % spec)
        try:
            return ZODB.FileStorage.FileStorage(spec, read_only=True)
        except FileStorageError as e:
            raise CLIError(
                "%s is not a FileStorage (%s): name a Data.fs, a full"
                " repozo backup (.fs), a repozo repository (a directory) or"
                " a zodburi URI; incremental backups (.deltafs) and index"
                " files are not databases" % (spec, e)) from e
    parts = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qsl(parts.query)
    if parts.scheme in ("file", "zeo") and "read_only" not in dict(query):
        query.append(("read_only", "1"))
        spec = urllib.parse.urlunsplit(
            parts._replace(query=urllib.parse.urlencode(query)))
    return open_storage_uri(spec)[0]


def open_storage_uri(spec):
    """Open the storage a zodburi URI names: ``(storage, DB keywords)``.

    The one place the --zodb options turn a URI into a storage, with the
    errors an operator can act on (zodburi missing, a URI it refuses).
    """
    try:
        import zodburi
    except ImportError:
        raise CLIError("--zodb URIs need zodburi: pip install"
                       " 'zjournal[uri]'") from None
    try:
        factory, dbkw = zodburi.resolve_uri(spec)
        return factory(), dbkw
    except (KeyError, ValueError) as e:
        raise CLIError("cannot open --zodb %s: %s" % (spec, e)) from e


def cmd_dump(args):
    import_modules(args.imports)
    with open_journal(args.journal) as journal:
        for entry in journal.entries(_start(journal, args.start),
                                     args.stop):
            try:
                entry_args = entry.args
            except Exception as e:
                entry_args = {"<undecodable>": str(e)}
            metadata = entry.metadata
            if args.json:
                line = json.dumps({
                    "seq": entry.seq, "time": entry.time,
                    "command_name": entry.command_name,
                    "version": entry.version, "args": jsonable(entry_args),
                    "query": entry.is_query, "metadata": metadata,
                    "user": entry.user, "description": entry.description},
                    sort_keys=True)
            else:
                line = " ".join([str(entry.seq), iso(entry.time),
                                 entry.command_name, _shown(entry_args)]
                                + _who(entry))
            print(line)
    return EXIT_OK


def _shown(entry_args):
    try:
        if isinstance(entry_args, dict):
            return " ".join("%s=%r" % kv
                            for kv in sorted(entry_args.items()))
        return repr(entry_args)
    except RecursionError:
        return "<arguments nested too deep to show>"


def _who(entry):
    """What dump's text line adds after the arguments: query, who, why."""
    extra = []
    if entry.is_query or entry.user or entry.description:
        extra.append("--")
    if entry.is_query:
        extra.append("(query)")
    if entry.user:
        extra.append("user=%r" % entry.user)
    if entry.description:
        extra.append("description=%r" % entry.description)
    return extra


def cmd_stats(args):
    from zjournal import stats
    from zjournal.recovery import Progress
    since_seq, since_time = parse_until(args.since, "--since")
    until_seq, until_time = parse_until(args.until, "--until")
    if args.html is not None:
        from zjournal import report as html_report
        if not args.gap > 0:  # NaN too
            raise CLIError("--gap must be a positive number of seconds")

        def collect(entries, **kw):
            return html_report.collect(entries, gap_threshold=args.gap, **kw)
    else:
        collect = stats.collect
    with open_journal(args.journal) as journal:
        start = max(since_seq or 1, _start(journal, None))
        last = journal.last_seq if until_seq is None else min(
            until_seq, journal.last_seq)
        progress = Progress("stats", tty=sys.stderr.isatty())
        try:
            result = collect(
                journal.entries(start, last + 1), by=args.by,
                since=since_time, until=until_time, progress=progress,
                total=max(last - start + 1, 0))
        finally:
            progress.close()
        info = journal.info() if args.html is not None else None
    report = result.as_dict()
    report.update(journal=journal.path, identity=journal.identity,
                  since=args.since, until=args.until)
    if args.html is not None:
        html_report.write(args.html, html_report.render(result, info))
        print("wrote the HTML report of %s entries to %s" % (
            format(result.entries, ","), args.html),
            file=sys.stderr if args.json else sys.stdout)
        if not args.json:
            return EXIT_OK
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print("\n".join(stats.format_report(report, journal.path)))
    return EXIT_OK


def cmd_rebuild(args):
    from zjournal import recovery
    from zjournal.recovery import Progress
    until_seq, until_time = parse_until(args.until)
    import_modules(args.imports)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    with open_journal(args.journal) as journal:
        db, created = open_target(args.zodb)
        progress = Progress("rebuild", tty=sys.stderr.isatty())
        ok = False
        try:
            result = recovery.rebuild(
                db, journal, until_seq=until_seq, until_time=until_time,
                batch_size=args.batch_size, progress=progress,
                skip_unknown=args.skip_unknown)
            ok = True
        finally:
            progress.close()
            db.close()
            if not ok:
                for path in created:
                    _remove(path)
    note_torn_tail(journal)
    note_warnings("rebuild", result)
    rate = result.replayed / max(result.seconds, 1e-9)
    print("rebuilt %s from %s: %s commands in %.2fs (%.0f commands/s)"
          % (args.zodb, journal.path, format(result.replayed, ","),
             result.seconds, rate))
    if args.skip_unknown:
        _report_skipped(result.skipped, args.zodb)
    return EXIT_OK


def note_torn_tail(journal):
    """Say on stderr that the journal's incomplete last transaction was
    not replayed.

    A read-only reader leaves a torn tail where it is and reads up to it:
    the replay is right, but an operator restoring from a copy should
    know the copy ended inside a transaction (taken while the
    application wrote) or that a writer died there.
    """
    torn = getattr(journal, "torn_tail", None)
    if torn is not None:
        print("note: the journal ends with an incomplete transaction (%d"
              " bytes at %s:%d, %s): a copy taken while the application"
              " wrote, or a writer that died; it was not replayed"
              % (torn.size, torn.path, torn.offset, torn.reason),
              file=sys.stderr)


def note_warnings(command, result):
    """Repeat on stderr what a replay that succeeded warned about.

    The warnings were logged, but an operator running the tool by hand
    reads its output: a result cut inside a transaction, or short of the
    requested seq, must not look like the plain success it resembles.
    """
    for message in getattr(result, "warnings", ()):
        print("zodb-journal %s: warning: %s" % (command, message),
              file=sys.stderr)


def _report_skipped(skipped, target):
    if not skipped:
        print("nothing was skipped: %s holds the journal's state" % target)
        return
    for seq, name, reason in skipped:
        print("skipped seq %d (%s): %s" % (seq, name, reason))
    print("zodb-journal rebuild: WARNING: %d entries were skipped; %s is"
          " NOT the state the journal describes: use it for forensics"
          " only, never with the application" % (len(skipped), target),
          file=sys.stderr)


def cmd_export(args):
    from zjournal.export import export_jsonl
    from zjournal.recovery import Progress
    import_modules(args.imports)
    with open_journal(args.journal) as journal:
        progress = Progress("export", tty=sys.stderr.isatty())
        try:
            if args.output == "-":
                with _utf8(sys.stdout) as out:
                    n = export_jsonl(journal, out,
                                     _start(journal, args.start), args.stop,
                                     progress)
            else:
                n = _export_to_file(journal, args, progress)
        finally:
            progress.close()
    print("exported %s records of journal %s (%s) to %s" % (
        format(n, ","), journal.path, journal.identity,
        "standard output" if args.output == "-" else args.output),
        file=sys.stderr if args.output == "-" else sys.stdout)
    return EXIT_OK


@contextlib.contextmanager
def _utf8(stream):
    """``stream`` as UTF-8 text, whatever the locale says: an export is
    UTF-8 by definition."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None or (stream.encoding or "").lower().replace(
            "-", "") == "utf8":
        yield stream
        stream.flush()
        return
    stream.flush()
    wrapper = io.TextIOWrapper(buffer, encoding="utf-8", newline="\n")
    try:
        yield wrapper
        wrapper.flush()
    finally:
        wrapper.detach()  # leave the process's stream open


def _export_to_file(journal, args, progress):
    """Export into a temporary file renamed over ``--output`` at the end:
    an export that fails leaves no partial file (or the old one)."""
    from zjournal.export import export_jsonl
    part = args.output + ".part"
    try:
        # Owner-only, as the journal's own files: an export holds every
        # argument of every command.
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8", newline="\n") as out:
            n = export_jsonl(journal, out, _start(journal, args.start),
                             args.stop, progress)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, args.output)
    except BaseException:
        _remove(part)
        raise
    return n


def cmd_import(args):
    from zjournal.export import import_jsonl
    from zjournal.recovery import Progress
    key = hmac_key(args.hmac_key_env)
    import_modules(args.imports)
    target = args.target
    progress = Progress("import", tty=sys.stderr.isatty())
    try:
        if args.source == "-":
            with _utf8(sys.stdin) as lines:
                report = import_jsonl(lines, target, key, progress)
        else:
            with open(args.source, encoding="utf-8") as lines:
                report = import_jsonl(lines, target, key, progress)
    except UnicodeDecodeError as e:
        raise CLIError("%s is not UTF-8 text: %s" % (args.source, e)) from e
    finally:
        progress.close()
    print("imported %s records (%s signed) in %s transactions into %s"
          " (journal %s, chain head %s)" % (
              format(report.records, ","), format(report.signed, ","),
              format(report.transactions, ","), report.path,
              report.identity, report.head.hex()))
    return EXIT_OK


def cmd_salvage(args):
    from zjournal.salvage import salvage
    report = salvage(_journal_path(args.journal), args.target)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return EXIT_OK
    print("copied %s records from %s into %s (new journal %s)" % (
        format(report.copied, ","), report.source, report.target,
        report.identity))
    for d in report.dropped:
        seqs = ("seq %d..%d" % (min(d.seqs), max(d.seqs)) if d.seqs
                else "no valid record")
        print("dropped %d bytes at %s:%d (%s; %s)" % (
            d.size, d.path, d.offset, seqs, d.reason))
    if report.renumbered_from is not None:
        print("records from seq %d on were renumbered to close the gap:"
              " their context.seq and context.random differ on replay"
              % report.renumbered_from)
    if not report.dropped:
        print("nothing was dropped")
    print("rebuild a ZODB from the new journal; it has a new identity")
    return EXIT_OK


FILESTORAGE_SUFFIXES = ("", ".index", ".lock", ".tmp")


def open_target(spec):
    """Open an empty ZODB; return it and the files to remove on failure."""
    import ZODB
    if "://" in spec:
        created = []
        if spec.startswith("file://"):
            created = _missing_files(urllib.parse.urlsplit(spec).path)
        storage, dbkw = open_storage_uri(spec)
        if storage.lastTransaction() != b"\0" * 8:
            storage.close()
            raise CLIError("%s is not empty; rebuild into a new, empty"
                           " storage" % spec)
        return ZODB.DB(storage, **dbkw), created
    import ZODB.FileStorage
    if os.path.exists(spec) and os.path.getsize(spec) > 4:
        raise CLIError("%s exists and is not empty; rebuild into a new path"
                       % spec)
    created = _missing_files(spec)
    return ZODB.DB(ZODB.FileStorage.FileStorage(spec)), created


def _missing_files(data_fs):
    """The files of a FileStorage at ``data_fs`` that do not exist yet."""
    return [data_fs + s for s in FILESTORAGE_SUFFIXES
            if not os.path.exists(data_fs + s)]


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def cmd_demo(args):
    from zjournal import demo
    return demo.run(args.dir, args.commands)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
