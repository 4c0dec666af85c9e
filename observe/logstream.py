"""Proxy logs followed through the API (``pods/log?follow&timestamps&sinceTime``).

Which containers: ``istio-proxy`` and ``linkerd-proxy`` (regular or native-sidecar init
containers) and the container of ztunnel pods (label ``app=ztunnel``). Pods come from the
watcher (:meth:`LogStreamer.on_pod` is an :class:`observe.watch.InventoryWatcher` listener):
new pods are picked up as they appear; a pod that ended is drained (visited first, read to
the end of its log) and then dropped; a pod whose log is gone (HTTP 404) is dropped.

**Bound.** ``workers`` threads, each holding at most one connection: that many log
connections, whatever the number of pods. Each visit reads one stream for at most
``slice_seconds`` (or until it is quiet for ``read_timeout``), then the stream goes to the back
of the queue and the next one is opened; with fewer streams than workers a stream is simply
reopened. A pod is revisited at least every ``ceil(streams / workers) * slice_seconds``
seconds; what it logged meanwhile waits in the kubelet's log file (lost only if the file
rotates out before the visit: more than ``containerLogMaxSize``, 10 MiB by default, per
interval). Memory: the chunk queue (``queue_chunks`` chunks of at most ``chunk_lines`` lines)
plus a cursor per stream (a timestamp and the hashes of the lines at that timestamp).

**Exactly once.** Every line carries the kubelet's RFC 3339 timestamp. A cursor remembers the
last timestamp delivered and which lines (by content hash, counted) had it. A reconnect asks
for ``sinceTime`` = that timestamp truncated to the second (what the API server passes on), so
the overlap comes again: lines older than the cursor are dropped, lines at the cursor
timestamp are dropped as often as they were delivered, newer ones are new. A stream cut
mid-line never delivers the partial line (it comes whole after the reconnect).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from observe.errors import InventoryError
from observe.kube import ApiUnavailable, KubeApi, NotFound, StreamIdle
from observe.watch import Backoff

log = logging.getLogger(__name__)

#: Containers that are a mesh proxy, followed in every pod that has one.
PROXY_CONTAINERS = ("istio-proxy", "linkerd-proxy")
#: Samples of malformed lines / errors kept.
MAX_SAMPLES = 10


@dataclass(frozen=True, order=True)
class StreamKey:
    """One container's log of one pod incarnation."""

    namespace: str
    pod: str
    container: str
    uid: str

    @property
    def name(self) -> str:
        """``kube:<ns>/<pod>/<container>``: the origin prefix of its lines."""
        return f"kube:{self.namespace}/{self.pod}/{self.container}"


@dataclass(frozen=True)
class LogChunk:
    """Consecutive new lines of one stream (timestamp prefix removed)."""

    key: StreamKey
    lines: list[str]
    times: list[int]
    """The kubelet timestamp of each line, ns since the epoch."""
    first: int
    """Ordinal (1-based) of the first line among the stream's delivered lines."""
    cursor: CursorState | None = None
    """Where the stream stands just after this chunk's last line (to checkpoint with it)."""


@dataclass
class StreamStats:
    """Counters of the streamer (for metrics and the report)."""

    lines: int = 0
    """Lines delivered."""
    duplicates: int = 0
    """Lines received again after a reconnect and dropped."""
    malformed: int = 0
    """Lines without a parsable timestamp prefix (delivered nowhere, counted)."""
    connections: int = 0
    """Log requests opened."""
    reconnects: int = 0
    """Visits that ended in an error (then retried after a back-off)."""
    streams_started: int = 0
    streams_finished: int = 0
    """Streams drained (pod ended) or gone (404)."""
    samples: list[str] = field(default_factory=list)

    def sample(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)


def proxy_containers(pod: Mapping[str, Any]) -> list[str]:
    """Names of the containers of ``pod`` (raw API object) whose log is followed."""
    spec = pod.get("spec") or {}
    containers = [str(c.get("name")) for c in spec.get("containers") or []]
    inits = [str(c.get("name")) for c in spec.get("initContainers") or []
             if c.get("restartPolicy") == "Always"]
    found = [c for c in containers + inits if c in PROXY_CONTAINERS]
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if not found and labels.get("app") == "ztunnel" and containers:
        found = [containers[0]]
    return sorted(set(found))


def parse_timestamp(text: bytes) -> int | None:
    """RFC 3339 (``Z`` or an offset, 0-9 fraction digits) as ns since the epoch."""
    try:
        s = text.decode("ascii")
        if s.endswith("Z"):
            s, offset = s[:-1], 0
        elif len(s) > 6 and s[-6] in "+-" and s[-3] == ":":
            sign = 1 if s[-6] == "+" else -1
            offset = sign * (int(s[-5:-3]) * 3600 + int(s[-2:]) * 60)
            s = s[:-6]
        else:
            return None
        base, _, frac = s.partition(".")
        if (len(base) != 19 or base[10] != "T" or (frac and not frac.isdigit())
                or len(frac) > 9):
            return None
        seconds = int(datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp()) - offset
        return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))
    except (ValueError, UnicodeDecodeError):
        return None


def since_time(ns: int) -> str:
    """``sinceTime`` for a cursor at ``ns``: RFC 3339 truncated to the second."""
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CursorState:
    """A :class:`Cursor` frozen for a checkpoint: restore it with :meth:`Cursor.restore`."""

    last: int | None
    at_last: tuple[tuple[bytes, int], ...]
    """(content digest, lines with it) at ``last``, sorted."""
    delivered: int


class Cursor:
    """Where a stream stands: the last timestamp delivered and the lines that had it."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.at_last: Counter[bytes] = Counter()
        self.delivered = 0
        self._replay: Counter[bytes] = Counter()

    def state(self) -> CursorState:
        return CursorState(self.last, tuple(sorted(self.at_last.items())), self.delivered)

    @classmethod
    def restore(cls, state: CursorState) -> Cursor:
        """A cursor that resumes at ``state`` (a reconnect then skips what it delivered)."""
        cursor = cls()
        cursor.last = state.last
        cursor.at_last = Counter(dict(state.at_last))
        cursor.delivered = state.delivered
        return cursor

    def reconnect(self) -> None:
        """A new connection starts: the lines at the cursor timestamp may come again."""
        self._replay = Counter(self.at_last)

    def admit(self, ts: int, content: bytes) -> bool:
        """True if the line is new (and record it)."""
        if self.last is not None and ts < self.last:
            return False
        digest = hashlib.blake2b(content, digest_size=8).digest()
        if self.last is not None and ts == self.last:
            if self._replay[digest] > 0:
                self._replay[digest] -= 1
                return False
            self.at_last[digest] += 1
        else:
            self.last = ts
            self.at_last = Counter({digest: 1})
            self._replay = Counter()
        self.delivered += 1
        return True


@dataclass
class _Stream:
    key: StreamKey
    cursor: Cursor = field(default_factory=Cursor)
    ended: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    not_before: float = 0.0


class LogStreamer:
    """Follows proxy logs with a bounded worker pool; :meth:`chunks` yields what they read."""

    def __init__(self, api: KubeApi, *, workers: int = 8, slice_seconds: float = 30.0,
                 read_timeout: float = 10.0, chunk_lines: int = 2000, queue_chunks: int = 64,
                 backoff: Callable[[], Backoff] = Backoff,
                 monotonic: Callable[[], float] = time.monotonic,
                 cursors: Mapping[StreamKey, CursorState] | None = None) -> None:
        """``cursors``: where streams stood at a checkpoint (from :attr:`LogChunk.cursor`);
        a stream of one of these keys resumes there instead of at the start of its log."""
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.api = api
        self.workers = workers
        self.slice_seconds = slice_seconds
        self.read_timeout = read_timeout
        self.chunk_lines = chunk_lines
        self.backoff = backoff
        self.monotonic = monotonic
        self.stats = StreamStats()
        self._streams: dict[StreamKey, _Stream] = {}
        self._ready: deque[StreamKey] = deque()
        self._busy: set[StreamKey] = set()
        self._cond = threading.Condition()
        self._out: queue.Queue[LogChunk] = queue.Queue(maxsize=queue_chunks)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fatal: InventoryError | None = None
        self._saved: dict[StreamKey, CursorState] = dict(cursors or {})

    # -- pods -------------------------------------------------------------------------------
    def on_pod(self, event: str, pod: Mapping[str, Any]) -> None:
        """Watcher listener: start streams for a pod's proxy containers, mark ended ones."""
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ns, name, uid = meta.get("namespace") or "default", meta.get("name"), meta.get("uid")
        if not name:
            return
        ended = (event == "DELETED" or bool(meta.get("deletionTimestamp"))
                 or status.get("phase") in ("Succeeded", "Failed"))
        started = status.get("phase") in ("Running", "Succeeded", "Failed")
        with self._cond:
            for container in proxy_containers(pod):
                key = StreamKey(ns, str(name), container, str(uid or ""))
                stream = self._streams.get(key)
                if stream is None:
                    if not started:
                        continue  # no log before the containers start
                    saved = self._saved.pop(key, None)
                    stream = _Stream(key, backoff=self.backoff())
                    if saved is not None:
                        stream.cursor = Cursor.restore(saved)
                    self._streams[key] = stream
                    self.stats.streams_started += 1
                    self._ready.append(key)
                    # The same pod name with another uid (a recreated StatefulSet pod): the
                    # old incarnation's log is gone from the API.
                    for other in [k for k in self._streams if k.namespace == ns
                                  and k.pod == name and k.uid != key.uid]:
                        self._streams[other].ended = True
                if ended and not stream.ended:
                    stream.ended = True
                    if key in self._ready:  # drain it next, before the kubelet removes it
                        self._ready.remove(key)
                        self._ready.appendleft(key)
            self._cond.notify_all()

    # -- running ----------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, daemon=True, name=f"logstream-{i}")
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers (interrupting reads); chunks already read stay in the queue."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.api.interrupt()
        for t in self._threads:
            t.join(timeout)

    @property
    def error(self) -> InventoryError | None:
        """The error that stopped a worker (forbidden, ...), if any."""
        return self._fatal

    def active(self) -> int:
        """Streams not yet finished."""
        with self._cond:
            return len(self._streams)

    def get(self, timeout: float) -> LogChunk | None:
        """The next chunk, or None after ``timeout`` seconds without one."""
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            return None

    def chunks(self, poll: float = 0.1) -> Iterator[LogChunk]:
        """Chunks until :meth:`stop` was called and everything read was handed out."""
        while True:
            chunk = self.get(poll)
            if chunk is not None:
                yield chunk
            elif self._stop.is_set() and not any(t.is_alive() for t in self._threads):
                while (chunk := self.get(0)) is not None:
                    yield chunk
                return

    # -- workers ----------------------------------------------------------------------------
    def _next(self) -> _Stream | None:
        with self._cond:
            while not self._stop.is_set():
                now = self.monotonic()
                for _ in range(len(self._ready)):
                    key = self._ready.popleft()
                    stream = self._streams.get(key)
                    if stream is None:
                        continue
                    if stream.not_before <= now:
                        self._busy.add(key)
                        return stream
                    self._ready.append(key)
                waits = [self._streams[k].not_before - now for k in self._ready
                         if k in self._streams]
                self._cond.wait(min([*waits, 0.5]) if waits else 0.5)
            return None

    def _worker(self) -> None:
        while (stream := self._next()) is not None:
            done = False
            try:
                done = self._visit(stream)
            except InventoryError as exc:  # forbidden, unauthorized: nothing will work
                with self._cond:
                    self.stats.sample(str(exc))
                    self._fatal = self._fatal or exc
                self._stop.set()
            with self._cond:
                self._busy.discard(stream.key)
                if done:
                    self._streams.pop(stream.key, None)
                    self.stats.streams_finished += 1
                elif stream.ended:
                    self._ready.appendleft(stream.key)
                else:
                    self._ready.append(stream.key)
                self._cond.notify_all()

    def _visit(self, stream: _Stream) -> bool:
        """Read one stream for one slice; True when it is finished for good."""
        cursor = stream.cursor
        cursor.reconnect()
        deadline = self.monotonic() + self.slice_seconds
        lines: list[str] = []
        times: list[int] = []
        first = cursor.delivered + 1
        since = since_time(cursor.last) if cursor.last is not None else None
        counts = Counter({"connections": 1})
        try:
            return self._read(stream, deadline, lines, times, first, since, counts)
        finally:
            with self._cond:
                for name, n in counts.items():
                    setattr(self.stats, name, getattr(self.stats, name) + n)

    def _read(self, stream: _Stream, deadline: float, lines: list[str], times: list[int],
              first: int, since: str | None, counts: Counter[str]) -> bool:
        key, cursor = stream.key, stream.cursor
        try:
            for raw in self.api.follow_log(key.namespace, key.pod, key.container,
                                           since_time=since, read_timeout=self.read_timeout):
                ts_text, sep, content = raw.partition(b" ")
                ts = parse_timestamp(ts_text) if sep else None
                if ts is None:
                    counts["malformed"] += 1
                    with self._cond:
                        self.stats.sample(f"{key.name}: line without a timestamp")
                    continue
                if not cursor.admit(ts, content):
                    counts["duplicates"] += 1
                    continue
                lines.append(content.decode("utf-8", "replace"))
                times.append(ts)
                if len(lines) >= self.chunk_lines:
                    self._emit(key, lines, times, first)
                    first, lines, times = cursor.delivered + 1, [], []
                if self._stop.is_set():
                    break
                if self.monotonic() >= deadline and self._others_waiting():
                    break  # leaving the generator closes the connection
            else:
                # The log ended: the container stopped. Finished if the pod ended.
                self._emit(key, lines, times, first)
                if stream.ended:
                    return True
                stream.not_before = self.monotonic() + (stream.backoff.next_delay() or 0.0)
                return False
        except NotFound:
            self._emit(key, lines, times, first)
            return True  # the pod is gone, and its log with it
        except StreamIdle:
            stream.backoff.reset()
        except ApiUnavailable as exc:
            if not self._stop.is_set():
                counts["reconnects"] += 1
                with self._cond:
                    self.stats.sample(str(exc))
                stream.not_before = self.monotonic() + (stream.backoff.next_delay() or 0.0)
        else:
            stream.backoff.reset()
        self._emit(key, lines, times, first)
        return False

    def _others_waiting(self) -> bool:
        with self._cond:
            return bool(self._ready)

    def _emit(self, key: StreamKey, lines: list[str], times: list[int], first: int) -> None:
        if not lines:
            return
        with self._cond:
            self.stats.lines += len(lines)
            stream = self._streams.get(key)
        # Only this worker advances the cursor while it visits the stream: its state now is
        # the state right after the chunk's last line.
        state = stream.cursor.state() if stream is not None else None
        chunk = LogChunk(key, list(lines), list(times), first, state)
        # Back-pressure: a slow consumer blocks the readers (the kubelet keeps the files).
        # The chunk is put even after stop() so nothing admitted by a cursor is lost.
        self._out.put(chunk)
        lines.clear()
        times.clear()
