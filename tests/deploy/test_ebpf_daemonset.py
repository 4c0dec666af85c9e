"""deploy/: valid Kubernetes objects, with the privileges they claim; the eBPF DaemonSet ships
to the observer's Service with a token only the observer accepts.

kubeconform is not installable here (no registry ships it), so each object is checked
against the Kubernetes API's own types as the official Python client generates them from the
API's OpenAPI document: every key must be a field of its type (recursively, the strict check
kubeconform's ``-strict`` does), values must have the field's type, and the client's model
constructors must accept it (they reject missing required fields).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client as k8s
import pytest
import yaml

from meshwright.ingest import AUDIENCE, DEFAULT_ALLOW, INGEST_PATH
from observe.ship import DEFAULT_TOKEN_FILE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFEST = DEPLOY / "ebpf-daemonset.yaml"
TYPES = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("apps/v1", "DaemonSet"): "V1DaemonSet", ("apps/v1", "Deployment"): "V1Deployment",
         ("v1", "Service"): "V1Service",
         ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
         ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
         ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding"}


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
    assert c["command"] == ["meshwright"] and c["args"][:2] == ["observe", "--ebpf"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["MESHWRIGHT_CGROUP_ROOT"]["value"] == "/host/sys/fs/cgroup"


# -- the whole kustomization ---------------------------------------------------------------------
def kustomized() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/`` makes of deploy/kustomization.yaml (its resources
    with the namespace and labels set; the fields it uses are all this does)."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    out: list[dict[str, Any]] = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text(encoding="utf-8")):
            if not doc:
                continue
            meta = doc["metadata"]
            if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                meta["namespace"] = kust["namespace"]
            for pairs in kust.get("labels", []):
                meta.setdefault("labels", {}).update(pairs["pairs"])
            out.append(doc)
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("doc", kustomized(),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_installed_object_is_a_valid_kubernetes_type(doc: dict[str, Any]) -> None:
    type_name = TYPES[(doc["apiVersion"], doc["kind"])]
    assert strict(doc, type_name, doc["kind"]) == []
    k8s.ApiClient()._ApiClient__deserialize(doc, type_name)  # type: ignore[attr-defined]


def test_one_kustomization_installs_observer_and_daemonset_once_each() -> None:
    docs = kustomized()
    ids = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids))  # kustomize refuses duplicates (one Namespace)
    assert ("DaemonSet", "meshwright-ebpf") in ids and ("Deployment", "meshwright-observer") in ids
    assert ("ServiceAccount", "meshwright-ebpf") in ids


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_agrees() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True,
                          check=True, timeout=120)
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, theirs)) == sorted(map(key, kustomized()))
    for d in theirs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshwright"


def test_the_daemonset_ships_to_the_observer_with_a_token_only_it_accepts() -> None:
    docs = kustomized()
    ds = by_kind(docs, "DaemonSet")["meshwright-ebpf"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    # --send names the observer's Service, its port and the ingest path.
    url = urlsplit(args["send"])
    svc = by_kind(docs, "Service")["meshwright-observer"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert (url.scheme, url.hostname, url.path) == ("http", host, INGEST_PATH)
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    observer = by_kind(docs, "Deployment")["meshwright-observer"]["spec"]["template"]["spec"]
    (oc,) = observer["containers"]
    assert f"--listen=:{url.port}" in oc["args"]
    # The token: projected, audience meshwright, short-lived, where --token-file reads it.
    assert pod["serviceAccountName"] == "meshwright-ebpf"
    assert pod["automountServiceAccountToken"] is False
    assert by_kind(docs, "ServiceAccount")["meshwright-ebpf"]["automountServiceAccountToken"] \
        is False
    (projected,) = [v for v in pod["volumes"] if "projected" in v]
    (source,) = projected["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == AUDIENCE and 600 <= token["expirationSeconds"] <= 3600
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == projected["name"]]
    assert mount["readOnly"] is True
    assert args["token-file"] == f"{mount['mountPath']}/{token['path']}" == DEFAULT_TOKEN_FILE
    # The observer's default --ingest-allow is this service account.
    sa = f"system:serviceaccount:{ds['metadata']['namespace']}:{pod['serviceAccountName']}"
    assert (sa,) == DEFAULT_ALLOW
    # The spool on the node, so a restarted pod sends what was left.
    (spool,) = [v for v in pod["volumes"] if v["name"] == "spool"]
    (smount,) = [m for m in c["volumeMounts"] if m["name"] == "spool"]
    assert smount["mountPath"] == args["spool"] == spool["hostPath"]["path"]
    assert pod["terminationGracePeriodSeconds"] >= 25  # a 20 s drain fits


def test_rbac_is_read_only_plus_tokenreviews_and_nothing_for_the_daemonset() -> None:
    docs = kustomized()
    (role,) = by_kind(docs, "ClusterRole").values()
    writes = [(r["apiGroups"], r["resources"], v) for r in role["rules"] for v in r["verbs"]
              if v not in ("get", "list", "watch")]
    assert writes == [(["authentication.k8s.io"], ["tokenreviews"], "create")]
    subjects = [s for b in by_kind(docs, "ClusterRoleBinding").values() for s in b["subjects"]]
    assert {s["name"] for s in subjects} == {"meshwright-observer"}
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
