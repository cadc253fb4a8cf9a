"""The memory estimate's exact parts (agiasi.train.estimate), checked on the CPU against the
model as ``agiasi train`` loads it: every NF4 tensor bitsandbytes keeps, every other parameter,
the trainable count, and what AdamW really holds after a step. The fitted parts (one layer's
working set, the allocator's slack) are checked on a GPU by bench/estimate.py."""

from __future__ import annotations

import pytest
import torch

from agiasi.shipped import tiny_model_path
from agiasi.train.config import TrainConfig
from agiasi.train.estimate import (
    ALLOC_BLOCK,
    LOSS_CHUNK,
    model_shape,
    nf4_tensor_bytes,
    predict,
)

pytestmark = pytest.mark.slow  # each loads the tiny model through bitsandbytes


def _bnb_tensors(module):
    st = module.weight.quant_state
    return [module.weight.data, st.absmax, st.state2.absmax, st.state2.code, st.code, st.offset]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rounded(n: int) -> int:
    return -(-n // ALLOC_BLOCK) * ALLOC_BLOCK


@pytest.fixture(scope="module")
def loaded():
    from agiasi import AGIASI_SO8T_Wrapper

    cfg = TrainConfig(base_model=str(tiny_model_path()))
    w = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device="cpu")
    return cfg, w


def test_nf4_bytes_are_what_bitsandbytes_keeps(loaded):
    import bitsandbytes as bnb

    _, w = loaded
    seen = 0
    for m in w.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            n = m.weight.quant_state.shape.numel()
            assert [_bytes(t) for t in _bnb_tensors(m)] == nf4_tensor_bytes(n)
            seen += 1
    assert seen == 4 * w.hf_config.num_hidden_layers  # qkv, o, gate_up, down of every layer


def test_weights_part_is_the_loaded_models_bytes(loaded):
    """Every tensor of the loaded base, each rounded as the CUDA allocator rounds it, in the
    compute dtype the card would use (bf16): the meta-device build predicts it exactly."""
    import bitsandbytes as bnb

    cfg, w = loaded
    shape = model_shape(cfg)
    total, seen = 0, set()
    quantized = set()
    for m in w.causal_lm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            total += sum(_rounded(_bytes(t)) for t in _bnb_tensors(m))
            quantized.add(id(m.weight))
    for name, p in w.causal_lm.named_parameters():
        if id(p) in quantized or "lora_" in name or id(p) in seen or ".soul." in name:
            continue
        seen.add(id(p))
        total += _rounded(p.numel() * 2)  # float32 on this CPU, bf16 on a card
    assert shape.weight_bytes == total


@pytest.mark.parametrize(
    "flags",
    [{}, {"rotation": "full"}, {"soul": False}, {"alpha_mode": "learned"}, {"lora_r": 4}],
    ids=["so8", "full", "no-soul", "learned-alpha", "r4"],
)
def test_trainable_count_is_the_wrappers(flags):
    from agiasi import AGIASI_SO8T_Wrapper

    cfg = TrainConfig(base_model=str(tiny_model_path()), **flags)
    shape = model_shape(cfg)
    w = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device="cpu")
    trainable = sum(p.numel() for p in w.parameters() if p.requires_grad)
    assert shape.lora_parameters + shape.soul_parameters == trainable


def test_adapter_part_is_params_grads_and_adamw_state_after_a_step(loaded):
    cfg, w = loaded
    params = [p for p in w.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8000, (1, 16))
    w(ids, labels=ids, return_logits=False).loss.backward()
    opt.step()
    held = sum(_bytes(p) + _bytes(p.grad) for p in params)
    held += sum(_bytes(v) for s in opt.state.values() for v in s.values() if v.dim() > 0)
    e = predict(cfg, model_shape(cfg))
    assert all(p.dtype == torch.float32 for p in params)
    assert e.parts["adapter"] == held


def test_activation_parts_follow_the_tokens_exactly():
    cfg = TrainConfig(base_model=str(tiny_model_path()), max_length=300, batch_size=2)
    shape = model_shape(cfg)
    h, n = shape.hidden, 600
    e = predict(cfg, shape)
    assert e.tokens_per_micro_batch == n
    assert e.parts["checkpoints"] == shape.layers * n * h * 2
    assert e.parts["head"] == min(n, LOSS_CHUNK) * shape.vocab * (2 + 4) + n * h * 2
    off = predict(TrainConfig(base_model=str(tiny_model_path()), max_length=300, batch_size=2,
                              offload_activations=True), shape)  # fmt: skip
    assert off.parts["checkpoints"] == 2 * n * h * 2
    assert off.host_parts["offloaded checkpoints"] == shape.layers * n * h * 2
    # more tokens never predict less, and the card figure is the reserved one plus the context
    longer = predict(TrainConfig(base_model=str(tiny_model_path()), max_length=600,
                                 batch_size=2), shape)  # fmt: skip
    assert longer.reserved > e.reserved > e.allocated
    assert e.card - e.reserved == longer.card - longer.reserved > 0
