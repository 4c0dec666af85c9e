"""Istio AuthorizationPolicy / PeerAuthentication (security.istio.io/v1) from a learned graph.

Semantics this module relies on (checked against Istio docs/issues, not guessed):

- A workload selected by any ALLOW policy denies everything no ALLOW rule matches; a
  namespace ``allow-nothing`` policy (``spec: {}``) makes that the default for workloads
  that got no policy (idle ones).
- Within one rule, ``from`` entries are OR-ed, ``to`` entries are OR-ed, and the fields of
  one ``operation`` are AND-ed, i.e. ``methods x paths x ports`` is a cross product. To
  allow only observed (method, path) pairs, paths with the same method set share one
  operation and different method sets get separate operations.
- On a TCP (non-HTTP) filter chain an ALLOW rule carrying HTTP-only fields (methods, paths)
  is ignored, so traffic it was meant to allow is denied (istio.io authz-tcp task; see
  tests/data ``istio-docs-authz-tcp-variants.yaml``). TCP edges therefore get ports only,
  and TCP and HTTP operations never share a rule.
- ``principals`` only match mTLS peers; clients without a verified identity can only be
  matched by ``ipBlocks`` (the connection's source address; single IPs and CIDRs are
  accepted) and need the server port to accept plaintext: a PeerAuthentication
  ``portLevelMtls: {<port>: PERMISSIVE}`` exception (which requires a selector).
- A PeerAuthentication in the root namespace (istio-system) is mesh-wide, and the control
  plane's own traffic is not in access logs: nothing namespace-wide is emitted there.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from emit.yamlio import rfc3339
from learn.model import Edge, Graph, Node, has_ingress_gateway_labels

log = logging.getLogger(__name__)

API_VERSION = "security.istio.io/v1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshwright"}
DEFAULT_SYSTEM_NAMESPACES = frozenset({"istio-system", "kube-system"})
NON_WORKLOAD_PREFIXES = ("external:", "unknown:", "service:")


@dataclass
class EdgeEvidence:
    """One edge behind a rule, as the report shows it."""

    source: str
    destination: str
    port: int
    protocol: str
    requests: int
    first_seen: str | None
    last_seen: str | None
    mtls: str
    mtls_share: float | None
    """Fraction of requests seen with mTLS (None when no request's TLS state is known)."""
    weak: bool
    denied_requests: int = 0
    evidence: list[str] = field(default_factory=list)


@dataclass
class RuleExplanation:
    index: int
    """Position of the rule in ``spec.rules``."""
    kind: str
    """``principals`` | ``ipBlocks`` | ``gateway``."""
    weak: bool
    sources: list[str]
    rule: dict[str, Any]
    edges: list[EdgeEvidence]


@dataclass
class PolicyExplanation:
    kind: str
    namespace: str
    name: str
    destination: str | None
    """Node id the policy protects; None for namespace-wide objects."""
    reason: str
    rules: list[RuleExplanation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class IstioPlan:
    manifests: list[dict[str, Any]]
    explanations: list[PolicyExplanation]
    excluded: list[dict[str, Any]]
    """What traffic was left out and why: dicts with source, destination, port, reason."""


# ---------------------------------------------------------------------------------------


def is_gateway(node: Node) -> bool:
    """Ingress gateway: flagged by the resolver from its pod labels, or visible in its selector."""
    return node.ingress_gateway or has_ingress_gateway_labels(node.selector)


def _has_identity_source(edge: Edge, src: Node | None) -> bool:
    if src is None or edge.source.startswith(NON_WORKLOAD_PREFIXES):
        return False
    # A principal only matches mTLS peers: useless when every request was known non-mTLS.
    return bool(src.principal) and src.meshed is not False and edge.mtls != "none"


def _needs_ip_rule(edge: Edge, src: Node | None) -> bool:
    if src is None or edge.source.startswith(NON_WORKLOAD_PREFIXES):
        return True
    if src.meshed is False or not src.principal:
        return True
    return edge.plaintext_requests > 0 or edge.mtls == "none"


def _client_ips(edge: Edge, src: Node | None) -> list[str]:
    raw = list(edge.source_ips) or (list(src.ips) if src is not None else [])
    if not raw and edge.source.startswith(("external:", "unknown:")):
        raw = [edge.source.split(":", 1)[1]]
    out: set[str] = set()
    for value in raw:
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            log.warning("ignoring non-IP client address %r of %s", value, edge.source)
            continue
        # Istio accepts a plain IP for a single host; CIDRs stay as given.
        single = net.prefixlen == net.max_prefixlen
        out.add(str(net.network_address) if single else str(net))
    return sorted(out, key=_ip_sort_key)


def _ip_sort_key(value: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(value, strict=False)
    return (net.version, int(net.network_address), net.prefixlen)


#: Edge protocols carried over UDP (packet evidence).
UDP_PROTOCOLS = ("udp", "dns")


def _kind(protocol: str) -> str:
    """'http' for what Istio inspects as HTTP (http, grpc); everything else (tcp, tls
    passthrough, unknown) reaches a TCP filter chain, where HTTP fields void an ALLOW rule."""
    return "http" if protocol in ("http", "grpc") else "tcp"


def _triples(edge: Edge) -> set[tuple[int, str, str, str]]:
    """(port, kind, method, path) allowances of one edge; kind 'tcp' or 'http'."""
    kind = _kind(edge.protocol)
    # Not itemized: packets showed only part of the requests this edge carried, so the
    # methods/paths seen are a sample; narrowing to them would break the rest.
    if kind == "tcp" or not edge.operations or not edge.requests_itemized:
        return {(edge.port, kind, "", "")}
    return {(edge.port, kind, op.method, op.path) for op in edge.operations}


def _operations(triples: Iterable[tuple[int, str, str, str]]) -> list[dict[str, Any]]:
    """``to`` entries allowing exactly ``triples`` (no unobserved method x path pair)."""
    # port -> path -> methods; ports-only allowances have empty method/path.
    per_port: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    bare_ports: set[int] = set()
    for port, _kind, method, path in triples:
        if not method and not path:
            bare_ports.add(port)
        else:
            per_port[port][path].add(method)
    # (methods, paths) -> ports: merging ports only where the cross product was observed.
    grouped: dict[tuple[tuple[str, ...], tuple[str, ...]], set[int]] = defaultdict(set)
    for port, paths in per_port.items():
        if port in bare_ports:  # everything on this port is allowed anyway
            continue
        by_methods: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for path, methods in paths.items():
            by_methods[tuple(sorted(methods))].append(path)
        for methods_t, path_list in by_methods.items():
            paths_t = tuple(sorted(p for p in path_list if p))
            grouped[(methods_t, paths_t)].add(port)
    ops: list[dict[str, Any]] = []
    if bare_ports:
        ops.append({"operation": {"ports": [str(p) for p in sorted(bare_ports)]}})
    for (methods_t, paths_t), ports in grouped.items():
        op: dict[str, Any] = {"ports": [str(p) for p in sorted(ports)]}
        if any(methods_t):
            op["methods"] = [m for m in methods_t if m]
        if paths_t:
            op["paths"] = list(paths_t)
        ops.append({"operation": op})
    return sorted(ops, key=_canon)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _evidence(edge: Edge, weak: bool) -> EdgeEvidence:
    known = edge.mtls_requests + edge.plaintext_requests + edge.tls_requests
    share = round(edge.mtls_requests / known, 4) if known else None
    return EdgeEvidence(
        source=edge.source,
        destination=edge.destination,
        port=edge.port,
        protocol=edge.protocol,
        requests=edge.requests,
        first_seen=rfc3339(edge.first_seen),
        last_seen=rfc3339(edge.last_seen),
        mtls=edge.mtls,
        mtls_share=share,
        weak=weak,
        denied_requests=edge.denied_requests,
        evidence=sorted(edge.evidence)[:3],
    )


def _annotations(edges: list[Edge], *, dry_run: bool = False) -> dict[str, str]:
    ann = {
        "meshwright.io/requests": str(sum(e.requests for e in edges)),
        "meshwright.io/sources": str(len({e.source for e in edges})),
    }
    firsts = [e.first_seen for e in edges if e.first_seen is not None]
    lasts = [e.last_seen for e in edges if e.last_seen is not None]
    first = rfc3339(min(firsts, key=_utc_key)) if firsts else None
    last = rfc3339(max(lasts, key=_utc_key)) if lasts else None
    if first:
        ann["meshwright.io/first-seen"] = first
    if last:
        ann["meshwright.io/last-seen"] = last
    if dry_run:
        ann["istio.io/dry-run"] = "true"
    return ann


def _utc_key(value: datetime) -> str:
    return rfc3339(value) or ""


def _object(kind: str, namespace: str, name: str, spec: dict[str, Any],
            annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
            "annotations": annotations,
        },
        "spec": spec,
    }


def _excluded(edge: Edge, reason: str) -> dict[str, Any]:
    return {"source": edge.source, "destination": edge.destination, "port": edge.port,
            "reason": reason}


# ---------------------------------------------------------------------------------------


def plan_istio(
    graph: Graph,
    *,
    plaintext: Literal["allow", "deny"] = "allow",
    dry_run: bool = False,
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES,
) -> IstioPlan:
    """Manifests plus, for the report, why each rule exists and what was left out."""
    excluded: list[dict[str, Any]] = []
    policies: list[tuple[dict[str, Any], PolicyExplanation]] = []
    ns_edges: dict[str, list[Edge]] = defaultdict(list)
    #: namespace -> destinations with observed, allowed traffic that got no covering policy.
    uncovered: dict[str, list[str]] = defaultdict(list)

    by_dest: dict[str, list[Edge]] = defaultdict(list)
    for edge in graph.edges:
        if edge.protocol in UDP_PROTOCOLS:
            # Sidecars do not intercept UDP: an AuthorizationPolicy neither allows nor blocks
            # it, and a TCP rule for its port would allow what was never seen.
            excluded.append(_excluded(edge, "UDP traffic: Istio policies do not apply to it"))
            continue
        by_dest[edge.destination].append(edge)

    used_names: set[tuple[str, str, str]] = set()
    for dest_id in sorted(by_dest):
        edges = sorted(by_dest[dest_id], key=lambda e: (e.source, e.port, e.protocol))
        node = graph.nodes.get(dest_id)
        live = [e for e in edges if e.requests > e.denied_requests]
        if dest_id.startswith(NON_WORKLOAD_PREFIXES):
            excluded += [_excluded(e, "destination is not a workload in the mesh; no policy")
                         for e in edges]
            if dest_id.startswith("service:") and live:
                # Traffic to a Service whose backing workload is ambiguous may land on any of
                # them: a namespace default-deny could break it.
                uncovered[dest_id[len("service:"):].split("/", 1)[0]].append(dest_id)
            continue
        if node is None or not node.namespace or not node.workload:
            excluded += [_excluded(e, "destination workload not in the graph's nodes")
                         for e in edges]
            if live and "/" in dest_id:
                uncovered[dest_id.split("/", 1)[0]].append(dest_id)
            continue
        if not node.selector:
            excluded += [_excluded(e, "destination has no pod selector; a policy without one "
                                      "would select the whole namespace") for e in edges]
            if live:
                uncovered[node.namespace].append(dest_id)
            continue
        gateway = is_gateway(node)
        if node.namespace in system_namespaces and not gateway:
            excluded += [_excluded(e, f"destination in system namespace {node.namespace}: "
                                      "control-plane traffic is not in access logs")
                         for e in edges]
            continue

        allowed: list[Edge] = []
        for e in edges:
            if e.requests <= 0:
                excluded.append(_excluded(e, "no requests counted"))
            elif e.denied_requests >= e.requests:
                excluded.append(_excluded(e, "every request was denied by an existing policy"))
            else:
                allowed.append(e)
        if not allowed:
            continue

        name = node.workload
        if (node.namespace, "AuthorizationPolicy", name) in used_names or name == "allow-nothing":
            name = f"{node.workload}-{node.kind.lower()}"
        used_names.add((node.namespace, "AuthorizationPolicy", name))

        if gateway:
            policies.append(_gateway_policy(node, name, allowed, dry_run))
            ns_edges[node.namespace].extend(allowed)
            continue

        ap_pa = _workload_policies(graph, node, name, allowed, plaintext, dry_run, excluded)
        if ap_pa is None:
            uncovered[node.namespace].append(dest_id)
            continue
        policies.extend(ap_pa)
        ns_edges[node.namespace].extend(allowed)

    manifests_expl = list(policies)
    # Every observed namespace with meshed workloads gets the defaults, also one whose
    # workloads were only seen calling out: nothing was seen calling in, so nothing may.
    meshed_ns = {n.namespace for n in graph.nodes.values()
                 if n.namespace and n.meshed and not n.id.startswith(NON_WORKLOAD_PREFIXES)}
    for ns in sorted(set(ns_edges) | meshed_ns):
        if ns in system_namespaces:
            continue
        if uncovered.get(ns):
            # A default-deny would break observed traffic that no workload policy expresses.
            excluded.append({
                "source": None, "destination": f"namespace {ns}", "port": None,
                "reason": "allow-nothing and STRICT PeerAuthentication withheld: observed "
                          "traffic to " + ", ".join(sorted(set(uncovered[ns])))
                          + " could not be expressed as a workload policy",
            })
            continue
        edges = ns_edges[ns]
        manifests_expl.append((
            _object("AuthorizationPolicy", ns, "allow-nothing", {}, _annotations(edges,
                    dry_run=dry_run)),
            PolicyExplanation("AuthorizationPolicy", ns, "allow-nothing", None,
                              "deny by default: workloads with no observed traffic get "
                              "nothing"),
        ))
        manifests_expl.append((
            _object("PeerAuthentication", ns, "default", {"mtls": {"mode": "STRICT"}},
                    _annotations(edges)),
            PolicyExplanation("PeerAuthentication", ns, "default", None,
                              "require mTLS for every workload in the namespace"),
        ))
    manifests_expl.sort(key=lambda me: (me[0]["metadata"]["namespace"], me[0]["kind"],
                                        me[0]["metadata"]["name"]))
    excluded.sort(key=lambda x: (str(x["destination"]), str(x["source"]), x["port"] or 0,
                                 x["reason"]))
    return IstioPlan(
        manifests=[m for m, _ in manifests_expl],
        explanations=[e for _, e in manifests_expl],
        excluded=excluded,
    )


def istio_manifests(
    graph: Graph,
    *,
    plaintext: Literal["allow", "deny"] = "allow",
    dry_run: bool = False,
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES,
) -> list[dict[str, Any]]:
    """AuthorizationPolicy/PeerAuthentication dicts, sorted by (namespace, kind, name)."""
    return plan_istio(graph, plaintext=plaintext, dry_run=dry_run,
                      system_namespaces=system_namespaces).manifests


def _gateway_policy(node: Node, name: str, edges: list[Edge],
                    dry_run: bool) -> tuple[dict[str, Any], PolicyExplanation]:
    # An internet-facing listener cannot be pinned to the client IPs that happened to call.
    ports = sorted({e.port for e in edges})
    rule = {"to": [{"operation": {"ports": [str(p) for p in ports]}}]}
    spec = {"action": "ALLOW", "rules": [rule], "selector": {"matchLabels": dict(node.selector)}}
    ap = _object("AuthorizationPolicy", node.namespace or "", name, spec,
                 _annotations(edges, dry_run=dry_run))
    expl = PolicyExplanation(
        "AuthorizationPolicy", node.namespace or "", name, node.id,
        "ingress gateway: observed ports open to any source",
        rules=[RuleExplanation(0, "gateway", True, sorted({e.source for e in edges}), rule,
                               [_evidence(e, True) for e in edges])],
        notes=["Ingress gateway: the observed listener ports are allowed from ANY source; "
               "an internet-facing listener cannot be pinned to the client IPs seen."],
    )
    return ap, expl


def _workload_policies(
    graph: Graph, node: Node, name: str, edges: list[Edge],
    plaintext: str, dry_run: bool, excluded: list[dict[str, Any]],
) -> list[tuple[dict[str, Any], PolicyExplanation]] | None:
    # source key -> (allowances, edges); principals and ipBlocks are grouped separately.
    principal_src: dict[str, tuple[set[tuple[int, str, str, str]], list[Edge]]] = {}
    ip_src: dict[str, tuple[set[tuple[int, str, str, str]], list[Edge], set[str]]] = {}
    weak_ports: set[int] = set()
    weak_edges: list[Edge] = []
    notes: list[str] = []
    for e in edges:
        src = graph.nodes.get(e.source)
        if e.denied_requests:
            notes.append(f"{e.source} -> :{e.port}: {e.denied_requests} of {e.requests} "
                         "requests were denied by an existing policy; the allowed operations "
                         "include whatever the log recorded for them.")
        if _kind(e.protocol) == "http" and not e.operations:
            notes.append(f"{e.source} -> :{e.port}/{e.protocol}: no method/path recorded; "
                         "the whole port is allowed.")
        elif _kind(e.protocol) == "http" and not e.requests_itemized:
            notes.append(f"{e.source} -> :{e.port}/{e.protocol}: packets showed only some of "
                         "its requests (long or HTTP/2 connections); the whole port is allowed, "
                         "the methods/paths seen are in graph.json.")
        principal = src.principal if src is not None else None
        if principal and _has_identity_source(e, src):
            entry = principal_src.setdefault(principal, (set(), []))
            entry[0].update(_triples(e))
            entry[1].append(e)
        if _needs_ip_rule(e, src):
            if plaintext == "deny":
                excluded.append(_excluded(e, "client without a verified identity "
                                             "(plaintext=deny)"))
                continue
            ips = _client_ips(e, src)
            if not ips:
                excluded.append(_excluded(e, "client without a verified identity and no "
                                             "client address to pin it to"))
                continue
            ientry = ip_src.setdefault(e.source, (set(), [], set()))
            ientry[0].update(_triples(e))
            ientry[1].append(e)
            ientry[2].update(ips)
            weak_ports.add(e.port)
            weak_edges.append(e)

    for principal, (_, pedges) in sorted(principal_src.items()):
        workloads = sorted({e.source for e in pedges})
        if len(workloads) > 1:
            notes.append(f"principal {principal} is shared by {', '.join(workloads)}: Istio "
                         "cannot tell them apart, so each may do what any of them was seen "
                         "doing.")

    port_kinds: dict[int, set[str]] = defaultdict(set)
    for e in edges:
        port_kinds[e.port].add(e.protocol)
    for port in sorted(p for p, ks in port_kinds.items() if len({_kind(k) for k in ks}) > 1):
        notes.append(f"port {port} was seen as {', '.join(sorted(port_kinds[port]))}: Istio "
                     "picks one protocol per port; rules with methods/paths are ignored "
                     "if it treats the port as TCP.")

    pairs: list[tuple[dict[str, Any], RuleExplanation]] = []
    # Sources with identical allowances share a rule; TCP and HTTP never share one.
    for kind_name in ("tcp", "http"):
        groups: dict[frozenset[tuple[int, str, str, str]], list[str]] = defaultdict(list)
        for principal, (triples, _) in principal_src.items():
            part = frozenset(t for t in triples if t[1] == kind_name)
            if part:
                groups[part].append(principal)
        for triples_f, principals in groups.items():
            rule = {"from": [{"source": {"principals": sorted(principals)}}],
                    "to": _operations(triples_f)}
            ev = [_evidence(e, False) for p in principals for e in principal_src[p][1]
                  if _kind(e.protocol) == kind_name]
            srcs = sorted({x.source for x in ev})
            pairs.append((rule, RuleExplanation(0, "principals", False, srcs, rule, ev)))
        igroups: dict[frozenset[tuple[int, str, str, str]], list[str]] = defaultdict(list)
        for source, (triples, _, _) in ip_src.items():
            part = frozenset(t for t in triples if t[1] == kind_name)
            if part:
                igroups[part].append(source)
        for triples_f, sources in igroups.items():
            ips = sorted({ip for s in sources for ip in ip_src[s][2]}, key=_ip_sort_key)
            rule = {"from": [{"source": {"ipBlocks": ips}}], "to": _operations(triples_f)}
            ev = [_evidence(e, True) for s in sources for e in ip_src[s][1]
                  if _kind(e.protocol) == kind_name]
            pairs.append((rule, RuleExplanation(0, "ipBlocks", True, sorted(sources), rule,
                                                ev)))
    if not pairs:
        return None
    pairs.sort(key=lambda p: _canon(p[0]))
    rules = []
    for i, (rule, rexpl) in enumerate(pairs):
        rexpl.index = i
        rexpl.edges.sort(key=lambda x: (x.source, x.port, x.protocol))
        rules.append(rule)
    in_rules = {(x.source, x.port, x.protocol) for _, r in pairs for x in r.edges}
    used = [e for e in edges if (e.source, e.port, e.protocol) in in_rules]
    selector = {"matchLabels": dict(node.selector)}
    spec = {"action": "ALLOW", "rules": rules, "selector": selector}
    if node.meshed is False:
        notes.append("This workload has no sidecar: the policy is not enforced until it is "
                     "injected.")
    ap = _object("AuthorizationPolicy", node.namespace or "", name, spec,
                 _annotations(used, dry_run=dry_run))
    out = [(ap, PolicyExplanation("AuthorizationPolicy", node.namespace or "", name, node.id,
                                  "allow the traffic observed to this workload",
                                  rules=[p[1] for p in pairs], notes=sorted(set(notes))))]
    if weak_ports:
        pa_spec = {
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {str(p): {"mode": "PERMISSIVE"} for p in sorted(weak_ports)},
            "selector": selector,
        }
        pa = _object("PeerAuthentication", node.namespace or "", name, pa_spec,
                     _annotations(weak_edges))
        out.append((pa, PolicyExplanation(
            "PeerAuthentication", node.namespace or "", name, node.id,
            "WEAK: accept plaintext on ports used by clients without a verified identity",
            notes=[f"port {p} accepts plaintext (PERMISSIVE) for: "
                   + ", ".join(sorted({e.source for e in weak_edges if e.port == p}))
                   for p in sorted(weak_ports)],
        )))
    return out
