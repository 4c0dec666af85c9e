"""``meshwright observe --kube``: the long-running loop on a live cluster.

Threads: the inventory watcher's loops and the log streamer's workers (observe.watch,
observe.logstream) produce; this loop (the main thread) consumes log chunks, and every
``flush_every`` seconds parses what it holds into flow records and commits them together with
the cursors of the chunks they came from (observe.state: exactly once across kill -9). Every
``emit_every`` it re-learns from the whole store and publishes a proposal atomically (and
commits it to a git branch with ``git_dir``). SIGTERM/SIGINT: stop reading, commit what was
read, exit. A small HTTP server answers ``/metrics`` (Prometheus) and ``/healthz``.

Re-learning runs in a child process (:func:`run_emit`, see "re-learning in the background"):
the loop goes on reading and committing meanwhile. It hands the child a consistent view: the
seq of the last commit (the child reads the parts up to it, never one being written), the hours
no commit goes to any more (the child merges their parts), the hours past retention (the child
folds them into the edge summary and deletes them) and a snapshot of the inventory. One emit at
a time: one still running when the next is due makes that one skipped (counted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from meshwright.ingest import (
    DEFAULT_ALLOW,
    DEFAULT_MAX_BODY,
    INGEST_PATH,
    TLS_RELOAD_SECONDS,
    IngestConfig,
    Ingestor,
    ServerTLS,
    TokenReviewer,
)
from observe.errors import InputError, MeshwrightError
from observe.flows_io import FlowWriter, read_flows
from observe.inventory import Inventory
from observe.kube import ApiUnavailable, KubeApi
from observe.logstream import CursorState, LogChunk, LogStreamer, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats
from observe.state import (
    Checkpoint,
    FlowStore,
    Publisher,
    committed_files,
    compact_hour,
    expire_hours,
    hour_partitions,
    merge_edge_summary,
)
from observe.streamflows import stream_flow_batches
from observe.watch import Backoff, InventoryWatcher

log = logging.getLogger("meshwright.observer")

#: Seconds between rewrites of the pod history in the checkpoint (when it changed).
POD_SAVE_SECONDS = 30.0
#: Log lines held before a commit even if ``flush_every`` has not passed.
MAX_PENDING_LINES = 200_000
#: The git branch proposals are committed to (``--git``).
GIT_BRANCH = "meshwright/proposals"
#: Seconds a running emit gets after SIGTERM to end (it leaves at once, unless it is writing
#: the edge summary or publishing, then right after) before it is killed.
EMIT_STOP_SECONDS = 10.0
#: Temporary names under the state directory an emit leaves when killed (removed before the
#: next one starts).
EMIT_LEFTOVERS = (".learn-*", ".expire-*", ".emit-job-*")


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
    ingest_allow: tuple[str, ...] = DEFAULT_ALLOW
    """Users (service accounts) whose node tracers may ``POST /v1/flows`` (meshwright.ingest)."""
    ingest_max_bytes: int = DEFAULT_MAX_BODY
    ingest_wait: float = 20.0
    ingest_commit_every: float = 0.25
    tls_cert: Path | None = None
    """With ``tls_key``: ``listen`` speaks HTTPS only (meshwright.ingest.ServerTLS)."""
    tls_key: Path | None = None
    tls_reload_seconds: float = TLS_RELOAD_SECONDS
    """The certificate and key files are looked at for a change at most this often."""


@dataclass
class ObserverStats:
    parsed: ObserveStats = field(default_factory=ObserveStats)
    edges: int = 0
    findings: dict[str, int] = field(default_factory=dict)
    emits: int = 0
    """Proposals published."""
    emit_errors: int = 0
    git_commits: int = 0
    last_loop: float = field(default_factory=time.monotonic)
    emit_skipped: int = 0
    """Emits not started: the one before was still running."""
    emit_runs: int = 0
    """Emits ended (published, nothing to publish, failed or abandoned)."""
    emit_seconds: float = 0.0
    """Their total duration."""
    last_emit_seconds: float = 0.0


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
        self._background: _RunningEmit | None = None
        self.api = api or KubeApi.connect(config.context, config.kubeconfig)
        self.ingest = Ingestor(
            TokenReviewer(self.api),
            IngestConfig(allow=config.ingest_allow, max_body=config.ingest_max_bytes,
                         wait=config.ingest_wait, commit_every=config.ingest_commit_every),
            cursors=ckpt.ingest)

        def backoff() -> Backoff:
            return Backoff(base=config.backoff_base, cap=config.backoff_cap)

        self.streamer = LogStreamer(self.api, workers=config.workers,
                                    read_timeout=config.read_timeout,
                                    slice_seconds=config.slice_seconds, backoff=backoff,
                                    cursors=ckpt.cursors)
        # The whole inventory resumes from the checkpoint (every watch from its saved
        # resourceVersion); an inventory file before version 2 holds the pods only, and the
        # other kinds are listed.
        resume = (ckpt.resource_versions if ckpt.inventory_version >= 2 else
                  {k: v for k, v in ckpt.resource_versions.items() if k[0] == "pods"})
        self.watcher = InventoryWatcher(self.api, namespaces=config.namespaces,
                                        backoff=backoff,
                                        listeners=[self._on_pod, self.streamer.on_pod],
                                        resource_versions=resume, pods=ckpt.pods,
                                        objects=ckpt.objects)
        self._inventory_saved = -1
        self.registry = CollectorRegistry()
        self.registry.register(_Metrics(self))
        self._server: ThreadingHTTPServer | None = None
        self.address: tuple[str, int] | None = None
        self.tls: ServerTLS | None = None

    # -- pod history ------------------------------------------------------------------------
    def _on_pod(self, event: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        slim = _slim_pod(pod)
        with self._pods_lock:
            self.pods[str(meta.get("uid"))] = slim
            self._pods_dirty = True

    def _forget_before(self) -> datetime | None:
        """What ended before this is past retention (no stored flow refers to it)."""
        return (datetime.now(UTC) - self.config.retention) if self.config.retention else None

    def _pod_history(self) -> list[dict[str, Any]]:
        limit = self._forget_before()
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
        if self.stop.is_set():  # stopped while starting: nothing read to commit
            self.watcher.stop(timeout=2.0)
            self.streamer.stop()
            self._shutdown_server()
            self.api.close()
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
                # Node shipments (POST /v1/flows) wait for their commit: promptly, not
                # only every flush_every.
                if (now >= next_flush or pending_lines >= MAX_PENDING_LINES
                        or self.ingest.due()):
                    self._commit(pending)
                    pending, pending_lines = [], 0
                    next_flush = now + self.config.flush_every
                self._poll_emit()
                if next_emit is not None and now >= next_emit:
                    self._commit(pending)
                    pending, pending_lines = [], 0
                    self._start_emit()
                    next_emit = time.monotonic() + float(self.config.emit_every or 0)
        finally:
            # A running emit is told to leave (it ends while the rest shuts down). Stop
            # reading; whatever was read is committed (chunks already admitted by a cursor
            # are handed out by chunks() after the workers ended).
            self._abandon_emit()
            self.watcher.stop(timeout=2.0)
            self.streamer.stop(timeout=2.0)
            pending.extend(self.streamer.chunks(poll=0.01))
            try:
                self._commit(pending)
            finally:
                self.ingest.close()  # shipments arriving from now on: 503, sent again later
            self._finish_emit(EMIT_STOP_SECONDS)
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
        # Node shipments: their rows go into this part and their stream numbers into this
        # checkpoint; each request is answered only once both are on disk.
        taken = self.ingest.take()
        shipped, ingest_cursors = self.ingest.prepare(taken)
        # The inventory (every watch's resourceVersion, the other kinds' objects as of
        # there, then the pod history, which has seen at least as much: a restart replays
        # from there); rewritten when it changed, at most every POD_SAVE_SECONDS, and when
        # stopping.
        now = time.monotonic()
        changes = self.watcher.changes
        inventory = ((self._pods_dirty or changes != self._inventory_saved)
                     and (now - self._pods_saved >= POD_SAVE_SECONDS or self.stop.is_set()))
        ckpt = Checkpoint(cursors=dict(self.cursors), ingest=ingest_cursors)
        if inventory:
            ckpt.resource_versions, ckpt.objects = self.watcher.inventory_state(
                self._forget_before())
            with self._pods_lock:
                self._pods_dirty = False
            ckpt.pods = self._pod_history()
            self._pods_saved = now
            self._inventory_saved = changes
        try:
            rows = self.store.commit([*batches, *shipped], ckpt, inventory=inventory)
        except BaseException as exc:
            self.ingest.failed(taken, exc)
            raise
        self.ingest.committed(taken, ingest_cursors)
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
    def _plan_emit(self) -> EmitJob:
        """What the next emit reads and tidies (module doc). In the main loop, no emit
        running: a killed one's leftovers are removed first."""
        for pattern in EMIT_LEFTOVERS:
            for leftover in self.config.state.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
        root = logging.getLogger()
        return EmitJob(
            state=self.config.state, seq=self.store.checkpoint.seq,
            compact=tuple(self.store.finished_hours()), expire=tuple(self.store.expired()),
            inventory=self.watcher.snapshot(), trust_domain=self.config.trust_domain,
            meshes=self.config.meshes, parsed=self.stats.parsed.to_dict(),
            git_dir=self.config.git_dir,
            log_levels=(root.level, log.level),
            log_json=any(isinstance(h.formatter, JsonFormatter) for h in root.handlers))

    def _start_emit(self) -> None:
        """Start an emit in the background, or count it skipped while one runs."""
        running = self._background
        if running is not None:
            self.stats.emit_skipped += 1
            log.warning("emit skipped: the one started %.0fs ago is still running",
                        time.monotonic() - running.started)
            return
        job = self._plan_emit()
        self._background = _RunningEmit.start(job)
        log.info("emit started", extra={"fields": {"pid": self._background.process.pid,
                                                   "seq": job.seq}})

    def _poll_emit(self) -> None:
        running = self._background
        if running is not None and (result := running.result()) is not None:
            self._background = None
            self._emit_ended(result, running.seq)

    def _abandon_emit(self) -> None:
        if self._background is not None:
            self._background.terminate()

    def _finish_emit(self, timeout: float) -> None:
        """Wait for a running emit to end (told to leave by :meth:`_abandon_emit`), killing
        it after ``timeout`` seconds."""
        running = self._background
        if running is not None:
            self._background = None
            self._emit_ended(running.wait(timeout), running.seq)

    def _emit_ended(self, result: EmitResult, seq: int) -> None:
        self.stats.emit_runs += 1
        self.stats.emit_seconds += result.seconds
        self.stats.last_emit_seconds = result.seconds
        self.store.stats.compacted_parts += result.compacted_parts
        self.store.stats.deleted_partitions += result.deleted_partitions
        fields: dict[str, Any] = {"seq": seq, "seconds": round(result.seconds, 3),
                                  "rows": result.rows}
        if result.abandoned:
            log.warning("emit abandoned (stopping); nothing half-published",
                        extra={"fields": fields})
        elif result.error is not None:
            self.stats.emit_errors += 1
            log.error("emit failed: %s", result.error, extra={"fields": fields})
        elif result.generation is None:
            log.info("nothing observed yet; no proposal", extra={"fields": fields})
        else:
            self.stats.emits += 1
            self.stats.edges = result.edges
            self.stats.findings = dict(result.findings)
            self.stats.git_commits += result.git_committed
            log.info("proposal published", extra={"fields": {
                **fields, "generation": Path(result.generation).name, "edges": result.edges,
                "findings": sum(result.findings.values())}})

    def emit_now(self) -> Path | None:
        """Re-learn and publish a proposal here and now (merging finished hours and
        expiring old ones first), with no emit running; returns the published generation.
        Errors are raised."""
        if self._background is not None:
            raise RuntimeError("an emit is running")
        self._emitting = True
        try:
            job = self._plan_emit()
            result = run_emit(job)
        finally:
            self._emitting = False
            self.stats.last_loop = time.monotonic()
        self._emit_ended(result, job.seq)
        return Path(result.generation) if result.generation else None

    # -- metrics / health -------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        if self.watcher.error or self.streamer.error:
            return False, str(self.watcher.error or self.streamer.error)
        if not self._emitting and time.monotonic() - self.stats.last_loop > 60:
            return False, "main loop stalled"
        return True, "ok"

    def _serve(self) -> None:
        """``/metrics``, ``/healthz`` and ``POST /v1/flows`` on ``listen``: plain HTTP, or
        HTTPS only with ``tls_cert``/``tls_key`` (each connection's handshake in its own
        thread, so a slow or failing client holds up no other)."""
        if self.config.listen is None:
            return
        observer = self
        cert, key = self.config.tls_cert, self.config.tls_key
        if (cert is None) != (key is None):
            raise InputError("a TLS certificate needs its key and a key its certificate",
                             origin="--tls-cert/--tls-key")
        tls = None
        if cert is not None and key is not None:
            tls = ServerTLS(cert, key, reload_every=self.config.tls_reload_seconds)
            if self.tls is not None:
                self.registry.unregister(self.tls)
            self.registry.register(tls)
            self.tls = tls

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

            def do_POST(self) -> None:
                if self.path.split("?")[0] != INGEST_PATH:
                    self._send(404, b"not found\n", "text/plain")
                    return
                reply = observer.ingest.handle(self.headers, self.rfile.read,
                                               stopping=observer.stop.is_set())
                self._send(reply.status, reply.body(), "application/json", reply.headers)

            def _send(self, status: int, body: bytes, ctype: str,
                      headers: tuple[tuple[str, str], ...] = ()) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            # Nodes reconnect together when one commit answers all of them; Python's default
            # backlog (5) overflowed at 20 nodes and cost 40 % of ingest (benchmarks/RESULTS.md).
            request_queue_size = 128

            def finish_request(self, request: Any, client_address: Any) -> None:
                if tls is None:
                    super().finish_request(request, client_address)
                    return
                # In the connection's own thread (ThreadingMixIn): the handshake, then HTTP.
                conn = tls.handshake(request, client_address)
                if conn is None:
                    return
                try:
                    Handler(conn, client_address, self)
                finally:
                    conn.close()

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
                                                           f"{self.address[1]}",
                                                "tls": tls is not None}})

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
        yield _counter("meshwright_emit_skipped",
                       "Emits not started because the one before was still running",
                       o.stats.emit_skipped)
        yield _counter("meshwright_emit_errors", "Emits that failed", o.stats.emit_errors)
        yield SummaryMetricFamily("meshwright_emit_duration_seconds",
                                  "Duration of the emits that ended (in the background)",
                                  count_value=o.stats.emit_runs,
                                  sum_value=o.stats.emit_seconds)
        yield _gauge("meshwright_emit_last_duration_seconds",
                     "Duration of the last emit that ended", o.stats.last_emit_seconds)
        yield _gauge("meshwright_emit_running", "1 while an emit runs",
                     int(o._background is not None or o._emitting))
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
        yield from o.ingest.metrics()


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


# -- re-learning in the background ---------------------------------------------------------------
@dataclass(frozen=True)
class EmitJob:
    """One emit, planned by the main loop (picklable: it goes to the emit process)."""

    state: Path
    seq: int
    """Read the parts committed up to this seq (later ones are being written meanwhile)."""
    compact: tuple[Path, ...]
    """Hours no commit goes to any more: their parts are merged."""
    expire: tuple[Path, ...]
    """Hours past retention: folded into the edge summary, then deleted."""
    inventory: Inventory
    trust_domain: str
    meshes: tuple[str, ...]
    parsed: dict[str, Any]
    """The parse counters so far (for the report)."""
    git_dir: Path | None
    log_levels: tuple[int, int] = (logging.WARNING, logging.INFO)
    """Of the root logger and of ``meshwright.observer``."""
    log_json: bool = False


@dataclass
class EmitResult:
    generation: str | None = None
    """The published generation's directory (None: nothing stored yet, or not published)."""
    edges: int = 0
    findings: dict[str, int] = field(default_factory=dict)
    """Findings by kind."""
    rows: int = 0
    """Flow records learned from."""
    git_committed: bool = False
    compacted_parts: int = 0
    deleted_partitions: int = 0
    seconds: float = 0.0
    error: str | None = None
    abandoned: bool = False
    """Told to stop (SIGTERM) before it published anything."""


class EmitAbandoned(BaseException):
    """SIGTERM reached the emit process: leave (never in the middle of publishing)."""


class _Guard:
    """When an emit may be left. In the emit process, SIGTERM raises :class:`EmitAbandoned`
    at once, or inside a :meth:`critical` section (writing the edge summary and deleting the
    hours it sums up; publishing and the git commit) at the next :meth:`checkpoint` after it;
    SIGINT is ignored (Ctrl-C reaches the whole process group: the parent decides)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.done = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.pending = True
        if not self.depth and not self.done:
            raise EmitAbandoned()

    def checkpoint(self) -> None:
        if self.pending and not self.done:
            raise EmitAbandoned()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def run_emit(job: EmitJob, guard: _Guard | None = None) -> EmitResult:
    """Merge the finished hours' parts, fold the expired hours into the edge summary and
    delete them, learn from the parts up to ``job.seq``, publish the proposal (atomically,
    observe.state.Publisher) and commit it to ``job.git_dir``. Safe while the main loop keeps
    committing (it writes new parts of the current hour only). Errors are raised."""
    from emit.analysis import EmitOptions, emit_outputs
    from learn.findings import apply_exclusions, find_all
    from learn.pipeline import learn_graph

    guard = guard or _Guard()
    started = time.monotonic()
    result = EmitResult()
    expiring = set(job.expire)
    for hour in job.compact:
        if hour not in expiring and hour.exists():
            result.compacted_parts += compact_hour(hour)
            guard.checkpoint()
    if job.expire:
        edges = _expired_edges(job)
        guard.checkpoint()

        def summarize(_files: list[Path]) -> None:
            merge_edge_summary(job.state, edges)

        with guard.critical():
            result.deleted_partitions = expire_hours([h for h in job.expire if h.exists()],
                                                     summarize)
    guard.checkpoint()
    files = committed_files(hour_partitions(job.state / "flows"), upto=job.seq)
    with tempfile.TemporaryDirectory(prefix=".learn-", dir=job.state) as tmp:
        raw = Path(tmp) / "flows.parquet"
        result.rows = _concat(files, raw)
        if result.rows == 0:
            result.seconds = time.monotonic() - started
            return result
        learned = learn_graph(raw, job.inventory, trust_domain=job.trust_domain)
    guard.checkpoint()
    findings = find_all(learned.graph)
    kept, left = apply_exclusions(learned.graph, findings)
    left_out = [{"source": x.source, "destination": x.destination, "port": x.port,
                 "reason": f"left out: finding {x.finding}"} for x in left]
    options = EmitOptions(meshes=job.meshes, trust_domain=job.trust_domain)
    stats = {**job.parsed, **learned.stats}

    def write(out: Path) -> None:
        emit_outputs(out, kept, options, stats=stats, inventory=job.inventory,
                     findings=findings, left_out=left_out)

    guard.checkpoint()
    result.edges = len(learned.graph.edges)
    for f in findings:
        result.findings[f.kind] = result.findings.get(f.kind, 0) + 1
    with guard.critical():
        final = Publisher(job.state).publish(write)
        result.generation = str(final)
        message = (f"meshwright: proposal {final.name} ({result.edges} edges, "
                   f"{len(findings)} findings)")
        if job.git_dir is not None:
            result.git_committed = git_commit(job.git_dir, final, message)
    result.seconds = time.monotonic() - started
    return result


def _concat(files: list[Path], target: Path) -> int:
    rows = 0
    with FlowWriter(target) as writer:
        for f in files:
            for batch in read_flows(f):
                writer.write(batch)
                rows += batch.num_rows
    return rows


def _expired_edges(job: EmitJob) -> list[dict[str, Any]]:
    """The edges of the flows about to be deleted (for edges-summary.json)."""
    from learn.pipeline import learn_graph

    with tempfile.TemporaryDirectory(prefix=".expire-", dir=job.state) as tmp:
        raw = Path(tmp) / "flows.parquet"
        _concat(committed_files(job.expire), raw)
        graph = learn_graph(raw, job.inventory, trust_domain=job.trust_domain).graph
    first = graph.first_seen.isoformat() if graph.first_seen else None
    last = graph.last_seen.isoformat() if graph.last_seen else None
    return [{"source": e.source, "destination": e.destination, "port": e.port,
             "protocol": e.protocol, "requests": e.requests, "first_seen": first,
             "last_seen": last} for e in graph.edges]


class _RunningEmit:
    """An emit in its own process: ``python -c`` :func:`emit_process` with the pickled
    :class:`EmitJob` in a file, its :class:`EmitResult` pickled on its stdout. A process,
    not a thread: learning is pandas work that holds the GIL for long stretches, which would
    slow the main loop's reading and committing (measured: benchmarks/RESULTS.md); spawned
    afresh (never forked from this threaded process)."""

    def __init__(self, process: subprocess.Popen[bytes], job_file: Path, seq: int) -> None:
        self.process = process
        self.job_file = job_file
        self.seq = seq
        self.started = time.monotonic()
        self.terminated = False

    @classmethod
    def start(cls, job: EmitJob) -> _RunningEmit:
        fd, name = tempfile.mkstemp(prefix=".emit-job-", suffix=".pickle", dir=job.state)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(job, fh, protocol=pickle.HIGHEST_PROTOCOL)
        # The same meshwright as this process, wherever it was imported from.
        paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        process = subprocess.Popen(
            [sys.executable, "-c", "from meshwright.observer import emit_process; "
             "emit_process()", name, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        return cls(process, Path(name), job.seq)

    def result(self) -> EmitResult | None:
        """Its result once the process ended, else None."""
        if self.process.poll() is None:
            return None
        return self._collect(killed=False)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> EmitResult:
        killed = False
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("emit still running %.0fs after SIGTERM: killed", timeout)
            self.process.kill()
            self.process.wait()
            killed = True
        return self._collect(killed=killed or self.terminated)

    def _collect(self, *, killed: bool) -> EmitResult:
        """``killed``: it was told to stop (no result then means it was left, not a
        failure: SIGTERM before it set up its handler, or SIGKILL)."""
        seconds = time.monotonic() - self.started
        out = self.process.stdout
        data = out.read() if out is not None else b""
        if out is not None:
            out.close()
        with contextlib.suppress(OSError):
            self.job_file.unlink()
        try:
            result = pickle.loads(data) if data else None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            result = None
        if not isinstance(result, EmitResult):
            code = self.process.returncode
            how = f"signal {-code}" if code < 0 else f"code {code}"
            result = EmitResult(abandoned=killed,
                                error=None if killed else f"the emit process ended with {how} "
                                                          "and no result (its log says why)")
        result.seconds = seconds
        return result


def emit_process() -> None:
    """The emit process (``python -c``; argv: the job file, the parent's pid): runs
    :func:`run_emit` and writes its :class:`EmitResult` pickled to stdout (anything else
    written there goes to stderr). Leaves on SIGTERM, which it also gets when the parent
    dies (Linux)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    guard = _Guard()
    guard.install()
    started = time.monotonic()
    try:
        job_file, parent = Path(sys.argv[1]), int(sys.argv[2])
        _die_with_parent(parent)
        with open(job_file, "rb") as fh:
            job = pickle.load(fh)
        _emit_logging(job)
        try:
            result = run_emit(job, guard)
        except (MeshwrightError, OSError, subprocess.CalledProcessError) as exc:
            result = EmitResult(error=str(exc))
    except EmitAbandoned:
        result = EmitResult(abandoned=True)
    guard.done = True
    result.seconds = time.monotonic() - started
    pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.close()


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``): no
    emit outlives its observer to publish next to the one restarted."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # gone already
        os.kill(os.getpid(), signal.SIGTERM)


def _emit_logging(job: EmitJob) -> None:
    root_level, observer_level = job.log_levels
    handler = logging.StreamHandler()
    if job.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("meshwright: %(levelname)s: %(message)s"))
    logging.basicConfig(level=root_level, handlers=[handler])
    log.setLevel(observer_level)


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

