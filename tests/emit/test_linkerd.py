"""emit/linkerd.py: schema-valid against Linkerd's CRDs, least privilege, probes kept, stable."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support.schemas_emitters import validate_linkerd

from emit.linkerd import Match, family_match, linkerd_identity, plan_linkerd
from emit.yamlio import dump_yaml
from learn.model import Edge, Graph, Node, Operation
from learn.workloads import ClusterFacts, ProbeFact, WorkloadFacts, cluster_facts
from observe.inventory import load_inventory

DATA = Path(__file__).parent.parent / "data"
Make = Callable[[int | None], Graph]
TD = "cluster.local"


def _facts() -> ClusterFacts:
    return cluster_facts(load_inventory([DATA / "inventory" / "istio-samples-bookinfo.yaml"]))


def _by(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


# --- a reference reading of how Linkerd decides, written from linkerd2-proxy's rules -------


def _route_wins(route_matches: list[tuple[str, dict[str, Any]]], method: str,
                path: str) -> str | None:
    """Name of the route a request takes: longest path match, then a method match."""
    best: tuple[int, bool] | None = None
    winner = None
    for name, m in route_matches:
        if "method" in m and m["method"] != method:
            continue
        kind, value = m["path"]["type"], m["path"]["value"]
        if kind == "Exact":
            if path != value:
                continue
            score = len(value)
        else:
            stem = value.rstrip("/")
            rest = path.rstrip("/")
            if stem and not (rest == stem or rest.startswith(stem + "/")):
                continue
            score = len(stem) or 1
        key = (score, "method" in m)
        if best is None or key > best:
            best, winner = key, name
    return winner


def _allowed(manifests: list[dict[str, Any]], server: str, identity: str | None, ip: str,
             method: str, path: str) -> bool:
    """Would Linkerd allow this HTTP request to ``server``?"""
    routes = [r for r in _by(manifests, "HTTPRoute").values()
              if r["spec"]["parentRefs"][0]["name"] == server]
    aps = _by(manifests, "AuthorizationPolicy").values()
    targets = {("Server", server)}
    if routes:
        matches = [(r["metadata"]["name"], m) for r in routes
                   for rule in r["spec"]["rules"] for m in rule["matches"]]
        win = _route_wins(matches, method, path)
        if win is None:
            return False  # 404: no route
        targets.add(("HTTPRoute", win))
    for ap in aps:
        t = ap["spec"]["targetRef"]
        if (t["kind"], t["name"]) not in targets:
            continue
        ok = True
        for ref in ap["spec"]["requiredAuthenticationRefs"]:
            authn = _by(manifests, ref["kind"])[ref["name"]]["spec"]
            if ref["kind"] == "MeshTLSAuthentication":
                ok &= identity is not None and identity in authn["identities"]
            else:
                ok &= any(ipaddress.ip_address(ip) in ipaddress.ip_network(n["cidr"])
                          for n in authn["networks"])
        if ok:
            return True
    return False


# --- the validator ------------------------------------------------------------------------


def test_validator_accepts_linkerd_docs_policies_and_rejects_broken_ones() -> None:
    docs = [d for d in yaml.safe_load_all(
        (DATA / "policies" / "linkerd-docs-booksapp-per-route-policy.yaml").read_text("utf-8"))
        if d and d["apiVersion"] != "policy.linkerd.io/v1beta1"]
    assert {d["kind"] for d in docs} == {"Server", "AuthorizationPolicy",
                                         "MeshTLSAuthentication", "NetworkAuthentication"}
    for d in docs:
        d["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "meshwright"}
        d["metadata"]["annotations"] = {}
        validate_linkerd(d)
    server = next(d for d in docs if d["kind"] == "Server")
    with pytest.raises(jsonschema.ValidationError):
        validate_linkerd({**server, "spec": {"podSelector": server["spec"]["podSelector"]}})
    ap = next(d for d in docs if d["kind"] == "AuthorizationPolicy")
    with pytest.raises(jsonschema.ValidationError):
        validate_linkerd({**ap, "spec": {"targetRef": ap["spec"]["targetRef"]}})
    with pytest.raises(AssertionError):
        validate_linkerd({**server, "apiVersion": "policy.linkerd.io/v1beta1"})


# --- Bookinfo -----------------------------------------------------------------------------


@pytest.mark.parametrize("allow_unmeshed", [False, True])
@pytest.mark.parametrize("audit", [False, True])
def test_every_manifest_is_schema_valid(make_bookinfo: Make, allow_unmeshed: bool,
                                        audit: bool) -> None:
    plan = plan_linkerd(make_bookinfo(None), _facts(), allow_unmeshed=allow_unmeshed,
                        audit=audit)
    assert plan.manifests
    for m in plan.manifests:
        validate_linkerd(m)
        assert yaml.safe_load(dump_yaml(m)) == m
    servers = _by(plan.manifests, "Server")
    assert all(("accessPolicy" in s["spec"]) == audit for s in servers.values())
    # every reference resolves to an emitted object
    names = {(m["kind"], m["metadata"]["namespace"], m["metadata"]["name"])
             for m in plan.manifests}
    for m in plan.manifests:
        ns = m["metadata"]["namespace"]
        refs = list(m["spec"].get("parentRefs", []))
        if m["kind"] == "AuthorizationPolicy":
            refs += [m["spec"]["targetRef"], *m["spec"]["requiredAuthenticationRefs"]]
        for ref in refs:
            assert (ref["kind"], ns, ref["name"]) in names, ref


def test_golden_bookinfo_and_determinism(make_bookinfo: Make,
                                         golden: Callable[[str, str], None]) -> None:
    text = dump_yaml(plan_linkerd(make_bookinfo(None), _facts()).manifests)
    golden("emit/bookinfo-linkerd.yaml", text)
    assert dump_yaml(plan_linkerd(make_bookinfo(None), _facts()).manifests) == text
    for seed in (1, 2, 3):
        assert dump_yaml(plan_linkerd(make_bookinfo(seed), _facts()).manifests) == text


def test_bookinfo_least_privilege_hand_derived(make_bookinfo: Make) -> None:
    plan = plan_linkerd(make_bookinfo(None), _facts())
    ms = plan.manifests
    reviews_id = linkerd_identity("default", "bookinfo-reviews", TD)
    pp_id = linkerd_identity("default", "bookinfo-productpage", TD)
    assert reviews_id == "bookinfo-reviews.default.serviceaccount.identity.linkerd.cluster.local"
    servers = _by(ms, "Server")
    # ratings: reviews-v2 GET /ratings/*, reviews-v3 GET /ratings/* + POST /ratings/rate, one
    # identity: one route with exactly those two matches
    assert servers["ratings-v1-9080"]["spec"] == {
        "podSelector": {"matchLabels": {"app": "ratings", "version": "v1"}},
        "port": 9080, "proxyProtocol": "unknown"}
    routes = {n: r for n, r in _by(ms, "HTTPRoute").items() if n.startswith("ratings-v1")}
    assert list(routes) == ["ratings-v1-9080-route-1"]
    assert routes["ratings-v1-9080-route-1"]["spec"]["rules"] == [{"matches": [
        {"method": "POST", "path": {"type": "Exact", "value": "/ratings/rate"}},
        {"method": "GET", "path": {"type": "PathPrefix", "value": "/ratings/"}}]}]
    assert _by(ms, "MeshTLSAuthentication")["ratings-v1-9080-route-1"]["spec"] == {
        "identities": [reviews_id]}
    # mysql over TCP: whole-port policy, opaque
    assert servers["mysqldb-v1-3306"]["spec"]["proxyProtocol"] == "opaque"
    assert _by(ms, "AuthorizationPolicy")["mysqldb-v1-3306"]["spec"]["targetRef"] == {
        "group": "policy.linkerd.io", "kind": "Server", "name": "mysqldb-v1-3306"}
    # the replay: observed requests allowed, unobserved ones not
    assert _allowed(ms, "ratings-v1-9080", reviews_id, "10.0.0.1", "GET", "/ratings/0")
    assert _allowed(ms, "ratings-v1-9080", reviews_id, "10.0.0.1", "POST", "/ratings/rate")
    assert not _allowed(ms, "ratings-v1-9080", reviews_id, "10.0.0.1", "DELETE", "/ratings/0")
    assert not _allowed(ms, "ratings-v1-9080", pp_id, "10.0.0.1", "GET", "/ratings/0")
    assert _allowed(ms, "details-v1-9080", pp_id, "10.0.0.1", "GET", "/details/0")
    # no pod selector, system namespace, external destination: no policy, listed
    reasons = {(x["source"], x["destination"]): x["reason"] for x in plan.excluded}
    assert "pod selector" in reasons[("default/productpage-v1", "scratch/orphan")]
    assert "system namespace" in reasons[("default/productpage-v1", "istio-system/istiod")]
    # the deny default is documented, not emitted
    assert not [m for m in ms if m["kind"] == "Namespace"]
    assert any("config.linkerd.io/default-inbound-policy=deny" in n for n in plan.notes)


def test_unmeshed_clients_only_with_the_option(make_bookinfo: Make) -> None:
    off = plan_linkerd(make_bookinfo(None), _facts())
    left = {(x["source"], x["destination"]) for x in off.excluded
            if "allow_unmeshed off" in x["reason"]}
    assert left == {("default/legacy-client", "default/details-v1"),
                    ("unknown:10.9.9.9", "default/productpage-v1")}
    assert not [m for m in _by(off.manifests, "NetworkAuthentication").values()
                if m["metadata"]["namespace"] == "default"] and not off.findings
    assert not _allowed(off.manifests, "details-v1-9080", None, "10.1.2.3", "GET", "/details/1")

    on = plan_linkerd(make_bookinfo(None), _facts(), allow_unmeshed=True)
    nets = {n: a["spec"]["networks"] for n, a in _by(on.manifests,
                                                     "NetworkAuthentication").items()}
    assert {"cidr": "10.1.2.3/32"} in [x for v in nets.values() for x in v]
    assert {f.source for f in on.findings} == {"default/legacy-client", "unknown:10.9.9.9"}
    assert all(f.kind == "unmeshed-allowed" for f in on.findings)
    ms = on.manifests
    assert _allowed(ms, "details-v1-9080", None, "10.1.2.3", "GET", "/details/1")
    assert _allowed(ms, "details-v1-9080", None, "10.1.2.4", "HEAD", "/health")
    assert not _allowed(ms, "details-v1-9080", None, "10.1.2.5", "GET", "/details/1")
    # the mesh client did not gain HEAD /health
    pp_id = linkerd_identity("default", "bookinfo-productpage", TD)
    assert not _allowed(ms, "details-v1-9080", pp_id, "10.9.0.1", "HEAD", "/health")
    assert _allowed(ms, "productpage-v1-9080", None, "10.9.9.9", "GET", "/health")


# --- targeted cases -----------------------------------------------------------------------


def _node(ns: str, name: str, sa: str, **kw: Any) -> Node:
    return Node(id=f"{ns}/{name}", kind="Deployment", namespace=ns, workload=name,
                service_account=sa, principal=f"{TD}/ns/{ns}/sa/{sa}",
                selector={"app": name}, meshed=True, in_inventory=True, **kw)


def _e(src: str, dst: str, port: int, proto: str, *ops: tuple[str, str], **kw: Any) -> Edge:
    operations = [Operation(m, p, 3) for m, p in ops]
    e = Edge(source=src, destination=dst, port=port, protocol=proto,
             requests=3 * max(1, len(ops)), operations=operations,
             evidence=[f"{dst}.log:1"])
    e.mtls_requests = e.requests
    for k, v in kw.items():
        setattr(e, k, v)
    return e


def _graph(nodes: list[Node], edges: list[Edge]) -> Graph:
    return Graph(nodes={n.id: n for n in nodes}, edges=edges, trust_domain=TD)


def _web_facts(probes: list[str], port: int = 8080, **kw: Any) -> ClusterFacts:
    wf = WorkloadFacts(id="shop/web", namespace="shop", name="web", kind="Deployment",
                       probes=tuple(ProbeFact("readiness", "httpGet", port, p, "web")
                                    for p in probes), mesh="linkerd", meshed=True, **kw)
    return ClusterFacts(workloads={wf.id: wf})


def test_probe_route_when_routes_exist() -> None:
    nodes = [_node("shop", "web", "web"), _node("shop", "api", "api"),
             _node("shop", "mon", "mon")]
    g = _graph(nodes, [_e("shop/api", "shop/web", 8080, "http", ("GET", "/items/*")),
                       _e("shop/mon", "shop/web", 8080, "http", ("GET", "*"))])
    plan = plan_linkerd(g, _web_facts(["/healthz"]))
    ms = plan.manifests
    for m in ms:
        validate_linkerd(m)
    probe = {"method": "GET", "path": {"type": "Exact", "value": "/healthz"}}
    (route,) = [r for r in _by(ms, "HTTPRoute").values()
                if probe in r["spec"]["rules"][0]["matches"]]
    # mon's "any path" covers the probe path, so the probe route is shared with it
    assert route["spec"]["rules"] == [{"matches": [probe]}]
    name = route["metadata"]["name"]
    assert _by(ms, "NetworkAuthentication")[f"{name}-net"]["spec"] == {
        "networks": [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]}
    assert _by(ms, "MeshTLSAuthentication")[name]["spec"] == {
        "identities": [linkerd_identity("shop", "mon", TD)]}
    # the kubelet (no identity, node address) reaches the probe path and nothing else
    assert _allowed(ms, "web-8080", None, "192.168.1.5", "GET", "/healthz")
    assert not _allowed(ms, "web-8080", None, "192.168.1.5", "GET", "/items/1")
    # mon's "any path" covers /healthz: the more specific probe route must not shadow it
    mon = linkerd_identity("shop", "mon", TD)
    api = linkerd_identity("shop", "api", TD)
    assert _allowed(ms, "web-8080", mon, "10.0.0.3", "GET", "/healthz")
    assert _allowed(ms, "web-8080", mon, "10.0.0.3", "GET", "/items/7")
    assert _allowed(ms, "web-8080", api, "10.0.0.2", "GET", "/items/7")
    # the probe path is open to any address, as Linkerd's own default probe authorization
    assert _allowed(ms, "web-8080", api, "10.0.0.2", "GET", "/healthz")
    assert not _allowed(ms, "web-8080", api, "10.0.0.2", "GET", "/metrics")
    assert not _allowed(ms, "web-8080", api, "10.0.0.2", "POST", "/items/7")


def test_probe_default_kept_without_routes_and_warned_without_probe_facts() -> None:
    nodes = [_node("shop", "web", "web"), _node("shop", "api", "api")]
    tcp = _graph(nodes, [_e("shop/api", "shop/web", 8080, "http")])  # no method/path
    plan = plan_linkerd(tcp, _web_facts(["/healthz"]))
    assert not _by(plan.manifests, "HTTPRoute")
    notes = plan.explanations[[e.kind for e in plan.explanations].index("Server")].notes
    assert any("keeps authorizing the kubelet's probes (/healthz)" in n for n in notes)
    routed = _graph(nodes, [_e("shop/api", "shop/web", 8080, "http", ("GET", "/a"))])
    plan = plan_linkerd(routed, _web_facts([]))
    notes = next(e for e in plan.explanations if e.kind == "Server").notes
    assert any("no httpGet probe is known" in n for n in notes)


def test_suffix_family_falls_back_to_the_server_and_keeps_routes_findable() -> None:
    nodes = [_node("shop", "web", "web"), _node("shop", "api", "api"),
             _node("shop", "cdn", "cdn")]
    g = _graph(nodes, [_e("shop/api", "shop/web", 8080, "http", ("GET", "/items/*")),
                       _e("shop/cdn", "shop/web", 8080, "http", ("GET", "*.css"))])
    plan = plan_linkerd(g, _web_facts(["/healthz"]))
    ms = plan.manifests
    for m in ms:
        validate_linkerd(m)
    cdn, api = linkerd_identity("shop", "cdn", TD), linkerd_identity("shop", "api", TD)
    server_ap = _by(ms, "AuthorizationPolicy")["web-8080"]
    assert server_ap["spec"]["targetRef"]["kind"] == "Server"
    assert _by(ms, "MeshTLSAuthentication")["web-8080"]["spec"]["identities"] == [cdn]
    assert "web-8080-any" in _by(ms, "HTTPRoute")  # else cdn's requests would get 404
    notes = next(e for e in plan.explanations if e.kind == "Server").notes
    assert any("suffix family '*.css' has no HTTPRoute equivalent" in n for n in notes)
    assert _allowed(ms, "web-8080", cdn, "10.0.0.5", "GET", "/static/site.css")
    assert _allowed(ms, "web-8080", api, "10.0.0.2", "GET", "/items/1")
    assert not _allowed(ms, "web-8080", api, "10.0.0.2", "GET", "/static/site.css")
    assert _allowed(ms, "web-8080", None, "192.168.1.5", "GET", "/healthz")


def test_precedence_tie_between_exact_and_prefix_allows_both_clients() -> None:
    nodes = [_node("shop", "web", "web"), _node("shop", "a", "a"), _node("shop", "b", "b")]
    g = _graph(nodes, [_e("shop/a", "shop/web", 8080, "http", ("GET", "/x")),
                       _e("shop/b", "shop/web", 8080, "http", ("GET", "/x/*"))])
    plan = plan_linkerd(g, _web_facts(["/healthz"]))
    a, b = linkerd_identity("shop", "a", TD), linkerd_identity("shop", "b", TD)
    assert _allowed(plan.manifests, "web-8080", a, "10.0.0.1", "GET", "/x")
    assert _allowed(plan.manifests, "web-8080", b, "10.0.0.2", "GET", "/x")
    assert _allowed(plan.manifests, "web-8080", b, "10.0.0.2", "GET", "/x/1")


@pytest.mark.parametrize(("exact_client", "prefix_client"), [("a", "b"), ("z", "a")])
def test_precedence_tie_whichever_route_sorts_first(exact_client: str,
                                                    prefix_client: str) -> None:
    # Exact /x GET and PathPrefix /x/ GET both score (2 characters, method) for GET /x: the
    # proxy takes the route that sorts first (by name here), so both must allow both clients,
    # whichever client's route that is.
    nodes = [_node("shop", "web", "web"), _node("shop", exact_client, exact_client),
             _node("shop", prefix_client, prefix_client)]
    g = _graph(nodes, [_e(f"shop/{exact_client}", "shop/web", 8080, "http", ("GET", "/x")),
                       _e(f"shop/{prefix_client}", "shop/web", 8080, "http", ("GET", "/x/*"))])
    ms = plan_linkerd(g, _web_facts(["/healthz"])).manifests
    ex = linkerd_identity("shop", exact_client, TD)
    pre = linkerd_identity("shop", prefix_client, TD)
    assert _allowed(ms, "web-8080", ex, "10.0.0.1", "GET", "/x")
    assert _allowed(ms, "web-8080", pre, "10.0.0.2", "GET", "/x/1")
    # (the price of the tie: the exact client is allowed under /x/ as well - documented)
    assert _allowed(ms, "web-8080", pre, "10.0.0.2", "GET", "/x")


def test_a_method_match_does_not_tie_with_the_catch_all() -> None:
    # c is allowed the whole port (no method/path recorded): a catch-all route exists. d's
    # prefix /api* widens to PathPrefix / with GET: for GET it outranks the catch-all (a
    # method given), for anything else only the catch-all matches - whose authorization is
    # the Server's (c only). Merging them as a tie would let d PATCH anything.
    nodes = [_node("shop", "web", "web"), _node("shop", "c", "c"), _node("shop", "d", "d")]
    g = _graph(nodes, [_e("shop/c", "shop/web", 8080, "http"),
                       _e("shop/d", "shop/web", 8080, "http", ("GET", "/api*"))])
    ms = plan_linkerd(g, _web_facts([])).manifests
    c, d = linkerd_identity("shop", "c", TD), linkerd_identity("shop", "d", TD)
    assert _allowed(ms, "web-8080", d, "10.0.0.4", "GET", "/anything")
    assert not _allowed(ms, "web-8080", d, "10.0.0.4", "PATCH", "/anything")
    assert _allowed(ms, "web-8080", c, "10.0.0.3", "PATCH", "/anything")


def test_grpc_ports_routes_need_http2_and_unitemized_stays_grpc() -> None:
    nodes = [_node("shop", "cart", "cart"), _node("shop", "web", "web")]
    method = "/hipstershop.CartService/GetCart"
    routed = plan_linkerd(_graph(nodes, [_e("shop/web", "shop/cart", 7070, "grpc",
                                            ("POST", method))]))
    server = _by(routed.manifests, "Server")["cart-7070"]
    assert server["spec"]["proxyProtocol"] == "HTTP/2"
    assert _by(routed.manifests, "HTTPRoute")["cart-7070-route-1"]["spec"]["rules"] == [
        {"matches": [{"method": "POST", "path": {"type": "Exact", "value": method}}]}]
    sampled = plan_linkerd(_graph(nodes, [_e("shop/web", "shop/cart", 7070, "grpc",
                                             ("POST", method), requests_itemized=False)]))
    assert _by(sampled.manifests, "Server")["cart-7070"]["spec"]["proxyProtocol"] == "gRPC"
    assert not _by(sampled.manifests, "HTTPRoute")


def test_port_by_name_trust_domain_udp_and_unmeshed_destination() -> None:
    nodes = [_node("shop", "web", "web", ), _node("shop", "api", "api"),
             _node("shop", "legacy", "legacy", )]
    nodes[2].meshed = False
    g = _graph(nodes, [_e("shop/api", "shop/web", 8080, "http", ("GET", "/a")),
                       _e("shop/web", "shop/legacy", 9000, "tcp"),
                       _e("shop/api", "shop/web", 5353, "udp")])
    facts = cluster_facts(load_inventory([DATA / "inventory" / "linkerd2-injected-emojivoto"
                                                              "-web-deployment.golden.yml"]))
    wf = facts.workloads["emojivoto/web"]
    facts.workloads["shop/web"] = WorkloadFacts(
        id="shop/web", namespace="shop", name="web", kind="Deployment",
        ports=tuple(p.__class__(8080, p.name, p.protocol, p.container) for p in wf.ports),
        mesh="linkerd", meshed=True)
    plan = plan_linkerd(g, facts, trust_domain="example.org")
    servers = _by(plan.manifests, "Server")
    assert servers["web-8080"]["spec"]["port"] == "http"
    assert _by(plan.manifests, "MeshTLSAuthentication")["web-8080-route-1"]["spec"] == {
        "identities": ["api.shop.serviceaccount.identity.linkerd.example.org"]}
    assert any("UDP" in x["reason"] for x in plan.excluded if x["port"] == 5353)
    notes = next(e for e in plan.explanations
                 if (e.kind, e.name) == ("Server", "legacy-9000")).notes
    assert any("not enforced until it is injected" in n for n in notes)


@pytest.mark.parametrize(("method", "family", "expected"), [
    ("GET", "/a/b", Match("Exact", "/a/b", "GET")),
    ("GET", "/a/*", Match("PathPrefix", "/a/", "GET")),
    ("get", "*", Match("PathPrefix", "/", "GET")),
    ("GET", "/a/ite*", Match("PathPrefix", "/a/", "GET")),
    ("GET", "*.css", None),
    ("GET", "/u/{*}/x", None),
    ("PROPFIND", "/a", None),
])
def test_family_match(method: str, family: str, expected: Match | None) -> None:
    assert family_match(method, family)[0] == expected
