"""A Sphinx directive that documents a zope.interface interface.

autodoc treats classes as Python classes, and an interface is not one: its
attributes and methods live in the interface's own namespace, not in
``__dict__``, so ``autoclass`` finds no members and cannot format a
signature.  This directive reads the interface the way zope.interface
describes it and writes ordinary ``py:class`` / ``py:attribute`` /
``py:method`` entries, so the documentation comes from the code::

    .. autointerface:: zjournal.interfaces.IJournal
"""
import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from zope.interface.interface import InterfaceClass
from zope.interface.interface import Method


def _indented(text, indent):
    return [indent + line if line else "" for line in text.splitlines()]


def interface_rst(iface):
    """The reStructuredText that documents ``iface``."""
    lines = [".. py:class:: %s" % iface.__name__,
             "   :module: %s" % iface.__module__, ""]
    bases = [b for b in iface.__bases__ if b.__name__ != "Interface"]
    if bases:
        lines += ["   Extends %s." % ", ".join(
            ":class:`%s.%s`" % (b.__module__, b.__name__) for b in bases), ""]
    lines += _indented(inspect.cleandoc(iface.__doc__ or ""), "   ") + [""]
    for name in iface.names():
        desc = iface[name]
        if isinstance(desc, Method):
            lines.append("   .. py:method:: %s%s" % (
                name, desc.getSignatureString()))
        else:
            lines.append("   .. py:attribute:: %s" % name)
        lines.append("")
        lines += _indented(inspect.cleandoc(desc.getDoc() or ""), "      ")
        lines.append("")
    return lines


class AutoInterface(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self):
        dotted = self.arguments[0]
        module_name, _, name = dotted.rpartition(".")
        iface = getattr(importlib.import_module(module_name), name, None)
        if not isinstance(iface, InterfaceClass):
            raise self.error("%s is not a zope.interface interface" % dotted)
        self.env.note_dependency(inspect.getsourcefile(
            importlib.import_module(module_name)))
        container = nodes.container()
        source = "<autointerface %s>" % dotted
        self.state.nested_parse(
            StringList(interface_rst(iface), source), self.content_offset,
            container)
        return container.children


def setup(app):
    app.add_directive("autointerface", AutoInterface)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
