"""Point-in-time restore (``zodb-journal restore``, zjournal.restore).

Every test works on a real journal and real FileStorages; backups are
made by ZODB's own repozo, run as a separate process, or are plain copies
of a Data.fs.  The expected states come from replaying a slice of the
journal's full entry list into a fresh MappingStorage
(helpers.replayed_state), not from the code under test.
"""
import datetime
import os
import shutil
import subprocess
import sys
import time

import pytest
import ZODB
import ZODB.FileStorage

from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import MARKER_KEY
from zjournal import cli
from zjournal import recovery
from zjournal.tests import examples
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.helpers import digest
from zjournal.tests.helpers import replayed_state

EXAMPLES = "zjournal.tests.examples"
FS_SUFFIXES = ("", ".index", ".lock", ".tmp", ".part")


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def repozo_backup(data_fs, repository):
    """A real repozo backup (-B), in its own process, as cron runs it."""
    os.makedirs(repository, exist_ok=True)
    subprocess.run([sys.executable, "-m", "ZODB.scripts.repozo", "-B",
                    "-r", repository, "-f", data_fs], check=True,
                   capture_output=True, timeout=60)


def read_zodb(data_fs):
    """(state, marker last_seq, marker journal id) of a FileStorage."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(data_fs), read_only=True))
    try:
        conn = db.open()
        root = conn.root()
        marker = root[MARKER_KEY]
        result = (examples.state(root), marker.last_seq, marker.journal_id)
        conn.close()
        return result
    finally:
        db.close()


def leftovers(path):
    return [path + s for s in FS_SUFFIXES if os.path.exists(path + s)]


class Shop:
    """A journaled application, its journal and its backups."""

    def __init__(self, root):
        self.root = str(root)
        self.data_fs = os.path.join(self.root, "Data.fs")
        self.journal_dir = os.path.join(self.root, "journal")
        self.repozo = os.path.join(self.root, "repozo")

    def run(self, n, start=0):
        jdb = JournaledDB(
            ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs)),
            FileJournal(self.journal_dir, fsync="never", segment_size=1500))
        try:
            for i in range(start, start + n):
                jdb.execute(Increment("n"))
                if i % 3 == 0:
                    jdb.execute(Stamp("s%d" % (i % 4)))
                else:
                    jdb.execute(Put("k%d" % (i % 5), i))
            return jdb.journal.last_seq
        finally:
            jdb.close()

    def journal(self):
        return FileJournal(self.journal_dir, readonly=True)

    def expected(self, seq):
        with self.journal() as journal:
            return replayed_state(journal, seq)

    def times(self):
        with self.journal() as journal:
            return {e.seq: e.time for e in journal.entries()}


# Run in a process of its own, so that the restoring test process does
# not know the command.
LATER_COMMAND = """
import sys
import ZODB, ZODB.FileStorage
from zjournal import Command, FileJournal, JournaledDB

class Later(Command):
    command_name = "tests.restore.later"
    def execute(self, root, context):
        root["later"] = 1

jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(sys.argv[1])),
                  FileJournal(sys.argv[2], fsync="never", segment_size=1500))
jdb.execute(Later())
jdb.close()
"""


@pytest.fixture
def shop(tmp_path):
    """40 commands, a repozo backup, 40 more."""
    shop = Shop(tmp_path)
    shop.backup_seq = shop.run(20)
    repozo_backup(shop.data_fs, shop.repozo)
    shop.last_seq = shop.run(20, start=20)
    return shop


class TestRestoreFromRepozo:

    def test_at_a_seq(self, shop, tmp_path, capsys):
        target = str(tmp_path / "restored.fs")
        until = shop.backup_seq + 17
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until", until)
        assert status == 0, err
        state, seq, journal_id = read_zodb(target)
        assert seq == until
        assert state == shop.expected(until)
        assert state != shop.expected(until - 1)
        with shop.journal() as journal:
            assert journal_id == journal.identity
        assert "the backup was at seq %d" % shop.backup_seq in out
        assert "replayed seq %d..%d" % (shop.backup_seq + 1, until) in out
        assert "17 commands" in out

    def test_to_the_end_by_default(self, shop, tmp_path, capsys):
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.expected(shop.last_seq),
                                         shop.last_seq)
        # The live ZODB and the restored one agree, and the restored one
        # opens as an ordinary journaled ZODB: nothing to catch up.
        assert read_zodb(shop.data_fs)[:2] == read_zodb(target)[:2]
        jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(target)),
                          shop.journal())
        try:
            assert jdb.recovery.action == "current"
        finally:
            jdb.close()

    def test_at_a_time(self, shop, tmp_path, capsys):
        times = shop.times()
        # A command whose time differs from the next one's at the
        # microsecond precision --until is read with.
        until = next(s for s in range(shop.backup_seq + 5, shop.last_seq)
                     if int(times[s] * 1e6) < int(times[s + 1] * 1e6))
        when = datetime.datetime.fromtimestamp(
            times[until], datetime.timezone.utc).isoformat()
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until", when)
        assert status == 0, err
        state, seq, _ = read_zodb(target)
        assert seq == until
        assert state == shop.expected(until)

    def test_at_a_time_before_a_command_this_code_does_not_know(
            self, shop, tmp_path, capsys):
        # Another process (a newer release of the application) journaled
        # a command the restoring code cannot import, after the requested
        # time: it is not replayed, so it must not refuse the restore.
        time.sleep(0.002)
        subprocess.run([sys.executable, "-c", LATER_COMMAND, shop.data_fs,
                        shop.journal_dir], check=True, timeout=60)
        with shop.journal() as journal:
            last = list(journal.entries(shop.last_seq, None))
        assert [e.command_name for e in last] == [
            last[0].command_name, "tests.restore.later"]
        assert int(last[0].time * 1e6) < int(last[1].time * 1e6)
        when = datetime.datetime.fromtimestamp(
            last[0].time, datetime.timezone.utc).isoformat()
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until", when)
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.expected(shop.last_seq),
                                         shop.last_seq)
        # Up to the end it is still refused, before anything is written.
        again = str(tmp_path / "again.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", again,
                               "--import", EXAMPLES)
        assert status != 0
        assert "tests.restore.later" in err
        assert leftovers(again) == []

    def test_backup_date_picks_an_older_backup(self, shop, tmp_path,
                                               capsys):
        first = sorted(os.listdir(shop.repozo))[0].split(".")[0]
        time.sleep(1.1)  # repozo names backups by the second
        repozo_backup(shop.data_fs, shop.repozo)  # at shop.last_seq
        until = shop.backup_seq + 3
        target = str(tmp_path / "restored.fs")
        # The latest backup is past the point asked for: refused, and the
        # message lists the backups there are.
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until", until)
        assert status == 1
        assert "at seq %d, after the requested seq %d" % (
            shop.last_seq, until) in err
        assert first in err and "--backup-date" in err
        assert leftovers(target) == []
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until", until,
                               "--backup-date", first)
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.expected(until), until)
        assert "the backup was at seq %d" % shop.backup_seq in out


class TestRestoreFromCopies:

    def test_from_a_filestorage_copy_into_a_uri(self, shop, tmp_path,
                                                capsys):
        copy = str(tmp_path / "copy.fs")
        shutil.copyfile(shop.data_fs, copy)  # at shop.last_seq
        shop.last_seq = shop.run(5, start=40)
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", copy, "--zodb", "file://" + target,
                               "--import", EXAMPLES)
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.expected(shop.last_seq),
                                         shop.last_seq)
        assert "replayed seq %d..%d" % (shop.last_seq - 9,
                                        shop.last_seq) in out

    def test_with_an_sqlite_journal(self, tmp_path, capsys):
        from zjournal.sqljournal import SQLiteJournal
        data_fs = str(tmp_path / "Data.fs")
        uri = "sqlite://" + str(tmp_path / "journal.sqlite")

        def work(n):
            jdb = JournaledDB(
                ZODB.DB(ZODB.FileStorage.FileStorage(data_fs)),
                SQLiteJournal(str(tmp_path / "journal.sqlite"),
                              fsync="never"))
            try:
                for i in range(n):
                    jdb.execute(Put("k%d" % (i % 3), i))
                    jdb.execute(Increment("n"))
            finally:
                jdb.close()
        work(5)
        copy = str(tmp_path / "copy.fs")
        shutil.copyfile(data_fs, copy)
        work(5)
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", uri, "--from", copy,
                               "--zodb", target, "--import", EXAMPLES,
                               "--until", 15)
        assert status == 0, err
        assert "replayed seq 11..15" in out
        db = ZODB.DB(None)
        try:
            with SQLiteJournal(str(tmp_path / "journal.sqlite"),
                               readonly=True) as journal:
                recovery.rebuild(db, journal, until_seq=15)
            conn = db.open()
            expected = examples.state(conn.root())
            conn.close()
        finally:
            db.close()
        assert read_zodb(target)[:2] == (expected, 15)

    def test_the_catch_up_function(self, shop, tmp_path):
        copy = str(tmp_path / "copy.fs")
        cli.main(["restore", shop.journal_dir, "--from", shop.repozo,
                  "--zodb", copy, "--import", EXAMPLES,
                  "--until", str(shop.backup_seq)])
        assert read_zodb(copy)[1] == shop.backup_seq
        seen = []
        db = ZODB.DB(ZODB.FileStorage.FileStorage(copy))
        try:
            with shop.journal() as journal:
                result = recovery.catch_up(
                    db, journal, until_seq=shop.backup_seq + 4,
                    observe=lambda entry, seconds: seen.append(entry.seq))
        finally:
            db.close()
        assert (result.marker_seq, result.restored_seq, result.replayed) == (
            shop.backup_seq, shop.backup_seq + 4, 4)
        assert seen == list(range(shop.backup_seq + 1, shop.backup_seq + 5))
        assert read_zodb(copy)[0] == shop.expected(shop.backup_seq + 4)


class TestRefusals:

    def test_backup_beyond_until_time(self, shop, tmp_path, capsys):
        times = shop.times()
        when = datetime.datetime.fromtimestamp(
            times[shop.backup_seq] - 0.001, datetime.timezone.utc)
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until",
                               when.isoformat())
        assert status == 1
        assert "after the requested time" in err
        assert "older backup" in err
        assert leftovers(target) == []

    def test_backup_of_another_journal(self, shop, tmp_path, capsys):
        other = Shop(tmp_path / "other")
        os.makedirs(other.root)
        other.run(3)
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", other.data_fs, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        with shop.journal() as journal:
            assert "is %s" % journal.identity in err
        assert "was built from journal" in err
        assert leftovers(target) == []

    def test_non_empty_target(self, shop, tmp_path, capsys):
        target = str(tmp_path / "occupied.fs")
        shutil.copyfile(shop.data_fs, target)
        before = digest(target)
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "exists and is not empty" in err
        assert digest(target) == before

    def test_backup_without_marker(self, shop, tmp_path, capsys):
        import transaction
        plain = str(tmp_path / "plain.fs")
        db = ZODB.DB(ZODB.FileStorage.FileStorage(plain))
        with db.transaction() as conn:
            conn.root()["app"] = 1
        db.close()
        transaction.abort()
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", plain, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "no zjournal marker" in err
        assert leftovers(target) == []

    def test_empty_repository(self, shop, tmp_path, capsys):
        empty = tmp_path / "no-backups"
        empty.mkdir()
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", empty, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "repozo cannot recover" in err
        assert leftovers(target) == []

    def test_journal_behind_the_backup(self, shop, tmp_path, capsys):
        # The journal lost its newest segment after the backup was made.
        short = str(tmp_path / "short")
        shutil.copytree(shop.journal_dir, short)
        with shop.journal() as journal:
            segments = [os.path.basename(p) for p in journal.segments()]
        backup_segment = max(
            s for s in segments if int(s[:20]) <= shop.backup_seq)
        for name in segments:
            if name > backup_segment:
                os.remove(os.path.join(short, name))
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", short,
                               "--from", shop.data_fs, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "acknowledged commands are missing" in err
        assert leftovers(target) == []


class TestMoreRefusals:

    def test_until_seq_before_the_backup(self, shop, tmp_path, capsys):
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", shop.repozo, "--zodb", target,
                               "--import", EXAMPLES, "--until",
                               shop.backup_seq - 1)
        assert status == 1
        assert "after the requested seq %d" % (shop.backup_seq - 1) in err
        assert leftovers(target) == []

    def test_backup_of_another_history(self, shop, tmp_path, capsys):
        # A copy of the application (ZODB and journal: same identity)
        # that went on with other commands: its backup is of a history
        # the original journal is not.
        fork = Shop(tmp_path / "fork")
        shutil.copytree(shop.root, fork.root,
                        ignore=shutil.ignore_patterns("repozo", "*.lock"))
        os.remove(os.path.join(fork.root, "Data.fs.index"))
        forked_seq = fork.run(3, start=100)
        assert forked_seq == shop.last_seq + 6
        shop.run(5, start=40)   # the original goes on differently
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", fork.data_fs, "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "chain hash" in err or "another history" in err, err
        assert leftovers(target) == []


def sliced_shop(root, n=30, pause=0.003):
    """A shop whose ZODB is copied after every command: ``copies[seq]`` is
    a backup at exactly seq (to find one at a segment's end)."""
    shop = Shop(root)
    os.makedirs(shop.root, exist_ok=True)
    copies = {}
    jdb = JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(shop.data_fs)),
        FileJournal(shop.journal_dir, fsync="never", segment_size=600))
    try:
        for i in range(n):
            jdb.execute(Put("k%d" % (i % 5), i) if i % 2 else
                        Increment("n"))
            seq = jdb.journal.last_seq
            copies[seq] = os.path.join(shop.root, "at-%d.fs" % seq)
            shutil.copyfile(shop.data_fs, copies[seq])
            time.sleep(pause)
    finally:
        jdb.close()
    with shop.journal() as journal:
        firsts = [int(os.path.basename(p)[:20]) for p in journal.segments()]
        assert len(firsts) >= 4 and firsts[2] + 3 < n
        shop.times = {e.seq: e.time for e in journal.entries()}
        shop.states = {seq: replayed_state(journal, seq)
                       for seq in (firsts[2] - 1, firsts[2] + 1)}
    return shop, copies, firsts


def iso(seconds):
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).isoformat()


class TestPrunedJournal:
    """Restore from a journal whose first segments ``prune --remove``
    deleted: only a backup at the prune's point or later can be used."""

    @pytest.fixture
    def pruned(self, tmp_path, capsys):
        shop, copies, firsts = sliced_shop(tmp_path / "shop")
        # The backup ends exactly where the third segment begins: its own
        # last command goes away with the pruned segments.
        end = firsts[2] - 1
        status, out, err = run(capsys, "prune", shop.journal_dir,
                               "--covered-by", copies[end], "--remove",
                               "--yes")
        assert status == 0, err
        with shop.journal() as journal:
            assert journal.start_seq == end + 1
        return shop, copies, end

    def test_restores_from_the_covering_backup(self, pruned, tmp_path,
                                               capsys):
        shop, copies, end = pruned
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", copies[end], "--zodb", target,
                               "--import", EXAMPLES, "--until", end + 2)
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.states[end + 2], end + 2)

    def test_refuses_an_older_backup(self, pruned, tmp_path, capsys):
        shop, copies, end = pruned
        target = str(tmp_path / "restored.fs")
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", copies[end - 3], "--zodb", target,
                               "--import", EXAMPLES)
        assert status == 1
        assert "starts at seq %d" % (end + 1) in err
        assert "removed by zodb-journal prune" in err
        assert leftovers(target) == []

    def test_until_time_before_the_removed_last_command(
            self, pruned, tmp_path, capsys):
        # The backup's last command (seq `end`) ran after the requested
        # time, and the journal no longer says when: the backup must be
        # refused, not taken as the state at that time.
        shop, copies, end = pruned
        target = str(tmp_path / "restored.fs")
        until = (shop.times[end - 1] + shop.times[end]) / 2
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", copies[end], "--zodb", target,
                               "--import", EXAMPLES, "--until", iso(until))
        assert status == 1
        assert "backup's last commit" in err
        assert "older backup" in err
        assert leftovers(target) == []

    def test_until_time_after_the_backup_is_proven_by_its_commit(
            self, pruned, tmp_path, capsys):
        # The backup's last commit ran before the requested time, so its
        # removed last command did too: the restore goes on from there.
        shop, copies, end = pruned
        target = str(tmp_path / "restored.fs")
        until = (shop.times[end + 2] + shop.times[end + 3]) / 2
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", copies[end], "--zodb", target,
                               "--import", EXAMPLES, "--until", iso(until))
        assert status == 0, err
        assert read_zodb(target)[:2] == (shop.states[end + 2], end + 2)


def test_a_failed_restore_into_a_storage_uri_says_what_it_left(
        shop, tmp_path, capsys):
    # A zconfig:// URI stands for any storage zjournal cannot delete:
    # the copy is left there, and the message says to empty it first.
    data_fs = str(tmp_path / "behind-uri.fs")
    config = tmp_path / "storage.conf"
    config.write_text("<filestorage>\n  path %s\n</filestorage>\n" % data_fs)
    uri = "zconfig://%s" % config
    status, out, err = run(capsys, "restore", shop.journal_dir, "--from",
                           shop.repozo, "--zodb", uri, "--import", EXAMPLES,
                           "--until", shop.backup_seq - 1)
    assert status == 1
    assert "after the requested seq" in err
    assert "%s now holds a partial restore: empty it" % uri in err
    assert read_zodb(data_fs)[1] == shop.backup_seq
    # Which is why a second try is refused.
    status, out, err = run(capsys, "restore", shop.journal_dir, "--from",
                           shop.repozo, "--zodb", uri, "--import", EXAMPLES)
    assert status == 1
    assert "is not empty" in err


class Transactions:
    """A journal with a three-command transaction (seq 2..4) after a
    backup at seq 1, and one command after it (seq 5)."""

    def __init__(self, root):
        import zjournal
        self.shop = shop = Shop(root)
        os.makedirs(shop.root, exist_ok=True)
        self.backup = os.path.join(shop.root, "backup.fs")

        def open_jdb():
            return JournaledDB(
                ZODB.DB(ZODB.FileStorage.FileStorage(shop.data_fs)),
                FileJournal(shop.journal_dir, fsync="never"))
        jdb = open_jdb()
        jdb.execute(Put("a", 0))
        jdb.close()
        shutil.copyfile(shop.data_fs, self.backup)
        jdb = open_jdb()
        with jdb.transaction() as conn:
            for key in "abc":
                time.sleep(0.01)
                zjournal.execute(conn, Put(key, 1))
        time.sleep(0.01)
        jdb.execute(Put("d", 1))
        jdb.close()
        self.times = shop.times()

    def restore(self, capsys, target, until):
        return run(capsys, "restore", self.shop.journal_dir, "--from",
                   self.backup, "--zodb", target, "--import", EXAMPLES,
                   "--until", until)


class TestUntilAndTransactions:

    def test_a_seq_inside_a_transaction_is_exact_and_warned_about(
            self, tmp_path, capsys):
        site = Transactions(tmp_path / "shop")
        target = str(tmp_path / "restored.fs")
        status, out, err = site.restore(capsys, target, 3)
        assert status == 0, err
        assert read_zodb(target)[:2] == (site.shop.expected(3), 3)
        assert ("zodb-journal restore: warning: seq 3 is inside transaction"
                " 2..4: the result holds part of it, a state the live system"
                " never committed; --until 1 or --until 4 give committed"
                " states") in err
        # At a transaction's end: no warning.
        target = str(tmp_path / "at-4.fs")
        status, out, err = site.restore(capsys, target, 4)
        assert status == 0, err
        assert "warning" not in err
        assert read_zodb(target)[:2] == (site.shop.expected(4), 4)

    def test_a_time_inside_a_transaction_restores_before_it(
            self, tmp_path, capsys):
        site = Transactions(tmp_path / "shop")
        times = site.times
        for i, (a, b) in enumerate(((2, 3), (3, 4))):
            target = str(tmp_path / ("r%d.fs" % i))
            status, out, err = site.restore(capsys, target,
                                            iso((times[a] + times[b]) / 2))
            assert status == 0, err
            assert read_zodb(target)[:2] == (site.shop.expected(1), 1)
            assert "nothing to replay" in out
        target = str(tmp_path / "whole.fs")
        status, out, err = site.restore(capsys, target,
                                        iso((times[4] + times[5]) / 2))
        assert status == 0, err
        assert read_zodb(target)[:2] == (site.shop.expected(4), 4)

    def test_a_seq_beyond_the_journal_is_warned_about(self, tmp_path,
                                                      capsys):
        site = Transactions(tmp_path / "shop")
        target = str(tmp_path / "restored.fs")
        status, out, err = site.restore(capsys, target, 1000)
        assert status == 0, err
        assert read_zodb(target)[:2] == (site.shop.expected(5), 5)
        assert ("zodb-journal restore: warning: the journal ends at seq 5,"
                " before the requested seq 1000") in err
        assert "stale copy" in err


def test_until_time_checks_the_history_when_nothing_is_replayed(
        tmp_path, capsys):
    """A backup of another history of the same journal (same identity,
    different seq 3) is refused by --until TIME even when no command
    falls between the backup and that time."""
    shop = Shop(tmp_path / "shop")
    os.makedirs(shop.root)

    def work(data_fs, journal_dir, values):
        jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(data_fs)),
                          FileJournal(journal_dir, fsync="never"))
        for value in values:
            jdb.execute(Put("a", value))
        jdb.close()
    work(shop.data_fs, shop.journal_dir, [1, 2])
    fork_journal = os.path.join(shop.root, "fork")
    fork_fs = os.path.join(shop.root, "fork.fs")
    shutil.copytree(shop.journal_dir, fork_journal)
    shutil.copyfile(shop.data_fs, fork_fs)
    work(fork_fs, fork_journal, ["fork"])      # the other history's seq 3
    backup = os.path.join(shop.root, "fork-backup.fs")
    shutil.copyfile(fork_fs, backup)
    time.sleep(0.02)
    work(shop.data_fs, shop.journal_dir, ["main"])   # this one's seq 3
    time.sleep(0.05)
    work(shop.data_fs, shop.journal_dir, ["later"])
    times = shop.times()
    for until in (iso((times[3] + times[4]) / 2), "3"):
        target = str(tmp_path / ("r%s.fs" % until[:2]))
        status, out, err = run(capsys, "restore", shop.journal_dir,
                               "--from", backup, "--zodb", target,
                               "--import", EXAMPLES, "--until", until)
        assert status == 1, (until, out)
        assert "another history" in err
        assert leftovers(target) == []


def test_a_failed_restore_leaves_an_empty_target_empty(tmp_path, capsys):
    shop = Shop(tmp_path / "shop")
    os.makedirs(shop.root)
    last = shop.run(3)
    other = Shop(tmp_path / "other")
    os.makedirs(other.root)
    other.run(1)
    target = str(tmp_path / "restored.fs")
    open(target, "wb").close()
    # The backup belongs to another journal: refused after the copy.
    status, out, err = run(capsys, "restore", other.journal_dir, "--from",
                           shop.data_fs, "--zodb", target, "--import",
                           EXAMPLES)
    assert status == 1
    assert "built from journal" in err
    assert leftovers(target) == [target]
    assert os.path.getsize(target) == 0
    status, out, err = run(capsys, "restore", shop.journal_dir, "--from",
                           shop.data_fs, "--zodb", target, "--import",
                           EXAMPLES)
    assert status == 0, err
    assert read_zodb(target)[:2] == (shop.expected(last), last)
