/* Optional C speedups for zjournal.journal's record scan.

   The Python scan in zjournal.journal._scan defines what a valid record
   is; this module only runs its happy path faster.  check_run() walks
   whole records that pass every check a record can pass on its own
   (framing, CRC, flags, extras) and follow the chain, and stops at the
   first one that does not, or that would need more bytes: the Python
   loop then takes over at that record and decides, with the same code as
   without this module, whether it is a torn tail, corruption or a record
   split across two reads.  So a difference between the two can only make
   the C side stop early, never accept more.

   Record layout: see zjournal/format.py.  All integers big-endian. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <zlib.h>
#include <openssl/sha.h>

#define HEAD_SIZE 46        /* crc .. prev */
#define BODY_HEAD_SIZE 38   /* seq .. prev */
#define HASH_SIZE 16
#define MAC_SIZE 16
#define FLAG_END 0x01
#define FLAG_QUERY 0x02
#define FLAG_META 0x04
#define FLAG_MAC 0x08
#define KNOWN_FLAGS 0x0f
#define MAX_NAME_SIZE 1024
#define MAX_BODY_SIZE (1u << 28)
#define MAX_META_SIZE (1u << 20)

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16)
        | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static uint64_t
be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* What check_one() found in a record that passes every check a record can
   pass on its own (the Python loop's inlined checks, same order of
   severity): offsets into the buffer and the fields the callers use. */
struct record {
    uint64_t seq;
    uint64_t time_bits;
    unsigned flags;
    unsigned version;
    unsigned k;             /* name length; the name is at pos + HEAD_SIZE */
    uint32_t n;             /* body length */
    Py_ssize_t end;         /* pos + 8 + n: where the trailing length is */
    Py_ssize_t at;          /* the payload */
    Py_ssize_t body_end;    /* the end of the payload (the MAC follows) */
    Py_ssize_t meta_at;
    Py_ssize_t meta_len;
};

/* 1 if the whole record at buf[pos] lies within size bytes, carries seq
   expected, and its framing, CRC, flags and extras hold; 0 otherwise. */
static int
check_one(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t size,
          uint64_t expected, struct record *rec)
{
    const unsigned char *r = buf + pos;
    uint32_t n = be32(r + 4);
    unsigned k = ((unsigned)r[28] << 8) | r[29];
    unsigned flags = r[24];
    Py_ssize_t end = pos + 8 + (Py_ssize_t)n;
    Py_ssize_t at, body_end;

    if (n > MAX_BODY_SIZE || k > MAX_NAME_SIZE
            || n < BODY_HEAD_SIZE + k || end + 4 > size
            || be64(r + 8) != expected || (flags & ~KNOWN_FLAGS) || r[25])
        return 0;
    if (crc32(0L, r + 4, (uInt)(n + 4)) != be32(r) || be32(buf + end) != n)
        return 0;
    at = pos + HEAD_SIZE + k;
    body_end = end;
    rec->meta_at = rec->meta_len = 0;
    if (flags & FLAG_MAC) {
        body_end -= MAC_SIZE;
        if (body_end < at)
            return 0;
    }
    if (flags & FLAG_META) {
        uint32_t j;
        if (at + 4 > body_end)
            return 0;
        j = be32(buf + at);
        if (j > MAX_META_SIZE || at + 4 + (Py_ssize_t)j > body_end)
            return 0;
        rec->meta_at = at + 4;
        rec->meta_len = (Py_ssize_t)j;
        at += 4 + (Py_ssize_t)j;
    }
    rec->seq = expected;
    rec->time_bits = be64(r + 16);
    rec->flags = flags;
    rec->version = ((unsigned)r[26] << 8) | r[27];
    rec->k = k;
    rec->n = n;
    rec->end = end;
    rec->at = at;
    rec->body_end = body_end;
    return 1;
}

PyDoc_STRVAR(check_run_doc,
"check_run(buf, pos, expected, stop, chain, signed, unsigned, queries)\n"
"-> tuple\n\n"
"Check whole records of buf from pos on, as zjournal.journal._scan does\n"
"without building entries.  Stops before the first record that does not\n"
"fit in buf, fails a check, does not follow chain, or whose seq reaches\n"
"stop (a transaction end at stop - 1 is included).  Returns (pos,\n"
"expected, chain, end_pos, end_seq, end_chain, held_pos, held_seq,\n"
"signed, unsigned, queries): where it stopped, the next expected seq and\n"
"the running chain hash; the end of the last whole transaction seen\n"
"(end_pos -1 if none) with its last seq and chain hash; the first record\n"
"after it (held_pos -1 if none); the counts of signed, unsigned and\n"
"query records in the whole transactions it ended; and those counts for\n"
"the records after the last end (given in, for a transaction begun\n"
"before pos, and handed back).");

static PyObject *
check_run(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    unsigned long long expected, stop;
    Py_buffer chain_in;
    unsigned char chain[HASH_SIZE], end_chain[HASH_SIZE];
    unsigned char digest[SHA256_DIGEST_LENGTH];
    Py_ssize_t end_pos = -1, held_pos = -1;
    unsigned long long end_seq = 0, held_seq = 0;
    long long signed_n = 0, unsigned_n = 0, queries = 0;
    long long t_signed = 0, t_unsigned = 0, t_queries = 0;
    PyObject *result;

    if (!PyArg_ParseTuple(args, "y*nKKy*LLL", &view, &pos, &expected,
                          &stop, &chain_in, &t_signed, &t_unsigned,
                          &t_queries))
        return NULL;
    if (chain_in.len != HASH_SIZE || pos < 0 || pos > view.len) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&chain_in);
        PyErr_SetString(PyExc_ValueError, "bad chain hash or position");
        return NULL;
    }
    memcpy(chain, chain_in.buf, HASH_SIZE);
    memcpy(end_chain, chain, HASH_SIZE);
    PyBuffer_Release(&chain_in);

    {
        const unsigned char *buf = (const unsigned char *)view.buf;
        Py_ssize_t size = view.len;

        Py_BEGIN_ALLOW_THREADS
        while (size - pos >= HEAD_SIZE) {
            const unsigned char *r = buf + pos;
            struct record rec;

            if (expected >= stop
                    || !check_one(buf, pos, size, expected, &rec))
                break;
            if (memcmp(r + 30, chain, HASH_SIZE) != 0)
                break;
            SHA256(r + 4, (size_t)(rec.n + 4), digest);
            memcpy(chain, digest, HASH_SIZE);
            if (rec.flags & FLAG_MAC)
                t_signed++;
            else
                t_unsigned++;
            if (rec.flags & FLAG_QUERY)
                t_queries++;
            if (held_pos < 0)
                held_pos = pos;
            if (held_pos == pos)
                held_seq = rec.seq;
            pos = rec.end + 4;
            expected++;
            if (rec.flags & FLAG_END) {
                end_pos = pos;
                end_seq = rec.seq;
                memcpy(end_chain, chain, HASH_SIZE);
                signed_n += t_signed;
                unsigned_n += t_unsigned;
                queries += t_queries;
                t_signed = t_unsigned = t_queries = 0;
                held_pos = -1;
                if (rec.seq + 1 >= stop)
                    break;
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    result = Py_BuildValue(
        "nKy#nKy#nKLLLLLL", pos, expected, (const char *)chain,
        (Py_ssize_t)HASH_SIZE, end_pos, end_seq, (const char *)end_chain,
        (Py_ssize_t)HASH_SIZE, held_pos, held_seq, signed_n, unsigned_n,
        queries, t_signed, t_unsigned, t_queries);
    return result;
}

static PyObject *
bytes_or_none(const unsigned char *p, Py_ssize_t n, int present)
{
    if (!present)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)p, n);
}

PyDoc_STRVAR(read_run_doc,
"read_run(buf, pos, expected, start, stop, offset, names, entry_type)\n"
"-> (pos, expected, entries, reached_stop)\n\n"
"Decode whole transactions of valid records from buf at pos, as\n"
"zjournal.journal._scan does when it builds entries.  Returns the entries\n"
"with start <= seq < stop of every transaction it read to its end, and\n"
"stops at the start of the first transaction it cannot read whole from\n"
"buf (a record needing more bytes or failing a check: the Python loop\n"
"decides what it is), or after the transaction that reaches stop.\n"
"names caches command names by their bytes; offset is the file offset\n"
"of buf[0]; entry_type is the tuple subclass to build.");

static PyObject *
read_run(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, txn_pos;
    unsigned long long expected, txn_expected, start, stop;
    long long offset;
    PyObject *names, *entry_type;
    PyObject *out = NULL, *txn = NULL, *result = NULL;
    int reached = 0;

    if (!PyArg_ParseTuple(args, "y*nKKKLO!O!", &view, &pos, &expected,
                          &start, &stop, &offset, &PyDict_Type, &names,
                          &PyType_Type, &entry_type))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)entry_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "entry_type must be a tuple type");
        goto done;
    }
    if (pos < 0 || pos > view.len) {
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        goto done;
    }
    out = PyList_New(0);
    txn = PyList_New(0);
    if (out == NULL || txn == NULL)
        goto done;
    txn_pos = pos;
    txn_expected = expected;
    {
        const unsigned char *buf = (const unsigned char *)view.buf;
        Py_ssize_t size = view.len;
        PyTypeObject *type = (PyTypeObject *)entry_type;

        while (size - pos >= HEAD_SIZE) {
            const unsigned char *r = buf + pos;
            struct record rec;
            uint64_t seq;
            double t;
            unsigned flags;
            PyObject *raw, *name, *entry;

            if (!check_one(buf, pos, size, expected, &rec))
                break;
            seq = rec.seq;
            flags = rec.flags;
            if (seq >= start && seq < stop) {
                raw = PyBytes_FromStringAndSize((const char *)r + HEAD_SIZE,
                                                (Py_ssize_t)rec.k);
                if (raw == NULL)
                    goto done;
                name = PyDict_GetItemWithError(names, raw);
                if (name == NULL) {
                    if (PyErr_Occurred()) {
                        Py_DECREF(raw);
                        goto done;
                    }
                    name = PyUnicode_DecodeUTF8((const char *)r + HEAD_SIZE,
                                                (Py_ssize_t)rec.k, "replace");
                    if (name == NULL || PyDict_SetItem(names, raw, name)) {
                        Py_XDECREF(name);
                        Py_DECREF(raw);
                        goto done;
                    }
                    Py_DECREF(name);  /* the dict keeps it */
                }
                Py_DECREF(raw);
                memcpy(&t, &rec.time_bits, sizeof t);
                entry = type->tp_alloc(type, 11);
                if (entry == NULL)
                    goto done;
                Py_INCREF(name);
                PyTuple_SET_ITEM(entry, 4, name);
                PyTuple_SET_ITEM(entry, 0, PyLong_FromUnsignedLongLong(seq));
                PyTuple_SET_ITEM(entry, 1, PyFloat_FromDouble(t));
                PyTuple_SET_ITEM(entry, 2, PyLong_FromLong((long)flags));
                PyTuple_SET_ITEM(entry, 3, PyLong_FromLong((long)rec.version));
                PyTuple_SET_ITEM(entry, 5, PyBytes_FromStringAndSize(
                    (const char *)buf + rec.at, rec.body_end - rec.at));
                PyTuple_SET_ITEM(entry, 6, PyLong_FromLongLong(
                    offset + (long long)pos));
                PyTuple_SET_ITEM(entry, 7, PyLong_FromLong((long)rec.n + 12));
                PyTuple_SET_ITEM(entry, 8, PyBytes_FromStringAndSize(
                    (const char *)r + 30, HASH_SIZE));
                PyTuple_SET_ITEM(entry, 9, bytes_or_none(
                    buf + rec.meta_at, rec.meta_len, flags & FLAG_META));
                PyTuple_SET_ITEM(entry, 10, bytes_or_none(
                    buf + rec.body_end, MAC_SIZE, flags & FLAG_MAC));
                {
                    Py_ssize_t i;
                    for (i = 0; i < 11; i++)
                        if (PyTuple_GET_ITEM(entry, i) == NULL) {
                            Py_DECREF(entry);
                            goto done;
                        }
                }
                if (PyList_Append(txn, entry)) {
                    Py_DECREF(entry);
                    goto done;
                }
                Py_DECREF(entry);
            }
            pos = rec.end + 4;
            expected++;
            if (flags & FLAG_END) {
                Py_ssize_t i, m = PyList_GET_SIZE(txn);
                for (i = 0; i < m; i++)
                    if (PyList_Append(out, PyList_GET_ITEM(txn, i)))
                        goto done;
                if (PyList_SetSlice(txn, 0, m, NULL))
                    goto done;
                txn_pos = pos;
                txn_expected = expected;
                if (seq + 1 >= stop) {
                    reached = 1;
                    break;
                }
            }
        }
    }
    result = Py_BuildValue("nKOi", txn_pos, txn_expected, out, reached);

done:
    Py_XDECREF(out);
    Py_XDECREF(txn);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"check_run", check_run, METH_VARARGS, check_run_doc},
    {"read_run", read_run, METH_VARARGS, read_run_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zjournal._speedups",
    "C speedups for the journal scan (optional; see zjournal.journal).",
    -1, methods
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
