"""`meshwright observe --ebpf`: the real tracer (bpftrace, installed by .ci/run), stopped by
SIGTERM, and its usage errors."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from meshwright.cli import EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_tracing_and_keeps_the_connections(tmp_path: Path) -> None:
    out = tmp_path / "ebpf.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "meshwright", "observe", "--ebpf", "-o",
                             str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "tracing TCP connections" in line, line + (proc.stderr.read() or "")
    # Printed once the probes are attached: every connection from here on is traced.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as client:
                conn, _ = server.accept()
                client.sendall(b"x" * 1000)
                assert len(conn.recv(4096)) > 0
                conn.close()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_OK, err
    rows = [r for r in pq.read_table(out).to_pylist() if r["dst_port"] == port]
    clients = [r for r in rows if r["direction"] == "outbound"]
    assert len(clients) == 3, err
    assert {r["comm"] for r in clients} == {"python"}
    assert all(r["kind"] == "connection" and r["source"] == "ebpf" for r in rows)
    # 1000 bytes from each client, within the stated tolerance of one byte.
    assert all(abs(r["bytes_in"] - 1000) <= 1 for r in clients), clients


def test_ebpf_usage_errors(tmp_path: Path) -> None:
    for args in (["x.log", "--ebpf"], ["--ebpf", "--iface", "lo"], ["--ebpf", "--bpf", "tcp"]):
        done = subprocess.run([sys.executable, "-m", "meshwright", "observe", *args, "-o",
                               str(tmp_path / "o.parquet")], cwd=ROOT, capture_output=True,
                              text=True, check=False, timeout=60)
        assert done.returncode == EXIT_USAGE, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_map_entries_bound_what_fits_and_the_rest_is_reported_lost(tmp_path: Path) -> None:
    """--ebpf-map-entries reaches the tracer: 64-entry maps cannot hold a 300-connection
    burst, and the summary says how many connections were lost instead of hiding them."""
    out = tmp_path / "ebpf.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "meshwright", "observe", "--ebpf",
                             "--ebpf-map-entries", "64", "-o", str(out)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "tracing TCP connections" in line, line + (proc.stderr.read() or "")
    with socket.create_server(("127.0.0.1", 0), backlog=512) as server:
        port = server.getsockname()[1]
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", port)):
                server.accept()[0].close()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_OK, err
    lost = re.search(r"([\d,]+) events LOST", err)
    assert lost is not None, err
    ours = [r for r in pq.read_table(out).to_pylist()
            if r["dst_port"] == port and r["direction"] == "outbound"]
    assert len(ours) < 300 and len(ours) + int(lost.group(1).replace(",", "")) >= 300, err
