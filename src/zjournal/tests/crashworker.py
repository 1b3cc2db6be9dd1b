"""A process for crash tests to kill.

Run as ``python -m zjournal.tests.crashworker MODE DIR [options]``, where
``DIR`` holds ``Data.fs`` and the journal directory ``journal`` (the layout
of ``conftest.Site``).  The crash tests start it with ``ZJOURNAL_KILL_AT``
(and ``ZJOURNAL_KILL_COUNT``) in its environment, so that it SIGKILLs
itself at a named point of the commit protocol or of recovery.

Modes:

``run``
    Open the JournaledDB (recovering) and run the deterministic workload
    of :func:`plan`, from ``--start-step`` on (to resume after a crash).
    After each step returns, one JSON line is appended to
    ``DIR/acks.jsonl`` with ``os.write`` on an ``O_APPEND`` descriptor and
    fsynced: ``{"step", "seqs", "results"}`` for an acknowledged
    commit, ``{"step", "aborted"}`` (the keys and counter names the
    step's abandoned commands would have written) for a step whose
    transaction was aborted or whose commands were rolled back.
``open``
    Open the JournaledDB (recovery runs: rebuild or catch-up, with
    ``--batch-size``), write what recovery did to ``DIR/recovery.json``,
    close.

The workload is a pure function of the step count, so the test process
computes from :func:`plan` what the journal must hold.
"""
import argparse
import json
import os
import sys

import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal.tests.examples import Fail
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp

ACKS = "acks.jsonl"
RECOVERY = "recovery.json"

# Every command an aborted step would run writes one of these: a table key
# starting with "aborted-" or the counter "aborted".  None may ever appear.
ABORTED_COUNTER = "aborted"


class Abandon(Exception):
    """Raised inside a transaction block to abort it."""


class Step:
    """One unit of the workload.

    ``kind`` is how it runs; ``journaled`` the commands that must reach the
    journal (in order, as one transaction) if the step is acknowledged;
    ``abandoned`` the table keys / counter names that must never appear.
    """

    def __init__(self, index, kind, commands, journaled, abandoned=()):
        self.index = index
        self.kind = kind
        self.commands = commands
        self.journaled = journaled
        self.abandoned = list(abandoned)

    def __repr__(self):
        return "<Step %d %s>" % (self.index, self.kind)


def plan(steps):
    """The deterministic workload: a list of :class:`Step`."""
    out = []
    for i in range(steps):
        k = i % 10
        if k == 0:
            cmds = [Increment("c%d" % (i % 3), by=1 + i % 4)]
            out.append(Step(i, "execute", cmds, cmds))
        elif k == 1:
            cmds = [Stamp("stamp-%d" % i)]
            out.append(Step(i, "execute", cmds, cmds))
        elif k == 2:
            cmds = [Increment("c%d" % (i % 3)), Stamp("stamp-%d" % i),
                    Put("put-%d" % i, i), Increment("c%d" % ((i + 1) % 3), 5)]
            out.append(Step(i, "transaction", cmds, cmds))
        elif k == 3:
            cmds = [Put("put-%d" % i, "value %d" % i)]
            out.append(Step(i, "execute", cmds, cmds))
        elif k == 4:
            # Commands run, then the block raises: all aborted.
            cmds = [Increment(ABORTED_COUNTER), Put("aborted-%d" % i, i),
                    Stamp("aborted-stamp-%d" % i)]
            out.append(Step(i, "abandon", cmds, [],
                            ["aborted-%d" % i, "aborted-stamp-%d" % i,
                             ABORTED_COUNTER]))
        elif k == 5:
            # A command fails in the middle of a transaction: all aborted.
            cmds = [Put("aborted-put-%d" % i, i), Increment(ABORTED_COUNTER),
                    Fail("aborted-fail-%d" % i),
                    Put("aborted-after-%d" % i, i)]
            out.append(Step(i, "failing-transaction", cmds, [],
                            ["aborted-put-%d" % i, "aborted-fail-%d" % i,
                             "aborted-after-%d" % i, ABORTED_COUNTER]))
        elif k == 6:
            # Savepoint after the first command; the middle is rolled back.
            first = Increment("c%d" % (i % 3), by=2)
            middle = [Put("aborted-sp-%d" % i, i), Increment(ABORTED_COUNTER)]
            last = Stamp("stamp-%d" % i)
            out.append(Step(i, "savepoint", [first] + middle + [last],
                            [first, last],
                            ["aborted-sp-%d" % i, ABORTED_COUNTER]))
        elif k == 7:
            cmds = [Fail("aborted-exec-%d" % i)]
            out.append(Step(i, "execute-fail", cmds, [],
                            ["aborted-exec-%d" % i]))
        elif k == 8:
            # Savepoint before any command: the data manager joins after it.
            middle = [Increment(ABORTED_COUNTER), Put("aborted-sp0-%d" % i, i)]
            last = Increment("c%d" % (i % 3), by=3)
            out.append(Step(i, "savepoint-first", middle + [last], [last],
                            ["aborted-sp0-%d" % i, ABORTED_COUNTER]))
        else:
            cmds = [Increment("c%d" % (i % 3)) for _ in range(3)] + [
                Stamp("stamp-%d" % i)]
            out.append(Step(i, "transaction", cmds, cmds))
    return out


def journaled_transactions(steps):
    """The (step, commands) that a complete run journals, in order."""
    return [(s, s.journaled) for s in steps if s.journaled]


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def run_step(jdb, step):
    """Run one step; return its acknowledgement record."""
    if step.kind == "execute":
        results = [jdb.execute(step.commands[0])]
    elif step.kind == "transaction":
        with jdb.transaction() as conn:
            results = [zjournal.execute(conn, c) for c in step.commands]
    elif step.kind == "abandon":
        try:
            with jdb.transaction() as conn:
                for c in step.commands:
                    zjournal.execute(conn, c)
                raise Abandon()
        except Abandon:
            return {"step": step.index, "aborted": step.abandoned}
        raise AssertionError("the block did not raise")
    elif step.kind == "failing-transaction":
        try:
            with jdb.transaction() as conn:
                for c in step.commands:
                    zjournal.execute(conn, c)
        except RuntimeError:
            return {"step": step.index, "aborted": step.abandoned}
        raise AssertionError("Fail did not fail")
    elif step.kind == "execute-fail":
        try:
            jdb.execute(step.commands[0])
        except RuntimeError:
            return {"step": step.index, "aborted": step.abandoned}
        raise AssertionError("Fail did not fail")
    elif step.kind == "savepoint":
        first, a, b, last = step.commands
        with jdb.transaction() as conn:
            results = [zjournal.execute(conn, first)]
            sp = conn.transaction_manager.savepoint()
            zjournal.execute(conn, a)
            zjournal.execute(conn, b)
            sp.rollback()
            results.append(zjournal.execute(conn, last))
    elif step.kind == "savepoint-first":
        a, b, last = step.commands
        with jdb.transaction() as conn:
            sp = conn.transaction_manager.savepoint()
            zjournal.execute(conn, a)
            zjournal.execute(conn, b)
            sp.rollback()
            results = [zjournal.execute(conn, last)]
    else:
        raise ValueError(step.kind)
    last_seq = jdb.journal.last_seq
    seqs = list(range(last_seq - len(results) + 1, last_seq + 1))
    return {"step": step.index, "seqs": seqs,
            "results": [_jsonable(r) for r in results]}


def run_plan(jdb, steps, ack=None):
    for step in steps:
        record = run_step(jdb, step)
        if ack is not None:
            ack(record)


class AckFile:
    """Appends fsynced JSON lines: a line present was acknowledged."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, record):
        data = (json.dumps(record) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def read_acks(directory):
    path = os.path.join(directory, ACKS)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def open_jdb(directory, segment_size=None, batch_size=1000, fsync="always"):
    journal_kw = {"fsync": fsync}
    if segment_size:
        journal_kw["segment_size"] = segment_size
    journal = FileJournal(os.path.join(directory, "journal"), **journal_kw)
    try:
        db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(directory, "Data.fs")))
    except BaseException:
        journal.close()
        raise
    try:
        return JournaledDB(db, journal, batch_size=batch_size)
    except BaseException:
        db.close()
        journal.close()
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(prog="crashworker")
    parser.add_argument("mode", choices=["run", "open"])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--start-step", type=int, default=0,
                        help="resume the workload at this step")
    parser.add_argument("--segment-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--fsync", default="always")
    args = parser.parse_args(argv)
    jdb = open_jdb(args.directory, segment_size=args.segment_size,
                   batch_size=args.batch_size, fsync=args.fsync)
    try:
        if args.mode == "run":
            ack = AckFile(os.path.join(args.directory, ACKS))
            try:
                run_plan(jdb, plan(args.steps)[args.start_step:], ack)
            finally:
                ack.close()
        else:
            r = jdb.recovery
            with open(os.path.join(args.directory, RECOVERY), "w") as f:
                json.dump({"action": r.action, "marker_seq": r.marker_seq,
                           "journal_seq": r.journal_seq,
                           "replayed": r.replayed}, f)
    finally:
        jdb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
