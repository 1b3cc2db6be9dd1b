"""Views running commands in the publisher's transaction.

They answer GET requests, which keeps the test that drives them short; an
application changes state on POST only (and checks a CSRF token).
"""
import json

from Acquisition import aq_base
from Products.Five.browser import BrowserView

from zjournal.zope import execute
from zjexample import commands


def _path(obj):
    return "/".join(obj.getPhysicalPath()) or "/"


class AddFolder(BrowserView):
    def __call__(self, id, title=""):
        return execute(self.context,
                       commands.AddFolder(_path(self.context), id, title))


class SetProperty(BrowserView):
    def __call__(self, name, value):
        execute(self.context,
                commands.SetProperty(_path(self.context), name, value))
        return "ok"


class Rename(BrowserView):
    def __call__(self, old, new):
        execute(self.context, commands.Rename(_path(self.context), old, new))
        return "ok"


class Unjournaled(BrowserView):
    """Changes an object outside any command: the commit is refused."""

    def __call__(self):
        self.context.title = "changed outside a command"
        return "should not be committed"


class Dump(BrowserView):
    """The OFS tree below the context, as JSON, for comparisons."""

    def __call__(self):
        import Products
        self.request.response.setHeader("Content-Type", "application/json")
        return json.dumps({
            "tree": self._dump(self.context),
            # What the ZMI's add menu offers, duplicates included.
            "meta_types": sorted(m["name"] for m in Products.meta_types),
        }, sort_keys=True)

    def _dump(self, obj):
        base = aq_base(obj)
        node = {
            "id": obj.getId(),
            "meta_type": getattr(base, "meta_type", None),
            "title": getattr(base, "title", None),
            "owner": list(obj.getOwnerTuple() or ()),
            "local_roles": sorted(
                [k, sorted(v)] for k, v in obj.get_local_roles()),
            "properties": sorted(
                [k, str(v)] for k, v in obj.propertyItems())
            if hasattr(base, "propertyItems") else [],
            "changed": getattr(base, "zjexample_changed", None),
            "users": sorted(base.getUserNames())
            if hasattr(base, "getUserNames") else None,
        }
        if hasattr(base, "objectValues"):
            node["children"] = [self._dump(child)
                                for child in obj.objectValues()]
        return node
