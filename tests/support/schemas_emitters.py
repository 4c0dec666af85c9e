"""Validation of Linkerd policy and NetworkPolicy manifests against the official schemas.

Two independent schema sources per Linkerd kind where the data set has both: the CRD's own
``openAPIV3Schema`` (Linkerd's Helm chart, the served storage version) and datree's JSON
Schema conversion; NetworkPolicy against the Kubernetes 1.33 OpenAPI definitions. The
schemas leave some API-server checks out (apiVersion/kind pinning, CIDR syntax, port
ranges); those are asserted explicitly.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).resolve().parent.parent / "data" / "crds"

#: kind -> apiVersion the emitters are pinned to.
LINKERD_VERSIONS = {
    "Server": "policy.linkerd.io/v1beta3",
    "HTTPRoute": "policy.linkerd.io/v1beta3",
    "AuthorizationPolicy": "policy.linkerd.io/v1alpha1",
    "MeshTLSAuthentication": "policy.linkerd.io/v1alpha1",
    "NetworkAuthentication": "policy.linkerd.io/v1alpha1",
}
PROXY_PROTOCOLS = {"unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"}
ACCESS_POLICIES = {"deny", "audit", "all-unauthenticated", "all-authenticated",
                   "cluster-authenticated", "cluster-unauthenticated"}


def _strip_k8s(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_k8s(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_strip_k8s(v) for v in schema]
    return schema


def _helm_crd(name: str, version: str) -> dict[str, Any]:
    # Helm templating sits on metadata lines only; the schema below is plain YAML.
    text = "\n".join(line for line in (DATA / name).read_text("utf-8").splitlines()
                     if "{{" not in line)
    crd = yaml.safe_load(text)
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"] is True and v["storage"] is True
    return _strip_k8s(v["schema"]["openAPIV3Schema"])


CRD_SCHEMAS = {
    "Server": _helm_crd("linkerd-crd-policy-server.helm.yaml", "v1beta3"),
    "AuthorizationPolicy": _helm_crd("linkerd-crd-policy-authorization-policy.helm.yaml",
                                     "v1alpha1"),
    "MeshTLSAuthentication": _helm_crd("linkerd-crd-policy-meshtls-authentication.helm.yaml",
                                       "v1alpha1"),
    "NetworkAuthentication": _helm_crd("linkerd-crd-policy-network-authentication.helm.yaml",
                                       "v1alpha1"),
}
DATREE = {kind: json.loads((DATA / f"jsonschema-linkerd-{stem}.json").read_text("utf-8"))
          for kind, stem in (("Server", "server_v1beta3"),
                             ("HTTPRoute", "httproute_v1beta3"),
                             ("AuthorizationPolicy", "authorizationpolicy_v1alpha1"),
                             ("MeshTLSAuthentication", "meshtlsauthentication_v1alpha1"),
                             ("NetworkAuthentication", "networkauthentication_v1alpha1"))}
NETPOL = json.loads((DATA / "k8s-1.33-networkpolicy-networking-v1.schema.json").read_text("utf-8"))


def _meta(obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    assert meta["name"] and meta["namespace"]
    assert len(meta["name"]) <= 253 and meta["name"] == meta["name"].lower()
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "meshwright"}
    assert all(isinstance(v, str) for v in meta["annotations"].values())


def validate_linkerd(obj: dict[str, Any]) -> None:
    kind = obj["kind"]
    assert obj["apiVersion"] == LINKERD_VERSIONS[kind]
    if kind in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[kind])
    jsonschema.validate(obj, DATREE[kind])
    _meta(obj)
    spec = obj["spec"]
    if kind == "Server":
        assert spec.get("proxyProtocol", "unknown") in PROXY_PROTOCOLS
        assert spec.get("accessPolicy", "deny") in ACCESS_POLICIES
        assert spec["podSelector"]["matchLabels"], "a Server must not select the namespace"
        port = spec["port"]
        assert (isinstance(port, int) and 0 < port <= 65535) or (
            isinstance(port, str) and port and not port.isdigit())
    elif kind == "NetworkAuthentication":
        for net in spec["networks"]:
            ipaddress.ip_network(net["cidr"], strict=True)
    elif kind == "HTTPRoute":
        assert spec["parentRefs"] and all(
            r["group"] == "policy.linkerd.io" and r["kind"] == "Server"
            for r in spec["parentRefs"])
        for rule in spec["rules"]:
            for m in rule["matches"]:
                assert m["path"]["type"] in ("Exact", "PathPrefix")
                assert m["path"]["value"].startswith("/")


def validate_netpol(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "networking.k8s.io/v1" and obj["kind"] == "NetworkPolicy"
    jsonschema.validate(obj, NETPOL)
    _meta(obj)
    spec = obj["spec"]
    assert set(spec["policyTypes"]) <= {"Ingress", "Egress"}
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        if direction in spec:
            assert direction.capitalize() in spec["policyTypes"]
        for rule in spec.get(direction, []):
            for port in rule.get("ports", []):
                assert port["protocol"] in ("TCP", "UDP", "SCTP")
                assert isinstance(port["port"], int) and 0 < port["port"] <= 65535
            for peer in rule.get(peers_key, []):
                assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}
                if "ipBlock" in peer:
                    assert set(peer) == {"ipBlock"}
                    ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=True)
