"""The traceable NF4 linear equals bitsandbytes' own: the dequantized weight bit for bit, the
matmul's output and input gradient as bitsandbytes computes them, and a whole QLoRA model's loss
and LoRA gradients; compiled, it saves no dequantized weight for the backward."""

import os

import pytest
import torch

from agiasi.model.nf4 import NF4Matmul, dequantize, nf4_linear, use_traceable_nf4
from tests.helpers import make_wrapper

bnb = pytest.importorskip("bitsandbytes")
bnbf = bnb.functional


def _quantized(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


def _args(q, st):
    return (
        q,
        st.absmax,
        st.state2.code,
        st.state2.absmax,
        st.offset.reshape(()).float(),
        st.code.float(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bitsandbytes_bit_for_bit(dtype):
    # 384 × 704: 4,224 blocks of 64, 16.5 blocks of 256 scales (a partial nested block)
    q, st = _quantized(384, 704, dtype)
    ours = dequantize(*_args(q, st), (384, 704), 64, dtype)
    ref = bnbf.dequantize_4bit(q, st)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_dequantize_gives_bitsandbytes_weight_in_2_byte_dtypes(dtype):
    """Compiled, the 2-byte dtypes take the int32-pair store (two weights a byte written as
    one int32, viewed back as the dtype): the same weights, in the same places. The compiler
    may fuse the scale's multiply-add (one rounding fewer in float32), which moves a weight by
    at most one ulp of the dtype; a wrong interleave or byte order moves it by O(100 %)."""
    q, st = _quantized(384, 704, dtype, seed=3)
    compiled = torch.compile(dequantize, dynamic=False)
    ours = compiled(*_args(q, st), (384, 704), 64, dtype)
    ref = bnbf.dequantize_4bit(q, st)
    assert ours.dtype == dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_output_and_input_gradient_equal_bitsandbytes(dtype):
    """Linear4bit's call: input, bias and weight in the compute dtype (the dtype the weight was
    quantized from, in our models), dequantized once in the forward and once in the backward."""
    q, st = _quantized(96, 128, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 128, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    grad = torch.randn(3, 5, 96, generator=gen).to(dtype)

    x_ref = x.clone().requires_grad_()
    y_ref = bnb.matmul_4bit(x_ref, q, quant_state=st, bias=bias)
    y_ref.backward(grad)

    x_ours = x.clone().requires_grad_()
    y = NF4Matmul.apply(x_ours, bias, *_args(q, st), ((96, 128), 64, dtype))
    y.backward(grad)
    assert y.dtype == x_ours.grad.dtype == dtype

    # the same products summed in another order (bf16: rounded once at the end, by either
    # kernel, so up to one ulp of the result, 2⁻⁸ relative, apart)
    w = bnbf.dequantize_4bit(q, st).float()
    eps = torch.finfo(dtype).eps
    tol = 8 * 128 * torch.finfo(torch.float32).eps + eps
    scale_y = (x.float().abs() @ w.abs().T).max().item() + bias.float().abs().max().item()
    scale_g = (grad.float().abs() @ w.abs()).max().item()
    assert (y.float() - y_ref.float()).abs().max().item() <= tol * scale_y
    assert (x_ours.grad.float() - x_ref.grad.float()).abs().max().item() <= tol * scale_g


def _loss_and_grads(path, traceable: bool, ids):
    torch.manual_seed(0)
    w = make_wrapper(path, quantization="nf4", dtype="float32", lora_dropout=0.0).train()
    if traceable:
        assert use_traceable_nf4(w.causal_lm) > 0
    out = w(ids, labels=ids, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in w.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.item(), grads


def test_a_qlora_model_through_it_gives_bitsandbytes_loss_and_lora_gradients(tiny_phi3):
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_ref, ref = _loss_and_grads(tiny_phi3, False, ids)
    loss, ours = _loss_and_grads(tiny_phi3, True, ids)
    assert ours.keys() == ref.keys() and any("lora_A" in n for n in ours)
    # the same weights and the same float32 matmuls: differences are summation order only
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for name, g in ref.items():
        assert (ours[name] - g).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-12, name


def test_compiled_it_saves_only_the_packed_weight_for_the_backward():
    """What makes it worth compiling: the forward graph keeps the uint8 codes, never an N × K
    float weight (that would cost 4–8 × the 4-bit weight's memory until the backward)."""
    n, k = 256, 512
    q, st = _quantized(n, k, torch.float32, seed=5)
    args = _args(q, st)
    meta = ((n, k), 64, torch.float32)

    def f(x):
        return nf4_linear(x, None, args, meta)

    compiled = torch.compile(f, dynamic=False)
    x = torch.randn(8, k, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = compiled(x)
    y.sum().backward()
    assert all(shape != (n, k) for shape, _ in saved), saved  # no dequantized weight
    assert (tuple(q.shape), torch.uint8) in saved, saved  # the codes instead
    eager = x.detach().clone().requires_grad_()
    f(eager).sum().backward()
    tol = 8 * k * torch.finfo(torch.float32).eps
    assert (y - f(eager)).abs().max().item() <= tol * y.abs().max().item()
    assert (x.grad - eager.grad).abs().max().item() <= tol * eager.grad.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_a_compiled_qlora_model_gives_the_eager_loss_and_lora_gradients(tiny_phi3, offload):
    """``--compile`` on an NF4 model: each decoder layer compiled with the traceable NF4 linear
    and the addmm-fused LoRA inside, against bitsandbytes' and PEFT's eager path (the same
    float32 arithmetic, other kernels); also under the offloaded checkpoint (its own recompute
    of the compiled layer). Batches of three widths, as real data's padded widths vary: the
    second width compiles a graph with dynamic sizes and the third reuses it (compiled for
    fixed sizes, every new width recompiled, ~10-40 s, and after 8 widths torch ran the layer
    uncompiled)."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 128, shape, generator=gen) for shape in ((2, 24), (2, 31), (2, 40))]

    def run(compile_: bool):
        torch.manual_seed(0)
        w = make_wrapper(
            tiny_phi3,
            quantization="nf4",
            gradient_checkpointing=True,
            offload_activations=offload,
            compile=compile_,
        ).train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B ≠ 0: the LoRA product reaches the loss and A gets gradients
            for name, p in sorted(w.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        results = []
        for ids in batches:
            w.zero_grad(set_to_none=True)
            out = w(ids, labels=ids, return_logits=False)
            out.loss.backward()
            grads = {n: p.grad for n, p in w.named_parameters() if p.grad is not None}
            results.append((out.loss.item(), grads))
            graphs.append(counters["stats"]["unique_graphs"])
        named = w.causal_lm.named_modules()
        nf4 = [n for n, m in named if getattr(m, "_agiasi_nf4", None) is not None]
        return results, nf4

    graphs = []
    ref, plain = run(False)
    torch._dynamo.reset()
    counters.clear()
    graphs.clear()
    ours, traced = run(True)
    assert not plain and len(traced) == 2 * 4  # qkv, o, gate_up, down in each of 2 layers
    # the first width's graphs (a forward and, offloaded, its recompute), then their dynamic
    # versions at the second width; the third width compiles nothing
    assert graphs[0] > 0 and graphs[1] > graphs[0] and graphs[2] == graphs[1]
    for (loss, grads), (loss_ref, grads_ref) in zip(ours, ref, strict=True):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert (grads[name] - g).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-12, name


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_addmm_is_peft_lora_sum(autocast):
    """The fused LoRA step against PEFT's formula ``y + B(A x) · s``: float32 to its rounding;
    under bf16 autocast both run their products in bf16, so they agree to bf16's (one ulp of
    the output per rounding, the fused one rounds fewer times)."""
    from agiasi.model.nf4 import lora_addmm

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 64, generator=gen, requires_grad=True)
    y = torch.randn(2, 7, 48, generator=gen, requires_grad=True)
    a = (torch.randn(8, 64, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(48, 8, generator=gen) * 0.1).requires_grad_()
    grad = torch.randn(2, 7, 48, generator=gen)

    def both(fn):
        for t in (x, y, a, b):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        out.backward(grad.to(out.dtype))
        return out.float(), [t.grad.clone() for t in (x, y, a, b)]

    ours, g_ours = both(lambda: lora_addmm(y.to(torch.bfloat16) if autocast else y, x, a, b, 2.0))
    peft, g_peft = both(
        lambda: (
            (y.to(torch.bfloat16) if autocast else y)
            + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * 2.0
        )
    )
    eps = torch.finfo(torch.bfloat16 if autocast else torch.float32).eps
    assert (ours - peft).abs().max().item() <= 4 * eps * peft.abs().max().item()
    for go, gp in zip(g_ours, g_peft, strict=True):
        assert (go - gp).abs().max().item() <= 4 * eps * gp.abs().max().item() + 1e-12


def test_each_forced_cpu_capability_gets_its_own_compile_cache(monkeypatch):
    """torch.compile reused AVX512 kernels in a run forced to AVX2 and computed 1e37s: the
    process settings give each ATEN_CPU_CAPABILITY its own cache, and keep a user's choice."""
    from agiasi.process import configure_process

    dirs = {}
    for cap in ("avx2", "avx512"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        configure_process()
        dirs[cap] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert dirs["avx2"] != dirs["avx512"] and dirs["avx2"].endswith("_avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    configure_process()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/mine"


def test_training_turns_cudnn_attention_off_only_under_ddp(monkeypatch):
    """cuDNN's attention costs 2-3 ms of host time a call: it slowed every DDP rank, while a lone
    GPU hid it (bench/RESULTS.md). A distributed run turns it off, a lone one keeps PyTorch's
    choice (what bench/train.py measures), and AGIASI_CUDNN_SDPA=1 keeps it under DDP too."""
    import torch

    from agiasi.process import configure_process

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("AGIASI_CUDNN_SDPA", raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        seen = {}
        for world, keep in (("1", None), ("2", "1"), ("2", None)):
            torch.backends.cuda.enable_cudnn_sdp(True)
            monkeypatch.setenv("WORLD_SIZE", world)
            if keep:
                monkeypatch.setenv("AGIASI_CUDNN_SDPA", keep)
            else:
                monkeypatch.delenv("AGIASI_CUDNN_SDPA", raising=False)
            configure_process(training=True)
            seen[(world, keep)] = torch.backends.cuda.cudnn_sdp_enabled()
        assert seen == {("1", None): True, ("2", "1"): True, ("2", None): False}
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
