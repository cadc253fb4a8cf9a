"""Datasets → token examples → batches, one module per step: ``files`` (file kinds → rows) →
``formats`` (rows → text or chat records) → ``load`` (sources, validation split,
:func:`load_data`) → ``tokenize`` (records → examples) → ``batching`` (examples → resumable,
rank-sharded, optionally packed micro-batches); ``preview`` is what ``agiasi data`` prints;
``preference`` turns preference pairs (TRL's and LLaMA-Factory's shapes) into token pairs.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    batching: BatchStream collate collate_pairs pack
    files: source_kind
    load: Data iter_records load_data load_records split_eval split_sources
    preference: PREFERENCE_FORMATS PairExample iter_pairs load_pairs to_pair tokenize_pairs
    preview: DataConfig format_summary preview_data summarize
    tokenize: Example IGNORE check_turn_text control_texts render_chat tokenize_records
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
