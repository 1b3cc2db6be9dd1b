"""Encoding of command arguments: pickle, behind an allow-list.

A payload is the pickle of a command's state (by default its ``__dict__``),
never of the command object itself: the record names the command by its
registered name, so no class path is written for the command.

Unpickling runs code named by the bytes being read, and the bytes of a
journal may have been written by someone other than the application, so
:func:`loads` treats every payload as hostile:

- Names resolve through an allow-list only: the builtin containers and
  scalars (which have opcodes of their own), ``complex``, ``range``,
  ``slice``, ``bytearray``, the ``datetime`` types, ``decimal.Decimal``,
  ``fractions.Fraction``, ``uuid.UUID``, and what the application
  registers with :func:`register_type`.  For a class whose attributes
  can be assigned, the unpickler is handed a sealed stand-in that builds
  real instances but refuses assignment, so a payload cannot patch a class
  for the whole process (BUILD aimed at a class object).
- Constructors whose cost is not linear in their input (``Decimal`` of an
  int, ``Fraction`` of huge ints or of an exponent) accept only the forms
  that pickling writes, within bounds.
- Opcodes that the C unpickler would turn into work unrelated to the
  payload's size or into objects outside the allow-list are refused: a
  memo index (LONG_BINPUT, PUT) makes it allocate and clear 16 bytes per
  unit of the index, so four bytes cost gigabytes; EXT codes resolve
  through a process-wide cache without asking the allow-list; out-of-band
  buffers produce memoryviews; persistent ids refer outside the payload;
  and a bytes length that claims more than the payload holds is refused
  before the C unpickler allocates what it claims.
- Tuples nest at most :data:`MAX_NESTING` deep: hashing a tuple recurses
  in C without a depth check, so a deeply nested one used as a dict key
  crashes the interpreter instead of raising.
- A payload is at most :data:`MAX_PAYLOAD_SIZE` bytes.

Anything refused raises :class:`~zjournal.errors.DecodeError`; a payload
that is merely not a pickle raises it too.  Bytes after the pickle's STOP
opcode are ignored, as pickle itself ignores them: they can never become
part of a command, and whether a record's bytes are the ones its writer
wrote is what the journal's checksum, hash chain and signatures decide,
over the whole payload.

Decoding is on the replay hot path.  Finding the refused opcodes exactly
takes a walk over the opcode stream in Python (:func:`_scan`), which
costs more than the unpickling itself, but a payload can only contain
them if it contains the byte values that start them.  One
``bytes.translate`` finds out.  A payload without them goes straight to
the C unpickler, through :func:`pickle.loads` (no unpickler object to
build: several times cheaper) when no byte could name a class either.
Otherwise the walk goes only as far as the last such byte, and a walk
over the same leading bytes (the attribute names of a command class,
typically) is remembered.  Payloads over 1 KiB are walked whole, which
costs little for long strings and about four times the unpickling for a
long list of small numbers.
"""
import datetime
import decimal
import fractions
import io
import math
import pickle
import pickletools
import re
import struct
import threading
import uuid

from zjournal.errors import DecodeError
from zjournal.errors import EncodeError

# Protocol 4 stores bytes natively and names classes with one opcode; it is
# read by every Python 3 this project supports.
PROTOCOL = 4

#: The largest payload :func:`dumps` writes and :func:`loads` reads.
#: Command arguments are small; this bounds what a hostile payload can
#: make the decoder hold: at most about a hundred times its size (a list
#: of empty sets costs 2 bytes of payload and some 220 bytes of memory a
#: set).  The record layer bounds record bodies at 256 MiB.
MAX_PAYLOAD_SIZE = 16 * 1024 * 1024

#: How deep tuples may nest inside a payload.  Hashing a tuple recurses
#: in C with no depth check, about 64 bytes of stack a level: CPython 3.11
#: crashes on a hash some 100,000 levels deep, or 1,000 in a thread with
#: a 64 KiB stack.  500 levels stay within 32 KiB.  Pickling cannot write
#: much deeper anyway: it stops at the interpreter's recursion limit.
MAX_NESTING = 500

# Fraction components larger than this make its gcd (quadratic) cost
# milliseconds; Python limits int() of a decimal string to about the same.
_MAX_INT_BITS = 1 << 14

# -- the allow-list ----------------------------------------------------------

_HEAPTYPE = 1 << 9
_IMMUTABLETYPE = 1 << 8


def _sealed(cls):
    """Whether assigning to an attribute of ``cls`` is refused already."""
    flags = cls.__flags__
    return not flags & _HEAPTYPE or bool(flags & _IMMUTABLETYPE)


class _StandIn(type):
    """Metaclass of what the unpickler gets for a class it may build.

    The unpickler holds class objects on its stack, and its BUILD opcode
    assigns attributes to whatever is on top: aimed at a real Python class,
    it would change that class for the whole process.  A stand-in builds
    instances of the real class and refuses assignment.  Each stand-in has
    a metaclass of its own, a subclass of this one whose ``__call__`` (what
    REDUCE, OBJ and INST call) is the constructor itself, without a Python
    frame in between.
    """

    def __setattr__(cls, name, value):
        raise DecodeError("payload assigns %r to the class %s.%s"
                          % (name, cls.__module__, cls.__qualname__))

    def __delattr__(cls, name):
        raise DecodeError("payload deletes %r from the class %s.%s"
                          % (name, cls.__module__, cls.__qualname__))


# The instances that stand-ins with a check built during the current
# loads() in this thread: BUILD can still assign their attributes after
# construction, so they are checked once the whole payload is decoded.
_pending = threading.local()


def _stand_in(cls, build=None, newobj=True, check=None):
    """A sealed stand-in for ``cls``.

    ``build`` replaces the constructor where the real one is too
    trusting; ``newobj=False`` refuses NEWOBJ, which calls ``__new__``
    directly and would go around ``build``.  ``check(instance)`` runs on
    every instance built, after the payload is decoded.
    """
    build = build or cls

    def made(obj):
        pending = getattr(_pending, "made", None)
        if pending is not None:
            pending.append((check, obj))
        return obj

    def call(*args, **kwargs):
        return made(build(*args, **kwargs))

    def __new__(stand_in, *args, **kwargs):
        # NEWOBJ and NEWOBJ_EX call tp_new directly: copyreg.__newobj__.
        if not newobj:
            raise DecodeError("payload builds %s.%s without its constructor"
                              % (cls.__module__, cls.__qualname__))
        obj = cls.__new__(cls, *args, **kwargs)
        if check is not None:
            pending = getattr(_pending, "made", None)
            if pending is not None:
                pending.append((check, obj))
        return obj

    meta = type(_StandIn)("StandIn", (_StandIn,), {
        "__call__": staticmethod(build if check is None else call)})
    return meta(cls.__name__, (), {
        "__slots__": (), "__new__": __new__,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_zjournal_checked": check is not None})


def _decimal(value):
    # Decimal pickles as Decimal(str); Decimal(int) is quadratic in the
    # int's size.
    if type(value) is not str:
        raise DecodeError("Decimal may only be built from a string in a"
                          " payload")
    return decimal.Decimal(value)


_FRACTION_TEXT = re.compile(r"-?[0-9]{1,4300}(?:/[0-9]{1,4300})?\Z")


def _fraction(numerator, denominator=None):
    # Fraction pickles as Fraction(int, int), or Fraction("n/d") before
    # Python 3.11; from text with an exponent ("1e999999999") it would
    # compute a power of ten of that size.
    if denominator is None and type(numerator) is str:
        if not _FRACTION_TEXT.match(numerator):
            raise DecodeError("Fraction text %r is not of the form n/d"
                              % numerator[:40])
        return fractions.Fraction(numerator)
    if (type(numerator) is not int or type(denominator) is not int
            or numerator.bit_length() > _MAX_INT_BITS
            or denominator.bit_length() > _MAX_INT_BITS
            or denominator == 0):
        raise DecodeError("Fraction may only be built from two ints of at"
                          " most %d bits, the second not 0" % _MAX_INT_BITS)
    return fractions.Fraction(numerator, denominator)


def _slice(*args):
    # Only ints and None as bounds: a slice of slices or tuples would
    # nest outside the tuple depth check (slices hash from Python 3.12).
    if not 1 <= len(args) <= 3 or not all(
            a is None or type(a) is int for a in args):
        raise DecodeError("slice bounds in a payload must be ints or None")
    return slice(*args)


def _bytearray(*args):
    # bytearray pickles as bytearray(bytes); bytearray(n) allocates n bytes.
    if len(args) > 3 or (args and not isinstance(args[0], (bytes, str))):
        raise DecodeError("bytearray may only be built from bytes in a"
                          " payload")
    return bytearray(*args)


def _check_fraction(value):
    # BUILD can assign a Fraction's slots: Fraction(1, 0), or a list as
    # numerator.
    n = value._numerator
    d = value._denominator
    if (type(n) is not int or type(d) is not int or d <= 0
            or n.bit_length() > _MAX_INT_BITS
            or d.bit_length() > _MAX_INT_BITS or math.gcd(n, d) != 1):
        raise DecodeError("payload holds a malformed Fraction")


def _check_uuid(value):
    # UUID.__setstate__ takes its state as it comes: any int, any object.
    i = value.int
    if (type(i) is not int or not 0 <= i < 1 << 128
            or type(value.is_safe) is not uuid.SafeUUID):
        raise DecodeError("payload holds a malformed UUID")


_allowed = {}


def _key(cls):
    return (cls.__module__, cls.__qualname__)


def register_type(cls):
    """Allow instances of ``cls`` in command arguments.

    ``cls`` is unpickled like any pickled class (its constructor,
    ``__reduce__`` result or ``__setstate__`` runs, with arguments taken
    from the journal), so register only value types whose construction
    has no side effects.  Usable as a class decorator.
    """
    if not isinstance(cls, type):
        raise TypeError("register_type() takes a class, not %r" % (cls,))
    _allowed[_key(cls)] = cls if _sealed(cls) else _stand_in(cls)
    return cls


for _cls in (complex, range, datetime.date, datetime.time,
             datetime.datetime, datetime.timedelta, datetime.timezone):
    register_type(_cls)
for _cls, _build in ((decimal.Decimal, _decimal),
                     (fractions.Fraction, _fraction),
                     (slice, _slice), (bytearray, _bytearray)):
    _allowed[_key(_cls)] = _stand_in(
        _cls, _build, newobj=False,
        check=_check_fraction if _cls is fractions.Fraction else None)
_allowed[_key(uuid.UUID)] = _stand_in(uuid.UUID, check=_check_uuid)
del _cls, _build


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed names.

    Use it through :func:`loads`, which also refuses the opcodes that
    this class cannot see.
    """

    made = None

    def find_class(self, module, name):
        cls = _allowed.get((module, name))
        if cls is None:
            raise DecodeError(
                "payload refers to %s.%s, which is not an allowed type;"
                " register it with zjournal.register_type() if it is a"
                " plain value type" % (module, name))
        if (self.made is None and isinstance(cls, _StandIn)
                and cls._zjournal_checked):
            # Collect what needs a check only in payloads that can hold it.
            self.made = []
            self.outer = getattr(_pending, "made", None)
            _pending.made = self.made
        return cls

    def persistent_load(self, pid):
        raise DecodeError("payload holds a persistent reference")


# -- the opcode walk ----------------------------------------------------------

# What a byte may start, for the gate in loads().  The gate is one
# bytes.translate: every byte that could begin a refused opcode, a PUT, a
# name or a level of tuple nesting maps to its class, every other byte to
# 0.  Newlines (which end PUT's index, and of which GLOBAL and INST need
# two) are counted on the payload itself: one is common (the int 10, a
# length of 10) and alone it is harmless.
_RISKY = 1      # LONG_BINPUT, EXT1/2/4, READONLY_BUFFER, and the bytes
                # and bytearray opcodes with 4- and 8-byte lengths: the C
                # unpickler allocates what they claim before it reads
_PUT = 2        # PUT, harmful only with a newline to end its index
_NAME = 3       # STACK_GLOBAL
_NEST = 4       # an opcode that can add a level of tuples
_MARKS = bytearray(256)
for _b in b"r\x82\x83\x84\x98B\x8e\x96":
    _MARKS[_b] = _RISKY
_MARKS[ord("p")] = _PUT
_MARKS[0x93] = _NAME
for _b in b")t\x85\x86\x87R\x81\x92oi":
    _MARKS[_b] = _NEST
_MARKS = bytes(_MARKS)
# A payload of at most MAX_NESTING bytes cannot nest tuples deeper, so its
# gate ignores the nesting bytes and mostly finds nothing at all.
_MARKS_SHORT = _MARKS.replace(bytes([_NEST]), b"\0")
_ZEROS = bytes(MAX_NESTING)
# Payloads up to this size go through the gate; larger ones are walked.
_SMALL = 1024

# How _scan steps over each opcode: a positive number is the opcode's
# whole length; the rest say how to find it.
_REFUSED = 0
(_LEN1, _LEN4, _SLEN4, _LEN8, _FRAME, _LINE, _LINES2, _PUTLINE, _MEMO4,
 _NESTING, _GLOBAL, _STOP) = range(-1, -13, -1)
_STEP = [_REFUSED] * 256
_WHY = {}
for _op in pickletools.opcodes:
    _b = ord(_op.code)
    _arg = _op.arg
    if _arg is None:
        _STEP[_b] = 1
    elif _arg.n >= 0:
        _STEP[_b] = 1 + _arg.n
    else:
        _STEP[_b] = {pickletools.TAKEN_FROM_ARGUMENT1: _LEN1,
                     pickletools.TAKEN_FROM_ARGUMENT4: _SLEN4,
                     pickletools.TAKEN_FROM_ARGUMENT4U: _LEN4,
                     pickletools.TAKEN_FROM_ARGUMENT8U: _LEN8,
                     pickletools.UP_TO_NEWLINE: _LINE}[_arg.n]
_OPS = {_op.name: ord(_op.code) for _op in pickletools.opcodes}
for _name, _why in (
        ("EXT1", "an extension code, resolved outside the allow-list"),
        ("EXT2", "an extension code, resolved outside the allow-list"),
        ("EXT4", "an extension code, resolved outside the allow-list"),
        ("NEXT_BUFFER", "an out-of-band buffer"),
        ("READONLY_BUFFER", "an out-of-band buffer"),
        ("PERSID", "a persistent reference"),
        ("BINPERSID", "a persistent reference")):
    _STEP[_OPS[_name]] = _REFUSED
    _WHY[_name] = _why
_STEP[_OPS["GLOBAL"]] = _STEP[_OPS["INST"]] = _LINES2
_STEP[_OPS["PUT"]] = _PUTLINE
_STEP[_OPS["LONG_BINPUT"]] = _MEMO4
_STEP[_OPS["FRAME"]] = _FRAME
_STEP[_OPS["STACK_GLOBAL"]] = _GLOBAL
_STEP[_OPS["STOP"]] = _STOP
for _name in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
              "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"):
    _STEP[_OPS[_name]] = _NESTING
del _b, _op, _arg, _name, _why


_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U64 = struct.Struct("<Q").unpack_from


def _refuse(at, reason):
    raise DecodeError("payload offset %d: %s" % (at, reason))


# Walks that stopped at their limit, by the bytes they read from offset 11
# (after PROTO and FRAME) to the limit; the value is where they stopped,
# which the frame must reach.
_WALKED = {}


def _scan(data, limit, step=_STEP, LEN1=_LEN1, NESTING=_NESTING,
          MEMO4=_MEMO4, STOP=_STOP, GLOBAL=_GLOBAL, LEN4=_LEN4,
          SLEN4=_SLEN4, LEN8=_LEN8, FRAME=_FRAME, LINE=_LINE,
          LINES2=_LINES2, PUTLINE=_PUTLINE, u32=_U32, i32=_I32, u64=_U64):
    """Walk a payload's opcodes from its start until ``limit``.

    Refuses what :func:`loads` must not hand to the C unpickler.  Stops
    at STOP, returning whether an opcode on the way names a class, or at
    the first opcode boundary at or past ``limit``, returning None: the
    caller knows that no byte from there on can start a refused opcode.

    The walk must see the opcodes the C unpickler will see.  It reads a
    frame into a buffer and resynchronizes on the file after the frame
    when an opcode runs past the frame's end, so such frames are refused,
    as are frames inside frames; pickle never writes either.

    A walk that stops at ``limit`` having met only opcodes whose length
    is in their first two bytes is remembered in _WALKED by the bytes it
    read, for :func:`loads` to look up: the payloads of one command class
    share their first bytes (the attribute names), so most walks are
    never walked twice.

    (The constants are default arguments because this loop is on the
    replay path: a local is cheaper to read than a global.)
    """
    n = len(data)
    i = 0
    frame_end = n       # end of the current frame, or of the payload
    framed = False
    named = False
    nesting = 0
    key = None
    try:
        if data[0] == 0x80 and data[2] == 0x95:
            # PROTO and FRAME, as pickle starts every payload of 4 or more
            # bytes.
            i = 11
            frame_end = 11 + u64(data, 3)[0]
            framed = True
            if frame_end > n:
                _refuse(2, "a frame longer than the payload")
            if limit <= n:
                key = data[11:limit + 1]
        simple = True
        while True:
            stop = frame_end if frame_end < limit else limit
            while i < stop:
                s = step[data[i]]
                if s > 0:
                    i += s
                elif s == LEN1:
                    i += 2 + data[i + 1]
                elif s == NESTING:
                    nesting += 1
                    i += 1
                elif s == MEMO4:
                    simple = False
                    if u32(data, i + 1)[0] > n:
                        _refuse(i, "a memo index beyond the payload")
                    i += 5
                elif s == STOP:
                    if nesting > MAX_NESTING:
                        _check_nesting(data)
                    return named
                elif s == GLOBAL:
                    named = True
                    i += 1
                elif s == LEN4 or s == SLEN4:
                    simple = False
                    size = (i32 if s == SLEN4 else u32)(data, i + 1)[0]
                    if size < 0:
                        _refuse(i, "a negative length")
                    i += 5 + size
                elif s == LEN8:
                    # The walk reaches past the end below, before the C
                    # unpickler could allocate a claimed 2**60 bytes.
                    simple = False
                    i += 9 + u64(data, i + 1)[0]
                elif s == FRAME:
                    if framed:
                        _refuse(i, "a frame inside a frame")
                    simple = False
                    framed = True
                    frame_end = i + 9 + u64(data, i + 1)[0]
                    if frame_end > n:
                        _refuse(i, "a frame longer than the payload")
                    i += 9
                    break
                elif s == LINE or s == LINES2 or s == PUTLINE:
                    simple = False
                    j = data.find(b"\n", i + 1, frame_end)
                    if s == LINES2 and j >= 0:
                        # GLOBAL or INST: a module line and a name line;
                        # INST also builds, like OBJ.
                        named = True
                        nesting += data[i] == 0x69
                        j = data.find(b"\n", j + 1, frame_end)
                    if j < 0:
                        _refuse(i, "a line that does not end in its frame")
                    if s == PUTLINE:
                        try:
                            index = int(data[i + 1:j])
                        except ValueError:
                            index = -1
                        if not 0 <= index <= n:
                            _refuse(i, "a memo index beyond the payload")
                    i = j + 1
                else:
                    op = pickletools.code2op.get(chr(data[i]))
                    if op is None:
                        _refuse(i, "byte %#04x is not an opcode" % data[i])
                    _refuse(i, "%s (%s) is refused"
                            % (op.name, _WHY.get(op.name, "")))
            if i > frame_end:
                # Also past ``limit``: a length that claims more than the
                # payload holds would make the C unpickler allocate it.
                _refuse(i, "an opcode runs past the end of its frame"
                        if i <= n else "truncated")
            if i >= limit:
                if simple and key is not None:
                    if len(_WALKED) >= 4096:
                        _WALKED.clear()
                    _WALKED[key] = i
                return None
            if i < frame_end:           # a FRAME opcode ended the loop
                continue
            if not framed:
                _refuse(i, "truncated: no STOP opcode")
            simple = False
            framed = False
            frame_end = n
    except (IndexError, struct.error):
        _refuse(n, "truncated")


# What each opcode does to the stack, for _check_nesting.
(_DO_PUSH, _DO_MEMOIZE, _DO_TUPLE_K, _DO_TUPLE_MARK, _DO_POP1, _DO_POP2,
 _DO_MARK, _DO_TO_MARK, _DO_COLLECT, _DO_FROM_MARK, _DO_CALL, _DO_CALL_KW,
 _DO_BUILD, _DO_NAMED, _DO_PUT, _DO_GET, _DO_DUP, _DO_POP) = range(1, 19)


def _opcode_effects():
    effects = [0] * 256
    for op in pickletools.opcodes:
        if not op.stack_before and len(op.stack_after) == 1:
            effects[ord(op.code)] = _DO_PUSH
    for names, effect in (
            ("TUPLE1 TUPLE2 TUPLE3 EMPTY_TUPLE", _DO_TUPLE_K),
            ("TUPLE", _DO_TUPLE_MARK), ("MARK", _DO_MARK),
            ("LIST DICT FROZENSET", _DO_COLLECT),
            ("APPENDS SETITEMS ADDITEMS POP_MARK", _DO_TO_MARK),
            ("OBJ INST", _DO_FROM_MARK), ("APPEND", _DO_POP1),
            ("SETITEM", _DO_POP2), ("STACK_GLOBAL", _DO_NAMED),
            ("REDUCE NEWOBJ", _DO_CALL), ("NEWOBJ_EX", _DO_CALL_KW),
            ("BUILD", _DO_BUILD), ("MEMOIZE", _DO_MEMOIZE),
            ("PUT BINPUT LONG_BINPUT", _DO_PUT),
            ("GET BINGET LONG_BINGET", _DO_GET), ("DUP", _DO_DUP),
            ("POP", _DO_POP)):
        for name in names.split():
            effects[_OPS[name]] = effect
    return effects


_EFFECTS = _opcode_effects()


def _memo_index(data, i):
    op = data[i]
    if op in b"hq":                             # BINGET, BINPUT
        return data[i + 1]
    if op in b"jr":                             # LONG_BINGET, LONG_BINPUT
        return int.from_bytes(data[i + 1:i + 5], "little")
    return int(data[i + 1:data.index(b"\n", i + 1)])   # GET, PUT


def _check_nesting(data, step=_STEP, effects=_EFFECTS, LEN1=_LEN1,
                   PUSH=_DO_PUSH, MEMOIZE=_DO_MEMOIZE,
                   TUPLE_K=_DO_TUPLE_K, TUPLE1=_OPS["TUPLE1"],
                   TUPLE2=_OPS["TUPLE2"], TUPLE3=_OPS["TUPLE3"],
                   MARK=_DO_MARK, TO_MARK=_DO_TO_MARK, POP1=_DO_POP1):
    """Refuse tuples nested deeper than MAX_NESTING.

    Called only for payloads with more tuple-building opcodes than that
    (a list of many small tuples, say), so the common case never pays for
    this second walk, which follows each object's tuple depth through the
    stack and the memo.  Objects that are not tuples have depth 0: a
    frozenset caches its hash, lists and dicts have none.  What REDUCE or
    NEWOBJ builds counts as deep as its arguments, for registered tuple
    subclasses.
    """
    stack = []
    push = stack.append
    pop = stack.pop
    marks = []
    memo = {}
    deepest = 0
    i = 0
    try:
        while True:
            # Step over the opcode first; _scan accepted these bytes, so
            # every opcode here is one it knows and the walk ends at STOP.
            op = data[i]
            s = step[op]
            at = i
            if s > 0:
                i += s
            elif s == LEN1:
                i += 2 + data[i + 1]
            elif s == _LEN4 or s == _SLEN4:
                i += 5 + int.from_bytes(data[i + 1:i + 5], "little")
            elif s == _LEN8:
                i += 9 + int.from_bytes(data[i + 1:i + 9], "little")
            elif s == _MEMO4:
                i += 5
            elif s == _FRAME:
                i += 9
            elif s == _LINE or s == _PUTLINE:
                i = data.index(b"\n", i + 1) + 1
            elif s == _LINES2:
                i = data.index(b"\n", data.index(b"\n", i + 1) + 1) + 1
            elif s == _STOP:
                break
            else:                       # _NESTING, _GLOBAL
                i += 1
            effect = effects[op]
            if effect == PUSH:
                push(0)
            elif effect == MEMOIZE:
                memo[len(memo)] = stack[-1]
            elif effect == TUPLE_K:
                if op == TUPLE2:
                    a = pop()
                    b = stack[-1]
                    depth = 1 + (a if a > b else b)
                    stack[-1] = depth
                elif op == TUPLE1:
                    depth = stack[-1] + 1
                    stack[-1] = depth
                elif op == TUPLE3:
                    a = pop()
                    b = pop()
                    depth = 1 + max(a, b, stack[-1])
                    stack[-1] = depth
                else:                   # EMPTY_TUPLE
                    depth = 1
                    push(1)
                if depth > deepest:
                    deepest = depth
            elif effect == MARK:
                marks.append(len(stack))
            elif effect == TO_MARK:
                del stack[marks.pop():]
            elif effect == POP1:
                pop()
            elif effect == _DO_TUPLE_MARK:
                base = marks.pop()
                depth = 1 + max(stack[base:], default=0)
                del stack[base:]
                push(depth)
                if depth > deepest:
                    deepest = depth
            elif effect == _DO_POP2:
                del stack[-2:]
            elif effect == _DO_COLLECT:
                del stack[marks.pop():]
                push(0)
            elif effect == _DO_FROM_MARK:
                base = marks.pop()
                depth = max(stack[base:], default=0)
                del stack[base:]
                push(depth)
            elif effect == _DO_CALL:
                args = pop()
                stack[-1] = args
            elif effect == _DO_CALL_KW:
                kwargs = pop()
                args = pop()
                stack[-1] = max(args, kwargs)
            elif effect == _DO_BUILD:
                state = pop()
                stack[-1] = max(stack[-1], state)
            elif effect == _DO_NAMED:
                pop()
                stack[-1] = 0
            elif effect == _DO_PUT:
                memo[_memo_index(data, at)] = stack[-1]
            elif effect == _DO_GET:
                push(memo[_memo_index(data, at)])
            elif effect == _DO_DUP:
                push(stack[-1])
            elif effect == _DO_POP:
                # The C unpickler pops a mark when one is on top.
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop()
    except (IndexError, KeyError, ValueError):
        raise DecodeError("payload's stack does not add up") from None
    if deepest > MAX_NESTING:
        raise DecodeError("payload nests tuples %d deep (at most %d)"
                          % (deepest, MAX_NESTING))


# -- the codec ----------------------------------------------------------------

_BytesIO = io.BytesIO
_pickle_loads = pickle.loads


def loads(payload):
    """Decode a payload (bytes); only allow-listed types are constructed.

    Raises :class:`~zjournal.errors.DecodeError` for anything else.
    """
    try:
        n = len(payload)
        if n > MAX_PAYLOAD_SIZE:
            raise DecodeError("payload of %d bytes is larger than %d"
                              % (n, MAX_PAYLOAD_SIZE))
        if n <= MAX_NESTING:
            marks = payload.translate(_MARKS_SHORT)
            if _ZEROS.startswith(marks):
                # The common case: nothing to walk for.  Without two
                # newlines nothing can name a class either.
                named = payload.count(10) > 1
                marks = b""
        elif n <= _SMALL:
            marks = payload.translate(_MARKS)
        else:
            marks = None
        if marks is None:
            # translate() and count() cost a nanosecond a byte; the walk
            # costs by opcode, and large payloads are mostly long strings.
            named = _scan(payload, n + 1)
        elif marks:
            last = marks.rfind(_RISKY)
            newline = payload.find(10)
            if newline >= 0 and _PUT in marks:
                put = marks.rfind(_PUT)
                if put > last:
                    last = put
            named = _NAME in marks or (
                newline >= 0 and payload.find(10, newline + 1) >= 0)
            if n > MAX_NESTING and marks.count(_NEST) > MAX_NESTING:
                # Tuples may nest too deep: a whole walk counts them.
                named = _scan(payload, n + 1)
            elif last >= 0:
                # Walk as far as the last byte that could start a refused
                # opcode, unless an identical start was walked before; a
                # walk that meets STOP knows the names exactly.
                known = _WALKED.get(payload[11:last + 2])
                if (known is None or n < 11 or payload[2] != 0x95
                        or payload[0] != 0x80
                        or known > 11 + _U64(payload, 3)[0]):
                    walked = _scan(payload, last + 1)
                    if walked is not None:
                        named = walked
        if named:
            unpickler = SafeUnpickler(_BytesIO(payload))
            try:
                value = unpickler.load()
            finally:
                made = unpickler.made
                if made is not None:
                    _pending.made = unpickler.outer
            if made:
                for check, obj in made:
                    check(obj)
            return value
        # Nothing in the payload can name a class, so no code but the
        # builtin containers' can run: the plain C loader is safe.
        return _pickle_loads(payload)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("undecodable payload: %s: %s"
                          % (type(e).__name__, e)) from e


_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))


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
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise EncodeError("command arguments take %d bytes encoded, more"
                          " than the %d a payload may hold"
                          % (len(payload), MAX_PAYLOAD_SIZE))
    if type(state) is dict and all(
            type(k) is str and type(v) in _SCALARS
            for k, v in state.items()):
        # The common case, plain scalar arguments: nothing in such a
        # pickle can name a class or nest, so decoding it cannot fail.
        return payload
    try:
        loads(payload)
    except DecodeError as e:
        raise EncodeError("command arguments would not decode: %s" % e) from e
    return payload
