"""``meshwright check``: replay recorded traffic against a policy set.

Given the resolved flows (what ``learn_graph(..., resolved_out=...)`` writes), the learned graph,
the inventory and a set of policies (Istio, Linkerd, Kubernetes NetworkPolicy, mixed), every
distinct observation - (source, destination, port, method, path, mTLS, ...) - is evaluated by
each policy engine the set configures (:mod:`emit.evaluate`, :mod:`emit.evaluate_linkerd`,
:mod:`emit.evaluate_netpol`). A request passes only when every engine lets it through (a
NetworkPolicy and a mesh policy both stand in its way). The result lists:

* **breakage**: observed traffic (that no existing policy had already denied) the set would
  deny, with the deciding engine, policy and reason, and evidence (``file:line``);
* **unknown**: observed traffic whose fate cannot be decided from the evidence (``when``
  conditions, JWTs, CUSTOM authorizers, header matches, unknown peers), never guessed;
* **over-permission**: permissions no observed request exercised - an ALLOW rule (or one of its
  sources, operations, principals, paths, ports...), a Linkerd Server / route match /
  authorization / authentication identity or network, a NetworkPolicy rule (or one of its peers
  or ports) - plus *unrestricted* destinations, where observed traffic passed only because
  nothing restricts it (no ALLOW policy, a permissive Linkerd default, a pod no NetworkPolicy
  isolates, PERMISSIVE mTLS where only mTLS was seen);
* **newly allowed**: requests an existing policy denied when they were recorded that the set
  would allow;
* **latent breakage**: where a destination runs no proxy of an engine (Linkerd policies for
  pods that carry istio-proxy, say - a migration), that engine's policies enforce nothing: its
  verdict is n/a and the destination *unrestricted*, but they are still evaluated as if the
  proxy ran - the permissions that traffic would use count as exercised, and what they would
  deny is listed here.

JSON document (:func:`result_json`, ``version`` 1)::

    {"version": 1,
     "engines": ["istio", "linkerd", "netpol"],          # engines the policy set configures
     "policies": {"objects": N, "by_kind": {"<apiGroup>/<Kind>": N}, "ignored": {...}},
     "summary": {"observations": N, "requests": N, "allowed": N, "denied": N,
                 "unknown": N, "breakage": N, "breakage_requests": N, ...},
     "breakage" | "unknown" | "newly_allowed" | "still_denied" | "latent_breakage": [
        {"source": "<node id>", "destination": "<node id>", "port": 9080,
         "transport": "tcp", "protocol": "http", "method": "GET", "path": "/x", "host": ...,
         "mtls": "mtls|plaintext|tls|unknown", "source_ip": ..., "requests": N,
         "verdict": "deny|unknown|allow",
         "engines": [{"engine": "istio", "verdict": "deny", "reason": "...",
                      "policy": "<ns>/<name>" | null,
                      "latent": "allow|deny|unknown"}],  # only where not enforced
         "evidence": ["file:line", ...]}],
     "over_permission": [
        {"engine": "istio", "object": "AuthorizationPolicy <ns>/<name>",
         "part": "rules[0].from[1].source.principals[0]", "what": "principals ...",
         "origin": "<policy file>#<document>"}],
     "unrestricted": [
        {"engine": "netpol", "destination": "<node id>", "port": 9080, "requests": N,
         "what": "no NetworkPolicy isolates the pod for Ingress"}]}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from emit import evaluate as istio
from emit import evaluate_linkerd as linkerd
from emit import evaluate_netpol as netpol
from learn.model import Graph, Node
from observe.errors import InputError
from observe.flows_io import read_flows
from observe.inventory import Inventory, PodRecord, WorkloadRecord
from observe.schema import FAILED_STATES

ALLOW, DENY, UNKNOWN, NA = "allow", "deny", "unknown", "n/a"
POLICY_SUFFIXES = (".yaml", ".yml", ".json")
#: Kinds kept for annotations (Linkerd default policies), not policies themselves.
CONTEXT_KINDS = ("Namespace",)
#: Evidence samples kept per observation.
MAX_EVIDENCE = 3


# -- the policy set -------------------------------------------------------------------------


@dataclass
class PolicySet:
    """Policy objects read from files (and/or the cluster), with their origins."""

    manifests: list[dict[str, Any]] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    """``<file>#<document index>`` (or the API server URL) per manifest."""
    context: list[dict[str, Any]] = field(default_factory=list)
    """Namespace objects (their annotations carry Linkerd default policies)."""
    ignored: Counter[str] = field(default_factory=Counter)
    """Objects of kinds no engine evaluates, by ``apiVersion/kind``."""

    def add(self, obj: Mapping[str, Any], origin: str, default_namespace: str = "default"
            ) -> None:
        """Keep ``obj`` if an engine evaluates it; a policy without a namespace lands in
        ``default_namespace`` (as ``kubectl apply -n`` would put it)."""
        if istio.is_istio(obj) or linkerd.is_linkerd(obj) or netpol.is_netpol(obj):
            obj = dict(obj)
            meta = dict(obj.get("metadata") or {})
            meta.setdefault("namespace", default_namespace)
            if not meta["namespace"]:
                meta["namespace"] = default_namespace
            obj["metadata"] = meta
            self.manifests.append(obj)
            self.origins.append(origin)
        elif obj.get("kind") in CONTEXT_KINDS:
            self.context.append(dict(obj))
        else:
            self.ignored[f"{obj.get('apiVersion')}/{obj.get('kind')}"] += 1

    def origin_of(self, obj: Mapping[str, Any]) -> str:
        for m, origin in zip(self.manifests, self.origins, strict=True):
            if m is obj:
                return origin
        return ""

    def by_kind(self) -> dict[str, int]:
        out: Counter[str] = Counter(
            f"{str(m.get('apiVersion', '')).split('/')[0]}/{m.get('kind')}" for m in self.manifests)
        return dict(sorted(out.items()))


def iter_objects(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Kubernetes objects in one YAML (multi-document) or JSON file, with ``file#N`` origins.

    Lists (``kind: List``, ``<Kind>List``, JSON arrays) are unpacked.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", origin=str(path)) from exc
    docs: list[Any]
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            docs = [orjson.loads(data)]
        except orjson.JSONDecodeError as exc:
            raise InputError(f"invalid JSON: {exc.msg}", origin=f"{path}:{exc.lineno}") from exc
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError("not UTF-8 text", origin=str(path)) from exc
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            docs = list(yaml.load_all(text, Loader=loader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InputError(f"invalid YAML: {problem}", origin=where) from exc
    for index, doc in enumerate(docs):
        for obj in _unpack(doc):
            yield obj, f"{path}#{index}"


def _unpack(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, list):
        for item in doc:
            yield from _unpack(item)
    elif isinstance(doc, dict):
        kind = doc.get("kind")
        if isinstance(doc.get("items"), list) and (kind is None or str(kind).endswith("List")):
            hint = str(kind)[:-4] if kind and kind != "List" else None
            for item in doc["items"]:
                if isinstance(item, dict):
                    yield {"kind": hint, **item} if hint and "kind" not in item else item
        elif kind:
            yield doc


def load_policies(paths: Sequence[Path | str], default_namespace: str = "default") -> PolicySet:
    """Read policy files and directories (walked recursively, ``*.yaml|*.yml|*.json``);
    policies without ``metadata.namespace`` go to ``default_namespace``."""
    policy_set = PolicySet()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in POLICY_SUFFIXES)
        elif path.exists():
            files = [path]
        else:
            raise InputError("policy file or directory not found", origin=str(path))
        for file in files:
            for obj, origin in iter_objects(file):
                policy_set.add(obj, origin, default_namespace)
    return policy_set


def default_inbound_policies(objects: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``config.linkerd.io/default-inbound-policy`` annotations found on Namespaces (key
    ``<ns>``), workload pod templates and pods (key ``<ns>/<name>``)."""
    out: dict[str, str] = {}
    for obj in objects:
        meta = obj.get("metadata") or {}
        kind = obj.get("kind")
        name = meta.get("name")
        if not name:
            continue
        annotations = meta.get("annotations") or {}
        if kind == "Namespace":
            value = annotations.get(linkerd.DEFAULT_POLICY_ANNOTATION)
            if value:
                out[str(name)] = str(value)
            continue
        ns = meta.get("namespace") or "default"
        spec = obj.get("spec") or {}
        template = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
                    if kind == "CronJob" else spec.get("template")) or {}
        pod_annotations = (template.get("metadata") or {}).get("annotations") or {}
        value = pod_annotations.get(linkerd.DEFAULT_POLICY_ANNOTATION) or (
            annotations.get(linkerd.DEFAULT_POLICY_ANNOTATION) if kind == "Pod" else None)
        if value:
            out[f"{ns}/{name}"] = str(value)
    return out


# -- observations ---------------------------------------------------------------------------

_KEYS = ["src_workload", "dst_workload", "src_ip", "dst_port", "transport", "protocol",
         "method", "path", "authority", "mtls", "src_principal", "denied", "kind"]
_COLUMNS = [*_KEYS, "src_pod", "dst_pod", "dst_ip", "origin", "direction", "reporter",
            "tcp_state"]


@dataclass(frozen=True)
class Observation:
    """One distinct kind of observed request/connection and how often it was seen."""

    source: str
    destination: str
    port: int
    transport: str
    protocol: str
    method: str | None
    path: str | None
    host: str | None
    mtls: str
    principal: str | None
    """The client's identity as the evidence names it (SPIFFE form without scheme)."""
    source_ip: str | None
    source_pod: str | None
    destination_pod: str | None
    destination_ip: str | None
    denied: bool
    """An existing policy rejected it when it was recorded."""
    requests: int
    evidence: tuple[str, ...]
    connection: bool = False
    """A transport connection seen below the proxies (packets): its requests, if any, are
    in other observations when a proxy logged them."""

    def describe(self) -> str:
        what = f"{self.method} {self.path}" if self.method else self.protocol
        return f"{self.source} -> {self.destination}:{self.port} {what}"


def observations(flows: Path) -> list[Observation]:
    """Distinct observations in resolved flows (mirrored client copies and failed connection
    attempts left out, query strings stripped), sorted."""
    origin = str(flows)
    inbound: set[str] = set()
    for batch in read_flows(flows, columns=["direction", "reporter"]):
        mask = pc.fill_null(pc.equal(batch["direction"], "inbound"), False)
        inbound.update(r for r in pc.unique(batch.filter(mask)["reporter"]).to_pylist() if r)
    parts: list[pa.Table] = []
    aggs = [("origin", "count"), ("origin", "min"), ("origin", "max"), ("src_pod", "min"),
            ("dst_pod", "min"), ("dst_ip", "min")]
    for batch in read_flows(flows, columns=_COLUMNS):
        table = pa.Table.from_batches([batch])
        if "dst_workload" not in table.column_names:
            raise InputError("flows are not resolved (no dst_workload)", origin=origin)
        keep = pc.invert(pc.fill_null(pc.is_in(table["tcp_state"],
                                               value_set=pa.array(FAILED_STATES)), False))
        if inbound:
            mirrored = pc.and_(pc.equal(table["direction"], "outbound"),
                               pc.is_in(table["dst_pod"], value_set=pa.array(sorted(inbound))))
            keep = pc.and_(keep, pc.invert(pc.fill_null(mirrored, False)))
        keep = pc.and_(keep, pc.invert(pc.or_(pc.is_null(table["dst_workload"]),
                                              pc.is_null(table["dst_port"]))))
        table = table.filter(keep)
        if table.num_rows == 0:
            continue
        table = table.set_column(
            table.column_names.index("path"), "path",
            pc.replace_substring_regex(table["path"], pattern=r"\?.*$", replacement=""))
        table = table.set_column(table.column_names.index("denied"), "denied",
                                 pc.fill_null(table["denied"], False))
        parts.append(table.group_by(_KEYS, use_threads=False).aggregate(aggs))
    if not parts:
        return []
    merged = pa.concat_tables(parts).group_by(_KEYS, use_threads=False).aggregate([
        ("origin_count", "sum"), ("origin_min", "min"), ("origin_max", "max"),
        ("src_pod_min", "min"), ("dst_pod_min", "min"), ("dst_ip_min", "min"),
    ])
    out = []
    for row in merged.to_pylist():
        evidence = tuple(sorted({e for e in (row["origin_min_min"], row["origin_max_max"])
                                 if e}))[:MAX_EVIDENCE]
        out.append(Observation(
            source=row["src_workload"] or f"unknown:{row['src_ip'] or '?'}",
            destination=row["dst_workload"], port=int(row["dst_port"]),
            transport=(row["transport"] or "tcp").lower(), protocol=row["protocol"] or "tcp",
            method=row["method"], path=row["path"], host=row["authority"],
            mtls=row["mtls"] or "unknown", principal=row["src_principal"],
            source_ip=row["src_ip"], source_pod=row["src_pod_min_min"],
            destination_pod=row["dst_pod_min_min"], destination_ip=row["dst_ip_min_min"],
            denied=bool(row["denied"]), requests=int(row["origin_count_sum"]),
            evidence=evidence, connection=row["kind"] == "connection",
        ))
    out.sort(key=_obs_key)
    return out


def _obs_key(o: Observation) -> tuple[str, ...]:
    return (o.destination, f"{o.port:05d}", o.source, o.method or "", o.path or "", o.mtls,
            o.source_ip or "", o.host or "", str(o.denied), o.protocol, o.transport,
            o.principal or "", str(o.connection))


# -- context from the inventory -------------------------------------------------------------


@dataclass(frozen=True)
class CheckOptions:
    root_namespace: str = "istio-system"
    """Istio's root namespace (mesh-wide policies)."""
    trust_domain: str = "cluster.local"
    linkerd_default_policy: str | None = None
    """Linkerd's cluster-wide ``proxy.defaultInboundPolicy``; None: all-unauthenticated, and the
    Linkerd engine only runs when the policy set has Linkerd objects or annotations."""
    linkerd_identity_domain: str | None = None
    """Linkerd's identity trust domain (default: ``trust_domain``)."""
    cluster_networks: tuple[str, ...] = linkerd.DEFAULT_CLUSTER_NETWORKS
    default_inbound: Mapping[str, str] = field(default_factory=dict)
    """``config.linkerd.io/default-inbound-policy`` by ``<ns>`` and ``<ns>/<pod|workload>``."""


class _Context:
    """What the evaluators need from the inventory and the graph."""

    def __init__(self, inventory: Inventory, graph: Graph) -> None:
        self.graph = graph
        self.pods: dict[str, PodRecord] = {p.key: p for p in inventory.pods}
        self.workloads: dict[str, WorkloadRecord] = {w.id: w for w in
                                                     inventory.workloads.values()}
        self.ns_labels = inventory.namespaces
        self.services = inventory.services
        #: (source, destination, port) with request-level observations.
        self.requested: set[tuple[str, str, int]] = set()

    def node(self, node_id: str) -> Node | None:
        return self.graph.nodes.get(node_id)

    def is_workload(self, node_id: str) -> bool:
        return ":" not in node_id.split("/", 1)[0] and "/" in node_id

    def labels(self, node_id: str, pod: str | None) -> dict[str, str] | None:
        if pod and pod in self.pods:
            return dict(self.pods[pod].labels)
        wl = self.workloads.get(node_id)
        if wl is not None:
            return dict(wl.labels)
        node = self.node(node_id)
        if node is not None and node.selector:
            return dict(node.selector)
        return None

    def ports(self, node_id: str, pod: str | None) -> tuple[netpol.NamedPort, ...]:
        record: PodRecord | WorkloadRecord | None = self.pods.get(pod or "") or \
            self.workloads.get(node_id)
        if record is None:
            return ()
        return tuple(netpol.NamedPort(p.name, p.port, p.protocol) for p in record.ports)

    def probes(self, node_id: str, pod: str | None) -> frozenset[tuple[int, str]]:
        record: PodRecord | WorkloadRecord | None = self.pods.get(pod or "") or \
            self.workloads.get(node_id)
        if record is None:
            return frozenset()
        out = set()
        for probe in record.probes:
            port = probe.port
            if isinstance(port, str):
                named = [p.port for p in record.ports if p.name == port]
                if not named:
                    continue
                port = named[0]
            out.add((int(port), probe.path.split("?", 1)[0]))
        return frozenset(out)

    def proxy(self, node_id: str, pod: str | None, container: str) -> bool | None:
        """Does the destination run ``container`` (istio-proxy / linkerd-proxy)?"""
        record = self.pods.get(pod or "")
        if record is not None:
            return container in record.containers
        node = self.node(node_id)
        if node is not None and node.meshed is False:
            return False
        return None

    def service_names(self, namespace: str, labels: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(sorted(s.name for (ns, _), s in self.services.items()
                            if ns == namespace and s.selector
                            and all(labels.get(k) == v for k, v in s.selector.items())))

    def from_node(self, obs: Observation) -> bool:
        pod = self.pods.get(obs.destination_pod or "")
        return bool(pod and pod.host_ip and obs.source_ip == pod.host_ip
                    and not pod.host_network)


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineVerdict:
    engine: str
    verdict: str
    reason: str
    policy: str | None = None
    latent: str | None = None
    """Where the destination runs no proxy of this engine (verdict n/a): the verdict once it
    does."""


@dataclass
class Checked:
    observation: Observation
    verdict: str
    engines: list[EngineVerdict]


@dataclass(frozen=True)
class OverPermission:
    engine: str
    object: str
    """``<Kind> <ns>/<name>``."""
    part: str
    """Path inside the object (``''``: the whole object)."""
    what: str
    origin: str


@dataclass(frozen=True)
class Unrestricted:
    engine: str
    destination: str
    port: int
    requests: int
    what: str


@dataclass
class CheckResult:
    engines: list[str]
    checked: list[Checked]
    over_permission: list[OverPermission]
    unrestricted: list[Unrestricted]
    policies: PolicySet

    def _select(self, verdict: str, denied: bool) -> list[Checked]:
        return [c for c in self.checked
                if c.verdict == verdict and c.observation.denied == denied]

    @property
    def breakage(self) -> list[Checked]:
        return self._select(DENY, False)

    @property
    def unknown(self) -> list[Checked]:
        return [c for c in self.checked if c.verdict == UNKNOWN]

    @property
    def newly_allowed(self) -> list[Checked]:
        return self._select(ALLOW, True)

    @property
    def still_denied(self) -> list[Checked]:
        return self._select(DENY, True)

    @property
    def latent_breakage(self) -> list[Checked]:
        """Observed traffic that passes only because a destination runs no proxy of an engine
        whose policies would deny it once it does (a mesh migration's breakage)."""
        return [c for c in self.checked if c.verdict != DENY and not c.observation.denied
                and any(v.latent == DENY for v in c.engines)]


# -- the check ------------------------------------------------------------------------------


def check(observed: Sequence[Observation], policies: PolicySet, inventory: Inventory,
          graph: Graph, options: CheckOptions | None = None) -> CheckResult:
    """Evaluate every observation under every engine the policy set configures."""
    options = options or CheckOptions()
    ctx = _Context(inventory, graph)
    ctx.requested = {(o.source, o.destination, o.port) for o in observed if not o.connection}
    manifests = policies.manifests
    istio_set = [m for m in manifests if istio.is_istio(m)]
    net_set = [m for m in manifests if netpol.is_netpol(m)]
    defaults = {**default_inbound_policies(policies.context), **options.default_inbound}
    lk = linkerd.LinkerdPolicies(
        manifests, cluster_default=options.linkerd_default_policy or "all-unauthenticated",
        cluster_networks=options.cluster_networks,
        identity_domain=options.linkerd_identity_domain or options.trust_domain)
    engines = []
    if istio_set:
        engines.append("istio")
    if lk.objects or options.linkerd_default_policy or defaults:
        engines.append("linkerd")
    if net_set:
        engines.append("netpol")
    istio_hits: dict[str, set[str]] = {}
    lk_hits: dict[str, set[str]] = {}
    net_hits: dict[str, set[str]] = {}
    open_: dict[tuple[str, str, int, str], int] = {}
    permissive: dict[tuple[str, int], list[tuple[str, int]]] = {}
    checked = []
    for obs in observed:
        verdicts: list[EngineVerdict] = []
        if "istio" in engines:
            verdicts.append(_unenforced(
                _istio(obs, istio_set, ctx, options, istio_hits, open_, permissive),
                obs, ctx, "istio-proxy", open_))
        if "linkerd" in engines:
            verdicts.append(_unenforced(
                _linkerd(obs, lk, ctx, defaults, options, lk_hits, open_),
                obs, ctx, "linkerd-proxy", open_))
        if "netpol" in engines:
            verdicts.append(_netpol(obs, net_set, ctx, net_hits, open_))
        states = {v.verdict for v in verdicts}
        verdict = DENY if DENY in states else UNKNOWN if UNKNOWN in states else ALLOW
        checked.append(Checked(obs, verdict, verdicts))
    over: list[OverPermission] = []
    for m in istio_set:
        if m.get("kind") != "AuthorizationPolicy" or istio._dry_run(m):
            continue
        if str((m.get("spec") or {}).get("action") or "ALLOW") != "ALLOW":
            continue
        name = istio._name(m)
        over += _unused("istio", f"AuthorizationPolicy {name}", istio.allow_parts(m),
                        istio_hits.get(name, set()), policies.origin_of(m))
    for lo in lk.objects:
        k = linkerd.key(lo, lk.default_namespace)
        over += _unused("linkerd", k, linkerd.object_parts(lk, lo), lk_hits.get(k, set()),
                        policies.origin_of(lo))
    for m in net_set:
        name = netpol._name(m)
        over += _unused("netpol", f"NetworkPolicy {name}", netpol.rule_parts(m),
                        net_hits.get(name, set()), policies.origin_of(m))
    unrestricted = [Unrestricted(engine, dst, port, n, what)
                    for (engine, dst, port, what), n in sorted(open_.items())]
    for (dst, port), modes in sorted(permissive.items()):
        if modes and all(m == "mtls" for m, _ in modes):
            unrestricted.append(Unrestricted(
                "istio", dst, port, sum(n for _, n in modes),
                "PeerAuthentication PERMISSIVE accepts plaintext, but every observed request "
                "it lets through was mTLS"))
    return CheckResult(engines=engines, checked=checked, over_permission=over,
                       unrestricted=unrestricted, policies=policies)


def _unused(engine: str, obj: str, parts: Sequence[tuple[str, str]], hits: set[str],
            origin: str) -> list[OverPermission]:
    """Parts never hit, leaving out those inside a part already reported."""
    out: list[OverPermission] = []
    reported: list[str] = []
    for path, what in parts:
        if path in hits or any(_inside(path, r) for r in reported):
            continue
        reported.append(path)
        out.append(OverPermission(engine, obj, path, what, origin))
    return out


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path.startswith(parent + ".")


def _principal(obs: Observation, ctx: _Context) -> str | None:
    if obs.principal:
        return obs.principal
    node = ctx.node(obs.source)
    return node.principal if node is not None else None


def _identities(obs: Observation, ctx: _Context) -> list[str | None]:
    """The client identities to try: one when the evidence says, both when mTLS is unknown."""
    if obs.mtls == "mtls":
        principal = _principal(obs, ctx)
        return [principal] if principal else [None]
    if obs.mtls == "unknown" or (obs.mtls == "tls" and obs.connection):
        # A capture sees TLS but not whose certificate: the identity is not known.
        principal = _principal(obs, ctx)
        return [principal, None] if principal else [None]
    return [None]


def _not_applicable(obs: Observation, ctx: _Context, engine: str,
                    container: str) -> EngineVerdict | None:
    if obs.connection and (obs.source, obs.destination, obs.port) in ctx.requested:
        return EngineVerdict(engine, NA, "connection whose requests the proxy logged: they "
                             "are evaluated instead")
    if obs.transport == "udp":
        return EngineVerdict(engine, NA, "UDP is not proxied by the mesh")
    if obs.destination.startswith("service:"):
        return EngineVerdict(engine, UNKNOWN, "destination workload behind the Service was "
                             "not resolved")
    if not ctx.is_workload(obs.destination):
        return EngineVerdict(engine, NA, "destination outside the mesh")
    return None


def _unenforced(verdict: EngineVerdict, obs: Observation, ctx: _Context, container: str,
                open_: dict[tuple[str, str, int, str], int]) -> EngineVerdict:
    """The verdict where the destination runs the engine's proxy; where it runs none (its pods
    carry another mesh's proxy or none), the policies are evaluated as if it did - what they
    would do once it is injected, which also tells which of their permissions the traffic
    uses - but enforce nothing: n/a, the would-be verdict kept as ``latent``, the destination
    listed as unrestricted."""
    if verdict.verdict == NA or ctx.proxy(obs.destination, obs.destination_pod,
                                          container) is not False:
        return verdict
    key = (verdict.engine, obs.destination, obs.port,
           f"destination runs no {container}: its {verdict.engine} policies are not enforced")
    open_[key] = open_.get(key, 0) + obs.requests
    return EngineVerdict(verdict.engine, NA, f"destination runs no {container}: not enforced "
                         f"(with one: {verdict.verdict}, {verdict.reason})", verdict.policy,
                         latent=verdict.verdict)


def _istio(obs: Observation, manifests: Sequence[Mapping[str, Any]], ctx: _Context,
           options: CheckOptions, hits: dict[str, set[str]],
           open_: dict[tuple[str, str, int, str], int],
           permissive: dict[tuple[str, int], list[tuple[str, int]]]) -> EngineVerdict:
    skip = _not_applicable(obs, ctx, "istio", "istio-proxy")
    if skip is not None:
        return skip
    if ctx.proxy(obs.destination, obs.destination_pod, "istio-proxy") is False:
        open_, permissive = {}, {}  # not enforced: nothing to say about what it lets through
    labels = ctx.labels(obs.destination, obs.destination_pod)
    if labels is None:
        return EngineVerdict("istio", UNKNOWN, "destination pod labels are not known")
    ns = obs.destination.split("/", 1)[0]
    results = []
    for principal in _identities(obs, ctx):
        req = istio.Request(
            namespace=ns, labels=labels, port=obs.port,
            protocol="tcp" if obs.protocol not in ("http", "grpc") else obs.protocol,
            method=obs.method, path=obs.path, host=obs.host, source_principal=principal,
            source_ip=obs.source_ip, destination_ip=obs.destination_ip,
            services=ctx.service_names(ns, labels))
        results.append(istio.evaluate_detail(manifests, req, options.root_namespace))
    verdicts = {r.decision.verdict for r in results}
    first = results[0]
    if len(verdicts) > 1:
        return EngineVerdict("istio", UNKNOWN, "the mTLS state was not recorded and the "
                             f"outcome depends on it: with mTLS {first.decision.reason}; "
                             f"without: {results[-1].decision.reason}")
    for r in results:
        for name, parts in r.hits.items():
            hits.setdefault(name, set()).update(parts)
    decision = first.decision
    if decision.verdict == ALLOW and decision.reason == "no ALLOW policy applies":
        key = ("istio", obs.destination, obs.port, "no ALLOW AuthorizationPolicy applies: "
               "every client may call it")
        open_[key] = open_.get(key, 0) + obs.requests
    if first.mtls_mode == "PERMISSIVE" and decision.verdict != DENY:
        permissive.setdefault((obs.destination, obs.port), []).append(
            (obs.mtls, obs.requests))
    return EngineVerdict("istio", decision.verdict, decision.reason, decision.policy)


def _linkerd(obs: Observation, lk: linkerd.LinkerdPolicies, ctx: _Context,
             defaults: Mapping[str, str], options: CheckOptions, hits: dict[str, set[str]],
             open_: dict[tuple[str, str, int, str], int]) -> EngineVerdict:
    skip = _not_applicable(obs, ctx, "linkerd", "linkerd-proxy")
    if skip is not None:
        return skip
    if ctx.proxy(obs.destination, obs.destination_pod, "linkerd-proxy") is False:
        open_ = {}  # not enforced: nothing to say about what its defaults let through
    labels = ctx.labels(obs.destination, obs.destination_pod)
    if labels is None:
        return EngineVerdict("linkerd", UNKNOWN, "destination pod labels are not known")
    ns = obs.destination.split("/", 1)[0]
    default = (defaults.get(obs.destination_pod or "") or defaults.get(obs.destination)
               or defaults.get(ns))
    names = tuple(sorted(p.name for p in ctx.ports(obs.destination, obs.destination_pod)
                         if p.name and p.port == obs.port))
    domain = options.linkerd_identity_domain or options.trust_domain
    results = []
    for principal in _identities(obs, ctx):
        req = linkerd.LinkerdRequest(
            namespace=ns, labels=labels, port=obs.port, port_names=names,
            protocol=obs.protocol if obs.protocol in ("http", "grpc") else "tcp",
            method=obs.method, path=obs.path,
            client_identity=linkerd.linkerd_identity(principal, domain),
            client_ip=obs.source_ip, default_policy=default,
            probe_paths=ctx.probes(obs.destination, obs.destination_pod), host=obs.host)
        results.append(linkerd.evaluate_linkerd(lk, req))
    verdicts = {r.verdict for r in results}
    if len(verdicts) > 1:
        return EngineVerdict("linkerd", UNKNOWN, "the mTLS state was not recorded and the "
                             f"outcome depends on it: with mTLS {results[0].reason}; "
                             f"without: {results[-1].reason}")
    for r in results:
        for name, parts in r.hits.items():
            hits.setdefault(name, set()).update(parts)
    first = results[0]
    if first.verdict == ALLOW and (first.authorization or "").startswith("default:") and \
            first.authorization != "default:probe":
        key = ("linkerd", obs.destination, obs.port,
               f"{first.reason} ({first.authorization.removeprefix('default:')} admits it)"
               if first.authorization else first.reason)
        open_[key] = open_.get(key, 0) + obs.requests
    return EngineVerdict("linkerd", first.verdict, first.reason,
                         first.authorization or first.server)


def _endpoint(node_id: str, pod: str | None, ip: str | None, ctx: _Context,
              with_ports: bool) -> netpol.Endpoint:
    if node_id.startswith("external:"):
        return netpol.Endpoint(ip=ip, external=True)
    if not ctx.is_workload(node_id):
        return netpol.Endpoint(ip=ip)
    ns = node_id.split("/", 1)[0]
    return netpol.Endpoint(
        namespace=ns, labels=ctx.labels(node_id, pod),
        namespace_labels=ctx.ns_labels.get(ns, {}), ip=ip,
        ports=ctx.ports(node_id, pod) if with_ports else ())


def _netpol(obs: Observation, manifests: Sequence[Mapping[str, Any]], ctx: _Context,
            hits: dict[str, set[str]],
            open_: dict[tuple[str, str, int, str], int]) -> EngineVerdict:
    conn = netpol.Connection(
        source=_endpoint(obs.source, obs.source_pod, obs.source_ip, ctx, False),
        destination=_endpoint(obs.destination, obs.destination_pod, obs.destination_ip, ctx,
                              True),
        port=obs.port, protocol=obs.transport.upper(), from_node=ctx.from_node(obs))
    decision = netpol.evaluate_netpol(manifests, conn)
    for name, parts in decision.hits.items():
        hits.setdefault(name, set()).update(parts)
    if decision.verdict == ALLOW and decision.ingress == "unrestricted":
        key = ("netpol", obs.destination, obs.port,
               "no NetworkPolicy isolates the pod for Ingress")
        open_[key] = open_.get(key, 0) + obs.requests
    return EngineVerdict("netpol", decision.verdict, decision.reason)


# -- output ---------------------------------------------------------------------------------


def _checked_json(c: Checked) -> dict[str, Any]:
    o = c.observation
    return {
        "source": o.source, "destination": o.destination, "port": o.port,
        "transport": o.transport, "protocol": o.protocol, "method": o.method, "path": o.path,
        "host": o.host, "mtls": o.mtls, "source_ip": o.source_ip, "requests": o.requests,
        "verdict": c.verdict,
        "engines": [{"engine": v.engine, "verdict": v.verdict, "reason": v.reason,
                     "policy": v.policy, **({"latent": v.latent} if v.latent else {})}
                    for v in c.engines],
        "evidence": list(o.evidence),
    }


def result_json(result: CheckResult) -> dict[str, Any]:
    """The documented JSON document (see the module docstring)."""
    checked = result.checked
    summary = {
        "observations": len(checked),
        "requests": sum(c.observation.requests for c in checked),
        "allowed": sum(1 for c in checked if c.verdict == ALLOW),
        "denied": sum(1 for c in checked if c.verdict == DENY),
        "unknown": len(result.unknown),
        "breakage": len(result.breakage),
        "breakage_requests": sum(c.observation.requests for c in result.breakage),
        "newly_allowed": len(result.newly_allowed),
        "still_denied": len(result.still_denied),
        "latent_breakage": len(result.latent_breakage),
        "over_permission": len(result.over_permission),
        "unrestricted": len(result.unrestricted),
    }
    return {
        "version": 1,
        "engines": result.engines,
        "policies": {"objects": len(result.policies.manifests),
                     "by_kind": result.policies.by_kind(),
                     "ignored": dict(sorted(result.policies.ignored.items()))},
        "summary": summary,
        "breakage": [_checked_json(c) for c in result.breakage],
        "unknown": [_checked_json(c) for c in result.unknown],
        "newly_allowed": [_checked_json(c) for c in result.newly_allowed],
        "still_denied": [_checked_json(c) for c in result.still_denied],
        "latent_breakage": [_checked_json(c) for c in result.latent_breakage],
        "over_permission": [
            {"engine": o.engine, "object": o.object, "part": o.part, "what": o.what,
             "origin": o.origin} for o in result.over_permission],
        "unrestricted": [
            {"engine": u.engine, "destination": u.destination, "port": u.port,
             "requests": u.requests, "what": u.what} for u in result.unrestricted],
    }


def dumps_json(result: CheckResult) -> str:
    return json.dumps(result_json(result), indent=2, sort_keys=False) + "\n"


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _rows(items: Sequence[Checked], latent: bool = False) -> list[str]:
    lines = ["| source | destination | port | request | mTLS | requests | why | evidence |",
             "|---|---|---|---|---|---|---|---|"]
    for c in items:
        o = c.observation
        request = f"{o.method} {o.path}" if o.method else o.protocol
        why = "; ".join(f"{v.engine}: {v.reason}" for v in c.engines
                        if (v.latent == DENY if latent else v.verdict == c.verdict))
        lines.append("| " + " | ".join(_cell(x) for x in (
            o.source + (f" ({o.source_ip})" if o.source_ip and o.mtls != "mtls" else ""),
            o.destination, o.port, request, o.mtls, o.requests, why,
            ", ".join(o.evidence))) + " |")
    return lines


def render_markdown(result: CheckResult) -> str:
    """The report: summary, breakage, unknowns, over-permission tables."""
    doc = result_json(result)
    s = doc["summary"]
    out = ["# meshwright check", ""]
    out.append(f"Engines: {', '.join(result.engines) or 'none'}; "
               f"{doc['policies']['objects']} policy objects "
               f"({', '.join(f'{k}: {v}' for k, v in doc['policies']['by_kind'].items())}).")
    if doc["policies"]["ignored"]:
        out.append("Not evaluated: " + ", ".join(f"{k}: {v}" for k, v in
                                                  doc["policies"]["ignored"].items()) + ".")
    out.append("")
    out.append(f"{s['observations']} distinct observations ({s['requests']} requests): "
               f"{s['allowed']} allowed, {s['denied']} denied, {s['unknown']} unknown. "
               f"**Breakage: {s['breakage']}** ({s['breakage_requests']} requests); "
               f"over-permission: {s['over_permission']}; unrestricted: {s['unrestricted']}.")
    sections = [
        ("Breakage: observed traffic the policies would deny", result.breakage, False),
        ("Unknown: cannot be decided from the evidence", result.unknown, False),
        ("Newly allowed: denied when recorded, allowed by these policies",
         result.newly_allowed, False),
        ("Latent breakage: not enforced yet (the destination runs no proxy of the mesh), "
         "denied once it does", result.latent_breakage, True),
    ]
    for title, items, latent in sections:
        out += ["", f"## {title}", ""]
        out += _rows(items, latent) if items else ["None."]
    out += ["", "## Over-permission: permissions no observed traffic exercised", ""]
    if result.over_permission:
        out += ["| engine | object | part | what | file |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join(_cell(x) for x in (o.engine, o.object, o.part or "(all)",
                                                     o.what, o.origin)) + " |"
                for o in result.over_permission]
    else:
        out.append("None.")
    out += ["", "## Unrestricted: observed traffic nothing restricts", ""]
    if result.unrestricted:
        out += ["| engine | destination | port | requests | what |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join(_cell(x) for x in (u.engine, u.destination, u.port,
                                                     u.requests, u.what)) + " |"
                for u in result.unrestricted]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"
