"""The HTML report of ``zodb-journal stats --html FILE``.

One file that a browser opens from disk, offline: the styles are inline,
the charts are SVG drawn here, and there is no script and no reference to
anything outside the file.  A Content-Security-Policy in the page says so
to the browser too, so a report that is mailed around or opened on a
machine without network access shows the same thing, and cannot be made
to fetch anything.

The report shows:

- the journal: identity, path, sequence and time span, totals, rates;
- commands over time: a bar per period, the period chosen from the span
  (seconds to weeks) so that the chart has at most :data:`MAX_BARS` bars;
- the top command names: entries, share, queries, bytes;
- record sizes: percentiles and a distribution by powers of two;
- gaps: the distribution of the time between consecutive entries, the
  longest gaps, and the idle periods longer than a threshold;
- the busiest hours and days.

Everything is computed in the one pass :mod:`zjournal.stats` makes over
the entries, with memory bounded by the number of command names and
sizes, never by the number of entries (the timeline coarsens itself as it
grows, see :class:`Timeline`).  Nothing is decoded, so no command code
runs; command names and everything else from the journal are escaped.
"""
import bisect
import datetime
import heapq
import html
import os

from zjournal import stats
from zjournal.errors import ZJournalError
from zjournal.export import iso

#: The chart's period is the shortest of these (seconds) that draws the
#: span in at most MAX_BARS bars.  Each divides the next, so counts kept
#: at one width merge exactly into the next; all are aligned on the epoch
#: (UTC), hence days start at midnight UTC.
WIDTHS = (1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400,
          28 * 86400, 364 * 86400)
MAX_BARS = 180
# The timeline keeps at most this many periods while collecting, merging
# into the next width when it has more: bounded memory, fine enough to
# choose the chart's width at the end.
KEEP_BUCKETS = 4096
# Upper bounds (seconds) of the classes of time between two consecutive
# entries; the last class is everything longer.
GAP_BOUNDS = (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 6 * 3600, 86400)
GAP_LABELS = ("< 1 ms", "1-10 ms", "10-100 ms", "0.1-1 s", "1-10 s",
              "10 s-1 min", "1-10 min", "10 min-1 h", "1-6 h", "6 h-1 day",
              ">= 1 day")
LONGEST_GAPS = 10
TOP_COMMANDS = 25
DEFAULT_GAP_THRESHOLD = 3600.0

# The chart's geometry, in CSS pixels.  Bars are whole pixels wide with a
# pixel between them, drawn with crisp edges, so each is visible on its
# own on a screen of any density.
CHART_HEIGHT = 220
MARGIN_LEFT = 60
MARGIN_RIGHT = 16
MARGIN_TOP = 12
MARGIN_BOTTOM = 44
PLOT_WIDTH = 900
MAX_SLOT = 40
BAR_COLOR = "#2f6f9f"


class Timeline:
    """Entries per period, at the finest width that fits KEEP_BUCKETS."""

    def __init__(self):
        self.level = 0
        self.counts = {}

    @property
    def width(self):
        return WIDTHS[self.level]

    def add(self, t):
        key = int(t // WIDTHS[self.level])
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if len(counts) > KEEP_BUCKETS and self.level + 1 < len(WIDTHS):
            self._coarsen()

    def _coarsen(self):
        while (len(self.counts) > KEEP_BUCKETS
               and self.level + 1 < len(WIDTHS)):
            factor = WIDTHS[self.level + 1] // WIDTHS[self.level]
            merged = {}
            for key, n in self.counts.items():
                merged[key // factor] = merged.get(key // factor, 0) + n
            self.counts = merged
            self.level += 1

    def series(self, max_bars=MAX_BARS):
        """``(width, [(start_time, count), ...])`` with a period for every
        width from the first to the last, empty ones included."""
        if not self.counts:
            return self.width, []
        level, counts = self.level, self.counts
        while True:
            first, last = min(counts), max(counts)
            if last - first + 1 <= max_bars or level + 1 == len(WIDTHS):
                break
            factor = WIDTHS[level + 1] // WIDTHS[level]
            merged = {}
            for key, n in counts.items():
                merged[key // factor] = merged.get(key // factor, 0) + n
            counts, level = merged, level + 1
        width = WIDTHS[level]
        return width, [(key * width, counts.get(key, 0))
                       for key in range(first, last + 1)]


class ReportStats(stats.Stats):
    """:class:`zjournal.stats.Stats` plus what the HTML report draws."""

    def __init__(self, by="command", gap_threshold=DEFAULT_GAP_THRESHOLD):
        super().__init__(by)
        self.gap_threshold = gap_threshold
        self.timeline = Timeline()
        self.gap_classes = [0] * (len(GAP_BOUNDS) + 1)
        self.out_of_order = 0
        self.longest = []   # a min-heap of (seconds, seq, time before)
        self.idle = 0
        self.idle_seconds = 0.0
        self._previous = None

    def add(self, entry):
        super().add(entry)
        t = entry.time
        self.timeline.add(t)
        previous = self._previous
        self._previous = t
        if previous is None:
            return
        gap = t - previous
        if gap < 0:
            # Commands of concurrent processes are journaled in commit
            # order, stamped when they began: a later entry may be
            # stamped a little earlier.
            self.out_of_order += 1
            return
        self.gap_classes[bisect.bisect_right(GAP_BOUNDS, gap)] += 1
        if gap >= self.gap_threshold:
            self.idle += 1
            self.idle_seconds += gap
        item = (gap, entry.seq, previous)
        if len(self.longest) < LONGEST_GAPS:
            heapq.heappush(self.longest, item)
        elif item > self.longest[0]:
            heapq.heapreplace(self.longest, item)

    def longest_gaps(self):
        """``[(seconds, seq after the gap, time before, time after)]``,
        longest first."""
        return [(gap, seq, before, before + gap)
                for gap, seq, before in sorted(self.longest, reverse=True)]


def collect(entries, by="command", since=None, until=None, progress=None,
            total=None, gap_threshold=DEFAULT_GAP_THRESHOLD):
    """:func:`zjournal.stats.collect`, into a :class:`ReportStats`."""
    result = ReportStats(by, gap_threshold)
    after = stats._time_test(since, lambda a, b: a >= b)
    before = stats._time_test(until, lambda a, b: a <= b)
    done = 0
    for entry in entries:
        done += 1
        if progress is not None and done % stats.PROGRESS_EVERY == 0:
            progress(done, total)
        if after(entry.time) and before(entry.time):
            result.add(entry)
    if progress is not None:
        progress(done, done if total is None else total)
    return result


# -- writing -----------------------------------------------------------------

class ReportWriteError(ZJournalError):
    """The report file cannot be written where it was asked for."""


def write(path, text):
    """Write ``text`` to ``path`` through a temporary file renamed over it:
    a reader never sees half a report, and a failure leaves the old one.

    The temporary file is an implementation detail: an error names the
    file that was asked for.
    """
    part = path + ".part"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with open(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException as e:
        try:
            os.remove(part)
        except OSError:
            pass
        if isinstance(e, OSError):
            directory = os.path.dirname(os.path.abspath(path))
            hint = ("" if os.path.isdir(directory) else
                    " (the directory %s does not exist)" % directory)
            raise ReportWriteError("cannot write the report %s: %s%s" % (
                path, e.strerror or e, hint)) from e
        raise


# -- rendering ---------------------------------------------------------------

def _e(value):
    return html.escape(str(value), quote=True)


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
 color:#222;margin:24px auto;max-width:1000px;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;
 border-bottom:1px solid #ddd;padding-bottom:3px}
p.note{color:#555;margin:4px 0 10px}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:2px 10px 2px 0;text-align:right;vertical-align:top}
th{font-weight:600;border-bottom:1px solid #ccc}
td.l,th.l{text-align:left}
table.facts th{text-align:left;border:0;padding-right:16px}
table.facts td{text-align:left}
code,.name{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
td.share{width:160px}
span.hbar{display:inline-block;height:10px;background:#9bb8d0;
 vertical-align:middle}
svg.chart text{font:11px system-ui,sans-serif;fill:#444}
svg.chart .axis{stroke:#888;stroke-width:1}
svg.chart .grid{stroke:#e4e4e4;stroke-width:1}
svg.chart rect.bar{fill:%s}
footer{margin-top:32px;color:#777;font-size:12px}
""" % BAR_COLOR


def render(report, info=None, generated=None):
    """The HTML report of a :class:`ReportStats` as a string.

    ``info`` is the journal's :meth:`info` dict (path, identity, created,
    bytes, ...) as far as known; ``generated`` the report's time (now).
    """
    info = dict(info or {})
    data = report.as_dict()
    if generated is None:
        generated = datetime.datetime.now(datetime.timezone.utc).timestamp()
    title = "zjournal report: %s" % (info.get("path") or "journal")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be loaded from anywhere: not even from this file's
        # directory.  Inline styles only; no script at all.
        '<meta http-equiv="Content-Security-Policy" content="default-src'
        " 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width,'
        ' initial-scale=1">',
        "<title>%s</title>" % _e(title),
        "<style>%s</style>" % STYLE,
        "</head><body>",
        "<h1>Journal report</h1>",
        '<p class="note">%s</p>' % _e(info.get("path") or ""),
    ]
    parts += _summary(data, info)
    if data["entries"]:
        parts += _timeline(report)
        parts += _commands(data)
        parts += _sizes(report, data)
        parts += _gaps(report)
        parts += _busiest(data)
    parts.append("<footer>Generated by zodb-journal stats --html at %s."
                 " Times are UTC.</footer>" % _e(iso(generated)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _facts(rows):
    out = ['<table class="facts">']
    out += ["<tr><th>%s</th><td>%s</td></tr>" % (_e(k), v) for k, v in rows]
    out.append("</table>")
    return out


def _summary(data, info):
    rows = []
    if info.get("identity"):
        rows.append(("identity", "<code>%s</code>" % _e(info["identity"])))
    if info.get("created"):
        rows.append(("created", _e(iso(info["created"]))))
    if info.get("bytes") is not None:
        rows.append(("size on disk", "%s bytes" % _e(stats.format_count(info["bytes"]))))
    if not data["entries"]:
        rows.append(("entries", "0 (nothing in the range)"))
        return ["<h2>Journal</h2>"] + _facts(rows)
    sizes = data["payload_bytes"]
    rows += [
        ("seq", "%s .. %s" % (_e(stats.format_count(data["first_seq"])),
                              _e(stats.format_count(data["last_seq"])))),
        ("time", "%s .. %s (%s)" % (
            _e(data["first_iso"]), _e(data["last_iso"]),
            _e(_duration(data["span_seconds"])))),
        ("entries", "%s: %s commands, %s queries, in %s transactions" % (
            _e(stats.format_count(data["entries"])), _e(stats.format_count(data["commands"])),
            _e(stats.format_count(data["queries"])), _e(stats.format_count(data["transactions"])))),
        ("rate", "%s commands/s over the span" % _e(stats.format_rate(data["rate"]))),
        ("payload bytes", "%s in all" % _e(stats.format_count(sizes["total"]))),
    ]
    return ["<h2>Journal</h2>"] + _facts(rows)


def _timeline(report):
    width, series = report.timeline.series()
    chart, drawn = timeline_svg(series, width)
    busiest = max(series, key=lambda item: item[1])
    return [
        '<h2 id="timeline">Commands over time</h2>',
        '<p class="note">Entries per %s, from %s to %s; %d of %d periods'
        " have entries. The busiest %s began %s, with %s entries.</p>" % (
            _e(_period_name(width)), _e(iso(series[0][0])),
            _e(iso(series[-1][0] + width)), drawn, len(series),
            _e(_period_name(width)), _e(iso(busiest[0])),
            _e(stats.format_count(busiest[1]))),
        chart,
    ]


def timeline_svg(series, width):
    """An SVG bar chart of ``series`` ((start, count) per period) and the
    number of bars drawn (periods with entries)."""
    n = len(series)
    slot = max(2, min(MAX_SLOT, PLOT_WIDTH // n))
    bar = slot - 1
    plot_w = slot * n
    top, lines = nice_scale(max(count for _, count in series))
    x0, y0 = MARGIN_LEFT, MARGIN_TOP
    total_w = x0 + plot_w + MARGIN_RIGHT
    total_h = y0 + CHART_HEIGHT + MARGIN_BOTTOM
    base = y0 + CHART_HEIGHT
    out = ['<svg id="timeline-chart" class="chart" role="img"'
           ' width="%d" height="%d" viewBox="0 0 %d %d"'
           ' data-bars="%d" data-period="%d" aria-label="entries per %s">'
           % (total_w, total_h, total_w, total_h,
              sum(1 for _, c in series if c), width,
              _e(_period_name(width)))]
    # Lines lie on half pixels, so that each covers one row or column of
    # pixels outside the bars: the axes run just left of and just below
    # the plot, and the bars, drawn after the grid, cover it.
    out.append('<g shape-rendering="crispEdges">')
    for i in range(lines + 1):
        value = top * i // lines
        y = base - round(CHART_HEIGHT * i / lines)
        out.append('<line class="grid" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>'
                   % (x0, y - 0.5, x0 + plot_w, y - 0.5))
        out.append('<text x="%d" y="%d" text-anchor="end">%s</text>'
                   % (x0 - 6, y + 4, _e(_tick(value))))
    out.append('<line class="axis" x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>'
               % (x0 - 1, base + 0.5, x0 + plot_w, base + 0.5))
    out.append('<line class="axis" x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>'
               % (x0 - 0.5, y0, x0 - 0.5, base + 1))
    # About six labels, each with room for its text (some 80 pixels).
    step = max(1, -(-n // 6), -(-80 // slot))
    for i in range(0, n, step):
        x = x0 + i * slot
        out.append('<line class="axis" x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>'
                   % (x + 0.5, base + 1, x + 0.5, base + 5))
        out.append('<text x="%d" y="%d" text-anchor="start">%s</text>'
                   % (x, base + 18, _e(_axis_label(series[i][0], width))))
    out.append("</g>")
    drawn = 0
    out.append('<g class="bars" shape-rendering="crispEdges">')
    for i, (start, count) in enumerate(series):
        if not count:
            continue
        drawn += 1
        h = max(1, round(CHART_HEIGHT * count / top))
        out.append(
            '<rect class="bar" x="%d" y="%d" width="%d" height="%d"'
            ' data-start="%s" data-count="%d"><title>%s: %s entries</title>'
            "</rect>" % (x0 + i * slot, base - h, bar, h, _e(iso(start)),
                         count, _e(_period_label(start, width)),
                         _e(stats.format_count(count))))
    out.append("</g>")
    out.append("</svg>")
    return "".join(out), drawn


#: The chart's scale ends at one of these times a power of ten, with
#: that many gridlines: round numbers at every line, and close enough
#: above the tallest bar that it fills three quarters of the plot or more.
SCALE_STEPS = ((1, 5), (1.2, 4), (1.5, 3), (2, 4), (2.5, 5), (3, 3), (4, 4),
               (5, 5), (6, 3), (8, 4), (10, 5))


def nice_scale(value):
    """``(top, lines)``: the smallest round top >= ``value`` (a count,
    >= 1) and how many gridlines divide it into round steps."""
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step, lines in SCALE_STEPS:
        top = step * magnitude
        if top != int(top):
            continue  # counts are whole: no scale of 1.5
        if top >= value:
            top = int(top)
            return top, lines if top >= lines else top


def _tick(value):
    return format(value, ",")


def _period_name(width):
    names = {1: "second", 10: "10 seconds", 60: "minute", 300: "5 minutes",
             900: "15 minutes", 3600: "hour", 6 * 3600: "6 hours",
             86400: "day", 7 * 86400: "week", 28 * 86400: "4 weeks",
             364 * 86400: "52 weeks"}
    return names[width]


def _period_label(start, width):
    text = iso(start)
    if width >= 86400:
        return text[:10] if width == 86400 else "from " + text[:10]
    if width >= 60:
        return "%s %s" % (text[:10], text[11:16])
    return "%s %s" % (text[:10], text[11:19])


def _axis_label(start, width):
    text = iso(start)
    if width >= 86400:
        return text[:10]
    if width >= 60:
        return text[5:10] + " " + text[11:16]
    return text[11:19]


def _commands(data):
    rows = data["by_command"]
    out = ['<h2 id="commands">Top commands</h2>',
           '<p class="note">%s command names; the %d with the most entries'
           " first.</p>" % (_e(stats.format_count(len(rows))), min(len(rows), TOP_COMMANDS)),
           '<table id="commands-table"><tr><th class="l">command</th>'
           "<th>entries</th><th class=\"l\">share</th><th>queries</th>"
           "<th>bytes</th><th>mean bytes</th><th>max bytes</th>"
           "<th>per second</th></tr>"]
    for row in rows[:TOP_COMMANDS]:
        out.append(
            '<tr><td class="l name">%s</td><td>%s</td><td class="l share">'
            '<span class="hbar" style="width:%.1f%%"></span> %.1f%%</td>'
            "<td>%s</td><td>%s</td><td>%.1f</td><td>%s</td><td>%s</td></tr>"
            % (_e(row["key"]), _e(stats.format_count(row["entries"])), 70 * row["share"],
               100 * row["share"], _e(stats.format_count(row["queries"])),
               _e(stats.format_count(row["bytes"])), row["mean_bytes"],
               _e(stats.format_count(row["max_bytes"])), _e(stats.format_rate(row["rate"]))))
    rest = rows[TOP_COMMANDS:]
    if rest:
        out.append('<tr><td class="l">%s more</td><td>%s</td>'
                   '<td class="l">%.1f%%</td></tr>' % (
                       _e(stats.format_count(len(rest))),
                       _e(stats.format_count(sum(r["entries"] for r in rest))),
                       100 * sum(r["share"] for r in rest)))
    out.append("</table>")
    return out


def size_classes(sizes):
    """``[(low, high, count)]``: entries per payload size, in classes
    0, 1, 2-3, 4-7, ... (powers of two), from the count per size."""
    classes = {}
    for size, n in sizes.items():
        k = size.bit_length()
        classes[k] = classes.get(k, 0) + n
    return [(0 if k == 0 else 1 << (k - 1), 0 if k == 0 else (1 << k) - 1,
             classes.get(k, 0))
            for k in range(min(classes), max(classes) + 1)]


def _sizes(report, data):
    sizes = data["payload_bytes"]
    out = ['<h2 id="sizes">Record sizes</h2>',
           '<p class="note">Payload bytes per entry (the encoded'
           " arguments).</p>",
           '<table id="size-percentiles"><tr><th>mean</th><th>p50</th>'
           "<th>p90</th><th>p99</th><th>max</th></tr>"
           "<tr><td>%.1f</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>"
           "</tr></table>" % (sizes["mean"], _e(stats.format_count(sizes["p50"])),
                              _e(stats.format_count(sizes["p90"])), _e(stats.format_count(sizes["p99"])),
                              _e(stats.format_count(sizes["max"])))]
    classes = size_classes(report.sizes)
    most = max(n for _, _, n in classes)
    out.append('<table id="size-classes"><tr><th class="l">bytes</th>'
               '<th>entries</th><th class="l"></th></tr>')
    for low, high, n in classes:
        label = str(low) if low == high else "%s-%s" % (stats.format_count(low), stats.format_count(high))
        out.append('<tr><td class="l">%s</td><td>%s</td><td class="l share">'
                   '<span class="hbar" style="width:%.1f%%"></span></td>'
                   "</tr>" % (_e(label), _e(stats.format_count(n)), 100 * n / most))
    out.append("</table>")
    return out


def _gaps(report):
    threshold = report.gap_threshold
    out = ['<h2 id="gaps">Gaps</h2>',
           '<p class="note">Time between consecutive entries, in journal'
           " order.</p>",
           '<p id="idle">%s idle periods of %s or more, %s in all.</p>' % (
               _e(stats.format_count(report.idle)), _e(_duration(threshold)),
               _e(_duration(report.idle_seconds)))]
    classes = list(zip(GAP_LABELS, report.gap_classes))
    if report.out_of_order:
        classes.insert(0, ("earlier than the entry before (concurrent"
                           " commits)", report.out_of_order))
    counted = [(label, n) for label, n in classes if n]
    if counted:
        most = max(n for _, n in counted)
        out.append('<table id="gap-classes"><tr><th class="l">gap</th>'
                   '<th>entries</th><th class="l"></th></tr>')
        for label, n in counted:
            out.append('<tr><td class="l">%s</td><td>%s</td>'
                       '<td class="l share"><span class="hbar"'
                       ' style="width:%.1f%%"></span></td></tr>'
                       % (_e(label), _e(stats.format_count(n)), 100 * n / most))
        out.append("</table>")
    longest = report.longest_gaps()
    if longest:
        out.append('<table id="longest-gaps"><tr><th>gap</th>'
                   '<th class="l">from</th><th class="l">to</th>'
                   "<th>before seq</th></tr>")
        for gap, seq, before, after in longest:
            out.append('<tr><td>%s</td><td class="l">%s</td>'
                       '<td class="l">%s</td><td>%s</td></tr>' % (
                           _e(_duration(gap)), _e(iso(before)),
                           _e(iso(after)), _e(stats.format_count(seq))))
        out.append("</table>")
    return out


def _busiest(data):
    out = ['<h2 id="busiest">Busiest periods</h2>']
    for what in ("hours", "days"):
        out.append('<table id="busiest-%s"><tr><th class="l">%s</th>'
                   "<th>entries</th></tr>" % (what, what[:-1]))
        for row in data["busiest_" + what]:
            out.append('<tr><td class="l">%s</td><td>%s</td></tr>'
                       % (_e(row["period"]), _e(stats.format_count(row["entries"]))))
        out.append("</table>")
    return out


def _duration(seconds):
    if seconds < 1:
        return "%.0f ms" % (seconds * 1000)
    if seconds < 120:
        return "%.1f s" % seconds
    return str(datetime.timedelta(seconds=round(seconds)))
