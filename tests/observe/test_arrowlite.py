from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from observe import arrowlite

LOGS = Path(__file__).resolve().parents[1] / "data" / "envoy-logs"


def test_string_array_matches_pa_array() -> None:
    values = ["a", None, "", "héllo", "[2024-05-14T00:00:00.117Z]", None]
    got = arrowlite.string_array(values)
    want = pa.array(values, pa.string())
    assert got.type == pa.string()
    assert got.equals(want)
    assert got.null_count == 2
    assert arrowlite.string_array([]).equals(pa.array([], pa.string()))


def test_bool_and_int_arrays_with_validity() -> None:
    values = np.array([True, False, True, True, False, False, True, False, True])
    valid = np.array([True, True, False, True, True, True, True, True, False])
    got = arrowlite.bool_array(values, valid)
    assert got.equals(pa.array(values, pa.bool_(), mask=~valid))
    ints = np.array([5, -3, 70000, 0, 2**31 - 1], dtype=np.int64)
    mask = np.array([True, False, True, True, True])
    assert arrowlite.int_array(ints, pa.int32(), valid=mask).equals(
        pa.array(ints, pa.int32(), mask=~mask))
    assert arrowlite.int_array(ints).type == pa.int64()
    assert arrowlite.int_array(np.arange(3, dtype=np.int32)).type == pa.int32()
    with pytest.raises(ValueError):
        arrowlite.bool_array(values, valid[:3])


def test_scalars_equal_pa_scalar() -> None:
    assert arrowlite.string_scalar("-").equals(pa.scalar("-", pa.string()))
    assert arrowlite.bool_scalar(False).equals(pa.scalar(False))
    assert arrowlite.int_scalar(18, pa.int32()).equals(pa.scalar(18, pa.int32()))
    assert arrowlite.float_scalar(1e6).equals(pa.scalar(1e6, pa.float64()))
    assert arrowlite.null_scalar(pa.int64()).equals(pa.scalar(None, pa.int64()))
    assert not arrowlite.null_scalar().is_valid
    col = pa.array(["-", "x", None])
    assert pc.equal(col, arrowlite.string_scalar("-")).to_pylist() == [True, False, None]


@pytest.mark.parametrize("start", [0, 1, 3, 7, 8, 13])
def test_to_numpy_on_sliced_arrays(start: int) -> None:
    # Slices whose offset is not a multiple of 8 read bits from the middle of a byte.
    rng = np.random.default_rng(7)
    bools = [None if r < 0.2 else bool(r > 0.6) for r in rng.random(40)]
    ints = [None if r < 0.3 else int(r * 1000) for r in rng.random(40)]
    barr = pa.array(bools, pa.bool_()).slice(start, 20)
    iarr = pa.array(ints, pa.int32()).slice(start, 20)
    blist, ilist = barr.to_pylist(), iarr.to_pylist()
    assert arrowlite.to_bool(barr).tolist() == [bool(v) for v in blist]
    assert arrowlite.to_bool(barr, null=True).tolist() == [v is None or v for v in blist]
    assert arrowlite.validity(barr).tolist() == [v is not None for v in blist]
    got = arrowlite.to_int(iarr, null=-1)
    assert got.dtype == np.int32
    assert got.tolist() == [-1 if v is None else v for v in ilist]
    assert arrowlite.validity(iarr).tolist() == [v is not None for v in ilist]


def test_to_numpy_edge_cases() -> None:
    assert arrowlite.to_bool(pa.chunked_array([[True], [False, None]])).tolist() == [
        True, False, False]
    assert arrowlite.to_bool(pa.nulls(3, pa.bool_()), null=True).tolist() == [True] * 3
    assert arrowlite.to_bool(pa.array([], pa.bool_())).tolist() == []
    assert arrowlite.validity(pa.nulls(2, pa.string())).tolist() == [False, False]
    assert arrowlite.validity(pa.array(["a", "b"])).tolist() == [True, True]
    assert arrowlite.to_int(pa.array([], pa.int64())).tolist() == []
    with pytest.raises(TypeError):
        arrowlite.to_bool(pa.array([1, 2]))


def test_repeat_and_binary_array() -> None:
    assert arrowlite.repeat_string("tcp", 3).to_pylist() == ["tcp"] * 3
    assert arrowlite.repeat_string(None, 2).to_pylist() == [None, None]
    arr = arrowlite.binary_array(b"abcdef", np.array([1, 0, 2, 3]),
                                 valid=np.array([True, False, True, True]))
    assert arr.to_pylist() == ["a", None, "bc", "def"]


def test_helpers_do_not_import_pandas() -> None:
    code = (
        "import sys, numpy as np\n"
        "import pyarrow.compute as pc\n"
        "from observe import arrowlite as al\n"
        "s = al.string_array(['-', 'x', None])\n"
        "b = pc.fill_null(pc.equal(s, al.string_scalar('-')), al.bool_scalar(False))\n"
        "i = al.int_array(np.arange(3), valid=np.array([1, 0, 1], bool))\n"
        "out = al.to_bool(b).tolist(), al.to_int(i).tolist(), al.validity(s).tolist()\n"
        "print(out, 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "([True, False, False], [0, 0, 2], [True, True, False]) False"


@pytest.mark.parametrize("name", ["istio-docs-access-log-sleep-httpbin.log", "kiali-waypoint.log",
                                  "istio-docs-egress-control-2019-legacy-format.log"])
def test_observing_a_text_log_does_not_import_pandas(name: str, tmp_path: Path) -> None:
    # The whole CLI run: detect, read, classify, parse, map, write Parquet.
    out = tmp_path / "flows.parquet"
    code = (
        "import sys\n"
        "from meshwright.cli import main\n"
        f"rc = main(['observe', {str(LOGS / name)!r}, '-o', {str(out)!r}])\n"
        "print(rc, 'pandas' in sys.modules)\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert got == ["0", "False"]
    assert pq.read_table(out).num_rows > 0


def test_repeat_string_with_nulls_equals_pa_array() -> None:
    import numpy as np
    import pyarrow as pa

    from observe.arrowlite import repeat_string

    got = repeat_string("rbac", 4, np.array([True, False, False, True]))
    assert got.equals(pa.array(["rbac", None, None, "rbac"], pa.string()))
    assert repeat_string("x", 2).equals(pa.array(["x", "x"], pa.string()))
