"""The baseline: which records count, per-edge and per-source statistics, loading, windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from learn.baseline import (
    learn_baseline,
    load_baseline_flows,
    operation_family,
    parse_span,
    prepare,
    split_by_window,
)
from observe.errors import InputError
from observe.flows_io import write_flows
from observe.schema import conform

T0 = datetime(2024, 6, 3, 8, 0, tzinfo=UTC)


def rec(minute: float, src: str, dst: str, port: int = 8080, **kw: Any) -> dict[str, Any]:
    """One resolved flow record ``minute`` minutes after T0 (server-reported by default)."""
    row = {"time": T0 + timedelta(minutes=minute), "src_workload": src, "dst_workload": dst,
           "dst_port": port, "protocol": "http", "method": "GET", "path": "/x", "status": 200,
           "response_flags": "-", "bytes_in": 100, "bytes_out": 1000, "mtls": "mtls",
           "direction": "inbound", "reporter": f"{dst}-pod", "dst_pod": f"{dst}-pod",
           "origin": f"{dst}.log:{int(minute * 10) + 1}"}
    row.update(kw)
    return row


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_batches([conform(pa.Table.from_pylist(rows))])


def test_client_copies_of_server_logged_requests_count_once_but_failed_probes_stay() -> None:
    rows = [
        rec(0, "shop/web", "shop/api"),
        # the client's copy of the same request: its server (shop/api-pod) logs inbound too
        rec(0, "shop/web", "shop/api", direction="outbound", reporter="shop/web-pod"),
        # a probe that failed never reached the server: no server copy exists
        rec(1, "shop/web", "shop/api", port=22, direction="outbound", reporter="shop/web-pod",
            response_flags="UF,URX", protocol="tcp", path=None, method=None, status=0),
    ]
    frame = prepare(table(rows))
    assert len(frame) == 2
    probe = frame[frame["port"] == 22].iloc[0]
    assert probe["failed"] and probe["error"]
    assert not frame[frame["port"] == 8080].iloc[0]["failed"]


def test_edge_and_source_statistics() -> None:
    rows = [rec(m, "shop/web", "shop/api", bytes_in=1_000) for m in range(0, 60, 5)]  # 12
    rows += [rec(3, "shop/web", "shop/db", port=5432, protocol="tcp", path=None, method=None,
                 mtls="plaintext", bytes_in=7_000)]
    rows += [rec(40, "shop/web", "shop/api", path="/v2/items/17", method="POST")]
    base = learn_baseline(prepare(table(rows)), window=timedelta(minutes=30),
                          scan_window=timedelta(minutes=10))
    api = base.edges[("shop/web", "shop/api", 8080)]
    assert (api.requests, api.mtls, api.plaintext) == (13, 13, 0)
    assert api.ops == frozenset({"GET /x", "POST /v2/items"})
    assert api.hours == frozenset({8})
    db = base.edges[("shop/web", "shop/db", 5432)]
    assert (db.requests, db.mtls, db.plaintext, db.up_bytes) == (1, 0, 1, 7_000)
    # 08:00-08:30 holds minutes 0..25 (6 records) of 1,000 bytes up; 08:30-09:00 holds 6 + 1
    assert base.peak_up[("shop/web", "shop/api")] == 6 * 1_000 + 100
    assert base.source_peak_up["shop/web"] == 7_000
    # the 08:00-08:10 scan window: api:8080 and db:5432
    assert base.source_peak_targets["shop/web"] == 2
    assert base.destinations == frozenset({"shop/api", "shop/db"})


def test_operation_family_is_method_and_two_path_segments() -> None:
    assert operation_family("GET", "/api/v2/cart/items/42?x=1", "http") == "GET /api/v2"
    # an id segment becomes the wildcard of its family: two segments are "products", "*"
    assert operation_family("GET", "/products/17", "http") == "GET /products/*"
    assert operation_family(None, None, "tcp") == "-"


def test_split_by_window_and_spans() -> None:
    frame = prepare(table([rec(m, "a/x", "a/y") for m in (0, 30, 59, 60, 61, 300)]))
    early, late = split_by_window(frame, timedelta(hours=1))
    assert len(early) == 3 and len(late) == 3
    assert parse_span("24h") == timedelta(hours=24)
    assert parse_span("90m") == timedelta(minutes=90)
    assert parse_span("2d") == timedelta(days=2)
    for bad in ("24", "h", "-1h", "xh", "1w"):
        with pytest.raises(InputError):
            parse_span(bad)


def test_load_from_an_output_directory_or_a_flows_file(tmp_path: Path) -> None:
    t = table([rec(0, "shop/web", "shop/api"), rec(1, "shop/web", "shop/api")])
    out = tmp_path / "out"
    out.mkdir()
    write_flows(t.to_batches(), out / "flows.parquet")
    assert load_baseline_flows(out).num_rows == 2
    assert load_baseline_flows(out / "flows.parquet").num_rows == 2
    with pytest.raises(InputError, match=r"no flows\.parquet"):
        load_baseline_flows(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_baseline_flows(tmp_path / "missing.parquet")


def test_unresolved_flows_need_an_inventory(tmp_path: Path) -> None:
    raw = table([rec(0, "shop/web", "shop/api", src_workload=None, dst_workload=None)])
    write_flows(raw.to_batches(), tmp_path / "raw.parquet")
    with pytest.raises(InputError, match="no resolved identities"):
        load_baseline_flows(tmp_path / "raw.parquet")
