"""Real servers the tests use: PostgreSQL (and ZEO, started per test).

PostgreSQL is expected on 127.0.0.1:5432 with trust authentication and a
database ``test`` (CI always has it; override with ZJOURNAL_TEST_PG_DSN).
Where it is absent the tests that need it skip with the reason -- unless
the environment variable ``CI`` is set: then they must run, and fail.
"""
import contextlib
import os
import uuid

import pytest

DSN = os.environ.get("ZJOURNAL_TEST_PG_DSN",
                     "host=127.0.0.1 port=5432 user=postgres dbname=test")


def _missing(reason):
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL is required when CI is set: %s" % reason)
    pytest.skip("PostgreSQL not available: %s" % reason)


def postgres_dsn():
    """The DSN of the test database, or skip (fail under CI)."""
    try:
        import psycopg2
    except ImportError as e:
        _missing("psycopg2 is not installed (%s)" % e)
    try:
        conn = psycopg2.connect(DSN, connect_timeout=3)
    except psycopg2.Error as e:
        _missing("cannot connect with %r: %s" % (DSN, str(e).strip()))
    conn.close()
    return DSN


def unique_name(prefix="zj"):
    """A fresh identifier for a table or database of one test."""
    return "%s_%s" % (prefix, uuid.uuid4().hex[:12])


@contextlib.contextmanager
def fresh_database():
    """Create an empty database for one test; yield its DSN; drop it."""
    import psycopg2
    base = postgres_dsn()
    name = unique_name("zjdb")
    admin = psycopg2.connect(base)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE %s" % name)
        yield _with_dbname(base, name)
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM"
                        " pg_stat_activity WHERE datname = %s", (name,))
            cur.execute("DROP DATABASE IF EXISTS %s" % name)
        admin.close()


def _with_dbname(dsn, name):
    parts = [p for p in dsn.split() if not p.startswith("dbname=")]
    return " ".join(parts + ["dbname=" + name])
