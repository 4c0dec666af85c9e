"""Connection tracking: TCP conversations equal tshark's ``-z conv,tcp``; rules by case.

tshark is the reference (installed by ``.ci/run``). Differences by design, compared after
adjusting:
- port reuse: tshark 4.0's conversation table keys on the address/port pair and merges the
  connections of one 5-tuple into one line; the tracker splits them. Rows of one 5-tuple are
  summed before comparing (and the split itself is checked against tshark's ``tcp.stream``).
- IP fragments: tshark counts a fragmented TCP segment once, at the frame that completes the
  reassembly, with that frame's length; the tracker counts it once at the first fragment
  (which holds the ports) with the first fragment's length: frames agree, bytes do not.
- duplicate copies: tshark counts a packet recorded on two interfaces (``tcpdump -i any``)
  twice; the reader drops the second sighting (``observe.pcap.CopyFilter``, checked against
  tshark's fields in ``test_pcap.py``), so tshark's table is computed without those frames.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from observe.conntrack import ConnectionTracker, TrackerOutput
from observe.pcap import read_packets, sniff_capture

DATA = Path(__file__).parent.parent / "data" / "pcap"
CAPTURES = sorted(p for p in DATA.iterdir() if sniff_capture(p.read_bytes()[:64]))
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is installed by .ci/run")
FRAGMENTED = {"pcpp-frag_http_req.pcap"}

_ROW = re.compile(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+(\d+)\s+([\d,]+) (bytes|kB|MB|GB)\s+"
                  r"(\d+)\s+([\d,]+) (bytes|kB|MB|GB)\s+")
_UNIT = {"bytes": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}

Endpoint = tuple[str, int]
Pair = tuple[Endpoint, Endpoint]


def track(data: bytes | Path, **kw: float) -> TrackerOutput:
    raw = data.read_bytes() if isinstance(data, Path) else data
    tracker = ConnectionTracker(**kw)  # type: ignore[arg-type]
    for batch in read_packets(io.BytesIO(raw), "test"):
        tracker.update(batch)
    return tracker.finish()


def tshark(*args: str) -> str:
    return subprocess.run([str(TSHARK), "-n", *args], capture_output=True, text=True,
                          check=False).stdout


def tshark_conv(path: Path, display_filter: str = "") -> dict[Pair, list[tuple[int, int, str]]]:
    """{(lower endpoint, higher endpoint): [frames, bytes, unit] lower->higher, higher->lower}"""
    out: dict[Pair, list[tuple[int, int, str]]] = {}
    tap = "conv,tcp" + (f",{display_filter}" if display_filter else "")
    for line in tshark("-r", str(path), "-q", "-z", tap).splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        a, b = (m[1], int(m[2])), (m[3], int(m[4]))
        b_to_a = (int(m[5]), int(m[6].replace(",", "")), m[7])
        a_to_b = (int(m[8]), int(m[9].replace(",", "")), m[10])
        key: Pair = (min(a, b), max(a, b))
        if key[0] != a:
            a_to_b, b_to_a = b_to_a, a_to_b
        assert key not in out, "tshark 4.0 merges one 5-tuple into one line"
        out[key] = [a_to_b, b_to_a]
    return out


def merged(conns: TrackerOutput) -> dict[Pair, list[int]]:
    """Our TCP rows summed per 5-tuple: [frames lo->hi, bytes lo->hi, frames hi->lo, ...]."""
    out: dict[Pair, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in conns.connections.to_pylist():
        if r["transport"] != "tcp":
            continue
        c: Endpoint = (r["client_ip"], r["client_port"])
        s: Endpoint = (r["server_ip"], r["server_port"])
        x = out[(min(c, s), max(c, s))]
        fwd = (r["packets_c2s"], r["bytes_c2s"], r["packets_s2c"], r["bytes_s2c"])
        if c > s:
            fwd = (fwd[2], fwd[3], fwd[0], fwd[1])
        for i in range(4):
            x[i] += fwd[i]
    return dict(out)


def copy_frames(path: Path) -> set[int]:
    """Frames the reader drops as other interfaces' copies."""
    def frames(copies: bool) -> set[int]:
        return {f for b in read_packets(io.BytesIO(path.read_bytes()), "t", copies=copies)
                for f in b.frame.tolist()}
    return frames(False) - frames(True)


def same_bytes(ours: int, shown: int, unit: str) -> bool:
    """tshark prints sizes of 10 kB and more rounded to SI units."""
    d = _UNIT[unit]
    return shown in (ours // d, round(ours / d))


@needs_tshark
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_tcp_conversations_equal_tshark(path: Path) -> None:
    copies = copy_frames(path)
    ref = tshark_conv(path, f"!(frame.number in {{{','.join(map(str, sorted(copies)))}}})"
                      if copies else "")
    ours = merged(track(path))
    assert set(ours) == set(ref)
    for key, ((f_ab, b_ab, u_ab), (f_ba, b_ba, u_ba)) in ref.items():
        x = ours[key]
        assert (x[0], x[2]) == (f_ab, f_ba), key
        if path.name in FRAGMENTED:
            continue
        assert same_bytes(x[1], b_ab, u_ab) and same_bytes(x[3], b_ba, u_ba), (key, x)


# --- hand-built captures (Ethernet, IPv4, TCP; pcap from the format spec) --------------------

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
CLI, SRV = (10 << 24) | 1, (10 << 24) | 2


def pkt(ts_us: int, src: int, dst: int, sport: int, dport: int, seq: int, ack: int,
        flags: int, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq % (1 << 32), ack % (1 << 32), 0x50,
                      flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0, src, dst)
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload
    return struct.pack("<IIII", ts_us // 10**6, ts_us % 10**6, len(frame), len(frame)) + frame


def pcap(*records: bytes) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + b"".join(records)


def handshake(t: int, sport: int, isn_c: int, isn_s: int) -> list[bytes]:
    return [pkt(t, CLI, SRV, sport, 443, isn_c, 0, SYN),
            pkt(t + 10, SRV, CLI, 443, sport, isn_s, isn_c + 1, SYN | ACK),
            pkt(t + 20, CLI, SRV, sport, 443, isn_c + 1, isn_s + 1, ACK)]


def client_hello(sni: bytes) -> bytes:
    ext = struct.pack("!HHHBH", 0, len(sni) + 5, len(sni) + 3, 0, len(sni)) + sni
    alpn = b"\x13istio-peer-exchange"
    ext += struct.pack("!HHH", 16, len(alpn) + 2, len(alpn)) + alpn
    body = (b"\x03\x03" + bytes(range(32)) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(ext)) + ext)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


@needs_tshark
def test_port_reuse_splits_like_tcp_stream(tmp_path: Path) -> None:
    first = handshake(1_000_000, 40000, 1000, 5000)
    first += [pkt(1_000_100, CLI, SRV, 40000, 443, 1001, 5001, FIN | ACK),
              pkt(1_000_200, SRV, CLI, 443, 40000, 5001, 1002, FIN | ACK),
              pkt(1_000_300, CLI, SRV, 40000, 443, 1002, 5002, ACK)]
    second = handshake(2_000_000, 40000, 900_000, 700_000)
    second += [pkt(2_000_100, CLI, SRV, 40000, 443, 900_001, 700_001, RST)]
    path = tmp_path / "reuse.pcap"
    path.write_bytes(pcap(*first, *second))
    out = track(path).connections.to_pylist()
    assert [r["first_frame"] for r in out] == [1, 7]
    assert [(r["ended"], r["state"], r["handshake"]) for r in out] == [
        ("fin", "established", True), ("rst", "established", True)]
    # tshark's stream index: a new stream starts at frame 7 (its port-reuse detection).
    streams = tshark("-r", str(path), "-T", "fields", "-e", "frame.number", "-e", "tcp.stream")
    firsts: dict[str, int] = {}
    for line in streams.splitlines():
        fr, sid = line.split("\t")
        firsts.setdefault(sid, int(fr))
    assert sorted(firsts.values()) == [1, 7]
    assert [(r["packets_c2s"], r["packets_s2c"]) for r in out] == [(4, 2), (3, 1)]


def test_retransmitted_syn_without_answer_and_server_reset() -> None:
    # deepflow-syn-retrans (tshark: SYN, SYN again with the same seq, SYN-ACK, data, FINs).
    r = track(DATA / "deepflow-syn-retrans.pcap").connections.to_pylist()
    assert len(r) == 1
    assert (r[0]["syn_count"], r[0]["handshake"], r[0]["state"], r[0]["ended"]) == (
        2, True, "established", "fin")
    assert (r[0]["client_ip"], r[0]["client_port"]) == ("10.30.0.223", 80)  # the SYN sender
    # deepflow-server-reset: SYN answered by RST -> refused.
    r = track(DATA / "deepflow-server-reset.pcap").connections.to_pylist()
    assert [(x["state"], x["ended"], x["client_port"]) for x in r] == [("refused", "rst", 1395)]
    # deepflow-tcp-one-syn: a lone SYN -> no-answer, still open at the end of the capture.
    r = track(DATA / "deepflow-tcp-one-syn.pcap").connections.to_pylist()
    assert [(x["state"], x["ended"], x["syn_count"]) for x in r] == [("no-answer", "open", 1)]
    # Same SYN retransmitted 3 times, nothing back.
    recs = [pkt(10**6 * k, CLI, SRV, 40001, 8080, 77, 0, SYN) for k in range(1, 4)]
    r = track(pcap(*recs)).connections.to_pylist()
    assert [(x["state"], x["syn_count"], x["packets_s2c"]) for x in r] == [("no-answer", 3, 0)]


def test_syn_ack_captured_before_its_syn_is_one_connection() -> None:
    # deepflow-out-of-order: frame 1 is the SYN-ACK, frame 2 the SYN it acknowledges.
    r = track(DATA / "deepflow-out-of-order.pcap").connections.to_pylist()
    assert len(r) == 1
    assert (r[0]["client_by"], r[0]["handshake"], r[0]["first_frame"]) == ("syn", True, 1)
    assert (r[0]["packets_c2s"], r[0]["packets_s2c"]) == (5, 2)


@needs_tshark
def test_heads_are_the_payload_in_sequence_order() -> None:
    path = DATA / "deepflow-istio-tcp-frag.pcap"
    r = track(path).connections.to_pylist()[0]
    payloads = tshark("-r", str(path), "-T", "fields", "-e", "tcp.srcport", "-e",
                      "tcp.payload").splitlines()
    by_port: dict[int, bytes] = defaultdict(bytes)
    for line in payloads:
        port, hexdata = line.split("\t")
        by_port[int(port)] += bytes.fromhex(hexdata)
    assert r["client_head"] == by_port[r["client_port"]]
    assert r["server_head"] == by_port[r["server_port"]]
    assert r["client_head"].startswith(b"GET /productpage HTTP/1.1\r\n")


@needs_tshark
def test_split_client_hello_out_of_order_with_overlap(tmp_path: Path) -> None:
    hello = client_hello(b"outbound_.8080_._.reviews.default.svc.cluster.local")
    a, b, c = hello[:40], hello[40:80], hello[80:]
    recs = handshake(1_000_000, 40002, 10, 20)
    recs += [pkt(1_000_100, CLI, SRV, 40002, 443, 11 + 80, 21, ACK | PSH, c),  # third first
             pkt(1_000_200, CLI, SRV, 40002, 443, 11, 21, ACK, a),
             pkt(1_000_300, CLI, SRV, 40002, 443, 11 + 30, 21, ACK, hello[30:60]),  # overlap
             pkt(1_000_400, CLI, SRV, 40002, 443, 11 + 40, 21, ACK, b),
             pkt(1_000_500, CLI, SRV, 40002, 443, 11, 21, ACK, a)]  # retransmission
    path = tmp_path / "hello.pcap"
    path.write_bytes(pcap(*recs))
    r = track(path).connections.to_pylist()[0]
    assert r["client_head"] == hello
    small = track(path, head_bytes=50).connections.to_pylist()[0]
    assert small["client_head"] == hello[:50]
    # The hand-built capture is a valid split ClientHello for tshark too.
    sni = tshark("-o", "tcp.reassemble_out_of_order:TRUE", "-r", str(path), "-T", "fields",
                 "-e", "tls.handshake.extensions_server_name")
    assert "outbound_.8080_._.reviews.default.svc.cluster.local" in sni


@needs_tshark
@pytest.mark.parametrize("name", ["zeek-http-pipelined.pcap", "zeek-http-docker-api-upgrade.pcap",
                                  "deepflow-http-sw8.pcap", "pcpp-three_http_streams.pcap"])
def test_every_http1_message_start_is_recorded(name: str) -> None:
    path = DATA / name
    out = track(path)
    methods = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
               b"CONNECT ", b"TRACE ", b"HTTP/1.")
    want = set()
    for line in tshark("-r", str(path), "-T", "fields", "-e", "frame.number", "-e",
                       "tcp.payload").splitlines():
        fr, _, hexdata = line.partition("\t")
        if bytes.fromhex(hexdata).startswith(methods):
            want.add(int(fr))
    got = out.http.column("frame").to_pylist()
    assert want and set(got) == want and len(got) == len(want)
    conn_ids = set(out.connections.column("conn_id").to_pylist())
    assert set(out.http.column("conn_id").to_pylist()) <= conn_ids
    for r in out.http.to_pylist():
        assert r["direction"] == ("s2c" if r["data"].startswith(b"HTTP/1.") else "c2s")


@needs_tshark
def test_udp_flow_client_is_the_first_sender_and_head_is_the_datagram() -> None:
    path = DATA / "tcpdump-dns_udp.pcap"
    r = [x for x in track(path).connections.to_pylist() if x["transport"] == "udp"]
    assert len(r) == 1
    fields = tshark("-r", str(path), "-T", "fields", "-e", "ip.src", "-e", "udp.srcport", "-e",
                    "dns.flags.response", "-e", "udp.payload").splitlines()
    query = next(line.split("\t") for line in fields if line.split("\t")[2] in ("0", "False"))
    answer = next(line.split("\t") for line in fields if line.split("\t")[2] in ("1", "True"))
    assert (r[0]["client_ip"], r[0]["client_port"]) == (query[0], int(query[1]))
    assert r[0]["client_head"] == bytes.fromhex(query[3])
    assert r[0]["server_head"] == bytes.fromhex(answer[3])
    assert r[0]["state"] == "established" and r[0]["server_port"] == 53


def test_midstream_connection_uses_the_port_heuristic() -> None:
    r = track(DATA / "zeek-http-get_nosyn.pcap").connections.to_pylist()
    tcp = [x for x in r if x["transport"] == "tcp"]
    assert len(tcp) == 1
    assert (tcp[0]["client_by"], tcp[0]["server_port"], tcp[0]["state"]) == (
        "port", 80, "midstream")
    assert tcp[0]["client_port"] > 1024


def test_flush_forgets_finished_connections() -> None:
    recs: list[bytes] = []
    for k in range(50):
        t = 1_000_000 + k * 1000
        recs += handshake(t, 41000 + k, 1000, 2000)
        recs += [pkt(t + 100, CLI, SRV, 41000 + k, 443, 1001, 2001, RST)]
    # A packet 60 s later makes the closed ones older than the linger time.
    recs.append(pkt(61_000_000, CLI, SRV, 50000, 443, 1, 0, SYN))
    tracker = ConnectionTracker(closed_linger_s=30)
    for batch in read_packets(io.BytesIO(pcap(*recs)), "t"):
        tracker.update(batch)
    flushed = tracker.flush()
    assert flushed.connections.num_rows == 50
    assert set(flushed.connections.column("ended").to_pylist()) == {"rst"}
    rest = tracker.finish().connections.to_pylist()
    assert [(x["client_port"], x["ended"]) for x in rest] == [(50000, "open")]
    assert tracker.finish().connections.num_rows == 0


def test_idle_gap_splits_with_timeout() -> None:
    recs = handshake(1_000_000, 42000, 1, 2)
    recs.append(pkt(1_000_000 + 400 * 10**6, CLI, SRV, 42000, 443, 2, 3, ACK | PSH, b"x"))
    r = track(pcap(*recs), idle_timeout_s=300).connections.to_pylist()
    assert [(x["ended"], x["state"]) for x in r] == [("timeout", "established"),
                                                     ("open", "midstream")]


# --- copies and ISNs -------------------------------------------------------------------------

BRIDGE = DATA / "meshwright-bridge-any.pcap"


@needs_tshark
def test_bridge_capture_counts_each_packet_once() -> None:
    """Every packet of the bridge capture crosses pod B's veth: tshark's conversations on
    that interface alone are the truth for the whole (two-interface) capture, and each HTTP
    request is one row of the http table (tshark: 7 requests on that interface)."""
    veth_b = {line.split("\t")[0] for line in tshark(
        "-r", str(BRIDGE), "-T", "fields", "-e", "sll.ifindex", "-e", "sll.pkttype", "-e",
        "ip.src").splitlines() if line.endswith("\t3\t10.77.0.3")}
    assert len(veth_b) == 1
    only_b = f"sll.ifindex == {veth_b.pop()}"
    ref = tshark_conv(BRIDGE, only_b)
    out = track(BRIDGE)
    ours = merged(out)
    assert set(ours) == set(ref) and len(ref) == 5
    for key, ((f_ab, b_ab, _), (f_ba, b_ba, _)) in ref.items():
        assert ours[key] == [f_ab, b_ab, f_ba, b_ba], key
    # (tshark's own http.request would not do: it takes the second sighting of a segment
    # for a retransmission and does not dissect it again.)
    requests = tshark("-r", str(BRIDGE), "-Y", f"{only_b} && tcp.payload[0:4] == 47:45:54:20",
                      "-T", "fields", "-e", "frame.number").split()
    http = out.http.to_pylist()
    assert len(requests) == 7
    assert sum(r["direction"] == "c2s" for r in http) == 7
    assert sum(r["direction"] == "s2c" for r in http) == 7
    # The datagram sent twice in a row over IPv6 (identical bytes) is two datagrams.
    udp6 = [r for r in out.connections.to_pylist()
            if r["transport"] == "udp" and r["ip_version"] == 6]
    assert [(r["packets_c2s"], r["packets_s2c"]) for r in udp6] == [(4, 4)]


def test_isns_are_the_handshake_sequence_numbers() -> None:
    recs = handshake(1_000_000, 40010, 123_456_789, 4_000_000_000)  # server ISN > 2^31
    recs += [pkt(1_000_100, CLI, SRV, 40010, 443, 123_456_790, 4_000_000_001, RST)]
    # Only the SYN-ACK captured: the client's ISN is its acknowledgement number - 1.
    recs += [pkt(2_000_000, SRV, CLI, 443, 40011, 77, 0xFFFFFFFF + 1, SYN | ACK)]  # ack wraps
    # Midstream: no ISN; a lone SYN: the client's only.
    recs += [pkt(3_000_000, CLI, SRV, 40012, 443, 5, 6, ACK | PSH, b"x"),
             pkt(4_000_000, CLI, SRV, 40013, 443, 999, 0, SYN)]
    rows = {r["client_port"]: r for r in track(pcap(*recs)).connections.to_pylist()}
    got = {p: (r["client_isn"], r["server_isn"]) for p, r in rows.items()}
    assert got == {40010: (123_456_789, 4_000_000_000), 40011: (0xFFFFFFFF, 77),
                   40012: (None, None), 40013: (999, None)}
    udp = track(DATA / "tcpdump-dns_udp.pcap").connections.to_pylist()
    assert all(r["client_isn"] is None for r in udp if r["transport"] == "udp")


@needs_tshark
@pytest.mark.parametrize("name", ["deepflow-http.pcap", "zeek-http-pipelined.pcap",
                                  "deepflow-out-of-order.pcap", "pcpp-three_http_streams.pcap"])
def test_isns_equal_tshark_raw_sequence_numbers(name: str) -> None:
    path = DATA / name
    syn: dict[tuple[str, int, str, int], int] = {}
    synack: dict[tuple[str, int, str, int], int] = {}
    for line in tshark("-r", str(path), "-Y", "tcp.flags.syn == 1", "-T", "fields", "-e",
                       "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport",
                       "-e", "tcp.flags.ack", "-e", "tcp.seq_raw").splitlines():
        src, sport, dst, dport, is_ack, seq = line.split("\t")
        if is_ack in ("1", "True"):
            synack.setdefault((dst, int(dport), src, int(sport)), int(seq))
        else:
            syn.setdefault((src, int(sport), dst, int(dport)), int(seq))
    rows = track(path).connections.to_pylist()
    assert syn and rows
    for r in rows:
        key = (r["client_ip"], r["client_port"], r["server_ip"], r["server_port"])
        assert (r["client_isn"], r["server_isn"]) == (syn.get(key), synack.get(key)), key


def split_by_ifindex(data: bytes) -> dict[int, bytes]:
    """An SLL2 pcap split into one pcap per interface index (record layout from the pcap
    format: 16-byte record header, captured length at offset 8; SLL2 ifindex at 4)."""
    head, pos = data[:24], 24
    out: dict[int, list[bytes]] = defaultdict(list)
    while pos + 16 <= len(data):
        cap = struct.unpack_from("<I", data, pos + 8)[0]
        rec = data[pos: pos + 16 + cap]
        out[struct.unpack_from(">I", rec, 16 + 4)[0]].append(rec)
        pos += 16 + cap
    return {k: head + b"".join(v) for k, v in out.items()}


def test_one_connection_in_two_captures_has_one_identity() -> None:
    """Pod A's veth and pod B's veth as two node captures: the TCP connections they share
    have the same 5-tuple and client ISN in both, the refused ones included."""
    views = split_by_ifindex(BRIDGE.read_bytes())
    assert len(views) == 3  # pod A's veth, pod B's veth, the bridge
    ident: list[set[tuple[object, ...]]] = []
    for data in views.values():
        rows = track(data).connections.to_pylist()
        ident.append({(r["client_ip"], r["client_port"], r["server_ip"], r["server_port"],
                       r["client_isn"]) for r in rows if r["transport"] == "tcp"})
        assert all(r["client_isn"] is not None for r in rows if r["transport"] == "tcp")
    both = set.intersection(*sorted(ident, key=len)[-2:])
    assert len(both) == 4  # HTTP and refused, over IPv4 and IPv6
    whole = {(r["client_ip"], r["client_port"], r["server_ip"], r["server_port"],
              r["client_isn"]) for r in track(BRIDGE).connections.to_pylist()
             if r["transport"] == "tcp"}
    assert set.union(*ident) == whole and len(whole) == 5
