"""Soak: ``meshwright observe --kube`` fed >= 10,000 proxy log lines/s from the local fake API
server for a bounded time; memory must stay flat; CPU per 1,000 lines/s is measured.

    python benchmarks/observe_soak.py [--seconds 120] [--rate 12000] [--pods 24] [--no-churn]
                                      [--emit-every 60s] [--no-record]

The load is tests/support/soak_load.py (the same as tests/meshwright/test_observe_soak.py): a
fake API server in a process of its own with ``--pods`` meshed pods whose istio-proxy logs grow
by real Istio access lines (a unique path each) at ``--rate`` lines/s in total, pods deleted and
added (one on a deleted pod's IP) and log responses cut mid-line. The observer is a child
process (8 log workers, slices of 5 s, commits every 5 s; no emission unless ``--emit-every``),
so its CPU time (``/proc/<pid>/stat`` utime + stime; emit processes it waited for counted
apart, cutime + cstime) and RSS (``VmRSS``, every 2 s) are its own. At the end the writer stops,
the observer catches up, and it is stopped with SIGTERM; the store is checked: rows == lines
written. Appends a dated entry to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.soak_load import (  # noqa: E402
    NAMESPACE,
    TICKS,
    SoakCluster,
    cpu_seconds,
    rss_mib,
    stored_rows,
)


def _children_cpu(pid: int) -> float:
    """CPU of the process's children it waited for (its emit processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / TICKS


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--rate", type=int, default=12_000, help="lines/s written in total")
    ap.add_argument("--pods", type=int, default=24)
    ap.add_argument("--no-churn", action="store_true", help="no pod churn, no cut streams")
    ap.add_argument("--emit-every", default="0", metavar="SPAN",
                    help="re-learn in the background this often (default: never)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    port = _free_port()
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, SoakCluster(
            rate=args.rate, pods=args.pods, planned=args.seconds,
            churn=not args.no_churn) as cluster:
        state = Path(tmp) / "state"
        cmd = [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
               cluster.kubeconfig(Path(tmp)), "-n", NAMESPACE, "--state", str(state),
               "--emit-every", args.emit_every, "--flush-every", "5", "--log-read-timeout",
               "2", "--log-slice", "5", "--listen", f"127.0.0.1:{port}", "-q"]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # start-up (imports, first list) is not measured
            try:
                if _metric(port, "meshwright_log_streams") >= args.pods:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        cluster.start()
        cpu0, emit_cpu0, t0 = cpu_seconds(proc.pid), _children_cpu(proc.pid), time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(2.0)
            samples.append((time.monotonic() - t0, rss_mib(proc.pid)))
        written = cluster.stop()
        # Let the observer catch up with what was written, then measure.
        deadline = time.monotonic() + 120
        while stored_rows(state) < written.written and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu1, emit_cpu1, t1 = cpu_seconds(proc.pid), _children_cpu(proc.pid), time.monotonic()
        emits = _metric(port, "meshwright_emits_total")
        skipped = _metric(port, "meshwright_emit_skipped_total")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        rows = stored_rows(state)

    cpu = cpu1 - cpu0
    emit_cpu = emit_cpu1 - emit_cpu0
    wall = t1 - t0
    rate = written.written / written.seconds
    per_k = cpu / written.written * 1000  # CPU seconds per 1,000 lines = cores per 1,000 lines/s
    third = len(samples) // 3
    early = max(r for t, r in samples[:third]) if third else 0.0
    late = max(r for t, r in samples[-third:]) if third else 0.0
    churn = "no churn" if args.no_churn else "churn: " + ", ".join(
        f"{a} {x} at {t:.0f}s" for t, a, x in written.events)
    print(f"written {written.written:,} lines in {written.seconds:.1f}s ({rate:,.0f}/s); stored "
          f"{rows:,}; exit {code}")
    print(f"observer CPU {cpu:.1f}s over {wall:.1f}s = {cpu / wall:.2f} cores; "
          f"{per_k * 100:.2f}% of a core per 1,000 lines/s; emit processes {emit_cpu:.1f}s "
          f"({emits:.0f} published, {skipped:.0f} skipped)")
    print(f"RSS MiB max first third {early:.0f}, last third {late:.0f}; samples "
          + ", ".join(f"{r:.0f}" for _, r in samples))
    print(churn)
    ok = rows == written.written and code == 0
    if not args.no_record:
        emitting = ("no emission" if args.emit_every in ("0", "0s", "never") else
                    f"`--emit-every {args.emit_every}` ({emits:.0f} proposals published in the "
                    f"background, {skipped:.0f} skipped, emit processes {emit_cpu:.1f} CPU s "
                    f"not counted above)")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(
                f"\n## observe --kube soak - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                f"{platform.python_version()}, Linux {platform.release()}. "
                f"`python benchmarks/observe_soak.py --seconds {args.seconds:g} --rate "
                f"{args.rate} --pods {args.pods}"
                f"{' --no-churn' if args.no_churn else ''}"
                f"{'' if args.emit_every == '0' else ' --emit-every ' + args.emit_every}`: the "
                f"fake API server (tests/support/soak_load.py, its own process, same machine "
                f"and cores) serves {args.pods} istio-proxy logs; the observer is a child "
                f"process (8 log workers, slices of 5 s, commit every 5 s, {emitting}).\n\n"
                f"| lines written | lines/s | stored rows | observer CPU s | wall s | cores "
                f"| % of a core per 1,000 lines/s | RSS MiB first third max | last third max |\n"
                f"|---|---|---|---|---|---|---|---|---|\n"
                f"| {written.written:,} | {rate:,.0f} | {rows:,} | {cpu:.1f} | {wall:.1f} | "
                f"{cpu / wall:.2f} | {per_k * 100:.2f} | {early:.0f} | {late:.0f} |\n\n"
                f"RSS samples every 2 s (MiB): {', '.join(f'{r:.0f}' for _, r in samples)}.\n"
                f"{churn[0].upper() + churn[1:]}.\n"
                f"Every line stored exactly once: {'yes' if rows == written.written else 'NO'}; "
                f"exit code after SIGTERM: {code}.\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
