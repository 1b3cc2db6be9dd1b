"""Release 2 of the tutorial's bank (docs/evolving.rst).

Accounts now keep their movements.  The commands keep their names and
their arguments, so the journal written by release 1 needs no upcaster:
replaying it with this code builds the new data model from the start.
"""
import persistent
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList

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
        self.movements = PersistentList()   # new: (time, amount) pairs

    def move(self, amount, context):
        self.balance += amount
        self.movements.append((context.time, amount))
        self.touched = context.time


def accounts(root):
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
        # The same draw as release 1: the same account numbers on replay.
        number = "%08d" % context.random.randrange(10 ** 8)
        accounts(root)[self.owner] = Account(self.owner, number, context.time)


class Deposit(Command):
    command_name = "bank.deposit"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = accounts(root)[self.owner]
        account.move(self.amount, context)
        return account.balance


class Withdraw(Command):
    command_name = "bank.withdraw"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        account = accounts(root)[self.owner]
        if account.balance < self.amount:
            raise InsufficientFunds("%s has %d, cannot withdraw %d" % (
                self.owner, account.balance, self.amount))
        account.move(-self.amount, context)
        return account.balance
