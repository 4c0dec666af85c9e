"""``meshwright observe --kube`` against the local API server (support.kube_watch_api): killed
with SIGKILL and restarted, every line is in the store exactly once; SIGTERM commits and exits 0
at once; --emit-every publishes whole proposals (a polling reader never sees a partial file),
optionally committed to a git branch; /metrics and /healthz answer; retention folds old
partitions into the edge summary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.kube_watch_api import WatchApiServer, _kubeconfig

from meshwright.observer import Observer, ObserverConfig, git_commit, parse_listen
from observe.kube import KubeApi
from observe.logstream import LogChunk, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats
from observe.state import Checkpoint, FlowStore
from observe.streamflows import stream_flow_batches

ROOT = Path(__file__).parents[2]
DATA = ROOT / "tests" / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"
OUTBOUND = DATA.read_text().splitlines()[0]
BASE = 1_606_339_578_000_000_000  # 2020-11-25T21:26:18Z, the line's own second


def _fixtures() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "k8s_fixtures", ROOT / "tests" / "observe" / "k8s_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _fixtures()
PODS = {"sleep-1": "10.44.1.23", "sleep-2": "10.44.1.24", "httpbin-1": "10.44.1.27"}


def _line(pod: str, i: int) -> str:
    return OUTBOUND.replace("/status/418", f"/status/{pod}/{i}")


def _cluster(srv: WatchApiServer) -> None:
    srv.put({"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "foo", "uid": "ns-foo"}})
    for name, ip in PODS.items():
        srv.put(K.pod(name, namespace="foo", ip=ip, labels={"app": name.split("-")[0]},
                      created="2020-11-25T20:00:00Z"))
        srv.log("foo", name, "istio-proxy", BASE - 5_000_000_000,
                "2020-11-25T21:26:13.000000Z\tinfo\tEnvoy proxy is ready")


def _writer(srv: WatchApiServer, pods: list[str], n: int, per_step: int,
            pause: float) -> tuple[threading.Thread, dict[str, list[str]]]:
    """Writes ``n`` access lines per pod, ``per_step`` at a time; pairs share a timestamp and
    every 17th line is written twice (the same text at the same time: two requests)."""
    expected: dict[str, list[str]] = {p: [] for p in pods}

    def run() -> None:
        for start in range(0, n, per_step):
            for pod in pods:
                for i in range(start, min(n, start + per_step)):
                    t = BASE + (i // 2) * 100_000_000
                    text = _line(pod, i)
                    copies = 2 if i % 17 == 3 else 1
                    for _ in range(copies):
                        srv.log("foo", pod, "istio-proxy", t, text)
                        expected[pod].append(text)
            time.sleep(pause)

    return threading.Thread(target=run, daemon=True), expected


def _start(state: Path, kubeconfig: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
             kubeconfig, "-n", "foo", "--state", str(state), "--flush-every", "0.2",
             "--log-read-timeout", "0.5", "--log-slice", "0.5", "--reconnect-backoff", "0.05",
             "--log-format", "json", "-v", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


def _stored(state: Path) -> list[dict[str, Any]]:
    """The rows of every committed flow file (retried while a file is being replaced)."""
    for _ in range(20):
        try:
            rows: list[dict[str, Any]] = []
            for f in sorted((state / "flows").rglob("*.parquet")):
                if not f.name.startswith("."):
                    rows += pq.read_table(f, columns=["path", "origin", "reporter"]).to_pylist()
            return rows
        except (FileNotFoundError, OSError):
            time.sleep(0.05)
    raise AssertionError("flow files kept changing")


def _started(log: Path) -> int:
    """How many observer runs logged that they are observing."""
    return sum('"message": "observing"' in line for line in log.read_text().splitlines())


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster() -> Iterator[WatchApiServer]:
    with WatchApiServer(hold_seconds=2.0) as srv:
        _cluster(srv)
        yield srv


def _check_exactly_once(state: Path, expected: dict[str, list[str]]) -> None:
    rows = _stored(state)
    for pod, lines in expected.items():
        mine = [r for r in rows if r["reporter"] == f"foo/{pod}"]
        want = Counter(line.split('"GET ', 1)[1].split(" ", 1)[0] for line in lines)
        assert Counter(r["path"] for r in mine) == want, pod
        # Ordinals of the stream's lines: the diagnostic line is 1, access lines 2..n+1.
        ordinals = sorted(int(r["origin"].rsplit(":", 1)[1]) for r in mine)
        assert ordinals == list(range(2, len(lines) + 2)), pod
        assert {r["origin"].rsplit(":", 1)[0] for r in mine} == {
            f"kube:foo/{pod}/istio-proxy"}


def test_sigkill_and_restart_store_every_line_once(cluster: WatchApiServer,
                                                   tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    state, log = tmp_path / "state", tmp_path / "observer.log"
    writer, expected = _writer(cluster, ["sleep-1", "sleep-2"], 2000, 25, 0.05)
    proc = _start(state, kubeconfig, log, "--emit-every", "0")
    try:
        _wait(lambda: log.exists() and _started(log) == 1, 30, "the observer")
        writer.start()
        _wait(lambda: len(_stored(state)) >= 400, 30, "the first flows")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = len(_stored(state))
        # While it is down: a pod's log stream is cut mid-line on the next request, the API
        # server refuses a few requests, and the pod watch history is kept (resume by rv).
        cluster.cut_log("foo", "sleep-1", "istio-proxy", 3000)
        with cluster.cond:
            cluster.outage = 4
        proc = _start(state, kubeconfig, log, "--emit-every", "0")
        _wait(lambda: _started(log) == 2, 30, "the restarted observer")
        writer.join(60)
        total = sum(len(v) for v in expected.values())
        _wait(lambda: len(_stored(state)) >= total, 60, "every line")
        time.sleep(0.5)  # anything extra (a duplicate) would show up by now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at < total  # the kill came mid-run
    _check_exactly_once(state, expected)
    # The restart resumed the pod watch from its resourceVersion (no new pod list).
    records = [json.loads(line) for line in log.read_text().splitlines()
               if line.startswith("{")]
    resumed = [r for r in records if r["message"] == "observing"]
    assert len(resumed) == 2 and resumed[1]["streams_resumed"] >= 2


def test_sigterm_commits_everything_read_and_exits_at_once(cluster: WatchApiServer,
                                                            tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    state, log = tmp_path / "state", tmp_path / "observer.log"
    writer, _ = _writer(cluster, ["sleep-1"], 100_000, 200, 0.01)  # still writing at the end
    writer.start()
    proc = _start(state, kubeconfig, log, "--emit-every", "0", "--flush-every", "30")
    try:
        _wait(lambda: log.exists() and _started(log) == 1, 30, "the observer")
        time.sleep(2.0)  # reading; with --flush-every 30 nothing is committed before the signal
        assert not (state / "checkpoint.json").exists()
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-3000:]
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 5.0
    rows = [r for r in _stored(state) if r["reporter"] == "foo/sleep-1"]
    assert len(rows) > 0
    ckpt = FlowStore(state).checkpoint
    cursor = next(c for k, c in ckpt.cursors.items() if k.pod == "sleep-1")
    # Everything the stream delivered (the diagnostic line + the access lines) was committed.
    assert cursor.delivered == len(rows) + 1
    assert max(int(r["origin"].rsplit(":", 1)[1]) for r in rows) == cursor.delivered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_emit_every_publishes_whole_proposals_metrics_and_git(cluster: WatchApiServer,
                                                               tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    state, log = tmp_path / "state", tmp_path / "observer.log"
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    writer, expected = _writer(cluster, ["sleep-1"], 600, 20, 0.05)
    writer.start()
    port = _free_port()
    proc = _start(state, kubeconfig, log, "--emit-every", "1s", "--listen",
                  f"127.0.0.1:{port}", "--git", str(repo), "--mesh", "istio")
    _wait(lambda: log.exists() and _started(log) == 1, 30, "the observer")
    stop = threading.Event()
    problems: list[str] = []
    reads = Counter[str]()

    def reader() -> None:
        while not stop.is_set():
            for name in ("graph.json", "findings.json", "findings.sarif"):
                try:
                    text = (state / name).read_text()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(text)
                    reads[name] += 1
                except ValueError:
                    problems.append(f"partial {name}")
            with contextlib.suppress(FileNotFoundError):
                reads["report.md"] += bool((state / "report.md").read_text())

    t = threading.Thread(target=reader)
    t.start()
    try:
        _wait(lambda: len(list((state / "emit").glob("0*"))) >= 1
              and len(_stored(state)) >= 600, 60, "a proposal with every line")
        gen = os.readlink(state / "current")
        _wait(lambda: os.readlink(state / "current") != gen, 30, "the next proposal")
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, body.strip()) == (200, "ok")
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        metrics = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
        status, _ = _get(f"http://127.0.0.1:{port}/nope")
        assert status == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        t.join()
        if proc.poll() is None:
            proc.kill()
    assert not problems
    assert reads["graph.json"] > 0 and reads["report.md"] > 0
    rows = _stored(state)
    assert metrics["meshwright_flows_total"].value >= 600
    assert metrics["meshwright_flows_total"].value <= len(rows)
    assert metrics["meshwright_lines_parsed_total"].value >= metrics["meshwright_flows_total"].value
    assert metrics["meshwright_edges"].value >= 1
    assert "meshwright_stream_lag_seconds" in metrics
    assert metrics["meshwright_parse_errors_total"].value == 0
    # The proposal: sleep -> httpbin over HTTP on port 80, with the observed requests.
    graph = json.loads((state / "graph.json").read_text())
    edges = [e for e in graph["edges"] if "sleep" in e["source"] and "httpbin" in e["destination"]]
    assert edges and sum(e["requests"] for e in edges) == len(expected["sleep-1"])
    assert any((state / "policies").rglob("*.yaml"))
    # Committed to the branch, the working tree and HEAD untouched.
    msgs = subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "meshwright/proposals"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert msgs and all(m.startswith("meshwright: proposal ") for m in msgs)
    committed = subprocess.run(["git", "-C", str(repo), "show",
                                "meshwright/proposals:graph.json"],
                               capture_output=True, text=True, check=True).stdout
    assert json.loads(committed)["edges"]
    assert subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                          text=True, check=True).stdout == ""


def test_git_commit_skips_unchanged_proposals(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    gen = tmp_path / "gen"
    (gen / "policies").mkdir(parents=True)
    (gen / "graph.json").write_text("{}")
    (gen / "policies" / "a.yaml").write_text("a: 1\n")
    assert git_commit(repo, gen, "one")
    assert not git_commit(repo, gen, "same again")
    (gen / "policies" / "a.yaml").write_text("a: 2\n")
    assert git_commit(repo, gen, "two")
    log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "meshwright/proposals"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert log == ["two", "one"]
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only",
                            "meshwright/proposals"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert files == ["graph.json", "policies/a.yaml"]


def test_retention_folds_old_partitions_into_the_edge_summary(cluster: WatchApiServer,
                                                              tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = datetime.now(UTC) - timedelta(hours=5)
    store = FlowStore(state, clock=lambda: old)
    lines = [_line("sleep-1", i) for i in range(30)]
    chunk = LogChunk(StreamKey("foo", "sleep-1", "istio-proxy", "u"), lines,
                     [BASE + i for i in range(30)], 2)
    store.commit(list(stream_flow_batches([chunk], ObserveOptions(workers=1), ObserveStats())),
                 Checkpoint())
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, cluster.url))
    observer = Observer(ObserverConfig(state=state, namespaces=["foo"], emit_every=None,
                                       retention=timedelta(hours=1)), threading.Event(), api)
    observer.watcher.sync()
    try:
        assert observer.emit_now() is None  # everything stored was past retention
    finally:
        api.close()
    assert observer.store.files() == []
    assert not (state / "flows" / f"dt={old:%Y-%m-%d}" / f"hour={old:%H}").exists()
    summary = json.loads((state / "edges-summary.json").read_text())
    edges = [e for e in summary["edges"]
             if "sleep" in e["source"] and "httpbin" in e["destination"]]
    assert len(edges) == 1 and edges[0]["requests"] == 30 and edges[0]["port"] == 80


@pytest.mark.parametrize(("args", "message"), [
    (["--kube"], "--kube needs --state"),
    (["--kube", "--state", "s", "-o", "f.parquet"], "give no INPUT"),
    (["--kube", "--state", "s", "-n", "a", "-A"], "exclude each other"),
    (["--kube", "--state", "s", "--listen", "nope"], "--listen"),
    (["--state", "s", "x.log", "-o", "f.parquet"], "apply to --kube"),
    (["x.log"], "-o FLOWS is required"),
])
def test_kube_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "meshwright", "observe", *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_parse_listen() -> None:
    assert parse_listen(":9090") == ("0.0.0.0", 9090)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_listen("9090")


def test_api_unavailable_at_start_is_retried(cluster: WatchApiServer, tmp_path: Path) -> None:
    lines = [_line("sleep-1", i) for i in range(50)]
    for i, text in enumerate(lines):
        cluster.log("foo", "sleep-1", "istio-proxy", BASE + i * 1000, text)
    with cluster.cond:
        cluster.outage = 10  # the first ten requests (the first lists) get no answer
    state = tmp_path / "state"
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, cluster.url))
    stop = threading.Event()
    observer = Observer(ObserverConfig(state=state, namespaces=["foo"], emit_every=None,
                                       flush_every=0.2, read_timeout=0.5, slice_seconds=0.5,
                                       backoff_base=0.05), stop, api)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(observer.run()))
    t.start()
    try:
        _wait(lambda: len(_stored(state)) >= 50, 30, "the lines")
    finally:
        stop.set()
        t.join(15)
    assert codes == [0]
    assert cluster.outage == 0
    assert sorted(r["path"] for r in _stored(state)) == sorted(
        f"/status/sleep-1/{i}" for i in range(50))
