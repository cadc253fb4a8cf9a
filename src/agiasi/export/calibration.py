"""Which text the importance matrix is computed on, chosen so it is the user's own domain and
never the text the export's perplexity is measured on.

In order: ``--calibration PATH`` (any dataset ``agiasi train`` reads); else the run's
validation data as its ``train_config.json`` records it (``--eval-dataset``, or the documents
``--eval-split`` held out, drawn again with the run's seed); else the shipped Japanese training
sample. The shipped held-out sample, which the report's perplexity uses by default, is never
chosen by default, and a ``--calibration`` equal to ``--text`` is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError

# Characters read per calibration token wanted: Japanese runs ~1–2 characters a token; what
# is read beyond the budget is cut after tokenizing.
CHARS_PER_TOKEN = 6


@dataclass
class Calibration:
    """Where the text comes from (said in the log and the report) and how to read it."""

    source: str  # e.g. "--calibration data.jsonl", "the run's --eval-dataset val.jsonl"
    dataset: str  # what the data readers open
    eval_split: float = 0.0
    seed: int = 42
    dataset_format: str = "auto"
    dataset_columns: str | None = None


def choose_calibration(path: str | None, checkpoint: Path, text: str | None) -> Calibration:
    """The calibration source for this export, checked now (a missing file fails here)."""
    from agiasi.shipped import default_dataset

    if path:
        if text and Path(path).resolve() == Path(text).resolve():
            raise AgiasiError(
                "--calibration and --text are the same file: the perplexity with and without "
                "the importance matrix must be measured on text it was not computed on"
            )
        if not Path(path).expanduser().exists() and not str(path).startswith("hf:"):
            raise AgiasiError(f"--calibration {path}: no such file or folder")
        return Calibration(f"--calibration {path}", str(path))
    run = _train_config(checkpoint)
    fmt = {
        "dataset_format": run.get("dataset_format") or "auto",
        "dataset_columns": run.get("dataset_columns"),
    }
    if run.get("eval_dataset") and _exists(run["eval_dataset"]):
        return Calibration(
            f"the run's --eval-dataset {run['eval_dataset']}", run["eval_dataset"], **fmt
        )
    if run.get("eval_split") and run.get("dataset") and _exists(run["dataset"]):
        return Calibration(
            f"the {run['eval_split']:g} of {run['dataset']} the run held out",
            run["dataset"],
            eval_split=float(run["eval_split"]),
            seed=int(run.get("seed", 42)),
            **fmt,
        )
    return Calibration("the shipped Japanese sample", str(default_dataset()))


def _exists(dataset: str) -> bool:
    from agiasi.data.load import split_sources

    return all(Path(s).expanduser().exists() for s in split_sources(dataset))


def _train_config(checkpoint: Path) -> dict[str, Any]:
    from agiasi.checkpoint.step_folder import TRAIN_CONFIG

    path = Path(checkpoint) / TRAIN_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def calibration_text(cal: Calibration, tokenizer, max_tokens: int) -> str:
    """The text of ``cal``: documents as they are, conversations through the model's chat
    template, joined by blank lines; reading stops once it holds enough for ``max_tokens``."""
    from agiasi.data.load import iter_records, load_records, split_eval
    from agiasi.templates import render_text

    raw = Path(cal.dataset).expanduser()
    if raw.is_file() and raw.suffix == ".txt" and not cal.eval_split:  # a text file as it is
        from agiasi.textfiles import read_text

        # never errors="replace": calibrating on U+FFFD would skew the matrix without a word
        text = read_text(raw, "calibration text", max_chars=max_tokens * CHARS_PER_TOKEN)
        if not text.strip():
            raise AgiasiError(f"the calibration data ({cal.source}) holds no text")
        return text
    if cal.eval_split:
        records: Any = split_eval(
            load_records(cal.dataset, cal.dataset_format, cal.dataset_columns),
            cal.eval_split,
            cal.seed,
        )[1]
    else:
        records = iter_records(cal.dataset, cal.dataset_format, cal.dataset_columns)
    parts, size = [], 0
    for r in records:
        if "messages" in r:
            piece = render_text(tokenizer, r["messages"], r.get("_where", "calibration data"))
        else:
            piece = r.get("text", "")
        parts.append(piece)
        size += len(piece)
        if size >= max_tokens * CHARS_PER_TOKEN:
            break
    text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        raise AgiasiError(f"the calibration data ({cal.source}) holds no text")
    return text
