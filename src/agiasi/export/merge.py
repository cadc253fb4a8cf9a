"""Merge the LoRA and fold the soul: pure functions on tensors and state dicts.

For every LoRA pair, ``W + (lora_alpha / r) · B A``; for the head, the soul's fold
(:func:`agiasi.soul.fold_into`). All arithmetic in float64, then cast to the output dtype.
PEFT's ``merge_and_unload`` works on live modules and a whole model in memory; the export needs
the merge on any base (the original 16-bit weights or the NF4-dequantized weights the LoRA was
trained against) one tensor at a time, so the one line ``W += s·B A`` is written here.

:func:`merged_tensors` is the streaming form the export uses: it reads the base's safetensors
lazily and yields final tensors one by one, so peak memory is about one tensor (plus float64
row blocks of it), never a model. :func:`merge_lora` and :func:`fold_soul` are the same math on
whole state dicts, for tests and small models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from agiasi.errors import AgiasiError
from agiasi.soul import LEGACY_MIX, Soul, SoulConfig, fold_into, gate_of
from agiasi.weights import EMBED_KEY, HEAD_KEY, LazyWeights

# float64 row blocks: a 32064 × 3072 head is 788 MB in float64; 4096 rows are 100 MB.
ROW_BLOCK = 4096
# What the LoRA can be merged into: the original 16-bit weights, or the NF4-dequantized ones
# it was trained against (``agiasi export --merge-base``).
MERGE_BASES = ("w16", "nf4")


# --------------------------------------------------------------------------- tensors


def merge_tensor(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``W + scaling · B A`` in float64, row block by row block, cast to ``out_dtype``."""
    if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
        raise AgiasiError(
            f"LoRA shapes B {tuple(b.shape)} · A {tuple(a.shape)} do not fit W {tuple(w.shape)}"
        )
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    a64 = a.to(w.device).double()
    b = b.to(w.device)
    for r0 in range(0, w.shape[0], (step := _rows_of(w.shape[1]))):
        rows = slice(r0, r0 + step)
        out[rows] = (w[rows].double() + scaling * (b[rows].double() @ a64)).to(out_dtype)
    return out


def _rows_of(cols: int) -> int:
    """Rows of a float64 work block of ~8 MiB: below glibc's largest mmap threshold (32 MiB), so
    the heap hands the same memory to block after block instead of the kernel mapping and
    zeroing it afresh each time (4,096-row blocks of a 1536-wide head page-faulted 2 GiB in a
    0.4 B model's export, bench/RESULTS.md)."""
    return max(1, 2**20 // max(1, cols))


def fold_head(
    head: torch.Tensor, rotation: torch.Tensor, alpha: float, mix: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """The soul folded into the head (:func:`agiasi.soul.fold_into`) row block by row block.

    An ``so8`` rotation is block-diagonal (H/8 blocks of 8 × 8): ``W R`` is then H/8 products of
    (rows × 8)·(8 × 8), H/8 times fewer multiplications than the dense (rows × H)·(H × H) — the
    dense float64 product was 1.7 s of a 0.4 B model's 2-core export (bench/RESULTS.md). The
    same float64 terms are summed (the dense product's other terms are exact zeros), so the
    result is the dense one's to float64 rounding; tests/unit/export/test_merge.py compares."""
    out = torch.empty(head.shape, dtype=out_dtype, device=head.device)
    gate = gate_of(alpha)
    r64 = rotation.to(head.device).double()
    blocks = _diagonal_blocks(r64, 8)
    step = ROW_BLOCK if blocks is None else _rows_of(head.shape[1])  # dense R: tall blocks for BLAS
    for r0 in range(0, head.shape[0], step):
        rows = slice(r0, r0 + step)
        if blocks is None:
            out[rows] = fold_into(head[rows].double(), r64, gate, mix).to(out_dtype)
        else:
            w = head[rows].to(torch.float64, copy=True)  # folded in place
            out[rows] = _fold_blocks(w, blocks, gate, mix).to(out_dtype)
    return out


def _diagonal_blocks(r: torch.Tensor, k: int) -> torch.Tensor | None:
    """``r``'s (H/k, k, k) diagonal blocks when everything off them is exactly zero, else None."""
    h = r.shape[0]
    if r.ndim != 2 or r.shape[1] != h or h % k or h == k:
        return None
    n = h // k
    tiles = r.reshape(n, k, n, k).permute(0, 2, 1, 3)  # tiles[i, j] = r[ik:(i+1)k, jk:(j+1)k]
    diag = torch.arange(n, device=r.device)
    blocks = tiles[diag, diag].clone()
    off = tiles.clone()
    off[diag, diag] = 0
    return blocks if not bool(off.any()) else None


def _fold_blocks(w: torch.Tensor, blocks: torch.Tensor, gate: float, mix: str) -> torch.Tensor:
    """:func:`agiasi.soul.fold_into` for a block-diagonal R given by its ``blocks`` (float64),
    into ``w`` (float64, the caller's own copy) in place."""
    from agiasi.soul import SOUL_MIXES

    if mix not in SOUL_MIXES:
        raise AgiasiError(f"unknown soul mix {mix!r}; choose one of {', '.join(SOUL_MIXES)}")
    n, k = blocks.shape[0], blocks.shape[1]
    if mix == "convex":
        blocks = blocks - torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    rows = w.shape[0]
    per_block = w.view(rows, n, k)
    wr = torch.bmm(per_block.transpose(0, 1), blocks)  # (n, rows, k)
    per_block.add_(wr.transpose(0, 1), alpha=float(gate))  # in place: no (rows, H) temporaries
    return w


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """What the NF4 model computed with: quantize to NF4 (blocksize 64, double quant) and back.

    On a machine with a GPU the round trip runs there (bitsandbytes' CUDA kernels, those the
    GPU training used, and ~100x faster than its CPU path); the result comes back to ``w``'s
    device. On a CPU, :func:`_nf4_roundtrip_cpu`."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise AgiasiError(
            "--merge-base nf4 needs bitsandbytes: pip install bitsandbytes (or --merge-base w16)"
        ) from None
    device = w.device if w.is_cuda or not torch.cuda.is_available() else torch.device("cuda")
    if device.type == "cpu" and w.numel() % 64 == 0:
        return _nf4_roundtrip_cpu(w, bnbf)
    q, state = bnbf.quantize_4bit(
        w.to(device).to(torch.float32).contiguous(),  # convert where the work happens
        blocksize=64,
        quant_type="nf4",
        compress_statistics=True,
    )
    return bnbf.dequantize_4bit(q, state).to(w.dtype).to(w.device)


def _nf4_roundtrip_cpu(w: torch.Tensor, bnbf, step: int = 4096) -> torch.Tensor:
    """bitsandbytes' CPU quantize → dequantize, the same float32 operations without packing the
    codes into bytes and unpacking them again, in chunks of 4,096 blocks that stay in the cache.

    The code search is written by hand because bitsandbytes' ``bucketize`` (a branchy binary
    search per weight) was most of a CPU export's time (bench/RESULTS.md): the code index is the
    number of NF4 bounds strictly below the scaled weight, which is what ``bucketize`` returns,
    so 15 comparisons count it. They write float32 0/1, not bool: torch vectorizes a comparison
    only when its result has the inputs' dtype (3.4× faster than a bool result), and sums of at
    most 15 ones are exact. 40 % less time than ``bucketize`` on a 25 M-weight matrix on 2
    threads, 60 % on one. The clamp to [-1, 1] is dropped: every bound lies inside it, so the
    count cannot change. The scales' double quantization is bitsandbytes' own call. Bit-equal
    for finite weights: tests/unit/export/test_merge.py (a non-finite weight is refused after
    the merge anyway)."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, _ = _get_4bit_quantize_bounds("nf4", w.device)
    bounds = bounds.tolist()
    code = bnbf.get_4bit_type("nf4", device=w.device)
    a = w.to(torch.float32).reshape(-1, 64)
    absmax = a.abs().amax(dim=1)
    offset = _mean_as_loaded(absmax)
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    scales = bnbf.dequantize_blockwise(qabsmax, state2)
    scales += offset
    scales = scales.float()
    inv = 1.0 / absmax.clamp(min=1e-38)
    out = torch.empty(a.shape, dtype=w.dtype)
    n = min(step, a.shape[0])
    count, above = torch.empty((n, 64)), torch.empty((n, 64))
    index = torch.empty((n, 64), dtype=torch.int32)
    for b0 in range(0, a.shape[0], step):
        rows = slice(b0, b0 + step)
        scaled = a[rows] * inv[rows, None]
        k = scaled.shape[0]
        ck, ak, ik = count[:k], above[:k], index[:k]
        torch.gt(scaled, bounds[0], out=ck)
        for b in bounds[1:]:
            ck.add_(torch.gt(scaled, b, out=ak))
        value = code.index_select(0, ik.copy_(ck).view(-1)).view(k, 64)
        out[rows] = value.mul_(scales[rows, None])
    return out.reshape(w.shape)


# How many threads this process's torch uses by default: the model was quantized at load with
# this many (read at import, before the export's stream shares the cores out).
_LOAD_THREADS = torch.get_num_threads()


def _mean_as_loaded(absmax: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``absmax.mean()``, summed by as many threads as when the model was loaded.

    A float32 sum's rounding depends on how many threads split it: at the export's shared
    thread count (:func:`agiasi.export.hf._cores_shared`) the offset moved by 4e-9 and 1e-4 of
    a layer's weights came back one bfloat16 step away from what the NF4 model computed with.
    Thread counts are per thread in torch, so this changes the merge worker's, briefly (a thread
    started in that moment would inherit it: its speed, never a value, would change)."""
    n = torch.get_num_threads()
    if n == _LOAD_THREADS:
        return absmax.mean()
    torch.set_num_threads(_LOAD_THREADS)
    try:
        return absmax.mean()
    finally:
        torch.set_num_threads(n)


def is_quantized_linear(key: str, shape: tuple[int, ...]) -> bool:
    """bitsandbytes quantizes every nn.Linear but the head (embeddings and norms stay)."""
    return (
        len(shape) == 2
        and key.endswith(".weight")
        and "embed" not in key
        and not key.startswith("lm_head")
    )


def lora_pairs(
    adapter: dict[str, torch.Tensor], r: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base weight key: (A, B)}`` from a PEFT adapter state dict; anything else is refused,
    and so is a pair whose rank is not the config's ``r`` (it would merge with the wrong scale)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        if ".lora_A." in key or ".lora_B." in key:
            stem, rest = key.split(".lora_", 1)
            pairs.setdefault(stem, {})[rest[0]] = t
        else:
            raise AgiasiError(f"unexpected adapter tensor {key!r} (only LoRA A/B are merged)")
    out = {}
    for stem, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AgiasiError(f"LoRA pair for {stem!r} is incomplete (have {sorted(ab)})")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (r and a.shape[0] != r):
            raise AgiasiError(
                f"LoRA pair for {stem!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, not rank "
                f"{r if r else 'A rows = B columns'} as adapter_config.json says; a damaged file?"
            )
        out[_base_key(stem) + ".weight"] = (a, b)
    return out


def _base_key(peft_stem: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if peft_stem.startswith(prefix):
            return peft_stem[len(prefix) :]
    return peft_stem


def rotation_from_state(info, state: dict[str, Any]) -> torch.Tensor:
    """Dense R (float64) from ``soul.json``'s soul record (:class:`agiasi.checkpoint.record.SoulRecord`)
    and ``soul.pt``'s rotation."""
    soul = Soul(SoulConfig(hidden_size=info.hidden_size, rotation=info.kind))
    try:
        soul.rotation.load_state_dict(state["so8_rotation"])
    except (RuntimeError, KeyError) as e:
        raise AgiasiError(f"soul.pt does not fit its soul.json: {e}") from None
    with torch.no_grad():
        return soul.rotation_matrix(torch.float64)


@dataclass
class SoulFold:
    """What the head fold needs: R, α and the mix (checkpoints before the option: residual)."""

    rotation: torch.Tensor
    alpha: float
    mix: str = LEGACY_MIX


# --------------------------------------------------------------------------- state dicts


def merge_lora(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], lora_alpha: float, r: int
) -> dict[str, torch.Tensor]:
    """New state dict with ``W + (lora_alpha / r) · B A`` for every LoRA pair (float64 math)."""
    out = dict(base)
    for target, (a, b) in lora_pairs(adapter).items():
        if target not in base:
            raise AgiasiError(f"LoRA targets {target!r}, which the base model does not have")
        out[target] = merge_tensor(base[target], a, b, lora_alpha / r, base[target].dtype)
    return out


def fold_soul(
    sd: dict[str, torch.Tensor],
    rotation: torch.Tensor,
    alpha: float,
    tied: bool,
    mix: str,
    head_key: str = HEAD_KEY,
    embed_key: str = EMBED_KEY,
) -> dict[str, torch.Tensor]:
    """New state dict whose head carries the soul; a tied head is untied into its own tensor."""
    out = dict(sd)
    if head_key in out and not tied:
        head = out[head_key]
    elif embed_key in out:
        head = out[embed_key]  # untie: the embedding stays as it was
    else:
        raise AgiasiError(f"cannot fold: neither {head_key} nor {embed_key} is in the state dict")
    out[head_key] = fold_head(head, rotation, float(alpha), mix, head.dtype)
    return out


# --------------------------------------------------------------------------- streaming


@dataclass
class MergePlan:
    """Everything the stream needs; built once, before any tensor is read."""

    base: LazyWeights
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    merge_base: str  # "w16" or "nf4"
    dtype: torch.dtype
    tied: bool
    soul: SoulFold | None
    device: str = "cpu"  # where the float64 math runs ("cuda": the same math, ~10x faster)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every tensor the stream yields, in order (for headers up front)."""
        keys = [k for k in self.base.keys() if not k.endswith("rotary_emb.inv_freq")]
        head_src = self.head_source()
        shapes = {k: self.base.shape(k) for k in keys if k != HEAD_KEY}
        shapes[HEAD_KEY] = self.base.shape(head_src)
        missing = [k for k in self.lora if k not in shapes]
        if missing:
            raise AgiasiError(f"LoRA targets {missing[0]!r}, which the base model does not have")
        return shapes

    def head_source(self) -> str:
        if HEAD_KEY in self.base and not self.tied:
            return HEAD_KEY
        if EMBED_KEY in self.base:
            return EMBED_KEY
        raise AgiasiError(f"the base model has neither {HEAD_KEY} nor {EMBED_KEY}")


def merged_tensor(plan: MergePlan, key: str) -> torch.Tensor:
    """The final value of one output tensor: base (NF4 round trip if asked) → LoRA → fold."""
    src = plan.head_source() if key == HEAD_KEY else key
    w = plan.base.get(src).to(plan.device).to(plan.dtype)  # what from_pretrained(dtype=…) holds
    if plan.merge_base == "nf4" and key != HEAD_KEY and is_quantized_linear(key, tuple(w.shape)):
        w = nf4_roundtrip(w)
    if key in plan.lora:
        a, b = plan.lora[key]
        w = merge_tensor(w, a, b, plan.scaling, plan.dtype)
    if key == HEAD_KEY and plan.soul is not None:
        w = fold_head(w, plan.soul.rotation, plan.soul.alpha, plan.soul.mix, plan.dtype)
    elif key == HEAD_KEY and src != HEAD_KEY:
        w = w.clone()  # untied copy of the embedding
    return w.contiguous().cpu()


def merged_tensors(plan: MergePlan, ahead: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Final tensors one at a time, in :meth:`MergePlan.output_shapes` order.

    With ``ahead`` = 1 the next tensor is read and merged on a worker thread while the caller
    writes this one (file reads, bitsandbytes and the float64 math release the GIL), so reading,
    merging and writing overlap; memory holds one tensor more. Errors surface in order.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    keys = iter(plan.output_shapes())
    if ahead <= 0:
        for key in keys:
            yield key, _finite(key, merged_tensor(plan, key))
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agiasi-merge")
    try:
        pending: deque = deque()
        for key in keys:
            pending.append((key, pool.submit(_merged_finite, plan, key)))
            if len(pending) > ahead:
                name, fut = pending.popleft()
                yield name, fut.result()
        while pending:
            name, fut = pending.popleft()
            yield name, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merged_finite(plan: MergePlan, key: str) -> torch.Tensor:
    return _finite(key, merged_tensor(plan, key))


def _finite(key: str, t: torch.Tensor) -> torch.Tensor:
    # min and max propagate nan, and an inf is one of them: one vectorized pass (3 ms for a
    # 49 M-value embedding, where isfinite(t).all() built a tensor-sized mask in 130 ms)
    if (
        t.is_floating_point()
        and t.numel()
        and not all(bool(torch.isfinite(x)) for x in torch.aminmax(t))
    ):
        # inside the export's temporary folder: nothing under the final name is written
        raise AgiasiError(
            f"{key} is non-finite (nan/inf) after the merge: the base model's weights or the "
            "LoRA overflow in the export dtype; nothing was exported"
        )
    return t
