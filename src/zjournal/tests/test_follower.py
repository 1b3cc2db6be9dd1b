"""Followers: a replica kept current from a journal another process writes.

The end-to-end tests run the writer (``followworker``: the bank demo in a
JournaledDB, small segments so that it rolls over) and ``zodb-journal
follow`` as real processes, kill them with real signals and tear the
journal's tail with real bytes.  The replica is compared with the
writer's own ZODB after the writer stops.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import commands
from zjournal import demo
from zjournal import follower as follower_module
from zjournal.db import JournaledDB
from zjournal.errors import CorruptJournalError
from zjournal.errors import HistoryMismatchError
from zjournal.errors import NotJournaledError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZODBAheadError
from zjournal.follower import Follower
from zjournal.format import TORN_SUFFIX
from zjournal.format import check_record
from zjournal.format import encode_chain
from zjournal.journal import DEFAULT_SEGMENT_SIZE
from zjournal.journal import FileJournal
from zjournal.journal import _checked
from zjournal.marker import MARKER_KEY
from zjournal.recovery import rebuild
from zjournal.tests import services

OWNERS = ["customer-%02d" % i for i in range(4)]


# -- helpers -----------------------------------------------------------------

def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s"
                                 % (timeout, what))
        time.sleep(0.02)


_SPAWNED = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """A test that fails half way leaves no writer or follower running."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def spawn(args, log):
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m"] + args, stdout=out,
                                stderr=subprocess.STDOUT)
    _SPAWNED.append(proc)
    return proc


def start_writer(tmp, log, *options):
    return spawn(["zjournal.tests.followworker", str(tmp)] + list(options),
                 log)


def start_follower(journal, replica, status, log, *options):
    return spawn(["zjournal.cli", "follow", str(journal), "--zodb",
                  str(replica), "--import", "zjournal.demo",
                  "--interval", "0.05", "--lag-report", "0.2",
                  "--status-file", str(status)] + list(options), log)


def printed(log, word):
    """The last number the writer printed after ``word``, or None."""
    try:
        with open(log) as f:
            lines = [line.split() for line in f]
    except FileNotFoundError:
        return None
    found = [int(w[1]) for w in lines if len(w) == 2 and w[0] == word]
    return found[-1] if found else None


def read_status(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def applied(status_path):
    status = read_status(status_path)
    return status["applied_seq"] if status else None


def finish(proc, sig=signal.SIGTERM, timeout=20):
    proc.send_signal(sig)
    return proc.wait(timeout)


def view(path):
    """(demo fingerprint, marker seq, marker journal id) of a FileStorage,
    opened on a copy: a replica whose follower was killed may end inside a
    ZODB transaction, which opening it read-write cuts."""
    copy = str(path) + ".view"
    shutil.copyfile(str(path), copy)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(copy))
    try:
        conn = db.open()
        root = conn.root()
        marker = root[MARKER_KEY]
        found = (demo.fingerprint(root) if demo.BANK_KEY in root else None,
                 marker.last_seq, marker.journal_id)
        conn.close()
        return found
    finally:
        db.close()
        for suffix in ("", ".index", ".lock", ".tmp"):
            if os.path.exists(copy + suffix):
                os.remove(copy + suffix)


def rebuilt(journal_dir, until_seq):
    """The demo fingerprint of a rebuild up to ``until_seq``."""
    db = ZODB.DB(None)
    with FileJournal(journal_dir, readonly=True) as journal:
        rebuild(db, journal, until_seq=until_seq)
    conn = db.open()
    try:
        root = conn.root()
        return demo.fingerprint(root) if demo.BANK_KEY in root else None
    finally:
        conn.close()
        db.close()


def fingerprint(db):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        return demo.fingerprint(root), root[MARKER_KEY].last_seq
    finally:
        tm.abort()
        conn.close()


def bank_journal(path, transactions, per_transaction=3, **kw):
    """A file journal of bank commands that all replay: accounts opened
    in the first transaction, then deposits, ``per_transaction`` to a
    journal transaction.  Written straight through the journal API, fast."""
    journal = FileJournal(path, fsync="never", **kw)
    now = time.time()
    seq = journal.last_seq

    def items(encoded):
        nonlocal seq
        out = []
        for name, version, payload in encoded:
            seq += 1
            out.append((seq, now, version, name, payload))
        return out

    journal.append(items([commands.encode(demo.OpenAccount(o, 100))
                          for o in OWNERS]))
    deposits = [commands.encode(demo.Deposit(OWNERS[i % len(OWNERS)], i + 1))
                for i in range(per_transaction)]
    for _ in range(transactions):
        journal.append(items(deposits))
    journal.close()
    return seq


def torn_transaction(journal_dir, what=(demo.Deposit("customer-00", 1),
                                        demo.Deposit("customer-01", 2))):
    """Append to the last segment what a writer dying in the middle of a
    write leaves: the first records of a transaction whole (but not its
    END), the last one cut in half.  Returns the journal's last seq."""
    with FileJournal(journal_dir, readonly=True) as journal:
        last, head = journal.last_seq, journal.head
        segment = journal.segments()[-1]
    items = []
    for i, cmd in enumerate(what):
        name, version, payload = commands.encode(cmd)
        items.append((last + 1 + i, time.time(), version, name, payload))
    data, _ = encode_chain(_checked(items), head)
    whole = 0
    for _ in what[:-1]:
        whole += check_record(data, whole)
    with open(segment, "ab") as f:
        f.write(data[:whole + (len(data) - whole) // 2])
    return last


@pytest.fixture
def primary(site):
    """A JournaledDB running the bank demo, with small segments."""
    jdb = site.open(journal_kw={"fsync": "never", "segment_size": 2048})
    for owner in OWNERS:
        jdb.execute(demo.OpenAccount(owner, 1000))
    yield jdb
    if not jdb._closed:
        jdb.close()


def work(jdb, n, start=0):
    """``n`` bank commands, every third step a two-command transaction."""
    import zjournal
    for i in range(start, start + n):
        owner = OWNERS[i % len(OWNERS)]
        if i % 3 == 2:
            with jdb.transaction() as conn:
                zjournal.execute(conn, demo.Deposit(owner, 3))
                zjournal.execute(conn, demo.Transfer(
                    owner, OWNERS[(i + 1) % len(OWNERS)], 2))
        else:
            jdb.execute(demo.Deposit(owner, i))


def primary_view(jdb):
    return fingerprint(jdb.db)


# -- the follower in this process ---------------------------------------------

def test_empty_replica_is_built_then_kept_current(site, primary):
    work(primary, 30)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=7)
        try:
            assert f.poll() == primary.journal.last_seq
            assert fingerprint(replica) == primary_view(primary)
            assert f.poll() == 0
            work(primary, 40, start=30)   # rolls over several segments
            assert len(site.segments()) > 3
            f.poll()
            assert fingerprint(replica) == primary_view(primary)
        finally:
            f.close()


def test_batches_end_where_journal_transactions_end(site, primary):
    """With batch_size=1 each replica commit holds one whole journal
    transaction: a reader never sees half of one."""
    work(primary, 12)
    # 4 accounts opened in 4 transactions, then 12 steps of which 4 hold
    # two commands: 16 transactions, 20 commands.
    assert primary.journal.last_seq == 20
    replica_fs = os.path.join(site.root, "Replica.fs")
    replica = ZODB.DB(ZODB.FileStorage.FileStorage(replica_fs))
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=1)
        f.poll()
        f.close()
    assert fingerprint(replica) == primary_view(primary)
    txns = list(replica.storage.iterator())
    replica.close()
    # The root's creation, the empty marker, then one per transaction.
    assert len(txns) == 2 + 16


def test_a_copy_of_the_primary_catches_up(site, primary, tmp_path):
    work(primary, 20)
    primary.close()
    copy = str(tmp_path / "Copy.fs")
    shutil.copyfile(site.data_fs, copy)
    primary = site.open(journal_kw={"fsync": "never", "segment_size": 2048})
    work(primary, 25, start=20)
    expected = primary_view(primary)
    primary.close()
    replica = ZODB.DB(ZODB.FileStorage.FileStorage(copy))
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.start()
        copied_at = f.applied_seq
        assert copied_at == 4 + 20 + 6   # where the copy was taken
        assert f.poll() == expected[1] - copied_at
        f.close()
    assert fingerprint(replica) == expected
    replica.close()


def test_resumes_inside_a_transaction(site, tmp_path):
    """A replica rebuilt --until a seq inside a journal transaction
    resumes there: the follower finds the offset of that very record."""
    last = bank_journal(site.journal_dir, 10)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        rebuild(replica, journal, until_seq=8)   # inside seqs 8..10
        f = Follower(journal, replica)
        assert f.poll() == last - 8
        f.close()
    assert fingerprint(replica)[1] == last
    assert fingerprint(replica)[0] == rebuilt(site.journal_dir, last)


def test_incomplete_tail_is_not_yet(site, primary):
    work(primary, 10)
    last = primary.journal.last_seq
    primary.close()
    torn_transaction(site.journal_dir)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        assert f.poll() == last
        assert f.poll() == 0               # no error, nothing applied
        assert f.applied_seq == last
        # The writer comes back: it cuts the torn bytes and goes on.
        primary = site.open(journal_kw={"fsync": "never",
                                        "segment_size": 2048})
        assert primary.journal.torn_tail is not None
        work(primary, 10, start=10)
        f.poll()
        assert fingerprint(replica) == primary_view(primary)
        f.close()
    primary.close()


def test_a_transaction_written_in_two_pieces(site):
    """A write observed half done is applied once the rest arrives."""
    bank_journal(site.journal_dir, 2)
    with FileJournal(site.journal_dir, readonly=True) as journal:
        last, head = journal.last_seq, journal.head
        segment = journal.segments()[-1]
    name, version, payload = commands.encode(demo.Deposit(OWNERS[0], 5))
    data, _ = encode_chain(_checked(
        [(last + 1, time.time(), version, name, payload),
         (last + 2, time.time(), version, name, payload)]), head)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.poll()
        with open(segment, "ab") as out:
            out.write(data[:len(data) - 3])
            out.flush()
            assert f.poll() == 0
            out.write(data[len(data) - 3:])
        assert f.poll() == 2
        assert f.applied_seq == last + 2
        f.close()


def test_damage_in_the_middle_stops_with_a_clear_message(
        site, monkeypatch):
    monkeypatch.setattr(follower_module, "DAMAGE_SECONDS", 0.0)
    last = bank_journal(site.journal_dir, 200, segment_size=4096)
    segments = sorted(os.listdir(site.journal_dir))
    segments = [s for s in segments if s.endswith(".zjl")]
    assert len(segments) > 3
    victim = os.path.join(site.journal_dir, segments[2])
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=10)
        f.start()
        # Damage a record in the middle of a closed segment: a flipped
        # byte in a payload, past the header.
        with open(victim, "r+b") as out:
            out.seek(200)
            byte = out.read(1)
            out.seek(200)
            out.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(CorruptJournalError) as info:
            for _ in range(follower_module.DAMAGE_READS + 1):
                f.poll()
        assert victim in str(info.value)
        assert "offset" in str(info.value)
        seq = f.applied_seq
        # Whole batches before the damaged record were applied, nothing
        # after.
        assert int(segments[2].split(".")[0]) - 12 <= seq < info.value.seq
        assert fingerprint(replica) == (rebuilt(site.journal_dir, seq), seq)
        # Repaired (restored from a backup, say), the journal is read on
        # from where the failed reads started, not from where they failed.
        with open(victim, "r+b") as out:
            out.seek(200)
            out.write(byte)
        f.poll()
        f.close()
    assert fingerprint(replica) == (rebuilt(site.journal_dir, last), last)



def flip(path, offset):
    """Flip one byte of a file in place; return the byte it held."""
    with open(path, "r+b") as out:
        out.seek(offset)
        byte = out.read(1)
        out.seek(offset)
        out.write(bytes([byte[0] ^ 0xFF]))
    return byte


def test_once_fails_at_once_on_damage_in_a_closed_segment(site, tmp_path):
    """``follow --once``, a real process, on a journal damaged in the
    middle of a segment the writer rolled over from: exit 1, without
    waiting out the window meant for a writer repairing its tail."""
    bank_journal(site.journal_dir, 60, segment_size=4096)
    segments = sorted(n for n in os.listdir(site.journal_dir)
                      if n.endswith(".zjl"))
    assert len(segments) > 2
    victim = os.path.join(site.journal_dir, segments[1])
    flip(victim, 200)
    replica = str(tmp_path / "Replica.fs")
    done = subprocess.run(
        [sys.executable, "-m", "zjournal.cli", "follow", site.journal_dir,
         "--zodb", replica, "--import", "zjournal.demo", "--once"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "corrupt journal" in done.stderr
    assert victim in done.stderr
    assert "reading it again" not in done.stderr


def test_once_fails_when_damage_in_the_last_segment_persists(
        site, monkeypatch, caplog):
    monkeypatch.setattr(follower_module, "DAMAGE_SECONDS", 0.3)
    bank_journal(site.journal_dir, 10)
    segments = [n for n in os.listdir(site.journal_dir)
                if n.endswith(".zjl")]
    assert len(segments) == 1
    # A record in the middle: valid records follow, so it is no torn tail.
    flip(os.path.join(site.journal_dir, segments[0]), 600)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, interval=0.05)
        began = time.monotonic()
        with caplog.at_level("INFO", logger="zjournal.follower"):
            with pytest.raises(CorruptJournalError):
                f.run(once=True)
        assert time.monotonic() - began >= 0.3
        assert caplog.text.count("reading it again") >= (
            follower_module.DAMAGE_READS - 1)
        assert f.state == "failed"
        f.close()
    replica.close()


def test_once_waits_out_a_repair_of_the_last_segment(site, monkeypatch):
    """Damage that goes away within the window (a writer rewriting its
    tail) is read past: ``--once`` then applies everything."""
    monkeypatch.setattr(follower_module, "DAMAGE_SECONDS", 5.0)
    last = bank_journal(site.journal_dir, 10)
    segment = [os.path.join(site.journal_dir, n)
               for n in os.listdir(site.journal_dir) if n.endswith(".zjl")][0]
    byte = flip(segment, 600)

    def repair():
        time.sleep(0.3)
        with open(segment, "r+b") as out:
            out.seek(600)
            out.write(byte)
    repairer = threading.Thread(target=repair)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, interval=0.05)
        repairer.start()
        try:
            f.run(once=True)
        finally:
            repairer.join()
        assert f.applied_seq == last
        f.close()
    assert fingerprint(replica) == (rebuilt(site.journal_dir, last), last)
    replica.close()


def test_refuses_a_replica_of_another_journal(site, primary, tmp_path):
    work(primary, 5)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.poll()
        f.close()
    other = str(tmp_path / "other")
    bank_journal(other, 3)
    with FileJournal(other, readonly=True) as journal:
        f = Follower(journal, replica)
        with pytest.raises(WrongJournalError):
            f.start()
        f.close()
    assert fingerprint(replica) == primary_view(primary)


def test_refuses_a_replica_ahead_of_the_journal(site, primary, tmp_path):
    work(primary, 5)
    backup = str(tmp_path / "backup")
    shutil.copytree(site.journal_dir, backup)
    os.remove(os.path.join(backup, "journal.lock"))
    work(primary, 5, start=5)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.poll()
        f.close()
    with FileJournal(backup, readonly=True) as journal:
        f = Follower(journal, replica)
        with pytest.raises(ZODBAheadError, match="up to seq %d"
                           % primary.journal.last_seq):
            f.start()
        f.close()


def test_refuses_another_history_of_the_same_journal(site, tmp_path):
    bank_journal(site.journal_dir, 2)
    with FileJournal(site.journal_dir, readonly=True) as journal:
        identity = journal.identity
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.poll()
        f.close()
    # A journal with the same identity whose records differ, and go on.
    other = str(tmp_path / "forked")
    bank_journal(other, 4, identity=identity, per_transaction=2)
    with FileJournal(other, readonly=True) as journal:
        f = Follower(journal, replica)
        f.start()
        with pytest.raises(HistoryMismatchError):
            f.poll()
        f.close()


def test_refuses_a_replica_with_data_but_no_marker(site, primary):
    replica = ZODB.DB(None)
    conn = replica.open()
    conn.root()["app"] = 1
    transaction.commit()
    conn.close()
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        with pytest.raises(NotJournaledError):
            f.start()
        f.close()


def test_reads_the_rest_of_a_segment_the_writer_rolled_over(site):
    """A writer may append to the last segment and roll over between a
    read that found that segment ended and the look for a newer one: the
    newer one then starts after records not read yet, which are read
    first (the writer's appends run at that very moment, through a hook
    on the directory listing)."""
    bank_journal(site.journal_dir, 1)
    name, version, payload = commands.encode(demo.Deposit(OWNERS[0], 1))

    def append(segment_size):
        writer = FileJournal(site.journal_dir, fsync="never",
                             segment_size=segment_size)
        writer.append([(writer.last_seq + 1, time.time(), version, name,
                        payload)])
        writer.close()

    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        f.poll()
        real = journal._list_segments
        calls = []

        def racing():
            calls.append(1)
            if len(calls) == 2:
                append(DEFAULT_SEGMENT_SIZE)   # into the last segment
                append(64)                     # rolls over
            return real()

        journal._list_segments = racing
        assert f.poll() == 2
        assert len(real()) == 2
        f.close()
    assert fingerprint(replica) == (rebuilt(site.journal_dir, 4 + 3 + 2),
                                    4 + 3 + 2)


def test_reads_on_when_a_finished_segment_is_archived(site, primary,
                                                     tmp_path):
    """A segment moved away after the follower read it to its end (by
    archiving) does not stop it: the next segment starts where it left."""
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        for _ in range(100):
            f.poll()
            finished, next_seq = f._source.at[0], f._source.next_seq
            primary.execute(demo.Deposit(OWNERS[0], 1))
            if next_seq in journal._list_segments():
                break   # the append started a segment: `finished` is done
        else:
            raise AssertionError("the writer never rolled over")
        os.rename(journal._segment_path(finished),
                  str(tmp_path / os.path.basename(
                      journal._segment_path(finished))))
        f.poll()
        f.close()
    assert fingerprint(replica) == primary_view(primary)


def test_status_reports_the_lag(site, primary, tmp_path):
    status_file = str(tmp_path / "status.json")
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, status_file=status_file)
        f.poll()
        assert f.status()["behind_seqs"] == 0
        assert f.status()["behind_seconds"] == 0.0
        time.sleep(0.3)
        work(primary, 6)
        status = f.status()
        assert status["behind_seqs"] == 8
        assert status["journal_seq"] == primary.journal.last_seq
        assert status["behind_seconds"] >= 0.3
        f.poll()
        f._report(force=True)
        f.close()
    written = read_status(status_file)
    assert written["applied_seq"] == primary.journal.last_seq
    assert written["behind_seqs"] == 0
    assert written["journal_id"] == primary.journal.identity


def test_follows_an_sqlite_journal(tmp_path):
    from zjournal.sqljournal import SQLiteJournal
    path = str(tmp_path / "journal.sqlite")
    jdb = JournaledDB(ZODB.DB(None), SQLiteJournal(path, fsync="never"))
    for owner in OWNERS:
        jdb.execute(demo.OpenAccount(owner, 1000))
    work(jdb, 10)
    replica = ZODB.DB(None)
    with SQLiteJournal(path, readonly=True) as journal:
        f = Follower(journal, replica, batch_size=4)
        f.poll()
        work(jdb, 10, start=10)
        f.poll()
        f.close()
    assert fingerprint(replica) == primary_view(jdb)
    jdb.close()


def test_run_stops_when_asked_from_another_thread(site, primary):
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, interval=30)
        thread = threading.Thread(target=f.run)
        thread.start()
        wait_for(lambda: f.state == "following", 10, "the follower")
        began = time.monotonic()
        f.stop("test")
        thread.join(10)
        # Woken through its pipe, not at the end of its 30 s interval.
        assert not thread.is_alive()
        assert time.monotonic() - began < 5
        assert f.state == "stopped"
        f.close()


# -- the command line --------------------------------------------------------

def test_cli_once_and_refusals(site, primary, tmp_path, capsys):
    from zjournal import cli
    work(primary, 10)
    replica = str(tmp_path / "Replica.fs")
    status = str(tmp_path / "status.json")
    assert cli.main(["follow", site.journal_dir, "--zodb", replica,
                     "--import", "zjournal.demo", "--once",
                     "--status-file", status]) == 0
    assert read_status(status)["applied_seq"] == primary.journal.last_seq
    assert read_status(status)["state"] == "stopped"
    other = str(tmp_path / "other")
    bank_journal(other, 1)
    capsys.readouterr()
    assert cli.main(["follow", other, "--zodb", replica, "--import",
                     "zjournal.demo", "--once"]) == 1
    err = capsys.readouterr().err
    assert "was built from journal %s" % primary.journal.identity in err
    # A replica in use by another process (here: held open) is refused.
    held = ZODB.FileStorage.FileStorage(replica)
    try:
        code = subprocess.run(
            [sys.executable, "-m", "zjournal.cli", "follow",
             site.journal_dir, "--zodb", replica, "--import",
             "zjournal.demo", "--once"], stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
    finally:
        held.close()
    assert code.returncode == 1
    assert "open for writing by another process" in code.stderr


# -- real processes ----------------------------------------------------------

def test_keeps_up_with_a_writer_in_another_process(tmp_path):
    wlog, flog = str(tmp_path / "writer.log"), str(tmp_path / "follow.log")
    status = str(tmp_path / "status.json")
    replica = tmp_path / "Replica.fs"
    go = tmp_path / "go"
    writer = start_writer(tmp_path, wlog, "--count", "1500", "--pause",
                          "0.001", "--go", str(go))
    wait_for(lambda: printed(wlog, "ready") is not None, 30, "the writer")
    follow = start_follower(tmp_path / "journal", replica, status, flog)
    wait_for(lambda: applied(status) is not None, 30, "the follower")
    go.touch()
    samples = []
    while writer.poll() is None:
        samples.append((printed(wlog, "seq"), applied(status)))
        time.sleep(0.05)
    assert writer.returncode == 0
    last = printed(wlog, "done")
    wait_for(lambda: applied(status) == last, 30, "the replica to converge")
    assert finish(follow) == 0
    # It followed while the writer ran, not only after.
    assert any(a and w and 0 < a < last for w, a in samples), samples
    fingerprint_, seq, _ = view(replica)
    assert seq == last
    assert fingerprint_ == view(tmp_path / "Data.fs")[0]
    segments = [n for n in os.listdir(str(tmp_path / "journal"))
                if n.endswith(".zjl")]
    assert len(segments) > 5   # the writer rolled over, often
    with open(flog) as f:
        log = f.read()
    assert "behind by" in log or "current at seq" in log
    assert "stopped (SIGTERM) at seq %d" % last in log
    final = read_status(status)
    assert final["state"] == "stopped" and final["behind_seqs"] == 0


def test_survives_the_writer_killed_with_a_torn_tail(tmp_path):
    wlog, flog = str(tmp_path / "writer.log"), str(tmp_path / "follow.log")
    status = str(tmp_path / "status.json")
    replica = tmp_path / "Replica.fs"
    journal_dir = str(tmp_path / "journal")
    writer = start_writer(tmp_path, wlog, "--count", "100000", "--pause",
                          "0.002")
    wait_for(lambda: printed(wlog, "ready") is not None, 30, "the writer")
    follow = start_follower(journal_dir, replica, status, flog)
    wait_for(lambda: (printed(wlog, "seq") or 0) > 200, 30, "writes")
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    last = torn_transaction(journal_dir)
    wait_for(lambda: applied(status) == last, 30, "the follower")
    time.sleep(0.3)   # several polls over the torn tail
    assert follow.poll() is None
    assert applied(status) == last
    # The writer restarts: recovery cuts the torn tail, then more work.
    writer = start_writer(tmp_path, wlog, "--count", "300", "--seed", "2")
    assert writer.wait(60) == 0
    assert any(TORN_SUFFIX in n for n in os.listdir(journal_dir))
    done = printed(wlog, "done")
    assert done > last
    wait_for(lambda: applied(status) == done, 30, "the replica to converge")
    assert finish(follow) == 0
    assert view(replica)[:2] == (view(tmp_path / "Data.fs")[0], done)


def test_a_killed_follower_resumes_from_its_marker(tmp_path):
    wlog, flog = str(tmp_path / "writer.log"), str(tmp_path / "follow.log")
    status = str(tmp_path / "status.json")
    replica = tmp_path / "Replica.fs"
    journal_dir = str(tmp_path / "journal")
    writer = start_writer(tmp_path, wlog, "--count", "1200", "--pause",
                          "0.001")
    wait_for(lambda: printed(wlog, "ready") is not None, 30, "the writer")
    follow = start_follower(journal_dir, replica, status, flog,
                            "--batch-size", "7")
    wait_for(lambda: (applied(status) or 0) > 100, 30, "the follower")
    follow.send_signal(signal.SIGKILL)
    follow.wait(10)
    # Whatever the moment of the kill, the replica is the journal's state
    # at its marker: no batch half applied.
    state, killed_at, _ = view(replica)
    assert killed_at > 100
    assert state == rebuilt(journal_dir, killed_at)
    os.remove(status)
    follow = start_follower(journal_dir, replica, status, flog)
    assert writer.wait(60) == 0
    done = printed(wlog, "done")
    wait_for(lambda: applied(status) == done, 30, "the replica to converge")
    assert finish(follow, signal.SIGINT) == 0
    # It resumed: it applied only what the replica lacked.
    assert read_status(status)["applied"] <= done - killed_at
    assert view(replica)[:2] == (view(tmp_path / "Data.fs")[0], done)


def test_sigterm_during_a_catch_up_ends_at_a_transaction(tmp_path):
    journal_dir = str(tmp_path / "journal")
    last = bank_journal(journal_dir, 20000)
    flog, status = str(tmp_path / "follow.log"), str(tmp_path / "st.json")
    replica = tmp_path / "Replica.fs"
    follow = start_follower(journal_dir, replica, status, flog,
                            "--batch-size", "10")
    wait_for(lambda: (applied(status) or 0) > 0, 30, "the follower")
    assert finish(follow) == 0
    state, seq, _ = view(replica)
    assert 0 < seq < last, "stopped before the end of the catch-up"
    assert (seq - len(OWNERS)) % 3 == 0, "stopped inside a transaction"
    assert state == rebuilt(journal_dir, seq)


# -- PostgreSQL --------------------------------------------------------------

@pytest.fixture
def pg_table():
    """A fresh table name in the test database; its tables dropped after."""
    import psycopg2
    dsn = services.postgres_dsn()
    table = services.unique_name("zjf")
    more = []   # other tables the test made
    yield dsn, table, more
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in [table] + more:
            cur.execute("DROP TABLE IF EXISTS %s, %s_info" % (name, name))
    conn.close()


def pg_uri(dsn, table):
    import psycopg2.extensions
    params = psycopg2.extensions.parse_dsn(dsn)
    user = params.pop("user", "")
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")
    params["table"] = table
    return "postgresql://%s@%s%s/%s?%s" % (
        user, host, ":" + port if port else "", dbname,
        urllib.parse.urlencode(params))


def test_postgres_appends_notify_their_channel(pg_table):
    from zjournal.errors import JournalSequenceError
    from zjournal.sqljournal import PostgresJournal
    dsn, table, _ = pg_table
    journal = PostgresJournal(dsn, table=table, fsync="never")
    listener = journal.listen()
    try:
        assert journal.channel == table + "_tail"
        name, version, payload = commands.encode(demo.Deposit("a", 1))
        journal.append([(1, time.time(), version, name, payload),
                        (2, time.time(), version, name, payload)])
        assert listener.wait(5) == [2]
        # A refused append commits nothing, and notifies nothing.
        with pytest.raises(JournalSequenceError):
            journal.append([(5, time.time(), version, name, payload)])
        assert listener.wait(0.3) == []
    finally:
        listener.close()
        journal.close()


def test_postgres_follower_keeps_up_with_a_writer(tmp_path, pg_table):
    dsn, table, _ = pg_table
    uri = pg_uri(dsn, table)
    wlog, flog = str(tmp_path / "writer.log"), str(tmp_path / "follow.log")
    status = str(tmp_path / "status.json")
    replica = tmp_path / "Replica.fs"
    go = tmp_path / "go"
    writer = start_writer(tmp_path, wlog, "--journal", uri, "--count", "600",
                          "--fsync", "always", "--go", str(go))
    wait_for(lambda: printed(wlog, "ready") is not None, 30, "the writer")
    # A long interval: only notifications keep it current.
    follow = start_follower(uri, replica, status, flog, "--interval", "60")
    wait_for(lambda: applied(status) is not None, 30, "the follower")
    go.touch()
    samples = []
    while writer.poll() is None:
        samples.append(applied(status))
        time.sleep(0.05)
    assert writer.returncode == 0
    done = printed(wlog, "done")
    wait_for(lambda: applied(status) == done, 15, "the replica to converge")
    assert finish(follow) == 0
    assert any(a and 0 < a < done for a in samples), samples
    assert view(replica)[:2] == (view(tmp_path / "Data.fs")[0], done)


def _latencies(jdb, f, n=15, pause=0.05):
    """Seconds from a command's execute() call to its being applied by
    the follower ``f`` running in a thread."""
    found = []
    for i in range(n):
        began = time.perf_counter()
        jdb.execute(demo.Deposit(OWNERS[0], 1))
        seq = jdb.journal.last_seq
        while (f.applied_seq or 0) < seq:
            assert time.perf_counter() - began < 30, "seq %d" % seq
            time.sleep(0.0005)
        found.append(time.perf_counter() - began)
        time.sleep(pause)
    return found


def _follow_in_thread(journal, interval, listen):
    f = Follower(journal, ZODB.DB(None), interval=interval, listen=listen)
    thread = threading.Thread(target=f.run)
    thread.start()
    wait_for(lambda: f.state == "following", 30, "the follower")
    return f, thread


def test_postgres_notifications_beat_polling(tmp_path, pg_table):
    """Latency from execute() to the replica: notified vs polled."""
    from zjournal.sqljournal import PostgresJournal
    dsn, table, tables = pg_table
    results = {}
    for kind, interval in (("postgresql notified", 5.0),
                           ("postgresql polled", 0.2),
                           ("file polled", 0.2)):
        if kind.startswith("postgresql"):
            name = "%s_%d" % (table, len(results))
            tables.append(name)
            writer = PostgresJournal(dsn, table=name)
            reader = PostgresJournal(dsn, table=name, readonly=True)
        else:
            path = str(tmp_path / "journal")
            writer = FileJournal(path)
            reader = FileJournal(path, readonly=True)
        jdb = JournaledDB(ZODB.DB(None), writer)
        for owner in OWNERS:
            jdb.execute(demo.OpenAccount(owner, 0))
        f, thread = _follow_in_thread(reader, interval,
                                      listen=kind.endswith("notified"))
        try:
            found = _latencies(jdb, f)
        finally:
            f.stop()
            thread.join(30)
            f.close()
            reader.close()
            jdb.close()
        results[kind] = found
        print("follower latency, %s (interval %.1fs): median %.1f ms,"
              " max %.1f ms" % (kind, interval,
                                statistics.median(found) * 1000,
                                max(found) * 1000))
    # Notified, the follower does not wait for its 5 s interval; polled,
    # it waits for its next look.
    assert statistics.median(results["postgresql notified"]) < 0.5
    assert statistics.median(results["postgresql polled"]) > 0.02


# -- failures, archives and prunes --------------------------------------------

def test_a_batch_whose_commit_failed_is_read_again(site, primary,
                                                   monkeypatch):
    """A replica commit that fails (here a command's execute raising an
    OSError once, as a storage briefly unavailable would) applies
    nothing; the next poll reads the same batch again and goes on."""
    work(primary, 30)
    calls = []
    real = demo.Deposit.execute

    def flaky(self, root, context):
        calls.append(1)
        if len(calls) == 9:
            raise OSError("the replica's storage is briefly unavailable")
        return real(self, root, context)

    monkeypatch.setattr(demo.Deposit, "execute", flaky)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=4)
        with pytest.raises(Exception, match="briefly unavailable"):
            f.poll()
        stuck = f.applied_seq
        assert 0 < stuck < primary.journal.last_seq
        assert fingerprint(replica)[1] == stuck
        assert f.poll() == primary.journal.last_seq - stuck
        f.close()
    assert fingerprint(replica) == primary_view(primary)


def archive_all_but_last(journal_dir, keep=1):
    """Archive a journal's segments as ``prune --archive`` does, all but
    the last ``keep``; return the first seq of the first one kept."""
    from zjournal import archive
    names = sorted(n for n in os.listdir(journal_dir) if n.endswith(".zjl"))
    target = os.path.join(journal_dir, "archive")
    os.makedirs(target, exist_ok=True)
    for name in names[:-keep]:
        archive.archive_segment(os.path.join(journal_dir, name),
                                os.path.join(target, name + ".gz"),
                                journal_dir)
    return int(names[-keep][:20])


def test_an_empty_replica_reads_archived_segments(site, primary):
    work(primary, 60)
    kept = archive_all_but_last(site.journal_dir, keep=2)
    assert kept > 1
    work(primary, 5, start=60)
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=7)
        assert f.poll() == primary.journal.last_seq
        f.close()
    assert fingerprint(replica) == primary_view(primary)


def test_a_follower_left_behind_by_archiving_reads_on(site, primary):
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica, batch_size=5)
        work(primary, 6)
        f.poll()
        behind = f.applied_seq
        work(primary, 60, start=6)
        # Everything up to the last two segments moves, including the
        # one the follower is in the middle of.
        assert archive_all_but_last(site.journal_dir, keep=2) > behind
        assert f.poll() == primary.journal.last_seq - behind
        work(primary, 4, start=66)
        f.poll()
        f.close()
    assert fingerprint(replica) == primary_view(primary)


def test_removed_segments_are_refused_before_marking_the_replica(
        site, primary, tmp_path, capsys):
    from zjournal import cli
    work(primary, 60)
    backup = str(tmp_path / "backup.fs")
    shutil.copyfile(site.data_fs, backup)
    work(primary, 3, start=60)
    assert cli.main(["prune", site.journal_dir, "--covered-by", backup,
                     "--remove", "--yes"]) == 0
    with site.journal(readonly=True) as journal:
        start = journal.start_seq
    assert start > 1
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        with pytest.raises(follower_module.FollowerError) as e:
            f.start()
        f.close()
    assert "starts at seq %d" % start in str(e.value)
    assert "backup taken at seq %d or later" % (start - 1) in str(e.value)
    conn = replica.open()
    try:
        assert MARKER_KEY not in conn.root()   # still an empty ZODB
    finally:
        conn.close()


def test_cli_refusal_at_start_leaves_no_replica_files(
        site, primary, tmp_path, capsys):
    from zjournal import cli
    work(primary, 60)
    backup = str(tmp_path / "backup.fs")
    shutil.copyfile(site.data_fs, backup)
    work(primary, 3, start=60)
    assert cli.main(["prune", site.journal_dir, "--covered-by", backup,
                     "--remove", "--yes"]) == 0
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    replica = str(replicas / "Rep2.fs")
    capsys.readouterr()
    assert cli.main(["follow", site.journal_dir, "--zodb", replica,
                     "--import", "zjournal.demo", "--once"]) == 1
    assert "starts at seq" in capsys.readouterr().err
    assert os.listdir(str(replicas)) == []
    # A replica that was there before the refusal stays.
    other = str(tmp_path / "other")
    bank_journal(other, 1)
    assert cli.main(["follow", other, "--zodb", replica, "--import",
                     "zjournal.demo", "--once"]) == 0
    kept = sorted(os.listdir(str(replicas)))
    assert "Rep2.fs" in kept
    size = os.path.getsize(replica)
    assert cli.main(["follow", site.journal_dir, "--zodb", replica,
                     "--import", "zjournal.demo", "--once"]) == 1
    assert "was built from journal" in capsys.readouterr().err
    assert os.path.getsize(replica) == size
    assert "Rep2.fs" in os.listdir(str(replicas))


def test_cli_replica_that_is_not_a_filestorage(site, primary, tmp_path):
    work(primary, 3)
    primary.close()
    index = site.data_fs + ".index"
    assert os.path.exists(index)
    proc = subprocess.run(
        [sys.executable, "-m", "zjournal.cli", "follow", site.journal_dir,
         "--zodb", index, "--import", "zjournal.demo", "--once"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "is not a FileStorage" in proc.stderr
    assert "give --zodb the Data.fs file itself" in proc.stderr
    assert not os.path.exists(index + ".lock")
    assert not os.path.exists(index + ".tmp")


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_cli_unwritable_status_file_is_refused_at_start(
        site, primary, tmp_path, capsys, where):
    from zjournal import cli
    work(primary, 3)
    replica = str(tmp_path / "Replica.fs")
    if where == "missing-dir":
        status = str(tmp_path / "nowhere" / "status.json")
    else:
        status = str(tmp_path)
    capsys.readouterr()
    assert cli.main(["follow", site.journal_dir, "--zodb", replica,
                     "--import", "zjournal.demo", "--once",
                     "--status-file", status]) == 1
    err = capsys.readouterr().err
    assert "--status-file %s" % status in err
    # Refused before the replica was touched.
    assert not os.path.exists(replica)


def test_a_segment_archived_between_listing_and_opening(site, primary):
    """The follower listed the segments, then a prune (which takes no
    lock) archived the one it was about to open: it lists again."""
    replica = ZODB.DB(None)
    with site.journal(readonly=True) as journal:
        f = Follower(journal, replica)
        work(primary, 6)
        f.poll()
        work(primary, 60, start=6)
        reading = os.path.basename(journal._segment_path(f._source.at[0]))
        real = journal._list_segments
        moved = []

        def listing_then_archive():
            segs = real()
            if not moved:
                moved.append(archive_all_but_last(site.journal_dir))
            return segs

        journal._list_segments = listing_then_archive
        f.poll()
        assert moved
        assert os.path.exists(os.path.join(site.journal_dir, "archive",
                                           reading + ".gz"))
        f.close()
    assert fingerprint(replica) == primary_view(primary)
