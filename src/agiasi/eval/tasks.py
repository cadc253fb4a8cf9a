"""JGLUE tasks as the field scores them: the prompts of lm-evaluation-harness's
``japanese_leaderboard`` tasks, its few-shot draw, and the shipped JGLUE v1.3 files.

Source of every string here: lm-evaluation-harness 0.4.13, ``ja_leaderboard_jcommonsenseqa`` and
``ja_leaderboard_jnli`` (task version 1.0). A prompt is, byte for byte, what lm-eval builds::

    DESCRIPTION + Σ_shots (text(shot) + "\\n" + gold choice of shot + "\\n\\n") + text(item)

and each choice is scored as the continuation ``"\\n" + choice`` (target delimiter ``"\\n"``).
With ``--chat-template`` (lm-eval's ``--apply_chat_template``, shots collapsed into one turn):
system = DESCRIPTION, user = the same text without it, the template's generation prompt, and the
continuation is the bare choice.

Few-shot examples come from a split other than the one scored, drawn as lm-eval draws them:
one ``random.Random(seed)`` (seed 1234, lm-eval's ``fewshot_random_seed``) and ``rnd.sample(pool,
k)`` per item, in item order, so the same seed gives the same shots as lm-eval. JNLI's train split
is not shipped: its pool is then 64 validation items set aside by the seed (and not scored), or
``--fewshot-data FILE``.

Only data is read here (JSON lines, or one JSON array); nothing a file says is executed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError

TEMPLATE_SOURCE = (
    "lm-evaluation-harness 0.4.13 japanese_leaderboard (ja_leaderboard_jcommonsenseqa, "
    "ja_leaderboard_jnli; task version 1.0)"
)
DESCRIPTION = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。\n\n"
)
TARGET_DELIMITER = "\n"
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234
CARVED_POOL = 64
MAX_ITEM_CHARS = 20_000  # a JGLUE item is < 300 characters; more is not a benchmark item
MAX_FILE_BYTES = 256 * 2**20  # the largest shipped file is 1.9 MB; a file is read whole

JNLI_LABELS = ("entailment", "contradiction", "neutral")
JNLI_CHOICES = ("含意", "矛盾", "中立")


def _jcqa_text(item: dict[str, Any]) -> str:
    listed = "".join(f"- {c}\n" for c in _jcqa_choices(item))
    return (
        "### 指示：\n出力は以下から選択してください：\n"
        f"{listed}\n### 入力：\n{item['question']}\n\n### 応答："
    )


def _jcqa_choices(item: dict[str, Any]) -> list[str]:
    return [item[f"choice{i}"] for i in range(5)]


def _jnli_text(item: dict[str, Any]) -> str:
    return (
        "### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n"
        "出力は以下から選択してください：\n含意\n矛盾\n中立\n\n"
        f"### 入力：\n前提：{item['sentence1']}\n仮説：{item['sentence2']}\n\n### 応答："
    )


def _jnli_gold(item: dict[str, Any]) -> int:
    label = item["label"]
    return label if isinstance(label, int) else JNLI_LABELS.index(label)


@dataclass(frozen=True)
class Task:
    """One multiple-choice task: its fields, files, prompt text and choices."""

    name: str
    lm_eval: str
    fields: tuple[str, ...]
    id_field: str
    valid_file: str
    train_file: str | None
    labels: tuple[Any, ...]
    text: Callable[[dict[str, Any]], str]
    choices: Callable[[dict[str, Any]], list[str]]
    gold: Callable[[dict[str, Any]], int]
    chance: float
    """the expected accuracy of a uniform guess (JNLI's majority class is 55.5 % of its items)"""


TASKS: dict[str, Task] = {
    "jcommonsenseqa": Task(
        name="jcommonsenseqa",
        lm_eval="ja_leaderboard_jcommonsenseqa",
        fields=("question", "choice0", "choice1", "choice2", "choice3", "choice4", "label"),
        id_field="q_id",
        valid_file="jcommonsenseqa-v1.3-valid-v1.3.json",
        train_file="jcommonsenseqa-v1.3-train-v1.3.json",
        labels=(0, 1, 2, 3, 4),
        text=_jcqa_text,
        choices=_jcqa_choices,
        gold=lambda item: item["label"],
        chance=0.2,
    ),
    "jnli": Task(
        name="jnli",
        lm_eval="ja_leaderboard_jnli",
        fields=("sentence1", "sentence2", "label"),
        id_field="sentence_pair_id",
        valid_file="jnli-v1.3-valid-v1.3.json",
        train_file=None,
        labels=JNLI_LABELS + (0, 1, 2),
        text=_jnli_text,
        choices=lambda item: list(JNLI_CHOICES),
        gold=_jnli_gold,
        chance=1 / 3,
    ),
}


def parse_tasks(text: str | list[str]) -> list[Task]:
    """``jcommonsenseqa,jnli`` → tasks, in order, each once; unknown names are one error."""
    names = text if isinstance(text, list) else text.split(",")
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise AgiasiError(f"--task: no task named; choose from {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise AgiasiError(f"--task: unknown task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def parse_task_paths(text: str | None, tasks: list[Task], flag: str) -> dict[str, Path]:
    """``PATH`` (one task) or ``TASK=PATH,…`` → {task name: path}."""
    if not text:
        return {}
    out: dict[str, Path] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, path = part.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise AgiasiError(
                    f"{flag}: with several tasks, say which file is whose: TASK=PATH,…"
                )
            name, path = tasks[0].name, part
        if name not in {t.name for t in tasks}:
            raise AgiasiError(f"{flag}: {name!r} is not one of the tasks run ({part!r})")
        out[name] = Path(path)
    return out


def read_items(task: Task, path: Path) -> list[dict[str, Any]]:
    """The items of a JGLUE file (JSON lines as JGLUE ships them, or one JSON array), every
    field checked: one error naming the file, the item and what is wrong."""
    if not path.is_file():
        raise AgiasiError(f"{task.name} data not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise AgiasiError(
            f"{task.name} data {path} is {size / 2**20:.0f} MiB; a JGLUE split is a few MB "
            f"(at most {MAX_FILE_BYTES // 2**20} MiB is read)"
        )
    from agiasi.textfiles import decode_bytes

    text = decode_bytes(path.read_bytes(), path, f"{task.name} data")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
            where = [f"item {i + 1}" for i in range(len(rows))]
        else:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            rows = []
            where = []
            for n, line in lines:
                where.append(f"line {n}")
                rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise AgiasiError(
            f"{task.name} data {path}: not JSON lines nor a JSON array ({e.msg} at line {e.lineno})"
        ) from None
    if not rows:
        raise AgiasiError(f"{task.name} data {path} holds no items")
    for row, at in zip(rows, where, strict=True):
        _check_item(task, row, f"{path} {at}")
    return rows


def _check_item(task: Task, row: Any, where: str) -> None:
    need = ", ".join(task.fields)
    if not isinstance(row, dict):
        raise AgiasiError(f"{where}: a {task.name} item is a JSON object with {need}")
    missing = [f for f in task.fields if f not in row]
    if missing:
        raise AgiasiError(
            f"{where}: missing field {missing[0]!r} (a {task.name} item needs {need})"
        )
    for f in task.fields:
        if f == "label":
            continue
        if not isinstance(row[f], str) or not row[f].strip():
            raise AgiasiError(f"{where}: field {f!r} must be a non-empty string")
        if len(row[f]) > MAX_ITEM_CHARS:
            raise AgiasiError(
                f"{where}: field {f!r} has {len(row[f])} characters (a benchmark item has a "
                f"few hundred; at most {MAX_ITEM_CHARS})"
            )
    label = row["label"]
    if isinstance(label, bool) or label not in task.labels:
        shown = ", ".join(repr(v) for v in task.labels)
        raise AgiasiError(f"{where}: label {label!r} is not one of {shown}")


@dataclass
class TaskSet:
    """What one task scores: the items, the shots of each, and where both came from."""

    task: Task
    items: list[dict[str, Any]]
    shots: list[list[dict[str, Any]]]
    scored_from: str
    fewshot_from: str | None
    num_fewshot: int
    seed: int

    def item_id(self, i: int) -> str:
        return str(self.items[i].get(self.task.id_field, i))


def prepare(
    task: Task,
    data: Path | None = None,
    fewshot_data: Path | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = FEWSHOT_SEED,
) -> TaskSet:
    """The items to score (the shipped validation set unless ``data``), their first ``limit``,
    and ``num_fewshot`` shots for each drawn from a pool that is never scored."""
    from agiasi.shipped import jglue_file

    scored_path = data or jglue_file(task.valid_file)
    items = read_items(task, scored_path)
    scored_from = str(scored_path) if data else f"{task.valid_file} (shipped)"
    pool: list[dict[str, Any]] = []
    fewshot_from = None
    leaked = 0
    if num_fewshot > 0:
        if fewshot_data is not None or task.train_file is not None:
            pool_path = fewshot_data or jglue_file(task.train_file)
            pool, leaked = without_scored(task, read_items(task, pool_path), items)
            fewshot_from = str(pool_path) if fewshot_data else f"{task.train_file} (shipped)"
            if leaked:
                fewshot_from += f" less {leaked} item(s) that are also scored"
        else:
            if len(items) <= CARVED_POOL:
                raise AgiasiError(
                    f"{task.name}: {len(items)} items cannot also give a {CARVED_POOL}-item "
                    "few-shot pool; pass --fewshot-data FILE"
                )
            held = set(random.Random(seed).sample(range(len(items)), CARVED_POOL))
            pool = [it for i, it in enumerate(items) if i in held]
            items = [it for i, it in enumerate(items) if i not in held]
            fewshot_from = (
                f"{CARVED_POOL} items of {scored_from} set aside by seed {seed} and not scored "
                f"({task.name}'s train split is not shipped; --fewshot-data FILE uses another)"
            )
        if num_fewshot > len(pool):
            left_out = (
                f" ({leaked} item(s) of it are also scored and were left out, so that no item "
                "sees its own answer)"
                if leaked
                else ""
            )
            raise AgiasiError(
                f"--num-fewshot {num_fewshot} is more than the {len(pool)} examples in the "
                f"few-shot pool of {task.name}{left_out}"
            )
    if limit is not None:
        items = items[:limit]
    rnd = random.Random(seed)
    shots = [rnd.sample(pool, num_fewshot) if num_fewshot else [] for _ in items]
    return TaskSet(task, items, shots, scored_from, fewshot_from, num_fewshot, seed)


def without_scored(
    task: Task, pool: list[dict[str, Any]], scored: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The few-shot pool less every item that is also scored — by id, and by content (the same
    question and choices under another id) — so no item is shown its own answer; and how many
    were taken out."""

    def content(item: dict[str, Any]) -> tuple:
        return tuple(str(item[f]).strip() for f in task.fields if f != "label")

    ids = {str(it[task.id_field]) for it in scored if task.id_field in it}
    texts = {content(it) for it in scored}
    kept = [
        it
        for it in pool
        if str(it.get(task.id_field, object())) not in ids and content(it) not in texts
    ]
    return kept, len(pool) - len(kept)


def plain_prompt(task: Task, item: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """lm-eval's plain-text context: the description, the shots, the item."""
    return DESCRIPTION + _turns(task, item, shots)


def chat_messages(
    task: Task, item: dict[str, Any], shots: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """lm-eval's chat context (shots collapsed into one user turn): system + user."""
    return [
        {"role": "system", "content": DESCRIPTION},
        {"role": "user", "content": _turns(task, item, shots)},
    ]


def continuations(task: Task, item: dict[str, Any], chat: bool) -> list[str]:
    """What each choice is scored as: ``"\\n" + choice``, or the bare choice after a chat
    template's generation prompt (lm-eval drops the target delimiter there)."""
    delim = "" if chat else TARGET_DELIMITER
    return [delim + c for c in task.choices(item)]


def _turns(task: Task, item: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    answered = "".join(
        task.text(s) + TARGET_DELIMITER + task.choices(s)[task.gold(s)] + FEWSHOT_DELIMITER
        for s in shots
    )
    return answered + task.text(item)
