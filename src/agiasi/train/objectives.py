"""The training objectives: what one micro-batch's loss is, per ``--method``.

The loop (:mod:`agiasi.train.loop`) is the same for every objective; an objective is a batch
shape and a loss. Every loss below adds the soul's orthogonality monitor as SFT does
(``+ w · ‖RᵀR − I‖_F``, ≈ 0 for an exact rotation).

**sft** — mean next-token cross-entropy over the trained tokens (the wrapper's own loss).

**dpo** (Rafailov et al. 2023) — a batch is B pairs as 2·B rows (chosen, then rejected). With
``log π(y|x)`` the summed log-probability of an answer's tokens under the policy and ``π_ref``
the same under the reference (the *starting* model: base + starting adapter + starting soul)::

    r_c = β (log π(y_c|x) − log π_ref(y_c|x))     r_r = β (log π(y_r|x) − log π_ref(y_r|x))
    sigmoid: L = −(1 − ε) log σ(r_c − r_r) − ε log σ(r_r − r_c)       (ε: --label-smoothing)
    ipo:     L = ((r_c/β)/|y_c| − (r_r/β)/|y_r| − 1/(2β))²

ε > 0 is conservative DPO (cDPO: the labels are taken to be flipped with probability ε). IPO's
log-ratios are averaged over each answer's tokens, as TRL does (agreed with the IPO authors).
Logged: ``rewards/chosen`` = mean r_c, ``rewards/rejected`` = mean r_r, ``margin`` = mean
(r_c − r_r), ``accuracy`` = the share of pairs with r_c > r_r, ``logps/chosen`` and
``logps/rejected`` = the policy's mean summed log-probabilities.

**orpo** (Hong et al. 2024) — no reference. With ``p̄ = exp(mean log-prob of an answer's
tokens)`` and ``odds(p̄) = p̄ / (1 − p̄)``::

    L = NLL(y_c) − λ · log σ(log odds(p̄_c) − log odds(p̄_r))

``NLL`` is the mean cross-entropy over the chosen answers' tokens. TRL's ORPO trainer also
counts the *prompt's* tokens in that NLL; the paper (its eq. 6) and this module count only the
answer's, as every other objective here does: the odds-ratio term is equal, the NLL differs by
design (``tests/unit/train/test_objectives.py`` measures both against TRL). Logged: ``nll``,
``log_odds_ratio`` (mean log σ(·)), ``log_odds_chosen`` (mean of its argument), rewards as TRL's
(λ · mean log-prob), ``margin``, ``accuracy``, ``logps/chosen``, ``logps/rejected`` (mean per
token, as ORPO scores them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["sft", "dpo", "orpo"]
DpoLoss = Literal["sigmoid", "ipo"]
METHODS = ("sft", "dpo", "orpo")
PREFERENCE_METHODS = ("dpo", "orpo")
_PAIR_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "margin",
    "accuracy",
    "logps/chosen",
    "logps/rejected",
)
# What each objective adds to a metrics line (beside loss, task_loss, ortho_loss).
OBJECTIVE_KEYS = {
    "sft": (),
    "dpo": _PAIR_KEYS,
    "orpo": ("nll", "log_odds_ratio", "log_odds_chosen", *_PAIR_KEYS),
}


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss of B pairs (summed log-probs of shape (B,)) and its logged figures."""
    chosen_ratio = chosen - ref_chosen.to(chosen.device)
    rejected_ratio = rejected - ref_rejected.to(rejected.device)
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.to(chosen.device).clamp_min(1) - (
            rejected_ratio / rejected_tokens.to(rejected.device).clamp_min(1)
        )
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    r_c, r_r = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    logged = {
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "margin": (r_c - r_r).mean(),
        "accuracy": (r_c > r_r).float().mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }
    return losses.mean(), logged


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, accurate at both ends (Mächler 2012): ``log(−expm1(x))``
    near 0, ``log1p(−exp(x))`` below −log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-x.exp()))


def orpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ORPO loss of B pairs (summed log-probs and token counts of shape (B,))."""
    n_c = chosen_tokens.to(chosen.device).to(chosen.dtype)
    n_r = rejected_tokens.to(rejected.device).to(rejected.dtype)
    mean_c, mean_r = chosen / n_c, rejected / n_r
    nll = -chosen.sum() / n_c.sum()
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    ratio = F.logsigmoid(log_odds)
    r_c, r_r = lam * mean_c.detach(), lam * mean_r.detach()
    logged = {
        "nll": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "margin": (r_c - r_r).mean(),
        "accuracy": (r_c > r_r).float().mean(),
        "logps/chosen": mean_c.detach().mean(),
        "logps/rejected": mean_r.detach().mean(),
    }
    return nll - lam * ratio.mean(), logged


def preference_loss(cfg, logps, counts, ref) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``--method``'s loss from 2·B rows' summed log-probs and token counts (chosen first) and
    the reference's (B,) pair (None for ORPO)."""
    b = logps.shape[0] // 2
    chosen, rejected = logps[:b], logps[b:]
    n_c, n_r = counts[:b], counts[b:]
    if cfg.method == "orpo":
        return orpo_loss(chosen, rejected, n_c, n_r, cfg.orpo_lambda)
    return dpo_loss(
        chosen, rejected, ref[0], ref[1], n_c, n_r, cfg.beta, cfg.dpo_loss, cfg.label_smoothing
    )
