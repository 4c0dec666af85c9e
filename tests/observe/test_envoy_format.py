"""Tests for observe/envoy_format.py on the real Istio/Envoy lines and formats in tests/data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from observe.envoy_format import (
    CHUNK,
    ISTIO_FIELDS,
    ISTIO_TEXT_FORMAT,
    ParsedLines,
    RawLines,
    compile_format,
    compile_json_format,
    format_from_docs,
    looks_like_envoy_text,
    looks_like_istio_json,
    parse_json,
    parse_text,
)
from observe.errors import FormatError

LOGS = Path(__file__).parents[1] / "data" / "envoy-logs"
KUBECTL_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")


def read_lines(name: str) -> list[str]:
    lines = (LOGS / name).read_text(encoding="utf-8").splitlines()
    # kiali-waypoint.log was dumped with `kubectl logs --timestamps`; the input layer strips it.
    return [KUBECTL_TS.sub("", line) for line in lines]


SLEEP = read_lines("istio-docs-access-log-sleep-httpbin.log")
OUT_LINE, IN_LINE = SLEEP
LEGACY_LINE = read_lines("istio-docs-egress-control-2019-legacy-format.log")[0]


def rows(parsed_fields: pa.Table) -> list[dict[str, str | None]]:
    return parsed_fields.to_pylist()


# ------------------------------------------------------------------ format strings


def test_istio_default_text_format_file_compiles_to_the_canonical_fields() -> None:
    fmt = compile_format((LOGS / "istio-default-text-format.txt").read_text(encoding="utf-8"))
    assert fmt.fields == ISTIO_FIELDS
    assert fmt.operators["upstream_cluster"] == "%UPSTREAM_CLUSTER_RAW%"
    assert fmt.operators["path"] == "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
    assert fmt.pieces is not None and len(fmt.pieces) == 15  # 7 quoted fields
    # Our built-in constant is the same format.
    assert compile_format(ISTIO_TEXT_FORMAT).tokens == fmt.tokens


def test_docs_format_with_escapes_and_wrapping_compiles() -> None:
    fmt = format_from_docs((LOGS / "istio-docs-default-format-as-shown.txt").read_text())
    assert fmt.fields == ISTIO_FIELDS
    assert fmt.operators["upstream_cluster"] == "%UPSTREAM_CLUSTER%"
    envoy = format_from_docs((LOGS / "envoy-docs-default-format-as-shown.txt").read_text())
    assert envoy.fields[-1] == "upstream_host" and len(envoy.fields) == 15
    parsed = parse_text(pa.array(read_lines("envoy-docs-default-format-example.log")), envoy)
    assert parsed.errors == []
    row = rows(parsed.fields)[0]
    assert row["method"] == "POST" and row["upstream_host"] == "tcp://10.0.2.1:80"
    assert row["user_agent"] == "nsq2http" and row["response_flags"] is None


def test_json_format_keys_are_the_canonical_names_of_their_operators() -> None:
    ops = compile_json_format((LOGS / "istio-default-json-format.json").read_bytes())
    assert len(ops) == 24
    assert {key: op.name for key, op in ops.items()} == {key: key for key in ops}
    assert set(ops) == set(ISTIO_FIELDS)


def test_operator_details() -> None:
    fmt = compile_format('%START_TIME(%s.%3f)% "%REQ(x-request-id):10%" %DYNAMIC_METADATA(a:b)%')
    ops = [t for t in fmt.tokens if not hasattr(t, "text") or hasattr(t, "command")]
    start = fmt.tokens[0]
    assert getattr(start, "arg", None) == "%s.%3f"
    assert fmt.fields == ("start_time_s_3f", "request_id", "dynamic_metadata_a_b")
    rid = next(t for t in ops if getattr(t, "name", "") == "request_id")
    assert getattr(rid, "max_length", None) == 10 and getattr(rid, "quoted", None) is True


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("%FOO_BAR%", "unknown Envoy command operator"),
        ("%REQ% x", "needs an argument"),
        ("[%START_TIME", "invalid command operator"),
        ("%START_TIME% 50% off", "invalid command operator"),
        ('"%START_TIME% %PROTOCOL%', "unbalanced double quote"),
        ("plain text", "no command operators"),
        ("", "empty"),
        ("%START_TIME%\n%PROTOCOL%", "several lines"),
    ],
)
def test_invalid_formats_raise_format_error(fmt: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        compile_format(fmt)


# ------------------------------------------------------------------ real lines


def test_sleep_httpbin_pair_parses_exactly() -> None:
    parsed = parse_text(pa.array(SLEEP))
    assert parsed.errors == [] and parsed.good.tolist() == [True, True]
    assert parsed.variants is not None and parsed.variants.to_pylist() == ["istio", "istio"]
    out, inb = rows(parsed.fields)
    assert out == {
        "start_time": "2020-11-25T21:26:18.409Z", "method": "GET", "path": "/status/418",
        "protocol": "HTTP/1.1", "response_code": "418", "response_flags": None,
        "response_code_details": "via_upstream", "connection_termination_details": None,
        "upstream_transport_failure_reason": None, "bytes_received": "0", "bytes_sent": "135",
        "duration": "4", "upstream_service_time": "4", "x_forwarded_for": None,
        "user_agent": "curl/7.73.0-DEV", "request_id": "84961386-6d84-929d-98bd-c5aee93b5c88",
        "authority": "httpbin:8000", "upstream_host": "10.44.1.27:80",
        "upstream_cluster": "outbound|8000||httpbin.foo.svc.cluster.local",
        "upstream_local_address": "10.44.1.23:37652",
        "downstream_local_address": "10.0.45.184:8000",
        "downstream_remote_address": "10.44.1.23:46520", "requested_server_name": None,
        "route_name": "default",
    }
    assert inb["upstream_cluster"] == "inbound|8000||"
    assert inb["downstream_local_address"] == "10.44.1.27:80"
    assert inb["requested_server_name"] == "outbound_.8000_._.httpbin.foo.svc.cluster.local"
    assert inb["upstream_local_address"] == "127.0.0.1:41854"


@pytest.mark.parametrize(
    ("name", "variants"),
    [
        ("istio-docs-access-log-sleep-httpbin.log", ["istio"] * 2),
        ("istio-docs-egress-control-2019-legacy-format.log", ["istio-1.0"] * 2),
        # The 2019-09 line has the 1.4-1.8 mixer/UTFR fields; the 2019-01 one is the 1.0 format.
        ("istio-docs-egress-gateway-2019.log", ["istio-1.5", "istio-1.0"]),
        ("kiali-waypoint.log", ["istio"] * 16),
        ("envoy-docs-default-format-example.log", ["envoy"]),
    ],
)
def test_every_real_line_is_recognised_without_naming_its_variant(
    name: str, variants: list[str]
) -> None:
    lines = read_lines(name)
    parsed = parse_text(pa.array(lines))
    assert parsed.errors == []
    assert parsed.variants is not None and parsed.variants.to_pylist() == variants
    assert parsed.fields.num_rows == len(lines)
    assert all(looks_like_envoy_text(line) for line in lines)


def test_egress_gateway_1_5_variant_fields() -> None:
    parsed = parse_text(pa.array(read_lines("istio-docs-egress-gateway-2019.log")))
    http, tcp = rows(parsed.fields)
    assert http["method"] == "GET" and http["protocol"] == "HTTP/2"
    assert http["response_code"] == "301" and http["x_forwarded_for"] == "10.244.2.10"
    assert http["upstream_cluster"] == "outbound|80||edition.cnn.com"
    assert http["upstream_local_address"] is None
    assert http["requested_server_name"] == "edition.cnn.com" and http["route_name"] is None
    assert http["dynamic_metadata_istio_mixer_status"] is None
    assert http["response_code_details"] is None  # not in that format
    assert tcp["method"] is None and tcp["path"] is None and tcp["protocol"] is None
    assert tcp["bytes_sent"] == "1879689" and tcp["upstream_local_address"] == "172.30.109.80:41122"


def test_waypoint_lines() -> None:
    parsed = parse_text(pa.array(read_lines("kiali-waypoint.log")))
    first = rows(parsed.fields)[0]
    assert first["upstream_host"] == "envoy://connect_originate/10.244.0.32:9080"
    assert first["upstream_cluster"] == "inbound-vip|9080|http|details.bookinfo.svc.cluster.local"
    assert first["upstream_local_address"] == "envoy://internal_client_address/"
    assert first["start_time"] == "2025-01-30T12:10:13.279Z"


def test_pre_1_24_upstream_cluster_alt_stat_name_semicolon_is_stripped() -> None:
    line = OUT_LINE.replace(
        "outbound|8000||httpbin.foo.svc.cluster.local ",
        "outbound|8000||httpbin.foo.svc.cluster.local; ",
    )
    parsed = parse_text(pa.array([line, IN_LINE]))
    assert parsed.errors == []
    assert parsed.fields.column("upstream_cluster").to_pylist() == [
        "outbound|8000||httpbin.foo.svc.cluster.local",
        "inbound|8000||",
    ]


def test_user_agent_with_spaces_and_with_quotes_survives() -> None:
    ua = "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
    spaced = OUT_LINE.replace('"curl/7.73.0-DEV"', f'"{ua}"')
    quoted = OUT_LINE.replace('"curl/7.73.0-DEV"', '"agent "quoted"/1.0"')
    parsed = parse_text(pa.array([spaced, quoted, IN_LINE]))
    assert parsed.errors == []
    assert parsed.fields.column("user_agent").to_pylist() == [
        ua, 'agent "quoted"/1.0', "curl/7.73.0-DEV"
    ]
    assert parsed.fields.column("route_name").to_pylist() == ["default"] * 3


def test_malformed_lines_are_reported_and_neighbours_parse() -> None:
    truncated_mid_quote = OUT_LINE[: OUT_LINE.index("curl/7") + 4]
    truncated_tail = OUT_LINE[: OUT_LINE.index(" 10.0.45.184")]
    bad_number = OUT_LINE.replace(" 0 135 4 4 ", " 0 13x5 4 4 ")
    lines = [
        OUT_LINE, truncated_mid_quote, IN_LINE, "garbage here", "", None,
        truncated_tail, bad_number, OUT_LINE,
    ]
    parsed = parse_text(pa.array(lines, pa.string()))
    assert parsed.good.tolist() == [True, False, True, False, False, False, False, False, True]
    reasons = dict(parsed.errors)
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7]
    assert reasons[1] == "unbalanced double quotes (truncated line?)"
    assert reasons[3] == "not an Envoy/Istio access-log line"
    assert reasons[4] == reasons[5] == "empty line"
    assert "bad field value" in reasons[7]
    got = rows(parsed.fields)
    assert [r["upstream_cluster"] for r in got] == [
        "outbound|8000||httpbin.foo.svc.cluster.local", "inbound|8000||",
        "outbound|8000||httpbin.foo.svc.cluster.local",
    ]
    assert [r["route_name"] for r in got] == ["default"] * 3


def test_exact_across_chunk_boundaries() -> None:
    n = CHUNK + 1500
    lines: list[str] = []
    for i in range(n):
        base = OUT_LINE if i % 2 else IN_LINE
        lines.append(base.replace("84961386-6d84-929d-98bd-c5aee93b5c88", f"rid-{i}"))
    bad = {0, CHUNK - 1, CHUNK, CHUNK + 1, n - 1}
    for i in bad:
        lines[i] = lines[i][: 60 + i % 40]
    parsed = parse_text(pa.array(lines))
    assert {i for i, _ in parsed.errors} == bad
    expected = [f"rid-{i}" for i in range(n) if i not in bad]
    assert parsed.fields.column("request_id").to_pylist() == expected


def test_custom_format_round_trip() -> None:
    fmt = compile_format(
        '%START_TIME(%s.%3f)% %DOWNSTREAM_REMOTE_ADDRESS% "%REQ(:METHOD)% %REQ(:PATH)%" '
        '%RESPONSE_CODE% "%REQ(USER-AGENT):10%" %UPSTREAM_CLUSTER_RAW%\n'
    )
    values = [
        ("1606339578.409", "10.44.1.23:46520", "GET", "/status/418", "418", "curl/7.73.",
         "outbound|8000||httpbin.foo.svc.cluster.local"),
        ("1606339579.001", "[fd00::5]:3345", "POST", "/a?b=c", "503", "-", "-"),
    ]
    lines = [f'{a} {b} "{c} {d}" {e} "{f}" {g}' for a, b, c, d, e, f, g in values]
    parsed = parse_text(pa.array([*lines, "1606339579.001 x"]), fmt)
    assert parsed.errors == [(2, "does not match the given --envoy-format")]
    assert parsed.fields.column_names == [
        "start_time_s_3f", "downstream_remote_address", "method", "path", "response_code",
        "user_agent", "upstream_cluster",
    ]
    assert rows(parsed.fields)[0]["user_agent"] == "curl/7.73."
    assert rows(parsed.fields)[1] == {
        "start_time_s_3f": "1606339579.001", "downstream_remote_address": "[fd00::5]:3345",
        "method": "POST", "path": "/a?b=c", "response_code": "503", "user_agent": None,
        "upstream_cluster": None,
    }


def test_format_without_fast_plan_uses_the_regex_path() -> None:
    fmt = compile_format("%RESPONSE_CODE%/%DURATION%ms %PROTOCOL%")
    assert fmt.pieces is None
    parsed = parse_text(pa.array(["200/15ms HTTP/1.1", "x/1ms HTTP/2", "503/0ms -"]), fmt)
    assert parsed.good.tolist() == [True, False, True]
    assert parsed.fields.to_pylist() == [
        {"response_code": "200", "duration": "15", "protocol": "HTTP/1.1"},
        {"response_code": "503", "duration": "0", "protocol": None},
    ]


# ------------------------------------------------------------------ JSON


def envoy_json(fields: dict[str, str | None]) -> str:
    """A JSON line the way Envoy writes Istio's JSON encoding: sorted keys, numbers, null."""
    numeric = {"response_code", "bytes_received", "bytes_sent", "duration"}
    obj = {
        k: (int(v) if k in numeric and v is not None else v) for k, v in sorted(fields.items())
    }
    return orjson.dumps(obj).decode()


def test_parse_json_matches_text_parse() -> None:
    text = rows(parse_text(pa.array(SLEEP)).fields)
    lines = [envoy_json(text[0]), "{not json", '{"a": 1}', "", envoy_json(text[1])]
    parsed = parse_json(pa.array(lines))
    assert parsed.good.tolist() == [True, False, False, False, True]
    assert parsed.errors == [
        (1, "not valid JSON (truncated line?)"),
        (2, "JSON object is not an Istio access-log record"),
        (3, "empty line"),
    ]
    assert rows(parsed.fields) == text
    assert looks_like_istio_json(orjson.loads(lines[0]))
    assert not looks_like_istio_json({"a": 1}) and not looks_like_istio_json([1, 2])


def test_looks_like_envoy_text_rejects_other_logs() -> None:
    assert not looks_like_envoy_text("2024-04-18T07:46:30.123Z\tinfo\taccess\tconnection complete")
    assert not looks_like_envoy_text('{"start_time": "x"}')
    assert looks_like_envoy_text(IN_LINE)


# ------------------------------------------------------------------ fast-path details


def test_columns_cuts_only_the_requested_fields_but_checks_all() -> None:
    wanted = {"request_id", "upstream_cluster"}
    bad_service_time = OUT_LINE.replace(" 0 135 4 4 ", " 0 135 4 x4 ")
    lines = pa.array([OUT_LINE, bad_service_time, IN_LINE], pa.string())
    full = parse_text(lines)
    some = parse_text(lines, columns=wanted)
    # upstream_service_time is not requested, yet its bad value still rejects the line.
    assert some.good.tolist() == full.good.tolist() == [True, False, True]
    assert some.fields.column_names == ["request_id", "upstream_cluster"]  # format order
    assert some.fields.equals(full.fields.select(["request_id", "upstream_cluster"]))


@pytest.mark.parametrize(
    ("value", "shaped"),
    [
        ("2024-01-02T03:04:05.678Z", True),
        ("2024-01-02T03:04:05Z", True),
        ("2024-01-02T03:04:05.123456+02:00", True),
        ("2024-01-02T03:04:05+0200", True),
        ("2024-01-02 03:04:05.678Z", False),
        ("2024-01-02T03:04:05.67xZ", False),
        ("2024-01-0203:04:05.678ZZ", False),
        ("2024-01-02T03:04:05.678", False),
    ],
)
def test_start_time_shape_check_matches_the_pattern(value: str, shaped: bool) -> None:
    # Every other line uses Envoy's fixed layout (numpy check), the one under test may not.
    good = "[2024-01-02T03:04:05.678Z]"
    lines = [OUT_LINE.replace(OUT_LINE[: len(good)], f"[{value}]"), OUT_LINE]
    parsed = parse_text(pa.array(lines, pa.string()))
    assert parsed.good.tolist() == [shaped, True]
    if shaped:
        assert parsed.fields.column("start_time").to_pylist()[0] == value


def test_many_spaces_in_quoted_fields_do_not_shift_unquoted_ones() -> None:
    # Quotes and spaces are located together; spaces inside quoted values must not count
    # as separators of the unquoted pieces around them.
    ua = "Mozilla/5.0 (X11; Linux x86_64) a b  c   d"
    line = OUT_LINE.replace('"curl/7.', f'"{ua} curl/7.')
    parsed = parse_text(pa.array([line, OUT_LINE], pa.string()))
    assert parsed.good.tolist() == [True, True]
    first, second = parsed.fields.to_pylist()
    assert first["user_agent"].startswith(ua + " curl/7.")
    assert {k: v for k, v in first.items() if k != "user_agent"} == {
        k: v for k, v in second.items() if k != "user_agent"
    }


# ------------------------------------------------------------------ raw read-buffer path


def raw_lines(text: bytes) -> RawLines:
    """Lines of ``text`` as byte ranges (newline and trailing '\\r' excluded), no copy."""
    data = np.frombuffer(text, dtype=np.uint8)
    nl = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(data)]]).astype(np.int64)
    cr = (ends > starts) & (data[np.maximum(ends - 1, 0)] == 13)
    return RawLines(data, starts, ends - cr)


def same_parse(a: ParsedLines, b: ParsedLines) -> None:
    assert a.fields.equals(b.fields)
    assert a.good.tolist() == b.good.tolist()
    assert a.errors == b.errors
    assert a.variants is not None and b.variants is not None
    assert a.variants.equals(b.variants)


def test_raw_lines_parse_like_a_string_array() -> None:
    truncated = OUT_LINE[: OUT_LINE.index("curl/7") + 4]
    # CRLF, blank lines, malformed lines first and last, a legacy-variant line (second pass),
    # and a final line without newline.
    text = "\r\n".join([truncated, OUT_LINE, "", IN_LINE, "garbage", LEGACY_LINE]) + "\n\n"
    text += "\n".join([IN_LINE, truncated])
    raw = raw_lines(text.encode())
    arr = raw.array()
    assert arr.to_pylist() == [ln.rstrip("\r") for ln in text.split("\n")]
    got = parse_text(raw, columns={"request_id", "start_time", "path"})
    same_parse(got, parse_text(arr, columns={"request_id", "start_time", "path"}))
    assert got.good.tolist() == [False, True, False, True, False, True, False, True, False]
    assert dict(got.errors)[0] == "unbalanced double quotes (truncated line?)"
    # A subset of the lines (skipped ones lie between): the gaps hold spaces and quotes.
    idx = np.array([1, 2, 5, 8])
    same_parse(parse_text(raw.take(idx)), parse_text(arr.take(pa.array(idx))))
    same_parse(parse_text(raw.slice(3, 4)), parse_text(arr.slice(3, 4)))


def test_raw_lines_exact_across_parser_chunks() -> None:
    n = CHUNK + 700
    lines = [
        (OUT_LINE if i % 2 else IN_LINE).replace(
            "84961386-6d84-929d-98bd-c5aee93b5c88", f"rid-{i}")
        for i in range(n)
    ]
    bad = {0, CHUNK - 1, CHUNK, n - 1}
    for i in bad:
        lines[i] = lines[i][: 50 + i % 30]
    raw = raw_lines("\n".join(lines).encode())
    parsed = parse_text(raw, columns={"request_id"})
    assert {i for i, _ in parsed.errors} == bad
    assert parsed.fields.column("request_id").to_pylist() == [
        f"rid-{i}" for i in range(n) if i not in bad
    ]
    same_parse(parsed, parse_text(raw.array(), columns={"request_id"}))


def test_fuzzed_text_lines_are_always_accounted_for() -> None:
    """Byte-level damage to real lines: no exception, every line parsed or reported once, and
    an undamaged line always parses (exactness under noise, also across chunk edges)."""
    import random

    from observe.istio import to_flows

    data = Path(__file__).resolve().parents[1] / "data" / "envoy-logs"
    real = (data / "istio-docs-access-log-sleep-httpbin.log").read_text("utf-8").splitlines()
    real += [ln.split(" ", 1)[1] for ln in
             (data / "kiali-waypoint.log").read_text("utf-8").splitlines()]
    rng = random.Random(20261130)
    noise = '"[] -:|\t\\' + "0123456789abcdefZT\u00e9"
    lines: list[str] = []
    intact: list[bool] = []
    for _ in range(70000):
        line = rng.choice(real)
        damaged = rng.random() < 0.3
        if damaged:
            chars = list(line)
            for _ in range(rng.randint(1, 4)):
                op, pos = rng.random(), rng.randrange(len(chars) + 1)
                if op < 0.4 and chars:
                    del chars[min(pos, len(chars) - 1)]
                elif op < 0.8:
                    chars.insert(pos, rng.choice(noise))
                else:
                    chars = chars[:pos]
            line = "".join(chars)
        lines.append(line)
        intact.append(not damaged)
    parsed = parse_text(pa.array(lines, pa.string()))
    bad = {i for i, _ in parsed.errors}
    assert len(bad) == len(parsed.errors)  # each reported once
    assert sorted(bad | set(np.flatnonzero(parsed.good).tolist())) == list(range(len(lines)))
    assert not (bad & set(np.flatnonzero(parsed.good).tolist()))
    assert all(parsed.good[i] for i, ok in enumerate(intact) if ok)
    assert parsed.fields.num_rows == int(parsed.good.sum())
    # Whatever parsed maps to flow records without raising.
    origin = pa.array([f"f:{i}" for i in range(parsed.fields.num_rows)])
    batch = to_flows(parsed.fields, reporter=None, origin=origin, source="istio-text")
    assert batch.num_rows >= parsed.fields.num_rows
