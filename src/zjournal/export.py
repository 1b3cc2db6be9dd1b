"""Export a journal as JSON lines, and import such an export exactly.

An export is text that other tools read (``jq``, a spreadsheet, an audit
script) and that :func:`import_jsonl` turns back into a journal whose
records are the very bytes of the original: same identity, same sequence
numbers, same times, same chain hashes, same signatures.  A ZODB built
from the original therefore opens with the imported journal as if
nothing had happened.

The file, one JSON object per line::

    {"format": "zjournal-export", "version": 1, "journal": IDENTITY, ...}
    {"seq": 1, "time": ..., "command_name": ..., "payload": BASE64, ...}
    ...
    {"format": "zjournal-export-end", "records": N, "last_seq": N,
     "head": HEX}

Each record line carries everything the record holds (``seq``, ``time``
as the exact float, ``command_version``, ``flags``, ``metadata``,
``payload`` in base64, ``prev`` and ``mac`` in hex) and, for readers,
``iso`` (the time in ISO 8601) and ``args``, the arguments decoded by the
safe allow-list decoder (:func:`zjournal.codec.loads`), rendered as JSON;
arguments that do not decode give ``"args": null`` and an ``args_error``.

The last line closes the export: without it, a file cut short at a
transaction boundary would import as a shorter, valid-looking journal.

Import trusts nothing in the file.  It re-encodes every record and
checks, before anything of it is written, that sequence numbers run from
1 without a gap, that each record's ``prev`` is the hash of the record
before it as re-encoded, that the readers' fields (``iso``, ``args``,
``end``, ``query``) agree with the record, that the journal's own
encoding of each transaction (signed with the import's key, if any) is
those bytes, that the last transaction is complete, and that the end
line counts the records and names the last hash.  The first failure
stops the import, removes everything it created and names the line and
the sequence number.
"""
import base64
import binascii
import datetime
import json
import logging
import math
import os
import shutil
import time as _time
import uuid

from zjournal import codec
from zjournal.errors import DecodeError
from zjournal.errors import ZJournalError
from zjournal.format import FLAG_END
from zjournal.format import FLAG_QUERY
from zjournal.format import FLAGS_OFFSET
from zjournal.format import FORMAT_VERSION
from zjournal.format import GENESIS
from zjournal.format import HASH_SIZE
from zjournal.format import MAC_SIZE
from zjournal.format import encode_meta
from zjournal.format import pack_record
from zjournal.format import record_hash
from zjournal.journal import HMAC_KEY_ENV
from zjournal.uri import open_journal
from zjournal.uri import parse_journal_uri

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "zjournal-export"
EXPORT_END = "zjournal-export-end"
EXPORT_VERSION = 1
# Progress is reported every this many records.
PROGRESS_EVERY = 10000


class ImportRefusedError(ZJournalError):
    """An export did not pass :func:`import_jsonl`'s checks.

    ``line`` (1-based) and ``seq`` say where; nothing was imported.
    """

    def __init__(self, line, seq, reason):
        self.line = line
        self.seq = seq
        self.reason = reason
        where = "line %d" % line
        if seq is not None:
            where += " (seq %d)" % seq
        super().__init__("%s: %s; nothing was imported" % (where, reason))


# -- export ----------------------------------------------------------------

def export_jsonl(journal, out, start=1, stop=None, progress=None):
    """Write ``journal``'s records with ``start <= seq < stop`` to ``out``.

    ``out`` is a text stream.  ``stop`` is bounded by the journal's last
    sequence number when it was opened, so an export beside a running
    writer is a consistent prefix.  Returns the number of records written.
    """
    start = max(start, 1)
    end = journal.last_seq + 1 if stop is None else min(
        stop, journal.last_seq + 1)
    write = out.write
    write(_line({
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "journal": journal.identity, "record_format": FORMAT_VERSION,
        "source": journal.path, "created": journal.created,
        "exported": _time.time(), "start": start, "stop": end}))
    n = 0
    last = None
    for entry in journal.entries(start, end):
        write(_line(record_object(entry)))
        last = entry
        n += 1
        if progress is not None and n % PROGRESS_EVERY == 0:
            progress(n, end - start)
    if progress is not None:
        progress(n, max(end - start, n))
    write(_line({
        "format": EXPORT_END, "records": n,
        "last_seq": None if last is None else last.seq,
        "head": (GENESIS if last is None else last.hash).hex()}))
    return n


def record_object(entry):
    """One record as the JSON object of its export line."""
    flags = entry.flags
    obj = {
        "seq": entry.seq,
        "time": entry.time,
        "iso": iso(entry.time),
        "command_name": entry.command_name,
        "command_version": entry.version,
        "flags": flags,
        "end": bool(flags & FLAG_END),
        "query": bool(flags & FLAG_QUERY),
        "metadata": None if entry.meta is None else entry.metadata,
        "payload": base64.b64encode(entry.payload).decode("ascii"),
        "prev": entry.prev.hex(),
        "mac": None if entry.mac is None else entry.mac.hex(),
    }
    obj.update(rendered_args(entry.payload))
    return obj


def rendered_args(payload):
    """``{"args": ...}`` for readers, or ``args: None`` and the reason."""
    try:
        return {"args": jsonable(codec.loads(payload))}
    except DecodeError as e:
        return {"args": None, "args_error": str(e)}


# Deeper containers are shown as a marker: legal pickles can nest (or
# refer to themselves) far beyond what a reader, or json, can recurse into.
MAX_RENDER_DEPTH = 100


def jsonable(value, _depth=0, _path=()):
    """Command arguments as JSON can carry them (strings for the rest)."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in _path:
            return "<cycle>"
        if _depth >= MAX_RENDER_DEPTH:
            return "<nested deeper than %d>" % MAX_RENDER_DEPTH
        path = _path + (id(value),)
        if isinstance(value, dict):
            return {str(k): jsonable(v, _depth + 1, path)
                    for k, v in value.items()}
        return [jsonable(v, _depth + 1, path) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    return str(value)


def iso(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj):
    # ensure_ascii=False: text stays readable; the file is UTF-8.
    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


# -- import ----------------------------------------------------------------

class ImportReport:
    """What :func:`import_jsonl` wrote."""

    def __init__(self, path, identity, records, transactions, head,
                 signed):
        self.path = path
        self.identity = identity
        self.records = records
        self.transactions = transactions
        self.head = head
        self.signed = signed  # how many records carry a signature


def import_jsonl(lines, target, hmac_key=None, progress=None):
    """Create the journal ``target`` from the export ``lines``.

    ``lines`` iterates over the export's text lines (an open file).
    ``target`` is a directory (or ``file://`` URI) that must not exist or
    be empty, or an ``sqlite://`` or ``postgresql://`` URI naming a
    journal that does not exist yet: an import moves a journal between
    backends.  ``hmac_key``
    (bytes or str; None: ``ZJOURNAL_HMAC_KEY``, as for FileJournal) signs
    the records the original's key signed, and only those: a journal
    that got its key at some seq is imported switching keys there.  Raises
    :class:`ImportRefusedError` (or a journal error) after removing
    everything it created; returns an :class:`ImportReport`.
    """
    kind, location, _ = parse_journal_uri(target)
    if kind == "file":
        _check_target(location)
        made_dir = not os.path.exists(location)
    importer = _Importer(target, hmac_key, progress)
    try:
        report = importer.run(lines)
    except BaseException:
        if kind == "file":
            importer.close()
            _remove_created(location, made_dir)
        else:
            importer.discard()
        raise
    importer.close()
    return report


def _check_target(target):
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ZJournalError("%s exists and is not a directory; import"
                                " into a new directory" % target)
        if os.listdir(target):
            raise ZJournalError("%s is not empty; import into a new, empty"
                                " directory" % target)


def _remove_created(target, made_dir):
    """Remove what a failed import made: the directory, or what is in it
    (it was empty before)."""
    if made_dir:
        shutil.rmtree(target, ignore_errors=True)
        return
    for name in os.listdir(target):
        path = os.path.join(target, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


class _Importer:
    """The state of one import: where it is in the file and the chain."""

    def __init__(self, target, hmac_key, progress):
        self.target = target
        if hmac_key is None:
            hmac_key = os.environ.get(HMAC_KEY_ENV) or None
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode("utf-8")
        self.key = hmac_key
        self.progress = progress
        self.journal = None
        self.created = None   # whether this import created the journal
        self.appended = (0, GENESIS)  # the tail this import's appends left
        self.signing = None   # whether self.journal signs what it appends
        self.lineno = 0
        self.seq = None
        self.prev = GENESIS
        self.records = 0
        self.signed = 0
        self.transactions = 0

    def run(self, lines):
        lines = iter(lines)
        header = self._header(lines)
        self.identity = header["journal"]
        stop = header.get("stop")
        # For progress only: the header says how many records follow.
        self.total = stop - 1 if type(stop) is int and stop > 0 else None
        pending = []      # _Checked records of the open transaction
        end = None
        for text in lines:
            self.lineno += 1
            obj = self._parse(text)
            if obj is None:
                continue
            if end is not None:
                self._refuse("a line follows the end line (line %d)"
                             % end, obj.get("seq"))
            if obj.get("format") == EXPORT_END:
                end = self.lineno
                self._end(obj, pending)
                continue
            pending.append(self._record(obj))
            if obj["flags"] & FLAG_END:
                self._append(pending)
                pending = []
        if end is None:
            self._refuse("the file ends without the end line: the export"
                         " is cut short", None)
        if self.journal is None:
            # An export of an empty journal: an empty journal.
            self._open(self.key is not None)
        self.journal.sync()
        if self.progress is not None:
            self.progress(self.records, self.total)
        return ImportReport(self.journal.path, self.journal.identity,
                            self.records, self.transactions, self.prev,
                            self.signed)

    def close(self):
        if self.journal is not None:
            self.journal.close()

    def discard(self):
        """After a failure: remove the SQL journal this import created."""
        journal, self.journal = self.journal, None
        if journal is None:
            return
        if self.created:
            try:
                journal.discard(self.appended)
            except ZJournalError as e:
                # Never remove what someone else may have been told is
                # journaled: report it, and leave the journal.
                logger.error("import: %s", e)
        else:
            journal.close()

    def _refuse(self, reason, seq=None, line=None):
        raise ImportRefusedError(line or self.lineno, seq, reason)

    def _parse(self, text):
        if not text.strip():
            return None
        # The seq this line should hold, to name it in a refusal.
        seq = None if self.lineno == 1 else (self.seq or 0) + 1
        try:
            obj = json.loads(text)
        except ValueError as e:
            self._refuse("not JSON: %s" % e, seq)
        if not isinstance(obj, dict):
            self._refuse("not a JSON object", seq)
        return obj

    def _header(self, lines):
        obj = None
        for text in lines:
            self.lineno += 1
            obj = self._parse(text)
            if obj is not None:
                break
        if obj is None:
            self._refuse("empty file: not a zjournal export")
        if obj.get("format") != EXPORT_FORMAT:
            self._refuse("not a zjournal export (the first line has format"
                         " %r, not %r)" % (obj.get("format"), EXPORT_FORMAT))
        if obj.get("version") != EXPORT_VERSION:
            self._refuse("export version %r is not supported (this zjournal"
                         " reads version %d)" % (obj.get("version"),
                                                 EXPORT_VERSION))
        if obj.get("record_format") != FORMAT_VERSION:
            self._refuse("the export holds records of journal format %r;"
                         " this zjournal writes format %d"
                         % (obj.get("record_format"), FORMAT_VERSION))
        try:
            uuid.UUID(obj.get("journal"))
        except (TypeError, ValueError):
            self._refuse("the header's journal identity %r is not a UUID"
                         % (obj.get("journal"),))
        if obj.get("start") != 1:
            self._refuse("the export starts at seq %r: only an export from"
                         " seq 1 can become a journal (export it without"
                         " --start)" % (obj.get("start"),))
        return obj

    def _record(self, obj):
        """Check one record line; return it as a :class:`_Checked`."""
        seq = obj.get("seq")
        expected = 1 if self.seq is None else self.seq + 1
        if type(seq) is not int or seq != expected:
            what = ("a record is missing or out of order" if
                    type(seq) is int else "no valid seq")
            self._refuse("seq %r where seq %d belongs: %s"
                         % (seq, expected, what), expected)
        self.seq = seq
        fields = _fields(obj, self._refuse, seq)
        t, version, name, flags, meta, payload, prev, mac = fields
        if prev != self.prev:
            self._refuse(
                "prev is %s, but the record before it hashes to %s: a"
                " record was changed, removed or reordered"
                % (prev.hex(), self.prev.hex()), seq)
        data = pack_record(seq, t, flags, version, name.encode("utf-8"),
                           payload, prev, meta, mac=mac)
        if data[FLAGS_OFFSET] != flags:
            self._refuse("flags %#x do not match the record (metadata %s,"
                         " signature %s)" % (
                             flags, "present" if meta else "absent",
                             "present" if mac else "absent"), seq)
        self._check_readers_fields(obj, t, flags, payload, seq)
        self.prev = record_hash(data)
        item = (seq, t, version, name, payload, flags & FLAG_QUERY,
                obj["metadata"])
        return _Checked(self.lineno, item, data, mac is not None)

    def _check_readers_fields(self, obj, t, flags, payload, seq):
        """The fields a reader trusts must say what the record says."""
        if obj.get("end") != bool(flags & FLAG_END):
            self._refuse("end is %r but the flags say %r"
                         % (obj.get("end"), bool(flags & FLAG_END)), seq)
        if obj.get("query") != bool(flags & FLAG_QUERY):
            self._refuse("query is %r but the flags say %r"
                         % (obj.get("query"), bool(flags & FLAG_QUERY)), seq)
        if obj.get("iso") != iso(t):
            self._refuse("iso is %r but time %r is %s"
                         % (obj.get("iso"), t, iso(t)), seq)
        expected = rendered_args(payload)
        if "args_error" in expected:
            return  # not decodable here: nothing to compare with
        if _canonical(obj.get("args")) != _canonical(expected["args"]):
            self._refuse("args do not match the payload: the payload"
                         " decodes to %s" % _canonical(expected["args"]),
                         seq)

    def _append(self, pending):
        """Append one checked transaction, as exactly the checked bytes.

        The new journal encodes (and signs) the records itself; what it
        would write must be what was checked, or the copy is not exact.
        """
        first = pending[0]
        signed = {r.signed for r in pending}
        if len(signed) > 1:
            self._refuse("a transaction mixes signed and unsigned records",
                         first.seq, first.line)
        (signed,) = signed
        if self.signing is not signed:
            self._reopen(signed, first)
        batch = self.journal.prepare([r.item for r in pending])
        # The chain hash of the last record covers every byte of the
        # transaction and the chain before it: equal heads, equal bytes
        # (whatever form the journal keeps them in).
        if batch.head != record_hash(pending[-1].data):
            if signed:
                self._refuse("the signatures do not match the key: give the"
                             " key that signed the original journal",
                             first.seq, first.line)
            self._refuse("the records do not re-encode to the same bytes",
                         first.seq, first.line)
        self.journal.append(batch)
        self.appended = (batch.last, batch.head)
        self.records += len(pending)
        if signed:
            self.signed += len(pending)
        self.transactions += 1
        if self.progress is not None and self.records % PROGRESS_EVERY < len(
                pending):
            self.progress(self.records, self.total)

    def _reopen(self, signed, record):
        """Open (or reopen) the new journal signing as the records were.

        A journal signed from some seq on (a key added later) is imported
        by switching keys at that seq, as the original writer did.
        """
        if signed and self.key is None:
            self._refuse("the record is signed: give the key that signed"
                         " the original journal (--hmac-key-env)",
                         record.seq, record.line)
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self._open(signed, record)

    def _open(self, signed, record=None):
        # Unsigned records are re-created unsigned (hmac_key=False), even
        # while ZJOURNAL_HMAC_KEY is set.
        key = self.key if signed else None
        self.journal = open_journal(self.target, fsync="never",
                                    identity=self.identity,
                                    hmac_key=key if key is not None
                                    else False)
        if self.created is None:
            self.created = getattr(self.journal, "_made", True)
            last = self.journal.last_seq
            if last != 0:
                journal, self.journal = self.journal, None
                journal.close()
                self._refuse("%s already holds a journal (up to seq %d);"
                             " import into a new one" % (journal.path, last))
        self.signing = signed

    def _end(self, obj, pending):
        if pending:
            last = pending[-1]
            self._refuse("the last transaction is incomplete: seq %d does"
                         " not end a transaction (an export cut inside a"
                         " transaction, with --stop?)" % last.seq, last.seq,
                         last.line)
        last = self.seq
        if obj.get("records") != self.records or obj.get("last_seq") != last:
            self._refuse("the end line counts %r records up to seq %r, but"
                         " the file holds %d up to seq %r"
                         % (obj.get("records"), obj.get("last_seq"),
                            self.records, last))
        if obj.get("head") != self.prev.hex():
            self._refuse("the end line names head %r, but the last record"
                         " hashes to %s" % (obj.get("head"),
                                            self.prev.hex()), last)


class _Checked:
    """A record line that passed the checks: the journal item to append,
    the bytes it must become, and where it came from."""

    __slots__ = ("line", "item", "data", "signed")

    def __init__(self, line, item, data, signed):
        self.line = line
        self.item = item
        self.data = data
        self.signed = signed

    @property
    def seq(self):
        return self.item[0]


def _fields(obj, refuse, seq):
    """The record fields of an export line, type-checked and decoded."""
    t = obj.get("time")
    if not isinstance(t, float) or not math.isfinite(t):
        refuse("time %r is not a finite float" % (t,), seq)
    try:
        iso(t)
    except (OverflowError, ValueError, OSError):
        refuse("time %r is out of range" % (t,), seq)
    version = obj.get("command_version")
    name = obj.get("command_name")
    flags = obj.get("flags")
    for label, value, bound in (("command_version", version, 1 << 16),
                                ("flags", flags, 1 << 8)):
        if type(value) is not int or not 0 <= value < bound:
            refuse("%s %r is not an integer below %d"
                   % (label, value, bound), seq)
    if not isinstance(name, str):
        refuse("command_name %r is not a string" % (name,), seq)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        refuse("command_name %r is not valid text" % (name,), seq)
    metadata = obj.get("metadata")
    if metadata is None:
        meta = None
    elif not isinstance(metadata, dict) or not metadata:
        refuse("metadata must be null or a non-empty JSON object", seq)
    else:
        try:
            meta = encode_meta(metadata)
        except ValueError as e:
            refuse(str(e), seq)
    payload = _decode(refuse, seq, "payload", obj.get("payload"),
                      lambda s: base64.b64decode(s, validate=True))
    prev = _decode(refuse, seq, "prev", obj.get("prev"), bytes.fromhex)
    mac = obj.get("mac")
    if len(prev) != HASH_SIZE:
        refuse("prev is %d bytes, not %d" % (len(prev), HASH_SIZE), seq)
    if mac is not None:
        mac = _decode(refuse, seq, "mac", mac, bytes.fromhex)
        if len(mac) != MAC_SIZE:
            refuse("mac is %d bytes, not %d" % (len(mac), MAC_SIZE), seq)
    return t, version, name, flags, meta, payload, prev, mac


def _decode(refuse, seq, label, text, decode):
    if not isinstance(text, str):
        refuse("%s %r is not a string" % (label, text), seq)
    try:
        return decode(text)
    except (ValueError, binascii.Error) as e:
        refuse("%s does not decode: %s" % (label, e), seq)


def _canonical(value):
    return json.dumps(value, sort_keys=True)
