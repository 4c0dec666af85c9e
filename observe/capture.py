"""Packet evidence -> flow records: capture reader, connection tracker, payload classifier.

Each TCP connection and UDP flow the tracker (:mod:`observe.conntrack`) reports becomes one
record of kind ``connection`` (endpoints, packets and bytes each way, how it was set up and
ended, TLS/mTLS state and SNI from its first bytes). Each application request its payload
shows (HTTP/1 request lines, HTTP/2 and gRPC HEADERS; :mod:`observe.payload`) becomes one
more record of kind ``request`` with the same endpoints, so a graph edge counts
``connections`` beside ``requests``.

What packets can and cannot tell:

- mTLS is recognised by its marks (Istio's ``outbound_.PORT_._.HOST`` SNI and ``istio*`` ALPN,
  Linkerd's identity SNI, a TLS 1.2 client certificate); HTTP inside TLS is not visible, so
  such connections are ``tcp`` with no requests.
- ``itemized`` is True only when the tracker kept the whole client stream (it fits in the
  head), so every request it carried has a record. Otherwise (a long keep-alive or HTTP/2
  connection) requests may be missing, and policies must not be narrowed to the methods and
  paths seen on it (emit honours this).
- Failed attempts (``tcp_state`` ``refused`` / ``no-answer``) are kept as records: they are
  evidence (scans look like this), but never traffic a policy should allow.
- DNS answers seen in the capture name the addresses they resolve: a later connection to
  such an address gets the name as ``service_host`` (external egress then shows names).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from observe import payload
from observe import pcap as _pcap
from observe.arrowlite import (
    binary_array,
    bool_array,
    int_array,
    repeat_string,
    to_bool,
    to_int,
)
from observe.compiled import pcapcut
from observe.conntrack import ConnectionTracker, TrackerOutput
from observe.pcap import CaptureStats, read_packets
from observe.schema import FLOW_SCHEMA, KIND_CONNECTION, KIND_REQUEST, conform

if TYPE_CHECKING:
    from observe.live import LiveChunk, LiveStats

log = logging.getLogger(__name__)

SOURCE_PCAP = "pcap"
SOURCE_LIVE = "live"
#: A connection silent this long is over. Envoy keeps idle pooled upstream connections for up
#: to an hour (its default idle_timeout): splitting one earlier would make its continuation
#: look like a new connection whose handshake was never seen.
IDLE_TIMEOUT_S = 3600.0
#: Ended connections are handed on every this many batches (~8 MiB each): fewer, larger
#: flushes cost less, and memory still holds only a few batches' worth of ended connections.
FLUSH_EVERY_BATCHES = 8

# Istio's mTLS SNI: outbound_.<port>_.<subset>_.<service FQDN> (pilot's BuildDNSSrvSubsetKey).
_ISTIO_SNI = re.compile(r"^outbound_\.\d+_\.[^.]*_\.(?P<host>.+)$")
_APP_PROTOCOL = {
    payload.PROTO_HTTP: "http",
    payload.PROTO_H2C: "http",
    payload.PROTO_GRPC: "grpc",
    payload.PROTO_DNS: "dns",
}


@dataclass
class CaptureFlowStats:
    """What one capture gave, for the observe summary."""

    packets: int = 0
    connections: int = 0
    failed: int = 0
    """Connection attempts that never carried traffic (refused, no answer)."""
    requests: int = 0
    not_itemized: int = 0
    """Connections whose requests may not all have records (payload seen only in part)."""
    dns_names: int = 0
    classify_notes: int = 0
    duplicate_connections: int = 0
    """Connections left out because another capture already gave them."""


@dataclass
class DnsNames:
    """Address -> name from the DNS answers seen so far (the latest answer wins)."""

    names: dict[str, str] = field(default_factory=dict)

    def learn(self, info: payload.StreamInfo) -> int:
        added = 0
        for ans in info.dns_answers:
            if ans.rtype in ("A", "AAAA"):
                if self.names.get(ans.value) != ans.name:
                    added += 1
                self.names[ans.value] = ans.name.rstrip(".")
        return added


def _service_host(info: payload.StreamInfo, request: payload.HttpRequest | None,
                  server_ip: str, dns: DnsNames) -> str | None:
    if info.sni:
        m = _ISTIO_SNI.match(info.sni)
        if m:
            return m.group("host")
    if request is not None and request.authority:
        host = request.authority
        if host.startswith("["):
            return host[1 : host.find("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if info.sni and info.mesh is None:
        return info.sni
    return dns.names.get(server_ip)


class CaptureMapper:
    """Turns tracker output into flow records; keeps DNS names across calls."""

    def __init__(self, name: str, source: str = SOURCE_PCAP,
                 seen: set[tuple[object, ...]] | None = None):
        self.name = name
        self.source = source
        self.dns = DnsNames()
        self.stats = CaptureFlowStats()
        #: Connections already recorded from another capture (shared between the captures of
        #: one run): the same connection captured on the client's and the server's node.
        self.seen = seen

    def _unseen(self, out: TrackerOutput) -> TrackerOutput:
        """``out`` without the connections another capture already gave (same 5-tuple and
        client initial sequence number: the same TCP connection), nor their messages."""
        if self.seen is None or out.connections.num_rows == 0:
            return out
        conns = out.connections
        keys = zip(*(conns.column(c).to_pylist() for c in (
            "transport", "client_ip", "client_port", "server_ip", "server_port", "client_isn")),
            strict=True)
        keep = []
        for key in keys:
            if key[-1] is None:  # no handshake captured: nothing proves it is the same one
                keep.append(True)
            elif key in self.seen:
                keep.append(False)
            else:
                self.seen.add(key)
                keep.append(True)
        if all(keep):
            return out
        self.stats.duplicate_connections += keep.count(False)
        kept = conns.filter(bool_array(np.array(keep, dtype=bool)))
        http = out.http
        if http.num_rows:
            http = http.filter(pc.is_in(http.column("conn_id"), kept.column("conn_id")))
        return TrackerOutput(connections=kept, http=http)

    def records(self, out: TrackerOutput) -> pa.RecordBatch:
        """Flow records (FLOW_SCHEMA) for one tracker output: its connections, then the
        HTTP/1 requests (vectorized over every packet that starts a message), then the
        HTTP/2 and gRPC requests of the connections' first bytes."""
        out = self._unseen(out)
        conns = out.connections
        n = conns.num_rows
        if n == 0:
            return conform(pa.Table.from_arrays([pa.nulls(0, pa.string())], names=["kind"]))
        cols = {c: conns.column(c).to_pylist() for c in (
            "conn_id", "transport", "client_ip", "client_port", "server_ip", "server_port",
            "first_frame", "payload_c2s", "state", "ended", "client_head", "server_head",
        )}
        h1 = _http1_requests(out.http)
        with_h1 = set(np.unique(h1.conn_ids).tolist())
        # Each HTTP/1 connection's first Host header names the service it reached (requests
        # are in connection and frame order; an empty Host is null).
        named = np.flatnonzero(to_bool(pc.is_valid(h1.host)))
        _, first = np.unique(h1.conn_ids[named], return_index=True)
        first_host: dict[int, str] = dict(zip(
            h1.conn_ids[named[first]].tolist(),
            h1.host.take(int_array(named[first], pa.int64())).to_pylist(), strict=True))
        # Names first: a DNS answer in this output names the connections after it.
        infos: list[payload.StreamInfo] = []
        for i in range(n):
            origin = f"{self.name}:packet {cols['first_frame'][i]}"
            client, server = cols["client_head"][i] or b"", cols["server_head"][i] or b""
            if cols["conn_id"][i] in with_h1 and _HTTP1_START.match(client):
                # Cleartext HTTP/1: its requests come from the packets (vectorized below);
                # walking the head again would only repeat them.
                info = payload.StreamInfo(protocol=payload.PROTO_HTTP, mtls=payload.PLAINTEXT,
                                          reason="HTTP/1 request lines in the packets")
            elif cols["transport"][i] == "udp":
                info = payload.classify_datagrams(
                    [client] if client else [], [server] if server else [],
                    server_port=cols["server_port"][i], origin=origin)
            else:
                info = payload.classify_stream(client, server, server_port=cols["server_port"][i],
                                               origin=origin)
            if cols["conn_id"][i] in with_h1 and info.protocol in (payload.PROTO_TCP,
                                                                   payload.PROTO_HTTP):
                # HTTP/1 message starts in the packets, even where the head was too short
                # to tell: cleartext HTTP.
                info.protocol, info.mtls = payload.PROTO_HTTP, payload.PLAINTEXT
            if info.notes:
                self.stats.classify_notes += 1
            self.stats.dns_names += self.dns.learn(info)
            infos.append(info)

        first_ts = to_int(conns.column("first_ts_ns"))
        last_ts = to_int(conns.column("last_ts_ns"))
        # The connection records' columns that need each connection's classification (the
        # others come straight from the tracker's columns, below).
        rows: dict[str, list[Any]] = {k: [] for k in (
            "service_host", "protocol", "http_version", "mtls", "sni", "tcp_state", "tcp_end",
            "itemized")}
        h2_rows: dict[str, list[object]] = {k: [] for k in _ROW_KEYS}
        conn_host: dict[int, str | None] = {}
        for i, info in enumerate(infos):
            conn_id = cols["conn_id"][i]
            transport = cols["transport"][i]
            state = cols["state"][i]
            protocol = _APP_PROTOCOL.get(info.protocol, "udp" if transport == "udp" else "tcp")
            client_head = cols["client_head"][i] or b""
            whole = (cols["payload_c2s"][i] or 0) <= len(client_head)
            itemized = whole if protocol in ("http", "grpc") else None
            # HTTP/1 connections take their requests from the packets (below); the head's
            # requests serve HTTP/2 and gRPC.
            head_requests = [] if conn_id in with_h1 else [r for r in info.requests if r.method]
            first_request = head_requests[0] if head_requests else (
                info.requests[0] if info.requests else None)
            if first_request is None and conn_id in first_host:
                first_request = payload.HttpRequest(authority=first_host[conn_id])
            host = _service_host(info, first_request, cols["server_ip"][i], self.dns)
            conn_host[conn_id] = None if first_request is not None else host
            rows["service_host"].append(host)
            rows["protocol"].append(protocol)
            rows["http_version"].append(_http_version(info, first_request))
            rows["mtls"].append(info.mtls)
            rows["sni"].append(info.sni)
            rows["tcp_state"].append(state if transport == "tcp" else None)
            rows["tcp_end"].append(cols["ended"][i] if transport == "tcp" else None)
            rows["itemized"].append(itemized)
            self.stats.connections += 1
            if state in ("refused", "no-answer"):
                self.stats.failed += 1
            if itemized is False:
                self.stats.not_itemized += 1
            common = {
                "src_ip": cols["client_ip"][i], "src_port": cols["client_port"][i],
                "dst_ip": cols["server_ip"][i], "dst_port": cols["server_port"][i],
                "dialed_ip": cols["server_ip"][i], "dialed_port": cols["server_port"][i],
                "transport": transport, "mtls": info.mtls, "sni": info.sni,
                "source": self.source, "denied": False,
            } if head_requests else {}
            for req in head_requests:
                self._add(h2_rows, {
                    **common,
                    "kind": KIND_REQUEST,
                    "time": int(first_ts[i]) // 1000,
                    "protocol": "grpc" if req.grpc_service else protocol,
                    "http_version": _http_version(info, req),
                    "service_host": _service_host(info, req, cols["server_ip"][i], self.dns),
                    "method": req.method, "path": req.path, "authority": req.authority,
                    "status": req.status,
                    "origin": f"{self.name}:packet {cols['first_frame'][i]}",
                })
        server_ip, server_port = conns.column("server_ip"), conns.column("server_port")
        table: dict[str, pa.Array | pa.ChunkedArray] = {
            "time": int_array(first_ts // 1000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "duration_ms": int_array((last_ts - first_ts) // 1_000_000, pa.int64()),
            "src_ip": conns.column("client_ip"), "src_port": conns.column("client_port"),
            "dst_ip": server_ip, "dst_port": server_port,
            "dialed_ip": server_ip, "dialed_port": server_port,
            "transport": conns.column("transport"),
            "bytes_in": conns.column("payload_c2s"), "bytes_out": conns.column("payload_s2c"),
            "packets_in": conns.column("packets_c2s"), "packets_out": conns.column("packets_s2c"),
            "source": repeat_string(self.source, n), "denied": bool_array(np.zeros(n, dtype=bool)),
            "kind": repeat_string(KIND_CONNECTION, n),
            "origin": self._origins(conns.column("first_frame")),
            **{k: _column(v, FLOW_SCHEMA.field(k).type) for k, v in rows.items()},
        }
        parts = [conform(pa.Table.from_arrays(list(table.values()), names=list(table)))]
        if len(h1.conn_ids):
            parts.append(self._http1_batch(h1, conns, conn_host))
        if h2_rows["time"]:
            parts.append(_batch(h2_rows))
        for part in parts[1:]:
            self.stats.requests += part.num_rows
        return parts[0] if len(parts) == 1 else pa.concat_batches(parts)

    def _http1_batch(self, h1: _Http1, conns: pa.Table, hosts: dict[int, str | None]
                     ) -> pa.RecordBatch:
        """Request records for the HTTP/1 requests ``h1`` found, with their connection's
        endpoints."""
        ids = to_int(conns.column("conn_id"))
        order = np.argsort(ids, kind="stable")
        row = order[np.searchsorted(ids, h1.conn_ids, sorter=order)]
        take = int_array(row, pa.int64())
        m = len(row)
        authority = h1.host
        # The regexes run once per distinct authority (a capture repeats a few hosts).
        codes = pc.dictionary_encode(authority)
        bare = pc.replace_substring_regex(codes.dictionary, r"^\[([^\]]*)\](?::\d+)?$", r"\1")
        bare = pc.replace_substring_regex(bare, r"^([^:\[\]]+):\d+$", r"\1").take(codes.indices)
        fallback = _column([hosts.get(c) for c in ids.tolist()], pa.string()).take(take)
        denied = to_bool(h1.denied)
        table = {
            "time": int_array(h1.ts_ns // 1000, pa.int64()).cast(
                pa.timestamp("us", tz="UTC")),
            "src_ip": conns.column("client_ip").take(take),
            "src_port": conns.column("client_port").take(take),
            "dst_ip": conns.column("server_ip").take(take),
            "dst_port": conns.column("server_port").take(take),
            "dialed_ip": conns.column("server_ip").take(take),
            "dialed_port": conns.column("server_port").take(take),
            "service_host": pc.coalesce(bare, fallback),
            "transport": repeat_string("tcp", m),
            "protocol": repeat_string("http", m),
            "http_version": h1.version,
            "method": h1.method,
            "path": h1.path,
            "authority": authority,
            "status": h1.status,
            "mtls": repeat_string(payload.PLAINTEXT, m),
            "denied": h1.denied,
            "denied_by": repeat_string("rbac", m, denied),
            "source": repeat_string(self.source, m),
            "origin": self._origins(int_array(h1.frames, pa.int64())),
            "kind": repeat_string(KIND_REQUEST, m),
        }
        return conform(pa.Table.from_arrays(list(table.values()), names=list(table)))

    def _origins(self, frames: pa.Array | pa.ChunkedArray) -> pa.Array:
        """``'<name>:packet <frame>'`` for each frame number."""
        m = len(frames)
        if isinstance(frames, pa.ChunkedArray):
            frames = frames.combine_chunks()
        return pc.binary_join_element_wise(repeat_string(f"{self.name}:packet ", m),
                                           pc.cast(frames, pa.string()), repeat_string("", m))

    @staticmethod
    def _add(rows: dict[str, list[object]], row: dict[str, object]) -> None:
        for key in _ROW_KEYS:
            rows[key].append(row.get(key))


_ROW_KEYS = (
    "time", "duration_ms", "src_ip", "src_port", "dst_ip", "dst_port", "dialed_ip",
    "dialed_port", "service_host", "transport", "protocol", "http_version", "method", "path",
    "authority", "status", "bytes_in", "bytes_out", "mtls", "sni", "user_agent", "source",
    "origin", "denied", "denied_by", "kind", "packets_in", "packets_out", "tcp_state",
    "tcp_end", "itemized",
)


def _batch(rows: dict[str, list[object]]) -> pa.RecordBatch:
    names = list(rows)
    return conform(pa.Table.from_arrays(
        [_column(rows[k], FLOW_SCHEMA.field(k).type) for k in names], names=names))


# Arrow arrays here are built from buffers (observe.arrowlite), never with pa.array,
# pa.scalar, a Python literal in a compute call or Array.to_numpy: each of those imports
# pandas (~0.25 s of the process's time on the first call), which the capture path never needs.


def _column(values: list[Any], typ: pa.DataType) -> pa.Array:
    """An Arrow array of ``typ`` from Python values (None: null); what pa.array would give,
    cast to ``typ``."""
    n = len(values)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    if n and not valid.any():
        return pa.nulls(n, typ)
    if pa.types.is_string(typ):
        enc = [b"" if v is None else v.encode() for v in values]
        lengths = np.fromiter((len(v) for v in enc), dtype=np.int64, count=n)
        return binary_array(b"".join(enc), lengths, typ, valid)
    if pa.types.is_boolean(typ):
        return bool_array(np.fromiter((bool(v) for v in values), dtype=bool, count=n), valid)
    ints = np.fromiter((0 if v is None else v for v in values), dtype=np.int64, count=n)
    arr = int_array(ints, pa.int64(), valid)
    return arr if typ == pa.int64() else arr.cast(typ)


def _http_version(info: payload.StreamInfo, req: payload.HttpRequest | None) -> str | None:
    if info.protocol in (payload.PROTO_H2C, payload.PROTO_GRPC):
        return "HTTP/2"
    if req is not None and req.version:
        return req.version
    return None


# Request and status lines and the Host header, as parse_http1_message reads them.
_REQUEST_RE = (r"^(?P<method>[A-Z][A-Z0-9_-]{0,31}) (?P<target>[^ \r\n]+) "
               r"(?P<version>HTTP/1\.[01])\r?\n")
_STATUS_RE = r"^(?P<version>HTTP/1\.[01]) (?P<status>\d{3})"
# Header lines are non-empty: the lazy repetition cannot step over the blank line that ends them.
_HOST_RE = r"(?i)^[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*?host[ \t]*:[ \t]*(?P<host>[^\r\n]*?)[ \t]*\r?\n"
_HTTP1_START = re.compile(rb"[A-Z][A-Z0-9_-]{0,31} [^ \r\n]+ HTTP/1\.[01]\r?\n")
#: The body Envoy's RBAC filter answers a denied request with (HTTP 403).
RBAC_DENIED_BODY = "RBAC: access denied"


@dataclass
class _Http1:
    """HTTP/1 requests found in message-start packets, in (connection, frame) order."""

    conn_ids: np.ndarray
    frames: np.ndarray
    ts_ns: np.ndarray
    method: pa.Array
    path: pa.Array
    version: pa.Array
    host: pa.Array
    status: pa.Array
    """The paired response's status (final responses pair with requests in order)."""
    denied: pa.Array
    """The response was Envoy's RBAC denial (403, body 'RBAC: access denied')."""


def _text(col: pa.Array) -> pa.Array:
    """Binary regex groups as strings (invalid UTF-8 replaced: paths are not always UTF-8)."""
    try:
        return col.cast(pa.string())
    except pa.ArrowInvalid:
        return _column([None if v is None else v.decode("utf-8", "replace")
                        for v in col.to_pylist()], pa.string())


def _ranks(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of ``groups`` (already sorted)."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - first


def _host_headers(data: pa.Array) -> pa.Array:
    """The Host header of each request message (null if none): searched in the first KiB,
    where clients put it, then in the whole message for the few that don't have it there."""
    head = pc.binary_slice(data, 0, 1024)
    host = pc.struct_field(pc.extract_regex(head, _HOST_RE), "host")
    missing = np.flatnonzero((pc.is_null(host).to_numpy(zero_copy_only=False))
                             & (pc.binary_length(data).to_numpy(zero_copy_only=False) > 1024))
    if len(missing):
        again = pc.struct_field(pc.extract_regex(data.take(pa.array(missing)), _HOST_RE),
                                "host")
        values = host.to_pylist()
        for i, v in zip(missing.tolist(), again.to_pylist(), strict=True):
            values[i] = v
        host = pa.array(values, host.type)
    return host


def _http1_requests(http: pa.Table) -> _Http1:
    """Requests of every HTTP/1 message-start packet, vectorized, with paired statuses.

    Pipelining rule (RFC 9112): the k-th final response (>= 200, or 101) of a connection
    answers its k-th request; interim 1xx responses answer nothing. The compiled kernel
    (``http1_scan``) reads the lines the regexes of :func:`_http1_requests_re` read, in one
    pass and without pandas; the tests check that both give the same.
    """
    if pcapcut is None or not _pcap.USE_KERNEL or http.num_rows == 0 or any(
            http.column(c).null_count for c in ("conn_id", "frame", "ts_ns", "direction",
                                                 "data")):
        return _http1_requests_re(http)
    conn = to_int(http.column("conn_id"))
    frame = to_int(http.column("frame"))
    ts = to_int(http.column("ts_ns"))
    data = http.column("data").combine_chunks()
    offs = np.frombuffer(data.buffers()[1], dtype=np.int32)[
        data.offset: data.offset + len(data) + 1]
    values = data.buffers()[2] or b""
    kind_b, status_b, spans_b = pcapcut.http1_scan(offs, values, _is_c2s(http.column(
        "direction")))
    order = np.lexsort((frame, conn))
    conn, frame = conn[order], frame[order]
    kind = np.frombuffer(kind_b, dtype=np.uint8)[order]
    status_all = np.frombuffer(status_b, dtype=np.int32)[order]
    spans = np.frombuffer(spans_b, dtype=np.int64).reshape(-1, 8)
    req_idx, resp_idx = np.flatnonzero(kind == 1), np.flatnonzero(kind >= 2)
    paired, partner = _pair(conn, req_idx, resp_idx)
    status = status_all[np.where(paired, partner, 0)]
    denied = paired & (kind[np.where(paired, partner, 0)] == 3)
    fields = spans[order[req_idx]]

    def text(k: int, valid: np.ndarray | None = None) -> pa.Array:
        lengths = np.maximum(fields[:, k + 1], 0)
        got = pcapcut.gather(values, np.ascontiguousarray(fields[:, k]), lengths)
        return _text(binary_array(got, lengths, pa.binary(), valid))

    return _Http1(
        conn_ids=conn[req_idx], frames=frame[req_idx], ts_ns=ts[order][req_idx],
        method=text(0), path=text(2), version=text(4), host=text(6, fields[:, 7] > 0),
        status=int_array(status, pa.int32(), paired),
        denied=bool_array(denied),
    )


def _is_c2s(direction: pa.ChunkedArray) -> np.ndarray:
    """1 where the tracker's direction column says c2s, as uint8."""
    arr = direction.combine_chunks()
    offs = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    raw = np.frombuffer(arr.buffers()[2] or b"", dtype=np.uint8)
    out = (offs[1:] - offs[:-1]) == 3
    pick = offs[:-1][out]
    if len(pick):
        out[out] = (raw[pick] == ord("c")) & (raw[pick + 1] == ord("2")) & (
            raw[pick + 2] == ord("s"))
    return out.astype(np.uint8)


def _pair(conn: np.ndarray, req_idx: np.ndarray, resp_idx: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """For each request (rows ``req_idx`` of ``conn``, sorted): whether a final response
    answers it, and that response's row (-1 if none)."""
    req_rank, resp_rank = _ranks(conn[req_idx]), _ranks(conn[resp_idx])
    req_key = conn[req_idx].astype(np.int64) * (1 << 32) + req_rank
    resp_key = conn[resp_idx].astype(np.int64) * (1 << 32) + resp_rank
    pos = np.searchsorted(resp_key, req_key)
    pos_c = np.minimum(pos, max(len(resp_key) - 1, 0))
    paired = (pos < len(resp_key)) & (resp_key[pos_c] == req_key) if len(resp_key) else \
        np.zeros(len(req_key), dtype=bool)
    partner = np.where(paired, resp_idx[pos_c] if len(resp_idx) else 0, -1)
    return paired, partner


def _http1_requests_re(http: pa.Table) -> _Http1:
    """:func:`_http1_requests` with Arrow's regexes (without the compiled kernel)."""
    empty = np.zeros(0, dtype=np.int64)
    none = pa.nulls(0, pa.string())
    if http.num_rows == 0:
        return _Http1(empty, empty, empty, none, none, none, none, pa.nulls(0, pa.int32()),
                      pa.nulls(0, pa.bool_()))
    conn = http.column("conn_id").to_numpy()
    frame = http.column("frame").to_numpy()
    order = np.lexsort((frame, conn))
    http = http.take(pa.array(order))
    conn, frame = conn[order], frame[order]
    data = http.column("data").combine_chunks()
    c2s = pc.equal(http.column("direction"), "c2s").combine_chunks()
    req = pc.extract_regex(data, _REQUEST_RE)
    is_req = pc.fill_null(pc.and_(req.is_valid(), c2s), False).to_numpy(zero_copy_only=False)
    resp = pc.extract_regex(data, _STATUS_RE)
    status_all = pc.cast(pc.struct_field(resp, "status").cast(pa.string()), pa.int32())
    final = pc.and_(pc.or_(pc.greater_equal(status_all, 200), pc.equal(status_all, 101)),
                    pc.invert(c2s))
    is_final = pc.fill_null(pc.and_(resp.is_valid(), final), False).to_numpy(
        zero_copy_only=False)
    req_idx, resp_idx = np.flatnonzero(is_req), np.flatnonzero(is_final)
    req_rank, resp_rank = _ranks(conn[req_idx]), _ranks(conn[resp_idx])
    # Pair (conn, rank) of requests with (conn, rank) of final responses.
    req_key = conn[req_idx].astype(np.int64) * (1 << 32) + req_rank
    resp_key = conn[resp_idx].astype(np.int64) * (1 << 32) + resp_rank
    pos = np.searchsorted(resp_key, req_key)
    pos_c = np.minimum(pos, max(len(resp_key) - 1, 0))
    paired = (pos < len(resp_key)) & (resp_key[pos_c] == req_key) if len(resp_key) else \
        np.zeros(len(req_key), dtype=bool)
    partner = np.where(paired, resp_idx[pos_c] if len(resp_idx) else 0, -1)
    take_req = pa.array(req_idx)
    statuses = status_all.take(pa.array(np.where(paired, partner, 0)))
    status = pc.if_else(pa.array(paired), statuses, pa.scalar(None, pa.int32()))
    # Only 403 answers can be RBAC denials: search their bodies alone.
    rbac = np.zeros(len(conn), dtype=bool)
    forbidden = np.flatnonzero(pc.fill_null(pc.equal(status_all, 403), False).to_numpy(
        zero_copy_only=False))
    if len(forbidden):
        rbac[forbidden] = pc.fill_null(pc.match_substring(
            data.take(pa.array(forbidden)), RBAC_DENIED_BODY), False).to_numpy(
                zero_copy_only=False)
    denied = pa.array(paired & rbac[np.where(paired, partner, 0)])
    fields = req.take(take_req)
    host = _host_headers(data.take(take_req))
    host_ok = pc.fill_null(pc.greater(pc.binary_length(host), 0), False)
    return _Http1(
        conn_ids=conn[req_idx], frames=frame[req_idx],
        ts_ns=http.column("ts_ns").to_numpy()[req_idx],
        method=_text(pc.struct_field(fields, "method")),
        path=_text(pc.struct_field(fields, "target")),
        version=_text(pc.struct_field(fields, "version")),
        host=pc.if_else(host_ok, _text(host), pa.scalar(None, pa.string())),
        status=status,
        denied=denied,
    )


def capture_batches(
    stream: BinaryIO, name: str, *, source: str = SOURCE_PCAP, stats: CaptureStats | None = None,
    mapper: CaptureMapper | None = None, tracker: ConnectionTracker | None = None,
) -> Iterator[pa.RecordBatch]:
    """Flow records of one capture file, streamed: connections are emitted as they end.

    The reader decodes ahead on its own thread (see :func:`observe.pcap.read_packets`) and
    mapping runs on another while this one tracks the next batch; records come out in order.
    """
    stats = stats if stats is not None else CaptureStats(name)
    mapper = mapper or CaptureMapper(name, source)
    tracker = tracker or ConnectionTracker(idle_timeout_s=IDLE_TIMEOUT_S)
    pending: deque[Future[pa.RecordBatch]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="meshwright-capture-map") as pool:
        try:
            for number, batch in enumerate(read_packets(stream, name, stats=stats), 1):
                mapper.stats.packets += len(batch)
                tracker.update(batch)
                if number % FLUSH_EVERY_BATCHES:
                    continue
                flushed = tracker.flush()
                if flushed.connections.num_rows:
                    pending.append(pool.submit(mapper.records, flushed))
                while pending and (pending[0].done() or len(pending) > 2):
                    yield pending.popleft().result()
            rest = tracker.finish()
            if rest.connections.num_rows:
                pending.append(pool.submit(mapper.records, rest))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class LiveRun:
    """Flow records of a live capture as it runs (iterate once); ``stats`` grow meanwhile."""

    def __init__(self, chunks: Iterator[LiveChunk], name: str,
                 tracker: ConnectionTracker | None = None):
        self.chunks = chunks
        self.mapper = CaptureMapper(name, SOURCE_LIVE)
        self.tracker = tracker or ConnectionTracker(idle_timeout_s=IDLE_TIMEOUT_S)
        self.live: LiveStats | None = None

    @property
    def stats(self) -> CaptureFlowStats:
        return self.mapper.stats

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for chunk in self.chunks:
            self.live = chunk.stats
            for batch in chunk.batches:
                self.mapper.stats.packets += len(batch)
                self.tracker.update(batch)
            # Connections idle past the tracker's timeout (by the kernel's clock) are done.
            out = self.tracker.finish() if chunk.final else self.tracker.flush(chunk.now_ns)
            if out.connections.num_rows:
                yield self.mapper.records(out)


def live_batches(chunks: Iterator[LiveChunk], name: str) -> LiveRun:
    """Flow records from :func:`observe.live.capture_live` chunks; the final chunk (after a
    stop, a signal included) emits every connection still open."""
    return LiveRun(chunks, name)
