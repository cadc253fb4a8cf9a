"""``agiasi generate`` / ``agiasi chat``: text from a training checkpoint (soul applied) or from
an exported HF folder, streamed token by token, with the tokenizer's own chat template; ``agiasi
chat`` also takes a GGUF (llama.cpp, the template in its metadata). The chat engines are the
studio's too (agiasi.studio.chat)."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agiasi.errors import AgiasiError
from agiasi.model.loading import DType
from agiasi.options import check, option


@dataclass
class GenerateConfig:
    """Flags of ``agiasi generate`` and ``agiasi chat``."""

    model: str = option(
        help="step_N folder (soul applied) or exported HF folder (chat: also a .gguf file)"
    )
    prompt: str = option("", "the text to continue (generate)")
    max_new_tokens: int = option(128, "tokens to generate at most", ge=1)
    temperature: float = option(0.0, "sampling temperature; 0 = greedy", ge=0.0)
    top_p: float = option(0.9, "nucleus sampling mass (with --temperature > 0)", gt=0.0, le=1.0)
    repetition_penalty: float = option(1.1, "> 1 discourages repeats; 1 = off", gt=0.0)
    chat_template: bool = option(
        False, "wrap --prompt as a user turn in the tokenizer's chat template"
    )
    system: str | None = option(None, "system message for the chat template")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cpu)")
    dtype: DType = option("auto", "compute dtype (auto: float32 on the CPU)")
    trust_remote_code: bool = option(
        False, "allow a base model that runs its own code (never taken from the checkpoint)"
    )


def _load(cfg: GenerateConfig):
    from transformers import AutoTokenizer

    from agiasi.eval.models import model_kind

    kind = model_kind(cfg.model)
    if kind == "gguf":
        raise AgiasiError(
            "generate takes a step folder or an HF folder; run GGUFs in llama.cpp (agiasi chat "
            "takes a GGUF too)"
        )
    if kind == "checkpoint":
        from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

        model = AGIASI_SO8T_Wrapper.from_checkpoint(
            cfg.model,
            device=cfg.device,
            lora_dropout=0.0,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
        tok = AutoTokenizer.from_pretrained(model.config.base_model)
    else:
        from agiasi.eval.models import load_hf_model
        from agiasi.model.loading import parse_device, resolve_dtype

        device = parse_device(cfg.device or "cpu")
        model = load_hf_model(cfg.model, resolve_dtype(cfg.dtype, device), device)
        tok = AutoTokenizer.from_pretrained(cfg.model)
    model.eval()
    return model, tok


def _stop_ids(tok) -> list[int]:
    """EOS and the end-of-turn tokens the vocabulary has. Looked up one by one: ``get_vocab``
    builds the whole vocabulary as a dict (150k entries for Qwen), a cost every message paid."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for s in ("<|end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(s)
        if isinstance(i, int) and i != tok.unk_token_id and tok.convert_ids_to_tokens(i) == s:
            if i not in ids:
                ids.append(i)
    return ids


def generation_kwargs(tok, cfg: GenerateConfig) -> dict[str, Any]:
    """HF ``generate``'s arguments for ``cfg``: length, repetition penalty, the stop tokens,
    greedy or sampled (what ``agiasi chat`` and the studio's chat both use)."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        eos_token_id=_stop_ids(tok),
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        kwargs.update(do_sample=False)
    return kwargs


def _hf_stream(model, tok, ids, cfg: GenerateConfig, put, stop: threading.Event | None = None):
    """HF ``generate`` with ``cfg``'s arguments, each piece of text handed to ``put`` as the
    tokenizer decodes it (transformers' streamer); ``stop`` ends it early. Returns the ids."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    class _Put(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                put(text)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return stop.is_set()

    kwargs = generation_kwargs(tok, cfg)
    kwargs["streamer"] = _Put(tok, skip_prompt=True, skip_special_tokens=True)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.generate(torch.tensor([ids], device=device), **kwargs)


def _generate(model, tok, ids, cfg: GenerateConfig, stream: TextIO) -> str:
    def put(text: str) -> None:
        stream.write(text)
        stream.flush()

    out = _hf_stream(model, tok, ids, cfg, put)
    stream.write("\n")
    stream.flush()
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def _prompt_ids(tok, messages: list[dict[str, str]], where: str = "the prompt") -> list[int]:
    from agiasi.data.tokenize import check_turn_text, control_texts, render_chat

    if not getattr(tok, "chat_template", None):
        raise AgiasiError("this tokenizer has no chat template; use `agiasi generate --prompt`")
    controls = control_texts(tok)
    for m in messages:
        check_turn_text(m["content"], controls, where)
    return render_chat(tok, messages, where, gen=True)


def _context(model) -> int | None:
    cfg = getattr(model, "hf_config", None) or getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def check_room(ids: list[int], cfg: GenerateConfig, context: int | None) -> None:
    """A prompt plus --max-new-tokens must fit the model's context: past it a model computes
    positions it never saw (or fails inside attention)."""
    if context and len(ids) + cfg.max_new_tokens > context:
        raise AgiasiError(
            f"the prompt is {len(ids)} tokens and --max-new-tokens {cfg.max_new_tokens}: more "
            f"than the model's context of {context} tokens; shorten the prompt, lower "
            "--max-new-tokens or /reset the conversation"
        )


def generate(cfg: GenerateConfig, stream: TextIO | None = None) -> str:
    """One completion of ``cfg.prompt`` (raw text, or as a user turn with ``--chat-template``)."""
    stream = stream or sys.stdout
    check(cfg)
    if not cfg.prompt:
        raise AgiasiError("--prompt is required")
    model, tok = _load(cfg)
    if cfg.chat_template:
        msgs = [{"role": "system", "content": cfg.system}] if cfg.system else []
        ids = _prompt_ids(tok, [*msgs, {"role": "user", "content": cfg.prompt}])
    else:
        ids = tok(cfg.prompt, add_special_tokens=False)["input_ids"]
    check_room(ids, cfg, _context(model))
    if not cfg.chat_template:
        stream.write(cfg.prompt)
    return _generate(model, tok, ids, cfg, stream)


# ---------------------------------------------------------------- chat engines (CLI and studio)


class HFChat:
    """A step folder (soul applied) or an HF folder, answering as ``agiasi chat`` does."""

    def __init__(self, cfg: GenerateConfig):
        self.model, self.tok = _load(cfg)

    def context(self) -> int | None:
        return _context(self.model)

    def prompt_ids(self, messages: list[dict[str, str]], where: str = "your message") -> list[int]:
        return _prompt_ids(self.tok, messages, where)

    def generate(self, ids: list[int], cfg: GenerateConfig, stop: threading.Event, put) -> None:
        _hf_stream(self.model, self.tok, ids, cfg, put, stop)

    def close(self) -> None:
        self.model = None


class GGUFChat:
    """A GGUF in llama.cpp (llama-cpp-python), through the chat template in its own metadata
    (what Ollama and llama.cpp's server use), rendered by transformers' sandboxed renderer
    within the render budget as :class:`agiasi.eval.models.GGUFModel` renders it.

    The same refusal of a control token's text as ``agiasi chat`` (the GGUF's control tokens,
    read from its vocabulary): the rendered prompt is tokenized with its special pieces parsed,
    so such text inside a turn would forge one. The context is capped at 4,096 tokens: past a
    LongRoPE model's original window llama.cpp switches to the long rope factors by the context
    *size* (the export report says why), and the chat would be another model than HF's."""

    N_CTX = 4096
    STOP_TEXTS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")

    def __init__(self, path: str):
        from agiasi.eval.models import GGUFModel

        self.gguf = GGUFModel(path, n_ctx=self.N_CTX, logits_all=False)
        self.llm = self.gguf.llm
        if not self.gguf.chat_template():
            raise AgiasiError(f"{path} has no chat template in its metadata: chat needs one")
        self.controls = _gguf_control_texts(path)
        stops = {self.llm.token_eos()}
        for text in self.STOP_TEXTS:
            if text in self.controls:
                ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
                if len(ids) == 1:
                    stops.add(ids[0])
        self.stops = {t for t in stops if t >= 0}

    def context(self) -> int | None:
        n = self.gguf.context_length()
        return min(n, self.N_CTX) if n else self.N_CTX

    def prompt_ids(self, messages: list[dict[str, str]], where: str = "your message") -> list[int]:
        from agiasi.data.tokenize import check_turn_text

        for m in messages:
            check_turn_text(m["content"], self.controls, where)
        return self.gguf.encode(self.gguf.chat(messages))

    def generate(self, ids: list[int], cfg: GenerateConfig, stop: threading.Event, put) -> None:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        greedy = cfg.temperature <= 0
        self.llm.reset()
        made = 0
        for token in self.llm.generate(
            ids,
            temp=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            top_k=1 if greedy else 0,
            min_p=0.0,  # HF's generate has no min-p: the same sampler as agiasi chat's
            repeat_penalty=cfg.repetition_penalty,
            reset=True,
        ):
            if stop.is_set() or token in self.stops:
                break
            text = decoder.decode(self.llm.detokenize([token], special=False))
            if text:
                put(text)
            made += 1
            if made >= cfg.max_new_tokens:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            put(tail)

    def close(self) -> None:
        self.gguf.close()


def _gguf_control_texts(path: str) -> list[str]:
    """The texts of the GGUF vocabulary's control tokens (token type 3), longest first."""
    import gguf

    r = gguf.GGUFReader(path)
    tokens, types = r.fields.get("tokenizer.ggml.tokens"), r.fields.get("tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return []
    found = {t for t, k in zip(tokens.contents(), types.contents(), strict=False)
             if k == gguf.TokenType.CONTROL and t}  # fmt: skip
    return sorted(found, key=len, reverse=True)


def open_chat(path: str, cfg: GenerateConfig):
    from agiasi.eval.models import model_kind

    if model_kind(path) == "gguf":
        return GGUFChat(path)
    return HFChat(cfg)


def _stream_reply(engine, ids: list[int], cfg: GenerateConfig, stream: TextIO) -> str:
    """One reply of either engine written to ``stream`` as it comes; returns its text."""
    pieces: list[str] = []

    def put(piece: str) -> None:
        pieces.append(piece)
        stream.write(piece)
        stream.flush()

    engine.generate(ids, cfg, threading.Event(), put)
    stream.write("\n")
    return "".join(pieces)


def chat(cfg: GenerateConfig, stdin: TextIO | None = None, stream: TextIO | None = None) -> int:
    """Interactive chat with the model's own template; /reset clears, /exit (or EOF) quits."""
    stdin, stream = stdin or sys.stdin, stream or sys.stdout
    check(cfg)
    engine = open_chat(cfg.model, cfg)
    model = getattr(engine, "model", None)
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)
    phase = (
        model.get_phase_status()
        if hasattr(model, "get_phase_status")
        else "GGUF in llama.cpp"
        if isinstance(engine, GGUFChat)
        else "plain model"
    )
    stream.write(f"agiasi chat — {Path(cfg.model).name} ({phase}). /reset, /exit\n")
    turns = 0
    while True:
        stream.write("> ")
        stream.flush()
        try:
            line = stdin.readline()
        except UnicodeDecodeError as e:  # a line that is not UTF-8: say so, keep the session
            stream.write(f"agiasi: that line is not UTF-8 text (byte {e.start}); try again\n")
            continue
        if not line:
            stream.write("\n")
            return turns
        text = line.strip()
        if text in ("/exit", "/quit"):
            return turns
        if text == "/reset":
            messages = list(base)
            continue
        if not text:
            continue
        try:
            ids = engine.prompt_ids([*messages, {"role": "user", "content": text}], "that line")
            check_room(ids, cfg, engine.context())
        except AgiasiError as e:  # the line is dropped, the conversation goes on
            stream.write(f"agiasi: {e}\n")
            continue
        messages.append({"role": "user", "content": text})
        reply = _stream_reply(engine, ids, cfg, stream)
        messages.append({"role": "assistant", "content": reply.strip()})
        turns += 1
