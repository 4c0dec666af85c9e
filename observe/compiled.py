"""The compiled kernel of the TEXT path (``observe/_textcut.c``), or None without it.

The kernel is an optional extension: an install without a C compiler still works, and every
caller falls back to its numpy/Arrow path, which gives the same results
(``tests/observe/test_textcut.py`` checks that they agree).
"""

from __future__ import annotations

from typing import Any

textcut: Any  # a C module without stubs, or None
try:
    from observe import _textcut as textcut  # type: ignore[attr-defined,no-redef]
except ImportError:  # pragma: no cover - a build without a C compiler
    textcut = None
