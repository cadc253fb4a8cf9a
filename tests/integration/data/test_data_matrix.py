"""Every data format × every file kind it comes in × the flag combinations the README documents,
through the CLI: ``agiasi data`` (plain, ``--json``, ``--sample``, forced format) and ``agiasi
train`` (``--packing`` with ``--eval-split``, and a forced ``--dataset-format`` with an
``--eval-dataset``). ``data --json`` on plain text and ``--packing`` on plain text both crashed
on the default data once; a table this size would have caught both."""

from __future__ import annotations

import json

import pytest

from agiasi.cli import main
from tests.helpers import cli_args, write_records

pytestmark = pytest.mark.slow

Q = ["日本の首都はどこですか", "富士山の高さは", "おすすめの本を教えて", "今日の天気は"]
A = ["東京です。", "3776メートルです。", "吾輩は猫であるです。", "晴れです。"]
TEXTS = ["吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。",
         "何でも薄暗いじめじめした所で泣いていた事だけは記憶している。", "ニャーニャー。"]  # fmt: skip


def records(fmt: str) -> list[dict]:
    if fmt == "text":
        return [{"text": t} for t in TEXTS]
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in zip(Q, A, strict=True)]  # fmt: skip
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a} for q, a in zip(Q, A, strict=True)]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for q, a in zip(Q, A, strict=True)]  # fmt: skip
    return [{"prompt": q, "completion": a} for q, a in zip(Q, A, strict=True)]


def write(fmt: str, kind: str, folder) -> str:
    """The records of ``fmt`` as a file (or folder) of ``kind``."""
    return write_records(records(fmt), kind, folder)


FLAT = ("jsonl", "json", "parquet", "csv", "tsv", "folder", "hf-disk")
NESTED = ("jsonl", "json", "parquet", "folder", "hf-disk")  # lists of turns: not in a CSV cell
COMBOS = (
    [("text", k) for k in ("txt", *FLAT)]
    + [(f, k) for f in ("messages", "sharegpt") for k in NESTED]
    + [(f, k) for f in ("alpaca", "prompt-completion") for k in FLAT]
)
IDS = [f"{f}-{k}" for f, k in COMBOS]


@pytest.mark.parametrize(("fmt", "kind"), COMBOS, ids=IDS)
def test_data_previews_every_format_and_kind(tiny_phi3_tok, tmp_path, capsys, fmt, kind):
    path = write(fmt, kind, tmp_path / "data")
    base = ["data", path, "--base-model", str(tiny_phi3_tok), "--max-length", "16"]
    assert main([*base, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    (src,) = s["sources"]
    assert src["records"] == 4 and src["formats"] == [f"{fmt} (detected)"]
    assert isinstance(src["tokens"], int) and src["tokens"] > 0
    if fmt != "text":
        assert src["chat_examples"] == 4 and "⟦" in src["example"]
        assert src["roles"] == {"user": 4, "assistant": 4}
    # the text form, a forced format and a sample of fewer records than the file holds
    assert main([*base, "--dataset-format", fmt, "--sample", "2"]) == 0
    out = capsys.readouterr().out
    assert f"format {fmt}" in out and "first 2 records: sampled" in out


@pytest.mark.parametrize(("fmt", "kind"), COMBOS, ids=IDS)
def test_train_on_every_format_and_kind(tiny_phi3_tok, tmp_path, capsys, fmt, kind):
    path = write(fmt, kind, tmp_path / "data")
    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=path)
    fast = ["--quantization", "none", "--max-length", "24", "--no-progress", "--batch-size", "2"]
    # --packing with validation held out of the same data (the README's combination)
    assert main([*args, *fast, "--packing", "--eval-split", "0.25", "--save-steps", "2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "task_loss" in r] == [1, 2]
    assert any("eval_loss" in r for r in rows)
    assert (run / "step_2" / "soul.json").is_file()
    # a forced format with a separate validation file of the same kind
    other = write(fmt, kind, tmp_path / "eval")
    run2 = tmp_path / "run2"
    args2 = cli_args("train", base_model=tiny_phi3_tok, output_dir=run2, max_steps=1, dataset=path)
    rc = main(
        [*args2, *fast, "--dataset-format", fmt, "--eval-dataset", other, "--save-steps", "1"]
    )
    assert rc == 0, capsys.readouterr().err
    assert (run2 / "step_1" / "soul.json").is_file()


RENAMED = {  # the format's field = the file's column (README: --dataset-columns)
    "text": {"text": "本文"},
    "alpaca": {"instruction": "question", "output": "answer"},
    "prompt-completion": {"prompt": "q", "completion": "a"},
    "messages": {"messages": "turns"},
    "sharegpt": {"conversations": "dialogue"},
}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", sorted(RENAMED))
def test_dataset_columns_in_data_and_train(tiny_phi3_tok, tmp_path, capsys, fmt, kind):
    mapping = RENAMED[fmt]
    recs = [{mapping.get(k, k): v for k, v in r.items()} for r in records(fmt)]
    folder = tmp_path / "data"
    folder.mkdir()
    if kind == "jsonl":
        path = folder / "d.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(recs), str(path))
    spec = ",".join(f"{field}={column}" for field, column in mapping.items())
    base = ["data", str(path), "--base-model", str(tiny_phi3_tok), "--dataset-columns", spec]
    assert main([*base, "--json"]) == 0
    (src,) = json.loads(capsys.readouterr().out)["sources"]
    assert src["records"] == 4 and src["formats"] == [f"{fmt} (detected)"]
    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=1, dataset=path)
    fast = ["--quantization", "none", "--max-length", "24", "--no-progress", "--save-steps", "1"]
    assert main([*args, *fast, "--dataset-columns", spec]) == 0
    assert (run / "step_1" / "soul.json").is_file()
