"""File types, layout detection and normalisation to canonical records."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.data import SAMPLES, sample_path
from loralab.data.formats import detect_format, load_records, load_records_from_bytes

SHARED = Path(__file__).parents[2].parent / "shared" / "data"

QA = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_alpaca_with_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Translate", "input": "hello", "output": "こんにちは"},
        {"instruction": "Q?", "input": "", "output": "A."},
    ])
    result = load_records(path)
    assert result.ok and result.format == "alpaca" and result.rows == 2 and result.lines == [1, 2]
    assert result.records[0] == {"messages": [{"role": "user", "content": "Translate\n\nhello"},
                                              {"role": "assistant", "content": "こんにちは"}]}
    assert result.records[1] == QA


@pytest.mark.parametrize("keys", [("question", "answer"), ("prompt", "response"), ("instruction", "response")])
def test_alpaca_aliases(tmp_path, keys):
    path = write_jsonl(tmp_path / "d.ndjson", [{keys[0]: "Q?", keys[1]: "A."}])
    result = load_records(path)
    assert result.ok and result.format == "alpaca" and result.records == [QA]


def test_alpaca_system_and_history(tmp_path):
    row = {"instruction": "And 2+3?", "output": "5.", "system": "Be brief.", "history": [["1+1?", "2."]]}
    result = load_records(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert result.ok
    assert [m["role"] for m in result.records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_json_array_and_json_that_is_jsonl(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    for name in ("a.json", "b.json"):
        result = load_records(tmp_path / name)
        assert result.ok and result.format == "text" and result.records == rows, name
    assert load_records(tmp_path / "a.json").lines == [1, 2]  # array index + 1
    assert load_records(tmp_path / "b.json").lines == [1, 2]  # physical lines


def test_jsonl_lines_are_physical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n\n{"text": "b"}\r\n', encoding="utf-8")
    result = load_records(path)
    assert result.ok and result.lines == [2, 4] and result.rows == 2


def test_csv_question_answer(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerow(["Q?", "A."])
        writer.writerow(["Multi\nline?", "Yes, with a comma."])
    result = load_records(path)
    assert result.ok and result.format == "alpaca" and result.lines == [2, 3]
    assert result.records[0] == QA
    assert result.records[1]["messages"][0]["content"] == "Multi\nline?"


def test_csv_chat_column_holds_json(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(QA["messages"])])
    result = load_records(path)
    assert result.ok and result.format == "chat" and result.records == [QA]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"messages": QA["messages"]},
        {"messages": [{"role": "system", "content": "S"}, *QA["messages"]]},
    ])
    pq.write_table(table, tmp_path / "d.parquet")
    result = load_records(tmp_path / "d.parquet")
    assert result.ok and result.format == "chat" and result.lines == [1, 2]
    assert result.records[0] == QA


def test_sharegpt_roles_and_system(tmp_path):
    row = {"system": "Be kind.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Bye"}, {"from": "model", "value": "Bye!"}]}
    result = load_records(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert result.ok and result.format == "sharegpt"
    assert [m["role"] for m in result.records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_preference_layouts(tmp_path):
    rows = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]},
        {"conversations": [{"from": "human", "value": "Q?"}],
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
    ]
    result = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert result.ok and result.format == "preference"
    expected = {"messages": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
    assert result.records == [expected] * 4


def test_named_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "instruction": "Q?", "output": "A."}])
    assert load_records(path).format == "alpaca"
    assert load_records(path, format="text").records == [{"text": "x"}]
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(path, format="yaml")


def test_detect_format_majority():
    rows = [{"text": "a"}, {"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a"}, 5]
    assert detect_format(rows) == "alpaca"
    assert detect_format([{"text": "a"}, {"messages": []}]) == "text"  # tie: the earliest row's layout
    assert detect_format([{"foo": 1}, []]) == "unknown"


def test_max_rows_and_bytes_upload():
    data = b"".join(json.dumps({"text": str(i)}).encode() + b"\n" for i in range(10))
    result = load_records_from_bytes(data, "upload.jsonl", max_rows=3)
    assert result.ok and result.rows == 3 and [r["text"] for r in result.records] == ["0", "1", "2"]


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "identity.json", "dpo_en_demo.json"])
def test_shared_llama_factory_files(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    result = load_records(path)
    assert result.problems == [] and len(result.records) == result.rows == len(json.loads(path.read_text()))
    if name == "dpo_en_demo.json":
        assert result.format == "preference"
        assert all(r["messages"][-1]["role"] == "user" and r["chosen"] and r["rejected"] for r in result.records)
    else:
        assert result.format == "alpaca"
    if name == "identity.json":
        assert "{{name}}" in result.records[0]["messages"][-1]["content"]  # placeholders stay text


@pytest.mark.parametrize("name", list(SAMPLES))
def test_samples_load_cleanly(name):
    result = load_records(sample_path(name))
    assert result.ok and result.problems == [] and len(result.records) == result.rows


def test_sample_sizes_and_basic_qa():
    sizes = {name: load_records(sample_path(name)).rows for name in SAMPLES}
    assert sizes["basic_qa"] == 5 and sizes["tech_qa"] == 20 and sizes["ja_qa"] == 20
    assert sizes["chat_sample"] >= 8 and sizes["preference_sample"] >= 8
    rows = [json.loads(line) for line in sample_path("basic_qa").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"instruction", "output"} and len(r["output"].split()) <= 20 for r in rows)
    with pytest.raises(KeyError, match="unknown sample"):
        sample_path("nope")


def test_data_layer_imports_no_web_db_or_torch():
    code = ("import sys, loralab.data.formats, loralab.data.template, loralab.data.validate;"
            "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'gradio', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_single_objects_and_wrapped_arrays():
    pretty = b'\n{\n  "text": "x"\n}\n'
    for name in ("d.json", "d.jsonl"):
        result = load_records_from_bytes(pretty, name)
        assert result.ok and result.records == [{"text": "x"}] and result.lines == [2], name
    wrapped = load_records_from_bytes(b'{"data": [{"text": "a"}, {"text": "b"}]}', "d.json")
    assert wrapped.ok and wrapped.rows == 2


def test_one_row_chat_jsonl_is_a_row_not_a_wrapper(tmp_path):
    from loralab.data.formats import load_records

    path = tmp_path / "one.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    result = load_records(path)
    assert result.ok and result.format == "chat" and len(result.records) == 1
