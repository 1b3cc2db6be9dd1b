"""The journal of docs/sessions.rst: a working day at the bank.

The tutorial's commands (``bank``), one every two minutes from 09:00 to
17:00 UTC on 2 November 2026, with a break from 12:00 to 13:30.  The
records are written with :meth:`FileJournal.append
<zjournal.FileJournal.append>` and those fixed times, not through a
JournaledDB and the clock, so that the page's report looks the same on
every run.  To write it yourself, with this directory on the path::

    $ PYTHONPATH=docs/examples python -m bankday journal
"""
import datetime
import sys

from zjournal import FileJournal
from zjournal import commands

from bank import Deposit, OpenAccount, Withdraw

NINE = datetime.datetime(
    2026, 11, 2, 9, 0, tzinfo=datetime.timezone.utc).timestamp()
OWNERS = ("alice", "bob", "carol")


def day():
    """``(time, command)`` pairs of the day, in order."""
    t = NINE
    for owner in OWNERS:
        yield t, OpenAccount(owner)
        yield t + 30, Deposit(owner, 1000)
        t += 120
    i = 0
    while t < NINE + 8 * 3600:
        if not 3 * 3600 <= t - NINE < 4.5 * 3600:   # the break
            owner = OWNERS[i % 3]
            if i % 5 == 4:
                yield t, Withdraw(owner, 7)
            else:
                yield t, Deposit(owner, 10 + i % 20)
            i += 1
        t += 120


def write(path):
    """Write the day's journal into the new directory ``path``; return
    its last seq."""
    journal = FileJournal(path, fsync="never")
    try:
        seq = 0
        for seq, (t, command) in enumerate(day(), 1):
            name, version, payload = commands.encode(command)
            journal.append([(seq, t, version, name, payload)])
        journal.sync()
        return seq
    finally:
        journal.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bankday JOURNAL_DIRECTORY")
    print("wrote seq 1..%d into %s" % (write(sys.argv[1]), sys.argv[1]))
