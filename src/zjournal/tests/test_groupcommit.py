import threading

import pytest
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal.journal import FileIO
from zjournal.tests import examples
from zjournal.tests.examples import Fail
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.helpers import DiskFull


def transactions(data_fs):
    storage = ZODB.FileStorage.FileStorage(data_fs, read_only=True)
    try:
        return sum(1 for _ in storage.iterator())
    finally:
        storage.close()


def hammer(jdb, threads, per, make):
    results = {}
    errors = []

    def work(i):
        for k in range(per):
            try:
                results[i, k] = jdb.execute(make(i, k))
            except Exception as e:
                errors.append((i, k, e))

    workers = [threading.Thread(target=work, args=(i,))
               for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results, errors


@pytest.fixture
def batch_site(site):
    def open_(**kw):
        return zjournal.JournaledDB(site.db(), site.journal(fsync="batch"),
                                    **kw)
    site.open_batch = open_
    return site


class TestGroupCommit:

    def test_concurrent_commands_share_commits(self, batch_site):
        jdb = batch_site.open_batch(batch_window=0.005)
        results, errors = hammer(jdb, 8, 25, lambda i, k: Increment("c"))
        assert errors == []
        # Each caller got its own result: the counter's value right after
        # its command, so all 200 values are distinct.
        assert sorted(results.values()) == list(range(1, 201))
        assert [e.seq for e in jdb.journal.entries()] == list(range(1, 201))
        jdb.close()
        # Far fewer ZODB transactions than commands: the groups worked.
        assert transactions(batch_site.data_fs) < 200 * 0.75

    def test_a_failing_command_fails_alone(self, batch_site):
        jdb = batch_site.open_batch(batch_window=0.005)

        def make(i, k):
            return Fail("f%d-%d" % (i, k)) if k % 3 == 0 else Put(
                "p%d-%d" % (i, k), k)

        results, errors = hammer(jdb, 6, 12, make)
        assert sorted((i, k) for i, k, _ in errors) == sorted(
            (i, k) for i in range(6) for k in range(12) if k % 3 == 0)
        assert all(isinstance(e, RuntimeError) for _, _, e in errors)
        conn = jdb.open()
        table, _ = examples.state(conn.root())
        conn.close()
        assert not any(key.startswith("f") for key in table)
        assert len(table) == 6 * 8
        assert {e.command_name for e in jdb.journal.entries()} == {
            "tests.put"}
        jdb.close()

    def test_rebuild_gives_the_same_state(self, batch_site):
        jdb = batch_site.open_batch(batch_window=0.002)
        hammer(jdb, 4, 20, lambda i, k: Increment("c%d" % (k % 3)))
        conn = jdb.open()
        before = examples.state(conn.root())
        conn.close()
        jdb.close()
        batch_site.remove_zodb()
        jdb = batch_site.open_batch()
        assert jdb.recovery.action == "rebuilt"
        conn = jdb.open()
        assert examples.state(conn.root()) == before
        conn.close()
        jdb.close()

    def test_a_journal_failure_fails_the_whole_group(self, batch_site):
        io = DiskFull()
        jdb = zjournal.JournaledDB(
            batch_site.db(), batch_site.journal(fsync="batch", io=io),
            batch_window=0.005)
        jdb.execute(Put("before", 1))
        io.fail = True
        results, errors = hammer(jdb, 4, 2, lambda i, k: Put("x", 1))
        assert results == {}
        assert {type(e) for _, _, e in errors} <= {
            zjournal.JournalWriteError, zjournal.JournalFailedError}
        assert len(errors) == 8
        assert jdb.journal.last_seq == 1
        jdb.close()

    def test_closed_db_refuses(self, batch_site):
        jdb = batch_site.open_batch()
        jdb.close()
        with pytest.raises(zjournal.RecoveryError):
            jdb.execute(Put("a", 1))

    def test_batch_syncs_every_append(self, site):
        class Counting(FileIO):
            syncs = 0

            def sync(self, fd):
                type(self).syncs += 1
                super().sync(fd)

        journal = site.journal(fsync="batch", io=Counting())
        before = Counting.syncs
        journal.append([(1, 0.0, 1, "tests.put", b"\x80\x04}\x94.")])
        journal.append([(2, 0.0, 1, "tests.put", b"\x80\x04}\x94.")])
        assert Counting.syncs - before == 2
        journal.close()
