"""learn.identity: time-aware address resolution, Service VIPs, selectors, principals."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from support import k8s_fixtures as K

from learn.identity import IdentityResolver
from observe.inventory import Inventory, load_inventory
from observe.schema import FLOW_SCHEMA, conform

DATA = Path(__file__).parents[1] / "data" / "inventory"
BOOKINFO = DATA / "istio-samples-bookinfo.yaml"
BOUTIQUE = DATA / "online-boutique-kubernetes-manifests.yaml"




def _ts(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2024-05-01T{hhmm}:00+00:00").astimezone(UTC)


def _batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    keys = [f.name for f in FLOW_SCHEMA if any(f.name in row for row in rows)]
    return conform(pa.Table.from_pylist(rows, schema=pa.schema(
        [FLOW_SCHEMA.field(k) for k in keys])))


def _bookinfo_cluster(tmp_path: Path, extra: list[dict[str, Any]] | None = None) -> Inventory:
    """Bookinfo manifests plus a kubectl List with pods synthesized for its deployments."""
    docs = {d["metadata"]["name"]: d for d in K.load_yaml_docs(BOOKINFO)
            if d["kind"] == "Deployment"}
    pods = []
    for i, name in enumerate(sorted(docs)):
        pods += K.pods_for(docs[name], [f"10.244.0.{10 + i}"], created="2024-05-01T09:00:00Z")
    items = pods + [
        K.service(s, {"app": s}, [{"name": "http", "port": 9080, "protocol": "TCP",
                                   "targetPort": 9080}], cluster_ip=f"10.96.0.{20 + i}")
        for i, s in enumerate(["details", "productpage", "ratings", "reviews"])
    ] + (extra or [])
    dump = tmp_path / "cluster.json"
    dump.write_text(json.dumps(K.k8s_list(items)), encoding="utf-8")
    return load_inventory([BOOKINFO, dump])


def _pod_name(inv: Inventory, workload: str) -> str:
    return next(p.key for p in inv.pods if p.workload[1] == workload)


def test_reporter_side_exact_and_peer_by_ip(tmp_path: Path) -> None:
    inv = _bookinfo_cluster(tmp_path)
    r = IdentityResolver(inv)
    reviews = _pod_name(inv, "reviews-v1")
    productpage_ip = next(p.ips[0] for p in inv.pods if p.workload[1] == "productpage-v1")
    out = r.resolve(_batch([{
        "time": _ts("10:00"), "direction": "inbound", "reporter": reviews,
        # the server address as logged is irrelevant to the reporter side
        "src_ip": productpage_ip, "dst_ip": "10.244.0.99", "dst_port": 9080,
    }]))
    row = out.to_pylist()[0]
    assert row["dst_workload"] == "default/reviews-v1" and row["dst_pod"] == reviews
    assert row["src_workload"] == "default/productpage-v1"
    assert row["src_pod"] == _pod_name(inv, "productpage-v1")
    assert out.schema.names == FLOW_SCHEMA.names  # resolved batches keep the flow schema



def _reused_ip_resolver(tmp_path: Path) -> tuple[IdentityResolver, str, str]:
    """10.244.5.5 is ratings-v1's from 10:00 to 10:30, then details-v1's from 10:40;
    returns the resolver and the two pods' names."""
    docs = {d["metadata"]["name"]: d for d in K.load_yaml_docs(BOOKINFO)
            if d["kind"] == "Deployment"}
    a = K.pods_for(docs["ratings-v1"], ["10.244.5.5"], created="2024-05-01T10:00:00Z",
                   deleted="2024-05-01T10:30:00Z")
    b = K.pods_for(docs["details-v1"], ["10.244.5.5"], created="2024-05-01T10:40:00Z")
    resolver = IdentityResolver(load_inventory([BOOKINFO, _dump(tmp_path, a + b)]))
    return resolver, a[0]["metadata"]["name"], b[0]["metadata"]["name"]


def test_ip_reuse_resolved_by_time(tmp_path: Path) -> None:
    r, ratings_pod, details_pod = _reused_ip_resolver(tmp_path)
    rows = [{"time": _ts(t), "direction": "unknown", "src_ip": "10.244.5.5",
             "dst_ip": "10.244.5.5", "dst_port": 9080} for t in ("10:10", "10:50", "10:35")]
    out = r.resolve(_batch(rows)).to_pylist()
    assert [o["src_workload"] for o in out] == ["default/ratings-v1", "default/details-v1",
                                                "unknown:10.244.5.5"]
    assert out[0]["src_pod"] == f"default/{ratings_pod}"
    assert out[1]["dst_pod"] == f"default/{details_pod}"
    assert any("10.244.5.5" in m and "outside the lifetimes" in m for m in r.ambiguities)


def _dump(tmp_path: Path, items: list[dict[str, Any]], name: str = "pods.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(K.k8s_list(items)), encoding="utf-8")
    return path


def test_overlapping_leases_use_principal(tmp_path: Path) -> None:
    docs = {d["metadata"]["name"]: d for d in K.load_yaml_docs(BOOKINFO)
            if d["kind"] == "Deployment"}
    # No lifetimes overlap in reality, but a stale dump can say so: time cannot decide.
    a = K.pods_for(docs["ratings-v1"], ["10.244.6.6"], created="2024-05-01T10:00:00Z")
    b = K.pods_for(docs["details-v1"], ["10.244.6.6"], created="2024-05-01T10:20:00Z")
    inv = load_inventory([BOOKINFO, _dump(tmp_path, a + b)])
    r = IdentityResolver(inv)
    out = r.resolve(_batch([
        {"time": _ts("10:30"), "src_ip": "10.244.6.6", "dst_ip": "10.96.9.9",
         "src_principal": "cluster.local/ns/default/sa/bookinfo-details"},
        {"time": _ts("10:30"), "src_ip": "10.244.6.6", "dst_ip": "10.96.9.9"},
    ])).to_pylist()
    assert out[0]["src_workload"] == "default/details-v1"
    assert out[1]["src_workload"] == "unknown:10.244.6.6"
    assert any("several pods could own it" in m for m in r.ambiguities)
    assert any("by its principal" in m for m in r.inferred)


def test_log_leases_for_pod_missing_from_inventory(tmp_path: Path) -> None:
    inv = _bookinfo_cluster(tmp_path)
    r = IdentityResolver(inv)
    gone = "default/reviews-v2-7d9bk5zq2-h8x4t"  # deleted before the snapshot
    lease_rows = [
        {"time": _ts("10:00"), "direction": "inbound", "reporter": gone,
         "src_ip": "10.244.0.12", "dst_ip": "10.244.7.7", "dst_port": 9080},
        {"time": _ts("10:05"), "direction": "outbound", "reporter": gone,
         "src_ip": "10.244.7.7", "dst_ip": "10.244.0.11", "dst_port": 9080},
    ]
    r.learn_leases(_batch(lease_rows).select(["time", "direction", "reporter", "src_ip",
                                              "dst_ip"]))
    out = r.resolve(_batch([
        # productpage's outbound record reaching the vanished pod by its IP
        {"time": _ts("10:03"), "direction": "outbound",
         "reporter": _pod_name(inv, "productpage-v1"), "src_ip": "10.244.0.12",
         "dst_ip": "10.244.7.7", "dst_port": 9080},
        *lease_rows,
    ])).to_pylist()
    assert out[0]["dst_workload"] == "default/reviews-v2" and out[0]["dst_pod"] == gone
    assert out[1]["dst_workload"] == "default/reviews-v2"
    assert out[2]["src_workload"] == "default/reviews-v2"
    assert any(gone in m and "inferred from its name" in m for m in r.inferred)
    node = r.node("default/reviews-v2")
    assert node.in_inventory and node.kind == "Deployment"


def test_unknown_reporter_without_inventory_workload(tmp_path: Path) -> None:
    r = IdentityResolver(Inventory())
    out = r.resolve(_batch([{"time": _ts("10:00"), "direction": "inbound",
                             "reporter": "shop/cart-5f7b9d6c4-x7k2q", "src_ip": "10.1.2.3",
                             "dst_ip": "10.1.2.4"}])).to_pylist()
    assert out[0]["dst_workload"] == "shop/cart"
    assert out[0]["src_workload"] == "unknown:10.1.2.3"
    node = r.node("shop/cart")
    assert not node.in_inventory and node.kind == "Deployment" and node.meshed is True
    assert any("not in the inventory either" in m for m in r.inferred)


def test_host_network_node_ip(tmp_path: Path) -> None:
    agent = K.pod("node-agent-x7k2q", namespace="kube-system", ip="10.0.0.11",
                  labels={"name": "node-agent"}, owner=K.owner_ref("DaemonSet", "node-agent"),
                  host_network=True, meshed=False, host_ip="10.0.0.11")
    inv = _bookinfo_cluster(tmp_path, [agent])
    r = IdentityResolver(inv)
    out = r.resolve(_batch([
        {"time": _ts("10:00"), "direction": "inbound",
         "reporter": _pod_name(inv, "details-v1"), "src_ip": "10.0.0.11",
         "dst_ip": "10.244.0.10", "dst_port": 9080},
        {"time": _ts("10:00"), "direction": "outbound", "reporter": "kube-system/node-agent-x7k2q",
         "src_ip": "10.0.0.11", "dst_ip": "10.244.0.10", "dst_port": 9080},
    ])).to_pylist()
    assert out[0]["src_workload"] == "unknown:10.0.0.11" and out[0]["src_pod"] is None
    assert any("10.0.0.11 is a node address" in m and "kube-system/node-agent-x7k2q" in m
               for m in r.ambiguities)
    # the host-network pod is attributed only when it reported the record itself
    assert out[1]["src_workload"] == "kube-system/node-agent"


@pytest.mark.parametrize(("row", "expected"), [
    ({"dst_ip": "93.184.216.34"}, "external:93.184.216.34"),
    ({"dst_ip": "93.184.216.34", "service_host": "example.com"}, "external:example.com"),
    ({"dst_ip": "140.82.112.3", "upstream_cluster": "PassthroughCluster",
      "authority": "api.github.com:443"}, "external:api.github.com"),
    ({"dst_ip": "140.82.112.3", "upstream_cluster": "PassthroughCluster",
      "sni": "api.github.com"}, "external:api.github.com"),
    ({"dst_ip": "140.82.112.3", "authority": "api.github.com"}, "external:140.82.112.3"),
    ({"dst_ip": None, "upstream_cluster": "BlackHoleCluster", "service_host": "evil.example"},
     "external:evil.example"),
    ({"dst_ip": "10.99.0.1"}, "unknown:10.99.0.1"),
    ({"dst_ip": "100.64.3.2"}, "unknown:100.64.3.2"),
    ({"dst_ip": "169.254.169.254"}, "unknown:169.254.169.254"),
    ({"dst_ip": "fd00::5"}, "unknown:fd00::5"),
    ({"dst_ip": "2606:4700::1111"}, "external:2606:4700::1111"),
])
def test_external_vs_unknown(row: dict[str, Any], expected: str) -> None:
    r = IdentityResolver(Inventory())
    base = {"time": _ts("10:00"), "direction": "unknown", "src_ip": "10.1.1.1",
            "dst_ip": None, "service_host": None, "upstream_cluster": None, "authority": None,
            "sni": None}
    out = r.resolve(_batch([{**base, **row}])).to_pylist()
    assert out[0]["dst_workload"] == expected


def test_service_vip_maps_to_target_port_and_workload() -> None:
    inv = load_inventory([BOUTIQUE])
    # manifests have no ClusterIPs: give emailservice the one a cluster would have
    email = inv.services[("default", "emailservice")]
    email.cluster_ips = ("10.96.0.50",)
    r = IdentityResolver(inv)
    out = r.resolve(_batch([
        {"time": _ts("10:00"), "direction": "unknown", "src_ip": "10.244.0.9",
         "dst_ip": "10.96.0.50", "dst_port": 5000},
        {"time": _ts("10:00"), "direction": "outbound", "src_ip": "10.244.0.9",
         "dst_ip": None, "dst_port": None, "dialed_ip": "10.96.0.50", "dialed_port": 5000},
    ])).to_pylist()
    assert [(o["dst_workload"], o["dst_port"]) for o in out] == [
        ("default/emailservice", 8080), ("default/emailservice", 8080)]
    assert r.ambiguities == []


def test_service_vip_with_several_workloads(tmp_path: Path) -> None:
    inv = _bookinfo_cluster(tmp_path)
    r = IdentityResolver(inv)
    out = r.resolve(_batch([
        {"time": _ts("10:00"), "direction": "outbound",
         "reporter": _pod_name(inv, "productpage-v1"), "src_ip": "10.244.0.11",
         "dst_ip": "10.96.0.23", "dst_port": 9080},
        {"time": _ts("10:00"), "direction": "outbound",
         "reporter": _pod_name(inv, "productpage-v1"), "src_ip": "10.244.0.11",
         "dst_ip": "10.96.0.20", "dst_port": 9080},
    ])).to_pylist()
    assert out[0]["dst_workload"] == "service:default/reviews"
    assert out[1]["dst_workload"] == "default/details-v1"
    assert out[0]["dst_port"] == 9080 and out[0]["dst_pod"] is None
    assert any("service default/reviews backed by 3 workloads" in m for m in r.ambiguities)
    node = r.node("service:default/reviews")
    assert node.kind == "Service" and node.selector == {"app": "reviews"}
    assert node.services == ["default/reviews"]


def test_service_by_fqdn_when_no_address(tmp_path: Path) -> None:
    r = IdentityResolver(_bookinfo_cluster(tmp_path))
    out = r.resolve(_batch([{"time": _ts("10:00"), "direction": "outbound",
                             "src_ip": "10.244.0.11", "dst_ip": None,
                             "service_host": "ratings.default.svc.cluster.local"}])).to_pylist()
    assert out[0]["dst_workload"] == "default/ratings-v1"


def test_selectors_bookinfo(tmp_path: Path) -> None:
    r = IdentityResolver(_bookinfo_cluster(tmp_path))
    sel = {n.id: n.selector for n in r.workloads()}
    assert sel["default/reviews-v1"] == {"app": "reviews", "version": "v1"}
    assert sel["default/reviews-v3"] == {"app": "reviews", "version": "v3"}
    assert sel["default/details-v1"] == {"app": "details"}
    assert sel["default/productpage-v1"] == {"app": "productpage"}
    assert all("pod-template-hash" not in s for s in sel.values())


def test_selectors_boutique_and_nodes() -> None:
    r = IdentityResolver(load_inventory([BOUTIQUE]), trust_domain="prod.example")
    nodes = {n.id: n for n in r.workloads()}
    assert len(nodes) == 12
    assert all(n.selector == {"app": n.workload} for n in nodes.values())
    front = nodes["default/frontend"]
    assert front.principal == "prod.example/ns/default/sa/frontend"
    assert front.services == ["default/frontend", "default/frontend-external"]
    assert front.in_inventory and front.kind == "Deployment"
    # redis-cart sets no serviceAccountName: the pod runs as 'default'
    assert nodes["default/redis-cart"].principal == "prod.example/ns/default/sa/default"


def test_selector_never_uses_unstable_labels(tmp_path: Path) -> None:
    items = [
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": "db", "namespace": "data"},
         "spec": {"selector": {"matchLabels": {"app": "db"}}, "serviceName": "db",
                  "template": {"metadata": {"labels": {"app": "db", "tier": "storage"}},
                               "spec": {"containers": [{"name": "db", "image": "pg"}]}}}},
        {"apiVersion": "batch/v1", "kind": "CronJob",
         "metadata": {"name": "dump", "namespace": "data"},
         "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {
             "metadata": {"labels": {"app": "db", "job-name": "x", "role": "dump"}},
             "spec": {"containers": [{"name": "d", "image": "pg"}]}}}}}},
    ]
    r = IdentityResolver(load_inventory([_dump(tmp_path, items)]))
    sel = {n.id: n.selector for n in r.workloads()}
    # app=db alone would select the CronJob's pods too
    assert sel["data/db"] == {"app": "db", "tier": "storage"}
    # anchored on app; the CronJob's per-run job-name is never used
    assert sel["data/dump"] == {"app": "db", "role": "dump"}


def test_custom_trust_domain_principal(tmp_path: Path) -> None:
    r = IdentityResolver(_bookinfo_cluster(tmp_path), trust_domain="corp.example")
    node = r.node("default/reviews-v2")
    assert node.principal == "corp.example/ns/default/sa/bookinfo-reviews"
    assert node.service_account == "bookinfo-reviews" and node.meshed is True
    assert r.node("external:example.com").kind == "external"
    assert r.node("unknown:10.1.1.1").ips == ["10.1.1.1"]


def test_ambiguities_are_counted_and_deterministic(tmp_path: Path) -> None:
    inv = _bookinfo_cluster(tmp_path)
    rows = [{"time": _ts("10:00"), "direction": "outbound", "src_ip": "10.244.0.11",
             "dst_ip": "10.96.0.23", "dst_port": 9080}] * 5
    r1, r2 = IdentityResolver(inv), IdentityResolver(inv)
    r1.resolve(_batch(rows))
    r1.resolve(_batch(rows))
    r2.resolve(_batch(rows * 2))
    assert r1.ambiguities == r2.ambiguities
    assert len(r1.ambiguities) == 1 and r1.ambiguities[0].endswith("(10 records)")


def test_vectorized_many_rows(tmp_path: Path) -> None:
    r, _, _ = _reused_ip_resolver(tmp_path)
    times = [_ts("10:10"), _ts("10:50")] * 20_000
    out = r.resolve(_batch([{"time": t, "src_ip": "10.244.5.5"} for t in times]))
    got = out.column("src_workload").to_pylist()
    assert got[:2] == ["default/ratings-v1", "default/details-v1"]
    assert got.count("default/ratings-v1") == 20_000 and got.count("default/details-v1") == 20_000
