"""The ``zjournal`` buildout recipe: one part describes one deployment.

A part such as ::

    [journal]
    recipe = zjournal
    zodb = ${buildout:directory}/var/filestorage/Data.fs
    imports = myapp.commands
    eggs = myapp

installs

* a configuration file, ``parts/journal/zjournal.conf`` by default, with
  one ``[zjournal]`` section naming the journal, its fsync policy, the
  ZODB built from it, the modules defining its commands and the
  environment variable holding its signing key.  The application reads
  the same file (:meth:`Deployment.read`), so the two never disagree;
* a script, ``bin/journal`` (named after the part), that runs
  ``zodb-journal`` on this deployment: ``bin/journal verify`` is
  ``zodb-journal verify JOURNAL --zodb ZODB``, ``bin/journal rebuild
  --until 1200`` is ``zodb-journal rebuild JOURNAL --zodb ZODB --import
  myapp.commands --until 1200``.  Options given on the command line win
  over the defaults (``--zodb`` elsewhere, to rebuild a copy);
* the journal's directory (or an SQLite journal's parent directory) and
  the FileStorage's directory, owner-only (0700), when they are missing.

``install`` returns the part's directory, which holds the configuration
file, and the script: buildout removes them when the part goes away or
changes.  It never returns the journal or the ZODB directory, because
buildout would delete them too -- and the journal is the only copy of
the history; for the same reason it refuses a journal or a FileStorage
inside the part's directory or the bin directory.  A ``config`` file
outside the part's directory (the application's ``.ini``, say) is never
returned either, and gets only its ``[zjournal]`` section written:
whoever created the file, the application may have added sections since.

Nothing in this module imports zc.buildout at import time: the generated
script imports :func:`main` from here, and a deployment's script path
holds zjournal and the application, not buildout.
"""
import configparser
import logging
import os
import re
import stat
import sys
import tempfile
import urllib.parse

from zjournal.errors import ZJournalError
from zjournal.journal import FSYNC_POLICIES
from zjournal.journal import sync_dir

logger = logging.getLogger("zjournal.recipe")

#: The section of the configuration file; other sections are left alone,
#: so a file can also configure the application.
SECTION = "zjournal"
CONFIG_NAME = "zjournal.conf"

#: The options a part understands; others get a warning (a misspelled
#: ``import =`` would otherwise be silently ignored).
OPTIONS = ("recipe", "journal", "fsync", "zodb", "imports", "eggs",
           "hmac-key-env", "script", "config")

#: The subcommands whose ``--zodb`` means the deployment's ZODB: the one
#: to check, or the target of a rebuild or restore, which refuses a ZODB
#: that is not empty, so the default cannot overwrite the live one.
#: Elsewhere ``--zodb`` may name a scratch copy (``replay``), which must
#: not default to the live ZODB.
ZODB_SUBCOMMANDS = ("verify", "rebuild", "restore", "check-replay")

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECTION_LINE = re.compile(r"^\[([^\]]+)\]")
#: Query parameters of a libpq URI that hold secrets.
_SECRET_PARAMETERS = ("password", "sslpassword")

HEADER = """\
# The zjournal deployment of buildout part [%s] (recipe zjournal).
# Buildout rewrites this file: change the part in buildout.cfg instead.
# Applications read it with zjournal.recipe.Deployment.read(path).
"""
PLAIN_HEADER = """\
# A zjournal deployment; read it with zjournal.recipe.Deployment.read(path).
"""


class DeploymentConfigError(ZJournalError):
    """A deployment configuration file is missing or cannot be used."""


class Deployment:
    """What a buildout part says about one deployment's journal.

    ``journal`` is a directory or a journal URI (see :mod:`zjournal.uri`);
    ``zodb`` a FileStorage path or a zodburi URI, or None; ``imports`` the
    modules defining the commands; ``hmac_key_env`` the name of the
    environment variable holding the signing key (never the key: a
    configuration file is no place for a secret).
    """

    def __init__(self, journal, fsync=None, zodb=None, imports=(),
                 hmac_key_env=None, path=None):
        self.journal = journal
        self.fsync = fsync
        self.zodb = zodb
        self.imports = tuple(imports)
        self.hmac_key_env = hmac_key_env
        self.path = path

    def __repr__(self):
        return "<Deployment journal=%r zodb=%r>" % (self.journal, self.zodb)

    @classmethod
    def read(cls, path):
        """Read the ``[zjournal]`` section of a configuration file."""
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except FileNotFoundError:
            raise DeploymentConfigError(
                "no zjournal configuration at %s: run buildout to write it"
                % path) from None
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise DeploymentConfigError(
                "cannot read zjournal configuration %s: %s" % (path, e)) from e
        if not parser.has_section(SECTION):
            raise DeploymentConfigError(
                "%s has no [%s] section" % (path, SECTION))
        section = parser[SECTION]
        journal = section.get("journal", "").strip()
        if not journal:
            raise DeploymentConfigError(
                "%s: [%s] names no journal" % (path, SECTION))
        fsync = section.get("fsync", "").strip() or None
        if fsync is not None and fsync not in FSYNC_POLICIES:
            raise DeploymentConfigError(
                "%s: fsync = %s is not one of %s"
                % (path, fsync, ", ".join(FSYNC_POLICIES)))
        return cls(journal, fsync=fsync,
                   zodb=section.get("zodb", "").strip() or None,
                   imports=section.get("imports", "").split(),
                   hmac_key_env=section.get("hmac-key-env", "").strip()
                   or None,
                   path=path)

    def format(self, part=None):
        """The configuration file's text; ``part`` names the buildout part
        that writes it."""
        return "\n".join([HEADER % part if part else PLAIN_HEADER,
                          "[%s]" % SECTION] + self._options()) + "\n"

    def update_section(self, text, part):
        """``text`` (an INI file's) with its ``[zjournal]`` section
        replaced by this deployment's, or added; the rest is kept as
        written, comments included, for it belongs to the application."""
        body = "\n".join(["[%s]" % SECTION,
                          "# Written by buildout part [%s] (recipe zjournal):"
                          " change the part" % part,
                          "# in buildout.cfg, not this section."]
                         + self._options()) + "\n"
        lines = text.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines)
                  if _SECTION_LINE.match(line)]
        ours = [i for i in starts
                if _SECTION_LINE.match(lines[i]).group(1).strip() == SECTION]
        if not ours:
            kept = text.rstrip("\n")
            return (kept + "\n\n" if kept else "") + body
        start = ours[0]
        end = next((i for i in starts if i > start), len(lines))
        if end < len(lines):
            # The blank line (or the comments) above the next section stay
            # with it.
            while end > start + 1 and (not lines[end - 1].strip() or
                                       lines[end - 1].lstrip()[:1] in "#;"):
                end -= 1
            body += "\n"
        return "".join(lines[:start]) + body + "".join(lines[end:])

    def _options(self):
        lines = ["journal = %s" % self.journal]
        if self.fsync:
            lines.append("fsync = %s" % self.fsync)
        if self.zodb:
            lines.append("zodb = %s" % self.zodb)
        if self.imports:
            lines.append("imports = %s" % " ".join(self.imports))
        if self.hmac_key_env:
            lines.append("hmac-key-env = %s" % self.hmac_key_env)
        return lines

    # -- for the application ----------------------------------------------

    def hmac_key(self):
        """The signing key, or None when the deployment names no variable
        (the journal then consults ``ZJOURNAL_HMAC_KEY`` itself).

        A deployment that signs must not append unsigned records because
        a variable is missing, hence the error.
        """
        if self.hmac_key_env is None:
            return None
        key = os.environ.get(self.hmac_key_env)
        if not key:
            raise DeploymentConfigError(
                "the journal's signing key is missing: environment variable"
                " %s (hmac-key-env in %s) is not set or empty"
                % (self.hmac_key_env, self.path or "the configuration"))
        return key

    def open_journal(self, **kw):
        """Open the journal as the configuration says (a writer unless
        ``readonly=True`` is passed)."""
        from zjournal.uri import open_journal
        if self.fsync is not None:
            kw.setdefault("fsync", self.fsync)
        kw.setdefault("hmac_key", self.hmac_key())
        return open_journal(self.journal, **kw)

    def import_commands(self):
        """Import the modules that register the commands, which replay
        (recovery at open, a rebuild) needs."""
        import importlib
        for name in self.imports:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise DeploymentConfigError(
                    "cannot import %s (imports in %s): %s"
                    % (name, self.path or "the configuration", e)) from e

    def open_db(self, **kw):
        """A :class:`~zjournal.JournaledDB` on the deployment's ZODB and
        journal, recovered; ``kw`` goes to JournaledDB."""
        import ZODB
        from zjournal.db import JournaledDB
        if not self.zodb:
            raise DeploymentConfigError(
                "%s names no zodb" % (self.path or "the configuration"))
        self.import_commands()
        storage, db_kw = _open_storage(self.zodb)
        db = ZODB.DB(storage, **db_kw)
        try:
            journal = self.open_journal()
        except BaseException:
            db.close()
            raise
        return JournaledDB(db, journal, **kw)

    # -- for the script ---------------------------------------------------

    def command_line(self, argv):
        """``zodb-journal`` arguments for ``bin/<script> argv``.

        The journal goes where the subcommand expects its ``JOURNAL``
        argument; ``--import`` and ``--hmac-key-env`` are added where the
        subcommand has them, ``--zodb`` where it means this deployment's
        ZODB (:data:`ZODB_SUBCOMMANDS`).  They come before the user's
        arguments: argparse keeps the last value of an option, so an
        explicit ``--zodb`` wins, and ``--import`` values add up.
        """
        argv = list(argv)
        index = next((i for i, a in enumerate(argv)
                      if not a.startswith("-")), None)
        if index is None:
            return argv  # no subcommand: let zodb-journal explain usage
        shape = _subcommand_shape(argv[index])
        if shape is None:
            return argv  # unknown: zodb-journal says so
        takes_journal, options = shape
        added = [self.journal] if takes_journal else []
        if (self.zodb and "--zodb" in options
                and argv[index] in ZODB_SUBCOMMANDS):
            added += ["--zodb", self.zodb]
        if "--import" in options:
            for name in self.imports:
                added += ["--import", name]
        if self.hmac_key_env and "--hmac-key-env" in options:
            added += ["--hmac-key-env", self.hmac_key_env]
        return argv[:index + 1] + added + argv[index + 1:]


def _subcommand_shape(name):
    """``(takes_journal_first, option_strings)`` of a zodb-journal
    subcommand, or None for an unknown one.

    Read from the command line's own parser, so that subcommands added by
    other modules (``SUBCOMMAND_MODULES``) get this deployment's defaults
    with no list to keep in step here.
    """
    from zjournal import cli
    for action in cli._parser()._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and name in choices:
            sub = choices[name]
            positionals = [a.dest for a in sub._actions
                           if not a.option_strings]
            options = {s for a in sub._actions for s in a.option_strings}
            return positionals[:1] == ["journal"], options
    return None


def _open_storage(spec):
    """``(storage, ZODB.DB keyword arguments)`` for a path or a URI."""
    if not _URI.match(spec):
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(spec), {}
    try:
        import zodburi
    except ImportError:
        raise DeploymentConfigError(
            "zodb = %s needs zodburi: pip install 'zjournal[uri]'"
            % spec) from None
    try:
        factory, db_kw = zodburi.resolve_uri(spec)
    except (KeyError, ValueError) as e:
        raise DeploymentConfigError("cannot open zodb %s: %s"
                                    % (spec, e)) from e
    return factory(), db_kw


def main(config, argv=None):
    """The generated script: ``zodb-journal`` on one deployment."""
    from zjournal import cli
    argv = sys.argv[1:] if argv is None else list(argv)
    name = os.path.basename(sys.argv[0] or "") or "journal"
    try:
        deployment = Deployment.read(config)
    except DeploymentConfigError as e:
        print("%s: error: %s" % (name, e), file=sys.stderr)
        return cli.EXIT_FAILURE
    if all(a.startswith("-") for a in argv):
        # Before zodb-journal's own usage, which names neither the
        # deployment nor what this script fills in.
        print("%s runs zodb-journal COMMAND on the journal %s%s, as"
              " configured in %s" % (
                  name, deployment.journal,
                  " and the ZODB %s" % deployment.zodb
                  if deployment.zodb else "", config), file=sys.stderr)
    return cli.main(deployment.command_line(argv))


# -- the recipe --------------------------------------------------------------

def _user_error(message):
    import zc.buildout
    return zc.buildout.UserError(message)


class Recipe:
    """The ``zjournal`` recipe (entry point ``zc.buildout`` ``default``).

    ``__init__`` checks every option, so that a mistake stops buildout
    before any part is installed, and stores the resolved values back in
    the part's options, for other parts to use (``${journal:journal}``,
    ``${journal:config}``, ``${journal:zodb}``).
    """

    def __init__(self, buildout, name, options):
        self.buildout, self.name, self.options = buildout, name, options
        b = buildout["buildout"]
        self.directory = b["directory"]
        self._check_unknown()
        self.kind, self.location = self._journal()
        options["journal"] = self.journal
        options["fsync"] = self.fsync
        options["zodb"] = self.zodb = self._zodb()
        self.imports = self._words("imports", _MODULE, "a module name")
        options["imports"] = "\n".join(self.imports)
        self.eggs = [e.strip() for e in options.get("eggs", "").splitlines()
                     if e.strip()]
        options["eggs"] = "\n".join(self.eggs)
        env = options.get("hmac-key-env", "").strip()
        if env and not _ENV_VAR.match(env):
            raise _user_error(
                "[%s] hmac-key-env = %s: give the name of an environment"
                " variable (letters, digits, _), not the key itself"
                % (name, env))
        options["hmac-key-env"] = self.hmac_key_env = env
        self.part_directory = os.path.join(b["parts-directory"], name)
        options["location"] = self.part_directory
        options["config"] = self.config = self._path(options.get(
            "config", os.path.join(self.part_directory, CONFIG_NAME)))
        self.script = self._script()
        options["script"] = self.script or ""
        self.bin_directory = b["bin-directory"]
        self._refuse_data_buildout_removes(self.bin_directory)
        self._refuse_config_over_other_files()

    # -- checks --------------------------------------------------------

    def _check_unknown(self):
        if "hmac-key" in self.options:
            raise _user_error(
                "[%s] hmac-key: a signing key does not belong in"
                " buildout.cfg (it ends up in .installed.cfg and in the"
                " configuration file); put it in an environment variable"
                " and name that variable with hmac-key-env" % self.name)
        unknown = sorted(k for k in self.options.keys()
                         if k not in OPTIONS and not k.startswith(("_", "<")))
        if unknown:
            logger.warning("[%s] ignoring unknown option(s) %s (known: %s)",
                           self.name, ", ".join(unknown), ", ".join(OPTIONS))

    def _path(self, value):
        value = value.strip()
        if "\n" in value or not value:
            raise _user_error("[%s] expected one path, got %r"
                              % (self.name, value))
        return os.path.normpath(os.path.join(self.directory,
                                             os.path.expanduser(value)))

    def _journal(self):
        from zjournal.uri import JournalURIError
        from zjournal.uri import parse_journal_uri
        given = self.options.get("journal", "").strip()
        if not given:
            given = os.path.join(self.directory, "var", self.name)
        if not _URI.match(given):
            given = self._path(given)
        try:
            kind, location, uri_options = parse_journal_uri(given)
        except JournalURIError as e:
            raise _user_error("[%s] journal: %s" % (self.name, e)) from None
        fsync = self.options.get("fsync", "").strip()
        if fsync and fsync not in FSYNC_POLICIES:
            raise _user_error("[%s] fsync = %s: use one of %s"
                              % (self.name, fsync, ", ".join(FSYNC_POLICIES)))
        in_uri = uri_options.get("fsync")
        if fsync and in_uri and fsync != in_uri:
            raise _user_error(
                "[%s] fsync = %s contradicts the journal URI's fsync=%s;"
                " give it once" % (self.name, fsync, in_uri))
        self._refuse_password("journal", given)
        self.journal = given
        self.fsync = fsync
        return kind, location

    def _refuse_password(self, option, uri):
        """A password in a URI would be copied into the configuration
        file (readable by others) and ``.installed.cfg``."""
        if not _URI.match(uri):
            return
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if parts.password is None and not any(
                name in _SECRET_PARAMETERS for name, _ in query):
            return
        from zjournal.uri import _safe
        raise _user_error(
            "[%s] %s = %s: a password does not belong in buildout.cfg (it"
            " would be written to .installed.cfg and to the configuration"
            " file); remove it and let libpq find it: ~/.pgpass (or the"
            " file PGPASSFILE names), a service file (?service=NAME), or"
            " PGPASSWORD in the environment of the processes that open the"
            " journal" % (self.name, option, _safe(uri)))

    def _refuse_data_buildout_removes(self, bin_directory):
        """Refuse to keep data where buildout deletes files.

        Buildout removes the part's directory when the part is
        uninstalled, and reinstalls it -- removing it first -- whenever
        one of its options changes; the bin directory is its own too.
        A journal there would be deleted by an innocent edit of
        ``imports``, and it is the only copy of the history.
        """
        data = []
        if self.kind == "file":
            data.append(("journal", self.location))
        elif self.kind == "sqlite":
            data.append(("journal", self.location))
        if self.zodb and not _URI.match(self.zodb):
            data.append(("zodb", self.zodb))
        if _real(self.config) == _real(self.part_directory):
            raise _user_error(
                "[%s] config = %s is the part's directory; name a file"
                % (self.name, self.config))
        for option, path in data:
            for directory, what in (
                    (self.part_directory, "the part's directory %s, which"
                     " buildout deletes when the part is uninstalled or"
                     " its options change"),
                    (bin_directory, "the bin directory %s, which buildout"
                     " manages")):
                if _within(path, directory):
                    raise _user_error(
                        "[%s] %s = %s is inside %s; keep data elsewhere"
                        " (the default is under var/)"
                        % (self.name, option, path, what % directory))

    def _refuse_config_over_other_files(self):
        """The configuration file must be a file of its own, not the data,
        the journal or a script: the recipe writes into it."""
        config = _real(self.config)
        if _within(config, self.bin_directory):
            raise _user_error(
                "[%s] config = %s is inside the bin directory %s, which"
                " holds scripts; name a file of its own"
                % (self.name, self.config, self.bin_directory))
        taken = []
        if self.zodb and not _URI.match(self.zodb):
            # Data.fs and its companions (.index, .lock, .tmp, .old).
            taken.append(("the FileStorage", self.zodb, "."))
        if self.kind == "file":
            taken.append(("the journal", self.location, os.sep))
        elif self.kind == "sqlite":
            # The database and its -wal, -shm and -journal files.
            taken.append(("the SQLite journal", self.location, "-"))
        for what, path, sibling in taken:
            path = _real(path)
            if config == path or config.startswith(path + sibling):
                raise _user_error(
                    "[%s] config = %s would overwrite %s %s; name a file"
                    " of its own" % (self.name, self.config, what, path))

    def _zodb(self):
        value = self.options.get("zodb", "").strip()
        if not value:
            return ""
        if _URI.match(value):
            self._refuse_password("zodb", value)
            return value
        if "://" in value:
            raise _user_error("[%s] zodb = %s: not a path, nor a URI"
                              % (self.name, value))
        return self._path(value)

    def _words(self, option, pattern, what):
        words = self.options.get(option, "").split()
        for word in words:
            if not pattern.match(word):
                raise _user_error("[%s] %s: %r is not %s"
                                  % (self.name, option, word, what))
        return words

    def _script(self):
        script = self.options.get("script")
        if script is None:
            script = self.name
        script = script.strip()
        if script and (os.sep in script or "/" in script
                       or script.startswith(".") or len(script.split()) > 1):
            raise _user_error(
                "[%s] script = %s: give a file name for the bin directory"
                " (or nothing, for no script)" % (self.name, script))
        if script == "buildout":
            raise _user_error(
                "[%s] script = buildout would replace buildout's own script"
                " (and uninstalling the part would delete it); choose"
                " another name" % self.name)
        return script

    def _refuse_foreign_script(self):
        """On install, the part has nothing in bin/: buildout uninstalled
        any earlier version of it first.  A file there already is someone
        else's (another part's script), which buildout would delete with
        this part once it is returned."""
        path = os.path.join(self.bin_directory, self.script)
        if os.path.lexists(path):
            raise _user_error(
                "[%s] script = %s: %s exists and is not this part's (another"
                " part's script?); choose another name, or remove the file"
                " if it is a leftover" % (self.name, self.script, path))

    # -- install -------------------------------------------------------

    def deployment(self):
        return Deployment(self.journal, fsync=self.fsync or None,
                          zodb=self.zodb or None, imports=self.imports,
                          hmac_key_env=self.hmac_key_env or None,
                          path=self.config)

    def install(self, _first=True):
        if self.script and _first:
            self._refuse_foreign_script()
        self._data_directories()
        created = self._write_config()
        if self.script:
            created += self._write_script()
        return created

    def update(self):
        """Same options, new run: put back what went missing, and
        regenerate the script (the eggs it names may have moved).  The
        script in bin/ is this part's, installed by an earlier run."""
        return self.install(_first=False)

    def _data_directories(self):
        if self.kind == "file":
            _private_directory(self.name, self.location, "journal",
                               check=True)
        elif self.kind == "sqlite":
            _private_directory(self.name, os.path.dirname(self.location),
                               "SQLite journal")
        if self.zodb and not _URI.match(self.zodb):
            _private_directory(self.name, os.path.dirname(self.zodb),
                               "FileStorage")

    def _write_config(self):
        """Write the file; return what buildout may remove with the part.

        Inside the part's directory the file is the recipe's: it is
        written whole and the directory is returned.  Anywhere else it is
        an INI file that others may share -- the application's ``.ini``,
        or one the recipe created to which the application has since
        added sections -- so only its ``[zjournal]`` section is written,
        and it is never returned: buildout would delete it with the part.
        Either way the text must parse as INI before and after, so that
        a ``zope.conf`` or a data file named by mistake is left alone.
        """
        own = _within(self.config, self.part_directory)
        path = _real(self.config)  # a symlinked .ini: edit its target
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent)
        try:
            with open(path, encoding="utf-8") as f:
                existing = f.read()
        except FileNotFoundError:
            existing = None
        except (OSError, UnicodeDecodeError) as e:
            raise _user_error("[%s] config = %s: cannot read it: %s"
                              % (self.name, self.config, e)) from None
        deployment = self.deployment()
        if own:
            text = deployment.format(self.name)
        else:
            if existing is not None:
                self._check_ini(existing, "is not an INI file")
            text = deployment.update_section(existing or "", self.name)
        self._check_ini(text, "would not be a valid INI file once edited")
        _replace_file(path, text)
        if own:
            return [self.part_directory]
        logger.info("[%s] wrote the [%s] section of %s", self.name,
                    SECTION, self.config)
        return []

    def _check_ini(self, text, problem):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, self.config)
        except configparser.Error as e:
            first = str(e).splitlines()[0]
            raise _user_error(
                "[%s] config = %s %s (%s); the recipe only edits INI files:"
                " name the application's .ini or a new file"
                % (self.name, self.config, problem, first)) from None

    def _write_script(self):
        import zc.buildout.easy_install
        b = self.buildout["buildout"]
        return list(zc.buildout.easy_install.scripts(
            [(self.script, "zjournal.recipe", "main")],
            self._working_set(), sys.executable, b["bin-directory"],
            arguments=repr(self.config)))

    def _working_set(self):
        """zjournal, plus ``eggs`` (the application, so that the script can
        import the commands), resolved as zc.recipe.egg would."""
        import zc.buildout.easy_install
        b = self.buildout["buildout"]
        specs = ["zjournal"] + self.eggs
        develop, eggs = b["develop-eggs-directory"], b["eggs-directory"]
        if b.get("offline") == "true":
            return zc.buildout.easy_install.working_set(
                specs, sys.executable, [develop, eggs])
        return zc.buildout.easy_install.install(
            specs, eggs, links=b.get("find-links", "").split(),
            index=b.get("index"), path=[develop],
            newest=b.get("newest") == "true",
            allow_hosts=tuple(h.strip() for h in b.get(
                "allow-hosts", "*").splitlines() if h.strip()))


def _real(path):
    return os.path.realpath(os.path.abspath(path))


def _within(path, directory):
    """Whether ``path`` is ``directory`` or lies inside it."""
    path, directory = _real(path), _real(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep)
                                                + os.sep)


def _replace_file(path, text):
    """Write ``path`` atomically and durably, keeping an existing file's
    mode (and, for root, its owner): a crash leaves the old file or the
    new one, never a mix, and no fixed ``.tmp`` name that could be
    someone else's file."""
    directory = os.path.dirname(path)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        before = None
    fd, temporary = tempfile.mkstemp(prefix=".%s." % os.path.basename(path),
                                     suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if before is not None:
                os.chmod(temporary, stat.S_IMODE(before.st_mode))
                if os.geteuid() == 0:
                    os.chown(temporary, before.st_uid, before.st_gid)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(temporary, 0o666 & ~umask)
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    sync_dir(directory)


def _private_directory(part, path, what, check=False):
    """Create ``path`` owner-only.  Leave an existing one alone; with
    ``check``, warn when others may enter it: a journal directory holds
    every command's arguments, so its mode is worth a look.  (A shared
    parent, such as an SQLite journal's or a FileStorage's, is the
    operator's business.)"""
    if os.path.isdir(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if check and mode & 0o077:
            logger.warning(
                "[%s] %s directory %s is open to other users (mode %03o);"
                " chmod 700 it unless they must read it", part, what, path,
                mode)
        return
    if os.path.exists(path):
        raise _user_error("[%s] %s directory %s exists and is not a"
                          " directory" % (part, what, path))
    os.makedirs(path, 0o700)
    os.chmod(path, 0o700)
    logger.info("[%s] created %s directory %s", part, what, path)
