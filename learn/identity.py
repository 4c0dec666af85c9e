"""Who is behind an address, as of the flow's time.

Resolution order for each side of a flow record:

1. The reporter side (inbound: the server, outbound: the client) is the reporter pod's workload:
   exact, whatever its address.
2. Otherwise the address is looked up among pod lifetimes as of the record's ``time``: every
   pod of the inventory owns its ``status.podIPs`` from ``startTime`` (else creation) until it
   ended (open-ended while alive), and every reporter owned its local address when it logged
   (``learn_leases``). Pod IPs are reused, so two pods with the same IP at different times
   resolve by time; when lifetimes overlap, are missing or leave a gap, the record gets
   ``unknown:<ip>`` and an ambiguity, unless the record's proven principal (``src_principal`` /
   ``dst_principal``) picks exactly one candidate workload by service account.
3. A Service ClusterIP as destination (the record did not say which endpoint served it) maps
   to the workloads the Service selects and ``dst_port`` becomes the targetPort. One workload:
   that workload. Several (Bookinfo's reviews-v1/v2/v3) and nothing in the record picks one:
   ``service:<ns>/<name>``, a distinct node id that policies never allow and the report lists,
   plus an ambiguity. Guessing would grant a workload traffic it may never have received.
4. A node address (host-network pods share it, kubelet probes come from it) is never pinned
   on one host-network pod: ``unknown:<ip>`` plus an ambiguity.
5. Private addresses (RFC 1918, CGNAT, link-local, loopback, ULA) that match nothing:
   ``unknown:<ip>``. Public ones: ``external:<host or ip>``.

Linkerd records (``source`` ``linkerd-*``, see :mod:`observe.linkerd`) differ in two ways:

* **Client identity first.** A ``src_principal`` that is a Linkerd identity
  (``<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>``; the trust domain
  and control-plane namespace are read from it, never assumed) names the workloads whose pods
  run as that service account in that namespace. One such workload: the client, whatever its
  address says; if the address (time-aware, as in 2.) belonged to another workload at that
  time, that mismatch is an ambiguity. Several (a shared service account): the address picks
  among them; if it picks none of them, ``unknown:<ip>`` and an ambiguity. None in the
  inventory: the address decides as for any record, and an address owner running as another
  service account is an ambiguity (``unknown:<ip>``), not attributed. Records without an
  identity (``-``: plaintext, e.g. kubelet probes) resolve by address only.
* **Destination port.** The server-side proxy logs no local address: the destination is the
  reporter's workload (rule 1) and ``dst_port`` is derived from the port the client dialled
  (``dialed_port``): a Service ClusterIP or a Service named by the authority (``web-svc``,
  ``web-svc.emojivoto``, ``...svc.cluster.local``) that selects the workload maps it to the
  targetPort; a pod IP or a port the workload's containers declare is the port itself. A
  request with no port at all (Linkerd's ``apache`` format of an HTTP/1 origin-form request,
  ``GET /ping``) gets the port of the workload's HTTP probe with that path, else the only port
  its containers declare (both noted as inferred); anything else is an ambiguity and the
  record stays unattributed. A Linkerd record never becomes ``external:``: it reached a
  meshed pod.

Node ids: ``<ns>/<workload>`` | ``external:<ip-or-host>`` | ``unknown:<ip>`` |
``service:<ns>/<name>``.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from learn.model import EXTERNAL, UNKNOWN, Node, has_ingress_gateway_labels
from observe.inventory import Inventory, PodRecord, ServiceRecord, WorkloadRecord
from observe.linkerd import LinkerdIdentity, identity_name, parse_identity

log = logging.getLogger(__name__)

#: Kind of ``service:<ns>/<name>`` nodes (a Service whose backing workload is not known).
SERVICE = "Service"
#: Tolerated clock difference between log timestamps and the inventory's lifetimes (µs).
CLOCK_SKEW_US = 60 * 1_000_000
#: How far past a log-only lease (first..last seen) its pod is still assumed to hold the IP (µs).
LEASE_GRACE_US = 10 * 60 * 1_000_000
#: Labels that vary per pod, revision or run: never part of a selector.
UNSTABLE_LABELS = frozenset({
    "pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index", "batch.kubernetes.io/controller-uid", "controller-uid",
    "pod-template-generation", "batch.kubernetes.io/job-completion-index",
})
#: Per-run labels of a CronJob's jobs.
CRONJOB_RUN_LABELS = frozenset({"job-name", "batch.kubernetes.io/job-name"})
#: Preferred selector keys, most preferred first.
WELL_KNOWN_LABELS = (
    "app.kubernetes.io/name", "app", "k8s-app", "app.kubernetes.io/instance",
    "app.kubernetes.io/component", "component", "name", "version", "app.kubernetes.io/version",
    "tier", "role", "release",
)
#: Labels naming the application; a selector always keeps the first one present.
_ANCHORS = ("app.kubernetes.io/name", "app", "k8s-app")
#: Labels the mesh injects: stable but shared by every meshed pod, so least preferred.
_INJECTED_PREFIXES = ("security.istio.io/", "service.istio.io/", "linkerd.io/", "istio.io/")
#: Kind preference when two kinds share a name in one namespace (same node id).
_KIND_ORDER = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job", "ReplicaSet", "Pod")
_PASSTHROUGH = ("PassthroughCluster", "BlackHoleCluster", "InboundPassthroughCluster")

_MIN = np.iinfo(np.int64).min
_MAX = np.iinfo(np.int64).max
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOY_POD = re.compile(rf"^(?P<base>.+)-(?P<hash>{_SAFE}{{6,10}})-{_SAFE}{{5}}$")
_CRON_POD = re.compile(rf"^(?P<base>.+)-\d{{8,10}}-{_SAFE}{{5}}$")
_STS_POD = re.compile(r"^(?P<base>.+)-\d+$")
_SUFFIX_POD = re.compile(rf"^(?P<base>.+)-{_SAFE}{{5}}$")
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "127.0.0.0/8", "0.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128", "::/128",
))
_PRINCIPAL = re.compile(r"^(?:spiffe://)?[^/]+/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")
#: ``source`` values of Linkerd access-log records (observe.linkerd).
_LINKERD_PREFIX = "linkerd-"
#: Containers whose ports are the mesh's, never the application's.
_PROXY_CONTAINERS = frozenset({"linkerd-proxy", "istio-proxy", "linkerd-init", "istio-init"})


@dataclass
class _Lease:
    """A pod holding an address over [start, end] (µs since the epoch)."""

    start: int
    end: int
    pod: str
    workload: str
    from_logs: bool
    has_lifetime: bool


class IdentityResolver:
    """Resolves flow endpoints to node ids, as of each record's time (see the module doc)."""

    def __init__(self, inventory: Inventory, *, trust_domain: str = "cluster.local") -> None:
        self.inventory = inventory
        self.trust_domain = trust_domain
        self._workloads: dict[str, WorkloadRecord] = {}
        for key in sorted(inventory.workloads, key=lambda k: (k[0], k[2], _kind_rank(k[1]))):
            wl = inventory.workloads[key]
            other = self._workloads.get(wl.id)
            if other is None:
                self._workloads[wl.id] = wl
            else:
                self._ambiguity(f"id:{wl.id}", f"{wl.id}: {other.kind} and {wl.kind} share the "
                                f"node id; {other.kind} is used")
        self._pods: dict[str, list[PodRecord]] = {}
        for pod in inventory.pods:
            self._pods.setdefault(pod.key, []).append(pod)
        self._services_by_ip: dict[str, ServiceRecord] = {}
        self._services_by_name: dict[tuple[str, str], ServiceRecord] = dict(inventory.services)
        for svc in inventory.services.values():
            for ip in svc.cluster_ips:
                self._services_by_ip[ip] = svc
        self._node_ips: dict[str, set[str]] = {}
        for pod in inventory.pods:
            if pod.host_ip:
                self._node_ips.setdefault(pod.host_ip, set())
            if pod.host_network:
                for ip in pod.ips:
                    self._node_ips.setdefault(ip, set()).add(pod.key)
        self._log_leases: dict[tuple[str, str], list[int]] = {}
        self._leases: dict[str, list[_Lease]] | None = None
        self._reporters: dict[str, tuple[str, str]] = {}
        self._log_workloads: dict[str, str] = {}
        self._ambiguities: dict[str, list[object]] = {}
        self._inferred: dict[str, str] = {}
        self._selectors: dict[str, dict[str, str]] = {}
        self._backing: dict[tuple[str, str], list[WorkloadRecord]] = {}
        self._by_sa: dict[tuple[str, str], list[str]] | None = None
        self._linkerd_domains: dict[tuple[str, str], int] = {}
        self._mute = False

    # -- reports ---------------------------------------------------------------------------
    @property
    def ambiguities(self) -> list[str]:
        """Resolution ambiguities, one line each (with the number of records), sorted."""
        out = []
        for message, count in self._ambiguities.values():
            out.append(f"{message} ({count} record{'' if count == 1 else 's'})")
        return sorted(out)

    @property
    def linkerd_domains(self) -> list[tuple[str, str]]:
        """``(control-plane namespace, trust domain)`` of the Linkerd identities seen, most
        frequent first (``[("linkerd", "cluster.local")]`` on a default install)."""
        return sorted(self._linkerd_domains, key=lambda k: (-self._linkerd_domains[k], k))

    @property
    def inferred(self) -> list[str]:
        """Identities inferred rather than read from the inventory, sorted."""
        return sorted(self._inferred.values())

    # -- leases from the logs --------------------------------------------------------------
    def learn_leases(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Record which reporter pod owned which local address when (first/last seen)."""
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        direction = table["direction"]
        local = pc.if_else(pc.equal(direction, "inbound"), table["dst_ip"],
                           pc.if_else(pc.equal(direction, "outbound"), table["src_ip"],
                                      pa.scalar(None, pa.string())))
        frame = pa.table({
            "reporter": table["reporter"], "ip": local,
            "t": table["time"].cast(pa.int64()),
        })
        frame = frame.filter(pc.and_(pc.is_valid(frame["reporter"]), pc.is_valid(frame["ip"])))
        frame = frame.filter(pc.is_valid(frame["t"]))
        if frame.num_rows == 0:
            return
        grouped = frame.group_by(["reporter", "ip"]).aggregate([("t", "min"), ("t", "max")])
        for reporter, ip, first, last in zip(
            grouped["reporter"].to_pylist(), grouped["ip"].to_pylist(),
            grouped["t_min"].to_pylist(), grouped["t_max"].to_pylist(), strict=True,
        ):
            if _is_loopback(ip):
                continue
            key = (reporter, ip)
            seen = self._log_leases.get(key)
            if seen is None:
                self._log_leases[key] = [first, last]
            else:
                seen[0], seen[1] = min(seen[0], first), max(seen[1], last)
        self._leases = None

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with src/dst_workload filled, dst_port at the workload port, and
        ``src_pod``/``dst_pod`` ('<ns>/<pod>' or null) appended."""
        n = batch.num_rows
        names = batch.schema.names
        leases = self._lease_index()

        def col(name: str) -> np.ndarray:
            if name not in names:
                return np.full(n, None, dtype=object)
            column = batch.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                # Arrow's own conversion to an object array: no Python list in between.
                return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
            return np.asarray(column.to_pylist(), dtype=object)

        if "time" in names:
            tcol = batch.column("time").cast(pa.int64())
            tnull = np.asarray(tcol.is_null().to_pylist(), dtype=bool) if tcol.null_count else (
                np.zeros(n, dtype=bool))
            times = np.asarray(pc.fill_null(tcol, 0).to_numpy(zero_copy_only=False),
                               dtype=np.int64)
        else:
            times, tnull = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
        direction = col("direction")
        reporter = col("reporter")
        linkerd = (np.asarray(pc.fill_null(pc.starts_with(batch.column("source"),
                                                          _LINKERD_PREFIX), False)
                              .to_numpy(zero_copy_only=False), dtype=bool)
                   if "source" in names else np.zeros(n, dtype=bool))
        dst_port = col("dst_port")
        ctx = _Rows(
            times=times, tnull=tnull, host=col("service_host"), sni=col("sni"),
            authority=col("authority"), cluster=col("upstream_cluster"),
        )
        out: dict[str, list[np.ndarray]] = {}
        for side in ("src", "dst"):
            workload = col(f"{side}_workload")
            pod = np.full(n, None, dtype=object)
            # 1. the reporter's own side
            mine = (direction == ("inbound" if side == "dst" else "outbound")) & ~_isnull(
                reporter)
            unset = _isnull(workload)
            for rep, rows in _groups(reporter, mine):
                wl_id, pod_key = self._reporter(rep)
                workload[rows[unset[rows]]] = wl_id
                pod[rows] = pod_key
            ips = col(f"{side}_ip")
            principal = col(f"{side}_principal")
            if side == "src" and linkerd.any():
                # Linkerd: the client's mTLS identity first (see the module docstring).
                self._linkerd_clients(principal, ips, _isnull(workload) & linkerd
                                      & ~_isnull(principal), ctx, leases, workload, pod)
            # 2.-5. by address
            todo = _isnull(workload) & ~_isnull(ips)
            for ip, rows in _groups(ips, todo):
                wl_ids, pod_keys = self._by_address(ip, rows, ctx, principal, side, leases)
                workload[rows] = wl_ids
                pod[rows] = pod_keys
            out[side] = [workload, pod]

        # Service VIP destinations: backing workload(s) and the targetPort.
        dst_ips = col("dst_ip")
        dialed = col("dialed_ip")
        dialed_port = col("dialed_port")
        vip = np.array([ip in self._services_by_ip for ip in dst_ips], dtype=bool) if n else (
            np.zeros(0, dtype=bool))
        via_dialed = _isnull(dst_ips) & np.array(
            [ip in self._services_by_ip for ip in dialed], dtype=bool) if n else vip
        dst_workload, dst_pod = out["dst"]
        for rows_mask, addr, ports in ((vip, dst_ips, dst_port), (via_dialed, dialed,
                                                                  dialed_port)):
            for vip_ip, vip_rows in _groups(addr, rows_mask):
                svc = self._services_by_ip[vip_ip]
                rows = np.zeros(n, dtype=bool)
                rows[vip_rows] = True
                for port in _unique(ports[rows], keep_none=True):
                    prow = rows & (ports == port) if port is not None else rows & _isnull(ports)
                    if port is not None:
                        target = self.inventory.resolve_target_port(svc, int(str(port)))
                        dst_port[prow] = target if target is not None else port
                    self._service_rows(svc, np.flatnonzero(prow), dst_workload, dst_pod,
                                       col("dst_principal"))
        if linkerd.any():
            self._linkerd_ports(linkerd & _isnull(dst_port) & ~_isnull(dst_workload),
                                dst_workload, dialed, dialed_port, ctx.host, col("path"),
                                dst_port)
        # Destination named only by a cluster FQDN (no address: UH, NR, ...).
        unnamed = _isnull(dst_workload) & _isnull(dst_ips) & ~_isnull(ctx.host)
        for host in _unique(ctx.host[unnamed]):
            rows = np.flatnonzero(unnamed & (ctx.host == host))
            named = self._service_by_host(str(host))
            if named is not None:
                self._service_rows(named, rows, dst_workload, dst_pod, col("dst_principal"))
            elif self._external_name(str(host)):
                # A Linkerd record reached a meshed pod: its host is never external.
                rows = rows[~linkerd[rows]]
                dst_workload[rows] = f"{EXTERNAL}:{host}"
        # An address no pod lifetime explains (say a pod deleted before the inventory was
        # taken) on a record that names the Service it was sent to (Istio's mTLS SNI, the
        # upstream cluster): the endpoint belongs to that Service, so its one workload;
        # several: ``service:<ns>/<name>`` as for a VIP.
        lost = np.array([isinstance(w, str) and w.startswith(f"{UNKNOWN}:")
                         for w in dst_workload.tolist()], dtype=bool) if n else (
            np.zeros(0, dtype=bool))
        lost &= ~_isnull(ctx.host) & ~linkerd
        for host in _unique(ctx.host[lost]):
            named = self._service_by_host(str(host))
            if named is not None:
                rows = np.flatnonzero(lost & (ctx.host == host))
                self._service_rows(named, rows, dst_workload, dst_pod, col("dst_principal"))
        missing = _isnull(dst_workload) & _isnull(dst_ips) & ~linkerd
        if missing.any():
            for row in np.flatnonzero(missing):
                host = ctx.external_host(int(row), passthrough_only=False)
                if host:
                    dst_workload[row] = f"{EXTERNAL}:{host}"

        columns = []
        for field in batch.schema:
            if field.name == "src_workload":
                columns.append(pa.array(out["src"][0].tolist(), type=field.type))
            elif field.name == "dst_workload":
                columns.append(pa.array(dst_workload.tolist(), type=field.type))
            elif field.name == "dst_port":
                columns.append(pa.array(
                    [None if v is None else int(v) for v in dst_port.tolist()], type=field.type))
            else:
                columns.append(batch.column(field.name))
        schema = batch.schema
        if "src_workload" not in names:
            schema = schema.append(pa.field("src_workload", pa.string()))
            columns.append(pa.array(out["src"][0].tolist(), type=pa.string()))
        if "dst_workload" not in names:
            schema = schema.append(pa.field("dst_workload", pa.string()))
            columns.append(pa.array(dst_workload.tolist(), type=pa.string()))
        for side in ("src", "dst"):
            name = f"{side}_pod"
            arr = pa.array(out[side][1].tolist(), type=pa.string())
            if name in names:
                columns[names.index(name)] = arr
            else:
                schema = schema.append(pa.field(name, pa.string(), metadata={
                    "doc": f"'<ns>/<pod>' resolved for the {side} side; null if not a known pod."
                }))
                columns.append(arr)
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    def _by_address(self, ip: str, rows: np.ndarray, ctx: _Rows, principal: np.ndarray,
                    side: str, leases: dict[str, list[_Lease]]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Node ids and pod keys for ``rows`` whose ``side`` address is ``ip``."""
        k = len(rows)
        wl = np.full(k, None, dtype=object)
        pods = np.full(k, None, dtype=object)
        candidates = leases.get(ip)
        if candidates:
            t = ctx.times[rows]
            tnull = ctx.tnull[rows]
            idx = _pick_lease(candidates, t, tnull)
            for i in np.flatnonzero(idx >= 0):
                lease = candidates[int(idx[i])]
                wl[i], pods[i] = lease.workload, lease.pod
            for i in np.flatnonzero(idx < 0):
                wl[i], pods[i] = self._undecided(ip, candidates, int(t[i]), bool(tnull[i]),
                                                 principal[rows[i]], side)
            return wl, pods
        if side == "dst" and ip in self._services_by_ip:
            return wl, pods  # a Service VIP: resolved with its port afterwards
        if ip in self._node_ips:
            holders = sorted(self._node_ips[ip])
            self._ambiguity(f"node:{ip}", f"{ip} is a node address (host-network pods: "
                            f"{', '.join(holders) or 'none known'}); not attributed",
                            count=k)
            wl[:] = f"{UNKNOWN}:{ip}"
            return wl, pods
        if _is_private(ip):
            wl[:] = f"{UNKNOWN}:{ip}"
            return wl, pods
        for j, row in enumerate(rows):
            host = ctx.external_host(int(row), passthrough_only=True) if side == "dst" else None
            wl[j] = f"{EXTERNAL}:{host or ip}"
        return wl, pods

    def _undecided(self, ip: str, candidates: Sequence[_Lease], t: int, tnull: bool,
                   principal: object, side: str) -> tuple[str | None, str | None]:
        """Time does not decide: overlapping/missing lifetimes, or no lease covers ``t``."""
        live = [c for c in candidates if tnull or (c.start - CLOCK_SKEW_US <= t
                                                   <= c.end + CLOCK_SKEW_US)]
        pool = live or list(candidates)
        workloads = sorted({c.workload for c in pool})
        if live and len(workloads) == 1:
            pod_keys = {c.pod for c in live}
            return workloads[0], pod_keys.pop() if len(pod_keys) == 1 else None
        if principal:
            picked = self._by_principal(str(principal), workloads)
            if picked is not None:
                self._infer(f"principal:{ip}:{picked}",
                            f"{ip}: {side} resolved to {picked} by its principal {principal} "
                            f"among {', '.join(workloads)}")
                return picked, None
        when = "unknown time" if tnull else _fmt(t)
        if live:
            self._ambiguity(f"overlap:{ip}", f"{ip}: several pods could own it at {when} "
                            f"({', '.join(sorted({c.pod for c in live}))}); not attributed")
        else:
            self._ambiguity(f"gap:{ip}", f"{ip}: seen at {when}, outside the lifetimes of its "
                            f"known pods ({', '.join(sorted({c.pod for c in pool}))}); "
                            "not attributed")
        return f"{UNKNOWN}:{ip}", None

    def _by_principal(self, principal: str, workloads: Iterable[str]) -> str | None:
        m = _PRINCIPAL.match(principal)
        if not m:
            return None
        ns, sa = m["ns"], m["sa"]
        matching = [w for w in workloads if w.startswith(ns + "/")
                    and (self._workloads.get(w) is not None)
                    and (self._workloads[w].service_account or "default") == sa]
        return matching[0] if len(matching) == 1 else None

    def _service_rows(self, svc: ServiceRecord, rows: np.ndarray, dst_workload: np.ndarray,
                      dst_pod: np.ndarray, principal: np.ndarray) -> None:
        backing = self._backing_of(svc)
        ids = sorted({w.id for w in backing})
        for row in rows:
            if dst_workload[row] is not None and not str(dst_workload[row]).startswith(
                    (f"{UNKNOWN}:", f"{EXTERNAL}:")):
                continue
            if len(ids) == 1:
                dst_workload[row] = ids[0]
                continue
            picked = self._by_principal(str(principal[row]), ids) if principal[row] else None
            if picked is not None:
                dst_workload[row] = picked
                continue
            dst_workload[row] = f"{SERVICE.lower()}:{svc.id}"
            dst_pod[row] = None
        if len(ids) != 1:
            why = (f"backed by {len(ids)} workloads ({', '.join(ids)})" if ids
                   else "selects no known workload")
            self._ambiguity(f"svc:{svc.id}", f"service {svc.id} {why}: records that reached its "
                            f"ClusterIP without naming an endpoint go to service:{svc.id}",
                            count=len(rows))

    def _backing_of(self, svc: ServiceRecord) -> list[WorkloadRecord]:
        key = (svc.namespace, svc.name)
        if key not in self._backing:
            self._backing[key] = self.inventory.workloads_behind(svc)
        return self._backing[key]

    def _service_by_host(self, host: str) -> ServiceRecord | None:
        parts = host.rstrip(".").split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            return self._services_by_name.get((parts[1], parts[0]))
        if len(parts) == 2:  # '<service>.<namespace>', as cluster DNS search paths allow
            return self._services_by_name.get((parts[1], parts[0]))
        return None

    @staticmethod
    def _external_name(host: str) -> bool:
        return ".svc." not in host + "." and not host.endswith(".local") and "." in host

    # -- Linkerd ---------------------------------------------------------------------------
    def workloads_running_as(self, namespace: str, service_account: str) -> list[str]:
        """Ids of the inventory workloads whose pods run as ``service_account`` (sorted).

        The pods' own service account wins over the template's (as in :meth:`node`); a
        workload without pods counts by its template (``default`` when unset).
        """
        if self._by_sa is None:
            by_sa: dict[tuple[str, str], set[str]] = {}
            for wid, wl in self._workloads.items():
                sas = {p.service_account or "default" for p in self.inventory.pods_of(wl)}
                if not sas:
                    sas = {wl.service_account or "default"}
                for sa in sas:
                    by_sa.setdefault((wl.namespace, sa), set()).add(wid)
            self._by_sa = {k: sorted(v) for k, v in by_sa.items()}
        return list(self._by_sa.get((namespace, service_account), []))

    def _linkerd_clients(self, principal: np.ndarray, ips: np.ndarray, mask: np.ndarray,
                         ctx: _Rows, leases: dict[str, list[_Lease]], workload: np.ndarray,
                         pod: np.ndarray) -> None:
        """Fill ``workload``/``pod`` of the ``mask`` rows from their Linkerd client identity."""
        for text, rows in _groups(principal, mask):
            ident = parse_identity(text)
            if ident is None:
                continue  # not a Linkerd identity: resolved by address as usual
            key = (ident.control_plane, ident.trust_domain)
            self._linkerd_domains[key] = self._linkerd_domains.get(key, 0) + len(rows)
            candidates = self.workloads_running_as(ident.namespace, ident.service_account)
            by_ip = np.full(len(rows), None, dtype=object)
            by_ip_pod = np.full(len(rows), None, dtype=object)
            sub_ips = ips[rows]
            # The address view, quietly: its ambiguities matter only where it decides.
            self._mute = bool(candidates)
            try:
                for ip, sub in _groups(sub_ips, ~_isnull(sub_ips)):
                    w, p = self._by_address(ip, rows[sub], ctx, principal, "src", leases)
                    by_ip[sub], by_ip_pod[sub] = w, p
            finally:
                self._mute = False
            for j, row in enumerate(rows.tolist()):
                workload[row], pod[row] = self._linkerd_pick(
                    ident, candidates, sub_ips[j], by_ip[j], by_ip_pod[j])

    def _linkerd_pick(self, ident: LinkerdIdentity, candidates: list[str], ip: object,
                      ip_wl: object, ip_pod: object) -> tuple[str | None, str | None]:
        """One record's client from its identity's candidates and its address's owner."""
        owner = str(ip_wl) if ip_wl is not None else None
        is_workload = owner is not None and ":" not in owner
        where = f"address {ip}" if ip is not None else "no address"
        if len(candidates) == 1:
            picked = candidates[0]
            if is_workload and owner != picked:
                self._ambiguity(
                    f"lkid:{ident.name}:{owner}",
                    f"{ident.name}: the Linkerd identity of {picked}, but its {where} belonged "
                    f"to {owner} then; the identity is used")
                return picked, None
            return picked, str(ip_pod) if ip_pod is not None and owner == picked else None
        if candidates:
            if owner in candidates:
                return owner, str(ip_pod) if ip_pod is not None else None
            self._ambiguity(
                f"lkshared:{ident.name}:{owner}",
                f"{ident.name}: service account {ident.namespace}/{ident.service_account} runs "
                f"{', '.join(candidates)}, and the {where} (owner: {owner or 'none known'}) "
                "picks none of them; not attributed")
            return (f"{UNKNOWN}:{ip}" if ip is not None else None), None
        # No inventory workload runs as this service account: the address decides.
        if is_workload:
            wl = self._workloads.get(str(owner))
            sas = ({p.service_account or "default" for p in self.inventory.pods_of(wl)}
                   if wl is not None else set())
            if wl is not None and wl.namespace == ident.namespace and (
                    ident.service_account in sas or (not sas and (wl.service_account or
                                                                  "default") ==
                                                     ident.service_account)):
                return owner, str(ip_pod) if ip_pod is not None else None
            if wl is not None:
                self._ambiguity(
                    f"lkid:{ident.name}:{owner}",
                    f"{ident.name}: its {where} belonged to {owner}, which runs as another "
                    "service account; not attributed")
                return (f"{UNKNOWN}:{ip}" if ip is not None else None), None
        self._infer(f"lknone:{ident.name}",
                    f"{ident.name}: no inventory workload runs as service account "
                    f"{ident.namespace}/{ident.service_account}; resolved by address")
        return (owner, str(ip_pod) if ip_pod is not None else None)

    def _linkerd_ports(self, mask: np.ndarray, dst_workload: np.ndarray, dialed: np.ndarray,
                       dialed_port: np.ndarray, host: np.ndarray, path: np.ndarray,
                       dst_port: np.ndarray) -> None:
        """``dst_port`` (the workload port) of Linkerd server-side records (module docstring)."""
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        frame = pd.DataFrame({
            "wid": dst_workload[idx], "port": dialed_port[idx], "host": host[idx],
            "ip": dialed[idx],
            "path": [None if p is None else str(p).split("?", 1)[0] for p in path[idx].tolist()],
        }, dtype=object)
        frame.loc[frame["port"].notna(), "path"] = None  # the path matters only without a port
        for key, positions in sorted(frame.groupby(["wid", "port", "host", "ip", "path"],
                                                   dropna=False, sort=False).indices.items(),
                                     key=lambda kv: str(kv[0])):
            wid, port, name, ip, req_path = (None if pd.isna(v) else v for v in key)
            found = self._linkerd_port(str(wid), port, name, ip, req_path, len(positions))
            if found is not None:
                dst_port[idx[positions]] = found

    def _linkerd_port(self, wid: str, port: object, host: object, ip: object,
                      path: object, count: int) -> int | None:
        wl = self._workloads.get(wid)
        if port is not None:
            dport = int(float(str(port)))  # pandas may hand a float key back
            if ip is not None:
                return dport  # a pod address dialled directly (a ClusterIP was mapped before)
            if wl is None:
                self._ambiguity(f"lkport:{wid}:{dport}",
                                f"{wid}: not in the inventory; the Service port {dport} its "
                                "clients dialled cannot be mapped to a workload port", count)
                return None
            services = [svc for svc in self.inventory.services_selecting(wl)
                        if any(p.port == dport for p in svc.ports)]
            named = [svc for svc in services if _names_service(str(host or ""), svc)]
            targets = {t for svc in (named or services)
                       if (t := self.inventory.resolve_target_port(svc, dport)) is not None}
            if len(targets) == 1:
                return targets.pop()
            declared = _app_ports(wl, self.inventory.pods_of(wl))
            if not services and dport in declared:
                return dport  # a headless Service or a pod name: the pod's own port
            self._ambiguity(
                f"lkport:{wid}:{dport}",
                f"{wid}: Linkerd records of requests dialled to port {dport}"
                f"{f' of {host}' if host else ''} match "
                + (f"Services with target ports {sorted(targets)}" if targets else
                   "no Service port or container port of it")
                + "; not attributed", count)
            return None
        # No port in the record: Linkerd's apache format of an origin-form request.
        if wl is not None:
            probe_ports = {p.port for p in wl.probes
                           if isinstance(p.port, int) and path is not None and p.path.split(
                               "?", 1)[0] == path}
            if len(probe_ports) == 1:
                found = probe_ports.pop()
                self._infer(f"lkprobe:{wid}:{path}",
                            f"{wid}: requests for {path} without a port taken as its HTTP "
                            f"probe on port {found}")
                return found
            declared = _app_ports(wl, self.inventory.pods_of(wl))
            if len(declared) == 1:
                found = next(iter(declared))
                self._infer(f"lkonly:{wid}", f"{wid}: requests without a port taken as its "
                            f"only declared container port {found}")
                return found
        self._ambiguity(f"lknoport:{wid}",
                        f"{wid}: Linkerd records without a port (apache format, no authority) "
                        "and no single probe or container port to take; not attributed", count)
        return None

    # -- reporters and leases --------------------------------------------------------------
    def _reporter(self, key: str) -> tuple[str, str]:
        """(node id, pod key) of a reporter '<ns>/<pod>'."""
        found = self._reporters.get(key)
        if found is None:
            pods = self._pods.get(key)
            wid = self._workload_id(pods[0]) if pods else self._infer_from_name(key)
            found = (wid, key)
            self._reporters[key] = found
        return found

    def _workload_id(self, pod: PodRecord) -> str:
        return f"{pod.namespace}/{pod.workload[1]}"

    def _infer_from_name(self, key: str) -> str:
        ns, _, name = key.partition("/")
        known = {(wl.kind, wl.name) for wl in self.inventory.workloads.values()
                 if wl.namespace == ns}
        guesses: list[tuple[str, str]] = []
        m = _DEPLOY_POD.match(name)
        if m:
            guesses += [("Deployment", m["base"]), ("ReplicaSet", f"{m['base']}-{m['hash']}")]
        m = _CRON_POD.match(name)
        if m:
            guesses.append(("CronJob", m["base"]))
        m = _STS_POD.match(name)
        if m:
            guesses.append(("StatefulSet", m["base"]))
        m = _SUFFIX_POD.match(name)
        if m:
            guesses += [("DaemonSet", m["base"]), ("Job", m["base"]), ("ReplicaSet", m["base"])]
        for kind, base in guesses:
            if (kind, base) in known:
                wid = f"{ns}/{base}"
                self._infer(f"pod:{key}", f"{key}: pod not in the inventory; workload {wid} "
                            f"({kind}) inferred from its name")
                return wid
        kind, base = guesses[0] if guesses and guesses[0][0] in (
            "Deployment", "CronJob", "StatefulSet") else ("Pod", name)
        wid = f"{ns}/{base}"
        self._log_workloads[wid] = kind
        self._infer(f"pod:{key}", f"{key}: pod not in the inventory; workload {wid} ({kind}) "
                    "guessed from its name, not in the inventory either")
        return wid

    def _lease_index(self) -> dict[str, list[_Lease]]:
        if self._leases is not None:
            return self._leases
        by_ip: dict[str, list[_Lease]] = {}
        for pod in self.inventory.pods:
            if pod.host_network:
                continue
            start = pod.started or pod.created
            for ip in pod.ips:
                by_ip.setdefault(ip, []).append(_Lease(
                    start=_us(start, _MIN), end=_us(pod.ended, _MAX), pod=pod.key,
                    workload=self._workload_id(pod), from_logs=False,
                    has_lifetime=start is not None,
                ))
        for (reporter, ip), (first, last) in sorted(self._log_leases.items()):
            if ip in self._node_ips and any(p.host_network for p in self._pods.get(reporter, [])):
                continue  # a host-network reporter proves nothing about the shared node IP
            mine = [c for c in by_ip.get(ip, []) if c.pod == reporter]
            if mine:
                # The logs prove the pod held it at these times: widen its known lifetime.
                best = min(mine, key=lambda c: abs(c.start - first) if c.has_lifetime else 0)
                best.start, best.end = min(best.start, first), max(best.end, last)
                continue
            wid, _ = self._reporter(reporter)
            by_ip.setdefault(ip, []).append(_Lease(
                start=first - LEASE_GRACE_US, end=last + LEASE_GRACE_US, pod=reporter,
                workload=wid, from_logs=True, has_lifetime=True,
            ))
        for items in by_ip.values():
            _trim_log_grace(items)
            items.sort(key=lambda c: (c.start, c.end, c.pod))
        self._leases = by_ip
        return by_ip

    # -- nodes -----------------------------------------------------------------------------
    def node(self, node_id: str) -> Node:
        """Describe one node id (workload, ``service:``, ``external:`` or ``unknown:``)."""
        kind_prefix, _, rest = node_id.partition(":")
        if kind_prefix == EXTERNAL and rest:
            return Node(id=node_id, kind=EXTERNAL, ips=[rest] if _is_ip(rest) else [])
        if kind_prefix == UNKNOWN and rest:
            return Node(id=node_id, kind=UNKNOWN, ips=[rest] if _is_ip(rest) else [])
        if kind_prefix == SERVICE.lower() and "/" in rest:
            ns, _, name = rest.partition("/")
            svc = self._services_by_name.get((ns, name))
            return Node(id=node_id, kind=SERVICE, namespace=ns, workload=None,
                        selector=dict(sorted((svc.selector if svc else {}).items())),
                        in_inventory=svc is not None, services=[rest])
        ns, _, name = node_id.partition("/")
        wl = self._workloads.get(node_id)
        if wl is None:
            kind = self._log_workloads.get(node_id, "Pod" if node_id in self._reporters else
                                           UNKNOWN)
            reporter_of = any(wid == node_id for wid, _ in self._reporters.values())
            return Node(id=node_id, kind=kind, namespace=ns or None, workload=name or None,
                        meshed=True if reporter_of else None, in_inventory=False)
        # The pods are what runs: their SA wins over a template that may have changed since.
        pod_sas = {p.service_account or "default" for p in self.inventory.pods_of(wl)}
        sa = pod_sas.pop() if len(pod_sas) == 1 else wl.service_account or "default"
        return Node(
            id=node_id, kind=wl.kind, namespace=wl.namespace, workload=wl.name,
            service_account=sa, principal=f"{self.trust_domain}/ns/{wl.namespace}/sa/{sa}",
            selector=self.selector(wl), meshed=wl.meshed, in_inventory=True,
            services=[s.id for s in self.inventory.services_selecting(wl)],
            ingress_gateway=has_ingress_gateway_labels(wl.labels),
        )

    def workloads(self) -> list[Node]:
        """Every inventory workload as a node, sorted by id."""
        return [self.node(wid) for wid in sorted(self._workloads)]

    def selector(self, wl: WorkloadRecord) -> dict[str, str]:
        """Smallest stable label set selecting exactly ``wl``'s pods in its namespace."""
        cached = self._selectors.get(wl.id)
        if cached is None:
            cached = self._selectors[wl.id] = self._compute_selector(wl)
        return dict(cached)

    def _compute_selector(self, wl: WorkloadRecord) -> dict[str, str]:
        banned = UNSTABLE_LABELS | (CRONJOB_RUN_LABELS if wl.kind == "CronJob" else frozenset())
        labels = {k: v for k, v in wl.labels.items() if k not in banned}
        if not labels:
            self._ambiguity(f"sel:{wl.id}", f"{wl.id}: no stable pod labels; no selector")
            return {}
        others: list[tuple[str, dict[str, str]]] = []
        for other in self.inventory.workloads.values():
            if other.namespace != wl.namespace or other.key == wl.key:
                continue
            others.append((other.id, other.labels))
            others += [(other.id, p.labels) for p in self.inventory.pods_of(other)]

        def clashes(keys: Sequence[str]) -> list[str]:
            return sorted({oid for oid, lab in others
                           if all(lab.get(k) == labels[k] for k in keys)})

        ranked = sorted(labels, key=lambda k: _label_rank(k, wl.selector))
        own = [k for k in ranked if k in wl.selector]
        # Anchor on the app's name label: `version: v3` alone may be unique today but would
        # select the next app that ships a v3.
        anchor = next((k for k in _ANCHORS if k in labels), None)
        for pool in (own, ranked):
            limit = len(pool) if len(pool) <= 8 else 3
            for size in range(1, limit + 1):
                for keys in itertools.combinations(pool, size):
                    if anchor in pool and anchor not in keys:
                        continue
                    if not clashes(keys):
                        return {k: labels[k] for k in sorted(keys)}
        clash = clashes(ranked)
        self._ambiguity(f"sel:{wl.id}", f"{wl.id}: its pod labels also select "
                        f"{', '.join(clash)}; selector is not exclusive")
        return {k: labels[k] for k in sorted(own or ranked)}

    # -- bookkeeping -----------------------------------------------------------------------
    def _ambiguity(self, key: str, message: str, count: int = 1) -> None:
        if self._mute:
            return
        entry = self._ambiguities.get(key)
        if entry is None:
            self._ambiguities[key] = [message, count]
        else:
            entry[1] = int(entry[1]) + count  # type: ignore[call-overload]

    def _infer(self, key: str, message: str) -> None:
        self._inferred.setdefault(key, message)


@dataclass
class _Rows:
    """Per-row columns the address rules need."""

    times: np.ndarray
    tnull: np.ndarray
    host: np.ndarray
    sni: np.ndarray
    authority: np.ndarray
    cluster: np.ndarray

    def external_host(self, row: int, *, passthrough_only: bool) -> str | None:
        """A host name for an external peer: service_host, else (passthrough) SNI/authority."""
        candidates = [self.host[row]]
        cluster = self.cluster[row]
        if not passthrough_only or (cluster and str(cluster) in _PASSTHROUGH):
            candidates += [self.sni[row], self.authority[row]]
        for value in candidates:
            if not value or value == "-":
                continue
            text = str(value)
            if text.startswith("outbound_."):
                continue  # Istio's mTLS SNI names a cluster service, not an external host
            host = _strip_port(text)
            if host and not _is_ip(host):
                return host
        return None


def _trim_log_grace(items: list[_Lease]) -> None:
    """Cut a log-proven lease's grace margin where the inventory says another pod held the IP.

    The margin covers clock skew and unlogged idle time around the logs' evidence; a pod the
    inventory saw start (or end) in that margin is better evidence than the margin itself.
    """
    for lease in items:
        if not lease.from_logs:
            continue
        first, last = lease.start + LEASE_GRACE_US, lease.end - LEASE_GRACE_US
        for other in items:
            if other.from_logs or not other.has_lifetime or other.pod == lease.pod:
                continue
            if last < other.start < lease.end:
                lease.end = other.start - 1
            if lease.start < other.end < first:
                lease.start = other.end + 1


def _pick_lease(candidates: Sequence[_Lease], t: np.ndarray, tnull: np.ndarray) -> np.ndarray:
    """Index of the lease holding the address at each time; -1 when time does not decide."""
    k = len(t)
    if len(candidates) == 1:
        c = candidates[0]
        if not c.has_lifetime and c.end == _MAX:
            return np.zeros(k, dtype=np.int64)
        lo, hi = max(c.start - CLOCK_SKEW_US, _MIN), min(c.end + CLOCK_SKEW_US, _MAX)
        inside = ((t >= lo) & (t <= hi)) | tnull
        return np.where(inside, 0, -1)
    if not all(c.has_lifetime for c in candidates):
        return np.full(k, -1, dtype=np.int64)
    starts = np.array([c.start for c in candidates], dtype=np.int64)
    ends = np.array([c.end for c in candidates], dtype=np.int64)
    if np.any(ends[:-1] >= starts[1:]):
        return np.full(k, -1, dtype=np.int64)  # overlapping lifetimes: decided row by row
    idx = np.searchsorted(starts, t, side="right") - 1
    safe = np.clip(idx, 0, None)
    ok = (idx >= 0) & (t <= ends[safe]) & ~tnull
    return np.where(ok, idx, -1)


def _groups(values: np.ndarray, mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(value, row indices) for the distinct non-null values under ``mask``, sorted by value.

    One hash pass (pandas.factorize) and one sort, whatever the number of distinct values.
    """
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    codes, uniques = pd.factorize(values[idx], use_na_sentinel=True)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    groups = []
    for part, start in zip(np.split(idx[order], starts[1:]), starts, strict=True):
        code = int(sorted_codes[start])
        if code >= 0:
            groups.append((str(uniques[code]), part))
    return sorted(groups, key=lambda g: g[0])


def _unique(values: np.ndarray, *, keep_none: bool = False) -> list[object]:
    seen = dict.fromkeys(values.tolist())
    return sorted((v for v in seen if v is not None or keep_none),
                  key=lambda v: (v is None, str(v)))


def _isnull(values: np.ndarray) -> np.ndarray:
    return np.array([v is None for v in values.tolist()], dtype=bool) if len(values) else (
        np.zeros(0, dtype=bool))


def _us(t: datetime | None, default: int) -> int:
    if t is None:
        return int(default)
    return (t - _EPOCH) // timedelta(microseconds=1)


def _fmt(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kind_rank(kind: str) -> int:
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)


def _label_rank(key: str, own: dict[str, str]) -> tuple[int, int, str]:
    known = WELL_KNOWN_LABELS.index(key) if key in WELL_KNOWN_LABELS else len(WELL_KNOWN_LABELS)
    injected = key.startswith(_INJECTED_PREFIXES)
    return (int(injected), known, key) if key not in own else (0, known, key)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_private(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return True  # not an address at all: never call it external
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in _PRIVATE_NETS)


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return True


def _strip_port(text: str) -> str:
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        return text.rsplit(":", 1)[0]
    return text


def _names_service(host: str, svc: ServiceRecord) -> bool:
    """True if an authority host names ``svc``: ``name``, ``name.ns``, ``name.ns.svc[...]``."""
    parts = host.lower().rstrip(".").split(".")
    if not parts or parts[0] != svc.name:
        return False
    return len(parts) == 1 or parts[1] == svc.namespace


def _app_ports(wl: WorkloadRecord, pods: Sequence[PodRecord]) -> set[int]:
    """TCP ports the workload's application containers declare (not the mesh proxy's)."""
    sources = [p.ports for p in pods] or [wl.ports]
    return {cp.port for ports in sources for cp in ports
            if cp.protocol == "TCP" and cp.container not in _PROXY_CONTAINERS}


def linkerd_identity(node: Node, *, control_plane: str = "linkerd",
                     trust_domain: str = "cluster.local") -> str | None:
    """The Linkerd mTLS identity of a workload node's pods, from its namespace and service
    account (``IdentityResolver.linkerd_domains`` gives the control plane and trust domain
    the logs showed); None for nodes without both."""
    if not node.namespace or not node.service_account:
        return None
    return identity_name(node.service_account, node.namespace, control_plane=control_plane,
                         trust_domain=trust_domain)


def reporters_from_pod_uids(batch: pa.RecordBatch, inventory: Inventory) -> pa.RecordBatch:
    """``batch`` with ``reporter`` set from ``pod_uid`` where the evidence named its own pod.

    eBPF records carry the pod UID of the local process's cgroup (``pod_uid``): that pod *is*
    the reporting side (``direction`` says which), whatever its address - a host-network pod
    or a reused IP cannot mislead it. Setting ``reporter`` to the pod's ``'<ns>/<pod>'`` makes
    :meth:`IdentityResolver.resolve` (rule 1) and :meth:`IdentityResolver.learn_leases` treat
    it exactly like a proxy's own records. A reporter already set is kept; UIDs the inventory
    does not hold (static pods' config hashes, pods gone before the dump) leave it null.
    Call it on each batch before ``learn_leases`` and ``resolve``.
    """
    names = batch.schema.names
    if "pod_uid" not in names or batch.num_rows == 0 or batch.column("pod_uid").null_count == (
            batch.num_rows):
        return batch
    by_uid = {pod.uid: pod.key for pod in inventory.pods if pod.uid}
    uids = pa.array(sorted(by_uid), type=pa.string())
    keys = pa.array([by_uid[u] for u in uids.to_pylist()], type=pa.string())
    found = pc.take(keys, pc.index_in(batch.column("pod_uid"), value_set=uids))
    if "reporter" in names:
        current = batch.column("reporter")
        reporter = pc.if_else(pc.is_valid(current), current, found)
        return batch.set_column(names.index("reporter"), batch.schema.field("reporter"),
                                reporter)
    return batch.append_column(pa.field("reporter", pa.string()), found)
