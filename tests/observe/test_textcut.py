"""The compiled kernel (observe/_textcut.c) against the numpy/regex paths it replaces.

The kernel must give exactly what the pure-Python paths give, on real lines and on damaged
ones, so each test runs both and compares. The install this suite runs in (CI's
``pip install -e '.[test]'``) builds the kernel: a missing kernel fails here, not silently.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from observe import envoy_format, inputs, istio
from observe.envoy_format import RawLines, parse_text

LOGS = Path(__file__).parents[1] / "data" / "envoy-logs"
SAMPLES = Path(__file__).parents[2] / "samples" / "bookinfo" / "logs"
KUBECTL_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")


def test_the_kernel_is_built() -> None:
    assert envoy_format._textcut is not None, "observe/_textcut.c was not compiled at install"


def real_lines() -> list[str]:
    lines: list[str] = []
    for path in sorted(LOGS.glob("*.log")):
        lines += [KUBECTL_TS.sub("", x) for x in path.read_text("utf-8").splitlines()]
    for path in sorted(SAMPLES.rglob("*.log")):
        lines += path.read_text("utf-8").splitlines()[:400]
    assert len(lines) > 500
    return lines


def damaged(lines: list[str], seed: int) -> Iterator[str]:
    """Each real line, and copies cut short, with bytes swapped for '"', ' ', '-', digits or
    letters, and with impossible or odd timestamps."""
    rng = random.Random(seed)
    odd_times = [
        "2024-02-29T10:00:00.000Z", "2023-02-29T10:00:00.000Z", "2024-13-01T00:00:00.000Z",
        "2024-04-31T00:00:00.000Z", "2024-01-01T24:00:00.000Z", "2024-01-01T23:60:00.000Z",
        "2024-01-01T23:59:60.000Z", "1900-02-29T00:00:00.000Z", "2000-02-29T00:00:00.000Z",
        "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.123456Z", "2024-01-01T00:00:00+02:00",
        "2024-00-10T00:00:00.000Z", "2024-01-00T00:00:00.000Z", "2024-1-01T00:00:00.000Z",
    ]
    for line in lines:
        yield line
        if not line:
            continue
        cut = rng.randrange(len(line))
        yield line[:cut]
        chars = list(line)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice('" -0a:.[]')
        yield "".join(chars)
        if line.startswith("[") and "]" in line:
            yield "[" + rng.choice(odd_times) + line[line.index("]") :]
        # Status codes of 18 digits (the most a number may have) and 19.
        yield re.sub(r'" \d{3} ', '" ' + "1" * rng.choice((18, 19)) + " ", line, count=1)


def parse_both(lines: list[str], **kwargs: object) -> tuple[object, object]:
    arr = pa.array(lines, pa.string())
    results = []
    for use in (True, False):
        envoy_format.USE_KERNEL = use
        try:
            results.append(parse_text(arr, **kwargs))  # type: ignore[arg-type]
        finally:
            envoy_format.USE_KERNEL = True
    return results[0], results[1]


def assert_same(a: envoy_format.ParsedLines, b: envoy_format.ParsedLines) -> None:
    assert a.good.tolist() == b.good.tolist()
    assert a.errors == b.errors
    assert a.fields.column_names == b.fields.column_names
    assert a.fields.to_pylist() == b.fields.to_pylist()
    assert a.variants is not None and b.variants is not None
    assert a.variants.to_pylist() == b.variants.to_pylist()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kernel_equals_numpy_path_on_real_and_damaged_lines(seed: int) -> None:
    lines = list(damaged(real_lines(), seed))
    a, b = parse_both(lines)
    assert_same(a, b)  # type: ignore[arg-type]
    # The damage really exercised both outcomes.
    assert 0 < int(np.sum(a.good)) < len(lines)  # type: ignore[attr-defined]


def test_kernel_equals_numpy_path_when_every_timestamp_has_envoys_layout() -> None:
    # Other layouts make Python re-check a chunk's times; without them the kernel decides.
    iso = re.compile(r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]")
    lines = [x for x in damaged(real_lines(), 5) if iso.match(x)]
    assert len(lines) > 1000
    a, b = parse_both(lines)
    assert_same(a, b)  # type: ignore[arg-type]


def test_kernel_equals_numpy_path_with_only_the_mappers_columns() -> None:
    lines = list(damaged(real_lines(), 7))
    a, b = parse_both(lines, columns=istio.FIELDS_USED)
    assert_same(a, b)  # type: ignore[arg-type]


def test_impossible_dates_are_rejected_by_both_paths() -> None:
    line = real_lines()[0]
    assert line.startswith("[")
    rest = line[line.index("]") :]
    cases = {
        "2024-02-29T10:00:00.000Z": True, "2023-02-29T10:00:00.000Z": False,
        "2000-02-29T00:00:00.000Z": True, "1900-02-29T00:00:00.000Z": False,
        "2024-04-31T00:00:00.000Z": False, "2024-01-01T24:00:00.000Z": False,
        "2024-01-01T23:59:60.000Z": False, "2024-01-01T00:00:00.123456Z": True,
    }
    # One line per parse: a chunk with any other timestamp layout is checked by Python too.
    for stamp, valid in cases.items():
        a, b = parse_both(["[" + stamp + rest])
        assert_same(a, b)  # type: ignore[arg-type]
        assert a.good.tolist() == [valid], stamp  # type: ignore[attr-defined]


def test_raw_lines_input_equals_string_array_input() -> None:
    text = "\n".join(damaged(real_lines(), 11)).encode()
    with __import__("io").BytesIO(text) as stream:
        chunks = list(inputs.iter_chunks(stream, chunk_bytes=1 << 16, max_lines=512))
    assert len(chunks) > 3
    for raw, _ in chunks:
        assert isinstance(raw, RawLines)
        fast = parse_text(raw)
        envoy_format.USE_KERNEL = False
        try:
            slow = parse_text(raw.array())
        finally:
            envoy_format.USE_KERNEL = True
        assert_same(fast, slow)


ADDRESSES = [
    "10.0.0.1:80", "10.0.0.1", "[fd00::1]:9080", "[fd00::1]", "[::ffff:10.1.2.3]:443",
    "1.2.3.4:65535", "1.2.3.4:123456", "1.2.3.4:", "1.2.3:80", "1234.1.1.1:80", "-", "",
    "envoy://internal/x", "tcp://10.0.0.1:80", "unix:///var/run/x.sock", "[]:80", "[g::1]:80",
    "10.0.0.1:8a", "a10.0.0.1", "10.0.0.1:80:80", "[fd00::1]80", None, "0.0.0.0:0",
]


@pytest.mark.parametrize("offset", [0, 3])
def test_address_split_equals_the_regex(offset: int) -> None:
    arr = pa.array((ADDRESSES * 3)[offset:], pa.string())
    if offset:
        arr = arr.slice(offset, len(arr) - offset)
    want_ip, want_port = istio._address_plain(arr)
    got = istio._addresses_compiled(arr)
    if any(v and "://" in v for v in arr.to_pylist()):
        assert got is None  # scheme prefixes go to the regex
        got = istio._address(arr)
    assert got is not None
    assert got[0].to_pylist() == want_ip.to_pylist()
    assert got[1].to_pylist() == want_port.to_pylist()


def test_address_split_without_schemes_uses_the_kernel() -> None:
    plain = [a for a in ADDRESSES if a is None or "://" not in a]
    arr = pa.array(plain, pa.string())
    got = istio._addresses_compiled(arr)
    assert got is not None
    want_ip, want_port = istio._address_plain(arr)
    assert got[0].to_pylist() == want_ip.to_pylist()
    assert got[1].to_pylist() == want_port.to_pylist()


def test_newlines_equals_numpy() -> None:
    rng = np.random.default_rng(5)
    data = rng.choice(np.frombuffer(b"ab\n", dtype=np.uint8), size=100_000)
    scratch = np.empty(len(data), dtype=np.int64)
    got = inputs._newlines(data, scratch)
    assert got.tolist() == np.flatnonzero(data == 10).tolist()
    with pytest.raises(ValueError, match="too small"):
        envoy_format._textcut.newlines(data, np.empty(3, dtype=np.int64))


@pytest.mark.parametrize("extra", ["", "2024-05-14T08:03:00.879Z x", "[pod/a/b] x", '{"a": 1}',
                                   " indented", "2024", "[2024-05-14"])
def test_line_classification_equals_numpy(extra: str) -> None:
    from observe import layouts

    rng = random.Random(len(extra))
    lines = [x for x in damaged(real_lines(), 3)][:3000]
    lines += ["", "[", "[2024-05-14T", "[2024-05-1xT", "[pod/", "abcd-"] + [extra] * bool(extra)
    rng.shuffle(lines)
    blob = "\n".join(lines).encode()
    data = np.frombuffer(blob, dtype=np.uint8)
    ends = np.append(np.flatnonzero(data == 10), len(data)).astype(np.int64)
    starts = np.append(0, ends[:-1] + 1).astype(np.int64)
    got = layouts.classify_raw(data, starts, ends)
    want = layouts._classify_raw_numpy(data, starts, ends)
    assert (got is None) == (want is None)
    if got is not None and want is not None:
        assert got.tolist() == want.tolist()
        assert 0 < int(got.sum()) < len(lines)
