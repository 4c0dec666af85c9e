"""Learned findings: edge windows that behave unlike the baseline.

Each edge (source, destination, port) is cut into time windows (30 minutes by default); each
window becomes one feature vector (:data:`FEATURES`). :class:`WindowAnomalyDetector`, a
scikit-learn estimator, is fit on the baseline's windows and scores the new ones; a window it
calls an outlier becomes an ``anomaly`` finding, explained by the features that deviate most
from that edge's own baseline, in plain words with numbers.

The model: IsolationForest (``method="iforest"``) was the first; LocalOutlierFactor with
``novelty=True`` (``method="lof"``) measured better on the scenario benchmark and is the
default (``benchmarks/scenario.py --compare-models``; ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.utils.validation import check_array, check_is_fitted

from learn.baseline import Baseline, robust_scale, window_start

#: Feature names, in column order.
FEATURES = (
    "requests", "up_per_request", "down_per_request", "up_bytes", "error_ratio",
    "operations", "new_operation_share", "peers", "requests_vs_edge", "hour_sin", "hour_cos",
)
#: Features an explanation may name (the hour is named only when the edge was never active
#: at that hour in the baseline).
_EXPLAINED = ("requests", "up_bytes", "up_per_request", "down_per_request", "error_ratio",
              "operations", "new_operation_share", "peers")
METHODS = ("iforest", "lof")
#: Measured better on benchmarks/scenario.py --compare-models (ROC AUC 0.965 vs 0.954; at the
#: default threshold 97% of LOF's flagged windows were attack windows, 37% of IsolationForest's).
DEFAULT_METHOD = "lof"
#: A window is reported only if some feature also deviates this many robust standard
#: deviations from the edge's own baseline (a model outlier with nothing to show is noise).
MIN_DEVIATION = 4.0
#: Windows with fewer requests are not reported (rules speak for rare traffic).
MIN_REQUESTS = 5
#: Pseudo-count added to the denominators of shares.
SHRINK = 10.0
#: Smallest spread assumed for a count or byte feature (log scale: x1.4) and for a share
#: (10 points), so an edge that never varied in the baseline is not 'deviating' at +1.
LOG_SCALE_FLOOR = 0.35
SHARE_SCALE_FLOOR = 0.1


class WindowAnomalyDetector(OutlierMixin, BaseEstimator):
    """Outlier detector over window feature vectors, following scikit-learn conventions.

    Features are centred and scaled robustly (median, 1.4826 MAD) on the training data, then
    an IsolationForest (``method="iforest"``) or a LocalOutlierFactor with ``novelty=True``
    (``method="lof"``) is fit. ``predict`` returns -1 for outliers and 1 for inliers;
    ``score_samples`` is higher for more normal windows.
    """

    def __init__(self, method: str = DEFAULT_METHOD, contamination: float | str = "auto",
                 n_estimators: int = 200, n_neighbors: int = 20,
                 random_state: int | None = 0) -> None:
        self.method = method
        self.contamination = contamination
        self.n_estimators = n_estimators
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> WindowAnomalyDetector:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        data = check_array(X, dtype=np.float64)
        self.n_features_in_ = data.shape[1]
        self.center_ = np.median(data, axis=0)
        mad = np.median(np.abs(data - self.center_), axis=0) * 1.4826
        self.scale_ = np.where(mad > 1e-9, mad, np.maximum(np.std(data, axis=0), 1.0))
        scaled = (data - self.center_) / self.scale_
        model: IsolationForest | LocalOutlierFactor
        if self.method == "iforest":
            model = IsolationForest(n_estimators=self.n_estimators,
                                    contamination=self.contamination,
                                    random_state=self.random_state)
        else:
            model = LocalOutlierFactor(n_neighbors=min(self.n_neighbors, len(data) - 1),
                                       contamination=self.contamination, novelty=True)
        self.model_ = model.fit(scaled)
        return self

    def _scaled(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        data = check_array(X, dtype=np.float64)
        if data.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {data.shape[1]}")
        return np.asarray((data - self.center_) / self.scale_)

    def score_samples(self, X: Any) -> np.ndarray:
        scaled = self._scaled(X)  # checks that fit ran first
        return np.asarray(self.model_.score_samples(scaled))

    def decision_function(self, X: Any) -> np.ndarray:
        scaled = self._scaled(X)
        return np.asarray(self.model_.decision_function(scaled))

    def predict(self, X: Any) -> np.ndarray:
        return np.where(self.decision_function(X) < 0, -1, 1)


def window_features(frame: pd.DataFrame, baseline: Baseline) -> pd.DataFrame:
    """One row per (src, dst, port, window) of ``frame``: the key columns, ``FEATURES``, and
    ``first_origin``/``origins`` (evidence) and ``hour``."""
    if frame.empty:
        return pd.DataFrame(columns=["src", "dst", "port", "w", *FEATURES, "hour", "origins"])
    f = frame.assign(w=window_start(frame["time"], baseline.window))
    known_ops = {k: e.ops for k, e in baseline.edges.items()}
    keys = list(zip(f["src"], f["dst"], f["port"], strict=True))
    f = f.assign(new_op=[op not in known_ops.get(k, frozenset()) and op != "-"
                         for k, op in zip(keys, f["op"], strict=True)])
    g = f.groupby(["src", "dst", "port", "w"], sort=True)
    out = g.agg(requests=("op", "size"), up_bytes=("up", "sum"), down=("down", "sum"),
                errors=("error", "sum"), operations=("op", "nunique"),
                new_ops=("new_op", "sum"),
                origins=("origin", lambda s: list(s.iloc[:3]))).reset_index()
    peers = f.drop_duplicates(["src", "w", "dst", "port"]).groupby(["src", "w"]).size()
    out["peers"] = [int(peers.get((s, w), 1)) for s, w in zip(out["src"], out["w"], strict=True)]
    n = out["requests"].astype(float)
    out["up_per_request"] = out["up_bytes"] / n
    out["down_per_request"] = out["down"] / n
    # Shares shrink towards 0 in quiet windows: 1 failure in 2 requests at night is not news.
    out["error_ratio"] = out["errors"] / (n + SHRINK)
    out["new_operation_share"] = out["new_ops"] / (n + SHRINK)
    out["hour"] = out["w"].dt.hour + out["w"].dt.minute / 60
    out["hour_sin"] = np.sin(2 * math.pi * out["hour"] / 24)
    out["hour_cos"] = np.cos(2 * math.pi * out["hour"] / 24)
    out["requests_vs_edge"] = 0.0
    return out


def _log_columns(rows: pd.DataFrame) -> np.ndarray:
    """The model's matrix: counts and bytes on a log scale."""
    cols = []
    for name in FEATURES:
        v = rows[name].to_numpy(dtype=float)
        if name in ("requests", "up_per_request", "down_per_request", "up_bytes", "operations",
                    "peers"):
            v = np.log1p(v)
        cols.append(v)
    return np.column_stack(cols)


@dataclass
class Anomaly:
    """One outlier window, with its explanation."""

    source: str
    destination: str
    port: int
    start: pd.Timestamp
    score: float
    """How far below the model's threshold (higher: more anomalous)."""
    explanation: str
    deviations: dict[str, float]
    """Robust z-scores of the named features against the edge's baseline."""
    evidence: list[str]


def _relative(rows: pd.DataFrame, ref: pd.DataFrame) -> np.ndarray:
    """``requests_vs_edge``: log requests minus the median of the edge's baseline windows
    (the source's, for an edge the baseline never saw)."""
    med_edge = np.log1p(ref.groupby(["src", "dst", "port"])["requests"].median())
    med_src = np.log1p(ref.groupby("src")["requests"].median())
    glob = float(np.log1p(ref["requests"].median())) if len(ref) else 0.0
    out = np.empty(len(rows))
    for i, (s, d, p, n) in enumerate(zip(rows["src"], rows["dst"], rows["port"],
                                         rows["requests"], strict=True)):
        base = med_edge.get((s, d, p))
        if base is None:
            base = med_src.get(s, glob)
        out[i] = math.log1p(n) - float(base)
    return out


def score_windows(new: pd.DataFrame, baseline: Baseline, *, method: str = DEFAULT_METHOD,
                  contamination: float | str = "auto", random_state: int | None = 0,
                  ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(baseline windows, new windows with the model's ``decision``: negative = outlier),
    or None when the baseline has fewer than 10 windows or ``new`` is empty."""
    ref = window_features(baseline.frame, baseline)
    if len(ref) < 10 or new.empty:
        return None
    ref["requests_vs_edge"] = _relative(ref, ref)
    cur = window_features(new, baseline)
    cur["requests_vs_edge"] = _relative(cur, ref)
    model = WindowAnomalyDetector(method=method, contamination=contamination,
                                  random_state=random_state).fit(_log_columns(ref))
    cur["decision"] = model.decision_function(_log_columns(cur))
    return ref, cur


def detect_anomalies(new: pd.DataFrame, baseline: Baseline, *, method: str = DEFAULT_METHOD,
                     contamination: float | str = "auto", random_state: int | None = 0,
                     min_deviation: float = MIN_DEVIATION,
                     quiet: Sequence[tuple[str, pd.Timestamp, pd.Timestamp]] = ()
                     ) -> list[Anomaly]:
    """Outlier windows of ``new`` against a model fit on ``baseline``'s windows, worst window
    per edge, most anomalous first. Only edges the baseline saw, windows with at least
    :data:`MIN_REQUESTS` records, and windows where some feature deviates ``min_deviation``
    robust standard deviations from the edge's own baseline windows are reported; windows of a
    ``quiet`` (source, start, end) span are not (a scan explains them). Empty when the
    baseline has too few windows to learn from (fewer than 10)."""
    scored = score_windows(new, baseline, method=method, contamination=contamination,
                           random_state=random_state)
    if scored is None:
        return []
    ref, cur = scored
    decision = cur["decision"].to_numpy()
    flagged = np.flatnonzero(decision < 0)
    found: dict[tuple[str, str, int], Anomaly] = {}
    by_edge = {k: v for k, v in ref.groupby(["src", "dst", "port"])}
    for i in flagged:
        row = cur.iloc[int(i)]
        key = (str(row["src"]), str(row["dst"]), int(row["port"]))
        hist = by_edge.get(key)
        if hist is None or int(row["requests"]) < MIN_REQUESTS:
            continue  # edges the baseline never saw are the new-edge rule's
        end = row["w"] + pd.Timedelta(baseline.window)
        if any(src == key[0] and row["w"] < until and start < end
               for src, start, until in quiet):
            continue
        words, devs = explain(row, hist, baseline)
        if not devs or max(abs(v) for v in devs.values()) < min_deviation:
            continue
        score = float(-decision[int(i)])
        old = found.get(key)
        if old is None or score > old.score:
            found[key] = Anomaly(key[0], key[1], key[2], row["w"], score, words, devs,
                                 list(row["origins"]))
    return sorted(found.values(), key=lambda a: (-a.score, a.source, a.destination, a.port))


def _mb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} kB"
    return f"{n:.0f} B"


def explain(row: pd.Series, hist: pd.DataFrame, baseline: Baseline) -> tuple[str, dict[str,
                                                                                     float]]:
    """Plain words for the (up to) two features of ``row`` that deviate most from ``hist``
    (the edge's baseline windows), and their robust z-scores."""
    devs: dict[str, float] = {}
    for name in _EXPLAINED:
        values = hist[name].to_numpy(dtype=float)
        x = float(row[name])
        if name in ("requests", "up_bytes", "up_per_request", "down_per_request",
                    "operations", "peers"):
            med, scale = robust_scale(np.log1p(values))
            devs[name] = (math.log1p(x) - med) / max(scale, LOG_SCALE_FLOOR)
        else:
            med, scale = robust_scale(values)
            devs[name] = (x - med) / max(scale, SHARE_SCALE_FLOOR)
    top = sorted(devs, key=lambda k: (-abs(devs[k]), k))[:2]
    minutes = int(baseline.window.total_seconds() // 60)
    edge = f"{row['src']} -> {row['dst']}:{int(row['port'])}"
    when = f"{row['w'].strftime('%Y-%m-%d %H:%M')} UTC"
    parts = []
    for name in top:
        med = float(np.median(hist[name].to_numpy(dtype=float)))
        x = float(row[name])
        if name == "requests":
            parts.append(f"{int(x):,} requests in {minutes} min (baseline median {med:,.0f})")
        elif name == "up_bytes":
            per_hour = med * 60 / minutes
            parts.append(f"sent {_mb(x)} in {minutes} min (baseline {_mb(per_hour)}/h)")
        elif name == "up_per_request":
            parts.append(f"{_mb(x)} sent per request (baseline {_mb(med)})")
        elif name == "down_per_request":
            parts.append(f"{_mb(x)} received per request (baseline {_mb(med)})")
        elif name == "error_ratio":
            parts.append(f"{100 * x:.0f}% of requests failed or were rejected "
                         f"(baseline {100 * med:.1f}%)")
        elif name == "operations":
            parts.append(f"{int(x)} distinct method/path families (baseline {med:.0f})")
        elif name == "new_operation_share":
            parts.append(f"{100 * x:.0f}% of requests used paths never seen in the baseline")
        elif name == "peers":
            parts.append(f"the source reached {int(x)} destinations in the window "
                         f"(baseline {med:.0f})")
    hour = int(row["w"].hour)
    key = (str(row["src"]), str(row["dst"]), int(row["port"]))
    known = baseline.edges.get(key)
    if known is not None and hour not in known.hours:
        parts.append(f"active at {hour:02d}:00 UTC, an hour this edge is never seen in the "
                     "baseline")
    return f"{edge} at {when}: " + "; ".join(parts) + ".", {k: round(devs[k], 1) for k in top}
