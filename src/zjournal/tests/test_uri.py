"""Journal URIs (zjournal.uri)."""
import os

import pytest

import zjournal
from zjournal import FileJournal
from zjournal.tests.examples import Put
from zjournal.uri import JournalURIError
from zjournal.uri import parse_journal_uri


class TestParse:

    def test_a_plain_path_is_a_file_journal(self):
        assert parse_journal_uri("var/journal") == ("file", "var/journal", {})

    def test_file_uri_with_options(self):
        assert parse_journal_uri(
            "file:///srv/j%20x?fsync=batch&segment_size=1024") == (
            "file", "/srv/j x", {"fsync": "batch", "segment_size": 1024})

    def test_sqlite_uri(self):
        assert parse_journal_uri("sqlite:///srv/j.sqlite?fsync=never") == (
            "sqlite", "/srv/j.sqlite", {"fsync": "never"})

    def test_postgresql_uri_keeps_libpq_parameters(self):
        kind, location, options = parse_journal_uri(
            "postgres://app@db:5433/prod?table=audit&sslmode=require"
            "&fsync=always")
        assert kind == "postgresql"
        assert location == "postgresql://app@db:5433/prod?sslmode=require"
        assert options == {"table": "audit", "fsync": "always"}

    @pytest.mark.parametrize("uri, words", [
        ("mysql://x/y", "unknown scheme"),
        ("file:///j?fsnyc=always", "unknown option 'fsnyc'"),
        ("file:///j?segment_size=big", "segment_size='big' is not valid"),
        ("file://otherhost/j", "names host 'otherhost'"),
        ("sqlite://", "names no path"),
        ("", "non-empty"),
    ])
    def test_bad_uris_are_clear_errors(self, uri, words):
        with pytest.raises(JournalURIError) as info:
            parse_journal_uri(uri)
        assert words in str(info.value)
        assert isinstance(info.value, zjournal.JournalError)

    @pytest.mark.parametrize("uri", ["file://u:s3cret@h/db",
                                     "mysql://u:s3cret@h/db"])
    def test_passwords_are_masked_in_messages(self, uri):
        with pytest.raises(JournalURIError) as info:
            parse_journal_uri(uri)
        assert "s3cret" not in str(info.value)
        assert "***" in str(info.value)


class TestOpen:

    def test_open_a_file_journal_from_a_uri(self, tmp_path):
        path = str(tmp_path / "j")
        journal = zjournal.open_journal("file://%s?segment_size=4096"
                                        "&fsync=never" % path)
        try:
            assert isinstance(journal, FileJournal)
            assert (journal.path, journal.segment_size, journal.fsync) == (
                path, 4096, "never")
        finally:
            journal.close()

    def test_keywords_win_over_the_uri(self, tmp_path):
        path = str(tmp_path / "j")
        FileJournal(path).close()
        journal = zjournal.open_journal("file://%s?fsync=never" % path,
                                        readonly=True, fsync="always")
        assert (journal.readonly, journal.fsync) == (True, "always")
        journal.close()

    def test_journaled_db_takes_a_uri(self, site):
        jdb = zjournal.JournaledDB(site.db(),
                                   "file://%s?fsync=batch" % site.journal_dir)
        assert jdb.journal.fsync == "batch"
        jdb.execute(Put("a", 1))
        jdb.close()
        assert os.path.isdir(site.journal_dir)


def test_libpq_parameters_keep_their_spaces():
    _, location, _ = parse_journal_uri(
        "postgresql://u@h/db?application_name=my%20app&table=t")
    assert location == "postgresql://u@h/db?application_name=my%20app"


def test_a_password_parameter_is_masked_too():
    with pytest.raises(JournalURIError) as info:
        parse_journal_uri("postgresq://u:pw@h/db?password=s3cret&x=1")
    assert "s3cret" not in str(info.value)
    assert "pw@" not in str(info.value)
