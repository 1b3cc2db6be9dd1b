"""Commands that outlive their code: versions, upcasters, aliases.

The central tests replay a journal written by the old commands
(``evolution_old``, run in a subprocess of its own) with today's commands
(``evolution_new``) and compare the result with the state the old code
reached.  The others pin down each rule on its own.
"""
import decimal
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import Command
from zjournal import FileJournal
from zjournal import JournaledDB
from zjournal import MARKER_KEY
from zjournal import commands
from zjournal import execute
from zjournal import recovery
from zjournal.codec import dumps
from zjournal.commands import upcaster
from zjournal.errors import CommandError
from zjournal.errors import CommandNameConflictError
from zjournal.errors import DecodeError
from zjournal.errors import EncodeError
from zjournal.errors import ReplayError
from zjournal.errors import UnknownCommandError
from zjournal.format import LOCK_NAME
from zjournal.tests import evolution_new as new
from zjournal.tests.helpers import snapshot as file_digests

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "evolution"


def write_old_journal(directory):
    """Run the old code in its own process; return (journal, snapshot)."""
    directory = pathlib.Path(directory)
    journal = directory / "journal"
    snapshot = directory / "snapshot.json"
    subprocess.run(
        [sys.executable, "-m", "zjournal.tests.evolution_old", str(journal),
         str(directory / "Data.fs"), str(snapshot)],
        check=True, timeout=120)
    return journal, json.loads(snapshot.read_text())


def bank_of(db):
    """(accounts as plain data, marker seq) of a ZODB the new code built."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        root = conn.root()
        return new.snapshot(root), root[MARKER_KEY].last_seq
    finally:
        tm.abort()
        conn.close()


def rebuilt(journal):
    """Replay ``journal`` with today's commands into a fresh ZODB."""
    db = ZODB.DB(None)
    try:
        recovery.rebuild(db, journal)
        return bank_of(db)
    finally:
        db.close()


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The journal and final state of one session of the old code."""
    return write_old_journal(tmp_path_factory.mktemp("old-code"))


@pytest.fixture
def old_journal(old_code, tmp_path):
    """A private copy of the old journal, which a test may append to."""
    journal, expected = old_code
    copy = tmp_path / "journal"
    shutil.copytree(str(journal), str(copy),
                    ignore=shutil.ignore_patterns(LOCK_NAME))
    return copy, expected


def open_bank(tmp_path, journal_dir):
    storage = ZODB.FileStorage.FileStorage(str(tmp_path / "new-Data.fs"))
    return JournaledDB(ZODB.DB(storage), FileJournal(str(journal_dir)))


class TestOldJournal:

    def test_it_holds_the_old_names_and_versions(self, old_journal):
        journal = FileJournal(str(old_journal[0]), readonly=True)
        try:
            found = {(e.command_name, e.version) for e in journal.entries()}
        finally:
            journal.close()
        assert found == {("evolution.bank.open", 1),
                         ("evolution.bank.deposit", 1),
                         ("evolution.bank.transfer", 1)}

    def test_new_code_rebuilds_the_state_the_old_code_reached(
            self, old_journal):
        journal_dir, expected = old_journal
        journal = FileJournal(str(journal_dir), readonly=True)
        try:
            accounts, last_seq = rebuilt(journal)
        finally:
            journal.close()
        assert accounts == expected["accounts"]
        assert last_seq == expected["last_seq"]

    def test_opening_an_empty_zodb_rebuilds_it_from_the_old_journal(
            self, old_journal, tmp_path):
        journal_dir, expected = old_journal
        jdb = open_bank(tmp_path, journal_dir)
        try:
            assert bank_of(jdb.db) == (expected["accounts"],
                                       expected["last_seq"])
        finally:
            jdb.close()

    def test_old_entries_read_as_todays_commands(self, old_journal):
        journal = FileJournal(str(old_journal[0]), readonly=True)
        try:
            by_name = {}
            for entry in journal.entries():
                by_name.setdefault(entry.command_name, entry.command)
        finally:
            journal.close()
        assert type(by_name["evolution.bank.open"]) is new.OpenAccount
        assert type(by_name["evolution.bank.transfer"]) is new.LegacyTransfer
        deposit = by_name["evolution.bank.deposit"]
        assert type(deposit) is new.Deposit
        assert vars(deposit) == {"account": "a-1",
                                 "amount": decimal.Decimal(100)}
        assert type(deposit.amount) is decimal.Decimal

    def test_new_code_appends_current_versions_and_keeps_old_entries(
            self, old_journal, tmp_path):
        journal_dir, expected = old_journal
        old_entries = expected["last_seq"]
        jdb = open_bank(tmp_path, journal_dir)
        try:
            jdb.execute(new.Deposit("a-1", decimal.Decimal("0.25")))
            with jdb.transaction() as conn:
                # What a transfer is now: two commands, one transaction.
                execute(conn, new.Withdraw("b-1", decimal.Decimal(3)))
                execute(conn, new.Deposit("c-1", decimal.Decimal(3)))
            jdb.execute(new.OpenAccount("d-1", "Dan"))
            live = bank_of(jdb.db)
            written = [(e.command_name, e.version)
                       for e in jdb.journal.entries()]
        finally:
            jdb.close()
        assert written[old_entries:] == [
            ("evolution.bank.deposit", 3), ("evolution.bank.withdraw", 1),
            ("evolution.bank.deposit", 3), ("evolution.accounts.open", 1)]
        assert set(written[:old_entries]) == {
            ("evolution.bank.open", 1), ("evolution.bank.deposit", 1),
            ("evolution.bank.transfer", 1)}
        assert live[0]["a-1"]["balance"] == "70.25"
        assert live[0]["b-1"]["balance"] == "20"
        journal = FileJournal(str(journal_dir), readonly=True)
        try:
            assert rebuilt(journal) == live
        finally:
            journal.close()


class TestCheckedInFixture:
    """The journal an older release wrote, as it was checked in."""

    def test_replays_to_the_recorded_state(self):
        if not (FIXTURE / "journal").is_dir():
            pytest.skip("fixture not generated")
        expected = json.loads((FIXTURE / "snapshot.json").read_text())
        before = file_digests(FIXTURE / "journal")
        journal = FileJournal(str(FIXTURE / "journal"), readonly=True)
        try:
            assert rebuilt(journal) == (expected["accounts"],
                                        expected["last_seq"])
        finally:
            journal.close()
        assert file_digests(FIXTURE / "journal") == before

    def test_make_fixture_writes_a_replayable_fixture_once(self, tmp_path):
        script = [sys.executable, str(FIXTURE / "make_fixture.py"),
                  str(tmp_path)]
        subprocess.run(script, check=True, timeout=120,
                       stdout=subprocess.DEVNULL)
        assert LOCK_NAME not in os.listdir(str(tmp_path / "journal"))
        expected = json.loads((tmp_path / "snapshot.json").read_text())
        journal = FileJournal(str(tmp_path / "journal"), readonly=True)
        try:
            assert rebuilt(journal) == (expected["accounts"],
                                        expected["last_seq"])
        finally:
            journal.close()
        again = subprocess.run(script, timeout=120, stderr=subprocess.PIPE,
                               universal_newlines=True)
        assert again.returncode != 0 and "never regenerated" in again.stderr


def tally_class(version):
    """The same command, as successive releases define it.

    Each call replaces the registered class, as a new release would.
    """
    class Tally(Command):
        command_name = "tests.evolution.tally"
        command_version = version

        def __init__(self, n):
            self.n = n

        def execute(self, root, context):
            root["tally"] = root.get("tally", 0) + self.n

    return Tally


class TestRefusedOnReplay:

    def test_a_missing_step_is_refused_before_the_zodb_changes(self, site):
        jdb = site.open()
        jdb.execute(tally_class(1)(5))
        jdb.close()
        site.remove_zodb()
        tally_class(3)
        calls = []

        @upcaster("tests.evolution.tally", 1)
        def tally_v1(state):
            calls.append(state)
            return state

        with pytest.raises(ReplayError) as e:
            site.open()
        assert (e.value.seq, e.value.command_name) == (
            1, "tests.evolution.tally")
        assert "from version 2 to 3" in str(e.value)
        assert calls == []
        db = site.db()
        try:
            conn = db.open()
            assert "tally" not in conn.root()
            conn.close()
        finally:
            db.close()

    def test_a_newer_version_is_refused(self, site):
        jdb = site.open()
        jdb.execute(tally_class(4)(5))
        jdb.close()
        site.remove_zodb()
        tally_class(2)
        with pytest.raises(ReplayError) as e:
            site.open()
        assert e.value.seq == 1
        assert isinstance(e.value.__cause__, DecodeError)
        message = str(e.value)
        assert "version 4" in message and "newer code" in message
        assert "up to 2" in message


def payload(**state):
    return dumps(state)


class TestUpcasters:

    def test_chained_from_each_old_version_in_order(self):
        class Note(Command):
            command_name = "tests.evolution.note"
            command_version = 3

        calls = []

        @upcaster("tests.evolution.note", 1)
        def note_v1(state):
            calls.append(1)
            return {"text": state["body"]}

        @upcaster("tests.evolution.note", 2)
        def note_v2(state):
            calls.append(2)
            return dict(state, tags=())

        name = "tests.evolution.note"
        assert vars(commands.decode(name, 1, payload(body="hi"))) == {
            "text": "hi", "tags": ()}
        assert calls == [1, 2]
        del calls[:]
        assert vars(commands.decode(name, 2, payload(text="yo"))) == {
            "text": "yo", "tags": ()}
        assert calls == [2]
        del calls[:]
        assert vars(commands.decode(name, 3, payload(text="x", tags=(1,)))
                    ) == {"text": "x", "tags": (1,)}
        assert calls == []

    def test_a_missing_step_names_the_step_and_the_seq(self):
        class Gap(Command):
            command_name = "tests.evolution.gap"
            command_version = 3

        calls = []

        @upcaster("tests.evolution.gap", 1)
        def gap_v1(state):
            calls.append(state)
            return state

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.gap", 1, payload(), seq=42)
        assert (e.value.seq, e.value.command_name) == (
            42, "tests.evolution.gap")
        message = str(e.value)
        assert "seq 42" in message and "tests.evolution.gap" in message
        assert "from version 2 to 3" in message
        assert calls == [], "no step runs when the chain is incomplete"

    def test_a_newer_version_is_written_by_newer_code(self):
        class Fresh(Command):
            command_name = "tests.evolution.fresh"
            command_version = 2

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.fresh", 3, payload(), seq=9)
        message = str(e.value)
        assert e.value.seq == 9 and "seq 9" in message
        assert "version 3 of tests.evolution.fresh" in message
        assert "newer code" in message and "up to 2" in message

    def test_an_overriding_upcast_is_not_asked_about_newer_versions(self):
        calls = []

        class Custom(Command):
            command_name = "tests.evolution.custom-newer"
            command_version = 2

            @classmethod
            def upcast(cls, version, state):
                calls.append(version)
                return state

        with pytest.raises(DecodeError):
            commands.decode("tests.evolution.custom-newer", 3, payload())
        commands.decode("tests.evolution.custom-newer", 1, payload())
        assert calls == [1]

    def test_an_overriding_upcast_replaces_the_registered_ones(self):
        class Own(Command):
            command_name = "tests.evolution.own"
            command_version = 2

            @classmethod
            def upcast(cls, version, state):
                return {"by": "override"}

        @upcaster("tests.evolution.own", 1)
        def own_v1(state):
            return {"by": "registry"}

        assert commands.decode("tests.evolution.own", 1, payload()).by == (
            "override")

    def test_registered_after_the_builder_was_made(self):
        class Late(Command):
            command_name = "tests.evolution.late"
            command_version = 2

        make = commands.builder(Late)
        with pytest.raises(DecodeError):
            make(1, payload(x=1), 5)

        @upcaster("tests.evolution.late", 1)
        def late_v1(state):
            return {"y": state["x"]}

        assert vars(make(1, payload(x=1), 6)) == {"y": 1}

    def test_a_failing_upcaster_is_a_decode_error_naming_it(self):
        class Brittle(Command):
            command_name = "tests.evolution.brittle"
            command_version = 2

        @upcaster("tests.evolution.brittle", 1)
        def brittle_v1(state):
            return {"account": state["acct"]}

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.brittle", 1, payload(), seq=3)
        message = str(e.value)
        assert e.value.seq == 3
        assert "from version 1 to 2" in message and "brittle_v1" in message
        assert "KeyError" in message
        assert isinstance(e.value.__cause__.__cause__, KeyError)

    def test_an_upcaster_must_return_the_state(self):
        class Forgetful(Command):
            command_name = "tests.evolution.forgetful"
            command_version = 2

        @upcaster("tests.evolution.forgetful", 1)
        def forgetful_v1(state):
            state["b"] = state.pop("a")   # and no return

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.forgetful", 1, payload(a=1))
        assert "returned None" in str(e.value)

    def test_a_failing_override_is_a_decode_error(self):
        class Picky(Command):
            command_name = "tests.evolution.picky"
            command_version = 2

            @classmethod
            def upcast(cls, version, state):
                raise ValueError("no version %d here" % version)

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.picky", 1, payload(), seq=8)
        assert "seq 8" in str(e.value) and "no version 1 here" in str(e.value)

    def test_a_step_has_one_upcaster(self):
        @upcaster("tests.evolution.contested", 1)
        def first(state):
            return state

        with pytest.raises(CommandError) as e:
            @upcaster("tests.evolution.contested", 1)
            def second(state):
                return state
        assert "first" in str(e.value) and "second" in str(e.value)
        assert commands._upcasters[("tests.evolution.contested", 1)] is first

    def test_redefining_the_same_upcaster_replaces_it(self):
        def define():
            @upcaster("tests.evolution.reloaded", 1)
            def reloaded_v1(state):
                return state
            return reloaded_v1
        define()
        latest = define()
        assert commands._upcasters[("tests.evolution.reloaded", 1)] is latest

    @pytest.mark.parametrize("name, version, error", [
        ("", 1, TypeError), (None, 1, TypeError),
        ("tests.evolution.x", 0, ValueError),
        ("tests.evolution.x", 65535, ValueError),
        ("tests.evolution.x", "1", ValueError),
    ])
    def test_bad_arguments(self, name, version, error):
        with pytest.raises(error):
            upcaster(name, version)


class TestCheckVersion:
    """What recovery asks before it replays anything."""

    def test_current_and_upcastable_versions_pass(self):
        commands.check_version(new.Deposit, 3)
        commands.check_version(new.Deposit, 1)
        commands.check_version(new.OpenAccount, 1)

    def test_a_missing_step_and_a_newer_version_fail_with_the_seq(self):
        class Halfway(Command):
            command_name = "tests.evolution.halfway"
            command_version = 2

        with pytest.raises(DecodeError) as e:
            commands.check_version(Halfway, 1, seq=11)
        assert e.value.seq == 11 and "from version 1 to 2" in str(e.value)
        with pytest.raises(DecodeError) as e:
            commands.check_version(new.Deposit, 4, seq=12)
        assert e.value.seq == 12 and "newer code" in str(e.value)

    def test_an_override_is_trusted_with_old_versions(self):
        class Trusted(Command):
            command_name = "tests.evolution.trusted"
            command_version = 5

            @classmethod
            def upcast(cls, version, state):
                return state

        commands.check_version(Trusted, 1)
        with pytest.raises(DecodeError):
            commands.check_version(Trusted, 6)


class TestAliases:

    def test_the_old_name_finds_the_new_class(self):
        assert commands.lookup("evolution.bank.open") is new.OpenAccount
        assert commands.lookup("evolution.accounts.open") is new.OpenAccount
        assert "evolution.bank.open" in commands.registered_names()
        command = commands.decode("evolution.bank.open", 1,
                                  payload(acct="x-1", owner="X"))
        assert type(command) is new.OpenAccount and command.acct == "x-1"

    def test_new_entries_carry_the_command_name_not_an_alias(self):
        name, version, _ = commands.encode(new.OpenAccount("x-1", "X"))
        assert (name, version) == ("evolution.accounts.open", 1)

    def test_an_alias_taken_by_another_class_is_refused(self):
        with pytest.raises(CommandNameConflictError) as e:
            class Squatter(Command):
                command_name = "tests.evolution.squatter"
                command_aliases = ("evolution.accounts.open",)
        message = str(e.value)
        assert "Squatter" in message and "OpenAccount" in message
        assert commands.lookup("evolution.accounts.open") is new.OpenAccount
        with pytest.raises(UnknownCommandError):
            commands.lookup("tests.evolution.squatter")

    def test_a_name_taken_as_an_alias_is_refused(self):
        with pytest.raises(CommandNameConflictError) as e:
            class Revenant(Command):
                command_name = "evolution.bank.open"
        assert "an alias" in str(e.value) and "Revenant" in str(e.value)
        assert commands.lookup("evolution.bank.open") is new.OpenAccount

    @pytest.mark.parametrize("aliases", ["tests.evolution.single", 42,
                                         ("",), (42,)])
    def test_aliases_are_a_tuple_of_names(self, aliases):
        with pytest.raises(CommandNameConflictError):
            class Odd(Command):
                command_name = "tests.evolution.odd"
                command_aliases = aliases

    def test_a_subclass_does_not_inherit_its_parents_aliases(self):
        class Parent(Command):
            command_name = "tests.evolution.parent"
            command_aliases = ("tests.evolution.parent-was",)

        class Child(Parent):
            command_name = "tests.evolution.child"

        assert Child.command_aliases == ()
        assert commands.lookup("tests.evolution.parent-was") is Parent

    def test_redefining_a_class_without_an_alias_forgets_it(self):
        def define(aliases):
            class Renamed(Command):
                command_name = "tests.evolution.renamed"
                command_aliases = aliases
            return Renamed

        define(("tests.evolution.renamed-was",))
        latest = define(())
        assert commands.lookup("tests.evolution.renamed") is latest
        with pytest.raises(UnknownCommandError):
            commands.lookup("tests.evolution.renamed-was")

    def test_an_upcaster_may_be_registered_under_an_alias(self):
        class Moved(Command):
            command_name = "tests.evolution.moved"
            command_aliases = ("tests.evolution.moved-was",)
            command_version = 2

        @upcaster("tests.evolution.moved-was", 1)
        def moved_v1(state):
            return {"to": state["where"]}

        assert commands.decode("tests.evolution.moved", 1,
                               payload(where="x")).to == "x"

    def test_one_step_upcast_under_two_names_is_ambiguous(self):
        class Twice(Command):
            command_name = "tests.evolution.twice"
            command_aliases = ("tests.evolution.twice-was",)
            command_version = 2

        @upcaster("tests.evolution.twice", 1)
        def twice_v1(state):
            return state

        @upcaster("tests.evolution.twice-was", 1)
        def twice_was_v1(state):
            return state

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.evolution.twice", 1, payload())
        assert "twice_v1" in str(e.value) and "twice_was_v1" in str(e.value)


class TestExecute:

    def test_entries_carry_the_current_name_and_version(self, site):
        jdb = site.open()
        try:
            jdb.execute(new.OpenAccount("x-1", "X"))
            jdb.execute(new.Deposit("x-1", decimal.Decimal("1.5")))
            written = [(e.command_name, e.version, e.args)
                       for e in jdb.journal.entries()]
        finally:
            jdb.close()
        assert written == [
            ("evolution.accounts.open", 1, {"acct": "x-1", "owner": "X"}),
            ("evolution.bank.deposit", 3,
             {"account": "x-1", "amount": decimal.Decimal("1.5")})]


class TestRetired:

    def test_a_retired_command_cannot_be_journaled_anew(self):
        legacy = new.LegacyTransfer()
        legacy.__dict__.update(source="a-1", target="b-1", amount=1)
        with pytest.raises(EncodeError) as e:
            commands.encode(legacy)
        assert "evolution.bank.transfer is retired" in str(e.value)
        assert new.LegacyTransfer.command_retired in str(e.value)

    def test_a_refused_retired_command_changes_nothing(self, site):
        class Gone(Command):
            command_name = "tests.evolution.gone"
            command_retired = True

            def execute(self, root, context):
                root["gone"] = True

        jdb = site.open()
        try:
            with pytest.raises(EncodeError) as e:
                jdb.execute(Gone())
            assert str(e.value).endswith("already journaled")
            assert jdb.journal.last_seq == 0
            conn = jdb.open()
            assert "gone" not in conn.root()
            conn.close()
        finally:
            jdb.close()
