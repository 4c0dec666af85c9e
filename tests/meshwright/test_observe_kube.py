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
from support import k8s_fixtures as K
from support.kube_watch_api import WatchApiServer, _kubeconfig
from support.observer_harness import wait as _wait

from meshwright.observer import (
    EMIT_STOP_SECONDS,
    Observer,
    ObserverConfig,
    git_commit,
    parse_listen,
)
from observe.kube import KubeApi
from observe.logstream import LogChunk, StreamKey
from observe.pipeline import ObserveOptions, ObserveStats
from observe.state import Checkpoint, FlowStore
from observe.streamflows import stream_flow_batches

ROOT = Path(__file__).parents[2]
DATA = ROOT / "tests" / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"
OUTBOUND = DATA.read_text().splitlines()[0]
BASE = 1_606_339_578_000_000_000  # 2020-11-25T21:26:18Z, the line's own second


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


# -- the whole inventory from the checkpoint ---------------------------------------------------
def _scope_paths() -> dict[tuple[str, str | None], str]:
    """(resource, namespace) of every watch with ``-n foo`` -> its list/watch path."""
    from observe.kube import resource_path
    from observe.watch import WATCHED

    out: dict[tuple[str, str | None], str] = {}
    for kind, group, resource in WATCHED:
        ns = "foo"
        out[(resource, ns)] = (resource_path(group, resource) if kind == "Namespace"
                               else resource_path(group, resource, ns))
    return out


def _observe_once(srv: WatchApiServer, tmp_path: Path, state: Path,
                  until: Callable[[Observer], bool], what: str) -> tuple[Observer, int]:
    """Run an observer in-process until ``until(observer)``, stop it (the final commit saves
    the inventory); returns it and where the server's request log stood at its start."""
    with srv.cond:
        before = len(srv.requests)
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, srv.url))
    stop = threading.Event()
    observer = Observer(ObserverConfig(state=state, namespaces=["foo"], emit_every=None,
                                       flush_every=0.2, read_timeout=0.5, slice_seconds=0.5,
                                       backoff_base=0.05), stop, api)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(observer.run()))
    t.start()
    try:
        _wait(lambda: until(observer), 20, what)
    finally:
        stop.set()
        t.join(15)
    assert codes == [0]
    return observer, before


def _since(srv: WatchApiServer, before: int) -> list[tuple[str, dict[str, list[str]]]]:
    with srv.cond:
        return [(p, q) for p, q in srv.requests[before:] if not p.endswith("/log")]


def _web(srv: WatchApiServer) -> None:
    deploy = K.deployment("web", {"app": "web"}, namespace="foo", service_account="web")
    srv.put(deploy)
    srv.put(K.replicaset_for(deploy))
    srv.put(K.service("web", {"app": "web"}, [{"name": "http", "port": 80, "protocol": "TCP",
                                               "targetPort": 8080}],
                      cluster_ip="10.0.0.80", namespace="foo"))
    srv.put({"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "web", "namespace": "foo", "uid": "sa-web"}})


def _all_synced(o: Observer) -> bool:
    """Every watch listed (or resumed), and the loop committing."""
    return (len(o.watcher.resource_versions()) == len(_scope_paths())
            and o.store.checkpoint.seq >= 1)


def test_restart_restores_the_whole_inventory_and_resumes_every_watch(
        cluster: WatchApiServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _web(cluster)
    _observe_once(cluster, tmp_path, state, _all_synced, "the first lists")
    saved = FlowStore(state).checkpoint
    assert saved.inventory_version == 2
    assert set(saved.resource_versions) == set(_scope_paths())
    kinds = Counter(o["kind"] for o in saved.objects)
    assert kinds == {"Namespace": 1, "Service": 1, "ServiceAccount": 1, "Deployment": 1,
                     "ReplicaSet": 1}
    assert all("managedFields" not in o["metadata"] and "status" not in o
               for o in saved.objects)

    # While meshwright is down: the Service changes port and selector, the Deployment its
    # service account, the ServiceAccount and a pod are deleted, a Service appears.
    svc = K.service("web", {"app": "web", "tier": "front"},
                    [{"name": "http", "port": 81, "protocol": "TCP", "targetPort": 8081}],
                    cluster_ip="10.0.0.80", namespace="foo")
    cluster.put(svc)
    cluster.put(K.deployment("web", {"app": "web"}, namespace="foo", service_account="web-v2"))
    cluster.delete("ServiceAccount", "foo", "web")
    cluster.delete("Pod", "foo", "httpbin-1")
    cluster.remove_log("foo", "httpbin-1")
    cluster.put(K.service("new", {"app": "new"}, [{"port": 90, "protocol": "TCP"}],
                          cluster_ip="10.0.0.90", namespace="foo"))
    final_rv = cluster.rv

    def caught_up(o: Observer) -> bool:
        rvs = o.watcher.resource_versions()
        return (len(rvs) == len(_scope_paths()) and all(int(rv) >= final_rv
                                                        for rv in rvs.values())
                and o.store.checkpoint.seq > seq)

    seq = FlowStore(state).checkpoint.seq

    observer, before = _observe_once(cluster, tmp_path, state, caught_up, "the watches")
    requests = _since(cluster, before)
    # Nothing listed: every watch resumed from the resourceVersion it had saved.
    assert [p for p, q in requests if not q.get("watch")] == []
    paths = _scope_paths()
    for scope, rv in saved.resource_versions.items():
        first = next(q for p, q in requests if p == paths[scope] and q.get("watch"))
        assert first["resourceVersion"] == [rv], scope
    assert observer.watcher.stats.lists == 0
    inv = observer.watcher.snapshot()
    web = inv.services[("foo", "web")]
    assert (web.selector, [(p.port, p.target_port) for p in web.ports]) == (
        {"app": "web", "tier": "front"}, [(81, 8081)])
    assert ("foo", "new") in inv.services
    assert inv.workloads[("foo", "Deployment", "web")].service_account == "web-v2"
    assert {p.name: p.ended is not None for p in inv.pods}["httpbin-1"]
    assert ("foo", "web") in inv.service_accounts  # kept: older flows may refer to it
    # Saved again: the deleted ServiceAccount marked deleted, the rest as they are now.
    again = {(o["kind"], o["metadata"]["name"]): o for o in FlowStore(state).checkpoint.objects}
    assert again[("ServiceAccount", "web")]["metadata"].get("deletionTimestamp")
    assert again[("Service", "web")]["spec"]["selector"] == {"app": "web", "tier": "front"}
    assert not again[("Service", "new")]["metadata"].get("deletionTimestamp")

    # Down again, and etcd compacts the history meanwhile: 410 on every watch, each scope is
    # listed once; what vanished (a Service, a pod) is marked deleted / ended.
    cluster.delete("Service", "foo", "new")
    cluster.delete("Pod", "foo", "sleep-2")
    cluster.remove_log("foo", "sleep-2")
    cluster.compact()
    seq = FlowStore(state).checkpoint.seq
    observer, before = _observe_once(cluster, tmp_path, state, lambda o: (
        o.watcher.stats.lists == len(paths) and o.store.checkpoint.seq > seq),
        "the lists after 410")
    lists = sorted(p for p, q in _since(cluster, before) if not q.get("watch"))
    assert lists == sorted(paths.values())
    assert observer.watcher.stats.gone == len(paths)
    assert observer.watcher.stats.vanished == 1  # sleep-2
    assert observer.watcher.stats.vanished_objects == 1  # the Service "new"
    again = {(o["kind"], o["metadata"]["name"]): o for o in FlowStore(state).checkpoint.objects}
    assert again[("Service", "new")]["metadata"].get("deletionTimestamp")
    assert not again[("Service", "web")]["metadata"].get("deletionTimestamp")


def test_restart_from_an_old_checkpoint_lists_the_kinds_it_lacks(cluster: WatchApiServer,
                                                                 tmp_path: Path) -> None:
    state = tmp_path / "state"
    _web(cluster)
    _observe_once(cluster, tmp_path, state, _all_synced, "the first lists")
    # Rewrite the inventory file as version 1 wrote it: pods and every resourceVersion, no
    # version, no other objects.
    ckpt = FlowStore(state).checkpoint
    assert ckpt.pods_file is not None
    inv_file = state / ckpt.pods_file
    doc = json.loads(inv_file.read_text())
    old = {"resource_versions": doc["resource_versions"], "pods": doc["pods"]}
    inv_file.write_text(json.dumps(old))
    loaded = FlowStore(state).checkpoint
    assert (loaded.inventory_version, loaded.objects) == (1, [])
    assert loaded.resource_versions == ckpt.resource_versions
    observer, before = _observe_once(cluster, tmp_path, state, _all_synced, "the lists")
    requests = _since(cluster, before)
    paths = _scope_paths()
    listed = sorted(p for p, q in requests if not q.get("watch"))
    assert listed == sorted(v for k, v in paths.items() if k[0] != "pods")
    pod_watch = next(q for p, q in requests if p == paths[("pods", "foo")])
    assert pod_watch["resourceVersion"] == [ckpt.resource_versions[("pods", "foo")]]
    inv = observer.watcher.snapshot()
    assert ("foo", "web") in inv.services
    assert FlowStore(state).checkpoint.inventory_version == 2  # saved in the new form


# -- re-learning in the background ---------------------------------------------------------------
#: Rows stored before the observer starts: learning from them takes seconds.
BIG_STORE = 300_000


def _fill_store(state: Path, rows: int) -> None:
    store = FlowStore(state)
    key = StreamKey("foo", "sleep-2", "istio-proxy", "uid-old")
    for start in range(0, rows, 100_000):
        lines = [_line("sleep-2", i) for i in range(start, min(rows, start + 100_000))]
        chunk = LogChunk(key, lines, [BASE + i for i in range(start, start + len(lines))],
                         start + 1)
        store.commit(list(stream_flow_batches([chunk], ObserveOptions(workers=2),
                                              ObserveStats())), Checkpoint())


def _metric_values(port: int) -> dict[str, float]:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}


def _rows_upto(state: Path, seq: int) -> int:
    """Rows in the flow files made of parts up to ``seq``."""
    total = 0
    for f in (state / "flows").rglob("*.parquet"):
        if f.name.startswith("."):
            continue
        last = int(f.stem.rsplit("-", 1)[1])  # part-<seq> or compact-<lo>-<hi>
        if last <= seq:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def test_emit_runs_in_the_background_while_lines_keep_being_committed(
        cluster: WatchApiServer, tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    state, log = tmp_path / "state", tmp_path / "observer.log"
    _fill_store(state, BIG_STORE)
    writer, _ = _writer(cluster, ["sleep-1"], 200_000, 100, 0.05)  # ~2,000 lines/s throughout
    writer.start()
    port = _free_port()
    # Emits due every 0.5 s: each takes longer (300,000 rows to learn from), so they run back
    # to back and the ones due meanwhile are skipped.
    proc = _start(state, kubeconfig, log, "--emit-every", "0.5s", "--listen",
                  f"127.0.0.1:{port}")
    samples: list[tuple[float, dict[str, float], int]] = []
    try:
        _wait(lambda: log.exists() and _started(log) == 1, 30, "the observer")

        def sample() -> dict[str, float]:
            m = _metric_values(port)
            samples.append((time.monotonic(), m, _get(f"http://127.0.0.1:{port}/healthz")[0]))
            return m

        _wait(lambda: sample()["meshwright_emits_total"] >= 1, 120, "a proposal")
        _wait(lambda: sample()["meshwright_emits_total"] >= 2, 120, "a second proposal")
        # SIGTERM while an emit is learning (some way into it): it is left at once (or ends,
        # if it was publishing by then) within the grace period.
        typical = sample()["meshwright_emit_last_duration_seconds"]

        def learning() -> bool:
            if sample()["meshwright_emit_running"] != 1:
                return False
            ended = samples[-1][1]["meshwright_emit_duration_seconds_count"]
            time.sleep(0.4 * typical)
            m = sample()
            return (m["meshwright_emit_running"] == 1
                    and m["meshwright_emit_duration_seconds_count"] == ended)

        _wait(learning, 60, "an emit some way in")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(EMIT_STOP_SECONDS + 10)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()
               if line.startswith("{")]
    started = [r for r in records if r["message"] == "emit started"]
    published = [r for r in records if r["message"] == "proposal published"]
    assert len(started) >= 3 and len(published) >= 2

    # Lines were committed while the first emit ran: the checkpoint moved on and rows grew
    # between samples that both saw it running; /healthz said ok all along.
    first_end = next(i for i, (_, m, _) in enumerate(samples) if m["meshwright_emits_total"])
    during = [m for _, m, _ in samples[:first_end] if m["meshwright_emit_running"] == 1]
    assert len(during) >= 2
    assert during[-1]["meshwright_checkpoint_seq"] >= during[0]["meshwright_checkpoint_seq"] + 2
    assert during[-1]["meshwright_flows_total"] > during[0]["meshwright_flows_total"]
    assert all(status == 200 for _, _, status in samples)
    last = samples[-1][1]
    assert last["meshwright_emit_skipped_total"] >= 1
    assert last["meshwright_emit_duration_seconds_count"] >= 2
    assert last["meshwright_emit_duration_seconds_sum"] > 0
    assert last["meshwright_emit_errors_total"] == 0

    # The last proposal is whole: every file, and the graph counts exactly the rows committed
    # up to the seq its emit started from (the big store's and the streamed ones).
    final = published[-1]
    gen = state / "emit" / final["generation"]
    assert final["rows"] == _rows_upto(state, final["seq"]) > BIG_STORE
    for name in ("graph.json", "findings.json", "findings.sarif", "report.md"):
        assert (gen / name).is_file(), name
    assert any((gen / "policies").rglob("*.yaml"))
    graph = json.loads((gen / "graph.json").read_text())
    assert sum(e["requests"] for e in graph["edges"]
               if "sleep" in e["source"] and "httpbin" in e["destination"]) == final["rows"]

    # The emit running at SIGTERM: left at once (or finished its publishing), its process
    # gone, nothing half-published, nothing left behind.
    assert took < EMIT_STOP_SECONDS
    assert any(r["message"] in ("emit abandoned (stopping); nothing half-published",
                                "proposal published") and r["seq"] == started[-1]["seq"]
               for r in records), [r for r in records if "emit" in r["message"]
                                   or "proposal" in r["message"] or r["level"] != "info"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(started[-1]["pid"]), 0)
    current = (state / "current").resolve()
    assert all((current / name).exists() for name in ("graph.json", "report.md", "policies"))
    assert [p.name for p in (state / "emit").iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in state.iterdir() if p.name.startswith((".learn", ".emit-job"))] == []
