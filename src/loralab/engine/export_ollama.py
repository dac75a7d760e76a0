"""Turn a Hugging Face chat template into an Ollama Go TEMPLATE, checked by rendering both ways."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from loralab.engine.export import ExportError

# Sentinels: plain ASCII without spaces so `| trim` and friends leave them alone.
_S, _U1, _A1, _U2 = "QZSYSTEMQZ", "QZUSERONEQZ", "QZASSISTANTQZ", "QZUSERTWOQZ"
_MARKER = re.compile(r"<\|[^|\s]+\|>|\[/?[A-Z_]+\]|<[^<>\s]+>")


@dataclass
class OllamaTemplate:
    """A Go TEMPLATE, the default SYSTEM prompt the chat template injects (if any), and stop strings."""

    template: str
    system: str | None = None
    stops: list[str] = field(default_factory=list)


def derive_template(tokenizer) -> OllamaTemplate:
    """Recognise role-tagged (ChatML, Llama 3) or [INST]-style templates; raise ExportError otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("the tokenizer has no chat template, so there is no Ollama TEMPLATE to write; "
                          "pass ollama_template (a Go template) explicitly")
    render = _Renderer(tokenizer)
    if render([("user", _U1), ("assistant", _A1), ("user", _U2)], True) is None:
        raise ExportError("the chat template fails on a plain user/assistant/user conversation; "
                          "pass ollama_template explicitly")
    for style in (_RoleTagged, _Instruct):
        derived = style.derive(render)
        if derived is not None and derived.matches(render):
            stops = [s for s in derived.stop_candidates() if _is_marker(s, tokenizer)]
            return OllamaTemplate(derived.go_template(), derived.default_system, list(dict.fromkeys(stops)))
    raise ExportError(
        "cannot express this chat template as an Ollama TEMPLATE (recognised: ChatML <|im_start|>, "
        "Llama 3 <|start_header_id|>, Mistral/Llama 2 [INST]); pass ollama_template explicitly"
    )


class _Renderer:
    """apply_chat_template on (role, content) pairs; None when the template refuses."""

    def __init__(self, tokenizer):
        from loralab.engine.export_gguf import adds_special_token

        self.tokenizer = tokenizer
        # llama.cpp and Ollama prepend BOS themselves when the vocabulary says so: drop the template's copy
        adds_bos = adds_special_token(tokenizer, getattr(tokenizer, "bos_token_id", None), at_start=True)
        self.bos = (getattr(tokenizer, "bos_token", None) or "") if adds_bos else ""

    def __call__(self, turns: list[tuple[str, str]], generation: bool) -> str | None:
        messages = [{"role": r, "content": c} for r, c in turns]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # templates raise their own errors (raise_exception) for shapes they refuse
            return None
        if not isinstance(text, str):
            return None
        return text[len(self.bos):] if self.bos and text.startswith(self.bos) else text


def _pieces(text: str | None, sentinels: list[str]) -> list[str] | None:
    """The text before, between and after the sentinels, or None when they are not all there in order."""
    if text is None:
        return None
    out, pos = [], 0
    for sentinel in sentinels:
        at = text.find(sentinel, pos)
        if at < 0:
            return None
        out.append(text[pos:at])
        pos = at + len(sentinel)
    out.append(text[pos:])
    return out


def _is_marker(text: str, tokenizer) -> bool:
    if not text:
        return False
    specials = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(tokenizer.get_added_vocab())
    return text in specials or bool(_MARKER.fullmatch(text))


_CONVERSATIONS = [
    [("user", _U1)],
    [("user", _U1), ("assistant", _A1), ("user", _U2)],
    [("system", _S), ("user", _U1)],
    [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)],
]


class _Style:
    default_system: str | None = None
    system_supported: bool = True

    def simulate(self, turns: list[tuple[str, str]]) -> str:
        raise NotImplementedError

    def matches(self, render: _Renderer) -> bool:
        """Render the probe conversations both ways (Ollama's semantics simulated) and compare."""
        for turns in _CONVERSATIONS:
            has_system = any(r == "system" for r, _ in turns)
            if has_system and not self.system_supported:
                continue
            expected = render(turns, True)
            if not has_system and self.default_system:
                turns = [("system", self.default_system), *turns]  # what Ollama does with SYSTEM
            if expected != self.simulate(turns):
                return False
        return True


class _RoleTagged(_Style):
    """Every turn is PREFIX + role + HEADER + content + SUFFIX (ChatML, Llama 3 and similar)."""

    def __init__(self, prefix: str, header: str, suffix: str, system_supported: bool):
        self.prefix, self.header, self.suffix = prefix, header, suffix
        self.system_supported = system_supported

    @classmethod
    def derive(cls, render: _Renderer) -> _RoleTagged | None:
        with_system = _pieces(render([("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)], True),
                              [_S, _U1, _A1, _U2])
        if with_system is not None and "system" in with_system[0]:
            first = with_system[0]
            at = first.find("system")
            prefix, header = first[:at], first[at + len("system"):]
            between = with_system[1]
            tail = prefix + "user" + header
            if not between.endswith(tail):
                return None
            style = cls(prefix, header, between[: len(between) - len(tail)], True)
        else:
            plain = _pieces(render([("user", _U1), ("assistant", _A1), ("user", _U2)], True), [_U1, _A1, _U2])
            if plain is None:
                return None
            first, user_gap = plain[0], plain[2]
            at = first.rfind("user")
            if at < 0:
                return None
            prefix, header = first[:at], first[at + len("user"):]
            # a default system block may come first: the true prefix is what precedes "user" in later turns
            tail = "user" + header
            if not user_gap.endswith(tail):
                return None
            joint = user_gap[: len(user_gap) - len(tail)]  # SUFFIX + PREFIX
            prefix = _longest_suffix_in(prefix, joint)
            style = cls(prefix, header, joint[: len(joint) - len(prefix)], False)
        style.default_system = style._default_system(render)
        return style

    def _default_system(self, render: _Renderer) -> str | None:
        text = render([("user", _U1)], True)
        opening = self.prefix + "system" + self.header
        if text is None or not text.startswith(opening):
            return None
        end = text.find(self.suffix + self.prefix + "user" + self.header, len(opening)) if self.suffix else -1
        return text[len(opening):end] if end > len(opening) else None

    def simulate(self, turns):
        out = ""
        for i, (role, content) in enumerate(turns):
            if role == "system" and not self.system_supported:
                continue
            out += f"{self.prefix}{role}{self.header}{content}{self.suffix}"
            if i == len(turns) - 1 and role != "assistant":
                out += f"{self.prefix}assistant{self.header}"
        return out

    def go_template(self) -> str:
        turn = f"{self.prefix}{{{{ .Role }}}}{self.header}{{{{ .Content }}}}{self.suffix}"
        if not self.system_supported:
            turn = f'{{{{ if ne .Role "system" }}}}{turn}{{{{ end }}}}'
        return (
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{turn}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{self.prefix}assistant{self.header}{{{{ end }}}}'
            "{{ end }}"
        )

    def stop_candidates(self) -> list[str]:
        return [self.prefix.strip(), self.header.strip(), self.suffix.strip()]


def _longest_suffix_in(text: str, joint: str) -> str:
    """The longest tail of `text` that `joint` ends with (splits SUFFIX+PREFIX when a system block leads)."""
    for start in range(len(text) + 1):
        if joint.endswith(text[start:]):
            return text[start:]
    return ""


class _Instruct(_Style):
    """User turns wrapped in markers, assistant turns bare ([INST] ... [/INST] answer</s>)."""

    def __init__(self, user_open, user_close, asst_open, asst_close, gen):
        self.user_open, self.user_close = user_open, user_close
        self.asst_open, self.asst_close, self.gen = asst_open, asst_close, gen
        self.system_supported = False
        self.sys_open = self.sys_close = ""
        self.sys_on = "first"

    @classmethod
    def derive(cls, render: _Renderer) -> _Instruct | None:
        turns = [("user", _U1), ("assistant", _A1), ("user", _U2)]
        gen, nogen = _pieces(render(turns, True), [_U1, _A1, _U2]), _pieces(render(turns, False), [_U1, _A1, _U2])
        if gen is None or nogen is None:
            return None
        user_open, user_close = gen[0], nogen[3]
        if not (gen[1].startswith(user_close) and gen[3].startswith(user_close) and gen[2].endswith(user_open)):
            return None
        style = cls(user_open, user_close, gen[1][len(user_close):], gen[2][: len(gen[2]) - len(user_open)],
                    gen[3][len(user_close):])
        style._derive_system(render)
        return style

    def _derive_system(self, render: _Renderer) -> None:
        text = render([("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)], True)
        if text is None or _S not in text:
            return  # the template refuses or drops system messages: so will the Ollama template
        at = text.find(_S)
        for sys_on, user in (("first", _U1), ("last", _U2)):
            block_start = text.rfind(self.user_open, 0, at)
            end = text.find(user, at)
            if block_start < 0 or end < 0 or text.find(_U1 if sys_on == "last" else _U2, block_start, at) >= 0:
                continue
            self.system_supported, self.sys_on = True, sys_on
            self.sys_open = text[block_start + len(self.user_open):at]
            self.sys_close = text[at + len(_S):end]
            return

    def simulate(self, turns):
        # Ollama's .System joins every system message
        system = "\n\n".join(c for r, c in turns if r == "system") if self.system_supported else None
        users = [i for i, (r, _) in enumerate(turns) if r == "user"]
        target = (users[0] if self.sys_on == "first" else users[-1]) if users else -1
        out = ""
        for i, (role, content) in enumerate(turns):
            last = i == len(turns) - 1
            if role == "user":
                out += self.user_open
                if system and i == target and (self.sys_on == "first" or last):
                    out += f"{self.sys_open}{system}{self.sys_close}"
                out += content + self.user_close + (self.gen if last else "")
            elif role == "assistant":
                out += f"{self.asst_open}{content}{self.asst_close}"
        return out

    def go_template(self) -> str:
        if self.sys_on == "first":
            condition = "(eq $i $first)"
        else:
            condition = "$last"
        system = (f"{{{{ if and $.System {condition} }}}}{self.sys_open}{{{{ $.System }}}}{self.sys_close}{{{{ end }}}}"
                  if self.system_supported else "")
        first = ('{{ $first := 0 }}{{ if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $first = 1 }}'
                 "{{ end }}{{ end }}" if self.system_supported and self.sys_on == "first" else "")
        generation = f"{{{{ if $last }}}}{self.gen}{{{{ end }}}}" if self.gen else ""
        return (
            f"{first}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
            f'{{{{ if eq .Role "user" }}}}{self.user_open}{system}{{{{ .Content }}}}{self.user_close}'
            f"{generation}"
            f'{{{{ else if eq .Role "assistant" }}}}{self.asst_open}{{{{ .Content }}}}{self.asst_close}{{{{ end }}}}'
            "{{ end }}"
        )

    def stop_candidates(self) -> list[str]:
        return [self.user_open.strip(), self.user_close.strip(), self.asst_close.strip()]
