"""The preference objectives' math (agiasi.train.objectives): DPO (sigmoid, cDPO smoothing,
IPO) and ORPO against their formulas written out independently, in float64, plus the
fixed points every implementation must have. The cross-check against TRL's trainers on a real
model is tests/integration/train/test_preference_trl.py."""

from __future__ import annotations

import math

import pytest
import torch

from agiasi.train.objectives import dpo_loss, log1mexp, orpo_loss

G = torch.Generator().manual_seed(3)
C, R = -torch.rand(5, generator=G, dtype=torch.float64) * 80, -torch.rand(5, generator=G, dtype=torch.float64) * 80  # fmt: skip
RC, RR = C + torch.randn(5, generator=G, dtype=torch.float64), R + torch.randn(5, generator=G, dtype=torch.float64)  # fmt: skip
NC, NR = torch.tensor([12, 30, 7, 19, 4]), torch.tensor([9, 2, 30, 11, 5])


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_at_the_reference_is_log_2_with_zero_rewards():
    loss, m = dpo_loss(C, R, C, R, NC, NR, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["accuracy"] == 0


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_dpo_sigmoid_and_cdpo_by_the_formula(beta, eps):
    loss, m = dpo_loss(C, R, RC, RR, NC, NR, beta=beta, label_smoothing=eps)
    want = []
    for i in range(5):
        z = beta * ((C[i] - RC[i]) - (R[i] - RR[i])).item()
        want.append(-(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z)))
    assert loss.item() == pytest.approx(sum(want) / 5, rel=1e-12)
    r_c, r_r = beta * (C - RC), beta * (R - RR)
    assert m["rewards/chosen"].item() == pytest.approx(r_c.mean().item(), rel=1e-12)
    assert m["margin"].item() == pytest.approx((r_c - r_r).mean().item(), rel=1e-12)
    assert m["accuracy"].item() == pytest.approx((r_c > r_r).double().mean().item())
    assert m["logps/chosen"].item() == pytest.approx(C.mean().item())


def test_ipo_is_the_squared_length_averaged_margin():
    beta = 0.2
    loss, _ = dpo_loss(C, R, RC, RR, NC, NR, beta=beta, loss_type="ipo")
    want = sum(
        (((C[i] - RC[i]) / NC[i] - (R[i] - RR[i]) / NR[i]).item() - 1 / (2 * beta)) ** 2
        for i in range(5)
    )
    assert loss.item() == pytest.approx(want / 5, rel=1e-12)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-12, -1e-6, -0.5, -0.7, -1.0, -30.0], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(want, rel=1e-12)


def test_orpo_by_the_formula():
    lam = 0.25
    loss, m = orpo_loss(C, R, NC, NR, lam)
    nll = -C.sum().item() / NC.sum().item()
    terms = []
    for i in range(5):
        pc, pr = math.exp(C[i].item() / NC[i].item()), math.exp(R[i].item() / NR[i].item())
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        terms.append(math.log(sig(log_odds)))
    assert m["nll"].item() == pytest.approx(nll, rel=1e-12)
    assert m["log_odds_ratio"].item() == pytest.approx(sum(terms) / 5, rel=1e-10)
    assert loss.item() == pytest.approx(nll - lam * sum(terms) / 5, rel=1e-10)


def test_gradients_push_chosen_up_and_rejected_down():
    # IPO pushes so only below its target margin 1/(2β) = 5 nats a token; these pairs are
    for fn in (
        lambda c, r: dpo_loss(c, r, RC, RR, NC, NR, beta=0.1)[0],
        lambda c, r: dpo_loss(c, r, RC, RR, NC, NR, beta=0.1, loss_type="ipo")[0],
        lambda c, r: orpo_loss(c, r, NC, NR, 0.1)[0],
    ):
        c, r = C.clone().requires_grad_(), R.clone().requires_grad_()
        fn(c, r).backward()
        assert (c.grad < 0).all() and (r.grad > 0).all()
