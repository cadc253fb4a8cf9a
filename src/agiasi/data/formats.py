"""Record formats → the two shapes training knows: ``{"text"}`` and ``{"messages"}``.

Formats (``--dataset-format``), by the keys that identify them:

* ``text``               ``text``: plain text, packed into blocks, every token a target.
* ``messages``           ``messages: [{role, content}]`` (OpenAI / TRL conversational).
* ``alpaca``             ``instruction``, ``output`` (+ ``input``, ``system``, ``history``).
* ``sharegpt``           ``conversations: [{from, value}]`` (+ ``system``).
* ``prompt-completion``  ``prompt``, ``completion`` (strings, or lists of messages as TRL's
  conversational form).

Everything that is not ``text`` becomes chat turns rendered with the model's own chat template,
loss on the assistant turns only: a user fine-tunes the model they will then *chat* with, so the
data must look like its conversations. The conventions follow LLaMA-Factory's converters (the
tool most Japanese fine-tunes are made with), so a dataset moved between the two trains the same:

* Alpaca: ``system`` → a system turn; each ``history`` pair ``[q, a]`` → a user and an assistant
  turn; then user = ``instruction`` + ``"\\n"`` + ``input`` (``instruction`` alone when ``input``
  is empty), assistant = ``output``. Alpaca's English preamble ("Below is an instruction …") is
  not added: the chat template already says who speaks.
* ShareGPT: ``human``/``user`` → user, ``gpt``/``assistant`` → assistant, ``system`` → system;
  any other ``from`` (``observation``, ``function_call``, …) is an error, as an unknown role in
  ``messages`` is.
* prompt/completion: strings → one user turn and one assistant turn.

``auto`` picks the format of each file from its first records and says what it chose; a record
that fits two formats (``text`` *and* ``instruction``/``output``) or none is an error naming the
file and line, the keys found and the formats accepted. ``--dataset-columns`` renames columns
(``instruction=question,output=answer``: the format's field = the file's column).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from agiasi.data.files import Row
from agiasi.errors import AgiasiError

FORMATS = ("text", "messages", "alpaca", "sharegpt", "prompt-completion")
# The keys whose presence says "this record is in that format".
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "alpaca": ("input", "system", "history"),
    "sharegpt": ("system",),
}
FIELDS = tuple(dict.fromkeys(k for f in FORMATS for k in REQUIRED[f] + OPTIONAL.get(f, ())))
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SNIFF_RECORDS = 64  # records of a file that decide its format under ``auto``


def parse_columns(spec: str | None) -> dict[str, str]:
    """``"instruction=question,output=answer"`` → ``{"instruction": "question", …}``."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        field, sep, column = part.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise AgiasiError(
                f"--dataset-columns: {part.strip()!r} is not FIELD=COLUMN "
                "(e.g. instruction=question,output=answer)"
            )
        if field not in FIELDS:
            raise AgiasiError(
                f"--dataset-columns: {field!r} is not a field of any format; fields are "
                + ", ".join(FIELDS)
            )
        mapping[field] = column
    return mapping


def _renamed(rec: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    if not columns:
        return rec
    missing = [c for c in columns.values() if c not in rec]
    if missing:
        raise AgiasiError(
            f"{where}: --dataset-columns names column {missing[0]!r}, which this record does "
            f"not have; its columns are {', '.join(map(repr, rec)) or 'none'}"
        )
    out = {k: v for k, v in rec.items() if k not in columns.values() or k in columns}
    for field, column in columns.items():
        out[field] = rec[column]
    return out


def formats_of(rec: dict[str, Any]) -> list[str]:
    """Every format whose identifying keys the record has."""
    return [f for f in FORMATS if all(rec.get(k) is not None for k in REQUIRED[f])]


def _fits_none(rec: dict[str, Any], where: str) -> AgiasiError:
    keys = ", ".join(map(repr, rec)) or "none"
    wanted = "; ".join(f"{f} ({' + '.join(REQUIRED[f])})" for f in FORMATS)
    return AgiasiError(
        f"{where}: the record fits no dataset format; its keys are {keys}. Accepted: {wanted}. "
        "Rename columns with --dataset-columns FIELD=COLUMN"
    )


def detect(rows: list[Row]) -> str:
    """The format of a file from its first records (``auto``)."""
    seen: dict[str, str] = {}  # format → where it was first seen
    for row in rows:
        fits = formats_of(row.record)
        if not fits:
            raise _fits_none(row.record, row.where)
        if len(fits) > 1:
            raise AgiasiError(
                f"{row.where}: the record fits {' and '.join(fits)} (keys "
                f"{', '.join(map(repr, row.record))}); say which with --dataset-format"
            )
        seen.setdefault(fits[0], row.where)
    if len(seen) > 1:
        firsts = "; ".join(f"{f} first at {w}" for f, w in seen.items())
        raise AgiasiError(f"the dataset mixes formats ({firsts}); use one format per file")
    if not seen:
        raise AgiasiError("the dataset is empty: no documents or records found")
    return next(iter(seen))


def convert(
    rows: Iterable[Row], fmt: str = "auto", columns: dict[str, str] | None = None, say=None
) -> Iterator[Row]:
    """Rows of one file → rows holding ``{"text"}`` or ``{"messages"}`` (checked)."""
    columns = columns or {}
    it = iter(rows)
    head: list[Row] = []
    for row in it:
        head.append(Row(row.where, _renamed(row.record, columns, row.where)))
        if len(head) >= SNIFF_RECORDS:
            break
    if not head:
        return
    chosen = detect(head) if fmt == "auto" else fmt
    if fmt == "auto" and say is not None:
        say(f"data: {head[0].where.rsplit(':', 1)[0]}: format {chosen} (detected)")

    def rest() -> Iterator[Row]:
        yield from head
        for row in it:
            yield Row(row.where, _renamed(row.record, columns, row.where))

    for row in rest():
        rec = row.record
        if not all(rec.get(k) is not None for k in REQUIRED[chosen]):
            fits = formats_of(rec)
            if fmt != "auto":
                raise AgiasiError(
                    f"{row.where}: the record is not {chosen} (needs "
                    f"{' + '.join(REQUIRED[chosen])}); its keys are "
                    f"{', '.join(map(repr, rec)) or 'none'}"
                )
            if fits:
                raise AgiasiError(
                    f"the dataset mixes formats: {row.where} is {fits[0]}, the records before "
                    f"it {chosen} (first at {head[0].where}); use one format per file"
                )
            raise _fits_none(rec, row.where)
        yield Row(row.where, _CONVERTERS[chosen](rec, row.where))


# --------------------------------------------------------------------------- one format each


def _string(rec: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise AgiasiError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    return value


def check_messages(msgs: Any, where: str, key: str = "messages") -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    ):
        raise AgiasiError(f'{where}: "{key}" must be a list of {{role, content}} strings')
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _chat(msgs: list[dict[str, str]], where: str, key: str = "messages") -> dict[str, Any]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise AgiasiError(f'{where}: "{key}" has no assistant turn (nothing to learn)')
    return {"messages": msgs}


def _text(rec: dict[str, Any], where: str) -> dict[str, Any]:
    out = {"text": _string(rec, "text", where)}
    if rec.get("_continues"):  # a piece of a long document (agiasi.data.files)
        out["_continues"] = True
    return out


def _messages(rec: dict[str, Any], where: str) -> dict[str, Any]:
    return _chat(check_messages(rec["messages"], where), where)


def _alpaca(rec: dict[str, Any], where: str) -> dict[str, Any]:
    msgs: list[dict[str, str]] = []
    system = _string(rec, "system", where, optional=True)
    if system:
        msgs.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
        for p in history
    ):
        raise AgiasiError(f'{where}: "history" must be a list of [question, answer] strings')
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    instruction = _string(rec, "instruction", where)
    extra = _string(rec, "input", where, optional=True)
    user = f"{instruction}\n{extra}" if extra else instruction
    msgs += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(rec, "output", where)},
    ]
    return _chat(msgs, where, "output")


def _sharegpt(rec: dict[str, Any], where: str) -> dict[str, Any]:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
        for t in turns
    ):
        raise AgiasiError(f'{where}: "conversations" must be a list of {{from, value}} strings')
    msgs: list[dict[str, str]] = []
    system = _string(rec, "system", where, optional=True)
    if system:
        msgs.append({"role": "system", "content": system})
    for t in turns:
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise AgiasiError(
                f"{where}: ShareGPT role {t['from']!r} is not one agiasi maps; use one of "
                + ", ".join(SHAREGPT_ROLES)
            )
        msgs.append({"role": role, "content": t["value"]})
    return _chat(msgs, where, "conversations")


def _prompt_completion(rec: dict[str, Any], where: str) -> dict[str, Any]:
    prompt, completion = rec["prompt"], rec["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational form
        msgs = check_messages(prompt, where, "prompt") + check_messages(
            completion, where, "completion"
        )
        return _chat(msgs, where, "completion")
    msgs = [
        {"role": "user", "content": _string(rec, "prompt", where)},
        {"role": "assistant", "content": _string(rec, "completion", where)},
    ]
    return _chat(msgs, where, "completion")


_CONVERTERS = {
    "text": _text,
    "messages": _messages,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "prompt-completion": _prompt_completion,
}
