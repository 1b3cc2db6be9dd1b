"""The ``<zjournal>`` section of ``zope.conf``, and what it does at startup.

::

    %import zjournal
    <zjournal journal>
      uri $INSTANCE/var/journal
      database main
    </zjournal>

``%import zjournal`` loads ``zjournal/component.xml``; its section type
implements Zope's ``zope.product.base``, so the section ends up in the
configuration's ``product_config``.  Creating the section object registers
a handler for ``zope.processlifetime.IDatabaseOpened``, which Zope's
startup (``Zope2.App.startup.startup``) sends once every configured
database is open and before it creates or initializes the application.
For each ``<zjournal>`` section the handler, in this order:

1. loads the instance's ZCML (``Zope2.App.startup.load_zcml``, which Zope
   would load next anyway), so that replayed commands run with the
   subscribers and adapters live commands run with;
2. if the database is behind its journal (empty, or its marker older),
   installs Zope's products first (``OFS.Application.install_products``),
   for the same reason;
3. wraps the database in a :class:`zjournal.JournaledDB`, which recovers:
   it rebuilds an empty database from the journal, catches up one that is
   behind, or refuses one that does not belong to the journal;
4. for the root database, runs
   :class:`~zjournal.zope.commands.InitializeApplication` as a journaled
   command if Zope's initializer would change anything.

Zope's own startup then finds the application complete and writes
nothing.  A refusal stops the startup with the zjournal error that says
what was found.
"""
import logging
import os
import re
import stat

import transaction
import zope.component
import zope.component.event  # noqa: F401 (routes zope.event to handlers)
from zope.processlifetime import IDatabaseOpened
from zope.processlifetime import IDatabaseOpenedWithRoot

from zjournal.datamanager import journaled_seqs
from zjournal.db import JournaledDB
from zjournal.errors import ZJournalError
from zjournal.marker import MARKER_KEY
from zjournal.recovery import Progress
from zjournal.uri import open_journal
from zjournal.zope import commands

logger = logging.getLogger(__name__)

# database name -> JournaledDB, for the databases this process guards.
journaled_dbs = {}


class ZopeConfigurationError(ZJournalError, ValueError):
    """A ``<zjournal>`` section does not fit the rest of ``zope.conf``.

    A ValueError too, so that ZConfig reports one raised while it reads
    the section with the file and line it comes from.
    """


class JournalSection:
    """The ``<zjournal>`` section: which database, which journal, options."""

    def __init__(self, section):
        self.name = section.getSectionName()
        self.uri = section.uri
        self.database = section.database
        self.allow_unjournaled = section.allow_unjournaled
        self.batch_size = section.batch_size
        self.retries = section.retries
        if self.batch_size < 1 or self.retries < 0:
            raise ZopeConfigurationError(
                "<zjournal %s>: batch-size must be at least 1 and retries"
                " at least 0" % self.name)
        _register_handlers()

    def getSectionName(self):
        # Zope files product configuration sections under their names.
        return self.name

    def __repr__(self):
        from zjournal.uri import _safe
        return "<zjournal %s: database %r, journal %s>" % (
            self.name, self.database, _safe(self.uri))

    def guard(self, root_db, config):
        """Wrap this section's database in a JournaledDB; return it."""
        db = root_db.databases.get(self.database)
        if db is None:
            raise ZopeConfigurationError(
                "<zjournal %s> guards database %r, but zope.conf opens no"
                " <zodb_db %s> (databases: %s); name the database in the"
                " section's 'database' key" % (
                    self.name, self.database, self.database,
                    ", ".join(sorted(root_db.databases)) or "none"))
        if db in (jdb.db for jdb in journaled_dbs.values()):
            raise ZopeConfigurationError(
                "<zjournal %s>: database %r is guarded by another <zjournal>"
                " section" % (self.name, self.database))
        _load_zcml()
        journal = open_journal(self.uri)
        try:
            if _behind(db, journal):
                _install_products()
        except BaseException:
            journal.close()
            raise
        jdb = JournaledDB(
            db, journal, allow_unjournaled=self.allow_unjournaled,
            retries=self.retries, batch_size=self.batch_size,
            progress=Progress("zjournal: replay into database %r"
                              % self.database))
        found = jdb.recovery
        logger.info(
            "database %r, journal %s: %s (ZODB %s, journal at seq %d,"
            " %d commands replayed in %.2fs)", self.database, journal.path,
            found.action, "empty" if found.marker_seq is None
            else "at seq %d" % found.marker_seq, found.journal_seq,
            found.replayed, found.seconds)
        journaled_dbs[self.database] = jdb
        if db is root_db:
            _initialize_application(jdb, config)
        return jdb


def _behind(db, journal):
    """Whether recovery will replay commands into ``db``."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        marker = conn.root().get(MARKER_KEY)
        return (marker.last_seq if marker is not None else 0) \
            < journal.last_seq
    finally:
        tm.abort()
        conn.close()


def _load_zcml():
    # Through the module, so that a test setup replacing the hook
    # (ZopeTestCase does) is honoured.  Loading is done once per process.
    from Zope2.App import startup
    startup.load_zcml()


_products_installed = False


def _install_products():
    """Install Zope's products before a replay, as live commands had them.

    Zope installs them again after the database is opened; the second
    installation adds each meta type a second time, which the
    database-opened-with-root handler drops.
    """
    global _products_installed
    import OFS.Application
    OFS.Application.install_products(None)
    _products_installed = True


def _drop_duplicate_meta_types():
    import Products
    seen = set()
    kept = []
    for info in Products.meta_types:
        key = (info.get("name"), info.get("product"))
        if key not in seen:
            seen.add(key)
            kept.append(info)
    Products.meta_types = tuple(kept)


def read_inituser():
    """``(name, password hash, domains)`` from the instance's ``inituser``
    file, or None."""
    from AccessControl.users import readUserAccessFile
    info = readUserAccessFile("inituser")
    if not info:
        return None
    name, password, domains = info[:3]
    return (name, commands.hash_password(password),
            tuple(d.decode("utf-8") if isinstance(d, bytes) else d
                  for d in domains if d))


def _initialize_application(jdb, config):
    """Journal Zope's initialization; remove the inituser file it used.

    Zope removes the file once used; so must we, or Zope's own
    initializer finds it and adds the user again, outside any command:
    the journal refuses that commit and the startup fails -- at every
    start, each journaling another initialization first.  Hence the
    check before anything is journaled.
    """
    inituser = read_inituser()
    if not commands.needs_initialization(jdb.db, inituser):
        return
    path = None
    if inituser is not None:
        home = os.environ.get("INSTANCE_HOME") or config.instancehome
        path = os.path.join(home, "inituser")
        _check_removable(path)
    created = jdb.execute(commands.InitializeApplication(inituser))
    logger.info("journaled Zope's application initialization as seq %d",
                jdb.journal.last_seq)
    if created is not None:
        _warn_unsalted(created, inituser[1], jdb.journal.last_seq)
    if created is not None and path is not None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ZopeConfigurationError(
                "the initial user is journaled (seq %d), but the inituser"
                " file %s cannot be removed (%s); remove it before starting"
                " Zope again" % (jdb.journal.last_seq, path, e)) from e


#: Password schemes of AuthEncoding that use no salt.  mkwsgiinstance
#: writes {SHA256}; a hash like that, journaled, is kept as long as the
#: journal and falls to a precomputed table.
UNSALTED_SCHEMES = ("SHA", "SHA256", "MYSQL")


def _warn_unsalted(name, password_hash, seq):
    """Say so when the journal now holds an unsalted password hash.

    A password hash from the inituser file is journaled unchanged (a
    hash cannot be salted afterwards); the warning is the operator's
    chance to replace it while that is still simple.
    """
    match = re.match(r"\{([^}]+)\}", password_hash)
    if match is None or match.group(1).upper() not in UNSALTED_SCHEMES:
        return
    logger.warning(
        "the inituser file gave user %r an unsalted {%s} password hash,"
        " now journaled (seq %d) and kept in the append-only journal for"
        " good, where such a hash is easy to crack.  For a new instance:"
        " stop it, remove its journal and Data.fs, and create the user"
        " with 'python -m zjournal.zope.adduser' (a salted {SSHA} hash)"
        " or an inituser file holding the password in plain text"
        " (zjournal salts it)", name, match.group(1), seq)


def _check_removable(path):
    """Refuse to start when the inituser file cannot be removed."""
    directory = os.path.dirname(path) or "."
    problem = None
    if not os.access(directory, os.W_OK | os.X_OK):
        problem = "its directory is not writable"
    else:
        info = os.stat(directory)
        if info.st_mode & stat.S_ISVTX and os.geteuid() not in (
                0, info.st_uid, os.stat(path).st_uid):
            problem = "its directory is sticky and the file is not ours"
    if problem is not None:
        raise ZopeConfigurationError(
            "the inituser file %s cannot be removed (%s): Zope would add"
            " its user again, outside any journaled command.  Remove the"
            " file (or make it removable) and start Zope again; nothing"
            " was journaled" % (path, problem))


def _sections(config):
    found = getattr(config, "product_config", None) or {}
    return [s for s in found.values() if isinstance(s, JournalSection)]


def database_opened(event):
    """Guard the databases named by ``<zjournal>`` sections; see above."""
    from App.config import getConfiguration
    config = getConfiguration()
    for section in _sections(config):
        try:
            section.guard(event.database, config)
        except ZJournalError as e:
            logger.critical("Zope cannot start: <zjournal %s>: %s",
                            section.name, e)
            raise


def database_opened_with_root(event):
    """Undo the side effect of installing the products twice."""
    global _products_installed
    if _products_installed:
        _drop_duplicate_meta_types()
        _products_installed = False


def before_commit(event):
    """Let no request be retried once the journal committed its commands.

    The journal's vote is the commit point.  If the ZODB then fails to
    finish (ZEO's ClientDisconnected is a TransientError), the publisher
    would retry the request and apply its commands a second time.  The
    publisher asks ``request.supports_retry()`` right after the failed
    commit; this answers no when the transaction it committed failed
    after a journal's vote.  The client gets the error response, although
    the commands are committed: the ZODB catches up from the journal
    before the next command, and the log says so.

    The transaction is taken now, just before the publisher commits it,
    and asked afterwards: commands that join it later, in before-commit
    hooks, are journaled in the same vote and count as well.
    """
    if not journaled_dbs:
        return
    request = event.request
    if "supports_retry" in vars(request):
        return
    txn = transaction.get()
    may_retry = request.supports_retry
    logged = []

    def supports_retry():
        # Asked after the commit failed: with the records durable in the
        # journal, the failure came after the commit point (the ZODB's
        # tpc_finish, or a synchronizer's afterCompletion).
        if journaled_seqs(txn) is None:
            return may_retry()
        if not logged:
            first, last = journaled_seqs(txn)
            logger.error(
                "%s: seq %d..%d are committed in the journal, but the"
                " ZODB failed to finish; not retrying the request (it"
                " would apply them twice); the ZODB catches up before"
                " the next command", request.get("PATH_INFO", "?"),
                first, last)
            logged.append(True)
        return False

    request.supports_retry = supports_retry


def _register_handlers():
    from ZPublisher.interfaces import IPubBeforeCommit
    registered = {h.factory for h in
                  zope.component.getGlobalSiteManager().registeredHandlers()}
    if before_commit not in registered:
        zope.component.provideHandler(before_commit, (IPubBeforeCommit,))
    if database_opened not in registered:
        zope.component.provideHandler(database_opened, (IDatabaseOpened,))
    if database_opened_with_root not in registered:
        zope.component.provideHandler(database_opened_with_root,
                                      (IDatabaseOpenedWithRoot,))
