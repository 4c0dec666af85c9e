"""Observe: user-named paths -> flow record batches, with stats on everything not turned
into a record.

:func:`plan_inputs` walks and classifies the paths by content (access logs in any layout of
:mod:`observe.layouts`, inventories, flows Parquet files); :func:`iter_flows` streams
``FLOW_SCHEMA`` batches from the plan's logs and flows files, filling :class:`ObserveStats`:
lines read, records made, proxy diagnostics ignored, malformed access lines (with
``file:line: reason`` samples), duplicates dropped (see :class:`observe.inputs.Deduper`),
files skipped.

Per chunk of lines (~4 MiB): layout prefixes are stripped vectorized, lines are classified
(Istio TEXT/JSON and linkerd-proxy apache/JSON access candidates vs. proxy diagnostics),
deduped by 64-bit hash, parsed by :mod:`observe.envoy_format` and mapped by
:mod:`observe.istio` (Linkerd lines: parsed and mapped by :mod:`observe.linkerd`). Memory is
bounded by the chunk size plus the dedupe keys (8 bytes per distinct access line).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from observe import arrowlite, envoy_format, istio, layouts, linkerd
from observe.capture import SOURCE_PCAP, CaptureMapper, capture_batches
from observe.errors import InputError
from observe.flows_io import read_flows
from observe.inputs import (
    CAPTURE,
    CRI,
    ENVELOPE,
    FLOWS,
    INVENTORY,
    LOGS,
    STDIN,
    TEXT,
    Deduper,
    classify_paths,
    detect,
    display,
    hash_lines,
    iter_chunks,
    open_input,
    truncated,
)
from observe.pcap import CaptureStats

log = logging.getLogger(__name__)

MAX_SAMPLES = 10
SOURCE_TEXT = "istio-text"
SOURCE_JSON = "istio-json"
SOURCE_CUSTOM = "envoy-custom"
SOURCE_LINKERD_APACHE = linkerd.SOURCE_APACHE
SOURCE_LINKERD_JSON = linkerd.SOURCE_JSON
_LINKERD_SOURCES = (SOURCE_LINKERD_APACHE, SOURCE_LINKERD_JSON)


@dataclass
class ObserveOptions:
    envoy_format: str | None = None
    """A user's Envoy access-log format string (``--envoy-format``); None: Istio's."""
    known_pods: frozenset[tuple[str, str]] = frozenset()
    """``(namespace, pod)`` from the inventory: picks the right path components."""
    batch_lines: int = 65536
    progress: Callable[[int, int], None] | None = None
    """Called with ``(bytes done, bytes total)`` after each chunk (total 0: unknown)."""
    workers: int = 2
    """Threads parsing chunks (capped by the CPU count; 1: all on the caller's thread)."""


@dataclass
class ObserveStats:
    files: int = 0
    """Input files read (logs, stdin and flows files)."""
    lines: int = 0
    """Physical lines read from logs (CRI fragments and envelopes count one each)."""
    records: int = 0
    """Flow records yielded."""
    ignored_lines: int = 0
    """Lines that are not access logs (proxy diagnostics, blank lines)."""
    malformed: int = 0
    """Lines that look like access logs (or records of a layout) but don't parse."""
    malformed_samples: list[str] = field(default_factory=list)
    """Up to 10 ``file:line: reason``."""
    duplicates: int = 0
    """Access lines dropped because the same pod's same line was already read."""
    by_source: dict[str, int] = field(default_factory=dict)
    """Records per ``source`` value."""
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of files not (fully) read."""
    packets: int = 0
    """IP packets decoded from captures."""
    packets_skipped: dict[str, int] = field(default_factory=dict)
    """Capture records not decoded, per reason (non-IP frame, unsupported link type, ...)."""
    capture_warnings: list[str] = field(default_factory=list)
    """Damage in captures (truncated records, bad blocks), ``file:packet N: message``."""
    connections: int = 0
    """Connection records made from packets."""
    failed_connections: int = 0
    """Of those, attempts that never carried traffic (refused, no answer)."""
    not_itemized: int = 0
    """Connections whose requests may not all have records (payload seen only in part)."""
    duplicate_copies: int = 0
    """Packets seen again on another interface of the same capture (``-i any``), not counted."""
    duplicate_connections: int = 0
    """Connections left out because another capture already gave them (both nodes captured)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["by_source"] = dict(sorted(self.by_source.items()))
        d["skipped_files"] = [list(s) for s in self.skipped_files]
        d["packets_skipped"] = dict(sorted(self.packets_skipped.items()))
        return d

    def malformed_line(self, origin: str, reason: str, count: int = 1) -> None:
        self.malformed += count
        if len(self.malformed_samples) < MAX_SAMPLES:
            self.malformed_samples.append(f"{origin}: {reason}")

    def add_records(self, source: str, n: int) -> None:
        self.records += n
        self.by_source[source] = self.by_source.get(source, 0) + n


@dataclass
class InputPlan:
    logs: list[Path | str] = field(default_factory=list)
    inventories: list[Path] = field(default_factory=list)
    flow_files: list[Path] = field(default_factory=list)
    captures: list[Path] = field(default_factory=list)
    """Packet captures (pcap, pcapng; gzip or zstd compressed or not)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    roots: dict[str, Path] = field(default_factory=dict)
    """Log file -> the directory argument it was found under (for path layouts)."""


def plan_inputs(paths: Sequence[str], *, envoy_format: str | None = None) -> InputPlan:
    """Walk ``paths`` and sort files by content into logs, inventories and flows files.

    ``-`` is standard input (always read as logs). A missing/unreadable path or a named file
    that is not recognised raises InputError; unrecognised files inside a directory are
    skipped with a reason. With a custom ``envoy_format`` any text file counts as a log.
    """
    found, skipped = classify_paths(paths, custom_format=envoy_format is not None)
    plan = InputPlan(skipped=skipped)
    seen: set[str] = set()
    for path, root, det in found:
        key = display(path) if path == STDIN else str(Path(path).resolve())
        if key in seen:
            continue  # the same file named twice (directly and via its directory)
        seen.add(key)
        if det.kind == LOGS:
            plan.logs.append(path)
            if root is not None:
                plan.roots[str(path)] = root
        elif det.kind == INVENTORY:
            plan.inventories.append(Path(path))
        elif det.kind == FLOWS:
            plan.flow_files.append(Path(path))
        elif det.kind == CAPTURE:
            plan.captures.append(Path(path))
    return plan


def _origins(name: str, linenos: np.ndarray) -> pa.Array:
    nums = pc.cast(arrowlite.int_array(linenos, pa.int64()), pa.string())
    return pc.binary_join_element_wise(arrowlite.string_scalar(name + ":"), nums,
                                       arrowlite.string_scalar(""))


def _constant(value: str | None, n: int) -> pa.Array:
    if value is None:
        return pa.nulls(n, type=pa.string())
    return pa.repeat(arrowlite.string_scalar(value), n)


#: Chunks parsed ahead of the consumer: bounds memory (each is <= batch_lines lines).
_IN_FLIGHT = 2


@dataclass
class _Result:
    source: str
    batches: list[pa.RecordBatch]
    malformed: int
    samples: list[tuple[str, str]]


@dataclass
class _Job:
    """Parse + map of one chunk's access lines: pure, so it runs on a worker thread."""

    lines: pa.StringArray | envoy_format.RawLines
    linenos: np.ndarray
    name: str
    reporters: pa.Array | None
    reporter: str | None
    source: str
    fmt: envoy_format.EnvoyFormat | None

    def run(self) -> _Result:
        if self.source in _LINKERD_SOURCES:
            assert isinstance(self.lines, pa.Array)
            parsed = linkerd.parse(self.lines, self.source)
        elif self.source == SOURCE_JSON:
            assert isinstance(self.lines, pa.Array)
            parsed = envoy_format.parse_json(self.lines)
        else:
            parsed = envoy_format.parse_text(
                self.lines, self.fmt, columns=istio.FIELDS_USED
            )
        good = np.asarray(parsed.good, dtype=bool)
        bad = int(len(good) - good.sum())
        samples: list[tuple[str, str]] = []
        if bad:
            reasons = dict(parsed.errors)
            for i in np.flatnonzero(~good)[:MAX_SAMPLES]:
                origin = f"{self.name}:{self.linenos[i]}"
                samples.append((origin, reasons.get(int(i), "unparsed access line")))
        keep = np.flatnonzero(good)
        if len(keep) == 0:
            return _Result(self.source, [], bad, samples)
        if len(keep) == len(good):
            rep = self.reporters
        else:
            rep = (self.reporters.take(arrowlite.int_array(keep))
                   if self.reporters is not None else None)
        if rep is None:
            rep = _constant(self.reporter, len(keep))
        if self.source in _LINKERD_SOURCES:
            batch = linkerd.to_flows(parsed.fields, reporter=rep,
                                     origin=_origins(self.name, self.linenos[keep]),
                                     source=self.source)
            return _Result(self.source, [batch], bad, samples)
        main, legs, _ = istio.flow_batches(
            parsed.fields,
            reporter=rep,
            origin=_origins(self.name, self.linenos[keep]),
            source=self.source,
            checked=self.source != SOURCE_JSON,
        )
        # A chunk's gateway downstream legs follow its other records (see flow_batches).
        return _Result(self.source, [main] if legs is None else [main, legs], bad, samples)


class _Reader:
    """State shared by the files of one ``iter_flows`` run.

    Chunks are read, classified and deduped in order on the caller's thread; parsing and
    mapping (numpy and Arrow kernels, which release the GIL) run on ``pool`` and their
    batches come back in submission order, so output and stats are the same as serially.
    """

    def __init__(self, plan: InputPlan, options: ObserveOptions, stats: ObserveStats):
        self.plan = plan
        self.options = options
        self.stats = stats
        self.fmt = (
            envoy_format.compile_format(options.envoy_format) if options.envoy_format else None
        )
        self.text_source = SOURCE_CUSTOM if self.fmt is not None else SOURCE_TEXT
        self.dedupe = Deduper() if len(plan.logs) > 1 else None
        self.total = sum(_size(p) for p in [*plan.logs, *plan.captures, *plan.flow_files])
        self.done = 0
        self.pool: ThreadPoolExecutor | None = None
        #: (5-tuple, client ISN) of every TCP connection read from a capture so far.
        self.capture_connections: set[tuple[object, ...]] = set()
        self.pending: deque[Future[_Result]] = deque()

    def progress(self, extra: int = 0) -> None:
        if self.options.progress is not None:
            self.options.progress(self.done + extra, self.total)

    # -- one log file -------------------------------------------------------------------

    def read_log(self, path: Path | str) -> Iterator[pa.RecordBatch]:
        name = display(path)
        root = self.plan.roots.get(str(path))
        known = self.options.known_pods
        ref = (
            layouts.PodRef()
            if path == STDIN
            else layouts.pod_from_path(path, root=root, known_pods=known)
        )
        self.stats.files += 1
        layout: str | None = None
        joiner = layouts.CriJoiner()
        read_lines = 0
        with open_input(path) as (stream, counter):
            chunks = iter_chunks(stream, max_lines=self.options.batch_lines)
            try:
                for raw, first in chunks:
                    read_lines = first + len(raw) - 1
                    self.stats.lines += len(raw)
                    if layout is None:
                        layout = _layout(raw.slice(0, 256).array())
                    if layout == TEXT:
                        linenos = np.arange(first, first + len(raw), dtype=np.int64)
                        yield from self.process(raw, linenos, name, ref, None, kubectl=True)
                        self.progress(counter.count)
                        continue
                    lines = raw.array()
                    if layout == CRI:
                        inner, linenos = joiner.feed(lines, first)
                        for no in joiner.malformed:
                            self.stats.malformed_line(f"{name}:{no}", "not a CRI log line")
                        joiner.malformed.clear()
                        yield from self.process(inner, linenos, name, ref, None)
                    elif layout == ENVELOPE:
                        un = layouts.unwrap_envelopes(lines, first, fallback=ref, known_pods=known)
                        for no, reason in un.bad:
                            self.stats.malformed_line(f"{name}:{no}", reason)
                        yield from self.process(
                            un.lines, un.linenos, name, ref, (un.pods, un.reporters)
                        )
                    else:
                        linenos = np.arange(first, first + len(lines), dtype=np.int64)
                        yield from self.process(lines, linenos, name, ref, None, kubectl=True)
                    self.progress(counter.count)
            except (EOFError, zlib.error, OSError) as exc:
                # A gzip cut short (copied while being written) keeps what was read.
                reason = f"read error after line {read_lines}: {exc}"
                log.warning("%s: %s", name, reason)
                self.stats.skipped_files.append((name, reason))
            if truncated(stream):
                reason = f"gzip truncated after line {read_lines}; the lines before were read"
                log.warning("%s: %s", name, reason)
                self.stats.skipped_files.append((name, reason))
            if layout == CRI:
                inner, linenos = joiner.flush()
                if len(inner):
                    yield from self.process(inner, linenos, name, ref, None)
            self.done += counter.count
        self.progress()

    def process(
        self,
        lines: pa.StringArray | envoy_format.RawLines,
        linenos: np.ndarray,
        name: str,
        ref: layouts.PodRef,
        per_row: tuple[pa.Array, pa.Array] | None,
        *,
        kubectl: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Classify, dedupe, parse and map one chunk of (unwrapped) lines."""
        if len(lines) == 0:
            return
        if isinstance(lines, envoy_format.RawLines):
            # Plain Istio text (the common case) is parsed straight from the read buffer;
            # anything else (prefixes, JSON, dedupe, a custom format) takes the string path.
            is_text = None
            if kubectl and self.fmt is None and self.dedupe is None:
                is_text = layouts.classify_raw(lines.data, lines.starts, lines.ends)
                if is_text is not None and not is_text.all() and layouts.maybe_linkerd_raw(
                        lines.data, lines.starts, lines.ends, ~is_text):
                    is_text = None  # Linkerd apache lines: the string path classifies them
            if is_text is not None:
                yield from self.process_raw(lines, is_text, linenos, name, ref)
                return
            lines = lines.array()
        pods: pa.Array | str | None = ref.pod
        reporters: pa.Array | None = per_row[1] if per_row else None
        if per_row is not None:
            pods = per_row[0]
        inner = lines
        if kubectl:
            inner, prefixed = layouts.strip_kubectl(lines)
            if prefixed is not None:
                pods = (pc.fill_null(prefixed, arrowlite.string_scalar(ref.pod)) if ref.pod
                        else prefixed)
                reporters = layouts.reporters_for_pods(
                    prefixed, namespace=ref.namespace, known_pods=self.options.known_pods
                )
                if ref.reporter is not None:
                    reporters = pc.fill_null(reporters, arrowlite.string_scalar(ref.reporter))
        is_text, is_json = layouts.classify_lines(inner, custom_format=self.fmt is not None)
        if self.fmt is not None:
            # A custom format's text mask is every other line: Linkerd's are told apart first.
            lk_apache, lk_json = layouts.classify_linkerd(inner, not_rows=is_json)
            is_text &= ~lk_apache
        else:
            lk_apache, lk_json = layouts.classify_linkerd(inner, not_rows=is_text | is_json)
        candidates = is_text | is_json | lk_apache | lk_json
        self.stats.ignored_lines += int(len(candidates) - candidates.sum())
        if self.dedupe is not None and candidates.any():
            idx = np.flatnonzero(candidates)
            take_idx = arrowlite.int_array(idx)
            row_pods = pods.take(take_idx) if isinstance(pods, pa.Array) else pods
            keys = hash_lines(row_pods, inner.take(take_idx))
            new = self.dedupe.filter(keys)
            dup = idx[~new]
            self.stats.duplicates += len(dup)
            for mask in (is_text, is_json, lk_apache, lk_json):
                mask[dup] = False
        for mask, source in ((is_text, self.text_source), (is_json, SOURCE_JSON),
                             (lk_apache, SOURCE_LINKERD_APACHE), (lk_json, SOURCE_LINKERD_JSON)):
            if not mask.any():
                continue
            idx = np.flatnonzero(mask)
            sub, sub_linenos, rows = inner, linenos, reporters
            if len(idx) < len(mask):  # all lines are access lines, usually: no copy then
                take = arrowlite.int_array(idx)
                sub, sub_linenos = inner.take(take), linenos[idx]
                rows = reporters.take(take) if reporters is not None else None
            job = _Job(
                lines=sub,
                linenos=sub_linenos,
                name=name,
                reporters=rows,
                reporter=ref.reporter,
                source=source,
                fmt=self.fmt,
            )
            yield from self.submit(job)

    def process_raw(
        self,
        lines: envoy_format.RawLines,
        is_text: np.ndarray,
        linenos: np.ndarray,
        name: str,
        ref: layouts.PodRef,
    ) -> Iterator[pa.RecordBatch]:
        """:meth:`process` for plain text lines without prefixes, JSON or dedupe."""
        n_text = int(is_text.sum())
        self.stats.ignored_lines += len(is_text) - n_text
        if not n_text:
            return
        if n_text < len(is_text):
            idx = np.flatnonzero(is_text)
            lines, linenos = lines.take(idx), linenos[idx]
        job = _Job(
            lines=lines,
            linenos=linenos,
            name=name,
            reporters=None,
            reporter=ref.reporter,
            source=self.text_source,
            fmt=self.fmt,
        )
        yield from self.submit(job)

    def submit(self, job: _Job) -> Iterator[pa.RecordBatch]:
        """Queue ``job`` on the workers; yield finished results, oldest first (deterministic)."""
        if self.pool is None:
            yield from self.account(job.run())
            return
        self.pending.append(self.pool.submit(job.run))
        while len(self.pending) > _IN_FLIGHT:
            yield from self.account(self.pending.popleft().result())

    def drain(self) -> Iterator[pa.RecordBatch]:
        while self.pending:
            yield from self.account(self.pending.popleft().result())

    def account(self, result: _Result) -> Iterator[pa.RecordBatch]:
        for origin, reason in result.samples:
            self.stats.malformed_line(origin, reason)
        self.stats.malformed += result.malformed - len(result.samples)
        for batch in result.batches:
            if batch.num_rows:
                self.stats.add_records(result.source, batch.num_rows)
                yield batch

    # -- one packet capture -------------------------------------------------------------

    def read_capture(self, path: Path) -> Iterator[pa.RecordBatch]:
        name = display(path)
        self.stats.files += 1
        cstats = CaptureStats(name)
        mapper = CaptureMapper(name, SOURCE_PCAP, seen=self.capture_connections)
        with open_input(path) as (stream, counter):
            try:
                for batch in capture_batches(stream, name, stats=cstats, mapper=mapper):
                    self.stats.add_records(SOURCE_PCAP, batch.num_rows)
                    self.progress(counter.count)
                    yield batch
            except (EOFError, zlib.error, OSError) as exc:
                reason = f"read error after packet {cstats.frames}: {exc}"
                log.warning("%s: %s", name, reason)
                self.stats.skipped_files.append((name, reason))
            if truncated(stream):
                reason = f"compressed data cut short after packet {cstats.frames}"
                log.warning("%s: %s", name, reason)
                self.stats.skipped_files.append((name, reason))
        self.stats.packets += cstats.packets
        for reason, count in cstats.skipped.items():
            self.stats.packets_skipped[reason] = self.stats.packets_skipped.get(reason, 0) + count
        for warning in cstats.warnings:
            log.warning("%s", warning)
        self.stats.capture_warnings.extend(cstats.warnings[: MAX_SAMPLES])
        self.stats.connections += mapper.stats.connections
        self.stats.duplicate_copies += cstats.duplicate_copies
        self.stats.duplicate_connections += mapper.stats.duplicate_connections
        self.stats.failed_connections += mapper.stats.failed
        self.stats.not_itemized += mapper.stats.not_itemized
        self.done += _size(path)
        self.progress()

    # -- one flows file -----------------------------------------------------------------

    def read_flow_file(self, path: Path) -> Iterator[pa.RecordBatch]:
        self.stats.files += 1
        for batch in read_flows(path, batch_size=self.options.batch_lines):
            counts = pc.value_counts(pc.fill_null(batch.column("source"),
                                                  arrowlite.string_scalar("unknown")))
            for item in counts.to_pylist():
                self.stats.add_records(item["values"], item["counts"])
            yield batch
        self.done += _size(path)
        self.progress()


def _size(path: Path | str) -> int:
    if path == STDIN:
        return 0
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _layout(lines: pa.StringArray) -> str:
    """The layout of a log file, from the non-empty lines of its first chunk."""
    head = [ln for ln in lines.slice(0, 256).to_pylist() if ln and ln.strip()][:64]
    if not head:
        return TEXT
    det = detect("\n".join(head).encode(), complete=True)
    return det.layout or TEXT


def iter_flows(
    plan: InputPlan, options: ObserveOptions, stats: ObserveStats
) -> Iterator[pa.RecordBatch]:
    """FLOW_SCHEMA batches from the plan's logs, then its flows files, updating ``stats``.

    Raises FormatError for a bad ``options.envoy_format`` and InputError for unreadable
    inputs; line-level problems are counted in ``stats``, never raised.
    """
    reader = _Reader(plan, options, stats)
    stats.skipped_files.extend(plan.skipped)
    workers = min(options.workers, os.cpu_count() or 1)
    if workers > 1 and plan.logs:
        reader.pool = ThreadPoolExecutor(workers, thread_name_prefix="meshwright-parse")
    try:
        for path in plan.logs:
            yield from reader.read_log(path)
        yield from reader.drain()
    finally:
        if reader.pool is not None:
            reader.pool.shutdown(wait=True, cancel_futures=True)
    for capture in plan.captures:
        yield from reader.read_capture(capture)
    for path in plan.flow_files:
        yield from reader.read_flow_file(path)


@dataclass
class ObserveRun:
    """A planned observe run: iterate ``batches`` once; ``stats`` is complete afterwards."""

    plan: InputPlan
    stats: ObserveStats
    batches: Iterator[pa.RecordBatch]


def observe_inputs(paths: Sequence[str], options: ObserveOptions) -> ObserveRun:
    """Plan ``paths`` and return the (lazy) run over them."""
    plan = plan_inputs(paths, envoy_format=options.envoy_format)
    stats = ObserveStats()
    return ObserveRun(plan, stats, iter_flows(plan, options, stats))


__all__ = [
    "InputError",
    "InputPlan",
    "ObserveOptions",
    "ObserveRun",
    "ObserveStats",
    "iter_flows",
    "observe_inputs",
    "plan_inputs",
]
