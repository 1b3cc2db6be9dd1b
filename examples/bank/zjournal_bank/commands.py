"""The bank's state and the commands that change it.

Everything a command does depends only on the ZODB, its arguments and its
context, so that replaying the journal into an empty Data.fs produces the
same bank: the time of an operation is ``context.time`` and its receipt
number comes from ``context.random``, both recorded by the journal.
"""
import persistent
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList

from zjournal import Command

BANK_KEY = "zjournal_bank"


class BankError(Exception):
    """A request the bank refuses; the message is shown to the customer."""


class NoSuchAccount(BankError):
    def __init__(self, owner):
        super().__init__("there is no account %r" % owner)


class AccountExists(BankError):
    def __init__(self, owner):
        super().__init__("an account %r exists already" % owner)


class InsufficientFunds(BankError):
    def __init__(self, owner, balance, amount):
        super().__init__("%s has %d, cannot pay %d" % (owner, balance, amount))


class InvalidAmount(BankError):
    pass


class Account(persistent.Persistent):

    def __init__(self, owner, opened):
        self.owner = owner
        self.opened = opened
        self.balance = 0
        # (seq, time, kind, amount, balance after, receipt)
        self.history = PersistentList()

    def record(self, context, kind, amount):
        receipt = "%08x" % context.random.getrandbits(32)
        self.history.append((context.seq, context.time, kind, amount,
                             self.balance, receipt))
        return receipt


class Bank(persistent.Persistent):

    def __init__(self):
        self.accounts = OOBTree()


def find_bank(root):
    """The bank, or None before the first account is opened (for views,
    which must not create it: they only read)."""
    return root.get(BANK_KEY)


def _bank(root):
    bank = root.get(BANK_KEY)
    if bank is None:
        bank = root[BANK_KEY] = Bank()
    return bank


def _account(root, owner):
    account = None
    if isinstance(owner, str):  # a BTree cannot compare 5 with "alice"
        account = _bank(root).accounts.get(owner)
    if account is None:
        raise NoSuchAccount(owner)
    return account


def _check_amount(amount, zero_ok=False):
    if type(amount) is not int or amount < 0 or (amount == 0 and
                                                  not zero_ok):
        raise InvalidAmount("%r is not a valid amount (a whole number of"
                            " cents, more than 0)" % (amount,))


class OpenAccount(Command):
    command_name = "zjournal_bank.open"

    def __init__(self, owner, initial=0):
        self.owner = owner
        self.initial = initial

    def execute(self, root, context):
        _check_amount(self.initial, zero_ok=True)
        if not isinstance(self.owner, str) or not self.owner.strip():
            raise BankError("an account needs an owner")
        accounts = _bank(root).accounts
        if self.owner in accounts:
            raise AccountExists(self.owner)
        account = accounts[self.owner] = Account(self.owner, context.time)
        account.balance = self.initial
        return account.record(context, "open", self.initial)


class Deposit(Command):
    command_name = "zjournal_bank.deposit"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        _check_amount(self.amount)
        account = _account(root, self.owner)
        account.balance += self.amount
        return account.record(context, "deposit", self.amount)


class Withdraw(Command):
    command_name = "zjournal_bank.withdraw"

    def __init__(self, owner, amount):
        self.owner = owner
        self.amount = amount

    def execute(self, root, context):
        _check_amount(self.amount)
        account = _account(root, self.owner)
        account.balance -= self.amount
        if account.balance < 0:
            # The balance is changed already; raising dooms the request's
            # transaction, so the change is never committed nor journaled.
            raise InsufficientFunds(self.owner, account.balance + self.amount,
                                    self.amount)
        return account.record(context, "withdraw", self.amount)


class Transfer(Command):
    command_name = "zjournal_bank.transfer"

    def __init__(self, source, target, amount):
        self.source = source
        self.target = target
        self.amount = amount

    def execute(self, root, context):
        _check_amount(self.amount)
        if self.source == self.target:
            raise BankError("a transfer needs two different accounts")
        source = _account(root, self.source)
        target = _account(root, self.target)
        if source.balance < self.amount:
            raise InsufficientFunds(self.source, source.balance, self.amount)
        source.balance -= self.amount
        target.balance += self.amount
        receipt = source.record(context, "transfer to " + self.target,
                                self.amount)
        target.history.append(source.history[-1][:2] + (
            "transfer from " + self.source, self.amount, target.balance,
            receipt))
        return receipt
