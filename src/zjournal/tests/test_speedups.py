"""The C scan (zjournal._speedups) must judge every journal exactly as the
pure-Python scan does: same report, or the same error at the same place.

Each case builds a real journal, damages it the way the durability suites
do, and runs ``verify`` twice, with and without the C loop.
"""
import os
import random
import struct
import zlib

import pytest

import zjournal.journal as journal_module
from zjournal import FileJournal
from zjournal import format as fmt
from zjournal.errors import ZJournalError

try:
    from zjournal import _speedups as speedups
except ImportError as e:
    if os.environ.get("CI"):
        # CI machines have gcc and the headers: a missing build there is
        # a broken build, not an optional feature.
        raise
    pytest.skip("the C speedups are not built here: %s" % e,
                allow_module_level=True)


def _verify(path, fast, **kw):
    saved = journal_module._check_run
    journal_module._check_run = speedups.check_run if fast else None
    try:
        j = FileJournal(path, readonly=True, **kw)
        try:
            r = j.verify()
            return ("ok", r.records, r.first_seq, r.last_seq, r.head,
                    r.signed, r.unsigned, r.queries,
                    None if r.torn_tail is None else
                    (r.torn_tail.path, r.torn_tail.offset,
                     r.torn_tail.size))
        finally:
            j.close()
    except ZJournalError as e:
        return (type(e).__name__, getattr(e, "path", None),
                getattr(e, "offset", None), getattr(e, "seq", None))
    finally:
        journal_module._check_run = saved


def _entries(path, fast, start=1, stop=None):
    saved = journal_module._read_run
    journal_module._read_run = speedups.read_run if fast else None
    try:
        j = FileJournal(path, readonly=True)
        try:
            got = [(type(e).__name__,) + tuple(e)
                   for e in j.entries(start, stop)]
            return ("ok", got)
        finally:
            j.close()
    except ZJournalError as e:
        return (type(e).__name__, getattr(e, "path", None),
                getattr(e, "offset", None), getattr(e, "seq", None))
    finally:
        journal_module._read_run = saved


def _same(path, **kw):
    slow = _verify(path, False, **kw)
    fast = _verify(path, True, **kw)
    assert fast == slow
    for start, stop in ((1, None), (2, 5), (4, None), (1, 3)):
        assert _entries(path, True, start, stop) == _entries(
            path, False, start, stop)
    return slow


def _build(path, transactions, segment_size=1 << 20, key=None):
    j = FileJournal(path, fsync="never", segment_size=segment_size,
                    hmac_key=key if key is not None else False)
    rng = random.Random(len(transactions))
    for sizes in transactions:
        first = j.last_seq + 1
        items = []
        for i, seq in enumerate(range(first, first + sizes)):
            meta = {"user": "u%d" % seq} if seq % 3 == 0 else None
            flags = fmt.FLAG_QUERY if seq % 5 == 0 else 0
            items.append((seq, 1e9 + seq, 1, "tests.n%d" % (seq % 4),
                          bytes(rng.randrange(256) for _ in
                                range(rng.randrange(0, 40))), flags, meta))
        j.append(items)
    j.close()
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.endswith(".zjl"))


def test_clean_journals(tmp_path):
    _build(str(tmp_path / "a"), [1] * 50 + [3, 7, 1, 2])
    assert _same(str(tmp_path / "a"))[0] == "ok"
    _build(str(tmp_path / "b"), [2] * 40, segment_size=700)
    assert _same(str(tmp_path / "b"))[1] == 80
    _build(str(tmp_path / "c"), [1] * 10, key=b"k")
    # Signed: the C loop stands aside when a key is given.
    assert _same(str(tmp_path / "c"), hmac_key=b"k")[5] == 10
    assert _same(str(tmp_path / "c"))[5] == 10


def test_every_truncation_of_the_end(tmp_path):
    path = str(tmp_path / "j")
    (seg,) = _build(path, [1, 2, 3, 1])
    with open(seg, "rb") as f:
        data = f.read()
    for cut in range(fmt.SEGMENT_HEADER_SIZE, len(data)):
        with open(seg, "wb") as f:
            f.write(data[:cut])
        _same(path)


def test_every_byte_changed(tmp_path):
    path = str(tmp_path / "j")
    (seg,) = _build(path, [1, 2, 1])
    with open(seg, "rb") as f:
        data = f.read()
    outcomes = set()
    for at in range(fmt.SEGMENT_HEADER_SIZE, len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x41
        with open(seg, "wb") as f:
            f.write(damaged)
        outcomes.add(_same(path)[0])
    assert "CorruptJournalError" in outcomes


def test_chain_and_extras_damage_with_valid_crcs(tmp_path):
    path = str(tmp_path / "j")
    (seg,) = _build(path, [1] * 12)
    with open(seg, "rb") as f:
        data = f.read()
    pos, records = fmt.SEGMENT_HEADER_SIZE, []
    while pos < len(data):
        size = fmt.check_record(data, pos)
        records.append((pos, size))
        pos += size
    for i, (pos, size) in enumerate(records):
        for field_at, value in ((30, b"\x01"), (24, b"\x0f"), (25, b"\x01")):
            rec = bytearray(data[pos:pos + size])
            rec[field_at:field_at + len(value)] = value
            struct.pack_into(">I", rec, 0, zlib.crc32(bytes(rec[4:-4])))
            with open(seg, "wb") as f:
                f.write(data[:pos] + bytes(rec) + data[pos + size:])
            _same(path)


def test_transactions_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "READ_CHUNK", 97)
    path = str(tmp_path / "j")
    _build(path, [5, 1, 9, 2, 1, 30])
    assert _same(path)[1] == 48
    for start in (1, 7, 17, 40):
        for stop in (None, 3, 16, 18, 45):
            assert _entries(path, True, start, stop) == _entries(
                path, False, start, stop)


def test_entries_are_the_same_objects_in_value(tmp_path):
    path = str(tmp_path / "j")
    _build(path, [1, 3, 1], key=b"k")
    kind, entries = _entries(path, True)
    assert kind == "ok" and len(entries) == 5
    assert all(e[0] == "Entry" for e in entries)
    j = FileJournal(path, readonly=True)
    e = list(j.entries())[2]
    j.close()
    assert e.mac is not None and e.hash  # the named fields work


def test_out_of_range_starts_behave_as_in_python(tmp_path):
    path = str(tmp_path / "j")
    _build(path, [1, 2, 1])
    for start in (2 ** 64, 2 ** 64 + 3, 2 ** 70):
        assert _entries(path, True, start) == _entries(path, False, start)
        assert _entries(path, True, start)[1] == []
    saved = journal_module._read_run
    journal_module._read_run = speedups.read_run
    try:
        j = FileJournal(path, readonly=True)
        assert [e.seq for e in j.entries(2.0)] == [2, 3, 4]
        j.close()
    finally:
        journal_module._read_run = saved


def test_bad_positions_are_errors_not_crashes():
    from zjournal.journal import Entry
    with pytest.raises(ValueError):
        speedups.read_run(b"x" * 100, -5, 1, 1, 10, 0, {}, Entry)
    with pytest.raises(ValueError):
        speedups.read_run(b"x" * 100, 101, 1, 1, 10, 0, {}, Entry)
    with pytest.raises(ValueError):
        speedups.check_run(b"x" * 100, 2 ** 62, 1, 10, b"\0" * 16, 0, 0, 0)
