"""zodb-journal check-replay: real journals, real FileStorages, the CLI.

The commands that break determinism on purpose live here, so that
``--import zjournal.tests.test_checkreplay`` finds them (already imported
when the CLI runs in-process).
"""
import json
import os
import random
import subprocess
import sys
import time

import persistent
import persistent.list
import pytest
import transaction
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from zjournal import Command
from zjournal import cli
from zjournal import digest
from zjournal.digest import DIGEST_COMMAND
from zjournal.tests.examples import Counter
from zjournal.tests.examples import FailOnReplay
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp

EXAMPLES = "zjournal.tests.examples"
HERE = "zjournal.tests.test_checkreplay"


def _counter(root, name):
    counters = root["counters"]
    if name not in counters:
        counters[name] = Counter()
    return counters[name]


class RandomBump(Command):
    """Draws from the random module instead of context.random."""
    command_name = "tests.checkreplay.random-bump"

    def __init__(self, name):
        self.name = name

    def execute(self, root, context):
        _counter(root, self.name).value += random.randrange(1, 1 << 40)


class ClockStamp(Command):
    """Reads the clock instead of context.time."""
    command_name = "tests.checkreplay.clock-stamp"

    def __init__(self, name):
        self.name = name

    def execute(self, root, context):
        _counter(root, self.name).value = time.time()


class Reset(Command):
    """Overwrites what a non-deterministic command wrote."""
    command_name = "tests.checkreplay.reset"

    def __init__(self, name):
        self.name = name

    def execute(self, root, context):
        _counter(root, self.name).value = 0


class Tag(persistent.Persistent):

    def __init__(self, name):
        self.name = name


class AddTag(Command):
    """Deterministic: adds a persistent Tag to a set, whose iteration
    order follows id()s, not the journal."""
    command_name = "tests.checkreplay.add-tag"

    def __init__(self, name):
        self.name = name

    def execute(self, root, context):
        tags = root.get("tags")
        if tags is None:
            tags = root["tags"] = PersistentMapping(members=set())
        tags["members"] = tags["members"] | {Tag(self.name)}


class TwinTags(Command):
    """Two tags of the same content in a set, and an empty list."""
    command_name = "tests.checkreplay.twin-tags"

    def execute(self, root, context):
        root["twins"] = {Tag("t"), Tag("t")}
        root["picked"] = persistent.list.PersistentList()


class PickTwin(Command):
    """Non-deterministic: appends the twin ``PickTwin.choose`` (min or
    max) picks by id(), which the test switches between live and
    replay."""
    command_name = "tests.checkreplay.pick-twin"
    choose = [min]

    def execute(self, root, context):
        root["picked"].append(self.choose[0](root["twins"], key=id))


class RenamePicked(Command):
    """Deterministic, after the picks."""
    command_name = "tests.checkreplay.rename-picked"

    def execute(self, root, context):
        root["picked"][0].name = "renamed"


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def check(capsys, site, *extra):
    return run(capsys, "check-replay", site.journal_dir, "--zodb",
               site.data_fs, "--import", EXAMPLES, "--import", HERE, *extra)


def check_json(capsys, site, *extra):
    status, out, err = check(capsys, site, "--json", *extra)
    return status, json.loads(out), err


def workload(jdb, n, start=0):
    """``n`` deterministic commands of several kinds."""
    for i in range(start, start + n):
        kind = i % 3
        if kind == 0:
            jdb.execute(Increment("a"))
        elif kind == 1:
            jdb.execute(Put("k%d" % (i % 7), i))
        else:
            jdb.execute(Stamp("s%d" % (i % 5)))


def open_site(site, **kw):
    return site.open(journal_kw={"fsync": "never"}, **kw)


def digest_points(site):
    """The ``after`` seqs of the digests the journal holds."""
    journal = site.journal(readonly=True)
    try:
        return [e.args["after"] for e in journal.entries()
                if e.command_name == DIGEST_COMMAND]
    finally:
        journal.close()


class TestClean:

    def test_with_digests(self, capsys, site):
        jdb = open_site(site, digest_interval=4)
        workload(jdb, 30)
        last = jdb.journal.last_seq
        jdb.close()
        n = len(digest_points(site))
        assert n >= 7 and last == 30 + n
        status, out, err = check(capsys, site)
        assert status == 0, out + err
        assert "OK: the replayed state equals the live state" in out
        assert "%d recorded in the journal, %d compared, %d matched" % (
            n, n, n) in out
        status, report, _ = check_json(capsys, site)
        assert status == 0 and report["ok"] is True
        assert report["live_digest"] == report["replayed_digest"]
        assert report["digests"]["matched"] == n
        assert report["seq"] == report["replayed"] == last
        assert report["difference"] is None and report["divergence"] is None

    def test_threads_under_group_commit(self, capsys, site):
        import threading
        jdb = site.open(journal_kw={"fsync": "batch"}, digest_interval=3,
                        batch_window=0.005)

        def work(me):
            for i in range(10):
                jdb.execute(Increment("shared"))
                jdb.execute(Put("t%d-%d" % (me, i), i))

        threads = [threading.Thread(target=work, args=(me,))
                   for me in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        jdb.close()
        status, report, _ = check_json(capsys, site)
        assert status == 0 and report["ok"], report
        assert report["digests"]["matched"] == len(digest_points(site)) >= 10

    def test_without_digests(self, capsys, site):
        jdb = open_site(site)
        workload(jdb, 12)
        jdb.close()
        status, out, err = check(capsys, site)
        assert status == 0, out + err
        assert "digests: none in the journal" in out
        assert "OK" in out

    def test_live_behind_its_journal_is_checked_up_to_its_seq(
            self, capsys, site, tmp_path):
        jdb = open_site(site, digest_interval=5)
        workload(jdb, 20)
        jdb.close()
        older = str(tmp_path / "older.fs")
        status, out, err = run(capsys, "rebuild", site.journal_dir,
                               "--zodb", older, "--import", EXAMPLES,
                               "--until", "12")
        assert status == 0, err
        status, report, err = run_json(capsys, site.journal_dir, older)
        assert status == 0, err
        assert report["seq"] == 12 < report["journal_seq"]
        assert report["digests"]["recorded"] == len(
            [p for p in digest_points(site) if p < 12])

    def test_scratch_is_kept(self, capsys, site, tmp_path):
        jdb = open_site(site)
        workload(jdb, 9)
        jdb.close()
        scratch = str(tmp_path / "scratch.fs")
        status, out, err = check(capsys, site, "--scratch", scratch)
        assert status == 0, out + err
        assert "kept at %s" % scratch in out
        marker = cli.read_marker(scratch)
        assert marker is not None and marker[1] == 9

    def test_real_console_script(self, site):
        jdb = open_site(site, digest_interval=3)
        workload(jdb, 10)
        jdb.close()
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "zodb-journal"),
             "check-replay", site.journal_dir, "--zodb", site.data_fs,
             "--import", EXAMPLES],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK:" in proc.stdout


    def test_command_the_imports_do_not_define(self, site):
        jdb = open_site(site)
        workload(jdb, 3)
        jdb.execute(RandomBump("b"))
        jdb.close()
        # A fresh process imports only the examples, not this module.
        proc = subprocess.run(
            [sys.executable, "-m", "zjournal.cli", "check-replay",
             site.journal_dir, "--zodb", site.data_fs, "--import", EXAMPLES],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "seq 4" in proc.stderr
        assert RandomBump.command_name in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def run_json(capsys, journal_dir, data_fs):
    status, out, err = run(capsys, "check-replay", journal_dir, "--zodb",
                           data_fs, "--import", EXAMPLES, "--json")
    return status, json.loads(out) if out else None, err


class TestNonDeterministic:

    @pytest.mark.parametrize("command", [RandomBump, ClockStamp])
    def test_caught_and_located(self, capsys, site, command):
        jdb = open_site(site, digest_interval=5)
        workload(jdb, 11)
        jdb.execute(command("b"))
        culprit = jdb.journal.last_seq
        workload(jdb, 10, start=11)
        jdb.close()

        status, out, err = check(capsys, site)
        assert status == 1, out + err
        assert "DIFFERENT" in out
        assert "/counters/b" in out and command.command_name in out

        status, report, _ = check_json(capsys, site)
        assert status == 1 and report["ok"] is False
        assert report["difference"]["path"] == "/counters/b"
        assert report["difference"]["detail"] == "attribute 'value'"
        assert report["difference"]["live"] != report["difference"]["replayed"]
        points = digest_points(site)
        expected_after = max(p for p in points if p < culprit)
        expected_by = min(p for p in points if p >= culprit)
        divergence = report["divergence"]
        assert (divergence["after"], divergence["by"]) == (
            expected_after, expected_by)
        assert expected_by - expected_after <= 5
        seqs = {c["seq"]: c["command_name"] for c in divergence["commands"]}
        assert seqs[culprit] == command.command_name
        assert all(expected_after < s <= expected_by for s in seqs)
        assert report["digests"]["first_mismatch"]["after"] == expected_by

    def test_exact_command_with_interval_one(self, capsys, site):
        jdb = open_site(site, digest_interval=1)
        workload(jdb, 4)
        jdb.execute(RandomBump("b"))
        culprit = jdb.journal.last_seq - 1  # its digest follows it
        workload(jdb, 3, start=4)
        jdb.close()
        status, report, _ = check_json(capsys, site)
        assert status == 1
        divergence = report["divergence"]
        assert divergence["by"] == culprit
        assert [c["seq"] for c in divergence["commands"]] == [culprit]

    def test_without_digests_the_whole_history_is_suspect(self, capsys,
                                                          site):
        jdb = open_site(site)
        workload(jdb, 5)
        jdb.execute(RandomBump("b"))
        workload(jdb, 25, start=5)
        jdb.close()
        status, out, err = check(capsys, site)
        assert status == 1
        assert "after seq 0 (the start) and by seq 31" in out
        assert "... and 11 more" in out  # 31 commands, 20 listed

    def test_overwritten_later_is_still_caught_by_digests(self, capsys,
                                                          site):
        jdb = open_site(site, digest_interval=3)
        workload(jdb, 4)
        jdb.execute(RandomBump("b"))
        workload(jdb, 4, start=4)
        jdb.execute(Reset("b"))
        workload(jdb, 3, start=8)
        jdb.close()
        status, report, _ = check_json(capsys, site)
        assert status == 1
        assert report["difference"] is None  # the end states agree
        assert report["digests"]["first_mismatch"] is not None
        status, out, _ = check(capsys, site)
        assert "the final states are equal again" in out

    def test_command_failing_on_replay(self, capsys, site):
        jdb = open_site(site)
        workload(jdb, 3)
        jdb.execute(FailOnReplay())
        workload(jdb, 2, start=3)
        jdb.close()
        status, out, err = check(capsys, site)
        assert status == 1
        assert "seq 4 (tests.fail-on-replay) raised on replay" in out
        status, report, _ = check_json(capsys, site)
        assert report["replay_error"]["seq"] == 4
        assert report["divergence"]["by"] == 4


class TestUnjournaled:

    def test_allow_unjournaled_write(self, capsys, site):
        jdb = open_site(site, digest_interval=4, allow_unjournaled=True)
        workload(jdb, 10)
        written_after = jdb.journal.last_seq
        tm = transaction.TransactionManager()
        conn = jdb.open(tm)
        conn.root()["counters"]["a"].value += 1000
        tm.commit()
        conn.close()
        workload(jdb, 10, start=10)
        jdb.close()

        status, report, _ = check_json(capsys, site)
        assert status == 1
        diff = report["difference"]
        assert diff["path"] == "/counters/a"
        assert diff["detail"] == "attribute 'value'"
        assert int(diff["live"]) == int(diff["replayed"]) + 1000
        divergence = report["divergence"]
        assert divergence["after"] <= written_after < divergence["by"]
        assert divergence["by"] - divergence["after"] <= 4
        status, out, _ = check(capsys, site)
        assert "bypassed the journal" in out
        assert "/counters/a" in out

    def test_write_with_a_plain_zodb(self, capsys, site):
        jdb = open_site(site, digest_interval=6)
        workload(jdb, 12)
        jdb.close()
        db = ZODB.DB(ZODB.FileStorage.FileStorage(site.data_fs))
        with db.transaction() as conn:
            conn.root()["table"]["sneaky"] = "not journaled"
        db.close()

        status, out, err = check(capsys, site)
        assert status == 1, out + err
        assert "/table (BTrees.OOBTree.OOBTree), key 'sneaky'" in out
        status, report, _ = check_json(capsys, site)
        diff = report["difference"]
        assert (diff["path"], diff["detail"], diff["replayed"]) == (
            "/table", "key 'sneaky'", None)
        assert diff["live"] == repr("not journaled")
        # Every digest matched: the write came after the last one.
        points = digest_points(site)
        assert report["digests"]["matched"] == len(points) == 2
        assert (report["divergence"]["after"],
                report["divergence"]["by"]) == (points[-1], report["seq"])


class TestRefusals:

    def test_live_zodb_without_marker(self, capsys, site, tmp_path):
        jdb = open_site(site)
        workload(jdb, 2)
        jdb.close()
        plain = str(tmp_path / "plain.fs")
        db = ZODB.DB(ZODB.FileStorage.FileStorage(plain))
        with db.transaction() as conn:
            conn.root()["x"] = 1
        db.close()
        status, out, err = run(capsys, "check-replay", site.journal_dir,
                               "--zodb", plain, "--import", EXAMPLES)
        assert status == 1 and out == ""
        assert "holds no zjournal marker" in err
        assert "Traceback" not in err

    def test_another_journal(self, capsys, site, tmp_path):
        jdb = open_site(site)
        workload(jdb, 2)
        jdb.close()
        from zjournal import FileJournal
        other = FileJournal(str(tmp_path / "other"), fsync="never")
        other.close()
        status, out, err = run(capsys, "check-replay", str(tmp_path / "other"),
                               "--zodb", site.data_fs, "--import", EXAMPLES)
        assert status == 1
        assert "was built from journal" in err

    def test_scratch_must_be_new(self, capsys, site, tmp_path):
        jdb = open_site(site)
        workload(jdb, 2)
        jdb.close()
        status, out, err = check(capsys, site, "--scratch", site.data_fs)
        assert status == 1
        assert "exists and is not empty" in err

    def test_missing_live(self, capsys, site, tmp_path):
        jdb = open_site(site)
        jdb.close()
        status, out, err = run(capsys, "check-replay", site.journal_dir,
                               "--zodb", str(tmp_path / "nope.fs"),
                               "--import", EXAMPLES)
        assert status == 1 and "no such file" in err


class TestRecordedDigests:

    def test_set_of_persistent_objects_is_no_false_alarm(self, capsys,
                                                        site):
        """A set of new persistent objects iterates by id(): live and
        replay meet its members in different orders, yet hold the same
        state."""
        jdb = open_site(site, digest_interval=4)
        for name in "abcdefghij":
            jdb.execute(AddTag(name))
        jdb.close()
        n = len(digest_points(site))
        assert n >= 2
        status, report, _ = check_json(capsys, site)
        assert status == 0, report
        assert report["digests"]["matched"] == n

    def test_the_same_twin_twice_is_not_both_twins(self, capsys, site):
        """Live picks both of two tags of the same content, replay one of
        them twice: caught at the second pick, not blamed on the
        deterministic command that later makes the twins differ."""
        jdb = open_site(site, digest_interval=1)
        jdb.execute(TwinTags())
        try:
            PickTwin.choose[0] = min
            jdb.execute(PickTwin())
            PickTwin.choose[0] = max
            jdb.execute(PickTwin())
            culprit = jdb.journal.last_seq - 1  # its digest follows it
            jdb.execute(RenamePicked())
            jdb.close()
            db = ZODB.DB(ZODB.FileStorage.FileStorage(site.data_fs,
                                                      read_only=True))
            try:
                conn = db.open()
                picked = conn.root()["picked"]
                assert picked[0] is not picked[1]  # live: both twins
            finally:
                db.close()
            PickTwin.choose[0] = min  # replay picks the same one twice
            status, report, _ = check_json(capsys, site)
        finally:
            PickTwin.choose[0] = min
        assert status == 1, report
        assert report["difference"]["path"] == "/picked"
        divergence = report["divergence"]
        assert divergence["by"] == culprit
        assert [c["command_name"] for c in divergence["commands"]] == [
            PickTwin.command_name]

    def test_digests_of_the_previous_scheme_are_not_compared(
            self, capsys, site, monkeypatch):
        """zjournal-digest-2 hashed tied members as one: its digests are
        passed over, not compared with this scheme's."""
        def old_record(root, after):
            result = digest.state_digest(root)
            return digest.StateDigest(after, result.hexdigest,
                                      result.objects,
                                      scheme="zjournal-digest-2")

        jdb = open_site(site, digest_interval=2)
        workload(jdb, 3)
        monkeypatch.setattr(digest, "record", old_record)
        workload(jdb, 4, start=3)
        monkeypatch.undo()
        workload(jdb, 3, start=7)
        jdb.close()
        status, report, _ = check_json(capsys, site)
        assert status == 0, report
        old = report["digests"]["other_scheme"]
        assert old >= 2
        assert report["digests"]["recorded"] == (
            report["digests"]["matched"]) == len(digest_points(site)) - old

    @pytest.mark.parametrize("batch", ["1", "1000"])
    def test_digests_are_queries_compared_after_their_seq(self, capsys,
                                                         site, batch):
        """Replay passes over digest entries (query-flagged), so
        check-replay reads them beforehand and compares each right after
        the command it follows: with a large batch, against uncommitted
        state.  (Needs JournaledDB._record_digest to journal digests with
        FLAG_QUERY.)"""
        jdb = open_site(site, digest_interval=3)
        workload(jdb, 10)
        jdb.execute(RandomBump("b"))
        workload(jdb, 6, start=10)
        jdb.close()
        journal = site.journal(readonly=True)
        try:
            digests = [e for e in journal.entries()
                       if e.command_name == DIGEST_COMMAND]
            culprit = next(e.seq for e in journal.entries()
                           if e.command_name == RandomBump.command_name)
        finally:
            journal.close()
        assert len(digests) >= 4 and all(e.is_query for e in digests)
        status, report, _ = check_json(capsys, site, "--batch-size", batch)
        assert status == 1
        points = [e.args["after"] for e in digests]
        before = [p for p in points if p < culprit]
        mismatch = report["digests"]["first_mismatch"]
        assert mismatch["after"] == min(p for p in points if p >= culprit)
        assert report["digests"]["matched"] == len(before)
        assert report["digests"]["compared"] == len(before) + 1
        assert report["divergence"]["after"] == max(before)

    def test_digests_journaled_without_the_flag(self, capsys, site,
                                                monkeypatch):
        """Journals written before digests were flagged as queries hold
        them as commands: they are compared too."""
        real = digest.journal_entry

        def unflagged(root, after):
            record = real(root, after)
            return record[:5] + (0,) + record[6:]

        monkeypatch.setattr(digest, "journal_entry", unflagged)
        jdb = open_site(site, digest_interval=4)
        workload(jdb, 20)
        jdb.close()
        journal = site.journal(readonly=True)
        try:
            digests = [e for e in journal.entries()
                       if e.command_name == DIGEST_COMMAND]
        finally:
            journal.close()
        assert len(digests) >= 4 and not any(e.is_query for e in digests)
        status, report, _ = check_json(capsys, site)
        assert status == 0, report
        assert report["digests"]["matched"] == len(digests)


WALK_A = '''
from zjournal import Command


class Note(Command):
    command_name = "walk.a.note"

    def __init__(self, text):
        self.text = text

    def execute(self, root, context):
        root.setdefault("notes", []).append(self.text)
        root._p_changed = True
'''

WALK_B = '''
import persistent

from zjournal import Command


class Box(persistent.Persistent):

    def __init__(self, value):
        self.value = value


class PutBox(Command):
    command_name = "walk.b.put-box"

    def __init__(self, value):
        self.value = value

    def execute(self, root, context):
        root["box"] = Box(self.value)
'''

BUILD = '''
import sys
import ZODB, ZODB.FileStorage
from zjournal import FileJournal, JournaledDB
import walk_a, walk_b
jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(sys.argv[1])),
                  FileJournal(sys.argv[2], fsync="never"))
for i in range(5):
    jdb.execute(walk_a.Note("n%d" % i))
jdb.execute(walk_b.PutBox(7))
jdb.close()
'''


class TestImportsOpeningTheLiveZODBDoesNotCount:
    """The live root holds a walk_b.Box: loading it imports walk_b, which
    registers walk.b.put-box, although only walk_a was asked for."""

    def zodb_journal(self, modules, *argv):
        env = dict(os.environ, PYTHONPATH=str(modules))
        return subprocess.run(
            [sys.executable, "-m", "zjournal.cli"] + [str(a) for a in argv],
            capture_output=True, text=True, timeout=120, env=env)

    def test_refused_as_rebuild_would_be(self, site, tmp_path):
        modules = tmp_path / "modules"
        modules.mkdir()
        (modules / "walk_a.py").write_text(WALK_A)
        (modules / "walk_b.py").write_text(WALK_B)
        proc = subprocess.run(
            [sys.executable, "-c", BUILD, site.data_fs, site.journal_dir],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, PYTHONPATH=str(modules)))
        assert proc.returncode == 0, proc.stderr
        # Rebuild with walk_a alone fails at seq 6: the premise.
        rebuilt = tmp_path / "Rebuilt.fs"
        proc = self.zodb_journal(modules, "rebuild", site.journal_dir,
                                 "--zodb", rebuilt, "--import", "walk_a")
        assert proc.returncode == 1 and "walk.b.put-box" in proc.stderr
        proc = self.zodb_journal(modules, "check-replay", site.journal_dir,
                                 "--zodb", site.data_fs, "--import", "walk_a")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        assert ("seq 6 of the journal is command 'walk.b.put-box'"
                in proc.stderr)
        assert "found before anything was replayed" in proc.stderr
        assert "replay stopped" not in proc.stderr
        # With both modules the same journal and ZODB check out.
        proc = self.zodb_journal(modules, "check-replay", site.journal_dir,
                                 "--zodb", site.data_fs, "--import", "walk_a",
                                 "--import", "walk_b")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK:" in proc.stdout
