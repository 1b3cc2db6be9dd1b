"""Commands the tests journal.

They live in a module of their own (not in test functions) so that
subprocesses and ``zodb-journal --import zjournal.tests.examples`` can
import them by name.
"""
import persistent
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from zjournal import Command


class Counter(persistent.Persistent):

    def __init__(self):
        self.value = 0


def _table(root):
    table = root.get("table")
    if table is None:
        table = root["table"] = OOBTree()
    return table


class Put(Command):
    """table[key] = value."""
    command_name = "tests.put"

    def __init__(self, key, value):
        self.key = key
        self.value = value

    def execute(self, root, context):
        _table(root)[self.key] = self.value
        return self.value


class Increment(Command):
    """Not idempotent: applying it twice is visible."""
    command_name = "tests.increment"

    def __init__(self, name="default", by=1):
        self.name = name
        self.by = by

    def execute(self, root, context):
        counters = root.get("counters")
        if counters is None:
            counters = root["counters"] = PersistentMapping()
        counter = counters.get(self.name)
        if counter is None:
            counter = counters[self.name] = Counter()
        counter.value += self.by
        return counter.value


class Stamp(Command):
    """Records values a replay can only reproduce from the context."""
    command_name = "tests.stamp"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        value = (context.seq, context.time, context.random.random(),
                 context.random.randrange(1 << 30))
        _table(root)[self.key] = value
        return value


class Fail(Command):
    """Changes an object, then raises: must leave no trace."""
    command_name = "tests.fail"

    def __init__(self, key="failed"):
        self.key = key

    def execute(self, root, context):
        _table(root)[self.key] = "half-done"
        raise RuntimeError("Fail always fails")


class FailOnReplay(Command):
    """Succeeds live, raises when replayed: a divergence."""
    command_name = "tests.fail-on-replay"

    def execute(self, root, context):
        if context.replaying:
            raise RuntimeError("diverged")
        _table(root)["fail-on-replay"] = context.seq


def state(root):
    """The part of a root the example commands write, as plain data."""
    table = root.get("table")
    counters = root.get("counters")
    return (
        dict(table.items()) if table is not None else {},
        {k: v.value for k, v in counters.items()} if counters else {},
    )
