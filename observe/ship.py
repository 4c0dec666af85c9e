"""Shipping a node's flow records to the observer: a durable spool and a sender.

``meshwright observe --ebpf --send URL`` runs one tracer for the life of the process and hands
its record batches to a :class:`Shipper`: every ``flush_every`` seconds what arrived is cut into
one *shipment*, written atomically to the :class:`Spool` directory, and then POSTed to URL, the
observer's ``/v1/flows`` (meshwright.ingest). A shipment leaves the spool only when the observer
answered 2xx, which it does only after the rows and the shipment's sequence number were
committed together (exactly once: a resend after a lost answer is acknowledged as a duplicate
and not stored again).

The protocol, one POST per shipment:

* body: an Arrow IPC *stream* (``application/vnd.apache.arrow.stream``) of record batches with
  :data:`observe.schema.FLOW_SCHEMA` (without its documentation metadata), compressed as a
  whole with zstd (``Content-Encoding: zstd``, RFC 8878). A whole-body frame is 5x smaller
  than Arrow's per-buffer compression for a small shipment (47 columns, most of them null,
  each a frame of its own) and still smaller for 20,000 rows; the receiver also takes an
  uncompressed body and Arrow's buffer compression;
* ``Authorization: Bearer <token>``: the content of the token file, read again for every
  request (the kubelet rotates a projected service-account token in place);
* ``X-Meshwright-Node``: the node's name; ``X-Meshwright-Stream``: the spool's stream id
  (random, kept in the spool directory, so a restart continues the same stream);
  ``X-Meshwright-Seq``: the shipment's number in its stream, 1, 2, 3, ...;
  ``X-Meshwright-Rows``: its rows.

Transport: ``https://`` (TLS 1.2 or later, the observer's certificate verified against
``ca_file`` - a PEM bundle, re-read when it changes - or the system's CAs, and its name
against the URL's host: the Service's DNS name must be in the certificate's SAN). Plain
``http://`` is refused unless the host is a loopback address or ``insecure_http`` is given:
the bearer token would cross the network in clear text, and whoever reads it can send flows
as this node until it expires (:func:`check_url`).

Answers: 2xx delivered (JSON ``{"result": "stored"|"duplicate", ...}``). Retried in order, with
exponential back-off and jitter (:class:`observe.watch.Backoff`): no connection, timeouts, 5xx,
429, 408, and the answers that are about the sender or the address rather than the shipment -
401 (the token file is read again), 403 (this identity is not allowed: fix the observer's
``--ingest-allow``), 404/405 (not the ingest endpoint, or an observer without it), and TLS
failures (unknown CA, name mismatch, expired, an observer speaking plain HTTP: logged once with
the reason until it changes or a shipment goes through, counted as ``tls``). Any other 4xx (400
malformed, 413 too large, ...) rejects this shipment for good: the file is kept aside as
``rejected-*`` with the reason next to it, logged and counted, and the next one is sent.

The spool is bounded (``max_bytes``): when a new shipment would not fit, rejected files go
first, then the oldest undelivered shipments, each logged as an error and counted (the observer
sees the gap in the sequence and counts it too). Nothing here prints; the CLI reports.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pyarrow as pa
import zstandard

from observe.errors import FormatError, InputError
from observe.schema import FLOW_SCHEMA, conform
from observe.state import write_atomic
from observe.watch import Backoff

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.apache.arrow.stream"
HEADER_NODE = "X-Meshwright-Node"
HEADER_STREAM = "X-Meshwright-Stream"
HEADER_SEQ = "X-Meshwright-Seq"
HEADER_ROWS = "X-Meshwright-Rows"
#: Where the DaemonSet mounts its projected service-account token (audience ``meshwright``).
DEFAULT_TOKEN_FILE = "/var/run/secrets/meshwright/token"
DEFAULT_SPOOL_BYTES = 512 << 20
#: Uncompressed bytes of record batches cut into one shipment at most (the body is smaller).
DEFAULT_SHIPMENT_BYTES = 8 << 20
DEFAULT_FLUSH_SECONDS = 10.0
ZSTD_LEVEL = 3
#: How long a stopping shipper keeps trying to deliver (the pod's grace period is 30 s).
DRAIN_SECONDS = 20.0
#: Rejected shipments kept aside (the oldest beyond are deleted).
KEEP_REJECTED = 16
#: Statuses retried although they are 4xx: about the sender or the address, not the shipment.
RETRY_4XX = frozenset({401, 403, 404, 405, 408, 425, 429})
#: Stream ids: hex, as :func:`new_stream_id` makes them (the observer checks the shape).
STREAM_ID = re.compile(r"^[0-9a-f]{8,64}$")

#: FLOW_SCHEMA without its documentation metadata (10 KiB a shipment otherwise); the receiver
#: conforms to FLOW_SCHEMA again.
WIRE_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in FLOW_SCHEMA])

#: TLS versions below this are refused, by the node and by the observer.
TLS_MINIMUM = ssl.TLSVersion.TLSv1_2

_SHIP = re.compile(r"^ship-(\d{12})-(\d+)\.arrows(\.zst)?$")
_REJECTED = re.compile(r"^rejected-(\d{12})-(\d+)\.arrows(\.zst)?$")
_STATE = "spool.json"


# -- the body ------------------------------------------------------------------------------------
def encode_shipment(batches: Iterable[pa.RecordBatch], *, zstd: bool = True) -> bytes:
    """An Arrow IPC stream of ``batches`` (conformed to FLOW_SCHEMA), zstd-compressed as a
    whole (``zstd``) or not."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, WIRE_SCHEMA) as writer:
        for batch in batches:
            batch = batch if batch.schema == FLOW_SCHEMA else conform(batch)
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=WIRE_SCHEMA))
    data = sink.getvalue()
    if not zstd:
        return bytes(data.to_pybytes())
    return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))


def decode_shipment(body: bytes, origin: str, *, encoding: str | None = None,
                    max_bytes: int = 1 << 30) -> list[pa.RecordBatch]:
    """The record batches of a shipment, conformed to FLOW_SCHEMA (missing columns null, extra
    ones dropped, types cast). ``encoding``: the request's ``Content-Encoding`` (``zstd`` or
    none). Raises :class:`FormatError` (one line) on anything that is not an Arrow IPC stream
    of flow records, or that decodes to more than ``max_bytes``."""
    coding = (encoding or "identity").strip().lower()
    if coding == "zstd":
        body = _unzstd(body, origin, max_bytes)
    elif coding != "identity":
        raise FormatError(f"unsupported Content-Encoding {encoding!r} (zstd or none)",
                          origin=origin)
    out: list[pa.RecordBatch] = []
    size = 0
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        for batch in reader:
            size += batch.nbytes
            if size > max_bytes:
                raise FormatError(f"decodes to more than {max_bytes:,} bytes", origin=origin)
            out.append(conform(batch))
    except pa.ArrowException as exc:
        raise FormatError(f"not an Arrow IPC stream of flow records: {_one_line(exc)}",
                          origin=origin) from exc
    return out


def _unzstd(body: bytes, origin: str, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise FormatError(f"decompresses to more than {max_bytes:,} bytes",
                                      origin=origin)
                parts.append(chunk)
    except zstandard.ZstdError as exc:
        raise FormatError(f"not a zstd body: {_one_line(exc)}", origin=origin) from exc
    return b"".join(parts)


def new_stream_id() -> str:
    return secrets.token_hex(16)


# -- the spool -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shipment:
    seq: int
    rows: int
    path: Path
    size: int

    @property
    def reason_path(self) -> Path:
        """Where :meth:`Spool.reject` wrote why it was refused."""
        return _reason_path(self.path)

    @property
    def encoding(self) -> str | None:
        """Its ``Content-Encoding``: ``zstd`` for ``*.arrows.zst``."""
        return "zstd" if self.path.name.endswith(".zst") else None


@dataclass
class SpoolStats:
    written: int = 0
    """Shipments written by this process."""
    found: int = 0
    """Undelivered shipments found at start (left by an earlier run)."""
    dropped: int = 0
    """Shipments deleted undelivered because the spool was full."""
    dropped_rows: int = 0
    dropped_bytes: int = 0
    rejected: int = 0
    """Shipments set aside as ``rejected-*`` (a permanent 4xx)."""


class Spool:
    """Shipments on disk, numbered in one stream, deleted once delivered.

    ``root/spool.json`` holds the stream id and the last number given out; each shipment is
    ``ship-<seq>-<rows>.arrows.zst`` (``.arrows`` when not compressed), written to a temporary
    name, fsynced and renamed: a crash leaves whole shipments only. Thread-safe: one thread
    adds, another delivers.
    """

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_SPOOL_BYTES,
                 keep_rejected: int = KEEP_REJECTED) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.keep_rejected = keep_rejected
        self.stats = SpoolStats()
        self._lock = threading.Lock()
        self._pending: dict[int, Shipment] = {}
        self._rejected: dict[int, Shipment] = {}
        self._size = 0
        """Bytes of the pending and rejected shipments."""
        self._in_flight: int | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for tmp in self.root.glob(".*.tmp"):  # write_atomic's temporaries of a killed run
                tmp.unlink()
            names = sorted(p.name for p in self.root.iterdir())
        except OSError as exc:
            raise InputError(f"cannot use the spool directory: {exc.strerror or exc}",
                             origin=str(self.root)) from exc
        state = self._load_state()
        for name in names:
            for pattern, into in ((_SHIP, self._pending), (_REJECTED, self._rejected)):
                m = pattern.match(name)
                if m:
                    path = self.root / name
                    into[int(m[1])] = Shipment(int(m[1]), int(m[2]), path, path.stat().st_size)
                    self._size += into[int(m[1])].size
        self.stream = str(state.get("stream") or new_stream_id())
        self._last = max([int(state.get("seq") or 0), *self._pending, *self._rejected])
        self.stats.found = len(self._pending)
        if state.get("stream") != self.stream or int(state.get("seq") or 0) != self._last:
            self._save_state()

    def _load_state(self) -> dict[str, Any]:
        path = self.root / _STATE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InputError(f"corrupt spool state: {exc}", origin=str(path),
                             hint="remove the spool directory to start a new stream (its "
                                  "undelivered shipments are lost)") from exc
        stream = doc.get("stream") if isinstance(doc, dict) else None
        if not isinstance(stream, str) or not STREAM_ID.match(stream) or not isinstance(
                doc.get("seq"), int):
            raise InputError("corrupt spool state: no stream id and number", origin=str(path),
                             hint="remove the spool directory to start a new stream")
        return doc

    def _save_state(self) -> None:
        write_atomic(self.root / _STATE,
                     json.dumps({"stream": self.stream, "seq": self._last}).encode())

    # -- adding ------------------------------------------------------------------------------
    def add(self, body: bytes, rows: int, *, zstd: bool = True) -> Shipment:
        """Write a new shipment (the next number in the stream; ``zstd``: the body is
        zstd-compressed); makes room first."""
        with self._lock:
            self._make_room(len(body))
            seq = self._last + 1
            path = self.root / f"ship-{seq:012d}-{rows}.arrows{'.zst' if zstd else ''}"
            write_atomic(path, body)
            # The file first, then the number: a crash in between is healed on open (the
            # largest file number counts), while the other order would skip a number.
            self._last = seq
            self._save_state()
            shipment = Shipment(seq, rows, path, len(body))
            self._pending[seq] = shipment
            self._size += shipment.size
            self.stats.written += 1
            return shipment

    def _make_room(self, incoming: int) -> None:
        while self._rejected and (self._bytes() + incoming > self.max_bytes
                                  or len(self._rejected) > self.keep_rejected):
            self._delete_rejected(min(self._rejected))
        while self._bytes() + incoming > self.max_bytes:
            victims = [s for s in sorted(self._pending) if s != self._in_flight]
            if not victims:
                break
            gone = self._pending.pop(victims[0])
            self._size -= gone.size
            with contextlib.suppress(FileNotFoundError):
                gone.path.unlink()
            self.stats.dropped += 1
            self.stats.dropped_rows += gone.rows
            self.stats.dropped_bytes += gone.size
            log.error("spool full (%s bytes at most): dropped undelivered shipment %d "
                      "(%d rows) of stream %s; %d dropped so far", f"{self.max_bytes:,}",
                      gone.seq, gone.rows, self.stream, self.stats.dropped)

    def _bytes(self) -> int:
        return self._size

    def _delete_rejected(self, seq: int) -> None:
        gone = self._rejected.pop(seq)
        self._size -= gone.size
        for path in (gone.path, _reason_path(gone.path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- delivering --------------------------------------------------------------------------
    def oldest(self) -> Shipment | None:
        """The undelivered shipment with the smallest number (kept from being dropped until
        :meth:`delivered`, :meth:`reject` or :meth:`release`)."""
        with self._lock:
            if not self._pending:
                self._in_flight = None
                return None
            seq = min(self._pending)
            self._in_flight = seq
            return self._pending[seq]

    def read(self, shipment: Shipment) -> bytes | None:
        try:
            return shipment.path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                if self._pending.pop(shipment.seq, None) is not None:
                    self._size -= shipment.size
            return None

    def release(self, shipment: Shipment) -> None:
        with self._lock:
            if self._in_flight == shipment.seq:
                self._in_flight = None

    def delivered(self, shipment: Shipment) -> None:
        with self._lock:
            if self._pending.pop(shipment.seq, None) is not None:
                self._size -= shipment.size
            self._in_flight = None
            with contextlib.suppress(FileNotFoundError):
                shipment.path.unlink()

    def reject(self, shipment: Shipment, reason: str) -> Path:
        """Set the shipment aside as ``rejected-<seq>-<rows>.arrows[.zst]`` (+ ``.reason``)."""
        with self._lock:
            self._in_flight = None
            target = self.root / shipment.path.name.replace("ship-", "rejected-", 1)
            if self._pending.pop(shipment.seq, None) is None:
                return target  # dropped meanwhile (the in-flight one never is)
            write_atomic(_reason_path(target), (reason.rstrip() + "\n").encode())
            os.replace(shipment.path, target)
            self._rejected[shipment.seq] = Shipment(shipment.seq, shipment.rows, target,
                                                    shipment.size)
            self.stats.rejected += 1
            while len(self._rejected) > self.keep_rejected:
                self._delete_rejected(min(self._rejected))
            return target

    # -- looking -----------------------------------------------------------------------------
    def pending(self) -> list[Shipment]:
        with self._lock:
            return [self._pending[s] for s in sorted(self._pending)]

    def rejected(self) -> list[Shipment]:
        with self._lock:
            return [self._rejected[s] for s in sorted(self._rejected)]

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._last

    def pending_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._pending.values())


def _reason_path(path: Path) -> Path:
    """``rejected-<seq>-<rows>.reason`` next to the set-aside shipment."""
    return path.with_name(path.name.split(".", 1)[0] + ".reason")


# -- HTTP ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: bytes


class Poster(Protocol):
    def __call__(self, url: str, body: bytes, headers: Mapping[str, str],
                 timeout: float) -> Response: ...


def http_post(url: str, body: bytes, headers: Mapping[str, str], timeout: float, *,
              context: ssl.SSLContext | None = None) -> Response:
    """One POST on a fresh connection; https with ``context`` (default: the system's CAs,
    :func:`client_context`). Raises ``OSError`` (``ssl.SSLError`` for TLS) /
    ``http.client.HTTPException`` when there is no answer."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout,
                                           context=context or client_context())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body=body,
                     headers={**headers, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        data = resp.read(1 << 16)  # answers are short; a long one is cut
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address literal (127.0.0.0/8, ::1, ::ffff:127.x): traffic
    to it never leaves the machine. Other names are not resolved (DNS could say anything)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def plaintext_host(url: str) -> str | None:
    """The host of an ``http://`` URL that leaves the machine (not loopback), else None."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return host if parts.scheme == "http" and not is_loopback(host) else None


INSECURE_HINT = ("use https:// with the observer's CA (--ca-file FILE), as deploy/ does; "
                 "--insecure-http sends in clear text anyway (a lab, never a cluster network)")


def check_url(url: str, *, insecure_http: bool = False) -> str:
    """``url`` if it is an http(s) URL the node may send to: plain ``http://`` only to a
    loopback host or with ``insecure_http`` (the bearer token would cross the network in clear
    text). Raises :class:`InputError` (origin ``--send``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"not an http(s) URL: {url!r}", origin="--send",
                         hint="e.g. https://meshwright-observer.meshwright.svc:9090/v1/flows")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise InputError(f"bad port in {url!r}", origin="--send") from exc
    host = plaintext_host(url)
    if host is not None and not insecure_http:
        raise InputError(f"plain http:// to {host} would send the node's bearer token and its "
                         "flows in clear text", origin="--send", hint=INSECURE_HINT)
    return url


# -- TLS -----------------------------------------------------------------------------------------
def file_stamp(*paths: Path) -> tuple[tuple[int, int, int, int], ...]:
    """What changes when any of ``paths`` is rewritten or replaced (mtime, size, inode,
    device; symbolic links followed, as a Kubernetes volume's ``..data`` swap needs). Raises
    ``OSError``."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(out)


def read_pem(path: Path, what: str, label: str) -> str:
    """The text of a PEM file holding at least one ``-----BEGIN ... <label>-----`` block
    (``CERTIFICATE``, ``PRIVATE KEY``: RSA/EC/PKCS#8 keys too); :class:`InputError` naming the
    file otherwise (missing, unreadable, not PEM)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror or exc}",
                         origin=str(path)) from exc
    text = data.decode("ascii", "replace")
    if not re.search(rf"-----BEGIN [A-Z0-9 ]*{label}-----", text):
        raise InputError(f"no PEM {label.lower()} in the {what}", origin=str(path),
                         hint=f"expected a '-----BEGIN {label}-----' block")
    return text


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2+, certificate and host name verified: against the PEM bundle ``ca_file`` only,
    or the system's CAs. Raises :class:`InputError` naming ``ca_file``."""
    if ca_file is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs: this bundle only
        pem = read_pem(ca_file, "CA file", "CERTIFICATE")
        try:
            context.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise InputError(f"not a usable PEM CA bundle: {ssl_words(exc)}",
                             origin=str(ca_file)) from exc
    context.minimum_version = TLS_MINIMUM
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class ClientTLS:
    """The context shipments are verified with, rebuilt when ``ca_file`` changed (a ``stat``
    before each request: a rotated CA bundle in a ConfigMap or Secret volume is used at the
    next attempt). A bundle that cannot be read or parsed meanwhile (half-written) keeps the
    previous context and is logged once."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int, int], ...] = ()
        if self.ca_file is not None:
            try:  # before loading: a change in between is seen at the first request
                self._stamp = file_stamp(self.ca_file)
            except OSError as exc:
                client_context(self.ca_file)  # says why
                raise InputError(f"cannot read the CA file: {exc.strerror or exc}",
                                 origin=str(self.ca_file)) from exc
        self._context = client_context(self.ca_file)
        self._bad: object = None

    def context(self) -> ssl.SSLContext:
        if self.ca_file is None:
            return self._context
        with self._lock:
            try:
                stamp = file_stamp(self.ca_file)
                if stamp == self._stamp:
                    return self._context
                context = client_context(self.ca_file)
            except (OSError, InputError) as exc:
                key = str(exc)
                if key != self._bad:
                    log.warning("CA file %s not reloaded (keeping the one read before): %s",
                                self.ca_file, exc)
                    self._bad = key
                return self._context
            self._context, self._stamp, self._bad = context, stamp, None
            self.reloads += 1
            log.info("CA file %s changed: re-read", self.ca_file)
            return context


#: OpenSSL verification codes (``X509_V_ERR_*``) and what to do about them.
_VERIFY_HINTS = {
    18: "a self-signed certificate: give it in --ca-file",
    19: "signed by a CA not in --ca-file, or not among the system's CAs without it",
    20: "signed by a CA not in --ca-file, or not among the system's CAs without it",
    21: "signed by a CA not in --ca-file, or not among the system's CAs without it",
    9: "not valid yet: check the clocks",
    10: "expired: is it being renewed?",
    62: "the certificate's subjectAltName must name the URL's host",
    64: "the certificate's subjectAltName must name the URL's address",
}


def tls_reason(exc: ssl.SSLError) -> str:
    """One line: why the TLS handshake with the observer failed, and the likely fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = str(exc.verify_message or exc.reason or exc).strip().rstrip(".")
        hint = _VERIFY_HINTS.get(int(exc.verify_code or 0))
        return f"certificate verify failed: {message}" + (f" ({hint})" if hint else "")
    if str(exc.reason or "") in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"):
        return (f"{ssl_words(exc)} (not TLS: is the observer listening without --tls-cert, "
                "in plain HTTP?)")
    return ssl_words(exc)


# -- the shipper ---------------------------------------------------------------------------------
@dataclass
class ShipStats:
    batches: int = 0
    rows_read: int = 0
    shipments: int = 0
    """Shipments cut and spooled by this process."""
    delivered: int = 0
    """Shipments the observer acknowledged (including duplicates)."""
    rows_delivered: int = 0
    duplicates: int = 0
    """Acknowledged as already stored (an earlier answer was lost): not stored again."""
    rejected: int = 0
    rows_rejected: int = 0
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failed attempts (retried) by kind: unreachable, tls (the observer's certificate not
    verified, or no TLS), http-5xx, http-429, http-401, ..."""
    latency_sum: float = 0.0
    """Seconds from cutting a shipment to its acknowledgement, summed (this run's shipments)."""
    latency_max: float = 0.0
    latency_count: int = 0
    last_error: str | None = None
    last_tls_error: str | None = None
    """Why the last TLS handshake with the observer failed."""

    @property
    def latency_mean(self) -> float:
        return self.latency_sum / self.latency_count if self.latency_count else 0.0


class _End:
    pass


@dataclass
class _Failure:
    exc: BaseException


_END = _End()


class Shipper:
    """Cuts record batches into shipments, spools them and delivers them in order.

    ``ca_file``: the PEM bundle an ``https://`` observer's certificate is verified with
    (default: the system's CAs); ``insecure_http``: allow plain ``http://`` to a host that is
    not loopback (:func:`check_url`). ``post`` (default :func:`http_post` with the TLS context),
    ``clock`` (monotonic seconds) and ``backoff`` (a :class:`Backoff` factory) are
    injectable. :meth:`run` returns when the source ended (or
    ``stop`` was set and the source did not end within ``source_grace``) and the spool was
    delivered or ``drain_timeout`` passed (what is left stays spooled for the next start).
    """

    def __init__(self, url: str, spool: Spool, *, node: str, token_file: Path | None = None,
                 ca_file: Path | None = None, insecure_http: bool = False,
                 flush_every: float = DEFAULT_FLUSH_SECONDS,
                 max_shipment_bytes: int = DEFAULT_SHIPMENT_BYTES,
                 zstd: bool = True, timeout: float = 30.0,
                 backoff: Callable[[], Backoff] | None = None, post: Poster | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = check_url(url, insecure_http=insecure_http)
        https = urlsplit(self.url).scheme == "https"
        if ca_file is not None and not https:
            raise InputError("a CA file verifies an https:// observer; this URL is http://",
                             origin="--ca-file", hint="use https:// in --send")
        self.tls = ClientTLS(ca_file) if https else None
        self.spool = spool
        self.node = node
        self.token_file = token_file
        self.flush_every = flush_every
        self.max_shipment_bytes = max_shipment_bytes
        self.zstd = zstd
        self.timeout = timeout
        self._backoff = backoff or (lambda: Backoff(base=0.5, cap=30.0))
        self.post: Poster = post or self._http_post
        self.clock = clock
        self.stats = ShipStats()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._halt = threading.Event()
        self._deadline = float("inf")
        self._cut_at: dict[int, float] = {}
        self._token_warned = False
        self._tls_logged: str | None = None
        self.sender_error: BaseException | None = None

    def _http_post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> Response:
        return http_post(url, body, headers, timeout,
                         context=self.tls.context() if self.tls is not None else None)

    # -- running -----------------------------------------------------------------------------
    def run(self, source: Iterable[pa.RecordBatch], stop: threading.Event | None = None, *,
            drain_timeout: float = DRAIN_SECONDS, source_grace: float = 10.0) -> ShipStats:
        stop = stop if stop is not None else threading.Event()
        items: queue.Queue[pa.RecordBatch | _End | _Failure] = queue.Queue(maxsize=1024)

        def read() -> None:
            try:
                for batch in source:
                    items.put(batch)
            except BaseException as exc:  # surfaced by run() once the rest is shipped
                items.put(_Failure(exc))
            else:
                items.put(_END)

        sender = threading.Thread(target=self._send_loop, daemon=True, name="meshwright-send")
        sender.start()
        threading.Thread(target=read, daemon=True, name="meshwright-ship-source").start()
        failure: BaseException | None = None
        try:
            failure = self._cut_loop(items, stop, source_grace)
        finally:
            self._deadline = self.clock() + drain_timeout
            self._closing.set()
            self._wake.set()
            sender.join(drain_timeout + self.timeout + 5.0)
            if sender.is_alive():
                self._halt.set()
                sender.join(5.0)
        left = self.spool.pending()
        if left:
            log.warning("%d shipments (%d rows) not delivered yet: left in %s for the next "
                        "start", len(left), sum(s.rows for s in left), self.spool.root)
        if failure is not None:
            raise failure
        if self.sender_error is not None:
            raise self.sender_error
        return self.stats

    def _cut_loop(self, items: queue.Queue[pa.RecordBatch | _End | _Failure],
                  stop: threading.Event, source_grace: float) -> BaseException | None:
        held: list[pa.RecordBatch] = []
        held_bytes = 0
        next_cut = self.clock() + self.flush_every
        stopped_at: float | None = None
        try:
            while True:
                now = self.clock()
                if stop.is_set() and stopped_at is None:
                    stopped_at = now
                if stopped_at is not None and now - stopped_at > source_grace:
                    log.warning("the record source did not end within %.0f s of the stop",
                                source_grace)
                    return None
                try:
                    item = items.get(timeout=min(max(next_cut - now, 0.01), 0.25))
                except queue.Empty:
                    item = None
                if isinstance(item, _End):
                    return None
                if isinstance(item, _Failure):
                    return item.exc
                if item is not None and item.num_rows:
                    self.stats.batches += 1
                    self.stats.rows_read += item.num_rows
                    for piece in self._pieces(item):
                        if held and held_bytes + piece.nbytes > self.max_shipment_bytes:
                            self._cut(held)
                            held, held_bytes = [], 0
                        held.append(piece)
                        held_bytes += piece.nbytes
                if self.clock() >= next_cut:
                    if held:
                        self._cut(held)
                        held, held_bytes = [], 0
                    next_cut = self.clock() + self.flush_every
        finally:
            if held:
                self._cut(held)

    def _pieces(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """``batch`` in slices of at most ``max_shipment_bytes`` (by its average row size)."""
        if batch.nbytes <= self.max_shipment_bytes or batch.num_rows < 2:
            return [batch]
        per_row = max(1, batch.nbytes // batch.num_rows)
        step = max(1, self.max_shipment_bytes // per_row)
        return [batch.slice(i, step) for i in range(0, batch.num_rows, step)]

    def _cut(self, batches: list[pa.RecordBatch]) -> None:
        rows = sum(b.num_rows for b in batches)
        shipment = self.spool.add(encode_shipment(batches, zstd=self.zstd), rows,
                                  zstd=self.zstd)
        self._cut_at[shipment.seq] = self.clock()
        self.stats.shipments += 1
        self._wake.set()

    # -- sending -----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = self._backoff()
        try:
            while not self._halt.is_set():
                closing = self._closing.is_set()
                if closing and self.clock() >= self._deadline:
                    return
                shipment = self.spool.oldest()
                if shipment is None:
                    if closing:
                        return
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                retry_after = self._attempt(shipment)
                if retry_after is None:
                    backoff.reset()
                    continue
                delay = backoff.next_delay() or backoff.cap
                delay = max(delay, min(retry_after, backoff.cap))
                if self._closing.is_set():
                    delay = min(delay, max(0.0, self._deadline - self.clock()))
                self._halt.wait(delay)
        except BaseException as exc:  # a bug or the disk: run() raises it
            self.sender_error = exc
            log.error("shipping stopped: %s", exc)

    def _token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            if not self._token_warned:
                log.warning("cannot read the token file %s: %s; sending without a token",
                            self.token_file, exc.strerror or exc)
                self._token_warned = True
            return None
        self._token_warned = False
        return token or None

    def _attempt(self, shipment: Shipment) -> float | None:
        """One delivery attempt; None when done with this shipment (delivered or rejected),
        else the least delay the observer asked for (Retry-After) before the next try."""
        body = self.spool.read(shipment)
        if body is None:  # dropped meanwhile (spool full)
            return None
        headers = {"Content-Type": CONTENT_TYPE, HEADER_NODE: self.node,
                   HEADER_STREAM: self.spool.stream, HEADER_SEQ: str(shipment.seq),
                   HEADER_ROWS: str(shipment.rows)}
        if shipment.encoding:
            headers["Content-Encoding"] = shipment.encoding
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = self.timeout
        if self._closing.is_set():
            timeout = max(0.5, min(timeout, self._deadline - self.clock()))
        self.stats.attempts += 1
        try:
            resp = self.post(self.url, body, headers, timeout)
        except ssl.SSLError as exc:  # the observer's certificate, or TLS itself
            self._tls_failed(shipment, tls_reason(exc))
            return 0.0
        except (OSError, http.client.HTTPException) as exc:
            self._failed(shipment, "unreachable", f"{type(exc).__name__}: {_one_line(exc)}")
            return 0.0
        status = resp.status
        if 200 <= status <= 299:
            self._delivered(shipment, resp)
            return None
        reason = _answer(resp)
        if status in RETRY_4XX or status >= 500 or status < 400:
            kind = ("http-5xx" if status >= 500 else f"http-{status}")
            self._failed(shipment, kind, f"HTTP {status}: {reason}")
            return _retry_after(resp)
        self.spool.reject(shipment, f"HTTP {status}: {reason}")
        self.stats.rejected += 1
        self.stats.rows_rejected += shipment.rows
        self._cut_at.pop(shipment.seq, None)
        log.error("shipment %d (%d rows) rejected by the observer: HTTP %d: %s; kept aside in "
                  "%s", shipment.seq, shipment.rows, status, reason, self.spool.root)
        return None

    def _delivered(self, shipment: Shipment, resp: Response) -> None:
        self._tls_logged = None
        self.spool.delivered(shipment)
        self.stats.delivered += 1
        self.stats.rows_delivered += shipment.rows
        try:
            result = json.loads(resp.body).get("result")
        except (ValueError, AttributeError):
            result = None
        if result == "duplicate":
            self.stats.duplicates += 1
        cut = self._cut_at.pop(shipment.seq, None)
        if cut is not None:
            took = self.clock() - cut
            self.stats.latency_sum += took
            self.stats.latency_count += 1
            self.stats.latency_max = max(self.stats.latency_max, took)
        log.debug("delivered shipment %d (%d rows)%s", shipment.seq, shipment.rows,
                  " (duplicate)" if result == "duplicate" else "")

    def _failed(self, shipment: Shipment, kind: str, message: str) -> None:
        self.spool.release(shipment)
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        self.stats.last_error = message
        hint = {"http-401": " (token rejected: the token file is read again)",
                "http-403": " (this service account is not allowed: see --ingest-allow)"
                }.get(kind, "")
        log.warning("shipment %d not delivered: %s%s; retrying", shipment.seq, message, hint)

    def _tls_failed(self, shipment: Shipment, reason: str) -> None:
        """Retried like no connection; logged (as an error) once per reason until a shipment
        goes through - every retry would say the same - and counted as ``tls``."""
        self.spool.release(shipment)
        self.stats.failures["tls"] = self.stats.failures.get("tls", 0) + 1
        self.stats.last_error = f"TLS: {reason}"
        self.stats.last_tls_error = reason
        if reason != self._tls_logged:
            self._tls_logged = reason
            log.error("shipment %d not delivered: TLS with %s failed: %s; retrying (logged "
                      "once until the reason changes or a shipment goes through)",
                      shipment.seq, urlsplit(self.url).netloc, reason)
        else:
            log.debug("shipment %d not delivered: TLS: %s; retrying", shipment.seq, reason)


def _answer(resp: Response) -> str:
    """The observer's one-line reason (its JSON ``error``), or the start of the body."""
    try:
        doc = json.loads(resp.body)
        if isinstance(doc, dict) and doc.get("error"):
            return _one_line(doc["error"])
    except ValueError:
        pass
    return _one_line(resp.body.decode("utf-8", "replace")) or "no reason given"


def _retry_after(resp: Response) -> float:
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]


def ssl_words(exc: BaseException) -> str:
    """An ``ssl.SSLError``'s message without OpenSSL's ``[LIB: CODE]`` prefix and the
    ``(_ssl.c:NNNN)`` suffix."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)
    return _one_line(re.sub(r"^\[[^\]]*\]\s*", "", text)) or type(exc).__name__
