"""zodb-journal: inspect journals and rebuild ZODBs from them.

Usage::

    zodb-journal info JOURNAL [--json]
    zodb-journal verify JOURNAL [--decode]
    zodb-journal dump JOURNAL [--start N] [--stop N] [--json] [--import M]
    zodb-journal rebuild JOURNAL --zodb PATH_OR_URI --import MODULE ...
                         [--until SEQ_OR_ISOTIME] [--batch-size N]
    zodb-journal salvage SRC DST [--json]
    zodb-journal demo [--dir DIR] [--commands N]

``JOURNAL`` is a journal directory or a ``file://`` URI.  Every subcommand
but ``demo`` opens the journal read-only: it takes no lock, so it works
beside a running application, and it never changes a byte of the journal.

``verify`` reads every record and checks its checksum, framing and
sequence number; it prints nothing alarming and exits 0 when all is well.
``rebuild`` replays the journal into a new, empty ZODB (it refuses a
non-empty one), committing in batches, showing progress on a terminal and
logging it otherwise; ``--until`` stops after a sequence number, or after
the last command executed at or before an ISO 8601 time (UTC unless the
time says otherwise).

``salvage`` copies every intact transaction of a damaged journal SRC into
a new journal DST and lists what it dropped (file, offset, sequence
numbers); SRC is only read.  See :mod:`zjournal.salvage` for what the copy
is and is not.

Exit status: 0 success; 1 the journal failed verification, or zjournal
refused (the message says why and what to do); 2 bad usage.
"""
import argparse
import datetime
import importlib
import json
import logging
import os
import sys
import urllib.parse

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

logger = logging.getLogger("zjournal.cli")


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
    except (ZJournalError, CLIError, OSError, ImportError) as e:
        logger.debug("failed", exc_info=True)
        print("zodb-journal %s: error: %s" % (args.subcommand, e),
              file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("zodb-journal: interrupted", file=sys.stderr)
        return 130


def _parser():
    parser = argparse.ArgumentParser(
        prog="zodb-journal",
        description="Inspect zjournal journals and rebuild ZODBs from them.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-vv: debug, with tracebacks)")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="summarize a journal")
    p.add_argument("journal", metavar="JOURNAL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("verify", help="check every record of a journal")
    p.add_argument("journal", metavar="JOURNAL")
    p.add_argument("--decode", action="store_true",
                   help="also decode every payload (safe: no code runs)")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("dump", help="print journal entries")
    p.add_argument("journal", metavar="JOURNAL")
    p.add_argument("--start", type=int, default=1, metavar="N",
                   help="first seq to print (default 1)")
    p.add_argument("--stop", type=int, default=None, metavar="N",
                   help="print seqs below N (exclusive, as in range)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line")
    _import_option(p, required=False)
    p.set_defaults(run=cmd_dump)

    p = sub.add_parser("rebuild", help="replay a journal into an empty ZODB")
    p.add_argument("journal", metavar="JOURNAL")
    p.add_argument("--zodb", required=True, metavar="PATH_OR_URI",
                   help="FileStorage path or zodburi URI of the new ZODB")
    _import_option(p, required=True)
    p.add_argument("--until", metavar="SEQ_OR_ISOTIME",
                   help="stop after this seq, or after the last command"
                        " executed at or before this time")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="commands per ZODB commit (default 1000)")
    p.set_defaults(run=cmd_rebuild)

    p = sub.add_parser("salvage", help="copy the intact transactions of a"
                       " damaged journal into a new one")
    p.add_argument("journal", metavar="SRC")
    p.add_argument("target", metavar="DST",
                   help="directory for the new journal (must not exist or"
                        " be empty)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_salvage)

    p = sub.add_parser("demo", help="run the bank demo: journal, throw the"
                       " ZODB away, rebuild, compare")
    p.add_argument("--dir", metavar="DIR",
                   help="keep the demo's files here (default: a temporary"
                        " directory, removed afterwards)")
    p.add_argument("--commands", type=int, default=3000, metavar="N",
                   help="how many commands to run (default 3000)")
    p.set_defaults(run=cmd_demo)
    return parser


def _import_option(p, required):
    p.add_argument("--import", dest="imports", action="append", default=[],
                   required=required, metavar="MODULE",
                   help="module defining command classes (repeatable)")


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


def open_journal(spec):
    """Open a journal read-only from a directory path or a URI."""
    from zjournal.journal import FileJournal
    return FileJournal(_journal_path(spec), readonly=True)


def import_modules(names):
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise CLIError("cannot import %s: %s" % (name, e)) from e


def iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_until(text):
    """Return ``(seq, None)`` or ``(None, aware_datetime)``."""
    if text is None:
        return None, None
    if text.isdigit():
        return int(text), None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CLIError("--until takes a sequence number or an ISO 8601 time,"
                       " not %r" % text) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return None, when


def jsonable(value):
    """Command arguments as JSON can carry them."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    return str(value)


# -- subcommands ---------------------------------------------------------

def cmd_info(args):
    with open_journal(args.journal) as journal:
        info = journal.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    print("journal:    %s" % info["path"])
    print("identity:   %s" % info["identity"])
    print("format:     %d" % info["format_version"])
    print("created:    %s" % iso(info["created"]))
    print("segments:   %d (%s bytes)" % (info["segments"],
                                         format(info["bytes"], ",")))
    print("seq:        %d .. %d" % (info["first_seq"], info["last_seq"]))
    print("writer:     %s" % ("active" if info["writer_active"] else "none"))
    torn = info["torn_tail"]
    if torn:
        print("tail:       incomplete, %d bytes at %s:%d (%s)"
              % (torn["bytes"], torn["file"], torn["offset"], torn["reason"]))
    return EXIT_OK


def cmd_verify(args):
    from zjournal.errors import CorruptJournalError
    from zjournal.errors import DecodeError
    from zjournal.journal import writer_active
    with open_journal(args.journal) as journal:
        try:
            report = journal.verify()
            if args.decode:
                for entry in journal.entries(1, report.last_seq + 1):
                    entry.args
        except (CorruptJournalError, DecodeError) as e:
            print("FAILED: %s" % e)
            return EXIT_FAILURE
        busy = writer_active(journal.path)
    rate = report.records / max(report.seconds, 1e-9)
    print("%s: %s records in %d segment(s), %s bytes, seq %s..%d"
          " (%.0f records/s)" % (
              journal.path, format(report.records, ","), report.segments,
              format(report.bytes, ","), report.first_seq or "-",
              report.last_seq, rate))
    torn = report.torn_tail
    if torn is None:
        print("OK")
        return EXIT_OK
    if busy:
        print("OK; %d bytes at %s:%d are a write in progress (a writer is"
              " active)" % (torn.size, torn.path, torn.offset))
        return EXIT_OK
    print("FAILED: incomplete tail of %d bytes at %s:%d (%s); no valid"
          " record follows it, so it is a torn write that was never"
          " acknowledged: the next writer to open the journal cuts it and"
          " keeps the bytes aside" % (torn.size, torn.path, torn.offset,
                                      torn.reason))
    return EXIT_FAILURE


def cmd_dump(args):
    import_modules(args.imports)
    with open_journal(args.journal) as journal:
        for entry in journal.entries(args.start, args.stop):
            try:
                entry_args = entry.args
            except Exception as e:
                entry_args = {"<undecodable>": str(e)}
            if args.json:
                line = json.dumps({
                    "seq": entry.seq, "time": entry.time,
                    "command_name": entry.command_name,
                    "version": entry.version, "args": jsonable(entry_args)},
                    sort_keys=True)
            else:
                if isinstance(entry_args, dict):
                    shown = " ".join("%s=%r" % kv
                                     for kv in sorted(entry_args.items()))
                else:
                    shown = repr(entry_args)
                line = "%d %s %s %s" % (entry.seq, iso(entry.time),
                                        entry.command_name, shown)
            print(line)
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
                batch_size=args.batch_size, progress=progress)
            ok = True
        finally:
            progress.close()
            db.close()
            if not ok:
                for path in created:
                    _remove(path)
    rate = result.replayed / max(result.seconds, 1e-9)
    print("rebuilt %s from %s: %s commands in %.2fs (%.0f commands/s)"
          % (args.zodb, journal.path, format(result.replayed, ","),
             result.seconds, rate))
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
        try:
            import zodburi
        except ImportError:
            raise CLIError("--zodb URIs need zodburi: pip install"
                           " 'zjournal[uri]'") from None
        created = []
        if spec.startswith("file://"):
            created = _missing_files(urllib.parse.urlsplit(spec).path)
        try:
            factory, dbkw = zodburi.resolve_uri(spec)
            storage = factory()
        except (KeyError, ValueError) as e:
            raise CLIError("cannot open --zodb %s: %s" % (spec, e)) from e
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
