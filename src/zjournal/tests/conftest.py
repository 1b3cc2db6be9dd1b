import os

import pytest
import transaction
import ZODB
import ZODB.FileStorage

from zjournal import FileJournal
from zjournal import JournaledDB


class Site:
    """A Data.fs and a journal directory under one temporary directory."""

    def __init__(self, root):
        self.root = str(root)
        self.data_fs = os.path.join(self.root, "Data.fs")
        self.journal_dir = os.path.join(self.root, "journal")

    def db(self):
        return ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs))

    def journal(self, **kw):
        return FileJournal(self.journal_dir, **kw)

    def open(self, journal_kw=None, **kw):
        return JournaledDB(self.db(), self.journal(**(journal_kw or {})), **kw)

    def remove_zodb(self):
        for suffix in ("", ".index", ".lock", ".tmp"):
            if os.path.exists(self.data_fs + suffix):
                os.remove(self.data_fs + suffix)

    def segments(self):
        return sorted(os.path.join(self.journal_dir, n)
                      for n in os.listdir(self.journal_dir)
                      if n.endswith(".zjl"))


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


@pytest.fixture(autouse=True)
def _clean_transaction():
    yield
    transaction.abort()
