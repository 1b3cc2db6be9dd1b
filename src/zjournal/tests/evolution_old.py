"""The bank as its first release wrote it: the old side of the evolution tests.

``test_evolution`` runs :func:`main` in a subprocess, so that these classes
and their successors in ``evolution_new`` (which answer to the same names)
never meet in one registry, exactly as old and new code never meet in one
process.  ``fixtures/evolution/make_fixture.py`` uses it too, to write the
journal that is checked in.

Do not change what this module journals: it stands for code that is gone.
Its successors are in ``evolution_new``.

Run as ``python -m zjournal.tests.evolution_old JOURNAL DATA_FS SNAPSHOT``.
"""
import json
import sys

import persistent
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree

from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import execute


class InsufficientFunds(Exception):
    pass


class Account(persistent.Persistent):

    def __init__(self, owner, opened):
        self.owner = owner
        self.opened = opened
        self.balance = 0


def accounts(root):
    if "accounts" not in root:
        root["accounts"] = OOBTree()
    return root["accounts"]


class Open(Command):
    command_name = "evolution.bank.open"

    def __init__(self, acct, owner):
        self.acct = acct
        self.owner = owner

    def execute(self, root, context):
        accounts(root)[self.acct] = Account(self.owner, context.time)


class Deposit(Command):
    command_name = "evolution.bank.deposit"

    def __init__(self, acct, amount):
        self.acct = acct
        self.amount = amount

    def execute(self, root, context):
        accounts(root)[self.acct].balance += self.amount


class Transfer(Command):
    command_name = "evolution.bank.transfer"

    def __init__(self, source, target, amount):
        self.source = source
        self.target = target
        self.amount = amount

    def execute(self, root, context):
        source = accounts(root)[self.source]
        if source.balance < self.amount:
            raise InsufficientFunds(self.source)
        source.balance -= self.amount
        accounts(root)[self.target].balance += self.amount


def snapshot(root):
    """The bank as plain data, for comparison with a replay by new code."""
    return {acct: {"owner": a.owner, "opened": a.opened,
                   "balance": str(a.balance)}
            for acct, a in accounts(root).items()}


def session(jdb):
    """A day at the bank, using every command and both ways to commit."""
    jdb.execute(Open("a-1", "Alice"))
    jdb.execute(Open("b-1", "Bob"))
    jdb.execute(Deposit("a-1", 100))
    jdb.execute(Transfer("a-1", "b-1", 30))
    try:
        jdb.execute(Transfer("b-1", "a-1", 500))
    except InsufficientFunds:
        pass  # refused, so not journaled: the replay must not see it
    with jdb.transaction() as conn:
        execute(conn, Open("c-1", "Carol"))
        execute(conn, Deposit("c-1", 7))
        execute(conn, Transfer("b-1", "c-1", 12))
    jdb.execute(Deposit("b-1", 5))


def main(argv=None):
    journal_dir, data_fs, snapshot_path = (
        sys.argv[1:] if argv is None else argv)
    jdb = JournaledDB(ZODB.DB(ZODB.FileStorage.FileStorage(data_fs)),
                      FileJournal(journal_dir))
    try:
        session(jdb)
        tm = transaction.TransactionManager()
        conn = jdb.open(transaction_manager=tm)
        try:
            state = {"accounts": snapshot(conn.root()),
                     "last_seq": jdb.journal.last_seq}
        finally:
            tm.abort()
            conn.close()
    finally:
        jdb.close()
    with open(snapshot_path, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
