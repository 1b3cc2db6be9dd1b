"""The bank workload of ``zjournal.demo``, recorded and replayed three ways.

* zjournal: the demo's own commands through ``jdb.execute`` (journal
  ``fsync="always"``), replayed by ``zjournal.recovery.rebuild`` into a
  fresh FileStorage;
* eventsourcing: one ``Bank`` aggregate, one stored event per command, in
  a SQLite file (WAL, SQLite's default ``synchronous=FULL``: one sync per
  saved command); replayed by reconstructing the aggregate from its events
  in a new application;
* coopy: a prevalent ``CoopyBank``, ``durability="sync"`` (an fsync per
  call); replayed by ``init_persistent_system`` on the same directory.

Same workload, same command count: the demo's workload generator drives
zjournal first; the commands zjournal accepted (the bank rejects a few for
insufficient funds) are then sent, in the same order, to the peers.  The
transfer fee, which zjournal draws from ``context.random``, is read back
from the journal entry's context and handed to the peers, so all three
systems end in the same balances, which the benchmark checks.
"""
import os
import shutil
import time

import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import demo
from zjournal import recovery

from coopy.base import control
from coopy.base import init_persistent_system
from coopy.decorators import abort_exception
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.domain import event


class InsufficientFunds(Exception):
    pass


# -- eventsourcing ---------------------------------------------------------

class ESBank(Aggregate):
    """All accounts in one aggregate: every command is one event."""

    def __init__(self):
        self.accounts = {}  # owner -> [balance, opened, last, operations]
        self.fees = 0

    def open_account(self, owner, initial, at):
        if owner in self.accounts:
            raise ValueError("account %r exists" % owner)
        self._opened(owner, initial, at)

    def deposit(self, owner, amount, at):
        self.accounts[owner]  # KeyError for an unknown account
        self._deposited(owner, amount, at)

    def withdraw(self, owner, amount, at):
        if self.accounts[owner][0] < amount:
            raise InsufficientFunds(owner)
        self._withdrew(owner, amount, at)

    def transfer(self, source, target, amount, fee, at):
        if self.accounts[source][0] < amount + fee:
            raise InsufficientFunds(source)
        self.accounts[target]
        self._transferred(source, target, amount, fee, at)

    @event("AccountOpened")
    def _opened(self, owner, initial, at):
        self.accounts[owner] = [initial, at, at, 0]

    @event("Deposited")
    def _deposited(self, owner, amount, at):
        account = self.accounts[owner]
        account[0] += amount
        account[2] = at
        account[3] += 1

    @event("Withdrew")
    def _withdrew(self, owner, amount, at):
        account = self.accounts[owner]
        account[0] -= amount
        account[2] = at
        account[3] += 1

    @event("Transferred")
    def _transferred(self, source, target, amount, fee, at):
        src, dst = self.accounts[source], self.accounts[target]
        src[0] -= amount + fee
        dst[0] += amount
        self.fees += fee
        for account in (src, dst):
            account[2] = at
            account[3] += 1


class ESBankApp(Application):
    pass


def es_env(path):
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path}


# -- coopy -------------------------------------------------------------------

class CoopyBank:
    """The prevalent system: plain objects, journaled method calls."""

    def __init__(self):
        self.accounts = {}  # owner -> [balance, opened, last, operations]
        self.fees = 0

    @abort_exception
    def open_account(self, owner, initial):
        if owner in self.accounts:
            raise ValueError("account %r exists" % owner)
        now = self._clock.time()
        self.accounts[owner] = [initial, now, now, 0]

    @abort_exception
    def deposit(self, owner, amount):
        account = self.accounts[owner]
        account[0] += amount
        account[2] = self._clock.time()
        account[3] += 1

    @abort_exception
    def withdraw(self, owner, amount):
        account = self.accounts[owner]
        if account[0] < amount:
            raise InsufficientFunds(owner)
        account[0] -= amount
        account[2] = self._clock.time()
        account[3] += 1

    @abort_exception
    def transfer(self, source, target, amount, fee):
        src, dst = self.accounts[source], self.accounts[target]
        if src[0] < amount + fee:
            raise InsufficientFunds(source)
        src[0] -= amount + fee
        dst[0] += amount
        self.fees += fee
        now = self._clock.time()
        for account in (src, dst):
            account[2] = now
            account[3] += 1


def open_coopy(basedir):
    return init_persistent_system(CoopyBank, basedir, durability="sync",
                                  validation="off")


# -- the comparable state ---------------------------------------------------------

def state_of(fees, accounts):
    """(fees, ((owner, balance, operations), ...)): equal across systems."""
    return [fees, sorted([owner, acct[0], acct[1]]
                         for owner, acct in accounts.items())]


def zj_state(root):
    bank = root[demo.BANK_KEY]
    return state_of(bank.fees, {a.owner: (a.balance, a.operations)
                                for a in bank.accounts.values()})


def peer_state(bank):
    return state_of(bank.fees, {o: (a[0], a[3])
                                for o, a in bank.accounts.items()})


# -- recording ---------------------------------------------------------------

def _peer_command(entry):
    """What the peers are sent for one accepted, journaled demo command."""
    cmd = entry.command
    if isinstance(cmd, demo.OpenAccount):
        return ("open_account", (cmd.owner, cmd.initial))
    if isinstance(cmd, demo.Deposit):
        return ("deposit", (cmd.owner, cmd.amount))
    if isinstance(cmd, demo.Withdraw):
        return ("withdraw", (cmd.owner, cmd.amount))
    if isinstance(cmd, demo.Transfer):
        # The fee zjournal charged: the first draw of the entry's
        # context.random, exactly what Transfer.execute drew.
        context = zjournal.Context(entry.seq, entry.time)
        fee = context.random.randint(0, 2)
        return ("transfer", (cmd.source, cmd.target, cmd.amount, fee))
    raise TypeError(cmd)


class Recorder:
    """The three systems, open side by side, fed the workload in chunks."""

    def __init__(self, directory):
        self.directory = directory
        self.zj_fs = os.path.join(directory, "zjournal.fs")
        self.zj_journal = os.path.join(directory, "zjournal.journal")
        self.es_dir = os.path.join(directory, "eventsourcing")
        self.es_db = os.path.join(self.es_dir, "bank.sqlite")
        self.coopy_dir = os.path.join(directory, "coopy")
        os.makedirs(self.es_dir)
        self.jdb = zjournal.JournaledDB(
            ZODB.DB(ZODB.FileStorage.FileStorage(self.zj_fs)),
            zjournal.FileJournal(self.zj_journal))
        self.es_app = ESBankApp(env=es_env(self.es_db))
        self.es_bank = ESBank()
        self.es_app.save(self.es_bank)
        self.es_bank_id = str(self.es_bank.id)
        self.coopy = open_coopy(self.coopy_dir)
        self.attempted = 0
        self.rejected = 0
        self.recorded = {"zjournal": 0, "eventsourcing": 0, "coopy": 0}

    def zjournal_chunk(self, commands):
        """Execute a chunk of demo commands; return (seconds, peer commands)."""
        first = self.jdb.journal.last_seq + 1
        began = time.perf_counter()
        for command in commands:
            try:
                self.jdb.execute(command)
            except demo.InsufficientFunds:
                self.rejected += 1
        elapsed = time.perf_counter() - began
        self.attempted += len(commands)
        last = self.jdb.journal.last_seq
        self.recorded["zjournal"] += last - first + 1
        peer = [_peer_command(e) for e in
                self.jdb.journal.entries(first, last + 1)]
        return elapsed, peer

    def es_chunk(self, peer_commands):
        app, bank = self.es_app, self.es_bank
        began = time.perf_counter()
        for name, args in peer_commands:
            getattr(bank, name)(*args, at=time.time())
            app.save(bank)
        elapsed = time.perf_counter() - began
        self.recorded["eventsourcing"] += len(peer_commands)
        return elapsed

    def coopy_chunk(self, peer_commands):
        system = self.coopy
        began = time.perf_counter()
        for name, args in peer_commands:
            getattr(system, name)(*args)
        elapsed = time.perf_counter() - began
        self.recorded["coopy"] += len(peer_commands)
        return elapsed

    def close(self):
        """Close all three; return their final states (must be equal)."""
        conn = self.jdb.open()
        states = {"zjournal": zj_state(conn.root())}
        conn.close()
        self.jdb.close()
        states["eventsourcing"] = peer_state(self.es_bank)
        self.es_app.close()
        states["coopy"] = peer_state(self.coopy.obj)
        control(self.coopy).close()
        return states

    def sizes(self):
        journal = zjournal.FileJournal(self.zj_journal, readonly=True)
        zj = sum(os.path.getsize(p) for p in journal.segments())
        journal.close()
        coopy = sum(os.path.getsize(os.path.join(self.coopy_dir, f))
                    for f in os.listdir(self.coopy_dir) if f.endswith(".log"))
        es = sum(os.path.getsize(os.path.join(self.es_dir, f))
                 for f in os.listdir(self.es_dir))
        return {"zjournal_journal_bytes": zj,
                "coopy_log_bytes": coopy,
                "eventsourcing_sqlite_bytes": es}


# -- replaying (each in a child process) ---------------------------------------

def child_replay(spec):
    system = spec["system"]
    work = spec["work"]
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    baseline = _peak_rss()
    if system == "zjournal":
        target = os.path.join(work, "rebuilt.fs")
        began = time.perf_counter()
        db = ZODB.DB(ZODB.FileStorage.FileStorage(target))
        journal = zjournal.FileJournal(spec["source"], readonly=True)
        result = recovery.rebuild(db, journal)
        elapsed = time.perf_counter() - began
        n = result.replayed
        conn = db.open()
        state = zj_state(conn.root())
        conn.close()
        db.close()
        journal.close()
    elif system == "coopy":
        copy = os.path.join(work, "coopy")
        shutil.copytree(spec["source"], copy)
        began = time.perf_counter()
        proxy = open_coopy(copy)
        elapsed = time.perf_counter() - began
        state = peer_state(proxy.obj)
        n = None
        control(proxy).close()
    elif system == "eventsourcing":
        copy = os.path.join(work, "eventsourcing")
        shutil.copytree(spec["source"], copy)
        began = time.perf_counter()
        app = ESBankApp(env=es_env(os.path.join(copy, "bank.sqlite")))
        import uuid
        bank = app.repository.get(uuid.UUID(spec["bank_id"]))
        elapsed = time.perf_counter() - began
        n = bank.version - 1  # the Created event is not a command
        state = peer_state(bank)
        app.close()
    else:
        raise ValueError(system)
    peak = _peak_rss()
    shutil.rmtree(work, ignore_errors=True)
    return {"system": system, "seconds": elapsed, "replayed": n,
            "state": state, "baseline_peak_rss_kib": baseline,
            "peak_rss_kib": peak}


def _peak_rss():
    import bench_util
    return bench_util.peak_rss_kib()
