"""Input files: paths, directories, gzip, stdin, content detection, line chunks, dedupe.

Everything is decided from bytes, never from file names: gzip by its magic (``1f 8b``, any
name), zstd by ``28 b5 2f fd``, packet captures by the pcap/pcapng magics
(:func:`observe.pcap.sniff_capture`), Parquet flows by ``PAR1``, inventories by
``apiVersion``/``kind`` in a JSON or YAML head, access logs (Istio/Envoy and linkerd-proxy) by
the shape of their first lines (see :mod:`observe.layouts`).

Files are read in chunks of whole lines (:func:`iter_chunks`, at most 64k lines and ~24 MiB
each), so memory is bounded by the chunks in flight, not the file. A chunk is its read buffer
plus each line's byte range (:class:`observe.envoy_format.RawLines`: no decode/split copies;
plain text logs are parsed straight from it); :func:`iter_line_chunks` copies the lines into
one ``pyarrow`` string array for the other layouts. Only a chunk that is not valid UTF-8 is
decoded, with U+FFFD for the bad bytes.

Dedupe (:class:`Deduper`): a dump often holds the same proxy output twice (the ``kubectl
logs`` file and the CRI node file of one pod, a shipper export beside them). A request is
kept once per key ``(pod, exact inner access-log line)``; the pod name (not ``ns/pod``) is
used so a copy whose namespace is unknown still matches. Keys are 64-bit hashes kept in
sorted numpy runs: **8 bytes per distinct access line** (plus a transient copy of the
largest run while runs merge), e.g. ~160 MB for 20 M lines. Two different lines colliding
on 64 bits is ~1e-5 likely at 20 M lines; the cost would be one dropped record.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from observe import arrowlite, layouts
from observe.compiled import textcut as _textcut
from observe.envoy_format import RawLines
from observe.errors import InputError
from observe.pcap import sniff_capture

log = logging.getLogger(__name__)

STDIN = "-"
#: Bytes of lines per chunk, at most (unless one line is longer).
CHUNK_BYTES = 24 << 20
#: Bytes per read() call.
READ_BYTES = 4 << 20
#: Bytes peeked to classify a file.
HEAD_BYTES = 64 << 10
#: Lines of the head examined to recognise an access log.
HEAD_LINES = 64

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

LOGS = "logs"
INVENTORY = "inventory"
FLOWS = "flows"
CAPTURE = "capture"

# Log layouts detected per file.
TEXT = "text"
CRI = "cri"
ENVELOPE = "envelope"


def display(path: Path | str) -> str:
    """How a path appears in origins and messages (``<stdin>`` for stdin)."""
    return "<stdin>" if path == STDIN else str(path)


def _stdin_buffer() -> BinaryIO:
    buf = getattr(sys.stdin, "buffer", None)
    if buf is None:
        raise InputError("standard input is not readable as bytes", origin="<stdin>")
    return buf


class _Counting(io.RawIOBase):
    """Counts bytes read from the underlying (possibly compressed) stream, for progress."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        readinto = getattr(self.raw, "readinto", None)
        if readinto is not None:
            n = readinto(b) or 0  # straight into the caller's buffer: no copy
        else:
            data = self.raw.read(len(b))
            n = len(data)
            b[:n] = data
        self.count += n
        return n


class Gunzip(io.RawIOBase):
    """Streaming gunzip that keeps what a truncated file holds instead of raising.

    Dumps are often copied while a shipper still writes them; :mod:`gzip` then raises
    EOFError and loses the last decompressed block. Here the data up to the cut is returned
    and ``truncated`` is set. Concatenated members (rotated logs ``cat``-ed) are read in turn.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self._d = zlib.decompressobj(31)
        self._input = b""
        self._started = False
        self._done = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(b)
        while not self._done:
            if self._d.eof:
                # Next member, if any; zero padding after the last member is skipped.
                rest = (self._input or self._d.unused_data).lstrip(b"\x00")
                while not rest:
                    more = self.raw.read(1 << 16)
                    if not more:
                        self._done = True
                        return 0
                    rest = more.lstrip(b"\x00")
                self._d = zlib.decompressobj(31)
                self._input = rest
            data = self._input or self._d.unconsumed_tail or self.raw.read(1 << 16)
            self._input = b""
            if not data:
                self.truncated = self._started
                self._done = True
                break
            self._started = True
            try:
                out = self._d.decompress(data, want)
            except zlib.error as exc:
                raise OSError(f"corrupt gzip data: {exc}") from exc
            if out:
                b[: len(out)] = out
                return len(out)
        return 0


@contextlib.contextmanager
def open_input(path: Path | str) -> Iterator[tuple[BinaryIO, _Counting]]:
    """Open a file or stdin for binary reading, transparently gunzipping by magic bytes.

    Yields the (decompressed) stream and a counter of raw bytes consumed. A truncated gzip
    ends early; :func:`truncated` tells afterwards.
    """
    name = display(path)
    try:
        raw: BinaryIO = _stdin_buffer() if path == STDIN else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise InputError(f"cannot open: {exc.strerror or exc}", origin=name) from exc
    try:
        counting = _Counting(raw)
        buffered = io.BufferedReader(counting, buffer_size=1 << 16)
        try:
            magic = buffered.peek(2)[:2]
        except OSError as exc:
            raise InputError(f"cannot read: {exc}", origin=name) from exc
        stream: BinaryIO = buffered
        if magic == GZIP_MAGIC:
            stream = io.BufferedReader(Gunzip(buffered), buffer_size=1 << 16)
        elif buffered.peek(4)[:4] == ZSTD_MAGIC:
            stream = io.BufferedReader(Unzstd(buffered), buffer_size=1 << 16)
        yield stream, counting
    finally:
        if path != STDIN:
            raw.close()


class Unzstd(io.RawIOBase):
    """Streaming zstd decompression that keeps what a truncated file holds (like Gunzip).

    Frame by frame (``zstd`` and ``cat a.zst b.zst`` write several); a stream that ends inside
    a frame sets ``truncated`` after everything decodable was returned.
    """

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._started = False  # input went into the current frame
        self._done = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                self._done = True
                self.truncated = self._started and not self._dec.eof
                break
            self._feed(chunk)
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            try:
                self._pending += self._dec.decompress(chunk)
            except self._zstd.ZstdError as exc:
                raise OSError(f"corrupt zstd data: {exc}") from exc
            self._started = True
            if not self._dec.eof:
                return
            chunk = self._dec.unused_data  # the next frame
            self._dec = self._zstd.ZstdDecompressor().decompressobj()
            self._started = False


def truncated(stream: BinaryIO) -> bool:
    """True if ``stream`` (from :func:`open_input`) was a gzip or zstd file cut short."""
    raw = getattr(stream, "raw", None)
    return isinstance(raw, (Gunzip, Unzstd)) and raw.truncated


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of a file, gunzipped if it is gzip (a short gzip is fine)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(size)
            if head[:4] == ZSTD_MAGIC:
                fh.seek(0)
                return _zstd_head(fh, size)
            if head[:2] != GZIP_MAGIC:
                return head
            fh.seek(0)
            out = bytearray()
            with (
                gzip.GzipFile(fileobj=fh, mode="rb") as gz,
                contextlib.suppress(EOFError, OSError, zlib.error),
            ):
                while len(out) < size:
                    block = gz.read(size - len(out))
                    if not block:
                        break
                    out += block
            return bytes(out)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", origin=str(path)) from exc


def _zstd_head(fh: BinaryIO, size: int) -> bytes:
    out = bytearray()
    reader = io.BufferedReader(Unzstd(fh), buffer_size=1 << 16)
    with contextlib.suppress(OSError):
        while len(out) < size:
            block = reader.read(size - len(out))
            if not block:
                break
            out += block
    return bytes(out)


@dataclass(frozen=True)
class Detected:
    """What a file's head says it is."""

    kind: str | None
    """``logs`` | ``inventory`` | ``flows`` | ``capture`` | None (not recognised)."""
    layout: str | None = None
    """For logs: ``text`` | ``cri`` | ``envelope``."""
    reason: str = ""
    """Why it was not recognised."""


_YAML_API = re.compile(rb"^(?:-\s+)?apiVersion:\s*\S", re.M)
_YAML_KIND = re.compile(rb"^\s*(?:-\s+)?kind:\s*\S", re.M)
_JSON_API = re.compile(rb'"apiVersion"\s*:\s*"')
_JSON_KIND = re.compile(rb'"kind"\s*:\s*"')


def _head_lines(head: bytes, complete: bool) -> list[str]:
    text = head.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut by the head size
    return [ln.rstrip("\r") for ln in lines if ln.strip()][:HEAD_LINES]


def detect(head: bytes, *, complete: bool = False, custom_format: bool = False) -> Detected:
    """Classify content by its first bytes (``complete``: ``head`` is the whole file)."""
    from observe.flows_io import looks_like_parquet

    if not head:
        return Detected(None, reason="empty file")
    if looks_like_parquet(head):
        return Detected(FLOWS)
    if sniff_capture(head):
        return Detected(CAPTURE)
    for magic, what in ((ZSTD_MAGIC, "zstd"), (XZ_MAGIC, "xz"), (BZIP2_MAGIC + b"9", "bzip2")):
        if head.startswith(magic):
            return Detected(
                None, reason=f"{what}-compressed; decompress it first (gzip and zstd are read)")
    if b"\x00" in head:
        return Detected(None, reason="binary content")
    lines = _head_lines(head, complete)
    if not lines:
        return Detected(None, reason="no text lines")
    first = lines[0].lstrip()
    if first.startswith("{"):
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            if layouts.unwrap_envelope(obj) is not None:
                return Detected(LOGS, ENVELOPE)
            if "apiVersion" in obj and "kind" in obj:
                return Detected(INVENTORY)
        elif _JSON_API.search(head) and _JSON_KIND.search(head):
            return Detected(INVENTORY)  # a pretty-printed kubectl -o json object or List
    elif _YAML_API.search(head) and _YAML_KIND.search(head):
        return Detected(INVENTORY)
    if layouts.looks_like_cri(lines[0]):
        return Detected(LOGS, CRI)
    if _looks_like_proxy_log(lines, custom_format=custom_format):
        return Detected(LOGS, TEXT)
    return Detected(None, reason="not an access log, capture, inventory or flows file")


def _looks_like_proxy_log(lines: list[str], *, custom_format: bool) -> bool:
    arr = arrowlite.string_array(lines)
    inner, _ = layouts.strip_kubectl(arr)
    text, js = layouts.classify_lines(inner)
    if text.any() or js.any():
        return True
    lk_apache, lk_json = layouts.classify_linkerd(inner)
    if lk_apache.any() or lk_json.any():
        return True  # linkerd-proxy access lines (config.linkerd.io/access-log)
    diag = arrowlite.to_bool(pc.match_substring_regex(inner, layouts.PROXY_DIAG))
    if diag.any():
        return True  # proxy diagnostics only (no traffic yet): still the proxy's output
    # A user's --envoy-format may look like anything; a text file is then taken as a log.
    return custom_format


def walk(path_arg: str) -> list[tuple[Path, Path | None]]:
    """Files named by one argument: ``[(file, root)]``, root being the directory walked.

    Directories are walked recursively in sorted order (deterministic); hidden entries
    (``.git``, editor files) are skipped. A missing path raises InputError naming it.
    """
    p = Path(path_arg)
    if not p.exists():
        raise InputError("no such file or directory", origin=path_arg)
    if p.is_file():
        if not os.access(p, os.R_OK):
            raise InputError("permission denied", origin=path_arg)
        return [(p, None)]
    if not p.is_dir():
        raise InputError("not a regular file or directory", origin=path_arg)
    out: list[tuple[Path, Path | None]] = []
    for dirpath, dirnames, filenames in os.walk(p, onerror=_raise_walk, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append((Path(dirpath) / name, p))
    return out


def _raise_walk(exc: OSError) -> None:
    raise InputError(f"cannot read directory: {exc.strerror or exc}", origin=exc.filename) from exc


def _raw_lines(buf: np.ndarray, ends: np.ndarray) -> RawLines:
    """The lines of ``buf`` (no final newline) ending at ``ends`` (the last is len(buf)),
    as byte ranges without their '\n' and trailing '\r's; ``buf`` is not copied."""
    if len(buf) and int(buf.max()) >= 0x80:
        raw = buf.tobytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            # Rare: replace bad bytes (lengths change, so find the line ends again).
            raw = raw.decode("utf-8", errors="replace").encode("utf-8")
            buf = np.frombuffer(raw, dtype=np.uint8)
            ends = np.append(np.flatnonzero(buf == 10), len(buf))
    ends = ends.astype(np.int64)  # a copy: trimmed below
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    if len(buf):
        # Every trailing '\r' goes (as utf8_rtrim did); only each line's last bytes are read.
        cr = np.flatnonzero((ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13))
        while len(cr):
            ends[cr] -= 1
            cr = cr[(ends[cr] > starts[cr]) & (buf[np.maximum(ends[cr] - 1, 0)] == 13)]
    return RawLines(buf, starts, ends)


def _cut_lines(buf: np.ndarray, ends: np.ndarray) -> pa.StringArray:
    """The lines of ``buf`` as a StringArray (see :func:`_raw_lines`)."""
    return _raw_lines(buf, ends).array()


class _BufferPool:
    """Read buffers, recycled once nothing references them any more.

    A chunk's lines stay in its read buffer while a worker parses them, so a buffer is
    reused only when its reference count says no chunk (or array view) holds it; at most
    ``keep`` are pooled (fresh big allocations cost page faults each time).
    """

    def __init__(self, size: int, keep: int = 8):
        self.size = size
        self.keep = keep
        self._bufs: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        for i in range(len(self._bufs)):
            # References: the list, and getrefcount's argument.
            if sys.getrefcount(self._bufs[i]) <= 2:
                return self._bufs[i]
        buf = np.empty(self.size, dtype=np.uint8)
        if len(self._bufs) < self.keep:
            self._bufs.append(buf)
        return buf


def _newlines(data: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Positions of b'\\n' in ``data`` (``scratch``: a reused buffer at least as long)."""
    if _textcut is not None:
        count = _textcut.newlines(data, scratch)
        return scratch[:count].copy()
    # Into a reused mask: a fresh read-sized temporary costs page faults each time.
    return np.flatnonzero(np.equal(data, 10, out=scratch[: len(data)]))


def iter_chunks(
    stream: BinaryIO, *, chunk_bytes: int = CHUNK_BYTES, max_lines: int = 65536
) -> Iterator[tuple[RawLines, int]]:
    """``(lines, number of the first line)`` for chunks of whole lines of ``stream``.

    Line numbers are 1-based. The final line needs no newline. A chunk holds at most
    ``max_lines`` lines and about ``chunk_bytes`` bytes (more only for one longer line).
    Each chunk's lines stay in their own read buffer (no copy), which is not reused while
    the chunk (or anything viewing its buffer) is alive.
    """
    read_size = max(1, min(chunk_bytes, READ_BYTES))
    pool = _BufferPool(max(chunk_bytes, read_size) + read_size)
    buf = pool.get()
    newline_scratch = np.empty(read_size, dtype=np.int64 if _textcut else bool)
    ends: list[np.ndarray] = []  # newline positions in buf, per read
    size = count = 0
    lineno = 1
    while True:
        if len(buf) - size < read_size:  # one line longer than the buffer: grow it
            buf = np.concatenate([buf[:size], np.empty(len(buf), dtype=np.uint8)])
        got = stream.readinto(buf.data[size : size + read_size]) or 0  # type: ignore[attr-defined]
        if got:
            nl = _newlines(buf[size : size + got], newline_scratch)
            ends.append(nl + size if size else nl)
            size += got
            count += len(nl)
        while count and (count >= max_lines or size >= chunk_bytes or not got):
            nls = np.concatenate(ends) if len(ends) > 1 else ends[0]
            take = min(count, max_lines)
            end = int(nls[take - 1])
            chunk = _raw_lines(buf[:end], nls[:take])
            count -= take
            rest = size - (end + 1)
            # The partial line after the chunk moves to a free buffer; this one stays the
            # chunk's until it is parsed.
            nxt = pool.get() if len(buf) == pool.size else np.empty(len(buf), dtype=np.uint8)
            nxt[:rest] = buf[end + 1 : size]
            buf = nxt
            ends = [nls[take:] - (end + 1)]
            size = rest
            yield chunk, lineno
            lineno += take
            del chunk
        if not got:
            break
    if size:
        yield _raw_lines(buf[:size], np.array([size], dtype=np.int64)), lineno


def iter_line_chunks(
    stream: BinaryIO, *, chunk_bytes: int = CHUNK_BYTES, max_lines: int = 65536
) -> Iterator[tuple[pa.StringArray, int]]:
    """:func:`iter_chunks` with each chunk's lines copied into a StringArray."""
    for lines, first in iter_chunks(stream, chunk_bytes=chunk_bytes, max_lines=max_lines):
        yield lines.array(), first


def hash_lines(pods: pa.Array | str | None, lines: pa.StringArray) -> np.ndarray:
    """64-bit dedupe keys for ``(pod, line)`` per row (``pods`` one value or one per row).

    A constant pod and the same pod given per row hash identically (same formula).
    """
    # pandas costs ~0.15 s to import; only multi-file runs (dedupe) need it.
    from pandas.util import hash_array

    h = hash_array(lines.to_numpy(zero_copy_only=False), categorize=False)
    if pods is None or isinstance(pods, str):
        pod_h = hash_array(np.array([pods or ""], dtype=object), categorize=False)
    else:
        pod_h = hash_array(pc.fill_null(pods, "").to_numpy(zero_copy_only=False), categorize=True)
    # Rotate the pod hash before xor so that (pod, line) and (line, pod) differ.
    mixed = (pod_h << np.uint64(17)) | (pod_h >> np.uint64(47))
    return np.asarray(h ^ mixed, dtype=np.uint64)


@dataclass
class Deduper:
    """Remembers 64-bit keys in sorted runs merged like a binary counter (O(n log n))."""

    _runs: list[np.ndarray] = field(default_factory=list)
    seen: int = 0

    def __len__(self) -> int:
        return self.seen

    def _contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, keys)
            idx[idx == len(run)] = 0
            found |= run[idx] == keys
        return found

    def filter(self, keys: np.ndarray) -> np.ndarray:
        """Mask of rows whose key is new (first occurrence, also within ``keys``); records them."""
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        keys = np.asarray(keys, dtype=np.uint64)
        uniq, first = np.unique(keys, return_index=True)
        new_mask = np.zeros(len(keys), dtype=bool)
        fresh = ~self._contains(uniq)
        new_mask[first[fresh]] = True
        self._add(uniq[fresh])
        return new_mask

    def _add(self, run: np.ndarray) -> None:
        if len(run) == 0:
            return
        self.seen += len(run)
        while self._runs and len(self._runs[-1]) <= len(run):
            # Runs are disjoint and sorted: timsort merges two runs in linear time.
            run = np.concatenate([self._runs.pop(), run])
            run.sort(kind="stable")
        self._runs.append(run)


def classify_paths(
    paths: Sequence[str], *, custom_format: bool = False
) -> tuple[list[tuple[Path | str, Path | None, Detected]], list[tuple[str, str]]]:
    """Walk and classify every path: ``(recognised [(path, root, detected)], skipped)``.

    A named file that is not recognised raises InputError; unrecognised files found in a
    directory are skipped with a reason.
    """
    found: list[tuple[Path | str, Path | None, Detected]] = []
    skipped: list[tuple[str, str]] = []
    stdin_seen = False
    for arg in paths:
        if arg == STDIN:
            if stdin_seen:
                raise InputError("standard input named more than once", origin="<stdin>")
            stdin_seen = True
            found.append((STDIN, None, Detected(LOGS, None)))
            continue
        for path, root in walk(arg):
            try:
                size = path.stat().st_size
                head = read_head(path)
            except (InputError, OSError) as exc:
                if root is None:
                    raise InputError(f"cannot read: {exc}", origin=str(path)) from exc
                skipped.append((str(path), f"unreadable: {exc}"))
                continue
            det = detect(head, complete=size <= len(head), custom_format=custom_format)
            if det.kind is None:
                if root is None:
                    raise InputError(
                        f"not a recognised input ({det.reason})",
                        origin=str(path),
                        hint="pass proxy access logs, packet captures (pcap, pcapng), a kubectl "
                        "-o json/-o yaml inventory, or a meshwright flows .parquet file",
                    )
                skipped.append((str(path), det.reason))
                continue
            found.append((path, root, det))
    return found, skipped
