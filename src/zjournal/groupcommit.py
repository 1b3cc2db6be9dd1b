"""Group commit: many callers' commands, one ZODB commit, one fsync.

Under ``fsync="batch"``, :meth:`JournaledDB.execute` does not commit each
command on its own.  Callers queue their commands; one of them, the
*leader*, takes everything queued, executes the commands one after the
other in a single transaction, commits it (one ZODB commit, one journal
append and fsync), and hands each caller its own result.  Callers that
arrive while a leader commits simply queue up for the next group, so the
groups grow with the load and nobody waits when there is no load.

Guarantees are those of ``"always"``: a call returns only after its
command is durable in the journal, so no acknowledged command can be lost
(the loss bound is zero).  ``batch_window`` bounds the extra latency a
leader may add, waiting for companions before it commits (default 0: no
waiting, the groups form from the natural queueing).

Each command still behaves as if it ran alone, in journal order: it sees
the effects of the commands before it in the group, and a command that
raises is taken out (the group is re-executed without it, in a new
transaction), so it leaves no trace and does not fail its companions.
"""
import logging
import threading
import time

import transaction.interfaces


logger = logging.getLogger(__name__)

# A group never grows past this many commands: one transaction holds all
# their changed objects in memory.
MAX_GROUP = 256


class _Request:
    __slots__ = ("command", "metadata", "done", "result", "error")

    def __init__(self, command, metadata):
        self.command = command
        self.metadata = metadata
        self.done = False
        self.result = None
        self.error = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """The queue and the leader protocol for one JournaledDB."""

    def __init__(self, jdb, window=0.0, max_group=MAX_GROUP):
        self.jdb = jdb
        self.window = window
        self.max_group = max_group
        self._cond = threading.Condition()
        self._queue = []
        self._leading = False

    def execute(self, command, metadata=None):
        request = _Request(command, metadata)
        with self._cond:
            self._queue.append(request)
            while not request.done:
                if not self._leading:
                    self._leading = True
                    break
                self._cond.wait()
            else:
                return request.outcome()
        try:
            while not request.done:
                self._lead()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return request.outcome()

    def _lead(self):
        if self.window:
            time.sleep(self.window)
        with self._cond:
            group = self._queue[:self.max_group]
            del self._queue[:self.max_group]
        try:
            self._commit(group)
        except BaseException as e:
            for request in group:
                if not request.done:
                    request.error, request.done = e, True
            if not isinstance(e, Exception):
                raise
        with self._cond:
            self._cond.notify_all()

    def _commit(self, group):
        """Run the group's commands in one transaction and commit it."""
        jdb = self.jdb
        attempt = 0
        with jdb._lock:
            while True:
                pending = [r for r in group if not r.done]
                if not pending:
                    return
                if not jdb._caught_up(attempt):
                    attempt += 1
                    continue
                tm, conn = jdb._executor()
                tm.begin()
                results = []
                try:
                    for request in pending:
                        try:
                            results.append(jdb._run(conn, request.command,
                                                    request.metadata))
                        except transaction.interfaces.TransientError:
                            raise  # a conflict: retry the whole group
                        except Exception as e:
                            # Out of the group; the others run again
                            # without it, in a fresh transaction.
                            request.error, request.done = e, True
                            raise _Retry()
                    jdb._commit(tm)
                except _Retry:
                    tm.abort()
                    continue
                except transaction.interfaces.TransientError as e:
                    tm.abort()
                    if attempt == jdb.retries:
                        raise
                    attempt += 1
                    jdb._pause(attempt, e)
                    continue
                except BaseException:
                    tm.abort()
                    raise
                for request, result in zip(pending, results):
                    request.result, request.done = result, True
                return


class _Retry(Exception):
    pass
