"""Pruning and archiving (``zodb-journal prune``, zjournal.archive), and
reading archived or pruned journals (zjournal.journal).

Real journals of several segments, real FileStorages as backups, and for
crashes a real ``zodb-journal prune`` process killed with SIGKILL at the
archiving steps (zjournal.faults).
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import ZODB
import ZODB.FileStorage

from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import cli
from zjournal import recovery
from zjournal.errors import CorruptJournalError
from zjournal.errors import TamperedJournalError
from zjournal.format import encode_header
from zjournal.format import parse_segment_name
from zjournal.journal import JournalPrunedError
from zjournal.journal import PRUNE_STATE
from zjournal.tests import examples
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.helpers import replayed_state
from zjournal.tests.helpers import snapshot

EXAMPLES = "zjournal.tests.examples"


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def read_zodb(data_fs):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(data_fs), read_only=True))
    try:
        conn = db.open()
        root = conn.root()
        result = (examples.state(root), root["zjournal.marker"].last_seq)
        conn.close()
        return result
    finally:
        db.close()


def live_segments(journal_dir):
    return sorted(n for n in os.listdir(journal_dir) if n.endswith(".zjl"))


def entries(journal_dir):
    with FileJournal(journal_dir, readonly=True) as journal:
        return [(e.seq, e.time, e.command_name, e.payload, e.prev)
                for e in journal.entries(journal.start_seq)]


class Site:
    """An application with a journal of many small segments and a backup
    (a copy of its Data.fs) made halfway."""

    def __init__(self, root):
        self.root = str(root)
        self.data_fs = os.path.join(self.root, "Data.fs")
        self.journal_dir = os.path.join(self.root, "journal")
        self.backup = os.path.join(self.root, "backup.fs")

    def open(self, data_fs=None):
        return JournaledDB(
            ZODB.DB(ZODB.FileStorage.FileStorage(data_fs or self.data_fs)),
            FileJournal(self.journal_dir, fsync="never", segment_size=1200))

    def run(self, n, jdb=None):
        own = jdb is None
        jdb = jdb or self.open()
        try:
            for i in range(n):
                jdb.execute(Increment("n"))
                jdb.execute(Put("k%d" % (i % 7), i))
            return jdb.journal.last_seq
        finally:
            if own:
                jdb.close()

    def segment_ranges(self):
        """(name, first, last) of every segment, from the file names."""
        names = live_segments(self.journal_dir)
        firsts = [parse_segment_name(n) for n in names]
        with FileJournal(self.journal_dir, readonly=True) as journal:
            last = journal.last_seq
        return [(n, f, (firsts[i + 1] - 1) if i + 1 < len(firsts) else last)
                for i, (n, f) in enumerate(zip(names, firsts))]


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    site.backup_seq = site.run(25)
    shutil.copyfile(site.data_fs, site.backup)
    site.last_seq = site.run(15)
    site.ranges = site.segment_ranges()
    site.covered = [n for n, f, last in site.ranges[:-1]
                    if last <= site.backup_seq]
    assert 2 <= len(site.covered) < len(site.ranges) - 1
    site.originals = {n: open(os.path.join(site.journal_dir, n), "rb").read()
                      for n in site.covered}
    site.entries = entries(site.journal_dir)
    with FileJournal(site.journal_dir, readonly=True) as journal:
        site.expected = replayed_state(journal)
    return site


def prune(capsys, site, *options):
    return run(capsys, "prune", site.journal_dir, "--covered-by",
               site.backup, *options)


class TestPlan:

    def test_without_yes_nothing_changes(self, site, capsys):
        before = snapshot(site.journal_dir)
        status, out, err = prune(capsys, site, "--archive")
        assert status == 1
        assert "pass --yes" in err
        for name in site.covered:
            assert name in out
        assert site.ranges[len(site.covered)][0] not in out
        assert "a rebuild from seq 1 needs the archive at %s" % (
            os.path.join(site.journal_dir, "archive")) in out
        status, out, err = prune(capsys, site, "--remove", "--dry-run")
        assert status == 0
        assert "rebuild from scratch is no longer possible" in out
        assert snapshot(site.journal_dir) == before

    def test_backup_at_the_end(self, site, capsys, tmp_path):
        early = str(tmp_path / "early.fs")
        jdb = site.open(early)  # an empty ZODB: rebuilt, then rewound
        jdb.close()
        recovered = read_zodb(early)[1]
        assert recovered == site.last_seq
        # A backup at the journal's end covers every segment but the last.
        status, out, _ = run(capsys, "prune", site.journal_dir,
                             "--covered-by", early, "--archive", "--dry-run")
        assert status == 0
        for name, first, last in site.ranges[:-1]:
            assert name in out
        assert site.ranges[-1][0] not in out.split("segments from")[0]

    def test_empty_last_segment_keeps_the_one_before(self, site, capsys,
                                                     tmp_path):
        # What a writer killed right after starting a segment leaves.
        with FileJournal(site.journal_dir, readonly=True) as journal:
            identity = journal.identity_bytes
        empty = os.path.join(site.journal_dir, "%020d.zjl" % (
            site.last_seq + 1))
        with open(empty, "wb") as f:
            f.write(encode_header(identity, site.last_seq + 1, 0.0))
        at_end = str(tmp_path / "at-end.fs")
        site.open(at_end).close()
        status, out, _ = run(capsys, "prune", site.journal_dir,
                             "--covered-by", at_end, "--archive",
                             "--dry-run")
        assert status == 0
        listed = out.split("segments from")[0]
        assert site.ranges[-2][0] in listed
        assert site.ranges[-1][0] not in listed

    def test_the_live_database_is_no_backup(self, site, capsys):
        before = snapshot(site.journal_dir)
        jdb = site.open()
        try:
            lock_before = open(site.data_fs + ".lock", "rb").read()
            for action in ("--archive", "--remove"):
                status, out, err = run(capsys, "prune", site.journal_dir,
                                       "--covered-by", site.data_fs,
                                       action, "--yes")
                assert status == 1 and out == ""
                assert ("%s is open for writing by another process"
                        % site.data_fs) in err
                assert "it is a live database, not a backup" in err
            # A copy is a backup, the writer running or not.
            status, out, err = prune(capsys, site, "--archive", "--dry-run")
            assert status == 0 and "will archive" in out, err
            # The check wrote nothing into the writer's lock file.
            assert open(site.data_fs + ".lock", "rb").read() == lock_before
            jdb.execute(Increment("n"))   # the writer is undisturbed
        finally:
            jdb.close()
        assert snapshot(site.journal_dir) != before  # the writer's record
        # Once nothing has it open, it is as good a copy as any.
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", site.data_fs, "--dry-run",
                               "--archive")
        assert status == 0, err
        assert "will archive" in out

    def test_backup_of_another_journal(self, site, capsys, tmp_path):
        other = Site(tmp_path / "other")
        os.makedirs(other.root)
        other.run(2)
        before = snapshot(site.journal_dir)
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", other.data_fs, "--remove",
                               "--yes")
        assert status == 1
        assert "not from %s" % site.journal_dir in err
        assert snapshot(site.journal_dir) == before

    def test_backup_of_another_history(self, site, capsys, tmp_path):
        # The same identity, other records: not the history the backup
        # was built from.
        from zjournal import commands
        forged = str(tmp_path / "forged")
        with FileJournal(site.journal_dir, readonly=True) as journal:
            identity = journal.identity
        j = FileJournal(forged, fsync="never", identity=identity,
                        segment_size=1200)
        name, version, payload = commands.encode(Increment("other"))
        for seq in range(1, site.last_seq + 1):
            j.append([(seq, 1.0, version, name, payload)])
        j.close()
        before = snapshot(forged)
        status, out, err = run(capsys, "prune", forged, "--covered-by",
                               site.backup, "--remove", "--yes")
        assert status == 1
        assert "another history" in err
        assert snapshot(forged) == before

class TestArchive:

    def test_archived_segments_are_read_transparently(self, site, capsys,
                                                      tmp_path):
        status, out, err = prune(capsys, site, "--archive", "--yes")
        assert status == 0, err
        archive = os.path.join(site.journal_dir, "archive")
        assert sorted(os.listdir(archive)) == [n + ".gz"
                                                for n in site.covered]
        for name, data in site.originals.items():
            assert not os.path.exists(os.path.join(site.journal_dir, name))
            with gzip.open(os.path.join(archive, name + ".gz")) as f:
                assert f.read() == data  # plain gzip of the same bytes
        assert entries(site.journal_dir) == site.entries
        status, out, err = run(capsys, "verify", site.journal_dir)
        assert status == 0, out + err
        assert "%d records in %d segment(s)" % (
            site.last_seq, len(site.ranges)) in out
        status, dump, _ = run(capsys, "dump", site.journal_dir, "--json")
        assert [json.loads(line)["seq"] for line in dump.splitlines()] == \
            list(range(1, site.last_seq + 1))
        info = json.loads(run(capsys, "info", site.journal_dir,
                              "--json")[1])
        assert (info["first_seq"], info["archived_segments"],
                info["pruned_before"]) == (1, len(site.covered), None)
        target = str(tmp_path / "rebuilt.fs")
        status, out, err = run(capsys, "rebuild", site.journal_dir,
                               "--zodb", target, "--import", EXAMPLES)
        assert status == 0, err
        assert read_zodb(target) == (site.expected, site.last_seq)
        # The writer opens it, appends, and rebuilds an empty ZODB from
        # archived and live segments alike.
        site.run(3)
        again = str(tmp_path / "again.fs")
        jdb = site.open(again)
        try:
            assert jdb.recovery.action == "rebuilt"
            assert jdb.recovery.replayed == site.last_seq + 6
        finally:
            jdb.close()
        assert read_zodb(again) == read_zodb(site.data_fs)

    def test_archive_elsewhere_is_recorded(self, site, capsys, tmp_path):
        elsewhere = str(tmp_path / "cold-storage")
        status, out, err = prune(capsys, site, "--archive", elsewhere,
                                 "--yes")
        assert status == 0, err
        assert sorted(os.listdir(elsewhere)) == [n + ".gz"
                                                 for n in site.covered]
        with open(os.path.join(site.journal_dir, PRUNE_STATE)) as f:
            assert json.load(f)["archive"] == elsewhere
        assert entries(site.journal_dir) == site.entries
        target = str(tmp_path / "rebuilt.fs")
        with FileJournal(site.journal_dir, readonly=True) as journal:
            db = ZODB.DB(ZODB.FileStorage.FileStorage(target))
            try:
                recovery.rebuild(db, journal)
            finally:
                db.close()
        assert read_zodb(target) == (site.expected, site.last_seq)
        # Without its archive, the journal is missing its first records.
        shutil.move(elsewhere, elsewhere + ".moved")
        with FileJournal(site.journal_dir, readonly=True) as journal:
            with pytest.raises(CorruptJournalError):
                journal.verify()

    def test_beside_a_running_writer(self, site, capsys, tmp_path):
        jdb = site.open()
        try:
            status, out, err = prune(capsys, site, "--archive", "--yes")
            assert status == 0, err
            # The writer, which listed the segments before they moved,
            # still reads them, and goes on appending.
            assert [(e.seq, e.prev) for e in jdb.journal.entries()] == [
                (s[0], s[4]) for s in site.entries]
            last = site.run(10, jdb)
        finally:
            jdb.close()
        assert entries(site.journal_dir)[:len(site.entries)] == site.entries
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().last_seq == last

    def test_an_archive_that_does_not_decompress_to_the_original(
            self, site, capsys, monkeypatch):
        # A compressor that loses the last byte of what it is given: the
        # comparison after writing must catch it before the original goes.
        from zjournal import archive
        write = gzip.GzipFile.write
        monkeypatch.setattr(archive.gzip.GzipFile, "write",
                            lambda self, data: write(self, data[:-1]))
        status, out, err = prune(capsys, site, "--archive", "--yes")
        assert status == 1
        assert "does not decompress to the bytes of" in err
        for name, data in site.originals.items():
            with open(os.path.join(site.journal_dir, name), "rb") as f:
                assert f.read() == data
        assert os.listdir(os.path.join(site.journal_dir, "archive")) == []

    def test_damaged_archive_is_reported(self, site, capsys):
        assert prune(capsys, site, "--archive", "--yes")[0] == 0
        gz = os.path.join(site.journal_dir, "archive",
                          site.covered[1] + ".gz")
        data = bytearray(open(gz, "rb").read())
        data[len(data) // 2] ^= 0xFF
        with open(gz, "wb") as f:
            f.write(data)
        status, out, err = run(capsys, "verify", site.journal_dir)
        assert status == 1
        assert gz in out + err


class TestRemove:

    def test_consequences(self, site, capsys, tmp_path):
        status, out, err = prune(capsys, site, "--remove", "--yes")
        assert status == 0, err
        kept_from = site.ranges[len(site.covered)][1]
        assert "the journal starts at seq %d" % kept_from in out
        assert live_segments(site.journal_dir) == [
            n for n, _, _ in site.ranges[len(site.covered):]]
        info = json.loads(run(capsys, "info", site.journal_dir,
                              "--json")[1])
        assert (info["first_seq"], info["pruned_before"]) == (kept_from,
                                                             kept_from)
        status, out, err = run(capsys, "verify", site.journal_dir)
        assert status == 0, out + err
        assert entries(site.journal_dir) == site.entries[kept_from - 1:]
        with FileJournal(site.journal_dir, readonly=True) as journal:
            with pytest.raises(JournalPrunedError) as e:
                list(journal.entries(1, 5))
            assert e.value.first_seq == kept_from
        # A rebuild from scratch is refused, naming the first seq, and
        # leaves no file behind.
        target = str(tmp_path / "rebuilt.fs")
        status, out, err = run(capsys, "rebuild", site.journal_dir,
                               "--zodb", target, "--import", EXAMPLES)
        assert status == 1
        assert "starts at seq %d" % kept_from in err
        assert not os.path.exists(target)
        # So does opening an empty ZODB.
        with pytest.raises(JournalPrunedError):
            site.open(str(tmp_path / "empty.fs"))
        # The backup still restores, and catches up to the end.
        status, out, err = run(capsys, "restore", site.journal_dir,
                               "--from", site.backup, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 0, err
        assert read_zodb(target) == (site.expected, site.last_seq)
        # The writer opens the pruned journal and appends.
        last = site.run(3)
        assert read_zodb(site.data_fs)[1] == last

    def test_check_replay_is_a_stated_consequence(self, site, capsys):
        # Archived segments are still read: check-replay works.
        assert prune(capsys, site, "--archive", "--yes")[0] == 0
        check = ("check-replay", site.journal_dir, "--zodb", site.data_fs,
                 "--import", EXAMPLES)
        status, out, err = run(capsys, *check)
        assert status == 0, out + err
        status, out, err = prune(capsys, site, "--remove", "--dry-run")
        assert status == 0, err
        assert ("consequence: zodb-journal check-replay, and replay or"
                " rebuild from seq 1, stop working" in out)
        assert prune(capsys, site, "--remove", "--yes")[0] == 0
        kept_from = site.ranges[len(site.covered)][1]
        status, out, err = run(capsys, *check)
        assert status == 1 and out == ""
        assert "starts at seq %d: zodb-journal prune --remove deleted" % (
            kept_from) in err
        assert "archived or pruned" not in err

    def test_reading_tools_start_where_the_journal_starts(self, site,
                                                          capsys):
        status, out, err = prune(capsys, site, "--remove", "--yes")
        assert status == 0, err
        kept_from = site.ranges[len(site.covered)][1]
        status, out, err = run(capsys, "info", site.journal_dir)
        assert status == 0, err
        assert "pruned:     seq 1 .. %d removed" % (kept_from - 1) in out
        status, out, err = run(capsys, "dump", site.journal_dir, "--json")
        assert status == 0, err
        seqs = [json.loads(line)["seq"] for line in out.splitlines()]
        assert seqs == list(range(kept_from, site.last_seq + 1))
        status, out, err = run(capsys, "stats", site.journal_dir, "--json")
        assert status == 0, err
        assert json.loads(out)["entries"] == site.last_seq - kept_from + 1
        status, out, err = run(capsys, "export", site.journal_dir)
        assert status == 0, err
        records = [json.loads(line) for line in out.splitlines()
                   if '"seq"' in line]
        assert records[0]["seq"] == kept_from
        # Asking for the removed part is still refused, clearly.
        status, out, err = run(capsys, "dump", site.journal_dir, "--start",
                               "1")
        assert status == 1
        assert "starts at seq %d" % kept_from in err

    def test_a_backup_older_than_the_journal_is_refused(self, site, capsys,
                                                        tmp_path):
        early = str(tmp_path / "early.fs")
        assert run(capsys, "rebuild", site.journal_dir, "--zodb", early,
                   "--import", EXAMPLES, "--until", 3)[0] == 0
        assert prune(capsys, site, "--remove", "--yes")[0] == 0
        kept_from = site.ranges[len(site.covered)][1]
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", site.journal_dir,
                               "--from", early, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "starts at seq %d: seq 4 is no longer in it" % kept_from in err
        assert not os.path.exists(target)
        # Opened by the application, the old ZODB is refused the same way,
        # and left as it was.
        before = read_zodb(early)
        with pytest.raises(JournalPrunedError):
            site.open(early)
        assert read_zodb(early) == before

    def test_after_archiving_removes_the_archive(self, site, capsys):
        assert prune(capsys, site, "--archive", "--yes")[0] == 0
        assert prune(capsys, site, "--remove", "--yes")[0] == 0
        assert os.listdir(os.path.join(site.journal_dir, "archive")) == []
        assert entries(site.journal_dir) == site.entries[
            site.ranges[len(site.covered)][1] - 1:]

    def test_state_pins_the_chain(self, site, capsys):
        assert prune(capsys, site, "--remove", "--yes")[0] == 0
        path = os.path.join(site.journal_dir, PRUNE_STATE)
        with open(path) as f:
            state = json.load(f)
        state["removed_head"] = "00" * 16
        with open(path, "w") as f:
            json.dump(state, f)
        with FileJournal(site.journal_dir, readonly=True) as journal:
            with pytest.raises(TamperedJournalError):
                journal.verify()

    def test_removed_by_hand_is_still_damage(self, site):
        os.remove(os.path.join(site.journal_dir, site.covered[0]))
        with FileJournal(site.journal_dir, readonly=True) as journal:
            with pytest.raises(CorruptJournalError) as e:
                journal.verify()
            assert not isinstance(e.value, JournalPrunedError)
            assert e.value.seq == 1


KILL_POINTS = [
    ("archive.after-write", "1"), ("archive.after-rename", "1"),
    ("archive.after-remove", "1"), ("archive.after-rename", "2"),
]


class TestCrash:

    def _prune_process(self, site, action, kill_at=None, count="1"):
        env = dict(os.environ)
        env.pop("ZJOURNAL_KILL_AT", None)
        if kill_at:
            env.update(ZJOURNAL_KILL_AT=kill_at, ZJOURNAL_KILL_COUNT=count)
        return subprocess.run(
            [sys.executable, "-m", "zjournal.cli", "prune",
             site.journal_dir, "--covered-by", site.backup, action, "--yes"],
            env=env, capture_output=True, text=True, timeout=60)

    @pytest.mark.parametrize("point,count", KILL_POINTS)
    def test_killed_while_archiving(self, site, point, count, tmp_path):
        done = self._prune_process(site, "--archive", point, count)
        assert done.returncode == -signal.SIGKILL, done.stderr
        archive = os.path.join(site.journal_dir, "archive")
        for name, data in site.originals.items():
            live = os.path.join(site.journal_dir, name)
            gz = os.path.join(archive, name + ".gz")
            # The original, or a complete archive of it, or both.
            assert os.path.exists(live) or os.path.exists(gz)
            if os.path.exists(live):
                assert open(live, "rb").read() == data
            if os.path.exists(gz):
                assert gzip.open(gz).read() == data
        assert entries(site.journal_dir) == site.entries
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().last_seq == site.last_seq
        # Running it again finishes the job and leaves no leftovers.
        done = self._prune_process(site, "--archive")
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(archive)) == [n + ".gz"
                                                for n in site.covered]
        assert entries(site.journal_dir) == site.entries

    def test_killed_while_removing(self, site):
        done = self._prune_process(site, "--remove", "prune.after-state")
        assert done.returncode == -signal.SIGKILL, done.stderr
        # The state is written, nothing removed yet: still whole.
        assert live_segments(site.journal_dir) == [n for n, _, _ in
                                                   site.ranges]
        assert entries(site.journal_dir) == site.entries
        done = self._prune_process(site, "--remove")
        assert done.returncode == 0, done.stderr
        kept_from = site.ranges[len(site.covered)][1]
        assert entries(site.journal_dir) == site.entries[kept_from - 1:]

    def test_half_removed_journal_reads_from_its_first_segment(self, site,
                                                               capsys):
        # A removal killed after its first deletion.
        assert prune(capsys, site, "--remove", "--dry-run")[0] == 0
        with FileJournal(site.journal_dir, readonly=True) as journal:
            from zjournal import archive
            plan = archive.plan(journal, site.backup_seq, "test", "remove")
            archive._update_state(
                site.journal_dir, journal.created,
                removed_before=plan.kept_from,
                removed_head=next(iter(journal.entries(
                    plan.kept_from - 1, plan.kept_from))).hash.hex())
        os.remove(os.path.join(site.journal_dir, site.covered[0]))
        second = site.ranges[1][1]
        assert entries(site.journal_dir) == site.entries[second - 1:]
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().first_seq == second


class TestOneArchivePlace:
    """A journal's archived segments are in one place: a prune that would
    start a second one (and hide the first) is refused."""

    def newer_backup(self, site):
        site.run(15)
        newer = os.path.join(site.root, "newer.fs")
        shutil.copyfile(site.data_fs, newer)
        return newer

    def test_no_new_directory_after_archiving_into_the_default(
            self, site, capsys, tmp_path):
        assert prune(capsys, site, "--archive", "--yes")[0] == 0
        newer = self.newer_backup(site)
        cold = str(tmp_path / "cold")
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", newer, "--archive", cold,
                               "--yes")
        assert status == 1
        archive = os.path.join(site.journal_dir, "archive")
        # The message names both the directory asked for and the one to
        # use, and says how to use it.
        assert "you asked to archive into %s, but journal" % cold in err
        assert "keeps its archive in %s (%d archived segments" % (
            archive, len(site.covered)) in err
        assert "run prune without DIR (or with --archive %s)" % archive in err
        assert not os.path.exists(cold)
        assert not os.path.exists(os.path.join(site.journal_dir,
                                               PRUNE_STATE))
        # Nothing moved: every record is still where readers look.
        status, out, err = run(capsys, "verify", site.journal_dir)
        assert status == 0, out + err
        # Pruning on into the journal's own archive still works.
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", newer, "--archive", "--yes")
        assert status == 0, err
        assert "archived" in out
        assert entries(site.journal_dir)[:len(site.entries)] == site.entries

    def test_no_default_directory_after_archiving_elsewhere(
            self, site, capsys, tmp_path):
        cold = str(tmp_path / "cold")
        assert prune(capsys, site, "--archive", cold, "--yes")[0] == 0
        newer = self.newer_backup(site)
        default = os.path.join(site.journal_dir, "archive")
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", newer, "--archive", default,
                               "--yes")
        assert status == 1
        assert "you asked to archive into %s, but journal" % default in err
        assert "keeps its archive in %s (%d archived segments" % (
            cold, len(site.covered)) in err
        assert "run prune without DIR (or with --archive %s)" % cold in err
        # --archive without a directory means the journal's own archive,
        # the recorded one.
        before = set(os.listdir(cold))
        status, out, err = run(capsys, "prune", site.journal_dir,
                               "--covered-by", newer, "--archive", "--yes")
        assert status == 0, err
        assert set(os.listdir(cold)) > before
        assert not os.path.exists(default)
        assert entries(site.journal_dir)[:len(site.entries)] == site.entries
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().last_seq == site.last_seq + 30


class TestRacesWithAWriter:
    """prune takes no writer lock: a writer opening, rolling over or
    reading while segments move must not notice."""

    def test_a_writer_opening_keeps_prune_state_tmp(self, site, capsys,
                                                    monkeypatch):
        # The application (re)starts at the moment prune renames its
        # pruned.json.tmp into place.
        from zjournal import archive
        real_rename = os.rename
        opened = []

        class OS:
            def __getattr__(self, name):
                return getattr(os, name)

            def rename(self, src, dst):
                if src.endswith(PRUNE_STATE + ".tmp"):
                    site.open().close()
                    opened.append(src)
                return real_rename(src, dst)

        monkeypatch.setattr(archive, "os", OS())
        status, out, err = prune(capsys, site, "--remove", "--yes")
        assert status == 0, err
        assert opened
        with open(os.path.join(site.journal_dir, PRUNE_STATE)) as f:
            assert json.load(f)["removed_before"] == \
                site.ranges[len(site.covered)][1]

    def test_a_writer_removes_only_its_own_tmp_files(self, site):
        stray_segment = os.path.join(site.journal_dir,
                                     "%020d.zjl.tmp" % (site.last_seq + 1))
        others = [os.path.join(site.journal_dir, n)
                  for n in (PRUNE_STATE + ".tmp", "notes.tmp")]
        for path in [stray_segment] + others:
            with open(path, "wb") as f:
                f.write(b"x")
        site.open().close()
        assert not os.path.exists(stray_segment)
        assert all(os.path.exists(p) for p in others)

    def test_writer_opening_on_a_torn_tail_while_the_segment_before_moves(
            self, site, capsys, monkeypatch):
        # The last segment holds only a torn record: the writer reads the
        # end of the segment before it, which prune archives right after
        # the writer listed the segments.
        with FileJournal(site.journal_dir, readonly=True) as journal:
            identity, last = journal.identity_bytes, journal.last_seq
        torn = os.path.join(site.journal_dir, "%020d.zjl" % (last + 1))
        with open(torn, "wb") as f:
            f.write(encode_header(identity, last + 1, 1.0) + b"\x17" * 9)
        covering = os.path.join(site.root, "covering.fs")
        shutil.copyfile(site.data_fs, covering)   # at `last`
        real = FileJournal._all_segments
        pruned = []

        def listing_then_prune(journal):
            segs = real(journal)
            if not journal.readonly and not pruned:
                pruned.append(run(capsys, "prune", site.journal_dir,
                                  "--covered-by", covering, "--archive",
                                  "--yes"))
            return segs

        monkeypatch.setattr(FileJournal, "_all_segments", listing_then_prune)
        jdb = site.open()
        try:
            assert pruned[0][0] == 0, pruned[0][2]
            previous = site.ranges[-1][0]
            assert previous + ".gz" in os.listdir(
                os.path.join(site.journal_dir, "archive"))
            assert jdb.journal.last_seq == last
            assert jdb.journal.torn_tail is not None
            last = site.run(3, jdb)
        finally:
            jdb.close()
        monkeypatch.undo()
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().last_seq == last

    def test_a_writer_rolling_over_during_the_prune(self, site, capsys,
                                                    monkeypatch):
        from zjournal import archive
        jdb = site.open()
        real = archive.archive_segment
        rolled = []

        def archive_then_write(source, target, journal_dir):
            real(source, target, journal_dir)
            if not rolled:
                before = len(live_segments(site.journal_dir))
                site.run(15, jdb)   # more than a segment's worth
                rolled.append(len(live_segments(site.journal_dir)) - before)

        monkeypatch.setattr(archive, "archive_segment", archive_then_write)
        try:
            status, out, err = prune(capsys, site, "--archive", "--yes")
            assert status == 0, err
            assert rolled[0] >= 1
            last = site.run(2, jdb)
        finally:
            jdb.close()
        assert sorted(os.listdir(os.path.join(site.journal_dir, "archive"))) \
            == [n + ".gz" for n in site.covered]
        assert entries(site.journal_dir)[:len(site.entries)] == site.entries
        with FileJournal(site.journal_dir, readonly=True) as journal:
            assert journal.verify().last_seq == last

    def test_info_and_verify_of_journals_opened_before_a_remove(
            self, site, capsys):
        # A writer, and a reader, listed the segments prune then removes:
        # their summaries and checks describe the journal as it is now.
        jdb = site.open()
        reader = FileJournal(site.journal_dir, readonly=True)
        try:
            status, out, err = prune(capsys, site, "--remove", "--yes")
            assert status == 0, err
            kept_from = site.ranges[len(site.covered)][1]
            for journal in (jdb.journal, reader):
                info = journal.info()
                assert (info["start_seq"], info["first_seq"],
                        info["segments"]) == (
                    kept_from, kept_from,
                    len(site.ranges) - len(site.covered))
                report = journal.verify()
                assert (report.first_seq, report.last_seq) == (
                    kept_from, site.last_seq)
            last = site.run(2, jdb)
            assert jdb.journal.verify().last_seq == last
        finally:
            reader.close()
            jdb.close()


class TestArchivePlace:
    """``pruned.json`` names the archive readers look in; a first try
    into another place that archived nothing must not leave it naming
    that (empty) place."""

    def _state(self, site):
        with open(os.path.join(site.journal_dir, PRUNE_STATE)) as f:
            return json.load(f)

    def _check_readable(self, site, capsys):
        status, out, err = run(capsys, "verify", site.journal_dir)
        assert status == 0, out + err
        assert entries(site.journal_dir)[:len(site.entries)] == site.entries

    def test_a_failure_before_anything_is_archived_is_rolled_back(
            self, site, capsys, tmp_path, monkeypatch):
        from zjournal import archive

        def disk_full(source, target, journal_dir):
            raise OSError(28, "No space left on device", target)

        monkeypatch.setattr(archive, "archive_segment", disk_full)
        other = str(tmp_path / "elsewhere")
        status, out, err = prune(capsys, site, "--archive", other, "--yes")
        assert status != 0
        assert "No space left" in err
        # As before the try: no prune state at all.
        assert not os.path.exists(os.path.join(site.journal_dir,
                                               PRUNE_STATE))
        monkeypatch.undo()
        default = os.path.join(site.journal_dir, "archive")
        status, out, err = prune(capsys, site, "--archive", default, "--yes")
        assert status == 0, err
        assert sorted(os.listdir(default)) == [n + ".gz"
                                               for n in site.covered]
        self._check_readable(site, capsys)

    def test_a_kill_before_anything_is_archived_then_the_default(
            self, site, capsys, tmp_path):
        other = str(tmp_path / "elsewhere")
        env = dict(os.environ, ZJOURNAL_KILL_AT="archive.after-write",
                   ZJOURNAL_KILL_COUNT="1")
        done = subprocess.run(
            [sys.executable, "-m", "zjournal.cli", "prune",
             site.journal_dir, "--covered-by", site.backup, "--archive",
             other, "--yes"], env=env, capture_output=True, text=True,
            timeout=60)
        assert done.returncode == -signal.SIGKILL, done.stderr
        # Killed: nothing could roll back the name of the new place.
        assert self._state(site)["archive"] == other
        assert not [n for n in os.listdir(other) if n.endswith(".gz")]
        default = os.path.join(site.journal_dir, "archive")
        status, out, err = prune(capsys, site, "--archive", default, "--yes")
        assert status == 0, err
        assert "archive" not in self._state(site)
        assert sorted(os.listdir(default)) == [n + ".gz"
                                               for n in site.covered]
        self._check_readable(site, capsys)
        # And a writer reopens it where it was.
        with FileJournal(site.journal_dir) as journal:
            assert journal.last_seq == site.last_seq

    def test_moving_to_another_place_while_nothing_is_archived(
            self, site, capsys, tmp_path):
        from zjournal.archive import _update_state
        with FileJournal(site.journal_dir, readonly=True) as journal:
            created = journal.created
        _update_state(site.journal_dir, created,
                      archive=str(tmp_path / "first"))
        second = str(tmp_path / "second")
        status, out, err = prune(capsys, site, "--archive", second, "--yes")
        assert status == 0, err
        assert self._state(site)["archive"] == second
        assert sorted(os.listdir(second)) == [n + ".gz"
                                              for n in site.covered]
        self._check_readable(site, capsys)
