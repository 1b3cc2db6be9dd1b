"""The marker: what the ZODB knows about the journal it was built from.

The marker lives in the ZODB root under :data:`MARKER_KEY` and is written
in the same ZODB transaction as the commands it counts, so "the ZODB holds
the effects of commands 1..N" and "the marker says N" are committed
atomically.  Because every journaled transaction writes it, two concurrent
journaled transactions always conflict on it, and ZODB's ordinary conflict
detection serializes them: the journal order is a serial order.
"""
import persistent

from zjournal.format import GENESIS

MARKER_KEY = "zjournal.marker"


class Marker(persistent.Persistent):
    """Identity of the journal, the last sequence number applied, and the
    chain hash of that record (``head``).

    ``head`` pins the journal's history: a journal whose record
    ``last_seq`` hashes to anything else is not the one this ZODB was
    built from, whatever its identity says.
    """

    head = None  # markers written before the hash chain existed
    # Seqs a forensic rebuild (skip_unknown) passed over: such a ZODB is
    # not the journal's state, and recovery refuses to open it.
    skipped = ()

    def __init__(self, journal_id, last_seq=0, head=GENESIS):
        self.journal_id = journal_id
        self.last_seq = last_seq
        self.head = head

    def __repr__(self):
        return "<zjournal Marker journal=%s last_seq=%d>" % (
            self.journal_id, self.last_seq)


def get_marker(root):
    """The marker in a root mapping, or None."""
    return root.get(MARKER_KEY)
