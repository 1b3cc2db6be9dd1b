"""A process that appends to a shared SQL journal, for concurrency tests.

Run as ``python -m zjournal.tests.sqlworker BACKEND TARGET WORKER COUNT
ACKS [--table T] [--fsync POLICY]``: open the journal (``BACKEND`` is
``sqlite``, ``TARGET`` the file; or ``postgresql``, ``TARGET`` the DSN)
and append ``COUNT`` single-record transactions through the raw journal
API, as several independent writers would: read ``last_seq`` and
``head``, prepare the record chained after them, append, and on
:exc:`~zjournal.errors.JournalSequenceError` (another worker got there
first) read them again and retry.

Each record is a ``tests.put`` command with key ``"w<WORKER>-<i>"``, so
the journal replays.  After each append returns, one line ``WORKER i
seq`` is appended to the file ``ACKS`` with one ``os.write`` on an
``O_APPEND`` descriptor: the test process reads which appends were
acknowledged even when the worker was killed.  The line ``done WORKER
RETRIES`` ends a worker that finished.

Crash tests set ``ZJOURNAL_KILL_AT=append.after-write`` (rows inserted,
not committed) and ``ZJOURNAL_KILL_COUNT``.
"""
import argparse
import os
import sys
import time

from zjournal import commands
from zjournal.errors import JournalSequenceError
from zjournal.tests.examples import Put


def open_journal(backend, target, table, fsync):
    from zjournal.sqljournal import PostgresJournal
    from zjournal.sqljournal import SQLiteJournal
    if backend == "sqlite":
        return SQLiteJournal(target, fsync=fsync)
    return PostgresJournal(target, table=table, fsync=fsync)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sqlworker")
    parser.add_argument("backend", choices=("sqlite", "postgresql"))
    parser.add_argument("target")
    parser.add_argument("worker", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("acks")
    parser.add_argument("--table", default="zjournal")
    parser.add_argument("--fsync", default="always")
    args = parser.parse_args(argv)
    fd = os.open(args.acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    retries = 0
    journal = open_journal(args.backend, args.target, args.table,
                           args.fsync)
    try:
        for i in range(args.count):
            name, version, payload = commands.encode(
                Put("w%d-%d" % (args.worker, i), i))
            while True:
                seq = journal.last_seq + 1
                batch = journal.prepare(
                    [(seq, time.time(), version, name, payload)],
                    journal.head)
                try:
                    journal.append(batch)
                except JournalSequenceError:
                    retries += 1
                    continue
                break
            os.write(fd, b"%d %d %d\n" % (args.worker, i, seq))
        os.write(fd, b"done %d %d\n" % (args.worker, retries))
    finally:
        journal.close()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
