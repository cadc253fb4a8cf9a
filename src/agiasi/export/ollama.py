"""The chat format of an Ollama Modelfile: a ``TEMPLATE`` in Ollama's Go-template syntax and its
``PARAMETER stop`` lines, for each chat family of the architecture table.

Ollama can read the GGUF's Jinja template itself, but only for templates it recognises; an
explicit ``TEMPLATE`` makes the Modelfile mean the same everywhere. The TEMPLATE is not taken
from the model's files (text there is untrusted): it is one of the fixed Go templates below,
chosen because it renders a probe conversation exactly as the tokenizer's own Jinja chat
template does (system + user + generation prompt, and the same with the answer). A chat
template that matches none of them gets no TEMPLATE, and the Modelfile says so.

Only the subset of Go's text/template that these use is rendered here (:func:`render_go`):
``{{ .System }}``, ``{{ .Prompt }}``, ``{{ .Response }}`` and ``{{ if .X }} … {{ end }}`` — the
single-turn form Ollama applies to every turn of a conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agiasi.errors import AgiasiError


@dataclass(frozen=True)
class ChatFormat:
    template: str  # Go template text (no triple quotes: it stands inside TEMPLATE """…""")
    stops: tuple[str, ...]  # stop strings, kept where they are in the vocabulary


CHAT_FORMATS: dict[str, ChatFormat] = {
    "phi3": ChatFormat(
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}"
        "<|assistant|>\n{{ .Response }}<|end|>\n",
        ("<|end|>", "<|endoftext|>", "<|user|>"),
    ),
    "llama3": ChatFormat(
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
        "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ .Response }}<|eot_id|>",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    "chatml": ChatFormat(  # Qwen2, Qwen2.5, Qwen3 (non-thinking history)
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    ),
    "gemma": ChatFormat(  # Gemma has no system turn: the system text leads the user turn
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
        "<end_of_turn>\n<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
        ("<end_of_turn>", "<start_of_turn>"),
    ),
    "llama2": ChatFormat(
        "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]"
        "{{ if .Response }} {{ .Response }} </s>{{ end }}",
        ("[INST]", "[/INST]", "</s>"),
    ),
    "mistral": ChatFormat(
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}</s>",
        ("[INST]", "[/INST]", "</s>"),
    ),
}

# The probe conversation: Japanese, with a newline inside a turn.
PROBE = {
    "system": "あなたは日本語で答えるアシスタントです。",
    "user": "富士山の高さは？\n短く答えてください。",
    "assistant": "3776 メートルです。",
}

_TAG = re.compile(r"\{\{\s*(if\s+\.(\w+)|end|\.(\w+))\s*\}\}")


def render_go(template: str, values: dict[str, str], cut_at_response: bool = False) -> str:
    """``template`` with ``values`` (System, Prompt, Response), in the subset described above.

    ``cut_at_response``: what Ollama sends for the turn being answered — the text up to where
    ``{{ .Response }}`` is rendered (the rest of the template is omitted), Response empty."""
    out: list[str] = []
    stack: list[bool] = []  # for each open `if`: whether its body is rendered
    pos = 0
    for m in _TAG.finditer(template):
        if all(stack):
            out.append(template[pos : m.start()])
        pos = m.end()
        if m.group(2):
            stack.append(bool(values.get(m.group(2))))
        elif m.group(1) == "end":
            if not stack:
                raise AgiasiError("Go template: {{ end }} without {{ if }}")
            stack.pop()
        elif all(stack):
            if cut_at_response and m.group(3) == "Response":
                return "".join(out)
            out.append(values.get(m.group(3), ""))
    if stack:
        raise AgiasiError("Go template: {{ if }} without {{ end }}")
    out.append(template[pos:])
    return "".join(out)


def _jinja(tok, messages: list[dict[str, str]], generation: bool) -> str | None:
    """The tokenizer's own rendering, its BOS dropped (llama.cpp adds it); None if it refuses."""
    from agiasi.templates import bounded

    try:  # within the render budget: a looping template must not hang the export
        text = bounded(
            lambda: tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            ),
            "the Modelfile's template check",
        )
    except AgiasiError:
        raise
    except Exception:  # a template that raises for this conversation (Gemma: no system turn)
        return None
    bos = getattr(tok, "bos_token", None)
    return text[len(bos) :] if bos and text.startswith(bos) else text


def renders_like(fmt: ChatFormat, tok) -> bool:
    """Whether ``fmt`` renders the probe exactly as the tokenizer's Jinja template does: the
    prompt up to the answer, and the turn with the answer (the template may close with EOS)."""
    checked = 0
    for with_system in (True, False):
        sys_turn = [{"role": "system", "content": PROBE["system"]}] if with_system else []
        turns = [*sys_turn, {"role": "user", "content": PROBE["user"]}]
        values = {"System": PROBE["system"] if with_system else "", "Prompt": PROBE["user"]}
        prompt = _jinja(tok, turns, True)
        full = _jinja(tok, [*turns, {"role": "assistant", "content": PROBE["assistant"]}], False)
        if prompt is None or full is None:
            continue
        if prompt != _up_to_response(fmt.template, values):
            return False
        go_full = render_go(fmt.template, {**values, "Response": PROBE["assistant"]})
        rest = full[len(go_full) :] if full.startswith(go_full) else None
        if rest is None or rest.strip() not in ("", getattr(tok, "eos_token", None) or ""):
            return False
        checked += 1
    return checked > 0


def _up_to_response(template: str, values: dict[str, str]) -> str:
    return render_go(template, {**values, "Response": ""}, cut_at_response=True)


def chat_format(tok) -> tuple[str, ChatFormat] | None:
    """The family whose Go template renders like the tokenizer's chat template, or None."""
    if not getattr(tok, "chat_template", None):
        return None
    vocab = tok.get_vocab()
    for name, fmt in CHAT_FORMATS.items():
        if fmt.stops[0] not in vocab and not fmt.stops[0].startswith("["):
            continue  # its turn markers are not even tokens of this vocabulary
        if renders_like(fmt, tok):
            return name, fmt
    return None
