"""CPU cost of meshwright's eBPF connection tracer under a sustained loopback connection load.

    python benchmarks/ebpf_overhead.py [--rate 2000] [--seconds 20] [--no-record]   (as root)

A load generator (a server process and a paced client process, plain Python sockets) opens,
uses (16 bytes each way) and closes ``--rate`` new loopback TCP connections per second; the
client counts the connections it really made, so the rate reached is measured, not assumed.
This process runs :func:`observe.ebpf.trace_connections` meanwhile, consuming its batches.
Measured over the load window (after the program is attached, so bpftrace's start-up compile
is not counted):

- tracer CPU: utime+stime of this process plus the bpftrace child (``/proc/<pid>/stat``),
  as a share of one core;
- in-kernel cost: the BPF program runs in the traced processes' own context, so it is
  charged to them: the load generator's CPU per connection with and without the tracer
  (a same-load run without tracing first);
- events lost: connections made vs records the tracer produced for them (client side and
  server side each), and bpftrace's own loss count.

Both ends of every connection are on this machine, so the tracer joins them in the kernel
and prints one line per connection (expanded into a client and a server record); a
connection with its other end on another node costs one line too.

Appends a dated entry to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.observe_throughput import append_results
from observe.ebpf import TraceStats, trace_connections

TICK = os.sysconf("SC_CLK_TCK")
TARGET_SHARE = 0.05
WARMUP_S = 2.0

SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    print(srv.getsockname()[1], flush=True)
    while True:
        c, _ = srv.accept()
        if c.recv(16) == b"q" * 16:
            break
        c.sendall(b"s" * 16)
        c.close()
""")
# Paced client: `rate` connections per second for `seconds`, in 5 ms slots; prints the
# number made and the seconds it took.
CLIENT = textwrap.dedent("""
    import socket, sys, time
    port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    slot = 0.005
    per_slot = rate * slot
    made, due = 0, 0.0
    start = time.monotonic()
    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        due = min(rate * seconds, rate * now + per_slot)
        while made < due:
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"c" * 16)
            c.recv(16)
            c.close()
            made += 1
        time.sleep(max(0.0, slot - (time.monotonic() - start - now)))
    print(made, time.monotonic() - start, flush=True)
""")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def run_load(port: int, rate: float, seconds: float) -> tuple[int, float, float]:
    """(connections made, wall seconds, client CPU seconds)."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(rate), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    usage_before = os.times()
    out, _ = proc.communicate()
    usage_after = os.times()
    made, wall = out.split()
    cpu = (usage_after.children_user - usage_before.children_user
           + usage_after.children_system - usage_before.children_system)
    return int(made), float(wall), cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rate", type=float, default=2000.0, help="new connections per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    server_cpu0 = cpu_seconds(server.pid)
    base_made, _, base_client_cpu = run_load(port, args.rate, args.seconds)
    base_server_cpu = cpu_seconds(server.pid) - server_cpu0

    stop, ready = threading.Event(), threading.Event()
    stats = TraceStats()
    tracer_pid: list[int] = []
    seen = {"outbound": 0, "inbound": 0}

    def consume() -> None:
        for batch in trace_connections(stop=stop, ready=ready, stats=stats, flush_s=1.0,
                                       node="bench", on_start=tracer_pid.append):
            ports = batch.column("dst_port").to_numpy(zero_copy_only=False)
            direction = batch.column("direction").to_numpy(zero_copy_only=False)
            ends = batch.column("tcp_end").to_numpy(zero_copy_only=False)
            mine = (ports == port) & (ends != "open")
            for side in seen:
                seen[side] += int(((direction == side) & mine).sum())

    t = threading.Thread(target=consume)
    t.start()
    if not ready.wait(60):
        stop.set()
        t.join()
        print("tracer did not attach", file=sys.stderr)
        return 1
    time.sleep(1.0)  # let start-up settle
    # Warm-up: the parser's first records initialise Arrow's and numpy's kernels (a one-time
    # cost, reported on its own line, not part of the steady state a node agent runs in).
    warm0 = cpu_seconds(os.getpid()) + cpu_seconds(tracer_pid[0])
    warm_made = run_load(port, args.rate, WARMUP_S)[0]
    time.sleep(1.5)
    warm_cpu = cpu_seconds(os.getpid()) + cpu_seconds(tracer_pid[0]) - warm0
    before_py, before_bt = cpu_seconds(os.getpid()), cpu_seconds(tracer_pid[0])
    before = before_py + before_bt
    server_cpu0 = cpu_seconds(server.pid)
    made, wall, client_cpu = run_load(port, args.rate, args.seconds)
    server_cpu = cpu_seconds(server.pid) - server_cpu0
    after_py, after_bt = cpu_seconds(os.getpid()), cpu_seconds(tracer_pid[0])
    after = after_py + after_bt
    time.sleep(1.5)  # the last closes reach the tracer and a flush
    stop.set()
    t.join(60)
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"q" * 16)
    server.wait(timeout=30)

    rate = made / wall
    share = (after - before) / wall
    per_conn_base = (base_client_cpu + base_server_cpu) / max(base_made, 1) * 1e6
    per_conn = (client_cpu + server_cpu) / max(made, 1) * 1e6
    total = made + warm_made  # the warm-up's connections must be recorded too
    lost_client, lost_server = total - seen["outbound"], total - seen["inbound"]
    ok = share <= TARGET_SHARE and lost_client == 0 and lost_server == 0 and stats.lost == 0 \
        and rate >= args.rate * 0.97
    lines = [
        f"Load: {made:,} loopback connections in {wall:.1f} s = {rate:,.0f} new connections/s "
        f"(target {args.rate:,.0f}); each sends and receives 16 bytes.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| tracer CPU (meshwright + bpftrace), share of one core | {share:.1%} |",
        f"| of which meshwright (Python) / bpftrace | {(after_py - before_py) / wall:.1%} / "
        f"{(after_bt - before_bt) / wall:.1%} |",
        f"| tracer CPU per connection | {(after - before) / max(made, 1) * 1e6:.1f} µs |",
        f"| one-time warm-up: tracer CPU during the first {WARMUP_S:.0f} s of load (before the "
        f"window) | {warm_cpu:.2f} s |",
        f"| load generator CPU per connection, without / with tracing (in-kernel cost) | "
        f"{per_conn_base:.1f} / {per_conn:.1f} µs |",
        f"| connections made (incl. warm-up) / recorded client side / recorded server side | "
        f"{total:,} / "
        f"{seen['outbound']:,} / {seen['inbound']:,} |",
        f"| tracer records for connections / of which local pairs / duplicate pair records | "
        f"{stats.events:,} / {stats.pairs:,} / {stats.duplicates:,} |",
        f"| events lost (bpftrace, full maps) / late ticks / malformed lines | {stats.lost} / "
        f"{stats.late_ticks} / {stats.malformed} |",
        "",
        f"Target: <= {TARGET_SHARE:.0%} of one core at {args.rate:,.0f} connections/s, zero "
        f"lost: {'met' if ok else 'NOT met'}.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append_results("eBPF tracer overhead", lines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
