"""Row layouts: recognise each accepted layout and turn one row into a canonical record or problems."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

Record = dict[str, Any]

LAYOUTS = ("alpaca", "chat", "sharegpt", "text", "preference")
MAX_NESTING_DEPTH = 100  # lists and objects inside one row; real rows need fewer than 10

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}
INSTRUCTION_KEYS = ("instruction", "question", "prompt")
OUTPUT_KEYS = ("output", "answer", "response")

LAYOUT_HELP = {
    "alpaca": "alpaca: instruction (or question/prompt), optional input, output (or answer/response)",
    "chat": "chat: messages = [{role, content}] with roles system/user/assistant",
    "sharegpt": "sharegpt: conversations = [{from, value}] with from human/gpt/system",
    "text": "text: text (every token is trained on)",
    "preference": "preference: prompt (or messages/conversations), chosen, rejected",
}


@dataclass
class Problem:
    """One thing wrong with a dataset, precise enough for a user to find and fix it."""

    line: int
    field: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "code": self.code, "message": self.message}


def layout_of(row: Any) -> str | None:
    """The layout a single row looks like, judged by its keys; None when no layout fits."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if keys & set(INSTRUCTION_KEYS) and keys & set(OUTPUT_KEYS):
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


class _Row:
    """Collects the problems of one row while its fields are checked."""

    def __init__(self, line: int, tabular: bool) -> None:
        self.line = line
        self.tabular = tabular  # CSV cells hold nested values as JSON text
        self.problems: list[Problem] = []

    def add(self, field: str, code: str, message: str) -> None:
        self.problems.append(Problem(self.line, field, code, message))

    def string(self, value: Any, field: str, *, required: bool = True, what: str = "") -> str | None:
        """A non-empty string, or None after recording why not."""
        if value is None:
            if required:
                self.add(field, "missing_field", f"`{field}` is missing{what}; add it as a non-empty string")
            return None
        if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
            texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
            if texts and all(isinstance(t, str) for t in texts):
                value = "".join(texts)  # OpenAI content parts: [{"type": "text", "text": ...}]
        if not isinstance(value, str):
            fix = "put the value in quotes" if isinstance(value, (int, float, bool)) else "write it as text"
            self.add(field, "wrong_type",
                     f"`{field}` must be a string, got {_type_name(value)} ({_preview(value)}); {fix}")
            return None
        if required and not value.strip():
            self.add(field, "empty_field", f"`{field}` is empty{what}; write the text or remove the row")
            return None
        return value

    def json_cell(self, text: str, field: str, quiet: bool = False) -> Any:
        """A CSV cell's JSON text decoded; None after recording bad_json (syntax errors only when not `quiet`)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if not quiet:
                self.add(field, "bad_json", f"`{field}` holds invalid JSON text ({exc.msg} at character {exc.pos})")
            return None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            self.add(field, "bad_json", f"`{field}` holds invalid JSON text ({clip(str(exc), 120)})")
            return None
        except RecursionError:
            deep = True
        else:
            deep = too_deep(value)
        if deep:
            self.add(field, "bad_json", f"`{field}` holds JSON nested too deeply (more than {MAX_NESTING_DEPTH} "
                     "levels of lists and objects); flatten it")
            return None
        return value

    def sequence(self, value: Any, field: str) -> list | None:
        """A non-empty list (CSV cells hold it as JSON text); None after recording why not."""
        if value is None:
            self.add(field, "missing_field", f"`{field}` is missing; add it as a list of turns")
            return None
        if self.tabular and isinstance(value, str) and value.strip()[:1] == "[":
            value = self.json_cell(value, field)
            if value is None:
                return None
        if not isinstance(value, list):
            self.add(field, "wrong_type", f"`{field}` must be a list, got {_type_name(value)} ({_preview(value)})")
            return None
        if not value:
            self.add(field, "empty_field", f"`{field}` is an empty list; add at least one turn")
            return None
        return value


def normalise_row(row: Any, layout: str, line: int, tabular: bool = False) -> tuple[Record | None, list[Problem]]:
    """Check one row against `layout` and return its canonical record (None when it has problems)."""
    checker = _Row(line, tabular)
    if not isinstance(row, dict):
        checker.add("row", "not_object",
                    f"each row must be a JSON object {{...}}, got {_type_name(row)} ({_preview(row)})")
        return None, checker.problems
    record = _NORMALISERS[layout](row, checker)
    if checker.problems:
        return None, checker.problems
    return record, []


def _alpaca(row: dict, r: _Row) -> Record | None:
    instruction_key = next((k for k in INSTRUCTION_KEYS if k in row), None)
    output_key = next((k for k in OUTPUT_KEYS if k in row), None)
    if instruction_key is None:
        r.add("instruction", "missing_field",
              f"`instruction` is missing (also accepted: question, prompt); keys found: {_keys(row)}")
    if output_key is None:
        # name the missing answer the way this row names its question (question -> answer, ...)
        expected = OUTPUT_KEYS[INSTRUCTION_KEYS.index(instruction_key)] if instruction_key else "output"
        others = ", ".join(k for k in OUTPUT_KEYS if k != expected)
        r.add(expected, "missing_field",
              f"`{expected}` is missing (also accepted: {others}); keys found: {_keys(row)}")
    instruction = r.string(row.get(instruction_key), instruction_key) if instruction_key else None
    output = r.string(row.get(output_key), output_key) if output_key else None
    extra = r.string(row.get("input"), "input", required=False) if "input" in row else None
    system = r.string(row.get("system"), "system", required=False) if "system" in row else None
    messages: list[dict[str, str]] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    messages.extend(_alpaca_history(row.get("history"), r))
    if instruction is None or output is None:
        return None
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _alpaca_history(history: Any, r: _Row) -> list[dict[str, str]]:
    """LLaMA-Factory's optional `history`: earlier [instruction, response] pairs of the same conversation."""
    if history is None or history == "" or history == []:
        return []
    history = r.sequence(history, "history")
    if history is None:
        return []
    turns: list[dict[str, str]] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            r.add(f"history[{i}]", "wrong_type",
                  f"`history[{i}]` must be a pair [instruction, response], got {_preview(pair)}")
            continue
        q = r.string(pair[0], f"history[{i}][0]")
        a = r.string(pair[1], f"history[{i}][1]")
        if q is not None and a is not None:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns


def _turns(value: Any, field: str, r: _Row, sharegpt: bool) -> list[dict[str, str]] | None:
    """Check a list of turns ({role, content} or ShareGPT {from, value}) and map it to chat messages."""
    items = r.sequence(value, field)
    if items is None:
        return None
    messages: list[dict[str, str]] = []
    ok = True
    for i, item in enumerate(items):
        here = f"{field}[{i}]"
        if not isinstance(item, dict):
            r.add(here, "wrong_type", f"`{here}` must be an object like {_turn_example(sharegpt)}, got {_preview(item)}")
            ok = False
            continue
        role_key, content_key = ("from", "value") if sharegpt and "from" in item else ("role", "content")
        message = _turn(item, here, role_key, content_key, r)
        ok = ok and message is not None
        if message is not None:
            messages.append(message)
    return messages if ok else None


def _turn(item: dict, here: str, role_key: str, content_key: str, r: _Row) -> dict[str, str] | None:
    role = item.get(role_key)
    names = SHAREGPT_ROLES if role_key == "from" else {name: name for name in ROLES}
    mapped: str | None = None
    if role is None:
        r.add(f"{here}.{role_key}", "missing_field", f"`{here}.{role_key}` is missing; use one of {', '.join(names)}")
    elif not isinstance(role, str) or role.strip().lower() not in names:
        r.add(f"{here}.{role_key}", "unknown_role",
              f"unknown role {_preview(role)}; use one of {', '.join(names)}")
    else:
        mapped = names[role.strip().lower()]
    content = r.string(item.get(content_key), f"{here}.{content_key}")
    if mapped is None or content is None:
        return None
    return {"role": mapped, "content": content}


def _prepend_system(row: dict, messages: list[dict[str, str]], r: _Row) -> list[dict[str, str]]:
    """A top-level `system` string (ShareGPT and preference rows) becomes the first message."""
    system = r.string(row.get("system"), "system", required=False) if "system" in row else None
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _chat(row: dict, r: _Row, field: str = "messages", sharegpt: bool = False) -> Record | None:
    messages = _turns(row.get(field), field, r, sharegpt)
    if messages is None:
        return None
    messages = _prepend_system(row, messages, r)
    if not any(m["role"] == "assistant" for m in messages):
        who = "gpt (or assistant)" if sharegpt else "assistant"
        r.add(field, "no_assistant_turn",
              f"`{field}` has no {who} turn, so there is nothing to learn; add the answer the model should give")
        return None
    return {"messages": messages}


def _sharegpt(row: dict, r: _Row) -> Record | None:
    return _chat(row, r, field="conversations", sharegpt=True)


def _text(row: dict, r: _Row) -> Record | None:
    text = r.string(row.get("text"), "text", what=f" (keys found: {_keys(row)})" if "text" not in row else "")
    return None if text is None else {"text": text}


def _preference(row: dict, r: _Row) -> Record | None:
    chosen_raw = _tabular_turns(row.get("chosen"), r, "chosen")
    prompt = _preference_prompt(row, r)
    chosen = _answer(chosen_raw, "chosen", r)
    rejected = _answer(_tabular_turns(row.get("rejected"), r, "rejected"), "rejected", r)
    if not any(k in row for k in ("prompt", "messages", "conversations")):
        if isinstance(chosen_raw, list) and len(chosen_raw) > 1:
            # TRL's implicit prompt: chosen/rejected are whole conversations sharing their first turns
            prompt = _turns(chosen_raw[:-1], "chosen", r, sharegpt=False)
        else:
            r.add("prompt", "missing_field",
                  f"`prompt` is missing (also accepted: messages, conversations); keys found: {_keys(row)}")
    if prompt and prompt[-1]["role"] != "user":
        field = next((k for k in ("conversations", "messages", "prompt") if k in row), "chosen")
        r.add(field, "missing_field",
              f"the prompt must end with a user turn (the one that chosen and rejected answer), "
              f"but it ends with a {prompt[-1]['role']} turn")
    if prompt is None or chosen is None or rejected is None or r.problems:
        return None
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


def _preference_prompt(row: dict, r: _Row) -> list[dict[str, str]] | None:
    """The prompt turns of a preference row: a string, messages or ShareGPT conversations."""
    if "conversations" in row:
        turns = _turns(row["conversations"], "conversations", r, sharegpt=True)
    elif "messages" in row:
        turns = _turns(row["messages"], "messages", r, sharegpt=False)
    elif isinstance(row.get("prompt"), list):
        turns = _turns(row["prompt"], "prompt", r, sharegpt=False)
    elif "prompt" in row:
        text = r.string(row["prompt"], "prompt")
        turns = None if text is None else [{"role": "user", "content": text}]
    else:
        return None
    return None if turns is None else _prepend_system(row, turns, r)


def _tabular_turns(value: Any, r: _Row, field: str) -> Any:
    """In CSV cells, JSON text that holds a turn or a list of turns is decoded; any other text stays text."""
    if not (r.tabular and isinstance(value, str) and value.strip()[:1] in ("[", "{")):
        return value
    decoded = r.json_cell(value, field, quiet=True)
    if decoded is None:  # not JSON: plain answer text (a nesting problem has been recorded)
        return value
    items = decoded if isinstance(decoded, list) else [decoded]
    is_turn = all(isinstance(t, dict) and ({"from", "value"} <= set(t) or {"role", "content"} <= set(t)) for t in items)
    return decoded if items and is_turn else value


def _answer(value: Any, field: str, r: _Row) -> str | None:
    """A chosen/rejected answer: a string, a {from, value}/{role, content} turn, or a list ending with one."""
    if isinstance(value, list):
        if not value:
            r.add(field, "empty_field", f"`{field}` is an empty list; give the answer text")
            return None
        value, field = value[-1], f"{field}[{len(value) - 1}]"
    if isinstance(value, dict):
        role_key, content_key = ("from", "value") if "from" in value else ("role", "content")
        turn = _turn(value, field, role_key, content_key, r)
        if turn is not None and turn["role"] != "assistant":
            r.add(f"{field}.{role_key}", "no_assistant_turn",
                  f"`{field}` must be the assistant's answer, but it is a {turn['role']} turn")
            return None
        return None if turn is None else turn["content"]
    return r.string(value, field)


_NORMALISERS: dict[str, Callable[[dict, _Row], Record | None]] = {
    "alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "text": _text, "preference": _preference,
}


def _keys(row: dict) -> str:
    return ", ".join(clip(str(key)) for key in list(row)[:12]) or "(none)"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters for a message (names and values can be megabytes long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def too_deep(value: Any, max_depth: int = MAX_NESTING_DEPTH) -> bool:
    """Whether lists and objects nest deeper than `max_depth` (the value itself is level 1); no recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _preview(value: Any, limit: int = 40) -> str:
    text = _sketch(value, limit + 1, 0)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sketch(value: Any, budget: int, depth: int) -> str:
    """JSON-like text of `value`, stopped after about `budget` characters (never walks the whole value)."""
    if isinstance(value, str):
        return json.dumps(value[:budget], ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() < 256 else "(a very long number)"
    if isinstance(value, (dict, list)):
        opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
        if depth >= 4:
            return opening + "..." + closing
        parts: list[str] = []
        used = 1
        pairs = value.items() if isinstance(value, dict) else ((None, item) for item in value)
        for key, item in pairs:
            if used >= budget:
                parts.append("...")
                break
            text = _sketch(item, budget - used, depth + 1)
            if key is not None:
                text = json.dumps(str(key)[:budget], ensure_ascii=False) + ": " + text
            parts.append(text)
            used += len(text) + 2
        return opening + ", ".join(parts) + closing
    if isinstance(value, float):
        return json.dumps(value)
    return json.dumps(str(value)[:budget], ensure_ascii=False)  # Parquet dates, decimals, bytes


def _turn_example(sharegpt: bool) -> str:
    return '{"from": "human", "value": "..."}' if sharegpt else '{"role": "user", "content": "..."}'
