"""Salvage: copy what is intact out of a damaged journal.

A corrupt journal is never repaired in place: the damaged bytes may sit
before acknowledged commands, and guessing wrong would destroy them.
Instead, :func:`salvage` reads every segment of the source byte by byte,
keeps every *transaction* whose records all validate, and writes them to a
new journal.  The source is opened read-only and never changed.

What the copy is, and is not:

* Whole transactions only.  A transaction with one damaged record is
  dropped entirely (a transaction is all-or-nothing); so are the records
  found right after a damaged stretch up to the next end of a transaction,
  because nothing proves they are the start of their transaction.
* A new journal with a new identity: it does not hold the same history,
  so no existing ZODB may be caught up from it.  Rebuild a ZODB from it.
* Sequence numbers stay what they were up to the first dropped record;
  after it, records are renumbered to keep the new journal gap-free.
  ``context.seq`` and ``context.random`` of renumbered commands differ on
  replay, which the report says.  Times are kept.
"""
import logging
import os
import uuid

from zjournal.errors import JournalError
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.format import SEGMENT_HEADER_SIZE
from zjournal.format import BadRecord
from zjournal.format import check_record
from zjournal.format import decode_header
from zjournal.format import decode_record
from zjournal.format import find_valid_record
from zjournal.format import parse_segment_name
from zjournal.journal import FileJournal

logger = logging.getLogger(__name__)


class Dropped:
    """A stretch of the source that was not copied."""

    def __init__(self, path, offset, size, seqs, reason):
        self.path = path
        self.offset = offset
        self.size = size
        self.seqs = seqs        # sequence numbers of valid records dropped
        self.reason = reason

    def as_dict(self):
        return {"file": self.path, "offset": self.offset, "bytes": self.size,
                "seqs": self.seqs, "reason": self.reason}

    def __repr__(self):
        return "<Dropped %s:%d %d bytes %s>" % (
            self.path, self.offset, self.size, self.reason)


class SalvageReport:

    def __init__(self, source, target):
        self.source = source
        self.target = target
        self.identity = None
        self.copied = 0
        self.dropped = []
        self.renumbered_from = None  # first source seq that got a new seq
        self.last_source_seq = 0

    def as_dict(self):
        return {"source": self.source, "target": self.target,
                "identity": self.identity, "copied": self.copied,
                "dropped": [d.as_dict() for d in self.dropped],
                "renumbered_from": self.renumbered_from}


def salvage(source, target):
    """Copy the intact transactions of journal ``source`` to new ``target``.

    Returns a :class:`SalvageReport`.  ``target`` must not hold a journal.
    """
    source = os.path.abspath(source)
    target = os.path.abspath(target)
    segments = _segments(source)
    if os.path.exists(target) and os.listdir(target):
        raise JournalError("salvage target %s exists and is not empty; give"
                           " a new directory" % target)
    report = SalvageReport(source, target)
    identity = _identity(segments)
    out = FileJournal(target, fsync="never")
    try:
        report.identity = out.identity
        for path, first_seq in segments:
            for txn in _transactions(path, first_seq, identity, report):
                _copy(out, path, txn, report)
        out.sync()
    finally:
        out.close()
    logger.info("salvaged %d records from %s into %s; dropped %d stretches",
                report.copied, source, target, len(report.dropped))
    return report


def _segments(source):
    if not os.path.isdir(source):
        raise JournalError("no journal at %s (no such directory)" % source)
    found = sorted((seq, name) for name in os.listdir(source)
                   for seq in [parse_segment_name(name)] if seq is not None)
    if not found:
        raise JournalError("no journal at %s (no segment files)" % source)
    return [(os.path.join(source, name), seq) for seq, name in found]


def _identity(segments):
    """The identity most segment headers agree on (None if none is readable).

    Majority rules, so that one foreign segment dropped in (or a first
    segment whose header is damaged) does not decide for the others.
    """
    votes = {}
    for path, _ in segments:
        with open(path, "rb") as f:
            try:
                header = decode_header(f.read(SEGMENT_HEADER_SIZE), path)
            except JournalError:
                continue
        votes[header.identity] = votes.get(header.identity, 0) + 1
    return max(votes, key=votes.get) if votes else None


def _transactions(path, first_seq, identity, report):
    """Yield lists of records, one per intact transaction of a segment."""
    with open(path, "rb") as f:
        data = f.read()
    start = SEGMENT_HEADER_SIZE
    try:
        header = decode_header(data, path)
    except JournalError as e:
        # Records may still be intact behind a damaged header.
        _drop(report, path, 0, SEGMENT_HEADER_SIZE, [], str(e))
    else:
        if identity is not None and header.identity != identity:
            _drop(report, path, 0, len(data), [],
                  "segment of another journal (%s)"
                  % uuid.UUID(bytes=header.identity))
            return
        start = header.size
    pos = start
    names = {}
    txn = []
    good_seq = first_seq - 1  # the last valid record's seq
    while pos < len(data):
        try:
            size = check_record(data, pos)
        except BadRecord as e:
            # Records after the damage carry higher seqs than the last good
            # one: that bounds the search (and finds them in a segment
            # deep into a long journal).
            later = find_valid_record(data, pos, good_seq + 1)
            end = len(data) if later is None else later
            _drop(report, path, pos, end - pos, [r.seq for r in txn],
                  e.reason)
            txn = []
            pos = end
            if later is not None:
                pos = _skip_to_transaction_start(data, pos, path, report)
            continue
        record = decode_record(data, pos, names)
        pos += size
        good_seq = max(good_seq, record.seq)
        txn.append(record)
        if record.flags & FLAG_END:
            yield txn
            txn = []
    if txn:
        _drop(report, path, txn[0].offset, len(data) - txn[0].offset,
              [r.seq for r in txn], "transaction without its last record")


def _skip_to_transaction_start(data, pos, path, report):
    """After damage, drop valid records up to the next end of transaction."""
    begin, seqs = pos, []
    names = {}
    while pos < len(data):
        try:
            size = check_record(data, pos)
        except BadRecord:
            break
        record = decode_record(data, pos, names)
        seqs.append(record.seq)
        pos += size
        if record.flags & FLAG_END:
            report.dropped[-1].seqs.extend(seqs)
            report.dropped[-1].size += pos - begin
            return pos
    report.dropped[-1].seqs.extend(seqs)
    report.dropped[-1].size += pos - begin
    return pos


def _drop(report, path, offset, size, seqs, reason):
    logger.info("salvage: dropping %d bytes at %s:%d (%s)", size, path,
                offset, reason)
    report.dropped.append(Dropped(path, offset, size, list(seqs), reason))


def _copy(out, path, txn, report):
    if txn[0].seq <= report.last_source_seq:
        # History already copied again (a repeated record or segment).
        _drop(report, path, txn[0].offset, sum(r.size for r in txn),
              [r.seq for r in txn], "sequence numbers already copied")
        return
    gap = range(report.last_source_seq + 1, txn[0].seq)
    if gap and report.dropped:
        # The damaged records' own seqs cannot be read; the gap tells them.
        last = report.dropped[-1]
        last.seqs = sorted(set(last.seqs).union(gap))
    next_seq = out.last_seq + 1
    if txn[0].seq != next_seq and report.renumbered_from is None:
        report.renumbered_from = txn[0].seq
    out.append([(next_seq + i, r.time, r.version, r.name, r.payload,
                 r.flags & FLAG_QUERY, r.meta)
                for i, r in enumerate(txn)])
    report.copied += len(txn)
    report.last_source_seq = txn[-1].seq
