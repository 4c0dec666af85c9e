"""Linkerd proxy HTTP access logs -> flow records (:data:`observe.schema.FLOW_SCHEMA`).

Linkerd writes an access log when a workload (or its namespace) carries the annotation
``config.linkerd.io/access-log: apache`` or ``json`` (docs:
https://linkerd.io/2/features/access-logging/). The proxy writes one line per HTTP request it
served **inbound** to its own pod, on the ``linkerd-proxy`` container's stderr, so the lines
appear in ``kubectl logs <pod> -c linkerd-proxy`` beside the proxy's own diagnostics (stdout).

The exact shape comes from linkerd2-proxy (``linkerd/http/access-log/src/lib.rs``: the span and
its fields; ``linkerd/tracing/src/access_log.rs``: the two writers):

* span fields, in this order: ``client.addr`` (the peer's ``SocketAddr``: ``ip:port`` or
  ``[ipv6]:port``), ``client.id`` (the peer's mTLS identity, ``-`` without one), ``timestamp``
  (RFC 3339 with up to nanoseconds, when the request arrived), ``method``, ``uri``
  (``http::Uri`` as received: absolute form ``http://webapp:7000/authors`` on meshed HTTP/2,
  origin form ``/ping`` on plain HTTP/1), ``version`` (``HTTP/1.1``, ``HTTP/2.0``...),
  ``trace_id`` (``x-b3-traceid``, else ``x-request-id``, else ``x-amzn-trace-id``),
  ``request_bytes`` (request ``content-length``), then recorded when the response is ready:
  ``status``, ``response_bytes`` (response ``content-length``), ``total_ns``,
  ``processing_ns``; and ``user_agent``, ``host`` (the ``Host`` header).
* ``apache``: ``<client.addr> <client.id> - [<timestamp>] "<method> <uri> <version>"
  <status>``; every other field is skipped. When the inner service fails there is no response
  and the line ends after the version (status null here).
* ``json``: tracing-subscriber's JSON fields, one object per line, keys sorted; ``status`` is
  a JSON number, every other value a string (``""`` when the header was absent).

Identities: Linkerd's mTLS identity of a pod is
``<serviceaccount>.<namespace>.serviceaccount.identity.<control-plane-ns>.<trust-domain>``
(``LINKERD2_PROXY_IDENTITY_LOCAL_NAME`` in linkerd2's proxy injector template); the trust
domain is usually ``cluster.local`` and the control-plane namespace ``linkerd``. The identity is
kept verbatim in ``src_principal`` (see :func:`parse_identity`); ``-`` or empty is no identity.

Mapping (one record per line, ``kind`` ``request``, ``direction`` ``inbound``: the server-side
proxy wrote it, so the log file's own pod is the destination and ``reporter`` comes from the dump
layout exactly as for Istio lines):

* ``src_ip``/``src_port`` = ``client.addr``; ``src_principal`` = ``client.id``; ``mtls`` is
  ``mtls`` with an identity, else ``plaintext`` (the inbound proxy terminates mesh TLS; traffic
  it logs without a client identity arrived in the clear, e.g. kubelet probes).
* ``method``, ``path`` (the URI's path and query; ``/`` for an absolute URI without path; null
  for CONNECT's authority form), ``authority`` (the URI's authority, else the ``Host`` header),
  ``status``, ``bytes_in``/``bytes_out`` (request/response ``content-length``: header values,
  not counted bytes), ``duration_ms`` (``total_ns`` // 10^6), ``user_agent``, ``http_version``
  (``HTTP/2.0`` is written ``HTTP/2`` and ``HTTP/3.0`` ``HTTP/3`` as in the other sources),
  ``protocol`` (``grpc`` for HTTP/2 POSTs to ``/pkg.Service/Method`` or with a ``grpc-`` user
  agent, else ``http``).
* The server's port: Linkerd logs no local address. The authority's port is the port the
  *client dialled* (``webapp:7000``: the Service port of ``webapp``; a kubelet probe's
  ``10.42.0.69:7000``: the pod's own port), so it goes to ``dialed_port`` (``80``/``443`` by
  the URI scheme when the authority has none; the ``Host`` header defaults to ``80``) and
  ``dialed_ip`` holds the authority's host when that is an IP literal. ``dst_ip``/``dst_port``
  stay null: the learn stage derives the workload port from the inventory (Service port ->
  targetPort of a Service selecting the reporter's workload, as for Istio outbound lines that
  reached a ClusterIP), because writing the Service port into ``dst_port`` would be wrong
  whenever port and targetPort differ (emojivoto's ``web-svc`` 80 -> 8080). ``service_host``
  is the authority's host when it is a name.
* Not logged by Linkerd, left null: ``dst_ip``, ``request_id`` (``trace_id`` is a trace's id,
  shared by many requests), ``denied`` (a 403 from the proxy's policy and one from the app
  look the same in the log), Envoy-only fields.

Everything runs per chunk with pyarrow compute (regex extraction, casts); JSON lines go through
pyarrow's C++ JSON reader in blocks with an explicit schema, bisecting around blocks it rejects
down to a per-line orjson reading, so a malformed line costs a few re-reads, never a wrong row.
Malformed lines are reported as ``(index, reason)`` in :class:`ParsedLines`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from observe.envoy_format import MAX_DIGITS, ParsedLines
from observe.envoy_json import json_value
from observe.schema import FLOW_SCHEMA, KIND_REQUEST

SOURCE_APACHE = "linkerd-apache"
SOURCE_JSON = "linkerd-json"

#: Canonical field names (string columns of :attr:`ParsedLines.fields`) and their JSON keys.
JSON_KEYS: dict[str, str] = {
    "client_addr": "client.addr",
    "client_id": "client.id",
    "timestamp": "timestamp",
    "method": "method",
    "uri": "uri",
    "version": "version",
    "status": "status",
    "host": "host",
    "user_agent": "user_agent",
    "total_ns": "total_ns",
    "processing_ns": "processing_ns",
    "request_bytes": "request_bytes",
    "response_bytes": "response_bytes",
    "trace_id": "trace_id",
}
FIELDS: tuple[str, ...] = tuple(JSON_KEYS)
#: Fields the apache format carries (the rest are null there).
APACHE_FIELDS = ("client_addr", "client_id", "timestamp", "method", "uri", "version", "status")

_STR = pa.string()
_ADDR = r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):\d{1,5}"
#: A line that starts like an apache access line (an ``ip:port`` and a space): a candidate.
APACHE_HEAD = rf"^{_ADDR} "
APACHE_RE = (
    r"^(?P<client_addr>\S+) (?P<client_id>\S+) - \[(?P<timestamp>[^\]\s]+)\] "
    r'"(?P<method>[^\s"]+) (?P<uri>[^\s"]+) (?P<version>[^\s"]+)"(?: (?P<status>\d+))?$'
)
#: A JSON object with the keys every Linkerd access record has: a candidate.
JSON_HEAD = r'^\s*\{.*"client\.addr"\s*:.*"uri"\s*:'
_ADDR_RE = (
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<ip4>\d{1,3}(?:\.\d{1,3}){3})):(?P<port>\d{1,5})$"
)
_TIME_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)$"
_VERSION_RE = r"^HTTP/\d(?:\.\d)?$"
_URI_RE = r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<auth>[^/?#]*))?(?P<rest>[^#]*)"
_HOSTPORT_RE = r"^(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>\d{1,5}))?$"
_IPV4_RE = r"^\d{1,3}(?:\.\d{1,3}){3}$"
_GRPC_PATH_RE = r"^/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$"
_IDENTITY_RE = re.compile(
    r"^(?P<sa>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.(?P<ns>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)"
    r"\.serviceaccount\.identity\.(?P<cp>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.(?P<td>[^/\s]+)$"
)

# Reasons for malformed lines.
NOT_APACHE = "not a Linkerd apache access line (truncated?)"
NOT_JSON = "not valid JSON (truncated line?)"
NOT_LINKERD = "JSON object is not a Linkerd access-log record"
BAD_ADDR = "client.addr is not ip:port"
BAD_TIME = "timestamp is not an RFC 3339 time"
BAD_REQUEST = "method, uri or version missing or malformed"
BAD_STATUS = "status is not a number"
EMPTY = "empty line"

#: JSON blocks at most this long are read line by line instead of bisected further.
MIN_BISECT = 16
_TS_NS = pa.timestamp("ns", tz="UTC")
_TS_US = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class LinkerdIdentity:
    """The parts of a Linkerd proxy identity (a DNS-like name)."""

    service_account: str
    namespace: str
    control_plane: str
    """Namespace of the control plane that issued it (``linkerd``)."""
    trust_domain: str
    """The identity trust domain (``cluster.local`` by default)."""

    @property
    def name(self) -> str:
        return (f"{self.service_account}.{self.namespace}.serviceaccount.identity."
                f"{self.control_plane}.{self.trust_domain}")


def parse_identity(value: str | None) -> LinkerdIdentity | None:
    """``<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>`` split up, or None.

    >>> parse_identity("web.emojivoto.serviceaccount.identity.linkerd.cluster.local").namespace
    'emojivoto'
    """
    if not value:
        return None
    m = _IDENTITY_RE.match(value.lower().rstrip("."))
    if m is None:
        return None
    return LinkerdIdentity(m["sa"], m["ns"], m["cp"], m["td"])


def identity_name(service_account: str, namespace: str, *, control_plane: str = "linkerd",
                  trust_domain: str = "cluster.local") -> str:
    """The Linkerd identity of pods running as ``service_account`` in ``namespace``."""
    return LinkerdIdentity(service_account, namespace, control_plane, trust_domain).name


# --------------------------------------------------------------------------- parsing


def _mask(arr: pa.Array) -> pa.Array:
    return pc.fill_null(arr, False)


def _nullify(arr: pa.Array) -> pa.Array:
    """``""`` and ``"-"`` (Linkerd's "none") as null."""
    empty = _mask(pc.or_(pc.equal(arr, ""), pc.equal(arr, "-")))
    if not pc.any(empty).as_py():
        return arr
    return pc.if_else(empty, pa.scalar(None, _STR), arr)


def _as_array(lines: pa.Array | list[str | None]) -> pa.StringArray:
    if not isinstance(lines, pa.Array):
        lines = pa.array(lines, _STR)
    if lines.type == pa.large_string():
        lines = lines.cast(_STR)
    return lines


def parse_apache(lines: pa.Array | list[str | None]) -> ParsedLines:
    """Parse ``apache`` access lines: one string column per :data:`FIELDS` name (null where
    the format has none), rows = the good lines in input order."""
    lines = _as_array(lines)
    parts = pc.extract_regex(lines, APACHE_RE)
    matched = _mask(parts.is_valid()).to_numpy(zero_copy_only=False)
    n = len(lines)
    errors: list[tuple[int, str]] = []
    for i in np.flatnonzero(~matched).tolist():
        line = lines[i].as_py()
        errors.append((i, EMPTY if not line or not line.strip() else NOT_APACHE))
    rows = np.flatnonzero(matched)
    sub = parts if len(rows) == n else parts.take(pa.array(rows))
    cols = {
        name: (_nullify(pc.struct_field(sub, [APACHE_FIELDS.index(name)]))
               if name in APACHE_FIELDS else pa.nulls(len(rows), _STR))
        for name in FIELDS
    }
    table = pa.table(cols)
    return _checked(table, rows, n, errors)


class _JsonReader:
    """Braced JSON lines through Arrow's reader in blocks; bisects around what it rejects."""

    def __init__(self, lines: pa.StringArray, indices: np.ndarray) -> None:
        self.joined = pc.binary_join_element_wise(lines, "\n", "")
        self.offsets = np.frombuffer(self.joined.buffers()[1], dtype=np.int32,
                                     count=len(self.joined) + 1, offset=self.joined.offset * 4)
        self.indices = indices
        self.tables: list[tuple[pa.Table, np.ndarray]] = []
        self.slow: list[int] = []  # positions into ``indices`` read line by line

    def run(self, lo: int, hi: int) -> None:
        if hi - lo <= MIN_BISECT:
            self.slow.extend(range(lo, hi))
            return
        table = self._try(lo, hi)
        if table is not None:
            self.tables.append((table, self.indices[lo:hi]))
            return
        mid = (lo + hi) // 2
        self.run(lo, mid)
        self.run(mid, hi)

    def _try(self, lo: int, hi: int) -> pa.Table | None:
        data = self.joined.buffers()[2]
        assert data is not None
        start, end = int(self.offsets[lo]), int(self.offsets[hi])
        schema = pa.schema([(key, pa.int64() if name == "status" else _STR)
                            for name, key in JSON_KEYS.items()])
        try:
            table = pj.read_json(
                pa.BufferReader(data.slice(start, end - start)),
                read_options=pj.ReadOptions(use_threads=True, block_size=1 << 20),
                parse_options=pj.ParseOptions(explicit_schema=schema,
                                              unexpected_field_behavior="ignore",
                                              newlines_in_values=False),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        if table.num_rows != hi - lo:
            return None
        return pa.table({name: _nullify(table.column(key).combine_chunks().cast(_STR))
                         for name, key in JSON_KEYS.items()})


def _braced(lines: pa.StringArray) -> np.ndarray:
    n = len(lines)
    bufs = lines.buffers()
    if n == 0 or bufs[2] is None:
        return np.zeros(n, dtype=bool)
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=lines.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    if len(data) == 0:
        return np.zeros(n, dtype=bool)
    starts, ends = offs[:-1], offs[1:]
    mask = (ends - starts) >= 2
    mask &= np.take(data, starts, mode="clip") == ord("{")
    mask &= np.take(data, ends - 1, mode="clip") == ord("}")
    if lines.null_count:
        mask &= lines.is_valid().to_numpy(zero_copy_only=False)
    return mask


def _json_record(line: str | None) -> dict[str, str | None] | str:
    """One line's values by canonical name, or the reason it is malformed."""
    if line is None or not line.strip():
        return EMPTY
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return NOT_JSON
    if not isinstance(obj, dict) or "client.addr" not in obj or "uri" not in obj:
        return NOT_LINKERD
    out: dict[str, str | None] = {}
    for name, key in JSON_KEYS.items():
        value = json_value(obj.get(key))
        out[name] = value if value else None
    return out


def parse_json(lines: pa.Array | list[str | None]) -> ParsedLines:
    """Parse ``json`` access lines (keys in any order; a repeated key keeps its last value
    on the per-line path, and sends its block there on the fast path)."""
    lines = _as_array(lines)
    n = len(lines)
    errors: list[tuple[int, str]] = []
    parts: list[tuple[pa.Table, np.ndarray]] = []
    braced = _braced(lines)
    fast = np.flatnonzero(braced)
    slow = np.flatnonzero(~braced).tolist()
    if len(fast):
        reader = _JsonReader(lines if len(fast) == n else lines.take(pa.array(fast)), fast)
        reader.run(0, len(fast))
        parts += reader.tables
        slow += [int(fast[j]) for j in reader.slow]
    if slow:
        slow.sort()
        records: list[dict[str, str | None]] = []
        good_idx: list[int] = []
        for i in slow:
            rec = _json_record(lines[i].as_py())
            if isinstance(rec, str):
                errors.append((i, rec))
            else:
                records.append(rec)
                good_idx.append(i)
        if records:
            parts.append((
                pa.table({name: pa.array([r[name] for r in records], _STR) for name in FIELDS}),
                np.asarray(good_idx, dtype=np.int64),
            ))
    if parts:
        table = pa.concat_tables([t for t, _ in parts]) if len(parts) > 1 else parts[0][0]
        rows = np.concatenate([idx for _, idx in parts]).astype(np.int64)
        order = np.argsort(rows, kind="stable")
        if not np.all(order == np.arange(len(order))):
            table = table.take(pa.array(order))
            rows = rows[order]
    else:
        table = pa.table({name: pa.array([], _STR) for name in FIELDS})
        rows = np.zeros(0, dtype=np.int64)
    return _checked(table, rows, n, errors)


def _real_times(col: pa.Array) -> pa.Array:
    """False where an RFC 3339-shaped value is no real instant (month 13, February 30)."""
    try:
        col.cast(_TS_NS)
        return pa.array(np.ones(len(col), dtype=bool))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    good: dict[str, bool] = {}
    for value in pc.unique(col.drop_null()).to_pylist():
        try:
            pa.array([value], _STR).cast(_TS_NS)
            good[value] = True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            good[value] = False
    return pa.array([v is None or good[v] for v in col.to_pylist()], pa.bool_())


def _checked(table: pa.Table, rows: np.ndarray, n: int,
             errors: list[tuple[int, str]]) -> ParsedLines:
    """Drop rows whose values are not what Linkerd writes; every drop gets a reason."""
    m = table.num_rows
    good = np.zeros(n, dtype=bool)
    if m:
        col = {name: table.column(name).combine_chunks() for name in FIELDS}
        addr_ok = _mask(pc.match_substring_regex(col["client_addr"], _ADDR_RE))
        shaped = _mask(pc.match_substring_regex(col["timestamp"], _TIME_RE))
        time_ok = pc.and_(shaped, _real_times(pc.if_else(shaped, col["timestamp"], None)))
        request_ok = pc.and_(
            pc.and_(col["method"].is_valid(), col["uri"].is_valid()),
            _mask(pc.match_substring_regex(col["version"], _VERSION_RE)),
        )
        status = col["status"]
        status_ok = pc.or_(status.is_null(), _mask(pc.and_(
            pc.ascii_is_decimal(status), pc.less_equal(pc.binary_length(status), MAX_DIGITS))))
        checks = ((addr_ok, BAD_ADDR), (time_ok, BAD_TIME), (request_ok, BAD_REQUEST),
                  (status_ok, BAD_STATUS))
        ok = np.ones(m, dtype=bool)
        for mask, reason in checks:
            arr = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            for j in np.flatnonzero(ok & ~arr).tolist():
                errors.append((int(rows[j]), reason))
            ok &= arr
        if not ok.all():
            table = table.filter(pa.array(ok))
            rows = rows[ok]
        good[rows] = True
    errors.sort()
    return ParsedLines(fields=table, good=good, errors=errors)


# --------------------------------------------------------------------------- mapping


def _blank_null(value: pa.Array) -> pa.Array:
    """An unmatched optional regex group ("") as null."""
    return pc.if_else(_mask(pc.equal(value, "")), pa.scalar(None, _STR), value)


def _group(arr: pa.Array, pattern: str, name: str) -> pa.Array:
    parts = pc.extract_regex(arr, pattern)
    names = [f.name for f in parts.type]
    return _blank_null(pc.struct_field(parts, [names.index(name)]))


def _const(n: int, value: str) -> pa.Array:
    return pa.repeat(pa.scalar(value, _STR), n)


def _int(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    ok = _mask(pc.and_(pc.ascii_is_decimal(arr), pc.less_equal(pc.binary_length(arr), MAX_DIGITS)))
    out = pc.if_else(ok, arr, pa.scalar(None, _STR)).cast(pa.int64())
    if typ == pa.int32():
        out = pc.if_else(_mask(pc.less_equal(out, 2**31 - 1)), out, None).cast(pa.int32())
    return out


def _port(arr: pa.Array) -> pa.Array:
    """Port numbers; null beyond 65535."""
    out = _int(arr, pa.int32())
    return pc.if_else(_mask(pc.less_equal(out, 65535)), out, pa.scalar(None, pa.int32()))


def to_flows(fields: pa.Table, *, reporter: pa.Array | None, origin: pa.Array,
             source: str) -> pa.RecordBatch:
    """Flow records for parsed Linkerd fields (see the module docstring for the mapping).

    ``reporter`` is ``<ns>/<pod>`` of the pod whose proxy wrote each line (the destination),
    or None; ``origin`` the ``file:line`` of each row.
    """
    n = fields.num_rows
    if len(origin) != n or (reporter is not None and len(reporter) != n):
        raise ValueError("origin/reporter must have one entry per row of fields")

    def col(name: str) -> pa.Array:
        if name not in fields.column_names:
            return pa.nulls(n, _STR)
        return fields.column(name).combine_chunks()

    addr = pc.extract_regex(col("client_addr"), _ADDR_RE)
    src_ip = pc.coalesce(_blank_null(pc.struct_field(addr, [0])),
                         _blank_null(pc.struct_field(addr, [1])))
    src_port = _port(pc.struct_field(addr, [2]))

    uri, method = col("uri"), col("method")
    scheme = _group(uri, _URI_RE, "scheme")
    uri_auth = _group(uri, _URI_RE, "auth")
    rest = pc.struct_field(pc.extract_regex(uri, _URI_RE), [2])
    absolute = scheme.is_valid()
    origin_form = _mask(pc.or_(pc.starts_with(rest, "/"), pc.equal(rest, "*")))
    rooted = pc.binary_join_element_wise(pa.scalar("/", _STR), rest, "")
    path = pc.if_else(origin_form, rest,
                      pc.if_else(absolute, rooted, pa.scalar(None, _STR)))
    # CONNECT host:port (authority form): the URI is the authority itself.
    connect_auth = pc.if_else(pc.or_(absolute, origin_form), pa.scalar(None, _STR), uri)
    host_header = col("host")
    authority = pc.coalesce(uri_auth, connect_auth, host_header)

    hostport = pc.extract_regex(authority, _HOSTPORT_RE)
    host = _blank_null(pc.struct_field(hostport, [0]))
    explicit = _port(pc.struct_field(hostport, [1]))
    scheme_l = pc.utf8_lower(scheme)
    default = pc.if_else(_mask(pc.equal(scheme_l, "https")), 443,
                         pc.if_else(_mask(pc.equal(scheme_l, "http")), 80,
                                    pc.if_else(pc.and_(uri_auth.is_null(),
                                                       host_header.is_valid()), 80, None)))
    dialed_port = pc.coalesce(explicit, default.cast(pa.int32()))
    bracketed = _mask(pc.starts_with(host, "["))
    unbracketed = pc.utf8_slice_codeunits(host, 1, -1)
    ip6 = pc.if_else(bracketed, unbracketed, pa.scalar(None, _STR))
    ip4 = pc.if_else(_mask(pc.match_substring_regex(host, _IPV4_RE)), host,
                     pa.scalar(None, _STR))
    dialed_ip = pc.coalesce(ip4, ip6)
    name = pc.utf8_rtrim(pc.utf8_lower(host), ".")
    service_host = _blank_null(pc.if_else(dialed_ip.is_valid(), pa.scalar(None, _STR), name))

    version = col("version")
    version = pc.replace_substring_regex(version, r"^HTTP/([23])\.0$", r"HTTP/\1")
    ua = col("user_agent")
    h2_post = pc.and_(_mask(pc.equal(version, "HTTP/2")), _mask(pc.equal(method, "POST")))
    grpc = pc.and_(h2_post, pc.or_(_mask(pc.match_substring_regex(path, _GRPC_PATH_RE)),
                                   _mask(pc.starts_with(ua, "grpc-"))))
    client_id = col("client_id")
    total_ns = _int(col("total_ns"), pa.int64())

    columns: dict[str, pa.Array] = {
        "time": col("timestamp").cast(_TS_NS).cast(_TS_US, safe=False),
        "duration_ms": pc.divide(total_ns, 1_000_000),
        "src_ip": src_ip,
        "src_port": src_port,
        "dialed_ip": dialed_ip,
        "dialed_port": dialed_port,
        "service_host": service_host,
        "direction": _const(n, "inbound"),
        "reporter": reporter if reporter is not None else pa.nulls(n, _STR),
        "src_principal": client_id,
        "transport": _const(n, "tcp"),
        "protocol": pc.if_else(grpc, "grpc", "http"),
        "http_version": version,
        "method": method,
        "path": path,
        "authority": authority,
        "status": _int(col("status"), pa.int32()),
        "bytes_in": _int(col("request_bytes"), pa.int64()),
        "bytes_out": _int(col("response_bytes"), pa.int64()),
        "mtls": pc.if_else(client_id.is_valid(), "mtls", "plaintext"),
        "user_agent": ua,
        "source": _const(n, source),
        "origin": origin,
        "kind": _const(n, KIND_REQUEST),
    }
    arrays = []
    for f in FLOW_SCHEMA:
        value = columns.get(f.name)
        if value is None:
            value = pa.nulls(n, f.type)
        elif value.type != f.type:
            value = value.cast(f.type)
        arrays.append(value)
    return pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)


def parse(lines: pa.Array | list[str | None], source: str) -> ParsedLines:
    """:func:`parse_apache` or :func:`parse_json` by ``source``."""
    if source == SOURCE_APACHE:
        return parse_apache(lines)
    if source == SOURCE_JSON:
        return parse_json(lines)
    raise ValueError(f"not a Linkerd source: {source!r}")


__all__ = [
    "APACHE_HEAD",
    "JSON_HEAD",
    "SOURCE_APACHE",
    "SOURCE_JSON",
    "LinkerdIdentity",
    "identity_name",
    "parse",
    "parse_apache",
    "parse_identity",
    "parse_json",
    "to_flows",
]
