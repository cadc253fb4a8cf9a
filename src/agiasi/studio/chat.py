"""The page's chat: a step folder (soul applied), an HF folder or a GGUF (llama.cpp), loaded once
and kept while the page uses it, answering through the model's own chat template as ``agiasi
chat`` does (the same loading, prompt rendering, stop tokens and checks), streamed token by token.

A user turn holding a control token's text (``<|assistant|>``) is refused by the same check as
``agiasi chat`` — inside the template it would forge a turn. A generation stops when the page
goes away (the stream's reader disconnects) or at its end.

``AGIASI_STUDIO_CHAT_HOLD=N`` (for tests and benchmarks only) makes a reply wait after its N-th
piece until it is stopped (at most a minute): on a tiny model a whole reply takes a fraction of a
second, so without it a test of the Stop button races the model's own end of turn.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.generate import GenerateConfig, _load, _prompt_ids, check_room, generation_kwargs
from agiasi.model.loading import release_memory

KEEP = 2  # models kept loaded at once: two side by side (base vs fine-tuned)


class HFChat:
    """A step folder (soul applied) or an HF folder, answering as ``agiasi chat`` does."""

    def __init__(self, cfg: GenerateConfig):
        self.model, self.tok = _load(cfg)

    def context(self) -> int | None:
        from agiasi.generate import _context

        return _context(self.model)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return _prompt_ids(self.tok, messages, "your message")

    def generate(self, ids: list[int], cfg: GenerateConfig, stop: threading.Event, put) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return stop.is_set()

        class _Queued(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    put(text)

        kwargs = generation_kwargs(self.tok, cfg)
        kwargs["streamer"] = _Queued(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            self.model.generate(torch.tensor([ids], device=device), **kwargs)

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

        self.path = path
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
        self.threads = os.cpu_count() or 1

    def context(self) -> int | None:
        n = self.gguf.context_length()
        return min(n, self.N_CTX) if n else self.N_CTX

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from agiasi.data.tokenize import check_turn_text

        for m in messages:
            check_turn_text(m["content"], self.controls, "your message")
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


class ChatModels:
    """Loaded models by path, the least recently used given back first."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.generating = threading.Lock()

    def get(self, path: str, cfg: GenerateConfig):
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
            while len(self._models) >= self.keep:
                _, gone = self._models.popitem(last=False)  # the least recently used goes
                gone.close()
                release_memory()
            loaded = open_chat(path, cfg)
            self._models[path] = loaded
            return loaded

    def release(self) -> list[str]:
        """Give every loaded model back (the page left the chat); a reply being written keeps
        its model until it ends."""
        if not self.generating.acquire(blocking=False):
            return []
        try:
            with self._lock:
                gone = list(self._models)
                for chat in self._models.values():
                    chat.close()
                self._models.clear()
                if gone:
                    release_memory()
                return gone
        finally:
            self.generating.release()


def prepare_reply(models: ChatModels, path: str, messages: list[dict[str, str]],
                  params: dict[str, Any]):  # fmt: skip
    """Everything that can refuse before a token is sent: the options, the messages, the model
    (loaded now if it is not), the prompt through the chat template, the context's room."""
    from agiasi.options import check

    cfg = GenerateConfig(model=path, **params)
    check(cfg)
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(
            m.get("content"), str
        ):
            raise AgiasiError("a message is {role: system|user|assistant, content: text}")
    if not messages or messages[-1]["role"] != "user":
        raise AgiasiError("the conversation must end with your message")
    chat = models.get(path, cfg)
    ids = chat.prompt_ids(messages)
    check_room(ids, cfg, chat.context())
    return chat, ids, cfg


DONE = object()  # the end of a reply in its queue


def start_reply(chat, ids: list[int], cfg: GenerateConfig, stop: threading.Event,
                lock: threading.Lock, sink=None) -> queue.Queue | None:  # fmt: skip
    """Generate the assistant's turn in a thread of its own; each piece of text as it is
    decoded, then an exception if one happened, then :data:`DONE` go to ``sink`` (a callable:
    the server hands them straight to its event loop, one thread switch a piece) or, without
    one, into the queue returned. ``stop`` ends it early; the thread gives ``lock`` back when
    the model is done, whoever was reading — one reply at a time, a second is refused."""
    if not lock.acquire(blocking=False):
        raise AgiasiError("another reply is being written; stop it first")
    pieces: queue.Queue | None = None
    if sink is None:
        pieces = queue.Queue()
        sink = pieces.put
    hold = int(os.environ.get("AGIASI_STUDIO_CHAT_HOLD") or 0)
    sent = 0

    def put(text: str) -> None:
        nonlocal sent
        sink(text)
        sent += 1
        if hold and sent == hold:
            stop.wait(60)

    def run() -> None:
        try:
            chat.generate(ids, cfg, stop, put)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            sink(AgiasiError(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            lock.release()
            sink(DONE)

    _worker().submit(run)
    return pieces


class _Worker:
    """One long-lived thread that writes every reply: a new thread a reply waited in
    ``Thread.start`` for the GIL and made OpenMP build a new team of threads for its first
    kernel — milliseconds before the first token that ``agiasi chat`` (the main thread) never
    pays (bench/chat_ttft.py)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="agiasi-chat", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.jobs.get()()

    def submit(self, job) -> None:
        self.jobs.put(job)


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER
