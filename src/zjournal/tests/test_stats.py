"""Tests of :mod:`zjournal.stats` and ``zodb-journal stats``.

The journals are written through FileJournal.append with chosen times,
names, sizes, users and query flags, so every number the report gives
can be computed here a second way, from the list of what was written.
"""
import collections
import datetime
import json
import math
import os
import pickle
import random
import subprocess
import sys
import tracemalloc

import pytest

from zjournal import FileJournal
from zjournal import cli
from zjournal import recovery
from zjournal import stats
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.tests import examples
from zjournal.tests.helpers import snapshot

# 2023-11-14T22:13:20Z: two hours before a day boundary.
T0 = 1700000000.0
NAMES = ("shop.order", "shop.pay", "shop.refund", "shop.browse")
USERS = ("alice", "bob", "", "carol")


class Written:
    """One record as the test wrote it."""

    def __init__(self, seq, time, name, size, query, user, end):
        self.seq = seq
        self.time = time
        self.name = name
        self.size = size
        self.query = query
        self.user = user
        self.end = end


def write_journal(path, transactions, **journal_kw):
    """Append ``transactions`` (lists of (time, name, payload, query, meta))
    to a new journal at ``path``; return the Written records in order."""
    journal_kw.setdefault("fsync", "never")
    written = []
    seq = 0
    with FileJournal(str(path), **journal_kw) as journal:
        for records in transactions:
            items = []
            for i, (t, name, payload, query, meta) in enumerate(records):
                seq += 1
                items.append((seq, t, 1, name, payload,
                              FLAG_QUERY if query else 0, meta))
                written.append(Written(
                    seq, t, name, len(payload), query,
                    (meta or {}).get("user", ""), i == len(records) - 1))
            journal.append(items)
    return written


def workload(seed=7, n=600):
    """Transactions spread over about three days, in time order."""
    rng = random.Random(seed)
    transactions = []
    t = T0
    done = 0
    while done < n:
        records = []
        for _ in range(rng.choice((1, 1, 1, 2, 4))):
            t += rng.expovariate(1 / 400.0)
            name = rng.choice(NAMES)
            user = rng.choice(USERS)
            meta = {"user": user, "description": "by %s" % user} if (
                user) else None
            payload = pickle.dumps({"n": done, "pad": "x" * rng.randrange(
                0, 300)}, 4)
            records.append((t, name, payload, name == "shop.browse", meta))
            done += 1
        transactions.append(records)
    return transactions


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    """(journal dir, Written records) of a multi-segment journal."""
    path = tmp_path_factory.mktemp("stats") / "journal"
    written = write_journal(path, workload(), segment_size=8192)
    assert len([n for n in os.listdir(str(path)) if n.endswith(".zjl")]) > 2
    return str(path), written


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def stats_json(capsys, *argv):
    status, out, err = run(capsys, "stats", *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def nearest_rank(values, p):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def expected_groups(records, key):
    """Group rows computed from the written records (rate left out)."""
    groups = collections.OrderedDict()
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return {k: {"entries": len(rs), "queries": sum(r.query for r in rs),
                "bytes": sum(r.size for r in rs),
                "max_bytes": max(r.size for r in rs),
                "share": len(rs) / len(records)}
            for k, rs in groups.items()}


def hour_label(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%Y-%m-%dT%HZ")


def day_label(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%Y-%m-%d")


def check_totals(report, records):
    times = [r.time for r in records]
    sizes = [r.size for r in records]
    queries = sum(r.query for r in records)
    assert report["entries"] == len(records)
    assert report["queries"] == queries
    assert report["commands"] == len(records) - queries
    assert report["transactions"] == sum(r.end for r in records)
    assert report["first_seq"] == records[0].seq
    assert report["last_seq"] == records[-1].seq
    assert report["first_time"] == min(times)
    assert report["last_time"] == max(times)
    assert report["span_seconds"] == max(times) - min(times)
    span = max(times) - min(times)
    assert report["rate"] == (
        pytest.approx((len(records) - queries) / span) if span else None)
    assert report["payload_bytes"]["total"] == sum(sizes)
    assert report["payload_bytes"]["max"] == max(sizes)
    for p in (50, 90, 99):
        assert report["payload_bytes"]["p%d" % p] == nearest_rank(sizes, p)


def rows(report, section="groups"):
    return {g["key"]: g for g in report[section]}


def check_rows(got, expected):
    assert set(got) == set(expected)
    for key, row in expected.items():
        for field, value in row.items():
            assert got[key][field] == pytest.approx(value), (key, field)
        assert got[key]["mean_bytes"] == pytest.approx(
            row["bytes"] / row["entries"])


# -- the report ------------------------------------------------------------

def test_by_command(journal, capsys):
    path, written = journal
    before = snapshot(path)
    report = stats_json(capsys, path)
    check_totals(report, written)
    assert report["by"] == "command"
    expected = expected_groups(written, lambda r: r.name)
    check_rows(rows(report), expected)
    check_rows(rows(report, "by_command"), expected)
    span = written[-1].time - written[0].time
    for g in report["groups"]:
        assert g["rate"] == pytest.approx(g["entries"] / span)
    # most entries first
    counts = [g["entries"] for g in report["groups"]]
    assert counts == sorted(counts, reverse=True)
    assert report["identity"]
    assert snapshot(path) == before


def test_by_user(journal, capsys):
    path, written = journal
    report = stats_json(capsys, path, "--by", "user")
    check_totals(report, written)
    check_rows(rows(report), expected_groups(written, lambda r: r.user))
    assert "" in rows(report)  # records without metadata
    # per command name still there
    check_rows(rows(report, "by_command"),
               expected_groups(written, lambda r: r.name))


@pytest.mark.parametrize("by, label, length", [
    ("hour", hour_label, 3600), ("day", day_label, 86400)])
def test_by_period(journal, capsys, by, label, length):
    path, written = journal
    report = stats_json(capsys, path, "--by", by)
    check_totals(report, written)
    expected = expected_groups(written, lambda r: label(r.time))
    got = rows(report)
    check_rows(got, expected)
    # in time order, each rated over its part of the span
    assert [g["key"] for g in report["groups"]] == sorted(expected)
    first, last = written[0].time, written[-1].time
    for g in report["groups"]:
        members = [r for r in written if label(r.time) == g["key"]]
        begin = (members[0].time // length) * length
        seconds = min(begin + length, last) - max(begin, first)
        assert g["rate"] == pytest.approx(len(members) / seconds)


def test_busiest_periods(journal, capsys):
    path, written = journal
    report = stats_json(capsys, path)
    for section, label in (("busiest_hours", hour_label),
                           ("busiest_days", day_label)):
        counts = collections.Counter(label(r.time) for r in written)
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        assert [(b["period"], b["entries"]) for b in report[section]] == top
    assert len(report["busiest_days"]) >= 3


def test_human_report(journal, capsys):
    path, written = journal
    status, out, err = run(capsys, "stats", path)
    assert status == 0, err
    lines = out.splitlines()
    assert "seq:           1 .. %d" % len(written) in lines
    queries = sum(r.query for r in written)
    assert ("entries:       %s: %s commands, %s queries, in %s transactions"
            % (format(len(written), ","), len(written) - queries, queries,
               sum(r.end for r in written))) in lines
    head = lines.index(next(l for l in lines if l.startswith("by command")))
    table = lines[head:head + 1 + len(NAMES)]
    # aligned: right-justified columns end at the same place on every line
    assert len({len(l) for l in table}) == 1, table
    counts = collections.Counter(r.name for r in written)
    for line in table[1:]:
        name, entries = line.split()[:2]
        assert int(entries.replace(",", "")) == counts[name]
    assert "busiest hours:" in lines and "busiest days:" in lines


def test_human_report_by_user_shows_commands_too(journal, capsys):
    path, written = journal
    status, out, err = run(capsys, "stats", path, "--by", "user")
    assert status == 0, err
    assert any(l.startswith("by user") for l in out.splitlines())
    assert any(l.startswith("by command") for l in out.splitlines())
    assert "(none)" in out  # the records without a user


# -- ranges ----------------------------------------------------------------

@pytest.mark.parametrize("since, until", [
    (1, 1), (37, 250), (None, 100), (500, None), (1, 10 ** 6)])
def test_seq_range(journal, capsys, since, until):
    path, written = journal
    argv = [path]
    if since is not None:
        argv += ["--since", since]
    if until is not None:
        argv += ["--until", until]
    report = stats_json(capsys, *argv)
    lo, hi = since or 1, until or len(written)
    check_totals(report, [r for r in written if lo <= r.seq <= hi])


def test_time_range_includes_the_times_dump_prints(journal, capsys):
    """--since and --until with the times of two entries as dump shows
    them (to the microsecond) include both entries."""
    path, written = journal
    a, b = written[40], written[300]
    report = stats_json(capsys, path, "--since", iso(a.time),
                        "--until", iso(b.time))
    check_totals(report, written[40:301])
    # a moment between two entries
    middle = (written[99].time + written[100].time) / 2
    report = stats_json(capsys, path, "--until", iso(middle))
    check_totals(report, written[:100])
    report = stats_json(capsys, path, "--since", iso(middle))
    check_totals(report, written[100:])


def test_time_and_seq_bounds_combine(journal, capsys):
    path, written = journal
    report = stats_json(capsys, path, "--since", 50,
                        "--until", iso(written[199].time))
    check_totals(report, written[49:200])


def test_time_filter_does_not_assume_time_order(tmp_path, capsys):
    """Commands of concurrent processes reach the journal in commit
    order, not start order: a time range selects by time, wherever the
    entry is."""
    times = [T0, T0 + 100, T0 + 5, T0 + 200, T0 + 6]
    path = tmp_path / "journal"
    write_journal(path, [[(t, "x", b"p", False, None)] for t in times])
    report = stats_json(capsys, path, "--until", iso(T0 + 50))
    assert report["entries"] == 3
    assert (report["first_seq"], report["last_seq"]) == (1, 5)
    assert report["last_time"] == T0 + 6


def test_empty_range_and_empty_journal(journal, tmp_path, capsys):
    path, written = journal
    report = stats_json(capsys, path, "--since", len(written) + 1)
    assert report["entries"] == 0 and report["groups"] == []
    assert report["rate"] is None
    FileJournal(str(tmp_path / "empty"), fsync="never").close()
    report = stats_json(capsys, tmp_path / "empty", "--by", "hour")
    assert (report["entries"], report["transactions"]) == (0, 0)
    status, out, err = run(capsys, "stats", tmp_path / "empty")
    assert status == 0, err
    assert "nothing in the range" in out


def test_bad_bounds(journal, capsys):
    path, _ = journal
    status, out, err = run(capsys, "stats", path, "--since", "last week")
    assert status == 1
    assert "--since" in err and "last week" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["stats", path, "--by", "weekday"])
    assert exc.value.code == 2
    assert "weekday" in capsys.readouterr().err


# -- what stats reads ------------------------------------------------------

TRIPPED = []


def trip():
    TRIPPED.append(True)
    return {}


class Trap:
    """Pickles to a call of trip(): whoever unpickles it runs code."""

    def __reduce__(self):
        return (trip, ())


def test_stats_never_unpickles(tmp_path, capsys):
    payload = pickle.dumps(Trap(), 4)
    path = tmp_path / "journal"
    write_journal(path, [[(T0, "evil", payload, False, {"user": "mallory"})]])
    del TRIPPED[:]
    pickle.loads(payload)
    assert TRIPPED  # the trap works
    del TRIPPED[:]
    for by in stats.GROUPINGS:
        report = stats_json(capsys, path, "--by", by)
        assert report["entries"] == 1
        assert report["payload_bytes"]["total"] == len(payload)
    assert set(rows(stats_json(capsys, path, "--by", "user"))) == {
        "mallory"}
    assert TRIPPED == []


def test_journal_written_by_journaleddb(tmp_path, capsys):
    """Counts over a journal of real commands equal what was executed."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from zjournal import JournaledDB
    from zjournal import execute
    jdb = JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))),
        FileJournal(str(tmp_path / "journal"), fsync="never"))
    executed = collections.Counter()
    transactions = 0
    try:
        for i in range(30):
            command = (examples.Put("k%d" % i, i) if i % 3
                       else examples.Increment("c", by=i))
            jdb.execute(command)
            executed[command.command_name] += 1
            transactions += 1
        with jdb.transaction() as conn:
            for i in range(5):
                execute(conn, examples.Stamp("s%d" % i))
                executed[examples.Stamp.command_name] += 1
        transactions += 1
    finally:
        transaction.abort()
        jdb.close()
    report = stats_json(capsys, tmp_path / "journal")
    assert {k: g["entries"] for k, g in rows(report).items()} == executed
    assert report["transactions"] == transactions
    assert report["entries"] == sum(executed.values())
    with FileJournal(str(tmp_path / "journal"), readonly=True) as j:
        assert report["payload_bytes"]["total"] == sum(
            len(e.payload) for e in j.entries())


# -- streaming -------------------------------------------------------------

class FakeEntry:
    """What collect() reads of an entry."""

    __slots__ = ("seq", "time", "name", "payload", "flags", "is_query",
                 "user")

    def __init__(self, seq, time, name, payload, flags=FLAG_END,
                 is_query=False, user=""):
        self.seq = seq
        self.time = time
        self.name = name
        self.payload = payload
        self.flags = flags
        self.is_query = is_query
        self.user = user


def test_collect_memory_does_not_grow_with_entries():
    """Folding 50,000 entries takes far less memory than keeping them.

    The entries are made on the fly; a collect() that kept them (or one
    object per entry) would peak at several megabytes.
    """
    payloads = [b"x" * n for n in range(64)]

    def entries(n):
        for seq in range(1, n + 1):
            yield FakeEntry(seq, T0 + seq * 0.5, NAMES[seq % 4],
                            payloads[seq % 64], user=USERS[seq % 4])

    tracemalloc.start()
    try:
        result = stats.collect(entries(50000), by="user")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.entries == 50000
    assert peak < 1 << 20, peak


def test_collect_reports_progress(monkeypatch):
    calls = []
    monkeypatch.setattr(stats, "PROGRESS_EVERY", 100)
    entries = (FakeEntry(s, T0 + s, "x", b"") for s in range(1, 351))
    stats.collect(entries, progress=lambda d, t: calls.append((d, t)),
                  total=350)
    assert calls == [(100, 350), (200, 350), (300, 350), (350, 350)]


def test_cli_progress_is_logged_off_a_terminal(journal, capsys, monkeypatch,
                                                caplog):
    path, written = journal
    calls = []

    class Recording(recovery.Progress):
        def __call__(self, done, total):
            calls.append((done, total))
            super().__call__(done, total)

    monkeypatch.setattr(recovery, "Progress", Recording)
    monkeypatch.setattr(stats, "PROGRESS_EVERY", 250)
    caplog.set_level("INFO", logger="zjournal")
    stats_json(capsys, path)
    n = len(written)
    assert calls == [(d, n) for d in range(250, n, 250)] + [(n, n)]
    assert "stats: %d/%d commands" % (n, n) in caplog.text


def test_percentile():
    counts = {10: 1, 20: 1, 30: 1, 40: 1}
    assert [stats.percentile(counts, p) for p in (1, 25, 26, 50, 75, 99,
                                                  100)] == [
        10, 10, 20, 20, 30, 40, 40]
    assert stats.percentile({}, 50) is None
    values = [random.Random(3).randrange(1000) for _ in range(999)]
    assert stats.percentile(collections.Counter(values), 90) == (
        nearest_rank(values, 90))


def test_single_entry_has_no_rate():
    result = stats.collect([FakeEntry(1, T0, "x", b"abc")])
    report = result.as_dict()
    assert report["span_seconds"] == 0
    assert report["rate"] is None
    assert report["groups"][0]["rate"] is None
    assert "-" in "\n".join(stats.format_report(report))


def test_unknown_grouping():
    with pytest.raises(ValueError):
        stats.Stats(by="weekday")


# -- a real process --------------------------------------------------------

def test_stats_in_a_process(journal, capsys):
    path, written = journal
    script = os.path.join(os.path.dirname(sys.executable), "zodb-journal")
    proc = subprocess.run([script, "stats", path, "--json", "--by", "day"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_totals(report, written)
    assert report == dict(stats_json(capsys, path, "--by", "day"))
