"""Tamper evidence: the hash chain, signatures, the marker's head, modes.

Each test edits real journal files the way an attacker with write access
would -- recomputing the CRC so that the framing checks pass -- and checks
which mechanism catches it.
"""
import os
import stat
import struct
import zlib

import pytest

import zjournal
from zjournal import FileJournal
from zjournal import format as fmt
from zjournal.errors import CorruptJournalError
from zjournal.errors import HistoryMismatchError
from zjournal.errors import JournalKeyError
from zjournal.errors import TamperedJournalError
from zjournal.marker import MARKER_KEY
from zjournal.tests.examples import Put
from zjournal.tests.helpers import zodb_view

HEADER = fmt.SEGMENT_HEADER_SIZE


def _fill(site, count, **journal_kw):
    jdb = site.open(journal_kw)
    for i in range(count):
        jdb.execute(Put("k%d" % i, i))
    head = jdb.journal.head
    jdb.close()
    return head


def _records(data):
    """[(offset, size)] of the records of a segment's bytes."""
    out, pos = [], HEADER
    while pos < len(data):
        size = fmt.check_record(data, pos)
        out.append((pos, size))
        pos += size
    return out


def _reseal(rec):
    """Recompute a record's CRC: what an attacker with write access does."""
    rec = bytearray(rec)
    struct.pack_into(">I", rec, 0, zlib.crc32(bytes(rec[4:-4])))
    return bytes(rec)


def _rewrite(path, records):
    with open(path, "rb") as f:
        header = f.read(HEADER)
    with open(path, "wb") as f:
        f.write(header + b"".join(records))


def _split(path):
    with open(path, "rb") as f:
        data = f.read()
    return [data[o:o + s] for o, s in _records(data)]


def _verify(site, **kw):
    j = FileJournal(site.journal_dir, readonly=True, **kw)
    try:
        return j.verify()
    finally:
        j.close()


class TestChain:

    def test_each_record_carries_the_hash_of_the_one_before(self, site):
        head = _fill(site, 5)
        recs = _split(site.segments()[0])
        assert recs[0][30:46] == fmt.GENESIS
        for before, after in zip(recs, recs[1:]):
            assert after[30:46] == fmt.record_hash(before)
        assert head == fmt.record_hash(recs[-1])
        report = _verify(site)
        assert (report.records, report.head) == (5, head)

    def test_the_chain_continues_across_segments(self, site):
        head = _fill(site, 30, segment_size=400)
        assert len(site.segments()) > 3
        recs = [r for p in site.segments() for r in _split(p)]
        for before, after in zip(recs, recs[1:]):
            assert after[30:46] == fmt.record_hash(before)
        assert _verify(site).head == head
        j = FileJournal(site.journal_dir, segment_size=400)
        assert j.head == head  # found from the end when reopened
        j.close()

    def test_an_edited_payload_with_a_fixed_crc_breaks_the_chain(self, site):
        _fill(site, 5)
        path = site.segments()[0]
        recs = _split(path)
        # Change record 3's argument; the CRC is recomputed, so only the
        # chain can tell.
        edited = recs[2].replace(b"k2", b"kX")
        assert edited != recs[2]
        recs[2] = _reseal(edited)
        _rewrite(path, recs)
        with pytest.raises(TamperedJournalError) as info:
            _verify(site)
        assert info.value.seq == 4  # the record after the edited one
        assert "chain" in str(info.value)

    def test_a_deleted_record_renumbered_breaks_the_chain(self, site):
        _fill(site, 5)
        path = site.segments()[0]
        recs = _split(path)
        del recs[1]
        # Renumber what follows, so that the seqs are contiguous again.
        for i in range(1, len(recs)):
            rec = bytearray(recs[i])
            struct.pack_into(">Q", rec, 8, i + 1)
            recs[i] = _reseal(rec)
        _rewrite(path, recs)
        with pytest.raises(TamperedJournalError) as info:
            _verify(site)
        assert info.value.seq == 2

    def test_reordered_records_renumbered_break_the_chain(self, site):
        _fill(site, 5)
        path = site.segments()[0]
        recs = _split(path)
        recs[1], recs[2] = recs[2], recs[1]
        for i in (1, 2):
            rec = bytearray(recs[i])
            struct.pack_into(">Q", rec, 8, i + 1)
            recs[i] = _reseal(rec)
        _rewrite(path, recs)
        with pytest.raises(CorruptJournalError) as info:
            _verify(site)
        assert info.value.seq == 2

    def test_a_rewritten_chain_is_caught_by_the_marker(self, site):
        # An attacker who edits a record and recomputes every CRC and
        # hash after it passes verify; the ZODB's marker still holds the
        # old head, and opening refuses.
        _fill(site, 5)
        path = site.segments()[0]
        recs = _split(path)
        prev = fmt.GENESIS
        for i, rec in enumerate(recs):
            rec = bytearray(rec.replace(b"k2", b"kX"))
            rec[30:46] = prev
            recs[i] = _reseal(rec)
            prev = fmt.record_hash(recs[i])
        _rewrite(path, recs)
        assert _verify(site).records == 5
        before = open(path, "rb").read()
        with pytest.raises(HistoryMismatchError):
            site.open()
        assert open(path, "rb").read() == before

    def test_a_catch_up_checks_the_chain_against_the_marker(self, site):
        _fill(site, 3)
        saved = open(site.data_fs, "rb").read()
        _fill(site, 2)
        # Put back the ZODB as it was after 3 commands, and forge the
        # journal's fourth record to follow another record.
        with open(site.data_fs, "wb") as f:
            f.write(saved)
        os.remove(site.data_fs + ".index")
        path = site.segments()[0]
        recs = _split(path)
        rec = bytearray(recs[3])
        rec[30:46] = b"\x55" * 16
        recs[3] = _reseal(rec)
        _rewrite(path, recs)
        with pytest.raises(HistoryMismatchError) as info:
            site.open()
        assert "seq 4" in str(info.value)

    def test_the_marker_holds_the_head(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("b", 2))
            zjournal.execute(conn, Put("c", 3))
        conn = jdb.open()
        marker = conn.root()[MARKER_KEY]
        assert (marker.last_seq, marker.head) == (3, jdb.journal.head)
        conn.close()
        jdb.close()

    def test_a_rebuild_and_a_catch_up_store_the_head(self, site):
        head = _fill(site, 7)
        site.remove_zodb()
        jdb = site.open(batch_size=3)
        assert jdb.recovery.action == "rebuilt"
        conn = jdb.open()
        assert conn.root()[MARKER_KEY].head == head
        conn.close()
        jdb.execute(Put("after", 1))
        jdb.close()
        jdb = site.open()  # current: the head matches
        assert jdb.recovery.action == "current"
        jdb.close()


class TestSignatures:

    KEY = b"correct horse battery staple"

    def test_signed_records_verify_with_the_key(self, site):
        _fill(site, 4, hmac_key=self.KEY)
        report = _verify(site, hmac_key=self.KEY)
        assert (report.records, report.signed, report.unsigned) == (4, 4, 0)
        for rec in _split(site.segments()[0]):
            assert rec[24] & fmt.FLAG_MAC

    def test_the_key_can_come_from_the_environment(self, site, monkeypatch):
        monkeypatch.setenv("ZJOURNAL_HMAC_KEY", self.KEY.decode())
        _fill(site, 2)
        monkeypatch.delenv("ZJOURNAL_HMAC_KEY")
        assert _verify(site).signed == 2
        with pytest.raises(TamperedJournalError):
            _verify(site, hmac_key=b"another key")
        assert _verify(site, hmac_key=self.KEY).signed == 2

    def test_a_forged_record_with_a_rebuilt_chain_fails_the_signature(
            self, site):
        _fill(site, 4, hmac_key=self.KEY)
        path = site.segments()[0]
        recs = _split(path)
        prev = fmt.GENESIS
        for i, rec in enumerate(recs):
            rec = bytearray(rec.replace(b"k1", b"kX"))
            rec[30:46] = prev
            recs[i] = _reseal(rec)
            prev = fmt.record_hash(recs[i])
        _rewrite(path, recs)
        assert _verify(site).records == 4  # without the key: undetected
        with pytest.raises(TamperedJournalError) as info:
            _verify(site, hmac_key=self.KEY)
        assert info.value.seq == 2
        assert "signature" in str(info.value)

    def test_stripped_signatures_are_unsigned_records(self, site):
        _fill(site, 1, hmac_key=self.KEY)
        path = site.segments()[0]
        (rec,) = _split(path)
        n = struct.unpack_from(">I", rec, 4)[0] - fmt.MAC_SIZE
        body = bytearray(rec[4:-4 - fmt.MAC_SIZE])
        struct.pack_into(">I", body, 0, n)
        body[20] &= ~fmt.FLAG_MAC & 0xFF
        stripped = _reseal(b"\0" * 4 + bytes(body) + struct.pack(">I", n))
        _rewrite(path, [stripped])
        assert _verify(site).unsigned == 1
        with pytest.raises(TamperedJournalError) as info:
            _verify(site, hmac_key=self.KEY)
        assert "unsigned" in str(info.value)

    def test_signing_turned_on_later_verifies(self, site):
        _fill(site, 2)
        jdb = site.open({"hmac_key": self.KEY})
        jdb.execute(Put("signed", 1))
        jdb.close()
        report = _verify(site, hmac_key=self.KEY)
        assert (report.signed, report.unsigned) == (1, 2)

    def test_a_stripped_signature_after_signed_records_is_caught(self, site):
        _fill(site, 3, hmac_key=self.KEY)
        path = site.segments()[0]
        recs = _split(path)
        prev = recs[1][30:46]
        rec = recs[2]
        n = struct.unpack_from(">I", rec, 4)[0] - fmt.MAC_SIZE
        body = bytearray(rec[4:-4 - fmt.MAC_SIZE])
        struct.pack_into(">I", body, 0, n)
        body[20] &= ~fmt.FLAG_MAC & 0xFF
        assert bytes(body[26:42]) == fmt.record_hash(recs[1])
        recs[2] = _reseal(b"\0" * 4 + bytes(body) + struct.pack(">I", n))
        _rewrite(path, recs)
        assert prev  # the chain before it is intact
        assert _verify(site).unsigned == 1
        with pytest.raises(TamperedJournalError) as info:
            _verify(site, hmac_key=self.KEY)
        assert info.value.seq == 3
        assert "stripped" in str(info.value)

    def test_no_key_at_all_even_with_the_variable_set(self, site,
                                                      monkeypatch):
        monkeypatch.setenv("ZJOURNAL_HMAC_KEY", "from the environment")
        _fill(site, 1, hmac_key=False)
        monkeypatch.delenv("ZJOURNAL_HMAC_KEY")
        assert _verify(site).unsigned == 1

    def test_a_writer_with_the_wrong_key_is_refused(self, site):
        _fill(site, 2, hmac_key=self.KEY)
        before = open(site.segments()[0], "rb").read()
        with pytest.raises(JournalKeyError):
            FileJournal(site.journal_dir, hmac_key=b"typo")
        assert open(site.segments()[0], "rb").read() == before
        FileJournal(site.journal_dir, hmac_key=self.KEY).close()

    def test_the_key_is_not_written_anywhere(self, site):
        _fill(site, 3, hmac_key=self.KEY)
        for name in os.listdir(site.journal_dir):
            with open(os.path.join(site.journal_dir, name), "rb") as f:
                assert self.KEY not in f.read()


class TestModes:

    def test_new_files_are_owner_only(self, site):
        _fill(site, 1)
        assert stat.S_IMODE(os.stat(site.journal_dir).st_mode) == 0o700
        for path in site.segments():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def test_the_mode_is_an_option(self, site):
        _fill(site, 1, file_mode=0o640)
        assert stat.S_IMODE(os.stat(site.journal_dir).st_mode) == 0o750
        for path in site.segments():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


class TestIdentity:

    def test_a_new_journal_takes_the_identity_asked_for(self, tmp_path):
        ident = "12345678-1234-5678-1234-567812345678"
        j = FileJournal(str(tmp_path / "j"), identity=ident)
        assert j.identity == ident
        j.close()
        j = FileJournal(str(tmp_path / "j"), identity=ident)
        j.close()
        with pytest.raises(zjournal.errors.JournalError):
            FileJournal(str(tmp_path / "j"),
                        identity="87654321-1234-5678-1234-567812345678")


def test_state_survives_the_chain_checks(site):
    _fill(site, 3)
    jdb = site.open()
    assert zodb_view(jdb)[0][0] == {"k0": 0, "k1": 1, "k2": 2}
    jdb.close()
