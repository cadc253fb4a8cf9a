"""The soul's math: orthogonality, identity init, fold, safe ortho gradient, phases."""

import math

import pytest
import torch
import torch.nn.functional as F

from agiasi.errors import AgiasiError
from agiasi.soul import (
    PHI,
    SO8BlockRotation,
    Soul,
    SoulConfig,
    SoulHead,
    fold_into,
    orthogonality_error,
    phase_status,
)


def test_so8_blocks_are_special_orthogonal_for_random_parameters():
    torch.manual_seed(0)
    rot = SO8BlockRotation(64, init="random")
    with torch.no_grad():
        rot.skew_params.mul_(3.0)  # well away from identity
    blocks = rot.blocks().double()
    eye = torch.eye(8, dtype=torch.float64)
    assert (blocks.transpose(-1, -2) @ blocks - eye).abs().max() < 1e-6
    assert (torch.linalg.det(blocks) - 1.0).abs().max() < 1e-6
    # and the dense matrix is block diagonal: nothing outside the 8x8 blocks
    r = rot.weight
    mask = torch.block_diag(*[torch.ones(8, 8)] * 8).bool()
    assert r[~mask].abs().max() == 0
    assert rot.skew_params.numel() == 8 * 28


@pytest.mark.parametrize("kind", ["so8", "full"])
def test_identity_init_is_identity(kind):
    soul = Soul(SoulConfig(hidden_size=32, rotation=kind, mix="residual"))
    assert torch.allclose(soul.rotation_matrix(), torch.eye(32), atol=1e-6)
    h = torch.randn(2, 3, 32)
    # R = I, so mixed = (1 + g) h exactly as the note's formula says
    g = torch.sigmoid(torch.tensor(-5.0))
    assert torch.allclose(soul(h), (1 + g) * h, atol=1e-6)
    assert soul.rotation_distance() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["so8", "full"])
@pytest.mark.parametrize("alpha", [-5.0, 0.0, PHI, 4.0])
def test_convex_mix_is_the_base_at_identity_for_every_alpha(kind, alpha):
    """The default mix costs nothing while R = I, however far the gate is open."""
    soul = Soul(SoulConfig(hidden_size=32, rotation=kind))
    assert soul.config.mix == "convex"
    with torch.no_grad():
        soul.alpha.fill_(alpha)
    h = torch.randn(2, 3, 32)
    assert torch.allclose(soul(h), h, atol=1e-6)
    residual = Soul(SoulConfig(hidden_size=32, rotation=kind, mix="residual"))
    with torch.no_grad():
        residual.alpha.fill_(alpha)
    assert torch.allclose(residual(h), (1 + torch.sigmoid(torch.tensor(alpha))) * h, atol=1e-6)


def test_convex_mix_is_the_convex_combination_of_h_and_rh():
    torch.manual_seed(0)
    soul = Soul(SoulConfig(hidden_size=16, init="random"))
    with torch.no_grad():
        soul.alpha.fill_(0.3)
    h = torch.randn(4, 16)
    g = torch.sigmoid(torch.tensor(0.3))
    want = (1 - g) * h + g * F.linear(h, soul.rotation_matrix())
    assert torch.allclose(soul(h), want, atol=1e-6)
    r = soul.rotation_matrix(torch.float64)
    assert soul.rotation_distance() == pytest.approx(
        float(torch.linalg.matrix_norm(r - torch.eye(16, dtype=torch.float64))), rel=1e-9
    )


def test_module_call_is_linear_convention():
    """so8_rotation(h) == h Rᵀ == F.linear(h, R), like nn.Linear."""
    torch.manual_seed(0)
    rot = SO8BlockRotation(16, init="random")
    h = torch.randn(5, 16)
    assert torch.allclose(rot(h), F.linear(h, rot.weight), atol=1e-6)


def test_so8_needs_hidden_divisible_by_8():
    with pytest.raises(AgiasiError, match="divisible by 8"):
        Soul(SoulConfig(hidden_size=36, rotation="so8"))
    Soul(SoulConfig(hidden_size=36, rotation="full"))  # full works for any H


@pytest.mark.parametrize("mix", ["convex", "residual"])
@pytest.mark.parametrize("kind", ["so8", "full"])
@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_equals_soul_then_head(kind, bias, mix):
    torch.manual_seed(0)
    h_dim, vocab = 32, 50
    soul = Soul(SoulConfig(hidden_size=h_dim, rotation=kind, init="random", mix=mix))
    with torch.no_grad():
        soul.alpha.fill_(0.9)
    head = torch.nn.Linear(h_dim, vocab, bias=bias)
    x = torch.randn(3, 7, h_dim)
    want = SoulHead(head, soul)(x)
    folded = fold_into(head.weight, soul.rotation_matrix(), soul.gate(), mix)
    assert torch.allclose(folded, soul.fold_into(head.weight), atol=1e-6)
    got = F.linear(x, folded, head.bias)
    assert (got - want).abs().max() <= 1e-5
    # a fold that forgot the gate or the rotation would not match
    assert (F.linear(x, head.weight, head.bias) - want).abs().max() > 1e-2


def test_fold_into_is_pure_and_keeps_dtype():
    w = torch.randn(10, 8, dtype=torch.bfloat16)
    before = w.clone()
    r = torch.linalg.qr(torch.randn(8, 8))[0]
    out = fold_into(w, r, 0.5, "residual")
    assert out.dtype == torch.bfloat16
    assert torch.equal(w, before)
    ref = (w.double() + 0.5 * w.double() @ r.double()).to(torch.bfloat16)
    assert torch.equal(out, ref)
    convex = fold_into(w, r, 0.5, "convex")
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.equal(convex, (w.double() + 0.5 * w.double() @ (r.double() - eye)).to(w.dtype))


def test_fold_into_rejects_mismatched_shapes():
    with pytest.raises(AgiasiError, match="cannot fold"):
        fold_into(torch.randn(10, 8), torch.eye(6), 0.5, "convex")
    with pytest.raises(AgiasiError, match="unknown soul mix 'sum'"):
        fold_into(torch.randn(10, 8), torch.eye(8), 0.5, "sum")


@pytest.mark.parametrize("kind", ["so8", "full"])
def test_ortho_gradient_finite_at_exact_orthogonality(kind):
    soul = Soul(SoulConfig(hidden_size=16, rotation=kind, alpha_mode="learned"))
    # The pitfall: the naive norm sqrt(sum(d²)) of an exactly-zero matrix has a NaN gradient.
    p = torch.zeros(4, 4, requires_grad=True)
    torch.sqrt((p**2).sum()).backward()
    assert torch.isnan(p.grad).all()
    # Ours: same value (0 at identity), finite gradient.
    loss = 0.1 * soul.ortho_loss() + soul(torch.randn(2, 16)).sum()
    assert float(soul.ortho_loss()) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    for name, param in soul.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_ortho_value_matches_definition_away_from_zero():
    soul = Soul(SoulConfig(hidden_size=8, rotation="so8"))
    r = torch.randn(8, 8)
    ref = torch.linalg.matrix_norm(r.T @ r - torch.eye(8))

    class Fake(torch.nn.Module):
        weight = r

    assert torch.allclose(orthogonality_error(Fake()), ref)
    assert soul is not None


def test_phase_status_bands():
    assert phase_status(-5.0) == "🔵 Stable"
    assert phase_status(0.0) == "🟡 Transitioning"
    assert phase_status(PHI) == "🟢 Golden Ratio Reached"
    assert phase_status(PHI + 0.005) == "🟢 Golden Ratio Reached"
    assert phase_status(2.5) == "🟣 Beyond"
    # the stable band ends where the gate reaches 0.05
    edge = math.log(0.05 / 0.95)
    assert phase_status(edge - 1e-3) == "🔵 Stable"
    assert phase_status(edge + 1e-3) == "🟡 Transitioning"


def test_alpha_modes():
    sched = Soul(SoulConfig(hidden_size=8, alpha_mode="schedule"))
    learned = Soul(SoulConfig(hidden_size=8, alpha_mode="learned", alpha_start=-2.0))
    assert not sched.alpha.requires_grad
    sched.alpha.fill_(1.0)  # the note's loop does exactly this
    assert float(sched.alpha) == 1.0
    assert learned.alpha.requires_grad and float(learned.alpha) == -2.0
    with pytest.raises(AgiasiError, match="alpha mode"):
        Soul(SoulConfig(hidden_size=8, alpha_mode="sometimes"))
