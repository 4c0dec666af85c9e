"""Arrow arrays and scalars built from buffers, and Arrow -> numpy without ``to_numpy``.

pyarrow imports pandas (~0.2 s of CPU, much of it serial at start-up) the first time a process
calls ``pa.array``, ``pa.scalar``, ``pa.table`` on Python lists, ``Array.to_numpy``,
``Array.to_pylist`` on some types or a compute function with a Python literal argument. The
observe paths need none of what pandas brings, so they build their arrays and scalars here:
from numpy buffers via ``pa.Array.from_buffers``, and read booleans, integers and validity
bitmaps back with ``np.frombuffer``. Scalars are one-element arrays indexed at 0, so they can
be passed to compute functions in place of Python literals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_STRING = pa.string()
_INT64 = pa.int64()
__all__ = [
    "as_array",
    "binary_array",
    "bool_array",
    "bool_scalar",
    "empty_table",
    "float_scalar",
    "int_array",
    "int_scalar",
    "null_scalar",
    "repeat_string",
    "string_array",
    "string_scalar",
    "to_bool",
    "to_int",
    "validity",
]

_NUMPY: dict[pa.DataType, type[np.generic]] = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32,
    pa.uint64(): np.uint64, pa.float64(): np.float64, pa.float32(): np.float32,
}


def as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (chunked arrays are combined)."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _bitmap(values: np.ndarray | None, n: int) -> tuple[pa.Buffer | None, int]:
    """A validity buffer for ``values`` (True: valid) and its null count; None when no nulls."""
    if values is None:
        return None, 0
    mask = np.asarray(values, dtype=bool)
    if len(mask) != n:
        raise ValueError(f"validity of length {len(mask)} for {n} values")
    nulls = n - int(np.count_nonzero(mask))
    if not nulls:
        return None, 0
    return pa.py_buffer(np.packbits(mask, bitorder="little")), nulls


def bool_array(values: np.ndarray | Sequence[bool], valid: np.ndarray | None = None
               ) -> pa.Array:
    """A boolean Arrow array of ``values`` (null where ``valid`` is False)."""
    data = np.asarray(values, dtype=bool)
    vbits, nulls = _bitmap(valid, len(data))
    return pa.Array.from_buffers(pa.bool_(), len(data), [vbits, pa.py_buffer(
        np.packbits(data, bitorder="little"))], null_count=nulls)


def int_array(values: np.ndarray | Sequence[int], typ: pa.DataType | None = None,
              valid: np.ndarray | None = None) -> pa.Array:
    """An integer (or float) Arrow array of ``values`` as ``typ`` (default: int64, or the
    numpy dtype's own width), null where ``valid`` is False."""
    if typ is None:
        arr = np.asarray(values)
        typ = pa.from_numpy_dtype(arr.dtype) if arr.dtype.kind in "iuf" else pa.int64()
    data = np.ascontiguousarray(values, dtype=_NUMPY[typ])
    vbits, nulls = _bitmap(valid, data.size)
    return pa.Array.from_buffers(typ, data.size, [vbits, pa.py_buffer(data)], null_count=nulls)


def binary_array(data: bytes | pa.Buffer, lengths: np.ndarray, typ: pa.DataType = _STRING,
                 valid: np.ndarray | None = None) -> pa.Array:
    """A string/binary array of consecutive pieces of ``data``, ``lengths`` bytes each."""
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    large = pa.types.is_large_string(typ) or pa.types.is_large_binary(typ)
    if not large and offs[-1] >= 1 << 31:
        raise ValueError("string column over 2 GiB")
    vbits, nulls = _bitmap(valid, len(lengths))
    obuf = pa.py_buffer(offs if large else offs.astype(np.int32))
    return pa.Array.from_buffers(typ, len(lengths), [vbits, obuf, pa.py_buffer(data)],
                                 null_count=nulls)


def string_array(values: Sequence[str | None], typ: pa.DataType = _STRING) -> pa.Array:
    """A string array of Python strings (None: null); what ``pa.array(values, typ)`` gives."""
    n = len(values)
    enc = [b"" if v is None else v.encode() for v in values]
    lengths = np.fromiter((len(b) for b in enc), dtype=np.int64, count=n)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    return binary_array(b"".join(enc), lengths, typ, valid)


def repeat_string(text: str | None, n: int, valid: np.ndarray | None = None) -> pa.Array:
    """``text`` n times (all null when ``text`` is None; null where ``valid`` is False)."""
    if text is None:
        return pa.nulls(n, pa.string())
    raw = text.encode()
    lengths = np.full(n, len(raw), dtype=np.int64)
    if valid is None:
        return binary_array(raw * n, lengths)
    keep = np.asarray(valid, dtype=bool)
    lengths[~keep] = 0
    return binary_array(raw * int(np.count_nonzero(keep)), lengths, _STRING, keep)


def string_scalar(value: str | None) -> pa.Scalar:
    """A string scalar, usable where a compute function would take a Python str."""
    return string_array([value])[0]


def null_scalar(typ: pa.DataType = _STRING) -> pa.Scalar:
    """The null scalar of ``typ`` (for ``pc.if_else(mask, col, <null>)``)."""
    return pa.nulls(1, typ)[0]


def bool_scalar(value: bool) -> pa.Scalar:
    return bool_array(np.array([value], dtype=bool))[0]


def int_scalar(value: int, typ: pa.DataType = _INT64) -> pa.Scalar:
    return int_array(np.array([value]), typ)[0]


def float_scalar(value: float) -> pa.Scalar:
    return int_array(np.array([value], dtype=np.float64), pa.float64())[0]


def empty_table(schema: pa.Schema) -> pa.Table:
    """``schema.empty_table()`` (one empty chunk per column) without its pandas import."""
    return pa.Table.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def validity(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where ``col`` is not null, as a numpy bool array."""
    arr = as_array(col)
    n, off = len(arr), arr.offset
    if arr.null_count == 0:
        return np.ones(n, dtype=bool)
    if arr.null_count == n or pa.types.is_null(arr.type):
        return np.zeros(n, dtype=bool)
    buf = arr.buffers()[0]
    if buf is None:  # pragma: no cover - null_count > 0 implies a bitmap for these types
        return np.ones(n, dtype=bool)
    bits = np.frombuffer(buf, dtype=np.uint8)
    return np.unpackbits(bits, count=off + n, bitorder="little")[off:].astype(bool)


def to_bool(col: pa.Array | pa.ChunkedArray, null: bool = False) -> np.ndarray:
    """A boolean column as numpy; nulls read as ``null``."""
    arr = as_array(col)
    n, off = len(arr), arr.offset
    if pa.types.is_null(arr.type):
        return np.full(n, null, dtype=bool)
    if not pa.types.is_boolean(arr.type):
        raise TypeError(f"expected a boolean column, got {arr.type}")
    buf = arr.buffers()[1]
    if n == 0 or buf is None:
        return np.full(n, null, dtype=bool)
    bits = np.frombuffer(buf, dtype=np.uint8)
    out = np.unpackbits(bits, count=off + n, bitorder="little")[off:].astype(bool)
    if arr.null_count:
        valid = validity(arr)
        out[~valid] = null
    return out


def to_int(col: pa.Array | pa.ChunkedArray, null: int = 0) -> np.ndarray:
    """An integer (or float) column as a numpy copy; nulls read as ``null``."""
    arr = as_array(col)
    dtype = _NUMPY[arr.type]
    n, off = len(arr), arr.offset
    buf = arr.buffers()[1]
    if n == 0 or buf is None:
        return np.full(n, null, dtype=dtype)
    out = np.frombuffer(buf, dtype=dtype)[off: off + n].copy()
    if arr.null_count:
        out[~validity(arr)] = null
    return out
