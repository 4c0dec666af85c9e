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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pyarrow as pa

from observe import payload
from observe.conntrack import ConnectionTracker, TrackerOutput
from observe.pcap import CaptureStats, read_packets
from observe.schema import KIND_CONNECTION, KIND_REQUEST, conform

if TYPE_CHECKING:
    from observe.live import LiveChunk, LiveStats

log = logging.getLogger(__name__)

SOURCE_PCAP = "pcap"
SOURCE_LIVE = "live"

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

    def __init__(self, name: str, source: str = SOURCE_PCAP):
        self.name = name
        self.source = source
        self.dns = DnsNames()
        self.stats = CaptureFlowStats()

    def records(self, out: TrackerOutput) -> pa.RecordBatch:
        """Flow records (FLOW_SCHEMA) for one tracker output, in connection order."""
        conns = out.connections
        n = conns.num_rows
        if n == 0:
            return conform(pa.table({"kind": pa.array([], pa.string())}))
        http = _http_by_connection(out.http)
        cols = {c: conns.column(c).to_pylist() for c in (
            "conn_id", "transport", "client_ip", "client_port", "server_ip", "server_port",
            "first_ts_ns", "last_ts_ns", "first_frame", "packets_c2s", "packets_s2c",
            "payload_c2s", "payload_s2c", "state", "ended", "client_head", "server_head",
        )}
        # Names first: a DNS answer in this output names the connections after it.
        infos: list[payload.StreamInfo] = []
        for i in range(n):
            origin = f"{self.name}:packet {cols['first_frame'][i]}"
            client, server = cols["client_head"][i] or b"", cols["server_head"][i] or b""
            if cols["transport"][i] == "udp":
                info = payload.classify_datagrams(
                    [client] if client else [], [server] if server else [],
                    server_port=cols["server_port"][i], origin=origin)
            else:
                info = payload.classify_stream(client, server, server_port=cols["server_port"][i],
                                               origin=origin)
            if info.notes:
                self.stats.classify_notes += 1
            self.stats.dns_names += self.dns.learn(info)
            infos.append(info)

        rows: dict[str, list[object]] = {k: [] for k in _ROW_KEYS}
        for i, info in enumerate(infos):
            conn_id = cols["conn_id"][i]
            transport = cols["transport"][i]
            state = cols["state"][i]
            messages = http.get(conn_id)
            if messages and info.protocol in (payload.PROTO_TCP, payload.PROTO_HTTP):
                # HTTP/1 message starts in the packets, even where the head was too short to
                # tell: cleartext HTTP.
                info.protocol, info.mtls = payload.PROTO_HTTP, payload.PLAINTEXT
            protocol = _APP_PROTOCOL.get(info.protocol, "udp" if transport == "udp" else "tcp")
            requests, from_packets = _requests(info, messages)
            client_head = cols["client_head"][i] or b""
            whole = (cols["payload_c2s"][i] or 0) <= len(client_head)
            itemized = whole if protocol in ("http", "grpc") else None
            first_ts, last_ts = cols["first_ts_ns"][i], cols["last_ts_ns"][i]
            common = {
                "src_ip": cols["client_ip"][i], "src_port": cols["client_port"][i],
                "dst_ip": cols["server_ip"][i], "dst_port": cols["server_port"][i],
                "dialed_ip": cols["server_ip"][i], "dialed_port": cols["server_port"][i],
                "transport": transport, "mtls": info.mtls, "sni": info.sni,
                "source": self.source, "denied": False,
            }
            first_request = next((r for r in requests if r.method), None)
            self._add(rows, {
                **common,
                "kind": KIND_CONNECTION,
                "time": first_ts // 1000,
                "duration_ms": (last_ts - first_ts) // 1_000_000,
                "protocol": protocol,
                "http_version": _http_version(info, first_request),
                "service_host": _service_host(info, first_request, cols["server_ip"][i],
                                              self.dns),
                "bytes_in": cols["payload_c2s"][i], "bytes_out": cols["payload_s2c"][i],
                "packets_in": cols["packets_c2s"][i], "packets_out": cols["packets_s2c"][i],
                "tcp_state": state if transport == "tcp" else None,
                "tcp_end": cols["ended"][i] if transport == "tcp" else None,
                "itemized": itemized,
                "origin": f"{self.name}:packet {cols['first_frame'][i]}",
            })
            self.stats.connections += 1
            if state in ("refused", "no-answer"):
                self.stats.failed += 1
            if itemized is False:
                self.stats.not_itemized += 1
            for req, (frame, ts) in zip(requests, from_packets, strict=True):
                if not req.method:
                    continue  # a response whose request the capture missed
                self._add(rows, {
                    **common,
                    "kind": KIND_REQUEST,
                    "time": (ts if ts is not None else first_ts) // 1000,
                    "protocol": "grpc" if req.grpc_service else protocol,
                    "http_version": _http_version(info, req),
                    "service_host": _service_host(info, req, cols["server_ip"][i], self.dns),
                    "method": req.method, "path": req.path, "authority": req.authority,
                    "status": req.status,
                    "user_agent": None,
                    "origin": f"{self.name}:packet {frame or cols['first_frame'][i]}",
                })
                self.stats.requests += 1
        return _batch(rows)

    @staticmethod
    def _add(rows: dict[str, list[object]], row: dict[str, object]) -> None:
        for key in _ROW_KEYS:
            rows[key].append(row.get(key))


_ROW_KEYS = (
    "time", "duration_ms", "src_ip", "src_port", "dst_ip", "dst_port", "dialed_ip",
    "dialed_port", "service_host", "transport", "protocol", "http_version", "method", "path",
    "authority", "status", "bytes_in", "bytes_out", "mtls", "sni", "user_agent", "source",
    "origin", "denied", "kind", "packets_in", "packets_out", "tcp_state", "tcp_end", "itemized",
)


def _batch(rows: dict[str, list[object]]) -> pa.RecordBatch:
    table = pa.table({
        **{k: v for k, v in rows.items() if k not in ("time",)},
        "time": pa.array(rows["time"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
    })
    return conform(table)


def _http_version(info: payload.StreamInfo, req: payload.HttpRequest | None) -> str | None:
    if info.protocol in (payload.PROTO_H2C, payload.PROTO_GRPC):
        return "HTTP/2"
    if req is not None and req.version:
        return req.version
    return None


def _http_by_connection(http: pa.Table) -> dict[int, list[tuple[int, int, bool, bytes]]]:
    """HTTP/1 message starts per connection: (frame, ts_ns, from client, data), in order."""
    out: dict[int, list[tuple[int, int, bool, bytes]]] = {}
    if http.num_rows == 0:
        return out
    for conn, frame, ts, direction, data in zip(
        http.column("conn_id").to_pylist(), http.column("frame").to_pylist(),
        http.column("ts_ns").to_pylist(), http.column("direction").to_pylist(),
        http.column("data").to_pylist(), strict=True,
    ):
        out.setdefault(conn, []).append((frame, ts, direction == "c2s", data))
    return out


def _requests(
    info: payload.StreamInfo, messages: list[tuple[int, int, bool, bytes]] | None
) -> tuple[list[payload.HttpRequest], list[tuple[int | None, int | None]]]:
    """The connection's requests and, per request, (frame, ts_ns) of the packet it began in.

    HTTP/1 requests come from every packet that starts a message (all of a keep-alive
    connection's, not only those in its first bytes); HTTP/2 and gRPC from the head.
    """
    if info.protocol == payload.PROTO_HTTP and messages:
        parsed: list[tuple[bool, payload.Http1Message]] = []
        where: list[tuple[int, int]] = []
        for frame, ts, from_client, data in messages:
            msg = payload.parse_http1_message(data)
            if msg is None:
                continue
            parsed.append((from_client, msg))
            if msg.is_request and from_client:
                where.append((frame, ts))
        paired = payload.pair_http1(parsed)
        # pair_http1 keeps requests in order and appends status-only entries for responses
        # without a request; map frames onto the request entries in order.
        frames: list[tuple[int | None, int | None]] = []
        it = iter(where)
        for req in paired:
            frames.append(next(it, (None, None)) if req.method else (None, None))
        return paired, frames
    return list(info.requests), [(None, None)] * len(info.requests)


def capture_batches(
    stream: BinaryIO, name: str, *, source: str = SOURCE_PCAP, stats: CaptureStats | None = None,
    mapper: CaptureMapper | None = None, tracker: ConnectionTracker | None = None,
) -> Iterator[pa.RecordBatch]:
    """Flow records of one capture file, streamed: connections are emitted as they end."""
    stats = stats if stats is not None else CaptureStats(name)
    mapper = mapper or CaptureMapper(name, source)
    tracker = tracker or ConnectionTracker()
    for batch in read_packets(stream, name, stats=stats):
        mapper.stats.packets += len(batch)
        tracker.update(batch)
        flushed = tracker.flush()
        if flushed.connections.num_rows:
            yield mapper.records(flushed)
    rest = tracker.finish()
    if rest.connections.num_rows:
        yield mapper.records(rest)


class LiveRun:
    """Flow records of a live capture as it runs (iterate once); ``stats`` grow meanwhile."""

    def __init__(self, chunks: Iterator[LiveChunk], name: str,
                 tracker: ConnectionTracker | None = None):
        self.chunks = chunks
        self.mapper = CaptureMapper(name, SOURCE_LIVE)
        self.tracker = tracker or ConnectionTracker()
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


def frame_numbers(origins: pa.Array) -> np.ndarray:
    """Packet numbers of ``'<file>:packet <n>'`` origins (tests and reports)."""
    return np.array([int(str(o).rsplit(" ", 1)[1]) for o in origins.to_pylist()], dtype=np.int64)
