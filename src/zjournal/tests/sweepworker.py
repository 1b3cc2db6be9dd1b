"""Subprocess entry points for ``test_sweeps``.

Run as ``python -m zjournal.tests.sweepworker MODE ...``.

``kill-in-replay K CRASHWORKER-ARGS...``
    Run :mod:`zjournal.tests.crashworker` with ``CRASHWORKER-ARGS``, but
    SIGKILL the process when the K-th command is about to be *replayed*
    (a command of the examples module whose ``execute`` is called with
    ``context.replaying``).  Unlike the ``replay.after-commit`` kill point,
    this lands inside a batch, before the batch commits -- also before the
    first batch of a rebuild commits.

``append DIR --seconds S [--piece N --pause P]``
    Open a writer on the journal directory ``DIR`` and append transactions
    for ``S`` seconds, each written ``N`` bytes at a time with a pause of
    ``P`` seconds between the pieces, so that readers race with records
    half written.  The transactions and their records are a pure function of
    the sequence number (:func:`txn_size`, :func:`item`), so a reader can
    check what it sees without asking the writer.  Prints ``ready`` after
    the first transaction; when done appending, writes a JSON report (the
    last seq, and the sha256 and size of every file *as the writer wrote
    it*, recorded by :class:`RecordingIO`) to ``DIR/../writer.json``
    (write-then-rename) and prints ``done``; then holds the journal (and
    its lock) open until its stdin is closed or it is killed.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time

from zjournal import codec
from zjournal.journal import FileIO
from zjournal.journal import FileJournal

REPORT = "writer.json"
NAME = "tests.put"


# -- the continuous writer --------------------------------------------------

def txn_size(first_seq):
    """How many records the transaction starting at ``first_seq`` has."""
    return (1, 3, 1, 2, 1, 1, 4)[first_seq % 7]


def item(seq):
    """The journal item (seq, time, version, name, payload) of ``seq``."""
    args = {"key": "k%d" % seq, "value": "v" * (seq % 23)}
    return (seq, 1700000000.0 + seq / 1024.0, 0, NAME, codec.dumps(args))


def expected_args(seq):
    return {"key": "k%d" % seq, "value": "v" * (seq % 23)}


def transaction_ends(last_seq):
    """The seqs that end a transaction, up to ``last_seq``."""
    ends = set()
    seq = 1
    while seq <= last_seq:
        seq += txn_size(seq)
        ends.add(seq - 1)
    return ends


class RecordingIO(FileIO):
    """The journal's real system calls, keeping a copy of every byte.

    What the files must hold at the end is then known independently of
    the files themselves: anybody else changing a byte shows.
    """

    def __init__(self, piece=0, pause=0.0):
        self.files = {}
        self.paths = {}
        # Appends are written ``piece`` bytes at a time, ``pause`` seconds
        # apart (the short writes os.write may do, slowed down), so that
        # readers often find a record half written.
        self.piece = piece
        self.pause = pause

    def open_append(self, path):
        fd = super().open_append(path)
        self.paths[fd] = path
        return fd

    def create(self, path, data):
        super().create(path, data)
        self.files[path] = bytes(data)

    def write(self, fd, data):
        path = self.paths.get(fd)
        if path is None:  # inside create(), which records what it writes
            return super().write(fd, data)
        data = bytes(data)
        step = self.piece or len(data)
        for at in range(0, len(data), step):
            if at and self.pause:
                time.sleep(self.pause)
            super().write(fd, data[at:at + step])
        self.files[path] = self.files.get(path, b"") + data

    def truncate(self, fd, size):
        super().truncate(fd, size)
        path = self.paths[fd]
        self.files[path] = self.files[path][:size]

    def rename(self, src, dst):
        super().rename(src, dst)
        self.files[dst] = self.files.pop(src)

    def remove(self, path):
        super().remove(path)
        self.files.pop(path, None)

    def close(self, fd):
        super().close(fd)
        self.paths.pop(fd, None)

    def report(self):
        return {os.path.basename(path): {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data)}
                for path, data in self.files.items()}


def append_mode(directory, seconds, segment_size, piece, pause):
    io = RecordingIO(piece, pause)
    journal = FileJournal(directory, fsync="never",
                          segment_size=segment_size, io=io)
    if journal.last_seq != 0:
        raise SystemExit("append mode wants a new journal")
    # The first segment is created through ``io`` too, so the report
    # covers every segment file.
    deadline = None
    appended = 0
    while True:
        first = journal.last_seq + 1
        journal.append([item(s)
                        for s in range(first, first + txn_size(first))])
        appended += 1
        if deadline is None:
            print("ready", flush=True)
            deadline = time.monotonic() + seconds
        elif time.monotonic() >= deadline:
            break
    report = {"last_seq": journal.last_seq, "transactions": appended,
              "segments": len(journal.segments()), "files": io.report()}
    target = os.path.join(os.path.dirname(os.path.abspath(directory)), REPORT)
    with open(target + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(target + ".tmp", target)
    print("done", flush=True)
    sys.stdin.read()
    journal.close()
    return 0


# -- killing a replay inside a batch ------------------------------------------

def kill_in_replay(count, crashworker_args):
    from zjournal.tests import crashworker
    from zjournal.tests import examples
    remaining = [count]

    def wrap(cls):
        execute = cls.execute

        def killing_execute(self, root, context):
            if context.replaying:
                remaining[0] -= 1
                if remaining[0] <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            return execute(self, root, context)

        cls.execute = killing_execute

    for cls in (examples.Put, examples.Increment, examples.Stamp):
        wrap(cls)
    return crashworker.main(crashworker_args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kill-in-replay"]:
        return kill_in_replay(int(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(prog="sweepworker")
    parser.add_argument("mode", choices=["append"])
    parser.add_argument("directory")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--segment-size", type=int, default=8192)
    parser.add_argument("--piece", type=int, default=0,
                        help="write appends this many bytes at a time")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between the pieces of one append")
    args = parser.parse_args(argv)
    return append_mode(args.directory, args.seconds, args.segment_size,
                       args.piece, args.pause)


if __name__ == "__main__":
    sys.exit(main())
