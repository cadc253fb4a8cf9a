"""Chat templates rendered within a time and a memory budget — every render agiasi makes.

A chat template is the model's own code, run in transformers' jinja sandbox: it cannot reach
the system, but it can loop (nested ``range``) or grow a string (``'x' * 5000000000``, or
``x ~ x`` in a loop) until the machine runs out of memory. Training, the export's Modelfile
check, calibration, evaluation and chat all render templates from files users download, so
each render goes through :func:`bounded`:

* **time**: a render that takes longer than :data:`RENDER_SECONDS` is stopped (a real template
  renders in milliseconds);
* **memory**: a render during which the process grows by more than :data:`RENDER_BYTES` is
  stopped, and a single operation that would make a string or list larger than
  :data:`MAX_ITEMS` is refused before it allocates (jinja's sandbox has a hook for binary
  operators, :class:`BoundedSandbox`; it is installed into transformers' template compiler,
  which has no size bound of its own).

Stopping means raising an exception inside the rendering thread between two of its bytecodes
(CPython's ``PyThreadState_SetAsyncExc``; a render thread cannot be killed otherwise), so an
overrun thread ends instead of spinning on. Only the render is budgeted: tokenizing a long,
valid record afterwards is not the template's time (a 10 MB record was once called "a loop in
the template?").
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agiasi.errors import AgiasiError

RENDER_SECONDS = 5.0
RENDER_BYTES = 512 << 20
MAX_ITEMS = 16 << 20  # characters of one string, or items of one list, a template may build
_POLL = 0.005


class TemplateBudget(BaseException):
    """Raised inside the rendering thread to stop it (a BaseException: templates that catch
    ``Exception`` do not swallow it)."""


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None  # not Linux: the time budget and the operator bounds still hold


def _stop(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(TemplateBudget)
    )


class _Worker:
    """One daemon thread that renders, so a budget costs a queue hand-off rather than a thread
    per render (a 50 k-conversation dataset renders ~150 k times); replaced after an overrun."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="agiasi-template")
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                fn, box, done = self.jobs.get()
                if fn is None:
                    return
                try:
                    box["out"] = fn()
                except BaseException as e:  # handed back to the caller's thread
                    box["err"] = e
                done.set()
            except TemplateBudget:  # a stop that landed after the render had ended
                continue


_worker: _Worker | None = None


def bounded(fn: Callable[[], Any], where: str) -> Any:
    """``fn()`` (a render) on the render thread, stopped past the time or memory budget."""
    global _worker
    install_bounds()
    if _worker is None or not _worker.thread.is_alive():
        _worker = _Worker()
    worker = _worker
    box: dict[str, Any] = {}
    done = threading.Event()
    start_rss = _rss()
    t0 = time.monotonic()
    worker.jobs.put((fn, box, done))
    over = None
    while not done.wait(_POLL):
        if time.monotonic() - t0 > RENDER_SECONDS:
            over = f"did not finish rendering in {RENDER_SECONDS:g} s (a loop in the template?)"
        elif (
            start_rss is not None and (now := _rss()) is not None and now - start_rss > RENDER_BYTES
        ):
            over = (
                f"grew the process by more than {RENDER_BYTES >> 20} MiB while rendering (a "
                "template that builds ever larger strings?)"
            )
        if over:
            # an exception lands between two bytecodes; one long C call (a huge join) is waited
            # out, up to a few seconds, after which the thread is left to finish on its own
            deadline = time.monotonic() + 5
            while not done.is_set() and time.monotonic() < deadline:
                _stop(worker.thread)
                done.wait(0.05)
            _worker = None
            worker.jobs.put((None, None, None))
            box.clear()  # drop what the render built
            raise AgiasiError(f"{where}: the chat template {over}; agiasi stopped it")
    if "err" in box:
        err = box["err"]
        if type(err).__name__ == "TemplateTooBig":  # a bound, not the template's own refusal
            raise AgiasiError(f"{where}: the chat template was stopped: {err}") from None
        raise err
    return box["out"]


def _too_big(value: Any) -> bool:
    return isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_ITEMS


class _Bounds:
    """The checks :class:`BoundedSandbox` adds to jinja's sandbox, as one mixin."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * n > MAX_ITEMS
                ):
                    raise _refused(f"'…' * {n} would make {len(seq) * n:,} items")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 64:
                if abs(left).bit_length() * right > MAX_ITEMS:
                    raise _refused(f"{left} ** {right} is a number of millions of digits")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > MAX_ITEMS:
                    raise _refused("a concatenation past the size bound")
        return super().call_binop(context, operator, left, right)

    def call(self, __context, __obj, *args, **kwargs):
        return _bounded_call(lambda: super(_Bounds, self).call(__context, __obj, *args, **kwargs),
                             args, kwargs, "a call")  # fmt: skip


def _refused(what: str):
    import jinja2

    class TemplateTooBig(jinja2.exceptions.SecurityError):
        pass

    return TemplateTooBig(
        f"{what}: past agiasi's bound of {MAX_ITEMS:,} characters or items for one value"
    )


def _bounded_filter(f):
    import functools

    @functools.wraps(f)
    def run(*args, **kwargs):
        return _bounded_call(lambda: f(*args, **kwargs), args, kwargs, "a filter")

    return run


def _bounded_call(fn, args, kwargs, what: str):
    """``fn()`` unless an integer argument asks for more than the bound (``center(5e9)``), and
    refused afterwards if its result is past it."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ITEMS:
            raise _refused(f"{what} with the argument {a}")
    out = fn()
    if _too_big(out):
        raise _refused(f"{what} whose result is past the size bound")
    return out


_installed = False
_lock = threading.Lock()


def install_bounds() -> None:
    """Make transformers' template compiler use :class:`BoundedSandbox` (once, before its
    first compile: compiled templates are cached, and the operator hooks are compiled in).

    transformers builds its sandbox inside a private function with no hook of its own, so the
    class it names is replaced in its module; everything else it sets up (filters, globals,
    the generation tracker) is its own. Should a future transformers name it differently, the
    time and memory budgets of :func:`bounded` still hold."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        try:
            import transformers.utils.chat_template_utils as ctu
        except ImportError:
            _installed = True
            return
        base = getattr(ctu, "ImmutableSandboxedEnvironment", None)
        if base is not None and not issubclass(base, _Bounds):

            class BoundedSandbox(_Bounds, base):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self.filters = {k: _bounded_filter(f) for k, f in self.filters.items()}

            ctu.ImmutableSandboxedEnvironment = BoundedSandbox
            compile_cache = getattr(ctu, "_compile_jinja_template", None)
            if hasattr(compile_cache, "cache_clear"):
                compile_cache.cache_clear()
        _installed = True


def render_text(tokenizer, messages, where: str, gen: bool = False) -> str:
    """The tokenizer's chat template on ``messages`` as text, within the budget; a template
    that raises (its own ``raise_exception``, a conversation it rejects, a bound) is one error
    naming the record."""
    try:
        return bounded(
            lambda: tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            ),
            where,
        )
    except AgiasiError:
        raise
    except Exception as e:  # jinja2's TemplateError and whatever the template raises
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AgiasiError(f"{where}: the chat template refused this conversation: {msg}") from None


def render_ids(tokenizer, messages, where: str, gen: bool = False) -> list[int]:
    """:func:`render_text` tokenized as ``apply_chat_template(tokenize=True)`` tokenizes it (no
    special tokens added), outside the render's budget."""
    text = render_text(tokenizer, messages, where, gen)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
