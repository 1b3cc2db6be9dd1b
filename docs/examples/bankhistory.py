"""A bank journal with fixed times, for pages that show a journal's output.

The pages whose examples print times, sizes and chain hashes
(pointintime.rst, cli.rst) run on this journal: the tutorial's commands,
three accounts opened from 09:00 UTC on 2 November 2026 and then one
command a minute.  It is written with :meth:`FileJournal.append
<zjournal.FileJournal.append>` and those times, rather than through a
JournaledDB and the clock, so that the output is the same on every run.
Opening a ZODB with the journal then builds the application's state from
it, as recovery always does.
"""
import datetime

from zjournal import FileJournal
from zjournal import commands

from bank import Deposit, OpenAccount, Withdraw

START = datetime.datetime(
    2026, 11, 2, 9, 0, tzinfo=datetime.timezone.utc).timestamp()


def history():
    """47 commands; seq 37 is a withdrawal from the wrong account."""
    for owner in ("alice", "bob", "carol"):
        yield OpenAccount(owner)
        yield Deposit(owner, 1000)
    for i in range(40):
        owner = ("alice", "bob", "carol")[i % 3]
        if i == 30:
            yield Withdraw("carol", 900)
        if i % 4 == 3:
            yield Withdraw(owner, 20 + i)
        else:
            yield Deposit(owner, 10 + i)


def write(path, commands_=None, identity=None, step=60):
    """Journal ``commands_`` (default: :func:`history`) at ``path``, one
    every ``step`` seconds from :data:`START`; return the journal's
    identity."""
    journal = FileJournal(path, fsync="never", identity=identity)
    try:
        for seq, command in enumerate(commands_ or history(), 1):
            name, version, payload = commands.encode(command)
            journal.append([(seq, START + step * (seq - 1), version, name,
                             payload)])
        journal.sync()
        return journal.identity
    finally:
        journal.close()
