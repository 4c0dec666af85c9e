"""Linkerd records in learn: client identity first, address second, and the workload port.

The booksapp inventory below is generated in the shape ``kubectl get -o json`` returns
(tests/support/k8s_fixtures.py), with the addresses and names of the real access lines in
tests/data/linkerd-logs/ (Linkerd's docs): traffic's pods dial webapp:7000, the kubelet probes
webapp's /ping. Expected edges are derived by hand from those lines and this inventory.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from support import k8s_fixtures as K

from learn.identity import IdentityResolver, linkerd_identity
from learn.pipeline import Learned, learn_graph
from observe.flows_io import write_flows
from observe.inventory import load_inventory
from observe.linkerd import SOURCE_APACHE, SOURCE_JSON, to_flows
from observe.linkerd import parse as parse_linkerd
from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs

DATA = Path(__file__).resolve().parents[1] / "data"
APACHE = DATA / "linkerd-logs" / "linkerd-docs-access-log-apache.log"
JSONL = DATA / "linkerd-logs" / "linkerd-docs-access-log-json.jsonl"
EMOJIVOTO = DATA / "inventory" / "linkerd-run-emojivoto.yml"
TD = "serviceaccount.identity.linkerd.cluster.local"


PROXY = {"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy:stable-2.12.0",
         "ports": [{"containerPort": 4143, "name": "linkerd-proxy", "protocol": "TCP"},
                   {"containerPort": 4191, "name": "linkerd-admin", "protocol": "TCP"}]}


def _deploy(name: str, sa: str, port: int, probe: str | None = None) -> dict[str, Any]:
    d = K.deployment(name, {"app": name}, namespace="booksapp", service_account=sa)
    app: dict[str, Any] = {"name": name, "image": "buoyantio/booksapp:v0.0.5",
                           "ports": [{"containerPort": port, "name": "service",
                                      "protocol": "TCP"}]}
    if probe:
        app["readinessProbe"] = {"httpGet": {"path": probe, "port": port}}
    d["spec"]["template"]["spec"]["containers"] = [app]
    return d


def _pods(deploy: dict[str, Any], ip: str, created: str) -> list[dict[str, Any]]:
    pods = K.pods_for(deploy, [ip], created=created, meshed=False, host_ip="172.18.0.2")
    for pod in pods:
        pod["spec"]["containers"].append(copy.deepcopy(PROXY))
        pod["metadata"]["annotations"] = {"linkerd.io/proxy-version": "stable-2.12.0",
                                          "config.linkerd.io/access-log": "json"}
    return pods


def booksapp_inventory(tmp_path: Path) -> Path:
    webapp = _deploy("webapp", "webapp", 7000, probe="/ping")
    traffic = _deploy("traffic", "traffic", 8080)
    authors = _deploy("authors", "authors", 7001)
    books = _deploy("books", "default", 7002)
    ratings = _deploy("ratings", "default", 7003)  # shares the 'default' service account
    items: list[dict[str, Any]] = []
    for d in (webapp, traffic, authors, books, ratings):
        items += [d, K.replicaset_for(d)]
    # The dump was taken after the JSON lines: the pods of that time (the apache-era
    # traffic pod, 10.42.0.63, was already gone).
    items += _pods(webapp, "10.42.0.69", "2022-08-23T20:31:00Z")
    items += _pods(traffic, "10.42.0.70", "2022-08-23T20:31:05Z")
    items += _pods(authors, "10.42.0.71", "2022-08-23T20:00:00Z")
    items += _pods(books, "10.42.0.72", "2022-08-23T20:00:00Z")
    items += _pods(ratings, "10.42.0.73", "2022-08-23T20:00:00Z")
    items.append(K.service("webapp", {"app": "webapp"},
                           [{"name": "service", "port": 7000, "protocol": "TCP"}],
                           cluster_ip="10.43.12.7", namespace="booksapp"))
    items.append(K.service("authors", {"app": "authors"},
                           [{"name": "service", "port": 7001, "protocol": "TCP"}],
                           cluster_ip="10.43.12.8", namespace="booksapp"))
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(K.k8s_list(items)), encoding="utf-8")
    return path


def _dump(tmp_path: Path, extra_json: Sequence[str] = ()) -> Path:
    """A kubectl-logs style dump: webapp's old pod logged apache, its new pod JSON."""
    root = tmp_path / "dump"
    old = root / "booksapp" / "webapp-6b8c6f6d9c-7wbrn"
    new_pod = json.loads(booksapp_inventory(tmp_path).read_text())["items"]
    name = next(i["metadata"]["name"] for i in new_pod
                if i["kind"] == "Pod" and i["metadata"]["name"].startswith("webapp-"))
    new = root / "booksapp" / name
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "linkerd-proxy.log").write_text(APACHE.read_text(encoding="utf-8"), encoding="utf-8")
    lines = JSONL.read_text(encoding="utf-8").splitlines() + list(extra_json)
    (new / "linkerd-proxy.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _learn(tmp_path: Path, extra_json: Sequence[str] = ()) -> tuple[Learned, ObserveStats]:
    root = _dump(tmp_path, extra_json)
    stats = ObserveStats()
    flows = tmp_path / "flows.parquet"
    write_flows(iter_flows(plan_inputs([str(root)]), ObserveOptions(), stats), flows)
    inventory = load_inventory([tmp_path / "inventory.json"])
    return learn_graph(flows, inventory), stats


def test_booksapp_dump_gives_identity_resolved_edges(tmp_path: Path) -> None:
    learned, stats = _learn(tmp_path)
    assert stats.by_source == {"linkerd-apache": 5, "linkerd-json": 5}
    edges = {(e.source, e.destination, e.port, e.protocol): e for e in learned.graph.edges}
    # 8 requests from traffic's identity (4 per format) to webapp's port 7000; the apache-era
    # client address 10.42.0.63 is in no inventory pod: the identity alone resolves it.
    meshed = edges[("booksapp/traffic", "booksapp/webapp", 7000, "http")]
    assert meshed.requests == 8
    assert meshed.mtls_requests == 8
    # The kubelet probes (identity '-'): JSON names the pod IP and port; apache logs no port,
    # so the port is the webapp readiness probe's for /ping.
    probes = [e for k, e in edges.items() if k[1] == "booksapp/webapp" and k[0] !=
              "booksapp/traffic"]
    assert [(e.source, e.port, e.requests, e.plaintext_requests) for e in probes] == [
        ("unknown:10.42.0.1", 7000, 2, 2)]
    assert learned.stats["records_unattributed"] == 0
    assert learned.stats["records_counted"] == 10
    assert any("/ping without a port taken as its HTTP probe on port 7000" in a
               for a in learned.graph.ambiguities)
    ops = {(o.method, o.path) for o in meshed.operations}
    assert ("POST", "/authors") in ops and ("POST", "/books") in ops


def test_identity_and_address_mismatch_is_an_ambiguity(tmp_path: Path) -> None:
    # traffic's identity from an address the inventory gives authors at that time.
    line = ('{"client.addr":"10.42.0.71:40000","client.id":"traffic.booksapp.' + TD + '",'
            '"host":"webapp:7000","method":"GET","processing_ns":"1","request_bytes":"",'
            '"response_bytes":"5","status":200,"timestamp":"2022-08-23T20:40:00.5Z",'
            '"total_ns":"1000000","trace_id":"","uri":"http://webapp:7000/x",'
            '"user_agent":"curl/8","version":"HTTP/2.0"}')
    learned, _ = _learn(tmp_path, [line])
    edges = {(e.source, e.destination, e.port) for e in learned.graph.edges}
    assert ("booksapp/authors", "booksapp/webapp", 7000) not in edges
    assert ("booksapp/traffic", "booksapp/webapp", 7000) in edges
    assert any(a.startswith(f"traffic.booksapp.{TD}: the Linkerd identity of booksapp/traffic, "
                            "but its address 10.42.0.71 belonged to booksapp/authors")
               for a in learned.graph.ambiguities)


def _resolve(tmp_path: Path, lines: list[str], source: str = SOURCE_JSON,
             reporter: str = "booksapp/webapp-6b8c6f6d9c-7wbrn"
             ) -> tuple[list[dict[str, object]], IdentityResolver]:
    inventory = load_inventory([booksapp_inventory(tmp_path)])
    resolver = IdentityResolver(inventory)
    parsed = parse_linkerd(lines, source)
    assert parsed.errors == []
    n = parsed.fields.num_rows
    batch = to_flows(parsed.fields, reporter=pa.array([reporter] * n),
                     origin=pa.array(["x"] * n), source=source)
    return resolver.resolve(batch).to_pylist(), resolver


def _apache(addr: str, ident: str, uri: str, version: str = "HTTP/2.0") -> str:
    return f'{addr} {ident} - [2022-08-23T20:40:00Z] "GET {uri} {version}" 200'


def test_shared_service_account_is_decided_by_the_address(tmp_path: Path) -> None:
    default = f"default.booksapp.{TD}"
    rows, resolver = _resolve(tmp_path, [
        _apache("10.42.0.72:1", default, "http://authors:7001/a"),  # books' pod: books
        _apache("10.42.0.9:1", default, "http://authors:7001/a"),  # nobody's address
    ], source=SOURCE_APACHE, reporter="booksapp/authors-x")
    assert rows[0]["src_workload"] == "booksapp/books"
    assert str(rows[0]["src_pod"]).startswith("booksapp/books-")
    # 'default' runs books and ratings; an address neither held picks none: not guessed.
    assert rows[1]["src_workload"] == "unknown:10.42.0.9"
    assert resolver.workloads_running_as("booksapp", "default") == [
        "booksapp/books", "booksapp/ratings"]
    assert resolver.workloads_running_as("booksapp", "traffic") == ["booksapp/traffic"]
    assert any(a.startswith(f"{default}: service account booksapp/default runs booksapp/books, "
                            "booksapp/ratings, and the address 10.42.0.9")
               for a in resolver.ambiguities)


def test_identity_of_unknown_service_account_falls_back_to_the_address(tmp_path: Path) -> None:
    rows, resolver = _resolve(tmp_path, [
        _apache("10.42.0.71:1", f"ghost.booksapp.{TD}", "http://webapp:7000/"),
        _apache("10.42.0.200:1", f"ghost.booksapp.{TD}", "http://webapp:7000/"),
    ], source=SOURCE_APACHE)
    # 10.42.0.71 is authors' pod, which runs as 'authors', not 'ghost': not attributed.
    assert rows[0]["src_workload"] == "unknown:10.42.0.71"
    assert rows[1]["src_workload"] == "unknown:10.42.0.200"
    assert any("runs as another service account; not attributed" in a
               for a in resolver.ambiguities)
    assert any("no inventory workload runs as service account booksapp/ghost" in i
               for i in resolver.inferred)


def test_trust_domain_and_control_plane_are_read_from_the_identity(tmp_path: Path) -> None:
    ident = "traffic.booksapp.serviceaccount.identity.l5d-system.prod.example.org"
    rows, resolver = _resolve(tmp_path, [_apache("10.42.0.70:1", ident, "http://webapp:7000/")],
                              source=SOURCE_APACHE)
    assert rows[0]["src_workload"] == "booksapp/traffic"
    assert resolver.linkerd_domains == [("l5d-system", "prod.example.org")]
    node = resolver.node("booksapp/traffic")
    assert linkerd_identity(node, control_plane="l5d-system", trust_domain="prod.example.org") \
        == ident


def test_destination_port_from_service_port_and_pod_address(tmp_path: Path) -> None:
    rows, resolver = _resolve(tmp_path, [
        _apache("10.42.0.70:1", f"traffic.booksapp.{TD}", "http://webapp.booksapp:7000/"),
        _apache("10.42.0.70:1", f"traffic.booksapp.{TD}", "http://10.43.12.7:7000/"),  # VIP
        _apache("10.42.0.70:1", f"traffic.booksapp.{TD}", "http://webapp:9999/"),
    ], source=SOURCE_APACHE)
    assert [r["dst_workload"] for r in rows] == ["booksapp/webapp"] * 3
    assert [r["dst_port"] for r in rows] == [7000, 7000, None]
    assert any("dialled to port 9999" in a for a in resolver.ambiguities)


def test_emojivoto_service_port_maps_to_target_port(tmp_path: Path) -> None:
    """vote-bot dials web-svc.emojivoto:80 (its WEB_HOST); web-svc's targetPort is 8080.
    web dials emoji-svc.emojivoto:8080 and voting-svc.emojivoto:8080 over gRPC."""
    inventory = load_inventory([EMOJIVOTO])
    resolver = IdentityResolver(inventory)
    lines = [
        _apache("10.244.0.20:1", f"default.emojivoto.{TD}", "http://web-svc.emojivoto:80/api/vote"
                "?choice=:doughnut:", "HTTP/1.1"),
        '10.244.0.21:2 web.emojivoto.' + TD + ' - [2024-01-02T03:04:05Z] "POST http://'
        'emoji-svc.emojivoto:8080/emojivoto.v1.EmojiService/ListAll HTTP/2.0" 200',
        '10.244.0.21:3 web.emojivoto.' + TD + ' - [2024-01-02T03:04:05Z] "POST http://'
        'voting-svc.emojivoto:8080/emojivoto.v1.VotingService/VoteDoughnut HTTP/2.0" 200',
    ]
    reporters = ["emojivoto/web-5f86686c4d-58p7k", "emojivoto/emoji-78f7c5b6d4-kq2sx",
                 "emojivoto/voting-6d9cbbf8b5-wv9zd"]
    parsed = parse_linkerd(lines, SOURCE_APACHE)
    batch = to_flows(parsed.fields, reporter=pa.array(reporters), origin=pa.array(["x"] * 3),
                     source=SOURCE_APACHE)
    rows = resolver.resolve(batch).to_pylist()
    got = [(r["src_workload"], r["dst_workload"], r["dst_port"], r["protocol"]) for r in rows]
    assert got == [
        ("emojivoto/vote-bot", "emojivoto/web", 8080, "http"),
        ("emojivoto/web", "emojivoto/emoji", 8080, "grpc"),
        ("emojivoto/web", "emojivoto/voting", 8080, "grpc"),
    ]
