"""Power-loss tests: the journal and the ZODB after the machine stops.

The disk is :class:`zjournal.tests.powerloss.SimulatedDisk`, which keeps
track of what is durable (synced file content, synced directory entries)
and, after a power loss, rewrites the files to a state the loss could
have left: unsynced appends lost, partly kept, or ending in a sector of
zeros or garbage; unsynced creations, renames and removals undone.  Its
module docstring states the model and its limits.  FileStorage is
modelled as durable up to its last ``tpc_finish``.

Randomized runs (``test_power_loss``): each seed builds a site (Data.fs
and a journal with a small segment size, so that segments roll), then
runs one to three sessions.  A session opens the site on a fresh
simulated disk (posix or ext4 directory semantics), runs a random mix of
steps (commands, multi-command transactions, aborted blocks, failing
commands, rolled-back savepoints, conflicts) and loses power at a random
crash point -- during opening and torn-tail repair, a write, an fsync, a
segment roll -- or after its last step; then the files are rewritten to a
random state the loss could leave.  At the end the site is opened with
the ordinary ``FileIO`` and checked:

* the journal verifies, holds seqs 1..N, and its transactions are the
  acknowledged ones, in order, with at most one unacknowledged (in doubt)
  transaction per power loss, complete, where that loss happened;
* every acknowledged command is there, with the seq and the result its
  caller saw, applied exactly once (the state equals a model computed
  from the journal);
* nothing aborted, failed or rolled back is in the journal or the ZODB;
* the ZODB equals a replay of the journal into a MappingStorage, and its
  marker is the journal's last seq;
* a new command gets the next seq; throwing Data.fs away and rebuilding
  gives the same state.

The default (CI) is 300 seeds, about 40 s.  Set ``ZJOURNAL_LONG_TESTS=N``
to run N seeds instead (a soak; about 0.15 s a seed), and
``ZJOURNAL_POWERLOSS_FIRST_SEED=S`` to start them at S; the skip reason
of ``test_power_loss_long_mode`` (shown by ``-rs``) says which mode ran.
A failure names its seed in the test id and in a note on the error that
also tells what each session did and what the crash left, and a seed is
rerun alone by its node id::

    pytest 'src/zjournal/tests/test_powerloss.py::test_power_loss[seed=17]'

The targeted cases below put the power loss at chosen points: between a
segment roll's rename and its directory sync, inside the repair of a torn
tail, after a write whose last sector is garbage, around the sync of a
transaction that is then in doubt, and after creating a new journal
directory.

FileStorage's own fsync is switched off in this module (as is the
simulated disk's real one): the model decides what is durable, and a
real fsync costs milliseconds.
"""
import importlib
import os
import random

import pytest
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal.format import FLAG_END
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.format import TORN_SUFFIX
from zjournal.format import segment_name
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.powerloss import ABORTED
from zjournal.tests.powerloss import DATA_MODES
from zjournal.tests.powerloss import MODELS
from zjournal.tests.powerloss import PowerLoss
from zjournal.tests.powerloss import Session
from zjournal.tests.powerloss import SimulatedDisk
from zjournal.tests.powerloss import Txn
from zjournal.tests.powerloss import Workload
from zjournal.tests.powerloss import describe
from zjournal.tests.powerloss import run_session
from zjournal.tests.helpers import check_model
from zjournal.tests.helpers import model
from zjournal.tests.helpers import replayed_state
from zjournal.tests.helpers import zodb_view

# Commands the model counts as increments (Contend conflicts on purpose).
INCREMENTS = ("tests.increment", "tests.powerloss.contend")

CI_SEEDS = 300
LONG = os.environ.get("ZJOURNAL_LONG_TESTS", "").strip()
N_SEEDS = int(LONG) if LONG else CI_SEEDS
FIRST_SEED = int(os.environ.get("ZJOURNAL_POWERLOSS_FIRST_SEED", "0"))
SEEDS = range(FIRST_SEED, FIRST_SEED + N_SEEDS)
SEGMENT_SIZES = (100, 250, 600, 1500)


@pytest.fixture(autouse=True)
def _no_filestorage_fsync(monkeypatch):
    module = importlib.import_module("ZODB.FileStorage.FileStorage")
    monkeypatch.setattr(module, "fsync", None)


# -- opening and reading a site ---------------------------------------------

class Site:
    def __init__(self, root):
        self.root = str(root)
        self.data_fs = os.path.join(self.root, "Data.fs")
        self.journal_dir = os.path.join(self.root, "journal")

    def open(self, segment_size, io=None, **kw):
        journal = FileJournal(self.journal_dir, segment_size=segment_size,
                              io=io)
        try:
            db = ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs))
        except BaseException:
            journal.close()
            raise
        return JournaledDB(db, journal, **kw)

    def create(self, segment_size):
        """A new, empty site, cleanly closed."""
        self.open(segment_size).close()

    def remove_zodb(self):
        for name in os.listdir(self.root):
            if name.startswith("Data.fs"):
                os.remove(os.path.join(self.root, name))

    def session(self, disk, work, segment_size, **kw):
        return run_session(self.data_fs, self.journal_dir, disk, work,
                           segment_size, **kw)

    def names(self):
        return sorted(os.listdir(self.journal_dir))

    def segments(self):
        return [n for n in self.names() if n.endswith(".zjl")]

    def torn_files(self):
        out = {}
        for name in self.names():
            if TORN_SUFFIX in name:
                with open(os.path.join(self.journal_dir, name), "rb") as f:
                    out[name] = f.read()
        return out


def transactions(entries):
    """Group entries into transactions by their END flags."""
    out, cur = [], []
    for e in entries:
        cur.append(e)
        if e.flags & FLAG_END:
            out.append(cur)
            cur = []
    assert not cur, "the journal ends inside a transaction: %r" % cur
    return out


# -- the invariants -----------------------------------------------------------

def match_history(journal_txns, sessions):
    """The journal is the acknowledged transactions plus some in doubt.

    Each session contributes its acknowledged transactions, in order, all
    required, then the one it was committing when the power went out,
    optional.  Returns the number of in-doubt transactions found.
    """
    plan = []
    for s in sessions:
        plan += [(t, True) for t in s.acked]
        if s.in_doubt is not None and s.in_doubt.commands:
            plan.append((s.in_doubt, False))
    j = found = 0
    for i, (txn, required) in enumerate(plan):
        got = journal_txns[j] if j < len(journal_txns) else None
        if required:
            assert got is not None, (
                "acknowledged %r is not in the journal (it ends at seq %s)"
                % (txn, journal_txns[-1][-1].seq if journal_txns else 0))
            assert [e.seq for e in got] == txn.seqs, (
                "acknowledged %r is at seqs %s" % (txn, [e.seq for e in got]))
            assert [describe(e.command) for e in got] == txn.describe(), (
                "acknowledged %r: the journal holds %r" % (txn, got))
            j += 1
        elif got is not None and (
                [describe(e.command) for e in got] == txn.describe()):
            after = [t for t, req in plan[i + 1:] if req]
            if not after or after[0].seqs[0] != got[0].seq:
                j += 1
                found += 1
    assert j == len(journal_txns), (
        "the journal holds transactions nobody committed, from seq %d: %r"
        % (journal_txns[j][0].seq, journal_txns[j:]))
    return found


def check_results(sessions, entries, st):
    by_seq = {e.seq: e for e in entries}
    _, _, totals = model(entries, INCREMENTS)
    table, _ = st
    for s in sessions:
        for txn in s.acked:
            for seq, command, result in zip(txn.seqs, txn.commands,
                                            txn.results):
                entry = by_seq[seq]
                if command.command_name in ("tests.increment",
                                            "tests.powerloss.contend"):
                    assert result == totals[seq], (
                        "seq %d returned %r, the journal implies %r: applied"
                        " twice, or lost" % (seq, result, totals[seq]))
                elif isinstance(command, Stamp):
                    assert result[:2] == (seq, entry.time), (seq, result)
                    assert table[command.key] == result, (
                        "seq %d: the ZODB holds %r, the caller saw %r"
                        % (seq, table[command.key], result))
                else:
                    assert result == command.value


def check_nothing_aborted(st, entries):
    table, counters = st
    assert ABORTED not in counters, "an aborted Increment was applied"
    leaked = [k for k in table if ABORTED in str(k)]
    assert not leaked, "aborted commands left %s in the ZODB" % leaked
    for e in entries:
        args = vars(e.command)
        assert ABORTED not in str(args.get("key", "")), e
        assert args.get("name") != ABORTED, e
        assert e.command_name != "tests.fail", e


def verify_site(site, sessions, segment_size):
    """Reopen with the real FileIO; check every invariant; return facts."""
    with site.open(segment_size) as jdb:
        journal = jdb.journal
        report = journal.verify()
        last = journal.last_seq
        assert report.last_seq == last
        assert report.records == last
        entries = list(journal.entries())
        assert [e.seq for e in entries] == list(range(1, last + 1))
        in_doubt = match_history(transactions(entries), sessions)

        st, marker_seq, marker_id = zodb_view(jdb)
        assert marker_seq == last, "the marker is not the journal's end"
        assert marker_id == journal.identity
        check_model(st, entries, INCREMENTS)
        check_results(sessions, entries, st)
        check_nothing_aborted(st, entries)
        assert replayed_state(journal) == st, "the ZODB differs from a replay"

        # The site takes new commands at the next seqs.
        assert jdb.execute(Increment("after-the-loss", 5)) == 5
        assert journal.last_seq == last + 1
        stamp = jdb.execute(Stamp("after-the-loss"))
        assert stamp[0] == last + 2 == journal.last_seq
        final, marker_seq, _ = zodb_view(jdb)
        assert marker_seq == last + 2
        recovery = jdb.recovery
    site.remove_zodb()
    with site.open(segment_size, batch_size=5) as jdb:
        assert jdb.recovery.action == "rebuilt"
        assert jdb.recovery.replayed == last + 2
        assert zodb_view(jdb)[:2] == (final, last + 2), (
            "a rebuild from the journal gives another state")
    return recovery, entries, in_doubt


# -- randomized power losses ------------------------------------------------

def describe_run(seed, facts, sessions):
    lines = ["seed %d (%s)" % (seed, ", ".join(
        "%s=%s" % kv for kv in sorted(facts.items())))]
    for s in sessions:
        lines.append("  %r steps=%s" % (s, s.steps))
        lines += ["    " + n for n in s.notes]
    return "\n".join(lines)


def run_seed(seed, root):
    rng = random.Random(seed)
    site = Site(root)
    segment_size = rng.choice(SEGMENT_SIZES)
    model_name = rng.choice(MODELS)
    facts = {"segment_size": segment_size, "model": model_name}
    sessions = []
    try:
        site.create(segment_size)
        for index in range(rng.choice((1, 1, 2, 3))):
            session = Session(index)
            sessions.append(session)
            disk = SimulatedDisk(model_name, real_sync=False)
            if index and rng.random() < 0.3:
                # Early: while opening repairs what the last loss left.
                disk.arm(at=rng.randint(1, 10))
            else:
                disk.arm(at=rng.randint(1, 120))
            workload = Workload(None, rng, session)
            steps = rng.randint(3, 30)

            def work(jdb):
                workload.jdb = jdb
                workload.run(steps)
            site.session(disk, work, segment_size, allow_unjournaled=True)
            session.crashed_at = disk.crashed_at
            data = rng.choice(DATA_MODES + ("mixed",) * 3)
            session.notes = ["data=%s" % data] + disk.crash(rng, data=data)
        verify_site(site, sessions, segment_size)
    except (Exception, PowerLoss) as e:
        note = describe_run(seed, facts, sessions)
        if hasattr(e, "add_note"):
            e.add_note(note)
            raise
        raise AssertionError(note) from e  # Python < 3.11


def _long_mode_reason():
    if LONG:
        return "ZJOURNAL_LONG_TESTS=%s: running %d seeds" % (LONG, N_SEEDS)
    return ("long mode off: %d seeds (set ZJOURNAL_LONG_TESTS=N to run N"
            " seeds)" % N_SEEDS)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: "seed=%d" % s)
def test_power_loss(seed, tmp_path):
    run_seed(seed, tmp_path)


def test_power_loss_long_mode():
    pytest.skip(_long_mode_reason())


# -- targeted cases -----------------------------------------------------------

def increments(session, name="n", count=1000):
    """A workload: single Increments, recorded in ``session``."""
    def work(jdb):
        for i in range(count):
            command = Increment(name, 1 + i % 3)
            txn = Txn([command])
            session.in_doubt = txn
            result = jdb.execute(command)
            txn.seqs, txn.results = [jdb.journal.last_seq], [result]
            session.acked.append(txn)
            session.in_doubt = None
    return work


def is_roll_rename(op, when, name):
    return op == "rename" and when == "after" and name.endswith(".zjl.tmp")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("dirs", ["undo", "keep"])
@pytest.mark.parametrize("data", ["lose", "all"])
@pytest.mark.parametrize("nth", [1, 3])
def test_loss_between_roll_rename_and_dir_sync(tmp_path, model_name, dirs,
                                               data, nth):
    # The power goes out after the nth roll renamed the new segment into
    # place, before the directory sync: the new segment may vanish.  The
    # records before it were synced (data="lose" drops everything that
    # was not), so none may be lost, and opening must carry on.
    site = Site(tmp_path)
    site.create(150)
    session = Session(0)
    disk = SimulatedDisk(model_name)
    disk.arm(match=is_roll_rename, nth=nth)
    site.session(disk, increments(session), 150)
    assert disk.crashed_at[:2] == ("rename", "after")
    assert session.in_doubt is not None
    acked = len(session.acked)
    new = segment_name(acked + 1)
    assert disk.crashed_at[2] == new + ".tmp"
    disk.crash(random.Random(0), data=data, dirs=dirs)
    segments = site.segments()
    if dirs == "undo":
        # The rename never reached the disk: the previous segment is the
        # last one.  Under ext4 the sync of the temporary file committed
        # its creation; under posix that was undone too.
        assert new not in segments
        assert (new + ".tmp" in site.names()) == (model_name == "ext4")
    else:
        assert segments[-1] == new
        assert os.path.getsize(os.path.join(site.journal_dir, new)) == (
            SEGMENT_HEADER_SIZE)
    assert len(segments) == nth + (dirs == "keep")

    recovery, entries, in_doubt = verify_site(site, [session], 150)
    assert in_doubt == 0
    assert len(entries) == acked
    assert recovery.action == "current"
    assert not [n for n in site.names() if n.endswith(".tmp")]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("dirs", ["undo", "keep"])
def test_loss_right_after_a_roll_then_more_work(tmp_path, model_name, dirs):
    # Power lost between the rename and the directory sync of a roll;
    # the next session rolls to the same name again, works on, and loses
    # power at the same kind of point.  No acknowledged record may be
    # missing.
    site = Site(tmp_path)
    site.create(150)
    sessions = [Session(0), Session(1)]
    disk = SimulatedDisk(model_name)
    disk.arm(match=is_roll_rename, nth=2)
    site.session(disk, increments(sessions[0]), 150)
    disk.crash(random.Random(1), data="all", dirs=dirs)
    disk = SimulatedDisk(model_name)
    disk.arm(match=is_roll_rename, nth=2)
    site.session(disk, increments(sessions[1], name="m"), 150)
    disk.crash(random.Random(2), data="all", dirs=dirs)
    _, entries, _ = verify_site(site, sessions, 150)
    assert len(entries) == sum(len(s.acked) for s in sessions)


def torn_site(tmp_path, model_name, fill="garbage", acked=5):
    """A site whose last segment ends in a torn, never acknowledged write.

    Returns (site, session, offset of the torn bytes, the torn bytes).
    """
    site = Site(tmp_path)
    site.create(1 << 20)
    session = Session(0)
    disk = SimulatedDisk(model_name)
    disk.arm(match=lambda op, when, name: (
        op, when) == ("write", "after") and name.endswith(".zjl"),
        nth=acked + 1)
    site.session(disk, increments(session), 1 << 20)
    assert len(session.acked) == acked
    disk.crash(random.Random(3), data="torn", fill=fill, dirs="keep")
    path = os.path.join(site.journal_dir, site.segments()[-1])
    with open(path, "rb") as f:
        data = f.read()
    with FileJournal(site.journal_dir, readonly=True) as journal:
        assert journal.last_seq == acked
        torn = journal.torn_tail
        assert torn is not None and torn.offset + torn.size == len(data)
    return site, session, torn.offset, data[torn.offset:]


REPAIR_POINTS = [
    # (op, when, which file): where the power goes out during the cut.
    ("create", "before", "torn"),
    ("create", "after", "torn"),
    ("write", "after", "torn"),
    ("sync", "after", "torn"),
    ("sync_dir", "before", "journal"),
    ("sync_dir", "after", "journal"),
    ("truncate", "before", "segment"),
    ("truncate", "after", "segment"),
    ("sync", "before", "segment"),
    ("sync", "after", "segment"),
]
WHICH = {
    "torn": lambda name: TORN_SUFFIX in name,
    "journal": lambda name: name == "journal",
    "segment": lambda name: name.endswith(".zjl"),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("dirs", ["undo", "keep"])
@pytest.mark.parametrize("data", ["lose", "all"])
@pytest.mark.parametrize("op,when,which", REPAIR_POINTS)
def test_loss_during_torn_tail_repair(tmp_path, model_name, dirs, data, op,
                                      when, which):
    site, session, offset, torn = torn_site(tmp_path, model_name)
    acked = len(session.acked)
    disk = SimulatedDisk(model_name)
    disk.arm(match=lambda o, w, name: (o, w) == (op, when) and WHICH[which](
        name))
    recovery = site.session(disk, lambda jdb: None, 1 << 20)
    assert recovery is None, "opening did not reach %s %s" % (when, op)
    disk.crash(random.Random(4), data=data, dirs=dirs)
    segment = os.path.join(site.journal_dir, site.segments()[-1])
    size = os.path.getsize(segment)
    assert size in (offset, offset + len(torn))
    if size == offset:
        # The cut reached the disk: the bytes it removed must be kept.
        assert torn in site.torn_files().values(), (
            "the torn bytes were cut but are kept nowhere")

    # Opening again repairs what is left; the bytes are kept.
    with site.open(1 << 20) as jdb:
        assert jdb.journal.last_seq == acked
        assert (jdb.journal.torn_tail is None) == (size == offset)
    assert os.path.getsize(segment) == offset
    assert torn in site.torn_files().values()
    _, entries, in_doubt = verify_site(site, [session], 1 << 20)
    assert len(entries) == acked and in_doubt == 0


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("fill", ["garbage", "zeros"])
@pytest.mark.parametrize("acked", [0, 1, 7])
def test_garbage_in_the_last_sector_of_the_last_segment(tmp_path, model_name,
                                                        fill, acked):
    site, session, offset, torn = torn_site(tmp_path, model_name, fill,
                                            acked)
    assert offset == os.path.getsize(os.path.join(
        site.journal_dir, site.segments()[-1])) - len(torn)
    with site.open(1 << 20) as jdb:
        assert jdb.journal.torn_tail.offset == offset
        assert jdb.recovery.action == "current"
    assert list(site.torn_files().values()) == [torn]
    _, entries, in_doubt = verify_site(site, [session], 1 << 20)
    assert len(entries) == acked and in_doubt == 0


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("fill", ["garbage", "zeros"])
def test_torn_transaction_is_cut_whole(tmp_path, model_name, fill):
    # A transaction of four records, 1.2 KB: the power goes out after
    # its write, and only its last sector is damaged, so its first
    # records are intact and valid.  Without its END record it was never
    # acknowledged: it is cut whole, back to the previous transaction.
    site = Site(tmp_path)
    site.create(1 << 20)
    session = Session(0)
    big = [Put("big-%d" % i, "x" * 300) for i in range(4)]

    def work(jdb):
        increments(session, count=3)(jdb)
        session.in_doubt = Txn(big)
        with jdb.transaction() as conn:
            for c in big:
                zjournal.execute(conn, c)
        raise AssertionError("the power did not go out")

    disk = SimulatedDisk(model_name)
    disk.arm(match=lambda op, when, name: (op, when) == ("write", "after")
             and name.endswith(".zjl"), nth=4)
    site.session(disk, work, 1 << 20)
    disk.crash(random.Random(6), data="torn", fill=fill, dirs="keep")
    segment = os.path.join(site.journal_dir, site.segments()[-1])
    with open(segment, "rb") as f:
        data = f.read()
    with FileJournal(site.journal_dir, readonly=True) as journal:
        assert journal.last_seq == 3
        offset = journal.torn_tail.offset
        last = list(journal.entries())[-1]
        # Cut at the end of the last whole transaction, not after the
        # intact records of the torn one.
        assert offset == last.offset + last.size
    assert len(data) - offset > 1200
    # The first record of the torn transaction is intact on disk.
    assert data.find(b"big-0", offset) != -1
    with site.open(1 << 20) as jdb:
        assert jdb.journal.torn_tail.offset == offset
    assert list(site.torn_files().values()) == [data[offset:]]
    _, entries, in_doubt = verify_site(site, [session], 1 << 20)
    assert len(entries) == 3 and in_doubt == 0


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("when,data,journaled", [
    (("write", "before"), "all", False),
    (("write", "after"), "lose", False),
    (("write", "after"), "all", True),
    (("sync", "before"), "prefix", None),
    (("sync", "after"), "lose", True),
])
def test_in_doubt_transaction_is_whole_and_applied_once(
        tmp_path, model_name, when, data, journaled):
    session = Session(0)

    def work(jdb):
        jdb.execute(Put("first", 1))
        session.acked.append(Txn([Put("first", 1)]))
        session.acked[-1].seqs, session.acked[-1].results = [1], [1]
        commands = [Increment("n", 2), Stamp("stamp"), Put("p", 3),
                    Increment("n", 1)]
        session.in_doubt = Txn(commands)
        with jdb.transaction() as conn:
            for c in commands:
                zjournal.execute(conn, c)
        raise AssertionError("the power did not go out")

    for seed in range(20 if journaled is None else 1):
        root = tmp_path / str(seed)
        site = Site(root)
        site.create(1 << 20)
        session.acked, session.in_doubt = [], None
        disk = SimulatedDisk(model_name)
        disk.arm(match=lambda o, w, name: (o, w) == when and name.endswith(
            ".zjl"), nth=2)
        site.session(disk, work, 1 << 20)
        disk.crash(random.Random(seed), data=data)
        recovery, entries, in_doubt = verify_site(site, [session], 1 << 20)
        if journaled is not None:
            assert in_doubt == journaled
        assert len(entries) == (5 if in_doubt else 1)
        # The ZODB never finished the in-doubt transaction: recovery
        # applied it from the journal.
        assert recovery.action == ("caught up" if in_doubt else "current")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("depth", [1, 3])
def test_new_journal_directory_survives_power_loss(tmp_path, model_name,
                                                   depth):
    """The directory FileJournal creates for a new journal is made durable.

    POSIX makes a new directory entry durable only by syncing the
    directory that holds it.  A FileJournal that made its directory (with
    ``os.makedirs``) and synced only the journal directory, never the
    parent, could lose the whole new journal in a power loss after
    commands were acknowledged; the ZODB then names a journal that is
    gone (opening refuses with WrongJournalError, or, if Data.fs went too,
    the acknowledged commands are silently lost).  ext4 and XFS commit
    the mkdir with the first fsync, so there it cannot happen.
    """
    site = Site(tmp_path)
    # The journal goes in depth new directories.
    site.journal_dir = os.path.join(site.root, *(
        ["sub%d" % i for i in range(depth - 1)] + ["journal"]))
    # The ZODB exists and is durable; the journal does not exist yet.
    ZODB.DB(ZODB.FileStorage.FileStorage(site.data_fs)).close()
    session = Session(0)
    disk = SimulatedDisk(model_name)
    disk.watch(site.root)
    site.session(disk, increments(session, count=3), 1 << 20)
    assert len(session.acked) == 3
    notes = disk.crash(random.Random(5), data="lose", dirs="undo")
    if not os.path.isdir(site.journal_dir):
        try:
            site.open(1 << 20).close()
        except Exception as e:
            outcome = "opening raises %s" % type(e).__name__
        else:  # pragma: no cover
            outcome = "opening succeeds"
        pytest.fail("3 commands were acknowledged, then a power loss took"
                    " the journal directory away: its creation was never"
                    " made durable (the parent directory was never synced);"
                    " %s. %s" % (outcome, notes))
    _, entries, _ = verify_site(site, [session], 1 << 20)
    assert len(entries) == 3


# -- the model itself ---------------------------------------------------------

def test_disk_model_keeps_synced_bytes(tmp_path):
    for seed in range(200):
        rng = random.Random(seed)
        disk = SimulatedDisk(rng.choice(MODELS), real_sync=False)
        path = str(tmp_path / ("f%d" % seed))
        disk.create(path, b"h" * rng.randrange(1, 1100))
        fd = disk.open_append(path)
        synced = b""
        for _ in range(rng.randrange(1, 6)):
            disk.write(fd, rng.randbytes(rng.randrange(1, 900)))
            if rng.random() < 0.5:
                disk.sync(fd)
        with open(path, "rb") as f:
            everything = f.read()
        if not disk._fds[fd].ops:
            synced = everything
        else:
            synced = disk._fds[fd].durable
        disk.close(fd)
        disk.power_off()
        data = rng.choice(DATA_MODES)
        disk.crash(rng, data=data, dirs="keep")
        with open(path, "rb") as f:
            after = f.read()
        assert after[:len(synced)] == synced, (seed, data)
        assert len(after) <= len(everything)
        if data == "lose":
            assert after == synced
        elif data == "all":
            assert after == everything
        elif data == "prefix":
            assert everything.startswith(after)
        elif data == "torn" and len(everything) > len(synced):
            assert len(after) == len(everything)
            start = max(len(synced), (len(after) - 1) // 512 * 512)
            assert after[:start] == everything[:start]


def test_disk_model_undoes_unsynced_directory_operations(tmp_path):
    for model_name in MODELS:
        d = tmp_path / model_name
        d.mkdir()
        disk = SimulatedDisk(model_name, real_sync=False)
        a, b, c = (str(d / n) for n in "abc")
        disk.create(a, b"A")
        disk.sync_dir(str(d))
        disk.create(b, b"B")          # synced data, unsynced name
        disk.rename(a, c)             # unsynced rename
        disk.power_off()
        disk.crash(random.Random(0), dirs="undo")
        if model_name == "posix":
            assert sorted(os.listdir(d)) == ["a"]
        else:
            # ext4: the sync of b committed its creation.
            assert sorted(os.listdir(d)) == ["a", "b"]
        with open(a, "rb") as f:
            assert f.read() == b"A"


def test_power_loss_stops_every_later_change(tmp_path):
    disk = SimulatedDisk(real_sync=False)
    path = str(tmp_path / "f")
    disk.arm(match=lambda op, when, name: op == "sync")
    with pytest.raises(PowerLoss):
        disk.create(path, b"data")
    assert disk.dead and disk.crashed_at == ("sync", "before", "f")
    with pytest.raises(PowerLoss):
        disk.remove(path)
    disk.crash(random.Random(0), data="lose", dirs="keep")
    with open(path, "rb") as f:
        assert f.read() == b""
