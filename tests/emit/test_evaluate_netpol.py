"""The NetworkPolicy evaluator against the policy Inspektor Gadget generated for Online
Boutique's cartservice; expected verdicts derived by hand from the Kubernetes documentation
(kubernetes.io/docs/concepts/services-networking/network-policies), reasoning inline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from emit.evaluate_netpol import Connection, Endpoint, NamedPort, evaluate_netpol, rule_parts

DATA = Path(__file__).resolve().parent.parent / "data" / "policies"


def _policy() -> list[dict[str, Any]]:
    with (DATA / "ig-advise-networkpolicy-boutique-cartservice.yaml").open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def pod(app: str, ns: str = "demo", ip: str = "10.244.0.10", **labels: str) -> Endpoint:
    return Endpoint(namespace=ns, labels={"app": app, **labels}, ip=ip,
                    ports=(NamedPort("grpc", 7070),))


CART = pod("cartservice", ip="10.244.0.20")
DNS = Endpoint(namespace="kube-system", labels={"k8s-app": "kube-dns"}, ip="10.244.0.2")

CASES = [
    # ingress[1]: podSelector app=frontend (same namespace as the policy), 7070/TCP
    ("frontend -> cart 7070", pod("frontend"), CART, 7070, "TCP", "allow"),
    ("checkout -> cart 7070", pod("checkoutservice"), CART, 7070, "TCP", "allow"),
    ("frontend -> cart 8080: port not listed", pod("frontend"), CART, 8080, "TCP", "deny"),
    ("frontend -> cart 7070/UDP: protocol", pod("frontend"), CART, 7070, "UDP", "deny"),
    ("payment -> cart: not a listed peer", pod("paymentservice"), CART, 7070, "TCP", "deny"),
    # a podSelector without namespaceSelector only selects pods of the policy's namespace
    ("frontend of another namespace", pod("frontend", ns="shop"), CART, 7070, "TCP", "deny"),
    # egress[0]: redis-cart 6379/TCP; redis itself is not isolated
    ("cart -> redis", CART, pod("redis-cart"), 6379, "TCP", "allow"),
    ("cart -> redis 6380", CART, pod("redis-cart"), 6380, "TCP", "deny"),
    ("cart -> redis of another namespace", CART, pod("redis-cart", ns="other"), 6379, "TCP",
     "deny"),
    # egress[1]: namespaceSelector AND podSelector (one peer): kube-dns in kube-system, 53/UDP
    ("cart -> kube-dns 53/UDP", CART, DNS, 53, "UDP", "allow"),
    ("cart -> kube-dns 53/TCP", CART, DNS, 53, "TCP", "deny"),
    ("cart -> a dns pod elsewhere", CART,
     Endpoint(namespace="dns", labels={"k8s-app": "kube-dns"}, ip="10.244.9.2"), 53, "UDP",
     "deny"),
    ("cart -> 8.8.8.8:53", CART, Endpoint(ip="8.8.8.8", external=True), 53, "UDP", "deny"),
    # frontend is not selected by any policy: its egress is unrestricted; other pods too
    ("frontend -> redis", pod("frontend"), pod("redis-cart"), 6379, "TCP", "allow"),
    # a source no inventory names: selector peers cannot be decided
    ("unknown address -> cart", Endpoint(ip="10.244.7.7"), CART, 7070, "TCP", "unknown"),
]


@pytest.mark.parametrize(("name", "src", "dst", "port", "proto", "verdict"), CASES)
def test_inspektor_gadget_cartservice_policy(name: str, src: Endpoint, dst: Endpoint,
                                             port: int, proto: str, verdict: str) -> None:
    d = evaluate_netpol(_policy(), Connection(src, dst, port, proto))
    assert d.verdict == verdict, (name, d.reason)


def test_node_traffic_is_always_allowed() -> None:
    d = evaluate_netpol(_policy(), Connection(Endpoint(ip="172.18.0.2"), CART, 8080, "TCP",
                                              from_node=True))
    assert d.verdict == "allow"


def test_hits_name_the_rule_and_peer() -> None:
    d = evaluate_netpol(_policy(), Connection(pod("frontend"), CART, 7070, "TCP"))
    assert d.hits == {"demo/cartservice-network": {"ingress[1]", "ingress[1].from[0]",
                                                   "ingress[1].ports[0]"}}
    assert [p for p, _ in rule_parts(_policy()[0])] == [
        "ingress[0]", "ingress[1]", "egress[0]", "egress[1]"]


def _np(spec: dict[str, Any], ns: str = "app") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": ns}, "spec": spec}


def test_ip_block_except_end_port_named_ports() -> None:
    api = Endpoint(namespace="app", labels={"app": "api"}, ip="10.0.0.5",
                   ports=(NamedPort("http", 8080), NamedPort("metrics", 9090)))
    policy = _np({"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
         "ports": [{"port": "http"}, {"port": 30000, "endPort": 30010}]}]})

    def verdict(ip: str, port: int) -> str:
        return evaluate_netpol([policy], Connection(Endpoint(ip=ip, external=True), api,
                                                    port)).verdict

    assert verdict("192.168.7.7", 8080) == "allow"   # named port http -> 8080
    assert verdict("192.168.7.7", 9090) == "deny"    # metrics is not listed
    assert verdict("192.168.1.7", 8080) == "deny"    # in except
    assert verdict("192.168.7.7", 30005) == "allow"  # within endPort
    assert verdict("192.168.7.7", 30011) == "deny"


def test_egress_only_policy_and_namespace_selector_alone() -> None:
    # policyTypes [Egress]: ingress is not isolated by it
    policy = _np({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "In", "values": ["data"]}]}}]}]})
    src = Endpoint(namespace="app", labels={"app": "x"}, ip="10.0.0.1")
    db = Endpoint(namespace="db", labels={"app": "pg"}, namespace_labels={"team": "data"})
    web = Endpoint(namespace="web", labels={"app": "pg"}, namespace_labels={"team": "web"})
    assert evaluate_netpol([policy], Connection(src, db, 5432)).verdict == "allow"
    assert evaluate_netpol([policy], Connection(src, web, 5432)).verdict == "deny"
    assert evaluate_netpol([policy], Connection(web, src, 80)).verdict == "allow"
    # an empty ingress list with type Ingress isolates and allows nothing
    deny_all = _np({"podSelector": {}, "policyTypes": ["Ingress"]})
    assert evaluate_netpol([deny_all], Connection(web, src, 80)).verdict == "deny"
