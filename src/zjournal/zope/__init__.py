"""zjournal in Zope: journaled commands through Zope's publisher.

Configuration (``zope.conf``)::

    %import zjournal
    <zjournal journal>
      uri $INSTANCE/var/journal
      database main
    </zjournal>

Lifecycle:

* when Zope has opened its databases, each database a ``<zjournal>``
  section names is wrapped in a :class:`zjournal.JournaledDB` and
  recovered from its journal (:mod:`zjournal.zope.config`);
* what Zope writes at startup (the application object, its user folder,
  the initial user) is journaled as the command
  ``zjournal.zope.initialize``, so that a rebuild reproduces it;
* in a request, :func:`execute` runs a command in the request's
  transaction; the publisher commits it (and retries it on a conflict).

Write commands for OFS objects as :class:`ZopeCommand` subclasses.
"""
from Acquisition import aq_base
from Acquisition import aq_inner
from Acquisition import aq_parent

import zjournal
from zjournal.errors import NotJournaledConnectionError
from zjournal.zope.commands import ANONYMOUS
from zjournal.zope.commands import SYSTEM
from zjournal.zope.commands import ActingUserError
from zjournal.zope.commands import AddUser
from zjournal.zope.commands import InitializeApplication
from zjournal.zope.commands import ZopeCommand
from zjournal.zope.commands import application
from zjournal.zope.commands import current_user


def connection(context):
    """The ZODB connection ``context`` (an OFS object) is loaded by.

    An object not yet added to the ZODB has none of its own: its
    acquisition parents are asked.
    """
    obj = context
    while obj is not None:
        jar = getattr(aq_base(obj), "_p_jar", None)
        if jar is not None:
            return jar
        obj = aq_parent(aq_inner(obj))
    raise NotJournaledConnectionError(
        "%r is not stored in a ZODB (nor is any of its acquisition"
        " parents): pass an object loaded from the database" % (context,))


def execute(context, command, metadata=None):
    """Run ``command`` in the transaction of the request ``context`` is in.

    ``context`` is any persistent object of the database (typically a
    view's ``self.context``).  A :class:`ZopeCommand` is journaled with the
    user executing it (:func:`current_user`), unless its ``acting_user``
    was set.  The publisher commits the transaction, and with it the
    journal record; if the request fails, nothing is journaled.
    """
    conn = connection(context)
    if isinstance(command, ZopeCommand) and \
            "acting_user" not in vars(command):
        command.acting_user = current_user()
    return zjournal.execute(conn, command, _with_user(conn, metadata))


def _with_user(conn, metadata):
    """``metadata`` with the journal's "user" as Zope users read it.

    The publisher records ``"<user folder path> <user id>"`` as the
    transaction's user, and the root user folder's path is empty: the
    journal would show " admin".  The leading space goes; a user of a
    deeper folder keeps the "path id" form.  Metadata that names a user
    itself is left as it is.
    """
    if metadata is not None and "user" in metadata:
        return metadata
    user = conn.transaction_manager.get().user
    if not user.startswith(" ") or not user.strip():
        return metadata
    return dict(metadata or (), user=user.lstrip(" "))


def journaled_db(name="main"):
    """The :class:`zjournal.JournaledDB` guarding Zope's database ``name``."""
    from zjournal.zope.config import journaled_dbs
    try:
        return journaled_dbs[name]
    except KeyError:
        raise NotJournaledConnectionError(
            "no <zjournal> section guards database %r in this process"
            " (guarded: %s)" % (name, ", ".join(sorted(journaled_dbs))
                                or "none")) from None


__all__ = [
    "ANONYMOUS", "SYSTEM", "ActingUserError", "AddUser",
    "InitializeApplication", "ZopeCommand", "application", "connection",
    "current_user", "execute", "journaled_db",
]
