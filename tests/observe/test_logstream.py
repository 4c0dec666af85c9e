"""observe.logstream against the local API server's ``pods/log`` (support.kube_watch_api):
follow, timestamps, sinceTime on reconnect, cuts mid-line, the API away for a while, pods
deleted, more pods than workers; every line exactly once, in order."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import k8s_fixtures as K
from support.kube_watch_api import WatchApiServer, _kubeconfig, rfc3339nano

from observe.kube import KubeApi
from observe.logstream import (
    Cursor,
    LogChunk,
    LogStreamer,
    parse_timestamp,
    proxy_containers,
    since_time,
)
from observe.watch import Backoff, InventoryWatcher

BASE = 1_606_339_578_000_000_000  # 2020-11-25T21:26:18Z in ns


@pytest.fixture
def server() -> Iterator[WatchApiServer]:
    with WatchApiServer(hold_seconds=3.0) as srv:
        yield srv


def _streamer(srv: WatchApiServer, tmp_path: Path, **kw: Any) -> LogStreamer:
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, srv.url))
    kw.setdefault("backoff", lambda: Backoff(base=0.01, cap=0.05, seed=5))
    kw.setdefault("read_timeout", 0.2)
    kw.setdefault("slice_seconds", 0.1)
    return LogStreamer(api, **kw)


def _collect(streamer: LogStreamer, until: Callable[[list[LogChunk]], bool],
             timeout: float = 8.0) -> list[LogChunk]:
    got: list[LogChunk] = []
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        chunk = streamer.get(0.05)
        if chunk is not None:
            got.append(chunk)
    return got


def _lines(chunks: list[LogChunk]) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for c in chunks:
        out.setdefault(c.key.pod, []).extend(zip(c.times, c.lines, strict=True))
    return out


def _total(chunks: list[LogChunk]) -> int:
    return sum(len(c.lines) for c in chunks)


# -- pure pieces -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "2020-11-25T21:26:18Z", "2020-11-25T21:26:18.4Z", "2020-11-25T21:26:18.409Z",
    "2020-11-25T21:26:18.123456789Z", "2020-11-25T23:26:18.5+02:00",
    "1999-12-31T23:59:59.999999999Z",
])
def test_parse_timestamp_matches_numpy(text: str) -> None:
    # Independent reference: numpy's datetime64 parser (offsets applied by hand).
    body, offset = text, 0
    if text.endswith("Z"):
        body = text[:-1]
    else:
        body, tz = text[:-6], text[-6:]
        offset = (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    ref = int(np.datetime64(body, "ns").astype(np.int64)) - offset * 1_000_000_000
    assert parse_timestamp(text.encode()) == ref


@pytest.mark.parametrize("bad", [b"", b"hello", b"2020-11-25 21:26:18Z", b"2020-11-25T21:26:18",
                                 b"2020-11-25T21:26:18.1234567890Z", b"2020-13-25T21:26:18Z"])
def test_parse_timestamp_rejects(bad: bytes) -> None:
    assert parse_timestamp(bad) is None


def test_since_time_truncates_to_the_second() -> None:
    assert since_time(BASE + 999_999_999) == "2020-11-25T21:26:18Z"
    assert rfc3339nano(BASE + 500_000_000) == "2020-11-25T21:26:18.5Z"


def test_cursor_exactly_once_at_equal_timestamps() -> None:
    c = Cursor()
    first = [(BASE, b"a"), (BASE + 1, b"x"), (BASE + 1, b"x"), (BASE + 1, b"y")]
    assert [c.admit(t, s) for t, s in first] == [True, True, True, True]
    c.reconnect()
    # The overlap comes again from the start of the second, plus a third "x" that is new.
    again = [(BASE, b"a"), (BASE + 1, b"x"), (BASE + 1, b"x"), (BASE + 1, b"y"),
             (BASE + 1, b"x"), (BASE + 2, b"z")]
    assert [c.admit(t, s) for t, s in again] == [False, False, False, False, True, True]
    assert c.delivered == 6


def test_proxy_containers() -> None:
    meshed = K.pod("a", ip="10.0.0.1")
    plain = K.pod("b", ip="10.0.0.2", meshed=False)
    native = K.pod("c", ip="10.0.0.3", meshed=False)
    native["spec"]["initContainers"] = [{"name": "linkerd-proxy", "restartPolicy": "Always"},
                                        {"name": "istio-init"}]
    ztunnel = K.pod("ztunnel-abcde", namespace="istio-system", ip="10.0.0.4", meshed=False,
                    labels={"app": "ztunnel"},
                    containers=[{"name": "istio-proxy", "image": "istio/ztunnel:1.22"}])
    assert proxy_containers(meshed) == ["istio-proxy"]
    assert proxy_containers(plain) == []
    assert proxy_containers(native) == ["linkerd-proxy"]
    assert proxy_containers(ztunnel) == ["istio-proxy"]


# -- against the API server ------------------------------------------------------------------

def _write_logs(srv: WatchApiServer, pod: str, n: int, *, start: int = 0) -> list[tuple[int, str]]:
    """``n`` lines, several per second, with repeated timestamps and one exact duplicate."""
    out = []
    for i in range(start, start + n):
        t = BASE + (i // 7) * 1_000_000_000 + (i % 7 // 2) * 250_000_000  # pairs share a ts
        text = f"line {i} of {pod} " + "x" * (i % 13)
        if i % 29 == 5:
            text = f"dup of {pod}"  # the same text at the same timestamp twice in a row
            out.append((t, text))
            srv.log("foo", pod, "istio-proxy", t, text)
        out.append((t, text))
        srv.log("foo", pod, "istio-proxy", t, text)
    return out


def test_faults_every_line_exactly_once(server: WatchApiServer, tmp_path: Path) -> None:
    expected = {name: _write_logs(server, name, 120) for name in ("a-1", "b-1", "c-1")}
    for name in expected:
        server.finish_log("foo", name, "istio-proxy")
    server.cut_log("foo", "a-1", "istio-proxy", 1000)  # mid-line (lines are ~45 bytes)
    server.cut_log("foo", "a-1", "istio-proxy", 2500)
    server.cut_log("foo", "b-1", "istio-proxy", 777)
    with server.cond:
        server.outage = 3  # the API server gone for the next 3 requests
    streamer = _streamer(server, tmp_path, workers=2)
    for name in expected:
        streamer.on_pod("ADDED", K.pod(name, namespace="foo", ip=None, phase="Succeeded"))
    streamer.on_pod("ADDED", K.pod("plain-1", namespace="foo", ip=None, meshed=False))
    streamer.start()
    try:
        want = sum(len(v) for v in expected.values())
        got = _collect(streamer, lambda g: _total(g) >= want and streamer.active() == 0)
    finally:
        streamer.stop()
    got += list(streamer.chunks())
    assert _lines(got) == expected  # all lines, once, in order, per pod
    s = streamer.stats
    assert s.lines == want
    assert s.duplicates > 0  # reconnects re-read the overlap, which was dropped
    assert s.reconnects >= 3
    assert s.streams_started == 3 and s.streams_finished == 3
    assert streamer.api.peak_open <= 2
    # Reconnects asked for the second of the last line delivered.
    since = [q["sinceTime"][0] for p, q in server.requests if "sinceTime" in q]
    assert since and all(s.endswith("Z") and "." not in s for s in since)
    # Origins: ordinals of delivered lines, consecutive per stream.
    for pod in expected:
        firsts = [(c.first, len(c.lines)) for c in got if c.key.pod == pod]
        pos = 1
        for first, n in firsts:
            assert first == pos
            pos += n


def test_more_pods_than_workers_live_logs(server: WatchApiServer, tmp_path: Path) -> None:
    pods = [f"p-{i}" for i in range(12)]
    expected: dict[str, list[tuple[int, str]]] = {p: [] for p in pods}
    for p in pods:
        expected[p] += _write_logs(server, p, 20)
    streamer = _streamer(server, tmp_path, workers=2, slice_seconds=0.05, read_timeout=0.1)
    for p in pods:
        streamer.on_pod("ADDED", K.pod(p, namespace="foo", ip="10.1.0.1"))
    streamer.start()
    try:
        got = _collect(streamer, lambda g: _total(g) >= 240)
        for p in pods:  # the pods keep logging while they are being followed
            expected[p] += _write_logs(server, p, 15, start=20)
        got += _collect(streamer, lambda g: _total(g) >= 15 * 12)
        for p in pods:  # deleted: the log is gone (404)
            server.remove_log("foo", p)
            streamer.on_pod("DELETED", K.pod(p, namespace="foo", ip="10.1.0.1",
                                             deleted="2020-11-25T21:30:00Z"))
        deadline = time.monotonic() + 5
        while streamer.active() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert streamer.active() == 0
    finally:
        streamer.stop()
    got += list(streamer.chunks())
    assert _lines(got) == expected
    # Bounded by workers, not by pods: client-side exactly; the server notices a hang-up
    # only on its next poll, so it may briefly count a closed stream next to its successor.
    assert streamer.api.peak_open <= 2
    assert server.log_peak <= 4
    assert streamer.stats.streams_finished == 12
    assert streamer.stats.connections > 12  # streams rotated through the two workers


def test_new_pods_from_the_watch_are_followed(server: WatchApiServer, tmp_path: Path) -> None:
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, server.url))
    streamer = _streamer(server, tmp_path, workers=1)
    watcher = InventoryWatcher(api, resources=[("Pod", "v1", "pods")], timeout_seconds=2,
                               listeners=[streamer.on_pod])
    server.put(K.pod("old-1", namespace="foo", ip="10.1.0.1"))
    old = _write_logs(server, "old-1", 10)
    watcher.start()
    streamer.start()
    try:
        pending = K.pod("new-1", namespace="foo", ip=None, phase="Pending")
        server.put(pending)  # no log before it runs
        new = _write_logs(server, "new-1", 10)
        server.put(K.pod("new-1", namespace="foo", ip="10.1.0.2"))
        got = _collect(streamer, lambda g: _total(g) >= 20)
        server.finish_log("foo", "old-1", "istio-proxy")
        server.put(K.pod("old-1", namespace="foo", ip="10.1.0.1", phase="Succeeded",
                         finished="2020-11-25T21:40:00Z"))
        deadline = time.monotonic() + 5
        while streamer.active() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert streamer.active() == 1  # old-1 drained and dropped, new-1 still followed
    finally:
        watcher.stop()
        streamer.stop()
    got += list(streamer.chunks())
    assert _lines(got) == {"old-1": old, "new-1": new}
    assert streamer.stats.streams_started == 2
    assert Counter(p for p, _ in server.requests if p.endswith("/log"))[
        "/api/v1/namespaces/foo/pods/new-1/log"] >= 1
