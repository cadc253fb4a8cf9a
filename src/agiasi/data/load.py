"""``load_data(...)``: ``--dataset`` strings → training and validation examples.

sources (files.py) → rows → records in one of two shapes (formats.py) → held-out documents split
off by seed → tokens (tokenize.py) → packed rows (batching.py, ``--packing``).

The validation split is drawn from *documents* (a text block between blank lines, a conversation,
an Alpaca record) before anything is tokenized or packed, so no held-out text ever shares a
block with training text; it is a seeded permutation, the same for the same seed on every machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from agiasi.data.batching import pack
from agiasi.data.files import read_rows
from agiasi.data.formats import FORMATS, convert, parse_columns
from agiasi.data.tokenize import WHERE, Example, tokenize_records
from agiasi.errors import AgiasiError


def split_sources(dataset: str) -> list[str]:
    """``a.jsonl,b.parquet`` → two sources (a path that itself holds a comma stays whole)."""
    if Path(dataset).expanduser().exists():
        return [dataset]
    parts = [p.strip() for p in dataset.split(",")]
    if any(not p for p in parts):
        raise AgiasiError(f"--dataset {dataset!r} has an empty entry between commas")
    return parts


def load_records(
    dataset: str | Path, dataset_format: str = "auto", dataset_columns: str | None = None, say=None
) -> list[dict[str, Any]]:
    """Every source of ``dataset`` → ``{"text"}`` / ``{"messages"}`` records (with where each
    came from), formats detected per file unless given."""
    records = list(iter_records(dataset, dataset_format, dataset_columns, say))
    if not records:
        raise AgiasiError("the dataset is empty: no documents or records found")
    return records


def iter_records(
    dataset: str | Path, dataset_format: str = "auto", dataset_columns: str | None = None, say=None
) -> Iterator[dict[str, Any]]:
    """:func:`load_records` as a stream: what training reads when nothing is held out, so a
    large text file is never in memory as text."""
    if dataset_format != "auto" and dataset_format not in FORMATS:
        raise AgiasiError(
            f"--dataset-format {dataset_format!r} is not one of auto, {', '.join(FORMATS)}"
        )
    columns = parse_columns(dataset_columns)
    for source in split_sources(str(dataset)):
        # one file at a time: each file's format is its own
        for _, rows in groupby(read_rows(source), key=lambda r: r.where.rsplit(": ", 1)[0]):
            for row in convert(rows, dataset_format, columns, say):
                yield {**row.record, WHERE: row.where}


def split_eval(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held out): ``round(fraction · n)`` documents chosen by a seeded permutation, both
    sides kept in file order."""
    # the pieces of one long document share its place: they go to the same side
    doc_of, docs = [], {}
    for i, r in enumerate(records):
        key = r.get(WHERE, i) if "text" in r else i
        doc_of.append(docs.setdefault(key, len(docs)))
    n = len(docs)
    k = round(fraction * n)
    if k < 1 or k >= n:
        side = "validation" if k < 1 else "training"
        raise AgiasiError(
            f"--eval-split {fraction:g} of {n} document(s) leaves no {side} document; "
            "use another fraction or pass --eval-dataset"
        )
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    held = set(torch.randperm(n, generator=g)[:k].tolist())
    train = [r for r, d in zip(records, doc_of, strict=True) if d not in held]
    return train, [r for r, d in zip(records, doc_of, strict=True) if d in held]


class _Counted:
    """An iterator that counts what passed through it."""

    def __init__(self, it: Iterator[dict[str, Any]]):
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for x in self.it:
            self.n += 1
            yield x


def cap_tokens(examples: list[Example], max_tokens: int | None) -> list[Example]:
    """The first examples up to ``max_tokens`` tokens (the last one cut to fit)."""
    if not max_tokens:
        return examples
    kept, total = [], 0
    for ex in examples:
        room = max_tokens - total
        if room < 2:
            break
        if len(ex.input_ids) > room:
            ex = Example(ex.input_ids[:room], ex.labels[:room])
        kept.append(ex)
        total += len(ex.input_ids)
    return kept


@dataclass
class Data:
    """Training and validation rows: :class:`Example` s, or :class:`PairExample` s for the
    preference objectives (:func:`agiasi.data.preference.load_pairs`)."""

    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    n_train_docs: int = 0
    n_eval_docs: int = 0
    packed_from: int = 0  # examples before packing (0: not packed)

    @property
    def train_tokens(self) -> int:
        return sum(e.n_tokens for e in self.train)

    @property
    def eval_tokens(self) -> int:
        return sum(e.n_tokens for e in self.eval)


def load_data(
    dataset: str,
    tokenizer,
    max_length: int,
    *,
    dataset_format: str = "auto",
    dataset_columns: str | None = None,
    eval_dataset: str | None = None,
    eval_split: float = 0.0,
    eval_max_tokens: int | None = None,
    seed: int = 42,
    packing: bool = False,
    say=None,
) -> Data:
    """Training examples (packed with ``packing``) and validation examples (never packed)."""
    held: list[dict[str, Any]] = []
    records: Iterable[dict[str, Any]]
    if eval_split:  # the split needs every document's place: read them all first
        if eval_dataset:
            raise AgiasiError("pass either --eval-dataset or --eval-split, not both")
        records, held = split_eval(
            load_records(dataset, dataset_format, dataset_columns, say), eval_split, seed
        )
        n_docs = len(records)
    else:
        counted = _Counted(iter_records(dataset, dataset_format, dataset_columns, say))
        records, n_docs = counted, 0
        if eval_dataset:
            held = load_records(eval_dataset, dataset_format, dataset_columns, say)
    train = tokenize_records(records, tokenizer, max_length, log=say)
    if not eval_split:
        n_docs = counted.n
    evals = (
        cap_tokens(tokenize_records(held, tokenizer, max_length), eval_max_tokens) if held else []
    )
    data = Data(train, evals, n_docs, len(held))
    if packing:
        data.packed_from = len(train)
        data.train = pack(train, max_length)
    return data
