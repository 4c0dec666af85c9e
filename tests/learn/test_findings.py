"""Rule-based findings: kinds, severities, stable ids and ordering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa

from learn.baseline import Baseline, learn_baseline, prepare
from learn.findings import (
    Flag,
    Thresholds,
    apply_exclusions,
    exclusions,
    find,
    find_all,
    find_downgrades,
    find_exfiltration,
    find_new_edges,
    find_scans,
    is_sensitive,
    rank,
)
from learn.model import Edge, Graph, Node
from observe.schema import conform


def _graph() -> Graph:
    nodes = {
        "shop/web": Node("shop/web", "Deployment", "shop", "web", meshed=True),
        "shop/api": Node("shop/api", "Deployment", "shop", "api", meshed=True),
        "legacy/cron": Node("legacy/cron", "Deployment", "legacy", "cron", meshed=False),
        "unknown:10.8.0.7": Node("unknown:10.8.0.7", "unknown"),
        "external:api.example.com": Node("external:api.example.com", "external"),
    }
    edges = [
        Edge("shop/web", "shop/api", 8080, "http", requests=10, mtls_requests=10,
             evidence=["a.log:1"]),
        Edge("legacy/cron", "shop/api", 8080, "http", requests=4, plaintext_requests=4,
             source_ips=["10.1.0.5"], evidence=["api.log:7"]),
        Edge("unknown:10.8.0.7", "shop/api", 8080, "http", requests=2, mtls_requests=2),
        Edge("shop/api", "external:api.example.com", 443, "tcp", requests=3, tls_requests=3,
             hosts=["api.example.com"]),
        Edge("shop/web", "shop/api", 9090, "http", requests=5, denied_requests=5,
             mtls_requests=5),
    ]
    return Graph(nodes=nodes, edges=edges)


def test_each_rule_fires_once_with_stable_ids() -> None:
    findings = find(_graph())
    ids = [f.id for f in findings]
    assert ids == [
        "plaintext:legacy/cron->shop/api:8080",
        "permissive:shop/api:8080",
        "unknown-source:unknown:10.8.0.7->shop/api:8080",
        "external-egress:shop/api->external:api.example.com:443",
        "denied:shop/web->shop/api:9090",
    ]
    plaintext = findings[0]
    assert plaintext.severity == "high"  # workload to workload
    assert "4 of 4 requests (100.0%)" in plaintext.summary and "10.1.0.5" in plaintext.summary
    assert plaintext.evidence == ["api.log:7"]
    assert find(_graph()) == findings  # deterministic


def test_clean_mtls_graph_has_no_findings() -> None:
    graph = _graph()
    graph.edges = graph.edges[:1]
    assert find(graph) == []


# --- against a baseline -------------------------------------------------------------------


DAY1 = datetime(2024, 6, 3, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


def rec(at: datetime, src: str, dst: str, port: int = 8080, **kw: Any) -> dict[str, Any]:
    row = {"time": at, "src_workload": src, "dst_workload": dst, "dst_port": port,
           "protocol": "http", "method": "GET", "path": "/items", "status": 200,
           "response_flags": "-", "bytes_in": 500, "bytes_out": 2000, "mtls": "mtls",
           "direction": "inbound", "origin": f"{dst}.log:{int(at.timestamp()) % 100000}"}
    row.update(kw)
    return row


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return prepare(pa.Table.from_batches([conform(pa.Table.from_pylist(rows))]))


def steady(day: datetime, src: str = "shop/web", dst: str = "shop/api", port: int = 8080,
           every: int = 10, **kw: Any) -> list[dict[str, Any]]:
    """One record every ``every`` minutes for a whole day."""
    return [rec(day + timedelta(minutes=m), src, dst, port, **kw)
            for m in range(0, 24 * 60, every)]


def base_of(rows: list[dict[str, Any]]) -> Baseline:
    return learn_baseline(frame(rows))


def test_downgrade_only_on_edges_that_were_mtls() -> None:
    base = base_of(steady(DAY1) + steady(DAY1, "shop/legacy", "shop/api", mtls="plaintext"))
    new = frame([rec(DAY2 + timedelta(minutes=m), "shop/web", "shop/api") for m in range(10)]
                + [rec(DAY2 + timedelta(minutes=20), "shop/web", "shop/api", mtls="plaintext"),
                   rec(DAY2 + timedelta(minutes=21), "shop/legacy", "shop/api",
                       mtls="plaintext")])
    found = find_downgrades(new, base)
    assert [f.id for f in found] == ["mtls-downgrade:shop/web->shop/api:8080"]
    assert found[0].severity == "high"
    assert "1 of 11 requests (9.1%)" in found[0].summary
    assert "100% of its 144 baseline requests" in found[0].summary


def test_new_edges_by_sensitivity_and_new_operations_low() -> None:
    base = base_of(steady(DAY1))
    new = frame([
        rec(DAY2, "shop/web", "data/orders-db", 5432, protocol="tcp", path=None, method=None),
        rec(DAY2, "shop/web", "shop/search"),
        rec(DAY2, "shop/web", "shop/api", path="/admin/users"),
        rec(DAY2, "shop/web", "shop/api"),  # old operation: nothing
        rec(DAY2, "unknown:10.9.9.9", "shop/api"),  # unknown-source speaks for it
        rec(DAY2, "shop/web", "external:example.com", 443, protocol="tcp", path=None),
    ])
    found = {f.id: f for f in find_new_edges(new, base)}
    assert set(found) == {"new-edge:shop/web->data/orders-db:5432",
                          "new-edge:shop/web->shop/search:8080",
                          "new-edge:shop/web->shop/api:8080#operations"}
    assert found["new-edge:shop/web->data/orders-db:5432"].severity == "high"
    assert found["new-edge:shop/web->shop/search:8080"].severity == "medium"
    ops = found["new-edge:shop/web->shop/api:8080#operations"]
    assert ops.severity == "low" and "GET /admin/users" in ops.summary
    assert is_sensitive("shop/payment", 8080) and is_sensitive("kube-system/x", 80)
    assert not is_sensitive("shop/search", 8080) and not is_sensitive("external:db.io", 5432)


def _probes(at: datetime, src: str, n_targets: int, failed: bool) -> list[dict[str, Any]]:
    return [rec(at + timedelta(seconds=3 * i), src, f"ns/w{i % 8}", 1000 + i // 8,
                protocol="tcp", path=None, method=None, direction="outbound", status=0,
                response_flags="UF,URX" if failed else "-")
            for i in range(n_targets)]


def test_scan_needs_many_targets_above_baseline_and_failures() -> None:
    base = base_of(steady(DAY1) + steady(DAY1, "shop/web", "shop/cache", 6379))
    scan = frame(_probes(DAY2 + timedelta(hours=3), "shop/web", 40, failed=True)
                 + steady(DAY2))
    found = find_scans(scan, base)
    assert [f.id for f in found] == ["scan:shop/web"]
    flag = found[0]
    assert isinstance(flag, Flag) and flag.severity == "high"
    # 40 probed pairs plus the usual shop/api:8080 in the same 10 minutes
    assert "reached 41 distinct destination/port pairs" in flag.summary
    assert "40 attempts failed" in flag.summary
    assert len(flag.edges) == 40 and ("shop/web", "shop/api", 8080) not in flag.edges
    # the same fan-out with every attempt succeeding is not a scan (a job, a dashboard)
    assert find_scans(frame(_probes(DAY2, "shop/web", 40, failed=False)), base) == []
    # failures but few targets: not a scan
    assert find_scans(frame(_probes(DAY2, "shop/web", 8, failed=True)), base) == []
    # a source whose baseline already fans out that wide is held to 3x its own peak
    wide = base_of(_probes(DAY1, "shop/web", 40, failed=False))
    assert find_scans(frame(_probes(DAY2, "shop/web", 60, failed=True)), wide) == []


def test_exfiltration_against_the_source_baseline_external_weighs_more() -> None:
    base = base_of(steady(DAY1, "shop/cart", "data/store", 9000, bytes_in=1_000_000,
                          protocol="tcp", path=None, method=None))
    at = DAY2 + timedelta(hours=9)
    rows = [rec(at + timedelta(minutes=i), "shop/cart", "external:203.0.113.7", 443,
                protocol="tcp", path=None, method=None, bytes_in=2_000_000, direction="outbound")
            for i in range(15)]  # 30 MB out in one 30 min window
    rows += [rec(at + timedelta(minutes=i), "shop/cart", "data/store", 9000, protocol="tcp",
                 path=None, method=None, bytes_in=2_000_000) for i in range(15)]  # 2x usual
    found = find_exfiltration(frame(rows), base)
    assert [f.id for f in found] == ["exfiltration:shop/cart->external:203.0.113.7:443"]
    assert "sent 30.0 MB" in found[0].summary and "outside the cluster" in found[0].summary
    # inside the cluster 30 MB is below the floor
    internal = [dict(r, dst_workload="shop/other") for r in rows[:15]]
    assert find_exfiltration(frame(internal), base) == []
    # ...and 150 MB is not
    big = [dict(r, bytes_in=10_000_000) for r in internal]
    assert [f.kind for f in find_exfiltration(frame(big), base)] == ["exfiltration"]
    strict = Thresholds(exfil_min_bytes_external=50_000_000)
    assert find_exfiltration(frame(rows), base, strict) == []


def test_find_all_ranks_dedupes_and_folds_scanned_edges() -> None:
    base_rows = steady(DAY1)
    new_rows = steady(DAY2) + _probes(DAY2 + timedelta(hours=3), "shop/web", 40, failed=False)
    # some of the probes fail, and one probed edge carries real traffic all day too
    new_rows += _probes(DAY2 + timedelta(hours=3, minutes=1), "shop/web", 10, failed=True)
    new_rows += steady(DAY2, "shop/web", "ns/w0", 1000, every=30)
    graph = Graph(nodes=_graph().nodes, edges=[])
    findings = find_all(graph, frame(new_rows), base_of(base_rows), anomalies=False)
    ids = [f.id for f in findings]
    assert ids[0] == "scan:shop/web"
    # probed-only edges are folded into the scan; the edge with its own traffic is not
    assert "new-edge:shop/web->ns/w1:1000" not in ids
    assert "new-edge:shop/web->ns/w0:1000" in ids
    assert len(ids) == len(set(ids))
    assert [f.severity for f in findings] == sorted(
        (f.severity for f in findings), key=lambda s: ["high", "medium", "low", "info"].index(s))
    assert find_all(graph, frame(new_rows), base_of(base_rows), anomalies=False) == findings


def test_rank_keeps_the_more_severe_duplicate_and_merges_evidence() -> None:
    a = Flag("x:1", "new-edge", "medium", "a", "b", 1, "s", ["f:1"], score=1.0)
    b = Flag("x:1", "new-edge", "high", "a", "b", 1, "s", ["f:2"], score=0.5)
    c = Flag("y:1", "new-edge", "high", "a", "c", 1, "s", [], score=9.0)
    ranked = rank([a, b, c])
    assert [(f.id, f.severity) for f in ranked] == [("y:1", "high"), ("x:1", "high")]
    assert ranked[1].evidence == ["f:2", "f:1"]


def test_exclusions_and_what_the_proposals_leave_out() -> None:
    graph = _graph()
    graph.edges.append(Edge("shop/web", "data/db", 5432, "tcp", requests=3))
    findings = [
        Flag("new-edge:shop/web->data/db:5432", "new-edge", "high", "shop/web", "data/db", 5432,
             "s", edges=[("shop/web", "data/db", 5432)]),
        Flag("mtls-downgrade:legacy/cron->shop/api:8080", "mtls-downgrade", "high",
             "legacy/cron", "shop/api", 8080, "s", edges=[("legacy/cron", "shop/api", 8080)]),
        Flag("new-edge:shop/web->shop/api:9090", "new-edge", "medium", "shop/web", "shop/api",
             9090, "s", edges=[("shop/web", "shop/api", 9090)]),  # medium: stays in
        Flag("scan:shop/web", "scan", "high", "shop/web", None, None, "s",
             edges=[("shop/web", "ns/x", 22)]),
    ]
    assert exclusions(findings) == {("shop/web", "data/db", 5432),
                                    ("legacy/cron", "shop/api", 8080), ("shop/web", "ns/x", 22)}
    kept, left = apply_exclusions(graph, findings)
    keys = {(e.source, e.destination, e.port) for e in kept.edges}
    assert ("shop/web", "data/db", 5432) not in keys
    assert ("shop/web", "shop/api", 9090) in keys
    cron = next(e for e in kept.edges if e.source == "legacy/cron")
    assert cron.plaintext_requests == 0 and cron.source_ips == [] and cron.requests == 0
    assert [(x.source, x.what, x.requests) for x in left] == [
        ("legacy/cron", "plaintext", 4), ("shop/web", "edge", 3)]
    assert len(graph.edges) == 6  # the input graph is untouched
