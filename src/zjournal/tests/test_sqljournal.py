"""The SQL journals: SQLite and PostgreSQL, against real databases.

Every test of the journal contract runs on both backends (the
``backend`` fixture); PostgreSQL tests get a table of their own, dropped
afterwards, and skip without a server (they fail instead under ``CI``).
Concurrency is tested with real processes (:mod:`zjournal.tests.sqlworker`)
appending to one journal at once, one of them SIGKILLed while it holds
the journal's write lock.
"""
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest
import transaction
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import sqljournal
from zjournal.errors import CorruptJournalError
from zjournal.errors import EncodeError
from zjournal.errors import JournalError
from zjournal.errors import JournalKeyError
from zjournal.errors import JournalSequenceError
from zjournal.errors import OutcomeUnknownError
from zjournal.errors import ReadOnlyJournalError
from zjournal.errors import TamperedJournalError
from zjournal.format import FLAG_QUERY
from zjournal.format import GENESIS
from zjournal.sqljournal import PostgresJournal
from zjournal.sqljournal import SQLiteJournal
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.helpers import replayed_state
from zjournal.tests.helpers import zodb_view
from zjournal.tests.services import postgres_dsn
from zjournal.tests.services import unique_name

BACKENDS = ("sqlite", "postgresql")
KEY = b"k" * 32


class Backend:
    """Opens journals of one backend at one place; runs raw SQL there;
    removes everything at the end."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.tmp_path = tmp_path
        self.opened = []
        if kind == "sqlite":
            self.target = str(tmp_path / "journal.db")
            self.table = "zjournal"
        else:
            self.target = postgres_dsn()
            self.table = unique_name()

    def open(self, **kw):
        if self.kind == "sqlite":
            journal = SQLiteJournal(self.target, **kw)
        else:
            journal = PostgresJournal(self.target, table=self.table, **kw)
        self.opened.append(journal)
        return journal

    def connect(self):
        if self.kind == "sqlite":
            return sqlite3.connect(self.target, isolation_level=None)
        import psycopg2
        conn = psycopg2.connect(self.target)
        conn.autocommit = True
        return conn

    def sql(self, statement, params=()):
        """Run ``statement`` ({t}: the entries table, %s placeholders)
        on a connection of its own; return the rows."""
        statement = statement.format(t=self.table)
        if self.kind == "sqlite":
            statement = statement.replace("%s", "?")
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(statement, params)
            rows = cur.fetchall() if cur.description else None
            cur.close()
            return rows
        finally:
            conn.close()

    def exists(self):
        if self.kind == "sqlite":
            return os.path.exists(self.target)
        rows = self.sql("SELECT to_regclass(%s), to_regclass(%s)",
                        (self.table, self.table + "_info"))
        return rows[0] != (None, None)

    def worker(self, worker, count, acks, env=None):
        return subprocess.Popen(
            [sys.executable, "-m", "zjournal.tests.sqlworker", self.kind,
             self.target, str(worker), str(count), acks, "--table",
             self.table], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)

    def cleanup(self):
        for journal in self.opened:
            journal.close()
        if self.kind == "postgresql":
            self.sql("DROP TABLE IF EXISTS {t}, {t}_info")


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path)
    yield b
    b.cleanup()


@pytest.fixture
def pg(tmp_path):
    b = Backend("postgresql", tmp_path)
    yield b
    b.cleanup()


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("ZJOURNAL_HMAC_KEY", raising=False)


def items_for(seqs, name="tests.put", meta=None, query=False):
    """Raw items for ``seqs``, with a payload that tells them apart."""
    return [(s, 1700000000.0 + s / 7, 1, name, b"payload-%d" % s,
             FLAG_QUERY if query else 0, meta) for s in seqs]


def fill(journal, transactions=5, per=3):
    """Append ``transactions`` transactions of ``per`` records each."""
    seq = journal.last_seq
    for t in range(transactions):
        journal.append(items_for(range(seq + 1, seq + per + 1),
                                 meta={"user": "u%d" % t}))
        seq += per
    return seq


def without_offset(entry):
    return tuple(entry[:6]) + tuple(entry[7:])


# -- the contract --------------------------------------------------------

class TestContract:

    def test_a_new_journal_is_empty(self, backend):
        before = time.time()
        j = backend.open()
        assert j.last_seq == 0
        assert j.head == GENESIS
        assert j.first_seq == 1
        assert list(j.entries()) == []
        assert str(uuid.UUID(j.identity)) == j.identity
        assert before - 1 <= j.created <= time.time() + 1
        assert (j.torn_tail, j.readonly, j.fsync) == (None, False, "always")
        assert j.verify().records == 0

    def test_appended_transactions_read_back_in_order(self, backend):
        j = backend.open()
        b1 = j.append(items_for([1]))
        b2 = j.append(j.prepare(items_for([2, 3, 4])))
        assert (b2.first, b2.last, b2.prev) == (2, 4, b1.head)
        assert j.last_seq == 4
        assert j.head == b2.head
        got = list(j.entries())
        assert [e.seq for e in got] == [1, 2, 3, 4]
        assert [e.payload for e in got] == [b"payload-%d" % s
                                            for s in range(1, 5)]
        assert [bool(e.flags & 1) for e in got] == [True, False, False,
                                                    True]
        assert [e.seq for e in j.entries(2, 4)] == [2, 3]
        assert [e.seq for e in j.entries(4)] == [4]
        assert list(j.entries(5)) == list(j.entries(3, 3)) == []
        assert got[1].prev == got[0].hash
        assert got[0].offset == 1 and got[0].size == len(got[0].encoded())

    def test_reading_goes_page_by_page(self, backend, monkeypatch):
        monkeypatch.setattr(sqljournal, "PAGE_SIZE", 4)
        j = backend.open()
        fill(j, transactions=5, per=3)
        assert [e.seq for e in j.entries()] == list(range(1, 16))
        assert [e.seq for e in j.entries(3, 12)] == list(range(3, 12))
        assert j.verify().records == 15

    def test_an_iteration_does_not_block_appends(self, backend,
                                                 monkeypatch):
        # Nothing is held between pages; the pages read after an append
        # see it.
        monkeypatch.setattr(sqljournal, "PAGE_SIZE", 2)
        j = backend.open()
        fill(j, transactions=2, per=2)
        it = j.entries()
        assert next(it).seq == 1
        j.append(items_for([5]))
        assert [e.seq for e in it] == [2, 3, 4, 5]

    def test_other_instances_see_appends_at_once(self, backend):
        a = backend.open()
        b = backend.open()
        assert a.identity == b.identity
        a.append(items_for([1, 2]))
        assert (b.last_seq, b.head) == (2, a.head)
        b.append(items_for([3]))
        assert a.last_seq == 3
        assert [e.seq for e in a.entries()] == [1, 2, 3]

    @pytest.mark.parametrize("key", [None, KEY])
    def test_records_are_the_bytes_a_file_journal_writes(
            self, backend, tmp_path, key):
        j = backend.open(hmac_key=key or False)
        f = FileJournal(str(tmp_path / "file"), fsync="never",
                        hmac_key=key or False)
        transactions = [
            items_for([1]),
            items_for([2, 3], meta={"user": "ann", "why": "caf\u00e9 \u2603"}),
            items_for([4], name="tests.sqljournal.lookup", query=True),
            [(5, 1700000005.123456789, 3, "tests.put", b"", 0, None)],
            items_for(range(6, 26)),
        ]
        for items in transactions:
            assert j.append(items).head == f.append(items).head
        assert j.head == f.head
        sql, file = list(j.entries()), list(f.entries())
        assert [e.encoded() for e in sql] == [e.encoded() for e in file]
        assert [without_offset(e) for e in sql] == [without_offset(e)
                                                    for e in file]
        assert [e.size for e in sql] == [e.size for e in file]
        assert j.verify().head == f.verify().head == f.head
        f.close()

    def test_a_batch_carries_rows_and_head(self, backend):
        j = backend.open()
        batch = j.prepare(items_for([1, 2]))
        assert isinstance(batch.data, list) and len(batch.data) == 2
        assert j.last_seq == 0  # prepare writes nothing
        j.append(batch)
        assert j.head == batch.head

    def test_metadata_query_flags_and_macs_round_trip(self, backend):
        j = backend.open(hmac_key=KEY)
        j.append(items_for([1], meta={"user": "ann", "n": 1}))
        j.append(items_for([2], query=True))
        one, two = j.entries()
        assert one.metadata == {"user": "ann", "n": 1} and one.user == "ann"
        assert not one.is_query and two.is_query and two.metadata == {}
        assert one.mac is not None and two.mac is not None
        report = j.verify()
        assert (report.signed, report.unsigned, report.queries) == (2, 0, 1)
        if backend.kind == "sqlite":
            rows = backend.sql("SELECT json_extract(meta, '$.user')"
                               " FROM {t} ORDER BY seq")
        else:
            rows = backend.sql("SELECT meta::jsonb->>'user' FROM {t}"
                               " ORDER BY seq")
        assert rows == [("ann",), (None,)]

    def test_plain_sql_statistics(self, backend):
        j = backend.open()
        j.append(items_for([1, 2], name="a"))
        j.append(items_for([3], name="b"))
        rows = backend.sql("SELECT name, count(*) FROM {t} GROUP BY name"
                           " ORDER BY name")
        assert rows == [("a", 2), ("b", 1)]

    def test_info(self, backend):
        j = backend.open()
        fill(j, transactions=2, per=2)
        info = j.info()
        assert info["backend"] == backend.kind
        assert (info["identity"], info["path"]) == (j.identity, j.path)
        assert (info["first_seq"], info["last_seq"]) == (1, 4)
        assert info["format_version"] == zjournal.format.FORMAT_VERSION
        assert info["bytes"] > 0 and info["torn_tail"] is None
        json.dumps(info)
        assert j.path in repr(j)


class TestRefusals:

    def test_a_seq_that_does_not_follow_is_refused(self, backend):
        j = backend.open()
        j.append(items_for([1]))
        for seqs in ([1], [3], [2, 4]):
            with pytest.raises(JournalSequenceError):
                j.append(items_for(seqs))
        assert j.last_seq == 1

    def test_a_batch_chained_after_another_record_is_refused(self, backend):
        j = backend.open()
        stale = j.prepare(items_for([1]))
        j.append(items_for([1]))
        late = j.prepare(items_for([2]), prev=stale.prev)
        with pytest.raises(JournalSequenceError, match="chained"):
            j.append(late)
        j.append(j.prepare(items_for([2])))
        assert j.last_seq == 2

    def test_a_racing_writer_duplicate_is_a_sequence_error(
            self, backend, monkeypatch):
        j = backend.open()
        j.append(items_for([1]))
        real_insert = j._insert
        other = backend.open()
        racer = other.prepare(items_for([2]))

        def racing_insert(cur, rows):
            # A writer that skipped the lock got seq 2 in first.
            if backend.kind == "sqlite":
                cur.execute(j._sql["insert"], racer.data[0])
            else:
                backend.sql(j._sql["insert"], racer.data[0])
            real_insert(cur, rows)

        monkeypatch.setattr(j, "_insert", racing_insert)
        with pytest.raises(JournalSequenceError, match="another writer"):
            j.append(items_for([2]))
        monkeypatch.undo()
        expected = 2 if backend.kind == "postgresql" else 1
        assert j.last_seq == expected

    def test_encoding_errors_leave_nothing(self, backend):
        j = backend.open()
        with pytest.raises(EncodeError):
            j.append([(1, 0.0, 1, "bad\x00name", b"")])
        with pytest.raises(EncodeError):
            j.append([(1, 0.0, 1, "x", b"", 0, {"when": object()})])
        assert j.last_seq == 0
        j.append(items_for([1]))

    def test_an_unknown_fsync_policy(self, backend):
        with pytest.raises(ValueError):
            backend.open(fsync="sometimes")

    def test_identity_is_kept_and_checked(self, backend):
        wanted = str(uuid.uuid4())
        j = backend.open(identity=wanted)
        assert j.identity == wanted
        j.close()
        assert backend.open(identity=wanted).identity == wanted
        with pytest.raises(JournalError, match="not %s" % (uuid.UUID(
                int=1),)):
            backend.open(identity=str(uuid.UUID(int=1)))

    def test_readonly_reads_and_refuses_appends(self, backend):
        j = backend.open()
        fill(j, transactions=1, per=2)
        r = backend.open(readonly=True)
        assert r.readonly and r.identity == j.identity
        assert [e.seq for e in r.entries()] == [1, 2]
        with pytest.raises(ReadOnlyJournalError):
            r.append(items_for([3]))
        assert r.last_seq == 2

    def test_a_missing_journal_opened_readonly(self, backend):
        with pytest.raises(JournalError, match="no journal"):
            backend.open(readonly=True)
        assert not backend.exists()

    def test_close_refused_removes_a_new_empty_journal(self, backend):
        j = backend.open()
        assert backend.exists()
        j.close_refused()
        assert not backend.exists()
        assert j.closed

    def test_close_refused_keeps_a_journal_with_records(self, backend):
        j = backend.open()
        j.append(items_for([1]))
        j.close_refused()
        assert backend.exists()
        j = backend.open()
        j.close_refused()  # not created by this open
        assert backend.open().last_seq == 1

    def test_a_journal_without_its_info_row(self, backend):
        j = backend.open()
        j.append(items_for([1]))
        j.close()
        backend.sql("DELETE FROM {t}_info")
        for readonly in (False, True):
            with pytest.raises(JournalError, match="info table is empty"):
                backend.open(readonly=readonly)
        assert backend.sql("SELECT count(*) FROM {t}_info") == [(0,)]

    def test_a_closed_journal(self, backend):
        j = backend.open()
        j.close()
        j.close()
        for call in (lambda: j.last_seq, lambda: j.append(items_for([1])),
                     lambda: list(j.entries())):
            with pytest.raises(JournalError, match="closed"):
                call()
        assert "closed" in repr(j)
        with backend.open() as j2:
            assert j2.last_seq == 0
        assert j2.closed


class TestKeys:

    def test_a_writer_with_another_key_is_refused(self, backend):
        backend.open(hmac_key=KEY).append(items_for([1]))
        with pytest.raises(JournalKeyError, match="another key"):
            backend.open(hmac_key=b"other")
        with pytest.raises(JournalKeyError, match="no key"):
            backend.open(hmac_key=False)
        assert backend.open(readonly=True, hmac_key=False).last_seq == 1

    def test_the_key_comes_from_the_environment(self, backend,
                                                monkeypatch):
        monkeypatch.setenv("ZJOURNAL_HMAC_KEY", KEY.decode())
        j = backend.open()
        j.append(items_for([1]))
        assert next(j.entries()).mac is not None
        with pytest.raises(JournalKeyError):
            backend.open(hmac_key=False)

    def test_signing_turned_on_later(self, backend):
        backend.open(hmac_key=False).append(items_for([1]))
        j = backend.open(hmac_key=KEY)
        j.append(items_for([2]))
        report = j.verify()
        assert (report.signed, report.unsigned) == (1, 1)


class TestDurabilitySettings:

    @pytest.mark.parametrize("policy,expected", [
        ("always", ("2", "on")), ("batch", ("2", "on")),
        ("never", ("0", "off"))])
    def test_fsync_policies(self, backend, policy, expected):
        j = backend.open(fsync=policy)
        cur = j._conn.cursor()
        if backend.kind == "sqlite":
            cur.execute("PRAGMA synchronous")
            assert str(cur.fetchone()[0]) == expected[0]
            cur.execute("PRAGMA journal_mode")
            assert cur.fetchone()[0] == "wal"
        else:
            cur.execute("SHOW synchronous_commit")
            assert cur.fetchone()[0] == expected[1]
        cur.close()
        j.append(items_for([1]))
        j.sync()
        assert j.last_seq == 1

    def test_a_new_sqlite_file_is_owner_only(self, tmp_path):
        j = SQLiteJournal(str(tmp_path / "j.db"))
        j.append(items_for([1]))
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(j.path + suffix).st_mode)
            assert mode == 0o600, (suffix, oct(mode))
        j.close()
        j = SQLiteJournal(str(tmp_path / "g.db"), file_mode=0o640)
        assert stat.S_IMODE(os.stat(j.path).st_mode) == 0o640
        j.close()

    def test_sqlite_needs_an_existing_directory(self, tmp_path):
        with pytest.raises(JournalError, match="does not exist"):
            SQLiteJournal(str(tmp_path / "no" / "j.db"))

    def test_a_file_that_is_not_a_journal(self, tmp_path):
        path = tmp_path / "text.db"
        path.write_bytes(b"not a database at all" * 100)
        with pytest.raises(JournalError, match="cannot open"):
            SQLiteJournal(str(path))
        assert path.read_bytes() == b"not a database at all" * 100


class TestPostgres:

    @pytest.mark.parametrize("table", [
        "Upper", "a;drop table x", "a b", "", "1abc", "a.b.c", "x" * 59,
        "\u00e9t\u00e9", None])
    def test_table_names_are_validated(self, table):
        with pytest.raises(ValueError):
            PostgresJournal("dbname=never_reached", table=table)

    def test_a_schema_qualified_table(self, pg):
        pg.table = "public." + pg.table
        j = pg.open()
        j.append(items_for([1]))
        assert pg.sql("SELECT count(*) FROM {t}") == [(1,)]
        assert j.info()["bytes"] > 0

    def test_the_password_is_never_shown(self, pg):
        j = PostgresJournal(pg.target + " password=hunter2",
                            table=pg.table)
        pg.opened.append(j)
        assert "hunter2" not in j.path and "hunter2" not in repr(j)
        assert "table=%s" % pg.table in j.path
        with pytest.raises(ValueError) as raised:
            PostgresJournal("host=x password=hunter2 broken", table="t")
        assert "hunter2" not in str(raised.value)

    def test_an_unreachable_server_is_a_journal_error(self):
        with pytest.raises(JournalError, match="cannot connect"):
            PostgresJournal("host=127.0.0.1 port=1 user=x password=pw"
                            " connect_timeout=2", table="t")

    def _kill_backend(self, pg, journal):
        pid = journal._conn.get_backend_pid()
        pg.sql("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.time() + 10
        while pg.sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                     (pid,))[0][0] and time.time() < deadline:
            time.sleep(0.01)

    def test_a_lost_connection_is_reopened(self, pg):
        j = pg.open()
        j.append(items_for([1]))
        self._kill_backend(pg, j)
        assert j.last_seq == 1  # a read reconnects
        self._kill_backend(pg, j)
        j.append(items_for([2]))  # so does an append (nothing was sent)
        assert [e.seq for e in j.entries()] == [1, 2]

    def test_a_failed_commit_is_an_unknown_outcome(self, pg, monkeypatch):
        j = pg.open()
        j.append(items_for([1]))
        real_exec = j._exec

        def dying_exec(conn, statement, params=()):
            if statement == "COMMIT":
                self._kill_backend(pg, j)
            return real_exec(conn, statement, params)

        monkeypatch.setattr(j, "_exec", dying_exec)
        with pytest.raises(OutcomeUnknownError, match="unknown"):
            j.append(items_for([2]))
        monkeypatch.undo()
        # The server rolled back the transaction of the dead session;
        # the journal reconnects and goes on.
        assert j.last_seq == 1
        j.append(items_for([2]))
        assert j.verify().records == 2

    def test_reconnecting_to_another_journal_is_refused(self, pg):
        j = pg.open()
        pg.sql("UPDATE {t}_info SET identity = %s", (str(uuid.uuid4()),))
        self._kill_backend(pg, j)
        with pytest.raises(JournalError, match="after reconnecting"):
            j.append(items_for([1]))
        assert pg.sql("SELECT count(*) FROM {t}") == [(0,)]


def test_a_failed_sqlite_commit_is_an_unknown_outcome(tmp_path,
                                                       monkeypatch):
    j = SQLiteJournal(str(tmp_path / "j.db"))
    j.append(items_for([1]))
    real_exec = j._exec

    def failing_exec(conn, statement, params=()):
        if statement == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return real_exec(conn, statement, params)

    monkeypatch.setattr(j, "_exec", failing_exec)
    with pytest.raises(OutcomeUnknownError):
        j.append(items_for([2]))
    monkeypatch.undo()
    assert j.last_seq == 1  # the dropped connection rolled it back
    j.append(items_for([2]))
    assert j.last_seq == 2
    j.close()


# -- verify ----------------------------------------------------------------

class TestVerify:

    def test_a_clean_journal_verifies(self, backend):
        j = backend.open()
        last = fill(j, transactions=4, per=3)
        report = j.verify()
        assert (report.records, report.first_seq, report.last_seq) == (
            12, 1, 12)
        assert report.head == j.head
        assert report.bytes == sum(e.size for e in j.entries())
        assert report.segments == 0 and report.torn_tail is None
        assert last == 12

    def test_an_updated_payload(self, backend):
        j = backend.open()
        fill(j)
        backend.sql("UPDATE {t} SET payload = %s WHERE seq = 5",
                    (b"forged",))
        with pytest.raises(TamperedJournalError, match="stored hash") as e:
            j.verify()
        assert e.value.seq == 5

    def test_an_updated_payload_with_its_hash_breaks_the_chain(
            self, backend):
        j = backend.open()
        fill(j)
        e5 = list(j.entries(5, 6))[0]
        forged = zjournal.journal.Entry(*(e5[:5] + (b"forged",) + e5[6:]))
        backend.sql("UPDATE {t} SET payload = %s, hash = %s WHERE seq = 5",
                    (b"forged", forged.hash))
        with pytest.raises(TamperedJournalError, match="chain") as e:
            j.verify()
        assert e.value.seq == 6

    def test_a_deleted_row_is_a_gap(self, backend):
        j = backend.open()
        fill(j)
        backend.sql("DELETE FROM {t} WHERE seq = 7")
        with pytest.raises(CorruptJournalError, match="seq 7 is missing"):
            j.verify()
        with pytest.raises(CorruptJournalError, match="missing") as e:
            list(j.entries())
        assert e.value.seq == 7
        backend.sql("DELETE FROM {t} WHERE seq = 1")
        with pytest.raises(CorruptJournalError, match="seq 1 is missing"):
            list(j.entries())

    def test_a_deleted_end_of_transaction(self, backend):
        j = backend.open()
        fill(j, transactions=2, per=3)
        backend.sql("DELETE FROM {t} WHERE seq = 6")
        with pytest.raises(CorruptJournalError, match="does not end"):
            j.verify()

    def test_swapped_payloads(self, backend):
        j = backend.open()
        fill(j)
        backend.sql("UPDATE {t} SET payload = CASE seq WHEN 3 THEN %s"
                    " ELSE %s END WHERE seq IN (3, 4)",
                    (b"payload-4", b"payload-3"))
        with pytest.raises(TamperedJournalError) as e:
            j.verify()
        assert e.value.seq == 3

    def test_a_wrong_mac(self, backend):
        j = backend.open(hmac_key=KEY)
        fill(j)
        backend.sql("UPDATE {t} SET mac = %s WHERE seq = 4", (bytes(16),))
        with pytest.raises(TamperedJournalError):
            j.verify()
        # Rebuilding the hashes does not help without the key.
        rows = backend.sql("SELECT seq FROM {t} ORDER BY seq")
        prev = GENESIS
        for (seq,) in rows:
            e = list(j.entries(seq, seq + 1))[0]
            e = zjournal.journal.Entry(*(e[:8] + (prev,) + e[9:]))
            backend.sql("UPDATE {t} SET prev = %s, hash = %s WHERE seq = %s",
                        (prev, e.hash, seq))
            prev = e.hash
        with pytest.raises(TamperedJournalError, match="bad signature"):
            j.verify()
        assert backend.open(readonly=True, hmac_key=False).verify().records

    def test_a_key_and_no_signed_record(self, backend):
        fill(backend.open(hmac_key=False))
        with pytest.raises(TamperedJournalError, match="unsigned"):
            backend.open(readonly=True, hmac_key=KEY).verify()


# -- with a JournaledDB ------------------------------------------------------

class Lookup(Command):
    command_name = "tests.sqljournal.lookup"

    def __init__(self, key):
        self.key = key

    def execute(self, root, context):
        return root["table"].get(self.key)


def _db(path):
    return ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))


def _remove_zodb(path):
    for suffix in ("", ".index", ".lock", ".tmp"):
        if os.path.exists(str(path) + suffix):
            os.remove(str(path) + suffix)


class TestJournaledDB:

    def test_end_to_end_and_rebuild(self, backend, tmp_path):
        data_fs = tmp_path / "Data.fs"
        jdb = JournaledDB(_db(data_fs), backend.open(),
                          journal_queries=True)
        assert jdb.execute(Increment("a", 5)) == 5
        stamp = jdb.execute(Stamp("s"))
        jdb.execute(Put("p", [1, "two"]), metadata={"request": "r-1"})
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("x", 1))
            zjournal.execute(conn, Increment("a", 2))
        tm = transaction.TransactionManager()
        conn = jdb.open(tm)
        tm.begin()
        tm.get().user = "ann"
        zjournal.execute(conn, Put("y", 2))
        tm.commit()
        conn.close()
        assert jdb.query(Lookup("x")) == 1
        with pytest.raises(RuntimeError):
            jdb.execute(zjournal.tests.examples.Fail())
        before = zodb_view(jdb)
        entries = list(jdb.journal.entries())
        assert [e.command_name for e in entries] == [
            "tests.increment", "tests.stamp", "tests.put", "tests.put",
            "tests.increment", "tests.put", "tests.sqljournal.lookup"]
        assert entries[1].time == stamp[1]
        assert entries[2].metadata == {"request": "r-1"}
        assert entries[5].user == "ann"
        assert entries[6].is_query
        assert before[1] == jdb.journal.last_seq == 7
        jdb.close()

        _remove_zodb(data_fs)
        jdb = JournaledDB(_db(data_fs), backend.open())
        assert jdb.recovery.action == "rebuilt"
        assert zodb_view(jdb) == before
        jdb.close()
        jdb = JournaledDB(_db(data_fs), backend.open())
        assert jdb.recovery.action == "current"
        jdb.execute(Increment("a", 1))
        assert zodb_view(jdb)[0][1] == {"a": 8}
        jdb.close()
        assert replayed_state(backend.open(readonly=True))[1] == {"a": 8}

    def test_an_unknown_outcome_that_committed_is_caught_up(
            self, backend, tmp_path, monkeypatch):
        """The COMMIT went through but its answer was lost: the caller is
        told the outcome is unknown, and the journal's word stands."""
        jdb = JournaledDB(_db(tmp_path / "Data.fs"), backend.open())
        jdb.execute(Increment("n", 1))
        journal = jdb.journal
        real_exec = journal._exec
        error = (sqlite3.OperationalError if backend.kind == "sqlite"
                 else __import__("psycopg2").OperationalError)

        def lost_answer(conn, statement, params=()):
            real_exec(conn, statement, params)
            if statement == "COMMIT":
                raise error("server closed the connection unexpectedly")

        monkeypatch.setattr(journal, "_exec", lost_answer)
        with pytest.raises(OutcomeUnknownError):
            jdb.execute(Increment("n", 10))
        monkeypatch.undo()
        assert zodb_view(jdb)[0][1] == {"n": 1}  # the ZODB aborted
        assert journal.last_seq == 2             # the journal has it
        jdb.execute(Increment("n", 100))         # catches up, then runs
        assert zodb_view(jdb)[0][1] == {"n": 111}
        assert zodb_view(jdb)[1] == journal.last_seq == 3
        jdb.close()

    def test_a_wrong_journal_is_refused_and_left_as_found(
            self, backend, tmp_path):
        other = FileJournal(str(tmp_path / "other"))
        jdb = JournaledDB(_db(tmp_path / "Data.fs"), other)
        jdb.execute(Put("a", 1))
        jdb.close()
        with pytest.raises(zjournal.WrongJournalError):
            JournaledDB(_db(tmp_path / "Data.fs"), backend.open())
        assert not backend.exists()

    def test_replicas_sharing_one_journal_catch_up(self, backend,
                                                   tmp_path):
        """Two ZODBs, one journal: each appends, and catches up on the
        other's commands when its append is refused."""
        one = JournaledDB(_db(tmp_path / "one.fs"), backend.open())
        two = JournaledDB(_db(tmp_path / "two.fs"), backend.open())
        for i in range(5):
            one.execute(Increment("n", 1))
            two.execute(Increment("n", 10))
        assert one.journal.last_seq == 10
        one.catch_up()
        assert zodb_view(one)[:2] == zodb_view(two)[:2]
        assert zodb_view(two)[0][1] == {"n": 55}
        one.close()
        two.close()

    def test_group_commit_under_the_batch_policy(self, backend, tmp_path):
        jdb = JournaledDB(_db(tmp_path / "Data.fs"),
                          backend.open(fsync="batch"))
        threads = [threading.Thread(target=lambda: [
            jdb.execute(Increment("n")) for _ in range(25)])
            for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert jdb.journal.last_seq == 100
        assert zodb_view(jdb)[0][1] == {"n": 100}
        assert jdb.journal.verify().records == 100
        jdb.close()


# -- several writers --------------------------------------------------------

def _acks(path):
    acked, done = {}, {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if parts[0] == "done":
                    done[int(parts[1])] = int(parts[2])
                else:
                    w, i, seq = map(int, parts)
                    assert (w, i) not in acked
                    acked[(w, i)] = seq
    return acked, done


def _check_journal(journal, acked):
    """Contiguous, each acknowledged append exactly once where acked."""
    report = journal.verify()
    seen = {}
    for e in journal.entries():
        key = e.command.key
        assert key not in seen, "%s journaled twice" % key
        seen[key] = e.seq
    for (w, i), seq in acked.items():
        assert seen.get("w%d-%d" % (w, i)) == seq
    assert report.records == len(seen) == journal.last_seq
    return report


def _run_workers(backend, tmp_path, count, kill=None):
    """Start four workers at once; ``kill``: the index of one to SIGKILL
    inside its 50th append's transaction."""
    backend.open().close()  # the schema exists before they start
    procs, files = [], []
    for w in range(4):
        env = dict(os.environ)
        if w == kill:
            env.update(ZJOURNAL_KILL_AT="append.after-write",
                       ZJOURNAL_KILL_COUNT="50")
        acks = str(tmp_path / ("acks-%d" % w))
        files.append(acks)
        procs.append(backend.worker(w, count, acks, env))
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    acked, done = {}, {}
    for acks in files:
        a, d = _acks(acks)
        acked.update(a)
        done.update(d)
    return procs, outputs, acked, done


@pytest.mark.slow
def test_four_processes_append_at_once(backend, tmp_path):
    procs, outputs, acked, done = _run_workers(backend, tmp_path, 200)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert len(acked) == 800 and sorted(done) == [0, 1, 2, 3]
    assert sorted(acked.values()) == list(range(1, 801))
    journal = backend.open(readonly=True)
    _check_journal(journal, acked)
    table, _ = replayed_state(journal)
    assert len(table) == 800


@pytest.mark.slow
def test_a_writer_killed_holding_the_lock(backend, tmp_path):
    procs, outputs, acked, done = _run_workers(backend, tmp_path, 200,
                                               kill=1)
    assert procs[1].returncode == -signal.SIGKILL, outputs[1]
    for w in (0, 2, 3):
        assert procs[w].returncode == 0, outputs[w]
    assert sorted(done) == [0, 2, 3]
    assert sum(1 for w, _ in acked if w == 1) == 49
    journal = backend.open(readonly=True)
    report = _check_journal(journal, acked)
    assert report.records == 3 * 200 + 49 == len(acked)


def test_threads_sharing_one_journal(backend):
    j = backend.open()

    def work():
        for _ in range(20):
            while True:
                try:
                    j.append(items_for([j.last_seq + 1]))
                    break
                except JournalSequenceError:
                    pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert j.verify().records == 80


def test_new_journal_created_by_several_at_once(backend):
    barrier = threading.Barrier(4)
    found = []

    def open_it():
        barrier.wait()
        j = Backend.open(backend)
        found.append(j.identity)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 4 and len(set(found)) == 1


# -- moving a journal between backends ---------------------------------------

class TestCopy:

    def _file_site(self, tmp_path, key=False):
        """A ZODB built from a file journal with commands of every kind."""
        data_fs = tmp_path / "Data.fs"
        source = FileJournal(str(tmp_path / "file"), hmac_key=key)
        jdb = JournaledDB(_db(data_fs), source, journal_queries=True)
        for i in range(5):
            jdb.execute(Increment("n", i))
        jdb.execute(Put("p", i), metadata={"user": "ann"})
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("x", 1))
            zjournal.execute(conn, Stamp("s"))
        jdb.query(Lookup("x"))
        view = zodb_view(jdb)
        jdb.close()
        return data_fs, view

    def test_a_file_journal_moves_into_sql_unchanged(self, backend,
                                                     tmp_path):
        data_fs, view = self._file_site(tmp_path, key=KEY)
        source = FileJournal(str(tmp_path / "file"), readonly=True,
                             hmac_key=KEY)
        target = backend.open(identity=source.identity, hmac_key=KEY,
                              fsync="never")
        done = []
        assert sqljournal.copy_journal(
            source, target, progress=lambda n, t: done.append((n, t))) == 9
        target.sync()
        assert done[-1] == (9, 9)
        assert [e.encoded() for e in target.entries()] == [
            e.encoded() for e in source.entries()]
        assert target.head == source.head
        assert target.verify().signed == 9
        target.close()
        # The ZODB built from the file journal is current with the copy.
        jdb = JournaledDB(_db(data_fs), backend.open(hmac_key=KEY))
        assert jdb.recovery.action == "current"
        assert zodb_view(jdb) == view
        jdb.close()

    def test_refusals(self, backend, tmp_path):
        self._file_site(tmp_path)
        source = FileJournal(str(tmp_path / "file"), readonly=True,
                             hmac_key=False)
        with pytest.raises(JournalError, match="identity="):
            sqljournal.copy_journal(source, backend.open())
        backend.cleanup()
        if backend.kind == "sqlite":
            os.remove(backend.target)
        target = backend.open(identity=source.identity, hmac_key=KEY)
        with pytest.raises(JournalError, match="chain hash differs"):
            sqljournal.copy_journal(source, target)
        assert target.last_seq == 0
        target.append(items_for([1]))
        with pytest.raises(JournalError, match="not empty"):
            sqljournal.copy_journal(source, target)
