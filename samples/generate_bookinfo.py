"""Write the shipped Bookinfo sample: a small, realistic, deterministic dump.

``python samples/generate_bookinfo.py [-o samples/bookinfo] [--seed 20240514]`` writes

- ``inventory.json``: what ``kubectl get namespaces,pods,services,serviceaccounts,
  replicasets,deployments,statefulsets,daemonsets,jobs,cronjobs -A -o json`` prints at the end
  of the window (a ``List``; keys sorted and 4-space indented as kubectl prints unstructured
  objects);
- ``logs/<ns>/<pod>/istio-proxy.log``: each proxy's ``kubectl logs`` output (plain layout):
  pilot-agent/Envoy lines plus access lines in Istio's default TEXT format;
- ``../bookinfo-capture/nodes.pcap.gz``: the same traffic as ``tcpdump -i any`` on the nodes
  records it
  (pcap, link type LINUX_SLL2; written by :mod:`samples.packets`, own seeded RNG, so the logs
  do not change with it);
- ``README.md``: what is in it and what a correct analysis finds.

Everything comes from a seeded ``random.Random`` and fixed instants: no wall clock, so two
runs write the same bytes. See ``samples/bookinfo/README.md`` for the story.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samples.envoy_lines import (
    RBAC_DENIED_NONE,
    AccessEntry,
    HttpCall,
    gateway_entry,
    inbound_entry,
    mtls_sni,
    outbound_cluster,
    outbound_entry,
    passthrough_entry,
    render_json,
    render_text,
    service_fqdn,
)
from samples.packets import (
    PACKET_OUTGOING,
    Endpoint,
    Keystream,
    PcapWriter,
    TcpConn,
    client_hello,
    dns_answer,
    dns_query,
    encrypted,
    mac_for,
    server_hello,
    session_id_of,
    udp_exchange,
)

DEFAULT_SEED = 20240514
WINDOW_START = datetime(2024, 5, 14, 8, 0, 0, tzinfo=UTC)
WINDOW_END = datetime(2024, 5, 14, 10, 0, 0, tzinfo=UTC)
DEPLOYED = datetime(2024, 5, 14, 7, 54, 30, tzinfo=UTC)
RATINGS_DELETED = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
RATINGS_REPLACED = datetime(2024, 5, 14, 9, 0, 1, tzinfo=UTC)
RATINGS_READY = datetime(2024, 5, 14, 9, 0, 9, tzinfo=UTC)
LEGACY_CREATED = datetime(2024, 5, 14, 9, 4, 50, tzinfo=UTC)
DENIED_AT = datetime(2024, 5, 14, 9, 15, 0, tzinfo=UTC)
CRON_AT = datetime(2024, 5, 14, 9, 30, 0, tzinfo=UTC)

ISTIO_VERSION = "1.22.0"
PROXY_IMAGE = f"docker.io/istio/proxyv2:{ISTIO_VERSION}"
BOOKINFO_TAG = "1.20.3"
NODES = {"kind-worker": "172.18.0.3", "kind-worker2": "172.18.0.4"}
EXTERNAL_API = ("api.example.com", "198.51.100.23", 443)

BROWSERS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
)
STATIC_ASSETS = (
    ("/static/bootstrap/css/bootstrap.min.css", 121200),
    ("/static/bootstrap/css/bootstrap-theme.min.css", 23409),
    ("/static/jquery.min.js", 84380),
    ("/static/bootstrap/js/bootstrap.min.js", 36868),
)
# Response sizes of the real Bookinfo services (reviews differ by version: no/black/red stars).
REVIEWS_BYTES = {"v1": 358, "v2": 442, "v3": 438}


# --- inventory model -------------------------------------------------------------------


@dataclass
class Workload:
    namespace: str
    name: str
    app: str
    service_account: str
    image: str
    port: int
    version: str | None = None
    meshed: bool = True
    rs_hash: str = ""
    extra_labels: dict[str, str] = field(default_factory=dict)
    created: datetime = DEPLOYED


@dataclass
class Pod:
    workload: Workload
    name: str
    ip: str
    node: str
    created: datetime
    started: datetime
    deleted: datetime | None = None
    finished: datetime | None = None
    """Set for a Job pod that ran to completion."""
    owner_kind: str = "ReplicaSet"
    owner_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return self.workload.namespace

    @property
    def id(self) -> str:
        return f"{self.ns}/{self.name}"


@dataclass
class Service:
    namespace: str
    name: str
    cluster_ip: str
    selector: dict[str, str]
    ports: list[tuple[str, int, int]]
    """(name, port, targetPort)."""
    labels: dict[str, str] = field(default_factory=dict)
    lb_ip: str | None = None


def _bookinfo(name: str, app: str, version: str, sa: str, rs_hash: str) -> Workload:
    return Workload("bookinfo", name, app, sa,
                    f"docker.io/istio/examples-bookinfo-{app}-{version}:{BOOKINFO_TAG}", 9080,
                    version=version, rs_hash=rs_hash)


DETAILS = _bookinfo("details-v1", "details", "v1", "bookinfo-details", "7d4d9d5fcb")
RATINGS = _bookinfo("ratings-v1", "ratings", "v1", "bookinfo-ratings", "5dc7d8b4c9")
REVIEWS = {
    v: _bookinfo(f"reviews-{v}", "reviews", v, "bookinfo-reviews", h)
    for v, h in (("v1", "6bc9f4c8d7"), ("v2", "7f8d9c6b5b"), ("v3", "58f7d8d6c4"))
}
PRODUCTPAGE = _bookinfo("productpage-v1", "productpage", "v1", "bookinfo-productpage", "64b8d5f9c6")
GATEWAY = Workload("istio-system", "istio-ingressgateway", "istio-ingressgateway",
                   "istio-ingressgateway-service-account", PROXY_IMAGE, 8080, rs_hash="6d9f8b7c5d",
                   extra_labels={"istio": "ingressgateway"}, created=DEPLOYED - timedelta(hours=2))
ISTIOD = Workload("istio-system", "istiod", "istiod", "istiod",
                  f"docker.io/istio/pilot:{ISTIO_VERSION}", 15010, meshed=False,
                  rs_hash="7c9f5d8b6f", extra_labels={"istio": "pilot"},
                  created=DEPLOYED - timedelta(hours=2))
LEGACY = Workload("legacy", "legacy-client", "legacy-client", "default",
                  "docker.io/curlimages/curl:8.7.1", 0, meshed=False, rs_hash="5b7c9d6f8d",
                  created=LEGACY_CREATED)
CRON = Workload("bookinfo", "nightly-report", "nightly-report", "nightly-report",
                "docker.io/curlimages/curl:8.7.1", 0)

CRON_JOB_NAME = f"nightly-report-{int(CRON_AT.timestamp()) // 60}"


def _pods() -> list[Pod]:
    def p(w: Workload, suffix: str, ip: str, node: str, created: datetime | None = None,
          started: datetime | None = None, **kw: object) -> Pod:
        c = created or w.created + timedelta(seconds=2)
        return Pod(w, f"{w.name}-{w.rs_hash}-{suffix}", ip, node, c,
                   started or c + timedelta(seconds=1), owner_name=f"{w.name}-{w.rs_hash}",
                   **kw)  # type: ignore[arg-type]

    pods = [
        p(GATEWAY, "8kzjm", "10.244.2.5", "kind-worker2"),
        p(ISTIOD, "m4hxl", "10.244.1.5", "kind-worker"),
        p(DETAILS, "hx2kq", "10.244.1.11", "kind-worker"),
        p(PRODUCTPAGE, "p7wqs", "10.244.1.13", "kind-worker"),
        # ratings-v1's first pod: deleted mid-window, its IP goes to legacy-client.
        p(RATINGS, "vgfnq", "10.244.1.14", "kind-worker", deleted=RATINGS_DELETED),
        p(RATINGS, "wh8tr", "10.244.2.21", "kind-worker2", created=RATINGS_REPLACED,
          started=RATINGS_REPLACED + timedelta(seconds=2)),
        p(REVIEWS["v1"], "5ml2p", "10.244.2.12", "kind-worker2"),
        p(REVIEWS["v2"], "q9xkz", "10.244.1.15", "kind-worker"),
        p(REVIEWS["v3"], "tr4bn", "10.244.2.13", "kind-worker2"),
        p(LEGACY, "zq2lw", "10.244.1.14", "kind-worker", created=LEGACY_CREATED,
          started=LEGACY_CREATED + timedelta(seconds=1)),
        Pod(CRON, f"{CRON_JOB_NAME}-fx9kd", "10.244.2.30", "kind-worker2",
            CRON_AT + timedelta(milliseconds=40), CRON_AT + timedelta(seconds=1),
            finished=CRON_AT + timedelta(seconds=9), owner_kind="Job",
            owner_name=CRON_JOB_NAME),
    ]
    return pods


SERVICES = [
    Service("bookinfo", "details", "10.96.39.211", {"app": "details"}, [("http", 9080, 9080)],
            {"app": "details", "service": "details"}),
    Service("bookinfo", "ratings", "10.96.148.75", {"app": "ratings"}, [("http", 9080, 9080)],
            {"app": "ratings", "service": "ratings"}),
    Service("bookinfo", "reviews", "10.96.201.16", {"app": "reviews"}, [("http", 9080, 9080)],
            {"app": "reviews", "service": "reviews"}),
    Service("bookinfo", "productpage", "10.96.77.140", {"app": "productpage"},
            [("http", 9080, 9080)], {"app": "productpage", "service": "productpage"}),
    # As istioctl installs it: Service port 80 -> the gateway's unprivileged 8080.
    Service("istio-system", "istio-ingressgateway", "10.96.12.180",
            {"app": "istio-ingressgateway", "istio": "ingressgateway"},
            [("status-port", 15021, 15021), ("http2", 80, 8080), ("https", 443, 8443)],
            {"app": "istio-ingressgateway", "istio": "ingressgateway"}, lb_ip="172.18.255.200"),
    Service("istio-system", "istiod", "10.96.5.10", {"app": "istiod", "istio": "pilot"},
            [("grpc-xds", 15010, 15010), ("https-dns", 15012, 15012),
             ("https-webhook", 443, 15017), ("http-monitoring", 15014, 15014)],
            {"app": "istiod", "istio": "pilot"}),
]


# --- kubectl -o json objects -----------------------------------------------------------


class Uids:
    """Stable UIDs: derived from the seed and the object's identity, not from call order."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, *key: str) -> str:
        r = random.Random(f"{self.seed}/uid/" + "/".join(key))
        return str(uuid.UUID(int=r.getrandbits(128), version=4))


def ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(t: datetime) -> str:
    return str(100000 + int((t - DEPLOYED).total_seconds()) * 7 % 900000)


def _meta(name: str, ns: str | None, uid: str, created: datetime,
          labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
          owner: dict[str, object] | None = None, generate_name: str | None = None,
          ) -> dict[str, object]:
    m: dict[str, object] = {"creationTimestamp": ts(created), "name": name,
                            "resourceVersion": _rv(created), "uid": uid}
    if ns is not None:
        m["namespace"] = ns
    if labels:
        m["labels"] = dict(labels)
    if annotations:
        m["annotations"] = dict(annotations)
    if owner:
        m["ownerReferences"] = [owner]
    if generate_name:
        m["generateName"] = generate_name
    return m


def _owner(api: str, kind: str, name: str, uid: str) -> dict[str, object]:
    return {"apiVersion": api, "blockOwnerDeletion": True, "controller": True, "kind": kind,
            "name": name, "uid": uid}


def _pod_labels(w: Workload) -> dict[str, str]:
    labels = {"app": w.app, **w.extra_labels}
    if w.version:
        labels["version"] = w.version
    if w.meshed and w is not GATEWAY:
        labels["security.istio.io/tlsMode"] = "istio"
        labels["service.istio.io/canonical-name"] = w.app
        labels["service.istio.io/canonical-revision"] = w.version or "latest"
    if w is GATEWAY:
        labels["sidecar.istio.io/inject"] = "false"
        labels["service.istio.io/canonical-name"] = "istio-ingressgateway"
        labels["service.istio.io/canonical-revision"] = "latest"
    return labels


SIDECAR_STATUS = json.dumps(
    {"initContainers": ["istio-init"], "containers": ["istio-proxy"],
     "volumes": ["workload-socket", "credential-socket", "workload-certs", "istio-envoy",
                 "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"],
     "imagePullSecrets": None, "revision": "default"},
    separators=(",", ":"),
)


def _container(name: str, image: str, port: int | None) -> dict[str, object]:
    c: dict[str, object] = {"image": image, "imagePullPolicy": "IfNotPresent", "name": name,
                            "resources": {}, "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File"}
    if port:
        c["ports"] = [{"containerPort": port, "protocol": "TCP"}]
    return c


def _proxy_container(args: list[str]) -> dict[str, object]:
    c = _container("istio-proxy", PROXY_IMAGE, None)
    c["args"] = args
    c["ports"] = [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}]
    c["readinessProbe"] = {"failureThreshold": 4, "httpGet": {"path": "/healthz/ready",
                           "port": 15021, "scheme": "HTTP"}, "periodSeconds": 15,
                           "successThreshold": 1, "timeoutSeconds": 3}
    c["resources"] = {"limits": {"cpu": "2", "memory": "1Gi"},
                      "requests": {"cpu": "100m", "memory": "128Mi"}}
    c["securityContext"] = {"allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": True, "runAsGroup": 1337,
                            "runAsNonRoot": True, "runAsUser": 1337}
    return c


def _pod_spec(w: Workload, node: str, restart: str = "Always") -> dict[str, object]:
    containers: list[dict[str, object]] = []
    spec: dict[str, object] = {}
    if w is GATEWAY:
        containers.append(_proxy_container(["proxy", "router", "--domain",
                                            "$(POD_NAMESPACE).svc.cluster.local",
                                            "--proxyLogLevel=warning",
                                            "--log_output_level=default:info"]))
    else:
        app = _container(w.app if w.app != "legacy-client" else "curl", w.image, w.port or None)
        if w in (LEGACY, CRON):
            app["command"] = ["/bin/sh", "-c"]
            app["args"] = (["while true; do sleep 3600; done"] if w is LEGACY else
                           ["curl -s http://details.bookinfo:9080/details/0; "
                            "curl -s -X POST localhost:15020/quitquitquit"])
        containers.append(app)
        if w.meshed:
            containers.append(_proxy_container(["proxy", "sidecar", "--domain",
                                                "$(POD_NAMESPACE).svc.cluster.local",
                                                "--proxyLogLevel=warning",
                                                "--log_output_level=default:info"]))
            init = _container("istio-init", PROXY_IMAGE, None)
            init["args"] = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m",
                            "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d",
                            "15090,15021,15020", "--log_output_level=default:info"]
            spec["initContainers"] = [init]
    spec.update({
        "containers": containers,
        "dnsPolicy": "ClusterFirst",
        "enableServiceLinks": True,
        "nodeName": node,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "restartPolicy": restart,
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "serviceAccount": w.service_account,
        "serviceAccountName": w.service_account,
        "terminationGracePeriodSeconds": 30,
    })
    return spec


def _container_statuses(pod: Pod, spec: dict[str, object]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for c in spec["containers"]:  # type: ignore[attr-defined]
        name = str(c["name"])
        if pod.finished is not None:
            state: dict[str, object] = {"terminated": {
                "containerID": f"containerd://{uuid.UUID(int=hash_int(pod.id + name)).hex}"
                               f"{uuid.UUID(int=hash_int(name + pod.id)).hex}",
                "exitCode": 0, "finishedAt": ts(pod.finished), "reason": "Completed",
                "startedAt": ts(pod.started)}}
        else:
            state = {"running": {"startedAt": ts(pod.started)}}
        out.append({
            "containerID": f"containerd://{uuid.UUID(int=hash_int(pod.id + name)).hex}"
                           f"{uuid.UUID(int=hash_int(name + pod.id)).hex}",
            "image": str(c["image"]), "imageID": "", "lastState": {}, "name": name,
            "ready": pod.finished is None, "restartCount": 0,
            "started": pod.finished is None, "state": state,
        })
    return sorted(out, key=lambda s: str(s["name"]))


def hash_int(s: str) -> int:
    """A stable 128-bit int from a string (``hash()`` is salted per process)."""
    return random.Random(s).getrandbits(128)


def _pod_object(pod: Pod, uids: Uids, owner_uid: str) -> dict[str, object]:
    w = pod.workload
    labels = _pod_labels(w)
    annotations: dict[str, str] = {}
    if pod.owner_kind == "ReplicaSet":
        labels["pod-template-hash"] = w.rs_hash
        api = "apps/v1"
    else:
        job_uid = owner_uid
        labels = {"app": w.app, "batch.kubernetes.io/controller-uid": job_uid,
                  "batch.kubernetes.io/job-name": CRON_JOB_NAME, "controller-uid": job_uid,
                  "job-name": CRON_JOB_NAME, "security.istio.io/tlsMode": "istio",
                  "service.istio.io/canonical-name": w.app,
                  "service.istio.io/canonical-revision": "latest"}
        api = "batch/v1"
    if w.meshed and w is not GATEWAY:
        annotations.update({
            "istio.io/rev": "default",
            "kubectl.kubernetes.io/default-container": w.app,
            "kubectl.kubernetes.io/default-logs-container": w.app,
            "prometheus.io/path": "/stats/prometheus",
            "prometheus.io/port": "15020",
            "prometheus.io/scrape": "true",
            "sidecar.istio.io/status": SIDECAR_STATUS,
        })
    spec = _pod_spec(w, pod.node, "Always" if pod.owner_kind == "ReplicaSet" else "Never")
    done = pod.finished is not None
    status: dict[str, object] = {
        "conditions": [
            {"lastProbeTime": None, "lastTransitionTime": ts(pod.started),
             "status": "True", "type": "Initialized"},
            {"lastProbeTime": None,
             "lastTransitionTime": ts(pod.finished or pod.started + timedelta(seconds=2)),
             "status": "False" if done else "True", "type": "Ready"},
            {"lastProbeTime": None, "lastTransitionTime": ts(pod.created),
             "status": "True", "type": "PodScheduled"},
        ],
        "containerStatuses": _container_statuses(pod, spec),
        "hostIP": NODES[pod.node],
        "hostIPs": [{"ip": NODES[pod.node]}],
        "phase": "Succeeded" if done else "Running",
        "podIP": pod.ip,
        "podIPs": [{"ip": pod.ip}],
        "qosClass": "Burstable" if w.meshed else "BestEffort",
        "startTime": ts(pod.created),
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta(pod.name, pod.ns, uids("pod", pod.id), pod.created, labels,
                          annotations or None,
                          _owner(api, pod.owner_kind, pod.owner_name, owner_uid),
                          generate_name=f"{pod.owner_name}-"),
        "spec": spec, "status": status,
    }


def _selector_labels(w: Workload) -> dict[str, str]:
    sel = {"app": w.app, **w.extra_labels}
    if w.version:
        sel["version"] = w.version
    return sel


def _template(w: Workload, extra: dict[str, str] | None = None) -> dict[str, object]:
    labels = {**_selector_labels(w), **(extra or {})}
    return {"metadata": {"creationTimestamp": None, "labels": labels},
            "spec": _pod_spec(w, "")}


def _strip_node(t: dict[str, object]) -> dict[str, object]:
    spec = t["spec"]
    assert isinstance(spec, dict)
    spec.pop("nodeName", None)
    # Injection happens on pods, not on the Deployment template.
    if "initContainers" in spec:
        spec.pop("initContainers")
        spec["containers"] = [c for c in spec["containers"] if c["name"] != "istio-proxy"]
    return t


def build_inventory(seed: int) -> dict[str, object]:
    """The ``kubectl get ... -A -o json`` List at WINDOW_END."""
    uids = Uids(seed)
    pods = [p for p in _pods() if p.deleted is None]
    workloads = [GATEWAY, ISTIOD, DETAILS, PRODUCTPAGE, RATINGS, *REVIEWS.values(), LEGACY]
    items: list[dict[str, object]] = []

    ns_labels = {"bookinfo": {"istio-injection": "enabled"}, "istio-system": {},
                 "legacy": {}, "default": {}, "kube-system": {}, "kube-public": {},
                 "kube-node-lease": {}}
    ns_created = {"bookinfo": DEPLOYED - timedelta(minutes=1), "legacy": LEGACY_CREATED
                  - timedelta(minutes=1), "istio-system": DEPLOYED - timedelta(hours=2, minutes=1)}
    for ns in sorted(ns_labels):
        created = ns_created.get(ns, DEPLOYED - timedelta(days=3))
        items.append({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": _meta(ns, None, uids("ns", ns), created,
                                        {"kubernetes.io/metadata.name": ns, **ns_labels[ns]}),
                      "spec": {"finalizers": ["kubernetes"]},
                      "status": {"phase": "Active"}})

    job_uid = uids("job", CRON_JOB_NAME)
    for pod in sorted(pods, key=lambda p: p.id):
        w = pod.workload
        owner_uid = (uids("rs", w.namespace, f"{w.name}-{w.rs_hash}")
                     if pod.owner_kind == "ReplicaSet" else job_uid)
        items.append(_pod_object(pod, uids, owner_uid))

    for s in sorted(SERVICES, key=lambda s: (s.namespace, s.name)):
        spec: dict[str, object] = {
            "clusterIP": s.cluster_ip, "clusterIPs": [s.cluster_ip],
            "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": n, "port": p, "protocol": "TCP", "targetPort": tp}
                      for n, p, tp in s.ports],
            "selector": s.selector, "sessionAffinity": "None",
            "type": "LoadBalancer" if s.lb_ip else "ClusterIP",
        }
        status: dict[str, object] = {"loadBalancer": {}}
        if s.lb_ip:
            ports: list[dict[str, object]] = spec["ports"]  # type: ignore[assignment]
            spec["allocateLoadBalancerNodePorts"] = True
            spec["externalTrafficPolicy"] = "Local"
            spec["healthCheckNodePort"] = 31542
            for i, port in enumerate(ports):
                port["nodePort"] = 30021 + i * 1000
            status = {"loadBalancer": {"ingress": [{"ip": s.lb_ip, "ipMode": "VIP"}]}}
        created = GATEWAY.created if s.namespace == "istio-system" else DEPLOYED
        items.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": _meta(s.name, s.namespace, uids("svc", s.namespace, s.name),
                                        created, s.labels),
                      "spec": spec, "status": status})

    sas = {("bookinfo", "default"), ("istio-system", "default"), ("legacy", "default"),
           ("default", "default"), ("kube-system", "default"), ("kube-public", "default"),
           ("kube-node-lease", "default")}
    sas |= {(w.namespace, w.service_account) for w in [*workloads, CRON]}
    for ns, name in sorted(sas):
        labels = ({"account": name.removeprefix("bookinfo-")}
                  if name.startswith("bookinfo-") else None)
        items.append({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": _meta(name, ns, uids("sa", ns, name), DEPLOYED, labels)})

    for w in sorted(workloads, key=lambda w: (w.namespace, w.name)):
        rs_name = f"{w.name}-{w.rs_hash}"
        n = 1
        rs: dict[str, object] = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": _meta(rs_name, w.namespace, uids("rs", w.namespace, rs_name), w.created,
                              {**_selector_labels(w), "pod-template-hash": w.rs_hash},
                              {"deployment.kubernetes.io/desired-replicas": str(n),
                               "deployment.kubernetes.io/max-replicas": "2",
                               "deployment.kubernetes.io/revision": "1"},
                              _owner("apps/v1", "Deployment", w.name,
                                     uids("deploy", w.namespace, w.name))),
            "spec": {"replicas": n, "selector": {"matchLabels": {
                        **_selector_labels(w), "pod-template-hash": w.rs_hash}},
                     "template": _strip_node(_template(w, {"pod-template-hash": w.rs_hash}))},
            "status": {"availableReplicas": n, "fullyLabeledReplicas": n,
                       "observedGeneration": 1, "readyReplicas": n, "replicas": n},
        }
        items.append(rs)
    for w in sorted(workloads, key=lambda w: (w.namespace, w.name)):
        labels = _selector_labels(w)
        items.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(w.name, w.namespace, uids("deploy", w.namespace, w.name),
                              w.created, labels,
                              {"deployment.kubernetes.io/revision": "1"}),
            "spec": {"progressDeadlineSeconds": 600, "replicas": 1,
                     "revisionHistoryLimit": 10, "selector": {"matchLabels": labels},
                     "strategy": {"rollingUpdate": {"maxSurge": "25%",
                                                    "maxUnavailable": "25%"},
                                  "type": "RollingUpdate"},
                     "template": _strip_node(_template(w))},
            "status": {"availableReplicas": 1, "observedGeneration": 1, "readyReplicas": 1,
                       "replicas": 1, "updatedReplicas": 1},
        })

    cron_uid = uids("cronjob", "bookinfo", "nightly-report")
    job_template = {"metadata": {"creationTimestamp": None, "labels": {"app": CRON.app}},
                    "spec": _strip_node({"spec": _pod_spec(CRON, "", "Never")})["spec"]}
    finished = CRON_AT + timedelta(seconds=9)
    items.append({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(CRON_JOB_NAME, "bookinfo", job_uid, CRON_AT,
                          {"app": CRON.app, "batch.kubernetes.io/controller-uid": job_uid,
                           "batch.kubernetes.io/job-name": CRON_JOB_NAME,
                           "controller-uid": job_uid, "job-name": CRON_JOB_NAME},
                          {"batch.kubernetes.io/cronjob-scheduled-timestamp": ts(CRON_AT)},
                          _owner("batch/v1", "CronJob", "nightly-report", cron_uid)),
        "spec": {"backoffLimit": 6, "completionMode": "NonIndexed", "completions": 1,
                 "manualSelector": False, "parallelism": 1, "podReplacementPolicy":
                 "TerminatingOrFailed", "selector": {"matchLabels": {
                     "batch.kubernetes.io/controller-uid": job_uid}},
                 "suspend": False, "template": job_template},
        "status": {"completionTime": ts(finished), "conditions": [
                       {"lastProbeTime": ts(finished), "lastTransitionTime": ts(finished),
                        "status": "True", "type": "Complete"}],
                   "ready": 0, "startTime": ts(CRON_AT), "succeeded": 1,
                   "terminating": 0, "uncountedTerminatedPods": {}},
    })
    items.append({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": _meta("nightly-report", "bookinfo", cron_uid, DEPLOYED, {"app": CRON.app}),
        "spec": {"concurrencyPolicy": "Forbid", "failedJobsHistoryLimit": 1,
                 "jobTemplate": {"metadata": {"creationTimestamp": None},
                                 "spec": {"template": job_template}},
                 "schedule": "30 9 * * *",
                 "successfulJobsHistoryLimit": 3, "suspend": False},
        "status": {"lastScheduleTime": ts(CRON_AT), "lastSuccessfulTime": ts(finished)},
    })
    return {"apiVersion": "v1", "items": items, "kind": "List",
            "metadata": {"resourceVersion": ""}}


# --- traffic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WireEvent:
    """One exchange that crossed the wire, as the capture will show it.

    ``mesh``: sidecar to sidecar over mTLS on the pooled connection ``call.conn_port``;
    ``plain``: an unmeshed client's own connection (curl: one per request); ``ingress``: an
    internet client to the gateway pod (one connection per request, ``ext_port``);
    ``egress``: a passthrough TCP (TLS) connection to an external host (``tcp``).
    """

    kind: str
    call: HttpCall | None
    denied: bool = False
    ext_ip: str = ""
    ext_port: int = 0
    tcp: AccessEntry | None = None



class Traffic:
    """Builds every proxy's lines; one seeded RNG drives all choices, in a fixed order."""

    def __init__(self, seed: int, encoding: str = "text") -> None:
        self.render = render_json if encoding == "json" else render_text
        self.rng = random.Random(seed)
        self.pods = {p.name: p for p in _pods()}
        self.svc = {s.name: s for s in SERVICES}
        # (completion time, sequence, line) per pod log
        self.lines: dict[str, list[tuple[datetime, int, str]]] = {}
        self.seq = 0
        self.pools: dict[tuple[str, str], list[int]] = {}
        self.counts: dict[str, int] = {}
        #: What crossed the wire, for the packet capture (recorded, never drawn from rng).
        self.wire: list[WireEvent] = []

    def pod(self, workload: Workload, at: datetime) -> Pod:
        """The pod of ``workload`` running at ``at`` (deleted pods until their deletion)."""
        for p in self.pods.values():
            if p.workload is workload and p.started <= at and (p.deleted is None
                                                                or at < p.deleted):
                return p
        raise LookupError(f"no {workload.name} pod at {at}")

    def eph(self) -> int:
        return self.rng.randint(32768, 60999)

    def pooled(self, a: str, b: str) -> int:
        """A pooled upstream connection's source port: reused, replaced now and then."""
        pool = self.pools.setdefault((a, b), [])
        if not pool or self.rng.random() < 0.03:
            pool.append(self.eph())
            del pool[:-3]
        return self.rng.choice(pool)

    def request_id(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        # Envoy's x-request-id is a UUID whose version nibble carries its trace decision.
        return f"{h[:8]}-{h[8:12]}-9{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:]}"

    def emit(self, pod: Pod, entry: AccessEntry, count: str) -> None:
        done = entry.start + timedelta(milliseconds=entry.duration)
        self.add(pod, done, self.render(entry))
        self.counts[count] = self.counts.get(count, 0) + 1

    def add(self, pod: Pod, at: datetime, line: str) -> None:
        self.seq += 1
        self.lines.setdefault(pod.id, []).append((at, self.seq, line))

    def call(self, client: Pod | None, server: Pod, service: str, t: datetime, method: str,
             path: str, status: int, sent: int, ua: str | None, rid: str, *,
             client_ip: str | None = None, xff: str | None = None, denied: bool = False,
             authority: str | None = None, label: str = "", min_dur: int = 2) -> HttpCall:
        svc = self.svc[service]
        _, port, target = svc.ports[0]
        dur = self.rng.randint(min_dur, min_dur + 10)
        cip = client.ip if client else str(client_ip)
        c = HttpCall(
            start=t, method=method, path=path, status=status, client_ip=cip,
            app_port=self.eph(),
            conn_port=self.pooled(cip, server.ip) if client else self.eph(),
            service=service, namespace=svc.namespace, service_ip=svc.cluster_ip,
            service_port=port, server_ip=server.ip, target_port=target, inbound_port=target,
            request_id=rid, user_agent=ua, authority=authority or f"{service}:{port}",
            bytes_sent=sent, duration=dur, server_duration=max(1, dur - 1),
            x_forwarded_for=xff, mtls=client is not None,
            denied_details=RBAC_DENIED_NONE if denied else None,
            upstream_local_port=self.pooled("127.0.0.6", server.ip),
        )
        server_view = replace(c, start=t + timedelta(milliseconds=1))
        if client is not None:
            self.emit(client, outbound_entry(c), f"{label}:client")
        self.emit(server, inbound_entry(server_view), f"{label}:server")
        self.wire.append(WireEvent("mesh" if client else "plain", c, denied=denied))
        return c

    def page_view(self, t: datetime, ext_ip: str, ua: str, path: str, sent: int,
                  method: str = "GET", status: int = 200, backends: bool = False,
                  version: str | None = None) -> None:
        gw = self.pod(GATEWAY, t)
        pp = self.pod(PRODUCTPAGE, t)
        rid = self.request_id()
        xff = ext_ip
        if backends:
            pid = self.rng.choice((0, 0, 0, 1, 2, 3))
            t1 = t + timedelta(milliseconds=3)
            self.call(pp, self.pod(DETAILS, t1), "details", t1, "GET", f"/details/{pid}", 200,
                      178, "python-requests/2.31.0", rid, label="productpage->details")
            version = version or self.rng.choice(("v1", "v2", "v3"))
            rv = self.pod(REVIEWS[version], t1)
            t2 = t1 + timedelta(milliseconds=self.rng.randint(3, 8))
            if version != "v1":
                t3 = t2 + timedelta(milliseconds=4)
                self.ratings(rv, t3, pid, rid)
            # reviews-v2/v3 wait for ratings, so their request outlasts it.
            self.call(pp, rv, "reviews", t2, "GET", f"/reviews/{pid}", 200,
                      REVIEWS_BYTES[version], "python-requests/2.31.0", rid,
                      label="productpage->reviews", min_dur=2 if version == "v1" else 19)
        # The gateway -> productpage hop, seen by the gateway and by productpage's sidecar.
        svc = self.svc["productpage"]
        dur = self.rng.randint(45, 70) if backends else self.rng.randint(2, 9)
        c = HttpCall(
            start=t, method=method, path=path, status=status, client_ip=gw.ip,
            app_port=0, conn_port=self.pooled(gw.ip, pp.ip), service="productpage",
            namespace="bookinfo", service_ip=svc.cluster_ip, service_port=9080,
            server_ip=pp.ip, target_port=9080, inbound_port=9080, request_id=rid,
            user_agent=ua, authority="bookinfo.example.com", bytes_sent=sent,
            bytes_received=0 if method == "GET" else 29, duration=dur,
            server_duration=dur - 1, x_forwarded_for=xff,
            upstream_local_port=self.pooled("127.0.0.6", pp.ip),
        )
        ext_port = self.eph()
        self.emit(gw, gateway_entry(c, gw.ip, 8080, ext_ip, ext_port), "gateway")
        server_view = replace(c, start=t + timedelta(milliseconds=1))
        self.emit(pp, inbound_entry(server_view), "gateway->productpage:server")
        self.wire.append(WireEvent("ingress", c, ext_ip=ext_ip, ext_port=ext_port))
        self.wire.append(WireEvent("mesh", c))

    def ratings(self, reviews: Pod, t: datetime, pid: int, rid: str) -> None:
        if RATINGS_DELETED <= t < RATINGS_READY:
            # No endpoint while the replacement starts: the client's Envoy answers itself.
            svc = self.svc["ratings"]
            e = AccessEntry(
                start=t, method="GET", path=f"/ratings/{pid}", protocol="HTTP/1.1",
                response_code=503, response_flags="UH",
                response_code_details="no_healthy_upstream",
                connection_termination_details=None, upstream_transport_failure_reason=None,
                bytes_received=0, bytes_sent=19, duration=0, upstream_service_time=None,
                x_forwarded_for=None, user_agent="Apache-CXF/3.1.18", request_id=rid,
                authority="ratings:9080", upstream_host=None,
                upstream_cluster=outbound_cluster(9080, service_fqdn("ratings", "bookinfo")),
                upstream_local_address=None,
                downstream_local_address=f"{svc.cluster_ip}:9080",
                downstream_remote_address=f"{reviews.ip}:{self.eph()}",
                requested_server_name=None, route_name="default")
            self.emit(reviews, e, "reviews->ratings:no_healthy_upstream")
            return
        self.call(reviews, self.pod(RATINGS, t), "ratings", t, "GET", f"/ratings/{pid}", 200,
                  48, "Apache-CXF/3.1.18", rid, label="reviews->ratings")

    def run(self) -> None:
        rng = self.rng
        clients = [f"203.0.113.{n}" for n in sorted(rng.sample(range(10, 250), 14))]
        client_ua = {ip: rng.choice(BROWSERS) for ip in clients}
        scripts = clients[:2]  # two clients poll the JSON API with a script
        t = WINDOW_START + timedelta(seconds=rng.uniform(0, 5))
        while t < WINDOW_END - timedelta(seconds=30):
            ip = rng.choice(clients)
            if ip in scripts:
                pid = rng.choice((0, 0, 1, 2))
                self.page_view(t, ip, "python-requests/2.31.0", f"/api/v1/products/{pid}", 395)
            else:
                ua = client_ua[ip]
                self.page_view(t, ip, ua, "/productpage", rng.randint(5280, 5330),
                               backends=True)
                if rng.random() < 0.3:  # a first visit also fetches the static assets
                    for i, (path, size) in enumerate(STATIC_ASSETS):
                        self.page_view(t + timedelta(milliseconds=60 + 9 * i), ip, ua, path,
                                       size)
                if rng.random() < 0.04:
                    self.page_view(t + timedelta(seconds=4), ip, ua, "/login", 0,
                                   method="POST", status=302)
            t += timedelta(seconds=rng.expovariate(1 / 22))
        # One page view while ratings has no ready endpoint: reviews-v2's Envoy answers 503 UH.
        self.page_view(RATINGS_DELETED + timedelta(seconds=4, milliseconds=317), clients[5],
                       client_ua[clients[5]], "/productpage", 4987, backends=True,
                       version="v2")

        legacy = self.pod(LEGACY, LEGACY_CREATED + timedelta(seconds=5))
        t = LEGACY_CREATED + timedelta(seconds=70)
        while t < WINDOW_END - timedelta(seconds=30):
            self.call(None, self.pod(RATINGS, t), "ratings", t, "GET",
                      f"/ratings/{rng.choice((0, 1))}", 200, 48, "curl/8.7.1",
                      self.request_id(), client_ip=legacy.ip,
                      authority="ratings.bookinfo:9080", label="legacy->ratings")
            t += timedelta(seconds=rng.uniform(100, 140))
        for i in range(3):  # reviews' existing ALLOW policy only admits productpage
            at = DENIED_AT + timedelta(seconds=2 * i, milliseconds=rng.randint(0, 900))
            target = self.pod(REVIEWS[rng.choice(("v1", "v2", "v3"))], at)
            self.call(None, target, "reviews", at, "GET", "/reviews/0", 403, 19, "curl/8.7.1",
                      self.request_id(), client_ip=legacy.ip,
                      authority="reviews.bookinfo:9080", denied=True,
                      label="legacy->reviews:denied")

        cron = self.pods[f"{CRON_JOB_NAME}-fx9kd"]
        at = cron.started + timedelta(seconds=4, milliseconds=212)
        self.call(cron, self.pod(DETAILS, at), "details", at, "GET", "/details/0", 200, 178,
                  "curl/8.7.1", self.request_id(), label="nightly-report->details")

        host, ip, port = EXTERNAL_API
        rv3 = self.pod(REVIEWS["v3"], WINDOW_START)
        t = WINDOW_START + timedelta(minutes=7, seconds=rng.uniform(0, 30))
        while t < WINDOW_END:
            app_port, conn_port = self.eph(), self.eph()
            e = passthrough_entry(t, rv3.ip, app_port, conn_port, f"{ip}:{port}", host,
                                  rng.randint(900, 1400), rng.randint(4200, 6100),
                                  rng.randint(180, 420))
            self.emit(rv3, e, "reviews-v3->external")
            self.wire.append(WireEvent("egress", None, tcp=e))
            t += timedelta(minutes=15, seconds=rng.uniform(-40, 40))

    # --- proxy's own lines ---

    def agent_lines(self) -> None:
        for pod in self.pods.values():
            if not pod.workload.meshed:
                continue
            for at, line in _agent_lines(pod, self.rng):
                self.add(pod, at, line)

    def files(self) -> Iterator[tuple[str, str]]:
        """(relative path, content) of every proxy log, sorted by path."""
        for pod_id in sorted(self.lines):
            entries = sorted(self.lines[pod_id], key=lambda x: (x[0], x[1]))
            body = "".join(line + "\n" for _, _, line in entries)
            yield f"logs/{pod_id}/istio-proxy.log", body


def _alog(at: datetime, level: str, msg: str) -> str:
    t = at.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}Z\t{level}\t{msg}"


def _agent_lines(pod: Pod, rng: random.Random) -> list[tuple[datetime, str]]:
    """pilot-agent / Envoy lines a proxy prints besides access lines."""
    router = pod.workload is GATEWAY
    node = f"{pod.name}.{pod.ns}"
    t = pod.started + timedelta(milliseconds=rng.randint(200, 900))
    out: list[tuple[datetime, str]] = []

    def at(ms: int, level: str, msg: str) -> None:
        nonlocal t
        t += timedelta(microseconds=ms * 1000 + rng.randint(0, 999))
        out.append((t, _alog(t, level, msg)))

    at(0, "info", 'FLAG: --concurrency="0"')
    at(0, "info", f'FLAG: --domain="{pod.ns}.svc.cluster.local"')
    at(0, "info", 'FLAG: --log_output_level="default:info"')
    at(0, "info", 'FLAG: --proxyLogLevel="warning"')
    at(1, "info", f"Version {ISTIO_VERSION}-aaf597fbfae607adf4bb4e77538a7ea98995328a-Clean")
    at(1, "info", f"Proxy role\tips=[{pod.ip}] type={'router' if router else 'sidecar'} "
                  f"id={node} domain={pod.ns}.svc.cluster.local")
    at(1, "info", "Apply proxy config from env {}")
    at(6, "info", "cpu limit detected as 2, setting concurrency")
    at(11, "info", "Opening status port 15020")
    at(70, "info", "sds\tStarting SDS grpc server")
    at(1, "info", "starting Http service at 127.0.0.1:15004")
    at(46, "info", 'xdsproxy\tInitializing with upstream address "istiod.istio-system.svc:15012"'
                   ' and cluster "Kubernetes"')
    at(71, "info", "Pilot SAN: [istiod.istio-system.svc]")
    at(3, "info", "Starting proxy agent")
    at(1, "info", "Envoy command: [-c etc/istio/proxy/envoy-rev.json --drain-time-s 45 "
                  "--drain-strategy immediate --local-address-ip-version v4 "
                  "--file-flush-interval-msec 1000 --disable-hot-restart "
                  "--allow-unknown-static-fields -l warning --component-log-level misc:error "
                  "--concurrency 2]")
    at(165, "info", f"cache\tgenerated new workload certificate\tresourceName=default "
                    f"latency={rng.randint(120, 260)}.{rng.randint(100000, 999999)}ms "
                    f"ttl=23h59m59.{rng.randint(100000000, 999999999)}s")
    at(0, "info", "cache\tRoot cert has changed, start rotating root cert")
    at(122, "info", "xdsproxy\tconnected to delta upstream XDS server: "
                    "istiod.istio-system.svc:15012\tid=1")
    at(280, "info", f"ads\tADS: new connection for node:{node}-1")
    at(1, "info", f"ads\tSDS: PUSH request for node:{node} resources:1 size:4.0kB "
                  "resource:default")
    at(1, "info", f"ads\tSDS: PUSH request for node:{node} resources:1 size:1.1kB "
                  "resource:ROOTCA")
    at(418, "info", f"Readiness succeeded in {rng.randint(900, 1900) / 1000:.4f}s")
    at(0, "info", "Envoy proxy is ready")
    # istiod closes XDS streams every ~30 minutes; the agent reconnects.
    conn = 2
    r = pod.started + timedelta(minutes=rng.randint(25, 35))
    end = pod.deleted or pod.finished or WINDOW_END
    while r < end:
        out.append((r, _alog(r, "info", "xdsproxy\tconnected to delta upstream XDS server: "
                                         f"istiod.istio-system.svc:15012\tid={conn}")))
        conn += 1
        r += timedelta(minutes=rng.randint(25, 35), seconds=rng.randint(0, 59))
    stop = pod.deleted or pod.finished
    if stop is not None:
        t = stop
        if pod.finished is not None:
            at(0, "info", "Agent draining Proxy for termination")
            at(1, "info", "Status server has successfully terminated")
        else:
            at(0, "info", "Status server has successfully terminated")
            at(1, "info", "Agent draining Proxy for termination")
            at(1, "info", "Graceful termination period is 5s, starting...")
            t += timedelta(seconds=5)
            at(0, "info", "Graceful termination period complete, terminating remaining proxies.")
        at(1, "warn", "Aborted proxy instance")
        at(2, "info", "Agent has successfully terminated")
    return out


# --- packet capture ----------------------------------------------------------------------

#: ``tcpdump -i any -s CAPTURE_SNAPLEN``: headers and the first bytes of every segment.
CAPTURE_SNAPLEN = 512
#: The capture is a sample of its own (beside ``bookinfo/``): analysing ``samples/bookinfo``
#: must not read the same traffic twice, as logs and as packets.
CAPTURE_DIR = "bookinfo-capture"
CAPTURE_FILE = "nodes.pcap.gz"
#: kind's kube-dns Service (CoreDNS); pods query the ClusterIP, so a pod's veth shows it.
KUBE_DNS = ("10.96.0.10", 53)
#: Envoy's default upstream HTTP connection idle timeout (common_http_protocol_options).
ENVOY_IDLE_TIMEOUT = timedelta(hours=1)
#: The ALPN list Istio's client sidecar offers for HTTP/1.1 upstreams (pilot's
#: mtlsHTTP11ALPN); the server picks "istio-http/1.1".
ISTIO_HTTP11_ALPN = ("istio-http/1.1", "istio", "http/1.1")
#: Failed attempts by the legacy client: (time, destination ip, port, answered by RST).
FAILED_ATTEMPTS = (
    (datetime(2024, 5, 14, 9, 7, 31, 250000, tzinfo=UTC), "10.244.1.5", 9080, True),
    (datetime(2024, 5, 14, 9, 7, 33, 911000, tzinfo=UTC), "10.244.1.5", 9080, True),
    (datetime(2024, 5, 14, 9, 8, 12, 40000, tzinfo=UTC), "10.244.2.40", 9080, False),
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


@dataclass
class WireConn:
    """One TCP connection or UDP flow the capture holds, as the generator made it."""

    kind: str
    """mesh, plain, ingress, egress, dns, refused, no-answer."""
    transport: str
    client: str
    """Node id of the client as the generator knows it (``ns/workload``, ``external:..``)."""
    server: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    opened: datetime
    closed: datetime | None
    """When its last packet left (None: still open when the capture stopped)."""
    requests: int = 0
    """HTTP requests it carried."""
    sni: str | None = None


def _http_date(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _body(size: int, path: str) -> bytes:
    """A response body of ``size`` bytes that starts like the real one."""
    if path.startswith("/ratings/"):
        pid = path.rsplit("/", 1)[1].encode()
        head = b'{"id":%s,"ratings":{"Reviewer1":5,"Reviewer2":4}}' % pid
    elif path.endswith(".css"):
        head = b"/*!\n * Bootstrap v3.4.1 (https://getbootstrap.com/)\n */"
    elif path.endswith(".js"):
        head = b"/*! jQuery v3.7.1 | (c) OpenJS Foundation and other contributors */"
    elif path.startswith("/api/"):
        head = b'{"id": 0, "title": "The Comedy of Errors", "descriptionHtml": "'
    else:
        head = b"<!DOCTYPE html>\n<html>\n  <head>\n    <title>Simple Bookstore App</title>"
    head = head[:size]
    return head + b" " * (size - len(head))


class _CaptureBuilder:
    """Turns the traffic's wire events into packets (own RNG: the logs are untouched)."""

    def __init__(self, traffic: Traffic, seed: int) -> None:
        self.traffic = traffic
        self.rng = random.Random(f"{seed}/packets")
        self.w = PcapWriter(CAPTURE_SNAPLEN)
        self.keys = Keystream(self.rng)
        self.conns: list[WireConn] = []
        # One veth per pod (host side), numbered in pod order; the nodes' eth0 is 2.
        self.ifindex = {p.name: 7 + i for i, p in enumerate(sorted(
            traffic.pods.values(), key=lambda p: (p.created, p.name)))}
        self.peer_metadata = {p.name: self.rng.randint(1180, 1460)
                              for p in sorted(traffic.pods.values(), key=lambda p: p.name)}

    # -- who is who ----------------------------------------------------------------------
    def pod_at(self, ip: str, at: datetime) -> Pod:
        for p in self.traffic.pods.values():
            end = p.deleted or p.finished or WINDOW_END + timedelta(days=1)
            if p.ip == ip and p.created <= at < end + timedelta(seconds=10):
                return p
        raise LookupError(f"no pod has {ip} at {at}")

    @staticmethod
    def node_id(pod: Pod) -> str:
        return f"{pod.ns}/{pod.workload.name}"

    def ep(self, pod: Pod) -> Endpoint:
        """A pod's packets, recorded as its veth's host end receives them."""
        return Endpoint(pod.ip, self.ifindex[pod.name], mac_for(pod.ip, self.ifindex[pod.name]))

    def outside(self, ip: str, via: Pod) -> Endpoint:
        """Packets from outside the pod, recorded as the host sends them into its veth."""
        return Endpoint(ip, self.ifindex[via.name], mac_for(via.ip, 1000 + self.ifindex[via.name]),
                        PACKET_OUTGOING)

    def rtt(self, a: Pod, b: Pod) -> int:
        return self.rng.randint(50, 90) if a.node == b.node else self.rng.randint(180, 320)

    # -- message sizes -------------------------------------------------------------------
    def mesh_request(self, c: HttpCall, client: Pod) -> int:
        """Bytes of the HTTP/1.1 request the client sidecar encrypts (headers Envoy adds:
        x-forwarded-proto, x-request-id, x-envoy-attempt-count, B3 trace headers, the
        metadata-exchange pair)."""
        head = (f"{c.method} {c.path} HTTP/1.1\r\nhost: {c.authority}\r\n"
                f"user-agent: {c.user_agent or ''}\r\naccept: */*\r\n"
                f"x-forwarded-proto: http\r\nx-request-id: {c.request_id}\r\n"
                "x-envoy-attempt-count: 1\r\n"
                f"x-b3-traceid: {'0' * 32}\r\nx-b3-spanid: {'0' * 16}\r\n"
                f"x-b3-parentspanid: {'0' * 16}\r\nx-b3-sampled: 0\r\n"
                f"x-envoy-peer-metadata-id: sidecar~{client.ip}~{client.name}.{client.ns}~"
                f"{client.ns}.svc.cluster.local\r\nx-envoy-peer-metadata: \r\n")
        if c.x_forwarded_for:
            head += f"x-forwarded-for: {c.x_forwarded_for}\r\n"
        head += "\r\n"
        return len(head) + self.peer_metadata[client.name] + c.bytes_received

    def mesh_response(self, c: HttpCall, server: Pod) -> int:
        head = (f"HTTP/1.1 {c.status} OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                f"content-length: {c.bytes_sent}\r\ndate: {_http_date(c.start)}\r\n"
                f"x-envoy-upstream-service-time: {c.server_duration}\r\n"
                f"x-envoy-peer-metadata-id: sidecar~{server.ip}~{server.name}.{server.ns}~"
                f"{server.ns}.svc.cluster.local\r\nx-envoy-peer-metadata: \r\n"
                "server: istio-envoy\r\n\r\n")
        return len(head) + self.peer_metadata[server.name] + c.bytes_sent

    @staticmethod
    def plain_response(status: int, reason: str, ctype: str, body: bytes, at: datetime,
                       service_time: int | None) -> bytes:
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
                f"content-type: {ctype}\r\ndate: {_http_date(at)}\r\n")
        if service_time is not None:
            head += f"x-envoy-upstream-service-time: {service_time}\r\n"
        head += "server: istio-envoy\r\n\r\n"
        return head.encode() + body

    # -- connections ---------------------------------------------------------------------
    def tls_setup(self, conn: TcpConn, t: int, sni: str, alpn: tuple[str, ...],
                  server_flight: int, client_flight: int) -> int:
        """ClientHello, ServerHello + CCS + encrypted server flight, CCS + client flight."""
        hello = client_hello(self.rng, sni, alpn)
        t = conn.send(t + 25, True, hello)
        sh = server_hello(self.rng, session_id_of(hello))
        t = conn.send(t + conn.rtt_us // 2 + 350, False, sh + encrypted(self.keys, server_flight))
        ccs = b"\x14\x03\x03\x00\x01\x01"
        return conn.send(t + conn.rtt_us // 2 + 300, True,
                         ccs + encrypted(self.keys, client_flight))

    def close_tls(self, conn: TcpConn, t: int, client_first: bool) -> int:
        """close_notify (an encrypted alert), then FIN both ways."""
        t = conn.send(t, client_first, encrypted(self.keys, 2))
        return conn.close(t + 30, client_first)

    def mesh(self, events: list[WireEvent]) -> None:
        first = events[0].call
        assert first is not None
        client = self.pod_at(first.client_ip, first.start)
        server = self.pod_at(first.server_ip, first.start)
        conn = TcpConn(self.w, self.ep(client), self.ep(server), first.conn_port,
                       first.target_port, self.rng, self.rtt(client, server))
        opened = first.start - timedelta(microseconds=self.rng.randint(1200, 1900))
        sni = mtls_sni(first.service_port, service_fqdn(first.service, first.namespace))
        t = conn.handshake(_us(opened))
        # Server: EncryptedExtensions, CertificateRequest, Certificate (RSA-2048 workload
        # certificate and the mesh CA), CertificateVerify, Finished; client: Certificate,
        # CertificateVerify, Finished.
        t = self.tls_setup(conn, t, sni, ISTIO_HTTP11_ALPN, self.rng.randint(2150, 2250),
                           self.rng.randint(1850, 1950))
        last = first.start
        for ev in events:
            c = ev.call
            assert c is not None
            t = conn.send(max(_us(c.start), t + 20), True,
                          encrypted(self.keys, self.mesh_request(c, client)))
            done = c.start + timedelta(milliseconds=c.duration)
            t = conn.send(max(_us(done), t + 200), False,
                          encrypted(self.keys, self.mesh_response(c, server)))
            last = done
        # Closed by the client's idle timeout, or when either pod goes away.
        ends = [(last + ENVOY_IDLE_TIMEOUT, True)]
        if server.deleted is not None:
            ends.append((server.deleted + timedelta(seconds=5), False))
        if client.finished is not None:
            ends.append((client.finished - timedelta(milliseconds=300), True))
        close_at, client_first = min(ends)
        closed: datetime | None = None
        if close_at < WINDOW_END:
            t = self.close_tls(conn, max(_us(close_at), t + 100), client_first)
            closed = _EPOCH + timedelta(microseconds=t)
        self.conns.append(WireConn("mesh", "tcp", self.node_id(client), self.node_id(server),
                                   client.ip, first.conn_port, server.ip, first.target_port,
                                   opened, closed, len(events), sni))

    def plain(self, ev: WireEvent) -> None:
        """curl from the unmeshed client: its own connection, cleartext HTTP/1.1."""
        c = ev.call
        assert c is not None
        server = self.pod_at(c.server_ip, c.start)
        client = self.pod_at(c.client_ip, c.start)
        conn = TcpConn(self.w, self.ep(client), self.ep(server), c.conn_port, c.target_port,
                       self.rng, self.rtt(client, server))
        opened = c.start - timedelta(microseconds=self.rng.randint(300, 700))
        t = conn.handshake(_us(opened))
        req = (f"{c.method} {c.path} HTTP/1.1\r\nHost: {c.authority}\r\n"
               f"User-Agent: {c.user_agent}\r\nAccept: */*\r\n\r\n").encode()
        t = conn.send(max(_us(c.start), t + 30), True, req)
        if ev.denied:
            resp = self.plain_response(403, "Forbidden", "text/plain", b"RBAC: access denied",
                                       c.start, None)
            done = c.start + timedelta(microseconds=self.rng.randint(300, 600))
        else:
            resp = self.plain_response(200, "OK", "application/json",
                                       _body(c.bytes_sent, c.path), c.start, c.server_duration)
            done = c.start + timedelta(milliseconds=c.duration)
        t = conn.send(max(_us(done), t + 100), False, resp)
        t = conn.close(t + 150, client_first=True)
        self.conns.append(WireConn("plain", "tcp", self.node_id(client), self.node_id(server),
                                   client.ip, c.conn_port, server.ip, c.target_port, opened,
                                   _EPOCH + timedelta(microseconds=t), 1))

    def ingress(self, ev: WireEvent) -> None:
        """An internet client to the gateway pod (after the node's DNAT), cleartext."""
        c = ev.call
        assert c is not None
        gw = self.pod_at(c.client_ip, c.start)
        conn = TcpConn(self.w, self.outside(ev.ext_ip, gw), self.ep(gw), ev.ext_port, 8080,
                       self.rng, self.rng.randint(18_000, 70_000))
        opened = c.start - timedelta(microseconds=conn.rtt_us + self.rng.randint(100, 400))
        t = conn.handshake(_us(opened))
        req = f"{c.method} {c.path} HTTP/1.1\r\nHost: {c.authority}\r\n"
        req += f"User-Agent: {c.user_agent}\r\n"
        if c.user_agent and c.user_agent.startswith("python-requests"):
            req += "Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
        else:
            req += ("Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n"
                    "Accept-Language: en-US,en;q=0.9\r\nConnection: keep-alive\r\n")
        body = b"username=jason&passwd=jason12"[: c.bytes_received]
        if c.method == "POST":
            req += ("Content-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(body)}\r\n")
        data = (req + "\r\n").encode() + (body if c.method == "POST" else b"")
        t = conn.send(max(_us(c.start), t + 30), True, data, ack_after_us=200)
        done = c.start + timedelta(milliseconds=c.duration)
        if c.status == 302:
            resp = self.plain_response(302, "FOUND", "text/html; charset=utf-8",
                                       _body(c.bytes_sent, c.path), c.start, c.duration - 1)
        else:
            ctype = ("text/css" if c.path.endswith(".css") else "application/javascript"
                     if c.path.endswith(".js") else "application/json"
                     if c.path.startswith("/api/") else "text/html; charset=utf-8")
            resp = self.plain_response(200, "OK", ctype, _body(c.bytes_sent, c.path), c.start,
                                       c.duration - 1)
        t = conn.send(max(_us(done), t + 100), False, resp, ack_after_us=conn.rtt_us)
        t = conn.close(t + self.rng.randint(400_000, 4_000_000), client_first=True)
        self.conns.append(WireConn("ingress", "tcp", "external:internet", self.node_id(gw),
                                   ev.ext_ip, ev.ext_port, gw.ip, 8080, opened,
                                   _EPOCH + timedelta(microseconds=t), 1))

    def egress(self, ev: WireEvent) -> None:
        """DNS lookup of the external host, then the sidecar's passthrough TLS connection."""
        e = ev.tcp
        assert e is not None and e.upstream_local_address and e.requested_server_name
        host, ip, port = EXTERNAL_API
        client_ip, conn_port = e.upstream_local_address.rsplit(":", 1)
        pod = self.pod_at(client_ip, e.start)
        # The app resolves the name first (search domains after ndots:5 fail fast; only the
        # final query is shown).
        asked = e.start - timedelta(milliseconds=self.rng.randint(3, 6))
        qid, qport = self.rng.getrandbits(16), self.rng.randint(32768, 60999)
        query = dns_query(qid, host)
        udp_exchange(self.w, _us(asked), self.ep(pod), self.outside(KUBE_DNS[0], pod), qport,
                     KUBE_DNS[1], query, dns_answer(query, ip, 60), self.rng.randint(300, 600),
                     self.rng.getrandbits(16))
        self.conns.append(WireConn("dns", "udp", self.node_id(pod), f"unknown:{KUBE_DNS[0]}",
                                   pod.ip, qport, KUBE_DNS[0], KUBE_DNS[1], asked, asked))
        conn = TcpConn(self.w, self.ep(pod), self.outside(ip, pod), int(conn_port), port,
                       self.rng, self.rng.randint(25_000, 45_000))
        opened = e.start + timedelta(microseconds=self.rng.randint(200, 500))
        t = conn.handshake(_us(opened))
        hello = client_hello(self.rng, e.requested_server_name, ())
        t = conn.send(t + 40, True, hello)
        sh = server_hello(self.rng, session_id_of(hello))
        flight = self.rng.randint(2900, 3300)
        t = conn.send(t + conn.rtt_us // 2 + 900, False, sh + encrypted(self.keys, flight))
        ccs = b"\x14\x03\x03\x00\x01\x01"
        fin = encrypted(self.keys, 36)
        t = conn.send(t + conn.rtt_us // 2 + 500, True, ccs + fin)
        # The rest of the log's byte counts is application data (and close_notify).
        up = e.bytes_received - len(hello) - len(ccs) - len(fin) - 24
        down = e.bytes_sent - len(sh) - (flight + 22) - 24
        t = conn.send(t + 50, True, encrypted(self.keys, up - 22))
        t = conn.send(t + conn.rtt_us + 2000, False, encrypted(self.keys, down - 22))
        end = max(_us(e.start + timedelta(milliseconds=e.duration)), t + 100)
        t = conn.send(end, True, encrypted(self.keys, 2))
        t = conn.send(t + conn.rtt_us // 2, False, encrypted(self.keys, 2))
        t = conn.close(t + 60, client_first=True)
        self.conns.append(WireConn("egress", "tcp", self.node_id(pod), f"external:{host}",
                                   pod.ip, int(conn_port), ip, port, opened,
                                   _EPOCH + timedelta(microseconds=t), 0,
                                   e.requested_server_name))

    def failed(self) -> None:
        legacy_ip = next(p.ip for p in self.traffic.pods.values() if p.workload is LEGACY)
        for at, ip, port, refused in FAILED_ATTEMPTS:
            client = self.pod_at(legacy_ip, at)
            target = next((p for p in self.traffic.pods.values() if p.ip == ip), None)
            server = self.ep(target) if target else Endpoint(ip, 2, mac_for(ip))
            cport = self.rng.randint(32768, 60999)
            conn = TcpConn(self.w, self.ep(client), server, cport, port, self.rng, 90)
            if refused:
                conn.refused(_us(at))
            else:
                conn.unanswered(_us(at))
            dst = self.node_id(target) if target else f"unknown:{ip}"
            self.conns.append(WireConn("refused" if refused else "no-answer", "tcp",
                                       self.node_id(client), dst, client.ip, cport, ip, port,
                                       at, at))

    def run(self) -> bytes:
        pooled: dict[tuple[str, int, str, int], list[WireEvent]] = {}
        for ev in self.traffic.wire:
            if ev.kind == "mesh":
                c = ev.call
                assert c is not None
                pooled.setdefault((c.client_ip, c.conn_port, c.server_ip, c.target_port),
                                  []).append(ev)
        order = sorted(pooled.values(), key=lambda evs: min(e.call.start for e in evs
                                                           if e.call))
        for events in order:
            self.mesh(sorted(events, key=lambda e: e.call.start if e.call else WINDOW_START))
        for ev in sorted((e for e in self.traffic.wire if e.kind != "mesh"),
                         key=lambda e: e.call.start if e.call else
                         (e.tcp.start if e.tcp else WINDOW_START)):
            {"plain": self.plain, "ingress": self.ingress, "egress": self.egress}[ev.kind](ev)
        self.failed()
        self.conns.sort(key=lambda c: (c.opened, c.client_ip, c.client_port))
        return self.w.getvalue()


def build_capture(traffic: Traffic, seed: int) -> tuple[bytes, list[WireConn]]:
    """The capture of ``traffic`` (already run): pcap bytes and its connections."""
    builder = _CaptureBuilder(traffic, seed)
    data = builder.run()
    return data, builder.conns


def capture_connections(seed: int = DEFAULT_SEED) -> list[WireConn]:
    """The connections the shipped capture holds (for tests): rebuilt from the model."""
    traffic = Traffic(seed)
    traffic.run()
    return build_capture(traffic, seed)[1]


README_TEMPLATE = """\
# Bookinfo sample dump

Written by `samples/generate_bookinfo.py` (seeded, no wall clock: rerunning it rewrites these
bytes exactly). Do not edit by hand; change the generator and rerun
`python samples/generate_bookinfo.py`.

It is what you would collect from a kind cluster running Istio's Bookinfo sample
(`samples/bookinfo/platform/kube/bookinfo.yaml`) behind the Istio ingress gateway, with Istio
{istio} sidecars logging in the default TEXT format, over two hours
({start} .. {end}).

## Files

- `inventory.json` - taken at {end} (the end of the window) with

      kubectl get namespaces,pods,services,serviceaccounts,replicasets,deployments,\\
          statefulsets,daemonsets,jobs,cronjobs -A -o json

  Deleted pods are not in it.
- `logs/<namespace>/<pod>/istio-proxy.log` - `kubectl logs <pod> -c istio-proxy` (plain
  layout): pilot-agent lines (tab-separated `time level [scope] message`) followed by access
  lines. Lines are in the order Envoy flushes them (by completion), so `START_TIME` is not
  monotonic. The log of the deleted ratings pod is included (collected before it was deleted).
- `../bookinfo-capture/nodes.pcap.gz` - the same traffic as packets (see "Packet capture"
  below).

## Cluster

- `bookinfo/productpage-v1` (Deployment): pod 10.244.1.13, SA bookinfo-productpage, meshed.
- `bookinfo/details-v1`: pod 10.244.1.11, SA bookinfo-details, meshed.
- `bookinfo/reviews-v1`, `-v2`, `-v3`: pods 10.244.2.12, 10.244.1.15, 10.244.2.13,
  SA bookinfo-reviews, meshed.
- `bookinfo/ratings-v1`: pod 10.244.1.14 until 09:00:00 (deleted), then 10.244.2.21
  (ready 09:00:09); SA bookinfo-ratings, meshed.
- `bookinfo/nightly-report` (CronJob -> Job `{job}`): one pod, 10.244.2.30,
  09:30:01-09:30:09, Succeeded; SA nightly-report, meshed.
- `istio-system/istio-ingressgateway`: pod 10.244.2.5 listening on 8080,
  SA istio-ingressgateway-service-account.
- `istio-system/istiod`: pod 10.244.1.5, SA istiod, no proxy.
- `legacy/legacy-client`: pod 10.244.1.14 (the reused IP) from 09:04:51, SA default,
  **not meshed** (no istio-proxy, no log).

Services: details, ratings, reviews, productpage (ClusterIP, port 9080 -> targetPort 9080);
istio-ingressgateway (LoadBalancer 172.18.255.200, `externalTrafficPolicy: Local`, port
80 -> targetPort 8080, 443 -> 8443, 15021); istiod. Trust domain `cluster.local`.

An AuthorizationPolicy already exists on reviews (ALLOW GET from
`cluster.local/ns/bookinfo/sa/bookinfo-productpage`); it is not part of the dump, only its
effect is (403 lines).

## Traffic (access lines written)

{counts}

## What a correct analysis finds

Ports are the workloads' ports (targetPort); principals are `cluster.local/ns/<ns>/sa/<sa>`.

1. `external (203.0.113.0/24)` -> `istio-system/istio-ingressgateway` :8080 HTTP: GET
   `/productpage`, `/static/*`, `/api/v1/products/*`, POST `/login`. Seen only on the gateway's
   lines (downstream remote = the client, `X-Forwarded-For` = the client).
2. `istio-system/istio-ingressgateway` -> `bookinfo/productpage-v1` :9080 HTTP, mTLS: the same
   operations (GET `/productpage`, `/static/*`, `/api/v1/products/*`, POST `/login`).
3. `bookinfo/productpage-v1` -> `bookinfo/details-v1` :9080, mTLS, GET `/details/*`.
4. `bookinfo/productpage-v1` -> `bookinfo/reviews-v1`, `-v2`, `-v3` :9080, mTLS, GET `/reviews/*`.
5. `bookinfo/reviews-v2` and `bookinfo/reviews-v3` -> `bookinfo/ratings-v1` :9080, mTLS,
   GET `/ratings/*` (not reviews-v1: it never calls ratings). One reviews-v2 request at
   09:00:04 got `503 UH no_healthy_upstream` from its own sidecar while ratings had no ready
   pod: it has no server line and no upstream host.
6. `legacy/legacy-client` -> `bookinfo/ratings-v1` :9080, **plaintext** (server lines only,
   SNI `-`, no client sidecar line): GET `/ratings/*`, from 09:06 on. Finding: plaintext
   client; a principal-based policy would break it.
7. `legacy/legacy-client` -> `bookinfo/reviews-*` :9080: 3 requests at 09:15 **denied** by
   the existing policy (`403 rbac_access_denied_matched_policy[none]`, no upstream host).
   Finding: denied; a proposal must not allow it.
8. `bookinfo/nightly-report` (CronJob) -> `bookinfo/details-v1` :9080, mTLS, GET `/details/0`,
   exactly once (both sides logged it). Finding: rare edge (seen once).
9. `bookinfo/reviews-v3` -> `external:api.example.com` (198.51.100.23:443), TLS through
   `PassthroughCluster` (TCP lines, SNI `api.example.com`). Finding: external egress.
10. Idle: istiod (no access-logged traffic). ratings-v1's first pod
    (`ratings-v1-5dc7d8b4c9-vgfnq`) is not in the inventory.

## Packet capture

`samples/bookinfo-capture/nodes.pcap.gz` is what `tcpdump -i any -s {snaplen} -w nodes.pcap`
on both nodes records for the traffic above over the whole window (gzip-compressed; meshwright
and tshark read it as is): classic pcap, link type 276 (`LINUX_SLL2`, libpcap's `any`
device), snapshot length {snaplen} (headers and the first bytes of every segment; IP
lengths keep the real sizes). Analyse it alone with the inventory:

    meshwright analyze samples/bookinfo-capture --inventory samples/bookinfo/inventory.json -o out/

(It lives beside `samples/bookinfo`, not in it: analysing logs and packets of the same
traffic together would count it twice.)

What is on the wire:

- Sidecar to sidecar (gateway -> productpage, productpage -> details/reviews, reviews ->
  ratings, nightly-report -> details): pod IP to pod IP on the targetPort, over the client
  sidecar's pooled upstream connection (the `upstream_local_address` port of the logs): one TCP
  connection per pooled port, kept open across requests and closed by Envoy's 1 h idle timeout
  or when a pod goes away (still open when the capture stops otherwise; silences between
  requests last up to ~55 min). Each starts with a TLS 1.3 ClientHello with SNI
  `outbound_.9080_._.<service>.bookinfo.svc.cluster.local` and ALPN `istio-http/1.1`, `istio`,
  `http/1.1` (pilot's `mtlsHTTP11ALPN`), a ServerHello, then encrypted records sized like the
  requests and responses (with Envoy's added headers).
- legacy-client -> ratings and the three denied requests to reviews: cleartext HTTP/1.1 from
  curl, one connection per request (the 403 is the server sidecar's `RBAC: access denied`).
- Internet clients -> the gateway pod 10.244.2.5:8080 (after the node's DNAT;
  `externalTrafficPolicy: Local` keeps the client address): cleartext HTTP/1.1, one connection
  per request, as the gateway's log lines show.
- reviews-v3 -> api.example.com: a DNS query to kube-dns (Service 10.96.0.10:53, as the pod's
  veth sees it before DNAT; not in the inventory) answered with 198.51.100.23, then TLS with
  SNI `api.example.com` from the sidecar's passthrough connection.
- Failed attempts by legacy-client: two connections to istiod 10.244.1.5:9080 refused (SYN
  answered by RST) and one SYN to 10.244.2.40:9080, where no pod is, retransmitted without
  answer. They are evidence, not traffic to allow.
- Not on the wire: the 503 `no_healthy_upstream` (reviews-v2's own sidecar answered it) and
  the app <-> sidecar hops inside each pod (loopback in the pod's network namespace).

Simplifications: each packet appears once, as recorded on the sending pod's veth (a real
`-i any` capture also holds the copy on the receiving veth or on eth0; the two nodes'
captures were merged and such duplicates removed); large messages are single GSO
super-segments; ciphertext bytes are slices of one random block (the file has no keys, only
record sizes carry information; this keeps the compressed file small).

Connections in the capture:

{capture}

Traps a correct analysis avoids:

- **IP reuse**: 10.244.1.14 is ratings-v1's first pod until 09:00:00 and legacy-client from
  09:04:51. Before 09:00 it must resolve to ratings (the client lines' cluster says
  `outbound|9080||ratings.bookinfo.svc.cluster.local`, and the reporter is a ratings pod);
  after 09:04:51 it is legacy-client. Resolving it from the end-of-window inventory alone would
  turn ratings' traffic into legacy-client's.
- **One x-request-id per page view**: productpage propagates `x-request-id`, so the gateway,
  productpage, details, reviews and ratings lines of one page view share it. A client line and
  its server line are the pair with the same id *and* the same connection (the client's
  `upstream_local_address` is the server's `downstream_remote_address`).
- **Both sides logged**: every meshed request appears twice (client and server proxy); count
  requests once.
- Service VIPs (10.96.*) appear as the client's `downstream_local_address`; the endpoint is the
  pod in `upstream_host`.
"""


def capture_table(conns: list[WireConn]) -> str:
    """Markdown table: connections per (client, server, port, kind) in the capture."""
    per: dict[tuple[str, str, int, str], list[int]] = {}
    for c in conns:
        acc = per.setdefault((c.client, c.server, c.server_port, c.kind), [0, 0])
        acc[0] += 1
        acc[1] += c.requests
    rows = ["| connections | requests | client | server | port | kind |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {n} | {r} | {a} | {b} | {port} | {kind} |"
             for (a, b, port, kind), (n, r) in sorted(per.items())]
    return "\n".join(rows)


def readme(counts: dict[str, int], conns: list[WireConn]) -> str:
    rows = ["| lines | what |", "|---|---|"]
    rows += [f"| {n} | {name} |" for name, n in sorted(counts.items())]
    return README_TEMPLATE.format(
        istio=ISTIO_VERSION, start=ts(WINDOW_START), end=ts(WINDOW_END), job=CRON_JOB_NAME,
        counts="\n".join(rows), snaplen=CAPTURE_SNAPLEN, capture=capture_table(conns))


@dataclass
class Summary:
    files: list[str]
    counts: dict[str, int]


def generate(out_dir: Path, seed: int = DEFAULT_SEED, encoding: str = "text",
             capture_dir: Path | None = None) -> Summary:
    """Write the sample into ``out_dir`` (created); return what was written.

    ``encoding`` "json" writes the access lines in Istio's JSON encoding
    (``meshConfig.accessLogEncoding: JSON``) instead of the default TEXT format.
    ``capture_dir``: also write the packet capture of the same traffic there (its own
    directory, not inside ``out_dir``); ``Summary.files`` lists it as ``capture/<name>``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    inv = build_inventory(seed)
    (out_dir / "inventory.json").write_text(json.dumps(inv, indent=4, sort_keys=True) + "\n",
                                            encoding="utf-8")
    written.append("inventory.json")
    traffic = Traffic(seed, encoding)
    traffic.run()
    traffic.agent_lines()
    for rel, body in traffic.files():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            fh.write(body)
        written.append(rel)
    capture, conns = build_capture(traffic, seed)
    if capture_dir is not None:
        capture_dir.mkdir(parents=True, exist_ok=True)
        # gzip without a name or time in its header: the same bytes on every run.
        (capture_dir / CAPTURE_FILE).write_bytes(
            gzip.compress(capture, compresslevel=9, mtime=0))
        written.append(f"capture/{CAPTURE_FILE}")
    (out_dir / "README.md").write_text(readme(traffic.counts, conns), encoding="utf-8")
    written.append("README.md")
    return Summary(sorted(written), dict(sorted(traffic.counts.items())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("bookinfo"))
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--encoding", choices=["text", "json"], default="text",
                    help="access-log encoding (meshConfig.accessLogEncoding)")
    args = ap.parse_args(argv)
    summary = generate(args.output, args.seed, args.encoding,
                       capture_dir=args.output.parent / CAPTURE_DIR)
    for name, n in summary.counts.items():
        print(f"{n:6d}  {name}")
    print(f"wrote {len(summary.files)} files to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
