"""Batch inference files, framework-free: check an input's header, split it into typed chunks,
score each chunk through the model server's client, write each chunk's output part atomically,
assemble the parts into one result.

Layout under <data_dir>/jobs/<id>/:
  input.csv|input.parquet   the upload (a server-side input stays where it is)
  chunks/in-00000.parquet   chunk inputs with a `_row` column (0-based row number of the input)
  chunks.json               written last by the split: {"total_chunks", "total_rows"}
  parts/part-00000.parquet  chunk outputs: `_row`, the input columns, the model's outputs
Every file is written to a temporary name and renamed, so a reader (or a task re-run after a
SIGKILL) sees a whole file or none: a chunk whose part exists is done and is never scored again.
An input without rows still gets one (empty) chunk, so its result carries the header.

Errors found in an input are AppErrors in the project's words (row, column, what was expected);
a library's message never reaches the user.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from services.chassis.errors import AppError
from services.model.client import ModelClient, decode_columns, encode_columns

FORMATS = ("csv", "parquet")
ROW = "_row"
CSV_BLOCK = 16 << 20  # the longest line a CSV input may have
GZIP_MAGIC = b"\x1f\x8b"


# -- files ---------------------------------------------------------------------------------------
class JobFiles:
    def __init__(self, data_dir: str | Path, job_id: str):
        self.root = Path(data_dir) / "jobs" / job_id
        self.chunks = self.root / "chunks"
        self.parts = self.root / "parts"
        self.marker = self.root / "chunks.json"

    def chunk(self, idx: int) -> Path:
        return self.chunks / f"in-{idx:05d}.parquet"

    def part(self, idx: int) -> Path:
        return self.parts / f"part-{idx:05d}.parquet"

    def upload(self, fmt: str) -> Path:
        return self.root / f"input.{fmt}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def detect_format(name: str, given: str | None = None) -> str:
    fmt = (given or "").lower() or ("parquet" if name.lower().endswith((".parquet", ".pq")) else
                                    "csv" if name.lower().endswith((".csv", ".csv.gz")) else "")
    if fmt not in FORMATS:
        raise AppError(415, "unsupported_format", f"input must be CSV or Parquet (got {name!r})",
                       {"formats": list(FORMATS)})
    return fmt


def resolve_server_path(data_dir: str | Path, path: str) -> Path:
    """A server-side input must lie inside the data dir (no `..`, no symlink out of it)."""
    root = Path(data_dir).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise AppError(403, "path_not_allowed", "server-side inputs must be inside the pipeline data dir",
                       {"path": path})
    if not resolved.is_file():
        raise AppError(404, "input_not_found", f"no input file {path!r} in the pipeline data dir")
    return resolved


def job_of_path(data_dir: str | Path, path: Path) -> str | None:
    """The job whose directory holds `path` (an upload, a chunk, a result), if any."""
    rel = path.relative_to(Path(data_dir).resolve())
    return rel.parts[1] if len(rel.parts) >= 2 and rel.parts[0] == "jobs" else None


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """A job's working file (chunk input, output part): LZ4 without dictionary pages. Dictionary
    encoding of unique ids and floats was most of a chunk's write time (50,000 rows: 51 ms with
    zstd + dictionaries, 7.5 ms like this, and no larger); the result a user downloads is zstd."""
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="lz4", use_dictionary=False))


# -- limits and bounded reading --------------------------------------------------------------------
@dataclass(frozen=True)
class InputLimits:
    """Per-job bounds (a principal's quota): rows, and bytes after decompression."""
    max_rows: int
    max_bytes: int


def too_large(limit: str, value: int, maximum: int) -> AppError:
    what = {"rows": "rows", "bytes": "bytes after decompression"}[limit]
    return AppError(413, f"quota_{limit}", f"the input has more than {maximum} {what} (the per-job limit "
                    f"'{limit}'); split it into several jobs", {"limit": limit, "max": maximum, "seen": value})


class _Bounded(io.RawIOBase):
    """A read-only stream that refuses to yield more than `limit` bytes: a gzip bomb stops here,
    while it is being decompressed, not after."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.seen = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.inner.read(len(buf))
        self.seen += len(data)
        if self.seen > self.limit:
            raise too_large("bytes", self.seen, self.limit)
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def _open_csv_bytes(path: Path, limits: InputLimits):
    raw = path.open("rb")
    gz = raw.read(2) == GZIP_MAGIC
    raw.seek(0)
    return _Bounded(gzip.GzipFile(fileobj=raw) if gz else raw, limits.max_bytes)


# -- the header check (before a job is accepted) -----------------------------------------------------
def _pa_type(datatype: str) -> pa.DataType:
    if datatype.startswith("FP"):
        return pa.float64()
    if datatype.startswith(("INT", "UINT")):
        return pa.int64()
    if datatype == "BOOL":
        return pa.bool_()
    return pa.string()


_EXPECTED = {pa.float64(): "a number", pa.int64(): "an integer", pa.bool_(): "true or false"}


def _expected(datatype: str) -> str:
    return _EXPECTED.get(_pa_type(datatype), "text")


@dataclass
class Header:
    columns: list[str]
    types: dict[str, pa.DataType] | None = None  # Parquet only: CSV types are known after reading
    rows: int | None = None                      # Parquet only
    data_bytes: int | None = None                # Parquet only: uncompressed size of the data


def read_header(path: Path, fmt: str, limits: InputLimits) -> Header:
    """The column names (and for Parquet the types, rows and uncompressed size) at the cost of one
    line or one footer; a malformed input is a 422 here, not a failed job later."""
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
            data_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            return Header(list(schema.names), dict(zip(schema.names, schema.types)), meta.num_rows, data_bytes)
        with _open_csv_bytes(path, limits) as stream:
            line = io.BufferedReader(stream, 1 << 20).readline(CSV_BLOCK + 1)
        if len(line) > CSV_BLOCK:
            raise pa.ArrowInvalid("straddling line")
        if not line.strip():
            raise AppError(422, "empty_input", "the input is empty: a CSV needs at least a header line")
        return Header(list(pacsv.read_csv(io.BytesIO(line)).schema.names))
    except AppError:
        raise
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise unreadable(fmt, exc) from None


def unreadable(fmt: str, exc: Exception) -> AppError:
    text = str(exc)
    if "straddl" in text:
        return AppError(422, "line_too_long", f"a line of the input is longer than {CSV_BLOCK >> 20} MiB; "
                        "check the quoting or split long values", {"max_line_bytes": CSV_BLOCK})
    if "Empty CSV file" in text or "empty" in text.lower() and fmt == "csv":
        return AppError(422, "empty_input", "the input is empty: a CSV needs at least a header line")
    return AppError(422, "unreadable_input", f"the input is not a readable {fmt.upper()} file",
                    {"format": fmt})


def check_columns(header: Header, metadata: Mapping | None, limits: InputLimits) -> None:
    """Reserved or duplicated column names, the model's inputs present with usable types, and the
    Parquet footer within the per-job limits; each refusal names the column or the limit."""
    seen: set[str] = set()
    for name in header.columns:
        if name == ROW:
            raise AppError(422, "reserved_column", f"column '{ROW}' is reserved for the row number; rename it",
                           {"column": name})
        if name in seen:
            raise AppError(422, "duplicate_column", f"column '{name}' appears more than once in the header",
                           {"column": name})
        seen.add(name)
    if header.rows is not None and header.rows > limits.max_rows:
        raise too_large("rows", header.rows, limits.max_rows)
    if header.data_bytes is not None and header.data_bytes > limits.max_bytes:
        raise too_large("bytes", header.data_bytes, limits.max_bytes)
    if metadata is None:
        return
    missing = [s["name"] for s in metadata["inputs"] if s["name"] not in seen]
    if missing:
        raise AppError(422, "missing_columns", f"the input lacks the model's input column(s): {', '.join(missing)}",
                       {"missing": missing, "model": metadata.get("name")})
    for spec in metadata["inputs"]:
        have = (header.types or {}).get(spec["name"])
        want = _pa_type(spec["datatype"])
        if have is not None and not pa.types.is_null(have) and not _castable(have, want):
            raise AppError(422, "invalid_column_type", f"column '{spec['name']}' is {have}, the model expects "
                           f"{_expected(spec['datatype'])}", {"column": spec["name"], "type": str(have),
                                                              "expected": spec["datatype"]})


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    numeric = pa.types.is_integer(have) or pa.types.is_floating(have) or pa.types.is_decimal(have)
    if pa.types.is_floating(want) or pa.types.is_integer(want):
        return numeric or pa.types.is_boolean(have)
    if pa.types.is_boolean(want):
        return pa.types.is_boolean(have) or pa.types.is_integer(have)
    return True


# -- splitting -----------------------------------------------------------------------------------
def _input_types(metadata: Mapping) -> dict[str, pa.DataType]:
    return {s["name"]: _pa_type(s["datatype"]) for s in metadata["inputs"]}


def _csv_batches(path: Path, limits: InputLimits, types: Mapping[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    bad: list = []

    def invalid_row(row) -> str:
        bad.append(row)
        return "error"

    with _open_csv_bytes(path, limits) as stream:
        try:
            yield from pacsv.open_csv(io.BufferedReader(stream, CSV_BLOCK),
                                      read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                                      parse_options=pacsv.ParseOptions(invalid_row_handler=invalid_row),
                                      convert_options=pacsv.ConvertOptions(column_types=dict(types)))
        except pa.ArrowInvalid as exc:
            if bad:
                row = bad[0]
                line = row.number if row.number and row.number > 0 else None
                raise AppError(422, "malformed_row", f"line {line or '?'} has {row.actual_columns} fields, the "
                               f"header has {row.expected_columns}", {"line": line}) from None
            raise _conversion_error(path, limits, types, exc) from None


_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): .*CSV conversion error to (\w+): invalid value '(.*)'",
                             re.DOTALL)


def _conversion_error(path: Path, limits: InputLimits, types: Mapping[str, pa.DataType], exc: Exception) -> AppError:
    """Turn Arrow's conversion error into row, column and expectation: re-read that one column as
    text and find the first value that does not convert (only on this failure path)."""
    m = _CSV_CONVERSION.search(str(exc))
    if not m:
        return unreadable("csv", exc)
    with _open_csv_bytes(path, limits) as stream:
        names = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK)).schema.names
    column = names[int(m.group(1))]
    want = types.get(column, pa.string())
    row = 0
    with _open_csv_bytes(path, limits) as stream:
        reader = pacsv.open_csv(io.BufferedReader(stream, CSV_BLOCK),
                                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                                convert_options=pacsv.ConvertOptions(include_columns=[column],
                                                                     column_types={column: pa.string()}))
        for batch in reader:
            values = batch.column(0)
            try:
                pc.cast(values, want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                for i, v in enumerate(values.to_pylist()):
                    try:
                        pc.cast(pa.array([v]), want)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        return _bad_value(column, row + i, v, want)
            row += batch.num_rows
    return _bad_value(column, None, m.group(3), want)


def _bad_value(column: str, row: int | None, value, want: pa.DataType) -> AppError:
    shown = str(value)[:40]
    where = f"row {row}" if row is not None else "a row"
    expected = _EXPECTED.get(want, "text")
    return AppError(422, "invalid_value", f"{where}, column '{column}': expected {expected}, got {shown!r}",
                    {"row": row, "column": column, "value": shown, "expected": str(want)})


def _parquet_batches(path: Path, limits: InputLimits, types: Mapping[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    seen = 0
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        seen += batch.nbytes
        if seen > limits.max_bytes:
            raise too_large("bytes", seen, limits.max_bytes)
        columns = []
        for name, col in zip(batch.schema.names, batch.columns):
            want = types.get(name)
            if want is not None and col.type != want:
                try:
                    col = pc.cast(col, want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    values = col.to_pylist()
                    for i, v in enumerate(values):
                        try:
                            pc.cast(pa.array([v]), want)
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                            raise _bad_value(name, row + i, v, want) from None
                    raise
            columns.append(col)
        row += batch.num_rows
        yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    buf: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - size, batch.num_rows)
            buf.append(batch.slice(0, take))
            size += take
            batch = batch.slice(take)
            if size == rows:
                yield pa.Table.from_batches(buf)
                buf, size = [], 0
    if size:
        yield pa.Table.from_batches(buf)


def _check_nulls(table: pa.Table, types: Mapping[str, pa.DataType], first_row: int) -> None:
    for name in types:
        if name in table.column_names and table.column(name).null_count:
            nulls = np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))
            rows = [int(first_row + i) for i in nulls[:20]]
            raise AppError(422, "missing_values", f"row {rows[0]}, column '{name}': a value is required "
                           f"({len(nulls)} empty in this part of the input)",
                           {"column": name, "rows": rows})


def split_input(files: JobFiles, input_path: Path, fmt: str, chunk_rows: int, metadata: Mapping,
                limits: InputLimits) -> tuple[int, int]:
    """Write typed chunk inputs; idempotent: once chunks.json exists the split is done and reused."""
    if files.marker.is_file():
        done = json.loads(files.marker.read_text())
        return done["total_chunks"], done["total_rows"]
    header = read_header(input_path, fmt, limits)
    check_columns(header, metadata, limits)
    types = _input_types(metadata)
    batches = (_parquet_batches if fmt == "parquet" else _csv_batches)(input_path, limits, types)
    total_chunks = total_rows = 0
    schema = None
    try:
        for idx, table in enumerate(_rechunk(batches, chunk_rows)):
            _check_nulls(table, types, total_rows)
            if total_rows + table.num_rows > limits.max_rows:
                raise too_large("rows", total_rows + table.num_rows, limits.max_rows)
            rows = pa.array(np.arange(total_rows, total_rows + table.num_rows, dtype=np.int64))
            write_parquet_atomic(table.add_column(0, ROW, rows), files.chunk(idx))
            total_chunks, total_rows, schema = idx + 1, total_rows + table.num_rows, table.schema
    except AppError:
        raise
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise unreadable(fmt, exc) from None
    if total_chunks == 0:  # a header without rows: one empty chunk, so the result has the header
        schema = schema or pa.schema([(n, types.get(n, pa.string())) for n in header.columns])
        write_parquet_atomic(schema.empty_table().add_column(0, ROW, pa.array([], pa.int64())), files.chunk(0))
        total_chunks = 1
    _atomic_write(files.marker, lambda tmp: tmp.write_text(
        json.dumps({"total_chunks": total_chunks, "total_rows": total_rows})))
    return total_chunks, total_rows


# -- scoring through the model server's client -----------------------------------------------------------
def _empty_outputs(metadata: Mapping) -> dict[str, pa.Array]:
    """The output columns of a model for zero rows (named as decode_columns names them)."""
    cols: dict[str, pa.Array] = {}
    for out in metadata.get("outputs", []):
        width = 1
        for d in out.get("shape", [-1])[1:]:
            width *= max(int(d), 1)
        typ = _pa_type(out.get("datatype", "FP64"))
        names = [out["name"]] if len(out.get("shape", [-1])) == 1 else [f"{out['name']}_{j}" for j in range(width)]
        for name in names:
            cols[name] = pa.array([], typ)
    return cols


_NUMPY = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "BOOL": np.bool_}


def _typed(column: pa.ChunkedArray, datatype: str):
    """A column as the model's tensor type (the split typed it as the nearest Arrow type)."""
    values = column.to_numpy()
    dtype = _NUMPY.get(datatype)
    return values.astype(dtype, copy=False) if dtype is not None else values.tolist()


def score_table(client: ModelClient, metadata: Mapping, table: pa.Table, batch_rows: int) -> dict[str, pa.Array]:
    """Outputs for every row of `table`, in order, batch_rows rows per request."""
    model, version = metadata["name"], metadata["parameters"]["version"]
    pieces: dict[str, list[np.ndarray]] = {}
    for lo in range(0, table.num_rows, batch_rows):
        part = table.slice(lo, batch_rows)
        columns = {s["name"]: _typed(part.column(s["name"]), s["datatype"]) for s in metadata["inputs"]}
        # Binary tensors: bytes in, bytes out, no JSON of 10,000s of floats on either side.
        response = client.infer(model, version, encode_columns(metadata, columns, part.num_rows), binary=True)
        for name, values in decode_columns(response).items():
            pieces.setdefault(name, []).append(np.asarray(values))
    if not pieces:
        return _empty_outputs(metadata)
    return {name: pa.array(np.concatenate(arrays)) for name, arrays in pieces.items()}


def score_chunk(files: JobFiles, idx: int, client: ModelClient, metadata: Mapping, batch_rows: int) -> int:
    """Score one chunk into its part; a part that exists already is kept as it is (idempotent)."""
    part = files.part(idx)
    if part.is_file():
        return pq.ParquetFile(part).metadata.num_rows
    table = pq.read_table(files.chunk(idx))
    for name, values in score_table(client, metadata, table, batch_rows).items():
        table = table.append_column(name if name not in table.column_names else f"prediction_{name}", values)
    write_parquet_atomic(table, part)
    return table.num_rows


# -- results -------------------------------------------------------------------------------------
def iter_result_csv(files: JobFiles, total_chunks: int) -> Iterator[bytes]:
    """One CSV from the parts in chunk order, a part at a time (bounded memory)."""
    for idx in range(total_chunks):
        table = pq.read_table(files.part(idx))
        buf = io.BytesIO()
        pacsv.write_csv(table, buf, write_options=pacsv.WriteOptions(include_header=idx == 0))
        yield buf.getvalue()


def result_parquet(files: JobFiles, total_chunks: int) -> Path:
    """One Parquet file from the parts in chunk order, built once and kept."""
    target = files.root / "result.parquet"
    if target.is_file():
        return target

    def write(tmp: Path) -> None:
        writer = None
        try:
            for idx in range(total_chunks):
                table = pq.read_table(files.part(idx))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
            elif not tmp.exists():
                pq.write_table(pa.table({ROW: pa.array([], pa.int64())}), tmp)

    _atomic_write(target, write)
    return target


def read_rows(files: JobFiles, total_chunks: int, which: str = "parts", limit: int = 10_000) -> list[dict]:
    """Up to `limit` rows of a job's chunk inputs or output parts, for a data-subject export."""
    out: list[dict] = []
    for idx in range(total_chunks or 0):
        path = files.part(idx) if which == "parts" else files.chunk(idx)
        if not path.is_file():
            continue
        out.extend(pq.read_table(path).slice(0, limit - len(out)).to_pylist())
        if len(out) >= limit:
            break
    return out
