"""How fast is ``meshwright observe`` next to ``wc -l`` and a naive per-line regex parser?

    python benchmarks/observe_throughput.py [--lines 1000000] [--no-record]

Generates 1 M-line TEXT and JSON dumps into ``benchmarks/data/`` (git-ignored) unless they
are there, then times, in the same run and on the same files: ``wc -l``, a plain per-line
Python regex parser of the TEXT format (a subprocess running a tiny script), and the whole
``meshwright observe FILE -o <tmp>.parquet`` process. Prints lines/s and ratios and appends
a dated entry to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# The baseline a user would write: one compiled regex per line, each match turned into a record
# (named fields, numbers converted, '-' as None), records handed on in batches like a real parser.
NAIVE_PARSER = r'''
import re, sys
q = r'"([^"]*)"'
f = r"(\S+)"
rx = re.compile(r"^\[(\S+)\] " + q + " " + " ".join([f] * 4) + " " + q + " "
                + " ".join([f] * 4) + " " + " ".join([q] * 5) + " " + " ".join([f] * 6) + "$")
names = ("start_time request response_code response_flags response_code_details "
         "connection_termination_details upstream_transport_failure_reason bytes_received "
         "bytes_sent duration upstream_service_time x_forwarded_for user_agent request_id "
         "authority upstream_host upstream_cluster upstream_local_address "
         "downstream_local_address downstream_remote_address requested_server_name "
         "route_name").split()
numeric = {"response_code", "bytes_received", "bytes_sent", "duration"}
ok = bad = 0
batch = []
with open(sys.argv[1], encoding="utf-8", errors="replace") as fh:
    for line in fh:
        m = rx.match(line.rstrip("\n"))
        if m is None:
            bad += 1
            continue
        rec = {}
        for name, value in zip(names, m.groups()):
            if value == "-":
                value = None
            elif name in numeric:
                value = int(value)
            rec[name] = value
        batch.append(rec)
        ok += 1
        if len(batch) >= 65536:
            batch = []
print(ok, bad)
'''


@dataclass
class Timing:
    name: str
    seconds: float
    lines: int
    rss_kb: int = 0
    ok: bool = True
    note: str = ""

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0


def meshwright_cmd() -> list[str]:
    """The installed console script, else the package run from this checkout."""
    exe = shutil.which("meshwright")
    return [exe] if exe else [sys.executable, "-m", "meshwright"]


def ensure_dump(name: str, lines: int, fmt: str, layout: str = "plain") -> Path:
    path = DATA / name
    if path.exists() and path.stat().st_size > 0:
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gen_dump.py"), "--lines",
                    str(lines), "--format", fmt, "--layout", layout, "-o", str(tmp)],
                   check=True)
    tmp.rename(path)
    return path


def run_timed(name: str, cmd: list[str], lines: int) -> Timing:
    """Run ``cmd`` as a child: wall time and that child's own peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        note = ""
        if code != 0:
            err.seek(0)
            out.seek(0)
            tail = (err.read() or out.read()).decode(errors="replace").strip().splitlines()
            note = f"exit {code}: {tail[-1] if tail else ''}"
    # ru_maxrss is KiB on Linux.
    return Timing(name, seconds, lines, usage.ru_maxrss, code == 0, note)


def median_run(timings: list[Timing]) -> Timing:
    """The run with the median time (a failed run wins: it must show)."""
    failed = [t for t in timings if not t.ok]
    if failed:
        return failed[0]
    return sorted(timings, key=lambda t: t.seconds)[len(timings) // 2]


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


def append_results(title: str, body: list[str]) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/; "
                           "newest last.\n", encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(f"\n## {title} - {stamp}\n\nMachine: {machine()}\n\n")
        fh.write("\n".join(body) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each step, interleaved; the median is reported (default 3)")
    args = ap.parse_args(argv)
    n = args.lines
    suffix = f"{n // 1_000_000}m" if n % 1_000_000 == 0 else str(n)
    text = ensure_dump(f"text_{suffix}.log", n, "text")
    js = ensure_dump(f"json_{suffix}.log", n, "json")

    runs: dict[str, list[Timing]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps = [
            ("wc -l (text)", ["wc", "-l", str(text)]),
            ("naive Python regex (text)", [sys.executable, "-c", NAIVE_PARSER, str(text)]),
            *((f"meshwright observe ({label})",
               [*meshwright_cmd(), "observe", str(path), "-o", f"{tmp}/{label}.parquet"])
              for label, path in (("text", text), ("json", js))),
        ]
        # Rounds interleave the steps so that a slow spell of the machine hits all of them.
        for _ in range(max(1, args.repeat)):
            for name, cmd in steps:
                runs.setdefault(name, []).append(run_timed(name, cmd, n))
    results = [median_run(r) for r in runs.values()]

    wc, naive = results[0], results[1]
    rows = ["| step | seconds | lines/s | x wc -l time | speed-up vs regex | peak RSS MiB |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if not r.ok:
            rows.append(f"| {r.name} | failed ({r.note}) | - | - | - | - |")
            continue
        rows.append(f"| {r.name} | {r.seconds:.2f} | {r.rate:,.0f} | "
                    f"{r.seconds / wc.seconds:.1f} | {naive.seconds / r.seconds:.2f} | "
                    f"{r.rss_kb / 1024:.0f} |")
    rows.append("")
    rows.append("x wc -l time: step seconds / wc -l seconds; speed-up vs regex: naive regex "
                "seconds / step seconds (5.0 = five times faster than the regex parser).")
    rows.append(f"Median of {max(1, args.repeat)} interleaved runs per step.")
    rows.append(f"Inputs: {n:,} lines each; {text.name} {text.stat().st_size / 2**20:.0f} MiB, "
                f"{js.name} {js.stat().st_size / 2**20:.0f} MiB (benchmarks/gen_dump.py).")
    print("\n".join(rows))
    if not args.no_record:
        append_results("observe throughput", rows)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
