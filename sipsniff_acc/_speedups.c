/*
 * The SIP parse's per-message work in C: finding the six header lines that transaction
 * tracking needs (Call-ID, CSeq, From, To, Via, Content-Length, long or compact form, any
 * case) in a SIP header block (scan), the whole eager parse of a well-formed message (fill),
 * and, for `messages`, that parse written straight out as the output line (jsonl, table).
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
#define _GNU_SOURCE /* memrchr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
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
        {   /* no name of the six starts otherwise (slot_of): most lines end here, unread */
            int c = lower((unsigned char)d[ls]);
            if (c != 'c' && c != 'f' && c != 't' && c != 'v' && c != 'i' && c != 'l') continue;
        }
        while (j < end && d[j] != ':' && d[j] != ' ' && d[j] != '\t' && d[j] != '\r' && d[j] != '\n') j++;
        k = slot_of(d + ls, j - ls);
        if (k < 0 || (vs[k] >= 0 && k != 4)) continue;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        if (j >= end || d[j] != ':') continue;
        j++;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        /* the value ends at the first CR or LF (memchr: a byte loop cost ~4 instructions a byte) */
        const char *lf = j < end ? memchr(d + j, '\n', (size_t)(end - j)) : NULL;
        Py_ssize_t e = lf != NULL ? lf - d : end;
        const char *cr = e > j ? memchr(d + j, '\r', (size_t)(e - j)) : NULL;
        if (cr != NULL) e = cr - d;
        i = e;  /* (the next line's LF is at or after e) */
        if (k == 4) {  /* every Via line counts: 1 + its commas */
            const char *c = d + j;
            nvias++;
            while ((c = memchr(c, ',', (size_t)(d + e - c))) != NULL) { nvias++; c++; }
            if (vs[k] >= 0) {
                if (*v2s < 0) { *v2s = j; *v2e = e; }
                continue;
            }
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

/* What the eager parse found, as spans of the message bytes (start < 0: absent). */
typedef struct {
    int is_request;
    long code;                                /* a response's status code */
    Py_ssize_t method_e;                      /* a request's method is d[0:method_e] */
    Py_ssize_t ruri_s, ruri_e;
    Py_ssize_t reason_s, reason_e;            /* reason_s < 0: "" (the class default) */
    Py_ssize_t cid_s, cid_e;
    long cseq;
    Py_ssize_t cm_s, cm_e;                    /* cm_s < 0: "" */
    Py_ssize_t ftag_s, ftag_e, ttag_s, ttag_e, br_s, br_e;
    int via2;                                 /* -1: not known (False), 0: None, 1: the span */
    Py_ssize_t via2_s, via2_e;
    long long clen;                           /* -1: no Content-Length */
    Py_ssize_t body, hdr_start, hdr_end;
} Parsed;

/* The tag span of a From/To value (after the last '>'); *ts = -1 if none. */
static void tag_span(const char *d, Py_ssize_t vs, Py_ssize_t ve, Py_ssize_t *ts, Py_ssize_t *te) {
    Py_ssize_t start = vs;
    const char *gt = ve > vs ? memrchr(d + vs, '>', (size_t)(ve - vs)) : NULL;  /* the last '>' */
    if (gt != NULL) start = (gt - d) + 1;
    if (!param_core(d, "tag", 3, start, ve, 1, ts, te)) *ts = -1;
}

/* The eager parse of d[0:len] into *p: 1, or 0 when the message is not the common, well-formed
 * kind (the Python parse takes it). Every offset is checked against len before it is read. */
static int parse_core(const char *d, Py_ssize_t len, Parsed *p) {
    Py_ssize_t vs[6], ve[6], v2s, v2e, nlines, nvias, i;
    const char *q = memchr(d, '\n', (size_t)(len < MAX_START_LINE ? len : MAX_START_LINE));
    if (q == NULL) return 0;
    Py_ssize_t nl = q - d, le = nl;
    if (le > 0 && d[le - 1] == '\r') le--;
    /* header end: \r\n\r\n, else \n\n (from the start line's \n, as sip.parse) */
    Py_ssize_t end = -1, body = 0;
    for (i = nl; i + 3 < len; i++) {
        const char *r = memchr(d + i, '\r', (size_t)(len - 3 - i));
        if (r == NULL) break;
        i = r - d;
        if (d[i + 1] == '\n' && d[i + 2] == '\r' && d[i + 3] == '\n') { end = i; body = i + 4; break; }
    }
    if (end < 0) return 0; /* \n\n or none: the Python path */
    if (scan_core(d, nl, end, vs, ve, &v2s, &v2e, &nlines, &nvias)) return 0;
    if (nlines > MAX_HEADERS || nvias > MAX_VIAS) return 0;
    if (vs[0] < 0 || vs[1] < 0 || vs[4] < 0) return 0;
    /* Call-ID: trailing blanks off, not empty */
    Py_ssize_t ce = ve[0];
    while (ce > vs[0] && is_ws((unsigned char)d[ce - 1])) ce--;
    if (ce == vs[0]) return 0;
    /* CSeq: 1-9 digits, a space, the method */
    Py_ssize_t j = vs[1];
    long num = 0;
    while (j < ve[1] && d[j] != ' ') {
        if (d[j] < '0' || d[j] > '9') return 0;
        if (j - vs[1] >= 9) return 0; /* a 10th digit: the Python path; checked before the multiply
                                         (20 digits from the wire overflowed a long: UB) */
        num = num * 10 + (d[j] - '0');
        j++;
    }
    if (j == vs[1]) return 0;
    Py_ssize_t ms = j < ve[1] ? j + 1 : ve[1], me = ve[1];
    while (ms < me && is_ws((unsigned char)d[ms])) ms++;
    while (me > ms && is_ws((unsigned char)d[me - 1])) me--;
    /* Content-Length: blanks around 1-10 digits, the body all there */
    long long clen = -1;
    if (vs[5] >= 0) {
        Py_ssize_t a = vs[5], b = ve[5];
        while (a < b && is_ws((unsigned char)d[a])) a++;
        while (b > a && is_ws((unsigned char)d[b - 1])) b--;
        if (a == b || b - a > 10) return 0;
        clen = 0;
        for (; a < b; a++) {
            if (d[a] < '0' || d[a] > '9') return 0;
            clen = clen * 10 + (d[a] - '0');
        }
        if (body + clen > len) return 0;
    }
    /* the start line */
    p->reason_s = -1;
    p->reason_e = -1;
    if (le >= 8 && memcmp(d, "SIP/2.0 ", 8) == 0) {
        if (le < 11) return 0;
        for (i = 8; i < 11; i++) if (d[i] < '0' || d[i] > '9') return 0;
        if (le > 11 && d[11] != ' ') return 0;
        p->is_request = 0;
        p->code = (d[8] - '0') * 100 + (d[9] - '0') * 10 + (d[10] - '0');
        p->method_e = 0;
        p->ruri_s = p->ruri_e = -1;
        if (le > 12) { p->reason_s = 12; p->reason_e = le; }
    } else {
        Py_ssize_t sp1 = -1, sp2 = -1;
        for (i = 0; i < le; i++) {
            if (d[i] == ' ') {
                if (sp1 < 0) sp1 = i;
                else if (sp2 < 0) sp2 = i;
                else return 0;
            }
        }
        if (sp2 < 0 || sp1 == 0 || sp2 == sp1 + 1 || le - sp2 - 1 != 7 || memcmp(d + sp2 + 1, "SIP/2.0", 7) != 0)
            return 0;
        for (i = 0; i < sp1; i++) if (!is_token((unsigned char)d[i])) return 0;
        p->is_request = 1;
        p->code = 0;
        p->method_e = sp1;
        p->ruri_s = sp1 + 1;
        p->ruri_e = sp2;
    }
    p->cid_s = vs[0];
    p->cid_e = ce;
    p->cseq = num;
    p->cm_s = me > ms ? ms : -1;
    p->cm_e = me;
    p->ftag_s = p->ttag_s = -1;
    if (vs[2] >= 0) tag_span(d, vs[2], ve[2], &p->ftag_s, &p->ftag_e);
    if (vs[3] >= 0) tag_span(d, vs[3], ve[3], &p->ttag_s, &p->ttag_e);
    {   /* the top Via's branch (up to the first comma) */
        Py_ssize_t stop = ve[4];
        const char *c = memchr(d + vs[4], ',', (size_t)(ve[4] - vs[4]));
        if (c != NULL) stop = c - d;
        if (!param_core(d, "branch", 6, vs[4], stop, 0, &p->br_s, &p->br_e)) p->br_s = -1;
        p->via2 = -1;
        if (c == NULL) {  /* the second Via entry, when plain */
            if (v2s < 0) p->via2 = 0;
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
                    p->via2 = 1;
                    p->via2_s = a;
                    p->via2_e = b;
                }
            }
        }
    }
    p->clen = clen;
    p->body = body;
    p->hdr_start = nl + 1;
    p->hdr_end = end;
    return 1;
}

/* s[:n] decoded as UTF-8 ("replace"). The usual field is ASCII: a compact ASCII str copied
 * directly (PyUnicode_DecodeUTF8's checks and its error handling cost ~250 instructions a
 * field, ~6 fields a message); anything else, and 0 or 1 bytes (its shared singletons), goes
 * through PyUnicode_DecodeUTF8, whose str for ASCII bytes is equal to this one. */
static PyObject *text(const char *s, Py_ssize_t n) {
    Py_ssize_t i;
    unsigned char any = 0;
    if (n < 2) return PyUnicode_DecodeUTF8(s, n, "replace");
    for (i = 0; i < n; i++) any |= (unsigned char)s[i];  /* (no early exit: vectorised) */
    if (any & 0x80) return PyUnicode_DecodeUTF8(s, n, "replace");
    PyObject *u = PyUnicode_New(n, 127);
    if (u != NULL) memcpy(PyUnicode_1BYTE_DATA(u), s, (size_t)n);
    return u;
}

/* d[s:e] as text, or dflt (a new reference) when s < 0 (the field is absent) */
static PyObject *span_or(const char *d, Py_ssize_t s, Py_ssize_t e, PyObject *dflt) {
    return s < 0 ? Py_NewRef(dflt) : text(d + s, e - s);
}

/* The usual methods and reasons as one shared str each (made at import): no allocation, and
 * the tracker's and engine's dict lookups of them find their hash cached and compare by identity. */
static const char *const common_texts[] = {
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO", "NOTIFY", "SUBSCRIBE",
    "MESSAGE", "REFER", "PUBLISH", "OK", "Trying", "Ringing", "Session Progress", "Busy Here", "Not Found",
    "Request Terminated", "Proxy Authentication Required", "Unauthorized", "Temporarily Unavailable",
    "Request Timeout", "Service Unavailable", "Decline", "Forbidden",
};
#define NCOMMON (sizeof common_texts / sizeof common_texts[0])
static PyObject *common_objs[NCOMMON];
static Py_ssize_t common_lens[NCOMMON];

/* s[:n] as text, the shared str when it is one of common_texts */
static PyObject *common_text(const char *s, Py_ssize_t n) {
    size_t k;
    for (k = 0; k < NCOMMON; k++) {
        if (common_lens[k] == n && memcmp(common_texts[k], s, (size_t)n) == 0) return Py_NewRef(common_objs[k]);
    }
    return text(s, n);
}

static PyObject *common_or(const char *d, Py_ssize_t s, Py_ssize_t e, PyObject *dflt) {
    return s < 0 ? Py_NewRef(dflt) : common_text(d + s, e - s);
}

#define NFIELDS 16

/* The parsed fields in FIELDS order (sip.Fields), absent ones as SipMessage's defaults. */
static PyObject *values(const char *d, const Parsed *p) {
    PyObject *empty = PyUnicode_New(0, 0);  /* the "" singleton */
    if (empty == NULL) return NULL;
    PyObject *v[NFIELDS] = {
        Py_NewRef(p->is_request ? Py_True : Py_False),
        p->is_request ? common_text(d, p->method_e) : Py_NewRef(empty),
        span_or(d, p->ruri_s, p->ruri_e, empty),
        PyLong_FromLong(p->code),
        common_or(d, p->reason_s, p->reason_e, empty),
        text(d + p->cid_s, p->cid_e - p->cid_s),
        PyLong_FromLong(p->cseq),
        common_or(d, p->cm_s, p->cm_e, empty),
        span_or(d, p->ftag_s, p->ftag_e, Py_None),
        span_or(d, p->ttag_s, p->ttag_e, Py_None),
        span_or(d, p->br_s, p->br_e, Py_None),
        p->via2 < 0 ? Py_NewRef(Py_False) : p->via2 == 0 ? Py_NewRef(Py_None) : text(d + p->via2_s, p->via2_e - p->via2_s),
        p->clen < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(p->clen),
        PyLong_FromSsize_t(p->body),
        PyLong_FromSsize_t(p->hdr_start),
        PyLong_FromSsize_t(p->hdr_end),
    };
    Py_DECREF(empty);
    PyObject *t = PyTuple_New(NFIELDS);
    int i, bad = t == NULL;
    for (i = 0; i < NFIELDS; i++) {
        if (v[i] == NULL) bad = 1;
        else if (t != NULL) PyTuple_SET_ITEM(t, i, v[i]);  /* stolen */
        else Py_DECREF(v[i]);
    }
    if (bad) { Py_XDECREF(t); return NULL; }
    return t;
}

/*
 * fields(data) -> tuple or None: the eager parse of a plain, well-formed message as the tuple
 * sip.parse() unpacks into a fresh SipMessage (sip.Fields: is_request, method, ruri, code,
 * reason, call_id, cseq_num, cseq_method, from_tag, to_tag, branch, _via2, content_length,
 * body_start, _hdr_start, _hdr_end; absent ones as the class defaults); None: the Python path.
 * A compiled SipMessage has no instance dict: fill()'s 16 PyObject_SetAttr went through the
 * type's descriptors (~0.5 us a message), the compiled unpack stores the fields directly.
 */
static PyObject *fields(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    Parsed p;
    (void)self;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *out = parse_core((const char *)buf.buf, buf.len, &p) ? values((const char *)buf.buf, &p)
                                                                   : Py_NewRef(Py_None);
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *field_names[NFIELDS];

/* fill(msg, data) -> bool: fields(data) set on msg by name (what the property tests hold to the
 * Python parse; sip.parse itself unpacks fields()). */
static PyObject *fill(PyObject *self, PyObject *args) {
    PyObject *msg, *data;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &msg, &data)) return NULL;
    PyObject *t = fields(NULL, data);
    if (t == NULL) return NULL;
    if (t == Py_None) { Py_DECREF(t); Py_RETURN_FALSE; }
    int i;
    for (i = 0; i < NFIELDS; i++) {
        if (PyObject_SetAttr(msg, field_names[i], PyTuple_GET_ITEM(t, i)) < 0) { Py_DECREF(t); return NULL; }
    }
    Py_DECREF(t);
    Py_RETURN_TRUE;
}

/*
 * jsonl(ts, no, src, sport, dst, dport, transport, encap, payload) -> bytes or None: the line
 * messagelog.jsonl writes for the parsed payload (orjson's bytes after json_safe), without a
 * SipMessage, a dict or the ~15 text objects: parse and format in one call. None, and the
 * Python path formats, for anything outside the plain case whose bytes are sure to be the same:
 * a message fill() declines, a text that is not printable ASCII (escapes other than \" and \\,
 * UTF-8, replacement characters, json_safe's escapes all stay in Python), a ts not a float in
 * [1e-4, 1e16) (where orjson's shortest form and repr agree), a number not a 64-bit int.
 * A property test holds it to the Python line on random messages and arguments.
 */
typedef struct { char *p; } Out;

static int plain(const char *s, Py_ssize_t n) {
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e) return 0;
    }
    return 1;
}

/* the bytes of a str argument, or NULL if it is not an exact, printable-ASCII str */
static const char *ascii_arg(PyObject *o, Py_ssize_t *n) {
    if (!PyUnicode_CheckExact(o) || !PyUnicode_IS_ASCII(o)) return NULL;
    const char *s = (const char *)PyUnicode_DATA(o);
    *n = PyUnicode_GET_LENGTH(o);
    return plain(s, *n) ? s : NULL;
}

static void raw(Out *o, const char *s, Py_ssize_t n) { memcpy(o->p, s, (size_t)n); o->p += n; }

#define LIT(o, s) raw((o), (s), (Py_ssize_t)(sizeof(s) - 1))

/* a JSON string of printable ASCII: only " and \ are escaped (as orjson does) */
static void jstr(Out *o, const char *s, Py_ssize_t n) {
    Py_ssize_t i;
    *o->p++ = '"';
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == '"' || c == '\\') *o->p++ = '\\';
        *o->p++ = c;
    }
    *o->p++ = '"';
}

static void span_or_null(Out *o, const char *d, Py_ssize_t s, Py_ssize_t e) {
    if (s < 0) LIT(o, "null");
    else jstr(o, d + s, e - s);
}

/* a decimal integer (sprintf's %lld cost ~0.1 us for the five of a line) */
static void num(Out *o, long long v) {
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    if (v < 0) *o->p++ = '-';
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
    while (n) *o->p++ = tmp[--n];
}

/* repr(ts) for 1e-4 <= ts < 2**32 when a decimal of at most 6 places is ts (a pcap's microsecond
 * time): 1; 0 when not (then PyOS_double_to_string, whose general dtoa cost ~0.3 us a line).
 * Below 2**32 a double's spacing is under 1e-6, so no two such decimals give the same double: the
 * one that does is the shortest string that reads back as ts, which is what repr writes. It reads
 * back exactly when micro / 1e6 == ts: both are exact doubles (micro < 2**53) and IEEE division
 * rounds correctly. ts * 1e6 may round to a neighbour of micro, so those are tried too. */
static int micro_repr(Out *o, double ts) {
    if (!(ts >= 1e-4 && ts < 4294967296.0)) return 0;
    double m0 = nearbyint(ts * 1e6), m;
    int k;
    for (k = 0; k < 3; k++) {
        m = m0 + (k == 0 ? 0 : k == 1 ? -1 : 1);
        if (m >= 0 && m / 1e6 == ts) break;
    }
    if (k == 3) return 0;
    long long micro = (long long)m, frac = micro % 1000000;
    num(o, micro / 1000000);
    *o->p++ = '.';
    int places = 6;
    while (places > 1 && frac % 10 == 0) { frac /= 10; places--; }
    for (k = places - 1; k >= 0; k--) { o->p[k] = (char)('0' + frac % 10); frac /= 10; }
    o->p += places;
    return 1;
}

/* a 64-bit int argument into *v: 1, or 0 (not an exact int, or too big; no error left set) */
static int int_arg(PyObject *o, long long *v) {
    int overflow;
    if (!PyLong_CheckExact(o)) return 0;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    return !overflow;
}

static PyObject *jsonl(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Parsed p;
    long long no, sport, dport;
    Py_ssize_t nsrc, ndst, ntr, nenc;
    const char *src, *dst, *tr, *enc;
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "jsonl() takes 9 arguments");
        return NULL;
    }
    PyObject *payload = args[8];
    if (!PyFloat_CheckExact(args[0]) || !PyBytes_CheckExact(payload)) Py_RETURN_NONE;
    double ts = PyFloat_AS_DOUBLE(args[0]);
    if (!(ts >= 1e-4 && ts < 1e16)) Py_RETURN_NONE;
    if (!int_arg(args[1], &no) || !int_arg(args[3], &sport) || !int_arg(args[5], &dport)) Py_RETURN_NONE;
    if ((src = ascii_arg(args[2], &nsrc)) == NULL || (dst = ascii_arg(args[4], &ndst)) == NULL
        || (tr = ascii_arg(args[6], &ntr)) == NULL || (enc = ascii_arg(args[7], &nenc)) == NULL)
        Py_RETURN_NONE;
    const char *d = PyBytes_AS_STRING(payload);
    Py_ssize_t len = PyBytes_GET_SIZE(payload);
    if (!parse_core(d, len, &p)) Py_RETURN_NONE;
    if (!plain(d, p.method_e) || (p.reason_s >= 0 && !plain(d + p.reason_s, p.reason_e - p.reason_s))
        || !plain(d + p.cid_s, p.cid_e - p.cid_s) || (p.cm_s >= 0 && !plain(d + p.cm_s, p.cm_e - p.cm_s))
        || (p.ftag_s >= 0 && !plain(d + p.ftag_s, p.ftag_e - p.ftag_s))
        || (p.ttag_s >= 0 && !plain(d + p.ttag_s, p.ttag_e - p.ttag_s))
        || (p.br_s >= 0 && !plain(d + p.br_s, p.br_e - p.br_s)))
        Py_RETURN_NONE;
    /* the most it can take: the fixed text (~310 bytes with five 20-digit numbers), every text byte escaped */
    Py_ssize_t texts = nsrc + ndst + ntr + nenc + p.method_e + (p.cid_e - p.cid_s);
    if (p.reason_s >= 0) texts += p.reason_e - p.reason_s;
    if (p.cm_s >= 0) texts += p.cm_e - p.cm_s;
    if (p.ftag_s >= 0) texts += p.ftag_e - p.ftag_s;
    if (p.ttag_s >= 0) texts += p.ttag_e - p.ttag_s;
    if (p.br_s >= 0) texts += p.br_e - p.br_s;
    Py_ssize_t cap = 512 + 2 * texts;  /* ts: at most 17 digits, a dot, an exponent */
    PyObject *line = PyBytes_FromStringAndSize(NULL, cap);
    if (line == NULL) return NULL;
    Out o = {PyBytes_AS_STRING(line)};
    LIT(&o, "{\"ts\":");
    if (!micro_repr(&o, ts)) {
        char *tstext = PyOS_double_to_string(ts, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (tstext == NULL) { Py_DECREF(line); return NULL; }
        raw(&o, tstext, (Py_ssize_t)strlen(tstext));
        PyMem_Free(tstext);
    }
    LIT(&o, ",\"frame\":"); num(&o, no);
    LIT(&o, ",\"src\":"); jstr(&o, src, nsrc);
    LIT(&o, ",\"sport\":"); num(&o, sport);
    LIT(&o, ",\"dst\":"); jstr(&o, dst, ndst);
    LIT(&o, ",\"dport\":"); num(&o, dport);
    LIT(&o, ",\"transport\":"); jstr(&o, tr, ntr);
    if (p.is_request) {
        LIT(&o, ",\"method\":"); jstr(&o, d, p.method_e);
        LIT(&o, ",\"status\":null,\"reason\":null");
    } else {
        LIT(&o, ",\"method\":null,\"status\":"); num(&o, p.code);
        LIT(&o, ",\"reason\":");
        if (p.reason_s < 0) LIT(&o, "\"\"");
        else jstr(&o, d + p.reason_s, p.reason_e - p.reason_s);
    }
    LIT(&o, ",\"call_id\":"); jstr(&o, d + p.cid_s, p.cid_e - p.cid_s);
    LIT(&o, ",\"cseq\":"); num(&o, p.cseq);
    LIT(&o, ",\"cseq_method\":");
    if (p.cm_s < 0) LIT(&o, "\"\"");
    else jstr(&o, d + p.cm_s, p.cm_e - p.cm_s);
    LIT(&o, ",\"from_tag\":"); span_or_null(&o, d, p.ftag_s, p.ftag_e);
    LIT(&o, ",\"to_tag\":"); span_or_null(&o, d, p.ttag_s, p.ttag_e);
    LIT(&o, ",\"branch\":"); span_or_null(&o, d, p.br_s, p.br_e);
    LIT(&o, ",\"encap\":"); jstr(&o, enc, nenc);
    LIT(&o, "}\n");
    if (_PyBytes_Resize(&line, o.p - PyBytes_AS_STRING(line)) < 0) return NULL;
    return line;
}
#undef LIT

/* spaces after the field begun at start, up to width (Python's f"{x:<width}") */
static void pad(Out *o, const char *start, Py_ssize_t width) {
    while (o->p - start < width) *o->p++ = ' ';
}

/* a field cut to at most width, then padded to it (f"{x[:width]:<width}") */
static void fit(Out *o, const char *start, Py_ssize_t width) {
    if (o->p - start > width) o->p = (char *)start + width;
    pad(o, start, width);
}

/* "addr:port", "[addr]:port" for an IPv6 text */
static void endpoint(Out *o, const char *a, Py_ssize_t n, long long port) {
    int v6 = memchr(a, ':', (size_t)n) != NULL;
    char *start = o->p;
    if (v6) *o->p++ = '[';
    raw(o, a, n);
    if (v6) *o->p++ = ']';
    *o->p++ = ':';
    num(o, port);
    pad(o, start, 21);
}

static void span_or_dash(Out *o, const char *d, Py_ssize_t s, Py_ssize_t e) {
    if (s < 0) *o->p++ = '-';
    else raw(o, d + s, e - s);
}

/*
 * table(ts, no, src, sport, dst, dport, transport, encap, payload) -> bytes or None: the line
 * messagelog.table writes for the parsed payload (no and encap are not shown), or None as jsonl()
 * declines: a message fill() declines, a text not printable ASCII (escape() would act on it), ts
 * outside [1e-4, 1e16), a port not a 64-bit int. The time is Python's own "%.6f"
 * (PyOS_double_to_string). A property test holds it to the Python line.
 */
static PyObject *table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Parsed p;
    long long sport, dport;
    Py_ssize_t nsrc, ndst, ntr;
    const char *src, *dst, *tr;
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "table() takes 9 arguments");
        return NULL;
    }
    PyObject *payload = args[8];
    if (!PyFloat_CheckExact(args[0]) || !PyBytes_CheckExact(payload)) Py_RETURN_NONE;
    double ts = PyFloat_AS_DOUBLE(args[0]);
    if (!(ts >= 1e-4 && ts < 1e16)) Py_RETURN_NONE;
    if (!int_arg(args[3], &sport) || !int_arg(args[5], &dport)) Py_RETURN_NONE;
    if ((src = ascii_arg(args[2], &nsrc)) == NULL || (dst = ascii_arg(args[4], &ndst)) == NULL
        || (tr = ascii_arg(args[6], &ntr)) == NULL)
        Py_RETURN_NONE;
    const char *d = PyBytes_AS_STRING(payload);
    Py_ssize_t len = PyBytes_GET_SIZE(payload);
    if (!parse_core(d, len, &p)) Py_RETURN_NONE;
    Py_ssize_t texts = nsrc + ndst + ntr + p.method_e + (p.cid_e - p.cid_s);
    if (!plain(d, p.method_e) || !plain(d + p.cid_s, p.cid_e - p.cid_s)) Py_RETURN_NONE;
#define SPAN_OK(s, e) ((s) < 0 || (texts += (e) - (s), plain(d + (s), (e) - (s))))
    if (!SPAN_OK(p.reason_s, p.reason_e) || !SPAN_OK(p.cm_s, p.cm_e) || !SPAN_OK(p.ftag_s, p.ftag_e)
        || !SPAN_OK(p.ttag_s, p.ttag_e) || !SPAN_OK(p.br_s, p.br_e))
        Py_RETURN_NONE;
#undef SPAN_OK
    char *tstext = PyOS_double_to_string(ts, 'f', 6, 0, NULL);
    if (tstext == NULL) return NULL;
    Py_ssize_t ntext = (Py_ssize_t)strlen(tstext);
    /* the fixed part: widths 17+21+21+5+24+16+36+12+12, separators, three 20-digit numbers */
    PyObject *line = PyBytes_FromStringAndSize(NULL, 512 + ntext + texts);
    if (line == NULL) { PyMem_Free(tstext); return NULL; }
    Out o = {PyBytes_AS_STRING(line)};
    char *start = o.p;
    raw(&o, tstext, ntext);
    PyMem_Free(tstext);
    pad(&o, start, 17);
    *o.p++ = ' ';
    endpoint(&o, src, nsrc, sport);
    *o.p++ = ' ';
    endpoint(&o, dst, ndst, dport);
    *o.p++ = ' ';
    start = o.p;
    raw(&o, tr, ntr);
    pad(&o, start, 5);
    *o.p++ = ' ';
    start = o.p;
    if (p.is_request) raw(&o, d, p.method_e);
    else {
        num(&o, p.code);
        *o.p++ = ' ';
        if (p.reason_s >= 0) raw(&o, d + p.reason_s, p.reason_e - p.reason_s);
    }
    fit(&o, start, 24);
    *o.p++ = ' ';
    start = o.p;
    num(&o, p.cseq);
    *o.p++ = ' ';
    if (p.cm_s >= 0) raw(&o, d + p.cm_s, p.cm_e - p.cm_s);
    fit(&o, start, 16);
    *o.p++ = ' ';
    start = o.p;
    raw(&o, d + p.cid_s, p.cid_e - p.cid_s);
    pad(&o, start, 36);
    *o.p++ = ' ';
    start = o.p;
    span_or_dash(&o, d, p.ftag_s, p.ftag_e);
    pad(&o, start, 12);
    *o.p++ = ' ';
    start = o.p;
    span_or_dash(&o, d, p.ttag_s, p.ttag_e);
    pad(&o, start, 12);
    *o.p++ = ' ';
    span_or_dash(&o, d, p.br_s, p.br_e);
    *o.p++ = '\n';
    if (_PyBytes_Resize(&line, o.p - PyBytes_AS_STRING(line)) < 0) return NULL;
    return line;
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

/*
 * clean_ascii(text) -> bool: text is ASCII without a control character (C0, DEL), so that
 * sysloglines.escape() has nothing to escape in it. False says nothing (the caller looks with
 * str.isprintable() and its regex). str.isprintable() looks each character up in the Unicode
 * tables (~15 instructions a character: ~4.5k for an ACC line, 1 % of `process`).
 */
static PyObject *clean_ascii(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "clean_ascii() takes a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg)) Py_RETURN_FALSE;
    const unsigned char *s = PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t i, n = PyUnicode_GET_LENGTH(arg);
    for (i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] == 0x7f) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* \s of a str regex, in ASCII */
static int re_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f); }

/*
 * magic_branch(via) -> str or None: the branch of a Via entry text (tracker._via_id) in the
 * usual case only: ASCII, with ";branch=z9hG4bK" after a ';' no other spelling of "branch"
 * follows. Then the regex
 *     ;\s*branch\s*=\s*([^;,\s]+)    (str, IGNORECASE)
 * cannot match at an earlier ';' (none is followed by blanks and "branch") and matches there:
 * the value runs to a ';', ',' or a character of \s (in ASCII: 0x09-0x0d, 0x1c-0x20).
 * None: the caller runs the regex. A property test holds it to the regex.
 */
static PyObject *magic_branch(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "magic_branch() takes a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg)) Py_RETURN_NONE;
    const char *d = (const char *)PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    const char *p = d, *end = d + n;
    while ((p = memchr(p, ';', (size_t)(end - p))) != NULL) {
        if (end - p >= 15 && memcmp(p, ";branch=z9hG4bK", 15) == 0) break;
        const char *q = p + 1;
        while (q < end && re_space((unsigned char)*q)) q++;
        if (end - q >= 6 && same(q, 6, "branch")) Py_RETURN_NONE;  /* another spelling: the regex decides */
        p++;
    }
    if (p == NULL) Py_RETURN_NONE;
    Py_ssize_t s = (p - d) + 8, e = s + 7;
    while (e < n) {
        unsigned char c = (unsigned char)d[e];
        if (c == ';' || c == ',' || re_space(c)) break;
        e++;
    }
    return PyUnicode_Substring(arg, s, e);
}

static PyMethodDef methods[] = {
    {"magic_branch", magic_branch, METH_O, "The RFC 3261 branch of a plain Via entry text; None: use the regex."},
    {"clean_ascii", clean_ascii, METH_O, "True if the str is ASCII without control characters (nothing to escape)."},
    {"scan", scan, METH_VARARGS, "Find the eager SIP header values in data[start:end]; None if folded."},
    {"param", param, METH_VARARGS, "The first ;name=value parameter in data[start:stop], or None."},
    {"call_id", call_id, METH_O, "The value of the first Call-ID line in data (any case, compact too), or None."},
    {"fill", fill, METH_VARARGS, "Parse a well-formed SIP message's eager fields into msg; False: use the Python path."},
    {"fields", fields, METH_O, "A well-formed SIP message's eager fields as a tuple (sip.Fields); None: the Python path."},
    {"jsonl", (PyCFunction)(void (*)(void))jsonl, METH_FASTCALL,
     "The JSON line of `messages` for a plain, well-formed SIP payload; None: use the Python path."},
    {"table", (PyCFunction)(void (*)(void))table, METH_FASTCALL,
     "The table line of `messages` for a plain, well-formed SIP payload; None: use the Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    static const char *names[NFIELDS] = {  /* sip.Fields' order */
        "is_request", "method", "ruri", "code", "reason", "call_id", "cseq_num", "cseq_method", "from_tag",
        "to_tag", "branch", "_via2", "content_length", "body_start", "_hdr_start", "_hdr_end",
    };
    int i;
    for (i = 0; i < NFIELDS; i++) {
        field_names[i] = PyUnicode_InternFromString(names[i]);
        if (field_names[i] == NULL) return NULL;
    }
    for (i = 0; i < (int)NCOMMON; i++) {
        common_objs[i] = PyUnicode_InternFromString(common_texts[i]);
        if (common_objs[i] == NULL) return NULL;
        common_lens[i] = (Py_ssize_t)strlen(common_texts[i]);
    }
    return PyModule_Create(&module);
}
