"""Journals kept in SQL databases: SQLite on one host, PostgreSQL on many.

Both keep the records a :class:`~zjournal.journal.FileJournal` would
write -- the same bytes, chained by the same hashes and signed with the
same MACs -- as one row per record, with the record's fields as columns
(so that statistics are plain SQL) and its chain hash beside them.  The
bytes themselves are not stored: :meth:`SQLJournal.verify` rebuilds them
from the columns and checks them against the stored hashes and the
chain, which is what makes an edited row evident.

What the database provides, and the file journal has to build itself:

* atomicity: a transaction's rows are inserted in one database
  transaction, so a reader never sees part of one, and there is no torn
  tail to cut (``torn_tail`` is always None);
* durability: the commit of that database transaction is the commit
  point of the journal's vote (SQLite ``synchronous=FULL``, PostgreSQL
  ``synchronous_commit=on`` under the ``always`` and ``batch`` policies);
* several writers: an append locks the journal (SQLite ``BEGIN
  IMMEDIATE``, a PostgreSQL transaction-level advisory lock), reads the
  last sequence number and chain hash, and refuses with
  :exc:`~zjournal.errors.JournalSequenceError` a transaction that does
  not follow them; the primary key on ``seq`` refuses a duplicate from a
  writer that skipped the lock.  A :class:`~zjournal.JournaledDB` treats
  that error as transient: it catches up from the journal and retries.

Failures of an append are classified by whether the COMMIT was sent:
before it, nothing was journaled (:exc:`~zjournal.errors.JournalWriteError`);
a COMMIT that fails (a lost connection, an I/O error) leaves the outcome
unknown (:exc:`~zjournal.errors.OutcomeUnknownError`), and recovery
decides by what the journal holds.  The connection is then dropped and
opened again by the next call: the database, not this process, knows
what was committed.
"""
import hashlib
import logging
import os
import pathlib
import re
import threading
import time as _time
import uuid

from zope.interface import implementer

from zjournal import faults
from zjournal.errors import CorruptJournalError
from zjournal.errors import EncodeError
from zjournal.errors import JournalError
from zjournal.errors import JournalSequenceError
from zjournal.errors import JournalWriteError
from zjournal.errors import OutcomeUnknownError
from zjournal.errors import ReadOnlyJournalError
from zjournal.errors import TamperedJournalError
from zjournal.errors import UnsupportedFormatError
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.format import FORMAT_VERSION
from zjournal.format import GENESIS
from zjournal.format import KNOWN_FLAGS
from zjournal.format import MAC_SIZE
from zjournal.format import RECORD_OVERHEAD
from zjournal.format import check_record
from zjournal.format import decode_record
from zjournal.format import encode_chain
from zjournal.format import record_hash
from zjournal.format import sign
from zjournal.interfaces import IJournal
from zjournal.journal import FILE_MODE
from zjournal.journal import FSYNC_POLICIES
from zjournal.journal import HMAC_KEY_ENV
from zjournal.journal import Batch
from zjournal.journal import Entry
from zjournal.journal import ScanReport
from zjournal.journal import _checked
from zjournal.journal import check_transaction
from zjournal.journal import check_writer_key
from zjournal.journal import sync_dir

logger = logging.getLogger(__name__)

# Rows per query when reading: entries() and verify() read in pages so
# that their memory does not grow with the journal.
PAGE_SIZE = 1000
# The table names a SQLite journal file holds (a PostgreSQL journal's are
# chosen by the caller, "zjournal" by default).
DEFAULT_TABLE = "zjournal"
INFO_SUFFIX = "_info"

# What every statement reads of an entry, in Entry's order (less the
# offset and size, which are computed).
_ENTRY_COLUMNS = "seq, time, flags, version, name, payload, prev, meta, mac"


def _resolve_key(hmac_key):
    """The signing key as bytes, or None: None reads the environment,
    False means no key whatever the environment says."""
    if hmac_key is None:
        hmac_key = os.environ.get(HMAC_KEY_ENV) or None
    elif hmac_key is False:
        return None
    if isinstance(hmac_key, str):
        hmac_key = hmac_key.encode("utf-8")
    return hmac_key


def _reason(error):
    """A database error as one line, for messages."""
    text = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, text[0] if text else "")


def _record_size(name_size, payload, meta, mac):
    """The size of the encoded record, computed without encoding it."""
    return (RECORD_OVERHEAD + name_size + len(payload)
            + (0 if meta is None else 4 + len(meta))
            + (0 if mac is None else MAC_SIZE))


@implementer(IJournal)
class SQLJournal:
    """What the SQL journals share; subclasses supply the dialect.

    A subclass provides the connection (:meth:`_connect`), the DDL, the
    statement that begins an append and locks out other appenders, the
    bulk insert, and how to recognise its driver's errors.  Everything
    that decides what is correct -- encoding, the sequence and chain
    checks, verification, error classification -- is here, once.

    Every public method may be called from several threads: one lock
    serializes the use of the single connection.
    """

    backend = None        # "sqlite" or "postgresql"
    _param = "%s"         # the driver's placeholder
    _db_error = Exception  # the driver's base error class

    def __init__(self, fsync="always", readonly=False, identity=None,
                 hmac_key=None):
        if fsync not in FSYNC_POLICIES:
            raise ValueError("fsync must be one of %s, not %r"
                             % (", ".join(FSYNC_POLICIES), fsync))
        self.fsync = fsync
        self.readonly = readonly
        self.torn_tail = None   # rows are whole or absent: never torn
        self._key = _resolve_key(hmac_key)
        self._new_identity = (str(uuid.UUID(identity)) if identity
                              is not None else None)
        self._lock = threading.RLock()
        self._conn = None
        self._closed = False
        self._made = False     # this open created the journal
        self._opened = False   # the first connection succeeded
        self._sql = self._statements()
        try:
            self._conn = self._connect()
            self._opened = True
            self._open()
        except BaseException:
            self._closed = True
            if self._made:
                # Created, then failed: a failed open leaves nothing.
                self._remove_if_empty()
            self._disconnect()
            self._abandon()
            raise

    # -- SQL -------------------------------------------------------------

    def _statements(self):
        """The statements every dialect shares, with its placeholders."""
        entries, info = self._table_names()
        sql = {
            "info_select": "SELECT identity, format_version, created"
                           " FROM {info}",
            "info_insert": "INSERT INTO {info} (identity, format_version,"
                           " created) VALUES (%s, %s, %s)",
            "tail": "SELECT seq, hash FROM {entries}"
                    " ORDER BY seq DESC LIMIT 1",
            "last": "SELECT " + _ENTRY_COLUMNS + " FROM {entries}"
                    " ORDER BY seq DESC LIMIT 1",
            "first": "SELECT min(seq) FROM {entries}",
            # One bound only, the end of a range being the LIMIT: a
            # range of two bounds lets PostgreSQL's planner, misled by
            # missing statistics, sort a bitmap scan of the whole rest of
            # the table for every page.
            "page": "SELECT " + _ENTRY_COLUMNS + ", hash FROM {entries}"
                    " WHERE seq >= %s ORDER BY seq LIMIT %s",
            "insert": "INSERT INTO {entries} (" + _ENTRY_COLUMNS
                      + ", hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                      " %s, %s)",
            "any": "SELECT 1 FROM {entries} LIMIT 1",
        }
        return {k: v.format(entries=entries, info=info).replace(
            "%s", self._param) for k, v in sql.items()}

    # -- dialect ---------------------------------------------------------

    def _table_names(self):
        """The quoted names of the entries and info tables."""
        raise NotImplementedError

    def _connect(self):
        """A new connection in autocommit mode, configured for the policy."""
        raise NotImplementedError

    def _info_exists(self, cur):
        raise NotImplementedError

    def _begin_create(self, cur):
        """Begin the transaction that creates the schema, locked against
        another process doing the same."""
        raise NotImplementedError

    def _ddl(self):
        """The statements creating the tables (idempotent)."""
        raise NotImplementedError

    def _found(self):
        """Called once the journal's info row was read."""

    def _begin_append(self, cur):
        """Begin an append's transaction, holding the journal's write lock
        until it ends, and return the last row's ``(seq, hash)`` (None
        when empty) as seen under the lock."""
        raise NotImplementedError

    def _insert(self, cur, rows):
        cur.executemany(self._sql["insert"], rows)

    def _is_duplicate(self, error):
        """Whether ``error`` is a primary-key violation."""
        raise NotImplementedError

    def _is_lost(self, conn, error):
        """Whether ``conn`` is unusable after ``error``."""
        return False

    def _in_transaction(self, conn):
        """Whether a transaction is open on ``conn``."""
        raise NotImplementedError

    def _size(self):
        """Bytes the journal takes in the database."""
        raise NotImplementedError

    def _lock_for_drop(self, cur):
        """Keep every appender out until the transaction ends."""

    def _drop_schema(self, cur):
        """Drop what _ddl created (the journal is known empty)."""
        raise NotImplementedError

    def _after_drop(self):
        """Called after the schema of an empty new journal was dropped."""

    def _abandon(self):
        """Called after a failed open, disconnected."""

    # -- connection handling ---------------------------------------------

    def _check_open(self):
        if self._closed:
            raise JournalError("journal %s is closed" % self.path)

    def _connection(self, error_class):
        """The connection, opened again if an error dropped it.

        A new connection checks that it reached the same journal: after a
        failover or a restore, appending to another journal than the one
        the ZODB marker names must not start silently.
        """
        if self._conn is None:
            try:
                conn = self._connect()
            except JournalError as e:
                raise error_class(str(e)) from e
            try:
                cur = conn.cursor()
                try:
                    cur.execute(self._sql["info_select"])
                    row = cur.fetchone()
                finally:
                    cur.close()
            except self._db_error as e:
                conn.close()
                raise error_class("journal %s: cannot read its info row"
                                  " after reconnecting: %s"
                                  % (self.path, _reason(e))) from e
            identity = None if row is None else str(uuid.UUID(str(row[0])))
            if identity != self.identity:
                conn.close()
                raise JournalError(
                    "journal %s was %s when opened, but after reconnecting"
                    " it is %s; close it and find out which database this"
                    " is" % (self.path, self.identity, identity))
            self._conn = conn
            logger.warning("journal %s: reconnected", self.path)
        return self._conn

    def _disconnect(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except self._db_error:
                logger.debug("journal %s: error closing the connection",
                             self.path, exc_info=True)

    def _rollback(self, conn, error=None):
        """End a failed transaction; drop the connection if it is broken."""
        if error is not None and self._is_lost(conn, error):
            self._disconnect()
            return
        try:
            if self._in_transaction(conn):
                self._exec(conn, "ROLLBACK")
        except self._db_error:
            logger.warning("journal %s: ROLLBACK failed; reconnecting on"
                           " the next call", self.path, exc_info=True)
            self._disconnect()

    @staticmethod
    def _exec(conn, sql, params=()):
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
        finally:
            cur.close()

    def _query(self, sql, params=(), one=False):
        """Run a read; a connection lost before it is opened again once.

        Reads are safe to repeat, and a journal shared with other
        processes should survive a database restart between appends.
        """
        with self._lock:
            self._check_open()
            for attempt in (1, 2):
                conn = self._connection(JournalError)
                cur = None
                try:
                    cur = conn.cursor()
                    cur.execute(sql, params)
                    return cur.fetchone() if one else cur.fetchall()
                except self._db_error as e:
                    if attempt == 1 and self._is_lost(conn, e):
                        logger.warning("journal %s: connection lost (%s);"
                                       " reconnecting", self.path,
                                       _reason(e))
                        self._disconnect()
                        continue
                    raise JournalError("journal %s: cannot read: %s"
                                       % (self.path, _reason(e))) from e
                finally:
                    if cur is not None:
                        try:
                            cur.close()
                        except self._db_error:
                            pass

    # -- opening -----------------------------------------------------------

    def _open(self):
        cur = self._conn.cursor()
        try:
            row = self._read_info(cur)
            if row is None:
                if self.readonly:
                    raise JournalError("no journal at %s (no %s table)"
                                       % (self.path, self._table_names()[1]))
                row = self._create(cur)
        except self._db_error as e:
            raise JournalError("journal %s: cannot open: %s"
                               % (self.path, _reason(e))) from e
        finally:
            cur.close()
        identity, version, created = row
        self.identity = str(uuid.UUID(str(identity)))
        self.format_version = version
        self.created = created
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(
                "journal %s has record format version %d; this zjournal"
                " writes and reads version %d%s"
                % (self.path, version, FORMAT_VERSION,
                   ": upgrade zjournal" if version > FORMAT_VERSION else ""))
        if self._new_identity not in (None, self.identity):
            raise JournalError("journal %s is %s, not %s as asked"
                               % (self.path, self.identity,
                                  self._new_identity))
        self._found()
        if not self.readonly:
            self._check_key()

    def _create(self, cur):
        """Create the tables and the info row; return the info row.

        Under a lock, and checking again under it: two processes opening
        a new journal at once must end with one journal, one identity.
        The check under the lock is the DDL itself (``IF NOT EXISTS``)
        and a query of the info table: PostgreSQL may answer a catalog
        lookup such as ``to_regclass`` from a cache that does not yet know
        the tables another session created while this one waited.
        """
        try:
            self._begin_create(cur)
            for statement in self._ddl():
                cur.execute(statement)
            row = self._info_row(cur)
            if row is None:
                cur.execute(self._sql["any"])
                if cur.fetchone() is not None:
                    raise JournalError(
                        "journal %s holds records but its info table is"
                        " empty; restore its row (identity, format_version,"
                        " created) from a backup" % self.path)
                row = (self._new_identity or str(uuid.uuid4()),
                       FORMAT_VERSION, _time.time())
                cur.execute(self._sql["info_insert"], row)
                made = True
            else:
                made = False
            cur.execute("COMMIT")
        except BaseException:
            self._rollback(self._conn)
            raise
        if made:
            self._made = True
            logger.info("created journal %s", self.path)
        return row

    def _read_info(self, cur):
        """The info row; None when there is no info table (no journal)."""
        if not self._info_exists(cur):
            return None
        row = self._info_row(cur)
        if row is None:
            raise JournalError(
                "journal %s: its info table is empty; restore its row"
                " (identity, format_version, created) from a backup"
                % self.path)
        return row

    def _info_row(self, cur):
        cur.execute(self._sql["info_select"])
        rows = cur.fetchall()
        if len(rows) > 1:
            # Never create a second identity over existing records.
            raise JournalError(
                "journal %s: its info table holds %d rows instead of one;"
                " keep the row that names the journal's identity"
                % (self.path, len(rows)))
        return rows[0] if rows else None

    def _check_key(self):
        """A writer must hold the key that signed the last record.

        Mirrors the file journal: no key for a signed journal would append
        unsigned records after signed ones (what stripping signatures
        leaves), and another key would mix two keys' signatures.
        """
        last = self._last_entry()
        if last is not None:
            check_writer_key(self._key, last.encoded(), self.path, last.seq)

    def _last_entry(self):
        row = self._query(self._sql["last"], one=True)
        return None if row is None else self._entry(row, {})

    # -- the state, read fresh: other processes append -------------------

    def tail(self):
        """``(last_seq, head)`` read together, in one query.

        Another process may append between two separate reads of
        :attr:`last_seq` and :attr:`head`; recovery compares both with the
        marker, so it reads them here.
        """
        row = self._query(self._sql["tail"], one=True)
        return (0, GENESIS) if row is None else (row[0], bytes(row[1]))

    @property
    def last_seq(self):
        """The last sequence number in the database now (0: empty)."""
        return self.tail()[0]

    @property
    def head(self):
        """The chain hash of the last record in the database now."""
        return self.tail()[1]

    @property
    def first_seq(self):
        """The first sequence number (1 for an empty journal)."""
        row = self._query(self._sql["first"], one=True)
        return 1 if row is None or row[0] is None else row[0]

    # -- writing -------------------------------------------------------------

    def prepare(self, items, prev=None):
        """Encode one transaction's records into a :class:`Batch`.

        As :meth:`FileJournal.prepare
        <zjournal.journal.FileJournal.prepare>`: the records are encoded
        (and signed) exactly as a file journal encodes them, then decoded
        into the rows :meth:`append` inserts, each with its chain hash.
        ``prev`` defaults to the journal's head now.
        """
        check_transaction(self.path, items)
        if prev is None:
            prev = self.head
        return self._encode(items, prev)

    def _encode(self, items, prev):
        data, head = encode_chain(_checked(items), prev, self._key)
        rows = []
        names = {}
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            size = check_record(data, pos)
            r = decode_record(data, pos, names)
            meta = r.meta
            if meta is not None:
                try:
                    meta = meta.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise EncodeError("command %s: metadata is not UTF-8"
                                      " text: %s" % (r.name, e)) from None
            if "\x00" in r.name or (meta is not None and "\x00" in meta):
                # PostgreSQL text cannot hold NUL; refused on every
                # backend so that a journal can move between them.
                raise EncodeError("command %r: a NUL character in a"
                                  " command name or in metadata cannot be"
                                  " stored in an SQL journal" % r.name)
            rows.append((r.seq, r.time, r.flags, r.version, r.name,
                         r.payload, r.prev, meta, r.mac,
                         record_hash(view[pos:pos + size])))
            pos += size
        return Batch(items[0][0], items[-1][0], prev, head, rows)

    def append(self, items):
        """Append one transaction's rows in one database transaction.

        ``items`` is a :class:`Batch` from :meth:`prepare` or what
        :meth:`prepare` takes.  Under the journal's write lock, the last
        row must be ``first - 1`` and (for a batch) its hash the batch's
        ``prev``; otherwise :exc:`~zjournal.errors.JournalSequenceError`,
        which a :class:`~zjournal.JournaledDB` answers by catching up.
        Returns the batch.
        """
        if self.readonly:
            raise ReadOnlyJournalError("journal %s is open read-only"
                                       % self.path)
        batch = items if isinstance(items, Batch) else None
        if batch is not None and not isinstance(batch.data, list):
            raise ValueError("journal %s: the batch was prepared by another"
                             " kind of journal" % self.path)
        elif batch is None and not items:
            raise ValueError("a transaction has at least one record")
        first = batch.first if batch is not None else items[0][0]
        with self._lock:
            self._check_open()
            for attempt in (1, 2):
                conn = self._connection(JournalWriteError)
                try:
                    batch = self._insert_batch(conn, first, batch, items)
                except _Lost as lost:
                    # Nothing was committed, so trying once more on a new
                    # connection is safe: an idle connection dropped by
                    # a restart or a firewall is no reason to fail.
                    if attempt == 2:
                        raise lost.error from lost.error.__cause__
                    logger.warning("journal %s: connection lost before the"
                                   " append (%s); reconnecting", self.path,
                                   lost.error.__cause__)
                    continue
                break
            faults.point("append.after-write")
            try:
                self._exec(conn, "COMMIT")
            except BaseException as e:
                # Whether the database committed is unknown: only it can
                # tell, on a new connection.
                self._disconnect()
                if not isinstance(e, self._db_error):
                    raise
                logger.error("journal %s: COMMIT of seq %d..%d failed: %s",
                             self.path, batch.first, batch.last, _reason(e))
                raise OutcomeUnknownError(
                    "journal %s: the commit of seq %d..%d failed (%s);"
                    " whether they are journaled is unknown. Recovery"
                    " decides by what the journal holds: if it holds them,"
                    " they are applied" % (self.path, batch.first,
                                           batch.last, _reason(e))) from e
        return batch

    def _insert_batch(self, conn, first, batch, items):
        """Begin, lock, check the tail, insert; everything but COMMIT.

        On failure the transaction is rolled back and the error says that
        nothing was journaled (wrapped in _Lost when the connection was
        lost, which the caller may retry).
        """
        cur = conn.cursor()
        try:
            row = self._begin_append(cur)
            last, head = (0, GENESIS) if row is None else (
                row[0], bytes(row[1]))
            if first != last + 1:
                raise JournalSequenceError(
                    "journal %s ends at seq %d, cannot append seq %d"
                    % (self.path, last, first))
            if batch is None:
                batch = self.prepare(items, head)
            elif batch.prev != head:
                raise JournalSequenceError(
                    "journal %s: seq %d was chained after another record"
                    " than the journal's last one" % (self.path, first))
            self._insert(cur, batch.data)
        except self._db_error as e:
            lost = self._is_lost(conn, e)
            self._rollback(conn, e)
            if self._is_duplicate(e):
                raise JournalSequenceError(
                    "journal %s: seq %d was appended by another writer"
                    " meanwhile" % (self.path, first)) from e
            error = JournalWriteError(
                "journal %s: could not append seq %d (%s); the records"
                " were not journaled" % (self.path, first, _reason(e)))
            error.__cause__ = e
            if lost:
                raise _Lost(error) from e
            raise error
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            try:
                cur.close()
            except self._db_error:
                pass
        return batch

    def sync(self):
        """Make every committed row durable now.

        Under ``always`` and ``batch`` every commit already was; under
        ``never``, for a bulk load, this forces what the database
        deferred.
        """
        if self.fsync != "never" or self.readonly:
            return
        with self._lock:
            self._check_open()
            self._force_durable(self._connection(JournalWriteError))

    def _force_durable(self, conn):
        raise NotImplementedError

    # -- reading -------------------------------------------------------------

    def _entry(self, row, names):
        seq, t, flags, version, name, payload, prev, meta, mac = row[:9]
        k = names.get(name)
        if k is None:
            k = names[name] = len(name.encode("utf-8"))
        if meta is not None:
            meta = meta.encode("utf-8")
        return tuple.__new__(Entry, (seq, t, flags, version, name, payload,
                                     seq, _record_size(k, payload, meta, mac),
                                     prev, meta, mac))

    def _pages(self, start, stop=None):
        """Yield rows with ``start <= seq < stop`` in order, a page at a
        time, raising at the first missing seq.

        Each page is its own short query, located by the primary key
        (keyset pagination), rather than one cursor held open: no
        transaction or snapshot stays open while the caller works
        through the entries (a replay can take hours), the connection
        stays free for appends in between, and an abandoned iteration
        holds nothing.  Rows are never changed once written, and each
        query sees only whole transactions, so the pages join up.
        """
        expected = start
        while True:
            limit = PAGE_SIZE if stop is None else min(PAGE_SIZE,
                                                       stop - expected)
            if limit <= 0:
                return
            rows = self._query(self._sql["page"], (expected, limit))
            for row in rows:
                if row[0] != expected:
                    raise CorruptJournalError(
                        self.path, expected, expected, "seq %d%s %s missing:"
                        " the next row is seq %d (rows were deleted)" % (
                            expected, "" if row[0] == expected + 1 else
                            "..%d" % (row[0] - 1),
                            "is" if row[0] == expected + 1 else "are",
                            row[0]))
                expected += 1
                yield row
            if len(rows) < limit:
                return

    def entries(self, start=1, stop=None):
        """Yield entries with ``start <= seq < stop``, oldest first.

        Reads on to the last row committed when each page is read, so an
        iteration sees what other processes append meanwhile (whole
        transactions only).  Raises
        :exc:`~zjournal.errors.CorruptJournalError` where a seq is missing.
        """
        start = max(start, 1)
        if stop is not None and start >= stop:
            return
        names = {}
        entry = self._entry
        for row in self._pages(start, stop):
            yield entry(row, names)

    def verify(self):
        """Check every row; return a :class:`~zjournal.journal.ScanReport`.

        Each record's bytes are rebuilt from its columns: its stored hash
        must be theirs, its ``prev`` the previous record's hash, and with a
        key its signature must hold (an unsigned record after a signed
        one, or no signed record at all, fails as in the file journal).
        Raises :exc:`~zjournal.errors.TamperedJournalError` naming the
        first seq that fails, :exc:`~zjournal.errors.CorruptJournalError`
        for a missing seq or a journal cut inside a transaction.
        """
        report = ScanReport()
        began = _time.perf_counter()
        key = self._key
        chain = GENESIS
        names = {}
        flags = FLAG_END
        seq = 0
        for row in self._pages(1):
            entry = self._entry(row, names)
            seq, flags = entry[0], entry[2]
            if flags & ~KNOWN_FLAGS:
                raise CorruptJournalError(self.path, seq, seq,
                                          "unknown flags %#x" % flags)
            data = entry.encoded()
            if entry.prev != chain:
                raise TamperedJournalError(
                    self.path, seq, seq, "the hash chain is broken: this"
                    " record follows another record than the one before it"
                    " (rows edited, deleted, inserted or reordered)")
            chain = record_hash(data)
            if bytes(row[9]) != chain:
                raise TamperedJournalError(
                    self.path, seq, seq, "the row does not match its stored"
                    " hash: its columns were edited")
            if entry.mac is not None:
                report.signed += 1
                if key is not None and sign(
                        key, memoryview(data)[4:-4 - MAC_SIZE]) != entry.mac:
                    raise TamperedJournalError(
                        self.path, seq, seq, "bad signature: the record was"
                        " changed or signed with another key")
            else:
                report.unsigned += 1
                if key is not None and report.signed:
                    raise TamperedJournalError(
                        self.path, seq, seq, "unsigned record after signed"
                        " ones (a signature was stripped)")
            if flags & FLAG_QUERY:
                report.queries += 1
            if report.first_seq is None:
                report.first_seq = seq
            report.records += 1
            report.bytes += len(data)
        if not flags & FLAG_END:
            raise CorruptJournalError(
                self.path, seq, seq + 1, "the last record does not end a"
                " transaction: the rest of its transaction was deleted")
        report.last_seq = seq
        report.head = chain
        report.seconds = _time.perf_counter() - began
        if key is not None and report.records and not report.signed:
            raise TamperedJournalError(
                self.path, 1, 1, "a signing key was given but every record"
                " is unsigned: the signatures were stripped, or the journal"
                " was never signed")
        return report

    def info(self):
        """A summary for operators; reads the info row and the ends."""
        last = self.last_seq
        return {
            "backend": self.backend,
            "path": self.path,
            "identity": self.identity,
            "format_version": self.format_version,
            "created": self.created,
            "segments": 0,
            "first_seq": self.first_seq,
            "last_seq": last,
            "bytes": self._size(),
            "torn_tail": None,
            # Any number of processes may append: there is no one writer.
            "writer_active": None,
        }

    # -- closing -------------------------------------------------------------

    def close(self):
        """Close the connection.  Idempotent."""
        with self._lock:
            self._closed = True
            self._disconnect()

    def close_refused(self):
        """Close after a refusal, leaving the database as this open found
        it: a journal this open created, still empty, is removed again (an
        application pointed at a mistyped location)."""
        with self._lock:
            try:
                if self._made and not self._closed:
                    self._remove_if_empty()
            finally:
                self.close()

    def discard(self, expected):
        """Remove this journal, records and all, and close it.

        Only for a journal the caller has just created and filled itself
        -- a failed import -- never for one that may hold acknowledged
        commands: a refusal uses :meth:`close_refused`, which removes
        nothing but an empty journal.  ``expected`` is the ``(last_seq,
        head)`` the caller's own appends left: if the journal's tail is
        anything else under the lock, another writer appended, and the
        journal is left in place (JournalError).
        """
        with self._lock:
            try:
                conn = self._connection(JournalWriteError)
                cur = conn.cursor()
                try:
                    self._begin_create(cur)
                    self._lock_for_drop(cur)
                    cur.execute(self._sql["tail"])
                    row = cur.fetchone()
                    tail = (0, GENESIS) if row is None else (
                        row[0], bytes(row[1]))
                    if tail != tuple(expected):
                        self._rollback(conn)
                        raise JournalError(
                            "journal %s: another writer appended to it (it"
                            " ends at seq %d, not %d); it was left in place"
                            % (self.path, tail[0], expected[0]))
                    self._drop_schema(cur)
                    cur.execute("COMMIT")
                except self._db_error:
                    logger.exception("journal %s: could not remove it",
                                     self.path)
                    self._rollback(conn)
                    return
                finally:
                    cur.close()
                self._made = False
                logger.info("journal %s: removed", self.path)
                self._after_drop()
            finally:
                self.close()

    def _remove_if_empty(self):
        """Drop the schema of an empty journal, under the creation lock so
        that no other process is creating or appending meanwhile."""
        conn = self._conn
        if conn is None:
            return
        cur = conn.cursor()
        try:
            self._begin_create(cur)
            self._lock_for_drop(cur)
            cur.execute(self._sql["any"])
            if cur.fetchone() is None:
                self._drop_schema(cur)
                dropped = True
            else:
                dropped = False
            cur.execute("COMMIT")
        except self._db_error:
            logger.exception("journal %s: could not remove the new, empty"
                             " journal", self.path)
            self._rollback(conn)
            return
        finally:
            cur.close()
        self._made = False
        if dropped:
            logger.info("journal %s: removed the new, empty journal",
                        self.path)
            self._after_drop()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<%s %s%s%s>" % (type(self).__name__, self.path,
                                " readonly" if self.readonly else "",
                                " closed" if self._closed else "")


class _Lost(Exception):
    """Internal: the connection was lost before COMMIT; carries the
    JournalWriteError to raise if trying again is not possible."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class SQLiteJournal(SQLJournal):
    """A journal in one SQLite file, shared by the processes of one host.

    The file holds two tables, ``zjournal`` (one row per record) and
    ``zjournal_info`` (identity, format version, creation time).  It is
    created owner-only (``file_mode``) in an existing directory, in WAL
    mode, so that readers never block the writer.  Under the ``always``
    and ``batch`` policies every commit is synced (``synchronous=FULL``:
    in WAL mode, ``NORMAL`` would make commits durable only at the next
    checkpoint); under ``never`` nothing is (``OFF``).

    Appenders in several processes take turns through SQLite's write lock
    (``BEGIN IMMEDIATE``), waiting up to ``timeout`` seconds for it.  WAL
    needs shared memory between the processes: the file must be on a
    local file system, not a network share.
    """

    backend = "sqlite"
    _param = "?"

    def __init__(self, path, fsync="always", readonly=False, identity=None,
                 hmac_key=None, file_mode=FILE_MODE, timeout=60.0):
        import sqlite3
        self._sqlite3 = sqlite3
        self._db_error = sqlite3.Error
        self.path = os.path.abspath(path)
        self.file_mode = file_mode
        self.timeout = timeout
        self._made_file = False
        super().__init__(fsync, readonly, identity, hmac_key)

    def _table_names(self):
        return DEFAULT_TABLE, DEFAULT_TABLE + INFO_SUFFIX

    def _connect(self):
        sqlite3 = self._sqlite3
        directory = os.path.dirname(self.path)
        if self.readonly:
            if not os.path.isfile(self.path):
                raise JournalError("no journal at %s (no such file)"
                                   % self.path)
            target, uri = pathlib.Path(self.path).as_uri() + "?mode=ro", True
        else:
            if not self._opened:
                if not os.path.isdir(directory):
                    raise JournalError(
                        "cannot create journal %s: directory %s does not"
                        " exist" % (self.path, directory))
                self._create_file(directory)
            elif not os.path.isfile(self.path):
                # Reconnecting: a file that vanished is not recreated.
                raise JournalError("journal %s: the file is gone"
                                   % self.path)
            target, uri = self.path, False
        try:
            conn = sqlite3.connect(target, uri=uri, timeout=self.timeout,
                                   isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise JournalError("cannot open journal %s: %s"
                               % (self.path, _reason(e))) from e
        try:
            self._configure(conn)
        except sqlite3.Error as e:
            conn.close()
            raise JournalError("cannot open journal %s: %s"
                               % (self.path, _reason(e))) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_file(self, directory):
        """Create the database file owner-only, before SQLite does.

        SQLite would create it with the umask's permissions; its WAL and
        shared-memory files take the database file's.  An empty file is
        an empty database.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, self.file_mode)
        except FileExistsError:
            return
        except OSError as e:
            raise JournalError("cannot create journal %s: %s"
                               % (self.path, e)) from e
        os.close(fd)
        self._made_file = True
        sync_dir(directory)

    def _configure(self, conn):
        sync = "OFF" if self.fsync == "never" else "FULL"
        full = "OFF" if self.fsync == "never" else "ON"
        if not self.readonly:
            mode = self._wal(conn)
            if mode != "wal":
                raise JournalError(
                    "journal %s: SQLite refused WAL mode (it reports %r);"
                    " the file must be on a local file system"
                    % (self.path, mode))
        conn.execute("PRAGMA synchronous = " + sync)
        # Only macOS distinguishes these from fsync; elsewhere no-ops.
        conn.execute("PRAGMA fullfsync = " + full)
        conn.execute("PRAGMA checkpoint_fullfsync = " + full)
        if not self.readonly:
            # The first read opens (and may create) the WAL file, which
            # stays while this connection is open: sync its directory
            # entry now, or a power loss could take committed records
            # with the entry.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            sync_dir(os.path.dirname(self.path))

    def _wal(self, conn):
        """Switch to WAL mode.  The switch needs an exclusive lock, which
        another process opening the same new file may hold a moment:
        SQLite does not wait for it here, so this does."""
        deadline = _time.monotonic() + self.timeout
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except self._sqlite3.OperationalError as e:
                if ("locked" not in str(e) or _time.monotonic() > deadline):
                    raise
                _time.sleep(0.01)

    def _info_exists(self, cur):
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                    " AND name = ?", (DEFAULT_TABLE + INFO_SUFFIX,))
        return cur.fetchone() is not None

    def _begin_create(self, cur):
        cur.execute("BEGIN IMMEDIATE")

    def _ddl(self):
        return [
            # seq is the rowid: rows are stored in seq order.
            "CREATE TABLE IF NOT EXISTS zjournal ("
            " seq INTEGER PRIMARY KEY,"
            " time REAL NOT NULL,"
            " flags INTEGER NOT NULL,"
            " version INTEGER NOT NULL,"
            " name TEXT NOT NULL,"
            " payload BLOB NOT NULL,"
            " prev BLOB NOT NULL,"
            " meta TEXT,"
            " mac BLOB,"
            " hash BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS zjournal_info ("
            " identity TEXT NOT NULL,"
            " format_version INTEGER NOT NULL,"
            " created REAL NOT NULL)",
        ]

    def _begin_append(self, cur):
        try:
            cur.execute("BEGIN IMMEDIATE")
        except self._sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise JournalWriteError(
                    "journal %s: another process held the write lock for"
                    " more than %s seconds; the records were not journaled"
                    % (self.path, self.timeout)) from e
            raise
        cur.execute(self._sql["tail"])
        return cur.fetchone()

    def _in_transaction(self, conn):
        return conn.in_transaction

    def _is_duplicate(self, error):
        name = getattr(error, "sqlite_errorname", None)
        if name is not None:
            return name in ("SQLITE_CONSTRAINT_PRIMARYKEY",
                            "SQLITE_CONSTRAINT_UNIQUE")
        return (isinstance(error, self._sqlite3.IntegrityError)
                and "UNIQUE" in str(error))

    def _size(self):
        return sum(os.path.getsize(p) for p in (self.path,
                                                 self.path + "-wal")
                   if os.path.exists(p))

    def _force_durable(self, conn):
        """Sync the WAL and copy it into the database file, synced.

        A checkpoint syncs the WAL before it copies pages, and the
        database file after, under ``synchronous=FULL``.
        """
        try:
            conn.execute("PRAGMA synchronous = FULL")
            busy, _, _ = conn.execute(
                "PRAGMA wal_checkpoint(FULL)").fetchone()
        except self._sqlite3.Error as e:
            raise JournalWriteError("journal %s: sync failed: %s"
                                    % (self.path, _reason(e))) from e
        finally:
            conn.execute("PRAGMA synchronous = OFF")
        if busy:
            raise JournalWriteError(
                "journal %s: sync could not complete a checkpoint within %s"
                " seconds (other processes kept the journal busy)"
                % (self.path, self.timeout))

    def _drop_schema(self, cur):
        cur.execute("DROP TABLE zjournal")
        cur.execute("DROP TABLE zjournal_info")

    def _after_drop(self):
        """A file this open created holds nothing now: remove it."""
        if self._made_file:
            self._disconnect()
            self._remove_file()

    def _abandon(self):
        """A file this open created and nobody wrote to is removed."""
        try:
            untouched = os.path.getsize(self.path) == 0
        except OSError:
            return
        if self._made_file and untouched:
            self._remove_file()

    def _remove_file(self):
        for suffix in ("-wal", "-shm", ""):
            try:
                os.remove(self.path + suffix)
            except FileNotFoundError:
                pass
        self._made_file = False
        sync_dir(os.path.dirname(self.path))


# A PostgreSQL identifier zjournal accepts: lower case, so that it means
# the same quoted (as zjournal writes it) and unquoted (as people type
# it in psql).  Optionally schema-qualified.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)
# PostgreSQL truncates identifiers to 63 bytes; the info table's name is
# the journal's plus a suffix.
_MAX_IDENTIFIER = 63
# libpq keywords whose values are secrets: never shown in messages.
_SECRET_KEYWORDS = ("password", "sslpassword")
# High half of the advisory lock keys (ASCII "zjou"), so that they do not
# collide with small keys other software uses.
_LOCK_SPACE = 0x7a6a6f75
_OID_SPACE = 0x7a6a6f76


def _check_table(table):
    parts = table.split(".") if isinstance(table, str) else [None]
    if len(parts) > 2 or not all(
            p and _IDENTIFIER.fullmatch(p) for p in parts):
        raise ValueError(
            "table must be a lower-case SQL identifier ([a-z_][a-z0-9_]*),"
            " optionally schema-qualified, not %r" % (table,))
    if len(parts[-1]) + len(INFO_SUFFIX) > _MAX_IDENTIFIER or len(
            parts[0]) > _MAX_IDENTIFIER:
        raise ValueError("table name %r is too long: at most %d characters"
                         % (table, _MAX_IDENTIFIER - len(INFO_SUFFIX)))
    return parts


def _quote(parts):
    """Quote a validated identifier: the validation leaves nothing that
    needs escaping, the quotes keep reserved words usable."""
    return ".".join('"%s"' % p for p in parts)


class PostgresJournal(SQLJournal):
    """A journal in a PostgreSQL table, shared by processes on many hosts.

    ``table`` (default ``zjournal``; optionally ``schema.table``) holds one
    row per record; ``<table>_info`` holds the identity, format version
    and creation time.  Both are created on first open.  ``dsn`` is a
    libpq connection string or URI; credentials are best kept out of it
    (``~/.pgpass``, ``PGPASSWORD``), and are never shown in :attr:`path`
    or in messages.

    Under ``always`` and ``batch`` a commit returns once PostgreSQL has
    flushed it (``synchronous_commit=on``; with synchronous replication
    configured, once the standby has too); under ``never``
    (``synchronous_commit=off``) a server crash may lose the last
    commits, never corrupt the table.

    Appenders serialize on a transaction-level advisory lock derived from
    the table's OID, so that every name that reaches the table takes the
    same lock; readers take no lock.  Needs psycopg2 (``pip install
    'zjournal[postgresql]'``).

    Every append also sends ``NOTIFY <channel>, '<last seq>'`` in the
    transaction that inserts the rows, so PostgreSQL delivers it when,
    and only if, they are committed.  The channel is :attr:`channel`:
    the table name with ``_tail`` appended (``zjournal_tail`` by
    default).  Followers wait on it (:meth:`listen`) instead of polling.
    """

    backend = "postgresql"

    def __init__(self, dsn, table=DEFAULT_TABLE, fsync="always",
                 readonly=False, identity=None, hmac_key=None):
        parts = _check_table(table)
        try:
            import psycopg2
            import psycopg2.extensions
            import psycopg2.extras
        except ImportError as e:
            raise JournalError("the PostgreSQL journal needs psycopg2 (pip"
                               " install 'zjournal[postgresql]'): %s"
                               % e) from e
        self._pg = psycopg2
        self._db_error = psycopg2.Error
        self.table = table
        self._entries = _quote(parts)
        self._info = _quote(parts[:-1] + [parts[-1] + INFO_SUFFIX])
        self._info_name = ".".join(parts[:-1] + [parts[-1] + INFO_SUFFIX])
        self._insert_many = "INSERT INTO %s (%s, hash) VALUES %%s" % (
            self._entries, _ENTRY_COLUMNS)
        # Creating the tables is locked by a key derived from the name
        # (there is no table yet); appends by one derived from the
        # table's OID (see _open), whatever name reached it.
        digest = hashlib.blake2b(("zjournal:" + table).encode("ascii"),
                                 digest_size=4).digest()
        self._create_key = _LOCK_SPACE << 32 | int.from_bytes(digest, "big")
        self._append_key = None
        try:
            params = psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.Error:
            # The driver's message quotes the DSN, password and all.
            raise ValueError("invalid PostgreSQL DSN (not shown: it may hold"
                             " a password)") from None
        self._dsn = dsn
        self._params = params
        #: The channel every append notifies, with the new last seq as
        #: payload: the table name with ``_tail`` appended (a digest of
        #: it, when that is longer than PostgreSQL's 63-byte limit).
        self.channel = _channel(parts)
        # Sent with the rows, not after them: a reader woken by it finds
        # them committed, and no append commits without waking readers.
        self._notify = '; NOTIFY "%s", ' % self.channel
        self.path = " ".join(
            ["%s=%s" % (k, v) for k, v in params.items()
             if k not in _SECRET_KEYWORDS] + ["table=%s" % table])
        super().__init__(fsync, readonly, identity, hmac_key)

    def _table_names(self):
        return self._entries, self._info

    def _connect(self):
        pg = self._pg
        extra = {}
        if "application_name" not in self._params:
            extra["application_name"] = "zjournal"
        if "connect_timeout" not in self._params:
            extra["connect_timeout"] = 10
        try:
            conn = pg.connect(self._dsn, **extra)
        except pg.Error as e:
            raise JournalError("cannot connect to journal %s: %s"
                               % (self.path, _reason(e))) from e
        try:
            conn.autocommit = True
            conn.set_client_encoding("UTF8")
            # bytea as bytes, not memoryview: entries hold bytes.
            pg.extensions.register_type(_bytes_type(pg), conn)
            with conn.cursor() as cur:
                # A fixed choice between two literals; nothing interpolated
                # comes from outside.
                cur.execute(
                    "SET synchronous_commit = %s;"
                    " SET extra_float_digits = 3;"
                    " SET default_transaction_read_only = %s"
                    % ("off" if self.fsync == "never" else "on",
                       "on" if self.readonly else "off"))
        except pg.Error as e:
            conn.close()
            raise JournalError("cannot configure the connection to journal"
                               " %s: %s" % (self.path, _reason(e))) from e
        return conn

    def _info_exists(self, cur):
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (self._info_name,))
        return cur.fetchone()[0]

    def _begin_create(self, cur):
        cur.execute("BEGIN; SELECT pg_advisory_xact_lock(%s)",
                    (self._create_key,))

    def _ddl(self):
        return [
            "CREATE TABLE IF NOT EXISTS %s ("
            " seq BIGINT PRIMARY KEY,"
            " time DOUBLE PRECISION NOT NULL,"
            " flags SMALLINT NOT NULL,"
            " version INTEGER NOT NULL,"
            " name TEXT NOT NULL,"
            " payload BYTEA NOT NULL,"
            " prev BYTEA NOT NULL,"
            " meta TEXT,"
            " mac BYTEA,"
            " hash BYTEA NOT NULL)" % self._entries,
            "CREATE TABLE IF NOT EXISTS %s ("
            " identity UUID NOT NULL,"
            " format_version INTEGER NOT NULL,"
            " created DOUBLE PRECISION NOT NULL)" % self._info,
        ]

    def _found(self):
        row = self._query("SELECT %s::regclass::oid", (self.table,), one=True)
        self._append_key = _OID_SPACE << 32 | row[0]

    def _begin_append(self, cur):
        # One round trip: the lock is granted before the next statement
        # of the string takes its snapshot (READ COMMITTED: one per
        # statement), so the tail it reads is the last committed one.
        cur.execute("BEGIN; SELECT pg_advisory_xact_lock(%s); "
                    + self._sql["tail"], (self._append_key,))
        return cur.fetchone()

    def _insert(self, cur, rows):
        # The payload is an int, the channel a checked identifier: nothing
        # in the literal comes from outside.
        notify = self._notify + "'%d'" % rows[-1][0]
        if len(rows) == 1:
            cur.execute(self._sql["insert"] + notify, rows[0])
        else:
            # One statement, one round trip, for a whole transaction.
            self._pg.extras.execute_values(cur, self._insert_many + notify,
                                           rows, page_size=len(rows))

    def listen(self):
        """A :class:`Listener` woken by every append to this journal."""
        return Listener(self._dsn, self.channel, self.path)

    def _is_duplicate(self, error):
        return getattr(error, "pgcode", None) == "23505"

    def _is_lost(self, conn, error):
        return bool(conn.closed)

    def _in_transaction(self, conn):
        return conn.get_transaction_status() != (
            self._pg.extensions.TRANSACTION_STATUS_IDLE)

    def _size(self):
        row = self._query("SELECT pg_total_relation_size(%s::regclass)"
                          " + pg_total_relation_size(%s::regclass)",
                          (self.table, self._info_name), one=True)
        return row[0]

    def _force_durable(self, conn):
        """Commit a transaction synchronously: its commit record is
        flushed with everything before it in the server's WAL."""
        try:
            self._exec(conn, "BEGIN; SET LOCAL synchronous_commit = on;"
                       " SELECT txid_current(); COMMIT")
        except self._pg.Error as e:
            self._rollback(conn, e)
            raise JournalWriteError("journal %s: sync failed: %s"
                                    % (self.path, _reason(e))) from e

    def _lock_for_drop(self, cur):
        # The creation lock is not the appenders' (there was no OID to
        # derive it from); the table lock keeps every writer out.
        cur.execute("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE" % self._entries)

    def _drop_schema(self, cur):
        cur.execute("DROP TABLE %s, %s" % (self._entries, self._info))


# Appended to the table name to name the channel appends notify.
CHANNEL_SUFFIX = "_tail"


def _channel(parts):
    """The NOTIFY channel of the table ``parts`` name.

    A channel name is an identifier, cut by PostgreSQL at 63 bytes; one
    that would be longer is replaced by a digest of the table name, so
    that two long names never share a channel.
    """
    name = ".".join(parts) + CHANNEL_SUFFIX
    if len(name) > _MAX_IDENTIFIER:
        digest = hashlib.blake2b(".".join(parts).encode("ascii"),
                                 digest_size=12).hexdigest()
        name = "zjournal_%s%s" % (digest, CHANNEL_SUFFIX)
    return name


class Listener:
    """A connection of its own that LISTENs on a journal's channel.

    The journal's connection serves appends and reads, and a
    notification only arrives at a connection that waits for it: this
    one does nothing else.  A lost connection is logged and opened again
    at the next :meth:`wait`; notifications sent meanwhile are lost, which
    is why a follower polls too, if rarely.
    """

    def __init__(self, dsn, channel, path=None):
        import psycopg2
        self._pg = psycopg2
        self._dsn = dsn
        self.channel = channel
        self.path = path or channel
        self._conn = None
        self.connected = self._connect()

    def _connect(self):
        """Open the connection and LISTEN; False (logged) if it fails."""
        pg = self._pg
        try:
            conn = pg.connect(self._dsn, application_name="zjournal follower",
                              connect_timeout=10)
        except pg.Error as e:
            logger.warning("journal %s: cannot connect to listen for"
                           " appends (%s); polling meanwhile", self.path,
                           _reason(e))
            return False
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute('LISTEN "%s"' % self.channel)
        except pg.Error as e:
            conn.close()
            logger.warning("journal %s: LISTEN failed (%s); polling"
                           " meanwhile", self.path, _reason(e))
            return False
        self._conn = conn
        return True

    def wait(self, timeout, wake=None):
        """Wait up to ``timeout`` seconds for appends; return their seqs.

        ``wake`` is a file descriptor whose becoming readable ends the
        wait early (a follower's stop pipe).  An empty list means the
        time ran out, ``wake`` fired, or the connection was lost.
        """
        import select
        fds = [] if wake is None else [wake]
        if self._conn is None and not self._connect():
            select.select(fds, [], [], timeout)
            return []
        fds.append(self._conn)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._conn not in ready:
                return []
            self._conn.poll()
            found = [n.payload for n in self._conn.notifies]
            del self._conn.notifies[:]
        except (self._pg.Error, OSError, ValueError) as e:
            logger.warning("journal %s: the listening connection failed"
                           " (%s); reconnecting", self.path, e)
            self.close()
            return []
        return [int(p) for p in found if p.isdigit()]

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except self._pg.Error:
                pass


_BYTES_TYPE = None


def _bytes_type(pg):
    global _BYTES_TYPE
    if _BYTES_TYPE is None:
        def cast(value, cur):
            return None if value is None else bytes(pg.BINARY(value, cur))
        _BYTES_TYPE = pg.extensions.new_type(pg.BINARY.values, "ZJBYTES",
                                             cast)
    return _BYTES_TYPE




def copy_journal(source, target, progress=None):
    """Append every record of ``source`` to the empty journal ``target``.

    For moving a journal between backends (a file journal into
    PostgreSQL, say) without changing a byte of it: each transaction is
    appended as one transaction, with the same sequence numbers, times,
    arguments and metadata, and its chain hash is checked against the
    source's before it is appended.  The target must be empty and carry
    the source's identity (open it with ``identity=source.identity``), so
    that ZODBs built from the source open with it; and it must sign with
    the source's key, or neither may sign, for the hashes to match.

    For speed, open the target with ``fsync="never"`` and call its
    ``sync()`` afterwards.  Returns the number of records copied.
    ``progress(done, total)`` is called after each transaction.
    """
    if target.identity != source.identity:
        raise JournalError(
            "journal %s is %s, not %s: open it with identity=%r so that"
            " ZODBs built from %s open with it"
            % (target.path, target.identity, source.identity,
               source.identity, source.path))
    if target.last_seq != 0:
        raise JournalError("journal %s is not empty (it ends at seq %d);"
                           " copy into a new journal"
                           % (target.path, target.last_seq))
    total = source.last_seq
    head = GENESIS
    items = []
    n = 0
    for entry in source.entries(1, total + 1):
        items.append((entry.seq, entry.time, entry.version, entry.name,
                      entry.payload, entry.flags & FLAG_QUERY, entry.meta))
        if not entry.flags & FLAG_END:
            continue
        batch = target.prepare(items, head)
        if batch.head != entry.hash:
            raise JournalError(
                "copying seq %d..%d of %s into %s would change the records"
                " (their chain hash differs): open the target with the key"
                " the source was signed with, or with none if it is not"
                " signed; nothing of this transaction was appended"
                % (batch.first, batch.last, source.path, target.path))
        target.append(batch)
        head = batch.head
        n += len(items)
        items = []
        if progress is not None:
            progress(n, total)
    return n
