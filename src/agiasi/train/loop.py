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

The run folder, its lock and its records live in :mod:`agiasi.checkpoint.run_folder`; data-parallel helpers
in :mod:`agiasi.train.distributed`; process-wide settings in :mod:`agiasi.process`.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from agiasi._faults import maybe_crash
from agiasi.checkpoint.run_folder import (
    METRICS,
    RunLock,
    check_output_dir,
    check_output_path,
    refuse_links,
    write_best,
    write_status,
)
from agiasi.checkpoint.step_folder import write_step
from agiasi.data import IGNORE, BatchStream, Example, collate
from agiasi.errors import AgiasiError
from agiasi.model.host_embedding import head_reads_input_embedding
from agiasi.model.wrapper import AGIASI_SO8T_Wrapper
from agiasi.process import configure_process
from agiasi.soul import gate_of, phase_status
from agiasi.train.config import TrainConfig, TrainResult, schedule_warning
from agiasi.train.distributed import (
    Dist,
    all_gather,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from agiasi.train.objectives import OBJECTIVE_KEYS, preference_loss
from agiasi.train.schedule import linear_annealing, lr_factor
from agiasi.train.session import (
    out_of_memory,
    pick_device,
    resolve_init_from,
    rng_state,
    start_session,
)

__all__ = ["TrainConfig", "TrainResult", "schedule_warning", "train"]

GC_EVERY = 50  # steps between the collector's runs (all ranks at once)


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


def micro_step(
    wrapper: AGIASI_SO8T_Wrapper, batch: dict[str, torch.Tensor], cfg: TrainConfig, reference
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss and what is logged of it, for ``--method``
    (:mod:`agiasi.train.objectives`): SFT's cross-entropy, or a preference loss on pairs."""
    if cfg.method == "sft":
        out = wrapper(**batch, return_logits=False)
        return out.loss, {"task_loss": out.task_loss, "ortho_loss": out.ortho_loss}
    ref = reference.logps(wrapper, batch) if reference is not None else None
    logps, counts, ortho = wrapper.sequence_logps(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    task, logged = preference_loss(cfg, logps, counts, ref)
    loss = task + cfg.ortho_weight * ortho if wrapper.soul is not None else task
    return loss, {"task_loss": task, "ortho_loss": ortho, **logged}


def accumulate(
    wrapper: AGIASI_SO8T_Wrapper,
    stream: BatchStream,
    cfg: TrainConfig,
    device: torch.device,
    reference=None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """``grad_accum`` micro-batches forward and backward; the mean losses (and the objective's
    figures) and a non-finite flag stay on the device (no host sync inside), with the tokens
    this rank saw."""
    totals: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    tokens = 0
    for _ in range(cfg.grad_accum):
        batch = stream.next()
        loss, logged = micro_step(wrapper, batch, cfg, reference)
        nonfinite |= ~torch.isfinite(loss.detach())
        (loss / cfg.grad_accum).backward()
        maybe_crash("after_backward")
        for k, v in {"loss": loss, **logged}.items():
            totals[k] = totals.get(k, 0) + v.detach().float().to(device) / cfg.grad_accum
        tokens += int(batch["attention_mask"].sum())
    return totals, nonfinite, tokens


def train_step(
    wrapper: AGIASI_SO8T_Wrapper,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    stream: BatchStream,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
    timer: StepTimer,
    reference=None,
) -> tuple[dict[str, float], int]:
    """Accumulate, one all-reduce, clip, AdamW; the logged values (after the step's one host
    sync) and the tokens this rank saw."""
    maybe_crash("step_start")
    totals, nonfinite, tokens = accumulate(wrapper, stream, cfg, device, reference)
    timer.computed()
    # One collective a step: the trainable gradients, the logged losses, the non-finite flag
    # and this rank's compute time of the previous step (mean and mean square: the spread
    # across ranks) travel in the same flat all-reduce.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    prev = timer.previous_compute_s()
    extra = torch.stack(
        [
            *totals.values(),
            nonfinite.float(),
            torch.full((), prev, device=device),  # a fill kernel, not an H2D copy
            torch.full((), prev * prev, device=device),
        ]
    )
    all_reduce_mean([*(p.grad for p in params), extra], d)
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if cfg.max_grad_norm > 0
        else torch.full((), float("nan"), device=device)
    )
    # Stepped before the check: a non-finite step is caught by the caller, before anything is
    # saved, and the run stops (the in-memory weights are then discarded).
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sync_logged(extra, list(totals), grad_norm, wrapper.soul), tokens


def sync_logged(
    extra: torch.Tensor, totals: list[str], grad_norm: torch.Tensor, soul
) -> dict[str, float]:
    """The one host sync of the step: everything logged comes back in one transfer."""
    zero = extra[0] * 0
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
    names = (*totals, "nonfinite", "c_mean", "c_sq", "grad_norm")
    out = dict(zip((*names, "alpha", "rotation_distance"), values, strict=True))
    out["sync_wait_s"] = t_wait
    return out


@torch.no_grad()
def evaluate_pairs(
    wrapper: AGIASI_SO8T_Wrapper,
    pairs: list,
    pad_id: int,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
    reference=None,
) -> dict[str, float]:
    """Validation of a preference run: the objective's loss and figures, each the mean over
    every validation pair (ranks take interleaved slices; sums added across them)."""
    from agiasi.data.batching import collate_pairs

    was_training = wrapper.training
    wrapper.eval()
    sums: dict[str, float] = {}
    mine = pairs[d.rank :: d.world_size]
    try:
        for i in range(0, len(mine), cfg.batch_size):
            batch = collate_pairs(mine[i : i + cfg.batch_size], pad_id)
            ref = reference.logps(wrapper, batch, "eval") if reference is not None else None
            logps, counts, _ = wrapper.sequence_logps(
                batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            loss, logged = preference_loss(cfg, logps, counts, ref)
            n = logps.shape[0] // 2
            for k, v in {"loss": loss, **logged}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            sums["pairs"] = sums.get("pairs", 0.0) + n
    finally:
        wrapper.train(was_training)
    keys = ["loss", *OBJECTIVE_KEYS[cfg.method]]  # the same order on every rank
    totals = all_reduce_sum([sums.get(k, 0.0) for k in keys] + [sums.get("pairs", 0.0)], d, device)
    count = totals[-1]
    out = {
        f"eval_{k}": t / count if count else float("nan")
        for k, t in zip(keys, totals[:-1], strict=True)
    }
    out["eval_pairs"] = int(count)
    return out


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
        if "margin" in record:
            post.update(margin=f"{record['margin']:.3f}", acc=f"{record['accuracy']:.2f}")
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
    rng_all = all_gather(rng_state(), d)
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


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, log=None) -> TrainResult | None:
    """Train LoRA + soul (or LoRA alone with ``soul=False``) and write step folders; with
    ``dry_run`` print the plan and the memory estimate instead (and return None)."""
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
    cfg = preference_settings(resolve_init_from(cfg, say), say)
    from agiasi.train.report import check_backends

    check_backends(cfg.report_to)  # a tracker that is not installed: one line, before any work
    if cfg.dry_run:
        from agiasi.train.estimate import estimate_command

        estimate_command(cfg, out=print)
        return None
    out_dir = Path(cfg.output_dir)
    device = pick_device(cfg, d)
    from agiasi.train.estimate import check_fits

    check_fits(cfg, device, say)  # per rank: every rank holds its own model
    lock = RunLock(out_dir)
    if d.main:
        check_output_path(out_dir)
        refuse_links(out_dir)
        lock.acquire()
    try:
        if d.main:
            check_output_dir(out_dir, bool(cfg.resume), cfg.overwrite)
        return _train(cfg, d, device, out_dir, say)
    except torch.OutOfMemoryError as e:  # loading, restoring (the loop's own are caught in it)
        raise out_of_memory(cfg, e, None, None) from None
    finally:
        lock.release()


def preference_settings(cfg: TrainConfig, say) -> TrainConfig:
    """Preference runs train without dropout, as TRL's ``disable_dropout``: the policy must
    score exactly as the reference at step 0, or the first rewards are noise."""
    if cfg.method != "sft" and cfg.lora_dropout:
        say(f"--method {cfg.method}: LoRA dropout off (was {cfg.lora_dropout:g})")
        return replace(cfg, lora_dropout=0.0)
    return cfg


class StopRequest:
    """The first Ctrl-C (SIGINT, what ``agiasi studio``'s Stop sends) lets the step in flight
    finish, saves it and stops; a second one stops at once, as Ctrl-C always did. Only in a
    single process: ranks of a distributed run stop as torchrun stops them."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def close(self) -> None:
        import signal

        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def _train(cfg: TrainConfig, d: Dist, device: torch.device, out_dir: Path, say) -> TrainResult:
    run = start_session(cfg, d, device, out_dir, say)
    if run.finished is not None:
        return run.finished
    if d.main:
        write_status(out_dir, "running", run.start_step)
    reporter = None
    stop = StopRequest(not d.enabled)
    try:
        if d.main and cfg.report_to:
            from agiasi.train.report import Reporter, parse_backends

            name = cfg.run_name or out_dir.resolve().name
            backends = parse_backends(cfg.report_to)
            reporter = Reporter(backends, out_dir, name, run.run_id, asdict(cfg))
        result = _loop(cfg, d, device, out_dir, say, run, stop, reporter)
    except KeyboardInterrupt:
        if d.main:
            write_status(out_dir, "stopped", _last_step(out_dir), "interrupted")
        raise
    except BaseException as e:
        if d.main:
            write_status(out_dir, "failed", _last_step(out_dir), f"{e}"[:500] or type(e).__name__)
        raise
    finally:
        stop.close()
        if reporter is not None:
            reporter.close()
    if d.main:
        write_status(out_dir, "stopped" if stop.requested else "finished", result.steps)
    if stop.requested:
        raise KeyboardInterrupt
    return result


def _last_step(out_dir: Path) -> int | None:
    from agiasi.checkpoint.step_folder import list_checkpoints

    steps = [step for step, _ in list_checkpoints(out_dir)]
    return max(steps) if steps else None


def _loop(cfg: TrainConfig, d: Dist, device: torch.device, out_dir: Path, say, run, stop,
          reporter=None):  # fmt: skip
    wrapper, optimizer, stream, soul = run.wrapper, run.optimizer, run.stream, run.wrapper.soul
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=run.start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
    last_saved, best, stale_evals = run.resume_from, run.best, run.stale_evals
    stopped_early = False
    loss_value = float("nan")
    metrics_fh = open(out_dir / METRICS, "a", encoding="utf-8") if d.main else None
    timer = StepTimer(device)
    # Python's cyclic collector pauses at moments that differ between ranks, and every step's
    # all-reduce waits for the slowest: collect at fixed steps on every rank instead.
    gc.freeze()
    gc.disable()
    try:
        for step in range(run.start_step, cfg.max_steps):
            t0 = time.perf_counter()
            timer.start()
            lr = set_schedules(step, cfg, soul, optimizer, run.warmup)
            v, tokens = train_step(
                wrapper, optimizer, run.params, stream, cfg, d, device, timer, run.reference
            )
            if v["nonfinite"] > 0:
                raise AgiasiError(
                    f"loss became non-finite (nan/inf) at step {step + 1}; stopped without "
                    f"saving. Last good checkpoint: {last_saved or 'none yet'}. "
                    "Try a lower --learning-rate."
                )
            done = step + 1
            loss_value = v["loss"]
            record = step_record(
                v, done, lr, tokens * d.world_size, time.perf_counter() - t0, soul, cfg.method
            )
            record["peak_mem_gib"] = _peak_memory_gib(device)
            if device.type == "cuda":  # what `agiasi estimate` predicts: the allocator's peak
                record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            if timer.enabled and step > run.start_step:
                # previous step's forward+backward GPU time: mean over ranks and its spread
                record["compute_s_prev"] = v["c_mean"]
                record["compute_s_prev_rank_std"] = max(0.0, v["c_sq"] - v["c_mean"] ** 2) ** 0.5
            evaluated, new_best = None, False
            if cfg.is_eval_step(done):
                evaluated = (
                    evaluate_step(wrapper, run.data.eval, run.pad_id, cfg, d, device)
                    if cfg.method == "sft"
                    else evaluate_pairs(
                        wrapper, run.data.eval, run.pad_id, cfg, d, device, run.reference
                    )
                )
                record.update(evaluated)
                new_best = best is None or evaluated["eval_loss"] < best["eval_loss"]
                stale_evals = 0 if new_best else stale_evals + 1
            log_step(record, metrics_fh, bar, soul)
            if reporter is not None:
                reporter.log(record)
            patience_out = bool(
                cfg.early_stopping_patience and stale_evals >= cfg.early_stopping_patience
            )
            if (
                done % cfg.save_steps == 0
                or done == cfg.max_steps
                or new_best
                or patience_out
                or stop.requested
            ):
                last_saved = save_step(
                    wrapper, optimizer, stream, cfg, d, done, last_saved, run.run_id, evaluated
                )
                if reporter is not None:
                    report_plot(reporter, out_dir, done)
            if new_best:
                best = {"step": done, **evaluated, "folder": last_saved.name}
                if d.main:
                    write_best(out_dir, best)
            if stop.requested:
                stopped_early = True
                say(f"stopped at step {done} (saved: {last_saved}); --resume auto continues")
                break
            if patience_out:
                stopped_early = True
                say(
                    f"early stopping: {stale_evals} validation(s) without a new best; best "
                    f"step_{best['step']} (eval loss {best['eval_loss']:.4f}), last step_{done}"
                )
                break
            if done % GC_EVERY == 0:
                gc.collect(1)
    except torch.OutOfMemoryError as e:
        tied = head_reads_input_embedding(wrapper.causal_lm)
        raise out_of_memory(cfg, e, tied, last_saved) from None
    finally:
        gc.enable()
        gc.unfreeze()
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    final = last_saved if stopped_early else out_dir / f"step_{cfg.max_steps}"
    if d.main:
        finish_run(out_dir, final, loss_value, best, say)
    steps_done = int(final.name.removeprefix("step_"))
    best_step = best["step"] if best else None
    return TrainResult(
        out_dir, final, steps_done, loss_value, out_dir / METRICS, best_step, stopped_early
    )


def step_record(
    v: dict[str, float], done: int, lr: float, tokens: int, dt: float, soul, method: str = "sft"
) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` from a step's synced values."""
    return {
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
        "tokens": tokens,
        "tokens_per_s": tokens / dt if dt > 0 else None,
        "step_time_s": dt,
        "sync_wait_s": v["sync_wait_s"],
        **{k: v[k] for k in OBJECTIVE_KEYS.get(method, ()) if k in v},
    }


def report_plot(reporter, out_dir: Path, step: int) -> None:
    """The phase plot so far, to the trackers (at each save)."""
    try:
        from agiasi.train.plot import plot_run

        reporter.image(plot_run(out_dir), step)
    except AgiasiError:  # no matplotlib: the numbers still go
        pass


def finish_run(out_dir: Path, final: Path, loss: float, best: dict | None, say) -> None:
    """The phase plot and the closing line (rank 0)."""
    try:
        from agiasi.train.plot import plot_run

        say(f"plot: {plot_run(out_dir)}")
    except AgiasiError as e:
        say(f"plot skipped: {e}")
    steps_done = int(final.name.removeprefix("step_"))
    best_note = f", best step_{best['step']} (eval loss {best['eval_loss']:.4f})" if best else ""
    say(f"done: {steps_done} steps, final loss {loss:.4f}, checkpoint {final}{best_note}")
