"""Tests of zjournal.journal: the file journal's durability promises.

Faults are real: bytes are written into segment files, files are cut,
processes are killed with SIGKILL, and I/O errors come from replacements
of :class:`zjournal.journal.FileIO` passed as ``io=``.
"""
import builtins
import errno
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

import zjournal.journal
from zjournal import format as fmt
from zjournal.errors import CorruptJournalError
from zjournal.errors import JournalError
from zjournal.errors import JournalFailedError
from zjournal.errors import JournalLockedError
from zjournal.errors import JournalSequenceError
from zjournal.errors import JournalWriteError
from zjournal.errors import OutcomeUnknownError
from zjournal.errors import ReadOnlyJournalError
from zjournal.errors import ZJournalError
from zjournal.journal import FileIO
from zjournal.journal import FileJournal


HEADER = 48
FIRST = "00000000000000000001.zjl"


# -- helpers -------------------------------------------------------------

class NoSyncIO(FileIO):
    """Real writes, no fsync: for loops where durability is not the point."""

    def sync(self, fd):
        pass

    def sync_dir(self, path):
        pass


def _makeOne(path, **kw):
    kw.setdefault("fsync", "never")
    return FileJournal(str(path), **kw)


def _payload(seq):
    # Sizes vary with seq, so records are not all alike.
    return b"payload-%d|" % seq + bytes(range(seq % 11))


def _time(seq):
    return 1700000000.0 + seq * 0.001 + 1e-7


def _items(first, count=1, name="tests.put", version=0):
    return [(s, _time(s), version, name, _payload(s))
            for s in range(first, first + count)]


def _fill(journal, count, per_txn=1):
    """Append ``count`` transactions of ``per_txn`` records each."""
    for _ in range(count):
        journal.append(_items(journal.last_seq + 1, per_txn))


def _encoded(items, prev=fmt.GENESIS):
    """The bytes of one transaction, chained after ``prev``."""
    return fmt.encode_transaction(
        [(s, t, v, n.encode("utf-8"), p) for s, t, v, n, p in items], prev)


def _head(data):
    """The chain hash of the last record in ``data`` (whole records)."""
    return fmt.record_hash(data[_records(data, 0)[-1][0]:])


def _segment(path, first_seq=1):
    return os.path.join(str(path), fmt.segment_name(first_seq))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _append_bytes(path, data):
    with open(path, "ab") as f:
        f.write(data)


def _torn_files(path):
    return sorted(n for n in os.listdir(str(path)) if fmt.TORN_SUFFIX in n)


def _snapshot(path, skip=()):
    """Names and sha256 of every file in a directory."""
    return {
        name: hashlib.sha256(_read(os.path.join(str(path), name))).hexdigest()
        for name in os.listdir(str(path)) if name not in skip}


def _records(data, base=HEADER):
    """(offset, size, seq, flags) of each record in a segment's bytes."""
    out = []
    pos = base
    while pos < len(data):
        size = fmt.check_record(data, pos)
        seq = struct.unpack_from(">Q", data, pos + 8)[0]
        out.append((pos, size, seq, data[pos + 24]))
        pos += size
    assert pos == len(data)
    return out


def _seqs(journal, *args):
    return [e.seq for e in journal.entries(*args)]


SCRIPT = textwrap.dedent("""
    import os, sys, time
    from zjournal.journal import FileJournal
    path, mode, segment_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    j = FileJournal(path, fsync="always", segment_size=segment_size)
    def items(first, count):
        return [(s, 1700000000.0 + s, 0, "tests.put", b"sub-%d" % s)
                for s in range(first, first + count)]
    if mode == "hold":
        j.append(items(j.last_seq + 1, 1))
        print("ready", os.getpid(), flush=True)
        sys.stdin.read()
    elif mode == "append":
        for _ in range(int(sys.argv[4])):
            j.append(items(j.last_seq + 1, int(sys.argv[5])))
            print(j.last_seq, flush=True)
    elif mode == "open":
        print("opened", j.last_seq, flush=True)
    j.close()
    print("done", flush=True)
""")


def _run(path, mode, *args, kill_at=None, segment_size=1 << 20):
    env = dict(os.environ)
    env.pop("ZJOURNAL_KILL_AT", None)
    env.pop("ZJOURNAL_KILL_COUNT", None)
    if kill_at:
        env["ZJOURNAL_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), mode, str(segment_size)]
        + [str(a) for a in args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


# -- creating and opening ------------------------------------------------

class TestCreate:

    def test_missing_directories_are_created(self, tmp_path):
        path = tmp_path / "a" / "b" / "journal"
        j = _makeOne(path)
        j.close()
        assert path.is_dir()
        assert (path / FIRST).exists()

    def test_fresh_journal(self, tmp_path):
        j = _makeOne(tmp_path / "j")
        try:
            assert j.last_seq == 0
            assert [e for e in j.entries()] == []
            assert uuid.UUID(j.identity).version == 4
            assert j.segments() == [_segment(tmp_path / "j")]
        finally:
            j.close()
        segs = [n for n in os.listdir(tmp_path / "j") if n.endswith(".zjl")]
        assert segs == [FIRST]
        data = _read(_segment(tmp_path / "j"))
        assert len(data) == HEADER
        header = fmt.decode_header(data, "seg")
        assert header.first_seq == 1
        assert header.identity == uuid.UUID(j.identity).bytes

    def test_reopen_keeps_identity_and_last_seq(self, tmp_path):
        j = _makeOne(tmp_path)
        identity = j.identity
        _fill(j, 3)
        j.close()
        j = _makeOne(tmp_path)
        try:
            assert j.identity == identity
            assert j.last_seq == 3
        finally:
            j.close()
        r = _makeOne(tmp_path, readonly=True)
        assert (r.identity, r.last_seq) == (identity, 3)

    def test_two_journals_have_different_identities(self, tmp_path):
        a = _makeOne(tmp_path / "a")
        b = _makeOne(tmp_path / "b")
        a.close()
        b.close()
        assert a.identity != b.identity

    def test_bad_arguments(self, tmp_path):
        with pytest.raises(ValueError):
            FileJournal(str(tmp_path / "x"), fsync="sometimes")
        with pytest.raises(ValueError):
            FileJournal(str(tmp_path / "y"), segment_size=HEADER - 1)

    @pytest.mark.parametrize("stray", [
        "notes.txt", FIRST + ".torn-48", FIRST + ".bak",
        "00000000000000000005.zjl\n"])
    def test_stray_files_are_ignored(self, tmp_path, stray):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.close()
        _write(str(tmp_path / stray), b"not a segment")
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 2
            _fill(j, 1)
            assert _seqs(j) == [1, 2, 3]
            assert j.verify().segments == 1
        finally:
            j.close()
        assert _read(str(tmp_path / stray)) == b"not a segment"

    def test_interrupted_segment_creation_is_removed(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.close()
        tmp = _segment(tmp_path, 3) + ".tmp"
        _write(tmp, b"ZJOURN")
        j = _makeOne(tmp_path)
        j.close()
        assert not os.path.exists(tmp)
        assert j.last_seq == 2


# -- appending and reading -----------------------------------------------

class TestAppend:

    def test_single_record(self, tmp_path):
        j = _makeOne(tmp_path)
        j.append([(1, 1700000000.5, 3, "bank.deposit", b"\x00args\xff")])
        assert j.last_seq == 1
        (e,) = list(j.entries())
        assert (e.seq, e.time, e.command_name, e.version, e.payload) == (
            1, 1700000000.5, "bank.deposit", 3, b"\x00args\xff")
        j.close()
        size = os.path.getsize(_segment(tmp_path))
        assert size == HEADER + len(_encoded(
            [(1, 1700000000.5, 3, "bank.deposit", b"\x00args\xff")]))

    def test_bytes_on_disk_are_the_encoded_transaction(self, tmp_path):
        j = _makeOne(tmp_path)
        first = _items(1, 1)
        second = _items(2, 3, name="tests.ünïcode", version=2)
        j.append(first)
        j.append(second)
        j.close()
        data = _read(_segment(tmp_path))
        one = _encoded(first)
        assert data[HEADER:] == one + _encoded(second, _head(one))

    def test_several_records(self, tmp_path):
        j = _makeOne(tmp_path)
        j.append(_items(1, 1))
        j.append(_items(2, 4, name="tests.increment", version=7))
        assert j.last_seq == 5
        entries = list(j.entries())
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
        for e in entries[1:]:
            assert e.command_name == "tests.increment"
            assert e.version == 7
            assert e.payload == _payload(e.seq)
            assert e.time == _time(e.seq)
        j.close()

    def test_time_round_trips_exactly(self, tmp_path):
        times = [0.1, 1700000000.123456789, 3.141592653589793e9,
                 5e-324, 1.7976931348623157e308, -2.5, 0.0]
        j = _makeOne(tmp_path)
        for i, t in enumerate(times, 1):
            j.append([(i, t, 0, "t", b"")])
        j.close()
        j = _makeOne(tmp_path, readonly=True)
        got = [e.time for e in j.entries()]
        assert [struct.pack(">d", t) for t in got] == [
            struct.pack(">d", t) for t in times]

    def test_payload_and_name_round_trip(self, tmp_path):
        rng = random.Random(4)
        payloads = [b"", bytes(range(256)), bytes(rng.randrange(256)
                                                  for _ in range(5000))]
        j = _makeOne(tmp_path)
        for i, p in enumerate(payloads, 1):
            j.append([(i, 1.0, i, "ns.cmd-ñ-%d" % i, p)])
        j.close()
        j = _makeOne(tmp_path)
        entries = list(j.entries())
        j.close()
        assert [e.payload for e in entries] == payloads
        assert [e.command_name for e in entries] == [
            "ns.cmd-ñ-1", "ns.cmd-ñ-2", "ns.cmd-ñ-3"]
        assert [e.version for e in entries] == [1, 2, 3]

    @pytest.mark.parametrize("first", [0, 1, 2, 4, 5])
    def test_wrong_seq_is_refused_and_writes_nothing(self, tmp_path, first):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        before = _read(_segment(tmp_path))
        with pytest.raises(JournalSequenceError):
            j.append(_items(first, 2))
        assert _read(_segment(tmp_path)) == before
        assert j.last_seq == 2
        # Not a fail-stop: the right seq is still accepted.
        j.append(_items(3))
        assert _seqs(j) == [1, 2, 3]
        j.close()

    def test_gap_inside_a_transaction_is_refused(self, tmp_path):
        # Sequence numbers have no gaps; a transaction 1, 3 would be
        # acknowledged and then unreadable.
        j = _makeOne(tmp_path)
        items = [(1, 1.0, 0, "a", b"x"), (3, 1.0, 0, "a", b"y")]
        before = _read(_segment(tmp_path))
        with pytest.raises(JournalError):
            j.append(items)
        assert _read(_segment(tmp_path)) == before
        assert j.last_seq == 0
        j.close()

    def test_oversized_command_name_is_not_silently_lost(self, tmp_path):
        # An acknowledged record must never be cut as a torn tail later:
        # either append refuses it (writing nothing) or it reads back.
        j = _makeOne(tmp_path)
        _fill(j, 1)
        before = _read(_segment(tmp_path))
        name = "n" * 2000
        try:
            j.append([(2, 1.0, 0, name, b"args")])
        except (ZJournalError, ValueError):
            assert _read(_segment(tmp_path)) == before
            assert j.last_seq == 1
            j.close()
            return
        j.close()
        j = _makeOne(tmp_path)
        try:
            assert j.torn_tail is None
            assert j.last_seq == 2
            assert [e.command_name for e in j.entries(2)] == [name]
        finally:
            j.close()

    def test_append_after_close(self, tmp_path):
        j = _makeOne(tmp_path)
        j.close()
        j.close()  # idempotent
        assert j.closed
        with pytest.raises(JournalError):
            j.append(_items(1))
        assert os.path.getsize(_segment(tmp_path)) == HEADER

    def test_fsync_always_appends(self, tmp_path):
        j = _makeOne(tmp_path, fsync="always")
        _fill(j, 3, per_txn=2)
        j.close()
        j = _makeOne(tmp_path)
        assert _seqs(j) == list(range(1, 7))
        j.close()

    def test_fsync_batch_policy(self, tmp_path):
        # The design names three policies: always, batch, never.
        j = FileJournal(str(tmp_path), fsync="batch")
        try:
            _fill(j, 3)
        finally:
            j.close()
        j = _makeOne(tmp_path)
        assert _seqs(j) == [1, 2, 3]
        j.close()

    def test_unknown_fsync_policy(self, tmp_path):
        with pytest.raises(ValueError):
            FileJournal(str(tmp_path / "j"), fsync="sometimes")
        assert not os.path.exists(str(tmp_path / "j"))

    def test_concurrent_appends_stay_serial(self, tmp_path):
        j = _makeOne(tmp_path)
        refused = []

        def worker():
            done = 0
            while done < 25:
                seq = j.last_seq + 1
                try:
                    j.append(_items(seq, 2))
                except JournalSequenceError:
                    refused.append(seq)
                else:
                    done += 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert j.last_seq == 200
        assert _seqs(j) == list(range(1, 201))
        j.close()
        r = _makeOne(tmp_path, readonly=True)
        assert r.verify().records == 200


class TestEntries:

    @pytest.fixture
    def journal(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 3)
        j.append(_items(4, 3))  # 4, 5, 6 in one transaction
        _fill(j, 2)
        yield j
        j.close()

    def test_all(self, journal):
        assert _seqs(journal) == list(range(1, 9))

    @pytest.mark.parametrize("start, stop, expected", [
        (1, None, list(range(1, 9))),
        (3, 6, [3, 4, 5]),
        (5, 7, [5, 6]),
        (5, 6, [5]),
        (5, 5, []),
        (6, 5, []),
        (8, None, [8]),
        (9, None, []),
        (0, 3, [1, 2]),
        (-5, 2, [1]),
        (7, 100, [7, 8]),
        (1, 1, []),
    ])
    def test_start_stop(self, journal, start, stop, expected):
        assert _seqs(journal, start, stop) == expected

    def test_entries_match_what_was_appended(self, journal):
        for e in journal.entries():
            assert (e.time, e.command_name, e.version, e.payload) == (
                _time(e.seq), "tests.put", 0, _payload(e.seq))

    def test_readonly_reader_sees_later_appends(self, journal, tmp_path):
        reader = _makeOne(tmp_path, readonly=True)
        assert reader.last_seq == 8
        _fill(journal, 2)
        assert _seqs(reader) == list(range(1, 11))
        assert _seqs(reader, 9, 10) == [9]


# -- segments ------------------------------------------------------------

class TestSegmentRoll:

    def test_roll_names_segments_by_first_seq(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 40)
        j.close()
        names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".zjl"))
        assert len(names) > 5
        seen = []
        for name in names:
            data = _read(str(tmp_path / name))
            header = fmt.decode_header(data, name)
            first = fmt.parse_segment_name(name)
            assert header.first_seq == first
            assert header.identity == uuid.UUID(j.identity).bytes
            recs = _records(data)
            assert recs, name
            assert recs[0][2] == first
            # A segment is closed once it reaches segment_size: only its
            # last record may cross the limit.
            assert recs[-1][0] < 300
            seen.extend(r[2] for r in recs)
        assert seen == list(range(1, 41))

    def test_entries_across_segments(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 40)
        assert len(j.segments()) > 5
        assert _seqs(j) == list(range(1, 41))
        for start, stop in [(1, 41), (7, 33), (13, 14), (20, 40), (39, 60)]:
            assert _seqs(j, start, stop) == list(
                range(start, min(stop, 41)))
        j.close()

    def test_reopen_and_verify(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 40)
        j.close()
        j = _makeOne(tmp_path, segment_size=300)
        try:
            assert j.last_seq == 40
            report = j.verify()
            files = [str(tmp_path / n) for n in os.listdir(tmp_path)
                     if n.endswith(".zjl")]
            assert report.segments == len(files) == len(j.segments())
            assert report.records == 40
            assert (report.first_seq, report.last_seq) == (1, 40)
            assert report.bytes == sum(os.path.getsize(p) for p in files)
            assert report.torn_tail is None
            _fill(j, 5)
            assert _seqs(j, 38) == list(range(38, 46))
        finally:
            j.close()

    def test_transaction_never_split(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=400)
        for _ in range(30):
            j.append(_items(j.last_seq + 1, 3))
        j.close()
        names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".zjl"))
        assert len(names) > 5
        for name in names:
            recs = _records(_read(str(tmp_path / name)))
            assert (recs[0][2] - 1) % 3 == 0, name
            assert recs[-1][3] == fmt.FLAG_END, name
            assert len(recs) % 3 == 0

    def test_roll_makes_old_segment_durable_before_new_one(self, tmp_path):
        # Under fsync="never" the old segment may hold unsynced records; a
        # new segment must not exist (durably) beside a torn older one.
        events = []

        class RecordingIO(FileIO):
            def open_append(self, path):
                fd = super().open_append(path)
                events.append(("open", os.path.basename(path), fd))
                return fd

            def write(self, fd, data):
                events.append(("write", fd))
                super().write(fd, data)

            def sync(self, fd):
                events.append(("sync", fd))
                super().sync(fd)

            def create(self, path, data):
                events.append(("create", os.path.basename(path)))
                FileIO().create(path, data)  # its own writes unrecorded

            def rename(self, src, dst):
                events.append(("rename", os.path.basename(dst)))
                super().rename(src, dst)

            def sync_dir(self, path):
                events.append(("sync_dir",))
                super().sync_dir(path)

        j = _makeOne(tmp_path, io=RecordingIO(), segment_size=200)
        _fill(j, 6)
        j.close()
        rolls = [i for i, e in enumerate(events)
                 if e[0] == "create" and e[1] != FIRST + ".tmp"]
        assert rolls
        for i in rolls:
            fd = [e for e in events[:i] if e[0] == "open"][-1][2]
            on_fd = [e[0] for e in events[:i] if e[1:] == (fd,)]
            assert on_fd[-1] == "sync", events[:i]
            name = events[i][1][:-len(".tmp")]
            assert events[i + 1:i + 3] == [("rename", name), ("sync_dir",)]

    def test_smallest_segment_size(self, tmp_path):
        # segment_size=48 is accepted: every transaction gets a segment.
        j = _makeOne(tmp_path, segment_size=HEADER)
        _fill(j, 3)
        try:
            assert _seqs(j) == [1, 2, 3]
            report = j.verify()
            assert (report.segments, report.records) == (3, 3)
        finally:
            j.close()


class TestLargeRecords:
    """Records larger than a read chunk, and records across chunks."""

    SIZES = [300000, 700001, 1500000, 5, 900000]

    def _build(self, path):
        rng = random.Random(6)
        payloads = [bytes(rng.randrange(256) for _ in range(64)) * (n // 64)
                    + b"!" * (n % 64) for n in self.SIZES]
        j = _makeOne(path)
        for seq, p in enumerate(payloads, 1):
            j.append([(seq, float(seq), 0, "big", p)])
        j.close()
        return payloads

    def test_round_trip(self, tmp_path):
        payloads = self._build(tmp_path)
        assert os.path.getsize(_segment(tmp_path)) > 2 * (1 << 20)
        for readonly in (False, True):
            j = _makeOne(tmp_path, readonly=readonly)
            assert j.last_seq == len(payloads)
            assert [e.payload for e in j.entries()] == payloads
            assert [e.payload for e in j.entries(4)] == payloads[3:]
            assert j.verify().records == len(payloads)
            j.close()

    def test_damage_beyond_first_chunk(self, tmp_path):
        self._build(tmp_path)
        seg = _segment(tmp_path)
        data = bytearray(_read(seg))
        recs = _records(bytes(data))
        offset = recs[3][0]
        assert offset > 1 << 20
        data[offset + 31] ^= 0x40
        _write(seg, bytes(data))
        # The damaged record ends the transaction before the last one, so
        # opening (which checks the last transaction and the record before
        # it) already finds it, and reports the same place.
        for readonly in (False, True):
            with pytest.raises(CorruptJournalError) as info:
                _makeOne(tmp_path, readonly=readonly)
            assert (info.value.offset, info.value.seq) == (offset, 4)
        assert _read(seg) == bytes(data)

    def test_torn_large_record(self, tmp_path):
        payloads = self._build(tmp_path)
        seg = _segment(tmp_path)
        data = _read(seg)
        recs = _records(data)
        cut = recs[-1][0] + 600000
        _write(seg, data[:cut])
        r = _makeOne(tmp_path, readonly=True)
        assert [e.payload for e in r.entries()] == payloads[:-1]
        assert os.path.getsize(seg) == cut
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == len(payloads) - 1
            assert os.path.getsize(seg) == recs[-1][0]
            assert _read(j.torn_tail.saved_as) == data[recs[-1][0]:cut]
        finally:
            j.close()


class TestOpenReadsOnlyHeadAndTail:

    def _build(self, path):
        j = _makeOne(path, segment_size=400)
        _fill(j, 60)
        j.close()
        segs = j.segments()
        assert len(segs) >= 5
        return segs

    def test_only_first_header_and_last_segment_are_opened(
            self, tmp_path, monkeypatch):
        segs = self._build(tmp_path)
        opened = []
        real_open = builtins.open

        def recording_open(file, *args, **kw):
            opened.append(os.path.abspath(str(file)))
            return real_open(file, *args, **kw)

        monkeypatch.setattr(builtins, "open", recording_open)
        j = _makeOne(tmp_path)
        j.close()
        r = _makeOne(tmp_path, readonly=True)
        monkeypatch.undo()
        assert (j.last_seq, r.last_seq) == (60, 60)
        assert {p for p in opened if p.endswith(".zjl")} == {
            segs[0], segs[-1]}

    def test_damaged_old_segments_do_not_stop_open(self, tmp_path):
        segs = self._build(tmp_path)
        for seg in segs[:-1]:
            data = bytearray(_read(seg))
            recs = _records(bytes(data))
            assert len(recs) >= 3
            offset, size = recs[1][:2]
            data[offset:offset + size] = b"\xee" * size
            _write(seg, bytes(data))
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 60
            with pytest.raises(CorruptJournalError) as info:
                list(j.entries())
            assert info.value.path == segs[0]
            with pytest.raises(CorruptJournalError):
                j.verify()
            # The tail is fine: the journal still appends.
            _fill(j, 1)
            assert j.last_seq == 61
            assert _seqs(j, 60) == [60, 61]
        finally:
            j.close()


# -- torn tails ----------------------------------------------------------

def _tail_garbage():
    """Bytes a crash may leave after the last record (of seq 3)."""
    rng = random.Random(5)
    next_rec = _encoded(_items(4))
    long_head = bytearray(next_rec[:30])
    struct.pack_into(">I", long_head, 4, 5000)  # a body past the end
    # The first (complete, valid) record of a two-record transaction.
    pair = _encoded(_items(4, 2))
    unfinished = pair[:fmt.check_record(pair, 0)]
    return {
        "zeros": bytes(300),
        "one-zero": b"\0",
        "random": bytes(rng.randrange(256) for _ in range(777)),
        "partial-header": next_rec[:17],
        "header-without-body": next_rec[:30],
        "all-but-last-byte": next_rec[:-1],
        "length-past-eof": bytes(long_head) + b"abc",
        "transaction-without-end": unfinished,
        "crc-damaged-last": bytes([next_rec[0] ^ 1]) + next_rec[1:],
    }


GARBAGE = _tail_garbage()


class TestTornTail:

    def _check_cut(self, path, seg, original, cut, boundaries):
        """Open a writer on ``original[:cut]``; check the cut and an append."""
        _write(seg, original[:cut])
        for name in _torn_files(path):
            os.remove(os.path.join(str(path), name))
        boundary, last_seq = max(b for b in boundaries if b[0] <= cut)
        j = _makeOne(path, io=NoSyncIO())
        try:
            assert j.last_seq == last_seq, cut
            assert os.path.getsize(seg) == boundary, cut
            assert _read(seg) == original[:boundary], cut
            if cut == boundary:
                assert j.torn_tail is None, cut
                assert _torn_files(path) == [], cut
            else:
                torn = j.torn_tail
                assert torn is not None, cut
                assert (torn.path, torn.offset, torn.size) == (
                    seg, boundary, cut - boundary), cut
                name = os.path.basename(seg) + ".torn-%d" % boundary
                assert torn.saved_as == os.path.join(str(path), name)
                assert _torn_files(path) == [name], cut
                assert _read(torn.saved_as) == original[boundary:cut], cut
            j.append(_items(last_seq + 1))
            assert os.path.getsize(seg) == boundary + len(
                _encoded(_items(last_seq + 1))), cut
        finally:
            j.close()
        r = _makeOne(path, readonly=True)
        assert r.torn_tail is None, cut
        assert r.last_seq == last_seq + 1, cut
        (e,) = r.entries(last_seq + 1)
        assert (e.seq, e.payload) == (last_seq + 1, _payload(last_seq + 1))
        assert r.verify().records == last_seq + 1, cut

    def _boundaries(self, data):
        """(end offset, seq) after each complete transaction."""
        out = [(HEADER, 0)]
        for offset, size, seq, flags in _records(data):
            if flags & fmt.FLAG_END:
                out.append((offset + size, seq))
        return out

    def test_every_cut_in_the_last_two_records(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 3)
        # The last record's body is 8 bytes longer than the one before it:
        # cut right after its length field, the file then ends with a
        # number that is exactly the distance back to the start of the
        # previous record, as a trailing length would be.
        n3 = len(_encoded(_items(3))) - 12
        j.append([(4, _time(4), 0, "tests.put",
                   b"x" * (n3 + 8 - fmt.BODY_HEAD_SIZE - len("tests.put")))])
        j.close()
        seg = _segment(tmp_path)
        original = _read(seg)
        recs = _records(original)
        assert recs[-1][1] == recs[-2][1] + 8
        boundaries = self._boundaries(original)
        for cut in range(recs[-2][0], len(original)):
            self._check_cut(tmp_path, seg, original, cut, boundaries)

    def test_every_cut_in_a_multi_record_transaction(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.append(_items(3, 3))
        j.close()
        seg = _segment(tmp_path)
        original = _read(seg)
        recs = _records(original)
        boundaries = self._boundaries(original)
        assert boundaries[-2] == (recs[2][0], 2)
        for cut in range(recs[2][0], len(original)):
            self._check_cut(tmp_path, seg, original, cut, boundaries)

    def test_every_cut_in_a_later_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=200)
        _fill(j, 8)
        j.close()
        segs = j.segments()
        assert len(segs) >= 3
        seg = segs[-1]
        original = _read(seg)
        first = fmt.parse_segment_name(os.path.basename(seg))
        assert _records(original)[0][2] == first
        # Cut back to the bare header: the journal ends in the segment
        # before, at first - 1.
        boundaries = [(HEADER, first - 1)] + self._boundaries(original)[1:]
        for cut in range(HEADER, len(original)):
            self._check_cut(tmp_path, seg, original, cut, boundaries)


    @pytest.mark.parametrize("kind", sorted(GARBAGE))
    def test_garbage_after_the_last_record_is_cut(self, tmp_path, kind):
        garbage = GARBAGE[kind]
        j = _makeOne(tmp_path)
        _fill(j, 3)
        j.close()
        seg = _segment(tmp_path)
        original = _read(seg)
        _append_bytes(seg, garbage)
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 3
            assert _read(seg) == original
            assert j.torn_tail.offset == len(original)
            assert j.torn_tail.size == len(garbage)
            assert _read(j.torn_tail.saved_as) == garbage
            assert j.torn_tail.saved_as == seg + ".torn-%d" % len(original)
            _fill(j, 1)
            assert _seqs(j) == [1, 2, 3, 4]
            assert j.verify().records == 4
        finally:
            j.close()

    def test_torn_header_of_first_record_in_new_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=200)
        _fill(j, 20)
        j.close()
        seg = j.segments()[-1]
        first = fmt.parse_segment_name(os.path.basename(seg))
        data = _read(seg)
        _write(seg, data[:HEADER] + data[HEADER:HEADER + 11])
        j = _makeOne(tmp_path, segment_size=200)
        try:
            assert j.last_seq == first - 1
            assert os.path.getsize(seg) == HEADER
            assert j.torn_tail.offset == HEADER
            _fill(j, 1)
            assert _seqs(j, first - 1) == [first - 1, first]
            assert j.verify().records == first
        finally:
            j.close()

    def test_second_torn_tail_at_same_offset_keeps_both(self, tmp_path):
        # Cut bytes are kept aside; a later tear at the same offset (the
        # next write after a repair) must not destroy the earlier copy.
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.close()
        seg = _segment(tmp_path)
        _append_bytes(seg, b"first torn bytes")
        _makeOne(tmp_path).close()
        _append_bytes(seg, b"second")
        _makeOne(tmp_path).close()
        kept = [_read(os.path.join(str(tmp_path), n))
                for n in _torn_files(tmp_path)]
        assert b"first torn bytes" in kept
        assert b"second" in kept

    def test_repair_is_idempotent(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.close()
        seg = _segment(tmp_path)
        good = _read(seg)
        _append_bytes(seg, b"garbage!")
        _makeOne(tmp_path).close()
        snap = _snapshot(tmp_path)
        j = _makeOne(tmp_path)
        j.close()
        assert j.torn_tail is None
        assert _snapshot(tmp_path) == snap
        assert _read(seg) == good


# -- read-only -------------------------------------------------------------

class TestReadOnly:

    def test_torn_tail_reported_not_cut(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 20)
        j.close()
        seg = j.segments()[-1]
        size = os.path.getsize(seg)
        _append_bytes(seg, _encoded(_items(21))[:25])
        before = _snapshot(tmp_path)
        r = _makeOne(tmp_path, readonly=True)
        assert r.last_seq == 20
        assert (r.torn_tail.path, r.torn_tail.offset, r.torn_tail.size) == (
            seg, size, 25)
        assert r.torn_tail.saved_as is None
        assert _seqs(r) == list(range(1, 21))
        report = r.verify()
        assert report.records == 20
        assert report.torn_tail.offset == size
        assert r.info()["torn_tail"]["offset"] == size
        with pytest.raises(ReadOnlyJournalError):
            r.append(_items(21))
        r.close()
        assert _snapshot(tmp_path) == before

    def test_reader_does_not_yield_unfinished_transaction(self, tmp_path):
        # What a reader sees while a writer is in the middle of writing a
        # transaction: complete records without END are not yielded.
        j = _makeOne(tmp_path)
        _fill(j, 3)
        j.close()
        seg = _segment(tmp_path)
        txn = _encoded(_items(4, 3))
        first_end = fmt.check_record(txn, 0)
        second_end = first_end + fmt.check_record(txn, first_end)
        _append_bytes(seg, txn[:second_end])  # records 4 and 5, no END
        r = _makeOne(tmp_path, readonly=True)
        assert r.last_seq == 3
        assert _seqs(r) == [1, 2, 3]
        assert r.torn_tail is not None
        # ... and sees it once the writer finishes.
        _append_bytes(seg, txn[second_end:])
        assert _seqs(r) == [1, 2, 3, 4, 5, 6]

    def test_missing_directory(self, tmp_path):
        with pytest.raises(JournalError):
            _makeOne(tmp_path / "nothing", readonly=True)
        assert not (tmp_path / "nothing").exists()

    def test_directory_without_segments(self, tmp_path):
        with pytest.raises(JournalError):
            _makeOne(tmp_path, readonly=True)
        assert os.listdir(tmp_path) == []

    def test_append_refused(self, tmp_path):
        _makeOne(tmp_path).close()
        before = _snapshot(tmp_path)
        r = _makeOne(tmp_path, readonly=True)
        with pytest.raises(ReadOnlyJournalError):
            r.append(_items(1))
        r.close()
        assert _snapshot(tmp_path) == before

    def test_no_lock_needed(self, tmp_path):
        w = _makeOne(tmp_path)
        _fill(w, 2)
        try:
            r = _makeOne(tmp_path, readonly=True)
            assert _seqs(r) == [1, 2]
            assert r.info()["writer_active"] is True
        finally:
            w.close()
        assert r.info()["writer_active"] is False


# -- corruption ----------------------------------------------------------

class TestCorruption:

    def _build(self, path, count=5):
        j = _makeOne(path)
        _fill(j, count)
        j.close()
        seg = _segment(path)
        return seg, _read(seg), _records(_read(seg))

    def test_every_bit_flip_in_a_middle_record(self, tmp_path):
        seg, original, recs = self._build(tmp_path)
        offset, size, seq, _ = recs[2]
        assert seq == 3
        for bit in range(size * 8):
            damaged = bytearray(original)
            damaged[offset + bit // 8] ^= 0x80 >> (bit % 8)
            damaged = bytes(damaged)
            _write(seg, damaged)
            j = _makeOne(tmp_path, io=NoSyncIO())
            try:
                assert j.last_seq == 5
                for scan in (lambda: list(j.entries()), j.verify):
                    with pytest.raises(CorruptJournalError) as info:
                        scan()
                    e = info.value
                    assert (e.path, e.offset, e.seq) == (seg, offset, 3), bit
            finally:
                j.close()
            assert _read(seg) == damaged, bit
            assert _torn_files(tmp_path) == [], bit

    def test_entries_before_the_damage_are_readable(self, tmp_path):
        seg, original, recs = self._build(tmp_path)
        offset = recs[2][0]
        damaged = bytearray(original)
        damaged[offset + 40] ^= 0xFF
        _write(seg, bytes(damaged))
        j = _makeOne(tmp_path)
        try:
            assert _seqs(j, 1, 3) == [1, 2]
            assert _seqs(j, 2, 3) == [2]
            got = []
            with pytest.raises(CorruptJournalError):
                for e in j.entries():
                    got.append(e.seq)
            assert got == [1, 2]
        finally:
            j.close()

    def test_damage_in_a_transaction_names_the_damaged_record(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 1)
        j.append(_items(2, 3))
        _fill(j, 1)
        j.close()
        seg = _segment(tmp_path)
        recs = _records(_read(seg))
        damaged = bytearray(_read(seg))
        damaged[recs[2][0] + 35] ^= 0x04  # record 3, inside 2..4
        _write(seg, bytes(damaged))
        j = _makeOne(tmp_path)
        try:
            got = []
            for scan in (lambda: got.extend(_seqs(j)), j.verify):
                with pytest.raises(CorruptJournalError) as info:
                    scan()
                # The error names the damaged record (seq 3), not the
                # intact record 2 that opens its transaction.
                assert (info.value.path, info.value.offset,
                        info.value.seq) == (seg, recs[2][0], 3)
            assert _seqs(j, 1, 2) == [1]
        finally:
            j.close()
        # Opening with a tail that forces a scan names the same record.
        _append_bytes(seg, b"\x00torn")
        with pytest.raises(CorruptJournalError) as info:
            _makeOne(tmp_path)
        assert (info.value.path, info.value.offset, info.value.seq) == (
            seg, recs[2][0], 3)

    def test_damage_in_a_transaction_yields_none_of_it(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 1)
        j.append(_items(2, 3))
        _fill(j, 1)
        j.close()
        seg = _segment(tmp_path)
        recs = _records(_read(seg))
        damaged = bytearray(_read(seg))
        damaged[recs[2][0] + 35] ^= 0x04
        _write(seg, bytes(damaged))
        j = _makeOne(tmp_path)
        try:
            got = []
            with pytest.raises(CorruptJournalError):
                for e in j.entries():
                    got.append(e.seq)
            # Record 2 is intact, but its transaction is not.
            assert got == [1]
        finally:
            j.close()

    def test_damage_plus_torn_tail_refuses_to_open(self, tmp_path):
        seg, original, recs = self._build(tmp_path)
        offset = recs[2][0]
        damaged = bytearray(original)
        damaged[offset + 33] ^= 0x20
        damaged = bytes(damaged) + b"\x00garbage at the end"
        _write(seg, damaged)
        for readonly in (False, True):
            with pytest.raises(CorruptJournalError) as info:
                _makeOne(tmp_path, readonly=readonly)
            assert (info.value.path, info.value.offset, info.value.seq) == (
                seg, offset, 3)
            assert _read(seg) == damaged
            assert _torn_files(tmp_path) == []
        # The refused writer released its lock.
        with pytest.raises(CorruptJournalError):
            _makeOne(tmp_path)

    def test_damaged_last_record_before_valid_one_is_not_cut(self, tmp_path):
        # A complete transaction without END after the damage: the fast
        # tail check fails, the scan finds a valid record after the damage.
        seg, original, recs = self._build(tmp_path)
        damaged = bytearray(original)
        damaged[recs[-1][0] + 12] ^= 0x01  # seq 5
        damaged = bytes(damaged) + fmt.encode_record(6, 1.0, 0, 0, b"x", b"y")
        _write(seg, damaged)
        with pytest.raises(CorruptJournalError) as info:
            _makeOne(tmp_path)
        assert (info.value.offset, info.value.seq) == (recs[-1][0], 5)
        assert _read(seg) == damaged

    def test_damaged_record_in_old_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        seg = j.segments()[1]
        data = bytearray(_read(seg))
        recs = _records(bytes(data))
        offset, _, seq, _ = recs[1]
        data[offset + 20] ^= 0x08
        _write(seg, bytes(data))
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 30
            for scan in (lambda: list(j.entries()), j.verify,
                         lambda: list(j.entries(seq - 1, seq + 1))):
                with pytest.raises(CorruptJournalError) as info:
                    scan()
                assert (info.value.path, info.value.offset,
                        info.value.seq) == (seg, offset, seq)
            # Entries entirely after the damaged segment are fine.
            third = fmt.parse_segment_name(
                os.path.basename(j.segments()[2]))
            assert _seqs(j, third, 31) == list(range(third, 31))
        finally:
            j.close()

    def test_truncated_old_segment_is_corruption(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        seg = j.segments()[1]
        data = _read(seg)
        recs = _records(data)
        _write(seg, data[:recs[-1][0] + 10])
        j = _makeOne(tmp_path)
        try:
            with pytest.raises(CorruptJournalError) as info:
                j.verify()
            assert (info.value.path, info.value.offset,
                    info.value.seq) == (seg, recs[-1][0], recs[-1][2])
            with pytest.raises(CorruptJournalError):
                list(j.entries())
        finally:
            j.close()
        assert _read(seg) == data[:recs[-1][0] + 10]
        r = _makeOne(tmp_path, readonly=True)
        with pytest.raises(CorruptJournalError):
            r.verify()

    def test_damaged_header_of_first_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 20)
        j.close()
        seg = j.segments()[0]
        data = bytearray(_read(seg))
        data[20] ^= 0x01  # identity
        _write(seg, bytes(data))
        for readonly in (False, True):
            with pytest.raises(CorruptJournalError) as info:
                _makeOne(tmp_path, readonly=readonly)
            assert (info.value.path, info.value.offset) == (seg, 0)
        assert _read(seg) == bytes(data)

    def test_damaged_header_of_middle_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        seg = j.segments()[2]
        data = bytearray(_read(seg))
        data[30] ^= 0x01  # first seq
        _write(seg, bytes(data))
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 30
            with pytest.raises(CorruptJournalError) as info:
                j.verify()
            assert (info.value.path, info.value.offset) == (seg, 0)
            with pytest.raises(CorruptJournalError):
                list(j.entries())
        finally:
            j.close()

    def _twins(self, tmp_path):
        """Two journals with the same segment names, different identities."""
        paths = []
        for name in ("a", "b"):
            j = _makeOne(tmp_path / name, segment_size=300)
            _fill(j, 30)
            j.close()
            paths.append(j.segments())
        assert [os.path.basename(p) for p in paths[0]] == [
            os.path.basename(p) for p in paths[1]]
        return paths

    def test_segment_from_another_journal(self, tmp_path):
        a, b = self._twins(tmp_path)
        shutil.copyfile(b[1], a[1])
        j = _makeOne(tmp_path / "a")
        try:
            assert j.last_seq == 30
            with pytest.raises(CorruptJournalError) as info:
                j.verify()
            assert (info.value.path, info.value.offset) == (a[1], 0)
            with pytest.raises(CorruptJournalError) as info:
                list(j.entries())
            assert info.value.path == a[1]
        finally:
            j.close()

    def test_last_segment_from_another_journal(self, tmp_path):
        a, b = self._twins(tmp_path)
        shutil.copyfile(b[-1], a[-1])
        before = _snapshot(tmp_path / "a", skip=(fmt.LOCK_NAME,))
        for readonly in (False, True):
            with pytest.raises(CorruptJournalError) as info:
                _makeOne(tmp_path / "a", readonly=readonly)
            assert info.value.path == a[-1]
        assert _snapshot(tmp_path / "a", skip=(fmt.LOCK_NAME,)) == before

    def test_deleted_middle_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        segs = j.segments()
        missing = fmt.parse_segment_name(os.path.basename(segs[2]))
        os.remove(segs[2])
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 30
            with pytest.raises(CorruptJournalError) as info:
                j.verify()
            assert info.value.seq == missing
        finally:
            j.close()
        r = _makeOne(tmp_path, readonly=True)
        with pytest.raises(CorruptJournalError):
            r.verify()

    def test_deleted_first_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        segs = j.segments()
        os.remove(segs[0])
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 30
            with pytest.raises(CorruptJournalError) as info:
                j.verify()
            assert info.value.seq == 1
            with pytest.raises(CorruptJournalError):
                list(j.entries())
        finally:
            j.close()

    def test_short_header_of_last_segment(self, tmp_path):
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        seg = j.segments()[-1]
        _write(seg, _read(seg)[:30])
        before = _snapshot(tmp_path, skip=(fmt.LOCK_NAME,))
        for readonly in (False, True):
            with pytest.raises(CorruptJournalError) as info:
                _makeOne(tmp_path, readonly=readonly)
            assert (info.value.path, info.value.offset) == (seg, 0)
        assert _snapshot(tmp_path, skip=(fmt.LOCK_NAME,)) == before

    def test_deleted_middle_segment_is_not_skipped_by_entries(self, tmp_path):
        # Replay reads entries(): silently jumping over the missing
        # records would rebuild a wrong database.
        j = _makeOne(tmp_path, segment_size=300)
        _fill(j, 30)
        j.close()
        segs = j.segments()
        os.remove(segs[2])
        j = _makeOne(tmp_path)
        try:
            got = []
            with pytest.raises(CorruptJournalError):
                for e in j.entries():
                    got.append(e.seq)
            assert got == list(range(1, len(got) + 1))
        finally:
            j.close()


# -- a refused open of a new journal ----------------------------------------

class TestRefusedNewJournal:
    """close_refused() takes a new, empty journal away again, but never
    what another writer committed to it."""

    def test_a_writer_opening_after_the_release_keeps_its_records(
            self, tmp_path, monkeypatch):
        path = tmp_path / "var" / "journal"
        refused = _makeOne(path)
        other = []
        release = FileJournal._release

        def release_then_another_process_opens(self):
            release(self)
            if self is refused and not other:
                # The window: the lock is free, the journal valid and empty.
                other.append(_makeOne(path))
                _fill(other[0], 3)
        monkeypatch.setattr(FileJournal, "_release",
                            release_then_another_process_opens)
        refused.close_refused()
        monkeypatch.undo()
        writer = other[0]
        _fill(writer, 1)
        writer.close()
        reader = _makeOne(path, readonly=True)
        assert [e.seq for e in reader.entries()] == [1, 2, 3, 4]
        assert os.path.exists(os.path.join(str(path), "journal.lock"))

    def test_no_other_writer_leaves_nothing_behind(self, tmp_path):
        path = tmp_path / "var" / "journal"
        _makeOne(path).close_refused()
        assert os.listdir(str(tmp_path)) == []

    def test_a_segment_with_bytes_on_disk_stays(self, tmp_path):
        # The decision is taken from the file, not from what this open
        # believes it wrote.
        donor = _makeOne(tmp_path / "donor")
        _fill(donor, 1)
        donor.close()
        record = _read(_segment(tmp_path / "donor"))[HEADER:]
        path = tmp_path / "j"
        refused = _makeOne(path)
        with open(_segment(path), "ab") as f:
            f.write(record)
        refused.close_refused()
        assert _read(_segment(path))[HEADER:] == record

    def test_a_lock_taken_on_an_unlinked_lock_file_is_taken_again(
            self, tmp_path, monkeypatch):
        # A process that opened the lock file just before a refused open
        # unlinked it locks a file without a name after the release; a
        # third process would create and lock a new one beside it.
        real = zjournal.journal.zc.lockfile.LockFile
        calls = []

        def lock_then_name_goes(lock_path, **kw):
            lock = real(lock_path, **kw)
            calls.append(lock_path)
            if len(calls) == 1:
                os.remove(lock_path)
            return lock
        monkeypatch.setattr(zjournal.journal.zc.lockfile, "LockFile",
                            lock_then_name_goes)
        j = _makeOne(tmp_path)
        monkeypatch.undo()
        try:
            assert len(calls) == 2
            assert zjournal.journal.writer_active(str(tmp_path))
            with pytest.raises(JournalLockedError):
                _makeOne(tmp_path)
        finally:
            j.close()


# -- locking -------------------------------------------------------------

class TestLocking:

    def test_second_writer_in_same_process(self, tmp_path):
        j = _makeOne(tmp_path)
        try:
            with pytest.raises(JournalLockedError) as info:
                _makeOne(tmp_path)
            assert str(os.getpid()) in str(info.value)
            assert str(os.getpid()) in info.value.holder
            # The failed attempt did not release the holder's lock.
            with pytest.raises(JournalLockedError):
                _makeOne(tmp_path)
            _fill(j, 1)
        finally:
            j.close()
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 1
            _fill(j, 1)
        finally:
            j.close()

    def test_failed_open_releases_lock(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 2)
        j.close()
        data = bytearray(_read(_segment(tmp_path)))
        data[HEADER + 40] ^= 1
        _write(_segment(tmp_path), bytes(data) + b"\xffgarbage")
        with pytest.raises(CorruptJournalError):
            _makeOne(tmp_path)
        _write(_segment(tmp_path), _read(_segment(tmp_path))[:HEADER])
        j = _makeOne(tmp_path)  # not JournalLockedError
        j.close()

    def test_subprocess_holder(self, tmp_path):
        path = tmp_path / "j"
        child = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(path), "hold", "1048576"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        try:
            line = child.stdout.readline().split()
            assert line and line[0] == b"ready", child.stderr.read()
            assert int(line[1]) == child.pid
            with pytest.raises(JournalLockedError) as info:
                _makeOne(path)
            assert str(child.pid) in str(info.value)
            assert zjournal.journal.writer_active(str(path)) is True
            r = _makeOne(path, readonly=True)
            assert r.last_seq == 1
            assert [(e.seq, e.payload) for e in r.entries()] == [
                (1, b"sub-1")]
            assert r.verify().records == 1
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            child.stdout.close()
            child.stderr.close()
            child.stdin.close()
        assert child.returncode == -signal.SIGKILL
        assert (path / fmt.LOCK_NAME).exists()
        assert zjournal.journal.writer_active(str(path)) is False
        j = _makeOne(path)
        try:
            assert j.last_seq == 1
            _fill(j, 1)
            assert _seqs(j) == [1, 2]
        finally:
            j.close()


# -- fail-stop -----------------------------------------------------------

class FaultyIO(FileIO):
    """A FileIO whose faults are armed by the test after opening."""

    def __init__(self):
        self.write_error = None   # an OSError to raise from write
        self.write_first = 0      # bytes really written before raising
        self.sync_errors = 0      # how many syncs fail with EIO
        self.truncate_error = None
        self.create_error = None
        self.syncs = 0

    def write(self, fd, data):
        if self.write_error is not None:
            if self.write_first:
                os.write(fd, bytes(data[:self.write_first]))
            raise self.write_error
        super().write(fd, data)

    def sync(self, fd):
        self.syncs += 1
        if self.sync_errors:
            self.sync_errors -= 1
            raise OSError(errno.EIO, "injected fsync failure")
        super().sync(fd)

    def truncate(self, fd, size):
        if self.truncate_error is not None:
            raise self.truncate_error
        super().truncate(fd, size)

    def create(self, path, data):
        if self.create_error is not None:
            _write(path, data[:10])
            raise self.create_error
        super().create(path, data)


class ShortWriteIO(FileIO):
    """Writes at most a few bytes per os.write call."""

    def __init__(self, piece=5):
        self.piece = piece
        self.calls = 0

    def write(self, fd, data):
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:self.piece])
            self.calls += 1
            view = view[n:]


class TestFailStop:

    def _open(self, path, io, **kw):
        j = _makeOne(path, io=io, **kw)
        _fill(j, 3)
        return j, _segment(path), _read(_segment(path))

    @pytest.mark.parametrize("written", [0, 1, 29, 30, 40])
    def test_write_error(self, tmp_path, written):
        io = FaultyIO()
        j, seg, before = self._open(tmp_path, io)
        io.write_error = OSError(errno.ENOSPC, "No space left on device")
        io.write_first = written
        with pytest.raises(JournalWriteError) as info:
            j.append(_items(4, 2))
        assert info.value.__cause__ is io.write_error
        assert _read(seg) == before
        assert j.last_seq == 3
        io.write_error = None
        with pytest.raises(JournalFailedError):
            j.append(_items(4))
        with pytest.raises(JournalFailedError):
            j.append(_items(5))
        assert _read(seg) == before
        j.close()
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 3
            assert j.torn_tail is None
            j.append([(4, 9.0, 0, "after", b"reopen")])
            assert [(e.seq, e.command_name) for e in j.entries(3)] == [
                (3, "tests.put"), (4, "after")]
            assert j.verify().records == 4
        finally:
            j.close()

    def test_write_error_and_failed_cut_back(self, tmp_path):
        io = FaultyIO()
        j, seg, before = self._open(tmp_path, io)
        io.write_error = OSError(errno.EIO, "I/O error")
        io.write_first = 20
        io.truncate_error = OSError(errno.EIO, "I/O error")
        with pytest.raises(JournalWriteError):
            j.append(_items(4))
        with pytest.raises(JournalFailedError):
            j.append(_items(4))
        j.close()
        # The half record is still there; reopening cuts it.
        assert _read(seg)[:len(before)] == before
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 3
            assert _read(seg) == before
            assert _read(j.torn_tail.saved_as) == _encoded(
                _items(4), _head(before[HEADER:]))[:20]
            _fill(j, 1)
            assert _seqs(j) == [1, 2, 3, 4]
        finally:
            j.close()

    def test_fsync_error_outcome_unknown(self, tmp_path):
        io = FaultyIO()
        j, seg, before = self._open(tmp_path, io, fsync="always")
        io.sync_errors = 1
        with pytest.raises(OutcomeUnknownError) as info:
            j.append([(4, 4.0, 0, "doubtful", b"written")])
        assert info.value.__cause__.errno == errno.EIO
        assert io.sync_errors == 0
        with pytest.raises(JournalFailedError):
            j.append([(4, 4.0, 0, "retry", b"")])
        with pytest.raises(JournalFailedError):
            j.append([(5, 5.0, 0, "next", b"")])
        j.close()
        # The record was written: the journal holds it, so it is committed.
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 4
            (e,) = j.entries(4)
            assert (e.command_name, e.payload) == ("doubtful", b"written")
            _fill(j, 1)
            assert _seqs(j) == [1, 2, 3, 4, 5]
        finally:
            j.close()

    def test_fsync_always_syncs_each_append(self, tmp_path):
        io = FaultyIO()
        j = _makeOne(tmp_path, io=io, fsync="always")
        io.syncs = 0
        _fill(j, 3)
        assert io.syncs == 3
        j.close()
        io = FaultyIO()
        j = _makeOne(tmp_path, io=io, fsync="never")
        io.syncs = 0
        _fill(j, 3)
        assert io.syncs == 0
        j.close()

    def test_short_writes_via_fileio_override(self, tmp_path):
        io = ShortWriteIO(piece=5)
        j = _makeOne(tmp_path, io=io, fsync="always")
        _fill(j, 4)
        j.append(_items(5, 3))
        j.close()
        assert io.calls > 50
        j = _makeOne(tmp_path)
        try:
            assert j.torn_tail is None
            assert _seqs(j) == list(range(1, 8))
            assert j.verify().records == 7
        finally:
            j.close()

    def test_short_writes_of_os_write(self, tmp_path, monkeypatch):
        # The production write loop, with an os.write that writes at most
        # 3 bytes per call.
        calls = []

        class ShortOs:
            def __getattr__(self, name):
                return getattr(os, name)

            def write(self, fd, data):
                calls.append(len(data))
                return os.write(fd, bytes(data[:3]))

        j = _makeOne(tmp_path)
        monkeypatch.setattr(zjournal.journal, "os", ShortOs())
        _fill(j, 3)
        j.append(_items(4, 2))
        monkeypatch.undo()
        j.close()
        assert len(calls) > 50
        j = _makeOne(tmp_path)
        try:
            assert j.torn_tail is None
            assert [(e.seq, e.payload) for e in j.entries()] == [
                (s, _payload(s)) for s in range(1, 6)]
        finally:
            j.close()

    def test_write_returning_zero_fails_stop(self, tmp_path, monkeypatch):
        class StuckOs:
            def __getattr__(self, name):
                return getattr(os, name)

            def write(self, fd, data):
                return 0

        j = _makeOne(tmp_path)
        _fill(j, 1)
        before = _read(_segment(tmp_path))
        monkeypatch.setattr(zjournal.journal, "os", StuckOs())
        with pytest.raises(JournalWriteError):
            j.append(_items(2))
        monkeypatch.undo()
        with pytest.raises(JournalFailedError):
            j.append(_items(2))
        j.close()
        assert _read(_segment(tmp_path)) == before

    def test_error_creating_new_segment(self, tmp_path):
        io = FaultyIO()
        j = _makeOne(tmp_path, io=io, segment_size=200)
        _fill(j, 4)
        while len(j.segments()) < 2 or os.path.getsize(
                j.segments()[-1]) < 200:
            _fill(j, 1)
        last = j.last_seq
        snap = _snapshot(tmp_path, skip=(fmt.LOCK_NAME,))
        io.create_error = OSError(errno.ENOSPC, "No space left on device")
        with pytest.raises(JournalWriteError):
            j.append(_items(last + 1))
        io.create_error = None
        with pytest.raises(JournalFailedError):
            j.append(_items(last + 1))
        j.close()
        # Only the half-made temporary file was added.
        now = _snapshot(tmp_path, skip=(fmt.LOCK_NAME,))
        assert {k: v for k, v in now.items() if not k.endswith(".tmp")} == (
            snap)
        j = _makeOne(tmp_path, segment_size=200)
        try:
            assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            assert j.last_seq == last
            _fill(j, 1)
            assert j.segments()[-1] == _segment(tmp_path, last + 1)
            assert j.verify().records == last + 1
        finally:
            j.close()

    def test_error_syncing_directory_during_roll(self, tmp_path):
        class DirSyncFails(FileIO):
            armed = False

            def sync_dir(self, path):
                if self.armed:
                    raise OSError(errno.EIO, "injected")
                super().sync_dir(path)

        io = DirSyncFails()
        j = _makeOne(tmp_path, io=io, segment_size=100)
        _fill(j, 2)
        io.armed = True
        with pytest.raises(JournalWriteError):
            j.append(_items(3))
        with pytest.raises(JournalFailedError):
            j.append(_items(3))
        j.close()
        j = _makeOne(tmp_path, segment_size=100)
        try:
            assert j.last_seq == 2
            _fill(j, 2)
            assert j.verify().records == 4
        finally:
            j.close()


# -- kill points ---------------------------------------------------------

class TestKillPoints:

    def test_append_after_write(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 3)
        j.close()
        proc = _run(tmp_path, "append", 1, 3, kill_at="append.after-write")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert proc.stdout == b""
        j = _makeOne(tmp_path)
        try:
            # The process died after its write: the kernel has the bytes,
            # so the whole transaction is there (never half of it).
            assert j.torn_tail is None
            assert j.last_seq == 6
            assert [e.payload for e in j.entries(4)] == [
                b"sub-4", b"sub-5", b"sub-6"]
            _fill(j, 1)
            assert j.verify().records == 7
        finally:
            j.close()

    def test_roll_after_create(self, tmp_path):
        proc = _run(tmp_path, "append", 50, 1, kill_at="roll.after-create",
                    segment_size=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        acknowledged = [int(x) for x in proc.stdout.split()]
        assert acknowledged == list(range(1, len(acknowledged) + 1))
        last = acknowledged[-1]
        names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".zjl"))
        assert names == [FIRST, fmt.segment_name(last + 1)]
        assert os.path.getsize(_segment(tmp_path, last + 1)) == HEADER
        j = _makeOne(tmp_path, segment_size=300)
        try:
            assert j.last_seq == last
            assert j.torn_tail is None
            _fill(j, 2)
            report = j.verify()
            assert (report.segments, report.records) == (2, last + 2)
            assert _seqs(j, last) == [last, last + 1, last + 2]
        finally:
            j.close()
        assert len(_records(_read(_segment(tmp_path, last + 1)))) == 2

    def test_repair_after_save(self, tmp_path):
        j = _makeOne(tmp_path)
        _fill(j, 3)
        j.close()
        seg = _segment(tmp_path)
        good = _read(seg)
        torn = _encoded(_items(4, 2))[:-7]
        _append_bytes(seg, torn)
        proc = _run(tmp_path, "open", kill_at="repair.after-save")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        saved = seg + ".torn-%d" % len(good)
        # Died between keeping the bytes and cutting them.
        assert _read(saved) == torn
        assert _read(seg) == good + torn
        j = _makeOne(tmp_path)
        try:
            assert j.last_seq == 3
            assert _read(seg) == good
            assert j.torn_tail.saved_as == saved
            assert _read(saved) == torn
            _fill(j, 1)
            assert j.verify().records == 4
        finally:
            j.close()

    def test_subprocess_without_kill_point_completes(self, tmp_path):
        # The script itself works: the kill tests die because of the point.
        proc = _run(tmp_path, "append", 2, 2)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [b"2", b"4", b"done"]


def test_a_directory_removed_by_a_refused_open_is_made_again(tmp_path,
                                                             monkeypatch):
    # Another process's refused open of the same new journal removes the
    # directories it created, after releasing the lock, just as this one
    # found them there and was about to lock.
    path = str(tmp_path / "var" / "journal")
    refused = FileJournal(path)
    real = FileJournal._make_dirs

    def make_dirs_then_interleave(self, p):
        made = real(self, p)
        if p == path and not refused.closed:
            refused.close_refused()
        return made

    monkeypatch.setattr(FileJournal, "_make_dirs", make_dirs_then_interleave)
    journal = FileJournal(path)
    try:
        assert journal.last_seq == 0
        assert os.path.exists(os.path.join(path, "journal.lock"))
    finally:
        journal.close()
    with FileJournal(path, readonly=True) as reader:
        assert reader.identity == journal.identity


def test_a_parent_removed_before_the_journal_directory_is_made(tmp_path,
                                                               monkeypatch):
    # Another process's refused open removes var/ (which it made) after
    # this open found var/ there and before it creates var/journal.
    parent = str(tmp_path / "var")
    path = os.path.join(parent, "journal")
    os.mkdir(parent)
    real = FileJournal._make_dirs
    removed = []

    def make_dirs(self, p):
        made = real(self, p)
        if p == parent and not removed:
            removed.append(p)
            os.rmdir(parent)
        return made

    monkeypatch.setattr(FileJournal, "_make_dirs", make_dirs)
    journal = FileJournal(path)
    try:
        assert removed and journal.last_seq == 0
        # It made var/ itself on the second attempt: a refusal would take
        # both away again.
        assert journal._made_dir == [parent, path]
    finally:
        journal.close_refused()
    assert not os.path.exists(parent)


def test_directories_an_earlier_attempt_made_are_remembered(tmp_path,
                                                            monkeypatch):
    # This open makes var/ and var/journal; another process removes
    # var/journal before the lock is taken; the retry makes var/journal
    # again, and still owns var/.
    parent = str(tmp_path / "var")
    path = os.path.join(parent, "journal")
    real = FileJournal._make_dirs
    removed = []

    def make_dirs(self, p):
        made = real(self, p)
        if p == path and not removed:
            removed.append(p)
            os.rmdir(path)
        return made

    monkeypatch.setattr(FileJournal, "_make_dirs", make_dirs)
    journal = FileJournal(path)
    try:
        assert removed
        assert journal._made_dir == [parent, path]
    finally:
        journal.close_refused()
    assert not os.path.exists(parent)
