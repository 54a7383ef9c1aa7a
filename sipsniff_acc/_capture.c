/*
 * The capture front's common case in C (optional: every function here has its Python twin,
 * which stays the reference and the path for everything this file declines).
 *
 * setup(Frame, Datagram, udp, tcp, sctp) -> None
 *   Remembers the two slot classes of events.py and Transport.UDP, .TCP and .SCTP. Objects of
 *   these classes are then built here by writing their slots directly (their generated
 *   __init__ is a Python call: ~0.27 us per object, a third of what reading a record costs),
 *   and left untracked by the cyclic GC (they hold no container that could close a cycle).
 *
 * pcap_frames(buf, pos, big_endian, unit, linktype, no, source) -> (frames, pos, no)
 *   The classic-pcap record walk of sources/pcapfile.py (CaptureReader._pcap): every whole
 *   record from buf[pos:] becomes Frame(sec + frac * unit, linktype, data, no, source).
 *   Stops at the first record that is not whole in buf, or whose captured length is above
 *   MAX_RECORD: the Python loop takes over from the returned pos and raises its error.
 *
 * pcapng_frames(buf, pos, big_endian, ifaces, no, last_ts, source) -> (frames, pos, no, last_ts)
 *   The same for a run of Enhanced Packet Blocks in pcapng (CaptureReader._pcapng_blocks):
 *   ifaces is its list of (linktype, tick, offset). Stops at any other block, and at one that
 *   is not whole, sane and of a known interface: the Python loop reads it (or names the damage).
 *
 * udp(frame) -> Datagram | None
 *   decode.decode() for the bulk of a capture: Ethernet (+ 802.1Q/802.1ad/QinQ tags), Linux
 *   SLL/SLL2 or raw IP; IPv4 (options allowed) not fragmented, or IPv6 without extension
 *   headers; UDP not to a tunnel port, or TCP or SCTP (the whole segment, as decode_py hands
 *   it to reassembly). The same Datagram decode_py() returns for such a frame; None for
 *   anything else (fragments, tunnels, ICMP, odd or truncated lengths, bad headers), and
 *   decode_py() then decodes it and names its anomalies. (The name is the common case's.)
 *
 * sip_udp(frame) -> Datagram | 1 | 2 | None
 *   udp() for CaptureStage, with the content check of a UDP payload folded in: a UDP Datagram
 *   only when it looks like SIP (TCP and SCTP ones always); 1 for a keep-alive
 *   (sip.is_keepalive), 2 for anything else (RTP...): no Datagram, nor the copies of its
 *   addresses and payload, is made for noise (0.3 us an RTP frame against 0.85).
 *
 * looks_like_sip(payload) -> bool: sip.looks_like_sip (a status line, or a request line
 *   whose first token is upper case and which ends in SIP/2.0).
 *
 * shard(payload, shards) -> int: processrun.shard_of (the Call-ID shard of -j N) in one call.
 *
 * pcap_shard(...): pcap_frames for -j N's worker k, other shards' plain UDP SIP, keep-alives
 *   and RTP counted, not built (below, at its definition).
 *
 * Every offset is checked against the bytes that arrived before it is read. A property test
 * (tests/property/test_capture_speedups.py) compares each function with its Python twin on
 * generated, truncated and random frames.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define MAX_RECORD (1 << 20) /* pcapfile.MAX_RECORD */
#define MAX_TAGS 8           /* decode.MAX_TAGS */
#define MAX_START_LINE 8192  /* sip.MAX_START_LINE */
#define VXLAN_PORT 4789
#define TZSP_PORT 37008

enum { F_TS, F_LINKTYPE, F_DATA, F_NO, F_SOURCE, F_N };
static const char *frame_fields[F_N] = {"ts", "linktype", "data", "no", "source"};
enum { D_TS, D_NO, D_TRANSPORT, D_SRC, D_SPORT, D_DST, D_DPORT, D_PAYLOAD, D_ENCAP, D_SOURCE, D_IPID, D_N };
static const char *datagram_fields[D_N] = {"ts", "no", "transport", "src", "sport", "dst",
                                           "dport", "payload", "encap", "source", "ipid"};

static PyTypeObject *frame_type, *datagram_type;
static Py_ssize_t frame_off[F_N], datagram_off[D_N];
static PyObject *udp_transport, *tcp_transport, *sctp_transport;
/* encap tuples without VLAN tags: [link][ip], link 0 none, 1 eth, 2 sll, 3 sll2; ip 0 ip4, 1 ip6 */
static PyObject *encaps[4][2];
static PyObject *s_eth, *s_sll, *s_sll2, *s_ip4, *s_ip6;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t rd32(const unsigned char *p, int big) {
    return big ? ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]
               : ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0];
}

/* The byte offsets of a slot class's fields: each must be a writable object slot. */
static int slot_offsets(PyTypeObject *type, const char **names, Py_ssize_t *offs, int n) {
    for (int i = 0; i < n; i++) {
        PyObject *d = PyDict_GetItemString(type->tp_dict, names[i]);
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, names[i]);
            return -1;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", type->tp_name, names[i]);
            return -1;
        }
        offs[i] = m->offset;
    }
    return 0;
}

static PyObject *setup(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ft, *dt, *udp, *tcp, *sctp;
    if (!PyArg_ParseTuple(args, "O!O!OOO", &PyType_Type, &ft, &PyType_Type, &dt, &udp, &tcp, &sctp)) return NULL;
    if (slot_offsets((PyTypeObject *)ft, frame_fields, frame_off, F_N) < 0) return NULL;
    if (slot_offsets((PyTypeObject *)dt, datagram_fields, datagram_off, D_N) < 0) return NULL;
    Py_INCREF(ft);
    Py_INCREF(dt);
    Py_XSETREF(frame_type, (PyTypeObject *)ft);
    Py_XSETREF(datagram_type, (PyTypeObject *)dt);
    Py_XSETREF(udp_transport, Py_NewRef(udp));
    Py_XSETREF(tcp_transport, Py_NewRef(tcp));
    Py_XSETREF(sctp_transport, Py_NewRef(sctp));
    Py_RETURN_NONE;
}

/* A new instance of a slot class with every field set (references stolen; NULL: all freed). */
static PyObject *build(PyTypeObject *type, const Py_ssize_t *offs, PyObject **values, int n) {
    PyObject *obj = NULL;
    for (int i = 0; i < n; i++) {
        if (values[i] == NULL) goto fail;
    }
    obj = type->tp_alloc(type, 0);
    if (obj == NULL) goto fail;
    for (int i = 0; i < n; i++) SLOT(obj, offs[i]) = values[i];
    /* Numbers, bytes, strings, a tuple of strings and an enum member cannot form a cycle: the
     * cyclic GC need not look at the object (as CPython untracks such tuples). Tracked, the
     * 8000 frames of a chunk cost 0.46 us a frame to walk, untracked 0.28 us. */
    if (PyObject_GC_IsTracked(obj)) PyObject_GC_UnTrack(obj);
    return obj;
fail:
    for (int i = 0; i < n; i++) Py_XDECREF(values[i]);
    return NULL;
}

/* A Frame(ts, linktype, data[0:caplen], no, source) appended to frames: 0, or -1 with an exception. */
static int append_frame(PyObject *frames, double ts, PyObject *linktype, const unsigned char *data,
                        uint32_t caplen, long long no, PyObject *source) {
    PyObject *v[F_N];
    v[F_TS] = PyFloat_FromDouble(ts);
    v[F_LINKTYPE] = Py_NewRef(linktype);
    v[F_DATA] = PyBytes_FromStringAndSize((const char *)data, caplen);
    v[F_NO] = PyLong_FromLongLong(no);
    v[F_SOURCE] = Py_NewRef(source);
    PyObject *frame = build(frame_type, frame_off, v, F_N);
    if (frame == NULL || PyList_Append(frames, frame) < 0) {
        Py_XDECREF(frame);
        return -1;
    }
    Py_DECREF(frame);
    return 0;
}

/* A walk's common checks: its argument count, and setup() done (the slot classes known). */
static int walk_ready(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, want);
        return 0;
    }
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return 0;
    }
    return 1;
}

/* The classic pcap record at pos, if it is whole in buf[:end] and not corrupt: its time
 * (sec + frac * unit, in Python's order of operations: a double product, then the sum) and
 * captured length. 0 where the walk stops (the caller reads the rest, or reports the damage). */
static inline int pcap_record(const unsigned char *buf, Py_ssize_t end, Py_ssize_t pos, int big, double unit,
                              double *ts, uint32_t *caplen) {
    if (pos > end - 16) return 0;
    const unsigned char *h = buf + pos;
    uint32_t sec = rd32(h, big), frac = rd32(h + 4, big), len = rd32(h + 8, big);
    if (len > MAX_RECORD || (Py_ssize_t)len > end - pos - 16) return 0;
    double part = (double)frac * unit;
    *ts = (double)sec + part;
    *caplen = len;
    return 1;
}

/* The arguments pcap_frames and pcap_shard share: (buf, pos, big_endian, unit, linktype, no, source).
 * On success the buffer is held (the caller releases it); on failure nothing is, and an error is set. */
typedef struct {
    Py_buffer view;
    Py_ssize_t pos;
    int big;
    double unit;
    PyObject *linktype, *source;
    long long no;
} pcap_args_t;

static int pcap_args(PyObject *const *args, pcap_args_t *a) {
    if (PyObject_GetBuffer(args[0], &a->view, PyBUF_SIMPLE) < 0) return 0;
    a->pos = PyLong_AsSsize_t(args[1]);
    a->big = PyObject_IsTrue(args[2]);
    a->unit = PyFloat_AsDouble(args[3]);
    a->linktype = args[4];
    a->no = PyLong_AsLongLong(args[5]);
    a->source = args[6];
    if (PyErr_Occurred() || a->big < 0 || a->pos < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad position");
        PyBuffer_Release(&a->view);
        return 0;
    }
    return 1;
}

static PyObject *pcap_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    pcap_args_t a;
    if (!walk_ready(nargs, 7, "pcap_frames") || !pcap_args(args, &a)) return NULL;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) goto done;
    const unsigned char *buf = a.view.buf;
    Py_ssize_t end = a.view.len;
    double ts;
    uint32_t caplen;
    while (pcap_record(buf, end, a.pos, a.big, a.unit, &ts, &caplen)) {
        a.no += 1;
        if (append_frame(frames, ts, a.linktype, buf + a.pos + 16, caplen, a.no, a.source) < 0) {
            Py_CLEAR(frames);
            goto done;
        }
        a.pos += 16 + (Py_ssize_t)caplen;
    }
done:
    PyBuffer_Release(&a.view);
    if (frames == NULL) return NULL;
    return Py_BuildValue("(NnL)", frames, a.pos, a.no);
}

static PyObject *pcapng_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!walk_ready(nargs, 7, "pcapng_frames")) return NULL;
    PyObject *ifaces = args[3], *source = args[6];
    if (!PyList_CheckExact(ifaces)) {
        PyErr_SetString(PyExc_TypeError, "ifaces must be a list");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    int big = PyObject_IsTrue(args[2]);
    long long no = PyLong_AsLongLong(args[4]);
    double last_ts = PyFloat_AsDouble(args[5]);
    PyObject *frames = NULL;
    if (PyErr_Occurred() || big < 0 || pos < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad position");
        goto done;
    }
    frames = PyList_New(0);
    if (frames == NULL) goto done;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len;
    while (pos <= end - 12) {
        const unsigned char *b = buf + pos;
        uint32_t btype = rd32(b, big), blen = rd32(b + 4, big);
        /* an Enhanced Packet Block, whole, sane and in buf; anything else is the Python loop's */
        if (btype != 6 || blen < 32 || blen % 4 || blen > MAX_RECORD || (Py_ssize_t)blen > end - pos) break;
        uint32_t iface = rd32(b + 8, big), hi = rd32(b + 12, big), lo = rd32(b + 16, big), caplen = rd32(b + 20, big);
        if (iface >= (uint64_t)PyList_GET_SIZE(ifaces) || caplen > blen - 32) break;
        PyObject *desc = PyList_GET_ITEM(ifaces, iface); /* (linktype, tick, offset) */
        if (!PyTuple_CheckExact(desc) || PyTuple_GET_SIZE(desc) != 3 || !PyFloat_CheckExact(PyTuple_GET_ITEM(desc, 1))
            || !PyFloat_CheckExact(PyTuple_GET_ITEM(desc, 2)))
            break;
        /* ((hi << 32) | lo) * tick + offset, in Python's order: the integer rounded to a double once */
        double ticks = (double)(((uint64_t)hi << 32) | lo);
        double part = ticks * PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(desc, 1));
        last_ts = part + PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(desc, 2));
        no += 1;
        if (append_frame(frames, last_ts, PyTuple_GET_ITEM(desc, 0), b + 28, caplen, no, source) < 0) {
            Py_CLEAR(frames);
            goto done;
        }
        pos += blen;
    }
done:
    PyBuffer_Release(&view);
    if (frames == NULL) return NULL;
    return Py_BuildValue("(NnLd)", frames, pos, no, last_ts);
}

/* sip.looks_like_sip_py on p[0:n] */
static int sip_like(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t sp = -1, nl = -1, i;
    if (n >= 8 && memcmp(p, "SIP/2.0 ", 8) == 0) return 1;
    for (i = 0; i < n && i < 32; i++) {
        if (p[i] == ' ') {
            sp = i;
            break;
        }
    }
    if (sp < 3) return 0;
    int upper = 0; /* bytes.isupper(): an upper-case letter and no lower-case one */
    for (i = 0; i < sp; i++) {
        if (p[i] >= 'a' && p[i] <= 'z') return 0;
        if (p[i] >= 'A' && p[i] <= 'Z') upper = 1;
    }
    if (!upper) return 0;
    for (i = sp; i < n && i < MAX_START_LINE; i++) {
        if (p[i] == '\n') {
            nl = i;
            break;
        }
    }
    if (nl < 0) return 0;
    /* payload[nl - 9 : nl] with Python's slice rules (a negative start counts from the end) */
    Py_ssize_t start = nl - 9, stop = nl;
    if (start < 0) start += n;
    if (start < 0) start = 0;
    if (start > stop) start = stop;
    while (stop > start && p[stop - 1] == '\r') stop--; /* .rstrip(b"\r") */
    return stop - start >= 8 && memcmp(p + stop - 8, " SIP/2.0", 8) == 0;
}

/* sip.is_keepalive on p[0:n]: nothing but CR, LF, NUL and spaces */
static int keepalive(const unsigned char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] != '\r' && p[i] != '\n' && p[i] != 0 && p[i] != ' ') return 0;
    }
    return 1;
}

/* What plain() found in a frame: where its addresses, ports and payload are. */
enum { K_DECLINE, K_UDP, K_KEEPALIVE, K_NOT_SIP, K_TCP, K_SCTP };
typedef struct {
    int link, v6, tags, vlans[MAX_TAGS];
    const unsigned char *ip;
    Py_ssize_t alen, pay, end;
    long sport, dport, ipid;
} plain_t;

/* The common-case decode of frame bytes d[0:len] of linktype lt: K_DECLINE (decode_py decides),
 * K_UDP (with classify: a UDP payload that looks like SIP), K_KEEPALIVE / K_NOT_SIP (classify
 * only), K_TCP or K_SCTP; o says where the parts are. */
static int plain(const unsigned char *d, Py_ssize_t len, long lt, int classify, plain_t *o) {
    Py_ssize_t off;
    int link, et = -1;
    switch (lt) {
    case 1: /* Ethernet */
        if (len < 14) return K_DECLINE;
        et = be16(d + 12), off = 14, link = 1;
        break;
    case 113: /* Linux SLL */
        if (len < 16) return K_DECLINE;
        et = be16(d + 14), off = 16, link = 2;
        break;
    case 276: /* Linux SLL2 */
        if (len < 20) return K_DECLINE;
        et = be16(d), off = 20, link = 3;
        break;
    case 101: case 12: case 228: case 229: /* raw IP */
        off = 0, link = 0;
        break;
    default:
        return K_DECLINE;
    }
    int tags = 0;
    if (link) { /* decode._ethertype: VLAN tags, then IP (the version nibble decides which) */
        while (et == 0x8100 || et == 0x88A8 || et == 0x9100 || et == 0x9200) {
            if (len < off + 4 || tags == MAX_TAGS) return K_DECLINE;
            o->vlans[tags++] = be16(d + off) & 0x0FFF;
            et = be16(d + off + 2);
            off += 4;
        }
        if (et != 0x0800 && et != 0x86DD) return K_DECLINE;
    }
    if (off >= len) return K_DECLINE;
    int v6, version = d[off] >> 4;
    Py_ssize_t end, at, alen;
    long ipid;
    int proto;
    const unsigned char *ip = d + off;
    if (version == 4) {
        if (len < off + 20) return K_DECLINE;
        Py_ssize_t hl = (ip[0] & 0x0F) * 4, total = be16(ip + 2);
        if (hl < 20 || total < hl || off + total > len) return K_DECLINE;
        if (be16(ip + 6) & 0x3FFF) return K_DECLINE; /* a fragment */
        proto = ip[9];
        v6 = 0, end = off + total, at = off + hl, alen = 4, ipid = be16(ip + 4);
    } else if (version == 6) {
        if (len < off + 40) return K_DECLINE;
        Py_ssize_t plen = be16(ip + 4);
        /* a jumbogram (0) or an extension header: decode_py */
        if (plen == 0 || off + 40 + plen > len) return K_DECLINE;
        proto = ip[6];
        v6 = 1, end = off + 40 + plen, at = off + 40, alen = 16, ipid = -1;
    } else {
        return K_DECLINE;
    }
    int kind;
    if (proto == 17) {
        if (end - at < 8) return K_DECLINE;
        o->sport = be16(d + at), o->dport = be16(d + at + 2);
        Py_ssize_t ulen = be16(d + at + 4);
        if (ulen >= 8 && at + ulen <= end) end = at + ulen; /* trims Ethernet padding */
        if (o->dport == VXLAN_PORT || o->dport == TZSP_PORT) return K_DECLINE;
        o->pay = at + 8, kind = K_UDP;
        if (classify && !sip_like(d + o->pay, end - o->pay)) /* no Datagram for RTP and other noise */
            return keepalive(d + o->pay, end - o->pay) ? K_KEEPALIVE : K_NOT_SIP;
    } else if (proto == 6 || proto == 132) { /* the whole segment or packet, for reassembly */
        if (end - at < 4) return K_DECLINE;
        o->sport = be16(d + at), o->dport = be16(d + at + 2);
        o->pay = at, kind = proto == 6 ? K_TCP : K_SCTP;
    } else {
        return K_DECLINE; /* ICMP, tunnels, IPv6 extension headers: decode_py */
    }
    o->link = link, o->v6 = v6, o->tags = tags, o->ip = ip, o->alen = alen, o->end = end, o->ipid = ipid;
    return kind;
}

/* The Datagram of what plain() found (kind K_UDP, K_TCP or K_SCTP); ts and no are stolen (NULL:
 * an error, or a Frame slot never set). NULL with no exception set: the caller returns None. */
static PyObject *datagram_of(const unsigned char *d, const plain_t *o, int kind, PyObject *ts, PyObject *no,
                             PyObject *source) {
    PyObject *encap;
    if (o->tags == 0) {
        encap = Py_NewRef(encaps[o->link][o->v6]);
    } else {
        encap = PyTuple_New(o->tags + 2);
        if (encap == NULL) {
            Py_XDECREF(ts);
            Py_XDECREF(no);
            return NULL;
        }
        PyTuple_SET_ITEM(encap, 0, Py_NewRef(o->link == 1 ? s_eth : o->link == 2 ? s_sll : s_sll2));
        for (int i = 0; i < o->tags; i++) {
            PyObject *s = PyUnicode_FromFormat("vlan:%d", o->vlans[i]);
            if (s == NULL) {
                Py_DECREF(encap);
                Py_XDECREF(ts);
                Py_XDECREF(no);
                return NULL;
            }
            PyTuple_SET_ITEM(encap, i + 1, s);
        }
        PyTuple_SET_ITEM(encap, o->tags + 1, Py_NewRef(o->v6 ? s_ip6 : s_ip4));
    }
    Py_ssize_t src_at = o->v6 ? 8 : 12, dst_at = o->v6 ? 24 : 16;
    PyObject *v[D_N];
    v[D_TS] = ts;
    v[D_NO] = no;
    v[D_TRANSPORT] = Py_NewRef(kind == K_TCP ? tcp_transport : kind == K_SCTP ? sctp_transport : udp_transport);
    v[D_SRC] = PyBytes_FromStringAndSize((const char *)o->ip + src_at, o->alen);
    v[D_SPORT] = PyLong_FromLong(o->sport);
    v[D_DST] = PyBytes_FromStringAndSize((const char *)o->ip + dst_at, o->alen);
    v[D_DPORT] = PyLong_FromLong(o->dport);
    v[D_PAYLOAD] = PyBytes_FromStringAndSize((const char *)d + o->pay, o->end - o->pay);
    v[D_ENCAP] = encap;
    v[D_SOURCE] = Py_XNewRef(source);
    v[D_IPID] = PyLong_FromLong(o->ipid);
    return build(datagram_type, datagram_off, v, D_N);
}

/* The Datagram of a frame in the common case, or None (decode_py decides). */
static PyObject *udp_impl(PyObject *frame, int classify) {
    if (datagram_type == NULL || Py_TYPE(frame) != frame_type) Py_RETURN_NONE;
    PyObject *data_obj = SLOT(frame, frame_off[F_DATA]), *lt_obj = SLOT(frame, frame_off[F_LINKTYPE]);
    if (data_obj == NULL || lt_obj == NULL || !PyBytes_CheckExact(data_obj) || !PyLong_CheckExact(lt_obj))
        Py_RETURN_NONE;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data_obj);
    Py_ssize_t len = PyBytes_GET_SIZE(data_obj);
    long lt = PyLong_AsLong(lt_obj);
    if (lt == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    plain_t o;
    int kind = plain(d, len, lt, classify, &o);
    if (kind == K_DECLINE) Py_RETURN_NONE;
    if (kind == K_KEEPALIVE || kind == K_NOT_SIP) return PyLong_FromLong(kind == K_KEEPALIVE ? 1 : 2);
    PyObject *out = datagram_of(d, &o, kind, Py_XNewRef(SLOT(frame, frame_off[F_TS])),
                                Py_XNewRef(SLOT(frame, frame_off[F_NO])), SLOT(frame, frame_off[F_SOURCE]));
    if (out == NULL && !PyErr_Occurred()) Py_RETURN_NONE; /* a Frame slot was never set */
    return out;
}

static PyObject *udp(PyObject *self, PyObject *frame) {
    (void)self;
    return udp_impl(frame, 0);
}

static PyObject *sip_udp(PyObject *self, PyObject *frame) {
    (void)self;
    return udp_impl(frame, 1);
}

static PyObject *looks_like_sip(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    int yes = sip_like(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(yes);
}

/*
 * shard(payload, shards) -> int: processrun.shard_of in one call, for -j N's workers that read
 * the files themselves (filerun.py) and test every SIP datagram of the capture, their own
 * shard's or not: zlib.crc32 of the first Call-ID line's value (as sip.call_id_line finds it:
 * \n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*), any case), stripped as bytes.strip() does (b"" when
 * there is none), modulo shards. No bytes object for the value, no Python call for the CRC.
 */
/* zlib's CRC-32, eight bytes a step (slicing-by-8: every SIP datagram of the capture is hashed by
 * every -j N worker; a byte a step was ~a third of the shard's cost) */
static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int b = 0; b < 8; b++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++) crc_table[t][n] = (crc_table[t - 1][n] >> 8) ^ crc_table[0][crc_table[t - 1][n] & 0xFF];
}

static inline uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint32_t crc32_of(const unsigned char *p, Py_ssize_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t one = le32(p) ^ c, two = le32(p + 4);
        c = crc_table[7][one & 0xFF] ^ crc_table[6][(one >> 8) & 0xFF] ^ crc_table[5][(one >> 16) & 0xFF]
            ^ crc_table[4][one >> 24] ^ crc_table[3][two & 0xFF] ^ crc_table[2][(two >> 8) & 0xFF]
            ^ crc_table[1][(two >> 16) & 0xFF] ^ crc_table[0][two >> 24];
    }
    for (; n > 0; p++, n--) c = crc_table[0][(c ^ *p) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static int ascii_lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int bytes_space(unsigned char c) {  /* bytes.strip()'s whitespace (Py_ISSPACE) */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

/* The Call-ID shard of the SIP payload d[0:end] */
static long shard_of(const unsigned char *d, Py_ssize_t end, long shards) {
    Py_ssize_t i = 0, s = 0, e = 0;
    while (i < end) {
        const unsigned char *nl = memchr(d + i, '\n', (size_t)(end - i));
        if (nl == NULL) break;
        Py_ssize_t j = (nl - d) + 1;
        i = j;
        if (j < end && ascii_lower(d[j]) == 'i') j += 1;
        else if (end - j >= 7 && ascii_lower(d[j]) == 'c' && ascii_lower(d[j + 1]) == 'a' && ascii_lower(d[j + 2]) == 'l'
                 && ascii_lower(d[j + 3]) == 'l' && d[j + 4] == '-' && ascii_lower(d[j + 5]) == 'i'
                 && ascii_lower(d[j + 6]) == 'd') j += 7;
        else continue;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        if (j >= end || d[j] != ':') continue;
        j++;
        while (j < end && (d[j] == ' ' || d[j] == '\t')) j++;
        e = j;
        while (e < end && d[e] != '\r' && d[e] != '\n') e++;
        s = j;
        while (s < e && bytes_space(d[s])) s++;
        while (e > s && bytes_space(d[e - 1])) e--;
        break;
    }
    return (long)(crc32_of(d + s, e - s) % (unsigned long)shards);
}

static PyObject *shard(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "shard(payload, shards)");
        return NULL;
    }
    long shards = PyLong_AsLong(args[1]);
    if (shards == -1 && PyErr_Occurred()) return NULL;
    if (shards <= 0) {
        PyErr_SetString(PyExc_ValueError, "shards must be positive");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0) return NULL;
    long n = shard_of((const unsigned char *)buf.buf, buf.len, shards);
    PyBuffer_Release(&buf);
    return PyLong_FromLong(n);
}

/*
 * pcap_shard(buf, pos, big_endian, unit, linktype, no, source, k, shards, started,
 *            next_tick, tick, next_advance, advance_every)
 *     -> (items, pos, no, next_tick, next_advance, frames, bytes, keepalives, udp_not_sip)
 *
 * pcap_frames for worker k of -j N on a capture file (fileworker.py), with the capture stage's
 * common case folded in, so that the frames of other shards make no Python object. Per record:
 *   - a plain UDP frame that looks like SIP (CaptureStage.feed's sip_udp case): its Datagram if
 *     its Call-ID shard is k; else nothing, or its Frame while not started (no SIP datagram
 *     seen yet: $TS is the first one of any shard);
 *   - a plain UDP keep-alive or other UDP payload (RTP): nothing;
 *   - anything else (TCP, SCTP, what decode_py decides): its Frame, for CaptureStage.feed.
 * A record for which nothing came out, but whose time reaches next_tick (the worker's Tick,
 * every `tick` of packet time) or next_advance (CaptureStage's once-a-second timers), comes out
 * as (no, ts): the worker fires them at the same frame and packet time as when it saw every
 * frame. Both times go on as the worker's do (ts + tick, ts + advance_every). The records that
 * came out as Datagram or (no, ts) are counted here (frames, bytes, keepalives, udp_not_sip),
 * the Frames by CaptureStage.feed. Stops where pcap_frames stops.
 */
static PyObject *pcap_shard(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    pcap_args_t a;
    if (!walk_ready(nargs, 14, "pcap_shard") || !pcap_args(args, &a)) return NULL;
    Py_ssize_t pos = a.pos;
    int big = a.big;
    double unit = a.unit;
    PyObject *linktype = a.linktype, *source = a.source;
    long lt = PyLong_AsLong(linktype);
    long long no = a.no;
    long k = PyLong_AsLong(args[7]), shards = PyLong_AsLong(args[8]);
    int started = PyObject_IsTrue(args[9]);
    double next_tick = PyFloat_AsDouble(args[10]), tick = PyFloat_AsDouble(args[11]);
    double next_advance = PyFloat_AsDouble(args[12]), every = PyFloat_AsDouble(args[13]);
    long long frames_n = 0, bytes_n = 0, keepalives_n = 0, not_sip_n = 0;
    PyObject *items = NULL;
    if (PyErr_Occurred() || started < 0 || shards <= 0 || !PyLong_CheckExact(linktype)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        goto done;
    }
    items = PyList_New(0);
    if (items == NULL) goto done;
    const unsigned char *buf = a.view.buf;
    Py_ssize_t end = a.view.len;
    double ts;
    uint32_t caplen;
    while (pcap_record(buf, end, pos, big, unit, &ts, &caplen)) {
        no += 1;
        const unsigned char *data = buf + pos + 16;
        int due = 0;
        if (ts >= next_tick) next_tick = ts + tick, due = 1;
        if (ts >= next_advance) next_advance = ts + every, due = 1;
        plain_t o;
        int kind = plain(data, caplen, lt, 1, &o);
        PyObject *item = NULL;
        int mine = kind == K_UDP && shard_of(data + o.pay, o.end - o.pay, shards) == k;
        if (kind == K_KEEPALIVE || kind == K_NOT_SIP || mine || (kind == K_UDP && started)) {
            frames_n += 1, bytes_n += caplen;
            if (kind == K_KEEPALIVE) keepalives_n += 1;
            else if (kind == K_NOT_SIP) not_sip_n += 1;
            if (mine) {
                item = datagram_of(data, &o, kind, PyFloat_FromDouble(ts), PyLong_FromLongLong(no), source);
                if (item == NULL) {
                    if (!PyErr_Occurred()) PyErr_NoMemory();
                    Py_CLEAR(items);
                    goto done;
                }
            } else if (due) {
                item = Py_BuildValue("(Ld)", no, ts);
                if (item == NULL) {
                    Py_CLEAR(items);
                    goto done;
                }
            }
            if (item != NULL) {
                int bad = PyList_Append(items, item);
                Py_DECREF(item);
                if (bad < 0) {
                    Py_CLEAR(items);
                    goto done;
                }
            }
        } else if (append_frame(items, ts, linktype, data, caplen, no, source) < 0) {
            Py_CLEAR(items);
            goto done;
        }
        pos += 16 + (Py_ssize_t)caplen;
    }
done:
    PyBuffer_Release(&a.view);
    if (items == NULL) return NULL;
    return Py_BuildValue("(NnLddLLLL)", items, pos, no, next_tick, next_advance, frames_n, bytes_n, keepalives_n,
                         not_sip_n);
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS, "setup(Frame, Datagram, udp, tcp, sctp): the classes to build"},
    {"pcap_frames", (PyCFunction)(void (*)(void))pcap_frames, METH_FASTCALL,
     "pcap_frames(buf, pos, big_endian, unit, linktype, no, source) -> (frames, pos, no)"},
    {"pcapng_frames", (PyCFunction)(void (*)(void))pcapng_frames, METH_FASTCALL,
     "pcapng_frames(buf, pos, big_endian, ifaces, no, last_ts, source) -> (frames, pos, no, last_ts)"},
    {"udp", udp, METH_O, "udp(frame) -> Datagram | None: decode's common case"},
    {"sip_udp", sip_udp, METH_O, "sip_udp(frame) -> Datagram (looks like SIP) | 1 (keep-alive) | 2 (other) | None"},
    {"looks_like_sip", looks_like_sip, METH_O, "looks_like_sip(payload) -> bool"},
    {"pcap_shard", (PyCFunction)(void (*)(void))pcap_shard, METH_FASTCALL,
     "pcap_shard(buf, pos, big_endian, unit, linktype, no, source, k, shards, started, next_tick, tick, "
     "next_advance, advance_every) -> (items, pos, no, next_tick, next_advance, frames, bytes, keepalives, "
     "udp_not_sip)"},
    {"shard", (PyCFunction)(void (*)(void))shard, METH_FASTCALL,
     "shard(payload, shards) -> int: crc32 of the stripped first Call-ID line's value, modulo shards"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_capture", NULL, -1, methods};

static PyObject *pair(PyObject *a, PyObject *b) { return a ? PyTuple_Pack(2, a, b) : PyTuple_Pack(1, b); }

PyMODINIT_FUNC PyInit__capture(void) {
    crc_init();
    s_eth = PyUnicode_InternFromString("eth");
    s_sll = PyUnicode_InternFromString("sll");
    s_sll2 = PyUnicode_InternFromString("sll2");
    s_ip4 = PyUnicode_InternFromString("ip4");
    s_ip6 = PyUnicode_InternFromString("ip6");
    if (!s_eth || !s_sll || !s_sll2 || !s_ip4 || !s_ip6) return NULL;
    PyObject *links[4] = {NULL, s_eth, s_sll, s_sll2};
    for (int l = 0; l < 4; l++) {
        encaps[l][0] = pair(links[l], s_ip4);
        encaps[l][1] = pair(links[l], s_ip6);
        if (!encaps[l][0] || !encaps[l][1]) return NULL;
    }
    return PyModule_Create(&module);
}
