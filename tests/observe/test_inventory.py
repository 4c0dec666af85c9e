"""observe.inventory: converters, owner chains, lifetimes, named ports, loaders and errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support import k8s_fixtures as K

from observe.errors import InventoryError
from observe.inventory import Inventory, load_inventory

INV = Path(__file__).parents[1] / "data" / "inventory"
BOOKINFO = INV / "istio-samples-bookinfo.yaml"
BOUTIQUE = INV / "online-boutique-kubernetes-manifests.yaml"


def _write(tmp_path: Path, name: str, items: list[dict[str, Any]]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(K.k8s_list(items), indent=2), encoding="utf-8")
    return path


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def test_bookinfo_manifest() -> None:
    inv = load_inventory([BOOKINFO])
    names = sorted(k[2] for k in inv.workloads)
    assert names == ["details-v1", "productpage-v1", "ratings-v1", "reviews-v1", "reviews-v2",
                     "reviews-v3"]
    reviews = inv.workloads[("default", "Deployment", "reviews-v2")]
    assert reviews.labels == {"app": "reviews", "version": "v2"}
    assert reviews.selector == {"app": "reviews", "version": "v2"}
    assert reviews.service_account == "bookinfo-reviews"
    assert reviews.meshed is None  # a plain manifest: injection is decided at admission
    assert [c.port for c in reviews.ports] == [9080]
    assert ("default", "bookinfo-reviews") in inv.service_accounts
    svc = inv.services[("default", "reviews")]
    assert [w.name for w in inv.workloads_behind(svc)] == ["reviews-v1", "reviews-v2",
                                                           "reviews-v3"]
    assert inv.resolve_target_port(svc, 9080) == 9080  # no targetPort: same as port
    assert inv.resolve_target_port(svc, 80) is None
    assert [s.name for s in inv.services_selecting(reviews)] == ["reviews"]
    assert inv.pods == [] and inv.snapshot_time is None
    assert inv.stats.objects == 14 and inv.stats.invalid == 0


def test_boutique_target_ports() -> None:
    inv = load_inventory([BOUTIQUE])
    email = inv.services[("default", "emailservice")]
    assert email.ports[0].port == 5000 and email.ports[0].target_port == 8080
    assert inv.resolve_target_port(email, 5000) == 8080
    frontend = inv.workloads[("default", "Deployment", "frontend")]
    assert sorted(s.name for s in inv.services_selecting(frontend)) == ["frontend",
                                                                       "frontend-external"]
    assert inv.services[("default", "frontend-external")].type == "LoadBalancer"
    assert {(p.port, p.path, p.kind) for p in frontend.probes} == {
        (8080, "/_healthz", "readiness"), (8080, "/_healthz", "liveness")}


def test_native_sidecar_pod_and_injected_template() -> None:
    inv = load_inventory([INV / "istio-kube-inject-native-sidecar.yaml.injected",
                          INV / "istio-kube-inject-hello.yaml.injected"])
    (pod,) = inv.pods
    assert pod.key == "default/hello" and pod.workload == ("Pod", "hello")
    assert pod.meshed  # istio-proxy is an init container with restartPolicy Always
    assert "istio-proxy" in pod.containers
    # other-sidecar's probe was rewritten to pilot-agent :15020; ISTIO_KUBE_APP_PROBERS has
    # the original (port 3333, no path)
    assert [(p.container, p.port, p.path) for p in pod.probes] == [("other-sidecar", 3333, "/")]
    hello = inv.workloads[("default", "Deployment", "hello")]
    assert hello.meshed is True and hello.selector == {"app": "hello", "tier": "backend",
                                                       "track": "stable"}


def _cluster_items() -> list[dict[str, Any]]:
    deploy = K.deployment("api", {"app": "api"}, namespace="shop", service_account="api")
    rs = K.replicaset_for(deploy)
    api_pods = K.pods_for(deploy, ["10.244.1.10"], started="2024-05-01T10:00:05Z")
    sts_pod = K.pod("db-0", namespace="shop", ip="10.244.1.20", labels={
        "app": "db", "controller-revision-hash": "db-6b8c7d", "apps.kubernetes.io/pod-index": "0",
        "statefulset.kubernetes.io/pod-name": "db-0"}, owner=K.owner_ref("StatefulSet", "db"))
    ds_pod = K.pod("node-agent-x7k2q", namespace="kube-system", ip="10.0.0.11",
                   labels={"name": "node-agent"}, owner=K.owner_ref("DaemonSet", "node-agent"),
                   host_network=True, meshed=False)
    job_pod = K.pod(
        "backup-28570000-q4z8m", namespace="shop", ip="10.244.1.30",
        labels={"app": "backup", "job-name": "backup-28570000"},
        owner=K.owner_ref("Job", "backup-28570000", "batch/v1"),
        phase="Succeeded", created="2024-05-01T10:00:00Z", finished="2024-05-01T10:02:30Z",
        meshed=False,
    )
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": "backup-28570000", "namespace": "shop", "uid": K.uid("job"),
        "ownerReferences": [K.owner_ref("CronJob", "backup", "batch/v1")]},
        "spec": {"template": {"metadata": {"labels": {"app": "backup",
                                                       "job-name": "backup-28570000"}},
                              "spec": {"containers": [{"name": "b", "image": "busybox"}]}}}}
    cron = {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "backup", "namespace": "shop", "uid": K.uid("cron")},
            "spec": {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"labels": {"app": "backup"}},
                "spec": {"serviceAccountName": "backup",
                         "containers": [{"name": "b", "image": "busybox"}]}}}}}}
    bare = K.pod("debug", namespace="shop", ip="10.244.1.40", labels={"run": "debug"},
                 deleted="2024-05-01T11:00:00Z", meshed=False)
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"istio-injection": "enabled"}}},
        deploy, rs, *api_pods, sts_pod, ds_pod, job_pod, job, cron, bare,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "shop"}},
        K.service("api", {"app": "api"}, [{"name": "web", "port": 80, "protocol": "TCP",
                                           "targetPort": "http"}], cluster_ip="10.96.0.10",
                  namespace="shop"),
    ]


def test_owner_chains_and_lifetimes(tmp_path: Path) -> None:
    inv = load_inventory([_write(tmp_path, "cluster.json", _cluster_items())])
    by_name = {p.name: p for p in inv.pods}
    api = next(p for p in inv.pods if p.name.startswith("api-"))
    assert api.workload == ("Deployment", "api") and api.owner is not None
    assert api.owner[0] == "ReplicaSet"
    assert api.ips == ("10.244.1.10",) and api.service_account == "api"
    assert api.created == _t("2024-05-01T10:00:00Z")
    assert api.started == _t("2024-05-01T10:00:05Z") and api.ended is None
    assert by_name["db-0"].workload == ("StatefulSet", "db")
    agent = by_name["node-agent-x7k2q"]
    assert agent.workload == ("DaemonSet", "node-agent") and agent.host_network
    job_pod = by_name["backup-28570000-q4z8m"]
    assert job_pod.workload == ("CronJob", "backup")
    assert job_pod.ended == _t("2024-05-01T10:02:30Z")  # Succeeded: last finishedAt
    assert by_name["debug"].workload == ("Pod", "debug")
    assert by_name["debug"].ended == _t("2024-05-01T11:00:00Z")  # deletionTimestamp
    assert inv.snapshot_time == _t("2024-05-01T11:00:00Z")
    keys = set(inv.workloads)
    assert ("shop", "CronJob", "backup") in keys and ("shop", "Job", "backup-28570000") not in keys
    assert ("shop", "ReplicaSet", api.owner[1]) not in keys
    assert ("shop", "Pod", "debug") in keys
    deploy = inv.workloads[("shop", "Deployment", "api")]
    assert inv.workload_of(api) is deploy
    assert [p.name for p in inv.pods_of(deploy)] == [api.name]
    # named targetPort "http" resolved through the pods' containerPorts
    svc = inv.services[("shop", "api")]
    assert svc.ports[0].target_port == "http"
    assert inv.resolve_target_port(svc, 80) == 8080
    # pods decide meshedness; without pods the namespace's injection label does
    assert deploy.meshed is True
    assert inv.workloads[("shop", "CronJob", "backup")].meshed is False
    assert inv.stats.ignored == {"ConfigMap": 1}


def test_owner_objects_absent_from_dump(tmp_path: Path) -> None:
    deploy = K.deployment("web", {"app": "web"})
    rs = K.replicaset_for(deploy)
    pods = K.pods_for(deploy, ["10.244.3.3"])
    orphan_pod = K.pods_for(K.deployment("cart", {"app": "cart"}), ["10.244.3.4"])[0]
    job_pod = K.pod("report-28570060-b4k7z", ip="10.244.3.5", labels={"app": "report"},
                    owner=K.owner_ref("Job", "report-28570060", "batch/v1"))
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"labels": {"app": "report"}}, "spec": {"containers": []}}}}}}
    # The ReplicaSet is there (naming its Deployment) but the Deployment is not; cart's
    # ReplicaSet is missing entirely; the report Job is gone but its CronJob is listed.
    inv = load_inventory([_write(tmp_path, "partial.json",
                                 [rs, *pods, orphan_pod, job_pod, cron])])
    by_name = {p.name: p for p in inv.pods}
    assert by_name[pods[0]["metadata"]["name"]].workload == ("Deployment", "web")
    web = inv.workloads[("default", "Deployment", "web")]
    assert web.synthesized and web.labels == {"app": "web"}  # pod-template-hash stripped
    assert by_name[orphan_pod["metadata"]["name"]].workload == ("Deployment", "cart")
    assert by_name["report-28570060-b4k7z"].workload == ("CronJob", "report")


def test_merge_keeps_the_ended_record(tmp_path: Path) -> None:
    alive = K.pod("a", ip="10.244.0.5", created="2024-05-01T10:00:00Z")
    gone = json.loads(json.dumps(alive))
    gone["metadata"]["deletionTimestamp"] = "2024-05-01T10:30:00Z"
    first = _write(tmp_path, "t1.json", [gone])
    second = _write(tmp_path, "t2.json", [alive])
    inv = load_inventory([first, second])
    (pod,) = inv.pods
    assert pod.ended == _t("2024-05-01T10:30:00Z")
    merged = Inventory().merge(load_inventory([BOOKINFO])).merge(inv)
    assert len(merged.pods) == 1 and ("default", "Deployment", "details-v1") in merged.workloads


def test_yaml_list_and_api_list_without_item_kinds(tmp_path: Path) -> None:
    yaml_list = tmp_path / "list.yaml"
    yaml_list.write_text(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ServiceAccount\n"
        "  metadata: {name: robot, namespace: ops}\n", encoding="utf-8")
    api_list = tmp_path / "pods.json"
    api_list.write_text(json.dumps({"kind": "PodList", "apiVersion": "v1", "items": [
        {k: v for k, v in K.pod("p", namespace="ops", ip="10.1.1.1").items()
         if k not in ("kind", "apiVersion")}]}), encoding="utf-8")
    inv = load_inventory([yaml_list, api_list])
    assert ("ops", "robot") in inv.service_accounts
    assert [p.key for p in inv.pods] == ["ops/p"]


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "kind": "List",\n  "items": [\n    {"kind": "Pod",,}\n  ]\n}\n',
                    encoding="utf-8")
    with pytest.raises(InventoryError, match="invalid JSON") as err:
        load_inventory([path])
    assert err.value.origin == f"{path}:4"
    assert isinstance(err.value.__cause__, ValueError)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: Service\nmetadata:\n  name: x\n  labels: [a\n---\n", encoding="utf-8")
    with pytest.raises(InventoryError, match="invalid YAML") as err:
        load_inventory([path])
    assert err.value.origin is not None and err.value.origin.startswith(f"{path}:")


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read") as err:
        load_inventory([tmp_path / "missing.json"])
    assert err.value.origin == str(tmp_path / "missing.json")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(InventoryError, match="no Kubernetes objects"):
        load_inventory([empty])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n", encoding="utf-8")
    with pytest.raises(InventoryError, match="expected a Kubernetes object"):
        load_inventory([scalar])


def test_broken_objects_are_counted_not_fatal(tmp_path: Path) -> None:
    good = K.pod("ok", ip="10.2.0.1")
    broken = K.pod("bad", ip="10.2.0.2")
    broken["metadata"]["creationTimestamp"] = "yesterday"
    nameless = {"apiVersion": "v1", "kind": "Service", "metadata": {}, "spec": {}}
    inv = load_inventory([_write(tmp_path, "mixed.json", [good, broken, nameless])])
    assert [p.name for p in inv.pods] == ["ok"]
    assert inv.stats.invalid == 2
    assert any("default/bad" in s and "yesterday" in s for s in inv.stats.samples)
