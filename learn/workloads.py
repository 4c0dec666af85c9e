"""Facts about workloads that the learned graph does not carry, read from the inventory.

The emitters for Linkerd and NetworkPolicy need, per graph node (``<ns>/<workload>``): the
declared container ports (a Linkerd ``Server`` may name its port), the kubelet's probes (Linkerd
stops authorizing them once an HTTPRoute exists), which mesh proxy the pods carry, the labels
all its pods share and its service account; and, cluster-wide, the namespaces' labels and where
cluster DNS runs (egress policies must keep it reachable).

Nothing here is assumed from conventions. Cluster DNS is found the way traffic finds it: the
``kube-dns`` Service (the name kubelets write into every pod's resolv.conf search path and
CoreDNS keeps for compatibility), its selector, and the labels of the pods that selector
matches in the inventory - not a hard-coded ``k8s-app=kube-dns``.

Probe ports/paths come from ``observe.inventory``, which already maps Istio's rewritten probes
(``/app-health/<container>/<kind>`` on :15020, ``ISTIO_KUBE_APP_PROBERS``) back to the
application's own path and port. Linkerd does not rewrite probes: the kubelet's requests reach
the application port through the proxy, so the pod spec's httpGet is what Linkerd sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from observe.inventory import (
    GENERATED_LABELS,
    PROXY_CONTAINERS,
    ContainerPort,
    HttpProbe,
    Inventory,
    PodRecord,
    ServiceRecord,
    WorkloadRecord,
)

#: Label the API server sets on every namespace (Kubernetes >= 1.21, immutable).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
#: The Service name cluster DNS is reached through (kubelet ``--cluster-dns`` points at it).
DNS_SERVICE = "kube-dns"
#: Container names of mesh proxies -> mesh.
PROXY_MESH = {"linkerd-proxy": "linkerd", "istio-proxy": "istio"}


@dataclass(frozen=True)
class PortFact:
    """One declared container port of an application container."""

    port: int
    name: str | None
    """The port's name when it is unambiguous in the workload (one number per name)."""
    protocol: str
    """``TCP`` | ``UDP`` | ``SCTP``."""
    container: str


@dataclass(frozen=True)
class ProbeFact:
    """One kubelet probe of an application container."""

    kind: str
    """``liveness`` | ``readiness`` | ``startup``."""
    action: str
    """``httpGet`` (the inventory keeps HTTP probes only; see the module notes)."""
    port: int | str
    """Port number, or a port name the pod spec did not resolve."""
    path: str | None
    """Request path for ``httpGet``."""
    container: str


@dataclass
class WorkloadFacts:
    """What the inventory says about one workload (graph node ``<ns>/<workload>``)."""

    id: str
    namespace: str
    name: str
    kind: str
    ports: tuple[PortFact, ...] = ()
    """Application containers' declared ports (mesh proxies' own ports left out), sorted."""
    proxy_ports: tuple[PortFact, ...] = ()
    """Ports declared by mesh proxy containers (an Istio gateway's only ports)."""
    probes: tuple[ProbeFact, ...] = ()
    """Probes of the application containers, Istio rewrites undone, sorted."""
    mesh: str | None = None
    """``linkerd`` | ``istio`` when a proxy container is seen; None when none is seen."""
    meshed: bool | None = None
    """The inventory's verdict (pods carry a proxy / template injected / opted out)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels every pod of the workload carries (template labels when no pod is known),
    per-pod and per-revision labels (pod-template-hash...) left out."""
    service_account: str | None = None
    """Service account the pods run as (``default`` when the spec leaves it unset)."""
    app_protocols: dict[int, str] = field(default_factory=dict)
    """targetPort -> ``appProtocol`` of the Services selecting this workload (when set)."""

    def port_name(self, port: int, protocol: str = "TCP") -> str | None:
        """The container port's name for ``port`` (None: unnamed, unknown or ambiguous)."""
        names = {p.name for p in self.ports if p.port == port and p.protocol == protocol}
        if len(names) != 1:
            return None
        name = names.pop()
        if name is None:
            return None
        # A name selecting two numbers would make a Server cover more than this port.
        numbers = {p.port for p in self.ports if p.name == name}
        return name if numbers == {port} else None

    def http_probe_paths(self, port: int) -> list[str]:
        """Paths the kubelet requests with httpGet probes on ``port``, sorted, distinct."""
        return sorted({p.path for p in self.probes
                       if p.action == "httpGet" and p.path and self._number(p.port) == port})

    def _number(self, port: int | str) -> int | None:
        if isinstance(port, int):
            return port
        found = {p.port for p in self.ports if p.name == port}
        return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class DnsFacts:
    """Where cluster DNS runs, as the inventory shows it."""

    namespace: str
    service: str
    selector: dict[str, str]
    """The DNS Service's selector: exactly the pods DNS queries to it reach."""
    pod_labels: dict[str, str]
    """Labels all DNS pods in the inventory share ({} when no DNS pod was dumped)."""
    pods: tuple[str, ...]
    """``<ns>/<pod>`` of the DNS pods found."""
    ports: tuple[tuple[int, str], ...]
    """(pod port, protocol) the Service forwards to, e.g. ((53, 'TCP'), (53, 'UDP'))."""


@dataclass
class ClusterFacts:
    """Per-workload facts plus cluster-wide ones."""

    workloads: dict[str, WorkloadFacts] = field(default_factory=dict)
    """By graph node id ``<ns>/<workload>``."""
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    """Namespace -> labels, ``kubernetes.io/metadata.name`` always present."""
    dns: DnsFacts | None = None
    dns_note: str = ""
    """Why ``dns`` is None (or what was odd about it)."""

    def get(self, node_id: str) -> WorkloadFacts | None:
        return self.workloads.get(node_id)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """Labels of ``namespace``; the API server's name label even when it was not dumped."""
        return {**self.namespaces.get(namespace, {}), NAMESPACE_NAME_LABEL: namespace}


# ---------------------------------------------------------------------------------------


def cluster_facts(inventory: Inventory) -> ClusterFacts:
    """Facts for every top workload in ``inventory`` and the cluster DNS it shows."""
    facts = ClusterFacts()
    for ns, labels in sorted(inventory.namespaces.items()):
        facts.namespaces[ns] = {**labels, NAMESPACE_NAME_LABEL: ns}
    for _, wl in sorted(inventory.workloads.items()):
        facts.workloads[wl.id] = _workload_facts(inventory, wl)
    facts.dns, facts.dns_note = _dns(inventory)
    return facts


def _workload_facts(inventory: Inventory, wl: WorkloadRecord) -> WorkloadFacts:
    pods = inventory.pods_of(wl)
    port_sources: list[tuple[ContainerPort, ...]] = [p.ports for p in pods] or [wl.ports]
    app_ports, proxy_ports = _ports(port_sources)
    probes = _probes([p.probes for p in pods] or [wl.probes])
    containers: set[str] = set()
    for pod in pods:
        containers.update(pod.containers)
    # Templates keep no container list, but a proxy's declared ports name its container.
    containers.update(cp.container for source in port_sources for cp in source)
    meshes = sorted({PROXY_MESH[c] for c in containers if c in PROXY_MESH})
    sas = {p.service_account or "default" for p in pods}
    if not pods:
        sas = {wl.service_account or "default"}
    app_protocols: dict[int, str] = {}
    for svc in inventory.services_selecting(wl):
        for sp in svc.ports:
            if not sp.app_protocol:
                continue
            target = inventory.resolve_target_port(svc, sp.port)
            if target is not None:
                app_protocols.setdefault(target, sp.app_protocol)
    return WorkloadFacts(
        id=wl.id, namespace=wl.namespace, name=wl.name, kind=wl.kind,
        ports=app_ports, proxy_ports=proxy_ports, probes=probes,
        mesh=meshes[0] if len(meshes) == 1 else ("+".join(meshes) or None),
        meshed=wl.meshed,
        labels=_common_labels([p.labels for p in pods]) if pods else _strip(wl.labels),
        service_account=sas.pop() if len(sas) == 1 else None,
        app_protocols=dict(sorted(app_protocols.items())),
    )


def _ports(sources: Iterable[tuple[ContainerPort, ...]]
           ) -> tuple[tuple[PortFact, ...], tuple[PortFact, ...]]:
    seen: set[tuple[int, str, str, str | None]] = set()
    for source in sources:
        seen.update((cp.port, cp.protocol, cp.container, cp.name) for cp in source)
    # A name is kept only if it means one number in this workload.
    numbers_by_name: dict[str, set[int]] = {}
    for port, _, _, name in seen:
        if name:
            numbers_by_name.setdefault(name, set()).add(port)
    app: set[PortFact] = set()
    proxy: set[PortFact] = set()
    for port, protocol, container, name in seen:
        keep = name if name and len(numbers_by_name[name]) == 1 else None
        fact = PortFact(port=port, name=keep, protocol=protocol, container=container)
        (proxy if container in PROXY_CONTAINERS else app).add(fact)
    key = _port_key
    return tuple(sorted(app, key=key)), tuple(sorted(proxy, key=key))


def _port_key(p: PortFact) -> tuple[int, str, str, str]:
    return (p.port, p.protocol, p.container, p.name or "")


def _probes(sources: Iterable[tuple[HttpProbe, ...]]) -> tuple[ProbeFact, ...]:
    out: set[ProbeFact] = set()
    for source in sources:
        for probe in source:
            out.add(ProbeFact(kind=probe.kind, action="httpGet", port=probe.port,
                              path=probe.path, container=probe.container))
    return tuple(sorted(out, key=lambda p: (p.container, p.kind, str(p.port), p.path or "")))


def _strip(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(labels.items()) if k not in GENERATED_LABELS}


def _common_labels(label_sets: list[dict[str, str]]) -> dict[str, str]:
    if not label_sets:
        return {}
    common = dict(_strip(label_sets[0]))
    for labels in label_sets[1:]:
        common = {k: v for k, v in common.items() if labels.get(k) == v}
    return common


def _dns(inventory: Inventory) -> tuple[DnsFacts | None, str]:
    candidates = sorted((svc for (_, name), svc in inventory.services.items()
                         if name == DNS_SERVICE),
                        key=lambda s: (s.namespace != "kube-system", s.namespace))
    if not candidates:
        return None, (f"no `{DNS_SERVICE}` Service in the inventory: the cluster DNS pods "
                      "could not be identified")
    svc = candidates[0]
    note = ""
    if len(candidates) > 1:
        note = ("several `kube-dns` Services (" + ", ".join(s.id for s in candidates)
                + f"); used {svc.id}")
    if not svc.selector:
        return None, (f"Service {svc.id} has no selector (endpoints managed by hand): the DNS "
                      "pods cannot be selected by labels")
    pods = [p for p in inventory.pods if p.namespace == svc.namespace
            and all(p.labels.get(k) == v for k, v in svc.selector.items())]
    ports = _dns_ports(inventory, svc, pods)
    return DnsFacts(
        namespace=svc.namespace, service=svc.name, selector=dict(sorted(svc.selector.items())),
        pod_labels=_common_labels([p.labels for p in pods]),
        pods=tuple(sorted({p.key for p in pods})), ports=ports,
    ), note


def _dns_ports(inventory: Inventory, svc: ServiceRecord,
               pods: list[PodRecord]) -> tuple[tuple[int, str], ...]:
    out: set[tuple[int, str]] = set()
    for sp in svc.ports:
        target: int | None
        if isinstance(sp.target_port, str) and not sp.target_port.isdigit() and pods:
            # Named targetPort: what the DNS pods declare under that name and protocol.
            found = {cp.port for p in pods for cp in p.ports
                     if cp.name == sp.target_port and cp.protocol == sp.protocol}
            target = found.pop() if len(found) == 1 else None
        else:
            target = inventory.resolve_target_port(svc, sp.port)
        if target is not None:
            out.add((target, sp.protocol))
    return tuple(sorted(out))
