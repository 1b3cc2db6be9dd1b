"""A Sphinx directive that documents ``zodb-journal`` from its parser.

The command line reference must not drift from the code, and subcommands
are added by several modules (``zjournal.cli.SUBCOMMAND_MODULES``), so the
reference is read from the ``argparse`` parser at build time instead of
being written by hand.  Three forms::

    .. zodb-journal-cli::

       The program: its usage, its global options, and a table of every
       subcommand linking to the section that documents it.

    .. zodb-journal-cli:: rebuild

       ``--until``
          More about --until than its help string says.

       One subcommand (``archive prune`` for a nested one): its summary,
       usage and every argument and option, placed inside a hand-written
       section whose label is ``cli-rebuild``.  The content, if any, is a
       definition list whose terms name options: each definition is
       added to that option's entry, and a term that names no option is
       an error, so the prose cannot outlive the option it explains.

    .. zodb-journal-cli::
       :remaining:

       A section (labelled ``cli-NAME``) for every subcommand that no
       ``.. zodb-journal-cli:: NAME`` in the same document covers, so a
       new subcommand is documented the moment it exists.

Options become ``std:option`` entries under ``.. program:: zodb-journal
NAME``, so ``:option:`zodb-journal rebuild --until``` links to them.  The
parser comes from the ``argparsedoc_parser`` setting, ``"module:function"``.

Help strings are plain text: they are put into nodes as text, never parsed
as reStructuredText, and the option names they mention become literals
(which also keeps smart quotes from turning ``--until`` into a dash).
"""
import argparse
import importlib
import inspect
import re

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# Options, and words that may be metavars, inside a help string.
_TOKEN = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*|[A-Z][A-Z_]+)(?![\w-])")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+zodb-journal-cli::[ \t]*(\S.*?)\s*$",
                        re.MULTILINE)
_PLACEHOLDER = "argparsedoc-help-%d"
USAGE_WIDTH = 79


def load_parser(spec):
    """The parser that ``"module:function"`` returns."""
    module_name, _, func = spec.partition(":")
    return getattr(importlib.import_module(module_name), func)()


def subcommands(parser):
    """``[(name, aliases, subparser, help)]`` in the order they were added.

    Aliases share their parser with the name, so each parser is listed
    once.
    """
    found = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        seen = {}
        for name, sub in action.choices.items():
            if id(sub) in seen:
                seen[id(sub)][1].append(name)
                continue
            entry = (name, [], sub, helps.get(name))
            seen[id(sub)] = entry
            found.append(entry)
    return found


def find(parser, path):
    """The subparser ``path`` (``"rebuild"``, ``"archive prune"``) names."""
    for word in path.split():
        for name, aliases, sub, _ in subcommands(parser):
            if word == name or word in aliases:
                parser = sub
                break
        else:
            return None
    return parser


def documented_actions(parser, include_help=False):
    """The arguments and options a reader must be told about.

    ``-h`` is documented once, for the program (``include_help``);
    suppressed options are hidden on purpose; subparser actions are
    documented as subcommands.
    """
    return [a for a in parser._actions
            if a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction)
            and (include_help or not isinstance(a, argparse._HelpAction))]


def usage(parser):
    """The usage line, wrapped the same way whatever the terminal."""
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions,
                        parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def signature(action):
    """What ``.. option::`` shows: every spelling with its metavar."""
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    elif action.choices is not None and action.metavar is None:
        metavar = "{%s}" % ",".join(map(str, action.choices))
    return ", ".join("%s %s" % (s, metavar) for s in action.option_strings)


def expanded_help(parser, action):
    """The help string with ``%(default)s`` and friends filled in."""
    if not action.help:
        return ""
    if "%" not in action.help:
        return action.help
    return parser._get_formatter()._expand_help(action)


def facts(action):
    """What the help string may leave unsaid: required, choices, default."""
    text = []
    help_ = (action.help or "").lower()
    if action.required and action.option_strings and "required" not in help_:
        text.append("Required.")
    if isinstance(action, (argparse._AppendAction,
                           argparse._AppendConstAction)) and (
            "repeatable" not in help_):
        text.append("Repeatable.")
    if action.choices is not None and action.option_strings:
        text.append("One of: %s." % ", ".join(map(str, action.choices)))
    default = action.default
    if (action.option_strings and action.nargs != 0
            and default not in (None, [], argparse.SUPPRESS)
            and "default" not in help_):
        text.append("Default: %s." % (default,))
    return " ".join(text)


def metavars(parser):
    """Every metavar of ``parser`` and of its subcommands."""
    found = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in documented_actions(p):
            names = action.metavar or (action.dest.upper()
                                       if not action.option_strings else "")
            found.update(names if isinstance(names, tuple) else [names])
        stack += [sub for _, _, sub, _ in subcommands(p)]
    found.discard("")
    return found


def text_nodes(text, known=frozenset()):
    """Plain text as nodes, with option names and the metavars in
    ``known`` as literals."""
    result = []
    pos = 0
    for match in _TOKEN.finditer(text):
        if not match.group().startswith("-") and match.group() not in known:
            continue
        if match.start() > pos:
            result.append(nodes.Text(text[pos:match.start()]))
        result.append(nodes.literal(match.group(), match.group()))
        pos = match.end()
    if pos < len(text):
        result.append(nodes.Text(text[pos:]))
    return result


def paragraph(text, known=frozenset()):
    return nodes.paragraph("", "", *text_nodes(text, known))


def sentence(text):
    """A help string as a sentence: capitalized, with a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


class CLIDirective(SphinxDirective):
    optional_arguments = 1
    final_argument_whitespace = True
    has_content = True
    option_spec = {"remaining": directives.flag}

    def run(self):
        parser = load_parser(self.config.argparsedoc_parser)
        self._known = metavars(parser)
        self._note_dependencies(parser)
        if "remaining" in self.options:
            if self.content or self.arguments:
                raise self.error(":remaining: takes no argument and no"
                                 " content")
            return self._remaining(parser)
        if not self.arguments:
            return self._program(parser)
        path = self.arguments[0]
        sub = find(parser, path)
        if sub is None:
            raise self.error("%s has no subcommand %r (it has: %s)" % (
                parser.prog, path,
                ", ".join(n for n, _, _, _ in subcommands(parser))))
        return self._reference(sub, self._help_of(parser, path),
                               self._details(sub))

    # -- the three forms -----------------------------------------------

    def _program(self, parser):
        result = [self._usage_block(parser)]
        if parser.description:
            result.append(paragraph(sentence(parser.description),
                                    self._known))
        result += self._options(parser, parser.prog, include_help=True,
                                details=self._details(parser, True))
        result.append(self._table(parser))
        return result

    def _remaining(self, parser):
        covered = set(self._covered())
        result = []
        for name, aliases, sub, help_ in subcommands(parser):
            if name in covered or covered.intersection(aliases):
                continue
            result.append(self._section(name, aliases, sub, help_))
        return result

    def _reference(self, parser, help_, details=None):
        """Usage and options; the summary is the section's business."""
        result = [self._usage_block(parser)]
        if parser.description and parser.description != help_:
            result.append(paragraph(sentence(parser.description),
                                    self._known))
        result += self._options(parser, parser.prog, details=details)
        for name, aliases, sub, sub_help in subcommands(parser):
            result.append(self._section(name, aliases, sub, sub_help,
                                        label_prefix=self._label_path(
                                            parser)))
        return result

    # -- pieces --------------------------------------------------------

    def _section(self, name, aliases, parser, help_, label_prefix="cli-"):
        label = label_prefix + name
        section = nodes.section(ids=[nodes.make_id(label)], names=[label])
        title = nodes.title("", "")
        title += nodes.literal(name, name)
        section += title
        if help_:
            section += paragraph(sentence(help_), self._known)
        if aliases:
            section += paragraph("Also spelled %s." % ", ".join(aliases))
        section += self._reference(parser, help_)
        self.state.document.note_explicit_target(section)
        return section

    def _label_path(self, parser):
        # "zodb-journal archive" -> "cli-archive-"
        words = parser.prog.split()[1:]
        return "cli-" + "".join(w + "-" for w in words)

    def _usage_block(self, parser):
        text = usage(parser)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return block

    def _details(self, parser, include_help=False):
        """The content's definitions, by the action each term names."""
        if not self.content:
            return {}
        container = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, container)
        actions = documented_actions(parser, include_help)
        spellings = {}
        for index, action in enumerate(actions):
            for name in action.option_strings or [signature(action)]:
                spellings[name] = index
        details = {}
        for child in container.children:
            if not isinstance(child, nodes.definition_list):
                raise self.error(
                    "the content of zodb-journal-cli:: for %s must be a"
                    " definition list of its options, not a %s"
                    % (parser.prog, child.tagname))
            for item in child.children:
                term = item.next_node(nodes.term).astext()
                names = [n.split()[0] for n in term.split(", ") if n]
                indexes = {spellings.get(n) for n in names}
                if None in indexes or len(indexes) != 1:
                    raise self.error(
                        "%s has no option %r (it has: %s)"
                        % (parser.prog, term, ", ".join(sorted(spellings))))
                details.setdefault(indexes.pop(), []).extend(
                    item.next_node(nodes.definition).children)
        return details

    def _options(self, parser, program, include_help=False, details=None):
        actions = documented_actions(parser, include_help)
        lines = [".. program:: %s" % program, ""]
        helps = []
        for action in actions:
            lines += [".. option:: %s" % signature(action), "",
                      "   " + _PLACEHOLDER % len(helps), ""]
            text = sentence(expanded_help(parser, action))
            more = facts(action)
            helps.append(" ".join(t for t in (text, more) if t))
        container = nodes.container()
        nested_parse_with_titles(
            self.state, StringList(lines, "<%s>" % program), container)
        for para in list(container.findall(nodes.paragraph)):
            match = re.fullmatch(_PLACEHOLDER.replace("%d", r"(\d+)"),
                                 para.astext())
            if match:
                index = int(match.group(1))
                parent = para.parent
                position = parent.index(para)
                parent.remove(para)
                extra = list((details or {}).get(index, []))
                added = extra
                if helps[index]:
                    added = [paragraph(helps[index], self._known)] + extra
                for offset, node in enumerate(added):
                    parent.insert(position + offset, node)
        return container.children

    def _table(self, parser):
        """Every subcommand with its summary, linked to its section."""
        table = nodes.table()
        group = nodes.tgroup(cols=2)
        table += group
        group += nodes.colspec(colwidth=20)
        group += nodes.colspec(colwidth=60)
        head = nodes.thead()
        group += head
        head += self._row([nodes.Text("subcommand")], [nodes.Text("does")])
        body = nodes.tbody()
        group += body
        for name, _, _, help_ in subcommands(parser):
            ref = addnodes.pending_xref(
                "", nodes.literal(name, name), refdomain="std",
                reftype="ref", reftarget="cli-" + name, refexplicit=True,
                refwarn=True)
            body += self._row([ref], text_nodes(sentence(help_ or ""),
                                                 self._known))
        return table

    @staticmethod
    def _row(*cells):
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *content)
            row += entry
        return row

    def _help_of(self, parser, path):
        *parents, last = path.split()
        owner = find(parser, " ".join(parents)) if parents else parser
        for name, aliases, _, help_ in subcommands(owner):
            if last == name or last in aliases:
                return help_
        return None

    def _covered(self):
        """Subcommands a ``.. zodb-journal-cli:: NAME`` of this page names."""
        with open(self.env.doc2path(self.env.docname),
                  encoding="utf-8") as f:
            source = f.read()
        return [m.group(1).split()[0] for m in _DIRECTIVE.finditer(source)
                if not m.group(1).startswith(":")]

    def _note_dependencies(self, parser):
        """Rebuild the page when the code that defines the parser changes."""
        modules = {self.config.argparsedoc_parser.partition(":")[0]}
        stack = [parser]
        while stack:
            p = stack.pop()
            for value in p._defaults.values():
                if callable(value) and getattr(value, "__module__", None):
                    modules.add(value.__module__)
            stack += [sub for _, _, sub, _ in subcommands(p)]
        for name in sorted(modules):
            try:
                path = inspect.getsourcefile(importlib.import_module(name))
            except (ImportError, TypeError):
                continue
            if path:
                self.env.note_dependency(path)


def setup(app):
    app.add_config_value("argparsedoc_parser", "zjournal.cli:_parser", "env")
    app.add_directive("zodb-journal-cli", CLIDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
