"""The example Pyramid application (examples/bank), tested as users run it.

The application is built from a copy of its own ``development.ini``
(placed in the test's directory, so that Data.fs and the journal land
there), through WebTest and, once, through ``pserve`` serving HTTP on a
free port.  The example lives in the checkout, not in the installed
package: these tests skip when the checkout's ``examples/bank`` is absent.
"""
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("pyramid_zodbconn")
pytest.importorskip("pyramid_retry")
pytest.importorskip("webtest")
pytest.importorskip("waitress")

import webtest  # noqa: E402
from pyramid.paster import get_app  # noqa: E402

from zjournal.pyramid import get_journaled_db  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[3] / "examples" / "bank"
INI = EXAMPLE / "development.ini"

pytestmark = pytest.mark.skipif(
    not INI.is_file(),
    reason="no example application at %s (an installed package, not a"
           " checkout)" % EXAMPLE)


@pytest.fixture
def ini(tmp_path, monkeypatch):
    """A copy of the example's ini in tmp_path; the example importable."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    path = tmp_path / "development.ini"
    shutil.copy(str(INI), str(path))
    return path


@pytest.fixture
def opened(ini):
    """Build applications from the ini; close them when the test ends."""
    made = []

    def build():
        app = get_app(str(ini))
        made.append(get_journaled_db(app.registry))
        return webtest.TestApp(app)

    yield build
    for jdb in made:
        jdb.close()


def everything(client):
    """The bank as its JSON views show it: every account, in full."""
    listing = client.get("/api/accounts").json
    details = {a["owner"]: client.get("/api/accounts/%s" % a["owner"]).json
               for a in listing["accounts"]}
    return listing, details


def workload(client):
    """Customers at work, through the forms and through JSON."""
    client.post("/do/open", {"owner": "alice", "initial": "100"}, status=303)
    client.post_json("/api/accounts", {"owner": "bob"}, status=201)
    client.post_json("/api/accounts", {"owner": "carol", "initial": 7},
                     status=201)
    client.post("/do/deposit", {"owner": "bob", "amount": "40"}, status=303)
    client.post_json("/api/accounts/alice/withdraw", {"amount": 30})
    client.post_json("/api/transfers",
                     {"source": "alice", "target": "carol", "amount": 25})
    client.post("/do/transfer",
                {"source": "bob", "target": "alice", "amount": "15"},
                status=303)


def test_commands_through_forms_and_json_views(opened):
    client = opened()
    workload(client)
    listing, details = everything(client)
    assert listing["seq"] == 7
    assert {a["owner"]: a["balance"] for a in listing["accounts"]} == {
        "alice": 100 - 30 - 25 + 15, "bob": 40 - 15, "carol": 7 + 25}
    assert [h["kind"] for h in details["alice"]["history"]] == [
        "open", "withdraw", "transfer to carol", "transfer from bob"]
    # The history was written by the commands, in journal order.
    assert [h["seq"] for h in details["alice"]["history"]] == [1, 5, 6, 7]
    page = client.get("/")
    assert "alice" in page.text and "<td>60</td>" in page.text
    assert "The journal holds 7 commands." in page.text
    assert "transfer from alice" in client.get("/accounts/carol").text
    # The form's redirect names the receipt, which the history holds.
    res = client.post("/do/deposit", {"owner": "carol", "amount": "1"})
    receipt = client.get("/api/accounts/carol").json["history"][-1]["receipt"]
    assert receipt in res.follow().text
    # Each command is journaled with where it came from.
    jdb = get_journaled_db(client.app.registry)
    entries = list(jdb.journal.entries())
    assert [(e.command_name, e.description) for e in entries[:2]] == [
        ("zjournal_bank.open", "/do/open"),
        ("zjournal_bank.open", "/api/accounts")]
    assert entries[4].args == {"owner": "alice", "amount": 30}


def test_a_failing_command_leaves_nothing(opened, ini):
    client = opened()
    workload(client)
    data_fs = ini.parent / "Data.fs"
    before = everything(client)
    size = data_fs.stat().st_size
    # Too much, through the form: the page says why and shows the balance
    # the database holds, not the one the refused command computed.
    page = client.post("/do/withdraw", {"owner": "alice", "amount": "1000"},
                       status=400)
    assert "alice has 60, cannot pay 1000" in page.text
    assert "<td>60</td>" in page.text and "<td>-940</td>" not in page.text
    # Through JSON, and a transfer from an account that does not exist.
    res = client.post_json("/api/accounts/bob/withdraw", {"amount": 26},
                           status=400)
    assert res.json == {"error": "bob has 25, cannot pay 26"}
    res = client.post_json("/api/transfers", {"source": "dave",
                                              "target": "bob", "amount": 1},
                           status=400)
    assert "no account 'dave'" in res.json["error"]
    client.post("/do/deposit", {"owner": "bob", "amount": "ten"}, status=400)
    assert everything(client) == before
    assert data_fs.stat().st_size == size
    assert get_journaled_db(client.app.registry).journal.last_seq == 7


def test_a_conflict_is_retried(opened, monkeypatch):
    """Another thread deposits into the same account while a request's
    deposit runs: the request's commit conflicts, pyramid_retry runs it
    again, and both deposits count once."""
    from zjournal_bank import commands
    client = opened()
    jdb = get_journaled_db(client.app.registry)
    client.post_json("/api/accounts", {"owner": "alice"}, status=201)
    executed = []
    original = commands.Deposit.execute

    def racing_execute(self, root, context):
        result = original(self, root, context)
        executed.append(self.amount)
        if len(executed) == 1:
            other = threading.Thread(
                target=jdb.execute, args=(commands.Deposit("alice", 1000),))
            other.start()
            other.join()
        return result

    monkeypatch.setattr(commands.Deposit, "execute", racing_execute)
    res = client.post_json("/api/accounts/alice/deposit", {"amount": 5})
    # The request ran twice; the other thread's deposit once, in between.
    assert executed == [5, 1000, 5]
    assert res.json["account"]["balance"] == 1005
    assert [(e.command_name, e.args.get("amount")) for e in
            jdb.journal.entries()] == [("zjournal_bank.open", None),
                                       ("zjournal_bank.deposit", 1000),
                                       ("zjournal_bank.deposit", 5)]
    assert client.get("/api/accounts/alice").json["balance"] == 1005


def test_restarted_without_its_data_fs_the_app_comes_back_identical(
        opened, ini):
    client = opened()
    workload(client)
    before = everything(client)
    get_journaled_db(client.app.registry).close()
    for path in glob.glob(str(ini.parent / "Data.fs*")):
        os.remove(path)
    client = opened()
    found = get_journaled_db(client.app.registry).recovery
    assert (found.action, found.replayed) == ("rebuilt", 7)
    # Times (context.time) and receipts (context.random) included.
    assert everything(client) == before


# -- served by pserve --------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``pserve`` serving the ini in a subprocess, driven over HTTP."""

    def __init__(self, ini):
        self.ini = ini
        self.port = _free_port()
        ini.write_text(re.sub(r"(?m)^listen = .*$",
                              "listen = 127.0.0.1:%d" % self.port,
                              ini.read_text()))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(EXAMPLE)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyramid.scripts.pserve", str(ini)],
            cwd=str(ini.parent), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True)
        self._wait_until_serving()

    def _wait_until_serving(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("pserve exited: %s"
                                     % self.proc.stdout.read())
            try:
                self.get("/api/accounts")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        self.proc.kill()
        raise AssertionError("pserve did not serve within 30s: %s"
                             % self.proc.communicate()[0])

    def request(self, path, data=None):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.port, path), data=body,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path):
        status, data = self.request(path)
        assert status == 200, (status, data)
        return data

    def stop(self):
        """Ctrl-C: pserve exits, and zjournal closes the database."""
        self.proc.send_signal(signal.SIGINT)
        output = self.proc.communicate(timeout=60)[0]
        return self.proc.returncode, output


def test_pserve_serves_the_ini_and_rebuilds_after_losing_data_fs(ini):
    served = Served(ini)
    try:
        assert served.request("/api/accounts", {"owner": "alice",
                                                "initial": 50})[0] == 201
        assert served.request("/api/accounts", {"owner": "bob"})[0] == 201
        assert served.request("/api/transfers", {
            "source": "alice", "target": "bob", "amount": 20})[0] == 200
        status, refused = served.request("/api/accounts/bob/withdraw",
                                         {"amount": 21})
        assert (status, refused) == (400, {"error":
                                           "bob has 20, cannot pay 21"})
        before = [served.get("/api/accounts"),
                  served.get("/api/accounts/alice"),
                  served.get("/api/accounts/bob")]
    finally:
        status, output = served.stop()
    assert status == 0, output
    # Closed at exit: FileStorage saved an index that covers every
    # transaction (the one saved at open covers none), and the next start
    # need not scan the file.
    from ZODB.fsIndex import fsIndex
    saved = fsIndex.load(str(ini.parent / "Data.fs.index"))
    assert saved["pos"] == (ini.parent / "Data.fs").stat().st_size, output
    assert "initialized" in output  # zjournal's startup line, logged
    for path in glob.glob(str(ini.parent / "Data.fs*")):
        os.remove(path)
    served = Served(ini)
    try:
        after = [served.get("/api/accounts"),
                 served.get("/api/accounts/alice"),
                 served.get("/api/accounts/bob")]
    finally:
        status, output = served.stop()
    assert status == 0, output
    assert "rebuilt" in output
    assert after == before
    assert before[0]["seq"] == 3
