"""Render faithful Istio/Envoy access-log lines and the dump layouts they arrive in.

One place that knows what a sidecar, gateway, passthrough, TCP and RBAC-denied line looks
like in Istio's default TEXT format (``pilot/pkg/model/telemetry_logging.go``, constant
``EnvoyTextLogFormat``) and in its JSON encoding (``accessLogEncoding: JSON``). Shapes follow
real lines (istio.io access-log task, Istio >= 1.10 inbound shape: upstream host = pod IP,
upstream local = ``127.0.0.6:<ephemeral>``; RBAC denials as Envoy's RBAC filter reports them).

Used by the Bookinfo sample generator and the benchmark dump generator; not part of the
installed package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime

#: The TEXT format, exactly (Istio master; older proxies print %UPSTREAM_CLUSTER%).
TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)

TRUST_DOMAIN = "cluster.local"
RBAC_DENIED_NONE = "rbac_access_denied_matched_policy[none]"
#: Body of Envoy's RBAC 403 ("RBAC: access denied").
RBAC_DENIED_BODY_BYTES = 19
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"


@dataclass(frozen=True)
class AccessEntry:
    """The values of one access-log entry; ``None`` is what Envoy prints as ``-`` / ``null``."""

    start: datetime
    method: str | None
    path: str | None
    protocol: str | None
    response_code: int
    response_flags: str
    response_code_details: str | None
    connection_termination_details: str | None
    upstream_transport_failure_reason: str | None
    bytes_received: int
    bytes_sent: int
    duration: int
    upstream_service_time: int | None
    x_forwarded_for: str | None
    user_agent: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    upstream_cluster: str | None
    upstream_local_address: str | None
    downstream_local_address: str | None
    downstream_remote_address: str | None
    requested_server_name: str | None
    route_name: str | None


def envoy_time(t: datetime) -> str:
    """%START_TIME% default: UTC, millisecond precision, ``Z``."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _d(value: object) -> str:
    return "-" if value is None else str(value)


def render_text(e: AccessEntry) -> str:
    """One line in Istio's default TEXT format, without the trailing newline."""
    return (
        f'[{envoy_time(e.start)}] "{_d(e.method)} {_d(e.path)} {_d(e.protocol)}" '
        f"{e.response_code} {e.response_flags} {_d(e.response_code_details)} "
        f'{_d(e.connection_termination_details)} "{_d(e.upstream_transport_failure_reason)}" '
        f"{e.bytes_received} {e.bytes_sent} {e.duration} {_d(e.upstream_service_time)} "
        f'"{_d(e.x_forwarded_for)}" "{_d(e.user_agent)}" "{_d(e.request_id)}" '
        f'"{_d(e.authority)}" "{_d(e.upstream_host)}" {_d(e.upstream_cluster)} '
        f"{_d(e.upstream_local_address)} {_d(e.downstream_local_address)} "
        f"{_d(e.downstream_remote_address)} {_d(e.requested_server_name)} {_d(e.route_name)}"
    )


def json_record(e: AccessEntry) -> dict[str, object]:
    """The 24 keys of Istio's JSON encoding; numbers typed, absent values None."""
    ust = None if e.upstream_service_time is None else str(e.upstream_service_time)
    return {
        "authority": e.authority,
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "connection_termination_details": e.connection_termination_details,
        "downstream_local_address": e.downstream_local_address,
        "downstream_remote_address": e.downstream_remote_address,
        "duration": e.duration,
        "method": e.method,
        "path": e.path,
        "protocol": e.protocol,
        "request_id": e.request_id,
        "requested_server_name": e.requested_server_name,
        "response_code": e.response_code,
        "response_code_details": e.response_code_details,
        "response_flags": e.response_flags,
        "route_name": e.route_name,
        "start_time": envoy_time(e.start),
        "upstream_cluster": e.upstream_cluster,
        "upstream_host": e.upstream_host,
        "upstream_local_address": e.upstream_local_address,
        # A response header: Envoy logs it as a string, not a number.
        "upstream_service_time": ust,
        "upstream_transport_failure_reason": e.upstream_transport_failure_reason,
        "user_agent": e.user_agent,
        "x_forwarded_for": e.x_forwarded_for,
    }


def render_json(e: AccessEntry) -> str:
    """One line in Istio's JSON encoding: keys sorted, compact, no trailing newline."""
    return json.dumps(json_record(e), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- names Istio derives ----------------------------------------------------------------


def service_fqdn(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def outbound_cluster(port: int, fqdn: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{fqdn}"


def inbound_cluster(target_port: int) -> str:
    return f"inbound|{target_port}||"


def mtls_sni(service_port: int, fqdn: str, subset: str = "") -> str:
    """SNI the client sidecar requests for ISTIO_MUTUAL; the server logs it."""
    # Istio's subset key "outbound_.<port>_.<subset>_.<fqdn>": no subset gives "_._.".
    return f"outbound_.{service_port}_.{subset}_.{fqdn}"


def principal(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"{trust_domain}/ns/{namespace}/sa/{service_account}"


def rbac_denied_details(namespace: str | None = None, policy: str | None = None,
                        rule: int = 0) -> str:
    """``rbac_access_denied_matched_policy[...]``: ``[none]`` unless a DENY policy matched."""
    if namespace is None or policy is None:
        return RBAC_DENIED_NONE
    return f"rbac_access_denied_matched_policy[ns[{namespace}]-policy[{policy}]-rule[{rule}]]"


# --- one request seen by both sidecars ---------------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """One HTTP/gRPC request from a client workload to a Service, as the mesh carried it.

    ``client_ip`` is the client pod; ``app_port`` the app's source port towards its own
    sidecar; ``conn_port`` the client sidecar's source port towards the server pod (the one
    pooled connection both sides log). ``server_ip``/``target_port`` is the pod endpoint.
    """

    start: datetime
    method: str
    path: str
    status: int
    client_ip: str
    app_port: int
    conn_port: int
    service: str
    namespace: str
    service_ip: str
    service_port: int
    server_ip: str
    target_port: int
    inbound_port: int
    request_id: str
    user_agent: str | None
    authority: str
    bytes_received: int = 0
    bytes_sent: int = 0
    duration: int = 1
    server_duration: int = 1
    protocol: str = "HTTP/1.1"
    x_forwarded_for: str | None = None
    subset: str = ""
    route_name: str | None = "default"
    mtls: bool = True
    denied_details: str | None = None
    """Set when the server's RBAC filter rejected it (``rbac_access_denied_...``)."""
    upstream_local_port: int = 0
    """Server sidecar's source port towards the app (from 127.0.0.6)."""


def outbound_entry(c: HttpCall) -> AccessEntry:
    """The client sidecar's line: listener on the Service VIP, upstream is the pod."""
    denied = c.denied_details is not None
    status = 403 if denied else c.status
    return AccessEntry(
        start=c.start,
        method=c.method,
        path=c.path,
        protocol=c.protocol,
        response_code=status,
        response_flags="-",
        response_code_details="via_upstream",
        connection_termination_details=None,
        upstream_transport_failure_reason=None,
        bytes_received=c.bytes_received,
        bytes_sent=RBAC_DENIED_BODY_BYTES if denied else c.bytes_sent,
        duration=c.duration,
        upstream_service_time=max(0, c.duration - 1) if c.duration else 0,
        x_forwarded_for=c.x_forwarded_for,
        user_agent=c.user_agent,
        request_id=c.request_id,
        authority=c.authority,
        upstream_host=f"{c.server_ip}:{c.target_port}",
        upstream_cluster=outbound_cluster(c.service_port, service_fqdn(c.service, c.namespace),
                                          c.subset),
        upstream_local_address=f"{c.client_ip}:{c.conn_port}",
        downstream_local_address=f"{c.service_ip}:{c.service_port}",
        downstream_remote_address=f"{c.client_ip}:{c.app_port}",
        requested_server_name=None,
        route_name=c.route_name,
    )


def inbound_entry(c: HttpCall) -> AccessEntry:
    """The server sidecar's line: downstream is the client sidecar's pooled connection.

    ``c.conn_port`` is the client's source port whether or not the client had a sidecar.
    A denied request never reaches the app: no upstream host, no upstream local address.
    """
    fqdn = service_fqdn(c.service, c.namespace)
    denied = c.denied_details is not None
    return AccessEntry(
        start=c.start,
        method=c.method,
        path=c.path,
        protocol=c.protocol,
        response_code=403 if denied else c.status,
        response_flags="-",
        response_code_details=c.denied_details if denied else "via_upstream",
        connection_termination_details=None,
        upstream_transport_failure_reason=None,
        bytes_received=c.bytes_received,
        bytes_sent=RBAC_DENIED_BODY_BYTES if denied else c.bytes_sent,
        duration=0 if denied else c.server_duration,
        upstream_service_time=None if denied else max(0, c.server_duration - 1),
        x_forwarded_for=c.x_forwarded_for,
        user_agent=c.user_agent,
        request_id=c.request_id,
        authority=c.authority,
        upstream_host=None if denied else f"{c.server_ip}:{c.target_port}",
        upstream_cluster=inbound_cluster(c.inbound_port),
        upstream_local_address=(
            None if denied else f"{INBOUND_PASSTHROUGH_SOURCE}:{c.upstream_local_port}"
        ),
        downstream_local_address=f"{c.server_ip}:{c.target_port}",
        downstream_remote_address=f"{c.client_ip}:{c.conn_port}",
        requested_server_name=mtls_sni(c.service_port, fqdn, c.subset) if c.mtls else None,
        route_name="default",
    )


def http_pair(c: HttpCall) -> tuple[AccessEntry, AccessEntry]:
    """(client line, server line) of one meshed request: same x-request-id, and the client's
    upstream_local_address is the server's downstream_remote_address."""
    return outbound_entry(c), inbound_entry(c)


def grpc_call(c: HttpCall) -> HttpCall:
    """The same call as gRPC: POST over HTTP/2 (the log shows the HTTP status, 200)."""
    return replace(c, method="POST", protocol="HTTP/2")


def gateway_entry(c: HttpCall, gateway_ip: str, gateway_port: int, external_ip: str,
                  external_port: int) -> AccessEntry:
    """An ingress gateway's line: downstream is the external client, upstream the pod.

    The gateway's own listener (pod IP : container port) is the downstream local address;
    it sets X-Forwarded-For to the external client; VirtualService routes carry no name
    here, so ROUTE_NAME is ``-``.
    """
    return replace(
        outbound_entry(c),
        x_forwarded_for=external_ip,
        upstream_local_address=f"{gateway_ip}:{c.conn_port}",
        downstream_local_address=f"{gateway_ip}:{gateway_port}",
        downstream_remote_address=f"{external_ip}:{external_port}",
        route_name=None,
    )


@dataclass(frozen=True)
class TcpConn:
    """One opaque TCP (or TLS passthrough) connection."""

    start: datetime
    client_ip: str
    app_port: int
    conn_port: int
    dialed: str
    """``ip:port`` the client dialled (Service VIP or external address)."""
    upstream_host: str
    upstream_cluster: str
    bytes_received: int
    bytes_sent: int
    duration: int
    sni: str | None = None


def tcp_outbound_entry(t: TcpConn) -> AccessEntry:
    """A client-side TCP line: ``"- - -" 0 - - -``, no HTTP fields."""
    return AccessEntry(
        start=t.start,
        method=None,
        path=None,
        protocol=None,
        response_code=0,
        response_flags="-",
        response_code_details=None,
        connection_termination_details=None,
        upstream_transport_failure_reason=None,
        bytes_received=t.bytes_received,
        bytes_sent=t.bytes_sent,
        duration=t.duration,
        upstream_service_time=None,
        x_forwarded_for=None,
        user_agent=None,
        request_id=None,
        authority=None,
        upstream_host=t.upstream_host,
        upstream_cluster=t.upstream_cluster,
        upstream_local_address=f"{t.client_ip}:{t.conn_port}",
        downstream_local_address=t.dialed,
        downstream_remote_address=f"{t.client_ip}:{t.app_port}",
        requested_server_name=t.sni,
        route_name=None,
    )


def tcp_inbound_entry(t: TcpConn, server_ip: str, target_port: int, local_port: int,
                      sni: str | None) -> AccessEntry:
    """The server side of a meshed TCP connection (``inbound|<port>||``)."""
    return replace(
        tcp_outbound_entry(t),
        duration=max(0, t.duration - 1),
        upstream_host=f"{server_ip}:{target_port}",
        upstream_cluster=inbound_cluster(target_port),
        upstream_local_address=f"{INBOUND_PASSTHROUGH_SOURCE}:{local_port}",
        downstream_local_address=f"{server_ip}:{target_port}",
        downstream_remote_address=f"{t.client_ip}:{t.conn_port}",
        requested_server_name=sni,
    )


def passthrough_entry(start: datetime, client_ip: str, app_port: int, conn_port: int,
                      external: str, sni: str | None, bytes_received: int, bytes_sent: int,
                      duration: int) -> AccessEntry:
    """Egress to a host outside the registry (ALLOW_ANY): a TCP line to PassthroughCluster."""
    return tcp_outbound_entry(
        TcpConn(start=start, client_ip=client_ip, app_port=app_port, conn_port=conn_port,
                dialed=external, upstream_host=external, upstream_cluster="PassthroughCluster",
                bytes_received=bytes_received, bytes_sent=bytes_sent, duration=duration,
                sni=sni)
    )


# --- dump layouts ----------------------------------------------------------------------


def rfc3339_nano_fixed(t: datetime, nanos: int = 0) -> str:
    """kubelet's ``--timestamps`` prefix: always 9 fractional digits."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond * 1000 + nanos:09d}Z"


def rfc3339_nano(t: datetime, nanos: int = 0) -> str:
    """Go's time.RFC3339Nano as containerd writes CRI files: trailing zeros trimmed."""
    t = t.astimezone(UTC)
    frac = f"{t.microsecond * 1000 + nanos:09d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def layout_plain(line: str) -> str:
    """``kubectl logs``: the container's stdout as written."""
    return line


def layout_timestamps(line: str, written: datetime, nanos: int = 0) -> str:
    """``kubectl logs --timestamps``: ``<RFC3339Nano> <line>``."""
    return f"{rfc3339_nano_fixed(written, nanos)} {line}"


def layout_cri(line: str, written: datetime, nanos: int = 0, stream: str = "stdout") -> str:
    """A CRI node file (/var/log/pods/...): ``<RFC3339Nano> stdout F <line>``."""
    return f"{rfc3339_nano(written, nanos)} {stream} F {line}"
