"""Tests of the ``zodb-journal`` command line (DESIGN.md section 7).

Most tests call :func:`zjournal.cli.main` in-process; a few run the real
console script or ``python -m zjournal.cli`` in a subprocess, where the
command registry holds only what ``--import`` brings in and where the
writer lock of the test process is held by another process.
"""
import datetime
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections import OrderedDict

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import cli
from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import MARKER_KEY
from zjournal import demo
from zjournal import recovery
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.format import encode_record
from zjournal.tests import examples
from zjournal.tests.helpers import snapshot

EXAMPLES = "zjournal.tests.examples"
FS_SUFFIXES = ("", ".index", ".lock", ".tmp")


class NotImported(Command):
    """A command whose module a rebuild with ``--import zjournal.demo``
    does not import (in a fresh process)."""

    command_name = "tests.cli.not-imported"

    def __init__(self, note):
        self.note = note

    def execute(self, root, context):
        root["cli-note"] = self.note


# -- helpers ---------------------------------------------------------------

def run(capsys, *argv):
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def run_process(*argv, cwd=None, script=False):
    """Run the CLI in a fresh Python process."""
    if script:
        cmd = [os.path.join(os.path.dirname(sys.executable), "zodb-journal")]
    else:
        cmd = [sys.executable, "-m", "zjournal.cli"]
    return subprocess.run(cmd + [str(a) for a in argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def open_writer(journal_dir, data_fs, **journal_kw):
    journal_kw.setdefault("fsync", "never")
    return JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(str(data_fs))),
        FileJournal(str(journal_dir), **journal_kw))


def live_state(jdb):
    transaction.abort()
    conn = jdb.open()
    try:
        return examples.state(conn.root())
    finally:
        conn.close()


def read_zodb(data_fs):
    """(examples.state, marker journal id, marker last seq) of a Data.fs."""
    storage = ZODB.FileStorage.FileStorage(str(data_fs), read_only=True)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        marker = root.get(MARKER_KEY)
        result = (examples.state(root),
                  None if marker is None else marker.journal_id,
                  None if marker is None else marker.last_seq)
        conn.close()
        return result
    finally:
        db.close()


def transaction_count(data_fs):
    storage = ZODB.FileStorage.FileStorage(str(data_fs), read_only=True)
    try:
        return sum(1 for _ in storage.iterator())
    finally:
        storage.close()


def readonly_entries(journal_dir):
    with FileJournal(str(journal_dir), readonly=True) as journal:
        return list(journal.entries())


def segment_paths(journal_dir):
    return sorted(os.path.join(str(journal_dir), n)
                  for n in os.listdir(str(journal_dir)) if n.endswith(".zjl"))


def first_seq(segment):
    return int(os.path.basename(segment)[:20])


def iso_utc(t, suffix="Z"):
    text = datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat()
    return text.replace("+00:00", suffix)


def target_files(data_fs):
    return [str(data_fs) + s for s in FS_SUFFIXES
            if os.path.exists(str(data_fs) + s)]


def workload():
    """Commands for the shared journal: every example kind, varied args."""
    commands = []
    for i in range(24):
        kind = i % 4
        if kind == 0:
            commands.append(examples.Put("k%02d" % i, i))
        elif kind == 1:
            commands.append(examples.Increment("c%d" % (i % 3), by=i))
        elif kind == 2:
            commands.append(examples.Stamp("s%02d" % i))
        else:
            commands.append(examples.Put(
                "n%02d" % i, {"list": [1, 2.5, None, True], "text": "é%d" % i}))
    return commands


class Journal:
    """A journal written through JournaledDB, with its live history."""

    def __init__(self, root, commands, segment_size=1024):
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.dir = os.path.join(self.root, "journal")
        self.data_fs = os.path.join(self.root, "Data.fs")
        self.commands = commands
        # states[n]: the live state right after n commands
        self.states = []
        jdb = open_writer(self.dir, self.data_fs, segment_size=segment_size)
        try:
            self.states.append(live_state(jdb))
            for command in commands:
                jdb.execute(command)
                self.states.append(live_state(jdb))
                # distinct times, more than a microsecond apart
                time.sleep(0.001)
            self.identity = jdb.journal.identity
            self.last_seq = jdb.journal.last_seq
        finally:
            jdb.close()
        self.entries = readonly_entries(self.dir)

    @property
    def state(self):
        return self.states[-1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A multi-segment journal the read-only tests share (never changed)."""
    return Journal(tmp_path_factory.mktemp("shared"), workload())


@pytest.fixture
def small(tmp_path):
    """A private single-segment journal a test may damage."""
    return Journal(tmp_path / "small", [
        examples.Put("a", 1), examples.Increment("x"), examples.Stamp("s"),
        examples.Put("b", 2), examples.Increment("x", by=5),
        examples.Put("c", 3)], segment_size=1 << 20)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def append_bytes(path, data):
    with open(path, "ab") as f:
        f.write(data)


def torn_record(seq):
    """The first half of a valid record: a write that never completed."""
    record = encode_record(seq, time.time(), FLAG_END, 1, b"tests.put",
                           pickle.dumps({"key": "torn", "value": 0}, 4))
    return record[:len(record) // 2]


# -- the console script ----------------------------------------------------

def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "zodb-journal")
    assert os.access(script, os.X_OK)
    proc = run_process("--help", script=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("info", "verify", "dump", "stats", "rebuild", "export",
                 "import", "salvage", "demo"):
        assert name in proc.stdout


def test_console_script_verify_exit_status(shared, small, tmp_path):
    proc = run_process("verify", shared.dir, script=True)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    segment = segment_paths(small.dir)[-1]
    append_bytes(segment, torn_record(small.last_seq + 1))
    proc = run_process("verify", small.dir, script=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


# -- info ------------------------------------------------------------------

def test_info_human(shared, capsys):
    before = snapshot(shared.dir)
    status, out, err = run(capsys, "info", shared.dir)
    assert status == 0, err
    assert shared.identity in out
    assert "seq:        1 .. %d" % shared.last_seq in out
    n_segments = len(segment_paths(shared.dir))
    assert n_segments > 1
    assert "segments:   %d " % n_segments in out
    assert "writer:     none" in out
    assert snapshot(shared.dir) == before


def test_info_json(shared, capsys):
    status, out, err = run(capsys, "info", shared.dir, "--json")
    assert status == 0, err
    info = json.loads(out)
    segments = segment_paths(shared.dir)
    assert info["identity"] == shared.identity
    assert info["first_seq"] == 1
    assert info["last_seq"] == shared.last_seq == len(shared.commands)
    assert info["segments"] == len(segments)
    assert info["bytes"] == sum(os.path.getsize(p) for p in segments)
    assert info["writer_active"] is False
    assert info["torn_tail"] is None


def test_info_file_uri(shared, capsys):
    status, out, err = run(capsys, "info", "file://" + shared.dir, "--json")
    assert status == 0, err
    assert json.loads(out)["last_seq"] == shared.last_seq


def test_info_beside_a_writer_changes_nothing(tmp_path, capsys):
    jdir = tmp_path / "journal"
    jdb = open_writer(jdir, tmp_path / "Data.fs")
    try:
        for i in range(5):
            jdb.execute(examples.Put("k%d" % i, i))
        before = snapshot(jdir)
        status, out, err = run(capsys, "info", jdir)
        assert status == 0, err
        assert jdb.journal.identity in out
        assert "1 .. 5" in out
        assert "writer:     active" in out
        status, out, err = run(capsys, "info", jdir, "--json")
        assert status == 0, err
        info = json.loads(out)
        assert info["last_seq"] == 5
        assert info["writer_active"] is True
        # the lock is held by this process: another process sees it too
        proc = run_process("info", jdir, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["writer_active"] is True
        assert snapshot(jdir) == before
        # the writer is undisturbed
        jdb.execute(examples.Put("after", 1))
        assert jdb.journal.last_seq == 6
    finally:
        jdb.close()


def test_info_on_a_directory_no_writer_opened_yet(tmp_path, capsys):
    # What the buildout recipe leaves at install: an empty journal, not
    # an error; and the reader creates nothing to make it look whole.
    jdir = tmp_path / "journal"
    jdir.mkdir()
    status, out, err = run(capsys, "info", jdir)
    assert status == 0, err
    assert "identity:   none yet" in out
    assert "seq:        1 .. 0" in out
    status, out, err = run(capsys, "info", "file://%s" % jdir, "--json")
    assert status == 0, err
    info = json.loads(out)
    assert (info["identity"], info["last_seq"], info["segments"]) == (
        None, 0, 0)
    assert os.listdir(jdir) == []
    # The first writer gives it its identity.
    with FileJournal(str(jdir)) as journal:
        identity = journal.identity
    status, out, err = run(capsys, "info", jdir, "--json")
    assert json.loads(out)["identity"] == identity


def test_info_on_a_directory_holding_something_else_is_refused(
        tmp_path, capsys):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    (jdir / "notes.txt").write_text("not a journal")
    status, out, err = run(capsys, "info", jdir)
    assert status == 1
    assert "no segment files" in err
    assert "Traceback" not in err


def test_info_reports_torn_tail(small, capsys):
    segment = segment_paths(small.dir)[-1]
    size = os.path.getsize(segment)
    append_bytes(segment, torn_record(small.last_seq + 1))
    before = snapshot(small.dir)
    status, out, err = run(capsys, "info", small.dir)
    assert status == 0, err
    assert "tail:       incomplete" in out
    assert "%s:%d" % (segment, size) in out
    assert "1 .. %d" % small.last_seq in out
    assert snapshot(small.dir) == before


# -- verify ----------------------------------------------------------------

def test_verify_good_journal(shared, capsys):
    before = snapshot(shared.dir)
    status, out, err = run(capsys, "verify", shared.dir)
    assert status == 0, err
    assert "OK" in out
    assert "FAILED" not in out
    assert "%d records" % shared.last_seq in out
    status, out, err = run(capsys, "verify", shared.dir, "--decode")
    assert status == 0, err
    assert "OK" in out
    assert snapshot(shared.dir) == before


def test_verify_empty_journal(tmp_path, capsys):
    FileJournal(str(tmp_path / "journal"), fsync="never").close()
    status, out, err = run(capsys, "verify", tmp_path / "journal")
    assert status == 0, err
    assert "OK" in out


@pytest.mark.parametrize("where", ["first segment", "last segment"])
def test_verify_flipped_byte_in_middle_record(tmp_path, capsys, where):
    journal = Journal(tmp_path, [examples.Put("k%02d" % i, "v" * 40)
                                 for i in range(30)], segment_size=1024)
    segments = segment_paths(journal.dir)
    assert len(segments) >= 2
    index = 0 if where == "first segment" else len(segments) - 1
    path = segments[index]
    firsts = [first_seq(p) for p in segments] + [float("inf")]
    in_segment = [e for e in journal.entries
                  if firsts[index] <= e.seq < firsts[index + 1]]
    assert len(in_segment) >= 3
    victim = in_segment[len(in_segment) // 2]
    # a byte of the payload, near the end of the record
    flip_byte(path, victim.offset + victim.size - 8)
    before = snapshot(journal.dir)
    status, out, err = run(capsys, "verify", journal.dir)
    assert status == 1
    text = out + err
    assert "FAILED" in text
    assert path in text
    assert "offset %d" % victim.offset in text
    assert "seq %d" % victim.seq in text
    assert "Traceback" not in text
    assert snapshot(journal.dir) == before


def test_verify_torn_tail_without_writer(small, capsys):
    segment = segment_paths(small.dir)[-1]
    size = os.path.getsize(segment)
    append_bytes(segment, torn_record(small.last_seq + 1))
    before = snapshot(small.dir)
    status, out, err = run(capsys, "verify", small.dir)
    assert status == 1
    assert "FAILED" in out
    assert "incomplete tail" in out
    assert "%s:%d" % (segment, size) in out
    # a reader never cuts: the bytes are still there, nothing was saved
    assert snapshot(small.dir) == before
    assert os.path.getsize(segment) > size


def test_verify_torn_tail_beside_a_writer_is_a_write_in_progress(
        tmp_path, capsys):
    jdir = tmp_path / "journal"
    jdb = open_writer(jdir, tmp_path / "Data.fs")
    try:
        for i in range(3):
            jdb.execute(examples.Put("k%d" % i, i))
        append_bytes(segment_paths(jdir)[-1], torn_record(4))
        before = snapshot(jdir)
        status, out, err = run(capsys, "verify", jdir)
        assert status == 0, out + err
        assert "write in progress" in out
        assert snapshot(jdir) == before
    finally:
        jdb.close()


def test_verify_decode_catches_a_payload_outside_the_allow_list(
        small, capsys):
    # A well-framed record (valid checksum) whose payload names a type
    # that is not allowed: framing is fine, decoding is not.
    payload = pickle.dumps({"key": "bad", "value": OrderedDict(a=1)}, 4)
    with FileJournal(small.dir, readonly=True) as journal:
        head = journal.head  # chained after the last record
    append_bytes(segment_paths(small.dir)[-1], encode_record(
        small.last_seq + 1, time.time(), FLAG_END, 1, b"tests.put", payload,
        prev=head))
    status, out, err = run(capsys, "verify", small.dir)
    assert status == 0, out + err
    status, out, err = run(capsys, "verify", small.dir, "--decode")
    assert status == 1
    assert "FAILED" in out
    assert "not an allowed type" in out
    assert "seq %d" % (small.last_seq + 1) in out
    # dump still shows the entry, marking its arguments undecodable
    status, out, err = run(capsys, "dump", small.dir, "--json",
                           "--start", small.last_seq + 1)
    assert status == 0, err
    (line,) = out.splitlines()
    assert "<undecodable>" in json.loads(line)["args"]


def test_verify_missing_middle_segment(tmp_path, capsys):
    journal = Journal(tmp_path, [examples.Put("k%02d" % i, "v" * 40)
                                 for i in range(30)], segment_size=1024)
    segments = segment_paths(journal.dir)
    assert len(segments) >= 3
    os.remove(segments[1])
    status, out, err = run(capsys, "verify", journal.dir)
    assert status == 1
    assert "FAILED" in out
    assert segments[2] in out


def forged_copy(journal, target, change_seq):
    """A journal with ``journal``'s identity and records, but for the
    payload of ``change_seq``: another history under the same name."""
    with FileJournal(journal.dir, readonly=True) as original:
        entries = list(original.entries())
    with FileJournal(str(target), fsync="never",
                     identity=journal.identity) as forged:
        for e in entries:
            payload = e.payload
            if e.seq == change_seq:
                payload = pickle.dumps({"key": "forged", "value": 0}, 4)
            forged.append([(e.seq, e.time, e.version, e.name, payload,
                            e.flags & FLAG_QUERY, e.metadata or None)])
    return str(target)


def set_marker_head(data_fs, head):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(data_fs)))
    try:
        with db.transaction() as conn:
            marker = conn.root()[MARKER_KEY]
            if head is None:  # a marker written before heads existed
                marker._p_activate()
                del marker.__dict__["head"]
                marker._p_changed = True
            else:
                marker.head = head
    finally:
        db.close()


def test_verify_prints_the_chain_head(shared, capsys):
    status, out, err = run(capsys, "verify", shared.dir)
    assert status == 0, err
    with FileJournal(shared.dir, readonly=True) as journal:
        head = journal.head
    assert "chain head %s; 0 signed, %d unsigned records" % (
        head.hex(), shared.last_seq) in out


def test_verify_zodb_current(shared, capsys):
    before = snapshot(os.path.dirname(shared.data_fs))
    status, out, err = run(capsys, "verify", shared.dir, "--zodb",
                           shared.data_fs)
    assert status == 0, out + err
    assert "is current: seq %d" % shared.last_seq in out
    assert out.rstrip().endswith("OK")
    # opened read-only: not a byte of the ZODB (or the journal) changed
    assert snapshot(os.path.dirname(shared.data_fs)) == before


def test_verify_zodb_behind(shared, tmp_path, capsys):
    target = tmp_path / "Behind.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 9)
    assert status == 0, err
    status, out, err = run(capsys, "verify", shared.dir, "--zodb", target)
    assert status == 0, out + err
    assert "at seq 9, behind the journal by %d" % (shared.last_seq - 9) in out


def test_verify_zodb_of_another_journal(shared, small, capsys):
    status, out, err = run(capsys, "verify", shared.dir, "--zodb",
                           small.data_fs)
    assert status == 1
    assert "FAILED" in out
    assert "built from journal %s, not from this one (%s)" % (
        small.identity, shared.identity) in out


def test_verify_zodb_ahead_of_the_journal(small, tmp_path, capsys):
    # the first four commands of the same journal: export and import
    status, out, err = run(capsys, "export", small.dir, "--stop", 5,
                           "--output", tmp_path / "e.jsonl")
    assert status == 0, err
    status, out, err = run(capsys, "import", tmp_path / "e.jsonl",
                           tmp_path / "prefix")
    assert status == 0, err
    status, out, err = run(capsys, "verify", tmp_path / "prefix", "--zodb",
                           small.data_fs)
    assert status == 1
    assert "applied commands up to seq %d, but the journal ends at seq 4" % (
        small.last_seq) in out


def test_verify_zodb_same_seq_other_history(small, tmp_path, capsys):
    forged = forged_copy(small, tmp_path / "forged", small.last_seq)
    status, out, err = run(capsys, "verify", forged)
    assert status == 0, out  # a consistent journal by itself
    status, out, err = run(capsys, "verify", forged, "--zodb", small.data_fs)
    assert status == 1
    assert "FAILED: journal head no longer matches the ZODB" in out
    assert "record %d hashes to" % small.last_seq in out


def test_verify_zodb_behind_other_history(small, tmp_path, capsys):
    target = tmp_path / "Behind.fs"
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 3)
    assert status == 0, err
    # record 5 differs: the ZODB at seq 3 cannot tell
    status, out, err = run(capsys, "verify",
                           forged_copy(small, tmp_path / "later", 5),
                           "--zodb", target)
    assert status == 0, out + err
    # record 3 differs: record 4 does not follow what the ZODB applied
    status, out, err = run(capsys, "verify",
                           forged_copy(small, tmp_path / "earlier", 3),
                           "--zodb", target)
    assert status == 1
    assert "journal head no longer matches the ZODB" in out
    assert "applied seq 3" in out


def test_verify_zodb_with_an_old_marker(small, capsys):
    set_marker_head(small.data_fs, None)
    status, out, err = run(capsys, "verify", small.dir, "--zodb",
                           small.data_fs)
    assert status == 0, out + err
    assert "predates chain hashes" in out
    # and a marker head that is wrong is found
    set_marker_head(small.data_fs, b"\x01" * 16)
    status, out, err = run(capsys, "verify", small.dir, "--zodb",
                           small.data_fs)
    assert status == 1
    assert "journal head no longer matches the ZODB" in out


def test_verify_zodb_without_marker(shared, tmp_path, capsys):
    plain = tmp_path / "Plain.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(plain)))
    with db.transaction() as conn:
        conn.root()["data"] = 1
    db.close()
    empty = tmp_path / "Empty.fs"
    ZODB.FileStorage.FileStorage(str(empty)).close()
    for target in (plain, empty):
        status, out, err = run(capsys, "verify", shared.dir, "--zodb",
                               target)
        assert status == 1
        assert "holds no zjournal marker" in out
    status, out, err = run(capsys, "verify", shared.dir, "--zodb",
                           tmp_path / "Missing.fs")
    assert status == 1
    assert "no ZODB at" in err
    assert not os.path.exists(str(tmp_path / "Missing.fs"))


def test_verify_zodb_uri_in_a_process(shared):
    proc = run_process("verify", shared.dir, "--zodb",
                       "file://" + shared.data_fs, script=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is current" in proc.stdout


def test_verify_with_a_signing_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZJOURNAL_HMAC_KEY", raising=False)
    journal = Journal(tmp_path, [examples.Put("k%d" % i, i)
                                 for i in range(4)])
    with FileJournal(journal.dir, readonly=True) as j:
        entries = list(j.entries())
    signed = tmp_path / "signed"
    with FileJournal(str(signed), fsync="never", hmac_key="k") as j:
        for e in entries:
            j.append([(e.seq, e.time, e.version, e.name, e.payload)])
    monkeypatch.setenv("TEST_KEY", "k")
    status, out, err = run(capsys, "verify", signed, "--hmac-key-env",
                           "TEST_KEY")
    assert status == 0, out + err
    assert "4 signed, 0 unsigned" in out
    monkeypatch.setenv("TEST_KEY", "not k")
    status, out, err = run(capsys, "verify", signed, "--hmac-key-env",
                           "TEST_KEY")
    assert status == 1
    assert "FAILED" in out
    status, out, err = run(capsys, "verify", signed, "--hmac-key-env",
                           "TEST_NO_SUCH_KEY")
    assert status == 1
    assert "TEST_NO_SUCH_KEY" in err and "not set" in err


# -- dump ------------------------------------------------------------------

def test_dump_text(shared, capsys):
    status, out, err = run(capsys, "dump", shared.dir)
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == len(shared.entries)
    for line, entry, command in zip(lines, shared.entries, shared.commands):
        seq, when, name, rest = line.split(" ", 3)
        assert int(seq) == entry.seq
        assert name == entry.command_name == type(command).command_name
        assert when == cli.iso(entry.time)
        for key, value in vars(command).items():
            assert "%s=%r" % (key, value) in rest


def test_dump_json(shared, capsys):
    before = snapshot(shared.dir)
    status, out, err = run(capsys, "dump", shared.dir, "--json")
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(shared.commands)
    for record, entry, command in zip(records, shared.entries,
                                      shared.commands):
        assert record["seq"] == entry.seq
        assert record["time"] == entry.time
        assert record["command_name"] == type(command).command_name
        # the arguments the command was constructed with
        assert record["args"] == vars(command)
    assert [r["seq"] for r in records] == list(range(1, shared.last_seq + 1))
    assert snapshot(shared.dir) == before


@pytest.mark.parametrize("start, stop, expected", [
    (5, 9, [5, 6, 7, 8]),
    (1, 2, [1]),
    (20, None, [20, 21, 22, 23, 24]),
    (None, 4, [1, 2, 3]),
    (9, 9, []),
    (30, None, []),
    (0, 3, [1, 2]),
])
def test_dump_start_stop(shared, capsys, start, stop, expected):
    argv = ["dump", shared.dir, "--json"]
    if start is not None:
        argv += ["--start", start]
    if stop is not None:
        argv += ["--stop", stop]
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    assert [json.loads(l)["seq"] for l in out.splitlines()] == expected


def test_dump_across_segment_boundary(shared, capsys):
    firsts = [first_seq(p) for p in segment_paths(shared.dir)]
    boundary = firsts[1]
    status, out, err = run(capsys, "dump", shared.dir, "--json",
                           "--start", boundary - 1, "--stop", boundary + 2)
    assert status == 0, err
    assert [json.loads(l)["seq"] for l in out.splitlines()] == [
        boundary - 1, boundary, boundary + 1]


def test_dump_without_import_in_a_fresh_process(shared, capsys):
    # No command class is registered in the subprocess: payloads are data.
    proc = run_process("dump", shared.dir, "--json")
    assert proc.returncode == 0, proc.stderr
    status, out, err = run(capsys, "dump", shared.dir, "--json")
    assert status == 0
    assert proc.stdout == out
    assert "<undecodable>" not in out


def test_dump_missing_import(shared, capsys):
    status, out, err = run(capsys, "dump", shared.dir, "--import",
                           "zjournal_no_such_module_xyz")
    assert status == 1
    assert "zjournal_no_such_module_xyz" in err
    assert "Traceback" not in err


def test_dump_shows_metadata_and_queries(tmp_path, capsys):
    jdb = open_writer(tmp_path / "journal", tmp_path / "Data.fs")
    try:
        jdb.execute(examples.Put("a", 1), metadata={
            "user": "alice", "description": "opened a", "ticket": 7})
        jdb.execute(examples.Put("b", 2))
    finally:
        jdb.close()
    status, out, err = run(capsys, "dump", tmp_path / "journal")
    assert status == 0, err
    first, second = out.splitlines()
    assert first.endswith("-- user='alice' description='opened a'")
    assert "--" not in second
    status, out, err = run(capsys, "dump", tmp_path / "journal", "--json")
    assert status == 0, err
    first, second = [json.loads(l) for l in out.splitlines()]
    assert (first["user"], first["description"], first["query"]) == (
        "alice", "opened a", False)
    assert first["metadata"] == {"user": "alice", "description": "opened a",
                                 "ticket": 7}
    assert (second["user"], second["description"], second["metadata"]) == (
        "", "", {})


def test_dump_marks_queries(tmp_path, capsys):
    path = tmp_path / "journal"
    with FileJournal(str(path), fsync="never") as journal:
        journal.append([(1, time.time(), 1, "tests.put",
                         pickle.dumps({"key": "q", "value": 1}, 4),
                         FLAG_QUERY, {"user": "auditor"})])
    status, out, err = run(capsys, "dump", path)
    assert status == 0, err
    assert out.rstrip().endswith("-- (query) user='auditor'")
    status, out, err = run(capsys, "dump", path, "--json")
    assert json.loads(out)["query"] is True


# -- rebuild ---------------------------------------------------------------

def test_rebuild_reproduces_the_state(shared, tmp_path, capsys):
    before = snapshot(shared.dir)
    target = tmp_path / "Rebuilt.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 0, err
    assert "rebuilt" in out
    state, journal_id, last_seq = read_zodb(target)
    # including Stamp's context.time and context.random values
    assert any(isinstance(v, tuple) for v in state[0].values())
    assert state == shared.state
    assert journal_id == shared.identity
    assert last_seq == shared.last_seq
    assert snapshot(shared.dir) == before


def test_rebuilt_zodb_opens_current_with_its_journal(shared, tmp_path,
                                                     capsys):
    jdir = tmp_path / "journal"
    shutil.copytree(shared.dir, str(jdir))
    target = tmp_path / "Rebuilt.fs"
    status, out, err = run(capsys, "rebuild", jdir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 0, err
    jdb = open_writer(jdir, target)
    try:
        assert jdb.recovery.action == "current"
        assert live_state(jdb) == shared.state
        jdb.execute(examples.Put("later", 1))
        assert jdb.journal.last_seq == shared.last_seq + 1
    finally:
        jdb.close()


def test_rebuild_until_seq(shared, tmp_path, capsys):
    target = tmp_path / "Until.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 9)
    assert status == 0, err
    state, journal_id, last_seq = read_zodb(target)
    assert last_seq == 9
    assert journal_id == shared.identity
    assert state == shared.states[9]
    assert state != shared.state
    # a later open with the journal catches up to the end
    jdir = tmp_path / "journal"
    shutil.copytree(shared.dir, str(jdir))
    jdb = open_writer(jdir, target)
    try:
        assert jdb.recovery.action == "caught up"
        assert jdb.recovery.replayed == shared.last_seq - 9
        assert live_state(jdb) == shared.state
    finally:
        jdb.close()


def test_rebuild_until_seq_beyond_the_end(shared, tmp_path, capsys):
    target = tmp_path / "Until.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 1000)
    assert status == 0, err
    state, _, last_seq = read_zodb(target)
    assert (state, last_seq) == (shared.state, shared.last_seq)


def test_rebuild_until_zero(shared, tmp_path, capsys):
    target = tmp_path / "Zero.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 0)
    assert status == 0, err
    assert read_zodb(target) == (shared.states[0], shared.identity, 0)


@pytest.mark.parametrize("style", ["Z", "+00:00", "naive", "+02:00"])
def test_rebuild_until_time_between_two_commands(shared, tmp_path, capsys,
                                                 style):
    k = 13
    t0, t1 = shared.entries[k - 1].time, shared.entries[k].time
    assert t1 - t0 > 1e-4
    middle = (t0 + t1) / 2
    if style == "+02:00":
        text = datetime.datetime.fromtimestamp(
            middle, datetime.timezone(datetime.timedelta(hours=2))
        ).isoformat()
    elif style == "naive":
        text = iso_utc(middle, suffix="")
    else:
        text = iso_utc(middle, suffix=style)
    target = tmp_path / "Until.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", text)
    assert status == 0, err
    state, _, last_seq = read_zodb(target)
    assert last_seq == k
    assert state == shared.states[k]


def test_rebuild_until_time_before_the_first_command(shared, tmp_path,
                                                     capsys):
    target = tmp_path / "Until.fs"
    text = iso_utc(shared.entries[0].time - 60)
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", text)
    assert status == 0, err
    assert read_zodb(target) == (shared.states[0], shared.identity, 0)


def test_rebuild_until_the_time_dump_shows_for_an_entry(shared, tmp_path,
                                                        capsys):
    """The time ``dump`` prints for command k, given to ``--until``,
    includes command k ("at or before that time").

    dump prints times to the microsecond; the entry chosen is one whose
    exact time lies a fraction of a microsecond after the printed time,
    the case where rounding matters.
    """
    status, out, err = run(capsys, "dump", shared.dir)
    assert status == 0, err
    shown = {int(line.split(" ")[0]): line.split(" ")[1]
             for line in out.splitlines()}
    candidates = [e for e in shared.entries[2:-2]
                  if cli.parse_until(shown[e.seq])[1].timestamp() < e.time]
    entry = candidates[0] if candidates else shared.entries[10]
    target = tmp_path / "Until.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", shown[entry.seq])
    assert status == 0, err
    state, _, last_seq = read_zodb(target)
    assert last_seq == entry.seq, (
        "--until %s (the time dump shows for seq %d, executed at %r)"
        " stopped after seq %d" % (shown[entry.seq], entry.seq, entry.time,
                                   last_seq))
    assert state == shared.states[entry.seq]



@pytest.fixture
def in_transactions(tmp_path):
    """seq 1, then seq 2..4 in one transaction, then seq 5: (journal
    directory, the live state after each transaction by seq)."""
    import zjournal
    journal_dir = tmp_path / "journal"
    jdb = open_writer(journal_dir, tmp_path / "Data.fs")
    states = {0: live_state(jdb)}
    try:
        jdb.execute(examples.Put("a", 0))
        states[1] = live_state(jdb)
        with jdb.transaction() as conn:
            for key in "abc":
                time.sleep(0.01)
                zjournal.execute(conn, examples.Put(key, 1))
        states[4] = live_state(jdb)
        time.sleep(0.01)
        jdb.execute(examples.Put("d", 1))
        states[5] = live_state(jdb)
    finally:
        jdb.close()
    return journal_dir, states


def test_rebuild_until_a_seq_inside_a_transaction_warns(
        in_transactions, tmp_path, capsys):
    journal_dir, states = in_transactions
    target = tmp_path / "Cut.fs"
    status, out, err = run(capsys, "rebuild", journal_dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 2)
    assert status == 0, err
    state, _, last_seq = read_zodb(target)
    assert last_seq == 2
    assert state not in states.values()
    assert ("zodb-journal rebuild: warning: seq 2 is inside transaction"
            " 2..4: the result holds part of it, a state the live system"
            " never committed; --until 1 or --until 4 give committed"
            " states") in err
    for until in (1, 4):
        target = tmp_path / ("At%d.fs" % until)
        status, out, err = run(capsys, "rebuild", journal_dir, "--zodb",
                               target, "--import", EXAMPLES, "--until",
                               until)
        assert status == 0, err
        assert "warning" not in err
        assert read_zodb(target)[0] == states[until]


def test_rebuild_until_a_time_inside_a_transaction_stops_before_it(
        in_transactions, tmp_path, capsys):
    journal_dir, states = in_transactions
    times = {e.seq: e.time for e in readonly_entries(journal_dir)}
    for seq in (2, 3):
        target = tmp_path / ("During%d.fs" % seq)
        status, out, err = run(capsys, "rebuild", journal_dir, "--zodb",
                               target, "--import", EXAMPLES, "--until",
                               iso_utc((times[seq] + times[seq + 1]) / 2))
        assert status == 0, err
        state, _, last_seq = read_zodb(target)
        assert (state, last_seq) == (states[1], 1)


def test_rebuild_until_beyond_the_journal_warns(in_transactions, tmp_path,
                                                capsys):
    journal_dir, states = in_transactions
    target = tmp_path / "Beyond.fs"
    status, out, err = run(capsys, "rebuild", journal_dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 9)
    assert status == 0, err
    assert read_zodb(target)[0::2] == (states[5], 5)
    assert ("zodb-journal rebuild: warning: the journal ends at seq 5,"
            " before the requested seq 9") in err


def test_rebuild_bad_until(shared, tmp_path, capsys):
    target = tmp_path / "Until.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", "yesterday")
    assert status == 1
    assert "--until" in err and "yesterday" in err
    assert not os.path.exists(str(target))


def test_rebuild_refuses_non_empty_target(shared, tmp_path, capsys):
    target = tmp_path / "target" / "Data.fs"
    os.makedirs(str(target.parent))
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--until", 5)
    assert status == 0, err
    before = snapshot(target.parent)
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 1
    assert str(target) in err and "not empty" in err
    assert "Traceback" not in err
    assert snapshot(target.parent) == before
    assert read_zodb(target)[2] == 5


def test_rebuild_refuses_a_zodb_with_other_data(shared, tmp_path, capsys):
    target = tmp_path / "Other.fs"
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(target)))
    with db.transaction() as conn:
        conn.root()["precious"] = 1
    db.close()
    before = snapshot(tmp_path)
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 1
    assert "not empty" in err
    assert snapshot(tmp_path) == before


def test_rebuild_missing_import_module(shared, tmp_path, capsys):
    target = tmp_path / "Data.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", "zjournal_no_such_module_xyz")
    assert status == 1
    assert "cannot import zjournal_no_such_module_xyz" in err
    assert "Traceback" not in err
    assert target_files(target) == []


def test_rebuild_unknown_command_in_a_fresh_process(tmp_path):
    jdir = tmp_path / "journal"
    jdb = open_writer(jdir, tmp_path / "Data.fs")
    try:
        jdb.execute(demo.OpenAccount("alice", 10))
        jdb.execute(demo.Deposit("alice", 5))
        jdb.execute(NotImported("written by code the rebuild lacks"))
        jdb.execute(demo.Deposit("alice", 7))
    finally:
        jdb.close()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "Data.fs"
    before = snapshot(jdir)
    proc = run_process("rebuild", jdir, "--zodb", target,
                       "--import", "zjournal.demo", "--batch-size", 1,
                       cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "seq 3" in proc.stderr
    assert NotImported.command_name in proc.stderr
    # the partial target (two commands were committed) is gone
    assert os.listdir(str(out_dir)) == []
    assert snapshot(jdir) == before


def test_rebuild_divergent_command(tmp_path, capsys):
    jdir = tmp_path / "journal"
    jdb = open_writer(jdir, tmp_path / "Data.fs")
    try:
        jdb.execute(examples.Put("a", 1))
        jdb.execute(examples.Put("b", 2))
        jdb.execute(examples.FailOnReplay())
        jdb.execute(examples.Put("c", 3))
    finally:
        jdb.close()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = run(capsys, "rebuild", jdir, "--zodb",
                           out_dir / "Data.fs", "--import", EXAMPLES,
                           "--batch-size", 1)
    assert status == 1
    assert "seq 3" in err
    assert examples.FailOnReplay.command_name in err
    assert "diverged" in err
    assert os.listdir(str(out_dir)) == []


def test_rebuild_corrupt_journal_removes_target(tmp_path, capsys):
    journal = Journal(tmp_path / "j", [examples.Put("k%d" % i, i)
                                       for i in range(8)],
                      segment_size=1 << 20)
    victim = journal.entries[3]
    flip_byte(segment_paths(journal.dir)[0], victim.offset + victim.size - 6)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = run(capsys, "rebuild", journal.dir, "--zodb",
                           out_dir / "Data.fs", "--import", EXAMPLES,
                           "--batch-size", 1)
    assert status == 1
    assert "corrupt journal" in err and "offset %d" % victim.offset in err
    assert os.listdir(str(out_dir)) == []


def test_rebuild_stops_before_a_torn_tail_and_leaves_it(small, tmp_path,
                                                        capsys):
    append_bytes(segment_paths(small.dir)[-1],
                 torn_record(small.last_seq + 1))
    before = snapshot(small.dir)
    target = tmp_path / "Rebuilt.fs"
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 0, err
    assert read_zodb(target) == (small.state, small.identity, small.last_seq)
    assert snapshot(small.dir) == before


@pytest.mark.parametrize("missing", ["first", "middle"])
def test_rebuild_refuses_journal_with_missing_segment(tmp_path, capsys,
                                                      missing):
    """Commands missing from the journal must not be skipped silently: a
    rebuild that replays 1..10 and 21..30 as if nothing were between them
    produces a wrong state with a marker claiming it is complete."""
    journal = Journal(tmp_path / "j", [examples.Increment("n", by=1 << i)
                                       for i in range(30)],
                      segment_size=1024)
    segments = segment_paths(journal.dir)
    assert len(segments) >= 3
    os.remove(segments[0] if missing == "first" else segments[1])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = run(capsys, "rebuild", journal.dir, "--zodb",
                           out_dir / "Data.fs", "--import", EXAMPLES)
    assert status == 1, (
        "rebuild succeeded over a journal with a missing segment; the"
        " result has marker %r and counter %r instead of %r" % (
            read_zodb(out_dir / "Data.fs")[2],
            read_zodb(out_dir / "Data.fs")[0][1], journal.state[1]))
    assert "Traceback" not in err
    assert os.listdir(str(out_dir)) == []


def test_rebuild_into_zodburi(shared, tmp_path, capsys):
    target = tmp_path / "uri" / "Data.fs"
    os.makedirs(str(target.parent))
    uri = "file://" + str(target)
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", uri,
                           "--import", EXAMPLES)
    assert status == 0, err
    assert read_zodb(target) == (shared.state, shared.identity,
                                 shared.last_seq)
    # and a non-empty URI target is refused, unchanged
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", uri,
                           "--import", EXAMPLES)
    assert status == 1
    assert "not empty" in err
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before


def test_rebuild_unknown_zodb_uri_scheme(shared, tmp_path, capsys):
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb",
                           "nosuchscheme://somewhere/Data.fs",
                           "--import", EXAMPLES)
    assert status == 1
    assert "nosuchscheme" in err
    assert "Traceback" not in err


def test_rebuild_batch_size(shared, tmp_path, capsys, monkeypatch, caplog):
    calls = []

    class Recording(recovery.Progress):
        def __call__(self, done, total):
            calls.append((done, total))
            super().__call__(done, total)

    monkeypatch.setattr(recovery, "Progress", Recording)
    caplog.set_level("INFO", logger="zjournal")
    target = tmp_path / "Batched.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--batch-size", 5)
    assert status == 0, err
    n = shared.last_seq
    assert calls == [(d, n) for d in range(5, n, 5)] + [(n, n)]
    # one commit per batch, besides the one that created the root
    assert transaction_count(target) == 1 + -(-n // 5)
    assert read_zodb(target)[0] == shared.state
    # not a terminal: progress is logged
    assert "rebuild: %d/%d commands" % (n, n) in caplog.text


def test_rebuild_bad_batch_size(shared, tmp_path, capsys):
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb",
                           tmp_path / "Data.fs", "--import", EXAMPLES,
                           "--batch-size", 0)
    assert status == 1
    assert "--batch-size" in err
    assert target_files(tmp_path / "Data.fs") == []


def test_progress_on_a_terminal():
    stream = io.StringIO()
    progress = recovery.Progress("rebuild", tty=True, stream=stream,
                                 interval=0)
    progress(3, 10)
    progress(10, 10)
    progress.close()
    text = stream.getvalue()
    assert "\rrebuild: 3/10 commands" in text
    assert "\rrebuild: 10/10 commands" in text
    assert text.endswith("\n")


def test_rebuild_in_a_fresh_process(shared, tmp_path):
    target = tmp_path / "Data.fs"
    proc = run_process("rebuild", shared.dir, "--zodb", target,
                       "--import", EXAMPLES, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert read_zodb(target) == (shared.state, shared.identity,
                                 shared.last_seq)


def append_undecodable(journal):
    """A well-framed, well-chained tests.put whose arguments name a type
    outside the allow-list: replay cannot decode it."""
    payload = pickle.dumps({"key": "bad", "value": OrderedDict(a=1)}, 4)
    with FileJournal(journal.dir, fsync="never") as writer:
        writer.append([(journal.last_seq + 1, time.time(), 1, "tests.put",
                        payload)])
        writer.append([(journal.last_seq + 2, time.time(), 1, "tests.put",
                        pickle.dumps({"key": "after", "value": 1}, 4))])


def test_rebuild_stops_at_an_undecodable_entry(small, tmp_path, capsys):
    append_undecodable(small)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb",
                           out_dir / "Data.fs", "--import", EXAMPLES)
    assert status == 1
    assert "seq %d" % (small.last_seq + 1) in err
    assert os.listdir(str(out_dir)) == []


def test_rebuild_skip_unknown(small, tmp_path, capsys):
    append_undecodable(small)
    target = tmp_path / "Forensic.fs"
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb", target,
                           "--import", EXAMPLES, "--skip-unknown")
    assert status == 0, err
    bad = small.last_seq + 1
    assert "skipped seq %d (tests.put): " % bad in out
    assert "WARNING: 1 entries were skipped" in err
    assert "NOT the state" in err
    state, _, last_seq = read_zodb(target)
    # everything but the skipped entry was applied, the one after it too
    table, counters = small.state
    assert state == (dict(table, after=1), counters)
    assert last_seq == small.last_seq + 2


def test_rebuild_skip_unknown_with_nothing_to_skip(shared, tmp_path,
                                                   capsys):
    target = tmp_path / "Data.fs"
    status, out, err = run(capsys, "rebuild", shared.dir, "--zodb", target,
                           "--import", EXAMPLES, "--skip-unknown")
    assert status == 0, err
    assert "nothing was skipped" in out
    assert "WARNING" not in err
    assert read_zodb(target)[0] == shared.state


def test_rebuild_skip_unknown_command_in_a_fresh_process(tmp_path):
    jdb = open_writer(tmp_path / "journal", tmp_path / "Data.fs")
    try:
        jdb.execute(demo.OpenAccount("alice", 10))
        jdb.execute(NotImported("written by code the rebuild lacks"))
        jdb.execute(demo.Deposit("alice", 7))
    finally:
        jdb.close()
    proc = run_process("rebuild", tmp_path / "journal", "--zodb",
                       tmp_path / "Forensic.fs", "--import", "zjournal.demo",
                       "--skip-unknown", cwd=str(tmp_path), script=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped seq 2 (%s)" % NotImported.command_name in proc.stdout
    assert "WARNING: 1 entries were skipped" in proc.stderr
    assert "--skip-unknown" in run_process("rebuild", "--help").stdout


# -- demo ------------------------------------------------------------------

def test_demo(capsys):
    status, out, err = run(capsys, "demo", "--commands", 200)
    assert status == 0, out + err
    assert "identical" in out
    assert "MISMATCH" not in out


def test_demo_keeps_its_dir_and_refuses_to_reuse_it(tmp_path, capsys):
    directory = tmp_path / "demo"
    status, out, err = run(capsys, "demo", "--dir", directory,
                           "--commands", 60)
    assert status == 0, out + err
    assert "identical" in out
    assert os.path.isdir(str(directory / "journal"))
    assert segment_paths(directory / "journal")
    assert os.path.getsize(str(directory / "Data.fs")) > 4
    before = snapshot(directory)
    status, out, err = run(capsys, "demo", "--dir", directory,
                           "--commands", 60)
    assert status != 0
    assert "already" in out + err
    assert snapshot(directory) == before
    # what the demo kept is a consistent pair
    jdb = JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(str(directory / "Data.fs"))),
        FileJournal(str(directory / "journal"), fsync="never"))
    try:
        assert jdb.recovery.action == "current"
    finally:
        jdb.close()


# -- errors ----------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    [],
    ["info"],
    ["nosuchcommand"],
    ["dump", "J", "--start", "x"],
    ["rebuild", "J", "--zodb", "Data.fs"],
    ["rebuild", "J", "--import", EXAMPLES],
    ["info", "J", "--nosuchoption"],
    ["demo", "--commands", "many"],
    ["stats", "J", "--by", "minute"],
    ["export", "J", "--format", "csv"],
    ["export", "J", "--stop", "x"],
    ["import", "F"],
    ["verify", "J", "--zodb"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_usage_error_exit_2_in_a_process():
    proc = run_process("rebuild", "J", "--zodb", "Data.fs")
    assert proc.returncode == 2
    assert "--import" in proc.stderr
    assert "Traceback" not in proc.stderr


SUBCOMMAND_ARGS = {
    "info": [],
    "verify": [],
    "dump": [],
    "stats": [],
    "export": [],
    "rebuild": ["--import", EXAMPLES],
}


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMAND_ARGS))
def test_unknown_journal_uri_scheme(subcommand, tmp_path, capsys):
    extra = list(SUBCOMMAND_ARGS[subcommand])
    if subcommand == "rebuild":
        extra += ["--zodb", tmp_path / "Data.fs"]
    status, out, err = run(capsys, subcommand, "s3://bucket/journal", *extra)
    assert status == 1
    assert "'s3'" in err and "unknown scheme" in err
    assert "Traceback" not in err
    assert target_files(tmp_path / "Data.fs") == []


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMAND_ARGS))
def test_missing_journal(subcommand, tmp_path, capsys):
    missing = tmp_path / "no-such-journal"
    extra = list(SUBCOMMAND_ARGS[subcommand])
    if subcommand == "rebuild":
        extra += ["--zodb", tmp_path / "Data.fs"]
    status, out, err = run(capsys, subcommand, missing, *extra)
    assert status == 1
    assert str(missing) in err
    assert "no journal" in err
    assert "Traceback" not in err
    # a reader creates nothing
    assert not os.path.exists(str(missing))
    assert target_files(tmp_path / "Data.fs") == []


def test_missing_journal_in_a_process(tmp_path):
    missing = tmp_path / "no-such-journal"
    proc = run_process("verify", missing, script=True)
    assert proc.returncode == 1
    assert "no journal" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(str(missing))


def test_directory_without_segments(tmp_path, capsys):
    # (info reports such a directory as an empty journal: see
    # test_info_on_a_directory_no_writer_opened_yet.)
    status, out, err = run(capsys, "verify", tmp_path)
    assert status == 1
    assert "no segment files" in err
    assert os.listdir(str(tmp_path)) == []


def test_dump_shows_arguments_that_refer_to_themselves(tmp_path, capsys):
    import pickle
    from zjournal import FileJournal
    cyclic = [1]
    cyclic.append(cyclic)  # a legal pickle that refers to itself
    payload = pickle.dumps({"cyclic": cyclic}, 4)
    path = str(tmp_path / "j")
    j = FileJournal(path, fsync="never")
    j.append([(1, 1.0, 1, "tests.deep", payload)])
    j.close()
    for extra in ([], ["--json"]):
        status, out, err = run(capsys, "dump", path, *extra)
        assert status == 0, err
        assert "Traceback" not in err
        assert out.count("\n") == 1


def test_verify_zodb_reads_a_repozo_repository(small, tmp_path, capsys):
    repository = tmp_path / "backups"
    repository.mkdir()
    subprocess.run([sys.executable, "-m", "ZODB.scripts.repozo", "-B",
                    "-f", small.data_fs, "-r", str(repository)],
                   check=True, timeout=120)
    before = snapshot(str(repository))
    status, out, err = run(capsys, "verify", small.dir, "--zodb",
                           repository)
    assert status == 0, out + err
    assert "is current: seq %d" % small.last_seq in out
    assert snapshot(str(repository)) == before
    # A repository of another journal's backups fails like its Data.fs.
    status, out, err = run(capsys, "verify", small.dir, "--zodb",
                           tmp_path / "empty-backups")
    assert status == 1
    assert "no ZODB at" in err


def test_verify_zodb_on_a_file_that_is_no_filestorage(small, tmp_path,
                                                      capsys):
    path = tmp_path / "backup.deltafs"
    path.write_bytes(b"not a FileStorage at all\n")
    status, out, err = run(capsys, "verify", small.dir, "--zodb", path)
    assert status == 1
    assert "Traceback" not in err
    assert "is not a FileStorage" in err


def test_rebuild_notes_a_torn_tail_it_did_not_replay(small, tmp_path,
                                                      capsys):
    target = tmp_path / "Rebuilt.fs"
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 0, err
    assert "incomplete transaction" not in err
    os.remove(target)
    segment = segment_paths(small.dir)[-1]
    append_bytes(segment, torn_record(small.last_seq + 1))
    status, out, err = run(capsys, "rebuild", small.dir, "--zodb", target,
                           "--import", EXAMPLES)
    assert status == 0, err
    assert "the journal ends with an incomplete transaction" in err
    assert "%s:" % segment in err
    assert "%d commands" % small.last_seq in out
