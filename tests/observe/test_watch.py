"""observe.watch against the local list+watch API server (support.kube_watch_api): resume by
resourceVersion and bookmarks, a watch dropped mid-event, 410 Gone, the API unavailable for a
while, and a pod deleted during the gap whose IP another workload reuses."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from support import k8s_fixtures as K
from support.kube_watch_api import WatchApiServer, _kubeconfig

from learn.identity import IdentityResolver
from observe.inventory import Inventory
from observe.kube import KubeApi
from observe.watch import Backoff, InventoryWatcher, compact_object

PODS = "/api/v1/pods"
T0 = datetime(2020, 11, 25, 22, 0, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[WatchApiServer]:
    with WatchApiServer(hold_seconds=3.0) as srv:
        srv.put({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "foo"}})
        yield srv


def _watcher(srv: WatchApiServer, tmp_path: Path, **kw: Any) -> InventoryWatcher:
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp_path, srv.url))
    kw.setdefault("backoff", lambda: Backoff(base=0.01, cap=0.05, seed=7))
    kw.setdefault("clock", lambda: T0)
    kw.setdefault("timeout_seconds", 3)
    return InventoryWatcher(api, **kw)


def _owners(deploy: str) -> list[dict[str, Any]]:
    d = K.deployment(deploy, {"app": deploy}, namespace="foo")
    return [d, K.replicaset_for(d)]


def _pod(name: str, ip: str, deploy: str, started: str) -> dict[str, Any]:
    rs = _owners(deploy)[1]
    return K.pod(name, namespace="foo", ip=ip, labels=rs["spec"]["template"]["metadata"]["labels"],
                 owner=K.owner_ref("ReplicaSet", rs["metadata"]["name"]), created=started,
                 started=started)


def _watch_queries(srv: WatchApiServer, path: str) -> list[dict[str, list[str]]]:
    with srv.cond:
        return [q for p, q in srv.requests if p == path and q.get("watch")]


def test_backoff_is_bounded_jittered_and_reproducible() -> None:
    a = Backoff(base=1.0, cap=8.0, seed=42, max_failures=6)
    b = Backoff(base=1.0, cap=8.0, seed=42, max_failures=6)
    delays = [a.next_delay() for _ in range(6)]
    assert delays == [b.next_delay() for _ in range(6)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # base * 2**n, capped
    for d, c in zip(delays, ceilings, strict=True):
        assert d is not None and c / 2 <= d <= c
    assert a.next_delay() is None  # max_failures exhausted
    a.reset()
    first = a.next_delay()
    assert first is not None and 0.5 <= first <= 1.0
    assert Backoff(seed=1).next_delay() != Backoff(seed=2).next_delay()


def test_list_then_watch_resumes_from_bookmarks(server: WatchApiServer, tmp_path: Path) -> None:
    server.put(_pod("web-1", "10.44.1.5", "web", "2020-11-25T21:00:00Z"))
    w = _watcher(server, tmp_path, resources=[("Pod", "v1", "pods")], timeout_seconds=1)
    w.start()
    try:
        listed = w.resource_version("pods")
        assert listed == str(server.rv)
        server.put(_pod("web-2", "10.44.1.6", "web", "2020-11-25T21:01:00Z"))
        # An unrelated change moves the global resourceVersion: only a bookmark tells the
        # pods watch about it.
        server.put({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "bar"}})
        assert w.wait_for(lambda w: w.resource_version("pods") == str(server.rv), 5)
        assert {p.key for p in w.snapshot().pods} == {"foo/web-1", "foo/web-2"}
        first = _watch_queries(server, PODS)[0]
        assert len(_watch_queries(server, PODS)) == 1  # the bookmark came on the open watch
        assert first["resourceVersion"] == [listed]
        assert first["allowWatchBookmarks"] == ["true"]
        assert w.stats.events.get("BOOKMARK", 0) >= 1
        # The server ends the watch (timeoutSeconds); the next one starts at the bookmark.
        deadline = time.monotonic() + 3
        while len(_watch_queries(server, PODS)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _watch_queries(server, PODS)[1]["resourceVersion"] == [str(server.rv)]
        assert w.stats.lists == 1 and w.stats.reconnects == 0
    finally:
        w.stop()


def test_watch_dropped_mid_event_applies_each_event_once(server: WatchApiServer,
                                                         tmp_path: Path) -> None:
    # The first watch delivers one event, then half of the second and dies.
    w = _watcher(server, tmp_path, resources=[("Pod", "v1", "pods")])
    server.drop_watch(PODS, 1)
    w.start()
    try:
        for i in range(3):
            server.put(_pod(f"web-{i}", f"10.44.1.{10 + i}", "web", "2020-11-25T21:00:00Z"))
        assert w.wait_for(lambda w: w.resource_version("pods") == str(server.rv), 5)
        assert w.stats.reconnects == 1
        assert w.stats.events["ADDED"] == 3  # the half-sent event was not applied, then came
        assert w.stats.lists == 1  # resumed by resourceVersion, no re-list
        queries = _watch_queries(server, PODS)
        assert len(queries) == 2
        resumed = int(queries[1]["resourceVersion"][0])
        assert resumed == int(queries[0]["resourceVersion"][0]) + 1  # after the first event
        assert len(w.snapshot().pods) == 3
    finally:
        w.stop()


def test_api_unavailable_for_a_while_backs_off_then_resumes(server: WatchApiServer,
                                                            tmp_path: Path) -> None:
    delays: list[float] = []
    w = _watcher(server, tmp_path, resources=[("Pod", "v1", "pods")],
                 backoff=lambda: Backoff(base=1.0, cap=4.0, seed=3),
                 sleep=delays.append)
    server.drop_watch(PODS, 0)
    w.start()
    try:
        with server.cond:
            server.outage = 10  # the next 10 requests: connection closed, no answer
        server.put(_pod("web-1", "10.44.1.5", "web", "2020-11-25T21:00:00Z"))
        assert w.wait_for(lambda w: len(w.snapshot().pods) == 1, 5)
        reference = Backoff(base=1.0, cap=4.0, seed=3)
        assert len(delays) >= 2
        assert delays == [reference.next_delay() for _ in delays]  # deterministic, growing
        assert w.stats.reconnects == len(delays)
        assert server.outage == 0
        assert w.error is None
    finally:
        w.stop()


def test_gives_up_after_max_failures(server: WatchApiServer, tmp_path: Path) -> None:
    w = _watcher(server, tmp_path, resources=[("Pod", "v1", "pods")],
                 backoff=lambda: Backoff(base=0.01, seed=1, max_failures=2), sleep=lambda s: None)
    server.drop_watch(PODS, 0)
    w.start()
    with server.cond:
        server.outage = 1000
    try:
        assert w.wait_for(lambda w: w.error is not None, 10)
        assert w.error is not None and "giving up after 2 failures" in w.error.message
    finally:
        with server.cond:
            server.outage = 0
        w.stop()


def test_410_relist_ends_vanished_pod_at_reuse_and_identity_resolves_by_time(
        server: WatchApiServer, tmp_path: Path) -> None:
    for deploy in ("httpbin-a", "sleep", "other"):
        for obj in _owners(deploy):
            server.put(obj)
    server.put(_pod("httpbin-a-1", "10.44.1.27", "httpbin-a", "2020-11-25T21:00:00Z"))
    server.put(_pod("sleep-1", "10.44.1.23", "sleep", "2020-11-25T21:00:00Z"))
    gate = threading.Event()
    waits: list[float] = []

    def sleep(delay: float) -> None:
        waits.append(delay)
        gate.wait(5)

    w = _watcher(server, tmp_path, sleep=sleep, timeout_seconds=1, resources=[
        ("Pod", "v1", "pods"), ("ReplicaSet", "apps/v1", "replicasets"),
        ("Deployment", "apps/v1", "deployments")])
    server.drop_watch(PODS, 0)  # the watch dies at once; the watcher sleeps on the gate
    w.start()
    try:
        assert w.wait_for(lambda w: w.stats.reconnects == 1, 5)
        # While the watch is down: the pod is deleted, another workload gets its IP, and
        # etcd compacts the history.
        server.delete("Pod", "foo", "httpbin-a-1")
        server.put(_pod("other-1", "10.44.1.27", "other", "2020-11-25T21:31:00Z"))
        server.compact()
        gate.set()
        # The pods watch resumes below the compaction point: 410, list again. (The owners'
        # watches may have been carried past it by bookmarks, or list again too.)
        assert w.wait_for(lambda w: w.stats.vanished == 1, 5)
        assert w.stats.gone >= 1
        with server.cond:
            pod_lists = [q for p, q in server.requests if p == PODS and not q.get("watch")]
        assert len(pod_lists) == 2
        inv = w.snapshot()
    finally:
        w.stop()
    by_name = {p.name: p for p in inv.pods}
    # Ended where the reusing pod started (21:31), not at the re-list (clock: 22:00).
    assert by_name["httpbin-a-1"].ended == datetime(2020, 11, 25, 21, 31, tzinfo=UTC)
    assert by_name["other-1"].ended is None
    resolver = IdentityResolver(inv)
    t = pa.array([datetime(2020, 11, 25, 21, 26, 18), datetime(2020, 11, 25, 21, 40)],
                 type=pa.timestamp("us", tz="UTC"))
    batch = pa.record_batch({
        "time": t, "direction": pa.array(["outbound"] * 2),
        "reporter": pa.array(["foo/sleep-1"] * 2),
        "src_ip": pa.array(["10.44.1.23"] * 2), "dst_ip": pa.array(["10.44.1.27"] * 2),
        "dst_port": pa.array([80, 80], type=pa.int32()),
    })
    out = resolver.resolve(batch)
    assert out.column("src_workload").to_pylist() == ["foo/sleep", "foo/sleep"]
    assert out.column("dst_workload").to_pylist() == ["foo/httpbin-a", "foo/other"]


def test_namespaced_scope_watches_only_that_namespace(server: WatchApiServer,
                                                      tmp_path: Path) -> None:
    server.put({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "bar"}})
    server.put(_pod("web-1", "10.44.1.5", "web", "2020-11-25T21:00:00Z"))
    other = K.pod("x-1", namespace="bar", ip="10.44.2.1")
    server.put(other)
    w = _watcher(server, tmp_path, namespaces=["foo"],
                 resources=[("Namespace", "v1", "namespaces"), ("Pod", "v1", "pods")])
    w.start()
    try:
        server.put(K.pod("x-2", namespace="bar", ip="10.44.2.2"))
        server.put(_pod("web-2", "10.44.1.6", "web", "2020-11-25T21:00:00Z"))
        assert w.wait_for(lambda w: len(w.snapshot().pods) == 2, 5)
        inv = w.snapshot()
        assert {p.key for p in inv.pods} == {"foo/web-1", "foo/web-2"}
        assert set(inv.namespaces) == {"foo"}
        assert any(p == "/api/v1/namespaces/foo/pods" for p, _ in server.requests)
    finally:
        w.stop()


# -- the inventory for a checkpoint -------------------------------------------------------------
ROOT = Path(__file__).parents[2]


def _real_objects() -> list[dict[str, Any]]:
    """Every non-pod object of the real manifests in tests/data/inventory and of the
    shipped Bookinfo inventory (kubectl get -o json)."""
    out: list[dict[str, Any]] = []
    for f in sorted((ROOT / "tests" / "data" / "inventory").iterdir()):
        out += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
    out += json.loads((ROOT / "samples" / "bookinfo" / "inventory.json").read_text())["items"]
    # istioctl kube-inject output with a native sidecar whose probe Istio rewrote (the
    # original in ISTIO_KUBE_APP_PROBERS), as the template of a Deployment.
    injected = (ROOT / "tests" / "data" / "inventory"
                / "istio-kube-inject-native-sidecar.yaml.injected")
    pod = next(d for d in yaml.safe_load_all(injected.read_text()) if d and d["kind"] == "Pod")
    meta = pod["metadata"]
    out.append({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "hello-injected", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "hello-injected"}},
                         "template": {"metadata": {"labels": {"app": "hello-injected"},
                                                   "annotations": meta.get("annotations")},
                                      "spec": pod["spec"]}}})
    return [o for o in out if o.get("kind") not in (None, "Pod")]


def test_compact_objects_convert_exactly_like_the_full_ones() -> None:
    objects = _real_objects()
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Service", "ServiceAccount", "Deployment", "ReplicaSet", "Job",
            "CronJob"} <= kinds
    pods = [o for o in json.loads((ROOT / "samples" / "bookinfo" / "inventory.json")
                                  .read_text())["items"] if o["kind"] == "Pod"]
    full, small = Inventory(), Inventory()
    for obj in objects:
        full.add_object(obj)
        small.add_object(compact_object(obj))
    for pod in pods:  # pods hang off the owners: their workloads must come out the same
        full.add_object(pod)
        small.add_object(pod)
    assert small.workloads == full.workloads
    assert small.services == full.services
    assert small.namespaces == full.namespaces
    assert small.service_accounts == full.service_accounts
    assert small.snapshot_time == full.snapshot_time
    assert small.stats.invalid == full.stats.invalid == 0
    # Istio's rewritten probe still maps to the app's own port (ISTIO_KUBE_APP_PROBERS kept),
    # and what is not read goes.
    hello = small.workloads[("default", "Deployment", "hello-injected")]
    assert [(p.container, p.port, p.kind) for p in hello.probes] == [
        ("other-sidecar", 3333, "readiness")]
    compact = [compact_object(o) for o in objects]
    assert all("status" not in o and "managedFields" not in o["metadata"] for o in compact)
    assert len(json.dumps(compact)) < 0.6 * len(json.dumps(objects))


def test_compact_object_keeps_an_odd_object_whole() -> None:
    odd = {"kind": "Service", "apiVersion": "v1", "metadata": {
        "name": "x", "namespace": "foo", "managedFields": [{"manager": "kubectl"}]},
        "spec": {"ports": ["not a port"]}}
    kept = compact_object(odd)
    assert kept["spec"] == odd["spec"] and "managedFields" not in kept["metadata"]
    full, small = Inventory(), Inventory()
    full.add_object(odd)
    small.add_object(kept)
    assert small.stats.invalid == full.stats.invalid == 1  # judged the same way


def test_watcher_resumes_from_its_inventory_state(server: WatchApiServer,
                                                  tmp_path: Path) -> None:
    resources = [("Service", "v1", "services"), ("ServiceAccount", "v1", "serviceaccounts")]
    server.put(K.service("web", {"app": "web"}, [{"port": 80}], cluster_ip="10.0.0.8",
                         namespace="foo"))
    server.put({"kind": "ServiceAccount", "apiVersion": "v1",
                "metadata": {"name": "web", "namespace": "foo"}})
    w = _watcher(server, tmp_path, resources=resources)
    w.start()
    try:
        server.delete("ServiceAccount", "foo", "web")  # seen live: DELETED
        assert w.wait_for(lambda w: w.resource_version("serviceaccounts") == str(server.rv), 5)
        rvs, objects = w.inventory_state()
    finally:
        w.stop()
    assert set(rvs) == {("services", None), ("serviceaccounts", None)}
    assert rvs[("serviceaccounts", None)] == str(server.rv)
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert by_name[("ServiceAccount", "web")]["metadata"]["deletionTimestamp"] == (
        "2020-11-25T22:00:00Z")  # the watcher's clock when it saw the deletion
    assert "deletionTimestamp" not in by_name[("Service", "web")]["metadata"]
    # Deleted objects past retention are left out from then on.
    assert len(w.inventory_state(forget_deleted_before=datetime(2021, 1, 1, tzinfo=UTC))[1]) == 1

    # Resumed from that state: no list; a change made meanwhile comes through the watch.
    server.put(K.service("web", {"app": "web2"}, [{"port": 81}], cluster_ip="10.0.0.8",
                         namespace="foo"))
    again = _watcher(server, tmp_path, resources=resources, resource_versions=rvs,
                     objects=objects)
    assert ("foo", "web") in again.snapshot().service_accounts  # seeded, kept deleted
    again.start()
    try:
        assert again.wait_for(
            lambda w: w.snapshot().services[("foo", "web")].selector == {"app": "web2"}, 5)
        assert again.stats.lists == 0
        _, objects2 = again.inventory_state()
    finally:
        again.stop()
    svc = next(o for o in objects2 if o["kind"] == "Service")
    assert svc["spec"]["selector"] == {"app": "web2"}

    # Resumed below the compaction point: 410, listed, the vanished object marked deleted.
    server.delete("Service", "foo", "web")
    server.compact()
    third = _watcher(server, tmp_path, resources=resources,
                     resource_versions=again.resource_versions(), objects=objects2)
    third.start()
    try:
        assert third.wait_for(lambda w: w.stats.lists == 2, 5)
        _, objects3 = third.inventory_state()
    finally:
        third.stop()
    assert third.stats.gone == 2 and third.stats.vanished_objects == 1
    svc = next(o for o in objects3 if o["kind"] == "Service")
    assert svc["metadata"]["deletionTimestamp"] == "2020-11-25T22:00:00Z"
