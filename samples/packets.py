"""Packets on the wire, written as ``tcpdump -i any -s SNAPLEN -w FILE`` records them.

A small, byte-exact packet writer for the sample generators (not part of the installed
package): classic pcap with link type 276 (``LINKTYPE_LINUX_SLL2``, what libpcap >= 1.10
gives the ``any`` device), IPv4, TCP with Linux's options (MSS/SACK/timestamps/window scale on
SYNs, timestamps on every segment), UDP, and the payloads the Bookinfo traffic carries:
TLS 1.3 handshakes (ClientHello with SNI/ALPN, ServerHello, encrypted records), HTTP/1.1 in
cleartext, DNS.

Formats, from their specifications:

- pcap: the libpcap file format (tcpdump.org ``pcap-savefile``; IETF draft
  ``draft-ietf-opsawg-pcap``): 24-byte header, 16-byte record headers, microsecond times.
- SLL2: tcpdump.org ``LINKTYPE_LINUX_SLL2``: protocol type, reserved, interface index,
  ARPHRD type, packet type, address length, 8 address bytes (20 bytes).
- IPv4 RFC 791, TCP RFC 9293 (options RFC 7323, RFC 2018), UDP RFC 768, DNS RFC 1035.
- TLS 1.3 RFC 8446 (records, ClientHello/ServerHello, middlebox-compatibility
  ChangeCipherSpec, encrypted records as ``application_data`` with a 16-byte AEAD tag and
  one content-type byte), SNI RFC 6066, ALPN RFC 7301.

Large messages leave the sender as TSO/GSO super-segments (up to 45 MSS), as tcpdump shows
them on a veth; a segment longer than the snapshot length is recorded truncated (its IP
length keeps the real size) with the partial checksum offloading leaves in it.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

LINKTYPE_LINUX_SLL2 = 276
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
PACKET_HOST = 0
PACKET_OUTGOING = 4

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1460
#: Payload per full segment: MSS minus the 12 bytes of the timestamp option.
SEG = MSS - 12
#: Largest TSO/GSO super-segment a sender hands to the veth.
GSO_MAX = 45 * SEG

TLS_HANDSHAKE, TLS_CCS, TLS_ALERT, TLS_APPDATA = 22, 20, 21, 23
#: TLS 1.3 AEAD expansion per record: the inner content type byte and a 16-byte tag.
TLS13_OVERHEAD = 17
TLS_MAX_PLAIN = 16384


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ip4(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


@dataclass
class Packet:
    ts_us: int
    seq: int
    data: bytes
    """The captured bytes (at most the snapshot length)."""
    orig_len: int


@dataclass
class Endpoint:
    """One side of a conversation as the capture sees it."""

    ip: str
    ifindex: int
    """Interface index of the veth (or NIC) its packets were recorded on."""
    mac: bytes
    pkttype: int = PACKET_HOST
    """SLL2 packet type of packets this side sends (host: from a pod into its veth)."""


def mac_for(ip: str, salt: int = 0) -> bytes:
    """A stable locally administered MAC for an address."""
    r = random.Random(f"mac/{ip}/{salt}")
    return bytes([0x02 | (r.getrandbits(8) & 0xFC)] + [r.getrandbits(8) for _ in range(5)])


class PcapWriter:
    """Collects packets, then writes them in time order as one pcap file."""

    def __init__(self, snaplen: int) -> None:
        self.snaplen = snaplen
        self.packets: list[Packet] = []
        self._seq = 0

    def add(self, ts_us: int, frame: bytes, orig_len: int) -> None:
        self._seq += 1
        self.packets.append(Packet(ts_us, self._seq, frame[: self.snaplen], orig_len))

    def ip_packet(self, ts_us: int, sender: Endpoint, ip: bytes, orig_ip_len: int) -> None:
        sll2 = struct.pack("!HHIHBB8s", ETH_P_IP, 0, sender.ifindex, ARPHRD_ETHER,
                           sender.pkttype, 6, sender.mac + b"\x00\x00")
        self.add(ts_us, sll2 + ip, len(sll2) + orig_ip_len)

    def getvalue(self) -> bytes:
        out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, self.snaplen,
                           LINKTYPE_LINUX_SLL2)]
        for p in sorted(self.packets, key=lambda p: (p.ts_us, p.seq)):
            out.append(struct.pack("<IIII", p.ts_us // 1_000_000, p.ts_us % 1_000_000,
                                   len(p.data), p.orig_len))
            out.append(p.data)
        return b"".join(out)


# --- IP / TCP / UDP ------------------------------------------------------------------------


def ipv4(src: str, dst: str, proto: int, l4: bytes, l4_len: int, ident: int,
         ttl: int = 64, df: bool = True) -> tuple[bytes, int]:
    """(header + the given L4 bytes, total length on the wire)."""
    total = 20 + l4_len
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF,
                      0x4000 if df else 0, ttl, proto, 0, _ip4(src), _ip4(dst))
    hdr = hdr[:10] + struct.pack("!H", 0xFFFF - _csum(hdr)) + hdr[12:]
    return hdr + l4, total


def _l4_checksum(src: str, dst: str, proto: int, l4: bytes, l4_len: int) -> int:
    pseudo = _ip4(src) + _ip4(dst) + struct.pack("!BBH", 0, proto, l4_len)
    if len(l4) == l4_len:
        return 0xFFFF - _csum(pseudo + l4) or 0xFFFF
    # Checksum offload (CHECKSUM_PARTIAL): only the pseudo-header sum is in the packet.
    return _csum(pseudo)


@dataclass
class _Side:
    ep: Endpoint
    port: int
    isn: int
    ts_off: int
    ident: int
    nxt: int = 0
    """Next sequence number to send."""
    wscale: int = 7


@dataclass
class TcpConn:
    """One TCP connection; methods append its packets to the writer in time order."""

    w: PcapWriter
    client: Endpoint
    server: Endpoint
    cport: int
    sport: int
    rng: random.Random
    rtt_us: int = 80
    c: _Side = field(init=False)
    s: _Side = field(init=False)

    def __post_init__(self) -> None:
        r = self.rng
        self.c = _Side(self.client, self.cport, r.getrandbits(32), r.getrandbits(32),
                       r.getrandbits(16))
        self.s = _Side(self.server, self.sport, r.getrandbits(32), r.getrandbits(32),
                       r.getrandbits(16))
        self.c.nxt, self.s.nxt = self.c.isn, self.s.isn

    def _emit(self, t_us: int, frm: _Side, to: _Side, flags: int, payload: bytes = b"",
              syn_opts: bool = False) -> None:
        n = len(payload)
        tsval = (t_us // 1000 + frm.ts_off) & 0xFFFFFFFF
        tsecr = 0 if (flags & SYN and not flags & ACK) else (t_us // 1000 + to.ts_off - 1) \
            & 0xFFFFFFFF
        if syn_opts:
            opts = (struct.pack("!BBH", 2, 4, MSS) + b"\x04\x02"
                    + struct.pack("!BBII", 8, 10, tsval, tsecr) + b"\x01"
                    + struct.pack("!BBB", 3, 3, frm.wscale))
            win = 64240 if not flags & ACK else 65160
        else:
            opts = b"\x01\x01" + struct.pack("!BBII", 8, 10, tsval, tsecr)
            win = 502 if frm is self.c else 509
        if flags & RST and not flags & ACK:
            win = 0
        ack = to.nxt if flags & ACK else 0
        doff = (20 + len(opts)) // 4
        hdr = struct.pack("!HHIIBBHHH", frm.port, to.port, frm.nxt & 0xFFFFFFFF,
                          ack & 0xFFFFFFFF, doff << 4, flags, win, 0, 0) + opts
        l4_len = len(hdr) + n
        room = max(0, self.w.snaplen - 40 - len(hdr))
        whole = n <= room
        ck = _l4_checksum(frm.ep.ip, to.ep.ip, 6, hdr + payload if whole else hdr, l4_len)
        visible = hdr[:16] + struct.pack("!H", ck) + hdr[18:] + payload[:room]
        ip, total = ipv4(frm.ep.ip, to.ep.ip, 6, visible, l4_len, frm.ident)
        frm.ident += 1
        self.w.ip_packet(t_us, frm.ep, ip, total)
        frm.nxt += n + (1 if flags & (SYN | FIN) else 0)

    # -- phases --------------------------------------------------------------------------
    def handshake(self, t_us: int) -> int:
        """SYN, SYN-ACK, ACK starting at ``t_us``; returns when the client may send."""
        self._emit(t_us, self.c, self.s, SYN, syn_opts=True)
        t = t_us + self.rtt_us // 2
        self._emit(t, self.s, self.c, SYN | ACK, syn_opts=True)
        t += self.rtt_us // 2
        self._emit(t, self.c, self.s, ACK)
        return t

    def refused(self, t_us: int) -> None:
        """SYN answered by RST/ACK: nobody listens on the port."""
        self._emit(t_us, self.c, self.s, SYN, syn_opts=True)
        self.s.nxt = 0
        self._emit(t_us + self.rtt_us // 2, self.s, self.c, RST | ACK)

    def unanswered(self, t_us: int, tries: int = 3) -> None:
        """A SYN and its retransmissions (1 s, then 2 s later): nothing answers."""
        back = 1_000_000
        for i in range(tries):
            self.c.nxt = self.c.isn
            self._emit(t_us, self.c, self.s, SYN, syn_opts=True)
            t_us += back
            back *= 2
            del i

    def send(self, t_us: int, from_client: bool, data: bytes, ack_after_us: int = 40) -> int:
        """One message: GSO super-segments back to back, each ACKed by the peer (GRO).

        Returns the time of the last packet.
        """
        frm, to = (self.c, self.s) if from_client else (self.s, self.c)
        n = len(data)
        off = 0
        t = t_us
        while off < n:
            size = min(GSO_MAX, n - off)
            flags = ACK | (PSH if off + size == n else 0)
            self._emit(t, frm, to, flags, data[off : off + size])
            off += size
            t += max(1, size // 1000)  # ~8 Gbit/s on a veth
            self._emit(t + ack_after_us, to, frm, ACK)
        return t + ack_after_us

    def close(self, t_us: int, client_first: bool = True) -> int:
        """FIN, FIN-ACK, ACK (the closing side first)."""
        a, b = (self.c, self.s) if client_first else (self.s, self.c)
        self._emit(t_us, a, b, FIN | ACK)
        t = t_us + self.rtt_us // 2
        self._emit(t, b, a, FIN | ACK)
        t += self.rtt_us // 2
        self._emit(t, a, b, ACK)
        return t


def udp_exchange(w: PcapWriter, t_us: int, client: Endpoint, server: Endpoint, cport: int,
                 sport: int, query: bytes, answer: bytes, rtt_us: int, ident: int) -> None:
    """One datagram each way (a DNS lookup)."""
    for t, a, b, ap, bp, body in ((t_us, client, server, cport, sport, query),
                                  (t_us + rtt_us, server, client, sport, cport, answer)):
        hdr = struct.pack("!HHHH", ap, bp, 8 + len(body), 0)
        ck = _l4_checksum(a.ip, b.ip, 17, hdr + body, 8 + len(body))
        l4 = hdr[:6] + struct.pack("!H", ck) + body
        ip, total = ipv4(a.ip, b.ip, 17, l4, len(l4), ident, df=False)
        w.ip_packet(t, a, ip, total)
        ident += 1


# --- payloads ------------------------------------------------------------------------------


def _u8(b: bytes) -> bytes:
    return struct.pack("!B", len(b)) + b


def _u16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + _u16(body)


def _record(ctype: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", ctype, version, len(body)) + body


def _handshake(kind: int, body: bytes) -> bytes:
    return struct.pack("!B", kind) + struct.pack("!I", len(body))[1:] + body


#: BoringSSL's default client cipher list (TLS 1.3 suites, then ECDHE with AES-GCM/ChaCha).
CLIENT_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)
SIG_ALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def client_hello(rng: random.Random, sni: str | None, alpn: tuple[str, ...]) -> bytes:
    """A TLS 1.3 ClientHello record (legacy version TLS 1.2, middlebox-compatibility session
    id, x25519 key share)."""
    exts = b""
    if sni:
        name = sni.encode()
        exts += _ext(0, _u16(b"\x00" + _u16(name)))
    exts += _ext(23, b"")  # extended_master_secret
    exts += _ext(0xFF01, b"\x00")  # renegotiation_info
    exts += _ext(10, _u16(struct.pack("!HHH", 29, 23, 24)))  # supported_groups
    exts += _ext(11, b"\x01\x00")  # ec_point_formats
    exts += _ext(35, b"")  # session_ticket
    if alpn:
        exts += _ext(16, _u16(b"".join(_u8(a.encode()) for a in alpn)))
    exts += _ext(13, _u16(b"".join(struct.pack("!H", s) for s in SIG_ALGS)))
    exts += _ext(51, _u16(struct.pack("!H", 29) + _u16(rng.randbytes(32))))  # key_share
    exts += _ext(45, b"\x01\x01")  # psk_key_exchange_modes: psk_dhe_ke
    exts += _ext(43, _u8(struct.pack("!HH", 0x0304, 0x0303)))  # supported_versions
    body = (struct.pack("!H", 0x0303) + rng.randbytes(32) + _u8(rng.randbytes(32))
            + _u16(b"".join(struct.pack("!H", s) for s in CLIENT_SUITES)) + b"\x01\x00"
            + _u16(exts))
    return _record(TLS_HANDSHAKE, _handshake(1, body), version=0x0301)


def server_hello(rng: random.Random, session_id: bytes) -> bytes:
    """ServerHello choosing TLS 1.3 / TLS_AES_128_GCM_SHA256 / x25519, then the
    compatibility ChangeCipherSpec."""
    exts = (_ext(43, struct.pack("!H", 0x0304))
            + _ext(51, struct.pack("!H", 29) + _u16(rng.randbytes(32))))
    body = (struct.pack("!H", 0x0303) + rng.randbytes(32) + _u8(session_id)
            + struct.pack("!HB", 0x1301, 0) + _u16(exts))
    return _record(TLS_HANDSHAKE, _handshake(2, body)) + _record(TLS_CCS, b"\x01")


def session_id_of(hello: bytes) -> bytes:
    """The legacy session id of a ClientHello record (the server echoes it)."""
    n = hello[43]
    return hello[44 : 44 + n]


class Keystream:
    """Stand-in ciphertext: slices of one random block at random offsets.

    The capture has no keys, so only the sizes of encrypted records carry information; drawing
    every record from one 4 KiB block (within gzip's 32 KiB window) lets the compressed
    sample stay small while each record still looks random on its own.
    """

    SIZE = 4096

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.block = rng.randbytes(self.SIZE) * 2

    def take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            off = self.rng.randrange(self.SIZE)
            out += self.block[off : off + min(self.SIZE, n - len(out))]
        return bytes(out)


def encrypted(keys: Keystream, plain_len: int) -> bytes:
    """TLS 1.3 records carrying ``plain_len`` bytes (outer type ``application_data``, 16 KiB
    of plaintext per record at most, each with the AEAD tag and inner type byte)."""
    out = bytearray()
    left = plain_len
    while True:
        chunk = min(left, TLS_MAX_PLAIN)
        out += _record(TLS_APPDATA, keys.take(chunk + TLS13_OVERHEAD))
        left -= chunk
        if left <= 0:
            return bytes(out)


def dns_query(ident: int, name: str, qtype: int = 1) -> bytes:
    q = b"".join(_u8(p.encode()) for p in name.rstrip(".").split(".")) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def dns_answer(query: bytes, addr: str, ttl: int) -> bytes:
    """The response to ``query``: the question echoed, one A record (name by pointer)."""
    ident = query[:2]
    question = query[12:]
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + _ip4(addr)
    return ident + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + rr
