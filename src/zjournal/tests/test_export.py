"""Tests of :mod:`zjournal.export`: ``zodb-journal export`` and ``import``.

The round trip is judged on bytes: an imported journal must hold the
original's records byte for byte, so that a ZODB built from the original
opens with it.  Each kind of tampering with an export is a separate case
that import must refuse, leaving nothing behind.
"""
import base64
import datetime
import json
import os
import pickle
import subprocess
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import cli
from zjournal import export
from zjournal.format import FLAG_END
from zjournal.format import GENESIS
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.tests import examples
from zjournal.tests.helpers import snapshot
from zjournal.tests.test_stats import T0
from zjournal.tests.test_stats import TRIPPED
from zjournal.tests.test_stats import Trap
from zjournal.tests.test_stats import workload
from zjournal.tests.test_stats import write_journal

EXAMPLES = "zjournal.tests.examples"
SCRIPT = os.path.join(os.path.dirname(sys.executable), "zodb-journal")
KEY_VAR = "ZJOURNAL_TEST_EXPORT_KEY"


@pytest.fixture(autouse=True)
def no_default_key(monkeypatch):
    """These tests choose their keys; a developer's key must not leak in."""
    monkeypatch.delenv("ZJOURNAL_HMAC_KEY", raising=False)


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def segments(path):
    return sorted(os.path.join(str(path), n) for n in os.listdir(str(path))
                  if n.endswith(".zjl"))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def record_bytes(path):
    """Every record of a journal, in order, without segment headers."""
    return b"".join(read(p)[SEGMENT_HEADER_SIZE:] for p in segments(path))


def lines_of(path):
    with open(str(path), encoding="utf-8") as f:
        return f.read().splitlines()


def write_lines(path, lines):
    with open(str(path), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


class Lookup(zjournal.Command):
    """A query: journaled for the record, skipped by replay."""
    command_name = "tests.export.lookup"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        return root["table"].get(self.key)


class Site:
    """A journal written by JournaledDB, with the Data.fs beside it."""

    def __init__(self, root, **journal_kw):
        journal_kw.setdefault("fsync", "never")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.journal = str(root / "journal")
        self.data_fs = str(root / "Data.fs")
        self.jdb = JournaledDB(
            ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs)),
            FileJournal(self.journal, **journal_kw), journal_queries=True)
        self.commands = []

    def run(self, n=20):
        for i in range(n):
            if i % 5 == 4:
                with self.jdb.transaction() as conn:
                    conn.transaction_manager.get().setUser("ops")
                    for command in (examples.Increment("c", by=i),
                                    examples.Put("t%d" % i, [i, 2.5])):
                        zjournal.execute(conn, command)
                        self.commands.append(command)
            else:
                command = (examples.Stamp("s%d" % i) if i % 2 else
                           examples.Put("k%d" % i, {"n": i, "é": None}))
                self.jdb.execute(command, metadata={
                    "user": "user%d" % (i % 3), "description": "step %d" % i})
                self.commands.append(command)
        self.jdb.query(Lookup("k0"), metadata={"user": "auditor"})
        self.commands.append(Lookup("k0"))
        return self

    def close(self):
        transaction.abort()
        self.jdb.close()


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path).run()
    site.close()
    return site


def export_file(capsys, journal, path, *extra):
    status, out, err = run(capsys, "export", journal, "--output", path,
                           *extra)
    assert status == 0, err
    return lines_of(path)


# -- the export ------------------------------------------------------------

def test_export_lines_describe_the_records(site, tmp_path, capsys):
    before = snapshot(site.journal)
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl")
    header, end = json.loads(lines[0]), json.loads(lines[-1])
    records = [json.loads(l) for l in lines[1:-1]]
    with FileJournal(site.journal, readonly=True) as journal:
        entries = list(journal.entries())
        assert header["journal"] == journal.identity
        assert end["head"] == journal.head.hex()
    assert header["format"] == "zjournal-export" and header["version"] == 1
    assert (header["start"], end["records"], end["last_seq"]) == (
        1, len(entries), len(entries))
    assert len(records) == len(entries) == len(site.commands)
    for record, entry, command in zip(records, entries, site.commands):
        assert record["seq"] == entry.seq
        assert record["time"] == entry.time  # the exact float
        assert record["iso"] == cli.iso(entry.time)
        assert record["command_name"] == command.command_name
        assert record["command_version"] == entry.version
        assert base64.b64decode(record["payload"]) == entry.payload
        assert record["prev"] == entry.prev.hex()
        assert record["mac"] is None
        assert record["end"] == bool(entry.flags & FLAG_END)
        assert record["metadata"] == (entry.metadata or None)
        assert record["args"] == json.loads(json.dumps(vars(command)))
    assert records[0]["prev"] == GENESIS.hex()
    # the metadata the application gave, and the transaction's user
    assert records[0]["metadata"] == {"user": "user0",
                                      "description": "step 0"}
    assert records[4]["metadata"]["user"].endswith("ops")
    assert [r["end"] for r in records[4:6]] == [False, True]
    assert [r["seq"] for r in records if r["query"]] == [len(records)]
    assert records[-1]["metadata"] == {"user": "auditor"}
    assert snapshot(site.journal) == before


def test_export_range(site, tmp_path, capsys):
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl",
                        "--start", 3, "--stop", 8)
    assert [json.loads(l)["seq"] for l in lines[1:-1]] == [3, 4, 5, 6, 7]
    assert json.loads(lines[0])["start"] == 3
    assert json.loads(lines[-1])["last_seq"] == 7
    # the end line names the hash of record 7: record 8's prev
    with FileJournal(site.journal, readonly=True) as journal:
        (eighth,) = journal.entries(8, 9)
    assert json.loads(lines[-1])["head"] == eighth.prev.hex()


def test_export_never_unpickles(tmp_path, capsys):
    path = tmp_path / "journal"
    write_journal(path, [[(T0, "evil", pickle.dumps(Trap(), 4), False,
                           None)]])
    del TRIPPED[:]
    lines = export_file(capsys, path, tmp_path / "e.jsonl")
    record = json.loads(lines[1])
    assert record["args"] is None
    assert "not an allowed type" in record["args_error"]
    assert TRIPPED == []
    # and the export imports: args are for readers
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    assert TRIPPED == []
    assert record_bytes(tmp_path / "copy") == record_bytes(path)


def test_export_to_standard_output_in_a_process(site, tmp_path, capsys):
    # UTF-8 whatever the locale's encoding: the arguments hold an "é"
    env = dict(os.environ, PYTHONIOENCODING="latin-1")
    proc = subprocess.run([SCRIPT, "export", site.journal], env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"exported %d records" % len(site.commands) in proc.stderr
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl")
    assert any("é" in line for line in lines)
    # the same lines but for the moment of export in the header
    assert proc.stdout.decode("utf-8").splitlines()[1:] == lines[1:]


def test_export_replaces_the_output_only_when_complete(site, tmp_path,
                                                       capsys):
    out = tmp_path / "e.jsonl"
    out.write_text("old\n")
    export_file(capsys, site.journal, out)
    assert lines_of(out)[0].startswith("{")
    # a damaged journal (a byte flipped in the middle): the export fails
    # and the old file stays
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (segment,) = segments(site.journal)
    data = bytearray(read(segment))
    data[len(data) // 2] ^= 0x40
    (damaged / os.path.basename(segment)).write_bytes(bytes(data))
    out.write_text("old\n")
    status, stdout, err = run(capsys, "export", damaged, "--output", out)
    assert status == 1
    assert "corrupt journal" in err
    assert "Traceback" not in err
    assert out.read_text() == "old\n"
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".part")]


# -- the round trip ----------------------------------------------------------

def test_round_trip_is_byte_identical(site, tmp_path, capsys):
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    copy = tmp_path / "copy"
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", copy)
    assert status == 0, err
    assert "imported %d records" % len(site.commands) in out
    (original,), (imported,) = segments(site.journal), segments(copy)
    a, b = read(original), read(imported)
    assert a[SEGMENT_HEADER_SIZE:] == b[SEGMENT_HEADER_SIZE:]
    # headers differ only in the creation time (and so their checksum)
    assert a[:36] == b[:36]
    status, out, err = run(capsys, "verify", copy)
    assert status == 0, out + err
    assert "OK" in out


def test_the_original_zodb_opens_with_the_imported_journal(site, tmp_path,
                                                          capsys):
    """Same identity, same history: the ZODB sees no difference."""
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    copy = tmp_path / "copy"
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", copy)
    assert status == 0, err
    status, out, err = run(capsys, "verify", copy, "--zodb", site.data_fs)
    assert status == 0, out + err
    assert "is current" in out
    jdb = JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(site.data_fs)),
        FileJournal(str(copy), fsync="never"))
    try:
        assert jdb.recovery.action == "current"
        jdb.execute(examples.Put("after", 1))
    finally:
        jdb.close()


def test_round_trip_of_many_segments_queries_and_metadata(tmp_path, capsys):
    path = tmp_path / "journal"
    write_journal(path, workload(n=300), segment_size=4096)
    assert len(segments(path)) > 3
    export_file(capsys, path, tmp_path / "e.jsonl")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    assert record_bytes(tmp_path / "copy") == record_bytes(path)
    with FileJournal(str(path), readonly=True) as a, FileJournal(
            str(tmp_path / "copy"), readonly=True) as b:
        assert (a.identity, a.last_seq, a.head) == (
            b.identity, b.last_seq, b.head)
        assert sum(e.is_query for e in b.entries()) > 10


def test_round_trip_through_pipes_in_processes(site, tmp_path):
    copy = tmp_path / "copy"
    exporter = subprocess.Popen([SCRIPT, "export", site.journal],
                                stdout=subprocess.PIPE)
    importer = subprocess.run([SCRIPT, "import", "-", str(copy)],
                              stdin=exporter.stdout, capture_output=True,
                              text=True, timeout=60)
    exporter.stdout.close()
    assert exporter.wait(timeout=60) == 0
    assert importer.returncode == 0, importer.stderr
    assert record_bytes(copy) == record_bytes(site.journal)


def test_export_of_a_prefix_ending_a_transaction_imports(site, tmp_path,
                                                         capsys):
    # seqs 5 and 6 are one transaction: stop after it
    export_file(capsys, site.journal, tmp_path / "e.jsonl", "--stop", 7)
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    whole = record_bytes(site.journal)
    part = record_bytes(tmp_path / "copy")
    assert whole.startswith(part) and len(part) < len(whole)
    with FileJournal(str(tmp_path / "copy"), readonly=True) as journal:
        assert journal.last_seq == 6


def test_an_empty_journal_round_trips(tmp_path, capsys):
    FileJournal(str(tmp_path / "empty"), fsync="never").close()
    lines = export_file(capsys, tmp_path / "empty", tmp_path / "e.jsonl")
    assert len(lines) == 2
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    with FileJournal(str(tmp_path / "copy"), readonly=True) as journal, \
            FileJournal(str(tmp_path / "empty"), readonly=True) as original:
        assert journal.identity == original.identity
        assert journal.last_seq == 0


def test_import_into_an_existing_empty_directory(site, tmp_path, capsys):
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    (tmp_path / "copy").mkdir()
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    assert record_bytes(tmp_path / "copy") == record_bytes(site.journal)


# -- signatures --------------------------------------------------------------

@pytest.fixture
def signed(tmp_path):
    site = Site(tmp_path / "signed", hmac_key=b"k1").run(10)
    site.close()
    return site


def test_signed_round_trip_needs_the_key(signed, tmp_path, capsys,
                                         monkeypatch):
    export_file(capsys, signed.journal, tmp_path / "e.jsonl")
    assert all(json.loads(l)["mac"] for l in lines_of(
        tmp_path / "e.jsonl")[1:-1])
    copy = tmp_path / "copy"
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", copy)
    assert status == 1
    assert "line 2 (seq 1)" in err and "--hmac-key-env" in err
    assert not copy.exists()
    monkeypatch.setenv(KEY_VAR, "not-k1")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", copy,
                           "--hmac-key-env", KEY_VAR)
    assert status == 1
    assert "signatures do not match the key" in err
    assert not copy.exists()
    monkeypatch.setenv(KEY_VAR, "k1")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", copy,
                           "--hmac-key-env", KEY_VAR)
    assert status == 0, err
    assert record_bytes(copy) == record_bytes(signed.journal)
    status, out, err = run(capsys, "verify", copy, "--hmac-key-env",
                           KEY_VAR)
    assert status == 0, out + err
    assert "%d signed, 0 unsigned" % len(signed.commands) in out


def test_signed_import_takes_the_default_variable(signed, tmp_path, capsys,
                                                  monkeypatch):
    export_file(capsys, signed.journal, tmp_path / "e.jsonl")
    monkeypatch.setenv("ZJOURNAL_HMAC_KEY", "k1")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    assert record_bytes(tmp_path / "copy") == record_bytes(signed.journal)


def test_a_key_signs_only_what_was_signed(site, tmp_path, capsys,
                                         monkeypatch):
    """Signing unsigned records would make other bytes than the
    original's: the key is used where the original used one."""
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    monkeypatch.setenv(KEY_VAR, "k1")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy", "--hmac-key-env", KEY_VAR)
    assert status == 0, err
    assert "(0 signed)" in out
    assert record_bytes(tmp_path / "copy") == record_bytes(site.journal)


def test_unsigned_records_are_imported_unsigned_under_the_default_key(
        site, tmp_path, capsys, monkeypatch):
    """ZJOURNAL_HMAC_KEY set in the environment does not sign records the
    original did not sign: the copy is exact."""
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    monkeypatch.setenv("ZJOURNAL_HMAC_KEY", "k1")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 0, err
    assert "(0 signed)" in out
    assert record_bytes(tmp_path / "copy") == record_bytes(site.journal)


def test_a_journal_signed_from_some_seq_on(tmp_path, capsys, monkeypatch):
    """A key added to a running journal: import switches keys at the
    same seq, and the bytes are the original's."""
    path = tmp_path / "journal"
    write_journal(path, [[(T0 + i, "x", b"%d" % i, False, None)]
                         for i in range(3)])
    with FileJournal(str(path), fsync="never", hmac_key="k2") as journal:
        journal.append([(4, T0 + 4, 1, "x", b"4"), (5, T0 + 5, 1, "x", b"5")])
    export_file(capsys, path, tmp_path / "e.jsonl")
    monkeypatch.setenv(KEY_VAR, "k2")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy", "--hmac-key-env", KEY_VAR)
    assert status == 0, err
    assert "5 records (2 signed)" in out
    assert record_bytes(tmp_path / "copy") == record_bytes(path)


def test_missing_key_variable(site, tmp_path, capsys):
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy", "--hmac-key-env",
                           "ZJOURNAL_NO_SUCH_VARIABLE")
    assert status == 1
    assert "ZJOURNAL_NO_SUCH_VARIABLE" in err
    assert not (tmp_path / "copy").exists()


# -- tampering ---------------------------------------------------------------

def _edit(field, change):
    def edit(lines, i):
        obj = json.loads(lines[i])
        obj[field] = change(obj[field])
        lines[i] = json.dumps(obj, sort_keys=True)
        return i
    return edit


def _other_payload(text):
    args = pickle.loads(base64.b64decode(text))
    args = dict(args, key=args["key"] + "x")
    return base64.b64encode(pickle.dumps(args, 4)).decode("ascii")


def _delete(lines, i):
    del lines[i]
    return i


def _swap(lines, i):
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return i


def _args(args):
    return dict(args, key=args["key"] + "x")


def _forged_payload(lines, i):
    """A new payload with args to match: only the chain can tell."""
    _edit("payload", _other_payload)(lines, i)
    return _edit("args", _args)(lines, i)


TAMPERING = {
    "payload": (_edit("payload", _other_payload), "args do not match"),
    "payload and args": (_forged_payload, "prev is"),
    "prev": (_edit("prev", lambda h: "%032x" % (int(h, 16) ^ 1)), "prev is"),
    "deleted line": (_delete, "seq 4 where seq 3 belongs"),
    "swapped lines": (_swap, "seq 4 where seq 3 belongs"),
    "time": (_edit("time", lambda t: t + 1.0), "iso is"),
    "time and iso": (lambda lines, i: _edit("iso", lambda _: cli.iso(
        json.loads(lines[i])["time"]))(lines, _edit(
            "time", lambda t: t + 1.0)(lines, i)), "prev is"),
    "metadata": (_edit("metadata", lambda m: dict(m, user="mallory")),
                 "prev is"),
    "args": (_edit("args", _args), "args do not match"),
    "end flag": (_edit("end", lambda e: not e), "end is"),
    "flags": (_edit("flags", lambda f: f ^ 2), "query is"),
    "command name": (_edit("command_name", lambda n: n + "x"), "prev is"),
    "not JSON": (lambda lines, i: lines.__setitem__(i, "{oops") or i,
                 "not JSON"),
    "time not a number": (_edit("time", lambda t: float("nan")),
                          "not a finite float"),
    "seq not a number": (_edit("seq", lambda n: "3"), "no valid seq"),
    "name not text": (_edit("command_name", lambda n: n + "\ud800"),
                      "not valid text"),
    "payload not base64": (_edit("payload", lambda p: p[:-2] + "!!"),
                           "payload does not decode"),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_a_tampered_export_is_refused(site, tmp_path, capsys, what):
    """Line 4 holds seq 3 (a Put with metadata); each change to it, or to
    the lines around it, is refused, naming the line and seq, and nothing
    is left behind."""
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl")
    assert json.loads(lines[3])["seq"] == 3
    assert json.loads(lines[3])["command_name"] == examples.Put.command_name
    edit, expected = TAMPERING[what]
    edit(lines, 3)
    write_lines(tmp_path / "bad.jsonl", lines)
    copy = tmp_path / "copy"
    status, out, err = run(capsys, "import", tmp_path / "bad.jsonl", copy)
    assert status == 1, "import accepted an export with a changed %s" % what
    assert expected in err
    # the record with the changed content, or the one after it
    assert "line 4 (seq 3)" in err or "line 5 (seq 4)" in err, err
    assert "nothing was imported" in err
    assert "Traceback" not in err
    assert not copy.exists()


@pytest.mark.parametrize("what", ["last payload", "last line", "end line",
                                  "end count", "cut inside a transaction",
                                  "line after the end"])
def test_a_changed_end_of_export_is_refused(site, tmp_path, capsys, what):
    """No record follows the last one to check its hash: the end line
    does, and it makes a shortened export evident."""
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl")
    last = len(lines) - 2  # the last record's line (0-based)
    if what == "last payload":
        # a byte after the pickle's end: the arguments read the same
        _edit("payload", lambda p: base64.b64encode(
            base64.b64decode(p) + b"\0").decode())(lines, last)
        expected = "head"
    elif what == "last line":
        del lines[last]
        expected = "the end line counts"
    elif what == "end line":
        del lines[-1]
        expected = "without the end line"
    elif what == "end count":
        _edit("records", lambda n: n + 1)(lines, len(lines) - 1)
        expected = "the end line counts"
    elif what == "cut inside a transaction":
        lines = export_file(capsys, site.journal, tmp_path / "e.jsonl",
                            "--stop", 6)
        expected = "incomplete"
    else:
        lines.append(lines[1])
        expected = "follows the end line"
    write_lines(tmp_path / "bad.jsonl", lines)
    status, out, err = run(capsys, "import", tmp_path / "bad.jsonl",
                           tmp_path / "copy")
    assert status == 1, what
    assert expected in err
    assert "line " in err
    assert not (tmp_path / "copy").exists()


def test_a_partial_export_is_refused(site, tmp_path, capsys):
    export_file(capsys, site.journal, tmp_path / "e.jsonl", "--start", 5)
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "copy")
    assert status == 1
    assert "line 1" in err and "starts at seq 5" in err
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("content, expected", [
    ("", "empty file"),
    ('{"format": "something-else"}\n', "not a zjournal export"),
    ("[1, 2]\n", "not a JSON object"),
    (b"\xff\xfe\n", "not UTF-8"),
])
def test_not_an_export(tmp_path, capsys, content, expected):
    source = tmp_path / "e.jsonl"
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        source.write_text(content)
    status, out, err = run(capsys, "import", source, tmp_path / "copy")
    assert status == 1
    assert expected in err
    assert not (tmp_path / "copy").exists()


def test_import_refuses_a_non_empty_target(site, tmp_path, capsys):
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    before = snapshot(site.journal)
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           site.journal)
    assert status == 1
    assert "not empty" in err
    assert snapshot(site.journal) == before
    # an existing empty directory that a refused import used stays, empty
    (tmp_path / "empty").mkdir()
    lines = lines_of(tmp_path / "e.jsonl")
    del lines[5]
    write_lines(tmp_path / "bad.jsonl", lines)
    status, out, err = run(capsys, "import", tmp_path / "bad.jsonl",
                           tmp_path / "empty")
    assert status == 1
    assert os.listdir(str(tmp_path / "empty")) == []


def test_import_refusal_in_a_process(site, tmp_path, capsys):
    lines = export_file(capsys, site.journal, tmp_path / "e.jsonl")
    _forged_payload(lines, 3)
    write_lines(tmp_path / "bad.jsonl", lines)
    proc = subprocess.run([SCRIPT, "import", str(tmp_path / "bad.jsonl"),
                           str(tmp_path / "copy")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "line 5 (seq 4)" in proc.stderr and "prev is" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "copy").exists()


def test_export_into_a_closed_pipe(tmp_path):
    """A reader that stops early (``| head``) ends the export quietly."""
    path = tmp_path / "journal"
    write_journal(path, workload(n=600))
    proc = subprocess.Popen([SCRIPT, "export", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_jsonable():
    value = {1: (b"\xe9", {2}), "d": datetime.date(2020, 1, 2),
             "x": object}
    assert export.jsonable(value) == {
        "1": ["é", [2]], "d": "2020-01-02", "x": str(object)}


def test_an_export_file_is_owner_only(site, tmp_path, capsys):
    import stat
    path = tmp_path / "e.jsonl"
    export_file(capsys, site.journal, path)
    assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o600


def test_deep_and_cyclic_arguments_render_without_recursing():
    from zjournal.export import MAX_RENDER_DEPTH
    from zjournal.export import jsonable
    deep = []
    for _ in range(5000):
        deep = [deep]
    rendered = jsonable({"deep": deep})
    depth, node = 0, rendered["deep"]
    while isinstance(node, list):
        node, depth = node[0], depth + 1
    assert depth == MAX_RENDER_DEPTH - 1
    assert node.startswith("<nested deeper")
    cyclic = [1]
    cyclic.append(cyclic)
    assert jsonable(cyclic) == [1, "<cycle>"]
    json.dumps(rendered)  # and json can write it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_import_moves_a_journal_to_another_backend(site, tmp_path, capsys,
                                                   backend):
    from zjournal import open_journal
    from zjournal.tests import services
    if backend == "sqlite":
        target = "sqlite://%s" % (tmp_path / "moved.sqlite")
    else:
        dsn = services.postgres_dsn()
        fields = dict(p.split("=", 1) for p in dsn.split())
        target = "postgresql://%s@%s:%s/%s?table=%s" % (
            fields["user"], fields["host"], fields["port"], fields["dbname"],
            services.unique_name("zjimport"))
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", target)
    assert status == 0, err
    with FileJournal(site.journal, readonly=True) as original:
        moved = open_journal(target, readonly=True)
        try:
            assert moved.identity == original.identity
            assert moved.head == original.head
            assert [e.encoded() for e in moved.entries()] == [
                e.encoded() for e in original.entries()]
            assert moved.verify().records == original.last_seq
        finally:
            moved.close()
    # A second import into the same journal is refused, and leaves it.
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl", target)
    assert status == 1 and "already holds a journal" in err
    moved = open_journal(target)
    try:
        assert moved.last_seq == site_last_seq(site)
    finally:
        if backend == "postgresql":
            moved.discard(moved.tail())
        else:
            moved.close()


def site_last_seq(site):
    with FileJournal(site.journal, readonly=True) as journal:
        return journal.last_seq


def test_a_failed_import_into_sqlite_removes_the_new_journal(
        site, tmp_path, capsys):
    from zjournal import open_journal
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    lines = (tmp_path / "e.jsonl").read_text().splitlines(True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:-1]))  # no end line
    target = "sqlite://%s" % (tmp_path / "moved.sqlite")
    status, out, err = run(capsys, "import", tmp_path / "cut.jsonl", target)
    assert status == 1, out
    journal = open_journal(target)
    try:
        assert journal.last_seq == 0  # nothing of the failed import stays
    finally:
        journal.close_refused()


def test_a_failed_import_leaves_records_another_writer_appended(
        site, tmp_path, capsys):
    """Someone appends to the new journal while the import runs; the import
    then fails, and must not remove what that writer was told is
    journaled."""
    from zjournal import open_journal
    from zjournal.export import import_jsonl
    from zjournal.errors import ZJournalError
    export_file(capsys, site.journal, tmp_path / "e.jsonl")
    lines = (tmp_path / "e.jsonl").read_text().splitlines(True)
    target = "sqlite://%s" % (tmp_path / "moved.sqlite")
    other = {}

    def feed():
        for i, line in enumerate(lines):
            if i == 3:  # header, records 1 and 2 are in: someone appends
                j = open_journal(target)
                j.append([(j.last_seq + 1, 1.0, 1, "intruder", b"x")])
                other["tail"] = j.tail()
                j.close()
            yield line

    with pytest.raises(ZJournalError):
        import_jsonl(feed(), target)
    j = open_journal(target, readonly=True)
    try:
        assert j.tail() == other["tail"]
        assert [e.command_name for e in j.entries()][-1] == "intruder"
    finally:
        j.close()
