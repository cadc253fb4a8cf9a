"""Training: one visible loop of named steps (``loop``), its typed config, the session set up
before the loop, the objectives (SFT, DPO, ORPO) and DPO's reference, α's and the learning
rate's schedules, DDP, the phase-transition plot, and the trackers of ``--report-to``.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    config: TrainConfig schedule_warning
    distributed: pin_cpus
    loop: train
    objectives: dpo_loss orpo_loss preference_loss
    reference: Reference
    report: BACKENDS Reporter check_backends
    plot: plot_run
    schedule: linear_annealing lr_factor lr_warmup_steps
    session: out_of_memory
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
