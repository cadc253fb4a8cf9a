"""The wrapper (base + LoRA + soul) and everything that builds or runs it: its options, loading,
the losses, precision, NF4, activation and embedding offload, MLP tiling.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    config: ModelConfig RUNTIME_FIELDS checkpoint_model_config lora_targets_for match_lora_targets
    host_embedding: head_reads_input_embedding keep_input_embedding_on_host
    loading: DType Quantization check_config_fits_weights load_config open_model parse_device release_memory resolve_dtype
    losses: causal_lm_loss chunked_causal_lm_loss
    nf4: NF4Matmul block_scales dequantize lora_addmm nf4_linear use_traceable_nf4
    offload: available_host_memory check_host_memory offloaded_checkpoint
    tiling: enable_tiled_mlp
    wrapper: AGIASI_SO8T_Wrapper
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
