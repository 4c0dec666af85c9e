"""`meshwright analyze --baseline / --baseline-window`: findings against a baseline, wired end
to end on the shipped sample; flagged traffic left out unless --include-flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshwright.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[2]


def _analyze(tmp: Path, *args: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return main(["analyze", "samples/bookinfo", "-q", *args, "-o", str(tmp)])


def test_baseline_window_and_previous_run(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert _analyze(first, "--baseline-window", "1h") == EXIT_OK
    rows = json.loads((first / "findings.json").read_text("utf-8"))
    # The sample's README: the legacy client appears after the first hour, the nightly job
    # runs once late in the window; both are new edges (medium: nothing sensitive).
    new = {r["id"]: r["severity"] for r in rows if r["kind"] == "new-edge"}
    assert new == {"new-edge:legacy/legacy-client->bookinfo/ratings-v1:9080": "medium",
                   "new-edge:bookinfo/nightly-report->bookinfo/details-v1:9080": "medium"}
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    sarif = json.loads((first / "findings.sarif").read_text("utf-8"))
    assert len(sarif["runs"][0]["results"]) == len(rows)
    # The same traffic against itself as baseline: nothing is new.
    second = tmp_path / "second"
    assert _analyze(second, "--baseline", str(first)) == EXIT_OK
    again = json.loads((second / "findings.json").read_text("utf-8"))
    assert not {r["kind"] for r in again} & {"new-edge", "scan", "exfiltration",
                                             "mtls-downgrade"}


@pytest.mark.parametrize(("args", "code"), [
    (["--baseline", "x", "--baseline-window", "1h"], EXIT_USAGE),
    (["--contamination", "0.9"], EXIT_USAGE),
    (["--contamination", "lots"], EXIT_USAGE),
    (["--baseline", "no/such/dir"], EXIT_INPUT),
    (["--baseline-window", "soon"], EXIT_INPUT),
])
def test_baseline_usage_errors(args: list[str], code: int, tmp_path: Path) -> None:
    assert _analyze(tmp_path / "o", *args) == code
