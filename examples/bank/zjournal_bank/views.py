"""The bank's views: HTML forms for people, JSON for programs.

Views read the ZODB through the request's connection and change it only
with ``request.execute(command)``: the command joins the request's
transaction, and pyramid_tm commits it -- the journal record and the
ZODB change together -- when the view has returned.
"""
from pyramid.httpexceptions import HTTPBadRequest
from pyramid.httpexceptions import HTTPNotFound
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.response import Response
from pyramid.view import view_config
from pyramid_zodbconn import get_connection

from zjournal import MARKER_KEY
from zjournal_bank import pages
from zjournal_bank.commands import BankError
from zjournal_bank.commands import Deposit
from zjournal_bank.commands import NoSuchAccount
from zjournal_bank.commands import OpenAccount
from zjournal_bank.commands import Transfer
from zjournal_bank.commands import Withdraw
from zjournal_bank.commands import find_bank

# action -> (command class, the names of its arguments)
ACTIONS = {
    "open": (OpenAccount, ("owner", "initial")),
    "deposit": (Deposit, ("owner", "amount")),
    "withdraw": (Withdraw, ("owner", "amount")),
    "transfer": (Transfer, ("source", "target", "amount")),
}
AMOUNTS = ("initial", "amount")


def includeme(config):
    config.add_route("home", "/")
    config.add_route("act", "/do/{action}")
    config.add_route("account", "/accounts/{owner}")
    config.add_route("api_accounts", "/api/accounts")
    config.add_route("api_account", "/api/accounts/{owner}")
    config.add_route("api_account_action", "/api/accounts/{owner}/{action}")
    config.add_route("api_transfers", "/api/transfers")
    config.scan(__name__)


# -- reading -----------------------------------------------------------------

def _root(request):
    return get_connection(request).root()


def _seq(root):
    """How many commands the state reflects (the journal's sequence)."""
    marker = root.get(MARKER_KEY)
    return marker.last_seq if marker is not None else 0


def _accounts(root):
    bank = find_bank(root)
    return list(bank.accounts.values()) if bank is not None else []


def _find(root, owner):
    bank = find_bank(root)
    account = bank.accounts.get(owner) if bank is not None else None
    if account is None:
        raise HTTPNotFound(str(NoSuchAccount(owner)))
    return account


def _summary(account):
    return {"owner": account.owner, "balance": account.balance,
            "opened": account.opened, "operations": len(account.history)}


def _detail(account):
    data = _summary(account)
    data["history"] = [
        {"seq": seq, "time": t, "kind": kind, "amount": amount,
         "balance": balance, "receipt": receipt}
        for seq, t, kind, amount, balance, receipt in account.history]
    return data


# -- changing ----------------------------------------------------------------

def _command(action, values, fixed=None):
    """The command for ``action`` from form or JSON values."""
    try:
        cls, names = ACTIONS[action]
    except KeyError:
        raise HTTPNotFound("no action %r" % action) from None
    args = dict(fixed or {})
    for name in names:
        if name in args:
            continue
        value = values.get(name)
        if value is None:
            if name == "initial":
                value = 0
            else:
                raise BankError("%s is missing" % name)
        if name in AMOUNTS and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise BankError("%s must be a whole number, not %r"
                                % (name, value)) from None
        args[name] = value
    return cls(**args)


def _run(request, action, values, fixed=None):
    """Execute the command; on a refusal, forget its half-made changes.

    A command that raises dooms the request's transaction, so nothing it
    did is ever committed.  Its changes are still in this request's
    objects, though: rolling back to a savepoint taken before it keeps
    the error page from showing them.
    """
    savepoint = request.tm.savepoint()
    try:
        command = _command(action, values, fixed)
        return command, request.execute(command)
    except BankError:
        savepoint.rollback()
        raise


# -- HTML --------------------------------------------------------------------

def _home(request, status=200, error=None):
    root = _root(request)
    body = pages.home(request, _accounts(root), _seq(root),
                      message=request.GET.get("message"), error=error)
    return Response(body, status=status, content_type="text/html",
                    charset="utf-8")


@view_config(route_name="home", request_method="GET")
def home(request):
    return _home(request)


@view_config(route_name="act", request_method="POST")
def act(request):
    action = request.matchdict["action"]
    try:
        _, receipt = _run(request, action, request.POST)
    except BankError as e:
        return _home(request, status=400, error=str(e))
    return HTTPSeeOther(request.route_url(
        "home", _query={"message": "%s: done, receipt %s" % (action,
                                                             receipt)}))


@view_config(route_name="account", request_method="GET")
def account(request):
    root = _root(request)
    found = _find(root, request.matchdict["owner"])
    return Response(pages.history(request, found, _seq(root)),
                    content_type="text/html", charset="utf-8")


# -- JSON --------------------------------------------------------------------

def _json_body(request):
    try:
        body = request.json_body
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise HTTPBadRequest(json_body={"error": "send a JSON object"})
    return body


def _json_run(request, action, fixed=None):
    try:
        command, receipt = _run(request, action, _json_body(request), fixed)
    except BankError as e:
        raise HTTPBadRequest(json_body={"error": str(e)})
    return command, receipt


@view_config(route_name="api_accounts", request_method="GET",
             renderer="json")
def api_accounts(request):
    root = _root(request)
    return {"seq": _seq(root),
            "accounts": [_summary(a) for a in _accounts(root)]}


@view_config(route_name="api_accounts", request_method="POST",
             renderer="json")
def api_open(request):
    command, receipt = _json_run(request, "open")
    request.response.status = 201
    return {"receipt": receipt,
            "account": _detail(_find(_root(request), command.owner))}


@view_config(route_name="api_account", request_method="GET",
             renderer="json")
def api_account(request):
    return _detail(_find(_root(request), request.matchdict["owner"]))


@view_config(route_name="api_account_action", request_method="POST",
             renderer="json")
def api_account_action(request):
    action = request.matchdict["action"]
    if action not in ("deposit", "withdraw"):
        raise HTTPNotFound("no action %r" % action)
    command, receipt = _json_run(request, action,
                                 {"owner": request.matchdict["owner"]})
    return {"receipt": receipt,
            "account": _detail(_find(_root(request), command.owner))}


@view_config(route_name="api_transfers", request_method="POST",
             renderer="json")
def api_transfer(request):
    command, receipt = _json_run(request, "transfer")
    root = _root(request)
    return {"receipt": receipt,
            "accounts": [_summary(_find(root, command.source)),
                         _summary(_find(root, command.target))]}
