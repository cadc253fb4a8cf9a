"""The wrapper on tiny models: fold equivalence, gradients, LoRA targets, NF4, generation, errors."""

import gc
import json

import pytest
import torch
import torch.nn.functional as F

from agiasi.errors import AgiasiError
from agiasi.soul import fold_into
from tests.helpers import build_tiny_llama, make_wrapper, randomize_lora, randomize_soul


def _ids(vocab=128, shape=(2, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


@pytest.mark.parametrize("mix", ["convex", "residual"])
@pytest.mark.parametrize("kind", ["so8", "full"])
def test_wrapper_logits_equal_folded_head(tiny_phi3, kind, mix):
    w = make_wrapper(tiny_phi3, rotation=kind, soul_mix=mix).eval()
    randomize_soul(w)
    randomize_lora(w)
    ids = _ids()
    with torch.no_grad():
        out = w(ids)
        h = w.hidden_states(ids)
        folded = fold_into(w.head.weight, w.soul.rotation_matrix(torch.float64), w.soul.gate(), mix)
        plain = F.linear(h, folded)
    assert (out.logits - plain).abs().max() <= 1e-5
    # the soul really changes the logits (otherwise the check above proves nothing)
    assert (out.logits - F.linear(h, w.head.weight)).abs().max() > 1e-2


@pytest.mark.parametrize("mix", ["convex", "residual"])
def test_tied_embedding_model_folds_after_untie(tiny_llama_tied, mix):
    w = make_wrapper(tiny_llama_tied, soul_mix=mix).eval()
    randomize_soul(w)
    emb = w.causal_lm.get_input_embeddings().weight
    assert w.head.weight.data_ptr() == emb.data_ptr(), "fixture should be tied"
    emb_before = emb.detach().clone()
    ids = _ids()
    with torch.no_grad():
        out = w(ids)
        untied_head = w.head.weight.detach().clone()  # untie: the head gets its own tensor
        folded = w.soul.fold_into(untied_head)
        plain = F.linear(w.hidden_states(ids), folded)
    assert (out.logits - plain).abs().max() <= 1e-5
    # folding never touched the input embedding
    assert torch.equal(emb.detach(), emb_before)


def test_gradients_reach_lora_and_soul_only_and_are_finite(tiny_phi3):
    w = make_wrapper(tiny_phi3, alpha_mode="learned").train()
    ids = _ids()
    out = w(ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.ortho_loss.item() == pytest.approx(0.0, abs=1e-6)  # identity init
    out.loss.backward()
    lora_grads = {n: p.grad for n, p in w.base_model.named_parameters() if "lora_" in n}
    assert lora_grads and all(
        g is not None and torch.isfinite(g).all() for g in lora_grads.values()
    )
    assert any(g.abs().sum() > 0 for n, g in lora_grads.items() if "lora_B" in n)
    for name, p in w.base_model.named_parameters():
        if "lora_" not in name and name.split(".")[-2:] != ["alpha"] and "soul" not in name:
            assert p.grad is None, f"frozen base parameter {name} got a gradient"
    assert w.alpha.grad is not None and torch.isfinite(w.alpha.grad)
    sg = w.so8_rotation.skew_params.grad
    assert sg is not None and torch.isfinite(sg).all() and sg.abs().sum() > 0


def test_loss_is_ce_plus_weighted_ortho_and_ignores_padding(tiny_phi3):
    w = make_wrapper(tiny_phi3, ortho_weight=0.1).eval()
    randomize_soul(w)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with torch.no_grad():
        out = w(ids, attention_mask=mask, labels=ids)
        labels = ids.masked_fill(mask == 0, -100)
        ref = F.cross_entropy(
            out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    assert out.task_loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(ref.item() + 0.1 * out.ortho_loss.item(), rel=1e-6)
    assert out["gate"].item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item(), rel=1e-6)


def test_phi3_lora_targets_cover_qkv_and_o_in_every_layer(tiny_phi3):
    from peft.tuners.lora import LoraLayer

    w = make_wrapper(tiny_phi3)
    layers = w.hf_config.num_hidden_layers
    wrapped = [
        n.rsplit(".", 1)[-1] for n, m in w.base_model.named_modules() if isinstance(m, LoraLayer)
    ]
    assert wrapped.count("qkv_proj") == layers
    assert wrapped.count("o_proj") == layers
    assert len(wrapped) == 2 * layers
    assert w.lora_target_counts == {"qkv_proj": layers, "o_proj": layers}
    h, qkv_out = 64, 3 * 64
    r = 16
    assert w.trainable_parameters()["lora"] == layers * r * ((h + qkv_out) + (h + h))
    assert w.trainable_parameters()["soul"] == (h // 8) * 28


def test_nf4_path_forward_backward_on_cpu(tiny_phi3):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    w = make_wrapper(tiny_phi3, quantization="nf4", dtype="auto").train()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in w.causal_lm.modules())
    ids = _ids()
    out = w(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in w.base_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(w.so8_rotation.skew_params.grad).all()


def test_llama_family_works(tmp_path):
    path = build_tiny_llama(tmp_path / "llama")
    w = make_wrapper(path).train()
    assert set(w.lora_target_counts) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = _ids()
    out = w(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["so8", "full"])
def test_generation_with_kv_cache_equals_without(tiny_phi3, kind):
    w = make_wrapper(tiny_phi3, rotation=kind)
    randomize_soul(w, alpha=1.5)
    prompt = _ids(shape=(1, 5))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = w.generate(prompt, use_cache=True, **kw)
    without = w.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == 25
    assert torch.equal(with_cache, without)
    # and generation really goes through the soul: greedy argmax of the soul logits
    with torch.no_grad():
        first = w(prompt).logits[0, -1].argmax()
    assert with_cache[0, 5] == first


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_bf16_model_generates(tiny_phi3, quantization):
    """A bf16 model trains with its LoRA inputs left in bf16 under autocast; HF's generate runs
    outside that autocast, where bf16 activations met the float32 LoRA weights (a dtype error,
    seen on the GPU). Generation casts them as PEFT does, and leaves training's setting as it
    was. With lora_B = 0 (init) the LoRA adds nothing, so the greedy tokens are the forward's."""
    from peft.tuners.lora import LoraLayer

    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    w = make_wrapper(tiny_phi3, dtype="bfloat16", quantization=quantization)
    randomize_soul(w, alpha=1.5)
    prompt = _ids(shape=(1, 5))
    out = w.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, 9)
    with torch.no_grad():
        assert out[0, 5] == w(prompt).logits[0, -1].argmax()
    layers = [m for m in w.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(AgiasiError, match="not found"):
        make_wrapper(tmp_path / "nope")


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AgiasiError, match="no config.json"):
        make_wrapper(tmp_path / "empty")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(AgiasiError, match="unsupported architecture"):
        make_wrapper(tmp_path / "bert")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(AgiasiError, match="unsupported architecture"):
        make_wrapper(tmp_path / "weird")


def test_hidden_not_divisible_by_8_is_a_clear_error(tmp_path):
    path = build_tiny_llama(tmp_path / "odd", hidden=36, heads=2)
    with pytest.raises(AgiasiError, match="divisible by 8"):
        make_wrapper(path)
    make_wrapper(path, rotation="full")  # the dense kind takes any H


def test_lora_target_matching_nothing_is_a_clear_error(tiny_phi3):
    with pytest.raises(AgiasiError, match=r"q_proj.*match no module.*qkv_proj"):
        make_wrapper(tiny_phi3, lora_targets=["q_proj", "o_proj"])


def test_control_run_has_no_soul(tiny_phi3):
    w = make_wrapper(tiny_phi3, soul=False)
    ids = _ids()
    out = w(ids, labels=ids)
    assert out.alpha is None and out.gate is None
    assert out.loss.item() == pytest.approx(out.task_loss.item())
    assert w.get_phase_status().startswith("⚪")
    with pytest.raises(AgiasiError, match="soul=False"):
        _ = w.alpha


@pytest.mark.parametrize("soul", [True, False])
def test_chunked_loss_equals_full_loss_and_gradients(tiny_phi3, soul):
    """The memory lever must not change the number: same loss, same gradients (fp32)."""
    w = make_wrapper(tiny_phi3, soul=soul, alpha_mode="learned").train()
    if soul:
        randomize_soul(w)
    randomize_lora(w)
    ids = _ids(shape=(2, 23))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    params = [p for p in w.parameters() if p.requires_grad]
    full = w(ids, attention_mask=mask, labels=ids)
    g_full = torch.autograd.grad(full.loss, params)
    chunked = w(ids, attention_mask=mask, labels=ids, return_logits=False, loss_chunk=7)
    g_chunk = torch.autograd.grad(chunked.loss, params)
    assert chunked.logits is None
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for a, b in zip(g_full, g_chunk, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_offloaded_checkpointing_matches_standard_checkpointing(tiny_phi3):
    """Same loss and same gradients (LoRA dropout on: the recompute must replay the RNG)."""
    results = []
    for offload in (False, True):
        w = make_wrapper(
            tiny_phi3,
            lora_dropout=0.2,
            gradient_checkpointing=True,
            offload_activations=offload,
            alpha_mode="learned",
        ).train()
        randomize_soul(w)
        randomize_lora(w)
        ids = _ids(shape=(2, 17))
        torch.manual_seed(123)
        out = w(ids, labels=ids, return_logits=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in w.named_parameters() if p.requires_grad}
        results.append((out.loss.item(), grads))
    (la, ga), (lb, gb) = results
    assert la == pytest.approx(lb, rel=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 4
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5), k
    assert any(g.abs().sum() > 0 for k, g in gb.items() if "layers.0." in k and "lora_B" in k)


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offloaded"])
def test_checkpointing_asks_no_gradient_of_the_embedding_rows(tiny_phi3, offload):
    """A frozen embedding's rows need no gradient. transformers' hook marks them as needing one
    (for reentrant checkpointing), which made them a leaf that autograd held, with a gradient of
    its own, until the backward ended: B·T·H values on the card. Without it the offloaded rows
    are freed once the forward is done (their copy is in host memory), and every gradient is
    still the unchecked run's."""
    grads = []
    for checkpointing in (False, True):
        w = make_wrapper(
            tiny_phi3,
            gradient_checkpointing=checkpointing,
            offload_activations=checkpointing and offload,
        ).train()
        randomize_soul(w)
        randomize_lora(w)
        rows = []
        w.causal_lm.get_input_embeddings().register_forward_hook(
            lambda module, args, out, rows=rows: rows.append(
                (out.requires_grad, out.untyped_storage()._weak_ref())  # the memory, not the object
            )
        )
        ids = _ids(shape=(2, 17))
        out = w(ids, labels=ids, return_logits=False)
        gc.collect()
        wants_grad, row_ref = rows[0]
        assert not wants_grad
        if checkpointing and offload:
            assert torch.UntypedStorage._expired(row_ref), (
                "the embedding's rows outlive the forward"
            )
        torch.UntypedStorage._free_weak_ref(row_ref)
        out.loss.backward()
        grads.append({n: p.grad for n, p in w.named_parameters() if p.requires_grad})
    plain, checked = grads
    assert plain.keys() == checked.keys() and any("layers.0." in k for k in plain)
    for k in plain:
        torch.testing.assert_close(checked[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(g.abs().sum() > 0 for k, g in checked.items() if "layers.0." in k and "lora_B" in k)


# --------------------------------------------------------------------------- CPU compute dtype


def _linear4bit_dtypes(w) -> set:
    import bitsandbytes as bnb

    return {m.compute_dtype for m in w.causal_lm.modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_cpu_compute_dtype_defaults_to_float32(tiny_phi3, quantization):
    """Most CPUs have no native bf16 and run it 40-70x slower: auto means float32 there."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    w = make_wrapper(tiny_phi3, quantization=quantization, dtype="auto")
    if quantization == "nf4":
        assert _linear4bit_dtypes(w) == {torch.float32}
    floats = {p.dtype for p in w.parameters() if p.is_floating_point()}
    assert floats == {torch.float32}


def test_cpu_bfloat16_is_honoured_when_asked(tiny_phi3):
    pytest.importorskip("bitsandbytes")
    w = make_wrapper(tiny_phi3, quantization="nf4", dtype="bfloat16")
    assert _linear4bit_dtypes(w) == {torch.bfloat16}
    assert w.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16


def test_bfloat16_on_a_cpu_without_it_warns_once(monkeypatch, capsys):
    from agiasi.model import loading as model

    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(model, "_WARNED", set())
    assert model.resolve_dtype("auto", "cpu") == torch.float32
    assert capsys.readouterr().err == ""
    assert model.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert model.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without native bf16" in err and "slower" in err
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(model, "_WARNED", set())
    model.resolve_dtype("bfloat16", "cpu")
    assert capsys.readouterr().err == ""
    with pytest.raises(AgiasiError, match="unknown dtype 'float8'"):
        model.resolve_dtype("float8", "cpu")


def test_a_default_training_step_on_the_shipped_model_runs_no_bf16_matmul():
    """What `agiasi train` builds by default (NF4, dtype auto) on the CPU: every matmul of a
    forward + backward step, bitsandbytes' 4-bit backward included, runs in float32."""
    pytest.importorskip("bitsandbytes")
    from torch.utils._python_dispatch import TorchDispatchMode

    from agiasi import AGIASI_SO8T_Wrapper
    from agiasi.demo import tiny_model_path
    from agiasi.train.loop import TrainConfig

    cfg = TrainConfig(base_model=str(tiny_model_path())).model_config()
    assert cfg.quantization == "nf4" and cfg.dtype == "auto"
    w = AGIASI_SO8T_Wrapper(config=cfg, device="cpu").train()
    matmuls = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product"}
    seen: dict[torch.dtype, int] = {}

    class RecordMatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if any(name.startswith(m) for m in matmuls):
                for a in args:
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        seen[a.dtype] = seen.get(a.dtype, 0) + 1
            return func(*args, **(kwargs or {}))

    ids = _ids(vocab=8000, shape=(2, 32))
    with RecordMatmulDtypes():
        out = w(ids, attention_mask=torch.ones_like(ids), labels=ids, return_logits=False)
        out.loss.backward()
    assert seen.get(torch.float32, 0) > 50, seen
    assert torch.bfloat16 not in seen and torch.float16 not in seen, seen


def _lora_matmul_dtypes(w, ids):
    """dtypes of what every LoRA A sees in one forward + backward, and its weight's grad dtype."""
    seen = set()
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.add((args[0].dtype, out.dtype)))
        for n, m in w.named_modules()
        if n.endswith("lora_A.default")
    ]
    out = w(ids, attention_mask=torch.ones_like(ids), labels=ids, return_logits=False)
    out.loss.backward()
    for h in hooks:
        h.remove()
    grads = {p.grad.dtype for n, p in w.named_parameters() if "lora_" in n and p.grad is not None}
    return seen, grads, out


@pytest.mark.parametrize("offload", [False, True])
def test_a_bf16_model_runs_its_lora_in_bf16_with_float32_weights(tiny_phi3, offload):
    """With bf16 compute the LoRA matmuls run in bf16 (autocast over the decoder) while the
    LoRA weights and their gradients stay float32; the recompute of a checkpointed (and of an
    offloaded) layer sees the same autocast, so its saved tensors match the forward's."""
    pytest.importorskip("bitsandbytes")
    ids = _ids(vocab=128, shape=(2, 32))
    w = make_wrapper(
        tiny_phi3,
        quantization="nf4",
        dtype="bfloat16",
        gradient_checkpointing=True,
        offload_activations=offload,
    ).train()
    seen, grads, out = _lora_matmul_dtypes(w, ids)
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert grads == {torch.float32}
    assert {p.dtype for n, p in w.named_parameters() if "lora_" in n} == {torch.float32}
    assert torch.isfinite(out.loss)
    f32 = make_wrapper(tiny_phi3, quantization="nf4", dtype="float32").train()
    seen32, grads32, _ = _lora_matmul_dtypes(f32, ids)
    assert seen32 == {(torch.float32, torch.float32)} and grads32 == {torch.float32}


@pytest.mark.parametrize("soul", [True, False])
def test_gemma2_soft_capping_is_in_training_as_in_inference(tmp_path, soul):
    """Gemma-2 caps its logits after the head (cap · tanh(z / cap)): the wrapper's own forward
    and chunked loss apply it as HF's forward (generation) does, and the fold stays exact."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        final_logit_softcapping=2.0,  # small, so the cap really bites on random logits
        sliding_window=64,
    )
    cfg.architectures = ["Gemma2ForCausalLM"]
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "g2")
    w = make_wrapper(tmp_path / "g2", soul=soul).eval()
    if soul:
        randomize_soul(w)
    randomize_lora(w)
    ids = _ids(shape=(2, 12))
    with torch.no_grad():
        ours = w(ids).logits
        hf = w.causal_lm(input_ids=ids).logits  # HF's forward: head (with the soul), then the cap
        assert (ours - hf).abs().max() <= 1e-5
        assert ours.abs().max() <= 2.0 + 1e-6
        full = w(ids, labels=ids).task_loss
        chunked = w(ids, labels=ids, return_logits=False, loss_chunk=5).task_loss
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)


def test_nf4_without_gradients_computes_in_float32_on_every_cpu(tiny_phi3):
    """bitsandbytes runs a 4-bit layer in eval/no-grad on an AVX512-BF16 CPU through a bf16
    kernel; with float32 compute the layer must equal x @ dequant(W)ᵀ in float32 anyway."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    w = make_wrapper(tiny_phi3, quantization="nf4", dtype="float32").eval()
    layer = next(m for m in w.causal_lm.modules() if type(m).__name__ == "Linear4bit")
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x)
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        want = x @ weight.T.float()
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_each_local_rank_gets_its_own_block_of_cpus(monkeypatch):
    """DDP ranks on one host are pinned to disjoint contiguous CPU blocks; a process the user
    pinned already, or a host with too few CPUs, is left as it is."""
    import os

    from agiasi.train.distributed import pin_cpus

    state = {"cpus": set(range(32))}
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(state["cpus"]))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, c: state.update(cpus=set(c)))
    assert pin_cpus(1, 2) == list(range(16, 32)) and state["cpus"] == set(range(16, 32))
    state["cpus"] = set(range(32))
    assert pin_cpus(3, 4) == list(range(24, 32))
    state["cpus"] = {0, 1, 2, 3}  # pinned by the user: kept
    assert pin_cpus(0, 2) == [0, 1, 2, 3] and state["cpus"] == {0, 1, 2, 3}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    state["cpus"] = {0, 1}  # too few to split
    assert pin_cpus(0, 2) == [0, 1]
