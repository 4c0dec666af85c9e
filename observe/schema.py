"""The flow record: the one schema every source produces and every later stage reads.

A flow record is one request (HTTP/gRPC) or one connection (opaque TCP) between a client
and a server, as one piece of evidence saw it. Readers yield ``pyarrow.RecordBatch`` objects
with exactly :data:`FLOW_SCHEMA`; flows persist to Parquet with the same schema so a dump
analysed today can be re-learned later.

Orientation is always client -> server, whichever side reported the record: ``src_*`` is the
client, ``dst_*`` the server endpoint that handled it. ``direction`` says which side wrote it.

Observe fills what its evidence proves. The learn stage fills ``src_workload`` and
``dst_workload`` (resolved identities); observe leaves them null unless the evidence itself
names the workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

#: Values of the ``mtls`` column.
MTLS_STATES = ("mtls", "tls", "plaintext", "unknown")
#: Values of the ``kind`` column (null counts as a request).
KIND_REQUEST, KIND_CONNECTION = "request", "connection"
#: ``tcp_state`` values of connections that never carried traffic (failed attempts).
FAILED_STATES = ("refused", "no-answer")
#: Values of the ``direction`` column.
DIRECTIONS = ("inbound", "outbound", "unknown")

#: Schema version written into Parquet metadata; bump on incompatible change.
SCHEMA_VERSION = "2"
#: Fields added by each version after "1": older files lack them and read them as null.
ADDED_IN = {"2": ("kind", "packets_in", "packets_out", "tcp_state", "tcp_end", "itemized",
                  "pid", "comm", "container_id", "pod_uid")}
#: Versions this one reads.
READABLE_VERSIONS = ("1", *ADDED_IN)


@dataclass(frozen=True)
class Field:
    name: str
    type: pa.DataType
    doc: str


TIMESTAMP = pa.timestamp("us", tz="UTC")

FIELDS: tuple[Field, ...] = (
    Field("time", TIMESTAMP, "When the request or connection started (UTC, microseconds)."),
    Field("duration_ms", pa.int64(), "How long it lasted, in milliseconds; null if unknown."),
    Field("src_ip", pa.string(), "Client IP address (IPv4 or IPv6 text); null if not logged."),
    Field("src_port", pa.int32(), "Client port; null if not logged."),
    Field("dst_ip", pa.string(), "Server endpoint IP that handled it (a pod IP when known)."),
    Field("dst_port", pa.int32(), "Server endpoint port: the workload's port (targetPort)."),
    Field("dialed_ip", pa.string(), "Address the client dialled (often a Service ClusterIP)."),
    Field("dialed_port", pa.int32(), "Port the client dialled (often the Service port)."),
    Field(
        "service_host", pa.string(),
        "Destination host named by the evidence (cluster FQDN, SNI).",
    ),
    Field("direction", pa.string(), "Which side reported it: inbound (server), outbound (client)."),
    Field("reporter", pa.string(), "'<namespace>/<pod>' whose proxy wrote the record, if known."),
    Field(
        "src_workload", pa.string(),
        "Resolved client node id ('<ns>/<workload>', 'external:..').",
    ),
    Field(
        "dst_workload", pa.string(),
        "Resolved server node id ('<ns>/<workload>', 'external:..').",
    ),
    Field("src_pod", pa.string(), "Resolved client pod '<ns>/<pod>' (filled by learn)."),
    Field("dst_pod", pa.string(), "Resolved server pod '<ns>/<pod>' (filled by learn)."),
    Field(
        "src_principal", pa.string(),
        "Client identity the evidence proves ('<td>/ns/<ns>/sa/<sa>').",
    ),
    Field(
        "dst_principal", pa.string(),
        "Server identity the evidence proves ('<td>/ns/<ns>/sa/<sa>').",
    ),
    Field("transport", pa.string(), "Transport protocol: 'tcp' or 'udp'."),
    Field("protocol", pa.string(), "Application protocol: 'http', 'grpc', 'tcp' (opaque), 'tls'."),
    Field(
        "http_version", pa.string(),
        "HTTP version as logged ('HTTP/1.1', 'HTTP/2'); null for TCP.",
    ),
    Field("method", pa.string(), "HTTP method; null for TCP."),
    Field("path", pa.string(), "HTTP path as logged (original path, query string kept)."),
    Field("authority", pa.string(), "HTTP :authority / Host header."),
    Field("status", pa.int32(), "HTTP status (or 0 for TCP / no response); null if not logged."),
    Field("response_flags", pa.string(), "Envoy response flags ('-' none, 'UF', 'URX', ...)."),
    Field("response_detail", pa.string(), "Envoy response code details ('via_upstream', ...)."),
    Field("bytes_in", pa.int64(), "Bytes from client to server (request body or TCP upstream)."),
    Field("bytes_out", pa.int64(), "Bytes from server to client (response body or TCP)."),
    Field("mtls", pa.string(), "Transport security: 'mtls' | 'tls' | 'plaintext' | 'unknown'."),
    Field("sni", pa.string(), "TLS server name requested by the client, if any."),
    Field(
        "upstream_cluster", pa.string(),
        "Envoy upstream cluster ('inbound|80||', 'outbound|..').",
    ),
    Field("request_id", pa.string(), "x-request-id, shared by both sides of one request."),
    Field("user_agent", pa.string(), "HTTP User-Agent."),
    Field("denied", pa.bool_(), "True when an existing policy rejected it (RBAC 403 / reset)."),
    Field("denied_by", pa.string(), "The policy that rejected it, as the proxy named it."),
    Field("source", pa.string(), "Reader that produced it ('istio-text', 'istio-json', ...)."),
    Field("origin", pa.string(), "Evidence location: '<file>:<line>' (or '<file>:packet <n>')."),
    Field(
        "kind", pa.string(),
        "'connection': a transport connection seen below the application (packets, eBPF); "
        "'request' (or null, as proxies log it): one request, or one proxied TCP stream.",
    ),
    Field("packets_in", pa.int64(), "Packets from client to server (packet evidence)."),
    Field("packets_out", pa.int64(), "Packets from server to client (packet evidence)."),
    Field(
        "tcp_state", pa.string(),
        "Connection setup: 'established', 'refused' (SYN answered by RST), 'no-answer', "
        "'midstream' (capture began inside it).",
    ),
    Field("tcp_end", pa.string(), "How the connection ended: 'fin', 'rst', 'timeout', 'open'."),
    Field(
        "itemized", pa.bool_(),
        "Connections: True when every request it carried has its own record (the payload was "
        "seen whole); False when requests may be missing.",
    ),
    Field(
        "pid", pa.int64(),
        "Process id on the reporting side (eBPF: the client's connect(), the server's accept()).",
    ),
    Field("comm", pa.string(), "Command name of that process (the kernel's 16-byte comm)."),
    Field(
        "container_id", pa.string(),
        "Container of that process, from its cgroup (runtime id, 64 hex digits).",
    ),
    Field(
        "pod_uid", pa.string(),
        "Pod UID of that process, from its cgroup: learn takes the pod with this UID as the "
        "reporting side, whatever its address.",
    ),
)

FLOW_SCHEMA: pa.Schema = pa.schema(
    [pa.field(f.name, f.type, nullable=True, metadata={"doc": f.doc}) for f in FIELDS],
    metadata={"meshwright.schema_version": SCHEMA_VERSION},
)

FIELD_DOCS: dict[str, str] = {f.name: f.doc for f in FIELDS}


def empty_batch() -> pa.RecordBatch:
    """A batch with the flow schema and no rows."""
    return pa.RecordBatch.from_pylist([], schema=FLOW_SCHEMA)


def conform(table: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    """Cast/extend ``table`` to exactly FLOW_SCHEMA: missing columns become nulls.

    Readers build the columns they know and call this once per batch.
    """
    n = table.num_rows
    columns = []
    for f in FLOW_SCHEMA:
        if f.name in table.column_names:
            col = table.column(f.name)
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            if col.type != f.type:
                col = col.cast(f.type)
            columns.append(col)
        else:
            columns.append(pa.nulls(n, type=f.type))
    return pa.RecordBatch.from_arrays(columns, schema=FLOW_SCHEMA)


def schema_markdown() -> str:
    """The schema as a Markdown table (used in the README and docs)."""
    rows = ["| field | type | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {f.type} | {f.doc} |" for f in FIELDS]
    return "\n".join(rows) + "\n"


#: Columns the learn stage fills; cleared before re-learning a flows file.
LEARNED_COLUMNS = ("src_workload", "dst_workload", "src_pod", "dst_pod")


def without_learned(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with the learned identity columns nulled, to resolve them afresh."""
    columns = [
        pa.nulls(batch.num_rows, type=f.type) if f.name in LEARNED_COLUMNS else batch.column(i)
        for i, f in enumerate(batch.schema)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)
