"""The on-disk format of a file journal.

A journal is a directory of *segments*.  A segment is named after the
sequence number of its first record, zero-padded to twenty digits so that
names sort like numbers::

    journal/
        journal.lock                       writer lock (zc.lockfile)
        00000000000000000001.zjl           records 1 .. 48210
        00000000000000048211.zjl           records 48211 .. (still growing)
        00000000000000048211.zjl.torn-1520 bytes cut from a torn tail
        archive/00000000000000000001.zjl.gz
                                           an archived segment: the gzip
                                           of its exact bytes (prune)
        pruned.json                        what prune archived or removed
        prune.lock                         one prune at a time

Only files whose whole name matches ``<20 digits>.zjl`` are segments;
everything else in the directory (the lock, cut tails, temporary files) is
ignored by readers.

All integers are big-endian and unsigned, so a hex dump reads naturally.

Segment header, 48 bytes::

    offset size  field
    0      8     magic b"ZJOURNAL"
    8      2     format version (1)
    10     2     header size (48); readers skip what they do not know
    12     16    journal identity (a UUID, the same in every segment)
    28     8     first sequence number of this segment
    36     8     creation time (IEEE 754 double, seconds since the epoch)
    44     4     CRC-32 of bytes 0 .. 43

Record, 50 bytes of framing around the command name and the payload::

    offset size  field
    0      4     CRC-32 of bytes 4 .. 8+n (length and body): one contiguous
                 range, so one checksum call per record
    4      4     n, the length of the body (bytes 8 .. 8+n)
    8      8     sequence number: 1, 2, 3, ... with no gap across segments
    16     8     time the command first executed (IEEE 754 double)
    24     1     flags: bit 0 END marks the last record of a transaction,
                 bit 1 QUERY a journaled query (replay skips it), bit 2 META
                 the presence of metadata, bit 3 MAC that of a signature
    25     1     reserved, zero
    26     2     command version (for upcasting old arguments)
    28     2     k, the length of the command name
    30     16    prev: the chain hash of the record before this one (16 zero
                 bytes before seq 1)
    46     k     command name, UTF-8 (a registered name, never a class path)
    46+k   4+j   with META only: j, then j bytes of metadata (UTF-8 JSON: who
                 and why -- transaction user, description, application keys)
    ..     m     payload: the command's arguments (see :mod:`zjournal.codec`)
    ..     16    with MAC only: HMAC-SHA256 of bytes 4 .. here, cut to 16
                 bytes, under a key the journal never stores
    8+n    4     n again, so the last record can be found from the end of
                 the file without scanning the segment

The chain hash of a record is SHA-256 of its bytes 4 .. 8+n, cut to 16
bytes (128 bits keep second preimages out of reach; SHA-256 is in every
language and tool that may check an export), its own ``prev`` included,
so each hash pins the whole history before it:
the ZODB marker stores the hash of the last record it applied, and
``verify`` recomputes the chain.  The CRC is for accidental damage only;
the chain makes an edited, deleted or reordered record evident against
the marker, and the MAC makes forging one impossible without the key.

The commands of one transaction are written with a single ``write`` and
only the last carries END.  After a crash, records after the last END are
an unacknowledged transaction and are cut along with any torn bytes, which
is what makes a transaction all-or-nothing in the journal.

Telling a torn tail from corruption: a record that fails to validate with
no valid record anywhere after it is a torn tail (the write in progress
when the machine stopped, never acknowledged).  A record that fails to
validate with a valid record after it is corruption of acknowledged data:
it is reported with file, offset and expected sequence number, and nothing
is truncated.
"""
import hashlib
import hmac
import json
import operator
import re
import struct
import zlib

from zjournal.errors import CorruptJournalError
from zjournal.errors import UnsupportedFormatError

FORMAT_VERSION = 2

SEGMENT_SUFFIX = ".zjl"
SEGMENT_NAME_RE = re.compile(r"(\d{20})\.zjl", re.ASCII)
TORN_SUFFIX = ".torn-"
LOCK_NAME = "journal.lock"

MAGIC = b"ZJOURNAL"

# magic, version, header size, identity, first seq, created; then the CRC.
SEGMENT_HEADER = struct.Struct(">8sHH16sQd")
SEGMENT_HEADER_CRC = struct.Struct(">I")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + SEGMENT_HEADER_CRC.size
assert SEGMENT_HEADER_SIZE == 48, SEGMENT_HEADER_SIZE

# crc, n, seq, time, flags, reserved, version, name length, prev
RECORD_HEAD = struct.Struct(">IIQdBBHH16s")
RECORD_HEAD_SIZE = RECORD_HEAD.size
assert RECORD_HEAD_SIZE == 46, RECORD_HEAD_SIZE
# The same without the CRC: what the CRC covers, before the name.
RECORD_LENGTH_HEAD = struct.Struct(">IQdBBHH16s")
CRC = TRAILER = struct.Struct(">I")
# The part of the head that lies inside the body (seq .. name length).
BODY_HEAD_SIZE = RECORD_HEAD_SIZE - 8
# Bytes a record takes besides its name and payload.
RECORD_OVERHEAD = RECORD_HEAD_SIZE + TRAILER.size
assert RECORD_OVERHEAD == 50, RECORD_OVERHEAD
# The smallest record: an empty name and an empty payload.
MIN_RECORD_SIZE = RECORD_OVERHEAD

FLAG_END = 0x01
FLAG_QUERY = 0x02
FLAG_META = 0x04
FLAG_MAC = 0x08
FLAGS_OFFSET = 24
PREV_OFFSET = 30
KNOWN_FLAGS = FLAG_END | FLAG_QUERY | FLAG_META | FLAG_MAC
# Flags that move the payload away from right after the name.
FLAGS_EXTRA = FLAG_META | FLAG_MAC

HASH_SIZE = 16
MAC_SIZE = 16
# The predecessor of the first record.
GENESIS = bytes(HASH_SIZE)
META_LENGTH = struct.Struct(">I")
MAX_META_SIZE = 1 << 20

MAX_NAME_SIZE = 1024
# A bound on what a reader will believe a length field says: a flipped bit
# in a length must not make a reader allocate gigabytes.
MAX_BODY_SIZE = 1 << 28


def segment_name(first_seq):
    return "%020d%s" % (first_seq, SEGMENT_SUFFIX)


def parse_segment_name(name):
    """Return the first sequence number a segment name stands for, or None."""
    m = SEGMENT_NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def encode_header(identity, first_seq, created):
    head = SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, SEGMENT_HEADER_SIZE,
                               identity, first_seq, created)
    return head + SEGMENT_HEADER_CRC.pack(zlib.crc32(head))


class SegmentHeader:
    __slots__ = ("version", "size", "identity", "first_seq", "created")

    def __init__(self, version, size, identity, first_seq, created):
        self.version = version
        self.size = size
        self.identity = identity
        self.first_seq = first_seq
        self.created = created


def decode_header(data, path):
    """Decode a segment header, raising a precise error when it is unusable."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptJournalError(
            path, 0, None, "segment header is %d bytes, should be %d bytes"
            % (len(data), SEGMENT_HEADER_SIZE))
    magic, version, size, identity, first_seq, created = (
        SEGMENT_HEADER.unpack_from(data))
    if magic != MAGIC:
        raise CorruptJournalError(
            path, 0, None, "not a zjournal segment (magic %r)" % magic)
    (crc,) = SEGMENT_HEADER_CRC.unpack_from(data, SEGMENT_HEADER.size)
    if zlib.crc32(data[:SEGMENT_HEADER.size]) != crc:
        raise CorruptJournalError(
            path, 0, None, "segment header checksum mismatch")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            "%s: journal format version %d is newer than this zjournal"
            " reads (version %d); upgrade zjournal"
            % (path, version, FORMAT_VERSION))
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            "%s: journal format version %d was written by a development"
            " version of zjournal and is not read by this one (version %d);"
            " replay it with the zjournal that wrote it and export it"
            % (path, version, FORMAT_VERSION))
    if size < SEGMENT_HEADER_SIZE:
        raise CorruptJournalError(
            path, 0, None, "segment header size %d is too small" % size)
    return SegmentHeader(version, size, identity, first_seq, created)


def encode_meta(meta):
    """Metadata as the journal stores it: canonical UTF-8 JSON, or None.

    Canonical (sorted keys, no spaces), so that an exported and
    re-imported record is the same bytes and keeps its chain hash.
    """
    if not meta:
        return None
    try:
        raw = json.dumps(meta, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError("metadata must be a JSON object of plain values:"
                         " %s" % e) from None
    if not raw.startswith(b"{"):
        raise ValueError("metadata must be a dict, not %r" % (meta,))
    if len(raw) > MAX_META_SIZE:
        raise ValueError("metadata of %d bytes is larger than %d"
                         % (len(raw), MAX_META_SIZE))
    return raw


def sign(key, body):
    """The MAC of a record body: HMAC-SHA256, cut to MAC_SIZE bytes."""
    return hmac.digest(key, body, "sha256")[:MAC_SIZE]


def pack_record(seq, time, flags, version, name, payload, prev=GENESIS,
                meta=None, key=None, mac=None):
    """Encode one record; ``name``, ``payload`` and ``meta`` are bytes.

    ``flags`` holds END and QUERY; META and MAC are set here from
    ``meta`` and from ``key`` (sign now) or ``mac`` (a stored signature,
    when re-encoding a record read back).
    """
    flags &= FLAG_END | FLAG_QUERY
    parts = [None, name]
    n = BODY_HEAD_SIZE + len(name) + len(payload)
    if meta is not None:
        flags |= FLAG_META
        parts.append(META_LENGTH.pack(len(meta)))
        parts.append(meta)
        n += 4 + len(meta)
    parts.append(payload)
    if key is not None or mac is not None:
        flags |= FLAG_MAC
        n += MAC_SIZE
    parts[0] = RECORD_LENGTH_HEAD.pack(n, seq, time, flags, 0, version,
                                       len(name), prev)
    body = b"".join(parts)
    if key is not None:
        body += sign(key, body)
    elif mac is not None:
        body += mac
    return b"".join((CRC.pack(zlib.crc32(body)), body, TRAILER.pack(n)))


def encode_record(seq, time, flags, version, name, payload, prev=GENESIS,
                  meta=None, key=None):
    """Encode one record (see :func:`pack_record`)."""
    return pack_record(seq, time, flags, version, name, payload, prev, meta,
                       key)


def record_hash(record):
    """The chain hash of one whole encoded record."""
    return hashlib.sha256(memoryview(record)[4:-4]).digest()[:HASH_SIZE]


def encode_chain(items, prev=GENESIS, key=None):
    """Encode the records of one transaction, END on the last.

    ``items`` is a sequence of ``(seq, time, version, name, payload)`` or
    ``(seq, time, version, name, payload, flags, meta)`` with ``name``,
    ``payload`` and ``meta`` as bytes (``meta`` may be None) and ``flags``
    0 or FLAG_QUERY.  Returns ``(data, head)``: the bytes to write and the
    chain hash of the last record, which the next transaction's first
    record carries.
    """
    out = []
    last = len(items) - 1
    for i, item in enumerate(items):
        if len(item) == 5:
            seq, time, version, name, payload = item
            flags, meta = 0, None
        else:
            seq, time, version, name, payload, flags, meta = item
        if i == last:
            flags |= FLAG_END
        record = pack_record(seq, time, flags, version, name, payload, prev,
                             meta, key)
        prev = record_hash(record)
        out.append(record)
    return b"".join(out), prev


def encode_transaction(items, prev=GENESIS, key=None):
    """The bytes of :func:`encode_chain`, for callers that need no head."""
    return encode_chain(items, prev, key)[0]


class Record(tuple):
    """One decoded, validated record and where it was found.

    A tuple ``(seq, time, flags, version, name, payload, offset, size,
    prev, meta, mac)`` with named fields: a replay reads millions of
    these, and a tuple is built by C code in one step.  ``meta`` (raw
    JSON) and ``mac`` are None when the record has none.
    """

    __slots__ = ()

    seq = property(operator.itemgetter(0))
    time = property(operator.itemgetter(1))
    flags = property(operator.itemgetter(2))
    version = property(operator.itemgetter(3))
    name = property(operator.itemgetter(4))
    payload = property(operator.itemgetter(5))
    offset = property(operator.itemgetter(6))
    size = property(operator.itemgetter(7))
    prev = property(operator.itemgetter(8))
    meta = property(operator.itemgetter(9))
    mac = property(operator.itemgetter(10))

    def __new__(cls, seq, time, flags, version, name, payload, offset, size,
                prev=GENESIS, meta=None, mac=None):
        return tuple.__new__(
            cls, (seq, time, flags, version, name, payload, offset, size,
                  prev, meta, mac))

    def encoded(self):
        """The record's bytes, as they are on disk."""
        return pack_record(self[0], self[1], self[2], self[3],
                           self[4].encode("utf-8"), self[5], self[8],
                           self[9], mac=self[10])

    @property
    def hash(self):
        """This record's chain hash: the ``prev`` of the record after it."""
        return record_hash(self.encoded())


class BadRecord(Exception):
    """Internal: the bytes at an offset are not a valid record.

    ``truncated`` is true when the record is cut short by the end of the
    data rather than failing a check.  ``misplaced`` is true when the
    record is whole and its checksum holds but it is wrong anyway (the
    wrong sequence number, impossible flags or lengths): no torn write
    produces that, so it is always corruption (a record lost, duplicated,
    moved or forged), never a torn tail to cut.
    """

    def __init__(self, reason, truncated=False, misplaced=False):
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated
        self.misplaced = misplaced


def check_record(buf, pos, expected_seq=None):
    """Validate the record at ``buf[pos:]`` and return its total size.

    Raises :class:`BadRecord` saying why it is not valid.  The check order
    puts cheap tests first; the CRC is computed once the framing holds.
    """
    end_of_data = len(buf)
    if pos + RECORD_HEAD_SIZE > end_of_data:
        raise BadRecord("record header cut short (%d of %d bytes)"
                        % (end_of_data - pos, RECORD_HEAD_SIZE), True)
    (crc, n, seq, _, flags, reserved, _, k,
     _) = RECORD_HEAD.unpack_from(buf, pos)
    if n < BODY_HEAD_SIZE + k or n > MAX_BODY_SIZE or k > MAX_NAME_SIZE:
        raise BadRecord("implausible lengths (body %d, name %d)" % (n, k))
    size = n + 12
    if pos + size > end_of_data:
        raise BadRecord("record of %d bytes cut short at %d bytes"
                        % (size, end_of_data - pos), True)
    if zlib.crc32(memoryview(buf)[pos + 4:pos + 8 + n]) != crc:
        raise BadRecord("checksum mismatch")
    if TRAILER.unpack_from(buf, pos + 8 + n)[0] != n:
        raise BadRecord("trailing length does not match")
    # From here on the record is whole and its checksum holds: no torn
    # write produces what fails now, so it is corruption, never a tail.
    if flags & ~KNOWN_FLAGS or reserved:
        raise BadRecord("unknown flags %#x" % flags, misplaced=True)
    if flags & FLAGS_EXTRA and _extras(buf, pos, n, k, flags) is None:
        raise BadRecord("metadata or signature does not fit the record",
                        misplaced=True)
    if expected_seq is not None and seq != expected_seq:
        raise BadRecord("a valid record with sequence number %d where %d"
                        " belongs" % (seq, expected_seq), misplaced=True)
    return size


def _extras(buf, pos, n, k, flags):
    """``(payload_start, payload_end, meta, mac)`` of a record with META or
    MAC, as offsets into ``buf``; None when they do not fit its body."""
    at = pos + RECORD_HEAD_SIZE + k
    end = pos + 8 + n
    meta = mac = None
    if flags & FLAG_MAC:
        end -= MAC_SIZE
        if end < at:
            return None
        mac = bytes(buf[end:end + MAC_SIZE])
    if flags & FLAG_META:
        if at + 4 > end:
            return None
        (j,) = META_LENGTH.unpack_from(buf, at)
        if j > MAX_META_SIZE or at + 4 + j > end:
            return None
        meta = bytes(buf[at + 4:at + 4 + j])
        at += 4 + j
    return at, end, meta, mac


def decode_record(buf, pos, names, cls=Record, base=0):
    """Decode a record already validated by :func:`check_record`.

    ``names`` caches decoded command names: a journal repeats a handful of
    names millions of times.  ``base`` is the file offset of ``buf[0]``.
    """
    (_, n, seq, time, flags, _, version, k,
     prev) = RECORD_HEAD.unpack_from(buf, pos)
    start = pos + RECORD_HEAD_SIZE
    raw = bytes(buf[start:start + k])
    name = names.get(raw)
    if name is None:
        name = names[raw] = raw.decode("utf-8", "replace")
    meta = mac = None
    if flags & FLAGS_EXTRA:
        at, end, meta, mac = _extras(buf, pos, n, k, flags)
        payload = bytes(buf[at:end])
    else:
        payload = bytes(buf[start + k:pos + 8 + n])
    return tuple.__new__(cls, (seq, time, flags, version, name, payload,
                               base + pos, n + 12, prev, meta, mac))


def find_valid_record(buf, start, min_seq):
    """Return the offset of the first valid record after ``start``, or None.

    Used to tell a torn tail from corruption.  A valid record there must
    carry a sequence number of at least ``min_seq`` and at most one per
    50 bytes more, so instead of trying every byte offset this looks for
    the few 6-byte prefixes such numbers can have and checks only the
    offsets where one occurs.
    """
    end = len(buf)
    max_seq = min_seq + max(0, end - start) // MIN_RECORD_SIZE + 1
    prefixes = sorted({struct.pack(">Q", s)[:6]
                       for s in range(min_seq, max_seq + 1, 1 << 16)}
                      | {struct.pack(">Q", max_seq)[:6]})
    found = None
    for prefix in prefixes:
        at = buf.find(prefix, start + 1 + 8)
        while at != -1:
            pos = at - 8
            if found is not None and pos >= found:
                break
            try:
                check_record(buf, pos)
            except BadRecord:
                pass
            else:
                seq = struct.unpack_from(">Q", buf, pos + 8)[0]
                if min_seq <= seq <= max_seq:
                    found = pos
                    break
            at = buf.find(prefix, at + 1)
    return found
