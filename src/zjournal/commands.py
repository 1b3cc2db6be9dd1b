"""Commands, their registry, and the context they execute in.

A command is the unit the journal records: a small object whose
``execute(root, context)`` changes the ZODB.  Replaying the journal means
executing the same commands again, in the same order, with the same
context, so everything a command reads must come from the ZODB, from its
own arguments or from the context -- never from the clock, a random
generator or the environment directly.

Each command class is registered under a stable ``command_name`` when the
class is created.  The journal stores that name (not the class path), so a
class can be moved or renamed as long as it keeps its name.
"""
import random
import struct
import threading

from zope.interface import implementer

from zjournal import codec
from zjournal.errors import CommandNameConflictError
from zjournal.errors import DecodeError
from zjournal.errors import UnknownCommandError
from zjournal.format import MAX_NAME_SIZE
from zjournal.interfaces import ICommand
from zjournal.interfaces import IContext

_registry = {}
_registry_lock = threading.Lock()


@implementer(ICommand)
class Command:
    """Base class of journaled commands.

    Subclasses set ``command_name`` (default ``"<module>.<qualname>"``) and
    implement :meth:`execute`.  The arguments saved in the journal are the
    instance's state (``__getstate__``, by default its ``__dict__``) taken
    just before the command first executes; replay restores them with
    ``__setstate__`` without calling ``__init__``.

    ``command_version`` numbers the layout of those arguments.  When it
    changes, override :meth:`upcast` to turn the state saved by an older
    version into the current layout: the journal is never rewritten.
    """

    command_name = None
    command_version = 1

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "command_name" not in cls.__dict__ or cls.command_name is None:
            cls.command_name = "%s.%s" % (cls.__module__, cls.__qualname__)
        if (not isinstance(cls.command_name, str) or not cls.command_name
                or len(cls.command_name.encode("utf-8")) > MAX_NAME_SIZE):
            raise CommandNameConflictError(
                "%s.command_name must be a non-empty string of at most %d"
                " bytes, not %r"
                % (cls.__qualname__, MAX_NAME_SIZE, cls.command_name))
        if not 0 < cls.command_version < 1 << 16:
            raise ValueError("%s.command_version must be in 1..65535"
                             % cls.__qualname__)
        register(cls)

    def execute(self, root, context):
        """Apply the command to the ZODB ``root``; return any result."""
        raise NotImplementedError(
            "%s must implement execute(root, context)" % type(self).__name__)

    @classmethod
    def upcast(cls, version, state):
        """Return ``state``, saved by ``version``, in the current layout."""
        raise DecodeError(
            "%s has no upcaster from version %d to version %d"
            % (cls.command_name, version, cls.command_version))

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        args = ", ".join("%s=%r" % item for item in sorted(vars(self).items()))
        return "<%s %s>" % (self.command_name, args)


def register(cls):
    """Register a command class under its ``command_name``.

    Registering the same class again (a module imported twice under
    one name, a reload) replaces the entry; a different class under a
    taken name is an error, because a journal entry must mean one thing.
    """
    name = cls.command_name
    with _registry_lock:
        old = _registry.get(name)
        if old is not None and old is not cls and (
                old.__module__, old.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise CommandNameConflictError(
                "command name %r is used by both %s.%s and %s.%s"
                % (name, old.__module__, old.__qualname__,
                   cls.__module__, cls.__qualname__))
        _registry[name] = cls


def lookup(name, seq=None):
    """The command class registered under ``name``."""
    try:
        return _registry[name]
    except KeyError:
        raise UnknownCommandError(name, seq) from None


def registered_names():
    return sorted(_registry)


def encode(command):
    """Return ``(name, version, payload)`` for a command to be journaled."""
    cls = type(command)
    if not isinstance(command, Command):
        raise TypeError("%r is not a zjournal.Command" % (command,))
    return cls.command_name, cls.command_version, codec.dumps(
        command.__getstate__())


def decode(name, version, payload, seq=None):
    """Rebuild a command from a journal entry."""
    return build(lookup(name, seq), version, payload, seq)


def build(cls, version, payload, seq=None):
    """Rebuild a command of a known class from its journaled arguments."""
    return builder(cls)(version, payload, seq)


def builder(cls):
    """A function ``(version, payload, seq)`` rebuilding commands of ``cls``.

    Replay calls it once per entry, so what can be decided once per class
    is: a command class that keeps the default ``__new__`` and
    ``__setstate__`` gets the freshly decoded dict as its ``__dict__``.
    """
    loads = codec.loads
    current = cls.command_version
    plain = (cls.__setstate__ is Command.__setstate__
             and cls.__new__ is object.__new__)
    new = object.__new__

    def make(version, payload, seq=None):
        try:
            state = loads(payload)
            if version != current:
                state = cls.upcast(version, state)
        except DecodeError as e:
            raise DecodeError(str(e), seq, cls.command_name) from e
        if plain and type(state) is dict:
            command = new(cls)
            command.__dict__ = state
        else:
            command = cls.__new__(cls)
            command.__setstate__(state)
        return command

    return make


_seed = struct.Struct(">Qd")


@implementer(IContext)
class Context:
    """What a command may know beyond the ZODB and its arguments.

    ``time`` is taken once, when the command first executes, and stored in
    its journal record.  ``random`` is seeded from the record's sequence
    number and time, both stored, so a replay draws the same numbers.
    """

    __slots__ = ("seq", "time", "replaying", "_random")

    def __init__(self, seq, time, replaying=False):
        self.seq = seq
        self.time = time
        self.replaying = replaying
        self._random = None

    @property
    def random(self):
        # Built on first use: most commands never draw a random number.
        if self._random is None:
            self._random = random.Random(_seed.pack(self.seq, self.time))
        return self._random

    def __repr__(self):
        return "<Context seq=%d time=%r replaying=%r>" % (
            self.seq, self.time, self.replaying)
