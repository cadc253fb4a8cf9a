"""Preference pairs as people have them → one shape, and → token pairs for DPO / ORPO.

A preference record is a prompt and two answers, the one a person chose and the one they
rejected. The shapes in use (auto-detected by their keys, as :mod:`agiasi.data.formats` does for
supervised data):

* ``preference`` — TRL's explicit form: ``prompt``, ``chosen``, ``rejected``, each a string
  (one user turn, one assistant turn) or a list of ``{role, content}`` messages (TRL's
  conversational form: the prompt's turns, then each answer's turns).
* ``preference-implicit`` — TRL's implicit form: ``chosen`` and ``rejected`` are whole
  conversations that share the prompt; the prompt is their common leading turns, and must end
  before the first turn in which they differ.
* ``alpaca-preference`` — LLaMA-Factory's Alpaca pairs: ``instruction`` (+ ``input``,
  ``system``, ``history``) and ``chosen`` / ``rejected`` strings.
* ``sharegpt-preference`` — LLaMA-Factory's ShareGPT pairs: ``conversations`` (the prompt's
  turns) and ``chosen`` / ``rejected`` turns ``{from, value}`` (+ ``system``).

Every shape becomes ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``.
Tokenizing renders the prompt with the model's chat template and its generation prompt, then
each whole conversation; the answer is what the conversation adds after the prompt, and only
its tokens are trained. A pair longer than ``max_length`` loses the start of its prompt first
(TRL's rule: the answer is what is scored), then the end of its answers; a pair with no answer
token left is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agiasi.data.files import read_rows
from agiasi.data.formats import SHAREGPT_ROLES, _renamed, check_messages, parse_columns
from agiasi.data.tokenize import IGNORE, WHERE, check_turn_text, control_texts, render_chat
from agiasi.errors import AgiasiError

PREFERENCE_FORMATS = (
    "preference",
    "preference-implicit",
    "alpaca-preference",
    "sharegpt-preference",
)
REQUIRED = {
    "preference": ("prompt", "chosen", "rejected"),
    "preference-implicit": ("chosen", "rejected"),
    "alpaca-preference": ("instruction", "chosen", "rejected"),
    "sharegpt-preference": ("conversations", "chosen", "rejected"),
}


def preference_format_of(rec: dict[str, Any], where: str) -> str:
    """The one preference shape a record has (the most specific whose keys it holds)."""
    for fmt in ("alpaca-preference", "sharegpt-preference", "preference", "preference-implicit"):
        if all(rec.get(k) is not None for k in REQUIRED[fmt]):
            return fmt
    keys = ", ".join(map(repr, rec)) or "none"
    wanted = "; ".join(f"{f} ({' + '.join(REQUIRED[f])})" for f in PREFERENCE_FORMATS)
    raise AgiasiError(
        f"{where}: the record is not a preference pair; its keys are {keys}. Accepted: {wanted}"
    )


def to_pair(rec: dict[str, Any], where: str, fmt: str = "auto") -> dict[str, Any]:
    """One record of any preference shape → ``{prompt, chosen, rejected}`` (message lists)."""
    fmt = preference_format_of(rec, where) if fmt == "auto" else fmt
    missing = [k for k in REQUIRED[fmt] if rec.get(k) is None]
    if missing:
        raise AgiasiError(
            f"{where}: a {fmt} record needs {', '.join(REQUIRED[fmt])}; no {missing[0]!r}"
        )
    if fmt == "preference-implicit":
        pair = _implicit(rec, where)
    elif fmt == "alpaca-preference":
        pair = _alpaca(rec, where)
    elif fmt == "sharegpt-preference":
        pair = _sharegpt(rec, where)
    else:
        pair = _explicit(rec, where)
    if pair["chosen"] == pair["rejected"]:
        raise AgiasiError(
            f"{where}: the chosen and the rejected answer are the same; a pair teaches a "
            "preference only where they differ"
        )
    for side in ("chosen", "rejected"):
        if not any(m["role"] == "assistant" for m in pair[side]):
            raise AgiasiError(f"{where}: the {side} answer has no assistant turn")
    if not pair["prompt"]:
        raise AgiasiError(f"{where}: the pair has no prompt turn")
    return pair


def _answer(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return check_messages(value, where, key)


def _explicit(rec: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = check_messages(prompt, where, "prompt")
    return {
        "prompt": prompt,
        "chosen": _answer(rec["chosen"], where, "chosen"),
        "rejected": _answer(rec["rejected"], where, "rejected"),
    }


def _implicit(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(rec["chosen"], str) or isinstance(rec["rejected"], str):
        raise AgiasiError(
            f"{where}: without a prompt field, chosen and rejected must be whole conversations "
            "(lists of messages) that share their leading turns; strings need a 'prompt'"
        )
    chosen = check_messages(rec["chosen"], where, "chosen")
    rejected = check_messages(rec["rejected"], where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":  # the answers start with the assistant
        n -= 1
    if n == 0:
        raise AgiasiError(
            f"{where}: chosen and rejected share no leading turn, so the prompt is not a prefix "
            "of both; give the prompt as its own field"
        )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _alpaca(rec: dict[str, Any], where: str) -> dict[str, Any]:
    from agiasi.data.formats import _alpaca as alpaca_chat

    prompt = alpaca_chat({**rec, "output": ""}, where)["messages"][:-1]
    return {
        "prompt": prompt,
        "chosen": _answer(_text(rec, "chosen", where), where, "chosen"),
        "rejected": _answer(_text(rec, "rejected", where), where, "rejected"),
    }


def _text(rec: dict[str, Any], key: str, where: str) -> str:
    if not isinstance(rec[key], str):
        raise AgiasiError(f'{where}: "{key}" must be a string, got {type(rec[key]).__name__}')
    return rec[key]


def _sharegpt(rec: dict[str, Any], where: str) -> dict[str, Any]:
    from agiasi.data.formats import _sharegpt as sharegpt_chat

    head = sharegpt_chat(
        {**rec, "conversations": [*rec["conversations"], {"from": "gpt", "value": ""}]}, where
    )["messages"][:-1]

    def turn(value: Any, key: str) -> list[dict[str, str]]:
        if not (isinstance(value, dict) and isinstance(value.get("value"), str)):
            raise AgiasiError(f'{where}: "{key}" must be a turn {{from, value}}')
        role = SHAREGPT_ROLES.get(value.get("from", "gpt"))
        if role != "assistant":
            raise AgiasiError(f'{where}: "{key}" must be an assistant (gpt) turn')
        return [{"role": "assistant", "content": value["value"]}]

    return {
        "prompt": head,
        "chosen": turn(rec["chosen"], "chosen"),
        "rejected": turn(rec["rejected"], "rejected"),
    }


@dataclass
class PairExample:
    """One pair as token ids: the shared prompt, and each answer with its labels (IGNORE on
    the prompt's tokens), ready to be batched as 2·B rows (chosen first, then rejected)."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt_tokens: int  # after truncation
    truncated: bool
    index: int = -1  # place in its list: where a precomputed reference log-prob is kept

    @property
    def n_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


def tokenize_pairs(
    pairs: Iterable[dict[str, Any]], tokenizer, max_length: int, log=None
) -> list[PairExample]:
    """Pairs → :class:`PairExample`; too-long pairs cut prompt first; empty answers dropped."""
    controls = control_texts(tokenizer)
    out: list[PairExample] = []
    dropped: list[str] = []
    cut = 0
    for i, pair in enumerate(pairs):
        where = pair.get(WHERE, f"pair {i + 1}")
        for m in (*pair["prompt"], *pair["chosen"], *pair["rejected"]):
            check_turn_text(m["content"], controls, where)
        prompt = render_chat(tokenizer, pair["prompt"], where, gen=True)
        answers = []
        for side in ("chosen", "rejected"):
            full = render_chat(tokenizer, pair["prompt"] + pair[side], where)
            if full[: len(prompt)] != prompt:
                raise AgiasiError(
                    f"{where}: the chat template renders the prompt differently once the "
                    f"{side} answer follows it, so the answer's tokens cannot be told apart"
                )
            answers.append(full[len(prompt) :])
        longest = max(len(a) for a in answers)
        # at least one prompt token stays: the answer's first token is scored from it
        keep_prompt = max(min(1, len(prompt)), min(len(prompt), max_length - longest))
        p = prompt[len(prompt) - keep_prompt :]
        room = max_length - len(p)
        kept = [a[:room] for a in answers]
        truncated = keep_prompt < len(prompt) or kept != answers
        cut += truncated
        if min(len(a) for a in kept) == 0:
            dropped.append(where)
            continue
        c, r = kept
        out.append(PairExample(p + c, [IGNORE] * len(p) + c, p + r, [IGNORE] * len(p) + r,
                               len(p), truncated, len(out)))  # fmt: skip
    if dropped:
        msg = (
            f"{len(dropped)} pair(s) dropped: no answer token fits --max-length {max_length} "
            f"(the first at {dropped[0]})"
        )
        if not out:
            raise AgiasiError(f"no preference pair left to train: {msg}; raise --max-length")
        if log is not None:
            log(f"warning: {msg}")
    if cut and log is not None:
        log(
            f"note: {cut} pair(s) longer than --max-length {max_length}: the start of their "
            "prompt was cut first, then the end of their answers (as TRL does)"
        )
    return out


def iter_pairs(
    dataset: str, dataset_format: str = "auto", dataset_columns: str | None = None, method="dpo"
) -> Iterator[dict[str, Any]]:
    """Every record of ``dataset`` as a ``{prompt, chosen, rejected}`` pair (with where it came
    from); anything that is not a pair is one clear line."""
    from agiasi.data.load import split_sources

    if dataset_format not in ("auto", *PREFERENCE_FORMATS):
        raise AgiasiError(
            f"--method {method} trains on preference pairs, but --dataset-format is "
            f"{dataset_format!r}; use auto or one of {', '.join(PREFERENCE_FORMATS)}"
        )
    columns = parse_columns(dataset_columns)
    for source in split_sources(str(dataset)):
        for row in read_rows(source):
            rec = _renamed(row.record, columns, row.where)
            if "text" in rec and "chosen" not in rec:
                raise AgiasiError(
                    f"{row.where}: --method {method} trains on preference pairs (a prompt, a "
                    "chosen and a rejected answer), but this is plain text; train on text with "
                    "--method sft, or give pairs (see agiasi data)"
                )
            fmt = (
                preference_format_of(rec, row.where) if dataset_format == "auto" else dataset_format
            )
            yield {**to_pair(rec, row.where, fmt), WHERE: row.where}


def load_pairs(
    dataset: str,
    tokenizer,
    max_length: int,
    *,
    dataset_format: str = "auto",
    dataset_columns: str | None = None,
    eval_dataset: str | None = None,
    eval_split: float = 0.0,
    seed: int = 42,
    method: str = "dpo",
    say=None,
):
    """Training and validation pairs as :class:`PairExample` s (in a :class:`Data`); the split
    holds out whole pairs by the same seeded rule as supervised data."""
    from agiasi.data.load import Data, split_eval

    def read(source: str) -> list[dict[str, Any]]:
        pairs = list(iter_pairs(source, dataset_format, dataset_columns, method))
        if not pairs:
            raise AgiasiError(f"{source}: the dataset is empty: no preference pair found")
        return pairs

    train = read(dataset)
    held: list[dict[str, Any]] = []
    if eval_split:
        if eval_dataset:
            raise AgiasiError("pass either --eval-dataset or --eval-split, not both")
        train, held = split_eval(train, eval_split, seed)
    elif eval_dataset:
        held = read(eval_dataset)
    data = Data(tokenize_pairs(train, tokenizer, max_length, log=say))
    data.n_train_docs, data.n_eval_docs = len(train), len(held)
    if held:
        data.eval = tokenize_pairs(held, tokenizer, max_length, log=say)
    return data
