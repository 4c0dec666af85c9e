"""observe.kube against a local HTTP server speaking the real list endpoints (no client mocks)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import k8s_fixtures as K
from support.kube_api import PATHS, FakeApiServer, _kubeconfig, _status

from observe.errors import InventoryError
from observe.kube import PAGE_SIZE, load_live_inventory


def _cluster() -> dict[str, list[dict[str, Any]]]:
    deploy = K.deployment("reviews-v1", {"app": "reviews", "version": "v1"},
                          service_account="bookinfo-reviews")
    rs = K.replicaset_for(deploy)
    # More pods than one page so pagination is exercised.
    pods = K.pods_for(deploy, [f"10.244.1.{i}" for i in range(1, PAGE_SIZE + 8)])
    sts_pod = K.pod("web-0", namespace="shop", ip="10.244.2.9", labels={"app": "web"},
                    owner=K.owner_ref("StatefulSet", "web"))
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet",
           "metadata": {"name": "web", "namespace": "shop", "uid": K.uid("sts/web")},
           "spec": {"selector": {"matchLabels": {"app": "web"}}, "serviceName": "web",
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}
    cron = {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "backup", "namespace": "shop", "uid": K.uid("cj/backup")},
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"labels": {"app": "backup"}},
                "spec": {"restartPolicy": "OnFailure",
                         "containers": [{"name": "b", "image": "busybox"}]}}}}}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "backup-28570000", "namespace": "shop", "uid": K.uid("job/b"),
                        "ownerReferences": [K.owner_ref("CronJob", "backup", "batch/v1")]},
           "spec": {"template": {"metadata": {"labels": {"app": "backup"}},
                                 "spec": {"restartPolicy": "OnFailure",
                                          "containers": [{"name": "b", "image": "busybox"}]}}}}
    return {
        "/api/v1/namespaces": [
            {"metadata": {"name": "default", "labels": {"istio-injection": "enabled"}}},
            {"metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}},
        ],
        "/api/v1/pods": [*pods, sts_pod],
        "/api/v1/services": [K.service("reviews", {"app": "reviews"},
                                       [{"name": "http", "port": 9080, "protocol": "TCP",
                                         "targetPort": "http"}], cluster_ip="10.96.0.20")],
        "/api/v1/serviceaccounts": [{"metadata": {"name": "bookinfo-reviews",
                                                  "namespace": "default"}}],
        "/apis/apps/v1/replicasets": [rs],
        "/apis/apps/v1/deployments": [deploy],
        "/apis/apps/v1/statefulsets": [sts],
        "/apis/apps/v1/daemonsets": [],
        "/apis/batch/v1/jobs": [job],
        "/apis/batch/v1/cronjobs": [cron],
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(_cluster()) as server:
        yield server


def test_lists_every_kind_with_pagination(api: FakeApiServer, tmp_path: Path) -> None:
    inv = load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))
    assert len(inv.pods) == PAGE_SIZE + 8
    reviews = [p for p in inv.pods if p.namespace == "default"]
    assert {p.workload for p in reviews} == {("Deployment", "reviews-v1")}
    web = next(p for p in inv.pods if p.name == "web-0")
    assert web.workload == ("StatefulSet", "web") and web.ips == ("10.244.2.9",)
    assert ("shop", "CronJob", "backup") in inv.workloads
    assert ("shop", "Job", "backup-28570000") not in inv.workloads
    assert inv.namespaces["default"] == {"istio-injection": "enabled"}
    assert ("default", "bookinfo-reviews") in inv.service_accounts
    svc = inv.services[("default", "reviews")]
    assert inv.resolve_target_port(svc, 9080) == 8080  # named "http" via the pods' ports
    # pagination: the pod list took two pages, the second with the continue token
    pod_requests = [q for path, q, _ in api.requests if path == "/api/v1/pods"]
    assert [q.get("continue") for q in pod_requests] == [None, [str(PAGE_SIZE)]]
    assert all(q["limit"] == [str(PAGE_SIZE)] for q in pod_requests)
    assert {auth for _, _, auth in api.requests} == {"Bearer s3cret-token"}
    for path in PATHS:
        assert any(p == path for p, _, _ in api.requests), path


def test_namespaced_listing(api: FakeApiServer, tmp_path: Path) -> None:
    inv = load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url), namespaces=["shop"])
    assert [p.name for p in inv.pods] == ["web-0"]
    assert set(inv.namespaces) == {"shop"}
    paths = {p for p, _, _ in api.requests}
    assert "/api/v1/namespaces/shop/pods" in paths and "/api/v1/pods" not in paths
    assert "/api/v1/namespaces/shop" in paths


def test_missing_namespace_is_an_error(api: FakeApiServer, tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="not found") as err:
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url), namespaces=["nope"])
    assert err.value.origin == api.url


def test_forbidden_names_rbac(api: FakeApiServer, tmp_path: Path) -> None:
    api.failures["/api/v1/pods"] = [(403, _status(
        403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:default:x" cannot '
        'list resource "pods" in API group "" at the cluster scope'))]
    with pytest.raises(InventoryError) as err:
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))
    assert "forbidden listing pods (HTTP 403)" in str(err.value)
    assert "cannot list resource" in err.value.message
    assert err.value.hint is not None and "list" in err.value.hint
    assert "pods" in err.value.hint and "cronjobs" in err.value.hint
    assert isinstance(err.value.__cause__, Exception)


def test_unauthorized(api: FakeApiServer, tmp_path: Path) -> None:
    api.failures["/api/v1/namespaces"] = [(401, _status(401, "Unauthorized", "Unauthorized"))]
    with pytest.raises(InventoryError, match="unauthorized") as err:
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))
    assert err.value.hint is not None and "credentials" in err.value.hint


def test_server_error(api: FakeApiServer, tmp_path: Path) -> None:
    # Two 500s: the client retries once at most, so the error must surface.
    api.failures["/apis/apps/v1/deployments"] = [(500, b"internal error")] * 3
    with pytest.raises(InventoryError, match=r"HTTP 500") as err:
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))
    assert "deployments" in err.value.message


def test_expired_continue_token_relists(api: FakeApiServer, tmp_path: Path) -> None:
    api.expire_continue.add("/api/v1/pods")
    inv = load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))
    assert len(inv.pods) == PAGE_SIZE + 8  # no duplicates from the abandoned first pass
    pod_requests = [q.get("continue") for p, q, _ in api.requests if p == "/api/v1/pods"]
    assert pod_requests == [None, [str(PAGE_SIZE)], None, [str(PAGE_SIZE)]]


def test_malformed_json(api: FakeApiServer, tmp_path: Path) -> None:
    api.failures["/api/v1/services"] = [(200, b'{"kind": "ServiceList", "items": [')]
    with pytest.raises(InventoryError, match="malformed response listing services"):
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, api.url))


def test_connection_refused_names_server(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(InventoryError, match="cannot reach") as err:
        load_live_inventory(kubeconfig=_kubeconfig(tmp_path, url))
    assert err.value.origin == url
    assert err.value.hint is not None and url in err.value.hint


def test_bad_kubeconfig(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\ncontexts: []\n", encoding="utf-8")
    with pytest.raises(InventoryError, match="configuration") as err:
        load_live_inventory(kubeconfig=str(path), context="missing")
    assert err.value.origin == str(path)
