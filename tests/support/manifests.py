"""Validation of emitted manifests against the official CRD schemas (shared by tests)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).resolve().parent.parent / "data"


def _strip_k8s(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_k8s(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_strip_k8s(v) for v in schema]
    return schema


def _crd_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((DATA / "crds" / name).read_text(encoding="utf-8"))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] is True
    return _strip_k8s(v1["schema"]["openAPIV3Schema"])


SCHEMAS = {
    "AuthorizationPolicy": _crd_schema("istio-crd-authorizationpolicies.security.istio.io.yaml"),
    "PeerAuthentication": _crd_schema("istio-crd-peerauthentications.security.istio.io.yaml"),
}
DATREE = {
    "AuthorizationPolicy": json.loads(
        (DATA / "crds" / "jsonschema-istio-authorizationpolicy_v1.json").read_text("utf-8")),
    "PeerAuthentication": json.loads(
        (DATA / "crds" / "jsonschema-istio-peerauthentication_v1.json").read_text("utf-8")),
}


def _cel_checks(obj: dict[str, Any]) -> None:
    """The CRDs' x-kubernetes-validations (CEL) rules, as explicit asserts."""
    spec = obj.get("spec", {})
    labels = spec.get("selector", {}).get("matchLabels", {})
    assert all(k and "*" not in k for k in labels), "label key empty or wildcard"
    assert all("*" not in v for v in labels.values()), "wildcard in label value"
    assert sum(k in spec for k in ("selector", "targetRef", "targetRefs")) <= 1
    if obj["kind"] == "AuthorizationPolicy":
        for rule in spec.get("rules", []):
            for f in rule.get("from", []):
                src = f["source"]
                if "serviceAccounts" in src or "notServiceAccounts" in src:
                    assert not {"principals", "notPrincipals", "namespaces",
                                "notNamespaces"} & set(src)
    else:
        if "portLevelMtls" in spec:
            assert labels, "portLevelMtls requires selector"
            assert all(0 < int(k) <= 65535 for k in spec["portLevelMtls"])


def _istio_checks(obj: dict[str, Any]) -> None:
    """What istiod's validation adds beyond the CRD schema, for the fields we emit."""
    assert obj["apiVersion"] == "security.istio.io/v1"
    meta = obj["metadata"]
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "meshwright"}
    assert all(isinstance(v, str) for v in meta["annotations"].values())
    for rule in obj["spec"].get("rules", []):
        for f in rule.get("from", []):
            for ip in f["source"].get("ipBlocks", []):
                ipaddress.ip_network(ip, strict=True)
            for p in f["source"].get("principals", []):
                assert not p.startswith("spiffe://")
        for t in rule.get("to", []):
            op = t["operation"]
            assert op.get("ports"), "every emitted operation pins ports"
            assert all(0 < int(p) <= 65535 for p in op["ports"])
            for path in op.get("paths", []):
                assert path.startswith("/") or path.startswith("*")
                assert not ("{" in path and "*" in path.replace("{*}", "").replace("{**}", ""))


def validate(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, SCHEMAS[obj["kind"]])
    jsonschema.validate(obj, DATREE[obj["kind"]])
    _cel_checks(obj)
