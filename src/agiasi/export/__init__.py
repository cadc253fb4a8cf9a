"""One plain model from a step folder: the typed config and plan, the HF folder with the streamed
GGUFs, the quantized GGUFs, the fidelity measure, the merge and fold, calibration, the Ollama
Modelfile.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    calibration: Calibration calibration_text choose_calibration
    checks: check_special_ids
    config: ExportConfig ExportPlan
    files: failed_check format_report modelfile nonfinite_figures
    merge: MergePlan fold_soul merge_lora merge_tensor merged_tensors
    ollama: CHAT_FORMATS chat_format render_go
    parity: compare_all
    run: export
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
