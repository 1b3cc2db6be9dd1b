"""Durability sweeps: damage a journal in every way a place allows, kill
recovery at every step, and read beside a writer.

What the other test modules already cover is not repeated here (single
bit flips, a deleted segment, cuts from the header on in a later segment,
the kill points of the commit protocol, a stale lock of a killed holder).
This module adds:

1. whole-record surgery -- a record deleted, duplicated, or swapped with
   its predecessor -- in the middle of a segment, at the end of a segment
   that is not the last, and at the end of the last segment;
2. segment surgery -- a segment that is not the last truncated at every
   offset, a segment replaced by one of another journal (first, middle,
   last), an empty segment with a future first seq, a renamed segment;
3. a sweep of every cut of the last segment after a roll, from offset 0
   (inside its header) to its end, over multi-record transactions;
4. recovery killed at every step: at ``repair.after-save`` and
   ``replay.after-commit`` with ZJOURNAL_KILL_COUNT = 1, 2, ... until the
   process survives, for a catch-up and for a rebuild, and inside a batch
   before it commits (also the first batch of a rebuild);
5. read-only readers and the CLI (``info``, ``verify``, ``dump``) in a
   loop beside a subprocess that appends for two seconds.

The rule the surgery tests hold the journal to (DESIGN.md, section 5): a
torn tail -- bytes cut short, or an invalid record with nothing valid
after it -- may be cut (and kept aside); anything else is a
CorruptJournalError naming the file, the offset and the expected seq, and
no file changes.  A complete record whose checksum holds but whose seq is
wrong is not the trace of an interrupted write, so it is never a torn
tail.  A journal may decline to read everything at open (opening seeks to
the tail), so a writer or reader open may either refuse with that error,
or open with the journal's true last seq -- and then ``verify()`` and
``entries()`` must raise it.
"""
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr
from contextlib import redirect_stdout

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import cli
from zjournal import codec
from zjournal import format as fmt
from zjournal.errors import CorruptJournalError
from zjournal.journal import FileIO
from zjournal.journal import FileJournal
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker
from zjournal.recovery import replay
from zjournal.tests import sweepworker
from zjournal.tests.crashworker import open_jdb
from zjournal.tests.crashworker import plan
from zjournal.tests.crashworker import run_plan
from zjournal.tests.examples import Put
from zjournal.tests.examples import state

HEADER = fmt.SEGMENT_HEADER_SIZE


# -- helpers ------------------------------------------------------------------

def _read(path):
    with open(str(path), "rb") as f:
        return f.read()


def _write(path, data):
    with open(str(path), "wb") as f:
        f.write(data)


def _snapshot(directory):
    """sha256 of every file in ``directory`` but the writer lock."""
    return {name: hashlib.sha256(_read(os.path.join(str(directory), name)))
            .hexdigest()
            for name in sorted(os.listdir(str(directory)))
            if name != fmt.LOCK_NAME}


def _records(data):
    """(offset, size, seq, flags) of every record of a segment's bytes."""
    out = []
    pos = HEADER
    while pos < len(data):
        size = fmt.check_record(data, pos)
        seq = struct.unpack_from(">Q", data, pos + 8)[0]
        out.append((pos, size, seq, data[pos + fmt.FLAGS_OFFSET]))
        pos += size
    assert pos == len(data)
    return out


class _NoSyncIO(FileIO):
    """Real writes without fsync: sweeps open a journal hundreds of times."""

    def sync(self, fd):
        pass

    def sync_dir(self, path):
        pass


def _where(error):
    return error.path, error.offset, error.seq


def _payload(seq):
    # Record sizes differ, so a record never fits exactly where another was.
    return b"payload-%d|" % seq + bytes(seq % 7)


def _item(seq):
    return (seq, 1700000000.0 + seq * 0.25, 0, "tests.put", _payload(seq))


def _build(path, sizes, segment_size=380):
    """A journal of transactions of ``sizes`` records; its segment paths."""
    j = FileJournal(str(path), fsync="never", segment_size=segment_size)
    try:
        for size in sizes:
            first = j.last_seq + 1
            j.append([_item(s) for s in range(first, first + size)])
        return j.segments()
    finally:
        j.close()


def _cli(*argv):
    """Run the CLI in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def _same_place(error, expected, header_seq=None):
    """Whether ``error`` names ``expected`` = (file, offset, seq).

    A damaged header is named with offset 0 and, for want of a record,
    either no seq or the segment's first seq (``header_seq``).
    """
    if expected[2] is None:
        return (error.path, error.offset) == expected[:2] and (
            error.seq in (None, header_seq))
    return _where(error) == expected


def _check_damage_found(path, expected, true_last, readonly,
                        header_seq=None):
    """Open; the damage ``expected`` = (file, offset, seq) must be reported.

    Either the open refuses with exactly that error, or it opens with the
    journal's true last seq and both ``verify()`` and ``entries()`` raise
    it (``entries()`` having yielded every seq before it).  Returns
    "refused" or "opened".
    """
    try:
        j = FileJournal(str(path), fsync="never", readonly=readonly)
    except CorruptJournalError as e:
        assert _same_place(e, expected, header_seq), (_where(e), expected)
        return "refused"
    try:
        assert j.last_seq == true_last, (
            "opened at seq %d, but the journal holds seq %d (torn tail: %r)"
            % (j.last_seq, true_last, j.torn_tail))
        for scan in ("verify", "entries"):
            got = []
            with pytest.raises(CorruptJournalError) as info:
                if scan == "verify":
                    j.verify()
                else:
                    for entry in j.entries():
                        got.append(entry.seq)
            assert _same_place(info.value, expected, header_seq), (
                scan, _where(info.value), expected)
        assert got == list(range(1, expected[2] or header_seq))
    finally:
        j.close()
    return "opened"


def _check_cli_reports(path, expected):
    """``zodb-journal verify`` fails, naming the place (whether the
    journal refused to open, or verify found the damage)."""
    status, out, err = _cli("verify", path)
    assert status == 1, out + err
    assert "corrupt journal: %s at offset %d (expected seq %d)" % (
        expected) in out + err, out + err


# -- 1. whole-record surgery --------------------------------------------------

# 30 single-record transactions in six segments of five records.
SURGERY_RECORDS = 30

# position -> (segment index, record index in that segment)
POSITIONS = {
    "middle-of-a-middle-segment": (2, 2),
    "end-of-a-middle-segment": (2, -1),
    "middle-of-the-last-segment": (-1, 2),
    "before-last-of-the-last-segment": (-1, -2),
    "last-of-the-last-segment": (-1, -1),
}
OPERATIONS = ("delete", "duplicate", "swap-with-previous")


def _operate(data, recs, i, operation):
    off, size = recs[i][:2]
    record = data[off:off + size]
    if operation == "delete":
        return data[:off] + data[off + size:]
    if operation == "duplicate":
        return data[:off + size] + record + data[off + size:]
    poff, psize = recs[i - 1][:2]
    assert poff + psize == off
    return data[:poff] + record + data[poff:off] + data[off + size:]


def _expected_damage(segs, s, recs, i, operation):
    """Where a scan from seq 1 first finds the damage, or None."""
    path = segs[s]
    off, size, seq, _ = recs[i]
    last_in_segment = i == len(recs) - 1
    if operation == "delete":
        if not last_in_segment:
            return path, off, seq
        if s == len(segs) - 1:
            return None  # a shorter, intact journal
        # The next segment starts one seq too late.
        return segs[s + 1], 0, seq
    if operation == "duplicate":
        return path, off + size, seq + 1
    poff, _, pseq, _ = recs[i - 1]
    return path, poff, pseq


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_whole_record_surgery(tmp_path, position, operation):
    segs = _build(tmp_path, [1] * SURGERY_RECORDS)
    assert len(segs) == 6
    s, i = POSITIONS[position]
    s = s % len(segs)
    data = _read(segs[s])
    recs = _records(data)
    assert len(recs) == 5
    i = i % len(recs)
    _write(segs[s], _operate(data, recs, i, operation))
    expected = _expected_damage(segs, s, recs, i, operation)
    before = _snapshot(tmp_path)

    if expected is None:
        # The last record of the journal is gone: what is left is a valid
        # journal one record shorter; only the ZODB marker can tell
        # (test_crash checks that it refuses).
        for readonly in (True, False):
            with FileJournal(str(tmp_path), readonly=readonly) as j:
                assert j.last_seq == SURGERY_RECORDS - 1
                assert j.torn_tail is None
                assert j.verify().records == SURGERY_RECORDS - 1
                assert [e.seq for e in j.entries()] == list(
                    range(1, SURGERY_RECORDS))
        assert _cli("verify", tmp_path)[0] == 0
    else:
        for readonly in (False, True):
            _check_damage_found(tmp_path, expected, SURGERY_RECORDS,
                                readonly)
            assert _snapshot(tmp_path) == before
        _check_cli_reports(tmp_path, expected)
    assert _snapshot(tmp_path) == before


def _delete_before_last(segs):
    """Delete the second-to-last record; return (its offset, its seq)."""
    data = _read(segs[-1])
    recs = _records(data)
    off, size, seq, _ = recs[-2]
    _write(segs[-1], data[:off] + data[off + size:])
    return off, seq


def test_misplaced_record_before_a_torn_tail_is_not_cut(tmp_path):
    """``..., 28, 30, <torn bytes>``: record 30 is whole and acknowledged.

    The torn bytes send the open to scan the segment; the scan must see
    record 30 as misplaced (corruption), not as part of the torn tail.
    """
    segs = _build(tmp_path, [1] * SURGERY_RECORDS)
    off, seq = _delete_before_last(segs)
    with open(segs[-1], "ab") as f:
        f.write(fmt.encode_record(SURGERY_RECORDS + 1, 1.0, fmt.FLAG_END, 0,
                                  b"tests.put", b"torn")[:-6])
    before = _snapshot(tmp_path)
    for readonly in (False, True):
        with pytest.raises(CorruptJournalError) as info:
            FileJournal(str(tmp_path), fsync="never", readonly=readonly,
                        io=_NoSyncIO()).close()
        assert _where(info.value) == (segs[-1], off, seq)
        assert _snapshot(tmp_path) == before


def test_rebuild_does_not_stop_quietly_at_a_misplaced_record(tmp_path):
    """``zodb-journal rebuild`` reads the journal read-only: a reader that
    takes ``..., 28, 30`` for a write in progress rebuilds 28 commands of
    30 and reports success."""
    jdir = tmp_path / "journal"
    j = FileJournal(str(jdir), fsync="never", segment_size=380)
    try:
        for seq in range(1, SURGERY_RECORDS + 1):
            j.append([(seq, 1700000000.0 + seq, Put.command_version,
                       Put.command_name,
                       codec.dumps({"key": "k%d" % seq, "value": seq}))])
        segs = j.segments()
    finally:
        j.close()
    off, seq = _delete_before_last(segs)
    target = tmp_path / "Data.fs"
    status, out, err = _cli("rebuild", jdir, "--zodb", target, "--import",
                            "zjournal.tests.examples")
    assert status == 1, out
    assert "corrupt journal: %s at offset %d (expected seq %d)" % (
        segs[-1], off, seq) in err, err
    assert not target.exists()


# -- 2. segment surgery -------------------------------------------------------

def test_middle_segment_truncated_at_every_offset(tmp_path):
    segs = _build(tmp_path, [1] * SURGERY_RECORDS)
    seg = segs[2]
    first = fmt.parse_segment_name(os.path.basename(seg))
    original = _read(seg)
    recs = _records(original)
    ends = {off + size: seq for off, size, seq, _ in recs}
    ends[HEADER] = first - 1
    swept = 0
    for cut in range(len(original)):
        _write(seg, original[:cut])
        before = _snapshot(tmp_path)
        if cut < HEADER:
            expected = (seg, 0, None)
        elif cut in ends:
            # Whole records are missing: the next segment does not follow.
            expected = (segs[3], 0, ends[cut] + 1)
        else:
            off, _, seq, _ = max(r for r in recs if r[0] < cut)
            expected = (seg, off, seq)
        for readonly in (True, False):
            try:
                _check_damage_found(tmp_path, expected, SURGERY_RECORDS,
                                    readonly, header_seq=first)
            except AssertionError as e:
                raise AssertionError("cut at %d: %s" % (cut, e)) from e
        assert _snapshot(tmp_path) == before, cut
        swept += 1
    assert swept == len(original)


def _twins(tmp_path):
    """Two journals alike in every segment name, of different identity."""
    a = _build(tmp_path / "a", [1] * SURGERY_RECORDS)
    b = _build(tmp_path / "b", [1] * SURGERY_RECORDS)
    assert [os.path.basename(p) for p in a] == [
        os.path.basename(p) for p in b]
    return a, b


@pytest.mark.parametrize("index", [0, 2, -1], ids=["first", "middle", "last"])
def test_segment_of_another_journal(tmp_path, index):
    a, b = _twins(tmp_path)
    shutil.copyfile(b[index], a[index])
    foreign = a[index]
    before = _snapshot(tmp_path / "a")
    for readonly in (True, False):
        try:
            j = FileJournal(str(tmp_path / "a"), fsync="never",
                            readonly=readonly)
        except CorruptJournalError as e:
            error = e
        else:
            try:
                assert j.last_seq == SURGERY_RECORDS
                with pytest.raises(CorruptJournalError) as info:
                    j.verify()
                error = info.value
                with pytest.raises(CorruptJournalError):
                    list(j.entries())
            finally:
                j.close()
        assert error.offset == 0
        # The operator must be told which file to look at: the foreign
        # one (or at least both that disagree).
        assert os.path.basename(foreign) in str(error), str(error)
        assert _snapshot(tmp_path / "a") == before


def test_empty_segment_with_a_future_first_seq(tmp_path):
    segs = _build(tmp_path, [1] * SURGERY_RECORDS)
    with FileJournal(str(tmp_path), readonly=True) as j:
        identity = j.identity_bytes
    future = os.path.join(str(tmp_path),
                          fmt.segment_name(SURGERY_RECORDS + 5))
    _write(future, fmt.encode_header(identity, SURGERY_RECORDS + 5,
                                     time.time()))
    before = _snapshot(tmp_path)
    expected = (future, 0, SURGERY_RECORDS + 1)
    # A writer that opened would append seq 31 into a segment named 35
    # (or, trusting the name, seq 35 after a gap): it must refuse.
    with pytest.raises(CorruptJournalError) as info:
        FileJournal(str(tmp_path), fsync="never").close()
    assert _where(info.value) == expected
    _check_damage_found(tmp_path, expected, SURGERY_RECORDS, readonly=True)
    _check_cli_reports(tmp_path, expected)
    assert _snapshot(tmp_path) == before
    assert len(segs) + 1 == len(before)


@pytest.mark.parametrize("shift", [2, -1])
@pytest.mark.parametrize("index", [0, 2, -1], ids=["first", "middle", "last"])
def test_segment_renamed_to_a_wrong_first_seq(tmp_path, index, shift):
    segs = _build(tmp_path, [1] * SURGERY_RECORDS)
    first = fmt.parse_segment_name(os.path.basename(segs[index]))
    renamed = os.path.join(str(tmp_path), fmt.segment_name(first + shift))
    assert not os.path.exists(renamed)
    os.rename(segs[index], renamed)
    before = _snapshot(tmp_path)
    for readonly in (True, False):
        try:
            j = FileJournal(str(tmp_path), fsync="never", readonly=readonly)
        except CorruptJournalError as e:
            error = e
        else:
            try:
                assert index == 2, "opened although the first or last" \
                    " segment's name disagrees with its header"
                assert j.last_seq == SURGERY_RECORDS
                with pytest.raises(CorruptJournalError) as info:
                    j.verify()
                error = info.value
                with pytest.raises(CorruptJournalError) as info:
                    list(j.entries())
                assert _where(info.value) == _where(error)
            finally:
                j.close()
        assert (error.path, error.offset) == (renamed, 0)
        assert error.seq is not None
        assert _snapshot(tmp_path) == before


# -- 3. every cut of the last segment after a roll ----------------------------

def test_every_cut_of_the_last_segment_after_a_roll(tmp_path):
    # Transactions of 1 to 4 records, until the third segment is full.
    cycle = [1, 3, 1, 2, 4, 2]
    sizes = []
    j = FileJournal(str(tmp_path), fsync="never", segment_size=400)
    try:
        while not (len(j.segments()) >= 3
                   and os.path.getsize(j.segments()[-1]) >= 400):
            size = cycle[len(sizes) % len(cycle)]
            sizes.append(size)
            first = j.last_seq + 1
            j.append([_item(s) for s in range(first, first + size)])
        segs = j.segments()
    finally:
        j.close()
    assert len(segs) == 3
    last = segs[-1]
    first = fmt.parse_segment_name(os.path.basename(last))
    total = sum(sizes)
    original = _read(last)
    recs = _records(original)
    assert recs[0][2] == first and recs[-1][2] == total
    # (end offset, last seq) of every complete transaction in the segment.
    boundaries = [(HEADER, first - 1)] + [
        (off + size, seq) for off, size, seq, flags in recs
        if flags & fmt.FLAG_END]
    assert any(not flags & fmt.FLAG_END for _, _, _, flags in recs)
    assert len(boundaries) >= 3
    others = {p: hashlib.sha256(_read(p)).hexdigest() for p in segs[:-1]}

    def reset(cut):
        _write(last, original[:cut])
        for name in os.listdir(str(tmp_path)):
            if fmt.TORN_SUFFIX in name:
                os.remove(os.path.join(str(tmp_path), name))

    torn_seen = 0
    for cut in range(len(original) + 1):
        reset(cut)
        before = _snapshot(tmp_path)
        if cut < HEADER:
            # Segments are created under a temporary name and renamed, so
            # a short header is damage, not a crash: refused, named.
            for readonly in (True, False):
                with pytest.raises(CorruptJournalError) as info:
                    FileJournal(str(tmp_path), readonly=readonly)
                assert (info.value.path, info.value.offset) == (last, 0), cut
            if cut % 8 == 0:  # the CLI, on a sample (its parser is slow)
                assert _cli("verify", tmp_path)[0] == 1
            assert _snapshot(tmp_path) == before, cut
            continue
        boundary, good = max(b for b in boundaries if b[0] <= cut)
        # A reader reports the tail and changes nothing.
        with FileJournal(str(tmp_path), readonly=True) as r:
            assert r.last_seq == good, cut
            if cut == boundary:
                assert r.torn_tail is None, cut
            else:
                assert (r.torn_tail.path, r.torn_tail.offset,
                        r.torn_tail.size) == (last, boundary, cut - boundary)
            assert [e.seq for e in r.entries()] == list(range(1, good + 1))
            assert r.verify().records == good, cut
        if cut % 8 == 0 or cut == boundary:
            status, out, _ = _cli("verify", tmp_path)
            assert status == (0 if cut == boundary else 1), (cut, out)
        assert _snapshot(tmp_path) == before, cut
        # A writer cuts it back to the last transaction, keeps the bytes,
        # and writes the same next transaction to the same bytes.
        j = FileJournal(str(tmp_path), fsync="never", segment_size=400,
                        io=_NoSyncIO())
        try:
            assert j.last_seq == good, cut
            assert _read(last) == original[:boundary], cut
            if cut == boundary:
                assert j.torn_tail is None
            else:
                torn_seen += 1
                assert _read(j.torn_tail.saved_as) == original[boundary:cut]
            if good < total:
                # The transaction that followed: the same items.
                end, end_seq = min(b for b in boundaries if b[0] > boundary)
                j.append([_item(s) for s in range(good + 1, end_seq + 1)])
                assert _read(last) == original[:end], cut
            assert j.segments() == segs
            assert j.verify().records == j.last_seq
        finally:
            j.close()
        assert {p: hashlib.sha256(_read(p)).hexdigest()
                for p in segs[:-1]} == others, cut
    assert torn_seen == len(original) + 1 - HEADER - len(boundaries)


# -- 4. recovery killed at every step -----------------------------------------

RECOVERY_STEPS = 20          # the crash workload: 28 commands
BEHIND_STEPS = 10            # the ZODB of the catch-up site stops here
BATCH = 3
RECOVERY_SEGMENT_SIZE = 500


def _spawn(args, kill_at=None, count=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZJOURNAL_KILL_AT", "ZJOURNAL_KILL_COUNT")}
    if kill_at is not None:
        env["ZJOURNAL_KILL_AT"] = kill_at
        env["ZJOURNAL_KILL_COUNT"] = str(count)
    return subprocess.run([sys.executable, "-m"] + args, env=env,
                          capture_output=True, timeout=60)


def _open_worker(root, kill_at=None, count=None):
    return _spawn(["zjournal.tests.crashworker", "open", str(root),
                   "--batch-size", str(BATCH)], kill_at, count)


def _plain_view(root):
    """(state, marker seq or None, root keys) of Data.fs, without zjournal."""
    data_fs = os.path.join(str(root), "Data.fs")
    db = ZODB.DB(ZODB.FileStorage.FileStorage(data_fs, read_only=True))
    try:
        conn = db.open()
        r = conn.root()
        marker = r.get(MARKER_KEY)
        result = (state(r), None if marker is None else marker.last_seq,
                  sorted(r.keys()))
        conn.close()
        return result
    finally:
        db.close()


def _replayed(entries, journal_id, n):
    """The state after the first ``n`` entries, replayed into memory."""
    db = ZODB.DB(None)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()[MARKER_KEY] = Marker(journal_id, 0)
        replay(tm, conn, entries[:n], batch_size=1000)
        result = state(conn.root())
        tm.abort()
        conn.close()
        return result
    finally:
        db.close()


def _jdb_view(root):
    """Recover in-process; (action, state, marker seq, marker journal)."""
    with open_jdb(str(root), batch_size=BATCH) as jdb:
        tm = transaction.TransactionManager()
        conn = jdb.open(transaction_manager=tm)
        try:
            marker = conn.root()[MARKER_KEY]
            return (jdb.recovery.action, state(conn.root()),
                    marker.last_seq, marker.journal_id)
        finally:
            tm.abort()
            conn.close()


@pytest.fixture(scope="module")
def recovery_sites(tmp_path_factory):
    """Two sites that need recovery, and what recovery makes of them.

    Both have a torn tail (a cut-short record after the last transaction).
    "catch-up": the ZODB applied the first BEHIND_STEPS steps' commands.
    "rebuild": no ZODB at all.
    """
    base = tmp_path_factory.mktemp("recovery")
    site = base / "build"
    steps = plan(RECOVERY_STEPS)
    with open_jdb(str(site), segment_size=RECOVERY_SEGMENT_SIZE,
                  fsync="never") as jdb:
        run_plan(jdb, steps[:BEHIND_STEPS])
        behind = jdb.journal.last_seq
    shutil.copyfile(site / "Data.fs", base / "Data.fs.behind")
    with open_jdb(str(site), segment_size=RECOVERY_SEGMENT_SIZE,
                  fsync="never") as jdb:
        run_plan(jdb, steps[BEHIND_STEPS:])
        total = jdb.journal.last_seq
        segments = jdb.journal.segments()
        entries = list(jdb.journal.entries())
        journal_id = jdb.journal.identity
    assert len(segments) >= 3
    torn = fmt.encode_record(total + 1, time.time(), fmt.FLAG_END, 0,
                             b"tests.put", b"never acknowledged")[:-9]
    with open(segments[-1], "ab") as f:
        f.write(torn)

    sites = {}
    for kind in ("catch-up", "rebuild"):
        root = base / kind
        os.makedirs(str(root))
        shutil.copytree(str(site / "journal"), str(root / "journal"))
        if kind == "catch-up":
            shutil.copyfile(base / "Data.fs.behind", root / "Data.fs")
        ref = base / (kind + "-reference")
        shutil.copytree(str(root), str(ref))
        view = _jdb_view(ref)
        assert view[0] == ("caught up" if kind == "catch-up" else "rebuilt")
        assert view[2:] == (total, journal_id)
        sites[kind] = {
            "root": root, "start": behind if kind == "catch-up" else 0,
            "view": view[1:], "journal": _snapshot(ref / "journal"),
        }
    assert view[1] == _replayed(entries, journal_id, total)
    return {"sites": sites, "total": total, "entries": entries,
            "journal_id": journal_id, "torn": torn,
            "segment": os.path.basename(segments[-1])}


def _copy_site(site, target):
    shutil.copytree(str(site["root"]), str(target))
    return target


def _check_converges(recovery_sites, kind, root, action):
    """Recovery, run again, finishes the job exactly as if never killed."""
    site = recovery_sites["sites"][kind]
    got_action, st, marker, journal_id = _jdb_view(root)
    assert got_action == action
    assert (st, marker, journal_id) == site["view"]
    assert _snapshot(os.path.join(str(root), "journal")) == site["journal"]


@pytest.mark.parametrize("kind", ["catch-up", "rebuild"])
@pytest.mark.parametrize("point", ["repair.after-save", "replay.after-commit"])
def test_recovery_killed_at_every_step_converges(
        recovery_sites, tmp_path, kind, point):
    site = recovery_sites["sites"][kind]
    total = recovery_sites["total"]
    entries = recovery_sites["entries"]
    journal_id = recovery_sites["journal_id"]
    start = site["start"]
    pristine_zodb = (_read(os.path.join(str(site["root"]), "Data.fs"))
                     if kind == "catch-up" else None)
    count = 0
    while True:
        count += 1
        root = _copy_site(site, tmp_path / ("kill-%d" % count))
        proc = _open_worker(root, point, count)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        journal_dir = os.path.join(str(root), "journal")
        segment = os.path.join(journal_dir, recovery_sites["segment"])
        saved = [n for n in os.listdir(journal_dir) if fmt.TORN_SUFFIX in n]
        assert len(saved) == 1, saved
        assert _read(os.path.join(journal_dir, saved[0])) == (
            recovery_sites["torn"])
        if point == "repair.after-save":
            # Saved aside, not yet cut; the ZODB untouched.
            assert _read(segment).endswith(recovery_sites["torn"])
            if kind == "catch-up":
                assert _read(os.path.join(str(root), "Data.fs")) == (
                    pristine_zodb)
            else:
                assert not os.path.exists(os.path.join(str(root), "Data.fs"))
            action = "caught up" if kind == "catch-up" else "rebuilt"
        else:
            assert not _read(segment).endswith(recovery_sites["torn"])
            st, marker, _ = _plain_view(root)
            assert marker == start + count * BATCH
            assert st == _replayed(entries, journal_id, marker)
            action = "caught up"
        _check_converges(recovery_sites, kind, root, action)
    # The first count the process survived: the run was complete.
    kills = count - 1
    if point == "repair.after-save":
        assert kills == 1
    else:
        assert kills == (total - start) // BATCH
    _check_converges(recovery_sites, kind, root, "current")


@pytest.mark.parametrize("kind,replayed", [
    ("rebuild", 1), ("rebuild", BATCH), ("rebuild", BATCH + 1),
    ("rebuild", 3 * BATCH + 2), ("catch-up", 1), ("catch-up", BATCH + 2),
])
def test_recovery_killed_inside_a_batch(recovery_sites, tmp_path, kind,
                                        replayed):
    """Killed before the batch of the ``replayed``-th command commits."""
    site = recovery_sites["sites"][kind]
    root = _copy_site(site, tmp_path / "site")
    proc = _spawn(["zjournal.tests.sweepworker", "kill-in-replay",
                   str(replayed), "open", str(root),
                   "--batch-size", str(BATCH)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    st, marker, keys = _plain_view(root)
    committed = (replayed - 1) // BATCH * BATCH
    if kind == "rebuild" and committed == 0:
        # Not even the marker was committed: an empty ZODB, which the
        # next open rebuilds from scratch.
        assert (st, marker, keys) == (({}, {}), None, [])
        action = "rebuilt"
    else:
        assert marker == site["start"] + committed
        assert st == _replayed(recovery_sites["entries"],
                               recovery_sites["journal_id"], marker)
        action = "caught up"
    _check_converges(recovery_sites, kind, root, action)


def test_repeatedly_killed_catch_up_advances_and_converges(
        recovery_sites, tmp_path):
    """Every rerun is killed after its first batch, until none is left."""
    site = recovery_sites["sites"]["catch-up"]
    root = _copy_site(site, tmp_path / "site")
    markers = []
    for attempt in range(20):
        proc = _open_worker(root, "replay.after-commit", 1)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        markers.append(_plain_view(root)[1])
    else:
        raise AssertionError("recovery never finished")
    start, total = site["start"], recovery_sites["total"]
    assert (total - start) % BATCH, "the last run must have work left"
    assert markers == [start + BATCH * k
                       for k in range(1, (total - start) // BATCH + 1)]
    with open(os.path.join(str(root), "recovery.json")) as f:
        assert json.load(f) == {
            "action": "caught up", "marker_seq": markers[-1],
            "journal_seq": total, "replayed": total - markers[-1]}
    _check_converges(recovery_sites, "catch-up", root, "current")


# -- 5. readers beside a writer -----------------------------------------------

WRITER_SECONDS = 2.0


def _check_entries(seqs_times_args, ends):
    """A reader's view: seqs 1..n, ending on a transaction, as written."""
    seqs = [seq for seq, _, _ in seqs_times_args]
    assert seqs == list(range(1, len(seqs) + 1))
    assert seqs, "nothing read"
    assert seqs[-1] in ends, "a reader saw part of a transaction"
    for seq, t, args in seqs_times_args:
        assert t == sweepworker.item(seq)[1]
        assert args == sweepworker.expected_args(seq)


def test_readers_beside_a_continuous_writer(tmp_path):
    jdir = tmp_path / "journal"
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZJOURNAL_KILL_AT", "ZJOURNAL_KILL_COUNT")}
    child = subprocess.Popen(
        [sys.executable, "-m", "zjournal.tests.sweepworker", "append",
         str(jdir), "--seconds", str(WRITER_SECONDS), "--segment-size",
         "4096", "--piece", "11", "--pause", "0.0002"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env)
    report_path = tmp_path / sweepworker.REPORT
    ends = sweepworker.transaction_ends(10 ** 6)
    dumps = []
    rounds = in_progress = 0
    seen = 0
    try:
        assert child.stdout.readline() == b"ready\n", child.stderr.read()
        while True:
            finished = report_path.exists()
            with FileJournal(str(jdir), readonly=True) as r:
                info = r.info()
                assert info["writer_active"] is True
                assert info["last_seq"] >= seen
                seen = info["last_seq"]
                view = [(e.seq, e.time, codec.loads(e.payload))
                        for e in r.entries()]
                assert len(view) >= info["last_seq"]
                _check_entries(view, ends)
                report = r.verify()
                assert report.records == report.last_seq >= len(view)
                in_progress += report.torn_tail is not None
            status, out, err = _cli("info", jdir, "--json")
            assert status == 0, err
            assert json.loads(out)["last_seq"] >= seen
            status, out, err = _cli("verify", jdir)
            assert status == 0, out + err
            status, out, err = _cli("dump", jdir, "--json")
            assert status == 0, err
            lines = [json.loads(line) for line in out.splitlines()]
            dump = [(d["seq"], d["time"], d["args"]) for d in lines]
            _check_entries(dump, ends)
            assert {d["command_name"] for d in lines} == {sweepworker.NAME}
            dumps.append(dump)
            rounds += 1
            if finished:
                break
        with open(str(report_path)) as f:
            written = json.load(f)
        # The writer dies holding its lock.
        child.kill()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdout.close()
        child.stderr.close()
        child.stdin.close()
    assert child.returncode == -signal.SIGKILL
    assert rounds >= 3, rounds
    assert written["segments"] >= 5, written

    # Not a byte of the journal differs from what the writer wrote, and
    # the readers left no file behind.
    assert sorted(os.listdir(str(jdir))) == sorted(
        list(written["files"]) + [fmt.LOCK_NAME])
    for name, meta in written["files"].items():
        assert hashlib.sha256(_read(jdir / name)).hexdigest() == (
            meta["sha256"]), name
    last = written["last_seq"]
    with FileJournal(str(jdir), readonly=True) as r:
        final = [(e.seq, e.time, codec.loads(e.payload))
                 for e in r.entries()]
    assert len(final) == last
    _check_entries(final, ends)
    for dump in dumps:
        assert dump == final[:len(dump)]
    assert dumps[-1] == final

    # The lock the killed writer left does not stop the next writer.
    with FileJournal(str(jdir), fsync="never") as j:
        assert j.last_seq == last
        assert j.torn_tail is None
        j.append([sweepworker.item(last + 1)])
        assert j.verify().records == last + 1
