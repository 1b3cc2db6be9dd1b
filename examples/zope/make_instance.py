"""Make a Zope instance home from the templates in ``etc/``.

Usage::

    python examples/zope/make_instance.py [INSTANCE] [--port PORT]
                                          [--journal JOURNAL]

``INSTANCE`` defaults to ``instance/`` beside this script, so that
nothing is written outside the checkout unless asked.  The script fills
the braces of ``etc/zope.conf.in`` and ``etc/zope.ini.in`` (``{instance}``:
the instance's absolute path; ``{journal}``: the journal's directory or
URI, by default ``INSTANCE/var/journal``; ``{port}``: the HTTP port,
8080 by default), copies ``etc/site.zcml``, and makes ``var/``.  It
refuses to overwrite an instance's configuration: delete the directory to
start again.  Then, with this directory on ``PYTHONPATH`` (for the
``zjexample`` add-on)::

    python -m zjournal.zope.adduser -c INSTANCE/etc/zope.conf admin secret
    runwsgi INSTANCE/etc/zope.ini
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "etc")


def make_instance(instance, port=8080, journal=None):
    """Write the instance's ``etc/`` and make its ``var/``; return the
    path of its ``zope.conf``."""
    instance = os.path.abspath(instance)
    etc = os.path.join(instance, "etc")
    if os.path.exists(os.path.join(etc, "zope.conf")):
        raise SystemExit("make_instance: %s already holds an instance"
                         " (etc/zope.conf); delete it to start again"
                         % instance)
    values = {"instance": instance, "port": port,
              "journal": journal or os.path.join(instance, "var",
                                                 "journal")}
    os.makedirs(etc, exist_ok=True)
    os.makedirs(os.path.join(instance, "var"), exist_ok=True)
    for name in ("zope.conf", "zope.ini"):
        with open(os.path.join(TEMPLATES, name + ".in")) as f:
            text = f.read().format(**values)
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)
    shutil.copy(os.path.join(TEMPLATES, "site.zcml"),
                os.path.join(etc, "site.zcml"))
    return os.path.join(etc, "zope.conf")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="make_instance.py",
        description="Make a journaled Zope instance from the templates in"
                    " examples/zope/etc.")
    parser.add_argument("instance", nargs="?",
                        default=os.path.join(HERE, "instance"),
                        help="the instance directory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080,
                        help="the HTTP port (default: %(default)s)")
    parser.add_argument("--journal",
                        help="the journal: a directory or a journal URI"
                             " (default: INSTANCE/var/journal)")
    args = parser.parse_args(argv)
    conf = make_instance(args.instance, args.port, args.journal)
    print("made %s" % conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
