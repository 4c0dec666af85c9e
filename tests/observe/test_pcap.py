"""pcap/pcapng reader: every real capture decoded like tshark decodes it, bad input handled.

The reference is tshark (installed by ``.ci/run``): for each capture it reads, every row
the reader returns must carry the same frame number, timestamp (ns), frame length,
innermost IP addresses, ports and TCP segment length as tshark shows for that frame, and
the frames tshark decodes as IP that the reader skips must be accounted for in its counters.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from observe.errors import FormatError
from observe.pcap import (
    TUNNEL_GENEVE,
    TUNNEL_IPIP,
    TUNNEL_VXLAN,
    CaptureStats,
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


def read_all(path: Path, batch_bytes: int = 8 << 20) -> tuple[list[PacketBatch], CaptureStats]:
    stats = CaptureStats(origin=path.name)
    with path.open("rb") as fh:
        batches = list(read_packets(fh, path.name, batch_bytes=batch_bytes, stats=stats))
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


@needs_tshark
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_decode_matches_tshark(path: Path) -> None:
    batches, stats = read_all(path)
    mine = rows(batches)
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
    missing = set(ref) - set(mine)
    if path.name in EXPECTED_MISSING:
        assert missing, "the documented difference no longer shows"
        assert stats.skipped[EXPECTED_MISSING[path.name]] >= len(missing)
    else:
        assert not missing, f"frames tshark decodes as IP: {sorted(missing)[:10]}"
    # Every frame is a row or counted somewhere.
    assert stats.frames == stats.packets + sum(
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
    def one(name: str) -> PacketBatch:
        batches, _ = read_all(DATA / name)
        assert len(batches) == 1
        return batches[0]

    assert set(one("pcpp-sll2-tcp.pcap").linktype.tolist()) == {276}
    assert set(one("pcpp-pcapng-example-eth-sll.pcapng").linktype.tolist()) == {1, 113}
    assert set(one("pcpp-many-interfaces.pcapng").linktype.tolist()) >= {0, 1}
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
