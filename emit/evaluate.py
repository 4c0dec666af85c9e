"""Decide what a set of Istio policies does to one request, the way a sidecar would.

Used to replay recorded traffic against proposed (or existing) policies: every observed
request must be allowed, and requests never observed must be denied. The semantics follow
Istio's reference for ``security.istio.io/v1``:

* PeerAuthentication first: the effective mTLS mode for the workload port is port-level
  (``portLevelMtls``) over workload-level (``selector``) over namespace-level over the root
  namespace (mesh-wide); default PERMISSIVE. STRICT rejects plaintext before authorization.
* AuthorizationPolicy: a policy applies when it is in the workload's namespace and its
  ``selector.matchLabels`` are a subset of the pod's labels (or it has no selector), or it is in
  the root namespace. CUSTOM is not modelled; DENY before ALLOW; with no ALLOW policy the
  request is allowed; otherwise some ALLOW rule must match. ``spec: {}`` is an ALLOW policy that
  matches nothing (allow-nothing).
* A rule matches when any ``from`` source and any ``to`` operation match (absent = any); fields
  within a source/operation are ANDed. String matches are exact, ``prefix*``, ``*suffix`` or
  ``*`` (presence). Paths compare with the URL path without its query string, and support the
  ``{*}`` (one segment) and ``{**}`` (the rest) templates.
* For TCP traffic, HTTP-only fields (hosts, methods, paths, their ``not`` forms,
  requestPrincipals) cannot be evaluated: an ALLOW rule containing them does not match (so the
  connection is denied), a DENY rule is applied with those fields ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

HTTP_ONLY_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
HTTP_ONLY_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")


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

    @property
    def source_namespace(self) -> str | None:
        if not self.source_principal:
            return None
        parts = self.source_principal.split("/")
        return parts[parts.index("ns") + 1] if "ns" in parts[:-1] else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


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


def _ip_match(blocks: Iterable[str], ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for block in blocks:
        try:
            if address in ipaddress.ip_network(block, strict=False):
                return True
        except ValueError:
            continue
    return False


def _any(patterns: Sequence[str], value: str | None, match: Any = _string_match) -> bool:
    return any(match(p, value) for p in patterns)


def _source_matches(source: Mapping[str, Any], req: Request) -> bool:
    checks: list[bool] = []
    if "principals" in source:
        checks.append(_any(source["principals"], req.source_principal))
    if "notPrincipals" in source:
        checks.append(not _any(source["notPrincipals"], req.source_principal))
    if "namespaces" in source:
        checks.append(_any(source["namespaces"], req.source_namespace))
    if "notNamespaces" in source:
        checks.append(not _any(source["notNamespaces"], req.source_namespace))
    for key in ("ipBlocks", "remoteIpBlocks"):
        if key in source:
            checks.append(_ip_match(source[key], req.source_ip))
    for key in ("notIpBlocks", "notRemoteIpBlocks"):
        if key in source:
            checks.append(not _ip_match(source[key], req.source_ip))
    if "requestPrincipals" in source:
        checks.append(False)  # no JWTs in replayed traffic
    return all(checks)


def _operation_matches(op: Mapping[str, Any], req: Request) -> bool:
    checks: list[bool] = []
    if "ports" in op:
        checks.append(str(req.port) in {str(p) for p in op["ports"]})
    if "notPorts" in op:
        checks.append(str(req.port) not in {str(p) for p in op["notPorts"]})
    if "methods" in op:
        checks.append(req.method in set(op["methods"]))
    if "notMethods" in op:
        checks.append(req.method not in set(op["notMethods"]))
    if "paths" in op:
        checks.append(_any(op["paths"], req.path, _path_match))
    if "notPaths" in op:
        checks.append(not _any(op["notPaths"], req.path, _path_match))
    if "hosts" in op:
        checks.append(_any(op["hosts"], req.host))
    if "notHosts" in op:
        checks.append(not _any(op["notHosts"], req.host))
    return all(checks)


def _has_http_fields(rule: Mapping[str, Any]) -> bool:
    for to in rule.get("to") or []:
        if any(k in (to.get("operation") or {}) for k in HTTP_ONLY_FIELDS):
            return True
    for frm in rule.get("from") or []:
        if any(k in (frm.get("source") or {}) for k in HTTP_ONLY_SOURCE_FIELDS):
            return True
    return bool(rule.get("when"))


def _strip_http(rule: Mapping[str, Any]) -> dict[str, Any]:
    to = [
        {"operation": {k: v for k, v in (t.get("operation") or {}).items()
                       if k not in HTTP_ONLY_FIELDS}}
        for t in rule.get("to") or []
    ]
    out = dict(rule)
    if to:
        out["to"] = to
    out.pop("when", None)
    return out


def _rule_matches(rule: Mapping[str, Any], req: Request) -> bool:
    if rule.get("when"):
        return False  # conditions are not modelled: never grant on them
    sources = rule.get("from")
    if sources and not any(_source_matches(s.get("source") or {}, req) for s in sources):
        return False
    ops = rule.get("to")
    return not (ops and not any(_operation_matches(o.get("operation") or {}, req) for o in ops))


def _applies(obj: Mapping[str, Any], req: Request, root_namespace: str) -> bool:
    ns = (obj.get("metadata") or {}).get("namespace")
    if ns == root_namespace and ns != req.namespace:
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels")
        return not selector or all(req.labels.get(k) == v for k, v in selector.items())
    if ns != req.namespace:
        return False
    selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels")
    return not selector or all(req.labels.get(k) == v for k, v in selector.items())


def _dry_run(obj: Mapping[str, Any]) -> bool:
    """Dry-run policies are logged by the proxy, never enforced."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get("istio.io/dry-run") == "true")


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def mtls_mode(manifests: Iterable[Mapping[str, Any]], req: Request,
              root_namespace: str = "istio-system") -> str:
    """Effective PeerAuthentication mode for the request's workload port."""
    ranks: list[tuple[int, str]] = []
    for obj in manifests:
        if obj.get("kind") != "PeerAuthentication" or not _applies(obj, req, root_namespace):
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


def evaluate(manifests: Sequence[Mapping[str, Any]], req: Request,
             root_namespace: str = "istio-system") -> Decision:
    """Would the destination sidecar let ``req`` through under ``manifests``?"""
    mode = mtls_mode(manifests, req, root_namespace)
    if mode == "STRICT" and req.source_principal is None:
        return Decision(False, "plaintext rejected: PeerAuthentication STRICT")
    policies = [
        m for m in manifests
        if m.get("kind") == "AuthorizationPolicy" and _applies(m, req, root_namespace)
        and not _dry_run(m)
    ]
    tcp = req.protocol == "tcp"
    for policy in policies:
        spec = policy.get("spec") or {}
        if spec.get("action") != "DENY":
            continue
        for rule in spec.get("rules") or []:
            if _rule_matches(_strip_http(rule) if tcp else rule, req):
                return Decision(False, f"denied by {_name(policy)}")
    allow = [p for p in policies if (p.get("spec") or {}).get("action", "ALLOW") == "ALLOW"]
    if not allow:
        return Decision(True, "no ALLOW policy applies")
    for policy in allow:
        for index, rule in enumerate((policy.get("spec") or {}).get("rules") or []):
            if tcp and _has_http_fields(rule):
                continue
            if _rule_matches(rule, req):
                return Decision(True, f"allowed by {_name(policy)} rule {index}")
    return Decision(False, "no ALLOW rule matches")
