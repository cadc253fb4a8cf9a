"""Log-likelihood of continuations, as lm-evaluation-harness scores multiple choice — batched.

Tokens follow lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
continuation, ``context + continuation`` is encoded whole and the continuation is its tail
after the context's own encoding; the model scores ``context ids + continuation ids``. The
result of a choice is ``Σ log p(continuation token | everything before)`` and whether every
token is the argmax ("greedy").

Where lm-eval runs one sequence per choice, a torch model here runs one *row per item*: the
context once, then each choice's tokens after it, under an additive 4-D mask in which each
choice sees the context and itself but no other choice, with position ids that continue from
the context for every choice. The numbers are those of five separate sequences (the test
compares them); the context costs one forward instead of five. Rows are right-padded and
batched up to a token budget that bounds the (tokens × vocab) logits. A GGUF in llama.cpp keeps
the context in its KV cache (and the prefix it shares with the previous item's context), then
evaluates each choice from the context's end.

Past the model's context, each ``context + choice`` is cut on the left as lm-eval cuts it (its
first tokens go; a shorter choice keeps more context), and the item records that it was cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agiasi.errors import AgiasiError

LOGITS_BUDGET_BYTES = 256 * 2**20
MAX_BATCH_TOKENS = 8192


@dataclass
class Scored:
    """One item's choices: summed log-probabilities and whether each is the greedy path."""

    logliks: list[float]
    greedy: list[bool]


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's token split of (context, continuation)."""
    context, moved = _strip_context(context)
    ctx = encode(context)
    return ctx, encode(context + moved + continuation)[len(ctx) :]


def _strip_context(context: str) -> tuple[str, str]:
    """(context without its trailing whitespace, that whitespace: it joins the continuation)."""
    stripped = context.rstrip()
    if not stripped:
        raise AgiasiError("a multiple-choice item needs a non-empty context")
    return stripped, context[len(stripped) :]


def item_tokens(
    encode: Callable[[str], list[int]],
    context: str,
    continuations: Sequence[str],
    max_length: int | None,
) -> tuple[list[tuple[list[int], list[list[int]]]], bool]:
    """The item as scorer groups ``[(context ids, [continuation ids])]`` and whether it was cut.

    One group when everything fits: the split leaves the context's ids equal for every choice,
    so they are shared. Past ``max_length``, lm-eval keeps the last ``max_length + 1`` tokens of
    each ``context + choice`` on its own, so a shorter choice keeps more context: then one group
    per choice, each context cut as lm-eval cuts it.
    """
    stripped, moved = _strip_context(context)
    ctx = encode(stripped)  # once: the same ids for every choice
    conts = [encode(stripped + moved + c)[len(ctx) :] for c in continuations]
    if any(not c for c in conts):
        raise AgiasiError(f"a choice of the item {context[-40:]!r} encodes to no tokens")
    if max_length is None or len(ctx) + max(len(c) for c in conts) - 1 <= max_length:
        return [(ctx, conts)], False
    groups = []
    for c in conts:
        if len(c) > max_length:
            raise AgiasiError(
                f"a choice of {len(c)} tokens does not fit the model's context of {max_length}"
            )
        keep = max_length + 1 - len(c)
        groups.append((ctx[-keep:], [c]))
    return groups, True


def _gather(rows: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Σ log_softmax(rows)[i, targets[i]] and whether every target is its row's argmax."""
    rows = rows.float()
    tgt = torch.tensor(targets, device=rows.device)
    lp = rows.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)
    greedy = bool((rows.argmax(dim=-1) == tgt).all())
    return float(lp.double().sum()), greedy


class TorchScorer:
    """Items through a torch causal LM (an HF model or the soul wrapper) in packed rows.

    ``forward(input_ids, attention_mask, position_ids)`` returns an object with ``.logits``;
    both ``transformers`` models and :class:`agiasi.model.wrapper.AGIASI_SO8T_Wrapper` take those
    keywords and pass a 4-D float mask through as it is.
    """

    def __init__(self, forward, device: torch.device, dtype: torch.dtype, vocab: int):
        self.forward = forward
        self.device = device
        self.dtype = dtype
        by_logits = LOGITS_BUDGET_BYTES // (4 * max(1, vocab))
        self.batch_tokens = max(256, min(MAX_BATCH_TOKENS, by_logits))

    @staticmethod
    def _row(ctx: list[int], conts: list[list[int]]):
        ids, pos, spans = list(ctx), list(range(len(ctx))), []
        for c in conts:
            start = len(ids)
            ids += c[:-1]
            pos += range(len(ctx), len(ctx) + len(c) - 1)
            spans.append(start)
        return ids, pos, spans

    def _mask(self, rows: list[tuple[list[int], list[int], list[int]]], items, width: int):
        allow = torch.zeros(len(rows), width, width, dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for b, ((ids, _, spans), (ctx, conts)) in enumerate(zip(rows, items, strict=True)):
            n_ctx = len(ctx)
            allow[b, :n_ctx, :n_ctx] = causal[:n_ctx, :n_ctx]
            for start, c in zip(spans, conts, strict=True):
                n = len(c) - 1
                if n:
                    allow[b, start : start + n, :n_ctx] = True
                    allow[b, start : start + n, start : start + n] = causal[:n, :n]
            pad = torch.arange(len(ids), width)
            allow[b, pad, pad] = True  # padding sees itself: no row is all -inf (NaN)
        mask = torch.zeros(allow.shape, dtype=self.dtype)
        mask.masked_fill_(~allow, torch.finfo(self.dtype).min)
        return mask[:, None]

    def score(self, items: list[tuple[list[int], list[list[int]]]], progress=None) -> list[Scored]:
        """``items``: (context ids, [continuation ids]) → one :class:`Scored` each, in order."""
        out: list[list[tuple[float, bool]] | None] = [None] * len(items)
        rows = [self._row(ctx, conts) for ctx, conts in items]
        order = sorted(range(len(items)), key=lambda i: -len(rows[i][0]))
        batch: list[int] = []
        for k, i in enumerate(order):
            batch.append(i)
            width = len(rows[batch[0]][0])
            nxt = order[k + 1] if k + 1 < len(order) else None
            if nxt is None or (len(batch) + 1) * width > self.batch_tokens:
                self._run(batch, rows, items, out)
                if progress is not None:
                    progress(len(batch))
                batch = []
        return [
            Scored([s for s, _ in r], [g for _, g in r])
            for r in out  # type: ignore[union-attr]
        ]

    @torch.no_grad()
    def _run(self, batch, rows, items, out) -> None:
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        pos = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            r_ids, r_pos, _ = rows[i]
            ids[b, : len(r_ids)] = torch.tensor(r_ids)
            pos[b, : len(r_pos)] = torch.tensor(r_pos)
        mask = self._mask([rows[i] for i in batch], [items[i] for i in batch], width)
        logits = self.forward(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
        ).logits
        for b, i in enumerate(batch):
            ctx, conts = items[i]
            spans = rows[i][2]
            res = []
            for start, c in zip(spans, conts, strict=True):
                where = [len(ctx) - 1] + list(range(start, start + len(c) - 1))
                res.append(_gather(logits[b, where], c))
            out[i] = res


class GGUFScorer:
    """Items through a GGUF in llama.cpp: the context once in the KV cache (a prefix shared
    with the previous item's stays), each choice evaluated from the context's end."""

    def __init__(self, llm):
        self.llm = llm  # a llama_cpp.Llama built with logits_all=True

    def score(self, items: list[tuple[list[int], list[list[int]]]], progress=None) -> list[Scored]:
        llm = self.llm
        out = []
        for ctx, conts in items:
            need = len(ctx) + max(len(c) for c in conts) - 1
            if need > llm.n_ctx():
                raise AgiasiError(
                    f"an item needs {need} positions, more than the llama.cpp context of "
                    f"{llm.n_ctx()} (raise --n-ctx)"
                )
            held = list(llm.input_ids[: llm.n_tokens])
            keep = 0
            for a, b in zip(held, ctx[:-1], strict=False):
                if a != b:
                    break
                keep += 1
            llm.n_tokens = keep
            llm.eval(ctx[keep:])
            first = torch.from_numpy(np.array(llm.scores[len(ctx) - 1]))
            res = []
            for c in conts:
                rows = [first]
                if len(c) > 1:
                    llm.n_tokens = len(ctx)
                    llm.eval(c[:-1])
                    tail = np.array(llm.scores[len(ctx) : len(ctx) + len(c) - 1])
                    rows += list(torch.from_numpy(tail))
                res.append(_gather(torch.stack(rows), c))
            out.append(Scored([s for s, _ in res], [g for _, g in res]))
            if progress is not None:
                progress(1)
        return out
