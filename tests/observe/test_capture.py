"""Tests for observe/capture.py: real captures -> connection and request records."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import zstandard

from observe import payload
from observe.capture import CaptureMapper, DnsNames, _service_host, capture_batches
from observe.conntrack import ConnectionTracker
from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs
from observe.schema import FLOW_SCHEMA

PCAP = Path(__file__).parents[1] / "data" / "pcap"
HTTP_CAPTURES = ["zeek-http-pipelined.pcap", "zeek-http-get.pcap",
                 "tcpdump-print-flags-http11.pcap", "zeek-http-post.pcap", "deepflow-httpv1.pcap"]


def records(name: str, tracker: ConnectionTracker | None = None) -> pa.Table:
    with open(PCAP / name, "rb") as fh:
        batches = list(capture_batches(fh, name, tracker=tracker))
    table = pa.Table.from_batches(batches, schema=FLOW_SCHEMA)
    assert table.schema == FLOW_SCHEMA
    return table


def tshark_requests(name: str) -> list[tuple[int, str, str]]:
    out = subprocess.run(
        ["tshark", "-r", str(PCAP / name), "-Y", "http.request", "-T", "fields",
         "-e", "frame.number", "-e", "http.request.method", "-e", "http.request.uri"],
        capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        frame, method, uri = line.split("\t")
        rows.append((int(frame), method, uri))
    return rows


@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_http_requests_and_their_packets_equal_tsharks(name: str) -> None:
    table = records(name)
    reqs = table.filter(pa.compute.equal(table["kind"], "request"))
    got = [(int(o.rsplit(" ", 1)[1]), m, p) for o, m, p in zip(
        reqs["origin"].to_pylist(), reqs["method"].to_pylist(), reqs["path"].to_pylist(),
        strict=True)]
    # tshark numbers the packet that completes a request split over segments; meshwright the
    # one that starts it (where the request line is): compare frames only when one packet.
    want = tshark_requests(name)
    assert [(m, p) for _, m, p in got] == [(m, p) for _, m, p in want]
    assert all(g[0] <= w[0] for g, w in zip(got, want, strict=True))
    conns = table.filter(pa.compute.equal(table["kind"], "connection"))
    assert conns.num_rows >= 1
    assert set(conns["protocol"].to_pylist()) == {"http"}
    assert set(reqs["mtls"].to_pylist()) == set(conns["mtls"].to_pylist()) == {"plaintext"}


def test_pipelined_requests_keep_their_own_packet_and_status() -> None:
    table = records("zeek-http-pipelined.pcap").to_pylist()
    conn = [r for r in table if r["kind"] == "connection"]
    reqs = [r for r in table if r["kind"] == "request"]
    assert len(conn) == 1 and len(reqs) == 5
    assert {r["status"] for r in reqs} == {200}
    assert {(r["src_ip"], r["src_port"], r["dst_port"]) for r in reqs} == {
        (conn[0]["src_ip"], conn[0]["src_port"], conn[0]["dst_port"])}
    assert conn[0]["service_host"] == "www.mozilla.org"
    assert conn[0]["packets_in"] + conn[0]["packets_out"] == 49 - 0  # every packet is its own
    assert conn[0]["tcp_state"] == "established" and conn[0]["tcp_end"] == "fin"


def test_itemized_only_when_the_whole_client_stream_was_kept() -> None:
    whole = records("zeek-http-get.pcap")
    conn = whole.filter(pa.compute.equal(whole["kind"], "connection")).to_pylist()[0]
    assert conn["itemized"] is True
    # With a head too short for the request, requests may be missing: not itemized, though
    # the request line (packet-level) is still recorded.
    cut = records("zeek-http-get.pcap", tracker=ConnectionTracker(head_bytes=16))
    conn = cut.filter(pa.compute.equal(cut["kind"], "connection")).to_pylist()[0]
    assert conn["itemized"] is False
    assert cut.filter(pa.compute.equal(cut["kind"], "request")).num_rows == 1


def test_refused_connection_is_a_failed_attempt() -> None:
    table = records("deepflow-server-reset.pcap").to_pylist()
    assert [(r["kind"], r["tcp_state"], r["tcp_end"]) for r in table] == [
        ("connection", "refused", "rst")]
    assert table[0]["mtls"] == "unknown" and table[0]["protocol"] == "tcp"


def test_grpc_requests_from_http2_headers() -> None:
    table = records("deepflow-grpc-unary.pcap").to_pylist()
    reqs = [r for r in table if r["kind"] == "request"]
    assert [(r["method"], r["path"], r["protocol"], r["http_version"]) for r in reqs] == [
        ("POST", "/agent.Synchronizer/Sync", "grpc", "HTTP/2")]
    assert reqs[0]["mtls"] == "plaintext"


def test_dns_answers_name_the_addresses_they_resolve() -> None:
    table = records("tcpdump-dns_udp.pcap").to_pylist()
    assert [(r["kind"], r["transport"], r["protocol"], r["dst_port"]) for r in table] == [
        ("connection", "udp", "dns", 53)]
    mapper = CaptureMapper("x")
    with open(PCAP / "tcpdump-dns_udp.pcap", "rb") as fh:
        list(capture_batches(fh, "x", mapper=mapper))
    # tshark: www.tcpdump.org has A 192.139.46.66 among others.
    assert mapper.dns.names.get("192.139.46.66") == "www.tcpdump.org"
    info = payload.StreamInfo(protocol="tcp", mtls="unknown")
    assert _service_host(info, None, "192.139.46.66", mapper.dns) == "www.tcpdump.org"
    assert _service_host(info, None, "192.0.2.1", DnsNames()) is None


def test_istio_sni_names_the_service() -> None:
    info = payload.StreamInfo(protocol="tls", mtls="mtls", mesh="istio",
                              sni="outbound_.9080_._.details.bookinfo.svc.cluster.local")
    assert _service_host(info, None, "10.0.0.1", DnsNames()) == "details.bookinfo.svc.cluster.local"
    plain = payload.StreamInfo(protocol="tls", mtls="tls", sni="api.example.com")
    assert _service_host(plain, None, "10.0.0.1", DnsNames()) == "api.example.com"
    req = payload.HttpRequest(method="GET", path="/", authority="[fd00::1]:8080")
    assert _service_host(payload.StreamInfo(protocol="http", mtls="plaintext"), req, "x",
                         DnsNames()) == "fd00::1"


def test_observe_reads_captures_compressed_or_not_by_content(tmp_path: Path) -> None:
    raw = (PCAP / "zeek-http-pipelined.pcap").read_bytes()
    (tmp_path / "a.log").write_bytes(gzip.compress(raw))  # names say nothing
    (tmp_path / "b.txt").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c").write_bytes(raw)
    plan = plan_inputs([str(tmp_path)])
    assert len(plan.captures) == 3 and not plan.logs
    stats = ObserveStats()
    tables = [pa.Table.from_batches(list(iter_flows(
        plan_inputs([str(tmp_path / n)]), ObserveOptions(), ObserveStats())))
        for n in ("a.log", "b.txt", "c")]
    rows = [t.drop_columns(["origin"]).to_pylist() for t in tables]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 6
    all_rows = list(iter_flows(plan, ObserveOptions(), stats))
    # Together they are three captures of one connection: counted once.
    assert sum(b.num_rows for b in all_rows) == 6
    assert stats.packets == 3 * 49
    assert stats.connections == 1 and stats.duplicate_connections == 2


def test_truncated_zstd_capture_keeps_what_it_holds(tmp_path: Path) -> None:
    raw = (PCAP / "zeek-http-pipelined.pcap").read_bytes()
    # Written as a streaming compressor writes (blocks flushed as it goes), then cut.
    sink = zstandard.ZstdCompressor().compressobj()
    packed = b"".join(sink.compress(raw[i:i + 4096]) + sink.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                      for i in range(0, len(raw), 4096)) + sink.flush()
    (tmp_path / "cut").write_bytes(packed[: len(packed) * 2 // 3])
    stats = ObserveStats()
    rows = list(iter_flows(plan_inputs([str(tmp_path / "cut")]), ObserveOptions(), stats))
    assert stats.skipped_files and "cut short" in stats.skipped_files[0][1]
    assert 0 < stats.packets < 49
    assert sum(b.num_rows for b in rows) >= 1


def test_damaged_and_foreign_captures_never_raise() -> None:
    from observe.errors import InputError

    read = 0
    for path in sorted(PCAP.iterdir()):
        try:
            plan = plan_inputs([str(path)])
        except InputError as exc:  # a named file that is no input: one clean line
            assert "\n" not in str(exc) and str(path) in str(exc)
            continue
        stats = ObserveStats()
        for batch in iter_flows(plan, ObserveOptions(), stats):
            assert batch.schema == FLOW_SCHEMA
        read += bool(plan.captures)
    assert read > 100


def test_multi_frame_zstd_reads_every_frame(tmp_path: Path) -> None:
    raw = (PCAP / "zeek-http-pipelined.pcap").read_bytes()
    half = len(raw) // 2
    c = zstandard.ZstdCompressor()
    (tmp_path / "two").write_bytes(c.compress(raw[:half]) + c.compress(raw[half:]))
    stats = ObserveStats()
    rows = list(iter_flows(plan_inputs([str(tmp_path / "two")]), ObserveOptions(), stats))
    assert stats.packets == 49 and not stats.skipped_files
    assert sum(b.num_rows for b in rows) == 6


def test_the_same_connection_in_two_captures_counts_once(tmp_path: Path) -> None:
    # Both nodes captured the connection: the same 5-tuple and client ISN in two files.
    raw = (PCAP / "zeek-http-pipelined.pcap").read_bytes()
    (tmp_path / "client-node").write_bytes(raw)
    (tmp_path / "server-node").write_bytes(raw)
    stats = ObserveStats()
    rows = [r for b in iter_flows(plan_inputs([str(tmp_path)]), ObserveOptions(), stats)
            for r in b.to_pylist()]
    assert stats.connections == 1 and stats.duplicate_connections == 1
    assert [r["kind"] for r in rows].count("request") == 5


def test_copies_on_other_interfaces_count_once() -> None:
    # tcpdump -i any on a node: each packet on the sender's veth, the bridge and the
    # receiver's veth (a real capture, see meshwright-bridge-any.py).
    stats = ObserveStats()
    rows = [r for b in iter_flows(plan_inputs([str(PCAP / "meshwright-bridge-any.pcap")]),
                                  ObserveOptions(), stats) for r in b.to_pylist()]
    assert stats.duplicate_copies > 0
    reqs = [r for r in rows if r["kind"] == "request"]
    assert len(reqs) == len({(r["src_port"], r["origin"]) for r in reqs}) == 7
