"""Measuring a model: perplexity, JGLUE multiple choice as lm-evaluation-harness scores it (tasks,
log-likelihood, statistics), and opening anything measured (a step folder, an HF folder, a
GGUF).
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    benchmark: eval_inputs export_rows format_benchmark parse_export_spec run_benchmark score_set without_items
    entry: run_eval
    loglik: encode_pair item_tokens
    models: GGUFModel hf_greedy hf_logits load_hf_model model_kind open_eval_model
    perplexity: EvalConfig eval_text eval_window evaluate log_softmax_np prefix_ids text_ids
    stats: mcnemar_exact paired_bootstrap verdict
    tasks: JNLI_LABELS TASKS chat_messages continuations plain_prompt prepare read_items
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
