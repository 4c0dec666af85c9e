"""Generate a realistic pod-to-pod packet capture (Ethernet pcap) for throughput runs.

Hundreds of pods (10.244.0.0/16), thousands of TCP connections, each with a handshake, a
first flight that is an Istio mTLS ClientHello (SNI ``outbound_.8080_._.svc.ns.svc.cluster.
local``, ALPN ``istio-peer-exchange``/``istio``) answered by a ServerHello, a plain HTTP/1.1
request/response, or an h2c prior-knowledge preface + SETTINGS; then data segments with ACKs
and a FIN teardown. Connections overlap in time; packets are written in timestamp order.
Deterministic for a seed.

    python benchmarks/gen_pcap.py OUT.pcap [--packets 1000000] [--seed 7]
"""

from __future__ import annotations

import argparse
import heapq
import struct
from collections.abc import Iterator

import numpy as np

MAC_A = b"\x02\x42\x0a\xf4\x00\x01"
MAC_B = b"\x02\x42\x0a\xf4\x00\x02"



def client_hello(sni: str, alpn: list[bytes], rng: np.random.Generator) -> bytes:
    """A TLS 1.2-framed ClientHello with SNI, ALPN and supported_versions (TLS 1.3)."""
    host = sni.encode()
    ext_sni = struct.pack("!HHHBH", 0, len(host) + 5, len(host) + 3, 0, len(host)) + host
    alpn_list = b"".join(bytes([len(p)]) + p for p in alpn)
    ext_alpn = struct.pack("!HHH", 16, len(alpn_list) + 2, len(alpn_list)) + alpn_list
    ext_sv = struct.pack("!HHB", 43, 3, 2) + b"\x03\x04"
    ext_groups = struct.pack("!HHH", 10, 4, 2) + b"\x00\x1d"
    key = rng.bytes(32)
    ext_ks = struct.pack("!HHHHH", 51, 38, 36, 0x1D, 32) + key
    exts = ext_sni + ext_alpn + ext_sv + ext_groups + ext_ks
    body = (b"\x03\x03" + rng.bytes(32) + b"\x20" + rng.bytes(32)
            + struct.pack("!H", 6) + b"\x13\x01\x13\x02\x13\x03" + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def server_hello(rng: np.random.Generator) -> bytes:
    exts = struct.pack("!HHH", 43, 2, 0x0304) + struct.pack("!HHHH", 51, 36, 0x1D, 32) \
        + rng.bytes(32)
    body = (b"\x03\x03" + rng.bytes(32) + b"\x20" + rng.bytes(32) + b"\x13\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs + b"\x14\x03\x03\x00\x01\x01"


def http_request(svc: str, ns: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {svc}.{ns}.svc.cluster.local:8080\r\n"
            "User-Agent: Go-http-client/1.1\r\nAccept-Encoding: gzip\r\n\r\n").encode()


def http_response(n: int) -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n"
            "server: envoy\r\n\r\n").encode()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def frame(ts: int, src: int, dst: int, sport: int, dport: int, seq: int, ack: int, flags: int,
          payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6,
                     0, src, dst)
    pkt = MAC_A + MAC_B + b"\x08\x00" + ip + tcp + payload
    sec, ns = divmod(ts, 1_000_000_000)
    return struct.pack("<IIII", sec, ns // 1000, len(pkt), len(pkt)) + pkt


def connection(rng: np.random.Generator, t0: int, cli: int, srv: int, sport: int,
               kind: int, budget: int) -> Iterator[tuple[int, bytes]]:
    """Packets of one connection as (ts_ns, record bytes)."""
    S, A, F, P = 0x02, 0x10, 0x01, 0x08
    cs, ss = int(rng.integers(1, 2**32 - 1)), int(rng.integers(1, 2**32 - 1))
    t = t0
    rtt = int(rng.integers(50_000, 400_000))
    dport = 8080 if kind != 0 else 15008

    def step(k: int = 1) -> int:
        nonlocal t
        t += rtt * k // 2 + int(rng.integers(0, 20_000))
        return t

    yield step(), frame(t, cli, srv, sport, dport, cs, 0, S, b"")
    yield step(), frame(t, srv, cli, dport, sport, ss, cs + 1, S | A, b"")
    yield step(), frame(t, cli, srv, sport, dport, cs + 1, ss + 1, A, b"")
    cs += 1
    ss += 1
    svc = f"svc{int(rng.integers(0, 400))}"
    ns = f"ns{int(rng.integers(0, 20))}"
    if kind == 0:
        first = client_hello(f"outbound_.8080_._.{svc}.{ns}.svc.cluster.local",
                             [b"istio-peer-exchange", b"istio"], rng)
        reply = server_hello(rng)
    elif kind == 1:
        first = http_request(svc, ns, f"/api/v1/items/{int(rng.integers(0, 10**6))}")
        reply = http_response(int(rng.integers(10, 4000)))
    else:
        first = H2_PREFACE
        reply = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    yield step(), frame(t, cli, srv, sport, dport, cs, ss, A | P, first)
    cs += len(first)
    yield step(), frame(t, srv, cli, dport, sport, ss, cs, A | P, reply)
    ss += len(reply)
    sent = 5
    while sent < budget - 4:
        if kind == 1 and rng.random() < 0.3:
            data = http_request(svc, ns, f"/api/v1/items/{int(rng.integers(0, 10**6))}")
            yield step(), frame(t, cli, srv, sport, dport, cs, ss, A | P, data)
            cs += len(data)
            body = http_response(int(rng.integers(10, 900)))
            yield step(), frame(t, srv, cli, dport, sport, ss, cs, A | P, body)
            ss += len(body)
            sent += 2
            continue
        n = int(rng.integers(0, 1400)) if rng.random() < 0.6 else 0
        data = rng.bytes(n) if n else b""
        if rng.random() < 0.5:
            yield step(), frame(t, cli, srv, sport, dport, cs, ss, A | (P if n else 0), data)
            cs += n
        else:
            yield step(), frame(t, srv, cli, dport, sport, ss, cs, A | (P if n else 0), data)
            ss += n
        sent += 1
    yield step(), frame(t, cli, srv, sport, dport, cs, ss, A | F, b"")
    yield step(), frame(t, srv, cli, dport, sport, ss, cs + 1, A | F, b"")
    yield step(), frame(t, cli, srv, sport, dport, cs + 1, ss + 1, A, b"")


def generate(path: str, packets: int, seed: int, pods: int = 300) -> int:
    rng = np.random.default_rng(seed)
    pod_ips = [(10 << 24) | (244 << 16) | (int(i // 250) << 8) | (i % 250 + 2)
               for i in range(pods)]
    t0 = 1_700_000_000_000_000_000
    conns = []
    total = 0
    while total < packets:
        budget = int(min(rng.geometric(1 / 150) + 8, 3000))
        budget = min(budget, packets - total)
        if budget < 8:
            break
        cli, srv = rng.choice(len(pod_ips), 2, replace=False)
        start = t0 + int(rng.integers(0, 120_000_000_000))
        conns.append(connection(rng, start, pod_ips[int(cli)], pod_ips[int(srv)],
                                int(rng.integers(32768, 60999)), int(rng.integers(0, 3)),
                                budget))
        total += budget
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for _ts, rec in heapq.merge(*conns, key=lambda x: x[0]):
            out.write(rec)
            written += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    n = generate(args.out, args.packets, args.seed)
    print(f"{args.out}: {n} packets")


if __name__ == "__main__":
    main()
