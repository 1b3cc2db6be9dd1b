"""A worker process for test_multiprocess: one of several application
processes sharing a snapshot store and a journal.

Usage: python -m zjournal.tests.mpworker STORE JOURNAL_URI WORKER COUNT OUT

STORE is ``relstorage:<dsn>`` or ``zeo:<host>:<port>``.  Each iteration
executes one command, alternating between a conflicting one (every worker
increments the same counter) and a private one; once ``execute`` returns
the command is acknowledged, and its identity is appended to OUT and
flushed at once, so that a worker killed later still reports it.
"""
import json
import sys
import time

import ZODB

from zjournal import JournaledDB
from zjournal import open_journal
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put


def open_store(spec):
    kind, _, rest = spec.partition(":")
    if kind == "relstorage":
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        options = Options(keep_history=False)
        return RelStorage(PostgreSQLAdapter(dsn=rest, options=options),
                          options=options)
    if kind == "zeo":
        import ZEO.ClientStorage
        address, _, name = rest.partition("/")
        host, _, port = address.rpartition(":")
        return ZEO.ClientStorage.ClientStorage(
            (host, int(port)), storage=name or "1", wait=True)
    raise SystemExit("unknown store %r" % spec)


def main(store, journal_uri, worker, count, out):
    worker, count = int(worker), int(count)
    jdb = JournaledDB(ZODB.DB(open_store(store)), open_journal(journal_uri),
                      retries=1000)
    began = time.time()
    with open(out, "a") as acks:
        for k in range(count):
            if k % 2:
                jdb.execute(Increment("shared"))
                ack = {"worker": worker, "k": k, "kind": "increment"}
            else:
                key = "w%d-%d" % (worker, k)
                jdb.execute(Put(key, k))
                ack = {"worker": worker, "k": k, "kind": "put", "key": key}
            acks.write(json.dumps(ack) + "\n")
            acks.flush()
        acks.write(json.dumps({"worker": worker, "done": True,
                               "retried": jdb.retried, "began": began,
                               "ended": time.time()}) + "\n")
    jdb.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
