"""Commands for Zope applications, and the one Zope's startup needs.

A replay runs outside any request, so a command for OFS objects must not
depend on what a live request supplies implicitly.  Two things matter in
practice:

* **who**: OFS records the owner of every object it adds, and checks
  roles, from the security manager.  :class:`ZopeCommand` journals the
  acting user (the path of its user folder and its id) and runs as that
  user, looked up in the ZODB, live and on replay alike;
* **where**: the application root is wrapped in a request of its own,
  the same live and on replay, instead of the live request (whose URL,
  form and cookies a replay does not have).

:class:`InitializeApplication` performs the persistent part of Zope's
application initialization (``OFS.Application.AppInitializer``): the
``Application`` object with its ``acl_users``, the required roles, the
initial user from the ``inituser`` file, ``virtual_hosting`` and
``index_html``.  Zope writes those at startup outside any command; run as
a journaled command they are the first entry of the journal, and a
rebuild reproduces them.
"""
import contextlib
import io
import logging

import AccessControl.users
import transaction
from AccessControl.SecurityManagement import getSecurityManager
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SecurityManagement import setSecurityManager
from Acquisition import aq_base
from Acquisition import aq_inner
from Acquisition import aq_parent
from AuthEncoding import AuthEncoding
from OFS.Application import Application
from OFS.Application import AppInitializer
from ZPublisher.BaseRequest import RequestContainer
from ZPublisher.HTTPRequest import HTTPRequest
from ZPublisher.HTTPResponse import HTTPResponse
from zope.publisher.browser import setDefaultSkin

from zjournal.commands import Command
from zjournal.errors import CommandError

logger = logging.getLogger(__name__)

APPLICATION_KEY = "Application"  # where Zope keeps its root object

# acting_user values that name no user folder entry.
SYSTEM = "system"   # Zope's own "System Processes" user
ANONYMOUS = None


class ActingUserError(CommandError):
    """The user a command acts as cannot be journaled or found again.

    A command journals who executed it, so that a replay adds objects
    with the same owner and passes the same security checks.  Only users
    stored in a user folder in the ZODB (and Zope's system user, and the
    anonymous user) can be found again by a replay.
    """


def application(root):
    """Zope's application object from a ZODB ``root``, in a fresh request.

    The request is built from constants, not from the live request, so a
    command sees the same one when it first runs and when it is replayed.
    """
    try:
        app = root[APPLICATION_KEY]
    except KeyError:
        raise CommandError(
            "the ZODB holds no %r object: Zope's application is created by"
            " the first journaled command (zjournal.zope.initialize); run"
            " commands for OFS objects against the database Zope is"
            " started on" % APPLICATION_KEY) from None
    environ = {"SERVER_NAME": "zjournal.invalid", "SERVER_PORT": "80",
               "REQUEST_METHOD": "POST"}
    request = HTTPRequest(io.BytesIO(), environ,
                          HTTPResponse(stdout=io.BytesIO()))
    request._steps = ["zjournal"]
    setDefaultSkin(request)
    return app.__of__(RequestContainer(REQUEST=request))


def current_user():
    """The acting user as a command journals it.

    ``(user folder path, user id)``, :data:`SYSTEM` or :data:`ANONYMOUS`.
    """
    user = getSecurityManager().getUser()
    if aq_base(user) is AccessControl.users.system:
        return SYSTEM
    if aq_base(user) is AccessControl.users.nobody or user is None:
        return ANONYMOUS
    folder = aq_parent(aq_inner(user))
    if folder is None or not hasattr(aq_base(folder), "getPhysicalPath"):
        raise ActingUserError(
            "user %r does not come from a user folder stored in the ZODB"
            " (the emergency user from the 'access' file?), so a replay"
            " could not act as it; log in as a user of a user folder"
            % (user.getUserName(),))
    return ("/".join(folder.getPhysicalPath()) or "/", user.getId())


def _find_user(app, acting_user):
    if acting_user == SYSTEM:
        return AccessControl.users.system
    if acting_user is ANONYMOUS:
        return AccessControl.users.nobody
    path, user_id = acting_user
    try:
        folder = app.unrestrictedTraverse(path)
    except (KeyError, AttributeError, LookupError) as e:
        raise ActingUserError(
            "the user folder %s of the acting user %r is not in the ZODB"
            " (%s)" % (path, user_id, e)) from e
    user = folder.getUserById(user_id)
    if user is None:
        raise ActingUserError("user %r is not in the user folder %s"
                              % (user_id, path))
    return user.__of__(folder)


@contextlib.contextmanager
def acting_as(app, acting_user):
    """Run the block as the user ``acting_user`` names, found in ``app``."""
    user = _find_user(app, acting_user)
    previous = getSecurityManager()
    newSecurityManager(None, user)
    try:
        yield user
    finally:
        setSecurityManager(previous)


class ZopeCommand(Command):
    """Base class of commands that change OFS objects.

    Subclasses implement :meth:`apply`, which receives the application
    (acquisition-wrapped in a request of its own) instead of the ZODB
    root, and runs as the user who executed the command.
    :func:`zjournal.zope.execute` journals that user as the command's
    ``acting_user``; a command executed any other way acts as the
    anonymous user unless ``acting_user`` was set.
    """

    acting_user = ANONYMOUS

    def execute(self, root, context):
        # Replay commits many commands per transaction, where live they
        # were often one request each.  OFS refuses to move, rename or copy
        # an object without a _p_jar, which an object added in the same
        # transaction lacks until a savepoint: without this, a rename after
        # an add succeeds live and fails on replay.  (Optimistic: a data
        # manager without savepoints does not make it fail.)
        root._p_jar.transaction_manager.savepoint(optimistic=True)
        app = application(root)
        with acting_as(app, self.acting_user):
            return self.apply(app, context)

    def apply(self, app, context):
        """Change OFS objects below ``app``; return any result."""
        raise NotImplementedError(
            "%s must implement apply(app, context)" % type(self).__name__)


class _Initializer(AppInitializer):
    """Zope's initializer, inside a command: no commits of its own.

    Products are not installed here: installing them registers classes
    in memory and changes nothing in the ZODB, and Zope does it at every
    startup anyway.
    """

    def __init__(self, app, inituser):
        super().__init__(app)
        self.inituser = inituser
        self.created_user = None

    def commit(self, note):
        logger.debug("application initialization: %s", note)

    def install_inituser(self):
        # As AppInitializer.install_inituser, with the user taken from the
        # command's arguments rather than from a file a replay won't see.
        users = getattr(self.getApp(), "acl_users", None)
        if users is None:
            return
        if (self.inituser is not None
                and hasattr(users, "_createInitialUser")
                and _at_most_one_user(users)):
            name, password, domains = self.inituser
            users._doDelUsers(users.getUserNames())
            users._doAddUser(name, password, ("Manager",), list(domains))
            self.created_user = name
        users = aq_base(users)
        if not getattr(users, "_ofs_migrated", False):
            from OFS.userfolder import UserFolder
            if users.__class__ is UserFolder:
                users._ofs_migrated = True
                users._p_changed = True
                self.getApp()._p_changed = True

    def install_standards(self):
        app = self.getApp()
        for name in ("_standard_objects_have_been_added",
                     "_initializer_registry"):
            if getattr(app, name, None) is not None:
                delattr(app, name)

    def run(self):
        # AppInitializer.initialize's order, less install_products.
        self.install_app_manager()
        self.install_required_roles()
        self.install_inituser()
        self.install_standards()
        self.install_virtual_hosting()
        self.install_root_view()


def _at_most_one_user(users):
    """Zope's own condition for replacing the users with the initial one.

    Only the standard user folder keeps its users in ``data``; another
    kind (a PluggableAuthService, say) is left alone rather than guessed
    at, and the startup goes on.
    """
    data = getattr(aq_base(users), "data", None)
    try:
        return len(data) <= 1
    except TypeError:
        logger.warning(
            "the inituser file is ignored: the root user folder (%s) is not"
            " Zope's standard one; add the user with its own tools",
            type(aq_base(users)).__name__)
        return False


def initialize(root, inituser=None):
    """Create or complete Zope's application object in ``root``.

    Returns the name of the initial user created, or None.
    """
    with acting_as(None, SYSTEM):
        if APPLICATION_KEY not in root:
            root[APPLICATION_KEY] = Application()
        initializer = _Initializer(root[APPLICATION_KEY], inituser)
        initializer.run()
    return initializer.created_user


class InitializeApplication(Command):
    """What Zope's startup writes to the ZODB, as a journaled command.

    ``inituser`` is ``(name, password hash, domains)`` read from the
    instance's ``inituser`` file when the command was first executed:
    the file is gone by the time the journal is replayed.
    """

    command_name = "zjournal.zope.initialize"

    def __init__(self, inituser=None):
        self.inituser = None if inituser is None else tuple(inituser)

    def execute(self, root, context):
        return initialize(root, self.inituser)


def needs_initialization(db, inituser):
    """Whether :class:`InitializeApplication` would change anything.

    Found by running it in a transaction that is then aborted, so the
    answer follows Zope's initializer whatever its version checks.
    """
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    # Marked as in a command: the trial's changes are not reported to the
    # journal (they are aborted).
    conn.zjournal_in_command = True
    try:
        tm.begin()
        initialize(conn.root(), inituser)
        return bool(conn._registered_objects or conn._added)
    finally:
        tm.abort()
        conn.zjournal_in_command = False
        conn.close()


def hash_password(password):
    """A password as a user folder stores it, for the journal to hold.

    The journal keeps command arguments for ever: it holds the salted
    hash, never the password itself.
    """
    if isinstance(password, bytes):
        password = password.decode("utf-8")
    if AuthEncoding.is_encrypted(password):
        return password
    return AuthEncoding.pw_encrypt(password, "SSHA").decode("ascii")


class AddUser(ZopeCommand):
    """Add a user to the root user folder: ``addzopeuser``, journaled."""

    command_name = "zjournal.zope.add_user"

    def __init__(self, name, password, roles=("Manager",), domains=()):
        self.name = name
        self.password = hash_password(password)
        self.roles = tuple(roles)
        self.domains = tuple(domains)

    def apply(self, app, context):
        users = app.acl_users
        if users.getUser(self.name) is not None:
            raise CommandError("user %r already exists in %s"
                               % (self.name, "/".join(
                                   users.getPhysicalPath())))
        users._doAddUser(self.name, self.password, list(self.roles),
                         list(self.domains))
        return self.name
