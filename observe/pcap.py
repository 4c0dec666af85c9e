"""Packet captures (pcap, pcapng) read in big batches and decoded with numpy.

The format is found from the magic bytes (:func:`sniff_capture`), never from the file name.
:func:`read_packets` reads the (already decompressed) stream in reads of ``batch_bytes``,
splits it into records, and decodes the headers of *all* records of a read at once: link
layer (per interface in pcapng), stacked VLAN tags, IPv4/IPv6 (with the common IPv6
extension headers), TCP/UDP, and overlays (VXLAN on UDP 4789, Geneve on UDP 6081 and
IP-in-IP in any combination of 4/6); an encapsulated packet reports its *inner* addresses and
ports and says in ``tunnel`` which overlay it came through.

Splitting records is the only sequential part (each record's length says where the next one
starts). With the compiled kernel (``observe/_pcapcut.c``, see :mod:`observe.compiled`) a
pcap read is walked and decoded in one C pass, record by record while its bytes are in cache,
and pcapng packet blocks are walked in C (section and interface blocks stay in Python); the
kernel runs without the GIL and :func:`read_packets` runs it in a background thread, so the
consumer's work overlaps with reading on a second core. Without the kernel, a Python loop
touches one 4-byte length per record (pcap) or two per block (pcapng) and nothing else, and
every other field is gathered with numpy from the record offsets; both give the same batches
(``tests/observe/test_pcapcut.py``). Each read goes straight into the buffer the batch keeps:
memory is a few batches, whatever the size of the capture.

Interfaces and duplicate copies: each row keeps the interface that recorded it (``ifindex``
from an SLL2 header, ``iface`` the pcapng interface). ``tcpdump -i any`` on a node records a
pod-to-pod packet once per interface it crosses (the sending pod's veth, the bridge, the
receiving pod's veth, eth0 - decapsulated, the same packet); counted as they are, each copy
would be a packet and a retransmission, and each copy of an HTTP request a request.
:class:`CopyFilter` drops them as the batches are read (counted in
``CaptureStats.duplicate_copies``, not in ``packets``). The rule: rows with the same
:func:`copy_keys` (addresses, ports, TCP flags, sequence, acknowledgement and window, IPv4
identification, payload length and first 16 payload bytes) form a *run* while each comes at
most 5 ms (:data:`COPY_WINDOW_NS`) after the previous one by the capture clock; the n-th row
of a run on an interface is that interface's n-th sighting, and it is a copy when another
interface already showed an n-th sighting. A retransmission leaves through the same
interface as the original, so there it is a second sighting, never a copy, even within the
window; its copies elsewhere match it, not the original. The filter's memory (runs within
the window of the clock) spans batches, in C (``mark_copies``) or numpy, with the same result.
A pcap file of a link type without interface identity is not filtered (one interface: no
copies by this rule).

Nothing raises for bad content inside a capture: records of unsupported link types, non-IP
frames, IP fragments after the first, and headers shorter than they claim are counted per
reason in :class:`CaptureStats` (their frame numbers still advance), and a damaged record
structure (a length pointing past the end of the file, nonsense lengths, a truncated final
record) stops the read with a warning. Only an input that is not a capture at all raises
:class:`~observe.errors.FormatError`.
"""

from __future__ import annotations

import ipaddress
import queue
import struct
import threading
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from observe.compiled import pcapcut
from observe.errors import FormatError

PCAP = "pcap"
PCAPNG = "pcapng"

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),  # microseconds, little endian
    b"\xa1\xb2\xc3\xd4": (">", 1000),  # microseconds, big endian
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # nanoseconds, little endian
    b"\xa1\xb2\x3c\x4d": (">", 1),  # nanoseconds, big endian
}
_SHB = b"\x0a\x0d\x0d\x0a"
_BOM_LE = b"\x4d\x3c\x2b\x1a"
_BOM_BE = b"\x1a\x2b\x3c\x4d"

#: Largest record a capture may hold (libpcap's limit for any link type is 256 KiB; real
#: files with bigger TSO records exist, so allow a generous margin).
MAX_RECORD = 16 << 20
#: Bytes of zero padding after each batch buffer so fixed-width gathers never index out of it.
_PAD = 512

# Link types (https://www.tcpdump.org/linktypes.html).
LT_NULL = 0
LT_ETHERNET = 1
LT_RAW_BSD12 = 12
LT_RAW_BSD14 = 14
LT_RAW = 101
LT_LOOP = 108
LT_SLL = 113
LT_IPV4 = 228
LT_IPV6 = 229
LT_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset(
    {LT_NULL, LT_ETHERNET, LT_RAW_BSD12, LT_RAW_BSD14, LT_RAW, LT_LOOP, LT_SLL, LT_IPV4,
     LT_IPV6, LT_SLL2}
)

ET_IPV4 = 0x0800
ET_IPV6 = 0x86DD
_ET_VLAN = (0x8100, 0x88A8, 0x9100)
_ET_PPPOE = 0x8864
_ET_MPLS = (0x8847, 0x8848)
_ET_TEB = 0x6558  # transparent Ethernet bridging (Geneve inner Ethernet)

# ``tunnel`` column values.
TUNNEL_NONE = 0
TUNNEL_VXLAN = 1
TUNNEL_GENEVE = 2
TUNNEL_IPIP = 3
TUNNEL_NAMES = {TUNNEL_NONE: "", TUNNEL_VXLAN: "vxlan", TUNNEL_GENEVE: "geneve",
                TUNNEL_IPIP: "ipip"}
VXLAN_PORT = 4789
GENEVE_PORT = 6081

# ``frag`` column values.
FRAG_NONE = 0
FRAG_FIRST = 1  # first fragment of a fragmented datagram (L4 header present)

# TCP flag bits as in the header's flags byte (plus NS/AE as 0x100).
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

_IPV6_EXT = (0, 43, 60, 51, 44, 135)  # hop-by-hop, routing, dest opts, AH, fragment, mobility
_MAX_ENCAP = 3  # overlay levels decapsulated per packet
_MAX_VLAN = 4

# Skip reasons counted in CaptureStats.skipped.
R_NON_IP = "non-IP frame"
R_FRAGMENT = "IP fragment after the first"
R_MALFORMED = "malformed: header shorter than it claims"
R_LINKTYPE = "unsupported link type"


@dataclass
class CaptureStats:
    """What a read saw: counters per reason and one-line warnings with their origin."""

    origin: str
    #: 'pcap' or 'pcapng' once the header was read.
    format: str = ""
    #: Packet records seen (decoded or not); the last frame number handed out.
    frames: int = 0
    #: Records that decoded to an IP packet (rows in the batches).
    packets: int = 0
    #: Records not turned into rows, per reason (``unsupported link type 239``, ...).
    skipped: Counter[str] = field(default_factory=Counter)
    #: pcapng blocks other than SHB/IDB/EPB/SPB/PB, per block type (hex).
    other_blocks: Counter[str] = field(default_factory=Counter)
    #: Damage to the record structure, ``origin: message`` each.
    warnings: list[str] = field(default_factory=list)
    #: True when the read stopped before the end of the stream because of damage.
    stopped: bool = False
    #: Records that decoded to an IP packet but are another interface's copy of a packet
    #: already counted (see :class:`CopyFilter`); not rows, not in ``packets``.
    duplicate_copies: int = 0

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{self.origin}:{where}: {message}")


@dataclass
class PacketBatch:
    """The IP packets of one read, one row per packet, in file order.

    Addresses are 16 bytes (IPv4 as IPv4-mapped IPv6 ``::ffff:a.b.c.d``) split in two
    big-endian-ordered uint64 so rows group and sort by address with plain integer ops.
    """

    #: Read buffer the offsets point into (with zero padding at the end).
    buf: np.ndarray
    #: 1-based number of the record in the file (tshark's ``frame.number``).
    frame: np.ndarray
    #: Capture timestamp, nanoseconds since the Unix epoch (int64).
    ts_ns: np.ndarray
    #: Original length on the wire (tshark's ``frame.len``).
    frame_len: np.ndarray
    #: Captured length of the record (``frame.cap_len``).
    cap_len: np.ndarray
    #: Link type of the record's interface.
    linktype: np.ndarray
    #: 4 or 6 (of the innermost IP header).
    ip_version: np.ndarray
    #: Source address, high 8 bytes (uint64).
    src_hi: np.ndarray
    #: Source address, low 8 bytes (uint64).
    src_lo: np.ndarray
    #: Destination address, high 8 bytes.
    dst_hi: np.ndarray
    #: Destination address, low 8 bytes.
    dst_lo: np.ndarray
    #: IP protocol number of the transport (6 TCP, 17 UDP, 1 ICMP, ...).
    proto: np.ndarray
    #: Source port (0 when not TCP/UDP).
    sport: np.ndarray
    #: Destination port (0 when not TCP/UDP).
    dport: np.ndarray
    #: TCP flags (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80,
    #: NS/AE 0x100); 0 for other protocols.
    tcp_flags: np.ndarray
    #: TCP sequence number (uint32 as int64).
    seq: np.ndarray
    #: TCP acknowledgement number (int64).
    ack: np.ndarray
    #: TCP window field (unscaled).
    window: np.ndarray
    #: L4 payload length from the headers (tshark's ``tcp.len``/UDP length - 8).
    payload_len: np.ndarray
    #: Offset of the L4 payload in ``buf``.
    payload_off: np.ndarray
    #: Payload bytes present in the capture (<= payload_len when snapped).
    payload_cap: np.ndarray
    #: Overlay the packet was decapsulated from (TUNNEL_* constants, 0 = none).
    tunnel: np.ndarray
    #: 1 when the packet is the first fragment of a fragmented IP datagram, else 0.
    frag: np.ndarray
    #: IPv4 identification field of the innermost IP header (uint16; 0 for IPv6).
    ip_id: np.ndarray
    #: Linux interface index from the SLL2 header (what ``tcpdump -i any`` writes; uint32),
    #: 0 for other link types.
    ifindex: np.ndarray
    #: pcapng interface the record was captured on, numbered 0, 1, ... in the order of the
    #: file's interface description blocks across all sections (int32); 0 in pcap files.
    iface: np.ndarray

    def __len__(self) -> int:
        return int(self.frame.shape[0])

    def select(self, rows: np.ndarray) -> PacketBatch:
        """The batch of the rows ``rows`` (indices or a mask), sharing ``buf``."""
        cols = {f: getattr(self, f)[rows] for f in _BATCH_COLUMNS}
        return PacketBatch(buf=self.buf, **cols)

    def payload(self, i: int, limit: int | None = None) -> bytes:
        """Captured payload bytes of row ``i`` (at most ``limit``)."""
        n = int(self.payload_cap[i]) if limit is None else min(int(self.payload_cap[i]), limit)
        off = int(self.payload_off[i])
        return self.buf[off: off + n].tobytes()


#: The per-row columns of a PacketBatch (everything but ``buf``).
_BATCH_COLUMNS = ("frame", "ts_ns", "frame_len", "cap_len", "linktype", "ip_version", "src_hi",
                  "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport", "tcp_flags", "seq",
                  "ack", "window", "payload_len", "payload_off", "payload_cap", "tunnel", "frag",
                  "ip_id", "ifindex", "iface")


def addr_text(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Render (hi, lo) address pairs as text (IPv4 dotted for mapped addresses).

    Vectorized over the unique addresses: each distinct address is formatted once.
    """
    hi = np.asarray(hi, dtype=np.uint64)
    lo = np.asarray(lo, dtype=np.uint64)
    if hi.size == 0:
        return np.array([], dtype=object)
    pairs = np.stack([hi, lo], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    texts = np.empty(len(uniq), dtype=object)
    for k, (h, lw) in enumerate(uniq.tolist()):
        if h == 0 and (lw >> 32) == 0xFFFF:
            texts[k] = str(ipaddress.IPv4Address(lw & 0xFFFFFFFF))
        else:
            texts[k] = str(ipaddress.IPv6Address((h << 64) | lw))
    return texts[inverse.reshape(-1)]


def sniff_capture(head: bytes) -> str | None:
    """'pcap' or 'pcapng' from the first bytes of a file, else None."""
    if head[:4] in _PCAP_MAGICS and len(head) >= 4:
        return PCAP
    if head[:4] == _SHB and len(head) >= 12 and head[8:12] in (_BOM_LE, _BOM_BE):
        return PCAPNG
    return None


# --- numpy gathers ---------------------------------------------------------------------------


def _u8(b: np.ndarray, off: np.ndarray) -> np.ndarray:
    return b[off].astype(np.int64)


def _u16(b: np.ndarray, off: np.ndarray) -> np.ndarray:
    return (b[off].astype(np.int64) << 8) | b[off + 1]


def _u32(b: np.ndarray, off: np.ndarray) -> np.ndarray:
    return ((b[off].astype(np.int64) << 24) | (b[off + 1].astype(np.int64) << 16)
            | (b[off + 2].astype(np.int64) << 8) | b[off + 3])


def _u32le(b: np.ndarray, off: np.ndarray) -> np.ndarray:
    return ((b[off + 3].astype(np.int64) << 24) | (b[off + 2].astype(np.int64) << 16)
            | (b[off + 1].astype(np.int64) << 8) | b[off])


def _u32e(b: np.ndarray, off: np.ndarray, big: np.ndarray | bool) -> np.ndarray:
    if isinstance(big, bool):
        return _u32(b, off) if big else _u32le(b, off)
    return np.where(big, _u32(b, off), _u32le(b, off))


def _addr(b: np.ndarray, off: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather n-byte (4 or 16) addresses at ``off`` as (hi, lo) uint64."""
    if n == 4:
        v4 = _u32(b, off).astype(np.uint64)
        return np.zeros_like(v4), v4 | np.uint64(0xFFFF00000000)
    idx = off[:, None] + np.arange(16)
    raw = np.ascontiguousarray(b[idx]).view(">u8")
    return raw[:, 0].astype(np.uint64), raw[:, 1].astype(np.uint64)


# --- header decode ---------------------------------------------------------------------------


@dataclass
class _Decoded:
    ok: np.ndarray
    reason: np.ndarray  # object array of skip reasons ('' when ok)
    ip_version: np.ndarray
    src_hi: np.ndarray
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    proto: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    tcp_flags: np.ndarray
    seq: np.ndarray
    ack: np.ndarray
    window: np.ndarray
    payload_len: np.ndarray
    payload_off: np.ndarray
    payload_cap: np.ndarray
    tunnel: np.ndarray
    frag: np.ndarray
    ip_id: np.ndarray
    ifindex: np.ndarray


def _link(b: np.ndarray, start: np.ndarray, end: np.ndarray, lt: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record: (L3 offset, ethertype-like code, reason code) from the link header.

    Reason codes: 0 ok, 1 unsupported link type, 2 non-IP, 3 truncated link header.
    """
    n = start.shape[0]
    l3 = start.copy()
    et = np.zeros(n, dtype=np.int64)
    why = np.zeros(n, dtype=np.int8)
    avail = end - start

    m = lt == LT_ETHERNET
    et[m] = _u16(b, start[m] + 12)
    l3[m] = start[m] + 14
    short = m & (avail < 14)
    m = lt == LT_SLL
    et[m] = _u16(b, start[m] + 14)
    l3[m] = start[m] + 16
    short |= m & (avail < 16)
    m = lt == LT_SLL2
    et[m] = _u16(b, start[m])
    l3[m] = start[m] + 20
    short |= m & (avail < 20)
    # Raw IP (also 228/229: a header of the other version is taken for what it says it is).
    m = np.isin(lt, (LT_RAW, LT_RAW_BSD12, LT_RAW_BSD14, LT_IPV4, LT_IPV6))
    ver = _u8(b, start[m]) >> 4
    et[m] = np.where(ver == 4, ET_IPV4, np.where(ver == 6, ET_IPV6, 0))
    short |= m & (avail < 1)
    m = (lt == LT_NULL) | (lt == LT_LOOP)
    fam_le = _u32le(b, start[m])
    fam_be = _u32(b, start[m])
    et[m] = np.where((fam_le == 2) | (fam_be == 2), ET_IPV4,
                     np.where(np.isin(fam_le, (24, 28, 30)) | np.isin(fam_be, (24, 28, 30)),
                              ET_IPV6, 0))
    l3[m] = start[m] + 4
    short |= m & (avail < 4)

    # Stacked 802.1Q / 802.1ad tags, PPPoE sessions, MPLS label stacks.
    for _ in range(_MAX_VLAN):
        v = np.isin(et, _ET_VLAN) & ~short
        p = (et == _ET_PPPOE) & ~short
        m = np.isin(et, _ET_MPLS) & ~short
        if not (v.any() or p.any() or m.any()):
            break
        short |= v & (l3 + 4 > end)
        v &= ~short
        et[v] = _u16(b, l3[v] + 2)
        l3[v] += 4
        # PPPoE session: 6-byte header, then the 2-byte PPP protocol (0x21 IPv4, 0x57 IPv6).
        short |= p & (l3 + 8 > end)
        p &= ~short
        ppp = _u16(b, l3[p] + 6)
        et[p] = np.where(ppp == 0x21, ET_IPV4, np.where(ppp == 0x57, ET_IPV6, 0))
        l3[p] += 8
        # MPLS: 4-byte labels up to the bottom-of-stack bit; the payload's version nibble
        # says IPv4/IPv6 (anything else, e.g. a pseudowire, is not IP).
        for _lbl in range(8):
            short |= m & (l3 + 4 > end)
            m &= ~short
            if not m.any():
                break
            bos = (_u8(b, l3[m] + 2) & 1) == 1
            l3[m] += 4
            idx = np.nonzero(m)[0][bos]
            ver = _u8(b, l3[idx]) >> 4
            et[idx] = np.where(ver == 4, ET_IPV4, np.where(ver == 6, ET_IPV6, 0))
            m[idx] = False

    why[~np.isin(lt, list(SUPPORTED_LINKTYPES))] = 1
    why[(why == 0) & short] = 3
    why[(why == 0) & (et != ET_IPV4) & (et != ET_IPV6)] = 2
    return l3, et, why


def _ip(b: np.ndarray, l3: np.ndarray, end: np.ndarray, et: np.ndarray) -> dict[str, np.ndarray]:
    """Decode IP + transport for packets whose L3 starts at ``l3`` (``et`` says v4/v6)."""
    n = l3.shape[0]
    i64 = np.int64
    out: dict[str, np.ndarray] = {
        "ok": np.ones(n, dtype=bool),
        "why": np.zeros(n, dtype=np.int8),  # 0 ok, 3 malformed, 4 fragment
        "ver": np.zeros(n, dtype=np.int8),
        "src_hi": np.zeros(n, dtype=np.uint64), "src_lo": np.zeros(n, dtype=np.uint64),
        "dst_hi": np.zeros(n, dtype=np.uint64), "dst_lo": np.zeros(n, dtype=np.uint64),
        "proto": np.zeros(n, dtype=i64), "l4": np.zeros(n, dtype=i64),
        "l4_len": np.zeros(n, dtype=i64), "frag": np.zeros(n, dtype=np.int8),
        "ipid": np.zeros(n, dtype=i64),
    }
    bad = np.zeros(n, dtype=bool)
    later_frag = np.zeros(n, dtype=bool)

    v4 = et == ET_IPV4
    if v4.any():
        o = l3[v4]
        e = end[v4]
        vb = _u8(b, o)
        ihl = (vb & 0xF) * 4
        tot = _u16(b, o + 2)
        fr = _u16(b, o + 6)
        bad4 = (o + 20 > e) | ((vb >> 4) != 4) | (ihl < 20) | (o + ihl > e)
        # Total length 0 (TSO super-segments captured before offload): use the captured size.
        tot = np.where(tot == 0, e - o, tot)
        bad4 |= tot < ihl
        out["ver"][v4] = 4
        out["ipid"][v4] = _u16(b, o + 4)
        out["proto"][v4] = _u8(b, o + 9)
        out["src_hi"][v4], out["src_lo"][v4] = _addr(b, o + 12, 4)
        out["dst_hi"][v4], out["dst_lo"][v4] = _addr(b, o + 16, 4)
        out["l4"][v4] = o + ihl
        out["l4_len"][v4] = tot - ihl
        off = fr & 0x1FFF
        mf = (fr & 0x2000) != 0
        later_frag[v4] = off > 0
        out["frag"][v4] = np.where((off == 0) & mf, FRAG_FIRST, FRAG_NONE)
        bad[v4] = bad4

    v6 = et == ET_IPV6
    if v6.any():
        idx = np.nonzero(v6)[0]
        o = l3[idx]
        e = end[idx]
        bad6 = (o + 40 > e) | ((_u8(b, o) >> 4) != 6)
        plen = _u16(b, o + 4)
        nh = _u8(b, o + 6)
        out["ver"][idx] = 6
        out["src_hi"][idx], out["src_lo"][idx] = _addr(b, o + 8, 16)
        out["dst_hi"][idx], out["dst_lo"][idx] = _addr(b, o + 24, 16)
        cur = o + 40
        remaining = plen.copy()
        frag6 = np.zeros(idx.shape[0], dtype=np.int8)
        later6 = np.zeros(idx.shape[0], dtype=bool)
        for _ in range(6):
            x = np.isin(nh, _IPV6_EXT) & ~bad6
            if not x.any():
                break
            short = x & (cur + 8 > e)
            bad6 |= short
            x &= ~short
            hlen = np.where(nh == 44, 8, np.where(nh == 51, (_u8(b, cur + 1) + 2) * 4,
                                                  (_u8(b, cur + 1) + 1) * 8))
            isfrag = x & (nh == 44)
            fo = _u16(b, cur + 2)
            later6 |= isfrag & ((fo >> 3) > 0)
            frag6[isfrag & ((fo >> 3) == 0) & ((fo & 1) == 1)] = FRAG_FIRST
            nh = np.where(x, _u8(b, cur), nh)
            cur = np.where(x, cur + hlen, cur)
            remaining = np.where(x, remaining - hlen, remaining)
        bad6 |= remaining < 0
        out["proto"][idx] = nh
        out["l4"][idx] = cur
        out["l4_len"][idx] = remaining
        out["frag"][idx] = frag6
        later_frag[idx] = later6
        bad[idx] = bad6
    bad |= ~(v4 | v6)
    out["why"][bad] = 3
    out["why"][~bad & later_frag] = 4
    out["ok"] = out["why"] == 0
    return out


def _transport(b: np.ndarray, l4: np.ndarray, l4_len: np.ndarray, end: np.ndarray,
               proto: np.ndarray) -> dict[str, np.ndarray]:
    n = l4.shape[0]
    i64 = np.int64
    out = {k: np.zeros(n, dtype=i64) for k in
           ("sport", "dport", "flags", "seq", "ack", "win", "plen", "poff")}
    bad = np.zeros(n, dtype=bool)
    out["poff"] = l4.copy()
    out["plen"] = np.maximum(l4_len, 0)

    t = proto == 6
    if t.any():
        o = l4[t]
        e = end[t]
        doff = (_u8(b, o + 12) >> 4) * 4
        # The whole header with its options must be captured (tshark drops the packet too).
        badt = (o + 20 > e) | (doff < 20) | (o + doff > e) | (l4_len[t] < doff)
        out["sport"][t] = _u16(b, o)
        out["dport"][t] = _u16(b, o + 2)
        out["seq"][t] = _u32(b, o + 4)
        out["ack"][t] = _u32(b, o + 8)
        out["flags"][t] = _u8(b, o + 13) | ((_u8(b, o + 12) & 1) << 8)
        out["win"][t] = _u16(b, o + 14)
        out["poff"][t] = o + doff
        out["plen"][t] = np.maximum(l4_len[t] - doff, 0)
        bad[t] = badt
    u = proto == 17
    if u.any():
        o = l4[u]
        e = end[u]
        badu = (o + 8 > e) | (l4_len[u] < 8)
        out["sport"][u] = _u16(b, o)
        out["dport"][u] = _u16(b, o + 2)
        ulen = _u16(b, o + 4)
        # The UDP length field (tshark's udp.length); fall back to the IP length when absurd.
        ulen = np.where((ulen >= 8) & (ulen <= l4_len[u]), ulen, l4_len[u])
        out["poff"][u] = o + 8
        out["plen"][u] = np.maximum(ulen - 8, 0)
        bad[u] = badu
    out["bad"] = bad
    return out


def _decode(b: np.ndarray, start: np.ndarray, caplen: np.ndarray, lt: np.ndarray
            ) -> tuple[_Decoded, np.ndarray]:
    """Decode all records; returns the columns and a per-record reason code."""
    n = start.shape[0]
    end = start + caplen
    l3, et, why = _link(b, start, end, lt)
    reason = why.astype(np.int16) * 0
    reason[why == 1] = 1  # unsupported link type
    reason[why == 2] = 2  # non-IP
    reason[why == 3] = 3  # malformed
    cur = np.nonzero(why == 0)[0]
    cl3 = l3[cur]
    cet = et[cur]
    tunnel = np.zeros(n, dtype=np.int8)
    res = {k: np.zeros(n, dtype=np.uint64) for k in ("src_hi", "src_lo", "dst_hi", "dst_lo")}
    ints = {k: np.zeros(n, dtype=np.int64) for k in
            ("ver", "proto", "sport", "dport", "flags", "seq", "ack", "win", "plen", "poff",
             "pcap", "frag", "ipid")}
    for level in range(_MAX_ENCAP + 1):
        if cur.size == 0:
            break
        e = end[cur]
        ip = _ip(b, cl3, e, cet)
        tp = _transport(b, ip["l4"], ip["l4_len"], e, ip["proto"])
        why_ip = ip["why"].astype(np.int16)
        why_ip[(why_ip == 0) & tp["bad"]] = 3
        reason[cur] = np.where(why_ip == 4, 4, why_ip)
        good = why_ip == 0
        # Overlays: decapsulate into the next round.
        vx = good & (ip["proto"] == 17) & ((tp["dport"] == VXLAN_PORT) | (tp["dport"] == 8472))
        gn = good & (ip["proto"] == 17) & (tp["dport"] == GENEVE_PORT)
        ii = good & (ip["frag"] == FRAG_NONE) & ((ip["proto"] == 4) | (ip["proto"] == 41))
        nxt_l3 = np.zeros(cur.size, dtype=np.int64)
        nxt_et = np.zeros(cur.size, dtype=np.int64)
        nxt_ok = np.zeros(cur.size, dtype=bool)
        if level < _MAX_ENCAP and (vx.any() or gn.any() or ii.any()):
            p = tp["poff"]
            # VXLAN: 8-byte header (I flag 0x08) then an Ethernet frame.
            vxo = vx & (p + 8 + 14 <= e) & ((_u8(b, p) & 0x08) != 0)
            inner_start = p + 8
            l3v, etv, wv = _link(b, inner_start[vxo], e[vxo],
                                 np.full(int(vxo.sum()), LT_ETHERNET, dtype=np.int64))
            nxt_l3[vxo], nxt_et[vxo], nxt_ok[vxo] = l3v, etv, wv == 0
            # Geneve: 8-byte header + options (6 bits, 4-byte words), protocol type at +2.
            gno = gn & (p + 8 <= e)
            optlen = (_u8(b, p) & 0x3F) * 4
            gptype = _u16(b, p + 2)
            ginner = p + 8 + optlen
            ge = gno & (gptype == _ET_TEB)
            l3g, etg, wg = _link(b, ginner[ge], e[ge],
                                 np.full(int(ge.sum()), LT_ETHERNET, dtype=np.int64))
            nxt_l3[ge], nxt_et[ge], nxt_ok[ge] = l3g, etg, wg == 0
            gip = gno & ((gptype == ET_IPV4) | (gptype == ET_IPV6))
            nxt_l3[gip], nxt_et[gip], nxt_ok[gip] = ginner[gip], gptype[gip], True
            nxt_ok &= nxt_l3 <= e
            # IP-in-IP: the inner header starts where the transport would.
            nxt_l3[ii] = ip["l4"][ii]
            nxt_et[ii] = np.where(ip["proto"][ii] == 4, ET_IPV4, ET_IPV6)
            nxt_ok[ii] = True
        # Write this level's result for packets that are not decapsulated further.
        final = ~nxt_ok
        fi = cur[final]
        for k in res:
            res[k][fi] = ip[k][final]
        ints["ver"][fi] = ip["ver"][final]
        ints["proto"][fi] = ip["proto"][final]
        ints["frag"][fi] = ip["frag"][final]
        ints["ipid"][fi] = ip["ipid"][final]
        for k, src in (("sport", "sport"), ("dport", "dport"), ("flags", "flags"),
                       ("seq", "seq"), ("ack", "ack"), ("win", "win"), ("plen", "plen"),
                       ("poff", "poff")):
            ints[k][fi] = tp[src][final]
        ints["pcap"][fi] = np.clip(e[final] - tp["poff"][final], 0, tp["plen"][final])
        tun = np.where(vx, TUNNEL_VXLAN, np.where(gn, TUNNEL_GENEVE, TUNNEL_IPIP))
        deeper = cur[nxt_ok]
        tunnel[deeper] = tun[nxt_ok]
        cur = deeper
        cl3 = nxt_l3[nxt_ok]
        cet = nxt_et[nxt_ok]
    cols = ints
    ok = reason == 0
    dec = _Decoded(
        ok=ok, reason=reason, ip_version=cols["ver"].astype(np.int8),
        src_hi=res["src_hi"], src_lo=res["src_lo"], dst_hi=res["dst_hi"], dst_lo=res["dst_lo"],
        proto=cols["proto"].astype(np.uint8), sport=cols["sport"].astype(np.uint16),
        dport=cols["dport"].astype(np.uint16), tcp_flags=cols["flags"].astype(np.uint16),
        seq=cols["seq"], ack=cols["ack"], window=cols["win"].astype(np.uint16),
        payload_len=cols["plen"], payload_off=cols["poff"], payload_cap=cols["pcap"],
        tunnel=tunnel, frag=cols["frag"].astype(np.int8), ip_id=cols["ipid"].astype(np.uint16),
        # SLL2: bytes 4-7 of its header are the interface index.
        ifindex=np.where(lt == LT_SLL2, _u32(b, start + 4), 0).astype(np.uint32),
    )
    return dec, reason


#: Use the compiled kernel when it is built (tests switch it off to compare both paths).
USE_KERNEL = True

_REASONS = {1: R_LINKTYPE, 2: R_NON_IP, 3: R_MALFORMED, 4: R_FRAGMENT}


# --- record splitting ------------------------------------------------------------------------


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    # Timestamp unit: ts_ns = ts * mul // div
    mul: int = 1000
    div: int = 1
    offset_s: int = 0


def _tsresol(v: int) -> tuple[int, int]:
    """(mul, div) turning if_tsresol units into nanoseconds."""
    if v & 0x80:
        p = v & 0x7F
        return (10**9, 1 << p) if p < 63 else (10**9, 1 << 62)
    if v <= 9:
        return 10 ** (9 - v), 1
    return 1, 10 ** min(v - 9, 18)


class _Reader:
    def __init__(self, stream: BinaryIO, origin: str, batch_bytes: int,
                 copies: CopyFilter | None = None):
        self.stream = stream
        self.stats = CaptureStats(origin=origin)
        self.batch_bytes = max(int(batch_bytes), 1 << 16)
        self.frame = 0
        self.consumed = 0  # absolute file offset of the start of the current buffer
        self.kernel = pcapcut if USE_KERNEL else None
        self.copies = copies

    def _read(self, n: int) -> bytes:
        try:
            return self.stream.read(n) or b""
        except OSError as e:
            raise FormatError(f"read failed: {e}", origin=self.stats.origin) from e

    def _fill(self, carry: bytes) -> tuple[np.ndarray, int, bool]:
        """A fresh buffer: ``carry``, then one read of up to ``batch_bytes``, then ``_PAD``
        zero bytes; (buffer, bytes of data in it, end of stream reached).

        The read goes straight into the buffer the batch keeps (no copy of the data); each
        batch gets its own buffer, so a batch stays valid while later ones are read.
        """
        k = len(carry)
        b = np.empty(k + self.batch_bytes + _PAD, dtype=np.uint8)
        if k:
            b[:k] = np.frombuffer(carry, dtype=np.uint8)
        readinto = getattr(self.stream, "readinto", None)
        try:
            if readinto is not None:
                got = readinto(b.data[k: k + self.batch_bytes]) or 0
            else:
                data = self.stream.read(self.batch_bytes) or b""
                got = len(data)
                b[k: k + got] = np.frombuffer(data, dtype=np.uint8)
        except OSError as e:
            raise FormatError(f"read failed: {e}", origin=self.stats.origin) from e
        n = k + got
        b[n: n + _PAD] = 0
        return b[: n + _PAD], n, got == 0

    def batches(self) -> Iterator[PacketBatch]:
        head = self._read(24)
        while 0 < len(head) < 24:
            more = self._read(24 - len(head))
            if not more:
                break
            head += more
        kind = sniff_capture(head)
        if kind is None:
            if not head:
                raise FormatError("empty file, not a packet capture", origin=self.stats.origin)
            raise FormatError("not a pcap or pcapng capture (unknown magic bytes)",
                              origin=self.stats.origin)
        self.stats.format = kind
        for batch in self._pcap(head) if kind == PCAP else self._pcapng(head):
            if self.copies is not None and len(batch):
                copy = self.copies.mark(batch)
                k = int(np.count_nonzero(copy))
                if k:
                    self.stats.duplicate_copies += k
                    self.stats.packets -= k
                    batch = batch.select(~copy)
            yield batch

    # pcap ------------------------------------------------------------------------------------

    def _pcap(self, head: bytes) -> Iterator[PacketBatch]:
        if len(head) < 24:
            self.stats.warn("0", "truncated pcap file header")
            self.stats.stopped = True
            return
        endian, tmul = _PCAP_MAGICS[head[:4]]
        _vmaj, _vmin, _tz, _sig, snaplen, network = struct.unpack(endian + "HHiIII", head[4:24])
        lt = network & 0xFFFF  # upper bits: FCS length and flags
        if lt != LT_SLL2:
            # Every row is on "interface 0": nothing can be another interface's copy.
            self.copies = None
        big = endian == ">"
        limit = max(MAX_RECORD, snaplen if 0 < snaplen < (1 << 30) else 0)
        self.consumed = 24
        carry = b""
        eof = False
        while not eof:
            b, n, eof = self._fill(carry)
            if not n:
                break
            if self.kernel is not None:
                # Record walk and header decode in one pass in C.
                reason_b, cols, pos, stop = self.kernel.pcap_decode(b, n, big, tmul, limit, lt)
                reason = np.frombuffer(reason_b, dtype=np.int8)
                batch = None
                if reason.size:
                    lts = np.full(reason.size, lt, dtype=np.int64)
                    batch = self._kernel_batch(b, reason, cols, lts, None)
            else:
                starts, caps, wires, ts, pos, stop = self._walk_pcap(b, n, big, tmul, limit)
                batch = None
                if starts.size:
                    lts = np.full(starts.shape[0], lt, dtype=np.int64)
                    batch = self._batch(b, starts, caps, wires, ts, lts)
            if stop:
                cap = int(_u32e(b, np.array([pos + 8]), big)[0])
                self.stats.warn(f"packet {self.frame + 1}",
                                f"record length {cap} is beyond any snapshot length; "
                                "stopping (damaged file)")
            if batch is not None:
                yield batch
            self.consumed += pos
            carry = b[pos:n].tobytes()
            if stop:
                self.stats.stopped = True
                return
        if carry:
            self.stats.warn(f"packet {self.frame + 1}",
                            f"truncated final record ({len(carry)} bytes at file offset "
                            f"{self.consumed}); ignored")
            self.stats.skipped["truncated final record"] += 1
            self.stats.stopped = True

    def _walk_pcap(self, b: np.ndarray, n: int, big: bool, tmul: int, limit: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, bool]:
        """The records wholly in ``b[:n]``: (data starts, captured lengths, wire lengths,
        timestamps, offset of the first record not taken, stopped at a nonsense length)."""
        offs: list[int] = []
        append = offs.append
        cap_at = struct.Struct(">I" if big else "<I").unpack_from
        mv = b.data
        pos = 0
        n16 = n - 16
        # The only per-record Python: follow the record lengths.
        while pos <= n16:
            append(pos)
            pos += 16 + cap_at(mv, pos + 8)[0]
        if pos > n:  # the last record is not complete in this buffer
            pos = offs.pop()
        stop = False
        if offs or pos + 16 <= n:
            heads = np.asarray([*offs, pos] if pos + 16 <= n else offs, dtype=np.int64)
            over = np.nonzero(_u32e(b, heads + 8, big) > limit)[0]
            if over.size:
                first = int(over[0])
                stop = True
                del offs[first:]
                pos = int(heads[first])
        h = np.asarray(offs, dtype=np.int64)
        sec = _u32e(b, h, big)
        frac = _u32e(b, h + 4, big)
        cap = _u32e(b, h + 8, big)
        wire = _u32e(b, h + 12, big)
        ts = sec * 1_000_000_000 + frac * tmul
        return h + 16, cap, wire, ts, pos, stop

    # pcapng ----------------------------------------------------------------------------------

    def _pcapng(self, head: bytes) -> Iterator[PacketBatch]:
        carry = head
        ifaces: list[_Interface] = []  # interfaces of the current section
        endian = "<"
        eof = False
        in_section = False
        kernel = self.kernel
        while True:
            if eof:
                b = np.zeros(len(carry) + _PAD, dtype=np.uint8)
                b[: len(carry)] = np.frombuffer(carry, dtype=np.uint8)
                n = len(carry)
            else:
                b, n, eof = self._fill(carry)
            buf = b.data
            pos = 0
            # Packet blocks in chunks: (block offsets, kinds, iface-table index)
            chunks: list[tuple[np.ndarray, np.ndarray, int]] = []
            pk_off: list[int] = []
            pk_kind: list[int] = []
            pk_table = 0  # iface-table index of the blocks in pk_off
            tables: list[list[_Interface]] = [ifaces]
            tables_big: list[bool] = [endian == ">"]
            stop = False
            while pos + 12 <= n:
                if kernel is not None and in_section:
                    # Runs of well-formed packet blocks in C; anything else below.
                    offs_b, kinds_b, end = kernel.ng_walk(b, pos, n, endian == ">")
                    if end > pos:
                        _flush_blocks(chunks, pk_off, pk_kind, pk_table)
                        chunks.append((np.frombuffer(offs_b, np.int64),
                                       np.frombuffer(kinds_b, np.int64), len(tables) - 1))
                        pos = int(end)
                        if pos + 12 > n:
                            break
                btype_raw = buf[pos: pos + 4]
                if btype_raw == _SHB:
                    bom = buf[pos + 8: pos + 12]
                    if bom == _BOM_LE:
                        endian = "<"
                    elif bom == _BOM_BE:
                        endian = ">"
                    else:
                        self.stats.warn(f"offset {self.consumed + pos}",
                                        "section header with a bad byte-order magic; stopping")
                        stop = True
                        break
                btype, blen = struct.unpack_from(endian + "II", buf, pos)
                if blen < 12 or blen % 4 or blen > MAX_RECORD + 4096:
                    self.stats.warn(f"offset {self.consumed + pos}",
                                    f"bad block length {blen}; stopping (damaged file)")
                    stop = True
                    break
                if pos + blen > n:
                    break
                if struct.unpack_from(endian + "I", buf, pos + blen - 4)[0] != blen:
                    self.stats.warn(f"offset {self.consumed + pos}",
                                    "block length trailer does not match; stopping")
                    stop = True
                    break
                if btype in (6, 3, 2):
                    if not in_section:
                        pos += blen
                        continue
                    if pk_table != len(tables) - 1:
                        _flush_blocks(chunks, pk_off, pk_kind, pk_table)
                        pk_table = len(tables) - 1
                    pk_off.append(pos)
                    pk_kind.append(btype)
                elif btype == 0x0A0D0D0A:
                    in_section = True
                    ifaces = []
                    tables.append(ifaces)
                    tables_big.append(endian == ">")
                elif btype == 1:
                    if blen >= 20:
                        ifaces.append(_parse_idb(buf, pos, blen, endian))
                    else:
                        self.stats.warn(f"offset {self.consumed + pos}",
                                        "interface description block too short; ignored")
                else:
                    self.stats.other_blocks[f"0x{btype:08x}"] += 1
                pos += blen
            _flush_blocks(chunks, pk_off, pk_kind, pk_table)
            if chunks:
                yield self._emit_pcapng(b, chunks, tables, tables_big)
            self.consumed += pos
            carry = b[pos:n].tobytes()
            if stop:
                self.stats.stopped = True
                return
            if eof:
                break
        if carry:
            self.stats.warn(f"offset {self.consumed}",
                            f"truncated final block ({len(carry)} bytes); ignored")
            self.stats.skipped["truncated final record"] += 1
            self.stats.stopped = True

    def _emit_pcapng(self, b: np.ndarray, chunks: list[tuple[np.ndarray, np.ndarray, int]],
                     tables: list[list[_Interface]], tables_big: list[bool]) -> PacketBatch:
        h = np.concatenate([c[0] for c in chunks])
        kind = np.concatenate([c[1] for c in chunks])
        tab = np.repeat(np.asarray([c[2] for c in chunks], dtype=np.int64),
                        [c[0].size for c in chunks])
        big = np.asarray(tables_big, dtype=bool)[tab]
        blen = _u32e(b, h + 4, big)
        # Flatten interface tables: global index = base[table] + local id.
        base = np.cumsum([0] + [len(t) for t in tables])[:-1].astype(np.int64)
        ntab = np.asarray([len(t) for t in tables], dtype=np.int64)
        flat = [i for t in tables for i in t]
        lt_of = np.asarray([i.linktype for i in flat] + [-1], dtype=np.int64)
        snap_of = np.asarray([i.snaplen for i in flat] + [0], dtype=np.int64)
        mul_of = np.asarray([i.mul for i in flat] + [1], dtype=np.int64)
        div_of = np.asarray([i.div for i in flat] + [1], dtype=np.int64)
        offs_of = np.asarray([i.offset_s for i in flat] + [0], dtype=np.int64)

        epb = kind != 3
        u16le = b[h + 8].astype(np.int64) | (b[h + 9].astype(np.int64) << 8)
        local = np.where(kind == 6, _u32e(b, h + 8, big), np.where(big, _u16(b, h + 8), u16le))
        local = np.where(epb, local, 0)
        valid_if = local < ntab[tab]
        gidx = np.where(valid_if, base[tab] + local, len(flat))
        ts_hi = _u32e(b, h + 12, big)
        ts_lo = _u32e(b, h + 16, big)
        cap = np.where(epb, _u32e(b, h + 20, big), 0)
        wire = np.where(epb, _u32e(b, h + 24, big), _u32e(b, h + 8, big))
        start = np.where(epb, h + 28, h + 12)
        room = np.where(epb, blen - 32, blen - 16)
        snap = snap_of[gidx]
        spb_cap = np.minimum(wire, room)
        spb_cap = np.where(snap > 0, np.minimum(spb_cap, snap), spb_cap)
        cap = np.where(epb, cap, spb_cap)
        bad_len = cap > room
        lts = lt_of[gidx]
        # Timestamps: 64-bit count of if_tsresol units (+ if_tsoffset seconds).
        raw = (ts_hi.astype(np.uint64) << np.uint64(32)) | ts_lo.astype(np.uint64)
        mul = mul_of[gidx]
        div = div_of[gidx]
        if (div == 1).all():
            ts = raw.astype(np.int64) * mul
        else:
            whole = (raw // div.astype(np.uint64)).astype(np.int64)
            rem = (raw % div.astype(np.uint64)).astype(np.float64)
            ts = whole * mul + np.round(rem * mul / div).astype(np.int64)
        ts = np.where(epb, ts, 0) + offs_of[gidx] * 1_000_000_000
        frames_before = self.frame
        if (~valid_if).any() or bad_len.any():
            for i in np.nonzero(~valid_if | bad_len)[0][:20].tolist():
                what = ("refers to an undeclared interface" if not valid_if[i]
                        else "captured length beyond its block")
                self.stats.warn(f"packet {frames_before + i + 1}", f"packet block {what}")
        cap = np.where(bad_len, 0, cap)
        lts = np.where(bad_len | ~valid_if, -2, lts)
        return self._batch(b, start, cap, wire, ts, lts, gidx)

    # common ----------------------------------------------------------------------------------

    def _batch(self, b: np.ndarray, start: np.ndarray, cap: np.ndarray, wire: np.ndarray,
               ts: np.ndarray, lts: np.ndarray, iface: np.ndarray | None = None) -> PacketBatch:
        """The batch of the records at ``start`` (``iface``: their pcapng interface numbers,
        None in pcap files)."""
        if self.kernel is not None:
            reason_b, cols = self.kernel.decode(b, np.ascontiguousarray(start, np.int64),
                                                np.ascontiguousarray(cap, np.int64),
                                                np.ascontiguousarray(lts, np.int64))
            return self._kernel_batch(b, np.frombuffer(reason_b, dtype=np.int8), cols, lts,
                                      (ts, cap, wire), iface)
        n = start.shape[0]
        frames = np.arange(self.frame + 1, self.frame + 1 + n, dtype=np.int64)
        self.frame += n
        self.stats.frames = self.frame
        dec, reason = _decode(b, start, cap, lts)
        self._count_skips(reason, lts)
        ok = dec.ok
        self.stats.packets += int(ok.sum())
        ifc = (np.zeros(int(ok.sum()), dtype=np.int32) if iface is None
               else iface[ok].astype(np.int32))
        return PacketBatch(
            buf=b, frame=frames[ok], ts_ns=ts[ok], frame_len=wire[ok], cap_len=cap[ok],
            linktype=lts[ok].astype(np.int32), ip_version=dec.ip_version[ok],
            src_hi=dec.src_hi[ok], src_lo=dec.src_lo[ok], dst_hi=dec.dst_hi[ok],
            dst_lo=dec.dst_lo[ok], proto=dec.proto[ok], sport=dec.sport[ok],
            dport=dec.dport[ok], tcp_flags=dec.tcp_flags[ok], seq=dec.seq[ok], ack=dec.ack[ok],
            window=dec.window[ok], payload_len=dec.payload_len[ok],
            payload_off=dec.payload_off[ok], payload_cap=dec.payload_cap[ok],
            tunnel=dec.tunnel[ok], frag=dec.frag[ok], ip_id=dec.ip_id[ok],
            ifindex=dec.ifindex[ok], iface=ifc,
        )

    def _kernel_batch(self, b: np.ndarray, reason: np.ndarray, cols: tuple[bytearray, ...],
                      lts: np.ndarray, per_record: tuple[np.ndarray, np.ndarray, np.ndarray]
                      | None, iface: np.ndarray | None = None) -> PacketBatch:
        """The batch from the kernel's columns (``per_record``: timestamps, captured and wire
        lengths of every record, when the kernel did not return them for the rows; ``iface``:
        the pcapng interface number of every record, None in pcap files)."""
        n = reason.shape[0]
        first = self.frame + 1
        self.frame += n
        self.stats.frames = self.frame
        c = [np.frombuffer(x, dtype=t) for x, t in zip(cols, _KERNEL_COLS, strict=False)]
        idx = c[0]
        if per_record is None:
            ts, cap, wire = c[-3:]
        elif idx.size == n:
            ts, cap, wire = per_record
        else:
            ts, cap, wire = (x[idx] for x in per_record)
        frames = np.arange(first, first + n, dtype=np.int64) if idx.size == n else idx + first
        self._count_skips(reason, lts)
        self.stats.packets += int(idx.shape[0])
        if iface is None:
            ifc = np.zeros(idx.shape[0], dtype=np.int32)
        else:
            ifc = (iface if idx.size == n else iface[idx]).astype(np.int32)
        return PacketBatch(
            buf=b, frame=frames, ts_ns=ts, frame_len=wire, cap_len=cap,
            linktype=(lts if idx.size == n else lts[idx]).astype(np.int32), ip_version=c[1],
            src_hi=c[2], src_lo=c[3], dst_hi=c[4], dst_lo=c[5], proto=c[6], sport=c[7],
            dport=c[8], tcp_flags=c[9], seq=c[10], ack=c[11], window=c[12], payload_len=c[13],
            payload_off=c[14], payload_cap=c[15], tunnel=c[16], frag=c[17], ip_id=c[18],
            ifindex=c[19], iface=ifc,
        )

    def _count_skips(self, reason: np.ndarray, lts: np.ndarray) -> None:
        bad = reason != 0
        if not bad.any():
            return
        codes, counts = np.unique(reason[bad], return_counts=True)
        for c, k in zip(codes.tolist(), counts.tolist(), strict=True):
            if c == 1:
                bad_lt = lts[reason == 1]
                for v, kk in zip(*np.unique(bad_lt, return_counts=True), strict=True):
                    label = ("record error" if v == -2
                             else f"{R_LINKTYPE} {int(v)}" if v >= 0
                             else "unknown interface")
                    self.stats.skipped[label] += int(kk)
            else:
                self.stats.skipped[_REASONS[c]] += k


#: dtypes of the kernel's decode columns, in its order.
_KERNEL_COLS = (np.int64, np.int8, np.uint64, np.uint64, np.uint64, np.uint64, np.uint8,
                np.uint16, np.uint16, np.uint16, np.int64, np.int64, np.uint16, np.int64,
                np.int64, np.int64, np.int8, np.int8, np.uint16, np.uint32, np.int64, np.int64,
                np.int64)


def _flush_blocks(chunks: list[tuple[np.ndarray, np.ndarray, int]], pk_off: list[int],
                  pk_kind: list[int], table: int) -> None:
    """Move the packet blocks collected one by one into ``chunks`` (keeping file order)."""
    if pk_off:
        chunks.append((np.asarray(pk_off, dtype=np.int64), np.asarray(pk_kind, dtype=np.int64),
                       table))
        pk_off.clear()
        pk_kind.clear()


def _parse_idb(buf: bytes | memoryview, pos: int, blen: int, endian: str) -> _Interface:
    linktype, _res, snaplen = struct.unpack_from(endian + "HHI", buf, pos + 8)
    iface = _Interface(linktype=linktype, snaplen=snaplen)
    o = pos + 16
    end = pos + blen - 4
    while o + 4 <= end:
        code, olen = struct.unpack_from(endian + "HH", buf, o)
        if code == 0:
            break
        val = buf[o + 4: o + 4 + olen]
        if code == 9 and olen >= 1:
            iface.mul, iface.div = _tsresol(val[0])
        elif code == 14 and olen == 8:
            iface.offset_s = struct.unpack(endian + "q", val)[0]
        o += 4 + ((olen + 3) & ~3)
    return iface


# --- duplicate copies ------------------------------------------------------------------------

#: Default window of :class:`CopyFilter`: the longest gap between two sightings of one packet
#: on two interfaces of a node (µs in practice: a veth, the bridge and eth0 see it within one
#: softirq run; 5 ms leaves room for a loaded node's backlog).
COPY_WINDOW_NS = 5_000_000

_K_SEED = np.uint64(0x9E3779B97F4A7C15)
_K_MUL = np.uint64(0xFF51AFD7ED558CCD)
_K_FIN = np.uint64(0xC4CEB9FE1A85EC53)
_I64_MIN = -(1 << 63)


def _kmix(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    h = (h ^ w) * _K_MUL
    return h ^ (h >> np.uint64(32))


#: The columns copy_keys hashes, in the kernel's order, with the types it takes.
_KEY_COLS = (("src_hi", np.uint64), ("src_lo", np.uint64), ("dst_hi", np.uint64),
             ("dst_lo", np.uint64), ("proto", np.uint8), ("sport", np.uint16),
             ("dport", np.uint16), ("tcp_flags", np.uint16), ("seq", np.int64),
             ("ack", np.int64), ("window", np.uint16), ("ip_id", np.uint16),
             ("payload_len", np.int64), ("payload_off", np.int64), ("payload_cap", np.int64))


def copy_keys(batch: PacketBatch) -> np.ndarray:
    """The identity of each row as a 64-bit hash (uint64): addresses, protocol, ports, TCP
    flags, sequence and acknowledgement numbers and window, IPv4 identification, payload
    length, and the first 16 captured payload bytes (for protocols other than TCP and UDP,
    the first 16 bytes after the IP header). Copies of one packet on several interfaces
    have the same key; frame length, TTL, checksums and the overlay are left out (routing
    and encapsulation change them)."""
    if pcapcut is not None and USE_KERNEL:
        cols = tuple(np.ascontiguousarray(getattr(batch, c), dtype=t) for c, t in _KEY_COLS)
        return np.frombuffer(pcapcut.hash_keys(batch.buf, cols), dtype=np.uint64)
    n = len(batch)
    u64 = np.uint64
    words = np.empty((n, 7), dtype=u64)
    words[:, 0] = batch.src_hi
    words[:, 1] = batch.src_lo
    words[:, 2] = batch.dst_hi
    words[:, 3] = batch.dst_lo
    words[:, 4] = (batch.proto.astype(u64) | (batch.sport.astype(u64) << u64(8))
                   | (batch.dport.astype(u64) << u64(24))
                   | (batch.tcp_flags.astype(u64) << u64(40)))
    words[:, 5] = batch.seq.astype(u64) | (batch.ack.astype(u64) << u64(32))
    words[:, 6] = (batch.window.astype(u64) | (batch.ip_id.astype(u64) << u64(16))
                   | (batch.payload_len.astype(u64) << u64(32)))
    offs = batch.payload_off.astype(np.int64)
    caps = batch.payload_cap.astype(np.int64)
    h = np.full(n, _K_SEED, dtype=u64)
    for k in range(7):
        h = _kmix(h, words[:, k])
    j = np.arange(16)
    idx = np.minimum(offs[:, None] + j, batch.buf.size - 1)
    raw = np.where(j < caps[:, None], batch.buf[idx], 0).astype(np.uint8)
    pw = np.ascontiguousarray(raw).view("<u8").astype(u64)
    h = _kmix(_kmix(h, pw[:, 0]), pw[:, 1])
    h ^= h >> u64(33)
    h *= _K_FIN
    return h ^ (h >> u64(33))


@dataclass
class _CopyState:
    """What a CopyFilter remembers between batches (see :meth:`CopyFilter.mark`)."""

    clock: int = _I64_MIN
    #: Per key of a live run, sorted by key: key, time of its last row, transmissions.
    ck: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    clast: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cntx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: Per (key, interface) of those runs, sorted: occurrence number of its last row.
    cik: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    cif: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    cocc: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: The kernel's hash tables, kept between calls (see mark_copies in _pcapcut.c).
    scratch: bytearray = field(default_factory=bytearray)
    kcap: int = 0
    icap: int = 0
    epoch: int = 0


class CopyFilter:
    """Tell another interface's copy of a packet from a new packet (``tcpdump -i any``).

    Capturing on ``any``, a node records one packet once per interface it crosses: the
    sending pod's veth, the bridge, the receiving pod's veth, eth0 (decapsulated, it is the
    same packet). The rule, row by row in capture order:

    - Two rows are *the same packet* when their :func:`copy_keys` are equal (addresses,
      ports, TCP flags, sequence, acknowledgement and window, IPv4 identification, payload
      length and first payload bytes).
    - Rows of one key form a *run* while each comes at most ``window_ns`` after the key's
      previous row (measured against the capture clock, the largest timestamp so far, so
      timestamps a little out of order do not break a run).
    - Within a run, a row's *occurrence number* on its interface (SLL2 ifindex and pcapng
      interface) is how many rows of the run that interface showed before it: each
      transmission of the packet passes each interface once, so the n-th sighting on every
      interface is the n-th transmission. A row is a **copy** when another interface
      already showed that occurrence number; the first sighting of each transmission is
      the packet.

    A real retransmission is not taken for a copy: it leaves through the same interface as
    the original, so there its occurrence number is one higher, and it counts as the next
    transmission even when it follows within the window (a fast retransmit on a pod network
    comes after a few round trips of tens of µs; Linux sets a new IPv4 identification too).
    Its own copies on the other interfaces then match it, not the original. Rows of one
    interface are never copies of each other, so a capture of one interface loses nothing.

    The state (runs whose last row is within the window of the clock) carries across
    batches, and across reads when one filter is given to several (live capture chunks).
    """

    def __init__(self, window_ns: int = COPY_WINDOW_NS):
        self.window_ns = int(window_ns)
        self.state = _CopyState()

    def mark(self, batch: PacketBatch) -> np.ndarray:
        """Mask of the rows of ``batch`` that are copies (and remember the batch)."""
        n = len(batch)
        if n == 0:
            return np.zeros(0, dtype=bool)
        keys = copy_keys(batch)
        ident = (batch.iface.astype(np.uint64) << np.uint64(32)) | batch.ifindex.astype(
            np.uint64)
        ts = np.ascontiguousarray(batch.ts_ns, dtype=np.int64)
        if pcapcut is not None and USE_KERNEL:
            mask, self.state = _mark_copies_c(keys, ident, ts, self.window_ns, self.state)
        else:
            mask, self.state = _mark_copies_np(keys, ident, ts, self.window_ns, self.state)
        return mask


def _sorted_state(clock: int, ck: np.ndarray, clast: np.ndarray, cntx: np.ndarray,
                  cik: np.ndarray, cif: np.ndarray, cocc: np.ndarray) -> _CopyState:
    o = np.argsort(ck, kind="stable")
    oi = np.lexsort((cif, cik))
    return _CopyState(clock, ck[o], clast[o], cntx[o], cik[oi], cif[oi], cocc[oi])


#: Bytes of one slot of the kernel's per-key and per-(key, interface) tables.
_KENT, _IENT = 40, 32


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def _mark_copies_c(keys: np.ndarray, ident: np.ndarray, ts: np.ndarray, window: int,
                   st: _CopyState) -> tuple[np.ndarray, _CopyState]:
    n = keys.size
    kcap = max(st.kcap, _pow2(2 * (st.ck.size + n)))
    icap = max(st.icap, _pow2(2 * (st.cik.size + n)))
    scratch, epoch = st.scratch, st.epoch + 1
    if (kcap, icap) != (st.kcap, st.icap) or epoch >= 1 << 32:
        scratch, epoch = bytearray(kcap * _KENT + icap * _IENT), 1  # zeroed: no epoch yet
    mask_b, clock, *carry = pcapcut.mark_copies(
        keys, np.ascontiguousarray(ident), ts, window, st.clock, st.ck, st.clast, st.cntx,
        st.cik, st.cif, st.cocc, scratch, kcap, icap, epoch)
    types = (np.uint64, np.int64, np.int64, np.uint64, np.uint64, np.int64)
    arrs = [np.frombuffer(c, dtype=t) for c, t in zip(carry, types, strict=True)]
    state = _sorted_state(int(clock), *arrs)
    state.scratch, state.kcap, state.icap, state.epoch = scratch, kcap, icap, epoch
    return np.frombuffer(mask_b, dtype=bool), state


def _mark_copies_np(keys: np.ndarray, ident: np.ndarray, ts: np.ndarray, window: int,
                    st: _CopyState) -> tuple[np.ndarray, _CopyState]:
    """:class:`CopyFilter`'s rule over a batch at once (the kernel's ``mark_copies`` runs it
    row by row with hash tables). The carried (key, interface) entries enter as rows placed
    before the batch, at their run's last time, with their occurrence numbers."""
    n, m = keys.size, st.cik.size
    clock = np.maximum.accumulate(np.maximum(ts, st.clock))
    kpos = np.searchsorted(st.ck, st.cik)
    all_keys = np.concatenate((st.cik, keys))
    all_ts = np.concatenate((st.clast[kpos], ts))
    all_id = np.concatenate((st.cif, ident))
    all_clock = np.concatenate((np.full(m, st.clock, dtype=np.int64), clock))
    order = np.argsort(all_keys, kind="stable")  # by key, then capture order (carried first)
    ks, tss, ids, clk = all_keys[order], all_ts[order], all_id[order], all_clock[order]
    carried = order < m
    total = n + m
    first = np.ones(total, dtype=bool)
    first[1:] = ks[1:] != ks[:-1]
    gap = np.zeros(total, dtype=bool)
    gap[1:] = (clk[1:] - tss[:-1]) > window
    cid = np.cumsum(first | gap) - 1
    # Occurrence numbers: rank within (run, interface), after the carried one if any.
    occ = np.zeros(total, dtype=np.int64)
    occ[carried] = st.cocc[order[carried]]
    size = np.bincount(cid)
    multi = np.nonzero(size[cid] > 1)[0]
    if multi.size:
        o2 = multi[np.lexsort((multi, ids[multi], cid[multi]))]
        g = np.ones(o2.size, dtype=bool)
        g[1:] = (cid[o2][1:] != cid[o2][:-1]) | (ids[o2][1:] != ids[o2][:-1])
        gstart = np.maximum.accumulate(np.where(g, np.arange(o2.size), 0))
        occ[o2] = occ[o2[gstart]] + (np.arange(o2.size) - gstart)
        glast = np.ones(o2.size, dtype=bool)
        glast[:-1] = g[1:]
        last_multi = o2[glast]
    else:
        last_multi = np.zeros(0, dtype=np.int64)
    # A copy: an earlier row of its run already had its occurrence number (occurrence
    # numbers per interface count up from 0, so: the run's highest so far is >= its own).
    big = np.int64(1) << np.int64(32)
    val = cid * big + occ
    run = np.maximum.accumulate(val)
    before = np.full(total, -1, dtype=np.int64)
    before[1:] = run[:-1] - cid[1:] * big
    copy_sorted = ~carried & (before >= occ)
    mask = np.zeros(n, dtype=bool)
    mask[order[~carried] - m] = copy_sorted[~carried]
    # What to remember: runs whose last row is within the window of the clock.
    clock_end = int(all_clock.max()) if total else st.clock
    if total == 0:
        return mask, st
    last = np.ones(total, dtype=bool)
    last[:-1] = first[1:]
    li = np.nonzero(last)[0]
    keep = (clock_end - tss[li]) <= window
    li = li[keep]
    ck, clast = ks[li], tss[li]
    cntx = run[li] - cid[li] * big + 1
    kept_run = np.zeros(int(cid[-1]) + 1, dtype=bool)
    kept_run[cid[li]] = True
    single = np.nonzero(size[cid] == 1)[0]
    ent = np.concatenate((single, last_multi))
    ent = ent[kept_run[cid[ent]]]
    return mask, _sorted_state(clock_end, ck, clast, cntx, ks[ent], ids[ent], occ[ent])


def read_packets(stream: BinaryIO, origin: str, batch_bytes: int = 8 << 20,
                 stats: CaptureStats | None = None, prefetch: bool | None = None,
                 copies: CopyFilter | bool = True) -> Generator[PacketBatch, None, None]:
    """Yield the decoded IP packets of a pcap/pcapng stream, one batch per read.

    ``stats`` (optional) is filled as the read goes: counters per skip reason and warnings.
    Raises :class:`FormatError` only when the stream is not a capture at all.

    ``copies``: True (default) drops other interfaces' copies of a packet (see
    :class:`CopyFilter`; counted in ``stats.duplicate_copies``) with a filter of this read's
    own; a :class:`CopyFilter` does so with that filter, whose memory of recent packets
    carries over from read to read (give one filter to the reads of consecutive chunks of
    one capture); False keeps every record. A pcap file of a link type without interface
    identity (anything but SLL2) cannot hold copies by this rule and is not filtered.

    ``prefetch`` (default: when the compiled kernel is built) reads and decodes in a
    background thread, at most :data:`PREFETCH` batches ahead of the consumer: the reads and
    the kernel run without the GIL, so they overlap with the consumer's work on a second
    core. ``stats`` may then run ahead of the batches yielded so far; it is complete when the
    iteration ends. Batches and errors arrive exactly as without prefetching.
    """
    filt = copies if isinstance(copies, CopyFilter) else CopyFilter() if copies else None
    reader = _Reader(stream, origin, batch_bytes, filt)
    if stats is not None:
        reader.stats = stats
        stats.origin = stats.origin or origin
    if prefetch is None:
        prefetch = reader.kernel is not None
    batches = _prefetched(reader.batches()) if prefetch else reader.batches()
    for batch in batches:
        if len(batch):
            yield batch


#: Batches a prefetching read keeps ready ahead of its consumer.
PREFETCH = 2


def _prefetched(source: Iterator[PacketBatch]) -> Iterator[PacketBatch]:
    """Run ``source`` in a thread, handing its items (and its exception, if any) over."""
    q: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def put(item: tuple[int, object]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in source:
                if not put((0, batch)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((2, e))
            return
        put((1, None))

    thread = threading.Thread(target=work, name="pcap-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item  # type: ignore[misc]
            elif kind == 1:
                return
            else:
                raise item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
