"""Crash tests: kill a worker process at the named points of the commit
protocol and of recovery, then check what survived.

The worker (:mod:`zjournal.tests.crashworker`) runs a deterministic
workload and records every acknowledged step in an fsynced file.  After it
is SIGKILLed, this process reopens the site and checks:

* the journal verifies, has seqs 1..N without a gap, ends on a transaction
  boundary, and is a prefix of what the workload journals;
* every acknowledged seq is in the journal, with the results the worker
  saw (Stamp's time and random numbers, Increment's running totals);
* the ZODB holds each journaled command's effect exactly once (compared
  with a model computed from the journal, and with a replay of the journal
  into a fresh MappingStorage), and its marker equals the journal's last
  seq;
* no aborted, rolled-back or failed command left anything anywhere;
* throwing the ZODB away and rebuilding gives the identical state.
"""
import collections
import json
import os
import signal
import subprocess
import sys

import pytest
import ZODB
import ZODB.FileStorage

import zjournal
from zjournal import FileJournal
from zjournal import MARKER_KEY
from zjournal.format import FLAG_END
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.format import TORN_SUFFIX
from zjournal.recovery import rebuild
from zjournal.tests import crashworker
from zjournal.tests.crashworker import ABORTED_COUNTER
from zjournal.tests.crashworker import journaled_transactions
from zjournal.tests.crashworker import open_jdb
from zjournal.tests.crashworker import plan
from zjournal.tests.crashworker import read_acks
from zjournal.tests.crashworker import run_plan
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Stamp
from zjournal.tests.examples import state
from zjournal.tests.helpers import check_model
from zjournal.tests.helpers import model
from zjournal.tests.helpers import replayed_state
from zjournal.tests.helpers import zodb_view

STEPS = 50            # 35 journaled transactions, 70 commands
SEGMENT_SIZE = 600    # a new segment every few transactions
PLAN = plan(STEPS)
TRANSACTIONS = journaled_transactions(PLAN)


# -- running the worker ---------------------------------------------------

def spawn(site, mode, kill_at=None, count=None, **options):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZJOURNAL_KILL_AT", "ZJOURNAL_KILL_COUNT")}
    if kill_at is not None:
        env["ZJOURNAL_KILL_AT"] = kill_at
        if count is not None:
            env["ZJOURNAL_KILL_COUNT"] = str(count)
    args = [sys.executable, "-m", "zjournal.tests.crashworker", mode,
            site.root]
    options.setdefault("segment_size", SEGMENT_SIZE)
    for name, value in options.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return subprocess.run(args, env=env, cwd=site.root, capture_output=True,
                          timeout=60)


def assert_killed(proc):
    assert proc.returncode == -signal.SIGKILL, (
        "expected the worker to be SIGKILLed, got returncode %s\n%s"
        % (proc.returncode, proc.stderr.decode(errors="replace")))


def assert_ok(proc):
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


# -- what the site holds --------------------------------------------------

def describe(command):
    return command.command_name, sorted(vars(command).items())


def plain_zodb_view(data_fs):
    """The same, read from Data.fs without zjournal (no recovery runs)."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(data_fs, read_only=True))
    try:
        conn = db.open()
        root = conn.root()
        marker = root.get(MARKER_KEY)
        result = state(root), None if marker is None else marker.last_seq
        conn.close()
        return result
    finally:
        db.close()


def check_plan_prefix(entries, transactions=TRANSACTIONS):
    """The journal is a transaction-aligned prefix of the workload's.

    Returns how many of the workload's transactions it holds.
    """
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    pos = n = 0
    for step, commands in transactions:
        if pos == len(entries):
            break
        chunk = entries[pos:pos + len(commands)]
        assert len(chunk) == len(commands), (
            "the journal ends inside the transaction of %r" % step)
        assert [describe(e.command) for e in chunk] == [
            describe(c) for c in commands], step
        assert [bool(e.flags & FLAG_END) for e in chunk] == [
            False] * (len(chunk) - 1) + [True], step
        pos += len(commands)
        n += 1
    assert pos == len(entries), "the journal holds more than the workload"
    return n


def expected_seqs(transactions=TRANSACTIONS):
    """Step index -> the seqs its transaction gets."""
    out, seq = {}, 0
    for step, commands in transactions:
        out[step.index] = list(range(seq + 1, seq + len(commands) + 1))
        seq += len(commands)
    return out


def check_acks(acks, entries, st, steps=PLAN, resumed=False):
    """Check acknowledgements against journal and state; return acked txns.

    ``resumed``: several workers ran the workload one after the other,
    each resuming after what the journal held, so steps may be missing
    (in doubt when their worker was killed) or repeated (aborted ones).
    """
    if resumed:
        committed = [a["step"] for a in acks if "seqs" in a]
        assert committed == sorted(set(committed)), (
            "a step was acknowledged twice")
    else:
        assert [a["step"] for a in acks] == list(range(len(acks))), (
            "acknowledgements out of order")
    by_seq = {e.seq: e for e in entries}
    _, _, totals = model(entries)
    table, counters = st
    seqs = expected_seqs(journaled_transactions(steps))
    acked = 0
    for ack in acks:
        step = steps[ack["step"]]
        if "aborted" in ack:
            assert not step.journaled
            for key in ack["aborted"]:
                assert key not in table, "aborted %s is in the ZODB" % key
                assert key not in counters, "aborted %s is in the ZODB" % key
            continue
        acked += 1
        assert ack["seqs"] == seqs[step.index]
        for seq, command, result in zip(ack["seqs"], step.journaled,
                                        ack["results"]):
            assert seq in by_seq, "acknowledged seq %d was lost" % seq
            entry = by_seq[seq]
            assert describe(entry.command) == describe(command)
            if isinstance(command, Increment):
                assert result == totals[seq]
            elif isinstance(command, Stamp):
                # What the live command returned is what the ZODB holds,
                # whether it was committed live or replayed.
                assert result == list(table[command.key])
                assert result[:2] == [seq, entry.time]
            else:
                assert result == command.value
    # Nothing an abandoned command writes may be anywhere.
    assert ABORTED_COUNTER not in counters
    assert not [k for k in table if str(k).startswith("aborted")]
    for e in entries:
        args = vars(e.command)
        assert args.get("name") != ABORTED_COUNTER
        assert not str(args.get("key", "")).startswith("aborted"), e
    return acked


Outcome = collections.namedtuple(
    "Outcome", "recovery entries state transactions acked")


def verify_site(site, steps=PLAN, transactions=TRANSACTIONS, resumed=False,
                **open_kw):
    """Reopen after a crash, check every invariant, then keep working."""
    open_kw.setdefault("segment_size", SEGMENT_SIZE)
    with open_jdb(site.root, **open_kw) as jdb:
        journal = jdb.journal
        report = journal.verify()
        assert report.last_seq == journal.last_seq
        assert report.records == journal.last_seq
        entries = list(journal.entries())
        assert len(entries) == journal.last_seq
        n = check_plan_prefix(entries, transactions)

        st, marker_seq, marker_id = zodb_view(jdb)
        assert marker_seq == journal.last_seq
        assert marker_id == journal.identity
        check_model(st, entries)
        assert replayed_state(journal) == st
        acked = check_acks(read_acks(site.root), entries, st, steps,
                           resumed)
        outcome = Outcome(jdb.recovery, entries, st, n, acked)

        # The reopened site takes new commands at the next seq.
        last = journal.last_seq
        assert jdb.execute(Increment("after-crash", by=7)) == 7
        stamp = jdb.execute(Stamp("after-crash"))
        assert stamp[0] == last + 2 == journal.last_seq
        final, marker_seq, _ = zodb_view(jdb)
        assert marker_seq == last + 2
        assert replayed_state(journal) == final
    check_rebuild_from_scratch(site, final, **open_kw)
    return outcome


def check_rebuild_from_scratch(site, expected, **open_kw):
    """Throw the ZODB away; the rebuild must give exactly ``expected``."""
    site.remove_zodb()
    with open_jdb(site.root, batch_size=7, **open_kw) as jdb:
        assert jdb.recovery.action == "rebuilt"
        assert jdb.recovery.replayed == jdb.journal.last_seq
        st, marker_seq, _ = zodb_view(jdb)
        assert marker_seq == jdb.journal.last_seq
        assert st == expected
        assert jdb.journal.verify().last_seq == jdb.journal.last_seq


def seqs_before(txn_number, transactions=TRANSACTIONS):
    """Commands journaled by the transactions before the txn_number-th."""
    return sum(len(c) for _, c in transactions[:txn_number - 1])


# -- killed during the commit protocol --------------------------------------

# point, whether the transaction being committed is in the journal after
# the kill (it is never acknowledged), and what reopening must do.
COMMIT_POINTS = [
    ("vote.before-append", False, "current"),
    ("append.after-write", True, "caught up"),
    ("vote.after-sync", True, "caught up"),
    ("finish.after-zodb", True, "current"),
]
# The 1st transaction, the 3rd (four commands), the 12th (a savepoint
# step), the 35th (the last one, four commands).
COUNTS = [1, 3, 12, 35]


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("point,journaled,action", COMMIT_POINTS)
def test_kill_during_commit(site, point, journaled, action, count):
    assert_killed(spawn(site, "run", point, count, steps=STEPS))
    killed_step, killed_commands = TRANSACTIONS[count - 1]
    acks = read_acks(site.root)
    # Every step before the killed one was acknowledged, the killed one not.
    assert [a["step"] for a in acks] == list(range(killed_step.index))

    outcome = verify_site(site)
    assert outcome.acked == count - 1
    assert outcome.transactions == (count if journaled else count - 1)
    before = seqs_before(count)
    last = before + (len(killed_commands) if journaled else 0)
    assert len(outcome.entries) == last
    assert outcome.recovery.action == action
    assert outcome.recovery.journal_seq == last
    # The killed transaction's effects are there exactly when its records
    # are in the journal (Increments are checked by verify_site's model).
    table = outcome.state[0]
    for command in killed_commands:
        if hasattr(command, "key"):
            assert (command.key in table) == journaled, command
    if action == "caught up":
        # The journal was the decision: the ZODB was behind by exactly the
        # killed transaction, and recovery applied it.
        assert outcome.recovery.marker_seq == before
        assert outcome.recovery.replayed == len(killed_commands)
    else:
        assert outcome.recovery.marker_seq == last


@pytest.mark.parametrize("count", [1, 4])
def test_kill_after_creating_a_segment(site, count):
    assert_killed(spawn(site, "run", "roll.after-create", count,
                        steps=STEPS))
    segments = site.segments()
    assert len(segments) == count + 1
    # The new segment holds its header and nothing else.
    assert os.path.getsize(segments[-1]) == SEGMENT_HEADER_SIZE
    acks = read_acks(site.root)
    outcome = verify_site(site)
    assert outcome.recovery.action == "current"
    assert outcome.acked == outcome.transactions
    assert int(os.path.basename(segments[-1])[:20]) == (
        len(outcome.entries) + 1)
    next_step = TRANSACTIONS[outcome.transactions][0]
    assert [a["step"] for a in acks] == list(range(next_step.index))


def test_empty_segment_left_by_a_crash_is_written_in_place(site):
    # A crash right after a roll leaves an empty last segment.  The next
    # writer fills it, whatever its segment_size -- even the smallest one
    # the journal accepts, with which every transaction starts a segment.
    assert_killed(spawn(site, "run", "roll.after-create", 2, steps=STEPS))
    empty = site.segments()[-1]
    assert os.path.getsize(empty) == SEGMENT_HEADER_SIZE
    with open_jdb(site.root, segment_size=SEGMENT_HEADER_SIZE) as jdb:
        journal = jdb.journal
        first = journal.last_seq + 1
        jdb.execute(Increment("after-crash"))
        jdb.execute(Increment("after-crash"))
        assert journal.segments() == sorted(set(journal.segments()))
        assert journal.verify().last_seq == first + 1
        entries = list(journal.entries())
        assert [e.seq for e in entries] == list(range(1, first + 2))
        st = zodb_view(jdb)[0]
        check_model(st, entries)
        assert st[1]["after-crash"] == 2
    assert site.segments()[-2] == empty
    with open_jdb(site.root) as jdb:
        assert jdb.recovery.action == "current"
        assert jdb.journal.verify().last_seq == first + 1


def test_kill_during_catch_up_inside_a_transaction(site):
    # The 7th transaction (four commands) is durable in the journal but the
    # ZODB never finished it ...
    assert_killed(spawn(site, "run", "vote.after-sync", 7, steps=STEPS))
    before = seqs_before(7)
    assert len(TRANSACTIONS[6][1]) == 4
    # ... and catching up, one command per batch, is killed after two.
    assert_killed(spawn(site, "open", "replay.after-commit", 2,
                        batch_size=1))
    st, marker_seq = plain_zodb_view(site.data_fs)
    assert marker_seq == before + 2
    with FileJournal(site.journal_dir, readonly=True) as journal:
        assert journal.last_seq == before + 4
        assert st == replayed_state(journal, until_seq=before + 2)
    outcome = verify_site(site)
    assert outcome.recovery.action == "caught up"
    assert outcome.recovery.marker_seq == before + 2
    assert outcome.recovery.replayed == 2
    assert outcome.acked == 6


def transactions_in_journal(site):
    """How many of the workload's transactions the journal holds."""
    if not os.path.isdir(site.journal_dir):
        return 0
    with FileJournal(site.journal_dir, readonly=True) as journal:
        return check_plan_prefix(list(journal.entries()))


def resume_point(n):
    """The step after the workload's n-th transaction."""
    return TRANSACTIONS[n - 1][0].index + 1 if n else 0


# Each worker resumes the workload after what the journal holds (and
# recovers what its predecessor left); the in-doubt transactions of the
# kills after the append are journaled, never acknowledged, and must not
# be lost nor applied twice.
REPEATED = [
    ("vote.after-sync", 3, True),
    ("append.after-write", 2, True),
    ("vote.before-append", 4, False),
    ("finish.after-zodb", 1, True),
    ("roll.after-create", 1, False),
    ("vote.after-sync", 1, True),
]


def test_repeated_crashes_converge(site):
    for point, count, journaled in REPEATED:
        n = transactions_in_journal(site)
        assert_killed(spawn(site, "run", point, count, steps=STEPS,
                            start_step=resume_point(n)))
        if point != "roll.after-create":
            assert transactions_in_journal(site) == (
                n + count if journaled else n + count - 1)
    n = transactions_in_journal(site)
    assert 0 < n < len(TRANSACTIONS)
    assert_ok(spawn(site, "run", steps=STEPS, start_step=resume_point(n)))
    outcome = verify_site(site, resumed=True)
    assert outcome.transactions == len(TRANSACTIONS)
    in_doubt = sum(journaled for _, _, journaled in REPEATED)
    assert outcome.acked == len(TRANSACTIONS) - in_doubt


def chop(segment, n=10):
    """Lose the last ``n`` bytes of a segment; return what it held."""
    with open(segment, "rb") as f:
        data = f.read()
    with open(segment, "r+b") as f:
        f.truncate(len(data) - n)
    return data


def test_torn_tails_cut_at_the_same_offset_are_all_kept(site):
    assert_killed(spawn(site, "run", "append.after-write", 7, steps=STEPS))
    segment = site.segments()[-1]
    first = chop(segment)
    with open_jdb(site.root, segment_size=SEGMENT_SIZE) as jdb:
        offset = jdb.journal.torn_tail.offset
    # The application retries the lost transaction; the same thing
    # happens to it, at the same place.
    assert_killed(spawn(site, "run", "append.after-write", 1, steps=STEPS,
                        start_step=TRANSACTIONS[6][0].index))
    assert site.segments()[-1] == segment
    second = chop(segment)
    assert second[offset:-10] != first[offset:-10]  # Stamp's time differs
    with open_jdb(site.root, segment_size=SEGMENT_SIZE) as jdb:
        assert jdb.journal.torn_tail.offset == offset
    kept = []
    for name in os.listdir(site.journal_dir):
        if TORN_SUFFIX in name:
            with open(os.path.join(site.journal_dir, name), "rb") as f:
                kept.append(f.read())
    assert second[offset:-10] in kept
    assert first[offset:-10] in kept, (
        "the bytes cut from the first torn tail were overwritten by the"
        " second cut at the same offset")
    outcome = verify_site(site, resumed=True)
    assert outcome.transactions == outcome.acked == 6


def test_kill_while_cutting_a_torn_tail(site):
    # The 7th transaction is written but not synced when the process dies;
    # then the machine loses the end of that write (a power cut would).
    assert_killed(spawn(site, "run", "append.after-write", 7, steps=STEPS))
    before = seqs_before(7)
    segment = site.segments()[-1]
    original = chop(segment)
    # A writer opening it saves the torn bytes aside, and is killed before
    # it cuts them.
    assert_killed(spawn(site, "open", "repair.after-save"))
    saved = [n for n in os.listdir(site.journal_dir) if TORN_SUFFIX in n]
    assert len(saved) == 1, saved
    offset = int(saved[0].rsplit(TORN_SUFFIX, 1)[1])
    with open(os.path.join(site.journal_dir, saved[0]), "rb") as f:
        assert f.read() == original[offset:-10]
    assert os.path.getsize(segment) == len(original) - 10

    with open_jdb(site.root, segment_size=SEGMENT_SIZE) as jdb:
        assert jdb.journal.torn_tail is not None
        assert jdb.journal.torn_tail.offset == offset
        assert jdb.journal.last_seq == before
    assert os.path.getsize(segment) == offset
    outcome = verify_site(site)
    assert outcome.recovery.action == "current"
    assert outcome.transactions == outcome.acked == 6
    assert len(outcome.entries) == before


def test_lost_acknowledged_records_are_refused_not_ignored(site):
    # Every step acknowledged; then the disk loses the end of the journal
    # (it lied about an fsync).  The ZODB is ahead of the journal: opening
    # must refuse, not run on as if those commands never happened.
    assert_ok(spawn(site, "run", steps=STEPS))
    total = sum(len(c) for _, c in TRANSACTIONS)
    chop(site.segments()[-1])
    with open(site.data_fs, "rb") as f:
        data_fs = f.read()
    with pytest.raises(zjournal.ZODBAheadError):
        open_jdb(site.root, segment_size=SEGMENT_SIZE)
    with open(site.data_fs, "rb") as f:
        assert f.read() == data_fs
    st, marker_seq = plain_zodb_view(site.data_fs)
    assert marker_seq == total
    # The refusal released the journal: it can be opened again at once.
    with FileJournal(site.journal_dir) as journal:
        assert journal.last_seq == total - len(TRANSACTIONS[-1][1])


# -- killed during a rebuild ------------------------------------------------

@pytest.mark.parametrize("count", [1, 4])
def test_kill_during_rebuild(site, count):
    with open_jdb(site.root, segment_size=SEGMENT_SIZE, fsync="never") as jdb:
        run_plan(jdb, PLAN)
        total = jdb.journal.last_seq
        reference = replayed_state(jdb.journal)
        assert zodb_view(jdb)[0] == reference
    assert total == 70
    site.remove_zodb()

    # Killed after the count-th batch of ten: a consistent partial ZODB.
    assert_killed(spawn(site, "open", "replay.after-commit", count,
                        batch_size=10))
    with FileJournal(site.journal_dir, readonly=True) as journal:
        st, marker_seq = plain_zodb_view(site.data_fs)
        assert marker_seq == 10 * count
        assert st == replayed_state(journal, until_seq=10 * count)
        check_model(st, list(journal.entries(1, 10 * count + 1)))

    # Recovery resumes where it stopped (and is killed again, after two
    # more batches) ...
    assert_killed(spawn(site, "open", "replay.after-commit", 2,
                        batch_size=10))
    st, marker_seq = plain_zodb_view(site.data_fs)
    assert marker_seq == 10 * count + 20

    # ... and, left alone, converges to the uninterrupted rebuild.
    assert_ok(spawn(site, "open", batch_size=10))
    with open(os.path.join(site.root, crashworker.RECOVERY)) as f:
        recovered = json.load(f)
    assert recovered == {"action": "caught up",
                         "marker_seq": 10 * count + 20,
                         "journal_seq": total,
                         "replayed": total - 10 * count - 20}
    with open_jdb(site.root, segment_size=SEGMENT_SIZE) as jdb:
        assert jdb.recovery.action == "current"
        assert zodb_view(jdb)[:2] == (reference, total)
    outcome = verify_site(site)
    assert outcome.state == reference


# -- in process: replay reproduces a non-idempotent history ------------------

def test_rebuild_reproduces_non_idempotent_history(site):
    steps = plan(300)
    acks = []
    with open_jdb(site.root, fsync="never", segment_size=4096) as jdb:
        run_plan(jdb, steps, acks.append)
        live, marker_seq, _ = zodb_view(jdb)
        total = jdb.journal.last_seq
        entries = list(jdb.journal.entries())
        assert marker_seq == total == 420
        check_plan_prefix(entries, journaled_transactions(steps))
        assert check_acks(acks, entries, live, steps) == 210
        check_model(live, entries)
        assert replayed_state(jdb.journal) == live
    # A rebuild whose batches split transactions gives the same state.
    check_rebuild_from_scratch(site, live, segment_size=4096)
    with open_jdb(site.root, segment_size=4096) as jdb:
        assert jdb.recovery.action == "current"
        assert zodb_view(jdb)[0] == live


def test_rebuild_until_a_seq_inside_a_transaction(site):
    """Point-in-time rebuild stops right after the named command.

    ``rebuild(until_seq=N)`` promises "the state right after that command,
    with a marker saying so", and ``entries(start, stop)`` yields every
    seq in ``range(start, stop)``, also when ``stop`` falls inside a
    transaction of several commands.
    """
    steps = plan(10)
    with open_jdb(site.root, fsync="never") as jdb:
        run_plan(jdb, steps)
        entries = list(jdb.journal.entries())
    assert len(entries) == 14
    with FileJournal(site.journal_dir, readonly=True) as journal:
        for stop in range(1, 16):
            assert [e.seq for e in journal.entries(1, stop)] == list(
                range(1, stop)), "entries(1, %d)" % stop
        for until in range(1, 15):
            db = ZODB.DB(None)
            r = rebuild(db, journal, until_seq=until)
            conn = db.open()
            assert conn.root()[MARKER_KEY].last_seq == until
            assert r.replayed == until
            check_model(state(conn.root()), entries[:until])
            conn.close()
            db.close()
