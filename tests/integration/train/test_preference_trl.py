"""DPO and ORPO checked against TRL (the peer implementation), pinned to the version in
``pyproject.toml``'s test extra: the same tiny model, the same LoRA weights, the same pairs.

agiasi's DPO loss, rewards and log-probs must equal ``trl.DPOTrainer``'s on one batch, with the
reference as TRL builds it for a trained adapter (a frozen copy, "ref") and as TRL precomputes
it (``precompute_ref_log_probs``). ORPO's odds-ratio term must equal ``trl.experimental.orpo``'s
on the same token ids; its NLL differs by design (TRL counts the prompt's tokens too, agiasi and
the ORPO paper only the answer's), and the test checks that the whole difference is that.

Tolerance: fp32 on the CPU, sums of ~100 log-probs of magnitude ~5 each computed by two
different kernels (TRL's fused head vs agiasi's chunked one): float32's 2⁻²⁴ relative
rounding over ~10³ accumulated terms gives ~1e-4 absolute on a sum of ~100, so 1e-5 of the
magnitude (the issue's bound) with an absolute floor of 1e-5 for values near 0.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

trl = pytest.importorskip("trl")

RECORDS = [
    {
        "prompt": [{"role": "user", "content": "日本の首都はどこですか？"}],
        "chosen": [{"role": "assistant", "content": "日本の首都は東京です。"}],
        "rejected": [{"role": "assistant", "content": "大阪です。"}],
    },
    {
        "prompt": [{"role": "user", "content": "富士山の高さは？"}],
        "chosen": [{"role": "assistant", "content": "富士山は3776メートルです。"}],
        "rejected": [{"role": "assistant", "content": "知りません。"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "あなたは丁寧なアシスタントです。"},
            {"role": "user", "content": "猫について一言。"},
        ],
        "chosen": [{"role": "assistant", "content": "猫は気まぐれで、かわいい動物です。"}],
        "rejected": [{"role": "assistant", "content": "犬。"}],
    },
]


def close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    tol = 1e-5 * max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= tol, f"{what}: agiasi {a.tolist()} vs TRL {b.tolist()}"


def _perturb(model, generator_seed: int, part: str) -> None:
    """Deterministic, nonzero LoRA weights of the ``default`` adapter (what SFT leaves)."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".default." in name and part in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _wrapper():
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper
    from agiasi.shipped import tiny_model_path

    torch.manual_seed(0)
    w = AGIASI_SO8T_Wrapper(
        str(tiny_model_path()),
        device="cpu",
        quantization="none",
        dtype="float32",
        soul=False,
        lora_dropout=0.0,
    )
    _perturb(w.base_model, 1, "lora_B")  # the starting adapter: as if trained by SFT
    return w


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from agiasi.shipped import tiny_model_path

    return AutoTokenizer.from_pretrained(str(tiny_model_path()))


@pytest.fixture(scope="module")
def ours(tok):
    """agiasi's figures: the reference copied at the start, then the policy moved."""
    from agiasi.data.batching import collate_pairs
    from agiasi.data.preference import to_pair, tokenize_pairs
    from agiasi.train.objectives import dpo_loss
    from agiasi.train.reference import Reference

    w = _wrapper()
    pairs = tokenize_pairs([to_pair(r, f"pair {i}") for i, r in enumerate(RECORDS)], tok, 10**6)
    batch = collate_pairs(pairs, tok.pad_token_id)
    ref = Reference(w, adapter_trained=True)
    _perturb(w.base_model, 2, "lora_A")  # the policy after some steps
    w.train()
    ref_c, ref_r = ref.logps(w, batch)
    ref.precompute(w, pairs, tok.pad_token_id, 2, "train", lambda m: None)
    logps, counts, _ = w.sequence_logps(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    b = len(pairs)
    loss, logged = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, counts[:b], counts[b:], 0.1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in w.base_model.named_parameters() if p.grad is not None}
    return {
        "pairs": pairs,
        "batch": batch,
        "loss": loss.item(),
        "logged": {k: v.item() for k, v in logged.items()},
        "ref": (ref_c, ref_r),
        "table": ref.tables["train"],
        "logps": logps.detach(),
        "counts": counts,
        "grads": grads,
    }


def _dpo_trainer(tok, tmp_path, precompute: bool):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    w = _wrapper()
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=len(RECORDS),
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        disable_dropout=True,
        precompute_ref_log_probs=precompute,
    )
    # a PEFT model with a trained adapter: TRL copies it into a frozen "ref" adapter
    trainer = DPOTrainer(
        model=w.base_model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=tok,
    )
    _perturb(w.base_model, 2, "lora_A")
    trainer.model.train()
    examples = [trainer.train_dataset[i] for i in range(len(RECORDS))]
    return trainer, examples


@pytest.mark.parametrize("precompute", [False, True], ids=["copied-adapter", "precomputed"])
def test_dpo_equals_trl(tok, ours, tmp_path, precompute):
    trainer, examples = _dpo_trainer(tok, tmp_path, precompute)
    # the same tokens: TRL's own tokenization of the conversational pairs is agiasi's
    for ex, pair in zip(examples, ours["pairs"], strict=True):
        assert ex["prompt_ids"] + ex["chosen_ids"] == pair.chosen_ids
        assert ex["prompt_ids"] + ex["rejected_ids"] == pair.rejected_ids
        assert len(ex["prompt_ids"]) == pair.prompt_tokens
    if precompute:
        table_c, table_r = ours["table"]
        close(table_c, [ex["ref_chosen_logps"] for ex in examples], "precomputed ref chosen")
        close(table_r, [ex["ref_rejected_logps"] for ex in examples], "precomputed ref rejected")
    batch = trainer.data_collator(examples)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    close(ours["loss"], loss.item(), "loss")
    assert abs(ours["loss"] - 0.6931) > 1e-3, "the policy must differ from the reference here"
    close(ours["logged"]["rewards/chosen"], m["rewards/chosen"], "rewards/chosen")
    close(ours["logged"]["rewards/rejected"], m["rewards/rejected"], "rewards/rejected")
    close(ours["logged"]["margin"], m["rewards/margins"], "margin")
    close(ours["logged"]["accuracy"], m["rewards/accuracies"], "accuracy")
    close(ours["logged"]["logps/chosen"], m["logps/chosen"], "logps/chosen")
    close(ours["logged"]["logps/rejected"], m["logps/rejected"], "logps/rejected")
    # and the same gradient of every LoRA weight
    theirs = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(theirs) == set(ours["grads"])
    for n, g in theirs.items():
        close(ours["grads"][n], g, f"grad {n}")


def test_orpo_odds_ratio_equals_trl_and_nll_differs_only_by_the_prompt(tok, ours, tmp_path):
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    from agiasi.train.objectives import orpo_loss

    batch, logps, counts = ours["batch"], ours["logps"], ours["counts"]
    b = len(ours["pairs"])
    lam = 0.1
    loss, logged = orpo_loss(logps[:b], logps[b:], counts[:b], counts[b:], lam)
    # TRL's functions on the same inputs: its per-token average log-probs from the logits ...
    w = _wrapper()
    _perturb(w.base_model, 2, "lora_A")
    w.eval()
    with torch.no_grad():
        out = w(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    avg = ORPOTrainer.get_batch_logps(out.logits, labels, average_log_prob=True)
    close(logged["logps/chosen"], avg[:b].mean(), "mean log-prob per token, chosen")
    close(logged["logps/rejected"], avg[b:].mean(), "mean log-prob per token, rejected")
    # ... and its odds-ratio loss (a method of the trainer that reads beta and the device)
    host = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, r_c, r_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(host, avg[:b], avg[b:])
    close(logged["log_odds_ratio"], ratio, "log σ(log odds)")
    close(logged["log_odds_chosen"], log_odds, "log odds")
    close(logged["rewards/chosen"], r_c.mean(), "rewards/chosen")
    close(logged["rewards/rejected"], r_r.mean(), "rewards/rejected")
    # TRL's NLL: cross-entropy over every real token of the chosen rows, prompt included
    full = batch["input_ids"][:b].masked_fill(batch["attention_mask"][:b] == 0, -100)
    trl_nll = torch.nn.functional.cross_entropy(
        out.logits[:b, :-1].reshape(-1, out.logits.shape[-1]), full[:, 1:].reshape(-1)
    )
    trl_loss = trl_nll - losses.mean()
    close(loss.item() + (trl_nll - logged["nll"]).item(), trl_loss, "ORPO loss but for the NLL")
    assert abs(trl_nll.item() - logged["nll"].item()) > 1e-3  # by design: the prompt's tokens
