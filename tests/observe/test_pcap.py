"""pcap/pcapng reader: every real capture decoded like tshark decodes it, bad input handled.

The reference is tshark (installed by ``.ci/run``): for each capture it reads, every row
the reader returns must carry the same frame number, timestamp (ns), frame length,
innermost IP addresses, ports and TCP segment length as tshark shows for that frame, and
the frames tshark decodes as IP that the reader skips must be accounted for in its counters.

Duplicate copies (one packet recorded on several interfaces, see ``observe.pcap.CopyFilter``):
tshark shows every copy as a frame of its own (and calls the second one a retransmission).
The comparison leaves out the frames the reader dropped as copies, and checks that they are
exactly the copies by the documented rule applied here, independently, to the interface and
header fields tshark decodes (:func:`reference_copies`). On a real capture of pod-like
namespaces talking across a bridge, the packets kept are, one for one, those tshark shows on
the one interface every packet crosses.
"""

from __future__ import annotations

import io
import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from observe import pcap as pcap_mod
from observe.errors import FormatError
from observe.pcap import (
    COPY_WINDOW_NS,
    TUNNEL_GENEVE,
    TUNNEL_IPIP,
    TUNNEL_VXLAN,
    CaptureStats,
    CopyFilter,
    PacketBatch,
    addr_text,
    read_packets,
    sniff_capture,
)

DATA = Path(__file__).parent.parent / "data" / "pcap"
CAPTURES = sorted(p for p in DATA.iterdir() if sniff_capture(p.read_bytes()[:64]))
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is installed by .ci/run")

# Frames tshark decodes as IP that the reader deliberately does not return, per file:
# - IP fragments after the first carry no L4 header (tshark reassembles them instead);
# - NFLOG (239) is not a link type the reader supports (counted, as the issue asks);
# - a TCP header shorter than its data offset claims is malformed for the reader (tshark
#   shows the ports it can read, but leaves the packet out of its TCP conversations too);
# - behind an MPLS label, an "IPv4" header claiming 60 bytes of 22 captured (tshark: malformed).
EXPECTED_MISSING = {
    "deepflow-ip-fragment.pcap": "IP fragment after the first",
    "pcpp-frag_http_req.pcap": "IP fragment after the first",
    "tcpdump-nflog.pcap": "unsupported link type 239",
    "tcpdump-heapoverflow-tcp_print.pcap": "malformed: header shorter than it claims",
    "tcpdump-tcp_header_heapoverflow.pcap": "malformed: header shorter than it claims",
    "zeek-tcp-truncated-header.pcap": "malformed: header shorter than it claims",
    "pcpp-ip4_bad_fragment.pcap": "malformed: header shorter than it claims",
    "zeek-ip4-trunc.pcap": "malformed: header shorter than it claims",
}
# Timestamps that are nonsense in the file, where tshark and the reader differ by design:
# - a microsecond field >= 1e6: the reader carries it into the seconds, tshark does not;
# - a pcapng timestamp past year 2262 does not fit int64 nanoseconds (tshark shows ~1.8e19 s).
TS_NONSENSE = {"tcpdump-timestamp_invalid_micro.pcap", "pcpp-pcapng-example-eth-sll.pcapng"}


def read_all(path: Path, batch_bytes: int = 8 << 20, copies: bool = True
             ) -> tuple[list[PacketBatch], CaptureStats]:
    stats = CaptureStats(origin=path.name)
    with path.open("rb") as fh:
        batches = list(read_packets(fh, path.name, batch_bytes=batch_bytes, stats=stats,
                                    copies=copies))
    return batches, stats


def rows(batches: list[PacketBatch]) -> dict[int, tuple[object, ...]]:
    out: dict[int, tuple[object, ...]] = {}
    for b in batches:
        src = addr_text(b.src_hi, b.src_lo)
        dst = addr_text(b.dst_hi, b.dst_lo)
        for i in range(len(b)):
            l4 = int(b.proto[i]) in (6, 17)
            out[int(b.frame[i])] = (
                int(b.ts_ns[i]), int(b.frame_len[i]), src[i], dst[i],
                int(b.proto[i]) if l4 else None,
                int(b.sport[i]) if l4 else None, int(b.dport[i]) if l4 else None,
                int(b.payload_len[i]) if b.proto[i] == 6 else None)
    return out


def tshark_rows(path: Path) -> dict[int, tuple[object, ...]]:
    fields = ["frame.number", "frame.time_epoch", "frame.len", "frame.protocols", "ip.src",
              "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", "udp.srcport",
              "udp.dstport", "tcp.len", "ip.frag_offset", "ip.flags.mf"]
    cmd = [str(TSHARK), "-n", "-r", str(path), "-E", "occurrence=l", "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    text = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    out: dict[int, tuple[object, ...]] = {}
    for line in text.splitlines():
        c = dict(zip(fields, line.split("\t"), strict=True))
        protos = c["frame.protocols"].split(":")
        ips = [i for i, p in enumerate(protos) if p in ("ip", "ipv6")]
        if not ips:
            continue
        inner = protos[ips[-1]]
        src, dst = ((c["ip.src"], c["ip.dst"]) if inner == "ip"
                    else (c["ipv6.src"], c["ipv6.dst"]))
        after = protos[ips[-1] + 1:]
        l4 = "tcp" if after[:1] == ["tcp"] else "udp" if after[:1] == ["udp"] else None
        if c["ip.frag_offset"] not in ("", "0") or c["ip.flags.mf"] == "1":
            l4 = "fragment"
        sec, _, frac = c["frame.time_epoch"].partition(".")
        ts = int(sec) * 10**9 + int(frac.ljust(9, "0")[:9])
        ports = l4 in ("tcp", "udp")
        out[int(c["frame.number"])] = (
            ts, int(c["frame.len"]), src, dst,
            {"tcp": 6, "udp": 17}.get(l4 or ""),
            int(c[f"{l4}.srcport"]) if ports else None,
            int(c[f"{l4}.dstport"]) if ports else None,
            int(c["tcp.len"]) if l4 == "tcp" and c["tcp.len"] else None,
            l4 == "fragment")
    return out


# --- duplicate copies: the rule, written out plainly, over tshark's fields -------------------

Identity = tuple[object, ...]


def reference_copies(seq: list[tuple[int, int, object, Identity]], window: int) -> set[int]:
    """Frames that are copies by ``CopyFilter``'s documented rule, one row at a time:
    ``seq`` = (frame, ts_ns, interface, identity) in capture order."""
    clock: int | None = None
    runs: dict[Identity, tuple[int, dict[object, int]]] = {}  # identity -> (last ts, seen)
    copies = set()
    for frame, ts, ifc, ident in seq:
        clock = ts if clock is None else max(clock, ts)
        run = runs.get(ident)
        if run is None or clock - run[0] > window:  # the run is over: a new one starts
            run = (ts, {})
        seen = run[1]
        occ = seen.get(ifc, 0)  # rows of the run this interface showed before
        if any(k > occ for i, k in seen.items() if i != ifc):
            copies.add(frame)  # another interface already showed this occurrence number
        seen[ifc] = occ + 1
        runs[ident] = (ts, seen)
    return copies


_ID_FIELDS = ["frame.number", "frame.time_epoch", "frame.interface_id", "sll.ifindex",
              "frame.protocols", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.id", "ip.len",
              "ipv6.plen", "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport",
              "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.window_size_value", "tcp.len",
              "tcp.payload", "udp.length", "udp.payload", "icmp.type", "icmp.code",
              "icmp.checksum", "icmpv6.type", "icmpv6.code", "icmpv6.checksum"]


def tshark_identities(path: Path) -> dict[int, tuple[int, object, Identity]]:
    """frame -> (ts_ns, interface, identity) from tshark's decoding: the interface is
    (pcapng interface id, SLL2 ifindex); the identity the innermost addresses, transport
    header fields, IPv4 id, length and first 16 payload bytes."""
    cmd = [str(TSHARK), "-n", "-r", str(path), "-E", "occurrence=l", "-T", "fields"]
    for f in _ID_FIELDS:
        cmd += ["-e", f]
    out: dict[int, tuple[int, object, Identity]] = {}
    text = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    for line in text.splitlines():
        c = dict(zip(_ID_FIELDS, line.split("\t"), strict=True))
        protos = c["frame.protocols"].split(":")
        ips = [p for p in protos if p in ("ip", "ipv6")]
        if not ips:
            continue
        v4 = ips[-1] == "ip"
        src, dst = (c["ip.src"], c["ip.dst"]) if v4 else (c["ipv6.src"], c["ipv6.dst"])
        after = protos[len(protos) - protos[::-1].index(ips[-1]):]
        l4 = after[0] if after else ""
        if l4 == "tcp":
            ident: Identity = ("tcp", c["tcp.srcport"], c["tcp.dstport"], c["tcp.seq_raw"],
                               c["tcp.ack_raw"], c["tcp.flags"], c["tcp.window_size_value"],
                               c["tcp.len"], c["tcp.payload"][:32])
        elif l4 == "udp":
            ident = ("udp", c["udp.srcport"], c["udp.dstport"], c["udp.length"],
                     c["udp.payload"][:32])
        else:
            ident = (l4, c["ip.len"] if v4 else c["ipv6.plen"], c["icmp.type"], c["icmp.code"],
                     c["icmp.checksum"], c["icmpv6.type"], c["icmpv6.code"],
                     c["icmpv6.checksum"])
        sec, _, frac = c["frame.time_epoch"].partition(".")
        ts = int(sec) * 10**9 + int(frac.ljust(9, "0")[:9])
        ifc = (int(c["frame.interface_id"] or 0), int(c["sll.ifindex"] or 0))
        out[int(c["frame.number"])] = (ts, ifc, (src, dst, c["ip.id"] if v4 else "", *ident))
    return out


@needs_tshark
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_decode_matches_tshark(path: Path) -> None:
    batches, stats = read_all(path)
    mine = rows(batches)
    all_batches = read_all(path, copies=False)[0]
    every = rows(all_batches)
    dropped = set(every) - set(mine)
    assert set(mine) <= set(every) and stats.duplicate_copies == len(dropped)
    if stats.format == "pcapng" or any((b.linktype == 276).any() for b in all_batches):
        # pcapng (interface ids) or SLL2 (ifindex): copies are possible; the reader's are
        # exactly the rule's over tshark's fields.
        ids = tshark_identities(path)
        seq = [(f, *ids[f]) for f in sorted(every)]
        assert dropped == reference_copies(seq, COPY_WINDOW_NS)
    else:
        assert not dropped
    ref = tshark_rows(path)
    assert stats.packets == len(mine)
    for frame, got in mine.items():
        want = ref.get(frame)
        assert want is not None, f"frame {frame}: tshark sees no IP packet"
        if want[8]:  # first fragment: tshark has no ports until reassembly
            assert got[:4] == want[:4], frame
            continue
        if path.name in TS_NONSENSE and got[0] != want[0]:
            assert isinstance(want[0], int)
            assert want[0] >= 1 << 63 or path.name.endswith("micro.pcap")
            got = (want[0], *got[1:])
        assert got == want[:8], f"frame {frame}"
    missing = set(ref) - set(mine) - dropped
    if path.name in EXPECTED_MISSING:
        assert missing, "the documented difference no longer shows"
        assert stats.skipped[EXPECTED_MISSING[path.name]] >= len(missing)
    else:
        assert not missing, f"frames tshark decodes as IP: {sorted(missing)[:10]}"
    # Every frame is a row or counted somewhere.
    assert stats.frames == stats.packets + stats.duplicate_copies + sum(
        v for k, v in stats.skipped.items() if k != "truncated final record")


def test_batches_split_anywhere_give_the_same_rows() -> None:
    path = DATA / "packt-grpc-unary.pcapng"
    whole, _ = read_all(path)
    small, stats = read_all(path, batch_bytes=1)  # clamped to 64 KiB reads
    assert len(small) > 1
    assert rows(small) == rows(whole)
    assert stats.frames == 4318
    path = DATA / "zeek-http-100-continue.pcap"
    assert rows(read_all(path, batch_bytes=1)[0]) == rows(read_all(path)[0])


def test_sniff_capture_by_magic_only() -> None:
    assert sniff_capture(b"\xd4\xc3\xb2\xa1" + bytes(20)) == "pcap"
    assert sniff_capture(b"\xa1\xb2\xc3\xd4" + bytes(20)) == "pcap"
    assert sniff_capture(b"\x4d\x3c\xb2\xa1" + bytes(20)) == "pcap"
    assert sniff_capture(b"\xa1\xb2\x3c\x4d" + bytes(20)) == "pcap"
    assert sniff_capture(b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x4d\x3c\x2b\x1a") == "pcapng"
    assert sniff_capture(b"\x0a\x0d\x0d\x0a\x00\x00\x00\x1c\x1a\x2b\x3c\x4d") == "pcapng"
    assert sniff_capture(b"\x0a\x0d\x0d\x0a\x00\x00\x00\x1c\x00\x00\x00\x00") is None
    assert sniff_capture((DATA / "pcpp-solaris.snoop").read_bytes()[:64]) is None
    assert sniff_capture(b"") is None
    # Real captures named .pcap holding pcapng content are pcapng.
    assert sniff_capture((DATA / "zeek-pcapng-multi-interface.pcapng").read_bytes()) == "pcapng"


@pytest.mark.parametrize("name", ["pcpp-bogus-content.txt", "pcpp-solaris.snoop",
                                  "pcpp-pcapng-example.pcapng.zst"])
def test_not_a_capture_is_a_one_line_format_error(name: str) -> None:
    with pytest.raises(FormatError) as exc:
        read_all(DATA / name)
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(name)


def test_empty_stream_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="empty"):
        list(read_packets(io.BytesIO(b""), "x.pcap"))


@pytest.mark.parametrize("name", ["tcpdump-empty.pcap", "tcpdump-empty.pcapng"])
def test_empty_captures(name: str) -> None:
    batches, stats = read_all(DATA / name)
    assert batches == [] and stats.frames == 0 and stats.warnings == []
    assert stats.format == name.rsplit(".", 1)[1]


def test_truncated_final_record_keeps_the_packets_before() -> None:
    data = (DATA / "deepflow-http.pcap").read_bytes()
    cut = data[: len(data) - 10]
    stats = CaptureStats(origin="cut.pcap")
    batches = list(read_packets(io.BytesIO(cut), "cut.pcap", stats=stats))
    assert stats.frames == 12 and sum(len(b) for b in batches) == 12
    assert stats.stopped
    assert stats.warnings and stats.warnings[0].startswith("cut.pcap:packet 13: truncated")


def test_record_length_beyond_any_snapshot_stops_with_a_warning() -> None:
    data = bytearray((DATA / "deepflow-http.pcap").read_bytes())
    # Third record's captured length -> 0x7fffffff (record headers: 16 bytes, LE file).
    off = 24
    for _ in range(2):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    struct.pack_into("<I", data, off + 8, 0x7FFFFFFF)
    stats = CaptureStats(origin="bad.pcap")
    batches = list(read_packets(io.BytesIO(bytes(data)), "bad.pcap", stats=stats))
    assert sum(len(b) for b in batches) == 2
    assert stats.stopped and "packet 3" in stats.warnings[0]


def test_pcapng_bad_block_length_stops_with_a_warning() -> None:
    data = bytearray((DATA / "zeek-tcp-retransmit-timeout.pcapng").read_bytes())
    shb_len = struct.unpack_from("<I", data, 4)[0]
    idb_len = struct.unpack_from("<I", data, shb_len + 4)[0]
    first_pkt = shb_len + idb_len
    struct.pack_into("<I", data, first_pkt + 4, 13)  # not a multiple of 4
    stats = CaptureStats(origin="bad.pcapng")
    assert list(read_packets(io.BytesIO(bytes(data)), "bad.pcapng", stats=stats)) == []
    assert stats.stopped and "bad block length 13" in stats.warnings[0]


def test_link_types_and_tunnels() -> None:
    def one(name: str, copies: bool = True) -> PacketBatch:
        batches, _ = read_all(DATA / name, copies=copies)
        assert len(batches) == 1
        return batches[0]

    assert set(one("pcpp-sll2-tcp.pcap").linktype.tolist()) == {276}
    assert set(one("pcpp-pcapng-example-eth-sll.pcapng").linktype.tolist()) == {1, 113}
    every = one("pcpp-many-interfaces.pcapng", copies=False)
    assert set(every.linktype.tolist()) >= {0, 1}
    # Its two null-link-type (BSD loopback, interface 10) rows are the Ethernet interface's
    # broadcasts seen again (tshark: same IP id, addresses, ports and payload): copies.
    b = one("pcpp-many-interfaces.pcapng")
    assert len(every) - len(b) == 2 and set(every.iface[every.linktype == 0].tolist()) == {10}
    assert 0 not in set(b.linktype.tolist())
    # VXLAN: 8 inner ICMP packets; the 2 inner ARP frames stay outer UDP rows (as in tshark).
    b = one("tcpdump-vxlan.pcap")
    assert (b.tunnel[b.proto == 1] == TUNNEL_VXLAN).all() and (b.proto == 1).sum() == 8
    assert (b.tunnel[b.proto == 17] == 0).all() and (b.dport[b.proto == 17] == 4789).all()
    assert set(one("zeek-vxlan-encapsulated-http.pcap").tunnel.tolist()) == {TUNNEL_VXLAN}
    assert TUNNEL_GENEVE in set(one("tcpdump-geneve.pcap").tunnel.tolist())
    assert set(one("deepflow-ipip.pcap").tunnel.tolist()) == {TUNNEL_IPIP}
    # Stacked VLAN tags + PPPoE (tshark: eth:vlan:vlan:pppoes:ppp:ip:tcp).
    b = one("pcpp-one_http_stream_rst.pcap")
    assert len(b) == 10 and set(b.proto.tolist()) == {6}


def test_nanosecond_big_endian_timestamps_exact() -> None:
    batches, stats = read_all(DATA / "pcpp-nanosecs-big-endian.pcap")
    data = (DATA / "pcpp-nanosecs-big-endian.pcap").read_bytes()
    assert data[:4] == b"\xa1\xb2\x3c\x4d"
    sec, nsec = struct.unpack_from(">II", data, 24)  # first record header, by hand
    assert int(batches[0].ts_ns[0]) == sec * 10**9 + nsec
    assert nsec % 1000 != 0  # really nanoseconds
    assert stats.frames == 10


def test_unsupported_and_non_ip_are_counted_not_errors() -> None:
    _, stats = read_all(DATA / "tcpdump-vsock-1.pcapng")
    assert stats.skipped == {"unsupported link type 271": 10}
    _, stats = read_all(DATA / "tcpdump-unsupported-link-type-160.pcap")
    assert stats.skipped == {"unsupported link type 160": 1}
    _, stats = read_all(DATA / "zeek-linuxsll-arp.pcap")
    assert stats.skipped == {"non-IP frame": 12}
    _, stats = read_all(DATA / "zeek-trunc-hdr.pcap")
    assert stats.frames == 1 and stats.packets == 0 and sum(stats.skipped.values()) == 1


def test_addr_text() -> None:
    hi = np.array([0, 0, 0x20010DB800000000], dtype=np.uint64)
    lo = np.array([0xFFFF0A000001, 0xFFFF0A000001, 1], dtype=np.uint64)
    assert addr_text(hi, lo).tolist() == ["10.0.0.1", "10.0.0.1", "2001:db8::1"]


SAMPLES = [p.read_bytes() for p in CAPTURES if p.stat().st_size < 30_000]


def _consume(data: bytes) -> CaptureStats:
    stats = CaptureStats(origin="fuzz")
    n = 0
    try:
        for b in read_packets(io.BytesIO(data), "fuzz", batch_bytes=1 << 16, stats=stats):
            n += len(b)
            assert (b.payload_off + b.payload_cap <= b.buf.size).all()
            assert (b.payload_cap >= 0).all() and (b.payload_cap <= b.payload_len).all()
    except FormatError:
        return stats
    assert n == stats.packets <= stats.frames
    return stats


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash(data: bytes) -> None:
    _consume(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_truncated_and_corrupted_captures_never_crash(sample: bytes, data: st.DataObject
                                                      ) -> None:
    cut = data.draw(st.integers(0, len(sample)))
    buf = bytearray(sample[:cut])
    for _ in range(data.draw(st.integers(0, 8))):
        if len(buf) > 24:
            buf[data.draw(st.integers(24, len(buf) - 1))] = data.draw(st.integers(0, 255))
    stats = _consume(bytes(buf))
    if cut == len(sample) and len(buf) == len(sample) and stats.format:
        assert not stats.stopped or stats.warnings


# --- duplicate copies on real and hand-built captures ----------------------------------------

BRIDGE = DATA / "meshwright-bridge-any.pcap"


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    cmd = [str(TSHARK), "-n", "-r", str(path), "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in text.splitlines()]


@needs_tshark
def test_bridge_capture_keeps_each_packet_once() -> None:
    """Pods A and B behind a bridge (tests/data/pcap/meshwright-bridge-any.py): every packet
    of the capture crosses pod B's veth, so tshark's view of that one interface is the
    truth: the rows kept are exactly those packets (same identities, as often)."""
    # Pod B's veth: where packets from pod B enter the node (SLL2 packet type 3, "other host").
    veth_b = {r[0] for r in tshark_fields(BRIDGE, "sll.ifindex", "sll.pkttype", "ip.src")
              if r[1] == "3" and r[2] == "10.77.0.3"}
    assert len(veth_b) == 1
    ids = tshark_identities(BRIDGE)
    truth = sorted(repr(ident) for _ts, ifc, ident in ids.values()
                   if isinstance(ifc, tuple) and str(ifc[1]) in veth_b)
    batches, stats = read_all(BRIDGE)
    kept = [int(f) for b in batches for f in b.frame.tolist()]
    assert sorted(repr(ids[f][2]) for f in kept) == truth
    assert stats.packets == len(truth) and stats.duplicate_copies == len(ids) - len(truth)
    assert stats.duplicate_copies >= len(ids) // 2  # each packet recorded twice or more
    # The SLL2 ifindex is kept per row, as tshark shows it.
    ifx = {int(r[0]): int(r[1]) for r in tshark_fields(BRIDGE, "frame.number", "sll.ifindex")}
    for b in batches:
        assert b.ifindex.tolist() == [ifx[f] for f in b.frame.tolist()]
        assert not b.iface.any()


# A hand-built SLL2 capture, byte for byte as the SLL2 format is defined (tcpdump.org
# LINKTYPE_LINUX_SLL2: protocol, reserved, interface index, ARPHRD type, packet type, address
# length, 8 address bytes) and as tests/data/pcap/pcpp-Sll2Packet.pcap holds it.

V6_A, V6_B = bytes.fromhex("fd770000000000000000000000000002"), bytes.fromhex(
    "fd770000000000000000000000000003")


def v6_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
           payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 512, 0, 0) + payload
    return struct.pack("!IHBB", 0x60000000, len(tcp), 6, 64) + src + dst + tcp


def v4_udp(src: int, dst: int, ipid: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(udp), ipid, 0x4000, 64, 17, 0, src,
                       dst) + udp


def sll2_pcap(records: list[tuple[int, int, int, bytes]]) -> bytes:
    """Nanosecond pcap of (ts_us, ifindex, packet type, IP packet) records, link type SLL2."""
    out = [struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)]
    for ts_us, ifindex, pkttype, ip in records:
        proto = 0x86DD if ip[0] >> 4 == 6 else 0x0800
        frame = struct.pack(">HHIHBB8s", proto, 0, ifindex, 1, pkttype, 6,
                            b"\x02\x00\x00\x00\x00\x01") + ip
        ts_ns = ts_us * 1000
        out.append(struct.pack("<IIII", ts_ns // 10**9, ts_ns % 10**9, len(frame), len(frame)))
        out.append(frame)
    return b"".join(out)


VA, VB = 5, 7  # pod A's veth, pod B's veth
SYNF, ACKF, PSHF = 0x02, 0x10, 0x08
DATA_SEG = v6_tcp(V6_A, V6_B, 40000, 80, 101, 501, ACKF | PSHF, b"GET / HTTP/1.1\r\n\r\n")
# (ts µs, ifindex, packet type, packet), and whether the reader must keep it (by hand, from
# the rule): IPv6, so a retransmission is byte for byte the original.
SCENARIO: list[tuple[int, int, int, bytes, bool]] = [
    (0, VA, 3, v6_tcp(V6_A, V6_B, 40000, 80, 100, 0, SYNF), True),
    (10, VB, 4, v6_tcp(V6_A, V6_B, 40000, 80, 100, 0, SYNF), False),  # its copy
    # Data, its copy, a fast retransmission 300 µs later (same interface: kept) and its copy.
    (100, VA, 3, DATA_SEG, True),
    (110, VB, 4, DATA_SEG, False),
    (400, VA, 3, DATA_SEG, True),
    (410, VB, 4, DATA_SEG, False),
    # Both sightings on A come before those on B: still two packets and two copies.
    (1000, VA, 3, DATA_SEG, True),
    (1200, VA, 3, DATA_SEG, True),
    (1300, VB, 4, DATA_SEG, False),
    (1500, VB, 4, DATA_SEG, False),
    # The copy comes first on B (capture timestamps out of order across CPUs, 5 µs back).
    (3000, VB, 4, v6_tcp(V6_A, V6_B, 40000, 80, 119, 501, ACKF), True),
    (2995, VA, 3, v6_tcp(V6_A, V6_B, 40000, 80, 119, 501, ACKF), False),
    # Another ack number: another packet, whatever the interface.
    (3100, VB, 4, v6_tcp(V6_A, V6_B, 40000, 80, 119, 502, ACKF), True),
    # A sighting 6 ms after the previous one of the same packet is past the 5 ms window: a
    # new packet (a copy this late is counted twice; a real retransmission this late is not
    # taken for a copy).
    (20_000, VA, 3, DATA_SEG, True),
    (26_000, VB, 4, DATA_SEG, True),
    # IPv4 UDP: the IP id tells two datagrams with the same payload apart.
    (30_000, VA, 3, v4_udp(0x0A4D0002, 0x0A4D0003, 7, b"query"), True),
    (30_010, VB, 4, v4_udp(0x0A4D0002, 0x0A4D0003, 7, b"query"), False),
    (30_020, VA, 3, v4_udp(0x0A4D0002, 0x0A4D0003, 8, b"query"), True),
    (30_030, VB, 4, v4_udp(0x0A4D0002, 0x0A4D0003, 8, b"query"), False),
]


def test_copies_in_a_hand_built_sll2_capture(tmp_path: Path) -> None:
    data = sll2_pcap([r[:4] for r in SCENARIO])
    want = [i + 1 for i, r in enumerate(SCENARIO) if r[4]]
    stats = CaptureStats(origin="t")
    batches = list(read_packets(io.BytesIO(data), "t", stats=stats))
    assert [f for b in batches for f in b.frame.tolist()] == want
    assert stats.duplicate_copies == len(SCENARIO) - len(want)
    assert stats.packets == len(want) and stats.frames == len(SCENARIO)
    # Without the filter, every record is a row, with its interface.
    (b,) = list(read_packets(io.BytesIO(data), "t", copies=False))
    assert b.ifindex.tolist() == [r[1] for r in SCENARIO]
    assert b.ip_id.tolist()[-4:] == [7, 7, 8, 8]
    # The same rows whatever the batches: the filter's memory spans batch boundaries.
    whole = CopyFilter().mark(b)
    assert (~whole).nonzero()[0].tolist() == [f - 1 for f in want]
    for cut in range(len(b)):
        filt = CopyFilter()
        parts = [filt.mark(b.select(np.arange(cut))), filt.mark(b.select(np.arange(cut, len(b))))]
        assert np.concatenate(parts).tolist() == whole.tolist()


@needs_tshark
def test_hand_built_sll2_capture_is_what_tshark_reads(tmp_path: Path) -> None:
    path = tmp_path / "copies.pcap"
    path.write_bytes(sll2_pcap([r[:4] for r in SCENARIO]))
    got = tshark_fields(path, "sll.ifindex", "sll.pkttype", "ipv6.src", "ip.id", "tcp.len")
    assert [int(r[0]) for r in got] == [r[1] for r in SCENARIO]
    assert [int(r[1]) for r in got] == [r[2] for r in SCENARIO]
    assert got[2][2] == "fd77::2" and got[2][4] == "18" and got[-1][3] == "0x0008"
    # tshark counts every copy as a packet (and flags the copies as retransmissions).
    ids = tshark_identities(path)
    assert reference_copies([(f, *ids[f]) for f in sorted(ids)], COPY_WINDOW_NS) == {
        i + 1 for i, r in enumerate(SCENARIO) if not r[4]}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(-2000, 4000)),
                max_size=60), st.lists(st.integers(0, 60), max_size=4),
       st.integers(1000, 3000))
def test_copy_filter_is_the_rule(rows_: list[tuple[int, int, int]], cuts: list[int],
                                 window: int) -> None:
    """Random streams of a few keys on a few interfaces, timestamps going back now and then,
    split into batches anywhere: both implementations give the rule's copies."""
    ts, t = [], 10_000
    for _, _, dt in rows_:
        t += dt
        ts.append(t)
    keys = np.array([k * 0x9E3779B97F4A7C15 % (1 << 64) for k, _, _ in rows_], dtype=np.uint64)
    ident = np.array([i for _, i, _ in rows_], dtype=np.uint64)
    tsa = np.array(ts, dtype=np.int64)
    want = reference_copies([(j, ts[j], int(ident[j]), (int(keys[j]),)) for j in range(len(ts))],
                            window)
    bounds = sorted({0, len(ts), *(c for c in cuts if c <= len(ts))})
    for mark in (pcap_mod._mark_copies_np, pcap_mod._mark_copies_c):
        state = pcap_mod._CopyState()
        got: list[bool] = []
        for a, b in itertools.pairwise(bounds):
            m, state = mark(keys[a:b], ident[a:b], tsa[a:b], window, state)
            got += m.tolist()
        assert {j for j, c in enumerate(got) if c} == want
