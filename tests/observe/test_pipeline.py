"""End to end from dumps on disk to flow batches: every layout, dedupe, stats, Parquet."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from observe.errors import FormatError, InputError
from observe.flows_io import write_flows
from observe.pipeline import (
    ObserveOptions,
    ObserveStats,
    iter_flows,
    observe_inputs,
    plan_inputs,
)
from observe.schema import FLOW_SCHEMA

DATA = Path(__file__).parent.parent / "data"
ENVOY = DATA / "envoy-logs"
# Real lines: one request sleep -> httpbin seen by both sidecars (client side, server side).
CLIENT, SERVER = (ENVOY / "istio-docs-access-log-sleep-httpbin.log").read_text().splitlines()
WAYPOINT = (ENVOY / "kiali-waypoint.log").read_text().splitlines()
LEGACY = (ENVOY / "istio-docs-egress-control-2019-legacy-format.log").read_text().splitlines()
# The proxy's own diagnostics, as pilot-agent and Envoy print them.
STARTUP = [
    '2020-11-25T21:20:00.000000Z\tinfo\tFLAG: --concurrency="2"',
    "2020-11-25T21:20:01.000000Z\tinfo\tEnvoy proxy is ready",
    "[2020-11-25 21:20:01.123][15][warning][main] deprecated option",
]
TS = "2020-11-25T21:26:18.409123456Z"
KNOWN = frozenset({("foo", "sleep-1"), ("foo", "httpbin-1")})


def run(paths: list[str], **options: object) -> tuple[pa.Table, ObserveStats]:
    opts = ObserveOptions(**options)  # type: ignore[arg-type]
    obs = observe_inputs(paths, opts)
    batches = list(obs.batches)
    for b in batches:
        assert b.schema.equals(FLOW_SCHEMA)
    table = pa.Table.from_batches(batches, schema=FLOW_SCHEMA)
    return table.sort_by([("origin", "ascending")]), obs.stats


def write(path: Path, lines: list[str], *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def col(table: pa.Table, name: str) -> list[object]:
    return table.column(name).to_pylist()


def test_kubectl_dump_dir_by_namespace(tmp_path: Path) -> None:
    write(tmp_path / "foo" / "sleep-1.log", [*STARTUP, CLIENT])
    write(tmp_path / "foo" / "httpbin-1" / "istio-proxy.log", [STARTUP[0], SERVER, ""])
    table, stats = run([str(tmp_path)])
    assert col(table, "origin") == [
        f"{tmp_path}/foo/httpbin-1/istio-proxy.log:2",
        f"{tmp_path}/foo/sleep-1.log:4",
    ]
    assert col(table, "reporter") == ["foo/httpbin-1", "foo/sleep-1"]
    assert col(table, "path") == ["/status/418", "/status/418"]
    assert col(table, "source") == ["istio-text", "istio-text"]
    assert stats.files == 2 and stats.records == 2
    assert stats.lines == 7 and stats.ignored_lines == 5  # 4 diagnostics + 1 blank
    assert stats.malformed == 0 and stats.duplicates == 0
    assert stats.by_source == {"istio-text": 2}


def test_flat_file_without_namespace_has_null_reporter(tmp_path: Path) -> None:
    write(tmp_path / "sleep-1.log", [CLIENT])
    table, _ = run([str(tmp_path)])
    assert col(table, "reporter") == [None]
    table, _ = run([str(tmp_path)], known_pods=KNOWN)
    assert col(table, "reporter") == ["foo/sleep-1"]


def test_kubectl_prefix_and_timestamps(tmp_path: Path) -> None:
    path = write(
        tmp_path / "all.log",
        [
            f"[pod/sleep-1/istio-proxy] {TS} {STARTUP[0]}",
            f"[pod/sleep-1/istio-proxy] {TS} {CLIENT}",
            f"[pod/httpbin-1/istio-proxy] {SERVER}",
        ],
    )
    table, stats = run([str(path)], known_pods=KNOWN)
    assert col(table, "reporter") == ["foo/sleep-1", "foo/httpbin-1"]
    assert col(table, "origin") == [f"{path}:2", f"{path}:3"]
    assert stats.ignored_lines == 1
    table, _ = run([str(path)])  # namespace unknown without the inventory
    assert col(table, "reporter") == [None, None]


def test_kubectl_timestamps_real_waypoint_log(tmp_path: Path) -> None:
    path = write(tmp_path / "bookinfo" / "waypoint-5f4.log", WAYPOINT)
    table, stats = run([str(tmp_path)])
    assert stats.records == len(WAYPOINT) == 16
    assert set(col(table, "reporter")) == {"bookinfo/waypoint-5f4"}
    assert col(table, "origin")[0] == f"{path}:1"


def test_cri_node_file_joins_partial_lines(tmp_path: Path) -> None:
    pod_dir = tmp_path / "var/log/pods/foo_sleep-1_0b9ad7a2-5b5d-4d1e-9c1e-3f6f8b0c2d11"
    path = write(
        pod_dir / "istio-proxy" / "0.log",
        [
            f"{TS} stderr F {STARTUP[0]}",
            f"{TS} stdout P {CLIENT[:50]}",
            f"{TS} stderr F {STARTUP[1]}",
            f"{TS} stdout P {CLIENT[50:120]}",
            f"{TS} stdout F {CLIENT[120:]}",
            "not a cri line",
        ],
    )
    table, stats = run([str(path)])
    assert col(table, "origin") == [f"{path}:2"]
    assert col(table, "reporter") == ["foo/sleep-1"]
    assert col(table, "path") == ["/status/418"]
    assert stats.lines == 6 and stats.ignored_lines == 2
    assert stats.malformed == 1
    assert stats.malformed_samples == [f"{path}:6: not a CRI log line"]


def test_var_log_containers_name_has_pod_before_namespace(tmp_path: Path) -> None:
    name = f"httpbin-1_foo_istio-proxy-{'ab' * 32}.log"
    write(tmp_path / "containers" / name, [f"{TS} stdout F {SERVER}"])
    table, _ = run([str(tmp_path)])
    assert col(table, "reporter") == ["foo/httpbin-1"]


def test_shipper_envelopes(tmp_path: Path) -> None:
    fluent = {
        "date": 1606339578.409,
        "log": CLIENT + "\n",
        "stream": "stdout",
        "kubernetes": {
            "pod_name": "sleep-1",
            "namespace_name": "foo",
            "container_name": "istio-proxy",
        },
    }
    vector = {
        "message": SERVER,
        "kubernetes": {
            "pod_name": "httpbin-1",
            "pod_namespace": "foo",
            "container_name": "istio-proxy",
        },
        "source_type": "kubernetes_logs",
        "timestamp": TS,
    }
    loki = {
        "labels": {"container": "istio-proxy", "namespace": "bookinfo", "pod": "wp-1"},
        "line": WAYPOINT[0].split(" ", 1)[1],
        "timestamp": TS,
    }
    diag = dict(fluent, log=STARTUP[1])
    path = write(
        tmp_path / "export.jsonl", [json.dumps(r) for r in (fluent, diag, vector, loki)] + ["{oops"]
    )
    table, stats = run([str(path)])
    assert col(table, "reporter") == ["foo/sleep-1", "foo/httpbin-1", "bookinfo/wp-1"]
    assert col(table, "origin") == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert stats.ignored_lines == 1
    assert stats.malformed == 1 and stats.malformed_samples[0].startswith(f"{path}:5: not JSON")


def test_gzip_with_misleading_name_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "foo" / "sleep-1.txt", [CLIENT], gz=True)
    table, _ = run([str(tmp_path)])
    assert col(table, "origin") == [f"{path}:1"] and col(table, "reporter") == ["foo/sleep-1"]

    data = gzip.compress(("\n".join([STARTUP[0], SERVER, CLIENT]) + "\n").encode())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    table, stats = run(["-"])
    assert col(table, "origin") == ["<stdin>:2", "<stdin>:3"]
    assert col(table, "reporter") == [None, None]
    assert stats.files == 1 and stats.ignored_lines == 1


def test_stdin_through_a_real_pipe(tmp_path: Path) -> None:
    code = (
        "from observe.pipeline import *\n"
        "o = observe_inputs(['-'], ObserveOptions())\n"
        "n = sum(b.num_rows for b in o.batches)\n"
        "print(n, o.stats.lines, o.stats.ignored_lines)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input="\n".join([*STARTUP, CLIENT, SERVER]) + "\n",
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.split() == ["2", "5", "3"]


def test_dedupe_same_pod_across_layouts(tmp_path: Path) -> None:
    """kubectl logs file + CRI node file + Loki export of the same pod: counted once."""
    kubectl = write(tmp_path / "kubectl" / "foo" / "sleep-1.log", [*STARTUP, CLIENT, LEGACY[0]])
    write(
        tmp_path
        / "node/var/log/pods/foo_sleep-1_0b9ad7a2-5b5d-4d1e-9c1e-3f6f8b0c2d11"
        / "istio-proxy"
        / "0.log",
        [
            f"{TS} stdout P {CLIENT[:30]}",
            f"{TS} stdout F {CLIENT[30:]}",
            f"{TS} stdout F {LEGACY[0]}",
            f"{TS} stdout F {LEGACY[1]}",
        ],
    )
    loki = {"labels": {"namespace": "foo", "pod": "sleep-1"}, "line": CLIENT, "timestamp": TS}
    other = {"labels": {"namespace": "foo", "pod": "httpbin-1"}, "line": CLIENT, "timestamp": TS}
    write(tmp_path / "loki.jsonl", [json.dumps(loki), json.dumps(other)])
    table, stats = run([str(tmp_path)])
    # sleep-1: CLIENT, LEGACY[0], LEGACY[1]; httpbin-1 logged the same text: a different key.
    assert stats.records == 4 and stats.duplicates == 3
    assert sorted(col(table, "reporter")) == [
        "foo/httpbin-1",
        "foo/sleep-1",
        "foo/sleep-1",
        "foo/sleep-1",
    ]  # kubectl/<ns>/<pod>.log too
    # The first file in walk order keeps the record (files before subdirectories).
    origins = col(table, "origin")
    assert f"{tmp_path}/loki.jsonl:1" in origins and f"{kubectl}:5" in origins


def test_no_dedupe_within_a_single_file(tmp_path: Path) -> None:
    path = write(tmp_path / "foo" / "sleep-1.log", [CLIENT, CLIENT])
    _, stats = run([str(path)])
    assert stats.records == 2 and stats.duplicates == 0


def test_malformed_access_lines_are_sampled(tmp_path: Path) -> None:
    bad = '[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" not the rest of the line'
    lines = [CLIENT, bad] + [bad] * 12
    path = write(tmp_path / "foo" / "sleep-1.log", lines)
    _, stats = run([str(path)])
    assert stats.records == 1 and stats.malformed == 13
    assert len(stats.malformed_samples) == 10
    assert stats.malformed_samples[0].startswith(f"{path}:2: ")
    assert stats.to_dict()["malformed"] == 13


def test_istio_json_lines(tmp_path: Path) -> None:
    obj = {
        "authority": "httpbin:8000",
        "bytes_received": 0,
        "bytes_sent": 135,
        "connection_termination_details": None,
        "downstream_local_address": "10.44.1.27:80",
        "downstream_remote_address": "10.44.1.23:37652",
        "duration": 3,
        "method": "GET",
        "path": "/status/418",
        "protocol": "HTTP/1.1",
        "request_id": "84961386-6d84-929d-98bd-c5aee93b5c88",
        "requested_server_name": "outbound_.8000_._.httpbin.foo.svc.cluster.local",
        "response_code": 418,
        "response_code_details": "via_upstream",
        "response_flags": "-",
        "route_name": "default",
        "start_time": "2020-11-25T21:26:18.409Z",
        "upstream_cluster": "inbound|8000||",
        "upstream_host": "127.0.0.1:80",
        "upstream_local_address": "127.0.0.1:41854",
        "upstream_service_time": "1",
        "upstream_transport_failure_reason": None,
        "user_agent": "curl/7.73.0-DEV",
        "x_forwarded_for": None,
    }
    path = write(tmp_path / "foo" / "httpbin-1.log", [STARTUP[0], json.dumps(obj), CLIENT])
    table, stats = run([str(tmp_path)])
    assert stats.by_source == {"istio-json": 1, "istio-text": 1}
    assert col(table, "origin") == [f"{path}:2", f"{path}:3"]
    assert col(table, "source") == ["istio-json", "istio-text"]


def test_custom_envoy_format(tmp_path: Path) -> None:
    shown = (ENVOY / "envoy-docs-default-format-as-shown.txt").read_text()
    fmt = " ".join(shown.split("\n")).strip().removesuffix("\\n").strip()
    example = (ENVOY / "envoy-docs-default-format-example.log").read_text().strip()
    path = write(tmp_path / "front" / "envoy-1.log", [STARTUP[0], example])
    table, stats = run([str(path)], envoy_format=fmt)
    assert col(table, "source") == ["envoy-custom"]
    assert col(table, "path") == ["/api/v1/locations"]
    assert stats.ignored_lines == 1
    with pytest.raises(FormatError):
        run([str(path)], envoy_format="%REQ(:METHOD")


def test_plan_sorts_by_content(tmp_path: Path) -> None:
    write(tmp_path / "logs" / "foo" / "sleep-1.log", [CLIENT])
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "bookinfo.txt").write_bytes(
        (DATA / "inventory" / "istio-samples-bookinfo.yaml").read_bytes()
    )
    write_flows([], tmp_path / "old.data")
    (tmp_path / "core").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    (tmp_path / "README").write_text("# notes\nThese logs are from Tuesday.\n")
    plan = plan_inputs([str(tmp_path), str(tmp_path / "logs" / "foo" / "sleep-1.log")])
    assert plan.logs == [tmp_path / "logs" / "foo" / "sleep-1.log"]  # named twice, read once
    assert plan.inventories == [tmp_path / "inv" / "bookinfo.txt"]
    assert plan.flow_files == [tmp_path / "old.data"]
    assert plan.skipped == [  # walk order: sorted names, files before subdirectories
        (str(tmp_path / "README"), "not an access log, capture, inventory or flows file"),
        (str(tmp_path / "core"), "binary content"),
    ]
    stats = ObserveStats()
    list(iter_flows(plan, ObserveOptions(), stats))
    assert [p for p, _ in stats.skipped_files] == [p for p, _ in plan.skipped]
    with pytest.raises(InputError) as err:
        plan_inputs([str(tmp_path / "core")])
    assert err.value.origin == str(tmp_path / "core")
    with pytest.raises(InputError, match="no such file"):
        plan_inputs([str(tmp_path / "missing")])


def test_parquet_round_trip_through_pipeline(tmp_path: Path) -> None:
    write(tmp_path / "dump" / "foo" / "sleep-1.log", [CLIENT, *LEGACY])
    table, stats = run([str(tmp_path / "dump")])
    out = tmp_path / "flows.parquet"
    write_flows(table.to_batches(), out)
    again, stats2 = run([str(out)])
    assert again.equals(table)
    assert stats2.by_source == stats.by_source == {"istio-text": 3}
    assert stats2.files == 1 and stats2.lines == 0


def test_truncated_gzip_keeps_what_was_read(tmp_path: Path) -> None:
    lines = [CLIENT] * 2000 + [SERVER] * 2000
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "foo" / "sleep-1.log.gz"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) * 3 // 4])
    _, stats = run([str(path)])
    assert 0 < stats.records < len(lines)
    assert len(stats.skipped_files) == 1 and stats.skipped_files[0][0] == str(path)
    assert "gzip truncated after line" in stats.skipped_files[0][1]
    # every line before the cut became a record; the line cut in half is malformed
    assert stats.records + stats.malformed == stats.lines and stats.malformed <= 1


def test_batches_stream_and_progress_and_determinism(tmp_path: Path) -> None:
    write(tmp_path / "bookinfo" / "waypoint-5f4.log", WAYPOINT * 50)
    write(tmp_path / "foo" / "sleep-1.log", [CLIENT, SERVER] * 5, gz=True)
    seen: list[tuple[int, int]] = []
    obs = observe_inputs(
        [str(tmp_path)], ObserveOptions(batch_lines=100, progress=lambda d, t: seen.append((d, t)))
    )
    batches = list(obs.batches)
    assert max(b.num_rows for b in batches) <= 100
    assert sum(b.num_rows for b in batches) == obs.stats.records
    total = sum(p.stat().st_size for p in tmp_path.rglob("*.log"))
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # The same dump read twice gives the same records in the same order.
    again = list(observe_inputs([str(tmp_path)], ObserveOptions(batch_lines=100)).batches)
    assert pa.Table.from_batches(again).equals(pa.Table.from_batches(batches))


def test_worker_threads_give_the_same_batches_and_stats(tmp_path: Path) -> None:
    # Many small chunks (batch_lines=7) so that several are parsed concurrently; malformed
    # and non-access lines scattered through them; a gateway line (two records) too.
    egress = (ENVOY / "istio-docs-egress-gateway-2019.log").read_text().splitlines()
    lines: list[str] = []
    for i in range(60):
        lines += [CLIENT, SERVER, *WAYPOINT, *LEGACY, *egress, STARTUP[i % 3]]
        if i % 7 == 3:
            lines.append(CLIENT[: 40 + i])  # cut short: malformed
    log = write(tmp_path / "foo" / "sleep-1.log", lines)
    outs = []
    for workers in (1, 2):
        obs = observe_inputs([str(log)], ObserveOptions(batch_lines=7, workers=workers))
        outs.append((list(obs.batches), obs.stats))
    (serial, s1), (threaded, s2) = outs
    assert s1.malformed > 0 and s1.ignored_lines == 60 and s1.records > len(lines) - 70
    assert s1.to_dict() == s2.to_dict()
    assert len(serial) == len(threaded)
    assert all(a.equals(b) for a, b in zip(serial, threaded, strict=True))


def test_plain_text_read_buffer_path_equals_string_path(tmp_path: Path) -> None:
    bad = '[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" cut'
    lines: list[str] = []
    for i in range(7):  # distinct requests: the string path below dedupes equal lines
        lines += [bad.replace("418", f"41{i}"), CLIENT.replace(".", f".{i}", 1), "", STARTUP[2],
                  SERVER.replace(".", f".{i}", 1)]
    lines += [LEGACY[0], SERVER, bad]
    text = "\r\n".join(lines[:20]) + "\n" + "\n".join(lines[20:])  # CRLF, LF, no final LF
    path = tmp_path / "foo" / "sleep-1.log"
    path.parent.mkdir()
    path.write_bytes(text.encode())
    # A second log file turns on dedupe, which takes the StringArray path for every chunk.
    other = write(tmp_path / "bar" / "other.log", [STARTUP[0]])
    for batch_lines in (3, 4, 65536):  # malformed lines at chunk edges
        fast, fast_stats = run([str(path)], batch_lines=batch_lines)
        slow, slow_stats = run([str(path), str(other)], batch_lines=batch_lines)
        assert fast.equals(slow)
        assert fast_stats.records == fast.num_rows == 16
        assert fast_stats.duplicates == slow_stats.duplicates == 0
        assert fast_stats.malformed == slow_stats.malformed == 8
        assert fast_stats.malformed_samples == slow_stats.malformed_samples
        assert [s.split(": ")[0] for s in fast_stats.malformed_samples[:3]] == [
            f"{path}:1", f"{path}:6", f"{path}:11"
        ]
        assert fast_stats.malformed_samples[-1].startswith(f"{path}:38: ")
        assert fast_stats.ignored_lines == 14 and slow_stats.ignored_lines == 15
        assert fast_stats.lines == len(lines) == 38
