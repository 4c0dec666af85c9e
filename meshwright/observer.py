"""``meshwright observe --kube``: the long-running loop on a live cluster.

Threads: the inventory watcher's loops and the log streamer's workers (observe.watch,
observe.logstream) produce; this loop (the main thread) consumes log chunks, and every
``flush_every`` seconds parses what it holds into flow records and commits them together with
the cursors of the chunks they came from (observe.state: exactly once across kill -9). Every
``emit_every`` it re-learns from the whole store and publishes a proposal atomically (and
commits it to a git branch with ``git_dir``). SIGTERM/SIGINT: stop reading, commit what was
read, exit. A small HTTP server answers ``/metrics`` (Prometheus) and ``/healthz``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from observe.errors import InputError, MeshwrightError
from observe.kube import ApiUnavailable, KubeApi
from observe.logstream import CursorState, LogChunk, LogStreamer, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats
from observe.state import Checkpoint, FlowStore, Publisher, merge_edge_summary
from observe.streamflows import stream_flow_batches
from observe.watch import Backoff, InventoryWatcher

log = logging.getLogger("meshwright.observer")

#: Seconds between rewrites of the pod history in the checkpoint (when it changed).
POD_SAVE_SECONDS = 30.0
#: Log lines held before a commit even if ``flush_every`` has not passed.
MAX_PENDING_LINES = 200_000
#: The git branch proposals are committed to (``--git``).
GIT_BRANCH = "meshwright/proposals"


@dataclass
class ObserverConfig:
    state: Path
    namespaces: list[str] | None = None
    """None: all namespaces."""
    context: str | None = None
    kubeconfig: str | None = None
    emit_every: float | None = 900.0
    flush_every: float = 5.0
    retention: timedelta | None = timedelta(days=7)
    meshes: tuple[str, ...] = ("istio",)
    trust_domain: str = "cluster.local"
    listen: tuple[str, int] | None = None
    git_dir: Path | None = None
    workers: int = 8
    """Log connections at once."""
    read_timeout: float = 10.0
    slice_seconds: float = 30.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0


@dataclass
class ObserverStats:
    parsed: ObserveStats = field(default_factory=ObserveStats)
    edges: int = 0
    findings: dict[str, int] = field(default_factory=dict)
    emits: int = 0
    emit_errors: int = 0
    git_commits: int = 0
    last_loop: float = field(default_factory=time.monotonic)


class Observer:
    """Build with a config, :meth:`run` until ``stop`` is set; returns when all is committed."""

    def __init__(self, config: ObserverConfig, stop: threading.Event,
                 api: KubeApi | None = None) -> None:
        self.config = config
        self.stop = stop
        self.stats = ObserverStats()
        self.store = FlowStore(config.state, retention=config.retention)
        self.publisher = Publisher(config.state)
        ckpt = self.store.checkpoint
        self.cursors: dict[StreamKey, CursorState] = dict(ckpt.cursors)
        self.pods: dict[str, dict[str, Any]] = {
            str((p.get("metadata") or {}).get("uid")): p for p in ckpt.pods}
        self._pods_lock = threading.Lock()
        self._pods_dirty = True
        self._pods_saved = 0.0
        self._emitting = False
        self.api = api or KubeApi.connect(config.context, config.kubeconfig)

        def backoff() -> Backoff:
            return Backoff(base=config.backoff_base, cap=config.backoff_cap)

        self.streamer = LogStreamer(self.api, workers=config.workers,
                                    read_timeout=config.read_timeout,
                                    slice_seconds=config.slice_seconds, backoff=backoff,
                                    cursors=ckpt.cursors)
        pod_rvs = {k: v for k, v in ckpt.resource_versions.items() if k[0] == "pods"}
        self.watcher = InventoryWatcher(self.api, namespaces=config.namespaces,
                                        backoff=backoff,
                                        listeners=[self._on_pod, self.streamer.on_pod],
                                        resource_versions=pod_rvs, pods=ckpt.pods)
        self.registry = CollectorRegistry()
        self.registry.register(_Metrics(self))
        self._server: ThreadingHTTPServer | None = None
        self.address: tuple[str, int] | None = None

    # -- pod history ------------------------------------------------------------------------
    def _on_pod(self, event: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        slim = _slim_pod(pod)
        with self._pods_lock:
            self.pods[str(meta.get("uid"))] = slim
            self._pods_dirty = True

    def _pod_history(self) -> list[dict[str, Any]]:
        limit = (datetime.now(UTC) - self.config.retention) if self.config.retention else None
        with self._pods_lock:
            if limit is not None:
                for uid in [u for u, p in self.pods.items() if _ended_before(p, limit)]:
                    del self.pods[uid]
            return [self.pods[u] for u in sorted(self.pods)]

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self._serve()
        log.info("observing", extra={"fields": {
            "state": str(self.config.state), "resumed_seq": self.store.checkpoint.seq,
            "streams_resumed": len(self.cursors), "discarded_parts":
                self.store.stats.discarded_parts}})
        self.streamer.start()
        try:
            self._start_watcher()
        except MeshwrightError:
            self.streamer.stop()
            self._shutdown_server()
            raise
        if self.stop.is_set():
            self.streamer.stop()
            self._shutdown_server()
            return 0
        pending: list[LogChunk] = []
        pending_lines = 0
        next_flush = time.monotonic() + self.config.flush_every
        next_emit = (time.monotonic() + self.config.emit_every
                     if self.config.emit_every else None)
        try:
            while not self.stop.is_set():
                self.stats.last_loop = time.monotonic()
                fatal = self.watcher.error or self.streamer.error
                if fatal is not None:
                    raise fatal
                chunk = self.streamer.get(0.1)
                if chunk is not None:
                    pending.append(chunk)
                    pending_lines += len(chunk.lines)
                now = time.monotonic()
                if now >= next_flush or pending_lines >= MAX_PENDING_LINES:
                    self._commit(pending)
                    pending, pending_lines = [], 0
                    next_flush = now + self.config.flush_every
                if next_emit is not None and now >= next_emit:
                    self._commit(pending)
                    pending, pending_lines = [], 0
                    self._emit()
                    next_emit = time.monotonic() + float(self.config.emit_every or 0)
        finally:
            # Stop reading; whatever was read is committed (chunks already admitted by a
            # cursor are handed out by chunks() after the workers ended).
            self.watcher.stop(timeout=2.0)
            self.streamer.stop(timeout=2.0)
            pending.extend(self.streamer.chunks(poll=0.01))
            self._commit(pending)
            self._shutdown_server()
            self.api.close()
        log.info("stopped", extra={"fields": {"rows": self.store.stats.rows,
                                              "commits": self.store.stats.commits}})
        return 0

    def _start_watcher(self) -> None:
        """The first list of everything, retried with back-off while the API server is
        unavailable (a fatal error - forbidden, not found - is raised)."""
        backoff = Backoff(base=self.config.backoff_base, cap=self.config.backoff_cap)
        while not self.stop.is_set():
            try:
                self.watcher.start()
                return
            except ApiUnavailable as exc:
                delay = backoff.next_delay() or self.config.backoff_cap
                log.warning("API server unavailable at start: %s; retrying in %.1fs", exc,
                            delay)
                self.stop.wait(delay)

    def _commit(self, chunks: list[LogChunk]) -> None:
        batches = list(stream_flow_batches(chunks, ObserveOptions(workers=2),
                                           self.stats.parsed)) if chunks else []
        for c in chunks:
            if c.cursor is not None:
                self.cursors[c.key] = c.cursor
        self._prune_cursors()
        # The pod history goes with the resourceVersions read before it (a restart replays
        # from there); rewritten at most every POD_SAVE_SECONDS, and when stopping.
        now = time.monotonic()
        inventory = self._pods_dirty and (now - self._pods_saved >= POD_SAVE_SECONDS
                                          or self.stop.is_set())
        ckpt = Checkpoint(cursors=dict(self.cursors))
        if inventory:
            ckpt.resource_versions = self.watcher.resource_versions()
            with self._pods_lock:
                self._pods_dirty = False
            ckpt.pods = self._pod_history()
            self._pods_saved = now
        rows = self.store.commit(batches, ckpt, inventory=inventory)
        if rows:
            log.debug("committed", extra={"fields": {"rows": rows,
                                                     "seq": self.store.checkpoint.seq}})

    def _prune_cursors(self) -> None:
        """Cursors of pods gone from the history (past retention) are dropped."""
        with self._pods_lock:
            known = set(self.pods)
        for key in [k for k in self.cursors if k.uid and k.uid not in known]:
            del self.cursors[key]

    # -- emit -------------------------------------------------------------------------------
    def _emit(self) -> None:
        self._emitting = True
        try:
            self.emit_now()
        except (MeshwrightError, OSError, subprocess.CalledProcessError) as exc:
            self.stats.emit_errors += 1
            log.error("emit failed: %s", exc)
        finally:
            self._emitting = False
            self.stats.last_loop = time.monotonic()

    def emit_now(self) -> Path | None:
        """Re-learn from the store and publish a proposal (and expire old partitions)."""
        from emit.analysis import EmitOptions, emit_outputs
        from learn.findings import apply_exclusions, find_all
        from learn.pipeline import learn_graph

        self.store.compact()
        inventory = self.watcher.snapshot()
        self.store.expire(lambda files: self._summarize(files, inventory))
        with tempfile.TemporaryDirectory(prefix=".learn-", dir=self.config.state) as tmp:
            raw = Path(tmp) / "flows.parquet"
            if self.store.export(raw) == 0:
                log.info("nothing observed yet; no proposal")
                return None
            learned = learn_graph(raw, inventory, trust_domain=self.config.trust_domain)
        findings = find_all(learned.graph)
        kept, left = apply_exclusions(learned.graph, findings)
        left_out = [{"source": x.source, "destination": x.destination, "port": x.port,
                     "reason": f"left out: finding {x.finding}"} for x in left]
        options = EmitOptions(meshes=self.config.meshes, trust_domain=self.config.trust_domain)
        stats = {**self.stats.parsed.to_dict(), **learned.stats}

        def write(out: Path) -> None:
            emit_outputs(out, kept, options, stats=stats, inventory=inventory,
                         findings=findings, left_out=left_out)

        final = self.publisher.publish(write)
        self.stats.emits += 1
        self.stats.edges = len(learned.graph.edges)
        by_kind: dict[str, int] = {}
        for f in findings:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        self.stats.findings = by_kind
        log.info("proposal published", extra={"fields": {
            "generation": final.name, "edges": self.stats.edges, "findings": len(findings)}})
        message = (f"meshwright: proposal {final.name} ({self.stats.edges} edges, "
                   f"{len(findings)} findings)")
        if self.config.git_dir is not None and git_commit(self.config.git_dir, final, message):
            self.stats.git_commits += 1
        return final

    def _summarize(self, files: list[Path], inventory: Any) -> None:
        """The edges of flows about to be deleted, folded into edges-summary.json."""
        from learn.pipeline import learn_graph

        with tempfile.TemporaryDirectory(prefix=".expire-", dir=self.config.state) as tmp:
            raw = Path(tmp) / "flows.parquet"
            from observe.flows_io import FlowWriter, read_flows

            with FlowWriter(raw) as writer:
                for f in files:
                    for batch in read_flows(f):
                        writer.write(batch)
            graph = learn_graph(raw, inventory, trust_domain=self.config.trust_domain).graph
        first = graph.first_seen.isoformat() if graph.first_seen else None
        last = graph.last_seen.isoformat() if graph.last_seen else None
        merge_edge_summary(self.config.state, (
            {"source": e.source, "destination": e.destination, "port": e.port,
             "protocol": e.protocol, "requests": e.requests, "first_seen": first,
             "last_seen": last} for e in graph.edges))

    # -- metrics / health -------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        if self.watcher.error or self.streamer.error:
            return False, str(self.watcher.error or self.streamer.error)
        if not self._emitting and time.monotonic() - self.stats.last_loop > 60:
            return False, "main loop stalled"
        return True, "ok"

    def _serve(self) -> None:
        if self.config.listen is None:
            return
        observer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body = generate_latest(observer.registry)
                    self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
                elif self.path.split("?")[0] == "/healthz":
                    ok, why = observer.healthy()
                    self._send(200 if ok else 503, why.encode() + b"\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        try:
            self._server = Server(self.config.listen, Handler)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.config.listen[0]}:"
                             f"{self.config.listen[1]}: {exc.strerror}", origin="--listen"
                             ) from exc
        self.address = (str(self._server.server_address[0]),
                        int(self._server.server_address[1]))
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="meshwright-metrics").start()
        log.info("listening", extra={"fields": {"address": f"{self.address[0]}:"
                                                           f"{self.address[1]}"}})

    def _shutdown_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def stream_lag(self) -> float:
        """Seconds between now and the oldest stream cursor of a live pod (0 with none)."""
        now = time.time()
        with self._pods_lock:
            alive = {u for u, p in self.pods.items()
                     if not (p.get("metadata") or {}).get("deletionTimestamp")}
        lasts = [c.last for k, c in self.cursors.items() if c.last is not None and k.uid in alive]
        return max(0.0, now - min(lasts) / 1e9) if lasts else 0.0


class _Metrics(Collector):
    def __init__(self, observer: Observer) -> None:
        self.o = observer

    def collect(self) -> Iterator[Any]:
        o = self.o
        parsed = o.stats.parsed
        yield _counter("meshwright_lines_parsed", "Log lines parsed", parsed.lines)
        yield _counter("meshwright_parse_errors", "Malformed lines (parser and stream)",
                       parsed.malformed + o.streamer.stats.malformed)
        yield _counter("meshwright_flows", "Flow records stored", o.store.stats.rows)
        yield _counter("meshwright_duplicate_lines",
                       "Lines received again after a reconnect and dropped",
                       o.streamer.stats.duplicates)
        rec = CounterMetricFamily("meshwright_reconnects", "Reconnects after errors",
                                  labels=["source"])
        rec.add_metric(["watch"], o.watcher.stats.reconnects)
        rec.add_metric(["log"], o.streamer.stats.reconnects)
        yield rec
        yield _counter("meshwright_relists", "Full lists (first and after 410 Gone)",
                       o.watcher.stats.lists)
        yield _counter("meshwright_emits", "Proposals published", o.stats.emits)
        yield _gauge("meshwright_edges", "Edges in the last proposal", o.stats.edges)
        fam = GaugeMetricFamily("meshwright_findings", "Findings in the last proposal",
                                labels=["kind"])
        for kind, n in sorted(o.stats.findings.items()):
            fam.add_metric([kind], n)
        yield fam
        yield _gauge("meshwright_stream_lag_seconds",
                     "Now minus the oldest committed log cursor of a live pod", o.stream_lag())
        yield _gauge("meshwright_log_streams", "Log streams followed", o.streamer.active())
        yield _gauge("meshwright_checkpoint_seq", "Last committed flow part",
                     o.store.checkpoint.seq)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in pod.items() if k not in ("metadata", "status")}
    meta = {k: v for k, v in (pod.get("metadata") or {}).items() if k != "managedFields"}
    status = {k: v for k, v in (pod.get("status") or {}).items()
              if k not in ("conditions", "containerStatuses", "initContainerStatuses")}
    out["metadata"], out["status"] = meta, status
    out.setdefault("kind", "Pod")
    out.setdefault("apiVersion", "v1")
    return json.loads(json.dumps(out))


def _ended_before(pod: Mapping[str, Any], limit: datetime) -> bool:
    ts = (pod.get("metadata") or {}).get("deletionTimestamp")
    if not ts:
        return False
    try:
        t = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return False
    return t < limit


# -- git ------------------------------------------------------------------------------------------
def git_commit(repo: Path, generation: Path, message: str, branch: str = GIT_BRANCH) -> bool:
    """Commit the files of ``generation`` as the whole tree of ``branch`` in ``repo`` (a git
    working tree), without touching its checkout or index: a temporary index, write-tree,
    commit-tree, update-ref. Returns False when nothing changed since the branch's last
    commit."""
    env = {**os.environ, "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "meshwright"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "meshwright@localhost"),
           "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "meshwright"),
           "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL",
                                                 "meshwright@localhost")}

    def git(*args: str, extra: Mapping[str, str] | None = None, check: bool = True) -> str:
        if shutil.which("git") is None:
            raise InputError("git is not installed", origin="--git")
        done = subprocess.run(["git", "-C", str(repo), *args], env={**env, **(extra or {})},
                              capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise InputError(f"git {args[0]} failed: {done.stderr.strip()[:300]}",
                             origin=str(repo), hint="--git names a git working tree")
        return done.stdout.strip() if done.returncode == 0 else ""

    git_dir = git("rev-parse", "--absolute-git-dir")
    parent = git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}",
                 check=False)
    with tempfile.TemporaryDirectory(prefix="meshwright-git-") as tmp:
        extra = {"GIT_INDEX_FILE": os.path.join(tmp, "index"), "GIT_DIR": git_dir,
                 "GIT_WORK_TREE": str(generation)}
        git("add", "-A", "--", ".", extra=extra)
        tree = git("write-tree", extra=extra)
    if parent and git("rev-parse", f"{parent}^{{tree}}") == tree:
        return False
    commit = git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
    git("update-ref", f"refs/heads/{branch}", commit, *([parent] if parent else []))
    return True


# -- structured logs ------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def parse_listen(text: str) -> tuple[str, int]:
    """``:9090``, ``0.0.0.0:9090``, ``127.0.0.1:0`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)

