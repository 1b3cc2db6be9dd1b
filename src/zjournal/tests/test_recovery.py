import os
import shutil

import pytest
import transaction
import ZODB

import zjournal
from zjournal import commands
from zjournal import recovery
from zjournal.tests import examples
from zjournal.tests.examples import FailOnReplay
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp
from zjournal.tests.helpers import digest
from zjournal.tests.helpers import marker_state


def append(journal, *cmds):
    """Journal commands behind the ZODB's back."""
    items = []
    for cmd in cmds:
        name, version, payload = commands.encode(cmd)
        items.append((journal.last_seq + 1 + len(items), 1000.0 + len(items),
                      version, name, payload))
    journal.append(items)


def workload(jdb, n=30):
    for i in range(n):
        jdb.execute(Increment("n"))
        jdb.execute(Stamp("s%d" % (i % 5)))
    with jdb.transaction() as conn:
        zjournal.execute(conn, Put("multi", 1))
        zjournal.execute(conn, Increment("n", 10))


class TestRecover:

    def test_initialize(self, site):
        jdb = site.open()
        assert jdb.recovery.action == "initialized"
        assert marker_state(jdb) == (({}, {}), 0)
        conn = jdb.open()
        assert conn.root()[zjournal.MARKER_KEY].journal_id == \
            jdb.journal.identity
        conn.close()
        jdb.close()

    def test_rebuild_reproduces_non_idempotent_state(self, site):
        jdb = site.open(batch_size=7)
        workload(jdb)
        before = marker_state(jdb)
        jdb.close()
        site.remove_zodb()
        progress = []
        jdb = site.open(batch_size=7,
                        progress=lambda done, total: progress.append(
                            (done, total)))
        assert jdb.recovery.action == "rebuilt"
        assert jdb.recovery.replayed == 62
        assert marker_state(jdb) == before
        assert before[0][1] == {"n": 40}
        assert progress[-1] == (62, 62)
        assert [d for d, _ in progress[:3]] == [7, 14, 21]
        jdb.close()

    def test_catch_up(self, site):
        jdb = site.open()
        jdb.execute(Increment("n"))
        jdb.close()
        journal = site.journal()
        append(journal, Increment("n"), Put("late", 1))
        journal.close()
        jdb = site.open()
        assert jdb.recovery.action == "caught up"
        assert (jdb.recovery.marker_seq, jdb.recovery.replayed) == (1, 2)
        assert marker_state(jdb) == (({"late": 1}, {"n": 2}), 3)
        jdb.close()

    def test_current_does_not_read_the_journal(self, site, monkeypatch):
        jdb = site.open()
        workload(jdb, 3)
        jdb.close()

        def refuse(*args, **kw):
            raise AssertionError("the journal was read")

        monkeypatch.setattr(zjournal.FileJournal, "entries", refuse)
        jdb = site.open()
        assert jdb.recovery.action == "current"
        jdb.close()

    def test_zodb_ahead_is_refused_and_nothing_changes(self, site, tmp_path):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        old_journal = str(tmp_path / "old-journal")
        shutil.copytree(site.journal_dir, old_journal)
        os.remove(os.path.join(old_journal, "journal.lock"))
        jdb = site.open()
        jdb.execute(Put("b", 2))
        jdb.execute(Put("c", 3))
        jdb.close()
        before = digest(site.data_fs)
        with pytest.raises(zjournal.ZODBAheadError) as e:
            zjournal.JournaledDB(site.db(), zjournal.FileJournal(old_journal))
        message = str(e.value)
        assert "up to seq 3" in message and "ends at seq 1" in message
        assert digest(site.data_fs) == before

    def test_another_journal_is_refused(self, site, tmp_path):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        before = digest(site.data_fs)
        other = zjournal.FileJournal(str(tmp_path / "other"))
        with pytest.raises(zjournal.WrongJournalError) as e:
            zjournal.JournaledDB(site.db(), other)
        assert other.identity in str(e.value)
        assert digest(site.data_fs) == before

    def test_data_without_marker_is_refused(self, site):
        db = site.db()
        conn = db.open()
        conn.root()["legacy"] = 1
        transaction.commit()
        conn.close()
        db.close()
        before = digest(site.data_fs)
        with pytest.raises(zjournal.NotJournaledError) as e:
            site.open()
        assert "legacy" in str(e.value)
        assert digest(site.data_fs) == before

    def test_divergence_names_the_entry_and_keeps_progress(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.execute(FailOnReplay())
        jdb.execute(Put("b", 2))
        jdb.close()
        site.remove_zodb()
        for _ in range(2):  # rerunning fails the same way, from the same place
            with pytest.raises(zjournal.ReplayError) as e:
                site.open(batch_size=1)
            assert e.value.seq == 2
            assert e.value.command_name == "tests.fail-on-replay"
            assert isinstance(e.value.__cause__, RuntimeError)
            db = site.db()
            conn = db.open()
            assert conn.root()[zjournal.MARKER_KEY].last_seq == 1
            assert examples.state(conn.root())[0] == {"a": 1}
            conn.close()
            db.close()

    def test_unknown_command_is_a_gap_in_the_code(self, site):
        jdb = site.open()
        journal = jdb.journal
        journal.append([(1, 0.0, 1, "tests.vanished", b"\x80\x04}\x94.")])
        jdb.close()
        site.remove_zodb()
        with pytest.raises(zjournal.ReplayError) as e:
            site.open()
        assert e.value.seq == 1 and e.value.command_name == "tests.vanished"
        assert isinstance(e.value.__cause__, zjournal.UnknownCommandError)
        db = site.db()
        conn = db.open()
        assert len(conn.root()) == 0  # the failed rebuild left nothing
        conn.close()
        db.close()


class TestRebuild:

    def _journal(self, site):
        jdb = site.open()
        workload(jdb, 10)
        state = marker_state(jdb)
        jdb.close()
        return state

    def test_into_an_empty_db_then_open_is_current(self, site):
        before = self._journal(site)
        site.remove_zodb()
        db = site.db()
        journal = site.journal(readonly=True)
        result = recovery.rebuild(db, journal, batch_size=4)
        assert result.replayed == 22
        db.close()
        journal.close()
        jdb = site.open()
        assert jdb.recovery.action == "current"
        assert marker_state(jdb) == before
        jdb.close()

    def test_until_seq_then_open_catches_up(self, site):
        before = self._journal(site)
        site.remove_zodb()
        db = site.db()
        journal = site.journal(readonly=True)
        recovery.rebuild(db, journal, until_seq=5)
        conn = db.open()
        assert conn.root()[zjournal.MARKER_KEY].last_seq == 5
        assert examples.state(conn.root())[1] == {"n": 3}
        conn.close()
        db.close()
        journal.close()
        jdb = site.open()
        assert jdb.recovery.action == "caught up"
        assert marker_state(jdb) == before
        jdb.close()

    def test_until_time(self, site):
        self._journal(site)
        journal = site.journal(readonly=True)
        cut = list(journal.entries(4, 5))[0].time
        db = ZODB.DB(None)
        recovery.rebuild(db, journal, until_time=cut)
        conn = db.open()
        assert conn.root()[zjournal.MARKER_KEY].last_seq == 4
        conn.close()
        db.close()
        journal.close()

    def test_refuses_a_non_empty_target(self, site):
        self._journal(site)
        journal = site.journal(readonly=True)
        db = site.db()
        with pytest.raises(zjournal.NotJournaledError):
            recovery.rebuild(db, journal)
        db.close()
        journal.close()


class TestRefusalsBeforeReplay:

    def test_an_unknown_command_in_a_catch_up_changes_nothing(self, site):
        jdb = site.open(batch_size=2)
        for i in range(3):
            jdb.execute(Put("k%d" % i, i))
        jdb.close()
        journal = site.journal()
        append(journal, Put("a", 1), Put("b", 2))
        journal.append([(6, 0.0, 1, "tests.vanished", b"\x80\x04}\x94.")])
        journal.close()
        before = digest(site.data_fs)
        with pytest.raises(zjournal.ReplayError) as e:
            site.open(batch_size=2)
        assert (e.value.seq, e.value.command_name) == (6, "tests.vanished")
        assert digest(site.data_fs) == before

    def test_a_version_without_upcaster_is_refused_first(self, site):
        jdb = site.open()
        jdb.execute(Put("a", 1))
        jdb.close()
        journal = site.journal()
        name, version, payload = commands.encode(Put("b", 2))
        journal.append([(2, 0.0, version + 5, name, payload)])
        journal.close()
        before = digest(site.data_fs)
        with pytest.raises(zjournal.ReplayError) as e:
            site.open()
        assert e.value.seq == 2
        assert isinstance(e.value.__cause__, zjournal.DecodeError)
        assert digest(site.data_fs) == before


def transactions(site):
    """seq 1: one command; seq 2..4: one transaction whose commands ran
    at distinct times; seq 5: one command.  Returns the entries' times."""
    import time
    jdb = site.open()
    jdb.execute(Put("a", 0))
    with jdb.transaction() as conn:
        for key in "abc":
            time.sleep(0.01)
            zjournal.execute(conn, Put(key, 1))
    time.sleep(0.01)
    jdb.execute(Put("d", 1))
    jdb.close()
    with site.journal(readonly=True) as journal:
        return {e.seq: e.time for e in journal.entries()}


def rebuilt(journal, **until):
    """(table, marker seq, Recovery) of a rebuild into a MappingStorage."""
    db = ZODB.DB(None)
    try:
        result = recovery.rebuild(db, journal, **until)
        conn = db.open()
        root = conn.root()
        found = (examples.state(root)[0],
                 root[zjournal.MARKER_KEY].last_seq, result)
        conn.close()
        return found
    finally:
        db.close()


class TestUntilAndTransactions:

    def test_a_seq_inside_a_transaction_is_exact_and_warned_about(
            self, site, caplog):
        transactions(site)
        with site.journal(readonly=True) as journal:
            with caplog.at_level("WARNING", logger="zjournal.recovery"):
                table, seq, result = rebuilt(journal, until_seq=3)
        assert (table, seq) == ({"a": 1, "b": 1}, 3)
        assert result.partial_transaction == (2, 4)
        message = ("seq 3 is inside transaction 2..4: the result holds part"
                   " of it, a state the live system never committed;"
                   " --until 1 or --until 4 give committed states")
        assert result.warnings == [message]
        assert [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING"] == [message]

    @pytest.mark.parametrize("until", [1, 4, 5])
    def test_a_seq_ending_a_transaction_is_not_warned_about(
            self, site, until, caplog):
        transactions(site)
        with site.journal(readonly=True) as journal:
            with caplog.at_level("WARNING", logger="zjournal.recovery"):
                table, seq, result = rebuilt(journal, until_seq=until)
        assert seq == until
        assert (result.partial_transaction, result.warnings) == (None, [])
        assert not [r for r in caplog.records if r.levelname == "WARNING"]

    def test_the_first_transaction_cut(self, site):
        jdb = site.open()
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("a", 1))
            zjournal.execute(conn, Put("b", 1))
        jdb.close()
        with site.journal(readonly=True) as journal:
            result = rebuilt(journal, until_seq=1)[2]
        assert result.partial_transaction == (1, 2)
        assert result.warnings[0].endswith("--until 2 gives a committed"
                                           " state")

    def test_only_queries_after_the_seq_are_no_cut(self, site):
        from zjournal.tests.test_query import Lookup
        jdb = site.open(journal_queries=True)
        with jdb.transaction() as conn:
            zjournal.execute(conn, Put("a", 1))
            zjournal.query(conn, Lookup("a"))
        jdb.close()
        with site.journal(readonly=True) as journal:
            assert journal.last_seq == 2
            table, seq, result = rebuilt(journal, until_seq=1)
        assert (table, seq) == ({"a": 1}, 1)
        assert (result.partial_transaction, result.warnings) == (None, [])

    def test_a_seq_beyond_the_end_is_warned_about(self, site, caplog):
        transactions(site)
        with site.journal(readonly=True) as journal:
            with caplog.at_level("WARNING", logger="zjournal.recovery"):
                table, seq, result = rebuilt(journal, until_seq=40)
        assert seq == 5
        assert result.warnings == [
            "the journal ends at seq 5, before the requested seq 40: the"
            " result is the state at seq 5. Is this a stale copy of the"
            " journal?"]
        assert result.partial_transaction is None
        assert "ends at seq 5" in caplog.text

    def test_a_time_inside_a_transaction_stops_before_it(self, site):
        times = transactions(site)
        with site.journal(readonly=True) as journal:
            for between in ((2, 3), (3, 4)):
                when = (times[between[0]] + times[between[1]]) / 2
                table, seq, result = rebuilt(journal, until_time=when)
                assert (table, seq) == ({"a": 0}, 1), between
                assert result.warnings == []
            # The transaction's last command: all of it.
            table, seq, _ = rebuilt(journal, until_time=times[4])
            assert (table, seq) == ({"a": 1, "b": 1, "c": 1}, 4)
            import datetime
            aware = datetime.datetime.fromtimestamp(
                (times[3] + times[4]) / 2, datetime.timezone.utc)
            assert rebuilt(journal, until_time=aware)[1] == 1
