"""zodb-journal check-replay: does replaying the journal give the live ZODB?

Usage::

    zodb-journal check-replay JOURNAL --zodb LIVE --import MODULE ...
                              [--scratch PATH] [--batch-size N] [--json]

The live ZODB is opened read-only and its marker read: it holds the
effects of commands 1..M.  The journal's commands 1..M are replayed into
a scratch FileStorage (in a temporary directory, removed afterwards,
unless ``--scratch`` names one to keep), and the two states are compared
through their canonical digests (:mod:`zjournal.digest`).  Where the
journal holds state digests (``JournaledDB(digest_interval=N)``), each is
compared with the digest of the replay at the same point, which bounds
where the two histories parted: after the last digest that matched, by
the first that did not.

A difference means that replay does not reproduce the live database: a
command is not deterministic (it read the clock, a random generator or
the environment instead of its context), or something changed the
database without a command (``allow_unjournaled``, a script with a plain
``ZODB.DB``), or the code now replaying differs from the code that ran.

Exit status: 0 the states are equal (and every digest matched); 1 they
differ, the replay failed, or zjournal refused; 2 bad usage.
"""
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import transaction

from zjournal import commands
from zjournal import digest
from zjournal.digest import DIGEST_COMMAND
from zjournal.digest import SCHEME
from zjournal.digest import WalkProgress
from zjournal.errors import HistoryMismatchError
from zjournal.errors import NotJournaledError
from zjournal.errors import RecoveryError
from zjournal.errors import ReplayError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZODBAheadError
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker
from zjournal.recovery import check_replayable
from zjournal.recovery import replay

logger = logging.getLogger(__name__)

# Commands listed one by one in the interval where states parted; beyond
# that, counted by name.
SHOW_COMMANDS = 20


class CheckReplayError(RecoveryError):
    """check-replay cannot compare this ZODB with this journal.

    The message says what is missing (the journal's first records, a
    marker) and what to check against instead.
    """


def add_subcommands(sub):
    from zjournal.cli import import_option
    from zjournal.cli import journal_argument
    p = sub.add_parser(
        "check-replay", help="replay a journal into a scratch ZODB and"
        " compare it with the live one, object by object")
    journal_argument(p)
    p.add_argument("--zodb", required=True, metavar="PATH_OR_URI",
                   help="the live ZODB (FileStorage path or zodburi URI),"
                        " opened read-only")
    import_option(p, required=True)
    p.add_argument("--scratch", metavar="PATH_OR_URI",
                   help="replay into this new, empty ZODB and keep it"
                        " (default: a temporary FileStorage, removed"
                        " afterwards)")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="commands per ZODB commit of the replay (default"
                        " 1000)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object")
    p.set_defaults(run=cmd_check_replay)


class Checkpoint:
    """A digest the journal recorded, and what the replay found there."""

    def __init__(self, seq, after, recorded, replayed=None, scheme=SCHEME):
        self.seq = seq              # the digest entry's own seq
        self.after = after          # the seq whose state it describes
        self.recorded = recorded
        self.replayed = replayed    # None: not computed
        self.scheme = scheme

    @property
    def matched(self):
        return self.replayed is not None and self.replayed == self.recorded


class Report:
    """What check-replay found; :meth:`as_dict` is its ``--json`` form."""

    def __init__(self, journal, live, last_seq, journal_seq):
        self.journal = journal
        self.live = live
        self.last_seq = last_seq          # the live marker's seq
        self.journal_seq = journal_seq
        self.replayed = 0
        self.seconds = 0.0
        self.checkpoints = []
        self.skipped_schemes = 0
        self.comparison = None
        self.replay_error = None          # (seq, name, message)
        self.divergence = None            # (after, by, entries)

    @property
    def first_mismatch(self):
        for c in self.checkpoints:
            if c.replayed is not None and not c.matched:
                return c
        return None

    @property
    def ok(self):
        return (self.replay_error is None and self.first_mismatch is None
                and self.comparison is not None and self.comparison.equal)

    def as_dict(self):
        c = self.comparison
        mismatch = self.first_mismatch
        result = {
            "ok": self.ok, "journal": self.journal, "live": self.live,
            "seq": self.last_seq, "journal_seq": self.journal_seq,
            "replayed": self.replayed, "seconds": round(self.seconds, 3),
            "digests": {
                "recorded": len(self.checkpoints),
                "compared": sum(1 for x in self.checkpoints
                                if x.replayed is not None),
                "matched": sum(1 for x in self.checkpoints if x.matched),
                "other_scheme": self.skipped_schemes,
                "first_mismatch": None if mismatch is None else {
                    "seq": mismatch.seq, "after": mismatch.after,
                    "recorded": mismatch.recorded,
                    "replayed": mismatch.replayed},
            },
            "live_digest": c and c.live.hexdigest,
            "replayed_digest": c and c.replayed.hexdigest,
            "objects": c and {"live": c.live.objects,
                              "replayed": c.replayed.objects},
            "difference": (c.difference.as_dict()
                           if c is not None and c.difference else None),
            "replay_error": None if self.replay_error is None else dict(
                zip(("seq", "command_name", "error"), self.replay_error)),
            "divergence": None,
        }
        if self.divergence is not None:
            after, by, entries = self.divergence
            result["divergence"] = {
                "after": after, "by": by,
                "commands": [{"seq": s, "command_name": n}
                             for s, n in entries]}
        return result


def check_replay(journal, live_db, scratch_db, batch_size=1000,
                 progress=None, walk_progress=None, label=None, known=None):
    """Replay ``journal`` into the empty ``scratch_db`` up to the live
    marker's seq and compare; return a :class:`Report`.

    Refusals (no marker, another journal, another history, a ZODB ahead
    of its journal, a command the code does not know) raise the
    :mod:`zjournal.errors` class that says so, before anything is
    replayed.

    ``known``: the command names registered before the live ZODB was
    opened (default: those registered when this is called).  Loading the
    live root imports the modules of the classes stored there, and they
    may register commands that the modules a rebuild imports do not:
    only names registered beforehand count, so that a check that passes
    means a rebuild with the same imports passes.
    """
    if known is None:
        known = frozenset(commands.registered_names())
    live_tm = transaction.TransactionManager()
    live_conn = live_db.open(live_tm)
    try:
        live_root = live_conn.root()
        marker = _live_marker(live_root, journal, label)
        report = Report(journal.path, label, marker.last_seq,
                        journal.last_seq)
        # A command this code cannot decode is a gap in --import, not a
        # divergence.  The same pass collects the recorded digests:
        # replay passes over them (they are flagged as queries).
        recorded = []
        _check_decodable(_collect_digests(
            journal.entries(1, marker.last_seq + 1), recorded), known)
        with _scratch(scratch_db, journal) as (tm, conn):
            _replay(report, journal, tm, conn, batch_size, progress,
                    recorded)
            if report.replay_error is None:
                report.comparison = digest.compare(
                    live_root, conn.root(), progress=walk_progress)
    finally:
        live_tm.abort()
        live_conn.close()
    report.divergence = _divergence(journal, report)
    return report


def _check_decodable(entries, known):
    """Refuse, before replaying, an entry the code cannot decode.

    A name outside ``known`` is refused even if opening the live ZODB
    has since registered it: a rebuild would not have it.
    """
    def only_known(entries):
        for entry in entries:
            if not entry.is_query and entry.command_name not in known:
                raise CheckReplayError(
                    "seq %d of the journal is command %r, which none of the"
                    " --import modules defines; found before anything was"
                    " replayed, so nothing was compared. A rebuild or replay"
                    " with the same --import would stop there: add --import"
                    " for the module that defines it (opening the live ZODB"
                    " may import it for its stored classes, which is why"
                    " check-replay does not count on that)"
                    % (entry.seq, entry.command_name))
            yield entry
    try:
        check_replayable(only_known(entries))
    except ReplayError as e:
        cause = e.__cause__
        raise CheckReplayError(
            "seq %d of the journal (%s) cannot be decoded by this code;"
            " found before anything was replayed, so nothing was compared:"
            " %s" % (e.seq, e.command_name,
                     cause if cause is not None else e)) from cause


def _live_marker(root, journal, label):
    marker = root.get(MARKER_KEY)
    if marker is None:
        raise NotJournaledError(
            "the live ZODB %s holds no zjournal marker: it was not built"
            " from a journal, so there is nothing to replay it against"
            % label)
    _check_history(marker, journal, label)
    return marker


@contextlib.contextmanager
def _scratch(db, journal):
    """A connection to the empty scratch ZODB, its marker in place."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        if len(root):
            raise NotJournaledError(
                "the scratch ZODB is not empty (root keys: %s); give"
                " --scratch a new path"
                % ", ".join(sorted(map(str, root))[:5]))
        root[MARKER_KEY] = Marker(journal.identity, 0)
        tm.commit()
        yield tm, conn
    finally:
        tm.abort()
        conn.close()


def _collect_digests(entries, recorded):
    """Pass ``entries`` through, appending the digest entries among them
    to ``recorded``."""
    for entry in entries:
        if entry.command_name == DIGEST_COMMAND:
            recorded.append(entry)
        yield entry


def _replay(report, journal, tm, conn, batch_size, progress, recorded):
    """Replay up to the live seq, comparing at each recorded digest."""
    checker = _DigestChecker(report, conn.root(), recorded)
    began = time.perf_counter()
    try:
        report.replayed = replay(
            tm, conn, journal.entries(1, report.last_seq + 1),
            batch_size=batch_size, progress=progress, total=report.last_seq,
            observe=checker)
    except ReplayError as e:
        cause = e.__cause__
        report.replay_error = (e.seq, e.command_name, str(e) if cause is None
                               else "%s: %s" % (type(cause).__name__, cause))
    report.seconds = time.perf_counter() - began


class _DigestChecker:
    """The replay's ``observe`` hook: right after the command each
    recorded digest describes (seq ``after``), the digest of the replay's
    own state (its uncommitted batch included) against the one the live
    system recorded.  After the first mismatch the others are only
    listed: the question they answer is settled.

    Replay does not show digest entries to ``observe`` (they are flagged
    as queries), so they are read from the journal beforehand.  Digests
    journaled before they were flagged are executed by replay as
    commands that do nothing, and are met the same way.
    """

    def __init__(self, report, root, recorded):
        self.report = report
        self.root = root
        self.due = {}
        for entry in recorded:
            args = entry.args
            if args.get("scheme") != SCHEME:
                report.skipped_schemes += 1
                continue
            point = Checkpoint(entry.seq, args["after"], args["digest"])
            report.checkpoints.append(point)
            self.due.setdefault(point.after, []).append(point)

    def __call__(self, entry, seconds):
        points = self.due.pop(entry.seq, None)
        if points is None:
            return
        for point in points:
            if self.report.first_mismatch is not None:
                return
            point.replayed = digest.state_digest(self.root).hexdigest
            if not point.matched:
                logger.info("the replay's state after seq %d differs from"
                            " the digest the live database recorded",
                            point.after)


def _check_history(marker, journal, label):
    """The live ZODB must be built from this journal, this history."""
    if marker.skipped:
        raise CheckReplayError(
            "the live ZODB %s was rebuilt with --skip-unknown: it lacks %d"
            " entries of the journal and is not the journal's state, so"
            " there is nothing to verify" % (label, len(marker.skipped)))
    start = getattr(journal, "start_seq", 1)
    if start > 1:
        raise CheckReplayError(
            "journal %s starts at seq %d: zodb-journal prune --remove"
            " deleted its records before that (archived segments would"
            " still be read), and check-replay replays from seq 1: check"
            " against a copy of the journal taken before the removal"
            % (journal.path, start))
    if marker.journal_id != journal.identity:
        raise WrongJournalError(
            "the live ZODB %s was built from journal %s, but journal %s is"
            " %s; check it against its own journal"
            % (label, marker.journal_id, journal.path, journal.identity))
    if marker.last_seq > journal.last_seq:
        raise ZODBAheadError(
            "the live ZODB %s has applied commands up to seq %d, but journal"
            " %s ends at seq %d: the journal cannot reproduce it"
            % (label, marker.last_seq, journal.path, journal.last_seq))
    if marker.last_seq and marker.head is not None:
        entry = next(iter(journal.entries(marker.last_seq,
                                          marker.last_seq + 1)))
        if entry.hash != marker.head:
            raise HistoryMismatchError(
                "the live ZODB %s applied a seq %d whose chain hash is not"
                " that of the journal's record %d: the journal was edited or"
                " replaced after the ZODB applied it; check the ZODB against"
                " the journal it was built from"
                % (label, marker.last_seq, marker.last_seq))


def _divergence(journal, report):
    """(after, by, [(seq, name)]) bounding where the states parted.

    The states matched at the last matching digest (or at the start) and
    differ at the first mismatching digest (or at the end): the
    difference was made by the commands in between, or by a write that
    bypassed the journal while they ran.
    """
    if report.ok:
        return None
    mismatch = report.first_mismatch
    matched = [c.after for c in report.checkpoints if c.matched
               and (mismatch is None or c.seq < mismatch.seq)]
    after = max(matched, default=0)
    if report.replay_error is not None and (
            mismatch is None or report.replay_error[0] <= mismatch.after):
        by = report.replay_error[0]
    elif mismatch is not None:
        by = mismatch.after
    else:
        by = report.last_seq
    entries = [(e.seq, e.command_name)
               for e in journal.entries(after + 1, by + 1)
               if e.command_name != DIGEST_COMMAND and not e.is_query]
    return after, by, entries


def cmd_check_replay(args):
    import ZODB

    from zjournal import cli
    from zjournal.recovery import Progress
    cli.import_modules(args.imports)
    # Before the live ZODB is opened: see check_replay's ``known``.
    known = frozenset(commands.registered_names())
    if args.batch_size < 1:
        raise cli.CLIError("--batch-size must be at least 1")
    tty = sys.stderr.isatty()
    with cli.open_journal(args.journal) as journal:
        storage = cli.open_storage_readonly(args.zodb)
        live_db = ZODB.DB(storage)
        temporary = None
        try:
            if args.scratch is None:
                temporary = tempfile.mkdtemp(prefix="zjournal-check-")
                scratch_db, _ = cli.open_target(
                    os.path.join(temporary, "Data.fs"))
            else:
                scratch_db, _ = cli.open_target(args.scratch)
            progress = Progress("check-replay", tty=tty)
            try:
                report = check_replay(
                    journal, live_db, scratch_db, args.batch_size,
                    progress=progress,
                    walk_progress=WalkProgress("check-replay digest", tty),
                    label=args.zodb, known=known)
            finally:
                progress.close()
                scratch_db.close()
        finally:
            live_db.close()
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(format_report(report, args.scratch)))
    return cli.EXIT_OK if report.ok else cli.EXIT_FAILURE


def format_report(report, scratch=None):
    """The report as lines of text."""
    lines = ["replayed seq 1..%d of journal %s (the live ZODB's seq; the"
             " journal ends at %d) in %.2fs" % (
                 report.last_seq, report.journal, report.journal_seq,
                 report.seconds)]
    compared = [c for c in report.checkpoints if c.replayed is not None]
    if report.checkpoints:
        lines.append("digests: %d recorded in the journal, %d compared, %d"
                     " matched" % (len(report.checkpoints), len(compared),
                                   sum(1 for c in compared if c.matched)))
    elif report.skipped_schemes == 0:
        lines.append("digests: none in the journal (JournaledDB("
                     "digest_interval=N) records them)")
    if report.skipped_schemes:
        lines.append("digests: %d recorded under another digest scheme, not"
                     " compared" % report.skipped_schemes)
    c = report.comparison
    if report.ok:
        lines.append("OK: the replayed state equals the live state (%s"
                     " objects, digest %s)" % (format(c.live.objects, ","),
                                               c.live.hexdigest))
        if scratch:
            lines.append("the replayed ZODB is kept at %s" % scratch)
        return lines
    if report.replay_error is not None:
        seq, name, error = report.replay_error
        lines.append("DIFFERENT: seq %d (%s) raised on replay, though it"
                     " succeeded live: %s" % (seq, name, error))
    if c is not None and c.difference is not None:
        lines.append("DIFFERENT: live and replayed states differ first at")
        lines.extend("  " + line for line in c.difference.describe())
        lines.append("  (live %s objects, digest %s; replayed %s objects,"
                     " digest %s)" % (
                         format(c.live.objects, ","), c.live.hexdigest,
                         format(c.replayed.objects, ","),
                         c.replayed.hexdigest))
    mismatch = report.first_mismatch
    if mismatch is not None:
        lines.append("DIFFERENT: the digest recorded after seq %d (entry %d)"
                     " is not the replay's" % (mismatch.after,
                                                mismatch.seq))
        if c is not None and c.equal:
            lines.append("  the final states are equal again: the"
                         " difference was overwritten later")
    lines.extend(_format_divergence(report))
    if scratch:
        lines.append("the replayed ZODB is kept at %s" % scratch)
    return lines


def _format_divergence(report):
    if report.divergence is None:
        return []
    after, by, entries = report.divergence
    if report.first_mismatch is None and report.replay_error is None:
        bound = "by seq %d (the live ZODB's seq; no digest %s)" % (
            by, "mismatched" if report.checkpoints else "recorded")
    else:
        bound = "by seq %d" % by
    lines = ["the states parted after seq %d%s and %s, in one of these %d"
             " commands (or by a write that bypassed the journal while"
             " they ran):" % (after, " (the last matching digest)"
                              if after else " (the start)", bound,
                              len(entries))]
    for seq, name in entries[:SHOW_COMMANDS]:
        lines.append("  %d %s" % (seq, name))
    if len(entries) > SHOW_COMMANDS:
        counts = {}
        for _, name in entries[SHOW_COMMANDS:]:
            counts[name] = counts.get(name, 0) + 1
        lines.append("  ... and %d more: %s" % (
            len(entries) - SHOW_COMMANDS, ", ".join(
                "%s x%d" % item for item in sorted(
                    counts.items(), key=lambda kv: (-kv[1], kv[0])))))
    return lines
