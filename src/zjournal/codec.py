"""Encoding of command arguments: pickle, behind an allow-list.

A payload is the pickle of a command's state (by default its ``__dict__``),
never of the command object itself: the record names the command by its
registered name, so no class path is written for the command.

Unpickling runs code named by the bytes being read, so journal bytes are
only ever unpickled by :class:`SafeUnpickler`, which resolves nothing but
plain data types: the builtin containers and scalars, ``datetime``,
``decimal.Decimal``, ``fractions.Fraction`` and ``uuid.UUID``.  An
application whose commands carry other value types registers them with
:func:`register_type`; anything else is a :class:`~zjournal.errors.DecodeError`.
"""
import datetime
import decimal
import fractions
import io
import pickle
import uuid

from zjournal.errors import DecodeError
from zjournal.errors import EncodeError

# Protocol 4 stores bytes natively and names classes with one opcode; it is
# read by every Python 3 this project supports.
PROTOCOL = 4

# What a protocol-4 pickle of plain data may name.  The containers and
# scalars (list, dict, set, str, bytes, int, ...) have opcodes of their
# own and are never looked up by name, so they are not here: a payload
# that names them to call them (list(range(10**10))) is refused.
_SAFE_TYPES = (
    complex, slice, range,
    datetime.date, datetime.time, datetime.datetime, datetime.timedelta,
    datetime.timezone, decimal.Decimal, fractions.Fraction, uuid.UUID,
)


def _bytearray(*args):
    """bytearray, as pickle calls it (from bytes), never from a size."""
    if len(args) > 2 or (args and not isinstance(args[0], (bytes, str))):
        raise DecodeError("bytearray may only be built from bytes in a"
                          " payload")
    return bytearray(*args)

_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))

_allowed = {}


def _key(cls):
    return (cls.__module__, cls.__qualname__)


def register_type(cls):
    """Allow instances of ``cls`` in command arguments.

    ``cls`` is unpickled like any pickled class (its ``__reduce__`` or
    ``__setstate__`` runs), so register only value types whose
    construction has no side effects.  Usable as a class decorator.
    """
    if not isinstance(cls, type):
        raise TypeError("register_type() takes a class, not %r" % (cls,))
    _allowed[_key(cls)] = cls
    return cls


for _cls in _SAFE_TYPES:
    register_type(_cls)
del _cls
_allowed[("builtins", "bytearray")] = _bytearray


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed types."""

    def find_class(self, module, name):
        cls = _allowed.get((module, name))
        if cls is None:
            raise DecodeError(
                "payload refers to %s.%s, which is not an allowed type;"
                " register it with zjournal.register_type() if it is a"
                " plain value type" % (module, name))
        return cls

    def persistent_load(self, pid):
        raise DecodeError("payload holds a persistent reference")


def loads(payload):
    """Decode a payload; only allow-listed types are ever constructed."""
    try:
        return SafeUnpickler(io.BytesIO(payload)).load()
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("undecodable payload: %s: %s"
                          % (type(e).__name__, e)) from e


def dumps(state):
    """Encode a command's state, refusing what could not be decoded again.

    Checking at write time turns a journal that could not be replayed into
    an error for the caller, while the command can still be fixed.
    """
    try:
        payload = pickle.dumps(state, PROTOCOL)
    except Exception as e:
        raise EncodeError("cannot encode command arguments: %s: %s"
                          % (type(e).__name__, e)) from e
    if type(state) is dict and all(
            type(v) in _SCALARS for v in state.values()):
        # The common case, plain scalar arguments: nothing in such a
        # pickle can name a class, so decoding it cannot fail.
        return payload
    try:
        loads(payload)
    except DecodeError as e:
        raise EncodeError("command arguments would not decode: %s" % e) from e
    return payload
