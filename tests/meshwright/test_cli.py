"""The command line: help, documented exit codes, one-line errors, stdin, --kube, --envoy-format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.kube_api import FakeApiServer, _kubeconfig, objects_from_list

from meshwright.cli import EXIT_INPUT, EXIT_NO_FLOWS, EXIT_OK, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "bookinfo"
HTTPBIN = ROOT / "tests" / "data" / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log"


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshwright", *args], cwd=ROOT, input=stdin.decode() if stdin
        else None, capture_output=True, text=True, check=False, timeout=300,
    )


def test_help_lists_commands_examples_and_exit_codes() -> None:
    result = _run("analyze", "--help")
    assert result.returncode == 0
    for text in ("--inventory", "--trust-domain", "--plaintext", "--dry-run-annotation",
                 "--envoy-format", "--kube", "examples:", "Exit codes"):
        assert text in result.stdout, text
    assert "observe" in _run("--help").stdout


def test_usage_error_exit_2() -> None:
    result = _run("analyze", str(SAMPLE))  # no -o
    assert result.returncode == EXIT_USAGE
    assert "-o" in result.stderr


def test_missing_input_is_one_line_error_exit_3(tmp_path: Path) -> None:
    result = _run("analyze", str(tmp_path / "nope.log"), "-o", str(tmp_path / "out"))
    assert result.returncode == EXIT_INPUT
    assert "Traceback" not in result.stderr
    assert "nope.log" in result.stderr
    assert result.stderr.count("\n") <= 2  # the error, maybe a hint


def test_unrecognised_file_named_explicitly_exit_3(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    result = _run("observe", str(junk), "-o", str(tmp_path / "f.parquet"))
    assert result.returncode == EXIT_INPUT
    assert "junk.bin" in result.stderr and "Traceback" not in result.stderr


def test_bad_inventory_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.json"
    bad.write_text('{"kind": "List", "items": [\n  {"kind": "Pod",\n', encoding="utf-8")
    result = _run("analyze", str(HTTPBIN), "--inventory", str(bad), "-o", str(tmp_path / "o"))
    assert result.returncode == EXIT_INPUT
    assert "cluster.json" in result.stderr and "Traceback" not in result.stderr


def test_no_flows_exit_4(tmp_path: Path) -> None:
    empty = tmp_path / "proxy.log"
    empty.write_text("2025-01-30T10:00:00.000000Z\tinfo\tFLAG: --concurrency=\"2\"\n")
    assert main(["observe", str(empty), "-o", str(tmp_path / "f.parquet"), "-q"]) == EXIT_NO_FLOWS


def test_malformed_lines_reported_with_file_and_line(tmp_path: Path) -> None:
    good = HTTPBIN.read_text("utf-8").splitlines()
    log = tmp_path / "mixed.log"
    log.write_text("\n".join([good[0], good[1][:80], good[1]]) + "\n", encoding="utf-8")
    result = _run("observe", str(log), "-o", str(tmp_path / "f.parquet"))
    assert result.returncode == EXIT_OK
    assert "1 malformed" in result.stderr
    assert f"{log}:2" in result.stderr


def test_stdin_and_observe_then_analyze(tmp_path: Path) -> None:
    flows = tmp_path / "flows.parquet"
    result = _run("observe", "-", "-o", str(flows), stdin=HTTPBIN.read_bytes())
    assert result.returncode == EXIT_OK, result.stderr
    assert "2 flow records" in result.stderr
    out = tmp_path / "out"
    assert main(["analyze", str(flows), "-o", str(out), "-q"]) == EXIT_OK
    graph = json.loads((out / "graph.json").read_text("utf-8"))
    assert graph["edges"], graph


def test_custom_envoy_format(tmp_path: Path) -> None:
    fmt = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
           "%RESPONSE_CODE% %UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% "
           "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME%")
    log = tmp_path / "custom.log"
    log.write_text(
        '[2024-05-14T08:00:00.000Z] "GET /status/200 HTTP/1.1" 200 inbound|80|| '
        "10.44.1.27:80 10.44.1.23:37652 outbound_.8000_._.httpbin.foo.svc.cluster.local\n",
        encoding="utf-8",
    )
    assert main(["observe", str(log), "-o", str(tmp_path / "f.parquet"), "-q"]) != EXIT_OK
    flows = tmp_path / "f.parquet"
    assert main(["observe", str(log), "--envoy-format", fmt, "-o", str(flows), "-q"]) == EXIT_OK
    import pyarrow.parquet as pq

    [row] = pq.read_table(flows).to_pylist()
    assert (row["method"], row["dst_port"], row["mtls"]) == ("GET", 80, "mtls")


def test_live_inventory_gives_the_same_policies_as_the_dump(tmp_path: Path) -> None:
    """--kube reads the inventory from a local server speaking the real API endpoints."""
    items = json.loads((SAMPLE / "inventory.json").read_text("utf-8"))["items"]
    logs = tmp_path / "logs"
    shutil.copytree(SAMPLE / "logs", logs)
    with FakeApiServer(objects_from_list(items)) as api:
        kubeconfig = _kubeconfig(tmp_path, api.url)
        live = tmp_path / "live"
        assert main(["analyze", str(logs), "--kube", "--kubeconfig", kubeconfig,
                     "-o", str(live), "-q"]) == EXIT_OK
    offline = tmp_path / "offline"
    assert main(["analyze", str(logs), "--inventory", str(SAMPLE / "inventory.json"),
                 "-o", str(offline), "-q"]) == EXIT_OK
    def texts(root: Path) -> dict[str, object]:
        return {str(p.relative_to(root)): yaml.safe_load(p.read_text("utf-8"))
                for p in sorted((root / "policies").rglob("*.yaml"))}
    assert texts(live) == texts(offline)
    assert len(texts(live)) >= 8


def test_unreachable_api_is_an_input_error(tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path, "http://127.0.0.1:9")
    code = main(["analyze", str(HTTPBIN), "--kube", "--kubeconfig", kubeconfig,
                 "-o", str(tmp_path / "o"), "-q"])
    assert code == EXIT_INPUT


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02" * 100,
    b"[2024-05-14T08:00:00.000Z] \"GET /\n" * 10,
    b'{"start_time": 5, "response_code": "x"}\n' * 10,
    b"\xff\xfe not utf-8 \xc3\x28\n" * 10,
])
def test_garbage_never_gives_a_traceback(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "dump"
    path.mkdir()
    (path / "x.log").write_bytes(garbage)
    result = _run("analyze", str(path), "-o", str(tmp_path / "out"))
    assert "Traceback" not in result.stderr
    assert result.returncode in (EXIT_OK, EXIT_INPUT, EXIT_NO_FLOWS), result.stderr


def test_impossible_dates_are_malformed_lines_not_crashes(tmp_path: Path) -> None:
    lines = HTTPBIN.read_text("utf-8").splitlines()
    text = tmp_path / "bad.log"
    text.write_text(lines[0].replace("2020-11-25", "2020-13-45") + "\n" + lines[1] + "\n")
    record = {"start_time": "2020-02-30T21:26:18.409Z", "method": "GET", "path": "/",
              "protocol": "HTTP/1.1", "response_code": 200, "upstream_cluster": "inbound|80||",
              "downstream_local_address": "10.0.0.1:80",
              "downstream_remote_address": "10.0.0.2:5555", "bytes_received": 0,
              "bytes_sent": 1, "duration": 1, "requested_server_name": None}
    good = {**record, "start_time": "2020-02-28T21:26:18.409Z"}
    js = tmp_path / "bad.json"
    js.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    for path in (text, js):
        result = _run("observe", str(path), "-o", str(tmp_path / "f.parquet"))
        assert result.returncode == EXIT_OK, result.stderr
        assert "1 malformed" in result.stderr and f"{path}:1" in result.stderr


def test_unwritable_output_is_an_error_not_a_crash() -> None:
    result = _run("analyze", str(SAMPLE), "-o", "/proc/meshwright-out")
    assert result.returncode == EXIT_INPUT
    assert "/proc/meshwright-out" in result.stderr and "internal error" not in result.stderr


def test_progress_is_shown_on_a_terminal_only(tmp_path: Path) -> None:
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.run(
        [sys.executable, "-m", "meshwright", "analyze", str(SAMPLE), "-o", str(tmp_path / "o")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower,
        check=False, timeout=300,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.returncode == EXIT_OK
    assert b"\rreading:" in seen and b"\rlearning:" in seen and b"records" in seen
    piped = _run("analyze", str(SAMPLE), "-o", str(tmp_path / "p"))
    assert "\r" not in piped.stderr


def test_records_without_a_destination_are_counted_not_dropped(tmp_path: Path) -> None:
    record = {"start_time": "2020-11-25T21:26:18.409Z", "method": "GET", "path": "/x",
              "protocol": "HTTP/1.1", "response_code": 200, "upstream_cluster": "inbound|80||",
              "downstream_local_address": "", "downstream_remote_address": "",
              "upstream_host": "", "requested_server_name": ""}
    log = tmp_path / "odd.json"
    log.write_text((json.dumps(record) + "\n") * 3, encoding="utf-8")
    result = _run("analyze", str(log), "-o", str(tmp_path / "o"))
    assert result.returncode == EXIT_OK, result.stderr
    assert "3 records name no destination" in result.stderr
    report = (tmp_path / "o" / "report.md").read_text("utf-8")
    assert "| records with no destination identity (not in the graph) | 3 |" in report
