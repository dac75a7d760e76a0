"""Dataset decoding bombs: tiny files that decode huge, deep nesting and parallel uploads are refused or bounded."""
from __future__ import annotations

import io
import json
import threading
import tracemalloc

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loralab.data import formats
from loralab.data.formats import load_records_from_bytes
from loralab.services import datasets
from loralab.services.context import open_services
from loralab.settings import Settings
from loralab.store.errors import TooLarge

MB = 1024 * 1024
DEEP = "[" * 100_000 + "]" * 100_000


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, **kwargs)
    return out.getvalue()


def repeated_string_bomb() -> bytes:
    """Under 2 KB on disk, about 2 GB decoded: 200k rows of one 10 KB string (dictionary + RLE + zstd)."""
    data = parquet_bytes(pa.table({"text": ["x" * 10_000] * 200_000}), compression="zstd")
    assert len(data) < 10_000
    return data


def dictionary_typed_bomb(rows: int, width: int) -> bytes:
    """A column stored as an Arrow dictionary: the footer claims only the dictionary and the indices."""
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["y" * width]))
    return parquet_bytes(pa.table({"text": column}), compression="zstd")


@pytest.fixture
def svc(tmp_path):
    services = open_services(Settings(home=tmp_path / "home"))
    yield services
    services.close()


def stored(svc) -> tuple[int, list[str]]:
    root = svc.settings.home / "datasets"
    return len(datasets.list_datasets(svc)), sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- through a real server ---

def test_parquet_bomb_is_refused_by_the_live_server_without_memory_growth(live_server):
    process = psutil.Process(live_server.process.pid)
    with live_server.client() as client:
        client.get("/api/datasets")  # warm up the route before measuring
        before = process.memory_info().rss
        response = client.post("/api/datasets/upload", files={"file": ("bomb.parquet", repeated_string_bomb())})
        after = process.memory_info().rss
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["code"] == "decoded_too_large" and body["param"] == "file"
        assert "decod" in body["detail"] and "split" in body["detail"] and str(live_server.home) not in body["detail"]
        assert client.get("/api/datasets").json() == []
    root = live_server.home / "datasets"
    assert not root.exists() or not any(root.iterdir())
    assert after - before < 100 * MB, f"server RSS grew by {(after - before) / MB:.0f} MB"


@pytest.mark.parametrize("filename, body, line, field", [
    ("deep.json", '[{"text": "a"},\n' + DEEP + "]", 2, "row"),
    ("deep.jsonl", '{"text": "a"}\n{"text": ' + DEEP + '}\n{"text": "b"}\n', 2, "row"),
    ("deep_object.jsonl", '{"text": "a"}\n{"messages": [{"role": "user", "content": ' + '{"a": ' * 800 + "1"
     + "}" * 800 + "}]}\n", 2, "row"),
    ("deep.csv", 'instruction,output,history\nq,a,\nq,a,"' + "[" * 50_000 + "]" * 50_000 + '"\n', 3, "history"),
])
def test_deeply_nested_json_is_a_bad_json_problem_on_its_line(live_server, filename, body, line, field):
    with live_server.client() as client:
        response = client.post("/api/datasets/upload", files={"file": (filename, body.encode())})
        assert response.status_code == 422, response.text
        problem = response.json()["errors"][0]
        assert (problem["line"], problem["field"], problem["code"]) == (line, field, "bad_json")
        assert "nested too deeply" in problem["message"]
        assert client.get("/api/datasets").json() == []


# --- through the service and the data layer ---

def test_parquet_bomb_is_refused_by_the_service_and_nothing_is_stored(svc):
    with pytest.raises(TooLarge) as caught:
        datasets.upload_dataset(svc, repeated_string_bomb(), "bomb.parquet")
    assert caught.value.code == "decoded_too_large" and caught.value.errors[0]["code"] == "too_large"
    assert "LORALAB_MAX_DECODED_BYTES" in caught.value.message
    assert stored(svc) == (0, [])


def test_dictionary_column_that_the_footer_understates_is_counted_decoded():
    data = dictionary_typed_bomb(rows=5_000, width=1_000)  # ~5 MB decoded, a few KB claimed by the footer
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    assert meta.row_group(0).column(0).total_uncompressed_size < 64 * 1024
    refused = load_records_from_bytes(data, "d.parquet", max_decoded_bytes=MB)
    assert [(p.line, p.field, p.code) for p in refused.problems] == [(0, "file", "too_large")]
    assert not refused.records
    assert load_records_from_bytes(data, "d.parquet", max_decoded_bytes=64 * MB).ok


def test_too_many_parquet_rows_are_refused_from_the_metadata(monkeypatch):
    data = parquet_bytes(pa.table({"text": [f"row {i}" for i in range(50)]}))

    def no_decoding(*args, **kwargs):
        raise AssertionError("rows were decoded")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_decoding)
    result = load_records_from_bytes(data, "d.parquet", row_limit=10)
    assert [(p.line, p.field, p.code) for p in result.problems] == [(11, "file", "too_many_rows")]


def test_uncompressed_size_in_the_metadata_is_refused_before_decoding(monkeypatch):
    data = parquet_bytes(pa.table({"text": [f"{i:08d}" * 100 for i in range(2_000)]}), compression="zstd")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    result = load_records_from_bytes(data, "d.parquet", max_decoded_bytes=100_000)
    assert [(p.code, p.line) for p in result.problems] == [("too_large", 0)]
    assert "uncompressed" in result.problems[0].message


def test_text_files_past_the_decoded_limit_are_refused(tmp_path):
    data = b'{"text": "abc"}\n' * 1000
    assert [p.code for p in load_records_from_bytes(data, "d.jsonl", max_decoded_bytes=1024).problems] == ["too_large"]
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    assert [p.code for p in formats.load_records(path, max_decoded_bytes=1024).problems] == ["too_large"]
    assert formats.load_records(path).ok  # the engine's default limit is generous


def test_huge_numbers_and_deep_values_in_messages_never_crash():
    rows = [b'{"text": 1' + b"1" * 5000 + b"}", b'{"text": [' + b"[" * 300 + b"]" * 300 + b"]}",
            b'{"instruction": "q", "output": ' + b"[" * 90 + b"1" + b"]" * 90 + b"}"]
    result = load_records_from_bytes(b"\n".join(rows) + b"\n", "d.jsonl")
    assert [(p.line, p.code) for p in result.problems] == [(1, "bad_json"), (2, "bad_json"), (3, "wrong_type")]
    assert all(len(p.message) < 400 for p in result.problems)


def test_jsonl_upload_memory_is_a_small_multiple_of_the_file(svc):
    row = {"instruction": "質問: what is two plus two?", "input": "", "output": "The answer is four. " * 3}
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    data = line * (8 * MB // len(line))
    tracemalloc.start()
    try:
        info = datasets.upload_dataset(svc, data, "big.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["rows"] == len(data) // len(line)
    assert peak < 8 * len(data), f"peak {peak / MB:.0f} MB for a {len(data) / MB:.0f} MB file"


def test_parallel_uploads_beyond_the_limit_wait_for_a_slot(svc, monkeypatch):
    svc.settings.max_concurrent_uploads = 1
    real = formats.load_records_from_bytes
    lock = threading.Lock()
    active = {"now": 0, "most": 0}
    first_inside, release = threading.Event(), threading.Event()

    def slow_parse(*args, **kwargs):
        with lock:
            active["now"] += 1
            active["most"] = max(active["most"], active["now"])
        first_inside.set()
        release.wait(30)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active["now"] -= 1

    monkeypatch.setattr(formats, "load_records_from_bytes", slow_parse)
    results: list[object] = []

    def upload(i: int) -> None:
        try:
            results.append(datasets.upload_dataset(svc, b'{"text": "hello"}\n', f"d{i}.jsonl"))
        except Exception as exc:  # noqa: BLE001 - a failure is what the test looks for
            results.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    assert first_inside.wait(30)
    assert datasets.upload_slots(1)._value == 0  # the one slot is taken; the others queue on it
    release.set()
    for thread in threads:
        thread.join(60)
    assert active["most"] == 1
    assert len(results) == 3 and all(isinstance(r, dict) for r in results), results
    assert stored(svc)[0] == 3
