"""Commands, their registry, and the context they execute in.

A command is the unit the journal records: a small object whose
``execute(root, context)`` changes the ZODB.  Replaying the journal means
executing the same commands again, in the same order, with the same
context, so everything a command reads must come from the ZODB, from its
own arguments or from the context -- never from the clock, a random
generator or the environment directly.

Each command class is registered under a stable ``command_name`` when the
class is created.  The journal stores that name (not the class path), so a
class can be moved or renamed as long as it keeps its name, or lists the
old name in ``command_aliases``.  The journal outlives the code that wrote
it: an entry also stores the ``command_version`` of its arguments' layout,
and the upcasters registered with :func:`upcaster` bring old layouts up to
date when the entry is read; the journal is never rewritten.
"""
import random
import struct
import threading

from zope.interface import implementer

from zjournal import codec
from zjournal.errors import CommandError
from zjournal.errors import CommandNameConflictError
from zjournal.errors import DecodeError
from zjournal.errors import EncodeError
from zjournal.errors import UnknownCommandError
from zjournal.format import MAX_NAME_SIZE
from zjournal.interfaces import ICommand
from zjournal.interfaces import IContext

_registry = {}       # every name a class answers to -> the class
_upcasters = {}      # (command name, from version) -> fn(state) -> state
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
    changes, register an :func:`upcaster` for each step (or override
    :meth:`upcast`) to turn the state saved by an older version into the
    current layout: the journal is never rewritten.

    ``command_aliases`` lists older names the class still answers to in
    the journal, so that the name itself can change.  ``command_retired``
    (true, or a string saying what replaces the command) keeps a class
    for replaying the entries already journaled while refusing new ones.
    """

    command_name = None
    command_version = 1
    command_aliases = ()
    command_retired = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "command_name" not in cls.__dict__ or cls.command_name is None:
            cls.command_name = "%s.%s" % (cls.__module__, cls.__qualname__)
        _check_name(cls, "command_name", cls.command_name)
        # Not inherited: a subclass claiming its parent's old names would
        # conflict with the parent.
        aliases = cls.__dict__.get("command_aliases", ())
        if not isinstance(aliases, (tuple, list)):
            raise CommandNameConflictError(
                "%s.command_aliases must be a tuple of names, not %r"
                % (cls.__qualname__, aliases))
        cls.command_aliases = tuple(aliases)
        for alias in cls.command_aliases:
            _check_name(cls, "command_aliases", alias)
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
        """Return ``state``, saved by ``version``, in the current layout.

        The default runs the upcasters registered for this command, one
        version step after the other.  Override it only to handle every
        old version in one place; the registered upcasters are then not
        used.
        """
        for step, fn in enumerate(_chain(cls, version), version):
            try:
                state = fn(state)
            except DecodeError:
                raise
            except Exception as e:
                raise DecodeError(
                    "the upcaster of %s from version %d to %d (%s) failed:"
                    " %s: %s" % (cls.command_name, step, step + 1,
                                 _describe(fn), type(e).__name__, e)) from e
            if state is None:
                raise DecodeError(
                    "the upcaster of %s from version %d to %d (%s) returned"
                    " None instead of the upcast state"
                    % (cls.command_name, step, step + 1, _describe(fn)))
        return state

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        args = ", ".join("%s=%r" % item for item in sorted(vars(self).items()))
        return "<%s %s>" % (self.command_name, args)


def _check_name(cls, attribute, name):
    if (not isinstance(name, str) or not name
            or len(name.encode("utf-8")) > MAX_NAME_SIZE):
        raise CommandNameConflictError(
            "%s.%s: a command name is a non-empty string of at most %d"
            " bytes, not %r" % (cls.__qualname__, attribute, MAX_NAME_SIZE,
                                name))


def _describe(obj):
    return "%s.%s" % (getattr(obj, "__module__", "?"),
                      getattr(obj, "__qualname__", repr(obj)))


def _same(old, new):
    """Whether ``new`` redefines ``old`` (a reload), rather than rivals it."""
    return old is new or _describe(old) == _describe(new)


def register(cls):
    """Register a command class under its ``command_name`` and aliases.

    Registering the same class again (a module imported twice under
    one name, a reload) replaces its entries; a different class under a
    taken name is an error, because a journal entry must mean one thing.
    """
    names = (cls.command_name,) + tuple(cls.command_aliases)
    with _registry_lock:
        for name in names:
            old = _registry.get(name)
            if old is not None and not _same(old, cls):
                raise CommandNameConflictError(
                    "command name %r is claimed by both %s (%s) and %s (%s)"
                    % (name, _describe(old), _role(old, name),
                       _describe(cls), _role(cls, name)))
        # A reloaded class may have dropped an alias: forget it, so that
        # the registry says what the code says.
        for name, old in list(_registry.items()):
            if name not in names and _same(old, cls):
                del _registry[name]
        for name in names:
            _registry[name] = cls


def _role(cls, name):
    return "its command_name" if name == cls.command_name else "an alias"


def lookup(name, seq=None):
    """The command class registered under ``name`` (a name or an alias)."""
    try:
        return _registry[name]
    except KeyError:
        raise UnknownCommandError(name, seq) from None


def registered_names():
    """Every name a journal entry may carry, aliases included."""
    return sorted(_registry)


def upcaster(name, from_version):
    """Register a function turning version ``from_version`` of a command's
    arguments into version ``from_version + 1``.

    Used as a decorator on ``fn(state) -> state``.  ``name`` is the
    command's ``command_name`` or one of its aliases.  Reading an entry
    of version N, when the class is at version M, runs the upcasters of
    N, N+1, ..., M-1 in turn, so each change of layout is written once,
    next to the change, and never edited again.  A step without an
    upcaster is an error when the entry is read, naming the step.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("upcaster() takes a command name, not %r" % (name,))
    if (not isinstance(from_version, int)
            or not 0 < from_version < (1 << 16) - 1):
        raise ValueError("upcaster() takes a version in 1..65534, not %r"
                         % (from_version,))

    def register_upcaster(fn):
        key = (name, from_version)
        with _registry_lock:
            old = _upcasters.get(key)
            if old is not None and not _same(old, fn):
                raise CommandError(
                    "%s and %s both upcast %s from version %d: a step must"
                    " have one meaning" % (_describe(old), _describe(fn),
                                          name, from_version))
            _upcasters[key] = fn
        return fn

    return register_upcaster


def _chain(cls, version):
    """The registered upcasters taking ``version`` to the class's version.

    Looked up when an old entry is read, not when the class is created,
    so an upcaster may be registered in any module, before or after its
    class.
    """
    _refuse_newer(cls, version)
    names = (cls.command_name,) + cls.command_aliases
    chain = []
    for step in range(version, cls.command_version):
        found = {_upcasters[(n, step)] for n in names
                 if (n, step) in _upcasters}
        if not found:
            raise DecodeError(
                "%s has no upcaster from version %d to %d (the entry has"
                " version %d, the code version %d); register one with"
                " @zjournal.commands.upcaster(%r, %d)"
                % (cls.command_name, step, step + 1, version,
                   cls.command_version, cls.command_name, step))
        if len(found) > 1:
            raise DecodeError(
                "%s has several upcasters from version %d to %d, registered"
                " under its different names: %s"
                % (cls.command_name, step, step + 1,
                   ", ".join(sorted(map(_describe, found)))))
        chain.extend(found)
    return chain


def check_version(cls, version, seq=None):
    """Raise :class:`DecodeError` if entries of ``version`` cannot become
    commands of ``cls``, without decoding any.

    Recovery calls it for each (name, version) in the range it is about
    to replay, so that a gap in the code is found before the ZODB
    changes.  A class overriding :meth:`Command.upcast` is trusted with
    every older version: only running it could tell.
    """
    try:
        if getattr(cls.upcast, "__func__", None) is Command.upcast.__func__:
            _chain(cls, version)
        else:
            _refuse_newer(cls, version)
    except DecodeError as e:
        raise DecodeError(str(e), seq, cls.command_name) from e


def _refuse_newer(cls, version):
    # An upcaster cannot know what a later layout means.
    if version > cls.command_version:
        raise DecodeError(
            "version %d of %s was written by newer code: this code knows"
            " versions up to %d; replay with the code that wrote it or a"
            " later one" % (version, cls.command_name, cls.command_version))


def _upcast(cls, version, state):
    _refuse_newer(cls, version)
    try:
        return cls.upcast(version, state)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("%s.upcast() failed on version %d: %s: %s"
                          % (_describe(cls), version, type(e).__name__,
                             e)) from e


def encode(command):
    """Return ``(name, version, payload)`` for a command to be journaled."""
    cls = type(command)
    if not isinstance(command, Command):
        raise TypeError("%r is not a zjournal.Command" % (command,))
    if cls.command_retired:
        raise EncodeError(
            "%s is retired: its class only replays the entries already"
            " journaled%s" % (cls.command_name, (
                "; " + cls.command_retired
                if isinstance(cls.command_retired, str) else "")))
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
    An entry of the current version pays one comparison for versions;
    only old entries look their upcasters up.
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
                state = _upcast(cls, version, state)
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
