"""The compiled kernel (observe/_pcapcut.c) against the numpy paths it replaces.

The kernel must give exactly what the numpy reader and tracker give, on every real capture
and on damaged and random input, so each test runs both (``observe.pcap.USE_KERNEL`` switches
it off for the reader and the tracker) and compares everything: every column of every batch,
the read's counters and warnings, and the tracker's tables. The install this suite runs in
(CI's ``pip install -e '.[test]'``) builds the kernel: a missing kernel fails here, not
silently.
"""

from __future__ import annotations

import io
import itertools
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from observe import conntrack, pcap
from observe.compiled import pcapcut
from observe.conntrack import ConnectionTracker, TrackerOutput
from observe.errors import FormatError
from observe.pcap import CaptureStats, PacketBatch, read_packets, sniff_capture

DATA = Path(__file__).parent.parent / "data" / "pcap"
CAPTURES = sorted(p for p in DATA.iterdir() if sniff_capture(p.read_bytes()[:64]))
COLUMNS = ("frame", "ts_ns", "frame_len", "cap_len", "linktype", "ip_version", "src_hi",
           "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport", "tcp_flags", "seq", "ack",
           "window", "payload_len", "payload_off", "payload_cap", "tunnel", "frag", "ip_id",
           "ifindex", "iface")


def test_the_kernel_is_built() -> None:
    assert pcapcut is not None, "observe/_pcapcut.c was not compiled at install"
    assert pcap.USE_KERNEL


Read = tuple[dict[str, np.ndarray], list[bytes], tuple[object, ...]] | str


def read(data: bytes, use: bool, batch_bytes: int, prefetch: bool | None = None) -> Read:
    """Every column of every batch (concatenated), the payloads, and the stats; or the
    error message when the input is not a capture."""
    pcap.USE_KERNEL = use
    try:
        stats = CaptureStats(origin="t")
        batches: list[PacketBatch] = []
        try:
            for b in read_packets(io.BytesIO(data), "t", batch_bytes=batch_bytes, stats=stats,
                                  prefetch=prefetch):
                batches.append(b)
        except FormatError as e:
            return str(e)
    finally:
        pcap.USE_KERNEL = True
    cols = {c: np.concatenate([getattr(b, c) for b in batches]) if batches else np.zeros(0)
            for c in COLUMNS}
    dtypes = {c: str(getattr(batches[0], c).dtype) for c in COLUMNS} if batches else {}
    payloads = [b.payload(i) for b in batches for i in range(len(b))]
    summary = (stats.format, stats.frames, stats.packets, sorted(stats.skipped.items()),
               sorted(stats.other_blocks.items()), stats.warnings, stats.stopped, dtypes,
               stats.duplicate_copies)
    return cols, payloads, summary


def assert_same_read(a: Read, b: Read) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert a[2] == b[2]
    for c in COLUMNS:
        assert np.array_equal(a[0][c], b[0][c]), c
    assert a[1] == b[1]


def track(data: bytes, use: bool, batch_bytes: int, head_bytes: int) -> list[TrackerOutput]:
    pcap.USE_KERNEL = use
    try:
        tracker = ConnectionTracker(head_bytes=head_bytes, closed_linger_s=0.001,
                                    idle_timeout_s=5)
        out = []
        for b in read_packets(io.BytesIO(data), "t", batch_bytes=batch_bytes):
            tracker.update(b)
            out.append(tracker.flush())
        out.append(tracker.finish())
        return out
    finally:
        pcap.USE_KERNEL = True


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_real_captures_read_the_same(path: Path) -> None:
    data = path.read_bytes()
    for batch_bytes in (1 << 16, 8 << 20):
        ref = read(data, False, batch_bytes, prefetch=False)
        assert_same_read(read(data, True, batch_bytes, prefetch=False), ref)
        assert_same_read(read(data, True, batch_bytes, prefetch=True), ref)


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_real_captures_track_the_same(path: Path) -> None:
    data = path.read_bytes()
    for batch_bytes, head_bytes in ((1 << 16, 50), (8 << 20, 4096)):
        ours = track(data, True, batch_bytes, head_bytes)
        ref = track(data, False, batch_bytes, head_bytes)
        assert len(ours) == len(ref)
        for x, y in zip(ours, ref, strict=True):
            assert x.connections.equals(y.connections)
            assert x.http.equals(y.http)
    l4 = any(np.isin(b.proto, (6, 17)).any() for b in read_packets(io.BytesIO(data), "t"))
    assert (sum(o.connections.num_rows for o in ours) > 0) == l4


SAMPLES = [p.read_bytes() for p in CAPTURES if p.stat().st_size < 30_000]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_read_the_same(data: bytes) -> None:
    assert_same_read(read(data, True, 1 << 16), read(data, False, 1 << 16, prefetch=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_damaged_captures_read_and_track_the_same(sample: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(sample)))
    buf = bytearray(sample[:cut])
    for _ in range(data.draw(st.integers(0, 12))):
        if len(buf) > 24:
            buf[data.draw(st.integers(24, len(buf) - 1))] = data.draw(st.integers(0, 255))
    raw = bytes(buf)
    ours, ref = read(raw, True, 1 << 16), read(raw, False, 1 << 16, prefetch=False)
    assert_same_read(ours, ref)
    if not isinstance(ref, str):
        x, y = track(raw, True, 1 << 16, 64), track(raw, False, 1 << 16, 64)
        for a, b in zip(x, y, strict=True):
            assert a.connections.equals(b.connections) and a.http.equals(b.http)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_slices_and_prefixes_agree(blob: bytes, data: st.DataObject) -> None:
    buf = np.frombuffer(blob + bytes(8), dtype=np.uint8)
    n = data.draw(st.integers(0, 20))
    offs = np.array([data.draw(st.integers(0, len(blob))) for _ in range(n)], dtype=np.int64)
    lens = np.array([data.draw(st.integers(0, len(blob) - int(o))) for o in offs],
                    dtype=np.int64)
    tokens = (b"GET ", b"HTTP/1.", b"OPTIONS ", blob[:3] or b"x")
    results = []
    for use in (True, False):
        pcap.USE_KERNEL = use
        try:
            got, bounds = conntrack._slices(buf, offs, lens)
            mask = conntrack._starts_with(buf, offs, lens, tokens)
        finally:
            pcap.USE_KERNEL = True
        results.append((got, bounds.tolist(), mask.tolist()))
    assert results[0] == results[1]
    # Independent reference: plain slicing.
    assert results[0][0] == b"".join(blob[o: o + k] for o, k in zip(offs, lens, strict=True))
    want = [any(blob[o: o + k].startswith(t) for t in tokens)
            for o, k in zip(offs, lens, strict=True)]
    assert results[0][2] == want


def test_arrow_columns_need_no_pandas() -> None:
    """The tracker builds its tables from buffers; they equal pa.array's."""
    out = track((DATA / "deepflow-http.pcap").read_bytes(), True, 1 << 20, 4096)[-1]
    rows = out.connections.to_pylist()
    rebuilt = pa.Table.from_pylist(rows, schema=conntrack.CONNECTION_SCHEMA)
    assert out.connections.equals(rebuilt) and out.connections.num_rows > 0
    rows = out.http.to_pylist()
    assert out.http.equals(pa.Table.from_pylist(rows, schema=conntrack.HTTP_SCHEMA))


def test_prefetch_hands_over_errors_and_stops_when_abandoned() -> None:
    with pytest.raises(FormatError, match="unknown magic"):
        list(read_packets(io.BytesIO(b"not a capture at all"), "x", prefetch=True))
    data = (DATA / "packt-grpc-unary.pcapng").read_bytes()
    before = threading.active_count()
    it = read_packets(io.BytesIO(data), "x", batch_bytes=1 << 16, prefetch=True)
    first = next(it)
    assert len(first) > 0
    it.close()  # the consumer stops early: the reader thread must end
    assert threading.active_count() == before
    assert not any(t.name == "pcap-reader" for t in threading.enumerate())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(-3000, 5000)),
                max_size=80), st.lists(st.integers(0, 80), max_size=5))
def test_copy_marks_and_memory_agree(rows: list[tuple[int, int, int]], cuts: list[int]) -> None:
    """The kernel's mark_copies and the numpy rule give the same marks and remember the
    same runs (clock, per key and per key and interface) after every batch."""
    ts = np.cumsum([10**6] + [dt for _, _, dt in rows])[1:].astype(np.int64)
    keys = np.array([(k * 0x9E3779B97F4A7C15) % (1 << 64) for k, _, _ in rows], dtype=np.uint64)
    ident = np.array([(i % 2) << 32 | i for _, i, _ in rows], dtype=np.uint64)
    bounds = sorted({0, len(rows), *(c for c in cuts if c <= len(rows))})
    sc, sn = pcap._CopyState(), pcap._CopyState()
    for a, b in itertools.pairwise(bounds):
        mc, sc = pcap._mark_copies_c(keys[a:b], ident[a:b], ts[a:b], 2500, sc)
        mn, sn = pcap._mark_copies_np(keys[a:b], ident[a:b], ts[a:b], 2500, sn)
        assert mc.tolist() == mn.tolist()
        assert sc.clock == sn.clock
        for f in ("ck", "clast", "cntx", "cik", "cif", "cocc"):
            assert getattr(sc, f).tolist() == getattr(sn, f).tolist(), f


def test_copy_keys_agree_on_real_captures() -> None:
    for path in CAPTURES:
        for b in read_packets(io.BytesIO(path.read_bytes()), "t", copies=False):
            pcap.USE_KERNEL = False
            try:
                ref = pcap.copy_keys(b)
            finally:
                pcap.USE_KERNEL = True
            assert np.array_equal(pcap.copy_keys(b), ref), path.name
