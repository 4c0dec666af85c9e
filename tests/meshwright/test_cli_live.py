"""`meshwright observe --iface`: a real capture on loopback, stopped by SIGTERM, and its
usage errors. Runs as root here (CI too); the capture is real traffic to a local server."""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from meshwright.cli import EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def _meshwright(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "meshwright", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_a_live_capture_and_keeps_every_connection(
        server: int, tmp_path: Path) -> None:
    out = tmp_path / "live.parquet"
    saved = tmp_path / "live.pcap"
    proc = _meshwright("observe", "--iface", "lo", "--bpf", f"tcp port {server}",
                       "--flush-every", "30", "--save", str(saved), "-o", str(out))
    assert proc.stderr is not None
    line = proc.stderr.readline()  # printed once the socket is open
    assert "capturing on lo" in line, line
    for path in ("/", "/README.md"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server}{path}", timeout=10) as r:
            r.read()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # long before the 30 s flush: only the stop flushes
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK, err
    assert "2 connections" in err
    rows = pq.read_table(out).to_pylist()
    conns = [r for r in rows if r["kind"] == "connection"]
    reqs = [r for r in rows if r["kind"] == "request"]
    assert len(conns) == 2 and {r["dst_port"] for r in conns} == {server}
    assert sorted(r["path"] for r in reqs) == ["/", "/README.md"]
    assert {r["source"] for r in rows} == {"live"}
    assert all(r["tcp_state"] == "established" for r in conns)
    # The saved pcap is a capture like any other: observing it gives the same records.
    again = tmp_path / "again.parquet"
    rerun = subprocess.run([sys.executable, "-m", "meshwright", "observe", str(saved), "-o",
                            str(again)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    key = ("kind", "src_port", "dst_port", "method", "path", "bytes_in", "bytes_out")
    assert sorted(tuple(r[k] for k in key) for r in pq.read_table(again).to_pylist()) == \
        sorted(tuple(r[k] for k in key) for r in rows)


@pytest.mark.parametrize(("args", "message"), [
    (["--bpf", "tcp"], "only apply to a live capture"),
    (["--duration", "5"], "only apply to a live capture"),
    (["x.pcap", "--iface", "lo"], "either INPUT files or --iface"),
    ([], "nothing to observe"),
    (["--iface", "lo", "--duration", "0"], "must be > 0"),
])
def test_live_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _meshwright("observe", *args, "-o", str(tmp_path / "o.parquet"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_USAGE
    assert message in err


def test_unknown_interface_is_an_input_error(tmp_path: Path) -> None:
    proc = _meshwright("observe", "--iface", "nosuchif0", "--duration", "1", "-o",
                       str(tmp_path / "o.parquet"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "nosuchif0" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("meshwright: error")]) == 1
