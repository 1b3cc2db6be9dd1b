"""``zodb-journal replay``: rerun a recorded session and time every command.

Usage::

    zodb-journal replay JOURNAL --import MODULE ... [--zodb SCRATCH]
                        [--profile] [--json] [--compare PROFILE.json]
                        [--start SEQ_OR_ISOTIME] [--until SEQ_OR_ISOTIME]
                        [--batch-size N]

A journal is a recording of real work: every command production ran, in
the order it ran, with its arguments.  Replaying it into a scratch ZODB
runs that workload again against the code that is installed now, so two
versions of an application can be compared on what users really did
rather than on a synthetic benchmark.

The replay is a :func:`zjournal.recovery.rebuild` into ``SCRATCH``, which
must be new or empty (a FileStorage path or a zodburi URI); without
``--zodb`` it goes into a temporary FileStorage that is removed
afterwards.  If the replay fails, the files it created are removed.

``--profile`` reports, per command name, how many commands ran and how
long their ``execute`` took: total, mean, median, 99th percentile and
maximum.  The rest of the wall time (reading and decoding the journal,
committing the batches) is reported as one line, as it cannot be charged
to a command.  ``--json`` prints the profile as JSON; save it, and pass it
to ``--compare`` on a later run with other code to print the ratio of
each command's times, now against then.

Every command is replayed, because each one needs the state the ones
before it left; ``--start`` only chooses where the profile begins (the
commands before it warm up the state), and ``--until`` where the replay
ends.

The times are execute times of one process replaying alone: the
concurrency, conflicts and network of production are not reproduced.
They compare code, not deployments.
"""
import array
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time

from zjournal.errors import ZJournalError
from zjournal.stats import align_columns
from zjournal.stats import format_rate

logger = logging.getLogger(__name__)

#: What a saved profile says it is, so that ``--compare`` can refuse
#: another JSON file with a clear message instead of a KeyError.
PROFILE_FORMAT = "zjournal-replay-profile"
PROFILE_VERSION = 1
# Median ratios outside this band are called slower or faster; inside
# it, a rerun of the same code can land.
NOISE = 0.10


class ProfileError(ZJournalError):
    """A file given to ``--compare`` is not a readable replay profile."""


class Timings:
    """Execute times per command name, as :func:`~zjournal.recovery.replay`
    reports them through ``observe(entry, seconds)``.

    A sample is kept as a C double in one ``array`` per name (8 bytes a
    command), because the median and the 99th percentile need them all:
    ten million replayed commands take 80 MB.  :meth:`rows` sorts one
    name's samples at a time, as Python floats: for that moment, some 32
    more bytes a sample of that name.  Commands before ``start`` (a seq,
    or an aware datetime) are timed into the totals only.
    """

    def __init__(self, start_seq=None, start_time=None):
        self.start_seq = start_seq or 0
        self.start_time = start_time
        self.samples = {}
        self.before = set()   # names run before the window opened
        self.executed = 0
        self.execute_seconds = 0.0
        self.first_seq = self.last_seq = None

    def __call__(self, entry, seconds):
        self.executed += 1
        self.execute_seconds += seconds
        if entry.seq < self.start_seq:
            self.before.add(entry.name)
            return
        if self.start_time is not None:
            if _utc(entry.time) < self.start_time:
                self.before.add(entry.name)
                return
            # Times may interleave a little (commands of concurrent
            # processes are journaled by commit); the window starts at
            # the first command at or after the time, and stays open.
            self.start_time = None
            self.start_seq = entry.seq
        samples = self.samples.get(entry.name)
        if samples is None:
            samples = self.samples[entry.name] = array.array("d")
        samples.append(seconds)
        if self.first_seq is None:
            self.first_seq = entry.seq
        self.last_seq = entry.seq

    def unprofiled(self):
        """Names that ran only before the profile began: a comparison
        must not call them gone."""
        return sorted(self.before.difference(self.samples))

    def rows(self):
        """One summary per command name, the costliest first."""
        rows = [summarize(name, samples)
                for name, samples in self.samples.items()]
        total = sum(r["total"] for r in rows)
        for r in rows:
            r["share"] = r["total"] / total if total > 0 else None
        rows.sort(key=lambda r: (-r["total"], r["name"]))
        return rows


def _utc(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)


def summarize(name, samples):
    """Count, total, mean, median, p99 and max of one name's samples."""
    ordered = sorted(samples)
    n = len(ordered)
    total = math.fsum(ordered)
    middle = n // 2
    median = (ordered[middle] if n % 2
              else (ordered[middle - 1] + ordered[middle]) / 2)
    return {"name": name, "count": n, "total": total, "mean": total / n,
            "median": median, "p99": nearest_rank(ordered, 99),
            "max": ordered[-1]}


def nearest_rank(ordered, p):
    """The ``p``-th percentile of sorted values, by nearest rank (the
    definition :func:`zjournal.stats.percentile` uses too)."""
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def replay_session(journal, db, start=None, until=None, batch_size=1000,
                   progress=None):
    """Replay ``journal`` into the empty ZODB ``db`` and time it.

    ``start`` and ``until`` are a seq (int), an aware datetime, or None.
    Returns the profile as plain data (what ``--json`` prints).
    """
    from zjournal import recovery
    timings = Timings(*_split(start))
    until_seq, until_time = _split(until)
    began = time.perf_counter()
    result = recovery.rebuild(
        db, journal, until_seq=until_seq, until_time=until_time,
        batch_size=batch_size, progress=progress, observe=timings)
    wall = time.perf_counter() - began
    rows = timings.rows()
    logger.info("replayed %d entries in %.2fs, %.2fs of it in execute;"
                " profiled %d commands of %d names", result.replayed, wall,
                timings.execute_seconds, sum(r["count"] for r in rows),
                len(rows))
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "journal": journal.path,
        "identity": journal.identity,
        "created": _utc(time.time()).isoformat().replace("+00:00", "Z"),
        "python": platform.python_version(),
        "zjournal": _version(),
        "replayed": result.replayed,
        "executed": timings.executed,
        "wall_seconds": wall,
        "execute_seconds": timings.execute_seconds,
        "other_seconds": max(wall - timings.execute_seconds, 0.0),
        "first_seq": timings.first_seq,
        "last_seq": timings.last_seq,
        "profiled": sum(r["count"] for r in rows),
        "profiled_seconds": math.fsum(r["total"] for r in rows),
        "commands": rows,
        "unprofiled_names": timings.unprofiled(),
    }


def _split(bound):
    if bound is None:
        return None, None
    if isinstance(bound, datetime.datetime):
        return None, bound
    return bound, None


def _version():
    import importlib.metadata
    try:
        return importlib.metadata.version("zjournal")
    except importlib.metadata.PackageNotFoundError:
        return None  # a checkout on sys.path, not installed


# -- comparing two profiles ------------------------------------------------

def load_profile(path):
    """Read a profile saved from ``--json``, or refuse with the reason."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ProfileError("cannot read profile %s: %s" % (path, e)) from e
    except ValueError as e:
        raise ProfileError("%s is not JSON (%s): give --compare the output"
                           " of zodb-journal replay --profile --json"
                           % (path, e)) from e
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError("%s is not a replay profile: give --compare the"
                           " output of zodb-journal replay --profile --json"
                           % path)
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError("%s is a version %r replay profile; this zjournal"
                           " reads version %d" % (path, data.get("version"),
                                                  PROFILE_VERSION))
    try:
        for row in data["commands"]:
            for key in ("count", "total", "mean", "median", "p99", "max"):
                float(row[key])
            str(row["name"])
        float(data["wall_seconds"])
        float(data["execute_seconds"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError("%s is an incomplete replay profile (%s: %s)"
                           % (path, type(e).__name__, e)) from e
    return data


def compare(now, then):
    """Ratios of ``now``'s times to ``then``'s, per command and overall.

    A ratio above 1 means slower now.  Per-command times are compared,
    not totals, so that profiles of different ranges of one journal still
    compare; the counts are shown so that a reader can tell when they
    differ.  The median is the verdict: one garbage collection or page
    fault moves a mean and a p99, not a median.
    """
    before = {r["name"]: r for r in then["commands"]}
    # Profiles saved before unprofiled_names existed say nothing here.
    ran_before_now = set(now.get("unprofiled_names") or ())
    ran_before_then = set(then.get("unprofiled_names") or ())
    rows = []
    for r in now["commands"]:
        old = before.pop(r["name"], None)
        rows.append({
            "not_profiled_then": old is None and r["name"] in ran_before_then,
            "not_profiled_now": False,
            "name": r["name"], "count": r["count"],
            "then_count": old["count"] if old else None,
            "mean": r["mean"], "then_mean": old["mean"] if old else None,
            "median": r["median"],
            "then_median": old["median"] if old else None,
            "mean_ratio": _ratio(r["mean"], old and old["mean"]),
            "median_ratio": _ratio(r["median"], old and old["median"]),
            "p99_ratio": _ratio(r["p99"], old and old["p99"])})
    for old in sorted(before.values(), key=lambda r: -r["total"]):
        rows.append({
            "not_profiled_then": False,
            "not_profiled_now": old["name"] in ran_before_now,
            "name": old["name"], "count": None, "then_count": old["count"],
            "mean": None, "then_mean": old["mean"], "median": None,
            "then_median": old["median"], "mean_ratio": None,
            "median_ratio": None, "p99_ratio": None})
    return {
        "then": {k: then.get(k) for k in (
            "journal", "identity", "created", "zjournal", "first_seq",
            "last_seq", "profiled")},
        "same_journal": then.get("identity") == now["identity"],
        "same_range": (then.get("first_seq"), then.get("last_seq")) == (
            now["first_seq"], now["last_seq"]),
        "wall_ratio": _ratio(now["wall_seconds"], then["wall_seconds"]),
        "execute_ratio": _ratio(now["execute_seconds"],
                                then["execute_seconds"]),
        "commands": rows,
    }


def _ratio(now, then):
    if now is None or not then:
        return None
    return now / then


# -- the human report ------------------------------------------------------

def format_summary(profile, target):
    lines = ["replayed %s entries of %s into %s in %.2fs (%s commands/s)" % (
        format(profile["replayed"], ","), profile["journal"], target,
        profile["wall_seconds"], format(round(
            profile["executed"] / max(profile["wall_seconds"], 1e-9)), ","))]
    return lines


def format_profile(profile):
    """The profile as aligned text lines."""
    wall = max(profile["wall_seconds"], 1e-9)
    lines = [
        "execute  %9.3fs %6.1f%%  inside the commands' execute"
        % (profile["execute_seconds"],
           100 * profile["execute_seconds"] / wall),
        "other    %9.3fs %6.1f%%  reading and decoding the journal,"
        " committing" % (profile["other_seconds"],
                         100 * profile["other_seconds"] / wall),
    ]
    if not profile["commands"]:
        lines.append("no command was executed in the profiled range")
        return lines
    lines.append("profile of seq %d..%d: %s commands, %.3fs in execute" % (
        profile["first_seq"], profile["last_seq"],
        format(profile["profiled"], ","), profile["profiled_seconds"]))
    lines.append("")
    head = ("command", "count", "total s", "share", "mean ms", "median ms",
            "p99 ms", "max ms")
    rows = [(r["name"], format(r["count"], ","), format_rate(r["total"]),
             "-" if r["share"] is None else "%.1f%%" % (100 * r["share"]),
             _ms(r["mean"]), _ms(r["median"]), _ms(r["p99"]), _ms(r["max"]))
            for r in profile["commands"]]
    return lines + align_columns([head] + rows)


def format_comparison(comparison):
    lines = []
    then = comparison["then"]
    lines.append("compared with the profile of %s (zjournal %s), seq %s..%s"
                 % (then["created"], then["zjournal"], then["first_seq"],
                    then["last_seq"]))
    if not comparison["same_journal"]:
        lines.append("WARNING: that profile is of another journal (%s):"
                     " the commands and their arguments differ"
                     % then["identity"])
    elif not comparison["same_range"]:
        lines.append("note: that profile covers another range of the"
                     " journal: times per command compare, counts differ")
    lines.append("ratio = now / then: above 1 is slower now")
    lines.append("wall %s, execute %s" % (
        _x(comparison["wall_ratio"]), _x(comparison["execute_ratio"])))
    lines.append("")
    head = ("command", "count", "then", "median ms", "then ms", "median",
            "mean", "p99", "verdict")
    rows = []
    for r in comparison["commands"]:
        rows.append((r["name"], _n(r["count"]), _n(r["then_count"]),
                     _ms(r["median"]), _ms(r["then_median"]),
                     _x(r["median_ratio"]), _x(r["mean_ratio"]),
                     _x(r["p99_ratio"]), _verdict(r)))
    return lines + align_columns([head] + rows)


def _verdict(row):
    """new, gone, slower, faster or nothing, by the median.  A median
    of 0 (a command too fast for the clock) has no ratio: no verdict.

    A name in one profile only may have run in the other replay before
    its profile began (``--start``): that is "not profiled", not new or
    gone.
    """
    ratio = row["median_ratio"]
    if row["then_count"] is None:
        return "not profiled then" if row.get("not_profiled_then") else "new"
    if row["count"] is None:
        return "not profiled" if row.get("not_profiled_now") else "gone"
    if ratio is None:
        return ""
    if ratio > 1 + NOISE:
        return "slower"
    if ratio < 1 - NOISE:
        return "faster"
    return ""




def _ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return "%.3g" % ms if ms < 1000 else format(round(ms), ",")


def _x(ratio):
    return "-" if ratio is None else "%.2fx" % ratio


def _n(value):
    return "-" if value is None else format(value, ",")


# -- the subcommand ----------------------------------------------------------

def add_subcommands(sub):
    from zjournal.cli import import_option
    from zjournal.cli import journal_argument
    p = sub.add_parser(
        "replay", help="rerun a journal's session against today's code in a"
        " scratch ZODB, and time each command name")
    journal_argument(p)
    p.add_argument("--zodb", metavar="SCRATCH",
                   help="new or empty FileStorage path or zodburi URI to"
                        " replay into, kept afterwards (default: a"
                        " temporary FileStorage, removed)")
    import_option(p, required=True)
    p.add_argument("--profile", action="store_true",
                   help="report execute times per command name")
    p.add_argument("--json", action="store_true",
                   help="print the profile as JSON (implies --profile); save"
                        " it for --compare")
    p.add_argument("--compare", metavar="PROFILE.json",
                   help="compare with a profile saved from an earlier run"
                        " (implies --profile)")
    p.add_argument("--start", metavar="SEQ_OR_ISOTIME",
                   help="profile from this seq, or from the first command"
                        " executed at or after this time (the commands"
                        " before it are replayed too)")
    p.add_argument("--until", metavar="SEQ_OR_ISOTIME",
                   help="stop after this seq, or after the last command"
                        " executed at or before this time")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="commands per ZODB commit (default 1000)")
    p.set_defaults(run=cmd_replay)


def cmd_replay(args):
    from zjournal.cli import CLIError
    from zjournal.cli import EXIT_OK
    from zjournal.cli import import_modules
    from zjournal.cli import open_journal
    from zjournal.cli import parse_until
    from zjournal.recovery import Progress
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    start = _bound(parse_until(args.start, "--start"))
    until = _bound(parse_until(args.until))
    baseline = load_profile(args.compare) if args.compare else None
    import_modules(args.imports)
    with open_journal(args.journal) as journal:
        with _scratch(args.zodb) as (db, target):
            progress = Progress("replay", tty=sys.stderr.isatty())
            try:
                profile = replay_session(journal, db, start, until,
                                         args.batch_size, progress)
            finally:
                progress.close()
    profile["zodb"] = args.zodb
    if baseline is not None:
        profile["comparison"] = compare(profile, baseline)
    if args.json:
        print(json.dumps(profile, indent=2, sort_keys=True))
        return EXIT_OK
    lines = format_summary(profile, target)
    if args.profile or baseline is not None:
        lines += format_profile(profile)
    if baseline is not None:
        lines += [""] + format_comparison(profile["comparison"])
    print("\n".join(lines))
    return EXIT_OK


def _bound(parsed):
    seq, when = parsed
    return when if seq is None else seq


@contextlib.contextmanager
def _scratch(spec):
    """The ZODB to replay into and how to name it: ``spec`` (new or
    empty), or a temporary FileStorage.  What the replay created is
    removed if it fails, and the temporary storage always."""
    from zjournal.cli import open_target
    if spec is not None:
        db, created = open_target(spec)
        try:
            yield db, spec
        except BaseException:
            db.close()
            for path in created:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            raise
        db.close()
        return
    directory = tempfile.mkdtemp(prefix="zjournal-replay-")
    try:
        db, _ = open_target(os.path.join(directory, "Data.fs"))
        try:
            yield db, "a temporary FileStorage"
        finally:
            db.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
