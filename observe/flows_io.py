"""Flow records on disk: Parquet with exactly :data:`observe.schema.FLOW_SCHEMA`.

Written with zstd compression, one row group per written batch (~64k rows), atomically
(a temporary file in the target directory, renamed on success), so a crash never leaves a
half-written flows file that a later run would trust. The schema version travels in the
Parquet schema metadata and is checked on read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from observe.errors import InputError
from observe.schema import FLOW_SCHEMA, SCHEMA_VERSION, conform

log = logging.getLogger(__name__)

PARQUET_MAGIC = b"PAR1"
_VERSION_KEY = b"meshwright.schema_version"


def looks_like_parquet(head: bytes) -> bool:
    """True if ``head`` (a file's first bytes) starts with the Parquet magic."""
    return head[:4] == PARQUET_MAGIC


class FlowWriter:
    """Streams flow batches into one Parquet file; the file appears only on clean exit.

    >>> with FlowWriter(path) as w:        # doctest: +SKIP
    ...     for batch in batches:
    ...         w.write(batch)
    """

    def __init__(self, path: Path, *, compression: str = "zstd"):
        self.path = Path(path)
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._compression = compression
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> FlowWriter:
        try:
            self._writer = pq.ParquetWriter(self._tmp, FLOW_SCHEMA, compression=self._compression)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot write flows: {exc}", origin=str(self.path)) from exc
        return self

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append one batch (cast to FLOW_SCHEMA if it isn't already)."""
        if self._writer is None:
            raise RuntimeError("FlowWriter.write outside its with-block")
        if batch.num_rows == 0:
            return
        if not batch.schema.equals(FLOW_SCHEMA):
            batch = conform(batch)
        try:
            if isinstance(batch, pa.RecordBatch):
                self._writer.write_batch(batch)
            else:
                self._writer.write_table(batch)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot write flows: {exc}", origin=str(self.path)) from exc
        self.rows += batch.num_rows

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
            if exc_type is None:
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
    if version.decode() != SCHEMA_VERSION:
        raise InputError(
            f"flows file has schema version {version.decode()}, this meshwright reads "
            f"{SCHEMA_VERSION}",
            origin=origin,
            hint="re-create it from the original logs with this version",
        )
    for f in FLOW_SCHEMA:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise InputError(f"flows file lacks column '{f.name}'", origin=origin)
        if schema.field(idx).type != f.type:
            raise InputError(
                f"flows column '{f.name}' is {schema.field(idx).type}, expected {f.type}",
                origin=origin,
            )


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
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                if columns is None:
                    # By name, with the contract schema's field docs and version metadata.
                    yield conform(batch)
                else:
                    yield batch.select(columns)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"corrupt flows file: {exc}", origin=origin) from exc
