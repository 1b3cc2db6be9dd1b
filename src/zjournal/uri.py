"""Journal URIs: one string names a journal and how to open it.

In the style of ``zodburi``, so that configuration files (ini settings,
``zope.conf``, buildout parts) and the command line name journals the
same way::

    /var/lib/app/journal                         a file journal (a directory)
    file:///var/lib/app/journal?fsync=batch      the same, with options
    sqlite:///var/lib/app/journal.sqlite         an SQLite journal
    postgresql://app@db.example.com/app?table=zjournal
                                                 a PostgreSQL journal

Options in the query string: ``fsync`` (all kinds), ``segment_size``
(file), ``table`` (postgresql).  Other query parameters of a PostgreSQL
URI (``sslmode``, ``connect_timeout``, ...) are passed to libpq.  Secrets
do not belong in URIs: the signing key comes from the ``hmac_key``
argument or the ``ZJOURNAL_HMAC_KEY`` environment variable, and a
PostgreSQL password from ``~/.pgpass`` or ``PGPASSWORD``.
"""
import urllib.parse

from zjournal.errors import JournalError

SCHEMES = ("file", "sqlite", "postgresql", "postgres")

_OPTIONS = {
    "file": {"fsync": str, "segment_size": int},
    "sqlite": {"fsync": str},
    "postgresql": {"fsync": str, "table": str},
}


class JournalURIError(JournalError, ValueError):
    """A journal URI that cannot be understood."""


def parse_journal_uri(uri):
    """``(kind, location, options)`` for a journal URI or a plain path.

    ``kind`` is "file", "sqlite" or "postgresql"; ``location`` is a
    directory, a database file or a libpq connection URI (without
    zjournal's own options); ``options`` holds the keyword arguments the
    URI sets.
    """
    if not isinstance(uri, str) or not uri:
        raise JournalURIError("a journal URI must be a non-empty string,"
                              " not %r" % (uri,))
    if "://" not in uri:
        return "file", uri, {}
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise JournalURIError(
            "journal URI %r: unknown scheme %r (use a directory, file://,"
            " sqlite:// or postgresql://)" % (_safe(uri), parts.scheme))
    kind = "postgresql" if scheme == "postgres" else scheme
    known = _OPTIONS[kind]
    options, passed = {}, []
    for name, value in urllib.parse.parse_qsl(parts.query,
                                              keep_blank_values=True):
        if name in known:
            try:
                options[name] = known[name](value)
            except ValueError:
                raise JournalURIError(
                    "journal URI %r: %s=%r is not valid"
                    % (_safe(uri), name, value)) from None
        elif kind == "postgresql":
            passed.append((name, value))  # for libpq
        else:
            raise JournalURIError(
                "journal URI %r: unknown option %r (known: %s)"
                % (_safe(uri), name, ", ".join(sorted(known))))
    if kind == "postgresql":
        # libpq decodes %20, not "+": quote, never quote_plus.
        location = urllib.parse.urlunsplit(
            ("postgresql", parts.netloc, parts.path,
             urllib.parse.urlencode(passed, quote_via=urllib.parse.quote),
             ""))
        return kind, location, options
    if parts.netloc not in ("", "localhost"):
        raise JournalURIError(
            "journal URI %r names host %r; %s journals are local paths"
            " (file:///absolute/path)" % (_safe(uri), parts.hostname, kind))
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise JournalURIError("journal URI %r names no path" % _safe(uri))
    return kind, path, options


def open_journal(uri, **kw):
    """Open the journal a URI (or a plain directory path) names.

    Keyword arguments (``readonly``, ``fsync``, ``hmac_key``, ...) are
    passed to the journal class and win over the URI's options.
    """
    kind, location, options = parse_journal_uri(uri)
    options.update(kw)
    if kind == "file":
        from zjournal.journal import FileJournal
        return FileJournal(location, **options)
    try:
        from zjournal import sqljournal
    except ImportError as e:  # pragma: no cover
        raise JournalURIError("%s journals are not available: %s"
                              % (kind, e)) from e
    if kind == "sqlite":
        return sqljournal.SQLiteJournal(location, **options)
    return sqljournal.PostgresJournal(location, **options)


_SECRET_PARAMETERS = ("password", "sslpassword")


def _safe(uri):
    """A URI fit for a message: any password is masked, in the user part
    and in the query string alike."""
    parts = urllib.parse.urlsplit(uri)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = netloc.replace(":%s@" % parts.password, ":***@", 1)
    if query:
        query = "&".join(
            "%s=***" % name if name in _SECRET_PARAMETERS else
            "%s=%s" % (name, urllib.parse.quote(value))
            for name, value in urllib.parse.parse_qsl(
                query, keep_blank_values=True))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc,
                                                  query=query))
