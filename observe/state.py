"""Observe mode's state directory: a time-partitioned flow store, a checkpoint, published outputs.

Layout under ``root``::

    checkpoint.json                   seq of the last commit, stream cursors, the pods file
    pods-<seq>.json                   pod history + the watch's resourceVersions at it
    flows/dt=YYYY-MM-DD/hour=HH/part-<seq>.parquet     one file per commit
    flows/dt=.../hour=HH/compact-<lo>-<hi>.parquet     an hour's parts merged once it is over
    edges-summary.json                edges of the flows retention deleted (kept beyond it)
    emit/<generation>/                one proposal (policies/, graph.json, ...)
    current -> emit/<generation>      swapped atomically; policies, graph.json, ... link into it

**Exactly once.** :meth:`FlowStore.commit` writes the new part (temporary name, fsync, rename),
then the checkpoint naming its ``seq`` (same way). On open, parts with a larger ``seq`` than the
checkpoint's (written, but their checkpoint never was: killed in between) are deleted, so the
store holds exactly what the checkpoint's cursors say was read. Compaction writes the merged
file first and deletes the parts after; parts covered by a merged file are deleted on open.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from observe.errors import InputError
from observe.flows_io import FlowWriter, read_flows
from observe.logstream import CursorState, StreamKey

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 1
#: Version of the inventory file (``pods-<seq>.json``). 1 (no ``version`` field): pods and
#: their resourceVersion only; 2: also the other watched kinds (``objects``), and the
#: resourceVersions of every watch.
INVENTORY_VERSION = 2
#: Names published in the state directory, each a link into ``current``.
PUBLISHED = ("policies", "graph.json", "findings.json", "findings.sarif", "report.md")
#: Output generations kept (a reader still in an older one is not cut off at once).
KEEP_GENERATIONS = 3

_PART = re.compile(r"^part-(\d{12})\.parquet$")
_COMPACT = re.compile(r"^compact-(\d{12})-(\d{12})\.parquet$")
_HOUR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class IngestCursor:
    """The last shipment committed from one node stream (``POST /v1/flows``)."""

    seq: int
    node: str
    seen: str
    """When it was committed (ISO 8601, UTC)."""


@dataclass
class Checkpoint:
    """What a restart resumes from.

    ``resource_versions`` and ``pods`` go together into their own file (``pods-<seq>.json``,
    named by the checkpoint): the pod history as of those resourceVersions, so a watch resumed
    from them replays exactly what came after. It is rewritten only when it changed
    (:meth:`FlowStore.commit` ``inventory``); the cursors are in every checkpoint.
    """

    seq: int = 0
    """The last committed flow part."""
    cursors: dict[StreamKey, CursorState] = field(default_factory=dict)
    resource_versions: dict[tuple[str, str | None], str] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    """Pod history (raw objects, ended ones with their deletionTimestamp)."""
    saved_at: str | None = None
    pods_file: str | None = None
    ingest: dict[str, IngestCursor] = field(default_factory=dict)
    """Node stream id -> its last committed shipment (absent in older checkpoints)."""
    objects: list[dict[str, Any]] = field(default_factory=list)
    """Namespaces, services, service accounts and owners (compact objects with ``kind``;
    deleted ones with a ``deletionTimestamp``), as of ``resource_versions``."""
    inventory_version: int = INVENTORY_VERSION
    """Of the inventory file read: below 2 only the pods' resourceVersions and history were
    saved (the other kinds are listed after a restart)."""

    def to_json(self) -> bytes:
        return json.dumps({
            "version": CHECKPOINT_VERSION,
            "seq": self.seq,
            "saved_at": self.saved_at,
            "pods_file": self.pods_file,
            "ingest": [{"stream": k, "seq": c.seq, "node": c.node, "seen": c.seen}
                       for k, c in sorted(self.ingest.items())],
            "streams": [
                {"namespace": k.namespace, "pod": k.pod, "container": k.container, "uid": k.uid,
                 "last": c.last, "delivered": c.delivered,
                 "at_last": [[d.hex(), n] for d, n in c.at_last]}
                for k, c in sorted(self.cursors.items())
            ],
        }, sort_keys=True, separators=(",", ":")).encode()

    def inventory_json(self) -> bytes:
        return json.dumps({
            "version": INVENTORY_VERSION,
            "resource_versions": [[r, ns, rv] for (r, ns), rv
                                  in sorted(self.resource_versions.items(),
                                            key=lambda i: (i[0][0], i[0][1] or ""))],
            "pods": self.pods,
            "objects": self.objects,
        }, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, origin: str, root: Path | None = None) -> Checkpoint:
        try:
            doc = json.loads(data)
            if doc.get("version") != CHECKPOINT_VERSION:
                raise InputError(f"unknown checkpoint version {doc.get('version')!r}",
                                 origin=origin)
            cursors = {
                StreamKey(s["namespace"], s["pod"], s["container"], s["uid"]): CursorState(
                    s["last"], tuple((bytes.fromhex(d), int(n)) for d, n in s["at_last"]),
                    int(s["delivered"]))
                for s in doc["streams"]}
            ckpt = cls(int(doc["seq"]), cursors, saved_at=doc.get("saved_at"),
                       pods_file=doc.get("pods_file"))
            ckpt.ingest = {str(i["stream"]): IngestCursor(int(i["seq"]), str(i["node"]),
                                                          str(i["seen"]))
                           for i in doc.get("ingest") or ()}
            if ckpt.pods_file and root is not None:
                inv = json.loads((root / ckpt.pods_file).read_bytes())
                ckpt.resource_versions = {(str(r), ns): str(rv)
                                          for r, ns, rv in inv["resource_versions"]}
                ckpt.pods = list(inv["pods"])
                ckpt.inventory_version = int(inv.get("version") or 1)
                if ckpt.inventory_version > INVENTORY_VERSION:
                    raise ValueError(f"unknown inventory version {ckpt.inventory_version}")
                ckpt.objects = list(inv.get("objects") or [])
            return ckpt
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"corrupt checkpoint: {exc}", origin=origin,
                             hint="remove it to start afresh (flows already stored are kept)"
                             ) from exc


@dataclass
class StoreStats:
    commits: int = 0
    rows: int = 0
    """Rows committed by this process."""
    discarded_parts: int = 0
    """Parts found written but never checkpointed (deleted on open)."""
    compacted_parts: int = 0
    deleted_partitions: int = 0
    """Hour partitions deleted by retention."""


class FlowStore:
    """Flow records under ``root/flows`` partitioned by the hour they were committed in.

    ``retention``: hour partitions that ended longer ago are deleted (:meth:`expire`).
    """

    def __init__(self, root: Path, *, retention: timedelta | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.root = Path(root)
        self.flows = self.root / "flows"
        self.retention = retention
        self.clock = clock
        self.stats = StoreStats()
        try:
            self.flows.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the state directory: {exc.strerror}",
                             origin=str(self.root)) from exc
        self.checkpoint = self._load()
        self._recover()

    # -- checkpoint ---------------------------------------------------------------------------
    def _load(self) -> Checkpoint:
        path = self.root / CHECKPOINT
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Checkpoint()
        return Checkpoint.from_json(data, str(path), self.root)

    def _recover(self) -> None:
        """Delete what was written after the last checkpoint, and parts already compacted."""
        for part in self.flows.rglob("*"):
            if part.is_file() and part.name.startswith("."):  # temporaries of a killed run
                part.unlink()
        self._drop_pod_files()
        for hour in self._hours():
            covered: list[tuple[int, int]] = []
            for f in hour.iterdir():
                m = _COMPACT.match(f.name)
                if m:
                    covered.append((int(m[1]), int(m[2])))
            for f in sorted(hour.iterdir()):
                m = _PART.match(f.name)
                if not m:
                    continue
                seq = int(m[1])
                if seq > self.checkpoint.seq:
                    f.unlink()
                    self.stats.discarded_parts += 1
                elif any(lo <= seq <= hi for lo, hi in covered):
                    f.unlink()

    def _drop_pod_files(self) -> None:
        for f in self.root.glob("pods-*.json"):
            if f.name != self.checkpoint.pods_file:
                f.unlink()

    def commit(self, batches: Iterable[pa.RecordBatch], checkpoint: Checkpoint, *,
               inventory: bool = True) -> int:
        """Store ``batches`` as one part and then ``checkpoint`` (its ``seq`` is set here);
        returns the rows stored. With no rows only the checkpoint is written. With
        ``inventory`` False the previous checkpoint's resourceVersions and pods are kept
        (``checkpoint``'s are ignored)."""
        seq = self.checkpoint.seq + 1
        if inventory or self.checkpoint.pods_file is None:
            checkpoint.pods_file = f"pods-{seq:012d}.json"
            write_atomic(self.root / checkpoint.pods_file, checkpoint.inventory_json())
        else:
            checkpoint.pods_file = self.checkpoint.pods_file
            checkpoint.pods = self.checkpoint.pods
            checkpoint.resource_versions = self.checkpoint.resource_versions
            checkpoint.objects = self.checkpoint.objects
            checkpoint.inventory_version = self.checkpoint.inventory_version
        now = self.clock()
        hour = self.flows / f"dt={now:%Y-%m-%d}" / f"hour={now:%H}"
        rows = 0
        batches = [b for b in batches if b.num_rows]
        if batches:
            hour.mkdir(parents=True, exist_ok=True)
            target = hour / f"part-{seq:012d}.parquet"
            with FlowWriter(target, threaded=False) as writer:
                for batch in batches:
                    writer.write(batch)
                    rows += batch.num_rows
            _fsync_file(target)
            _fsync_dir(hour)
        checkpoint.seq = seq
        checkpoint.saved_at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        write_atomic(self.root / CHECKPOINT, checkpoint.to_json())
        self.checkpoint = checkpoint
        self._drop_pod_files()
        self.stats.commits += 1
        self.stats.rows += rows
        return rows

    # -- reading ------------------------------------------------------------------------------
    def _hours(self) -> list[Path]:
        return hour_partitions(self.flows)

    def files(self) -> list[Path]:
        """The committed flow files, oldest first."""
        return committed_files(self._hours())

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for path in self.files():
            yield from read_flows(path, columns=columns)

    def export(self, target: Path) -> int:
        """All committed flows in one flows file (for :func:`learn.pipeline.learn_graph`)."""
        rows = 0
        with FlowWriter(target) as writer:
            for batch in self.batches():
                writer.write(batch)
                rows += batch.num_rows
        return rows

    # -- upkeep -------------------------------------------------------------------------------
    def compact(self) -> int:
        """Merge the parts of every hour that is over into one file; returns parts merged."""
        merged = sum(compact_hour(hour) for hour in self.finished_hours())
        self.stats.compacted_parts += merged
        return merged

    def finished_hours(self) -> list[Path]:
        """Hour partitions before the current hour (no commit goes there any more)."""
        current = self.clock().strftime("dt=%Y-%m-%d/hour=%H")
        return [h for h in self._hours() if f"{h.parent.name}/{h.name}" < current]

    def expired(self) -> list[Path]:
        """Hour partitions that ended more than ``retention`` ago."""
        if self.retention is None:
            return []
        limit = self.clock() - self.retention
        out = []
        for hour in self._hours():
            start = datetime.strptime(f"{hour.parent.name[3:]} {hour.name[5:]}",
                                      "%Y-%m-%d %H").replace(tzinfo=UTC)
            if start + timedelta(hours=1) <= limit:
                out.append(hour)
        return out

    def expire(self, summarize: Callable[[list[Path]], None] | None = None) -> int:
        """Delete the expired partitions (``summarize(their files)`` first); returns how many."""
        deleted = expire_hours(self.expired(), summarize)
        self.stats.deleted_partitions += deleted
        return deleted


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hour_partitions(flows: Path) -> list[Path]:
    """The ``dt=.../hour=...`` directories under ``flows``, oldest first."""
    out: list[Path] = []
    for day in sorted(flows.iterdir()) if flows.exists() else []:
        if day.is_dir() and _HOUR.match(day.name):
            out.extend(h for h in sorted(day.iterdir())
                       if h.is_dir() and h.name.startswith("hour="))
    return out


def committed_files(hours: Iterable[Path], upto: int | None = None) -> list[Path]:
    """The flow files of ``hours``, oldest first: merged files, and the parts no merged file
    covers (one left behind by a compaction cut short) up to seq ``upto`` (None: all). Files
    being written (temporary names) are not listed. Safe while commits go on in later hours
    (or with larger seqs): it is what a learner reads while the main loop keeps committing."""
    out: list[Path] = []
    for hour in hours:
        try:
            names = sorted(f.name for f in hour.iterdir())
        except FileNotFoundError:
            continue
        covered = [(int(m[1]), int(m[2])) for m in map(_COMPACT.match, names) if m]
        for name in names:
            m = _PART.match(name)
            if m:
                seq = int(m[1])
                if (upto is not None and seq > upto) or any(lo <= seq <= hi
                                                            for lo, hi in covered):
                    continue
            elif not _COMPACT.match(name):
                continue
            out.append(hour / name)
    return out


def compact_hour(hour: Path) -> int:
    """Merge the parts of ``hour`` (an hour no commit goes to any more) into one file
    ``compact-<lo>-<hi>.parquet`` (written whole, then the parts are deleted; a cut-short run
    leaves parts that :func:`committed_files` and the next open skip). Returns parts merged."""
    parts = sorted(f for f in hour.iterdir() if _PART.match(f.name))
    covered = [(int(m[1]), int(m[2])) for m in (_COMPACT.match(f.name) for f in hour.iterdir())
               if m]
    seqs = [int(_PART.match(p.name)[1]) for p in parts]  # type: ignore[index]
    for part, seq in zip(parts, seqs, strict=True):
        if any(lo <= seq <= hi for lo, hi in covered):
            part.unlink()  # merged already, its deletion cut short
    parts = [p for p, q in zip(parts, seqs, strict=True) if p.exists()]
    if len(parts) < 2:
        return 0
    seqs = [int(_PART.match(p.name)[1]) for p in parts]  # type: ignore[index]
    target = hour / f"compact-{min(seqs):012d}-{max(seqs):012d}.parquet"
    with FlowWriter(target, threaded=False) as writer:
        for part in parts:
            for batch in read_flows(part):
                writer.write(batch)
    _fsync_file(target)
    _fsync_dir(hour)
    for part in parts:
        part.unlink()
    return len(parts)


def expire_hours(hours: list[Path], summarize: Callable[[list[Path]], None] | None = None
                 ) -> int:
    """Delete the hour partitions ``hours`` (``summarize(their files)`` first); returns how
    many."""
    if not hours:
        return 0
    if summarize is not None:
        summarize(committed_files(hours))
    for hour in hours:
        shutil.rmtree(hour)
        with contextlib.suppress(OSError):
            hour.parent.rmdir()  # the day, once empty
    return len(hours)


def read_table(paths: Iterable[Path], columns: list[str] | None = None) -> pa.Table:
    """The rows of several flow files as one table (tests, summaries)."""
    tables = [pq.read_table(p, columns=columns) for p in paths]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)


# -- published outputs ---------------------------------------------------------------------------
class Publisher:
    """Writes each proposal into a new ``emit/<generation>`` directory and publishes it by
    swapping the ``current`` link in one rename; ``policies``, ``graph.json``, ... in the state
    directory are links into ``current``, so readers see one whole proposal or the next."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.emit = self.root / "emit"
        self.emit.mkdir(parents=True, exist_ok=True)
        for tmp in self.emit.glob(".*"):  # a generation being written when killed
            shutil.rmtree(tmp, ignore_errors=True)

    def generations(self) -> list[str]:
        return sorted(p.name for p in self.emit.iterdir() if not p.name.startswith("."))

    def current(self) -> Path | None:
        link = self.root / "current"
        return link.resolve() if link.is_symlink() else None

    def publish(self, write: Callable[[Path], None]) -> Path:
        """``write(dir)`` fills a fresh directory; then it becomes ``current``."""
        gens = self.generations()
        number = int(gens[-1]) + 1 if gens else 1
        name = f"{number:08d}"
        staging = self.emit / f".{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        for f in staging.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        final = self.emit / name
        os.rename(staging, final)
        _fsync_dir(self.emit)
        link_tmp = self.root / f".current.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link_tmp)
        os.symlink(os.path.join("emit", name), link_tmp)
        os.replace(link_tmp, self.root / "current")
        _fsync_dir(self.root)
        for published in PUBLISHED:
            link = self.root / published
            if not link.is_symlink() and not link.exists():
                os.symlink(os.path.join("current", published), link)
        for old in self.generations()[:-KEEP_GENERATIONS]:
            shutil.rmtree(self.emit / old, ignore_errors=True)
        return final


# -- edge summary beyond retention ---------------------------------------------------------------
EDGE_SUMMARY = "edges-summary.json"


def merge_edge_summary(root: Path, edges: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold ``edges`` (source, destination, port, protocol, requests, first_seen,
    last_seen) into ``root/edges-summary.json``: per edge the sum of requests and the widest
    time span. Written atomically; returns the summary."""
    path = Path(root) / EDGE_SUMMARY
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        doc = {"edges": []}
    except ValueError as exc:
        raise InputError(f"corrupt edge summary: {exc}", origin=str(path)) from exc
    table: dict[tuple[str, str, int, str], dict[str, Any]] = {
        (e["source"], e["destination"], int(e["port"]), e["protocol"]): e for e in doc["edges"]}
    for e in edges:
        key = (str(e["source"]), str(e["destination"]), int(e["port"]), str(e["protocol"]))
        old = table.get(key)
        if old is None:
            table[key] = {"source": key[0], "destination": key[1], "port": key[2],
                          "protocol": key[3], "requests": int(e.get("requests") or 0),
                          "first_seen": e.get("first_seen"), "last_seen": e.get("last_seen")}
            continue
        old["requests"] = int(old["requests"]) + int(e.get("requests") or 0)
        firsts = [t for t in (old.get("first_seen"), e.get("first_seen")) if t]
        lasts = [t for t in (old.get("last_seen"), e.get("last_seen")) if t]
        old["first_seen"] = min(firsts) if firsts else None
        old["last_seen"] = max(lasts) if lasts else None
    out = {"edges": [table[k] for k in sorted(table)]}
    write_atomic(path, json.dumps(out, indent=1, sort_keys=True).encode())
    return out
