"""GPU tier (skipped without CUDA): the NF4 path on a real card, first step finite from identity
init (the NaN the design note hit on the GPU), offloaded checkpointing equal to the standard one."""

import gc

import pytest
import torch
import transformers

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
    # what `agiasi chat` runs on a step folder: generate outside training's autocast, bf16
    # activations into float32 LoRA weights (a dtype error before 157930f)
    out = w.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def _two_steps(path, offload: bool, ids):
    torch.manual_seed(0)  # the same LoRA init in every build (lora_A is drawn at random)
    w = make_wrapper(
        path,
        device="cuda",
        gradient_checkpointing=True,
        offload_activations=offload,
        lora_dropout=0.1,
    ).train()
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    params = [p for p in w.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)  # step 2 then sees lora_B ≠ 0: lora_A's grads too
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = w(ids, labels=ids, return_logits=False).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in w.named_parameters() if p.requires_grad}
        opt.step()
    return losses, grads


def test_offload_equals_standard_checkpointing_on_cuda(tiny_phi3):
    """The copies run on a side stream and the backward prefetches the next layer's input:
    the loss and every LoRA gradient must equal the standard checkpoint's (same dropout masks
    replayed) over two steps, as closely as the standard path repeats itself. The backward's
    atomics add in any order, so the floor is measured: the standard path run twice."""
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    std_losses, std = _two_steps(tiny_phi3, False, ids)
    _, again = _two_steps(tiny_phi3, False, ids)
    off_losses, off = _two_steps(tiny_phi3, True, ids)
    assert off_losses == pytest.approx(std_losses, rel=1e-5)  # same weights, same forward
    assert off.keys() == std.keys()
    for name, g in std.items():
        scale = float(g.abs().max())
        floor = float((again[name] - g).abs().max())
        diff = float((off[name] - g).abs().max())
        print(f"{name}: max|g| {scale:.3e} std-vs-std {floor:.3e} offload-vs-std {diff:.3e}")
        # a race (a layer recomputed from another layer's input) is wrong at O(scale)
        assert diff <= 4 * floor + 16 * torch.finfo(g.dtype).eps * scale, name


def test_trainer_features_on_cuda(tmp_path):
    """The new trainer on a card: NF4, packed chat rows, a held-out split, a decaying LR; the
    step folders finite (Adam's step counts live on the CPU: the finiteness check must cope)."""
    import json

    from agiasi.cli import main
    from agiasi.shipped import tiny_model_path
    from tests.unit.data.test_data import MESSAGES, PC_MESSAGES

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


def test_traceable_nf4_dequantizes_as_bitsandbytes_cuda_kernel():
    """agiasi.model.nf4's expression against bitsandbytes' CUDA kernel: eager bit for bit, in bf16."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from agiasi.model.nf4 import dequantize

    w = (torch.randn(3072, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).cuda()
    q, st = bnbf.quantize_4bit(
        w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    args = (
        q,
        st.absmax,
        st.state2.code,
        st.state2.absmax,
        st.offset.reshape(()).float(),
        st.code.float(),
    )
    ours = dequantize(*args, (3072, 1024), 64, torch.bfloat16)
    assert torch.equal(ours, bnbf.dequantize_4bit(q, st))
    # compiled, the scale's multiply-add becomes one fused multiply-add (one rounding fewer):
    # the scale moves by ≤ 1 float32 ulp, so a weight by ≤ 1 bf16 ulp (2⁻⁷ relative)
    compiled = torch.compile(dequantize, dynamic=False)(*args, (3072, 1024), 64, torch.bfloat16)
    torch.testing.assert_close(compiled, ours, rtol=2**-7, atol=0)


def test_compiled_nf4_model_matches_bitsandbytes_eager_on_cuda(tiny_phi3):
    """--compile on a card (bf16): the traceable NF4 linears inside the compiled layers give
    bitsandbytes' eager loss and LoRA gradients. bf16 rounds each op to 2⁻⁹ relative; through
    the ~20 ops between a LoRA weight and the loss that is ≈ √20 · 2⁻⁹ ≈ 1 % of a gradient's
    norm, so 3 % allows other kernels' orders; a wrong weight is off by O(100 %)."""
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()

    def run(compile_):
        torch.manual_seed(0)
        w = make_wrapper(
            tiny_phi3, quantization="nf4", dtype="auto", device="cuda",
            gradient_checkpointing=True, compile=compile_,
        ).train()  # fmt: skip
        out = w(ids, labels=ids, return_logits=False)
        out.loss.backward()
        traced = sum(getattr(m, "_agiasi_nf4", None) is not None for m in w.modules())
        return (
            out.loss.item(),
            {n: p.grad.float() for n, p in w.named_parameters() if p.grad is not None},
            traced,
        )

    loss_ref, ref, plain = run(False)
    loss, ours, traced = run(True)
    assert plain == 0 and traced == 8
    assert loss == pytest.approx(loss_ref, rel=2e-2)
    for name, g in ref.items():
        err = float((ours[name] - g).norm()) / max(float(g.norm()), 1e-30)
        assert err <= 0.03, (name, err)


def _tiny_gemma_untied(out):
    """Gemma scales the looked-up rows by √hidden in its own forward: the rows read from host
    memory must still pass through that code."""
    cfg = transformers.GemmaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg.architectures = ["GemmaForCausalLM"]
    transformers.GemmaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["phi3", "gemma"])
def test_offloaded_embedding_on_cuda(arch, tiny_phi3, tmp_path):
    """--offload-embeddings on a card: the matrix leaves the card's allocator (exactly its bytes
    come off the allocated memory) and the GPU's gather reads its rows from pinned host memory.
    The rows are the same, so the loss is equal and generation identical; the gradients differ
    at most as two runs of the same path do (the backward's atomics). The module, its class and
    the state dict's names are the model's own."""
    path = tiny_phi3 if arch == "phi3" else _tiny_gemma_untied(tmp_path / "gemma")
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100

    def run(offload):
        torch.manual_seed(0)
        gc.collect()  # the previous run's model, freed before this one's memory is counted
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        w = make_wrapper(
            path, dtype="auto", device="cuda", gradient_checkpointing=True,
            offload_embeddings=offload,
        ).train()  # fmt: skip
        held = torch.cuda.memory_allocated() - before
        emb = w.causal_lm.get_input_embeddings()
        out = w(ids, labels=labels, return_logits=False)  # ids from the host, as the trainer's
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in w.named_parameters() if p.grad is not None}
        w.eval()
        prompt = torch.tensor([[5, 9, 17, 33]], device="cuda")
        text = w.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0).cpu()
        facts = {
            "held": held,
            "bytes": emb.weight.numel() * emb.weight.element_size(),
            "freed": w.embedding_bytes_on_host,
            "class": type(emb),
            "names": list(w.state_dict()),
            "device": emb.weight.device.type,
        }
        return out.loss.item(), grads, text, facts

    loss, grads, text, card = run(False)
    _, again, _, _ = run(False)
    loss_h, grads_h, text_h, host = run(True)
    assert (card["device"], host["device"]) == ("cuda", "cuda")  # the view is a CUDA tensor
    assert host["freed"] == card["bytes"] > 0
    # the allocator rounds blocks up to 512 bytes: the saving is the matrix, within one block
    assert 0 <= card["held"] - host["held"] - card["bytes"] < 512
    assert (host["class"], host["names"]) == (card["class"], card["names"])
    assert loss_h == loss
    assert torch.equal(text_h, text)
    for name, g in grads.items():
        floor = float((again[name] - g).abs().max())
        scale = float(g.abs().max())
        assert (
            float((grads_h[name] - g).abs().max())
            <= 4 * floor + 16 * torch.finfo(torch.float32).eps * scale
        ), name
