"""Quick side-by-side figures: commit rate and rebuild rate.

    python benchmarks/quick.py [--commits N] [--rebuild N] [--rounds R]

Measures, in one run and interleaved round by round:

* commit: ``jdb.execute`` of a tiny command (fsync="always") against
  plain ZODB FileStorage commits of the same mutation, both fsyncing;
* rebuild: replaying N tiny commands from a journal into a fresh
  FileStorage.

Prints one JSON object (medians and every round's figure).  The machine is
shared and noisy: compare the ratio, not the absolute rates.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import persistent
import transaction
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import recovery


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


def plain_commits(directory, n):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(directory,
                                                           "plain.fs")))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root["counter"] = Counter()
    tm.commit()
    began = time.perf_counter()
    for _ in range(n):
        root["counter"].value += 1
        tm.commit()
    elapsed = time.perf_counter() - began
    conn.close()
    db.close()
    return n / elapsed


def journaled_commits(directory, n):
    jdb = zjournal.JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(directory,
                                                          "j.fs"))),
        zjournal.FileJournal(os.path.join(directory, "j.journal")))
    jdb.execute(Bump())
    began = time.perf_counter()
    for _ in range(n):
        jdb.execute(Bump())
    elapsed = time.perf_counter() - began
    jdb.close()
    return n / elapsed


def make_journal(path, n):
    journal = zjournal.FileJournal(path, fsync="never")
    name, version, payload = zjournal.commands.encode(Bump())
    t = time.time()
    batch = []
    for seq in range(1, n + 1):
        batch.append((seq, t, version, name, payload))
        if len(batch) == 1000:
            journal.append(batch)
            batch = []
    if batch:
        journal.append(batch)
    size = sum(os.path.getsize(p) for p in journal.segments())
    journal.close()
    return size


def rebuild(directory, journal_path, n, tag):
    target = os.path.join(directory, "rebuilt-%s.fs" % tag)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(target))
    journal = zjournal.FileJournal(journal_path, readonly=True)
    result = recovery.rebuild(db, journal)
    assert result.replayed == n
    conn = db.open()
    assert conn.root()["counter"].value == n
    conn.close()
    db.close()
    journal.close()
    return n / result.seconds


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--rebuild", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="zjournal-bench-")
    try:
        journal_path = os.path.join(directory, "rebuild.journal")
        journal_bytes = make_journal(journal_path, args.rebuild)
        plain, journaled, rebuilds = [], [], []
        for r in range(args.rounds):
            sub = os.path.join(directory, "round%d" % r)
            os.mkdir(sub)
            # Alternate the order so that neither side always runs first.
            if r % 2:
                journaled.append(journaled_commits(sub, args.commits))
                plain.append(plain_commits(sub, args.commits))
            else:
                plain.append(plain_commits(sub, args.commits))
                journaled.append(journaled_commits(sub, args.commits))
            rebuilds.append(rebuild(sub, journal_path, args.rebuild, r))
        report = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "commit": {
                "commands": args.commits,
                "plain_filestorage_per_s": statistics.median(plain),
                "jdb_execute_per_s": statistics.median(journaled),
                "ratio": statistics.median(
                    j / p for j, p in zip(journaled, plain)),
                "rounds": {"plain": plain, "journaled": journaled},
            },
            "rebuild": {
                "commands": args.rebuild,
                "per_s": statistics.median(rebuilds),
                "seconds": args.rebuild / statistics.median(rebuilds),
                "rounds": rebuilds,
            },
            "journal_bytes_per_command": journal_bytes / args.rebuild,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
