"""Map parsed Envoy/Istio access-log fields to flow records (:data:`observe.schema.FLOW_SCHEMA`).

Everything is vectorized with pyarrow compute; no Python loop per row.

Direction (which proxy side wrote the line) comes from ``upstream_cluster``: ``inbound|..``,
``inbound-vip|..`` (waypoints) and ``InboundPassthroughCluster*`` are server-side lines;
``outbound|..``, ``PassthroughCluster`` and ``BlackHoleCluster`` client-side lines; anything else
is ``unknown``.

Orientation is client -> server whichever side logged it:

* inbound (sidecar): src = ``downstream_remote_address`` (the client), dst = dialed =
  ``downstream_local_address`` (the pod IP and the workload port, i.e. the targetPort).
* inbound-vip (waypoint): the waypoint received the request on the Service VIP, so dialed =
  ``downstream_local_address`` (VIP:port) and dst = the endpoint in ``upstream_host``
  (``envoy://connect_originate/<pod-ip>:<port>``); src = ``downstream_remote_address``.
* outbound: src = ``upstream_local_address`` (the proxy's own pod IP and the ephemeral port the
  server side sees as its downstream remote; falls back to ``downstream_remote_address`` when
  not logged), dst = ``upstream_host`` (endpoint pod IP:targetPort; ``downstream_local_address``
  when ``-``), dialed = ``downstream_local_address`` (often the Service ClusterIP:port).

Addresses may be ``ip:port``, ``[ipv6]:port`` or ``scheme://name/ip:port``; anything without an
IP (``envoy://internal_client_address/``) becomes null.

Gateways: an outbound line whose ``downstream_remote`` IP differs from its ``upstream_local``
IP was written by a proxy forwarding someone else's traffic (ingress/egress gateway). Besides
the outbound record (gateway -> upstream) a second record is emitted right after it for the
downstream leg: direction ``inbound``, src = ``downstream_remote`` (the gateway's client), dst =
dialed = ``downstream_local`` (the gateway pod and its listen port), same request fields, mTLS
judged from the SNI like any server-side line. When ``upstream_local`` is ``-`` (pre-1.9 lines
often) a gateway cannot be told from a sidecar and only the outbound record is written.

mTLS (only the server side can tell): inbound + SNI ``outbound_.<port>_.<subset>_.<fqdn>``
(Istio's mTLS SNI) = ``mtls``; other SNI = ``tls``; no SNI = ``plaintext``. Waypoint lines are
``unknown``: their listener sits behind the HBONE tunnel and logs no SNI either way. Client-side
lines are ``unknown`` (the client proxy does not log its upstream TLS), except opaque TCP with
an SNI that is not Istio's: the application itself spoke TLS, so ``tls``.

Protocol: a ``-`` method, path or protocol means a TCP proxy line (``"- - -"``) -> ``tcp``;
HTTP/2 POST whose path looks like ``/package.Service/Method`` or whose user agent starts with
``grpc-`` -> ``grpc`` (heuristic: content-type is not logged by default); else ``http``.

Denials: ``response_code_details`` (HTTP) or ``connection_termination_details`` (TCP, Envoy's
network RBAC filter, envoyproxy/envoy#13305) starting with ``rbac_access_denied`` marks the
record denied; ``denied_by`` is the bracketed part: ``ns[NS]-policy[NAME]-rule[N]`` or ``none``
(no ALLOW policy matched). Only the server side that enforced it logs this; the client side
sees a plain upstream 403 (``via_upstream``).

``service_host``: the FQDN of ``outbound|port|subset|fqdn`` / ``inbound-vip|port|http|fqdn``,
else of an Istio SNI, else (Passthrough/BlackHole clusters and gateway legs) the authority's
host or the SNI.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from observe import arrowlite
from observe.compiled import textcut as _textcut
from observe.envoy_format import MAX_DIGITS, cut_strings
from observe.schema import FLOW_SCHEMA, KIND_REQUEST

log = logging.getLogger(__name__)

_STR = pa.string()
# Scalars for compute calls: a Python literal there makes pyarrow import pandas (~0.2 s).
_FALSE = arrowlite.bool_scalar(False)
_EMPTY = arrowlite.string_scalar("")
_NULL = arrowlite.null_scalar(_STR)
_MAX_DIGITS = arrowlite.int_scalar(MAX_DIGITS, pa.int32())
_LITERALS: dict[str, pa.Scalar] = {}


def _lit(text: str) -> pa.Scalar:
    """A string scalar for a compute call (made once per text)."""
    got = _LITERALS.get(text)
    if got is None:
        got = _LITERALS[text] = arrowlite.string_scalar(text)
    return got
_ADDR_RE = (
    r"^(?:[a-z][a-z0-9+.-]*://(?:[^/]*/)?)?"
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<ip4>\d{1,3}(?:\.\d{1,3}){3}))"
    r"(?::(?P<port>\d{1,5}))?$"
)
# _ADDR_RE without the port: matched against the part before ``:port``.
_HEAD_RE = (
    r"^(?:[a-z][a-z0-9+.-]*://(?:[^/]*/)?)?"
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<ip4>\d{1,3}(?:\.\d{1,3}){3}))$"
)
_CLUSTER_RE = r"^(?:outbound|inbound-vip)\|(?P<port>[^|]*)\|(?P<subset>[^|]*)\|(?P<host>[^|]+)$"
# Istio's mTLS SNI: outbound_.<port>_.<subset>_.<fqdn> (pilot networking util BuildDNSSrvSubsetKey)
_SNI_RE = r"^outbound_\.(?P<port>\d+)_\.(?P<subset>[^_]*)_\.(?P<host>.+)$"
_AUTHORITY_RE = r"^(?P<host>\[[^\]]*\]|[^:]+)(?::\d+)?$"
_GRPC_PATH_RE = r"^/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$"
_DENIED_RE = r"^rbac_access_denied_matched_policy\[(?P<policy>.*)\]$"
_ISO_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})$"
_EPOCH_RE = r"^\d{9,11}(\.\d+)?$"


#: The parsed fields :func:`flow_batches` reads (``parse_text(columns=...)`` cuts only these).
FIELDS_USED: frozenset[str] = frozenset(
    {
        "start_time", "method", "path", "protocol", "response_code", "response_flags",
        "response_code_details", "connection_termination_details", "bytes_received",
        "bytes_sent", "duration", "user_agent", "request_id", "authority", "upstream_host",
        "upstream_cluster", "upstream_local_address", "downstream_local_address",
        "downstream_remote_address", "requested_server_name",
    }
)


def _col(fields: pa.Table, name: str) -> pa.Array:
    if name not in fields.column_names:
        return pa.nulls(fields.num_rows, _STR)
    chunked = fields.column(name)
    # combine_chunks copies even a single chunk; the parser hands over one chunk per column.
    col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    return col.cast(_STR) if col.type != _STR else col


def _mask(arr: pa.Array) -> pa.Array:
    """Boolean array with nulls as False."""
    return pc.fill_null(arr, _FALSE)


def _group_plain(arr: pa.Array, pattern: str, name: str) -> pa.Array:
    st = pc.extract_regex(arr, pattern)
    val = pc.struct_field(st, name)
    # Non-matching rows come back as a null struct whose children hold ''.
    return pc.if_else(_mask(pc.and_(st.is_valid(), pc.not_equal(val, _EMPTY))), val, _NULL)


def _group(arr: pa.Array, pattern: str, name: str) -> pa.Array:
    """Named group of ``pattern`` in each value; null where no match or empty.

    Regexes run once per distinct value (clusters, SNIs, authorities repeat a lot).
    """
    enc = pc.dictionary_encode(arr)
    return _group_plain(enc.dictionary, pattern, name).take(enc.indices)


def _address_plain(arr: pa.Array) -> tuple[pa.Array, pa.Array]:
    st = pc.extract_regex(arr, _ADDR_RE)
    ok = st.is_valid()
    ip6, ip4, port = (pc.struct_field(st, f) for f in ("ip6", "ip4", "port"))
    ip = pc.if_else(_mask(pc.not_equal(ip6, _EMPTY)), ip6, ip4)
    ip = pc.if_else(_mask(pc.and_(ok, pc.not_equal(ip, _EMPTY))), ip, _NULL)
    port = pc.if_else(_mask(pc.and_(ok, pc.not_equal(port, _EMPTY))), port, _NULL)
    return ip, port.cast(pa.int32())


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets, end offsets, data bytes) of a StringArray, for numpy work."""
    n = len(arr)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
    return offs[:-1].astype(np.int64), offs[1:].astype(np.int64), data


_PORT_WEIGHTS = np.array([10**k for k in range(5)], dtype=np.int32)


def _addresses_compiled(arr: pa.Array) -> tuple[pa.Array, pa.Array] | None:
    """:func:`_address` by the compiled kernel; None when a value needs the regex."""
    validity, offsets, data = arr.buffers()
    if data is None:
        return None
    got = _textcut.addresses(offsets, data, validity, len(arr), arr.offset)
    if got is None:
        return None
    ip_offs, ip_vals, ip_bits, ip_nulls, ports, port_bits, port_nulls = got
    n = len(arr)
    ip = pa.StringArray.from_buffers(
        n, pa.py_buffer(ip_offs), pa.py_buffer(ip_vals), pa.py_buffer(ip_bits), ip_nulls
    )
    port = pa.Array.from_buffers(
        pa.int32(), n, [pa.py_buffer(port_bits), pa.py_buffer(ports)], port_nulls
    )
    return ip, port


def _address(arr: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(ip, port) of each address; exactly :data:`_ADDR_RE`'s groups, computed cheaply.

    An address is ``head`` plus an optional ``:port`` (1-5 digits after the last colon): the
    port is cut with numpy, and the head (IPs repeat a lot, ephemeral ports do not) is matched
    against the regex once per distinct value.
    """
    n = len(arr)
    if n == 0 or arr.null_count == n:
        return pa.nulls(n, _STR), pa.nulls(n, pa.int32())
    if _textcut is not None:
        split = _addresses_compiled(arr)
        if split is not None:
            return split
    # Remote addresses carry ephemeral ports (nearly all distinct): a sample tells cheaply
    # whether encoding the whole column is worth it.
    sample = arr.slice(0, 4096)
    if len(pc.unique(sample)) * 4 <= len(sample):
        enc = pc.dictionary_encode(arr)
        if len(enc.dictionary) * 4 <= n:  # few distinct addresses: regex them directly
            ip, port = _address_plain(enc.dictionary)
            return ip.take(enc.indices), port.take(enc.indices)
    starts, ends, data = _string_parts(arr)
    if data.size == 0:  # only empty strings: nothing for the byte gathers to look at
        return _address_plain(arr)
    # A port is 1-5 digits after the last colon, so only the last 6 bytes matter: a few 1-D
    # gathers instead of locating every colon of the column.
    room = ends - starts
    plen = np.zeros(n, dtype=np.int64)
    for k in range(5, 0, -1):  # the nearest colon to the end wins
        hit = (room > k) & (np.take(data, ends - k - 1, mode="clip") == 58)
        plen[hit] = k
    has_port = plen > 0
    value = np.zeros(n, dtype=np.int32)
    for j in range(1, 6):
        digit = np.take(data, ends - j, mode="clip") - np.uint8(48)  # wraps: non-digits > 9
        used = plen >= j
        has_port &= ~used | (digit <= 9)
        value += np.where(used, digit.astype(np.int32) * _PORT_WEIGHTS[j - 1], 0)
    colon = ends - plen - 1
    valid = arrowlite.validity(arr)
    head = cut_strings(arr.buffers()[2], starts, np.where(has_port, colon, ends), valid)
    henc = pc.dictionary_encode(head)
    hip = _group_plain(henc.dictionary, _HEAD_RE, "ip6")
    hip = pc.coalesce(hip, _group_plain(henc.dictionary, _HEAD_RE, "ip4"))
    ip = hip.take(henc.indices)
    port_ok = has_port & arrowlite.validity(ip)
    port = arrowlite.int_array(value, pa.int32(), valid=port_ok)
    return ip, port


def _grpc_paths(path: pa.Array, rows: pa.Array) -> pa.Array:
    """Where ``path`` looks like ``/package.Service/Method``; the regex runs on ``rows`` only
    (False elsewhere)."""
    sel = arrowlite.to_bool(rows)
    out = np.zeros(len(path), dtype=bool)
    idx = np.flatnonzero(sel)
    if len(idx):
        hits = pc.match_substring_regex(path.take(arrowlite.int_array(idx)), _GRPC_PATH_RE)
        out[idx] = arrowlite.to_bool(hits)
    return arrowlite.bool_array(out)


_INT32_MAX = 2**31 - 1


def _int(arr: pa.Array, typ: pa.DataType, checked: bool = False) -> pa.Array:
    """Numbers of a numeric field; null for '-' and for values that are no such number.

    ``checked``: the TEXT parser already made every value digits (at most
    ``envoy_format.MAX_DIGITS``) or null. An int32 field (the status) gets null beyond int32:
    no HTTP or gRPC status is that large.
    """
    if not checked:
        ok = _mask(pc.and_(pc.ascii_is_decimal(arr),
                           pc.less_equal(pc.binary_length(arr), _MAX_DIGITS)))
        arr = pc.if_else(ok, arr, _NULL)
    out = arr.cast(pa.int64())
    if typ == pa.int32():
        big = pc.max(out).as_py()
        if big is not None and big > _INT32_MAX:
            out = pc.if_else(_mask(pc.less_equal(out, arrowlite.int_scalar(_INT32_MAX))), out,
                             arrowlite.null_scalar(pa.int64()))
        out = out.cast(pa.int32())
    return out


def _time(arr: pa.Array, iso_checked: bool = False) -> pa.Array:
    """%START_TIME% values: RFC3339 (Envoy's default) or epoch seconds (``%s.%3f`` formats).

    ``iso_checked``: the caller already matched every value against the RFC3339 pattern.
    """
    ts_type = pa.timestamp("us", tz="UTC")
    if iso_checked:
        return arr.cast(ts_type)
    iso = _mask(pc.match_substring_regex(arr, _ISO_RE))
    out = pc.if_else(iso, arr, _NULL).cast(ts_type)
    epoch = _mask(pc.match_substring_regex(arr, _EPOCH_RE))
    if pc.any(epoch).as_py():
        secs = pc.if_else(epoch, arr, _NULL).cast(pa.float64())
        micros = pc.round(pc.multiply(secs, arrowlite.float_scalar(1e6)))
        micros = micros.cast(pa.int64()).cast(ts_type)
        out = pc.if_else(epoch, micros, out)
    return out


def _const(n: int, value: str) -> pa.Array:
    raw = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(raw)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw * n))


def to_flows(
    fields: pa.Table,
    *,
    reporter: pa.Array | None,
    origin: pa.Array,
    source: str,
    checked: bool = False,
) -> pa.RecordBatch:
    """Flow records (FLOW_SCHEMA) for parsed Envoy fields: :func:`flow_batches` in one batch,
    each gateway's downstream-leg record right after its outbound record."""
    main, legs, rows = flow_batches(
        fields, reporter=reporter, origin=origin, source=source, checked=checked
    )
    if legs is None:
        return main
    return pa.concat_batches([main, legs]).take(
        arrowlite.int_array(_interleave(main.num_rows, rows), pa.int64()))


def flow_batches(
    fields: pa.Table,
    *,
    reporter: pa.Array | None,
    origin: pa.Array,
    source: str,
    checked: bool = False,
) -> tuple[pa.RecordBatch, pa.RecordBatch | None, np.ndarray]:
    """Flow records (FLOW_SCHEMA) for parsed Envoy fields (one row per line, '-' already null).

    ``(records, downstream legs or None, rows of records the legs belong to)``.

    ``reporter`` is '<ns>/<pod>' of the proxy that wrote each line (or None), ``origin`` the
    'file:line' of each row. Gateway lines yield two records (see the module docstring); the
    legs come as a separate batch so that a streaming caller need not interleave (a gather of
    every column) them.
    ``checked``: the fields come from the TEXT parser, which made every ``start_time`` RFC3339
    and every number digits or null, so those checks are not repeated.
    """
    n = fields.num_rows
    if len(origin) != n or (reporter is not None and len(reporter) != n):
        raise ValueError("origin/reporter must have one entry per row of fields")
    uc = _col(fields, "upstream_cluster")
    sni = _col(fields, "requested_server_name")
    method, path, proto = (_col(fields, c) for c in ("method", "path", "protocol"))
    ua = _col(fields, "user_agent")
    authority = _col(fields, "authority")
    rcd = _col(fields, "response_code_details")
    ctd = _col(fields, "connection_termination_details")

    inbound_sidecar = _mask(
        pc.or_(pc.starts_with(uc, "inbound|"), pc.starts_with(uc, "InboundPassthroughCluster"))
    )
    waypoint = _mask(pc.starts_with(uc, "inbound-vip|"))
    passthrough = _mask(pc.is_in(uc, arrowlite.string_array(["PassthroughCluster",
                                                             "BlackHoleCluster"])))
    outbound = pc.or_(_mask(pc.starts_with(uc, "outbound|")), passthrough)
    inbound = pc.or_(inbound_sidecar, waypoint)
    direction = pc.if_else(inbound, _lit("inbound"),
                           pc.if_else(outbound, _lit("outbound"), _lit("unknown")))

    dra_ip, dra_port = _address(_col(fields, "downstream_remote_address"))
    dla_ip, dla_port = _address(_col(fields, "downstream_local_address"))
    ula_ip, ula_port = _address(_col(fields, "upstream_local_address"))
    uh_ip, uh_port = _address(_col(fields, "upstream_host"))

    use_ula = pc.and_(outbound, ula_ip.is_valid())
    src_ip = pc.if_else(use_ula, ula_ip, dra_ip)
    src_port = pc.if_else(use_ula, ula_port, dra_port)
    use_uh = pc.and_(pc.invert(inbound_sidecar), uh_ip.is_valid())
    dst_ip = pc.if_else(use_uh, uh_ip, dla_ip)
    dst_port = pc.if_else(use_uh, uh_port, dla_port)

    is_tcp = _mask(pc.or_kleene(pc.or_kleene(method.is_null(), path.is_null()), proto.is_null()))
    h2_post = pc.and_(_mask(pc.equal(proto, _lit("HTTP/2"))), _mask(pc.equal(method, _lit("POST"))))
    grpc = pc.and_(h2_post, pc.or_(_grpc_paths(path, h2_post), _mask(pc.starts_with(ua, "grpc-"))))
    protocol = pc.if_else(is_tcp, _lit("tcp"), pc.if_else(grpc, _lit("grpc"), _lit("http")))

    sni_mtls = _mask(pc.starts_with(sni, "outbound_."))
    server_mtls = pc.if_else(sni_mtls, _lit("mtls"),
                             pc.if_else(sni.is_valid(), _lit("tls"), _lit("plaintext")))
    app_tls = pc.and_(pc.and_(outbound, is_tcp), pc.and_(sni.is_valid(), pc.invert(sni_mtls)))
    mtls = pc.if_else(inbound_sidecar, server_mtls,
                      pc.if_else(app_tls, _lit("tls"), _lit("unknown")))

    cluster_host = _group(uc, _CLUSTER_RE, "host")
    sni_host = _group(sni, _SNI_RE, "host")
    auth_host = _group(authority, _AUTHORITY_RE, "host")
    plain_sni = pc.if_else(sni_mtls, _NULL, sni)
    named_host = pc.coalesce(auth_host, plain_sni)
    service_host = pc.coalesce(
        cluster_host, sni_host, pc.if_else(passthrough, named_host, _NULL)
    )

    rbac_http = _mask(pc.starts_with(rcd, "rbac_access_denied"))
    rbac_tcp = _mask(pc.starts_with(ctd, "rbac_access_denied"))
    denied = pc.or_(rbac_http, rbac_tcp)
    denied_by = _group(pc.if_else(rbac_http, rcd, ctd), _DENIED_RE, "policy")
    denied_by = pc.if_else(denied, denied_by, _NULL)

    flags = _col(fields, "response_flags")
    if "response_flags" in fields.column_names:
        flags = pc.fill_null(flags, _lit("-"))  # Envoy's own spelling of "no flags"

    columns: dict[str, pa.Array] = {
        "time": _time(_col(fields, "start_time"), checked),
        "duration_ms": _int(_col(fields, "duration"), pa.int64(), checked),
        "src_ip": src_ip,
        "src_port": src_port,
        "dst_ip": dst_ip,
        "dst_port": dst_port,
        "dialed_ip": dla_ip,
        "dialed_port": dla_port,
        "service_host": service_host,
        "direction": direction,
        "reporter": reporter if reporter is not None else pa.nulls(n, _STR),
        "transport": _const(n, "tcp"),
        "protocol": protocol,
        "http_version": pc.if_else(is_tcp, _NULL, proto),
        "method": pc.if_else(is_tcp, _NULL, method),
        "path": pc.if_else(is_tcp, _NULL, path),
        "authority": authority,
        "status": _int(_col(fields, "response_code"), pa.int32(), checked),
        "response_flags": flags,
        "response_detail": pc.coalesce(rcd, ctd),
        "bytes_in": _int(_col(fields, "bytes_received"), pa.int64(), checked),
        "bytes_out": _int(_col(fields, "bytes_sent"), pa.int64(), checked),
        "mtls": mtls,
        "sni": sni,
        "upstream_cluster": uc,
        "request_id": _col(fields, "request_id"),
        "user_agent": ua,
        "denied": denied,
        "denied_by": denied_by,
        "source": _const(n, source),
        "origin": origin,
        "kind": _const(n, KIND_REQUEST),
    }
    main = _batch(columns, n)

    gateway = _mask(
        pc.and_(pc.and_(outbound, ula_ip.is_valid()), pc.not_equal(dra_ip, ula_ip))
    )
    rows = np.flatnonzero(arrowlite.to_bool(gateway))
    if not len(rows):
        return main, None, rows.astype(np.int64)
    # Gateway lines are few: gather them by index (a filter scans every row of every column).
    pick = arrowlite.int_array(rows, pa.int64())
    legs = main.take(pick)
    m = legs.num_rows
    overrides = {
        "direction": _const(m, "inbound"),
        "src_ip": dra_ip.take(pick),
        "src_port": dra_port.take(pick),
        "dst_ip": dla_ip.take(pick),
        "dst_port": dla_port.take(pick),
        "mtls": server_mtls.take(pick),
        "service_host": pc.coalesce(sni_host.take(pick), named_host.take(pick)),
    }
    legs = _batch({**dict(zip(legs.schema.names, legs.columns, strict=True)), **overrides}, m)
    log.debug("%d gateway lines gave a downstream-leg record each", m)
    return main, legs, rows.astype(np.int64)


def _interleave(n: int, rows: np.ndarray) -> np.ndarray:
    """Take-order placing extra row ``n + k`` right after row ``rows[k]`` (rows ascending)."""
    count = np.ones(n, dtype=np.int64)
    count[rows] = 2
    order = np.repeat(np.arange(n, dtype=np.int64), count)
    # The second copy of each doubled row becomes its extra row.
    second = np.cumsum(count)[rows] - 1
    order[second] = n + np.arange(len(rows))
    return order


def _batch(columns: dict[str, pa.Array], n: int) -> pa.RecordBatch:
    """A FLOW_SCHEMA batch from the columns computed (missing ones are null)."""
    arrays = []
    for f in FLOW_SCHEMA:
        col = columns.get(f.name)
        if col is None:
            col = pa.nulls(n, f.type)
        elif col.type != f.type:
            col = col.cast(f.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)
