"""The fake API server of :mod:`support.kube_api` extended to list+watch and ``pods/log``.

Shapes follow the Kubernetes API concepts docs ("Efficient detection of changes", "Watch
bookmarks", "410 Gone responses") and the ``pods/log`` reference:

* list: ``{"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "R",
  "continue": ...}, "items": [...]}`` (items without kind/apiVersion), limit/continue paging;
* watch (``?watch=true&resourceVersion=R[&allowWatchBookmarks=true][&timeoutSeconds=N]``):
  ``200``, chunked, one JSON event per line ``{"type": "ADDED"|"MODIFIED"|"DELETED",
  "object": {...}}``; a bookmark is ``{"type": "BOOKMARK", "object": {"kind": "Pod",
  "apiVersion": "v1", "metadata": {"resourceVersion": "R"}}}``; a resourceVersion older than
  the compaction point gets ``{"type": "ERROR", "object": {"kind": "Status", ..., "reason":
  "Expired", "code": 410}}``;
* ``pods/log?follow=true&timestamps=true[&sinceTime=T]``: ``text/plain`` chunked, each line
  ``<RFC3339Nano> <text>\\n``; ``sinceTime`` (whole seconds, as the API server passes it on)
  keeps lines at or after it; 404 ``pods "x" not found`` once the pod is gone.

Faults: :meth:`drop_watch` (the next watch sends some events, then half of one and the
connection dies), :meth:`compact` (older resourceVersions become 410), :meth:`cut_log` (the next
log response dies after N body bytes, mid-line), :attr:`outage` (the next N requests get the
connection closed without an answer: the API server unavailable).

TokenReview (``POST /apis/authentication.k8s.io/v1/tokenreviews``), shaped as the Kubernetes
docs show it ("Managing Service Accounts", verifying private claims): tokens the test adds with
:meth:`add_token` review as ``status.authenticated: true`` with the user (username, uid, groups,
the pod-bound ``extra`` keys) and the audiences both sides share; an unknown token, or one whose
audiences do not meet ``spec.audiences``, as ``authenticated`` absent plus ``status.error``;
:attr:`tokenreview_status` set (e.g. 503) answers that status with a ``kind: Status`` body.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from support.kube_api import PATHS, _kubeconfig, _status

__all__ = ["WatchApiServer", "_kubeconfig", "rfc3339nano"]

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: list path -> kind of its items
ITEM_KINDS = {path: kind[:-4] for path, kind in PATHS.items()}


def rfc3339nano(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` of ``ns`` since the epoch (trailing fraction zeros dropped)."""
    base = datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{ns % 1_000_000_000:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def _parse_since(text: str) -> int:
    t = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000_000


class WatchApiServer:
    """An API server with a resourceVersion'd store, an event log per resource, and logs."""

    def __init__(self, *, hold_seconds: float = 5.0, bookmark_seconds: float = 0.2) -> None:
        self.rv = 1000
        self.store: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in PATHS}
        self.events: dict[str, list[tuple[int, str, dict[str, Any]]]] = {p: [] for p in PATHS}
        self.compacted = 0
        #: (namespace, pod, container) -> [(ns timestamp, text)]
        self.logs: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
        #: log streams whose container stopped: follow ends after the last line.
        self.log_done: set[tuple[str, str, str]] = set()
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.outage = 0
        #: log responses open now, and the most ever open at once.
        self.log_open = 0
        self.log_peak = 0
        self.hold_seconds = hold_seconds
        #: a bookmark is sent after this long without events (real servers: about a minute)
        self.bookmark_seconds = bookmark_seconds
        self._drops: dict[str, int] = {}
        self._cuts: dict[tuple[str, str, str], list[int]] = {}
        self.cond = threading.Condition()
        self.closing = False
        #: token -> (username, audiences, node name or None)
        self.tokens: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
        #: TokenReview requests: (spec, the caller's Authorization header)
        self.tokenreviews: list[tuple[dict[str, Any], str | None]] = []
        #: answer TokenReviews with this HTTP status instead (e.g. 503), while set
        self.tokenreview_status: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                with server.cond:
                    server.requests.append((url.path, query))
                    if server.outage > 0:
                        server.outage -= 1
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                try:
                    server._route(self, url.path, query)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_POST(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with server.cond:
                    server.requests.append((url.path, {}))
                if url.path != TOKENREVIEW_PATH:
                    _send(self, 404, _status(404, "NotFound", "the server could not find the "
                                             "requested resource"))
                    return
                server._serve_tokenreview(self, body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up mid-stream is what these tests do

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> WatchApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- driving the cluster ------------------------------------------------------------------
    def put(self, obj: dict[str, Any]) -> int:
        """Create or update ``obj`` (its ``kind`` picks the resource); returns its new rv."""
        path = _path_of(obj)
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        with self.cond:
            self.rv += 1
            stored = json.loads(json.dumps(obj))
            stored["metadata"]["resourceVersion"] = str(self.rv)
            etype = "MODIFIED" if key in self.store[path] else "ADDED"
            self.store[path][key] = stored
            self.events[path].append((self.rv, etype, stored))
            self.cond.notify_all()
            return self.rv

    def delete(self, kind: str, namespace: str, name: str) -> int:
        """Delete an object (the DELETED event carries its last state)."""
        path = next(p for p, k in ITEM_KINDS.items() if k == kind)
        key = (namespace if kind != "Namespace" else "", name)
        with self.cond:
            self.rv += 1
            obj = self.store[path].pop(key)
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.events[path].append((self.rv, "DELETED", obj))
            self.cond.notify_all()
            return self.rv

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410."""
        with self.cond:
            self.compacted = self.rv

    def drop_watch(self, resource_path: str, after_events: int) -> None:
        """The next watch of ``resource_path`` sends ``after_events`` events, then half of the
        next one, then the connection dies."""
        with self.cond:
            self._drops[resource_path] = after_events

    def log(self, namespace: str, pod: str, container: str, ns_time: int, text: str) -> None:
        with self.cond:
            self.logs.setdefault((namespace, pod, container), []).append((ns_time, text))
            self.cond.notify_all()

    def finish_log(self, namespace: str, pod: str, container: str) -> None:
        with self.cond:
            self.log_done.add((namespace, pod, container))
            self.logs.setdefault((namespace, pod, container), [])
            self.cond.notify_all()

    def remove_log(self, namespace: str, pod: str) -> None:
        """The pod is gone: its logs answer 404."""
        with self.cond:
            for key in [k for k in self.logs if k[:2] == (namespace, pod)]:
                del self.logs[key]
            self.cond.notify_all()

    def cut_log(self, namespace: str, pod: str, container: str, after_bytes: int) -> None:
        """The next log response of this container dies after ``after_bytes`` body bytes."""
        with self.cond:
            self._cuts.setdefault((namespace, pod, container), []).append(after_bytes)

    def add_token(self, token: str, username: str, *, audiences: tuple[str, ...] = (
            "meshwright",), node: str | None = None) -> None:
        """``token`` reviews as ``username`` for ``audiences`` (bound to a pod on ``node``)."""
        with self.cond:
            self.tokens[token] = (username, audiences, node)

    def _serve_tokenreview(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        try:
            review = json.loads(body)
            spec = review["spec"]
            token = str(spec["token"])
        except (ValueError, KeyError, TypeError):
            _send(h, 400, _status(400, "BadRequest", "the body is not a TokenReview"))
            return
        with self.cond:
            self.tokenreviews.append(({k: v for k, v in spec.items() if k != "token"},
                                      h.headers.get("Authorization")))
            fail = self.tokenreview_status
            known = self.tokens.get(token)
        if fail is not None:
            _send(h, fail, _status(fail, "ServiceUnavailable", "the server is currently "
                                   "unable to handle the request"))
            return
        wanted = list(spec.get("audiences") or ["https://kubernetes.default.svc.cluster.local"])
        status: dict[str, Any]
        shared = [a for a in wanted if known is not None and a in known[1]]
        if known is None:
            status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        elif not shared:
            status = {"user": {}, "error": f"[invalid bearer token, token audiences "
                      f"{json.dumps(list(known[1]))} is invalid for the target audiences "
                      f"{json.dumps(wanted)}]"}
        else:
            username, _, node = known
            ns = username.split(":")[2] if username.count(":") == 3 else "default"
            extra: dict[str, list[str]] = {
                "authentication.kubernetes.io/credential-id": ["JTI=" + token[-8:]]}
            if node is not None:
                extra["authentication.kubernetes.io/node-name"] = [node]
                extra["authentication.kubernetes.io/pod-name"] = [f"ebpf-{node}"]
            status = {"authenticated": True, "audiences": shared, "user": {
                "username": username, "uid": "f8b4161b-2e2b-11e9-86b7-2afc33b31a7e",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}",
                           "system:authenticated"], "extra": extra}}
        _send(h, 201, json.dumps({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None},
                                  "spec": spec, "status": status}).encode())

    # -- serving ------------------------------------------------------------------------------
    def _route(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]]) -> None:
        parts = path.split("/")
        if path.endswith("/log") and "pods" in parts:
            i = parts.index("namespaces")
            self._serve_log(h, parts[i + 1], parts[i + 3], query)
            return
        ns = None
        base = path
        if "namespaces" in parts and parts.index("namespaces") + 2 < len(parts):
            i = parts.index("namespaces")
            ns = parts[i + 1]
            base = "/".join(parts[:i] + parts[i + 2:])
        if base not in PATHS:
            _send(h, 404, _status(404, "NotFound", "the server could not find the requested "
                                  "resource"))
            return
        selector = (query.get("fieldSelector") or [""])[0]
        name = selector.split("=", 1)[1] if selector.startswith("metadata.name=") else None
        if (query.get("watch") or [""])[0] in ("true", "1"):
            self._serve_watch(h, base, ns, name, query)
        else:
            self._serve_list(h, base, ns, name, query)

    def _selected(self, obj: dict[str, Any], ns: str | None, name: str | None) -> bool:
        meta = obj["metadata"]
        return ((ns is None or meta.get("namespace") == ns)
                and (name is None or meta.get("name") == name))

    def _serve_list(self, h: BaseHTTPRequestHandler, base: str, ns: str | None,
                    name: str | None, query: dict[str, list[str]]) -> None:
        with self.cond:
            items = [o for _, o in sorted(self.store[base].items())
                     if self._selected(o, ns, name)]
            rv = self.rv
        limit = int((query.get("limit") or ["0"])[0]) or len(items) or 1
        offset, _, token_rv = (query.get("continue") or ["0:"])[0].partition(":")
        start = int(offset)
        listing_rv = int(token_rv) if token_rv else rv
        page = items[start:start + limit]
        more = start + limit < len(items)
        group = "v1" if base.startswith("/api/") else "/".join(base.split("/")[2:4])
        meta: dict[str, Any] = {"resourceVersion": str(listing_rv)}
        if more:
            meta["continue"] = f"{start + limit}:{listing_rv}"
        body = {"kind": PATHS[base], "apiVersion": group, "metadata": meta,
                "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                          for o in page]}
        _send(h, 200, json.dumps(body).encode())

    def _serve_watch(self, h: BaseHTTPRequestHandler, base: str, ns: str | None,
                     name: str | None, query: dict[str, list[str]]) -> None:
        since = int((query.get("resourceVersion") or ["0"])[0] or 0)
        bookmarks = (query.get("allowWatchBookmarks") or [""])[0] == "true"
        timeout = float((query.get("timeoutSeconds") or [str(self.hold_seconds)])[0])
        deadline = time.monotonic() + min(timeout, self.hold_seconds)
        _start_chunked(h, "application/json")
        with self.cond:
            if since < self.compacted:
                status = json.loads(_status(410, "Expired", f"too old resource version: "
                                            f"{since} ({self.compacted})"))
                _chunk(h, json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                _end_chunked(h)
                return
            drop = self._drops.pop(base, None)
        sent = since
        sent_events = 0
        next_bookmark = time.monotonic() + self.bookmark_seconds
        while True:
            with self.cond:
                fresh = [(rv, t, o) for rv, t, o in self.events[base]
                         if rv > sent and self._selected(o, ns, name)]
                current = self.rv
            if not fresh:
                if drop is not None and sent_events == drop:
                    _die(h)  # nothing to cut in half: the connection just dies
                    return
                now = time.monotonic()
                ending = self.closing or now >= deadline
                if bookmarks and current > sent and (ending or now >= next_bookmark):
                    # Periodic bookmarks, and one before the server ends the watch.
                    self._bookmark(h, base, current)
                    sent = current
                    next_bookmark = now + self.bookmark_seconds
                if ending:
                    break
                with self.cond:
                    self.cond.wait(0.02)
                continue
            for rv, etype, obj in fresh:
                line = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
                if drop is not None and sent_events == drop:
                    _chunk(h, line[: len(line) // 2])
                    _die(h)
                    return
                _chunk(h, line)
                sent = rv
                sent_events += 1
        _end_chunked(h)

    def _bookmark(self, h: BaseHTTPRequestHandler, base: str, rv: int) -> None:
        group = "v1" if base.startswith("/api/") else "/".join(base.split("/")[2:4])
        _chunk(h, json.dumps({"type": "BOOKMARK", "object": {
            "kind": ITEM_KINDS[base], "apiVersion": group,
            "metadata": {"resourceVersion": str(rv)}}}).encode() + b"\n")

    def _serve_log(self, h: BaseHTTPRequestHandler, ns: str, pod: str,
                   query: dict[str, list[str]]) -> None:
        container = (query.get("container") or [""])[0]
        key = (ns, pod, container)
        with self.cond:
            logs = self._log_store()
            known = any(k[:2] == (ns, pod) for k in logs)
            if not known:
                _send(h, 404, _status(404, "NotFound", f'pods "{pod}" not found'))
                return
            if key not in logs:
                _send(h, 400, _status(400, "BadRequest", f"container {container} is not valid "
                                      f"for pod {pod}"))
                return
            cuts = self._cuts.get(key)
            cut = cuts.pop(0) if cuts else None
        with self.cond:
            self.log_open += 1
            self.log_peak = max(self.log_peak, self.log_open)
        try:
            self._stream_log(h, key, query, cut)
        finally:
            with self.cond:
                self.log_open -= 1

    def _log_store(self) -> Mapping[tuple[str, str, str], object]:
        """The logs served, by (namespace, pod, container) (a subclass may keep its own)."""
        return self.logs

    def _stream_log(self, h: BaseHTTPRequestHandler, key: tuple[str, str, str],
                    query: dict[str, list[str]], cut: int | None) -> None:
        since = _parse_since(query["sinceTime"][0]) if query.get("sinceTime") else None
        stamps = (query.get("timestamps") or [""])[0] == "true"
        follow = (query.get("follow") or [""])[0] == "true"
        _start_chunked(h, "text/plain")
        index = 0
        written = 0
        while True:
            with self.cond:
                lines = self.logs.get(key)
                if lines is None:
                    break  # pod deleted: the kubelet stops the stream
                fresh = lines[index:]
                index = len(lines)
                done = key in self.log_done
                if not fresh:
                    if done or not follow or self.closing:
                        break
                    self.cond.wait(0.02)
                    if _client_gone(h):
                        return  # the client hung up (as a Go server notices it)
                    continue
            body = b"".join(
                ((rfc3339nano(t) + " ") if stamps else "").encode() + text.encode() + b"\n"
                for t, text in fresh if since is None or t >= since)
            if cut is not None and written + len(body) > cut:
                _chunk(h, body[: cut - written])
                _die(h)
                return
            if body:
                _chunk(h, body)
                written += len(body)
        _end_chunked(h)


def _path_of(obj: dict[str, Any]) -> str:
    return next(p for p, k in ITEM_KINDS.items() if k == obj["kind"])


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _start_chunked(h: BaseHTTPRequestHandler, content_type: str) -> None:
    h.send_response(200)
    h.send_header("Content-Type", content_type)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.flush()


def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    if data:
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()


def _end_chunked(h: BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"0\r\n\r\n")
    h.wfile.flush()


def _client_gone(h: BaseHTTPRequestHandler) -> bool:
    try:
        readable, _, _ = select.select([h.connection], [], [], 0)
        return bool(readable) and h.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _die(h: BaseHTTPRequestHandler) -> None:
    """Close the connection abruptly (no terminating chunk)."""
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


def events_of(server: WatchApiServer, path: str) -> Iterator[tuple[int, str]]:
    """(rv, type) of the events of ``path`` so far."""
    with server.cond:
        for rv, etype, _ in server.events[path]:
            yield rv, etype
