"""Parquet flows files: round trip, atomic writes, schema validation on read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from observe.errors import InputError
from observe.flows_io import FlowWriter, looks_like_parquet, read_flows, write_flows
from observe.schema import FLOW_SCHEMA, conform


def batch(n: int, offset: int = 0) -> pa.RecordBatch:
    rows = [
        {
            "time": datetime(2020, 11, 25, 21, 26, 18, 409000, tzinfo=UTC),
            "duration_ms": 4 + i,
            "src_ip": "10.44.1.23",
            "dst_ip": "10.44.1.27",
            "dst_port": 80,
            "method": "GET",
            "path": f"/status/{418 + i + offset}",
            "status": 418,
            "reporter": "foo/sleep-1" if i % 2 else None,
            "denied": False,
            "source": "istio-text",
            "origin": f"dump/foo/sleep-1.log:{i + offset + 1}",
        }
        for i in range(n)
    ]
    return conform(pa.Table.from_pylist(rows))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    batches = [batch(3), batch(2, offset=3)]
    assert write_flows(batches, path) == 5
    got = list(read_flows(path))
    assert all(b.schema.equals(FLOW_SCHEMA, check_metadata=True) for b in got)
    assert pa.Table.from_batches(got).equals(pa.Table.from_batches(batches))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 2
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_read_columns_and_small_batches(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    write_flows([batch(5)], path)
    got = list(read_flows(path, columns=["path", "origin"], batch_size=2))
    assert [b.num_rows for b in got] == [2, 2, 1]
    assert got[0].schema.names == ["path", "origin"]
    assert got[2].column("origin").to_pylist() == ["dump/foo/sleep-1.log:5"]
    with pytest.raises(InputError, match="unknown flow columns: nope"):
        list(read_flows(path, columns=["nope"]))


def test_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    with pytest.raises(RuntimeError), FlowWriter(path) as writer:
        writer.write(batch(2))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary remains
    with FlowWriter(path) as writer:
        writer.write(batch(1))
        writer.write(batch(0))  # empty batches are skipped
        assert not path.exists()  # only appears on clean exit
    assert writer.rows == 1 and path.exists()


def test_writer_conforms_partial_batches(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    partial = pa.RecordBatch.from_pylist([{"src_ip": "10.0.0.1", "source": "x"}])
    write_flows([partial], path)
    (got,) = read_flows(path)
    assert got.column("src_ip").to_pylist() == ["10.0.0.1"]
    assert got.column("dst_ip").to_pylist() == [None]


def test_read_rejects_non_flows(tmp_path: Path) -> None:
    text = tmp_path / "x.parquet"
    text.write_text("not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file") as err:
        list(read_flows(text))
    assert err.value.origin == str(text)

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    with pytest.raises(InputError, match="not a meshwright flows file"):
        list(read_flows(foreign))

    old = tmp_path / "old.parquet"
    table = pa.Table.from_batches([batch(1)])
    pq.write_table(table.replace_schema_metadata({"meshwright.schema_version": "0"}), old)
    with pytest.raises(InputError, match="schema version 0"):
        list(read_flows(old))

    lacking = tmp_path / "lacking.parquet"
    pq.write_table(table.drop_columns(["origin"]), lacking)
    with pytest.raises(InputError, match="lacks column 'origin'"):
        list(read_flows(lacking))

    with pytest.raises(InputError, match="no such file"):
        list(read_flows(tmp_path / "missing.parquet"))


def test_looks_like_parquet(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_flows([batch(1)], path)
    assert looks_like_parquet(path.read_bytes()[:8])
    assert not looks_like_parquet(b"PAR")
    assert not looks_like_parquet(b"[2020-11-25T21:26:18.409Z]")


def test_threaded_writer_writes_the_same_file(tmp_path: Path) -> None:
    batches = [batch(5, offset=5 * k) for k in range(6)]
    paths = []
    for threaded in (True, False):
        path = tmp_path / f"flows-{threaded}.parquet"
        with FlowWriter(path, threaded=threaded) as writer:
            for b in batches:
                writer.write(b)
        assert writer.rows == 30
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # same bytes, row groups in order
    meta = pq.ParquetFile(paths[0]).metadata
    assert meta.num_row_groups == 6
    # dictionary encoding only where values repeat; statistics only on non-string columns
    cols = {meta.schema.column(i).name: meta.row_group(0).column(i) for i in range(3)}
    assert cols["time"].statistics is not None and cols["src_ip"].statistics is None


def test_threaded_writer_error_surfaces_as_input_error(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    bad = pa.RecordBatch.from_pylist([{"x": 1}])  # conform() keeps no column of it: fine
    with FlowWriter(path) as writer:
        writer.write(bad)
    assert pq.read_table(path).num_rows == 1
    with pytest.raises(InputError, match="cannot write flows"), FlowWriter(path) as writer:
        writer.write(batch(1))
        writer._error = OSError("disk full")  # what the writer thread records on failure
        writer.write(batch(1))
    assert list(tmp_path.iterdir()) == [path]  # the old file stays, no temporary left


def test_times_and_durations_are_delta_packed_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "flows.parquet"
    batches = [batch(50), batch(7, offset=50)]
    write_flows(batches, path)
    rg = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["time"]
    assert "DELTA_BINARY_PACKED" in encodings["duration_ms"]
    assert "DELTA_BINARY_PACKED" not in encodings["status"]
    assert pa.Table.from_batches(list(read_flows(path))).equals(pa.Table.from_batches(batches))


def test_version_1_files_read_with_the_fields_added_since_as_null(tmp_path: Path) -> None:
    from observe.schema import ADDED_IN

    added = ADDED_IN["2"]
    v1 = pa.Table.from_batches([batch(3)]).drop_columns(list(added))
    path = tmp_path / "v1.parquet"
    pq.write_table(v1.replace_schema_metadata({"meshwright.schema_version": "1"}), path)
    rows = pa.Table.from_batches(list(read_flows(path)))
    assert rows.schema == FLOW_SCHEMA
    assert rows.column("path").to_pylist() == ["/status/418", "/status/419", "/status/420"]
    for name in added:
        assert rows.column(name).null_count == 3
    picked = pa.Table.from_batches(list(read_flows(path, columns=["kind", "path"])))
    assert picked.column_names == ["kind", "path"]
    assert picked.column("kind").null_count == 3
    # A version 1 file must still hold every version 1 column.
    lacking = tmp_path / "v1-lacking.parquet"
    pq.write_table(v1.drop_columns(["origin"]).replace_schema_metadata(
        {"meshwright.schema_version": "1"}), lacking)
    with pytest.raises(InputError, match="lacks column 'origin'"):
        list(read_flows(lacking))
    # A version 2 file must hold the version 2 columns.
    v2_lacking = tmp_path / "v2-lacking.parquet"
    pq.write_table(v1, v2_lacking)
    with pytest.raises(InputError, match="lacks column 'kind'"):
        list(read_flows(v2_lacking))
