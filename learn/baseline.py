"""The baseline new traffic is scored against: what each edge and source normally does.

A baseline is learned from resolved flows (the ``flows.parquet`` a previous ``analyze`` wrote
into its output directory, or any flows file whose identities are resolved), or from the
earliest part of the input itself (``--baseline-window 24h``: :func:`split_by_window`).

Records are counted the way the graph counts them: a request both sidecars logged is counted
once (the client's copy is dropped when the server's proxy reported too). Everything here is
columnar (pandas/pyarrow group-bys); Python loops run over edges and sources, not records.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from learn import paths
from observe.errors import InputError
from observe.flows_io import read_flows
from observe.schema import FAILED_STATES, KIND_CONNECTION

if TYPE_CHECKING:
    from observe.inventory import Inventory

#: Envoy response flags that mean the connection to the upstream failed or was refused:
#: what a scanner's probes to closed ports and unrouted addresses produce.
FAILURE_FLAGS = frozenset({"UF", "URX", "UH", "NR", "NC", "UO", "UT", "UC", "LR", "UMSDR"})
#: Default window for per-window statistics (exfiltration, anomaly features).
DEFAULT_WINDOW = timedelta(minutes=30)
#: Window in which a scan's distinct targets are counted.
SCAN_WINDOW = timedelta(minutes=10)

#: Columns the detectors read (a subset of the flow schema).
COLUMNS = ["time", "direction", "reporter", "src_ip", "dst_ip", "dst_port", "src_workload",
           "dst_workload", "dst_pod", "protocol", "method", "path", "status", "response_flags",
           "bytes_in", "bytes_out", "mtls", "denied", "origin", "kind", "tcp_state", "tcp_end",
           "authority", "service_host"]


def _flag_failed(flags: pd.Series) -> pd.Series:
    """True where an Envoy response-flags value names a connection failure."""
    uniq = flags.dropna().unique()
    failing = {f for f in uniq if any(p in FAILURE_FLAGS for p in str(f).split(","))}
    return flags.isin(failing)


def operation_family(method: str | None, path: str | None, protocol: str | None) -> str:
    """A coarse operation family for 'new method/path on an old edge': method plus the first
    two segments of the path family (``GET /api/v2``); TCP streams are ``-``."""
    if path is None or protocol not in ("http", "grpc"):
        return "-"
    fam = paths.path_family(path, protocol)
    segs = [s for s in fam.split("/") if s][:2]
    return f"{method or '-'} /" + "/".join(segs)


def prepare(table: pa.Table) -> pd.DataFrame:
    """The records to count, one row each, with derived columns.

    Columns: ``time`` (UTC), ``src``, ``dst``, ``port``, ``protocol``, ``op`` (operation
    family), ``status``, ``up`` (bytes client->server), ``down``, ``mtls``, ``failed``
    (connection never carried traffic, refused, reset or an Envoy failure flag), ``denied``,
    ``error`` (failed, denied, 4xx/5xx), ``origin``, ``dst_ip``, ``target`` (what a scan
    probes: the destination node, or its address when unresolved).
    Client copies of requests the server's proxy also logged are dropped; records without a
    destination port are dropped (they cannot belong to an edge).
    """
    present = [c for c in COLUMNS if c in table.column_names]
    table = table.select(present)
    if "direction" in present and "dst_pod" in present and "reporter" in present:
        inbound = table.filter(pc.fill_null(pc.equal(table["direction"], "inbound"), False))
        reporters = [r for r in pc.unique(inbound["reporter"]).to_pylist() if r]
        if reporters:
            mirrored = pc.and_(pc.equal(table["direction"], "outbound"),
                               pc.is_in(table["dst_pod"], value_set=pa.array(reporters)))
            if "response_flags" in present:
                # A connection that failed never reached the server: no server copy exists.
                flags = pc.fill_null(table["response_flags"], "-")
                failed = pc.is_in(flags, value_set=pa.array(sorted(
                    {f for f in pc.unique(flags).to_pylist()
                     if any(p in FAILURE_FLAGS for p in str(f).split(","))}), pa.string()))
                mirrored = pc.and_(mirrored, pc.invert(failed))
            table = table.filter(pc.invert(pc.fill_null(mirrored, False)))
    frame = table.to_pandas()
    for col in COLUMNS:
        if col not in frame:
            frame[col] = None
    frame = frame[frame["dst_port"].notna()]
    if frame.empty:
        return _empty()
    src = frame["src_workload"].fillna("unknown:" + frame["src_ip"].fillna("?").astype(str))
    dst_ip = frame["dst_ip"].fillna("?").astype(str)
    dst = frame["dst_workload"].fillna("unknown:" + dst_ip)
    protocol = frame["protocol"].fillna("tcp").astype(str)
    ops = pd.Series("-", index=frame.index, dtype=object)
    http = protocol.isin(("http", "grpc")) & frame["path"].notna()
    if http.any():
        keys = pd.Series(list(zip(frame.loc[http, "method"], frame.loc[http, "path"],
                                  protocol[http], strict=True)), index=frame.index[http])
        mapping = {k: operation_family(*k) for k in keys.unique()}
        ops[http] = keys.map(mapping)
    status = frame["status"].fillna(0).astype("int64")
    failed = (frame["tcp_state"].isin(FAILED_STATES) | (frame["tcp_end"] == "rst")
              | _flag_failed(frame["response_flags"]))
    denied = frame["denied"].fillna(False).astype(bool) | (status == 403)
    out = pd.DataFrame({
        "time": pd.to_datetime(frame["time"], utc=True),
        "src": src.astype(str),
        "dst": dst.astype(str),
        "port": frame["dst_port"].astype("int64"),
        "protocol": protocol,
        "op": ops,
        "status": status,
        "up": frame["bytes_in"].fillna(0).astype("int64"),
        "down": frame["bytes_out"].fillna(0).astype("int64"),
        "mtls": frame["mtls"].fillna("unknown").astype(str),
        "failed": failed.astype(bool),
        "denied": denied.astype(bool),
        "is_conn": (frame["kind"] == KIND_CONNECTION).astype(bool),
        "origin": frame["origin"].fillna("").astype(str),
        "dst_ip": dst_ip,
        "host": frame["authority"].fillna(frame["service_host"]),
    })
    out["error"] = out["failed"] | out["denied"] | (out["status"] >= 400)
    out = out[out["time"].notna()]
    return out.sort_values(["time", "origin"], kind="stable").reset_index(drop=True)


def _empty() -> pd.DataFrame:
    return pd.DataFrame({
        "time": pd.Series([], dtype="datetime64[us, UTC]"), "src": [], "dst": [],
        "port": pd.Series([], dtype="int64"), "protocol": [], "op": [],
        "status": pd.Series([], dtype="int64"), "up": pd.Series([], dtype="int64"),
        "down": pd.Series([], dtype="int64"), "mtls": [], "failed": pd.Series([], dtype=bool),
        "denied": pd.Series([], dtype=bool), "is_conn": pd.Series([], dtype=bool),
        "origin": [], "dst_ip": [], "host": [], "error": pd.Series([], dtype=bool),
    })


def window_start(times: pd.Series, window: timedelta) -> pd.Series:
    """Each time floored to its window (windows aligned to the epoch, UTC)."""
    return times.dt.floor(pd.Timedelta(window))


@dataclass
class EdgeBaseline:
    """What one edge (source, destination, port) did in the baseline."""

    requests: int = 0
    mtls: int = 0
    plaintext: int = 0
    up_bytes: int = 0
    ops: frozenset[str] = frozenset()
    hours: frozenset[int] = frozenset()


@dataclass
class Baseline:
    """Per-edge and per-source statistics of the baseline traffic, plus its records."""

    frame: pd.DataFrame
    """The prepared baseline records (:func:`prepare`)."""
    window: timedelta = DEFAULT_WINDOW
    scan_window: timedelta = SCAN_WINDOW
    start: datetime | None = None
    end: datetime | None = None
    edges: dict[tuple[str, str, int], EdgeBaseline] = field(default_factory=dict)
    peak_up: dict[tuple[str, str], int] = field(default_factory=dict)
    """Largest upload (bytes client->server) from a source to one destination in a window."""
    source_peak_up: dict[str, int] = field(default_factory=dict)
    """Largest upload from a source to any single destination in a window."""
    source_peak_targets: dict[str, int] = field(default_factory=dict)
    """Most distinct (destination, port) pairs a source reached in one scan window."""
    destinations: frozenset[str] = frozenset()
    """Every destination node seen (external peers included)."""

    @property
    def hours(self) -> float:
        """Length of the baseline in hours (at least one window)."""
        if self.start is None or self.end is None:
            return self.window.total_seconds() / 3600
        span = max((self.end - self.start).total_seconds(), self.window.total_seconds())
        return span / 3600

    @property
    def windows(self) -> float:
        """How many windows the baseline spans."""
        return max(1.0, self.hours * 3600 / self.window.total_seconds())


def learn_baseline(frame: pd.DataFrame, *, window: timedelta = DEFAULT_WINDOW,
                   scan_window: timedelta = SCAN_WINDOW) -> Baseline:
    """The baseline statistics of prepared records (:func:`prepare`)."""
    base = Baseline(frame=frame, window=window, scan_window=scan_window)
    if frame.empty:
        return base
    base.start = frame["time"].min().to_pydatetime()
    base.end = frame["time"].max().to_pydatetime()
    base.destinations = frozenset(frame["dst"].unique())
    ok = frame[~frame["failed"]]
    grouped = ok.assign(
        is_mtls=ok["mtls"] == "mtls", is_plain=ok["mtls"] == "plaintext",
        hour=ok["time"].dt.hour,
    ).groupby(["src", "dst", "port"], sort=True)
    totals = grouped.agg(requests=("is_mtls", "size"), mtls=("is_mtls", "sum"),
                         plaintext=("is_plain", "sum"), up=("up", "sum"))
    ops = grouped["op"].agg(lambda s: frozenset(s.unique()))
    hours = grouped["hour"].agg(lambda s: frozenset(int(h) for h in s.unique()))
    for key, row in totals.iterrows():
        src, dst, port = key
        base.edges[(str(src), str(dst), int(port))] = EdgeBaseline(
            requests=int(row["requests"]), mtls=int(row["mtls"]),
            plaintext=int(row["plaintext"]), up_bytes=int(row["up"]),
            ops=ops[key], hours=hours[key],
        )
    win = frame.assign(w=window_start(frame["time"], window))
    up = win.groupby(["src", "dst", "w"], sort=False)["up"].sum()
    peak = up.groupby(level=[0, 1]).max()
    base.peak_up = {(str(s), str(d)): int(v) for (s, d), v in peak.items()}
    src_peak = peak.groupby(level=0).max()
    base.source_peak_up = {str(s): int(v) for s, v in src_peak.items()}
    win = frame.assign(w=window_start(frame["time"], scan_window))
    targets = win.drop_duplicates(["src", "w", "dst", "port"]).groupby(
        ["src", "w"], sort=False).size().groupby(level=0).max()
    base.source_peak_targets = {str(s): int(v) for s, v in targets.items()}
    return base


def read_resolved(path: Path) -> pa.Table:
    """All records of a flows file (the columns the detectors read)."""
    batches = list(read_flows(path, columns=[c for c in COLUMNS]))
    if not batches:
        return pa.table({c: pa.array([], type=pa.string()) for c in COLUMNS})
    return pa.Table.from_batches(batches)


def _is_resolved(table: pa.Table) -> bool:
    if table.num_rows == 0:
        return True
    return bool(table["dst_workload"].null_count < table.num_rows)


def load_baseline_flows(path: Path, inventory: Inventory | None = None, *,
                        trust_domain: str = "cluster.local") -> pa.Table:
    """Resolved baseline records from a previous output directory (its ``flows.parquet``) or
    a flows file. A flows file straight from ``meshwright observe`` (identities not resolved
    yet) is resolved with ``inventory``; without one it is refused."""
    src = path / "flows.parquet" if path.is_dir() else path
    if not src.exists():
        raise InputError(
            "baseline not found" if not path.is_dir() else "no flows.parquet in the baseline "
            "directory", origin=str(path),
            hint="--baseline names a previous output directory or a flows file")
    table = read_resolved(src)
    if _is_resolved(table):
        return table
    if inventory is None:
        raise InputError("the baseline flows carry no resolved identities", origin=str(src),
                         hint="pass a previous output directory (its flows.parquet is "
                              "resolved) or an inventory")
    from learn.pipeline import learn_graph  # the pipeline imports nothing from here

    with tempfile.TemporaryDirectory(prefix="meshwright-baseline-") as tmp:
        out = Path(tmp) / "resolved.parquet"
        learn_graph(src, inventory, trust_domain=trust_domain, resolved_out=out)
        return read_resolved(out)


def split_by_window(frame: pd.DataFrame, span: timedelta) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records within ``span`` of the earliest record, the rest): ``--baseline-window``."""
    if frame.empty:
        return frame, frame
    cut = frame["time"].min() + pd.Timedelta(span)
    early = frame["time"] < cut
    return frame[early].reset_index(drop=True), frame[~early].reset_index(drop=True)


def parse_span(text: str) -> timedelta:
    """``90m``, ``24h``, ``2d``, ``3600s`` -> a timedelta (for ``--baseline-window``)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = text[:-1], text[-1:].lower()
    try:
        amount = float(value)
    except ValueError:
        amount = math.nan
    if unit not in units or not math.isfinite(amount) or amount <= 0:
        raise InputError(f"not a duration: {text!r}", hint="e.g. 24h, 90m, 2d")
    return timedelta(seconds=amount * units[unit])


def merge_frames(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Prepared records of several tables, in time order."""
    parts = [f for f in frames if not f.empty]
    if not parts:
        return _empty()
    return pd.concat(parts, ignore_index=True).sort_values(
        ["time", "origin"], kind="stable").reset_index(drop=True)


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, scale) with scale = 1.4826 MAD, floored so constant series do not divide by 0."""
    if values.size == 0:
        return 0.0, 1.0
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med, max(mad, 0.1 * abs(med), 1e-3)
