/*
 * Compiled kernel for the vectorized Envoy TEXT parser (observe/envoy_format.py).
 *
 * cut(data, starts, ends, valid, pieces, kept) splits each line data[starts[i]:ends[i]] by the
 * format's plan exactly as envoy_format._fast_core does with numpy (same checks, same result),
 * and returns the kept fields of the good lines as Arrow string-array buffers (offsets, values,
 * validity with '-' as null), so Python wraps them without a copy. The per-line work runs
 * without the GIL, so parser threads use both cores.
 *
 * A line is good when it has exactly the plan's number of '"'; every piece starts with its
 * prefix and ends with its suffix; a piece of several fields holds exactly the spaces of its
 * literals plus one between each pair of fields; unquoted fields are non-empty.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_buffers.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *prefix;
    Py_ssize_t prefix_len;
    const char *suffix;
    Py_ssize_t suffix_len;
    int prefix_spaces;
    int suffix_spaces;
    int nfields;
    int quoted;
    int first_field; /* index of the piece's first field in format order */
} Piece;

static int count_spaces(const char *s, Py_ssize_t n) {
    int c = 0;
    for (Py_ssize_t i = 0; i < n; i++) c += s[i] == ' ';
    return c;
}


/* MAX_DIGITS: envoy_format.MAX_DIGITS (every such value fits an int64). */
#define MAX_DIGITS 18

static int is_digits_or_dash(const char *s, int64_t n) {
    if (n == 1 && s[0] == '-') return 1;
    if (n <= 0 || n > MAX_DIGITS) return 0;
    for (int64_t i = 0; i < n; i++)
        if ((unsigned char)(s[i] - '0') > 9) return 0;
    return 1;
}

static int two(const char *s) { return (s[0] - '0') * 10 + (s[1] - '0'); }

/* Envoy's default %START_TIME%, 2024-01-02T03:04:05.678Z: 1 when it has exactly that layout
 * and names a real instant (what Arrow's timestamp cast accepts: month 1-12, day within the
 * month, hour < 24, minute < 60, second < 60); 0 when it has the layout but no real instant;
 * -1 when the layout differs (Python then checks the value against ISO_TIME_PATTERN). */
static int default_time(const char *s, int64_t n) {
    static const char layout[] = "0000-00-00T00:00:00.000Z";
    if (n != 24) return -1;
    for (int i = 0; i < 24; i++) {
        if (layout[i] == '0') {
            if ((unsigned char)(s[i] - '0') > 9) return -1;
        } else if (s[i] != layout[i]) {
            return -1;
        }
    }
    int year = two(s) * 100 + two(s + 2), month = two(s + 5), day = two(s + 8);
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (month < 1 || month > 12 || day < 1) return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > days[month - 1] + (month == 2 && leap)) return 0;
    if (two(s + 11) > 23 || two(s + 14) > 59 || two(s + 17) > 59) return 0;
    return 1;
}

/* Split one line; on success fill bounds[2*f], bounds[2*f+1] for every field f (absolute byte
 * positions) and return 1, else 0. */
static int split_line(const char *data, int64_t s, int64_t e, const Piece *pieces, int npieces,
                      int64_t *quotes, int64_t *bounds) {
    const int nq = npieces - 1;
    int found = 0;
    const char *p = data + s;
    const char *end = data + e;
    while (p < end) {
        const char *q = memchr(p, '"', (size_t)(end - p));
        if (!q) break;
        if (found == nq) return 0; /* one quote too many */
        quotes[found++] = q - data;
        p = q + 1;
    }
    if (found != nq) return 0;
    for (int k = 0; k < npieces; k++) {
        const Piece *pc = &pieces[k];
        int64_t a = k == 0 ? s : quotes[k - 1] + 1;
        int64_t b = k == nq ? e : quotes[k];
        if (pc->nfields) {
            if (b - a < pc->prefix_len + pc->suffix_len) return 0;
        } else if (b - a != pc->prefix_len) {
            return 0;
        }
        if (pc->prefix_len && memcmp(data + a, pc->prefix, (size_t)pc->prefix_len)) return 0;
        if (pc->suffix_len && memcmp(data + b - pc->suffix_len, pc->suffix, (size_t)pc->suffix_len))
            return 0;
        int64_t a2 = a + pc->prefix_len, b2 = b - pc->suffix_len;
        if (pc->nfields == 1) {
            bounds[2 * pc->first_field] = a2;
            bounds[2 * pc->first_field + 1] = b2;
        } else if (pc->nfields > 1) {
            /* The piece's spaces: the literal ones first and last, nfields - 1 separators. */
            int want = pc->prefix_spaces + pc->suffix_spaces + pc->nfields - 1;
            int seen = 0;
            int64_t field_start = a2;
            int f = 0;
            const char *sp = data + a, *stop = data + b;
            while (sp < stop) {
                const char *hit = memchr(sp, ' ', (size_t)(stop - sp));
                if (!hit) break;
                int64_t j = hit - data;
                int sep = seen - pc->prefix_spaces; /* index among separators */
                seen++;
                if (seen > want) return 0;
                if (sep >= 0 && sep < pc->nfields - 1) {
                    bounds[2 * (pc->first_field + f)] = field_start;
                    bounds[2 * (pc->first_field + f) + 1] = j;
                    field_start = j + 1;
                    f++;
                }
                sp = hit + 1;
            }
            if (seen != want) return 0;
            bounds[2 * (pc->first_field + f)] = field_start;
            bounds[2 * (pc->first_field + f) + 1] = b2;
            /* A separator inside the prefix/suffix region means the counts only matched by
             * accident; the numpy path rejects such rows through the field bounds too. */
            if (field_start > b2) return 0;
        }
        if (!pc->quoted) {
            for (int f2 = 0; f2 < pc->nfields; f2++) {
                int g = pc->first_field + f2;
                if (bounds[2 * g + 1] <= bounds[2 * g]) return 0; /* Envoy writes '-', never "" */
            }
        }
    }
    return 1;
}


#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define MAX_SPACES 512

/* Positions of '"' (up to max_quotes + 1 of them) and ' ' (up to MAX_SPACES) in [s, e).
 * Returns the number of quotes, or -1 when the spaces overflow (the caller then falls back
 * to split_line). */
static int scan_line(const char *data, int64_t s, int64_t e, int64_t *quotes, int max_quotes,
                     int64_t *spaces, int *nspaces) {
    int nq = 0, ns = 0;
    int64_t i = s;
#if defined(__SSE2__)
    const __m128i qv = _mm_set1_epi8('"'), sv = _mm_set1_epi8(' ');
    for (; i + 16 <= e; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(data + i));
        unsigned mq = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, qv));
        unsigned ms = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, sv));
        while (mq) {
            if (nq > max_quotes) return nq;
            quotes[nq++] = i + __builtin_ctz(mq);
            mq &= mq - 1;
        }
        while (ms) {
            if (ns == MAX_SPACES) return -1;
            spaces[ns++] = i + __builtin_ctz(ms);
            ms &= ms - 1;
        }
    }
#endif
    for (; i < e; i++) {
        if (data[i] == '"') {
            if (nq > max_quotes) return nq;
            quotes[nq++] = i;
        } else if (data[i] == ' ') {
            if (ns == MAX_SPACES) return -1;
            spaces[ns++] = i;
        }
    }
    *nspaces = ns;
    return nq;
}

/* split_line on a line already scanned by scan_line. */
static int split_scanned(const char *data, int64_t s, int64_t e, const Piece *pieces,
                         int npieces, const int64_t *quotes, const int64_t *spaces, int nspaces,
                         int64_t *bounds) {
    const int nq = npieces - 1;
    int si = 0; /* first space not before the current piece */
    for (int k = 0; k < npieces; k++) {
        const Piece *pc = &pieces[k];
        int64_t a = k == 0 ? s : quotes[k - 1] + 1;
        int64_t b = k == nq ? e : quotes[k];
        if (pc->nfields) {
            if (b - a < pc->prefix_len + pc->suffix_len) return 0;
        } else if (b - a != pc->prefix_len) {
            return 0;
        }
        if (pc->prefix_len && memcmp(data + a, pc->prefix, (size_t)pc->prefix_len)) return 0;
        if (pc->suffix_len && memcmp(data + b - pc->suffix_len, pc->suffix, (size_t)pc->suffix_len))
            return 0;
        int64_t a2 = a + pc->prefix_len, b2 = b - pc->suffix_len;
        while (si < nspaces && spaces[si] < a) si++;
        int s0 = si; /* the piece's spaces: s0 .. s1 - 1 */
        while (si < nspaces && spaces[si] < b) si++;
        if (pc->nfields == 1) {
            bounds[2 * pc->first_field] = a2;
            bounds[2 * pc->first_field + 1] = b2;
        } else if (pc->nfields > 1) {
            if (si - s0 != pc->prefix_spaces + pc->suffix_spaces + pc->nfields - 1) return 0;
            const int64_t *sep = spaces + s0 + pc->prefix_spaces;
            int64_t field_start = a2;
            for (int f = 0; f < pc->nfields - 1; f++) {
                bounds[2 * (pc->first_field + f)] = field_start;
                bounds[2 * (pc->first_field + f) + 1] = sep[f];
                field_start = sep[f] + 1;
            }
            bounds[2 * (pc->first_field + pc->nfields - 1)] = field_start;
            bounds[2 * (pc->first_field + pc->nfields - 1) + 1] = b2;
            if (field_start > b2) return 0;
        }
        if (!pc->quoted) {
            for (int f2 = 0; f2 < pc->nfields; f2++) {
                int g = pc->first_field + f2;
                if (bounds[2 * g + 1] <= bounds[2 * g]) return 0; /* Envoy writes '-', never "" */
            }
        }
    }
    return 1;
}

/* One output column while it is filled. */
typedef struct {
    int32_t *offsets;
    char *values;
    unsigned char *bits;
    int64_t len, cap;
    Py_ssize_t nulls;
} Column;

static PyObject *cut(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data_o, *starts_o, *ends_o, *valid_o, *pieces_o, *kept_o, *numeric_o;
    int time_field;
    if (!PyArg_ParseTuple(args, "OOOOOOOi", &data_o, &starts_o, &ends_o, &valid_o, &pieces_o,
                          &kept_o, &numeric_o, &time_field))
        return NULL;
    Buf data = {0}, starts = {0}, ends = {0}, valid = {0};
    Piece *pieces = NULL;
    int *kept = NULL;
    unsigned char *good = NULL;
    int *numeric = NULL;
    int nnumeric = 0;
    Py_ssize_t odd_times = 0;
    PyObject *result = NULL, *good_o = NULL, *cols = NULL;
    Column *cols_mem = NULL;
    int nkept = 0;

    if (get_buf(data_o, &data, 1, "data") < 0 || get_buf(starts_o, &starts, 8, "starts") < 0 ||
        get_buf(ends_o, &ends, 8, "ends") < 0)
        goto done;
    Py_ssize_t n = starts.view.len / 8;
    if (ends.view.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "starts and ends differ in length");
        goto done;
    }
    if (valid_o != Py_None) {
        if (get_buf(valid_o, &valid, 1, "valid") < 0) goto done;
        if (valid.view.len != n) {
            PyErr_SetString(PyExc_ValueError, "valid has the wrong length");
            goto done;
        }
    }
    if (!PyTuple_Check(pieces_o) || !PyTuple_Check(kept_o)) {
        PyErr_SetString(PyExc_TypeError, "pieces and kept must be tuples");
        goto done;
    }
    int npieces = (int)PyTuple_GET_SIZE(pieces_o);
    if (npieces < 1) {
        PyErr_SetString(PyExc_ValueError, "a plan has at least one piece");
        goto done;
    }
    pieces = calloc((size_t)npieces, sizeof(Piece));
    if (!pieces) { PyErr_NoMemory(); goto done; }
    int nfields = 0;
    for (int k = 0; k < npieces; k++) {
        PyObject *t = PyTuple_GET_ITEM(pieces_o, k);
        PyObject *pre, *suf;
        int nf, quoted;
        if (!PyArg_ParseTuple(t, "SSii", &pre, &suf, &nf, &quoted)) goto done;
        pieces[k].prefix = PyBytes_AS_STRING(pre);
        pieces[k].prefix_len = PyBytes_GET_SIZE(pre);
        pieces[k].suffix = PyBytes_AS_STRING(suf);
        pieces[k].suffix_len = PyBytes_GET_SIZE(suf);
        pieces[k].prefix_spaces = count_spaces(pieces[k].prefix, pieces[k].prefix_len);
        pieces[k].suffix_spaces = count_spaces(pieces[k].suffix, pieces[k].suffix_len);
        pieces[k].nfields = nf;
        pieces[k].quoted = quoted;
        pieces[k].first_field = nfields;
        nfields += nf;
    }
    nkept = (int)PyTuple_GET_SIZE(kept_o);
    kept = calloc((size_t)(nkept ? nkept : 1), sizeof(int));
    if (!kept) { PyErr_NoMemory(); goto done; }
    for (int j = 0; j < nkept; j++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(kept_o, j));
        if (v == -1 && PyErr_Occurred()) goto done;
        if (v < 0 || v >= nfields) {
            PyErr_SetString(PyExc_ValueError, "kept field index out of range");
            goto done;
        }
        kept[j] = (int)v;
    }

    if (!PyTuple_Check(numeric_o)) {
        PyErr_SetString(PyExc_TypeError, "numeric must be a tuple");
        goto done;
    }
    nnumeric = (int)PyTuple_GET_SIZE(numeric_o);
    numeric = calloc((size_t)(nnumeric ? nnumeric : 1), sizeof(int));
    if (!numeric) { PyErr_NoMemory(); goto done; }
    for (int j = 0; j < nnumeric; j++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(numeric_o, j));
        if (v == -1 && PyErr_Occurred()) goto done;
        if (v < 0 || v >= nfields) {
            PyErr_SetString(PyExc_ValueError, "numeric field index out of range");
            goto done;
        }
        numeric[j] = (int)v;
    }
    if (time_field >= nfields) {
        PyErr_SetString(PyExc_ValueError, "time field index out of range");
        goto done;
    }
    const char *buf = data.view.buf;
    const int64_t *st = starts.view.buf, *en = ends.view.buf;
    const unsigned char *va = valid.held ? valid.view.buf : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (st[i] < 0 || en[i] < st[i] || en[i] > data.view.len) {
            PyErr_SetString(PyExc_ValueError, "line range outside the data");
            goto done;
        }
    }
    good_o = PyBytes_FromStringAndSize(NULL, n);
    if (!good_o) goto done;
    good = (unsigned char *)PyBytes_AS_STRING(good_o);
    int nk = nkept ? nkept : 1;
    int64_t *line_bounds = malloc(sizeof(int64_t) * 2 * (size_t)(nfields ? nfields : 1));
    /* One more than a good line has: scan_line stops once it sees too many. */
    int64_t *quotes = malloc(sizeof(int64_t) * (size_t)(npieces + 1));
    int64_t spaces[MAX_SPACES];
    cols_mem = calloc((size_t)nk, sizeof(Column));
    if (!line_bounds || !quotes || !cols_mem) {
        free(line_bounds);
        free(quotes);
        PyErr_NoMemory();
        goto done;
    }
    /* One pass, row by row: each line is read once while in cache and every column's output
     * grows sequentially. Value buffers start at an even share of the input and double. */
    int64_t share = data.view.len / nk + 64;
    int alloc_failed = 0;
    for (int j = 0; j < nkept; j++) {
        cols_mem[j].offsets = malloc(sizeof(int32_t) * (size_t)(n + 1));
        cols_mem[j].bits = calloc((size_t)(n + 7) / 8 + 1, 1);
        cols_mem[j].cap = share;
        cols_mem[j].values = malloc((size_t)share);
        if (!cols_mem[j].offsets || !cols_mem[j].bits || !cols_mem[j].values) alloc_failed = 1;
    }
    if (alloc_failed) {
        free(line_bounds);
        free(quotes);
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t m = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !alloc_failed; i++) {
        int ok = 0;
        if (!va || va[i]) {
            int nsp = 0;
            int nq = scan_line(buf, st[i], en[i], quotes, npieces - 1, spaces, &nsp);
            if (nq < 0)
                ok = split_line(buf, st[i], en[i], pieces, npieces, quotes, line_bounds);
            else
                ok = nq == npieces - 1 && split_scanned(buf, st[i], en[i], pieces, npieces,
                                                       quotes, spaces, nsp, line_bounds);
        }
        for (int j = 0; ok && j < nnumeric; j++) {
            int64_t a = line_bounds[2 * numeric[j]], b = line_bounds[2 * numeric[j] + 1];
            ok = is_digits_or_dash(buf + a, b - a);
        }
        if (ok && time_field >= 0) {
            int64_t a = line_bounds[2 * time_field], b = line_bounds[2 * time_field + 1];
            int t = default_time(buf + a, b - a);
            if (t == 0) ok = 0;
            else if (t < 0) odd_times++;
        }
        good[i] = (unsigned char)ok;
        if (!ok) continue;
        for (int j = 0; j < nkept; j++) {
            Column *c = &cols_mem[j];
            int64_t a = line_bounds[2 * kept[j]], b = line_bounds[2 * kept[j] + 1];
            c->offsets[m] = (int32_t)c->len;
            if (b - a == 1 && buf[a] == '-') { /* Envoy's "no value": null, bit stays 0 */
                c->nulls++;
                continue;
            }
            c->bits[m >> 3] |= (unsigned char)(1u << (m & 7));
            if (c->len + (b - a) > c->cap) {
                int64_t cap = c->cap * 2 + (b - a);
                char *grown = realloc(c->values, (size_t)cap);
                if (!grown) { alloc_failed = 1; break; }
                c->values = grown;
                c->cap = cap;
            }
            memcpy(c->values + c->len, buf + a, (size_t)(b - a));
            c->len += b - a;
        }
        m++;
    }
    Py_END_ALLOW_THREADS
    free(line_bounds);
    free(quotes);
    if (alloc_failed) {
        PyErr_NoMemory();
        goto done;
    }
    cols = PyList_New(nkept);
    if (!cols) goto done;
    for (int j = 0; j < nkept; j++) {
        Column *c = &cols_mem[j];
        if (c->len > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "a column exceeds 2 GiB; use smaller chunks");
            goto done;
        }
        c->offsets[m] = (int32_t)c->len;
        PyObject *offs = PyBytes_FromStringAndSize((const char *)c->offsets, 4 * (m + 1));
        PyObject *vals = PyBytes_FromStringAndSize(c->values, c->len);
        PyObject *bits = c->nulls ? PyBytes_FromStringAndSize((const char *)c->bits,
                                                              (m + 7) / 8)
                                  : (Py_INCREF(Py_None), Py_None);
        PyObject *item = (offs && vals && bits) ? Py_BuildValue("(NNNn)", offs, vals, bits,
                                                                 c->nulls) : NULL;
        if (!item) {
            if (!offs || !vals || !bits) {
                Py_XDECREF(offs);
                Py_XDECREF(vals);
                Py_XDECREF(bits);
            }
            goto done;
        }
        PyList_SET_ITEM(cols, j, item);
    }
    result = Py_BuildValue("(OOnn)", good_o, cols, m, odd_times);

done:
    Py_XDECREF(good_o);
    Py_XDECREF(cols);
    free(pieces);
    free(kept);
    free(numeric);
    if (cols_mem) {
        for (int j = 0; j < nkept; j++) {
            free(cols_mem[j].offsets);
            free(cols_mem[j].values);
            free(cols_mem[j].bits);
        }
        free(cols_mem);
    }
    rel_buf(&data);
    rel_buf(&starts);
    rel_buf(&ends);
    rel_buf(&valid);
    return result;
}


static PyObject *newlines(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data_o, *out_o;
    if (!PyArg_ParseTuple(args, "OO", &data_o, &out_o)) return NULL;
    Buf data = {0}, out = {0};
    PyObject *result = NULL;
    if (get_buf(data_o, &data, 1, "data") < 0) goto done;
    if (PyObject_GetBuffer(out_o, &out.view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    out.held = 1;
    Py_ssize_t cap = out.view.len / 8, count = 0;
    const char *p = data.view.buf, *end = p + data.view.len;
    int64_t *o = out.view.buf;
    Py_BEGIN_ALLOW_THREADS
    while (p < end && count < cap) {
        const char *hit = memchr(p, '\n', (size_t)(end - p));
        if (!hit) break;
        o[count++] = hit - (const char *)data.view.buf;
        p = hit + 1;
    }
    Py_END_ALLOW_THREADS
    if (count == cap && p < end && memchr(p, '\n', (size_t)(end - p))) {
        PyErr_SetString(PyExc_ValueError, "out is too small for the newlines of data");
        goto done;
    }
    result = PyLong_FromSsize_t(count);
done:
    rel_buf(&data);
    rel_buf(&out);
    return result;
}

/* "ip:port" of one address as Istio's logs print it (10.0.0.1:80, [fd00::1]:80, or without a
 * port): ip_end (end of the IP text), ip_start, port (-1 if none). 0 if the value is no
 * address of that shape, -1 if it may be one with a scheme prefix ("tcp://..."). */
static int parse_address(const char *v, int64_t n, int64_t *ip_start, int64_t *ip_end,
                         int32_t *port) {
    int64_t i = 0, after;
    if (n > 0 && v[0] == '[') {
        i = 1;
        while (i < n && v[i] != ']') {
            char c = v[i];
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
                  c == ':' || c == '.'))
                goto other;
            i++;
        }
        if (i >= n || i == 1) goto other;
        *ip_start = 1;
        *ip_end = i;
        after = i + 1;
    } else {
        for (int part = 0; part < 4; part++) {
            int digits = 0;
            while (i < n && v[i] >= '0' && v[i] <= '9' && digits < 4) { i++; digits++; }
            if (digits < 1 || digits > 3) goto other;
            if (part < 3) {
                if (i >= n || v[i] != '.') goto other;
                i++;
            }
        }
        *ip_start = 0;
        *ip_end = i;
        after = i;
    }
    if (after == n) {
        *port = -1;
        return 1;
    }
    if (v[after] != ':' || n - after - 1 < 1 || n - after - 1 > 5) goto other;
    int32_t p = 0;
    for (int64_t j = after + 1; j < n; j++) {
        if (v[j] < '0' || v[j] > '9') goto other;
        p = p * 10 + (v[j] - '0');
    }
    *port = p;
    return 1;
other:
    for (int64_t j = 0; j + 2 < n; j++)
        if (v[j] == ':' && v[j + 1] == '/' && v[j + 2] == '/') return -1;
    return 0;
}

static PyObject *addresses(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *offs_o, *data_o, *valid_o;
    Py_ssize_t n, offset;
    if (!PyArg_ParseTuple(args, "OOOnn", &offs_o, &data_o, &valid_o, &n, &offset)) return NULL;
    Buf offs = {0}, data = {0}, valid = {0};
    PyObject *result = NULL, *ip_offs = NULL, *ip_vals = NULL, *ip_bits = NULL, *ports = NULL,
             *port_bits = NULL;
    if (get_buf(offs_o, &offs, 4, "offsets") < 0 || get_buf(data_o, &data, 1, "data") < 0)
        goto done;
    if (valid_o != Py_None && get_buf(valid_o, &valid, 1, "validity") < 0) goto done;
    if (n < 0 || offset < 0 || (offset + n + 1) * 4 > offs.view.len ||
        (valid.held && (offset + n + 7) / 8 > valid.view.len)) {
        PyErr_SetString(PyExc_ValueError, "buffers too short for the array");
        goto done;
    }
    const int32_t *o = (const int32_t *)offs.view.buf + offset;
    const unsigned char *vb = valid.held ? valid.view.buf : NULL;
    const char *d = data.view.buf;
    if (n && (o[0] < 0 || o[n] > data.view.len)) {
        PyErr_SetString(PyExc_ValueError, "offsets outside the data");
        goto done;
    }
    ip_offs = PyBytes_FromStringAndSize(NULL, 4 * (n + 1));
    ip_vals = PyBytes_FromStringAndSize(NULL, n ? o[n] - o[0] : 0);
    ip_bits = PyBytes_FromStringAndSize(NULL, (n + 7) / 8);
    ports = PyBytes_FromStringAndSize(NULL, 4 * n);
    port_bits = PyBytes_FromStringAndSize(NULL, (n + 7) / 8);
    if (!ip_offs || !ip_vals || !ip_bits || !ports || !port_bits) goto done;
    int32_t *io = (int32_t *)PyBytes_AS_STRING(ip_offs);
    char *iv = PyBytes_AS_STRING(ip_vals);
    unsigned char *ib = (unsigned char *)PyBytes_AS_STRING(ip_bits);
    int32_t *pv = (int32_t *)PyBytes_AS_STRING(ports);
    unsigned char *pb = (unsigned char *)PyBytes_AS_STRING(port_bits);
    memset(ib, 0, (size_t)(n + 7) / 8);
    memset(pb, 0, (size_t)(n + 7) / 8);
    Py_ssize_t ip_nulls = 0, port_nulls = 0;
    int other = 0;
    int32_t pos = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n; r++) {
        io[r] = pos;
        pv[r] = 0;
        int64_t a = 0, b = 0;
        int32_t port = -1;
        int ok = 0;
        if (!vb || (vb[(r + offset) >> 3] >> ((r + offset) & 7)) & 1) {
            ok = parse_address(d + o[r], o[r + 1] - o[r], &a, &b, &port);
            if (ok < 0) { other = 1; break; }
        }
        if (!ok) {
            ip_nulls++;
            port_nulls++;
            continue;
        }
        memcpy(iv + pos, d + o[r] + a, (size_t)(b - a));
        pos += (int32_t)(b - a);
        ib[r >> 3] |= (unsigned char)(1u << (r & 7));
        if (port < 0) {
            port_nulls++;
        } else {
            pv[r] = port;
            pb[r >> 3] |= (unsigned char)(1u << (r & 7));
        }
    }
    io[n] = pos;
    Py_END_ALLOW_THREADS
    if (other) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (_PyBytes_Resize(&ip_vals, pos) < 0) goto done;
    result = Py_BuildValue("(OOOnOOn)", ip_offs, ip_vals, ip_bits, ip_nulls, ports, port_bits,
                           port_nulls);
done:
    Py_XDECREF(ip_offs);
    Py_XDECREF(ip_vals);
    Py_XDECREF(ip_bits);
    Py_XDECREF(ports);
    Py_XDECREF(port_bits);
    rel_buf(&offs);
    rel_buf(&data);
    rel_buf(&valid);
    return result;
}

static int is_digit(char c) { return (unsigned char)(c - '0') <= 9; }

/* layouts.classify_raw: 1 where a line starts like Envoy TEXT ("[YYYY-MM-DDT"), else 0; -1
 * when some line may carry a kubectl prefix ("YYYY-", "[pod/") or be JSON (its first byte
 * '{' or white space): those chunks take the StringArray path. */
static PyObject *classify_heads(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data_o, *starts_o, *ends_o;
    if (!PyArg_ParseTuple(args, "OOO", &data_o, &starts_o, &ends_o)) return NULL;
    Buf data = {0}, starts = {0}, ends = {0};
    PyObject *result = NULL, *mask = NULL;
    if (get_buf(data_o, &data, 1, "data") < 0 || get_buf(starts_o, &starts, 8, "starts") < 0 ||
        get_buf(ends_o, &ends, 8, "ends") < 0)
        goto done;
    Py_ssize_t n = starts.view.len / 8;
    if (ends.view.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "starts and ends differ in length");
        goto done;
    }
    const char *d = data.view.buf;
    const int64_t *st = starts.view.buf, *en = ends.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (st[i] < 0 || en[i] < st[i] || en[i] > data.view.len) {
            PyErr_SetString(PyExc_ValueError, "line range outside the data");
            goto done;
        }
    }
    mask = PyBytes_FromStringAndSize(NULL, n);
    if (!mask) goto done;
    unsigned char *m = (unsigned char *)PyBytes_AS_STRING(mask);
    int other = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *l = d + st[i];
        int64_t len = en[i] - st[i];
        if (len >= 5 && ((is_digit(l[0]) && is_digit(l[1]) && is_digit(l[2]) && is_digit(l[3]) &&
                          l[4] == '-') || memcmp(l, "[pod/", 5) == 0)) {
            other = 1;
            break;
        }
        if (len > 0 && (l[0] == '{' || l[0] == ' ' || l[0] == '\t' || l[0] == '\r' ||
                        l[0] == '\n' || l[0] == '\v' || l[0] == '\f')) {
            other = 1;
            break;
        }
        m[i] = len >= 12 && l[0] == '[' && is_digit(l[1]) && is_digit(l[2]) && is_digit(l[3]) &&
               is_digit(l[4]) && l[5] == '-' && is_digit(l[6]) && is_digit(l[7]) && l[8] == '-' &&
               is_digit(l[9]) && is_digit(l[10]) && l[11] == 'T';
    }
    Py_END_ALLOW_THREADS
    if (other) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = mask;
        mask = NULL;
    }
done:
    Py_XDECREF(mask);
    rel_buf(&data);
    rel_buf(&starts);
    rel_buf(&ends);
    return result;
}

static PyMethodDef methods[] = {
    {"cut", cut, METH_VARARGS,
     "cut(data, starts, ends, valid, pieces, kept, numeric, time_field)\n"
     "    -> (good, columns, rows, odd_times)\n\n"
     "Split lines data[starts[i]:ends[i]] by a TEXT format plan; see envoy_format.py."},
    {"addresses", addresses, METH_VARARGS,
     "addresses(offsets, data, validity, n, offset) -> (ip buffers.., port buffers..) or None\n\n"
     "Split Istio 'ip:port' values; None when some value needs the regex (a scheme prefix)."},
    {"classify_heads", classify_heads, METH_VARARGS,
     "classify_heads(data, starts, ends) -> bytes mask or None; see layouts.classify_raw."},
    {"newlines", newlines, METH_VARARGS,
     "newlines(data, out) -> count: positions of b'\\n' in data written to int64 out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_textcut", "Compiled kernel of the Envoy TEXT parser.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__textcut(void) { return PyModule_Create(&module); }
