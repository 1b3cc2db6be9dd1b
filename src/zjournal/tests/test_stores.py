"""JournaledDB on every kind of snapshot store, with the default FileJournal.

The stores (see :mod:`zjournal.tests.stores`): FileStorage, MappingStorage,
RelStorage on PostgreSQL (history-free and history-preserving: a fresh
database per store) and ZEO (a real server process; a module's tests share
server processes, each store is a storage no test used before).  Other
clients of a RelStorage database or a ZEO storage are what other processes
see; a few checks run in another process for real.

PostgreSQL tests skip without a server, unless ``CI`` is set (see
:mod:`zjournal.tests.services`).
"""
import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import transaction
import ZODB.POSException

import zjournal
from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import commands
from zjournal import recovery
from zjournal.marker import get_marker
from zjournal.tests import services
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.examples import state
from zjournal.tests.stores import KINDS
from zjournal.tests.stores import SHARED_KINDS
from zjournal.tests.stores import StoreMaker
from zjournal.tests.stores import ZEOServers
from zjournal.tests.stores import read_in_another_process

EXAMPLES = "zjournal.tests.examples"


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def zeo_servers(tmp_path_factory):
    servers = ZEOServers(str(tmp_path_factory.mktemp("zeo")))
    yield servers
    servers.stop()


@pytest.fixture
def stores(tmp_path, zeo_servers):
    with StoreMaker(str(tmp_path), zeo_servers) as maker:
        yield maker


def _make(stores, kind):
    if kind.startswith("relstorage"):
        services.postgres_dsn()  # skip (or fail under CI) without PostgreSQL
    return stores.make(kind)


@pytest.fixture(params=KINDS)
def store(request, stores):
    return _make(stores, request.param)


@pytest.fixture(params=SHARED_KINDS)
def shared_store(request, stores):
    return _make(stores, request.param)


@pytest.fixture
def journal_dir(tmp_path):
    return str(tmp_path / "journal")


@pytest.fixture
def journaled(stores, journal_dir):
    """open(store, **kw): a JournaledDB on a new client of ``store``, with
    the test's FileJournal (default options); closed after the test."""
    opened = []

    def open_(store, **kw):
        jdb = JournaledDB(store.db(), FileJournal(journal_dir), **kw)
        opened.append(jdb)
        return jdb

    yield open_
    for jdb in opened:
        jdb.close()


# -- helpers -----------------------------------------------------------------

def view(db):
    """(state, marker seq, marker journal id, marker head) in ``db`` now."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()  # (opening does not sync with a ZEO server; this does)
        root = conn.root()
        marker = get_marker(root)
        return state(root), marker.last_seq, marker.journal_id, marker.head
    finally:
        tm.abort()
        conn.close()


def journal_view(journal):
    return journal.last_seq, journal.identity, journal.head


def append_behind_the_back(journal, command):
    """Append ``command`` as the next transaction of ``journal`` directly:
    what a process that died (or whose ZODB failed to finish) after its
    journal vote leaves behind.  Returns its seq."""
    name, version, payload = commands.encode(command)
    seq = journal.last_seq + 1
    journal.append(journal.prepare(
        [(seq, time.time(), version, name, payload)], journal.head))
    return seq


def history(jdb):
    """Seven commands through every entry point; returns the Stamp's
    journal entry."""
    first = jdb.journal.last_seq + 1
    assert jdb.execute(Put("a", 1)) == 1
    assert jdb.execute(Increment("n")) == 1
    with jdb.transaction() as conn:
        zjournal.execute(conn, Increment("n", 2))
        zjournal.execute(conn, Stamp("stamp"))
        zjournal.execute(conn, Put("b", [1, "two"]))
    tm = transaction.TransactionManager()
    conn = jdb.open(transaction_manager=tm)
    try:
        with tm:  # the application's transaction, committed by it
            assert zjournal.execute(conn, Increment("m", 5)) == 5
            zjournal.execute(conn, Put("c", "app"))
        tm.begin()
        zjournal.execute(conn, Put("aborted", 1))
        tm.abort()  # journals nothing
    finally:
        conn.close()
    entries = list(jdb.journal.entries(first))
    assert [e.seq for e in entries] == list(range(first, first + 7))
    stamp = entries[3]
    assert stamp.command_name == "tests.stamp"
    return stamp


# -- committing ---------------------------------------------------------------

def test_every_entry_point_commits(store, journaled):
    jdb = journaled(store)
    assert jdb.recovery.action == "initialized"
    stamp = history(jdb)
    (table, counters), seq, journal_id, head = view(jdb.db)
    assert counters == {"n": 3, "m": 5}
    assert table["a"] == 1 and table["b"] == [1, "two"]
    assert table["c"] == "app" and "aborted" not in table
    assert table["stamp"][:2] == (4, stamp.time)
    assert (seq, journal_id, head) == journal_view(jdb.journal)
    before = view(jdb.db)
    jdb.close()
    # A new client (a restart) finds it all in the store.
    jdb = journaled(store)
    assert jdb.recovery.action == "current"
    assert view(jdb.db) == before


def test_threads_never_see_conflict_errors(store, journaled):
    jdb = journaled(store)
    results, errors = [], []

    def work():
        try:
            for _ in range(15):
                results.append(jdb.execute(Increment("n")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Each increment saw the one before it: they were serialized.
    assert sorted(results) == list(range(1, 31))
    (_, counters), seq, _, head = view(jdb.db)
    assert counters == {"n": 30}
    assert jdb.journal.last_seq == seq == 30
    assert head == jdb.journal.head


class RacedIncrement(Command):
    """Increment("n"), raced on its first run by another client that
    commits a change to the same counter (a real conflict in the store)."""
    command_name = "tests.stores.raced-increment"
    race = None  # set by the test: a callable run once
    runs = 0

    def execute(self, root, context):
        RacedIncrement.runs += 1
        counter = root["counters"]["n"]
        counter.value  # loaded from this transaction's snapshot
        race, RacedIncrement.race = RacedIncrement.race, None
        if race is not None:
            race()
        counter.value += 1
        return counter.value


def test_a_conflict_with_another_client_is_retried(shared_store, journaled):
    jdb = journaled(shared_store)
    jdb.execute(Increment("n"))
    other = shared_store.db()

    def race():
        tm = transaction.TransactionManager()
        conn = other.open(tm)
        with tm:
            conn.root()["counters"]["n"].value += 100
        conn.close()

    RacedIncrement.race, RacedIncrement.runs = race, 0
    assert jdb.execute(RacedIncrement()) == 102
    assert RacedIncrement.runs >= 2  # the store raised a conflict, retried
    assert [e.command_name for e in jdb.journal.entries()] == [
        "tests.increment", "tests.stores.raced-increment"]
    (_, counters), seq, _, head = view(jdb.db)
    assert counters == {"n": 102}
    assert (seq, head) == (2, jdb.journal.head)


# -- other clients ------------------------------------------------------------

def test_another_client_sees_the_committed_state(shared_store, journaled):
    jdb = journaled(shared_store)
    jdb.execute(Put("pre", 0))
    # A client open all along, its cache holding the objects that change:
    # it must learn of the changes (RelStorage polls, ZEO invalidates; a
    # ZEO client needs server_sync to see them as soon as a transaction
    # begins, rather than soon after).
    other = shared_store.db(server_sync=True)
    tm = transaction.TransactionManager()
    conn = other.open(tm)
    assert state(conn.root()) == ({"pre": 0}, {})
    tm.abort()
    history(jdb)
    expected = view(jdb.db)
    assert expected[1] == 8
    tm.begin()
    root = conn.root()
    marker = get_marker(root)
    assert (state(root), marker.last_seq, marker.journal_id,
            marker.head) == expected
    tm.abort()
    conn.close()
    # And another process, for real.
    (table, counters), seq, head = read_in_another_process(shared_store)
    assert counters == expected[0][1]
    assert table == {k: list(v) if isinstance(v, tuple) else v
                     for k, v in expected[0][0].items()}
    assert (seq, head) == (expected[1], jdb.journal.head)


# -- rebuilding ---------------------------------------------------------------

def test_rebuild_into_fresh_stores(store, stores, journaled, journal_dir):
    jdb = journaled(store)
    history(jdb)
    jdb.execute(Stamp("later"))
    expected = view(jdb.db)
    assert expected[1] == 8
    # Into a fresh FileStorage, from a read-only journal while the
    # application runs (what zodb-journal rebuild does).
    target = stores.make("filestorage").db()
    result = recovery.rebuild(target, FileJournal(journal_dir,
                                                  readonly=True))
    assert result.replayed == 8
    assert view(target) == expected
    target.close()
    # Into a fresh store of the same kind (a new database, a new ZEO
    # server), by opening it with the journal.
    jdb.close()
    fresh = stores.make(store.kind, own_server=True)
    rebuilt = journaled(fresh)
    assert rebuilt.recovery.action == "rebuilt"
    assert rebuilt.recovery.replayed == 8
    assert view(rebuilt.db) == expected
    # It goes on from there.
    assert rebuilt.execute(Increment("n")) == 4
    assert view(rebuilt.db)[1:] == journal_view(rebuilt.journal)


# -- catching up --------------------------------------------------------------

def test_catch_up_on_open(store, journaled, journal_dir):
    jdb = journaled(store)
    jdb.execute(Put("a", 1))
    jdb.execute(Increment("n"))
    jdb.close()
    journal = FileJournal(journal_dir)
    seq = append_behind_the_back(journal, Increment("n", 10))
    journal.close()
    assert seq == 3
    jdb = journaled(store)
    assert jdb.recovery.action == "caught up"
    assert jdb.recovery.replayed == 1
    (table, counters), last, _, head = view(jdb.db)
    assert counters == {"n": 11}
    assert (last, head) == (3, jdb.journal.head)
    assert jdb.execute(Increment("n")) == 12
    assert view(jdb.db)[1:] == journal_view(jdb.journal)


def test_execute_catches_up_with_a_journal_gone_ahead(store, journaled):
    jdb = journaled(store)
    jdb.execute(Increment("n"))
    append_behind_the_back(jdb.journal, Increment("n", 10))
    assert view(jdb.db)[1] == 1  # the store is behind
    # JournalSequenceError at the journal's vote, catch-up, retry.
    assert jdb.execute(Increment("n")) == 12
    (_, counters), seq, _, head = view(jdb.db)
    assert counters == {"n": 12}
    assert (seq, head) == (3, jdb.journal.head)
    assert [e.command.by for e in jdb.journal.entries()] == [1, 10, 1]
    if store.shared:
        other = store.db()
        assert view(other) == view(jdb.db)


def hold_invalidations(storage, held):
    """Keep a ZEO ClientStorage from learning of other clients' commits
    (as if their invalidations were in flight) until ``release()``."""
    runner = storage._server
    io = runner.client
    deliver = io.invalidateTransaction
    io.invalidateTransaction = lambda *args: held.append(args)

    def release():
        del io.invalidateTransaction
        done = threading.Event()

        def deliver_held():
            while held:
                deliver(*held.pop(0))
            done.set()

        runner.loop.call_soon_threadsafe(deliver_held)
        assert done.wait(30)

    return release


def test_catching_up_against_a_stale_snapshot(shared_store, journaled):
    """Another process catches up while this one finds the journal ahead.

    This process's catch-up then replays against a snapshot that misses
    the other's commit and conflicts; it must be retried, not raised, and
    nothing applied twice.  RelStorage polls at each transaction start, so
    its snapshot is fresh; a ZEO client learns of other clients' commits
    asynchronously: here its invalidations are held (as in flight) until
    it has hit the conflict.  (FileJournal has one writing process; this
    is the situation of a journal shared by processes.)
    """
    jdb = journaled(shared_store)
    jdb.execute(Increment("n"))
    other = shared_store.db(server_sync=True)
    # Another process's ZODB failed to finish after its journal vote.
    append_behind_the_back(jdb.journal, Increment("n", 10))
    held, release = [], None
    if shared_store.kind == "zeo":
        release = hold_invalidations(jdb.db.storage, held)
    catch_up = jdb.catch_up
    others, conflicts = [], []

    def catch_up_second():
        if not others:  # the other process is first
            others.append(recovery.recover(other, jdb.journal))
        try:
            return catch_up()
        except ZODB.POSException.ConflictError as e:
            conflicts.append(e)
            if release is not None:
                release()  # the invalidations arrive
            raise

    jdb.catch_up = catch_up_second
    assert jdb.execute(Increment("n")) == 12
    assert others[0].action == "caught up"
    if release is not None:
        # The stale snapshot was there, and conflicted once.
        assert len(conflicts) == 1 and not held
    else:
        assert conflicts == []  # RelStorage: a fresh snapshot
    (_, counters), seq, _, head = view(jdb.db)
    assert (counters, seq, head) == ({"n": 12}, 3, jdb.journal.head)
    assert view(other) == view(jdb.db)


def test_transaction_block_catches_up_next_time(store, journaled):
    jdb = journaled(store)
    jdb.execute(Increment("n"))
    append_behind_the_back(jdb.journal, Increment("n", 10))
    # A block cannot be rerun by zjournal: its commit fails, transiently.
    with pytest.raises(transaction.interfaces.TransientError):
        with jdb.transaction() as conn:
            zjournal.execute(conn, Increment("n"))
    with jdb.transaction() as conn:
        assert zjournal.execute(conn, Increment("n")) == 12
    (_, counters), seq, _, _ = view(jdb.db)
    assert (counters, seq) == ({"n": 12}, 3)


def test_application_retries_catch_up(store, journaled):
    """An application's own retry loop (pyramid_retry, Zope's publisher)
    gets through: the journal gone ahead fails the vote, the next attempt
    catches up (its snapshot is now stale: a conflict), the next one
    commits."""
    jdb = journaled(store)
    jdb.execute(Increment("n"))
    tm = transaction.TransactionManager()
    conn = jdb.open(transaction_manager=tm)
    append_behind_the_back(jdb.journal, Increment("n", 10))
    seen = []
    for attempt in tm.attempts(5):
        with attempt:
            try:
                result = zjournal.execute(conn, Increment("n"))
                tm.commit()
            except transaction.interfaces.TransientError as e:
                seen.append(type(e).__name__)
                raise
    conn.close()
    assert result == 12
    # The vote finds the journal ahead; the attempt that catches up began
    # before the catch-up committed: its marker conflicts; the third
    # attempt commits.
    assert seen == ["JournalSequenceError", "ConflictError"]
    (_, counters), seq, _, head = view(jdb.db)
    assert (counters, seq, head) == ({"n": 12}, 3, jdb.journal.head)


# -- a ZODB that fails to finish after the journal's vote --------------------

@pytest.mark.parametrize("when", ["before", "after"])
def test_finish_failure_after_the_journal_vote(store, journaled, monkeypatch,
                                               when):
    """The storage's tpc_finish raises once: ``before`` it committed, or
    ``after`` (the commit happened, the caller was told it failed)."""
    jdb = journaled(store)
    jdb.execute(Increment("n"))
    cls = store.storage_class
    original = cls.tpc_finish
    armed = []

    def tpc_finish(self, *args, **kw):
        if not armed:
            return original(self, *args, **kw)
        armed.pop()
        if when == "after":
            original(self, *args, **kw)
        raise OSError("injected: the storage failed to finish")

    monkeypatch.setattr(cls, "tpc_finish", tpc_finish)
    armed.append(True)
    # The journal holds it: committed, whatever the ZODB says.
    assert jdb.execute(Increment("n")) == 2
    assert not armed
    assert jdb.journal.last_seq == 2
    assert view(jdb.db)[1] == (1 if when == "before" else 2)
    # The next command catches up first; nothing is applied twice.
    assert jdb.execute(Increment("n")) == 3
    (_, counters), seq, _, head = view(jdb.db)
    assert counters == {"n": 3}
    assert (seq, head) == (3, jdb.journal.head)
    if store.shared:
        assert view(store.db()) == view(jdb.db)


# -- the command line ---------------------------------------------------------

def zodb_journal(*argv):
    script = os.path.join(os.path.dirname(sys.executable), "zodb-journal")
    return subprocess.run([script] + [str(a) for a in argv],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_cli_rebuild_into_a_uri(kind, stores, journaled, journal_dir):
    source = journaled(stores.make("filestorage"))
    history(source)
    expected = view(source.db)
    target = _make(stores, kind)
    done = zodb_journal("rebuild", journal_dir, "--zodb", target.uri,
                        "--import", EXAMPLES)
    assert done.returncode == 0, done.stderr
    assert "7 commands" in done.stdout
    db = target.db()
    assert view(db) == expected
    last = db.storage.lastTransaction()
    db.close()
    # A second rebuild into it is refused, and changes nothing.
    done = zodb_journal("rebuild", journal_dir, "--zodb", target.uri,
                        "--import", EXAMPLES)
    assert done.returncode != 0
    assert "is not empty; rebuild into a new, empty storage" in done.stderr
    db = target.db()
    assert db.storage.lastTransaction() == last
    assert view(db) == expected
    # And the application opens it with its journal.
    source.close()
    jdb = journaled(target)
    assert jdb.recovery.action == "current"
    assert jdb.execute(Increment("n")) == 4


# -- resources ---------------------------------------------------------------

def held_by(store, db):
    """What the clients of ``db`` hold: PostgreSQL sessions on a RelStorage
    database, else the MVCC views the storage keeps up to date."""
    if store.kind.startswith("relstorage"):
        import psycopg2
        dbname = dict(p.split("=", 1) for p in store.dsn.split())["dbname"]
        admin = psycopg2.connect(services.postgres_dsn())
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity"
                            " WHERE datname = %s", (dbname,))
                return cur.fetchone()[0]
        finally:
            admin.close()
    return len(db._mvcc_storage._instances)


def test_wrapping_releases_the_connections_it_drops(store, journal_dir):
    """JournaledDB drops the connections pooled before it (of the plain
    class); what they hold must be released, not left to the garbage
    collector (a RelStorage database connection) or kept forever (an MVCC
    view of the storage, still registered with it, collecting the oid of
    every object changed from then on)."""
    db = store.db()
    gc.collect()
    gc.disable()  # no help from the cyclic garbage collector
    try:
        before = held_by(store, db)
        jdb = JournaledDB(db, FileJournal(journal_dir))
        try:
            after = held_by(store, db)
        finally:
            jdb.close()
    finally:
        gc.enable()
    assert after == before
