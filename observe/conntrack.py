"""TCP connections and UDP flows from decoded packet batches (:mod:`observe.pcap`).

Packets are keyed by their 5-tuple with the endpoints in a canonical order (A = the smaller
(address, port)); each batch is sorted by (key, frame) once and aggregated per connection
with numpy (``bincount`` over a connection slot index). Python runs once per connection per
batch (a dict lookup), and a short loop per connection only where a pure SYN or a long
silence may split it; per-packet Python work is limited to payload bytes that may still land
in a direction's first ``head_bytes`` and to packets that start an HTTP/1 message.

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
- IP fragments: the first fragment carries the ports and counts as the datagram's packet
  (with its own frame length); later fragments are not part of any row (the reader counts
  them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from observe.pcap import ACK, FIN, RST, SYN, TUNNEL_NAMES, PacketBatch, addr_text

#: Bytes of each HTTP/1 message start kept in the ``http`` table.
HTTP_HEAD = 2048
_HTTP_TOKENS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"CONNECT ", b"TRACE ", b"HTTP/1.")
_U32 = 1 << 32
_HTTP_PREFIX4 = np.array(sorted({int.from_bytes(t[:4], "big") for t in _HTTP_TOKENS}),
                         dtype=np.int64)


def _be32(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    return ((buf[off].astype(np.int64) << 24) | (buf[off + 1].astype(np.int64) << 16)
            | (buf[off + 2].astype(np.int64) << 8) | buf[off + 3])

STATE_ESTABLISHED = "established"
STATE_REFUSED = "refused"
STATE_NO_ANSWER = "no-answer"
STATE_MIDSTREAM = "midstream"

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


@dataclass
class _Head:
    """Payload segments of one direction, one entry per batch in capture order:
    (relative sequence numbers, lengths, the segments' bytes concatenated)."""

    segs: list[tuple[np.ndarray, np.ndarray, bytes]] = field(default_factory=list)
    done: bool = False


_INT_FIELDS = ("proto", "a_port", "b_port", "conn_id", "first_ts", "last_ts", "first_frame",
               "syn_seq", "synack_ack", "first_dir", "syn_dir", "synack_dir", "ver", "tunnel",
               "timeout")
_PAIR_FIELDS = ("pkts", "bytes", "pay", "syn", "synack", "fin", "rst", "isn")


def _gather(batch: PacketBatch, rows: np.ndarray, lim: np.ndarray
            ) -> tuple[bytes, np.ndarray]:
    """The first ``lim[k]`` payload bytes of each row, concatenated, and the k-th's bounds."""
    lim = np.maximum(lim, 0)
    bounds = np.concatenate(([0], np.cumsum(lim)))
    if int(bounds[-1]) == 0:
        return b"", bounds
    mv = memoryview(batch.buf.data)
    offs = batch.payload_off[rows].tolist()
    return b"".join([mv[o: o + k] for o, k in zip(offs, lim.tolist(), strict=True)]), bounds


class ConnectionTracker:
    """Aggregate packet batches into connections; see the module docstring for the rules."""

    def __init__(self, idle_timeout_s: float = 300.0, head_bytes: int = 16384,
                 closed_linger_s: float = 30.0):
        self.idle_ns = int(idle_timeout_s * 1e9)
        self.linger_ns = int(closed_linger_s * 1e9)
        self.head_bytes = int(head_bytes)
        self._cap = 0
        self._n = 0  # slots ever allocated (high-water mark)
        self._free: list[int] = []
        self._live: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._heads: dict[tuple[int, int], _Head] = {}
        self._http: dict[int, list[tuple[int, int, int, bytes]]] = {}
        self._next_id = 1
        self.now_ns = 0
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
        for k in _INT_FIELDS:
            a = np.zeros(cap, dtype=np.int64)
            if k in self.i:
                a[: self._cap] = self.i[k]
            self.i[k] = a
        for k in _PAIR_FIELDS:
            a = np.zeros((cap, 2), dtype=np.int64)
            if k in self.p:
                a[: self._cap] = self.p[k]
            self.p[k] = a
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
        for k in _INT_FIELDS:
            self.i[k][s] = 0
        for k in _PAIR_FIELDS:
            self.p[k][s] = 0
        self.i["syn_seq"][s] = -1
        self.i["syn_dir"][s] = -1
        self.i["synack_dir"][s] = -1
        self.i["synack_ack"][s] = -1
        self.p["isn"][s] = -1
        self.i["conn_id"][s] = self._next_id
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
            for g in slow:
                a, e = int(gs[g]), int(ge[g])
                s = int(found[g])
                kb = keys[g]
                if s >= 0 and stale[g]:
                    self.i["timeout"][s] = 1
                    s = -1
                cpos = cand_pos[np.searchsorted(cand_pos, a): np.searchsorted(cand_pos, e)]
                cpos_l = cpos.tolist()
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
        self.i["first_ts"][s] = batch.ts_ns[row]
        self.i["last_ts"][s] = batch.ts_ns[row]
        self.i["first_frame"][s] = batch.frame[row]
        self.i["first_dir"][s] = d
        self.i["ver"][s] = batch.ip_version[row]
        self.i["tunnel"][s] = batch.tunnel[row]
        self.i["proto"][s] = batch.proto[row]
        self.i["syn_seq"][s] = seq if syn else -1
        src = (batch.src_hi[row], batch.src_lo[row], batch.sport[row])
        dst = (batch.dst_hi[row], batch.dst_lo[row], batch.dport[row])
        a, b = (dst, src) if d == 1 else (src, dst)
        self.addr[s] = (a[0], a[1], b[0], b[1])
        self.i["a_port"][s] = a[2]
        self.i["b_port"][s] = b[2]
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
            _, first = np.unique(key, return_index=True)
            for j in u[first].tolist():
                hk = (int(slot[j]), int(dirs[j]))
                if hk not in heads:
                    data = batch.payload(int(rows[j]), hb)
                    heads[hk] = _Head([(np.zeros(1, np.int64), np.array([len(data)]), data)],
                                      True)
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
            hk = (kl[a] // 2, kl[a] % 2)
            h = heads.get(hk)
            if h is None:
                h = heads[hk] = _Head()
            elif h.done:
                continue
            h.segs.append((rel[a:e], lim[a:e], blob[bl[a]: bl[e]]))

    def _collect_http(self, batch: PacketBatch, rows: np.ndarray, slot: np.ndarray,
                      dirs: np.ndarray, is_tcp: np.ndarray) -> None:
        cap = batch.payload_cap[rows]
        c = np.nonzero(is_tcp & (cap >= 4))[0]
        if c.size == 0:
            return
        # Cheap filter on the first 4 bytes, exact check on the few candidates.
        first4 = _be32(batch.buf, batch.payload_off[rows[c]])
        maybe = c[np.isin(first4, _HTTP_PREFIX4)]
        if maybe.size == 0:
            return
        off = batch.payload_off[rows[maybe]]
        first = batch.buf[off[:, None] + np.arange(8)]
        hit = np.zeros(maybe.size, dtype=bool)
        for tok in _HTTP_TOKENS:
            t = np.frombuffer(tok, dtype=np.uint8)
            hit |= (first[:, : t.size] == t).all(axis=1) & (cap[maybe] >= t.size)
        c = maybe
        hits = c[hit]
        if hits.size == 0:
            return
        lim = np.minimum(cap[hits], HTTP_HEAD)
        blob, bounds = _gather(batch, rows[hits], lim)
        bl = bounds.tolist()
        fr = batch.frame[rows[hits]].tolist()
        tsl = batch.ts_ns[rows[hits]].tolist()
        for n_, (j, d) in enumerate(zip(slot[hits].tolist(), dirs[hits].tolist(), strict=True)):
            self._http.setdefault(j, []).append(
                (fr[n_], tsl[n_], d, blob[bl[n_]: bl[n_ + 1]]))

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
        return TrackerOutput(CONNECTION_SCHEMA.empty_table(), HTTP_SCHEMA.empty_table())

    def finish(self) -> TrackerOutput:
        """Emit every remaining connection (still live ones end ``open``)."""
        return self._table(np.nonzero(self._alive[: self._n])[0])

    def _head(self, s: int, d: int) -> bytes:
        h = self._heads.get((s, d))
        if h is None or not h.segs:
            return b""
        if h.done:
            return bytes(h.segs[0][2])
        rel = np.concatenate([x[0] for x in h.segs])
        lens = np.concatenate([x[1] for x in h.segs])
        data = b"".join(x[2] for x in h.segs)
        offs = np.concatenate(([0], np.cumsum(lens)))
        # Relative 0 is SYN + 1 when this direction's SYN/SYN-ACK was seen, else the first
        # payload's sequence number: then start from the lowest segment captured.
        from_syn = self.i["syn_dir"][s] == d or self.i["synack_dir"][s] == d
        o = np.argsort(rel, kind="stable")
        start = 0 if from_syn else min(0, int(rel[o[0]]))
        r, ln = rel[o], lens[o]
        if r[0] == start and (r[1:] == r[:-1] + ln[:-1]).all() and (ln > 0).all():
            # In order, no gap, no overlap: the segments simply follow each other.
            if (o == np.arange(o.size)).all():
                return data[: self.head_bytes]
            return b"".join(data[offs[i]: offs[i] + lens[i]] for i in o.tolist())[
                : self.head_bytes]
        pos = start
        out = bytearray()
        for i in o.tolist():
            ri = int(rel[i])
            if ri > pos:
                break
            seg = data[offs[i]: offs[i] + lens[i]]
            if ri + len(seg) > pos:
                out += seg[pos - ri:]
                pos = start + len(out)
            if len(out) >= self.head_bytes:
                break
        return bytes(out[: self.head_bytes])

    def _table(self, slots: np.ndarray) -> TrackerOutput:
        slots = slots[np.argsort(self.i["conn_id"][slots], kind="stable")]
        i, p = self.i, self.p
        n = slots.size
        sd, sad = i["syn_dir"][slots], i["synack_dir"][slots]
        ap, bp = i["a_port"][slots], i["b_port"][slots]
        tcp = i["proto"][slots] == 6
        first_dir = i["first_dir"][slots]
        # client_is_a: 1 when endpoint A is the client.
        by = np.where(sd >= 0, "syn", np.where(sad >= 0, "syn-ack",
                      np.where(tcp & (ap != bp), "port", "first-packet")))
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
        state = np.where(
            tcp,
            np.where(syn[r, c] > 0,
                     np.where(synack[r, srv] > 0, STATE_ESTABLISHED,
                              np.where(rst[r, srv] > 0, STATE_REFUSED,
                                       np.where(pk[r, srv] == 0, STATE_NO_ANSWER,
                                                STATE_MIDSTREAM))),
                     STATE_MIDSTREAM),
            np.where(pk[r, srv] > 0, STATE_ESTABLISHED, STATE_NO_ANSWER))
        ended = np.where(tcp & (rst.sum(axis=1) > 0), "rst",
                         np.where(tcp & (fin.sum(axis=1) > 0), "fin",
                                  np.where(i["timeout"][slots] > 0, "timeout", "open")))
        sl = slots.tolist()
        cl = c.tolist()
        ch = [self._head(s, d) for s, d in zip(sl, cl, strict=True)]
        sh = [self._head(s, 1 - d) for s, d in zip(sl, cl, strict=True)]
        http_rows: list[tuple[int, int, int, str, bytes]] = []
        for s, d in zip(sl, cl, strict=True):
            for fr, t, dd, data in self._http.get(s, ()):
                http_rows.append((int(i["conn_id"][s]), fr, t, "c2s" if dd == d else "s2c", data))
        conns = pa.table({
            "conn_id": pa.array(i["conn_id"][slots], pa.int64()),
            "transport": pa.array(np.where(tcp, "tcp", "udp").tolist(), pa.string()),
            "ip_version": pa.array(i["ver"][slots].astype(np.int8), pa.int8()),
            "client_ip": pa.array(np.where(cia, a_txt, b_txt).tolist(), pa.string()),
            "client_port": pa.array(np.where(cia, ap, bp).astype(np.int32), pa.int32()),
            "server_ip": pa.array(np.where(cia, b_txt, a_txt).tolist(), pa.string()),
            "server_port": pa.array(np.where(cia, bp, ap).astype(np.int32), pa.int32()),
            "client_by": pa.array(by.tolist(), pa.string()),
            "tunnel": pa.array([TUNNEL_NAMES.get(int(t), "") for t in i["tunnel"][slots]],
                               pa.string()),
            "first_ts_ns": pa.array(i["first_ts"][slots], pa.int64()),
            "last_ts_ns": pa.array(i["last_ts"][slots], pa.int64()),
            "first_frame": pa.array(i["first_frame"][slots], pa.int64()),
            "packets_c2s": pa.array(pk[r, c], pa.int64()),
            "packets_s2c": pa.array(pk[r, srv], pa.int64()),
            "bytes_c2s": pa.array(by_[r, c], pa.int64()),
            "bytes_s2c": pa.array(by_[r, srv], pa.int64()),
            "payload_c2s": pa.array(pay[r, c], pa.int64()),
            "payload_s2c": pa.array(pay[r, srv], pa.int64()),
            "handshake": pa.array(handshake, pa.bool_()),
            "syn_count": pa.array(syn[r, c].astype(np.int32), pa.int32()),
            "state": pa.array(state.tolist(), pa.string()),
            "ended": pa.array(ended.tolist(), pa.string()),
            "client_head": pa.array(ch, pa.binary()),
            "server_head": pa.array(sh, pa.binary()),
        }, schema=CONNECTION_SCHEMA)
        http = pa.table({
            "conn_id": pa.array([x[0] for x in http_rows], pa.int64()),
            "frame": pa.array([x[1] for x in http_rows], pa.int64()),
            "ts_ns": pa.array([x[2] for x in http_rows], pa.int64()),
            "direction": pa.array([x[3] for x in http_rows], pa.string()),
            "data": pa.array([x[4] for x in http_rows], pa.binary()),
        }, schema=HTTP_SCHEMA)
        self._release(sl)
        return TrackerOutput(conns, http)

    def _release(self, slots: list[int]) -> None:
        for s in slots:
            kb = self._key_of.pop(s)
            if self._live.get(kb) == s:
                del self._live[kb]
            self._heads.pop((s, 0), None)
            self._heads.pop((s, 1), None)
            self._http.pop(s, None)
            self._free.append(s)
            self._alive[s] = False
