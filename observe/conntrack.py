"""TCP connections and UDP flows from decoded packet batches (:mod:`observe.pcap`).

Packets are keyed by their 5-tuple with the endpoints in a canonical order (A = the smaller
(address, port)); each batch is sorted by (key, frame) once and aggregated per connection
with numpy (``bincount`` over a connection slot index). Python runs once per connection per
batch (a dict lookup), and a short loop per connection only where a pure SYN or a long
silence may split it; there is no per-packet Python: payload bytes that may still land in a
direction's first ``head_bytes`` and HTTP/1 message starts are found and copied in one
gather per batch (in C with the compiled kernel ``observe/_pcapcut.c``, else numpy).

Rules (what a row is, how a side is the client):

- **Splitting**: a pure SYN (SYN without ACK/RST) whose sequence number differs from the
  opening SYN of the current connection on the same 5-tuple starts a new connection (port
  reuse; a retransmitted SYN has the same sequence number and does not split). A silence
  longer than ``idle_timeout_s`` also starts a new row; the old one ends with ``timeout``.
- **Client**: the sender of the first pure SYN; else the receiver of the first SYN-ACK;
  else (no handshake captured) for TCP the side with the *higher* port number (servers
  listen on the lower, often well-known, port; ephemeral ports are high), the first
  packet's sender on equal ports; for UDP the sender of the first datagram.
- **state**: ``established`` (TCP: SYN answered by SYN-ACK; UDP: datagrams both ways),
  ``refused`` (SYN answered by RST, no SYN-ACK), ``no-answer`` (SYN(s), or UDP datagrams,
  with nothing back), ``midstream`` (TCP without a captured SYN: the capture started inside
  the connection, or the SYN was lost).
- **ended**: ``rst`` (a RST seen), ``fin`` (a FIN seen), ``timeout`` (split or flushed
  after ``idle_timeout_s`` without packets), ``open`` (still live at :meth:`finish`).
- **Heads**: ``client_head``/``server_head`` hold each direction's first ``head_bytes`` of
  TCP payload reassembled in sequence order from the initial sequence number (SYN + 1; the
  lowest sequence seen when the SYN is missing), up to the first gap. Retransmissions and
  overlaps: the segment starting earliest wins, equal starts keep the first captured. UDP:
  the first datagram each way.
- **HTTP/1 messages**: every TCP packet whose payload starts with an HTTP/1 request method
  and a space, or with ``HTTP/1.``, gives a row of the ``http`` table (first 2 KiB), so each
  request of a keep-alive connection is seen, not only the first.
- **ISNs**: ``client_isn`` is the sequence number of the client's SYN, or, when only the
  SYN-ACK was captured, its acknowledgement number minus one (the same value);
  ``server_isn`` the sequence number of the server's SYN-ACK; null when not captured (and
  for UDP). A TCP connection captured on two nodes (the client's and the server's) has the
  same 5-tuple and ``client_isn`` in both captures, while a reused 5-tuple gets a new ISN:
  the pair identifies the connection across captures.
- **Copies**: the reader drops other interfaces' copies of a packet before they reach the
  tracker (:class:`observe.pcap.CopyFilter`); a tracker fed batches with copies would count
  them as retransmissions and record an HTTP message once per copy.
- IP fragments: the first fragment carries the ports and counts as the datagram's packet
  (with its own frame length); later fragments are not part of any row (the reader counts
  them).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import pyarrow as pa

from observe import pcap as _pcap
from observe.compiled import pcapcut
from observe.pcap import ACK, FIN, RST, SYN, TUNNEL_NAMES, PacketBatch, addr_text

#: Bytes of each HTTP/1 message start kept in the ``http`` table.
HTTP_HEAD = 2048
#: Default ``head_bytes``: payload kept per direction of a connection, reassembled. 4 KiB
#: holds a TLS ClientHello (typically 250-600 bytes; 1.5-2 KiB with post-quantum key shares)
#: and a ServerHello (its certificate, which follows, is cut), an HTTP/1 request line with
#: its headers, and an HTTP/2 preface with the first HEADERS frames. What it loses: request
#: headers or HTTP/2 HEADERS beyond the first 4 KiB (e.g. big cookies or JWTs), and
#: certificates. Each extra KiB costs up to 2 KiB of memory per live connection.
HEAD_BYTES = 4096
_HTTP_TOKENS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"CONNECT ", b"TRACE ", b"HTTP/1.")
_U32 = 1 << 32


def _starts_with(buf: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                 tokens: tuple[bytes, ...]) -> np.ndarray:
    """Mask: ``buf[offs[k]: offs[k] + lens[k]]`` starts with one of ``tokens`` (each at most
    8 bytes; ``buf`` has at least 8 bytes after every offset, as a reader batch does)."""
    if pcapcut is not None and _pcap.USE_KERNEL:
        return np.frombuffer(pcapcut.starts_with(buf, np.ascontiguousarray(offs, np.int64),
                                                  np.ascontiguousarray(lens, np.int64),
                                                  tokens), dtype=bool)
    # The first 8 bytes as one big-endian number; a token of n bytes is its top n bytes.
    head = np.zeros(offs.size, dtype=np.uint64)
    for i in range(8):
        head = (head << np.uint64(8)) | buf[offs + i].astype(np.uint64)
    hit = np.zeros(offs.size, dtype=bool)
    for tok in tokens:
        shift = np.uint64(64 - 8 * len(tok))
        hit |= ((head >> shift) == np.uint64(int.from_bytes(tok, "big"))) & (lens >= len(tok))
    return hit

STATE_ESTABLISHED = "established"
STATE_REFUSED = "refused"
STATE_NO_ANSWER = "no-answer"
STATE_MIDSTREAM = "midstream"
_STATES = (STATE_ESTABLISHED, STATE_REFUSED, STATE_NO_ANSWER, STATE_MIDSTREAM)
_ENDED = ("rst", "fin", "timeout", "open")

CONNECTION_SCHEMA = pa.schema([
    pa.field("conn_id", pa.int64(), metadata={"doc": "Row id, unique within a tracker"}),
    pa.field("transport", pa.string(), metadata={"doc": "tcp or udp"}),
    pa.field("ip_version", pa.int8(), metadata={"doc": "4 or 6"}),
    pa.field("client_ip", pa.string(), metadata={"doc": "Client address (see rules)"}),
    pa.field("client_port", pa.int32()),
    pa.field("server_ip", pa.string()),
    pa.field("server_port", pa.int32()),
    pa.field("client_by", pa.string(),
             metadata={"doc": "How the client was chosen: syn, syn-ack, port, first-packet"}),
    pa.field("tunnel", pa.string(), metadata={"doc": "Overlay of the first packet, '' none"}),
    pa.field("first_ts_ns", pa.int64(), metadata={"doc": "First packet, ns since epoch"}),
    pa.field("last_ts_ns", pa.int64(), metadata={"doc": "Last packet, ns since epoch"}),
    pa.field("first_frame", pa.int64(), metadata={"doc": "Frame number of the first packet"}),
    pa.field("packets_c2s", pa.int64()),
    pa.field("packets_s2c", pa.int64()),
    pa.field("bytes_c2s", pa.int64(), metadata={"doc": "Sum of frame lengths (tshark Bytes)"}),
    pa.field("bytes_s2c", pa.int64()),
    pa.field("payload_c2s", pa.int64(), metadata={"doc": "Sum of L4 payload lengths"}),
    pa.field("payload_s2c", pa.int64()),
    pa.field("handshake", pa.bool_(), metadata={"doc": "SYN and SYN-ACK both captured"}),
    pa.field("syn_count", pa.int32(), metadata={"doc": "Pure SYNs from the client"}),
    pa.field("state", pa.string(),
             metadata={"doc": "established, refused, no-answer, midstream"}),
    pa.field("ended", pa.string(), metadata={"doc": "fin, rst, timeout, open"}),
    pa.field("client_head", pa.binary(), metadata={"doc": "First payload bytes c->s"}),
    pa.field("server_head", pa.binary(), metadata={"doc": "First payload bytes s->c"}),
    pa.field("client_isn", pa.int64(),
             metadata={"doc": "Sequence number of the client's SYN (from the SYN-ACK's ack "
                              "when only that was captured); null without one"}),
    pa.field("server_isn", pa.int64(),
             metadata={"doc": "Sequence number of the server's SYN-ACK; null without one"}),
])

HTTP_SCHEMA = pa.schema([
    pa.field("conn_id", pa.int64()),
    pa.field("frame", pa.int64()),
    pa.field("ts_ns", pa.int64()),
    pa.field("direction", pa.string(), metadata={"doc": "c2s (request side) or s2c"}),
    pa.field("data", pa.binary(), metadata={"doc": "First 2 KiB of the packet's payload"}),
])


@dataclass
class TrackerOutput:
    """Connections (``CONNECTION_SCHEMA``) and HTTP/1 message starts (``HTTP_SCHEMA``)."""

    connections: pa.Table
    http: pa.Table


#: Payload segments of one direction, one entry per batch in capture order: (relative
#: sequence numbers, lengths, the segments' bytes concatenated).
_Segments = list[tuple[np.ndarray, np.ndarray, bytes]]


_INT_FIELDS = ("proto", "a_port", "b_port", "conn_id", "first_ts", "last_ts", "first_frame",
               "syn_seq", "synack_ack", "first_dir", "syn_dir", "synack_dir", "ver", "tunnel",
               "timeout")
_PAIR_FIELDS = ("pkts", "bytes", "pay", "syn", "synack", "fin", "rst", "isn")
#: A fresh slot: 0 except "no SYN/SYN-ACK seen yet" (-1) and unknown initial sequences.
_INT_INIT = np.array([-1 if k in ("syn_seq", "syn_dir", "synack_dir", "synack_ack") else 0
                      for k in _INT_FIELDS], dtype=np.int64)
_PAIR_INIT = np.array([[-1, -1] if k == "isn" else [0, 0] for k in _PAIR_FIELDS],
                      dtype=np.int64)
_I_CONN_ID = _INT_FIELDS.index("conn_id")
#: Fields a new connection sets from its first packet, in ConnectionTracker._new's order.
_I_NEW = np.array([_INT_FIELDS.index(k) for k in (
    "first_ts", "last_ts", "first_frame", "first_dir", "ver", "tunnel", "proto", "syn_seq",
    "a_port", "b_port")], dtype=np.intp)


def _gather(batch: PacketBatch, rows: np.ndarray, lim: np.ndarray
            ) -> tuple[bytes, np.ndarray]:
    """The first ``lim[k]`` payload bytes of each row, concatenated, and the k-th's bounds."""
    lim = np.maximum(lim, 0).astype(np.int64)
    return _slices(batch.buf, batch.payload_off[rows], lim)


def _slices(buf: np.ndarray | bytes, offs: np.ndarray, lens: np.ndarray
            ) -> tuple[bytes, np.ndarray]:
    """``buf[offs[k]: offs[k] + lens[k]]`` for every k, concatenated, and the k-th's bounds
    (in C when the kernel is built, else one numpy fancy index; never a loop per slice)."""
    bounds = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=bounds[1:])
    total = int(bounds[-1])
    if total == 0:
        return b"", bounds
    if pcapcut is not None and _pcap.USE_KERNEL:
        return pcapcut.gather(buf, np.ascontiguousarray(offs, dtype=np.int64),
                              np.ascontiguousarray(lens, dtype=np.int64)), bounds
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    idx = np.repeat(np.asarray(offs, dtype=np.int64) - bounds[:-1], lens) + np.arange(total)
    return arr[idx].tobytes(), bounds


# Arrow arrays are built from buffers: pa.array imports pandas (~0.2 s) and Array.take
# imports pyarrow.compute (~0.1 s), both more than the tracker's own work on a small file.


def _arrow(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A numeric Arrow array over a numpy array."""
    np_type = {pa.int64(): np.int64, pa.int32(): np.int32, pa.int8(): np.int8}[typ]
    data = np.ascontiguousarray(values, dtype=np_type)
    return pa.Array.from_buffers(typ, data.size, [None, pa.py_buffer(data)])


def _nullable(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """An int64 Arrow array, null where ``valid`` is False."""
    data = np.ascontiguousarray(np.where(valid, values, 0), dtype=np.int64)
    nulls = int(valid.size - np.count_nonzero(valid))
    bits = (pa.py_buffer(np.packbits(np.asarray(valid, dtype=bool), bitorder="little"))
            if nulls else None)
    return pa.Array.from_buffers(pa.int64(), data.size, [bits, pa.py_buffer(data)],
                                 null_count=nulls)


def _bools(values: np.ndarray) -> pa.Array:
    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), int(values.size), [None, pa.py_buffer(bits)])


def _binary(data: bytes, bounds: np.ndarray, typ: pa.DataType | None = None) -> pa.Array:
    """A binary (or, for UTF-8 data, string) Arrow array from concatenated values."""
    offs = np.ascontiguousarray(bounds, dtype=np.int32)
    return pa.Array.from_buffers(typ or pa.binary(), offs.size - 1,
                                 [None, pa.py_buffer(offs), pa.py_buffer(data)])


def _empty_table(schema: pa.Schema) -> pa.Table:
    """``schema.empty_table()`` without its pandas import (0.2 s on the first call)."""
    return pa.Table.from_batches([], schema=schema)


def _blobs(values: list[bytes]) -> pa.Array:
    """A binary Arrow array from a list of bytes."""
    lens = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    bounds = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lens, out=bounds[1:])
    return _binary(b"".join(values), bounds)


def _strings(values: list[str]) -> pa.Array:
    """A string Arrow array from a list of str."""
    enc = [v.encode() for v in values]
    lens = np.fromiter((len(v) for v in enc), dtype=np.int64, count=len(enc))
    bounds = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum(lens, out=bounds[1:])
    return _binary(b"".join(enc), bounds, pa.string())


def _choice(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    """A string array taking ``names[codes[k]]`` for row k."""
    enc = [v.encode() for v in names]
    lens = np.array([len(v) for v in enc], dtype=np.int64)
    offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    data, bounds = _slices(b"".join(enc), offs[codes], lens[codes])
    return _binary(data, bounds, pa.string())


#: HTTP/1 message starts of one batch: conn_id, frame, ts, direction (0: A->B) per row, the
#: rows' data concatenated and its bounds.
_HttpChunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes, np.ndarray]


def _http_rows(ch: _HttpChunk, rows: np.ndarray) -> _HttpChunk:
    """The chunk's rows ``rows`` as a chunk of their own."""
    data, bounds = _slices(ch[4], ch[5][rows], np.diff(ch[5])[rows])
    return ch[0][rows], ch[1][rows], ch[2][rows], ch[3][rows], data, bounds


class ConnectionTracker:
    """Aggregate packet batches into connections; see the module docstring for the rules."""

    def __init__(self, idle_timeout_s: float = 300.0, head_bytes: int = HEAD_BYTES,
                 closed_linger_s: float = 30.0):
        self.idle_ns = int(idle_timeout_s * 1e9)
        self.linger_ns = int(closed_linger_s * 1e9)
        self.head_bytes = int(head_bytes)
        self._cap = 0
        self._n = 0  # slots ever allocated (high-water mark)
        self._free: list[int] = []
        self._live: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # TCP head segments per slot * 2 + direction (0: A->B, 1: B->A); UDP: first datagram.
        self._heads: dict[int, _Segments] = {}
        self._udp_heads: dict[int, bytes] = {}
        # HTTP/1 message starts, in chunks of arrays (conn_id, frame, ts, dir) with their
        # data concatenated and the bounds of each row's part.
        self._http: list[_HttpChunk] = []
        self._next_id = 1
        self.now_ns = 0
        self._iv = np.zeros((0, len(_INT_FIELDS)), dtype=np.int64)
        self._pv = np.zeros((0, len(_PAIR_FIELDS), 2), dtype=np.int64)
        self.i: dict[str, np.ndarray] = {}
        self.p: dict[str, np.ndarray] = {}
        self.addr = np.zeros((0, 4), dtype=np.uint64)
        self._alive = np.zeros(0, dtype=bool)
        self._grow(1024)

    # -- slots ---------------------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, self._cap * 2)
        # One row per slot (so a slot is reset with one assignment); self.i / self.p hold
        # per-field column views.
        iv = np.zeros((cap, len(_INT_FIELDS)), dtype=np.int64)
        pv = np.zeros((cap, len(_PAIR_FIELDS), 2), dtype=np.int64)
        if self._cap:
            iv[: self._cap] = self._iv
            pv[: self._cap] = self._pv
        self._iv, self._pv = iv, pv
        self.i = {k: iv[:, j] for j, k in enumerate(_INT_FIELDS)}
        self.p = {k: pv[:, j, :] for j, k in enumerate(_PAIR_FIELDS)}
        addr = np.zeros((cap, 4), dtype=np.uint64)
        addr[: self._cap] = self.addr
        self.addr = addr
        alive = np.zeros(cap, dtype=bool)
        alive[: self._cap] = self._alive
        self._alive = alive
        self._cap = cap

    def _alloc(self, key: bytes) -> int:
        if self._free:
            s = self._free.pop()
        else:
            s = self._n
            self._n += 1
            self._grow(self._n)
        self._iv[s] = _INT_INIT
        self._pv[s] = _PAIR_INIT
        self._iv[s, _I_CONN_ID] = self._next_id
        self._next_id += 1
        self._live[key] = s
        self._key_of[s] = key
        self._alive[s] = True
        return s

    # -- update --------------------------------------------------------------------------------

    def update(self, batch: PacketBatch) -> None:
        """Add one batch of packets (rows in file order)."""
        sel = np.nonzero((batch.proto == 6) | (batch.proto == 17))[0]
        if sel.size == 0:
            return
        proto = batch.proto[sel].astype(np.uint64)
        sh, sl, dh, dl = batch.src_hi[sel], batch.src_lo[sel], batch.dst_hi[sel], batch.dst_lo[sel]
        sp = batch.sport[sel].astype(np.uint64)
        dp = batch.dport[sel].astype(np.uint64)
        swap = (sh > dh) | ((sh == dh) & ((sl > dl) | ((sl == dl) & (sp > dp))))
        ah, al, bh, bl = (np.where(swap, dh, sh), np.where(swap, dl, sl),
                          np.where(swap, sh, dh), np.where(swap, sl, dl))
        ap, bp = np.where(swap, dp, sp), np.where(swap, sp, dp)
        n = sel.size
        k = np.empty((n, 5), dtype=np.uint64)
        k[:, 0] = (proto << np.uint64(32)) | (ap << np.uint64(16)) | bp
        k[:, 1], k[:, 2], k[:, 3], k[:, 4] = ah, al, bh, bl
        frame = batch.frame[sel]
        order = np.lexsort((frame, k[:, 4], k[:, 3], k[:, 2], k[:, 1], k[:, 0]))
        ks = k[order]
        rows = sel[order]  # batch row of each sorted packet
        dirs = swap[order].astype(np.int64)  # 0: A->B, 1: B->A
        ts = batch.ts_ns[rows]
        flags = batch.tcp_flags[rows].astype(np.int64)
        is_tcp = batch.proto[rows] == 6
        seq = batch.seq[rows]
        pure_syn = is_tcp & ((flags & (SYN | ACK | RST)) == SYN)
        synack = is_tcp & ((flags & (SYN | ACK)) == (SYN | ACK))
        acks = batch.ack[rows]

        newgrp = np.ones(n, dtype=bool)
        newgrp[1:] = (ks[1:] != ks[:-1]).any(axis=1)
        gs = np.nonzero(newgrp)[0]
        ge = np.append(gs[1:], n)
        gap = np.zeros(n, dtype=bool)
        gap[1:] = (ts[1:] - ts[:-1]) > self.idle_ns
        gap &= ~newgrp
        cand = pure_syn | gap
        keys = np.ascontiguousarray(ks[gs]).view("V40").ravel().tolist()
        live = self._live
        found = np.array([live.get(kb, -1) for kb in keys], dtype=np.int64)
        has_cand = np.add.reduceat(cand.astype(np.int64), gs) > 0
        f_ok = found >= 0
        stale = np.zeros(gs.size, dtype=bool)
        stale[f_ok] = (ts[gs[f_ok]] - self.i["last_ts"][found[f_ok]]) > self.idle_ns
        simple = f_ok & ~has_cand & ~stale
        # Groups continuing a live connection without a split candidate: one segment each.
        slow = np.nonzero(~simple)[0].tolist()
        if not slow:
            seg_slot_sorted = np.repeat(found, ge - gs)
        else:
            fast_idx = np.nonzero(simple)[0]
            starts = list(zip(gs[fast_idx].tolist(), found[fast_idx].tolist(), strict=True))
            cand_pos = np.nonzero(cand)[0]
            cand_l = cand_pos.tolist()
            slow_a = np.asarray(slow, dtype=np.int64)
            c_lo = np.searchsorted(cand_pos, gs[slow_a]).tolist()
            c_hi = np.searchsorted(cand_pos, ge[slow_a]).tolist()
            for gi, g in enumerate(slow):
                a = int(gs[g])
                s = int(found[g])
                kb = keys[g]
                if s >= 0 and stale[g]:
                    self.i["timeout"][s] = 1
                    s = -1
                cpos_l = cand_l[c_lo[gi]: c_hi[gi]]
                if s >= 0:
                    starts.append((a, s))
                elif not cpos_l or cpos_l[0] != a:
                    s = self._new(kb, int(rows[a]), batch, int(dirs[a]), False, 0)
                    starts.append((a, s))
                for j in cpos_l:
                    if s >= 0 and not gap[j] and self._same_syn(s, j, starts[-1][0], seq,
                                                                synack, acks):
                        continue  # a retransmitted SYN, or one captured after its SYN-ACK
                    if s >= 0 and gap[j]:
                        self.i["timeout"][s] = 1
                    if starts and starts[-1][0] == j:
                        starts.pop()
                    s = self._new(kb, int(rows[j]), batch, int(dirs[j]), bool(pure_syn[j]),
                                  int(seq[j]))
                    starts.append((j, s))
            starts.sort()
            sa = np.array([x[0] for x in starts] + [n], dtype=np.int64)
            seg_slot_sorted = np.repeat(np.array([x[1] for x in starts], dtype=np.int64),
                                        np.diff(sa))
        self._aggregate(batch, rows, seg_slot_sorted, dirs, ts, flags, pure_syn, synack, seq,
                        acks, is_tcp)

    def _same_syn(self, s: int, j: int, seg_start: int, seq: np.ndarray, synack: np.ndarray,
                  acks: np.ndarray) -> bool:
        """Whether the pure SYN at sorted position j belongs to connection s."""
        q = int(seq[j])
        known = int(self.i["syn_seq"][s])
        if known >= 0:
            return known == q
        want = (q + 1) % _U32
        prior = int(self.i["synack_ack"][s])
        if prior >= 0 and prior == want and self.i["synack_dir"][s] >= 0:
            self.i["syn_seq"][s] = q
            return True
        lo = seg_start
        if bool((synack[lo:j] & (acks[lo:j] == want)).any()):
            self.i["syn_seq"][s] = q
            return True
        return False

    def _new(self, kb: bytes, row: int, batch: PacketBatch, d: int, syn: bool, seq: int) -> int:
        old = self._live.get(kb)
        if old is not None:
            # The superseded connection stays until flushed; park it under a unique key.
            park = kb + b"#" + str(self.i["conn_id"][old]).encode()
            self._live[park] = old
            self._key_of[old] = park
        s = self._alloc(kb)
        # The key holds (proto << 32 | A port << 16 | B port, A hi, A lo, B hi, B lo).
        key = np.frombuffer(kb, dtype=np.uint64, count=5)
        k0 = int(key[0])
        t = int(batch.ts_ns[row])
        self._iv[s, _I_NEW] = (t, t, int(batch.frame[row]), d, int(batch.ip_version[row]),
                               int(batch.tunnel[row]), k0 >> 32, seq if syn else -1,
                               (k0 >> 16) & 0xFFFF, k0 & 0xFFFF)
        self.addr[s] = key[1:]
        return s

    def _aggregate(self, batch: PacketBatch, rows: np.ndarray, slot: np.ndarray,
                   dirs: np.ndarray, ts: np.ndarray, flags: np.ndarray, pure_syn: np.ndarray,
                   synack: np.ndarray, seq: np.ndarray, acks: np.ndarray, is_tcp: np.ndarray
                   ) -> None:
        if ts.size:
            self.now_ns = max(self.now_ns, int(ts.max()))
        idx = slot * 2 + dirs
        m = self._cap * 2
        flen = batch.frame_len[rows]
        plen = batch.payload_len[rows]
        p = self.p
        p["pkts"] += np.bincount(idx, minlength=m).reshape(-1, 2)
        p["bytes"] += np.bincount(idx, weights=flen, minlength=m).astype(np.int64).reshape(-1, 2)
        p["pay"] += np.bincount(idx, weights=plen, minlength=m).astype(np.int64).reshape(-1, 2)
        for name, mask in (("syn", pure_syn), ("synack", synack),
                           ("fin", is_tcp & ((flags & FIN) != 0)),
                           ("rst", is_tcp & ((flags & RST) != 0))):
            if mask.any():
                p[name] += np.bincount(idx[mask], minlength=m).reshape(-1, 2)
        np.maximum.at(self.i["last_ts"], slot, ts)
        # First SYN / SYN-ACK direction and the initial sequence numbers.
        for mask, dname, plus in ((pure_syn, "syn_dir", 0), (synack, "synack_dir", 1)):
            if not mask.any():
                continue
            pos = np.nonzero(mask)[0]
            us, first = np.unique(slot[pos], return_index=True)
            fp = pos[first]
            unset = self.i[dname][us] < 0
            us, fp = us[unset], fp[unset]
            self.i[dname][us] = dirs[fp]
            p["isn"][us, dirs[fp]] = (seq[fp] + 1) % _U32
            if plus:
                self.i["synack_ack"][us] = acks[fp]
        self._collect_heads(batch, rows, slot, dirs, seq, is_tcp)
        self._collect_http(batch, rows, slot, dirs, is_tcp)

    def _collect_heads(self, batch: PacketBatch, rows: np.ndarray, slot: np.ndarray,
                       dirs: np.ndarray, seq: np.ndarray, is_tcp: np.ndarray) -> None:
        cap = batch.payload_cap[rows]
        has = cap > 0
        if not has.any():
            return
        heads = self._heads
        hb = self.head_bytes
        # UDP: the first datagram each way.
        u = np.nonzero(has & ~is_tcp)[0]
        if u.size:
            key = slot[u] * 2 + dirs[u]
            uk, first = np.unique(key, return_index=True)
            udp = self._udp_heads
            for hk, j in zip(uk.tolist(), u[first].tolist(), strict=True):
                if hk not in udp:
                    udp[hk] = batch.payload(int(rows[j]), hb)
        t = np.nonzero(has & is_tcp)[0]
        if t.size == 0:
            return
        isn = self.p["isn"][slot[t], dirs[t]]
        unknown = isn < 0
        if unknown.any():
            # No SYN: the first payload segment's sequence number is the provisional start.
            tu = t[unknown]
            key = slot[tu] * 2 + dirs[tu]
            uk, first = np.unique(key, return_index=True)
            self.p["isn"][uk // 2, uk % 2] = seq[tu[first]]
            isn = self.p["isn"][slot[t], dirs[t]]
        rel = (seq[t] - isn) % _U32
        rel = np.where(rel >= (1 << 31), rel - _U32, rel)
        keep = (rel < hb) & (rel > -(1 << 20))
        k = t[keep]
        if k.size == 0:
            return
        rel = rel[keep]
        lim = np.minimum(cap[k], hb - rel)
        # One gather for all kept payloads; Python work per (connection, direction) only.
        key = slot[k] * 2 + dirs[k]
        o = np.argsort(key, kind="stable")
        k, rel, lim, key = k[o], rel[o], lim[o], key[o]
        blob, bounds = _gather(batch, rows[k], lim)
        cut = np.nonzero(np.diff(key))[0] + 1
        starts = np.concatenate(([0], cut)).tolist()
        ends = np.concatenate((cut, [k.size])).tolist()
        kl = key.tolist()
        bl = bounds.tolist()
        for a, e in zip(starts, ends, strict=True):
            hk = kl[a]
            h = heads.get(hk)
            if h is None:
                heads[hk] = [(rel[a:e], lim[a:e], blob[bl[a]: bl[e]])]
            else:
                h.append((rel[a:e], lim[a:e], blob[bl[a]: bl[e]]))

    def _collect_http(self, batch: PacketBatch, rows: np.ndarray, slot: np.ndarray,
                      dirs: np.ndarray, is_tcp: np.ndarray) -> None:
        cap = batch.payload_cap[rows]
        c = np.nonzero(is_tcp & (cap >= 4))[0]
        if c.size == 0:
            return
        hits = c[_starts_with(batch.buf, batch.payload_off[rows[c]], cap[c], _HTTP_TOKENS)]
        if hits.size == 0:
            return
        lim = np.minimum(cap[hits], HTTP_HEAD)
        blob, bounds = _gather(batch, rows[hits], lim)
        self._http.append((self.i["conn_id"][slot[hits]], batch.frame[rows[hits]],
                           batch.ts_ns[rows[hits]], dirs[hits], blob, bounds))

    # -- output --------------------------------------------------------------------------------

    def flush(self, now_ns: int | None = None) -> TrackerOutput:
        """Emit and forget connections that are over: idle for ``idle_timeout_s`` (ended
        ``timeout``), or closed (RST, or FIN both ways) and idle for ``closed_linger_s``."""
        now = self.now_ns if now_ns is None else now_ns
        live = np.nonzero(self._alive[: self._n])[0]
        if live.size == 0:
            return self._empty()
        last = self.i["last_ts"][live]
        closed = (self.p["rst"][live].sum(axis=1) > 0) | (
            (self.p["fin"][live, 0] > 0) & (self.p["fin"][live, 1] > 0))
        idle = (now - last) > self.idle_ns
        done = idle | (closed & ((now - last) > self.linger_ns)) | (self.i["timeout"][live] > 0)
        self.i["timeout"][live[idle & ~closed]] = 1
        if not done.any():
            return self._empty()
        return self._table(live[done])

    def _empty(self) -> TrackerOutput:
        return TrackerOutput(_empty_table(CONNECTION_SCHEMA), _empty_table(HTTP_SCHEMA))

    def finish(self) -> TrackerOutput:
        """Emit every remaining connection (still live ones end ``open``)."""
        return self._table(np.nonzero(self._alive[: self._n])[0])

    def _head(self, s: int, d: int) -> bytes:
        h = self._heads.get(s * 2 + d)
        if h is None:
            return self._udp_heads.get(s * 2 + d, b"")
        # A few segments per head: plain Python lists beat numpy calls here.
        rel: list[int] = []
        lens: list[int] = []
        for seg_rel, seg_len, _ in h:
            rel += seg_rel.tolist()
            lens += seg_len.tolist()
        data = b"".join(x[2] for x in h)
        hb = self.head_bytes
        # Relative 0 is SYN + 1 when this direction's SYN/SYN-ACK was seen, else the first
        # payload's sequence number: then start from the lowest segment captured.
        from_syn = self.i["syn_dir"][s] == d or self.i["synack_dir"][s] == d
        start = 0 if from_syn else min(0, min(rel))
        k = len(rel)
        # Each segment starts where the one before it ends (rel[j + 1] == rel[j] + lens[j]).
        if rel[0] == start and all(lens) and list(accumulate(lens[:-1], initial=start)) == rel:
            # In capture order, no gap, no overlap: the segments simply follow each other.
            return data[:hb]
        offs = [0]
        for ln in lens:
            offs.append(offs[-1] + ln)
        pos = start
        out = bytearray()
        for j in sorted(range(k), key=rel.__getitem__):  # stable: equal starts keep the first
            rj = rel[j]
            if rj > pos:
                break
            if rj + lens[j] > pos:
                out += data[offs[j] + pos - rj: offs[j + 1]]
                pos = start + len(out)
            if len(out) >= hb:
                break
        return bytes(out[:hb])

    def _take_http(self, conn_ids: np.ndarray, client: np.ndarray) -> pa.Table:
        """The HTTP rows of the connections ``conn_ids`` (sorted; ``client[k]`` is the side
        that is the client of the k-th), ordered by connection and frame; others are kept.

        Chunks whose rows all stay are kept as they are, so a row's bytes are copied a
        bounded number of times however often the tracker is flushed."""
        keep: list[_HttpChunk] = []
        taken: list[_HttpChunk] = []
        for ch in self._http:
            cid = ch[0]
            if conn_ids.size:
                pos = np.minimum(np.searchsorted(conn_ids, cid), conn_ids.size - 1)
                take = conn_ids[pos] == cid
            else:
                take = np.zeros(cid.size, dtype=bool)
            if not take.any():
                keep.append(ch)
            elif take.all():
                taken.append(ch)
            else:
                keep.append(_http_rows(ch, np.nonzero(~take)[0]))
                taken.append(_http_rows(ch, np.nonzero(take)[0]))
        self._http = keep
        if not taken:
            return _empty_table(HTTP_SCHEMA)
        cid = np.concatenate([c[0] for c in taken])
        frame = np.concatenate([c[1] for c in taken])
        ts = np.concatenate([c[2] for c in taken])
        dirs = np.concatenate([c[3] for c in taken])
        base = np.cumsum([0] + [len(c[4]) for c in taken])[:-1].tolist()
        starts = np.concatenate([c[5][:-1] + b for c, b in zip(taken, base, strict=True)])
        lens = np.concatenate([np.diff(c[5]) for c in taken])
        order = np.lexsort((frame, cid))
        data, bounds = _slices(b"".join(c[4] for c in taken), starts[order], lens[order])
        cid, frame, ts, dirs = cid[order], frame[order], ts[order], dirs[order]
        c2s = dirs == client[np.searchsorted(conn_ids, cid)]
        return pa.Table.from_arrays([
            _arrow(cid, pa.int64()), _arrow(frame, pa.int64()), _arrow(ts, pa.int64()),
            _choice(np.where(c2s, 0, 1), ("c2s", "s2c")), _binary(data, bounds)],
            schema=HTTP_SCHEMA)

    def _table(self, slots: np.ndarray) -> TrackerOutput:
        slots = slots[np.argsort(self.i["conn_id"][slots], kind="stable")]
        i, p = self.i, self.p
        n = slots.size
        sd, sad = i["syn_dir"][slots], i["synack_dir"][slots]
        ap, bp = i["a_port"][slots], i["b_port"][slots]
        tcp = i["proto"][slots] == 6
        first_dir = i["first_dir"][slots]
        # How the client was chosen: 0 syn, 1 syn-ack, 2 port, 3 first-packet.
        by = np.where(sd >= 0, 0, np.where(sad >= 0, 1, np.where(tcp & (ap != bp), 2, 3)))
        # client_is_a: 1 when endpoint A is the client.
        cia = np.where(sd >= 0, sd == 0,
                       np.where(sad >= 0, sad == 1,
                                np.where(tcp & (ap != bp), ap > bp, first_dir == 0)))
        c = np.where(cia, 0, 1)
        srv = 1 - c
        pk, by_, pay = p["pkts"][slots], p["bytes"][slots], p["pay"][slots]
        r = np.arange(n)
        addr = self.addr[slots]
        a_txt = addr_text(addr[:, 0], addr[:, 1])
        b_txt = addr_text(addr[:, 2], addr[:, 3])
        syn, synack, rst, fin = p["syn"][slots], p["synack"][slots], p["rst"][slots], \
            p["fin"][slots]
        handshake = (syn[r, c] > 0) & (synack[r, srv] > 0)
        # ISNs: isn holds SYN + 1 for the direction whose SYN / SYN-ACK set it.
        isn = p["isn"][slots]
        c_isn_ok = tcp & (sd >= 0)
        c_isn = (isn[r, c] - 1) % _U32
        from_synack = tcp & (sd < 0) & (sad >= 0)
        c_isn = np.where(from_synack, (i["synack_ack"][slots] - 1) % _U32, c_isn)
        c_isn_ok |= from_synack
        s_isn_ok = tcp & (sad >= 0) & (sad == srv)
        s_isn = (isn[r, srv] - 1) % _U32
        # Codes into _STATES and _ENDED.
        state = np.where(
            tcp,
            np.where(syn[r, c] > 0,
                     np.where(synack[r, srv] > 0, 0,
                              np.where(rst[r, srv] > 0, 1, np.where(pk[r, srv] == 0, 2, 3))),
                     3),
            np.where(pk[r, srv] > 0, 0, 2))
        ended = np.where(tcp & (rst.sum(axis=1) > 0), 0,
                         np.where(tcp & (fin.sum(axis=1) > 0), 1,
                                  np.where(i["timeout"][slots] > 0, 2, 3)))
        sl = slots.tolist()
        cl = c.tolist()
        ch = [self._head(s, d) for s, d in zip(sl, cl, strict=True)]
        sh = [self._head(s, 1 - d) for s, d in zip(sl, cl, strict=True)]
        conn_ids = i["conn_id"][slots]
        http = self._take_http(conn_ids, c)
        tunnels = tuple(TUNNEL_NAMES.get(k, "") for k in range(max(TUNNEL_NAMES) + 1))
        conns = pa.Table.from_arrays([
            _arrow(conn_ids, pa.int64()),
            _choice(np.where(tcp, 0, 1), ("tcp", "udp")),
            _arrow(i["ver"][slots], pa.int8()),
            _strings(np.where(cia, a_txt, b_txt).tolist()),
            _arrow(np.where(cia, ap, bp), pa.int32()),
            _strings(np.where(cia, b_txt, a_txt).tolist()),
            _arrow(np.where(cia, bp, ap), pa.int32()),
            _choice(by, ("syn", "syn-ack", "port", "first-packet")),
            _choice(i["tunnel"][slots], tunnels),
            _arrow(i["first_ts"][slots], pa.int64()),
            _arrow(i["last_ts"][slots], pa.int64()),
            _arrow(i["first_frame"][slots], pa.int64()),
            _arrow(pk[r, c], pa.int64()),
            _arrow(pk[r, srv], pa.int64()),
            _arrow(by_[r, c], pa.int64()),
            _arrow(by_[r, srv], pa.int64()),
            _arrow(pay[r, c], pa.int64()),
            _arrow(pay[r, srv], pa.int64()),
            _bools(handshake),
            _arrow(syn[r, c], pa.int32()),
            _choice(state, _STATES),
            _choice(ended, _ENDED),
            _blobs(ch),
            _blobs(sh),
            _nullable(c_isn, c_isn_ok),
            _nullable(s_isn, s_isn_ok),
        ], schema=CONNECTION_SCHEMA)
        self._release(sl)
        return TrackerOutput(conns, http)

    def _release(self, slots: list[int]) -> None:
        for s in slots:
            kb = self._key_of.pop(s)
            if self._live.get(kb) == s:
                del self._live[kb]
            for hk in (s * 2, s * 2 + 1):
                self._heads.pop(hk, None)
                self._udp_heads.pop(hk, None)
            self._free.append(s)
            self._alive[s] = False
