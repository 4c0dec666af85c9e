"""eBPF connection tracing: the kernel's TCP state changes -> connection flow records.

Front end: Debian's ``bpftrace``, run as a subprocess. Chosen over BCC's Python bindings
because bpftrace compiles with its own embedded LLVM and reads struct layouts from the
kernel's BTF (no kernel headers and no compiler on the node, one package, a small image),
and a subprocess keeps a crashing or slow tracer out of meshwright's process. The program
text is built by :func:`program` (not a ``.bt`` file): the parser below reads exactly the
lines it prints (both come from one layout table, :data:`SIDE`), so the two are versioned
together, and nothing has to be installed as package data.

What the program does (all in the kernel, one record per connection):

- ``tracepoint:sock:inet_sock_set_state`` (stable since Linux 4.16), TCP only. ``SYN_SENT``
  is a client's ``connect()`` and runs in the caller's context: pid, comm and cgroup id are
  the client's. A listener's child entering ``SYN_RECV`` is a server connection; it runs in
  softirq context (on loopback: the *client's* process), so the server process is taken from
  the ``accept()``/``accept4()`` syscall exit instead (the returned fd -> ``struct socket`` ->
  ``struct sock``). Each state is OR-ed into a per-socket bit set, so the path is known
  at close without one line per change.
- Both ends on this machine (loopback, pods on the same node): when a server socket becomes
  ESTABLISHED, the client socket with the mirrored 4-tuple is looked up in a map the
  clients fill at their own ESTABLISHED (for loopback addresses the key also holds the
  network namespace, since every pod has its own 127.0.0.1). The two sockets are paired:
  the first to close leaves its close-time values in a map and records nothing, the second
  records ONE entry with both sides: half the records, and half of bpftrace's and
  meshwright's work, for such connections. Unpaired sockets (the peer on another machine,
  or reached through a service IP that NAT rewrote) record their side alone at close.
- A socket's fields at close: role, state bits, last state, ``sk_err`` (``ECONNREFUSED``
  tells a refused attempt from one that got no answer), start/end times, process, and the
  byte counters the kernel keeps in ``struct tcp_sock`` (read through BTF): ``bytes_acked``
  (sent and acknowledged) and ``bytes_received``. Both count sequence space, so the SYN
  (client side) and FIN are taken off: the FIN received when the socket has ``SOCK_DONE``,
  the FIN sent when one was sent and everything is acknowledged.
- Records are not printed one by one: a close writes its record (:data:`RECORD`) into one
  of :data:`ROTATION` BPF hash maps, and a tick every :data:`TICK_MS` ms prints and clears
  the map retired two ticks before (``print()``/``clear()``), then an ``E`` line with the
  tick's time. A ``printf`` per connection cost bpftrace a perf-buffer wake-up, a
  formatting pass and a write per event (about 20 us; 4.1 % of a core at 2,000
  connections/s); a map printed in bulk costs it about a third of that (measured, see
  benchmarks/RESULTS.md). Each write is also counted (``@Na = count()``...): a record that
  did not fit in a full map (more than ``map_keys`` closes in one tick) is counted lost.
  The maps are only safe to clear if bpftrace clears them within a tick; the parser
  times each ``E`` line and counts ticks read later than that (:attr:`TraceStats.late_ticks`).
  The parser reads a burst of entries in bulk with Arrow (split, cast), no Python per
  record. Addresses are raw integers, formatted once per distinct address.
- When the tracer stops, bpftrace prints its maps: connections established and still open
  become records with ``tcp_end`` ``open`` (no byte counts: nothing read them); a paired
  socket that closed while its peer is still open becomes its closed record.

What is and is not known:

- Known: both endpoints and ports, client or server side, established / refused / no answer,
  how it ended (FIN, RST, timeout), duration, payload bytes each way (exact on loopback;
  ``bytes_acked`` leaves out what was sent but never acknowledged), the local process
  (pid, comm) and, from its cgroup, container and pod UID.
- Not known: the payload. Whether a connection carried TLS needs the first bytes written:
  a kprobe/fentry on ``tcp_sendmsg``, or the raw arguments (the ``msghdr``) of the
  ``tcp:tcp_sendmsg_locked`` tracepoint (Linux 6.10+; its tracepoint fields hold only the
  skb, before the data is copied in). The development kernel has neither kprobes nor
  fentry ("kfunc/kretfunc not available") and bpftrace 0.17 rejects raw tracepoints
  ("Invalid probe type"); the syscall tracepoints on ``write``/``writev``/``sendto``/
  ``sendmsg`` would work but run for every write on the node, files and pipes included:
  measured, +0.7 us per ``write()`` just to find the socket behind the fd. So ``mtls`` is
  ``unknown`` on every eBPF record. Connections already open when the tracer started are
  reported at close as ``midstream`` (their side guessed from the ephemeral port range);
  connections accepted through io_uring carry no server process. Without kernel BTF the
  program runs in a reduced form: no byte counts, refused and unanswered attempts are both
  ``no-answer``, servers carry no process, and local pairs are not joined (two lines),
  said once in :attr:`TraceStats.notes`. A command name holding a newline breaks its
  line: counted as malformed.

Records are ``kind`` ``connection``, ``source`` ``ebpf``, ``origin`` ``ebpf:<node>:event <n>``
(the n-th line the tracer printed). ``direction`` is ``outbound`` for the client's socket,
``inbound`` for the server's. The record format is one record per socket, as before the
pairing: a connection between two local processes gives both an outbound and an inbound
record (each with its own process, container and pod, so both pods are attributed and
``learn`` sees each side as it would from two nodes); a pair record is expanded into the
two, which then share their ``origin``. The reduced program (no BTF) prints one
fixed-layout line per socket (``N4``/``N6``, numbers in fixed-width hex) instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from observe.cgroup import ContainerRef, ProcessCgroups, pods_by_uid
from observe.errors import InputError
from observe.inventory import Inventory
from observe.schema import FLOW_SCHEMA, KIND_CONNECTION, conform

log = logging.getLogger(__name__)

SOURCE_EBPF = "ebpf"
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")
TRACEPOINT = "sock/inet_sock_set_state"
#: Entries per bpftrace map (connections open at once); bpftrace's default is 4096.
MAP_KEYS = 65536
#: Pipe size asked for bpftrace's output, and the pause between reads (the pipe holds
#: about 2 s of output at 2,000 local connections/s, so a 0.5 s pause never blocks
#: bpftrace; reads of a quarter pipe or more are not followed by a pause).
PIPE_BYTES = 1 << 20
READ_PAUSE_S = 0.5
INSTALL_HINT = "install bpftrace (Debian/Ubuntu: apt-get install bpftrace)"

# TCP states (include/net/tcp_states.h).
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, \
    LAST_ACK, LISTEN, CLOSING = range(1, 12)
ROLE_CLIENT, ROLE_SERVER = 1, 2
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF, CAP_SYS_RESOURCE = 21, 38, 39, 24

# -- the program -----------------------------------------------------------------------------

#: One socket's fields on an output line, in order: (name, width). ``comm`` is printed with
#: ``%-16s`` (bpftrace strings hold 15 bytes here), every other field in fixed-width hex.
#: ``word`` packs the small fields, see :data:`WORD`.
SIDE: tuple[tuple[str, int], ...] = (
    ("word", 8), ("start", 16), ("end", 16), ("pid", 8), ("cgroup", 16), ("acked", 16),
    ("rcvd", 16), ("comm", 16))
#: ``word`` bits: role (1 client, 2 server, 0 unknown: open before tracing), ``extra`` (bit
#: 0 SOCK_DONE: the peer's FIN came; bit 1 everything sent is acknowledged), the last state
#: before CLOSE, ``sk_err`` (low 8 bits), the set of states passed (bit n = state n), and
#: ``nokernel`` (the reduced program: no kernel reads, err/extra/bytes meaningless).
WORD = {"role": (0, 2), "extra": (2, 2), "last": (4, 4), "err": (8, 8), "bits": (16, 12),
        "nokernel": (28, 1)}
#: Addresses and ports of a reduced line: each address as ntop() text, ``ports`` = sport << 16
#: | dport. Local first (the socket that printed the line).
ADDRT: tuple[tuple[str, int], ...] = (("stext", 39), ("dtext", 39), ("ports", 8))
#: Printed line kinds (the reduced program, no BTF: one line per socket, addresses as
#: bpftrace's ntop() text, padded): prefix -> fields after it.
LAYOUTS: dict[bytes, tuple[tuple[str, int], ...]] = {
    b"N4": ADDRT + SIDE,
    b"N6": ADDRT + SIDE,
}
#: A connection record of the BTF program, the value of a rotation map entry (key: the
#: close time and the CPU): integers, then the peer's command name and the socket's own.
#: Addresses: IPv6 as two 64-bit halves (``hi`` bytes 0-7, ``lo`` 8-15, each read little-endian),
#: IPv4 as ``lo`` = its 4 bytes read little-endian and ``hi`` 0; ``ports`` = sport << 16 | dport
#: | v6 << 32, ``wordpid`` = ``word`` | pid << 32. The ``*2`` fields are a local pair's other
#: socket (its ``wordpid2`` 0: no peer), its addresses being the mirror image.
RECORD: tuple[str, ...] = (
    "shi", "slo", "dhi", "dlo", "ports", "wordpid", "start", "cgroup", "acked", "rcvd",
    "wordpid2", "start2", "end2", "cgroup2", "acked2", "rcvd2")
#: Records go into one of ``ROTATION`` maps (``@Ra``, ``@Rb``, ...; ``@Na``... count the
#: writes), the current one chosen by ``@ep``, which a tick every ``TICK_MS`` advances; the
#: tick prints and clears the map retired two ticks ago, so a writer still busy with its
#: record (it read ``@ep`` before the tick) has a whole tick to finish, and bpftrace has a
#: whole tick to clear it before writers come back to it.
ROTATION = 4
ROTATION_MAPS = "abcd"
TICK_MS = 500
#: Fields printed as padded text (``%-Ns``), not hex.
TEXT_FIELDS = frozenset({"comm", "comm2", "stext", "dtext"})


def _fmt(prefix: bytes) -> str:
    fields = LAYOUTS[prefix]
    body = "".join(f" %-{w}s" if n in TEXT_FIELDS else f" %0{w}llx" for n, w in fields)
    return f'"{prefix.decode()}{body}\\n"'


def _addresses(btf: bool) -> str:
    """bpftrace statements setting $v6, $sh, $sl, $dh, $dl (see :data:`RECORD`) and $pt.

    With BTF from ``struct sock`` (the tracepoint's own source). Without BTF only $pt: the
    reduced program prints ``ntop()`` text (reading the tracepoint's IPv6 byte arrays one
    by one makes LLVM merge the loads into an offset context pointer, which the verifier
    refuses)."""
    if btf:
        c = "((struct sock *)$sk)->__sk_common"
        v6 = [f"(uint64){c}.skc_v6_{'rcv_saddr' if s else 'daddr'}.in6_u.u6_addr32[{i}]"
              for s in (1, 0) for i in range(4)]
        body = f"""
    if (args->family == 10) {{
      $v6 = (uint64)1;
      $sh = {v6[0]} | ({v6[1]} << 32);
      $sl = {v6[2]} | ({v6[3]} << 32);
      $dh = {v6[4]} | ({v6[5]} << 32);
      $dl = {v6[6]} | ({v6[7]} << 32);
    }} else {{
      $v6 = (uint64)0; $sh = (uint64)0; $dh = (uint64)0;
      $sl = (uint64){c}.skc_rcv_saddr; $dl = (uint64){c}.skc_daddr;
    }}"""
    else:
        body = ""
    return body + """
    $pt = ((uint64)args->sport << 16) | (uint64)args->dport;"""


# The pairing key's namespace part: the netns inode for loopback addresses (127/8, ::1,
# ::ffff:127/104), else 0 (pod and node addresses are unique on a node; their two ends are
# in different namespaces).
_NETNS = """
      $ns = (uint64)0;
      if (($v6 == 0 && ($sl & 0xff) == 127) || ($v6 == 1 && $sh == 0 &&
          ($sl == 0x0100000000000000 || (($sl & 0xffffffff) == 0xffff0000 &&
                                         (($sl >> 32) & 0xff) == 127)))) {
        $ns = (uint64)((struct sock *)$sk)->__sk_common.skc_net.net->ns.inum;
      }"""
_PAIR = _NETNS + """
      if (@r[$sk] == 1) {
        @e[$sh, $sl, $dh, $dl, $pt | ($v6 << 32), $ns] = $sk;
      } else {
        $c = @e[$dh, $dl, $sh, $sl, (((uint64)args->dport << 16) | (uint64)args->sport)
                | ($v6 << 32), $ns];
        if ($c) {
          @q[$sk] = $c; @q[$c] = $sk;
          delete(@e[$dh, $dl, $sh, $sl, (((uint64)args->dport << 16) | (uint64)args->sport)
                    | ($v6 << 32), $ns]);
        }
      }"""
_SIDE_ARGS = "$w, @t[$sk], nsecs, @p[$sk], @g[$sk], $acked, $rcvd, @m[$sk]"
_FORGET = ("delete(@t[{k}]); delete(@r[{k}]); delete(@p[{k}]); delete(@g[{k}]); "
           "delete(@m[{k}]); delete(@f[{k}]); delete(@a[{k}]); delete(@q[{k}]); "
           "delete(@w[{k}]); delete(@wm[{k}]);")
# A paired socket closing leaves all its fields (and its own address, last) under its PEER's
# address (@w, @wm): the peer is still open, so no new socket can have that address (its own
# could: the kernel frees a socket at close and may reuse the memory at once). It then
# looks for its peer's fields under its own address: found, it records the pair. Writing
# before looking means two sockets closing at the same moment on two CPUs cannot both miss
# each other (both may record it: the parser drops the second copy); a stale entry left for a
# reused address names another peer and is ignored.
_CLOSE_PAIRED = """
    $now = nsecs;
    $keep = 1;
    $p0 = (uint64)0; $p1 = (uint64)0; $p2 = (uint64)0; $p3 = (uint64)0; $p4 = (uint64)0;
    $p5 = (uint64)0;
    $q = @q[$sk];
    if ($q) {
      if (@w[$sk].7 != $q) {
        @w[$q] = ($w, @t[$sk], $now, @p[$sk], @g[$sk], $acked, $rcvd, $sk);
        @wm[$q] = @m[$sk];
      }
      if (@w[$sk].7 == $q) {
        $p0 = @w[$sk].0 | (@w[$sk].3 << 32); $p1 = @w[$sk].1; $p2 = @w[$sk].2;
        $p3 = @w[$sk].4; $p4 = @w[$sk].5; $p5 = @w[$sk].6;
      } else {
        $keep = 0;
      }
    } else {
      if (@r[$sk] == 1) {%(NETNS)s
        delete(@e[$sh, $sl, $dh, $dl, $pt | ($v6 << 32), $ns]);
      }
    }
    if ($keep) {
      $slot = @ep %% %(ROTATION)d;
%(STORE_RECORD)s
    }"""
_RECORD_VALUE = ("($sh, $sl, $dh, $dl, $pt | ($v6 << 32), $w | (@p[$sk] << 32), @t[$sk], "
                 "@g[$sk], $acked, $rcvd, $p0, $p1, $p2, $p3, $p4, $p5, @wm[$sk], @m[$sk])")


def _store_record() -> str:
    """The close handler's write of a record into the current rotation map."""
    out = []
    for i, letter in enumerate(ROTATION_MAPS):
        test = "if" if i == 0 else "} else if"
        out.append(f"      {test} ($slot == {i}) {{\n"
                   f"        @R{letter}[$now, cpu] = {_RECORD_VALUE};\n"
                   f"        @N{letter} = count();")
    return "\n".join(out) + "\n      }"


def _rotate() -> str:
    """The tick: move writers to the next map, print and empty the one retired two ticks
    ago (no writer can still be writing to it), then the end marker."""
    out = [f"interval:ms:{TICK_MS}", "{", "  @ep = @ep + 1;", "  $now = nsecs;",
           f"  $old = (@ep + {ROTATION - 2}) % {ROTATION};"]
    for i, letter in enumerate(ROTATION_MAPS):
        test = "if" if i == 0 else "} else if"
        out.append(f"  {test} ($old == {i}) {{\n"
                   f"    print(@R{letter}); print(@N{letter}); "
                   f"clear(@R{letter}); clear(@N{letter});")
    out += ["  }", '  printf("E %016llx\\n", $now);', "}"]
    return "\n".join(out)


_PRINT_N = """if (args->family == 10) {
        printf(%(N6)s, ntop(args->saddr_v6), ntop(args->daddr_v6), $pt, %(SIDE)s);
      } else { printf(%(N4)s, ntop(args->saddr), ntop(args->daddr), $pt, %(SIDE)s); }"""
_STORE_BTF = "@a[$sk] = ($sh, $sl, $dh, $dl, $pt | ($v6 << 32));"
_STORE_NONE = """if (args->family == 10) {
        @sa[$sk] = ntop(args->saddr_v6); @da[$sk] = ntop(args->daddr_v6);
      } else { @sa[$sk] = ntop(args->saddr); @da[$sk] = ntop(args->daddr); }
      @pt[$sk] = $pt;"""
_PROGRAM_TEMPLATE = """
BEGIN { printf("R\\n"); }
tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = (uint64)args->skaddr;
  $old = args->oldstate;
  $new = args->newstate;
  if ($new == 2) {
    @t[$sk] = nsecs; @r[$sk] = 1; @p[$sk] = pid; @g[$sk] = cgroup; @m[$sk] = comm;
    @f[$sk] = 4;
  } else if ($old == 10) {
    if ($new == 3) { @t[$sk] = nsecs; @r[$sk] = 2; @f[$sk] = 8; }
  } else if (@r[$sk]) {
    @f[$sk] = @f[$sk] | (1 << $new);
    if ($new == 1) {%(ADDRESSES)s
      %(STORE)s%(PAIR)s
    }
  }
  if ($new == 7 && $old != 10) {
    %(KERNEL_READS)s%(ADDRESSES)s
    $w = @r[$sk] | ($x << 2) | ($old << 4) | (($err & 0xff) << 8) | (@f[$sk] << 16);
    %(CLOSE)s
    %(FORGET)s
  }
}
%(ACCEPT)s
END { %(END)s }
"""
_KERNEL_READS_BTF = """$s = (struct sock *)$sk;
    $tp = (struct tcp_sock *)$sk;
    $err = (uint64)$s->sk_err;
    $acked = $tp->bytes_acked;
    $rcvd = $tp->bytes_received;
    $x = (uint64)(((%(SK_FLAGS)s >> 1) & 1) | ($tp->snd_una == $tp->write_seq ? 2 : 0));"""
_KERNEL_READS_NONE = ("$err = (uint64)0; $acked = (uint64)0; $rcvd = (uint64)0; "
                      "$x = (uint64)0; $nokernel = (uint64)1 << 28;")
_ACCEPT_BTF = """
tracepoint:syscalls:sys_exit_accept4, tracepoint:syscalls:sys_exit_accept
/args->ret >= 0/
{
  $file = *(curtask->files->fdt->fd + args->ret);
  $sk = (uint64)((struct socket *)$file->private_data)->sk;
  if (@r[$sk] == 2) { @p[$sk] = pid; @g[$sk] = cgroup; @m[$sk] = comm; }
}
"""


#: Where ``struct sock`` keeps its flags: ``sk_flags`` until Linux moved it into
#: ``struct sock_common`` (a ``#define`` for C, a real path for BTF).
SK_FLAGS_OLD, SK_FLAGS_NEW = "$s->sk_flags", "$s->__sk_common.skc_flags"


def program(*, btf: bool = True, sk_flags: str = SK_FLAGS_NEW) -> str:
    """The bpftrace program; ``btf=False`` is the reduced form for kernels without BTF,
    ``sk_flags`` the expression reading ``struct sock``'s flags (:func:`sk_flags_field`)."""
    fmts = {k.decode(): _fmt(k) for k in LAYOUTS}
    if btf:
        close = _CLOSE_PAIRED % {"ROTATION": ROTATION, "STORE_RECORD": _store_record(),
                                 "NETNS": _NETNS.replace("\n      ", "\n          ")}
        reads = _KERNEL_READS_BTF % {"SK_FLAGS": sk_flags}
        pair = _PAIR
    else:
        close, pair = _PRINT_N % {**fmts, "SIDE": _SIDE_ARGS}, ""
        reads = _KERNEL_READS_NONE
    text = _PROGRAM_TEMPLATE % {
        "ADDRESSES": _addresses(btf),
        "STORE": _STORE_BTF if btf else _addresses(False) + "\n      " + _STORE_NONE,
        "PAIR": pair,
        "KERNEL_READS": reads,
        "CLOSE": close,
        "FORGET": _FORGET.format(k="$sk"),
        "ACCEPT": _ACCEPT_BTF + "\n" + _rotate() if btf else "",
        "END": "clear(@e); clear(@f); clear(@q); clear(@ep);" if btf else "clear(@f);",
    }
    if not btf:
        text = text.replace("(($err & 0xff) << 8)", "(($err & 0xff) << 8) | $nokernel")
        text = text.replace("delete(@a[$sk]); delete(@q[$sk]); delete(@w[$sk]); "
                            "delete(@wm[$sk]);",
                            "delete(@sa[$sk]); delete(@da[$sk]); delete(@pt[$sk]);")
    return text


def sk_flags_field(bpftrace: str = "bpftrace") -> str:
    """The expression for this kernel's ``struct sock`` flags, from bpftrace's BTF listing."""
    try:
        listing = subprocess.run([bpftrace, "-lv", "struct sock"], capture_output=True,
                                 timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return SK_FLAGS_NEW
    return SK_FLAGS_OLD if re.search(rb"\bsk_flags;", listing) else SK_FLAGS_NEW


#: The program as run on kernels with BTF (recent layout).
PROGRAM = program(btf=True)

ECONNREFUSED, ETIMEDOUT, ECONNRESET, EPIPE = (errno.ECONNREFUSED, errno.ETIMEDOUT,
                                              errno.ECONNRESET, errno.EPIPE)
_LOST_TEXT = re.compile(rb"Lost (\d+) events")
_REFUSED_BY_KERNEL = re.compile(
    r"(Error loading program|Error attaching probe|Failed to attach|failed to load|"
    r"Operation not permitted|Permission denied|Invalid argument|verifier)", re.I)


class KernelRefused(InputError):
    """The kernel refused to load or attach the tracer's program (its reason in the text)."""


@dataclass
class TraceStats:
    """What the tracer saw, for the observe summary."""

    lines: int = 0
    """Lines the tracer printed (not counting blank ones)."""
    events: int = 0
    """Connection records read (one per closed socket, or per local pair of sockets)."""
    pairs: int = 0
    """Connection records holding both ends of a local connection (two flow records each)."""
    duplicates: int = 0
    """Second copies of a pair record (both sockets closed at once), dropped."""
    connections: int = 0
    """Connection records produced (closed and still open at the stop)."""
    refused: int = 0
    """Attempts refused (SYN answered by RST)."""
    no_answer: int = 0
    """Attempts never answered (timed out or abandoned)."""
    midstream: int = 0
    """Connections already open when tracing began (seen only at their close)."""
    open_at_stop: int = 0
    """Connections established and still open when the tracer stopped."""
    pending_at_stop: int = 0
    """Sockets still connecting when the tracer stopped (no record: no addresses yet)."""
    lost: int = 0
    """Connections not reported: events the kernel dropped (bpftrace's "Lost N events"),
    records that did not fit in a full rotation map."""
    late_ticks: int = 0
    """Ticks whose output was read over a second late: records may be lost uncounted."""
    malformed: int = 0
    """Lines that were not what the program prints (counted, skipped)."""
    attributed: int = 0
    """Records whose local process was placed in a container."""
    pods: int = 0
    """Records whose local pod was found in the inventory."""
    notes: list[str] = field(default_factory=list)
    """Things said once: reduced program, mounted tracefs, bpftrace's warnings."""


# -- set-up ---------------------------------------------------------------------------------


def _cap_eff() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def tracing_dir() -> Path | None:
    """The mounted tracefs holding the tracepoint, or None."""
    for base in (TRACEFS, DEBUGFS_TRACING):
        if (base / "events" / TRACEPOINT).is_dir():
            return base
    return None


def mount_tracefs(target: Path = TRACEFS) -> str | None:
    """Mount tracefs at ``target``; None on success, else the reason (errno text)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", str(target).encode(), b"tracefs", 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def check_setup(*, bpftrace: str = "bpftrace", mount: bool = True,
                notes: list[str] | None = None) -> list[str]:
    """Problems that stop the tracer, one actionable line each (empty: ready).

    Checks bpftrace, privileges (root with CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN), the
    tracepoint in a mounted tracefs (mounted at /sys/kernel/tracing when missing and
    ``mount``), RLIMIT_MEMLOCK on kernels that charge BPF maps to it (before 5.11). A missing
    BTF is not a problem (the reduced program runs) but a note in ``notes``, as is a mount.
    """
    problems: list[str] = []
    notes = notes if notes is not None else []
    if shutil.which(bpftrace) is None:
        problems.append(f"{bpftrace} not found on PATH: {INSTALL_HINT}")
    caps = _cap_eff()

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    if os.geteuid() != 0:
        problems.append("not root: bpftrace runs as uid 0 (in a pod: runAsUser: 0 with "
                        "CAP_BPF and CAP_PERFMON)")
    elif not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
        problems.append("missing capabilities: need CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN "
                        "before Linux 5.8); add them to the container's securityContext")
    if tracing_dir() is None:
        mounted = (TRACEFS / "events").is_dir() or (DEBUGFS_TRACING / "events").is_dir()
        reason = "mounting not attempted"
        if not mounted and mount and TRACEFS.is_dir():
            failed = mount_tracefs(TRACEFS)
            if failed is None:
                notes.append(f"mounted tracefs at {TRACEFS}")
                mounted = True
            else:
                reason = f"mounting it failed: {failed}"
        if not mounted:
            problems.append(f"tracefs is not mounted ({reason}): run `mount -t tracefs nodev "
                            f"{TRACEFS}` as root, or mount the host's {TRACEFS} into the pod")
        elif tracing_dir() is None:
            problems.append(f"tracepoint {TRACEPOINT} missing: needs Linux 4.16 or later")
    if not BTF.exists():
        notes.append(f"no kernel BTF at {BTF}: byte counts, refused-vs-unanswered and server "
                     "processes are not available (kernel needs CONFIG_DEBUG_INFO_BTF=y)")
    if _kernel_version() < (5, 11):
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        need = 64 << 20
        if soft != resource.RLIM_INFINITY and soft < need and not has(CAP_SYS_RESOURCE) and (
                hard != resource.RLIM_INFINITY and hard < need):
            problems.append(f"RLIMIT_MEMLOCK is {soft >> 10} KiB and this kernel (before 5.11) "
                            "charges BPF maps to it: raise it (ulimit -l unlimited) or grant "
                            "CAP_SYS_RESOURCE")
    return problems


def require_setup(*, bpftrace: str = "bpftrace", mount: bool = True,
                  notes: list[str] | None = None) -> None:
    """Raise :class:`InputError` (first problem, the others as hint) unless ready."""
    problems = check_setup(bpftrace=bpftrace, mount=mount, notes=notes)
    if problems:
        raise InputError(problems[0], origin="ebpf",
                         hint="; ".join(problems[1:]) or None)


# -- parsing --------------------------------------------------------------------------------

_ROW_KEYS = (
    "time", "duration_ms", "src_ip", "src_port", "dst_ip", "dst_port", "direction",
    "reporter", "bytes_in", "bytes_out", "origin", "tcp_state", "tcp_end", "pid", "comm",
    "container_id", "pod_uid",
)
#: Columns with one value on every eBPF record (built once per batch, not per row).
_CONSTANT = {"transport": "tcp", "protocol": "tcp", "mtls": "unknown", "source": SOURCE_EBPF,
             "kind": KIND_CONNECTION, "denied": False}
#: Per-socket columns decoded from a line (one side of it), see ``TraceParser._add``.
_SOCK_KEYS = ("line", "num", "dump", "word", "start", "end", "pid", "cgroup", "acked", "rcvd",
              "comm", "v6", "lhi", "llo", "rhi", "rlo", "lport", "rport", "open")
_U64 = (1 << 64) - 1
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
_TICK_LINE = re.compile(rb"E ([0-9a-f]{16})")
_COUNT_LINE = re.compile(rb"@N[a-z]: (\d+)")
#: A tick read later than this after it happened: bpftrace may have cleared a rotation map
#: after writers came back to it (see :data:`ROTATION`), losing records uncounted.
LATE_TICK_NS = (ROTATION - 2) * TICK_MS * 1_000_000
_MAP_LINE = re.compile(rb"@(\w+)\[(-?\d+)\]: (.*?)(?=@\w+\[-?\d+\]: |$)", re.S)


def _offsets(fields: tuple[tuple[str, int], ...]) -> dict[str, tuple[int, int]]:
    out, pos = {}, 2
    for name, width in fields:
        out[name] = (pos + 1, pos + 1 + width)
        pos += 1 + width
    return out


_CUTS = {k: (_offsets(v), 2 + sum(1 + w for _, w in v)) for k, v in LAYOUTS.items()}


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The local port range the kernel picks client ports from."""
    try:
        lo, hi = Path(path).read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _ip(text: str) -> str:
    # An IPv6 socket talking IPv4 shows ::ffff:a.b.c.d; packet evidence shows a.b.c.d.
    return text[7:] if text.startswith("::ffff:") and "." in text else text


def _ip_text(v6: int, hi: int, lo: int) -> str:
    if not v6:
        return str(ipaddress.IPv4Address(int(lo).to_bytes(4, "little")))
    addr = ipaddress.IPv6Address(int(hi).to_bytes(8, "little") + int(lo).to_bytes(8, "little"))
    # An IPv6 socket talking IPv4 has ::ffff:a.b.c.d; packet evidence shows a.b.c.d.
    return str(addr.ipv4_mapped or addr)


def _ip_ints(text: str) -> tuple[int, int, int]:
    """(v6, hi, lo) of an address text, as the BTF program prints it."""
    addr = ipaddress.ip_address(text)
    raw = addr.packed
    if addr.version == 4:
        return 0, 0, int.from_bytes(raw, "little")
    return 1, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _hex(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of fixed-width hex fields (rows of ASCII), and which rows were valid."""
    nib = _HEX[block]
    ok = (nib != 255).all(axis=1)
    width = block.shape[1]
    shifts = (4 * np.arange(width - 1, -1, -1)).astype(np.uint64)
    return (nib.astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64), ok


def _distinct(block: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """Distinct rows of a 2-D array (by their bytes, hashed by Arrow, not sorted):
    (index per row, each distinct row's bytes)."""
    block = np.ascontiguousarray(block)
    n = block.shape[0]
    width = block.nbytes // n if n else 1
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n,
                                               [None, pa.py_buffer(block.tobytes())])
    codes = pc.dictionary_encode(arr)
    return (codes.indices.to_numpy().astype(np.intp),
            codes.dictionary.to_pylist())


def _texts(block: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Distinct texts of a fixed-width text field: (index per row, texts)."""
    index, raw = _distinct(block)
    return index, [u.decode("utf-8", "replace").rstrip(" ") for u in raw]


def _uint64_grid(flat: pa.Array, base: np.ndarray, width: int) -> np.ndarray:
    """The decimal fields ``base + 0 .. base + width - 1`` of ``flat`` as an (n, width) array;
    raises ``pa.ArrowInvalid`` when one is not a number."""
    index = pa.array((base[:, None] + np.arange(width)).ravel())
    values = pc.cast(flat.take(index), pa.uint64()).to_numpy(zero_copy_only=False)
    return values.astype(np.uint64).reshape(len(base), width)


def _texts_of(raw: pa.Array) -> np.ndarray:
    """Binary values as an object array of str (bytes that are not UTF-8 replaced)."""
    try:
        return raw.cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
    except pa.ArrowInvalid:
        return np.array([b.decode("utf-8", "replace") for b in raw.to_pylist()], dtype=object)


def _labels(choice: np.ndarray, labels: tuple[str, ...]) -> pa.Array:
    """Strings by index (the few values a column takes), without a Python object per row."""
    return pa.array(labels, pa.string()).take(pa.array(choice.astype(np.int8)))


class TraceParser:
    """Turns the tracer's output into flow records (feed chunks, take batches).

    ``boot_offset_ns`` converts the kernel's monotonic clock to wall-clock time;
    ``cgroups`` places processes in containers; ``pods`` maps pod UIDs to ``<ns>/<pod>``
    (from the inventory) for the ``reporter`` column.
    """

    def __init__(self, node: str, *, boot_offset_ns: int | None = None,
                 cgroups: ProcessCgroups | None = None, pods: dict[str, str] | None = None,
                 ports: tuple[int, int] | None = None, stats: TraceStats | None = None) -> None:
        self.node = node
        self.boot_offset_ns = (boot_offset_ns if boot_offset_ns is not None
                               else time.time_ns() - time.monotonic_ns())
        self.cgroups = cgroups
        self.pods = pods or {}
        self.ports = ports or ephemeral_ports()
        self.stats = stats if stats is not None else TraceStats()
        self._parts: list[pa.Table] = []
        self._pending = 0
        self._maps: dict[str, dict[int, bytes]] = {}
        self._tail = b""
        self._pairs_seen: dict[tuple[int, int, int, int], None] = {}
        self._perf_lost = 0
        self._written = 0  # records the kernel wrote into the rotation maps (their counts)
        self._printed = 0  # rotation map entries read
        self.attached = False
        """True once bpftrace reported its probes attached."""
        self.read_at_ns: int | None = None
        """When the data being fed was read (monotonic ns): tells how late a tick came."""

    @property
    def pending(self) -> int:
        """Records parsed and not yet taken."""
        return self._pending

    def feed(self, data: bytes | Iterable[bytes]) -> None:
        """Parse output: a chunk of bytes (a partial last line is kept for the next call),
        or lines (with or without their newline)."""
        if not isinstance(data, bytes | bytearray):
            data = b"\n".join(line.rstrip(b"\n") for line in data) + b"\n"
        data = self._tail + bytes(data)
        cut = data.rfind(b"\n")
        self._tail = data[cut + 1:]
        if cut >= 0:
            self._chunk(data[:cut + 1])

    def _chunk(self, data: bytes) -> None:
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(buf == 10)
        starts = np.empty_like(ends)
        starts[:1] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts
        # Line numbers: blank lines are not counted (as bpftrace's map dump has some).
        nonblank = lengths > 0
        numbers = self.stats.lines + np.cumsum(nonblank)
        self.stats.lines += int(nonblank.sum())
        first = np.where(nonblank, buf[np.minimum(starts, len(buf) - 1)], 0)
        second = np.where(lengths > 1, buf[np.minimum(starts + 1, len(buf) - 1)], 0)
        done = ~nonblank
        sides: list[dict[str, np.ndarray]] = []
        records = (first == ord("@")) & (second == ord("R"))
        if records.any():
            done |= records
            sides.extend(self._records(data, starts, ends, records, numbers))
        for prefix, (cuts, width) in _CUTS.items():
            mine = (lengths == width) & (first == prefix[0]) & (second == prefix[1])
            if not mine.any():
                continue
            done |= mine
            rows = buf[starts[mine][:, None] + np.arange(width)]
            sides.extend(self._decode(cuts, rows, numbers[mine]))
        if sides:
            self._add({k: np.concatenate([s[k] for s in sides]) for k in _SOCK_KEYS})
        for i in np.flatnonzero(~done):
            self._other(data[starts[i]:ends[i]])
        self.stats.lost = self._perf_lost + max(0, self._written - self._printed)

    def add_lost(self, n: int) -> None:
        """Events bpftrace reported lost outside its output (on its standard error)."""
        self._perf_lost += n
        self.stats.lost = self._perf_lost + max(0, self._written - self._printed)

    def _records(self, data: bytes, starts: np.ndarray, ends: np.ndarray, mask: np.ndarray,
                 numbers: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Rotation map entries (``@Ra[<close time>, <cpu>]: (<RECORD>, <peer comm>, <comm>)``,
        numbers in decimal) -> one side per socket, as :meth:`_decode` gives."""
        rows = np.flatnonzero(mask)
        self._printed += len(rows)
        bounds = np.append(starts, ends[-1] + 1).astype(np.int64)  # each line with its \n
        lines = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(starts), [None, pa.py_buffer(bounds), pa.py_buffer(data)]
        ).filter(pa.array(mask))
        body = pc.replace_substring(pc.binary_slice(lines, 4, -2), b"]: (", b", ",
                                    max_replacements=1)
        ints = 2 + len(RECORD)  # close time, cpu, the record's integers
        width = ints + 2  # and the two command names (the last one takes any rest)
        parts = pc.split_pattern(body, b", ", max_splits=width - 1)
        ok = (pc.list_value_length(parts).to_numpy(zero_copy_only=False) == width) & \
            pc.ends_with(lines, b")\n").to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(parts.filter(pa.array(ok)))
        base = np.arange(int(ok.sum()), dtype=np.int64) * width
        line = numbers[rows[ok]]
        try:  # all numbers valid: the usual case, no check per field needed
            table = _uint64_grid(flat, base, ints)
        except pa.ArrowInvalid:
            fields = flat.take(pa.array((base[:, None] + np.arange(ints)).ravel()))
            valid = pc.match_substring_regex(fields, rb"^[0-9]{1,20}$").to_numpy(
                zero_copy_only=False).reshape(len(base), ints).all(axis=1)
            base, line = base[valid], line[valid]
            table = _uint64_grid(flat, base, ints)
        n = len(base)
        self.stats.malformed += len(rows) - n
        peer_comm, own_comm = (_texts_of(flat.take(pa.array(base + k))) for k in (ints, ints + 1))
        # A command name holding ", " makes the split of the two names uncertain: both unknown.
        unsure = pc.match_substring(flat.take(pa.array(base + ints + 1)), b", ").to_numpy(
            zero_copy_only=False)
        if unsure.any():
            peer_comm[unsure], own_comm[unsure] = "", ""
        col = {name: table[:, 2 + i] for i, name in enumerate(RECORD)}
        self.stats.events += n
        ports = col["ports"]
        v6 = (ports >> np.uint64(32)) & np.uint64(1)
        lport, rport = (ports >> np.uint64(16)) & np.uint64(0xFFFF), ports & np.uint64(0xFFFF)
        mask32 = np.uint64(0xFFFFFFFF)
        own = {
            "line": line, "num": line, "dump": np.zeros(n, dtype=bool), "v6": v6,
            "lhi": col["shi"], "llo": col["slo"], "rhi": col["dhi"], "rlo": col["dlo"],
            "lport": lport, "rport": rport, "comm": own_comm, "open": np.zeros(n, dtype=bool),
            "word": col["wordpid"] & mask32, "pid": col["wordpid"] >> np.uint64(32),
            "start": col["start"], "end": table[:, 0], "cgroup": col["cgroup"],
            "acked": col["acked"], "rcvd": col["rcvd"],
        }
        paired = col["wordpid2"] != 0
        if not paired.any():
            return [own]
        peer = {
            "line": line, "num": line, "dump": np.zeros(n, dtype=bool), "v6": v6,
            "lhi": col["dhi"], "llo": col["dlo"], "rhi": col["shi"], "rlo": col["slo"],
            "lport": rport, "rport": lport, "comm": peer_comm, "open": np.zeros(n, dtype=bool),
            "word": col["wordpid2"] & mask32, "pid": col["wordpid2"] >> np.uint64(32),
            "start": col["start2"], "end": col["end2"], "cgroup": col["cgroup2"],
            "acked": col["acked2"], "rcvd": col["rcvd2"],
        }
        sides = [{k: v[paired] for k, v in own.items()}, {k: v[paired] for k, v in peer.items()}]
        first = self._first_copies(sides)
        self.stats.pairs += int(first.sum())
        if not first.all():
            self.stats.events -= int((~first).sum())
            sides = [{k: v[first] for k, v in side.items()} for side in sides]
        return [{k: v[~paired] for k, v in own.items()}, *sides]

    def _decode(self, cuts: dict[str, tuple[int, int]], rows: np.ndarray,
                numbers: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Fixed-layout lines of the reduced program (one socket each) -> its side."""
        sep = np.array([a - 1 for a, _ in cuts.values()])
        ok = (rows[:, sep] == 32).all(axis=1)
        vals: dict[str, np.ndarray] = {}
        texts: dict[str, tuple[np.ndarray, list[str]]] = {}
        for name, (a, b) in cuts.items():
            if name in TEXT_FIELDS:
                texts[name] = _texts(rows[:, a:b])
            else:
                vals[name], good = _hex(rows[:, a:b])
                ok &= good
        for end in ("s", "d"):  # addresses as text: to the BTF program's integers
            index, words = texts.pop(f"{end}text")
            try:
                ints = np.array([_ip_ints(w) for w in words], dtype=np.uint64).reshape(-1, 3)
            except ValueError:
                ints = np.zeros((len(words), 3), dtype=np.uint64)
                for j, w in enumerate(words):
                    try:
                        ints[j] = _ip_ints(w)
                    except ValueError:
                        ok &= index != j
            vals[f"{end}v6"] = ints[index, 0]
            vals[f"{end}hi"], vals[f"{end}lo"] = ints[index, 1], ints[index, 2]
        self.stats.malformed += int((~ok).sum())
        vals = {k: v[ok] for k, v in vals.items()}
        cidx, cwords = texts["comm"]
        cidx, numbers, n = cidx[ok], numbers[ok], int(ok.sum())
        self.stats.events += n
        ports = vals["ports"]
        return [{
            "line": numbers, "num": numbers, "dump": np.zeros(n, dtype=bool),
            "v6": vals["sv6"].astype(bool), "lhi": vals["shi"], "llo": vals["slo"],
            "rhi": vals["dhi"], "rlo": vals["dlo"],
            "lport": (ports >> np.uint64(16)) & np.uint64(0xFFFF),
            "rport": ports & np.uint64(0xFFFF),
            "comm": np.array(cwords, dtype=object)[cidx] if n else np.array([], object),
            "open": np.zeros(n, dtype=bool),
            **{key: vals[key] for key in ("word", "start", "end", "pid", "cgroup", "acked",
                                          "rcvd")},
        }]

    def _first_copies(self, sides: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Which pair records were not seen before (from the other socket of the pair)."""
        a, b = sides
        keep = np.ones(len(a["line"]), dtype=bool)
        seen = self._pairs_seen
        for i, key in enumerate(zip(np.minimum(a["start"], b["start"]).tolist(),
                                    np.maximum(a["start"], b["start"]).tolist(),
                                    np.minimum(a["lport"], b["lport"]).tolist(),
                                    np.maximum(a["lport"], b["lport"]).tolist(), strict=True)):
            if key in seen:
                keep[i] = False
                self.stats.duplicates += 1
            else:
                seen[key] = None
        while len(seen) > 65536:
            del seen[next(iter(seen))]
        return keep

    def _other(self, line: bytes) -> None:
        """A line that is not a connection line: start marker, loss report, map dump."""
        text = line.strip()
        if text == b"R":
            self.attached = True
            return
        if text.startswith(b"Attaching ") and text.endswith(b"probes..."):
            return
        lost = _LOST_TEXT.search(text)
        if lost:
            self._perf_lost += int(lost.group(1))
            return
        tick = _TICK_LINE.fullmatch(text)
        if tick:
            if self.read_at_ns is not None and \
                    self.read_at_ns - int(tick.group(1), 16) > LATE_TICK_NS:
                self.stats.late_ticks += 1
            return
        count = _COUNT_LINE.fullmatch(text)
        if count:
            self._written += int(count.group(1))
            return
        if text.startswith(b"@"):
            found = False
            for m in _MAP_LINE.finditer(text):
                self._maps.setdefault(m.group(1).decode(), {})[int(m.group(2)) & _U64] = \
                    m.group(3)
                found = True
            if found:
                return
        self.stats.malformed += 1

    def _add(self, s: dict[str, np.ndarray]) -> None:
        """Records of decoded sockets (the columns of :data:`_SOCK_KEYS`)."""
        n = len(s["line"])
        if n == 0:
            return
        word = s["word"].astype(np.int64)

        def bitfield(name: str) -> np.ndarray:
            shift, width = WORD[name]
            return (word >> shift) & ((1 << width) - 1)

        role, extra, last, err = bitfield("role"), bitfield("extra"), bitfield("last"), \
            bitfield("err")
        bits, kernel = bitfield("bits"), bitfield("nokernel") == 0
        is_open = s["open"]
        established = (bits & (1 << ESTABLISHED)) != 0
        midstream = role == 0
        refused = ~midstream & ~established & kernel & (role == ROLE_CLIENT) & (
            err == ECONNREFUSED)
        no_answer = ~midstream & ~established & ~refused
        state = _labels(np.select([midstream, established | is_open, refused], [0, 1, 2], 3),
                        ("midstream", "established", "refused", "no-answer"))
        rst = kernel & np.isin(err, (ECONNRESET, EPIPE)) | np.isin(last, (
            ESTABLISHED, CLOSE_WAIT, SYN_RECV))
        timeout = no_answer | (kernel & (err == ETIMEDOUT))
        end_how = _labels(np.select([is_open, refused, timeout, rst], [0, 1, 2, 1], 3),
                          ("open", "rst", "timeout", "fin"))
        fin_sent = (bits & ((1 << FIN_WAIT1) | (1 << LAST_ACK) | (1 << CLOSING))) != 0
        syn = ((role == ROLE_CLIENT) & established).astype(np.int64)
        acked, rcvd = s["acked"].astype(np.int64), s["rcvd"].astype(np.int64)
        sent = np.maximum(acked - syn - (fin_sent & ((extra & 2) != 0)), 0)
        received = np.maximum(rcvd - (extra & 1), 0)
        no_bytes = ~kernel | is_open
        lport = s["lport"].astype(np.int64)
        rport = s["rport"].astype(np.int64)
        lo, hi = self.ports
        eph_l = (lport >= lo) & (lport <= hi)
        eph_r = (rport >= lo) & (rport <= hi)
        guessed = np.where(eph_l & ~eph_r, ROLE_CLIENT, np.where(eph_r, ROLE_SERVER,
                                                                 ROLE_CLIENT))
        client = np.where(midstream, guessed, role) == ROLE_CLIENT
        start, end = s["start"].astype(np.int64), s["end"].astype(np.int64)
        time_ns = np.where(midstream, end, start)
        duration = (end - start) // 1_000_000
        no_duration = midstream | is_open

        # Addresses: formatted once per distinct address.
        v6 = s["v6"].astype(np.uint64)
        addr = np.concatenate([np.stack([v6, s["lhi"], s["llo"]], axis=1),
                               np.stack([v6, s["rhi"], s["rlo"]], axis=1)])
        inverse, uniq = _distinct(addr)
        names = pa.array([_ip_text(*np.frombuffer(u, dtype=np.uint64).tolist()) for u in uniq],
                         pa.string())
        local, remote = inverse[:n], inverse[n:]
        src = np.where(client, local, remote)
        dst = np.where(client, remote, local)

        # Processes: container and pod once per distinct (pid, cgroup id).
        pid, cgid = s["pid"].astype(np.int64), s["cgroup"].astype(np.int64)
        pc_inv, pc_raw = _distinct(np.stack([pid, cgid], axis=1))
        refs: list[ContainerRef | None] = []
        for p, g in (np.frombuffer(u, dtype=np.int64).tolist() for u in pc_raw):
            ref = None
            if self.cgroups is not None and (p > 0 or g > 1):
                ref = self.cgroups.lookup(p, g)
            refs.append(ref)
        container = pa.array([r.container_id if r else None for r in refs], pa.string())
        pod_uid = pa.array([r.pod_uid if r else None for r in refs], pa.string())
        reporter = pa.array([self.pods.get(r.pod_uid) if r and r.pod_uid else None
                             for r in refs], pa.string())
        idx = pa.array(pc_inv)
        attributed = np.array([r is not None for r in refs], dtype=bool)[pc_inv]
        in_pod = np.array([bool(r and r.pod_uid and r.pod_uid in self.pods) for r in refs],
                          dtype=bool)[pc_inv]

        kind = np.where(s["dump"].astype(bool), np.where(is_open, 0, 1), 2)
        origin = pc.binary_join_element_wise(
            _labels(kind, tuple(f"ebpf:{self.node}:{k}" for k in ("open", "exit", "event"))),
            pc.cast(pa.array(s["num"].astype(np.int64)), pa.string()), " ")
        comm = s["comm"]
        table = pa.table({
            "time": pa.array((time_ns + self.boot_offset_ns) // 1000, pa.int64()),
            "duration_ms": pa.array(duration, pa.int64(), mask=no_duration),
            "src_ip": names.take(pa.array(src)),
            "src_port": pa.array(np.where(client, lport, rport)),
            "dst_ip": names.take(pa.array(dst)),
            "dst_port": pa.array(np.where(client, rport, lport)),
            "direction": _labels(~client, ("outbound", "inbound")),
            "reporter": reporter.take(idx),
            "bytes_in": pa.array(np.where(client, sent, received), pa.int64(), mask=no_bytes),
            "bytes_out": pa.array(np.where(client, received, sent), pa.int64(),
                                  mask=no_bytes),
            "origin": origin,
            "tcp_state": state,
            "tcp_end": end_how,
            "pid": pa.array(pid, pa.int64(), mask=pid <= 0),
            "comm": pa.array(comm, pa.string(), mask=comm == ""),
            "container_id": container.take(idx),
            "pod_uid": pod_uid.take(idx),
            # Order: by line, the client's record before the server's.
            "_order": pa.array(s["line"].astype(np.int64) * 2 + ~client),
        })
        self._parts.append(table)
        self._pending += n
        st = self.stats
        st.connections += n
        st.refused += int(refused.sum())
        st.no_answer += int(no_answer.sum())
        st.midstream += int(midstream.sum())
        st.attributed += int(attributed.sum())
        st.pods += int(in_pod.sum())

    def finish(self) -> None:
        """Records from bpftrace's map dump at exit: connections still open, and a local
        pair's socket that closed while its peer stayed open."""
        if self._tail:
            self.feed(b"\n")
        maps, self._maps = self._maps, {}
        starts = maps.get("t", {})
        got: dict[str, list[object]] = {k: [] for k in _SOCK_KEYS}
        k = 0
        order: dict[int, int] = {}
        for sk, started in starts.items():
            try:
                order[sk] = int(started)
            except ValueError:
                self.stats.malformed += 1
        for sk in sorted(order, key=lambda key: (order[key], key)):
            try:
                if "a" in maps:  # BTF program: (shi, slo, dhi, dlo, ports | v6 << 32)
                    if sk not in maps["a"]:
                        self.stats.pending_at_stop += 1
                        continue
                    shi, slo, dhi, dlo, pv = (int(x) & _U64 for x in
                                              maps["a"][sk].strip(b"()").split(b","))
                    v6 = pv >> 32
                elif sk in maps.get("sa", {}):
                    v6, shi, slo = _ip_ints(maps["sa"][sk].strip().decode())
                    _, dhi, dlo = _ip_ints(maps["da"][sk].strip().decode())
                    pv = int(maps["pt"][sk])
                else:
                    self.stats.pending_at_stop += 1
                    continue
                start = int(starts[sk])
                word = int(maps.get("r", {}).get(sk, 0)) | 1 << (16 + ESTABLISHED)
                pid = int(maps.get("p", {}).get(sk, 0))
                cgid = int(maps.get("g", {}).get(sk, 0))
                # The peer of a local pair that closed first: its fields, kept under sk.
                closed = maps.get("w", {}).get(sk)
                peer = [int(x) for x in closed.strip(b"()").split(b",")] if closed else None
                if peer is not None:
                    if len(peer) != 8:
                        raise ValueError(closed)
                    peer = peer[:7]  # the 8th: the peer's own address
            except (ValueError, KeyError):
                self.stats.malformed += 1
                continue
            comm = maps.get("m", {}).get(sk, b"").strip().decode("utf-8", "replace")
            sides: list[tuple[object, ...]] = [(
                word, start, start, pid, cgid, 0, 0, comm, True, shi, slo, dhi, dlo,
                pv >> 16 & 0xFFFF, pv & 0xFFFF)]
            self.stats.open_at_stop += 1
            if peer is not None:
                pcomm = maps.get("wm", {}).get(sk, b"").strip().decode("utf-8", "replace")
                sides.append((*peer, pcomm, False, dhi, dlo, shi, slo, pv & 0xFFFF,
                              pv >> 16 & 0xFFFF))
            for side in sides:
                k += 1
                row = (self.stats.lines + k, k, 1, *side[:8], v6, *side[9:], side[8])
                for key, value in zip(_SOCK_KEYS, row, strict=True):
                    got[key].append(value)
        if k:
            cols = {key: np.array(v, dtype=np.uint64) for key, v in got.items()
                    if key not in ("comm", "open", "dump")}
            self._add({**cols, "comm": np.array(got["comm"], dtype=object),
                       "open": np.array(got["open"], dtype=bool),
                       "dump": np.ones(k, dtype=bool)})

    def take(self) -> pa.RecordBatch:
        """The records parsed so far (FLOW_SCHEMA), and forget them."""
        parts, self._parts, self._pending = self._parts, [], 0
        if parts:
            table = pa.concat_tables(parts)
            table = table.take(pc.sort_indices(table, [("_order", "ascending")]))
            table = table.drop_columns(["_order"])
        else:
            table = pa.table({k: pa.array([], FLOW_SCHEMA.field(k).type) for k in _ROW_KEYS})
        n = table.num_rows
        columns = {name: table.column(name).combine_chunks() for name in table.column_names
                   if name != "time"}
        columns["time"] = table.column("time").combine_chunks().cast(
            FLOW_SCHEMA.field("time").type)
        # The dialled endpoint is the one the socket connected to: the destination.
        columns["dialed_ip"], columns["dialed_port"] = columns["dst_ip"], columns["dst_port"]
        for name, value in _CONSTANT.items():
            columns[name] = pa.array([value], FLOW_SCHEMA.field(name).type).take(
                pa.array(np.zeros(n, dtype=np.int64)))
        return conform(pa.table(columns))


def parse_trace(lines: bytes | Iterable[bytes], node: str = "recorded", **kwargs: object
                ) -> tuple[pa.RecordBatch, TraceStats]:
    """Records and stats of a whole recorded tracer output (tests, replays)."""
    parser = TraceParser(node, **kwargs)  # type: ignore[arg-type]
    parser.feed(lines)
    parser.finish()
    return parser.take(), parser.stats


# -- running ---------------------------------------------------------------------------------


def trace_connections(
    duration_s: float | None = None, stop: threading.Event | None = None,
    inventory: Inventory | None = None, *, stats: TraceStats | None = None,
    node: str | None = None, bpftrace: str = "bpftrace", batch_rows: int = 8192,
    flush_s: float = 1.0, ready: threading.Event | None = None, map_keys: int = MAP_KEYS,
    mount: bool = True, attach_timeout_s: float = 60.0,
    on_start: Callable[[int], None] | None = None, cgroup_root: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """Trace TCP connections on this machine; yield flow records (FLOW_SCHEMA) as they close.

    Runs until ``duration_s`` passed (counted from the moment the probes are attached) or
    ``stop`` is set, then stops bpftrace (SIGINT) and yields the connections still open.
    Batches come every ``flush_s`` seconds (when there is something) or every
    ``batch_rows`` records. ``ready`` is set once the probes are attached; ``on_start`` gets
    bpftrace's pid. ``cgroup_root``: the node's cgroup v2 mount (see
    :class:`observe.cgroup.ProcessCgroups`). ``inventory``
    (optional) fills ``reporter`` with the local pod found by UID. Raises
    :class:`InputError` on set-up problems and :class:`KernelRefused` when the kernel
    rejects the program; ``stats`` (optional) grows as it runs.
    """
    stats = stats if stats is not None else TraceStats()
    require_setup(bpftrace=bpftrace, mount=mount, notes=stats.notes)
    btf = BTF.exists()
    node = node or socket.gethostname()
    parser = TraceParser(node, cgroups=ProcessCgroups(cgroup_root=cgroup_root),
                         pods=pods_by_uid(inventory) if inventory is not None else None,
                         stats=stats)
    text = program(btf=btf, sk_flags=sk_flags_field(bpftrace) if btf else SK_FLAGS_NEW)
    env = {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(map_keys),
           "BPFTRACE_STRLEN": "16"}  # comm: 15 bytes and NUL, padded to 16 by the layout
    try:
        proc = subprocess.Popen(
            [bpftrace, "-f", "text", "-e", text], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        )
    except OSError as exc:
        raise InputError(f"cannot run {bpftrace}: {exc.strerror or exc}", origin="ebpf",
                         hint=INSTALL_HINT) from exc
    if on_start is not None:
        on_start(proc.pid)
    errors: list[bytes] = []
    err_thread = threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True)
    err_thread.start()
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with contextlib.suppress(OSError):  # room for the pauses below (Linux F_SETPIPE_SZ)
        fcntl.fcntl(fd, 1031, PIPE_BYTES)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    started = time.monotonic()
    attached_at: float | None = None
    last_flush = time.monotonic()
    interrupted = False
    try:
        while True:
            now = time.monotonic()
            if attached_at is None and parser.attached:
                attached_at = now
                if ready is not None:
                    ready.set()
            if not interrupted and attached_at is not None and (
                    (stop is not None and stop.is_set())
                    or (duration_s is not None and now - attached_at >= duration_s)):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                interrupted = True
            if attached_at is None and now - started > attach_timeout_s:
                proc.kill()
                raise InputError(f"bpftrace did not attach within {attach_timeout_s:.0f} s",
                                 origin="ebpf", hint=_last_error(errors))
            if not sel.select(timeout=0.2):
                chunk = None
            else:
                chunk = os.read(fd, PIPE_BYTES)
                parser.read_at_ns = time.monotonic_ns()
                if not chunk:
                    break
            if chunk:
                if not interrupted and len(chunk) < PIPE_BYTES // 4:
                    # Read in bulk: one wake-up per pause instead of one per line (no pause
                    # when the pipe was filling up: bpftrace must never wait on it).
                    time.sleep(READ_PAUSE_S)
                parser.feed(chunk)  # whole chunk at once; a partial last line waits
            if parser.pending and (parser.pending >= batch_rows
                                   or time.monotonic() - last_flush >= flush_s):
                last_flush = time.monotonic()
                yield parser.take()
        rc = proc.wait()
        err_thread.join(timeout=5)
        if not parser.attached:
            reason = _last_error(errors) or f"bpftrace exited with status {rc}"
            cls = KernelRefused if _REFUSED_BY_KERNEL.search(reason) else InputError
            raise cls(f"tracer failed: {reason}", origin="ebpf",
                      hint="run meshwright's set-up check; the kernel's reason is above")
        for line in b"".join(errors).splitlines():  # (text mode reports them on stdout)
            lost = _LOST_TEXT.search(line)
            if lost:
                parser.add_lost(int(lost.group(1)))
        warnings = _warnings(errors)
        if warnings:
            stats.notes.append(f"bpftrace: {warnings}")
        parser.finish()
        if stats.late_ticks:
            stats.notes.append(
                f"the tracer's output was read over {LATE_TICK_NS / 1e9:.0f} s after its tick "
                f"{stats.late_ticks} times (node overloaded?): connections may be missing "
                "uncounted")
        if parser.pending:
            yield parser.take()
    finally:
        sel.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _drain(stream: object, out: list[bytes]) -> None:
    for line in iter(stream.readline, b""):  # type: ignore[attr-defined]
        out.append(line)
        if len(out) > 1000:
            del out[:500]


# bpftrace's warning when it cannot raise RLIMIT_MEMLOCK: harmless from Linux 5.11 (maps
# are charged to the memory cgroup), shown once as a note otherwise.
_HARMLESS = re.compile(rb"RLIMIT_MEMLOCK")


def _warnings(errors: list[bytes]) -> str:
    lines = [ln.strip() for ln in b"".join(errors).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not (_HARMLESS.search(ln) and _kernel_version() >= (5, 11))
            and not _LOST_TEXT.search(ln)]
    return "; ".join(ln.decode("utf-8", "replace") for ln in keep[:3])


def _last_error(errors: list[bytes]) -> str:
    lines = [ln.strip().decode("utf-8", "replace") for ln in b"".join(errors).splitlines()
             if ln.strip() and not _HARMLESS.search(ln)]
    picked = [ln for ln in lines if "ERROR" in ln] or lines
    return "; ".join(picked[-3:])


__all__ = [
    "PROGRAM", "KernelRefused", "TraceParser", "TraceStats", "check_setup",
    "parse_trace", "program", "require_setup", "trace_connections",
]
