"""zjournal: journaled commands for ZODB applications.

Every change is a :class:`Command`, appended to an append-only journal in
the same two-phase commit as its effects on the ZODB; the ZODB can be
rebuilt at any time by replaying the journal.
"""
from zjournal.codec import register_type
from zjournal.commands import Command
from zjournal.commands import Context
from zjournal.commands import upcaster
from zjournal.db import JournaledDB
from zjournal.db import execute
from zjournal.db import query
from zjournal.errors import BackupTooNewError
from zjournal.errors import CommandError
from zjournal.errors import CommandNameConflictError
from zjournal.errors import CorruptJournalError
from zjournal.errors import DecodeError
from zjournal.errors import EncodeError
from zjournal.errors import ForensicZODBError
from zjournal.errors import HistoryMismatchError
from zjournal.errors import JournalError
from zjournal.errors import JournalFailedError
from zjournal.errors import JournalKeyError
from zjournal.errors import JournalLockedError
from zjournal.errors import JournalPrunedError
from zjournal.errors import JournalSequenceError
from zjournal.errors import JournalWriteError
from zjournal.errors import NestedCommandError
from zjournal.errors import NotJournaledConnectionError
from zjournal.errors import NotJournaledError
from zjournal.errors import OutcomeUnknownError
from zjournal.errors import PruneError
from zjournal.errors import QueryWriteError
from zjournal.errors import ReadOnlyJournalError
from zjournal.errors import RecoveryError
from zjournal.errors import TamperedJournalError
from zjournal.errors import ReplayError
from zjournal.errors import UnjournaledChangeError
from zjournal.errors import UnknownCommandError
from zjournal.errors import UnsupportedFormatError
from zjournal.errors import WrongJournalError
from zjournal.errors import ZJournalError
from zjournal.errors import ZODBAheadError
from zjournal.journal import FileJournal
from zjournal.marker import MARKER_KEY
from zjournal.sqljournal import PostgresJournal
from zjournal.sqljournal import SQLiteJournal
from zjournal.uri import open_journal

__all__ = [
    "Command", "Context", "FileJournal", "JournaledDB", "MARKER_KEY",
    "SQLiteJournal", "PostgresJournal",
    "execute", "query", "register_type", "upcaster", "open_journal",
    "ZJournalError", "JournalError", "CorruptJournalError",
    "JournalLockedError", "JournalFailedError", "JournalWriteError",
    "JournalSequenceError", "OutcomeUnknownError", "ReadOnlyJournalError",
    "UnsupportedFormatError", "CommandError", "CommandNameConflictError",
    "UnknownCommandError", "DecodeError", "EncodeError", "RecoveryError",
    "WrongJournalError", "ZODBAheadError", "NotJournaledError",
    "ReplayError", "UnjournaledChangeError", "NotJournaledConnectionError",
    "NestedCommandError", "TamperedJournalError", "JournalKeyError",
    "HistoryMismatchError", "QueryWriteError", "ForensicZODBError",
    "JournalPrunedError", "PruneError", "BackupTooNewError",
]
