"""Decide what a set of Istio policies does to one request, the way a sidecar would.

Used to replay recorded traffic against proposed (or existing) policies: every observed
request must be allowed, and requests never observed must be denied. The semantics follow
Istio's reference for ``security.istio.io/v1``:

* https://istio.io/latest/docs/reference/config/security/authorization-policy/
* https://istio.io/latest/docs/reference/config/security/conditions/
* https://istio.io/latest/docs/reference/config/security/peer_authentication/
* https://istio.io/latest/docs/concepts/security/#authorization-policies (evaluation order)
* https://istio.io/latest/docs/tasks/security/authorization/authz-tcp/ (HTTP fields on TCP)

What is modelled:

* PeerAuthentication first: the effective mTLS mode for the workload port is port-level
  (``portLevelMtls``) over workload-level (``selector``) over namespace-level over the root
  namespace (mesh-wide); ``UNSET`` inherits; default PERMISSIVE. STRICT rejects plaintext before
  authorization.
* AuthorizationPolicy applicability: a policy applies when it is in the workload's namespace
  (or in the root namespace: mesh-wide) and its ``selector.matchLabels`` are a subset of the
  pod's labels (or it has no selector). With ``targetRef``/``targetRefs`` the selector is not
  used: a ``Gateway`` (gateway.networking.k8s.io) target applies to that gateway's pods (label
  ``gateway.networking.k8s.io/gateway-name``) in the policy's namespace; ``Service`` and
  ``ServiceEntry`` targets are enforced by a waypoint, which a sidecar replay cannot see, and
  ``GatewayClass`` targets need the gateway's class: a policy of those kinds that could concern
  the request makes it *unknown*. Policies annotated ``istio.io/dry-run: "true"`` are logged by
  the proxy, never enforced, and are ignored here.
* Order: CUSTOM, then DENY, then ALLOW. A matching CUSTOM rule hands the request to an external
  authorizer this replay cannot consult: unless DENY/ALLOW deny it anyway, the verdict is
  *unknown*. Any matching DENY rule denies. With no ALLOW policy the request is allowed;
  otherwise some ALLOW rule must match. An ALLOW policy without rules (``spec: {}``) matches
  nothing (allow-nothing); a rule ``{}`` matches everything. AUDIT policies do not decide.
* A rule matches when any ``from`` source and any ``to`` operation match (absent = any) and every
  ``when`` condition holds; fields within a source/operation are ANDed (``serviceAccounts`` is
  not evaluated: unknown). ``principals``,
  ``namespaces``, ``trustDomains`` need an mTLS peer identity; ``ipBlocks`` match the peer
  address, ``remoteIpBlocks`` the original client address (the peer address when the request
  carried none). Every field has its ``not`` form. String matches are exact, ``prefix*``,
  ``*suffix`` or ``*`` (presence); hosts compare case-insensitively, with or without the port.
  Paths compare with the URL path without its query string, and support the ``{*}`` (one
  segment) and ``{**}`` (the rest) templates.
* ``when`` conditions on ``source.ip``, ``remote.ip``, ``source.namespace``,
  ``source.principal``, ``destination.ip``, ``destination.port`` are evaluated; every other key
  (request headers, JWT claims, SNI, ...) cannot be evaluated from recorded traffic: the rule's
  outcome is *unknown* rather than guessed. ``requestPrincipals`` likewise (JWTs are not
  recorded).
* For TCP traffic, HTTP-only fields (hosts, methods, paths, requestPrincipals, their ``not``
  forms, and ``when`` keys on ``request.*``) cannot apply: an ALLOW rule containing them never
  matches (so the connection is denied), a DENY rule is applied with those fields ignored.

Not modelled: the trust-domain aliases of ``meshConfig.trustDomainAliases``, path normalisation
options, ambient ztunnel (L4 only) enforcement.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

HTTP_ONLY_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
HTTP_ONLY_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")
#: The label Gateway API deployments put on a gateway's pods.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
ISTIO_GROUP = "security.istio.io"

#: Three-valued logic: True (matches), False (does not), None (cannot be evaluated).
Tri = bool | None

ALLOW, DENY, UNKNOWN = "allow", "deny", "unknown"


@dataclass(frozen=True)
class Request:
    """One request (or TCP connection) arriving at a workload."""

    namespace: str
    """Destination workload's namespace."""
    labels: Mapping[str, str]
    """Destination pod labels."""
    port: int
    """Destination workload port (targetPort)."""
    protocol: str = "http"
    """``http``, ``grpc`` or ``tcp``."""
    method: str | None = None
    path: str | None = None
    host: str | None = None
    source_principal: str | None = None
    """Peer SPIFFE principal without scheme; None when the connection carried no mTLS identity."""
    source_ip: str | None = None
    remote_ip: str | None = None
    """Original client address (X-Forwarded-For / PROXY protocol); None: the peer address."""
    destination_ip: str | None = None
    services: tuple[str, ...] = ()
    """Names of the Services (in ``namespace``) selecting the destination pod."""

    @property
    def source_namespace(self) -> str | None:
        if not self.source_principal:
            return None
        parts = self.source_principal.split("/")
        return parts[parts.index("ns") + 1] if "ns" in parts[:-1] else None

    @property
    def trust_domain(self) -> str | None:
        if not self.source_principal:
            return None
        return self.source_principal.split("/", 1)[0]


@dataclass(frozen=True)
class Decision:
    """The verdict for one request. ``allowed`` is True only for a definite allow."""

    allowed: bool
    reason: str
    verdict: str = ""
    """``allow`` | ``deny`` | ``unknown`` (derived from ``allowed`` when not given)."""
    policy: str | None = None
    """``<namespace>/<name>`` of the policy that decided, if one did."""
    rule: int | None = None
    """Index of the deciding rule in that policy."""

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", ALLOW if self.allowed else DENY)


@dataclass
class Evaluation:
    """A decision plus the ALLOW permissions the request exercised (for over-permission)."""

    decision: Decision
    hits: dict[str, set[str]] = field(default_factory=dict)
    """``<namespace>/<name>`` -> paths of the parts of that ALLOW policy that matched, like
    ``rules[0]``, ``rules[0].from[1]``, ``rules[0].from[1].source.principals[0]``."""
    mtls_mode: str = "PERMISSIVE"
    """Effective PeerAuthentication mode for the destination port."""


# -- matching helpers -----------------------------------------------------------------------


def _and(values: Iterable[Tri]) -> Tri:
    unknown = False
    for v in values:
        if v is False:
            return False
        if v is None:
            unknown = True
    return None if unknown else True


def _or(values: Iterable[Tri]) -> Tri:
    unknown = False
    for v in values:
        if v is True:
            return True
        if v is None:
            unknown = True
    return None if unknown else False


def _not(value: Tri) -> Tri:
    return None if value is None else not value


def _string_match(pattern: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _host_match(pattern: str, value: str | None) -> bool:
    if not value:
        return False
    pattern, value = pattern.lower(), value.lower()
    if _string_match(pattern, value):
        return True
    bare = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return bare != value and _string_match(pattern, bare)


@lru_cache(maxsize=4096)
def _template_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\*\*\}|\{\*\})", pattern)
    out = []
    for part in parts:
        if part == "{**}":
            out.append(r"[^?#]+")
        elif part == "{*}":
            out.append(r"[^/?#]+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z")


def _path_match(pattern: str, path: str | None) -> bool:
    if path is None:
        return False
    path = path.split("?", 1)[0]
    if "{*" in pattern:
        return _template_regex(pattern).match(path) is not None
    return _string_match(pattern, path)


@lru_cache(maxsize=4096)
def _network(block: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(block, strict=False)
    except ValueError:
        return None


def _ip_in(block: str, ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    network = _network(str(block))
    return network is not None and address.version == network.version and address in network


def _ip_match(blocks: Iterable[str], ip: str | None) -> bool:
    return any(_ip_in(b, ip) for b in blocks)


def _port_match(pattern: Any, port: int) -> bool:
    return str(pattern) == str(port)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else ([] if value is None else [value])


# -- sources, operations, conditions --------------------------------------------------------

_Matcher = Callable[[Any, Any], bool]


def _field(spec: Mapping[str, Any], key: str, value: Any, match: _Matcher, base: str,
           hits: list[str], *, needs_value: bool = False) -> Tri:
    """``key`` present in ``spec``: does ``value`` match any pattern (recording which)?"""
    if key not in spec:
        return True
    if needs_value and value is None:
        return None
    matched = False
    for index, pattern in enumerate(_list(spec[key])):
        if match(pattern, value):
            matched = True
            hits.append(f"{base}.{key}[{index}]")
    return matched


def _not_field(spec: Mapping[str, Any], key: str, value: Any, match: _Matcher,
               *, needs_value: bool = False) -> Tri:
    if key not in spec:
        return True
    if needs_value and value is None:
        return None
    return not any(match(p, value) for p in _list(spec[key]))


def _source_matches(source: Mapping[str, Any], req: Request, base: str,
                    hits: list[str]) -> Tri:
    remote = req.remote_ip or req.source_ip
    checks: list[Tri] = [
        _field(source, "principals", req.source_principal, _string_match, base, hits),
        _not_field(source, "notPrincipals", req.source_principal, _string_match),
        _field(source, "namespaces", req.source_namespace, _string_match, base, hits),
        _not_field(source, "notNamespaces", req.source_namespace, _string_match),
        _field(source, "trustDomains", req.trust_domain, _string_match, base, hits),
        _not_field(source, "notTrustDomains", req.trust_domain, _string_match),
        _field(source, "ipBlocks", req.source_ip, _ip_in, base, hits),
        _not_field(source, "notIpBlocks", req.source_ip, _ip_in),
        _field(source, "remoteIpBlocks", remote, _ip_in, base, hits),
        _not_field(source, "notRemoteIpBlocks", remote, _ip_in),
    ]
    if "requestPrincipals" in source or "notRequestPrincipals" in source:
        checks.append(None)  # JWTs are not recorded
    if "serviceAccounts" in source or "notServiceAccounts" in source:
        checks.append(None)  # newer field, semantics not pinned by the CRD in use: not guessed
    return _and(checks)


def _operation_matches(op: Mapping[str, Any], req: Request, base: str,
                       hits: list[str]) -> Tri:
    checks: list[Tri] = [
        _field(op, "ports", req.port, _port_match, base, hits),
        _not_field(op, "notPorts", req.port, _port_match),
        _field(op, "methods", req.method, _string_match, base, hits),
        _not_field(op, "notMethods", req.method, _string_match),
        _field(op, "paths", req.path, _path_match, base, hits),
        _not_field(op, "notPaths", req.path, _path_match),
        _field(op, "hosts", req.host, _host_match, base, hits),
        _not_field(op, "notHosts", req.host, _host_match),
    ]
    return _and(checks)


#: ``when`` keys evaluated from recorded traffic: key -> (value, matcher).
def _condition_value(key: str, req: Request) -> tuple[Any, _Matcher] | None:
    if key == "source.ip":
        return req.source_ip, _ip_in
    if key == "remote.ip":
        return req.remote_ip or req.source_ip, _ip_in
    if key == "source.namespace":
        return req.source_namespace, _string_match
    if key == "source.principal":
        return req.source_principal, _string_match
    if key == "destination.ip":
        return req.destination_ip, _ip_in
    if key == "destination.port":
        return req.port, _port_match
    return None


def _condition_matches(cond: Mapping[str, Any], req: Request) -> Tri:
    key = str(cond.get("key", ""))
    found = _condition_value(key, req)
    if found is None:
        return None
    value, match = found
    if key in ("source.ip", "remote.ip", "destination.ip") and value is None:
        return None
    checks: list[Tri] = []
    if "values" in cond:
        checks.append(any(match(p, value) for p in _list(cond["values"])))
    if "notValues" in cond:
        checks.append(not any(match(p, value) for p in _list(cond["notValues"])))
    return _and(checks)


def _http_only_condition(cond: Mapping[str, Any]) -> bool:
    return str(cond.get("key", "")).startswith("request.")


def _has_http_fields(rule: Mapping[str, Any]) -> bool:
    for to in rule.get("to") or []:
        if any(k in (to.get("operation") or {}) for k in HTTP_ONLY_FIELDS):
            return True
    for frm in rule.get("from") or []:
        if any(k in (frm.get("source") or {}) for k in HTTP_ONLY_SOURCE_FIELDS):
            return True
    return any(_http_only_condition(c) for c in rule.get("when") or [])


def _strip_http(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A DENY rule as it applies to TCP: HTTP-only fields dropped."""
    out = dict(rule)
    if rule.get("to"):
        out["to"] = [
            {"operation": {k: v for k, v in (t.get("operation") or {}).items()
                           if k not in HTTP_ONLY_FIELDS}}
            for t in rule.get("to") or []
        ]
    if rule.get("from"):
        out["from"] = [
            {"source": {k: v for k, v in (f.get("source") or {}).items()
                        if k not in HTTP_ONLY_SOURCE_FIELDS}}
            for f in rule.get("from") or []
        ]
    if rule.get("when"):
        out["when"] = [c for c in rule["when"] if not _http_only_condition(c)]
    return out


def _rule_matches(rule: Mapping[str, Any], req: Request, base: str = "rules[0]",
                  hits: list[str] | None = None) -> Tri:
    found: list[str] = []
    sources = rule.get("from")
    source_ok: Tri = True
    if sources:
        outcomes = []
        for j, s in enumerate(sources):
            mine: list[str] = []
            outcome = _source_matches(s.get("source") or {}, req, f"{base}.from[{j}].source",
                                      mine)
            if outcome is True:
                found.append(f"{base}.from[{j}]")
                found.extend(mine)
            outcomes.append(outcome)
        source_ok = _or(outcomes)
    ops = rule.get("to")
    op_ok: Tri = True
    if ops:
        outcomes = []
        for k, o in enumerate(ops):
            mine = []
            outcome = _operation_matches(o.get("operation") or {}, req,
                                         f"{base}.to[{k}].operation", mine)
            if outcome is True:
                found.append(f"{base}.to[{k}]")
                found.extend(mine)
            outcomes.append(outcome)
        op_ok = _or(outcomes)
    when_ok = _and(_condition_matches(c, req) for c in rule.get("when") or [])
    result = _and([source_ok, op_ok, when_ok])
    if result is True and hits is not None:
        hits.append(base)
        hits.extend(found)
    return result


# -- applicability --------------------------------------------------------------------------


def _selector_applies(obj: Mapping[str, Any], req: Request) -> bool:
    selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels")
    return not selector or all(req.labels.get(k) == v for k, v in selector.items())


def _target_refs(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refs = list(spec.get("targetRefs") or [])
    if spec.get("targetRef"):
        refs.append(spec["targetRef"])
    return refs


def _applies(obj: Mapping[str, Any], req: Request, root_namespace: str) -> Tri:
    """Does the policy concern the request's workload (None: enforced where we can't see)?"""
    ns = (obj.get("metadata") or {}).get("namespace")
    spec = obj.get("spec") or {}
    refs = _target_refs(spec)
    if refs:
        outcomes: list[Tri] = []
        for ref in refs:
            kind = ref.get("kind")
            name = ref.get("name")
            if kind == "Gateway":
                outcomes.append(ns == req.namespace and req.labels.get(GATEWAY_NAME_LABEL) == name)
            elif kind in ("Service", "ServiceEntry"):
                outcomes.append(None if ns == req.namespace and name in req.services else False)
            elif kind == "GatewayClass":
                outcomes.append(None if GATEWAY_NAME_LABEL in req.labels else False)
            else:
                outcomes.append(False)
        return _or(outcomes)
    if ns == root_namespace and ns != req.namespace:
        return _selector_applies(obj, req)
    if ns != req.namespace:
        return False
    return _selector_applies(obj, req)


def _dry_run(obj: Mapping[str, Any]) -> bool:
    """Dry-run policies are logged by the proxy, never enforced."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get("istio.io/dry-run", "")).lower() == "true"


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def is_istio(obj: Mapping[str, Any]) -> bool:
    """An Istio security object (AuthorizationPolicy / PeerAuthentication)?"""
    return str(obj.get("apiVersion", "")).startswith(ISTIO_GROUP + "/") and obj.get("kind") in (
        "AuthorizationPolicy", "PeerAuthentication")


def mtls_mode(manifests: Iterable[Mapping[str, Any]], req: Request,
              root_namespace: str = "istio-system") -> str:
    """Effective PeerAuthentication mode for the request's workload port."""
    ranks: list[tuple[int, str]] = []
    for obj in manifests:
        if obj.get("kind") != "PeerAuthentication":
            continue
        if _applies(obj, req, root_namespace) is not True:
            continue
        spec = obj.get("spec") or {}
        ns = (obj.get("metadata") or {}).get("namespace")
        has_selector = bool((spec.get("selector") or {}).get("matchLabels"))
        level = 2 if has_selector else (1 if ns == req.namespace else 0)
        port_modes = spec.get("portLevelMtls") or {}
        port_mode = (port_modes.get(str(req.port)) or port_modes.get(req.port) or {}).get("mode")
        if has_selector and port_mode and port_mode != "UNSET":
            ranks.append((3, port_mode))
        mode = (spec.get("mtls") or {}).get("mode")
        if mode and mode != "UNSET":
            ranks.append((level, mode))
    return max(ranks)[1] if ranks else "PERMISSIVE"


# -- the decision ---------------------------------------------------------------------------


def evaluate(manifests: Sequence[Mapping[str, Any]], req: Request,
             root_namespace: str = "istio-system") -> Decision:
    """Would the destination sidecar let ``req`` through under ``manifests``?"""
    return evaluate_detail(manifests, req, root_namespace).decision


def evaluate_detail(manifests: Sequence[Mapping[str, Any]], req: Request,
                    root_namespace: str = "istio-system") -> Evaluation:
    """The decision and, when not denied, every ALLOW rule part the request matched."""
    mode = mtls_mode(manifests, req, root_namespace)
    if mode == "STRICT" and req.source_principal is None:
        return Evaluation(Decision(False, "plaintext rejected: PeerAuthentication STRICT"),
                          mtls_mode=mode)
    tcp = req.protocol == "tcp"
    applicable: list[tuple[Mapping[str, Any], Tri]] = []
    for m in manifests:
        if m.get("kind") != "AuthorizationPolicy" or _dry_run(m):
            continue
        applies = _applies(m, req, root_namespace)
        if applies is not False:
            applicable.append((m, applies))

    def action(p: Mapping[str, Any]) -> str:
        return str((p.get("spec") or {}).get("action") or "ALLOW")

    # CUSTOM: an external authorizer decides when its rules match.
    custom: str | None = None
    for policy, applies in applicable:
        if action(policy) != "CUSTOM":
            continue
        spec = policy.get("spec") or {}
        outcome = _or(_rule_matches(_strip_http(r) if tcp else r, req)
                      for r in spec.get("rules") or [])
        if _and([applies, outcome]) is not False:
            provider = (spec.get("provider") or {}).get("name", "?")
            custom = custom or f"CUSTOM policy {_name(policy)} (provider {provider}) decides"
    # DENY
    deny_unknown: str | None = None
    for policy, applies in applicable:
        if action(policy) != "DENY":
            continue
        for index, rule in enumerate((policy.get("spec") or {}).get("rules") or []):
            outcome = _and([applies, _rule_matches(_strip_http(rule) if tcp else rule, req)])
            if outcome is True:
                return Evaluation(Decision(False, f"denied by {_name(policy)} rule {index}",
                                           policy=_name(policy), rule=index), mtls_mode=mode)
            if outcome is None and deny_unknown is None:
                deny_unknown = (f"DENY {_name(policy)} rule {index} may match: "
                                + _why_unknown(rule, applies))
    # ALLOW
    allow = [(p, a) for p, a in applicable if action(p) == "ALLOW"]
    hits: dict[str, set[str]] = {}
    allowed_by: tuple[str, int] | None = None
    allow_unknown: str | None = None
    for policy, applies in allow:
        for index, rule in enumerate((policy.get("spec") or {}).get("rules") or []):
            if tcp and _has_http_fields(rule):
                continue
            found: list[str] = []
            outcome = _and([applies, _rule_matches(rule, req, f"rules[{index}]", found)])
            if outcome is True:
                hits.setdefault(_name(policy), set()).update(found)
                allowed_by = allowed_by or (_name(policy), index)
            elif outcome is None and allow_unknown is None:
                allow_unknown = (f"ALLOW {_name(policy)} rule {index} may match: "
                                 + _why_unknown(rule, applies))
    if deny_unknown:
        decision = Decision(False, deny_unknown, UNKNOWN)
    elif allowed_by is not None:
        decision = Decision(True, f"allowed by {allowed_by[0]} rule {allowed_by[1]}",
                            policy=allowed_by[0], rule=allowed_by[1])
    elif allow_unknown:
        decision = Decision(False, allow_unknown, UNKNOWN)
    elif any(a is None for _, a in allow) and not any(a is True for _, a in allow):
        name = next(_name(p) for p, a in allow if a is None)
        decision = Decision(False, f"ALLOW {name} may apply: " + _why_unknown({}, None),
                            UNKNOWN)
    elif not any(a is True for _, a in allow):
        decision = Decision(True, "no ALLOW policy applies")
    else:
        decision = Decision(False, "no ALLOW rule matches")
    if decision.verdict == ALLOW and custom:
        decision = Decision(False, custom, UNKNOWN)
    return Evaluation(decision, hits if decision.verdict != DENY else {}, mtls_mode=mode)


def _why_unknown(rule: Mapping[str, Any], applies: Tri) -> str:
    if applies is None:
        return "the policy targets a Service/ServiceEntry/GatewayClass (enforced by a waypoint " \
               "or gateway class this replay cannot see)"
    keys = sorted({str(c.get("key")) for c in rule.get("when") or []
                   if _condition_value(str(c.get("key", "")), Request("", {}, 0)) is None})
    parts = []
    if keys:
        parts.append("`when` on " + ", ".join(keys) + " is not in recorded traffic")
    if any("requestPrincipals" in (f.get("source") or {}) or
           "notRequestPrincipals" in (f.get("source") or {}) for f in rule.get("from") or []):
        parts.append("requestPrincipals (JWT) are not in recorded traffic")
    return "; ".join(parts) or "a field could not be evaluated (peer address or host missing)"


# -- over-permission ------------------------------------------------------------------------


def allow_parts(policy: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every grantable part of an ALLOW policy, as (path, description), outermost first.

    The paths are those :func:`evaluate_detail` reports in ``hits``; a part not hit by any
    observed request is a permission nobody used.
    """
    out: list[tuple[str, str]] = []
    for i, rule in enumerate((policy.get("spec") or {}).get("rules") or []):
        base = f"rules[{i}]"
        out.append((base, _describe_rule(rule)))
        for j, frm in enumerate(rule.get("from") or []):
            source = frm.get("source") or {}
            out.append((f"{base}.from[{j}]", "source " + _describe(source)))
            for key in ("principals", "namespaces", "trustDomains", "ipBlocks",
                        "remoteIpBlocks"):
                for k, value in enumerate(_list(source.get(key))):
                    out.append((f"{base}.from[{j}].source.{key}[{k}]", f"{key} {value}"))
        for j, to in enumerate(rule.get("to") or []):
            op = to.get("operation") or {}
            out.append((f"{base}.to[{j}]", "operation " + _describe(op)))
            for key in ("ports", "methods", "paths", "hosts"):
                for k, value in enumerate(_list(op.get(key))):
                    out.append((f"{base}.to[{j}].operation.{key}[{k}]", f"{key} {value}"))
    return out


def _describe(fields: Mapping[str, Any]) -> str:
    if not fields:
        return "(any)"
    return "; ".join(f"{k}={','.join(str(v) for v in _list(fields[k]))}" for k in sorted(fields))


def _describe_rule(rule: Mapping[str, Any]) -> str:
    parts = []
    for frm in rule.get("from") or []:
        parts.append("from " + _describe(frm.get("source") or {}))
    for to in rule.get("to") or []:
        parts.append("to " + _describe(to.get("operation") or {}))
    for cond in rule.get("when") or []:
        parts.append(f"when {cond.get('key')}")
    return "rule " + (" | ".join(parts) if parts else "{} (everything)")
