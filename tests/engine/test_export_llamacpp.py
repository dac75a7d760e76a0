"""Exports proven in their consumers: GGUF files loaded by real llama.cpp give loralab's greedy answer, and the
Ollama Modelfile's Go TEMPLATE renders the same prompt as the model's own chat template."""
from __future__ import annotations

import re

import pytest
from test_export import LLAMA2, LLAMA3, MISTRAL_V01, MISTRAL_V03, SMOLLM2, _template_tokenizer

from loralab.engine import llamacpp
from loralab.engine.export_ollama import derive_template

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="xllamacpp is not installed")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The embedded model's greedy answer to this, with the adapter below, has a top-2 logit gap >= 0.1 at each of its 16
# tokens (>= 2 at the first two): precision alone does not flip it. ("capital of France" is a 0.08 near-tie at its
# first token, which llama.cpp's 8-bit dot products flip: "L'Étoile..." against "The capital...".)
GREETING = [{"role": "user", "content": "Hello!"}]


# ---- a Go text/template evaluator for the subset the derived TEMPLATEs use ------------------------------------

_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$[A-Za-z_]*(?:\.[A-Za-z_]+)*|\.[A-Za-z_]+(?:\.[A-Za-z_]+)*'
                    r"|[A-Za-z_]+|\.[A-Za-z_]+)")
_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "len": len,
    "and": lambda *a: next((x for x in a if not x), a[-1]), "or": lambda *a: next((x for x in a if x), a[-1]),
    "not": lambda a: not a, "slice": lambda a, i=0, j=None: a[i:j], "index": lambda a, i: a[i],
}


def _lex(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        assert match, f"cannot parse {text[pos:]!r}"
        out.append(match.group(1))
        pos = match.end()
    return out


class _Expr:
    def __init__(self, tokens: list[str], scope: dict, dot):
        self.tokens, self.scope, self.dot = tokens, scope, dot

    def _field(self, value, path: str):
        for name in filter(None, path.split(".")):
            value = value[name]
        return value

    def term(self):
        token = self.tokens.pop(0)
        if token == "(":
            value = self.pipeline()
            assert self.tokens.pop(0) == ")"
            if self.tokens and self.tokens[0].startswith(".") and len(self.tokens[0]) > 1:
                value = self._field(value, self.tokens.pop(0))  # (index .Messages 0).Role
            return value
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token.startswith("$"):
            name, _, path = token[1:].partition(".")
            return self._field(self.scope["$"] if name == "" else self.scope[name], path)
        if token.startswith("."):
            return self._field(self.dot, token)
        raise AssertionError(f"unexpected {token!r}")

    def pipeline(self):
        if self.tokens and self.tokens[0] in _FUNCS:
            func = _FUNCS[self.tokens.pop(0)]
            args = []
            while self.tokens and self.tokens[0] != ")":
                args.append(self.term())
            return func(*args)
        return self.term()


def render_go(template: str, data: dict) -> str:
    """Render a Go TEMPLATE (range/if/else if/else/end, := and = variables, eq ne and len slice index)."""
    parts = re.split(r"({{.*?}})", template, flags=re.S)
    pos = 0

    def block(scope: dict, dot, emit: bool) -> tuple[str, str]:
        nonlocal pos
        out = ""
        while pos < len(parts):
            part = parts[pos]
            pos += 1
            if not part.startswith("{{"):
                out += part if emit else ""
                continue
            action = part[2:-2].strip()
            if action in ("end", "else") or action.startswith("else if "):
                return out, action
            if action.startswith("range "):
                match = re.fullmatch(r"range \$(\w+), \$(\w+) := (.+)", action)
                items = _Expr(_lex(match.group(3)), scope, dot).pipeline() if emit else []
                start = pos
                for i, item in enumerate(items):
                    pos = start
                    text, _ = block({**scope, match.group(1): i, match.group(2): item}, item, True)
                    out += text
                pos = start
                block(scope, dot, False)  # skip to this range's end
                continue
            if action.startswith("if "):
                taken, condition = False, action[3:]
                while True:
                    ok = emit and not taken and bool(_Expr(_lex(condition), scope, dot).pipeline())
                    text, end = block(scope, dot, ok)
                    out += text if ok else ""
                    taken = taken or ok
                    if end == "end":
                        break
                    condition = end[8:] if end.startswith("else if ") else "1"
                continue
            match = re.fullmatch(r"\$(\w+) (:?=) (.+)", action)
            if match:
                if emit:
                    scope[match.group(1)] = _Expr(_lex(match.group(3)), scope, dot).pipeline()
                continue
            if emit:
                out += str(_Expr(_lex(action), scope, dot).pipeline())
        return out, ""

    text, _ = block({"$": data}, data, True)
    return text


def ollama_prompt(derived, messages: list[dict]) -> str:
    """What Ollama sends the model: the Modelfile's SYSTEM joins the messages when they have none; .System is the
    (last) system message's content."""
    if derived.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": derived.system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system}
    return render_go(derived.template, data)


CONVERSATIONS = [
    QUESTION,
    [{"role": "system", "content": "Answer in one word."}, *QUESTION],
    [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"}],
    [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Japan?"}],
]


def test_go_evaluator_follows_go_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    template = ('{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}[{{ $i }}{{ .Role }}'
                '{{ if $last }}!{{ else if eq .Role "user" }}?{{ else }}-{{ end }}]{{ end }}'
                '{{ if and $.System 1 }}S{{ end }}{{ $x := 0 }}{{ if eq (index .Messages 0).Role "user" }}'
                '{{ $x = 1 }}{{ end }}{{ $x }}')
    assert render_go(template, data) == "[0user?][1assistant!]1"


@pytest.mark.parametrize("name,template,specials,bos,eos,add_bos", [
    ("smollm2", SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", False),
    ("llama3", LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
     "<|begin_of_text|>", "<|eot_id|>", True),
    ("mistral-v0.1", MISTRAL_V01, ["<s>", "</s>"], "<s>", "</s>", True),
    ("mistral-v0.3", MISTRAL_V03, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", True),
    ("llama2", LLAMA2, ["<s>", "</s>"], "<s>", "</s>", True),
])
def test_ollama_template_renders_what_the_chat_template_renders(name, template, specials, bos, eos, add_bos):
    tokenizer = _template_tokenizer(template, specials, bos, eos, add_bos)
    derived = derive_template(tokenizer)
    checked = 0
    for messages in CONVERSATIONS:
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - the template refuses this shape (Mistral v0.1: no system role)
            continue
        if add_bos and expected.startswith(bos):
            expected = expected[len(bos):]  # llama.cpp/Ollama add BOS from the vocabulary, not the template
        if not derived.system and any(m["role"] == "system" for m in messages) and name == "mistral-v0.1":
            continue
        assert ollama_prompt(derived, messages) == expected, (name, messages)
        checked += 1
    assert checked >= 2


@pytest.mark.model
def test_ollama_template_of_the_embedded_model(embedded_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    derived = derive_template(tokenizer)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(derived, messages) == expected


# ---- GGUF exports loaded by llama.cpp ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(tmp_path_factory, embedded_model_dir):
    """A LoRA adapter on the embedded model that changes its answer, and loralab's greedy answers with and without it
    (the serving engine: PEFT adapter on the fp32 base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loralab.engine.models import load_model
    from loralab.services.inference import BaseWorker, Sampling, _load

    torch.manual_seed(0)
    model = load_model(str(embedded_model_dir))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)  # a nudge, not noise: the model stays fluent, its answer changes
    adapter = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(adapter)
    del peft, model
    loaded = _load(str(embedded_model_dir))
    worker = BaseWorker(str(embedded_model_dir), loaded[0], loaded[1])
    try:
        ids = worker.encode(messages=GREETING)
        base = worker.submit([ids], None, [Sampling(max_tokens=16)]).result()[0]
        tuned_answer = worker.submit([ids], str(adapter), [Sampling(max_tokens=16)]).result()[0]
    finally:
        worker.close()
    assert tuned_answer.text != base.text, "the adapter should change the greedy answer"
    return adapter, ids, tuned_answer.text, worker.tokenizer


@needs_llamacpp
@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_exported_gguf_gives_loralab_greedy_answer_in_llamacpp(tuned, embedded_model_dir, tmp_path, quantization):
    import httpx

    from loralab.engine.export import export_model

    adapter, ids, expected, tokenizer = tuned
    result = export_model(adapter, "gguf", tmp_path / "out", quantization=quantization,
                          base_model=str(embedded_model_dir))
    server = llamacpp.LlamaServer(result.gguf_file, context=2048, parallel=1)
    try:
        body = llamacpp.request_body(ids, max_tokens=16, temperature=0.0, top_p=1.0, seed=0, stop=(),
                                     repetition_penalty=1.0, stream=False)
        answer = httpx.post(server.url + "/completion", json=body, headers=server.headers(), timeout=300).json()
    finally:
        server.close()
    text = answer["content"]
    if quantization == "f16":
        assert text == expected  # the same 16 tokens
    else:
        first = tokenizer(expected, add_special_tokens=False)["input_ids"][:2]
        assert tokenizer(text, add_special_tokens=False)["input_ids"][:2] == first, (text, expected)
