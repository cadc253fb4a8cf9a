"""Dataset formats and file kinds, the validation split, packing, the learning-rate schedule."""

import json
import math

import pytest
import torch

from agiasi.data import IGNORE, collate, load_records, pack, split_eval, tokenize_records
from agiasi.data.files import source_kind
from agiasi.errors import AgiasiError
from agiasi.train.schedule import lr_factor, lr_warmup_steps

# One conversation in every format, and the `messages` it must become (the documented
# conventions: system first, history pairs, instruction + "\n" + input).
MESSAGES = [
    {"role": "system", "content": "あなたは丁寧なアシスタントです。"},
    {"role": "user", "content": "富士山の高さは？"},
    {"role": "assistant", "content": "3776メートルです。"},
    {"role": "user", "content": "次の文を英語に訳してください。\n猫が好きです。"},
    {"role": "assistant", "content": "I like cats."},
]
ALPACA = {
    "system": "あなたは丁寧なアシスタントです。",
    "history": [["富士山の高さは？", "3776メートルです。"]],
    "instruction": "次の文を英語に訳してください。",
    "input": "猫が好きです。",
    "output": "I like cats.",
}
SHAREGPT = {
    "system": "あなたは丁寧なアシスタントです。",
    "conversations": [
        {"from": "human", "value": "富士山の高さは？"},
        {"from": "gpt", "value": "3776メートルです。"},
        {"from": "human", "value": "次の文を英語に訳してください。\n猫が好きです。"},
        {"from": "gpt", "value": "I like cats."},
    ],
}
PROMPT_COMPLETION = {"prompt": "富士山の高さは？", "completion": "3776メートルです。"}
PC_MESSAGES = MESSAGES[1:3]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from agiasi.demo import tiny_model_path

    return AutoTokenizer.from_pretrained(str(tiny_model_path()))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _strip(records):
    return [{k: v for k, v in r.items() if k != "_where"} for r in records]


@pytest.mark.parametrize(
    "record, twin",
    [(ALPACA, MESSAGES), (SHAREGPT, MESSAGES), (PROMPT_COMPLETION, PC_MESSAGES)],
    ids=["alpaca", "sharegpt", "prompt-completion"],
)
def test_formats_equal_their_messages_twin_token_for_token(tmp_path, tok, record, twin):
    got = load_records(_jsonl(tmp_path / "a.jsonl", [record]))
    want = load_records(_jsonl(tmp_path / "m.jsonl", [{"messages": twin}]))
    assert _strip(got) == _strip(want)
    (a,), (b,) = tokenize_records(got, tok, 512), tokenize_records(want, tok, 512)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert any(y != IGNORE for y in a.labels)


def test_alpaca_without_input_is_the_instruction_alone(tmp_path):
    (rec,) = load_records(_jsonl(tmp_path / "a.jsonl", [{"instruction": "質問", "output": "答"}]))
    assert rec["messages"] == [
        {"role": "user", "content": "質問"},
        {"role": "assistant", "content": "答"},
    ]


ROWS = [
    {"instruction": "日本の首都は？", "input": "", "output": "東京です。"},
    {"instruction": "訳して", "input": "犬", "output": "dog"},
]


def _write_kind(kind, folder, rows):
    """The same rows as each file kind (folder: two files; hf-*: a `datasets` folder)."""
    import datasets

    folder.mkdir()
    if kind == "jsonl":
        return str(_jsonl(folder / "d.jsonl", rows))
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(rows, ensure_ascii=False))
        return str(folder / "d.json")
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(folder / "d.parquet"))
        return str(folder / "d.parquet")
    if kind in ("csv", "tsv"):
        ds.to_csv(str(folder / f"d.{kind}"), index=False, sep="," if kind == "csv" else "\t")
        return str(folder / f"d.{kind}")
    if kind == "folder":
        _jsonl(folder / "a.jsonl", rows[:1])
        ds.select([1]).to_parquet(str(folder / "b.parquet"))
        return str(folder)
    if kind == "hf-disk":
        ds.save_to_disk(str(folder / "ds"))
        return str(folder / "ds")
    if kind == "hf-id":  # datasets.load_dataset on a local dataset folder: the Hub id path
        ds.to_json(str(folder / "train.jsonl"), force_ascii=False)
        return f"hf:{folder}"
    raise AssertionError(kind)


KINDS = ["jsonl", "json", "parquet", "csv", "tsv", "folder", "hf-disk", "hf-id"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_kind_reads_the_same_records(tmp_path, kind):
    src = _write_kind(kind, tmp_path / kind, ROWS)
    want = load_records(_jsonl(tmp_path / "ref.jsonl", ROWS))
    assert _strip(load_records(src)) == _strip(want)
    expected_kind = {"folder": "folder", "hf-disk": "hf-disk", "hf-id": "hf-id"}.get(kind, kind)
    assert source_kind(src) == expected_kind


def test_several_datasets_and_text_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ROWS)
    t = tmp_path / "t.md"
    t.write_text("\ufeff一つ目の文書。\n続き。\n\n二つ目の文書。\n")
    recs = load_records(f"{a},{t}")
    assert [r.get("text") for r in recs[2:]] == ["一つ目の文書。\n続き。", "二つ目の文書。"]
    assert recs[2]["_where"].endswith("t.md: line 1") and recs[3]["_where"].endswith("line 4")


def test_column_map(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "質問", "answer": "答", "id": 1}])
    (rec,) = load_records(p, dataset_columns="instruction=question,output=answer")
    assert rec["messages"][-1] == {"role": "assistant", "content": "答"}
    with pytest.raises(
        AgiasiError, match=r"names column 'reply'.*its columns are 'question', 'answer', 'id'"
    ):
        load_records(p, dataset_columns="instruction=question,output=reply")
    with pytest.raises(AgiasiError, match="is not FIELD=COLUMN"):
        load_records(p, dataset_columns="instruction")
    with pytest.raises(AgiasiError, match="'answer_text' is not a field of any format"):
        load_records(p, dataset_columns="answer_text=answer")


BAD = {
    "fits_none": (
        [{"question": "q", "reply": "a"}],
        {},
        r"q.jsonl: line 1: the record fits no dataset format; its keys are 'question', 'reply'. "
        r"Accepted: text \(text\); messages \(messages\); alpaca \(instruction \+ output\)",
    ),
    "two_formats": (
        [{"text": "t", "instruction": "i", "output": "o"}],
        {},
        r"line 1: the record fits text and alpaca .*say which with --dataset-format",
    ),
    "mixed_in_head": (
        [ROWS[0], {"text": "本文"}],
        {},
        r"mixes formats \(alpaca first at .*q.jsonl: line 1; text first at .*q.jsonl: line 2\)",
    ),
    "sharegpt_role": (
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]}],
        {},
        r"line 1: ShareGPT role 'tool' is not one agiasi maps; use one of human, user, gpt",
    ),
    "forced_format": (
        [{"text": "本文"}],
        {"dataset_format": "alpaca"},
        r"line 1: the record is not alpaca \(needs instruction \+ output\); its keys are 'text'",
    ),
    "no_answer": (
        [{"prompt": "q", "completion": 3}],
        {},
        r'line 1: "completion" must be a string, got int',
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_records_say_file_line_keys_and_formats(tmp_path, case):
    rows, kwargs, message = BAD[case]
    with pytest.raises(AgiasiError, match=message):
        load_records(_jsonl(tmp_path / "q.jsonl", rows), **kwargs)


def test_mixing_after_the_sniffed_records(tmp_path):
    rows = [ROWS[0]] * 70 + [{"conversations": [{"from": "human", "value": "q"}]}]
    with pytest.raises(AgiasiError, match=r"line 71 is sharegpt, the records before it alpaca"):
        load_records(_jsonl(tmp_path / "q.jsonl", rows))


def test_eval_split_is_deterministic_disjoint_and_by_document():
    records = [{"text": f"文書{i}"} for i in range(50)]
    train, held = split_eval(records, 0.2, seed=7)
    again, held2 = split_eval(records, 0.2, seed=7)
    _, other = split_eval(records, 0.2, seed=8)
    assert held == held2 and train == again and held != other
    assert len(held) == 10 and len(train) == 40
    names = [r["text"] for r in train] + [r["text"] for r in held]
    assert sorted(names) == sorted(r["text"] for r in records)  # disjoint, nothing lost
    with pytest.raises(
        AgiasiError, match="--eval-split 0.01 of 50 document.* leaves no validation"
    ):
        split_eval(records, 0.01, seed=7)
    with pytest.raises(AgiasiError, match="--eval-split 0.99 of 50 document.* leaves no training"):
        split_eval(records, 0.99, seed=7)


def test_pack_restarts_positions_and_drops_only_the_boundary_targets(tok):
    recs = [{"messages": MESSAGES[1:3]}, {"messages": PC_MESSAGES}, {"messages": MESSAGES[3:]}]
    exs = tokenize_records(recs, tok, 512)
    rows = pack(exs, max_length=sum(len(e.input_ids) for e in exs[:2]))
    assert len(rows) == 2
    first = rows[0]
    n0 = len(exs[0].input_ids)
    assert first.input_ids == exs[0].input_ids + exs[1].input_ids
    assert first.position_ids == list(range(n0)) + list(range(len(exs[1].input_ids)))
    assert first.labels == [IGNORE, *exs[0].labels[1:], IGNORE, *exs[1].labels[1:]]
    batch = collate(rows, pad_id=0)
    width = batch["input_ids"].shape[1]
    n1 = len(rows[1].input_ids)
    # the padding is its own segment: positions from 0, no targets
    assert batch["position_ids"][1, n1:].tolist() == list(range(width - n1))
    assert (batch["labels"][1, n1:] == IGNORE).all()


def test_packed_losses_equal_unpacked():
    """Per-example losses of a packed row equal each example run alone (fp32, CPU)."""
    from agiasi.demo import tiny_model_path
    from agiasi.model.config import ModelConfig
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

    torch.manual_seed(0)
    cfg = ModelConfig(base_model=str(tiny_model_path()), quantization="none", lora_dropout=0.0)
    w = AGIASI_SO8T_Wrapper(config=cfg, device="cpu").eval()
    with torch.no_grad():  # a rotation and a gate that change the output
        w.soul.rotation.skew_params.normal_(0, 0.05)
        w.soul.alpha.fill_(1.0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path()))
    recs = [{"messages": MESSAGES}, {"messages": PC_MESSAGES}, {"messages": MESSAGES[3:]}]
    exs = tokenize_records(recs, tok, 256)
    (row,) = pack(exs, 256)
    b = collate([row], tok.pad_token_id)

    def per_token(logits, labels):
        lp = torch.log_softmax(logits[0, :-1].double(), -1)
        y = labels[0, 1:]
        keep = y != IGNORE
        return -lp[keep.nonzero()[:, 0], y[keep]], keep

    with torch.no_grad():
        out = w(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
        packed, keep = per_token(out.logits, b["labels"])
        alone = []
        for ex in exs:
            ids = torch.tensor([ex.input_ids])
            o = w(ids, torch.ones_like(ids))
            nll, _ = per_token(o.logits, torch.tensor([[IGNORE, *ex.labels[1:]]]))
            alone.append(nll)
    alone = torch.cat(alone)
    assert packed.shape == alone.shape and packed.numel() > 10
    # fp32 logits of a 6-layer model: rounding only (the attention sees exactly the same keys)
    assert (packed - alone).abs().max() <= 1e-5 * max(1.0, float(alone.abs().max()))
    # and the packed batch's loss is the mean of the same per-token terms
    assert float(out.task_loss) == pytest.approx(float(alone.mean()), rel=1e-5)


@pytest.mark.parametrize(
    "ours, hf, kwargs",
    [
        ("constant", "constant_with_warmup", {}),
        ("linear", "linear", {}),
        ("cosine", "cosine", {}),
        ("cosine", "cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ],
)
def test_lr_schedule_equals_transformers(ours, hf, kwargs):
    from transformers import get_scheduler

    total, warmup = 40, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(
        hf, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs
    )
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [lr_factor(s, ours, warmup, total, kwargs.get("min_lr_rate", 0.0)) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_lr_schedule_formula_at_chosen_steps():
    assert lr_warmup_steps(500, None, 0.03) == 15 and lr_warmup_steps(500, 7, 0.5) == 7
    assert lr_factor(0, "cosine", 10, 110) == 0.0
    assert lr_factor(5, "linear", 10, 110) == 0.5
    assert lr_factor(10, "cosine", 10, 110) == 1.0
    assert lr_factor(60, "cosine", 10, 110) == pytest.approx(0.5)
    assert lr_factor(60, "linear", 10, 110, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(109, "cosine", 10, 110, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100))
    )
    assert lr_factor(99, "constant", 10, 110) == 1.0


def test_a_long_document_is_read_and_tokenized_in_pieces(tmp_path, tok, monkeypatch):
    """Bounded memory: a document (a file without blank lines) arrives in pieces, tokenized a
    slice at a time; nothing but the piece boundaries changes, and EOS ends each document once."""
    from agiasi.data import files, tokenize

    monkeypatch.setattr(files, "DOC_PIECE_CHARS", 300)
    monkeypatch.setattr(tokenize, "TOKENIZE_CHARS", 200)
    lines = [f"{i}行目の文章です。設定を変えます。" for i in range(60)]
    p = tmp_path / "one_doc.txt"
    p.write_text("\n".join(lines) + "\n\n二つ目の文書。\n")
    recs = load_records(p)
    pieces = [r for r in recs if r["_where"].endswith("line 1")]
    assert len(pieces) > 3 and all(r.get("_continues") for r in pieces[:-1])
    assert not pieces[-1].get("_continues") and recs[-1]["text"] == "二つ目の文書。"
    assert "".join(r["text"] for r in pieces) == "\n".join(lines)
    exs = tokenize_records(recs, tok, 10_000)
    ids = [int(t) for e in exs for t in e.input_ids]
    assert ids.count(tok.eos_token_id) == 2  # one per document, none between pieces
    whole = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
    # only the slice boundaries differ (a leading "▁" each): a handful of tokens at most
    assert abs(ids.index(tok.eos_token_id) - len(whole)) <= len(pieces) * 3
    # the pieces of one document stay on one side of a validation split
    train, held = split_eval(recs, 0.5, seed=0)
    assert {r["_where"] for r in train}.isdisjoint({r["_where"] for r in held})


def test_non_regular_files_and_late_nul_bytes_are_refused(tmp_path):
    with pytest.raises(AgiasiError, match="is not a regular file"):
        load_records("/dev/zero")
    p = tmp_path / "late_nul.txt"
    p.write_bytes(("本文です。\n" * 3000).encode() + b"x\x00y\n")
    with pytest.raises(AgiasiError, match=r"line 3001 holds NUL bytes"):
        load_records(p)
    bom_only = tmp_path / "bom.txt"
    bom_only.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(AgiasiError, match="the dataset is empty"):
        load_records(bom_only)
