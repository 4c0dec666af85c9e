"""Tests for observe/capture.py: real captures -> connection and request records."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from observe import capture, payload, pcap
from observe.capture import CaptureMapper, DnsNames, _service_host, capture_batches
from observe.compiled import pcapcut
from observe.conntrack import HTTP_SCHEMA, ConnectionTracker
from observe.errors import FormatError
from observe.pcap import CaptureStats, read_packets
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


# -- the compiled HTTP/1 scan (observe/_pcapcut.c http1_scan) against the regexes -------------

CAPTURES = sorted(p.name for p in PCAP.iterdir() if p.suffix in (".pcap", ".pcapng"))


def same_http1(got: capture._Http1, want: capture._Http1) -> None:
    for name in ("conn_ids", "frames", "ts_ns"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    for name in ("method", "path", "version", "host", "status", "denied"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.type == w.type and g.to_pylist() == w.to_pylist(), name


def tracker_http(name: str) -> list[pa.Table]:
    """The HTTP/1 message-start tables the tracker hands over for a capture (as observe
    flushes them)."""
    tracker = ConnectionTracker(idle_timeout_s=capture.IDLE_TIMEOUT_S)
    out = []
    stats = CaptureStats(name)
    with open(PCAP / name, "rb") as fh:
        try:
            for batch in read_packets(fh, name, stats=stats):
                tracker.update(batch)
                out.append(tracker.flush().http)
        except FormatError:
            pass
    out.append(tracker.finish().http)
    return [t for t in out if t.num_rows]


def test_the_http1_kernel_is_built_and_used() -> None:
    assert pcapcut is not None and hasattr(pcapcut, "http1_scan")


@pytest.mark.parametrize("name", CAPTURES)
def test_http1_kernel_equals_the_regexes_on_every_capture(name: str) -> None:
    for http in tracker_http(name):
        same_http1(capture._http1_requests(http), capture._http1_requests_re(http))


@pytest.mark.parametrize("name", CAPTURES)
def test_records_are_the_same_with_and_without_the_kernels(name: str) -> None:
    def run(use: bool) -> pa.Table | str:
        pcap.USE_KERNEL = use
        try:
            return records(name)
        except FormatError as e:
            return str(e)
        finally:
            pcap.USE_KERNEL = True

    with_kernel, without = run(True), run(False)
    if isinstance(with_kernel, str):
        assert with_kernel == without
    else:
        assert isinstance(without, pa.Table) and with_kernel.equals(without)


# Messages made of the pieces request/status lines and Host headers are made of, near misses
# included (lower-case or over-long methods, double spaces, lone CRs, blank lines, Host-like
# names, bytes that are not UTF-8), so that random ones hit every branch of both readers.
def _one(*items: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(items)


_EOL = _one(*[b"\r\n"] * 6, *[b"\n"] * 2, b"\r", b"\r\r\n", b"")
_VERSION = _one(*[b"HTTP/1.1"] * 6, b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2", b"http/1.1")
_METHOD = _one(*[b"GET"] * 5, b"POST", b"M-_9", b"get", b"A" * 32, b"A" * 33, b"", b"9X")
_TARGET = _one(*[b"/"] * 4, b"/p?q=1", b"\xff\xfe", b"\xc3\xa9", b"", b"/a b")
_REQUEST_LINE = st.tuples(_METHOD, _one(*[b" "] * 6, b"  "), _TARGET, _one(b" "), _VERSION,
                          _EOL).map(b"".join)
_CODE = _one(b"200", b"101", b"100", *[b"403"] * 3, b"404", b"99", b"2x0")
_STATUS_LINE = st.tuples(_VERSION, _one(*[b" "] * 4, b""), _CODE,
                         _one(b" OK", b"", b" Forbidden"), _EOL).map(b"".join)
_WS = _one(b"", b" ", b"\t", b" \t ")
_NAME = _one(*[b"Host"] * 4, b"HOST", b"hOsT", b"Hostname", b"host ", b"X-Host", b"a", b"")
_VALUE = _one(b"x.y:80", b"[::1]:8080", b"", b"\xff", b"a\rb", b"far")
_HEADER = st.tuples(_NAME, _WS, _one(*[b":"] * 4, b"", b"::"), _WS, _VALUE, _WS,
                    _EOL).map(b"".join)
_BODY = _one(b"", *[b"RBAC: access denied"] * 2, b"x RBAC: access denied", b"RBAC: access")


def _message(start: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(
        start, st.lists(_HEADER, max_size=6), _one(b"", b"\r\n", b"\n"),
        _BODY | st.binary(max_size=8),
    ).map(lambda t: t[0] + b"".join(t[1]) + t[2] + t[3])


_ANY = _REQUEST_LINE | _STATUS_LINE | st.binary(max_size=16)
# Exchanges: a client message then a server one, on one of three connections; mostly a request
# and a response, sometimes anything (responses before requests, requests from the server).
_EXCHANGE = st.tuples(st.integers(1, 3), _message(_REQUEST_LINE | _REQUEST_LINE | _ANY),
                      _message(_STATUS_LINE | _STATUS_LINE | _ANY), st.booleans())


@settings(max_examples=400, deadline=None)
@given(st.lists(_EXCHANGE, min_size=1, max_size=8))
def test_http1_kernel_equals_the_regexes_on_random_messages(
        exchanges: list[tuple[int, bytes, bytes, bool]]) -> None:
    rows = []
    for conn, request, response, server_first in exchanges:
        pair = [(conn, "c2s", request), (conn, "s2c", response)]
        rows += pair[::-1] if server_first else pair
    n = len(rows)
    http = pa.Table.from_pydict({
        "conn_id": pa.array([r[0] for r in rows], pa.int64()),
        "frame": pa.array(np.arange(1, n + 1), pa.int64()),
        "ts_ns": pa.array(np.arange(n) * 1000, pa.int64()),
        "direction": pa.array([r[1] for r in rows], pa.string()),
        "data": pa.array([r[2] for r in rows], pa.binary()),
    }, schema=HTTP_SCHEMA)
    # Rows in any order: both sort them by connection and frame.
    http = http.take(pa.array(np.random.default_rng(n).permutation(n)))
    same_http1(capture._http1_requests(http), capture._http1_requests_re(http))


def test_rbac_denials_pair_with_their_requests() -> None:
    rows = [(1, "c2s", b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"),
            (1, "c2s", b"GET /b HTTP/1.1\r\nhost:b \r\n\r\n"),
            (1, "s2c", b"HTTP/1.1 100 Continue\r\n\r\n"),
            (1, "s2c", b"HTTP/1.1 403 Forbidden\r\n\r\nRBAC: access denied"),
            (1, "s2c", b"HTTP/1.1 403 Forbidden\r\n\r\nnot RBAC"),
            (2, "c2s", b"POST / HTTP/1.0\n\n"),
            (2, "s2c", b"RBAC: access denied")]
    http = pa.Table.from_pydict({
        "conn_id": pa.array([r[0] for r in rows], pa.int64()),
        "frame": pa.array(np.arange(1, 8), pa.int64()),
        "ts_ns": pa.array(np.arange(7), pa.int64()),
        "direction": pa.array([r[1] for r in rows], pa.string()),
        "data": pa.array([r[2] for r in rows], pa.binary())}, schema=HTTP_SCHEMA)
    got = capture._http1_requests(http)
    assert got.path.to_pylist() == ["/a", "/b", "/"]
    assert got.host.to_pylist() == ["a", "b", None]
    assert got.status.to_pylist() == [403, 403, None]
    assert got.denied.to_pylist() == [True, False, False]
    same_http1(got, capture._http1_requests_re(http))


def test_a_host_header_past_the_first_kib_is_found() -> None:
    # The regex path looks in the first KiB, then in the whole message: so does the kernel.
    msg = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 1100 + b"\r\nHost: far.example\r\n\r\n"
    http = pa.Table.from_pydict({
        "conn_id": pa.array([1], pa.int64()), "frame": pa.array([1], pa.int64()),
        "ts_ns": pa.array([0], pa.int64()), "direction": pa.array(["c2s"]),
        "data": pa.array([msg], pa.binary())}, schema=HTTP_SCHEMA)
    got = capture._http1_requests(http)
    assert got.host.to_pylist() == ["far.example"]
    same_http1(got, capture._http1_requests_re(http))


def test_observing_a_capture_does_not_import_pandas() -> None:
    # pa.array, pa.scalar, Array.to_numpy and Python literals in compute calls import pandas
    # (~0.25 s); the capture path builds its arrays from buffers instead.
    code = (
        "import sys\n"
        "from observe.capture import capture_batches\n"
        f"with open({str(PCAP / 'zeek-http-pipelined.pcap')!r}, 'rb') as fh:\n"
        "    n = sum(b.num_rows for b in capture_batches(fh, 'x'))\n"
        "print(n, 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["6", "False"]
