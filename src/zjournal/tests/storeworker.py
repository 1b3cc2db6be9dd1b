"""Processes the store tests start: a ZEO server, and another client.

``python -m zjournal.tests.storeworker zeo-server DIR COUNT``
    Serve ``COUNT`` empty FileStorages named ``s0``, ``s1``, ... (files
    in ``DIR``) on 127.0.0.1, on a port the system picks.  Runs ZEO's own
    ``runzeo`` server code; once the server listens it prints
    ``LISTENING <host> <port>`` on standard output, then serves until
    SIGTERM, or until its standard input is closed (the test process
    ended without stopping it).  Asking for port 0 and reporting the port
    bound leaves no window in which another process could take a port
    picked in advance.

``python -m zjournal.tests.storeworker read SPEC``
    Open the store described by the JSON ``SPEC`` (see
    :meth:`zjournal.tests.stores.Store.spec`) as another process would,
    and print as JSON what it finds: the state the example commands wrote
    and the zjournal marker.
"""
import json
import os
import signal
import sys
import threading


def zeo_server(directory, count):
    from ZEO import runzeo

    lines = ["<zeo>", "  address 127.0.0.1:0", "</zeo>"]
    for i in range(count):
        lines += ["<filestorage s%d>" % i,
                  "  path %s" % os.path.join(directory, "s%d.fs" % i),
                  "</filestorage>"]
    config = os.path.join(directory, "zeo.conf")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")

    class Server(runzeo.ZEOServer):

        def create_server(self):
            super().create_server()
            host, port = self.server.acceptor.addr[:2]
            sys.stdout.write("LISTENING %s %d\n" % (host, port))
            sys.stdout.flush()

    def orphaned():
        # The test process holds our standard input open: end of file means
        # it is gone (killed, crashed), and so should the server be.
        # (os.read: a buffered read would hold a lock that stops the
        # interpreter's shutdown.)
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    options = runzeo.ZEOOptions()
    options.realize(["-C", config])
    Server(options).main()


def read(spec):
    import transaction

    from zjournal.marker import get_marker
    from zjournal.tests.examples import state
    from zjournal.tests.stores import open_spec

    db = open_spec(json.loads(spec))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        marker = get_marker(root)
        table, counters = state(root)
        found = {
            "table": table,
            "counters": counters,
            "last_seq": marker.last_seq if marker is not None else None,
            "head": marker.head.hex() if marker is not None else None,
        }
        tm.abort()
        conn.close()
    finally:
        db.close()
    json.dump(found, sys.stdout)


def main(argv):
    if argv[0] == "zeo-server":
        zeo_server(argv[1], int(argv[2]))
    elif argv[0] == "read":
        read(argv[1])
    else:
        raise SystemExit("unknown mode %r" % argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
