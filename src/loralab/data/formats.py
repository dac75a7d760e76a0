"""Dataset files: read JSONL, JSON, CSV or Parquet, detect the row layout and normalise every row."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.data.validate import LAYOUT_HELP, LAYOUTS, Problem, Record, layout_of, normalise_row

__all__ = ["LoadResult", "Problem", "detect_format", "load_records", "load_records_from_bytes", "FILE_TYPES"]

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet"}
FORMATS = ("auto", *LAYOUTS)
_DETECT_ROWS = 1000  # rows looked at to detect the layout; enough for a clear majority, cheap on big files


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

    items: list[tuple[int, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    count: int = 0  # rows seen, including unparseable ones
    tabular: bool = False  # CSV cells are text, so nested values arrive as JSON strings


def load_records(path: str | Path, format: str = "auto", max_rows: int | None = None,
                 row_limit: int | None = None) -> LoadResult:
    """Read a dataset file and normalise it to canonical records, reporting every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}; check the path")
    return load_records_from_bytes(path.read_bytes(), path.name, format, max_rows, row_limit)


def load_records_from_bytes(data: bytes, filename: str, format: str = "auto", max_rows: int | None = None,
                            row_limit: int | None = None) -> LoadResult:
    """Same as `load_records` for an upload: the file type comes from `filename`'s extension."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    named = "unknown" if format == "auto" else format  # the layout reported when reading fails early
    suffix = Path(filename).suffix.lower()
    kind = FILE_TYPES.get(suffix)
    if kind is None:
        problem = Problem(0, "file", "unknown_format",
                          f"cannot read {filename!r}: unknown file type {suffix or '(no extension)'!r}; "
                          f"save it as {', '.join(FILE_TYPES)}")
        return LoadResult(named, [], [problem], 0)
    cap = _cap(max_rows, row_limit)
    rows = _read_parquet(data, cap) if kind == "parquet" else _read_text(data, kind, cap)
    if rows.problems and not rows.items:
        return LoadResult(named, [], rows.problems, rows.count)
    if not rows.count:
        return LoadResult(named, [], [Problem(1, "file", "empty_file",
                                               "the file holds no rows; add at least one example")], 0)
    problems = list(rows.problems)
    if row_limit is not None and rows.count > row_limit:
        first_extra = rows.items[row_limit][0] if len(rows.items) > row_limit else rows.items[-1][0]
        problems.append(Problem(first_extra, "file", "too_many_rows",
                                 f"the file has more than {row_limit} rows, the most allowed; "
                                 f"split it or use only the first {row_limit} rows"))
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
    detected = detect_format([row for _, row in rows.items])
    layout = detected if format == "auto" else format
    if layout == "unknown":
        problems.append(_unknown_layout(rows.items))
        problems.extend(normalise_row(row, "text", line)[1][0] for line, row in rows.items
                        if not isinstance(row, dict))
        problems.sort(key=lambda p: p.line)
        return LoadResult(layout, [], problems, rows.count)
    records: list[Record] = []
    lines: list[int] = []
    for line, row in rows.items:
        record, row_problems = normalise_row(row, layout, line, rows.tabular)
        if record is not None:
            records.append(record)
            lines.append(line)
        problems.extend(row_problems)
    if not records and detected not in ("unknown", layout):
        problems.append(Problem(rows.items[0][0], "file", "unknown_format",
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
    keys = ", ".join(map(str, list(row)[:12])) or "(none)"
    accepted = "; ".join(LAYOUT_HELP[name] for name in LAYOUTS)
    return Problem(line, "row", "unknown_format",
                   f"no known layout: the rows have the keys {keys}. Accepted layouts: {accepted}. "
                   "Rename the columns, or name the format explicitly")


def _cap(max_rows: int | None, row_limit: int | None) -> int | None:
    """Rows worth reading: the first max_rows, or one past row_limit to know that it was exceeded."""
    caps = [n for n in (max_rows, None if row_limit is None else row_limit + 1) if n is not None]
    return min(caps) if caps else None


def _read_text(data: bytes, kind: str, cap: int | None) -> _Rows:
    text, problem = _decode(data)
    if problem is not None:
        return _Rows(problems=[problem])
    if kind in ("csv", "tsv"):
        return _read_csv(text, "\t" if kind == "tsv" else ",", cap)
    return _read_json(text, kind, cap)


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


def _read_json(text: str, kind: str, cap: int | None) -> _Rows:
    """A JSON array, a single object, or JSON Lines, whatever the extension promised."""
    stripped = text.lstrip()
    whole_error: json.JSONDecodeError | None = None
    if stripped[:1] in ("[", "{"):
        try:  # cheap on JSON Lines: the parser stops with "Extra data" at the end of the first line
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            whole_error = exc
        else:
            items = _unwrap(doc)
            chosen = items if cap is None else items[:cap]
            if isinstance(doc, dict) and len(chosen) == 1:  # a lone object: its physical first line
                return _Rows(items=[(text.count("\n", 0, len(text) - len(stripped)) + 1, chosen[0])], count=1)
            return _Rows(items=[(i + 1, row) for i, row in enumerate(chosen)], count=len(chosen))
        if stripped.startswith("[") and kind == "json":
            return _Rows(problems=[_bad_document(whole_error)], count=1)
    rows = _read_jsonl(text, cap)
    if whole_error is not None and not rows.items:
        return _Rows(problems=[_bad_document(whole_error)], count=1)  # one broken document, not broken lines
    return rows


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


def _read_jsonl(text: str, cap: int | None) -> _Rows:
    rows = _Rows()
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if cap is not None and rows.count >= cap:
            break
        rows.count += 1
        try:
            rows.items.append((number, json.loads(raw)))
        except json.JSONDecodeError as exc:
            rows.problems.append(Problem(number, "row", "bad_json",
                                         f"invalid JSON at column {exc.colno}: {exc.msg}; "
                                         "each line must hold one complete JSON object"))
    return rows


def _read_csv(text: str, delimiter: str, cap: int | None) -> _Rows:
    """CSV/TSV with a header row; each row's line is the physical line it starts on (header = line 1)."""
    rows = _Rows(tabular=True)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
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
    except csv.Error as exc:  # the reader cannot resynchronise after this, so reading stops here
        rows.problems.append(Problem(start, "row", "unknown_format",
                                     f"the CSV cannot be parsed from line {start} on ({exc}); close every quoted "
                                     'value with " and write quotes inside values as ""'))
    return rows


def _read_parquet(data: bytes, cap: int | None) -> _Rows:
    """Parquet rows; the line of a row is its index + 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        return _Rows(problems=[Problem(0, "file", "unknown_format",
                                       f"not a readable Parquet file ({exc}); export it again or use JSONL")])
    if cap is not None:
        table = table.slice(0, cap)
    # nulls (missing cells) are dropped so they read as missing fields, like absent JSON keys
    items = [(i + 1, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(table.to_pylist())]
    return _Rows(items=items, count=len(items))
