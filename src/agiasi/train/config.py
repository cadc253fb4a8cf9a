"""``TrainConfig``: every flag of ``agiasi train``, and what a resumed run may change.

Every field is a flag (``max_steps`` ↔ ``--max-steps``) and a key of ``--config FILE.yaml``;
the model's own options come from :class:`agiasi.model.wrapper.ModelConfig`. A resume compares the
run's saved config with this one field by field (:func:`check_resume`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from agiasi.errors import AgiasiError
from agiasi.model.config import ModelConfig
from agiasi.options import option
from agiasi.soul import PHI, gate_of
from agiasi.train.objectives import DpoLoss, Method
from agiasi.train.schedule import LR_SCHEDULERS, linear_annealing

DatasetFormat = Literal[
    "auto",
    "text",
    "messages",
    "alpaca",
    "sharegpt",
    "prompt-completion",
    "preference",
    "preference-implicit",
    "alpaca-preference",
    "sharegpt-preference",
]
LrScheduler = Literal["constant", "linear", "cosine"]
assert LR_SCHEDULERS == ("constant", "linear", "cosine")

# Steps at α = target below which the run is warned about: measured on the shipped tiny model
# with the residual mix (bench/soul_cost.py), 6 steps at φ end above the base's held-out
# perplexity, 10 below. The convex mix does not scale the logits and needs no such steps.
MIN_STEPS_AT_TARGET = 10

# What a resumed run may change: how long it runs, how often it saves, validates and logs, how
# it runs, and how the optimizer steps from here (a lower --learning-rate after a divergence is
# the usual reason to resume). What the model, the data or the soul *are* must stay.
RESUMABLE_FIELDS = frozenset(
    {
        "learning_rate",
        "soul_learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_warmup_ratio",
        "min_lr_ratio",
        "weight_decay",
        "max_grad_norm",
        "max_steps",
        "save_steps",
        "eval_steps",
        "early_stopping_patience",
        "progress",
        "report_to",
        "run_name",
        "max_memory",
        "dry_run",
        "resume",
        "overwrite",
        "output_dir",
        "device",
        "compile",
        "gradient_checkpointing",
        "offload_activations",
        "offload_embeddings",
    }
)


@dataclass
class TrainConfig(ModelConfig):
    """Every field is a flag of ``agiasi train`` (``max_steps`` ↔ ``--max-steps``) and a key of
    ``--config FILE.yaml``; the model's own options come from :class:`ModelConfig`. Defaults are
    the design note's; the learning-rate schedule's were measured (bench/RESULTS.md)."""

    method: Method = option(
        "sft",
        "objective: sft (next-token loss on the answers or text), dpo or orpo (preference pairs: "
        "a prompt, a chosen and a rejected answer)",
    )
    init_from: str | None = option(
        None,
        "start from this step folder's adapter and soul (an SFT run's step_N) instead of a fresh "
        "adapter and the identity soul; alpha stays at its value unless --alpha-* flags are given",
    )
    beta: float = option(
        0.1, "dpo: how far the policy may move from the reference (higher: closer)", gt=0.0
    )
    dpo_loss: DpoLoss = option(
        "sigmoid", "dpo: sigmoid (the DPO paper's) or ipo (squared, length-averaged)"
    )
    label_smoothing: float = option(
        0.0, "dpo sigmoid: assume this share of the pairs' labels is flipped (cDPO)", ge=0.0, lt=0.5
    )
    orpo_lambda: float = option(0.1, "orpo: weight of the odds-ratio term beside the NLL", gt=0.0)
    precompute_reference: bool = option(
        False,
        "dpo: score every pair with the reference once before training (kept in the run folder) "
        "instead of a reference forward each step",
    )
    dataset: str | None = option(
        None,
        "training data: .txt/.md, .jsonl, .json, .parquet, .csv/.tsv, a folder of these, a "
        "datasets save_to_disk folder or a dataset id (hf:ID); several with commas; default: "
        "the shipped Japanese sample",
    )
    dataset_format: DatasetFormat = option(
        "auto", "record format; auto detects it per file from the first records and says so"
    )
    dataset_columns: str | None = option(
        None, "rename columns FIELD=COLUMN,... (e.g. instruction=question,output=answer)"
    )
    eval_dataset: str | None = option(
        None, "validation data (same kinds and formats as --dataset), scored during training"
    )
    eval_split: float = option(
        0.0, "hold out this fraction of the documents for validation (by --seed)", ge=0.0, lt=1.0
    )
    eval_steps: int | None = option(
        None,
        "validate every N steps (default: at every save, when there is validation data)",
        ge=1,
    )
    eval_max_tokens: int | None = option(
        None, "score at most this many validation tokens (default: all)", ge=2
    )
    early_stopping_patience: int = option(
        0, "stop after N validations without a new best (0: never; best and last are kept)", ge=0
    )
    packing: bool = option(
        False, "several chat/instruction examples per row, attention kept inside each example"
    )
    output_dir: str = option("checkpoints_agiasi", "where step_N folders and metrics go")
    overwrite: bool = option(
        False, "replace the run already in --output-dir (its step folders and metrics)"
    )
    max_steps: int = option(500, "optimizer steps", ge=1)
    warmup_steps: int = option(50, "alpha: steps at --alpha-start before the anneal", ge=0)
    annealing_steps: int = option(400, "alpha: steps of the straight line to --alpha-target", ge=0)
    batch_size: int = option(1, "sequences per micro-batch (per rank)", ge=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", ge=1)
    max_length: int = option(512, "tokens per sequence (text is packed to this length)", ge=2)
    learning_rate: float = option(2e-4, "AdamW peak learning rate of the LoRA", gt=0.0)
    soul_learning_rate: float | None = option(
        None, "peak learning rate of the soul (default: --learning-rate)", gt=0.0
    )
    lr_scheduler: LrScheduler = option(
        "constant",
        "learning rate after its warm-up: constant, or linear / cosine decay (constant learnt "
        "the training domain best in bench/lr_schedule.py; decay kept more of another domain)",
    )
    lr_warmup_steps: int | None = option(
        None, "learning rate: steps of linear warm-up from 0 (overrides --lr-warmup-ratio)", ge=0
    )
    lr_warmup_ratio: float = option(
        0.03, "learning rate: warm-up as a fraction of --max-steps", ge=0.0, le=1.0
    )
    min_lr_ratio: float = option(
        0.0, "learning rate at the end of the decay, as a fraction of the peak", ge=0.0, le=1.0
    )
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0.0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", ge=0.0)
    save_steps: int = option(100, "write a step folder every N steps (and at the end)", ge=1)
    seed: int = option(42, "seed of the data order, LoRA init and dropout", ge=0, le=2**32 - 1)
    resume: str | None = option(
        None, "'auto' (newest complete step_N in --output-dir) or a step folder"
    )
    alpha_target: float = option(PHI, "alpha after the anneal (default: the golden ratio)")
    gradient_checkpointing: bool = option(
        True, "recompute each decoder layer in the backward pass (less memory, ~30% more compute)"
    )
    device: str | None = option(None, "cpu, cuda or cuda:N (default: the GPU if there is one)")
    progress: bool = option(True, "show the progress bar")
    report_to: str | None = option(
        None,
        "also log every metric to these trackers: tensorboard, wandb, trackio, mlflow (commas "
        "for several; stored in the run folder; W&B offline unless WANDB_MODE says otherwise)",
    )
    run_name: str | None = option(None, "the run's name in the trackers (default: the folder's)")
    max_memory: float | None = option(
        None,
        "refuse the run, before loading the model, when its predicted peak GPU memory (agiasi "
        "estimate: PyTorch's reserved memory plus the CUDA context) is above this many GiB",
        gt=0.0,
    )
    dry_run: bool = option(
        False, "print the plan and the predicted peak memory (agiasi estimate), then stop"
    )

    def validate(self) -> None:
        """The flags' bounds, and the combinations of ``--method`` that cannot work."""
        from agiasi.data.preference import PREFERENCE_FORMATS

        super().validate()
        if self.method == "sft" and self.dataset_format in PREFERENCE_FORMATS:
            raise AgiasiError(
                f"--dataset-format {self.dataset_format} holds preference pairs: train on them "
                "with --method dpo or --method orpo"
            )
        if self.method != "sft" and self.packing:
            raise AgiasiError(
                f"--packing packs supervised examples; --method {self.method} scores whole "
                "pairs: leave --packing off"
            )
        if self.precompute_reference and self.method != "dpo":
            raise AgiasiError(
                "--precompute-reference is for --method dpo (the only objective with a reference)"
            )

    def model_config(self) -> ModelConfig:
        """The wrapper's part of this config."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @property
    def validating(self) -> bool:
        return bool(self.eval_dataset or self.eval_split)

    def is_eval_step(self, done: int) -> bool:
        every = self.eval_steps or self.save_steps
        return self.validating and (done % every == 0 or done == self.max_steps)


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    steps: int
    final_loss: float
    metrics_file: Path
    best_step: int | None = None
    stopped_early: bool = False


def check_resume(cfg: TrainConfig, resume_from: Path) -> None:
    """The checkpoint must come from this base model (configs only, no weights) and from a run
    with the same settings, except those in :data:`RESUMABLE_FIELDS`."""
    from agiasi.checkpoint.step_folder import (
        TRAIN_CONFIG,
        check_same_base,
        check_same_weights,
        read_manifest,
    )
    from agiasi.model.loading import load_config

    hf = load_config(cfg.base_model, cfg.trust_remote_code)
    manifest = read_manifest(resume_from)
    check_same_base(manifest, resume_from, cfg.base_model, hf)
    check_same_weights(manifest, resume_from, cfg.base_model)
    try:
        saved = json.loads((resume_from / TRAIN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AgiasiError(
            f"cannot resume from {resume_from}: its {TRAIN_CONFIG} is unreadable ({e})"
        ) from None
    now = asdict(cfg)
    differ = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} → {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE_FIELDS and k in saved and saved[k] != v
    ]
    if differ:
        raise AgiasiError(
            f"cannot resume from {resume_from}: this run's settings differ from the checkpoint's "
            f"({'; '.join(differ)}). A resume may change how long, how often and where the run "
            "goes and the optimizer's rates; start a new run (another --output-dir) for the rest"
        )


def schedule_warning(cfg: TrainConfig) -> str | None:
    """What the α schedule will do that the user may not expect, or None."""
    if not cfg.soul or cfg.alpha_mode != "schedule":
        return None
    at_target = cfg.max_steps - cfg.warmup_steps - cfg.annealing_steps
    if at_target < 0:
        last = linear_annealing(
            cfg.max_steps - 1,
            cfg.warmup_steps,
            cfg.annealing_steps,
            cfg.alpha_start,
            cfg.alpha_target,
        )
        return (
            f"warning: warmup ({cfg.warmup_steps}) + annealing ({cfg.annealing_steps}) > max steps "
            f"({cfg.max_steps}): α will stop at {last:.3f}, short of {cfg.alpha_target:.3f}"
        )
    if cfg.soul_mix == "residual" and at_target < MIN_STEPS_AT_TARGET:
        gate = float(gate_of(cfg.alpha_target))
        return (
            f"warning: only {at_target} step(s) at α = {cfg.alpha_target:.3f} after the anneal. "
            f"The residual mix scales the logits by ≈ {1 + gate:.2f} while R is near the identity "
            "and the LoRA needs steps there to absorb it (on the shipped tiny model 6 such steps "
            "end above the base's held-out perplexity, 10 below). "
            "Raise --max-steps, shorten --annealing-steps, or use --soul-mix convex."
        )
    return None
