"""Linkerd policy (``--mesh linkerd``) from a learned graph: Server, HTTPRoute,
AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication.

Pinned to the CRD versions Linkerd serves as storage versions (``tests/data/crds``): Server
and HTTPRoute ``policy.linkerd.io/v1beta3``; AuthorizationPolicy, MeshTLSAuthentication and
NetworkAuthentication ``policy.linkerd.io/v1alpha1``.

Semantics relied on (Linkerd docs and source, not guessed):

- A Server denies everything on its port that no authorization allows (``accessPolicy``
  defaults to ``deny``; ``audit`` allows and logs). Reference:
  https://linkerd.io/2-edge/reference/authorization-policy/#server
- HTTP requests are authorized per route. With no HTTPRoute on a Server, the policy controller
  serves a default route (any request) plus a ``probe`` route authorizing the pod spec's
  httpGet probe paths from any network. Once ANY HTTPRoute attaches to the Server, both
  defaults disappear: requests matching no route get 404 and probes must be authorized
  explicitly (https://linkerd.io/2-edge/features/server-policy/#default-authorizations;
  policy-controller ``default_inbound_http_routes``). The docs authorize probes with a route
  for the probe paths and a NetworkAuthentication of ``0.0.0.0/0`` and ``::/0``
  (https://linkerd.io/2-edge/tasks/configuring-per-route-policy/): the kubelet has no mesh
  identity and its source address (node IP) is not in the inventory.
- An AuthorizationPolicy targeting the Server is added to EVERY route of that Server
  (linkerd2-proxy ``mk_authorizations`` chains the server's authorizations after the
  route's); one targeting an HTTPRoute applies to that route only. ``requiredAuthenticationRefs``
  are AND-ed, so identities and networks go into separate policies (OR-ed).
- A request takes exactly one route: the match with the most path characters wins (then
  headers, query, method); ``PathPrefix`` matches whole segments and ignores a trailing
  ``/``; ``Exact`` compares the path without query (linkerd2-proxy ``http/route``). Route
  authorizations are therefore computed per match: a client allowed a prefix is also
  allowed on every more specific match under it, so another client's route never shadows it.
- ``proxyProtocol: gRPC`` Servers only use GRPCRoutes (policy-controller ``to_server``);
  GRPCRoute is outside the pinned CRD set, so gRPC ports that get per-method routes are
  declared ``HTTP/2`` (gRPC is HTTP/2 POST ``/package.Service/Method``).
- Mesh identities are ``<sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain>``.
- The namespace default (``config.linkerd.io/default-inbound-policy: deny``) is an annotation
  read when a pod's proxy starts: it is documented in :attr:`LinkerdPlan.notes`, never
  emitted (see ``_default_policy_notes``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from emit.istio import (
    DEFAULT_SYSTEM_NAMESPACES,
    MANAGED_BY,
    NON_WORKLOAD_PREFIXES,
    UDP_PROTOCOLS,
    EdgeEvidence,
    PolicyExplanation,
    RuleExplanation,
    _annotations,
    _client_ips,
    _evidence,
    _ip_sort_key,
    is_gateway,
)
from learn.model import Edge, Finding, Graph, Node
from learn.workloads import ClusterFacts, WorkloadFacts

log = logging.getLogger(__name__)

GROUP = "policy.linkerd.io"
SERVER_API = f"{GROUP}/v1beta3"
ROUTE_API = f"{GROUP}/v1beta3"
AUTHZ_API = f"{GROUP}/v1alpha1"
#: What the Linkerd docs authorize probes from (the kubelet's node address is unknown here).
ALL_NETWORKS = ("0.0.0.0/0", "::/0")
#: HTTPRoute ``matches[].method`` enum of the pinned CRD.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                          "TRACE", "PATCH"})
#: CRD limits: matches per rule, rules per HTTPRoute, path value length.
MAX_MATCHES, MAX_RULES, MAX_PATH = 8, 16, 1024
LINKERD_SYSTEM_NAMESPACES = DEFAULT_SYSTEM_NAMESPACES | frozenset(
    {"linkerd", "linkerd-viz", "linkerd-jaeger", "linkerd-multicluster"})
DEFAULT_INBOUND_POLICY = "config.linkerd.io/default-inbound-policy"
NON_HTTP = "opaque"

ProxyProtocol = Literal["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque"]


@dataclass
class LinkerdPlan:
    manifests: list[dict[str, Any]]
    explanations: list[PolicyExplanation]
    excluded: list[dict[str, Any]]
    """What traffic was left out and why: dicts with source, destination, port, reason."""
    notes: list[str] = field(default_factory=list)
    """Plan-wide notes for the report (namespace default policy, staging, limits)."""
    findings: list[Finding] = field(default_factory=list)
    """Unmeshed clients allowed by address (``allow_unmeshed``)."""
    namespaces: list[str] = field(default_factory=list)
    """Namespaces that got policies (candidates for the ``deny`` default)."""


def linkerd_identity(namespace: str, service_account: str, trust_domain: str) -> str:
    """The mTLS identity Linkerd gives pods running as ``service_account`` in ``namespace``."""
    return f"{service_account}.{namespace}.serviceaccount.identity.linkerd.{trust_domain}"


# -- route matches ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """One HTTPRoute match: method (None: any) and path (Exact or PathPrefix)."""

    kind: str
    """``Exact`` | ``PathPrefix``."""
    value: str
    method: str | None

    @property
    def stem(self) -> str:
        """PathPrefix as Linkerd compares it: trailing ``/`` trimmed (``""`` for ``/``)."""
        return self.value.rstrip("/")

    @property
    def length(self) -> int:
        """Path characters matched, the first precedence criterion."""
        if self.kind == "Exact":
            return len(self.value)
        # linkerd2-proxy path.rs: "/" scores 1, any other prefix its trimmed length ("//": 0)
        return 1 if self.value == "/" else len(self.stem)

    def covers(self, other: Match) -> bool:
        """Every request ``other`` matches, this matches too."""
        if self.method is not None and self.method != other.method:
            return False
        if self.kind == "Exact":
            return other.kind == "Exact" and other.value == self.value
        return _under(other.value if other.kind == "Exact" else other.stem, self.stem)

    def overlaps(self, other: Match) -> bool:
        """Some request matches both (paths compared without the methods: a match with a
        method never covers one without)."""
        methods_meet = self.method is None or other.method is None or self.method == other.method
        mine, theirs = _any_method(self), _any_method(other)
        return methods_meet and (mine.covers(theirs) or theirs.covers(mine))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": {"type": self.kind, "value": self.value}}
        if self.method is not None:
            out["method"] = self.method
        return out


def _mkey(m: Match) -> tuple[str, str, str]:
    return (m.kind, m.value, m.method or "")


def _any_method(m: Match) -> Match:
    return Match(m.kind, m.value, None)


def _under(path: str, stem: str) -> bool:
    """linkerd2-proxy PathPrefix: whole segments, trailing slashes ignored."""
    if not stem:
        return True
    rest = path.rstrip("/")
    return rest == stem or rest.startswith(stem + "/")


CATCH_ALL = Match("PathPrefix", "/", None)


def family_match(method: str, family: str) -> tuple[Match | None, str]:
    """The Linkerd match for one Istio-syntax (method, path family), or None and why not."""
    m = method.upper()
    if m not in HTTP_METHODS:
        return None, f"method {method!r} is not one an HTTPRoute can match"
    if family == "*":
        return Match("PathPrefix", "/", m), ""
    if family.startswith("*"):
        return None, f"suffix family {family!r} has no HTTPRoute equivalent"
    if "{" in family:
        return None, f"template family {family!r} has no HTTPRoute equivalent"
    if not family.startswith("/") or len(family) > MAX_PATH:
        return None, f"path {family[:60]!r} cannot be an HTTPRoute path"
    if family.endswith("*"):
        prefix = family[:-1]
        cut = prefix[: prefix.rfind("/") + 1]
        note = ""
        if cut != prefix:
            note = (f"prefix {family!r} does not end at a path segment: PathPrefix matches "
                    f"whole segments, so {cut!r} is allowed instead")
        return Match("PathPrefix", cut or "/", m), note
    return Match("Exact", family, m), ""


# -- clients -------------------------------------------------------------------------------


def _service_account(src: Node) -> str | None:
    if src.service_account:
        return src.service_account
    if src.principal and "/sa/" in src.principal:
        return src.principal.rsplit("/sa/", 1)[1] or None
    return None


def _identity(edge: Edge, src: Node | None, trust_domain: str) -> str | None:
    if src is None or edge.source.startswith(NON_WORKLOAD_PREFIXES) or not src.namespace:
        return None
    sa = _service_account(src)
    if not sa or src.meshed is False or edge.mtls == "none":
        return None
    return linkerd_identity(src.namespace, sa, trust_domain)


def _needs_network(edge: Edge, src: Node | None) -> bool:
    if src is None or edge.source.startswith(NON_WORKLOAD_PREFIXES):
        return True
    if src.meshed is False or not _service_account(src):
        return True
    return edge.plaintext_requests > 0 or edge.mtls == "none"


def _cidrs(ips: list[str]) -> list[str]:
    out = set()
    for ip in ips:
        net = ipaddress.ip_network(ip, strict=False)
        out.add(str(net))
    return sorted(out, key=_ip_sort_key)


# -- the plan ------------------------------------------------------------------------------


@dataclass
class _Principal:
    """Who may call: a mesh identity, a set of networks (unmeshed client, probes, anyone)."""

    key: str
    identity: str | None = None
    networks: tuple[str, ...] = ()
    sources: set[str] = field(default_factory=set)
    edges: list[Edge] = field(default_factory=list)


@dataclass
class _ServerWork:
    node: Node
    port: int
    name: str
    edges: list[Edge]
    principals: dict[str, _Principal] = field(default_factory=dict)
    own: dict[str, set[Match]] = field(default_factory=lambda: defaultdict(set))
    """principal key -> matches observed for it (route-expressible edges)."""
    server_level: set[str] = field(default_factory=set)
    """principal keys that need the whole port (TCP, unroutable HTTP)."""
    notes: list[str] = field(default_factory=list)


def _excluded(edge: Edge, reason: str) -> dict[str, Any]:
    return {"source": edge.source, "destination": edge.destination, "port": edge.port,
            "reason": reason}


def _meta(kind: str, api: str, namespace: str, name: str, spec: dict[str, Any],
          edges: list[Edge]) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY),
                     "annotations": _annotations(edges)},
        "spec": spec,
    }


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"group": GROUP, "kind": kind, "name": name}


def plan_linkerd(
    graph: Graph,
    facts: ClusterFacts | None = None,
    *,
    trust_domain: str | None = None,
    allow_unmeshed: bool = False,
    audit: bool = False,
    system_namespaces: frozenset[str] = LINKERD_SYSTEM_NAMESPACES,
) -> LinkerdPlan:
    """Manifests plus, for the report, why each object exists and what was left out.

    ``allow_unmeshed``: clients without a mesh identity (plaintext, external, unmeshed pods)
    are allowed by address through a NetworkAuthentication, with a finding each; off, they are
    left out (listed in ``excluded``) and the policy denies them. ``audit``: Servers get
    ``accessPolicy: audit`` (allow and log what the policy would deny) for staging.
    """
    td = trust_domain or graph.trust_domain
    excluded: list[dict[str, Any]] = []
    findings: list[Finding] = []
    by_dest: dict[str, list[Edge]] = defaultdict(list)
    for edge in graph.edges:
        if edge.protocol in UDP_PROTOCOLS:
            excluded.append(_excluded(edge, "UDP traffic: the Linkerd proxy does not carry "
                                            "UDP, its policies do not apply"))
            continue
        by_dest[edge.destination].append(edge)

    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    used: set[tuple[str, str]] = set()
    namespaces: set[str] = set()
    for dest_id in sorted(by_dest):
        edges = sorted(by_dest[dest_id], key=lambda e: (e.source, e.port, e.protocol))
        node = graph.nodes.get(dest_id)
        reason = _unprotectable(dest_id, node, system_namespaces)
        if reason:
            excluded += [_excluded(e, reason) for e in edges]
            continue
        assert node is not None and node.namespace and node.workload
        live: list[Edge] = []
        for e in edges:
            if e.requests <= 0:
                excluded.append(_excluded(e, "no requests counted"))
            elif e.denied_requests >= e.requests:
                excluded.append(_excluded(e, "every request was denied by an existing policy"))
            else:
                live.append(e)
        wfacts = facts.get(dest_id) if facts else None
        by_port: dict[int, list[Edge]] = defaultdict(list)
        for e in live:
            by_port[e.port].append(e)
        for port in sorted(by_port):
            name = f"{node.workload}-{port}"
            if (node.namespace, name) in used:
                name = f"{node.workload}-{node.kind.lower()}-{port}"
            used.add((node.namespace, name))
            work = _ServerWork(node=node, port=port, name=name, edges=by_port[port])
            _collect(work, graph, td, allow_unmeshed, excluded, findings)
            objs = _server_objects(work, wfacts, audit)
            if objs:
                out.extend(objs)
                namespaces.add(node.namespace)

    out.sort(key=lambda me: (me[0]["metadata"]["namespace"], me[0]["kind"],
                             me[0]["metadata"]["name"]))
    excluded.sort(key=lambda x: (str(x["destination"]), str(x["source"]), x["port"] or 0,
                                 x["reason"]))
    findings.sort(key=lambda f: f.id)
    return LinkerdPlan(
        manifests=[m for m, _ in out], explanations=[e for _, e in out], excluded=excluded,
        notes=_default_policy_notes(sorted(namespaces), audit, td, facts),
        findings=findings, namespaces=sorted(namespaces),
    )


def linkerd_manifests(graph: Graph, facts: ClusterFacts | None = None,
                      **options: Any) -> list[dict[str, Any]]:
    """The manifests of :func:`plan_linkerd`, sorted by (namespace, kind, name)."""
    return plan_linkerd(graph, facts, **options).manifests


def _unprotectable(dest_id: str, node: Node | None, system: frozenset[str]) -> str | None:
    if dest_id.startswith(NON_WORKLOAD_PREFIXES):
        return "destination is not a workload in the mesh; no policy"
    if node is None or not node.namespace or not node.workload:
        return "destination workload not in the graph's nodes"
    if not node.selector:
        return "destination has no pod selector; a Server without one would select every pod"
    if node.namespace in system and not is_gateway(node):
        return f"destination in system namespace {node.namespace}: left to the platform"
    return None


def _collect(work: _ServerWork, graph: Graph, td: str, allow_unmeshed: bool,
             excluded: list[dict[str, Any]], findings: list[Finding]) -> None:
    """Principals of the Server and, per principal, its route matches or the whole port."""
    gateway = is_gateway(work.node)
    for e in work.edges:
        src = graph.nodes.get(e.source)
        keys: list[str] = []
        identity = _identity(e, src, td)
        if identity:
            keys.append(_add(work, "id:" + identity, e, identity=identity))
        if gateway and _needs_network(e, src):
            work.server_level.add(_add(work, "any", e, networks=ALL_NETWORKS))
            work.notes.append(f"{e.source} -> :{e.port}: ingress gateway, the port is open to "
                              "any address (a public listener cannot be pinned to the "
                              "clients seen).")
        elif _needs_network(e, src):
            ips = _client_ips(e, src)
            if not allow_unmeshed:
                excluded.append(_excluded(e, "client without a mesh identity: left out "
                                             "(allow_unmeshed off)"))
            elif not ips:
                excluded.append(_excluded(e, "client without a mesh identity and no address "
                                             "to pin it to"))
            else:
                keys.append(_add(work, "net:" + e.source, e, networks=tuple(_cidrs(ips))))
                findings.append(Finding(
                    id=f"unmeshed-allowed:{e.source}->{e.destination}:{e.port}",
                    kind="unmeshed-allowed", severity="medium", source=e.source,
                    destination=e.destination, port=e.port,
                    summary=(f"{e.source} has no mesh identity; it is allowed to "
                             f"{e.destination}:{e.port} by address ({', '.join(_cidrs(ips))}) "
                             "through a NetworkAuthentication. Mesh it to drop this."),
                    evidence=sorted(e.evidence)[:3]))
        if not keys:
            continue
        matches, why = _edge_matches(e)
        if matches is None:
            work.server_level.update(keys)
            if why:
                work.notes.append(f"{e.source} -> :{e.port}/{e.protocol}: {why}; it is "
                                  "allowed the whole port (Server-level policy).")
        else:
            for k in keys:
                work.own[k].update(matches)
            work.notes += [f"{e.source} -> :{e.port}: {n}." for n in _why_notes(e)]


def _why_notes(edge: Edge) -> list[str]:
    return sorted({n for op in edge.operations for n in [family_match(op.method, op.path)[1]]
                   if n})


def _add(work: _ServerWork, key: str, edge: Edge, *, identity: str | None = None,
         networks: tuple[str, ...] = ()) -> str:
    p = work.principals.get(key)
    if p is None:
        p = work.principals[key] = _Principal(key, identity=identity)
    p.networks = tuple(sorted(set(p.networks) | set(networks), key=_ip_sort_key))
    p.sources.add(edge.source)
    p.edges.append(edge)
    return key


def _edge_matches(edge: Edge) -> tuple[set[Match] | None, str]:
    """The edge's route matches, or None (whole port) with the reason."""
    if edge.protocol not in ("http", "grpc"):
        return None, ""
    if not edge.operations:
        return None, "no method/path recorded"
    if not edge.requests_itemized:
        return None, ("packets showed only some of its requests; the methods/paths seen are "
                      "a sample")
    out: set[Match] = set()
    for op in edge.operations:
        m, why = family_match(op.method, op.path)
        if m is None:
            return None, why
        out.add(m)
    return out, ""


def _protocol(work: _ServerWork, wfacts: WorkloadFacts | None, routed: bool) -> ProxyProtocol:
    kinds = {e.protocol for e in work.edges}
    if kinds <= {"grpc"}:
        if routed:
            work.notes.append("gRPC port declared HTTP/2: a gRPC Server only takes GRPCRoutes "
                              "(outside the pinned CRDs); HTTPRoutes match gRPC calls as "
                              "HTTP/2 POSTs, and denied calls get HTTP 403 "
                              "(PERMISSION_DENIED to gRPC clients).")
            return "HTTP/2"
        return "gRPC"
    if kinds <= {"http", "grpc"}:
        app = wfacts.app_protocols.get(work.port) if wfacts else None
        if app == "kubernetes.io/h2c":
            return "HTTP/2"
        return "unknown"
    if not kinds & {"http", "grpc"}:
        work.notes.append(f"port {work.port} carried only non-HTTP traffic "
                          f"({', '.join(sorted(kinds))}): declared opaque (no protocol "
                          "detection, which also keeps server-speaks-first protocols working).")
        return "opaque"
    work.notes.append(f"port {work.port} was seen as {', '.join(sorted(kinds))}: protocol "
                      "detection left on; non-HTTP clients are authorized on the whole port.")
    return "unknown"


def _server_objects(work: _ServerWork, wfacts: WorkloadFacts | None,
                    audit: bool) -> list[tuple[dict[str, Any], PolicyExplanation]]:
    node, ns = work.node, work.node.namespace or ""
    if not work.principals:
        return []
    routable = any(work.own.values())
    kinds = {e.protocol for e in work.edges}
    proto = _protocol(work, wfacts, routable and kinds <= {"http", "grpc"})
    routed = routable and proto in ("unknown", "HTTP/1", "HTTP/2")
    if routable and not routed:
        work.server_level.update(k for k, v in work.own.items() if v)
    port_name = wfacts.port_name(work.port) if wfacts else None
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": dict(sorted(node.selector.items()))},
        "port": port_name or work.port,
        "proxyProtocol": proto,
    }
    if audit:
        spec["accessPolicy"] = "audit"
    if node.meshed is False:
        work.notes.append("This workload has no proxy: the policy is not enforced until it is "
                          "injected.")
    if wfacts is not None and wfacts.mesh not in (None, "linkerd"):
        work.notes.append(f"Its pods carry a {wfacts.mesh} proxy, not linkerd-proxy: Linkerd "
                          "enforces nothing there.")
    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    server = _meta("Server", SERVER_API, ns, work.name, spec, work.edges)
    out.append((server, PolicyExplanation("Server", ns, work.name, node.id,
                                          f"port {work.port} ({proto}) of {node.id}: "
                                          "traffic no authorization allows is denied")))
    if routed:
        out += _routes(work, wfacts)
    else:
        if wfacts is not None and wfacts.http_probe_paths(work.port) and proto in (
                "unknown", "HTTP/1", "HTTP/2"):
            work.notes.append("No HTTPRoute on this Server: Linkerd keeps authorizing the "
                              "kubelet's probes (" + ", ".join(wfacts.http_probe_paths(work.port))
                              + ") by default.")
        elif proto == "gRPC":
            work.notes.append("gRPC Server: kubelet gRPC probes on this port (if any) have no "
                              "mesh identity and would be denied; the inventory records httpGet "
                              "probes only.")
        work.server_level.update(work.principals)
    out += _authorizations(work, "Server", work.name, sorted(work.server_level),
                           "allow the clients observed on the whole port")
    out[0][1].notes = sorted(set(work.notes))
    return out


def _routes(work: _ServerWork,
            wfacts: WorkloadFacts | None) -> list[tuple[dict[str, Any], PolicyExplanation]]:
    ns = work.node.namespace or ""
    units: set[Match] = set()
    for own_matches in work.own.values():
        units |= own_matches
    probe_paths = wfacts.http_probe_paths(work.port) if wfacts else []
    if probe_paths:
        work.principals["probe"] = _Principal("probe", networks=ALL_NETWORKS,
                                              sources={"kubelet"})
        work.own["probe"] = {Match("Exact", p, "GET") for p in probe_paths}
        units |= work.own["probe"]
        work.notes.append("Kubelet probe paths (" + ", ".join(probe_paths) + ") are allowed "
                          "from any address, as Linkerd's default probe authorization does.")
    else:
        work.notes.append("HTTPRoutes replace Linkerd's default probe authorization and no "
                          "httpGet probe is known for this port: if the kubelet probes it, add "
                          "a probe route.")
    if work.server_level:
        units.add(CATCH_ALL)  # so whole-port clients' requests find a route (else 404)
    allowed: dict[Match, set[str]] = {}
    for u in units:
        allowed[u] = {k for k, own in work.own.items()
                      if k not in work.server_level and any(f.covers(u) for f in own)}
    # Overlapping matches of equal precedence (path characters matched, then whether a method
    # is given: linkerd2-proxy http/match.rs RequestMatch ordering) tie: the route order
    # decides, so either may win and both must allow.
    ordered = sorted(units, key=_mkey)
    for i, u in enumerate(ordered):
        for v in ordered[i + 1:]:
            if (u.length == v.length and (u.method is None) == (v.method is None)
                    and u.overlaps(v) and allowed[u] != allowed[v]):
                merged = allowed[u] | allowed[v]
                allowed[u] = set(merged)
                allowed[v] = set(merged)
                work.notes.append(f"{u.kind} {u.value} and {v.kind} {v.value} tie on route "
                                  "precedence: their clients are allowed on both.")
    groups: dict[frozenset[str], list[Match]] = defaultdict(list)
    for u in ordered:
        if allowed[u] or u == CATCH_ALL:
            groups[frozenset(allowed[u])].append(u)
    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    index = 0
    for keys, matches in sorted(groups.items(),
                                key=lambda kv: (sorted(kv[0]), [_mkey(m) for m in kv[1]])):
        chunk_size = MAX_MATCHES * MAX_RULES
        chunks = [matches[i:i + chunk_size] for i in range(0, len(matches), chunk_size)]
        for chunk in chunks:
            if keys == frozenset({"probe"}):
                name = f"{work.name}-probes"
            elif not keys:
                name = f"{work.name}-any"
            else:
                index += 1
                name = f"{work.name}-route-{index}"
            if len(chunks) > 1 and keys in (frozenset({"probe"}), frozenset()):
                name += f"-{chunks.index(chunk) + 1}"
            rules = [{"matches": [m.as_dict() for m in chunk[i:i + MAX_MATCHES]]}
                     for i in range(0, len(chunk), MAX_MATCHES)]
            spec = {"parentRefs": [_ref("Server", work.name)], "rules": rules}
            edges = [e for k in sorted(keys) for e in work.principals[k].edges]
            route = _meta("HTTPRoute", ROUTE_API, ns, name, spec, edges or work.edges)
            reason = ("catch-all: requests of whole-port clients find a route (the Server-level "
                      "policy allows them)" if not keys else
                      "kubelet probe paths from the pod spec" if keys == {"probe"} else
                      "requests observed from " + ", ".join(
                          sorted({s for k in keys for s in work.principals[k].sources})))
            out.append((route, PolicyExplanation("HTTPRoute", ns, name, work.node.id, reason)))
            out += _authorizations(work, "HTTPRoute", name, sorted(keys),
                                   "allow these routes to the clients observed on them")
    return out


def _authorizations(work: _ServerWork, target_kind: str, target: str, keys: list[str],
                    reason: str) -> list[tuple[dict[str, Any], PolicyExplanation]]:
    """AuthorizationPolicy + MeshTLSAuthentication (identities) and/or + NetworkAuthentication
    (networks) for ``target``: separate policies, because required authentications AND."""
    ns = work.node.namespace or ""
    principals = [work.principals[k] for k in keys]
    out: list[tuple[dict[str, Any], PolicyExplanation]] = []
    ids = [p for p in principals if p.identity]
    nets = [p for p in principals if p.networks]
    for kind, group, name in (("MeshTLSAuthentication", ids, target),
                              ("NetworkAuthentication", nets, f"{target}-net")):
        if not group:
            continue
        edges = [e for p in group for e in p.edges]
        if kind == "MeshTLSAuthentication":
            authn_spec: dict[str, Any] = {"identities": sorted({p.identity or "" for p in group})}
            rule_kind, weak = "identities", False
        else:
            nets_all = sorted({n for p in group for n in p.networks}, key=_ip_sort_key)
            authn_spec = {"networks": [{"cidr": n} for n in nets_all]}
            group_keys = {p.key for p in group}
            rule_kind = ("probes" if group_keys == {"probe"} else
                         "gateway" if group_keys == {"any"} else "networks")
            weak = True
        authn = _meta(kind, AUTHZ_API, ns, name, authn_spec, edges or work.edges)
        ap_spec = {"targetRef": _ref(target_kind, target),
                   "requiredAuthenticationRefs": [_ref(kind, name)]}
        ap = _meta("AuthorizationPolicy", AUTHZ_API, ns, name, ap_spec, edges or work.edges)
        ev: list[EdgeEvidence] = sorted((_evidence(e, weak) for e in edges),
                                        key=lambda x: (x.source, x.port, x.protocol))
        sources = sorted({s for p in group for s in p.sources})
        rule = RuleExplanation(0, rule_kind, weak, sources, {"targetRef": ap_spec["targetRef"],
                                                             "authentication": authn_spec}, ev)
        out.append((ap, PolicyExplanation("AuthorizationPolicy", ns, name, work.node.id,
                                          reason, rules=[rule])))
        out.append((authn, PolicyExplanation(kind, ns, name, work.node.id,
                                             f"clients of {target_kind} {target}")))
    return out


def _default_policy_notes(namespaces: list[str], audit: bool, td: str,
                          facts: ClusterFacts | None) -> list[str]:
    notes = [
        f"Identities assume the trust domain {td!r} "
        "(`<sa>.<ns>.serviceaccount.identity.linkerd.<trust-domain>`).",
        "Servers only cover the ports traffic was seen on. To deny everything else (idle "
        "workloads, unobserved ports) set the namespace default: `kubectl annotate namespace "
        f"<ns> {DEFAULT_INBOUND_POLICY}=deny` for "
        + (", ".join(namespaces) or "the namespaces above")
        + ", then restart the workloads: the default is read when a pod's proxy starts "
        "(https://linkerd.io/2-edge/features/server-policy/#default-policies). It is not "
        "emitted as a Namespace manifest: applying one would take over an object the cluster "
        "owns, it only takes effect after a rollout, and Linkerd keeps authorizing probes on "
        "ports with no Server, so it is a deliberate step of its own.",
    ]
    if audit:
        notes.append("Servers are in audit mode (`accessPolicy: audit`): denials are only "
                     "logged; remove the field to enforce.")
    if facts is None:
        notes.append("No inventory: Server ports are numbers and no kubelet probe paths are "
                      "known (HTTPRoutes then need a probe route added by hand).")
    return notes
