"""Regression tests for defects found by an independent review.

Each test names the behaviour it protects; see the commit history for the
defect it once was.
"""
import os
import pickle
import threading

import persistent
import pytest
import transaction
from persistent.mapping import PersistentMapping

import zjournal
import zjournal.journal as journal_module
from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal.format import encode_transaction
from zjournal.tests import examples
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.helpers import snapshot
from zjournal.tests.helpers import marker_state


class RunsAnother(Command):
    """Misuse: runs a command of its own while executing."""
    command_name = "tests.review.runs-another"

    def __init__(self, how):
        self.how = how

    def execute(self, root, context):
        jdb = _current["jdb"]
        if self.how == "execute":
            jdb.execute(Put("inner", 1))
        elif self.how == "zjournal.execute":
            zjournal.execute(_current["conn"], Put("inner", 1))
        elif self.how == "commit":
            examples.Put("half", 1).execute(root, context)
            transaction.commit()


_current = {}


class TestNesting:

    @pytest.mark.parametrize("fsync", ["always", "batch"])
    def test_execute_inside_a_command_is_refused(self, site, fsync):
        jdb = site.open(journal_kw={"fsync": fsync})
        _current["jdb"] = jdb
        done = []
        worker = threading.Thread(target=lambda: done.append(
            pytest.raises(zjournal.NestedCommandError,
                          jdb.execute, RunsAnother("execute"))))
        worker.start()
        worker.join(10)
        assert done, "nested execute() deadlocked"
        assert jdb.journal.last_seq == 0
        assert marker_state(jdb) == (({}, {}), 0)
        jdb.close()

    def test_zjournal_execute_inside_a_command_is_refused(self, site):
        jdb = site.open()
        conn = jdb.open()
        _current.update(jdb=jdb, conn=conn)
        with pytest.raises(zjournal.NestedCommandError):
            zjournal.execute(conn, RunsAnother("zjournal.execute"))
        transaction.abort()
        conn.close()
        assert jdb.journal.last_seq == 0
        jdb.close()

    def test_a_command_cannot_commit_itself(self, site):
        jdb = site.open()
        conn = jdb.open()
        _current.update(jdb=jdb, conn=conn)
        with pytest.raises(zjournal.NestedCommandError):
            zjournal.execute(conn, RunsAnother("commit"))
        transaction.abort()
        conn.close()
        assert jdb.journal.last_seq == 0
        assert marker_state(jdb) == (({}, {}), 0)
        jdb.close()

    def test_execute_inside_a_transaction_block_is_refused(self, site):
        jdb = site.open()
        with pytest.raises(zjournal.NestedCommandError):
            with jdb.transaction() as conn:
                zjournal.execute(conn, Put("a", 1))
                jdb.execute(Put("b", 2))
        assert jdb.journal.last_seq == 0
        jdb.execute(Put("c", 3))  # nothing is left locked or flagged
        jdb.close()

    def test_a_closed_connection_is_a_clear_error(self, site):
        jdb = site.open()
        conn = jdb.open()
        conn.close()
        with pytest.raises(zjournal.NotJournaledConnectionError):
            zjournal.execute(conn, Put("a", 1))
        jdb.close()


class Account(persistent.Persistent):
    balance = 0
    touched = None


class Setup(Command):
    command_name = "tests.review.setup"

    def execute(self, root, context):
        root["accounts"] = PersistentMapping(alice=Account(), bob=Account())


class Deposit(Command):
    command_name = "tests.review.deposit"

    def __init__(self, account, amount):
        self.account = account
        self.amount = amount

    def execute(self, root, context):
        acct = root["accounts"][self.account]
        acct.balance += self.amount
        acct.touched = context.time
        return acct.balance


class TestDesignExample:
    """The public-surface example of the design, run as written."""

    def test_run_literally(self, tmp_path, monkeypatch):
        import ZODB

        monkeypatch.chdir(tmp_path)
        jdb = JournaledDB(ZODB.DB("Data.fs"), FileJournal("journal-dir"))
        jdb.execute(Setup())
        assert jdb.execute(Deposit("alice", 10)) == 10
        with jdb.transaction() as conn:
            zjournal.execute(conn, Deposit("alice", 1))
            zjournal.execute(conn, Deposit("bob", 2))
        # As in the example: the same name, now meant as the application's
        # connection; the commit would be the application's.
        zjournal.execute(conn, Deposit("bob", 2))
        jdb.close()
        assert [e.command_name for e in FileJournal(
            "journal-dir", readonly=True).entries()] == [
            "tests.review.setup"] + ["tests.review.deposit"] * 3


class TestFinishFailure:

    def test_execute_returns_when_the_journal_has_the_command(self, site):
        from zjournal.tests.test_datamanager import Resource

        class Joins(Command):
            command_name = "tests.review.joins"

            def execute(self, root, context):
                transaction_manager = _current["conn"].transaction_manager
                transaction_manager.get().join(
                    Resource("!peer", fail_in="tpc_finish"))
                return Put("x", 1).execute(root, context)

        jdb = site.open()
        tm, conn = jdb._executor()
        _current["conn"] = conn
        assert jdb.execute(Joins()) == 1  # committed: no error, no retry
        assert jdb.journal.last_seq == 1
        assert jdb.execute(Increment("n")) == 1
        assert marker_state(jdb) == (({"x": 1}, {"n": 1}), 2)
        jdb.close()


class TestReaders:

    def test_a_write_completed_during_a_read_is_not_corruption(
            self, tmp_path, monkeypatch):
        writer = FileJournal(str(tmp_path / "j"), fsync="never")
        writer.append([(1, 1.0, 1, "x", b"p" * 100)])
        third = encode_transaction([(2, 2.0, 1, b"x", b"q" * 100)])
        fourth = encode_transaction([(3, 3.0, 1, b"x", b"r" * 100)])
        segment = writer.segments()[-1]
        with open(segment, "ab") as f:
            f.write(third[:50])  # a write in progress
        reader = FileJournal(str(tmp_path / "j"), readonly=True)
        original = journal_module._bad_tail

        def writer_finishes_meanwhile(*args, **kw):
            with open(segment, "ab") as f:
                f.write(third[50:] + fourth)
            return original(*args, **kw)

        monkeypatch.setattr(journal_module, "_bad_tail",
                            writer_finishes_meanwhile)
        assert [e.seq for e in reader.entries()] == [1]
        monkeypatch.setattr(journal_module, "_bad_tail", original)
        assert [e.seq for e in reader.entries()] == [1, 2, 3]


class TestRefusalsChangeNothing:

    def test_a_damaged_acknowledged_tail_is_put_back(self, site):
        jdb = site.open()
        for i in range(4):
            jdb.execute(Put("k%d" % i, i))
        jdb.close()
        segment = site.segments()[-1]
        with open(segment, "r+b") as f:
            f.seek(-10, os.SEEK_END)
            f.write(b"\xff")  # bit rot in the last, acknowledged record
        before = snapshot(site.journal_dir)
        with pytest.raises(zjournal.ZODBAheadError) as e:
            site.open()
        assert "damaged" in str(e.value)
        assert snapshot(site.journal_dir) == before

    def test_a_corrupt_journal_gets_no_lock_file(self, tmp_path):
        j = FileJournal(str(tmp_path / "j"))
        j.close()
        os.remove(str(tmp_path / "j" / "journal.lock"))
        with open(j.segments()[0], "r+b") as f:
            f.write(b"NOTAJRNL")
        before = snapshot(str(tmp_path / "j"))
        with pytest.raises(zjournal.CorruptJournalError):
            FileJournal(str(tmp_path / "j"))
        assert snapshot(str(tmp_path / "j")) == before


class TestGroupCommitConflicts:

    def test_a_conflict_inside_a_command_is_retried(self, site):
        from ZODB.POSException import ConflictError
        calls = []

        class Flaky(Command):
            command_name = "tests.review.flaky"

            def execute(self, root, context):
                calls.append(context.seq)
                if len(calls) == 1:
                    raise ConflictError("once")
                return Put("flaky", 1).execute(root, context)

        jdb = zjournal.JournaledDB(site.db(), site.journal(fsync="batch"))
        assert jdb.execute(Flaky()) == 1
        assert len(calls) == 2
        jdb.close()


class TestDecodingBombs:

    def test_names_of_containers_cannot_be_called(self):
        from zjournal import codec
        bomb = b"\\x80\\x04cbuiltins\\nlist\\n(cbuiltins\\nrange\\nJ\\x00\\xca\\x9a;\\x85R\\x85R."
        bomb = bomb.decode("unicode_escape").encode("latin-1")
        with pytest.raises(zjournal.DecodeError):
            codec.loads(bomb)

    def test_bytearray_from_a_size_is_refused(self):
        from zjournal import codec

        class Sized:
            def __reduce__(self):
                return (bytearray, (1 << 29,))

        with pytest.raises(zjournal.DecodeError):
            codec.loads(pickle.dumps(Sized(), 4))
        assert codec.loads(codec.dumps({"b": bytearray(b"ok")})) == {
            "b": bytearray(b"ok")}


class TestTailCheck:

    def test_a_duplicated_last_record_is_refused(self, tmp_path):
        path = str(tmp_path / "j")
        j = FileJournal(path, fsync="never")
        for seq in (1, 2, 3):
            j.append([(seq, float(seq), 1, "x", b"payload")])
        segment = j.segments()[-1]
        j.close()
        last = encode_transaction([(3, 3.0, 1, b"x", b"payload")])
        with open(segment, "ab") as f:
            f.write(last)
        before = snapshot(path)
        # A whole, valid record in the wrong place is never a torn write:
        # it is not cut, and not appended after.
        for readonly in (False, True):
            with pytest.raises(zjournal.CorruptJournalError) as e:
                FileJournal(path, readonly=readonly)
            assert e.value.seq == 4
            assert snapshot(path) == before

    def test_a_large_last_transaction_is_walked_not_scanned(self, tmp_path):
        path = str(tmp_path / "j")
        j = FileJournal(path, fsync="never")
        j.append([(1, 1.0, 1, "x", b"first")])
        j.append([(2, 1.0, 1, "x", b"second")])
        j.append([(3 + i, 2.0, 1, "x", b"p" * 1000) for i in range(199)])
        segment = j.segments()[-1]
        j.close()
        assert os.path.getsize(segment) > 3 * journal_module.TAIL_WINDOW
        with open(segment, "r+b") as f:
            # Inside record 1, before the record the walk checks (seq 2):
            # only a scan would see it.
            f.seek(48 + 31)
            f.write(b"\xff")
        j = FileJournal(path, fsync="never")
        assert j.last_seq == 201 and j.torn_tail is None
        j.close()
        with pytest.raises(zjournal.CorruptJournalError):
            FileJournal(path, readonly=True).verify()


# -- format 2 review ---------------------------------------------------------

class WritesDirty(Command):
    """A "query" changing an object a command already changed."""
    command_name = "tests.review.writes-dirty"

    def execute(self, root, context):
        root["counters"]["default"].value += 100
        return "read"


class MissingKey(Command):
    command_name = "tests.review.missing-key"

    def execute(self, root, context):
        return root["table"]["missing"]


@pytest.mark.parametrize("journal_queries", [False, True])
def test_a_query_cannot_change_an_object_a_command_changed(
        site, journal_queries):
    # The savepoint taken before the query makes the command's changes
    # "saved", so the query's write registers again and is caught.
    from zjournal.tests.helpers import zodb_view, replayed_state
    jdb = site.open(journal_queries=journal_queries)
    jdb.execute(Increment())
    with pytest.raises(zjournal.QueryWriteError):
        with jdb.transaction() as conn:
            zjournal.execute(conn, Increment())
            zjournal.query(conn, WritesDirty())
    live = zodb_view(jdb)[0]
    assert live == ({}, {"default": 1})
    assert replayed_state(jdb.journal) == live
    jdb.close()


@pytest.mark.parametrize("journal_queries", [False, True])
def test_a_query_that_raises_leaves_the_transaction_usable(
        site, journal_queries):
    jdb = site.open(journal_queries=journal_queries)
    jdb.execute(Put("x", 1))
    with jdb.transaction() as conn:
        try:
            zjournal.query(conn, MissingKey())
        except KeyError:
            zjournal.execute(conn, Put("missing", 2))
    assert [e.command_name for e in jdb.journal.entries()] == [
        "tests.put", "tests.put"]
    jdb.close()


def test_a_command_run_from_a_before_commit_hook_is_journaled(site):
    jdb = site.open()
    conn = jdb.open()
    zjournal.execute(conn, Put("a", 1))
    txn = transaction.get()
    txn.addBeforeCommitHook(
        lambda: zjournal.execute(conn, Put("audit", 2)))
    transaction.commit()
    conn.close()
    assert [e.seq for e in jdb.journal.entries()] == [1, 2]
    jdb.close()
    jdb = site.open()
    assert jdb.recovery.action == "current"
    jdb.close()


def test_bad_metadata_fails_alone_in_a_group(site):
    jdb = site.open({"fsync": "batch"})
    results = {}
    barrier = threading.Barrier(3)

    def run(i, metadata):
        barrier.wait()
        try:
            results[i] = jdb.execute(Put("k%d" % i, i), metadata=metadata)
        except zjournal.EncodeError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in
               enumerate([{"ok": 1}, {"bad": object()}, None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], zjournal.EncodeError)
    assert sorted(e.args["key"] for e in jdb.journal.entries()) == [
        "k0", "k2"]
    for bad in (["x"], "text"):
        with pytest.raises(zjournal.EncodeError):
            jdb.execute(Put("z", 1), metadata=bad)
    jdb.close()


def test_a_writer_without_the_key_of_a_signed_journal_is_refused(site):
    jdb = site.open({"hmac_key": b"k"})
    jdb.execute(Put("a", 1))
    jdb.close()
    with pytest.raises(zjournal.JournalKeyError):
        FileJournal(site.journal_dir)
    FileJournal(site.journal_dir, readonly=True).close()  # readers may


def test_a_refused_open_puts_a_cut_tail_back(site):
    jdb = site.open({"hmac_key": b"k"})
    jdb.execute(Put("a", 1))
    jdb.close()
    (seg,) = site.segments()
    with open(seg, "ab") as f:
        f.write(b"torn bytes of an unfinished write")
    before = snapshot(site.journal_dir)
    with pytest.raises(zjournal.JournalKeyError):
        FileJournal(site.journal_dir, hmac_key=b"wrong")
    assert snapshot(site.journal_dir, skip=("journal.lock",)) == {
        k: v for k, v in before.items() if k != "journal.lock"}


def test_a_crc_valid_record_with_impossible_extras_is_corruption(site):
    import struct
    import zlib
    from zjournal.format import RECORD_HEAD_SIZE
    j = FileJournal(site.journal_dir, fsync="never")
    j.append([(1, 1.0, 0, "n", b"payload", 0, {"a": 1})])
    j.append([(2, 2.0, 0, "n", b"payload", 0, {"a": 2})])
    j.close()
    (seg,) = site.segments()
    data = bytearray(open(seg, "rb").read())
    (n,) = struct.unpack(">I", data[-4:])
    start = len(data) - n - 12
    struct.pack_into(">I", data, start + RECORD_HEAD_SIZE + 1, 9999)
    struct.pack_into(">I", data, start,
                     zlib.crc32(bytes(data[start + 4:start + 8 + n])))
    open(seg, "wb").write(data)
    with pytest.raises(zjournal.CorruptJournalError) as info:
        FileJournal(site.journal_dir)
    assert info.value.seq == 2
    assert open(seg, "rb").read() == bytes(data)


def test_a_forensic_rebuild_is_not_opened_as_the_journals_state(site):
    from zjournal.recovery import rebuild
    jdb = site.open()
    jdb.execute(Put("a", 1))
    jdb.journal.append([(2, 1.0, 1, "gone.command", b"\x80\x04}\x94.")])
    jdb.close()
    site.remove_zodb()
    journal = FileJournal(site.journal_dir, readonly=True)
    db = site.db()
    result = rebuild(db, journal, skip_unknown=True)
    assert [s[:2] for s in result.skipped] == [(2, "gone.command")]
    db.close()
    journal.close()
    with pytest.raises(zjournal.ForensicZODBError):
        site.open()


def test_format_version_messages_say_which_side_is_old():
    import struct
    import zlib
    from zjournal import format as fmt
    for version, words in ((1, "development version"), (9, "upgrade")):
        h = bytearray(fmt.encode_header(b"\0" * 16, 1, 1.0))
        struct.pack_into(">H", h, 8, version)
        struct.pack_into(">I", h, 44, zlib.crc32(bytes(h[:44])))
        with pytest.raises(zjournal.UnsupportedFormatError) as info:
            fmt.decode_header(bytes(h), "seg")
        assert words in str(info.value)


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_a_catch_up_that_conflicts_is_retried(site, fsync):
    from ZODB.POSException import ConflictError
    jdb = site.open({"fsync": fsync})
    jdb.execute(Put("a", 1))
    real = jdb.catch_up
    calls = []

    def catch_up():
        calls.append(1)
        if len(calls) == 1:
            jdb._needs_catch_up = False
            raise ConflictError("another process is catching up too")
        return real()

    jdb.catch_up = catch_up
    jdb._needs_catch_up = True
    assert jdb.execute(Put("b", 2)) == 2
    assert len(calls) == 2
    assert [e.seq for e in jdb.journal.entries()] == [1, 2]
    jdb.close()


def test_recovery_on_open_retries_a_conflict(site, monkeypatch):
    from ZODB.POSException import ConflictError
    from zjournal import recovery
    jdb = site.open()
    jdb.execute(Put("a", 1))
    jdb.close()
    real, calls = recovery.recover, []

    def recover(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ConflictError("another process finished meanwhile")
        return real(*args, **kw)

    monkeypatch.setattr(recovery, "recover", recover)
    jdb = site.open()
    assert jdb.recovery.action == "current"
    assert (len(calls), jdb.retried) == (2, 1)
    jdb.close()


def test_recovery_reads_the_journal_tail_as_one_pair(site):
    # A shared journal can grow between a read of last_seq and one of
    # head; recovery must compare the marker with a consistent pair.
    jdb = site.open()
    jdb.execute(Put("a", 1))
    jdb.close()

    class Racing(FileJournal):
        @property
        def head(self):  # as if another process appended meanwhile
            return b"\x42" * 16

        @head.setter
        def head(self, value):
            self.__dict__["_true_head"] = value

        def tail(self):
            return self.last_seq, self.__dict__["_true_head"]

    jdb = zjournal.JournaledDB(site.db(), Racing(site.journal_dir))
    assert jdb.recovery.action == "current"
    jdb.close()
