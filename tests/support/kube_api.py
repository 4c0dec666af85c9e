"""A local HTTP server speaking the Kubernetes list endpoints meshwright uses, with the API
server's pagination (limit/continue), Status errors and 410 Gone; plus a kubeconfig for it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

PATHS = {
    "/api/v1/namespaces": "NamespaceList",
    "/api/v1/pods": "PodList",
    "/api/v1/services": "ServiceList",
    "/api/v1/serviceaccounts": "ServiceAccountList",
    "/apis/apps/v1/replicasets": "ReplicaSetList",
    "/apis/apps/v1/deployments": "DeploymentList",
    "/apis/apps/v1/statefulsets": "StatefulSetList",
    "/apis/apps/v1/daemonsets": "DaemonSetList",
    "/apis/batch/v1/jobs": "JobList",
    "/apis/batch/v1/cronjobs": "CronJobList",
}


class FakeApiServer:
    """Serves ``{path: [objects]}`` as the API server does, with limit/continue pagination."""

    def __init__(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        self.objects = objects
        self.requests: list[tuple[str, dict[str, list[str]], str | None]] = []
        #: path -> (status, body) to answer instead of the list (once per entry).
        self.failures: dict[str, list[tuple[int, bytes]]] = {}
        #: paths whose first request carrying a continue token gets 410 Gone.
        self.expire_continue: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                server.requests.append((url.path, query, self.headers.get("Authorization")))
                queue = server.failures.get(url.path)
                if queue:
                    status, body = queue.pop(0)
                    self._send(status, body)
                    return
                if url.path in server.expire_continue and "continue" in query:
                    server.expire_continue.discard(url.path)
                    self._send(410, _status(410, "Expired", "The provided continue parameter is "
                                            "too old to display a consistent list result."))
                    return
                path = url.path
                ns = None
                parts = path.split("/")
                if "namespaces" in parts and parts.index("namespaces") + 2 < len(parts):
                    i = parts.index("namespaces")
                    ns = parts[i + 1]
                    path = "/".join(parts[:i] + parts[i + 2:])
                elif "namespaces" in parts and parts.index("namespaces") + 2 == len(parts):
                    name = parts[-1]
                    found = [o for o in server.objects.get("/api/v1/namespaces", [])
                             if o["metadata"]["name"] == name]
                    if not found:
                        self._send(404, _status(404, "NotFound", f'namespaces "{name}" not found'))
                        return
                    self._send(200, json.dumps({"kind": "Namespace", "apiVersion": "v1",
                                                **found[0]}).encode())
                    return
                if path not in PATHS:
                    self._send(404, _status(404, "NotFound", "the server could not find the "
                                            "requested resource"))
                    return
                items = server.objects.get(path, [])
                if ns is not None:
                    items = [o for o in items if o["metadata"].get("namespace") == ns]
                limit = int(query.get("limit", ["0"])[0]) or len(items) or 1
                offset = int(query.get("continue", ["0"])[0])
                page = items[offset:offset + limit]
                more = offset + limit < len(items)
                group = "v1" if path.startswith("/api/") else "/".join(path.split("/")[2:4])
                listing: dict[str, Any] = {"kind": PATHS[path], "apiVersion": group,
                        "metadata": {"resourceVersion": "4242",
                                     **({"continue": str(offset + limit)} if more else {})},
                        "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                                  for o in page]}
                self._send(200, json.dumps(listing).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _status(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "message": message, "reason": reason,
                       "code": code}).encode()


def _kubeconfig(tmp_path: Path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: test\n  cluster:\n    server: {server}\n"
        "users:\n- name: tester\n  user:\n    token: s3cret-token\n"
        "contexts:\n- name: test\n  context:\n    cluster: test\n    user: tester\n"
        "current-context: test\n",
        encoding="utf-8",
    )
    return str(path)


#: kind -> list endpoint, to serve a ``kubectl get ... -o json`` List.
KIND_PATHS = {v[:-4]: k for k, v in PATHS.items()}


def objects_from_list(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group a kubectl List's items by the endpoint that serves them."""
    out: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    for item in items:
        path = KIND_PATHS.get(item.get("kind", ""))
        if path:
            out[path].append(item)
    return out
