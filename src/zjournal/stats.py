"""Statistics over a journal: what was done, how much, and when.

:func:`collect` reads entries once, in order, and folds each into running
totals; it never keeps an entry.  Its memory grows with the number of
distinct command names, users, hours and payload sizes, never with the
number of entries: a journal of a billion commands issued by a handful of
command classes over a few years is summarized in a few megabytes.
Payload size percentiles are exact, computed from a count per distinct
size.

Nothing is decoded.  A statistic is a fact about names, times, flags and
sizes, and reading those can run no code; ``by="user"`` reads the
record's metadata, which is JSON.

Groups (``by``):

``command``
    the command name (the default);
``user``
    the ``user`` of the record's metadata, ``""`` when it has none;
``hour``, ``day``
    the UTC hour or day the command first ran in.

A group's ``rate`` is its entries per second over the seconds it covers:
the whole span for a command or a user, the part of the span inside the
period for an hour or a day (the first and last periods are partial).
"""
import datetime
import math

from zjournal.export import iso
from zjournal.format import FLAG_END

GROUPINGS = ("command", "hour", "day", "user")
PERIODS = {"hour": 3600, "day": 86400}
PERCENTILES = (50, 90, 99)
# How many of the busiest hours and days a report lists.
BUSIEST = 5
# Progress is reported every this many entries: a clock read per entry
# would cost more than the rest of the loop.
PROGRESS_EVERY = 10000
# A time farther than this from a bound compares with it the same way
# whether it is rounded to the microsecond or not (rounding moves it by
# half a microsecond at most), so only nearer times need the exact test.
_NEAR = 1e-5


class Group:
    """Running totals of one group."""

    __slots__ = ("key", "entries", "queries", "bytes", "max_bytes")

    def __init__(self, key):
        self.key = key
        self.entries = self.queries = self.bytes = self.max_bytes = 0

    def add(self, size, is_query):
        self.entries += 1
        self.bytes += size
        if size > self.max_bytes:
            self.max_bytes = size
        if is_query:
            self.queries += 1


class Stats:
    """Totals over the entries given to :meth:`add`, in journal order."""

    def __init__(self, by="command"):
        if by not in GROUPINGS:
            raise ValueError("by must be one of %s, not %r"
                             % (", ".join(GROUPINGS), by))
        self.by = by
        self.entries = 0
        self.queries = 0
        self.transactions = 0
        self.first_seq = self.last_seq = None
        # earliest and latest time: not necessarily the first and last
        # entry's (see collect)
        self.min_time = self.max_time = None
        self.groups = {}
        self.commands = {}   # per command name, whatever ``by`` is
        self.hours = {}      # entries per UTC hour number
        self.sizes = {}      # entries per payload size

    def add(self, entry):
        """Fold one entry into the totals."""
        seq, t, name = entry.seq, entry.time, entry.name
        size = len(entry.payload)
        is_query = entry.is_query
        if self.first_seq is None:
            self.first_seq = seq
            self.min_time = self.max_time = t
        elif t < self.min_time:
            self.min_time = t
        elif t > self.max_time:
            self.max_time = t
        self.last_seq = seq
        self.entries += 1
        if is_query:
            self.queries += 1
        if entry.flags & FLAG_END:
            self.transactions += 1
        hour = int(t // 3600)
        self.hours[hour] = self.hours.get(hour, 0) + 1
        self.sizes[size] = self.sizes.get(size, 0) + 1
        group = self.commands.get(name)
        if group is None:
            group = self.commands[name] = Group(name)
        group.add(size, is_query)
        if self.by != "command":
            key = self._key(entry, t)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = Group(key)
            group.add(size, is_query)

    def _key(self, entry, t):
        if self.by == "user":
            return entry.user
        return int(t // PERIODS[self.by])

    # -- the report ----------------------------------------------------

    @property
    def commands_only(self):
        """Entries that change state (queries are skipped by replay)."""
        return self.entries - self.queries

    @property
    def span(self):
        """Seconds from the earliest to the latest time seen."""
        if self.min_time is None:
            return 0.0
        return self.max_time - self.min_time

    def as_dict(self):
        """The report as plain data (what ``--json`` prints)."""
        span = self.span
        return {
            "by": self.by,
            "entries": self.entries,
            "commands": self.commands_only,
            "queries": self.queries,
            "transactions": self.transactions,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_time": self.min_time,
            "last_time": self.max_time,
            "first_iso": _iso(self.min_time),
            "last_iso": _iso(self.max_time),
            "span_seconds": span,
            "rate": _rate(self.commands_only, span),
            "query_rate": _rate(self.queries, span),
            "payload_bytes": self._sizes(),
            "groups": self._groups(),
            "by_command": [self._group(g, g.key, span)
                           for g in _by_count(self.commands.values())],
            "busiest_hours": self._busiest(self.hours, "hour"),
            "busiest_days": self._busiest(self._days(), "day"),
        }

    def _groups(self):
        if self.by == "command":
            groups = _by_count(self.commands.values())
        elif self.by == "user":
            groups = _by_count(self.groups.values())
        else:
            return [self._period(self.groups[k]) for k in sorted(self.groups)]
        return [self._group(g, g.key, self.span) for g in groups]

    def _period(self, group):
        """A period's row, rated over the part of the span inside it."""
        length = PERIODS[self.by]
        begin = max(group.key * length, self.min_time)
        end = min((group.key + 1) * length, self.max_time)
        return self._group(group, period_label(self.by, group.key),
                           max(end - begin, 0.0))

    def _group(self, group, label, seconds):
        return {"key": label, "entries": group.entries,
                "queries": group.queries,
                "share": group.entries / self.entries,
                "bytes": group.bytes,
                "mean_bytes": group.bytes / group.entries,
                "max_bytes": group.max_bytes,
                "rate": _rate(group.entries, seconds)}

    def _sizes(self):
        total = sum(size * n for size, n in self.sizes.items())
        out = {"total": total,
               "mean": total / self.entries if self.entries else None,
               "max": max(self.sizes) if self.sizes else None}
        out.update(("p%d" % p, percentile(self.sizes, p))
                   for p in PERCENTILES)
        return out

    def _days(self):
        days = {}
        for hour, n in self.hours.items():
            day = hour // 24
            days[day] = days.get(day, 0) + n
        return days

    def _busiest(self, counts, period):
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:BUSIEST]
        return [{"period": period_label(period, k), "entries": n}
                for k, n in top]


def period_label(period, number):
    """The UTC hour (``2026-11-27T07Z``) or day (``2026-11-27``) that is
    the ``number``-th since the epoch."""
    start = iso(number * PERIODS[period])
    return start[:10] if period == "day" else start[:13] + "Z"


def percentile(counts, p):
    """The ``p``-th percentile (nearest rank) of values given as counts.

    ``counts`` maps each value to how often it occurs; None when empty.
    """
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise AssertionError("unreachable: rank %d of %d" % (rank, total))


def collect(entries, by="command", since=None, until=None, progress=None,
            total=None):
    """Fold ``entries`` into a :class:`Stats` and return it.

    ``since`` and ``until`` are aware datetimes (or None): only entries
    whose time, to the microsecond, lies between them count.  Entries
    are not assumed to be in time order (commands of concurrent processes
    interleave by commit, not by start time), so every entry is looked at.
    Sequence bounds are the caller's: pass the range to ``entries``.
    ``progress(done, total)`` is called now and then.
    """
    stats = Stats(by)
    after = _time_test(since, lambda a, b: a >= b)
    before = _time_test(until, lambda a, b: a <= b)
    done = 0
    for entry in entries:
        done += 1
        if progress is not None and done % PROGRESS_EVERY == 0:
            progress(done, total)
        if after(entry.time) and before(entry.time):
            stats.add(entry)
    if progress is not None:
        progress(done, done if total is None else total)
    return stats


def _time_test(bound, compare):
    """A test of a time against a datetime bound, as a person reads it.

    Compares at microsecond precision, the precision ``dump`` prints
    times with (as ``rebuild --until`` does), so a time copied from a
    dump selects its own entry.  Floats are compared first; only a time
    within a few microseconds of the bound is turned into a datetime.
    """
    if bound is None:
        return lambda t: True
    limit = bound.timestamp()
    utc = datetime.timezone.utc

    def test(t):
        if abs(t - limit) > _NEAR:
            return compare(t, limit)
        return compare(datetime.datetime.fromtimestamp(t, utc), bound)
    return test


def _by_count(groups):
    return sorted(groups, key=lambda g: (-g.entries, str(g.key)))


def _iso(t):
    return None if t is None else iso(t)


def _rate(n, seconds):
    return n / seconds if seconds > 0 else None


# -- the human report ------------------------------------------------------

def format_report(report, journal=None):
    """The report of :meth:`Stats.as_dict` as aligned text lines."""
    lines = []
    if journal is not None:
        lines.append("journal:       %s" % journal)
    if not report["entries"]:
        lines.append("entries:       0 (nothing in the range)")
        return lines
    sizes = report["payload_bytes"]
    lines += [
        "seq:           %d .. %d" % (report["first_seq"], report["last_seq"]),
        "time:          %s .. %s (%s)" % (
            report["first_iso"], report["last_iso"],
            _duration(report["span_seconds"])),
        "entries:       %s: %s commands, %s queries, in %s transactions" % (
            format_count(report["entries"]), format_count(report["commands"]),
            format_count(report["queries"]), format_count(report["transactions"])),
        "rate:          %s commands/s, %s queries/s" % (
            format_rate(report["rate"]), format_rate(report["query_rate"])),
        "payload bytes: %s total, mean %.1f, p50 %s, p90 %s, p99 %s,"
        " max %s" % (format_count(sizes["total"]), sizes["mean"], format_count(sizes["p50"]),
                     format_count(sizes["p90"]), format_count(sizes["p99"]), format_count(sizes["max"])),
        "",
    ]
    lines += _table(report["by"], report["groups"])
    if report["by"] != "command":
        lines.append("")
        lines += _table("command", report["by_command"])
    for what in ("hours", "days"):
        lines.append("")
        lines.append("busiest %s:" % what)
        busiest = report["busiest_" + what]
        width = max(len(format_count(b["entries"])) for b in busiest)
        lines += ["  %-14s %*s" % (b["period"], width, format_count(b["entries"]))
                  for b in busiest]
    return lines


_COLUMNS = ("entries", "share", "queries", "bytes", "mean", "max", "rate/s")


def _table(by, groups):
    rows = [(str(g["key"]) if g["key"] != "" else "(none)",
             format_count(g["entries"]), "%.1f%%" % (100 * g["share"]),
             format_count(g["queries"]), format_count(g["bytes"]), "%.1f" % g["mean_bytes"],
             format_count(g["max_bytes"]), format_rate(g["rate"]))
            for g in groups]
    head = ("by " + by,) + _COLUMNS
    return align_columns([head] + rows)


def align_columns(rows):
    """Text table lines: the first column left-aligned, the others
    right-aligned (numbers), two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return out


def format_count(value):
    """A count with thousands separators; ``-`` for none."""
    return "-" if value is None else format(value, ",")


def format_rate(rate):
    """Three significant digits below 100, whole thousands-separated
    numbers above; ``-`` for none."""
    if rate is None:
        return "-"
    return "%.3g" % rate if rate < 100 else format(round(rate), ",")


def _duration(seconds):
    if seconds < 120:
        return "%.3fs" % seconds
    return str(datetime.timedelta(seconds=round(seconds)))
