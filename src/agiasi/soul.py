r"""The soul: a gated orthogonal rotation between the final hidden state and the LM head.

Math (PyTorch row-vector convention, ``F.linear(h, M) = h Mᵀ``)::

    thought = R h                 # R ∈ O(H), applied as  h Rᵀ  on row vectors
    g       = sigmoid(α)          # the alpha gate, a scalar
    mixed   = h + g · (R h − h)   # mix "convex" (default): (1 − g)·h + g·R h
    mixed   = h + g · R h         # mix "residual": the design note's formula
    logits  = W mixed (+ b)

Why two mixes. The note's residual mix ``h + g·R h`` equals ``(1 + g)·h`` while R is near the
identity: once the gate opens (σ(φ) ≈ 0.83) every logit is scaled by ≈ 1.83, which by itself
raises the base model's perplexity several-fold, and the LoRA spends its steps undoing that
scale. The convex mix equals the base model at R = I for *every* α — the gate opening costs
nothing and only a rotation that helps changes the output. Same rotation, gate, annealing,
orthogonality monitor and exact fold; measured equal to the no-soul control.

Because R and g do not depend on the input, either mix folds *exactly* into the head::

    residual:  W' = W + g · W R            convex:  W' = W + g · W (R − I)

(computed in float64, then cast back); a bias ``b`` is unchanged. That is what makes the
exported model a plain model that llama.cpp runs at zero extra cost.

Rotation kinds:

* ``so8`` (default): block-diagonal with H/8 blocks, each ``exp(A_b)`` for a skew-symmetric
  8×8 ``A_b`` built from 28 free parameters. ``exp`` of a skew-symmetric matrix lies in SO(8),
  so det = +1 and RᵀR = I hold by construction; all-zero parameters give R = I (identity init:
  the model starts out as the base model).
* ``full``: the design note's literal ``nn.utils.parametrizations.orthogonal(nn.Linear(H, H))``
  — a dense element of O(H) (≈H²/2 effective parameters, costly). Init ``identity`` or
  ``random`` (the note's behaviour, which scrambles the output once the gate opens).

Orthogonality monitor: ``‖RᵀR − I‖_F``, added to the loss with weight 0.1 as in the note. With
exact parametrizations it stays ≈ 0, and at identity init it *is* 0 — where the Frobenius norm's
derivative is infinite (``d sqrt(s)/ds`` at s = 0), so a naive ``torch.linalg.matrix_norm``
turns every gradient into NaN on the first step. :func:`safe_frobenius` keeps the value and
gives the subgradient 0 at exactly 0. ``‖R − I‖_F`` (logged, not trained) says how far the
rotation has moved from where it started.

Phase status (the note's ``get_phase_status``): 🔵 Stable while the gate is nearly shut
(g < 0.05), 🟢 Golden Ratio Reached when |α − φ| < 0.01, 🟣 Beyond past φ, 🟡 Transitioning
in between.

The measurements behind these choices: docs/DESIGN.md, sections 1–2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from agiasi.errors import AgiasiError

PHI = (1.0 + math.sqrt(5.0)) / 2.0
"""The golden ratio φ, the note's target for α."""

RotationKind = Literal["so8", "full"]
RotationInit = Literal["identity", "random"]
AlphaMode = Literal["schedule", "learned"]
SoulMix = Literal["convex", "residual"]
ROTATION_KINDS: tuple[str, ...] = get_args(RotationKind)
ROTATION_INITS: tuple[str, ...] = get_args(RotationInit)
ALPHA_MODES: tuple[str, ...] = get_args(AlphaMode)
SOUL_MIXES: tuple[str, ...] = get_args(SoulMix)
LEGACY_MIX = "residual"
"""The mix of a checkpoint written before the option existed: the note's formula."""

_BLOCK = 8
_TRIU = torch.triu_indices(_BLOCK, _BLOCK, offset=1)  # 28 (row, col) pairs


@dataclass
class SoulConfig:
    """Everything that defines a soul; captured in checkpoints as ``soul.json``."""

    hidden_size: int
    rotation: RotationKind = "so8"
    init: RotationInit = "identity"
    alpha_mode: AlphaMode = "schedule"
    alpha_start: float = -5.0
    ortho_weight: float = 0.1
    mix: SoulMix = "convex"

    def validate(self) -> None:
        if self.mix not in SOUL_MIXES:
            raise AgiasiError(
                f"unknown soul mix {self.mix!r}; choose one of {', '.join(SOUL_MIXES)}"
            )
        if self.rotation not in ROTATION_KINDS:
            raise AgiasiError(
                f"unknown rotation kind {self.rotation!r}; choose one of {', '.join(ROTATION_KINDS)}"
            )
        if self.init not in ROTATION_INITS:
            raise AgiasiError(
                f"unknown rotation init {self.init!r}; choose one of {', '.join(ROTATION_INITS)}"
            )
        if self.alpha_mode not in ALPHA_MODES:
            raise AgiasiError(
                f"unknown alpha mode {self.alpha_mode!r}; choose one of {', '.join(ALPHA_MODES)}"
            )
        if self.hidden_size <= 0:
            raise AgiasiError(f"hidden size must be positive, got {self.hidden_size}")
        if self.rotation == "so8" and self.hidden_size % _BLOCK != 0:
            raise AgiasiError(
                f"rotation 'so8' needs a hidden size divisible by 8, got {self.hidden_size} "
                f"({self.hidden_size} % 8 = {self.hidden_size % 8}); use --rotation full"
            )


class SO8BlockRotation(nn.Module):
    """Block-diagonal rotation: H/8 independent SO(8) blocks, ``R_b = exp(A_b − A_bᵀ)``.

    Called on ``h`` of shape (..., H) it returns ``h Rᵀ`` — the ``nn.Linear`` convention, so it
    is a drop-in for the note's ``so8_rotation`` module.
    """

    def __init__(self, hidden_size: int, init: str = "identity"):
        super().__init__()
        if hidden_size % _BLOCK != 0:
            raise AgiasiError(
                f"rotation 'so8' needs a hidden size divisible by 8, got {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.n_blocks = hidden_size // _BLOCK
        params = torch.zeros(self.n_blocks, _TRIU.shape[1])
        if init == "random":
            params.normal_(0.0, 1.0)
        self.skew_params = nn.Parameter(params)
        # the index on the parameters' device: a CPU index costs a blocking copy every step
        self.register_buffer("_triu", _TRIU.clone(), persistent=False)

    def blocks(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rotation blocks, (H/8, 8, 8).

        ``matrix_exp`` runs in float64 — H/8 tiny 8×8 blocks cost nothing — so the blocks are
        orthogonal to float32 precision even far from the identity (fp32 ``matrix_exp`` drifts to
        ~3e-6 there).
        """
        p = self.skew_params.to(torch.float64)
        upper = p.new_zeros(self.n_blocks, _BLOCK, _BLOCK)
        upper[:, self._triu[0], self._triu[1]] = p
        return torch.linalg.matrix_exp(upper - upper.transpose(-1, -2)).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (H, H) matrix R — for folding and inspection, never for the forward pass."""
        return self.dense(torch.float32)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.block_diag(*self.blocks(dtype).unbind(0))

    def forward(self, h: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        r = (self.blocks() if blocks is None else blocks).to(h.dtype)
        hb = h.reshape(*h.shape[:-1], self.n_blocks, _BLOCK)
        # out[..., b, i] = Σ_j R[b, i, j] h[..., b, j]  ==  (h Rᵀ) restricted to block b
        out = torch.einsum("...bj,bij->...bi", hb, r)
        return out.reshape(h.shape)


def full_rotation(hidden_size: int, init: str = "identity") -> nn.Module:
    """The note's dense rotation: ``orthogonal(nn.Linear(H, H, bias=False))``.

    ``identity`` assigns R = I through the parametrization (its right-inverse stores it as the
    base), ``random`` keeps the Linear's random init orthogonalised — the note's behaviour.
    """
    layer = nn.utils.parametrizations.orthogonal(nn.Linear(hidden_size, hidden_size, bias=False))
    if init == "identity":
        with torch.no_grad():
            layer.weight = torch.eye(hidden_size)
    return layer


def rotation_matrix(rotation: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense R of either kind."""
    if isinstance(rotation, SO8BlockRotation):
        return rotation.dense(dtype)
    return rotation.weight.to(dtype)


def safe_frobenius(d: torch.Tensor) -> torch.Tensor:
    """‖d‖_F with a finite gradient everywhere (subgradient 0 at d = 0).

    The double ``where`` keeps sqrt away from 0 in the backward pass without changing the
    value anywhere — unlike ``sqrt(s + eps)``.
    """
    s = (d.float() ** 2).sum()
    positive = s > 0
    safe_s = torch.where(positive, s, torch.ones_like(s))
    return torch.where(positive, safe_s.sqrt(), torch.zeros_like(s))


def orthogonality_error(rotation: nn.Module, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """‖RᵀR − I‖_F. For ``so8`` it is computed per block (block-diagonal R makes it exact).

    ``prepared`` is what :meth:`Soul.prepare` returned, to reuse one ``matrix_exp`` per step.
    """
    if isinstance(rotation, SO8BlockRotation):
        r = rotation.blocks() if prepared is None else prepared
        eye = torch.eye(_BLOCK, device=r.device, dtype=r.dtype)
        return safe_frobenius(r.transpose(-1, -2) @ r - eye)
    r = rotation_matrix(rotation) if prepared is None else prepared.float()
    eye = torch.eye(r.shape[0], device=r.device, dtype=r.dtype)
    return safe_frobenius(r.T @ r - eye)


def phase_status(alpha: float) -> str:
    """The note's phase label for a given α (a non-finite α has no phase: refused)."""
    if not isinstance(alpha, (int, float, torch.Tensor)) or not math.isfinite(float(alpha)):
        raise AgiasiError(f"phase_status: α must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    gate = float(gate_of(alpha))
    if abs(alpha - PHI) < 0.01:
        return "🟢 Golden Ratio Reached"
    if alpha > PHI:
        return "🟣 Beyond"
    if gate < 0.05:
        return "🔵 Stable"
    return "🟡 Transitioning"


def gate_of(alpha: float | torch.Tensor) -> torch.Tensor:
    """g = sigmoid(α), in float64 (what the fold uses)."""
    return torch.sigmoid(torch.as_tensor(alpha, dtype=torch.float64))


def fold_into(
    head_weight: torch.Tensor,
    rotation: torch.Tensor,
    gate: float | torch.Tensor,
    mix: SoulMix,
) -> torch.Tensor:
    """Pure fold: ``W' = W + g · W R`` (residual) or ``W + g · W (R − I)`` (convex).

    Computed in float64 and returned in ``head_weight``'s dtype.

    Args:
        head_weight: LM head weight W, (vocab, H). Must be a real tensor (dequantize first).
        rotation: dense R, (H, H).
        gate: g = sigmoid(α).
        mix: ``convex`` or ``residual`` (see the module docstring).
    """
    if mix not in SOUL_MIXES:
        raise AgiasiError(f"unknown soul mix {mix!r}; choose one of {', '.join(SOUL_MIXES)}")
    for name, t in (("head weight", head_weight), ("rotation", rotation)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise AgiasiError(
                f"cannot fold: the {name} must be a floating-point tensor, got {got} "
                "(dequantize a quantized head first)"
            )
    if head_weight.ndim != 2 or rotation.shape != (head_weight.shape[1], head_weight.shape[1]):
        raise AgiasiError(
            f"cannot fold: head weight {tuple(head_weight.shape)} and rotation "
            f"{tuple(rotation.shape)} do not match (expected (vocab, H) and (H, H))"
        )
    w = head_weight.detach().to(torch.float64)
    r = rotation.detach().to(device=w.device, dtype=torch.float64)
    if mix == "convex":
        r = r - torch.eye(r.shape[0], dtype=torch.float64, device=w.device)
    g = torch.as_tensor(gate, dtype=torch.float64, device=w.device)
    return (w + g * (w @ r)).to(head_weight.dtype)


class Soul(nn.Module):
    """Rotation R + alpha gate: ``forward(h) = h + sigmoid(α)·(R h − h)`` (convex) or
    ``h + sigmoid(α)·R h`` (residual)."""

    def __init__(self, config: SoulConfig):
        super().__init__()
        config.validate()
        self.config = config
        if config.rotation == "so8":
            self.rotation: nn.Module = SO8BlockRotation(config.hidden_size, config.init)
        else:
            self.rotation = full_rotation(config.hidden_size, config.init)
        # In `schedule` mode α is set every step by the annealing schedule, not by the optimizer.
        self.alpha = nn.Parameter(
            torch.tensor(float(config.alpha_start)),
            requires_grad=config.alpha_mode == "learned",
        )

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha.float())

    def rotation_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense R (H, H)."""
        return rotation_matrix(self.rotation, dtype)

    def prepare(self) -> torch.Tensor:
        """The rotation's current value (so8: the (H/8, 8, 8) blocks; full: R), computed once
        and shared by :meth:`forward` and :meth:`ortho_loss` within a training step."""
        if isinstance(self.rotation, SO8BlockRotation):
            return self.rotation.blocks()
        return self.rotation.weight

    def forward(self, h: torch.Tensor, prepared: torch.Tensor | None = None) -> torch.Tensor:
        """``h + g·(R h − h)`` (convex) or ``h + g·R h`` (residual)."""
        if prepared is None:
            thought = self.rotation(h)
        elif isinstance(self.rotation, SO8BlockRotation):
            thought = self.rotation(h, prepared)
        else:
            thought = F.linear(h, prepared.to(h.dtype))
        if self.config.mix == "convex":
            thought = thought - h
        return h + self.gate().to(h.dtype) * thought

    def ortho_loss(self, prepared: torch.Tensor | None = None) -> torch.Tensor:
        return orthogonality_error(self.rotation, prepared)

    @torch.no_grad()
    def rotation_distance(self) -> float:
        """‖R − I‖_F: how far the rotation has moved from the identity (logged per step)."""
        return float(self.rotation_distance_tensor())

    @torch.no_grad()
    def rotation_distance_tensor(self) -> torch.Tensor:
        """:meth:`rotation_distance` as a device tensor (read with the step's other values).

        For ``so8`` the blocks suffice: R − I is zero outside them."""
        if isinstance(self.rotation, SO8BlockRotation):
            r = self.rotation.blocks(torch.float64)
        else:
            r = self.rotation.weight.detach().double()
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        return torch.linalg.vector_norm(r - eye)

    def phase(self) -> str:
        return phase_status(float(self.alpha.detach()))

    @torch.no_grad()
    def fold_into(self, head_weight: torch.Tensor) -> torch.Tensor:
        """Head weight with this soul folded in (see :func:`fold_into`)."""
        return fold_into(
            head_weight, self.rotation_matrix(torch.float64), gate_of(self.alpha), self.config.mix
        )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class SoulHead(nn.Module):
    """The LM head with the soul in front: ``head(soul(h))``.

    It replaces the causal LM's output embedding module, so every HF code path — the model's own
    forward, ``generate`` with its KV cache, ``logits_to_keep`` slicing — sees the soul without
    any hook. The wrapped head keeps its own weight (and its tie to the input embedding, if any).
    """

    def __init__(self, head: nn.Module, soul: Soul):
        super().__init__()
        self.head = head
        self.soul = soul

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.soul(h))
