"""``AGIASI_SO8T_Wrapper``: base causal LM (NF4 or full precision) + LoRA + the soul.

Layout (the design note's three layers)::

    input ids → Cortex: base LM (+ LoRA)  → h, after the final norm
              → Core:   soul (R, α)        → h + sigmoid(α)·(R h − h)  (or the note's h + sigmoid(α)·R h)
              → Output: LM head            → logits

The soul is installed by replacing the causal LM's output-embedding module with
:class:`agiasi.soul.SoulHead`, so the model's own forward and ``generate`` (KV cache included) see
it without hooks. :meth:`AGIASI_SO8T_Wrapper.forward` runs the decoder and that same head
explicitly, so training sees exactly what generation sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from typing import Any

import torch
from torch import nn

from agiasi.errors import AgiasiError, first_line
from agiasi.model.config import (
    ModelConfig,
    checkpoint_model_config,
    lora_targets_for,
    match_lora_targets,
)
from agiasi.model.loading import (
    _warn_once,
    load_config,
    open_model,
    parse_device,
    resolve_dtype,
)
from agiasi.model.losses import (
    causal_lm_loss,
    chunked_causal_lm_loss,
    sequence_logps,
    softcapped_logits,
)
from agiasi.model.precision import (
    keep_nf4_in_float32,
    lora_autocast,
    lora_inputs_in_compute_dtype,
    peft_input_cast,
)
from agiasi.soul import Soul, SoulHead


@dataclass
class SoulOutput:
    """What :meth:`AGIASI_SO8T_Wrapper.forward` returns; also indexable like the note's dict."""

    loss: torch.Tensor | None
    task_loss: torch.Tensor | None
    ortho_loss: torch.Tensor
    logits: torch.Tensor
    alpha: torch.Tensor | None
    gate: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return ["loss", "task_loss", "ortho_loss", "logits", "alpha", "gate"]


# --------------------------------------------------------------------------- the wrapper


@lru_cache(maxsize=1)
def _note_peft_class():
    """PEFT's causal-LM model whose ``load_adapter`` names our adapter by default: the note
    calls ``model.base_model.load_adapter(path)``, and PEFT now requires an adapter name. The
    weights then load in place into the adapter we train ("default"). A subclass, so PEFT itself
    is used as it is (nothing patched)."""
    from peft import PeftModelForCausalLM

    class NotePeftModel(PeftModelForCausalLM):
        def load_adapter(self, model_id, adapter_name: str = "default", **kwargs):
            return super().load_adapter(model_id, adapter_name, **kwargs)

    return NotePeftModel


class AGIASI_SO8T_Wrapper(nn.Module):  # noqa: N801 - the note's public name
    """Base LM (+NF4) + LoRA + soul.

    Attributes (as in the note):
        base_model: the PEFT model (``PeftModelForCausalLM``).
        alpha: the α ``nn.Parameter`` (not trained in ``schedule`` mode).
        so8_rotation: the rotation module; ``so8_rotation(h)`` returns ``h Rᵀ``.
    """

    def __init__(
        self,
        base_model_id: str | None = None,
        device: str | torch.device | None = None,
        config: ModelConfig | None = None,
        **overrides: Any,
    ):
        super().__init__()
        if config is None:
            if not isinstance(base_model_id, (str, os.PathLike)) or not str(base_model_id):
                raise AgiasiError(
                    "AGIASI_SO8T_Wrapper needs a base model: a hub id or a local folder, "
                    f"got {base_model_id!r}"
                )
            known = {f.name for f in fields(ModelConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise AgiasiError(
                    f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
                )
            config = ModelConfig(base_model=str(base_model_id), **overrides)
        elif overrides or (base_model_id and base_model_id != config.base_model):
            raise AgiasiError("pass either a ModelConfig or keyword options, not both")
        config.validate()
        self.config = config
        self.device_ = parse_device(device)
        self.hf_config = load_config(config.base_model, config.trust_remote_code)
        self.lora_targets = lora_targets_for(self.hf_config, config.lora_targets)
        causal_lm = self._load_base()
        self.lora_target_counts = match_lora_targets(causal_lm, self.lora_targets)
        self.base_model = self._wrap_lora(causal_lm)
        if self.compute_dtype == torch.bfloat16:
            lora_inputs_in_compute_dtype(self.base_model)  # bf16 under lora_autocast
        head = self.causal_lm.get_output_embeddings()
        self.hidden_size = int(head.weight.shape[1])
        self._soul: Soul | None = None
        if config.soul:
            soul = Soul(config.soul_config(self.hidden_size)).to(self.device_)
            self.causal_lm.set_output_embeddings(SoulHead(head, soul))
            self._soul = soul
        self._set_up_running(config)

    # ---------------------------------------------------------------- construction

    def _set_up_running(self, config: ModelConfig) -> None:
        """How the decoder runs, not what it computes: recomputation, offloaded layer inputs,
        the tiled MLP, compilation (all exact; memory and speed only)."""
        decoder = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        if config.gradient_checkpointing:
            self.causal_lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.causal_lm.config.use_cache = False
            # transformers adds a hook that makes the embedding's output require grad, which
            # only reentrant checkpointing needs (ours is not). It would make the rows a leaf
            # that autograd holds, with a gradient of its own, until the backward ends: B·T·H
            # values on the card each (384 MiB at 65,536 tokens of Phi-3.5-mini).
            if getattr(self.causal_lm, "_require_grads_hook", None) is not None:
                self.causal_lm.disable_input_require_grads()
        if config.offload_activations:
            from agiasi.model.offload import enable_offloaded_checkpointing

            enable_offloaded_checkpointing(decoder)
        if config.mlp_tile:
            from agiasi.model.tiling import enable_tiled_mlp

            enable_tiled_mlp(decoder, config.mlp_tile)
        self.embedding_on_host = config.offload_embeddings and self.device_.type != "cpu"
        self.embedding_bytes_on_host = 0
        if self.embedding_on_host:
            from agiasi.model.host_embedding import keep_input_embedding_on_host

            self.embedding_bytes_on_host = keep_input_embedding_on_host(
                self.causal_lm, self.device_
            )
        if self.device_.type == "cuda":
            # Loading and quantizing leave freed blocks in the allocator's cache; hand them back
            # to the device (other processes on a shared 12 GB card can use them).
            torch.cuda.empty_cache()
        if config.compile:
            # Each decoder layer compiled on its own: 32 identical layers share one graph, and
            # the kernel-launch overhead of small-batch QLoRA (CPU-bound) shrinks. The NF4
            # linears are rewritten as tensor arithmetic first, so the compiled graph holds
            # their dequantization too (agiasi.model.nf4 says why).
            if config.quantization == "nf4":
                from agiasi.model.nf4 import use_traceable_nf4

                use_traceable_nf4(decoder)
            # Automatic dynamic shapes (not dynamic=False): a second batch width compiles one
            # graph with symbolic sizes that every later width reuses; fixed sizes recompiled
            # each padded width and, after torch's limit of 8, ran the layer uncompiled.
            for layer in decoder.layers:
                layer.compile()

    def _load_base(self) -> nn.Module:

        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, self.device_)
        self.compute_dtype = dtype
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.quantization == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise AgiasiError(
                    "quantization 'nf4' needs bitsandbytes: pip install bitsandbytes "
                    "(or pass --quantization none)"
                ) from None
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_type="nf4",
            )
        # Straight to the device: a 3.8 B fp32 model never passes through host memory on a GPU.
        model = open_model(
            cfg.base_model, dtype, self.device_, self.hf_config, "base model", **kwargs
        )
        if cfg.quantization == "nf4" and dtype == torch.float32:
            keep_nf4_in_float32(model)
        return model

    def _wrap_lora(self, causal_lm: nn.Module):
        from peft import LoraConfig

        lora = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            target_modules=self.lora_targets,
            lora_dropout=self.config.lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # get_peft_model's own steps, with our subclass (below) as the model class
        lora.base_model_name_or_path = causal_lm.__dict__.get("name_or_path", None)
        return _note_peft_class()(causal_lm, lora)

    # ---------------------------------------------------------------- note's attributes

    @property
    def causal_lm(self) -> nn.Module:
        """The HF causal LM inside PEFT (LoRA layers injected in place)."""
        return self.base_model.get_base_model()

    @property
    def soul(self) -> Soul | None:
        return self._soul

    @property
    def alpha(self) -> nn.Parameter:
        self._need_soul("alpha")
        return self._soul.alpha

    @property
    def rotation(self) -> nn.Module:
        """The soul's rotation module (either kind); ``rotation(h)`` returns ``h Rᵀ``."""
        self._need_soul("rotation")
        return self._soul.rotation

    @property
    def so8_rotation(self) -> nn.Module:
        """The design note's name for :attr:`rotation` (also with ``--rotation full``)."""
        self._need_soul("so8_rotation")
        return self._soul.rotation

    def _need_soul(self, what: str) -> None:
        if self._soul is None:
            raise AgiasiError(f"{what}: this wrapper was built with soul=False (control run)")

    @property
    def head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    # ---------------------------------------------------------------- forward

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden state h (after the final norm), what the soul acts on.

        Packed rows (``position_ids`` restarting at 0 per example) go in without the 2-D mask:
        transformers then reads the example boundaries from the positions and keeps attention
        inside each example (a block-diagonal causal mask; on flash attention, varlen kernels).
        A 4-D additive float mask (B, 1, T, T) goes through as it is, with the positions: what
        :mod:`agiasi.eval.loglik` packs an item's choices with.
        """
        decoder = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        with lora_autocast(self.compute_dtype, self.device_):
            return self._decoder_hidden(decoder, input_ids, attention_mask, position_ids)

    @staticmethod
    def _decoder_hidden(decoder, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if attention_mask is not None and attention_mask.ndim == 4:  # an explicit (B,1,T,T) mask
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        elif position_ids is not None:
            out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        else:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_chunk: int = 1024,
        position_ids: torch.Tensor | None = None,
    ) -> SoulOutput:
        """Logits with the soul, and loss = CE(shifted, padding ignored) + w · ‖RᵀR − I‖_F.

        With ``return_logits=False`` (what training uses) the head and the loss run in chunks of
        ``loss_chunk`` positions (``losses.chunked_causal_lm_loss``), so the (T × vocab) fp32
        logits of the whole sequence never exist at once; the loss is the same number.
        """
        if not return_logits and labels is None:
            raise AgiasiError("return_logits=False needs labels (there is nothing else to return)")
        self._check_batch(input_ids, attention_mask, labels)
        if labels is not None and attention_mask is not None:
            # Masked where the labels live (the CPU, for batches from the data stream), so the
            # loss can count and skip positions without waiting on the GPU.
            labels = labels.masked_fill(attention_mask.to(labels.device) == 0, -100)
        # non_blocking: from pinned batches the copy queues behind the GPU's work instead of
        # holding the host until the previous micro-batch's backward has finished.
        input_ids = input_ids.to(self.device_, non_blocking=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device_, non_blocking=True)
        if position_ids is not None:
            position_ids = position_ids.to(self.device_, non_blocking=True)
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        mixed, head, ortho, alpha, gate = self._mix_and_head(h)
        logits = None
        task_loss = None
        if return_logits:
            logits = head(mixed)
            if labels is not None:
                task_loss = causal_lm_loss(logits, labels)
        else:
            task_loss = chunked_causal_lm_loss(mixed, head, labels, loss_chunk)
        loss = None
        if task_loss is not None:
            loss = (
                task_loss + self.config.ortho_weight * ortho
                if self._soul is not None
                else task_loss
            )
        return SoulOutput(
            loss=loss, task_loss=task_loss, ortho_loss=ortho, logits=logits, alpha=alpha, gate=gate
        )

    def sequence_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        soul: Soul | None | str = "own",
        loss_chunk: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row, Σ log p of the labelled tokens (fp32) and their count, with the ortho term:
        what a preference objective scores. ``soul`` replaces this wrapper's own for the call
        (the reference's frozen copy of the starting soul); the head is the same."""
        self._check_batch(input_ids, attention_mask, labels)
        labels = labels.masked_fill(attention_mask.to(labels.device) == 0, -100)
        input_ids = input_ids.to(self.device_, non_blocking=True)
        attention_mask = attention_mask.to(self.device_, non_blocking=True)
        h = self.hidden_states(input_ids, attention_mask)
        mixed, head, ortho, _, _ = self._mix_and_head(h, soul)
        logps, counts = sequence_logps(mixed, head, labels, loss_chunk)
        return logps, counts, ortho

    def _mix_and_head(self, h: torch.Tensor, soul: Soul | None | str = "own"):
        """(mixed state, head, ortho term, α, gate). The soul acts once on the whole sequence
        (B·T·H is small) with one matrix_exp shared with the ortho monitor; the plain head then
        runs on the mixed state, softcapped where HF softcaps (Gemma-2), so training sees what
        inference does."""
        soul = self._soul if isinstance(soul, str) else soul
        if soul is not None:
            prepared = soul.prepare()
            mixed = soul(h, prepared)
            ortho = soul.ortho_loss(prepared)
            alpha, gate = soul.alpha.detach(), soul.gate().detach()
            head = self.head.head
        else:
            mixed, head = h, self.head
            ortho = torch.zeros((), device=h.device)
            alpha = gate = None
        cap = getattr(self.hf_config, "final_logit_softcapping", None)
        if cap:
            head = partial(softcapped_logits, head, float(cap))
        return mixed, head, ortho, alpha, gate

    def _check_batch(self, input_ids, attention_mask=None, labels=None) -> None:
        """Clear errors for what would otherwise fail deep inside the model (or silently)."""
        if not isinstance(input_ids, torch.Tensor):
            raise AgiasiError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise AgiasiError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise AgiasiError(
                f"input_ids must be (batch, sequence) with at least one token, got shape "
                f"{tuple(input_ids.shape)} (add a batch dimension: ids.unsqueeze(0))"
            )
        vocab = self.causal_lm.get_input_embeddings().weight.shape[0]
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise AgiasiError(
                f"token id {lo if lo < 0 else hi} is outside this model's vocabulary [0, {vocab})"
            )
        if attention_mask is not None and attention_mask.ndim == 4:
            b, t = input_ids.shape
            if not attention_mask.is_floating_point() or attention_mask.shape != (b, 1, t, t):
                raise AgiasiError(
                    f"a 4-D attention_mask must be additive floats of shape {(b, 1, t, t)}, "
                    f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            if labels is not None:
                raise AgiasiError("labels with a 4-D attention_mask: mask the labels yourself")
            attention_mask = None
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.is_floating_point():
                raise AgiasiError(f"{name} must be an integer torch.Tensor")
            if t.shape != input_ids.shape:
                raise AgiasiError(
                    f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}: "
                    "they must match"
                )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """HF ``generate`` through the soul (it lives in the head, so the KV cache just works)."""
        self._check_batch(input_ids)
        was_training = self.training
        self.eval()
        kwargs.setdefault("use_cache", True)
        try:
            # HF's loop runs outside lora_autocast: bf16 activations into float32 LoRA weights
            with peft_input_cast(self.base_model):
                return self.base_model.generate(input_ids=input_ids.to(self.device_), **kwargs)
        finally:
            self.train(was_training)

    def get_phase_status(self) -> str:
        if self._soul is None:
            return "⚪ No soul (control run)"
        return self._soul.phase()

    # ---------------------------------------------------------------- bookkeeping

    def trainable_parameters(self) -> dict[str, int]:
        lora = sum(
            p.numel()
            for n, p in self.base_model.named_parameters()
            if p.requires_grad and "lora_" in n
        )
        soul = self._soul.num_trainable() if self._soul is not None else 0
        return {"lora": lora, "soul": soul, "total": lora + soul}

    def soul_state(self) -> dict[str, Any]:
        """``soul.pt`` payload: tensors and ints only (loads with ``weights_only=True``)."""
        self._need_soul("soul_state")
        return {
            "alpha": self._soul.alpha.detach().cpu().clone(),
            "so8_rotation": {
                k: v.detach().cpu().clone() for k, v in self._soul.rotation.state_dict().items()
            },
        }

    def load_soul_state(self, state: dict[str, Any]) -> None:
        self._need_soul("load_soul_state")
        with torch.no_grad():
            self._soul.alpha.copy_(state["alpha"].to(self._soul.alpha.device))
        try:
            self._soul.rotation.load_state_dict(state["so8_rotation"])
        except RuntimeError as e:
            raise AgiasiError(f"soul.pt does not fit this model's soul: {first_line(e)}") from None

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> AGIASI_SO8T_Wrapper:
        """Rebuild base + LoRA + soul from a step folder written by :mod:`agiasi.checkpoint.step_folder`."""
        from agiasi.checkpoint.step_folder import load_into, read_manifest

        manifest = read_manifest(ckpt_dir)
        if overrides.get("soul") is False and manifest.soul is not None:
            soul = manifest.soul
            _warn_once(
                f"from_checkpoint(soul=False): dropping the soul of {ckpt_dir} ({soul.kind}, "
                f"alpha {soul.alpha}, gate {soul.gate}); the model runs as base + LoRA"
            )
        cfg = ModelConfig.from_dict(checkpoint_model_config(manifest, ckpt_dir, overrides))
        wrapper = cls(config=cfg, device=device)
        load_into(wrapper, ckpt_dir)
        return wrapper
