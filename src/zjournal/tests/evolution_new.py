"""The bank of ``evolution_old``, after its commands evolved.

Each change follows a recipe of ``docs/evolving.rst``, and the journal
written by ``evolution_old`` must still replay to the state it produced:

* ``Open`` moved to ``OpenAccount`` under a new name; the old name is an
  alias.
* ``Deposit`` renamed its argument ``acct`` to ``account`` (version 2),
  then made ``amount`` a ``Decimal`` (version 3); one upcaster per step.
* ``Transfer`` was split into ``Withdraw`` and ``Deposit``; a retired
  ``LegacyTransfer`` keeps its name to replay the old entries.
"""
import decimal

import persistent
from BTrees.OOBTree import OOBTree

from zjournal import Command
from zjournal.commands import upcaster


class InsufficientFunds(Exception):
    pass


class Account(persistent.Persistent):

    def __init__(self, owner, opened):
        self.owner = owner
        self.opened = opened
        self.balance = decimal.Decimal(0)


def accounts(root):
    if "accounts" not in root:
        root["accounts"] = OOBTree()
    return root["accounts"]


class OpenAccount(Command):
    command_name = "evolution.accounts.open"
    command_aliases = ("evolution.bank.open",)

    def __init__(self, acct, owner):
        self.acct = acct
        self.owner = owner

    def execute(self, root, context):
        accounts(root)[self.acct] = Account(self.owner, context.time)


class Deposit(Command):
    command_name = "evolution.bank.deposit"
    # 1: acct, amount (an int); 2: account, amount (an int);
    # 3: account, amount (a Decimal)
    command_version = 3

    def __init__(self, account, amount):
        self.account = account
        self.amount = amount

    def execute(self, root, context):
        accounts(root)[self.account].balance += self.amount


@upcaster("evolution.bank.deposit", 1)
def deposit_account_was_acct(state):
    state["account"] = state.pop("acct")
    return state


@upcaster("evolution.bank.deposit", 2)
def deposit_amount_is_decimal(state):
    state["amount"] = decimal.Decimal(state["amount"])
    return state


class Withdraw(Command):
    command_name = "evolution.bank.withdraw"

    def __init__(self, account, amount):
        self.account = account
        self.amount = amount

    def execute(self, root, context):
        account = accounts(root)[self.account]
        if account.balance < self.amount:
            raise InsufficientFunds(self.account)
        account.balance -= self.amount


class LegacyTransfer(Command):
    """Replays the transfers journaled before the split, as the new code
    would run them: a withdrawal and a deposit."""
    command_name = "evolution.bank.transfer"
    command_retired = "execute Withdraw and Deposit in one transaction"

    def execute(self, root, context):
        amount = decimal.Decimal(self.amount)
        Withdraw(self.source, amount).execute(root, context)
        Deposit(self.target, amount).execute(root, context)


def snapshot(root):
    """The bank as plain data, as ``evolution_old.snapshot`` gives it."""
    return {acct: {"owner": a.owner, "opened": a.opened,
                   "balance": str(a.balance)}
            for acct, a in accounts(root).items()}
