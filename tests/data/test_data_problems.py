"""Every problem a dataset can have is reported with its line, field, code and a helpful message."""
from __future__ import annotations

import json

from loralab.data.formats import load_records, load_records_from_bytes


def problems(data: bytes | str, filename: str = "d.jsonl", **kwargs) -> list[tuple[int, str, str]]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    result = load_records_from_bytes(raw, filename, **kwargs)
    for p in result.problems:
        assert p.message and str(p).startswith(f"line {p.line}: {p.field}: ")
    return [(p.line, p.field, p.code) for p in result.problems]


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def test_every_problem_in_one_file_is_reported():
    data = lines(
        {"instruction": "ok", "output": "fine"},
        '{"instruction": "broken", "output": }',
        {"instruction": "Q?"},
        {"instruction": "Q?", "output": "  "},
        [1, 2],
        {"instruction": 7, "output": "A."},
    )
    assert problems(data) == [
        (2, "row", "bad_json"),
        (3, "output", "missing_field"),
        (4, "output", "empty_field"),
        (5, "row", "not_object"),
        (6, "instruction", "wrong_type"),
    ]
    result = load_records_from_bytes(data.encode(), "d.jsonl")
    assert len(result.records) == 1 and result.lines == [1] and not result.ok
    assert "column" in result.problems[0].message  # the JSON error position


def test_chat_problems():
    data = lines(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                      {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "x"},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
        {"messages": [{"content": "Q"}, {"role": "assistant"}]},
        {"messages": "hello"},
        {"messages": []},
    )
    assert problems(data) == [
        (1, "messages[2].content", "empty_field"),
        (2, "messages[1].role", "unknown_role"),
        (3, "messages", "no_assistant_turn"),
        (4, "messages[0].role", "missing_field"),
        (4, "messages[1].content", "missing_field"),
        (5, "messages", "wrong_type"),
        (6, "messages", "empty_field"),
    ]
    result = load_records_from_bytes(data.encode(), "d.jsonl")
    unknown = result.problems[1].message
    assert "'tool'" in unknown or '"tool"' in unknown
    assert "system, user, assistant" in unknown


def test_sharegpt_and_preference_problems():
    data = lines(
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "observation", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}]},
    )
    assert problems(data) == [(1, "conversations[1].from", "unknown_role"),
                              (2, "conversations", "no_assistant_turn")]
    data = lines(
        {"prompt": "Q", "chosen": "A", "rejected": ""},
        {"prompt": "Q", "chosen": "A"},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
         "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}},
        {"prompt": "Q", "chosen": {"from": "human", "value": "x"}, "rejected": "y"},
    )
    assert problems(data, format="preference") == [
        (1, "rejected", "empty_field"),
        (2, "rejected", "missing_field"),
        (3, "conversations", "missing_field"),
        (4, "chosen.from", "no_assistant_turn"),
    ]


def test_text_problems():
    assert problems(lines({"text": "ok"}, {"text": ""}, {"text": None}, {"text": ["a"]})) == [
        (2, "text", "empty_field"), (3, "text", "missing_field"), (4, "text", "wrong_type")]


def test_not_utf8_names_the_line():
    data = "質問: a\n".encode("utf-8") + '{"text": "東京"}\n'.encode("cp932")
    found = problems(b'{"text": "ok"}\n' + data)
    assert found == [(3, "file", "not_utf8")]
    message = load_records_from_bytes(b'{"text": "ok"}\n' + data, "d.jsonl").problems[0].message
    assert "UTF-8" in message and "line 3" in message


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffquestion,answer\nQ?,A.\n".encode("utf-8"))
    result = load_records(path)
    assert result.ok and result.format == "alpaca"
    assert load_records_from_bytes(b"\xef\xbb\xbf" + b'{"text": "x"}\n', "d.jsonl").ok


def test_empty_files():
    for data, name in ((b"", "d.jsonl"), (b"\n  \n", "d.jsonl"), (b"[]", "d.json"), (b"question,answer\n", "d.csv")):
        assert problems(data, name) == [(1, "file", "empty_file")], name


def test_unknown_extension_and_unknown_layout():
    assert problems(b"a: b", "d.yaml") == [(0, "file", "unknown_format")]
    result = load_records_from_bytes(b'\n{"q": "x", "a": "y"}\n', "d.jsonl")
    assert [(p.line, p.code) for p in result.problems] == [(2, "unknown_format")]
    assert "q, a" in result.problems[0].message and "alpaca" in result.problems[0].message


def test_broken_json_array_reports_position():
    data = '[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]'
    result = load_records_from_bytes(data.encode(), "d.json")
    assert [(p.line, p.field, p.code) for p in result.problems] == [(4, "file", "bad_json")]
    assert "line 4, column 3" in result.problems[0].message


def test_csv_row_problems_use_csv_lines():
    data = 'question,answer\nQ?,A.\nQ2?,\n\nQ3?,A,extra\n"Q4\nmulti-line?",\nQ5?\n'
    assert problems(data, "d.csv") == [(3, "answer", "empty_field"), (5, "row", "wrong_type"),
                                       (6, "answer", "empty_field"), (8, "answer", "missing_field")]


def test_parquet_problems_use_row_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": None}]),
                   tmp_path / "d.parquet")
    assert [(p.line, p.field, p.code) for p in load_records(tmp_path / "d.parquet").problems] == [
        (2, "output", "missing_field")]
    assert problems(b"not parquet", "d.parquet") == [(0, "file", "unknown_format")]


def test_row_limit():
    data = "".join(json.dumps({"text": str(i)}) + "\n" for i in range(5))
    assert problems(data, row_limit=5) == []
    result = load_records_from_bytes(data.encode(), "d.jsonl", row_limit=3)
    assert [(p.line, p.code) for p in result.problems] == [(4, "too_many_rows")]
    assert problems(data, row_limit=3, max_rows=3) == []


def test_csv_unclosed_quote():
    data = 'question,answer\nQ?,A.\n"Q2?,A.\nQ3?,A.\n'
    assert problems(data, "d.csv") == [(3, "row", "unknown_format")]


def test_named_format_that_does_not_fit_says_which_does():
    data = lines({"instruction": "Q?", "output": "A."})
    found = load_records_from_bytes(data.encode(), "d.jsonl", format="chat").problems
    assert [(p.line, p.field, p.code) for p in found] == [(1, "messages", "missing_field"),
                                                         (1, "file", "unknown_format")]
    assert "alpaca" in found[1].message
