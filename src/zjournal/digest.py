"""A canonical digest of the state reachable from a ZODB root.

Two databases hold the same application state when the same objects,
reached the same way from the root, hold the same values -- whatever
their oids, the order their objects were created in, how their BTrees
happen to be split into buckets, and whatever a connection's cache holds.
:func:`state_digest` reduces that state to one hash; :func:`compare`
walks two databases side by side and names the first object where they
differ.  ``zodb-journal check-replay`` (:mod:`zjournal.checkreplay`) is
built on both, and :class:`StateDigest` records digests in the journal.

The walk
    Breadth first from the root, children in canonical order.  A
    reference to a persistent object is hashed as the object's position
    in that walk (the root is 0, the objects it refers to come next, and
    so on): canonical, since the order is, and unique, since each object
    has one position.  An object found again (shared, or in a cycle) is
    hashed once.  Each object also has a *path*, for people to read:
    ``/accounts/alice`` is the value of key ``"alice"`` of the object at
    key ``"accounts"`` of the root, ``/bank/accounts`` the attribute
    ``accounts`` of the object at ``/bank``, ``/queue[3]`` a list element
    or a key that is not a string, ``/tags/members{2}`` the third member
    of a set in canonical order, ``/box/@/title`` an attribute of a
    persistent mapping or list besides its items.  ``%``, ``/``, ``[``,
    ``{`` and a leading ``@`` in a string key are %-escaped, so that a
    path names one place.  The zjournal marker
    (:data:`~zjournal.marker.MARKER_KEY`) is left out: it says how the
    state was made, not what it is.

What is hashed for each object
    The ``module.qualname`` of its class and its state: what
    ``__getstate__`` returns (what ZODB pickles), encoded canonically --
    types kept apart (``1``, ``1.0`` and ``True`` differ), dict items and
    set members in sorted order (an ``OrderedDict`` keeps its order),
    references to persistent objects replaced by their position, other
    objects by what they pickle as (the reducer ``copyreg`` registers for
    their type, else ``__reduce_ex__``).  A BTree (or TreeSet, Set,
    Bucket) is hashed by its items in key order, not by its buckets.

Persistent objects as set members and dict keys
    Python orders them by ``id()`` or by oid, which differ between two
    databases holding the same state.  The walk orders them by a hash of
    their content instead, each member read on its own: its class and
    state, and the content of the not-yet-walked objects it refers to;
    an object met again within one member's read (shared, or a cycle
    back) is hashed as how far back in that read it was met first.  Only
    then does it give them positions.

Tied members
    Members whose content hashes the same form a group, and their order
    among themselves is arbitrary; so is their position.  A reference to
    a group member is hashed as the group and a *slot*, handed out as
    references arrive in walk order: the first member named gets the
    first slot, the same member named again the same slot, another
    member the next one.  ``[a, a]`` and ``[a, b]`` thus differ, and
    which of two tied members one reference names does not count.
    Group members are visited once nothing else waits, in slot order;
    members no reference named yet are taken first if no other waiting
    member names them, and are otherwise told apart by how they refer to
    each other (colour refinement, as graph canonization starts with).
    Ties that refinement leaves may make the same state digest two ways,
    never two states digest one way.  Listing tied members that pair
    objects of two groups (``{(a, c1), (b, c2)}``) hands out no slot;
    the reference that later gives one of them a slot also hashes the
    slots its partners have by then, which keeps the pairing.  A member
    whose content reaches more than :data:`CONTENT_OBJECTS` objects not
    walked yet is a :class:`DigestError` rather than a guess.

Plain values shared within a record
    Within one persistent object's state, a plain (not persistent) list,
    dict, set or other object met a second time is hashed as a reference
    back to the first time, as pickle memoizes it within a ZODB record:
    ``(l, l)`` differs from ``([1], [1])``, and plain cycles (a tree with
    parent pointers) can be digested.  Sharing between the states of two
    persistent objects is not hashed, since it does not survive storing
    them; nor is sharing between two items of a BTree, whose buckets are
    not part of the state.  Tuples, frozensets, strings and numbers are
    values only.  Plain values nested more than about a thousand levels
    deep are a :class:`DigestError` saying so.

Other rules
    BTree keys are taken in the tree's order: a persistent class used as
    a BTree key defines that order itself (``__lt__``), and the digest is
    canonical if that order is (it is not when it compares oids).
    Objects only reachable through a ``_v_`` attribute, or not reachable
    from the root at all, are not part of the state.

Large databases are walked a few objects at a time: an object the walk
loaded is turned back into a ghost once hashed, the cache is trimmed
every :data:`GC_EVERY` objects, and only each object's position and path
are kept (to name references to it), never its state.
"""
import collections
import copyreg
import hashlib
import heapq
import logging
import operator
import sys
import time

import persistent
import persistent.list
import persistent.mapping
import persistent.wref
from BTrees.Interfaces import IDictionaryIsh
from BTrees.Interfaces import IKeyed
from ZODB.POSException import POSKeyError

from zjournal import commands
from zjournal.commands import Command
from zjournal.errors import ZJournalError
from zjournal.format import FLAG_QUERY
from zjournal.marker import MARKER_KEY

logger = logging.getLogger(__name__)

#: Names the canonical encoding and the hash.  Digests made under another
#: scheme are not comparable with these, and are not compared.
SCHEME = "zjournal-digest-3"

#: Objects hashed between two trims of the connection's cache.
GC_EVERY = 1000

#: Items of one BTree between two progress reports from inside it.
TREE_PROGRESS = 10000

#: Objects waiting to be walked that are held in memory (as ghosts, most
#: of them); beyond this, only their oids are.
PENDING_OBJECTS = 20000

#: Objects not walked yet that the content hash of one set member or
#: dict key (see the module's docstring) may read before giving up.
CONTENT_OBJECTS = 10000

# The recursion limit while one object is hashed: plain values nested as
# deeply as pickle takes them (several calls here per level).
_RECURSION = 6000

# Encoded state is hashed in pieces of about this many bytes.
_FLUSH = 1 << 16

_MAPPINGS = (persistent.mapping.PersistentMapping,)
_LISTS = (persistent.list.PersistentList,)


class DigestError(ZJournalError):
    """A value in the database cannot be encoded for a digest."""


ObjectDigest = collections.namedtuple(
    "ObjectDigest", "path class_name digest")
ObjectDigest.__doc__ = """One object of a walk: where, what class, which hash
(hex)."""


class Digest(collections.namedtuple("Digest", "hexdigest objects")):
    """The digest of a whole state and how many objects it covers."""

    scheme = SCHEME


class Difference(collections.namedtuple(
        "Difference", "path live_class replayed_class detail live replayed")):
    """The first object where two states differ.

    ``detail`` names the part that differs (an attribute, a key), or is
    empty when only the whole object can be shown; ``live`` and
    ``replayed`` summarize each side's value of that part, or ``None``
    where a side has no object at that point of the walk.
    """

    def describe(self):
        """The difference as lines of text, for people."""
        head = "%s (%s)" % (self.path, self._classes())
        if self.detail:
            head += ", " + self.detail
        return [head + ":", "  live:     %s" % _or_absent(self.live),
                "  replayed: %s" % _or_absent(self.replayed)]

    def _classes(self):
        if self.live_class == self.replayed_class:
            return self.live_class
        return "live %s, replayed %s" % (_or_absent(self.live_class),
                                         _or_absent(self.replayed_class))

    def as_dict(self):
        return dict(self._asdict())


def _or_absent(value):
    return "<absent>" if value is None else value


class Comparison(collections.namedtuple(
        "Comparison", "live replayed difference")):
    """What :func:`compare` found: two :class:`Digest` and the first
    :class:`Difference` (None when the states are equal)."""

    @property
    def equal(self):
        return self.difference is None


class WalkProgress:
    """Reports a long walk, like :class:`zjournal.recovery.Progress` for
    replays: a status line on a terminal, else a log line now and then."""

    def __init__(self, label="digest", tty=False, stream=None, interval=None):
        self.label = label
        self.tty = tty
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval if interval is not None else (
            0.2 if tty else 5.0)
        self.began = self.shown = time.perf_counter()
        self.written = False

    def __call__(self, objects, done=False, items=None):
        now = time.perf_counter()
        if objects == 0 and not done and items is None:
            # A walk starting: made before a long replay, this reporter
            # would otherwise count the replay's time in the walk's rate.
            self.began = self.shown = now
            return
        if now - self.shown < self.interval and not (done and self.written):
            return
        self.shown = now
        text = "%s: %s objects (%.0f/s)" % (
            self.label, format(objects, ","),
            objects / max(now - self.began, 1e-9))
        if items is not None:
            # One large BTree is one object: say the walk is inside it.
            text += ", in a BTree: %s items read" % format(items, ",")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done else ""))
            self.stream.flush()
            self.written = not done
        else:
            logger.info(text)


class _Ref:
    """A reference to a persistent object, as a difference shows it."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return "<ref %s>" % (self.path or "/")


class _Unknown:
    """A persistent object a description reached but the walk had not."""

    def __init__(self, obj):
        self.class_name = _class_name(type(obj))

    def __repr__(self):
        return "<%s not yet walked>" % self.class_name


def _class_name(cls):
    return "%s.%s" % (getattr(cls, "__module__", "?"),
                      getattr(cls, "__qualname__",
                              getattr(cls, "__name__", repr(cls))))


def _step(base, key):
    """The path of the value at ``key`` (an attribute or key) of ``base``."""
    if type(key) is str:
        text = (key.replace("%", "%25").replace("/", "%2F")
                .replace("[", "%5B").replace("{", "%7B"))
        if text.startswith("@"):
            text = "%40" + text[1:]
        return base + "/" + text
    if _shown(key):
        return base + "[%r]" % (key,)
    # Anything else may show a memory address in its repr(): callers
    # name such a key with _value_step(), by its encoding.
    return base + "[%s]" % _class_name(type(key)).rpartition(".")[2]


_SHOWN_KEYS = (int, float, bool, type(None), bytes, str)


def _shown(key):
    """Whether repr(key) is canonical, to show in a path."""
    if type(key) is tuple:
        return all(_shown(k) for k in key)
    return type(key) in _SHOWN_KEYS


def _is_tree(obj):
    """A BTree, TreeSet, Set or Bucket: hashed by items, not by buckets."""
    return IKeyed.providedBy(obj)


class Walker:
    """Walks the persistent objects reachable from ``root``, in canonical
    order, yielding an :class:`ObjectDigest` for each.

    After a complete iteration ``hexdigest`` and ``objects`` describe the
    whole state.  ``root`` may be the root of a connection in the middle
    of a transaction: objects changed or added by the transaction are
    hashed as they are in memory.  ``progress(objects, done=False)`` is
    called with 0 when the walk starts, every ``gc_every`` objects and at
    the end, and
    ``progress(objects, items=N)`` every :data:`TREE_PROGRESS` items of
    a BTree being hashed (a large one is one object, but much of a walk).
    """

    def __init__(self, root, progress=None, exclude=(MARKER_KEY,),
                 gc_every=GC_EVERY):
        self.root = root
        self.jar = root._p_jar
        self.progress = progress
        self.exclude = frozenset(exclude)
        self.gc_every = gc_every
        self.objects = 0
        self.hexdigest = None
        self._index = {}       # object key -> its position in the walk
        # position -> the path it was found by: a list, not a second dict
        # keyed like _index (a walk keeps both for every object).
        self._paths = []
        # Members of a set (or persistent dict keys) with the same
        # content form a group; position -> (group, member, object), see
        # _canonical().  Which member a reference names is hashed by the
        # group's slot it got: slots are handed out in walk order.
        self._groups = {}
        self._slots = {}       # (group, member) -> slot
        self._free_slot = {}   # group -> the next slot to hand out
        self._hold = False     # tied members being listed: no slots yet
        self._linking = None   # (group, member) being listed
        # (group, member) -> members of other groups listed with it, none
        # with a slot then (a set of tuples pairing tied objects).
        self._links = {}
        self._assigned = 0     # slots handed out so far
        self._ready = []       # heap of (when, group, member) given slots
        self._deferred = {}    # (group, member) -> {object: entry}
        self._sources = []     # (group, member) to take first, see _order
        self._collect = None   # a set taking the group members met
        # Plain (not persistent) containers and objects met in the record
        # being encoded: id() -> their order of encounter, and the objects
        # themselves (alive, so that their id()s stay theirs).
        self._rec = {}
        self._rec_objs = []
        self._rec_touch = 0    # memo hits, to know a value used the memo
        self._next = 0         # the position the next object found gets
        self._pending = collections.deque()
        self._pinned = []      # unsaved objects: their id() keys them
        self._total = hashlib.blake2b(digest_size=32)
        self._probe = False
        self._seen = None      # a _Content while ordering by content
        self._current = None   # the object whose state is being encoded
        # (object, oid) of the object yielded last, for compare() to
        # describe a difference with.
        self._last = None

    def __iter__(self):
        limit = sys.getrecursionlimit()
        if limit < _RECURSION:
            # For the whole walk: setting it for each object costs.
            sys.setrecursionlimit(_RECURSION)
        try:
            yield from self._walk()
        finally:
            if limit < _RECURSION and sys.getrecursionlimit() == _RECURSION:
                sys.setrecursionlimit(limit)

    def _walk(self):
        if self.progress is not None:
            self.progress(0)  # the walk starts now: rates count from here
        self._discover(self.root, "")
        for path, oid, obj in self._order():
            if obj is None:
                obj = self.jar.get(oid)
            was_ghost = obj._p_changed is None
            visit = self._visit(obj, path)
            if was_ghost:
                # Loaded for the walk only: drop the state again, so a long
                # walk does not fill memory (a no-op for changed objects).
                obj._p_deactivate()
            self.objects += 1
            if self.objects % self.gc_every == 0:
                if self.jar is not None:
                    self.jar.cacheGC()
                if self.progress is not None:
                    self.progress(self.objects)
            self._last = (obj, oid)
            yield visit
        self.hexdigest = self._total.hexdigest()
        if self.progress is not None:
            self.progress(self.objects, True)

    def _order(self):
        """The objects to visit, in walk order: by position, except the
        members of a group of tied set members (see _canonical), which
        wait until nothing else does, and then come in the order their
        slots were handed out.  Which member the walk visits first would
        otherwise be arbitrary, and its visit hand out slots."""
        pending = self._pending
        while True:
            while pending:
                entry = pending.popleft()
                grouped = self._groups.get(
                    self._index[entry[1]]) if self._groups else None
                if grouped is None:
                    yield entry
                else:
                    self._defer(grouped, entry)
            member = self._next_deferred()
            if member is None:
                return
            for j in sorted(member):
                yield member[j]

    def _defer(self, grouped, entry):
        group, member, j = grouped
        objects = self._deferred.get((group, member))
        if objects is None:
            objects = self._deferred[group, member] = {}
        objects[j] = entry

    def _next_deferred(self):
        """The objects of the next group member to visit, or None."""
        while self._ready:
            _, group, member = heapq.heappop(self._ready)
            objects = self._deferred.pop((group, member), None)
            if objects is not None:
                return objects
        # Every member waiting lacks a slot: one has to be taken first.
        while True:
            while self._sources:
                key = self._sources.pop()
                if key in self._deferred and key not in self._slots:
                    self._assign(*key)
                    return self._deferred.pop(key)
            if not self._deferred:
                return None
            self._sources = self._find_sources()

    def _find_sources(self):
        """The order to take the members waiting in (the first last).

        Which member of a group the walk takes first is arbitrary, and
        may decide which of the others is which (by the slots its
        references hand out).  So members are told apart further by how
        they refer to each other, and to members with slots (refining
        colours until they are stable, as graph canonization does): those
        that meet no other member waiting come first, then the first of
        the rest, after which the order is decided again.
        """
        keys = list(self._deferred)
        waiting = set(keys)
        out, into, colour = {}, {key: [] for key in keys}, {}
        for key in keys:
            found = self._group_references(self._deferred[key])
            slotted = sorted((g, self._slots[g, m]) for g, m in found
                             if (g, m) in self._slots)
            colour[key] = (key[0], key in found, tuple(slotted))
            out[key] = [x for x in found if x in waiting and x != key]
            for x in out[key]:
                into[x].append(key)
        distinct = len(set(colour.values()))
        for _ in keys:
            refined = {key: (colour[key],
                             tuple(sorted(colour[x] for x in out[key])),
                             tuple(sorted(colour[x] for x in into[key])))
                       for key in keys}
            rank = {v: i for i, v in enumerate(sorted(set(refined.values())))}
            colour = {key: rank[refined[key]] for key in keys}
            if len(rank) == distinct:
                break
            distinct = len(rank)
        alone = sorted((colour[key], key) for key in keys
                       if not out[key] and not into[key])
        linked = [(colour[key], key) for key in keys
                  if out[key] or into[key]]
        order = [key for _, key in alone]
        if linked:
            order.append(min(linked)[1])
        order.reverse()
        return order

    def _group_references(self, objects):
        """The (group, member) that the states of ``objects`` refer to."""
        found = self._collect = set()
        self._probe = True
        try:
            for path, key, obj in objects.values():
                if obj is None:
                    obj = self.jar.get(key)
                was_ghost = obj._p_changed is None
                self._encode_guarded(obj, path, [], _NoHash)
                if was_ghost:
                    obj._p_deactivate()
        finally:
            self._probe = False
            self._collect = None
        return found

    def _assign(self, group, member):
        slot = self._slots[group, member] = self._free_slot.get(group, 0)
        self._free_slot[group] = slot + 1
        heapq.heappush(self._ready, (self._assigned, group, member))
        self._assigned += 1
        return slot

    def digest(self):
        """Walk everything; return the :class:`Digest`."""
        for _ in self:
            pass
        return Digest(self.hexdigest, self.objects)

    # -- naming objects --------------------------------------------------

    def _key(self, obj):
        oid = obj._p_oid
        if oid is not None and obj._p_jar is self.jar:
            return oid
        return ("unsaved", id(obj))

    def _discover(self, obj, path):
        """Give ``obj`` the next position unless it has one; return it."""
        key = self._key(obj)
        known = self._index.get(key)
        if known is not None:
            return known
        if self._probe:
            return None
        index = self._index[key] = self._next
        self._next += 1
        self._paths.append(path)
        if (type(key) is bytes and obj._p_changed is not True
                and len(self._pending) >= PENDING_OBJECTS):
            # Saved and unchanged, and many objects wait already: get it
            # again by oid when its turn comes rather than keep it.  (That
            # costs a second load: ZODB reads a record to make a ghost.)
            self._pending.append((path, key, None))
        else:
            if type(key) is tuple:
                self._pinned.append(obj)  # so that its id() stays its own
            self._pending.append((path, key, obj))
        return index

    # -- hashing one object ----------------------------------------------

    def _visit(self, obj, path):
        name = _class_name(type(obj))
        h = hashlib.blake2b(digest_size=32)
        parts = [b"C", name.encode("utf-8"), b";"]
        self._encode_guarded(obj, path, parts, h)
        h.update(b"".join(parts))
        digest = h.digest()
        # Positions are implicit in the order: the sequence of the
        # objects' hashes is the whole state.
        self._total.update(digest)
        return ObjectDigest(path or "/", name, digest.hex())

    def _encode_guarded(self, obj, path, parts, h):
        """_encode_object(), with errors users can meet made clear."""
        name = _class_name(type(obj))
        self._current = obj
        self._rec, self._rec_objs = {}, []
        try:
            self._encode_object(obj, path, parts, h)
        except DigestError:
            raise
        except POSKeyError as e:
            raise DigestError(
                "cannot digest the %s at %s: it, or an object its state"
                " refers to, is missing from the database (a dangling"
                " reference: POSKeyError %s)" % (name, path or "/", e)
            ) from e
        except RecursionError:
            # Not a cycle: repeated plain values are hashed as references
            # back, persistent ones by position.
            raise DigestError(
                "the state of %s at %s is nested too deeply to digest: plain"
                " (not persistent) values nested more than about %d levels,"
                " or a chain of that many persistent objects read to order a"
                " set" % (name, path or "/", _RECURSION // 5)) from None
        finally:
            self._current = None
            self._rec, self._rec_objs = {}, []

    def _encode_object(self, obj, path, parts, h):
        obj._p_activate()
        if _is_tree(obj):
            self._encode_tree(obj, path, parts, h)
            return
        state = obj.__getstate__()
        if isinstance(obj, _MAPPINGS) and type(state) is dict:
            data = state.get("data")
            if obj is self.root and self.exclude and isinstance(data, dict):
                data = {k: v for k, v in data.items() if k not in self.exclude}
            rest = {k: v for k, v in state.items() if k != "data"}
            parts.append(b"M")
            self._encode(data, path, _HERE, parts)
            self._encode_dict(rest, path + "/@", parts)
        elif isinstance(obj, _LISTS) and type(state) is dict:
            rest = {k: v for k, v in state.items() if k != "data"}
            parts.append(b"L")
            self._encode(state.get("data"), path, _HERE, parts)
            self._encode_dict(rest, path + "/@", parts)
        else:
            self._encode(state, path, _HERE, parts)

    def _encode_tree(self, tree, path, parts, h):
        mapping = IDictionaryIsh.providedBy(tree)
        parts.append(b"B" if mapping else b"S")
        # A large tree is one object of the walk but many buckets: trim
        # the cache as the walk goes through it, or every bucket (and the
        # ghost of every object its values refer to) stays loaded until
        # the whole tree is hashed.  Only at the top of a visit: there no
        # state of another object is being read.
        top = (tree is self._current and self._seen is None
               and not self._probe)
        step = self.gc_every
        if mapping:
            for n, (key, value) in enumerate(tree.items(), 1):
                if self._rec_objs:
                    # A tree is pickled bucket by bucket, and its buckets
                    # are not part of the state: sharing counts within one
                    # item only.
                    self._rec, self._rec_objs = {}, []
                if type(key) is str or _shown(key):
                    self._encode(key, path, _KEY, parts)
                    at = key
                else:
                    encoded = self._bytes(key, path, _KEY)
                    parts.append(encoded)
                    at = _value_step(key, encoded)
                self._encode(value, path, at, parts)
                if len(parts) > 4096:
                    h.update(b"".join(parts))
                    del parts[:]
                if top and n % step == 0:
                    self._inside_tree(n)
        else:
            for n, key in enumerate(tree.keys(), 1):
                if self._rec_objs:
                    self._rec, self._rec_objs = {}, []
                self._encode(key, path, _KEY, parts)
                if len(parts) > 4096:
                    h.update(b"".join(parts))
                    del parts[:]
                if top and n % step == 0:
                    self._inside_tree(n)
        parts.append(b"E")

    def _inside_tree(self, items):
        """Every ``gc_every`` items of a tree being visited: trim the
        cache, and report progress every ``TREE_PROGRESS`` items."""
        if self.jar is not None:
            self.jar.cacheGC()
        if self.progress is not None and items % TREE_PROGRESS == 0:
            self.progress(self.objects, items=items)

    # -- the canonical encoding ------------------------------------------

    def _encode(self, value, base, step, parts):
        """Append the canonical encoding of ``value`` to ``parts``.

        ``value`` is found at ``step`` (a key, an attribute, an index) of
        ``base``; the path is built only if a persistent object needs it.
        """
        t = type(value)
        if t is str:
            data = value.encode("utf-8", "surrogatepass")
            parts.append(b"s%d:" % len(data))
            parts.append(data)
        elif t is int:
            parts.append(b"i%d;" % value)
        elif value is None:
            parts.append(b"N")
        elif t is bool:
            parts.append(b"T" if value else b"F")
        elif t is float:
            parts.append(b"f%s;" % value.hex().encode("ascii"))
        elif t is bytes:
            parts.append(b"b%d:" % len(value))
            parts.append(value)
        elif t is tuple or t is list:
            if t is list and self._repeated(value, parts):
                return
            here = _at(base, step)
            parts.append(b"(" if t is tuple else b"[")
            for i, item in enumerate(value):
                self._encode(item, here, i, parts)
            parts.append(b")" if t is tuple else b"]")
        elif t is dict:
            # (_repeated(), inlined: most objects' state is a dict)
            seen = self._rec.get(id(value))
            if seen is not None:
                self._rec_touch += 1
                parts.append(b"&%d;" % seen)
                return
            self._rec[id(value)] = len(self._rec_objs)
            self._rec_objs.append(value)
            self._encode_dict(value, _at(base, step), parts)
        elif t is set or t is frozenset:
            if t is set and self._repeated(value, parts):
                return
            here = _at(base, step)
            parts.append(b"<" if t is set else b"f<")
            for item, _, _ in self._canonical(
                    [(m, _NOVALUE) for m in value], value, here, "{%d}"):
                parts.append(b"%d:" % len(item))
                parts.append(item)
            parts.append(b">")
        elif isinstance(value, persistent.Persistent):
            self._encode_reference(value, _at(base, step), parts)
        elif isinstance(value, persistent.wref.WeakRef):
            target = value()
            parts.append(b"W")
            if target is None:
                parts.append(b"N")
            else:
                self._encode_reference(target, _at(base, step), parts)
        elif isinstance(value, type) or _is_global(value):
            parts.append(b"g%s;" % _class_name(value).encode("utf-8"))
        elif not self._repeated(value, parts):
            self._encode_reduced(value, base, step, parts)

    def _repeated(self, value, parts):
        """Whether ``value`` was met before in this record: then it is
        hashed as a reference back to that, as pickle does within a
        record (which keeps sharing, and cycles, of plain values)."""
        seen = self._rec.get(id(value))
        if seen is not None:
            self._rec_touch += 1
            parts.append(b"&%d;" % seen)
            return True
        self._rec[id(value)] = len(self._rec_objs)
        self._rec_objs.append(value)
        return False

    def _rec_undo(self, mark):
        objs = self._rec_objs
        for value in objs[mark:]:
            del self._rec[id(value)]
        del objs[mark:]

    def _encode_dict(self, value, here, parts):
        keyed = []
        others = []
        for key in value:
            if type(key) is str:  # most keys: attribute names
                data = key.encode("utf-8", "surrogatepass")
                keyed.append((b"s%d:%s" % (len(data), data), key))
            else:
                others.append((key, value[key]))
        keyed.sort(key=_first)
        parts.append(b"{")
        for encoded, key in keyed:
            parts.append(b"%d:" % len(encoded))
            parts.append(encoded)
            self._encode(value[key], here, key, parts)
        # Then the other keys, ordered with their values (their encoding
        # can depend on the order they are met in).
        for encoded, encoded_value, key in (self._canonical(
                others, value, here, "{key %d}") if others else ()):
            parts.append(b"%d:" % len(encoded))
            parts.append(encoded)
            parts.append(encoded_value)
        parts.append(b"}")

    def _canonical(self, members, container, here, label):
        """``[(member encoding, value encoding, member)]`` of set members
        (``members`` of ``(member, _NOVALUE)``) or dict items (``(key,
        value)``), in canonical order.

        Members that hold persistent objects the walk has not reached
        would be numbered in the order Python iterates them (by ``id()``
        or oid): they are sorted by a hash of their content first (a
        key's with its value's; each member read on its own), and
        numbered in that order.  Members whose content ties are one
        group: which of them a reference elsewhere names is hashed by the
        group's slot the first reference to it got (see
        _encode_reference), not by their arbitrary order here.
        """
        outer = self._seen
        ctx = outer if outer is not None else _Content()
        self._seen = ctx
        rec_mark = len(self._rec_objs)
        try:
            keyed = []
            for member, value in members:
                met, touch, rec_touch = ctx.met, ctx.touch, self._rec_touch
                mark = len(ctx.order)
                key_bytes = self._bytes(member, here, _HERE)
                value_bytes = None if value is _NOVALUE else self._bytes(
                    value, here, _HERE)
                # Read on its own: what it met is forgotten again, so that
                # the order members are read in does not matter.
                touched = (ctx.touch != touch
                           or self._rec_touch != rec_touch)
                if len(ctx.order) != mark:
                    ctx.undo(mark)
                if len(self._rec_objs) != rec_mark:
                    self._rec_undo(rec_mark)
                    touched = True
                keyed.append((key_bytes, value_bytes or b"",
                              ctx.met != met, touched, member, value,
                              value_bytes))
        finally:
            self._seen = outer
        keyed.sort(key=_sort_pair)
        result = []
        if outer is not None or self._probe:
            # Inside the content of a member: read again in order, where
            # sharing with an earlier sibling shows.
            self._seen = ctx if outer is not None else None
            for key_bytes, _, _, touched, member, value, value_bytes in (
                    keyed):
                if touched and outer is not None:
                    key_bytes = self._bytes(member, here, _HERE)
                    if value is not _NOVALUE:
                        value_bytes = self._bytes(value, here, _HERE)
                result.append((key_bytes, value_bytes, member))
            self._seen = outer
            return result
        i = 0
        while i < len(keyed):
            key_bytes, _, expanded, touched, member, value, value_bytes = (
                keyed[i])
            if not expanded:
                if touched:
                    key_bytes = self._bytes(member, here, _HERE)
                    if value is not _NOVALUE:
                        value_bytes = self._bytes(value, here, _HERE)
                result.append((key_bytes, value_bytes, member))
                i += 1
                continue
            end = i + 1
            while (end < len(keyed) and keyed[end][2]
                   and keyed[end][:2] == keyed[i][:2]):
                end += 1
            if end == i + 1:
                result.append(self._encode_member(member, value, here,
                                                  label, i) + (member,))
                i += 1
                continue
            result.extend(self._encode_group(keyed[i:end], here, label, i))
            i = end
        return result

    def _encode_group(self, run, here, label, start):
        """Members whose content ties: give their objects positions, and
        make them one group if each member holds as many."""
        mark = len(self._rec_objs)
        firsts, counts, encoded = [], [], []
        self._hold = True
        try:
            for n, (_, _, _, _, member, value, _) in enumerate(run):
                firsts.append(self._next)
                encoded.append(self._encode_member(
                    member, value, here, label, start + n) + (member,))
                counts.append(self._next - firsts[-1])
            count = counts[0]
            if count == 0 or any(c != count for c in counts):
                # Not a true tie (a member holds an object another one
                # gave a position to): positions name objects uniquely.
                return encoded
            group = firsts[0]
            for m, first in enumerate(firsts):
                for j in range(count):
                    self._groups[first + j] = (group, m, j)
            self._rec_undo(mark)
            listed = []
            for n, (_, _, _, _, member, value, _) in enumerate(run):
                self._linking = (group, n)
                listed.append(self._encode_member(
                    member, value, here, label, start + n) + (member,))
            return listed
        finally:
            self._hold = False
            self._linking = None

    def _encode_member(self, member, value, here, label, i):
        encoded = self._bytes(member, here, _Label(label % i))
        if value is _NOVALUE:
            return encoded, None
        return encoded, self._bytes(value, here, _value_step(member,
                                                             encoded))

    def _encode_reference(self, obj, path, parts):
        key = self._key(obj)
        index = self._index.get(key)
        if index is None:
            if self._seen is not None:
                self._encode_content(obj, key, path, parts)
                return
            index = self._discover(obj, path)
            if index is None:  # a probe met an object not walked yet
                parts.append(b"?%s;" % _class_name(type(obj)).encode(
                    "utf-8"))
                return
        grouped = self._groups.get(index) if self._groups else None
        if grouped is None:
            parts.append(b"@%d;" % index)
            return
        group, member, j = grouped
        if self._collect is not None:
            self._collect.add((group, member))
        slot = self._slots.get((group, member))
        if slot is None:
            ctx = self._seen
            if ctx is not None:
                # Read for content, in an order not final yet: which
                # member, as how far back the read met it first.
                back = ctx.meet(("group", group, member))
                parts.append(b"@%d%s:%d;" % (group, back or b"*", j))
                return
            if self._hold or self._probe:
                linking = self._linking
                if linking is not None and linking[0] != group:
                    self._links.setdefault(linking, []).append(
                        (group, member))
                    self._links.setdefault((group, member), []).append(
                        linking)
                parts.append(b"@%d?:%d;" % (group, j))
                return
            slot = self._assign(group, member)
            links = self._links.get((group, member))
            if links:
                # Which members it was listed with, as far as they have
                # slots: the pairing the listing could not show.
                parts.append(b"%r" % sorted(
                    (k[0], self._slots[k]) for k in links
                    if k in self._slots))
        parts.append(b"@%d.%d:%d;" % (group, slot, j))

    def _encode_content(self, obj, key, path, parts):
        """An object the walk has not reached, by its content, read depth
        first.  An object met again in the same read (a cycle back, or
        shared) is hashed as how far back in the read it was met first,
        which depends only on the content read so far, so sets met on the
        way can be ordered by content too.  The hash of an object whose
        content refers to no other object not walked yet is the same
        wherever it is met, and is kept."""
        ctx = self._seen
        ctx.met += 1
        back = ctx.meet(key)
        if back is not None:
            parts.append(back)
            return
        known = ctx.memo.get(key)
        if known is not None:
            parts.append(known)
            return
        ctx.read += 1
        if ctx.read > CONTENT_OBJECTS:
            raise DigestError(
                "cannot digest %s (in %s): to order the persistent objects"
                " of a set or of dict keys canonically, their content is"
                " hashed, and this needs more than %d objects not walked"
                " yet (CONTENT_OBJECTS)" % (
                    path or "/", _class_name(type(self._current)),
                    CONTENT_OBJECTS))
        touch = ctx.touch
        was_ghost = obj._p_changed is None
        name = _class_name(type(obj))
        h = hashlib.blake2b(digest_size=32)
        inner = [b"C", name.encode("utf-8"), b";"]
        rec = self._rec, self._rec_objs, self._rec_touch
        self._rec, self._rec_objs = {}, []   # a record of its own
        try:
            self._encode_object(obj, path, inner, h)
        finally:
            self._rec, self._rec_objs, self._rec_touch = rec
        if was_ghost:
            obj._p_deactivate()
        h.update(b"".join(inner))
        encoded = b"c%s;" % h.hexdigest().encode("ascii")
        if ctx.touch == touch:
            # It met nothing of the read (only objects walked already):
            # the same hash anywhere.
            ctx.memo[key] = encoded
        parts.append(encoded)

    def _encode_reduced(self, value, base, step, parts):
        """Any other object, by what it pickles as: like pickle, the
        reducer ``copyreg`` registers for its type first."""
        try:
            reducer = copyreg.dispatch_table.get(type(value))
            if reducer is not None:
                reduced = reducer(value)
            else:
                reduced = value.__reduce_ex__(2)
        except Exception as e:
            raise DigestError(
                "cannot digest the %s found in %s at %s: it does not pickle"
                " (%s: %s)" % (_class_name(type(value)),
                               _class_name(type(self._current)),
                               _at(base, step) or "/", type(e).__name__,
                               e)) from e
        if isinstance(reduced, str):
            parts.append(b"g%s.%s;" % (
                getattr(value, "__module__", "?").encode("utf-8"),
                reduced.encode("utf-8")))
            return
        here = _at(base, step)
        func, args = reduced[0], reduced[1]
        rest = tuple(reduced[2:]) + (None,) * (5 - len(reduced))
        state, listitems, dictitems = rest[0], rest[1], rest[2]
        parts.append(b"R")
        if func is copyreg.__newobj__ and args:
            parts.append(b"g%s;" % _class_name(args[0]).encode("utf-8"))
            args = args[1:]
        else:
            parts.append(b"g%s;" % _class_name(func).encode("utf-8"))
        self._encode(tuple(args), here, _Label("/@args"), parts)
        self._encode(state, here, _HERE, parts)
        self._encode(list(listitems) if listitems is not None else None,
                     here, _HERE, parts)
        if dictitems is None:
            self._encode(None, here, _HERE, parts)
        elif isinstance(value, collections.OrderedDict):
            # Its order is part of its value (OrderedDicts that differ in
            # order are not equal): items as a list, in order.
            parts.append(b"O")
            self._encode([tuple(item) for item in dictitems], here, _HERE,
                         parts)
        else:
            self._encode(dict(dictitems), here, _HERE, parts)

    def _bytes(self, value, base, step):
        parts = []
        self._encode(value, base, step, parts)
        return b"".join(parts)

    # -- describing a difference -----------------------------------------

    def _probe_bytes(self, value):
        """The encoding of a value of an object already walked, without
        naming anything new."""
        self._probe = True
        rec = self._rec, self._rec_objs
        self._rec, self._rec_objs = {}, []
        try:
            return self._bytes(value, "", _HERE)
        finally:
            self._probe = False
            self._rec, self._rec_objs = rec

    def _plain(self, value, depth=0):
        """``value`` with persistent references shown as paths."""
        if depth > 20:
            return "..."
        t = type(value)
        if t in (tuple, list):
            return t(self._plain(v, depth + 1) for v in value)
        if t is dict:
            return {self._plain(k, depth + 1): self._plain(v, depth + 1)
                    for k, v in value.items()}
        if t in (set, frozenset):
            return t(self._plain(v, depth + 1) for v in value)
        if isinstance(value, persistent.Persistent):
            index = self._index.get(self._key(value))
            path = None if index is None else self._paths[index]
            return _Unknown(value) if path is None else _Ref(path)
        return value


class _NoHash:
    """A hash taking nothing, for _encode_tree() when only references
    are looked for."""

    @staticmethod
    def update(data):
        pass


class _Here:
    """The step meaning "the same place as the container"."""

    def __repr__(self):
        return "_HERE"


class _KeyStep:
    """The step of a BTree key."""


class _Label:
    """A step shown as it is: a set member, an object's key."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


_HERE = _Here()
_KEY = _KeyStep()


class _Content:
    """The state of ordering members by content (Walker._canonical)."""

    def __init__(self):
        self.seen = {}    # key -> when the current read met it first
        self.order = []   # those keys, in that order
        self.touch = 0    # meetings, to know whether a read had any
        self.memo = {}    # key -> content hash, of objects that meet
        #                   nothing of the read
        self.met = 0      # references to objects not walked yet
        self.read = 0     # objects read for their content

    def meet(self, key):
        """``None`` the first time the current read meets ``key``, then
        the encoding of how far back that was."""
        self.touch += 1
        first = self.seen.get(key)
        if first is not None:
            return b"^%d;" % (len(self.order) - first)
        self.seen[key] = len(self.order)
        self.order.append(key)
        return None

    def undo(self, mark):
        """Forget what was met since ``len(order)`` was ``mark``."""
        order = self.order
        for key in order[mark:]:
            del self.seen[key]
        del order[mark:]


_first = operator.itemgetter(0)
_sort_pair = operator.itemgetter(0, 1)
_NOVALUE = object()


def _value_step(key, encoded):
    """The step to the value of a key that is not a string."""
    if _shown(key):
        return key
    return _Label("[%s#%s]" % (
        _class_name(type(key)).rpartition(".")[2],
        hashlib.blake2b(encoded, digest_size=4).hexdigest()))


def _at(base, step):
    if step is _HERE:
        return base
    if step is _KEY:
        return base + "/<key>"
    if type(step) is _Label:
        return base + step.text
    return _step(base, step)


def _is_global(value):
    """Functions, builtins and classes pickle by name."""
    return isinstance(value, (type(len), type(_at), type(str.join)))


# -- public entry points ----------------------------------------------------

def state_digest(root, progress=None, exclude=(MARKER_KEY,)):
    """The :class:`Digest` of everything reachable from ``root``.

    ``root`` is a connection's root mapping (``conn.root()``).  The
    marker is left out; ``exclude`` names the root keys to leave out
    instead.  ``progress(objects, done=False)`` is called now and then.
    """
    return Walker(root, progress, exclude).digest()


def compare(live, replayed, progress=None, exclude=(MARKER_KEY,)):
    """Walk two roots side by side; return a :class:`Comparison`.

    Both walks visit objects in the same order for as long as the states
    agree, so the first object whose class or hash differs is the first
    difference in walk order: the shallowest one, near the root.  Both
    walks still run to the end, for their digests.
    """
    a = Walker(live, progress and _Side(progress, "live"), exclude)
    b = Walker(replayed, progress and _Side(progress, "replayed"), exclude)
    difference = None
    ia, ib = iter(a), iter(b)
    while True:
        va = next(ia, None)
        oa = a._last if va is not None else None
        vb = next(ib, None)
        ob = b._last if vb is not None else None
        if va is None and vb is None:
            break
        if difference is None and (va is None or vb is None or (
                va.class_name, va.digest) != (vb.class_name, vb.digest)):
            difference = _difference(a, b, va, vb, oa, ob)
        if va is None:
            for _ in ib:
                pass
            break
        if vb is None:
            for _ in ia:
                pass
            break
    return Comparison(Digest(a.hexdigest, a.objects),
                      Digest(b.hexdigest, b.objects), difference)


class _Side:
    """Progress of one of the two walks of :func:`compare`."""

    def __init__(self, progress, side):
        self.progress = progress
        self.side = side

    def __call__(self, objects, done=False, items=None):
        if self.side == "live":
            if items is None:
                self.progress(objects, done)
            else:
                self.progress(objects, done, items=items)


_SHOW = 160


def _short(value):
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not hide the result
        text = "<%s: repr failed: %s>" % (type(value).__name__, e)
    return text if len(text) <= _SHOW else text[:_SHOW - 3] + "..."


def _difference(a, b, va, vb, oa, ob):
    """Describe the first difference the walks met."""
    path = (va or vb).path
    if va is None or vb is None:
        # Cannot happen while both walks agree (the object count follows
        # from the states), but a description beats an assertion.
        return Difference(path, va and va.class_name, vb and vb.class_name,
                          "", None if va is None else "an object",
                          None if vb is None else "an object")
    obj_a, obj_b = oa[0], ob[0]
    if va.class_name != vb.class_name:
        return Difference(path, va.class_name, vb.class_name, "",
                          _short(a._plain(_state(obj_a))),
                          _short(b._plain(_state(obj_b))))
    detail, left, right = _first_difference(a, b, obj_a, obj_b)
    return Difference(path, va.class_name, vb.class_name, detail, left, right)


def _state(obj):
    obj._p_activate()
    if _is_tree(obj):
        if IDictionaryIsh.providedBy(obj):
            return dict(obj.items()) if len(obj) <= 20 else "<%d items>" % (
                len(obj))
        return sorted(obj.keys())[:20]
    return obj.__getstate__()


_MISSING = object()


def _first_difference(a, b, obj_a, obj_b):
    """(what, live summary, replayed summary) of the first differing part."""
    obj_a._p_activate()
    obj_b._p_activate()
    if _is_tree(obj_a) and _is_tree(obj_b):
        return _tree_difference(a, b, obj_a, obj_b)
    state_a, state_b = obj_a.__getstate__(), obj_b.__getstate__()
    if isinstance(obj_a, _MAPPINGS) and type(state_a) is dict and type(
            state_b) is dict:
        data_a = dict(state_a.get("data") or {})
        data_b = dict(state_b.get("data") or {})
        for key in a.exclude if obj_a is a.root else ():
            data_a.pop(key, None)
            data_b.pop(key, None)
        found = _dict_difference(a, b, data_a, data_b, "key")
        if found is not None:
            return found
    if type(state_a) is dict and type(state_b) is dict:
        found = _dict_difference(a, b, state_a, state_b, "attribute")
        if found is not None:
            return found
    return ("", _short(a._plain(state_a)), _short(b._plain(state_b)))


def _dict_difference(a, b, da, db, kind):
    keys = sorted(set(da) | set(db), key=lambda k: a._probe_bytes(k))
    for key in keys:
        va, vb = da.get(key, _MISSING), db.get(key, _MISSING)
        if va is _MISSING or vb is _MISSING or (
                a._probe_bytes(va) != b._probe_bytes(vb)):
            return ("%s %s" % (kind, _short(key)),
                    None if va is _MISSING else _short(a._plain(va)),
                    None if vb is _MISSING else _short(b._plain(vb)))
    return None


def _tree_difference(a, b, ta, tb):
    mapping = IDictionaryIsh.providedBy(ta) and IDictionaryIsh.providedBy(tb)
    ia = iter(ta.items() if mapping else ((k, None) for k in ta.keys()))
    ib = iter(tb.items() if mapping else ((k, None) for k in tb.keys()))
    end = (_MISSING, None)
    while True:
        ka, va = next(ia, end)
        kb, vb = next(ib, end)
        if ka is _MISSING and kb is _MISSING:
            return ("", "%d items" % len(ta), "%d items" % len(tb))
        same_key = (ka is not _MISSING and kb is not _MISSING
                    and a._probe_bytes(ka) == b._probe_bytes(kb))
        if same_key:
            if a._probe_bytes(va) != b._probe_bytes(vb):
                return ("key %s" % _short(ka), _short(a._plain(va)),
                        _short(b._plain(vb)))
            continue
        # The first key only one side has: the smaller of the two.
        if kb is _MISSING or (ka is not _MISSING and _before(ka, kb)):
            return ("key %s" % _short(ka),
                    _short(a._plain(va)) if mapping else "present", None)
        return ("key %s" % _short(kb), None,
                _short(b._plain(vb)) if mapping else "present")


def _before(x, y):
    try:
        return x < y
    except TypeError:
        return repr(x) < repr(y)


# -- digests recorded in the journal ---------------------------------------

DIGEST_COMMAND = "zjournal.state-digest"


class StateDigest(Command):
    """A journal entry recording the digest of the state after seq
    ``after``, written by ``JournaledDB(digest_interval=N)``.

    It changes nothing, and is journaled flagged as a query
    (:func:`journal_entry`), so replay passes over it and a journal with
    digests rebuilds like any other; ``zodb-journal check-replay`` reads
    them from the journal and compares each one with the digest of the
    state its replay has reached at that point.
    """

    command_name = DIGEST_COMMAND

    def __init__(self, after, digest, objects, scheme=SCHEME):
        self.after = after
        self.digest = digest
        self.objects = objects
        self.scheme = scheme

    def execute(self, root, context):
        return None


def record(root, after):
    """A :class:`StateDigest` of ``root``'s state, to journal after seq
    ``after``."""
    result = state_digest(root)
    return StateDigest(after, result.hexdigest, result.objects)


def journal_entry(root, after):
    """The journal record of the digest of ``root``'s state after seq
    ``after``, as ``JournaledDB`` queues it: ``(seq, time, version, name,
    payload, flags, metadata)``; or None when no digest can be made.

    A digest is a diagnostic: whatever stops one (a value that does not
    pickle, a dangling reference, a bug here) is logged and that digest
    skipped, never raised into the command that happened to come at a
    multiple of ``digest_interval``.  The record is flagged as a query,
    since it changes nothing: replay, statistics and older zjournal
    versions pass over it as they pass over journaled queries.
    """
    began = time.perf_counter()
    try:
        entry = record(root, after)
        name, version, payload = commands.encode(entry)
    except Exception as e:
        logger.warning("no state digest after seq %d: %s: %s", after,
                       type(e).__name__, e)
        logger.debug("the digest after seq %d failed", after, exc_info=True)
        return None
    logger.debug("state digest after seq %d: %s (%d objects, %.3fs)",
                 after, entry.digest, entry.objects,
                 time.perf_counter() - began)
    return (after + 1, time.time(), version, name, payload, FLAG_QUERY, None)
