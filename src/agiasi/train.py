"""``train(config)``: the note's phase-transition training, in one visible loop.

Per optimizer step: set α from the schedule (``schedule`` mode) → ``grad_accum`` micro-batches
forward/backward → all-reduce the trainable gradients (LoRA + soul only) across ranks → clip →
AdamW step → log → maybe checkpoint. Nothing is hidden in callbacks; the setup before the loop
is a row of named helpers.

Distributed: launched by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1), every rank
holds its own (4-bit) base model; ranks start from identical trainable parameters (same seed,
then a broadcast from rank 0), take disjoint slices of each global batch (:class:`BatchStream`),
and average gradients by one flat all-reduce of the trainable tensors. Rank 0 writes.

Resume is exact: a step folder carries the optimizer state, the RNG states and the data
position, so a killed run resumed with ``--resume auto`` ends bit-for-bit where an uninterrupted
run ends (CPU, fixed seed).

The output folder belongs to one run: a lock file keeps a second run out (its error names the
holder's pid), and a folder that already holds a run is refused unless ``--resume`` continues it
or ``--overwrite`` replaces it. Nothing in it is touched before the data and the model loaded.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from agiasi._faults import maybe_crash
from agiasi.checkpoint import (
    TRAIN_CONFIG,
    TRAINER_STATE,
    checkpoint_problem,
    clean_stale_temp,
    find_resume_checkpoint,
    list_checkpoints,
    load_into,
    safe_torch_load,
    write_step,
)
from agiasi.data import BatchStream, Example, default_dataset, load_records, tokenize_records
from agiasi.errors import AgiasiError
from agiasi.model import AGIASI_SO8T_Wrapper, ModelConfig
from agiasi.options import option
from agiasi.schedule import linear_annealing
from agiasi.soul import PHI, gate_of, phase_status

METRICS = "metrics.jsonl"
GC_EVERY = 50  # steps between the collector's runs (all ranks at once)
LOCK = ".agiasi-train.lock"
PLOT = "phase_transition.png"

# Steps at α = target below which the run is warned about: measured on the shipped tiny model
# with the residual mix (bench/soul_cost.py), 6 steps at φ end above the base's held-out
# perplexity, 10 below. The convex mix does not scale the logits and needs no such steps.
MIN_STEPS_AT_TARGET = 10


@dataclass
class TrainConfig(ModelConfig):
    """Every field is a flag of ``agiasi train`` (``max_steps`` ↔ ``--max-steps``) and a key of
    ``--config FILE.yaml``; the model's own options come from :class:`ModelConfig`. Defaults are
    the design note's."""

    dataset: str | None = option(
        None,
        ".txt (one paragraph a line), .jsonl (text or chat messages) or a saved HF dataset "
        "folder; default: the shipped Japanese sample",
    )
    output_dir: str = option("checkpoints_agiasi", "where step_N folders and metrics go")
    overwrite: bool = option(
        False, "replace the run already in --output-dir (its step folders and metrics)"
    )
    max_steps: int = option(500, "optimizer steps", ge=1)
    warmup_steps: int = option(50, "steps at --alpha-start before the anneal", ge=0)
    annealing_steps: int = option(400, "steps of the straight line to --alpha-target", ge=0)
    batch_size: int = option(1, "sequences per micro-batch (per rank)", ge=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", ge=1)
    max_length: int = option(512, "tokens per sequence (text is packed to this length)", ge=2)
    learning_rate: float = option(2e-4, "AdamW learning rate of the LoRA", gt=0.0)
    soul_learning_rate: float | None = option(
        None, "learning rate of the soul (default: --learning-rate)", gt=0.0
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
        if os.environ.get("AGIASI_CPU_AFFINITY") == "1":
            pin_cpus(local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def pin_cpus(local_rank: int, local_world: int) -> list[int]:
    """Give each rank on a host its own contiguous block of the CPUs it may use (opt-in with
    ``AGIASI_CPU_AFFINITY=1``, like accelerate's ``ACCELERATE_CPU_AFFINITY``): a launch-bound step
    runs at the speed of the core issuing its kernels, and ranks sharing cores (or hyperthread
    siblings, which Linux numbers half the list apart) can slow each other down. On 2 H200s
    (bench/RESULTS.md) three pinned runs gave 9,867-11,684 tokens/s against 10,008 unpinned, the
    ranks' spread 12-43 ms against 42 ms: inside that machine's run-to-run noise, so it is not
    the default. A process already pinned (taskset, numactl, a scheduler) is left alone.
    Returns the CPUs this rank keeps."""
    cpus = sorted(os.sched_getaffinity(0))
    if local_world < 2 or len(cpus) < 2 * local_world or len(cpus) < (os.cpu_count() or 0):
        return cpus
    per = len(cpus) // local_world
    mine = cpus[local_rank * per : (local_rank + 1) * per]
    os.sched_setaffinity(0, mine)
    return mine


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


# --------------------------------------------------------------------------- the output folder


class RunLock:
    """Exclusive hold on a run folder for the whole run.

    ``flock`` on ``OUT/.agiasi-train.lock`` (the OS releases it if the process dies, so a killed
    run never blocks its own ``--resume``); the file holds the pid for the error a second run
    gets. Where ``flock`` does not exist the pid file alone is the lock.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / LOCK
        self._fh = None
        self._created_dir = False

    def acquire(self) -> None:
        try:
            if not self.out_dir.exists():
                self.out_dir.mkdir(parents=True)
                self._created_dir = True
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise AgiasiError(
                f"cannot write to --output-dir {self.out_dir}: {e.strerror or e}"
            ) from None
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise AgiasiError(
                f"--output-dir {self.out_dir} is in use by another `agiasi train` (pid {holder}); "
                "wait for it to finish or pick another --output-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        self.path.unlink(missing_ok=True)
        self._fh.close()
        self._fh = None
        if self._created_dir and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a run that failed at start-up leaves no empty folder behind


def check_output_path(out_dir: Path) -> None:
    """A folder we can create or write (checked before the lock creates anything)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AgiasiError(f"--output-dir {out_dir} is a file; pass a folder")
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise AgiasiError(f"--output-dir {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise AgiasiError(f"--output-dir {out_dir}: {existing} is not writable")


def check_output_dir(out_dir: Path, cfg: TrainConfig) -> None:
    """Not another run's folder, unless this run continues or replaces it (under the lock)."""
    if cfg.resume or cfg.overwrite or not out_dir.is_dir():
        return
    taken = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK)
    if taken:
        shown = ", ".join(taken[:3]) + (", …" if len(taken) > 3 else "")
        raise AgiasiError(
            f"--output-dir {out_dir} already holds a run ({shown}); pass --resume auto to "
            "continue it, --overwrite to replace it, or another --output-dir"
        )


def replace_previous_run(out_dir: Path, say) -> None:
    """``--overwrite``: remove what an earlier run wrote (only agiasi's own files)."""
    removed = 0
    for _, folder in list_checkpoints(out_dir):
        import shutil

        shutil.rmtree(folder)
        removed += 1
    for name in (METRICS, TRAIN_CONFIG, PLOT):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed += 1
    if removed:
        say(f"overwrite: removed the previous run in {out_dir} ({removed} entries)")


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


def _check_resume_base(cfg: TrainConfig, resume_from: Path) -> None:
    """The checkpoint must come from this base model (read from configs only, no weights)."""
    from agiasi.checkpoint import check_same_base, read_manifest
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


def load_data(cfg: TrainConfig, say) -> tuple[list[Example], int]:
    """Tokenized examples and the pad id; a bad --base-model or --max-length fails first."""
    from transformers import AutoTokenizer

    from agiasi.model import load_config

    hf_config = load_config(cfg.base_model, cfg.trust_remote_code)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and cfg.max_length > max_pos:
        raise AgiasiError(
            f"--max-length {cfg.max_length} exceeds the model's limit of {max_pos} positions"
        )
    try:
        tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise AgiasiError(
            f"could not load the tokenizer of {cfg.base_model!r}: {str(e).splitlines()[0]}"
        ) from None
    dataset = cfg.dataset or str(default_dataset())
    examples = tokenize_records(load_records(dataset), tok, cfg.max_length, log=say)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_tokens = sum(len(e.input_ids) for e in examples)
    say(
        f"data: {dataset}: {len(examples)} examples, {n_tokens:,} tokens (max length {cfg.max_length})"
    )
    return examples, pad_id


def build_optimizer(
    cfg: TrainConfig, wrapper: AGIASI_SO8T_Wrapper
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter], list[dict[str, Any]]]:
    """AdamW over LoRA (``--learning-rate``) and soul (``--soul-learning-rate``) groups."""
    params = [p for p in wrapper.parameters() if p.requires_grad]
    soul_ids = {id(p) for p in wrapper.soul.parameters()} if wrapper.soul is not None else set()
    groups = [{"params": [p for p in params if id(p) not in soul_ids], "lr": cfg.learning_rate}]
    soul_params = [p for p in params if id(p) in soul_ids]
    if soul_params:
        groups.append({"params": soul_params, "lr": cfg.soul_learning_rate or cfg.learning_rate})
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
        group["lr"] = want["lr"]  # the flags of this run win over the saved ones
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


def save_step(
    wrapper: AGIASI_SO8T_Wrapper,
    optimizer: torch.optim.Optimizer,
    stream: BatchStream,
    cfg: TrainConfig,
    d: Dist,
    step: int,
) -> Path:
    """A step folder with what resume needs (every rank's RNG); rank 0 writes."""
    rng_all: Any = _rng_state()
    if d.enabled:
        import torch.distributed as dist

        gathered: list[Any] = [None] * d.world_size
        dist.all_gather_object(gathered, rng_all)
        rng_all = gathered
    folder = Path(cfg.output_dir) / f"step_{step}"
    if d.main:
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data_position": stream.position,
            "rng": rng_all,
            "world_size": d.world_size,
            "batch_size": cfg.batch_size,
        }
        write_step(wrapper, folder, step, trainer_state=trainer_state, train_config=asdict(cfg))
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
    return folder


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


def _last_loss(path: Path, step: int) -> float:
    if path.is_file():
        for line in reversed(path.read_text(encoding="utf-8").splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") == step and isinstance(rec.get("loss"), (int, float)):
                return float(rec["loss"])
    return float("nan")


def _prepare_run_folder(out_dir: Path, cfg: TrainConfig, start_step: int, say) -> None:
    """The first writes of the run, after everything that can fail at start-up has passed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        replace_previous_run(out_dir, say)
    for stale in clean_stale_temp(out_dir / "step_0", pattern=".step_*.*-*"):
        say(f"resume: removed {stale.name}, a step folder a killed run left half-written")
    _trim_metrics(out_dir / METRICS, start_step)
    (out_dir / TRAIN_CONFIG).write_text(
        json.dumps(asdict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


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


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Train LoRA + soul (or LoRA alone with ``soul=False``) and write step folders."""
    # Fewer reserved-but-unused bytes in PyTorch's CUDA allocator: on a 12 GB card that headroom
    # is the difference between fitting and not. Read at the first CUDA allocation (so set here,
    # before the model loads); a value the user set is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # On H100/H200 PyTorch prefers cuDNN's attention, which spends 2-3 ms of host time a call
    # (torch.profiler, bench/RESULTS.md). Alone a GPU hides that; under DDP each rank's
    # micro-batch took 0.27-0.29 s against 0.24-0.26 s alone, and 2 GPUs gave 1.58-1.70x one.
    # With flash attention (same math) the ranks run as fast as a lone GPU: 1.93-2.01x.
    # PyTorch picks cuDNN on those cards only; AGIASI_CUDNN_SDPA=1 keeps it.
    if torch.cuda.is_available() and os.environ.get("AGIASI_CUDNN_SDPA") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg.validate()
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
            check_output_dir(out_dir, cfg)
        return _train(cfg, d, device, out_dir, say)
    finally:
        lock.release()


def _train(cfg: TrainConfig, d: Dist, device: torch.device, out_dir: Path, say) -> TrainResult:
    resume_from = resolve_resume(cfg, out_dir, say)
    state = None
    if resume_from is not None:
        _check_resume_base(cfg, resume_from)
        state = safe_torch_load(resume_from / TRAINER_STATE)
    if state is not None and int(state["step"]) >= cfg.max_steps:
        done = int(state["step"])
        if done > cfg.max_steps:
            raise AgiasiError(
                f"{resume_from} is at step {done}, past --max-steps {cfg.max_steps}: nothing "
                "to train (raise --max-steps to continue the run)"
            )
        say(f"done: {resume_from} is already at --max-steps {cfg.max_steps}; nothing to train")
        return TrainResult(
            out_dir, resume_from, done, _last_loss(out_dir / METRICS, done), out_dir / METRICS
        )

    torch.manual_seed(cfg.seed)
    examples, pad_id = load_data(cfg, say)

    torch.manual_seed(cfg.seed)
    wrapper = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=device)
    wrapper.train()
    optimizer, params, groups = build_optimizer(cfg, wrapper)
    _broadcast(params, d)
    counts = wrapper.trainable_parameters()
    say(
        f"model: {cfg.base_model} ({wrapper.hf_config.model_type}, H={wrapper.hidden_size}, "
        f"{cfg.quantization}); trainable LoRA {counts['lora']:,} + soul {counts['soul']:,}"
        + (f" ({cfg.soul_mix} mix)" if cfg.soul else "")
        + (f"; {d.world_size} ranks" if d.enabled else "")
    )
    stream = BatchStream(
        examples,
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
        _prepare_run_folder(out_dir, cfg, start_step, say)
    warning = schedule_warning(cfg)
    if warning:
        say(warning)

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
    timer = StepTimer(device)
    # Python's cyclic collector pauses at moments that differ between ranks, and every step's
    # all-reduce waits for the slowest: collect at fixed steps on every rank instead.
    gc.freeze()
    gc.disable()
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            timer.start()
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
            timer.computed()
            # One collective a step: the trainable gradients, the logged losses, the non-finite
            # flag and this rank's compute time of the previous step (mean and mean square:
            # the spread across ranks) travel in the same flat all-reduce.
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
            _all_reduce_mean([*grads, extra], d)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.full((), float("nan"), device=device)
            )
            # Stepped before the check: a non-finite step is caught below, before anything is
            # saved, and the run stops (the in-memory weights are then discarded).
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # The one host sync of the step: everything logged comes back in one transfer.
            logged = torch.stack(
                [
                    *extra,
                    grad_norm.float().reshape(()),
                    soul.alpha.detach().float() if soul is not None else extra[0] * 0,
                    soul.rotation_distance_tensor().float() if soul is not None else extra[0] * 0,
                ]
            )
            t_wait = time.perf_counter()
            values = logged.tolist()
            t_wait = time.perf_counter() - t_wait
            loss_v, task_v, ortho_v, bad, c_mean, c_sq, gnorm, alpha_v, rdist = values
            if bad > 0:
                good = f"{last_saved}" if last_saved else "none yet"
                raise AgiasiError(
                    f"loss became non-finite (nan/inf) at step {step + 1}; stopped without saving. "
                    f"Last good checkpoint: {good}. Try a lower --learning-rate."
                )
            done = step + 1
            dt = time.perf_counter() - t0
            loss_value = loss_v
            record = {
                "step": done,
                "loss": loss_v,
                "task_loss": task_v,
                "ortho_loss": ortho_v,
                "alpha": alpha_v if soul is not None else None,
                "gate": float(gate_of(alpha_v)) if soul is not None else None,
                "phase": phase_status(alpha_v) if soul is not None else None,
                "rotation_distance": rdist if soul is not None else None,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": gnorm,
                "tokens": tokens * d.world_size,
                "tokens_per_s": tokens * d.world_size / dt if dt > 0 else None,
                "step_time_s": dt,
                "sync_wait_s": t_wait,
                "peak_mem_gib": _peak_memory_gib(device),
            }
            if timer.enabled and step > start_step:
                # previous step's forward+backward GPU time: mean over ranks and its spread
                record["compute_s_prev"] = c_mean
                record["compute_s_prev_rank_std"] = max(0.0, c_sq - c_mean * c_mean) ** 0.5
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
                last_saved = save_step(wrapper, optimizer, stream, cfg, d, done)
            if done % GC_EVERY == 0:
                gc.collect(1)
    finally:
        gc.enable()
        gc.unfreeze()
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
