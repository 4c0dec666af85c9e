"""Node flows shipped to the observer (``POST /v1/flows``): latency, throughput, bytes.

    python benchmarks/ingest_throughput.py [--nodes 4 20] [--shipments 10] [--records 5000]
                                           [--rate 1000] [--latency-seconds 60]
                                           [--flush-every 1] [--no-record]

Everything runs over real HTTP on loopback. The observer is ``meshwright observe --kube
--listen`` in a child process (``--emit-every 0``: no emission; ``--flush-every 5``), so its
CPU time (``/proc/<pid>/stat`` utime + stime) is its own; the fake API server it lists, watches
and sends TokenReviews to (tests/support/kube_watch_api.py, one namespace, no pods) and the
nodes (real :class:`observe.ship.Shipper` objects, one thread each, each with its own spool, stream
and pod-bound token) are in this process.

Records: what the eBPF tracer makes on a node. Each node's bpftrace output is synthesised -
rotation map entries (``@Ra[<close ns>, <cpu>]: (<observe.ebpf.RECORD>, <peer comm>, <comm>)``)
in ticks of 500 ms with their ``@N`` counts and ``E`` lines, as the BTF program prints them -
for a seeded node (16 pods with a container each, a kubelet) whose sockets connect to pods
on 63 other nodes, to external addresses and to each other (local pairs: one entry, two
records), accept from remote pods, get reset, refused or no answer, with log-normal
durations and byte counts; and parsed by :class:`observe.ebpf.TraceParser` itself, the
processes placed in their containers and pods by :class:`observe.cgroup.ProcessCgroups`
over a cgroup v2 tree made for the node (kubepods ``cri-containerd-<id>.scope`` directories
whose inode numbers are the cgroup ids in the entries). So the columns are filled as the
tracer fills them (``reporter`` stays empty: a node sending with ``--send`` has no inventory).

Measured:

1. latency: one node at ``--rate`` records/s for ``--latency-seconds`` (records handed to
   the shipper every 0.25 s, a shipment cut every ``--flush-every`` s): from a shipment's cut
   (written to the spool) to its 2xx, per shipment (mean, p50, p99 interpolated, max); and
   the observer's CPU over that window, less its idle CPU (measured for 5 s before), per
   1,000 records/s;
2. throughput: for each ``--nodes`` N, N nodes each with ``--shipments`` x ``--records``
   records already cut and spooled (a backlog: the nodes' encoding is not in the window,
   it is measured apart), delivered at once, one request in flight per node as the shipper
   sends: records stored per second, shipments per commit (flow parts written), observer
   CPU per 1,000 records and its peak RSS, attempts the shippers retried, and connections
   the kernel dropped from a full listen queue meanwhile (``TcpExt: ListenOverflows``, the
   whole machine); every row stored once (rows in the store before and after, every answer
   ``stored``);
3. reference: the same records (of the largest N) committed by this process straight into a
   :class:`observe.state.FlowStore` (no HTTP, no encoding, no TokenReview) in commits of the
   size the observer made, each with its ingest cursors; ingest as a share of its rate;
4. bytes per record: the zstd body (what goes on the wire), the uncompressed Arrow IPC
   stream, the decoded batches in memory (Arrow), and the Parquet the store writes; HTTP
   headers per shipment from one shipment sent again (answered ``duplicate``, not stored).

Appends a dated entry to ``benchmarks/RESULTS.md`` (``--no-record``: not).
"""

from __future__ import annotations

import argparse
import errno
import http.client
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.kube_watch_api import WatchApiServer, _kubeconfig  # noqa: E402
from support.soak_load import cpu_seconds, flow_files  # noqa: E402

from benchmarks.observe_throughput import append_results  # noqa: E402
from meshwright.ingest import DEFAULT_ALLOW  # noqa: E402
from observe.cgroup import ProcessCgroups  # noqa: E402
from observe.ebpf import (  # noqa: E402
    CLOSE,
    CLOSE_WAIT,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    LAST_ACK,
    ROTATION_MAPS,
    SYN_RECV,
    SYN_SENT,
    TICK_MS,
    TraceParser,
)
from observe.ship import (  # noqa: E402
    CONTENT_TYPE,
    HEADER_NODE,
    HEADER_ROWS,
    HEADER_SEQ,
    HEADER_STREAM,
    Shipment,
    Shipper,
    Spool,
    decode_shipment,
    encode_shipment,
    http_post,
)
from observe.state import Checkpoint, FlowStore, IngestCursor  # noqa: E402
from observe.watch import Backoff  # noqa: E402

NAMESPACE = "ingest"
NODE_SA = DEFAULT_ALLOW[0]
IDLE_SECONDS = 5.0
#: Seconds between the latency node's record batches (the tracer's come every 1 s).
SOURCE_PERIOD = 0.25

# -- a node's traffic, as its tracer prints it ---------------------------------------------------
SERVICE_PORTS = (80, 8080, 443, 5432, 6379, 9090, 3306, 8443, 9092, 27017, 15012, 50051)
COMMS = ("java", "python3", "node", "envoy", "nginx", "postgres", "redis-server", "ruby",
         "dotnet", "php-fpm", "gunicorn", "server")
HOST_COMMS = (b"kubelet", b"containerd")
PODS_PER_NODE = 16
NODES_IN_CLUSTER = 64
#: Above Linux's PID_MAX_LIMIT (4,194,304): the host processes' pids never name a process of
#: this machine, so ProcessCgroups' /proc fallback finds nothing (as for an exited process).
HOST_PID = 4_194_305
EPHEMERAL = (32768, 60999)
#: Socket kinds and their shares: a pod's client socket to a remote pod or outside, the
#: kubelet's to the API server, a pod's server socket for a remote client, a local pair (one
#: entry with both sockets), a client reset while established, refused, no answer.
KINDS = ("out", "host", "in", "pair", "reset", "refused", "noanswer")
MIX = (0.47, 0.03, 0.22, 0.15, 0.05, 0.04, 0.04)


def _bits(*states: int) -> int:
    return sum(1 << s for s in states)


def _word(role: int, bits: int, last: int, err: int, extra: int) -> int:
    """observe.ebpf.WORD: role, extra (1: FIN received, 2: all sent acknowledged), the last
    state before CLOSE, sk_err, the states passed."""
    return role | extra << 2 | last << 4 | (err & 0xFF) << 8 | bits << 16


def _le4(a: int, b: int, c: int, d: int) -> int:
    """An IPv4 address as the program prints it: its 4 bytes read little-endian."""
    return a | b << 8 | c << 16 | d << 24


CLIENT_ACTIVE = _word(1, _bits(SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE),
                      FIN_WAIT2, 0, 3)
CLIENT_PASSIVE = _word(1, _bits(SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK, CLOSE),
                       LAST_ACK, 0, 3)
SERVER_ACTIVE = _word(2, _bits(SYN_RECV, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE),
                      FIN_WAIT2, 0, 3)
SERVER_PASSIVE = _word(2, _bits(SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK, CLOSE),
                       LAST_ACK, 0, 3)
CLIENT_RESET = _word(1, _bits(SYN_SENT, ESTABLISHED, CLOSE), ESTABLISHED, errno.ECONNRESET, 2)
CLIENT_REFUSED = _word(1, _bits(SYN_SENT, CLOSE), SYN_SENT, errno.ECONNREFUSED, 0)
CLIENT_NOANSWER = _word(1, _bits(SYN_SENT, CLOSE), SYN_SENT, errno.ETIMEDOUT, 0)


class NodeTraffic:
    """One node: its pods (cgroup directories under ``cgroup_root/<node>``), its tracer's
    parser, and the traffic it sees (seeded; each call continues the node's clock)."""

    def __init__(self, index: int, cgroup_root: Path, *, seed: int = 1) -> None:
        self.index = index
        self.node = f"node-{index}"
        self.rng = np.random.default_rng([seed, index])
        root = cgroup_root / self.node
        cgids: list[int] = []
        pids: list[int] = []
        for _ in range(PODS_PER_NODE):
            u = self.rng.bytes(16).hex()
            uid = f"{u[:8]}-{u[8:12]}-4{u[13:16]}-8{u[17:20]}-{u[20:32]}"
            scope = (root / "kubepods.slice" / "kubepods-burstable.slice"
                     / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
                     / f"cri-containerd-{self.rng.bytes(32).hex()}.scope")
            scope.mkdir(parents=True, exist_ok=True)
            cgids.append(scope.stat().st_ino)
            pids.append(int(self.rng.integers(2_000, 4_000_000)))
        host = root / "system.slice" / "kubelet.service"
        host.mkdir(parents=True, exist_ok=True)
        self.cgids = np.array(cgids, np.int64)
        self.pids = np.array(pids, np.int64)
        self.host_cgid = host.stat().st_ino
        self.comms = [COMMS[j % len(COMMS)].encode() for j in range(PODS_PER_NODE)]
        self.serving = np.array([SERVICE_PORTS[j % len(SERVICE_PORTS)]
                                 for j in range(PODS_PER_NODE)])
        self.pod_ip = np.array([_le4(10, 244, index, j + 2) for j in range(PODS_PER_NODE)],
                               np.int64)
        self.node_ip = _le4(10, 0, index // 250, index % 250 + 10)
        self.clock_ns = 3_600 * 10**9  # boot-relative: up for an hour
        self.parser = TraceParser(self.node, boot_offset_ns=1_790_000_000 * 10**9,
                                  cgroups=ProcessCgroups(cgroup_root=root), ports=EPHEMERAL)
        self.rest = self.parser.take()  # (none yet)

    def records(self, n: int, rate: float) -> pa.RecordBatch:
        """The next ``n`` flow records (FLOW_SCHEMA), connections closing at ``rate``/s."""
        while self.rest.num_rows + self.parser.pending < n:
            missing = n - self.rest.num_rows - self.parser.pending
            self.parser.feed(self.dump(max(1000, int(missing / 1.1)), rate))
        batch = pa.concat_batches([self.rest, self.parser.take()])
        self.rest = batch.slice(n)
        return batch.slice(0, n)

    def dump(self, lines: int, rate: float) -> bytes:
        """``lines`` rotation map entries closing at ``rate`` per second, in 500 ms ticks."""
        rng, n = self.rng, lines
        kind = rng.choice(len(KINDS), size=n, p=MIX)
        out, host, inn, pair, reset, refused, noans = (kind == k for k in range(len(KINDS)))
        client = out | host | reset | refused | noans
        failed = refused | noans
        ends = self.clock_ns + np.cumsum(rng.exponential(1e9 / rate, n)).astype(np.int64)
        self.clock_ns = int(ends[-1]) + 1
        dur = np.minimum(rng.lognormal(np.log(30e6), 1.6, n), 300e9).astype(np.int64)
        dur = np.where(refused, rng.integers(50_000, 400_000, n), dur)
        dur = np.where(noans, rng.integers(1_000_000_000, 3_000_000_000, n), dur)
        starts = ends - dur
        pod = rng.integers(0, PODS_PER_NODE, n)
        other = (pod + rng.integers(1, PODS_PER_NODE, n)) % PODS_PER_NODE
        rnode = (self.index + rng.integers(1, NODES_IN_CLUSTER, n)) % NODES_IN_CLUSTER
        remote = 10 | 244 << 8 | rnode << 16 | rng.integers(2, 42, n) << 24
        external = out & (rng.random(n) < 0.05)
        remote = np.where(external, _le4(203, 0, 113, 0) | rng.integers(1, 255, n) << 24,
                          remote)
        svc = np.array(SERVICE_PORTS)[rng.integers(0, len(SERVICE_PORTS), n)]
        svc = np.where(external, 443, np.where(host, 6443, svc))
        remote = np.where(host, _le4(10, 0, 0, 1), np.where(pair, self.pod_ip[other], remote))
        local = np.where(host, self.node_ip, self.pod_ip[pod])
        eph = rng.integers(EPHEMERAL[0], EPHEMERAL[1] + 1, n)
        lport = np.where(client, eph, self.serving[pod])
        rport = np.where(client, svc, eph)
        sent = np.minimum(rng.lognormal(np.log(700), 1.5, n), 5e7).astype(np.int64)
        recv = np.minimum(rng.lognormal(np.log(3000), 1.8, n), 5e7).astype(np.int64)
        active = rng.random(n) < 0.5
        word = np.select(
            [out | host, inn | pair, reset, refused, noans],
            [np.where(active, CLIENT_ACTIVE, CLIENT_PASSIVE),
             np.where(active, SERVER_ACTIVE, SERVER_PASSIVE),
             CLIENT_RESET, CLIENT_REFUSED, CLIENT_NOANSWER])
        # bytes_acked / bytes_received count sequence space: the client's SYN, and a FIN
        # (not on a reset; a failed attempt never got that far).
        fin = (~reset).astype(np.int64)
        acked = np.where(failed, 0, sent + (client & ~failed) + fin)
        rcvd = np.where(failed, 0, recv + fin)
        pid = np.where(host, HOST_PID + (rng.random(n) < 0.5), self.pids[pod])
        cgid = np.where(host, self.host_cgid, self.cgids[pod])
        # A local pair: this entry is the server's (it closed second) with the client's
        # fields, the client having started a little before and closed a little before.
        peer_word = np.where(active, CLIENT_PASSIVE, CLIENT_ACTIVE) | self.pids[other] << 32
        peer_start = starts - rng.integers(50_000, 200_000, n)
        peer_end = ends - rng.integers(10_000, 100_000, n)
        cpu = rng.integers(0, 8, n)
        tick = ((ends - ends[0]) // (TICK_MS * 1_000_000)).tolist()
        comm = [HOST_COMMS[p - HOST_PID] if h else self.comms[q]
                for h, p, q in zip(host.tolist(), pid.tolist(), pod.tolist(), strict=True)]
        peer_comm = [self.comms[o] for o in other.tolist()]
        rows = zip(ends.tolist(), cpu.tolist(), local.tolist(), remote.tolist(),
                   (lport << 16 | rport).tolist(), (word | pid << 32).tolist(),
                   starts.tolist(), cgid.tolist(), acked.tolist(), rcvd.tolist(),
                   pair.tolist(), peer_word.tolist(), peer_start.tolist(), peer_end.tolist(),
                   self.cgids[other].tolist(), (recv + 2).tolist(), (sent + 1).tolist(),
                   strict=True)
        parts: list[bytes] = []
        count, last_tick = 0, tick[0]
        for k, (e, c, lo, ro, pt, wp, s, g, a, r, pr, pw, ps, pe, pg, pa_, pr_) in \
                enumerate(rows):
            if tick[k] != last_tick:  # the tick prints the map, its count, the end marker
                parts.append(b"\n@N%s: %d\n\nE %016x\n" % (
                    ROTATION_MAPS[last_tick % 4].encode(), count, e))
                count, last_tick = 0, tick[k]
            letter = ROTATION_MAPS[tick[k] % 4].encode()
            if pr:
                parts.append(b"@R%s[%d, %d]: (0, %d, 0, %d, %d, %d, %d, %d, %d, %d, %d, %d, %d, "
                             b"%d, %d, %d, %s, %s)\n" % (letter, e, c, lo, ro, pt, wp, s, g, a,
                                                         r, pw, ps, pe, pg, pa_, pr_,
                                                         peer_comm[k], comm[k]))
            else:
                parts.append(b"@R%s[%d, %d]: (0, %d, 0, %d, %d, %d, %d, %d, %d, %d, 0, 0, 0, 0, "
                             b"0, 0, , %s)\n" % (letter, e, c, lo, ro, pt, wp, s, g, a, r,
                                                 comm[k]))
            count += 1
        parts.append(b"\n@N%s: %d\n\nE %016x\n" % (ROTATION_MAPS[last_tick % 4].encode(), count,
                                                    self.clock_ns))
        return b"".join(parts)


# -- the observer --------------------------------------------------------------------------------
class ObserverProcess:
    def __init__(self, tmp: Path, api_url: str) -> None:
        self.state = tmp / "state"
        self.log = tmp / "observer.log"
        self.port = free_port()
        cmd = [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
               _kubeconfig(tmp, api_url), "-n", NAMESPACE, "--state", str(self.state),
               "--emit-every", "0", "--flush-every", "5", "--listen",
               f"127.0.0.1:{self.port}", "-q"]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the observer exited: {self.tail()}")
            try:
                if self.metric("meshwright_checkpoint_seq") is not None:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the observer did not start: {self.tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/flows"

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Store:
    """Rows and flow parts in the observer's store (no compaction runs: no emits)."""

    rows: int
    parts: int
    bytes: int

    @classmethod
    def of(cls, state: Path) -> Store:
        for _ in range(20):
            try:
                files = list(flow_files(state))
                return cls(sum(pq.ParquetFile(f).metadata.num_rows for f in files),
                           len(files), sum(f.stat().st_size for f in files))
            except OSError:  # a file replaced meanwhile
                time.sleep(0.05)
        raise RuntimeError("flow files kept changing")


# -- nodes -----------------------------------------------------------------------------------------
class TimedSpool(Spool):
    """A spool that notes when each shipment was cut (added) and acknowledged (delivered)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.added: dict[int, float] = {}
        self.acked: dict[int, float] = {}

    def add(self, body: bytes, rows: int, *, zstd: bool = True) -> Shipment:
        shipment = super().add(body, rows, zstd=zstd)
        self.added[shipment.seq] = time.monotonic()
        return shipment

    def delivered(self, shipment: Shipment) -> None:
        self.acked[shipment.seq] = time.monotonic()
        super().delivered(shipment)


def token_file(tmp: Path, api: WatchApiServer, node: str) -> Path:
    """A pod-bound service-account token of ``node``'s tracer (its TokenReview names it)."""
    path = tmp / f"token-{node}"
    api.add_token(f"token-{node}-5e1f", NODE_SA, node=node)
    path.write_text(f"token-{node}-5e1f\n")
    return path


def fast_backoff() -> Backoff:
    return Backoff(base=0.05, cap=0.5)


def percentile(values: list[float], q: float) -> float:
    """Linear between the closest ranks (numpy's default)."""
    return float(np.percentile(np.array(values), q * 100))


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full
    (``TcpExt: ListenOverflows``, the whole machine)."""
    names: list[str] = []
    for line in Path("/proc/net/netstat").read_text().splitlines():
        if line.startswith("TcpExt:"):
            if not names:
                names = line.split()
            else:
                return int(dict(zip(names, line.split(), strict=True))["ListenOverflows"])
    return 0


@dataclass
class Latency:
    records: int
    seconds: float
    shipments: list[float]
    rows_per_shipment: float
    observer_cpu: float
    checked_mean: float


def latency_phase(tmp: Path, api: WatchApiServer, obs: ObserverProcess, node: NodeTraffic,
                  rate: float, seconds: float, flush_every: float) -> Latency:
    per = max(1, round(rate * SOURCE_PERIOD))
    steps = max(1, round(seconds / SOURCE_PERIOD))
    batch = node.records(per * steps, rate)
    spool = TimedSpool(tmp / f"spool-{node.node}")

    def source() -> Iterator[pa.RecordBatch]:
        start = time.monotonic()
        for k in range(steps):
            time.sleep(max(0.0, start + (k + 1) * SOURCE_PERIOD - time.monotonic()))
            yield batch.slice(k * per, per)

    shipper = Shipper(obs.url, spool, node=node.node, token_file=token_file(tmp, api, node.node),
                      flush_every=flush_every, backoff=fast_backoff)
    cpu0, t0 = obs.cpu(), time.monotonic()
    stats = shipper.run(source())
    wall, cpu = time.monotonic() - t0, obs.cpu() - cpu0
    if stats.delivered != stats.shipments or stats.rejected or stats.duplicates:
        raise RuntimeError(f"latency node: {stats}")
    took = [spool.acked[s] - spool.added[s] for s in sorted(spool.added)]
    return Latency(stats.rows_delivered, wall, took, stats.rows_delivered / len(took), cpu,
                   stats.latency_mean)


@dataclass
class Throughput:
    nodes: int
    shipments: int
    records: int
    seconds: float
    stored: int
    parts: int
    observer_cpu: float
    observer_rss: float
    sender_cpu: float
    encode_cpu: float
    body_bytes: int
    ipc_bytes: int
    arrow_bytes: int
    sample_rows: int
    parquet_bytes: int
    overflows: int
    failures: dict[str, int] = field(default_factory=dict)
    batches: list[list[pa.RecordBatch]] = field(default_factory=list, repr=False)
    last: tuple[str, Shipment, bytes, str] | None = None


def throughput_phase(tmp: Path, api: WatchApiServer, obs: ObserverProcess,
                     nodes: list[NodeTraffic], shipments: int, records: int,
                     rate: float) -> Throughput:
    n = len(nodes)
    spools: list[Spool] = []
    per_node: list[list[pa.RecordBatch]] = []
    encode_cpu = 0.0
    body_bytes = ipc_bytes = arrow_bytes = sample_rows = 0
    last: tuple[str, Shipment, bytes, str] | None = None
    for node in nodes:
        big = node.records(shipments * records, rate)
        pieces = [big.slice(j * records, records) for j in range(shipments)]
        spool = Spool(tmp / f"spool-{n}-{node.node}")
        c0 = time.process_time()
        for piece in pieces:  # what a node's shipper does at each cut
            shipment = spool.add(encode_shipment([piece]), records)
        encode_cpu += time.process_time() - c0
        for s in spool.pending():
            body_bytes += s.size
        # Sizes of one shipment per node: uncompressed IPC, and in memory once decoded.
        ipc_bytes += len(encode_shipment([pieces[0]], zstd=False))
        body = spool.read(spool.pending()[0]) or b""
        arrow_bytes += sum(b.nbytes for b in decode_shipment(body, "size", encoding="zstd"))
        sample_rows += records
        last = (node.node, shipment, spool.read(shipment) or b"", spool.stream)
        spools.append(spool)
        per_node.append(pieces)

    before = Store.of(obs.state)
    shippers = [Shipper(obs.url, spool, node=node.node,
                        token_file=token_file(tmp, api, node.node), flush_every=60.0,
                        timeout=60.0, backoff=fast_backoff)
                for node, spool in zip(nodes, spools, strict=True)]
    results: list[object] = [None] * n

    def deliver(k: int) -> None:
        results[k] = shippers[k].run(iter(()), drain_timeout=600.0)

    threads = [threading.Thread(target=deliver, args=(k,)) for k in range(n)]
    cpu0, mine0, t0 = obs.cpu(), time.process_time(), time.monotonic()
    overflows0 = listen_overflows()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - t0, obs.cpu() - cpu0
    sender_cpu = time.process_time() - mine0
    overflows = listen_overflows() - overflows0
    after = Store.of(obs.state)
    failures: dict[str, int] = {}
    for sh in shippers:
        st = sh.stats
        if st.delivered != shipments or st.rejected or st.duplicates:
            raise RuntimeError(f"{sh.node}: {st}")
        for kind, count in st.failures.items():
            failures[kind] = failures.get(kind, 0) + count
    return Throughput(n, n * shipments, n * shipments * records, wall, after.rows - before.rows,
                      after.parts - before.parts, cpu, obs.peak_rss_mib(), sender_cpu,
                      encode_cpu, body_bytes, ipc_bytes, arrow_bytes, sample_rows,
                      after.bytes - before.bytes, overflows, failures, per_node, last)


@dataclass
class Reference:
    records: int
    commits: int
    seconds: float
    cpu: float


def reference_phase(tmp: Path, result: Throughput) -> Reference:
    """The same records committed straight into a FlowStore, ``shipments per commit`` as the
    observer committed them, in the order it got them (round robin over the nodes)."""
    per_commit = max(1, round(result.shipments / max(1, result.parts)))
    order = [(k, j) for j in range(len(result.batches[0])) for k in range(result.nodes)]
    store = FlowStore(tmp / "reference")
    rows = commits = 0
    cursors: dict[str, IngestCursor] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(order), per_commit):
        group = order[i:i + per_commit]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for k, j in group:
            cursors[f"{k:032x}"] = IngestCursor(j + 1, f"node-{k}", stamp)
        rows += store.commit([result.batches[k][j] for k, j in group],
                             Checkpoint(ingest=dict(cursors)), inventory=commits == 0)
        commits += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rows != result.records:
        raise RuntimeError(f"reference stored {rows:,} of {result.records:,} rows")
    return Reference(rows, commits, seconds, cpu)


def http_overhead(url: str, last: tuple[str, Shipment, bytes, str]) -> tuple[int, int, str]:
    """(request header bytes, answer bytes, result) of one stored shipment sent again: a
    duplicate, acknowledged and not stored. The request's headers are those http.client
    sends for :func:`observe.ship.http_post` (request line, Host, Accept-Encoding)."""
    node, shipment, body, stream = last
    token = f"token-{node}-5e1f"
    headers = {"Content-Type": CONTENT_TYPE, HEADER_NODE: node, HEADER_STREAM: stream,
               HEADER_SEQ: str(shipment.seq), HEADER_ROWS: str(shipment.rows),
               "Content-Encoding": "zstd", "Authorization": f"Bearer {token}"}
    resp = http_post(url, body, headers, 30.0)
    host = url.split("/")[2]
    sent = {"Host": host, "Accept-Encoding": "identity", **headers,
            "Content-Length": str(len(body))}
    request = len("POST /v1/flows HTTP/1.1\r\n") + sum(
        len(f"{k}: {v}\r\n") for k, v in sent.items()) + 2
    answer = len(f"HTTP/1.0 {resp.status} {http.client.responses[resp.status]}\r\n") + sum(
        len(f"{k}: {v}\r\n") for k, v in resp.headers.items()) + 2 + len(resp.body)
    result = resp.body.decode(errors="replace").strip() if resp.status == 200 else (
        f"HTTP {resp.status}")
    return request, answer, result


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 20])
    ap.add_argument("--shipments", type=int, default=10, help="per node (throughput)")
    ap.add_argument("--records", type=int, default=5000, help="per shipment (throughput)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="records/s of the latency node")
    ap.add_argument("--latency-seconds", type=float, default=60.0)
    ap.add_argument("--flush-every", type=float, default=1.0,
                    help="the latency node's shipper cuts a shipment this often (s)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if max(args.nodes) >= NODES_IN_CLUSTER:
        ap.error(f"at most {NODES_IN_CLUSTER - 1} nodes")

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshwright-ingest-") as tmp_name, \
            WatchApiServer(hold_seconds=30.0, bookmark_seconds=10.0) as api:
        tmp = Path(tmp_name)
        api.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": NAMESPACE, "uid": "ns-ingest"}})
        cgroups = tmp / "cgroup"
        traffic: dict[int, NodeTraffic] = {}

        def nodes(count: int) -> list[NodeTraffic]:
            for k in range(count):
                traffic.setdefault(k, NodeTraffic(k, cgroups))
            return [traffic[k] for k in range(count)]

        obs = ObserverProcess(tmp, api.url)
        try:
            time.sleep(1.0)  # start-up settles (first lists and commits)
            cpu0 = obs.cpu()
            time.sleep(IDLE_SECONDS)
            idle = (obs.cpu() - cpu0) / IDLE_SECONDS
            lat_node = NodeTraffic(NODES_IN_CLUSTER - 1, cgroups)
            lat = latency_phase(tmp, api, obs, lat_node, args.rate, args.latency_seconds,
                                args.flush_every)
            runs = [throughput_phase(tmp, api, obs, nodes(n), args.shipments, args.records,
                                     args.rate) for n in args.nodes]
            biggest = max(runs, key=lambda r: r.records)
            ref = reference_phase(tmp, biggest)
            assert biggest.last is not None
            req_bytes, answer_bytes, again = http_overhead(obs.url, biggest.last)
            total = Store.of(obs.state).rows
        finally:
            code = obs.stop()
        final = Store.of(obs.state).rows
    elapsed = time.monotonic() - began

    sent = lat.records + sum(r.records for r in runs)
    ok = (code == 0 and final == total == sent and all(r.stored == r.records for r in runs)
          and '"duplicate"' in again)
    lines = report(args, idle, lat, runs, ref, req_bytes, answer_bytes, again, sent, final,
                   code, elapsed, ok)
    print("\n".join(lines))
    if not args.no_record:
        append_results("node flows to the observer (POST /v1/flows)", lines)
    return 0 if ok else 1


def report(args: argparse.Namespace, idle: float, lat: Latency, runs: list[Throughput],
           ref: Reference, req_bytes: int, answer_bytes: int, again: str, sent: int,
           final: int, code: int, elapsed: float, ok: bool) -> list[str]:
    ms = [t * 1000 for t in lat.shipments]
    rate = lat.records / lat.seconds
    gross = lat.observer_cpu / lat.seconds
    net = gross - idle
    biggest = max(runs, key=lambda r: r.records)
    ingest_rate = biggest.stored / biggest.seconds
    ref_rate = ref.records / ref.seconds
    sizes = [
        ("zstd body (on the wire)", biggest.body_bytes / biggest.records),
        ("Arrow IPC stream, uncompressed", biggest.ipc_bytes / biggest.sample_rows),
        ("Arrow in memory (decoded shipment)", biggest.arrow_bytes / biggest.sample_rows),
        ("Parquet in the store", biggest.parquet_bytes / biggest.stored),
    ]
    out = [
        f"`python benchmarks/ingest_throughput.py --nodes {' '.join(map(str, args.nodes))} "
        f"--shipments {args.shipments} --records {args.records} --rate {args.rate:g} "
        f"--latency-seconds {args.latency_seconds:g} --flush-every {args.flush_every:g}` "
        f"({elapsed:.0f} s): the observer (`meshwright observe --kube --listen`, commits "
        "for shipments at most every 0.25 s) is a child process; the fake API server (1 "
        "namespace, no pods; TokenReviews) and the nodes (`observe.ship.Shipper`, a thread "
        "each) are in the benchmark process, on the same cores. Records: synthetic bpftrace "
        "rotation-map output of 16-pod nodes parsed by `observe.ebpf.TraceParser` "
        "(containers and pods from a cgroup tree), 47 columns as the tracer fills them.",
        "",
        f"Latency, one node at {rate:,.0f} records/s for {lat.seconds:.0f} s, a shipment cut "
        f"every {args.flush_every:g} s ({len(ms)} shipments, {lat.rows_per_shipment:,.0f} "
        "records each on average), from the cut (in the spool) to the 2xx:",
        "",
        "| mean | p50 | p99 | max |",
        "|---|---|---|---|",
        f"| {sum(ms) / len(ms):.0f} ms | {percentile(ms, 0.50):.0f} ms | "
        f"{percentile(ms, 0.99):.0f} ms | {max(ms):.0f} ms |",
        "",
        f"(the shipper's own mean: {lat.checked_mean * 1000:.0f} ms). Observer CPU at "
        f"{rate:,.0f} records/s: {gross:.1%} of a core, of which {idle:.1%} idle (watches, "
        f"main loop; measured {IDLE_SECONDS:.0f} s without traffic): {net / rate * 1000:.2%} "
        "of a core per 1,000 records/s.",
        "",
        "Throughput: every node with a backlog of shipments already spooled, delivered at "
        "once (one request in flight per node):",
        "",
        "| nodes | shipments x records | records stored | s | records/s | shipments per "
        "commit | observer CPU s | observer % of a core per 1,000 records/s | observer peak "
        "RSS MiB | retried attempts | listen queue overflows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        retried = ", ".join(f"{k} {v}" for k, v in sorted(r.failures.items()))
        out.append(
            f"| {r.nodes} | {r.shipments // r.nodes} x {r.records // r.shipments:,} | "
            f"{r.stored:,} | {r.seconds:.1f} | {r.stored / r.seconds:,.0f} | "
            f"{r.shipments / max(1, r.parts):.1f} | {r.observer_cpu:.1f} | "
            f"{r.observer_cpu / r.stored * 1000 * 100:.2f} | {r.observer_rss:.0f} | "
            f"{sum(r.failures.values())}{f' ({retried})' if retried else ''} | "
            f"{r.overflows} |")
    out += [
        "",
        f"Reference, same process: the {biggest.stored:,} records of the {biggest.nodes}-node "
        f"run committed straight into a FlowStore in {ref.commits} commits (as many shipments "
        f"per commit as the observer made; no HTTP, no encoding, no TokenReview): "
        f"{ref.seconds:.1f} s, {ref_rate:,.0f} records/s ({ref.cpu:.1f} CPU s). Ingest over "
        f"HTTP: {ingest_rate / ref_rate:.0%} of it.",
        "",
        "Node side (outside the windows above): encoding a shipment (Arrow IPC + zstd) and "
        f"spooling it: {biggest.encode_cpu / biggest.records * 1e6:.1f} CPU µs per record; "
        f"the {biggest.nodes} senders (file read + POST, with the fake API server) used "
        f"{biggest.sender_cpu:.1f} CPU s during the {biggest.nodes}-node run.",
        "",
        "| bytes per record | |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in sizes),
        f"| HTTP headers per shipment (request / answer) | {req_bytes} / {answer_bytes} |",
        "",
        f"Exactly once: {sent:,} records sent, {final:,} in the store; a stored shipment sent "
        f"again was answered {again}; observer exit code after SIGTERM: {code}"
        f"{'' if ok else ' - CHECK FAILED'}.",
    ]
    return out


if __name__ == "__main__":
    sys.exit(main())
