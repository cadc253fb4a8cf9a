"""How to build the wrapper: :class:`ModelConfig` (the model flags), the LoRA targets of an
architecture, and the options a step folder records.

Apart from the wrapper (:mod:`agiasi.model.wrapper`) because `info`, training's config and the export
plan all read these without building a model (and without importing peft).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from agiasi.errors import AgiasiError
from agiasi.model.loading import DType, Quantization
from agiasi.options import check, option
from agiasi.soul import AlphaMode, RotationInit, RotationKind, SoulConfig, SoulMix


@dataclass
class ModelConfig:
    """How to build the wrapper. Field names match the CLI flags (``--lora-r`` → ``lora_r``)."""

    base_model: str = option(help="hub id or local folder of the causal LM to inject")
    quantization: Quantization = option(
        "nf4", "nf4: 4-bit NF4 base (QLoRA, needs bitsandbytes); none: the base in --dtype"
    )
    dtype: DType = option(
        "auto",
        "compute dtype; auto = float32 on the CPU (bf16 is 40-70x slower on CPUs without native "
        "bf16), bf16 on GPUs that support it, else fp16",
    )
    lora_r: int = option(16, "LoRA rank", ge=1)
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is scaled by alpha/r)", gt=0)
    lora_dropout: float = option(0.05, "dropout on the LoRA input", ge=0.0, lt=1.0)
    lora_targets: list[str] | None = option(
        None,
        "comma list of module names to adapt; default: per architecture (Phi-3: qkv_proj,o_proj)",
    )
    soul: bool = option(True, "--no-soul: the control run, plain QLoRA through the same loop")
    soul_mix: SoulMix = option(
        "convex",
        "convex: h + g(Rh - h), equal to the base at R = I for every gate; residual: the design "
        "note's h + g Rh, which scales the logits by 1 + g while R is near the identity",
    )
    rotation: RotationKind = option(
        "so8", "so8: H/8 blocks in SO(8) (28 parameters a block); full: the note's dense O(H)"
    )
    rotation_init: RotationInit = option(
        "identity", "identity: start as the base model; random: the note's random orthogonal R"
    )
    alpha_mode: AlphaMode = option(
        "schedule",
        "schedule: alpha set every step by the annealing; learned: trained from --alpha-start",
    )
    alpha_start: float = option(-5.0, "alpha at step 0 (gate = sigmoid(alpha))")
    ortho_weight: float = option(0.1, "weight of the orthogonality monitor ||R^T R - I||_F", ge=0.0)
    gradient_checkpointing: bool = option(
        False, "recompute each decoder layer in the backward pass (less memory, ~30% more compute)"
    )
    offload_activations: bool = option(
        False,
        "keep checkpointed layer inputs in pinned CPU memory, copied beside the compute (long "
        "sequences on 12 GB; on a GPU also the faster checkpoint)",
    )
    offload_embeddings: bool = option(
        False,
        "keep the input embedding in pinned host memory, read in place by the GPU (frees "
        "vocab x hidden x 2 bytes of GPU memory: 0.18 GiB for Phi-3.5-mini, 1 GiB for a "
        "Llama-3 vocabulary; exact; CUDA runs only, not with a head tied to the embedding)",
    )
    compile: bool = option(False, "torch.compile each decoder layer (faster small batches on GPU)")
    mlp_tile: int = option(
        8192,
        "run each layer's MLP on tiles of this many tokens when a batch holds more (long "
        "sequences in less memory; exact); 0: never tile",
        ge=0,
    )
    trust_remote_code: bool = option(
        False, "run the model's own Python code from its folder or the hub (only if you trust it)"
    )

    def validate(self) -> None:
        check(self)
        if not self.base_model:
            raise AgiasiError("--base-model is required (a hub id or a local model folder)")
        if self.offload_activations and not self.gradient_checkpointing:
            raise AgiasiError("--offload-activations needs --gradient-checkpointing")

    def soul_config(self, hidden_size: int) -> SoulConfig:
        return SoulConfig(
            hidden_size=hidden_size,
            rotation=self.rotation,
            init=self.rotation_init,
            alpha_mode=self.alpha_mode,
            alpha_start=self.alpha_start,
            ortho_weight=self.ortho_weight,
            mix=self.soul_mix,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(ModelConfig)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def lora_targets_for(config, override: list[str] | None = None) -> list[str]:
    """The architecture table's LoRA targets, or the user's ``--lora-targets``."""
    from agiasi.architectures import ARCHITECTURES

    if override:
        return list(override)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise AgiasiError(
            f"unsupported architecture {config.model_type!r}: agiasi knows "
            f"{', '.join(ARCHITECTURES)}; to try another causal LM pass --lora-targets "
            "(its attention projection names, e.g. q_proj,v_proj)"
        )
    return list(arch.lora_targets)


def match_lora_targets(model: nn.Module, targets: list[str]) -> dict[str, int]:
    """Count modules each target matches (PEFT's suffix rule); fail loudly on zero matches."""
    counts = dict.fromkeys(targets, 0)
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) or type(module).__name__.startswith("Linear"):
            linear_names.add(leaf)
        if leaf in counts:
            counts[leaf] += 1
    missing = [t for t, n in counts.items() if n == 0]
    if missing:
        raise AgiasiError(
            f"LoRA target(s) {', '.join(missing)} match no module of this model; "
            f"its linear layers are: {', '.join(sorted(linear_names))}"
        )
    return counts


# How a model is *run* (dtype, compile, checkpointing, remote code) is chosen on each command, not
# inherited from the checkpoint: a bf16 GPU run must not make CPU evaluation 40× slower, and a
# file must never switch remote code on.
RUNTIME_FIELDS = (
    "dtype",
    "compile",
    "gradient_checkpointing",
    "offload_activations",
    "offload_embeddings",
    "mlp_tile",
)


def checkpoint_model_config(
    manifest: dict[str, Any], ckpt_dir: str | os.PathLike, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The wrapper options a step folder describes, with this command's ``overrides`` applied.

    ``trust_remote_code`` is never taken from the file: a checkpoint whose base model needs its
    own code is refused unless the caller passes ``trust_remote_code=True`` itself.
    """
    recorded = manifest.model
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise AgiasiError(
            f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    cfg = {
        k: v
        for k, v in recorded.items()
        if k in known and k not in RUNTIME_FIELDS and k != "trust_remote_code"
    }
    if recorded.get("trust_remote_code") is True and not overrides.get("trust_remote_code"):
        raise AgiasiError(
            f"checkpoint {str(ckpt_dir)!r} was trained on a base model that runs its own code "
            f"({recorded.get('base_model')!r}); agiasi runs no code a file asks for. Pass "
            "--trust-remote-code on this command (trust_remote_code=True in Python) only if you "
            "trust that model's code"
        )
    cfg["soul_mix"] = manifest.mix
    cfg.update(overrides)
    cfg.setdefault("trust_remote_code", False)
    return cfg
