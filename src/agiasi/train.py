"""``train(config)``: the note's phase-transition training, in one visible loop.

Per optimizer step (:func:`train`'s loop, each part a named function below):
``set_schedules`` (α from its annealing, the learning rate from ``--lr-scheduler``) →
``train_step`` (``grad_accum`` micro-batches forward/backward, one all-reduce of the trainable
gradients across ranks, clip, AdamW) → ``log_step`` (one metrics line, the progress bar) →
every ``--eval-steps``: ``evaluate_step`` (validation loss, split across ranks) → every
``--save-steps``, at a new best and at the end: ``save_step``. Nothing is hidden in callbacks.

Resume is exact: a step folder carries the optimizer state, the RNG states and the data
position; both schedules are functions of the step. A killed run resumed with ``--resume auto``
ends bit-for-bit where an uninterrupted run ends (CPU, fixed seed).

The run folder, its lock and its records live in :mod:`agiasi.runfolder`; data-parallel helpers
in :mod:`agiasi.distributed`; process-wide settings in :mod:`agiasi.process`.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from agiasi._faults import maybe_crash
from agiasi.checkpoint import (
    TRAINER_STATE,
    checkpoint_problem,
    find_resume_checkpoint,
    load_into,
    safe_torch_load,
    write_step,
)
from agiasi.data import IGNORE, BatchStream, Data, Example, collate, default_dataset, load_data
from agiasi.distributed import (
    Dist,
    all_gather,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast,
    init_distributed,
)
from agiasi.errors import AgiasiError
from agiasi.model import AGIASI_SO8T_Wrapper, ModelConfig
from agiasi.options import option
from agiasi.process import configure_process
from agiasi.runfolder import (
    METRICS,
    RunLock,
    check_output_dir,
    check_output_path,
    last_loss,
    prepare_run_folder,
    read_best,
    run_identity,
    write_best,
)
from agiasi.schedule import LR_SCHEDULERS, linear_annealing, lr_factor, lr_warmup_steps
from agiasi.soul import PHI, gate_of, phase_status

GC_EVERY = 50  # steps between the collector's runs (all ranks at once)
DatasetFormat = Literal["auto", "text", "messages", "alpaca", "sharegpt", "prompt-completion"]
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
        "resume",
        "overwrite",
        "output_dir",
        "device",
        "compile",
        "gradient_checkpointing",
        "offload_activations",
    }
)


@dataclass
class TrainConfig(ModelConfig):
    """Every field is a flag of ``agiasi train`` (``max_steps`` ↔ ``--max-steps``) and a key of
    ``--config FILE.yaml``; the model's own options come from :class:`ModelConfig`. Defaults are
    the design note's; the learning-rate schedule's were measured (bench/RESULTS.md)."""

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


# --------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- setup helpers


def _device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device:
        from agiasi.model import parse_device

        try:
            return parse_device(cfg.device)
        except AgiasiError as e:
            raise AgiasiError(f"--device: {e}") from None
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def resolve_resume(cfg: TrainConfig, out_dir: Path, say) -> Path | None:
    """The step folder to continue from, decided before anything random happens."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = find_resume_checkpoint(out_dir, say)
        if found is None:
            say(f"resume: no complete checkpoint in {out_dir}, starting from step 0")
        return found
    problem = checkpoint_problem(Path(cfg.resume))
    if problem is not None:
        raise AgiasiError(f"cannot resume from {cfg.resume!r}: {problem}")
    return Path(cfg.resume)


def check_resume(cfg: TrainConfig, resume_from: Path) -> None:
    """The checkpoint must come from this base model (configs only, no weights) and from a run
    with the same settings, except those in :data:`RESUMABLE_FIELDS`."""
    from agiasi.checkpoint import TRAIN_CONFIG, check_same_base, read_manifest
    from agiasi.model import load_config

    hf = load_config(cfg.base_model, cfg.trust_remote_code)
    check_same_base(
        read_manifest(resume_from),
        resume_from,
        cfg.base_model,
        hf.model_type,
        getattr(hf, "hidden_size", None),
        getattr(hf, "vocab_size", None),
    )
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


def _tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            cfg.base_model, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise AgiasiError(
            f"could not load the tokenizer of {cfg.base_model!r}: {str(e).splitlines()[0]}"
        ) from None


def prepare_data(cfg: TrainConfig, say) -> tuple[Data, int]:
    """Training and validation examples and the pad id; a bad --base-model or --max-length
    fails first."""
    from agiasi.model import load_config

    hf_config = load_config(cfg.base_model, cfg.trust_remote_code)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and cfg.max_length > max_pos:
        raise AgiasiError(
            f"--max-length {cfg.max_length} exceeds the model's limit of {max_pos} positions"
        )
    tok = _tokenizer(cfg)
    dataset = cfg.dataset or str(default_dataset())
    data = load_data(
        dataset,
        tok,
        cfg.max_length,
        dataset_format=cfg.dataset_format,
        dataset_columns=cfg.dataset_columns,
        eval_dataset=cfg.eval_dataset,
        eval_split=cfg.eval_split,
        eval_max_tokens=cfg.eval_max_tokens,
        seed=cfg.seed,
        packing=cfg.packing,
        say=say,
    )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packed = f", packed from {data.packed_from} examples" if data.packed_from else ""
    say(
        f"data: {dataset}: {len(data.train)} rows{packed}, {data.train_tokens:,} tokens "
        f"(max length {cfg.max_length})"
    )
    if data.eval:
        where = cfg.eval_dataset or f"{data.n_eval_docs} held-out documents (--eval-split)"
        say(f"validation: {where}: {len(data.eval)} examples, {data.eval_tokens:,} tokens")
    return data, pad_id


def build_optimizer(
    cfg: TrainConfig, wrapper: AGIASI_SO8T_Wrapper
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter], list[dict[str, Any]]]:
    """AdamW over LoRA (``--learning-rate``) and soul (``--soul-learning-rate``) groups; each
    group's ``peak_lr`` is what the schedule scales."""
    params = [p for p in wrapper.parameters() if p.requires_grad]
    soul_ids = {id(p) for p in wrapper.soul.parameters()} if wrapper.soul is not None else set()
    groups = [{"params": [p for p in params if id(p) not in soul_ids], "lr": cfg.learning_rate}]
    soul_params = [p for p in params if id(p) in soul_ids]
    if soul_params:
        groups.append({"params": soul_params, "lr": cfg.soul_learning_rate or cfg.learning_rate})
    for g in groups:
        g["peak_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return optimizer, params, groups


def restore(
    state: dict[str, Any],
    resume_from: Path,
    wrapper: AGIASI_SO8T_Wrapper,
    optimizer: torch.optim.Optimizer,
    groups: list[dict[str, Any]],
    stream: BatchStream,
    cfg: TrainConfig,
    d: Dist,
    say,
) -> int:
    """Weights, optimizer, data position and RNG of a step folder; returns its step."""
    load_into(wrapper, resume_from)
    if state.get("world_size", 1) * state.get("batch_size", 1) != d.world_size * cfg.batch_size:
        say("warning: resuming with another global batch size; the data order shifts")
    optimizer.load_state_dict(state["optimizer"])
    for group, want in zip(optimizer.param_groups, groups, strict=True):
        group["peak_lr"] = want["peak_lr"]  # the flags of this run win over the saved ones
        group["weight_decay"] = cfg.weight_decay
    stream.position = int(state["data_position"])
    rng = state["rng"][d.rank] if isinstance(state["rng"], list) else state["rng"]
    _set_rng_state(rng)
    say(f"resume: from {resume_from} (step {int(state['step'])})")
    return int(state["step"])


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


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


class StepTimer:
    """Forward + backward GPU time of a step from CUDA events (no host sync: the time of
    step N is read during step N + 1, after that step's one sync). On the CPU: host time."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self._events: tuple | None = None
        self._last = 0.0
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._pending = torch.cuda.Event(enable_timing=True)
            self._pending.record()
        self._t = time.perf_counter()

    def computed(self) -> None:
        if self.enabled:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if self._events is not None and self._events[1].query():
                self._last = self._events[0].elapsed_time(self._events[1]) / 1000
            self._events = (self._pending, end)
        else:
            self._last = time.perf_counter() - self._t

    def previous_compute_s(self) -> float:
        return self._last


# --------------------------------------------------------------------------- the loop's steps


def set_schedules(
    step: int, cfg: TrainConfig, soul, optimizer: torch.optim.Optimizer, warmup: int
) -> float:
    """α (``schedule`` mode) and every group's learning rate for 0-based ``step``; returns the
    LoRA group's rate."""
    if soul is not None and cfg.alpha_mode == "schedule":
        with torch.no_grad():
            soul.alpha.fill_(
                linear_annealing(
                    step, cfg.warmup_steps, cfg.annealing_steps, cfg.alpha_start, cfg.alpha_target
                )
            )
    factor = lr_factor(step, cfg.lr_scheduler, warmup, cfg.max_steps, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def train_step(
    wrapper: AGIASI_SO8T_Wrapper,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    stream: BatchStream,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
    timer: StepTimer,
) -> tuple[dict[str, float], int]:
    """``grad_accum`` micro-batches, one all-reduce, clip, AdamW; the logged values (after the
    step's one host sync) and the tokens this rank saw."""
    soul = wrapper.soul
    # Kept on the device: no host sync inside the micro-batch loop.
    totals = {k: torch.zeros((), device=device) for k in ("loss", "task_loss", "ortho_loss")}
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    tokens = 0
    maybe_crash("step_start")
    for _ in range(cfg.grad_accum):
        batch = stream.next()
        out = wrapper(**batch, return_logits=False)
        nonfinite |= ~torch.isfinite(out.loss.detach())
        (out.loss / cfg.grad_accum).backward()
        maybe_crash("after_backward")
        for k in totals:
            totals[k] += getattr(out, k).detach().float() / cfg.grad_accum
        tokens += int(batch["attention_mask"].sum())
    timer.computed()
    # One collective a step: the trainable gradients, the logged losses, the non-finite flag
    # and this rank's compute time of the previous step (mean and mean square: the spread
    # across ranks) travel in the same flat all-reduce.
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    prev = timer.previous_compute_s()
    extra = torch.stack(
        [
            *totals.values(),
            nonfinite.float(),
            torch.full((), prev, device=device),  # a fill kernel, not an H2D copy
            torch.full((), prev * prev, device=device),
        ]
    )
    all_reduce_mean([*grads, extra], d)
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if cfg.max_grad_norm > 0
        else torch.full((), float("nan"), device=device)
    )
    # Stepped before the check: a non-finite step is caught by the caller, before anything is
    # saved, and the run stops (the in-memory weights are then discarded).
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    zero = extra[0] * 0
    # The one host sync of the step: everything logged comes back in one transfer.
    logged = torch.stack(
        [
            *extra,
            grad_norm.float().reshape(()),
            soul.alpha.detach().float() if soul is not None else zero,
            soul.rotation_distance_tensor().float() if soul is not None else zero,
        ]
    )
    t_wait = time.perf_counter()
    values = logged.tolist()
    t_wait = time.perf_counter() - t_wait
    names = ("loss", "task_loss", "ortho_loss", "nonfinite", "c_mean", "c_sq", "grad_norm")
    out_values = dict(zip(names + ("alpha", "rotation_distance"), values, strict=True))
    out_values["sync_wait_s"] = t_wait
    return out_values, tokens


@torch.no_grad()
def evaluate_step(
    wrapper: AGIASI_SO8T_Wrapper,
    examples: list[Example],
    pad_id: int,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
) -> dict[str, float]:
    """Validation loss: the token-weighted mean cross-entropy over every validation example (no
    dropout, no RNG drawn, so resume stays exact). Ranks take interleaved slices and their sums
    are added in float64, so N ranks give one process's number."""
    was_training = wrapper.training
    wrapper.eval()
    total, count = 0.0, 0
    mine = examples[d.rank :: d.world_size]
    try:
        for i in range(0, len(mine), cfg.batch_size):
            batch = collate(mine[i : i + cfg.batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            if n == 0:
                continue
            out = wrapper(**batch, return_logits=False)
            total += float(out.task_loss) * n
            count += n
    finally:
        wrapper.train(was_training)
    total, count = all_reduce_sum([total, float(count)], d, device)
    loss = total / count if count else float("nan")
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(loss) if loss < 700 else float("inf"),
        "eval_tokens": int(count),
    }


def log_step(record: dict[str, Any], metrics_fh, bar, soul) -> None:
    """One metrics line (flushed: a crash loses at most the step in flight) and the bar."""
    if metrics_fh is not None:
        metrics_fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        metrics_fh.flush()
        maybe_crash("metrics_written")
    if bar is not None:
        post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if "eval_loss" in record:
            post["eval"] = f"{record['eval_loss']:.4f}"
        if soul is not None:
            post.update(
                α=f"{record['alpha']:.3f}", gate=f"{record['gate']:.3f}", phase=record["phase"]
            )
        bar.set_postfix(post, refresh=False)
        bar.update(1)


def _finite(wrapper: AGIASI_SO8T_Wrapper, optimizer: torch.optim.Optimizer) -> bool:
    """Every trainable tensor and every optimizer moment is finite (one host sync)."""
    tensors = [p for p in wrapper.parameters() if p.requires_grad]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    flags = [torch.isfinite(t).all() for t in tensors]
    # one host sync per device (Adam keeps its step counts on the CPU)
    return all(
        bool(torch.stack([f for f in flags if f.device == dev]).all())
        for dev in {f.device for f in flags}
    )


def save_step(
    wrapper: AGIASI_SO8T_Wrapper,
    optimizer: torch.optim.Optimizer,
    stream: BatchStream,
    cfg: TrainConfig,
    d: Dist,
    step: int,
    last_saved: Path | None,
    run_id: str,
    eval_record: dict[str, Any] | None = None,
) -> Path:
    """A step folder with what resume needs (every rank's RNG); rank 0 writes. Never one holding
    a non-finite weight or optimizer moment: the run stops and names the last finite folder."""
    if not _finite(wrapper, optimizer):
        raise AgiasiError(
            f"weights became non-finite (nan/inf) by step {step}; stopped without saving. Last "
            f"good checkpoint: {last_saved or 'none yet'}. Try a lower --learning-rate."
        )
    rng_all = all_gather(_rng_state(), d)
    folder = Path(cfg.output_dir) / f"step_{step}"
    if d.main:
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data_position": stream.position,
            "rng": rng_all,
            "world_size": d.world_size,
            "batch_size": cfg.batch_size,
            "run_id": run_id,
        }
        write_step(
            wrapper,
            folder,
            step,
            trainer_state=trainer_state,
            train_config=asdict(cfg),
            eval_record=eval_record,
        )
    barrier(d)
    return folder


def _evals_since_best(out_dir: Path, best: dict[str, Any] | None) -> int:
    """Validations after the best one (for early stopping across a resume)."""
    path = out_dir / METRICS
    if best is None or not path.is_file():
        return 0
    n = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "eval_loss" in rec and rec.get("step", 0) > best["step"]:
            n += 1
    return n


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Train LoRA + soul (or LoRA alone with ``soul=False``) and write step folders."""
    configure_process(training=True)
    cfg.validate()
    if cfg.eval_dataset and cfg.eval_split:
        raise AgiasiError("pass either --eval-dataset or --eval-split, not both")
    if cfg.early_stopping_patience and not cfg.validating:
        raise AgiasiError(
            "--early-stopping-patience needs validation data: --eval-dataset or --eval-split"
        )
    d = init_distributed()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not d.main:
        say = lambda msg: None  # noqa: E731
    out_dir = Path(cfg.output_dir)
    device = _device(cfg, d)
    lock = RunLock(out_dir)
    if d.main:
        check_output_path(out_dir)
        lock.acquire()
    try:
        if d.main:
            check_output_dir(out_dir, bool(cfg.resume), cfg.overwrite)
        return _train(cfg, d, device, out_dir, say)
    finally:
        lock.release()


def _train(cfg: TrainConfig, d: Dist, device: torch.device, out_dir: Path, say) -> TrainResult:
    resume_from = resolve_resume(cfg, out_dir, say)
    state = None
    if resume_from is not None:
        check_resume(cfg, resume_from)
        state = safe_torch_load(resume_from / TRAINER_STATE)
    run_id = run_identity(out_dir, resume_from, state.get("run_id") if state else None)
    if state is not None and int(state["step"]) >= cfg.max_steps:
        done = int(state["step"])
        if done > cfg.max_steps:
            raise AgiasiError(
                f"{resume_from} is at step {done}, past --max-steps {cfg.max_steps}: nothing "
                "to train (raise --max-steps to continue the run)"
            )
        say(f"done: {resume_from} is already at --max-steps {cfg.max_steps}; nothing to train")
        return TrainResult(
            out_dir, resume_from, done, last_loss(out_dir / METRICS, done), out_dir / METRICS
        )

    torch.manual_seed(cfg.seed)
    data, pad_id = prepare_data(cfg, say)
    torch.manual_seed(cfg.seed)
    wrapper = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=device)
    wrapper.train()
    optimizer, params, groups = build_optimizer(cfg, wrapper)
    broadcast(params, d)
    counts = wrapper.trainable_parameters()
    say(
        f"model: {cfg.base_model} ({wrapper.hf_config.model_type}, H={wrapper.hidden_size}, "
        f"{cfg.quantization}); trainable LoRA {counts['lora']:,} + soul {counts['soul']:,}"
        + (f" ({cfg.soul_mix} mix)" if cfg.soul else "")
        + (f"; {d.world_size} ranks" if d.enabled else "")
    )
    stream = BatchStream(
        data.train,
        cfg.batch_size,
        pad_id,
        cfg.seed,
        d.rank,
        d.world_size,
        pin_memory=device.type == "cuda",
    )
    start_step = 0
    if state is not None:
        start_step = restore(state, resume_from, wrapper, optimizer, groups, stream, cfg, d, say)
    if d.main:
        prepare_run_folder(
            out_dir, asdict(cfg), start_step, cfg.overwrite and not cfg.resume, run_id, say
        )
    warning = schedule_warning(cfg)
    if warning:
        say(warning)
    warmup = lr_warmup_steps(cfg.max_steps, cfg.lr_warmup_steps, cfg.lr_warmup_ratio)
    say(
        f"learning rate: {cfg.lr_scheduler}, peak {cfg.learning_rate:g}, warm-up {warmup} "
        f"step(s), floor {cfg.min_lr_ratio:g}× (alpha's schedule is separate)"
    )

    soul = wrapper.soul
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
    last_saved = resume_from
    best = read_best(out_dir) if d.main and start_step else None
    stale_evals = _evals_since_best(out_dir, best) if d.main else 0
    if d.enabled:  # every rank must stop early at the same step
        best, stale_evals = all_gather((best, stale_evals), d)[0]
    stopped_early = False
    loss_value = float("nan")
    metrics_fh = open(out_dir / METRICS, "a", encoding="utf-8") if d.main else None
    timer = StepTimer(device)
    # Python's cyclic collector pauses at moments that differ between ranks, and every step's
    # all-reduce waits for the slowest: collect at fixed steps on every rank instead.
    gc.freeze()
    gc.disable()
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            timer.start()
            lr = set_schedules(step, cfg, soul, optimizer, warmup)
            v, tokens = train_step(wrapper, optimizer, params, stream, cfg, d, device, timer)
            if v["nonfinite"] > 0:
                raise AgiasiError(
                    f"loss became non-finite (nan/inf) at step {step + 1}; stopped without "
                    f"saving. Last good checkpoint: {last_saved or 'none yet'}. "
                    "Try a lower --learning-rate."
                )
            done = step + 1
            dt = time.perf_counter() - t0
            loss_value = v["loss"]
            record: dict[str, Any] = {
                "step": done,
                "loss": v["loss"],
                "task_loss": v["task_loss"],
                "ortho_loss": v["ortho_loss"],
                "alpha": v["alpha"] if soul is not None else None,
                "gate": float(gate_of(v["alpha"])) if soul is not None else None,
                "phase": phase_status(v["alpha"]) if soul is not None else None,
                "rotation_distance": v["rotation_distance"] if soul is not None else None,
                "lr": lr,
                "grad_norm": v["grad_norm"],
                "tokens": tokens * d.world_size,
                "tokens_per_s": tokens * d.world_size / dt if dt > 0 else None,
                "step_time_s": dt,
                "sync_wait_s": v["sync_wait_s"],
                "peak_mem_gib": _peak_memory_gib(device),
            }
            if timer.enabled and step > start_step:
                # previous step's forward+backward GPU time: mean over ranks and its spread
                record["compute_s_prev"] = v["c_mean"]
                record["compute_s_prev_rank_std"] = max(0.0, v["c_sq"] - v["c_mean"] ** 2) ** 0.5
            evaluated = None
            new_best = False
            if cfg.is_eval_step(done):
                evaluated = evaluate_step(wrapper, data.eval, pad_id, cfg, d, device)
                record.update(evaluated)
                new_best = best is None or evaluated["eval_loss"] < best["eval_loss"]
                stale_evals = 0 if new_best else stale_evals + 1
            log_step(record, metrics_fh, bar, soul)
            patience_out = bool(
                cfg.early_stopping_patience and stale_evals >= cfg.early_stopping_patience
            )
            if done % cfg.save_steps == 0 or done == cfg.max_steps or new_best or patience_out:
                last_saved = save_step(
                    wrapper, optimizer, stream, cfg, d, done, last_saved, run_id, evaluated
                )
            if new_best:
                best = {"step": done, **evaluated, "folder": last_saved.name}
                if d.main:
                    write_best(out_dir, best)
            if patience_out:
                stopped_early = True
                say(
                    f"early stopping: {stale_evals} validation(s) without a new best; best "
                    f"step_{best['step']} (eval loss {best['eval_loss']:.4f}), last step_{done}"
                )
                break
            if done % GC_EVERY == 0:
                gc.collect(1)
    finally:
        gc.enable()
        gc.unfreeze()
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    final = last_saved if stopped_early else out_dir / f"step_{cfg.max_steps}"
    if d.main:
        try:
            from agiasi.plot import plot_run

            png = plot_run(out_dir)
            say(f"plot: {png}")
        except AgiasiError as e:
            say(f"plot skipped: {e}")
        steps_done = int(final.name.removeprefix("step_"))
        best_note = (
            f", best step_{best['step']} (eval loss {best['eval_loss']:.4f})" if best else ""
        )
        say(f"done: {steps_done} steps, final loss {loss_value:.4f}, checkpoint {final}{best_note}")
    return TrainResult(
        out_dir,
        final,
        int(final.name.removeprefix("step_")),
        loss_value,
        out_dir / METRICS,
        best["step"] if best else None,
        stopped_early,
    )
