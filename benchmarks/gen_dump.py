"""Stream a large, realistic Istio access-log dump for benchmarks.

    python benchmarks/gen_dump.py --lines 20000000 --format text -o benchmarks/data/20m.log
    python benchmarks/gen_dump.py --lines 1000000 --format json --layout cri --malformed 0.001 -o x

A seeded synthetic mesh (namespaces, Services with Service port != targetPort on some,
1-3 pods each, gateways, HTTP/gRPC/TCP services, external egress) produces requests; each
meshed request writes its client and its server line, as both sidecars would. Lines are
rendered by ``samples.envoy_lines`` once per edge and side into %-templates, then only the
varying fields are filled in, so 20 M lines take minutes, in bounded memory.

Exactly ``floor(lines * malformed)`` lines are malformed (truncated mid-quote, or garbage),
spread evenly; ``--layout cri`` wraps every line as a CRI node file does. All lines go to one
file (as a shipper would merge them). Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samples.envoy_lines import (
    RBAC_DENIED_NONE,
    AccessEntry,
    HttpCall,
    TcpConn,
    gateway_entry,
    inbound_entry,
    outbound_cluster,
    outbound_entry,
    passthrough_entry,
    render_json,
    render_text,
    service_fqdn,
    tcp_inbound_entry,
    tcp_outbound_entry,
)

EPOCH = datetime(2024, 5, 14, 0, 0, 0, tzinfo=UTC)
#: Placeholder values rendered into templates, replaced by %-slots afterwards. Each must be
#: unique in a rendered line.
P_TIME = datetime(1999, 1, 1, 1, 1, 1, 111000, tzinfo=UTC)
SLOTS = {
    "1999-01-01T01:01:01.111Z": "%(t)s",
    "/__PATH__": "%(path)s",
    "77777": "%(status)s",
    "88888881": "%(bin)s",
    "88888882": "%(bout)s",
    "99991": "%(dur)s",
    "99992": "%(ust)s",
    "__RID__": "%(rid)s",
    "60001": "%(cport)s",
    "60002": "%(aport)s",
    "60003": "%(lport)s",
    "60004": "%(eport)s",
}
USER_AGENTS = {
    "http": ("python-requests/2.31.0", "Go-http-client/1.1", "okhttp/4.12.0",
             "Apache-HttpClient/4.5.14 (Java/17.0.10)", "axios/1.6.8", "curl/8.7.1"),
    "grpc": ("grpc-go/1.63.2", "grpc-java-netty/1.62.2", "grpc-python/1.62.1 grpc-c/39.0.0"),
}
BROWSER = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/124.0.0.0 Safari/537.36")
NOUNS = ("orders", "users", "items", "carts", "payments", "invoices", "products", "sessions",
         "accounts", "shipments", "reviews", "ratings", "tokens", "reports", "events")
VERBS_GRPC = ("Get", "List", "Create", "Update", "Watch", "Check")


@dataclass
class Svc:
    ns: str
    name: str
    kind: str  # http | grpc | tcp
    ip: str
    port: int
    target: int
    pods: list[str]


@dataclass
class Edge:
    """A caller -> service relation with everything needed to pre-render its lines."""

    kind: str  # http | grpc | tcp | gateway | passthrough | denied | plaintext
    weight: float
    templates: list[str]
    """One template per line the event writes (client first)."""
    paths: list[str]
    statuses: list[int]
    size: int


class Mesh:
    def __init__(self, rng: random.Random, render: Callable[[AccessEntry], str],
                 namespaces: int = 12, per_ns: int = 9) -> None:
        self.rng = rng
        self.render = render
        self.services: list[Svc] = []
        ip = 0
        for n in range(namespaces):
            ns = f"team-{n:02d}"
            for i in range(per_ns):
                kind = rng.choices(("http", "grpc", "tcp"), (0.7, 0.2, 0.1))[0]
                port, target = {
                    "http": rng.choice(((80, 8080), (8080, 8080), (9080, 9080), (80, 80))),
                    "grpc": rng.choice(((7070, 7070), (50051, 50051), (9090, 9090))),
                    "tcp": rng.choice(((5432, 5432), (6379, 6379), (3306, 3306))),
                }[kind]
                pods = []
                for _ in range(rng.choice((1, 1, 2, 3))):
                    ip += 1
                    pods.append(f"10.244.{ip // 250}.{ip % 250 + 2}")
                name = f"{rng.choice(NOUNS)}-{i}" if kind != "tcp" else f"db-{i}"
                self.services.append(Svc(ns, name, kind, f"10.96.{n}.{10 + i}", port, target,
                                         pods))
        self.gateway_ip = "10.244.200.5"

    def tpl(self, e: AccessEntry) -> str:
        return _template(e, self.render)

    def edges(self) -> list[Edge]:
        rng = self.rng
        out: list[Edge] = []
        callers = [s for s in self.services if s.kind != "tcp"]
        for s in self.services:
            for caller in rng.sample(callers, rng.randint(1, 4)):
                if caller is s:
                    continue
                for server in s.pods:
                    client = rng.choice(caller.pods)
                    out.append(self._edge(s.kind, caller, client, s, server))
        fronts = [s for s in self.services if s.kind == "http"][:8]
        for s in fronts:
            out.append(self._edge("gateway", None, self.gateway_ip, s, s.pods[0]))
        for s in rng.sample(fronts, 3):
            out.append(self._edge("plaintext", None, "10.244.250.7", s, s.pods[0]))
            out.append(self._edge("denied", None, "10.244.250.9", s, s.pods[-1]))
        for caller in rng.sample(callers, 5):
            out.append(self._edge("passthrough", caller, caller.pods[0], None, ""))
        return out

    def _edge(self, kind: str, caller: Svc | None, client: str, s: Svc | None,
              server: str) -> Edge:
        rng = self.rng
        if kind == "passthrough":
            host = rng.choice(("api.stripe.com", "storage.googleapis.com", "api.example.com"))
            e = passthrough_entry(P_TIME, client, 60002, 60001, "198.51.100.23:443", host,
                                  88888881, 88888882, 99991)
            return Edge(kind, 0.3, [self.tpl(e)], [""], [0], 0)
        assert s is not None
        fqdn = service_fqdn(s.name, s.ns)
        if kind == "tcp" or s.kind == "tcp":
            t = TcpConn(P_TIME, client, 60002, 60001, f"{s.ip}:{s.port}", f"{server}:{s.target}",
                        outbound_cluster(s.port, fqdn), 88888881, 88888882, 99991)
            sni = f"outbound_.{s.port}_._.{fqdn}"
            inbound = replace(tcp_inbound_entry(t, server, s.target, 60003, sni),
                              duration=99991)
            return Edge("tcp", 1.0, [self.tpl(tcp_outbound_entry(t)), self.tpl(inbound)],
                        [""], [0], 0)
        grpc = s.kind == "grpc"
        if grpc:
            noun = s.name.split("-")[0].rstrip("s").capitalize()
            paths = [f"/{s.ns.replace('-', '')}.{noun}Service/{v}{noun}"
                     for v in rng.sample(VERBS_GRPC, 3)]
            ua = rng.choice(USER_AGENTS["grpc"])
        else:
            noun = s.name.split("-")[0]
            paths = [f"/api/v1/{noun}/{{id}}", f"/api/v1/{noun}", f"/api/v1/{noun}/{{id}}/status",
                     "/healthz" if rng.random() < 0.3 else f"/v2/{noun}?page={{id}}"]
            ua = BROWSER if kind == "gateway" else rng.choice(USER_AGENTS["http"])
        method = "POST" if grpc else rng.choice(("GET", "GET", "GET", "POST", "PUT", "DELETE"))
        c = HttpCall(
            start=P_TIME, method=method, path="/__PATH__", status=77777,
            client_ip=client, app_port=60002, conn_port=60001, service=s.name,
            namespace=s.ns, service_ip=s.ip, service_port=s.port, server_ip=server,
            target_port=s.target, inbound_port=s.target, request_id="__RID__", user_agent=ua,
            authority=f"{s.name}.{s.ns}:{s.port}" if kind != "gateway" else "shop.example.com",
            bytes_received=88888881, bytes_sent=88888882, duration=99991,
            server_duration=99991, protocol="HTTP/2" if grpc else "HTTP/1.1",
            mtls=kind not in ("plaintext", "denied"),
            denied_details=RBAC_DENIED_NONE if kind == "denied" else None,
            upstream_local_port=60003,
        )
        statuses = [200] * 40 + [201, 204, 304, 404, 500, 503] if not grpc else [200]
        client_e = _ust(outbound_entry(c))
        server_e = _ust(inbound_entry(c))
        if kind == "gateway":
            g = _ust(gateway_entry(c, self.gateway_ip, 8080, "203.0.113.77", 60004))
            return Edge(kind, 3.0, [self.tpl(g), self.tpl(server_e)], paths, statuses, 0)
        if kind in ("plaintext", "denied"):
            return Edge(kind, 0.2 if kind == "plaintext" else 0.02, [self.tpl(server_e)], paths,
                        [403] if kind == "denied" else statuses, 0)
        return Edge(kind, 1.0, [self.tpl(client_e), self.tpl(server_e)], paths, statuses, 0)


def _ust(e: AccessEntry) -> AccessEntry:
    """Give the upstream-service-time its own placeholder (the renderers derive it)."""
    if e.upstream_service_time is None:
        return e
    return replace(e, upstream_service_time=99992)


FORMAT: dict[str, Callable[[AccessEntry], str]] = {"text": render_text, "json": render_json}


def _template(e: AccessEntry, render: Callable[[AccessEntry], str]) -> str:
    """Render with placeholder values, then turn each placeholder into a %-slot."""
    line = render(e).replace("%", "%%")
    for value, slot in SLOTS.items():
        line = line.replace(value, slot)
    return line


class Clock:
    """``START_TIME`` strings, re-formatting only when the second changes."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""
        self.cri_prefix = ""

    def text(self, ms: int) -> str:
        s, frac = divmod(ms, 1000)
        if s != self.second:
            self._set(s)
        return f"{self.prefix}{frac:03d}Z"

    def cri(self, ms: int, sub: int) -> str:
        """RFC3339Nano as containerd writes it (trailing zeros trimmed); ``sub`` < 10**6."""
        s, frac = divmod(ms, 1000)
        if s != self.second:
            self._set(s)
        digits = f"{frac:03d}{sub:06d}".rstrip("0")
        return f"{self.cri_prefix}.{digits}Z" if digits else f"{self.cri_prefix}Z"

    def _set(self, s: int) -> None:
        self.second = s
        base = (EPOCH + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%S")
        self.prefix = base + "."
        self.cri_prefix = base


def generate(lines: int, fmt: str, malformed: float, layout: str, seed: int) -> Iterator[str]:
    """Yield ``lines`` lines (newline-terminated), exactly floor(lines*malformed) malformed."""
    rng = random.Random(seed)
    mesh = Mesh(rng, FORMAT[fmt])
    edges = mesh.edges()
    weights = [e.weight for e in edges]
    clock = Clock()
    ms = 0
    # ~1 day of traffic whatever the size; at least 1 ms between events on average.
    step = max(1, (86_400_000 // max(1, lines)) * 2)
    emitted = 0
    bad_acc = 0.0
    getrandbits = rng.getrandbits
    randrange = rng.randrange
    while emitted < lines:
        for e in rng.choices(edges, weights, k=4096):
            ms += randrange(step)
            rid = f"{getrandbits(64):016x}"
            dur = randrange(1, 250)
            status = e.statuses[randrange(len(e.statuses))]
            path = e.paths[randrange(len(e.paths))].replace("{id}", str(randrange(10000)))
            values = {
                "path": path, "status": status, "bin": randrange(0, 2000) if e.kind != "http"
                else (0 if randrange(3) else randrange(20, 4000)),
                "bout": randrange(20, 60000), "dur": dur, "ust": max(0, dur - 1),
                "rid": f"{rid[:8]}-{rid[8:12]}-9{rid[13:16]}-a{getrandbits(12):03x}-"
                       f"{getrandbits(48):012x}",
                "cport": randrange(32768, 61000), "aport": randrange(32768, 61000),
                "lport": randrange(32768, 61000), "eport": randrange(1024, 65536),
            }
            for i, tpl in enumerate(e.templates):
                values["t"] = clock.text(ms + i)
                line = tpl % values
                bad_acc += malformed
                if bad_acc >= 1.0:
                    bad_acc -= 1.0
                    line = _corrupt(line, rng)
                if layout == "cri":
                    line = f"{clock.cri(ms + i + dur, randrange(1_000_000))} stdout F {line}"
                yield line + "\n"
                emitted += 1
                if emitted >= lines:
                    return


def _corrupt(line: str, rng: random.Random) -> str:
    """A malformed line: truncated inside a quoted value, or garbage."""
    kind = rng.random()
    if kind < 0.6:
        # Cut one character into a quoted value: what a writer killed mid-line leaves.
        if line.startswith("{"):
            opening = [i + 2 for i in range(len(line) - 2) if line[i:i + 3] == '":"']
        else:
            quotes = [i for i, ch in enumerate(line) if ch == '"']
            opening = quotes[0::2]
        cut = rng.choice(opening) + 2 if opening else len(line) // 2
        return line[:cut]
    if kind < 0.9:
        alphabet = "abcdefxyz0123456789 -_[]{}:;,./|\\\t"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 120)))
    return "\x00\x00\x1b[0m" + line[rng.randint(1, len(line) - 1):]


def write(out: BinaryIO, lines: Iterator[str], chunk: int = 8192) -> int:
    n = 0
    buf: list[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= chunk:
            out.write("".join(buf).encode("utf-8"))
            n += len(buf)
            buf.clear()
    if buf:
        out.write("".join(buf).encode("utf-8"))
        n += len(buf)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--format", choices=("text", "json"), default="text")
    ap.add_argument("--malformed", type=float, default=0.0, help="share of malformed lines")
    ap.add_argument("--layout", choices=("plain", "cri"), default="plain")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", required=True, help="file to write ('-' for stdout)")
    args = ap.parse_args(argv)
    if args.lines < 0 or not 0.0 <= args.malformed <= 1.0:
        ap.error("--lines must be >= 0 and --malformed in [0, 1]")
    gen = generate(args.lines, args.format, args.malformed, args.layout, args.seed)
    if args.output == "-":
        write(sys.stdout.buffer, gen)
    else:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb", buffering=1 << 20) as out:
            write(out, gen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
