"""The commands of the tutorial (docs/tutorial.rst).

A command reads only the ZODB, its own arguments and its context, so that
replaying it later produces exactly the state it produced the first time.
"""
import persistent
from BTrees.OOBTree import OOBTree

from zjournal import Command


class InsufficientFunds(Exception):
    pass


class Account(persistent.Persistent):

    def __init__(self, owner, number, opened):
        self.owner = owner
        self.number = number
        self.opened = opened
        self.touched = opened
        self.balance = 0


def accounts(root):
    """The accounts BTree, created on first use."""
    if "accounts" not in root:
        root["accounts"] = OOBTree()
    return root["accounts"]


class OpenAccount(Command):
    command_name = "bank.open"

    def __init__(self, owner):
        self.owner = owner

    def execute(self, root, context):
        if self.owner in accounts(root):
            raise ValueError("%s already has an account" % self.owner)
        # Drawn from the context, not from the random module: a replay
        # draws the same number, although the journal does not store it.
        number = "%08d" % context.random.randrange(10 ** 8)
        accounts(root)[self.owner] = Account(self.owner, number, context.time)


class Deposit(Command):
    command_name = "bank.deposit"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = accounts(root)[self.owner]
        account.balance += self.amount
        account.touched = context.time   # not time.time()
        return account.balance


class Withdraw(Command):
    command_name = "bank.withdraw"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = accounts(root)[self.owner]
        account.balance -= self.amount
        if account.balance < 0:
            # The change above is never committed: a command that raises
            # dooms its transaction.
            raise InsufficientFunds("%s has %d, cannot withdraw %d" % (
                self.owner, account.balance + self.amount, self.amount))
        account.touched = context.time
        return account.balance
