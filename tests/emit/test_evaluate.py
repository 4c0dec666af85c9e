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
    policy: dict[str, Any] = {
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


# --- Istio's own authz-builder inputs, with verdicts derived by hand from the reference -------

HTTPBIN = {"app": "httpbin", "version": "v1"}


def _foo(port: int = 8080, *, method: str = "GET", path: str = "/", principal: str | None = None,
         ip: str | None = "10.0.0.1", protocol: str = "http") -> Request:
    return Request("foo", HTTPBIN, port, protocol=protocol, method=method, path=path,
                   source_principal=principal, source_ip=ip)


def test_builder_deny_empty_rule_denies_everything() -> None:
    # DENY with `rules: [{}]`: the empty rule matches every request.
    [policy] = _docs("istio-authz-builder-http-deny-empty-rule-in.yaml")
    d = evaluate([policy], _foo())
    assert (d.verdict, d.policy, d.rule) == ("deny", "foo/deny-all", 0)
    # ... only on the selected workload
    assert evaluate([policy], Request("foo", {"app": "httpbin", "version": "v2"}, 80)).allowed


def test_builder_allow_nil_rule_is_allow_nothing() -> None:
    # ALLOW without rules: the workload has an ALLOW policy and nothing matches it.
    [policy] = _docs("istio-authz-builder-http-allow-nil-rule-in.yaml")
    assert evaluate([policy], _foo()).verdict == "deny"
    assert evaluate([policy], _foo(principal="cluster.local/ns/foo/sa/x")).verdict == "deny"


def test_builder_custom_is_unknown_only_where_its_rules_match() -> None:
    # CUSTOM hands /httpbin1 and /httpbin2 to the ext-authz provider: their fate is unknown;
    # other paths do not involve it and no ALLOW policy exists: allowed.
    policies = _docs("istio-authz-builder-http-custom-simple-http-in.yaml")
    assert evaluate(policies, _foo(path="/httpbin1")).verdict == "unknown"
    assert evaluate(policies, _foo(path="/httpbin2")).verdict == "unknown"
    assert evaluate(policies, _foo(path="/other")).verdict == "allow"
    # a DENY that matches wins whatever the provider says
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "d", "namespace": "foo"},
            "spec": {"action": "DENY",
                     "rules": [{"to": [{"operation": {"paths": ["/httpbin1"]}}]}]}}
    assert evaluate([*policies, deny], _foo(path="/httpbin1")).verdict == "deny"


def test_builder_dry_run_mix() -> None:
    # httpbin-1 is dry-run (not enforced); httpbin-2 (dry-run "false") allows /another only.
    policies = _docs("istio-authz-builder-http-dry-run-mix-in.yaml")
    assert evaluate(policies, _foo(path="/another")).verdict == "allow"
    assert evaluate(policies, _foo(path="/allow")).verdict == "deny"


def test_builder_audit_does_not_decide() -> None:
    [policy] = _docs("istio-authz-builder-http-audit-full-rule-in.yaml")
    d = evaluate([policy], _foo())
    assert d.verdict == "allow" and d.reason == "no ALLOW policy applies"


def test_builder_tcp_allow_both_http_and_tcp_rules() -> None:
    # Namespace-wide ALLOW (no selector). For TCP: rule 0 (requestPrincipals + methods) and
    # rule 1 (methods) and rule 2 (requestPrincipals) have HTTP-only fields and are ignored;
    # rule 3 allows ns-1 on port 80.
    [policy] = _docs("istio-authz-builder-tcp-allow-both-http-tcp-in.yaml")
    ns1 = "cluster.local/ns/ns-1/sa/client"
    ns2 = "cluster.local/ns/ns-2/sa/client"
    assert evaluate([policy], _foo(80, principal=ns1, protocol="tcp")).verdict == "allow"
    assert evaluate([policy], _foo(8080, principal=ns1, protocol="tcp")).verdict == "deny"
    assert evaluate([policy], _foo(9090, principal=ns2, protocol="tcp")).verdict == "deny"
    # The same as HTTP: rule 1 allows ns-1 GET on 8080; rule 2 needs a JWT: unknown.
    assert evaluate([policy], _foo(8080, principal=ns1)).verdict == "allow"
    assert evaluate([policy], _foo(9090, principal=ns2)).verdict == "unknown"
    assert evaluate([policy], _foo(8080, principal=ns2, method="POST")).verdict == "deny"


def test_builder_principal_wildcards() -> None:
    # from[0]: principals ["*"] = any mTLS peer; from[1] adds nothing beyond it.
    [policy] = _docs("istio-authz-builder-http-simple-policy-principal-with-wildcard-in.yaml")
    assert evaluate([policy], _foo(principal="td/ns/any/sa/x")).verdict == "allow"
    assert evaluate([policy], _foo(principal=None)).verdict == "deny"  # plaintext: no principal


def test_builder_trust_domains() -> None:
    # from[0]: trust domain cluster.local or another.local; from[1]: any trust domain but
    # bad* and untrusted - which needs a peer identity (plaintext has none).
    [policy] = _docs("istio-authz-builder-http-trust-domains-in.yaml")
    assert evaluate([policy], _foo(principal="another.local/ns/a/sa/b")).allowed
    assert evaluate([policy], _foo(principal="other.td/ns/a/sa/b")).allowed  # from[1]
    assert not evaluate([policy], _foo(principal="bad.td/ns/a/sa/b")).allowed
    assert not evaluate([policy], _foo(principal="untrusted/ns/a/sa/b")).allowed


def test_builder_deny_and_allow() -> None:
    # DENY principal "deny" first; ALLOW principal "allow"; anything else: no ALLOW match.
    policies = _docs("istio-authz-builder-http-deny-and-allow-in.yaml")
    assert evaluate(policies, _foo(principal="deny")).verdict == "deny"
    assert evaluate(policies, _foo(principal="allow")).verdict == "allow"
    assert evaluate(policies, _foo(principal="x")).verdict == "deny"


def test_builder_allow_full_rule_when_conditions_are_unknown() -> None:
    # rule 0 (serviceAccounts) cannot be evaluated; rule 1 has `when` on request headers and
    # JWT claims: whatever else matches, the outcome is unknown, never a guessed allow.
    [policy, *_] = _docs("istio-authz-builder-http-allow-full-rule-in.yaml")
    d = evaluate([policy], _foo(80, principal="cluster.local/ns/ns/sa/principal",
                                ip="5.6.7.8", method="method", path="/exact"))
    assert d.verdict == "unknown"
    # a request failing a field that *can* be evaluated in every rule... rule 0 stays unknown
    assert evaluate([policy], _foo(12345, principal=None)).verdict == "unknown"
    without_sa = {**policy, "spec": {**policy["spec"], "rules": policy["spec"]["rules"][1:]}}
    # port 12345 is in no `ports`: the only rule cannot match, whatever `when` says
    assert evaluate([without_sa], _foo(12345, principal=None)).verdict == "deny"


# --- hand-made cases for the remaining semantics ---------------------------------------------


def _ap(ns: str, spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def test_root_namespace_policy_applies_mesh_wide() -> None:
    deny_plain = _ap("istio-system", {"action": "DENY", "rules": [
        {"from": [{"source": {"notPrincipals": ["*"]}}]}]})
    plain = Request("shop", {"app": "a"}, 80, source_ip="10.0.0.1")
    assert evaluate([deny_plain], plain).verdict == "deny"
    assert evaluate([deny_plain], plain, root_namespace="mesh-root").verdict == "allow"
    assert evaluate([deny_plain], Request("shop", {"app": "a"}, 80,
                                          source_principal="td/ns/x/sa/y")).allowed


def test_not_forms_and_remote_ip_blocks() -> None:
    policy = _ap("ns", {"rules": [{"from": [{"source": {
        "namespaces": ["front*"], "notNamespaces": ["frontend-test"],
        "remoteIpBlocks": ["203.0.113.0/24"], "notRemoteIpBlocks": ["203.0.113.9"]}}],
        "to": [{"operation": {"notMethods": ["DELETE"], "notPaths": ["/admin*"],
                              "hosts": ["shop.example.com"], "notPorts": ["9090"]}}]}]})

    def req(ns: str = "frontend", remote: str = "203.0.113.7", method: str = "GET",
            path: str = "/", host: str = "Shop.Example.com:443", port: int = 80) -> Request:
        return Request("ns", {}, port, method=method, path=path, host=host,
                       source_principal=f"td/ns/{ns}/sa/s", source_ip="10.0.0.5",
                       remote_ip=remote)

    assert evaluate([policy], req()).allowed  # host compares case-insensitively, port dropped
    assert not evaluate([policy], req(ns="frontend-test")).allowed
    assert not evaluate([policy], req(ns="backend")).allowed
    assert not evaluate([policy], req(remote="203.0.113.9")).allowed
    assert not evaluate([policy], req(remote="198.51.100.1")).allowed
    assert not evaluate([policy], req(method="DELETE")).allowed
    assert not evaluate([policy], req(path="/admin/users")).allowed
    assert not evaluate([policy], req(port=9090)).allowed
    assert not evaluate([policy], req(host="other.example.com")).allowed


def test_when_conditions_evaluated_from_the_evidence() -> None:
    policy = _ap("ns", {"rules": [{"when": [
        {"key": "source.ip", "values": ["10.1.0.0/16"]},
        {"key": "destination.port", "notValues": ["9090"]},
        {"key": "source.namespace", "values": ["shop"]}]}]})
    ok = Request("ns", {}, 80, source_ip="10.1.2.3", source_principal="td/ns/shop/sa/a")
    assert evaluate([policy], ok).verdict == "allow"
    assert evaluate([policy], Request("ns", {}, 9090, source_ip="10.1.2.3",
                                      source_principal="td/ns/shop/sa/a")).verdict == "deny"
    header = _ap("ns", {"rules": [{"when": [{"key": "request.headers[x-user]",
                                             "values": ["admin"]}]}]})
    assert evaluate([header], ok).verdict == "unknown"
    # On TCP, an ALLOW rule with an HTTP-only condition is ignored: allow-nothing remains.
    tcp = Request("ns", {}, 80, protocol="tcp", source_principal="td/ns/shop/sa/a")
    assert evaluate([header], tcp).verdict == "deny"


def test_target_refs() -> None:
    gw = _ap("edge", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                      "name": "public"}], "rules": [
        {"to": [{"operation": {"paths": ["/api/*"]}}]}]})
    gw_pod = {"gateway.networking.k8s.io/gateway-name": "public"}
    assert evaluate([gw], Request("edge", gw_pod, 80, path="/api/x")).allowed
    assert not evaluate([gw], Request("edge", gw_pod, 80, path="/admin")).allowed
    # targetRefs, not the selector: another workload in the namespace is untouched
    assert evaluate([gw], Request("edge", {"app": "other"}, 80, path="/admin")).allowed
    # A Service target is enforced by a waypoint: unknown for pods behind that Service only.
    svc = _ap("shop", {"targetRefs": [{"kind": "Service", "group": "", "name": "cart"}]})
    assert evaluate([svc], Request("shop", {}, 80, services=("cart",))).verdict == "unknown"
    assert evaluate([svc], Request("shop", {}, 80, services=("web",))).verdict == "allow"
