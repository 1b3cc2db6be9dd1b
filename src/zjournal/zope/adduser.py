"""Add a Zope user as a journaled command: ``addzopeuser`` for zjournal.

Usage::

    python -m zjournal.zope.adduser -c etc/zope.conf NAME PASSWORD

Zope's own ``addzopeuser`` commits its change outside any command; with
a ``<zjournal>`` section in ``zope.conf`` that transaction is refused (a
rebuild would lose the user).  This script starts Zope the same way,
then journals :class:`~zjournal.zope.commands.AddUser`.  The journal
holds the password's salted hash, never the password.  Run it while
the server is stopped: it needs the database to itself.  Exit status: 0
when the user was added, 1 when zjournal refused or the database is in
use.
"""
import argparse
import sys

import transaction
import zc.lockfile

from zjournal.errors import ZJournalError


def close_databases():
    """Close the journaled databases and Zope's root database.

    A script's process ends right after; closing first saves
    FileStorage's index (which the next startup would otherwise rebuild
    by reading the whole file) and releases the journals' locks.
    """
    import Zope2
    from zjournal.zope.config import journaled_dbs
    for jdb in journaled_dbs.values():
        jdb.close()
    if Zope2.DB is not None:
        Zope2.DB.close()


def in_use_message(prog, error):
    """What to tell the operator when the database is locked.

    FileStorage's lock (``zc.lockfile``) is what stops a second process
    from opening an instance's database: the running server holds it.
    """
    return ("%s: the database is in use (%s): stop the Zope instance first"
            % (prog, error))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m zjournal.zope.adduser",
        description="Add a Manager to Zope's root user folder, journaled.")
    parser.add_argument("-c", "--configuration", required=True,
                        help="the instance's zope.conf")
    parser.add_argument("user")
    parser.add_argument("password")
    args = parser.parse_args(argv)
    from Zope2.utilities.finder import ZopeFinder
    from zjournal.zope import AddUser
    from zjournal.zope import execute
    try:
        app = ZopeFinder([sys.argv[0]]).get_app(
            config_file=args.configuration)
        try:
            execute(app, AddUser(args.user, args.password))
            transaction.commit()
        finally:
            transaction.abort()
            app._p_jar.close()
            close_databases()
    except ZJournalError as e:
        print("zjournal.zope.adduser: %s" % e, file=sys.stderr)
        return 1
    except zc.lockfile.LockError as e:
        print(in_use_message("zjournal.zope.adduser", e), file=sys.stderr)
        return 1
    print("User %s created (journaled)." % args.user)
    return 0


if __name__ == "__main__":
    sys.exit(main())
