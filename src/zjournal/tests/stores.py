"""Snapshot stores for the tests: FileStorage, MappingStorage, RelStorage
(PostgreSQL, history-free and history-preserving) and ZEO (a real server
process).

A :class:`Store` is one ZODB store; :meth:`Store.db` opens a new client
``ZODB.DB`` on it, as each process of an application would.  A
:class:`StoreMaker` makes stores for one test and removes them (databases
dropped, clients closed) when the test ends, however it ends.  ZEO servers
come from a :class:`ZEOServers` pool: one server process serves many empty
FileStorages, and each store takes one that nobody used.

:func:`measure` compares the rate of ``JournaledDB.execute`` with plain
commits of the same change (run ``python -m zjournal.tests.stores``).
"""
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

import transaction
import ZODB
import ZODB.FileStorage
from ZODB.MappingStorage import MappingStorage

from zjournal.tests import services

KINDS = ("filestorage", "mappingstorage", "relstorage-hf", "relstorage-hp",
         "zeo")
# Stores that several clients (processes) open at once.
SHARED_KINDS = ("relstorage-hf", "relstorage-hp", "zeo")

ZEO_STORAGES_PER_SERVER = 30


def open_spec(spec, **kw):
    """A new ``ZODB.DB`` on the store a :meth:`Store.spec` describes."""
    kind = spec["kind"]
    if kind == "filestorage":
        return ZODB.DB(ZODB.FileStorage.FileStorage(spec["path"]), **kw)
    if kind.startswith("relstorage"):
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        options = Options(keep_history=spec["keep_history"])
        adapter = PostgreSQLAdapter(dsn=spec["dsn"], options=options)
        return ZODB.DB(RelStorage(adapter, options=options), **kw)
    if kind == "zeo":
        from ZEO.ClientStorage import ClientStorage
        storage = ClientStorage(tuple(spec["address"]),
                                storage=spec["storage"], wait_timeout=30,
                                server_sync=spec.get("server_sync", False))
        return ZODB.DB(storage, **kw)
    raise ValueError("no spec for a %s store" % kind)


class Store:
    """One ZODB store of some kind; :meth:`db` opens a client on it."""

    kind = None
    shared = False  # can several clients have it open at once?

    def __init__(self, cleanup):
        self._dbs = []
        cleanup.callback(self._close_clients)

    def db(self, server_sync=False, **kw):
        """A new ``ZODB.DB`` on this store (closed at the latest when the
        test ends); ``kw`` go to ``ZODB.DB``.

        ``server_sync`` (ZEO): make each transaction start with a round
        trip to the server, so that it sees every transaction committed
        before it began; without it, a ZEO client learns of other clients'
        commits asynchronously, soon after they happen.
        """
        db = self._open(server_sync, **kw)
        self._dbs.append(db)
        return db

    def spec(self, **extra):
        """A JSON-able description another process can open."""
        raise NotImplementedError

    @property
    def uri(self):
        """A zodburi URI of this store."""
        raise NotImplementedError

    @property
    def storage_class(self):
        """The class whose methods every client's storage calls."""
        raise NotImplementedError

    def _open(self, server_sync, **kw):
        return open_spec(self.spec(server_sync=server_sync), **kw)

    def _close_clients(self):
        for db in self._dbs:
            try:
                db.close()
            except Exception:
                pass  # closed by the test already

    def __repr__(self):
        return "<%s store>" % self.kind


class FileStore(Store):
    kind = "filestorage"

    def __init__(self, cleanup, path):
        super().__init__(cleanup)
        self.path = path

    def spec(self, **extra):
        return dict(kind=self.kind, path=self.path, **extra)

    @property
    def uri(self):
        return "file://" + self.path

    storage_class = ZODB.FileStorage.FileStorage


class KeptMappingStorage(MappingStorage):
    """A MappingStorage that outlives the DBs closing it, as the memory of
    a long-running process would: a test can close a JournaledDB and open
    another one on the same data."""

    def close(self):
        pass


class MappingStore(Store):
    kind = "mappingstorage"
    storage_class = KeptMappingStorage

    def __init__(self, cleanup):
        super().__init__(cleanup)
        self.storage = KeptMappingStorage()
        cleanup.callback(MappingStorage.close, self.storage)

    def _open(self, server_sync, **kw):
        return ZODB.DB(self.storage, **kw)

    def spec(self, **extra):
        raise ValueError("a MappingStorage lives in one process only")


class RelStore(Store):
    shared = True

    def __init__(self, cleanup, keep_history):
        self.keep_history = keep_history
        self.kind = "relstorage-hp" if keep_history else "relstorage-hf"
        # Created before the clients' cleanup is registered, so dropped
        # after they are closed.
        self.dsn = cleanup.enter_context(services.fresh_database())
        super().__init__(cleanup)

    def spec(self, **extra):
        return dict(kind=self.kind, dsn=self.dsn,
                    keep_history=self.keep_history, **extra)

    @property
    def uri(self):
        """RelStorage's zodburi resolver: ``postgres://USER@HOST:PORT/DB``
        (query arguments are RelStorage options)."""
        parts = dict(p.split("=", 1) for p in self.dsn.split())
        user = urllib.parse.quote(parts.get("user", "postgres"), safe="")
        if "password" in parts:
            user += ":" + urllib.parse.quote(parts["password"], safe="")
        return "postgres://%s@%s:%s/%s?keep_history=%s" % (
            user, parts.get("host", "localhost"), parts.get("port", "5432"),
            parts["dbname"], "true" if self.keep_history else "false")

    @property
    def storage_class(self):
        from relstorage.storage import RelStorage
        return RelStorage


class ZEOStore(Store):
    kind = "zeo"
    shared = True

    def __init__(self, cleanup, server, name):
        super().__init__(cleanup)
        self.server = server
        self.name = name

    def spec(self, **extra):
        return dict(kind=self.kind, address=list(self.server.address),
                    storage=self.name, **extra)

    @property
    def uri(self):
        host, port = self.server.address
        return "zeo://%s:%d?storage=%s" % (host, port, self.name)

    @property
    def storage_class(self):
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage


class ZEOServer:
    """A ZEO server process serving ``count`` empty FileStorages."""

    def __init__(self, directory, count=ZEO_STORAGES_PER_SERVER,
                 timeout=30):
        self.directory = directory
        self.count = count
        self.taken = 0
        os.makedirs(directory, exist_ok=True)
        self.log_path = os.path.join(directory, "zeo.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zjournal.tests.storeworker",
             "zeo-server", directory, str(count)],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.PIPE)
        try:
            self.address = self._wait_until_listening(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self, timeout):
        deadline = time.monotonic() + timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError("the ZEO server did not start within"
                                       " %ss; log:\n%s" % (timeout,
                                                          self.log()))
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(
                        "the ZEO server exited (status %s); log:\n%s"
                        % (self.process.wait(), self.log()))
                line += chunk
        word, host, port = line.decode().split()
        assert word == "LISTENING", line
        address = (host, int(port))
        # It listens once it said so; check, for a clear error if not.
        socket.create_connection(address, timeout=timeout).close()
        return address

    def take(self):
        """The name of a storage no one used yet, or None."""
        if self.taken >= self.count:
            return None
        self.taken += 1
        return "s%d" % (self.taken - 1)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process.stdin.close()
        self._log.close()


class ZEOServers:
    """ZEO server processes started on demand; each storage used once."""

    def __init__(self, directory):
        self.directory = directory
        self.servers = []

    def take(self, own_server=False):
        """(server, storage name) of an empty storage."""
        if not own_server and self.servers:
            name = self.servers[-1].take()
            if name is not None:
                return self.servers[-1], name
        server = ZEOServer(
            os.path.join(self.directory, "zeo%d" % len(self.servers)),
            count=1 if own_server else ZEO_STORAGES_PER_SERVER)
        self.servers.append(server)
        return server, server.take()

    def stop(self):
        while self.servers:
            self.servers.pop().stop()


class StoreMaker:
    """Makes the stores of one test; :meth:`close` removes them all."""

    def __init__(self, directory, zeo_servers):
        self.directory = directory
        self.zeo_servers = zeo_servers
        self._cleanup = contextlib.ExitStack()
        self._made = 0

    def make(self, kind, own_server=False):
        """An empty store of ``kind``.  ZEO stores are storages of a shared
        server unless ``own_server``: then a server of its own."""
        self._made += 1
        cleanup = self._cleanup
        if kind == "filestorage":
            path = os.path.join(self.directory, "Data%d.fs" % self._made)
            return FileStore(cleanup, path)
        if kind == "mappingstorage":
            return MappingStore(cleanup)
        if kind in ("relstorage-hf", "relstorage-hp"):
            return RelStore(cleanup, keep_history=kind == "relstorage-hp")
        if kind == "zeo":
            server, name = self.zeo_servers.take(own_server)
            if own_server:
                cleanup.callback(server.stop)
            return ZEOStore(cleanup, server, name)
        raise ValueError(kind)

    def close(self):
        self._cleanup.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_in_another_process(store):
    """What another process finds in ``store``: (state, last_seq, head).

    The state is as :func:`zjournal.tests.examples.state` returns it,
    tuples turned into lists by JSON; ``head`` is bytes.
    """
    done = subprocess.run(
        [sys.executable, "-m", "zjournal.tests.storeworker", "read",
         json.dumps(store.spec())],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    head = bytes.fromhex(found["head"]) if found["head"] else None
    return (found["table"], found["counters"]), found["last_seq"], head


# -- measuring -------------------------------------------------------------

def _plain_increment(db, n, second=False):
    """n plain commits of the change Increment("n") makes; with
    ``second``, each also changes a second object, as the zjournal marker
    is changed by every journaled transaction."""
    from persistent.mapping import PersistentMapping

    from zjournal.tests.examples import Counter
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        if "counters" not in root:
            root["counters"] = PersistentMapping()
            root["counters"]["n"] = Counter()
            root["counters"]["seq"] = Counter()
            tm.commit()
        counter = root["counters"]["n"]
        seq = root["counters"]["seq"]
        began = time.perf_counter()
        for _ in range(n):
            tm.begin()
            counter.value += 1
            if second:
                seq.value += 1
            tm.commit()
        return time.perf_counter() - began
    finally:
        tm.abort()
        conn.close()


def _journaled_increment(jdb, n):
    from zjournal.tests.examples import Increment
    jdb.execute(Increment("n"))
    began = time.perf_counter()
    for _ in range(n):
        jdb.execute(Increment("n"))
    return time.perf_counter() - began


def _journal(kind, directory, name):
    """A fresh journal of ``kind`` ("file" or "postgresql") and a
    function that removes it."""
    from zjournal import FileJournal
    if kind == "file":
        path = os.path.join(directory, "journal-" + name)
        return (FileJournal(path, fsync="always"),
                lambda: shutil.rmtree(path, ignore_errors=True))
    from zjournal.sqljournal import PostgresJournal
    from zjournal.tests import services
    import psycopg2
    dsn = services.DSN
    table = services.unique_name("zjbench")
    journal = PostgresJournal(dsn, table=table, fsync="always")

    def drop():
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS %s, %s_info" % (table, table))
        conn.close()
    return journal, drop


def measure(kinds=("filestorage", "relstorage-hf", "relstorage-hp", "zeo"),
            n=200, runs=5, directory=None, out=sys.stdout,
            journals=("file",)):
    """Commits per second of ``JournaledDB.execute(Increment("n"))``
    (journal fsync="always": a FileJournal, or a PostgresJournal on the
    test database) and of plain commits of the same change, on each kind
    of store; runs interleaved, medians reported.  A third series, plain
    commits that also change a second object, shows what the marker costs
    (every journaled transaction writes it).

    Returns ``{"<kind>/<journal>": {"journaled": /s, "plain": /s,
    "plain+1": /s, "ratio": journaled/plain, "ratio+1": journaled/plain+1,
    "samples": {...}}}``.
    """
    from zjournal import JournaledDB

    own_dir = directory is None
    if own_dir:
        directory = tempfile.mkdtemp(prefix="zjournal-measure-")
    zeo_servers = ZEOServers(os.path.join(directory, "zeo"))
    results = {}
    try:
        for kind, journal_kind in [(k, j) for k in kinds for j in journals]:
            # A directory per pair: FileStorages are numbered per maker.
            where = os.path.join(directory, "%s-%s" % (kind, journal_kind))
            os.makedirs(where)
            with StoreMaker(where, zeo_servers) as maker:
                plain_db = maker.make(kind).db()
                journal, remove = _journal(journal_kind, where, kind)
                jdb = JournaledDB(maker.make(kind).db(), journal)
                series = {"journaled": [], "plain": [], "plain+1": []}
                try:
                    _plain_increment(plain_db, 20, True)  # warm up
                    _journaled_increment(jdb, 20)
                    for _ in range(runs):
                        series["plain"].append(
                            n / _plain_increment(plain_db, n))
                        series["journaled"].append(
                            n / _journaled_increment(jdb, n))
                        series["plain+1"].append(
                            n / _plain_increment(plain_db, n, True))
                finally:
                    jdb.close()
                    remove()
            found = {k: statistics.median(v) for k, v in series.items()}
            found["ratio"] = found["journaled"] / found["plain"]
            found["ratio+1"] = found["journaled"] / found["plain+1"]
            found["samples"] = series
            label = "%s/%s" % (kind, journal_kind)
            results[label] = found
            print("%-25s journaled %6.0f/s  plain %6.0f/s  plain+1 %6.0f/s"
                  "  ratio %.2f  ratio+1 %.2f"
                  % (label, found["journaled"], found["plain"],
                     found["plain+1"], found["ratio"], found["ratio+1"]),
                  file=out)
            for name, values in series.items():
                print("    %-9s %s" % (name, " ".join(
                    "%.0f" % v for v in values)), file=out)
    finally:
        zeo_servers.stop()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return results


if __name__ == "__main__":
    # python -m zjournal.tests.stores [KIND,KIND...] [N] [RUNS]
    args = sys.argv[1:]
    measure(*([tuple(args[0].split(","))] if args else []),
            *[int(a) for a in args[1:3]])
