"""The inventory from the live Kubernetes API: the only module that imports ``kubernetes``.

Lists the same kinds as ``kubectl get namespaces,pods,services,serviceaccounts,replicasets,
deployments,statefulsets,daemonsets,jobs,cronjobs -A -o json`` page by page and feeds each object,
turned back into the API's JSON shape, through the offline converter in ``observe.inventory``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from observe.errors import InventoryError
from observe.inventory import Inventory

log = logging.getLogger(__name__)

#: Objects per list request.
PAGE_SIZE = 500
#: Times a list restarts from scratch after its continue token expired (410 Gone).
RELIST_ATTEMPTS = 3
#: (connect, read) timeouts in seconds for each request.
REQUEST_TIMEOUT = (10.0, 120.0)

#: (kind, API group/version, resource, cluster-wide list method, namespaced list method)
RESOURCES: tuple[tuple[str, str, str, str, str], ...] = (
    ("Namespace", "v1", "namespaces", "list_namespace", ""),
    ("Pod", "v1", "pods", "list_pod_for_all_namespaces", "list_namespaced_pod"),
    ("Service", "v1", "services", "list_service_for_all_namespaces", "list_namespaced_service"),
    ("ServiceAccount", "v1", "serviceaccounts", "list_service_account_for_all_namespaces",
     "list_namespaced_service_account"),
    ("ReplicaSet", "apps/v1", "replicasets", "list_replica_set_for_all_namespaces",
     "list_namespaced_replica_set"),
    ("Deployment", "apps/v1", "deployments", "list_deployment_for_all_namespaces",
     "list_namespaced_deployment"),
    ("StatefulSet", "apps/v1", "statefulsets", "list_stateful_set_for_all_namespaces",
     "list_namespaced_stateful_set"),
    ("DaemonSet", "apps/v1", "daemonsets", "list_daemon_set_for_all_namespaces",
     "list_namespaced_daemon_set"),
    ("Job", "batch/v1", "jobs", "list_job_for_all_namespaces", "list_namespaced_job"),
    ("CronJob", "batch/v1", "cronjobs", "list_cron_job_for_all_namespaces",
     "list_namespaced_cron_job"),
)

_RBAC_HINT = (
    "the identity needs get/list on namespaces, pods, services, serviceaccounts (core), "
    "replicasets, deployments, statefulsets, daemonsets (apps) and jobs, cronjobs (batch), "
    "cluster-wide or in each --namespace given"
)


def load_live_inventory(context: str | None = None, kubeconfig: str | None = None,
                        namespaces: list[str] | None = None) -> Inventory:
    """Read the inventory from the API server named by ``kubeconfig``/``context``.

    Without a kubeconfig path the in-cluster service account is used when running in a pod
    (``KUBERNETES_SERVICE_HOST`` set), else the default kubeconfig (``$KUBECONFIG``,
    ``~/.kube/config``). ``namespaces`` limits the listing to those namespaces.
    """
    api_client = _api_client(context, kubeconfig)
    server = str(api_client.configuration.host)
    inventory = Inventory()
    apis: dict[str, Any] = {
        "v1": k8s.CoreV1Api(api_client),
        "apps/v1": k8s.AppsV1Api(api_client),
        "batch/v1": k8s.BatchV1Api(api_client),
    }
    try:
        for kind, group, resource, all_method, ns_method in RESOURCES:
            api = apis[group]
            scopes: list[str | None] = (
                [None] if namespaces is None else [*sorted(set(namespaces))]
            )
            for ns in scopes:
                if kind == "Namespace" and ns is not None:
                    objects: list[dict[str, Any]] = [
                        _call(api_client, server, resource, ns, api.read_namespace, ns)
                    ]
                else:
                    method = getattr(api, all_method if ns is None else ns_method)
                    objects = _list_all(api_client, server, resource, ns, method)
                origin = f"{server}/{resource}" + (f"?namespace={ns}" if ns else "")
                for obj in objects:
                    inventory.add_object(obj, kind=kind, origin=origin)
                log.info("%s: %d %s", server, len(objects), resource)
    finally:
        api_client.close()
    return inventory


def _api_client(context: str | None, kubeconfig: str | None) -> k8s.ApiClient:
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = k8s.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)
            api_client = k8s.ApiClient(configuration)
        else:
            api_client = k8s_config.new_client_from_config(
                config_file=kubeconfig, context=context, persist_config=False
            )
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        raise InventoryError(
            f"cannot load Kubernetes client configuration: {_one_line(exc)}",
            origin=kubeconfig or "kubeconfig",
            hint="pass --kubeconfig/--context, or run in a pod with a service account",
        ) from exc
    # One retry is enough to ride over a blip; more only delays the unreachable-server error.
    api_client.configuration.retries = 1
    return api_client


def _list_all(api_client: k8s.ApiClient, server: str, resource: str, ns: str | None,
              method: Callable[..., Any]) -> list[dict[str, Any]]:
    """All objects of one list call, page by page; restart when the continue token expires."""
    args = () if ns is None else (ns,)
    for attempt in range(RELIST_ATTEMPTS):
        objects: list[dict[str, Any]] = []
        token: str | None = None
        try:
            while True:
                kwargs: dict[str, Any] = {"limit": PAGE_SIZE}
                if token:
                    kwargs["_continue"] = token
                page = _call(api_client, server, resource, ns, method, *args, **kwargs)
                objects.extend(page.get("items") or [])
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    return objects
        except _Expired:
            log.warning("%s: continue token for %s expired; listing again (attempt %d)",
                        server, resource, attempt + 2)
    raise InventoryError(
        f"listing {resource} kept failing: the continue token expired {RELIST_ATTEMPTS} times",
        origin=server, hint="the cluster changes faster than it can be listed; retry later",
    )


class _Expired(Exception):
    """A continue token expired (HTTP 410): the list must start over."""


def _call(api_client: k8s.ApiClient, server: str, resource: str, ns: str | None,
          method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    where = f"{resource}" + (f" in namespace {ns}" if ns else "")
    try:
        result = method(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as exc:
        if exc.status == 410 and kwargs.get("_continue"):
            raise _Expired() from exc
        raise _api_error(exc, server, where) from exc
    except urllib3.exceptions.HTTPError as exc:
        raise InventoryError(
            f"cannot reach the Kubernetes API server to list {where}: {_one_line(exc)}",
            origin=server, hint=f"is {server} reachable from here (VPN, context, port-forward)?",
        ) from exc
    except (ValueError, TypeError, AttributeError) as exc:
        # The client parses the body itself: broken JSON or objects of the wrong shape land here.
        raise InventoryError(
            f"malformed response listing {where}: {_one_line(exc)}", origin=server,
            hint="is this server a Kubernetes API server (not a proxy or login page)?",
        ) from exc
    data = api_client.sanitize_for_serialization(result)
    if not isinstance(data, dict):
        raise InventoryError(f"malformed response listing {where}: not an object",
                             origin=server)
    return data


def _api_error(exc: ApiException, server: str, where: str) -> InventoryError:
    status = exc.status or 0
    reason = _status_message(exc) or exc.reason or "error"
    if status in (401, 403):
        return InventoryError(
            f"{'unauthorized' if status == 401 else 'forbidden'} listing {where} "
            f"(HTTP {status}): {reason}",
            origin=server,
            hint=(_RBAC_HINT if status == 403
                  else "credentials were rejected: refresh the kubeconfig login/token"),
        )
    if status == 404:
        return InventoryError(f"not found listing {where} (HTTP 404): {reason}", origin=server,
                              hint="does the namespace exist, and does the server serve "
                                   "apps/v1 and batch/v1?")
    return InventoryError(f"API error listing {where} (HTTP {status}): {reason}",
                          origin=server, hint="retry later, or check the API server's health")


def _status_message(exc: ApiException) -> str | None:
    """The ``message`` of a ``kind: Status`` body, when the server sent one."""
    body = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body.strip().startswith("{"):
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return None
    message = status.get("message") if isinstance(status, dict) else None
    return _one_line(message) if message else None


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text[:300]


def iter_resources() -> Iterator[tuple[str, str, str]]:
    """(kind, group/version, resource) of everything listed, for RBAC documentation."""
    for kind, group, resource, _, _ in RESOURCES:
        yield kind, group, resource


#: Policy kinds ``meshwright check --from-cluster`` lists:
#: (kind, API group, version, resource). NetworkPolicy and Namespace are built-in.
POLICY_RESOURCES: tuple[tuple[str, str, str, str], ...] = (
    ("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies"),
    ("PeerAuthentication", "security.istio.io", "v1", "peerauthentications"),
    ("Server", "policy.linkerd.io", "v1beta3", "servers"),
    ("ServerAuthorization", "policy.linkerd.io", "v1beta1", "serverauthorizations"),
    ("AuthorizationPolicy", "policy.linkerd.io", "v1alpha1", "authorizationpolicies"),
    ("MeshTLSAuthentication", "policy.linkerd.io", "v1alpha1", "meshtlsauthentications"),
    ("NetworkAuthentication", "policy.linkerd.io", "v1alpha1", "networkauthentications"),
    ("HTTPRoute", "policy.linkerd.io", "v1beta3", "httproutes"),
    ("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
    ("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies"),
    ("Namespace", "", "v1", "namespaces"),
)


def load_live_policies(context: str | None = None, kubeconfig: str | None = None,
                       namespaces: list[str] | None = None
                       ) -> tuple[list[tuple[dict[str, Any], str]], list[str]]:
    """The policy objects of the live cluster (see :data:`POLICY_RESOURCES`), each with its
    origin (``<server>/<resource>``), and the resources the server does not serve (a CRD that
    is not installed: HTTP 404), which are skipped.

    Namespaces come along for their annotations (Linkerd's default inbound policy).
    """
    api_client = _api_client(context, kubeconfig)
    server = str(api_client.configuration.host)
    custom = k8s.CustomObjectsApi(api_client)
    networking = k8s.NetworkingV1Api(api_client)
    core = k8s.CoreV1Api(api_client)
    found: list[tuple[dict[str, Any], str]] = []
    missing: list[str] = []
    scopes: list[str | None] = [None] if namespaces is None else [*sorted(set(namespaces))]
    try:
        for kind, group, version, resource in POLICY_RESOURCES:
            api_version = f"{group}/{version}" if group else version
            for ns in scopes:
                method = _policy_lister(kind, group, version, resource, ns, custom, networking,
                                        core)
                try:
                    if kind == "Namespace" and ns is not None:
                        objects = [_call(api_client, server, resource, ns, core.read_namespace,
                                         ns)]
                    else:
                        objects = _list_all(api_client, server, f"{resource}.{group}".strip("."),
                                            None, method)
                except InventoryError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, ApiException) and cause.status == 404:
                        missing.append(f"{resource}.{api_version}")
                        break
                    raise
                origin = f"{server}/{resource}.{api_version}" + (f"?namespace={ns}" if ns else "")
                for obj in objects:
                    found.append(({**obj, "apiVersion": api_version, "kind": kind}, origin))
                log.info("%s: %d %s.%s", server, len(objects), resource, api_version)
    finally:
        api_client.close()
    return found, sorted(set(missing))


def _policy_lister(kind: str, group: str, version: str, resource: str, ns: str | None,
                   custom: Any, networking: Any, core: Any) -> Callable[..., Any]:
    if kind == "Namespace":
        return core.list_namespace
    if kind == "NetworkPolicy":
        if ns is None:
            return networking.list_network_policy_for_all_namespaces
        return lambda **kw: networking.list_namespaced_network_policy(ns, **kw)
    if ns is None:
        return lambda **kw: custom.list_cluster_custom_object(group, version, resource, **kw)
    return lambda **kw: custom.list_namespaced_custom_object(group, version, ns, resource, **kw)
