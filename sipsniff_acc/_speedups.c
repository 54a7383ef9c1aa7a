/*
 * The one piece of the per-message path written in C: finding the six header lines that
 * transaction tracking needs (Call-ID, CSeq, From, To, Via, Content-Length, long or compact
 * form, any case) in a SIP header block.
 *
 * Why C: in CPython this scan costs ~2.8 us per message however it is written (regex
 * findall with IGNORECASE, split+partition loops, find per header: docs/architecture.md),
 * and the whole parse ~7 us; tshark is beaten by 2x only if the parse gets cheaper. This
 * function does the scan in ~0.3 us. sip.py keeps the pure-Python path and uses it when
 * this module is not built, or when the block has folded lines; a property test checks
 * that both paths agree on arbitrary bytes.
 *
 * scan(data, start, end) -> None if a line in data[start:end] starts with a space or tab
 * (folding: the caller unfolds and uses the Python path), else an 8-tuple: the first value
 * (bytes or None) of each of the six headers, leading blanks skipped, up to the end of its
 * line; then the number of header lines, and the number of Via entries (1 + the commas of
 * every Via line). The two counts let the parser bound what a message may make it build
 * (issue 10) without a second pass over the bytes.
 * Semantics are those of the regex in sip.py:
 *     \n(call-id|i|cseq|from|f|to|t|via|v|content-length|l)[ \t]*:[ \t]*([^\r\n]*)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int same(const char *s, Py_ssize_t n, const char *name) {
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if (name[i] == 0 || lower((unsigned char)s[i]) != name[i]) return 0;
    }
    return name[n] == 0;
}

/* slot of a header name, or -1 */
static int slot_of(const char *s, Py_ssize_t n) {
    if (n == 1) {
        switch (lower((unsigned char)s[0])) {
        case 'i': return 0;
        case 'f': return 2;
        case 't': return 3;
        case 'v': return 4;
        case 'l': return 5;
        default: return -1;
        }
    }
    switch (lower((unsigned char)s[0])) {
    case 'c':
        if (same(s, n, "call-id")) return 0;
        if (same(s, n, "cseq")) return 1;
        if (same(s, n, "content-length")) return 5;
        return -1;
    case 'f': return same(s, n, "from") ? 2 : -1;
    case 't': return same(s, n, "to") ? 3 : -1;
    case 'v': return same(s, n, "via") ? 4 : -1;
    default: return -1;
    }
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t start, end, i, vs[6], ve[6], nlines = 0, nvias = 0;
    int k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn", &buf, &start, &end)) return NULL;
    const char *d = (const char *)buf.buf;
    if (end > buf.len) end = buf.len;
    if (start < 0) start = 0;
    for (k = 0; k < 6; k++) vs[k] = -1;
    i = start;
    while (i < end) {
        const char *nl = memchr(d + i, '\n', (size_t)(end - i));
        if (nl == NULL) break;
        Py_ssize_t ls = (nl - d) + 1, j;
        if (ls >= end) break;
        if (d[ls] == ' ' || d[ls] == '\t') {  /* a folded continuation line */
            PyBuffer_Release(&buf);
            Py_RETURN_NONE;
        }
        i = ls;
        j = ls;
        nlines++;
        while (j < end && d[j] != ':' && d[j] != ' ' && d[j] != '\t' && d[j] != '\r' && d[j] != '\n') j++;
        k = slot_of(d + ls, j - ls);
        if (k < 0 || (vs[k] >= 0 && k != 4)) continue;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        if (j >= end || d[j] != ':') continue;
        j++;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        Py_ssize_t e = j;
        if (k == 4) {  /* every Via line counts: 1 + its commas */
            nvias++;
            while (e < end && d[e] != '\r' && d[e] != '\n') { nvias += d[e] == ','; e++; }
            if (vs[k] >= 0) continue;
        } else {
            while (e < end && d[e] != '\r' && d[e] != '\n') e++;
        }
        vs[k] = j;
        ve[k] = e;
    }
    PyObject *out = PyTuple_New(8);
    if (out == NULL) { PyBuffer_Release(&buf); return NULL; }
    for (k = 0; k < 6; k++) {
        PyObject *v;
        if (vs[k] < 0) { v = Py_None; Py_INCREF(v); }
        else {
            v = PyBytes_FromStringAndSize(d + vs[k], ve[k] - vs[k]);
            if (v == NULL) { Py_DECREF(out); PyBuffer_Release(&buf); return NULL; }
        }
        PyTuple_SET_ITEM(out, k, v);
    }
    PyObject *counts[2] = {PyLong_FromSsize_t(nlines), PyLong_FromSsize_t(nvias)};
    if (counts[0] == NULL || counts[1] == NULL) {
        Py_XDECREF(counts[0]);
        Py_XDECREF(counts[1]);
        Py_DECREF(out);
        PyBuffer_Release(&buf);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 6, counts[0]);
    PyTuple_SET_ITEM(out, 7, counts[1]);
    PyBuffer_Release(&buf);
    return out;
}

/*
 * param(value, name, start, stop, angle) -> bytes or None: the first ";name=value" in
 * value[start:stop], as the regexes _TAG and _BRANCH of sip.py find it:
 *     ;[ \t]*NAME[ \t]*=[ \t]*([^;, \t\r\n]+)      ('>' also ends the value when angle is true)
 * name must be given in lower case.
 */
static PyObject *param(PyObject *self, PyObject *args) {
    Py_buffer buf;
    const char *name;
    Py_ssize_t namelen, start, stop, i;
    int angle;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#nnp", &buf, &name, &namelen, &start, &stop, &angle)) return NULL;
    const char *d = (const char *)buf.buf;
    if (stop > buf.len) stop = buf.len;
    if (start < 0) start = 0;
    for (i = start; i < stop; i++) {
        Py_ssize_t j, e;
        if (d[i] != ';') continue;
        j = i + 1;
        while (j < stop && (d[j] == ' ' || d[j] == '\t')) j++;
        if (stop - j < namelen) continue;
        Py_ssize_t m;
        for (m = 0; m < namelen; m++) {
            if (lower((unsigned char)d[j + m]) != name[m]) break;
        }
        if (m < namelen) continue;
        j += namelen;
        while (j < stop && (d[j] == ' ' || d[j] == '\t')) j++;
        if (j >= stop || d[j] != '=') continue;
        j++;
        while (j < stop && (d[j] == ' ' || d[j] == '\t')) j++;
        e = j;
        while (e < stop) {
            char c = d[e];
            if (c == ';' || c == ',' || c == ' ' || c == '\t' || c == '\r' || c == '\n' || (angle && c == '>')) break;
            e++;
        }
        if (e == j) continue;
        PyObject *out = PyBytes_FromStringAndSize(d + j, e - j);
        PyBuffer_Release(&buf);
        return out;
    }
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Find the eager SIP header values in data[start:end]; None if folded."},
    {"param", param, METH_VARARGS, "The first ;name=value parameter in data[start:stop], or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
