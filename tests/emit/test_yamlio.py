"""emit/yamlio.py: deterministic, block-style, safely quoted YAML."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import yaml

from emit.yamlio import dump_yaml, rfc3339
from observe.errors import MeshwrightError


def test_quoting_sorting_and_block_style() -> None:
    shared = {"x": 1}
    obj = {"b": ["9080", "true", "null", "GET", "1.5"], "a": {"z": shared, "y": shared},
           "spec": {}, "note": "line1\nline2", "u": "héllo"}
    text = dump_yaml(obj)
    assert text == (
        "a:\n  y:\n    x: 1\n  z:\n    x: 1\n"
        "b:\n- '9080'\n- 'true'\n- 'null'\n- GET\n- '1.5'\n"
        "note: |-\n  line1\n  line2\n"
        "spec: {}\n"
        "u: héllo\n"
    )
    assert "&" not in text and "*" not in text  # no anchors/aliases
    assert yaml.safe_load(text) == obj


def test_list_is_multi_document_and_round_trips() -> None:
    docs = [{"kind": "A", "n": 1}, {"kind": "B", "n": 2}]
    text = dump_yaml(docs)
    assert text.startswith("---\n") and text.count("---\n") == 2 and text.endswith("\n")
    assert list(yaml.safe_load_all(text)) == docs
    assert dump_yaml([{"k": 1}]) == "k: 1\n"
    assert dump_yaml([]) == ""


def test_same_object_same_bytes_regardless_of_insertion_order() -> None:
    a = {"x": 1, "y": {"b": 2, "a": 1}}
    b = {"y": {"a": 1, "b": 2}, "x": 1}
    assert dump_yaml(a) == dump_yaml(b)


def test_long_strings_are_not_folded() -> None:
    long = "cluster.local/ns/" + "x" * 300
    assert dump_yaml({"p": long}) == f"p: {long}\n"


def test_unsortable_keys_raise_meshwright_error() -> None:
    with pytest.raises(MeshwrightError):
        dump_yaml({1: "a", "b": 2})
    with pytest.raises(MeshwrightError):
        dump_yaml({"portLevelMtls": {9080: {"mode": "PERMISSIVE"}}})


def test_rfc3339() -> None:
    assert rfc3339(datetime(2024, 5, 1, 12, 0, 3, 999999, tzinfo=UTC)) == "2024-05-01T12:00:03Z"
    cest = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2024, 5, 1, 14, 0, 0, tzinfo=cest)) == "2024-05-01T12:00:00Z"
    assert rfc3339(datetime(2024, 5, 1, 12, 0, 0)) == "2024-05-01T12:00:00Z"
    assert rfc3339(None) is None
