"""JGLUE prompts, the few-shot draw, lm-eval's token split and the paired statistics — without
a model. The expected prompts are written out by hand from the lm-evaluation-harness 0.4.13
task files (``ja_leaderboard_jcommonsenseqa.yaml``, ``ja_leaderboard_jnli.yaml``)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from agiasi.cli import main
from agiasi.errors import AgiasiError
from agiasi.eval.loglik import encode_pair, item_tokens
from agiasi.eval.stats import mcnemar_exact, paired_bootstrap, verdict
from agiasi.eval.tasks import (
    TASKS,
    chat_messages,
    continuations,
    plain_prompt,
    prepare,
    read_items,
)

DESC = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
JCQA_0 = (
    "### 指示：\n出力は以下から選択してください：\n- 掲示板\n- パソコン\n- マザーボード\n"
    "- ハードディスク\n- まな板\n\n### 入力：\n"
    "電子機器で使用される最も主要な電子回路基板の事をなんと言う？\n\n### 応答："
)
JCQA_TRAIN_0 = (
    "### 指示：\n出力は以下から選択してください：\n- 世界\n- 写真集\n- 絵本\n- 論文\n- 図鑑\n\n"
    "### 入力：\n主に子ども向けのもので、イラストのついた物語が書かれているものはどれ？\n\n"
    "### 応答："
)
JNLI_0 = (
    "### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください："
    "\n含意\n矛盾\n中立\n\n### 入力：\n"
    "前提：時計がついている場所にパブリックマーケットセンターとかかれた看板が設置されています。\n"
    "仮説：屋根の上に看板があり時計もついています。\n\n### 応答："
)


def test_zero_shot_prompts_are_lm_evals_byte_for_byte():
    jcqa = prepare(TASKS["jcommonsenseqa"], limit=1)
    assert plain_prompt(jcqa.task, jcqa.items[0], []) == DESC + JCQA_0
    assert continuations(jcqa.task, jcqa.items[0], chat=False) == [
        "\n掲示板",
        "\nパソコン",
        "\nマザーボード",
        "\nハードディスク",
        "\nまな板",
    ]
    assert jcqa.task.gold(jcqa.items[0]) == 2
    jnli = prepare(TASKS["jnli"], limit=1)
    assert plain_prompt(jnli.task, jnli.items[0], []) == DESC + JNLI_0
    assert continuations(jnli.task, jnli.items[0], chat=False) == ["\n含意", "\n矛盾", "\n中立"]
    assert jnli.task.gold(jnli.items[0]) == 2  # "neutral"


def test_k_shot_prompt_is_shots_with_answers_then_the_item():
    task = TASKS["jcommonsenseqa"]
    item = prepare(task, limit=1).items[0]
    shot = read_items(task, _shipped(task.train_file))[0]
    want = DESC + JCQA_TRAIN_0 + "\n絵本\n\n" + JCQA_0
    assert plain_prompt(task, item, [shot]) == want
    # chat: the description is the system turn, the rest one user turn, bare choices
    assert chat_messages(task, item, [shot]) == [
        {"role": "system", "content": DESC},
        {"role": "user", "content": JCQA_TRAIN_0 + "\n絵本\n\n" + JCQA_0},
    ]
    assert continuations(task, item, chat=True)[2] == "マザーボード"


def _shipped(name):
    from agiasi.shipped import jglue_file

    return jglue_file(name)


def test_few_shot_draw_is_lm_evals_and_never_from_the_scored_split():
    """The same shots as lm-eval's ContextSampler (seed 1234, one draw per item in order)."""
    samplers = pytest.importorskip("lm_eval.api.samplers")
    task = TASKS["jcommonsenseqa"]
    ts = prepare(task, num_fewshot=3, limit=20)
    pool = read_items(task, _shipped(task.train_file))
    ref = samplers.ContextSampler(pool, rnd=1234)
    assert ts.shots == [list(ref.sample(3)) for _ in range(20)]
    ids = {it["q_id"] for it in ts.items}
    assert not ids & {s["q_id"] for shots in ts.shots for s in shots}
    # JNLI has no shipped train split: 64 valid items are set aside and not scored
    jnli = prepare(TASKS["jnli"], num_fewshot=2)
    assert len(jnli.items) == 2434 - 64
    scored = {it["sentence_pair_id"] for it in jnli.items}
    assert not scored & {s["sentence_pair_id"] for shots in jnli.shots for s in shots}
    assert "set aside" in jnli.fewshot_from
    assert prepare(TASKS["jnli"]).items.__len__() == 2434  # zero-shot scores them all


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding():
    """lm-eval's rule: trailing whitespace joins the continuation; the continuation is the tail
    of encode(context + continuation) after encode(context)."""

    def encode(text):  # a toy tokenizer that starts every encoding with BOS, as many do
        return ["<s>"] + list(text)

    # the continuation is the tail of the whole encoding: no second BOS inside it
    assert encode_pair(encode, "a b ", "c") == (["<s>", "a", " ", "b"], [" ", "c"])
    assert encode_pair(encode, "a", "\nz") == (["<s>", "a"], ["\n", "z"])
    with pytest.raises(AgiasiError, match="non-empty context"):
        encode_pair(encode, "  ", "x")


def test_a_context_past_the_model_is_cut_per_choice_as_lm_eval_cuts_it():
    def encode(text):
        return list(text)

    groups, cut = item_tokens(encode, "abcdefgh", ["X", "YYY"], max_length=6)
    assert cut
    # lm-eval keeps the last max_length + 1 tokens of context + choice, then drops the last
    assert groups == [(list("cdefgh"), [["X"]]), (list("efgh"), [list("YYY")])]
    groups, cut = item_tokens(encode, "abc", ["X", "YYY"], max_length=6)
    assert (groups, cut) == ([(list("abc"), [["X"], list("YYY")])], False)


def test_paired_bootstrap_mcnemar_and_verdict():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 20)
    diff, lo, hi = paired_bootstrap(a, a)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)
    assert verdict(diff, lo, hi) == "kept"
    rng = np.random.default_rng(3)
    b = np.where(rng.random(a.size) < 0.3, 1 - a, a)  # 30 % of the items flipped at random
    diff, lo, hi = paired_bootstrap(a, b)
    assert diff == pytest.approx(float((b - a).mean()))
    assert lo <= diff <= hi
    # the interval's half-width is ~1.96 σ of the mean of the paired differences
    sd = float((b - a).std(ddof=1)) / math.sqrt(a.size)
    assert (hi - lo) / 2 == pytest.approx(1.96 * sd, rel=0.15)
    assert verdict(-0.05, -0.08, -0.02) == "lost 5.0 points"
    assert verdict(0.031, 0.01, 0.05) == "gained 3.1 points"
    # exact McNemar: 0 against 6 discordant items, p = 2 · (1/2)^6
    x = np.array([0] * 6 + [1] * 4)
    y = np.array([1] * 6 + [1] * 4)
    assert mcnemar_exact(x, y) == (0, 6, pytest.approx(2 / 64))
    assert mcnemar_exact(x, x)[2] == 1.0


def test_bad_benchmark_input_is_one_line_and_exit_2(tmp_path, capsys):
    from agiasi.shipped import tiny_model_path

    model = str(tiny_model_path())
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"question": "q", "choice0": "a", "choice1": "b", "label": 0}) + "\n",
        encoding="utf-8",
    )
    two = tmp_path / "two.json"
    rows = [json.loads(line) for line in _shipped("jcommonsenseqa-v1.3-train-v1.3.json").open()][:2]
    two.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cases = [
        (["eval", model, "--task", "jsquad"], "unknown task 'jsquad'"),
        (["eval", model, "--task", "jcommonsenseqa", "--task-data", str(bad)], "missing field"),
        (
            ["eval", model, "--task", "jcommonsenseqa", "--num-fewshot", "3"]
            + ["--fewshot-data", str(two)],
            "--num-fewshot 3 is more than the 2 examples",
        ),
        (["eval", model, "--task", "jnli", "--task-data", str(tmp_path / "no.json")], "not found"),
        (["eval", "--compare", model, "--task", "jnli"], "two models or more"),
        (["eval", "--compare", model], "--compare needs at least two models"),
        (["eval", model, "--compare", f"{model},{model}"], "leave out the MODEL argument"),
        (["eval", model, "--task", "jnli", "--text", "x.txt"], "--text is for perplexity"),
        (["eval", model, "--task", "jnli", "--num-fewshot", "-1"], "--num-fewshot"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    label = tmp_path / "label.json"
    label.write_text(
        json.dumps({"sentence1": "a", "sentence2": "b", "label": "maybe"}) + "\n", encoding="utf-8"
    )
    with pytest.raises(AgiasiError, match="label 'maybe' is not one of"):
        read_items(TASKS["jnli"], label)
    huge = tmp_path / "huge.json"
    with huge.open("wb") as fh:  # sparse: no disk is spent
        fh.truncate(300 * 2**20)
    with pytest.raises(AgiasiError, match="300 MiB"):
        read_items(TASKS["jnli"], huge)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(AgiasiError, match="not JSON lines"):
        read_items(TASKS["jnli"], junk)


def test_random_module_state_is_not_touched():
    """The draw uses its own generator: a user's random state is theirs."""
    random.seed(5)
    before = random.random()
    random.seed(5)
    prepare(TASKS["jcommonsenseqa"], num_fewshot=2, limit=3)
    assert random.random() == before
