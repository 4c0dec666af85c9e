"""Project-wide checks: import layers, lint and types are part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


def test_import_layers_hold() -> None:
    """meshwright -> emit -> learn -> observe, never back; kubernetes only in observe.kube."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = _run(exe)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_test_file_has_its_attribution_row() -> None:
    data = ROOT / "tests" / "data"
    text = (data / "ATTRIBUTION.md").read_text(encoding="utf-8")
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    files = {p.relative_to(data).as_posix() for p in data.rglob("*")
             if p.is_file() and p.name != "ATTRIBUTION.md"}
    assert files - rows == set(), "files copied into tests/data need a provenance row"
    assert rows - files == set(), "rows for files that are not there"
