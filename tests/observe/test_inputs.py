"""Input files: opening (gzip, stdin), content detection, walking, line chunks, dedupe."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from observe import inputs
from observe.errors import InputError
from observe.flows_io import write_flows
from observe.schema import empty_batch

DATA = Path(__file__).parent.parent / "data"
SLEEP = (DATA / "envoy-logs" / "istio-docs-access-log-sleep-httpbin.log").read_bytes()
WAYPOINT = (DATA / "envoy-logs" / "kiali-waypoint.log").read_bytes()
BOOKINFO = DATA / "inventory" / "istio-samples-bookinfo.yaml"


def read_all(path: Path | str) -> bytes:
    with inputs.open_input(path) as (stream, counter):
        data = stream.read()
    assert counter.count > 0
    return data


def test_open_plain_and_gzip_with_misleading_name(tmp_path: Path) -> None:
    plain = tmp_path / "a.log"
    plain.write_bytes(SLEEP)
    disguised = tmp_path / "b.txt"  # gzip content, no .gz name
    disguised.write_bytes(gzip.compress(SLEEP))
    assert read_all(plain) == SLEEP
    assert read_all(disguised) == SLEEP
    assert inputs.read_head(disguised, 50) == SLEEP[:50]


def test_open_stdin_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(WAYPOINT))))
    assert read_all(inputs.STDIN) == WAYPOINT
    assert inputs.display(inputs.STDIN) == "<stdin>"


def test_open_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err, inputs.open_input(tmp_path / "nope.log"):
        pass
    assert str(tmp_path / "nope.log") in str(err.value)


def test_detect_logs_layouts() -> None:
    assert inputs.detect(SLEEP, complete=True) == inputs.Detected("logs", "text")
    assert inputs.detect(WAYPOINT, complete=True).layout == "text"  # --timestamps
    prefixed = b"[pod/httpbin-1/istio-proxy] " + SLEEP
    assert inputs.detect(prefixed, complete=True).layout == "text"
    cri = b"2025-01-30T12:10:13.682034460Z stdout F " + SLEEP
    assert inputs.detect(cri, complete=True).layout == "cri"
    env = json.dumps({"log": SLEEP.decode(), "kubernetes": {"pod_name": "p"}}).encode()
    assert inputs.detect(env + b"\n", complete=True).layout == "envelope"
    istio_json = json.dumps({"start_time": "2020-11-25T21:26:18.409Z", "response_code": 200})
    assert inputs.detect(istio_json.encode() + b"\n", complete=True).layout == "text"
    startup = b'2025-01-30T10:00:00.000000Z\tinfo\tFLAG: --concurrency="2"\n'
    assert inputs.detect(startup, complete=True).kind == "logs"


def test_detect_inventory_yaml_and_json() -> None:
    text = BOOKINFO.read_bytes()
    assert inputs.detect(text[: inputs.HEAD_BYTES]).kind == "inventory"
    items = [d for d in yaml.safe_load_all(text) if d]
    as_list = {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {}}
    assert inputs.detect(json.dumps(as_list, indent=4).encode()).kind == "inventory"
    assert inputs.detect(json.dumps(items[0]).encode() + b"\n").kind == "inventory"


def test_detect_rejects_with_reason() -> None:
    assert inputs.detect(b"").reason == "empty file"
    assert "binary" in inputs.detect(b"\x7fELF\x02\x01\x00\x00").reason
    assert "zstd" in inputs.detect(b"\x28\xb5\x2f\xfd\x00\x00").reason
    readme = b"# My dump\n\nThese are the logs of last week.\n"
    assert inputs.detect(readme, complete=True).kind is None
    assert inputs.detect(readme, complete=True, custom_format=True).kind == "logs"
    assert inputs.detect(b'{"certificates": [], "config": {}}\n').kind is None


def test_detect_parquet(tmp_path: Path) -> None:
    path = tmp_path / "flows.bin"
    write_flows([empty_batch()], path)
    assert inputs.detect(inputs.read_head(path)).kind == "flows"


def test_walk_sorted_recursive_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b/2.log", "a/z.log", "a/b/1.log", ".git/x", "a/.swp", "c.log"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    got = [str(p.relative_to(tmp_path)) for p, root in inputs.walk(str(tmp_path))]
    assert got == ["c.log", "a/z.log", "a/b/1.log", "b/2.log"]
    assert all(root == tmp_path for _, root in inputs.walk(str(tmp_path)))
    assert inputs.walk(str(tmp_path / "c.log")) == [(tmp_path / "c.log", None)]
    with pytest.raises(InputError, match="no such file"):
        inputs.walk(str(tmp_path / "missing"))


def test_classify_paths_dir_skips_but_named_file_raises(tmp_path: Path) -> None:
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "pod.log").write_bytes(SLEEP)
    (tmp_path / "core").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    (tmp_path / "bookinfo.yaml").write_bytes(BOOKINFO.read_bytes())
    found, skipped = inputs.classify_paths([str(tmp_path)])
    assert [(p, d.kind) for p, _, d in found] == [
        (tmp_path / "bookinfo.yaml", "inventory"),
        (tmp_path / "ns" / "pod.log", "logs"),
    ]
    assert skipped == [(str(tmp_path / "core"), "binary content")]
    with pytest.raises(InputError) as err:
        inputs.classify_paths([str(tmp_path / "core")])
    assert err.value.origin == str(tmp_path / "core")
    with pytest.raises(InputError, match="more than once"):
        inputs.classify_paths(["-", "-"])


def chunks(data: bytes, **kw: int) -> list[tuple[list[str], int]]:
    parts = inputs.iter_line_chunks(io.BytesIO(data), **kw)
    return [(arr.to_pylist(), first) for arr, first in parts]


def test_line_chunks_whole_lines_and_numbers() -> None:
    data = b"one\r\ntwo\n\nfour\nfive"  # CRLF, blank line, no final newline
    assert chunks(data) == [(["one", "two", "", "four"], 1), (["five"], 5)]
    small = chunks(data, chunk_bytes=3)
    assert [line for part, _ in small for line in part] == ["one", "two", "", "four", "five"]
    firsts = [first for _, first in small]
    sizes = [len(part) for part, _ in small]
    assert firsts == [1 + sum(sizes[:i]) for i in range(len(sizes))]
    assert chunks(b"a\nb\nc\nd\n", max_lines=3) == [(["a", "b", "c"], 1), (["d"], 4)]
    assert chunks(b"") == []


def test_line_chunks_bad_utf8_is_replaced_not_fatal() -> None:
    assert chunks(b"ok\n\xff\xfe bad\n") == [(["ok", "\ufffd\ufffd bad"], 1)]


def test_hash_lines_depends_on_pod_and_line() -> None:
    lines = pa.array(["x", "y", "x"], type=pa.string())
    h = inputs.hash_lines("pod-a", lines)
    assert h[0] == h[2] and h[0] != h[1]
    assert not np.array_equal(h, inputs.hash_lines("pod-b", lines))
    per_row = inputs.hash_lines(pa.array(["pod-a", "pod-a", "pod-b"]), lines)
    assert per_row[0] != per_row[2]
    assert np.array_equal(inputs.hash_lines(None, lines), inputs.hash_lines("", lines))
    # a constant pod and the same pod per row give the same keys
    same = inputs.hash_lines(pa.array(["pod-a"] * 3), lines)
    assert np.array_equal(same, h)


def test_deduper_matches_a_set() -> None:
    rng = np.random.default_rng(7)
    dedupe = inputs.Deduper()
    reference: set[int] = set()
    for _ in range(40):  # enough batches to merge runs several times
        keys = rng.integers(0, 5000, size=300).astype(np.uint64)
        new = dedupe.filter(keys)
        expected = []
        for k in keys.tolist():
            expected.append(k not in reference)
            reference.add(k)
        assert new.tolist() == expected
    assert len(dedupe) == len(reference)
    assert len(dedupe._runs) <= 12  # runs stay logarithmic in the number of keys


def test_gunzip_concatenated_members_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "rotated"
    path.write_bytes(gzip.compress(SLEEP) + gzip.compress(WAYPOINT) + b"\x00" * 16)
    with inputs.open_input(path) as (stream, _):
        assert stream.read() == SLEEP + WAYPOINT
        assert not inputs.truncated(stream)


def test_gunzip_truncated_keeps_prefix(tmp_path: Path) -> None:
    data = WAYPOINT * 20
    packed = gzip.compress(data)
    path = tmp_path / "cut"
    path.write_bytes(packed[: len(packed) // 2])
    with inputs.open_input(path) as (stream, _):
        got = stream.read()
        assert inputs.truncated(stream)
    assert 0 < len(got) < len(data) and data.startswith(got)


def test_gunzip_corrupt_raises_oserror(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(WAYPOINT * 5))
    packed[20:40] = b"\xff" * 20
    path = tmp_path / "bad"
    path.write_bytes(bytes(packed))
    with pytest.raises(OSError), inputs.open_input(path) as (stream, _):
        stream.read()


def test_line_chunks_match_a_plain_split_on_awkward_data() -> None:
    # Random lines with CRLF, blank lines, multi-byte and invalid UTF-8, no final newline;
    # cut with tiny and odd chunk sizes (exercises the carry-over and buffer growth).
    rng = np.random.default_rng(3)
    alphabet = [b"a", b"b", b" ", b'"', b"\r", "é".encode(), b"\xff", b"\xe2\x82"]
    lines = [
        b"".join(alphabet[k] for k in rng.integers(0, len(alphabet), rng.integers(0, 40)))
        for _ in range(300)
    ]
    data = b"\n".join(lines)
    expected = [
        ln.decode("utf-8", errors="replace").rstrip("\r") for ln in data.split(b"\n")
    ]
    for kw in ({}, {"chunk_bytes": 5}, {"chunk_bytes": 97, "max_lines": 13}, {"max_lines": 1}):
        parts = chunks(data, **kw)
        assert [line for part, _ in parts for line in part] == expected
        firsts = [first for _, first in parts]
        assert firsts == [1 + sum(len(p) for p, _ in parts[:i]) for i in range(len(parts))]
        assert all(len(p) <= kw.get("max_lines", 65536) for p, _ in parts)


def test_line_chunks_trim_only_trailing_carriage_returns() -> None:
    data = b"a\rb\r\nc\r\r\n\r\nd\r"  # CR inside a line stays; CRs ending a line go
    # The unterminated last line comes as its own chunk.
    assert chunks(data) == [(["a\rb", "c", ""], 1), (["d"], 4)]
    assert chunks(b"a\rb\nc\n") == [(["a\rb", "c"], 1)]


def test_raw_chunks_match_string_chunks_and_keep_their_buffers() -> None:
    data = b"one\r\ntwo\r\r\n\n" + b"x" * 50 + b"\nfour\r\nfive\r"  # no final newline
    for kw in ({}, {"chunk_bytes": 7}, {"max_lines": 2}, {"chunk_bytes": 1, "max_lines": 1}):
        held = list(inputs.iter_chunks(io.BytesIO(data), **kw))
        # Every chunk is still intact after the whole stream was read: buffers of live
        # chunks are never reused.
        assert [(raw.array().to_pylist(), first) for raw, first in held] == chunks(data, **kw)
        assert [line for raw, _ in held for line in raw.array().to_pylist()] == [
            "one", "two", "", "x" * 50, "four", "five"
        ]


def test_raw_chunk_buffers_are_recycled_once_released() -> None:
    data = b"".join(b"line %d\n" % i for i in range(2000))
    buffers = set()
    for raw, _ in inputs.iter_chunks(io.BytesIO(data), chunk_bytes=1024):
        base = raw.data.base if raw.data.base is not None else raw.data
        buffers.add(id(base))
    assert len(buffers) <= 3  # ~14 chunks, read through a couple of pooled buffers


def test_raw_chunk_of_invalid_utf8_is_replaced() -> None:
    ((raw, first),) = list(inputs.iter_chunks(io.BytesIO(b"ok\nbad \xff\xfe end\r\n")))
    assert first == 1
    assert raw.array().to_pylist() == ["ok", "bad \ufffd\ufffd end"]
