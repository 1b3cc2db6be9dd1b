"""Pyramid integration: ``config.include("zjournal.pyramid")``.

What the include does, in order:

* reads the ``zjournal.*`` settings and refuses a bad one, naming it,
  before anything is opened;
* includes ``pyramid_tm`` (a transaction per request), ``pyramid_retry``
  (a request that failed with a transient error runs again) and
  ``pyramid_zodbconn`` (which opens the ZODB named by ``zodbconn.uri``);
  an application that included them already keeps its own;
* wraps that ZODB and the journal named by ``zjournal.uri`` in a
  :class:`~zjournal.JournaledDB`, which recovers right away, at
  configuration time: a refusal stops the application before it serves;
* adds ``request.execute(command)`` and ``request.query(query)``, which
  run on the request's connection inside the request's transaction: the
  commit is pyramid_tm's, and the journal is one resource of it;
* adds a tween above pyramid_tm that catches the ZODB up with the journal
  before a retried request begins, when the previous attempt found the
  journal ahead, so that the retry starts from a current snapshot; and
  that, when the transaction pyramid_tm committed failed after the
  journal's vote, sends the view's response instead of letting
  pyramid_retry apply its commands a second time (a second tween, under
  pyramid_tm, keeps that response and that transaction); an explicit
  ``pyramid.tweens`` list must name both, or the include refuses it;
* backs off a little (jittered) before each retry of a transient error;
* closes the JournaledDB (the ZODB, and the journal's lock) when the
  process exits normally.

Settings (only ``zjournal.uri`` is required):

``zjournal.uri``
    The journal: a directory, or a journal URI (:func:`zjournal.open_journal`).
``zjournal.imports``
    Modules that define commands (one per line or space separated),
    imported before recovery replays the journal at startup.
``zjournal.fsync``
    ``always``, ``batch`` or ``never``; default: the URI's, else ``always``.
``zjournal.allow_unjournaled``
    Accept changes made outside commands (lost by a rebuild); default false.
``zjournal.journal_queries``
    Journal ``request.query()`` calls too; default false.
``zjournal.batch_size``
    Commands per ZODB commit when recovery replays; default 1000.
``zjournal.retries``
    Retries of ``JournaledDB.execute`` (scripts, not requests: requests
    are retried by pyramid_retry, ``retry.attempts``); default 10.
``zjournal.digest_interval``
    Journal a digest of the state every N commands, for
    ``zodb-journal check-replay``; default none.
"""
import atexit
import importlib
import logging
import random
import time
import weakref

import transaction.interfaces
from pyramid.exceptions import ConfigurationError
from pyramid.settings import asbool
from pyramid.settings import aslist
from pyramid_retry import IBeforeRetry
from pyramid_retry import is_error_retryable
from pyramid_tm import is_tm_active
from pyramid_tm import tm_tween_factory
from pyramid_zodbconn import get_connection

from zjournal import recovery
from zjournal.datamanager import journaled_seqs
from zjournal.db import JournaledDB
from zjournal.db import execute as _execute
from zjournal.db import query as _query
from zjournal.errors import ZJournalError
from zjournal.interfaces import IJournaledDB
from zjournal.journal import FSYNC_POLICIES
from zjournal.uri import open_journal

logger = logging.getLogger(__name__)

PREFIX = "zjournal."

CATCH_UP_TWEEN = "zjournal.pyramid.catch_up_tween_factory"
VIEW_RESPONSE_TWEEN = "zjournal.pyramid.view_response_tween_factory"
TM_TWEEN = "pyramid_tm.tm_tween_factory"

# Settings passed to JournaledDB under their own names (zjournal.<name>);
# the integers with their smallest values.
_BOOLEANS = ("allow_unjournaled", "journal_queries")
_INTEGERS = {"batch_size": 1, "retries": 0, "digest_interval": 1}


class PyramidConfigurationError(ZJournalError, ConfigurationError):
    """The application's settings cannot set up zjournal.

    Raised by ``config.include("zjournal.pyramid")``, before the journal
    is opened; the message names the setting.
    """


class NoRequestTransactionError(ZJournalError):
    """``request.execute()`` was called without a transaction to join.

    pyramid_tm is not managing this request (its ``tm.activate_hook``
    said no, or the request comes from a script) and nobody is known to
    commit the request's transaction: the command would be lost while
    the client is told it succeeded.
    """


def parse_settings(settings):
    """The journal URI, the modules to import, the journal's and the
    JournaledDB's keywords.

    Parsed before anything opens, so that a typo in the ini file is
    reported as such and not as a failure of whatever it configures.
    """
    uri = (settings.get(PREFIX + "uri") or "").strip()
    if not uri:
        raise PyramidConfigurationError(
            "zjournal.uri is not set: name the journal (a directory or a"
            " journal URI such as sqlite:///var/app/journal.sqlite) in the"
            " application's settings")
    journal_kw, db_kw = {}, {}
    imports = aslist(settings.get(PREFIX + "imports") or "")
    fsync = settings.get(PREFIX + "fsync")
    if fsync is not None and fsync.strip():
        fsync = fsync.strip()
        if fsync not in FSYNC_POLICIES:
            raise PyramidConfigurationError(
                "zjournal.fsync = %r: use one of %s"
                % (fsync, ", ".join(FSYNC_POLICIES)))
        journal_kw["fsync"] = fsync
    for name in _BOOLEANS:
        value = settings.get(PREFIX + name)
        if value is not None:
            db_kw[name] = _boolean(name, value)
    for name, smallest in _INTEGERS.items():
        value = settings.get(PREFIX + name)
        if value is not None:
            db_kw[name] = _integer(name, value, smallest)
    known = {"uri", "fsync", "imports"} | set(_BOOLEANS) | set(_INTEGERS)
    unknown = sorted(key for key in settings if key.startswith(PREFIX)
                     and key[len(PREFIX):] not in known)
    if unknown:
        raise PyramidConfigurationError(
            "unknown setting %s (known: %s)" % (", ".join(unknown), ", ".join(
                PREFIX + name for name in sorted(known))))
    return uri, imports, journal_kw, db_kw


def _boolean(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "yes", "on", "1", "t", "y",
                    "false", "no", "off", "0", "f", "n", ""):
        raise PyramidConfigurationError(
            "zjournal.%s = %r: use true or false" % (name, value))
    return asbool(text)


def _integer(name, value, smallest):
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < smallest:
        raise PyramidConfigurationError(
            "zjournal.%s = %r: use a whole number, at least %d"
            % (name, value, smallest))
    return number


def includeme(config):
    """Set up zjournal for the application; see the module docstring.

    The journal is opened and recovered here, not in a deferred action,
    so that a refusal surfaces as the zjournal error it is, at the line
    that includes this package.
    """
    settings = config.get_settings()
    uri, imports, journal_kw, db_kw = parse_settings(settings)
    _check_explicit_tweens(config)
    _import(imports)
    config.include("pyramid_tm")
    config.include("pyramid_retry")
    config.include("pyramid_zodbconn")
    db = _primary_db(config.registry)
    jdb = _open(db, uri, journal_kw, db_kw)
    config.registry.registerUtility(jdb, IJournaledDB)
    atexit.register(_close_at_exit, weakref.ref(jdb))
    config.add_request_method(execute, "execute")
    config.add_request_method(query, "query")
    config.add_tween(CATCH_UP_TWEEN, over=TM_TWEEN)
    config.add_tween(VIEW_RESPONSE_TWEEN, under=TM_TWEEN)
    config.add_subscriber(_back_off, IBeforeRetry)


def _check_explicit_tweens(config):
    """Refuse an explicit tween list that leaves zjournal's tweens out.

    Pyramid then ignores ``add_tween``: without the two tweens a commit
    that fails after the journal's vote would be retried, applying the
    request's commands twice.  Checked from the setting Pyramid builds
    the chain from, when the include runs, so that the refusal is the
    zjournal error itself, with the lines to add.
    """
    names = aslist(config.get_settings().get("pyramid.tweens") or "")
    if not names:
        return
    explicit = []
    for name in names:
        try:
            explicit.append(config.maybe_dotted(name))
        except (ImportError, AttributeError, ValueError):
            explicit.append(name)  # Pyramid reports it in its turn
    catch_up, view_response = (catch_up_tween_factory,
                               view_response_tween_factory)
    tm = tm_tween_factory
    problem = None
    if tm not in explicit:
        problem = "it does not name %s" % TM_TWEEN
    else:
        at = explicit.index(tm)
        above = explicit[at - 1] if at > 0 else None
        below = explicit[at + 1] if at + 1 < len(explicit) else None
        if above is not catch_up or explicit.count(catch_up) != 1:
            problem = "%s is not the line right above %s" % (
                CATCH_UP_TWEEN, TM_TWEEN)
        elif below is not view_response or explicit.count(view_response) != 1:
            problem = "%s is not the line right below %s" % (
                VIEW_RESPONSE_TWEEN, TM_TWEEN)
    if problem is not None:
        raise PyramidConfigurationError(
            "pyramid.tweens lists the tweens explicitly, and %s: without"
            " zjournal's tweens in place a request whose commit fails after"
            " the journal committed its commands would be retried and apply"
            " them twice.  List them around pyramid_tm, in this order:\n"
            "    %s\n    %s\n    %s\n(pyramid.tweens now: %s)"
            % (problem, CATCH_UP_TWEEN, TM_TWEEN, VIEW_RESPONSE_TWEEN,
               " ".join(names)))


def _import(modules):
    """Import the modules that register commands, or say which failed."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PyramidConfigurationError(
                "zjournal.imports: cannot import %s: %s" % (name, e)) from e


def _primary_db(registry):
    databases = getattr(registry, "_zodb_databases", None) or {}
    db = databases.get("")
    if db is None:
        raise PyramidConfigurationError(
            "zjournal.pyramid needs the ZODB of pyramid_zodbconn:"
            " set zodbconn.uri (for example file://%(here)s/Data.fs)")
    return db


def _open(db, uri, journal_kw, db_kw):
    """Open the journal and recover; on a refusal nothing stays open.

    JournaledDB closes what it was handed when recovery refuses; the
    ZODB must be closed here when the journal itself cannot be opened,
    or its storage's lock outlives the failed start.
    """
    try:
        journal = open_journal(uri, **journal_kw)
    except BaseException:
        db.close()
        raise
    progress = recovery.Progress(label="zjournal: recovering at startup")
    jdb = JournaledDB(db, journal, progress=progress, **db_kw)
    found = jdb.recovery
    logger.info("journal %s: %s (%s, the journal is at seq %d; %d replayed"
                " in %.2fs)", uri, found.action,
                "the ZODB had no marker" if found.marker_seq is None
                else "the ZODB was at seq %d" % found.marker_seq,
                found.journal_seq, found.replayed, found.seconds)
    return jdb


def _close_at_exit(ref):
    """Close the ZODB (FileStorage writes its index) and the journal.

    Killed processes skip this, harmlessly: recovery does not depend on
    it, a FileStorage just rebuilds its index on the next start.
    """
    jdb = ref()
    if jdb is not None:
        try:
            jdb.close()
        except Exception:
            logger.exception("closing the JournaledDB at exit failed")


def get_journaled_db(registry):
    """The :class:`~zjournal.JournaledDB` the include set up.

    For scripts and tests (``jdb.execute()``, ``jdb.close()``); views use
    ``request.execute``.
    """
    jdb = registry.queryUtility(IJournaledDB)
    if jdb is None:
        raise PyramidConfigurationError(
            "this registry has no JournaledDB: include zjournal.pyramid")
    return jdb


# -- request methods ---------------------------------------------------------

def execute(request, command, metadata=None):
    """Run ``command`` in the request's transaction; return its result.

    Installed as ``request.execute``.  The command is journaled when
    pyramid_tm commits the request; if it raises, the transaction is
    doomed and pyramid_tm aborts it, whatever the view returns.  The
    transaction's ``user`` and ``description`` -- the authenticated
    userid and the path, as pyramid_tm annotates them -- are journaled
    with it, beside ``metadata``.
    """
    return _execute(_connection(request), command, metadata)


def query(request, query, metadata=None):
    """Run a read-only command on the request's connection.

    Installed as ``request.query``; see :func:`zjournal.query`.
    """
    return _query(_connection(request), query, metadata)


def _connection(request):
    """The request's connection, if somebody will commit its transaction.

    A request that came through zjournal's tweens and that pyramid_tm
    does not manage is refused unless the application began a
    transaction on an explicit manager (``tm.manager_hook =
    pyramid_tm.explicit_manager``): the thread-local manager hands out a
    transaction to whoever calls ``get()``, so a transaction it holds
    says nothing about anyone committing it.
    """
    if not is_tm_active(request):
        through_tweens = request.__dict__.get("_zjournal_tweened", False)
        if not (_explicitly_begun(request.tm) if through_tweens
                else _begun(request.tm)):
            raise NoRequestTransactionError(
                "request.execute(): pyramid_tm is not managing %s and"
                " request.tm has no transaction the application began;"
                " %s" % (request.path, (
                    "in a request pyramid_tm leaves alone, use"
                    " tm.manager_hook = pyramid_tm.explicit_manager and"
                    " run it inside 'with request.tm:', or let pyramid_tm"
                    " manage the request" if through_tweens else
                    "run it inside 'with request.tm:' (a script), or let"
                    " pyramid_tm manage the request")))
    return get_connection(request)


def _explicitly_begun(tm):
    """Whether ``tm`` is an explicit manager with a transaction begun."""
    if not getattr(tm, "explicit", False):
        return False
    try:
        tm.get()
    except transaction.interfaces.NoTransaction:
        return False
    return True


def _begun(tm):
    """Whether somebody began a transaction on ``tm`` (scripts).

    An explicit manager says so by raising NoTransaction from get(); an
    implicit one (the thread-local default) creates a transaction on
    get() that nobody would commit, so its current one is looked at.
    """
    if getattr(tm, "explicit", False):
        return _explicitly_begun(tm)
    # ThreadTransactionManager delegates to a per-thread manager.
    manager = getattr(tm, "manager", tm)
    return getattr(manager, "_txn", True) is not None


# -- retries -----------------------------------------------------------------

def catch_up_tween_factory(handler, registry):
    """Catch the ZODB up before a request; stand by a journaled commit.

    Installed above pyramid_tm, inside pyramid_retry.

    Before the request: the journal data manager notes "journal ahead"
    when its vote finds records the ZODB lacks (another process
    journaled them and did not finish its ZODB commit), or when the
    ZODB failed to finish after the journal's vote.  Catching up inside
    the retried request would replay them after the request's
    connection took its snapshot, costing one more (conflicting)
    attempt; here no connection is open yet.

    After the request: once the journal's vote made the request's
    records durable, its commands are committed -- the journal is the
    decision, and the ZODB catches up from it.  A failure after that
    point (the ZODB's ``tpc_finish``: ZEO's ClientDisconnected is a
    TransientError) must neither be retried, which would apply the
    commands a second time, nor reported as a failure.  The response
    the view returned is sent instead, as :meth:`JournaledDB.execute`
    returns the result in the same case.
    """
    jdb = get_journaled_db(registry)

    def zjournal_catch_up_tween(request):
        request._zjournal_tweened = True
        if jdb.needs_catch_up:
            # A conflict with another process catching up too is a
            # TransientError: pyramid_retry runs the request again, and
            # the flag, still set, makes it catch up first.
            jdb.catch_up()
        try:
            response = handler(request)
        except Exception as e:
            kept = _response_after_journal(request, e)
            if kept is None:
                raise
            return kept
        if getattr(request, "exception", None) is not None:
            # pyramid_tm renders a failed commit with an exception view
            # when the application has one for it, and leaves the error
            # in request.exception, where pyramid_retry looks.
            kept = _response_after_journal(request, request.exception)
            if kept is not None:
                return kept
        return response

    return zjournal_catch_up_tween


def view_response_tween_factory(handler, registry):
    """Keep the view's response, under pyramid_tm, for the tween above.

    It is what the client gets when the commit fails after the journal
    committed the request's commands.  The transaction is taken here,
    after the view, because it is the one pyramid_tm commits next: a
    view may have committed others itself, and their outcome is not this
    request's to decide.
    """
    def zjournal_view_response_tween(request):
        response = handler(request)
        if not is_tm_active(request):
            # Nobody commits here; a get() on the thread-local manager
            # would leave a stray transaction behind.
            return response
        request._zjournal_response = response
        # An exception the view raised and an exception view rendered
        # (a redirect let through by commit_veto) is the view's, not a
        # failed commit's.
        request._zjournal_view_exception = getattr(
            request, "exception", None)
        try:
            request._zjournal_txn = request.tm.get()
        except transaction.interfaces.NoTransaction:
            # The view ended the explicit transaction: pyramid_tm's
            # commit fails with NoTransaction, before any journal.
            request._zjournal_txn = None
        return response

    return zjournal_view_response_tween


def _response_after_journal(request, error):
    """The view's response if the request's commit failed after the
    journal's vote, else None.

    Asked of the transaction pyramid_tm committed, whoever executed the
    commands in it (``request.execute`` or :func:`zjournal.execute` on the
    request's connection).  The view returned (its response was kept), so
    an error that reaches here with the transaction's records durable in
    the journal came from the commit: from the ZODB's ``tpc_finish``
    (:func:`~zjournal.datamanager.finish_failed`) or from after it (a
    synchronizer's ``afterCompletion``, where a storage may poll its
    server).  Either way the commands are committed.
    ``request.exception`` is cleared with it: pyramid_retry retries a
    returned response whose ``request.exception`` is retryable.
    """
    txn = request.__dict__.get("_zjournal_txn")
    response = request.__dict__.get("_zjournal_response")
    if txn is None or response is None or journaled_seqs(txn) is None:
        return None
    if error is request.__dict__.get("_zjournal_view_exception"):
        # The view's own exception, rendered by an exception view and
        # committed anyway (commit_veto let its status through): nothing
        # failed, but a retryable one must not run the view again.
        if is_error_retryable(request, error):
            request.exception = None
            request.exc_info = None
        return None
    first, last = journaled_seqs(txn)
    logger.error(
        "%s: seq %d..%d are committed in the journal, but the commit then"
        " failed (%s: %s); the request is not retried and its response is"
        " sent, the ZODB catches up from the journal before the next"
        " request", request.path, first, last, type(error).__name__, error)
    request.exception = None
    request.exc_info = None
    return response


def _back_off(event):
    """Wait a little before a retry, so that competing requests spread.

    pyramid_retry runs the next attempt at once; two requests that
    conflicted on the journal's marker would likely conflict again.
    """
    error = event.exception
    if not isinstance(error, transaction.interfaces.TransientError):
        return
    attempt = event.environ.get("retry.attempt", 0)
    logger.debug("retrying %s after %s: %s", event.request.path,
                 type(error).__name__, error)
    time.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 8)))
