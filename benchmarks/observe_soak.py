"""Soak: ``meshwright observe --kube`` fed >= 10,000 proxy log lines/s from the local fake API
server for a bounded time; memory must stay flat; CPU per 1,000 lines/s is measured.

    python benchmarks/observe_soak.py [--seconds 60] [--rate 12000] [--pods 24] [--no-record]

The fake API server (tests/support/kube_watch_api.py) runs in this process with ``--pods``
meshed pods; a writer appends real Istio access lines (the istio docs sample, one path per
line) at ``--rate`` lines/s in total. The observer runs as a child process (8 log workers,
commits every 5 s, no emission), so its CPU time (``/proc/<pid>/stat`` utime + stime) and RSS
(``VmRSS``, sampled every 2 s) are its own. At the end it is stopped with SIGTERM and the store
is checked: rows == lines written (every line once). Appends a dated entry to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import pyarrow.parquet as pq  # noqa: E402
from support.kube_watch_api import WatchApiServer, _kubeconfig  # noqa: E402

LINE = (ROOT / "tests" / "data" / "envoy-logs" /
        "istio-docs-access-log-sleep-httpbin.log").read_text().splitlines()[0]
TICKS = os.sysconf("SC_CLK_TCK")


def _pod(name: str, ip: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "soak", "uid": f"uid-{name}",
                         "creationTimestamp": "2020-11-25T00:00:00Z",
                         "labels": {"app": name.rsplit("-", 1)[0]}},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "startTime": "2020-11-25T00:00:00Z"}}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rows(state: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows
               for f in (state / "flows").rglob("*.parquet") if not f.name.startswith("."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=int, default=12_000, help="lines/s written in total")
    ap.add_argument("--pods", type=int, default=24)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    pods = [f"client-{i}" for i in range(args.pods)]
    written = 0
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, WatchApiServer(hold_seconds=30) as srv:
        srv.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "soak", "uid": "ns-soak"}})
        for i, name in enumerate(pods):
            srv.put(_pod(name, f"10.60.{i // 250}.{i % 250 + 1}"))
            # The proxy's start-up line (a log exists from the start: no log is a 404).
            srv.log("soak", name, "istio-proxy", time.time_ns() - 10**9,
                    "2020-11-25T00:00:00.000000Z\tinfo\tEnvoy proxy is ready")
        kubeconfig = _kubeconfig(Path(tmp), srv.url)
        state = Path(tmp) / "state"

        def writer() -> None:
            nonlocal written
            step = 0.05
            per_step = max(1, int(args.rate * step))
            base = time.time_ns()
            nxt = time.monotonic()
            while not stop.is_set():
                with srv.cond:
                    for k in range(per_step):
                        n = written + k
                        pod = pods[n % len(pods)]
                        text = LINE.replace("/status/418", f"/status/{n}")
                        srv.logs.setdefault(("soak", pod, "istio-proxy"), []).append(
                            (base + n * 1000, text))
                    written += per_step
                    srv.cond.notify_all()
                nxt += step
                time.sleep(max(0.0, nxt - time.monotonic()))

        cmd = [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
               kubeconfig, "-n", "soak", "--state", str(state), "--emit-every", "0",
               "--flush-every", "5", "--log-read-timeout", "2", "--log-slice", "5", "-q"]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        time.sleep(3.0)  # start-up (imports, first list) is not part of the soak
        t = threading.Thread(target=writer, daemon=True)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        t.start()
        samples: list[tuple[float, float]] = []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(2.0)
            samples.append((time.monotonic() - t0, _rss_mib(proc.pid)))
        stop.set()
        t.join()
        elapsed_write = time.monotonic() - t0
        # Let the observer catch up with what was written, then measure.
        deadline = time.monotonic() + 60
        while _rows(state) < written and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        rows = _rows(state)

    cpu = cpu1 - cpu0
    wall = t1 - t0
    rate = written / elapsed_write
    per_k = cpu / written * 1000  # CPU seconds per 1,000 lines = cores per 1,000 lines/s
    half = len(samples) // 2
    early = max(r for _, r in samples[:half]) if half else 0.0
    late = max(r for _, r in samples[half:]) if samples else 0.0
    print(f"written {written:,} lines in {elapsed_write:.1f}s ({rate:,.0f}/s); stored {rows:,}; "
          f"exit {code}")
    print(f"observer CPU {cpu:.1f}s over {wall:.1f}s = {cpu / wall:.2f} cores; "
          f"{per_k * 100:.1f}% of a core per 1,000 lines/s")
    print(f"RSS MiB max first half {early:.0f}, second half {late:.0f}; samples "
          + ", ".join(f"{r:.0f}" for _, r in samples))
    ok = rows == written and code == 0
    if not args.no_record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(
                f"\n## observe --kube soak - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                f"{platform.python_version()}, Linux {platform.release()}. "
                f"`python benchmarks/observe_soak.py --seconds {args.seconds:g} --rate "
                f"{args.rate} --pods {args.pods}`: the fake API server (same machine, same "
                f"cores) serves {args.pods} istio-proxy logs; the observer is a child process "
                f"(8 log workers, commit every 5 s, no emission).\n\n"
                f"| lines written | lines/s | stored rows | observer CPU s | wall s | cores "
                f"| % of a core per 1,000 lines/s | RSS MiB first half max | second half max |\n"
                f"|---|---|---|---|---|---|---|---|---|\n"
                f"| {written:,} | {rate:,.0f} | {rows:,} | {cpu:.1f} | {wall:.1f} | "
                f"{cpu / wall:.2f} | {per_k * 100:.1f} | {early:.0f} | {late:.0f} |\n\n"
                f"RSS samples every 2 s (MiB): {', '.join(f'{r:.0f}' for _, r in samples)}.\n"
                f"Every line stored exactly once: {'yes' if rows == written else 'NO'}; "
                f"exit code after SIGTERM: {code}.\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
