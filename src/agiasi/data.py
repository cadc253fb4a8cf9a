"""Datasets → token examples → batches.

Accepted inputs (``--dataset``):

* ``.txt`` file, or a folder of ``.txt`` files: one paragraph a line, a blank line between
  documents. Documents are tokenized, joined with EOS and packed into ``max_length`` blocks
  (the usual causal-LM packing; every token is a training target).
* ``.jsonl``: one JSON object a line, either ``{"text": …}`` (packed like text) or
  ``{"messages": [{"role", "content"}, …]}`` rendered with the tokenizer's own chat template,
  loss only on the assistant turns, one conversation per example (truncated to ``max_length``).
* a local Hugging Face dataset folder (``datasets.save_to_disk``) with a ``text`` or
  ``messages`` column.

The order is a seeded permutation per epoch, so a data position (micro-batches seen) is all a
resume needs, and ranks of a distributed run take disjoint slices of every global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from agiasi.errors import AgiasiError

IGNORE = -100
WHERE = "_where"  # "FILE: line N" of a record, for errors found while tokenizing


def default_dataset() -> Path:
    """The Japanese sample shipped in the package (see assets/NOTICE)."""
    return Path(str(resources.files("agiasi") / "assets" / "data" / "sample_ja.txt"))


def default_heldout() -> Path:
    return Path(str(resources.files("agiasi") / "assets" / "data" / "heldout_ja.txt"))


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise AgiasiError(f"dataset {path} looks binary (NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AgiasiError(f"dataset {path} is not UTF-8 text (byte {e.start})") from None


def read_documents(path: Path) -> list[str]:
    """Documents of a .txt file: blocks separated by blank lines."""
    text = _read_text(path).replace("\r\n", "\n")
    docs = [d.strip() for d in text.split("\n\n")]
    return [d for d in docs if d]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise AgiasiError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise AgiasiError(
                f"{path}: line {lineno} is nested too deeply to be a record"
            ) from None
        if not isinstance(rec, dict) or not ("text" in rec or "messages" in rec):
            raise AgiasiError(f'{path}: line {lineno} needs a "text" string or a "messages" list')
        records.append(_check_record(rec, f"{path}: line {lineno}"))
    return records


def _check_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise AgiasiError(f'{where}: "messages" must be a list of {{role, content}} strings')
        if not any(m["role"] == "assistant" for m in msgs):
            raise AgiasiError(f'{where}: "messages" has no assistant turn (nothing to learn)')
        return {"messages": msgs, WHERE: where}
    if not isinstance(rec["text"], str):
        raise AgiasiError(f'{where}: "text" must be a string')
    return {"text": rec["text"], WHERE: where}


def load_records(dataset: str | Path) -> list[dict[str, Any]]:
    """Any accepted input → a list of ``{"text"}`` or ``{"messages"}`` records."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise AgiasiError(f"dataset not found: {str(dataset)!r}")
    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            return _load_hf_dataset(path)
        files = sorted(path.rglob("*.txt")) + sorted(path.rglob("*.jsonl"))
        if not files:
            raise AgiasiError(f"dataset folder {path} has no .txt or .jsonl files")
        records: list[dict[str, Any]] = []
        for f in files:
            records.extend(load_records(f))
        return records
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix in (".txt", ".text", ".md", ""):
        return [{"text": d} for d in read_documents(path)]
    raise AgiasiError(
        f"unsupported dataset file {path.name!r}: use .txt (one paragraph a line), .jsonl "
        "(text or messages) or a Hugging Face dataset folder"
    )


def _load_hf_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise AgiasiError(
            "reading a Hugging Face dataset folder needs: pip install datasets"
        ) from None
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise AgiasiError(f"dataset {path} has splits {list(ds)} but no 'train' split")
        ds = ds["train"]
    cols = set(ds.column_names)
    if "text" not in cols and "messages" not in cols:
        raise AgiasiError(f"dataset {path} needs a 'text' or 'messages' column, has {sorted(cols)}")
    key = "messages" if "messages" in cols else "text"
    return [_check_record({key: row[key]}, f"{path}: row {i}") for i, row in enumerate(ds)]


# --------------------------------------------------------------------------- tokenizing


def tokenize_records(
    records: list[dict[str, Any]], tokenizer, max_length: int, log=None
) -> list[Example]:
    """Records → examples of at most ``max_length`` tokens.

    Chat records are checked against the tokenizer's own template first: a turn whose role the
    template does not render (``"User"``, ``"hacker"``) would silently vanish and leave the
    answer to train without its question, so it is an error naming the line.
    """
    if max_length < 2:
        raise AgiasiError(
            f"--max-length must be at least 2 (one token to predict), got {max_length}"
        )
    if not records:
        raise AgiasiError("the dataset is empty: no documents or records found")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AgiasiError("the tokenizer has no EOS token; cannot separate documents")
    stream: list[int] = []
    examples: list[Example] = []
    roles = _RoleCheck(tokenizer)
    empty_answers: list[str] = []
    for i, rec in enumerate(records):
        if "messages" in rec:
            where = rec.get(WHERE, f"record {i + 1}")
            for m in rec["messages"]:
                roles.check(m["role"], where)
                if m["role"] == "assistant" and not m["content"].strip():
                    empty_answers.append(where)
            ex = _chat_example(rec["messages"], tokenizer, max_length)
            if any(t != IGNORE for t in ex.labels[1:]):
                examples.append(ex)  # else the answer was cut off by --max-length: skip it
        else:
            ids = tokenizer(rec["text"], add_special_tokens=False, verbose=False)["input_ids"]
            if ids:
                stream.extend(ids + [eos])
    for start in range(0, len(stream), max_length):
        block = stream[start : start + max_length]
        if len(block) >= 2:
            examples.append(Example(block, list(block)))
    if empty_answers and log is not None:
        more = f" and {len(empty_answers) - 1} more" if len(empty_answers) > 1 else ""
        log(
            f"warning: empty assistant turn at {empty_answers[0]}{more}: the model learns to "
            "answer with nothing there"
        )
    if not examples:
        raise AgiasiError("the dataset has no trainable text: it tokenizes to fewer than 2 tokens")
    return examples


class _RoleCheck:
    """Which roles the tokenizer's chat template renders (asked once per role)."""

    _PROBE = "agiasi-role-probe-7f3a"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[str, bool] = {}

    def check(self, role: str, where: str) -> None:
        if role not in self.known:
            self.known[role] = self._renders(role)
        if not self.known[role]:
            seen = sorted(r for r, ok in self.known.items() if ok) or ["user", "assistant"]
            raise AgiasiError(
                f"{where}: role {role!r} is not one this tokenizer's chat template knows (it "
                f"would be dropped silently); use one of {', '.join(seen)}"
            )

    def _renders(self, role: str) -> bool:
        if not getattr(self.tokenizer, "chat_template", None):
            return True  # _chat_example says what is missing
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": role, "content": self._PROBE}], tokenize=False
            )
        except Exception:  # templates that raise_exception() on a role they do not know
            return False
        return self._PROBE in text


def _chat_example(messages: list[dict[str, str]], tokenizer, max_length: int) -> Example:
    """Render with the tokenizer's chat template; labels only on assistant tokens.

    Assistant spans come from rendering growing prefixes: tokens between the prompt for turn i
    (``add_generation_prompt=True``) and the conversation up to turn i are that turn's answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise AgiasiError(
            'chat "messages" need a tokenizer with a chat template; this one has none'
        )

    def render(msgs, gen=False) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

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


# --------------------------------------------------------------------------- batching


class BatchStream:
    """Deterministic, resumable, rank-sharded micro-batches.

    Micro-batch ``k`` of the whole run is positions ``[k·B·W, (k+1)·B·W)`` of the concatenated
    per-epoch permutations (B = batch size per rank, W = world size); rank r takes the slice
    ``[r·B, (r+1)·B)`` of it. The state is just ``k``.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise AgiasiError(f"--batch-size must be at least 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = position
        self.pin_memory = pin_memory  # for a GPU: copies that do not stall the host
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perm_cache[epoch]

    def _index(self, flat: int) -> int:
        n = len(self.examples)
        return self._perm(flat // n)[flat % n]

    def next(self) -> dict[str, torch.Tensor]:
        global_bs = self.batch_size * self.world_size
        base = self.position * global_bs + self.rank * self.batch_size
        items = [self.examples[self._index(base + i)] for i in range(self.batch_size)]
        self.position += 1
        batch = collate(items, self.pad_id)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


def collate(items: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
