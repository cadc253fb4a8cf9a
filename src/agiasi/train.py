"""``train(config)``: the note's phase-transition training, in one visible loop.

Per optimizer step: set α from the schedule (``schedule`` mode) → ``grad_accum`` micro-batches
forward/backward → all-reduce the trainable gradients (LoRA + soul only) across ranks → clip →
AdamW step → log → maybe checkpoint. Nothing is hidden in callbacks.

Distributed: launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1), every rank
holds its own (4-bit) base model; ranks start from identical trainable parameters (same seed,
then a broadcast from rank 0), take disjoint slices of each global batch (:class:`BatchStream`),
and average gradients by one flat all-reduce of the trainable tensors. Rank 0 writes.

Resume is exact: a step folder carries the optimizer state, the RNG states and the data
position, so a killed run resumed with ``--resume auto`` ends bit-for-bit where an uninterrupted
run ends (CPU, fixed seed).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from agiasi._faults import maybe_crash
from agiasi.checkpoint import (
    clean_stale_temp,
    load_into,
    read_manifest,
    safe_torch_load,
    write_step,
)
from agiasi.data import BatchStream, default_dataset, load_records, tokenize_records
from agiasi.errors import AgiasiError
from agiasi.model import AGIASI_SO8T_Wrapper, ModelConfig
from agiasi.schedule import linear_annealing
from agiasi.soul import PHI

TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
STEP_RE = re.compile(r"^step_(\d+)$")


# Steps at α = target below which the run is warned about: measured on the shipped tiny model
# (bench/soul_cost.py), 6 steps at φ end above the base's held-out perplexity, 10 below.
MIN_STEPS_AT_TARGET = 10


@dataclass
class TrainConfig:
    """Every field is a flag of ``agiasi train`` (``max_steps`` ↔ ``--max-steps``) and a key of
    ``--config FILE.yaml``. Defaults are the design note's."""

    base_model: str = ""
    dataset: str | None = None
    output_dir: str = "checkpoints_agiasi"
    max_steps: int = 500
    warmup_steps: int = 50
    annealing_steps: int = 400
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 512
    learning_rate: float = 2e-4
    soul_learning_rate: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 100
    seed: int = 42
    resume: str | None = None
    soul: bool = True
    rotation: str = "so8"
    rotation_init: str = "identity"
    alpha_mode: str = "schedule"
    alpha_start: float = -5.0
    alpha_target: float = PHI
    ortho_weight: float = 0.1
    quantization: str = "nf4"
    dtype: str = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    compile: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.base_model:
            raise AgiasiError("--base-model is required (a hub id or a local model folder)")
        checks = [
            (self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be ≥ 0, got {self.warmup_steps}"),
            (
                self.annealing_steps >= 0,
                f"--annealing-steps must be ≥ 0, got {self.annealing_steps}",
            ),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}"),
            (
                self.learning_rate > 0 and math.isfinite(self.learning_rate),
                f"--learning-rate must be positive, got {self.learning_rate}",
            ),
            (self.save_steps >= 1, f"--save-steps must be at least 1, got {self.save_steps}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be ≥ 0, got {self.max_grad_norm}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AgiasiError(msg)

    def model_config(self) -> ModelConfig:
        """The wrapper's config: every ModelConfig field has a TrainConfig field of that name."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    steps: int
    final_loss: float
    metrics_file: Path


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def _all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Average gradients of the trainable tensors across ranks with one flat all-reduce."""
    if not d.enabled or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _broadcast(tensors: list[torch.Tensor], d: Dist) -> None:
    if not d.enabled:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)


# --------------------------------------------------------------------------- checkpoints & resume


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a step folder cannot be resumed from, or None if it is complete."""
    try:
        read_manifest(folder)
    except AgiasiError as e:
        return str(e)
    for f in (TRAINER_STATE, TRAIN_CONFIG):
        if not (folder / f).is_file():
            return f"missing {f}"
    return None


def find_resume_checkpoint(output_dir: Path, log=print) -> Path | None:
    """Newest complete ``step_N`` in ``output_dir``; incomplete ones are skipped, with a note."""
    for _, folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"resume: skipping {folder.name}: incomplete ({problem})")
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- the loop


def _device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise AgiasiError(
            f"could not load the tokenizer of {cfg.base_model!r}: {str(e).splitlines()[0]}"
        ) from None
    return tok


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def _trim_metrics(path: Path, keep_upto: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= keep_upto:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Train LoRA + soul (or LoRA alone with ``soul=False``) and write step folders."""
    cfg.validate()
    d = init_distributed()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not d.main:
        say = lambda msg: None  # noqa: E731
    out_dir = Path(cfg.output_dir)
    device = _device(cfg, d)

    # ---- resume point (decided before anything random happens)
    resume_from: Path | None = None
    if cfg.resume:
        if cfg.resume == "auto":
            resume_from = find_resume_checkpoint(out_dir, say)
            if resume_from is None:
                say(f"resume: no complete checkpoint in {out_dir}, starting from step 0")
        else:
            resume_from = Path(cfg.resume)
            problem = checkpoint_problem(resume_from)
            if problem is not None:
                raise AgiasiError(f"cannot resume from {cfg.resume!r}: {problem}")

    # ---- data
    torch.manual_seed(cfg.seed)
    from agiasi.model import load_config

    # clear errors for a bad --base-model or --max-length, before the data and the weights load
    hf_config = load_config(cfg.base_model, cfg.trust_remote_code)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and cfg.max_length > max_pos:
        raise AgiasiError(
            f"--max-length {cfg.max_length} exceeds the model's limit of {max_pos} positions"
        )
    tokenizer = _load_tokenizer(cfg)
    dataset = cfg.dataset or str(default_dataset())
    examples = tokenize_records(load_records(dataset), tokenizer, cfg.max_length)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    n_tokens = sum(len(e.input_ids) for e in examples)
    say(
        f"data: {dataset}: {len(examples)} examples, {n_tokens:,} tokens (max length {cfg.max_length})"
    )

    # ---- model
    torch.manual_seed(cfg.seed)
    wrapper = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=device)
    wrapper.train()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    _broadcast(params, d)
    soul_ids = {id(p) for p in wrapper.soul.parameters()} if wrapper.soul is not None else set()
    groups = [{"params": [p for p in params if id(p) not in soul_ids], "lr": cfg.learning_rate}]
    soul_params = [p for p in params if id(p) in soul_ids]
    if soul_params:
        groups.append({"params": soul_params, "lr": cfg.soul_learning_rate or cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    counts = wrapper.trainable_parameters()
    say(
        f"model: {cfg.base_model} ({wrapper.hf_config.model_type}, H={wrapper.hidden_size}, "
        f"{cfg.quantization}); trainable LoRA {counts['lora']:,} + soul {counts['soul']:,}"
        + (f"; {d.world_size} ranks" if d.enabled else "")
    )

    start_step = 0
    stream = BatchStream(examples, cfg.batch_size, pad_id, cfg.seed, d.rank, d.world_size)
    if resume_from is not None:
        load_into(wrapper, resume_from)
        state = safe_torch_load(resume_from / TRAINER_STATE)
        if state.get("world_size", 1) * state.get("batch_size", 1) != d.world_size * cfg.batch_size:
            say("warning: resuming with another global batch size; the data order shifts")
        optimizer.load_state_dict(state["optimizer"])
        for group, want in zip(optimizer.param_groups, groups, strict=True):
            group["lr"] = want["lr"]  # the flags of this run win over the saved ones
            group["weight_decay"] = cfg.weight_decay
        start_step = int(state["step"])
        stream.position = int(state["data_position"])
        rng = state["rng"][d.rank] if isinstance(state["rng"], list) else state["rng"]
        _set_rng_state(rng)
        say(f"resume: from {resume_from} (step {start_step})")

    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in clean_stale_temp(out_dir / "step_0", pattern=".step_*.*-*"):
            say(f"resume: removed {stale.name}, a step folder a killed run left half-written")
        _trim_metrics(out_dir / METRICS, start_step)
        (out_dir / TRAIN_CONFIG).write_text(
            json.dumps(asdict(cfg), indent=2, ensure_ascii=False) + "\n"
        )

    def save(step: int) -> Path:
        rng_all: Any = _rng_state()
        if d.enabled:
            import torch.distributed as dist

            gathered: list[Any] = [None] * d.world_size
            dist.all_gather_object(gathered, rng_all)
            rng_all = gathered
        folder = out_dir / f"step_{step}"
        if d.main:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "data_position": stream.position,
                "rng": rng_all,
                "world_size": d.world_size,
                "batch_size": cfg.batch_size,
            }

            def extra(tmp: Path) -> None:
                torch.save(trainer_state, tmp / TRAINER_STATE)
                (tmp / TRAIN_CONFIG).write_text(
                    json.dumps(asdict(cfg), indent=2, ensure_ascii=False) + "\n"
                )

            write_step(wrapper, folder, step, extra=extra)
        if d.enabled:
            import torch.distributed as dist

            dist.barrier()
        return folder

    at_target = cfg.max_steps - cfg.warmup_steps - cfg.annealing_steps
    if cfg.soul and cfg.alpha_mode == "schedule" and at_target < 0:
        say(
            f"warning: warmup ({cfg.warmup_steps}) + annealing ({cfg.annealing_steps}) > max steps "
            f"({cfg.max_steps}): α will stop at {linear_annealing(cfg.max_steps - 1, cfg.warmup_steps, cfg.annealing_steps, cfg.alpha_start, cfg.alpha_target):.3f}, short of {cfg.alpha_target:.3f}"
        )
    elif cfg.soul and cfg.alpha_mode == "schedule" and at_target < MIN_STEPS_AT_TARGET:
        gate = 1 / (1 + math.exp(-cfg.alpha_target))
        say(
            f"warning: only {at_target} step(s) at α = {cfg.alpha_target:.3f} after the anneal. "
            f"The open gate scales the logits by ≈ {1 + gate:.2f} while R is near the identity "
            "and the LoRA needs steps there to absorb it (on the shipped tiny model 6 such steps "
            "end above the base's held-out perplexity, 10 below). "
            "Raise --max-steps or shorten --annealing-steps."
        )
    soul = wrapper.soul
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
    last_saved = resume_from
    loss_value = float("nan")
    metrics_fh = open(out_dir / METRICS, "a", encoding="utf-8") if d.main else None
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            if soul is not None and cfg.alpha_mode == "schedule":
                with torch.no_grad():
                    soul.alpha.fill_(
                        linear_annealing(
                            step,
                            cfg.warmup_steps,
                            cfg.annealing_steps,
                            cfg.alpha_start,
                            cfg.alpha_target,
                        )
                    )
            # Kept on the device: no host sync inside the micro-batch loop.
            totals = {
                k: torch.zeros((), device=device) for k in ("loss", "task_loss", "ortho_loss")
            }
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
            # One collective a step: the trainable gradients, the logged losses and the
            # non-finite flag travel in the same flat all-reduce.
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            extra = torch.stack([*totals.values(), nonfinite.float()])
            _all_reduce_mean([*grads, extra], d)
            if float(extra[-1]) > 0:
                good = f"{last_saved}" if last_saved else "none yet"
                raise AgiasiError(
                    f"loss became non-finite (nan/inf) at step {step + 1}; stopped without saving. "
                    f"Last good checkpoint: {good}. Try a lower --learning-rate."
                )
            totals = dict(zip(totals, extra[:-1].tolist(), strict=True))
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.tensor(float("nan"))
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            loss_value = totals["loss"]
            record = {
                "step": done,
                **totals,
                "alpha": float(soul.alpha.detach()) if soul is not None else None,
                "gate": float(soul.gate().detach()) if soul is not None else None,
                "phase": soul.phase() if soul is not None else None,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens": tokens * d.world_size,
                "tokens_per_s": tokens * d.world_size / dt if dt > 0 else None,
                "step_time_s": dt,
                "peak_mem_gib": _peak_memory_gib(device),
            }
            if metrics_fh is not None:
                metrics_fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                metrics_fh.flush()
                maybe_crash("metrics_written")
            if bar is not None:
                post = {"loss": f"{loss_value:.4f}"}
                if soul is not None:
                    post.update(
                        α=f"{record['alpha']:.3f}",
                        gate=f"{record['gate']:.3f}",
                        phase=record["phase"],
                    )
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if done % cfg.save_steps == 0 or done == cfg.max_steps:
                last_saved = save(done)
    finally:
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    final = out_dir / f"step_{cfg.max_steps}"
    if d.main:
        try:
            from agiasi.plot import plot_run

            png = plot_run(out_dir)
            say(f"plot: {png}")
        except AgiasiError as e:
            say(f"plot skipped: {e}")
        say(f"done: {cfg.max_steps} steps, final loss {loss_value:.4f}, checkpoint {final}")
    return TrainResult(out_dir, final, cfg.max_steps, loss_value, out_dir / METRICS)
