"""The page's chat: a step folder (soul applied) or an HF folder, loaded once and kept while the
page uses it, answering through the model's own chat template as ``agiasi chat`` does (the same
loading, prompt rendering, stop tokens and checks), streamed token by token.

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


class ChatModels:
    """Loaded models by path, the least recently used given back first."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.generating = threading.Lock()

    def get(self, path: str, cfg: GenerateConfig):
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
            while len(self._models) >= self.keep:
                self._models.popitem(last=False)  # the least recently used goes
                release_memory()
            loaded = _load(cfg)
            self._models[path] = loaded
            return loaded


def prepare_reply(models: ChatModels, path: str, messages: list[dict[str, str]],
                  params: dict[str, Any]):  # fmt: skip
    """Everything that can refuse before a token is sent: the options, the messages, the model
    (loaded now if it is not), the prompt through the chat template, the context's room."""
    from agiasi.generate import _context
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
    model, tok = models.get(path, cfg)
    ids = _prompt_ids(tok, messages, "your message")
    check_room(ids, cfg, _context(model))
    return model, tok, ids, cfg


DONE = object()  # the end of a reply in its queue


def start_reply(model, tok, ids: list[int], cfg: GenerateConfig, stop: threading.Event,
                lock: threading.Lock) -> queue.Queue:  # fmt: skip
    """Generate the assistant's turn in a thread of its own; its queue receives each piece of
    text as the tokenizer decodes it (``agiasi chat``'s streamer), then an exception if one
    happened, then :data:`DONE`. ``stop`` ends it early; the thread gives ``lock`` back when
    the model is done, whoever was reading — one reply at a time, a second is refused."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    if not lock.acquire(blocking=False):
        raise AgiasiError("another reply is being written; stop it first")
    pieces: queue.Queue = queue.Queue()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return stop.is_set()

    hold = int(os.environ.get("AGIASI_STUDIO_CHAT_HOLD") or 0)

    class _Queued(TextStreamer):
        sent = 0

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                pieces.put(text)
                self.sent += 1
                if hold and self.sent == hold:
                    stop.wait(60)

    kwargs = generation_kwargs(tok, cfg)
    kwargs["streamer"] = _Queued(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
    device = next(model.parameters()).device

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(torch.tensor([ids], device=device), **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            pieces.put(AgiasiError(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            lock.release()
            pieces.put(DONE)

    threading.Thread(target=run, daemon=True).start()
    return pieces
