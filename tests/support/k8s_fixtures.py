"""Synthesize Kubernetes objects shaped like real ``kubectl get -o json`` output.

Not a test module: loaded by path from tests that need pods (``load_fixtures()``). Objects carry
what the API server really returns: ``metadata.uid``/``creationTimestamp``/``resourceVersion``,
``ownerReferences`` with ``controller: true`` and ``blockOwnerDeletion``, ``status.podIPs`` next
to ``status.podIP``, ``hostIP``/``hostIPs``, container statuses.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

#: Alphabet of generated name suffixes and pod-template-hash (k8s rand.SafeEncodeString).
SAFE = "bcdfghjklmnpqrstvwxz2456789"
SIDECAR_STATUS = (
    '{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],'
    '"imagePullSecrets":null,"revision":"default"}'
)


def load_fixtures() -> ModuleType:
    """This module, importable from any test file under --import-mode=importlib."""
    spec = importlib.util.spec_from_file_location("k8s_fixtures", __file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def safe(seed: str, n: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(SAFE[b % len(SAFE)] for b in digest[:n])


def uid(seed: str) -> str:
    h = hashlib.sha256(seed.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def owner_ref(kind: str, name: str, api_version: str = "apps/v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "blockOwnerDeletion": True, "controller": True,
            "kind": kind, "name": name, "uid": uid(f"{kind}/{name}")}


def k8s_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``kubectl get ... -o json`` List."""
    return {"apiVersion": "v1", "items": items, "kind": "List",
            "metadata": {"resourceVersion": ""}}


def pod(
    name: str,
    *,
    namespace: str = "default",
    ip: str | None,
    labels: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
    created: str = "2024-05-01T10:00:00Z",
    started: str | None = None,
    deleted: str | None = None,
    phase: str = "Running",
    finished: str | None = None,
    service_account: str | None = None,
    node: str = "node-1",
    host_ip: str = "10.0.0.11",
    host_network: bool = False,
    containers: list[dict[str, Any]] | None = None,
    meshed: bool = True,
) -> dict[str, Any]:
    """One pod as the API returns it."""
    app = containers or [{"name": "app", "image": "example/app:1",
                          "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]
    spec: dict[str, Any] = {
        "containers": copy.deepcopy(app),
        "dnsPolicy": "ClusterFirst",
        "nodeName": node,
        "restartPolicy": "Always",
    }
    annotations: dict[str, str] = {}
    all_labels = dict(labels or {})
    if meshed:
        spec["containers"].append({
            "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        })
        spec["initContainers"] = [{"name": "istio-init", "image": "docker.io/istio/proxyv2:1.22.0"}]
        annotations["sidecar.istio.io/status"] = SIDECAR_STATUS
        all_labels.setdefault("security.istio.io/tlsMode", "istio")
    if service_account:
        spec["serviceAccountName"] = service_account
        spec["serviceAccount"] = service_account
    if host_network:
        spec["hostNetwork"] = True
    meta: dict[str, Any] = {
        "creationTimestamp": created, "labels": all_labels, "name": name,
        "namespace": namespace, "resourceVersion": "1000",
        "uid": uid(f"{namespace}/{name}/{created}"),
    }
    if annotations:
        meta["annotations"] = annotations
    if owner:
        meta["ownerReferences"] = [owner]
        meta["generateName"] = name.rsplit("-", 1)[0] + "-"
    if deleted:
        meta["deletionTimestamp"] = deleted
        meta["deletionGracePeriodSeconds"] = 30
    status: dict[str, Any] = {"phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                              "qosClass": "BestEffort"}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    status["startTime"] = started or created
    state: dict[str, Any] = {"running": {"startedAt": started or created}}
    if finished:
        state = {"terminated": {"exitCode": 0, "finishedAt": finished, "reason": "Completed",
                                "startedAt": started or created}}
    status["containerStatuses"] = [
        {"containerID": f"containerd://{uid(name + c['name'])}", "image": c["image"],
         "imageID": f"{c['image']}@sha256:{'0' * 64}", "lastState": {}, "name": c["name"],
         "ready": phase == "Running", "restartCount": 0, "started": phase == "Running",
         "state": state}
        for c in spec["containers"]
    ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def replicaset_for(deploy: dict[str, Any], *, created: str = "2024-05-01T09:59:00Z",
                   with_owner: bool = True) -> dict[str, Any]:
    """The ReplicaSet a Deployment controller creates for the current template."""
    meta = deploy["metadata"]
    ns = meta.get("namespace") or "default"
    template_hash = safe(f"{ns}/{meta['name']}", 9)
    template = copy.deepcopy(deploy["spec"]["template"])
    template["metadata"].setdefault("labels", {})["pod-template-hash"] = template_hash
    selector = copy.deepcopy(deploy["spec"]["selector"])
    selector["matchLabels"]["pod-template-hash"] = template_hash
    rs_meta: dict[str, Any] = {
        "creationTimestamp": created, "generation": 1,
        "labels": template["metadata"]["labels"], "name": f"{meta['name']}-{template_hash}",
        "namespace": ns, "resourceVersion": "900", "uid": uid(f"{ns}/rs/{meta['name']}"),
    }
    if with_owner:
        rs_meta["ownerReferences"] = [owner_ref("Deployment", meta["name"])]
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": rs_meta,
            "spec": {"replicas": 1, "selector": selector, "template": template},
            "status": {"replicas": 1}}


def pods_for(deploy: dict[str, Any], ips: list[str], *, created: str = "2024-05-01T10:00:00Z",
             meshed: bool = True, **kw: Any) -> list[dict[str, Any]]:
    """Pods of a Deployment (one per IP), named ``<deploy>-<hash>-<5 chars>`` like the real ones."""
    rs = replicaset_for(deploy)
    template = rs["spec"]["template"]
    tspec = template["spec"]
    ns = deploy["metadata"].get("namespace") or "default"
    out = []
    for i, ip in enumerate(ips):
        name = f"{rs['metadata']['name']}-{safe(rs['metadata']['name'] + str(i) + ip, 5)}"
        out.append(pod(
            name, namespace=ns, ip=ip, labels=dict(template["metadata"]["labels"]),
            owner=owner_ref("ReplicaSet", rs["metadata"]["name"]), created=created,
            service_account=tspec.get("serviceAccountName"),
            containers=[{k: v for k, v in c.items() if k in ("name", "image", "ports")}
                        for c in tspec["containers"]],
            meshed=meshed, **kw,
        ))
    return out


def deployment(name: str, labels: dict[str, str], *, namespace: str = "default",
               service_account: str | None = None) -> dict[str, Any]:
    tspec: dict[str, Any] = {"containers": [{"name": "app", "image": "example/app:1", "ports": [
        {"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]}
    if service_account:
        tspec["serviceAccountName"] = service_account
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "uid": uid(f"deploy/{name}"),
                         "creationTimestamp": "2024-05-01T09:00:00Z"},
            "spec": {"selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)}, "spec": tspec}}}


def service(name: str, selector: dict[str, str], ports: list[dict[str, Any]], *,
            cluster_ip: str, namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "uid": uid(f"svc/{name}"),
                         "creationTimestamp": "2024-05-01T09:00:00Z"},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
                     "ipFamilyPolicy": "SingleStack", "ports": ports, "selector": selector,
                     "sessionAffinity": "None", "type": "ClusterIP"},
            "status": {"loadBalancer": {}}}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]
