/*
 * Compiled kernel of the packet capture reader (observe/pcap.py) and tracker
 * (observe/conntrack.py).
 *
 * Each function does exactly what a numpy path in those modules does (the tests run both and
 * compare): walking pcap record headers and pcapng blocks (the only sequential parts of a
 * read), decoding every record's link/IP/transport headers with overlays, gathering payload
 * bytes, and telling other interfaces' copies of a packet (pcap.CopyFilter) by a packet
 * identity hash and hash tables. Buffers come in through the buffer protocol (numpy arrays, bytes); results go
 * back as bytearrays that Python views with numpy.frombuffer. Loops run without the GIL.
 *
 * Every read of the capture buffer is bounds checked against the buffer's length (bytes past
 * it read as 0), and reads past a record's end see the same bytes numpy's gathers see (the
 * reader pads each buffer with zeros), so damaged records give the same result both ways.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_buffers.h"
#include <stdint.h>
#include <string.h>

/* A bytearray of n items of size sz; *out points to its storage. */
static PyObject *new_array(Py_ssize_t n, Py_ssize_t sz, void **out) {
    PyObject *o = PyByteArray_FromStringAndSize(NULL, n * sz);
    if (o == NULL) return NULL;
    *out = PyByteArray_AS_STRING(o);
    return o;
}

/* --- bounded reads ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *b;
    int64_t len;
} Cap;

static inline int64_t u8(const Cap *c, int64_t o) {
    return (o >= 0 && o < c->len) ? c->b[o] : 0;
}

static inline int64_t u16(const Cap *c, int64_t o) {
    if (o >= 0 && o + 2 <= c->len) return ((int64_t)c->b[o] << 8) | c->b[o + 1];
    return (u8(c, o) << 8) | u8(c, o + 1);
}

static inline int64_t u32(const Cap *c, int64_t o) {
    if (o >= 0 && o + 4 <= c->len)
        return ((int64_t)c->b[o] << 24) | ((int64_t)c->b[o + 1] << 16) |
               ((int64_t)c->b[o + 2] << 8) | c->b[o + 3];
    return (u8(c, o) << 24) | (u8(c, o + 1) << 16) | (u8(c, o + 2) << 8) | u8(c, o + 3);
}

static inline int64_t u32le(const Cap *c, int64_t o) {
    if (o >= 0 && o + 4 <= c->len)
        return ((int64_t)c->b[o + 3] << 24) | ((int64_t)c->b[o + 2] << 16) |
               ((int64_t)c->b[o + 1] << 8) | c->b[o];
    return (u8(c, o + 3) << 24) | (u8(c, o + 2) << 16) | (u8(c, o + 1) << 8) | u8(c, o);
}

static inline uint64_t u64(const Cap *c, int64_t o) {
    return ((uint64_t)u32(c, o) << 32) | (uint64_t)u32(c, o + 4);
}

/* --- pcapng block walk --------------------------------------------------------------------- */

#define MAX_RECORD (16LL << 20)

/* ng_walk(buf, pos, n, big) -> (offsets, kinds, end)
 *
 * Consecutive packet blocks (EPB 6, SPB 3, PB 2) of the current section from offset pos, as
 * long as each is whole below n and well formed (length >= 12, a multiple of 4, at most
 * MAX_RECORD + 4096, trailer equal to the length). Stops at anything else (end = its offset):
 * the caller handles that block (or the damage, or the need for more data) itself. */
static PyObject *ng_walk(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o;
    Py_ssize_t pos0, n;
    int big;
    if (!PyArg_ParseTuple(args, "Onnp", &buf_o, &pos0, &n, &big)) return NULL;
    Buf buf = {0};
    PyObject *res = NULL, *a = NULL, *k = NULL;
    if (get_buf(buf_o, &buf, 1, "buf") < 0) goto done;
    if (n > buf.view.len || pos0 < 0) {
        PyErr_SetString(PyExc_ValueError, "ng_walk: bad range");
        goto done;
    }
    Cap cp = {buf.view.buf, (int64_t)n};
    int64_t count = 0, pos = pos0;
    for (int pass = 0; pass < 2; pass++) {
        int64_t *offs = NULL, *kinds = NULL;
        if (pass == 1) {
            if (!(a = new_array(count, 8, (void **)&offs)) ||
                !(k = new_array(count, 8, (void **)&kinds)))
                goto done;
        }
        int64_t i = 0;
        pos = pos0;
        Py_BEGIN_ALLOW_THREADS
        while (pos + 12 <= n) {
            if (memcmp(cp.b + pos, "\x0a\x0d\x0d\x0a", 4) == 0) break;
            int64_t btype = big ? u32(&cp, pos) : u32le(&cp, pos);
            int64_t blen = big ? u32(&cp, pos + 4) : u32le(&cp, pos + 4);
            if (btype != 6 && btype != 3 && btype != 2) break;
            if (blen < 12 || blen % 4 || blen > MAX_RECORD + 4096) break;
            if (pos + blen > n) break;
            int64_t trail = big ? u32(&cp, pos + blen - 4) : u32le(&cp, pos + blen - 4);
            if (trail != blen) break;
            if (pass == 1) {
                offs[i] = pos;
                kinds[i] = btype;
            }
            i++;
            pos += blen;
        }
        Py_END_ALLOW_THREADS
        count = i;
    }
    res = Py_BuildValue("(OOL)", a, k, (long long)pos);
done:
    Py_XDECREF(a);
    Py_XDECREF(k);
    rel_buf(&buf);
    return res;
}

/* --- header decode ------------------------------------------------------------------------- */

#define ET_IPV4 0x0800
#define ET_IPV6 0x86DD
#define ET_PPPOE 0x8864
#define ET_TEB 0x6558
#define MAX_ENCAP 3
#define MAX_VLAN 4

static int supported_lt(int64_t lt) {
    switch (lt) {
    case 0: case 1: case 12: case 14: case 101: case 108: case 113: case 228: case 229:
    case 276:
        return 1;
    default:
        return 0;
    }
}

static int is_vlan(int64_t et) { return et == 0x8100 || et == 0x88A8 || et == 0x9100; }
static int is_mpls(int64_t et) { return et == 0x8847 || et == 0x8848; }
static int64_t et_of_version(int64_t ver) {
    return ver == 4 ? ET_IPV4 : (ver == 6 ? ET_IPV6 : 0);
}

/* pcap._link for one record: L3 offset, ethertype, reason (0 ok, 1 link type, 2 non-IP,
 * 3 truncated). */
static int link_layer(const Cap *c, int64_t start, int64_t end, int64_t lt, int64_t *l3_out,
                      int64_t *et_out) {
    int64_t l3 = start, et = 0, avail = end - start;
    int shortp = 0;
    switch (lt) {
    case 1:
        et = u16(c, start + 12);
        l3 = start + 14;
        shortp = avail < 14;
        break;
    case 113:
        et = u16(c, start + 14);
        l3 = start + 16;
        shortp = avail < 16;
        break;
    case 276:
        et = u16(c, start);
        l3 = start + 20;
        shortp = avail < 20;
        break;
    case 101: case 12: case 14: case 228: case 229:
        et = et_of_version(u8(c, start) >> 4);
        shortp = avail < 1;
        break;
    case 0: case 108: {
        int64_t le = u32le(c, start), be = u32(c, start);
        if (le == 2 || be == 2)
            et = ET_IPV4;
        else if (le == 24 || le == 28 || le == 30 || be == 24 || be == 28 || be == 30)
            et = ET_IPV6;
        else
            et = 0;
        l3 = start + 4;
        shortp = avail < 4;
        break;
    }
    default:
        break;
    }
    for (int it = 0; it < MAX_VLAN && !shortp; it++) {
        if (is_vlan(et)) {
            if (l3 + 4 > end) {
                shortp = 1;
                break;
            }
            et = u16(c, l3 + 2);
            l3 += 4;
        } else if (et == ET_PPPOE) {
            if (l3 + 8 > end) {
                shortp = 1;
                break;
            }
            int64_t ppp = u16(c, l3 + 6);
            et = ppp == 0x21 ? ET_IPV4 : (ppp == 0x57 ? ET_IPV6 : 0);
            l3 += 8;
        } else if (is_mpls(et)) {
            for (int lbl = 0; lbl < 8; lbl++) {
                if (l3 + 4 > end) {
                    shortp = 1;
                    break;
                }
                int bos = (u8(c, l3 + 2) & 1) == 1;
                l3 += 4;
                if (bos) {
                    et = et_of_version(u8(c, l3) >> 4);
                    break;
                }
            }
        } else {
            break;
        }
    }
    *l3_out = l3;
    *et_out = et;
    if (!supported_lt(lt)) return 1;
    if (shortp) return 3;
    if (et != ET_IPV4 && et != ET_IPV6) return 2;
    return 0;
}

typedef struct {
    int64_t ver, proto, l4, l4_len, frag, why; /* why: 0 ok, 3 malformed, 4 later fragment */
    int64_t ipid; /* IPv4 identification (0 for IPv6) */
    uint64_t src_hi, src_lo, dst_hi, dst_lo;
} IpInfo;

static void ip_layer(const Cap *c, int64_t o, int64_t e, int64_t et, IpInfo *r) {
    memset(r, 0, sizeof(*r));
    int bad = 0, later = 0;
    if (et == ET_IPV4) {
        int64_t vb = u8(c, o), ihl = (vb & 0xF) * 4, tot = u16(c, o + 2), fr = u16(c, o + 6);
        bad = (o + 20 > e) || ((vb >> 4) != 4) || (ihl < 20) || (o + ihl > e);
        if (tot == 0) tot = e - o;
        bad |= tot < ihl;
        r->ver = 4;
        r->ipid = u16(c, o + 4);
        r->proto = u8(c, o + 9);
        r->src_lo = (uint64_t)u32(c, o + 12) | 0xFFFF00000000ULL;
        r->dst_lo = (uint64_t)u32(c, o + 16) | 0xFFFF00000000ULL;
        r->l4 = o + ihl;
        r->l4_len = tot - ihl;
        int64_t off = fr & 0x1FFF;
        int mf = (fr & 0x2000) != 0;
        later = off > 0;
        r->frag = (off == 0 && mf) ? 1 : 0;
    } else if (et == ET_IPV6) {
        bad = (o + 40 > e) || ((u8(c, o) >> 4) != 6);
        int64_t plen = u16(c, o + 4), nh = u8(c, o + 6);
        r->ver = 6;
        r->src_hi = u64(c, o + 8);
        r->src_lo = u64(c, o + 16);
        r->dst_hi = u64(c, o + 24);
        r->dst_lo = u64(c, o + 32);
        int64_t cur = o + 40, remaining = plen;
        for (int it = 0; it < 6; it++) {
            int x = (nh == 0 || nh == 43 || nh == 60 || nh == 51 || nh == 44 || nh == 135) && !bad;
            if (!x) break;
            if (cur + 8 > e) {
                bad = 1;
                break;
            }
            int64_t hlen = nh == 44 ? 8 : (nh == 51 ? (u8(c, cur + 1) + 2) * 4
                                                    : (u8(c, cur + 1) + 1) * 8);
            if (nh == 44) {
                int64_t fo = u16(c, cur + 2);
                if ((fo >> 3) > 0) later = 1;
                if ((fo >> 3) == 0 && (fo & 1) == 1) r->frag = 1;
            }
            nh = u8(c, cur);
            cur += hlen;
            remaining -= hlen;
        }
        bad |= remaining < 0;
        r->proto = nh;
        r->l4 = cur;
        r->l4_len = remaining;
    } else {
        bad = 1;
    }
    r->why = bad ? 3 : (later ? 4 : 0);
}

typedef struct {
    int64_t sport, dport, flags, seq, ack, win, plen, poff;
    int bad;
} L4Info;

static void transport(const Cap *c, int64_t o, int64_t l4_len, int64_t e, int64_t proto,
                      L4Info *t) {
    memset(t, 0, sizeof(*t));
    t->poff = o;
    t->plen = l4_len > 0 ? l4_len : 0;
    if (proto == 6) {
        int64_t doff = (u8(c, o + 12) >> 4) * 4;
        t->bad = (o + 20 > e) || (doff < 20) || (o + doff > e) || (l4_len < doff);
        t->sport = u16(c, o);
        t->dport = u16(c, o + 2);
        t->seq = u32(c, o + 4);
        t->ack = u32(c, o + 8);
        t->flags = u8(c, o + 13) | ((u8(c, o + 12) & 1) << 8);
        t->win = u16(c, o + 14);
        t->poff = o + doff;
        t->plen = l4_len - doff > 0 ? l4_len - doff : 0;
    } else if (proto == 17) {
        t->bad = (o + 8 > e) || (l4_len < 8);
        t->sport = u16(c, o);
        t->dport = u16(c, o + 2);
        int64_t ulen = u16(c, o + 4);
        if (!(ulen >= 8 && ulen <= l4_len)) ulen = l4_len;
        t->poff = o + 8;
        t->plen = ulen - 8 > 0 ? ulen - 8 : 0;
    }
}

enum {
    C_IDX, C_VER, C_SRC_HI, C_SRC_LO, C_DST_HI, C_DST_LO, C_PROTO, C_SPORT, C_DPORT, C_FLAGS,
    C_SEQ, C_ACK, C_WIN, C_PLEN, C_POFF, C_PCAP, C_TUNNEL, C_FRAG, C_IPID, C_IFINDEX, C_TS, C_CAP,
    C_WIRE, NCOLS
};
/* decode() returns the first NDEC columns, pcap_decode() all NCOLS. */
#define NDEC C_TS
static const Py_ssize_t col_size[NCOLS] = {8, 1, 8, 8, 8, 8, 1, 2, 2, 2, 8, 8, 2, 8, 8, 8, 1, 1,
                                           2, 4, 8, 8, 8};

/* pcap._decode for one record buf[start:e] of link type lt: the reason (0 ok, 1 link type,
 * 2 non-IP, 3 malformed, 4 later fragment) and, when ok, row m of the columns. */
static int decode_record(const Cap *cp, int64_t start, int64_t e, int64_t lt, void **col,
                         Py_ssize_t m, Py_ssize_t rec) {
    int64_t l3, et;
    int why = link_layer(cp, start, e, lt, &l3, &et);
    int tunnel = 0;
    IpInfo ip;
    L4Info tp;
    if (why != 0) return why;
    for (int level = 0; level <= MAX_ENCAP; level++) {
        ip_layer(cp, l3, e, et, &ip);
        transport(cp, ip.l4, ip.l4_len, e, ip.proto, &tp);
        why = (int)ip.why;
        if (why == 0 && tp.bad) why = 3;
        if (why != 0 || level == MAX_ENCAP) break;
        int vx = ip.proto == 17 && (tp.dport == 4789 || tp.dport == 8472);
        int gn = ip.proto == 17 && tp.dport == 6081;
        int ii = ip.frag == 0 && (ip.proto == 4 || ip.proto == 41);
        int64_t nl3 = 0, net = 0;
        int nok = 0, kind = 0;
        int64_t p = tp.poff;
        if (vx) {
            kind = 1;
            if (p + 8 + 14 <= e && (u8(cp, p) & 0x08) != 0) {
                nok = link_layer(cp, p + 8, e, 1, &nl3, &net) == 0;
                nok = nok && nl3 <= e;
            }
        } else if (gn) {
            kind = 2;
            if (p + 8 <= e) {
                int64_t optlen = (u8(cp, p) & 0x3F) * 4, gpt = u16(cp, p + 2);
                int64_t inner = p + 8 + optlen;
                if (gpt == ET_TEB)
                    nok = link_layer(cp, inner, e, 1, &nl3, &net) == 0;
                else if (gpt == ET_IPV4 || gpt == ET_IPV6) {
                    nl3 = inner;
                    net = gpt;
                    nok = 1;
                }
                nok = nok && nl3 <= e;
            }
        } else if (ii) {
            kind = 3;
            nl3 = ip.l4;
            net = ip.proto == 4 ? ET_IPV4 : ET_IPV6;
            nok = 1;
        }
        if (!nok) break;
        tunnel = kind;
        l3 = nl3;
        et = net;
    }
    if (why != 0) return why;
    int64_t pc = e - tp.poff;
    if (pc < 0) pc = 0;
    if (pc > tp.plen) pc = tp.plen;
    ((int64_t *)col[C_IDX])[m] = rec;
    ((int8_t *)col[C_VER])[m] = (int8_t)ip.ver;
    ((uint64_t *)col[C_SRC_HI])[m] = ip.src_hi;
    ((uint64_t *)col[C_SRC_LO])[m] = ip.src_lo;
    ((uint64_t *)col[C_DST_HI])[m] = ip.dst_hi;
    ((uint64_t *)col[C_DST_LO])[m] = ip.dst_lo;
    ((uint8_t *)col[C_PROTO])[m] = (uint8_t)ip.proto;
    ((uint16_t *)col[C_SPORT])[m] = (uint16_t)tp.sport;
    ((uint16_t *)col[C_DPORT])[m] = (uint16_t)tp.dport;
    ((uint16_t *)col[C_FLAGS])[m] = (uint16_t)tp.flags;
    ((int64_t *)col[C_SEQ])[m] = tp.seq;
    ((int64_t *)col[C_ACK])[m] = tp.ack;
    ((uint16_t *)col[C_WIN])[m] = (uint16_t)tp.win;
    ((int64_t *)col[C_PLEN])[m] = tp.plen;
    ((int64_t *)col[C_POFF])[m] = tp.poff;
    ((int64_t *)col[C_PCAP])[m] = pc;
    ((int8_t *)col[C_TUNNEL])[m] = (int8_t)tunnel;
    ((int8_t *)col[C_FRAG])[m] = (int8_t)ip.frag;
    ((uint16_t *)col[C_IPID])[m] = (uint16_t)ip.ipid;
    /* SLL2: the interface index (bytes 4-7 of its header) says which interface saw it. */
    ((uint32_t *)col[C_IFINDEX])[m] = lt == 276 ? (uint32_t)u32(cp, start + 4) : 0;
    return 0;
}

/* Trim each column to m rows and hand them over as a tuple (steals the references). */
static PyObject *finish_cols(PyObject **cols, int ncols, Py_ssize_t m) {
    for (int k = 0; k < ncols; k++)
        if (PyByteArray_Resize(cols[k], m * col_size[k]) < 0) return NULL;
    PyObject *tup = PyTuple_New(ncols);
    if (tup == NULL) return NULL;
    for (int k = 0; k < ncols; k++) {
        PyTuple_SET_ITEM(tup, k, cols[k]);
        cols[k] = NULL;
    }
    return tup;
}

/* decode(buf, starts, caps, linktypes) -> (reason, columns)
 *
 * pcap._decode for every record buf[starts[i]: starts[i] + caps[i]] of link type
 * linktypes[i]: reason[i] (int8: 0 ok, 1 link type, 2 non-IP, 3 malformed, 4 later fragment)
 * and, for the ok records only, in record order, the columns (idx int64 = record index, ver
 * int8, src_hi/src_lo/dst_hi/dst_lo uint64, proto uint8, sport/dport/flags uint16, seq/ack
 * int64, window uint16, payload_len/payload_off/payload_cap int64, tunnel int8, frag int8,
 * ip_id uint16, ifindex uint32). */
static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o, *st_o, *cap_o, *lt_o;
    if (!PyArg_ParseTuple(args, "OOOO", &buf_o, &st_o, &cap_o, &lt_o)) return NULL;
    Buf buf = {0}, sb = {0}, cb = {0}, lb = {0};
    PyObject *res = NULL, *reason_o = NULL, *cols[NCOLS] = {0}, *tup;
    void *col[NCOLS];
    if (get_buf(buf_o, &buf, 1, "buf") < 0 || get_buf(st_o, &sb, 8, "starts") < 0 ||
        get_buf(cap_o, &cb, 8, "caps") < 0 || get_buf(lt_o, &lb, 8, "linktypes") < 0)
        goto done;
    Py_ssize_t n = sb.view.len / 8;
    if (cb.view.len / 8 != n || lb.view.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "decode: arrays differ in length");
        goto done;
    }
    int8_t *reason;
    if (!(reason_o = new_array(n, 1, (void **)&reason))) goto done;
    for (int k = 0; k < NDEC; k++)
        if (!(cols[k] = new_array(n, col_size[k], &col[k]))) goto done;
    const int64_t *starts = sb.view.buf, *caps = cb.view.buf, *lts = lb.view.buf;
    Cap cp = {buf.view.buf, (int64_t)buf.view.len};
    Py_ssize_t m = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int why = decode_record(&cp, starts[i], starts[i] + caps[i], lts[i], col, m, i);
        reason[i] = (int8_t)why;
        m += why == 0;
    }
    Py_END_ALLOW_THREADS
    if (!(tup = finish_cols(cols, NDEC, m))) goto done;
    res = Py_BuildValue("(ON)", reason_o, tup);
done:
    Py_XDECREF(reason_o);
    for (int k = 0; k < NCOLS; k++) Py_XDECREF(cols[k]);
    rel_buf(&buf);
    rel_buf(&sb);
    rel_buf(&cb);
    rel_buf(&lb);
    return res;
}

/* pcap_decode(buf, n, big, tmul, limit, linktype) -> (reason, columns, end, over)
 *
 * The records wholly in buf[:n], walked and decoded in one pass (each record's headers are
 * decoded while its cache line is fresh): the reason of each record taken, and the decode
 * columns followed by ts (sec * 1e9 + frac * tmul), captured and wire lengths for the ok ones.
 * Stops at the first record whose captured length is beyond limit (over = 1, end = its
 * offset) or that is not whole below n (over = 0, end = its offset). */
static PyObject *pcap_decode(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o;
    Py_ssize_t n;
    int big;
    long long tmul, limit, lt;
    if (!PyArg_ParseTuple(args, "OnpLLL", &buf_o, &n, &big, &tmul, &limit, &lt)) return NULL;
    Buf buf = {0};
    PyObject *res = NULL, *reason_o = NULL, *cols[NCOLS] = {0}, *tup;
    void *col[NCOLS];
    if (get_buf(buf_o, &buf, 1, "buf") < 0) goto done;
    if (n > buf.view.len || n < 0) {
        PyErr_SetString(PyExc_ValueError, "pcap_decode: bad range");
        goto done;
    }
    /* At most one record per 16 bytes; the columns are trimmed to the records seen (pages
     * never written are never touched). */
    Py_ssize_t most = n / 16 + 1;
    int8_t *reason;
    if (!(reason_o = new_array(most, 1, (void **)&reason))) goto done;
    for (int k = 0; k < NCOLS; k++)
        if (!(cols[k] = new_array(most, col_size[k], &col[k]))) goto done;
    Cap cp = {buf.view.buf, (int64_t)buf.view.len};
    Cap rec = {buf.view.buf, (int64_t)n};
    Py_ssize_t m = 0, count = 0;
    int64_t pos = 0;
    int over = 0;
    Py_BEGIN_ALLOW_THREADS
    while (pos + 16 <= n) {
        int64_t sec, frac, cap, wire;
        if (big) {
            cap = u32(&rec, pos + 8);
        } else {
            cap = u32le(&rec, pos + 8);
        }
        if (cap > limit) {
            over = 1;
            break;
        }
        if (pos + 16 + cap > n) break;
        if (big) {
            sec = u32(&rec, pos);
            frac = u32(&rec, pos + 4);
            wire = u32(&rec, pos + 12);
        } else {
            sec = u32le(&rec, pos);
            frac = u32le(&rec, pos + 4);
            wire = u32le(&rec, pos + 12);
        }
        int why = decode_record(&cp, pos + 16, pos + 16 + cap, lt, col, m, count);
        reason[count] = (int8_t)why;
        if (why == 0) {
            ((int64_t *)col[C_TS])[m] = sec * 1000000000LL + frac * tmul;
            ((int64_t *)col[C_CAP])[m] = cap;
            ((int64_t *)col[C_WIRE])[m] = wire;
            m++;
        }
        count++;
        pos += 16 + cap;
    }
    Py_END_ALLOW_THREADS
    if (PyByteArray_Resize(reason_o, count) < 0) goto done;
    if (!(tup = finish_cols(cols, NCOLS, m))) goto done;
    res = Py_BuildValue("(ONLi)", reason_o, tup, (long long)pos, over);
done:
    Py_XDECREF(reason_o);
    for (int k = 0; k < NCOLS; k++) Py_XDECREF(cols[k]);
    rel_buf(&buf);
    return res;
}

/* --- payload gather ------------------------------------------------------------------------ */

/* gather(buf, offsets, lengths) -> bytes: buf[offsets[i]: offsets[i] + lengths[i]] for every i,
 * concatenated (negative lengths count as 0; every slice must lie inside buf). */
static PyObject *gather(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o, *off_o, *len_o;
    if (!PyArg_ParseTuple(args, "OOO", &buf_o, &off_o, &len_o)) return NULL;
    Buf buf = {0}, ob = {0}, lb = {0};
    PyObject *res = NULL;
    if (get_buf(buf_o, &buf, 1, "buf") < 0 || get_buf(off_o, &ob, 8, "offsets") < 0 ||
        get_buf(len_o, &lb, 8, "lengths") < 0)
        goto done;
    Py_ssize_t n = ob.view.len / 8;
    if (lb.view.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "gather: arrays differ in length");
        goto done;
    }
    const int64_t *offs = ob.view.buf, *lens = lb.view.buf;
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t k = lens[i] > 0 ? lens[i] : 0;
        if (k && (offs[i] < 0 || offs[i] + k > buf.view.len)) {
            PyErr_SetString(PyExc_IndexError, "gather: slice outside the buffer");
            goto done;
        }
        total += k;
    }
    res = PyBytes_FromStringAndSize(NULL, total);
    if (res == NULL) goto done;
    char *out = PyBytes_AS_STRING(res);
    const char *src = buf.view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t k = lens[i] > 0 ? lens[i] : 0;
        memcpy(out, src + offs[i], (size_t)k);
        out += k;
    }
    Py_END_ALLOW_THREADS
done:
    rel_buf(&buf);
    rel_buf(&ob);
    rel_buf(&lb);
    return res;
}

/* starts_with(buf, offsets, lengths, tokens) -> bytearray mask: 1 where the slice
 * buf[offsets[i]: offsets[i] + lengths[i]] starts with one of the bytes objects in tokens. */
static PyObject *starts_with(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o, *off_o, *len_o, *tok_o;
    if (!PyArg_ParseTuple(args, "OOOO!", &buf_o, &off_o, &len_o, &PyTuple_Type, &tok_o))
        return NULL;
    Buf buf = {0}, ob = {0}, lb = {0};
    PyObject *res = NULL;
    Py_ssize_t ntok = PyTuple_GET_SIZE(tok_o);
    const char *tok[16];
    Py_ssize_t tlen[16];
    if (ntok > 16) {
        PyErr_SetString(PyExc_ValueError, "starts_with: at most 16 tokens");
        return NULL;
    }
    for (Py_ssize_t t = 0; t < ntok; t++) {
        PyObject *x = PyTuple_GET_ITEM(tok_o, t);
        if (!PyBytes_Check(x) || PyBytes_GET_SIZE(x) == 0) {
            PyErr_SetString(PyExc_TypeError, "starts_with: tokens are non-empty bytes");
            return NULL;
        }
        tok[t] = PyBytes_AS_STRING(x);
        tlen[t] = PyBytes_GET_SIZE(x);
    }
    if (get_buf(buf_o, &buf, 1, "buf") < 0 || get_buf(off_o, &ob, 8, "offsets") < 0 ||
        get_buf(len_o, &lb, 8, "lengths") < 0)
        goto done;
    Py_ssize_t n = ob.view.len / 8;
    if (lb.view.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "starts_with: arrays differ in length");
        goto done;
    }
    uint8_t *mask;
    if (!(res = new_array(n, 1, (void **)&mask))) goto done;
    const int64_t *offs = ob.view.buf, *lens = lb.view.buf;
    const char *b = buf.view.buf;
    int64_t blen = buf.view.len;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int hit = 0;
        int64_t o = offs[i], k = lens[i];
        if (o >= 0 && o <= blen) {
            if (k > blen - o) k = blen - o;
            for (Py_ssize_t t = 0; t < ntok && !hit; t++)
                hit = k >= tlen[t] && b[o] == tok[t][0] && memcmp(b + o, tok[t], tlen[t]) == 0;
        }
        mask[i] = (uint8_t)hit;
    }
    Py_END_ALLOW_THREADS
done:
    rel_buf(&buf);
    rel_buf(&ob);
    rel_buf(&lb);
    return res;
}

/* --- duplicate copies ---------------------------------------------------------------------- */

/* The identity hash of a packet (pcap.copy_keys): 64-bit words of its headers, then its
 * first 16 captured payload bytes (little-endian, zero past the captured length), mixed. */
#define K_SEED 0x9E3779B97F4A7C15ULL
#define K_MUL 0xFF51AFD7ED558CCDULL
#define K_FIN 0xC4CEB9FE1A85EC53ULL

static inline uint64_t kmix(uint64_t h, uint64_t w) {
    h ^= w;
    h *= K_MUL;
    return h ^ (h >> 32);
}

static inline uint64_t kfinal(uint64_t h) {
    h ^= h >> 33;
    h *= K_FIN;
    return h ^ (h >> 33);
}

/* hash_keys(buf, columns) -> bytearray of uint64: the identity hash of every row of a
 * PacketBatch, from its columns (a tuple in this order and these types: src_hi, src_lo,
 * dst_hi, dst_lo uint64; proto uint8; sport, dport, tcp_flags uint16; seq, ack int64; window,
 * ip_id uint16; payload_len, payload_off, payload_cap int64). The seven words
 *   src_hi, src_lo, dst_hi, dst_lo,
 *   proto | sport << 8 | dport << 24 | flags << 40,  seq | ack << 32,
 *   window | ip_id << 16 | payload_len << 32
 * then buf[payload_off: payload_off + min(payload_cap, 16)] (two little-endian words, zero
 * filled) are mixed into one hash. */
#define K_NCOLS 15
static const Py_ssize_t k_size[K_NCOLS] = {8, 8, 8, 8, 1, 2, 2, 2, 8, 8, 2, 2, 8, 8, 8};

static PyObject *hash_keys(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf_o, *cols_o;
    if (!PyArg_ParseTuple(args, "OO!", &buf_o, &PyTuple_Type, &cols_o)) return NULL;
    if (PyTuple_GET_SIZE(cols_o) != K_NCOLS) {
        PyErr_SetString(PyExc_ValueError, "hash_keys: 15 columns expected");
        return NULL;
    }
    Buf buf = {0}, cb[K_NCOLS];
    memset(cb, 0, sizeof(cb));
    PyObject *res = NULL;
    Py_ssize_t n = -1;
    if (get_buf(buf_o, &buf, 1, "buf") < 0) goto done;
    for (int k = 0; k < K_NCOLS; k++) {
        if (get_buf(PyTuple_GET_ITEM(cols_o, k), &cb[k], k_size[k], "column") < 0) goto done;
        Py_ssize_t m = cb[k].view.len / k_size[k];
        if (cb[k].view.itemsize != k_size[k] || (n >= 0 && m != n)) {
            PyErr_SetString(PyExc_ValueError, "hash_keys: column of another type or length");
            goto done;
        }
        n = m;
    }
    uint64_t *out;
    if (!(res = new_array(n, 8, (void **)&out))) goto done;
    const uint64_t *sh = cb[0].view.buf, *sl = cb[1].view.buf, *dh = cb[2].view.buf,
                   *dl = cb[3].view.buf;
    const uint8_t *proto = cb[4].view.buf;
    const uint16_t *sp = cb[5].view.buf, *dp = cb[6].view.buf, *fl = cb[7].view.buf,
                   *win = cb[10].view.buf, *ipid = cb[11].view.buf;
    const int64_t *seq = cb[8].view.buf, *ack = cb[9].view.buf, *plen = cb[12].view.buf,
                  *offs = cb[13].view.buf, *caps = cb[14].view.buf;
    Cap cp = {buf.view.buf, (int64_t)buf.view.len};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = K_SEED;
        h = kmix(h, sh[i]);
        h = kmix(h, sl[i]);
        h = kmix(h, dh[i]);
        h = kmix(h, dl[i]);
        h = kmix(h, (uint64_t)proto[i] | ((uint64_t)sp[i] << 8) | ((uint64_t)dp[i] << 24) |
                        ((uint64_t)fl[i] << 40));
        h = kmix(h, (uint64_t)seq[i] | ((uint64_t)ack[i] << 32));
        h = kmix(h, (uint64_t)win[i] | ((uint64_t)ipid[i] << 16) | ((uint64_t)plen[i] << 32));
        int64_t k = caps[i] < 16 ? caps[i] : 16;
        uint64_t p[2] = {0, 0};
        int64_t o = offs[i];
        if (k == 16 && o >= 0 && o + 16 <= cp.len) {
            for (int j = 0; j < 16; j++) p[j >> 3] |= (uint64_t)cp.b[o + j] << (8 * (j & 7));
        } else {
            for (int64_t j = 0; j < k; j++) p[j >> 3] |= (uint64_t)u8(&cp, o + j) << (8 * (j & 7));
        }
        h = kmix(h, p[0]);
        h = kmix(h, p[1]);
        out[i] = kfinal(h);
    }
    Py_END_ALLOW_THREADS
done:
    rel_buf(&buf);
    for (int k = 0; k < K_NCOLS; k++) rel_buf(&cb[k]);
    return res;
}

/* Open-addressing hash tables of pcap.CopyFilter's state: per key (its run: generation, time
 * of its last row, transmissions counted, and the first interface of the run with its
 * occurrence number inline, so a key seen on one interface never touches the second table)
 * and per (key, other interface) (occurrence number of its last row in the run). The tables
 * live in a scratch buffer the filter keeps between calls: a slot belongs to this call when
 * its epoch is this call's, so nothing is cleared between calls. */
typedef struct {
    uint64_t key;
    int64_t last;
    uint64_t ident0;
    int32_t ntx, occ0, gen;
    uint32_t epoch;
} KEnt;

typedef struct {
    uint64_t key, ident;
    int32_t occ, gen;
    uint32_t epoch, pad;
} IEnt;

static inline int64_t wrap_sub(int64_t a, int64_t b) {
    return (int64_t)((uint64_t)a - (uint64_t)b);
}

static KEnt *k_slot(KEnt *t, uint64_t mask, uint64_t key, uint32_t epoch) {
    uint64_t i = key & mask;
    while (t[i].epoch == epoch && t[i].key != key) i = (i + 1) & mask;
    return &t[i];
}

static IEnt *i_slot(IEnt *t, uint64_t mask, uint64_t key, uint64_t ident, uint32_t epoch) {
    uint64_t i = kfinal(key ^ (ident * K_MUL)) & mask;
    while (t[i].epoch == epoch && (t[i].key != key || t[i].ident != ident)) i = (i + 1) & mask;
    return &t[i];
}

/* mark_copies(keys, idents, ts, window, clock, ck, clast, cntx, cik, cif, cocc, scratch,
 *             kcap, icap, epoch) -> (mask, clock, ck, clast, cntx, cik, cif, cocc)
 *
 * pcap.CopyFilter's rule, row by row in order: a row continues the run of its key when the
 * key's previous row is at most window older than the clock (the largest timestamp so far,
 * this row's included), else it starts a new run; its occurrence number is the count of
 * earlier rows of the run on its interface; it is a copy (mask 1) when a row of the run on
 * another interface already had that occurrence number. The state in and out: the clock,
 * per key of a live run (ck, clast, cntx: its last row's time, transmissions counted) and
 * per (key, interface) of those runs (cik, cif, cocc: occurrence number of the last row);
 * runs whose last row is more than window older than the clock are forgotten. Out in no
 * particular order (the caller sorts). scratch holds kcap KEnt then icap IEnt (powers of two,
 * at least twice the keys and rows of the call); epoch differs from every earlier call's on
 * this scratch (0 never). */
static PyObject *mark_copies(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *k_o, *id_o, *ts_o, *ck_o, *cl_o, *cn_o, *cik_o, *cif_o, *co_o, *sc_o;
    long long window, clock0, kcap, icap;
    unsigned int epoch;
    if (!PyArg_ParseTuple(args, "OOOLLOOOOOOOLLI", &k_o, &id_o, &ts_o, &window, &clock0, &ck_o,
                          &cl_o, &cn_o, &cik_o, &cif_o, &co_o, &sc_o, &kcap, &icap, &epoch))
        return NULL;
    Buf kb = {0}, ib = {0}, tb = {0}, ckb = {0}, clb = {0}, cnb = {0}, cikb = {0}, cifb = {0},
        cob = {0}, scb = {0};
    PyObject *res = NULL, *mask_o = NULL, *out[6] = {0};
    int32_t *ktouch = NULL, *itouch = NULL;
    if (get_buf(k_o, &kb, 8, "keys") < 0 || get_buf(id_o, &ib, 8, "idents") < 0 ||
        get_buf(ts_o, &tb, 8, "ts") < 0 || get_buf(ck_o, &ckb, 8, "ck") < 0 ||
        get_buf(cl_o, &clb, 8, "clast") < 0 || get_buf(cn_o, &cnb, 8, "cntx") < 0 ||
        get_buf(cik_o, &cikb, 8, "cik") < 0 || get_buf(cif_o, &cifb, 8, "cif") < 0 ||
        get_buf(co_o, &cob, 8, "cocc") < 0)
        goto done;
    if (PyObject_GetBuffer(sc_o, &scb.view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    scb.held = 1;
    Py_ssize_t n = kb.view.len / 8, mk = ckb.view.len / 8, mi = cikb.view.len / 8;
    if (ib.view.len / 8 != n || tb.view.len / 8 != n || clb.view.len / 8 != mk ||
        cnb.view.len / 8 != mk || cifb.view.len / 8 != mi || cob.view.len / 8 != mi) {
        PyErr_SetString(PyExc_ValueError, "mark_copies: arrays differ in length");
        goto done;
    }
    if (kcap < 2 * (mk + n) || icap < 2 * (mi + n) || (kcap & (kcap - 1)) ||
        (icap & (icap - 1)) || epoch == 0 ||
        scb.view.len < (Py_ssize_t)(kcap * sizeof(KEnt) + icap * sizeof(IEnt))) {
        PyErr_SetString(PyExc_ValueError, "mark_copies: scratch too small or bad epoch");
        goto done;
    }
    KEnt *kt = scb.view.buf;
    IEnt *it = (IEnt *)((char *)scb.view.buf + kcap * sizeof(KEnt));
    uint64_t kmask = (uint64_t)kcap - 1, imask = (uint64_t)icap - 1;
    ktouch = PyMem_RawMalloc((size_t)(mk + n + 1) * sizeof(int32_t));
    itouch = PyMem_RawMalloc((size_t)(mi + n + 1) * sizeof(int32_t));
    if (ktouch == NULL || itouch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint8_t *mask;
    if (!(mask_o = new_array(n, 1, (void **)&mask))) goto done;
    const uint64_t *keys = kb.view.buf, *ids = ib.view.buf, *ck = ckb.view.buf,
                   *cik = cikb.view.buf, *cif = cifb.view.buf;
    const int64_t *ts = tb.view.buf, *clast = clb.view.buf, *cntx = cnb.view.buf,
                  *cocc = cob.view.buf;
    int64_t clk = clock0;
    int32_t gen = 0;
    Py_ssize_t nkt = 0, nit = 0, nk = 0, ni = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < mk; j++) {
        KEnt *e = k_slot(kt, kmask, ck[j], epoch);
        if (e->epoch != epoch) ktouch[nkt++] = (int32_t)(e - kt);
        e->key = ck[j];
        e->epoch = epoch;
        e->last = clast[j];
        e->ntx = (int32_t)cntx[j];
        e->gen = ++gen;
        e->occ0 = -1;
    }
    for (Py_ssize_t j = 0; j < mi; j++) {
        KEnt *e = k_slot(kt, kmask, cik[j], epoch);
        if (e->epoch != epoch) continue;
        if (e->occ0 < 0) {
            e->ident0 = cif[j];
            e->occ0 = (int32_t)cocc[j];
            continue;
        }
        IEnt *x = i_slot(it, imask, cik[j], cif[j], epoch);
        if (x->epoch != epoch) itouch[nit++] = (int32_t)(x - it);
        x->epoch = epoch;
        x->key = cik[j];
        x->ident = cif[j];
        x->occ = (int32_t)cocc[j];
        x->gen = e->gen;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        if (ts[r] > clk) clk = ts[r];
        uint64_t key = keys[r], ident = ids[r];
        KEnt *e = k_slot(kt, kmask, key, epoch);
        int fresh = e->epoch != epoch;
        if (fresh || e->occ0 < 0 || wrap_sub(clk, e->last) > window) {
            if (fresh) ktouch[nkt++] = (int32_t)(e - kt);
            e->key = key;
            e->epoch = epoch;
            e->gen = ++gen;
            e->last = ts[r];
            e->ident0 = ident;
            e->occ0 = 0;
            e->ntx = 1;
            mask[r] = 0;
            continue;
        }
        e->last = ts[r];
        int32_t occ;
        if (ident == e->ident0) {
            occ = ++e->occ0;
        } else {
            IEnt *x = i_slot(it, imask, key, ident, epoch);
            if (x->epoch != epoch) {
                itouch[nit++] = (int32_t)(x - it);
                x->epoch = epoch;
                x->key = key;
                x->ident = ident;
                x->gen = 0;
            }
            occ = x->gen == e->gen ? x->occ + 1 : 0;
            x->occ = occ;
            x->gen = e->gen;
        }
        if (occ < e->ntx) {
            mask[r] = 1;
        } else {
            mask[r] = 0;
            e->ntx = occ + 1;
        }
    }
    for (Py_ssize_t j = 0; j < nkt; j++) {
        KEnt *e = &kt[ktouch[j]];
        if (e->occ0 >= 0 && wrap_sub(clk, e->last) <= window) nk++;
    }
    for (Py_ssize_t j = 0; j < nit; j++) {
        IEnt *x = &it[itouch[j]];
        KEnt *e = k_slot(kt, kmask, x->key, epoch);
        if (e->gen == x->gen && e->occ0 >= 0 && wrap_sub(clk, e->last) <= window) ni++;
    }
    Py_END_ALLOW_THREADS
    uint64_t *o_ck, *o_cik, *o_cif;
    int64_t *o_cl, *o_cn, *o_co;
    if (!(out[0] = new_array(nk, 8, (void **)&o_ck)) ||
        !(out[1] = new_array(nk, 8, (void **)&o_cl)) ||
        !(out[2] = new_array(nk, 8, (void **)&o_cn)) ||
        !(out[3] = new_array(nk + ni, 8, (void **)&o_cik)) ||
        !(out[4] = new_array(nk + ni, 8, (void **)&o_cif)) ||
        !(out[5] = new_array(nk + ni, 8, (void **)&o_co)))
        goto done;
    Py_ssize_t a = 0;
    for (Py_ssize_t j = 0; j < nkt; j++) {
        KEnt *e = &kt[ktouch[j]];
        if (e->occ0 < 0 || wrap_sub(clk, e->last) > window) continue;
        o_ck[a] = e->key;
        o_cl[a] = e->last;
        o_cn[a] = e->ntx;
        o_cik[a] = e->key;
        o_cif[a] = e->ident0;
        o_co[a] = e->occ0;
        a++;
    }
    for (Py_ssize_t j = 0; j < nit; j++) {
        IEnt *x = &it[itouch[j]];
        KEnt *e = k_slot(kt, kmask, x->key, epoch);
        if (e->gen == x->gen && e->occ0 >= 0 && wrap_sub(clk, e->last) <= window) {
            o_cik[a] = x->key;
            o_cif[a] = x->ident;
            o_co[a] = x->occ;
            a++;
        }
    }
    res = Py_BuildValue("(OLOOOOOO)", mask_o, (long long)clk, out[0], out[1], out[2], out[3],
                        out[4], out[5]);
done:
    Py_XDECREF(mask_o);
    for (int k = 0; k < 6; k++) Py_XDECREF(out[k]);
    PyMem_RawFree(ktouch);
    PyMem_RawFree(itouch);
    rel_buf(&kb);
    rel_buf(&ib);
    rel_buf(&tb);
    rel_buf(&ckb);
    rel_buf(&clb);
    rel_buf(&cnb);
    rel_buf(&cikb);
    rel_buf(&cifb);
    rel_buf(&cob);
    rel_buf(&scb);
    return res;
}

/* --- HTTP/1 message starts (observe/capture.py _http1_requests) ---------------------------- */

/* The request line ^([A-Z][A-Z0-9_-]{0,31}) ([^ \r\n]+) (HTTP/1\.[01])\r?\n of b[0:n]: 1 and the
 * three fields' spans (offset, length) in f, else 0. */
static int h1_request(const uint8_t *b, int64_t n, int64_t *f) {
    int64_t i = 0;
    if (n < 1 || b[0] < 'A' || b[0] > 'Z') return 0;
    for (i = 1; i < n; i++) {
        uint8_t c = b[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) break;
    }
    if (i > 32 || i >= n || b[i] != ' ') return 0;
    f[0] = 0, f[1] = i;
    int64_t t = ++i;
    while (i < n && b[i] != ' ' && b[i] != '\r' && b[i] != '\n') i++;
    if (i == t || i >= n || b[i] != ' ') return 0;
    f[2] = t, f[3] = i - t;
    int64_t v = ++i;
    if (n - v < 9 || memcmp(b + v, "HTTP/1.", 7) != 0 || (b[v + 7] != '0' && b[v + 7] != '1'))
        return 0;
    i = v + 8;
    if (b[i] == '\r') i++;
    if (i >= n || b[i] != '\n') return 0;
    f[4] = v, f[5] = 8;
    return 1;
}

/* The end of the line starting at i (the offset after its \r?\n), or -1 if it does not end
 * with \r?\n (a lone CR, or the end of the data). *e is where its text ends. */
static int64_t h1_line_end(const uint8_t *b, int64_t n, int64_t i, int64_t *e) {
    while (i < n && b[i] != '\r' && b[i] != '\n') i++;
    *e = i;
    if (i < n && b[i] == '\r') i++;
    if (i >= n || b[i] != '\n') return -1;
    return i + 1;
}

static inline int h1_lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* The Host header as (?i)^[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*?host[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?\n
 * finds it: the value's span in f, 1; else 0. */
static int h1_host(const uint8_t *b, int64_t n, int64_t *f) {
    int64_t e, i = h1_line_end(b, n, 0, &e);
    while (i >= 0 && i < n) {
        int64_t next = h1_line_end(b, n, i, &e);
        if (next < 0) return 0;
        if (e - i >= 4 && h1_lower(b[i]) == 'h' && h1_lower(b[i + 1]) == 'o' &&
            h1_lower(b[i + 2]) == 's' && h1_lower(b[i + 3]) == 't') {
            int64_t k = i + 4;
            while (k < e && (b[k] == ' ' || b[k] == '\t')) k++;
            if (k < e && b[k] == ':') {
                k++;
                while (k < e && (b[k] == ' ' || b[k] == '\t')) k++;
                int64_t end = e;
                while (end > k && (b[end - 1] == ' ' || b[end - 1] == '\t')) end--;
                f[0] = k, f[1] = end - k;
                return 1;
            }
        }
        if (e == i) return 0; /* the blank line that ends the headers */
        i = next;
    }
    return 0;
}

static const char h1_rbac[] = "RBAC: access denied";

/* http1_scan(offsets, data, c2s) -> (kind, status, spans)
 *
 * For every message-start packet i (a binary column: int32 offsets[i]..offsets[i + 1] into
 * data; c2s[i] 1 for the client's direction): kind 1 for a client request line, 2 for a
 * server's final status line (>= 200, or 101), 3 for a final 403 whose message contains
 * Envoy's "RBAC: access denied", else 0; status (int32) the status line's code (any
 * direction), -1 without one; spans eight int64 per row, offsets into data and lengths of
 * method, target, version and the Host value (-1 where absent; requests only). Exactly what
 * the regexes of observe/capture.py find (the tests compare both). */
static PyObject *http1_scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *off_o, *dat_o, *dir_o;
    if (!PyArg_ParseTuple(args, "OOO", &off_o, &dat_o, &dir_o)) return NULL;
    Buf ob = {0}, db = {0}, cb = {0};
    PyObject *kind_o = NULL, *st_o = NULL, *sp_o = NULL, *res = NULL;
    if (get_buf(off_o, &ob, 4, "offsets") < 0 || get_buf(dat_o, &db, 1, "data") < 0 ||
        get_buf(dir_o, &cb, 1, "c2s") < 0)
        goto done;
    Py_ssize_t n = cb.view.len;
    if (ob.view.len / 4 != n + 1) {
        PyErr_SetString(PyExc_ValueError, "http1_scan: offsets and c2s differ in length");
        goto done;
    }
    const int32_t *offs = ob.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (offs[i] < 0 || offs[i + 1] < offs[i] || offs[i + 1] > db.view.len) {
            PyErr_SetString(PyExc_IndexError, "http1_scan: offsets outside the data");
            goto done;
        }
    }
    uint8_t *kind;
    int32_t *status;
    int64_t *spans;
    if (!(kind_o = new_array(n, 1, (void **)&kind)) ||
        !(st_o = new_array(n, 4, (void **)&status)) ||
        !(sp_o = new_array(n * 8, 8, (void **)&spans)))
        goto done;
    const uint8_t *data = db.view.buf, *dir = cb.view.buf;
    Py_ssize_t rl = (Py_ssize_t)sizeof(h1_rbac) - 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *b = data + offs[i];
        int64_t len = offs[i + 1] - offs[i], base = offs[i], *f = spans + 8 * i;
        for (int k = 0; k < 8; k++) f[k] = -1;
        kind[i] = 0;
        status[i] = -1;
        if (len >= 12 && memcmp(b, "HTTP/1.", 7) == 0 && (b[7] == '0' || b[7] == '1') &&
            b[8] == ' ' && b[9] >= '0' && b[9] <= '9' && b[10] >= '0' && b[10] <= '9' &&
            b[11] >= '0' && b[11] <= '9')
            status[i] = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
        if (dir[i]) {
            if (h1_request(b, len, f)) {
                kind[i] = 1;
                for (int k = 0; k < 6; k += 2) f[k] += base;
                if (h1_host(b, len, f + 6)) f[6] += base;
                else f[6] = f[7] = -1;
            } else {
                for (int k = 0; k < 6; k++) f[k] = -1;
            }
        } else if (status[i] >= 200 || status[i] == 101) {
            kind[i] = 2;
            if (status[i] == 403 && len >= rl) {
                for (int64_t k = 0; k + rl <= len; k++) {
                    if (b[k] == 'R' && memcmp(b + k, h1_rbac, (size_t)rl) == 0) {
                        kind[i] = 3;
                        break;
                    }
                }
            }
        }
    }
    Py_END_ALLOW_THREADS
    res = Py_BuildValue("(OOO)", kind_o, st_o, sp_o);
done:
    Py_XDECREF(kind_o);
    Py_XDECREF(st_o);
    Py_XDECREF(sp_o);
    rel_buf(&ob);
    rel_buf(&db);
    rel_buf(&cb);
    return res;
}

static PyMethodDef methods[] = {
    {"ng_walk", ng_walk, METH_VARARGS, "ng_walk(buf, pos, n, big) -> (offsets, kinds, end)"},
    {"decode", decode, METH_VARARGS, "decode(buf, starts, caps, linktypes) -> (reason, columns)"},
    {"pcap_decode", pcap_decode, METH_VARARGS,
     "pcap_decode(buf, n, big, tmul, limit, linktype) -> (reason, columns, end, over)"},
    {"gather", gather, METH_VARARGS, "gather(buf, offsets, lengths) -> bytes"},
    {"starts_with", starts_with, METH_VARARGS,
     "starts_with(buf, offsets, lengths, tokens) -> bytearray mask"},
    {"hash_keys", hash_keys, METH_VARARGS, "hash_keys(buf, columns) -> bytearray"},
    {"mark_copies", mark_copies, METH_VARARGS,
     "mark_copies(keys, idents, ts, window, clock, ck, clast, cntx, cik, cif, cocc, scratch, "
     "kcap, icap, epoch) -> (mask, clock, ck, clast, cntx, cik, cif, cocc)"},
    {"http1_scan", http1_scan, METH_VARARGS,
     "http1_scan(offsets, data, c2s) -> (kind, status, spans)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pcapcut", "Compiled kernel of the packet capture reader.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pcapcut(void) { return PyModule_Create(&module); }
