"""Does ``meshwright observe`` stream? Peak RSS on 1 M vs 20 M lines.

    python benchmarks/memory_scale.py [--small 1000000] [--large 20000000] [--no-record]

Generates the TEXT dumps into ``benchmarks/data/`` (git-ignored; 20 M lines is ~6 GiB) unless
present, runs ``meshwright observe FILE -o <tmp>.parquet`` on each as a child process, and
reports each child's peak RSS (``os.wait4`` rusage, the child alone) and their ratio. A
streaming reader keeps the ratio near 1; a reader that holds the file grows ~20x. Appends a
dated entry to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.observe_throughput import append_results, ensure_dump, meshwright_cmd, run_timed


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--large", type=int, default=20_000_000)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            dump = ensure_dump(f"text_{_label(n)}.log", n, "text")
            runs.append((dump, run_timed(
                f"meshwright observe {_label(n)} lines",
                [*meshwright_cmd(), "observe", str(dump), "-o", f"{tmp}/{n}.parquet"], n)))

    rows = ["| input | size MiB | seconds | lines/s | peak RSS MiB |", "|---|---|---|---|---|"]
    for dump, r in runs:
        size = dump.stat().st_size / 2**20
        if r.ok:
            rows.append(f"| {r.lines:,} lines | {size:.0f} | {r.seconds:.1f} | {r.rate:,.0f} | "
                        f"{r.rss_kb / 1024:.0f} |")
        else:
            rows.append(f"| {r.lines:,} lines | {size:.0f} | failed ({r.note}) | - | - |")
    (_, small), (_, large) = runs
    ok = small.ok and large.ok and small.rss_kb > 0
    rows.append("")
    if ok:
        rows.append(f"Peak RSS ratio {_label(large.lines)}/{_label(small.lines)}: "
                    f"{large.rss_kb / small.rss_kb:.2f} (input ratio "
                    f"{large.lines / small.lines:.0f}).")
    print("\n".join(rows))
    if not args.no_record:
        append_results("observe memory scale", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
