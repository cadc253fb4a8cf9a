"""The on-disk formats of training: the step folder (atomic writes, safe reads, discovery), its
typed record (``soul.json``) and the run folder (lock, metrics, ``best.json``, ``--step``). It
knows the model only by the shape of what it saves
(:class:`agiasi.checkpoint.step_folder.SoulModel`), never by class.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    record: StepRecord
    run_folder: METRICS RunLock check_output_dir check_output_path is_run_folder last_loss prepare_run_folder read_best refuse_links resolve_step run_identity write_best
    step_folder: ADAPTER_WEIGHTS SOUL_PT SoulModel TRAINER_STATE TRAIN_CONFIG atomic_folder check_same_base check_same_weights check_soul_state checkpoint_problem clean_stale_temp find_resume_checkpoint is_step_folder load_into read_lora_config read_manifest required_files safe_torch_load write_step write_step_files
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
