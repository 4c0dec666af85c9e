"""Live packet capture on a Linux interface (or ``any``), decoded exactly like a capture file.

The capture socket is a Linux ``AF_PACKET`` socket set up the way scapy's ``L2ListenSocket``
sets one up (filter attached before the socket is bound, kernel timestamps and auxiliary
data on) with three differences a flow tool needs: ``any`` (an unbound *cooked* socket, as
``tcpdump -i any``), nanosecond kernel timestamps kept as integers, and no per-packet scapy
``Packet``: each packet is received straight into a pcap record in a flush buffer. scapy
compiles the BPF filter (through libpcap) and is imported only when a capture is opened,
so ``import observe.live`` stays cheap.

Every ``flush_every_s`` seconds (and when the buffer holds ``max_chunk_bytes``, and at the
end) the records captured since the last flush form an in-memory pcap (nanosecond
timestamps, link type of the socket) that :func:`observe.pcap.read_packets` decodes, so the
batches a live capture yields are the ones a file written by ``tcpdump -w`` on the same
traffic would give. Frame numbers continue across flushes: frame *n* is the *n*-th packet
captured, the numbering tshark shows for the pcap saved with ``save=``.

Link types written:

- Ethernet interfaces, and loopback (Linux gives loopback frames a zeroed Ethernet header):
  Ethernet (1), with the 802.1Q tag the NIC stripped put back from the kernel's auxiliary
  data, as libpcap does;
- interfaces without a link header (``tun``, WireGuard, IP-in-IP devices): raw IP (101);
- ``any`` and every other interface type: Linux cooked capture v2 (SLL2, 276), built from the
  socket address (protocol, interface index, ARPHRD type, packet type, link address). The
  kernel strips VLAN tags from cooked packets; a tag is not put back (counted in
  :attr:`LiveStats.vlan_tags_not_kept`).

On loopback every packet passes the tap twice (once leaving, once arriving); like libpcap,
the outgoing copy is dropped, here by the kernel filter (a short BPF prefix checking the
packet type and, for ``any``, the interface index), so it costs nothing.

Stopping: on ``duration_s`` (from the moment the socket is open), after ``count`` packets,
or when the ``stop`` event is set. Signals belong to the caller: :func:`stop_on_signals`
makes SIGINT/SIGTERM set the event. After a stop the socket's queue is read to the end (the
packets the kernel captured before the stop moment), then the final chunk is flushed, so
nothing captured before the signal is lost.

A BPF filter is compiled for the link type the kernel filter sees: Ethernet on Ethernet and
loopback interfaces, raw IP for cooked sockets (``any``), whose kernel filter sees the packet
from its network header; link-level primitives (``ether host``, ``vlan``) do not compile on
``any`` and are reported as a filter error.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import BinaryIO

from observe.errors import InputError
from observe.pcap import (
    LT_ETHERNET,
    LT_RAW,
    LT_SLL2,
    CaptureStats,
    CopyFilter,
    PacketBatch,
    read_packets,
)

ANY = "any"
#: libpcap's default snapshot length.
DEFAULT_SNAPLEN = 262144
#: One-line hint for a process without the capability to open a packet socket.
CAP_HINT = ("run as root, or `setcap cap_net_raw,cap_net_admin=eip $(readlink -f $(which "
            "python3))`, or in Kubernetes add the NET_RAW and NET_ADMIN capabilities to the "
            "container's securityContext")

# Linux constants (linux/if_ether.h, linux/if_packet.h, linux/filter.h, asm/socket.h).
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_ADD_MEMBERSHIP = 1
_PACKET_MR_PROMISC = 1
_PACKET_STATISTICS = 6
_PACKET_AUXDATA = 8
_SO_ATTACH_FILTER = 26
_SO_RCVBUFFORCE = 33
_SO_TIMESTAMPNS = 35  # also the cmsg type SCM_TIMESTAMPNS
_PACKET_OUTGOING = 4
_TP_STATUS_VLAN_VALID = 0x10
_TP_STATUS_VLAN_TPID_VALID = 0x40
_ETH_P_8021Q = 0x8100
_SKF_AD_OFF = 0xFFFFF000  # -0x1000 as an unsigned 32-bit BPF constant
_SKF_AD_PKTTYPE = 4
_SKF_AD_IFINDEX = 8
# ARPHRD types (linux/if_arp.h).
_ARPHRD_ETHER = 1
_ARPHRD_LOOPBACK = 772
_ARPHRD_RAW_IP = frozenset({768, 769, 776, 0xFFFE})  # IP-in-IP, IPv6-in-IPv6, SIT, NONE (tun)
# BPF opcodes and the DLTs a filter is compiled for.
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JA = 0x05
_BPF_RET_K = 0x06
_DLT_EN10MB = 1
_DLT_RAW = 12

_REC = struct.Struct("<IIII")
_SLL2 = struct.Struct(">HHIHBB8s")
_TS = struct.Struct("=qq")
_AUX = struct.Struct("=IIIHHHH")
_VLAN = struct.Struct(">HH")
_STATS = struct.Struct("=II")
_PCAP_NS_MAGIC = 0xA1B23C4D
_POLL_MS = 100  # longest wait before the stop event and the clocks are looked at again
_BURST = 512  # packets received between looks at the clocks while traffic keeps coming


@dataclass
class LiveStats:
    """Counters of one live capture (cumulative; the same object in every chunk)."""

    #: Interface as asked for (``any`` included).
    iface: str
    #: pcap link type of the records (1 Ethernet, 101 raw IP, 276 SLL2).
    linktype: int
    snaplen: int
    #: The BPF filter as given (None: none).
    bpf: str | None
    #: Packets captured: pcap records written, the last frame number handed out.
    captured: int = 0
    #: Sum of the captured packets' lengths on the wire (as in the records).
    wire_bytes: int = 0
    #: Packets longer than ``snaplen``, cut to it (the record keeps the wire length).
    truncated: int = 0
    #: Packets that passed the kernel filter, as the kernel counts them (PACKET_STATISTICS).
    kernel_received: int = 0
    #: Packets the kernel dropped because the socket's queue was full.
    kernel_dropped: int = 0
    #: Chunks yielded (flushes), the final one included.
    flushes: int = 0
    #: Packets read while draining after a stop whose kernel timestamp is after the stop.
    after_stop: int = 0
    #: Cooked (SLL2) packets whose stripped VLAN tag is not written back.
    vlan_tags_not_kept: int = 0
    #: Packets without a kernel timestamp (stamped with the clock when read).
    user_timestamps: int = 0
    #: Socket receive buffer in bytes as the kernel granted it.
    kernel_buffer: int = 0
    #: Wall-clock start and end of the capture (ns since the epoch; end 0 while running).
    started_ns: int = 0
    ended_ns: int = 0
    #: Why the capture ended: 'duration', 'count', 'stop', 'error' ('' while running).
    ended_by: str = ""
    #: What stopped the capture when ``ended_by`` is 'error' (also in ``decode.warnings``):
    #: a receive error, e.g. the interface was removed. What was captured is still flushed.
    error: str = ""
    #: What the decoder saw (non-IP frames, ...), summed over the flushes.
    decode: CaptureStats = field(default_factory=lambda: CaptureStats(origin=""))


@dataclass
class LiveChunk:
    """The packets captured between two flushes, decoded."""

    #: Decoded IP packets, as :func:`observe.pcap.read_packets` yields them (frame numbers
    #: continue across chunks). Empty when nothing was captured since the last flush.
    batches: list[PacketBatch]
    #: Packets captured in this chunk (pcap records, IP or not).
    records: int
    #: Frame number of the chunk's first record (``records`` consecutive numbers follow).
    first_frame: int
    #: Wall-clock time of the flush, ns since the epoch: the clock the kernel stamps
    #: packets with, so ``ConnectionTracker.flush(chunk.now_ns)`` times out idle flows.
    now_ns: int
    #: Why this flush happened: 'interval', 'size' (``max_chunk_bytes`` reached) or 'end'.
    reason: str
    #: True for the last chunk of the capture.
    final: bool
    stats: LiveStats


class LiveCapture:
    """An open capture socket; iterate :meth:`chunks` to capture.

    Opening checks everything that can be checked before the first packet: the interface
    exists, the process may open a packet socket, the filter compiles. Each failure raises
    :class:`~observe.errors.InputError` with a one-line message (and a hint where one helps).
    Use as a context manager, or call :meth:`close`; :meth:`chunks` closes when it ends.
    """

    def __init__(self, iface: str, *, bpf: str | None = None, duration_s: float | None = None,
                 count: int | None = None, flush_every_s: float = 5.0,
                 stop: threading.Event | None = None, snaplen: int = DEFAULT_SNAPLEN,
                 promisc: bool = False, buffer_bytes: int = 32 << 20,
                 max_chunk_bytes: int = 64 << 20, save: BinaryIO | None = None):
        if not iface:
            raise InputError("no interface given", hint="--iface NAME, or --iface any")
        if duration_s is not None and duration_s <= 0:
            raise InputError(f"capture duration must be positive, not {duration_s}")
        if count is not None and count <= 0:
            raise InputError(f"packet count must be positive, not {count}")
        if flush_every_s <= 0:
            raise InputError(f"flush interval must be positive, not {flush_every_s}")
        self.iface = iface
        self.origin = f"live:{iface}"
        # One filter for the whole capture: a packet's copy on another interface may fall
        # into the next flush.
        self._copies = CopyFilter()
        self.duration_s = duration_s
        self.count = count
        self.flush_every_s = float(flush_every_s)
        self.stop = stop if stop is not None else threading.Event()
        self.snaplen = max(int(snaplen), 64)
        self.max_chunk_bytes = max(int(max_chunk_bytes), 1 << 20)
        self.save = save
        self.cooked = iface == ANY
        self.linktype = LT_ETHERNET
        self._ifindex = {name: idx for idx, name in socket.if_nameindex()}
        if not self.cooked and iface not in self._ifindex:
            known = ", ".join(interfaces())
            raise InputError(f"no network interface {iface!r} (interfaces here: {known})",
                             origin=self.origin)
        self.sock = self._open(promisc, buffer_bytes, bpf)
        self.stats = LiveStats(iface=iface, linktype=self.linktype, snaplen=self.snaplen,
                               bpf=bpf, kernel_buffer=self.sock.getsockopt(
                                   socket.SOL_SOCKET, socket.SO_RCVBUF))
        self.stats.decode.origin = self.origin
        self.stats.started_ns = time.time_ns()
        self._t0 = time.monotonic()
        if save is not None:
            save.write(_pcap_header(self.snaplen, self.linktype))

    # -- setup ---------------------------------------------------------------------------------

    def _open(self, promisc: bool, buffer_bytes: int, bpf: str | None) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.cooked else socket.SOCK_RAW
        try:
            # Protocol 0 delivers nothing until bind(): the filter is in place before the
            # first packet. ``any`` cannot be bound (Python binds by name), so its socket
            # listens at once and what arrived before the filter is read away below.
            sock = socket.socket(socket.AF_PACKET, kind,
                                 socket.htons(_ETH_P_ALL) if self.cooked else 0)
        except PermissionError as e:
            raise InputError(f"cannot capture on {self.iface}: no permission to open a packet "
                             "socket (live capture needs CAP_NET_RAW)", origin=self.origin,
                             hint=CAP_HINT) from e
        except OSError as e:
            raise InputError(f"cannot open a packet socket for {self.iface}: {e.strerror}",
                             origin=self.origin) from e
        try:
            if self.cooked:
                self.linktype = LT_SLL2
                loop = [self._ifindex[n] for n in self._ifindex if _arphrd(n) == _ARPHRD_LOOPBACK]
                self._attach(sock, bpf, _DLT_RAW, loop)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:  # unfiltered packets queued before the filter was attached
                        sock.recv(1)
                sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _STATS.size)  # resets them
            else:
                hatype = _arphrd(self.iface)
                if hatype in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK):
                    self.linktype, dlt = LT_ETHERNET, _DLT_EN10MB
                elif hatype in _ARPHRD_RAW_IP:
                    self.linktype, dlt = LT_RAW, _DLT_RAW
                else:  # any other link layer: cooked, like libpcap
                    sock.close()
                    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
                    self.cooked = True
                    self.linktype, dlt = LT_SLL2, _DLT_RAW
                loop = [self._ifindex[self.iface]] if hatype == _ARPHRD_LOOPBACK else []
                self._attach(sock, bpf, dlt, loop)
                sock.bind((self.iface, _ETH_P_ALL))
                if promisc:
                    mreq = struct.pack("IHH8s", self._ifindex[self.iface], _PACKET_MR_PROMISC,
                                       0, b"")
                    sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, mreq)
            sock.setsockopt(_SOL_PACKET, _PACKET_AUXDATA, 1)
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, int(buffer_bytes))
            except PermissionError:  # without CAP_NET_ADMIN: up to net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(buffer_bytes))
            sock.setblocking(False)
        except InputError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            raise InputError(f"cannot capture on {self.iface}: {e.strerror or e}",
                             origin=self.origin) from e
        return sock

    def _attach(self, sock: socket.socket, bpf: str | None, dlt: int, loop: list[int]) -> None:
        """Attach the kernel filter: drop loopback's outgoing copies, then ``bpf``."""
        prog: list[tuple[int, int, int, int]] = []
        if loop:
            m = len(loop)
            # 0 ld pkttype; 1 jeq OUTGOING ? next : user; 2 ld ifindex; jeq lo_k ? ret0 : next
            # ...; ja user; ret #0; user program.
            prog.append((_BPF_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_PKTTYPE))
            prog.append((_BPF_JEQ_K, 0, m + 3, _PACKET_OUTGOING))
            prog.append((_BPF_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_IFINDEX))
            for i, idx in enumerate(loop):
                prog.append((_BPF_JEQ_K, m - i, 0, idx))
            prog.append((_BPF_JA, 0, 0, 1))
            prog.append((_BPF_RET_K, 0, 0, 0))
        if bpf is not None and bpf.strip():
            prog.extend(self._compile(bpf, dlt))
        elif prog:
            prog.append((_BPF_RET_K, 0, 0, self.snaplen + 64))
        if not prog:
            return
        import ctypes

        raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
        arr = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("HL", len(prog), ctypes.addressof(arr))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)

    def _compile(self, bpf: str, dlt: int) -> list[tuple[int, int, int, int]]:
        """The filter compiled by libpcap (through scapy) for link type ``dlt``."""
        try:
            from scapy.arch.common import compile_filter, free_filter
            from scapy.error import Scapy_Exception
        except ImportError as e:  # pragma: no cover - scapy is a dependency
            raise InputError("live capture needs scapy", hint="pip install scapy") from e
        try:
            bp = compile_filter(bpf, linktype=dlt)
        except ImportError as e:
            raise InputError(f"cannot compile the BPF filter for {self.iface}: libpcap is not "
                             "installed", origin=self.origin,
                             hint="install libpcap (Debian: apt-get install libpcap0.8)") from e
        except Scapy_Exception as e:
            msg = str(e)
            if "(" in msg and msg.endswith(")"):
                msg = msg[msg.index("(") + 1: -1]
            where = " (a cooked capture: filters see packets from the IP header)" \
                if dlt == _DLT_RAW and self.cooked else ""
            raise InputError(f"BPF filter {bpf!r} does not compile{where}: {msg}",
                             origin=self.origin) from e
        try:
            out = []
            for i in range(bp.bf_len):
                ins = bp.bf_insns[i]
                k = ins.k & 0xFFFFFFFF
                if ins.code == _BPF_RET_K and k:
                    k = self.snaplen + 64  # accept: whole packet up to the snapshot length
                out.append((int(ins.code), int(ins.jt), int(ins.jf), k))
        finally:
            free_filter(bp)
        return out

    # -- capture -------------------------------------------------------------------------------

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kernel_stats(self) -> None:
        with contextlib.suppress(OSError):
            got, dropped = _STATS.unpack(self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS,
                                                              _STATS.size))
            self.stats.kernel_received += got  # reading resets the kernel's counters
            self.stats.kernel_dropped += dropped

    def chunks(self) -> Iterator[LiveChunk]:
        """Capture until a stop condition; yield a chunk per flush, the last one ``final``."""
        try:
            yield from self._run()
        finally:
            self.close()

    def _run(self) -> Iterator[LiveChunk]:
        st = self.stats
        sock = self.sock
        recv = sock.recvmsg_into
        anc_size = socket.CMSG_SPACE(_TS.size) + socket.CMSG_SPACE(_AUX.size) + 64
        trunc = socket.MSG_TRUNC
        snap = self.snaplen
        cooked = self.cooked
        hdr = 16 + (20 if cooked else 0)
        reserve = hdr + snap + 4
        cap_bytes = max(4 << 20, 8 * reserve)
        buf = bytearray(cap_bytes)
        mv = memoryview(buf)
        pos = 0
        parts: list[bytes] = []
        held = 0  # bytes in parts
        n_chunk = 0  # records since the last flush
        pack_rec = _REC.pack_into
        pack_sll2 = _SLL2.pack_into
        unpack_ts = _TS.unpack_from
        unpack_aux = _AUX.unpack_from
        ifindex = self._ifindex
        sol_socket, sol_packet = socket.SOL_SOCKET, _SOL_PACKET
        count = self.count
        deadline = None if self.duration_s is None else self._t0 + self.duration_s
        next_flush = time.monotonic() + self.flush_every_s
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        stop_ns = 0  # set once stopping: drain only what the kernel stamped before this
        ended_by = ""

        while True:
            idle = False
            for _ in range(_BURST):
                if cap_bytes - pos < reserve:
                    parts.append(bytes(mv[:pos]))
                    held += pos
                    pos = 0
                if count is not None and st.captured >= count:
                    break
                try:
                    n, anc, _flags, addr = recv([mv[pos + hdr: pos + hdr + snap]], anc_size,
                                                trunc)
                except BlockingIOError:
                    idle = True
                    break
                except InterruptedError:
                    continue
                except OSError as e:  # e.g. the interface went away: keep what was captured
                    st.error = f"capture on {self.iface} failed: {e.strerror or e}"
                    st.decode.warnings.append(f"{self.origin}: {st.error}; stopped")
                    ended_by = "error"
                    break
                sec = nsec = -1
                wire = n
                vlan = None
                for level, kind, data in anc:
                    if level == sol_socket and kind == _SO_TIMESTAMPNS:
                        sec, nsec = unpack_ts(data)
                    elif level == sol_packet and kind == _PACKET_AUXDATA:
                        status, wire, _s, _m, _n, tci, tpid = unpack_aux(data)
                        if status & _TP_STATUS_VLAN_VALID or tci:
                            vlan = (tpid if status & _TP_STATUS_VLAN_TPID_VALID
                                    else _ETH_P_8021Q, tci)
                if sec < 0:
                    now = time.time_ns()
                    sec, nsec = divmod(now, 1_000_000_000)
                    st.user_timestamps += 1
                if stop_ns and sec * 1_000_000_000 + nsec > stop_ns:
                    st.after_stop += 1  # the queue has reached the stop moment
                    idle = True
                    break
                cap = n if n <= snap else snap
                if n > snap:
                    st.truncated += 1
                if cooked:
                    idx = ifindex.get(addr[0])
                    if idx is None:  # an interface created after the start (a new pod)
                        idx = ifindex[addr[0]] = _nametoindex(addr[0])
                    pack_sll2(buf, pos + 16, addr[1], 0, idx, addr[3], addr[2], len(addr[4]),
                              addr[4])
                    cap += 20
                    wire += 20
                    if vlan is not None:
                        st.vlan_tags_not_kept += 1
                elif vlan is not None and cap >= 12:
                    at = pos + 16 + 12
                    buf[at + 4: at + 4 + cap - 12] = buf[at: at + cap - 12]
                    _VLAN.pack_into(buf, at, *vlan)
                    cap += 4
                    wire += 4
                pack_rec(buf, pos, sec, nsec, cap, wire)
                pos += 16 + cap
                n_chunk += 1
                st.captured += 1
                st.wire_bytes += wire

            now_m = time.monotonic()
            if ended_by == "error":
                st.ended_by = ended_by
                st.ended_ns = time.time_ns()
                yield self._flush(parts, mv[:pos], n_chunk, "end", True)
                return
            if not ended_by:
                if count is not None and st.captured >= count:
                    ended_by = "count"
                elif deadline is not None and now_m >= deadline:
                    ended_by = "duration"
                elif self.stop.is_set():
                    ended_by = "stop"
                if ended_by:
                    stop_ns = time.time_ns()
                    if ended_by != "count":
                        continue  # read the queue to its end (packets stamped before now)
            if ended_by and (idle or ended_by == "count"):
                st.ended_by = ended_by
                st.ended_ns = time.time_ns()
                yield self._flush(parts, mv[:pos], n_chunk, "end", True)
                return
            if ended_by:
                continue
            if now_m >= next_flush or held + pos >= self.max_chunk_bytes:
                reason = "interval" if now_m >= next_flush else "size"
                yield self._flush(parts, mv[:pos], n_chunk, reason, False)
                parts, held, pos, n_chunk = [], 0, 0, 0
                now_m = time.monotonic()
                if reason == "interval":
                    next_flush += self.flush_every_s
                    if next_flush <= now_m:  # the caller took longer than an interval
                        next_flush = now_m + self.flush_every_s
            if idle:
                wait = next_flush - now_m
                if deadline is not None:
                    wait = min(wait, deadline - now_m)
                ms = max(0, min(_POLL_MS, int(wait * 1000) + 1))
                with contextlib.suppress(InterruptedError):
                    poller.poll(ms)

    def _flush(self, parts: list[bytes], tail: memoryview, records: int, reason: str,
               final: bool) -> LiveChunk:
        st = self.stats
        self._kernel_stats()
        first = st.captured - records + 1
        batches: list[PacketBatch] = []
        if records:
            data = b"".join([_pcap_header(self.snaplen, self.linktype), *parts, tail])
            if self.save is not None:
                try:
                    self.save.write(memoryview(data)[24:])
                except OSError as e:
                    raise InputError(f"cannot write the capture file: {e.strerror or e}",
                                     origin=self.origin) from e
            cs = CaptureStats(origin=self.origin)
            for batch in read_packets(io.BytesIO(data), self.origin, stats=cs,
                                      copies=self._copies):
                batch.frame += first - 1
                batches.append(batch)
            dec = st.decode
            dec.format = cs.format
            dec.frames += cs.frames
            dec.packets += cs.packets
            dec.skipped.update(cs.skipped)
            dec.other_blocks.update(cs.other_blocks)
            dec.warnings.extend(cs.warnings)
            if cs.frames != records or cs.stopped:
                dec.warnings.append(f"{self.origin}: flush of frames {first}-{first + records - 1}"
                                    f" decoded {cs.frames} of {records} records")
        st.flushes += 1
        return LiveChunk(batches=batches, records=records, first_frame=first,
                         now_ns=time.time_ns(), reason=reason, final=final, stats=st)


def capture_live(iface: str, *, bpf: str | None = None, duration_s: float | None = None,
                 count: int | None = None, flush_every_s: float = 5.0,
                 stop: threading.Event | None = None, snaplen: int = DEFAULT_SNAPLEN,
                 promisc: bool = False, buffer_bytes: int = 32 << 20,
                 max_chunk_bytes: int = 64 << 20, save: BinaryIO | None = None
                 ) -> Iterator[LiveChunk]:
    """Capture on ``iface`` (an interface name, or ``any``) and yield decoded chunks.

    The socket is opened (and every error about the interface, the permission or the filter
    raised, as :class:`~observe.errors.InputError`) before this returns; capturing starts
    then, and the returned iterator yields a :class:`LiveChunk` every ``flush_every_s``
    seconds (also when the packets held reach ``max_chunk_bytes``; an interval without
    packets still yields an empty chunk, so a caller can time out idle flows) and a final one
    when the capture stops: after ``duration_s`` seconds, ``count`` packets, or once ``stop``
    is set (see :func:`stop_on_signals`). All of them are optional; without any the capture
    runs until ``stop``.

    ``bpf`` is a tcpdump filter expression applied in the kernel; ``snaplen`` cuts longer
    packets (the record keeps their wire length); ``promisc`` puts a named interface in
    promiscuous mode; ``buffer_bytes`` sizes the kernel queue that holds packets while the
    caller processes a chunk; ``save`` receives the capture as a pcap file (nanosecond
    timestamps), like ``tcpdump -w``. Counters are in ``chunk.stats`` (:class:`LiveStats`).
    Closing the iterator early closes the socket.
    """
    cap = LiveCapture(iface, bpf=bpf, duration_s=duration_s, count=count,
                      flush_every_s=flush_every_s, stop=stop, snaplen=snaplen, promisc=promisc,
                      buffer_bytes=buffer_bytes, max_chunk_bytes=max_chunk_bytes, save=save)
    return cap.chunks()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event,
                    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
                    ) -> Iterator[threading.Event]:
    """While active, the first of ``signals`` sets ``stop`` (the capture then flushes what
    it holds and ends); a second one raises ``KeyboardInterrupt``. Main thread only; the
    previous handlers are restored on exit."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interfaces() -> list[str]:
    """Names of the interfaces a capture can use (``any`` last)."""
    return [*sorted(name for _, name in socket.if_nameindex()), ANY]


def _nametoindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _arphrd(name: str) -> int:
    """The interface's ARPHRD type from sysfs (-1 when unknown)."""
    try:
        with open(os.path.join("/sys/class/net", name, "type"), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def _pcap_header(snaplen: int, linktype: int) -> bytes:
    return struct.pack("<IHHiIII", _PCAP_NS_MAGIC, 2, 4, 0, 0, snaplen, linktype)
