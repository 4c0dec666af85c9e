"""How fast does meshwright turn a packet capture into flows, next to tshark and cat?

    python benchmarks/capture_throughput.py [--packets 1000000] [--repeat 3] [--no-record]

Generates a pod-to-pod pcap with ``benchmarks/gen_pcap.py`` into ``benchmarks/data/``
(git-ignored) unless it is there, then times, in the same run and on the same file, each as
its own process: ``cat FILE > /dev/null`` (reading the bytes), ``tshark -q -z conv,tcp -r
FILE`` (the tool people would otherwise use for TCP conversations), meshwright's reader and
connection tracker alone (a small ``python -c`` child running ``read_packets`` +
``ConnectionTracker`` over the file), and the whole ``meshwright observe FILE -o
<tmp>.parquet`` command. A step that fails (e.g. a meshwright without capture support in
``observe``) is reported as failed with its last error line. Prints packets/s and the speed-up
over tshark, and appends a dated entry to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from observe_throughput import (
    DATA,
    ROOT,
    Timing,
    append_results,
    median_run,
    meshwright_cmd,
    run_timed,
)

# Reader + tracker only: what the packet path costs before classification and Parquet.
READ_TRACK = r'''
import sys
from observe.conntrack import ConnectionTracker
from observe.pcap import CaptureStats, read_packets
stats = CaptureStats(origin=sys.argv[1])
tracker = ConnectionTracker()
conns = http = 0
with open(sys.argv[1], "rb") as fh:
    for batch in read_packets(fh, sys.argv[1], stats=stats):
        tracker.update(batch)
        out = tracker.flush()
        conns += out.connections.num_rows
        http += out.http.num_rows
out = tracker.finish()
conns += out.connections.num_rows
http += out.http.num_rows
print(stats.frames, stats.packets, conns, http)
'''


def ensure_capture(packets: int) -> Path:
    suffix = f"{packets // 1_000_000}m" if packets % 1_000_000 == 0 else str(packets)
    path = DATA / f"pods_{suffix}.pcap"
    if path.exists() and path.stat().st_size > 0:
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pcap.part")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gen_pcap.py"), str(tmp),
                    "--packets", str(packets)], check=True)
    tmp.rename(path)
    return path


def count_packets(path: Path) -> int:
    """Records in the file (the generator writes a few less than asked for)."""
    from observe.pcap import CaptureStats, read_packets

    stats = CaptureStats(origin=path.name)
    with path.open("rb") as fh:
        for _ in read_packets(fh, path.name, stats=stats):
            pass
    return stats.frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each step, interleaved; the median is reported (default 3)")
    args = ap.parse_args(argv)
    path = ensure_capture(args.packets)
    n = count_packets(path)
    tshark = shutil.which("tshark")

    runs: dict[str, list[Timing]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps = [
            ("cat FILE > /dev/null", ["sh", "-c", 'cat "$1" > /dev/null', "sh", str(path)]),
            ("tshark -q -z conv,tcp",
             [tshark or "tshark", "-q", "-z", "conv,tcp", "-r", str(path)]),
            ("meshwright reader + tracker", [sys.executable, "-c", READ_TRACK, str(path)]),
            ("meshwright observe", [*meshwright_cmd(), "observe", str(path), "-o",
                                    f"{tmp}/flows.parquet"]),
        ]
        # Rounds interleave the steps so that a slow spell of the machine hits all of them.
        for _ in range(max(1, args.repeat)):
            for name, cmd in steps:
                if name.startswith("tshark") and tshark is None:
                    runs.setdefault(name, []).append(
                        Timing(name, 0.0, n, ok=False, note="tshark is not installed"))
                    continue
                runs.setdefault(name, []).append(run_timed(name, cmd, n))
    results = [median_run(r) for r in runs.values()]

    ref = results[1]
    rows = ["| step | seconds | packets/s | speed-up vs tshark | peak RSS MiB |",
            "|---|---|---|---|---|"]
    for r in results:
        if not r.ok:
            rows.append(f"| {r.name} | failed ({r.note}) | - | - | - |")
            continue
        speed = f"{ref.seconds / r.seconds:.1f}" if ref.ok else "-"
        rows.append(f"| {r.name} | {r.seconds:.2f} | {r.rate:,.0f} | {speed} | "
                    f"{r.rss_kb / 1024:.0f} |")
    rows.append("")
    rows.append("speed-up vs tshark: tshark seconds / step seconds (each step is a whole "
                "process: start-up included).")
    rows.append(f"Median of {max(1, args.repeat)} interleaved runs per step.")
    rows.append(f"Input: {path.name}, {n:,} packets, {path.stat().st_size / 2**20:.0f} MiB "
                "(benchmarks/gen_pcap.py: Ethernet pcap, pod-to-pod TCP with Istio mTLS "
                "ClientHellos, HTTP/1.1 and h2c).")
    print("\n".join(rows))
    if not args.no_record:
        append_results("capture throughput", rows)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
