"""eBPF connection tracing: the kernel's TCP state changes -> connection flow records.

Front end: Debian's ``bpftrace``, run as a subprocess with ``-f json``. Chosen over BCC's
Python bindings because bpftrace compiles with its own embedded LLVM and reads struct layouts
from the kernel's BTF (no kernel headers and no compiler on the node, one package, a small
image), and a subprocess keeps a crashing or slow tracer out of meshwright's process. The
program text is the constant :data:`PROGRAM` (not a ``.bt`` file): the parser below reads
exactly the lines it prints, so the two are versioned together, and nothing has to be
installed as package data.

What the program does (all in the kernel, one output line per connection):

- ``tracepoint:sock:inet_sock_set_state`` (stable since Linux 4.16), TCP only. ``SYN_SENT``
  is a client's ``connect()`` and runs in the caller's context: pid, comm and cgroup id are
  the client's. A listener's child entering ``SYN_RECV`` is a server connection; it runs in
  softirq context (on loopback: the *client's* process), so the server process is taken from
  the ``accept()``/``accept4()`` syscall exit instead (the returned fd -> ``struct socket`` ->
  ``struct sock``). Each state is OR-ed into a per-socket bit set, so the path is known
  at close without one line per change.
- At ``CLOSE`` one line: socket, role, state bits, last state, ``sk_err`` (``ECONNREFUSED``
  tells a refused attempt from one that got no answer), start/end times, process, addresses,
  ports, and the byte counters the kernel keeps in ``struct tcp_sock`` (read through BTF):
  ``bytes_acked`` (sent and acknowledged) and ``bytes_received``. Both count sequence
  space, so the SYN (client side) and FIN are taken off: the FIN received when the socket
  has ``SOCK_DONE``, the FIN sent when one was sent and everything is acknowledged.
- When the tracer stops, bpftrace prints its maps: connections established and still open
  become records with ``tcp_end`` ``open`` (no byte counts: nothing read them).

What is and is not known:

- Known: both endpoints and ports, client or server side, established / refused / no answer,
  how it ended (FIN, RST, timeout), duration, payload bytes each way (exact on loopback;
  ``bytes_acked`` leaves out what was sent but never acknowledged), the local process
  (pid, comm) and, from its cgroup, container and pod UID.
- Not known: the payload. Whether a connection carried TLS needs the first bytes written
  (a kprobe/fentry on ``tcp_sendmsg`` or uprobes on ``SSL_write``); kernels built without
  kprobes (like the one this was developed on) cannot attach those, so ``mtls`` is
  ``unknown`` on every eBPF record. Connections already open when the tracer started are
  reported at close as ``midstream`` (their side guessed from the ephemeral port range);
  connections accepted through io_uring carry no server process. Without kernel BTF the
  program runs in a reduced form: no byte counts, refused and unanswered attempts are both
  ``no-answer``, and servers carry no process (said once in :attr:`TraceStats.notes`).

Records are ``kind`` ``connection``, ``source`` ``ebpf``, ``origin`` ``ebpf:<node>:event <n>``
(the n-th line the tracer printed). ``direction`` is ``outbound`` for the client's socket,
``inbound`` for the server's; a connection between two local processes gives both.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
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
import orjson
import pyarrow as pa

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
#: about 100 ms of output at 4,000 lines/s, so a 20 ms pause never blocks bpftrace).
PIPE_BYTES = 1 << 20
READ_PAUSE_S = 0.02
INSTALL_HINT = "install bpftrace (Debian/Ubuntu: apt-get install bpftrace)"

# TCP states (include/net/tcp_states.h).
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, \
    LAST_ACK, LISTEN, CLOSING = range(1, 12)
ROLE_CLIENT, ROLE_SERVER = 1, 2
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF, CAP_SYS_RESOURCE = 21, 38, 39, 24

# One line per connection, printed at CLOSE (fields in this order; comm last, it may hold
# spaces): C sk role statebits laststate sk_err start_ns end_ns pid cgroup saddr sport daddr
# dport bytes_acked bytes_received extra comm. extra: bit 0 SOCK_DONE (the peer's FIN came),
# bit 1 everything sent is acknowledged (snd_una == write_seq).
_CLOSE_FMT = (
    r'"C %llu %d %d %d %d %llu %llu %d %llu %s %d %s %d %llu %llu %d %s\n"'
)
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
    if ($new == 1) {
      if (args->family == 2) {
        @sa[$sk] = ntop(args->saddr); @da[$sk] = ntop(args->daddr);
      } else {
        @sa[$sk] = ntop(args->saddr_v6); @da[$sk] = ntop(args->daddr_v6);
      }
      @pt[$sk] = (args->sport << 16) | args->dport;
    }
  }
  if ($new == 7 && $old != 10) {
    %(KERNEL_READS)s
    if (args->family == 2) {
      printf(%(FMT)s, $sk, @r[$sk], @f[$sk], $old, $err, @t[$sk], nsecs, @p[$sk], @g[$sk],
             ntop(args->saddr), args->sport, ntop(args->daddr), args->dport, $acked, $rcvd,
             $x, @m[$sk]);
    } else {
      printf(%(FMT)s, $sk, @r[$sk], @f[$sk], $old, $err, @t[$sk], nsecs, @p[$sk], @g[$sk],
             ntop(args->saddr_v6), args->sport, ntop(args->daddr_v6), args->dport, $acked,
             $rcvd, $x, @m[$sk]);
    }
    delete(@t[$sk]); delete(@r[$sk]); delete(@p[$sk]); delete(@g[$sk]); delete(@m[$sk]);
    delete(@f[$sk]); delete(@sa[$sk]); delete(@da[$sk]); delete(@pt[$sk]);
  }
}
%(ACCEPT)s
"""
_KERNEL_READS_BTF = """$s = (struct sock *)$sk;
    $tp = (struct tcp_sock *)$sk;
    $err = $s->sk_err;
    $acked = $tp->bytes_acked;
    $rcvd = $tp->bytes_received;
    $x = ((%(SK_FLAGS)s >> 1) & 1) | ($tp->snd_una == $tp->write_seq ? 2 : 0);"""
_KERNEL_READS_NONE = "$err = -1; $acked = (uint64)0; $rcvd = (uint64)0; $x = -1;"
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
    reads = _KERNEL_READS_BTF % {"SK_FLAGS": sk_flags} if btf else _KERNEL_READS_NONE
    return _PROGRAM_TEMPLATE % {
        "FMT": _CLOSE_FMT,
        "KERNEL_READS": reads,
        "ACCEPT": _ACCEPT_BTF if btf else "",
    }


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
    """Lines the tracer printed (JSON objects)."""
    events: int = 0
    """Connection lines (one per closed socket)."""
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
    """Events the kernel dropped (bpftrace's "Lost N events"): connections not reported."""
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
_MAPS = ("@t", "@r", "@p", "@g", "@m", "@f", "@sa", "@da", "@pt")
_U64 = (1 << 64) - 1


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


class TraceParser:
    """Turns the tracer's JSON lines into flow records (feed lines, take batches).

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
        self.rows: dict[str, list[object]] = {k: [] for k in _ROW_KEYS}
        self._maps: dict[str, dict[int, object]] = {}
        self.attached = False
        """True once bpftrace reported its probes attached."""

    @property
    def pending(self) -> int:
        """Records parsed and not yet taken."""
        return len(self.rows["time"])

    def feed(self, lines: Iterable[bytes]) -> None:
        """Parse lines (without or with their newline)."""
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            self.stats.lines += 1
            n = self.stats.lines
            try:
                obj = orjson.loads(line)
                kind = obj["type"]
                data = obj["data"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                lost = _LOST_TEXT.search(line)
                if lost:
                    self.stats.lost += int(lost.group(1))
                else:
                    self.stats.malformed += 1
                continue
            if kind == "printf":
                if data == "R\n":
                    self.attached = True
                elif not (isinstance(data, str) and self._close_line(data, n)):
                    self.stats.malformed += 1
            elif kind == "lost_events":
                try:
                    self.stats.lost += int(data["events"])
                except (KeyError, TypeError, ValueError):
                    self.stats.malformed += 1
            elif kind == "attached_probes":
                pass  # printed before attaching; the BEGIN line "R" comes after
            elif kind == "map" and isinstance(data, dict):
                for name, values in data.items():
                    if name in _MAPS and isinstance(values, dict):
                        try:
                            self._maps[name] = {int(k) & _U64: v for k, v in values.items()}
                        except ValueError:
                            self.stats.malformed += 1
            # other types (time, join, ...) are not printed by this program: ignored

    def _close_line(self, data: str, n: int) -> bool:
        parts = data.rstrip("\n").split(" ", 17)
        if len(parts) < 17 or parts[0] != "C":
            return False
        try:
            int(parts[1])  # the socket's address: a number, or not this program's line
            role, bits, last, err = int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5])
            start, end, pid, cgid = int(parts[6]), int(parts[7]), int(parts[8]), int(parts[9])
            laddr, lport, raddr, rport = parts[10], int(parts[11]), parts[12], int(parts[13])
            acked, rcvd, extra = int(parts[14]), int(parts[15]), int(parts[16])
        except ValueError:
            return False
        comm = parts[17] if len(parts) > 17 else ""
        self.stats.events += 1
        btf = err >= 0
        established = bool(bits & (1 << ESTABLISHED))
        if role == 0:
            state = "midstream"
            self.stats.midstream += 1
        elif established:
            state = "established"
        elif btf and role == ROLE_CLIENT and err == ECONNREFUSED:
            state = "refused"
        else:
            state = "no-answer"
        if state == "refused":
            end_how = "rst"
        elif state == "no-answer" or (btf and err == ETIMEDOUT):
            end_how = "timeout"
        elif (btf and err in (ECONNRESET, EPIPE)) or last in (ESTABLISHED, CLOSE_WAIT,
                                                                SYN_RECV):
            end_how = "rst"
        else:
            end_how = "fin"
        sent = received = None
        if btf:
            fin_sent = bool(bits & ((1 << FIN_WAIT1) | (1 << LAST_ACK) | (1 << CLOSING)))
            syn = 1 if role == ROLE_CLIENT and established else 0
            sent = max(acked - syn - (1 if fin_sent and extra & 2 else 0), 0)
            received = max(rcvd - (extra & 1), 0)
        if role == 0:
            # Side unknown: the local port in the ephemeral range makes us the client.
            lo, hi = self.ports
            role_side = ROLE_CLIENT if lo <= lport <= hi and not lo <= rport <= hi else (
                ROLE_SERVER if lo <= rport <= hi else ROLE_CLIENT)
            time_ns, duration = end, None
        else:
            role_side = role
            time_ns, duration = start, (end - start) // 1_000_000
        self._add(role_side, _ip(laddr), lport, _ip(raddr), rport, time_ns, duration,
                  sent, received, state, end_how, pid, cgid, comm, f"event {n}")
        return True

    def _add(self, role: int, laddr: str, lport: int, raddr: str, rport: int, time_ns: int,
             duration: int | None, sent: int | None, received: int | None, state: str,
             end_how: str, pid: int, cgid: int, comm: str, where: str) -> None:
        client = role == ROLE_CLIENT
        ref: ContainerRef | None = None
        if self.cgroups is not None and (pid > 0 or cgid > 1):
            ref = self.cgroups.lookup(pid, cgid)
        reporter = None
        if ref is not None:
            self.stats.attributed += 1
            if ref.pod_uid is not None:
                reporter = self.pods.get(ref.pod_uid)
                if reporter is not None:
                    self.stats.pods += 1
        src = (laddr, lport) if client else (raddr, rport)
        dst = (raddr, rport) if client else (laddr, lport)
        row = self.rows
        row["time"].append((time_ns + self.boot_offset_ns) // 1000)
        row["duration_ms"].append(duration)
        row["src_ip"].append(src[0])
        row["src_port"].append(src[1])
        row["dst_ip"].append(dst[0])
        row["dst_port"].append(dst[1])
        row["direction"].append("outbound" if client else "inbound")
        row["reporter"].append(reporter)
        row["bytes_in"].append(sent if client else received)
        row["bytes_out"].append(received if client else sent)
        row["origin"].append(f"ebpf:{self.node}:{where}")
        row["tcp_state"].append(state)
        row["tcp_end"].append(end_how)
        row["pid"].append(pid if pid > 0 else None)
        row["comm"].append(comm or None)
        row["container_id"].append(ref.container_id if ref is not None else None)
        row["pod_uid"].append(ref.pod_uid if ref is not None else None)
        self.stats.connections += 1
        if state == "refused":
            self.stats.refused += 1
        elif state == "no-answer":
            self.stats.no_answer += 1

    def finish(self) -> None:
        """Records for connections open when the tracer stopped (from its map dump)."""
        maps = self._maps
        starts = maps.get("@t", {})
        addrs = maps.get("@sa", {})
        k = 0
        for sk in sorted(starts, key=lambda k: (int(str(starts[k])), k)):
            if sk not in addrs:
                self.stats.pending_at_stop += 1
                continue
            try:
                role = int(str(maps.get("@r", {}).get(sk, 0)))
                ports = int(str(maps.get("@pt", {}).get(sk, 0)))
                laddr, raddr = str(addrs[sk]), str(maps.get("@da", {}).get(sk, ""))
                pid = int(str(maps.get("@p", {}).get(sk, 0)))
                cgid = int(str(maps.get("@g", {}).get(sk, 0)))
                start = int(str(starts[sk]))
            except ValueError:
                self.stats.malformed += 1
                continue
            comm = str(maps.get("@m", {}).get(sk, ""))
            self.stats.open_at_stop += 1
            k += 1
            self._add(role, _ip(laddr), ports >> 16, _ip(raddr), ports & 0xFFFF, start, None,
                      None, None, "established", "open", pid, cgid, comm, f"open {k}")
        self._maps = {}

    def take(self) -> pa.RecordBatch:
        """The records parsed so far (FLOW_SCHEMA), and forget them."""
        rows, self.rows = self.rows, {k: [] for k in _ROW_KEYS}
        columns = {k: pa.array(v, type=FLOW_SCHEMA.field(k).type) for k, v in rows.items()
                   if k != "time"}
        columns["time"] = pa.array(rows["time"], pa.int64()).cast(FLOW_SCHEMA.field("time").type)
        n = len(rows["time"])
        # The dialled endpoint is the one the socket connected to: the destination.
        columns["dialed_ip"], columns["dialed_port"] = columns["dst_ip"], columns["dst_port"]
        for name, value in _CONSTANT.items():
            columns[name] = pa.array([value], FLOW_SCHEMA.field(name).type).take(
                pa.array(np.zeros(n, dtype=np.int64)))
        return conform(pa.table(columns))


def parse_trace(lines: Iterable[bytes], node: str = "recorded", **kwargs: object
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
           "BPFTRACE_STRLEN": "16"}
    try:
        proc = subprocess.Popen(
            [bpftrace, "-f", "json", "-e", text], stdout=subprocess.PIPE,
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
    tail = b""
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
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
            if chunk:
                if not interrupted:
                    # Read in bulk: one wake-up per pause instead of one per line.
                    time.sleep(READ_PAUSE_S)
                data = tail + chunk
                cut = data.rfind(b"\n")
                if cut >= 0:
                    parser.feed(data[:cut].split(b"\n"))
                    tail = data[cut + 1:]
                else:
                    tail = data
            if parser.pending and (parser.pending >= batch_rows
                                   or time.monotonic() - last_flush >= flush_s):
                last_flush = time.monotonic()
                yield parser.take()
        if tail:
            parser.feed([tail])
        rc = proc.wait()
        err_thread.join(timeout=5)
        if not parser.attached:
            reason = _last_error(errors) or f"bpftrace exited with status {rc}"
            cls = KernelRefused if _REFUSED_BY_KERNEL.search(reason) else InputError
            raise cls(f"tracer failed: {reason}", origin="ebpf",
                      hint="run meshwright's set-up check; the kernel's reason is above")
        for line in b"".join(errors).splitlines():
            lost = _LOST_TEXT.search(line)
            if lost:
                stats.lost += int(lost.group(1))
        warnings = _warnings(errors)
        if warnings:
            stats.notes.append(f"bpftrace: {warnings}")
        parser.finish()
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
