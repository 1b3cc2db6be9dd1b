"""HTML pages, rendered with ``string.Template`` and ``html.escape``.

A template language would be the choice of a bigger application; the
bank's two pages do not need one.
"""
import datetime
import html
import string

LAYOUT = string.Template("""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>$title</title>
<style>
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; }
td, th { padding: 0.2em 0.8em; text-align: left; }
.error { color: #a00; } .message { color: #070; }
form { margin: 0.5em 0; }
</style></head>
<body>
<h1>$title</h1>
$notice
$body
<p><small>The journal holds $seq commands.</small></p>
</body>
</html>
""")

HOME = string.Template("""
<table>
<tr><th>Account</th><th>Balance</th><th>Operations</th></tr>
$rows
</table>
<h2>Open an account</h2>
<form method="post" action="$base/do/open">
<input name="owner" placeholder="owner">
<input name="initial" placeholder="initial deposit" value="0">
<button type="submit">Open</button></form>
<h2>Deposit or withdraw</h2>
<form method="post" action="$base/do/deposit">
<input name="owner" placeholder="owner">
<input name="amount" placeholder="amount">
<button type="submit">Deposit</button></form>
<form method="post" action="$base/do/withdraw">
<input name="owner" placeholder="owner">
<input name="amount" placeholder="amount">
<button type="submit">Withdraw</button></form>
<h2>Transfer</h2>
<form method="post" action="$base/do/transfer">
<input name="source" placeholder="from"> <input name="target" placeholder="to">
<input name="amount" placeholder="amount">
<button type="submit">Transfer</button></form>
<p><a href="$base/api/accounts">The same as JSON</a></p>
""")

ROW = string.Template(
    '<tr><td><a href="$url">$owner</a></td><td>$balance</td>'
    '<td>$operations</td></tr>')

HISTORY_ROW = string.Template(
    "<tr><td>$seq</td><td>$time</td><td>$kind</td><td>$amount</td>"
    "<td>$balance</td><td><code>$receipt</code></td></tr>")

HISTORY = string.Template("""
<table>
<tr><th>Seq</th><th>Time (UTC)</th><th>Operation</th><th>Amount</th>
<th>Balance</th><th>Receipt</th></tr>
$rows
</table>
<p><a href="$base/">All accounts</a></p>
""")


def _e(value):
    return html.escape(str(value))


def _time(seconds):
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def layout(title, body, seq, message=None, error=None):
    notice = ""
    if error:
        notice = '<p class="error">%s</p>' % _e(error)
    elif message:
        notice = '<p class="message">%s</p>' % _e(message)
    return LAYOUT.substitute(title=_e(title), notice=notice, body=body,
                             seq=seq)


def home(request, accounts, seq, message=None, error=None):
    rows = "\n".join(ROW.substitute(
        url=_e(request.route_url("account", owner=a.owner)),
        owner=_e(a.owner), balance=a.balance, operations=len(a.history))
        for a in accounts)
    body = HOME.substitute(rows=rows, base=_e(request.application_url))
    return layout("Bank", body, seq, message, error)


def history(request, account, seq):
    rows = "\n".join(HISTORY_ROW.substitute(
        seq=s, time=_time(t), kind=_e(kind), amount=amount, balance=balance,
        receipt=_e(receipt))
        for s, t, kind, amount, balance, receipt in account.history)
    body = HISTORY.substitute(rows=rows, base=_e(request.application_url))
    return layout("Account %s: balance %d" % (account.owner, account.balance),
                  body, seq)
