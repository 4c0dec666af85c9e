"""Payload classification: what a TCP connection or UDP flow carries, from its first bytes.

Works on *bytes*: the connection tracker hands over the first bytes (reassembled, in order, maybe
cut at 16 KiB) of each direction of one TCP connection, or the datagram payloads of a UDP flow.
Nothing here reads files or packets.

Recognised: TLS (version, SNI, ALPN, client certificate in TLS 1.2, Istio and Linkerd mTLS marks),
HTTP/1.x (requests, responses, pipelining, ``Expect: 100-continue``, ``Upgrade``, ``CONNECT``),
HTTP/2 with prior knowledge or ``Upgrade: h2c`` and mid-stream, gRPC (service/method), DNS over
UDP and TCP, PostgreSQL's SSLRequest prelude, SSH banners; anything else is opaque ``tcp``.

Each result carries the shared schema's mTLS state (``mtls | tls | plaintext | unknown``):

* ``mtls``: TLS with a service mesh's mutual-TLS marks, or a TLS 1.2 handshake in which the server
  asked for a client certificate and the client sent one.
* ``tls``: any other TLS (one-way as far as the wire shows; TLS 1.3 encrypts the certificate
  messages, so a TLS 1.3 mTLS handshake without mesh marks is ``tls``).
* ``plaintext``: a cleartext protocol was recognised (HTTP/1, h2c, gRPC, DNS, PostgreSQL after
  the server refused TLS with ``N``).
* ``unknown``: opaque bytes, no bytes, or an encrypted non-TLS protocol (SSH): the wire does not
  prove the stream is readable, so it is not called plaintext.

Never raises on bad input unless ``strict=True`` was asked for: every problem is recorded in
``notes`` and classification goes on with what was complete.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import hpack

from observe.errors import FormatError

# ---------------------------------------------------------------------------------------------
# Values of the shared schema
# ---------------------------------------------------------------------------------------------

MTLS = "mtls"
TLS = "tls"
PLAINTEXT = "plaintext"
UNKNOWN = "unknown"

PROTO_TLS = "tls"
PROTO_HTTP = "http"
PROTO_H2C = "h2c"
PROTO_GRPC = "grpc"
PROTO_DNS = "dns"
PROTO_POSTGRES = "postgres"
PROTO_SSH = "ssh"
PROTO_TCP = "tcp"
PROTO_UDP = "udp"

MESH_ISTIO = "istio"
MESH_LINKERD = "linkerd"

# ---------------------------------------------------------------------------------------------
# Mesh marks (what the classification relies on; looked up in the meshes' sources)
# ---------------------------------------------------------------------------------------------
# Istio: the default SNI of sidecar-to-sidecar mTLS is the "DNS SRV" form of the cluster name,
# built by pilot's model.BuildDNSSrvSubsetKey as direction + "_." + port + "_." + subset + "_." +
# hostname, e.g. "outbound_.9080_._.reviews.default.svc.cluster.local" (istio/istio
# pilot/pkg/model/service.go; IsDNSSrvSubsetKey accepts the "outbound_." and "inbound_." forms).
_ISTIO_SNI = re.compile(r"^(?:outbound|inbound)_\.(\d{1,5})_\.([^.]*)_\.(.+)$")
# Istio's ALPN values for in-mesh mTLS (pilot/pkg/networking/core listener.go / filters):
# mtlsTCPALPNs ["istio"], mtlsTCPWithMxcALPNs ["istio-peer-exchange", "istio"], mtlsHTTP10ALPN
# ["istio-http/1.0", "istio"], mtlsHTTP11ALPN ["istio-http/1.1", "istio"], mtlsHTTP2ALPN
# ["istio-h2", "istio"]. Any ALPN starting with "istio" is taken as Istio's mark.
_ISTIO_ALPN_PREFIX = "istio"
# Linkerd: the client proxy sends the server proxy's identity as SNI; the destination service
# hands out tls_identity.dns_like_identity and server_name with the same value
# "<serviceaccount>.<namespace>.serviceaccount.identity.<control-plane-ns>.<trust-domain>", e.g.
# "default.simple-app.serviceaccount.identity.linkerd.cluster.local" (linkerd2 identity docs,
# linkerd2-proxy tests). Opaque-transport connections also offer ALPN "transport.l5d.io/v1"
# (linkerd2-proxy transport-header PROTOCOL constant).
_LINKERD_SNI = re.compile(r"^[^.]+\.[^.]+\.serviceaccount\.identity\.[^.]+\..+$")
_LINKERD_ALPN = "transport.l5d.io/v1"

# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------


class DnsAnswer(NamedTuple):
    """One DNS resource record that maps a name to an address or another name."""

    name: str
    """Owner name of the record, without the trailing dot."""
    rtype: str
    """Record type: 'A', 'AAAA' or 'CNAME'."""
    value: str
    """The address (A/AAAA, canonical text form) or the target name (CNAME)."""
    ttl: int
    """Time to live in seconds, as sent."""


@dataclass(slots=True)
class DnsMessage:
    """One parsed DNS message (query or response)."""

    id: int
    """Transaction id (pairs a response with its query)."""
    is_response: bool
    """QR bit: True for a response."""
    rcode: int
    """Response code (0 NOERROR, 3 NXDOMAIN, ...)."""
    questions: list[tuple[str, str]]
    """(name, type) of each question; the type is a mnemonic ('A') or 'TYPE<n>'."""
    answers: list[DnsAnswer]
    """A/AAAA/CNAME records of all sections (additional-section glue maps names to IPs too)."""
    truncated: bool = False
    """True when the bytes ended (or broke) before all announced records were read."""


@dataclass(slots=True)
class HttpRequest:
    """One application request seen in a stream (HTTP/1.x, HTTP/2 or gRPC)."""

    method: str | None = None
    """Request method; None when only the response was seen (capture began mid-connection)."""
    path: str | None = None
    """Request target as sent (HTTP/1) or ``:path`` (HTTP/2)."""
    authority: str | None = None
    """``Host`` header (HTTP/1) or ``:authority`` (HTTP/2)."""
    status: int | None = None
    """Final response status when the response was seen and could be paired, else None."""
    version: str | None = None
    """Protocol version of the request: 'HTTP/1.0', 'HTTP/1.1' or 'HTTP/2'."""
    stream_id: int | None = None
    """HTTP/2 stream id; None for HTTP/1."""
    content_type: str | None = None
    """``content-type`` of the request (or of the response when the request had none)."""
    grpc_service: str | None = None
    """gRPC fully qualified service ('pkg.Service') when the exchange is gRPC."""
    grpc_method: str | None = None
    """gRPC method name when the exchange is gRPC."""
    grpc_status: int | None = None
    """``grpc-status`` from the response trailers (or trailers-only response), if seen."""


@dataclass(slots=True)
class Http1Message:
    """The start of one HTTP/1.x message: start line and header block."""

    is_request: bool
    """True for a request, False for a response."""
    version: str
    """'HTTP/1.0' or 'HTTP/1.1' (as written on the start line)."""
    method: str | None
    """Request method (requests only)."""
    target: str | None
    """Request target as written (requests only)."""
    status: int | None
    """Status code (responses only)."""
    reason: str | None
    """Reason phrase (responses only)."""
    headers: dict[str, str]
    """Header fields, names lower-cased; a repeated field keeps its first value."""
    header_end: int | None
    """Offset just after the blank line ending the header block; None when it was not seen."""

    @property
    def host(self) -> str | None:
        """The ``Host`` header, if any."""
        return self.headers.get("host")


@dataclass(slots=True)
class StreamInfo:
    """What one connection (or UDP flow) carries, as far as its first bytes show."""

    protocol: str
    """'tls', 'http', 'h2c', 'grpc', 'dns', 'postgres', 'ssh', 'tcp' (opaque) or 'udp' (opaque)."""
    mtls: str
    """Shared-schema mTLS state: 'mtls', 'tls', 'plaintext' or 'unknown'."""
    reason: str = ""
    """One line saying which evidence decided protocol and mtls."""
    mesh: str | None = None
    """'istio' or 'linkerd' when the handshake carries that mesh's marks, else None."""
    tls_version: str | None = None
    """Negotiated TLS version if a ServerHello was seen, else the highest one offered."""
    tls_version_negotiated: bool = False
    """True when ``tls_version`` comes from the ServerHello (else it is only the offer)."""
    sni: str | None = None
    """Server name from the ClientHello's server_name extension."""
    alpn_offered: tuple[str, ...] = ()
    """ALPN protocols offered by the client, in its order."""
    alpn_selected: str | None = None
    """ALPN protocol selected by the server (ServerHello; visible in TLS 1.2 only)."""
    certificate_requested: bool = False
    """The server sent a CertificateRequest in clear (TLS 1.2 and older)."""
    client_certificate: bool | None = None
    """True: the client sent a non-empty Certificate; False: requested but empty; None: unseen."""
    requests: list[HttpRequest] = field(default_factory=list)
    """Application requests (HTTP/1, HTTP/2, gRPC) in the order they were sent."""
    dns_queries: list[tuple[str, str]] = field(default_factory=list)
    """(name, type) of every DNS question seen."""
    dns_answers: list[DnsAnswer] = field(default_factory=list)
    """A/AAAA/CNAME answers seen in DNS responses (so IPs gain names)."""
    truncated: bool = False
    """True when the bytes ended inside a record/message, so more requests may exist."""
    handshake_missing: bool = False
    """TLS records were seen but no handshake message (the stream began inside TLS)."""
    notes: list[str] = field(default_factory=list)
    """Anything skipped, malformed or uncertain, one short line each."""


# ---------------------------------------------------------------------------------------------
# Problem reporting (non-strict: note and continue; strict: FormatError)
# ---------------------------------------------------------------------------------------------


class _Ctx:
    __slots__ = ("notes", "origin", "strict", "truncated")

    def __init__(self, strict: bool, origin: str | None) -> None:
        self.strict = strict
        self.origin = origin
        self.notes: list[str] = []
        self.truncated = False

    def problem(self, message: str, exc: BaseException | None = None) -> None:
        if self.strict:
            raise FormatError(message, origin=self.origin) from exc
        self.notes.append(message)


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------

_TLS_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
                 0x0304: "TLS 1.3"}
# RFC 8446 4.1.3: a ServerHello whose random is SHA-256("HelloRetryRequest") is an HRR.
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2
_HS_CERTIFICATE = 11
_HS_CERTIFICATE_REQUEST = 13
_CT_CCS = 20
_CT_ALERT = 21
_CT_HANDSHAKE = 22
_CT_APPDATA = 23
_MAX_RECORD = (1 << 14) + 2048


def _tls_version_name(v: int) -> str:
    name = _TLS_VERSIONS.get(v)
    if name is not None:
        return name
    if v >> 8 == 0x7F:
        return f"TLS 1.3 (draft {v & 0xFF})"
    return f"0x{v:04x}"


def _is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts with a plausible TLS record header (any content type)."""
    return (len(data) >= 3 and data[0] in (_CT_CCS, _CT_ALERT, _CT_HANDSHAKE, _CT_APPDATA)
            and data[1] == 3 and data[2] <= 4)


class _TlsSide:
    __slots__ = ("app_data", "ccs", "messages", "partial")

    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.partial = False  # last handshake message incomplete (body holds what was there)
        self.ccs = False
        self.app_data = False


def _tls_side(data: bytes, ctx: _Ctx, who: str, through_ccs: bool = False) -> _TlsSide:
    """Handshake messages sent in clear by one side (records joined, stops at CCS/app data)."""
    side = _TlsSide()
    hs = bytearray()
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 5:
            ctx.truncated = True
            break
        ct = data[pos]
        if ct not in (_CT_CCS, _CT_ALERT, _CT_HANDSHAKE, _CT_APPDATA, 24) or data[pos + 1] != 3:
            ctx.problem(f"tls: {who} record at offset {pos} has bad header "
                        f"{data[pos:pos + 3].hex()}")
            break
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length > _MAX_RECORD:
            ctx.problem(f"tls: {who} record at offset {pos} too long ({length})")
            break
        body = data[pos + 5:pos + 5 + length]
        if len(body) < length:
            ctx.truncated = True
        if ct == _CT_HANDSHAKE:
            hs += body
        elif ct == _CT_CCS:
            side.ccs = True
            # TLS 1.2: what follows CCS is encrypted. TLS 1.3 middlebox compatibility (RFC 8446
            # D.4) sends a dummy CCS after a HelloRetryRequest, then the real (clear) hellos.
            if not (through_ccs or (hs[:1] == b"\x02" and hs[6:38] == _HRR_RANDOM)):
                break
        elif ct == _CT_APPDATA:
            side.app_data = True
            break  # everything after this point is encrypted
        pos += 5 + length
    # split the handshake byte stream into messages
    p = 0
    m = len(hs)
    while p + 4 <= m:
        mtype = hs[p]
        mlen = (hs[p + 1] << 16) | (hs[p + 2] << 8) | hs[p + 3]
        body = bytes(hs[p + 4:p + 4 + mlen])
        if len(body) < mlen:
            side.partial = True
            side.messages.append((mtype, body))
            ctx.truncated = True
            break
        side.messages.append((mtype, body))
        p += 4 + mlen
    else:
        if p < m:
            ctx.truncated = True
    return side


class _Hello:
    __slots__ = ("alpn", "hrr", "legacy_version", "sni", "versions")

    def __init__(self) -> None:
        self.legacy_version = 0
        self.versions: list[int] = []
        self.sni: str | None = None
        self.alpn: list[str] = []
        self.hrr = False


def _parse_extensions(body: bytes, pos: int, hello: _Hello, is_client: bool) -> None:
    """Parse the extensions block at ``pos``; stops quietly where the bytes end."""
    if pos + 2 > len(body):
        return
    end = min(len(body), pos + 2 + ((body[pos] << 8) | body[pos + 1]))
    pos += 2
    while pos + 4 <= end:
        etype = (body[pos] << 8) | body[pos + 1]
        elen = (body[pos + 2] << 8) | body[pos + 3]
        ext = body[pos + 4:pos + 4 + elen]
        pos += 4 + elen
        if len(ext) < elen:
            return
        if etype == 0 and is_client and len(ext) >= 5:  # server_name
            # list length(2), then entries: type(1) len(2) name
            q = 2
            while q + 3 <= len(ext):
                ntype = ext[q]
                nlen = (ext[q + 1] << 8) | ext[q + 2]
                name = ext[q + 3:q + 3 + nlen]
                q += 3 + nlen
                if ntype == 0 and hello.sni is None:
                    hello.sni = name.decode("ascii", "replace")
        elif etype == 16 and len(ext) >= 2:  # ALPN
            q = 2
            while q < len(ext):
                plen = ext[q]
                proto = ext[q + 1:q + 1 + plen]
                q += 1 + plen
                if len(proto) == plen and plen:
                    hello.alpn.append(proto.decode("ascii", "replace"))
        elif etype == 43:  # supported_versions
            if is_client and ext:
                q = 1
                while q + 2 <= min(len(ext), 1 + ext[0]):
                    hello.versions.append((ext[q] << 8) | ext[q + 1])
                    q += 2
            elif len(ext) >= 2:
                hello.versions.append((ext[0] << 8) | ext[1])


def _parse_hello(body: bytes, is_client: bool) -> _Hello:
    """ClientHello/ServerHello fields; tolerant of a body cut anywhere."""
    hello = _Hello()
    if len(body) < 2:
        return hello
    hello.legacy_version = (body[0] << 8) | body[1]
    pos = 34  # version(2) + random(32)
    if not is_client and body[2:34] == _HRR_RANDOM:
        hello.hrr = True
    if pos >= len(body):
        return hello
    pos += 1 + body[pos]  # session id
    if is_client:
        if pos + 2 > len(body):
            return hello
        pos += 2 + ((body[pos] << 8) | body[pos + 1])  # cipher suites
        if pos >= len(body):
            return hello
        pos += 1 + body[pos]  # compression methods
    else:
        pos += 3  # cipher suite(2) + compression(1)
    _parse_extensions(body, pos, hello, is_client)
    return hello


def _apply_tls(info: StreamInfo, client: bytes, server: bytes, ctx: _Ctx) -> None:
    """Fill the TLS fields of ``info`` from the two directions' bytes."""
    sside = _tls_side(server, ctx, "server") if server else _TlsSide()
    hrr = any(t == _HS_SERVER_HELLO and b[2:34] == _HRR_RANDOM for t, b in sside.messages)
    cside = _tls_side(client, ctx, "client", through_ccs=hrr)
    offered: list[int] = []
    legacy = 0
    for mtype, body in cside.messages:
        if mtype == _HS_CLIENT_HELLO:
            hello = _parse_hello(body, True)
            legacy = legacy or hello.legacy_version
            if hello.sni is not None and info.sni is None:
                info.sni = hello.sni
            if hello.alpn and not info.alpn_offered:
                info.alpn_offered = tuple(hello.alpn)
            offered = [v for v in hello.versions if not _is_grease(v)] or offered
        elif mtype == _HS_CERTIFICATE:
            info.client_certificate = len(body) >= 3 and (body[0] | body[1] | body[2]) != 0
    negotiated: int | None = None
    for mtype, body in sside.messages:
        if mtype == _HS_SERVER_HELLO:
            hello = _parse_hello(body, False)
            if hello.hrr:
                continue
            if hello.versions:
                negotiated = hello.versions[0]
            elif hello.legacy_version:
                negotiated = hello.legacy_version
            if hello.alpn:
                info.alpn_selected = hello.alpn[0]
        elif mtype == _HS_CERTIFICATE_REQUEST:
            info.certificate_requested = True
    if negotiated is not None:
        info.tls_version = _tls_version_name(negotiated)
        info.tls_version_negotiated = True
    elif offered:
        best = 0x0304 if 0x0304 in offered else max(offered)
        info.tls_version = _tls_version_name(best)
    elif legacy:
        info.tls_version = _tls_version_name(legacy)
    if info.certificate_requested and info.client_certificate is None and cside.ccs:
        info.client_certificate = False
    if not cside.messages and not sside.messages:
        info.notes.append("tls: no handshake in clear (capture began after it)")
        info.handshake_missing = True


def _tls_verdict(info: StreamInfo) -> None:
    """Decide mtls/mesh for a TLS stream from SNI, ALPN and certificate messages."""
    if info.handshake_missing:
        # Records without the handshake (the capture began inside the connection): the marks
        # that tell mTLS from TLS are in the handshake, so nothing can be said either way.
        info.mtls = UNKNOWN
        info.reason = "TLS records without the handshake (capture began inside the connection)"
        return
    sni = info.sni or ""
    alpns = info.alpn_offered + ((info.alpn_selected,) if info.alpn_selected else ())
    m = _ISTIO_SNI.match(sni)
    if m is not None:
        info.mtls, info.mesh = MTLS, MESH_ISTIO
        info.reason = f"TLS with Istio mTLS SNI (port {m.group(1)}, host {m.group(3)})"
        return
    istio_alpn = next((a for a in alpns if a.startswith(_ISTIO_ALPN_PREFIX)), None)
    if istio_alpn is not None:
        info.mtls, info.mesh = MTLS, MESH_ISTIO
        info.reason = f"TLS with Istio mTLS ALPN {istio_alpn!r}"
        return
    if _LINKERD_SNI.match(sni):
        info.mtls, info.mesh = MTLS, MESH_LINKERD
        info.reason = "TLS with Linkerd identity SNI"
        return
    if _LINKERD_ALPN in alpns:
        info.mtls, info.mesh = MTLS, MESH_LINKERD
        info.reason = f"TLS with Linkerd ALPN {_LINKERD_ALPN!r}"
        return
    if info.certificate_requested and info.client_certificate:
        info.mtls = MTLS
        info.reason = "TLS: server requested a client certificate and the client sent one"
        return
    info.mtls = TLS
    if info.certificate_requested:
        info.reason = "TLS: client certificate requested but none sent"
    else:
        info.reason = "TLS without mesh marks or visible client certificate"


# ---------------------------------------------------------------------------------------------
# HTTP/1
# ---------------------------------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{0,31}) ([^ \r\n]+) (HTTP/1\.[01])\r?\n")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) (\d{3})(?: ([^\r\n]*))?\r?\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MAX_START_LINE = 8192
# Methods accepted when sniffing a stream (parse_http1_message accepts any token).
_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS",
                      b"TRACE", b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE",
                      b"LOCK", b"UNLOCK", b"REPORT", b"SEARCH", b"PURGE"))


def parse_http1_message(payload: bytes, pos: int = 0) -> Http1Message | None:
    """The HTTP/1.x message starting at ``payload[pos:]``, or None when none starts there.

    For single packets of a keep-alive connection: returns the start line and whatever header
    fields are complete; ``header_end`` is None when the header block continues beyond the bytes.
    """
    head = payload[pos:pos + _MAX_START_LINE]
    is_request: bool
    m = _REQUEST_LINE.match(head)
    if m is not None:
        is_request = True
        method, target, version = m.group(1), m.group(2), m.group(3)
        status = None
        reason = None
    else:
        m = _STATUS_LINE.match(head)
        if m is None:
            return None
        is_request = False
        version, status_b, reason_b = m.group(1), m.group(2), m.group(3)
        method = target = None
        status = int(status_b)
        reason = reason_b.decode("latin-1") if reason_b is not None else None
    start = pos + m.end()
    e = _HEADER_END.search(payload, start - 2 if start >= 2 else start)
    header_end: int | None
    if e is not None and e.start() < start - 1:  # blank line right after the start line
        block = b""
        header_end = e.end()
    elif e is not None:
        block = payload[start:e.start()]
        header_end = e.end()
    else:
        block = payload[start:]
        header_end = None
    headers: dict[str, str] = {}
    lines = block.split(b"\n")
    if header_end is None and lines:
        lines.pop()  # the last line may be cut
    for line in lines:
        k, sep, v = line.partition(b":")
        if not sep or not k or k[0] in b" \t":
            continue
        name = k.strip().lower().decode("latin-1")
        if name not in headers:
            headers[name] = v.strip().decode("latin-1")
    return Http1Message(
        is_request=is_request,
        version=version.decode("ascii"),
        method=method.decode("ascii") if method is not None else None,
        target=target.decode("latin-1") if target is not None else None,
        status=status,
        reason=reason,
        headers=headers,
        header_end=header_end,
    )


def _skip_chunked(data: bytes, pos: int) -> int | None:
    """Offset after a chunked body starting at ``pos``; None when the bytes end inside it."""
    n = len(data)
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            return None
        size_s = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            return -1
        pos = eol + 1
        if size == 0:
            # trailers until an empty line
            while True:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    return None
                line = data[pos:eol]
                pos = eol + 1
                if line in (b"", b"\r"):
                    return pos
        pos += size
        if pos > n:
            return None
        # CRLF after the chunk data
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
        elif pos == n:
            return None


def _body_end(msg: Http1Message, data: bytes, request_method: str | None) -> int | None:
    """Offset where the message body ends; None: truncated; -1: runs to connection close."""
    assert msg.header_end is not None
    start = msg.header_end
    if not msg.is_request:
        st = msg.status or 0
        if request_method == "HEAD" or 100 <= st < 200 or st in (204, 304):
            return start
        if request_method == "CONNECT" and 200 <= st < 300:
            return start
    te = msg.headers.get("transfer-encoding")
    if te is not None and "chunked" in te.lower():
        return _skip_chunked(data, start)
    cl = msg.headers.get("content-length")
    if cl is not None:
        try:
            length = int(cl.split(",")[0].strip())
        except ValueError:
            return -1
        end = start + length
        return end if end <= len(data) else None
    return start if msg.is_request else -1


class _H1Walk:
    __slots__ = ("end", "messages", "stop", "truncated")

    def __init__(self) -> None:
        self.messages: list[Http1Message] = []
        self.end = 0
        self.truncated = False
        self.stop: str | None = None


def _walk_http1(data: bytes, methods: list[str | None] | None, ctx: _Ctx, who: str) -> _H1Walk:
    """All HTTP/1 messages of one direction; ``methods`` are the requests' (for responses)."""
    w = _H1Walk()
    pos = 0
    n = len(data)
    req_i = 0
    while pos < n:
        msg = parse_http1_message(data, pos)
        if msg is None:
            rest = data[pos:pos + 16]
            if rest.strip(b"\r\n") == b"":
                pos = n
                break
            ctx.problem(f"http: {who} bytes at offset {pos} are not an HTTP/1 message "
                        f"({rest[:8]!r})")
            w.stop = "garbage"
            break
        w.messages.append(msg)
        if msg.header_end is None:
            w.truncated = True
            pos = n
            break
        method = None
        if not msg.is_request and methods is not None:
            st = msg.status or 0
            method = methods[req_i] if req_i < len(methods) else None
            if not (100 <= st < 200) or st == 101:
                req_i += 1
        end = _body_end(msg, data, method)
        if msg.is_request and msg.method == "CONNECT":
            pos = msg.header_end
            w.stop = "connect"
            break
        if not msg.is_request and msg.status == 101:
            pos = msg.header_end
            w.stop = "upgrade"
            break
        if not msg.is_request and method == "CONNECT" and 200 <= (msg.status or 0) < 300:
            pos = msg.header_end
            w.stop = "connect"
            break
        if end is None:
            w.truncated = True
            pos = n
            break
        if end == -1:
            pos = n
            w.stop = "close-delimited"
            break
        pos = end
        # a request announcing an upgrade: unless another HTTP/1 request follows, what comes
        # next is already the new protocol (h2c preface, WebSocket frames)
        if msg.is_request and "upgrade" in msg.headers and pos < n \
                and parse_http1_message(data, pos) is None:
            w.stop = "upgrade"
            break
    w.end = pos
    return w


def pair_http1(messages: Iterable[tuple[bool, Http1Message]]) -> list[HttpRequest]:
    """Pair requests with responses in order (HTTP/1 pipelining): ``(from_client, message)``.

    Each final response (status >= 200, or 101) answers the oldest unanswered request; interim
    1xx responses (``100 Continue``) answer nothing. A response with no request waiting (the
    capture began mid-connection) becomes an entry with only its status.
    """
    out: list[HttpRequest] = []
    waiting: list[HttpRequest] = []
    head = 0
    for from_client, msg in messages:
        if msg.is_request and from_client:
            req = HttpRequest(method=msg.method, path=msg.target, authority=msg.host,
                              version=msg.version, content_type=msg.headers.get("content-type"))
            out.append(req)
            waiting.append(req)
        elif not msg.is_request and not from_client:
            st = msg.status or 0
            if 100 <= st < 200 and st != 101:
                continue
            if head < len(waiting):
                waiting[head].status = st
                if waiting[head].content_type is None:
                    waiting[head].content_type = msg.headers.get("content-type")
                head += 1
            else:
                out.append(HttpRequest(status=st, version=msg.version,
                                       content_type=msg.headers.get("content-type")))
    return out


def looks_like_http1(data: bytes) -> bool:
    """True when ``data`` starts with an HTTP/1 request line of a known method or a status line."""
    sp = data.find(b" ", 0, 12)
    if sp > 0 and data[:sp] in _METHODS:
        return _REQUEST_LINE.match(data, 0, _MAX_START_LINE) is not None
    return data.startswith(b"HTTP/1.") and _STATUS_LINE.match(data, 0, 512) is not None


# ---------------------------------------------------------------------------------------------
# HTTP/2
# ---------------------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_F_DATA, _F_HEADERS, _F_PRIORITY, _F_RST, _F_SETTINGS = 0, 1, 2, 3, 4
_F_PUSH, _F_PING, _F_GOAWAY, _F_WINDOW, _F_CONT = 5, 6, 7, 8, 9
_FL_END_STREAM, _FL_END_HEADERS, _FL_PADDED, _FL_PRIORITY = 0x1, 0x4, 0x8, 0x20
_FLAGS_ALLOWED = (0x09, 0x2D, 0x00, 0x00, 0x01, 0x0C, 0x01, 0x00, 0x00, 0x04)
_STREAM0 = (False, False, False, False, True, False, True, True, None, False)
_SETTINGS_HEADER_TABLE_SIZE = 1
# hpack's table accounting (RFC 7541 4.1): entry size = len(name) + len(value) + 32.
_HPACK_ENTRY_OVERHEAD = 32


def _h2_frame_ok(data: bytes, pos: int) -> int:
    """1: a plausible frame header at ``pos``; 0: not one; -1: fewer than 9 bytes left."""
    if len(data) - pos < 9:
        return -1
    ftype = data[pos + 3]
    if ftype > 9:
        return 0
    length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
    if length > 16384 and ftype != _F_DATA:
        return 0
    if data[pos + 4] & ~_FLAGS_ALLOWED[ftype]:
        return 0
    if data[pos + 5] & 0x80:
        return 0
    sid = int.from_bytes(data[pos + 5:pos + 9], "big")
    zero = _STREAM0[ftype]
    if zero is True and sid != 0:
        return 0
    if zero is False and sid == 0:
        return 0
    if ftype in (_F_PING,) and length != 8:
        return 0
    if ftype == _F_SETTINGS and length % 6:
        return 0
    if ftype in (_F_WINDOW, _F_RST) and length != 4:
        return 0
    if ftype == _F_PRIORITY and length != 5:
        return 0
    return 1


def looks_like_h2_frames(data: bytes) -> bool:
    """True when ``data`` (no preface) starts with HTTP/2 frames: a mid-connection capture.

    Needs a plausible first frame header followed by another plausible header or the end of the
    bytes; a first frame cut by the end of the bytes counts only for HEADERS/DATA/SETTINGS.
    """
    if _h2_frame_ok(data, 0) != 1:
        return False
    length = (data[0] << 16) | (data[1] << 8) | data[2]
    nxt = 9 + length
    if nxt > len(data):
        return data[3] in (_F_HEADERS, _F_DATA, _F_SETTINGS) and len(data) >= 12
    if nxt == len(data):
        return data[3] in (_F_HEADERS, _F_SETTINGS, _F_DATA, _F_WINDOW, _F_PING, _F_GOAWAY)
    return _h2_frame_ok(data, nxt) != 0


class _H2Frame(NamedTuple):
    ftype: int
    flags: int
    sid: int
    payload: bytes
    complete: bool


def _h2_frames(data: bytes, pos: int, ctx: _Ctx, who: str) -> list[_H2Frame]:
    frames: list[_H2Frame] = []
    n = len(data)
    while pos < n:
        if n - pos < 9:
            ctx.truncated = True
            break
        length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
        ftype = data[pos + 3]
        flags = data[pos + 4]
        sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        payload = data[pos + 9:pos + 9 + length]
        complete = len(payload) == length
        frames.append(_H2Frame(ftype, flags, sid, payload, complete))
        if not complete:
            ctx.truncated = True
            break
        pos += 9 + length
    return frames


def _new_decoder(mid_stream: bool, table_size: int) -> hpack.Decoder:
    dec = hpack.Decoder(max_header_list_size=1 << 20)
    dec.max_allowed_table_size = max(table_size, 4096)
    if mid_stream:
        # The capture began after the connection did: entries the peer added to its dynamic
        # table before then are unknown. They are the oldest ones, so placeholders (empty name,
        # size 32 each) filling the default 4096-byte table stand for them: references to them
        # decode to a placeholder instead of failing, and new entries evict them as they would
        # evict the real ones.
        table = dec.header_table
        for _ in range(4096 // _HPACK_ENTRY_OVERHEAD):
            table.add(b"", b"")
    return dec


class _H2Stream:
    __slots__ = ("req", "resp_done")

    def __init__(self, sid: int) -> None:
        self.req = HttpRequest(version="HTTP/2", stream_id=sid)
        self.resp_done = False


def _header_blocks(frames: list[_H2Frame], ctx: _Ctx, who: str
                   ) -> list[tuple[int, bytes, bool, bool]]:
    """Join HEADERS/PUSH_PROMISE + CONTINUATION: (stream, block, end_stream, complete)."""
    blocks: list[tuple[int, bytes, bool, bool]] = []
    i = 0
    nf = len(frames)
    while i < nf:
        f = frames[i]
        i += 1
        if f.ftype not in (_F_HEADERS, _F_PUSH):
            continue
        p = f.payload
        start = 0
        pad = 0
        if f.flags & _FL_PADDED:
            if not p:
                ctx.problem(f"h2: {who} PADDED frame on stream {f.sid} without pad length")
                continue
            pad = p[0]
            start = 1
        if f.ftype == _F_HEADERS and f.flags & _FL_PRIORITY:
            start += 5
        if f.ftype == _F_PUSH:
            start += 4
        if f.complete:
            if start + pad > len(p):
                ctx.problem(f"h2: {who} padding exceeds frame on stream {f.sid}")
                continue
            frag = p[start:len(p) - pad]
        else:
            frag = p[start:]
        block = bytearray(frag)
        complete = f.complete
        end_headers = bool(f.flags & _FL_END_HEADERS)
        while complete and not end_headers and i < nf:
            c = frames[i]
            if c.ftype != _F_CONT or c.sid != f.sid:
                ctx.problem(f"h2: {who} header block on stream {f.sid} not continued "
                            f"by CONTINUATION")
                break
            i += 1
            block += c.payload
            complete = c.complete
            end_headers = bool(c.flags & _FL_END_HEADERS)
        if not end_headers:
            complete = False
        sid = f.sid if f.ftype == _F_HEADERS else -1
        blocks.append((sid, bytes(block), bool(f.flags & _FL_END_STREAM), complete))
    return blocks


def _settings_table_size(frames: list[_H2Frame]) -> int:
    size = 4096
    for f in frames:
        if f.ftype == _F_SETTINGS and not f.flags & 0x1:
            p = f.payload
            for q in range(0, len(p) - 5, 6):
                if (p[q] << 8) | p[q + 1] == _SETTINGS_HEADER_TABLE_SIZE:
                    size = int.from_bytes(p[q + 2:q + 6], "big")
    return size


def _split_grpc_path(req: HttpRequest) -> None:
    path = req.path or ""
    if path.startswith("/"):
        svc, sep, meth = path[1:].partition("/")
        if sep and svc and meth and "/" not in meth:
            req.grpc_service = svc
            req.grpc_method = meth.split("?", 1)[0]


class _H2Result:
    __slots__ = ("grpc", "requests")

    def __init__(self) -> None:
        self.requests: list[HttpRequest] = []
        self.grpc = False


def _decode_h2(client_frames: list[_H2Frame], server_frames: list[_H2Frame], mid_stream: bool,
               ctx: _Ctx, upgrade_req: HttpRequest | None = None) -> _H2Result:
    """Requests of an HTTP/2 connection: one HPACK decoder per direction, in stream order."""
    res = _H2Result()
    streams: dict[int, _H2Stream] = {}
    order: list[_H2Stream] = []
    if upgrade_req is not None:
        # RFC 7540 3.2: the request that carried "Upgrade: h2c" is stream 1; its response
        # comes as HTTP/2 frames.
        s1 = _H2Stream(1)
        s1.req = upgrade_req
        upgrade_req.stream_id = 1
        streams[1] = s1
        order.append(s1)
    # The table size a decoder may be told to use is what its side announced in SETTINGS.
    sizes = (_settings_table_size(server_frames), _settings_table_size(client_frames))
    for from_client, frames, size in ((True, client_frames, sizes[0]),
                                      (False, server_frames, sizes[1])):
        who = "client" if from_client else "server"
        dec = _new_decoder(mid_stream, size)
        unresolved = 0
        for sid, block, _end_stream, complete in _header_blocks(frames, ctx, who):
            if not complete:
                ctx.truncated = True
                ctx.notes.append(f"h2: {who} header block on stream {sid} cut by end of bytes")
                break  # the decoder state is unknown from here on
            try:
                fields = dec.decode(block, raw=True)
            except hpack.HPACKError as e:
                ctx.problem(f"h2: {who} HPACK error on stream {sid}: {e}", e)
                break  # the dynamic table is out of sync: later blocks would decode wrongly
            except (ValueError, IndexError, KeyError) as e:  # defensive: malformed blocks
                ctx.problem(f"h2: {who} HPACK error on stream {sid}: {e!r}", e)
                break
            if sid < 0:
                continue  # PUSH_PROMISE: decoded for the table, not a request of the client
            st = streams.get(sid)
            if st is None:
                st = _H2Stream(sid)
                streams[sid] = st
                order.append(st)
            req = st.req
            hdr: dict[bytes, bytes] = {}
            for name, value in fields:
                if not name:
                    unresolved += 1
                    continue
                hdr.setdefault(bytes(name), bytes(value))
            ctype = hdr.get(b"content-type")
            if from_client:
                if b":method" in hdr or b":path" in hdr:
                    req.method = _s(hdr.get(b":method"))
                    req.path = _s(hdr.get(b":path"))
                    req.authority = _s(hdr.get(b":authority") or hdr.get(b"host"))
                if ctype is not None and req.content_type is None:
                    req.content_type = _s(ctype)
            else:
                status = hdr.get(b":status")
                if status is not None:
                    try:
                        code = int(status)
                    except ValueError:
                        code = 0
                    if not (100 <= code < 200) and not st.resp_done:
                        req.status = code
                        st.resp_done = True
                if ctype is not None and req.content_type is None:
                    req.content_type = _s(ctype)
                gs = hdr.get(b"grpc-status")
                if gs is not None and gs.isdigit():
                    req.grpc_status = int(gs)
        if unresolved:
            ctx.notes.append(f"h2: {who}: {unresolved} header field(s) referenced HPACK table "
                             "entries from before the capture")
    for st in order:
        req = st.req
        if req.content_type is not None and req.content_type.startswith("application/grpc"):
            res.grpc = True
            _split_grpc_path(req)
        res.requests.append(req)
    return res


def _s(b: bytes | None) -> str | None:
    return b.decode("utf-8", "replace") if b is not None else None


# ---------------------------------------------------------------------------------------------
# DNS
# ---------------------------------------------------------------------------------------------

_DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
              28: "AAAA", 33: "SRV", 41: "OPT", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
_DNS_PORTS = frozenset((53, 5353, 5355))


class _DnsError(Exception):
    pass


def _dns_name(msg: bytes, pos: int) -> tuple[str, int]:
    """Name at ``pos`` (with compression); returns (name, offset after it in the record)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    n = len(msg)
    total = 0
    while True:
        if pos >= n:
            raise _DnsError("name runs past the message")
        ln = msg[pos]
        if ln == 0:
            pos += 1
            break
        if ln & 0xC0 == 0xC0:
            if pos + 1 >= n:
                raise _DnsError("name pointer cut")
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > 64:
                raise _DnsError("name pointer loop")
            pos = ((ln & 0x3F) << 8) | msg[pos + 1]
            continue
        if ln & 0xC0:
            raise _DnsError("bad label type")
        label = msg[pos + 1:pos + 1 + ln]
        if len(label) < ln:
            raise _DnsError("label runs past the message")
        total += ln + 1
        if total > 255:
            raise _DnsError("name longer than 255")
        labels.append(label.decode("ascii", "backslashreplace"))
        pos += 1 + ln
    return ".".join(labels), (end if end >= 0 else pos)


def parse_dns_message(msg: bytes) -> DnsMessage | None:
    """One DNS message (no TCP length prefix); None when the header itself is not DNS-like.

    Records after a malformed one are not read; the message is then marked ``truncated``.
    """
    if len(msg) < 12:
        return None
    qd = (msg[4] << 8) | msg[5]
    an = (msg[6] << 8) | msg[7]
    ns = (msg[8] << 8) | msg[9]
    ar = (msg[10] << 8) | msg[11]
    if qd > 64 or an + ns + ar > 4096 or msg[2] & 0x78 > 0x10:  # opcode 0..2
        return None
    out = DnsMessage(id=(msg[0] << 8) | msg[1], is_response=bool(msg[2] & 0x80),
                     rcode=msg[3] & 0x0F, questions=[], answers=[])
    pos = 12
    try:
        for _ in range(qd):
            name, pos = _dns_name(msg, pos)
            if pos + 4 > len(msg):
                raise _DnsError("question cut")
            qtype = (msg[pos] << 8) | msg[pos + 1]
            out.questions.append((name, _DNS_TYPES.get(qtype, f"TYPE{qtype}")))
            pos += 4
        for _ in range(an + ns + ar):
            name, pos = _dns_name(msg, pos)
            if pos + 10 > len(msg):
                raise _DnsError("record cut")
            rtype = (msg[pos] << 8) | msg[pos + 1]
            ttl = int.from_bytes(msg[pos + 4:pos + 8], "big")
            rdlen = (msg[pos + 8] << 8) | msg[pos + 9]
            rd_start = pos + 10
            pos = rd_start + rdlen
            if pos > len(msg):
                raise _DnsError("record data cut")
            if rtype == 1 and rdlen == 4:
                value = str(ipaddress.IPv4Address(msg[rd_start:pos]))
            elif rtype == 28 and rdlen == 16:
                value = str(ipaddress.IPv6Address(msg[rd_start:pos]))
            elif rtype == 5:
                value, _ = _dns_name(msg, rd_start)
            else:
                continue
            out.answers.append(DnsAnswer(name, _DNS_TYPES[rtype], value, ttl))
    except _DnsError:
        out.truncated = True
    return out


def dns_answers(payload: bytes | Iterable[bytes]) -> list[DnsAnswer]:
    """A/AAAA/CNAME answers (name, type, address or target, ttl) of one or more DNS messages."""
    msgs = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    out: list[DnsAnswer] = []
    for m in msgs:
        parsed = parse_dns_message(bytes(m))
        if parsed is not None and parsed.is_response:
            out.extend(parsed.answers)
    return out


def _dns_tcp_messages(data: bytes, ctx: _Ctx) -> list[DnsMessage] | None:
    """DNS-over-TCP messages (2-byte length prefix); None when the bytes are not that."""
    out: list[DnsMessage] = []
    pos = 0
    n = len(data)
    while pos + 2 <= n:
        ln = (data[pos] << 8) | data[pos + 1]
        if ln < 12:
            return out or None
        body = data[pos + 2:pos + 2 + ln]
        msg = parse_dns_message(body)
        if msg is None:
            return out or None
        if len(body) < ln:
            ctx.truncated = True
            msg.truncated = True
        out.append(msg)
        pos += 2 + ln
    if pos < n:
        ctx.truncated = True
    return out


def _apply_dns(info: StreamInfo, msgs: Sequence[DnsMessage]) -> None:
    for m in msgs:
        if m.is_response:
            info.dns_answers.extend(m.answers)
        else:
            info.dns_queries.extend(m.questions)
        if m.truncated:
            info.truncated = True
    if not info.dns_queries:
        # only responses seen: their question sections name what was asked
        for m in msgs:
            info.dns_queries.extend(m.questions)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

_PG_SSLREQUEST = bytes.fromhex("0000000804d2162f")
_PG_GSSENCREQUEST = bytes.fromhex("0000000804d21630")
_PG_PROTO3 = b"\x00\x03\x00\x00"


def classify_stream(client: bytes, server: bytes, *, server_port: int, strict: bool = False,
                    origin: str | None = None) -> StreamInfo:
    """Classify one TCP connection from the first bytes of each direction.

    ``client``/``server``: reassembled, in-order bytes each side sent (maybe cut, e.g. at
    16 KiB). ``server_port`` helps where bytes alone are ambiguous (DNS over TCP).
    ``strict=True`` raises ``FormatError`` (with ``origin``) on malformed content instead of
    recording it in ``notes``. Otherwise never raises.
    """
    ctx = _Ctx(strict, origin)
    try:
        info = _classify_stream(bytes(client), bytes(server), server_port, ctx)
    except FormatError:
        raise
    except Exception as e:  # a parser bug must not lose the connection: record it
        if strict:
            raise FormatError(f"payload classification failed: {e!r}", origin=origin) from e
        info = StreamInfo(protocol=PROTO_TCP, mtls=UNKNOWN, reason="classification failed")
        ctx.notes.append(f"internal error: {e!r}")
    info.truncated = info.truncated or ctx.truncated
    info.notes = ctx.notes + info.notes
    return info


def _classify_stream(client: bytes, server: bytes, port: int, ctx: _Ctx) -> StreamInfo:
    if not client and not server:
        return StreamInfo(protocol=PROTO_TCP, mtls=UNKNOWN, reason="no payload")
    # TLS, possibly after a PostgreSQL SSLRequest prelude
    if client.startswith((_PG_SSLREQUEST, _PG_GSSENCREQUEST)):
        answer = server[:1]
        if answer == b"S" and looks_like_tls(client[8:]):
            info = _tls_stream(client[8:], server[1:], ctx)
            info.notes.append("postgres: SSLRequest accepted ('S'), TLS follows")
            return info
        if answer == b"N":
            # PostgreSQL protocol (Message Flow, SSL Session Encryption): 'N' means the server
            # refuses encryption; the client then goes on with a StartupMessage in clear or
            # closes. Either way no TLS protects this connection: plaintext.
            return StreamInfo(protocol=PROTO_POSTGRES, mtls=PLAINTEXT,
                              reason="postgres: server refused SSLRequest ('N')")
        return StreamInfo(protocol=PROTO_POSTGRES, mtls=UNKNOWN,
                          reason="postgres: SSLRequest without a visible answer")
    if looks_like_tls(client) and (client[0] == _CT_HANDSHAKE or looks_like_tls(server)
                                   or not server):
        return _tls_stream(client, server, ctx)
    if looks_like_tls(server) and server[0] == _CT_HANDSHAKE and not looks_like_tls(client):
        if client and (looks_like_http1(client) or client.startswith(H2_PREFACE)):
            pass  # e.g. a plaintext client answered by a TLS server: handled below
        else:
            info = _tls_stream(server, client, ctx)
            info.notes.append("directions swapped: the 'server' side sent the ClientHello")
            return info
    if client.startswith(H2_PREFACE) or (not client and server.startswith(H2_PREFACE)):
        c, s = (client, server) if client.startswith(H2_PREFACE) else (server, client)
        return _h2_stream(c, s, len(H2_PREFACE), False, ctx, None)
    if looks_like_http1(client) or (not client and looks_like_http1(server)):
        return _http1_stream(client, server, ctx)
    if looks_like_http1(server) and not looks_like_http1(client):
        if server.startswith(b"HTTP/"):
            ctx.notes.append("http: client bytes are not HTTP, server answers HTTP")
            return _http1_stream(client, server, ctx)
        info = _http1_stream(server, client, ctx)
        info.notes.append("directions swapped: the 'server' side sent the requests")
        return info
    # DNS over TCP
    if port in _DNS_PORTS or (len(client) > 14 and (client[0] << 8 | client[1]) == len(client) - 2):
        cm = _dns_tcp_messages(client, ctx) if client else []
        sm = _dns_tcp_messages(server, ctx) if server else []
        if cm is not None and sm is not None and (cm or sm):
            info = StreamInfo(protocol=PROTO_DNS, mtls=PLAINTEXT, reason="DNS over TCP")
            _apply_dns(info, cm + sm)
            return info
    # HTTP/2 frames without the preface (capture began mid-connection)
    c_h2 = bool(client) and looks_like_h2_frames(client)
    s_h2 = bool(server) and looks_like_h2_frames(server)
    if c_h2 or s_h2:
        if client and not c_h2:
            ctx.notes.append("h2: client bytes do not start on a frame boundary; skipped")
        if server and not s_h2:
            ctx.notes.append("h2: server bytes do not start on a frame boundary; skipped")
        info = _h2_stream(client if c_h2 else b"", server if s_h2 else b"", 0, True, ctx, None)
        info.notes.append("h2: no connection preface (capture began mid-connection)")
        return info
    # MySQL: server greeting (protocol 10), client SSLRequest packet (32 bytes, seq 1, with
    # CLIENT_SSL 0x0800), then the TLS handshake (MySQL client/server protocol, SSL upgrade).
    if len(server) > 5 and server[3] == 0 and server[4] == 10 and len(client) > 41 \
            and client[:4] == b"\x20\x00\x00\x01" and client[5] & 0x08 \
            and looks_like_tls(client[36:]):
        srv_len = int.from_bytes(server[:3], "little")
        info = _tls_stream(client[36:], server[4 + srv_len:], ctx)
        info.notes.append("mysql: SSLRequest, TLS follows")
        return info
    if client.startswith(b"SSH-") or server.startswith(b"SSH-"):
        return StreamInfo(protocol=PROTO_SSH, mtls=UNKNOWN,
                          reason="SSH banner: encrypted, but not TLS")
    if len(client) >= 8 and client[4:8] == _PG_PROTO3 and \
            8 <= int.from_bytes(client[:4], "big") <= 10000:
        return StreamInfo(protocol=PROTO_POSTGRES, mtls=PLAINTEXT,
                          reason="postgres StartupMessage in clear")
    if looks_like_tls(client) or looks_like_tls(server):
        return _tls_stream(client, server, ctx)
    return StreamInfo(protocol=PROTO_TCP, mtls=UNKNOWN,
                      reason="opaque TCP: neither TLS nor a recognised cleartext protocol")


def _tls_stream(client: bytes, server: bytes, ctx: _Ctx) -> StreamInfo:
    info = StreamInfo(protocol=PROTO_TLS, mtls=TLS)
    _apply_tls(info, client, server, ctx)
    _tls_verdict(info)
    if server and not looks_like_tls(server):
        # e.g. a ClientHello sent to a plaintext HTTP server that answers with an error page
        info.mtls = UNKNOWN
        info.reason = "TLS ClientHello answered by non-TLS bytes"
    return info


def _h2_stream(client: bytes, server: bytes, cpos: int, mid: bool, ctx: _Ctx,
               upgrade_req: HttpRequest | None, spos: int = 0) -> StreamInfo:
    cframes = _h2_frames(client, cpos, ctx, "client")
    sframes = _h2_frames(server, spos, ctx, "server")
    res = _decode_h2(cframes, sframes, mid, ctx, upgrade_req)
    proto = PROTO_GRPC if res.grpc else PROTO_H2C
    reason = "gRPC over cleartext HTTP/2" if res.grpc else "cleartext HTTP/2"
    return StreamInfo(protocol=proto, mtls=PLAINTEXT, reason=reason, requests=res.requests)


def _http1_stream(client: bytes, server: bytes, ctx: _Ctx) -> StreamInfo:
    cw = _walk_http1(client, None, ctx, "client")
    methods = [m.method for m in cw.messages if m.is_request]
    sw = _walk_http1(server, methods, ctx, "server")
    msgs: list[tuple[bool, Http1Message]] = [(True, m) for m in cw.messages]
    msgs += [(False, m) for m in sw.messages]
    requests = pair_http1(msgs)
    info = StreamInfo(protocol=PROTO_HTTP, mtls=PLAINTEXT, reason="HTTP/1 in clear",
                      requests=requests,
                      truncated=(cw.truncated and cw.stop is None)
                      or (sw.truncated and sw.stop is None))
    last_req = cw.messages[-1] if cw.messages and cw.messages[-1].is_request else None
    resp101 = next((m for m in sw.messages if m.status == 101), None)
    upgrade = (last_req.headers.get("upgrade", "") if last_req else "").lower()
    if upgrade == "h2c" and (resp101 is not None or client[cw.end:].startswith(H2_PREFACE)):
        # RFC 7540 3.2: after 101 the server speaks HTTP/2; the client sends the preface.
        crest = client[cw.end:]
        cpos = len(H2_PREFACE) if crest.startswith(H2_PREFACE) else 0
        up = next((r for r in reversed(requests) if r.method is not None), None)
        if up is not None and up.status == 101:
            up.status = None
        h2 = _h2_stream(crest, server, cpos, False, ctx, up, spos=sw.end if resp101 else 0)
        h2.requests = [r for r in requests if r is not up] + h2.requests
        h2.reason = ("gRPC over h2c (HTTP/1.1 Upgrade)" if h2.protocol == PROTO_GRPC
                     else "h2c via HTTP/1.1 Upgrade")
        h2.truncated = h2.truncated or info.truncated
        return h2
    if cw.stop == "connect" or sw.stop == "connect":
        crest, srest = client[cw.end:], server[sw.end:]
        if looks_like_tls(crest):
            inner = StreamInfo(protocol=PROTO_TLS, mtls=TLS)
            _apply_tls(inner, crest, srest, ctx)
            _tls_verdict(inner)
            for name in ("mtls", "mesh", "tls_version", "tls_version_negotiated", "sni",
                         "alpn_offered", "alpn_selected", "certificate_requested",
                         "client_certificate"):
                setattr(info, name, getattr(inner, name))
            # The CONNECT line is cleartext, the tunnelled payload is TLS: the bytes that
            # matter are encrypted, so the TLS verdict wins.
            info.reason = f"HTTP CONNECT tunnel carrying TLS ({inner.reason})"
        else:
            info.reason = "HTTP CONNECT tunnel"
    elif resp101 is not None or cw.stop == "upgrade":
        info.notes.append(f"http: connection upgraded to {upgrade or 'another protocol'}")
    return info


def classify_datagrams(client: Sequence[bytes], server: Sequence[bytes], *, server_port: int,
                       strict: bool = False, origin: str | None = None) -> StreamInfo:
    """Classify one UDP flow from its datagram payloads, each direction in order.

    Datagrams are passed one by one (not joined) because DNS messages are delimited by them.
    DNS (by port 53/5353/5355 or by parsing) gives queries and A/AAAA/CNAME answers;
    anything else is opaque ``udp`` with mtls ``unknown``.
    """
    ctx = _Ctx(strict, origin)
    info = StreamInfo(protocol=PROTO_UDP, mtls=UNKNOWN, reason="opaque UDP")
    try:
        parsed = [parse_dns_message(bytes(d)) for d in (*client, *server)]
        msgs = [m for m in parsed if m is not None]
        bad = len(parsed) - len(msgs)
        if msgs and (server_port in _DNS_PORTS or not bad):
            info = StreamInfo(protocol=PROTO_DNS, mtls=PLAINTEXT, reason="DNS over UDP")
            _apply_dns(info, msgs)
            if bad:
                ctx.problem(f"dns: {bad} datagram(s) are not DNS messages")
    except FormatError:
        raise
    except Exception as e:
        if strict:
            raise FormatError(f"datagram classification failed: {e!r}", origin=origin) from e
        ctx.notes.append(f"internal error: {e!r}")
    info.notes = ctx.notes + info.notes
    info.truncated = info.truncated or ctx.truncated
    return info


__all__ = [
    "H2_PREFACE",
    "MTLS",
    "PLAINTEXT",
    "TLS",
    "UNKNOWN",
    "DnsAnswer",
    "DnsMessage",
    "Http1Message",
    "HttpRequest",
    "StreamInfo",
    "classify_datagrams",
    "classify_stream",
    "dns_answers",
    "looks_like_h2_frames",
    "looks_like_http1",
    "looks_like_tls",
    "pair_http1",
    "parse_dns_message",
    "parse_http1_message",
]
