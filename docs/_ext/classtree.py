"""A Sphinx directive that draws a class hierarchy from the code.

The API reference shows how zjournal's exceptions derive from each other,
so that a reader knows what an ``except`` clause catches.  A hand-drawn
tree goes stale the day someone adds an exception; this one is read from
``__subclasses__()`` at build time::

    .. class-tree:: zjournal.errors.ZJournalError

It lists the subclasses defined in the root class's module, in the order
they are defined there, as a nested list of ``:exc:`` references (use
``:role: class`` for other classes).  A base from outside the tree is
named after the class, since it changes what catches it.
"""
import importlib
import inspect

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective


def _subclasses(cls, module):
    """Direct subclasses of ``cls`` defined in ``module``, in source order."""
    found = [c for c in cls.__subclasses__() if c.__module__ == module]

    def line(c):
        try:
            return inspect.getsourcelines(c)[1]
        except (OSError, TypeError):
            return 0
    return sorted(found, key=line)


def _dotted(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)


class ClassTree(SphinxDirective):
    required_arguments = 1
    option_spec = {"role": directives.unchanged}

    def run(self):
        dotted = self.arguments[0]
        module_name, _, name = dotted.rpartition(".")
        try:
            root = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as e:
            raise self.error("class-tree: cannot find %s: %s" % (dotted, e))
        self.env.note_dependency(
            inspect.getsourcefile(importlib.import_module(module_name)))
        self.role = self.options.get("role", "exc")
        tree = nodes.bullet_list()
        tree += self._item(root, parent=None)
        return [tree]

    def _item(self, cls, parent):
        item = nodes.list_item()
        para = nodes.paragraph()
        para += addnodes.pending_xref(
            "", nodes.literal(cls.__name__, cls.__name__), refdomain="py",
            reftype=self.role, reftarget=_dotted(cls), refexplicit=True,
            refwarn=True)
        others = [b for b in cls.__bases__
                  if parent is not None and b is not parent]
        if others:
            para += nodes.Text(" (also ")
            for i, base in enumerate(others):
                if i:
                    para += nodes.Text(", ")
                para += nodes.literal(_dotted(base), _dotted(base))
            para += nodes.Text(")")
        item += para
        children = _subclasses(cls, cls.__module__)
        if children:
            sub = nodes.bullet_list()
            for child in children:
                sub += self._item(child, cls)
            item += sub
        return item


def setup(app):
    app.add_directive("class-tree", ClassTree)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
