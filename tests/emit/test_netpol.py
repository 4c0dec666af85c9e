"""emit/netpol.py: valid NetworkPolicies allowing exactly the observed peers and ports."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support.schemas_emitters import validate_netpol

from emit.netpol import plan_netpol
from emit.yamlio import dump_yaml
from learn.model import Edge, Graph, Node
from learn.workloads import ClusterFacts, cluster_facts
from observe.inventory import Inventory, load_inventory

DATA = Path(__file__).parent.parent / "data"
Make = Callable[[int | None], Graph]


def _facts() -> ClusterFacts:
    return cluster_facts(load_inventory([DATA / "inventory" / "istio-samples-bookinfo.yaml",
                                         DATA / "inventory" / "coredns-deployment-coredns"
                                                              "-2018.yaml.sed"]))


def _by(manifests: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in manifests}


# --- a reference reading of NetworkPolicy (kubernetes.io network-policies concept page) -----


def _selects(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(sel) <= {"matchLabels", "matchExpressions"}
    ok = all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())
    for ex in sel.get("matchExpressions", []):
        assert ex["operator"] == "In"
        ok &= labels.get(ex["key"]) in ex["values"]
    return ok


Pod = tuple[str, dict[str, str], str]  # namespace, labels, ip


def _peer_ok(peer: dict[str, Any], pod: Pod | None, ip: str) -> bool:
    if "ipBlock" in peer:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(peer["ipBlock"]["cidr"])
    if pod is None:
        return False
    ns, labels, _ = pod
    ns_ok = _selects(peer.get("namespaceSelector", {}), {"kubernetes.io/metadata.name": ns})
    if "namespaceSelector" not in peer:
        raise AssertionError("emitted peers always pin the namespace")
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


def _allows(manifests: list[dict[str, Any]], direction: str, subject: Pod, peer: Pod | None,
            peer_ip: str, port: int, proto: str) -> bool:
    """Is ``subject``'s ingress from (egress to) the peer on port/proto allowed?"""
    key, peers_key, ptype = (("ingress", "from", "Ingress") if direction == "ingress"
                             else ("egress", "to", "Egress"))
    ns, labels, _ = subject
    selecting = [m for m in manifests if m["metadata"]["namespace"] == ns
                 and ptype in m["spec"]["policyTypes"]
                 and _selects(m["spec"]["podSelector"], labels)]
    if not selecting:
        return True  # not isolated
    for m in selecting:
        for rule in m["spec"].get(key, []):
            ports_ok = not rule.get("ports") or any(
                p["port"] == port and p["protocol"] == proto for p in rule["ports"])
            peers_ok = peers_key not in rule or any(
                _peer_ok(p, peer, peer_ip) for p in rule[peers_key])
            if ports_ok and peers_ok:
                return True
    return False


PP: Pod = ("default", {"app": "productpage", "version": "v1"}, "10.0.0.10")
DETAILS: Pod = ("default", {"app": "details", "version": "v1"}, "10.0.0.11")
RATINGS: Pod = ("default", {"app": "ratings", "version": "v1"}, "10.0.0.12")
REVIEWS2: Pod = ("default", {"app": "reviews", "version": "v2"}, "10.0.0.13")
LEGACY: Pod = ("default", {"app": "legacy-client"}, "10.1.2.3")
MYSQL: Pod = ("default", {"app": "mysqldb", "version": "v1"}, "10.0.0.14")
IDLE: Pod = ("default", {"app": "idle", "version": "v1"}, "10.0.0.15")
COREDNS: Pod = ("kube-system", {"k8s-app": "coredns"}, "10.0.0.2")
KUBEDNS: Pod = ("kube-system", {"k8s-app": "kube-dns"}, "10.0.0.3")


# --- validator ----------------------------------------------------------------------------


def test_validator_accepts_a_real_networkpolicy_and_rejects_broken_ones() -> None:
    (real,) = yaml.safe_load_all(
        (DATA / "policies" / "ig-advise-networkpolicy-boutique-cartservice.yaml")
        .read_text("utf-8"))
    real["metadata"] = {"name": "x", "namespace": "demo",
                        "labels": {"app.kubernetes.io/managed-by": "meshwright"},
                        "annotations": {}}
    validate_netpol(real)
    bad = {**real, "spec": {**real["spec"], "policyTypes": "Ingress"}}
    with pytest.raises(jsonschema.ValidationError):
        validate_netpol(bad)
    bad_cidr = {**real, "spec": {**real["spec"], "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.1/8"}}]}]}}
    with pytest.raises(ValueError):
        validate_netpol(bad_cidr)


# --- Bookinfo -----------------------------------------------------------------------------


@pytest.mark.parametrize("egress", [False, True])
def test_every_manifest_is_schema_valid(make_bookinfo: Make, egress: bool) -> None:
    plan = plan_netpol(make_bookinfo(None), _facts(), egress=egress)
    assert plan.manifests
    for m in plan.manifests:
        validate_netpol(m)
        assert yaml.safe_load(dump_yaml(m)) == m
    has_egress = any("Egress" in m["spec"]["policyTypes"] for m in plan.manifests)
    assert has_egress == egress


def test_golden_bookinfo_and_determinism(make_bookinfo: Make,
                                         golden: Callable[[str, str], None]) -> None:
    text = dump_yaml(plan_netpol(make_bookinfo(None), _facts(), egress=True).manifests)
    golden("emit/bookinfo-netpol.yaml", text)
    for seed in (None, 1, 2, 3):
        assert dump_yaml(plan_netpol(make_bookinfo(seed), _facts(),
                                     egress=True).manifests) == text


def test_bookinfo_ingress_exactly_the_observed_peers(make_bookinfo: Make) -> None:
    ms = plan_netpol(make_bookinfo(None), _facts()).manifests
    # hand-derived from the graph: details-v1 is called by productpage-v1 and legacy-client
    # on 9080 only; ratings-v1 by reviews-v2/v3 (legacy-client's requests were all denied)
    assert _allows(ms, "ingress", DETAILS, PP, PP[2], 9080, "TCP")
    assert _allows(ms, "ingress", DETAILS, LEGACY, LEGACY[2], 9080, "TCP")
    assert not _allows(ms, "ingress", DETAILS, PP, PP[2], 9081, "TCP")
    assert not _allows(ms, "ingress", DETAILS, REVIEWS2, REVIEWS2[2], 9080, "TCP")
    assert _allows(ms, "ingress", RATINGS, REVIEWS2, REVIEWS2[2], 9080, "TCP")
    assert not _allows(ms, "ingress", RATINGS, LEGACY, LEGACY[2], 9080, "TCP")
    assert _allows(ms, "ingress", MYSQL, RATINGS, RATINGS[2], 3306, "TCP")
    assert not _allows(ms, "ingress", MYSQL, PP, PP[2], 3306, "TCP")
    # the unattributed client is pinned by its address only
    assert _allows(ms, "ingress", PP, None, "10.9.9.9", 9080, "TCP")
    assert not _allows(ms, "ingress", PP, None, "10.9.9.8", 9080, "TCP")
    # nobody was seen calling idle-v1: the namespace default-deny covers it
    assert not _allows(ms, "ingress", IDLE, PP, PP[2], 9080, "TCP")
    same_ns_peer = ms[[m["metadata"]["name"] for m in ms].index("details-v1-ingress")]
    for peer in same_ns_peer["spec"]["ingress"][0]["from"]:
        assert peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": "default"}}
    # gateway: public listener open to any source on the observed port only
    gw = _by(ms)[("istio-system", "istio-ingressgateway-ingress")]
    assert gw["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    # system namespaces never get a default-deny; scratch's orphan blocks its namespace's
    names = set(_by(ms))
    assert ("default", "default-deny-ingress") in names
    assert not {n for n in names if n[0] in ("kube-system", "istio-system")
                and n[1].startswith("default-deny")}
    assert ("scratch", "default-deny-ingress") not in names


def test_egress_keeps_dns_with_the_inventory_labels(make_bookinfo: Make) -> None:
    plan = plan_netpol(make_bookinfo(None), _facts(), egress=True)
    ms = plan.manifests
    # the 2018 CoreDNS manifest's Service selects k8s-app=coredns, not kube-dns
    assert _allows(ms, "egress", RATINGS, COREDNS, COREDNS[2], 53, "UDP")
    assert _allows(ms, "egress", RATINGS, COREDNS, COREDNS[2], 53, "TCP")
    assert not _allows(ms, "egress", RATINGS, KUBEDNS, KUBEDNS[2], 53, "UDP")
    assert _allows(ms, "egress", RATINGS, MYSQL, MYSQL[2], 3306, "TCP")
    assert not _allows(ms, "egress", RATINGS, DETAILS, DETAILS[2], 9080, "TCP")
    # the namespace default keeps DNS for pods with no observed destination
    dd = _by(ms)[("scratch", "default-deny-egress")]
    assert {"k8s-app": "coredns"} in [p["podSelector"]["matchLabels"]
                                      for r in dd["spec"]["egress"] for p in r.get("to", [])
                                      if "podSelector" in p]
    # a host name cannot be expressed: reviews-v2 keeps unrestricted egress, and so does
    # its namespace (no default-deny egress), both listed
    assert ("default", "reviews-v2-egress") not in _by(ms)
    assert ("default", "default-deny-egress") not in _by(ms)
    reasons = [x["reason"] for x in plan.excluded if x["source"] == "default/reviews-v2"]
    assert any("host name" in r for r in reasons)


def test_dns_rule_follows_whatever_labels_the_inventory_shows() -> None:
    inv = Inventory()
    inv.add_object({"kind": "Service", "metadata": {"name": "kube-dns", "namespace": "dns"},
                    "spec": {"selector": {"example.org/dns": "edge"},
                             "ports": [{"name": "dns", "port": 53, "protocol": "UDP",
                                        "targetPort": 5353}]}})
    facts = cluster_facts(inv)
    g = Graph(nodes={"a/web": Node(id="a/web", kind="Deployment", namespace="a",
                                   workload="web", selector={"app": "web"})},
              edges=[Edge(source="a/web", destination="external:198.51.100.7", port=443,
                          protocol="tcp", requests=2),
                     Edge(source="a/web", destination="external:2001:db8::5", port=443,
                          protocol="tcp", requests=1)])
    g.nodes["external:198.51.100.7"] = Node(id="external:198.51.100.7", kind="external")
    g.nodes["external:2001:db8::5"] = Node(id="external:2001:db8::5", kind="external")
    plan = plan_netpol(g, facts, egress=True)
    pol = _by(plan.manifests)[("a", "web-egress")]
    for m in plan.manifests:
        validate_netpol(m)
    assert {"ports": [{"port": 5353, "protocol": "UDP"}],
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dns"}},
                    "podSelector": {"matchLabels": {"example.org/dns": "edge"}}}]} \
        in pol["spec"]["egress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "198.51.100.7/32"}},
                   {"ipBlock": {"cidr": "2001:db8::5/128"}}]} in pol["spec"]["egress"]
    # no inventory: DNS cannot be pinned, port 53 stays open to any destination
    blind = _by(plan_netpol(g, None, egress=True).manifests)[("a", "web-egress")]
    assert {"ports": [{"port": 53, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]} \
        in blind["spec"]["egress"]


def test_udp_edges_and_unexpressible_sources() -> None:
    web = Node(id="a/web", kind="Deployment", namespace="a", workload="web",
               selector={"app": "web"})
    bare = Node(id="a/bare", kind="Pod", namespace="a", workload="bare", selector={})
    stats = Node(id="a/stats", kind="Deployment", namespace="a", workload="stats",
                 selector={"app": "stats"})
    g = Graph(nodes={n.id: n for n in (web, bare, stats)},
              edges=[Edge(source="a/web", destination="a/stats", port=8125, protocol="udp",
                          requests=0, connections=4),
                     Edge(source="a/bare", destination="a/web", port=80, protocol="http",
                          requests=3)])
    plan = plan_netpol(g, None)
    by = _by(plan.manifests)
    assert by[("a", "stats-ingress")]["spec"]["ingress"][0]["ports"] == [
        {"port": 8125, "protocol": "UDP"}]
    # a caller without selector cannot be allowed: web is left unisolated, and so is a
    assert ("a", "web-ingress") not in by and ("a", "default-deny-ingress") not in by
    assert any("no pod selector" in x["reason"] for x in plan.excluded
               if x["source"] == "a/bare")
