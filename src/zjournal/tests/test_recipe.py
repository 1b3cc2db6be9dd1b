"""Tests of the ``zjournal`` buildout recipe (:mod:`zjournal.recipe`).

Three layers:

* the deployment configuration and the command line the script builds
  from it, in-process;
* the recipe driven through ``zc.buildout.testing``: ``buildoutSetUp``
  makes a sample buildout whose own ``bin/buildout`` installs, updates and
  uninstalls the part in a subprocess, and rejects bad options;
* one real buildout: ``zc.buildout`` run offline in a subprocess on a
  ``buildout.cfg`` in ``tmp_path`` that says ``recipe = zjournal``, then
  the generated ``bin/`` script run on a real journal and FileStorage.

No test uses the network: buildout finds zjournal and its dependencies
through egg-links to where this process has them (what
``zc.buildout.testing.install_develop`` writes), and nothing is written
into the checkout.
"""
import configparser
import json
import os
import stat
import subprocess
import sys
import types

import pytest
import ZODB
import ZODB.FileStorage

from zjournal import demo
from zjournal import recovery
from zjournal.journal import FileJournal
from zjournal.marker import get_marker
from zjournal.recipe import Deployment
from zjournal.recipe import DeploymentConfigError
from zjournal.recipe import main
from zjournal.tests.helpers import snapshot

pytest.importorskip("zc.buildout")

FS_SUFFIXES = ("", ".index", ".lock", ".tmp")


# -- helpers -----------------------------------------------------------------

def link_distributions(develop_eggs, *projects):
    """Let a buildout find ``projects`` and everything they require where
    this process finds them, without an index: one egg-link per location,
    as ``zc.buildout.testing.install_develop`` writes for one project.

    Under pip every location is the virtualenv's site-packages; under the
    development buildout each dependency is an egg of its own.
    """
    import pkg_resources
    dists = pkg_resources.working_set.resolve(
        [pkg_resources.Requirement.parse(p) for p in projects])
    os.makedirs(develop_eggs, exist_ok=True)
    for i, location in enumerate(sorted({d.location for d in dists})):
        path = os.path.join(develop_eggs, "zjournal-test-%d.egg-link" % i)
        with open(path, "w") as f:
            f.write(location + "\n")


def run_commands(config, n=40):
    """Execute demo commands the way the application would: through the
    deployment's configuration file.  Returns (commands, fingerprint)."""
    jdb = Deployment.read(config).open_db()
    try:
        done = 0
        for command in demo.workload(n):
            try:
                jdb.execute(command)
                done += 1
            except demo.InsufficientFunds:
                pass
        assert jdb.journal.last_seq == done
        return done, fingerprint_of(jdb.db)
    finally:
        jdb.close()


def fingerprint_of(db):
    conn = db.open()
    try:
        return demo.fingerprint(conn.root())
    finally:
        conn.close()


def open_fingerprint_and_marker(data_fs):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(data_fs, read_only=True))
    try:
        conn = db.open()
        try:
            root = conn.root()
            return demo.fingerprint(root), get_marker(root).last_seq
        finally:
            conn.close()
    finally:
        db.close()


def replayed_fingerprint(journal_dir, until_seq):
    """The demo state after the first ``until_seq`` commands, replayed
    in-process into a MappingStorage: what a point-in-time rebuild must
    produce."""
    journal = FileJournal(journal_dir, readonly=True)
    db = ZODB.DB(None)
    try:
        recovery.rebuild(db, journal, until_seq=until_seq)
        return fingerprint_of(db)
    finally:
        db.close()
        journal.close()


def installed(buildout_dir, part):
    """The part's section of .installed.cfg: what buildout recorded."""
    parser = configparser.RawConfigParser()
    parser.read(os.path.join(buildout_dir, ".installed.cfg"))
    return dict(parser[part]) if parser.has_section(part) else None


def installed_paths(buildout_dir, part):
    return installed(buildout_dir, part)["__buildout_installed__"].split()


def remove_filestorage(data_fs):
    for suffix in FS_SUFFIXES:
        if os.path.exists(data_fs + suffix):
            os.remove(data_fs + suffix)


# -- the configuration file and the command line -----------------------------

class TestDeployment:

    def _write(self, tmp_path, **kw):
        kw.setdefault("journal", str(tmp_path / "journal"))
        deployment = Deployment(**kw)
        path = tmp_path / "zjournal.conf"
        path.write_text(deployment.format("journal"))
        return str(path)

    def test_round_trip(self, tmp_path):
        path = self._write(tmp_path, fsync="batch", zodb="/srv/Data.fs",
                           imports=["app.commands", "app.more"],
                           hmac_key_env="APP_KEY")
        read = Deployment.read(path)
        assert (read.journal, read.fsync, read.zodb, read.imports,
                read.hmac_key_env, read.path) == (
            str(tmp_path / "journal"), "batch", "/srv/Data.fs",
            ("app.commands", "app.more"), "APP_KEY", path)

    def test_optional_values_are_absent_not_empty(self, tmp_path):
        read = Deployment.read(self._write(tmp_path))
        assert (read.fsync, read.zodb, read.imports, read.hmac_key_env) == (
            None, None, (), None)

    def test_other_sections_are_the_applications(self, tmp_path):
        """The file may configure the application too: only [zjournal]
        is read, and a % in a path is not interpolation."""
        path = tmp_path / "app.ini"
        path.write_text("[app:main]\nuse = egg:app\n\n[zjournal]\n"
                        "journal = /srv/100%/journal\n")
        assert Deployment.read(str(path)).journal == "/srv/100%/journal"

    @pytest.mark.parametrize("text, message", [
        (None, "no zjournal configuration at"),
        ("[other]\nx = 1\n", "has no [zjournal] section"),
        ("[zjournal]\nzodb = /x\n", "names no journal"),
        ("[zjournal]\njournal = /j\nfsync = sometimes\n",
         "fsync = sometimes is not one of always, batch, never"),
        ("not an ini file\n", "cannot read zjournal configuration"),
    ])
    def test_bad_files_are_refused_clearly(self, tmp_path, text, message):
        path = tmp_path / "zjournal.conf"
        if text is not None:
            path.write_text(text)
        with pytest.raises(DeploymentConfigError) as e:
            Deployment.read(str(path))
        assert message in str(e.value)
        assert str(path) in str(e.value)

    def test_command_line_fills_in_what_each_subcommand_takes(self):
        d = Deployment("/j", zodb="/d.fs", imports=["a.b", "c"],
                       hmac_key_env="KEY")
        imports = ["--import", "a.b", "--import", "c"]
        assert d.command_line(["info", "--json"]) == [
            "info", "/j", "--json"]
        assert d.command_line(["-v", "rebuild", "--until", "7"]) == [
            "-v", "rebuild", "/j", "--zodb", "/d.fs"] + imports + [
            "--until", "7"]
        assert d.command_line(["verify"]) == [
            "verify", "/j", "--zodb", "/d.fs", "--hmac-key-env", "KEY"]
        # replay's --zodb is a scratch copy: never the live ZODB.
        assert d.command_line(["replay", "--profile"]) == [
            "replay", "/j"] + imports + ["--profile"]
        # import's journal is its second argument, the user's to give.
        assert d.command_line(["import", "x.jsonl", "/new"]) == [
            "import"] + imports + ["--hmac-key-env", "KEY", "x.jsonl",
                                   "/new"]
        assert d.command_line(["demo"]) == ["demo"]
        assert d.command_line(["--help"]) == ["--help"]
        assert d.command_line(["no-such-command"]) == ["no-such-command"]

    def test_without_zodb_or_imports_nothing_is_invented(self):
        d = Deployment("/j")
        assert d.command_line(["rebuild", "--zodb", "/x.fs"]) == [
            "rebuild", "/j", "--zodb", "/x.fs"]

    def test_command_line_parses(self):
        """Every command line built for a subcommand that takes the
        journal is accepted by zodb-journal's own parser."""
        from zjournal import cli
        d = Deployment("/j", zodb="/d.fs", imports=["a"], hmac_key_env="K")
        parser = cli._parser()
        for name in ("info", "verify", "dump", "stats", "rebuild", "export",
                     "salvage", "replay", "check-replay"):
            extra = ["/dst"] if name == "salvage" else []
            args = parser.parse_args(d.command_line([name] + extra))
            assert args.journal == "/j"

    def test_hmac_key_comes_from_the_named_variable(self, tmp_path,
                                                    monkeypatch):
        d = Deployment.read(self._write(tmp_path, hmac_key_env="APP_KEY"))
        monkeypatch.delenv("APP_KEY", raising=False)
        with pytest.raises(DeploymentConfigError) as e:
            d.open_journal()
        assert "APP_KEY" in str(e.value)
        assert not (tmp_path / "journal").exists()  # nothing was created
        monkeypatch.setenv("APP_KEY", "s3cret")
        assert d.hmac_key() == "s3cret"

    def test_open_journal_applies_fsync(self, tmp_path):
        d = Deployment.read(self._write(tmp_path, fsync="never"))
        with d.open_journal() as journal:
            assert journal.fsync == "never"

    def test_open_db_takes_a_zodburi(self, tmp_path):
        pytest.importorskip("zodburi")
        data_fs = str(tmp_path / "Data.fs")
        path = self._write(tmp_path, fsync="never",
                           zodb="file://%s?connection_cache_size=123"
                           % data_fs, imports=["zjournal.demo"])
        jdb = Deployment.read(path).open_db()
        try:
            assert jdb.db.getCacheSize() == 123
            assert jdb.execute(demo.OpenAccount("ann", 7)) == 7
        finally:
            jdb.close()
        assert open_fingerprint_and_marker(data_fs)[1] == 1

    def test_open_db_without_zodb_is_refused(self, tmp_path):
        with pytest.raises(DeploymentConfigError) as e:
            Deployment.read(self._write(tmp_path)).open_db()
        assert "names no zodb" in str(e.value)

    def test_open_db_reports_an_unimportable_module(self, tmp_path):
        path = self._write(tmp_path, zodb=str(tmp_path / "Data.fs"),
                           imports=["zjournal.no_such_module"])
        with pytest.raises(DeploymentConfigError) as e:
            Deployment.read(path).open_db()
        assert "cannot import zjournal.no_such_module" in str(e.value)
        assert not (tmp_path / "Data.fs").exists()


class TestMain:
    """The script's entry point, in-process."""

    def test_signed_journal_is_verified_with_the_deployments_key(
            self, tmp_path, monkeypatch, capsys):
        journal_dir = str(tmp_path / "journal")
        config = tmp_path / "zjournal.conf"
        config.write_text(Deployment(
            journal_dir, fsync="never", zodb=str(tmp_path / "Data.fs"),
            imports=["zjournal.demo"], hmac_key_env="APP_KEY").format())
        monkeypatch.setenv("APP_KEY", "key-one")
        done, _ = run_commands(str(config), n=10)

        assert main(str(config), ["verify"]) == 0
        out = capsys.readouterr().out
        assert "%d signed, 0 unsigned" % done in out
        assert "is current: seq %d" % done in out

        monkeypatch.setenv("APP_KEY", "another-key")
        assert main(str(config), ["verify"]) == 1
        assert "FAILED" in capsys.readouterr().out

        monkeypatch.delenv("APP_KEY")
        assert main(str(config), ["verify"]) == 1
        assert "APP_KEY is not set" in capsys.readouterr().err

    def test_missing_configuration(self, tmp_path, capsys):
        assert main(str(tmp_path / "gone.conf"), ["info"]) == 1
        err = capsys.readouterr().err
        assert "no zjournal configuration at %s" % (
            tmp_path / "gone.conf") in err
        assert "Traceback" not in err

    def test_no_command_says_what_the_script_is_for(self, tmp_path, capsys):
        config = tmp_path / "zjournal.conf"
        config.write_text(Deployment("/srv/journal").format())
        with pytest.raises(SystemExit) as e:
            main(str(config), [])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "on the journal /srv/journal" in err
        assert "usage:" in err


# -- the recipe object, in-process ------------------------------------------

@pytest.fixture
def bo(tmp_path, monkeypatch):
    """``zc.buildout.testing.Buildout``: a buildout object for the current
    directory, whose sections do not load their recipes, so a test makes
    the Recipe itself.  Offline: script generation resolves eggs."""
    testing = pytest.importorskip("zc.buildout.testing")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    buildout = testing.Buildout()
    buildout["buildout"]["offline"] = "true"
    os.mkdir(buildout["buildout"]["bin-directory"])  # as buildout does
    return buildout


def make_recipe(bo, name="journal", **options):
    from zjournal.recipe import Recipe
    options.setdefault("recipe", "zjournal")
    bo[name] = {k.replace("_", "-"): v for k, v in options.items()}
    return Recipe(bo, name, bo[name])


class TestRecipe:

    def test_defaults_follow_the_part_name(self, bo, tmp_path):
        recipe = make_recipe(bo, "shop-journal")
        paths = recipe.install()
        part = str(tmp_path / "parts" / "shop-journal")
        assert paths == [part, str(tmp_path / "bin" / "shop-journal")]
        d = Deployment.read(os.path.join(part, "zjournal.conf"))
        assert d.journal == str(tmp_path / "var" / "shop-journal")
        assert (d.zodb, d.imports, d.fsync) == (None, (), None)
        assert os.path.isdir(d.journal)

    def test_empty_script_means_none(self, bo, tmp_path):
        paths = make_recipe(bo, script="").install()
        assert paths == [str(tmp_path / "parts" / "journal")]
        assert not (tmp_path / "bin" / "journal").exists()

    def test_a_config_it_created_elsewhere_stays_the_applications(
            self, bo, tmp_path):
        """Outside the part's directory the file is never returned, even
        when the recipe created it: the application may add sections,
        which a later run must keep (and buildout must not delete)."""
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "other.conf").write_text("x")
        ini = tmp_path / "etc" / "production.ini"
        recipe = make_recipe(bo, config="etc/production.ini", script="",
                             imports="a.commands")
        assert recipe.install() == []
        assert Deployment.read(str(ini)).journal == str(
            tmp_path / "var" / "journal")
        app = "\n[app:main]\nuse = egg:myapp\n"
        with open(str(ini), "a") as f:
            f.write(app)
        assert recipe.update() == []
        assert ini.read_text().endswith(app)
        # An option change rewrites the section only.
        assert make_recipe(bo, "again", config="etc/production.ini",
                           script="", imports="b.commands").install() == []
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(str(ini))
        assert parser["app:main"]["use"] == "egg:myapp"
        assert Deployment.read(str(ini)).imports == ("b.commands",)
        assert (tmp_path / "etc" / "other.conf").read_text() == "x"

    def test_not_an_ini_file_is_refused_and_left_alone(self, bo, tmp_path):
        import zc.buildout
        conf = tmp_path / "zope.conf"
        text = ("%define INSTANCE /srv\ninstancehome $INSTANCE\n"
                "<zodb_db main>\n  mount-point /\n</zodb_db>\n")
        conf.write_text(text)
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, config="zope.conf", script="").install()
        assert "config = %s is not an INI file" % conf in str(e.value)
        assert conf.read_text() == text

    @pytest.mark.parametrize("config, zodb, journal, what", [
        ("var/fs/Data.fs", "var/fs/Data.fs", None, "the FileStorage"),
        ("var/fs/Data.fs.index", "var/fs/Data.fs", None, "the FileStorage"),
        ("var/journal/zjournal.conf", None, None, "the journal"),
        ("var/j.sqlite", None, "sqlite://{here}/var/j.sqlite",
         "the SQLite journal"),
        ("var/j.sqlite-wal", None, "sqlite://{here}/var/j.sqlite",
         "the SQLite journal"),
    ])
    def test_config_over_data_is_refused(self, bo, tmp_path, config, zodb,
                                         journal, what):
        import zc.buildout
        options = dict(config=config, script="")
        if zodb:
            options["zodb"] = zodb
        if journal:
            options["journal"] = journal.format(here=tmp_path)
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, **options)
        assert "config = %s would overwrite %s " % (
            tmp_path / config, what) in str(e.value), str(e.value)
        assert not (tmp_path / "var").exists()

    def test_config_over_an_existing_empty_filestorage_is_refused(
            self, bo, tmp_path):
        import zc.buildout
        (tmp_path / "var").mkdir()
        ZODB.FileStorage.FileStorage(str(tmp_path / "var" / "Data.fs")
                                     ).close()
        before = (tmp_path / "var" / "Data.fs").read_bytes()
        with pytest.raises(zc.buildout.UserError,
                           match="would overwrite the FileStorage"):
            make_recipe(bo, zodb="var/Data.fs", config="var/Data.fs")
        # Without the zodb option, it is refused as no INI file.
        with pytest.raises(zc.buildout.UserError, match="not an INI file"):
            make_recipe(bo, "other", config="var/Data.fs",
                        script="").install()
        assert (tmp_path / "var" / "Data.fs").read_bytes() == before

    @pytest.mark.parametrize("config", ["bin/journal", "bin/journal.conf"])
    def test_config_in_the_bin_directory_is_refused(self, bo, tmp_path,
                                                    config):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, config=config)
        assert "config = %s is inside the bin directory" % (
            tmp_path / config) in str(e.value)
        assert os.listdir(str(tmp_path / "bin")) == []

    def test_a_symlinked_ini_is_edited_through_the_link(self, bo, tmp_path):
        etc = tmp_path / "etc"
        etc.mkdir()
        target = etc / "production.ini"
        app = "[app:main]\nuse = egg:myapp\n"
        target.write_text(app)
        os.chmod(str(target), 0o640)
        stray = etc / "production.ini.tmp"
        stray.write_text("someone's")
        link = tmp_path / "production.ini"
        link.symlink_to(target)
        assert make_recipe(bo, config="production.ini",
                           script="").install() == []
        assert link.is_symlink()
        assert os.readlink(str(link)) == str(target)
        assert target.read_text().startswith(app)
        assert Deployment.read(str(target)).journal == str(
            tmp_path / "var" / "journal")
        assert stat.S_IMODE(os.stat(str(target)).st_mode) == 0o640
        assert stray.read_text() == "someone's"
        assert sorted(os.listdir(str(etc))) == ["production.ini",
                                                "production.ini.tmp"]

    @pytest.mark.parametrize("option, uri", [
        ("journal", "postgresql://shop:S3cret@db.example.com/shop"),
        ("journal", "postgresql://shop@db.example.com/shop?password=S3cret"),
        ("journal", "postgres://db.example.com/shop?sslpassword=S3cret"),
        ("zodb", "zeo://shop:S3cret@zeo.example.com:8100"),
    ])
    def test_a_password_in_a_uri_is_refused(self, bo, tmp_path, option,
                                            uri):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, **{option: uri})
        message = str(e.value)
        assert message.startswith("[journal] %s = " % option), message
        assert "S3cret" not in message
        assert "~/.pgpass" in message and "PGPASSWORD" in message
        assert not (tmp_path / "var").exists()
        # A user name, or a libpq service, is no secret.
        make_recipe(bo, "fine", script="", **{option: uri.replace(
            ":S3cret@", "@").replace("password=S3cret", "service=shop")})

    def test_script_named_buildout_is_refused(self, bo, tmp_path):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError,
                           match="script = buildout would replace"):
            make_recipe(bo, script="buildout")

    def test_script_over_another_file_is_refused(self, bo, tmp_path):
        import zc.buildout
        other = tmp_path / "bin" / "app"
        other.write_text("#!/bin/sh\necho the app\n")
        recipe = make_recipe(bo, script="app")
        with pytest.raises(zc.buildout.UserError) as e:
            recipe.install()
        assert "script = app: %s exists and is not this part's" % other \
            in str(e.value)
        assert other.read_text() == "#!/bin/sh\necho the app\n"
        # The part's own script, from an earlier run, is regenerated.
        mine = make_recipe(bo, "mine")
        mine.install()
        assert mine.update() == [str(tmp_path / "parts" / "mine"),
                                 str(tmp_path / "bin" / "mine")]

    def test_sqlite_journal_gets_a_private_parent(self, bo, tmp_path):
        uri = "sqlite://%s/db/journal.sqlite" % tmp_path
        make_recipe(bo, journal=uri, script="").install()
        mode = os.stat(str(tmp_path / "db")).st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert not (tmp_path / "db" / "journal.sqlite").exists()

    def test_uris_are_kept_and_make_no_directories(self, bo, tmp_path):
        recipe = make_recipe(
            bo, journal="postgresql://db.example.com/shop?fsync=batch",
            zodb="zeo://zeo.example.com:8100", script="")
        recipe.install()
        d = Deployment.read(bo["journal"]["config"])
        assert d.journal == "postgresql://db.example.com/shop?fsync=batch"
        assert d.zodb == "zeo://zeo.example.com:8100"
        assert sorted(os.listdir(str(tmp_path))) == ["bin", "eggs", "parts"]

    def test_fsync_given_twice_differently_is_refused(self, bo):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, journal="file:///srv/j?fsync=never",
                        fsync="always")
        assert "contradicts the journal URI's fsync=never" in str(e.value)
        make_recipe(bo, "same", journal="file:///srv/j?fsync=never",
                    fsync="never")

    @pytest.mark.parametrize("option, value, where", [
        ("journal", "parts/journal/history", "the part's directory"),
        ("journal", "sqlite://{here}/parts/journal/j.sqlite",
         "the part's directory"),
        ("journal", "bin/history", "the bin directory"),
        ("zodb", "parts/journal/Data.fs", "the part's directory"),
        ("zodb", "{here}/bin/Data.fs", "the bin directory"),
    ])
    def test_data_where_buildout_deletes_is_refused(self, bo, tmp_path,
                                                    option, value, where):
        # Buildout deletes the part's directory on every option change.
        import zc.buildout
        value = value.format(here=tmp_path)
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, **{option: value})
        message = str(e.value)
        assert message.startswith("[journal] %s = " % option), message
        assert " is inside %s " % where in message, message
        assert "keep data elsewhere" in message
        assert not (tmp_path / "parts" / "journal").exists()
        # The same data under var/ is fine, and so is a part's config in
        # its own directory (the default).
        make_recipe(bo, "elsewhere", **{option: value.replace(
            "parts/journal", "var").replace("bin/", "var/")})

    def test_config_naming_the_part_directory_is_refused(self, bo):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError, match="is the part's"
                           " directory; name a file"):
            make_recipe(bo, config="parts/journal")

    def test_an_application_ini_keeps_its_sections(self, bo, tmp_path):
        """``config`` may name the application's .ini: only [zjournal] is
        the recipe's, and buildout must never delete the file."""
        ini = tmp_path / "production.ini"
        app = ("# the application's\n[app:main]\nuse = egg:myapp\n"
               "zodbconn.uri = file://%(here)s/Data.fs\n\n"
               "[server:main]\nuse = egg:waitress#main\n")
        ini.write_text(app)
        os.chmod(str(ini), 0o640)
        assert make_recipe(bo, config="production.ini", script="",
                           imports="a.commands").install() == []
        text = ini.read_text()
        assert text.startswith(app), text
        assert Deployment.read(str(ini)).imports == ("a.commands",)
        assert stat.S_IMODE(os.stat(str(ini)).st_mode) == 0o640
        # Move the section up, as a person editing the file might; an
        # option change then rewrites it there, and only it.
        _, section = text.split(app)
        ini.write_text(section.strip() + "\n\n" + app)
        assert make_recipe(bo, "again", config="production.ini", script="",
                           imports="b.commands").install() == []
        text = ini.read_text()
        assert text.count("[zjournal]") == 1
        assert text.endswith(app), text
        assert Deployment.read(str(ini)).imports == ("b.commands",)

    def test_zodb_that_is_neither_path_nor_uri(self, bo):
        import zc.buildout
        with pytest.raises(zc.buildout.UserError) as e:
            make_recipe(bo, zodb="://nowhere")
        assert "zodb = ://nowhere: not a path, nor a URI" in str(e.value)


# -- the recipe through zc.buildout.testing ----------------------------------

@pytest.fixture
def sample(monkeypatch):
    """A sample buildout made by ``zc.buildout.testing.buildoutSetUp``:
    its globals (``write``, ``system``, ``buildout``, ``sample_buildout``)
    as attributes.  The helpers change the working directory, HOME and
    buildout's default index; all are put back afterwards."""
    testing = pytest.importorskip("zc.buildout.testing")
    import zc.buildout.easy_install
    monkeypatch.setattr(zc.buildout.easy_install, "default_index_url",
                        zc.buildout.easy_install.default_index_url)
    monkeypatch.delenv("buildout_testing_index_url", raising=False)
    test = types.SimpleNamespace(globs={})
    testing.buildoutSetUp(test)
    try:
        testing.install_develop("zjournal", test)
        link_distributions(
            os.path.join(test.globs["sample_buildout"], "develop-eggs"),
            "zjournal")
        yield types.SimpleNamespace(**test.globs)
    finally:
        testing.buildoutTearDown(test)


PART = """
[buildout]
parts = %(parts)s

[journal]
recipe = zjournal
zodb = var/filestorage/Data.fs
imports = zjournal.demo
fsync = never
%(extra)s
"""


def buildout_cfg(parts="journal", extra=""):
    return PART % dict(parts=parts, extra=extra)


class TestRecipeInSampleBuildout:

    def test_install_writes_and_returns_config_and_script(self, sample):
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg())
        out = sample.system(sample.buildout)
        assert "Installing journal." in out, out
        assert "Error" not in out, out

        script = os.path.join(here, "bin", "journal")
        part = os.path.join(here, "parts", "journal")
        config = os.path.join(part, "zjournal.conf")
        assert sorted(installed_paths(here, "journal")) == sorted(
            [script, part])
        assert os.access(script, os.X_OK)
        with open(script) as f:
            text = f.read()
        assert text.startswith("#!" + sys.executable)
        assert "zjournal.recipe.main(%r)" % config in text

        deployment = Deployment.read(config)
        assert deployment.journal == os.path.join(here, "var", "journal")
        assert deployment.zodb == os.path.join(
            here, "var", "filestorage", "Data.fs")
        assert deployment.imports == ("zjournal.demo",)
        assert deployment.fsync == "never"
        for directory in (deployment.journal,
                          os.path.dirname(deployment.zodb)):
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            assert mode == 0o700, (directory, oct(mode))
        # Resolved values are published for other parts.
        recorded = installed(here, "journal")
        assert recorded["journal"] == deployment.journal
        assert recorded["config"] == config

    def test_info_right_after_install_reports_an_empty_journal(
            self, sample):
        # The recipe makes the journal's directory; no writer has opened
        # it yet.  bin/journal info says so instead of failing, and
        # writes nothing.
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg())
        sample.system(sample.buildout)
        proc = subprocess.run(
            [os.path.join(here, "bin", "journal"), "info"],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "identity:   none yet" in proc.stdout
        assert os.listdir(os.path.join(here, "var", "journal")) == []

    def test_update_regenerates_the_script_and_missing_directories(
            self, sample):
        """Buildout reinstalls a part whose returned files are missing;
        with them present and the options unchanged it calls update(),
        which rewrites a stale script and recreates the data directories
        (a fresh ``var/``), leaving the journal alone."""
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg())
        sample.system(sample.buildout)
        config = os.path.join(here, "parts", "journal", "zjournal.conf")
        script = os.path.join(here, "bin", "journal")
        done, _ = run_commands(config, n=8)
        journal_dir = os.path.join(here, "var", "journal")
        before = snapshot(journal_dir)
        with open(script) as f:
            good = f.read()
        with open(script, "w") as f:
            f.write("#!/bin/sh\nexit 3\n")
        remove_filestorage(os.path.join(here, "var", "filestorage",
                                        "Data.fs"))
        os.rmdir(os.path.join(here, "var", "filestorage"))

        out = sample.system(sample.buildout)
        assert "Updating journal." in out, out
        assert "Installing journal." not in out, out
        with open(script) as f:
            assert f.read() == good
        mode = os.stat(os.path.join(here, "var", "filestorage")).st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert snapshot(journal_dir) == before
        assert FileJournal(journal_dir, readonly=True).last_seq == done

    def test_uninstall_removes_what_it_made_but_never_the_data(self, sample):
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg())
        sample.system(sample.buildout)
        run_commands(os.path.join(here, "parts", "journal", "zjournal.conf"),
                     n=8)
        var = os.path.join(here, "var")
        before = snapshot(var)
        assert any(name.endswith(".zjl") for name in before)

        sample.write("buildout.cfg", buildout_cfg(parts=""))
        out = sample.system(sample.buildout)
        assert "Uninstalling journal." in out, out
        assert not os.path.exists(os.path.join(here, "bin", "journal"))
        assert not os.path.exists(os.path.join(here, "parts", "journal"))
        assert snapshot(var) == before

    def test_a_journal_in_the_part_directory_stops_buildout(self, sample):
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg(
            extra="journal = parts/journal/history"))
        out = sample.system(sample.buildout)
        assert "Error: [journal] journal = " in out, out
        assert "is inside the part's directory" in out, out
        assert "Traceback" not in out, out
        assert not os.path.exists(os.path.join(here, "parts", "journal"))

    def test_uninstall_leaves_an_application_ini(self, sample):
        here = sample.sample_buildout
        ini = os.path.join(here, "production.ini")
        app = "[app:main]\nuse = egg:myapp\n"
        with open(ini, "w") as f:
            f.write(app)
        sample.write("buildout.cfg", buildout_cfg(
            extra="config = production.ini"))
        out = sample.system(sample.buildout)
        assert "Installing journal." in out, out
        # An option change reinstalls the part (uninstall, install), and
        # removing it uninstalls it: the file stays, with its section.
        sample.write("buildout.cfg", buildout_cfg(
            extra="config = production.ini\nscript = jj"))
        out = sample.system(sample.buildout)
        assert "Uninstalling journal." in out, out
        assert Deployment.read(ini).journal == os.path.join(here, "var",
                                                            "journal")
        sample.write("buildout.cfg", buildout_cfg(parts=""))
        sample.system(sample.buildout)
        with open(ini) as f:
            assert f.read().startswith(app)

    def test_an_ini_the_recipe_created_survives_uninstall(self, sample):
        here = sample.sample_buildout
        ini = os.path.join(here, "production.ini")
        sample.write("buildout.cfg", buildout_cfg(
            extra="config = production.ini"))
        out = sample.system(sample.buildout)
        assert "Installing journal." in out, out
        assert os.path.join(here, "production.ini") not in \
            installed_paths(here, "journal")
        app = "\n[app:main]\nuse = egg:myapp\n"
        with open(ini, "a") as f:
            f.write(app)
        sample.system(sample.buildout)  # an update
        sample.write("buildout.cfg", buildout_cfg(parts=""))
        out = sample.system(sample.buildout)
        assert "Uninstalling journal." in out, out
        with open(ini) as f:
            assert f.read().endswith(app)

    def test_existing_open_journal_directory_is_left_alone_with_a_warning(
            self, sample):
        here = sample.sample_buildout
        os.makedirs(os.path.join(here, "var", "journal"), mode=0o755)
        os.chmod(os.path.join(here, "var", "journal"), 0o755)
        sample.write("buildout.cfg", buildout_cfg())
        out = sample.system(sample.buildout)
        assert "is open to other users (mode 755)" in out, out
        mode = os.stat(os.path.join(here, "var", "journal")).st_mode
        assert stat.S_IMODE(mode) == 0o755

    @pytest.mark.parametrize("extra, message", [
        ("fsync = sometimes",
         "[journal] fsync = sometimes: use one of always, batch, never"),
        ("hmac-key = s3cret", "[journal] hmac-key: a signing key does not"
         " belong in buildout.cfg"),
        ("hmac-key-env = not a name", "[journal] hmac-key-env = not a name:"
         " give the name of an environment variable"),
        ("imports = app.commands 2fast", "[journal] imports: '2fast' is not"
         " a module name"),
        ("script = ../journal", "[journal] script = ../journal: give a file"
         " name"),
        ("journal = ftp://host/journal", "[journal] journal: journal URI"
         " 'ftp://host/journal': unknown scheme"),
    ])
    def test_bad_options_stop_buildout_with_a_message(self, sample, extra,
                                                       message):
        here = sample.sample_buildout
        sample.write("buildout.cfg", buildout_cfg(extra=extra))
        out = sample.system(sample.buildout)
        assert "Error: " + message in out, out
        assert "Traceback" not in out, out
        assert not os.path.exists(os.path.join(here, "bin", "journal"))
        assert not os.path.exists(os.path.join(here, "var"))

    def test_unknown_option_is_named_in_a_warning(self, sample):
        sample.write("buildout.cfg", buildout_cfg(extra="import = x"))
        out = sample.system(sample.buildout)
        assert "ignoring unknown option(s) import" in out, out
        assert "Installing journal." in out, out


# -- one real buildout --------------------------------------------------------

class RealBuildout:
    """A buildout directory in ``tmp_path``, run with zc.buildout in a
    subprocess, offline."""

    def __init__(self, root):
        self.root = str(root)
        self.home = os.path.join(self.root, "home")  # no ~/.buildout
        os.makedirs(self.home)
        link_distributions(os.path.join(self.root, "develop-eggs"),
                           "zjournal")

    def run(self, cfg):
        with open(os.path.join(self.root, "buildout.cfg"), "w") as f:
            f.write("[buildout]\noffline = true\nnewest = false\n" + cfg)
        return self._run([sys.executable, "-c",
                          "import sys, zc.buildout.buildout as b;"
                          " sys.exit(b.main())"])

    def script(self, name, *args):
        return self._run([os.path.join(self.root, "bin", name)]
                         + [str(a) for a in args])

    def _run(self, argv):
        env = dict(os.environ, HOME=self.home)
        env.pop("ZJOURNAL_HMAC_KEY", None)
        proc = subprocess.run(argv, cwd=self.root, env=env, timeout=120,
                              capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr

    def path(self, *parts):
        return os.path.join(self.root, *parts)


REAL = """
parts = journal

[journal]
recipe = zjournal
journal = var/journal
zodb = ${buildout:directory}/var/filestorage/Data.fs
imports = zjournal.demo
fsync = never
"""


def test_real_buildout_installs_a_working_script(tmp_path):
    bo = RealBuildout(tmp_path)
    status, out, err = bo.run(REAL)
    assert status == 0, out + err
    assert "Generated script '%s'" % bo.path("bin", "journal") in out + err
    config = bo.path("parts", "journal", "zjournal.conf")
    data_fs = bo.path("var", "filestorage", "Data.fs")
    journal_dir = bo.path("var", "journal")

    # The application writes through the same configuration.
    done, state = run_commands(config)
    assert done > 10

    status, out, err = bo.script("journal", "info", "--json")
    assert status == 0, err
    info = json.loads(out)
    assert (info["path"], info["last_seq"]) == (journal_dir, done)

    # verify checks the journal and, with the deployment's --zodb, that
    # the ZODB belongs to it.
    status, out, err = bo.script("journal", "verify")
    assert status == 0, out + err
    assert "the ZODB %s is current: seq %d" % (data_fs, done) in out

    # rebuild defaults to the deployment's ZODB, which it refuses to
    # overwrite...
    before = snapshot(bo.path("var"))
    status, out, err = bo.script("journal", "rebuild", "--until", 5)
    assert status == 1
    assert "%s exists and is not empty" % data_fs in err
    assert snapshot(bo.path("var")) == before
    # ... and an explicit --zodb wins: a point-in-time copy.
    copy = str(tmp_path / "at-5.fs")
    status, out, err = bo.script("journal", "rebuild", "--until", 5,
                                 "--zodb", copy)
    assert status == 0, err
    assert open_fingerprint_and_marker(copy) == (
        replayed_fingerprint(journal_dir, 5), 5)

    # The ZODB is lost: bin/journal rebuild puts it back, whole.
    remove_filestorage(data_fs)
    status, out, err = bo.script("journal", "rebuild")
    assert status == 0, err
    assert "rebuilt %s" % data_fs in out
    assert open_fingerprint_and_marker(data_fs) == (state, done)
    status, out, err = bo.script("journal", "verify")
    assert status == 0 and "is current: seq %d" % done in out, out + err

    # Changing the part replaces the script and the configuration...
    data = snapshot(bo.path("var"))
    status, out, err = bo.run(REAL.replace("fsync = never",
                                           "fsync = batch\nscript = ops"))
    assert status == 0, out + err
    assert "Uninstalling journal." in out + err
    assert not os.path.exists(bo.path("bin", "journal"))
    assert bo.path("bin", "ops") in installed_paths(bo.root, "journal")
    assert Deployment.read(config).fsync == "batch"
    status, out, err = bo.script("ops", "dump", "--start", done,
                                 "--json")
    assert status == 0, err
    assert json.loads(out)["seq"] == done
    # ... and removing it removes them, but never the data.
    status, out, err = bo.run("parts =\n")
    assert status == 0, out + err
    assert not os.path.exists(bo.path("bin", "ops"))
    assert not os.path.exists(bo.path("parts", "journal"))
    assert installed(bo.root, "journal") is None
    assert snapshot(bo.path("var")) == data

