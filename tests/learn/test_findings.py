"""Rule-based findings: kinds, severities, stable ids and ordering."""

from __future__ import annotations

from learn.findings import find
from learn.model import Edge, Graph, Node


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
