"""The Parquet files of a format-2 index (layout: koclip/index/__init__.py): writing a segment of
rows and a deletion file, and opening and reading them, checked against meta.json."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip.errors import IndexFileError
from koclip.index.format import FORMAT, _crc32_file, _write_data_file

# Rows per Parquet row group: 64 MiB of 512-d float16 vectors, what one read holds in memory.
ROW_GROUP_ROWS = 65536
_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
_INT_TYPES = {"size": pa.int64(), "width": pa.int32(), "height": pa.int32()}
# Why a segment cannot be read: pyarrow reports damage as OSError (failed page checksums among them)
# or ArrowException; FileNotFoundError is left out, so that load_index can retry after a commit.
_ARROW_ERRORS = (OSError, pa.ArrowException, ValueError)


def vector_type(dim: int, dtype: str) -> pa.DataType:
    """The Arrow type of the vector column: fixed_size_list<float16 or float32, non-null>[dim]."""
    return pa.list_(pa.field("element", _ARROW_DTYPES[dtype], nullable=False), dim)


def segment_schema(dim: int, dtype: str, *, model: str, fingerprint: str) -> pa.Schema:
    """The schema of every segment file: the per-image columns, then the vectors.  Its key-value
    metadata "koclip" names the model that made the vectors, so a segment says what it holds."""
    fields = [pa.field("path", pa.string(), nullable=False), pa.field("path_bytes", pa.binary()),
              pa.field("size", pa.int64(), nullable=False), pa.field("sha256", pa.string(), nullable=False),
              pa.field("width", pa.int32(), nullable=False), pa.field("height", pa.int32(), nullable=False),
              pa.field("vector", vector_type(dim, dtype), nullable=False)]
    info = {"format": FORMAT, "model": model, "fingerprint": fingerprint, "dim": int(dim), "dtype": dtype}
    return pa.schema(fields, metadata={"koclip": json.dumps(info)})


def _path_columns(paths: list[str]) -> tuple[pa.Array, pa.Array]:
    """Stored paths -> (path, path_bytes).  A file name that is not valid UTF-8 (Linux allows any
    bytes; Python holds them as surrogate escapes) cannot be a Parquet string: `path` gets a readable
    form (U+FFFD for each bad byte) and `path_bytes` the exact bytes; path_bytes is null otherwise."""
    shown, raw = [], []
    for p in paths:
        try:
            p.encode("utf-8")
            shown.append(p)
            raw.append(None)
        except UnicodeEncodeError:
            b = p.encode("utf-8", "surrogateescape")
            shown.append(b.decode("utf-8", "replace"))
            raw.append(b)
    return pa.array(shown, pa.string()), pa.array(raw, pa.binary())


def _table(schema: pa.Schema, items: dict, vectors: np.ndarray, dim: int, dtype: str) -> pa.Table:
    n = len(items["path"])
    v = np.ascontiguousarray(vectors, dtype=dtype)
    if v.shape != (n, dim):
        raise ValueError(f"a segment block has {n} records but vectors of shape {v.shape}, expected ({n}, {dim})")
    path, path_bytes = _path_columns(items["path"])
    columns = [path, path_bytes, pa.array(items["size"], pa.int64()), pa.array(items["sha256"], pa.string()),
               pa.array(items["width"], pa.int32()), pa.array(items["height"], pa.int32()),
               pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), _ARROW_DTYPES[dtype]),
                                                 type=vector_type(dim, dtype))]
    return pa.Table.from_arrays(columns, schema=schema)


def write_segment_file(path, blocks: Iterable[tuple[dict, np.ndarray]], *, dim: int, dtype: str, model: str,
                       fingerprint: str) -> int:
    """Write a segment file at `path` from `blocks` of rows; returns the number of rows.

    blocks: (items, vectors) pairs in row order: items maps each of _Records.COLUMNS (path, size,
        sha256, width, height) to a list of m values, vectors is (m, dim), rows L2-normalised.
    Vectors are stored uncompressed (float16 codes barely compress), the other columns with zstd;
    every page carries a CRC32 (Parquet's page checksum), verified whenever koclip reads it.
    """
    schema = segment_schema(dim, dtype, model=model, fingerprint=fingerprint)
    compression = {c: "zstd" for c in schema.names}
    compression["vector"] = "none"
    rows = 0
    with pq.ParquetWriter(str(path), schema, compression=compression, write_page_checksum=True,
                          use_dictionary=["width", "height"],
                          write_statistics=["path", "size", "width", "height"]) as w:
        for items, vectors in blocks:
            if len(items["path"]):
                w.write_table(_table(schema, items, vectors, dim, dtype), row_group_size=ROW_GROUP_ROWS)
                rows += len(items["path"])
        if rows == 0:  # an empty index still has a segment, so that its schema is on disk
            w.write_table(schema.empty_table())
    return rows


def _write_segment(directory: Path, blocks, *, start: int, dim: int, dtype: str, model: str,
                   fingerprint: str) -> dict:
    """Write a new segment file into the index `directory`; returns its meta.json entry."""
    rows = []

    def write(p):
        rows.append(write_segment_file(p, blocks, dim=dim, dtype=dtype, model=model, fingerprint=fingerprint))

    entry = _write_data_file(directory, "segment", ".parquet", write, checksum=False)
    return _segment_entry(directory / entry["name"], start, rows[0])


def _segment_entry(path: Path, start: int, rows: int) -> dict:
    return {"name": path.name, "start": int(start), "rows": int(rows), "bytes": path.stat().st_size,
            "footer_crc32": _footer_crc32(path)}


def _footer_crc32(path: Path) -> str:
    """crc32 of a Parquet file's footer (its metadata, its length and the closing magic), as 8 hex
    digits.  The page checksums cover the data; this covers what says where the data is."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise ValueError(f"{size} bytes is too short for a Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != b"PAR1":
            raise ValueError("it does not end in Parquet's magic bytes PAR1")
        n = int.from_bytes(tail[:4], "little")
        if n + 12 > size:
            raise ValueError(f"its footer claims {n:,} bytes of a {size:,}-byte file")
        f.seek(size - 8 - n)
        footer = f.read(n)
    return f"{zlib.crc32(tail, zlib.crc32(footer)):08x}"


def _check_schema(path: Path, schema: pa.Schema, meta: dict) -> None:
    want = segment_schema(meta["dim"], meta["dtype"], model=meta["model"], fingerprint=meta["fingerprint"])
    if not schema.equals(want, check_metadata=False):
        raise IndexFileError(f"segment {path} has columns {schema.to_string(show_schema_metadata=False)!r}, "
                             f"expected those of a {meta['dim']}-d {meta['dtype']} koclip segment; the index is "
                             "inconsistent, rebuild it")
    try:
        info = json.loads((schema.metadata or {}).get(b"koclip", b"{}"))
    except ValueError:
        info = {}
    if not isinstance(info, dict) or (info.get("model"), info.get("fingerprint")) != (meta["model"],
                                                                                        meta["fingerprint"]):
        got = (info.get("model"), info.get("fingerprint")) if isinstance(info, dict) else None
        raise IndexFileError(f"segment {path} holds vectors of model {got}, but the index is of "
                             f"{(meta['model'], meta['fingerprint'])}; the index is inconsistent, rebuild it")


def open_segment(path: Path, entry: dict, meta: dict) -> pq.ParquetFile:
    """Open a segment named in meta.json, checked: size, footer crc32, schema and row count.
    The data pages are checked (by their CRC32) when they are read."""
    size = path.stat().st_size  # FileNotFoundError passes: see load_index
    if size != entry["bytes"]:
        raise IndexFileError(f"segment {path} is {size:,} bytes but meta.json says {entry['bytes']:,}: the file "
                             "is truncated or was replaced; rebuild the index")
    try:
        crc = _footer_crc32(path)
    except ValueError as e:
        raise IndexFileError(f"segment {path} is not a Parquet file ({e}); rebuild the index") from None
    if crc != entry["footer_crc32"]:
        raise IndexFileError(f"segment {path} fails its checksum (footer crc32 {crc}, meta.json says "
                             f"{entry['footer_crc32']}): the file is corrupt; rebuild the index")
    try:
        pf = pq.ParquetFile(str(path), page_checksum_verification=True)
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
    except FileNotFoundError:
        raise
    except _ARROW_ERRORS as e:
        raise IndexFileError(f"segment {path} cannot be read ({e}); rebuild the index") from None
    _check_schema(path, schema, meta)
    if rows != entry["rows"]:
        raise IndexFileError(f"segment {path} holds {rows} rows but meta.json says {entry['rows']}; the index "
                             "is inconsistent, rebuild it")
    groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    if sum(groups) != rows or min(groups, default=0) < 0:
        raise IndexFileError(f"segment {path} is corrupt: its footer says {rows} rows but its row groups hold "
                             f"{groups}; rebuild the index")
    return pf


def read_column(pf: pq.ParquetFile, name: str, where: Path) -> pa.Array:
    """One column of a segment, whole, as one Arrow array (pages checked by their CRC32), one value a row;
    its strings valid UTF-8, so that to_pylist cannot fail."""
    try:
        column = pf.read(columns=[name]).column(0).combine_chunks()
        column.validate(full=True)
    except _ARROW_ERRORS as e:
        raise IndexFileError(f"segment {where} is corrupt: its column {name!r} cannot be read ({e}); "
                             "rebuild the index") from None
    # A damaged page can hold fewer values than its row group has rows: pyarrow reads what there is.
    if len(column) != pf.metadata.num_rows:
        raise IndexFileError(f"segment {where} is corrupt: its column {name!r} holds {len(column)} values for "
                             f"its {pf.metadata.num_rows} rows; rebuild the index")
    return column


def read_paths(pf: pq.ParquetFile, where: Path) -> list[str] | pa.Array:
    """A segment's stored paths: an Arrow string array, or (when some file name is not valid UTF-8)
    a list of str with those names decoded exactly from path_bytes (surrogate escapes)."""
    shown = read_column(pf, "path", where)
    raw = read_column(pf, "path_bytes", where)
    if raw.null_count == len(raw):
        return shown
    out = shown.to_pylist()
    for i, b in enumerate(raw.to_pylist()):
        if b is not None:
            out[i] = b.decode("utf-8", "surrogateescape")
    return out


def iter_vectors(pf: pq.ParquetFile, dim: int, dtype: str, where: Path,
                 row_groups: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (m, dim) `dtype` array) for each row group of a segment, in order; the arrays
    are views of Arrow memory, valid until the next one is read."""
    firsts = row_group_firsts(pf)
    for i in range(len(firsts) - 1) if row_groups is None else row_groups:
        try:
            column = pf.read_row_group(i, columns=["vector"]).column(0)
            column.validate(full=True)
        except _ARROW_ERRORS as e:
            raise IndexFileError(f"segment {where} is corrupt: row group {i} cannot be read ({e}); "
                                 "rebuild the index") from None
        _check_group_rows(where, i, len(column), firsts)
        for chunk, offset in _chunks(column):
            values = chunk.values.to_numpy(zero_copy_only=True)
            yield int(firsts[i]) + offset, values.reshape(len(chunk), dim).view(dtype)


def _chunks(column: pa.ChunkedArray):
    offset = 0
    for chunk in column.chunks:
        if chunk.offset:  # a sliced chunk: its child values start further in
            chunk = pa.FixedSizeListArray.from_arrays(chunk.flatten(), type=chunk.type)
        yield chunk, offset
        offset += len(chunk)


def iter_records(pf: pq.ParquetFile, dim: int, dtype: str, where: Path) -> Iterator[tuple[int, dict, np.ndarray]]:
    """(first row, items {column: list} as _Records.COLUMNS, (m, dim) vectors) for each row group."""
    firsts = row_group_firsts(pf)
    for i in range(len(firsts) - 1):
        try:
            table = pf.read_row_group(i)  # its columns as long as the table, or ArrowInvalid
            table.validate(full=True)  # strings valid UTF-8, for to_pylist
        except _ARROW_ERRORS as e:
            raise IndexFileError(f"segment {where} is corrupt: row group {i} cannot be read ({e}); "
                                 "rebuild the index") from None
        _check_group_rows(where, i, table.num_rows, firsts)
        items = {c: table.column(c).to_pylist() for c in ("path", "size", "sha256", "width", "height")}
        for j, b in enumerate(table.column("path_bytes").to_pylist()):
            if b is not None:
                items["path"][j] = b.decode("utf-8", "surrogateescape")
        column = table.column("vector").combine_chunks()
        vectors = column.flatten().to_numpy(zero_copy_only=True).reshape(len(column), dim).view(dtype)
        yield int(firsts[i]), items, vectors


def _check_group_rows(where: Path, i: int, n: int, firsts: np.ndarray) -> None:
    """Row group i read as `n` values a column: one per row, as the footer says, or IndexFileError.
    (A damaged page can hold fewer values than its row group has rows: pyarrow reads what there is.)"""
    rows = int(firsts[i + 1] - firsts[i])
    if n != rows:
        raise IndexFileError(f"segment {where} is corrupt: a column of row group {i} holds {n} values for its "
                             f"{rows} rows; rebuild the index")


def row_group_firsts(pf: pq.ParquetFile) -> np.ndarray:
    """The first row of each row group, then the row count: (row groups + 1,) int64."""
    meta = pf.metadata
    return np.concatenate([[0], np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
                           ]).astype(np.int64)


# ---------------------------------------------------------------- deletion files

_DELETIONS_SCHEMA = pa.schema([pa.field("segment", pa.string(), nullable=False),
                               pa.field("row", pa.int64(), nullable=False)])


def _write_deletions(directory: Path, dead: dict[str, Iterable[int]]) -> dict:
    """Write a deletion file marking rows deleted: {segment file name: rows within it}; returns its
    meta.json entry (name, rows, bytes, crc32)."""
    names, rows = [], []
    for name, rs in sorted(dead.items()):
        rs = sorted(int(r) for r in rs)
        names += [name] * len(rs)
        rows += rs
    table = pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(rows, pa.int64())],
                                 schema=_DELETIONS_SCHEMA)
    entry = _write_data_file(directory, "deleted", ".parquet",
                             lambda p: pq.write_table(table, str(p), compression="zstd", write_page_checksum=True))
    entry["rows"] = len(rows)
    return entry


def read_deletions(path: Path, entry: dict, segments: dict[str, int]) -> dict[str, np.ndarray]:
    """A deletion file named in meta.json, checked (size, crc32, and rows that exist) ->
    {segment name: sorted rows}.  segments: the index's {segment name: row count}."""
    if path.stat().st_size != entry["bytes"] or _crc32_file(path) != entry["crc32"]:
        raise IndexFileError(f"deletion file {path} is truncated or corrupt (size or crc32 differ from "
                             "meta.json); rebuild the index")
    try:
        table = pq.read_table(str(path))
        # Strings and column names valid UTF-8, columns as long as the table: what follows cannot fail.
        table.validate(full=True)
    except FileNotFoundError:
        raise
    except _ARROW_ERRORS as e:
        raise IndexFileError(f"deletion file {path} cannot be read ({e}); rebuild the index") from None
    if not table.schema.equals(_DELETIONS_SCHEMA, check_metadata=False) or table.num_rows != entry["rows"]:
        raise IndexFileError(f"deletion file {path} holds {table.num_rows} rows of "
                             f"{table.schema.names}, expected {entry['rows']} of ['segment', 'row']; the index is "
                             "inconsistent, rebuild it")
    out: dict[str, list] = {}
    for name, row in zip(table.column("segment").to_pylist(), table.column("row").to_pylist()):
        out.setdefault(name, []).append(row)
    result = {}
    for name, rows in out.items():
        r = np.unique(np.asarray(rows, np.int64))
        if name not in segments or len(r) != len(rows) or r[0] < 0 or r[-1] >= segments[name]:
            raise IndexFileError(f"deletion file {path} marks rows of {name!r} that the index does not hold "
                                 "(or marks one twice); the index is inconsistent, rebuild it")
        result[name] = r
    return result


