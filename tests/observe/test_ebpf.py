"""eBPF connection tracing: the real tracer on this machine, and its output parser.

The live tests run bpftrace for real (CI runs as root on a kernel with BTF, and installs
bpftrace): the traffic is made here, in processes the test starts, so the references are
what the test knows: ports it bound, processes it started (pid, and the command name it set
with prctl), bytes it wrote. They may skip only when the kernel refuses the program, with the
kernel's reason. The parser tests read output recorded on the development machine
(tests/data/ebpf/README.md says how and what traffic it holds) plus garbage lines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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


def rows(table: pa.Table, **where: object) -> list[dict[str, object]]:
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
    assert stats.lost == 0 and stats.malformed == 0
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


def recorded() -> list[bytes]:
    return (DATA / "loopback.jsonl").read_bytes().splitlines()


def test_recorded_output_gives_the_traffic_record_py_made() -> None:
    batch, stats = parse_trace(recorded(), node="rec")
    table = pa.Table.from_batches([batch])
    for port, sent, answer in RECORDED:
        for direction in ("outbound", "inbound"):
            (r,) = rows(table, src_port=port, dst_port=47100, direction=direction)
            assert (r["bytes_in"], r["bytes_out"]) == (sent, answer)
            assert r["tcp_state"] == "established" and r["tcp_end"] == "fin"
    (v6,) = rows(table, src_port=47122, dst_port=47102, direction="outbound")
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
    assert stats.malformed == 0 and stats.lost == 0 and stats.open_at_stop == 2


def test_garbage_lines_are_counted_not_fatal() -> None:
    garbage = [
        b"not json at all",
        b'{"type": "printf", "data": "C 1 2 3\\n"}',            # too few fields
        b'{"type": "printf", "data": "C x 1 2 1 0 1 2 3 1 127.0.0.1 80 127.0.0.1 9 0 0 0 c\\n"}',
        b'{"type": "printf", "data": 17}',
        b'{"type": "lost_events", "data": {"events": 3}}',
        b"Lost 5 events",
        b'{"type": "nonsense"}',
        b"\xff\xfe\x00",
        b"",
    ]
    lines = recorded()
    mixed = lines[:5] + garbage + lines[5:]
    batch, stats = parse_trace(mixed, node="rec")
    clean, _ = parse_trace(lines, node="rec")
    assert stats.malformed == 6  # every garbage line but the two loss reports and the blank
    assert stats.lost == 8
    assert batch.num_rows == clean.num_rows
    assert batch.column("bytes_in").to_pylist() == clean.column("bytes_in").to_pylist()


def line(role: int, bits: int, last: int, err: int, laddr: str, lport: int, raddr: str,
         rport: int, acked: int, rcvd: int, extra: int, comm: str = "app",
         start: int = 1_000_000_000, end: int = 3_500_000_000) -> bytes:
    text = (f"C 42 {role} {bits} {last} {err} {start} {end} 77 1 {laddr} {lport} {raddr} "
            f"{rport} {acked} {rcvd} {extra} {comm}\\n")
    return b'{"type": "printf", "data": "' + text.encode() + b'"}'


def bits(*states: int) -> int:
    return sum(1 << s for s in states)


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


def test_failed_attempts_midstream_mapped_addresses_and_reduced_program() -> None:
    no_answer = line(1, bits(2, 7), 2, 110, "10.0.0.1", 40010, "10.9.9.9", 443, 0, 0, 2)
    # Already open when tracing began: no start, side from the ephemeral port range.
    midstream_client = line(0, 0, 1, 0, "10.0.0.1", 45000, "10.0.0.2", 5432, 100, 50, 3)
    midstream_server = line(0, 0, 8, 0, "10.0.0.2", 5432, "10.0.0.1", 45001, 50, 100, 3)
    mapped = line(2, bits(3, 1, 8, 9, 7), 9, 0, "::ffff:10.0.0.2", 80, "::ffff:10.0.0.1",
                  40020, 1, 1, 3, comm="my server")
    reduced = line(1, bits(2, 7), 2, -1, "10.0.0.1", 40030, "10.0.0.2", 80, 0, 0, -1)
    parser = TraceParser("n", boot_offset_ns=0, ports=(32768, 60999))
    parser.feed([no_answer, midstream_client, midstream_server, mapped, reduced])
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
    assert (got[4]["tcp_state"], got[4]["bytes_in"], got[4]["bytes_out"]) == (
        "no-answer", None, None)
    assert parser.stats.midstream == 2 and parser.stats.no_answer == 2


def test_program_variants() -> None:
    assert "bytes_acked" in PROGRAM and "sys_exit_accept4" in PROGRAM
    reduced = program(btf=False)
    assert "struct" not in reduced and "accept" not in reduced
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
