"""emit/istio.py: manifests valid against the real CRD schemas, least privilege, deterministic."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support.manifests import SCHEMAS, _istio_checks, validate

from emit.istio import istio_manifests, plan_istio
from emit.yamlio import dump_yaml
from learn.model import Edge, Graph, Node, Operation

DATA = Path(__file__).parent.parent / "data"
Make = Callable[[int | None], Graph]

# --- the validator itself must accept real policies and reject broken ones -----------------


def test_validator_accepts_real_policies_and_rejects_broken_ones() -> None:
    real = [d for name in ("istio-docs-bookinfo-authz-http.yaml",
                           "istio-docs-authz-tcp-variants.yaml",
                           "kiali-peerauthentication-variants.yaml")
            for d in yaml.safe_load_all((DATA / "policies" / name).read_text("utf-8"))
            if d and d["kind"] in SCHEMAS]
    assert len(real) >= 10
    for doc in real:
        validate(doc)
    bad = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "x"}, "spec": {"action": "PERMIT"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad_ports = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "x"},
                 "spec": {"rules": [{"to": [{"operation": {"ports": [9080]}}]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad_ports)
    no_selector_pa = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                      "metadata": {"name": "x"},
                      "spec": {"portLevelMtls": {"80": {"mode": "PERMISSIVE"}}}}
    with pytest.raises(AssertionError):
        validate(no_selector_pa)


# --- the Bookinfo graph ------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", ["allow", "deny"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_every_manifest_is_schema_valid(make_bookinfo: Make, plaintext: str,
                                        dry_run: bool) -> None:
    manifests = istio_manifests(make_bookinfo(None), plaintext=plaintext,  # type: ignore[arg-type]
                                dry_run=dry_run)
    assert manifests
    for m in manifests:
        validate(m)
        _istio_checks(m)
        # the YAML round-trips to the same object
        assert yaml.safe_load(dump_yaml(m)) == m


def test_golden_bookinfo_and_determinism(make_bookinfo: Make,
                                         golden: Callable[[str, str], None]) -> None:
    text = dump_yaml(istio_manifests(make_bookinfo(None)))
    golden("emit/bookinfo-policies.yaml", text)
    assert dump_yaml(istio_manifests(make_bookinfo(None))) == text
    for seed in (1, 2, 3):
        assert dump_yaml(istio_manifests(make_bookinfo(seed))) == text


def test_shapes_match_istio_docs_bookinfo(make_bookinfo: Make) -> None:
    docs = list(yaml.safe_load_all(
        (DATA / "policies" / "istio-docs-bookinfo-authz-http.yaml").read_text("utf-8")))
    doc_allow_nothing = docs[0]
    ours = {(m["kind"], m["metadata"]["name"]): m for m in istio_manifests(make_bookinfo(None))
            if m["metadata"]["namespace"] == "default"}
    assert ours[("AuthorizationPolicy", "allow-nothing")]["spec"] == doc_allow_nothing["spec"]
    # Same structure as the docs' least-privilege policies: selector + ALLOW + from/to rules.
    doc_details = next(d for d in docs if d["metadata"]["name"] == "details-viewer")
    details = ours[("AuthorizationPolicy", "details-v1")]
    assert set(details["spec"]) == set(doc_details["spec"])
    assert details["spec"]["selector"]["matchLabels"]["app"] == "details"
    doc_principals = doc_details["spec"]["rules"][0]["from"][0]["source"]["principals"]
    our_principals = [p for r in details["spec"]["rules"] for f in r["from"]
                      for p in f["source"].get("principals", [])]
    assert our_principals == doc_principals
    doc_ratings = next(d for d in docs if d["metadata"]["name"] == "ratings-viewer")
    ratings = ours[("AuthorizationPolicy", "ratings-v1")]
    assert (ratings["spec"]["rules"][0]["from"][0]["source"]["principals"]
            == doc_ratings["spec"]["rules"][0]["from"][0]["source"]["principals"])


def _allowed_combos(m: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    out = set()
    for rule in m["spec"]["rules"]:
        peers = [("principal", p) for f in rule.get("from", [])
                 for p in f["source"].get("principals", [])]
        peers += [("ip", ip) for f in rule.get("from", [])
                  for ip in f["source"].get("ipBlocks", [])]
        for (_, peer), t in itertools.product(peers, rule["to"]):
            op = t["operation"]
            for port, method, path in itertools.product(
                    op["ports"], op.get("methods", ["*"]), op.get("paths", ["*"])):
                out.add((peer, port, method, path))
    return out


def _observed(g: Graph, dest: str) -> set[tuple[str, str, str, str]]:
    out = set()
    for e in g.edges_to(dest):
        if e.denied_requests >= e.requests:
            continue
        src = g.nodes.get(e.source)
        peers = [src.principal] if src is not None and src.principal and src.meshed else []
        peers += e.source_ips or ([e.source.split(":", 1)[1]] if ":" in e.source else [])
        ops = [(o.method, o.path) for o in e.operations] or [("*", "*")]
        for peer, (method, path) in itertools.product(peers, ops):
            out.add((peer, str(e.port), method, path))
    return out


def test_no_cross_product(make_bookinfo: Make) -> None:
    g = make_bookinfo(None)
    # Make the cross-product trap explicit: GET /a and POST /b, never GET /b or POST /a.
    g.edges.append(Edge("default/productpage-v1", "default/mysqldb-v1", 8080, "http",
                        requests=3, mtls_requests=3,
                        operations=[Operation("GET", "/a", 2), Operation("POST", "/b", 1)]))
    checked = 0
    for m in istio_manifests(g):
        if m["kind"] != "AuthorizationPolicy" or not m["spec"]:
            continue
        sel = m["spec"]["selector"]["matchLabels"]
        if sel.get("istio") == "ingressgateway":
            continue
        dest = f"{m['metadata']['namespace']}/{m['metadata']['name']}"
        allowed = _allowed_combos(m)
        observed = _observed(g, dest)
        assert allowed, dest
        assert allowed <= observed, (dest, sorted(allowed - observed))
        checked += 1
    assert checked >= 6
    mysql = next(m for m in istio_manifests(g) if m["metadata"]["name"] == "mysqldb-v1"
                 and m["kind"] == "AuthorizationPolicy")
    pp = "cluster.local/ns/default/sa/bookinfo-productpage"
    assert (pp, "8080", "GET", "/b") not in _allowed_combos(mysql)
    assert (pp, "8080", "GET", "/a") in _allowed_combos(mysql)


def test_tcp_edges_get_ports_only_and_never_share_a_rule_with_http(make_bookinfo: Make) -> None:
    g = make_bookinfo(None)
    # ratings also talks HTTP to mysqldb on another port: must be a separate rule.
    g.edges.append(Edge("default/ratings-v1", "default/mysqldb-v1", 8080, "http", requests=2,
                        mtls_requests=2, operations=[Operation("GET", "/metrics", 2)]))
    ap = next(m for m in istio_manifests(g) if m["metadata"]["name"] == "mysqldb-v1"
              and m["kind"] == "AuthorizationPolicy")
    rules = ap["spec"]["rules"]
    assert len(rules) == 2
    tcp = [r for r in rules if r["to"][0]["operation"]["ports"] == ["3306"]]
    assert len(tcp) == 1
    assert tcp[0]["to"] == [{"operation": {"ports": ["3306"]}}]
    http = next(r for r in rules if r is not tcp[0])
    assert all("methods" in t["operation"] for t in http["to"])


def test_plaintext_allow_emits_weak_ipblocks_and_permissive_port(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None), plaintext="allow")
    by = {(m["kind"], m["metadata"]["name"]): m for m in plan.manifests}
    details = by[("AuthorizationPolicy", "details-v1")]
    ip_rules = [r for r in details["spec"]["rules"] if "ipBlocks" in r["from"][0]["source"]]
    assert ip_rules[0]["from"][0]["source"]["ipBlocks"] == ["10.1.2.3", "10.1.2.4"]
    pa = by[("PeerAuthentication", "details-v1")]
    assert pa["spec"]["mtls"] == {"mode": "STRICT"}
    assert pa["spec"]["portLevelMtls"] == {"9080": {"mode": "PERMISSIVE"}}
    assert pa["spec"]["selector"] == details["spec"]["selector"]
    expl = next(e for e in plan.explanations if e.name == "details-v1"
                and e.kind == "AuthorizationPolicy")
    weak = [r for r in expl.rules if r.weak]
    assert [r.kind for r in weak] == ["ipBlocks"]
    assert weak[0].sources == ["default/legacy-client"]
    assert details["spec"]["rules"][weak[0].index] == weak[0].rule
    # the unknown: source is pinned to its own address
    pp = by[("AuthorizationPolicy", "productpage-v1")]
    assert {"ipBlocks": ["10.9.9.9"]} in [r["from"][0]["source"] for r in pp["spec"]["rules"]]


def test_plaintext_deny_emits_neither_and_reports_clients(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None), plaintext="deny")
    assert not [m for m in plan.manifests if m["kind"] == "PeerAuthentication"
                and "portLevelMtls" in m["spec"]]
    for m in plan.manifests:
        for r in m["spec"].get("rules", []):
            for f in r.get("from", []):
                assert "ipBlocks" not in f["source"]
    left = {(x["source"], x["destination"]) for x in plan.excluded if "plaintext=deny" in
            x["reason"]}
    assert left == {("default/legacy-client", "default/details-v1"),
                    ("unknown:10.9.9.9", "default/productpage-v1")}


def test_gateway_allows_observed_ports_from_anyone(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None))
    gw = [m for m in plan.manifests if m["metadata"]["name"] == "istio-ingressgateway"]
    assert len(gw) == 1 and gw[0]["kind"] == "AuthorizationPolicy"
    assert gw[0]["spec"]["rules"] == [{"to": [{"operation": {"ports": ["8080"]}}]}]
    expl = next(e for e in plan.explanations if e.name == "istio-ingressgateway")
    assert expl.rules[0].kind == "gateway" and "ANY source" in expl.notes[0]
    # Gateway API gateways are recognised by their label too.
    g = make_bookinfo(None)
    node = g.nodes["istio-system/istio-ingressgateway"]
    node.selector = {"gateway.networking.k8s.io/gateway-name": "web"}
    gw2 = [m for m in istio_manifests(g) if m["metadata"]["name"] == "istio-ingressgateway"]
    assert gw2[0]["spec"]["rules"] == [{"to": [{"operation": {"ports": ["8080"]}}]}]


def test_system_namespaces_get_no_namespace_wide_objects(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None))
    ns_wide = {(m["metadata"]["namespace"], m["kind"], m["metadata"]["name"])
               for m in plan.manifests if "selector" not in m["spec"]}
    assert ns_wide == {("default", "AuthorizationPolicy", "allow-nothing"),
                       ("default", "PeerAuthentication", "default")}
    assert not [m for m in plan.manifests if m["metadata"]["name"] == "istiod"]
    assert any(x["destination"] == "istio-system/istiod" and "system namespace" in x["reason"]
               for x in plan.excluded)
    # 'default' declared a system namespace: nothing namespace-wide, no workload policies.
    none = istio_manifests(make_bookinfo(None),
                           system_namespaces=frozenset({"istio-system", "default"}))
    assert [m["metadata"]["name"] for m in none] == ["istio-ingressgateway"]


def test_denied_external_and_selectorless_are_excluded(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None))
    reasons = {(x["source"], x["destination"]): x["reason"] for x in plan.excluded}
    assert "denied" in reasons[("default/legacy-client", "default/ratings-v1")]
    assert "not a workload" in reasons[("default/reviews-v2", "external:api.example.com")]
    assert "no pod selector" in reasons[("default/productpage-v1", "scratch/orphan")]
    names = {m["metadata"]["name"] for m in plan.manifests}
    assert "orphan" not in names and "idle-v1" not in names
    ratings = next(m for m in plan.manifests if m["metadata"]["name"] == "ratings-v1")
    assert "ipBlocks" not in json.dumps(ratings)


def test_annotations_and_dry_run(make_bookinfo: Make) -> None:
    ms = istio_manifests(make_bookinfo(None), dry_run=True)
    for m in ms:
        ann = m["metadata"]["annotations"]
        assert ann["meshwright.io/first-seen"] == "2024-05-01T12:00:00Z"
        assert ann["meshwright.io/last-seen"] == "2024-05-01T13:30:15Z"
        assert int(ann["meshwright.io/requests"]) > 0
        assert int(ann["meshwright.io/sources"]) >= 1
        if m["kind"] == "AuthorizationPolicy":
            assert ann["istio.io/dry-run"] == "true"
        else:
            assert "istio.io/dry-run" not in ann
    ratings = next(m for m in ms if m["metadata"]["name"] == "ratings-v1")
    # the fully denied legacy-client edge is not counted
    assert ratings["metadata"]["annotations"]["meshwright.io/requests"] == "29"
    assert ratings["metadata"]["annotations"]["meshwright.io/sources"] == "2"
    assert "istio.io/dry-run" not in istio_manifests(make_bookinfo(None))[0]["metadata"][
        "annotations"]


def test_shared_principal_is_explained(make_bookinfo: Make) -> None:
    plan = plan_istio(make_bookinfo(None))
    expl = next(e for e in plan.explanations if e.name == "ratings-v1")
    assert any("shared by default/reviews-v2, default/reviews-v3" in n for n in expl.notes)
    rule = expl.rules[0]
    assert {x.source for x in rule.edges} == {"default/reviews-v2", "default/reviews-v3"}
    assert all(x.mtls == "full" and x.mtls_share == 1.0 and not x.weak for x in rule.edges)


def test_workload_without_identity_or_address_is_left_out() -> None:
    g = Graph(nodes={
        "a/server": Node("a/server", "Deployment", "a", "server", selector={"app": "server"},
                         meshed=True),
        "a/client": Node("a/client", "Deployment", "a", "client", meshed=False),
    }, edges=[Edge("a/client", "a/server", 80, "tcp", requests=1, plaintext_requests=1)])
    plan = plan_istio(g)
    assert plan.manifests == []
    assert "no client address" in plan.excluded[0]["reason"]
    g.edges[0].source_ips = ["2001:db8::1", "10.0.0.1", "not-an-ip"]
    ap = istio_manifests(g)[1]
    assert ap["metadata"]["name"] == "server"
    assert ap["spec"]["rules"][0]["from"][0]["source"]["ipBlocks"] == ["10.0.0.1", "2001:db8::1"]
    validate(ap)


def test_tls_passthrough_is_treated_as_tcp_and_mixed_ports_are_noted(
        make_bookinfo: Make) -> None:
    g = make_bookinfo(None)
    g.edges.append(Edge("default/reviews-v1", "default/mysqldb-v1", 3307, "tls", requests=2,
                        mtls_requests=2))
    g.edges.append(Edge("default/reviews-v1", "default/mysqldb-v1", 8080, "http", requests=2,
                        mtls_requests=2, operations=[Operation("GET", "/x", 2)]))
    g.edges.append(Edge("default/reviews-v2", "default/mysqldb-v1", 8080, "tcp", requests=2,
                        mtls_requests=2))
    plan = plan_istio(g)
    ap = next(m for m in plan.manifests if m["metadata"]["name"] == "mysqldb-v1"
              and m["kind"] == "AuthorizationPolicy")
    for rule in ap["spec"]["rules"]:
        ops = [t["operation"] for t in rule["to"]]
        has_http = any("methods" in o for o in ops)
        tcp_ports = {"3306", "3307"} & {p for o in ops for p in o["ports"]}
        assert not (has_http and tcp_ports), rule
    # reviews-v1 and -v2 share a principal: their TCP ports form one ports-only operation
    assert {"operation": {"ports": ["3307", "8080"]}} in [t for r in ap["spec"]["rules"]
                                                          for t in r["to"]]
    expl = next(e for e in plan.explanations if e.name == "mysqldb-v1"
                and e.kind == "AuthorizationPolicy")
    assert any("port 8080 was seen as http, tcp" in n for n in expl.notes)
    validate(ap)


def test_uncoverable_destination_withholds_namespace_default_deny(make_bookinfo: Make) -> None:
    """allow-nothing would break observed traffic that no workload policy can express."""
    graph = make_bookinfo(None)
    pp = "default/productpage-v1"
    graph.nodes["default/bare"] = Node(id="default/bare", kind="Pod", namespace="default",
                                       workload="bare", selector={}, meshed=True)
    graph.edges.append(Edge(pp, "default/bare", 8080, "http", requests=3, mtls_requests=3))
    plan = plan_istio(graph)
    kinds = {(m["kind"], m["metadata"]["name"]) for m in plan.manifests
             if m["metadata"]["namespace"] == "default"}
    assert ("AuthorizationPolicy", "allow-nothing") not in kinds
    assert ("PeerAuthentication", "default") not in kinds
    assert ("AuthorizationPolicy", "details-v1") in kinds  # workload policies still proposed
    [withheld] = [x for x in plan.excluded if x["destination"] == "namespace default"]
    assert "default/bare" in withheld["reason"]
    # Traffic to a Service with several possible backends does the same.
    graph = make_bookinfo(None)
    graph.nodes["service:default/reviews"] = Node(id="service:default/reviews", kind="Service",
                                                  namespace="default")
    graph.edges.append(Edge(pp, "service:default/reviews", 9080, "http", requests=1))
    names = {m["metadata"]["name"] for m in istio_manifests(graph)
             if m["metadata"]["namespace"] == "default"}
    assert "allow-nothing" not in names


def test_client_only_namespaces_get_defaults_when_meshed() -> None:
    nodes = {
        "shop/web": Node("shop/web", "Deployment", "shop", "web", principal="cluster.local/ns/"
                         "shop/sa/web", selector={"app": "web"}, meshed=True, in_inventory=True),
        "jobs/cron": Node("jobs/cron", "CronJob", "jobs", "cron", principal="cluster.local/ns/"
                          "jobs/sa/cron", selector={"app": "cron"}, meshed=True),
        "legacy/old": Node("legacy/old", "Deployment", "legacy", "old", selector={"app": "old"},
                           meshed=False),
    }
    edges = [Edge("jobs/cron", "shop/web", 8080, "tcp", requests=2, mtls_requests=2),
             Edge("legacy/old", "shop/web", 8080, "tcp", requests=1, plaintext_requests=1,
                  source_ips=["10.1.2.3"])]
    names = {(m["metadata"]["namespace"], m["kind"], m["metadata"]["name"])
             for m in istio_manifests(Graph(nodes=nodes, edges=edges))}
    assert ("jobs", "AuthorizationPolicy", "allow-nothing") in names
    assert ("jobs", "PeerAuthentication", "default") in names
    assert not any(ns == "legacy" for ns, _, _ in names)  # no sidecars: nothing to enforce
    for manifest in istio_manifests(Graph(nodes=nodes, edges=edges)):
        validate(manifest)
