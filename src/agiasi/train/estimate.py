r"""Will it fit? A training run's peak GPU memory, from ``config.json`` and the run's flags.

No weight is read: the model is built on PyTorch's meta device from its config, so every
parameter's shape (and which linears bitsandbytes quantizes, which ones LoRA adapts) is the
loaded model's. Per rank, in bytes, with ``N`` = tokens of a micro-batch (batch × length),
``H`` hidden, ``I`` intermediate, ``L`` layers, ``V`` vocabulary, ``b`` the compute dtype's bytes:

* **weights** — exact. An NF4 linear of ``n`` weights is what bitsandbytes stores:
  ``n/2`` packed bytes, ``n/64`` uint8 block scales (double quantization), ``4·⌈n/16384⌉``
  bytes of second-level scales and two code tables; every other parameter (embedding, head,
  norms) in the compute dtype, the input embedding in host memory with
  ``--offload-embeddings``, a tied head counted once. Each tensor is rounded up to the caching
  allocator's 512-byte blocks.
* **adapter** — exact: LoRA's and the soul's trainable parameters are float32 (PEFT keeps
  them so); each has its gradient and AdamW's two moments: 16 bytes a parameter.
* **checkpoints** — exact: with gradient checkpointing each layer keeps its input, ``L·N·H·b``
  (with ``--offload-activations`` those live in pinned host memory and about two layers' are
  on the card). Without checkpointing every layer keeps its whole working set (next item).
* **layer** — one decoder layer's recompute and backward: ``N·(k_h·H + k_q·Q)·b +
  min(N, tile)·k_i·I·b``, ``Q`` the q/k/v widths, plus the LoRA inputs dropout copies. The
  ``k`` are fitted to peaks measured on a GPU (:data:`FIT`, ``bench/estimate.py``), eager and
  compiled apart (the compiler saves fewer tensors).
* **head** — the chunked head and loss (:mod:`agiasi.model.losses`): one chunk's logits in the
  compute dtype and float32, and the gradient of ``h`` kept for every token (``N·H·b``).
* **workspace** — cuBLAS's workspace and the optimizer's temporaries (fitted constant, plus 4
  bytes a trainable parameter for AdamW's foreach temporaries).

The caching allocator reserves more than is allocated at the peak (blocks split by earlier,
differently sized tensors): ``reserved = allocated + r·(allocated − weights − adapter) + r0``,
also fitted. ``bench/estimate.py`` prints predicted vs measured peaks for every configuration
it runs and ``bench/RESULTS.md`` keeps the table with its worst error. The CUDA context (what
``nvidia-smi`` shows beyond the reserved memory, about half a GiB) is added for the card.

Why written here and not taken from a library: the peers' estimators (Unsloth Studio's,
accelerate's ``estimate-memory``) count weights only, or were found to be off by 2–6× on
QLoRA runs; what agiasi keeps per token is its own (chunked loss, offloaded checkpoints,
tiled MLP), so only its own formula checked against its own measured peaks can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
ALLOC_BLOCK = 512  # the CUDA caching allocator's rounding
NF4_BLOCK, NESTED_BLOCK = 64, 256
LOSS_CHUNK = 1024  # agiasi.model.wrapper's loss_chunk
CUDA_CONTEXT = int(0.5 * GIB)  # the driver's context, outside torch's reserved memory

# Fitted to peaks measured on an H100 capped at 11.5 GiB (bench/RESULTS.md, "Will it fit?"):
# sessions 14-16's bench/train.py rows of agiasi's step, Phi-3.5-mini's shape and a Llama of its
# dimensions, 512 to 65,536 tokens, compiled with offloaded checkpoints (``c``/``o``, with and
# without ``e``), and the oldest rows of the eager step (2026-11-25). Units: one layer's
# recompute and backward keeps ``k·width·b`` bytes a token; the allocator's slack is
# ``slack_mib + slack_widest · (the widest activation of a layer) + slack_moving · (what is
# not weights or adapter)``. Settings no measured row covers — no checkpointing, the dense
# rotation, a bf16 base — use rough coefficients and the estimate says they are unchecked.
FIT: dict[str, float] = {
    "compiled_h": 9.3,
    "compiled_q": 1.0,
    "compiled_i": 1.54,
    "eager_h": 19.5,
    "eager_q": 1.0,
    "eager_i": 0.3,
    "nockpt_h": 12.0,
    "nockpt_q": 1.0,
    "nockpt_i": 3.0,
    "dropout": 1.0,  # per LoRA input width: the dropped copy of one layer's LoRA inputs
    "full_soul": 12.0,  # float32 H × H matrices the dense rotation's parametrization keeps
    "workspace_mib": 72.0,
    "slack_mib": 171.0,
    "slack_widest": 3.2,
    "slack_moving": 0.12,
    "host_base_gib": 2.5,
}


def checked(cfg) -> bool:
    """Whether measured peaks cover this configuration's kind (module docstring, :data:`FIT`)."""
    return (
        cfg.gradient_checkpointing
        and cfg.quantization == "nf4"
        and not (cfg.soul and cfg.rotation == "full")
    )


def _round(n: int) -> int:
    return -(-n // ALLOC_BLOCK) * ALLOC_BLOCK


def nf4_tensor_bytes(n: int) -> list[int]:
    """The tensors bitsandbytes keeps for an NF4 weight of ``n`` values (double quant), in
    bytes: packed codes, uint8 block scales, float32 second-level scales, the nested
    quantization's 256-entry code table, the NF4 table, the offset."""
    blocks = -(-n // NF4_BLOCK)
    return [(n + 1) // 2, blocks, 4 * -(-blocks // NESTED_BLOCK), 4 * 256, 4 * 16, 4]


def nf4_bytes(n: int) -> int:
    """:func:`nf4_tensor_bytes` on the card: each rounded to the allocator's block."""
    return sum(_round(x) for x in nf4_tensor_bytes(n))


@dataclass
class Shape:
    """What the formula needs of a model, read off its meta-device build."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    qkv_width: int  # q + k + v output widths of one layer
    weight_bytes: int  # on the card
    embedding_bytes: int  # the input embedding (host memory with --offload-embeddings)
    parameters: int
    lora_parameters: int
    lora_in_width: int  # sum of one layer's LoRA targets' input widths (what dropout copies)
    soul_parameters: int
    widest_out: int  # the widest output of a decoder layer's linears (gate_up: 2 × intermediate)
    tied: bool


@dataclass
class Estimate:
    """The plan and the predicted peaks of one training run, per rank."""

    shape: Shape
    tokens_per_micro_batch: int
    tokens_per_step: int
    steps: int
    parts: dict[str, int]  # bytes on the card
    allocated: int
    reserved: int
    card: int  # reserved + the CUDA context
    host: int  # predicted peak host RAM
    host_parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        g = lambda v: round(v / GIB, 3)  # noqa: E731
        return {
            "parameters": self.shape.parameters,
            "trainable": self.shape.lora_parameters + self.shape.soul_parameters,
            "steps": self.steps,
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "tokens_per_step": self.tokens_per_step,
            "tokens": self.tokens_per_step * self.steps,
            "gpu_gib": {k: g(v) for k, v in self.parts.items()},
            "allocated_gib": g(self.allocated),
            "reserved_gib": g(self.reserved),
            "card_gib": g(self.card),
            "host_gib": g(self.host),
            "host_parts_gib": {k: g(v) for k, v in self.host_parts.items()},
            "notes": self.notes,
        }


def model_shape(cfg) -> Shape:
    """Build the model on the meta device (no weight is read or allocated) and measure it as
    ``agiasi train`` would load it: NF4 linears, LoRA targets, the soul."""
    from torch import nn

    from agiasi.model.config import lora_targets_for, match_lora_targets
    from agiasi.model.loading import load_config, meta_model
    from agiasi.soul import Soul

    hf = load_config(cfg.base_model, cfg.trust_remote_code)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    model = meta_model(hf, cfg.trust_remote_code)
    targets = lora_targets_for(hf, cfg.lora_targets)
    match_lora_targets(model, targets)  # the same loud failure as the trainer's
    b = dtype_bytes(cfg)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    decoder = getattr(model, model.base_model_prefix)
    quantized = {
        id(m.weight)
        for m in decoder.modules()
        if isinstance(m, nn.Linear) and cfg.quantization == "nf4"
    }
    weight_bytes, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized:
            weight_bytes += nf4_bytes(p.numel())
        else:
            weight_bytes += _round(p.numel() * b)
    lora, lora_in = 0, 0
    layer0 = decoder.layers[0]
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear):
            lora += cfg.lora_r * (m.in_features + m.out_features)
    for name, m in layer0.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear):
            lora_in += m.in_features
    widest = max(m.out_features for m in layer0.modules() if isinstance(m, nn.Linear))
    qkv = sum(
        m.out_features
        for name, m in layer0.named_modules()
        if isinstance(m, nn.Linear)
        and name.rsplit(".", 1)[-1]
        in ("qkv_proj", "q_proj", "k_proj", "v_proj", "c_attn", "query_key_value")  # fmt: skip
    )
    hidden = int(text.hidden_size)
    soul = 0
    if cfg.soul and cfg.rotation == "full":  # the parametrization's H × H original (its init
        soul = hidden * hidden + (cfg.alpha_mode == "learned")  # needs values: not on meta)
    elif cfg.soul:
        soul = Soul(cfg.model_config().soul_config(hidden)).num_trainable()
    return Shape(
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 4 * hidden)),
        layers=int(text.num_hidden_layers),
        vocab=int(embed.weight.shape[0]),
        qkv_width=qkv or 3 * hidden,
        weight_bytes=weight_bytes,
        embedding_bytes=_round(embed.weight.numel() * b),
        parameters=sum(p.numel() for p in model.parameters()),
        lora_parameters=lora,
        lora_in_width=lora_in,
        soul_parameters=soul,
        widest_out=widest,
        tied=tied,
    )


def predict(cfg, shape: Shape, length: int | None = None, b: int = 2) -> Estimate:
    """The formula of the module docstring for one configuration (pure arithmetic)."""
    length = length or cfg.max_length
    n = cfg.batch_size * length
    h, i, big_l, v = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    mode = "compiled" if cfg.compile else "eager"
    tile = cfg.mlp_tile if cfg.mlp_tile else n
    tiled = min(n, tile)
    on_host_embedding = cfg.offload_embeddings and not shape.tied
    parts: dict[str, int] = {}
    parts["weights"] = shape.weight_bytes - (shape.embedding_bytes if on_host_embedding else 0)
    trainable = shape.lora_parameters + shape.soul_parameters
    parts["adapter"] = 16 * trainable
    dropout = FIT["dropout"] * shape.lora_in_width * n * b if cfg.lora_dropout else 0
    layer = (
        n * (FIT[f"{mode}_h"] * h + FIT[f"{mode}_q"] * shape.qkv_width) * b
        + tiled * FIT[f"{mode}_i"] * i * b
        + dropout
    )
    if cfg.gradient_checkpointing:
        kept = 2 if cfg.offload_activations else big_l
        parts["checkpoints"] = kept * n * h * b
        parts["layer"] = int(layer)
    else:
        whole = n * (FIT["nockpt_h"] * h + FIT["nockpt_q"] * shape.qkv_width) * b
        whole += n * FIT["nockpt_i"] * i * b + dropout
        parts["checkpoints"] = int(big_l * whole)
        parts["layer"] = int(layer)
    parts["head"] = min(n, LOSS_CHUNK) * v * (b + 4) + n * h * b
    if cfg.soul and cfg.rotation == "full":
        parts["soul"] = int(FIT["full_soul"] * h * h * 4)
    parts["workspace"] = int(FIT["workspace_mib"] * 2**20)
    allocated = sum(parts.values())
    moving = allocated - parts["weights"] - parts["adapter"]
    widest = tiled * shape.widest_out * b
    reserved = int(
        allocated
        + FIT["slack_mib"] * 2**20
        + FIT["slack_widest"] * widest
        + FIT["slack_moving"] * moving
    )
    host_parts = {"process": int(FIT["host_base_gib"] * GIB)}
    if cfg.gradient_checkpointing and cfg.offload_activations:
        host_parts["offloaded checkpoints"] = big_l * n * h * b
    if on_host_embedding:
        host_parts["input embedding"] = shape.embedding_bytes
    steps = cfg.max_steps
    notes = [] if checked(cfg) else [
        "note: no measured peak covers this configuration yet (no gradient checkpointing, the "
        "dense rotation or a 16-bit base): the estimate is the formula's alone"
    ]  # fmt: skip
    return Estimate(
        shape=shape,
        tokens_per_micro_batch=n,
        tokens_per_step=n * cfg.grad_accum,
        steps=steps,
        parts=parts,
        allocated=allocated,
        reserved=reserved,
        card=reserved + CUDA_CONTEXT,
        host=sum(host_parts.values()),
        host_parts=host_parts,
        notes=notes,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_estimate(e: Estimate) -> str:
    s = e.shape
    lines = [
        f"plan: {s.parameters / 1e9:.2f} B parameters, {s.lora_parameters + s.soul_parameters:,} "
        f"trainable; {e.steps} steps × {e.tokens_per_step:,} tokens = "
        f"{e.steps * e.tokens_per_step:,} tokens",
        f"GPU memory, predicted peak per card: {_gib(e.card)} "
        f"({_gib(e.reserved)} reserved by PyTorch + {_gib(CUDA_CONTEXT)} CUDA context)",
    ]
    for k, v in e.parts.items():
        lines.append(f"  {k:<12} {_gib(v):>10}")
    lines.append(f"  {'allocator':<12} {_gib(e.reserved - e.allocated):>10}  (slack of the cache)")
    lines.append(f"host memory, predicted peak: {_gib(e.host)}")
    for k, v in e.host_parts.items():
        lines.append(f"  {k:<22} {_gib(v):>10}")
    lines.extend(e.notes)
    return "\n".join(lines)


def dtype_bytes(cfg) -> int:
    """The compute dtype's bytes on a card: ``auto`` is bf16 (or fp16), both 2."""
    return 4 if cfg.dtype == "float32" else 2


def estimate_run(cfg, length: int | None = None) -> Estimate:
    """The estimate of ``cfg`` (a :class:`~agiasi.train.config.TrainConfig`)."""
    return predict(cfg, model_shape(cfg), length, dtype_bytes(cfg))


def data_plan(cfg) -> dict[str, Any]:
    """Token counts of ``--dataset`` as ``agiasi data`` counts them (the first records of each
    source): what a step holds and how many steps an epoch is. Text is packed to
    ``--max-length`` rows; chat examples pad to the longest of their batch."""
    from agiasi.data.preview import DataConfig, summarize

    s = summarize(
        DataConfig(
            dataset=cfg.dataset or str(_shipped_sample()),
            base_model=cfg.base_model,
            dataset_format=cfg.dataset_format,
            dataset_columns=cfg.dataset_columns,
            max_length=cfg.max_length,
            trust_remote_code=cfg.trust_remote_code,
        )
    )
    tokens = sum(x["tokens"] for x in s["sources"])
    longest = max(x["longest"] for x in s["sources"])
    text = any(x.get("chat_examples", 0) < x.get("records", 0) for x in s["sources"])
    length = cfg.max_length if text or cfg.packing else min(cfg.max_length, longest)
    return {
        "tokens": tokens,
        "longest": longest,
        "length": max(2, length),
        "sampled": any(x.get("sampled") for x in s["sources"]),
    }


def _shipped_sample():
    from agiasi.shipped import default_dataset

    return default_dataset()


def estimate_with_data(cfg) -> tuple[Estimate, dict[str, Any]]:
    """The estimate at the data's longest micro-batch, with the plan's token counts (at
    ``--max-length`` when the data cannot be counted, which the notes say)."""
    from agiasi.errors import AgiasiError, first_line

    cfg.validate()
    shape = model_shape(cfg)
    try:
        plan = data_plan(cfg)
    except AgiasiError as err:  # the estimate stands without the data: at --max-length
        plan = {"length": cfg.max_length, "error": first_line(err)}
    e = predict(cfg, shape, plan["length"], dtype_bytes(cfg))
    per_step = e.tokens_per_step
    if "error" in plan:
        e.notes.append(f"data not counted ({plan['error']}); memory at --max-length")
    else:
        approx = "≈ " if plan["sampled"] else ""
        e.notes.append(
            f"data: {approx}{plan['tokens']:,} tokens; the longest micro-batch is "
            f"{cfg.batch_size} × {plan['length']:,} tokens; one epoch ≈ "
            f"{max(1, plan['tokens'] // per_step):,} steps of {per_step:,} tokens"
        )
    return e, plan


def estimate_command(cfg, as_json: bool = False, out=print) -> Estimate:
    """``agiasi estimate`` / ``agiasi train --dry-run``: the plan with the data's token counts
    and the predicted peaks, without loading a weight."""
    e, plan = estimate_with_data(cfg)
    if as_json:
        import json

        out(json.dumps({**e.as_dict(), "data": plan}, ensure_ascii=False))
    else:
        out(format_estimate(e))
    return e


def gpu_memory_here() -> dict[str, float] | None:
    """The first card's total and free GiB from ``nvidia-smi`` (no CUDA context in this
    process: the studio's server must not hold half a GiB of the card it reports on)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        line = subprocess.run(
            [smi, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()[0]  # fmt: skip
        total, free = (float(x) / 1024 for x in line.split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return {"total_gib": round(total, 2), "free_gib": round(free, 2)}


def check_fits(cfg, device, say) -> Estimate | None:
    """Before the model loads: the estimate at ``--max-length`` (the worst micro-batch) against
    the card's free memory (one line naming what would bring it under) and ``--max-memory`` (a
    refusal). On a CPU only ``--max-memory`` is checked. An estimate that cannot be made (a
    model the meta device cannot build) is said and does not stop the run, unless
    ``--max-memory`` asked for it."""
    from agiasi.errors import AgiasiError
    from agiasi.train.session import memory_tips

    if device.type != "cuda" and cfg.max_memory is None:
        return None
    try:
        e = predict(cfg, model_shape(cfg), None, dtype_bytes(cfg))
    except AgiasiError:
        raise
    except Exception as err:  # noqa: BLE001 - an estimate never stops a run by itself
        if cfg.max_memory is not None:
            raise AgiasiError(
                f"--max-memory: the memory estimate failed ({type(err).__name__}: {err})"
            ) from None
        say(f"memory estimate unavailable: {type(err).__name__}: {err}")
        return None
    tips = "; ".join(memory_tips(cfg, e.shape.tied))
    if cfg.max_memory is not None and e.card > cfg.max_memory * GIB:
        raise AgiasiError(
            f"the predicted peak GPU memory is {_gib(e.card)} per card, above --max-memory "
            f"{cfg.max_memory:g} GiB (agiasi estimate shows the parts). To need less: {tips}"
        )
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)  # our own context already taken
        line = (
            f"memory: predicted peak {_gib(e.card)} per card ({_gib(e.reserved)} beside the "
            f"CUDA context); {_gib(free)} free"
        )
        if e.reserved > free:
            line += f" — it may not fit. To need less: {tips}"
        say(line)
    return e
