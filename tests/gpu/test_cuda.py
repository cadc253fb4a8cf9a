"""GPU tier (skipped without CUDA): the NF4 path on a real card, first step finite from identity
init (the NaN the design note hit on the GPU), offloaded checkpointing equal to the standard one."""

import pytest
import torch

from tests.helpers import make_wrapper

pytestmark = pytest.mark.gpu


def test_nf4_first_step_finite_on_cuda(tiny_phi3):
    pytest.importorskip("bitsandbytes")
    w = make_wrapper(
        tiny_phi3, quantization="nf4", dtype="auto", device="cuda", gradient_checkpointing=True
    ).train()
    ids = torch.randint(3, 128, (2, 64), device="cuda")
    out = w(ids, labels=ids, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in w.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_offload_equals_standard_checkpointing_on_cuda(tiny_phi3):
    losses = []
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    for offload in (False, True):
        w = make_wrapper(
            tiny_phi3,
            device="cuda",
            gradient_checkpointing=True,
            offload_activations=offload,
            lora_dropout=0.1,
        ).train()
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        losses.append(w(ids, labels=ids, return_logits=False).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_trainer_features_on_cuda(tmp_path):
    """The new trainer on a card: NF4, packed chat rows, a held-out split, a decaying LR; the
    step folders finite (Adam's step counts live on the CPU: the finiteness check must cope)."""
    import json

    from agiasi.cli import main
    from agiasi.shipped import tiny_model_path
    from tests.unit.test_data import MESSAGES, PC_MESSAGES

    data = tmp_path / "chat.jsonl"
    recs = [{"messages": MESSAGES}, {"messages": PC_MESSAGES}] * 20
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    run = tmp_path / "run"
    rc = main(["train", "--base-model", str(tiny_model_path()), "--dataset", str(data),
               "--output-dir", str(run), "--max-steps", "6", "--save-steps", "3",
               "--max-length", "256", "--batch-size", "2", "--packing", "--eval-split", "0.2",
               "--lr-scheduler", "cosine", "--no-progress"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in rows if "eval_loss" in r)
    assert json.loads((run / "best.json").read_text())["step"] in (3, 6)
    assert rows[-1]["peak_mem_gib"] > 0
