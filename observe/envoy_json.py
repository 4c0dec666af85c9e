"""Fast, exact parsing of Istio/Envoy JSON access-log lines (one JSON object per line).

Meaning (the reference, kept as the per-line path): a line parses when it is a JSON object
(orjson's strict RFC 8259 reading; a repeated key keeps its last value) that
:func:`observe.envoy_format.looks_like_istio_json` accepts. Every key becomes a string column:
Istio's 24 keys always, other keys of good lines sorted after them; a string ``"-"`` and
``null`` are null, integers and booleans their JSON text, floats ``str(float)``, objects and
arrays compact JSON. Bad lines are reported as ``(index, reason)``.

Fast path, per call: the lines that start with ``{`` and end with ``}`` are joined with
``\\n`` into one buffer that pyarrow's C++ JSON reader parses (multithreaded) with an explicit
schema for Istio's keys (string, or int64/bool as the first line shows) and inferred types for
other keys. Only such lines go to it because the reader skips blank lines and turns ``null``
into a row, either of which would shift rows against lines; the row count is checked as well
(``{..}{..}`` on one line is two rows). The reader is at least as strict as orjson on
everything that reaches a column: it rejects lone surrogates, raw control characters, trailing
commas and comments, and a NaN/Infinity/float/over-long integer never converts to int64 (an
inferred float column goes to the per-line path). A repeated key is an error there.

Whenever the reader fails on a block, the block is bisected down to a few lines, which take
the per-line path; so a malformed line costs a few re-reads, never a wrong row. A row is
accepted from the fast path only when its non-null Istio values alone satisfy
``looks_like_istio_json`` (key presence with a null value is invisible in Arrow); other rows
are re-read per line. Output equals the per-line reference exactly (tested against it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from observe import arrowlite
from observe.envoy_format import (
    ISO_TIME_PATTERN,
    ISTIO_FIELDS,
    ParsedLines,
    _post_process,
    looks_like_istio_json,
    real_times,
)

log = logging.getLogger(__name__)

VARIANT = "istio-json"
#: Blocks this small (or smaller) are not bisected further but read line by line.
MIN_BISECT = 16
#: Arrow's reader block size: ~4 MiB pipeline chunks give both cores work.
BLOCK_SIZE = 1 << 20
#: Schema corrections ("changed from string to number") tried per block before bisecting.
MAX_RETRIES = 4

# Istio's JSON encoding (telemetry_logging.go) writes these as JSON numbers.
_DEFAULT_INT = frozenset({"response_code", "bytes_received", "bytes_sent", "duration"})
_ISTIO_SET = frozenset(ISTIO_FIELDS)
_CHANGED = re.compile(r"Column\(/(.*)\) changed from \w+ to (\w+)")
_ARROW_TYPE = {"number": pa.int64(), "string": pa.string(), "boolean": pa.bool_()}
# Inferred types of non-Istio keys whose string form Arrow gives exactly as the reference.
_PLAIN_EXTRA = (pa.string(), pa.int64(), pa.bool_(), pa.null())
# From buffers (observe.arrowlite): pa.scalar() would import pandas when the module loads.
_DASH = arrowlite.string_scalar("-")
_NULL_STR = arrowlite.null_scalar()

# Reasons, as the per-line reference words them.
EMPTY = "empty line"
NOT_JSON = "not valid JSON (truncated line?)"
NOT_ISTIO = "JSON object is not an Istio access-log record"


def json_value(v: object) -> str | None:
    """The string form of one decoded JSON value (the reference semantics)."""
    if v is None:
        return None
    if isinstance(v, str):
        return None if v == "-" else v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return orjson.dumps(v).decode()


@dataclass
class JsonStats:
    """How a parse went (for tests, benchmarks and debug logs); sums over calls."""

    fast_rows: int = 0
    """Rows taken from Arrow's reader."""
    per_line: int = 0
    """Lines read one by one (not braced, bisected down, or Arrow's view not conclusive)."""
    reads: int = 0
    """Calls of Arrow's reader, successful or not."""
    failed_reads: int = 0


# --------------------------------------------------------------------------- per-line path


class _Collector:
    """Good rows (fast tables and per-line records) and errors, by input index."""

    def __init__(self, n: int, stats: JsonStats) -> None:
        self.stats = stats
        self.good = np.zeros(n, dtype=bool)
        self.errors: list[tuple[int, str]] = []
        self.tables: list[tuple[pa.Table, np.ndarray]] = []
        self.records: list[dict[str, object]] = []
        self.record_idx: list[int] = []
        self.extra: set[str] = set()

    def per_line(self, lines: list[str | None], indices: np.ndarray) -> None:
        self.stats.per_line += len(lines)
        for line, i in zip(lines, indices.tolist(), strict=True):
            if line is None or not line.strip():
                self.errors.append((i, EMPTY))
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.errors.append((i, NOT_JSON))
                continue
            if not looks_like_istio_json(obj):
                self.errors.append((i, NOT_ISTIO))
                continue
            self.good[i] = True
            self.records.append(obj)
            self.record_idx.append(i)
            self.extra.update(k for k in obj if k not in _ISTIO_SET)

    def fast(self, table: pa.Table, indices: np.ndarray) -> None:
        self.stats.fast_rows += len(indices)
        self.good[indices] = True
        self.tables.append((table, indices))
        self.extra.update(c for c in table.column_names if c not in _ISTIO_SET)

    def _drop_bad_times(self, table: pa.Table, rows: np.ndarray) -> pa.Table:
        """Rows whose start_time is no real RFC3339 instant are malformed."""
        if table.num_rows == 0:
            return table
        col = table.column("start_time").combine_chunks()
        shaped = pc.fill_null(pc.match_substring_regex(col, ISO_TIME_PATTERN), False)
        # A record may lack a time (null); one it has must be a real RFC3339 instant.
        ok = pc.or_(pc.is_null(col), pc.and_(shaped, real_times(pc.if_else(shaped, col, None))))
        ok_np = ok.to_numpy(zero_copy_only=False)
        if ok_np.all():
            return table
        for line in rows[~ok_np]:
            self.good[int(line)] = False
            self.errors.append((int(line), "start_time is not a valid RFC3339 time"))
        return table.filter(ok)

    def result(self) -> ParsedLines:
        columns = list(ISTIO_FIELDS) + sorted(self.extra)
        schema = pa.schema([(c, pa.string()) for c in columns])
        parts: list[pa.Table] = []
        order: list[np.ndarray] = []
        for table, idx in self.tables:
            m = table.num_rows
            cols = [
                table.column(c) if c in table.column_names else pa.nulls(m, pa.string())
                for c in columns
            ]
            parts.append(pa.Table.from_arrays(cols, schema=schema))
            order.append(idx)
        if self.records:
            recs = self.records
            parts.append(pa.table(
                {c: pa.array([json_value(r.get(c)) for r in recs], pa.string()) for c in columns},
                schema=schema,
            ))
            order.append(np.asarray(self.record_idx, dtype=np.int64))
        if not parts:
            table = schema.empty_table()
        else:
            table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
            idx = np.concatenate(order)
            if not np.all(idx[:-1] <= idx[1:]):
                table = table.take(pa.array(np.argsort(idx, kind="stable")))
        table = self._drop_bad_times(table, np.sort(np.concatenate(order)) if order else
                                     np.zeros(0, dtype=np.int64))
        self.errors.sort()
        variants = pa.repeat(pa.scalar(VARIANT, pa.string()), table.num_rows)
        return ParsedLines(
            fields=_post_process(table), good=self.good, errors=self.errors, variants=variants
        )


# --------------------------------------------------------------------------- fast path


def _first_types(line: str) -> dict[str, pa.DataType]:
    """Column types of Istio keys as the block's first line shows them (defaults otherwise)."""
    types = {k: (pa.int64() if k in _DEFAULT_INT else pa.string()) for k in ISTIO_FIELDS}
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return types
    if isinstance(obj, dict):
        for k in ISTIO_FIELDS:
            v = obj.get(k)
            if isinstance(v, bool):
                types[k] = pa.bool_()
            elif isinstance(v, int):
                types[k] = pa.int64()
            elif isinstance(v, str):
                types[k] = pa.string()
    return types


def _read(buf: pa.Buffer, schema: pa.Schema) -> pa.Table:
    return pj.read_json(
        pa.BufferReader(buf),
        read_options=pj.ReadOptions(use_threads=True, block_size=BLOCK_SIZE),
        parse_options=pj.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="infer", newlines_in_values=False
        ),
    )


def _as_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A parsed column as the reference's strings: numbers/bools as text, '-' as null."""
    t = col.type
    if t == pa.null():
        return pa.chunked_array([pa.nulls(len(col), pa.string())])
    if t != pa.string():
        return col.cast(pa.string())
    dash = pc.equal(col, _DASH)
    if pc.any(dash).as_py():
        return pc.if_else(dash, _NULL_STR, col)
    return col


class _FastReader:
    """Reads blocks of candidate lines through Arrow, bisecting around whatever it rejects."""

    def __init__(self, joined: pa.StringArray, out: _Collector, indices: np.ndarray) -> None:
        self.joined = joined  # each candidate line with its '\n'
        self.offsets = np.frombuffer(
            joined.buffers()[1], dtype=np.int32, count=len(joined) + 1, offset=joined.offset * 4
        )
        data = joined.buffers()[2]
        assert data is not None
        self.data = data
        self.out = out
        self.indices = indices  # input index of each candidate

    def run(self, lo: int, hi: int) -> None:
        if hi - lo <= MIN_BISECT:
            self._per_line(lo, hi)
            return
        table = self._try(lo, hi)
        if table is None:
            self._split(lo, hi)
        else:
            self._accept(table, lo, hi)

    def _split(self, lo: int, hi: int) -> None:
        if hi - lo <= MIN_BISECT:
            self._per_line(lo, hi)
            return
        mid = (lo + hi) // 2
        self.run(lo, mid)
        self.run(mid, hi)

    def _per_line(self, lo: int, hi: int) -> None:
        lines = [s[:-1] for s in self.joined.slice(lo, hi - lo).to_pylist()]
        self.out.per_line(lines, self.indices[lo:hi])

    def _try(self, lo: int, hi: int) -> pa.Table | None:
        """The block's rows, or None when Arrow rejects it (or its rows don't line up)."""
        start, end = int(self.offsets[lo]), int(self.offsets[hi])
        buf = self.data.slice(start, end - start)
        types = _first_types(self.joined[lo].as_py()[:-1])
        flipped: set[str] = set()
        for _ in range(MAX_RETRIES):
            schema = pa.schema([(k, types[k]) for k in types])
            self.out.stats.reads += 1
            try:
                table = _read(buf, schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                self.out.stats.failed_reads += 1
                m = _CHANGED.search(str(exc))
                key = m.group(1) if m else None
                new = _ARROW_TYPE.get(m.group(2)) if m else None
                if key in types and key not in flipped and new is not None:
                    types[key] = new  # the first line had null (or a rarer type) there
                    flipped.add(key)
                    continue
                return None  # malformed, or one key with two types: bisect
            if table.num_rows != hi - lo:
                self.out.stats.failed_reads += 1
                return None
            # Inferred timestamps would lose the text: read such keys as strings instead.
            stamps = [
                f.name for f in table.schema
                if f.name not in types and pa.types.is_temporal(f.type)
            ]
            if not stamps:
                return table
            types.update(dict.fromkeys(stamps, pa.string()))
        return None

    def _accept(self, table: pa.Table, lo: int, hi: int) -> None:
        extras = [c for c in table.column_names if c not in _ISTIO_SET]
        if any(table.schema.field(c).type not in _PLAIN_EXTRA for c in extras):
            self._split(lo, hi)  # floats, objects, arrays: the reference formats them
            return
        count = np.zeros(hi - lo, dtype=np.int32)
        for k in ISTIO_FIELDS:
            col = table.column(k)
            if col.null_count:
                count += col.is_valid().to_numpy(zero_copy_only=False)
            elif col.type != pa.null():
                count += 1
        start_ok = table.column("start_time").is_valid().to_numpy(zero_copy_only=False)
        ok = (count >= 6) | ((count >= 3) & start_ok)
        if not ok.all():
            if extras:
                # A null-valued extra key of a rejected row would be invisible.
                self._split(lo, hi)
                return
            rows = np.flatnonzero(ok)
            table = table.take(pa.array(rows))
            for j in np.flatnonzero(~ok).tolist():
                self._per_line(lo + j, lo + j + 1)
        else:
            rows = np.arange(hi - lo)
        cols = {c: _as_strings(table.column(c)) for c in table.column_names}
        self.out.fast(pa.table(cols), self.indices[lo + rows])


def _braced(lines: pa.StringArray) -> np.ndarray:
    """Mask of the non-null lines whose first byte is '{' and last byte '}'."""
    bufs = lines.buffers()
    n = len(lines)
    if bufs[2] is None or n == 0:
        return np.zeros(n, dtype=bool)
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=lines.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    if len(data) == 0:
        return np.zeros(n, dtype=bool)
    starts, ends = offs[:-1], offs[1:]
    mask = ends - starts >= 2
    mask &= np.take(data, starts, mode="clip") == ord("{")
    mask &= np.take(data, ends - 1, mode="clip") == ord("}")
    if lines.null_count:
        mask &= lines.is_valid().to_numpy(zero_copy_only=False)
    return mask


def parse_json_lines(
    lines: pa.Array | list[str | None], stats: JsonStats | None = None
) -> ParsedLines:
    """Parse Istio JSON access-log lines; exactly the per-line reference's result, faster.

    ``stats``, when given, is updated with how the lines were read.
    """
    if not isinstance(lines, pa.Array):
        lines = pa.array(lines, pa.string())
    if lines.type == pa.large_string():
        lines = lines.cast(pa.string())
    n = len(lines)
    out = _Collector(n, stats if stats is not None else JsonStats())
    if n == 0:
        return out.result()
    # Lines Arrow can be trusted to keep one row per line: '{' first and '}' last.
    cand_np = _braced(lines)
    fast_idx = np.flatnonzero(cand_np)
    if len(fast_idx) < n:
        slow_idx = np.flatnonzero(~cand_np)
        out.per_line(lines.take(pa.array(slow_idx)).to_pylist(), slow_idx)
    if len(fast_idx):
        sub = lines if len(fast_idx) == n else lines.take(pa.array(fast_idx))
        joined = pc.binary_join_element_wise(sub, "\n", "")
        _FastReader(joined, out, fast_idx).run(0, len(fast_idx))
    if out.stats.failed_reads:
        log.debug("JSON lines: %s", out.stats)
    return out.result()
