"""Graph aggregation: counting each request once, edges keyed by identity and workload port."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from learn.graph import GraphBuilder
from learn.model import Node
from observe.schema import FLOW_SCHEMA, conform

T0 = datetime(2025, 1, 30, 10, 0, tzinfo=UTC)


def _batch(rows: list[dict[str, Any]], with_pods: bool = True) -> pa.RecordBatch:
    base = {
        "transport": "tcp", "protocol": "http", "http_version": "HTTP/1.1", "status": 200,
        "bytes_in": 0, "bytes_out": 100, "mtls": "mtls", "denied": False, "source": "test",
    }
    full = [{**base, **r} for r in rows]
    if not with_pods:
        full = [{k: v for k, v in r.items() if k not in ("src_pod", "dst_pod")} for r in full]
    return conform(pa.Table.from_pylist(
        [{k: v for k, v in r.items() if k in FLOW_SCHEMA.names} for r in full]
    ))


def _node(node_id: str) -> Node:
    ns, _, name = node_id.partition("/")
    return Node(id=node_id, kind="Deployment", namespace=ns, workload=name, meshed=True)


def _req(i: int, **kw: Any) -> dict[str, Any]:
    row = {
        "time": T0 + timedelta(minutes=i), "src_ip": "10.0.0.1", "src_port": 40000 + i,
        "dst_ip": "10.0.0.2", "dst_port": 9080, "direction": "inbound",
        "reporter": "bookinfo/details-v1-abc", "src_workload": "bookinfo/productpage-v1",
        "dst_workload": "bookinfo/details-v1", "dst_pod": "bookinfo/details-v1-abc",
        "method": "GET", "path": f"/details/{i}", "origin": f"details.log:{i + 1}",
    }
    row.update(kw)
    return row


def test_request_seen_by_both_sidecars_counts_once() -> None:
    inbound = [_req(i) for i in range(3)]
    outbound = [_req(i, direction="outbound", reporter="bookinfo/productpage-v1-x",
                     origin=f"productpage.log:{i + 1}") for i in range(3)]
    builder = GraphBuilder(inbound_reporters={"bookinfo/details-v1-abc"},
                           path_family=lambda p, proto: p.rsplit("/", 1)[0] + "/*")
    builder.add(_batch(inbound + outbound))
    graph = builder.build(_node)
    assert builder.records_mirrored == 3
    [edge] = graph.edges
    assert edge.requests == 3
    assert edge.mtls == "full"
    assert [(o.method, o.path, o.requests) for o in edge.operations] == [("GET", "/details/*", 3)]
    assert edge.evidence == ["details.log:1", "details.log:2", "details.log:3"]


def test_outbound_counts_when_server_did_not_report() -> None:
    outbound = [_req(i, direction="outbound", mtls="unknown") for i in range(2)]
    builder = GraphBuilder(inbound_reporters={"bookinfo/other-pod"})
    builder.add(_batch(outbound))
    [edge] = builder.build(_node).edges
    assert edge.requests == 2 and edge.mtls == "unknown"


def test_edges_split_by_port_protocol_and_denials_kept_out_of_operations() -> None:
    rows = [
        _req(0),
        _req(1, dst_port=3306, protocol="tcp", method=None, path=None),
        _req(2, method="DELETE", path="/details/9", denied=True, status=403),
        _req(3, mtls="plaintext", src_ip="10.9.9.9"),
    ]
    builder = GraphBuilder()
    builder.add(_batch(rows, with_pods=False))
    graph = builder.build(_node, idle=["bookinfo/details-v1", "bookinfo/ratings-v1"])
    tcp, http = sorted(graph.edges, key=lambda e: e.port)
    assert (http.port, http.protocol, http.requests, http.denied_requests) == (9080, "http", 3, 1)
    assert "DELETE" not in http.methods
    assert http.response_classes == {"2xx": 2, "4xx": 1}
    assert http.mtls == "partial" and http.plaintext_requests == 1
    assert http.source_ips == ["10.9.9.9"]
    assert (tcp.port, tcp.protocol, tcp.operations) == (3306, "tcp", [])
    assert graph.idle_workloads == ["bookinfo/ratings-v1"]
    assert graph.first_seen == T0 and graph.last_seen == T0 + timedelta(minutes=3)


def test_streaming_batches_equal_one_batch() -> None:
    rows = [_req(i, path=f"/d/{i % 4}", hour=0) for i in range(40)]
    one = GraphBuilder()
    one.add(_batch(rows))
    many = GraphBuilder()
    for i in range(0, 40, 7):
        many.add(_batch(rows[i:i + 7]))
    assert one.build(_node).edges == many.build(_node).edges


def test_records_without_time_are_counted_not_fatal() -> None:
    builder = GraphBuilder()
    builder.add(_batch([_req(0), _req(1, time=None, origin="x.json:9")]))
    [edge] = builder.build(_node).edges
    assert edge.requests == 2
    assert edge.first_seen == edge.last_seen == T0
    assert edge.evidence == ["details.log:1", "x.json:9"]  # untimed evidence sorts last


def test_loopback_connections_are_counted_not_edges() -> None:
    """A connection between two loopback addresses never left its network namespace (one pod,
    or the node): no mesh or NetworkPolicy rule applies, so it is counted, not an edge. A
    proxy's request to its app on 127.0.0.1 is a request record and stays."""
    conn = {"kind": "connection", "protocol": "tcp", "direction": "outbound",
            "reporter": "bookinfo/details-v1-abc", "src_workload": "bookinfo/details-v1",
            "dst_workload": None, "dst_pod": None}
    rows = [
        _req(0, src_ip="127.0.0.1", dst_ip="127.0.0.1", dst_port=15000, **conn),
        _req(1, src_ip="::1", dst_ip="::1", dst_port=15020, **conn),
        _req(2, src_ip="127.0.0.6", dst_ip="127.0.0.1", dst_port=9080, **conn),
        # a connection leaving the pod: kept
        _req(3, src_ip="10.0.0.1", dst_ip="10.0.0.2", dst_port=9080,
             **{**conn, "dst_workload": "bookinfo/ratings-v1"}),
        # a request record (sidecar to its app): kept
        _req(4, src_ip="127.0.0.6", dst_ip="127.0.0.1"),
    ]
    builder = GraphBuilder()
    builder.add(_batch(rows))
    graph = builder.build(_node)
    assert builder.records_local == 3
    assert builder.records_counted == 2
    assert sorted((e.destination, e.port) for e in graph.edges) == [
        ("bookinfo/details-v1", 9080), ("bookinfo/ratings-v1", 9080)]
