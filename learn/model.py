"""The learned communication graph and findings: what ``learn`` hands to ``emit``.

Plain dataclasses with JSON-ready fields. Node ids are ``"<ns>/<workload>"`` for workloads,
``"external:<ip-or-host>"`` for peers outside the cluster and ``"unknown:<ip>"`` for cluster
addresses no evidence could attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

#: Node kinds besides Kubernetes workload kinds (Deployment, StatefulSet, DaemonSet, CronJob,
#: Job, ReplicaSet, Pod).
EXTERNAL = "external"
UNKNOWN = "unknown"
#: The one node standing for all public clients of an ingress gateway (addresses in ``ips``).
INTERNET = "external:internet"

#: Pod labels that mark an ingress gateway (classic Istio, Gateway API, Istio-managed).
INGRESS_GATEWAY_LABELS: tuple[tuple[str, str | None], ...] = (
    ("istio", "ingressgateway"),
    ("gateway.networking.k8s.io/gateway-name", None),
    ("istio.io/gateway-name", None),
)


def has_ingress_gateway_labels(labels: dict[str, str]) -> bool:
    """Whether pod labels mark an ingress gateway."""
    return any(k in labels and (v is None or labels[k] == v) for k, v in INGRESS_GATEWAY_LABELS)


@dataclass
class Node:
    """One vertex: a workload, an external peer, or an unattributed address."""

    id: str
    """``<ns>/<workload>`` | ``external:<x>`` | ``unknown:<ip>``."""
    kind: str
    """Owning workload kind (``Deployment``, ``StatefulSet``, ..., ``Pod``) or external/unknown."""
    namespace: str | None = None
    """Namespace of a workload; None for external/unknown."""
    workload: str | None = None
    """Workload name (the top owner: Deployment, not ReplicaSet)."""
    service_account: str | None = None
    """Service account the workload's pods run as."""
    principal: str | None = None
    """SPIFFE principal without scheme: ``<trust-domain>/ns/<ns>/sa/<sa>``."""
    selector: dict[str, str] = field(default_factory=dict)
    """Smallest stable label set selecting exactly this workload's pods in its namespace."""
    meshed: bool | None = None
    """True if its pods carry a mesh proxy (sidecar), False if not, None if unknown."""
    in_inventory: bool = False
    """True if the inventory knows this workload (False: known only from logs)."""
    ips: list[str] = field(default_factory=list)
    """Addresses seen for this node (external/unknown peers, plaintext clients)."""
    services: list[str] = field(default_factory=list)
    """Services (``<ns>/<name>``) that select this workload's pods."""
    ingress_gateway: bool = False
    """True for ingress gateways (Istio, Gateway API): they serve clients outside the mesh."""


@dataclass
class Operation:
    """One observed (method, path family) pair on an HTTP/gRPC edge, with its count."""

    method: str
    path: str
    """Path family in Istio syntax: exact, ``prefix*`` or ``*suffix``."""
    requests: int = 0


@dataclass
class Edge:
    """All traffic from one source identity to one destination workload port and protocol."""

    source: str
    destination: str
    port: int
    """The destination workload's port (targetPort), not the Service port."""
    protocol: str
    """``http``, ``grpc`` or ``tcp``."""
    requests: int = 0
    """Requests (HTTP/gRPC) or connections (TCP) counted once each."""
    connections: int = 0
    """TCP connections (UDP flows) seen in packet evidence; 0 when only proxies reported."""
    mtls_connections: int = 0
    """Of ``connections``, those that carried mTLS."""
    requests_itemized: bool = True
    """False when some connection of this edge carried requests that have no record (its
    payload was seen only in part): the observed methods/paths may be incomplete."""
    bytes: int = 0
    """Bytes in both directions."""
    mtls_requests: int = 0
    plaintext_requests: int = 0
    tls_requests: int = 0
    unknown_tls_requests: int = 0
    denied_requests: int = 0
    """Requests an existing policy already rejected (not allowed by the proposal)."""
    operations: list[Operation] = field(default_factory=list)
    """Observed (method, path family) pairs, sorted; empty for TCP."""
    response_classes: dict[str, int] = field(default_factory=dict)
    """Counts by response class: ``2xx``, ``3xx``, ``4xx``, ``5xx``, ``0`` (no response)."""
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    hours: list[int] = field(default_factory=list)
    """Distinct UTC hours of day in which the edge was seen."""
    active_minutes: int = 0
    """Distinct minutes in which the edge was seen (for 'seen only a handful of times')."""
    source_ips: list[str] = field(default_factory=list)
    """Client addresses of requests without a verified identity (plaintext/unknown): ipBlocks."""
    hosts: list[str] = field(default_factory=list)
    """Destination host names seen (authority / service FQDN), for external egress."""
    evidence: list[str] = field(default_factory=list)
    """A few ``file:line`` samples."""

    @property
    def mtls(self) -> str:
        """``full`` | ``partial`` | ``none`` | ``unknown`` over requests whose TLS is known."""
        known = self.mtls_requests + self.plaintext_requests + self.tls_requests
        if known == 0:
            return "unknown"
        if self.mtls_requests == known:
            return "full"
        if self.mtls_requests == 0:
            return "none"
        return "partial"

    @property
    def methods(self) -> list[str]:
        return sorted({op.method for op in self.operations})

    @property
    def paths(self) -> list[str]:
        return sorted({op.path for op in self.operations})


@dataclass
class Finding:
    """Something a reviewer must look at, with its evidence."""

    id: str
    """Stable id: ``<kind>:<source>-><destination>:<port>`` (same input, same id)."""
    kind: str
    """``plaintext`` | ``permissive`` | ``unknown-source`` | ``external-egress`` | ``denied`` ..."""
    severity: str
    """``high`` | ``medium`` | ``low`` | ``info``."""
    source: str | None
    destination: str | None
    port: int | None
    summary: str
    """One sentence a reviewer can act on."""
    evidence: list[str] = field(default_factory=list)
    """``file:line`` samples behind it."""


@dataclass
class Graph:
    """The learned communication graph plus what it was learned from."""

    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    trust_domain: str = "cluster.local"
    namespaces: list[str] = field(default_factory=list)
    """Namespaces observed (traffic to or from them, or named by the inventory)."""
    idle_workloads: list[str] = field(default_factory=list)
    """Inventory workloads that received no traffic in the window."""
    ambiguities: list[str] = field(default_factory=list)
    """Resolution ambiguities recorded (never guessed silently)."""

    def edges_to(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.destination == node_id]
