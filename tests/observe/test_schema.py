"""The flow schema is documented field by field, and the README shows the current schema."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from observe.schema import FIELDS, FLOW_SCHEMA, conform, schema_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_field_documented_in_one_line() -> None:
    for f in FIELDS:
        assert f.doc and "\n" not in f.doc, f.name
        assert FLOW_SCHEMA.field(f.name).metadata[b"doc"] == f.doc.encode()


def test_readme_shows_current_schema() -> None:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- flow-schema:start -->\n", 1)[1].split("<!-- flow-schema:end -->", 1)[0]
    assert block == schema_markdown()


def test_conform_fills_missing_columns_and_casts() -> None:
    table = pa.table({"dst_port": pa.array([80, None], pa.int64()), "method": ["GET", None]})
    batch = conform(table)
    assert batch.schema == FLOW_SCHEMA
    assert batch.column("dst_port").type == pa.int32()
    assert batch.column("src_ip").null_count == 2
