"""observe.streamflows: real Istio access lines streamed from the fake API's ``pods/log`` (with a
cut mid-line) become the same flow records the file pipeline makes of them, with the pod as
reporter and ``kube:`` origins."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
from support.kube_watch_api import WatchApiServer, _kubeconfig

from observe.kube import KubeApi
from observe.logstream import LogChunk, LogStreamer, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats, observe_inputs
from observe.streamflows import stream_flow_batches
from observe.watch import Backoff

DATA = Path(__file__).parents[1] / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"
BASE = 1_606_339_578_409_000_000  # 2020-11-25T21:26:18.409Z, the lines' own time
IGNORED = {"reporter", "origin"}


def _pod(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "foo", "uid": f"uid-{name}"},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
            "status": {"phase": "Succeeded"}}


def test_streamed_lines_match_the_file_pipeline(tmp_path: Path) -> None:
    outbound, inbound = DATA.read_text().splitlines()
    diagnostic = "2020-11-25T21:26:17.000000Z\tinfo\tEnvoy proxy is ready"
    with WatchApiServer() as srv:
        srv.log("foo", "sleep-1", "istio-proxy", BASE - 1_000_000_000, diagnostic)
        srv.log("foo", "sleep-1", "istio-proxy", BASE, outbound)
        srv.log("foo", "httpbin-1", "istio-proxy", BASE + 3_000_000, inbound)
        for pod in ("sleep-1", "httpbin-1"):
            srv.finish_log("foo", pod, "istio-proxy")
        srv.cut_log("foo", "sleep-1", "istio-proxy", 120)  # inside the access line
        api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, srv.url))
        streamer = LogStreamer(api, workers=2, read_timeout=0.5,
                               backoff=lambda: Backoff(base=0.01, seed=1))
        for pod in ("sleep-1", "httpbin-1"):
            streamer.on_pod("ADDED", _pod(pod))
        streamer.start()
        deadline = time.monotonic() + 5
        while streamer.active() and time.monotonic() < deadline:
            time.sleep(0.02)
        streamer.stop()
        chunks = sorted(streamer.chunks(), key=lambda c: c.key)
    assert streamer.stats.reconnects == 1
    stats = ObserveStats()
    table = pa.Table.from_batches(list(stream_flow_batches(chunks, ObserveOptions(workers=1),
                                                           stats)))
    assert stats.lines == 3 and stats.ignored_lines == 1 and stats.malformed == 0
    assert stats.records == 2 and stats.files == 2
    # Independent reference: the file pipeline on the same lines.
    run = observe_inputs([str(DATA)], ObserveOptions(workers=1))
    ref = pa.Table.from_batches(list(run.batches))
    got = table.sort_by("direction")
    ref = ref.sort_by("direction")
    for name in ref.schema.names:
        if name not in IGNORED:
            assert got.column(name).to_pylist() == ref.column(name).to_pylist(), name
    assert got.column("reporter").to_pylist() == ["foo/httpbin-1", "foo/sleep-1"]
    assert got.column("origin").to_pylist() == ["kube:foo/httpbin-1/istio-proxy:1",
                                                "kube:foo/sleep-1/istio-proxy:2"]


def test_chunks_of_many_streams_with_workers() -> None:
    outbound, inbound = DATA.read_text().splitlines()
    chunks = [LogChunk(StreamKey("foo", f"p-{i}", "istio-proxy", str(i)),
                       [outbound, inbound] * 50, [BASE] * 100, 1) for i in range(8)]
    stats = ObserveStats()
    batches = list(stream_flow_batches(chunks, ObserveOptions(workers=2), stats))
    table = pa.Table.from_batches(batches)
    assert table.num_rows == 800 and stats.records == 800 and stats.lines == 800
    # Submission order is kept: p-0's records first.
    reporters = table.column("reporter").to_pylist()
    assert reporters[:100] == ["foo/p-0"] * 100 and reporters[-100:] == ["foo/p-7"] * 100
