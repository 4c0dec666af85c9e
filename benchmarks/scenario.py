"""Detection quality of meshwright's findings on a generated two-day cluster.

    python benchmarks/scenario.py [--seeds 1 2 3 4 5] [--keep DIR] [--write-results]

A seeded multi-namespace cluster (``shop``: frontend, catalog, cart, checkout, payment,
recommend; ``data``: postgres, redis; ``ops``: a nightly report job) runs for two days: day 1
is the baseline, day 2 the detection day. Traffic follows a daily curve. Lines are Istio's
default TEXT format (rendered by :mod:`samples.envoy_lines`), one ``kubectl logs`` file per
proxy under ``logs/<ns>/<pod>/istio-proxy.log``, next to the ``inventory.json`` kubectl would
print at the end of day 2.

Day 2 carries benign change that must not raise a high-severity finding (the catalog rolls
out a new version with a new ``/v2`` API, the cart scales up for an evening sale, the nightly
report job runs again, a new ``reviews`` service starts taking traffic) and, unless
``attacks=False``, one injected attack of each kind at a random hour:

- ``scan``: a compromised frontend probes ~15 pod addresses on 12 ports in 5 minutes
  (connection failures ``UF,URX``);
- ``new-edge``: lateral movement from recommend to a sensitive service it never talked to;
- ``exfiltration``: the cart uploads ~450 MB to an outside address in 30 minutes;
- ``mtls-downgrade``: a checkout pod without its sidecar calls payment in plaintext for an hour;
- ``external-egress``: recommend opens connections to a mining pool outside the cluster;
- ``unknown-source``: an address no pod holds calls the catalog;
- ``denied``: the compromised frontend calls a payment admin path and is rejected (RBAC 403);
- ``anomaly``: path enumeration from the frontend on its own catalog edge (a known edge, so
  only the learned model and the new-operation rule can see it).

The benchmark observes and learns the dump with meshwright, uses day 1 as the baseline
(``--baseline-window 24h``), and scores findings: a finding is a true positive when its
source/destination matches an injected attack; recall per kind is the share of injected
attacks of that kind found by a finding of that kind. Benign-only runs count the false
high-severity findings per benign day.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samples.envoy_lines import (
    AccessEntry,
    HttpCall,
    TcpConn,
    inbound_entry,
    mtls_sni,
    outbound_cluster,
    outbound_entry,
    passthrough_entry,
    rbac_denied_details,
    render_text,
    service_fqdn,
    tcp_inbound_entry,
    tcp_outbound_entry,
)

DAY1 = datetime(2024, 6, 3, 0, 0, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
END = DAY2 + timedelta(days=1)
CREATED = DAY1 - timedelta(days=3)
ATTACK_KINDS = ("scan", "new-edge", "exfiltration", "mtls-downgrade", "external-egress",
                "unknown-source", "denied", "anomaly")
SENSITIVE_TARGETS = (("data", "postgres"), ("data", "redis"), ("shop", "payment"))
EXFIL_IP, MINER_IP, ARCHIVE_IP, PSP_IP = ("203.0.113.77", "198.51.100.200", "203.0.113.50",
                                          "198.51.100.10")
UNKNOWN_IP = "10.244.250.7"


@dataclass(frozen=True)
class Workload:
    ns: str
    name: str
    port: int
    """Container (target) port; the Service port is 80 for HTTP, the same for TCP."""
    http: bool = True
    replicas: int = 2

    @property
    def id(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def svc_port(self) -> int:
        return 80 if self.http else self.port


WORKLOADS = {w.name: w for w in (
    Workload("shop", "frontend", 8080, replicas=3),
    Workload("shop", "catalog", 8080),
    Workload("shop", "cart", 8080),
    Workload("shop", "checkout", 8080),
    Workload("shop", "payment", 8080),
    Workload("shop", "recommend", 8080),
    Workload("shop", "reviews", 8080, replicas=1),
    Workload("data", "postgres", 5432, http=False, replicas=1),
    Workload("data", "redis", 6379, http=False, replicas=1),
    Workload("ops", "report", 8080, replicas=1),
)}


@dataclass
class Pod:
    name: str
    workload: Workload
    ip: str
    rs_hash: str
    created: datetime
    deleted: datetime | None = None
    meshed: bool = True

    @property
    def ns(self) -> str:
        return self.workload.ns


@dataclass
class Attack:
    """One injected attack and the ground truth a finding must match."""

    kind: str
    source: str
    destination: str | None
    """None: any destination of ``source`` (a scan's probes)."""
    start: datetime
    port: int | None = None


@dataclass
class Scenario:
    dump: Path
    attacks: list[Attack] = field(default_factory=list)
    lines: int = 0


_HASH = "bcdfghjklmnpqrstvwxz2456789"


class _Gen:
    def __init__(self, seed: int, attacks: bool) -> None:
        self.rng = random.Random(seed)
        self.with_attacks = attacks
        self.pods: list[Pod] = []
        self.svc_ip: dict[str, str] = {}
        self.files: dict[str, list[tuple[datetime, int, str]]] = {}
        self.seq = 0
        self.attacks: list[Attack] = []
        self._build_pods()

    # -- cluster ---------------------------------------------------------------------------
    def _hash(self, n: int) -> str:
        return "".join(self.rng.choice(_HASH) for _ in range(n))

    def _add_pods(self, w: Workload, n: int, created: datetime, subnet: int,
                  deleted: datetime | None = None, meshed: bool = True) -> list[Pod]:
        rs = self._hash(10)
        out = []
        for _ in range(n):
            host = 10 + len([p for p in self.pods if p.ip.startswith(f"10.244.{subnet}.")])
            pod = Pod(f"{w.name}-{rs}-{self._hash(5)}", w, f"10.244.{subnet}.{host}", rs,
                      created, deleted, meshed)
            self.pods.append(pod)
            out.append(pod)
        return out

    def _build_pods(self) -> None:
        for i, w in enumerate(WORKLOADS.values()):
            self.svc_ip[w.name] = f"10.96.{10 + i}.{20 + i}"
            if w.name == "reviews":
                self._add_pods(w, 1, DAY2 + timedelta(hours=12), 1 + i)
            elif w.name == "catalog":  # rolled out on day 2 at 10:00
                self._add_pods(w, 2, CREATED, 1 + i, deleted=DAY2 + timedelta(hours=10))
                self._add_pods(w, 2, DAY2 + timedelta(hours=9, minutes=58), 1 + i)
            elif w.name == "cart":  # scaled up for the evening sale
                self._add_pods(w, 2, CREATED, 1 + i)
                self._add_pods(w, 1, DAY2 + timedelta(hours=17, minutes=50), 1 + i)
            else:
                self._add_pods(w, w.replicas, CREATED, 1 + i)

    def running(self, name: str, at: datetime) -> list[Pod]:
        return [p for p in self.pods if p.workload.name == name and p.meshed
                and p.created <= at and (p.deleted is None or at < p.deleted)]

    # -- lines -----------------------------------------------------------------------------
    def emit(self, pod: Pod, entry: AccessEntry) -> None:
        self.seq += 1
        done = entry.start + timedelta(milliseconds=entry.duration)
        self.files.setdefault(f"logs/{pod.ns}/{pod.name}/istio-proxy.log", []).append(
            (done, self.seq, render_text(entry)))

    def eph(self) -> int:
        return self.rng.randint(32768, 60999)

    def rid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def http(self, client: Pod | None, server: str, t: datetime, method: str, path: str, *,
             status: int = 200, sent: int = 800, received: int = 0, client_ip: str | None = None,
             denied: bool = False) -> None:
        """One HTTP request; ``client`` None or unmeshed: only the server's line, plaintext."""
        w = WORKLOADS[server]
        pods = self.running(server, t)
        if not pods:
            return
        srv = self.rng.choice(pods)
        cip = client.ip if client else str(client_ip)
        dur = self.rng.randint(2, 30)
        call = HttpCall(
            start=t, method=method, path=path, status=status, client_ip=cip,
            app_port=self.eph(), conn_port=self.eph(), service=server, namespace=w.ns,
            service_ip=self.svc_ip[server], service_port=w.svc_port, server_ip=srv.ip,
            target_port=w.port, inbound_port=w.port, request_id=self.rid(),
            user_agent="Go-http-client/1.1", authority=f"{server}.{w.ns}:{w.svc_port}",
            bytes_received=received, bytes_sent=sent, duration=dur,
            server_duration=max(1, dur - 1), upstream_local_port=self.eph(),
            mtls=client is not None and client.meshed,
            denied_details=rbac_denied_details() if denied else None,
        )
        if client is not None and client.meshed:
            self.emit(client, outbound_entry(call))
        self.emit(srv, inbound_entry(call))

    def tcp(self, client: Pod, server: str, t: datetime, up: int, down: int) -> None:
        w = WORKLOADS[server]
        pods = self.running(server, t)
        if not pods:
            return
        srv = self.rng.choice(pods)
        fqdn = service_fqdn(server, w.ns)
        conn = TcpConn(start=t, client_ip=client.ip, app_port=self.eph(), conn_port=self.eph(),
                       dialed=f"{self.svc_ip[server]}:{w.svc_port}",
                       upstream_host=f"{srv.ip}:{w.port}",
                       upstream_cluster=outbound_cluster(w.svc_port, fqdn),
                       bytes_received=up, bytes_sent=down,
                       duration=self.rng.randint(5, 2000))
        self.emit(client, tcp_outbound_entry(conn))
        self.emit(srv, tcp_inbound_entry(conn, srv.ip, w.port, self.eph(),
                                         mtls_sni(w.svc_port, fqdn)))

    def egress(self, client: Pod, ip: str, port: int, t: datetime, up: int, down: int,
               sni: str | None) -> None:
        self.emit(client, passthrough_entry(t, client.ip, self.eph(), self.eph(), f"{ip}:{port}",
                                            sni, up, down, self.rng.randint(50, 60000)))

    def probe(self, client: Pod, ip: str, port: int, t: datetime, open_port: bool) -> None:
        entry = passthrough_entry(t, client.ip, self.eph(), self.eph(), f"{ip}:{port}", None,
                                  0, 0, self.rng.randint(0, 3))
        if not open_port:
            entry = replace(entry, response_flags="UF,URX",
                            upstream_transport_failure_reason="delayed_connect_error:_111",
                            upstream_local_address=None)
        self.emit(client, entry)

    # -- normal traffic --------------------------------------------------------------------
    def _level(self, t: datetime) -> float:
        h = t.hour + t.minute / 60
        day = max(0.0, math.sin(math.pi * (h - 6) / 16)) if 6 <= h <= 22 else 0.0
        return 0.12 + 0.88 * day

    def _pick(self, name: str, t: datetime) -> Pod | None:
        pods = self.running(name, t)
        return self.rng.choice(pods) if pods else None

    def normal(self) -> None:
        rng = self.rng
        minute = DAY1
        while minute < END:
            lvl = self._level(minute)
            sale = 2.5 if DAY2 + timedelta(hours=18) <= minute < DAY2 + timedelta(hours=21) else 1
            rollout_done = minute >= DAY2 + timedelta(hours=10)
            for src, dst, rate in (("frontend", "catalog", 10), ("frontend", "cart", 4 * sale),
                                   ("frontend", "recommend", 3), ("frontend", "checkout", 0.6),
                                   ("recommend", "catalog", 2), ("checkout", "payment", 0.6),
                                   ("checkout", "cart", 0.6), ("frontend", "reviews", 2),
                                   ("cart", "redis", 1.5 * sale), ("catalog", "postgres", 1.5),
                                   ("checkout", "postgres", 0.5), ("payment", "psp", 0.6)):
                n = _poisson(rng, rate * lvl)
                for _ in range(n):
                    t = minute + timedelta(milliseconds=rng.randint(0, 59_999))
                    client = self._pick(src, t)
                    if client is None:
                        continue
                    self._request(client, src, dst, t, rollout_done)
            minute += timedelta(minutes=1)
        # the nightly report job, both days at 02:00
        for day in (DAY1, DAY2):
            job = self._pick("report", day)
            assert job is not None
            start = day + timedelta(hours=2)
            for i in range(12):
                self.tcp(job, "postgres", start + timedelta(seconds=40 * i),
                         rng.randint(2_000, 9_000), rng.randint(20_000_000, 40_000_000))
            for i in range(8):
                self.egress(job, ARCHIVE_IP, 443, start + timedelta(minutes=12, seconds=30 * i),
                            rng.randint(30_000_000, 45_000_000), rng.randint(3_000, 9_000),
                            "archive.example.org")

    def _request(self, client: Pod, src: str, dst: str, t: datetime, rollout_done: bool) -> None:
        rng = self.rng
        if dst == "psp":
            self.egress(client, PSP_IP, 443, t, rng.randint(1_500, 4_000),
                        rng.randint(2_000, 6_000), "api.psp.example.com")
        elif not WORKLOADS[dst].http:
            self.tcp(client, dst, t, rng.randint(200, 3_000), rng.randint(500, 60_000))
        elif dst == "catalog":
            if rng.random() < 0.3:
                path = "/v2/products" if rollout_done and src == "frontend" else "/products"
            else:
                path = f"/products/{rng.randint(1, 5000)}"
            self.http(client, dst, t, "GET", path, status=200 if rng.random() > 0.01 else 404,
                      sent=rng.randint(800, 6000))
        elif dst == "cart":
            method, path = rng.choice((("GET", "/cart"), ("POST", "/cart/items"),
                                       ("DELETE", f"/cart/items/{rng.randint(1, 900)}")))
            self.http(client, dst, t, method, path, sent=rng.randint(200, 1500),
                      received=rng.randint(0, 400))
        elif dst == "recommend":
            self.http(client, dst, t, "GET", f"/recommendations?user={rng.randint(1, 9999)}",
                      sent=rng.randint(300, 2000))
        elif dst == "checkout":
            self.http(client, dst, t, "POST", "/checkout", sent=rng.randint(200, 900),
                      received=rng.randint(300, 1200))
        elif dst == "payment":
            self.http(client, dst, t, "POST", "/charge", sent=rng.randint(200, 600),
                      received=rng.randint(300, 900), status=200 if rng.random() > 0.02 else 402)
        elif dst == "reviews":
            self.http(client, dst, t, "GET", f"/reviews/{rng.randint(1, 5000)}",
                      sent=rng.randint(300, 3000))

    # -- attacks ---------------------------------------------------------------------------
    def inject(self) -> None:
        rng = self.rng
        hours = rng.sample(range(1, 23), len(ATTACK_KINDS))
        at = {k: DAY2 + timedelta(hours=h, minutes=rng.randint(0, 29))
              for k, h in zip(ATTACK_KINDS, hours, strict=True)}
        fe = self.running("frontend", DAY2)[0]  # the compromised frontend pod
        rec = self.running("recommend", DAY2)[0]
        # scan: ~15 addresses x 12 ports in 5 minutes
        t0 = at["scan"]
        targets = sorted({p.ip for p in self.pods if p.created <= t0 and p.meshed
                          and (p.deleted is None or t0 < p.deleted)})
        targets = rng.sample(targets, min(15, len(targets)))
        ports = (22, 80, 443, 3306, 5432, 6379, 8080, 8443, 9200, 27017, 2379, 10250)
        for i, (ip, port) in enumerate([(ip, p) for ip in targets for p in ports]):
            pod = next(p for p in self.pods if p.ip == ip)
            self.probe(fe, ip, port, t0 + timedelta(milliseconds=1700 * i),
                       port == pod.workload.port)
        self.attacks.append(Attack("scan", fe.workload.id, None, t0))
        # lateral movement to a sensitive service
        ns, name = rng.choice(SENSITIVE_TARGETS)
        t0 = at["new-edge"]
        for i in range(rng.randint(4, 10)):
            t = t0 + timedelta(seconds=20 * i)
            if WORKLOADS[name].http:
                self.http(rec, name, t, "GET", "/admin/export", sent=rng.randint(2000, 9000))
            else:
                self.tcp(rec, name, t, rng.randint(300, 2000), rng.randint(50_000, 900_000))
        self.attacks.append(Attack("new-edge", rec.workload.id, f"{ns}/{name}", t0,
                                   WORKLOADS[name].port))
        # exfiltration: ~450 MB in 30 minutes
        t0 = at["exfiltration"]
        cart = self.running("cart", t0)[0]
        for i in range(30):
            self.egress(cart, EXFIL_IP, 443, t0 + timedelta(minutes=i),
                        rng.randint(12_000_000, 18_000_000), rng.randint(2_000, 5_000),
                        "files.example.net")
        # Envoy logs the SNI; meshwright names the external peer by it.
        self.attacks.append(Attack("exfiltration", "shop/cart", "external:files.example.net",
                                   t0, 443))
        # mtls downgrade: a checkout pod without its sidecar calls payment for an hour
        t0 = at["mtls-downgrade"]
        rogue = self._add_pods(WORKLOADS["checkout"], 1, t0 - timedelta(minutes=1), 4,
                               meshed=False)[0]
        t = t0
        while t < t0 + timedelta(hours=1):
            self.http(rogue, "payment", t, "POST", "/charge", sent=rng.randint(200, 600),
                      received=rng.randint(300, 900))
            t += timedelta(seconds=rng.randint(20, 90))
        self.attacks.append(Attack("mtls-downgrade", "shop/checkout", "shop/payment", t0, 8080))
        # a mining pool outside the cluster
        t0 = at["external-egress"]
        for i in range(rng.randint(3, 6)):
            self.egress(rec, MINER_IP, 3333, t0 + timedelta(minutes=7 * i),
                        rng.randint(20_000, 80_000), rng.randint(20_000, 80_000), None)
        self.attacks.append(Attack("external-egress", rec.workload.id, f"external:{MINER_IP}",
                                   t0, 3333))
        # an address no pod holds
        t0 = at["unknown-source"]
        for i in range(rng.randint(20, 40)):
            self.http(None, "catalog", t0 + timedelta(seconds=9 * i), "GET", "/products",
                      client_ip=UNKNOWN_IP, sent=rng.randint(800, 6000))
        self.attacks.append(Attack("unknown-source", f"unknown:{UNKNOWN_IP}", "shop/catalog",
                                   t0, 8080))
        # rejected by an existing policy
        t0 = at["denied"]
        for i in range(rng.randint(5, 15)):
            self.http(fe, "payment", t0 + timedelta(seconds=5 * i), "POST", "/internal/refunds",
                      denied=True, sent=19)
        self.attacks.append(Attack("denied", fe.workload.id, "shop/payment", t0, 8080))
        # path enumeration on a known edge
        t0 = at["anomaly"]
        words = ("admin", ".env", "wp-login.php", "backup", "config", ".git/HEAD", "debug",
                 "actuator/env", "server-status", "api/internal", "console", "phpinfo.php")
        for i in range(rng.randint(900, 1400)):
            path = f"/{rng.choice(words)}{rng.choice(('', '.bak', '.old', '/1', '~'))}"
            self.http(fe, "catalog", t0 + timedelta(milliseconds=600 * i), "GET", path,
                      status=404, sent=rng.randint(100, 300))
        self.attacks.append(Attack("anomaly", fe.workload.id, "shop/catalog", t0, 8080))

    # -- output ----------------------------------------------------------------------------
    def write(self, out: Path) -> int:
        out.mkdir(parents=True, exist_ok=True)
        (out / "inventory.json").write_text(
            json.dumps(self.inventory(), indent=4, sort_keys=True) + "\n", encoding="utf-8")
        lines = 0
        for rel, rows in sorted(self.files.items()):
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            rows.sort()
            path.write_text("".join(r[2] + "\n" for r in rows), encoding="utf-8")
            lines += len(rows)
        return lines

    def inventory(self) -> dict[str, object]:
        items: list[dict[str, object]] = []
        for ns in sorted({w.ns for w in WORKLOADS.values()}):
            items.append({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": ns, "labels": {"istio-injection": "enabled"},
                                       "creationTimestamp": _ts(CREATED), "uid": _uid(ns)}})
        for w in WORKLOADS.values():
            labels = {"app": w.name}
            items.append({"apiVersion": "v1", "kind": "ServiceAccount",
                          "metadata": {"name": w.name, "namespace": w.ns,
                                       "creationTimestamp": _ts(CREATED),
                                       "uid": _uid(w.id + "/sa")}})
            items.append({"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": w.name, "namespace": w.ns, "creationTimestamp": _ts(CREATED),
                "uid": _uid(w.id + "/svc")}, "spec": {
                "clusterIP": self.svc_ip[w.name], "clusterIPs": [self.svc_ip[w.name]],
                "selector": labels, "type": "ClusterIP",
                "ports": [{"name": "http" if w.http else "tcp", "port": w.svc_port,
                           "protocol": "TCP", "targetPort": w.port}]}})
            template = {"metadata": {"labels": labels}, "spec": {
                "serviceAccountName": w.name,
                "containers": [{"name": w.name, "image": f"example/{w.name}:1",
                                "ports": [{"containerPort": w.port, "protocol": "TCP"}]}]}}
            items.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
                "name": w.name, "namespace": w.ns, "creationTimestamp": _ts(CREATED),
                "uid": _uid(w.id + "/deploy")}, "spec": {
                "replicas": w.replicas, "selector": {"matchLabels": labels},
                "template": template}})
            for rs in sorted({p.rs_hash for p in self.pods if p.workload is w}):
                rs_labels: dict[str, str] = {**labels, "pod-template-hash": rs}
                items.append({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
                    "name": f"{w.name}-{rs}", "namespace": w.ns,
                    "creationTimestamp": _ts(CREATED), "uid": _uid(f"{w.id}/{rs}"),
                    "labels": rs_labels,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": w.name, "uid": _uid(w.id + "/deploy"),
                                         "controller": True}]},
                    "spec": {"selector": {"matchLabels": rs_labels},
                             "template": template}})
        for p in self.pods:
            containers: list[dict[str, object]] = [
                {"name": p.workload.name, "image": f"example/{p.workload.name}:1",
                 "ports": [{"containerPort": p.workload.port, "protocol": "TCP"}]}]
            if p.meshed:
                containers.append({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
                                   "ports": [{"containerPort": 15090, "protocol": "TCP"}]})
            meta: dict[str, object] = {
                "name": p.name, "namespace": p.ns, "creationTimestamp": _ts(p.created),
                "uid": _uid(p.name), "labels": {"app": p.workload.name,
                                                "pod-template-hash": p.rs_hash},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": f"{p.workload.name}-{p.rs_hash}",
                                     "uid": _uid(f"{p.workload.id}/{p.rs_hash}"),
                                     "controller": True}]}
            if p.meshed:
                meta["annotations"] = {"sidecar.istio.io/status": "{\"containers\":"
                                                                 "[\"istio-proxy\"]}"}
            if p.deleted is not None:
                meta["deletionTimestamp"] = _ts(p.deleted)
            items.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
                "serviceAccountName": p.workload.name, "nodeName": "node-1",
                "containers": containers}, "status": {
                "phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
                "hostIP": "10.0.0.11", "startTime": _ts(p.created)}})
        return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _uid(s: str) -> str:
    h = f"{random.Random(s).getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: rates here are small (< 30 per minute)
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def generate(out: Path, seed: int, *, attacks: bool = True) -> Scenario:
    """Write the scenario's dump into ``out``; return it with its ground truth."""
    gen = _Gen(seed, attacks)
    if attacks:
        gen.inject()
    gen.normal()
    lines = gen.write(out)
    return Scenario(out, gen.attacks, lines)


# -- measurement -------------------------------------------------------------------------


@dataclass
class Outcome:
    """Findings of one run and how they score against the ground truth."""

    findings: list[object]
    attacks: list[Attack]
    true: list[bool]
    """Per finding: does it match an injected attack?"""
    detected: dict[str, int]
    injected: dict[str, int]
    seconds: float = 0.0


def matches(finding: object, attack: Attack) -> bool:
    """A finding points at an attack when source and destination agree. A scan has no one
    destination: only findings without a destination (the scan finding) match it, so a
    finding on another edge of the scanning source counts as false. A finding without a
    source (``permissive``) matches on its destination."""
    source = getattr(finding, "source", None)
    destination = getattr(finding, "destination", None)
    if source is None:
        return destination is not None and destination == attack.destination
    if source != attack.source:
        return False
    if attack.destination is None:
        return destination is None
    return destination == attack.destination


def analyze_dump(dump: Path, *, contamination: float | str = "auto",
                 method: str = "lof") -> list[object]:
    """observe + learn the dump with meshwright; day 1 is the baseline; all findings."""
    from learn.baseline import learn_baseline, prepare, read_resolved, split_by_window
    from learn.findings import find_all
    from learn.pipeline import learn_graph
    from observe.flows_io import FlowWriter
    from observe.inventory import load_inventory
    from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs

    plan = plan_inputs([str(dump)])
    inventory = load_inventory(plan.inventories)
    with tempfile.TemporaryDirectory(prefix="meshwright-scenario-") as tmp:
        raw, resolved = Path(tmp) / "raw.parquet", Path(tmp) / "flows.parquet"
        with FlowWriter(raw) as writer:
            for batch in iter_flows(plan, ObserveOptions(), ObserveStats()):
                writer.write(batch)
        learned = learn_graph(raw, inventory, resolved_out=resolved)
        frame = prepare(read_resolved(resolved))
    base, new = split_by_window(frame, timedelta(hours=24))
    baseline = learn_baseline(base)
    return list(find_all(learned.graph, new, baseline, contamination=contamination,
                         method=method, random_state=0))


def compare_models(seeds: list[int], contamination: float | str = "auto") -> str:
    """The raw models, before explanations filter their windows: per method, windows flagged
    and how many of them are attack windows (the attack's edge, within an hour of its start),
    attack windows caught, and ROC AUC of the decision function over all new windows."""
    from sklearn.metrics import roc_auc_score

    from learn.anomaly import score_windows
    from learn.baseline import learn_baseline, prepare, read_resolved, split_by_window
    from learn.pipeline import learn_graph
    from observe.flows_io import FlowWriter
    from observe.inventory import load_inventory
    from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs

    # per method: windows flagged, flagged attack windows, attack windows, all windows
    counts = {m: [0, 0, 0, 0] for m in ("iforest", "lof")}
    aucs: dict[str, list[float]] = {m: [] for m in counts}
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="meshwright-cmp-") as tmp:
            dump = Path(tmp) / "dump"
            scenario = generate(dump, seed)
            plan = plan_inputs([str(dump)])
            inventory = load_inventory(plan.inventories)
            raw, resolved = Path(tmp) / "raw.parquet", Path(tmp) / "flows.parquet"
            with FlowWriter(raw) as writer:
                for batch in iter_flows(plan, ObserveOptions(), ObserveStats()):
                    writer.write(batch)
            learn_graph(raw, inventory, resolved_out=resolved)
            frame = prepare(read_resolved(resolved))
        base, new = split_by_window(frame, timedelta(hours=24))
        baseline = learn_baseline(base)
        for method, row in counts.items():
            scored = score_windows(new, baseline, method=method, contamination=contamination)
            assert scored is not None
            cur = scored[1]
            label = [any(s == a.source and (a.destination is None or d == a.destination)
                         and a.start - timedelta(minutes=30) <= w.to_pydatetime()
                         < a.start + timedelta(hours=1) for a in scenario.attacks)
                     for s, d, w in zip(cur["src"], cur["dst"], cur["w"], strict=True)]
            flagged = cur["decision"].to_numpy() < 0
            row[0] += int(flagged.sum())
            row[1] += int(sum(f and lab for f, lab in zip(flagged, label, strict=True)))
            row[2] += int(sum(label))
            row[3] += len(label)
            aucs[method].append(float(roc_auc_score(label, -cur["decision"].to_numpy())))
    out = ["| model | windows flagged | of them attack windows | attack windows | "
           "new windows | ROC AUC (mean over seeds) |", "|---|---|---|---|---|---|"]
    for method, (flagged_n, true_n, attack_n, all_n) in counts.items():
        auc = aucs[method]
        out.append(f"| {method} | {flagged_n} | {true_n} | {attack_n} | {all_n} | "
                   f"{sum(auc) / len(auc):.3f} |")
    return "\n".join(out)


def score(findings: list[object], attacks: list[Attack]) -> Outcome:
    true = [any(matches(f, a) for a in attacks) for f in findings]
    injected: dict[str, int] = {}
    detected: dict[str, int] = {}
    for a in attacks:
        injected[a.kind] = injected.get(a.kind, 0) + 1
        if any(getattr(f, "kind", None) == a.kind and matches(f, a) for f in findings):
            detected[a.kind] = detected.get(a.kind, 0) + 1
    return Outcome(findings, attacks, true, detected, injected)


def run(seed: int, *, attacks: bool = True, keep: Path | None = None,
        contamination: float | str = "auto", method: str = "lof") -> Outcome:
    with tempfile.TemporaryDirectory(prefix="meshwright-dump-") as tmp:
        dump = keep / f"seed-{seed}{'' if attacks else '-benign'}" if keep else Path(tmp)
        scenario = generate(dump, seed, attacks=attacks)
        t0 = time.perf_counter()
        findings = analyze_dump(dump, contamination=contamination, method=method)
        outcome = score(findings, scenario.attacks)
        outcome.seconds = time.perf_counter() - t0
    return outcome


def summarize(outcomes: list[Outcome], benign: list[Outcome]) -> str:
    kinds: dict[str, list[int]] = {}  # kind -> [tp findings, all findings, detected, injected]
    for o in outcomes:
        for f, ok in zip(o.findings, o.true, strict=True):
            row = kinds.setdefault(str(getattr(f, "kind", "?")), [0, 0, 0, 0])
            row[0] += int(ok)
            row[1] += 1
        for k, n in o.injected.items():
            row = kinds.setdefault(k, [0, 0, 0, 0])
            row[2] += o.detected.get(k, 0)
            row[3] += n
    lines = ["| finding kind | findings | true | precision | attacks found / injected | "
             "recall |", "|---|---|---|---|---|---|"]
    for k in sorted(kinds):
        tp, n, det, inj = kinds[k]
        prec = f"{tp / n:.2f}" if n else "-"
        rec = f"{det / inj:.2f}" if inj else "-"
        lines.append(f"| {k} | {n} | {tp} | {prec} | {det} / {inj} | {rec} |")
    det = sum(sum(o.detected.values()) for o in outcomes)
    inj = sum(sum(o.injected.values()) for o in outcomes)
    false_high_attack = sum(1 for o in outcomes for f, ok in zip(o.findings, o.true, strict=True)
                            if not ok and getattr(f, "severity", "") == "high")
    false_high_benign = sum(1 for o in benign for f in o.findings
                            if getattr(f, "severity", "") == "high")
    benign_anomalies = sum(1 for o in benign for f in o.findings
                           if getattr(f, "kind", "") == "anomaly")
    lines += [
        "",
        f"Learned anomaly findings on benign-only days: {benign_anomalies} over {len(benign)} "
        f"days ({benign_anomalies / max(len(benign), 1):.1f} per day).",
        f"Overall recall: {det} / {inj} = {det / max(inj, 1):.2f} of injected attacks found by "
        "a finding of their kind.",
        f"False high-severity findings: {false_high_attack} over {len(outcomes)} attack days; "
        f"{false_high_benign} over {len(benign)} benign-only days "
        f"({false_high_benign / max(len(benign), 1):.2f} per benign day).",
    ]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--keep", type=Path, help="keep the generated dumps in this directory")
    ap.add_argument("--contamination", default="auto")
    ap.add_argument("--method", default="lof", choices=["iforest", "lof"])
    ap.add_argument("--write-results", action="store_true",
                    help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--compare-models", action="store_true",
                    help="compare IsolationForest and LocalOutlierFactor windows instead")
    args = ap.parse_args(argv)
    contamination = args.contamination if args.contamination == "auto" else float(
        args.contamination)
    if args.compare_models:
        table = compare_models(args.seeds, contamination)
        print(table)
        if args.write_results:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            with (Path(__file__).with_name("RESULTS.md")).open("a", encoding="utf-8") as fh:
                fh.write(f"\n## anomaly model comparison - {stamp}\n\n"
                         f"`python benchmarks/scenario.py --compare-models --seeds "
                         f"{' '.join(map(str, args.seeds))} --contamination "
                         f"{args.contamination}`\n\n{table}\n")
        return 0
    outcomes, benign = [], []
    for seed in args.seeds:
        o = run(seed, keep=args.keep, contamination=contamination, method=args.method)
        b = run(seed, attacks=False, keep=args.keep, contamination=contamination,
                method=args.method)
        outcomes.append(o)
        benign.append(b)
        missed = sorted(k for k in o.injected if k not in o.detected)
        fp_high = [getattr(f, "id", "?") for f, ok in zip(o.findings, o.true, strict=True)
                   if not ok and getattr(f, "severity", "") == "high"]
        benign_high = [getattr(f, "id", "?") for f in b.findings
                       if getattr(f, "severity", "") == "high"]
        print(f"seed {seed}: {len(o.findings)} findings, missed {missed or 'none'}, "
              f"false high {fp_high or 'none'}, benign-day high {benign_high or 'none'} "
              f"({o.seconds:.1f}s)", flush=True)
    table = summarize(outcomes, benign)
    print(table)
    if args.write_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"\n## findings detection quality - {stamp}\n\n"
                f"Machine: {platform.machine()}, Python {platform.python_version()}; "
                f"`python benchmarks/scenario.py --seeds {' '.join(map(str, args.seeds))} "
                f"--method {args.method} --contamination {args.contamination}`\n\n{table}\n")
        with (Path(__file__).with_name("RESULTS.md")).open("a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
