"""The inventory from the live Kubernetes API: the only module that imports ``kubernetes``.

Lists the same kinds as ``kubectl get namespaces,pods,services,serviceaccounts,replicasets,
deployments,statefulsets,daemonsets,jobs,cronjobs -A -o json`` page by page and feeds each object,
turned back into the API's JSON shape, through the offline converter in ``observe.inventory``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
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


# -- watch and log streams ---------------------------------------------------------------------
# Raw JSON over the ApiClient's own connection pool and auth: the generated watch helper retries
# on its own and deserializes into models; observe.watch needs the raw objects (the inventory's
# converter reads the API's JSON shape) and full control of resourceVersion and 410 handling.
# ``pods/log`` lacks ``sinceTime`` in the generated client, so it is built the same way.


class ApiUnavailable(InventoryError):
    """A transient failure: connection refused or dropped, a stream cut, HTTP 429/5xx. The
    caller reconnects after a back-off."""


class StreamIdle(ApiUnavailable):
    """No data within the read timeout (a quiet stream): reconnect, no back-off needed."""


class ResourceGone(InventoryError):
    """HTTP 410 (or a watch ``ERROR`` event with code 410): the resourceVersion is compacted
    away; list again."""


class NotFound(InventoryError):
    """HTTP 404: the pod (or the resource) does not exist (any more)."""


def resource_path(group: str, resource: str, namespace: str | None = None) -> str:
    """The list/watch path of ``resource`` (``v1`` is the core group)."""
    base = "/api/v1" if group == "v1" else f"/apis/{group}"
    return f"{base}/namespaces/{namespace}/{resource}" if namespace else f"{base}/{resource}"


class KubeApi:
    """Raw GET access to the API server for lists, watches and log streams.

    :meth:`interrupt` unblocks every read in progress (from another thread), for shutdown.
    """

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client
        self.server = str(api_client.configuration.host)
        self._open: set[Any] = set()
        #: Most responses (watches, log streams) ever open at once.
        self.peak_open = 0
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, context: str | None = None, kubeconfig: str | None = None) -> KubeApi:
        """A client from kubeconfig/context or the in-cluster service account (as
        :func:`load_live_inventory`)."""
        return cls(_api_client(context, kubeconfig))

    def close(self) -> None:
        self.interrupt()
        self.api_client.close()

    def interrupt(self) -> None:
        """Stop all reads in progress; later requests fail with :class:`ApiUnavailable`."""
        with self._lock:
            self._closed = True
            responses = list(self._open)
        for resp in responses:
            with contextlib.suppress(Exception):
                resp.shutdown()
            with contextlib.suppress(Exception):
                resp.release_conn()

    def get_json(self, path: str, query: list[tuple[str, Any]]) -> dict[str, Any]:
        """One GET answered with a JSON object (a list page)."""
        return self._json(self._request(path, query, REQUEST_TIMEOUT), path)

    def post_json(self, path: str, body: dict[str, Any], *,
                  timeout: tuple[float, float] = (5.0, 10.0)) -> dict[str, Any]:
        """One POST of a JSON object answered with a JSON object (a TokenReview).

        Raises :class:`ApiUnavailable` when the server cannot answer now (connection
        refused or cut, 429, 5xx), :class:`InventoryError` for the other errors (401/403:
        this identity may not create it)."""
        return self._json(self._request(path, [], timeout, method="POST", body=body), path)

    def _json(self, resp: Any, path: str) -> dict[str, Any]:
        """The JSON object a response holds (the response is released)."""
        try:
            body = resp.data
        except urllib3.exceptions.HTTPError as exc:
            raise ApiUnavailable(f"reading {path} failed: {_one_line(exc)}",
                                 origin=self.server) from exc
        finally:
            self._release(resp)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InventoryError(f"malformed response for {path}: {_one_line(exc)}",
                                 origin=self.server,
                                 hint="is this server a Kubernetes API server?") from exc
        if not isinstance(data, dict):
            raise InventoryError(f"malformed response for {path}: not an object",
                                 origin=self.server)
        return data

    def watch(self, path: str, resource_version: str, *, timeout_seconds: int,
              field_selector: str | None = None, bookmarks: bool = True
              ) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) from ``resource_version`` on; ends when the
        server closes the watch (``timeoutSeconds``). A 410 (HTTP or ``ERROR`` event) raises
        :class:`ResourceGone`; a dropped connection :class:`ApiUnavailable` (events complete
        before the drop were yielded; a half-sent event never is)."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"), ("resourceVersion", resource_version),
            ("timeoutSeconds", timeout_seconds),
        ]
        if bookmarks:
            query.append(("allowWatchBookmarks", "true"))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        read_timeout = float(timeout_seconds) + REQUEST_TIMEOUT[0]
        for line in self._lines(path, query, (REQUEST_TIMEOUT[0], read_timeout), partial=False):
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise ApiUnavailable(f"malformed watch event from {path}: {_one_line(exc)}",
                                     origin=self.server) from exc
            if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                raise ApiUnavailable(f"malformed watch event from {path}", origin=self.server)
            if event.get("type") == "ERROR":
                status = event["object"]
                message = _one_line(status.get("message") or status.get("reason") or "error")
                if status.get("code") == 410:
                    raise ResourceGone(f"watch {path}: {message}", origin=self.server)
                raise ApiUnavailable(f"watch {path} error {status.get('code')}: {message}",
                                     origin=self.server)
            yield event

    def follow_log(self, namespace: str, pod: str, container: str, *,
                   since_time: str | None, read_timeout: float) -> Iterator[bytes]:
        """Lines (without the newline) of ``pods/log?follow&timestamps[&sinceTime]``.

        A clean end (the container stopped) also yields a last line without newline; a
        stream cut mid-line raises :class:`ApiUnavailable` and the partial line is dropped
        (it comes again on reconnect). No data for ``read_timeout`` raises :class:`StreamIdle`.
        """
        query: list[tuple[str, Any]] = [("container", container), ("follow", "true"),
                                        ("timestamps", "true")]
        if since_time:
            query.append(("sinceTime", since_time))
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        yield from self._lines(path, query, (REQUEST_TIMEOUT[0], read_timeout), partial=True)

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, path: str, query: list[tuple[str, Any]],
                 timeout: tuple[float, float], *, method: str = "GET",
                 body: dict[str, Any] | None = None) -> Any:
        with self._lock:
            if self._closed:
                raise ApiUnavailable("client closed", origin=self.server)
        where = f"{method} {path}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            verb, url, headers, data, _ = self.api_client.param_serialize(
                method=method, resource_path=path, query_params=query, body=body,
                header_params=headers, auth_settings=["BearerToken"],
            )
            rest = self.api_client.call_api(verb, url, header_params=headers, body=data,
                                            _request_timeout=timeout)
        except ApiException as exc:
            raise self._classify(exc.status or 0, exc.body, where, exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiUnavailable(f"cannot reach the API server ({where}): {_one_line(exc)}",
                                 origin=self.server) from exc
        resp = rest.response
        if not 200 <= resp.status <= 299:
            try:
                body_bytes = resp.data
            except urllib3.exceptions.HTTPError:
                body_bytes = b""
            finally:
                resp.release_conn()
            raise self._classify(resp.status, body_bytes, where, None)
        with self._lock:
            self._open.add(resp)
            self.peak_open = max(self.peak_open, len(self._open))
        return resp

    def _release(self, resp: Any) -> None:
        with self._lock:
            self._open.discard(resp)
        with contextlib.suppress(Exception):
            resp.release_conn()

    def _lines(self, path: str, query: list[tuple[str, Any]], timeout: tuple[float, float],
               *, partial: bool) -> Iterator[bytes]:
        resp = self._request(path, query, timeout)
        rest = b""
        complete = False
        try:
            chunks = (resp.read_chunked(decode_content=True) if resp.chunked
                      else iter(lambda: resp.read1(65536), b""))
            for chunk in chunks:
                if not chunk:
                    continue
                data = rest + chunk
                start = 0
                while True:
                    nl = data.find(b"\n", start)
                    if nl < 0:
                        break
                    yield data[start:nl]
                    start = nl + 1
                rest = data[start:]
            complete = True
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise StreamIdle(f"no data from {path} within the read timeout",
                             origin=self.server) from exc
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ApiUnavailable(f"stream {path} cut: {_one_line(exc)}",
                                 origin=self.server) from exc
        finally:
            if not complete:
                # Left early (an error event, the caller stopped reading): the connection
                # holds unread data and must not go back to the pool.
                with contextlib.suppress(Exception):
                    resp.close()
            self._release(resp)
        with self._lock:
            interrupted = self._closed
        if interrupted:
            raise ApiUnavailable(f"stream {path} interrupted", origin=self.server)
        if rest and partial:
            yield rest

    def _classify(self, status: int, body: Any, where: str,
                  exc: ApiException | None) -> InventoryError:
        fake = exc or ApiException(status=status, reason="")
        if exc is None:
            fake.body = body
        message = _status_message(fake) or f"HTTP {status}"
        if status == 410:
            return ResourceGone(f"{where}: {message}", origin=self.server)
        if status == 404:
            return NotFound(f"{where}: {message}", origin=self.server)
        if status in (0, 429) or status >= 500:
            return ApiUnavailable(f"{where} (HTTP {status}): {message}", origin=self.server,
                                  hint="the API server is overloaded or restarting")
        if status == 400 and "/log" in where:
            # "container ... is waiting to start": the pod is not running yet.
            return ApiUnavailable(f"{where} (HTTP 400): {message}", origin=self.server)
        return _api_error(fake, self.server, where)
