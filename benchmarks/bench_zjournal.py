"""zjournal's own measurements: commit, group commit, rebuild, scan, open.

The commands used here are deliberately small, so that what is measured is
zjournal's own cost (encoding, framing, syncing, decoding, replaying), not
the application's:

* ``bench.bump`` -- a *tiny command*: add ``by`` to one persistent counter;
  its pickled arguments are ``{"by": 1}`` (about 20 bytes);
* ``bench.note`` -- a command with a ~10 KiB text argument, stored on one
  of 100 persistent documents (so a replay batch of 100 commands writes
  ~1 MiB to the FileStorage).
"""
import cProfile
import os
import pstats
import random
import string
import threading
import time

import persistent
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree

import zjournal
from zjournal import commands
from zjournal import recovery

import bench_util

NOTE_SIZE = 10 * 1024
NOTE_KEYS = 100


class Counter(persistent.Persistent):
    value = 0


class Bump(zjournal.Command):
    command_name = "bench.bump"

    def __init__(self, by=1):
        self.by = by

    def execute(self, root, context):
        counter = root.get("counter")
        if counter is None:
            counter = root["counter"] = Counter()
        counter.value += self.by
        return counter.value


class Doc(persistent.Persistent):
    text = ""
    updates = 0
    touched = None


class Note(zjournal.Command):
    command_name = "bench.note"

    def __init__(self, key, text):
        self.key = key
        self.text = text

    def execute(self, root, context):
        docs = root.get("docs")
        if docs is None:
            docs = root["docs"] = OOBTree()
        doc = docs.get(self.key)
        if doc is None:
            doc = docs[self.key] = Doc()
        doc.text = self.text
        doc.updates += 1
        doc.touched = context.time


def note_texts(count=16, size=NOTE_SIZE, seed=7):
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;\n"
    return ["".join(rng.choices(alphabet, k=size)) for _ in range(count)]


def open_fs(path):
    return ZODB.DB(ZODB.FileStorage.FileStorage(path))


# -- building journals ------------------------------------------------------

def make_journal(path, kind, n, per_txn=None):
    """Write ``n`` commands of ``kind`` ("tiny" or "note") to a new journal.

    Appends directly (``FileJournal.append``, ``fsync="never"``, one sync at
    the end) in transactions of ``per_txn`` records: this builds a
    million-command journal in seconds, and the bytes are exactly those
    ``jdb.execute`` would write, except that only the last record of each
    transaction carries the END flag.
    """
    if kind == "tiny":
        per_txn = per_txn or 1000
        encoded = [commands.encode(Bump())]
    elif kind == "note":
        per_txn = per_txn or 100
        texts = note_texts()
        encoded = [commands.encode(Note(k % NOTE_KEYS, texts[k % len(texts)]))
                   for k in range(NOTE_KEYS * len(texts) // 4)]
    else:
        raise ValueError(kind)
    began = time.perf_counter()
    journal = zjournal.FileJournal(path, fsync="never")
    t = time.time()
    batch = []
    payload_bytes = 0
    for seq in range(1, n + 1):
        name, version, payload = encoded[seq % len(encoded)]
        payload_bytes += len(payload)
        batch.append((seq, t, version, name, payload))
        if len(batch) >= per_txn:
            journal.append(batch)
            batch = []
            t += 0.001
    if batch:
        journal.append(batch)
    journal.sync()
    segments = journal.segments()
    size = sum(os.path.getsize(p) for p in segments)
    journal.close()
    return {
        "path": path,
        "kind": kind,
        "commands": n,
        "records_per_transaction": per_txn,
        "bytes": size,
        "segments": len(segments),
        "payload_bytes": payload_bytes,
        "name_bytes": len(encoded[0][0].encode("utf-8")),
        "build_seconds": time.perf_counter() - began,
    }


def size_figures(info):
    """Journal bytes per command, and the part beyond the pickled arguments."""
    from zjournal.format import SEGMENT_HEADER_SIZE
    n = info["commands"]
    records = info["bytes"] - info["segments"] * SEGMENT_HEADER_SIZE
    per_cmd = records / n
    payload = info["payload_bytes"] / n
    return {
        "commands": n,
        "journal_bytes": info["bytes"],
        "bytes_per_command": per_cmd,
        "pickled_argument_bytes_per_command": payload,
        "overhead_bytes_per_command": per_cmd - payload,
        "of_which_command_name_bytes": info["name_bytes"],
        "segment_header_bytes": info["segments"] * SEGMENT_HEADER_SIZE,
    }


# -- commit -------------------------------------------------------------------

class PlainCommitter:
    """Plain FileStorage commits of ``counter.value += 1`` (fsync in finish)."""

    def __init__(self, directory):
        self.db = open_fs(os.path.join(directory, "plain.fs"))
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        self.root = self.conn.root()
        self.root["counter"] = Counter()
        self.tm.commit()

    def run(self, n):
        """Commit ``n`` times; return (wall seconds, CPU seconds)."""
        root, tm = self.root, self.tm
        cpu = time.process_time()
        began = time.perf_counter()
        for _ in range(n):
            root["counter"].value += 1
            tm.commit()
        return time.perf_counter() - began, time.process_time() - cpu

    def close(self):
        self.conn.close()
        self.db.close()


class JournaledCommitter:
    """``jdb.execute(Bump())``: the same mutation as a journaled command."""

    def __init__(self, directory, fsync="always"):
        self.jdb = zjournal.JournaledDB(
            open_fs(os.path.join(directory, "journaled-%s.fs" % fsync)),
            zjournal.FileJournal(
                os.path.join(directory, "journaled-%s.journal" % fsync),
                fsync=fsync))

    def run(self, n):
        """Execute ``n`` commands; return (wall seconds, CPU seconds)."""
        execute = self.jdb.execute
        cpu = time.process_time()
        began = time.perf_counter()
        for _ in range(n):
            execute(Bump())
        return time.perf_counter() - began, time.process_time() - cpu

    def close(self):
        self.jdb.close()


def interleaved_commits(directory, n, block=25, offset=0):
    """Commit rates of three paths, in alternating blocks of ``block``.

    All three databases stay open; each block of ``block`` commits goes to
    the next path in a rotating order, so that the machine's noise, which
    changes over seconds, falls on all three alike.  Returns commands/s:

    ``plain``             FileStorage commit (fsync in tpc_finish)
    ``journaled``         ``jdb.execute``, journal fsync="always"
    ``journaled_nosync``  ``jdb.execute``, journal fsync="never" (a
                          diagnostic: it separates the journal's fsync from
                          the rest of the journaled path's cost)

    Returns ``(rates, cpu_us)``: commands/s, and CPU microseconds per
    commit (``time.process_time``; the rest of the wall time is waiting,
    mostly for fsync).
    """
    paths = {"plain": PlainCommitter(directory),
             "journaled": JournaledCommitter(directory, "always"),
             "journaled_nosync": JournaledCommitter(directory, "never")}
    try:
        for committer in paths.values():
            committer.run(10)  # warm up
        spent = dict.fromkeys(paths, 0.0)
        cpu = dict.fromkeys(paths, 0.0)
        names = list(paths)
        for i in range(max(1, n // block)):
            for name in bench_util.rotate(names, offset + i):
                wall, used = paths[name].run(block)
                spent[name] += wall
                cpu[name] += used
        done = max(1, n // block) * block
        return ({name: done / seconds for name, seconds in spent.items()},
                {name: 1e6 * used / done for name, used in cpu.items()})
    finally:
        for committer in paths.values():
            committer.close()


# -- group commit ---------------------------------------------------------------

class Unavailable(Exception):
    pass


def threaded_commits(directory, policy, threads, total):
    """``total`` tiny commands from ``threads`` threads; commands/s.

    Returns ``(rate, transactions)``: transactions is the number of journal
    transactions written (from the END flags), so ``total / transactions``
    is the mean group size.
    """
    try:
        journal = zjournal.FileJournal(os.path.join(directory, "j.journal"),
                                       fsync=policy)
    except ValueError as e:
        raise Unavailable("FileJournal(fsync=%r) raised ValueError: %s"
                          % (policy, e))
    jdb = zjournal.JournaledDB(open_fs(os.path.join(directory, "j.fs")),
                               journal)
    jdb.execute(Bump())
    first = jdb.journal.last_seq + 1
    per_thread = total // threads
    barrier = threading.Barrier(threads + 1)
    errors = []

    def work():
        try:
            barrier.wait()
            for _ in range(per_thread):
                jdb.execute(Bump())
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    if errors:
        jdb.close()
        raise errors[0]
    done = per_thread * threads
    last = jdb.journal.last_seq
    conn = jdb.open()
    value = conn.root()["counter"].value
    conn.close()
    transactions = sum(1 for e in jdb.journal.entries(first, last + 1)
                       if e.flags & 1)
    jdb.close()
    assert last - first + 1 == done, (last, first, done)
    assert value == done + 1, (value, done)
    return done / elapsed, transactions


# -- rebuild (runs in a child process) ----------------------------------------

def expected_state(kind, n):
    return n if kind == "tiny" else min(n, NOTE_KEYS)


def observed_state(kind, root):
    if kind == "tiny":
        return root["counter"].value
    if kind == "note":
        return len(root["docs"])
    raise ValueError(kind)


def child_rebuild(spec):
    """Rebuild ``spec["journal"]`` into a new FileStorage; time and memory."""
    journal_path, target, kind = spec["journal"], spec["target"], spec["kind"]
    bench_util.remove(target)
    baseline_peak = bench_util.peak_rss_kib()
    baseline_now = bench_util.current_rss_kib()
    began = time.perf_counter()
    db = open_fs(target)
    journal = zjournal.FileJournal(journal_path, readonly=True)
    opened = time.perf_counter()
    profiler = cProfile.Profile() if spec.get("profile") else None
    if profiler:
        profiler.enable()
    result = recovery.rebuild(db, journal)
    if profiler:
        profiler.disable()
    done = time.perf_counter()
    peak = bench_util.peak_rss_kib()
    n = result.replayed
    conn = db.open()
    state = observed_state(kind, conn.root())
    conn.close()
    db.close()
    journal.close()
    if state != expected_state(kind, n):
        raise AssertionError("rebuilt state %r, expected %r"
                             % (state, expected_state(kind, n)))
    out = {
        "replayed": n,
        "seconds": done - opened,
        "seconds_with_open": done - began,
        "rate": n / (done - opened),
        "baseline_rss_kib": baseline_now,
        "baseline_peak_rss_kib": baseline_peak,
        "peak_rss_kib": peak,
        "target_bytes": os.path.getsize(target),
    }
    if profiler:
        out["profile"] = top_functions(profiler, spec.get("top", 25))
    if not spec.get("keep"):
        bench_util.remove(target)
    return out


def top_functions(profiler, count):
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append((tt, ct, nc, cc, "%s:%d(%s)" % (_short(path), line, func)))
    rows.sort(reverse=True)
    return {
        "total_seconds": total,
        "by_tottime": [
            {"function": where, "ncalls": nc, "primitive_calls": cc,
             "tottime": round(tt, 4), "tottime_pct": round(100 * tt / total, 1),
             "cumtime": round(ct, 4)}
            for tt, ct, nc, cc, where in rows[:count]],
    }


def _short(path):
    for marker in ("site-packages/", "src/", "lib/python3"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):]
    return path


# -- scan ------------------------------------------------------------------

def scan(journal_path):
    journal = zjournal.FileJournal(journal_path, readonly=True)
    try:
        report = journal.verify()
    finally:
        journal.close()
    return {
        "records": report.records,
        "bytes": report.bytes,
        "seconds": report.seconds,
        "records_per_s": report.records / report.seconds,
        "mb_per_s": report.bytes / report.seconds / 1e6,
    }


# -- open --------------------------------------------------------------------

def time_open(fs_path, journal_path):
    """Seconds to open a JournaledDB whose marker is current (and close it)."""
    began = time.perf_counter()
    jdb = zjournal.JournaledDB(open_fs(fs_path),
                               zjournal.FileJournal(journal_path))
    elapsed = time.perf_counter() - began
    action = jdb.recovery.action
    jdb.close()
    if action != "current":
        raise AssertionError("open found %r, expected a current marker"
                             % action)
    return elapsed


def time_journal_open(journal_path):
    began = time.perf_counter()
    journal = zjournal.FileJournal(journal_path)
    elapsed = time.perf_counter() - began
    journal.close()
    return elapsed


# -- diagnostics -------------------------------------------------------------

def child_breakdown(spec):
    """Where a rebuild of tiny commands spends its time, stage by stage.

    Each stage adds work to the previous one, in one process, best of
    ``repeat`` passes (the least disturbed pass: this is CPU-bound):

    read     iterate ``journal.entries()`` (read, check, frame records)
    decode   + look up the class and decode each command (``commands``)
    execute  + ``command.execute`` on a root held in memory (no ZODB)
    rebuild  the real ``recovery.rebuild`` into a fresh FileStorage
    """
    path, target = spec["journal"], spec["target"]
    repeat = spec.get("repeat", 3)
    journal = zjournal.FileJournal(path, readonly=True)
    n = journal.last_seq

    def read():
        for _ in journal.entries():
            pass

    def decode():
        cache = {}
        for e in journal.entries():
            cls = cache.get(e.command_name)
            if cls is None:
                cls = cache[e.command_name] = commands.lookup(e.command_name)
            commands.build(cls, e.version, e.payload, e.seq)

    def execute():
        cache = {}
        root = {"counter": Counter()}
        Context = commands.Context
        for e in journal.entries():
            cls = cache.get(e.command_name)
            if cls is None:
                cls = cache[e.command_name] = commands.lookup(e.command_name)
            cmd = commands.build(cls, e.version, e.payload, e.seq)
            cmd.execute(root, Context(e.seq, e.time, True))
        assert root["counter"].value == n

    def rebuild():
        bench_util.remove(target)
        db = open_fs(target)
        recovery.rebuild(db, zjournal.FileJournal(path, readonly=True))
        db.close()
        bench_util.remove(target)

    stages = {}
    for name, func in (("read", read), ("decode", decode),
                       ("execute", execute), ("rebuild", rebuild)):
        best = None
        for _ in range(repeat):
            began = time.perf_counter()
            func()
            elapsed = time.perf_counter() - began
            best = elapsed if best is None else min(best, elapsed)
        stages[name] = best
    journal.close()
    us = {k: 1e6 * v / n for k, v in stages.items()}
    return {
        "commands": n,
        "best_of": repeat,
        "us_per_command": us,
        "rate": {k: n / v for k, v in stages.items()},
        "us_per_command_by_layer": {
            "read_and_check_records": us["read"],
            "decode_commands": us["decode"] - us["read"],
            "execute_commands": us["execute"] - us["decode"],
            "zodb_commits_marker_and_rest": us["rebuild"] - us["execute"],
        },
    }
