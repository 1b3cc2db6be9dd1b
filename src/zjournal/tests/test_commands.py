import pickle

import pytest

from zjournal import commands
from zjournal.commands import Command
from zjournal.commands import Context
from zjournal.errors import CommandNameConflictError
from zjournal.errors import DecodeError
from zjournal.errors import UnknownCommandError


class Plain(Command):

    def __init__(self, a, b=None):
        self.a = a
        self.b = b


class Named(Command):
    command_name = "tests.commands.named"


class TestRegistry:

    def test_default_name_is_module_and_qualname(self):
        assert Plain.command_name == __name__ + ".Plain"
        assert commands.lookup(Plain.command_name) is Plain

    def test_explicit_name(self):
        assert commands.lookup("tests.commands.named") is Named

    def test_subclass_gets_its_own_name_not_its_parents(self):
        class Child(Named):
            pass
        assert Child.command_name == __name__ + "." + Child.__qualname__
        assert commands.lookup("tests.commands.named") is Named

    def test_two_classes_one_name_is_an_error(self):
        with pytest.raises(CommandNameConflictError) as e:
            class Impostor(Command):
                command_name = "tests.commands.named"
        assert "Impostor" in str(e.value) and "Named" in str(e.value)
        assert commands.lookup("tests.commands.named") is Named

    def test_redefining_the_same_class_replaces_it(self):
        def make():
            class Again(Command):
                command_name = "tests.commands.again"
            return Again
        first, second = make(), make()
        assert first is not second
        assert commands.lookup("tests.commands.again") is second

    def test_unknown_name(self):
        with pytest.raises(UnknownCommandError) as e:
            commands.lookup("no.such.command", seq=7)
        assert e.value.seq == 7
        assert "no.such.command" in str(e.value) and "7" in str(e.value)

    def test_bad_version(self):
        with pytest.raises(ValueError):
            class Versioned(Command):
                command_version = 0

    def test_name_must_be_a_string(self):
        with pytest.raises(CommandNameConflictError):
            class Numbered(Command):
                command_name = 42


class TestEncodeDecode:

    def test_round_trip_without_init(self):
        name, version, payload = commands.encode(Plain([1, 2], {"x": b"y"}))
        assert (name, version) == (Plain.command_name, 1)
        cmd = commands.decode(name, version, payload)
        assert type(cmd) is Plain
        assert cmd.a == [1, 2] and cmd.b == {"x": b"y"}

    def test_payload_holds_arguments_not_the_class_path(self):
        _, _, payload = commands.encode(Plain(1))
        assert b"Plain" not in payload
        assert pickle.loads(payload) == {"a": 1, "b": None}

    def test_encode_refuses_non_commands(self):
        with pytest.raises(TypeError):
            commands.encode(object())

    def test_old_version_is_upcast(self):
        class Move(Command):
            command_name = "tests.commands.move"
            command_version = 2

            @classmethod
            def upcast(cls, version, state):
                assert version == 1
                return {"to": state["destination"]}

        cmd = commands.decode("tests.commands.move", 1,
                              pickle.dumps({"destination": "x"}))
        assert cmd.to == "x"

    def test_old_version_without_upcaster_is_a_decode_error(self):
        class Shift(Command):
            command_name = "tests.commands.shift"
            command_version = 3

        with pytest.raises(DecodeError) as e:
            commands.decode("tests.commands.shift", 1, pickle.dumps({}),
                            seq=12)
        assert e.value.seq == 12 and "tests.commands.shift" in str(e.value)

    def test_execute_must_be_implemented(self):
        with pytest.raises(NotImplementedError):
            Plain(1).execute({}, Context(1, 0.0))

    def test_repr_shows_name_and_arguments(self):
        assert repr(Plain(1, "x")) == "<%s a=1, b='x'>" % Plain.command_name


class TestContext:

    def test_random_is_determined_by_seq_and_time(self):
        one = Context(5, 1234.5)
        two = Context(5, 1234.5, replaying=True)
        draws = [one.random.random() for _ in range(5)]
        assert draws == [two.random.random() for _ in range(5)]

    def test_random_differs_between_entries(self):
        base = Context(5, 1234.5).random.random()
        assert Context(6, 1234.5).random.random() != base
        assert Context(5, 1234.25).random.random() != base

    def test_fields(self):
        ctx = Context(3, 10.0, replaying=True)
        assert (ctx.seq, ctx.time, ctx.replaying) == (3, 10.0, True)
        assert "seq=3" in repr(ctx)
