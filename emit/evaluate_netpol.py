"""Decide what Kubernetes NetworkPolicies do to one connection, the way a CNI enforces them.

Semantics of ``networking.k8s.io/v1`` NetworkPolicy, from the Kubernetes documentation:

* https://kubernetes.io/docs/concepts/services-networking/network-policies/
* https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/
* https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/

What is modelled:

* Isolation: a pod is isolated for ingress (egress) when some NetworkPolicy in its namespace
  selects it (``podSelector``; ``{}`` selects every pod) and lists ``Ingress`` (``Egress``) in
  ``policyTypes``. Without ``policyTypes`` a policy has type Ingress, plus Egress when it has an
  ``egress`` section. A connection needs both the source's egress and the destination's ingress
  to allow it; a side that is not isolated allows everything. Policies are additive (a union of
  allow rules); nothing denies explicitly.
* A rule matches when one of its peers (``from``/``to``; absent or empty = every peer) and one
  of its ``ports`` (absent or empty = every port) match. Peers: ``podSelector`` alone = pods in
  the policy's namespace; ``namespaceSelector`` alone = every pod of the selected namespaces
  (``kubernetes.io/metadata.name`` is always a namespace label); both = pods matching both;
  ``ipBlock`` = addresses in ``cidr`` and in none of ``except``. Selectors support matchLabels
  and matchExpressions (In, NotIn, Exists, DoesNotExist).
* Ports: number or named container port (resolved against the *destination* pod's declared
  container ports), ``protocol`` TCP (default), UDP or SCTP, ``endPort`` for ranges.
* Traffic between a pod and its own node (kubelet probes) is always allowed.

When the peer's labels are unknown (an address no inventory names) a selector peer cannot be
decided: the verdict is *unknown* unless another rule allows the connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emit.evaluate import ALLOW, DENY, UNKNOWN, Tri, _and, _ip_in, _or

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def is_netpol(obj: Mapping[str, Any]) -> bool:
    return obj.get("kind") == "NetworkPolicy" and str(obj.get("apiVersion", "")).startswith(
        "networking.k8s.io/")


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; an empty (or absent) selector selects everything."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != str(value):
            return False
    for expr in selector.get("matchExpressions") or []:
        key = expr.get("key")
        op = expr.get("operator")
        values = [str(v) for v in expr.get("values") or []]
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class NamedPort:
    name: str | None
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection."""

    namespace: str | None = None
    """The pod's namespace; None for an address outside the cluster (or not known)."""
    labels: Mapping[str, str] | None = None
    """Pod labels; None when not known."""
    namespace_labels: Mapping[str, str] | None = None
    ip: str | None = None
    ports: tuple[NamedPort, ...] = ()
    """Declared container ports (for named ports when this end is the destination)."""
    external: bool = False
    """True when the address is known to lie outside the cluster's pods."""

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None and self.labels is not None

    def ns_labels(self) -> dict[str, str]:
        labels = dict(self.namespace_labels or {})
        if self.namespace:
            labels.setdefault(NAMESPACE_NAME_LABEL, self.namespace)
        return labels


@dataclass(frozen=True)
class Connection:
    source: Endpoint
    destination: Endpoint
    port: int
    protocol: str = "TCP"
    """``TCP`` | ``UDP`` | ``SCTP``."""
    from_node: bool = False
    """The source is the destination pod's own node (kubelet probes)."""


@dataclass
class NetpolDecision:
    verdict: str
    """``allow`` | ``deny`` | ``unknown``."""
    reason: str
    ingress: str
    """``unrestricted`` (not isolated) | ``allow`` | ``deny`` | ``unknown`` | ``n/a``."""
    egress: str
    hits: dict[str, set[str]] = field(default_factory=dict)
    """``<ns>/<name>`` -> parts matched: ``ingress[0]``, ``ingress[0].from[1]``,
    ``ingress[0].ports[0]`` (and ``egress[...]``)."""

    @property
    def allowed(self) -> bool:
        return self.verdict == ALLOW


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    types = spec.get("policyTypes")
    if types:
        return [str(t) for t in types]
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> Tri:
    block = peer.get("ipBlock")
    if block:
        if not other.ip:
            return None
        if not _ip_in(str(block.get("cidr")), other.ip):
            return False
        return not any(_ip_in(str(e), other.ip) for e in block.get("except") or [])
    pod_sel = peer.get("podSelector")
    ns_sel = peer.get("namespaceSelector")
    if pod_sel is None and ns_sel is None:
        return False
    if other.external:
        return False
    if not other.is_pod:
        return None
    if ns_sel is None:
        if other.namespace != policy_ns:
            return False
    elif not selector_matches(ns_sel, other.ns_labels()):
        return False
    return pod_sel is None or selector_matches(pod_sel, other.labels or {})


def _port_matches(entry: Mapping[str, Any], conn: Connection) -> Tri:
    protocol = str(entry.get("protocol") or "TCP").upper()
    if protocol != conn.protocol.upper():
        return False
    port = entry.get("port")
    if port is None:
        return True
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        low = int(port)
        high = int(entry.get("endPort") or low)
        return low <= conn.port <= high
    # A named port: the destination pod's container port of that name and protocol.
    if not conn.destination.is_pod:
        return None
    numbers = {p.port for p in conn.destination.ports
               if p.name == port and p.protocol.upper() == protocol}
    return conn.port in numbers


def _side(policies: Sequence[Mapping[str, Any]], pod: Endpoint, other: Endpoint,
          conn: Connection, direction: str, hits: dict[str, set[str]]) -> tuple[str, str]:
    """(``unrestricted``|``allow``|``deny``|``unknown``, reason) for one pod's side."""
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [
        p for p in policies
        if (p.get("metadata") or {}).get("namespace", "default") == pod.namespace
        and kind in policy_types(p.get("spec") or {})
        and selector_matches((p.get("spec") or {}).get("podSelector"), pod.labels or {})
    ]
    if not selecting:
        return "unrestricted", f"no NetworkPolicy selects the pod for {kind}"
    outcomes: list[Tri] = []
    first: str | None = None
    for policy in selecting:
        name = _name(policy)
        ns = (policy.get("metadata") or {}).get("namespace") or "default"
        for i, rule in enumerate((policy.get("spec") or {}).get(direction) or []):
            base = f"{direction}[{i}]"
            found: list[str] = []
            peers = rule.get(peers_key) or []
            peer_results = []
            for j, peer in enumerate(peers):
                r = _peer_matches(peer, ns, other)
                if r is True:
                    found.append(f"{base}.{peers_key}[{j}]")
                peer_results.append(r)
            peer_ok = _or(peer_results) if peers else True
            ports = rule.get("ports") or []
            port_results = []
            for j, entry in enumerate(ports):
                r = _port_matches(entry, conn)
                if r is True:
                    found.append(f"{base}.ports[{j}]")
                port_results.append(r)
            port_ok = _or(port_results) if ports else True
            outcome = _and([peer_ok, port_ok])
            if outcome is True:
                hits.setdefault(name, set()).update([base, *found])
                first = first or f"{kind} allowed by {name} {base}"
            outcomes.append(outcome)
    result = _or(outcomes)
    names = ", ".join(_name(p) for p in selecting)
    if result is True:
        return "allow", first or ""
    if result is None:
        return "unknown", (f"{kind}: a rule of {names} may match, but the peer's labels or "
                           "address are not known")
    return "deny", f"{kind} isolated by {names}: no rule matches"


def evaluate_netpol(manifests: Iterable[Mapping[str, Any]], conn: Connection) -> NetpolDecision:
    """Would the CNI pass ``conn`` under the NetworkPolicies among ``manifests``?"""
    policies = [m for m in manifests if is_netpol(m)]
    hits: dict[str, set[str]] = {}
    if conn.protocol.upper() not in ("TCP", "UDP", "SCTP"):
        return NetpolDecision(UNKNOWN, f"protocol {conn.protocol} is outside NetworkPolicy",
                              "n/a", "n/a")
    if conn.destination.is_pod and not conn.from_node:
        ingress, in_reason = _side(policies, conn.destination, conn.source, conn, "ingress",
                                   hits)
    elif conn.from_node:
        ingress, in_reason = "allow", "traffic from the pod's own node is always allowed"
    else:
        ingress, in_reason = "n/a", "destination is not a pod"
    if conn.source.is_pod:
        egress, out_reason = _side(policies, conn.source, conn.destination, conn, "egress",
                                   hits)
    else:
        egress, out_reason = "n/a", "source is not a known pod"
    sides = [(ingress, in_reason), (egress, out_reason)]
    for state, reason in sides:
        if state == "deny":
            return NetpolDecision(DENY, reason, ingress, egress, {})
    for state, reason in sides:
        if state == "unknown":
            return NetpolDecision(UNKNOWN, reason, ingress, egress, hits)
    reasons = [r for s, r in sides if s == "allow"] or [r for s, r in sides if s != "n/a"]
    return NetpolDecision(ALLOW, "; ".join(reasons) or "not isolated", ingress, egress, hits)


def rule_parts(policy: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every allow part of a NetworkPolicy as (path, description), outermost first."""
    out: list[tuple[str, str]] = []
    spec = policy.get("spec") or {}
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(direction) or []):
            base = f"{direction}[{i}]"
            out.append((base, f"{direction} rule: {peers_key} "
                        f"{_describe_peers(rule.get(peers_key))} ports "
                        f"{_describe_ports(rule.get('ports'))}"))
            peers = rule.get(peers_key) or []
            if len(peers) > 1:
                for j, peer in enumerate(peers):
                    out.append((f"{base}.{peers_key}[{j}]", f"peer {_describe_peer(peer)}"))
            ports = rule.get("ports") or []
            if len(ports) > 1:
                for j, entry in enumerate(ports):
                    out.append((f"{base}.ports[{j}]", f"port {_describe_port(entry)}"))
    return out


def _describe_sel(sel: Mapping[str, Any] | None) -> str:
    if not sel:
        return "{}"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        parts.append(f"{e.get('key')} {e.get('operator')} {e.get('values') or ''}".strip())
    return ",".join(parts)


def _describe_peer(peer: Mapping[str, Any]) -> str:
    if peer.get("ipBlock"):
        b = peer["ipBlock"]
        extra = f" except {','.join(b.get('except') or [])}" if b.get("except") else ""
        return f"ipBlock {b.get('cidr')}{extra}"
    parts = []
    if "namespaceSelector" in peer:
        parts.append(f"namespaces [{_describe_sel(peer['namespaceSelector'])}]")
    if "podSelector" in peer:
        parts.append(f"pods [{_describe_sel(peer['podSelector'])}]")
    return " ".join(parts) or "?"


def _describe_peers(peers: Any) -> str:
    return " | ".join(_describe_peer(p) for p in peers) if peers else "anyone"


def _describe_port(entry: Mapping[str, Any]) -> str:
    port = entry.get("port", "any")
    end = f"-{entry['endPort']}" if entry.get("endPort") else ""
    return f"{port}{end}/{entry.get('protocol') or 'TCP'}"


def _describe_ports(ports: Any) -> str:
    return ",".join(_describe_port(p) for p in ports) if ports else "any"


def ip_is_private(ip: str | None) -> bool:
    """RFC 1918 / ULA / CGNAT addresses (possible cluster addresses)."""
    if not ip:
        return False
    try:
        return ipaddress.ip_address(ip).is_private
    except ValueError:
        return False
