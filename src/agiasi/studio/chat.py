"""The page's chat: a step folder (soul applied), an HF folder or a GGUF (llama.cpp), loaded once
and kept while the page uses it, answering through ``agiasi chat``'s own engines
(:class:`agiasi.generate.HFChat`, :class:`agiasi.generate.GGUFChat`: the same loading, prompt
rendering, stop tokens and checks), streamed token by token.

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
from agiasi.generate import GenerateConfig, check_room, open_chat
from agiasi.model.loading import release_memory

KEEP = 2  # models kept loaded at once: two side by side (base vs fine-tuned)


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
