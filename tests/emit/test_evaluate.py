"""The replay evaluator against Istio's documented outcomes for real example policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from emit.evaluate import Request, evaluate, mtls_mode

DATA = Path(__file__).resolve().parent.parent / "data" / "policies"


def _docs(name: str) -> list[dict[str, Any]]:
    with (DATA / name).open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def _tcp(port: int) -> Request:
    return Request(namespace="foo", labels={"app": "tcp-echo"}, port=port, protocol="tcp",
                   source_principal="cluster.local/ns/foo/sa/curl")


# Outcomes stated by Istio's TCP authorization task for the four successive policies.
@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (0, {9000: True, 9001: True, 9002: False}),
        (1, {9000: False, 9001: False, 9002: False}),  # HTTP field on TCP: ALLOW rule ignored
        (2, {9000: False, 9001: False, 9002: False}),  # DENY with HTTP field: denies all TCP
        (3, {9000: False, 9001: True, 9002: True}),
    ],
)
def test_tcp_variants_match_istio_docs(variant: int, expected: dict[int, bool]) -> None:
    policy = _docs("istio-docs-authz-tcp-variants.yaml")[variant]
    got = {port: evaluate([policy], _tcp(port)).allowed for port in expected}
    assert got == expected


def test_bookinfo_http_policies() -> None:
    policies = _docs("istio-docs-bookinfo-authz-http.yaml")
    product_sa = "cluster.local/ns/default/sa/bookinfo-productpage"

    def req(app: str, method: str, principal: str | None) -> Request:
        return Request(namespace="default", labels={"app": app, "version": "v1"}, port=9080,
                       method=method, path="/x", source_principal=principal)

    assert evaluate(policies, req("productpage", "GET", None)).allowed
    assert not evaluate(policies, req("productpage", "POST", None)).allowed
    assert evaluate(policies, req("details", "GET", product_sa)).allowed
    other_sa = "cluster.local/ns/default/sa/other"
    assert not evaluate(policies, req("details", "GET", other_sa)).allowed
    assert not evaluate(policies, req("ratings", "GET", product_sa)).allowed
    # allow-nothing covers workloads without their own policy
    assert not evaluate(policies, req("mongodb", "GET", product_sa)).allowed
    # another namespace is untouched
    other = Request(namespace="prod", labels={"app": "details"}, port=9080, method="DELETE")
    assert evaluate(policies, other).allowed


def test_paths_ignore_query_and_support_templates() -> None:
    policy = {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "rules": [{"to": [
            {"operation": {"methods": ["GET"], "paths": ["/reviews/*", "/exact"]}},
            {"operation": {"methods": ["POST"], "paths": ["/api/{*}/orders", "*.css"]}},
        ]}]},
    }

    def ok(method: str, path: str) -> bool:
        return evaluate([policy], Request("ns", {"app": "a"}, 80, method=method, path=path)).allowed

    assert ok("GET", "/reviews/0") and ok("GET", "/exact?x=1") and not ok("GET", "/exact/more")
    assert not ok("POST", "/reviews/0")  # operations are not a cross product
    assert ok("POST", "/api/42/orders") and not ok("POST", "/api/4/2/orders")
    assert ok("POST", "/static/site.css")


def test_peer_authentication_precedence() -> None:
    ns_strict = {"kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": "ns"},
                 "spec": {"mtls": {"mode": "STRICT"}}}
    port_permissive = {
        "kind": "PeerAuthentication", "metadata": {"name": "w", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "mtls": {"mode": "STRICT"},
                 "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}},
    }
    manifests = [ns_strict, port_permissive]
    plain = Request("ns", {"app": "a"}, 8080, source_ip="10.0.0.9")
    assert mtls_mode(manifests, plain) == "PERMISSIVE"
    assert mtls_mode(manifests, Request("ns", {"app": "a"}, 9090)) == "STRICT"
    assert mtls_mode(manifests, Request("ns", {"app": "b"}, 8080)) == "STRICT"
    assert evaluate(manifests, plain).allowed
    assert not evaluate(manifests, Request("ns", {"app": "a"}, 9090)).allowed


def test_ip_blocks_and_dry_run() -> None:
    policy = {
        "kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "a"}},
                 "rules": [{"from": [{"source": {"ipBlocks": ["10.1.2.3", "10.9.0.0/16"]}}]}]},
    }
    assert evaluate([policy], Request("ns", {"app": "a"}, 80, source_ip="10.1.2.3")).allowed
    assert evaluate([policy], Request("ns", {"app": "a"}, 80, source_ip="10.9.200.1")).allowed
    assert not evaluate([policy], Request("ns", {"app": "a"}, 80, source_ip="10.1.2.4")).allowed
    dry = {**policy, "metadata": {**policy["metadata"],
                                  "annotations": {"istio.io/dry-run": "true"}}}
    assert evaluate([dry], Request("ns", {"app": "a"}, 80, source_ip="10.1.2.4")).allowed
