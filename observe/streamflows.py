"""Flow batches from streamed log lines: the parsing path of :mod:`observe.pipeline` fed with
(pod, container, lines) chunks instead of files.

Each :class:`observe.logstream.LogChunk` is one pod's proxy lines in order; its reporter is the
pod (``<ns>/<pod>``), so no path layout or prefix guessing is involved. Origins read
``kube:<ns>/<pod>/<container>:<n>`` with ``n`` the line's ordinal in that stream. Lines are
already de-duplicated by the streamer, so the pipeline's own dedupe is off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from observe import layouts
from observe.logstream import LogChunk
from observe.pipeline import InputPlan, ObserveOptions, ObserveStats, _Reader


def stream_flow_batches(chunks: Iterable[LogChunk], options: ObserveOptions,
                        stats: ObserveStats) -> Iterator[pa.RecordBatch]:
    """``FLOW_SCHEMA`` batches of the access lines in ``chunks``, counting in ``stats``
    (``lines``, ``ignored_lines`` for proxy diagnostics, ``malformed`` with samples)."""
    reader = _Reader(InputPlan(), options, stats)
    workers = min(options.workers, os.cpu_count() or 1)
    if workers > 1:
        reader.pool = ThreadPoolExecutor(workers, thread_name_prefix="meshwright-stream")
    seen: set[str] = set()
    try:
        for chunk in chunks:
            if not chunk.lines:
                continue
            key = chunk.key
            if key.name not in seen:
                seen.add(key.name)
                stats.files += 1
            stats.lines += len(chunk.lines)
            ref = layouts.PodRef(pod=key.pod, namespace=key.namespace, container=key.container)
            linenos = np.arange(chunk.first, chunk.first + len(chunk.lines), dtype=np.int64)
            yield from reader.process(pa.array(chunk.lines, type=pa.string()), linenos,
                                      key.name, ref, None)
        yield from reader.drain()
    finally:
        if reader.pool is not None:
            reader.pool.shutdown(wait=True, cancel_futures=True)
