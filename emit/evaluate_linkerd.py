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
2. With a Server, HTTP requests are routed: when HTTPRoutes name the Server as a parent, the
   request takes the one route that matches with the highest Gateway API precedence (exact path,
   then the longest prefix, then a method match, then more header/query matches; ties by name),
   and a request no route matches is rejected (404). Without routes every request is on the
   default route and the probe route still authorizes probes.
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


def _path_matches(match: Mapping[str, Any], path: str) -> tuple[Tri, int, bool]:
    """(matches, prefix length, exact) for one HTTPRoute match's path."""
    spec = match.get("path") or {}
    kind = spec.get("type") or "PathPrefix"
    value = str(spec.get("value") or "/")
    if kind == "Exact":
        return path == value, len(value), True
    if kind == "PathPrefix":
        prefix = value.rstrip("/")
        ok = prefix == "" or path == prefix or path.startswith(prefix + "/")
        return ok, len(value), False
    if kind == "RegularExpression":
        try:
            return re.fullmatch(value, path) is not None, 0, False
        except re.error:
            return None, 0, False
    return None, 0, False


def _match(match: Mapping[str, Any], req: LinkerdRequest) -> tuple[Tri, tuple[int, ...]]:
    path = (req.path or "/").split("?", 1)[0]
    ok, length, exact = _path_matches(match, path)
    checks: list[Tri] = [ok]
    method = match.get("method")
    if method:
        checks.append(str(method).upper() == (req.method or "").upper())
    extra = len(match.get("headers") or []) + len(match.get("queryParams") or [])
    if extra:
        checks.append(None)  # headers and query parameters are not in the access log
    rank = (int(exact), length, int(bool(method)), len(match.get("headers") or []),
            len(match.get("queryParams") or []))
    return _and(checks), rank


def _route_rank(route: Mapping[str, Any], req: LinkerdRequest
                ) -> tuple[Tri, tuple[int, ...], str]:
    """Best match of a route: (matches, precedence, ``rules[i].matches[j]``)."""
    best: tuple[Tri, tuple[int, ...], str] = (False, (), "")
    for i, rule in enumerate((route.get("spec") or {}).get("rules") or [{}]):
        matches = rule.get("matches") or [{}]
        for j, m in enumerate(matches):
            ok, rank = _match(m, req)
            where = f"rules[{i}].matches[{j}]" if rule.get("matches") else f"rules[{i}]"
            if ok is True and (best[0] is not True or rank > best[1]):
                best = (True, rank, where)
            elif ok is None and best[0] is False:
                best = (None, rank, where)
    return best


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
    # Routing
    route_key: str | None = None
    route_obj: Mapping[str, Any] | None = None
    if req.http:
        routes = policies.routes_for(server)
        if routes:
            ranked = []
            for route in routes:
                ok, rank, where = _route_rank(route, req)
                if ok is not False:
                    rkey = key(route, policies.default_namespace)
                    ranked.append((ok is True, rank, rkey, route, where))
            if not ranked:
                return LinkerdDecision(DENY, f"no HTTPRoute of Server {server_ns}/{server_name} "
                                       "matches the request (404)", server=server_key,
                                       hits={})
            ranked.sort(key=lambda r: (not r[0], [-x for x in r[1]], r[2]))
            certain, _, route_key, route_obj, where = ranked[0]
            if not certain:
                return LinkerdDecision(UNKNOWN, f"HTTPRoute {route_key} may match: header or "
                                       "query matches are not in the evidence",
                                       server=server_key)
            hits[route_key] = {"", where}
        else:
            route_key = "default"
            if req.is_probe:
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
        route_name = _meta(route_obj, policies.default_namespace)[1] if route_obj else None
        if ((kind == "Server" and name == server_name)
                or (kind == "Namespace" and name == server_ns)
                or (kind == "HTTPRoute" and route_name is not None and name == route_name)):
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
