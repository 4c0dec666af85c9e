"""The learned model: scikit-learn conventions, outlier windows, explanations in words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from learn.anomaly import FEATURES, WindowAnomalyDetector, detect_anomalies, window_features
from learn.baseline import learn_baseline, prepare
from observe.schema import conform

DAY1 = datetime(2024, 6, 3, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


def _normal(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4))


@pytest.mark.parametrize("method", ["iforest", "lof"])
def test_estimator_follows_scikit_learn_conventions(method: str) -> None:
    est = WindowAnomalyDetector(method=method, contamination=0.05, random_state=7)
    assert est.get_params()["random_state"] == 7 and est.get_params()["method"] == method
    with pytest.raises(NotFittedError):
        est.predict(_normal(3, 0))
    X = _normal(300, 1)
    assert est.fit(X) is est
    learned = [k for k in vars(est) if k.endswith("_") and not k.startswith("_")]
    assert {"center_", "scale_", "model_", "n_features_in_"} <= set(learned)
    fresh = clone(est)
    assert not hasattr(fresh, "model_") and fresh.get_params() == est.get_params()
    far = np.array([[9.0, -9.0, 9.0, 9.0], [0.1, 0.0, -0.1, 0.0]])
    assert list(est.predict(far)) == [-1, 1]
    assert est.score_samples(far)[0] < est.score_samples(far)[1]
    # same random_state, same scores
    again = WindowAnomalyDetector(method=method, contamination=0.05, random_state=7).fit(X)
    assert np.array_equal(again.decision_function(X), est.decision_function(X))
    with pytest.raises(ValueError, match="expected 4 features"):
        est.predict(np.zeros((1, 3)))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        WindowAnomalyDetector(method="svm").fit(_normal(20, 0))


def rec(at: datetime, src: str, dst: str, **kw: Any) -> dict[str, Any]:
    row = {"time": at, "src_workload": src, "dst_workload": dst, "dst_port": 8080,
           "protocol": "http", "method": "GET", "path": "/items/1", "status": 200,
           "response_flags": "-", "bytes_in": 300, "bytes_out": 3000, "mtls": "mtls",
           "direction": "inbound", "origin": f"{dst}.log:{int(at.timestamp()) % 100000}"}
    row.update(kw)
    return row


def traffic(day: datetime, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Two steady edges: ~6 requests a minute and ~2 a minute."""
    rows = []
    for m in range(24 * 60):
        t = day + timedelta(minutes=m)
        rows += [rec(t + timedelta(seconds=int(s)), "shop/web", "shop/api")
                 for s in rng.integers(0, 60, rng.poisson(6))]
        rows += [rec(t + timedelta(seconds=int(s)), "shop/web", "shop/cart", path="/cart")
                 for s in rng.integers(0, 60, rng.poisson(2))]
    return rows


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return prepare(pa.Table.from_batches([conform(pa.Table.from_pylist(rows))]))


def test_features_per_edge_window() -> None:
    rows = [rec(DAY1 + timedelta(minutes=m), "a/x", "a/y") for m in range(3)]
    rows.append(rec(DAY1 + timedelta(minutes=4), "a/x", "a/y", status=500, path="/new/1"))
    base = learn_baseline(frame(rows[:3]))
    feats = window_features(frame(rows), base)
    assert len(feats) == 1
    row = feats.iloc[0]
    assert row["requests"] == 4 and row["operations"] == 2 and row["peers"] == 1
    assert row["up_bytes"] == 1200 and row["up_per_request"] == 300
    # shares shrink by a pseudo-count of 10: 1 / (4 + 10)
    assert row["error_ratio"] == pytest.approx(1 / 14)
    assert row["new_operation_share"] == pytest.approx(1 / 14)
    assert set(FEATURES) <= set(feats.columns)


@pytest.mark.parametrize("method", ["iforest", "lof"])
def test_error_burst_on_a_known_edge_is_found_and_explained(method: str) -> None:
    rng = np.random.default_rng(3)
    base = learn_baseline(frame(traffic(DAY1, rng)))
    new_rows = traffic(DAY2, rng)
    burst = DAY2 + timedelta(hours=14, minutes=2)
    new_rows += [rec(burst + timedelta(seconds=i), "shop/web", "shop/cart",
                     path=f"/admin/{['a', 'b', 'c', 'd'][i % 4]}x", status=404)
                 for i in range(400)]
    found = detect_anomalies(frame(new_rows), base, method=method, random_state=0)
    assert found, "the burst must be found"
    top = found[0]
    assert (top.source, top.destination, top.port) == ("shop/web", "shop/cart", 8080)
    assert top.start == pd.Timestamp(DAY2 + timedelta(hours=14))
    assert "shop/web -> shop/cart:8080 at 2024-06-04 14:00 UTC" in top.explanation
    assert "requests" in top.explanation and "%" in top.explanation
    assert top.evidence
    # the steady edge stays quiet
    assert all(a.destination != "shop/api" for a in found)
    # deterministic
    again = detect_anomalies(frame(new_rows), base, method=method, random_state=0)
    assert [(a.destination, a.start, a.explanation) for a in again] == [
        (a.destination, a.start, a.explanation) for a in found]


def test_too_little_baseline_learns_nothing() -> None:
    base = learn_baseline(frame([rec(DAY1, "a/x", "a/y")]))
    assert detect_anomalies(frame([rec(DAY2, "a/x", "a/y")]), base) == []
