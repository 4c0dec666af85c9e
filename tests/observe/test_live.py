"""Live capture: real packets on this machine's loopback, decoded like a capture file.

These tests capture for real (CI runs as root, like the developers' machines): traffic is
made on ``lo`` by the test itself (an HTTP server and client, UDP datagrams), and the
references are what the test knows it sent (ports it bound, request lines it wrote, payloads,
sizes derived from the header lengths) and tshark reading the pcap the capture saved.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from observe.conntrack import ConnectionTracker
from observe.errors import InputError
from observe.live import ANY, CAP_HINT, LiveChunk, capture_live
from observe.pcap import LT_ETHERNET, LT_SLL2

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is installed by .ci/run")
ROOT = Path(__file__).resolve().parents[2]
LO_INDEX = socket.if_nametoindex("lo")
#: Upper bound for every capture here, so a bug cannot hang the suite.
SAFETY_S = 30.0


def free_port(family: socket.AddressFamily = socket.AF_INET, kind: int = socket.SOCK_DGRAM,
              host: str = "127.0.0.1") -> int:
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_capture(chunks: Iterator[LiveChunk], traffic: Callable[[], None],
                stop: threading.Event | None) -> list[LiveChunk]:
    """Consume a capture in this thread while ``traffic`` runs in another; set ``stop``
    when the traffic is done."""
    error: list[BaseException] = []

    def drive() -> None:
        try:
            traffic()
        except BaseException as e:  # surfaced below
            error.append(e)
        finally:
            if stop is not None:
                stop.set()

    t = threading.Thread(target=drive)
    t.start()
    out = list(chunks)
    t.join()
    if error:
        raise error[0]
    return out


def all_frames(chunks: list[LiveChunk]) -> list[int]:
    return [f for c in chunks for b in c.batches for f in b.frame.tolist()]


def track(chunks: list[LiveChunk]) -> pa.Table:
    """Feed the chunks through a tracker the way a live pipeline does (flush per chunk)."""
    tracker = ConnectionTracker()
    tables = []
    for c in chunks:
        for b in c.batches:
            tracker.update(b)
        tables.append(tracker.flush(c.now_ns).connections)
    tables.append(tracker.finish().connections)
    return pa.concat_tables(tables)


def tshark_fields(pcap: bytes, tmp_path: Path, *fields: str) -> list[list[str]]:
    path = tmp_path / "live.pcap"
    path.write_bytes(pcap)
    assert TSHARK is not None
    args = [TSHARK, "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


# --- TCP: an HTTP server and client over lo ---------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: the server closes after each response, so every request is one connection.
    def do_GET(self) -> None:
        body = f"hello {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@needs_tshark
def test_http_connections_over_lo(http_server: int, tmp_path: Path) -> None:
    port = http_server
    n = 6
    client_ports: dict[int, str] = {}
    stop = threading.Event()
    saved = io.BytesIO()
    t0 = time.time_ns()
    chunks_it = capture_live("lo", bpf=f"tcp port {port}", flush_every_s=0.05, stop=stop,
                             duration_s=SAFETY_S, save=saved)

    def traffic() -> None:
        for i in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.connect()
            assert conn.sock is not None
            path = f"/item/{i}"
            client_ports[conn.sock.getsockname()[1]] = path
            conn.request("GET", path)
            assert conn.getresponse().read() == f"hello {path}\n".encode()
            conn.close()
            time.sleep(0.08)  # spread the connections over several flushes
        time.sleep(0.1)  # let the last FIN/ACKs arrive

    chunks = run_capture(chunks_it, traffic, stop)
    t1 = time.time_ns()
    stats = chunks[-1].stats
    assert chunks[-1].final and chunks[-1].reason == "end" and stats.ended_by == "stop"
    assert sum(1 for c in chunks if c.records) > 1, "traffic should span several flushes"
    assert stats.flushes == len(chunks)

    # Frame numbers continue across flushes: 1..captured, each once, in capture order.
    frames = all_frames(chunks)
    assert frames == list(range(1, stats.captured + 1))
    assert [c.first_frame for c in chunks if c.records] == sorted(
        {c.first_frame for c in chunks if c.records})
    ts = [t for c in chunks for b in c.batches for t in b.ts_ns.tolist()]
    assert ts == sorted(ts) and t0 <= ts[0] and ts[-1] <= t1
    assert all((b.linktype == LT_ETHERNET).all() for c in chunks for b in c.batches)
    assert stats.kernel_dropped == 0 and stats.kernel_received == stats.captured
    assert stats.kernel_buffer >= 1 << 20

    conns = track(chunks).to_pylist()
    assert len(conns) == n
    assert {c["client_port"] for c in conns} == set(client_ports)
    for c in conns:
        assert (c["client_ip"], c["server_ip"], c["server_port"]) == ("127.0.0.1", "127.0.0.1",
                                                                      port)
        assert c["transport"] == "tcp" and c["handshake"] and c["state"] == "established"
        assert c["client_by"] == "syn" and c["ended"] == "fin"
        path = client_ports[c["client_port"]]
        assert c["client_head"].startswith(f"GET {path} HTTP/1.1\r\n".encode())
        assert c["server_head"].startswith(b"HTTP/1.0 200 ")

    # tshark on the saved pcap: same frames, same timestamps, same per-direction counts.
    rows = tshark_fields(saved.getvalue(), tmp_path, "frame.number", "frame.time_epoch",
                         "frame.len", "tcp.srcport", "tcp.dstport")
    assert [int(r[0]) for r in rows] == frames
    assert [int(r[1].replace(".", "")) for r in rows] == ts  # seconds with 9 decimals
    want: Counter[tuple[int, str]] = Counter()
    want_bytes: Counter[tuple[int, str]] = Counter()
    for r in rows:
        sp, dp = int(r[3]), int(r[4])
        key = (sp, "c2s") if dp == port else (dp, "s2c")
        want[key] += 1
        want_bytes[key] += int(r[2])
    for c in conns:
        for d in ("c2s", "s2c"):
            assert c[f"packets_{d}"] == want[(c["client_port"], d)]
            assert c[f"bytes_{d}"] == want_bytes[(c["client_port"], d)]


# --- UDP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host,family", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_udp_datagrams(host: str, family: socket.AddressFamily) -> None:
    port = free_port(family, host=host)
    other = free_port(family, host=host)
    payloads = [f"datagram {i}".encode() * (i + 1) for i in range(20)]
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.bind((host, 0))
    sport = sender.getsockname()[1]
    stop = threading.Event()
    chunks_it = capture_live("lo", bpf=f"udp dst port {port}", flush_every_s=0.05, stop=stop,
                             duration_s=SAFETY_S)

    def traffic() -> None:
        for i, p in enumerate(payloads):
            sender.sendto(p, (host, port))
            sender.sendto(b"not for this filter", (host, other))
            if i % 5 == 4:
                time.sleep(0.06)
        time.sleep(0.05)

    chunks = run_capture(chunks_it, traffic, stop)
    sender.close()
    stats = chunks[-1].stats
    assert stats.captured == len(payloads)  # the filter ran in the kernel: no other port
    assert stats.kernel_received == len(payloads)
    got = [(b.payload(i), int(b.frame_len[i]), int(b.ip_version[i]))
           for c in chunks for b in c.batches for i in range(len(b))]
    ip_header = 20 if family == socket.AF_INET else 40
    ver = 4 if family == socket.AF_INET else 6
    assert got == [(p, 14 + ip_header + 8 + len(p), ver) for p in payloads]
    conns = track(chunks).to_pylist()
    assert len(conns) == 1
    c = conns[0]
    assert (c["transport"], c["client_ip"], c["client_port"], c["server_port"]) == (
        "udp", host, sport, port)
    assert c["packets_c2s"] == len(payloads) and c["packets_s2c"] == 0
    assert c["client_head"] == payloads[0] and c["state"] == "no-answer"


@needs_tshark
def test_any_is_cooked_sll2_without_loopback_duplicates(tmp_path: Path) -> None:
    port = free_port()
    k = 12
    stop = threading.Event()
    saved = io.BytesIO()
    chunks_it = capture_live(ANY, bpf=f"udp port {port}", flush_every_s=0.05, stop=stop,
                             duration_s=SAFETY_S, save=saved)

    def traffic() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(k):
                s.sendto(bytes([i]) * 10, ("127.0.0.1", port))
        time.sleep(0.05)

    chunks = run_capture(chunks_it, traffic, stop)
    stats = chunks[-1].stats
    # Loopback passes the tap twice per packet; the outgoing copy is filtered out.
    assert stats.captured == k and stats.linktype == LT_SLL2
    batches = [b for c in chunks for b in c.batches]
    assert all((b.linktype == LT_SLL2).all() for b in batches)
    assert [b.payload(i) for b in batches for i in range(len(b))] == [
        bytes([i]) * 10 for i in range(k)]
    # SLL2 header (20) + IPv4 (20) + UDP (8) + 10 payload bytes.
    assert all((b.frame_len == 58).all() for b in batches)
    rows = tshark_fields(saved.getvalue(), tmp_path, "sll.ifindex", "sll.pkttype", "sll.hatype",
                         "sll.etype", "udp.dstport", "frame.len")
    assert rows == [[str(LO_INDEX), "0", "772", "0x0800", str(port), "58"]] * k


# --- stop conditions, limits ---------------------------------------------------------------------


def test_count_stops_after_n_packets() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        chunks_it = capture_live("lo", bpf=f"udp port {port}", count=3, duration_s=SAFETY_S)
        for i in range(10):  # queued in the kernel before the first read
            s.sendto(bytes([i]), ("127.0.0.1", port))
        chunks = list(chunks_it)
    stats = chunks[-1].stats
    assert stats.ended_by == "count" and stats.captured == 3
    assert all_frames(chunks) == [1, 2, 3]
    assert [b.payload(i) for c in chunks for b in c.batches for i in range(len(b))] == [
        b"\x00", b"\x01", b"\x02"]


def test_duration_ends_the_capture_and_empty_intervals_still_flush() -> None:
    port = free_port()  # nothing is sent there
    t = time.monotonic()
    chunks = list(capture_live("lo", bpf=f"udp port {port}", duration_s=0.35,
                               flush_every_s=0.1))
    elapsed = time.monotonic() - t
    assert 0.35 <= elapsed < 3
    assert chunks[-1].stats.ended_by == "duration" and chunks[-1].final
    assert len(chunks) >= 3 and all(c.records == 0 and not c.batches for c in chunks)
    assert [c.now_ns for c in chunks] == sorted(c.now_ns for c in chunks)


def test_snaplen_truncates_but_keeps_the_wire_length() -> None:
    port = free_port()
    stop = threading.Event()
    def traffic() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"z" * 1000, ("127.0.0.1", port))

    chunks = run_capture(
        capture_live("lo", bpf=f"udp port {port}", snaplen=100, stop=stop, duration_s=SAFETY_S),
        traffic, stop)
    stats = chunks[-1].stats
    (b,) = [b for c in chunks for b in c.batches]
    assert stats.truncated == 1
    assert int(b.cap_len[0]) == 100 and int(b.frame_len[0]) == 14 + 20 + 8 + 1000
    assert int(b.payload_len[0]) == 1000 and int(b.payload_cap[0]) == 100 - 42


def test_size_flush_before_the_interval() -> None:
    port = free_port()
    stop = threading.Event()
    n = 1500
    chunks_it = capture_live("lo", bpf=f"udp port {port}", flush_every_s=60,
                             max_chunk_bytes=1 << 20, stop=stop, duration_s=SAFETY_S)

    def traffic() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(n):
                s.sendto(b"q" * 1200, ("127.0.0.1", port))
        time.sleep(0.05)

    chunks = run_capture(chunks_it, traffic, stop)
    assert "size" in {c.reason for c in chunks}
    assert all_frames(chunks) == list(range(1, n + 1))
    assert chunks[-1].stats.kernel_dropped == 0


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_interface_names_it_and_lists_the_real_ones() -> None:
    with pytest.raises(InputError) as e:
        capture_live("nosuch-if0")
    msg = str(e.value)
    assert "nosuch-if0" in msg and "lo" in msg and ANY in msg and "\n" not in msg


@pytest.mark.parametrize("iface", ["lo", ANY])
def test_bad_bpf_reports_the_compilers_message(iface: str) -> None:
    with pytest.raises(InputError) as e:
        capture_live(iface, bpf="tcp portt 80")
    msg = str(e.value)
    # libpcap's own words for a parse error.
    assert "tcp portt 80" in msg and "syntax error" in msg and "\n" not in msg


def test_link_level_filter_on_any_does_not_compile() -> None:
    with pytest.raises(InputError) as e:
        capture_live(ANY, bpf="ether host 01:02:03:04:05:06")
    assert "ethernet addresses" in str(e.value)
    # ...while on an Ethernet-framed interface it does.
    list(capture_live("lo", bpf="ether host 01:02:03:04:05:06", duration_s=0.05))


def _child(code: str, *prefix: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*prefix, sys.executable, "-c", textwrap.dedent(code)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_missing_cap_net_raw_is_one_clear_line() -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) drops the capability for this test"
    code = """
        import json, socket
        from observe.errors import InputError
        from observe.live import capture_live
        out = {}
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
            out["raw_socket"] = "allowed"
        except PermissionError:
            out["raw_socket"] = "denied"
        try:
            capture_live("lo", bpf="tcp")
            out["error"] = None
        except InputError as e:
            out["error"] = str(e)
            out["hint"] = e.hint
        print(json.dumps(out))
    """
    child = _child(code, setpriv, "--inh-caps=-net_raw", "--bounding-set=-net_raw")
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["raw_socket"] == "denied", "the child must really lack CAP_NET_RAW"
    assert out["error"] == ("live:lo: cannot capture on lo: no permission to open a packet "
                            "socket (live capture needs CAP_NET_RAW)")
    assert out["hint"] == CAP_HINT and "setcap cap_net_raw,cap_net_admin=eip" in out["hint"]
    assert "NET_RAW" in out["hint"] and "\n" not in out["error"]


def test_sigterm_flushes_everything_captured_before_it() -> None:
    port = free_port()
    k = 2000  # several receive bursts (512 packets each) queued when the signal comes
    code = f"""
        import json, threading
        from observe.live import capture_live, stop_on_signals
        stop = threading.Event()
        with stop_on_signals(stop):
            chunks = capture_live("lo", bpf="udp port {port}", stop=stop, flush_every_s=600,
                                  duration_s={SAFETY_S})
            print("ready", flush=True)
            payloads, frames, finals = [], [], []
            for c in chunks:
                finals.append(c.final)
                for b in c.batches:
                    frames += b.frame.tolist()
                    payloads += [b.payload(i).decode() for i in range(len(b))]
        print(json.dumps({{"payloads": payloads, "frames": frames, "finals": finals,
                          "ended_by": c.stats.ended_by, "after_stop": c.stats.after_stop}}))
    """
    child = _child(code)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    sent = [f"p{i}" for i in range(k)]
    # The child is stopped while the packets arrive, as if busy with a chunk: they wait in
    # the kernel's queue, and the SIGTERM is delivered before the child reads any of them.
    child.send_signal(signal.SIGSTOP)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in sent:
            s.sendto(p.encode(), ("127.0.0.1", port))
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGCONT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["ended_by"] == "stop" and out["after_stop"] == 0
    assert out["finals"] == [True]  # one flush: the final one, triggered by the signal
    assert out["payloads"] == sent
    assert out["frames"] == list(range(1, k + 1))


def test_import_is_cheap() -> None:
    code = "import sys, observe.live; print('scapy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"
