"""``preview(config)``: what ``agiasi data`` prints — what training will see, before GPU hours.

Per source: the file kind and the detected (or given) format; then the examples and tokens,
how many chat examples ``--max-length`` would cut, the role counts, and one example rendered
through the chat template with the trained spans marked ⟦like this⟧. Only the first
``--sample`` records of each source are read, so a 1 GB file is sampled, not loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from agiasi.data.files import read_rows, source_kind
from agiasi.data.formats import convert, parse_columns
from agiasi.data.load import split_sources
from agiasi.data.tokenize import (
    CONTINUES,
    IGNORE,
    WHERE,
    check_turn_text,
    text_ids,
    tokenize_records,
)
from agiasi.errors import AgiasiError
from agiasi.options import option
from agiasi.shipped import tiny_model_path

OPEN, CLOSE = "⟦", "⟧"


@dataclass
class DataConfig:
    """Flags of ``agiasi data``."""

    dataset: str = option(help="what --dataset of `agiasi train` would get (commas for several)")
    base_model: str | None = option(
        None, "whose tokenizer and chat template to use (default: the shipped tiny model)"
    )
    dataset_format: str = option("auto", "as for `agiasi train`")
    dataset_columns: str | None = option(None, "as for `agiasi train`")
    max_length: int = option(512, "the training --max-length, to count what it would cut", ge=2)
    sample: int = option(1000, "records read per source (the rest is not read)", ge=1)
    trust_remote_code: bool = option(False, "allow a tokenizer that runs its own code")
    json: bool = option(False, "print JSON")


def preview_data(cfg: DataConfig, out=print) -> None:
    """What ``agiasi data`` prints for ``cfg``: the summary as text, or as JSON."""
    import json

    from agiasi.options import check

    check(cfg)
    s = summarize(cfg)
    out(json.dumps(s, ensure_ascii=False, indent=2) if cfg.json else format_summary(s))


def _tokenizer(cfg: DataConfig):
    from transformers import AutoTokenizer

    base = cfg.base_model or str(tiny_model_path())
    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code), base
    except (OSError, ValueError) as e:
        raise AgiasiError(
            f"could not load the tokenizer of {base!r}: {str(e).splitlines()[0]}"
        ) from None


def marked(ids: list[int], labels: list[int], tokenizer) -> str:
    """The example's text with every trained span between ⟦ and ⟧."""
    out, span, trained = [], [], None
    for t, y in zip(ids, labels, strict=True):
        now = y != IGNORE
        if trained is not None and now != trained:
            text = tokenizer.decode(span)
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
            span = []
        trained = now
        span.append(t)
    if span:
        text = tokenizer.decode(span)
        out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(out)


# Characters of plain text read per source: ``--sample`` counts records, and a text file's
# record is a document of up to a megabyte, so 1000 of them could be a gigabyte of text (the
# preview once held every token of a big file, ~13 bytes of RAM per byte of text).
SAMPLE_TEXT_CHARS = 4 << 20


def _sample(rows, n: int) -> tuple[list, bool]:
    """The first ``n`` rows, and no more than ``SAMPLE_TEXT_CHARS`` of plain text; whether the
    source had more."""
    out, chars = [], 0
    for row in rows:
        if len(out) >= n or chars >= SAMPLE_TEXT_CHARS:
            return out, True
        text = row.record.get("text")
        if isinstance(text, str):
            chars += len(text)
        out.append(row)
    return out, False


def summarize(cfg: DataConfig) -> dict[str, Any]:
    """The figures ``agiasi data`` prints, as a dict (``--json`` shape; plain ints and strings)."""
    tok, base = _tokenizer(cfg)
    columns = parse_columns(cfg.dataset_columns)
    sources = []
    notes: list[str] = []
    for source in split_sources(cfg.dataset):
        kind = source_kind(source)
        rows, sampled = _sample(read_rows(source), cfg.sample)
        if _is_preference(rows, cfg, columns):
            sources.append(_pairs_summary(source, kind, rows, sampled, cfg, columns, tok, notes))
            continue
        records, formats = [], []
        for _, file_rows in groupby(rows, key=lambda r: r.where.rsplit(": ", 1)[0]):
            said: list[str] = []
            for row in convert(file_rows, cfg.dataset_format, columns, said.append):
                records.append({**row.record, WHERE: row.where})
            formats.append(said[0].split("format ", 1)[1] if said else cfg.dataset_format)
        if not records:
            raise AgiasiError(f"{source}: the dataset is empty: no documents or records found")
        chat = [r for r in records if "messages" in r]
        roles = Counter(m["role"] for r in chat for m in r["messages"])
        examples = tokenize_records(chat, tok, 10**9, log=notes.append) if chat else []
        lengths = [len(e.input_ids) for e in examples]
        text_tokens = _count_text_tokens([r for r in records if "messages" not in r], tok)
        cut = sum(n > cfg.max_length for n in lengths)
        first_text = next((r["text"] for r in records if "messages" not in r), None)
        sources.append(
            {
                "source": source,
                "kind": kind,
                "formats": sorted(set(formats)),
                "records": len(records),
                "sampled": sampled,
                "chat_examples": len(chat),
                "tokens": sum(lengths) + text_tokens,
                "trained_tokens": sum(sum(y != IGNORE for y in e.labels[1:]) for e in examples)
                + text_tokens,
                "truncated": cut,
                "longest": max(lengths, default=text_tokens),
                "roles": dict(roles),
                "example": marked(examples[0].input_ids, examples[0].labels, tok) if chat else None,
                "text_example": None if chat or first_text is None else first_text[:300],
            }
        )
    return {"base_model": base, "max_length": cfg.max_length, "sources": sources, "notes": notes}


def _count_text_tokens(records: list[dict[str, Any]], tok) -> int:
    """Tokens training makes of these documents (each followed by EOS), counted one document at
    a time: nothing but the count is kept."""
    total = 0
    for r in records:
        check_turn_text(r["text"], [], r.get(WHERE, "a record"))
        n = len(text_ids(r["text"], tok))
        total += n + (1 if n and not r.get(CONTINUES) else 0)
    return total


def _is_preference(rows, cfg: DataConfig, columns: dict[str, str]) -> bool:
    """Preference pairs: a forced preference format, or records with chosen and rejected."""
    from agiasi.data.preference import PREFERENCE_FORMATS

    if cfg.dataset_format in PREFERENCE_FORMATS:
        return True
    if cfg.dataset_format != "auto" or not rows:
        return False
    first = {columns.get(k, k): v for k, v in rows[0].record.items()}
    return first.get("chosen") is not None and first.get("rejected") is not None


def _pairs_summary(source, kind, rows, sampled, cfg, columns, tok, notes) -> dict[str, Any]:
    """What training on preference pairs will see: the pairs, their tokens, how many
    ``--max-length`` cuts (prompt first), and the first pair with both answers marked."""
    from agiasi.data.formats import _renamed
    from agiasi.data.preference import preference_format_of, to_pair, tokenize_pairs

    fmt = cfg.dataset_format
    pairs, formats = [], set()
    for row in rows:
        rec = _renamed(row.record, columns, row.where)
        shape = preference_format_of(rec, row.where) if fmt == "auto" else fmt
        formats.add(f"{shape} (detected)" if fmt == "auto" else shape)
        pairs.append({**to_pair(rec, row.where, shape), WHERE: row.where})
    full = tokenize_pairs(pairs, tok, 10**9, log=notes.append)
    first = full[0]
    return {
        "source": source,
        "kind": kind,
        "formats": sorted(formats),
        "records": len(pairs),
        "sampled": sampled,
        "pairs": len(pairs),
        "chat_examples": 0,
        "tokens": sum(len(e.chosen_ids) + len(e.rejected_ids) for e in full),
        # a pair is cut exactly when a side is longer than --max-length (prompt first)
        "truncated": sum(
            max(len(e.chosen_ids), len(e.rejected_ids)) > cfg.max_length for e in full
        ),
        "longest": max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in full),
        "roles": {},
        "example": None,
        "text_example": None,
        "example_chosen": marked(first.chosen_ids, first.chosen_labels, tok),
        "example_rejected": marked(first.rejected_ids, first.rejected_labels, tok),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"tokenizer: {s['base_model']}"]
    for src in s["sources"]:
        sample = f" (first {src['records']} records: sampled)" if src["sampled"] else ""
        lines += [
            "",
            f"{src['source']}",
            f"  kind     {src['kind']}; format {', '.join(src['formats'])}",
            f"  records  {src['records']:,}{sample}",
        ]
        if src.get("pairs"):
            lines += [
                f"  tokens   {src['tokens']:,} (both answers), longest pair side {src['longest']:,}",
                f"  --max-length {s['max_length']}: {src['truncated']:,} of {src['pairs']:,} pairs "
                "would be cut (the start of the prompt first, then the answers' ends)",
                "",
                f"  first pair, trained spans between {OPEN} and {CLOSE}:",
                "",
                "  chosen:",
                *["    " + x for x in src["example_chosen"].splitlines()],
                "  rejected:",
                *["    " + x for x in src["example_rejected"].splitlines()],
            ]
            continue
        if src["chat_examples"]:
            lines.append(
                f"  tokens   {src['tokens']:,} ({src['trained_tokens']:,} trained), "
                f"longest conversation {src['longest']:,}"
            )
        else:
            lines.append(f"  tokens   {src['tokens']:,} (every one trained)")
        if src["chat_examples"]:
            lines.append(
                f"  --max-length {s['max_length']}: {src['truncated']:,} of "
                f"{src['chat_examples']:,} conversations would be cut"
            )
            lines.append(
                "  roles    " + ", ".join(f"{r} {n:,}" for r, n in sorted(src["roles"].items()))
            )
            lines += ["", f"  first example, trained spans between {OPEN} and {CLOSE}:", ""]
            lines += ["    " + x for x in src["example"].splitlines()]
        else:
            blocks = -(-src["tokens"] // s["max_length"])
            lines.append(
                f"  --max-length {s['max_length']}: packed into {blocks:,} blocks (every token trained)"
            )
            lines += ["", "  first document:", "    " + src["text_example"].replace("\n", "\n    ")]
    lines += [f"note: {n}" for n in s["notes"]]
    return "\n".join(lines)
