"""Everything before the loop of :func:`agiasi.train.loop.train`, as named steps: the device, the
checkpoint to resume from, the data, the model and its optimizer, and restoring a step folder
(weights, optimizer, data position, RNG: what makes a resume bit-exact).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agiasi.checkpoint.run_folder import (
    METRICS,
    last_loss,
    prepare_run_folder,
    read_best,
    run_identity,
)
from agiasi.checkpoint.step_folder import (
    TRAINER_STATE,
    checkpoint_problem,
    find_resume_checkpoint,
    load_into,
    safe_torch_load,
)
from agiasi.data import BatchStream, Data, collate_pairs, load_data
from agiasi.errors import AgiasiError, out_of_memory_facts
from agiasi.model.loading import load_config, resolve_dtype
from agiasi.model.offload import check_host_memory
from agiasi.model.wrapper import AGIASI_SO8T_Wrapper
from agiasi.shipped import default_dataset
from agiasi.train.config import TrainConfig, TrainResult, check_resume, schedule_warning
from agiasi.train.distributed import Dist, all_gather, broadcast
from agiasi.train.schedule import lr_warmup_steps


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device:
        from agiasi.model.loading import parse_device

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
    from agiasi.model.loading import check_config_fits_weights, load_config

    hf_config = load_config(cfg.base_model, cfg.trust_remote_code)
    check_config_fits_weights(cfg.base_model, hf_config)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and cfg.max_length > max_pos:
        raise AgiasiError(
            f"--max-length {cfg.max_length} exceeds the model's limit of {max_pos} positions"
        )
    tok = _tokenizer(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if cfg.method != "sft":
        return _prepare_pairs(cfg, tok, say), pad_id
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
    packed = f", packed from {data.packed_from} examples" if data.packed_from else ""
    say(
        f"data: {dataset}: {len(data.train)} rows{packed}, {data.train_tokens:,} tokens "
        f"(max length {cfg.max_length})"
    )
    if data.eval:
        where = cfg.eval_dataset or f"{data.n_eval_docs} held-out documents (--eval-split)"
        say(f"validation: {where}: {len(data.eval)} examples, {data.eval_tokens:,} tokens")
    return data, pad_id


def _prepare_pairs(cfg: TrainConfig, tok, say) -> Data:
    """Preference pairs for ``--method dpo|orpo`` (there is no shipped sample of pairs)."""
    from agiasi.data import load_pairs

    if not cfg.dataset:
        raise AgiasiError(
            f"--method {cfg.method} needs --dataset: preference pairs (a prompt, a chosen and a "
            "rejected answer; agiasi data shows what a file holds)"
        )
    data = load_pairs(
        cfg.dataset,
        tok,
        cfg.max_length,
        dataset_format=cfg.dataset_format,
        dataset_columns=cfg.dataset_columns,
        eval_dataset=cfg.eval_dataset,
        eval_split=cfg.eval_split,
        seed=cfg.seed,
        method=cfg.method,
        say=say,
    )
    say(
        f"data: {cfg.dataset}: {len(data.train)} preference pairs, {data.train_tokens:,} tokens "
        f"(both answers; max length {cfg.max_length})"
    )
    if data.eval:
        where = cfg.eval_dataset or f"{data.n_eval_docs} held-out pairs (--eval-split)"
        say(f"validation: {where}: {len(data.eval)} pairs, {data.eval_tokens:,} tokens")
    return data


# What a step folder fixes about the model that continues from it (--init-from).
INHERITED = (
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "soul",
    "rotation",
    "rotation_init",
    "soul_mix",
)
ALPHA_SCHEDULE = ("alpha_start", "alpha_target", "warmup_steps", "annealing_steps")


def resolve_init_from(cfg: TrainConfig, say) -> TrainConfig:
    """``--init-from STEP``: the step folder's adapter shape and soul, and α held at the value
    it reached unless an ``--alpha-*`` schedule flag differs from its default. Decided from the
    folder's ``soul.json`` alone, before anything loads, so a resume resolves it the same way."""
    from dataclasses import fields as dc_fields
    from dataclasses import replace

    from agiasi.checkpoint.step_folder import read_manifest

    if not cfg.init_from:
        return cfg
    path = Path(cfg.init_from)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise AgiasiError(f"--init-from {cfg.init_from!r}: {problem}")
    manifest = read_manifest(path)
    recorded = {k: manifest.model.get(k) for k in INHERITED if k in manifest.model}
    recorded["soul_mix"] = manifest.mix
    recorded["soul"] = manifest.soul is not None
    changes = {k: v for k, v in recorded.items() if getattr(cfg, k) != v}
    if changes:
        say(
            "init-from: the model's shape comes from "
            f"{path.name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
        )
    defaults = {f.name: f.default for f in dc_fields(TrainConfig)}
    if manifest.soul is not None and manifest.soul.alpha is not None:
        if all(getattr(cfg, k) == defaults[k] for k in ALPHA_SCHEDULE):
            a = float(manifest.soul.alpha)
            changes.update(alpha_start=a, alpha_target=a, warmup_steps=0, annealing_steps=0)
            say(f"init-from: alpha stays at {a:.4f}, the value {path.name} reached")
    return replace(cfg, **changes)


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
    set_rng_state(rng)
    say(f"resume: from {resume_from} (step {int(state['step'])})")
    return int(state["step"])


def evals_since_best(out_dir: Path, best: dict[str, Any] | None) -> int:
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


@dataclass
class Session:
    """What the loop starts from. ``finished`` is set when a resumed run has nothing left."""

    data: Data | None = None
    pad_id: int = 0
    wrapper: AGIASI_SO8T_Wrapper | None = None
    optimizer: torch.optim.Optimizer | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    stream: BatchStream | None = None
    resume_from: Path | None = None
    start_step: int = 0
    warmup: int = 0
    run_id: str = ""
    best: dict[str, Any] | None = None
    stale_evals: int = 0
    finished: TrainResult | None = None
    reference: Any = None  # DPO's starting model (agiasi.train.reference.Reference)


def _already_done(cfg: TrainConfig, resume_from: Path, done: int, out_dir: Path, say):
    """A resume at (or past) ``--max-steps``: nothing to train, or a clear error."""
    if done > cfg.max_steps:
        raise AgiasiError(
            f"{resume_from} is at step {done}, past --max-steps {cfg.max_steps}: "
            "nothing to train (raise --max-steps to continue the run)"
        )
    say(f"done: {resume_from} is already at --max-steps {cfg.max_steps}; nothing to train")
    metrics = out_dir / METRICS
    return TrainResult(out_dir, resume_from, done, last_loss(metrics, done), metrics)


def memory_tips(cfg: TrainConfig, head_tied: bool | None) -> list[str]:
    """This run's own ways to need less GPU memory, cheapest first (flags already on are not
    offered again): what the out-of-memory message and the estimate's warning both name."""
    tips = []
    if not cfg.gradient_checkpointing:
        tips.append("--gradient-checkpointing")
    elif not cfg.offload_activations:
        tips.append("--offload-activations")
    if head_tied is False and not cfg.offload_embeddings:
        tips.append("--offload-embeddings")
    if cfg.quantization == "none":
        tips.append("--quantization nf4")
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        tips.append(
            f"--batch-size {half} --grad-accum {cfg.grad_accum * cfg.batch_size // half} "
            "(about the same tokens a step)"
        )
    tips.append(f"a shorter --max-length (now {cfg.max_length})")
    return tips


def out_of_memory(
    cfg: TrainConfig, error: BaseException, head_tied: bool | None, last_saved: Path | None
) -> AgiasiError:
    """What a CUDA out-of-memory error becomes: what was asked for, and this run's own ways to
    need less, cheapest first (flags already on are not offered again). ``head_tied`` is None
    before the model exists: the embedding's place is then unknown, and not offered."""
    tips = memory_tips(cfg, head_tied)
    resume = (
        f" Last complete checkpoint: {last_saved} (--resume auto continues from it)."
        if last_saved
        else ""
    )
    return AgiasiError(
        f"the GPU ran out of memory{out_of_memory_facts(error)}. To need less: "
        + "; ".join(tips)
        + "."
        + resume
    )


def _offload_budget(cfg: TrainConfig, device: torch.device) -> str:
    """The pinned host memory offloading will take, checked against what the host has."""
    text = load_config(cfg.base_model, cfg.trust_remote_code)
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    itemsize = torch.empty((), dtype=resolve_dtype(cfg.dtype, device)).element_size()
    tokens = cfg.batch_size * cfg.max_length
    return check_host_memory(text.hidden_size, text.num_hidden_layers, tokens, itemsize)


def precompute_reference(run: Session, cfg: TrainConfig, d: Dist, out_dir: Path, say) -> None:
    """The reference's tables: read back from the run folder when they belong to these pairs
    (a resume), else scored now (every rank the same) and written by rank 0."""
    from agiasi.train.reference import pairs_fingerprint

    splits = {"train": run.data.train, **({"eval": run.data.eval} if run.data.eval else {})}
    prints = {split: pairs_fingerprint(pairs) for split, pairs in splits.items()}
    if run.reference.load(out_dir, prints):
        say("reference: log-probs read back from the run folder (--precompute-reference)")
        return
    for split, pairs in splits.items():
        run.reference.precompute(run.wrapper, pairs, run.pad_id, cfg.batch_size, split, say)
    if d.main:
        run.reference.save(out_dir, prints)


def start_session(cfg: TrainConfig, d: Dist, device: torch.device, out_dir: Path, say) -> Session:
    """Resume point → data → model → optimizer → restored state → the run folder's first
    writes (only after everything that can fail at start-up has passed)."""
    run = Session(resume_from=resolve_resume(cfg, out_dir, say))
    state = None
    if run.resume_from is not None:
        check_resume(cfg, run.resume_from)
        state = safe_torch_load(run.resume_from / TRAINER_STATE)
    run.run_id = run_identity(out_dir, run.resume_from, state.get("run_id") if state else None)
    if state is not None and int(state["step"]) >= cfg.max_steps:
        run.finished = _already_done(cfg, run.resume_from, int(state["step"]), out_dir, say)
        return run
    torch.manual_seed(cfg.seed)
    run.data, run.pad_id = prepare_data(cfg, say)
    if cfg.offload_activations:
        say(_offload_budget(cfg, device))
    torch.manual_seed(cfg.seed)
    run.wrapper = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=device)
    run.wrapper.train()
    if cfg.init_from:
        load_into(run.wrapper, cfg.init_from)
        say(f"init-from: adapter and soul of {cfg.init_from}")
    if cfg.method == "dpo":
        from agiasi.train.reference import Reference

        run.reference = Reference(run.wrapper, adapter_trained=bool(cfg.init_from))
    run.optimizer, run.params, groups = build_optimizer(cfg, run.wrapper)
    broadcast(run.params, d)
    counts = run.wrapper.trainable_parameters()
    say(
        f"model: {cfg.base_model} ({run.wrapper.hf_config.model_type}, "
        f"H={run.wrapper.hidden_size}, {cfg.quantization}); trainable LoRA {counts['lora']:,} "
        f"+ soul {counts['soul']:,}"
        + (f" ({cfg.soul_mix} mix)" if cfg.soul else "")
        + (f"; {d.world_size} ranks" if d.enabled else "")
    )
    if cfg.offload_embeddings:
        say(
            f"input embedding in host memory: {run.wrapper.embedding_bytes_on_host / 2**30:.2f} "
            "GiB off the GPU"
            if run.wrapper.embedding_on_host
            else "--offload-embeddings: a CPU run keeps the embedding where it is"
        )
    run.stream = BatchStream(
        run.data.train, cfg.batch_size, run.pad_id, cfg.seed, d.rank, d.world_size,
        pin_memory=device.type == "cuda",
        collate_fn=collate_pairs if cfg.method != "sft" else None,
    )  # fmt: skip
    if state is not None:
        run.start_step = restore(
            state, run.resume_from, run.wrapper, run.optimizer, groups, run.stream, cfg, d, say
        )
    if d.main:
        prepare_run_folder(
            out_dir, asdict(cfg), run.start_step, cfg.overwrite and not cfg.resume, run.run_id, say
        )
        run.best = read_best(out_dir) if run.start_step else None
        run.stale_evals = evals_since_best(out_dir, run.best)
    if cfg.precompute_reference:
        precompute_reference(run, cfg, d, out_dir, say)
    if d.enabled:  # every rank must stop early at the same step
        run.best, run.stale_evals = all_gather((run.best, run.stale_evals), d)[0]
    warning = schedule_warning(cfg)
    if warning:
        say(warning)
    run.warmup = lr_warmup_steps(cfg.max_steps, cfg.lr_warmup_steps, cfg.lr_warmup_ratio)
    say(
        f"learning rate: {cfg.lr_scheduler}, peak {cfg.learning_rate:g}, warm-up {run.warmup} "
        f"step(s), floor {cfg.min_lr_ratio:g}x (alpha's schedule is separate)"
    )
    return run
