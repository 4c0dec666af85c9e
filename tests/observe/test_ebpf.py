"""eBPF connection tracing: the real tracer on this machine, and its output parser.

The live tests run bpftrace for real (CI runs as root on a kernel with BTF, and installs
bpftrace): the traffic is made here, in processes the test starts, so the references are
what the test knows: ports it bound, processes it started (pid, and the command name it set
with prctl), bytes it wrote. They may skip only when the kernel refuses the program, with the
kernel's reason. The parser tests read output recorded on the development machine
(tests/data/ebpf/README.md says how and what traffic it holds) plus garbage lines.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from observe.cgroup import cgroup2_mount
from observe.ebpf import (
    PROGRAM,
    KernelRefused,
    TraceParser,
    TraceStats,
    check_setup,
    parse_trace,
    program,
    trace_connections,
)
from observe.inventory import Inventory
from observe.schema import FLOW_SCHEMA

DATA = Path(__file__).resolve().parents[1] / "data" / "ebpf"
#: Bytes a connection's counts may differ from what was written: the kernel counts sequence
#: space (SYN and FIN take one each) and the FIN corrections can miss one (see observe.ebpf).
TOLERANCE = 1

# A server in its own process: sets its command name, accepts `count` connections, reads the
# request (4-byte length, then the rest, then a 4-byte answer size), answers, closes.
SERVER = textwrap.dedent("""
    import ctypes, socket, sys
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    family = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
    srv = socket.socket(family)
    srv.bind((sys.argv[2], 0))
    srv.listen()
    print(srv.getsockname()[1], flush=True)
    for _ in range(int(sys.argv[3])):
        conn, _ = srv.accept()
        head = conn.recv(4, socket.MSG_WAITALL)
        if len(head) == 4:
            conn.recv(int.from_bytes(head, "big") - 4, socket.MSG_WAITALL)
            answer = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
            conn.sendall(b"s" * answer)
        conn.close()
""")
# Clients in their own process: one exchange per "host:port:send:answer" argument, then a
# refused attempt to a bound, non-listening port, then one connection left open until stdin
# closes. Prints the local ports it used.
CLIENT = textwrap.dedent("""
    import ctypes, os, socket, sys
    if os.environ.get("MW_CGROUP"):  # join a cgroup before connecting
        open(os.environ["MW_CGROUP"] + "/cgroup.procs", "w").write(str(os.getpid()))
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    ports = []
    for spec in sys.argv[2:]:
        host, port, send, answer = spec.rsplit(":", 3)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        c = socket.create_connection((host.strip("[]"), int(port)))
        ports.append(c.getsockname()[1])
        c.sendall(int(send).to_bytes(4, "big") + b"c" * (int(send) - 4))
        c.sendall(int(answer).to_bytes(4, "big"))
        assert len(c.recv(int(answer), socket.MSG_WAITALL)) == int(answer)
        c.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    ports.append(refused.getsockname()[1])
    ports.append(closed.getsockname()[1])
    assert refused.connect_ex(closed.getsockname()) != 0
    refused.close()
    host, port = sys.argv[2].rsplit(":", 3)[:2]
    still = socket.create_connection((host.strip("[]"), int(port)))
    ports.append(still.getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    sys.stdin.read()
    still.close()
""")


def run_tracer(traffic: Callable[[], None], inventory: Inventory | None = None
               ) -> tuple[pa.Table, TraceStats]:
    """Run the real tracer while ``traffic`` runs; skip only when the kernel refuses it."""
    stop, ready = threading.Event(), threading.Event()
    stats = TraceStats()
    batches: list[pa.RecordBatch] = []
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            batches.extend(trace_connections(stop=stop, ready=ready, stats=stats,
                                             inventory=inventory, node="test"))
        except BaseException as e:  # surfaced below
            failure.append(e)
            ready.set()

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert ready.wait(60), "tracer did not attach"
        if not failure:
            traffic()
    finally:
        stop.set()
        t.join(60)
    if failure:
        if isinstance(failure[0], KernelRefused):
            pytest.skip(f"kernel refused the tracer: {failure[0]}")
        raise failure[0]
    for b in batches:
        assert b.schema == FLOW_SCHEMA
    return pa.Table.from_batches(batches, schema=FLOW_SCHEMA), stats


def rows(table: pa.Table, **where: object) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def test_setup_is_ready_on_this_machine() -> None:
    notes: list[str] = []
    assert check_setup(notes=notes) == []


def test_setup_names_a_missing_bpftrace() -> None:
    problems = check_setup(bpftrace="bpftrace-not-installed-here")
    assert any("bpftrace-not-installed-here not found" in p and "apt-get install bpftrace" in p
               for p in problems)


def test_real_tracer_sees_clients_servers_refusals_bytes_and_processes() -> None:
    exchanges = [(1000, 2500), (30_000, 7), (5, 100_000)]
    server = subprocess.Popen([sys.executable, "-c", SERVER, "mw-srv", "127.0.0.1",
                               str(len(exchanges) + 1)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    sport = int(server.stdout.readline())
    client: list[subprocess.Popen[str]] = []
    used: list[int] = []
    t0 = time.time()

    def traffic() -> None:
        specs = [f"127.0.0.1:{sport}:{send}:{answer}" for send, answer in exchanges]
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, "mw-cli", *specs],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        client.append(proc)
        assert proc.stdout is not None
        used.extend(int(p) for p in proc.stdout.readline().split())
        time.sleep(0.3)  # let the last close reach the tracer

    try:
        table, stats = run_tracer(traffic)
    finally:
        for proc in client:
            proc.communicate("", timeout=30)
        server.wait(timeout=30)
    t1 = time.time()
    cpid, spid = client[0].pid, server.pid
    *ports, refused_port, closed_port, open_port = used
    for (send, answer), port in zip(exchanges, ports, strict=True):
        out = rows(table, src_port=port, dst_port=sport, direction="outbound")
        inn = rows(table, src_port=port, dst_port=sport, direction="inbound")
        assert len(out) == 1 and len(inn) == 1, (port, out, inn)
        for r in (out[0], inn[0]):
            assert r["src_ip"] == r["dst_ip"] == "127.0.0.1"
            assert r["kind"] == "connection" and r["source"] == "ebpf"
            assert r["tcp_state"] == "established" and r["tcp_end"] == "fin"
            assert abs(r["bytes_in"] - (send + 4)) <= TOLERANCE, r
            assert abs(r["bytes_out"] - answer) <= TOLERANCE, r
            assert r["mtls"] == "unknown" and r["transport"] == "tcp"
            assert t0 - 1 <= r["time"].timestamp() <= t1 + 1
            assert 0 <= r["duration_ms"] <= (t1 - t0) * 1000 + 1
            assert str(r["origin"]).startswith("ebpf:test:event ")
        assert out[0]["origin"] == inn[0]["origin"]  # both ends local: one tracer line
        assert (out[0]["pid"], out[0]["comm"]) == (cpid, "mw-cli")
        assert (inn[0]["pid"], inn[0]["comm"]) == (spid, "mw-srv")  # from accept(), not softirq
    refused = rows(table, src_port=refused_port, dst_port=closed_port)
    assert len(refused) == 1
    assert refused[0]["tcp_state"] == "refused" and refused[0]["direction"] == "outbound"
    assert refused[0]["pid"] == cpid and refused[0]["bytes_in"] == 0
    still = rows(table, src_port=open_port, dst_port=sport)
    assert {r["direction"] for r in still} == {"outbound", "inbound"}
    assert all(r["tcp_end"] == "open" and r["bytes_in"] is None for r in still)
    assert {r["pid"] for r in still} == {cpid, spid}
    assert stats.lost == 0 and stats.malformed == 0 and stats.pairs >= len(exchanges)
    assert stats.refused >= 1 and stats.open_at_stop >= 2


def test_real_tracer_sees_ipv6() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER, "mw-srv6", "::1", "2"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    sport = int(server.stdout.readline())
    client: list[subprocess.Popen[str]] = []
    used: list[int] = []

    def traffic() -> None:
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, "mw-cli6",
                                 f"[::1]:{sport}:700:900"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        client.append(proc)
        assert proc.stdout is not None
        used.extend(int(p) for p in proc.stdout.readline().split())
        time.sleep(0.3)

    try:
        table, _ = run_tracer(traffic)
    finally:
        for proc in client:
            proc.communicate("", timeout=30)
        server.wait(timeout=30)
    out = rows(table, src_port=used[0], dst_port=sport, direction="outbound")
    assert len(out) == 1
    assert out[0]["src_ip"] == out[0]["dst_ip"] == "::1"
    assert abs(out[0]["bytes_in"] - 704) <= TOLERANCE
    assert abs(out[0]["bytes_out"] - 900) <= TOLERANCE


def test_real_tracer_places_a_process_in_its_pod_through_the_cgroup() -> None:
    """A client moved into a cgroup named the way the kubelet and containerd name them is
    attributed to that container and, through the inventory, to its pod."""
    root = cgroup2_mount()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy to build a pod cgroup in")
    uid = str(uuid.uuid4())
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    top = root / f"meshwright-test-{uuid.uuid4().hex[:8]}"  # never a real node's kubepods
    path = (top / "kubepods.slice" / "kubepods-besteffort.slice"
            / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
            / f"cri-containerd-{cid}.scope")
    inventory = Inventory()
    inventory.add_object({"kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop",
                                                      "uid": uid}, "spec": {}, "status": {}})
    server = subprocess.Popen([sys.executable, "-c", SERVER, "mw-srvc", "127.0.0.1", "2"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    sport = int(server.stdout.readline())
    ports: list[int] = []

    def traffic() -> None:
        path.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, "mw-pod",
                                 f"127.0.0.1:{sport}:64:64"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "MW_CGROUP": str(path)})
        assert proc.stdout is not None
        ports.extend(int(p) for p in proc.stdout.readline().split())
        time.sleep(0.3)
        proc.communicate("", timeout=30)

    try:
        table, stats = run_tracer(traffic, inventory=inventory)
    finally:
        server.wait(timeout=30)
        for p in (path, path.parent, path.parent.parent, path.parent.parent.parent, top):
            if p.exists():
                p.rmdir()
    out = rows(table, src_port=ports[0], dst_port=sport, direction="outbound")
    assert len(out) == 1
    assert out[0]["container_id"] == cid and out[0]["pod_uid"] == uid
    assert out[0]["reporter"] == "shop/web-0" and out[0]["comm"] == "mw-pod"
    inbound = rows(table, src_port=ports[0], dst_port=sport, direction="inbound")
    assert inbound[0]["pod_uid"] is None  # the server is not in a pod
    assert stats.pods >= 1


# -- recorded output -------------------------------------------------------------------------

# tests/data/ebpf/record.py: (client port, bytes sent incl. the 4-byte answer size, answer)
RECORDED = [(47110, 1004, 2001), (47111, 2005, 4003), (47112, 3006, 6005)]


def recorded() -> bytes:
    return (DATA / "loopback.txt").read_bytes()


def test_recorded_output_gives_the_traffic_record_py_made() -> None:
    batch, stats = parse_trace(recorded(), node="rec")
    table = pa.Table.from_batches([batch])
    for port, sent, answer in RECORDED:
        for direction in ("outbound", "inbound"):
            (r,) = rows(table, src_port=port, dst_port=47100, direction=direction)
            assert (r["bytes_in"], r["bytes_out"]) == (sent, answer)
            assert r["tcp_state"] == "established" and r["tcp_end"] == "fin"
            assert (r["src_ip"], r["dst_ip"]) == ("127.0.0.1", "127.0.0.1")
    for direction in ("outbound", "inbound"):
        (v6,) = rows(table, src_port=47122, dst_port=47102, direction=direction)
        assert (v6["src_ip"], v6["bytes_in"], v6["bytes_out"]) == ("::1", 704, 900)
    (refused,) = rows(table, src_port=47120)
    assert (refused["dst_port"], refused["tcp_state"], refused["tcp_end"]) == (
        47101, "refused", "rst")
    still = rows(table, src_port=47121, dst_port=47100)
    assert sorted(r["direction"] for r in still) == ["inbound", "outbound"]
    assert all(r["tcp_end"] == "open" for r in still)
    # The server process (accept) differs from the client's on every inbound record.
    servers = {r["pid"] for r in rows(table, direction="inbound", dst_port=47100)}
    clients = {r["pid"] for r in rows(table, direction="outbound", dst_port=47100)}
    assert len(servers) == 1 and len(clients) == 1 and servers != clients
    # Both ends local: one record per exchange holds both sockets; the refused attempt alone.
    assert len(rows(table, src_port=47120, direction="inbound")) == 0
    assert stats.pairs >= 4 and stats.duplicates == 0  # (other traffic of the machine too)
    assert stats.malformed == 0 and stats.lost == 0 and stats.open_at_stop >= 2


def _le(addr: str) -> tuple[int, int]:
    """(high, low) 64-bit halves as the program prints them: the address bytes read
    little-endian (IPv4: low only, its 4 bytes)."""
    raw = ipaddress.ip_address(addr).packed
    if len(raw) == 4:
        return 0, int.from_bytes(raw, "little")
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def word(role: int, bits: int, last: int, err: int, extra: int, nokernel: bool = False) -> int:
    return role | extra << 2 | last << 4 | (err & 0xFF) << 8 | bits << 16 | nokernel << 28


def side(role: int, bits: int, last: int, err: int, acked: int, rcvd: int, extra: int,
         comm: str = "app", start: int = 1_000_000_000, end: int = 3_500_000_000,
         pid: int = 77) -> tuple[list[int], str]:
    """A local pair's other socket, as the record's ``*2`` fields and its command name."""
    return [word(role, bits, last, err, extra) | pid << 32, start, end, 1, acked, rcvd], comm


def side_text(role: int, bits: int, last: int, err: int, comm: str = "app") -> str:
    """One socket's fields as the reduced program (no BTF) prints them."""
    w = word(role, bits, last, err, 0, nokernel=True)
    return (f" {w:08x} {1_000_000_000:016x} {3_500_000_000:016x} {77:08x} {1:016x} {0:016x} "
            f"{0:016x} {comm:<16}")


def line(role: int, bits: int, last: int, err: int, laddr: str, lport: int, raddr: str,
         rport: int, acked: int, rcvd: int, extra: int, comm: str = "app",
         start: int = 1_000_000_000, end: int = 3_500_000_000, *, pid: int = 77,
         peer: tuple[list[int], str] | None = None, cpu: int = 0) -> bytes:
    """One rotation map entry, written out as bpftrace prints the program's record
    (observe.ebpf.RECORD; the key is the close time and the CPU)."""
    (lh, ll), (rh, rl) = _le(laddr), _le(raddr)
    v6 = ":" in laddr
    ints = [lh, ll, rh, rl, lport << 16 | rport | v6 << 32,
            word(role, bits, last, err, extra) | pid << 32, start, 1, acked, rcvd]
    peer_ints, peer_comm = peer if peer else ([0] * 6, "")
    values = ", ".join(map(str, ints + peer_ints))
    return f"@Ra[{end}, {cpu}]: ({values}, {peer_comm}, {comm})".encode()


def bits(*states: int) -> int:
    return sum(1 << s for s in states)


def test_record_layout_is_the_programs() -> None:
    """The program writes every rotation map with a record of RECORD's width plus the two
    command names, counts each write, and its tick prints and clears every map."""
    from observe.ebpf import RECORD, ROTATION_MAPS
    for letter in ROTATION_MAPS:
        stores = re.findall(rf"@R{letter}\[\$now, cpu\] = \((.*)\);", PROGRAM)
        assert len(stores) == 1
        values = stores[0].split(", ")
        assert len(values) == len(RECORD) + 2
        assert values[-2:] == ["@wm[$sk]", "@m[$sk]"]  # the peer's command name, then its own
        assert f"@N{letter} = count();" in PROGRAM
        assert f"print(@R{letter}); print(@N{letter}); clear(@R{letter}); clear(@N{letter});" \
            in PROGRAM


def test_garbage_lines_are_counted_not_fatal() -> None:
    good = line(1, bits(2, 1, 7), 1, 0, "10.0.0.1", 40000, "10.0.0.2", 80, 11, 0, 2)
    garbage = [
        b"not a tracer line at all",
        b"@Ra[1, 2]: (1, 2, 3)",                            # too few fields
        good.replace(b", 11, ", b", 1x, ", 1),              # a number that is not one
        good[:-30],                                         # cut short
        good.replace(b", ", b"; ", 3),                      # separators gone
        b"@t[abc]: 12",                                     # not a map entry
        b"\xff\xfe\x00",
        b"Lost 5 events",
        b"",
    ]
    text = recorded()
    lines = text.splitlines()
    mixed = b"\n".join(lines[:3] + garbage + lines[3:]) + b"\n"
    batch, stats = parse_trace(mixed, node="rec")
    clean, _ = parse_trace(text, node="rec")
    assert stats.malformed == 7  # every garbage line but the loss report and the blank
    assert stats.lost == 5
    assert batch.num_rows == clean.num_rows
    assert batch.column("bytes_in").to_pylist() == clean.column("bytes_in").to_pylist()


def test_chunks_may_split_lines_anywhere() -> None:
    text = recorded()
    whole, _ = parse_trace(text, node="rec", boot_offset_ns=0)
    parser = TraceParser("rec", boot_offset_ns=0)
    for i in range(0, len(text), 37):  # 37: cuts lines at every place in turn
        parser.feed(text[i:i + 37])
    parser.finish()
    assert parser.take().to_pylist() == whole.to_pylist()


def test_byte_accounting_follows_the_state_path() -> None:
    # Hand-derived from RFC 793 sequence space: the client's bytes_acked counts its SYN, and
    # a FIN counts once it is acknowledged (bytes_acked) or received (bytes_received).
    active_close = line(1, bits(2, 1, 4, 5, 7), 5, 0, "10.0.0.1", 40000, "10.0.0.2", 80,
                        acked=1 + 300 + 1, rcvd=500 + 1, extra=3)
    passive_close = line(2, bits(3, 1, 8, 9, 7), 9, 0, "10.0.0.2", 80, "10.0.0.1", 40001,
                         acked=800 + 1, rcvd=120 + 1, extra=3)
    reset = line(1, bits(2, 1, 7), 1, 104, "10.0.0.1", 40002, "10.0.0.2", 80,
                 acked=1 + 10, rcvd=0, extra=2)
    fin_unacked = line(1, bits(2, 1, 4, 7), 4, 110, "10.0.0.1", 40003, "10.0.0.2", 80,
                       acked=1 + 64, rcvd=0, extra=0)
    batch, _ = parse_trace([active_close, passive_close, reset, fin_unacked],
                           boot_offset_ns=0)
    got = [(r["direction"], r["src_port"], r["dst_port"], r["bytes_in"], r["bytes_out"],
            r["tcp_end"]) for r in batch.to_pylist()]
    assert got == [
        ("outbound", 40000, 80, 300, 500, "fin"),
        ("inbound", 40001, 80, 120, 800, "fin"),
        ("outbound", 40002, 80, 10, 0, "rst"),
        ("outbound", 40003, 80, 64, 0, "timeout"),
    ]
    first = batch.to_pylist()[0]
    assert first["duration_ms"] == 2500 and first["time"].timestamp() == 1.0
    assert first["pid"] == 77 and first["comm"] == "app"


def test_a_local_pair_gives_both_records_and_a_second_copy_is_dropped() -> None:
    # The server (10.0.0.2:80, pid 88) closed second: its record, with the client's fields.
    client = side(1, bits(2, 1, 4, 5, 7), 5, 0, acked=1 + 30 + 1, rcvd=70 + 1, extra=3,
                  comm="curl", start=2_000_000_000, end=2_600_000_000, pid=77)
    server = line(2, bits(3, 1, 8, 9, 7), 9, 0, "10.0.0.2", 80, "10.0.0.1", 40000,
                  acked=70 + 1, rcvd=30 + 1, extra=3, comm="nginx", start=2_100_000_000,
                  end=2_700_000_000, pid=88, peer=client)
    # The same pair printed by the client too (both closed at once on two CPUs).
    again = line(1, bits(2, 1, 4, 5, 7), 5, 0, "10.0.0.1", 40000, "10.0.0.2", 80,
                 acked=1 + 30 + 1, rcvd=70 + 1, extra=3, comm="curl", start=2_000_000_000,
                 end=2_600_000_000,
                 peer=side(2, bits(3, 1, 8, 9, 7), 9, 0, acked=71, rcvd=31, extra=3,
                           comm="nginx", start=2_100_000_000, end=2_700_000_000, pid=88))
    batch, stats = parse_trace([server, again], boot_offset_ns=0)
    got = [(r["direction"], r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"],
            r["bytes_in"], r["bytes_out"], r["pid"], r["comm"], r["duration_ms"], r["origin"])
           for r in batch.to_pylist()]
    assert got == [
        ("outbound", "10.0.0.1", 40000, "10.0.0.2", 80, 30, 70, 77, "curl", 600,
         "ebpf:recorded:event 1"),
        ("inbound", "10.0.0.1", 40000, "10.0.0.2", 80, 30, 70, 88, "nginx", 600,
         "ebpf:recorded:event 1"),
    ]
    assert (stats.pairs, stats.duplicates, stats.events, stats.connections) == (1, 1, 1, 2)


def test_a_pair_half_closed_at_the_stop_comes_from_the_map_dump() -> None:
    # At the stop: the client socket (key 5) is still open; its server peer closed and left
    # its fields under the client's key (@w: word, start, end, pid, cgroup, acked, rcvd,
    # its own address); maps are printed as bpftrace's text mode prints them.
    lh, ll = _le("10.0.0.1")
    _, rl = _le("10.0.0.2")
    word = 2 | 3 << 2 | 9 << 4 | bits(3, 1, 8, 9, 7) << 16
    dump = (b"R\n@a[5]: (0, %d, 0, %d, %d)\n@t[5]: 1000000000\n@r[5]: 1\n@p[5]: 77\n"
            b"@g[5]: 1\n@m[5]: curl\n@w[5]: (%d, 1100000000, 3100000000, 88, 1, 71, 31, -99)\n"
            b"@wm[5]: nginx\n@t[9]: 5\n@r[9]: 1\n") % (ll, rl, 40000 << 16 | 80, word)
    batch, stats = parse_trace(dump, boot_offset_ns=0)
    got = [(r["direction"], r["src_port"], r["dst_port"], r["tcp_end"], r["bytes_in"],
            r["bytes_out"], r["pid"], r["comm"], r["duration_ms"]) for r in batch.to_pylist()]
    assert got == [
        ("outbound", 40000, 80, "open", None, None, 77, "curl", None),
        ("inbound", 40000, 80, "fin", 30, 70, 88, "nginx", 2000),
    ]
    assert lh == 0 and stats.open_at_stop == 1 and stats.pending_at_stop == 1


def test_failed_attempts_midstream_mapped_addresses_and_reduced_program() -> None:
    no_answer = line(1, bits(2, 7), 2, 110, "10.0.0.1", 40010, "10.9.9.9", 443, 0, 0, 2)
    # Already open when tracing began: no start, side from the ephemeral port range.
    midstream_client = line(0, 0, 1, 0, "10.0.0.1", 45000, "10.0.0.2", 5432, 100, 50, 3)
    midstream_server = line(0, 0, 8, 0, "10.0.0.2", 5432, "10.0.0.1", 45001, 50, 100, 3)
    mapped = line(2, bits(3, 1, 8, 9, 7), 9, 0, "::ffff:10.0.0.2", 80, "::ffff:10.0.0.1",
                  40020, 1, 1, 3, comm="my server")
    # The reduced program (no BTF): addresses as ntop() text padded to 39, no kernel reads.
    reduced = (f"N4 {'10.0.0.1':<39} {'10.0.0.2':<39} {40030 << 16 | 80:08x}"
               + side_text(1, bits(2, 7), 2, 0)).encode()
    reduced6 = (f"N6 {'fd00::1':<39} {'fd00::2':<39} {40031 << 16 | 443:08x}"
                + side_text(1, bits(2, 1, 4, 5, 7), 5, 0)).encode()
    parser = TraceParser("n", boot_offset_ns=0, ports=(32768, 60999))
    parser.feed([no_answer, midstream_client, midstream_server, mapped, reduced, reduced6])
    got = parser.take().to_pylist()
    assert (got[0]["tcp_state"], got[0]["tcp_end"]) == ("no-answer", "timeout")
    assert (got[1]["tcp_state"], got[1]["direction"], got[1]["dst_port"]) == (
        "midstream", "outbound", 5432)
    assert got[1]["duration_ms"] is None and got[1]["time"].timestamp() == 3.5
    assert (got[2]["direction"], got[2]["src_port"], got[2]["dst_port"]) == (
        "inbound", 45001, 5432)
    assert (got[3]["src_ip"], got[3]["dst_ip"], got[3]["comm"]) == (
        "10.0.0.1", "10.0.0.2", "my server")
    # Without BTF: no byte counts, refused and unanswered both read as no-answer.
    assert (got[4]["tcp_state"], got[4]["bytes_in"], got[4]["bytes_out"], got[4]["src_ip"]) == (
        "no-answer", None, None, "10.0.0.1")
    assert (got[5]["src_ip"], got[5]["dst_ip"], got[5]["dst_port"], got[5]["tcp_state"]) == (
        "fd00::1", "fd00::2", 443, "established")
    assert parser.stats.midstream == 2 and parser.stats.no_answer == 2


def test_program_variants() -> None:
    assert "bytes_acked" in PROGRAM and "sys_exit_accept4" in PROGRAM
    assert "@e[" in PROGRAM and "$p0 = @w[$sk].0" in PROGRAM  # local pairs joined
    connections = PROGRAM.split("tracepoint:sock:inet_sock_set_state")[1].split("interval:")[0]
    assert "interval:ms:" in PROGRAM and "printf(" not in connections  # records, not lines
    reduced = program(btf=False)
    assert "struct" not in reduced and "accept" not in reduced and "@e[" not in reduced
    assert 'printf("N4' in reduced and "@Ra[" not in reduced
    assert "$s->sk_flags" in program(sk_flags="$s->sk_flags")


def test_batches_stream_while_tracing() -> None:
    """Records come out while the tracer runs (every flush_s), not only at the stop."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, "mw-srvs", "127.0.0.1", "1"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    sport = int(server.stdout.readline())
    stop, ready = threading.Event(), threading.Event()
    gen: Iterator[pa.RecordBatch] = trace_connections(stop=stop, ready=ready, flush_s=0.2,
                                                      node="s")
    first: list[pa.RecordBatch] = []

    def consume() -> None:
        for b in gen:
            if any(r["dst_port"] == sport for r in b.to_pylist()):
                first.append(b)
                stop.set()

    t = threading.Thread(target=consume)
    t.start()
    try:
        if not ready.wait(60):
            stop.set()
            t.join()
            pytest.fail("tracer did not attach")
        with socket.create_connection(("127.0.0.1", sport)) as c:
            c.sendall((8).to_bytes(4, "big") + b"xxxx" + (0).to_bytes(4, "big"))
            c.recv(1)
        deadline = time.monotonic() + 10
        while not first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first, "no batch while tracing"
    finally:
        stop.set()
        t.join(60)
        server.wait(timeout=30)


def test_records_that_did_not_fit_a_rotation_map_are_counted_lost() -> None:
    # The kernel counted 5 writes into @Ra; 3 entries were printed: 2 did not fit.
    entries = [line(1, bits(2, 1, 7), 1, 0, "10.0.0.1", 40000 + i, "10.0.0.2", 80, 1, 0, 2,
                    end=3_500_000_000 + i) for i in range(3)]
    batch, stats = parse_trace([*entries, b"@Na: 5", b"E 00000000d09dc300"], boot_offset_ns=0)
    assert batch.num_rows == 3 and stats.lost == 2 and stats.malformed == 0
    # bpftrace's own loss report adds to it; a count that matches adds nothing
    batch, stats = parse_trace([*entries, b"@Na: 3", b"Lost 4 events"], boot_offset_ns=0)
    assert stats.lost == 4


def test_a_tick_read_late_is_counted() -> None:
    from observe.ebpf import LATE_TICK_NS
    parser = TraceParser("n", boot_offset_ns=0)
    tick = 50_000_000_000
    parser.read_at_ns = tick + LATE_TICK_NS // 2
    parser.feed(b"E %016x\n" % tick)
    assert parser.stats.late_ticks == 0
    parser.read_at_ns = tick + LATE_TICK_NS + 1
    parser.feed(b"E %016x\n" % tick)
    assert parser.stats.late_ticks == 1 and parser.stats.malformed == 0


def test_command_names_with_a_comma_leave_the_pair_names_unknown() -> None:
    client = side(1, bits(2, 1, 4, 5, 7), 5, 0, acked=2, rcvd=2, extra=3, comm="a, b")
    entry = line(2, bits(3, 1, 8, 9, 7), 9, 0, "10.0.0.2", 80, "10.0.0.1", 40000, acked=1,
                 rcvd=1, extra=3, comm="srv", peer=client)
    plain = line(1, bits(2, 1, 7), 1, 0, "10.0.0.1", 40001, "10.0.0.2", 80, 1, 0, 2,
                 comm="x, y z")  # no peer: its own name is the rest of the line
    batch, stats = parse_trace([entry, plain], boot_offset_ns=0)
    got = {(r["src_port"], r["direction"]): r["comm"] for r in batch.to_pylist()}
    assert got == {(40000, "outbound"): None, (40000, "inbound"): None,
                   (40001, "outbound"): None}
    assert stats.malformed == 0 and batch.num_rows == 3


def test_real_tracer_counts_what_a_full_rotation_map_lost() -> None:
    """With maps of 64 entries, a burst of 300 connections cannot all fit in the tick's map:
    each one is either recorded or counted lost, never silently missing."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, "mw-burst", "127.0.0.1", "300"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    stop, ready = threading.Event(), threading.Event()
    stats = TraceStats()
    batches: list[pa.RecordBatch] = []

    def consume() -> None:
        batches.extend(trace_connections(stop=stop, ready=ready, stats=stats, map_keys=64,
                                         node="burst"))

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert ready.wait(60), "tracer did not attach"
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall((8).to_bytes(4, "big") + b"xxxx" + (0).to_bytes(4, "big"))
                c.recv(1)
        time.sleep(1.5)  # two ticks: the last map is printed
    finally:
        stop.set()
        t.join(60)
        server.wait(timeout=30)
    table = pa.Table.from_batches(batches, schema=FLOW_SCHEMA)
    ours = len(rows(table, dst_port=port, direction="outbound"))
    assert stats.lost > 0
    assert ours + stats.lost >= 300
