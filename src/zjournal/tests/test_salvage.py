import json
import os
import shutil

import pytest

from zjournal import FileJournal
from zjournal import JournalError
from zjournal import cli
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.salvage import salvage
from zjournal.tests.helpers import snapshot


def build(path, transactions, segment_size=1 << 20):
    """A journal of transactions given as lists of payload bytes."""
    journal = FileJournal(str(path), fsync="never",
                          segment_size=segment_size)
    for payloads in transactions:
        first = journal.last_seq + 1
        journal.append([(first + i, 1000.0 + first + i, 1, "tests.put", p)
                        for i, p in enumerate(payloads)])
    journal.close()
    os.remove(os.path.join(str(path), "journal.lock"))
    return str(path)


def records(path):
    journal = FileJournal(path, readonly=True)
    try:
        return [(e.seq, e.time, e.payload) for e in journal.entries()]
    finally:
        journal.close()


def offset_of(path, seq):
    journal = FileJournal(path, readonly=True)
    try:
        entry, = journal.entries(seq, seq + 1)
        return journal.segments()[0], entry.offset
    finally:
        journal.close()


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def payload(i):
    return b"payload-%03d" % i


class TestSalvage:

    def test_an_intact_journal_is_copied_whole(self, tmp_path):
        src = build(tmp_path / "src", [[payload(i)] for i in range(10)]
                    + [[payload(10), payload(11), payload(12)]])
        before = snapshot(src)
        report = salvage(src, str(tmp_path / "dst"))
        assert report.copied == 13 and report.dropped == []
        assert report.renumbered_from is None
        assert records(str(tmp_path / "dst")) == records(src)
        assert report.identity != FileJournal(src, readonly=True).identity
        assert snapshot(src) == before

    def test_a_damaged_record_is_dropped_and_reported(self, tmp_path):
        src = build(tmp_path / "src", [[payload(i)] for i in range(10)])
        segment, offset = offset_of(src, 5)
        flip(segment, offset + 40)
        before = snapshot(src)
        report = salvage(src, str(tmp_path / "dst"))
        assert snapshot(src) == before
        dropped, = report.dropped
        assert dropped.path == segment and dropped.offset == offset
        assert 5 in dropped.seqs and "checksum" in dropped.reason
        copied = records(str(tmp_path / "dst"))
        kept = [p for _, _, p in copied]
        assert payload(4) not in kept  # seq 5 held payload(4)
        assert kept[:4] == [payload(i) for i in range(4)]
        assert [s for s, _, _ in copied] == list(range(1, len(copied) + 1))
        assert report.renumbered_from is not None
        FileJournal(str(tmp_path / "dst"), readonly=True).verify()

    def test_a_transaction_with_a_damaged_record_is_dropped_whole(
            self, tmp_path):
        src = build(tmp_path / "src", [[payload(0)],
                                       [payload(1), payload(2), payload(3)],
                                       [payload(4)]])
        segment, offset = offset_of(src, 3)  # middle of the transaction
        flip(segment, offset + 35)
        report = salvage(src, str(tmp_path / "dst"))
        kept = [p for _, _, p in records(str(tmp_path / "dst"))]
        assert kept == [payload(0), payload(4)]
        assert sorted(set().union(*[d.seqs for d in report.dropped])) == [
            2, 3, 4]

    def test_a_foreign_segment_is_dropped(self, tmp_path):
        src = build(tmp_path / "src", [[payload(i)] for i in range(30)],
                    segment_size=300)
        other = build(tmp_path / "other", [[payload(i)] for i in range(30)],
                      segment_size=300)
        names = sorted(n for n in os.listdir(src) if n.endswith(".zjl"))
        assert len(names) >= 3
        shutil.copy(os.path.join(other, names[1]),
                    os.path.join(src, names[1]))
        report = salvage(src, str(tmp_path / "dst"))
        assert any("another journal" in d.reason for d in report.dropped)
        FileJournal(str(tmp_path / "dst"), readonly=True).verify()

    def test_records_behind_a_damaged_header_are_kept(self, tmp_path):
        src = build(tmp_path / "src", [[payload(i)] for i in range(30)],
                    segment_size=300)
        names = sorted(n for n in os.listdir(src) if n.endswith(".zjl"))
        flip(os.path.join(src, names[1]), 3)  # the magic
        report = salvage(src, str(tmp_path / "dst"))
        assert report.copied == 30
        assert report.dropped[0].size == SEGMENT_HEADER_SIZE
        assert [p for _, _, p in records(str(tmp_path / "dst"))] == [
            payload(i) for i in range(30)]

    def test_refuses_a_non_empty_target(self, tmp_path):
        src = build(tmp_path / "src", [[payload(0)]])
        dst = tmp_path / "dst"
        dst.mkdir()
        (dst / "something").write_text("x")
        with pytest.raises(JournalError):
            salvage(src, str(dst))
        assert os.listdir(str(dst)) == ["something"]

    def test_cli(self, tmp_path, capsys):
        src = build(tmp_path / "src", [[payload(i)] for i in range(10)])
        segment, offset = offset_of(src, 5)
        flip(segment, offset + 40)
        assert cli.main(["salvage", src, str(tmp_path / "dst")]) == 0
        out = capsys.readouterr().out
        assert "dropped" in out and ":%d" % offset in out
        assert "renumbered" in out
        assert cli.main(["salvage", src, str(tmp_path / "dst2"),
                         "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["dropped"][0]["offset"] == offset
        assert report["copied"] == len(records(str(tmp_path / "dst2")))
        assert cli.main(["salvage", src, str(tmp_path / "dst2")]) == 1
