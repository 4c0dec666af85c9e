"""Decide what Linkerd policy does to one inbound request or connection, as the proxy would.

Semantics from Linkerd's documentation (2.x edge):

* https://linkerd.io/2-edge/reference/authorization-policy/ (default policies, Server,
  HTTPRoute, AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication,
  ServerAuthorization)
* https://linkerd.io/2-edge/features/server-policy/ (default probe authorizations, rejections)
* https://linkerd.io/2-edge/tasks/configuring-per-route-policy/ (requests matching no route are
  rejected; routes disable the default probe authorization)
* https://linkerd.io/2-edge/reference/httproute/ and the Gateway API HTTPRoute reference
  https://gateway-api.sigs.k8s.io/reference/spec/#gateway.networking.k8s.io/v1.HTTPRouteSpec
  (path match types and precedence)
* the CRDs (``policy.linkerd.io`` Server v1beta3, AuthorizationPolicy / MeshTLSAuthentication /
  NetworkAuthentication v1alpha1, HTTPRoute v1beta3, ``gateway.networking.k8s.io/v1``
  HTTPRoute): ``requiredAuthenticationRefs`` - ALL must be satisfied and an authorization whose
  referred object cannot be found is ignored; ``Server.spec.accessPolicy`` defaults to deny.

The decision for a request to a meshed pod's port:

1. Servers in the pod's namespace whose ``podSelector`` selects the pod and whose ``port`` is the
   port number or the name of a container port with that number. None: the *default policy*
   decides (the pod's ``config.linkerd.io/default-inbound-policy`` annotation, else its
   namespace's, else the cluster default), with kubelet probes (GET to a probe path) always
   authorized.
2. With a Server, HTTP requests are routed as linkerd2-proxy routes them (source files and
   lines cited above :func:`select_route`): when HTTPRoutes name the Server as a parent, the
   request takes the one route whose match scores highest - host match, then path characters
   matched (``Exact`` and ``PathPrefix`` alike; prefixes and paths trimmed of trailing ``/``),
   header count, query-parameter count, method given; ties go to the older route, then the
   name - and a request no route matches is rejected (404). Without routes every request is on
   the default route and the probe route still authorizes probes. ``gRPC`` Servers take no
   HTTPRoutes (GRPCRoutes are not modelled: the default route); ``opaque``/``TLS`` Servers
   route nothing (connection-level authorizations only).
3. Authorizations: AuthorizationPolicies targeting the Server, the chosen route, or the
   namespace, and ServerAuthorizations selecting the Server (by name or labels). Any one whose
   authentications all hold allows the request; TCP connections (and opaque traffic) only see
   the ones on the Server and the namespace.
4. Otherwise the Server's ``accessPolicy`` (default ``deny``) decides, like a default policy.

Authentications: ``MeshTLSAuthentication`` identities (``*`` = any meshed client, ``*.suffix``
and exact), ``identityRefs`` to ServiceAccounts (namespace defaults to the authentication's) or
Namespaces; ``NetworkAuthentication`` networks (``cidr`` minus ``except``); a ``ServiceAccount``
referred directly; ServerAuthorization ``client`` (``unauthenticated``, ``meshTLS.identities`` /
``serviceAccounts`` / ``unauthenticatedTLS``, ``networks``; networks default to all addresses).
Default policies: ``all-unauthenticated`` / ``audit`` allow everything (audit flags it),
``all-authenticated`` needs a mesh identity, ``cluster-authenticated`` a mesh identity from the
cluster networks, ``cluster-unauthenticated`` a client in the cluster networks, ``deny``
nothing. Header and query-parameter matches cannot be evaluated from access logs: such a route
makes the verdict *unknown*. GRPCRoute is not modelled (its traffic takes the Server's
authorizations).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emit.evaluate import ALLOW, DENY, UNKNOWN, Tri, _and, _ip_in
from emit.evaluate_netpol import selector_matches

LINKERD_GROUP = "policy.linkerd.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"
DEFAULT_POLICY_ANNOTATION = "config.linkerd.io/default-inbound-policy"
DEFAULT_POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-authenticated",
                    "cluster-unauthenticated", "deny", "audit")
#: Linkerd's default ``clusterNetworks`` (helm value).
DEFAULT_CLUSTER_NETWORKS = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16",
                            "fd00::/8")
LINKERD_KINDS = ("Server", "AuthorizationPolicy", "MeshTLSAuthentication",
                 "NetworkAuthentication", "ServerAuthorization", "HTTPRoute")


def is_linkerd(obj: Mapping[str, Any]) -> bool:
    """A Linkerd policy object (or a Gateway API HTTPRoute, which Linkerd also reads)."""
    group = str(obj.get("apiVersion", "")).split("/", 1)[0]
    kind = obj.get("kind")
    if group == LINKERD_GROUP:
        return kind in LINKERD_KINDS
    return group == GATEWAY_GROUP and kind == "HTTPRoute"


def linkerd_identity(principal: str | None, identity_domain: str = "cluster.local") -> str | None:
    """``<td>/ns/<ns>/sa/<sa>`` -> ``<sa>.<ns>.serviceaccount.identity.linkerd.<domain>``.

    A string that already is a Linkerd identity (no ``/``) is returned as is.
    """
    if not principal:
        return None
    if "/" not in principal:
        return principal
    parts = principal.split("/")
    try:
        ns = parts[parts.index("ns") + 1]
        sa = parts[parts.index("sa") + 1]
    except (ValueError, IndexError):
        return None
    return f"{sa}.{ns}.serviceaccount.identity.linkerd.{identity_domain}"


@dataclass(frozen=True)
class LinkerdRequest:
    """One request (or TCP connection) arriving at a meshed pod."""

    namespace: str
    labels: Mapping[str, str]
    port: int
    port_names: tuple[str, ...] = ()
    """Names of the pod's container ports whose number is ``port``."""
    protocol: str = "http"
    """``http``, ``grpc`` (routed) or ``tcp`` (opaque)."""
    method: str | None = None
    path: str | None = None
    client_identity: str | None = None
    """The client's mTLS identity (``<sa>.<ns>.serviceaccount.identity.linkerd.<domain>``)."""
    client_ip: str | None = None
    default_policy: str | None = None
    """The pod's (or its namespace's) ``config.linkerd.io/default-inbound-policy``; None: the
    cluster default given to :func:`evaluate_linkerd`."""
    probe_paths: frozenset[tuple[int, str]] = frozenset()
    """(port, path) of the pod's HTTP kubelet probes."""
    host: str | None = None
    """The request's ``Host``/``:authority`` (matched against HTTPRoute ``hostnames``)."""

    @property
    def http(self) -> bool:
        return self.protocol in ("http", "grpc")

    @property
    def is_probe(self) -> bool:
        path = (self.path or "").split("?", 1)[0]
        return self.http and self.method == "GET" and (self.port, path) in self.probe_paths


@dataclass
class LinkerdDecision:
    verdict: str
    reason: str
    server: str | None = None
    """``<ns>/<name>`` of the Server that owns the port, or None (default policy)."""
    route: str | None = None
    """``<ns>/<name>`` of the HTTPRoute taken, ``default``/``probe``, or None (TCP)."""
    authorization: str | None = None
    """``<Kind> <ns>/<name>`` that allowed it, or ``default:<policy>``."""
    audit: bool = False
    """Allowed only by an ``audit`` policy (the proxy flags it)."""
    hits: dict[str, set[str]] = field(default_factory=dict)
    """``<Kind> <ns>/<name>`` -> parts used: ``''`` (the object), ``identities[1]``,
    ``networks[0]``, ``rules[0].matches[1]``."""

    @property
    def allowed(self) -> bool:
        return self.verdict == ALLOW


def _meta(obj: Mapping[str, Any], default_ns: str) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or default_ns), str(meta.get("name"))


def key(obj: Mapping[str, Any], default_ns: str = "default") -> str:
    ns, name = _meta(obj, default_ns)
    return f"{obj.get('kind')} {ns}/{name}"


class LinkerdPolicies:
    """The Linkerd objects of a policy set, indexed for evaluation.

    Objects without ``metadata.namespace`` (like ``kubectl apply -n`` fixtures) are placed in
    ``default_namespace``.
    """

    def __init__(self, manifests: Iterable[Mapping[str, Any]], *,
                 default_namespace: str = "default",
                 cluster_default: str = "all-unauthenticated",
                 cluster_networks: Sequence[str] = DEFAULT_CLUSTER_NETWORKS,
                 identity_domain: str = "cluster.local") -> None:
        if cluster_default not in DEFAULT_POLICIES:
            raise ValueError(f"unknown default policy {cluster_default!r}")
        self.default_namespace = default_namespace
        self.cluster_default = cluster_default
        self.cluster_networks = tuple(cluster_networks)
        self.identity_domain = identity_domain
        self.objects = [m for m in manifests if is_linkerd(m)]
        self.by_kind: dict[str, list[Mapping[str, Any]]] = {}
        for obj in self.objects:
            self.by_kind.setdefault(str(obj.get("kind")), []).append(obj)
        self._index = {(str(o.get("kind")), *_meta(o, default_namespace)): o
                       for o in self.objects}

    def ns(self, obj: Mapping[str, Any]) -> str:
        return _meta(obj, self.default_namespace)[0]

    def get(self, kind: str, ns: str, name: str) -> Mapping[str, Any] | None:
        return self._index.get((kind, ns, name))

    # -- selection ------------------------------------------------------------------------
    def servers_for(self, req: LinkerdRequest) -> list[Mapping[str, Any]]:
        out = []
        for server in self.by_kind.get("Server", []):
            if self.ns(server) != req.namespace:
                continue
            spec = server.get("spec") or {}
            if not selector_matches(spec.get("podSelector"), req.labels):
                continue
            port = spec.get("port")
            if str(port) == str(req.port) or (isinstance(port, str) and port in req.port_names):
                out.append(server)
        return sorted(out, key=lambda s: _meta(s, self.default_namespace)[1])

    def routes_for(self, server: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        ns, name = _meta(server, self.default_namespace)
        out = []
        for route in self.by_kind.get("HTTPRoute", []):
            rns = self.ns(route)
            for ref in (route.get("spec") or {}).get("parentRefs") or []:
                if (ref.get("kind") == "Server" and ref.get("name") == name
                        and str(ref.get("group") or LINKERD_GROUP) == LINKERD_GROUP
                        and str(ref.get("namespace") or rns) == ns and rns == ns):
                    out.append(route)
                    break
        return out


# -- HTTPRoute matching ---------------------------------------------------------------------
#
# Route selection follows linkerd2-proxy (linkerd/linkerd2-proxy @ 29637b64, read, not copied):
#
# * linkerd/http/route/src/http/match/path.rs:22-55 - ``Exact`` matches the request path
#   (``uri.path()``, no query) verbatim and scores its length; ``PathPrefix`` ``/`` scores 1;
#   any other prefix has its trailing ``/`` trimmed, the request path too, and must then match
#   whole segments; it scores the trimmed prefix's length; a ``RegularExpression`` must span
#   the whole path (leftmost-first search anchored at both ends) and scores the path's length.
#   path.rs:99-103: Exact, Prefix and Regex compare by that length only - an Exact ``/a`` and a
#   PathPrefix ``/a`` tie.
# * linkerd/http/route/src/http/match.rs:45-70 - a match needs its method (compared as is),
#   path, every header and every query parameter; match.rs:96-103 ranks (path length, header
#   count, query-parameter count, method given); match.rs:73-85 - no path is ``Prefix("/")``.
# * linkerd/http/route/src/lib.rs:57-107 - a route with ``hostnames`` applies only when one
#   matches the request's host (http/match/host.rs:51-80, exact beats ``*.`` suffix, then
#   longer); routes are compared by (host match, rule match), a rule by its best match, a rule
#   without matches has the default one; on a tie the FIRST route/rule wins (``best``).
# * The route order is the policy controller's (linkerd/linkerd2 @ b24cd405,
#   policy-controller/grpc/src/inbound/http.rs:25-35 and core/src/routes.rs:108-116): oldest
#   ``creationTimestamp`` first (routes with one before those without), then name, group.
# * linkerd/app/inbound/src/policy/http.rs:213-229 - no route: 404; the route's authorizations
#   then the Server's (linkerd/proxy/server-policy/src/authz.rs:80-87) are tried in turn.
# * Which routes a Server has (policy-controller/k8s/index/src/inbound/index.rs:1997-2035):
#   HTTPRoutes naming it; none: the defaults (``default`` + ``probe``); a ``gRPC`` Server only
#   has GRPCRoutes (not modelled here: the default route); opaque/TLS Servers route nothing
#   (policy-controller/grpc/src/inbound.rs:186-220).

#: (host match, path length, headers, query parameters, method): greater wins.
Rank = tuple[tuple[int, int], int, int, int, int]


def path_match_length(match: Mapping[str, Any], path: str) -> tuple[Tri, int]:
    """(matches, characters matched) of one HTTPRoute match's ``path`` against a request path
    without its query, as linkerd2-proxy scores it."""
    spec = match.get("path")
    if not spec:
        return True, 1
    kind = spec.get("type") or "PathPrefix"
    value = spec.get("value")
    value = "/" if value is None else str(value)
    if kind == "Exact":
        return path == value, len(value)
    if kind == "PathPrefix":
        if value == "/":
            return True, 1
        prefix = value.rstrip("/")
        rest = path.rstrip("/")
        if not rest.startswith(prefix):
            return False, 0
        suffix = rest[len(prefix):]
        return suffix == "" or suffix.startswith("/"), len(prefix)
    if kind == "RegularExpression":
        try:
            found = re.search(value, path)
        except re.error:
            return None, len(path)  # Rust regex syntax Python does not parse
        return found is not None and found.start() == 0 and found.end() == len(path), len(path)
    return None, 0


def _authority_host(authority: str) -> str:
    """The host of a ``Host``/``:authority`` value (port and brackets dropped)."""
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else authority


def host_match(pattern: str, host: str) -> tuple[int, int] | None:
    """linkerd2-proxy's host match: ``(2, len)`` exact, ``(1, len)`` ``*.`` suffix, or None."""
    if pattern.startswith("*."):
        labels = pattern[2:].split(".")[::-1]
        if labels[0] != "":
            host = host.removesuffix(".")
        length = 0
        for label in labels:
            if len(host) < len(label) or host[len(host) - len(label):].lower() != label.lower():
                return None
            host = host[:len(host) - len(label)]
            if not host.endswith("."):
                return None
            host = host[:-1]
            length += len(label) + 1
        return (1, length)
    if not pattern.endswith("."):
        host = host.removesuffix(".")
    return (2, len(pattern)) if pattern.lower() == host.lower() else None


def _route_host(route: Mapping[str, Any], req: LinkerdRequest) -> tuple[Tri, tuple[int, int]]:
    hostnames = (route.get("spec") or {}).get("hostnames") or []
    if not hostnames:
        return True, (0, 0)
    if not req.host:
        return None, (1, 0)  # the request's host is not in the evidence
    host = _authority_host(req.host)
    scores = [s for s in (host_match(str(h), host) for h in hostnames) if s is not None]
    return (True, max(scores)) if scores else (False, (0, 0))


def _match(match: Mapping[str, Any], req: LinkerdRequest) -> tuple[Tri, int, int, int, int]:
    """(matches, path length, headers, query parameters, method given) for one match."""
    path = (req.path or "/").split("?", 1)[0]
    checks: list[Tri] = []
    method = match.get("method")
    if method:
        checks.append(None if req.method is None else str(method) == req.method)
    ok, length = path_match_length(match, path)
    checks.append(ok)
    headers = len(match.get("headers") or [])
    query = len(match.get("queryParams") or [])
    if headers or query:
        checks.append(None)  # headers and query parameters are not in the access log
    return _and(checks), length, headers, query, int(bool(method))


def route_order(route: Mapping[str, Any]) -> tuple[int, str, str, str]:
    """The policy controller's order of a Server's routes (earlier wins ties)."""
    meta = route.get("metadata") or {}
    ts = meta.get("creationTimestamp")
    group = str(route.get("apiVersion", "")).split("/", 1)[0]
    return (0 if ts else 1, str(ts or ""), str(meta.get("name")), group)


@dataclass(frozen=True)
class _Candidate:
    certain: bool
    rank: Rank
    order: tuple[int, int]
    """(route position, rule index): lower wins a tie."""
    route: Mapping[str, Any]
    where: tuple[str, ...]


def _candidates(routes: Sequence[Mapping[str, Any]], req: LinkerdRequest) -> list[_Candidate]:
    """The best match of every rule that may match ``req``, per route and rule."""
    out = []
    for r, route in enumerate(sorted(routes, key=route_order)):
        host_ok, host_rank = _route_host(route, req)
        if host_ok is False:
            continue
        for i, rule in enumerate((route.get("spec") or {}).get("rules") or [{}]):
            matches = rule.get("matches") or []
            scored: list[tuple[Tri, Rank, str]] = []
            if not matches:
                scored.append((True, (host_rank, 1, 0, 0, 0), f"rules[{i}]"))
            for j, m in enumerate(matches):
                ok, length, headers, query, method = _match(m, req)
                if ok is not False:
                    scored.append((ok, (host_rank, length, headers, query, method),
                                   f"rules[{i}].matches[{j}]"))
            for certain in (True, False):
                mine = [s for s in scored if (s[0] is True) == certain]
                if not mine:
                    continue
                best = max(s[1] for s in mine)
                out.append(_Candidate(
                    certain and host_ok is True, best, (r, i), route,
                    tuple(s[2] for s in mine if s[1] == best)))
    return out


def _beats(a: _Candidate, b: _Candidate) -> bool:
    return a.rank > b.rank or (a.rank == b.rank and a.order < b.order)


def select_route(routes: Sequence[Mapping[str, Any]], req: LinkerdRequest
                 ) -> tuple[Tri, Mapping[str, Any] | None, tuple[str, ...]]:
    """The route (and its best matches) linkerd2-proxy takes for ``req``: (True, route, where);
    (False, None, ()) when none matches (404); (None, route or None, ()) when a header, query
    or host match the evidence cannot decide could change which route is taken."""
    found = _candidates(routes, req)
    certain = [c for c in found if c.certain]
    best: _Candidate | None = None
    for c in certain:
        if best is None or _beats(c, best):
            best = c
    doubts = [c for c in found if not c.certain and (best is None or _beats(c, best))]
    if best is None:
        return (None, doubts[0].route, ()) if doubts else (False, None, ())
    if any(c.route is not best.route for c in doubts):
        return None, best.route, ()
    return True, best.route, best.where


# -- authentications ------------------------------------------------------------------------


def _identity_matches(pattern: str, identity: str | None) -> bool:
    if not identity:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return identity.endswith(pattern[1:])
    return identity == pattern


def _networks_match(networks: Sequence[Mapping[str, Any]], ip: str | None,
                    base: str, found: list[str]) -> Tri:
    if not ip:
        return None
    for i, net in enumerate(networks):
        if _ip_in(str(net.get("cidr")), ip) and not any(
                _ip_in(str(e), ip) for e in net.get("except") or []):
            found.append(f"{base}[{i}]")
            return True
    return False


class _Authz:
    """Evaluates authorizations against one request."""

    def __init__(self, policies: LinkerdPolicies, req: LinkerdRequest) -> None:
        self.p = policies
        self.req = req

    def sa_identity(self, name: str, ns: str) -> str:
        return f"{name}.{ns}.serviceaccount.identity.linkerd.{self.p.identity_domain}"

    def mesh_tls(self, authn: Mapping[str, Any], found: list[str]) -> Tri:
        spec = authn.get("spec") or {}
        ident = self.req.client_identity
        if ident is None:
            return False
        ns = self.p.ns(authn)
        for i, pattern in enumerate(spec.get("identities") or []):
            if _identity_matches(str(pattern), ident):
                found.append(f"identities[{i}]")
                return True
        for i, ref in enumerate(spec.get("identityRefs") or []):
            kind = ref.get("kind")
            if kind == "ServiceAccount":
                name = ref.get("name")
                if name == "*" or ident == self.sa_identity(str(name),
                                                            str(ref.get("namespace") or ns)):
                    found.append(f"identityRefs[{i}]")
                    return True
            elif kind == "Namespace" and ident.split(".")[1:2] == [str(ref.get("name"))]:
                found.append(f"identityRefs[{i}]")
                return True
        return False

    def authorization_policy(self, policy: Mapping[str, Any],
                             hits: dict[str, set[str]]) -> Tri:
        ns = self.p.ns(policy)
        refs = (policy.get("spec") or {}).get("requiredAuthenticationRefs") or []
        outcomes: list[Tri] = []
        used: dict[str, list[str]] = {}
        for ref in refs:
            kind = str(ref.get("kind"))
            ref_ns = str(ref.get("namespace") or ns)
            name = str(ref.get("name"))
            found: list[str] = []
            if kind == "ServiceAccount":
                outcomes.append(self.req.client_identity == self.sa_identity(name, ref_ns))
                continue
            target = self.p.get(kind, ref_ns, name)
            if target is None:
                return False  # a missing authentication: the authorization is ignored
            if kind == "MeshTLSAuthentication":
                outcomes.append(self.mesh_tls(target, found))
            elif kind == "NetworkAuthentication":
                outcomes.append(_networks_match((target.get("spec") or {}).get("networks") or [],
                                                self.req.client_ip, "networks", found))
            else:
                return False
            used[f"{kind} {ref_ns}/{name}"] = found
        result = _and(outcomes)
        if result is True:
            for k, parts in used.items():
                hits.setdefault(k, set()).update(["", *parts])
        return result

    def server_authorization(self, authz: Mapping[str, Any], found: list[str]) -> Tri:
        client = (authz.get("spec") or {}).get("client") or {}
        networks = client.get("networks")
        net_ok: Tri = True
        if networks:
            net_ok = _networks_match(networks, self.req.client_ip, "client.networks", found)
        if client.get("unauthenticated"):
            return net_ok
        mesh = client.get("meshTLS") or {}
        ident = self.req.client_identity
        if mesh.get("unauthenticatedTLS"):
            return _and([net_ok, None if ident is None else True])
        if ident is None:
            return False
        ns = self.p.ns(authz)
        for i, pattern in enumerate(mesh.get("identities") or []):
            if _identity_matches(str(pattern), ident):
                found.append(f"client.meshTLS.identities[{i}]")
                return net_ok
        for i, sa in enumerate(mesh.get("serviceAccounts") or []):
            if ident == self.sa_identity(str(sa.get("name")), str(sa.get("namespace") or ns)):
                found.append(f"client.meshTLS.serviceAccounts[{i}]")
                return net_ok
        return False

    def default(self, policy: str) -> Tri:
        req = self.req
        in_cluster: Tri = (None if not req.client_ip else
                           any(_ip_in(n, req.client_ip) for n in self.p.cluster_networks))
        if policy in ("all-unauthenticated", "audit"):
            return True
        if policy == "all-authenticated":
            return req.client_identity is not None
        if policy == "cluster-authenticated":
            return _and([req.client_identity is not None, in_cluster])
        if policy == "cluster-unauthenticated":
            return in_cluster
        return False


def evaluate_linkerd(policies: LinkerdPolicies, req: LinkerdRequest) -> LinkerdDecision:
    """Would the pod's Linkerd proxy accept ``req`` under ``policies``?"""
    authz = _Authz(policies, req)
    default = req.default_policy or policies.cluster_default
    if default not in DEFAULT_POLICIES:
        return LinkerdDecision(UNKNOWN, f"unknown default inbound policy {default!r}")
    servers = policies.servers_for(req)
    if not servers:
        if req.is_probe:
            return LinkerdDecision(ALLOW, "kubelet probe: default probe authorization",
                                   route="probe", authorization="default:probe")
        return _by_default(authz, default, f"no Server selects port {req.port}: default "
                           f"policy {default}", None)
    server = servers[0]
    server_key = key(server, policies.default_namespace)
    server_ns, server_name = _meta(server, policies.default_namespace)
    hits: dict[str, set[str]] = {server_key: {""}}
    # Routing (see the notes above select_route)
    route_key: str | None = None
    route_obj: Mapping[str, Any] | None = None
    proxy_protocol = str((server.get("spec") or {}).get("proxyProtocol") or "unknown")
    if req.http and proxy_protocol not in ("opaque", "TLS"):
        routes = policies.routes_for(server) if proxy_protocol != "gRPC" else []
        if routes:
            ok, route_obj, parts = select_route(routes, req)
            if ok is False or route_obj is None:
                return LinkerdDecision(DENY, f"no HTTPRoute of Server {server_ns}/{server_name} "
                                       "matches the request (404)", server=server_key,
                                       hits={})
            route_key = key(route_obj, policies.default_namespace)
            if ok is None:
                return LinkerdDecision(UNKNOWN, f"HTTPRoute {route_key} or another may take "
                                       "the request: header, query or host matches are not in "
                                       "the evidence", server=server_key)
            hits[route_key] = {"", *parts}
        else:
            route_key = "default"
            if req.is_probe and proxy_protocol != "gRPC":
                return LinkerdDecision(ALLOW, "kubelet probe: default probe authorization "
                                       "(the Server has no HTTPRoute)", server=server_key,
                                       route="probe", authorization="default:probe", hits=hits)
    # Authorizations
    unknown: str | None = None
    candidates: list[tuple[str, Mapping[str, Any]]] = []
    for policy in policies.by_kind.get("AuthorizationPolicy", []):
        if policies.ns(policy) != server_ns:
            continue
        ref = (policy.get("spec") or {}).get("targetRef") or {}
        kind, name = ref.get("kind"), ref.get("name")
        if ((kind == "Server" and name == server_name)
                or (kind == "Namespace" and name == server_ns)
                or (kind == "HTTPRoute" and route_obj is not None
                    and _targets_route(ref, route_obj, policies.default_namespace))):
            candidates.append(("AuthorizationPolicy", policy))
    for sa in policies.by_kind.get("ServerAuthorization", []):
        if policies.ns(sa) != server_ns:
            continue
        ref = (sa.get("spec") or {}).get("server") or {}
        if ref.get("name") == server_name or ("selector" in ref and selector_matches(
                ref.get("selector"), (server.get("metadata") or {}).get("labels") or {})):
            candidates.append(("ServerAuthorization", sa))
    allowed_by: str | None = None
    for kind, obj in sorted(candidates, key=lambda c: key(c[1], policies.default_namespace)):
        okey = key(obj, policies.default_namespace)
        found: list[str] = []
        mine: dict[str, set[str]] = {}
        if kind == "AuthorizationPolicy":
            result = authz.authorization_policy(obj, mine)
        else:
            result = authz.server_authorization(obj, found)
        if result is True:
            hits.setdefault(okey, set()).update(["", *found])
            for k, v in mine.items():
                hits.setdefault(k, set()).update(v)
            allowed_by = allowed_by or okey
        elif result is None and unknown is None:
            unknown = f"{okey} may authorize it: the client address is not known"
    if allowed_by:
        return LinkerdDecision(ALLOW, f"authorized by {allowed_by}", server=server_key,
                               route=route_key, authorization=allowed_by, hits=hits)
    if unknown:
        return LinkerdDecision(UNKNOWN, unknown, server=server_key, route=route_key)
    access = str((server.get("spec") or {}).get("accessPolicy") or "deny")
    where = f"route {route_key}" if route_key and route_key != "default" else "the Server"
    return _by_default(authz, access, f"no authorization on {where} of Server "
                       f"{server_ns}/{server_name} admits the client; accessPolicy {access}",
                       server_key, route_key, hits)


def _targets_route(ref: Mapping[str, Any], route: Mapping[str, Any], default_ns: str) -> bool:
    """An AuthorizationPolicy ``targetRef`` names this route: group, kind and name compared
    case-insensitively (policy-controller k8s/index/src/inbound/authorization_policy.rs:66-76
    and index.rs:1944-1948)."""
    group = str(route.get("apiVersion", "")).split("/", 1)[0]
    name = _meta(route, default_ns)[1]
    return (str(ref.get("group") or "").lower() == group.lower()
            and str(ref.get("name") or "").lower() == name.lower())


def _by_default(authz: _Authz, policy: str, why: str, server: str | None,
                route: str | None = None, hits: dict[str, set[str]] | None = None
                ) -> LinkerdDecision:
    result = authz.default(policy)
    label = f"default:{policy}"
    if result is True:
        return LinkerdDecision(ALLOW, why, server=server, route=route, authorization=label,
                               audit=policy == "audit", hits=hits or {})
    if result is None:
        return LinkerdDecision(UNKNOWN, why + " (the client address is not known)",
                               server=server, route=route)
    return LinkerdDecision(DENY, why, server=server, route=route)


def object_parts(policies: LinkerdPolicies, obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Grantable parts of a Linkerd object as (part, description): ``''`` is the object."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    out: list[tuple[str, str]] = []
    if kind == "Server":
        out.append(("", f"Server port {spec.get('port')} of pods "
                        f"[{_sel(spec.get('podSelector'))}] (accessPolicy "
                        f"{spec.get('accessPolicy') or 'deny'})"))
    elif kind == "HTTPRoute":
        out.append(("", "HTTPRoute"))
        for i, rule in enumerate(spec.get("rules") or []):
            for j, m in enumerate(rule.get("matches") or []):
                p = m.get("path") or {}
                out.append((f"rules[{i}].matches[{j}]",
                            f"{m.get('method') or 'any method'} {p.get('type') or 'PathPrefix'} "
                            f"{p.get('value') or '/'}"))
    elif kind == "AuthorizationPolicy":
        ref = spec.get("targetRef") or {}
        needs = ", ".join(f"{r.get('kind')} {r.get('name')}"
                          for r in spec.get("requiredAuthenticationRefs") or [])
        out.append(("", f"authorizes {needs or 'anyone'} on {ref.get('kind')} "
                        f"{ref.get('name')}"))
    elif kind == "ServerAuthorization":
        out.append(("", f"authorizes {spec.get('client')} on Server {spec.get('server')}"))
        client = spec.get("client") or {}
        for i, ident in enumerate((client.get("meshTLS") or {}).get("identities") or []):
            out.append((f"client.meshTLS.identities[{i}]", f"identity {ident}"))
        for i, sa in enumerate((client.get("meshTLS") or {}).get("serviceAccounts") or []):
            out.append((f"client.meshTLS.serviceAccounts[{i}]", f"service account {sa}"))
        for i, net in enumerate(client.get("networks") or []):
            out.append((f"client.networks[{i}]", f"network {net.get('cidr')}"))
    elif kind == "MeshTLSAuthentication":
        out.append(("", "MeshTLSAuthentication"))
        for i, ident in enumerate(spec.get("identities") or []):
            out.append((f"identities[{i}]", f"identity {ident}"))
        for i, ref in enumerate(spec.get("identityRefs") or []):
            out.append((f"identityRefs[{i}]", f"{ref.get('kind')} {ref.get('name')}"))
    elif kind == "NetworkAuthentication":
        out.append(("", "NetworkAuthentication"))
        for i, net in enumerate(spec.get("networks") or []):
            extra = f" except {net.get('except')}" if net.get("except") else ""
            out.append((f"networks[{i}]", f"network {net.get('cidr')}{extra}"))
    return out


def _sel(sel: Mapping[str, Any] | None) -> str:
    if not sel:
        return "all"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    parts += [f"{e.get('key')} {e.get('operator')} {e.get('values') or ''}".strip()
              for e in sel.get("matchExpressions") or []]
    return ",".join(parts) or "all"
