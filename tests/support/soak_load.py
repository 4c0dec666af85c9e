"""The load of the ``meshwright observe --kube`` soak (tests/meshwright/test_observe_soak.py and
benchmarks/observe_soak.py): a fake API server with meshed pods whose ``istio-proxy`` logs grow
at a set rate, pod churn and log streams cut mid-line, in a process of its own.

:class:`FastLogApiServer` is :class:`support.kube_watch_api.WatchApiServer` (list, watch,
bookmarks, 410) with ``pods/log`` served from pre-rendered blocks: the writer renders each
step's lines once (``<RFC 3339 ns timestamp> <Istio TEXT line>\\n``), a log response sends all
blocks it has not sent in one write, and ``sinceTime`` cuts a block only when it straddles the
second asked for. Blocks older than ``keep_seconds`` are dropped (the kubelet's log rotation):
memory stays bounded, and an observer that falls further behind than that loses lines (the
soak's exactly-once check would say so).

Every line is the first line of the Istio docs' sample access log
(tests/data/envoy-logs/istio-docs-access-log-sleep-httpbin.log) with its path made unique:
``/status/<pod>/<n>``, ``n`` counting all lines written (0, 1, 2, ...), so the stored rows can be
checked line by line (path) and stream by stream (reporter == the pod in the path).

:class:`SoakCluster` runs the server and the writer in a child process (spawn): they then do not
compete with the test or benchmark for one GIL, and the observer under test is a process of its
own anyway. The schedule (fractions of the planned duration, see :data:`CHURN`): pods deleted
(their log ends and stays readable for ``LOG_GRACE`` seconds, then 404), new pods appearing, one
of them with a deleted pod's IP, and log responses cut mid-line.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from support.kube_watch_api import (
    WatchApiServer,
    _chunk,
    _client_gone,
    _die,
    _end_chunked,
    _parse_since,
    _start_chunked,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"
NAMESPACE = "soak"
CONTAINER = "istio-proxy"
#: Seconds between two writer steps.
STEP = 0.05
#: Seconds a deleted pod's log stays readable before it answers 404.
LOG_GRACE = 30.0
#: Seconds at least between a pod's deletion and another pod taking its IP (lifetimes are
#: stamped to the second).
REUSE_AFTER = 3.0
#: Nanoseconds between the kubelet timestamps of consecutive lines of one step.
LINE_NS = 1000
#: (fraction of the planned duration, action, argument): ``delete`` a pod, ``add`` one
#: (``name@ip-of-pod`` takes the IP a deleted pod had), ``cut`` a pod's next log response after
#: that many bytes (mid-line).
CHURN: tuple[tuple[float, str, str], ...] = (
    (0.20, "cut", "client-5:5000"),
    (0.25, "delete", "client-0"),
    (0.27, "add", "newcomer-1@client-0"),
    (0.45, "cut", "client-9:20000"),
    (0.50, "delete", "client-1"),
    (0.52, "add", "newcomer-2"),
    (0.60, "add", "newcomer-3"),
)


def _template() -> tuple[bytes, bytes]:
    """The sample line split around its path: ``prefix + b"<pod>/<n>" + suffix``."""
    line = SAMPLE.read_text().splitlines()[0]
    head, _, tail = line.partition("/status/418")
    return (head + "/status/").encode(), tail.encode()


def pod_ip(index: int) -> str:
    return f"10.60.{index // 250}.{index % 250 + 1}"


def soak_pod(name: str, ip: str, started: datetime) -> dict[str, Any]:
    """A running meshed pod (an app container and istio-proxy) as the API returns it."""
    stamp = started.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                         "creationTimestamp": stamp,
                         "labels": {"app": name.rsplit("-", 1)[0]}},
            "spec": {"containers": [{"name": "app"}, {"name": CONTAINER}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "startTime": stamp}}


@dataclass
class _Log:
    """One container's log: blocks of (first ts, lines, data), the first ``trimmed`` gone."""

    blocks: list[tuple[int, int, bytes]] = field(default_factory=list)
    trimmed: int = 0
    done: bool = False
    last: int = 0
    """Timestamp of the last line (ns)."""


class FastLogApiServer(WatchApiServer):
    """WatchApiServer whose ``pods/log`` is served from pre-rendered blocks (module doc)."""

    def __init__(self, *, keep_seconds: float = 60.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.keep_ns = int(keep_seconds * 1e9)
        self.fast: dict[tuple[str, str, str], _Log] = {}
        #: lines written into log responses (a line sent again after a reconnect counts again)
        self.lines_sent = 0

    def add_lines(self, key: tuple[str, str, str], first_ts: int, data: bytes, n: int) -> None:
        """Append ``n`` rendered lines (``data``) whose timestamps start at ``first_ts``, each
        :data:`LINE_NS` after the one before. Caller holds :attr:`cond`."""
        log = self.fast.setdefault(key, _Log())
        log.blocks.append((first_ts, n, data))
        log.last = first_ts + (n - 1) * LINE_NS

    def trim(self, now_ns: int) -> None:
        """Drop blocks older than ``keep_seconds`` (caller holds :attr:`cond`)."""
        cutoff = now_ns - self.keep_ns
        for log in self.fast.values():
            k = 0
            while k < len(log.blocks) and log.blocks[k][0] < cutoff:
                k += 1
            if k:
                del log.blocks[:k]
                log.trimmed += k

    def _log_store(self) -> Mapping[tuple[str, str, str], object]:
        return self.fast

    def _stream_log(self, h: BaseHTTPRequestHandler, key: tuple[str, str, str],
                    query: dict[str, list[str]], cut: int | None) -> None:
        since = _parse_since(query["sinceTime"][0]) if query.get("sinceTime") else None
        follow = (query.get("follow") or [""])[0] == "true"
        _start_chunked(h, "text/plain")
        index: int | None = None  # the next block to send (counting trimmed ones)
        written = 0
        while True:
            with self.cond:
                log = self.fast.get(key)
                if log is None:
                    break  # the pod is gone: the kubelet stops the stream
                if index is None:
                    index = log.trimmed
                    if since is not None:
                        while (index - log.trimmed < len(log.blocks)
                               and _block_last(log.blocks[index - log.trimmed]) < since):
                            index += 1
                index = max(index, log.trimmed)
                fresh = log.blocks[index - log.trimmed:]
                index += len(fresh)
                if not fresh:
                    if log.done or not follow or self.closing:
                        break
                    self.cond.wait(0.05)
                    if _client_gone(h):
                        return
                    continue
            parts: list[bytes] = []
            lines = 0
            for first, n, data in fresh:
                if since is not None and first < since:
                    skip = -(-(since - first) // LINE_NS)  # lines before sinceTime
                    data = data[_nth_line_start(data, skip):]
                    n -= skip
                parts.append(data)
                lines += n
            since = None  # what comes later is newer
            body = b"".join(parts)
            if cut is not None and written + len(body) > cut:
                _chunk(h, body[: cut - written])
                _die(h)
                return
            if body:
                _chunk(h, body)
                written += len(body)
            with self.cond:
                self.lines_sent += lines
        _end_chunked(h)


def _block_last(block: tuple[int, int, bytes]) -> int:
    return block[0] + (block[1] - 1) * LINE_NS


def _nth_line_start(data: bytes, n: int) -> int:
    pos = 0
    for _ in range(n):
        pos = data.index(b"\n", pos) + 1
    return pos


def _timestamp(ns: int, cache: dict[int, bytes]) -> bytes:
    """``YYYY-MM-DDTHH:MM:SS.fffffffffZ`` (RFC 3339, nine fraction digits)."""
    sec = ns // 1_000_000_000
    head = cache.get(sec)
    if head is None:
        cache.clear()
        head = cache[sec] = datetime.fromtimestamp(sec, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S").encode()
    return b"%s.%09dZ" % (head, ns % 1_000_000_000)


@dataclass
class WriterStats:
    started: float = 0.0
    """Wall-clock start of writing (time.time())."""
    seconds: float = 0.0
    """Writing time (monotonic)."""
    written: int = 0
    per_pod: dict[str, int] = field(default_factory=dict)
    lines_sent: int = 0
    events: list[tuple[float, str, str]] = field(default_factory=list)
    """(seconds since the start, action, argument) of the churn done."""
    log_peak: int = 0


class _Writer:
    """Appends ``rate`` lines/s over the live pods, round robin, and does the churn."""

    def __init__(self, srv: FastLogApiServer, rate: int, pods: int, planned: float,
                 churn: bool) -> None:
        self.srv = srv
        self.rate = rate
        self.planned = planned
        self.prefix, self.suffix = _template()
        self.live: list[str] = []
        self.ips: dict[str, str] = {}
        self.stats = WriterStats()
        self.schedule = sorted(CHURN) if churn else []
        self.removals: list[tuple[float, str]] = []
        self.deleted: dict[str, float] = {}
        self.stop = threading.Event()
        self._cache: dict[int, bytes] = {}
        self._next_ip = pods
        srv.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": NAMESPACE, "uid": "ns-soak"}})
        for i in range(pods):
            self.add(f"client-{i}", pod_ip(i))

    def add(self, name: str, ip: str) -> None:
        now = time.time_ns()
        start = datetime.fromtimestamp(now / 1e9, UTC)
        with self.srv.cond:  # the log exists before the pod (no 404 for a new pod)
            line = b"%s %s\tinfo\tEnvoy proxy is ready\n" % (
                _timestamp(now, self._cache), start.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode())
            self.srv.add_lines((NAMESPACE, name, CONTAINER), now, line, 1)
        self.srv.put(soak_pod(name, ip, start))
        self.live.append(name)
        self.ips[name] = ip
        self.stats.per_pod.setdefault(name, 0)

    def delete(self, name: str) -> None:
        self.live.remove(name)
        with self.srv.cond:
            self.srv.fast[(NAMESPACE, name, CONTAINER)].done = True  # the container stopped
            self.srv.cond.notify_all()
        self.srv.delete("Pod", NAMESPACE, name)
        self.removals.append((time.monotonic() + LOG_GRACE, name))

    def run(self) -> None:
        t0 = time.monotonic()
        self.stats.started = time.time()
        nxt = t0
        while not self.stop.is_set():
            now = time.monotonic()
            self._churn(now - t0)
            due = int(self.rate * (now - t0)) - self.stats.written
            if due > 0:
                self._append(due)
            nxt += STEP
            self.stop.wait(max(0.0, nxt - time.monotonic()))
        self.stats.seconds = time.monotonic() - t0

    def _churn(self, elapsed: float) -> None:
        while self.schedule and self.schedule[0][0] * self.planned <= elapsed:
            _, action, arg = self.schedule[0]
            name, _, reuse = arg.partition("@")
            if reuse and elapsed < self.deleted.get(reuse, elapsed) + REUSE_AFTER:
                break  # the IP is taken again a few seconds after its pod ended
            self.schedule.pop(0)
            if action == "delete":
                self.delete(arg)
                self.deleted[arg] = elapsed
            elif action == "add":
                ip = self.ips[reuse] if reuse else pod_ip(self._next_ip)
                self._next_ip += not reuse
                self.add(name, ip)
            elif action == "cut":
                name, _, after = arg.partition(":")
                self.srv.cut_log(NAMESPACE, name, CONTAINER, int(after))
            self.stats.events.append((round(elapsed, 2), action, arg))
        now = time.monotonic()
        for when, name in [r for r in self.removals if r[0] <= now]:
            self.removals.remove((when, name))
            with self.srv.cond:
                del self.srv.fast[(NAMESPACE, name, CONTAINER)]  # pods/log: 404 from now on
                self.srv.cond.notify_all()

    def _append(self, n: int) -> None:
        pods = self.live
        per, extra = divmod(n, len(pods))
        first = self.stats.written
        blocks: list[tuple[str, int, bytes, int]] = []
        now = time.time_ns()
        k = first
        rot = first % len(pods)
        for j in range(len(pods)):
            pod = pods[(rot + j) % len(pods)]
            count = per + (1 if j < extra else 0)
            if not count:
                continue
            log = self.srv.fast[(NAMESPACE, pod, CONTAINER)]
            ts0 = max(now, log.last + LINE_NS)
            name = pod.encode()
            data = b"".join(
                b"%s %s%s/%d%s\n" % (_timestamp(ts0 + i * LINE_NS, self._cache), self.prefix,
                                     name, k + i, self.suffix)
                for i in range(count))
            blocks.append((pod, ts0, data, count))
            self.stats.per_pod[pod] += count
            k += count
        with self.srv.cond:
            for pod, ts0, data, count in blocks:
                self.srv.add_lines((NAMESPACE, pod, CONTAINER), ts0, data, count)
            self.srv.trim(now)
            self.srv.cond.notify_all()
        self.stats.written = k


def _serve(conn: Connection, rate: int, pods: int, planned: float, churn: bool,
           keep_seconds: float) -> None:
    """The child process: serve, write on "start", report on "stop", end on "exit"."""
    srv = FastLogApiServer(hold_seconds=30.0, bookmark_seconds=5.0, keep_seconds=keep_seconds)
    with srv:
        writer = _Writer(srv, rate, pods, planned, churn)
        conn.send({"url": srv.url, "pid": os.getpid()})
        thread: threading.Thread | None = None
        while True:
            command = conn.recv()
            if command == "start":
                thread = threading.Thread(target=writer.run, daemon=True)
                thread.start()
                conn.send("started")
            elif command == "stop":
                writer.stop.set()
                if thread is not None:
                    thread.join()
                with srv.cond:
                    writer.stats.lines_sent = srv.lines_sent
                    writer.stats.log_peak = srv.log_peak
                conn.send(writer.stats)
            elif command == "sent":
                with srv.cond:
                    conn.send(srv.lines_sent)
            else:
                conn.send("bye")
                return


class SoakCluster:
    """The fake cluster in a child process::

        with SoakCluster(rate=12_000, pods=24, planned=180) as cluster:
            ... start meshwright against cluster.url (kubeconfig: cluster.kubeconfig(dir))
            cluster.start()
            ...
            stats = cluster.stop()      # WriterStats
    """

    def __init__(self, *, rate: int, pods: int, planned: float, churn: bool = True,
                 keep_seconds: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, name="soak-api-server", daemon=True,
                                 args=(child, rate, pods, planned, churn, keep_seconds))
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the soak API server did not start")
        hello = self._conn.recv()
        self.url: str = hello["url"]
        self.pid: int = hello["pid"]

    def __enter__(self) -> SoakCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._proc.is_alive():
                self._conn.send("exit")
                self._conn.poll(10)
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def kubeconfig(self, directory: Path) -> str:
        from support.kube_watch_api import _kubeconfig

        return _kubeconfig(directory, self.url)

    def _ask(self, command: str, timeout: float = 60.0) -> Any:
        self._conn.send(command)
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the soak API server did not answer {command!r}")
        return self._conn.recv()

    def start(self) -> None:
        self._ask("start")

    def lines_sent(self) -> int:
        return int(self._ask("sent"))

    def stop(self) -> WriterStats:
        stats: WriterStats = self._ask("stop")
        return stats


# -- measuring the observer process ------------------------------------------------------------
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flow_files(state: Path) -> Iterator[Path]:
    for f in sorted((state / "flows").rglob("*.parquet")):
        if not f.name.startswith("."):
            yield f


def stored_rows(state: Path) -> int:
    """Rows in the committed flow files under ``state`` (retried while files are replaced)."""
    import pyarrow.parquet as pq

    for _ in range(20):
        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in flow_files(state))
        except (FileNotFoundError, OSError):
            time.sleep(0.05)
    raise RuntimeError("flow files kept changing")
