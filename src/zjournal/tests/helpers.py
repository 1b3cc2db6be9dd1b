"""Helpers several test modules share."""
import hashlib
import os

import transaction
import ZODB

from zjournal.journal import FileIO
from zjournal.marker import MARKER_KEY
from zjournal.marker import Marker
from zjournal.recovery import rebuild
from zjournal.recovery import replay
from zjournal.tests.examples import state


def digest(path):
    """sha256 of a file's bytes."""
    with open(str(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(directory, skip=()):
    """sha256 of every file below ``directory``, by relative path."""
    found = {}
    for base, _, files in os.walk(str(directory)):
        for name in files:
            if name in skip:
                continue
            path = os.path.join(base, name)
            found[os.path.relpath(path, str(directory))] = digest(path)
    return found


def zodb_view(jdb):
    """(state, marker seq, marker journal id) of an open JournaledDB."""
    tm = transaction.TransactionManager()
    conn = jdb.open(transaction_manager=tm)
    try:
        root = conn.root()
        marker = root[MARKER_KEY]
        return state(root), marker.last_seq, marker.journal_id
    finally:
        tm.abort()
        conn.close()


def replayed_state(journal, until_seq=None):
    """Replay the journal into a fresh MappingStorage; return its state.

    With ``until_seq``, replay the first ``until_seq`` entries only.  That
    slices the full list of entries rather than asking the journal to stop
    early, which ``test_rebuild_until_a_seq_inside_a_transaction`` checks
    on its own.
    """
    db = ZODB.DB(None)
    try:
        if until_seq is None:
            rebuild(db, journal)
            expected = journal.last_seq
        else:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()[MARKER_KEY] = Marker(journal.identity, 0)
            replay(tm, conn, list(journal.entries())[:until_seq])
            conn.close()
            expected = until_seq
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        result = state(root)
        assert root[MARKER_KEY].last_seq == expected
        conn.close()
        return result
    finally:
        db.close()


class DiskFull(FileIO):
    """Writes fail with ENOSPC while ``fail`` is set."""

    fail = False

    def write(self, fd, data):
        if self.fail:
            raise OSError(28, "No space left on device")
        super().write(fd, data)


def model(entries, increments=("tests.increment",)):
    """The state the journal implies, computed without replaying it.

    Returns (table, counters, running Increment totals by seq); a Stamp
    is modelled as ("stamp", seq, time), the part a replay must match.
    ``increments`` names the commands that add ``by`` (default 1) to a
    counter.
    """
    table, counters, totals = {}, {}, {}
    for e in entries:
        c = e.command
        if e.command_name == "tests.put":
            table[c.key] = c.value
        elif e.command_name in increments:
            counters[c.name] = counters.get(c.name, 0) + getattr(c, "by", 1)
            totals[e.seq] = counters[c.name]
        elif e.command_name == "tests.stamp":
            table[c.key] = ("stamp", e.seq, e.time)
        else:
            raise AssertionError("unexpected command in the journal: %r" % e)
    return table, counters, totals


def check_model(st, entries, increments=("tests.increment",)):
    """Assert a ZODB state equals what the journal's entries imply."""
    table, counters, _ = model(entries, increments)
    got_table, got_counters = st
    assert got_counters == counters, "an Increment applied twice or lost"
    assert sorted(got_table) == sorted(table)
    for key, expected in table.items():
        got = got_table[key]
        if isinstance(expected, tuple) and expected[:1] == ("stamp",):
            assert got[:2] == expected[1:], (key, got, expected)
        else:
            assert got == expected, (key, got, expected)


def marker_state(jdb):
    """(state, marker seq) through a new connection of a JournaledDB."""
    conn = jdb.open()
    try:
        root = conn.root()
        return state(root), root[MARKER_KEY].last_seq
    finally:
        conn.close()
