"""Tests of ``zodb-journal replay`` (:mod:`zjournal.sessionreplay`).

A session is recorded through a JournaledDB: the bank demo's commands,
plus the commands below, one of which (``Crunch``) is made slow at replay
time by an environment variable, as a new version of the code might be.
The replays run into real FileStorages, in this process through
``cli.main`` and once through a real ``zodb-journal`` subprocess.
"""
import collections
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree

import zjournal
from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import cli
from zjournal import demo
from zjournal import sessionreplay
from zjournal.marker import MARKER_KEY
from zjournal.tests.helpers import digest
from zjournal.tests.helpers import snapshot

#: Milliseconds Crunch.execute sleeps (read at execute time, so that a
#: subprocess and a later replay can run "other code").
SLOW_ENV = "ZJOURNAL_TEST_SLOW_MS"
#: When set, Fragile.execute raises: the replayed code diverged.
FAIL_ENV = "ZJOURNAL_TEST_DIVERGE"
MODULE = __name__
IMPORTS = ["--import", "zjournal.demo", "--import", MODULE]


def _notes(root):
    notes = root.get("notes")
    if notes is None:
        notes = root["notes"] = OOBTree()
    return notes


class Note(Command):
    command_name = "sessiontests.note"

    def __init__(self, key, text):
        self.key = key
        self.text = text

    def execute(self, root, context):
        _notes(root)[self.key] = (self.text, context.time)


class Crunch(Command):
    """The command whose new version is slow."""
    command_name = "sessiontests.crunch"

    def __init__(self, n):
        self.n = n

    def execute(self, root, context):
        delay = float(os.environ.get(SLOW_ENV, "0")) / 1000
        if delay:
            time.sleep(delay)
        _notes(root)["crunched"] = _notes(root).get("crunched", 0) + self.n


class Fragile(Command):
    command_name = "sessiontests.fragile"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        if os.environ.get(FAIL_ENV):
            raise RuntimeError("new code refuses %s" % self.key)
        _notes(root)[self.key] = context.random.random()


class Peek(Command):
    """A query: journaled for the record, passed over by replay."""
    command_name = "sessiontests.peek"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        return _notes(root).get(self.key)


def fingerprint(root):
    return demo.fingerprint(root), dict(root["notes"].items())


class Session:
    """A recorded session: the journal, its entries and the final state."""

    def __init__(self, path):
        self.path = str(path)
        rng = random.Random(11)
        for name in (SLOW_ENV, FAIL_ENV):
            assert name not in os.environ, name
        jdb = JournaledDB(ZODB.DB(None),
                          FileJournal(self.path, fsync="never"),
                          journal_queries=True)
        owners = ["c%d" % i for i in range(5)]
        for owner in owners:
            jdb.execute(demo.OpenAccount(owner, 100))
        for i in range(80):
            with jdb.transaction() as conn:
                for j in range(rng.randrange(1, 7)):
                    k = i * 10 + j
                    zjournal.execute(conn, demo.Deposit(
                        rng.choice(owners), rng.randrange(1, 50)))
                    zjournal.execute(conn, Note("n%d" % k, "x" * (k % 40)))
                    if k % 17 == 0:
                        zjournal.execute(conn, Crunch(k))
                    if k % 23 == 0:
                        zjournal.execute(conn, Fragile("f%d" % k))
            if i % 9 == 0:
                jdb.query(Peek("n%d" % (i * 10)))
        conn = jdb.open()
        self.state = fingerprint(conn.root())
        conn.close()
        self.entries = list(jdb.journal.entries())
        self.last_seq = jdb.journal.last_seq
        self.identity = jdb.journal.identity
        jdb.close()

    def executed(self, lo=1, hi=None):
        """The commands (not queries) with lo <= seq <= hi."""
        hi = self.last_seq if hi is None else hi
        return [e for e in self.entries
                if lo <= e.seq <= hi and not e.is_query]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("session") / "journal")
    names = collections.Counter(e.command_name for e in s.executed())
    assert names["sessiontests.crunch"] >= 10
    assert names["sessiontests.fragile"] >= 5
    assert any(e.is_query for e in s.entries)
    return s


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """Temporary files go to a directory of the test's own, to check that
    the temporary scratch ZODB is removed."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def replay(capsys, *argv):
    status = cli.main(["replay"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def profile_json(capsys, *argv):
    status, out, err = replay(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def scratch_state(path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    try:
        conn = db.open()
        root = conn.root()
        return fingerprint(root), root[MARKER_KEY].last_seq
    finally:
        transaction.abort()
        db.close()


def check_rows(profile, entries):
    """The profile's rows count ``entries`` by name, and their numbers
    hang together."""
    counts = collections.Counter(e.command_name for e in entries)
    rows = {r["name"]: r for r in profile["commands"]}
    assert {n: r["count"] for n, r in rows.items()} == dict(counts)
    for r in profile["commands"]:
        assert r["total"] == pytest.approx(r["mean"] * r["count"])
        assert 0 < r["median"] <= r["p99"] <= r["max"] <= r["total"]
    assert sum(r["share"] for r in profile["commands"]) == pytest.approx(1)
    totals = [r["total"] for r in profile["commands"]]
    assert totals == sorted(totals, reverse=True)
    assert profile["profiled"] == len(entries)
    assert profile["profiled_seconds"] == pytest.approx(sum(totals))
    assert profile["first_seq"] == entries[0].seq
    assert profile["last_seq"] == entries[-1].seq
    return rows


# -- the profile -------------------------------------------------------------

def test_profile_ranks_the_slow_command_first(session, capsys, monkeypatch,
                                             own_tmp):
    monkeypatch.setenv(SLOW_ENV, "10")
    before = snapshot(session.path)
    profile = profile_json(capsys, session.path, *IMPORTS)
    rows = check_rows(profile, session.executed())
    assert profile["commands"][0]["name"] == "sessiontests.crunch"
    crunch = rows["sessiontests.crunch"]
    assert crunch["median"] >= 0.01 and crunch["mean"] >= 0.01
    assert profile["replayed"] == session.last_seq
    assert profile["executed"] == len(session.executed())
    assert profile["identity"] == session.identity
    assert (profile["wall_seconds"] >= profile["execute_seconds"]
            >= profile["profiled_seconds"] >= 0.01 * crunch["count"])
    assert profile["other_seconds"] == pytest.approx(
        profile["wall_seconds"] - profile["execute_seconds"])
    # the temporary scratch ZODB is gone; the journal is untouched
    assert os.listdir(str(own_tmp)) == []
    assert snapshot(session.path) == before


def test_console_script_prints_the_table_and_keeps_the_scratch(
        session, tmp_path):
    """A real ``zodb-journal replay --profile`` process, into a FileStorage
    that holds the recorded state afterwards."""
    scratch = tmp_path / "Scratch.fs"
    env = dict(os.environ, **{SLOW_ENV: "10"})
    env.pop(FAIL_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "zjournal.cli", "replay", session.path,
         "--zodb", str(scratch), "--profile"] + IMPORTS,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("replayed %s entries of %s into %s" % (
        format(session.last_seq, ","), session.path, scratch))
    head = next(i for i, l in enumerate(lines) if l.startswith("command "))
    assert lines[head].split() == ["command", "count", "total", "s", "share",
                                   "mean", "ms", "median", "ms", "p99", "ms",
                                   "max", "ms"]
    table = lines[head + 1:]
    counts = collections.Counter(e.command_name for e in session.executed())
    assert len(table) == len(counts)
    assert table[0].split()[0] == "sessiontests.crunch"
    for line in table:
        name, count = line.split()[:2]
        assert int(count.replace(",", "")) == counts[name]
    # aligned columns
    assert len({len(l) for l in [lines[head]] + table}) == 1
    assert scratch_state(scratch) == (session.state, session.last_seq)


def test_start_and_until(session, capsys, tmp_path):
    scratch = tmp_path / "Data.fs"
    start, until = 40, session.last_seq - 30
    profile = profile_json(capsys, session.path, *IMPORTS, "--start", start,
                           "--until", until, "--zodb", scratch)
    check_rows(profile, session.executed(start, until))
    # every command up to --until ran: the profile only starts later
    assert profile["executed"] == len(session.executed(1, until))
    assert profile["replayed"] == until
    assert scratch_state(scratch)[1] == until


def test_start_at_a_time(session, capsys):
    """--start with the time dump prints for an entry profiles from the
    first command at or after it."""
    entry = session.executed()[len(session.executed()) // 2]
    text = datetime.datetime.fromtimestamp(
        entry.time, datetime.timezone.utc).isoformat()
    bound = datetime.datetime.fromisoformat(text)
    profile = profile_json(capsys, session.path, *IMPORTS, "--start", text)
    first = next(e for e in session.executed()
                 if datetime.datetime.fromtimestamp(
                     e.time, datetime.timezone.utc) >= bound)
    assert first.seq <= entry.seq
    check_rows(profile, session.executed(first.seq))


# -- comparing ---------------------------------------------------------------

def test_compare_shows_the_slower_command(session, capsys, monkeypatch,
                                          tmp_path):
    monkeypatch.setenv(SLOW_ENV, "1")
    saved = tmp_path / "before.json"
    saved.write_text(json.dumps(profile_json(capsys, session.path,
                                             *IMPORTS)))
    monkeypatch.setenv(SLOW_ENV, "6")
    profile = profile_json(capsys, session.path, *IMPORTS, "--compare",
                           saved)
    comparison = profile["comparison"]
    assert comparison["same_journal"] and comparison["same_range"]
    rows = {r["name"]: r for r in comparison["commands"]}
    assert set(rows) == {r["name"] for r in profile["commands"]}
    crunch = rows["sessiontests.crunch"]
    assert crunch["count"] == crunch["then_count"]
    # 6 ms against 1 ms of sleep, plus the same small overhead (the
    # median: a busy machine's pauses move means)
    assert crunch["median_ratio"] > 2.5
    assert crunch["mean_ratio"] > 1
    assert crunch["mean_ratio"] == pytest.approx(
        crunch["mean"] / crunch["then_mean"])

    status, out, err = replay(capsys, session.path, *IMPORTS, "--compare",
                              saved)
    assert status == 0, err
    lines = out.splitlines()
    assert "ratio = now / then: above 1 is slower now" in lines
    head = lines.index(next(l for l in lines if l.startswith("command")
                            and "then ms" in l))
    assert lines[head].split()[:6] == ["command", "count", "then", "median",
                                       "ms", "then"]
    row = next(l for l in lines[head:]
               if l.startswith("sessiontests.crunch")).split()
    assert row[-1] == "slower"
    assert int(row[1]) == int(row[2]) == crunch["count"]
    assert float(row[3]) >= 6   # ms: this run's median
    assert float(row[4]) == pytest.approx(1000 * crunch["then_median"],
                                          rel=0.005)   # the saved one
    assert float(row[-4].rstrip("x")) > 2.5


def test_compare_names_commands_only_in_one_profile(session, capsys,
                                                    tmp_path):
    """A profile of the first commands lacks the later names: they are
    new now; against a profile with a name no longer run, it is gone."""
    saved = tmp_path / "early.json"
    first_crunch = next(e.seq for e in session.executed()
                        if e.command_name == "sessiontests.crunch")
    early = profile_json(capsys, session.path, *IMPORTS, "--until",
                         first_crunch - 1)
    saved.write_text(json.dumps(early))
    now = profile_json(capsys, session.path, *IMPORTS, "--compare", saved)
    rows = {r["name"]: r for r in now["comparison"]["commands"]}
    assert rows["sessiontests.crunch"]["then_count"] is None
    assert rows["sessiontests.crunch"]["mean_ratio"] is None
    assert not now["comparison"]["same_range"]
    # reversed: the old profile had a name this run does not have
    early["commands"].append(dict(early["commands"][0], name="retired.cmd"))
    saved.write_text(json.dumps(early))
    status, out, err = replay(capsys, session.path, *IMPORTS, "--until",
                              first_crunch - 1, "--compare", saved)
    assert status == 0, err
    gone = next(l for l in out.splitlines() if l.startswith("retired.cmd"))
    assert gone.split()[-1] == "gone"


def test_compare_with_a_saved_median_of_zero(session, capsys, tmp_path):
    """A saved profile whose times are 0 (a command faster than the clock
    of the machine that made it) has no ratio: the row says so, the run
    does not crash."""
    saved = tmp_path / "zero.json"
    before = profile_json(capsys, session.path, *IMPORTS)
    zeroed = before["commands"][0]
    for key in ("mean", "median", "p99"):
        zeroed[key] = 0.0
    saved.write_text(json.dumps(before))
    status, out, err = replay(capsys, session.path, *IMPORTS, "--compare",
                              saved)
    assert status == 0, err
    lines = out.splitlines()
    table = lines[lines.index("ratio = now / then: above 1 is slower now"):]
    row = next(l for l in table
               if l.startswith(zeroed["name"] + " ")).split()
    # count, then, median ms, then ms, then three ratios shown as "-"
    # and no verdict
    assert row[4] == "0" and row[5:] == ["-", "-", "-"]
    now = profile_json(capsys, session.path, *IMPORTS, "--compare", saved)
    rows = {r["name"]: r for r in now["comparison"]["commands"]}
    assert rows[zeroed["name"]]["median_ratio"] is None
    others = [r for n, r in rows.items() if n != zeroed["name"]]
    assert others and all(r["median_ratio"] > 0 for r in others)


@pytest.mark.parametrize("content, message", [
    ("not json at all", "is not JSON"),
    ('{"format": "zjournal-export", "version": 1}', "not a replay profile"),
    ('[1, 2]', "not a replay profile"),
    ('{"format": "zjournal-replay-profile", "version": 99}',
     "version 99 replay profile"),
    ('{"format": "zjournal-replay-profile", "version": 1, "commands":'
     ' [{"name": "x"}]}', "incomplete replay profile"),
])
def test_compare_refuses_what_is_not_a_profile(session, capsys, tmp_path,
                                               content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    scratch = tmp_path / "Data.fs"
    status, out, err = replay(capsys, session.path, *IMPORTS, "--zodb",
                              scratch, "--compare", bad)
    assert status == cli.EXIT_FAILURE
    assert "zodb-journal replay: error:" in err and message in err
    assert str(bad) in err
    assert sorted(os.listdir(str(tmp_path))) == ["bad.json"]


def test_missing_profile_file(session, capsys, tmp_path):
    status, out, err = replay(capsys, session.path, *IMPORTS, "--compare",
                              tmp_path / "absent.json")
    assert status == 1 and "cannot read profile" in err


# -- failures ----------------------------------------------------------------

def test_divergence_removes_the_scratch(session, capsys, monkeypatch,
                                        tmp_path, own_tmp):
    monkeypatch.setenv(FAIL_ENV, "1")
    first = next(e for e in session.executed()
                 if e.command_name == "sessiontests.fragile")
    scratch = tmp_path / "Scratch.fs"
    status, out, err = replay(capsys, session.path, *IMPORTS, "--profile",
                              "--zodb", scratch, "--batch-size", 7)
    assert status == cli.EXIT_FAILURE
    assert ("replay stopped at seq %d (sessiontests.fragile): RuntimeError:"
            " new code refuses %s" % (first.seq, first.command.key)) in err
    assert sorted(os.listdir(str(tmp_path))) == ["tmp"]
    # and into a temporary FileStorage
    status, out, err = replay(capsys, session.path, *IMPORTS)
    assert status == cli.EXIT_FAILURE and "seq %d" % first.seq in err
    assert os.listdir(str(own_tmp)) == []


def test_refuses_a_scratch_that_is_not_empty(session, capsys, tmp_path):
    scratch = tmp_path / "Data.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(scratch)))
    with db.transaction() as conn:
        conn.root()["precious"] = 1
    db.close()
    before = digest(scratch)
    status, out, err = replay(capsys, session.path, *IMPORTS, "--zodb",
                              scratch)
    assert status == cli.EXIT_FAILURE
    assert "exists and is not empty" in err
    assert digest(scratch) == before


def test_bad_options(session, capsys):
    status, out, err = replay(capsys, session.path, *IMPORTS,
                              "--batch-size", 0)
    assert status == 1 and "--batch-size" in err
    status, out, err = replay(capsys, session.path, *IMPORTS, "--start",
                              "yesterday")
    assert status == 1 and "--start takes a sequence number" in err
    status, out, err = replay(capsys, session.path, "--import",
                              "no_such_module_here")
    assert status == 1 and "cannot import no_such_module_here" in err


# -- the numbers -------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_summary_statistics(n):
    rng = random.Random(n)
    samples = [rng.lognormvariate(-7, 1.5) for _ in range(n)]
    row = sessionreplay.summarize("x", samples)
    ordered = sorted(samples)
    assert row["count"] == n
    assert row["total"] == pytest.approx(sum(samples))
    assert row["median"] == statistics.median(samples)
    assert row["p99"] == ordered[math.ceil(0.99 * n) - 1]
    assert row["max"] == max(samples)
    # at least 99% of the samples are at or below p99, and fewer below it
    assert sum(s <= row["p99"] for s in samples) >= 0.99 * n
    assert sum(s < row["p99"] for s in samples) < 0.99 * n


def test_sqlite_journal(session, capsys, tmp_path):
    """The same session moved into an SQLite journal replays to the same
    profile counts and the same state."""
    export = tmp_path / "session.jsonl"
    assert cli.main(["export", session.path, "-o", str(export)]) == 0
    uri = "sqlite://%s" % (tmp_path / "journal.db")
    assert cli.main(["import", str(export), uri]) == 0
    capsys.readouterr()
    scratch = tmp_path / "Data.fs"
    profile = profile_json(capsys, uri, *IMPORTS, "--zodb", scratch)
    check_rows(profile, session.executed())
    assert profile["identity"] == session.identity
    assert scratch_state(scratch) == (session.state, session.last_seq)


def comparison_table(out):
    """The lines of --compare's table, its heading first."""
    lines = out.splitlines()
    return lines[next(i for i, l in enumerate(lines)
                      if l.startswith("command ") and "then ms" in l):]


def test_compare_with_start_does_not_call_earlier_commands_gone(
        session, capsys, tmp_path):
    """The accounts are opened before seq 6 only: a profile from --start 6
    did run them (every command is replayed), it just did not time them."""
    opens = [e.seq for e in session.executed()
             if e.command_name == demo.OpenAccount.command_name]
    assert opens and max(opens) < 6
    full = tmp_path / "full.json"
    full.write_text(json.dumps(profile_json(capsys, session.path, *IMPORTS)))
    status, out, err = replay(capsys, session.path, *IMPORTS, "--start", 6,
                              "--compare", full)
    assert status == 0, err
    lines = comparison_table(out)
    assert lines[0].split()[-1] == "verdict"
    row = next(l for l in lines
               if l.startswith(demo.OpenAccount.command_name + " "))
    assert row.endswith(" not profiled") and "gone" not in row
    # The other way round: the saved profile began later.
    late = tmp_path / "late.json"
    late.write_text(json.dumps(profile_json(capsys, session.path, *IMPORTS,
                                            "--start", 6)))
    status, out, err = replay(capsys, session.path, *IMPORTS, "--compare",
                              late)
    assert status == 0, err
    row = next(l for l in comparison_table(out)
               if l.startswith(demo.OpenAccount.command_name + " "))
    assert row.endswith(" not profiled then")
    # A name the other replay never ran is still gone.
    saved = json.loads(full.read_text())
    saved["commands"].append(dict(saved["commands"][0], name="retired.cmd"))
    full.write_text(json.dumps(saved))
    status, out, err = replay(capsys, session.path, *IMPORTS, "--start", 6,
                              "--compare", full)
    row = next(l for l in comparison_table(out)
               if l.startswith("retired.cmd"))
    assert row.split()[-1] == "gone"
