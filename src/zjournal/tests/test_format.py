"""Tests of zjournal.format: the bytes of segments and records.

The expected values are computed here from the layout the module docstring
documents (offsets, sizes, big-endian integers, CRC-32 ranges), with
``struct`` formats and ``zlib.crc32`` calls written independently of the
module's own ``Struct`` objects.
"""
import random
import hashlib
import hmac
import struct
import zlib

import pytest

from zjournal import format as fmt
from zjournal.errors import CorruptJournalError
from zjournal.errors import UnsupportedFormatError


IDENTITY = bytes(range(0x10, 0x20))


def _record(seq=7, time=1234.5, flags=fmt.FLAG_END, version=3,
            name=b"bank.deposit", payload=b"\x00\x01payload\xff"):
    return fmt.encode_record(seq, time, flags, version, name, payload)


def _be(fmt_, data, offset):
    return struct.unpack_from(">" + fmt_, data, offset)[0]


class TestEncodeRecord:

    def test_golden_fields_at_documented_offsets(self):
        name = b"bank.deposit"
        payload = b"\x00\x01payload\xff"
        seq = 0x0102030405060708
        time = 1700000000.25
        prev = bytes(range(100, 116))
        rec = fmt.encode_record(seq, time, fmt.FLAG_END, 0x0A0B, name,
                                payload, prev)
        k, m = len(name), len(payload)
        # The body runs from offset 8 to 8+n: seq (8) + time (8) + flags (1)
        # + reserved (1) + version (2) + k (2) + prev (16) = 38 bytes, then
        # name and payload.
        n = 38 + k + m
        assert _be("I", rec, 4) == n
        assert len(rec) == 8 + n + 4
        assert _be("I", rec, 0) == zlib.crc32(rec[4:8 + n])
        assert _be("Q", rec, 8) == seq
        assert rec[8:16] == bytes([1, 2, 3, 4, 5, 6, 7, 8])  # big-endian
        assert _be("d", rec, 16) == time
        assert rec[24] == 0x01
        assert rec[25] == 0
        assert _be("H", rec, 26) == 0x0A0B
        assert _be("H", rec, 28) == k
        assert rec[30:46] == prev
        assert rec[46:46 + k] == name
        assert rec[46 + k:8 + n] == payload
        assert _be("I", rec, 8 + n) == n

    def test_metadata_and_signature_at_documented_offsets(self):
        key = b"secret"
        meta = fmt.encode_meta({"user": "alice", "why": "test"})
        assert meta == b'{"user":"alice","why":"test"}'
        rec = fmt.encode_record(1, 2.0, fmt.FLAG_END | fmt.FLAG_QUERY, 1,
                                b"q", b"args", fmt.GENESIS, meta, key)
        n = _be("I", rec, 4)
        assert rec[24] == (fmt.FLAG_END | fmt.FLAG_QUERY | fmt.FLAG_META
                           | fmt.FLAG_MAC)
        assert _be("I", rec, 47) == len(meta)
        assert rec[51:51 + len(meta)] == meta
        assert rec[51 + len(meta):8 + n - 16] == b"args"
        mac = rec[8 + n - 16:8 + n]
        assert mac == hmac.digest(key, rec[4:8 + n - 16], "sha256")[:16]
        assert fmt.check_record(rec, 0) == len(rec)
        got = fmt.decode_record(rec, 0, {})
        assert (got.payload, got.meta, got.mac) == (b"args", meta, mac)
        assert got.encoded() == rec

    def test_metadata_that_does_not_fit_is_refused(self):
        rec = bytearray(fmt.encode_record(1, 2.0, fmt.FLAG_END, 1, b"q",
                                          b"args", meta=b"{}"))
        struct.pack_into(">I", rec, 47, 7)  # claims more than the body has
        struct.pack_into(">I", rec, 0, zlib.crc32(rec[4:-4]))
        with pytest.raises(fmt.BadRecord):
            fmt.check_record(bytes(rec), 0)

    def test_chain_hash_covers_the_body_and_prev(self):
        rec = fmt.encode_record(1, 2.0, fmt.FLAG_END, 1, b"q", b"args")
        assert fmt.record_hash(rec) == hashlib.sha256(
            rec[4:-4]).digest()[:16]
        other = fmt.encode_record(1, 2.0, fmt.FLAG_END, 1, b"q", b"args",
                                  b"\x01" * 16)
        assert fmt.record_hash(other) != fmt.record_hash(rec)

    def test_encode_chain_links_each_record_to_the_one_before(self):
        items = [(1, 1.0, 1, b"a", b"x"), (2, 2.0, 1, b"b", b"y")]
        data, head = fmt.encode_chain(items, b"\x07" * 16)
        first = data[:fmt.check_record(data, 0)]
        second = data[len(first):]
        assert first[30:46] == b"\x07" * 16
        assert second[30:46] == fmt.record_hash(first)
        assert head == fmt.record_hash(second)

    def test_crc_covers_length_and_body_exactly(self):
        rec = _record()
        n = _be("I", rec, 4)
        # CRC of a range that is one byte shorter or longer differs: the
        # range really is 4 .. 8+n.
        assert zlib.crc32(rec[4:8 + n]) == _be("I", rec, 0)
        assert zlib.crc32(rec[4:8 + n - 1]) != _be("I", rec, 0)
        assert zlib.crc32(rec[0:8 + n]) != _be("I", rec, 0)
        assert zlib.crc32(rec[4:8 + n + 4]) != _be("I", rec, 0)

    def test_flags_zero_without_end(self):
        rec = _record(flags=0)
        assert rec[24] == 0

    def test_empty_name_and_payload_is_smallest_record(self):
        rec = fmt.encode_record(1, 0.0, fmt.FLAG_END, 0, b"", b"")
        assert len(rec) == 46 + 4
        assert _be("I", rec, 4) == 38
        assert fmt.check_record(rec, 0) == len(rec)

    def test_size_grows_with_name_and_payload(self):
        small = fmt.encode_record(1, 0.0, 0, 0, b"a", b"")
        big = fmt.encode_record(1, 0.0, 0, 0, b"abc", b"12345")
        assert len(big) - len(small) == 2 + 5


class TestCheckRecord:

    def test_valid_record_returns_its_size(self):
        rec = _record()
        assert fmt.check_record(rec, 0) == len(rec)

    def test_valid_record_at_offset_and_followed_by_bytes(self):
        rec = _record()
        buf = b"junk" * 5 + rec + b"more junk"
        assert fmt.check_record(buf, 20) == len(rec)

    def test_expected_seq(self):
        rec = _record(seq=7)
        assert fmt.check_record(rec, 0, 7) == len(rec)
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(rec, 0, 8)
        assert not info.value.truncated

    def test_every_truncation_is_truncated(self):
        rec = _record()
        for length in range(len(rec)):
            with pytest.raises(fmt.BadRecord) as info:
                fmt.check_record(rec[:length], 0)
            assert info.value.truncated, length

    def test_every_truncation_at_an_offset_is_truncated(self):
        rec = _record()
        prefix = _record(seq=6)
        for length in range(len(rec)):
            buf = prefix + rec[:length]
            with pytest.raises(fmt.BadRecord) as info:
                fmt.check_record(buf, len(prefix))
            assert info.value.truncated, length

    def test_every_single_bit_flip_is_rejected(self):
        rec = _record()
        n = _be("I", rec, 4)
        for bit in range(len(rec) * 8):
            damaged = bytearray(rec)
            damaged[bit // 8] ^= 0x80 >> (bit % 8)
            with pytest.raises(fmt.BadRecord) as info:
                fmt.check_record(bytes(damaged), 0)
            if 4 <= bit // 8 < 8:
                # The length field: a record that now claims more bytes
                # than there are may be reported as cut short; one that
                # fits in the data cannot be.
                new_n = _be("I", damaged, 4)
                if new_n + 12 <= len(rec):
                    assert not info.value.truncated, bit
            else:
                # All the bytes the length promises are there.
                assert _be("I", damaged, 4) == n
                assert not info.value.truncated, bit

    def test_bit_flip_followed_by_more_data_is_rejected(self):
        # With bytes after the record, a longer length still finds data
        # to check: the CRC must catch it.
        rec = _record()
        tail = _record(seq=8)
        for bit in range(32, 64):
            damaged = bytearray(rec)
            damaged[bit // 8] ^= 0x80 >> (bit % 8)
            with pytest.raises(fmt.BadRecord):
                fmt.check_record(bytes(damaged) + tail, 0)

    def test_unknown_flags_rejected_even_with_valid_crc(self):
        rec = bytearray(fmt.encode_record(1, 0.0, 0, 0, b"x", b""))
        rec[24] = 0x10
        struct.pack_into(">I", rec, 0, zlib.crc32(bytes(rec[4:-4])))
        rec = bytes(rec)
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(rec, 0)
        assert not info.value.truncated

    def test_nonzero_reserved_byte_rejected_even_with_valid_crc(self):
        rec = bytearray(_record())
        rec[25] = 1
        n = _be("I", rec, 4)
        struct.pack_into(">I", rec, 0, zlib.crc32(bytes(rec[4:8 + n])))
        with pytest.raises(fmt.BadRecord):
            fmt.check_record(bytes(rec), 0)

    def test_trailing_length_mismatch_rejected(self):
        rec = bytearray(_record())
        struct.pack_into(">I", rec, len(rec) - 4, _be("I", rec, 4) + 1)
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(bytes(rec), 0)
        assert not info.value.truncated

    def test_name_length_beyond_body_rejected(self):
        # k larger than the body, with a CRC made valid for the lie.
        rec = bytearray(_record())
        n = _be("I", rec, 4)
        struct.pack_into(">H", rec, 28, n)
        struct.pack_into(">I", rec, 0, zlib.crc32(bytes(rec[4:8 + n])))
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(bytes(rec), 0)
        assert not info.value.truncated

    def test_huge_length_is_not_believed(self):
        # A length of 4 GiB must be refused as implausible, not reported
        # as "cut short" (which would make readers wait for more data).
        rec = bytearray(_record())
        struct.pack_into(">I", rec, 4, 0xFFFFFFF0)
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(bytes(rec), 0)
        assert not info.value.truncated

    def test_zeros_rejected(self):
        with pytest.raises(fmt.BadRecord) as info:
            fmt.check_record(bytes(100), 0)
        assert not info.value.truncated


class TestDecodeRecord:

    def test_round_trip(self):
        name = "bank.dépôt".encode("utf-8")
        payload = bytes(range(256))
        rec = fmt.encode_record(12, 1700000000.123456, 0, 5, name, payload)
        buf = b"x" * 11 + rec
        size = fmt.check_record(buf, 11)
        r = fmt.decode_record(buf, 11, {}, base=1000)
        assert (r.seq, r.time, r.flags, r.version) == (
            12, 1700000000.123456, 0, 5)
        assert r.name == "bank.dépôt"
        assert r.payload == payload
        assert r.offset == 1011
        assert r.size == size == len(rec)

    def test_name_cache_is_shared(self):
        names = {}
        a = fmt.decode_record(_record(seq=1), 0, names)
        b = fmt.decode_record(_record(seq=2), 0, names)
        assert a.name == b.name == "bank.deposit"
        assert a.name is b.name
        assert names == {b"bank.deposit": "bank.deposit"}

    def test_decodes_from_memoryview_and_bytearray(self):
        rec = _record()
        for buf in (bytearray(rec), memoryview(rec)):
            fmt.check_record(buf, 0)
            r = fmt.decode_record(buf, 0, {})
            assert r.payload == b"\x00\x01payload\xff"
            assert type(r.payload) is bytes


class TestEncodeTransaction:

    def test_end_only_on_last_record(self):
        items = [(s, 10.0 + s, 1, b"cmd", b"p%d" % s) for s in (4, 5, 6)]
        data = fmt.encode_transaction(items)
        pos = 0
        seen = []
        while pos < len(data):
            size = fmt.check_record(data, pos)
            seen.append((_be("Q", data, pos + 8), data[pos + 24]))
            pos += size
        assert pos == len(data)
        assert seen == [(4, 0), (5, 0), (6, fmt.FLAG_END)]

    def test_single_record_transaction_has_end(self):
        data = fmt.encode_transaction([(1, 0.0, 0, b"cmd", b"")])
        assert fmt.check_record(data, 0) == len(data)
        assert data[24] == fmt.FLAG_END

    def test_same_bytes_as_records(self):
        items = [(1, 1.0, 0, b"a", b"x"), (2, 2.0, 3, b"b", b"yy")]
        first = fmt.encode_record(1, 1.0, 0, 0, b"a", b"x")
        assert fmt.encode_transaction(items) == first + fmt.encode_record(
            2, 2.0, fmt.FLAG_END, 3, b"b", b"yy", fmt.record_hash(first))


class TestSegmentHeader:

    def test_golden_header(self):
        created = 1700000000.5
        h = fmt.encode_header(IDENTITY, 0x0102030405060708, created)
        assert len(h) == 48
        assert h[0:8] == b"ZJOURNAL"
        assert _be("H", h, 8) == 2
        assert _be("H", h, 10) == 48
        assert h[12:28] == IDENTITY
        assert h[28:36] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
        assert _be("d", h, 36) == created
        assert _be("I", h, 44) == zlib.crc32(h[0:44])

    def test_round_trip(self):
        h = fmt.encode_header(IDENTITY, 48211, 12.75)
        d = fmt.decode_header(h, "seg")
        assert (d.version, d.size, d.identity, d.first_seq, d.created) == (
            2, 48, IDENTITY, 48211, 12.75)

    def test_round_trip_ignores_following_bytes(self):
        h = fmt.encode_header(IDENTITY, 3, 1.0) + _record()
        assert fmt.decode_header(h, "seg").first_seq == 3


class TestDecodeHeader:

    def _header(self):
        return bytearray(fmt.encode_header(IDENTITY, 1, 1.0))

    def _fix_crc(self, h):
        struct.pack_into(">I", h, 44, zlib.crc32(bytes(h[:44])))
        return bytes(h)

    def test_wrong_magic(self):
        h = self._header()
        h[0:8] = b"ZJOURNAM"
        with pytest.raises(CorruptJournalError) as info:
            fmt.decode_header(self._fix_crc(h), "/j/seg.zjl")
        assert info.value.path == "/j/seg.zjl"
        assert info.value.offset == 0
        assert "magic" in info.value.reason

    def test_bad_crc(self):
        for byte in range(8, 48):
            h = self._header()
            h[byte] ^= 0x10
            with pytest.raises(CorruptJournalError) as info:
                fmt.decode_header(bytes(h), "/j/seg.zjl")
            assert info.value.offset == 0, byte

    def test_unsupported_version(self):
        h = self._header()
        struct.pack_into(">H", h, 8, 3)
        with pytest.raises(UnsupportedFormatError) as info:
            fmt.decode_header(self._fix_crc(h), "/j/seg.zjl")
        assert not isinstance(info.value, CorruptJournalError)
        assert "/j/seg.zjl" in str(info.value)

    def test_unsupported_version_with_bad_crc_is_corruption(self):
        # A damaged version field must not be taken for a newer format.
        h = self._header()
        struct.pack_into(">H", h, 8, 3)
        with pytest.raises(CorruptJournalError):
            fmt.decode_header(bytes(h), "seg")

    def test_short_header(self):
        h = bytes(self._header())
        for length in (0, 1, 44, 47):
            with pytest.raises(CorruptJournalError) as info:
                fmt.decode_header(h[:length], "seg")
            assert info.value.offset == 0

    def test_header_size_too_small(self):
        h = self._header()
        struct.pack_into(">H", h, 10, 47)
        with pytest.raises(CorruptJournalError):
            fmt.decode_header(self._fix_crc(h), "seg")

    def test_larger_header_size_is_accepted(self):
        # "readers skip what they do not know"
        h = self._header()
        struct.pack_into(">H", h, 10, 64)
        assert fmt.decode_header(self._fix_crc(h), "seg").size == 64


class TestFindValidRecord:

    def test_after_garbage(self):
        rng = random.Random(1)
        for length in list(range(1, 70)) + [500, 4000]:
            garbage = bytes(rng.randrange(256) for _ in range(length))
            buf = garbage + _record(seq=5)
            assert fmt.find_valid_record(buf, 0, 5) == length, length

    def test_after_zeros(self):
        for length in (1, 8, 30, 34, 35, 1000):
            buf = bytes(length) + _record(seq=2) + bytes(17)
            assert fmt.find_valid_record(buf, 0, 1) == length, length

    def test_strictly_after_start(self):
        a = _record(seq=1)
        b = _record(seq=2)
        buf = a + b
        assert fmt.find_valid_record(buf, 0, 1) == len(a)
        assert fmt.find_valid_record(buf, len(a), 1) is None

    def test_start_offset(self):
        a = _record(seq=1)
        b = _record(seq=2)
        c = _record(seq=3)
        buf = a + b + b"\0" * 3 + c
        assert fmt.find_valid_record(buf, len(a) + 1, 1) == (
            len(a) + len(b) + 3)

    def test_ignores_records_below_min_seq(self):
        old = _record(seq=3)
        new = _record(seq=10)
        buf = b"garbage" + old + b"zz" + new
        assert fmt.find_valid_record(buf, 0, 10) == 7 + len(old) + 2
        assert fmt.find_valid_record(b"garbage" + old, 0, 10) is None
        # ... but finds the same record when its seq is allowed.
        assert fmt.find_valid_record(buf, 0, 3) == 7

    def test_ignores_implausibly_high_seq(self):
        # At most one seq per 34 bytes can follow: a record claiming seq
        # 10**9 three bytes after a gap starting at seq 1 is not a
        # continuation of the journal.
        buf = b"xyz" + _record(seq=10 ** 9)
        assert fmt.find_valid_record(buf, 0, 1) is None

    def test_seq_crossing_a_prefix_boundary(self):
        # min_seq and the record's seq differ in their upper six bytes.
        garbage = bytes(random.Random(2).randrange(256) for _ in range(600))
        buf = garbage + _record(seq=(1 << 16) + 3)
        assert fmt.find_valid_record(buf, 0, (1 << 16) - 5) == 600

    def test_none_on_zeros(self):
        assert fmt.find_valid_record(bytes(10000), 0, 1) is None

    def test_none_on_random_garbage(self):
        rng = random.Random(3)
        for min_seq in (1, 1000, 1 << 40):
            buf = bytes(rng.randrange(256) for _ in range(20000))
            assert fmt.find_valid_record(buf, 0, min_seq) is None

    def test_none_on_damaged_record(self):
        rec = bytearray(_record(seq=4))
        rec[40] ^= 1
        assert fmt.find_valid_record(b"ab" + bytes(rec), 0, 1) is None

    def test_none_on_truncated_record(self):
        rec = _record(seq=4)
        assert fmt.find_valid_record(b"ab" + rec[:-1], 0, 1) is None

    def test_finds_first_of_several(self):
        recs = [_record(seq=s) for s in (5, 6, 7)]
        buf = b"\xff" * 9 + b"".join(recs)
        assert fmt.find_valid_record(buf, 0, 5) == 9


class TestSegmentName:

    def test_format(self):
        assert fmt.segment_name(1) == "00000000000000000001.zjl"
        assert fmt.segment_name(48211) == "00000000000000048211.zjl"
        assert len(fmt.segment_name(2 ** 64 - 1)) == 20 + 4

    def test_round_trip(self):
        for seq in (1, 9, 10, 48211, 10 ** 19, 2 ** 64 - 1):
            assert fmt.parse_segment_name(fmt.segment_name(seq)) == seq

    def test_names_sort_like_numbers(self):
        seqs = [1, 2, 10, 99, 100, 48211, 1000000]
        names = [fmt.segment_name(s) for s in reversed(seqs)]
        assert [fmt.parse_segment_name(n) for n in sorted(names)] == seqs

    @pytest.mark.parametrize("name", [
        "journal.lock",
        "1.zjl",
        "0000000000000000001.zjl",      # 19 digits
        "000000000000000000001.zjl",    # 21 digits
        "00000000000000000001.zjl.tmp",
        "00000000000000000001.zjl.torn-1520",
        "00000000000000000001.ZJL",
        "x00000000000000000001.zjl",
        "0000000000000000000a.zjl",
    ])
    def test_not_a_segment(self, name):
        assert fmt.parse_segment_name(name) is None

    @pytest.mark.parametrize("name", [
        "00000000000000000001.zjl\n",
        "\u0660" * 19 + "\u0661.zjl",   # Arabic-Indic digits
    ], ids=["trailing-newline", "non-ascii-digits"])
    def test_whole_name_must_match_ascii_digits(self, name):
        # "Only files whose whole name matches <20 digits>.zjl are
        # segments": a name the journal cannot rebuild with segment_name()
        # must not be taken for a segment.
        assert fmt.parse_segment_name(name) is None
