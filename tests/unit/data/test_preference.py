"""Preference pairs in every shape people have them (TRL explicit and implicit, string and
conversational; LLaMA-Factory's Alpaca and ShareGPT pairs), from every file kind, give the same
pair; tokenized, only the answers are trained and a long pair loses its prompt's start first;
bad pairs are one clear line each."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from agiasi.data.files import read_rows
from agiasi.data.preference import to_pair, tokenize_pairs
from agiasi.data.tokenize import IGNORE
from agiasi.errors import AgiasiError
from agiasi.shipped import tiny_model_path

Q, GOOD, BAD, SYS = "日本の首都は？", "東京です。", "大阪です。", "簡潔に答えて。"
USER = {"role": "user", "content": Q}
EXPECTED = {
    "prompt": [USER],
    "chosen": [{"role": "assistant", "content": GOOD}],
    "rejected": [{"role": "assistant", "content": BAD}],
}

SHAPES = {
    "trl-strings": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "trl-conversational": {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    },
    "trl-implicit": {
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
    },
    "alpaca": {"instruction": Q, "input": "", "chosen": GOOD, "rejected": BAD},
    "sharegpt": {
        "conversations": [{"from": "human", "value": Q}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_every_shape_from_every_kind_is_the_same_pair(tmp_path, shape, kind):
    rec = SHAPES[shape]
    p = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        p.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    elif kind == "json":
        p.write_text(json.dumps([rec], ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([rec]), str(p))
    (row,) = list(read_rows(str(p)))
    assert to_pair(row.record, row.where) == EXPECTED


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_flat_shapes_from_spreadsheets(tmp_path, kind):
    sep = "," if kind == "csv" else "\t"
    for shape in ("trl-strings", "alpaca"):
        rec = SHAPES[shape]
        p = tmp_path / f"{shape}.{kind}"
        p.write_text(sep.join(rec) + "\n" + sep.join(rec.values()) + "\n", encoding="utf-8")
        (row,) = list(read_rows(str(p)))
        assert to_pair(row.record, row.where) == EXPECTED


def test_system_and_history_become_prompt_turns():
    rec = {"instruction": Q, "input": "短く", "system": SYS, "history": [["前", "はい"]],
           "chosen": GOOD, "rejected": BAD}  # fmt: skip
    pair = to_pair(rec, "r")
    assert pair["prompt"] == [
        {"role": "system", "content": SYS},
        {"role": "user", "content": "前"},
        {"role": "assistant", "content": "はい"},
        {"role": "user", "content": f"{Q}\n短く"},
    ]
    sg = {"system": SYS, "conversations": [{"from": "human", "value": Q}],
          "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}}  # fmt: skip
    assert to_pair(sg, "r")["prompt"] == [{"role": "system", "content": SYS}, USER]


BAD_PAIRS = {
    "chosen equals rejected": ({"prompt": Q, "chosen": GOOD, "rejected": GOOD}, "are the same"),
    "missing rejected": ({"prompt": Q, "chosen": GOOD}, "is not a preference pair"),
    "implicit without a shared prompt": (
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": GOOD}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": BAD}]},
        "the prompt is not a prefix of both",
    ),
    "implicit strings": ({"chosen": GOOD, "rejected": BAD}, "strings need a 'prompt'"),
    "chosen not a string": ({"instruction": Q, "chosen": 3, "rejected": BAD}, "must be a string"),
    "sharegpt answer from the user": (
        {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "human", "value": GOOD},
         "rejected": {"from": "gpt", "value": BAD}},
        "must be an assistant (gpt) turn",
    ),
    "answer without an assistant turn": (
        {"prompt": [USER], "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},
        "the chosen answer has no assistant turn",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_PAIRS))
def test_bad_pairs_are_one_clear_line(name):
    rec, message = BAD_PAIRS[name]
    with pytest.raises(AgiasiError, match="^line 7: ") as e:
        to_pair(rec, "line 7")
    assert message in str(e.value)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_model_path())


def test_only_the_answers_are_trained(tok):
    (ex,) = tokenize_pairs([EXPECTED], tok, 256)
    prompt = tok.apply_chat_template([USER], tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    for ids, labels, answer in ((ex.chosen_ids, ex.chosen_labels, GOOD),
                                (ex.rejected_ids, ex.rejected_labels, BAD)):  # fmt: skip
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        trained = [t for t in labels if t != IGNORE]
        assert trained == ids[len(prompt) :] and answer in tok.decode(trained)
    assert ex.prompt_tokens == len(prompt) and not ex.truncated


def test_a_long_pair_loses_its_prompt_start_first(tok):
    long = {**EXPECTED, "prompt": [{"role": "user", "content": "前置き。" * 200 + Q}]}
    said: list[str] = []
    (ex,) = tokenize_pairs([long], tok, 48, log=said.append)
    (full,) = tokenize_pairs([long], tok, 10**6)
    assert len(ex.chosen_ids) <= 48 and ex.truncated
    n_answer = len(full.chosen_ids) - full.prompt_tokens
    assert ex.chosen_ids[-n_answer:] == full.chosen_ids[-n_answer:]  # the answer kept whole
    assert (
        ex.chosen_ids[: ex.prompt_tokens]
        == full.chosen_ids[full.prompt_tokens - ex.prompt_tokens : full.prompt_tokens]
    )
    assert any("start of their prompt was cut first" in s for s in said)


def test_control_tokens_in_a_pair_are_refused(tok):
    rec = {**EXPECTED, "chosen": [{"role": "assistant", "content": "<|user|>偽の質問"}]}
    with pytest.raises(AgiasiError, match="control token"):
        tokenize_pairs([rec], tok, 256)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_agiasi_data_previews_pairs_with_both_answers_marked(tmp_path, capsys, shape):
    from agiasi.cli import main

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps(SHAPES[shape], ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["data", str(p), "--json", "--max-length", "12"]) == 0
    (src,) = json.loads(capsys.readouterr().out)["sources"]
    assert src["pairs"] == 1 and src["truncated"] == 1
    assert src["formats"][0].endswith("(detected)") and "preference" in src["formats"][0]
    assert f"⟦{GOOD}" in src["example_chosen"] and f"⟦{BAD}" in src["example_rejected"]
    assert Q in src["example_chosen"] and f"⟦{Q}" not in src["example_chosen"]


def test_truncation_keeps_one_prompt_token_so_the_first_answer_token_is_scored(tok):
    from agiasi.data.preference import to_pair, tokenize_pairs
    from agiasi.data.tokenize import IGNORE

    pair = to_pair({"prompt": "質問" * 50, "chosen": "答え" * 50, "rejected": "いいえ"}, "x")
    for max_length in (2, 3, 8):
        (ex,) = tokenize_pairs([pair], tok, max_length)
        assert ex.prompt_tokens == 1 and ex.truncated
        for ids, labels in (
            (ex.chosen_ids, ex.chosen_labels),
            (ex.rejected_ids, ex.rejected_labels),
        ):
            assert len(ids) <= max_length and labels[0] == IGNORE
            assert any(y != IGNORE for y in labels[1:])  # a scored answer token
