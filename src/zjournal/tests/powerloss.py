"""A simulated disk for power-loss tests, and a workload to run on it.

The crash tests of ``test_crash`` kill a process: everything it wrote is
still in the page cache, so they cannot tell an fsync from no fsync.
This module simulates the machine losing power instead.  Nothing is
really lost; the model decides what the disk would hold.

:class:`SimulatedDisk` is a :class:`zjournal.journal.FileIO` (pass it as
``FileJournal(path, io=disk)``): every call really happens, so the
journal runs against real files, and it also records what is *durable*:

* per file (an inode: the object survives a rename), the content as of
  its last ``sync``, and the writes and truncations made since, in order;
* per directory, the names durable as of its last ``sync_dir``, and the
  creations, renames and removals made since, in order.

:meth:`SimulatedDisk.power_off` stops the machine: every later call that
would change a byte raises :class:`PowerLoss`.  ``arm()`` makes a chosen
call do that by itself, before or after the call takes effect, which
stops a workload abruptly at any point of the commit protocol.  Once the
process under test has let go of its files (closing changes no bytes),
:meth:`SimulatedDisk.crash` rewrites the real files to a state that the
power loss could have left, and the test reopens them with the ordinary
``FileIO``, as a rebooted machine would.

The model of what survives
--------------------------

File data (``data=`` of :meth:`~SimulatedDisk.crash`):

* what was synced survives, byte for byte (fsync/fdatasync returned);
* of the unsynced changes, a prefix in call order survives, possibly
  ending inside one write: ``"lose"`` keeps none, ``"all"`` keeps all,
  ``"prefix"`` a random prefix.  Writeback need not follow call order
  across pages; a disk that persists a later page and not an earlier one
  is left out (``sector`` and ``torn`` below cover the damage that
  matters to a reader: an invalid end);
* ``"sector"`` (a random prefix) and ``"torn"`` (all of it) then replace
  the part of the last 512-byte sector that was not synced with zeros or
  garbage (``fill=``): the file size reached the disk but that sector's
  data did not (ext4 ``data=writeback`` and XFS show stale blocks or
  zeros; a drive without atomic sector writes tears one).  Synced bytes
  sharing that sector keep their values: rewriting them writes the same
  values, and a sector that was not rewritten still holds them;
* ``"mixed"`` picks one of the five per file.

A truncation is one of those ordered changes: lost or kept as a whole.

Directories (``SimulatedDisk(model=...)`` and ``dirs=`` of ``crash``):

* ``model="posix"``: a creation, rename or removal is durable once its
  directory is synced; of the operations since, each directory keeps a
  prefix (a rename is atomic: the old name or the new, never both or
  neither).  Syncing a file does not make its name durable.  This is all
  POSIX promises, and what the fsync-the-directory rule assumes;
* ``model="ext4"``: metadata goes through one ordered journal and any
  fsync or fdatasync that commits it (any sync here) makes every earlier
  directory operation durable, in all directories; the operations since
  the last sync survive as one global prefix.  This is ext4's
  ``data=ordered`` default without ``fast_commit``;
* ``dirs="random"`` draws the prefix; ``"undo"`` keeps no unsynced
  operation; ``"keep"`` keeps them all.

A file created with ``create`` whose name is undone disappears; a rename
that is undone leaves the file under its old name (with its data: the
data follows the inode).  A directory made with ``mkdir`` -- or outside
``FileIO`` (``os.makedirs``) inside a directory given to
:meth:`~SimulatedDisk.watch`, which the disk notices when it is first
used or when the parent is synced -- is durable only once its parent is
synced (under ``ext4``: once anything is synced); if undone, it
disappears with everything in it.

Only names that went through the disk are tracked.  A file first touched
by the disk (a segment from an earlier session) is taken as durable with
the content it has then: after a reboot, what is on disk is durable.
Files the disk never sees (``journal.lock``, ``Data.fs``) are not touched
by ``crash``, except Data.fs through :class:`FileStorageModel`.

The ZODB side
-------------

FileStorage does not write through ``FileIO``.  :class:`FileStorageModel`
models it simply: FileStorage fsyncs the file in ``tpc_finish``, so the
size after the last ``tpc_finish`` that returned before the power loss is
durable (wrapping the storage's ``_finish``), and what it had written
beyond that (the vote of the transaction in progress, status ``c``) is
unsynced data of which a prefix survives, as with a journal file, but
never a damaged sector: ZODB 6.4's FileStorage fails to open a file
whose unfinished last transaction begins with zeros or garbage, a
FileStorage limit outside zjournal's reach.  ``Data.fs.index`` (written
at close, never synced) is put back as it was when the power went out.
The directory entry of ``Data.fs`` is assumed durable (FileStorage never
syncs its directory, which is FileStorage's business).

Limits: no reordering of unsynced writes across pages beyond the last
sector; no bit rot in synced data (``test_journal`` covers corruption);
no lying fsync; no model of the lock files; one process.

The workload
------------

:class:`Workload` runs a random mix of steps on a :class:`JournaledDB`
(``execute`` of Increment, Put, Stamp; multi-command transactions;
aborted blocks; failing commands; savepoints rolled back; conflicts: a
command that, while it executes, has another connection commit a change
to the object it writes, so that ``execute`` retries it -- an
unjournaled commit, so the JournaledDB must allow them)
and records in a :class:`Session` which transactions were acknowledged
(``execute`` or the ``with`` block returned), with the seqs and results
seen, and which one was being committed when the power went out (in
doubt: it may or may not be in the journal).
"""
import os
import shutil

import transaction

import zjournal
from zjournal import Command
from zjournal.journal import FileIO
from zjournal.tests.examples import Fail
from zjournal.tests.examples import Increment
from zjournal.tests.examples import Put
from zjournal.tests.examples import Stamp

SECTOR = 512
DATA_MODES = ("lose", "prefix", "all", "sector", "torn")
DIR_MODES = ("random", "undo", "keep")
MODELS = ("posix", "ext4")

# Every command a step abandons writes a table key containing this, or
# the counter of this name.  None may ever appear anywhere.
ABORTED = "aborted"


class PowerLoss(BaseException):
    """The machine lost power at this call.

    A BaseException, so that no ``except Exception`` in the code under
    test treats it as an I/O error it could handle: the process stops.
    """


# -- the disk model -------------------------------------------------------

class _Inode:
    """A file's durable content and its unsynced changes, in order."""

    __slots__ = ("durable", "ops", "label")

    def __init__(self, durable, label):
        self.durable = durable
        self.ops = []  # ("append", bytes) | ("truncate", size)
        self.label = label

    def current(self):
        return _apply_file_ops(self.durable, self.ops)

    def commit(self):
        self.durable = self.current()
        self.ops = []


def _apply_file_ops(data, ops):
    for kind, arg in ops:
        if kind == "append":
            data += arg
        else:
            data = data[:arg] + b"\0" * max(0, arg - len(data))
    return data


class _DirNode:
    """A directory entry that is itself a directory."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path


class _Dir:
    __slots__ = ("path", "durable", "current", "snapshot")

    def __init__(self, path):
        self.path = path
        self.durable = {}   # name -> _Inode | _DirNode, as of sync_dir
        self.current = {}   # the same, now
        self.snapshot = None  # names present when watched


def _apply_dir_op(entries, op):
    kind = op[0]
    if kind == "link":
        entries[op[1]] = op[2]
    elif kind == "unlink":
        entries.pop(op[1], None)
    elif kind == "rename":
        entries[op[2]] = entries.pop(op[1])
    else:  # pragma: no cover
        raise ValueError(op)


def _common_prefix(a, b):
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def survivor(durable, ops, rng, data, fill):
    """What a file holds after the power loss; returns (bytes, note)."""
    if not ops:
        return durable, "synced"
    if data == "mixed":
        data = rng.choice(DATA_MODES)
    if data == "lose":
        return durable, "lose: %d synced bytes" % len(durable)
    if data in ("all", "torn"):
        kept = _apply_file_ops(durable, ops)
    elif data in ("prefix", "sector"):
        j = rng.randrange(len(ops) + 1)
        kept = _apply_file_ops(durable, ops[:j])
        if j < len(ops) and ops[j][0] == "append":
            chunk = ops[j][1]
            kept += chunk[:rng.randint(0, len(chunk))]
    else:
        raise ValueError("unknown data mode %r" % data)
    note = "%s: %d synced, %d kept" % (data, len(durable), len(kept))
    if data in ("sector", "torn"):
        safe = _common_prefix(durable, kept)
        start = max(safe, (len(kept) - 1) // SECTOR * SECTOR)
        if start < len(kept):
            how = fill if fill != "random" else rng.choice(
                ("zeros", "garbage"))
            n = len(kept) - start
            junk = b"\0" * n if how == "zeros" else rng.randbytes(n)
            kept = kept[:start] + junk
            note += ", %s in %d..%d" % (how, start, len(kept))
    return kept, note


class SimulatedDisk(FileIO):
    """A FileIO that knows what a power loss would leave on disk.

    ``model`` is ``"posix"`` or ``"ext4"`` (see the module docstring).
    ``real_sync=False`` skips the real fsync calls: the model decides what
    is durable, the real disk never loses power, and an fsync costs
    milliseconds.
    """

    def __init__(self, model="posix", real_sync=True):
        if model not in MODELS:
            raise ValueError("model must be one of %s" % (MODELS,))
        self.model = model
        self.real_sync = real_sync
        self.dead = False
        self.points = 0          # crash points passed
        self.trace = []          # (op, when, name) of every point
        self.crashed_at = None   # the point that lost power, if one did
        self._dirs = {}          # path -> _Dir
        self._fds = {}           # fd -> _Inode
        self._dirops = []        # unsynced (_Dir, op), in call order
        self._externals = []     # FileStorageModel and the like
        self._watched = []       # paths given to watch()
        self._arm = None

    # -- arming --------------------------------------------------------

    def arm(self, at=None, match=None, nth=1):
        """Lose power at a crash point.

        Every call that changes bytes passes two points, ``"before"`` it
        takes effect and ``"after"``: ``create`` (the open that makes
        the file; its write and sync are points of their own), ``write``,
        ``sync``, ``sync_dir``, ``truncate``, ``rename``, ``remove``,
        ``mkdir``.
        ``at=k`` loses power at the k-th point from now;
        ``match(op, when, name)`` (``name`` is the file's or directory's
        base name) with ``nth`` at the nth point it accepts.
        """
        if at is not None:
            target = self.points + at
            self._arm = lambda op, when, name: self.points == target
        elif match is not None:
            seen = [0]

            def fire(op, when, name):
                if match(op, when, name):
                    seen[0] += 1
                    return seen[0] == nth
                return False
            self._arm = fire
        else:
            self._arm = None

    def _point(self, op, when, path):
        if self.dead:
            raise PowerLoss("the power is off (%s %s %s)" % (op, when, path))
        self.points += 1
        name = os.path.basename(path)
        self.trace.append((op, when, name))
        if self._arm is not None and self._arm(op, when, name):
            self._arm = None
            self.crashed_at = (op, when, name)
            self.power_off()
            raise PowerLoss("power lost %s %s of %s (point %d)"
                            % (when, op, name, self.points))

    def power_off(self):
        """Stop the machine: no byte changes from now on.  Idempotent."""
        if not self.dead:
            self.dead = True
            for ext in self._externals:
                ext.power_off()

    # -- the model's bookkeeping ---------------------------------------

    def watch(self, path):
        """Treat directories created later below ``path`` as unsynced.

        For directories made outside ``FileIO``: the disk notices one
        when it is first used, or when its parent is synced.
        """
        d = self._dir(path)
        self._watched.append(d.path)
        d.snapshot = set(os.listdir(d.path))
        for name in d.snapshot:
            full = os.path.join(d.path, name)
            if os.path.isdir(full) and name not in d.current:
                d.durable[name] = d.current[name] = _DirNode(full)

    def _dir(self, path):
        path = os.path.abspath(path)
        d = self._dirs.get(path)
        if d is not None:
            return d
        d = self._dirs[path] = _Dir(path)
        parent_path = os.path.dirname(path)
        if parent_path != path and any(
                parent_path == w or parent_path.startswith(w + os.sep)
                for w in self._watched):
            parent = self._dir(parent_path)
        else:
            parent = self._dirs.get(parent_path)
        name = os.path.basename(path)
        if (parent is not None and parent.snapshot is not None
                and name not in parent.current):
            node = _DirNode(path)
            if name in parent.snapshot:
                parent.durable[name] = parent.current[name] = node
            else:
                # Made by os.makedirs, which the disk does not see: as
                # unsynced as any creation, and so is all it holds.
                self._dir_op(parent, ("link", name, node))
                d.snapshot = set()
        return d

    def _dir_op(self, d, op):
        _apply_dir_op(d.current, op)
        self._dirops.append((d, op))

    def _lookup(self, path):
        """The inode at ``path``, registering a pre-existing file."""
        d = self._dir(os.path.dirname(os.path.abspath(path)))
        name = os.path.basename(path)
        node = d.current.get(name)
        if node is None and os.path.isfile(path):
            with open(path, "rb") as f:
                node = _Inode(f.read(), name)
            d.durable[name] = d.current[name] = node
        return d, name, node

    def _commit_dir(self, d):
        if d.snapshot is not None:
            # Subdirectories made since: a sync makes them durable.
            for name in os.listdir(d.path):
                full = os.path.join(d.path, name)
                if name not in d.current and os.path.isdir(full):
                    self._dir(full)
        keep = []
        for owner, op in self._dirops:
            if owner is d:
                _apply_dir_op(owner.durable, op)
            else:
                keep.append((owner, op))
        self._dirops = keep

    def _commit_all_dirs(self):
        for d in list(self._dirs.values()):
            if d.snapshot is not None:
                self._commit_dir(d)
        for owner, op in self._dirops:
            _apply_dir_op(owner.durable, op)
        self._dirops = []

    # -- FileIO --------------------------------------------------------

    def open_append(self, path):
        _, _, node = self._lookup(path)
        fd = super().open_append(path)
        if node is None:  # pragma: no cover - the open just succeeded
            os.close(fd)
            raise AssertionError("%s exists but is not a file" % path)
        self._fds[fd] = node
        return fd

    def create(self, path, data):
        self._point("create", "before", path)
        d, name, node = self._lookup(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        if node is None:
            node = _Inode(b"", name)
            self._dir_op(d, ("link", name, node))
        else:
            node.ops.append(("truncate", 0))
        self._fds[fd] = node
        try:
            self._point("create", "after", path)
            self.write(fd, data)
            self.sync(fd)
        finally:
            self.close(fd)

    def write(self, fd, data):
        node = self._fds[fd]
        self._point("write", "before", node.label)
        data = bytes(data)
        super().write(fd, data)
        node.ops.append(("append", data))
        self._point("write", "after", node.label)

    def sync(self, fd):
        node = self._fds[fd]
        self._point("sync", "before", node.label)
        if self.real_sync:
            super().sync(fd)
        node.commit()
        if self.model == "ext4":
            self._commit_all_dirs()
        self._point("sync", "after", node.label)

    def sync_dir(self, path):
        self._point("sync_dir", "before", path)
        if self.real_sync:
            super().sync_dir(path)
        if self.model == "ext4":
            self._dir(path)
            self._commit_all_dirs()
        else:
            self._commit_dir(self._dir(path))
        self._point("sync_dir", "after", path)

    def truncate(self, fd, size):
        node = self._fds[fd]
        self._point("truncate", "before", node.label)
        super().truncate(fd, size)
        node.ops.append(("truncate", size))
        self._point("truncate", "after", node.label)

    def rename(self, src, dst):
        self._point("rename", "before", src)
        d, sname, snode = self._lookup(src)
        d2, dname, _ = self._lookup(dst)
        if d is not d2:  # pragma: no cover - the journal never does this
            raise AssertionError("rename across directories")
        super().rename(src, dst)
        if snode is not None:
            self._dir_op(d, ("rename", sname, dname))
            snode.label = dname
        self._point("rename", "after", src)

    def remove(self, path):
        self._point("remove", "before", path)
        d, name, node = self._lookup(path)
        super().remove(path)
        if node is not None:
            self._dir_op(d, ("unlink", name))
        self._point("remove", "after", path)

    def mkdir(self, path):
        # (FileIO.mkdir exists in versions that create directories through
        # FileIO; before that, watch() infers what os.makedirs did.)
        self._point("mkdir", "before", path)
        path = os.path.abspath(path)
        parent = self._dir(os.path.dirname(path))
        os.mkdir(path)
        name = os.path.basename(path)
        if name not in parent.current:
            self._dir_op(parent, ("link", name, _DirNode(path)))
        self._dirs.setdefault(path, _Dir(path)).snapshot = set()
        self._point("mkdir", "after", path)

    def close(self, fd):
        # Closing changes no byte: allowed after the power went out.
        self._fds.pop(fd, None)
        os.close(fd)

    # -- the crash -----------------------------------------------------

    def crash(self, rng, data="mixed", dirs="random", fill="random"):
        """Rewrite the real files to what the power loss left; return notes.

        Call after :meth:`power_off` (or a :class:`PowerLoss`) and after
        closing everything that had the files open.
        """
        if not self.dead:
            raise RuntimeError("crash() before power_off()")
        if self._fds:
            raise RuntimeError("files still open: %r" % sorted(
                n.label for n in self._fds.values()))
        if dirs not in DIR_MODES:
            raise ValueError("dirs must be one of %s" % (DIR_MODES,))
        notes = []
        self._check_reality()
        final = self._final_dirs(rng, dirs, notes)
        contents = {}
        # Parents first, so that an undone directory is removed before
        # anything is written into it.
        for path in sorted(final):
            d = self._dirs[path]
            if not os.path.isdir(path):
                continue  # removed with an undone parent
            entries = final[path]
            for name in sorted(set(d.current) | set(entries)):
                full = os.path.join(path, name)
                node = entries.get(name)
                if node is None:
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full)
                        notes.append("%s: directory undone" % name)
                    elif os.path.lexists(full):
                        os.remove(full)
                        notes.append("%s: gone" % name)
                    continue
                if isinstance(node, _DirNode):
                    continue
                if id(node) not in contents:
                    contents[id(node)] = survivor(
                        node.durable, node.ops, rng, data, fill)
                content, note = contents[id(node)]
                if node.ops:
                    notes.append("%s: %s" % (name, note))
                _rewrite(full, content)
        for ext in self._externals:
            notes.append(ext.crash(rng, data, fill))
        return notes

    def _check_reality(self):
        """The model must agree with the files: nothing bypassed the disk."""
        for d in self._dirs.values():
            for name, node in d.current.items():
                full = os.path.join(d.path, name)
                if isinstance(node, _DirNode):
                    continue
                if not os.path.isfile(full):
                    raise AssertionError(
                        "%s: the model says it exists; something removed"
                        " it without the disk" % full)
                with open(full, "rb") as f:
                    real = f.read()
                if real != node.current():
                    raise AssertionError(
                        "%s was changed without going through the disk"
                        " (%d bytes, the model has %d)"
                        % (full, len(real), len(node.current())))

    def _final_dirs(self, rng, dirs, notes):
        ops = self._dirops
        if self.model == "ext4":
            k = {"undo": 0, "keep": len(ops)}.get(dirs)
            if k is None:
                k = rng.randint(0, len(ops))
            kept = ops[:k]
            if ops:
                notes.append("ext4: %d of %d directory operations kept"
                             % (k, len(ops)))
        else:
            kept = []
            for d in self._dirs.values():
                mine = [(o, op) for o, op in ops if o is d]
                k = {"undo": 0, "keep": len(mine)}.get(dirs)
                if k is None:
                    k = rng.randint(0, len(mine))
                kept += mine[:k]
                if mine:
                    notes.append("%s: %d of %d directory operations kept"
                                 % (os.path.basename(d.path), k, len(mine)))
        final = {path: dict(d.durable) for path, d in self._dirs.items()}
        for d, op in kept:
            _apply_dir_op(final[d.path], op)
        for d, op in ops:
            if (d, op) not in kept:
                notes.append("undone: %s %s" % (op[0], " ".join(
                    str(a) for a in op[1:] if isinstance(a, str))))
        return final


def _rewrite(path, content):
    try:
        with open(path, "rb") as f:
            if f.read() == content:
                return
    except FileNotFoundError:
        pass
    with open(path, "wb") as f:
        f.write(content)


# -- the ZODB side --------------------------------------------------------

class FileStorageModel:
    """Data.fs durable up to the end of the last finished transaction.

    Wraps ``storage._finish`` (which fsyncs) to note the size after it;
    :meth:`SimulatedDisk.power_off` takes a copy of the file and of its
    index, and :meth:`crash` writes the durable part back plus, as with a
    journal file, some or none of what was written after it.
    """

    def __init__(self, disk, storage):
        self.disk = disk
        self.path = storage._file_name
        self.index_path = self.path + ".index"
        self.durable = storage._pos
        self.image = self.index = None
        original = storage._finish

        def _finish(*args):
            original(*args)
            if not disk.dead:
                self.durable = storage._pos
        storage._finish = _finish
        disk._externals.append(self)

    def power_off(self):
        with open(self.path, "rb") as f:
            self.image = f.read()
        self.index = None
        if os.path.exists(self.index_path):
            with open(self.index_path, "rb") as f:
                self.index = f.read()
        if len(self.image) < self.durable:
            raise AssertionError("Data.fs is shorter (%d) than its last"
                                 " finished transaction (%d)"
                                 % (len(self.image), self.durable))

    def crash(self, rng, data, fill):
        durable = self.image[:self.durable]
        tail = self.image[self.durable:]
        # A prefix of the unfinished transaction, never a damaged sector:
        # FileStorage (ZODB 6.4) cannot open a file whose unfinished last
        # transaction header reads as zeros (read_index takes the zero
        # tid as the last one before it truncates, and the root then
        # reads as deleted) or as garbage (a non-ASCII status byte raises
        # UnicodeDecodeError).  That would test ZODB, not zjournal.
        if data == "mixed":
            data = rng.choice(("lose", "prefix", "all"))
        data = {"sector": "prefix", "torn": "all"}.get(data, data)
        content, note = survivor(
            durable, [("append", tail)] if tail else [], rng, data, fill)
        _rewrite(self.path, content)
        if self.index is None:
            if os.path.exists(self.index_path):
                os.remove(self.index_path)
        else:
            _rewrite(self.index_path, self.index)
        return "Data.fs: %s" % note


# -- the workload ---------------------------------------------------------

class Contend(Command):
    """Increments a counter; the first time, a rival commit conflicts.

    ``token`` names a callable in :data:`RIVALS`; executing live (not in
    replay) pops and calls it.  The rival commits, on another connection,
    a change to the object this command is about to write, so this
    command's transaction fails with a ConflictError and
    ``JournaledDB.execute`` retries it.
    """

    command_name = "tests.powerloss.contend"

    def __init__(self, name, token):
        self.name = name
        self.token = token

    def execute(self, root, context):
        if not context.replaying:
            rival = RIVALS.pop(self.token, None)
            if rival is not None:
                rival()
        return Increment(self.name).execute(root, context)


RIVALS = {}


def describe(command):
    """A command as comparable data: its name and arguments."""
    return command.command_name, sorted(vars(command).items())


class Txn:
    """One transaction the workload tried to journal."""

    def __init__(self, commands):
        self.commands = list(commands)
        self.seqs = None      # set when acknowledged
        self.results = None

    def describe(self):
        return [describe(c) for c in self.commands]

    def __repr__(self):
        return "<Txn seqs=%s %s>" % (self.seqs, [
            c.command_name for c in self.commands])


class Session:
    """What one run between two power losses did."""

    def __init__(self, index):
        self.index = index
        self.acked = []        # Txn, in commit order
        self.in_doubt = None   # the Txn being committed when it stopped
        self.steps = []        # the kinds of the steps run
        self.crashed_at = None
        self.notes = []

    def __repr__(self):
        return "<Session %d: %d acked, in doubt %r, crashed at %s>" % (
            self.index, len(self.acked), self.in_doubt, self.crashed_at)


STEP_KINDS = (
    "increment", "put", "stamp", "transaction", "abandon", "failing",
    "execute-fail", "savepoint", "savepoint-first", "conflict",
)
WEIGHTS = (4, 2, 2, 4, 1, 1, 1, 1, 1, 2)


class Workload:
    """Random steps on a JournaledDB, recorded in a :class:`Session`."""

    def __init__(self, jdb, rng, session):
        self.jdb = jdb
        self.rng = rng
        self.session = session
        self.n = 0

    def key(self, what=""):
        self.n += 1
        return "s%d-%d%s" % (self.session.index, self.n, what)

    def counter(self):
        return "c%d" % self.rng.randrange(3)

    def journaled_command(self):
        r = self.rng.randrange(4)
        if r < 2:
            return Increment(self.counter(), self.rng.randint(1, 4))
        if r == 2:
            return Put(self.key(), self.rng.randrange(1000))
        return Stamp(self.key("-stamp"))

    def aborted_command(self):
        r = self.rng.randrange(3)
        if r == 0:
            return Increment(ABORTED)
        if r == 1:
            return Put(self.key() + "-" + ABORTED, 1)
        return Stamp(ABORTED + "-" + self.key())

    def run(self, steps):
        for _ in range(steps):
            kind = self.rng.choices(STEP_KINDS, WEIGHTS)[0]
            self.session.steps.append(kind)
            getattr(self, "step_" + kind.replace("-", "_"))()

    # -- bookkeeping ---------------------------------------------------

    def committing(self, commands):
        txn = Txn(commands)
        self.session.in_doubt = txn
        return txn

    def acked(self, txn, results):
        last = self.jdb.journal.last_seq
        txn.seqs = list(range(last - len(txn.commands) + 1, last + 1))
        txn.results = list(results)
        self.session.acked.append(txn)
        self.session.in_doubt = None

    # -- steps ---------------------------------------------------------

    def _execute(self, command):
        txn = self.committing([command])
        self.acked(txn, [self.jdb.execute(command)])

    def step_increment(self):
        self._execute(Increment(self.counter(), self.rng.randint(1, 4)))

    def step_put(self):
        self._execute(Put(self.key(), self.rng.randrange(1000)))

    def step_stamp(self):
        self._execute(Stamp(self.key("-stamp")))

    def step_transaction(self):
        commands = [self.journaled_command()
                    for _ in range(self.rng.randint(2, 4))]
        txn = self.committing(commands)
        with self.jdb.transaction() as conn:
            results = [zjournal.execute(conn, c) for c in commands]
        self.acked(txn, results)

    def step_abandon(self):
        commands = [self.aborted_command()
                    for _ in range(self.rng.randint(1, 3))]
        try:
            with self.jdb.transaction() as conn:
                for c in commands:
                    zjournal.execute(conn, c)
                raise _Abandon()
        except _Abandon:
            pass

    def step_failing(self):
        before = [self.aborted_command()
                  for _ in range(self.rng.randint(0, 2))]
        try:
            with self.jdb.transaction() as conn:
                for c in before:
                    zjournal.execute(conn, c)
                zjournal.execute(conn, Fail(self.key("-" + ABORTED)))
                zjournal.execute(conn, self.aborted_command())
        except RuntimeError:
            return
        raise AssertionError("Fail did not fail")

    def step_execute_fail(self):
        try:
            self.jdb.execute(Fail(self.key("-" + ABORTED)))
        except RuntimeError:
            return
        raise AssertionError("Fail did not fail")

    def step_savepoint(self):
        first = self.journaled_command()
        middle = [self.aborted_command()
                  for _ in range(self.rng.randint(1, 2))]
        last = self.journaled_command()
        txn = self.committing([first, last])
        with self.jdb.transaction() as conn:
            results = [zjournal.execute(conn, first)]
            sp = conn.transaction_manager.savepoint()
            for c in middle:
                zjournal.execute(conn, c)
            sp.rollback()
            results.append(zjournal.execute(conn, last))
        self.acked(txn, results)

    def step_savepoint_first(self):
        middle = [self.aborted_command()
                  for _ in range(self.rng.randint(1, 2))]
        last = self.journaled_command()
        txn = self.committing([last])
        with self.jdb.transaction() as conn:
            sp = conn.transaction_manager.savepoint()
            for c in middle:
                zjournal.execute(conn, c)
            sp.rollback()
            results = [zjournal.execute(conn, last)]
        self.acked(txn, results)

    def step_conflict(self):
        name = self.counter()
        token = self.key("-rival")

        def rival():
            # Runs inside Contend.execute: another connection commits a
            # change to the object the command writes (a "touch": the
            # state stays the same, so a rebuild still matches it).  An
            # unjournaled commit, hence allow_unjournaled=True.
            tm = transaction.TransactionManager()
            conn = self.jdb.open(transaction_manager=tm)
            try:
                root = conn.root()
                counters = root.get("counters")
                target = root if counters is None else counters.get(
                    name, counters)
                target._p_changed = True
                tm.commit()
            finally:
                tm.abort()
                conn.close()

        RIVALS[token] = rival
        command = Contend(name, token)
        txn = self.committing([command])
        try:
            result = self.jdb.execute(command)
        finally:
            RIVALS.pop(token, None)
        self.acked(txn, [result])


class _Abandon(Exception):
    pass


# -- one run between two power losses -------------------------------------

def run_session(data_fs, journal_dir, disk, work, segment_size,
                journal_kw=None, **jdb_kw):
    """Open the site on ``disk``, call ``work(jdb)``, lose power.

    Opening (a torn-tail cut, a catch-up) and ``work`` run until ``disk``
    loses power at its armed point, or to the end, when the power is cut
    anyway.  Everything is then closed (changing no byte: the disk is
    off) so that :meth:`SimulatedDisk.crash` can rewrite the files.
    Returns the opened JournaledDB's ``recovery`` (None if opening lost
    power).  Errors other than :class:`PowerLoss` propagate.
    """
    import ZODB
    import ZODB.FileStorage
    from zjournal import FileJournal
    from zjournal import JournaledDB

    storage = ZODB.FileStorage.FileStorage(data_fs)
    FileStorageModel(disk, storage)
    db = ZODB.DB(storage)
    jdb = journal = None
    recovery = None
    try:
        journal = FileJournal(journal_dir, segment_size=segment_size, io=disk,
                              **(journal_kw or {}))
        jdb, journal = JournaledDB(db, journal, **jdb_kw), None
        recovery = jdb.recovery
        work(jdb)
    except PowerLoss:
        pass
    finally:
        disk.power_off()
        if jdb is not None:
            jdb.close()
        else:
            # JournaledDB closes both when it refuses; closing again is
            # harmless.
            db.close()
            if journal is not None:
                journal.close()
    return recovery
