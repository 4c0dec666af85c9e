"""The observer's ``POST /v1/flows``: flow records shipped by the nodes' eBPF tracers.

Each request is one shipment of :mod:`observe.ship` (an Arrow IPC stream of flow records, with
the node, its stream id and the shipment's number in headers). In order:

1. **Who**: the bearer token goes to the API server's TokenReview
   (``POST /apis/authentication.k8s.io/v1/tokenreviews``, audience ``meshwright``) through the
   observer's :class:`observe.kube.KubeApi`; only an authenticated username listed in
   ``--ingest-allow`` may send (401 no or bad token, 403 not allowed, 503 when the review cannot
   be made now). A token bound to a pod names its node (``authentication.kubernetes.io/
   node-name``): that name is the node, and a request claiming another is refused. Accepted
   reviews are cached for a minute, keyed by a SHA-256 of the token (never logged or kept).
2. **What**: at most ``max_body`` bytes (413), an Arrow IPC stream of flow records, zstd or
   not (``Content-Encoding``; decoding to at most 16 x ``max_body``) - 400 with a one-line
   reason otherwise - conformed with :func:`observe.schema.conform`, every row with
   ``source`` ``ebpf`` (400 otherwise: this endpoint takes node tracers' records only).
3. **Exactly once**: the shipment is handed to the observer's main loop, which commits its
   rows in a FlowStore part together with the checkpoint's ``stream -> last seq``
   (:class:`observe.state.IngestCursor`); the answer (200) is sent only after that commit. A
   number at or below the stream's last is answered 200 ``duplicate`` and not stored again; a
   number past the next one is stored and the missing ones counted (the node dropped them from
   a full spool). No commit within ``wait`` seconds, or a stopping observer: 503, and the node
   sends again (a resend of a shipment that was committed meanwhile is a duplicate).

**Transport** (:class:`ServerTLS`): with a certificate and key the listener speaks HTTPS only
(TLS 1.2+), so the bearer token never crosses the network in clear text - whoever read it could
send fabricated flows as that node for the rest of its hour, and meshwright would propose
policies allowing traffic that never happened. The files are checked for changes at most every
``reload_every`` seconds, when a connection arrives, and a changed pair is loaded for the
connections from then on (cert-manager or a re-created Secret rotate them in place); a pair
that does not load (half-written, key not matching) keeps the previous one, logged and counted.
Clients that fail the handshake (plain HTTP, a client not trusting the certificate, old TLS)
are logged at debug level and counted by reason, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from observe.errors import FormatError, InputError, InventoryError
from observe.kube import ApiUnavailable, KubeApi
from observe.ship import (
    HEADER_NODE,
    HEADER_ROWS,
    HEADER_SEQ,
    HEADER_STREAM,
    STREAM_ID,
    TLS_MINIMUM,
    decode_shipment,
    file_stamp,
    read_pem,
    ssl_words,
)
from observe.state import IngestCursor

log = logging.getLogger("meshwright.ingest")

INGEST_PATH = "/v1/flows"
AUDIENCE = "meshwright"
DEFAULT_ALLOW = ("system:serviceaccount:meshwright:meshwright-ebpf",)
DEFAULT_MAX_BODY = 64 << 20
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: The TokenReview ``user.extra`` key naming the node of a pod-bound token (Kubernetes 1.30+).
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
#: Streams not heard from for this long are forgotten (their cursor leaves the checkpoint).
STREAM_TTL = timedelta(days=30)
#: Shipments waiting for a commit at most; more are answered 503 (the nodes retry).
MAX_QUEUED = 256
#: The reasons rejections are counted by (``meshwright_ingest_rejected_total{reason}``).
REASONS = ("unauthenticated", "forbidden", "unavailable", "too_large", "malformed",
           "not_ebpf", "bad_request", "stopping", "busy", "timeout", "commit_failed")


@dataclass
class IngestConfig:
    allow: tuple[str, ...] = DEFAULT_ALLOW
    """Usernames (``system:serviceaccount:<ns>:<name>``) that may send flows."""
    audience: str = AUDIENCE
    max_body: int = DEFAULT_MAX_BODY
    wait: float = 20.0
    """Seconds a request waits for its commit before answering 503."""
    commit_every: float = 0.25
    """Commits made for shipments are this far apart at least: a lone shipment is committed
    at once, under load those that came meanwhile go together (one part, one fsync)."""
    cache_seconds: float = 60.0
    stream_ttl: timedelta = STREAM_TTL


# -- who -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    username: str
    node: str | None
    """The node of a pod-bound token, when the API server says it."""


class Unauthenticated(Exception):
    """The token is not valid (for this audience)."""


class ReviewUnavailable(Exception):
    """The token could not be reviewed now (API server down, or this observer may not create
    TokenReviews)."""


class TokenReviewer:
    """Token -> :class:`Identity` through TokenReview; accepted reviews cached briefly."""

    def __init__(self, api: KubeApi, *, audience: str = AUDIENCE, cache_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_cache: int = 4096) -> None:
        self.api = api
        self.audience = audience
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.max_cache = max_cache
        self.reviews = 0
        """TokenReviews made (cache misses)."""
        self._cache: dict[str, tuple[float, Identity]] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        identity = self._review(token)
        with self._lock:
            if len(self._cache) >= self.max_cache:
                for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                    del self._cache[k]
                if len(self._cache) >= self.max_cache:
                    self._cache.clear()
            self._cache[key] = (now + self.cache_seconds, identity)
        return identity

    def clear(self) -> None:
        """Forget the cached reviews (the next request of each token is reviewed again)."""
        with self._lock:
            self._cache.clear()

    def _review(self, token: str) -> Identity:
        self.reviews += 1
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            doc = self.api.post_json(TOKENREVIEW_PATH, body)
        except ApiUnavailable as exc:
            raise ReviewUnavailable(f"TokenReview unavailable: {exc.message}") from exc
        except InventoryError as exc:
            log.error("TokenReview failed: %s (the observer's service account needs 'create' "
                      "on tokenreviews.authentication.k8s.io)", exc.message)
            raise ReviewUnavailable(f"TokenReview failed: {exc.message}") from exc
        status = _mapping(doc.get("status"))
        if not status.get("authenticated"):
            raise Unauthenticated(_one_line(status.get("error") or "not authenticated"))
        # An audience-aware server returns the audiences it checked; one that ignored them
        # (returning none) has not shown the token is meant for us.
        if self.audience not in (status.get("audiences") or ()):
            raise Unauthenticated(f"the token is not for audience {self.audience!r}")
        user = _mapping(status.get("user"))
        username = user.get("username")
        if not isinstance(username, str) or not username:
            raise Unauthenticated("the review names no user")
        extra = _mapping(user.get("extra"))
        nodes = extra.get(NODE_NAME_KEY) or []
        node = str(nodes[0]) if isinstance(nodes, list) and nodes else None
        return Identity(username, node)


class Headers(Protocol):
    """What :meth:`Ingestor.handle` reads request headers from (``http.server``'s
    ``self.headers``, a dict)."""

    def get(self, name: str, /) -> str | None: ...


# -- replies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    doc: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return json.dumps(self.doc, sort_keys=True).encode() + b"\n"


@dataclass
class _Pending:
    stream: str
    seq: int
    node: str
    batches: list[pa.RecordBatch]
    rows: int
    queued: float
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None
    duplicate_of: int | None = None
    missing: int = 0


@dataclass
class NodeStats:
    stored: int = 0
    duplicates: int = 0
    rows: int = 0
    missing: int = 0
    """Shipment numbers never stored (dropped by the node's full spool, or refused here)."""
    last_seen: float = 0.0
    """Unix time of its last commit."""


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    commits: int = 0
    wait_sum: float = 0.0
    """Seconds shipments waited for their commit, summed."""


# -- the endpoint --------------------------------------------------------------------------------
class Ingestor:
    """The request side (:meth:`handle`, any thread) and the commit side (:meth:`due`,
    :meth:`take`, :meth:`prepare`, :meth:`committed`, :meth:`failed`: the main loop only)."""

    def __init__(self, reviewer: Callable[[str], Identity], config: IngestConfig | None = None,
                 cursors: Mapping[str, IngestCursor] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reviewer = reviewer
        self.config = config or IngestConfig()
        self.cursors: dict[str, IngestCursor] = dict(cursors or {})
        self.clock = clock
        self.stats = IngestStats()
        self._queue: list[_Pending] = []
        self._lock = threading.Lock()
        self._closed = False
        self._last_commit = float("-inf")
        for cursor in self.cursors.values():  # last seen before a restart, until it sends again
            node = self.stats.nodes.setdefault(cursor.node, NodeStats())
            node.last_seen = max(node.last_seen, _unix(cursor.seen))

    # -- requests ----------------------------------------------------------------------------
    def handle(self, headers: Headers, read: Callable[[int], bytes], *,
               stopping: bool = False) -> Reply:
        """Answer one ``POST /v1/flows`` (``read(n)`` reads the body); blocks until the
        shipment is committed (or ``wait`` passed)."""
        with self._lock:
            self.stats.received += 1
        length = _int(headers.get("Content-Length"))

        def reject(status: int, reason: str, message: str, *,
                   extra: tuple[tuple[str, str], ...] = (), drain: bool = True) -> Reply:
            with self._lock:
                self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
            if drain and length is not None and 0 < length <= 4 * self.config.max_body:
                _discard(read, length)  # read it, or the client may see a reset, not the answer
            log.log(logging.ERROR if reason in ("malformed", "not_ebpf", "too_large")
                    else logging.WARNING, "rejected a shipment (HTTP %d): %s", status, message)
            return Reply(status, {"error": message}, extra)

        if stopping or self._closed:
            return reject(503, "stopping", "the observer is stopping; send again later",
                          extra=(("Retry-After", "5"),))
        if length is None or length < 0:
            return reject(411, "bad_request", "a Content-Length is required", drain=False)
        token = _bearer(headers.get("Authorization"))
        if token is None:
            return reject(401, "unauthenticated", "no bearer token",
                          extra=(("WWW-Authenticate", "Bearer"),))
        try:
            identity = self.reviewer(token)
        except Unauthenticated as exc:
            return reject(401, "unauthenticated", f"token not accepted: {exc}",
                          extra=(("WWW-Authenticate", 'Bearer error="invalid_token"'),))
        except ReviewUnavailable as exc:
            return reject(503, "unavailable", f"cannot check the token now: {exc}",
                          extra=(("Retry-After", "5"),))
        if identity.username not in self.config.allow:
            return reject(403, "forbidden", f"{identity.username} may not send flows "
                          f"(allowed: {', '.join(self.config.allow) or 'nobody'})")
        claimed = (headers.get(HEADER_NODE) or "").strip()
        if identity.node and claimed and claimed != identity.node:
            return reject(403, "forbidden", f"the token belongs to node {identity.node}, not "
                          f"{claimed}")
        node = identity.node or claimed
        stream = (headers.get(HEADER_STREAM) or "").strip()
        seq = _int(headers.get(HEADER_SEQ))
        if not node:
            return reject(400, "bad_request", f"no {HEADER_NODE} header")
        if not STREAM_ID.match(stream):
            return reject(400, "bad_request", f"{HEADER_STREAM} must be 8-64 lower-case hex "
                          "digits")
        if seq is None or seq < 1:
            return reject(400, "bad_request", f"{HEADER_SEQ} must be a number from 1")
        if length > self.config.max_body:
            return reject(413, "too_large", f"the body has {length:,} bytes, more than the "
                          f"{self.config.max_body:,} taken")
        body = _read_exact(read, length)
        if len(body) < length:
            return reject(400, "bad_request", f"the body ended after {len(body):,} of "
                          f"{length:,} bytes", drain=False)
        origin = f"{node}/{stream}/{seq}"
        try:
            batches = decode_shipment(body, origin, encoding=headers.get("Content-Encoding"),
                                      max_bytes=16 * self.config.max_body)
        except FormatError as exc:
            return reject(400, "malformed", str(exc), drain=False)
        rows = sum(b.num_rows for b in batches)
        foreign = sum(b.num_rows - int(pc.sum(pc.fill_null(pc.equal(b.column("source"), "ebpf"),
                                                         False)).as_py() or 0)
                      for b in batches)
        if foreign:
            return reject(400, "not_ebpf", f"{origin}: {foreign:,} of {rows:,} rows are not "
                          "eBPF records (source is not 'ebpf'): this endpoint takes node "
                          "tracers' records only", drain=False)
        declared = _int(headers.get(HEADER_ROWS))
        if declared is not None and declared != rows:
            return reject(400, "malformed", f"{origin}: {rows:,} rows, {HEADER_ROWS} says "
                          f"{declared:,}", drain=False)
        pending = _Pending(stream, seq, node, batches, rows, self.clock())
        with self._lock:
            refused = ("stopping" if self._closed
                       else "busy" if len(self._queue) >= MAX_QUEUED else None)
            if refused is None:
                self._queue.append(pending)
        if refused == "stopping":
            return reject(503, "stopping", "the observer is stopping; send again later",
                          extra=(("Retry-After", "5"),), drain=False)
        if refused == "busy":
            return reject(503, "busy", "too many shipments waiting; send again later",
                          extra=(("Retry-After", "2"),), drain=False)
        if not pending.done.wait(self.config.wait):
            return reject(503, "timeout", f"{origin} not committed within "
                          f"{self.config.wait:.0f} s; send again (a shipment committed "
                          "meanwhile is recognised)", drain=False)
        assert pending.reply is not None
        return pending.reply

    # -- the main loop's side ----------------------------------------------------------------
    def due(self) -> bool:
        """Shipments wait, and the last commit made for them is ``commit_every`` ago (or
        many wait)."""
        with self._lock:
            return bool(self._queue) and (
                self.clock() - self._last_commit >= self.config.commit_every
                or len(self._queue) >= MAX_QUEUED // 4)

    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def take(self) -> list[_Pending]:
        with self._lock:
            taken, self._queue = self._queue, []
            return taken

    def prepare(self, taken: list[_Pending]) -> tuple[list[pa.RecordBatch],
                                                      dict[str, IngestCursor]]:
        """The rows to commit and the cursors to checkpoint with them (duplicates dropped,
        streams quiet beyond ``stream_ttl`` forgotten)."""
        now = datetime.now(UTC)
        limit = (now - self.config.stream_ttl).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        cursors = {k: c for k, c in self.cursors.items() if c.seen >= limit}
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        batches: list[pa.RecordBatch] = []
        for p in taken:
            last = cursors.get(p.stream)
            last_seq = last.seq if last is not None else 0
            if p.seq <= last_seq:
                p.duplicate_of = last_seq
                continue
            p.missing = p.seq - last_seq - 1
            cursors[p.stream] = IngestCursor(p.seq, p.node, stamp)
            batches.extend(b for b in p.batches if b.num_rows)
        return batches, cursors

    def committed(self, taken: list[_Pending], cursors: dict[str, IngestCursor]) -> None:
        """After the commit: the cursors are current, the requests get their 200."""
        self.cursors = cursors
        now, wall = self.clock(), time.time()
        with self._lock:
            if taken:
                self.stats.commits += 1
                self._last_commit = now
            for p in taken:
                node = self.stats.nodes.setdefault(p.node, NodeStats())
                node.last_seen = wall
                self.stats.wait_sum += now - p.queued
                if p.duplicate_of is not None:
                    node.duplicates += 1
                    self.stats.duplicates += 1
                    p.reply = Reply(200, {"result": "duplicate", "seq": p.seq,
                                          "last": p.duplicate_of})
                else:
                    node.stored += 1
                    node.rows += p.rows
                    node.missing += p.missing
                    self.stats.stored += 1
                    self.stats.rows += p.rows
                    p.reply = Reply(200, {"result": "stored", "seq": p.seq, "rows": p.rows})
                p.batches = []
        for p in taken:
            if p.missing:
                log.warning("node %s stream %s: shipment %d stored after %d; %d in between "
                            "never were (refused here, dropped by the node's full spool, or "
                            "stored before this state was reset)", p.node, p.stream, p.seq,
                            p.seq - p.missing - 1, p.missing)
            if p.duplicate_of is not None:
                log.info("node %s stream %s: shipment %d again (stored already): "
                         "acknowledged, not stored twice", p.node, p.stream, p.seq)
            p.done.set()

    def failed(self, taken: list[_Pending], exc: BaseException) -> None:
        """The commit failed: the requests get a 503 (the nodes send again)."""
        with self._lock:
            self.stats.rejected["commit_failed"] = (self.stats.rejected.get("commit_failed", 0)
                                                    + len(taken))
        for p in taken:
            p.reply = Reply(503, {"error": f"commit failed: {_one_line(exc)}"},
                            (("Retry-After", "5"),))
            p.batches = []
            p.done.set()

    def close(self) -> None:
        """No more commits: whatever still waits gets a 503."""
        with self._lock:
            self._closed = True
            rest, self._queue = self._queue, []
        for p in rest:
            p.reply = Reply(503, {"error": "the observer is stopping; send again later"},
                            (("Retry-After", "5"),))
            p.done.set()

    # -- metrics -----------------------------------------------------------------------------
    def metrics(self) -> Iterator[Any]:
        with self._lock:
            nodes = {n: NodeStats(**vars(s)) for n, s in self.stats.nodes.items()}
            rejected = dict(self.stats.rejected)
            waiting = len(self._queue)
        ship = CounterMetricFamily("meshwright_ingest_shipments",
                                   "Node shipments acknowledged, by node and result "
                                   "(stored, or duplicate: stored before, not again)",
                                   labels=["node", "result"])
        rows = CounterMetricFamily("meshwright_ingest_rows", "Flow records stored from nodes",
                                   labels=["node"])
        missing = CounterMetricFamily("meshwright_ingest_missing_shipments",
                                      "Shipment numbers of a node never stored (dropped from "
                                      "its full spool, or refused here)", labels=["node"])
        seen = GaugeMetricFamily("meshwright_ingest_last_seen_timestamp_seconds",
                                 "Unix time of the last shipment committed from a node",
                                 labels=["node"])
        for name in sorted(nodes):
            s = nodes[name]
            ship.add_metric([name, "stored"], s.stored)
            ship.add_metric([name, "duplicate"], s.duplicates)
            rows.add_metric([name], s.rows)
            missing.add_metric([name], s.missing)
            seen.add_metric([name], s.last_seen)
        rej = CounterMetricFamily("meshwright_ingest_rejected",
                                  "Node shipments refused, by reason", labels=["reason"])
        for reason in REASONS:
            rej.add_metric([reason], rejected.get(reason, 0))
        yield from (ship, rows, missing, seen, rej)
        yield GaugeMetricFamily("meshwright_ingest_waiting",
                                "Node shipments waiting for their commit", value=waiting)


# -- TLS for the listener -----------------------------------------------------------------------
#: Seconds between checks of the certificate and key files for a change (on new connections).
TLS_RELOAD_SECONDS = 30.0
#: Seconds a client gets to complete the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
#: The reasons failed handshakes are counted by (``meshwright_tls_handshake_failures_total``).
HANDSHAKE_REASONS = ("untrusted_certificate", "plain_http", "protocol_version", "timeout",
                     "closed", "other")


def load_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the PEM certificate chain ``cert`` and its private key
    ``key``. Raises :class:`InputError` naming the file at fault: missing or unreadable, not
    PEM, an encrypted key, or a key that does not belong to the certificate."""
    cert_pem = read_pem(cert, "TLS certificate file", "CERTIFICATE")
    key_pem = read_pem(key, "TLS private key file", "PRIVATE KEY")
    if "ENCRYPTED" in key_pem:
        raise InputError("the TLS private key is encrypted (meshwright takes an unencrypted "
                         "key, as kubernetes.io/tls Secrets hold it)", origin=str(key))
    try:  # the certificate alone first, so that its faults name its file
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise InputError(f"not a usable PEM certificate: {ssl_words(exc)}",
                         origin=str(cert)) from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MINIMUM
    context.set_alpn_protocols(["http/1.1"])

    def no_password() -> bytes:
        raise ValueError("the key asks for a password")

    try:
        context.load_cert_chain(str(cert), str(key), password=no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise InputError(f"the TLS private key does not belong to the certificate {cert}",
                             origin=str(key),
                             hint="--tls-key must be the key of --tls-cert (a renewal may "
                                  "have replaced one of the two only)") from exc
        raise InputError(f"not a usable PEM private key (damaged, or not the key of a "
                         f"certificate: {ssl_words(exc)})",
                         origin=str(key)) from exc
    except (OSError, ValueError) as exc:  # changed between the read above and this load
        raise InputError(f"cannot load the TLS certificate and key: {ssl_words(exc)}",
                         origin=str(key)) from exc
    return context


def handshake_reason(exc: BaseException) -> str:
    """Which of :data:`HANDSHAKE_REASONS` a failed server-side handshake was."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "").upper()
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "plain_http"
        if "ALERT" in reason and ("CERTIFICATE" in reason or reason.endswith("UNKNOWN_CA")):
            return "untrusted_certificate"
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "protocol_version"
        if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
            return "closed"
        return "other"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "other"


class ServerTLS(Collector):
    """The listener's TLS: the current context (reloaded when the files changed, checked at
    most every ``reload_every`` seconds as connections arrive), the handshake of each
    connection, and their counters as Prometheus metrics."""

    def __init__(self, cert: Path, key: Path, *, reload_every: float = TLS_RELOAD_SECONDS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.reload_every = reload_every
        self.handshake_timeout = handshake_timeout
        self.clock = clock
        self._lock = threading.Lock()
        try:  # before loading: a change in between is seen at the first look
            self._stamp = file_stamp(self.cert, self.key)
        except OSError as exc:
            load_server_context(self.cert, self.key)  # says which file and why
            raise InputError(f"cannot read: {exc.strerror or exc}",
                             origin=str(exc.filename or self.cert)) from exc
        self._context = load_server_context(self.cert, self.key)
        self._checked = clock()
        self._failed_stamp: object = None
        self.reloads = 0
        self.reload_errors = 0
        self.handshakes = 0
        self.failures: dict[str, int] = {}

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: the files are looked at when ``reload_every``
        passed since the last look; changed, they are loaded (a pair that does not load keeps
        the current context and is retried at the next look)."""
        with self._lock:
            now = self.clock()
            if now - self._checked < self.reload_every:
                return self._context
            self._checked = now
            try:
                stamp = file_stamp(self.cert, self.key)
                if stamp == self._stamp:
                    return self._context
                context = load_server_context(self.cert, self.key)
            except (OSError, InputError) as exc:
                self.reload_errors += 1
                if str(exc) != self._failed_stamp:
                    self._failed_stamp = str(exc)
                    log.error("TLS certificate not reloaded, still serving the previous one: "
                              "%s", exc)
                return self._context
            self._context, self._stamp, self._failed_stamp = context, stamp, None
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"cert": str(self.cert)}})
        return context

    def handshake(self, sock: socket.socket, peer: Any) -> ssl.SSLSocket | None:
        """``sock`` (a new connection) after a server-side TLS handshake, or None when the
        handshake failed (logged at debug level, counted, the connection closed)."""
        try:
            sock.settimeout(self.handshake_timeout)
            conn = self.context().wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False)
        except OSError as exc:
            self._failed(exc, peer)
            sock.close()
            return None
        try:
            conn.do_handshake()
            conn.settimeout(None)
        except OSError as exc:  # ssl.SSLError, timeouts and resets are OSErrors
            self._failed(exc, peer)
            conn.close()
            return None
        with self._lock:
            self.handshakes += 1
        return conn

    def _failed(self, exc: BaseException, peer: Any) -> None:
        reason = handshake_reason(exc)
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else peer
        log.debug("TLS handshake with %s failed (%s): %s", where, reason, ssl_words(exc))

    def collect(self) -> Iterator[Any]:
        with self._lock:
            failures = dict(self.failures)
            handshakes, reloads, errors = self.handshakes, self.reloads, self.reload_errors
        yield CounterMetricFamily("meshwright_tls_handshakes",
                                  "TLS handshakes completed on --listen", value=handshakes)
        fam = CounterMetricFamily("meshwright_tls_handshake_failures",
                                  "TLS handshakes on --listen that failed, by reason "
                                  "(untrusted_certificate: the client refused this "
                                  "certificate; plain_http; protocol_version: TLS below 1.2 or "
                                  "not TLS; timeout; closed; other)", labels=["reason"])
        for reason in HANDSHAKE_REASONS:
            fam.add_metric([reason], failures.get(reason, 0))
        yield fam
        yield CounterMetricFamily("meshwright_tls_certificate_reloads",
                                  "Changed TLS certificate/key files loaded", value=reloads)
        yield CounterMetricFamily("meshwright_tls_certificate_reload_errors",
                                  "Checks that found changed TLS files which did not load "
                                  "(the previous certificate kept)", value=errors)


def _unix(stamp: str) -> float:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _int(value: str | None) -> int | None:
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _read_exact(read: Callable[[int], bytes], length: int) -> bytes:
    parts: list[bytes] = []
    left = length
    while left > 0:
        chunk = read(min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _discard(read: Callable[[int], bytes], length: int) -> None:
    left = length
    try:
        while left > 0:
            chunk = read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        return


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]

