"""The bank demo behind ``zodb-journal demo``.

It shows the whole promise in one run: commands go through the journal,
a command that fails leaves no trace, the Data.fs is thrown away, and a
rebuild from the journal reproduces the state exactly -- including values
the commands took from ``context.time`` and ``context.random``.

The commands below double as an example of how to write commands: they
read only the ZODB, their arguments and the context.
"""
import os
import shutil
import sys
import tempfile
import time
import random

import persistent
from BTrees.OOBTree import OOBTree

from zjournal.commands import Command

BANK_KEY = "bank"


class InsufficientFunds(Exception):
    pass


class Account(persistent.Persistent):

    def __init__(self, owner, opened):
        self.owner = owner
        self.balance = 0
        self.opened = opened
        self.last_activity = opened
        self.operations = 0


class Bank(persistent.Persistent):

    def __init__(self):
        self.accounts = OOBTree()
        self.fees = 0


def _bank(root):
    bank = root.get(BANK_KEY)
    if bank is None:
        bank = root[BANK_KEY] = Bank()
    return bank


class OpenAccount(Command):
    command_name = "demo.bank.open"

    def __init__(self, owner, initial=0):
        self.owner = owner
        self.initial = initial

    def execute(self, root, context):
        bank = _bank(root)
        if self.owner in bank.accounts:
            raise ValueError("account %r exists" % self.owner)
        account = bank.accounts[self.owner] = Account(self.owner, context.time)
        account.balance = self.initial
        return account.balance


class Deposit(Command):
    command_name = "demo.bank.deposit"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = _bank(root).accounts[self.owner]
        account.balance += self.amount
        account.last_activity = context.time
        account.operations += 1
        return account.balance


class Withdraw(Command):
    command_name = "demo.bank.withdraw"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = _bank(root).accounts[self.owner]
        if account.balance < self.amount:
            raise InsufficientFunds(self.owner)
        account.balance -= self.amount
        account.last_activity = context.time
        account.operations += 1
        return account.balance


class Transfer(Command):
    """Move money and charge a fee the bank draws at random (0-2 cents).

    The fee is not an argument: it comes from ``context.random``, so the
    journal does not hold it, yet a replay charges the same fee.
    """
    command_name = "demo.bank.transfer"

    def __init__(self, source, target, amount):
        self.source = source
        self.target = target
        self.amount = amount

    def execute(self, root, context):
        bank = _bank(root)
        source = bank.accounts[self.source]
        target = bank.accounts[self.target]
        fee = context.random.randint(0, 2)
        if source.balance < self.amount + fee:
            raise InsufficientFunds(self.source)
        source.balance -= self.amount + fee
        target.balance += self.amount
        bank.fees += fee
        for account in (source, target):
            account.last_activity = context.time
            account.operations += 1
        return source.balance


def fingerprint(root):
    """Everything the demo's state holds, as plain, comparable data."""
    bank = root[BANK_KEY]
    return (bank.fees, tuple(
        (a.owner, a.balance, a.opened, a.last_activity, a.operations)
        for a in bank.accounts.values()))


def workload(n, seed=20021005):
    """``n`` commands a few customers might send, some doomed to fail."""
    rng = random.Random(seed)
    owners = ["customer-%03d" % i for i in range(max(2, min(100, n // 30)))]
    for owner in owners:
        yield OpenAccount(owner, rng.randrange(0, 10000))
    for _ in range(n - len(owners)):
        kind = rng.random()
        owner = rng.choice(owners)
        if kind < 0.4:
            yield Deposit(owner, rng.randrange(1, 5000))
        elif kind < 0.7:
            yield Withdraw(owner, rng.randrange(1, 8000))
        else:
            yield Transfer(owner, rng.choice(owners), rng.randrange(1, 6000))


def run(directory=None, commands=3000, out=print):
    """Run the demo; return a process exit status."""
    import ZODB
    import ZODB.FileStorage

    from zjournal import recovery
    from zjournal.cli import FILESTORAGE_SUFFIXES
    from zjournal.db import JournaledDB
    from zjournal.journal import FileJournal

    if commands < 2:
        print("zodb-journal demo: --commands must be at least 2",
              file=sys.stderr)
        return 2
    temporary = directory is None
    if temporary:
        directory = tempfile.mkdtemp(prefix="zjournal-demo-")
    elif os.path.exists(os.path.join(directory, "journal")):
        print("zodb-journal demo: %s already holds a demo; remove it or pick"
              " another --dir" % directory, file=sys.stderr)
        return 1
    os.makedirs(directory, exist_ok=True)
    data_fs = os.path.join(directory, "Data.fs")
    journal_dir = os.path.join(directory, "journal")
    try:
        out("zjournal demo in %s" % directory)

        began = time.perf_counter()
        jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(data_fs)),
                          FileJournal(journal_dir))
        done = rejected = 0
        for command in workload(commands):
            try:
                jdb.execute(command)
                done += 1
            except InsufficientFunds:
                rejected += 1
        elapsed = time.perf_counter() - began
        out("1. executed %d commands in %.2fs (%.0f commits/s, each fsynced);"
            " %d more were rejected by the bank and left no trace"
            % (done, elapsed, done / elapsed, rejected))
        assert jdb.journal.last_seq == done, (jdb.journal.last_seq, done)
        conn = jdb.open()
        before = fingerprint(conn.root())
        conn.close()
        jdb.close()
        journal_bytes = sum(os.path.getsize(os.path.join(journal_dir, f))
                            for f in os.listdir(journal_dir)
                            if f.endswith(".zjl"))
        out("2. journal: %d entries, %d bytes (%.0f bytes per command)"
            % (done, journal_bytes, journal_bytes / done))

        for suffix in FILESTORAGE_SUFFIXES:
            if os.path.exists(data_fs + suffix):
                os.remove(data_fs + suffix)
        out("3. threw away Data.fs")

        journal = FileJournal(journal_dir, readonly=True)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(data_fs))
        result = recovery.rebuild(db, journal)
        out("4. rebuilt Data.fs from the journal: %d commands in %.2fs"
            " (%.0f commands/s)" % (result.replayed, result.seconds,
                                    result.replayed / result.seconds))
        conn = db.open()
        after = fingerprint(conn.root())
        conn.close()
        db.close()
        journal.close()

        if after != before:
            out("5. MISMATCH: the rebuilt state differs from the original")
            return 1
        out("5. the rebuilt state is identical: %d accounts, balances, fees"
            " (drawn from context.random) and times (context.time)"
            % len(after[1]))
        return 0
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
