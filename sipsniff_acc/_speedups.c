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

/* The scan itself, on raw bytes: the value span of each of the six headers (vs[k] < 0: absent),
 * the span of the second Via line (v2s < 0: none), the counts. Returns 0, or 1 if a line is folded. */
static int scan_core(const char *d, Py_ssize_t start, Py_ssize_t end, Py_ssize_t vs[6], Py_ssize_t ve[6],
                     Py_ssize_t *v2s, Py_ssize_t *v2e, Py_ssize_t *nlines_out, Py_ssize_t *nvias_out) {
    Py_ssize_t i, nlines = 0, nvias = 0;
    int k;
    for (k = 0; k < 6; k++) vs[k] = -1;
    *v2s = -1;
    *v2e = -1;
    i = start;
    while (i < end) {
        const char *nl = memchr(d + i, '\n', (size_t)(end - i));
        if (nl == NULL) break;
        Py_ssize_t ls = (nl - d) + 1, j;
        if (ls >= end) break;
        if (d[ls] == ' ' || d[ls] == '\t') return 1; /* a folded continuation line */
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
            if (vs[k] >= 0) {
                if (*v2s < 0) { *v2s = j; *v2e = e; }
                continue;
            }
        } else {
            while (e < end && d[e] != '\r' && d[e] != '\n') e++;
        }
        vs[k] = j;
        ve[k] = e;
    }
    *nlines_out = nlines;
    *nvias_out = nvias;
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t start, end, vs[6], ve[6], v2s, v2e, nlines = 0, nvias = 0;
    int k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn", &buf, &start, &end)) return NULL;
    const char *d = (const char *)buf.buf;
    if (end > buf.len) end = buf.len;
    if (start < 0) start = 0;
    if (scan_core(d, start, end, vs, ve, &v2s, &v2e, &nlines, &nvias)) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
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
/* The value span [*vs, *ve) of the first ";name=value" in d[start:stop]; 0 if none. */
static int param_core(const char *d, const char *name, Py_ssize_t namelen, Py_ssize_t start, Py_ssize_t stop,
                      int angle, Py_ssize_t *vs, Py_ssize_t *ve) {
    Py_ssize_t i;
    if (start < 0) start = 0;
    for (i = start; i < stop; i++) {
        Py_ssize_t j, e, m;
        if (d[i] != ';') continue;
        j = i + 1;
        while (j < stop && (d[j] == ' ' || d[j] == '\t')) j++;
        if (stop - j < namelen) continue;
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
        *vs = j;
        *ve = e;
        return 1;
    }
    return 0;
}

static PyObject *param(PyObject *self, PyObject *args) {
    Py_buffer buf;
    const char *name;
    Py_ssize_t namelen, start, stop, vs, ve;
    int angle;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y#nnp", &buf, &name, &namelen, &start, &stop, &angle)) return NULL;
    const char *d = (const char *)buf.buf;
    if (stop > buf.len) stop = buf.len;
    PyObject *out;
    if (param_core(d, name, namelen, start, stop, angle, &vs, &ve)) out = PyBytes_FromStringAndSize(d + vs, ve - vs);
    else { out = Py_None; Py_INCREF(out); }
    PyBuffer_Release(&buf);
    return out;
}

/*
 * fill(msg, data) -> bool: the whole eager parse of sip.parse() for the common, well-formed
 * message, attributes set on msg (a fresh SipMessage). False when anything is unusual — a bad
 * or odd start line, no end of headers, folding, any defect (missing or odd Call-ID, CSeq,
 * Via, Content-Length, too many lines or Vias): then sip.parse() does the work in Python on a
 * fresh message, so defects and errors have one implementation. A property test checks that
 * whenever fill() says True the fields equal the pure-Python parse.
 * It also sets _via2, the second Via entry (what vias()[1] gives; None when there is one),
 * when it is plain to find: the first Via line holds no comma and the second no , " < >.
 */
#define MAX_START_LINE 8192
#define MAX_HEADERS 512
#define MAX_VIAS 128

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c; }

static int is_token(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return 1;
    return c != 0 && strchr(".!%*_+`'~-", c) != NULL;
}

static PyObject *s_is_request, *s_method, *s_ruri, *s_code, *s_reason, *s_call_id, *s_cseq_num, *s_cseq_method,
    *s_from_tag, *s_to_tag, *s_branch, *s_content_length, *s_body_start, *s_hdr_start, *s_hdr_end, *s_via2;

static PyObject *text(const char *s, Py_ssize_t n) { return PyUnicode_DecodeUTF8(s, n, "replace"); }

/* set msg.name = value (stolen); -1 on error */
static int put(PyObject *msg, PyObject *name, PyObject *value) {
    if (value == NULL) return -1;
    int r = PyObject_SetAttr(msg, name, value);
    Py_DECREF(value);
    return r;
}

/* a From/To value's tag (after the last '>'), as text, into msg.name; 0 if none, -1 on error */
static int put_tag(PyObject *msg, PyObject *name, const char *d, Py_ssize_t vs, Py_ssize_t ve) {
    Py_ssize_t start = vs, i, ts, te;
    for (i = ve - 1; i >= vs; i--) {
        if (d[i] == '>') { start = i + 1; break; }
    }
    if (!param_core(d, "tag", 3, start, ve, 1, &ts, &te)) return 0;
    return put(msg, name, text(d + ts, te - ts));
}

static PyObject *fill(PyObject *self, PyObject *args) {
    PyObject *msg;
    Py_buffer buf;
    Py_ssize_t vs[6], ve[6], v2s, v2e, nlines, nvias, i, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*", &msg, &buf)) return NULL;
    const char *d = (const char *)buf.buf;
    Py_ssize_t len = buf.len;
    int ok = 0;
#define FAIL goto done
#define ERR do { ok = -1; goto done; } while (0)
    const char *p = memchr(d, '\n', (size_t)(len < MAX_START_LINE ? len : MAX_START_LINE));
    if (p == NULL) FAIL;
    Py_ssize_t nl = p - d, le = nl;
    if (le > 0 && d[le - 1] == '\r') le--;
    /* header end: \r\n\r\n, else \n\n (from the start line's \n, as sip.parse) */
    Py_ssize_t end = -1, body = 0;
    for (i = nl; i + 3 < len; i++) {
        const char *q = memchr(d + i, '\r', (size_t)(len - 3 - i));
        if (q == NULL) break;
        i = q - d;
        if (d[i + 1] == '\n' && d[i + 2] == '\r' && d[i + 3] == '\n') { end = i; body = i + 4; break; }
    }
    if (end < 0) FAIL; /* \n\n or none: the Python path */
    if (scan_core(d, nl, end, vs, ve, &v2s, &v2e, &nlines, &nvias)) FAIL;
    if (nlines > MAX_HEADERS || nvias > MAX_VIAS) FAIL;
    if (vs[0] < 0 || vs[1] < 0 || vs[4] < 0) FAIL;
    /* Call-ID: trailing blanks off, not empty */
    Py_ssize_t ce = ve[0];
    while (ce > vs[0] && is_ws((unsigned char)d[ce - 1])) ce--;
    if (ce == vs[0]) FAIL;
    /* CSeq: 1-9 digits, a space, the method */
    Py_ssize_t j = vs[1];
    long num = 0;
    while (j < ve[1] && d[j] != ' ') {
        if (d[j] < '0' || d[j] > '9') FAIL;
        num = num * 10 + (d[j] - '0');
        j++;
    }
    if (j == vs[1] || j - vs[1] > 9) FAIL;
    Py_ssize_t ms = j < ve[1] ? j + 1 : ve[1], me = ve[1];
    while (ms < me && is_ws((unsigned char)d[ms])) ms++;
    while (me > ms && is_ws((unsigned char)d[me - 1])) me--;
    /* Content-Length: blanks around 1-10 digits, the body all there */
    long long clen = -1;
    if (vs[5] >= 0) {
        Py_ssize_t a = vs[5], b = ve[5];
        while (a < b && is_ws((unsigned char)d[a])) a++;
        while (b > a && is_ws((unsigned char)d[b - 1])) b--;
        if (a == b || b - a > 10) FAIL;
        clen = 0;
        for (; a < b; a++) {
            if (d[a] < '0' || d[a] > '9') FAIL;
            clen = clen * 10 + (d[a] - '0');
        }
        if (body + clen > len) FAIL;
    }
    /* the start line */
    if (le >= 8 && memcmp(d, "SIP/2.0 ", 8) == 0) {
        if (le < 11) FAIL;
        for (i = 8; i < 11; i++) if (d[i] < '0' || d[i] > '9') FAIL;
        if (le > 11 && d[11] != ' ') FAIL;
        long code = (d[8] - '0') * 100 + (d[9] - '0') * 10 + (d[10] - '0');
        if (put(msg, s_code, PyLong_FromLong(code)) < 0) ERR;
        if (le > 12) { if (put(msg, s_reason, text(d + 12, le - 12)) < 0) ERR; }
    } else {
        Py_ssize_t sp1 = -1, sp2 = -1;
        for (i = 0; i < le; i++) {
            if (d[i] == ' ') {
                if (sp1 < 0) sp1 = i;
                else if (sp2 < 0) sp2 = i;
                else FAIL;
            }
        }
        if (sp2 < 0 || sp1 == 0 || sp2 == sp1 + 1 || le - sp2 - 1 != 7 || memcmp(d + sp2 + 1, "SIP/2.0", 7) != 0) FAIL;
        for (i = 0; i < sp1; i++) if (!is_token((unsigned char)d[i])) FAIL;
        if (put(msg, s_is_request, Py_NewRef(Py_True)) < 0) ERR;
        if (put(msg, s_method, text(d, sp1)) < 0) ERR;
        if (put(msg, s_ruri, text(d + sp1 + 1, sp2 - sp1 - 1)) < 0) ERR;
    }
    if (put(msg, s_call_id, text(d + vs[0], ce - vs[0])) < 0) ERR;
    if (put(msg, s_cseq_num, PyLong_FromLong(num)) < 0) ERR;
    if (me > ms && put(msg, s_cseq_method, text(d + ms, me - ms)) < 0) ERR;
    if (vs[2] >= 0 && put_tag(msg, s_from_tag, d, vs[2], ve[2]) < 0) ERR;
    if (vs[3] >= 0 && put_tag(msg, s_to_tag, d, vs[3], ve[3]) < 0) ERR;
    {   /* the top Via's branch (up to the first comma) */
        Py_ssize_t stop = ve[4], bs, be;
        const char *c = memchr(d + vs[4], ',', (size_t)(ve[4] - vs[4]));
        if (c != NULL) stop = c - d;
        if (param_core(d, "branch", 6, vs[4], stop, 0, &bs, &be) && put(msg, s_branch, text(d + bs, be - bs)) < 0) ERR;
        if (c == NULL) {  /* the second Via entry, when plain */
            if (v2s < 0) { if (put(msg, s_via2, Py_NewRef(Py_None)) < 0) ERR; }
            else {
                Py_ssize_t a = v2s, b = v2e;
                int plain = 1;
                for (i = a; i < b; i++) {
                    char ch = d[i];
                    if (ch == ',' || ch == '"' || ch == '<' || ch == '>') { plain = 0; break; }
                }
                if (plain) {
                    while (a < b && is_ws((unsigned char)d[a])) a++;
                    while (b > a && is_ws((unsigned char)d[b - 1])) b--;
                    if (put(msg, s_via2, text(d + a, b - a)) < 0) ERR;
                }
            }
        }
    }
    if (clen >= 0 && put(msg, s_content_length, PyLong_FromLongLong(clen)) < 0) ERR;
    if (put(msg, s_body_start, PyLong_FromSsize_t(body)) < 0) ERR;
    if (put(msg, s_hdr_start, PyLong_FromSsize_t(nl + 1)) < 0) ERR;
    if (put(msg, s_hdr_end, PyLong_FromSsize_t(end)) < 0) ERR;
    ok = 1;
    (void)n;
done:
    PyBuffer_Release(&buf);
    if (ok < 0) return NULL;
    return PyBool_FromLong(ok);
#undef FAIL
#undef ERR
}

/*
 * call_id(data) -> bytes or None: the value of the first Call-ID line anywhere in data, as the
 * -j N front shards by it without parsing (processrun.shard_of); the regex it replaces:
 *     \n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)      (any case; value up to the end of the line)
 * 0.15 us where the regex search cost 0.76 us a message in the one process that cannot be split.
 */
static PyObject *call_id(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    (void)self;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    const char *d = (const char *)buf.buf;
    Py_ssize_t end = buf.len, i = 0;
    while (i < end) {
        const char *nl = memchr(d + i, '\n', (size_t)(end - i));
        if (nl == NULL) break;
        Py_ssize_t j = (nl - d) + 1;
        i = j;
        if (j < end && lower((unsigned char)d[j]) == 'i') j += 1;
        else if (end - j >= 7 && lower((unsigned char)d[j]) == 'c' && same(d + j, 7, "call-id")) j += 7;
        else continue;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        if (j >= end || d[j] != ':') continue;
        j++;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        Py_ssize_t e = j;
        while (e < end && d[e] != '\r' && d[e] != '\n') e++;
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
    {"call_id", call_id, METH_O, "The value of the first Call-ID line in data (any case, compact too), or None."},
    {"fill", fill, METH_VARARGS, "Parse a well-formed SIP message's eager fields into msg; False: use the Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_is_request, "is_request"}, {&s_method, "method"}, {&s_ruri, "ruri"}, {&s_code, "code"},
        {&s_reason, "reason"}, {&s_call_id, "call_id"}, {&s_cseq_num, "cseq_num"}, {&s_cseq_method, "cseq_method"},
        {&s_from_tag, "from_tag"}, {&s_to_tag, "to_tag"}, {&s_branch, "branch"}, {&s_content_length, "content_length"},
        {&s_body_start, "body_start"}, {&s_hdr_start, "_hdr_start"}, {&s_hdr_end, "_hdr_end"}, {&s_via2, "_via2"},
    };
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (*names[i].slot == NULL) return NULL;
    }
    return PyModule_Create(&module);
}
