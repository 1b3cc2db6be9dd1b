"""Named kill points for crash tests.

Set ``ZJOURNAL_KILL_AT`` to the name of a point (``vote.after-sync``, ...)
and the process kills itself with SIGKILL the first time it reaches that
point: no ``finally`` blocks, no atexit handlers, no buffered output
flushed -- as close to pulling the plug as a test can get without a VM.
``ZJOURNAL_KILL_COUNT=N`` kills on the Nth time the point is reached.

Without the variable, :func:`point` is a global lookup and a comparison.
The points:

``vote.before-append``    journal vote, nothing written
``append.after-write``    records written, not yet synced
``vote.after-sync``       records durable; the ZODB has not finished
``finish.after-zodb``     the ZODB finished (journal's tpc_finish)
``roll.after-create``     a new segment exists, nothing written to it
``repair.after-save``     torn bytes saved aside, segment not yet cut
``replay.after-commit``   a replay batch committed
``archive.after-write``   an archive file written and synced, not renamed
``archive.after-rename``  an archive complete, its original still there
``archive.after-remove``  an archived segment's original removed
``prune.after-state``     pruned.json written, no segment removed yet
"""
import os
import signal

POINTS = (
    "vote.before-append", "append.after-write", "vote.after-sync",
    "finish.after-zodb", "roll.after-create", "repair.after-save",
    "replay.after-commit", "archive.after-write", "archive.after-rename",
    "archive.after-remove", "prune.after-state",
)

_target = os.environ.get("ZJOURNAL_KILL_AT") or None
_countdown = int(os.environ.get("ZJOURNAL_KILL_COUNT", "1"))


def point(name):
    """Die here if this is the configured kill point."""
    global _countdown
    if _target is not None and name == _target:
        _countdown -= 1
        if _countdown <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
