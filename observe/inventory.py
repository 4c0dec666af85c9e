"""The cluster inventory: pods (with lifetimes), workloads, services, service accounts.

Loaded from ``kubectl get namespaces,pods,services,serviceaccounts,replicasets,deployments,
statefulsets,daemonsets,jobs,cronjobs -A -o json`` dumps (``kind: List``), several of them merged,
or from YAML manifests (multi-document, ``kind: List`` too). Manifests carry workloads but no
pods; they still give labels, service accounts, services and ports. ``observe.kube`` feeds the
same converter from the live API.

Raw objects are converted one by one into small records and dropped, so a large dump costs the
records, not the JSON tree, once parsing is done. Owner chains (Pod -> ReplicaSet -> Deployment,
Pod -> Job -> CronJob) are resolved after all inputs are read, because a dump may list pods
before their owners and the owners may sit in another file.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from observe.errors import InventoryError

log = logging.getLogger(__name__)

#: Kinds the loader converts; anything else is counted in ``Inventory.ignored``.
KNOWN_KINDS = (
    "Namespace", "Pod", "Service", "ServiceAccount", "ReplicaSet", "Deployment",
    "StatefulSet", "DaemonSet", "Job", "CronJob",
)
#: Kinds that are a pod's top workload when nothing owns them.
TOP_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job", "ReplicaSet", "Pod")
#: Containers that are a mesh proxy, not the application.
PROXY_CONTAINERS = frozenset({"istio-proxy", "linkerd-proxy"})
#: Invalid-object samples kept for the report.
MAX_SAMPLES = 20

# Deployment pod-template-hash / ReplicaSet suffix (k8s SafeEncodeString alphabet).
_HASH = r"[bcdfghjklmnpqrstvwxz2456789]"
_RS_SUFFIX = re.compile(rf"^(?P<base>.+)-{_HASH}{{6,10}}$")
_CRONJOB_JOB = re.compile(r"^(?P<base>.+)-\d{8,10}$")


@dataclass(frozen=True)
class HttpProbe:
    """An HTTP liveness/readiness/startup probe of an application container."""

    container: str
    """Container the probe checks."""
    port: int | str
    """Probe port: a number, or a container port name that could not be resolved."""
    path: str
    """Request path the kubelet sends."""
    kind: str
    """``liveness`` | ``readiness`` | ``startup``."""


@dataclass(frozen=True)
class ContainerPort:
    """One declared container port (used to resolve named targetPorts)."""

    container: str
    """Container declaring it."""
    name: str | None
    """Port name (``http``, ``grpc``...), None when unnamed."""
    port: int
    """containerPort."""
    protocol: str
    """``TCP`` | ``UDP`` | ``SCTP``."""


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service."""

    name: str | None
    """Port name; None for a single unnamed port."""
    port: int
    """The port clients dial on the ClusterIP."""
    target_port: int | str | None
    """Pod port: number, container port name, or None (defaults to ``port``)."""
    protocol: str
    """``TCP`` | ``UDP`` | ``SCTP``."""
    app_protocol: str | None
    """``appProtocol`` when set (``http``, ``grpc``, ``kubernetes.io/h2c``...)."""


@dataclass
class PodRecord:
    """One pod incarnation (a recreated StatefulSet pod with a new uid is another record)."""

    namespace: str
    """Namespace."""
    name: str
    """Pod name."""
    uid: str | None
    """metadata.uid; None in manifests."""
    ips: tuple[str, ...]
    """status.podIPs (falls back to status.podIP); the node's address for host-network pods."""
    host_network: bool
    """spec.hostNetwork: the pod shares its node's address."""
    node: str | None
    """spec.nodeName."""
    host_ip: str | None
    """status.hostIP: the node's address."""
    labels: dict[str, str]
    """metadata.labels."""
    service_account: str | None
    """spec.serviceAccountName (None when unset: the API then uses 'default')."""
    owner: tuple[str, str] | None
    """Direct controller ownerReference (kind, name); None for a bare pod."""
    workload: tuple[str, str]
    """Top workload (kind, name) after owner-chain resolution; (Pod, name) for a bare pod."""
    created: datetime | None
    """metadata.creationTimestamp."""
    started: datetime | None
    """status.startTime (the kubelet acknowledged the pod; its IP exists from about here)."""
    ended: datetime | None
    """deletionTimestamp, or the last container finishedAt of a Succeeded/Failed pod."""
    phase: str | None
    """status.phase."""
    containers: tuple[str, ...]
    """Names of spec.containers, then spec.initContainers."""
    meshed: bool
    """Carries istio-proxy (container or native-sidecar init container) or linkerd-proxy."""
    probes: tuple[HttpProbe, ...]
    """HTTP probes of the application containers (Istio-rewritten probes mapped back)."""
    ports: tuple[ContainerPort, ...]
    """Declared container ports of all containers."""

    @property
    def key(self) -> str:
        """``<ns>/<pod>``, the form of the flow record's ``reporter`` column."""
        return f"{self.namespace}/{self.name}"


@dataclass
class WorkloadRecord:
    """A controller object (or its pod template) that owns pods."""

    namespace: str
    """Namespace."""
    kind: str
    """``Deployment`` | ``StatefulSet`` | ``DaemonSet`` | ``CronJob`` | ``Job`` | ``ReplicaSet``
    | ``Pod``."""
    name: str
    """Object name."""
    labels: dict[str, str]
    """Pod template labels (for a bare Pod: its own labels)."""
    service_account: str | None
    """Pod template serviceAccountName; None when unset ('default')."""
    selector: dict[str, str]
    """spec.selector.matchLabels (empty for CronJob/bare Pod)."""
    meshed: bool | None
    """True: injected or opted in; False: opted out or pods run without a proxy; None: unknown."""
    probes: tuple[HttpProbe, ...]
    """HTTP probes of the template's application containers."""
    ports: tuple[ContainerPort, ...]
    """Declared container ports of the template."""
    owner: tuple[str, str] | None = None
    """Controller ownerReference (kind, name) for a ReplicaSet/Job, else None."""
    synthesized: bool = False
    """True when the object itself was absent and was derived from an owned object."""

    @property
    def key(self) -> tuple[str, str, str]:
        """(namespace, kind, name)."""
        return (self.namespace, self.kind, self.name)

    @property
    def id(self) -> str:
        """``<ns>/<name>``: the graph's node id for this workload."""
        return f"{self.namespace}/{self.name}"


@dataclass
class ServiceRecord:
    """A Service."""

    namespace: str
    """Namespace."""
    name: str
    """Service name."""
    cluster_ips: tuple[str, ...]
    """spec.clusterIPs (or clusterIP); empty for headless/ExternalName."""
    type: str
    """``ClusterIP`` | ``NodePort`` | ``LoadBalancer`` | ``ExternalName``."""
    selector: dict[str, str]
    """spec.selector; empty when endpoints are managed by hand."""
    ports: tuple[ServicePort, ...]
    """spec.ports."""
    external_name: str | None = None
    """spec.externalName for ExternalName services."""

    @property
    def id(self) -> str:
        """``<ns>/<name>``."""
        return f"{self.namespace}/{self.name}"


@dataclass
class LoadStats:
    """What the loader saw and did not use."""

    objects: int = 0
    """Objects converted."""
    ignored: Counter[str] = field(default_factory=Counter)
    """Objects of kinds the inventory does not use, by kind."""
    invalid: int = 0
    """Objects of known kinds too broken to convert."""
    samples: list[str] = field(default_factory=list)
    """A few ``file: reason`` samples of invalid objects."""

    def merge(self, other: LoadStats) -> None:
        self.objects += other.objects
        self.ignored.update(other.ignored)
        self.invalid += other.invalid
        self.samples = (self.samples + other.samples)[:MAX_SAMPLES]


class Inventory:
    """Pods, workloads, services, namespaces and service accounts of one or more snapshots."""

    def __init__(self) -> None:
        self._pods: dict[str, PodRecord] = {}
        self._objects: dict[tuple[str, str, str], WorkloadRecord] = {}
        self.services: dict[tuple[str, str], ServiceRecord] = {}
        """Services by (namespace, name)."""
        self.namespaces: dict[str, dict[str, str]] = {}
        """Namespace name -> labels."""
        self.service_accounts: set[tuple[str, str]] = set()
        """(namespace, name) of every ServiceAccount seen."""
        self.snapshot_time: datetime | None = None
        """Latest timestamp seen in any object: the end of open-ended lifetimes."""
        self.stats = LoadStats()
        """Counts of converted, ignored and invalid objects."""
        self._workloads: dict[tuple[str, str, str], WorkloadRecord] | None = None
        self._pods_by_workload: dict[tuple[str, str, str], list[PodRecord]] = {}

    # -- collections -----------------------------------------------------------------------
    @property
    def pods(self) -> list[PodRecord]:
        """All pod records, sorted by (namespace, name, created)."""
        self._finalize()
        return sorted(self._pods.values(), key=_pod_sort_key)

    @property
    def workloads(self) -> dict[tuple[str, str, str], WorkloadRecord]:
        """Top workloads by (namespace, kind, name), including bare pods as kind ``Pod``."""
        return self._finalize()

    # -- building --------------------------------------------------------------------------
    def add_object(self, obj: Mapping[str, Any], *, kind: str | None = None,
                   origin: str = "<inventory>") -> None:
        """Convert one API object (``kind`` overrides a missing ``obj['kind']``)."""
        kind = obj.get("kind") or kind
        if kind not in KNOWN_KINDS:
            self.stats.ignored[str(kind)] += 1
            return
        try:
            self._convert(kind, obj)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.stats.invalid += 1
            if len(self.stats.samples) < MAX_SAMPLES:
                name = _safe_name(obj)
                self.stats.samples.append(f"{origin}: {kind} {name}: {type(exc).__name__}: {exc}")
            log.debug("invalid %s object in %s", kind, origin, exc_info=True)
            return
        self.stats.objects += 1
        self._workloads = None

    def merge(self, other: Inventory) -> Inventory:
        """Fold ``other`` into this inventory (in place) and return it.

        The same pod (same uid) seen in two snapshots keeps the more complete record: the one
        that ended, else the one with addresses, else ``other``'s.
        """
        for pod_key, pod in other._pods.items():
            self._put_pod(pod_key, pod)
        for key, obj in other._objects.items():
            if key not in self._objects or self._objects[key].synthesized:
                self._objects[key] = obj
        self.services.update(other.services)
        for ns, labels in other.namespaces.items():
            self.namespaces[ns] = {**self.namespaces.get(ns, {}), **labels}
        self.service_accounts |= other.service_accounts
        self._see(other.snapshot_time)
        self.stats.merge(other.stats)
        self._workloads = None
        return self

    # -- queries ---------------------------------------------------------------------------
    def workload_of(self, pod: PodRecord) -> WorkloadRecord | None:
        """The pod's top workload record."""
        return self._finalize().get((pod.namespace, *pod.workload))

    def pods_of(self, workload: WorkloadRecord) -> list[PodRecord]:
        """Pods whose owner chain ends at ``workload``, sorted."""
        self._finalize()
        return sorted(self._pods_by_workload.get(workload.key, []), key=_pod_sort_key)

    def services_selecting(self, workload: WorkloadRecord) -> list[ServiceRecord]:
        """Services in the workload's namespace whose selector matches its pods, sorted."""
        label_sets = [workload.labels] + [p.labels for p in self.pods_of(workload)]
        found = []
        for (ns, _), svc in sorted(self.services.items()):
            if ns != workload.namespace or not svc.selector:
                continue
            if any(_selects(svc.selector, labels) for labels in label_sets if labels):
                found.append(svc)
        return found

    def workloads_behind(self, service: ServiceRecord) -> list[WorkloadRecord]:
        """Workloads (sorted by key) whose pods the Service selects."""
        if not service.selector:
            return []
        found = []
        for wkey, wl in sorted(self._finalize().items()):
            if wkey[0] != service.namespace:
                continue
            labels = [wl.labels] + [p.labels for p in self._pods_by_workload.get(wkey, [])]
            if any(_selects(service.selector, lab) for lab in labels if lab):
                found.append(wl)
        return found

    def resolve_target_port(self, service: ServiceRecord, port: int) -> int | None:
        """The pod port behind ``service``'s ``port``; None if the port or its name is unknown.

        A missing targetPort means the same number; a named one is looked up in the
        containerPorts of the backing pods, then of the backing pod templates.
        """
        sport = next((p for p in service.ports if p.port == port), None)
        if sport is None:
            return None
        target = sport.target_port
        if target is None:
            return sport.port
        if isinstance(target, int):
            return target
        if target.isdigit():
            return int(target)
        numbers: set[int] = set()
        for wl in self.workloads_behind(service):
            sources = [p.ports for p in self._pods_by_workload.get(wl.key, [])] or [wl.ports]
            for ports in sources:
                numbers.update(
                    cp.port for cp in ports if cp.name == target and cp.protocol == sport.protocol
                )
        if len(numbers) == 1:
            return numbers.pop()
        if numbers:
            log.debug("service %s port %s: name %r maps to several ports %s",
                      service.id, port, target, sorted(numbers))
        return None

    # -- conversion ------------------------------------------------------------------------
    def _convert(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = meta["name"]
        if not isinstance(name, str) or not name:
            raise ValueError("metadata.name missing")
        ns = meta.get("namespace") or "default"
        self._see(_time(meta.get("creationTimestamp")))
        self._see(_time(meta.get("deletionTimestamp")))
        spec = obj.get("spec") or {}
        if kind == "Namespace":
            self.namespaces[name] = _str_map(meta.get("labels"))
        elif kind == "ServiceAccount":
            self.service_accounts.add((ns, name))
        elif kind == "Service":
            self.services[(ns, name)] = _service(ns, name, spec)
        elif kind == "Pod":
            pod = _pod(ns, name, meta, spec, obj.get("status") or {})
            for t in (pod.started, pod.ended):
                self._see(t)
            self._put_pod(pod.uid or pod.key, pod)
        else:
            template = (
                ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
                if kind == "CronJob" else spec.get("template")
            ) or {}
            tmeta = template.get("metadata") or {}
            tspec = template.get("spec") or {}
            labels = _str_map(tmeta.get("labels"))
            annotations = _str_map(tmeta.get("annotations"))
            probes, ports = _probes_and_ports(tspec)
            selector = _str_map((spec.get("selector") or {}).get("matchLabels"))
            wl = WorkloadRecord(
                namespace=ns, kind=kind, name=name, labels=labels,
                service_account=tspec.get("serviceAccountName") or tspec.get("serviceAccount"),
                selector=selector, meshed=_template_meshed(tspec, labels, annotations),
                probes=probes, ports=ports, owner=_controller(meta),
            )
            self._objects[wl.key] = wl
            self.namespaces.setdefault(ns, {})
        if kind != "Namespace":
            self.namespaces.setdefault(ns, {})

    def _put_pod(self, key: str, pod: PodRecord) -> None:
        old = self._pods.get(key)
        if old is not None and ((old.ended and not pod.ended) or (old.ips and not pod.ips)):
            return
        self._pods[key] = pod
        self._workloads = None

    def _see(self, t: datetime | None) -> None:
        if t is not None and (self.snapshot_time is None or t > self.snapshot_time):
            self.snapshot_time = t

    # -- owner chains ----------------------------------------------------------------------
    def _finalize(self) -> dict[tuple[str, str, str], WorkloadRecord]:
        """Resolve owner chains and build the top-workload index (cached until changed)."""
        if self._workloads is not None:
            return self._workloads
        objects = dict(self._objects)
        # A ReplicaSet/Job whose owner object is absent still names it: synthesize the owner
        # from the owned object's template so the pods land on the real top workload.
        for obj in list(objects.values()):
            if obj.owner and obj.owner[0] in TOP_KINDS:
                okey = (obj.namespace, *obj.owner)
                if okey not in objects:
                    objects[okey] = WorkloadRecord(
                        namespace=obj.namespace, kind=obj.owner[0], name=obj.owner[1],
                        labels=_strip_generated(obj.labels), service_account=obj.service_account,
                        selector=_strip_generated(obj.selector), meshed=obj.meshed,
                        probes=obj.probes, ports=obj.ports, synthesized=True,
                    )
        self._objects.update({k: v for k, v in objects.items() if k not in self._objects})
        workloads: dict[tuple[str, str, str], WorkloadRecord] = {}
        for key, obj in objects.items():
            if not (obj.owner and (obj.namespace, *obj.owner) in objects):
                workloads[key] = obj
        by_wl: dict[tuple[str, str, str], list[PodRecord]] = {}
        for pod in self._pods.values():
            pod.workload = self._top(pod, objects)
            wkey = (pod.namespace, *pod.workload)
            if wkey not in workloads:
                workloads[wkey] = _workload_from_pod(pod, *pod.workload)
            by_wl.setdefault(wkey, []).append(pod)
        for key, wl in workloads.items():
            pods = by_wl.get(key)
            if pods:
                # Injection happens at pod admission: the pods, not the template, tell.
                wl.meshed = any(p.meshed for p in pods)
            elif wl.meshed is None:
                wl.meshed = _namespace_injects(self.namespaces.get(wl.namespace, {}))
        self._workloads = workloads
        self._pods_by_workload = by_wl
        return workloads

    def _top(self, pod: PodRecord,
             objects: Mapping[tuple[str, str, str], WorkloadRecord]) -> tuple[str, str]:
        if pod.owner is None:
            return ("Pod", pod.name)
        current = pod.owner
        for _ in range(8):  # owner chains are short; the bound guards against cycles
            obj = objects.get((pod.namespace, *current))
            if obj is None:
                return _guess_owner(pod, current, objects)
            if obj.owner is None or obj.owner[0] not in TOP_KINDS:
                return current
            current = obj.owner
        return current


def _guess_owner(pod: PodRecord, owner: tuple[str, str],
                 objects: Mapping[tuple[str, str, str], WorkloadRecord]) -> tuple[str, str]:
    """Top workload of a pod whose direct owner object is missing, from naming conventions."""
    kind, name = owner
    ns = pod.namespace
    if kind == "ReplicaSet":
        template_hash = pod.labels.get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash):
            return ("Deployment", name[: -len(template_hash) - 1])
        m = _RS_SUFFIX.match(name)
        if m and (ns, "Deployment", m["base"]) in objects:
            return ("Deployment", m["base"])
    if kind == "Job":
        m = _CRONJOB_JOB.match(name)
        if m and (ns, "CronJob", m["base"]) in objects:
            return ("CronJob", m["base"])
    return owner


# -- object converters ---------------------------------------------------------------------


def _pod(ns: str, name: str, meta: Mapping[str, Any], spec: Mapping[str, Any],
         status: Mapping[str, Any]) -> PodRecord:
    ips = tuple(
        str(entry["ip"]) for entry in status.get("podIPs") or [] if entry and entry.get("ip")
    )
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    phase = status.get("phase")
    ended = _time(meta.get("deletionTimestamp"))
    if ended is None and phase in ("Succeeded", "Failed"):
        ended = _last_finished(status)
    annotations = _str_map(meta.get("annotations"))
    labels = _str_map(meta.get("labels"))
    containers = [c.get("name") for c in spec.get("containers") or []]
    inits = [c.get("name") for c in spec.get("initContainers") or []]
    probes, ports = _probes_and_ports(spec)
    return PodRecord(
        namespace=ns, name=name, uid=meta.get("uid"), ips=ips,
        host_network=bool(spec.get("hostNetwork")), node=spec.get("nodeName"),
        host_ip=status.get("hostIP"), labels=labels,
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount"),
        owner=_controller(meta), workload=("Pod", name),
        created=_time(meta.get("creationTimestamp")), started=_time(status.get("startTime")),
        ended=ended, phase=phase,
        containers=tuple(str(c) for c in containers + inits if c),
        meshed=bool(PROXY_CONTAINERS & {*containers, *inits})
        or "sidecar.istio.io/status" in annotations,
        probes=probes, ports=ports,
    )


def _last_finished(status: Mapping[str, Any]) -> datetime | None:
    finished = []
    for key in ("containerStatuses", "initContainerStatuses"):
        for cs in status.get(key) or []:
            term = ((cs or {}).get("state") or {}).get("terminated") or {}
            t = _time(term.get("finishedAt"))
            if t is not None:
                finished.append(t)
    return max(finished) if finished else None


def _service(ns: str, name: str, spec: Mapping[str, Any]) -> ServiceRecord:
    ips = [str(ip) for ip in spec.get("clusterIPs") or [] if ip]
    if not ips and spec.get("clusterIP"):
        ips = [str(spec["clusterIP"])]
    ports = []
    for p in spec.get("ports") or []:
        target = p.get("targetPort")
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(ServicePort(
            name=p.get("name"), port=int(p["port"]), target_port=target,
            protocol=p.get("protocol") or "TCP", app_protocol=p.get("appProtocol"),
        ))
    return ServiceRecord(
        namespace=ns, name=name, cluster_ips=tuple(ip for ip in ips if ip != "None"),
        type=spec.get("type") or "ClusterIP", selector=_str_map(spec.get("selector")),
        ports=tuple(ports), external_name=spec.get("externalName"),
    )


def _probes_and_ports(spec: Mapping[str, Any]) -> tuple[tuple[HttpProbe, ...],
                                                        tuple[ContainerPort, ...]]:
    containers = list(spec.get("containers") or [])
    # Native sidecars (restartPolicy Always init containers) run alongside the app.
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    ports: list[ContainerPort] = []
    for c in containers + list(spec.get("initContainers") or []):
        for p in c.get("ports") or []:
            ports.append(ContainerPort(
                container=str(c.get("name")), name=p.get("name"), port=int(p["containerPort"]),
                protocol=p.get("protocol") or "TCP",
            ))
    rewritten = _istio_app_probers(containers + sidecars)
    probes: list[HttpProbe] = []
    for c in containers + sidecars:
        cname = str(c.get("name"))
        if cname in PROXY_CONTAINERS:
            continue
        for kind in ("liveness", "readiness", "startup"):
            http = ((c.get(kind + "Probe") or {}).get("httpGet")) or None
            if not http or http.get("port") is None:
                continue
            port, path = http["port"], http.get("path") or "/"
            original = rewritten.get(path)
            if original is not None:  # sidecar.istio.io/rewriteAppHTTPProbers moved it to :15020
                port, path = original.get("port", port), original.get("path") or "/"
            probes.append(HttpProbe(cname, _port_number(port, cname, ports), str(path), kind))
    return tuple(probes), tuple(ports)


def _istio_app_probers(containers: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Istio's ISTIO_KUBE_APP_PROBERS: rewritten probe path -> the app's original httpGet."""
    for c in containers:
        if c.get("name") != "istio-proxy":
            continue
        for env in c.get("env") or []:
            if env.get("name") == "ISTIO_KUBE_APP_PROBERS" and env.get("value"):
                try:
                    data = orjson.loads(env["value"])
                except orjson.JSONDecodeError:
                    return {}
                return {
                    path: (v or {}).get("httpGet") or {}
                    for path, v in data.items() if isinstance(v, dict)
                }
    return {}


def _port_number(port: Any, container: str, ports: Sequence[ContainerPort]) -> int | str:
    if isinstance(port, int):
        return port
    text = str(port)
    if text.isdigit():
        return int(text)
    for cp in ports:
        if cp.container == container and cp.name == text:
            return cp.port
    return text


def _template_meshed(spec: Mapping[str, Any], labels: Mapping[str, str],
                     annotations: Mapping[str, str]) -> bool | None:
    all_containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    names = {c.get("name") for c in all_containers}
    if PROXY_CONTAINERS & names or "sidecar.istio.io/status" in annotations:
        return True
    inject = labels.get("sidecar.istio.io/inject") or annotations.get("sidecar.istio.io/inject")
    if inject is not None:
        return inject.lower() == "true"
    linkerd = annotations.get("linkerd.io/inject")
    if linkerd is not None:
        return linkerd in ("enabled", "ingress")
    return None


def _namespace_injects(labels: Mapping[str, str]) -> bool | None:
    if labels.get("istio-injection") == "enabled" or "istio.io/rev" in labels:
        return True
    if labels.get("istio-injection") == "disabled":
        return False
    return None


def _workload_from_pod(pod: PodRecord, kind: str, name: str) -> WorkloadRecord:
    """A workload known only through its pods (bare pod, or owner absent from the dump)."""
    labels = pod.labels if kind == "Pod" else _strip_generated(pod.labels)
    return WorkloadRecord(
        namespace=pod.namespace, kind=kind, name=name, labels=dict(labels),
        service_account=pod.service_account, selector={}, meshed=pod.meshed,
        probes=pod.probes, ports=pod.ports, synthesized=kind != "Pod",
    )


#: Labels controllers add per pod or per revision; never part of a workload's identity.
GENERATED_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index", "batch.kubernetes.io/controller-uid", "controller-uid",
    "batch.kubernetes.io/job-name", "job-name", "pod-template-generation",
    "batch.kubernetes.io/job-completion-index",
})


def _strip_generated(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k not in GENERATED_LABELS}


def _controller(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    refs = meta.get("ownerReferences") or []
    chosen = next((r for r in refs if r and r.get("controller")), None)
    if chosen is None and len(refs) == 1:
        chosen = refs[0]
    if not chosen or not chosen.get("kind") or not chosen.get("name"):
        return None
    return (str(chosen["kind"]), str(chosen["name"]))


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _str_map(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a map, got {type(value).__name__}")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _time(value: Any) -> datetime | None:
    """RFC 3339 text (or a datetime YAML already parsed) as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"bad timestamp {value!r}") from exc
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _safe_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
    return "?"


def _pod_sort_key(pod: PodRecord) -> tuple[str, str, datetime, str]:
    return (pod.namespace, pod.name, pod.created or datetime.min.replace(tzinfo=UTC),
            pod.uid or "")


# -- files -----------------------------------------------------------------------------------


def load_inventory(paths: Sequence[Path]) -> Inventory:
    """Read and merge inventory files (kubectl JSON Lists/objects, YAML manifests)."""
    inventory = Inventory()
    for path in paths:
        inventory.merge(load_inventory_file(path))
    return inventory


def load_inventory_file(path: Path) -> Inventory:
    """One inventory file; raises :class:`InventoryError` naming the file (and line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InventoryError(f"cannot read inventory: {exc.strerror or exc}",
                             origin=str(path)) from exc
    inventory = Inventory()
    found = 0
    for obj, origin in _documents(data, str(path)):
        for item, kind_hint in _items(obj, origin):
            found += 1
            inventory.add_object(item, kind=kind_hint, origin=origin)
    if found == 0:
        raise InventoryError("no Kubernetes objects found", origin=str(path),
                             hint="expected `kubectl get ... -o json` output or YAML manifests")
    log.info("inventory %s: %d objects, %d ignored, %d invalid", path,
             inventory.stats.objects, sum(inventory.stats.ignored.values()),
             inventory.stats.invalid)
    return inventory


def _documents(data: bytes, name: str) -> Iterator[tuple[Any, str]]:
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            yield orjson.loads(data), name
        except orjson.JSONDecodeError as exc:
            raise InventoryError(f"invalid JSON: {exc.msg}", origin=f"{name}:{exc.lineno}",
                                 hint="expected `kubectl get ... -o json` output") from exc
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError("not UTF-8 text", origin=name) from exc
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        for doc in yaml.load_all(text, Loader=loader):
            if doc is not None:
                yield doc, name
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        origin = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InventoryError(f"invalid YAML: {problem}", origin=origin) from exc


def _items(obj: Any, origin: str) -> Iterator[tuple[Mapping[str, Any], str | None]]:
    """Objects of a document: a single object, a ``List``/``<Kind>List``, or a JSON array."""
    if isinstance(obj, list):
        for item in obj:
            yield from _items(item, origin)
        return
    if not isinstance(obj, Mapping):
        raise InventoryError(f"expected a Kubernetes object, got {type(obj).__name__}",
                             origin=origin)
    kind = obj.get("kind")
    if isinstance(obj.get("items"), list) and (kind is None or str(kind).endswith("List")):
        # API lists (PodList...) omit the items' kind; kubectl's List keeps it.
        hint = str(kind)[:-4] if kind and kind != "List" else None
        for item in obj["items"]:
            if isinstance(item, Mapping):
                yield item, hint
        return
    yield obj, None
