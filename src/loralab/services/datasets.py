"""Datasets: validate an upload completely before storing it, then keep it as an immutable version."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from loralab.services.context import Services
from loralab.store.errors import Invalid, TooLarge
from loralab.store.models import Dataset
from loralab.store.paths import check_id, contain
from loralab.store.repo import new_id

NAME_RE = re.compile(r"^[\w][\w .()-]{0,99}$")
CANONICAL = {"alpaca": "chat", "chat": "chat", "sharegpt": "chat", "text": "text", "preference": "preference"}
RECORDS_FILE = "records.jsonl"
MAX_PROBLEMS = 100
_SLOTS: dict[int, threading.BoundedSemaphore] = {}  # per max_concurrent_uploads value: parses running at once
_SLOTS_LOCK = threading.Lock()


def dataset_dict(row: Dataset) -> dict[str, Any]:
    stats = dict(row.stats or {})
    return {"id": row.id, "name": row.name, "version": row.version, "format": row.format, "rows": row.rows,
            "sha256": row.sha256, "size_bytes": row.size_bytes, "filename": row.filename,
            "created_at": row.created_at, "stats": {k: v for k, v in stats.items() if k != "token_lengths"}}


def _default_name(filename: str) -> str:
    stem = re.sub(r"[^\w .()-]+", "-", Path(filename).stem).strip(" .-") or "dataset"
    return stem[:100]


def upload_slots(limit: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore that lets at most `limit` uploads be read and parsed at once (others wait)."""
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(limit, threading.BoundedSemaphore(limit))


def upload_dataset(svc: Services, data: bytes | BinaryIO, filename: str, *, name: str | None = None,
                   format: str = "auto") -> dict[str, Any]:
    """Validate `data` (bytes or a binary file) completely; only a clean file becomes a new dataset version.

    The same name again is the next version. At most `max_concurrent_uploads` files are read and parsed at once,
    since each can take several times its size in memory; more wait for a free slot.
    """
    from loralab.data.formats import FORMATS

    settings = svc.settings
    filename = Path(filename or "upload.jsonl").name
    name = (name or _default_name(filename)).strip()
    if not NAME_RE.match(name):
        raise Invalid(f"dataset name {name[:120]!r} is not allowed: use up to 100 letters, digits, spaces, . _ ( ) -",
                      param="name")
    if format not in FORMATS:
        raise Invalid(f"unknown format {format[:40]!r}; use one of {', '.join(FORMATS)}", param="format")
    with upload_slots(settings.max_concurrent_uploads):
        return _validate_and_store(svc, data, filename, name, format)


def _validate_and_store(svc: Services, data: bytes | BinaryIO, filename: str, name: str,
                        format: str) -> dict[str, Any]:
    from loralab.data.formats import load_records_from_bytes

    settings = svc.settings
    if not isinstance(data, (bytes, bytearray)):
        data = data.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise TooLarge(f"the file is more than the {settings.max_upload_bytes} bytes allowed "
                       "(LORALAB_MAX_UPLOAD_BYTES); split it or raise the limit", code="file_too_large",
                       param="file")
    size_bytes, source_sha256 = len(data), hashlib.sha256(data).hexdigest()
    result = load_records_from_bytes(data, filename, format=format, row_limit=settings.max_rows,
                                     max_decoded_bytes=settings.max_decoded_bytes)
    del data  # the caller may still hold it, but nothing here needs the raw bytes any more
    problems = [p.to_dict() for p in result.problems]
    too_large = next((p for p in problems if p["code"] == "too_large"), None)
    if too_large is not None:
        raise TooLarge(f"{filename} is too large once decoded: {too_large['message']} "
                       "(or raise LORALAB_MAX_DECODED_BYTES on the server)", code="decoded_too_large",
                       param="file", errors=[too_large])
    if not result.ok:
        problems = problems or [
            {"line": 1, "field": "file", "code": "empty_file", "message": "no usable rows; add examples"}]
        first = problems[0]
        raise Invalid(f"{len(problems)} problem(s) in {filename}; first: line {first['line']}, {first['field']}: "
                      f"{first['message']}", code="invalid_dataset", errors=problems[:MAX_PROBLEMS])
    return _store(svc, result, size_bytes, source_sha256, filename, name)


def _store(svc: Services, result, size_bytes: int, source_sha256: str, filename: str, name: str) -> dict[str, Any]:
    dataset_id = new_id("ds")
    root = svc.settings.home / "datasets"
    target = contain(root, dataset_id)
    tmp = contain(root, f".{dataset_id}.tmp")
    tmp.mkdir(parents=True)
    try:
        digest = hashlib.sha256()
        with open(tmp / RECORDS_FILE, "wb") as out:  # one record at a time: no second copy of the dataset
            for record in result.records:
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                digest.update(line)
                out.write(line)
        os.replace(tmp, target)
        row = svc.repo.add_dataset(
            id=dataset_id, name=name, format=result.format, rows=len(result.records),
            sha256=digest.hexdigest(), size_bytes=size_bytes, filename=filename[:300],
            path=str(target / RECORDS_FILE),
            stats={**_record_stats(result.records), "canonical_format": CANONICAL.get(result.format, "chat"),
                   "source_sha256": source_sha256})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        raise
    return dataset_dict(row)


def _record_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    roles: Counter[str] = Counter()
    chars = []
    for record in records:
        if "text" in record:
            chars.append(len(record["text"]))
            continue
        for message in record.get("messages", []):
            roles[message["role"]] += 1
        chars.append(sum(len(m["content"]) for m in record.get("messages", [])) + len(record.get("chosen", "")))
    return {"rows": len(records), "roles": dict(roles), "chars": {
        "min": min(chars, default=0), "max": max(chars, default=0),
        "mean": round(sum(chars) / len(chars), 1) if chars else 0}}


def list_datasets(svc: Services, name: str | None = None) -> list[dict[str, Any]]:
    return [dataset_dict(row) for row in svc.repo.list_datasets(name)]


def get_dataset(svc: Services, dataset_id: str) -> dict[str, Any]:
    return dataset_dict(svc.repo.get_dataset(dataset_id))


def dataset_file(svc: Services, row: Dataset) -> Path:
    """The normalised records file of a dataset, checked to lie inside LORALAB_HOME/datasets."""
    return contain(svc.settings.home / "datasets", Path(row.path).relative_to(svc.settings.home / "datasets"))


def preview_dataset(svc: Services, dataset_id: str, offset: int = 0, limit: int = 20) -> dict[str, Any]:
    """Records offset..offset+limit of the normalised file (limit at most 200)."""
    if offset < 0 or not 1 <= limit <= 200:
        raise Invalid("offset must be >= 0 and limit between 1 and 200", param="limit")
    row = svc.repo.get_dataset(dataset_id)
    records = []
    with open(dataset_file(svc, row), encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if index >= offset + limit:
                break
            if index >= offset:
                records.append(json.loads(line))
    return {"id": row.id, "offset": offset, "limit": limit, "total": row.rows, "records": records}


def dataset_stats(svc: Services, dataset_id: str, base_model: str | None = None,
                  max_seq_length: int | None = None) -> dict[str, Any]:
    """Rows and token-length histogram with `base_model`'s tokenizer (embedded by default); cached in the row."""
    from loralab.spec import EMBEDDED_MODEL

    base_model = base_model or EMBEDDED_MODEL
    check_id("base_model", base_model)
    row = svc.repo.get_dataset(dataset_id)
    key = f"{base_model}|{max_seq_length or ''}"
    cached = (row.stats or {}).get("token_lengths", {}).get(key)
    if cached is None:
        from loralab.data.template import encode_dataset, token_stats
        from loralab.services import base_models

        tokenizer = base_models.tokenizer(svc, base_model, private=True)  # the server's model policy, bounded load
        with open(dataset_file(svc, row), encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        cached = token_stats(encode_dataset(records, tokenizer, max_seq_length), max_seq_length)
        lengths = {**(row.stats or {}).get("token_lengths", {}), key: cached}
        row = svc.repo.update_dataset_stats(row.id, "token_lengths", lengths)
    out = dataset_dict(row)
    return {"id": row.id, "rows": row.rows, "format": row.format, "base_model": base_model,
            "tokens": cached, **{k: v for k, v in out["stats"].items() if k not in ("rows",)}}


def delete_dataset(svc: Services, dataset_id: str) -> dict[str, Any]:
    """Delete a dataset version and its files (409 while a queued or running job uses it)."""
    row = svc.repo.delete_dataset(dataset_id)
    shutil.rmtree(contain(svc.settings.home / "datasets", row.id), ignore_errors=True)
    return {"id": row.id, "deleted": True}
