"""Tests for observe/envoy_json.py: the fast JSON path gives exactly the per-line result.

The oracle is the per-line ``parse_json`` that observe/envoy_format.py had before the fast
path (copied below unchanged, so a later change to the module can't move the oracle with it).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from benchmarks.gen_dump import generate
from observe import envoy_json
from observe.envoy_format import (
    ISO_TIME_PATTERN,
    ISTIO_FIELDS,
    ParsedLines,
    _post_process,
    looks_like_istio_json,
    parse_json,
    parse_text,
)
from observe.envoy_json import JsonStats, parse_json_lines

LOGS = Path(__file__).parents[1] / "data" / "envoy-logs"
TEXT_LOGS = (
    "istio-docs-access-log-sleep-httpbin.log",
    "istio-docs-egress-gateway-2019.log",
    "istio-docs-egress-control-2019-legacy-format.log",
    "envoy-docs-default-format-example.log",
)


# ---------------------------------------------------------------- oracle (pre-fast-path code)


def _old_json_value(v: object) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return None if v == "-" else v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return orjson.dumps(v).decode()


def _real_start_time(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or not re.match(ISO_TIME_PATTERN, value):
        return False
    try:
        pa.array([value]).cast(pa.timestamp("us", tz="UTC"))
    except pa.ArrowInvalid:
        return False
    return True


def old_parse_json(lines: pa.Array) -> ParsedLines:
    if not isinstance(lines, pa.Array):
        lines = pa.array(lines, pa.string())
    pylines: list[str | None] = lines.to_pylist()
    n = len(pylines)
    good = np.zeros(n, dtype=bool)
    errors: list[tuple[int, str]] = []
    records: list[dict[str, object]] = []
    extra: list[str] = []
    for i, line in enumerate(pylines):
        if line is None or not line.strip():
            errors.append((i, "empty line"))
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            errors.append((i, "not valid JSON (truncated line?)"))
            continue
        if not looks_like_istio_json(obj):
            errors.append((i, "JSON object is not an Istio access-log record"))
            continue
        for k in obj:  # columns come from every Istio-shaped record
            if k not in ISTIO_FIELDS and k not in extra:
                extra.append(k)
        if not _real_start_time(obj.get("start_time")):
            # Added after the fast path: such rows used to crash the time conversion later.
            errors.append((i, "start_time is not a valid RFC3339 time"))
            continue
        good[i] = True
        records.append(obj)
    columns = list(ISTIO_FIELDS) + sorted(extra)
    table = pa.table(
        {c: pa.array([_old_json_value(r.get(c)) for r in records], pa.string()) for c in columns}
    )
    variants = pa.array(["istio-json"] * len(records), pa.string())
    return ParsedLines(fields=_post_process(table), good=good, errors=errors, variants=variants)


def assert_same(lines: list[str | None] | pa.Array) -> ParsedLines:
    arr = lines if isinstance(lines, pa.Array) else pa.array(lines, pa.string())
    new, old = parse_json(arr), old_parse_json(arr)
    assert new.fields.schema == old.fields.schema
    assert new.fields.column_names == old.fields.column_names
    for name in old.fields.column_names:
        assert new.fields.column(name).to_pylist() == old.fields.column(name).to_pylist(), name
    assert new.good.dtype == np.bool_ and new.good.tolist() == old.good.tolist()
    assert new.errors == old.errors
    assert new.variants is not None and old.variants is not None
    assert new.variants.to_pylist() == old.variants.to_pylist()
    return new


# ---------------------------------------------------------------- inputs


def as_envoy_json(fields: dict[str, str | None], *, sort: bool = True) -> str:
    """A JSON line as Envoy writes Istio's JSON encoding: numbers unquoted, empty = null."""
    numeric = {"response_code", "bytes_received", "bytes_sent", "duration"}
    obj = {k: (int(v) if k in numeric and v is not None else v) for k, v in fields.items()}
    if sort:
        obj = dict(sorted(obj.items()))
    return orjson.dumps(obj).decode()


def real_records() -> list[dict[str, str | None]]:
    """Field values of the real Istio/Envoy TEXT lines in tests/data, as parse_text gives."""
    lines: list[str] = []
    for name in TEXT_LOGS:
        lines += (LOGS / name).read_text(encoding="utf-8").splitlines()
    parsed = parse_text(pa.array(lines))
    assert parsed.good.all()
    table = parsed.fields.select(list(ISTIO_FIELDS))
    return table.to_pylist()


def generated(n: int, malformed: float, seed: int = 7) -> list[str]:
    return [line.rstrip("\n") for line in generate(n, "json", malformed, "plain", seed)]


# ---------------------------------------------------------------- tests


def test_real_lines_sorted_and_unsorted_keys() -> None:
    recs = real_records()
    assert len(recs) >= 7
    lines = [as_envoy_json(r) for r in recs]
    rng = random.Random(3)
    for r in recs:  # keys in any order, as some Envoy versions write them
        items = list(r.items())
        rng.shuffle(items)
        lines.append(as_envoy_json(dict(items), sort=False))
    parsed = assert_same(lines)
    assert parsed.good.all()
    assert parsed.fields.num_rows == 2 * len(recs)
    first = parsed.fields.slice(0, len(recs)).to_pylist()
    # The JSON encoding of a line parses to the same fields as its TEXT form.
    assert [{k: row[k] for k in ISTIO_FIELDS} for row in first] == recs


def test_generated_dump_with_malformed_lines() -> None:
    lines = generated(6000, 0.01)
    parsed = assert_same(lines)
    bad = int((~parsed.good).sum())
    assert bad == 60  # the generator corrupts exactly floor(n * share) lines
    assert len(parsed.errors) == bad
    assert {reason for _, reason in parsed.errors} <= {
        envoy_json.NOT_JSON, envoy_json.EMPTY, envoy_json.NOT_ISTIO
    }


def test_generated_dump_without_malformed_lines_uses_one_fast_read() -> None:
    lines = generated(3000, 0.0)
    parsed = assert_same(lines)
    assert parsed.good.all() and not parsed.errors
    stats = JsonStats()
    parse_json_lines(lines, stats)
    assert stats == JsonStats(fast_rows=3000, per_line=0, reads=1, failed_reads=0)


def test_malformed_lines_go_per_line_and_the_rest_fast() -> None:
    lines = generated(3000, 0.01, seed=23)
    stats = JsonStats()
    parsed = parse_json_lines(lines, stats)
    bad = int((~parsed.good).sum())
    assert bad == 30
    # Cut and garbage lines are not braced: they never reach Arrow's reader.
    assert stats.fast_rows == 3000 - bad and stats.per_line == bad
    assert stats.failed_reads == 0


def test_type_of_a_null_first_value_is_learned_not_bisected() -> None:
    lines = []
    for k, line in enumerate(generated(500, 0.0, seed=29)):
        obj = orjson.loads(line)
        # Typed JSON formats print this header time as a number; the first line has none.
        obj["upstream_service_time"] = None if k == 0 else k
        lines.append(orjson.dumps(obj).decode())
    assert_same(lines)
    stats = JsonStats()
    parsed = parse_json_lines(lines, stats)
    assert stats == JsonStats(fast_rows=500, per_line=0, reads=2, failed_reads=1)
    assert parsed.fields.column("upstream_service_time").to_pylist()[:3] == [None, "1", "2"]


def test_one_key_with_two_types_is_bisected_exactly() -> None:
    lines = generated(500, 0.0, seed=37)
    obj = orjson.loads(lines[200])
    obj["response_code"] = str(obj["response_code"])
    lines[200] = orjson.dumps(obj).decode()
    assert_same(lines)
    stats = JsonStats()
    parse_json_lines(lines, stats)
    assert stats.per_line <= 2 * envoy_json.MIN_BISECT  # the last split's two halves
    assert stats.fast_rows + stats.per_line == 500


def test_a_float_in_one_row_costs_a_few_lines_not_the_block() -> None:
    lines = generated(1000, 0.0, seed=41)
    obj = orjson.loads(lines[700])
    obj["sample_rate"] = 0.25  # the reference prints str(float): that row goes per line
    lines[700] = orjson.dumps(obj).decode()
    parsed = assert_same(lines)
    assert parsed.fields.column("sample_rate").to_pylist()[700] == "0.25"
    stats = JsonStats()
    parse_json_lines(lines, stats)
    assert stats.per_line <= 2 * envoy_json.MIN_BISECT and stats.fast_rows >= 1000 - 32


def test_extra_keys_stay_on_the_fast_path() -> None:
    lines = []
    for k, line in enumerate(generated(400, 0.0, seed=31)):
        obj = orjson.loads(line)
        obj["upstream_peer_time"] = "2024-05-14T00:00:00Z"  # Arrow would infer a timestamp
        obj["connection_id"] = k
        if k % 2:
            obj["downstream_tls"] = k % 3 == 0
        lines.append(orjson.dumps(obj).decode())
    parsed = assert_same(lines)
    stats = JsonStats()
    parse_json_lines(lines, stats)
    assert stats.fast_rows == 400 and stats.per_line == 0
    assert parsed.fields.column("upstream_peer_time")[0].as_py() == "2024-05-14T00:00:00Z"
    assert parsed.fields.column("downstream_tls").to_pylist()[:4] == [None, "false", None, "true"]


EDGE_LINES: list[str | None] = [
    None,
    "",
    "   ",
    "null",
    "[1, 2]",
    '"start_time"',
    "{}",
    '{"start_time":"2024-05-14T00:00:00.000Z","method":"GET","path":"/a"}',  # 3 keys + start
    '{"start_time":null,"method":null,"path":null}',  # present but null: still a record
    '{"method":"GET","path":"/a","protocol":null,"authority":null,"route_name":null}',  # 5
    '{"method":"GET","path":"/a","protocol":"H","authority":"a","route_name":"r"}',  # 5 set
    '{"start_time":"2024-05-14T00:00:00.000Z","method":"GET"}',  # start + 1: too few
    '{"start_time":"2024-05-14T00:00:00.000Z","method":"GET","x":null}',  # not Istio keys
    '{"method":"GET","path":"/a","protocol":null,"authority":null,"route_name":null,'
    '"duration":null}',  # 6 keys present, 2 non-null: a record
    '{"response_code":200,"method":"GET","path":"/x","protocol":"HTTP/1.1",'
    '"bytes_sent":1,"duration":2}',
    '{"response_code":"200","method":"GET","path":"/x","protocol":"HTTP/1.1",'
    '"bytes_sent":"1","duration":"2"}',  # numbers as strings
    '{"response_code":200.0,"method":"GET","path":"/x","protocol":"HTTP/1.1",'
    '"bytes_sent":1e3,"duration":-0}',  # floats and -0
    '{"response_code":18446744073709551615,"method":"GET","path":"/x","protocol":"H",'
    '"bytes_sent":99999999999999999999999,"duration":-9223372036854775809}',
    '{"response_code":NaN,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":Infinity}',
    '{"response_code":true,"method":false,"path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2}',
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2,"extra_obj":{"a":[1,2]},"extra_list":[1,"x"]}',
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2,"upstream_peer":"spiffe://a","zz_num":5,"aa_flag":true,"mm_null":null,'
    '"ts":"2024-05-14T00:00:00Z"}',
    '{"response_code":200,"method":"GET","method":"POST","path":"/x","protocol":"H",'
    '"bytes_sent":1,"duration":2}',  # repeated key: the last one wins
    '{"response_code":200,"me\\u0074hod":"GET","method":"PUT","path":"/x","protocol":"H",'
    '"bytes_sent":1,"duration":2}',
    '{ "response_code" : 200 , "method":"GET","path":"/\\"q\\"\\u00e9\\ud83d\\ude00",'
    '"protocol":"H","bytes_sent":1,"duration":2 }',
    '{"response_code":200,"method":"GET","path":"\\ud800","protocol":"H","bytes_sent":1,'
    '"duration":2}',  # lone surrogate: invalid
    '{"response_code":200,"method":"GET","path":"a\tb","protocol":"H","bytes_sent":1,'
    '"duration":2}',  # raw tab in a string: invalid
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2,}',  # trailing comma
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2}{"response_code":201,"method":"GET","path":"/y","protocol":"H",'
    '"bytes_sent":1,"duration":2}',  # two objects on one line
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2}\r{"response_code":201,"method":"GET","path":"/y","protocol":"H",'
    '"bytes_sent":1,"duration":2}',
    ' {"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2} ',  # surrounding blanks: valid JSON
    '{"response_code":200,"method":"-","path":"-","protocol":"-","bytes_sent":0,'
    '"duration":0,"upstream_cluster":"outbound|9080||reviews.default.svc.cluster.local;"}',
    '{"response_code":01,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2}',
    '{"response_code":200,"method":"GET","path":"/x","protocol":"H","bytes_sent":1,'
    '"duration":2} // comment',
]


def test_edge_cases_alone_and_inside_large_blocks() -> None:
    parsed = assert_same(EDGE_LINES)
    assert parsed.good.sum() >= 10
    errs = dict(parsed.errors)
    assert errs[0] == errs[1] == errs[2] == envoy_json.EMPTY
    assert errs[3] == errs[4] == errs[6] == envoy_json.NOT_ISTIO
    assert "upstream_peer" in parsed.fields.column_names
    assert "extra_obj" in parsed.fields.column_names
    # Mixed into a block big enough for the fast path, each edge line in turn.
    base = generated(300, 0.0, seed=11)
    for k, edge in enumerate(EDGE_LINES):
        lines: list[str | None] = list(base)
        lines.insert(37 + 5 * k, edge)
        assert_same(lines)


def test_values_across_types_per_key() -> None:
    base = orjson.loads(generated(1, 0.0, seed=5)[0])
    lines = []
    for v in ("x", "-", None, 0, -7, 2**40, True, False, 1.5, {"a": 1}, [1]):
        for key in ("response_code", "path", "user_agent", "custom_key"):
            obj = dict(base)
            obj[key] = v
            lines.append(orjson.dumps(obj).decode())
    lines += generated(200, 0.0, seed=9)
    parsed = assert_same(lines)
    assert parsed.good.all()


def test_fuzzed_lines_match_the_reference() -> None:
    """Random byte-level damage to real-shaped lines: same verdict and values per line."""
    rng = random.Random(20240514)
    base = generated(400, 0.0, seed=13)
    alphabet = '{}[]":,\\ -0123456789eE.tnulfa\t\r'
    lines = []
    for line in base * 5:
        chars = list(line)
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            pos = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                del chars[pos]
            elif op < 0.8:
                chars.insert(pos, rng.choice(alphabet))
            else:
                chars[pos] = rng.choice(alphabet)
        lines.append("".join(chars))
    parsed = assert_same(lines)
    assert 0 < int(parsed.good.sum()) < len(lines)


@pytest.mark.parametrize("size", [0, 1, envoy_json.MIN_BISECT, envoy_json.MIN_BISECT + 1])
def test_small_and_empty_inputs(size: int) -> None:
    parsed = assert_same(generated(size, 0.0, seed=17) if size else [])
    assert parsed.fields.num_rows == size
    assert parsed.fields.column_names == list(ISTIO_FIELDS)


def test_sliced_and_large_string_and_list_inputs() -> None:
    lines = generated(500, 0.02, seed=19)
    arr = pa.array(["junk"] * 10 + lines + [None] * 3, pa.string())
    sliced = arr.slice(10, len(lines))
    assert_same(sliced)
    large = parse_json_lines(pa.array(lines, pa.large_string()))
    assert large.good.tolist() == old_parse_json(pa.array(lines)).good.tolist()
    assert parse_json_lines(lines).fields.equals(parse_json(pa.array(lines)).fields)


def test_json_value_matches_reference_formatting() -> None:
    values: list[object] = [None, "-", "", "a", True, False, 0, -1, 10**30, 1.0, 1e20, 0.1]
    for v in [*values, {"b": [1]}, []]:
        assert envoy_json.json_value(v) == _old_json_value(v)
