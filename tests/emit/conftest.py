"""A hand-built Bookinfo graph (plus the awkward cases around it) for the emit tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from learn.model import Edge, Finding, Graph, Node, Operation

TD = "cluster.local"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 13, 30, 15, 250000, tzinfo=UTC)


def _wl(ns: str, name: str, app: str, version: str | None, sa: str | None,
        *, meshed: bool | None = True, kind: str = "Deployment") -> Node:
    selector = {"app": app}
    if version:
        selector["version"] = version
    return Node(
        id=f"{ns}/{name}", kind=kind, namespace=ns, workload=name, service_account=sa,
        principal=f"{TD}/ns/{ns}/sa/{sa}" if sa and meshed is not False else None,
        selector=selector, meshed=meshed, in_inventory=True,
    )


def _ops(*pairs: tuple[str, str, int]) -> list[Operation]:
    return sorted((Operation(m, p, n) for m, p, n in pairs), key=lambda o: (o.method, o.path))


def _edge(src: str, dst: str, port: int, proto: str, ops: list[Operation] | None = None,
          *, requests: int | None = None, mtls: bool = True, **kw: object) -> Edge:
    n = requests if requests is not None else sum(o.requests for o in ops or []) or 10
    e = Edge(source=src, destination=dst, port=port, protocol=proto, requests=n,
             bytes=n * 100, operations=list(ops or []), first_seen=T0, last_seen=T1,
             hours=[12, 13], active_minutes=60, evidence=[f"logs/{dst.replace('/', '_')}.log:1"])
    if mtls:
        e.mtls_requests = n
    else:
        e.plaintext_requests = n
    for k, v in kw.items():
        setattr(e, k, v)
    return e


def bookinfo(seed: int | None = None) -> Graph:
    nodes = [
        Node(id="istio-system/istio-ingressgateway", kind="Deployment",
             namespace="istio-system", workload="istio-ingressgateway",
             service_account="istio-ingressgateway-service-account",
             principal=f"{TD}/ns/istio-system/sa/istio-ingressgateway-service-account",
             selector={"app": "istio-ingressgateway", "istio": "ingressgateway"},
             meshed=True, in_inventory=True),
        _wl("istio-system", "istiod", "istiod", None, "istiod"),
        _wl("default", "productpage-v1", "productpage", "v1", "bookinfo-productpage"),
        _wl("default", "details-v1", "details", "v1", "bookinfo-details"),
        _wl("default", "reviews-v1", "reviews", "v1", "bookinfo-reviews"),
        _wl("default", "reviews-v2", "reviews", "v2", "bookinfo-reviews"),
        _wl("default", "reviews-v3", "reviews", "v3", "bookinfo-reviews"),
        _wl("default", "ratings-v1", "ratings", "v1", "bookinfo-ratings"),
        _wl("default", "mysqldb-v1", "mysqldb", "v1", "bookinfo-mysql", kind="StatefulSet"),
        _wl("default", "legacy-client", "legacy-client", None, "default", meshed=False),
        _wl("default", "idle-v1", "idle", "v1", "idle"),
        Node(id="scratch/orphan", kind="Pod", namespace="scratch", workload="orphan",
             selector={}, meshed=True, in_inventory=False),
        Node(id="external:203.0.113.7", kind="external", ips=["203.0.113.7"]),
        Node(id="external:api.example.com", kind="external"),
        Node(id="unknown:10.9.9.9", kind="unknown", ips=["10.9.9.9"]),
    ]
    gw, pp = "istio-system/istio-ingressgateway", "default/productpage-v1"
    edges = [
        _edge("external:203.0.113.7", gw, 8080, "http", _ops(("GET", "/productpage", 40)),
              mtls=False, source_ips=["203.0.113.7"]),
        _edge(gw, pp, 9080, "http", _ops(("GET", "/productpage", 40),
                                         ("GET", "/static/*", 80))),
        _edge(pp, "default/details-v1", 9080, "http", _ops(("GET", "/details/*", 40))),
        _edge(pp, "default/reviews-v1", 9080, "http", _ops(("GET", "/reviews/*", 13))),
        _edge(pp, "default/reviews-v2", 9080, "http", _ops(("GET", "/reviews/*", 14))),
        _edge(pp, "default/reviews-v3", 9080, "http", _ops(("GET", "/reviews/*", 13))),
        _edge("default/reviews-v2", "default/ratings-v1", 9080, "http",
              _ops(("GET", "/ratings/*", 14))),
        _edge("default/reviews-v3", "default/ratings-v1", 9080, "http",
              _ops(("GET", "/ratings/*", 13), ("POST", "/ratings/rate", 2))),
        _edge("default/ratings-v1", "default/mysqldb-v1", 3306, "tcp", requests=7),
        _edge("default/legacy-client", "default/details-v1", 9080, "http",
              _ops(("GET", "/details/*", 5), ("HEAD", "/health", 1)), mtls=False,
              source_ips=["10.1.2.4", "10.1.2.3"], hours=[3], active_minutes=2),
        _edge("default/legacy-client", "default/ratings-v1", 9080, "http",
              _ops(("GET", "/ratings/*", 5)), mtls=False, denied_requests=5,
              source_ips=["10.1.2.3"]),
        _edge("unknown:10.9.9.9", pp, 9080, "http", _ops(("GET", "/health", 3)), mtls=False),
        _edge("default/reviews-v2", "external:api.example.com", 443, "tls", requests=4,
              mtls=False, tls_requests=4, plaintext_requests=0, hosts=["api.example.com"]),
        _edge(pp, "istio-system/istiod", 15012, "grpc",
              _ops(("POST", "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                             "StreamAggregatedResources", 1))),
        _edge(pp, "scratch/orphan", 8080, "http", _ops(("GET", "/", 2))),
    ]
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(nodes)
        rng.shuffle(edges)
        for e in edges:
            rng.shuffle(e.operations)
            rng.shuffle(e.source_ips)
    g = Graph(nodes={n.id: n for n in nodes}, edges=edges, first_seen=T0, last_seen=T1,
              trust_domain=TD, namespaces=["default", "istio-system"],
              idle_workloads=["default/idle-v1"],
              ambiguities=["10.1.2.3 was reused by two pods (legacy-client, batch-job) "
                           "within the window"])
    return g


def bookinfo_findings() -> list[Finding]:
    return [
        Finding("plaintext:default/legacy-client->default/details-v1:9080", "plaintext",
                "high", "default/legacy-client", "default/details-v1", 9080,
                "legacy-client talks to details-v1 in plaintext.", ["logs/d.log:7"]),
        Finding("external-egress:default/reviews-v2->external:api.example.com:443",
                "external-egress", "medium", "default/reviews-v2", "external:api.example.com",
                443, "reviews-v2 calls api.example.com.", ["logs/r.log:3"]),
        Finding("denied:default/legacy-client->default/ratings-v1:9080", "denied", "info",
                "default/legacy-client", "default/ratings-v1", 9080,
                "5 requests were already denied.", []),
    ]


@pytest.fixture
def make_bookinfo() -> Callable[[int | None], Graph]:
    return bookinfo


@pytest.fixture
def findings() -> list[Finding]:
    return bookinfo_findings()
