"""The compiled kernels, or None without them.

``textcut`` is the TEXT path's kernel (``observe/_textcut.c``), ``pcapcut`` the packet
capture reader's and tracker's (``observe/_pcapcut.c``). Both are optional extensions: an
install without a C compiler still works, and every caller falls back to its numpy/Arrow
path, which gives the same results (``tests/observe/test_textcut.py`` and
``tests/observe/test_pcapcut.py`` check that they agree).
"""

from __future__ import annotations

from typing import Any

textcut: Any  # a C module without stubs, or None
try:
    from observe import _textcut as textcut  # type: ignore[attr-defined,no-redef]
except ImportError:  # pragma: no cover - a build without a C compiler
    textcut = None

pcapcut: Any  # a C module without stubs, or None
try:
    from observe import _pcapcut as pcapcut  # type: ignore[attr-defined,no-redef]
except ImportError:  # pragma: no cover - a build without a C compiler
    pcapcut = None
