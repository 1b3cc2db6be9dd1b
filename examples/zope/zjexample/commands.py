"""Commands changing OFS objects.

Each names its target by path: a command's arguments are journaled, and a
path means the same object on replay (a persistent object would not).
"""
from zjournal.zope import ZopeCommand


class AddFolder(ZopeCommand):
    command_name = "zjexample.add_folder"

    def __init__(self, path, id, title=""):
        self.path = path
        self.id = id
        self.title = title

    def apply(self, app, context):
        container = app.unrestrictedTraverse(self.path)
        # Through the product's factory, as the ZMI's add menu does.
        container.manage_addProduct["OFSP"].manage_addFolder(
            self.id, self.title)
        return "/".join(container[self.id].getPhysicalPath())


class SetProperty(ZopeCommand):
    """Set a property, adding it first if the object lacks it."""

    command_name = "zjexample.set_property"

    def __init__(self, path, name, value, type="string"):
        self.path = path
        self.name = name
        self.value = value
        self.type = type

    def apply(self, app, context):
        obj = app.unrestrictedTraverse(self.path)
        if obj.hasProperty(self.name):
            obj._updateProperty(self.name, self.value)
        else:
            obj.manage_addProperty(self.name, self.value, self.type)
        # context.time is journaled: the same on replay.
        obj.zjexample_changed = context.time


class Rename(ZopeCommand):
    command_name = "zjexample.rename"

    def __init__(self, path, old, new):
        self.path = path
        self.old = old
        self.new = new

    def apply(self, app, context):
        app.unrestrictedTraverse(self.path).manage_renameObject(
            self.old, self.new)
