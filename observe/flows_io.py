"""Flow records on disk: Parquet with exactly :data:`observe.schema.FLOW_SCHEMA`.

Written with zstd compression, one row group per written batch (~64k rows), atomically
(a temporary file in the target directory, renamed on success), so a crash never leaves a
half-written flows file that a later run would trust. The schema version travels in the
Parquet schema metadata and is checked on read.

Encoding is the costly part of writing (more than compression), so dictionary encoding is
limited to the low-cardinality columns and min/max statistics to the non-string ones (string
statistics of ids and paths are useless for pruning). :class:`FlowWriter` encodes on a
background thread (Parquet encoding releases the GIL) fed by a small bounded queue, so parsing
the next batch overlaps writing the previous one while memory stays bounded.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from observe.errors import InputError
from observe.schema import ADDED_IN, FLOW_SCHEMA, READABLE_VERSIONS, conform

log = logging.getLogger(__name__)

PARQUET_MAGIC = b"PAR1"
_VERSION_KEY = b"meshwright.schema_version"

# Columns with few distinct values: dictionary encoding makes them small and cheap to write.
# The others (ids, origins, paths, times, ports) mostly fail dictionary encoding after paying
# for the attempt.
_DICT_COLUMNS = (
    "src_ip", "dst_ip", "dialed_ip", "dst_port", "dialed_port", "service_host", "direction",
    "reporter", "src_workload", "dst_workload", "src_principal", "dst_principal", "transport",
    "protocol", "http_version", "method", "authority", "status", "response_flags",
    "response_detail", "mtls", "sni", "upstream_cluster", "user_agent", "denied",
    "denied_by", "source",
)
_STATS_COLUMNS = tuple(f.name for f in FLOW_SCHEMA if not pa.types.is_string(f.type))
# Times (near-sorted) and durations (small): delta packing is both faster and smaller than
# plain + zstd (measured: time 6.6 -> 4.1 ms, size halved, per 196k rows).
_DELTA_COLUMNS = ("time", "duration_ms")
#: Batches waiting for the writer thread: bounds memory (a batch is ~64k rows).
_QUEUE_DEPTH = 1
_DONE = None


def looks_like_parquet(head: bytes) -> bool:
    """True if ``head`` (a file's first bytes) starts with the Parquet magic."""
    return head[:4] == PARQUET_MAGIC


class FlowWriter:
    """Streams flow batches into one Parquet file; the file appears only on clean exit.

    >>> with FlowWriter(path) as w:        # doctest: +SKIP
    ...     for batch in batches:
    ...         w.write(batch)

    With ``threaded`` (the default) batches are encoded by a background thread in the order
    written; an encoding error surfaces as InputError from the next ``write`` or the exit.
    """

    def __init__(self, path: Path, *, compression: str = "zstd", threaded: bool = True):
        self.path = Path(path)
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._compression = compression
        self._threaded = threaded
        self._writer: pq.ParquetWriter | None = None
        self._queue: queue.Queue[pa.RecordBatch | pa.Table | None] = queue.Queue(_QUEUE_DEPTH)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> FlowWriter:
        try:
            self._writer = pq.ParquetWriter(
                self._tmp,
                FLOW_SCHEMA,
                compression=self._compression,
                use_dictionary=list(_DICT_COLUMNS),
                write_statistics=list(_STATS_COLUMNS),
                column_encoding=dict.fromkeys(_DELTA_COLUMNS, "DELTA_BINARY_PACKED"),
                # Batches arrive whole (tens of thousands of rows): encoding them in one go
                # instead of Arrow's default 1024-row slices, into v2 data pages (levels left
                # uncompressed), makes the writer ~10 % faster; readers since 2018 take v2.
                write_batch_size=1 << 16,
                data_page_version="2.0",
            )
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot write flows: {exc}", origin=str(self.path)) from exc
        if self._threaded:
            self._thread = threading.Thread(
                target=self._drain, name="meshwright-flow-writer", daemon=True
            )
            self._thread.start()
        return self

    def _put(self, batch: pa.RecordBatch | pa.Table) -> None:
        writer = self._writer
        assert writer is not None
        if isinstance(batch, pa.RecordBatch):
            writer.write_batch(batch)
        else:
            writer.write_table(batch)

    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _DONE:
                return
            if self._error is not None:
                continue  # keep consuming so that the producer never blocks
            try:
                self._put(batch)
            except BaseException as exc:  # re-raised on the caller's thread
                self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise InputError(f"cannot write flows: {exc}", origin=str(self.path)) from exc

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append one batch (cast to FLOW_SCHEMA if it isn't already)."""
        if self._writer is None:
            raise RuntimeError("FlowWriter.write outside its with-block")
        if batch.num_rows == 0:
            return
        if not batch.schema.equals(FLOW_SCHEMA):
            batch = conform(batch)
        self._raise_pending()
        if self._thread is not None:
            self._queue.put(batch)
        else:
            try:
                self._put(batch)
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"cannot write flows: {exc}", origin=str(self.path)) from exc
        self.rows += batch.num_rows

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_DONE)
            thread.join()
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
            if exc_type is None:
                self._raise_pending()
                os.replace(self._tmp, self.path)
        except (OSError, pa.ArrowException) as err:
            if exc_type is None:
                raise InputError(f"cannot write flows: {err}", origin=str(self.path)) from err
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def write_flows(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Write all ``batches`` to ``path`` (Parquet, zstd, atomic); returns the row count."""
    with FlowWriter(path) as writer:
        for batch in batches:
            writer.write(batch)
    return writer.rows


def _check_schema(pf: pq.ParquetFile, origin: str) -> None:
    schema = pf.schema_arrow
    meta = schema.metadata or {}
    version = meta.get(_VERSION_KEY)
    if version is None:
        raise InputError(
            "Parquet file is not a meshwright flows file (no schema version)",
            origin=origin,
            hint="re-create it with 'meshwright observe --flows-out'",
        )
    if version.decode() not in READABLE_VERSIONS:
        raise InputError(
            f"flows file has schema version {version.decode()}, this meshwright reads "
            f"{', '.join(READABLE_VERSIONS)}",
            origin=origin,
            hint="re-create it from the original logs with this version",
        )
    later = _added_after(version.decode())
    for f in FLOW_SCHEMA:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            if f.name in later:
                continue  # an older file: read as null
            raise InputError(f"flows file lacks column '{f.name}'", origin=origin)
        if schema.field(idx).type != f.type:
            raise InputError(
                f"flows column '{f.name}' is {schema.field(idx).type}, expected {f.type}",
                origin=origin,
            )


def _added_after(version: str) -> set[str]:
    """Fields that versions newer than ``version`` added."""
    return {name for v, names in ADDED_IN.items() if int(v) > int(version) for name in names}


def read_flows(
    path: Path, columns: list[str] | None = None, batch_size: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Stream flow batches from a flows file written by :func:`write_flows`.

    With ``columns`` only those columns are read (a schema subset, same order as given).
    Raises InputError when the file is not a readable meshwright flows file.
    """
    origin = str(path)
    if columns is not None:
        unknown = [c for c in columns if FLOW_SCHEMA.get_field_index(c) < 0]
        if unknown:
            raise InputError(f"unknown flow columns: {', '.join(unknown)}", origin=origin)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError as exc:
        raise InputError("no such file", origin=origin) from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"not a readable Parquet file: {exc}", origin=origin) from exc
    with pf:
        _check_schema(pf, origin)
        present = set(pf.schema_arrow.names)
        wanted = columns if columns is not None else [f.name for f in FLOW_SCHEMA]
        readable = [c for c in wanted if c in present]
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=readable):
                if columns is None:
                    # By name, with the contract schema's field docs and version metadata.
                    yield conform(batch)
                elif len(readable) == len(columns):
                    yield batch.select(columns)
                else:  # an older file: its missing columns read as null
                    yield pa.RecordBatch.from_arrays(
                        [batch.column(c) if c in present else
                         pa.nulls(batch.num_rows, FLOW_SCHEMA.field(c).type) for c in columns],
                        names=columns,
                    )
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"corrupt flows file: {exc}", origin=origin) from exc
