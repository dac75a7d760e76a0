"""Dataset files: read JSONL, JSON, CSV or Parquet, detect the row layout and normalise every row."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.data.validate import (LAYOUT_HELP, LAYOUTS, MAX_NESTING_DEPTH, Problem, Record, clip, layout_of,
                                   normalise_row, too_deep)

__all__ = ["LoadResult", "Problem", "detect_format", "load_records", "load_records_from_bytes", "FILE_TYPES",
           "DEFAULT_MAX_DECODED_BYTES", "MAX_NESTING_DEPTH"]

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet"}
FORMATS = ("auto", *LAYOUTS)
_DETECT_ROWS = 1000  # rows looked at to detect the layout; enough for a clear majority, cheap on big files
DEFAULT_MAX_DECODED_BYTES = 1024 ** 3  # callers with settings pass theirs (LORALAB_MAX_DECODED_BYTES)
_PARQUET_BATCH_BYTES = 16 * 1024 * 1024  # decoded Arrow data held at once while a Parquet file is read
_PARQUET_BATCH_ROWS = (16, 4096)


@dataclass
class LoadResult:
    """Canonical records of a dataset file plus every problem found; `lines[i]` is where records[i] came from."""

    format: str
    records: list[Record]
    problems: list[Problem]
    rows: int = 0
    lines: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.records)


@dataclass
class _Rows:
    """Rows read from a file, each with its 1-based line, before any layout check."""

    items: list[tuple[int, Any] | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    count: int = 0  # rows seen, including unparseable ones
    tabular: bool = False  # CSV cells are text, so nested values arrive as JSON strings


@dataclass(frozen=True)
class _Limits:
    """How much a file may grow while it is read: rows wanted, decoded bytes, JSON nesting."""

    cap: int | None
    row_limit: int | None
    max_decoded_bytes: int
    max_depth: int


def load_records(path: str | Path, format: str = "auto", max_rows: int | None = None,
                 row_limit: int | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                 max_depth: int = MAX_NESTING_DEPTH) -> LoadResult:
    """Read a dataset file and normalise it to canonical records, reporting every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}; check the path")
    if FILE_TYPES.get(path.suffix.lower()) == "parquet":  # read from the file: only the needed pages are loaded
        return _load(path, path.name, format, max_rows, row_limit, max_decoded_bytes, max_depth)
    if path.stat().st_size > max_decoded_bytes:  # refuse before reading it into memory
        return LoadResult("unknown" if format == "auto" else format,
                          [], [_too_large(f"the file is {path.stat().st_size} bytes", max_decoded_bytes)], 0)
    return _load(path.read_bytes(), path.name, format, max_rows, row_limit, max_decoded_bytes, max_depth)


def load_records_from_bytes(data: bytes, filename: str, format: str = "auto", max_rows: int | None = None,
                            row_limit: int | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                            max_depth: int = MAX_NESTING_DEPTH) -> LoadResult:
    """Same as `load_records` for an upload: the file type comes from `filename`'s extension."""
    return _load(data, filename, format, max_rows, row_limit, max_decoded_bytes, max_depth)


def _load(source: bytes | Path, filename: str, format: str, max_rows: int | None, row_limit: int | None,
          max_decoded_bytes: int, max_depth: int) -> LoadResult:
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    named = "unknown" if format == "auto" else format  # the layout reported when reading fails early
    suffix = Path(filename).suffix.lower()
    kind = FILE_TYPES.get(suffix)
    if kind is None:
        problem = Problem(0, "file", "unknown_format",
                          f"cannot read {clip(filename)!r}: unknown file type {clip(suffix) or '(no extension)'!r}; "
                          f"save it as {', '.join(FILE_TYPES)}")
        return LoadResult(named, [], [problem], 0)
    limits = _Limits(_cap(max_rows, row_limit), row_limit, max_decoded_bytes, max_depth)
    if kind == "parquet":
        rows = _read_parquet(source, limits)
    elif len(source) > max_decoded_bytes:  # UTF-8 text: its decoded size is about its size
        rows = _Rows(problems=[_too_large(f"the file is {len(source)} bytes", max_decoded_bytes)])
    else:
        rows = _read_text(source, kind, limits)
    if rows.problems and not rows.items:
        return LoadResult(named, [], rows.problems, rows.count)
    if not rows.count:
        return LoadResult(named, [], [Problem(1, "file", "empty_file",
                                               "the file holds no rows; add at least one example")], 0)
    problems = list(rows.problems)
    if row_limit is not None and rows.count > row_limit:
        first_extra = rows.items[row_limit][0] if len(rows.items) > row_limit else rows.items[-1][0]
        problems.append(_too_many_rows(first_extra, row_limit))
        rows.items = rows.items[:row_limit]
        rows.count = row_limit
    return _normalise(rows, format, problems)


def detect_format(rows: list[Any]) -> str:
    """The layout most of the rows have (ties go to the earliest row's); 'unknown' when none fits."""
    seen = [layout for layout in map(layout_of, rows[:_DETECT_ROWS]) if layout is not None]
    if not seen:
        return "unknown"
    counts = Counter(seen)
    best = max(counts.values())
    return next(layout for layout in seen if counts[layout] == best)


def _normalise(rows: _Rows, format: str, problems: list[Problem]) -> LoadResult:
    detected = detect_format([row for _, row in rows.items[:_DETECT_ROWS]])
    layout = detected if format == "auto" else format
    if layout == "unknown":
        problems.append(_unknown_layout(rows.items))
        problems.extend(normalise_row(row, "text", line)[1][0] for line, row in rows.items
                        if not isinstance(row, dict))
        problems.sort(key=lambda p: p.line)
        return LoadResult(layout, [], problems, rows.count)
    records: list[Record] = []
    lines: list[int] = []
    first_line = rows.items[0][0]
    items = rows.items
    for index, (line, row) in enumerate(items):
        items[index] = None  # each parsed row is released once its record exists: only one copy at a time
        record, row_problems = normalise_row(row, layout, line, rows.tabular)
        if record is not None:
            records.append(record)
            lines.append(line)
        problems.extend(row_problems)
    rows.items = []
    if not records and detected not in ("unknown", layout):
        problems.append(Problem(first_line, "file", "unknown_format",
                                f"the rows look like the {detected} layout, not {layout}; "
                                f"use format 'auto' or '{detected}'"))
    problems.sort(key=lambda p: p.line)
    return LoadResult(layout, records, problems, rows.count, lines)


def _unknown_layout(items: list[tuple[int, Any]]) -> Problem:
    first = next(((line, row) for line, row in items if isinstance(row, dict)), None)
    if first is None:
        return Problem(items[0][0], "row", "unknown_format",
                       "no row is a JSON object, so no layout can be detected; each row must be {\"key\": value, ...}")
    line, row = first
    keys = ", ".join(clip(str(key)) for key in list(row)[:12]) or "(none)"
    accepted = "; ".join(LAYOUT_HELP[name] for name in LAYOUTS)
    return Problem(line, "row", "unknown_format",
                   f"no known layout: the rows have the keys {keys}. Accepted layouts: {accepted}. "
                   "Rename the columns, or name the format explicitly")


def _cap(max_rows: int | None, row_limit: int | None) -> int | None:
    """Rows worth reading: the first max_rows, or one past row_limit to know that it was exceeded."""
    caps = [n for n in (max_rows, None if row_limit is None else row_limit + 1) if n is not None]
    return min(caps) if caps else None


def _too_many_rows(line: int, row_limit: int) -> Problem:
    return Problem(line, "file", "too_many_rows", f"the file has more than {row_limit} rows, the most allowed; "
                   f"split it or use only the first {row_limit} rows")


def _too_large(what: str, limit: int) -> Problem:
    return Problem(0, "file", "too_large", f"{what}, more than the {limit} bytes of decoded data allowed; "
                   "split it into smaller files")


def _too_deep_problem(line: int, field: str = "row") -> Problem:
    return Problem(line, field, "bad_json", f"the JSON is nested too deeply (more than {MAX_NESTING_DEPTH} "
                   "levels of lists and objects); flatten the row")


def _read_text(data: bytes, kind: str, limits: _Limits) -> _Rows:
    if kind in ("csv", "tsv"):
        return _read_csv(data, "\t" if kind == "tsv" else ",", limits.cap)
    return _read_json(data, kind, limits)


def _decode(data: bytes) -> tuple[str, Problem | None]:
    """UTF-8 text (a BOM is dropped), or a not_utf8 problem at the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return "", Problem(line, "file", "not_utf8",
                           f"the file is not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                           f"{_guess_encoding(data)}; save the file as UTF-8 (in Excel: 'CSV UTF-8') and upload it again")


def _guess_encoding(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "(it looks like UTF-16)"
    for name, label in (("cp932", "Shift_JIS (cp932)"), ("cp1252", "Windows-1252 / Latin-1")):
        try:
            data.decode(name)
        except UnicodeDecodeError:
            continue
        return f"(it may be {label})"
    return "(unknown encoding)"


def _parse(text: str | bytes, line: int, max_depth: int) -> tuple[Any, Problem | None]:
    """One JSON value; a problem (bad_json) for broken syntax, huge integers or nesting past max_depth."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, Problem(line, "row", "bad_json", f"invalid JSON at column {exc.colno}: {exc.msg}; "
                             "each line must hold one complete JSON object")
    except RecursionError:
        return None, _too_deep_problem(line)
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, Problem(line, "row", "bad_json", f"invalid JSON: {clip(str(exc), 120)}; write the value as text")
    if too_deep(value, max_depth):
        return None, _too_deep_problem(line)
    return value, None


def _read_json(data: bytes, kind: str, limits: _Limits) -> _Rows:
    """A JSON array, a single object, or JSON Lines, whatever the extension promised."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    while start < len(data) and data[start] in b" \t\r\n":
        start += 1
    first = data[start:start + 1]
    if first == b"[":
        return _read_document(data, kind, limits)
    if first == b"{":
        end = data.find(b"\n", start)
        head = data[start:] if end < 0 else data[start:end]
        try:
            json.loads(head)
        except (ValueError, RecursionError):  # not one object on its first line: maybe one multi-line document
            rows = _read_document(data, kind, limits)
            if rows.items or not rows.problems or rows.problems[0].code != "bad_json":
                return rows
            fallback = _read_jsonl(data, limits)
            return fallback if fallback.items else rows
        rows = _read_jsonl(data, limits)
        if rows.count == 1 and len(rows.items) == 1:  # one object: a row, or a {"data": [...]} wrapper
            line, doc = rows.items[0]
            items = _unwrap(doc)
            if len(items) != 1 or items[0] is not doc:
                chosen = items if limits.cap is None else items[:limits.cap]
                return _Rows(items=[(i + 1, row) for i, row in enumerate(chosen)], count=len(chosen))
        return rows
    return _read_jsonl(data, limits)


def _read_document(data: bytes, kind: str, limits: _Limits) -> _Rows:
    """The whole file as one JSON document (array, lone object or wrapper); JSON Lines when that fails."""
    text, problem = _decode(data)
    if problem is not None:
        return _Rows(problems=[problem])
    stripped = text.lstrip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if stripped.startswith("[") and kind == "json":
            return _Rows(problems=[_bad_document(exc)], count=1)
        del text, stripped
        rows = _read_jsonl(data, limits)
        return rows if rows.items else _Rows(problems=[_bad_document(exc)], count=1)
    except (RecursionError, ValueError) as exc:
        return _Rows(problems=[_locate_bad_element(text, exc)], count=1)
    leading = text.count("\n", 0, len(text) - len(stripped))
    del text, stripped
    is_object = isinstance(doc, dict)
    items = _unwrap(doc)
    del doc
    chosen = items if limits.cap is None else items[:limits.cap]
    del items
    if is_object and len(chosen) == 1:  # a lone object: its physical first line
        lined = [(leading + 1, chosen[0])]
    else:
        lined = [(i + 1, row) for i, row in enumerate(chosen)]
    del chosen
    rows = _Rows(count=len(lined))
    for line, row in lined:
        if too_deep(row, limits.max_depth):
            rows.problems.append(_too_deep_problem(line))
        else:
            rows.items.append((line, row))
    return rows


def _locate_bad_element(text: str, exc: Exception) -> Problem:
    """The array element (line = index + 1) that made the whole-document parse fail past JSON syntax."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text.startswith("[", pos):
        pos += 1
        for index in range(len(text)):
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            try:
                _, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as error:
                return _bad_document(error)
            except (RecursionError, ValueError) as error:
                return _element_problem(index + 1, error)
    return _element_problem(1 + text.count("\n", 0, pos), exc)


def _element_problem(line: int, exc: Exception) -> Problem:
    if isinstance(exc, RecursionError):
        return _too_deep_problem(line)
    return Problem(line, "row", "bad_json", f"invalid JSON: {clip(str(exc), 120)}; write the value as text")


def _unwrap(doc: Any) -> list[Any]:
    """Rows of a parsed JSON document: the array itself, a lone object, or {"data": [...]}-style wrappers."""
    if isinstance(doc, list):
        return doc
    # Row layouts whose only key holds a list of objects are rows themselves, not wrappers.
    if isinstance(doc, dict) and len(doc) == 1 and not ROW_LIST_KEYS.intersection(doc):
        (value,) = doc.values()
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    return [doc]


ROW_LIST_KEYS = frozenset({"messages", "conversations"})


def _bad_document(exc: json.JSONDecodeError) -> Problem:
    return Problem(exc.lineno, "file", "bad_json",
                   f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                   "fix the syntax there (often a missing comma, quote or bracket)")


def _read_jsonl(data: bytes, limits: _Limits) -> _Rows:
    """JSON Lines parsed one line at a time from the bytes (no decoded copy of the whole file)."""
    rows = _Rows()
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    number = 0
    size = len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            end = size
        number += 1
        raw = data[pos:end]
        pos = end + 1
        if not raw or raw.isspace():
            continue
        if limits.cap is not None and rows.count >= limits.cap:
            break
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _Rows(problems=[_decode(data)[1]])
        rows.count += 1
        value, problem = _parse(line, number, limits.max_depth)
        if problem is None:
            rows.items.append((number, value))
        else:
            rows.problems.append(problem)
    return rows


def _read_csv(data: bytes, delimiter: str, cap: int | None) -> _Rows:
    """CSV/TSV with a header row; each row's line is the physical line it starts on (header = line 1)."""
    rows = _Rows(tabular=True)
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")  # decoded as it is read
    reader = csv.reader(stream, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for values in reader:
            line, start = start, reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if header is None:
                header = [name.strip() for name in values]
                continue
            if cap is not None and rows.count >= cap:
                break
            rows.count += 1
            if len(values) > len(header):
                rows.problems.append(Problem(line, "row", "wrong_type",
                                             f"the row has {len(values)} values but the header has {len(header)} "
                                             "columns; put values that contain the delimiter in double quotes"))
                continue
            # short rows simply lack their last columns, which then read as missing fields
            rows.items.append((line, {name: value for name, value in zip(header, values) if name}))
    except UnicodeDecodeError:
        return _Rows(problems=[_decode(data)[1]])
    except csv.Error as exc:  # the reader cannot resynchronise after this, so reading stops here
        rows.problems.append(Problem(start, "row", "unknown_format",
                                     f"the CSV cannot be parsed from line {start} on ({clip(str(exc), 120)}); close "
                                     'every quoted value with " and write quotes inside values as ""'))
    return rows


def _read_parquet(source: bytes | Path, limits: _Limits) -> _Rows:
    """Parquet rows (line = index + 1): refused from the metadata, then by the decoded size, before any Python copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def open_file(**kwargs):
        return pq.ParquetFile(str(source) if isinstance(source, Path) else pa.BufferReader(source), **kwargs)

    try:
        parquet = open_file()
        meta, schema = parquet.metadata, parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        return _Rows(problems=[_not_parquet(exc)])
    refusal = _parquet_refusal(meta, schema, limits)
    if refusal is not None:
        return refusal
    texts = [f.name for f in schema if _is_text(f.type) or pa.types.is_dictionary(f.type)]
    nested = {f.name for f in schema if f.type.num_fields}
    # Text columns are counted as dictionaries (no expansion); nested columns are decoded, so batches are sized
    # so that even the longest value an honest file can hold there (a whole column chunk) keeps them small.
    chunk = max((column.total_uncompressed_size for g in range(meta.num_row_groups)
                 for column in map(meta.row_group(g).column, range(meta.num_columns))
                 if column.path_in_schema.split(".")[0] in nested), default=0)
    low, high = _PARQUET_BATCH_ROWS
    average = max(1, _claimed_bytes(meta) // max(1, meta.num_rows))
    batch_rows = max(low, min(high, _PARQUET_BATCH_BYTES // max(average, chunk, 1)))
    try:
        decoded = _count_decoded(open_file(read_dictionary=texts), batch_rows, limits)
        if decoded > limits.max_decoded_bytes:
            return _Rows(problems=[_too_large(f"the Parquet file decodes to at least {decoded} bytes "
                                              "(repeated values compress to almost nothing)", limits.max_decoded_bytes)])
        return _parquet_rows(parquet, batch_rows, limits)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return _Rows(problems=[_not_parquet(exc)])
    finally:
        pa.default_memory_pool().release_unused()


def _parquet_refusal(meta, schema, limits: _Limits) -> _Rows | None:
    """What the footer alone shows to be too much: nesting, rows past row_limit, uncompressed bytes."""
    depth, nested_dictionary = _type_shape(schema)
    if depth > limits.max_depth or nested_dictionary:
        what = (f"nested more than {limits.max_depth} levels deep" if depth > limits.max_depth
                else "dictionary-encoded inside lists or structs")
        return _Rows(problems=[Problem(0, "file", "wrong_type", f"the Parquet columns are {what}; "
                                       "write plain columns (strings, lists of strings or of structs)")])
    num_rows, row_limit, cap = meta.num_rows, limits.row_limit, limits.cap
    if row_limit is not None and num_rows > row_limit and (cap is None or cap > row_limit):
        return _Rows(problems=[_too_many_rows(row_limit + 1, row_limit)], count=num_rows)
    wanted = num_rows if cap is None else min(num_rows, cap)
    claimed = _claimed_bytes(meta)
    if num_rows and claimed * wanted // num_rows > limits.max_decoded_bytes:
        return _Rows(problems=[_too_large(f"the Parquet file holds {claimed} bytes uncompressed",
                                          limits.max_decoded_bytes)])
    return None


def _claimed_bytes(meta) -> int:
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    return max(sum(g.total_byte_size for g in groups),
               sum(g.column(c).total_uncompressed_size for g in groups for c in range(g.num_columns)))


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
        or pa.types.is_large_binary(kind)


def _count_decoded(parquet, batch_rows: int, limits: _Limits) -> int:
    """Bytes the rows take once decoded, dictionary columns counted as their expanded values, batch by batch."""
    import pyarrow.compute as pc
    import pyarrow.types as types

    decoded = rows = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, use_threads=False):
        if limits.cap is not None:
            batch = batch.slice(0, limits.cap - rows)
        rows += batch.num_rows
        for column in batch.columns:
            if types.is_dictionary(column.type):
                lengths = pc.take(pc.binary_length(column.dictionary) if _is_text(column.type.value_type)
                                  else _value_sizes(column.dictionary), column.indices)
                decoded += (pc.sum(lengths).as_py() or 0) + 8 * len(column)
            else:
                decoded += column.nbytes
        del batch
        if decoded > limits.max_decoded_bytes or (limits.cap is not None and rows >= limits.cap):
            break
    return decoded


def _value_sizes(dictionary):
    """Per-value decoded size of a dictionary of fixed-width values (numbers, dates)."""
    import pyarrow as pa

    width = max(1, dictionary.type.bit_width // 8) if hasattr(dictionary.type, "bit_width") else 8
    return pa.array([width] * len(dictionary), pa.int64())


def _parquet_rows(parquet, batch_rows: int, limits: _Limits) -> _Rows:
    rows = _Rows()
    for batch in parquet.iter_batches(batch_size=batch_rows, use_threads=False):
        if limits.cap is not None:
            batch = batch.slice(0, limits.cap - rows.count)
        # nulls (missing cells) are dropped so they read as missing fields, like absent JSON keys
        for row in batch.to_pylist():
            rows.count += 1
            rows.items.append((rows.count, {k: v for k, v in row.items() if v is not None}))
        if limits.cap is not None and rows.count >= limits.cap:
            break
    return rows


def _type_shape(schema) -> tuple[int, bool]:
    """How deeply the columns nest lists, structs and maps (a row is level 1), and whether a dictionary is nested."""
    import pyarrow as pa

    deepest, nested_dictionary = 1, False
    stack = [(field.type, 1) for field in schema]
    while stack:
        kind, depth = stack.pop()
        if pa.types.is_dictionary(kind):
            nested_dictionary = nested_dictionary or depth > 1
            kind = kind.value_type
        if kind.num_fields:
            deepest = max(deepest, depth + 1)
            stack.extend((kind.field(i).type, depth + 1) for i in range(kind.num_fields))
    return deepest, nested_dictionary


def _not_parquet(exc: Exception) -> Problem:
    return Problem(0, "file", "unknown_format",
                   f"not a readable Parquet file ({clip(str(exc), 200)}); export it again or use JSONL")
