"""Tests of :mod:`zjournal.report` and ``zodb-journal stats --html``.

The journals are written through FileJournal.append with chosen times,
names and sizes, so what the report shows can be computed here a second
way.  The report is parsed with the standard library's HTML parser, and
rendered by headless Chromium: a screenshot shows whether the chart was
really drawn, bar by bar.  Without Chromium (Debian: ``apt-get install
chromium``) those tests skip, except on CI (env ``CI`` set), where they
fail.
"""
import collections
import datetime
import html.parser
import json
import math
import os
import pickle
import random
import shutil
import struct
import subprocess
import zlib

import pytest

from zjournal import FileJournal
from zjournal import cli
from zjournal import report
from zjournal.format import FLAG_QUERY
from zjournal.tests.helpers import snapshot

# 2023-11-14T22:13:20Z
T0 = 1700000000.0
NAMES = ("shop.order", "shop.pay", "shop.refund", "shop.browse")
HOSTILE = (
    '<script>document.title="owned"</script>',
    '"><img src=x onerror=alert(1)>',
    "a&amp;b</td></tr></table><h1>not a heading</h1>",
    "<svg><rect class='bar' width='999' height='999'/></svg>",
)
BAR_RGB = tuple(bytes.fromhex(report.BAR_COLOR[1:]))


def write_journal(path, records):
    """Append ``records`` ((time, name, payload, query), one transaction
    each) to a new journal; return them with their seqs."""
    written = []
    with FileJournal(str(path), fsync="never") as journal:
        for seq, (t, name, payload, query) in enumerate(records, 1):
            journal.append([(seq, t, 1, name, payload,
                             FLAG_QUERY if query else 0, None)])
            written.append((seq, t, name, len(payload), query))
    return written


def session(seed=3, n=500, start=T0, mean_gap=300.0, names=NAMES,
            idle=()):
    """``n`` records at random intervals; ``idle`` maps an index to extra
    seconds of silence before that record."""
    rng = random.Random(seed)
    idle = dict(idle)
    t = start
    records = []
    for i in range(n):
        t += rng.expovariate(1 / mean_gap) + idle.get(i, 0)
        name = rng.choice(names)
        payload = pickle.dumps({"i": i, "pad": "x" * rng.randrange(0, 400)})
        records.append((t, name, payload, name == "shop.browse"))
    return records


class Page(html.parser.HTMLParser):
    """The parts of a report the tests look at."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags = collections.Counter()
        self.attributes = []        # (tag, name, value)
        self.bars = []              # attrs of each rect.bar
        self.svg = None             # attrs of the timeline's svg
        self.tables = {}            # id -> rows of cell texts
        self.style = ""
        self._table = None
        self._row = None
        self._cell = None
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        attrs = dict(attrs)
        for name, value in attrs.items():
            self.attributes.append((tag, name, value or ""))
        if tag == "svg" and attrs.get("id") == "timeline-chart":
            self.svg = attrs
        if tag == "rect" and attrs.get("class") == "bar":
            self.bars.append(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = self._row = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_style:
            self.style += data


def stats_html(tmp_path, journal, *argv):
    out = tmp_path / "report.html"
    status = cli.main(["stats", str(journal), "--html", str(out)]
                      + [str(a) for a in argv])
    assert status == 0
    return out.read_text(encoding="utf-8")


def nearest_rank(values, p):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A journal over about two days with two long silences (5 and 3
    hours) and a few entries stamped before their predecessor."""
    path = tmp_path_factory.mktemp("report") / "journal"
    records = session(idle={150: 5 * 3600, 400: 3 * 3600})
    # Concurrent commits: an entry stamped a little before the previous.
    for i in (60, 61, 320):
        t, name, payload, query = records[i]
        records[i] = (records[i - 1][0] - 0.25, name, payload, query)
    return path, write_journal(path, records)


# -- the chart ---------------------------------------------------------------

def test_timeline_bars_count_every_entry_in_its_period(shop, tmp_path):
    path, written = shop
    page = Page(stats_html(tmp_path, path))
    width = int(page.svg["data-period"])
    expected = collections.Counter(int(t // width) * width
                                   for _, t, _, _, _ in written)
    got = {datetime.datetime.fromisoformat(
        b["data-start"].replace("Z", "+00:00")).timestamp():
        int(b["data-count"]) for b in page.bars}
    assert got == dict(expected)
    assert int(page.svg["data-bars"]) == len(page.bars) == len(expected)
    # heights are proportional to counts, and the tallest bar fills most
    # of the plot (the scale's top is a round number just above it)
    heights = {int(b["data-count"]): int(b["height"]) for b in page.bars}
    most = max(heights)
    for count, h in heights.items():
        assert h == pytest.approx(heights[most] * count / most, abs=1)
    assert heights[most] >= 0.75 * report.CHART_HEIGHT


@pytest.mark.parametrize("span, width", [
    (30, 1), (600, 10), (2 * 3600, 60), (12 * 3600, 300),
    (3 * 86400, 3600), (20 * 86400, 6 * 3600), (90 * 86400, 86400),
    (3 * 365 * 86400, 7 * 86400)])
def test_chart_period_is_the_shortest_that_fits(tmp_path, span, width):
    """A span gets the shortest period drawing it in at most MAX_BARS
    bars; one period shorter would need more."""
    records = [(T0 + span * i / 199, "x.y", b"p", False)
               for i in range(200)]
    path = tmp_path / "journal"
    write_journal(path, records)
    page = Page(stats_html(tmp_path, path))
    assert int(page.svg["data-period"]) == width

    def periods(w):
        return int(records[-1][0] // w) - int(records[0][0] // w) + 1
    assert periods(width) <= report.MAX_BARS
    shorter = report.WIDTHS[report.WIDTHS.index(width) - 1] if width > 1 \
        else None
    if shorter is not None:
        assert periods(shorter) > report.MAX_BARS
    assert sum(int(b["data-count"]) for b in page.bars) == 200


def test_timeline_memory_is_bounded():
    """Ten years of entries, one every few minutes: the timeline keeps
    at most KEEP_BUCKETS periods and loses no entry."""
    rng = random.Random(5)
    timeline = report.Timeline()
    times = sorted(T0 + rng.uniform(0, 10 * 365 * 86400)
                   for _ in range(200000))
    # not in time order: merging must not depend on it
    rng.shuffle(times)
    for t in times:
        timeline.add(t)
    assert len(timeline.counts) <= report.KEEP_BUCKETS
    assert sum(timeline.counts.values()) == len(times)
    width, series = timeline.series()
    assert len(series) <= report.MAX_BARS
    assert sum(n for _, n in series) == len(times)
    by_period = collections.Counter(int(t // width) * width for t in times)
    assert dict((s, n) for s, n in series if n) == dict(by_period)


# -- tables ------------------------------------------------------------------

def test_top_commands_sizes_and_summary(shop, tmp_path):
    path, written = shop
    page = Page(stats_html(tmp_path, path))
    rows = page.tables["commands-table"][1:]
    counts = collections.Counter(name for _, _, name, _, _ in written)
    assert {r[0]: int(r[1].replace(",", "")) for r in rows} == dict(counts)
    assert [int(r[1].replace(",", "")) for r in rows] == sorted(
        counts.values(), reverse=True)
    queries = {r[0]: int(r[3].replace(",", "")) for r in rows}
    assert queries["shop.browse"] == counts["shop.browse"]
    assert queries["shop.pay"] == 0
    sizes = [size for _, _, _, size, _ in written]
    head, values = page.tables["size-percentiles"]
    got = dict(zip(head, values))
    for p in (50, 90, 99):
        assert int(got["p%d" % p].replace(",", "")) == nearest_rank(sizes, p)
    assert int(got["max"].replace(",", "")) == max(sizes)
    classes = {}
    for row in page.tables["size-classes"][1:]:
        low = int(row[0].split("-")[0].replace(",", ""))
        classes[low] = int(row[1].replace(",", ""))
    expected = collections.Counter(
        0 if s == 0 else 1 << (s.bit_length() - 1) for s in sizes)
    assert {k: v for k, v in classes.items() if v} == dict(expected)
    facts = dict(page.tables[None][i][:2] for i in range(
        len(page.tables[None])))
    assert facts["seq"] == "1 .. %s" % format(len(written), ",")
    assert facts["identity"] == FileJournal(
        str(path), readonly=True).identity


def test_gaps(shop, tmp_path):
    path, written = shop
    text = stats_html(tmp_path, path, "--gap", 2 * 3600)
    page = Page(text)
    times = [t for _, t, _, _, _ in written]
    gaps = [(b - a, seq) for (seq, b), a in zip(
        [(w[0], w[1]) for w in written[1:]], times)]
    forward = [(g, s) for g, s in gaps if g >= 0]
    idle = [g for g, _ in forward if g >= 2 * 3600]
    assert len(idle) == 2   # the 5 and 3 hour silences the fixture made
    assert "%d idle periods of 2:00:00 or more" % len(idle) in text
    longest = sorted(forward, reverse=True)[:report.LONGEST_GAPS]
    rows = page.tables["longest-gaps"][1:]
    assert [int(r[3].replace(",", "")) for r in rows] == [
        s for _, s in longest]
    assert rows[0][1] == iso(times[longest[0][1] - 2])
    classes = dict((r[0], int(r[1].replace(",", "")))
                   for r in page.tables["gap-classes"][1:])
    backwards = sum(1 for g, _ in gaps if g < 0)
    assert backwards == 3
    assert classes.pop(next(k for k in classes if k.startswith(
        "earlier"))) == backwards
    assert sum(classes.values()) == len(forward)
    for label, low, high in (("1-10 min", 60, 600),
                             ("10 min-1 h", 600, 3600),
                             ("1-6 h", 3600, 6 * 3600)):
        assert classes[label] == sum(1 for g, _ in forward
                                     if low <= g < high), label


def test_since_until_and_empty_range(shop, tmp_path):
    path, written = shop
    page = Page(stats_html(tmp_path, path, "--since", 100, "--until", 199))
    assert sum(int(b["data-count"]) for b in page.bars) == 100
    text = stats_html(tmp_path, path, "--since", iso(written[-1][1] + 60))
    assert "0 (nothing in the range)" in text
    assert Page(text).svg is None


# -- safety ------------------------------------------------------------------

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2",
                "p", "table", "tr", "th", "td", "code", "span", "svg", "g",
                "rect", "line", "text", "footer"}


def test_hostile_command_names_are_text(tmp_path):
    records = session(n=120, names=HOSTILE + NAMES)
    path = tmp_path / "journal"
    written = write_journal(path, records)
    text = stats_html(tmp_path, path)
    page = Page(text)
    assert set(page.tags) <= ALLOWED_TAGS, set(page.tags) - ALLOWED_TAGS
    assert page.tags["h1"] == 1 and page.tags["svg"] == 1
    assert all(b["width"] != "999" for b in page.bars)
    assert not any(name.startswith("on") for _, name, _ in page.attributes)
    names = [r[0] for r in page.tables["commands-table"][1:]]
    counts = collections.Counter(name for _, _, name, _, _ in written)
    assert sorted(names) == sorted(counts)
    assert "<script" not in text and "<img" not in text


def test_no_external_resources(shop, tmp_path):
    path, _ = shop
    text = stats_html(tmp_path, path)
    page = Page(text)
    for tag, name, value in page.attributes:
        assert name not in ("src", "href", "xlink:href", "action",
                            "srcset", "poster", "data"), (tag, name, value)
        assert "//" not in value or name == "content", (tag, name, value)
    lowered = text.lower()
    for needle in ("http:", "https:", "url(", "@import", "<link",
                   "<script", "<iframe", "<object", "<embed", "<img"):
        assert needle not in lowered, needle
    csp = [v for t, n, v in page.attributes if t == "meta" and n == "content"
           and "default-src" in v]
    assert csp == ["default-src 'none'; style-src 'unsafe-inline'"]


# -- the file ----------------------------------------------------------------

def test_report_replaces_the_file_only_when_complete(shop, tmp_path,
                                                     capsys):
    path, written = shop
    before = snapshot(path)
    out = tmp_path / "report.html"
    out.write_text("old report")
    assert cli.main(["stats", str(path), "--html", str(out)]) == 0
    assert "<svg" in out.read_text()
    assert "wrote the HTML report of %s entries" % format(
        len(written), ",") in capsys.readouterr().out
    assert sorted(os.listdir(str(tmp_path))) == ["report.html"]
    # a directory where the file should go: the rename fails
    blocked = tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)
    status = cli.main(["stats", str(path), "--html", str(blocked)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_FAILURE
    assert "zodb-journal stats: error:" in err and str(blocked) in err
    assert ".part" not in err
    assert sorted(os.listdir(str(tmp_path))) == ["blocked", "report.html"]
    assert os.listdir(str(blocked)) == ["inside"]
    # a directory that does not exist: a message, nothing created
    missing = tmp_path / "nowhere" / "r.html"
    assert cli.main(["stats", str(path), "--html", str(missing)]) == 1
    err = capsys.readouterr().err
    # The file asked for, not the temporary one beside it.
    assert "cannot write the report %s: " % missing in err
    assert "the directory %s does not exist" % missing.parent in err
    assert ".part" not in err
    assert snapshot(path) == before
    for gap in ("0", "-5", "nan"):
        assert cli.main(["stats", str(path), "--html", str(out),
                         "--gap", gap]) == 1
        assert "--gap must be a positive" in capsys.readouterr().err


def test_json_beside_html(shop, tmp_path, capsys):
    path, _ = shop
    assert cli.main(["stats", str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    out = tmp_path / "r.html"
    assert cli.main(["stats", str(path), "--json", "--html", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == plain
    assert str(out) in captured.err
    assert out.is_file()


# -- rendered by a browser ---------------------------------------------------

def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is needed on CI: apt-get install -y chromium")
    pytest.skip("headless Chromium is not installed (Debian: apt-get install"
                " chromium)")


def run_chromium(browser, tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox",
         "--no-first-run", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--user-data-dir=%s" % profile]
        + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=120, cwd=str(tmp_path),
        env=dict(os.environ, HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc.stdout.decode("utf-8")


def read_png(path):
    """(width, height, bytes per pixel, rows of unfiltered bytes) of an
    8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    with open(str(path), "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(
                ">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    bpp = 4 if color == 6 else 3
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows, previous = [], bytes(stride)
    for y in range(height):
        at = y * (stride + 1)
        kind, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        if kind == 2:     # up: no dependency along the row
            line = bytearray((a + b) & 255 for a, b in zip(line, previous))
        elif kind:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = previous[i]
                if kind == 1:
                    line[i] = (line[i] + a) & 255
                elif kind == 3:
                    line[i] = (line[i] + (a + b) // 2) & 255
                else:
                    c = previous[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[i] = (line[i] + (a if pa <= pb and pa <= pc else
                                          b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, bpp, rows


def pixels_of(color, bpp, rows):
    """How many pixels of ``color`` (r, g, b) each column holds."""
    needle = bytes(color)
    columns = collections.Counter()
    for row in rows:
        at = row.find(needle)
        while at != -1:
            if at % bpp == 0:
                columns[at // bpp] += 1
            at = row.find(needle, at + 1)
    return columns


def test_chromium_draws_the_chart(tmp_path):
    """The browser paints one bar per period with entries, each as tall
    as the report says, and parses the hostile names as text."""
    browser = chromium()
    records = session(n=400, mean_gap=120.0, names=HOSTILE + NAMES,
                      idle={200: 4 * 3600})
    path = tmp_path / "journal"
    write_journal(path, records)
    text = stats_html(tmp_path, path)
    page = Page(text)
    target = (tmp_path / "report.html").as_uri()

    dom = Page(run_chromium(browser, tmp_path, "--dump-dom", target))
    assert len(dom.bars) == len(page.bars) > 10
    # (the browser adds the tbody elements HTML implies)
    assert set(dom.tags) <= ALLOWED_TAGS | {"tbody"}, set(dom.tags)
    assert sorted(r[0] for r in dom.tables["commands-table"][1:]) == sorted(
        set(HOSTILE + NAMES))

    shot = tmp_path / "shot.png"
    run_chromium(browser, tmp_path, "--screenshot=%s" % shot,
                 "--window-size=1100,760", target)
    width, height, bpp, rows = read_png(shot)
    assert (width, height) == (1100, 760)
    columns = pixels_of(BAR_RGB, bpp, rows)
    runs = []           # (first x, last x, tallest column) of each bar
    for x in sorted(columns):
        if runs and runs[-1][1] == x - 1:
            runs[-1] = (runs[-1][0], x, max(runs[-1][2], columns[x]))
        else:
            runs.append((x, x, columns[x]))
    bars = sorted(page.bars, key=lambda b: int(b["x"]))
    assert len(runs) == len(bars), (len(runs), len(bars))
    for (first, last, tall), bar in zip(runs, bars):
        assert last - first + 1 == int(bar["width"])
        assert tall == int(bar["height"])
    # the bars stand in the same order and spacing as in the markup
    offset = runs[0][0] - int(bars[0]["x"])
    assert [r[0] - offset for r in runs] == [int(b["x"]) for b in bars]


def test_scale_is_round_and_close_above_the_tallest_bar():
    for value in list(range(1, 2000)) + [10 ** 6 - 1, 10 ** 6 + 1]:
        top, lines = report.nice_scale(value)
        assert top >= value and top % lines == 0, (value, top, lines)
        assert value / top >= 0.75, (value, top)
        assert str(top // lines).rstrip("0") in ("1", "2", "3", "4", "5")


@pytest.mark.parametrize("times", [
    [T0], [T0] * 5, [T0, T0 + 40 * 365 * 86400]])
def test_degenerate_spans(tmp_path, times):
    """One entry, entries all at one moment, and forty years between two
    entries: a chart with a bar per entry's period, and no error."""
    path = tmp_path / "journal"
    write_journal(path, [(t, "x.y", b"pp", False) for t in times])
    page = Page(stats_html(tmp_path, path))
    assert sum(int(b["data-count"]) for b in page.bars) == len(times)
    assert len(page.bars) == len(set(times))
    assert len(page.tables.get("longest-gaps", [None])) == len(times)


def test_sqlite_journal(shop, tmp_path, capsys):
    """An SQLite copy of a journal gives the same chart and tables."""
    path, written = shop
    export = tmp_path / "shop.jsonl"
    assert cli.main(["export", str(path), "-o", str(export)]) == 0
    uri = "sqlite://%s" % (tmp_path / "journal.db")
    assert cli.main(["import", str(export), uri]) == 0
    file_page = Page(stats_html(tmp_path, path))
    sql_page = Page(stats_html(tmp_path, uri))
    assert sql_page.bars == file_page.bars
    for table in ("commands-table", "size-classes", "longest-gaps",
                  "gap-classes"):
        assert sql_page.tables[table] == file_page.tables[table]
