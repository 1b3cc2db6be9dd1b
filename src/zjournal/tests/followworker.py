"""A writer for the follower tests: the bank demo, in a process of its own.

Run as ``python -m zjournal.tests.followworker DIR [options]``: open a
JournaledDB on ``DIR/Data.fs`` and the journal ``--journal`` (default
``DIR/journal``, a file journal of ``--segment-size`` bytes per segment,
so that it rolls over often), recovering as any application does, then
run ``--count`` bank commands of :mod:`zjournal.demo` drawn from
``--seed``.  Every fourth step is a transaction of two or three commands,
so the journal holds multi-record transactions a follower must apply
whole.  A command the bank refuses (insufficient funds) is aborted and
not journaled.

Progress goes to standard output, one line at a time, flushed: ``ready
SEQ`` once open, ``seq SEQ`` every ``--every`` steps, ``done SEQ`` at
the end.  ``--pause`` sleeps between steps, so that a test can kill the
writer in the middle of its run.  With ``--go FILE``, the steps wait for
``FILE`` to exist (after ``ready``), so that a test can start a follower
first.
"""
import argparse
import os
import random
import sys
import time

import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import demo
from zjournal.db import JournaledDB
from zjournal.uri import open_journal

OWNERS = ["customer-%02d" % i for i in range(12)]


def _accounts(jdb):
    conn = jdb.open()
    try:
        bank = conn.root().get(demo.BANK_KEY)
        return set() if bank is None else set(bank.accounts.keys())
    finally:
        conn.close()


def _command(rng):
    kind = rng.random()
    owner = rng.choice(OWNERS)
    if kind < 0.45:
        return demo.Deposit(owner, rng.randrange(1, 5000))
    if kind < 0.7:
        return demo.Withdraw(owner, rng.randrange(1, 3000))
    return demo.Transfer(owner, rng.choice(OWNERS), rng.randrange(1, 3000))


def _step(jdb, rng, i):
    """Run step ``i``: one command, or a transaction of two or three."""
    try:
        if i % 4 == 3:
            with jdb.transaction() as conn:
                for _ in range(rng.choice((2, 3))):
                    zjournal.execute(conn, _command(rng))
        else:
            jdb.execute(_command(rng))
    except demo.InsufficientFunds:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="followworker")
    parser.add_argument("dir")
    parser.add_argument("--journal", default=None)
    parser.add_argument("--segment-size", type=int, default=16 << 10)
    parser.add_argument("--fsync", default="never")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--go", default=None)
    args = parser.parse_args(argv)
    spec = args.journal or os.path.join(args.dir, "journal")
    kw = {"fsync": args.fsync}
    if "://" not in spec:
        kw["segment_size"] = args.segment_size
    jdb = JournaledDB(
        ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(args.dir, "Data.fs"))), open_journal(spec, **kw))
    try:
        rng = random.Random(args.seed)
        missing = [o for o in OWNERS if o not in _accounts(jdb)]
        for owner in missing:
            jdb.execute(demo.OpenAccount(owner, 20000))
        print("ready %d" % jdb.journal.last_seq, flush=True)
        while args.go and not os.path.exists(args.go):
            time.sleep(0.01)
        for i in range(args.count):
            _step(jdb, rng, i)
            if i % args.every == 0:
                print("seq %d" % jdb.journal.last_seq, flush=True)
            if args.pause:
                time.sleep(args.pause)
        print("done %d" % jdb.journal.last_seq, flush=True)
    finally:
        jdb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
