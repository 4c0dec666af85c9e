"""deploy/ebpf-daemonset.yaml: valid Kubernetes objects, with the privileges it claims.

kubeconform is not installable here (no registry ships it), so each object is checked
against the Kubernetes API's own types as the official Python client generates them from the
API's OpenAPI document: every key must be a field of its type (recursively, the strict check
kubeconform's ``-strict`` does), values must have the field's type, and the client's model
constructors must accept it (they reject missing required fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "ebpf-daemonset.yaml"
TYPES = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("apps/v1", "DaemonSet"): "V1DaemonSet"}


def strict(value: Any, type_name: str, where: str) -> list[str]:
    """Problems of ``value`` as an instance of the client's ``type_name``."""
    # The client spells containers 'list[T]'/'dict(str, T)' or 'List[T]'/'Dict[str, T]'.
    if type_name.lower().startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in strict(v, type_name[5:-1], f"{where}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        inner = type_name[type_name.index(",") + 1:-1].strip()
        if not isinstance(value, dict):
            return [f"{where}: expected a map"]
        return [p for k, v in value.items() for p in strict(v, inner, f"{where}.{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (
            type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name in ("object", "datetime"):
        return []
    cls = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} object"]
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    problems = [f"{where}.{k}: not a field of {type_name}" for k in value if k not in fields]
    for key, val in value.items():
        if key in fields:
            problems += strict(val, cls.openapi_types[fields[key]], f"{where}.{key}")
    return problems


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_objects_are_valid_kubernetes_types(doc: dict[str, Any]) -> None:
    type_name = TYPES[(doc["apiVersion"], doc["kind"])]
    assert strict(doc, type_name, doc["kind"]) == []
    # The generated constructors raise on missing required fields.
    k8s.ApiClient()._ApiClient__deserialize(doc, type_name)  # type: ignore[attr-defined]


def test_a_typo_is_caught() -> None:
    (ds,) = [d for d in documents() if d["kind"] == "DaemonSet"]
    ds["spec"]["template"]["spec"]["hostPid"] = True
    assert strict(ds, "V1DaemonSet", "ds") == ["ds.spec.template.spec.hostPid: not a field of "
                                               "V1PodSpec"]


def test_privileges_are_the_documented_minimum() -> None:
    (ds,) = [d for d in documents() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "SYS_RESOURCE"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/host/sys/fs/cgroup"):
        assert mounts[path]["readOnly"] is True
    assert "meshwright observe --ebpf" in c["args"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["MESHWRIGHT_CGROUP_ROOT"]["value"] == "/host/sys/fs/cgroup"
