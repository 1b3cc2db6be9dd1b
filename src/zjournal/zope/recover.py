"""Bring a Zope instance's databases in line with their journals, offline.

Usage::

    python -m zjournal.zope.recover -c etc/zope.conf

Starts Zope as a script would (without serving), which recovers every
database a ``<zjournal>`` section guards, exactly as the server's startup
does: a missing database is rebuilt from its journal, one that is behind
catches up, one that does not belong to its journal is refused.  Then it
prints what was done and closes the databases.  Use it to rebuild before
switching the server over, or to see what the next startup would find,
without holding the server's port.

Exit status: 0 when every guarded database is current, 1 when zjournal
refused (the message says why), the instance's ZCML does not load, or
the database is in use (the server runs: stop it first), 2 when no
``<zjournal>`` section is configured.  On a refusal the databases already
guarded are closed all the same.
"""
import argparse
import sys

import zc.lockfile
from zope.configuration.exceptions import ConfigurationError

from zjournal.errors import ZJournalError


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m zjournal.zope.recover",
        description="Recover (or rebuild) the databases that zope.conf's"
                    " <zjournal> sections guard, without serving.")
    parser.add_argument("-c", "--configuration", required=True,
                        help="the instance's zope.conf")
    args = parser.parse_args(argv)
    from Zope2.utilities.finder import ZopeFinder
    from zjournal.zope.adduser import close_databases
    from zjournal.zope.adduser import in_use_message
    from zjournal.zope.config import journaled_dbs
    try:
        app = ZopeFinder([sys.argv[0]]).get_app(
            config_file=args.configuration)
    except (ZJournalError, ConfigurationError, zc.lockfile.LockError) as e:
        # A later <zjournal> section may fail after earlier ones opened
        # (and recovered) their databases: close those properly.
        close_databases()
        if isinstance(e, zc.lockfile.LockError):
            message = in_use_message("zjournal.zope.recover", e)
        elif isinstance(e, ConfigurationError):
            # zjournal loads the ZCML early, to replay with it.
            message = ("zjournal.zope.recover: the instance's ZCML does"
                       " not load: %s" % e)
        else:
            message = "zjournal.zope.recover: %s" % e
        print(message, file=sys.stderr)
        return 1
    try:
        app._p_jar.close()
        if not journaled_dbs:
            print("zjournal.zope.recover: %s has no <zjournal> section"
                  % args.configuration, file=sys.stderr)
            return 2
        for name, jdb in sorted(journaled_dbs.items()):
            found = jdb.recovery
            # The journal's seq now, not at recovery: a new instance's
            # initialization was journaled since.
            print("database %s: %s, %d commands replayed in %.2fs; at seq"
                  " %d of journal %s" % (
                      name, found.action, found.replayed, found.seconds,
                      jdb.journal.last_seq, jdb.journal.path))
    finally:
        close_databases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
