"""Kubernetes NetworkPolicy (``--mesh netpol``, networking.k8s.io/v1) from a learned graph.

Semantics relied on (https://kubernetes.io/docs/concepts/services-networking/network-policies/):

- A pod selected by a policy with ``Ingress`` (``Egress``) in ``policyTypes`` is isolated in
  that direction: only what some rule of some selecting policy allows gets through; policies
  add up. Reply traffic of an allowed connection is always allowed.
- Within a rule, ``from``/``to`` peers are OR-ed and so are ``ports``, and the rule allows
  every peer on every port: peers share a rule only when they were seen on the same ports.
- A peer with both ``podSelector`` and ``namespaceSelector`` selects those pods in those
  namespaces; ``kubernetes.io/metadata.name`` is set by the API server on every namespace.
- ``ipBlock`` is meant for addresses outside the cluster; a pod IP in an ipBlock is
  implementation-defined and changes with the pod (used only for ``unknown:<ip>`` peers).
- Traffic from and to the node a pod runs on is always allowed: kubelet probes keep working.
- Policies see the pod's own port (the Service's targetPort), after Service translation on
  common CNIs, which is what the graph's edges carry. Sidecar meshes (Istio, Linkerd) keep the
  application port on the wire; Istio ambient tunnels to 15008 instead (not handled here).

Nothing observed is denied: a destination with live traffic from a peer no rule can express
(a workload without a selector, a host name) gets no ingress policy, and its namespace no
default-deny, each listed in ``excluded``; the same for egress sources.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from emit.istio import (
    DEFAULT_SYSTEM_NAMESPACES,
    MANAGED_BY,
    NON_WORKLOAD_PREFIXES,
    UDP_PROTOCOLS,
    PolicyExplanation,
    RuleExplanation,
    _annotations,
    _client_ips,
    _evidence,
    _ip_sort_key,
    is_gateway,
)
from learn.model import Edge, Graph, Node
from learn.workloads import NAMESPACE_NAME_LABEL, ClusterFacts

API_VERSION = "networking.k8s.io/v1"
DNS_FALLBACK_PORTS = ((53, "TCP"), (53, "UDP"))
#: Ports a meshed pod's proxy dials its control plane on, which access logs never show.
#: Istio: 15012 xDS and CA (istio.io/latest/docs/ops/deployment/application-requirements/
#: "Ports used by Istio"); Linkerd: identity 8080, destination 8086, policy 8090.
CONTROL_PLANE_PORTS: dict[str, tuple[int, ...]] = {"istio": (15012,),
                                                   "linkerd": (8080, 8086, 8090)}


@dataclass
class NetpolPlan:
    manifests: list[dict[str, Any]]
    explanations: list[PolicyExplanation]
    excluded: list[dict[str, Any]]
    """What traffic was left out and why: dicts with source, destination, port, reason."""
    notes: list[str] = field(default_factory=list)


def _peer_key(peer: dict[str, Any]) -> str:
    return json.dumps(peer, sort_keys=True, separators=(",", ":"))


def _excluded(edge: Edge, reason: str) -> dict[str, Any]:
    return {"source": edge.source, "destination": edge.destination, "port": edge.port,
            "reason": reason}


def _l4(edge: Edge) -> tuple[int, str]:
    return (edge.port, "UDP" if edge.protocol in UDP_PROTOCOLS else "TCP")


def _ports(pairs: set[tuple[int, str]]) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": proto} for p, proto in sorted(pairs)]


def _ip_blocks(ips: list[str]) -> list[dict[str, Any]]:
    out = set()
    for ip in ips:
        net = ipaddress.ip_network(ip, strict=False)
        out.add(str(net))
    return [{"ipBlock": {"cidr": c}} for c in sorted(out, key=_ip_sort_key)]


def _workload_peer(node: Node) -> dict[str, Any] | None:
    if node.id.startswith(NON_WORKLOAD_PREFIXES) or not node.namespace or not node.selector:
        return None
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: node.namespace}},
            "podSelector": {"matchLabels": dict(sorted(node.selector.items()))}}


def _object(namespace: str, name: str, spec: dict[str, Any],
            edges: list[Edge]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY),
                     "annotations": _annotations(edges)},
        "spec": spec,
    }


def _live(edges: list[Edge], excluded: list[dict[str, Any]]) -> list[Edge]:
    out = []
    for e in edges:
        if e.requests <= 0 and e.connections <= 0:
            excluded.append(_excluded(e, "no requests or connections counted"))
        elif e.requests > 0 and e.denied_requests >= e.requests:
            excluded.append(_excluded(e, "every request was denied by an existing policy"))
        else:
            out.append(e)
    return out


@dataclass
class _Rules:
    """peer key -> (peer, allowed (port, protocol) pairs, edges)."""

    peers: dict[str, tuple[dict[str, Any] | None, set[tuple[int, str]], list[Edge]]] = field(
        default_factory=dict)

    def add(self, peer: dict[str, Any] | None, edge: Edge,
            pairs: set[tuple[int, str]] | None = None) -> None:
        key = _peer_key(peer) if peer is not None else "*"
        entry = self.peers.setdefault(key, (peer, set(), []))
        entry[1].update(pairs if pairs is not None else {_l4(edge)})
        entry[2].append(edge)

    def rules(self, direction: str) -> tuple[list[dict[str, Any]], list[RuleExplanation]]:
        """Rules allowing exactly peer x ports as seen: peers with equal port sets share one."""
        groups: dict[frozenset[tuple[int, str]], list[str]] = defaultdict(list)
        for key, (_, allowed, _) in self.peers.items():
            groups[frozenset(allowed)].append(key)
        pairs_out = []
        for port_set, keys in groups.items():
            rule: dict[str, Any] = {"ports": _ports(set(port_set))}
            peers = [self.peers[k][0] for k in sorted(keys)]
            if None not in peers:  # "*": any source/destination on these ports
                rule[direction] = sorted((p for p in peers if p is not None), key=_peer_key)
            edges = [e for k in keys for e in self.peers[k][2]]
            weak = None in peers or any("ipBlock" in (p or {}) for p in peers)
            kind = ("any" if None in peers else
                    "ipBlock" if all("ipBlock" in (p or {}) for p in peers) else "selectors")
            ev = sorted((_evidence(e, weak) for e in edges),
                        key=lambda x: (x.source, x.destination, x.port, x.protocol))
            sources = sorted({e.source if direction == "from" else e.destination
                              for e in edges})
            pairs_out.append((rule, RuleExplanation(0, kind, weak, sources, rule, ev)))
        pairs_out.sort(key=lambda p: _peer_key(p[0]))
        for i, (_, rexpl) in enumerate(pairs_out):
            rexpl.index = i
        return [r for r, _ in pairs_out], [x for _, x in pairs_out]


def plan_netpol(
    graph: Graph,
    facts: ClusterFacts | None = None,
    *,
    egress: bool = False,
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES,
) -> NetpolPlan:
    """Ingress (and with ``egress``, egress) NetworkPolicies allowing what was observed."""
    excluded: list[dict[str, Any]] = []
    notes: list[str] = []
    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    workload_ns = {n.namespace for n in graph.nodes.values()
                   if n.namespace and not n.id.startswith(NON_WORKLOAD_PREFIXES)}
    uncovered_in: dict[str, list[str]] = defaultdict(list)
    covered_in: dict[str, list[Edge]] = defaultdict(list)

    by_dest: dict[str, list[Edge]] = defaultdict(list)
    by_src: dict[str, list[Edge]] = defaultdict(list)
    for e in graph.edges:
        by_dest[e.destination].append(e)
        by_src[e.source].append(e)

    for dest_id in sorted(by_dest):
        edges = sorted(by_dest[dest_id], key=lambda e: (e.source, e.port, e.protocol))
        node = graph.nodes.get(dest_id)
        ns = _namespace_of(dest_id, node)
        if dest_id.startswith(("external:", "unknown:")):
            continue  # outside the cluster's pods: only egress policies can speak of it
        if node is None or not node.selector or not node.namespace or not node.workload:
            live = _live(edges, [])
            excluded += [_excluded(e, "destination has no pod selector; no ingress policy")
                         for e in edges]
            if live and ns:
                uncovered_in[ns].append(dest_id)
            continue
        if node.namespace in system_namespaces and not is_gateway(node):
            excluded += [_excluded(e, f"destination in system namespace {node.namespace}: "
                                      "left to the platform") for e in edges]
            continue
        live = _live(edges, excluded)
        if not live:
            continue
        rules = _Rules()
        blocked: list[tuple[Edge, str]] = []
        gateway = is_gateway(node)
        for e in live:
            src = graph.nodes.get(e.source)
            if gateway and (src is None or e.source.startswith(("external:", "unknown:"))):
                rules.add(None, e)
                continue
            peer = _workload_peer(src) if src is not None else None
            if peer is not None:
                rules.add(peer, e)
                continue
            ips = _client_ips(e, src)
            if src is not None and not e.source.startswith(NON_WORKLOAD_PREFIXES):
                blocked.append((e, "source workload has no pod selector"))
            elif not ips:
                blocked.append((e, "source has no address (host name only)"))
            else:
                for block in _ip_blocks(ips):
                    rules.add(block, e)
        if blocked:
            excluded += [_excluded(e, f"{why}: it cannot be allowed, so {dest_id} gets no "
                                      "ingress policy") for e, why in blocked]
            uncovered_in[node.namespace].append(dest_id)
            continue
        rule_list, rexpls = rules.rules("from")
        spec = {"ingress": rule_list, "podSelector": {"matchLabels": dict(sorted(
            node.selector.items()))}, "policyTypes": ["Ingress"]}
        name = f"{node.workload}-ingress"
        pnotes = []
        if any(r.kind == "any" for r in rexpls):
            pnotes.append("Ingress gateway: the observed listener ports are open to any "
                          "source; an internet-facing listener cannot be pinned to the "
                          "clients seen.")
        if any(r.kind != "any" and r.weak for r in rexpls):
            pnotes.append("Some peers are pinned by address (ipBlock): addresses change; "
                          "pod addresses in ipBlocks are implementation-defined.")
        out.append((_object(node.namespace, name, spec, live), PolicyExplanation(
            "NetworkPolicy", node.namespace, name, node.id,
            "allow the peers observed calling this workload, on the ports they used",
            rules=rexpls, notes=pnotes)))
        covered_in[node.namespace].extend(live)

    for ns in sorted(workload_ns - set(system_namespaces)):
        if uncovered_in.get(ns):
            excluded.append({"source": None, "destination": f"namespace {ns}", "port": None,
                             "reason": "default-deny ingress withheld: observed traffic to "
                             + ", ".join(sorted(set(uncovered_in[ns])))
                             + " could not be expressed as a NetworkPolicy"})
            continue
        out.append(_default_deny(ns, "Ingress", covered_in.get(ns, [])))

    if egress:
        out += _egress(graph, facts, by_src, system_namespaces, workload_ns, excluded, notes)
    else:
        notes.append("Egress is not restricted (enable egress policies to pin destinations; "
                     "they keep cluster DNS reachable).")

    out.sort(key=lambda me: (me[0]["metadata"]["namespace"], me[0]["metadata"]["name"]))
    unique = {(x["source"], x["destination"], x["port"], x["reason"]): x for x in excluded}
    excluded = sorted(unique.values(), key=lambda x: (str(x["destination"]), str(x["source"]),
                                                      x["port"] or 0, x["reason"]))
    notes.append("Only observed traffic is allowed: scrapers, operators and clients that were "
                 "not seen during the window (Prometheus, backups, the API server's webhooks) "
                 "are denied by the default-deny policies.")
    return NetpolPlan(manifests=[m for m, _ in out], explanations=[x for _, x in out],
                      excluded=excluded, notes=notes)


def netpol_manifests(graph: Graph, facts: ClusterFacts | None = None,
                     **options: Any) -> list[dict[str, Any]]:
    """The manifests of :func:`plan_netpol`, sorted by (namespace, name)."""
    return plan_netpol(graph, facts, **options).manifests


def _namespace_of(node_id: str, node: Node | None) -> str | None:
    if node is not None and node.namespace:
        return node.namespace
    if node_id.startswith("service:"):
        return node_id[len("service:"):].split("/", 1)[0]
    if not node_id.startswith(NON_WORKLOAD_PREFIXES) and "/" in node_id:
        return node_id.split("/", 1)[0]
    return None


def _default_deny(ns: str, direction: str, edges: list[Edge],
                  keep: list[dict[str, Any]] | None = None
                  ) -> tuple[dict[str, Any], PolicyExplanation]:
    """Namespace default-deny; ``keep``: egress rules every pod keeps (DNS, control plane)."""
    name = f"default-deny-{direction.lower()}"
    spec: dict[str, Any] = {"podSelector": {}, "policyTypes": [direction]}
    if keep:
        spec["egress"] = keep
    reason = (f"deny {direction.lower()} by default: pods with no observed "
              f"{'callers' if direction == 'Ingress' else 'destinations'} get nothing"
              + (" but cluster DNS (and their mesh control plane)" if keep else ""))
    return _object(ns, name, spec, edges), PolicyExplanation("NetworkPolicy", ns, name, None,
                                                             reason)


def _egress(graph: Graph, facts: ClusterFacts | None, by_src: dict[str, list[Edge]],
            system: frozenset[str], workload_ns: set[str], excluded: list[dict[str, Any]],
            notes: list[str]) -> list[tuple[dict[str, Any], PolicyExplanation]]:
    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    uncovered: dict[str, list[str]] = defaultdict(list)
    covered: dict[str, list[Edge]] = defaultdict(list)
    dns = facts.dns if facts is not None else None
    if dns is not None:
        dns_peer: dict[str, Any] | None = {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: dns.namespace}},
            "podSelector": {"matchLabels": dict(dns.selector)}}
        dns_ports = set(dns.ports) or set(DNS_FALLBACK_PORTS)
        notes.append(f"Egress policies allow DNS to the pods the Service {dns.namespace}/"
                     f"{dns.service} selects ({_labels(dns.selector)}"
                     + (f"; pods {', '.join(dns.pods)}" if dns.pods else "")
                     + f") on {', '.join(f'{p}/{q}' for p, q in sorted(dns_ports))}.")
    else:
        dns_peer, dns_ports = None, set(DNS_FALLBACK_PORTS)
        notes.append("Cluster DNS pods could not be identified ("
                     + (facts.dns_note if facts is not None else "no inventory")
                     + "): egress policies allow 53/TCP and 53/UDP to any destination.")
    dns_rule: dict[str, Any] = {"ports": _ports(dns_ports)}
    if dns_peer is not None:
        dns_rule["to"] = [dns_peer]
    meshed_ns: dict[str, set[str | None]] = defaultdict(set)
    for n in graph.nodes.values():
        if n.namespace and n.meshed and not n.id.startswith(NON_WORKLOAD_PREFIXES):
            wf = facts.get(n.id) if facts is not None else None
            meshed_ns[n.namespace].add(wf.mesh if wf is not None else None)
    for src_id in sorted(by_src):
        node = graph.nodes.get(src_id)
        if node is None or src_id.startswith(NON_WORKLOAD_PREFIXES) or not node.namespace:
            continue
        edges = sorted(by_src[src_id], key=lambda e: (e.destination, e.port, e.protocol))
        if node.namespace in system:
            continue
        if not node.selector or not node.workload:
            live = _live(edges, [])
            excluded += [_excluded(e, "source has no pod selector; no egress policy")
                         for e in edges]
            if live:
                uncovered[node.namespace].append(src_id)
            continue
        live = _live(edges, excluded)
        rules = _Rules()
        blocked: list[tuple[Edge, str]] = []
        for e in live:
            dst = graph.nodes.get(e.destination)
            peer = _workload_peer(dst) if dst is not None else None
            if peer is not None:
                rules.add(peer, e)
                continue
            ips = list(dst.ips) if dst is not None else []
            if not ips and e.destination.startswith(("external:", "unknown:")):
                addr = e.destination.split(":", 1)[1]
                ips = [addr] if _is_ip(addr) else []
            ips = [ip for ip in ips if _is_ip(ip)]
            if not ips:
                why = ("destination is a host name without an address (NetworkPolicy has no "
                       "host names)" if e.destination.startswith("external:") else
                       "destination has no pod selector or address")
                blocked.append((e, why))
                continue
            for block in _ip_blocks(ips):
                rules.add(block, e)
        if blocked:
            excluded += [_excluded(e, f"{why}: it cannot be allowed, so {src_id} gets no "
                                      "egress policy") for e, why in blocked]
            uncovered[node.namespace].append(src_id)
            continue
        rule_list, rexpls = rules.rules("to")
        rule_list.append(dns_rule)
        rexpls.append(RuleExplanation(len(rule_list) - 1, "dns", dns_peer is None,
                                      ["cluster DNS"], dns_rule, []))
        pnotes = []
        wfacts = facts.get(src_id) if facts is not None else None
        cp_rule = _control_plane_rule(
            {wfacts.mesh if wfacts is not None else None} if node.meshed else set(), system)
        if cp_rule is not None:
            rule_list.append(cp_rule)
            rexpls.append(RuleExplanation(len(rule_list) - 1, "mesh-control-plane", True,
                                          ["mesh control plane"], cp_rule, []))
            pnotes.append("Meshed pod: its proxy's connections to the control plane are not in "
                          "access logs; allowed to the system namespaces on "
                          + ", ".join(str(p["port"]) for p in cp_rule["ports"]) + ".")
        spec = {"egress": rule_list, "podSelector": {"matchLabels": dict(sorted(
            node.selector.items()))}, "policyTypes": ["Egress"]}
        name = f"{node.workload}-egress"
        out.append((_object(node.namespace, name, spec, live), PolicyExplanation(
            "NetworkPolicy", node.namespace, name, node.id,
            "allow the destinations this workload was observed calling, and cluster DNS",
            rules=rexpls, notes=pnotes)))
        covered[node.namespace].extend(live)
    for ns in sorted(workload_ns - set(system)):
        if uncovered.get(ns):
            excluded.append({"source": None, "destination": f"namespace {ns}", "port": None,
                             "reason": "default-deny egress withheld: observed traffic from "
                             + ", ".join(sorted(set(uncovered[ns])))
                             + " could not be expressed as a NetworkPolicy"})
            continue
        keep = [dns_rule]
        cp_rule = _control_plane_rule(meshed_ns.get(ns, set()), system)
        if cp_rule is not None:
            keep.append(cp_rule)
        out.append(_default_deny(ns, "Egress", covered.get(ns, []), keep))
    return out


def _control_plane_rule(meshes: set[str | None], system: frozenset[str]
                        ) -> dict[str, Any] | None:
    """Egress to the mesh control plane (system namespaces) for pods carrying ``meshes``
    (None: meshed, mesh unknown -> both meshes' ports); None when no mesh."""
    ports = {(p, "TCP") for m, ps in CONTROL_PLANE_PORTS.items()
             if m in meshes or None in meshes for p in ps}
    if not ports:
        return None
    return {"ports": _ports(ports), "to": [{"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(system)}]}}]}


def _labels(selector: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True
