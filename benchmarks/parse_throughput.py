"""Micro benchmark: vectorized Istio TEXT parsing vs a per-line ``re`` parser.

Generates realistic Istio default-format lines in-process (sidecar inbound/outbound HTTP,
gRPC, TCP, gateway lines with browser user agents), makes 0.1% of them malformed (truncated,
garbage, empty), then times ``parse_text`` and a per-line regex of the same format on the same
lines, checks both agree and that exactly the malformed lines are reported.

    python benchmarks/parse_throughput.py [--lines 1000000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from observe.envoy_format import ISTIO_TEXT_FORMAT, compile_format, parse_text

UAS = (
    "curl/7.73.0-DEV",
    "Go-http-client/1.1",
    "grpc-go/1.59.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0",
    "python-requests/2.31.0",
)
PATHS = ("/status/418", "/productpage", "/api/v1/items?page=2", "/details/0", "/healthz")


def make_line(rng: random.Random, i: int) -> str:
    ts = f"2025-01-30T10:{(i // 60000) % 60:02d}:{(i // 1000) % 60:02d}.{i % 1000:03d}Z"
    rid = f"{rng.getrandbits(32):08x}-6d84-929d-98bd-{rng.getrandbits(48):012x}"
    a, b = rng.randrange(1, 250), rng.randrange(1, 250)
    port = rng.randrange(32768, 60999)
    kind = rng.random()
    if kind < 0.1:  # opaque TCP
        return (
            f'[{ts}] "- - -" 0 - - - "-" {rng.randrange(9999)} {rng.randrange(99999)} '
            f'{rng.randrange(999)} - "-" "-" "-" "-" "10.44.{a}.{b}:5432" '
            f"outbound|5432||db.data.svc.cluster.local 10.44.1.23:{port} 10.0.45.9:5432 "
            f"10.44.1.23:{port + 1} - -"
        )
    if kind < 0.2:  # gRPC, inbound with mTLS SNI
        return (
            f'[{ts}] "POST /hello.Greeter/SayHello HTTP/2" 200 - via_upstream - "-" 12 30 '
            f'{rng.randrange(50)} {rng.randrange(50)} "-" "grpc-go/1.59.0" "{rid}" '
            f'"greeter.apps:50051" "10.44.{a}.{b}:50051" inbound|50051|| 127.0.0.6:{port} '
            f"10.44.{a}.{b}:50051 10.44.7.8:{port + 3} "
            f"outbound_.50051_._.greeter.apps.svc.cluster.local default"
        )
    ua = rng.choice(UAS)
    path = rng.choice(PATHS)
    status = rng.choice((200, 200, 200, 404, 503, 403))
    details = "via_upstream" if status != 403 else (
        "rbac_access_denied_matched_policy[ns[foo]-policy[deny-all]-rule[0]]"
    )
    return (
        f'[{ts}] "GET {path} HTTP/1.1" {status} - {details} - "-" 0 {rng.randrange(20000)} '
        f'{rng.randrange(100)} {rng.randrange(100)} "-" "{ua}" "{rid}" "httpbin:8000" '
        f'"10.44.{a}.{b}:80" outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:{port} '
        f"10.0.45.184:8000 10.44.1.23:{port + 7} - default"
    )


def corrupt(rng: random.Random, line: str) -> str:
    choice = rng.random()
    if choice < 0.2:
        return ""
    if choice < 0.4:
        return "garbage " + line[: rng.randrange(5, 40)].replace('"', "'")
    # Truncate anywhere before the last field: a cut inside the last field cannot be detected.
    last = line.rindex(" ")
    return line[: rng.randrange(1, last)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lines = [make_line(rng, i) for i in range(args.lines)]
    bad = set(rng.sample(range(args.lines), max(1, args.lines // 1000)))
    for i in bad:
        lines[i] = corrupt(rng, lines[i])
    arr = pa.array(lines, pa.string())
    mb = arr.nbytes / 1e6

    parse_text(arr.slice(0, 1000))  # warm-up: first-call costs of the Arrow kernels
    t0, c0 = time.perf_counter(), time.process_time()
    parsed = parse_text(arr)
    t_vec, c_vec = time.perf_counter() - t0, time.process_time() - c0

    fmt = compile_format(ISTIO_TEXT_FORMAT)
    assert fmt.regex is not None
    rx = fmt.regex
    t0, c0 = time.perf_counter(), time.process_time()
    ref = [rx.match(line) for line in lines]
    t_re, c_re = time.perf_counter() - t0, time.process_time() - c0

    errors = {i for i, _ in parsed.errors}
    ref_bad = {i for i, m in enumerate(ref) if m is None}
    exact = errors == bad and ref_bad == bad
    # Compare every parsed value of a sample of rows with the regex parse.
    good_idx = [i for i in range(args.lines) if i not in bad]
    sample = sorted(rng.sample(range(len(good_idx)), min(2000, len(good_idx))))
    names = fmt.fields
    rows = parsed.fields.take(pa.array(sample)).to_pylist()
    agree = True
    for row_no, row in zip(sample, rows, strict=True):
        m = ref[good_idx[row_no]]
        assert m is not None
        want = {n: (None if v == "-" else v) for n, v in zip(names, m.groups(), strict=True)}
        agree &= all(row[n] == want[n] for n in names)

    print(f"lines: {args.lines:,} ({mb:.0f} MB), malformed injected: {len(bad)}")
    # CPU time too: wall time is unreliable when other processes share the cores.
    for label, wall, cpu in (("parse_text (vectorized)", t_vec, c_vec),
                             ("per-line re.match only ", t_re, c_re)):
        print(f"{label}: wall {wall:.2f} s = {args.lines / wall / 1e6:.2f} M lines/s; "
              f"cpu {cpu:.2f} s = {args.lines / cpu / 1e6:.2f} M lines/s")
    print(f"speed-up (cpu): {c_re / c_vec:.1f}x (the re figure excludes building columns)")
    print(f"errors reported: {len(errors)}  exact: {exact}  sample values agree: {agree}")
    return 0 if exact and agree else 1


if __name__ == "__main__":
    sys.exit(main())
