"""The canonical state digest (zjournal.digest) and the digests
JournaledDB(digest_interval=N) records in the journal."""
import datetime
import decimal
import random

import persistent
import pytest
import transaction
import ZODB
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from BTrees.OOBTree import OOTreeSet
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from zjournal import JournaledDB
from zjournal import digest
from zjournal import execute
from zjournal.digest import DIGEST_COMMAND
from zjournal.digest import DigestError
from zjournal.marker import MARKER_KEY
from zjournal.recovery import rebuild
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp


class Node(persistent.Persistent):

    def __init__(self, name, **attrs):
        self.name = name
        self.__dict__.update(attrs)


class Key:
    """A dict key with the default repr (a memory address)."""

    def __init__(self, n):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, Key) and other.n == self.n

    def __hash__(self):
        return hash(self.n)


class Unpicklable:

    def __reduce_ex__(self, protocol):
        raise TypeError("not today")


def open_db(**kw):
    db = ZODB.DB(None, **kw)
    tm = transaction.TransactionManager()
    return db, tm, db.open(tm)


def build(fill, **kw):
    """A MappingStorage DB whose root ``fill(root)`` populated; committed."""
    db, tm, conn = open_db(**kw)
    fill(conn.root())
    tm.commit()
    return db, conn


def digest_of(fill):
    db, conn = build(fill)
    try:
        return digest.state_digest(conn.root())
    finally:
        db.close()


def oids(conn):
    return {path: conn.get(oid)._p_oid for path, oid in _walk_oids(conn)}


def _walk_oids(conn):
    walker = digest.Walker(conn.root())
    for visit in walker:
        yield visit.path, walker._last[0]._p_oid


class TestCanonical:

    def test_insertion_order_and_oids_do_not_matter(self):
        names = ["n%02d" % i for i in range(40)]

        def fill(order, waste):
            def fill_root(root):
                # Objects created and dropped shift every later oid.
                root["waste"] = [Node("w%d" % i) for i in range(waste)]
                del root["waste"]
                people = root["people"] = PersistentMapping()
                for name in order:
                    people[name] = Node(name, friends=PersistentList())
                for name in names:
                    people[name].friends.append(
                        people[names[(names.index(name) + 1) % len(names)]])
            return fill_root

        shuffled = list(names)
        random.Random(5).shuffle(shuffled)
        db1, conn1 = build(fill(names, 0))
        db2, conn2 = build(fill(shuffled, 7))
        try:
            assert digest.state_digest(conn1.root()) == digest.state_digest(
                conn2.root())
            # The test means something only if the oids really differ.
            assert (conn1.root()["people"]["n03"]._p_oid
                    != conn2.root()["people"]["n03"]._p_oid)
        finally:
            db1.close()
            db2.close()

    def test_btree_by_items_not_buckets(self):
        keys = list(range(5000))
        shuffled = list(keys)
        random.Random(1).shuffle(shuffled)

        def fill(order):
            def fill_root(root):
                tree = root["tree"] = IOBTree()
                for k in order:
                    tree[k] = "v%d" % k
                for k in order[::3]:
                    del tree[k]
                for k in order[::3]:
                    tree[k] = "v%d" % k
            return fill_root

        db1, conn1 = build(fill(keys))
        db2, conn2 = build(fill(shuffled))
        try:
            t1, t2 = conn1.root()["tree"], conn2.root()["tree"]
            assert list(t1.items()) == list(t2.items())
            assert _buckets(t1) != _buckets(t2), "same buckets: a weak test"
            assert digest.state_digest(conn1.root()) == digest.state_digest(
                conn2.root())
        finally:
            db1.close()
            db2.close()

    def test_cycles_and_sharing(self):
        def cycle(root):
            a, b = Node("a"), Node("b")
            a.other, b.other = b, a
            root["a"], root["me"] = a, root  # the root refers to itself

        def cycle_rebuilt(root):
            b, a = Node("b"), Node("a")
            b.other, a.other = a, b
            root["me"], root["a"] = root, a

        def self_loop(root):
            a, b = Node("a"), Node("b")
            a.other, b.other = b, b
            root["a"], root["me"] = a, root

        first = digest_of(cycle)
        assert first == digest_of(cycle_rebuilt)
        assert first.objects == 3
        assert digest_of(self_loop) != first

        def shared(root):
            c = Node("c")
            root["x"], root["y"] = Node("x", c=c), Node("y", c=c)

        def copied(root):
            root["x"] = Node("x", c=Node("c"))
            root["y"] = Node("y", c=Node("c"))

        assert digest_of(shared) != digest_of(copied)
        assert digest_of(shared).objects == 4
        assert digest_of(copied).objects == 5

    @pytest.mark.parametrize("a, b", [
        (1, 1.0), (1, True), (0.0, -0.0), ("1", b"1"), ([1], (1,)),
        ({1: 2}, {2: 1}), ({"a": 1}, {"a": 1, "b": None}),
        (set(), frozenset()), ({1, 2}, {1, 3}),
        (datetime.date(2020, 1, 1), datetime.date(2020, 1, 2)),
        (decimal.Decimal("1.0"), decimal.Decimal("1.00")),
    ])
    def test_values_of_different_meaning_differ(self, a, b):
        assert digest_of(lambda r: r.update(v=a)) != digest_of(
            lambda r: r.update(v=b))

    def test_classes_differ(self):
        assert digest_of(lambda r: r.update(v=OOBTree())) != digest_of(
            lambda r: r.update(v=OOTreeSet()))
        assert digest_of(lambda r: r.update(v=PersistentMapping())) != (
            digest_of(lambda r: r.update(v=Node("x"))))

    def test_marker_is_left_out(self):
        from zjournal.marker import Marker

        def with_marker(seq):
            def fill(root):
                root["data"] = Node("d")
                root[MARKER_KEY] = Marker("some-journal", seq)
            return fill

        assert digest_of(with_marker(1)) == digest_of(with_marker(99))
        assert digest_of(with_marker(1)) == digest_of(
            lambda r: r.update(data=Node("d")))

    def test_same_digest_warm_cold_and_before_commit(self):
        def fill(root):
            root["tree"] = OOBTree()
            for i in range(300):
                root["tree"]["k%03d" % i] = Node("k", n=i)

        db, tm, conn = open_db()
        fill(conn.root())
        # Unsaved objects (no oids yet), in the middle of a transaction.
        before = digest.state_digest(conn.root())
        tm.commit()
        warm = digest.state_digest(conn.root())
        other = db.open()  # a cold cache: every object a ghost
        try:
            cold = digest.state_digest(other.root())
        finally:
            other.close()
            db.close()
        assert before == warm == cold

    def test_long_walk_keeps_the_cache_small(self):
        def fill(root):
            root["tree"] = OOBTree()
            for i in range(4000):
                root["tree"]["k%05d" % i] = Node("k", n=i)

        db, conn = build(fill, cache_size=100)
        seen = []
        try:
            fresh = db.open()
            result = digest.Walker(fresh.root(),
                                   progress=lambda n, done=False:
                                   seen.append(n)).digest()
            assert result.objects == 4002
            # Without turning objects back into ghosts the walk would leave
            # all 4000 nodes in memory.
            assert fresh._cache.cache_non_ghost_count < 500
            assert seen[-1] == 4002 and len(seen) >= 4
            fresh.close()
        finally:
            db.close()

    def test_inside_a_large_tree_the_cache_is_trimmed_and_progress_shown(
            self, monkeypatch):
        """A 20,000-item BTree is one object of the walk but some thousand
        buckets: they must not all stay loaded while it is hashed, and a
        progress report must come from inside it."""
        monkeypatch.setattr(digest, "TREE_PROGRESS", 2000)

        def fill(root):
            root["tree"] = OOBTree()
            for i in range(20000):
                root["tree"]["k%05d" % i] = ("v", i)

        db, conn = build(fill, cache_size=100)
        try:
            fresh = db.open()
            calls = []

            def progress(objects, done=False, items=None):
                calls.append((objects, items,
                              fresh._cache.cache_non_ghost_count))

            walked = digest.Walker(fresh.root(), progress=progress,
                                   gc_every=500).digest()
            inside = [c for c in calls if c[1] is not None]
            assert [items for _, items, _ in inside] == list(
                range(2000, 20001, 2000))
            assert all(objects == 1 for objects, _, _ in inside)
            assert max(loaded for _, _, loaded in inside) < 150
            fresh.close()
            # Trimming changes nothing in what is hashed.
            assert walked == digest.state_digest(conn.root())
        finally:
            db.close()

    def test_walk_progress_says_it_is_inside_a_tree(self):
        import io
        out = io.StringIO()
        shown = digest.WalkProgress("check", tty=True, stream=out,
                                    interval=0)
        shown(2, items=130000)
        assert "check: 2 objects" in out.getvalue()
        assert "in a BTree: 130,000 items read" in out.getvalue()

    def test_walk_progress_rate_counts_from_the_walk_start(self):
        """check-replay makes its reporter before a replay that may take
        minutes: the walk's rate must not include them."""
        import io
        import re
        out = io.StringIO()
        shown = digest.WalkProgress("check", tty=True, stream=out,
                                    interval=0)
        shown.began -= 100.0    # made 100 s before the walk
        fresh = digest.Walker(OOBTree(), progress=shown)
        fresh.jar = None
        for _ in fresh:
            pass
        shown(1000)
        rate = float(re.findall(r"1,000 objects \((\d+)/s\)",
                                out.getvalue())[-1])
        assert rate > 100   # 10/s if counted from construction

    def test_same_digest_when_waiting_objects_are_dropped(self,
                                                          monkeypatch):
        def fill(root):
            root["tree"] = OOBTree()
            for i in range(500):
                root["tree"]["k%03d" % i] = Node("k", n=i, me=None)
            root["tree"]["k007"].me = root["tree"]["k007"]

        def walk():
            fresh = db.open()
            root = fresh.root()
            gets = []
            real = fresh.get
            fresh.get = lambda oid: gets.append(oid) or real(oid)
            try:
                return digest.state_digest(root), len(gets)
            finally:
                del fresh.get
                fresh.close()

        db, conn = build(fill)
        try:
            held, reloaded = walk()
            assert reloaded == 0
            monkeypatch.setattr(digest, "PENDING_OBJECTS", 10)
            dropped, reloaded = walk()
            assert reloaded > 400  # most nodes waited as oids only
            assert held == dropped
        finally:
            db.close()

    def test_unpicklable_value_is_a_clear_error(self):
        db, tm, conn = open_db()
        try:
            conn.root()["box"] = Node("box", thing=Unpicklable())
            with pytest.raises(DigestError) as info:
                digest.state_digest(conn.root())
            assert "/box/thing" in str(info.value)
            assert "not today" in str(info.value)
        finally:
            tm.abort()
            db.close()


def _buckets(tree):
    """The sizes of a BTree's buckets."""
    sizes = []
    bucket = tree._firstbucket
    while bucket is not None:
        sizes.append(len(bucket))
        bucket = bucket._next
    return sizes


# -- hypothesis: equal exactly when the values mean the same -----------------

leaves = (st.none() | st.booleans() | st.integers() | st.text(max_size=5)
          | st.binary(max_size=5) | st.floats(allow_nan=False))
values = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=3), inner, max_size=4)
                   | st.frozensets(st.integers(), max_size=3)),
    max_leaves=12)


def meaning(value):
    """An independent model of what the digest must tell apart."""
    t = type(value)
    if t is float:
        return ("float", value.hex())
    if t in (list, tuple):
        return (t.__name__, [meaning(v) for v in value])
    if t is dict:
        return ("dict", sorted((repr(meaning(k)), meaning(v))
                               for k, v in value.items()))
    if t is frozenset:
        return ("frozenset", sorted(repr(meaning(v)) for v in value))
    return (t.__name__, value)


def in_nodes(value, order):
    """``value`` spread over persistent objects, created in ``order``."""
    def fill(root):
        holders = [Node(str(i)) for i in range(3)]
        for i in order:
            root["h%d" % i] = holders[i]
        holders[0].value = value
        holders[1].nested = PersistentMapping(inner=value)
        holders[2].tree = OOBTree({"k": PersistentList([value])})
    return fill


@settings(max_examples=80, deadline=None)
@given(values, values, st.permutations([0, 1, 2]))
def test_equal_exactly_when_values_mean_the_same(a, b, order):
    same = meaning(a) == meaning(b)
    da = digest_of(in_nodes(a, [0, 1, 2]))
    db = digest_of(in_nodes(b, order))
    assert (da == db) == same, (a, b)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.integers(), min_size=1,
                       max_size=30), st.data())
def test_any_single_change_is_seen_and_located(table, data):
    key = data.draw(st.sampled_from(sorted(table)))
    change = data.draw(st.sampled_from(["value", "delete", "add"]))
    changed = dict(table)
    if change == "value":
        changed[key] += 1
    elif change == "delete":
        del changed[key]
    else:
        changed[key + "+"] = 0 if (key + "+") not in table else None

    def fill(content):
        def fill_root(root):
            root["tree"] = OOBTree({k: Node(k, v=v) for k, v in
                                    content.items()})
        return fill_root

    db1, conn1 = build(fill(table))
    db2, conn2 = build(fill(changed))
    try:
        result = digest.compare(conn1.root(), conn2.root())
        assert result.live != result.replayed
        diff = result.difference
        if change == "value":
            assert diff.path == "/tree" + digest._step("", key)
            assert diff.detail == "attribute 'v'"
        else:
            assert diff.path == "/tree"
            assert diff.detail.startswith("key ")
    finally:
        db1.close()
        db2.close()


class TestCompare:

    def bank(self, alice=10, extra=None):
        def fill(root):
            bank = root["bank"] = Node("bank", accounts=OOBTree())
            for name, balance in (("alice", alice), ("bob", 5)):
                bank.accounts[name] = Node(name, balance=balance)
            if extra:
                bank.accounts[extra] = Node(extra, balance=0)
        return fill

    def compare(self, live, replayed):
        db1, conn1 = build(live)
        db2, conn2 = build(replayed)
        try:
            return digest.compare(conn1.root(), conn2.root())
        finally:
            db1.close()
            db2.close()

    def test_equal(self):
        result = self.compare(self.bank(), self.bank())
        assert result.equal and result.live == result.replayed

    def test_attribute(self):
        result = self.compare(self.bank(alice=11), self.bank())
        assert not result.equal
        diff = result.difference
        assert (diff.path, diff.detail, diff.live, diff.replayed) == (
            "/bank/accounts/alice", "attribute 'balance'", "11", "10")
        assert diff.live_class.endswith("test_digest.Node")
        text = "\n".join(diff.describe())
        assert "/bank/accounts/alice" in text and "11" in text

    def test_btree_key_only_one_side_has(self):
        diff = self.compare(self.bank(extra="carol"), self.bank()).difference
        assert (diff.path, diff.detail, diff.replayed) == (
            "/bank/accounts", "key 'carol'", None)
        assert diff.live.startswith("<ref /bank/accounts/carol")

    def test_root_key_and_class(self):
        diff = self.compare(lambda r: r.update(a=1, b=Node("b")),
                            lambda r: r.update(a=1, b=PersistentMapping()),
                            ).difference
        assert diff.path == "/b"
        assert diff.live_class != diff.replayed_class
        diff = self.compare(lambda r: r.update(a=1), lambda r: r.update(a=2)
                            ).difference
        assert (diff.path, diff.detail, diff.live, diff.replayed) == (
            "/", "key 'a'", "1", "2")


# -- digests recorded by JournaledDB -----------------------------------------

def entries(jdb):
    return list(jdb.journal.entries())


def replayed_digest(journal, until):
    db = ZODB.DB(None)
    try:
        rebuild(db, journal, until_seq=until)
        conn = db.open()
        try:
            return digest.state_digest(conn.root()).hexdigest
        finally:
            conn.close()
    finally:
        db.close()


class TestRecordedDigests:

    def test_every_nth_seq_and_describing_that_state(self, site):
        jdb = site.open(digest_interval=3, journal_kw={"fsync": "never"})
        try:
            for i in range(10):
                jdb.execute(Increment("a") if i % 2 else Stamp("s%d" % i))
            found = entries(jdb)
            digests = [e for e in found if e.command_name == DIGEST_COMMAND]
            assert [e.args["after"] for e in digests] == [
                e.seq for e in found
                if e.seq % 3 == 0 and e.command_name != DIGEST_COMMAND]
            assert all(e.args["after"] == e.seq - 1 for e in digests)
            assert len(found) == 10 + len(digests) and len(digests) >= 3
            for e in digests:
                assert e.args["digest"] == replayed_digest(
                    jdb.journal, e.args["after"])
            # The last one is the state of the live database too.
            conn = jdb.open()
            try:
                live = digest.state_digest(conn.root())
            finally:
                conn.close()
            assert replayed_digest(jdb.journal, None) == live.hexdigest
        finally:
            jdb.close()

    def test_mid_transaction_digest_is_the_state_after_its_seq(self, site):
        jdb = site.open(digest_interval=2, journal_kw={"fsync": "never"})
        try:
            with jdb.transaction() as conn:
                for i in range(4):
                    execute(conn, Put("k%d" % i, i))
            found = entries(jdb)
            assert [e.command_name == DIGEST_COMMAND for e in found] == [
                False, False, True, False, True, False, True]
            first = found[2].args
            assert first["after"] == 2
            assert first["digest"] == replayed_digest(jdb.journal, 2)
            assert first["digest"] != replayed_digest(jdb.journal, 6)
        finally:
            jdb.close()

    def test_rolled_back_savepoint_drops_its_digest(self, site):
        jdb = site.open(digest_interval=2, journal_kw={"fsync": "never"})
        try:
            with jdb.transaction() as conn:
                execute(conn, Put("a", 1))
                savepoint = conn.transaction_manager.get().savepoint()
                execute(conn, Put("b", 2))  # seq 2: digest at 3
                savepoint.rollback()
                execute(conn, Put("c", 3))  # seq 2 again
            names = [e.command_name for e in entries(jdb)]
            assert names == ["tests.put", "tests.put", DIGEST_COMMAND]
        finally:
            jdb.close()

    def test_off_by_default_and_checked(self, site):
        jdb = site.open(journal_kw={"fsync": "never"})
        try:
            for i in range(5):
                jdb.execute(Increment())
            assert all(e.command_name != DIGEST_COMMAND for e in entries(jdb))
        finally:
            jdb.close()
        for bad in (0, -1, "3", 2.5, True):
            with pytest.raises(ValueError, match="digest_interval"):
                JournaledDB(ZODB.DB(None), site.journal(),
                            digest_interval=bad)


WORKER = """
import json, os, sys, time
from zjournal import JournaledDB
from zjournal.sqljournal import SQLiteJournal
from zjournal.tests.examples import Increment, Put
from zjournal.tests.stores import open_spec
spec, path, me = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
jdb = JournaledDB(open_spec(spec), SQLiteJournal(path, fsync="never"),
                  digest_interval=3)
while not os.path.exists(path + ".go"):  # start together
    time.sleep(0.01)
for i in range(15):
    jdb.execute(Increment("shared"))
    jdb.execute(Put("w%s-%d" % (me, i), i))
    time.sleep(0.01)  # let the other process in
print(jdb.retried)
jdb.close()
"""


def test_several_processes_record_the_state_of_their_seq(tmp_path, capsys):
    """Two processes share a ZEO store and an SQLite journal: each digest
    must be that of the state after exactly its seq, whoever wrote it,
    however the processes interleaved and retried."""
    import json
    import subprocess
    import sys

    from zjournal import cli
    from zjournal.sqljournal import SQLiteJournal
    from zjournal.tests.stores import StoreMaker
    from zjournal.tests.stores import ZEOServers

    servers = ZEOServers(str(tmp_path / "zeo"))
    try:
        with StoreMaker(str(tmp_path), servers) as maker:
            store = maker.make("zeo")
            path = str(tmp_path / "journal.sqlite")
            JournaledDB(store.db(), SQLiteJournal(path, fsync="never")
                        ).close()
            workers = [subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(store.spec()),
                 path, str(me)], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True) for me in (1, 2)]
            open(path + ".go", "w").close()
            for worker in workers:
                out, err = worker.communicate(timeout=120)
                assert worker.returncode == 0, err

            journal = SQLiteJournal(path, readonly=True)
            try:
                digests = [e for e in journal.entries()
                           if e.command_name == DIGEST_COMMAND]
                assert journal.last_seq == 60 + len(digests)
                assert len(digests) >= 15
                writers = [e.command.key[1] for e in journal.entries()
                           if e.command_name == "tests.put"]
                assert writers.index("2") < len(writers) - writers[
                    ::-1].index("1"), "the processes did not interleave"
                for e in digests:
                    assert e.args["digest"] == replayed_digest(
                        journal, e.args["after"]), e.seq
            finally:
                journal.close()
            # And check-replay agrees, on the live ZEO store.
            status = cli.main(["check-replay", "sqlite://" + path,
                               "--zodb", store.uri, "--import",
                               "zjournal.tests.examples", "--json"])
            report = json.loads(capsys.readouterr()[0])
            assert status == 0 and report["ok"], report
            assert report["digests"]["matched"] == len(digests)
    finally:
        servers.stop()


# -- values ZODB stores that the digest used to refuse ------------------------

def test_values_pickled_through_copyreg():
    """pickle looks in copyreg.dispatch_table before __reduce_ex__ (a
    compiled pattern pickles only that way); so does the digest."""
    import re

    def pattern(text, flags=0):
        return lambda r: r.update(box=Node("box", filter=re.compile(
            text, flags)))

    first = digest_of(pattern("spam+"))
    assert first == digest_of(pattern("spam+"))
    assert first != digest_of(pattern("spam*"))
    assert first != digest_of(pattern("spam+", re.IGNORECASE))


def dangling(root_fill):
    """A committed database where the object at root["box"].child has lost
    its record: a dangling reference, as after a bad pack or a lost
    file."""
    db, conn = build(root_fill)
    child = conn.root()["box"].child
    oid = child._p_oid
    del db.storage._data[oid]
    fresh = db.open(transaction.TransactionManager())
    return db, fresh


def test_dangling_reference_is_a_clear_error():
    from ZODB.POSException import POSKeyError
    db, conn = dangling(lambda r: r.update(box=Node("box", child=Node("c"))))
    try:
        with pytest.raises(POSKeyError):  # the damage is real
            conn.root()["box"].child._p_activate()
        with pytest.raises(DigestError, match="dangling") as info:
            digest.state_digest(conn.root())
        assert "/box/child" in str(info.value)
    finally:
        db.close()


class TestJournalEntry:
    """digest.journal_entry: what JournaledDB queues for a digest."""

    def test_flagged_as_a_query_and_describing_the_state(self):
        from zjournal import commands
        from zjournal.format import FLAG_QUERY
        db, conn = build(lambda r: r.update(a=Node("a")))
        try:
            seq, _, version, name, payload, flags, meta = (
                digest.journal_entry(conn.root(), 7))
            assert (seq, name, flags, meta) == (8, DIGEST_COMMAND,
                                                FLAG_QUERY, None)
            recorded = commands.decode(name, version, payload, seq)
            assert recorded.after == 7
            assert recorded.digest == digest.state_digest(
                conn.root()).hexdigest
        finally:
            db.close()

    def test_never_raises(self, caplog):
        db, conn = dangling(lambda r: r.update(box=Node("box",
                                                        child=Node("c"))))
        try:
            with caplog.at_level("WARNING", logger="zjournal.digest"):
                assert digest.journal_entry(conn.root(), 3) is None
            assert "no state digest after seq 3" in caplog.text
            assert "dangling" in caplog.text
        finally:
            db.close()


def test_a_failing_digest_never_fails_a_command(site, monkeypatch, caplog):
    """JournaledDB(digest_interval=N): a digest that raises is logged and
    skipped; the command, and the later ones, still commit.  (Needs
    JournaledDB._record_digest to call digest.journal_entry.)"""
    calls = []
    real = digest.state_digest

    def broken(root, *args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the walk broke")
        return real(root, *args, **kw)

    monkeypatch.setattr(digest, "state_digest", broken)
    jdb = site.open(digest_interval=2, journal_kw={"fsync": "never"})
    try:
        with caplog.at_level("WARNING", logger="zjournal.digest"):
            for i in range(4):
                assert jdb.execute(Increment("a")) == i + 1
        assert "the walk broke" in caplog.text
        found = entries(jdb)
        names = [e.command_name for e in found]
        # seq 2's digest failed: none; seq 4 -> 3 with seq 3 the command;
        # the next one (after seq 4) is recorded.
        assert names.count(DIGEST_COMMAND) == 1 and len(calls) == 2
        point = next(e for e in found if e.command_name == DIGEST_COMMAND)
        assert point.is_query
        assert point.args["digest"] == replayed_digest(jdb.journal,
                                                       point.args["after"])
    finally:
        jdb.close()


def test_digests_are_queries_to_replay_and_stats(site, monkeypatch):
    """Code that does not know zjournal.state-digest (older zjournal)
    still rebuilds, and statistics count digests as queries.  (Needs
    JournaledDB._record_digest to journal them with FLAG_QUERY.)"""
    from zjournal import commands
    from zjournal import stats
    jdb = site.open(digest_interval=3, journal_kw={"fsync": "never"})
    try:
        for i in range(9):
            jdb.execute(Increment("a"))
        journal = jdb.journal
        found = entries(jdb)
        digests = [e for e in found if e.command_name == DIGEST_COMMAND]
        assert digests and all(e.is_query for e in digests)
        summary = stats.collect(journal.entries())
        assert summary.commands_only == 9
        assert summary.queries == len(digests)
        monkeypatch.delitem(commands._registry, DIGEST_COMMAND)
        with pytest.raises(Exception):
            commands.lookup(DIGEST_COMMAND)
        conn = jdb.open()
        try:
            live = digest.state_digest(conn.root()).hexdigest
            assert conn.root()["counters"]["a"].value == 9
        finally:
            conn.close()
        assert replayed_digest(journal, None) == live
    finally:
        jdb.close()


# -- references name one object; the same state gives one digest -------------

def differ_and_located(fill_a, fill_b, path):
    """The two states digest differently and compare() says where."""
    db1, conn1 = build(fill_a)
    db2, conn2 = build(fill_b)
    try:
        assert digest.state_digest(conn1.root()) != digest.state_digest(
            conn2.root())
        result = digest.compare(conn1.root(), conn2.root())
        assert not result.equal
        assert result.difference.path == path
    finally:
        db1.close()
        db2.close()


class TestReferencesAreUnique:
    """A reference is hashed by the object's place in the walk, not by a
    path that two objects can share."""

    def test_two_persistent_keys_of_one_dict(self):
        def fill(pick):
            def fill_root(root):
                p1, p2 = Node("1"), Node("2")
                root["d"] = {p1: 0, p2: 0}
                root["z"] = PersistentMapping(ref=(p1, p2)[pick])
            return fill_root
        differ_and_located(fill(0), fill(1), "/z")

    def test_string_key_that_looks_like_an_index(self):
        def fill(pick):
            def fill_root(root):
                p1, p2 = Node("1"), Node("2")
                root["x"] = PersistentMapping({"a[1]": p1, "a": [None, p2]})
                root["y"] = PersistentMapping(ref=(p1, p2)[pick])
            return fill_root
        differ_and_located(fill(0), fill(1), "/y")

    def test_key_at_and_a_mapping_attribute(self):
        def fill(pick):
            def fill_root(root):
                p1, p2 = Node("1"), Node("2")
                m = root["m"] = PersistentMapping({"@": {"x": p1}})
                m.x = p2
                root["y"] = PersistentMapping(ref=(p1, p2)[pick])
            return fill_root
        differ_and_located(fill(0), fill(1), "/y")

    def test_paths_name_one_place_and_show_no_address(self):
        def fill(root):
            m = root["x"] = PersistentMapping({
                "a[1]": Node("k"), "a": [None, Node("i")], "@": Node("at"),
                "a{0}": Node("b"), 1: Node("one")})
            m.attr = Node("attr")
            m["tags"] = {Node("t1"), Node("t2")}
            m["keyed"] = {Key(1): Node("v1"), Key(2): Node("v2")}

        db, conn = build(fill)
        try:
            paths = [v.path for v in digest.Walker(conn.root())]
        finally:
            db.close()
        assert len(paths) == len(set(paths)) == 12, paths
        assert not any("0x" in p for p in paths), paths
        assert "/x/a%5B1]" in paths and "/x/a[1]" in paths
        assert "/x/%40" in paths and "/x/@/attr" in paths


def tag_site(order, junk=0, pick=0, contents=("a", "b", "c", "d")):
    """A set of persistent tags created in ``order``, with ``junk``
    objects allocated in between (moving id()s), and a reference to tag
    ``pick`` that the walk meets after the set."""
    def fill(root):
        keep = []
        tags = [None] * len(contents)
        for i in order:
            keep.append([object() for _ in range(junk)])
            tags[i] = Node(contents[i])
        holder = root["tags"] = PersistentMapping(members=set(tags))
        for tag in tags:
            tag.owner = holder
        root["later"] = Node("later", inner=Node("inner", ref=tags[pick]))
    return fill


class TestSameStateSameDigest:

    def test_set_of_persistent_objects(self):
        found = {digest_of(tag_site(order, junk)).hexdigest
                 for order, junk in [((0, 1, 2, 3), 0), ((3, 2, 1, 0), 5),
                                     ((2, 0, 3, 1), 13), ((1, 3, 0, 2), 40),
                                     ((0, 2, 1, 3), 7), ((3, 1, 2, 0), 2)]}
        assert len(found) == 1
        assert found != {digest_of(tag_site((0, 1, 2, 3), contents=(
            "a", "b", "c", "e"))).hexdigest}
        # which tag the deeper reference names is part of the state
        assert found != {digest_of(tag_site((0, 1, 2, 3), pick=1))
                         .hexdigest}

    def test_which_identical_member_one_reference_names(self):
        same = ("a", "a", "b")
        assert digest_of(tag_site((0, 1, 2), pick=0, contents=same)) == (
            digest_of(tag_site((2, 1, 0), pick=1, contents=same)))
        assert digest_of(tag_site((0, 1, 2), pick=0, contents=same)) != (
            digest_of(tag_site((0, 1, 2), pick=2, contents=same)))

    def test_members_in_cycles_of_objects_not_walked_yet(self):
        def groups(order, rename=None):
            def fill(root):
                made = {}
                for g in order:
                    group = Node("g%d" % g)
                    people = [Node("p%d%d" % (g, i)) for i in range(3)]
                    for i, person in enumerate(people):
                        person.group = group
                        person.next = people[(i + 1) % 3]  # a ring
                    if rename == g:
                        people[1].name = "renamed"
                    group.people = set(people)
                    made[g] = group
                root["groups"] = {made[g] for g in sorted(made)}
            return fill

        first = digest_of(groups([0, 1, 2]))
        assert first == digest_of(groups([2, 0, 1]))
        assert first == digest_of(groups([1, 2, 0]))
        assert first != digest_of(groups([0, 1, 2], rename=1))

    def test_persistent_keys_with_their_values(self):
        def fill(order, values):
            def fill_root(root):
                keys = [None, None]
                for i in order:
                    keys[i] = Node("same")
                root["d"] = {keys[0]: values[0], keys[1]: values[1]}
                root["later"] = Node("l", inner=Node("i", ref=keys[0]))
            return fill_root

        first = digest_of(fill((0, 1), ("x", "y")))
        assert first == digest_of(fill((1, 0), ("x", "y")))
        # the key the later reference names holds "x", not "y"
        assert first != digest_of(fill((0, 1), ("y", "x")))
        assert first != digest_of(fill((0, 1), ("x", "x")))

    def test_keys_with_the_default_repr(self):
        db, conn = build(lambda r: r.update(
            d=PersistentMapping({Key(1): Node("x"), Key(2): Node("y")})))
        other = db.open(transaction.TransactionManager())
        try:
            assert digest.state_digest(conn.root()) == (
                digest.state_digest(other.root()))
        finally:
            other.close()
            db.close()

    def test_ordered_dict_keeps_its_order(self):
        import collections
        ab = [("a", 1), ("b", 2)]
        assert digest_of(lambda r: r.update(
            o=collections.OrderedDict(ab))) != digest_of(lambda r: r.update(
                o=collections.OrderedDict(ab[::-1])))
        assert digest_of(lambda r: r.update(
            o=collections.OrderedDict(ab))) == digest_of(lambda r: r.update(
                o=collections.OrderedDict(ab)))
        # where order is not part of the value, it is not hashed
        assert digest_of(lambda r: r.update(
            c=collections.Counter(dict(ab)))) == digest_of(
                lambda r: r.update(c=collections.Counter(dict(ab[::-1]))))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=6), st.data())
def test_tags_equal_exactly_when_the_state_is_the_same(contents, data):
    """Tags in a set, created in two orders, with a later reference to
    one tag on each side: the digests agree exactly when the referenced
    tags hold the same content (then the states are the same up to
    which object is which)."""
    n = len(contents)
    order_a = data.draw(st.permutations(range(n)))
    order_b = data.draw(st.permutations(range(n)))
    pick_a = data.draw(st.integers(0, n - 1))
    pick_b = data.draw(st.integers(0, n - 1))
    da = digest_of(tag_site(order_a, 3, pick_a, contents))
    db = digest_of(tag_site(order_b, 0, pick_b, contents))
    assert (da == db) == (contents[pick_a] == contents[pick_b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 5)),
                min_size=1, max_size=6), st.data())
def test_linked_set_members_in_any_creation_order(nodes, data):
    """Set members that refer to each other (cycles included) the walk has
    not reached yet: the same graph, its objects created in another
    order, digests the same."""
    n = len(nodes)

    def fill(order, junk):
        def fill_root(root):
            made = [None] * n
            keep = []
            for i in order:
                keep.append([object() for _ in range(junk)])
                made[i] = Node(nodes[i][0])
            for i, (_, target) in enumerate(nodes):
                made[i].next = made[target % n]
            root["s"] = PersistentMapping(members=set(made))
        return fill_root

    order = data.draw(st.permutations(range(n)))
    assert digest_of(fill(range(n), 0)) == digest_of(fill(order, 3))


# -- tied set members: the same object twice is not two objects --------------

class Item(persistent.Persistent):

    def __init__(self, v):
        self.v = v


def tied_members(picks, order=(0, 1), junk=0):
    """Two Items of equal content in a set; ``root["r"]`` lists the
    members ``picks`` names (created in ``order``, with ``junk`` objects
    allocated in between to move their id()s)."""
    def fill(root):
        made, keep = [None, None], []
        for i in order:
            keep.append([object() for _ in range(junk)])
            made[i] = Item(1)
        root["a"] = set(made)
        root["r"] = PersistentList([made[i] for i in picks])
    return fill


class TestTiedMembers:

    def test_same_member_twice_is_not_two_members(self):
        differ_and_located(tied_members([0, 0]), tied_members([0, 1]), "/r")

    def test_references_from_the_root_itself(self):
        def fill(pick):
            def fill_root(root):
                a, b = Item(1), Item(1)
                root["a"] = {a, b}
                root["x"], root["y"] = a, (a, b)[pick]
            return fill_root
        a1, a2 = digest_of(fill(0)), digest_of(fill(1))
        assert a1 != a2

    def test_which_one_is_still_no_difference(self):
        found = {digest_of(tied_members(picks, order, junk)).hexdigest
                 for picks, order, junk in [
                     ([0, 1], (0, 1), 0), ([1, 0], (0, 1), 3),
                     ([0, 1], (1, 0), 7), ([1, 0], (1, 0), 1)]}
        assert len(found) == 1
        found = {digest_of(tied_members(picks, order, junk)).hexdigest
                 for picks, order, junk in [
                     ([0, 0], (0, 1), 0), ([1, 1], (0, 1), 3),
                     ([0, 0], (1, 0), 7), ([1, 1], (1, 0), 1)]}
        assert len(found) == 1

    def test_a_member_named_only_by_another_member(self):
        """Two members that refer to themselves tie; a third refers to one
        of them: whichever, the same state."""
        def fill(order, junk):
            def fill_root(root):
                made, keep = [None] * 3, []
                for i in order:
                    keep.append([object() for _ in range(junk)])
                    made[i] = Item(1)
                made[0].next, made[1].next = made[0], made[1]
                made[2].next = made[0]
                root["s"] = set(made)
            return fill_root
        found = {digest_of(fill(order, junk)).hexdigest
                 for order, junk in [((0, 1, 2), 0), ((1, 0, 2), 3),
                                     ((2, 1, 0), 5), ((1, 2, 0), 1)]}
        assert len(found) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("ab"), min_size=1, max_size=5), st.data())
def test_pairs_of_references_into_a_set(contents, data):
    """A set of tags (equal contents likely) and a list naming two of
    them: the digests agree exactly when the lists name tags of the same
    contents, and the same tag twice on both sides or on neither."""
    n = len(contents)

    def fill(order, junk, picks):
        def fill_root(root):
            tags, keep = [None] * n, []
            for i in order:
                keep.append([object() for _ in range(junk)])
                tags[i] = Item(contents[i])
            root["tags"] = set(tags)
            root["r"] = PersistentList([tags[i] for i in picks])
        return fill_root

    def pick():
        return [data.draw(st.integers(0, n - 1)) for _ in range(2)]

    pa, pb = pick(), pick()
    da = digest_of(fill(data.draw(st.permutations(range(n))), 3, pa))
    db = digest_of(fill(data.draw(st.permutations(range(n))), 0, pb))

    def meaning(p):
        return [contents[i] for i in p], p[0] == p[1]
    assert (da == db) == (meaning(pa) == meaning(pb))


def test_shared_object_inside_tied_members():
    """(A, A2) and (B, B) read as trees used to tie, and the order Python
    iterated them in decided the digest."""
    def fill(order, junk):
        def fill_root(root):
            made, keep = {}, []
            for name in order:
                keep.append([object() for _ in range(junk)])
                made[name] = Item(1)
            root["edges"] = {(made["a"], made["a2"]), (made["b"], made["b"])}
        return fill_root
    found = {digest_of(fill(order, junk)).hexdigest
             for order in [("a", "a2", "b"), ("b", "a", "a2"),
                           ("a2", "b", "a"), ("b", "a2", "a")]
             for junk in (0, 5)}
    assert len(found) == 1

    def pairs(root):
        a, a2, b, b2 = Item(1), Item(1), Item(1), Item(1)
        root["edges"] = {(a, a2), (b, b2)}
    assert found != {digest_of(pairs).hexdigest}


# -- plain values: cycles, depth, sharing within a record ---------------------

class Plain:
    """Not persistent: pickled within the record of its holder."""

    def __init__(self, parent=None):
        self.parent = parent
        self.kids = []


def plain_tree(share_parent=True):
    top = Plain()
    for _ in range(3):
        top.kids.append(Plain(top if share_parent else Plain()))
    return top


def chain(length, last="end"):
    head = Plain(last)
    for _ in range(length - 1):
        head = Plain(head)
    return head


class TestPlainValues:

    def test_plain_tree_with_parent_pointers(self):
        first = digest_of(lambda r: r.update(p=Item(plain_tree())))
        assert first == digest_of(lambda r: r.update(p=Item(plain_tree())))
        assert first != digest_of(lambda r: r.update(
            p=Item(plain_tree(share_parent=False))))

    def test_deep_chain_like_pickle(self):
        import pickle
        pickle.dumps(chain(300), 3)  # pickle takes it
        first = digest_of(lambda r: r.update(p=Item(chain(300))))
        assert first == digest_of(lambda r: r.update(p=Item(chain(300))))
        assert first != digest_of(lambda r: r.update(
            p=Item(chain(300, last="other"))))

    def test_too_deep_says_so(self):
        db, tm, conn = open_db()
        try:
            conn.root()["p"] = Item(chain(20000))
            with pytest.raises(DigestError, match="nested too deeply") as e:
                digest.state_digest(conn.root())
            assert "/p" in str(e.value) and "not persistent" in str(e.value)
            tm.abort()
        finally:
            db.close()

    def test_sharing_within_a_record_counts(self):
        def shared(root):
            item = root["o"] = Item(None)
            inner = [1]
            item.v = (inner, inner)

        def copies(root):
            root["o"] = Item(([1], [1]))
        differ_and_located(shared, copies, "/o")

    def test_sharing_across_records_does_not(self):
        def shared(root):
            inner = [1]
            root["x"], root["y"] = Item(inner), Item(inner)

        def copies(root):
            root["x"], root["y"] = Item([1]), Item([1])
        assert digest_of(shared) == digest_of(copies)

    def test_the_same_in_memory_and_from_storage(self):
        """What the digest hashes survives pickling: a state digested
        before its commit digests the same once loaded again."""
        db, tm, conn = open_db()
        try:
            root = conn.root()
            inner = {"k": [1]}
            root["o"] = Item((inner, inner, plain_tree(), chain(300)))
            root["p"] = Item(inner)  # another record: a copy once stored
            before = digest.state_digest(root)
            tm.commit()
            conn.cacheMinimize()
            other = db.open(transaction.TransactionManager())
            try:
                assert digest.state_digest(other.root()) == before
            finally:
                other.close()
        finally:
            db.close()


def test_tied_members_paired_with_other_tied_members():
    """{(a, c1), (b, c2)}, a and b tied, c1 and c2 tied: a reference to a
    then c1 (a pair) is not one to a then c2."""
    def fill(pick, order, junk, first_a=True):
        def fill_root(root):
            made, keep = {}, []
            for name in order:
                keep.append([object() for _ in range(junk)])
                made[name] = Item(name[0])
            root["c"] = {made["c1"], made["c2"]}
            root["m"] = PersistentList([{(made["a"], made["c1"]),
                                         (made["b"], made["c2"])}])
            refs = [made["a"], made[pick]]
            root["z"] = PersistentList(refs if first_a else refs[::-1])
        return fill_root

    orders = [("a", "b", "c1", "c2"), ("c2", "b", "a", "c1"),
              ("b", "c1", "c2", "a")]
    for first_a in (True, False):
        paired = {digest_of(fill("c1", o, j, first_a)).hexdigest
                  for o in orders for j in (0, 4)}
        apart = {digest_of(fill("c2", o, j, first_a)).hexdigest
                 for o in orders for j in (0, 4)}
        assert len(paired) == len(apart) == 1
        assert paired != apart
