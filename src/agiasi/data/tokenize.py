"""Records → token examples: text packed into blocks, chat rendered with the model's template.

Chat records are rendered with the tokenizer's own chat template, loss only on the assistant
turns; text documents are tokenized, joined with EOS and cut into ``max_length`` blocks (the
usual causal-LM packing; every token is a target).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agiasi.errors import AgiasiError
from agiasi.templates import bounded, render_ids

IGNORE = -100
WHERE = "_where"  # "FILE: line N" of a record, for errors found while tokenizing
CONTINUES = "_continues"  # a text record whose document goes on in the next record


@dataclass
class Example:
    """One training row: lists for chat examples, int32 arrays for text blocks (whose labels are
    the same array). ``position_ids`` is set only for packed rows, where it restarts at 0 at
    each example's first token: that is how attention is kept inside each example."""

    input_ids: list[int] | np.ndarray
    labels: list[int] | np.ndarray
    position_ids: list[int] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def tokenize_records(
    records: Iterable[dict[str, Any]], tokenizer, max_length: int, log=None
) -> list[Example]:
    """Records (a list or a stream) → examples of at most ``max_length`` tokens.

    Text is cut into blocks as it streams, stored as int32 arrays (a block's labels are its
    ids, the same array): a 1 GB text file costs its tokens, not Python lists of them. A record
    marked ``CONTINUES`` is the first part of a document too long to read at once, so no EOS
    follows it.

    Chat records are checked against the tokenizer's own template first: a turn whose role the
    template does not render (``"User"``, ``"hacker"``) would silently vanish and leave the
    answer to train without its question, so it is an error naming the line.
    """
    if max_length < 2:
        raise AgiasiError(
            f"--max-length must be at least 2 (one token to predict), got {max_length}"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AgiasiError("the tokenizer has no EOS token; cannot separate documents")
    carry: list[int] = []
    examples: list[Example] = []
    roles = _RoleCheck(tokenizer)
    controls = control_texts(tokenizer)
    empty_answers: list[str] = []
    dropped: list[str] = []
    seen = 0
    for i, rec in enumerate(records):
        seen += 1
        if "messages" in rec:
            where = rec.get(WHERE, f"record {i + 1}")
            if _check_chat(rec["messages"], roles, controls, where):
                empty_answers.append(where)
            ex = _chat_example(rec["messages"], tokenizer, max_length, where)
            if any(t != IGNORE for t in ex.labels[1:]):
                examples.append(ex)
            else:  # every answer starts past --max-length: nothing of it could be trained
                dropped.append(where)
            continue
        check_turn_text(rec["text"], [], rec.get(WHERE, f"record {i + 1}"))  # valid Unicode
        ids = text_ids(rec["text"], tokenizer)
        carry.extend(ids)
        if ids and not rec.get(CONTINUES):
            carry.append(eos)
        blocks, carry = _full_blocks(carry, max_length)
        examples += blocks
    if len(carry) >= 2:
        block = np.asarray(carry, dtype=np.int32)
        examples.append(Example(block, block))
    if not seen:
        raise AgiasiError("the dataset is empty: no documents or records found")
    if empty_answers and log is not None:
        more = f" and {len(empty_answers) - 1} more" if len(empty_answers) > 1 else ""
        log(
            f"warning: empty assistant turn at {empty_answers[0]}{more}: the model learns to "
            "answer with nothing there"
        )
    cause = (
        f"{len(dropped)} conversation(s) dropped because their answer starts past --max-length "
        f"{max_length} (the first at {dropped[0]}): nothing of it would be trained"
        if dropped
        else ""
    )
    if not examples:
        if dropped:
            raise AgiasiError(f"no conversation left to train: all {cause}; raise --max-length")
        raise AgiasiError("the dataset has no trainable text: it tokenizes to fewer than 2 tokens")
    if dropped and log is not None:
        log(f"warning: {cause}")
    return examples


def _full_blocks(carry: list[int], max_length: int) -> tuple[list[Example], list[int]]:
    """The whole ``max_length`` blocks of ``carry`` as int32 examples (labels = ids, the same
    array), and what is left over for the next record."""
    full = len(carry) // max_length * max_length
    if not full:
        return [], carry
    chunk = np.asarray(carry[:full], dtype=np.int32)
    blocks = [chunk[s : s + max_length] for s in range(0, full, max_length)]
    return [Example(b, b) for b in blocks], carry[full:]


def _check_chat(messages, roles: _RoleCheck, controls, where: str) -> bool:
    """Every role one the template renders and no control token inside a turn's text; True
    when an assistant turn is empty (a warning, not an error)."""
    empty = False
    for m in messages:
        roles.check(m["role"], where)
        empty = empty or (m["role"] == "assistant" and not m["content"].strip())
    for m in messages:
        check_turn_text(m["content"], controls, where)
    return empty


# Characters tokenized in one call. A sentencepiece-style BPE sees Japanese text without spaces
# as one long word, and its memory grows with the word: 1 M characters took ~400 MB, a 10 MB
# record ~800 MB. Longer text is cut at a line end (else anywhere) and tokenized slice by slice.
TOKENIZE_CHARS = 1 << 16


def text_ids(text: str, tokenizer) -> list[int]:
    """Plain text's ids, control-token text included as plain text (``split_special_tokens``):
    "<|user|>" typed into a document must not become a turn marker."""
    if len(text) <= TOKENIZE_CHARS:
        return _plain(text, tokenizer)
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + TOKENIZE_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start + TOKENIZE_CHARS // 2, end)
            end = cut + 1 if cut >= 0 else end
        ids += _plain(text[start:end], tokenizer)
        start = end
    return ids


def _plain(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)[
        "input_ids"
    ]


def control_texts(tokenizer) -> list[str]:
    """The strings the tokenizer turns into control tokens (its special and added-special
    tokens), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(added.content)
    return sorted((t for t in found if t), key=len, reverse=True)


def check_turn_text(text: str, controls: list[str], where: str) -> None:
    """What goes into a chat template from a user or a dataset: valid Unicode, and no control
    token's text (the template's output is tokenized whole, so "<|assistant|>" inside a turn
    would forge a turn of its own)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AgiasiError(
            f"{where}: the text holds an unpaired surrogate ({text[e.start]!r} at character "
            f"{e.start}); it is not valid Unicode"
        ) from None
    for c in controls:
        if c in text:
            raise AgiasiError(
                f"{where}: the text holds {c!r}, a control token of this tokenizer; inside a chat "
                "turn it would read as a turn marker (a forged role). Remove it from the text"
            )


def render_chat(
    tokenizer, messages: list[dict[str, str]], where: str, gen: bool = False
) -> list[int]:
    """The tokenizer's chat template on ``messages`` → ids, the render within its time and
    memory budget (:mod:`agiasi.templates`) and the tokenizing outside it."""
    return render_ids(tokenizer, messages, where, gen)


class _RoleCheck:
    """Which roles the tokenizer's chat template renders (asked once per role)."""

    _PROBE = "agiasi-role-probe-7f3a"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[str, bool] = {}
        self.failure: str | None = None  # the template's own error on the last failed probe

    STANDARD = ("system", "user", "assistant")

    def check(self, role: str, where: str) -> None:
        if role not in self.known:
            self.known[role] = self._renders(role)
        seen = sorted(r for r, ok in self.known.items() if ok and self._named(r))
        if not self.known[role] and role in ("user", "assistant") and self.failure:
            # the template fails on the plainest conversation: that is its error, not the role's
            raise AgiasiError(
                f"{where}: the chat template fails on a plain {role!r} turn: {self.failure}; the "
                "template itself is broken (fix or replace the model's chat template)"
            )
        if not self.known[role]:
            raise AgiasiError(
                f"{where}: role {role!r} is not one this tokenizer's chat template knows (it "
                f"would be dropped silently); use one of {', '.join(seen or ['user', 'assistant'])}"
            )
        if not self._named(role):
            raise AgiasiError(
                f"{where}: role {role!r} is not a role this chat template knows: it would only be "
                "written as plain text (e.g. <|" + role + "|>), a marker the model never saw in "
                f"training; use one of {', '.join(sorted({*self.STANDARD, *seen}))}"
            )

    def _named(self, role: str) -> bool:
        """A standard role, or one the template's own source names (``'tool'``, ``"ipython"``):
        templates that print any role verbatim would otherwise accept anything."""
        src = self.tokenizer.chat_template or ""
        src = src if isinstance(src, str) else str(src)
        return role in self.STANDARD or f"'{role}'" in src or f'"{role}"' in src

    def _renders(self, role: str) -> bool:
        """Rendered alone, or after a user turn (templates that insist on alternating roles,
        as Mistral's and Llama-2's do, refuse a conversation that opens with the assistant)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return True  # _chat_example says what is missing
        probe = {"role": role, "content": self._PROBE}
        for conversation in ([probe], [{"role": "user", "content": "x"}, probe]):
            try:
                text = bounded(
                    lambda c=conversation: self.tokenizer.apply_chat_template(c, tokenize=False),
                    "the role check",
                )
            except AgiasiError:
                raise
            except Exception as e:  # templates that raise_exception() on a role or an order
                self.failure = (
                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                )
                continue
            if self._PROBE in text:
                return True
        return False


def _chat_example(
    messages: list[dict[str, str]], tokenizer, max_length: int, where: str = "a record"
) -> Example:
    """Render with the tokenizer's chat template; labels only on assistant tokens.

    Assistant spans come from rendering growing prefixes: tokens between the prompt for turn i
    (``add_generation_prompt=True``) and the conversation up to turn i are that turn's answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise AgiasiError(
            'chat "messages" need a tokenizer with a chat template; this one has none'
        )

    def render(msgs, gen=False) -> list[int]:
        return render_chat(tokenizer, msgs, where, gen)

    ids = render(messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], gen=True))
        upto = render(messages[: i + 1])
        end = 0  # common prefix with the whole conversation (templates may close with EOS)
        while end < min(len(upto), len(ids)) and upto[end] == ids[end]:
            end += 1
        for j in range(start, end):
            labels[j] = ids[j]
    ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)
