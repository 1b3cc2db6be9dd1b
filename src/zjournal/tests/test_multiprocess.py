"""Several application processes sharing one snapshot store and one
PostgreSQL journal: RelStorage (on the same PostgreSQL) or a ZEO server.

Real processes, real servers.  Each worker acknowledges a command once
``execute`` returns; afterwards the journal must hold every acknowledged
command exactly once with contiguous seqs, the shared ZODB must equal a
serial replay of the journal, and a rebuild from the journal into a fresh
FileStorage must give the identical state -- also when one worker is
SIGKILLed between its journal commit and its ZODB commit.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import open_journal
from zjournal.recovery import rebuild
from zjournal.tests import services
from zjournal.tests.examples import state
from zjournal.tests.helpers import replayed_state
from zjournal.tests.mpworker import open_store

WORKERS = 4
COUNT = 60


def _uri(dsn, table="zjournal"):
    fields = dict(p.split("=", 1) for p in dsn.split())
    return "postgresql://%s@%s:%s/%s?table=%s" % (
        fields["user"], fields["host"], fields["port"], fields["dbname"],
        table)


@pytest.fixture
def database():
    with services.fresh_database() as dsn:
        yield dsn


@pytest.fixture
def relstorage(database):
    return "relstorage:" + database, _uri(database)


@pytest.fixture
def zeo(database, tmp_path):
    from zjournal.tests.stores import ZEOServer
    server = ZEOServer(str(tmp_path / "zeo"), count=1)
    try:
        host, port = server.address
        yield "zeo:%s:%d/%s" % (host, port, server.take()), _uri(database)
    finally:
        server.stop()


def _initialize(store, uri):
    """Create the schema, the root and the marker once, as a deployment
    does before starting its application processes."""
    from zjournal import JournaledDB
    JournaledDB(ZODB.DB(open_store(store)), open_journal(uri)).close()


def _run(store, uri, tmp_path, kill=None):
    _initialize(store, uri)
    procs = []
    for w in range(WORKERS):
        env = dict(os.environ)
        if kill is not None and w == 0:
            env["ZJOURNAL_KILL_AT"] = "vote.after-sync"
            env["ZJOURNAL_KILL_COUNT"] = str(kill)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "zjournal.tests.mpworker", store, uri,
             str(w), str(COUNT), str(tmp_path / ("acks-%d" % w))],
            env=env, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err.decode(errors="replace")))
    return results


def _acks(tmp_path):
    acks, done = [], {}
    for w in range(WORKERS):
        path = tmp_path / ("acks-%d" % w)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            ack = json.loads(line)
            if ack.get("done"):
                done[w] = ack
            else:
                acks.append(ack)
    return acks, done


def _zodb_state(store):
    db = ZODB.DB(open_store(store))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            return state(conn.root())
        finally:
            tm.abort()
            conn.close()
    finally:
        db.close()


def _check(store, uri, tmp_path, results, killed=False):
    for w, (code, err) in enumerate(results):
        if killed and w == 0:
            assert code == -signal.SIGKILL, err
        else:
            assert code == 0, err
    acks, done = _acks(tmp_path)
    journal = open_journal(uri, readonly=True)
    try:
        entries = list(journal.entries())
        # Seqs contiguous, nothing lost, nothing twice.
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        puts = [e.args["key"] for e in entries if e.command_name ==
                "tests.put"]
        assert len(puts) == len(set(puts))
        increments = sum(1 for e in entries
                         if e.command_name == "tests.increment")
        acked_puts = {a["key"] for a in acks if a["kind"] == "put"}
        acked_increments = sum(1 for a in acks if a["kind"] == "increment")
        assert acked_puts <= set(puts)
        in_flight = len(entries) - len(acks)
        assert in_flight == (1 if killed else 0), in_flight
        assert increments - acked_increments in ((0, 1) if killed else (0,))
        # The shared ZODB is a serial replay of the journal (after the
        # catch-up a last open performs, for a kill at the very end).
        from zjournal import JournaledDB
        JournaledDB(ZODB.DB(open_store(store)),
                    open_journal(uri)).close()
        expected = replayed_state(journal)
        assert _zodb_state(store) == expected
        assert expected[1]["shared"] == increments
        # And a fresh FileStorage rebuilt from the journal is identical.
        fs = str(tmp_path / "rebuilt.fs")
        db = ZODB.DB(ZODB.FileStorage.FileStorage(fs))
        try:
            rebuild(db, journal)
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            assert state(conn.root()) == expected
            tm.abort()
            conn.close()
        finally:
            db.close()
    finally:
        journal.close()
    span = (max(d["ended"] for d in done.values())
            - min(d["began"] for d in done.values())) if done else 0
    return {"commands": len(entries),
            "retried": sum(d["retried"] for d in done.values()),
            "rate": len(entries) / span if span else 0}


def test_relstorage_and_postgres_journal_four_processes(relstorage,
                                                        tmp_path):
    store, uri = relstorage
    results = _run(store, uri, tmp_path)
    figures = _check(store, uri, tmp_path, results)
    assert figures["commands"] == WORKERS * COUNT
    print("relstorage: %(commands)d commands, %(retried)d retried,"
          " %(rate).0f commands/s" % figures)


def test_relstorage_one_worker_killed_mid_commit(relstorage, tmp_path):
    store, uri = relstorage
    results = _run(store, uri, tmp_path, kill=COUNT // 3)
    _check(store, uri, tmp_path, results, killed=True)


def test_zeo_and_postgres_journal_four_processes(zeo, tmp_path):
    store, uri = zeo
    results = _run(store, uri, tmp_path)
    figures = _check(store, uri, tmp_path, results)
    assert figures["commands"] == WORKERS * COUNT
    print("zeo: %(commands)d commands, %(retried)d retried,"
          " %(rate).0f commands/s" % figures)


def test_zeo_one_worker_killed_mid_commit(zeo, tmp_path):
    store, uri = zeo
    results = _run(store, uri, tmp_path, kill=COUNT // 2)
    _check(store, uri, tmp_path, results, killed=True)
