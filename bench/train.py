"""Training speed and memory: agiasi vs plain PEFT QLoRA vs Unsloth on Phi-3.5-mini's shape.

A random-weight model with Phi-3.5-mini's config costs the same memory and time as the real
one. Each implementation runs in its own process on a clean GPU under an 11.5 GiB cap (what a
12 GB card has), its rows one after another on one loaded model (peak memory reset between
rows), and the driver prints one table with ratios to the reference and to Unsloth measured in
the same run:

    python bench/train.py                      # all rows, prints the table, writes bench/out.json
    python bench/train.py --rows 512x1 --impls ref,so8
    python bench/train.py --shape llama-phi-dims --impls ref,unsloth,so8c   # Unsloth's fast path

Shapes: ``phi-3.5-mini`` (Phi3ForCausalLM, fused qkv/gate_up) and ``llama-phi-dims`` (a
LlamaForCausalLM with Phi-3.5-mini's dimensions: hidden 3072, 32 layers, intermediate 8192,
vocab 32064; the architecture Unsloth has hand-written kernels for).

Implementations:
    ref     plain PEFT QLoRA: NF4 (double quant, bf16 compute), prepare_model_for_kbit_training,
            gradient checkpointing, LoRA r16 on qkv_proj+o_proj, the model's own loss, AdamW
    so8     agiasi's training step with the so8 soul (AGIASI_SO8T_Wrapper, chunked head+loss)
    full    the same with the note's dense orthogonal soul
    nosoul  agiasi's step without the soul (isolates the soul's cost)
    unsloth Unsloth as its users run it for speed: FastLanguageModel, load_in_4bit, LoRA r16/α32
            on the same targets, dropout 0 (its fast path), use_gradient_checkpointing="unsloth"
            (checkpoints offloaded to CPU), its own fused loss, the same AdamW
  flags after so8/full/nosoul (any order):
    c       --compile (each decoder layer torch.compile'd)
    o       --offload-activations (checkpointed layer inputs in pinned CPU memory)
    b       with c: bitsandbytes' own NF4 op inside the compiled layers (before agiasi.model.nf4)
    e       --offload-embeddings (the input embedding in pinned host memory, read in place by
            the GPU's gather)
  suffixes:
    -d0     LoRA dropout 0 (Unsloth's setting; the default and ref use the note's 0.05)
    @N      the MLP tiled at N tokens (--mlp-tile N; @0 never; default 8192)
e.g. so8co-d0@4096.  MFU counts 6·N FLOPs a token (N = the model's parameters) at 790 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# what `agiasi train` sets before the first CUDA allocation (both implementations get it)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "src/agiasi/assets/configs/phi-3.5-mini-shape/config.json"
SHAPES = {
    "phi-3.5-mini": "/tmp/phi35-random",
    "llama-phi-dims": "/tmp/llama-phidims-random",
    "qwen2.5-1.5b": "/tmp/qwen25-15b-random",
}
PEAK_FLOPS = 790e12  # dense bf16 on an H200 (measured 788 TFLOP/s on 8192³ products)
ROWS = ["512x1", "512x8", "2048x1", "4096x1"]
IMPLS = ["ref", "so8", "nosoul"]
LIMIT_GIB = 11.5


def shape_config(shape: str):
    """The HF config of a benchmark shape (Phi-3.5-mini's file, or a Llama of its dimensions)."""
    from transformers import AutoConfig, LlamaConfig

    phi = AutoConfig.from_pretrained(CONFIG.parent)
    if shape == "phi-3.5-mini":
        return phi
    if shape == "qwen2.5-1.5b":  # Qwen2.5-1.5B's dimensions: GQA, a 152k vocabulary, tied head
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    same = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads max_position_embeddings rms_norm_eps"
    ).split()
    return LlamaConfig(
        **{k: getattr(phi, k) for k in same},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def config_dir(shape: str) -> Path:
    """A folder holding only the shape's config.json (what an estimate reads; no weights)."""
    path = Path("/tmp/agiasi-shape-configs") / shape
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        shape_config(shape).save_pretrained(path)
    return path


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer of 32,000 ids: Unsloth's loader opens one with the model (the
    benchmark feeds random ids and never tokenizes)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(32000)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        bos_token="t1",
        eos_token="t2",
        pad_token="t3",
    )
    tok.save_pretrained(path)


def param_count(model_dir: Path) -> int:
    """Parameters of the bf16 model (the N of 6·N FLOPs a token), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def make_random_model(path: Path, shape: str = "phi-3.5-mini") -> None:
    """Random bf16 weights of the shape, initialised on the GPU (fast), plus a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (path / "tokenizer.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        save_tokenizer(path)
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return
    cfg = shape_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def lora_targets(model_dir: Path) -> list[str]:
    """The same LoRA targets for every implementation: attention's projections."""
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    return (
        ["qkv_proj", "o_proj"] if model_type == "phi3" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


def parse_impl(impl: str) -> dict:
    """``so8coe-d0@4096`` → soul/rotation/compile/offloads/dropout/tile (see the module doc)."""
    name, _, tile = impl.partition("@")
    name, _, dropout = name.partition("-d")
    base = next((b for b in ("nosoul", "full", "so8") if name.startswith(b)), None)
    flags = name[len(base or "") :]
    if base is None or set(flags) - set("cobe"):
        raise SystemExit(f"unknown implementation {impl!r}")
    return {
        "soul": base != "nosoul",
        "rotation": "full" if base == "full" else "so8",
        "compile": "c" in flags,
        "offload_activations": "o" in flags,
        "bnb_op": "b" in flags,
        "offload_embeddings": "e" in flags,
        "lora_dropout": float(dropout) if dropout else 0.05,
        **({"mlp_tile": int(tile)} if tile else {}),
    }


def build(impl: str, model_dir: Path, seq: int = 4096):
    import torch

    if impl == "unsloth":
        from unsloth import FastLanguageModel  # imported before transformers (--child)

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(model_dir),
            max_seq_length=seq,
            dtype=torch.bfloat16,
            load_in_4bit=True,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0,
            target_modules=lora_targets(model_dir),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=0,
        )
        model.train()

        def step_loss(ids):
            return model(input_ids=ids, labels=ids).loss

        return model, step_loss
    if impl == "ref":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                target_modules=lora_targets(model_dir),
                task_type="CAUSAL_LM",
            ),
        )
        model.train()

        def step_loss(ids):
            return model(input_ids=ids, labels=ids).loss

        return model, step_loss
    from agiasi import AGIASI_SO8T_Wrapper
    from agiasi.process import configure_process

    configure_process(training=True)  # what `agiasi train` sets (attention backend, allocator)
    opts = parse_impl(impl)
    if opts.pop("bnb_op"):  # the A/B: leave bitsandbytes' NF4 forward in the compiled layers
        import agiasi.model.nf4

        agiasi.model.nf4.use_traceable_nf4 = lambda model: 0
    w = AGIASI_SO8T_Wrapper(
        str(model_dir),
        device="cuda",
        quantization="nf4",
        gradient_checkpointing=True,
        lora_targets=lora_targets(model_dir),
        **opts,
    )
    w.train()
    if w.soul is not None:
        with torch.no_grad():
            w.alpha.fill_(1.618)  # the gate open, as at the end of the schedule

    def step_loss(ids):
        return w(ids, labels=ids, return_logits=False).loss

    return w, step_loss


def cap_memory() -> None:
    """What a 12 GB card leaves a process: 11.5 GiB (the CUDA context aside)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(LIMIT_GIB * 2**30 / total)


def make_step(model, step_loss):
    """One optimizer step as every benchmark row runs it (loss, backward, clip, AdamW); returns
    ``step(ids) -> loss`` and the trainable parameters."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)

    def step(ids):
        loss = step_loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params


def run_rows(
    impl: str,
    rows: list[tuple[int, int]],
    model_dir: Path,
    steps: int,
    warmup: int,
    limit: bool,
    dynamic: bool = False,
) -> list[dict]:
    """Each (seq, batch) row on one model, built once: peak memory is reset (and the cache
    emptied) between rows, which run from the smallest to the largest. ``dynamic``: the compiler
    is not reset, so rows after the first run the graph with symbolic sizes (varied widths')."""
    import torch

    if limit:
        cap_memory()
    step, params = make_step(*build(impl, model_dir, max(seq for seq, _ in rows)))
    g = torch.Generator().manual_seed(1234)
    out = []
    for seq, batch in sorted(rows, key=lambda r: r[0] * r[1]):
        # each row is a run of one batch shape: compiled layers start from that shape's static
        # graph, as such a run's do (a later shape would get the dynamic graph varied widths get)
        if not dynamic:
            torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 32000, (batch, seq), generator=g).cuda()
        times, losses = [], []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(ids)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        med = statistics.median(times)
        out.append(
            {
                "impl": impl,
                "seq": seq,
                "batch": batch,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "step_s": med,
                "tokens_per_s": seq * batch / med,
                "first_loss": losses[0],
                "trainable": sum(p.numel() for p in params),
                "capped": limit,
                "dynamic": dynamic,
            }
        )
        print(f"  {impl} {seq}x{batch}: {seq * batch / med:.0f} tok/s", file=sys.stderr, flush=True)
    return out


def longest(impl: str, model_dir: Path, candidates: list[int]) -> dict:
    """Increasing lengths in one process under an 11.5 GiB cap; the last one that ran, timed
    over two steps after an untimed one."""
    import torch

    cap_memory()
    step, _ = make_step(*build(impl, model_dir, max(candidates)))
    best, failed = None, {}
    for seq in candidates:
        torch._dynamo.reset()  # one run per length (run_rows says why)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 32000, (1, seq)).cuda()
        try:
            # one untimed step first (compilation, cuBLAS and cuDNN plans, pinned buffers),
            # then two timed: the rows' own rule, so a length's speed is the steady one
            for i in range(3):
                if i == 1:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                loss = step(ids)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / 2
        except torch.OutOfMemoryError as e:  # the length that failed, and what it asked for
            failed = {"failed_seq": seq, "error": str(e).splitlines()[0][:300]}
            break
        best = {
            "impl": impl,
            "seq": seq,
            "batch": 1,
            "longest": True,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_s": dt,
            "tokens_per_s": seq / dt,
            "first_loss": float(loss),
        }
    return {**(best or {"impl": impl, "seq": 0, "longest": True}), **failed}


def merge_repeats(results: list[dict]) -> list[dict]:
    """One line per implementation and row: the median step of its processes (--repeat), the
    highest peak memory, and every process's tokens/s in ``runs`` (the host-bound rows move by
    10–40 % from one process to the next)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["impl"], r.get("seq"), r.get("batch"), bool(r.get("longest")))
        groups.setdefault(key, []).append(r)
    merged = []
    for rs in groups.values():
        if len(rs) == 1:
            merged.append(rs[0])
            continue
        step = statistics.median(r["step_s"] for r in rs)
        merged.append(
            {
                **rs[0],
                "step_s": step,
                "tokens_per_s": rs[0]["seq"] * rs[0]["batch"] / step,
                "peak_reserved_gib": max(r["peak_reserved_gib"] for r in rs),
                "peak_allocated_gib": max(r["peak_allocated_gib"] for r in rs),
                "runs": [round(r["tokens_per_s"]) for r in rs],
            }
        )
    return merged


def table(results: list[dict], n_params: int | None = None) -> str:
    """One line per run; ×ref and ×uns are tokens/s ratios to plain PEFT and Unsloth's row."""

    results = merge_repeats(results)

    def by(impl):
        return {
            (r["seq"], r["batch"]): r for r in results if r["impl"] == impl and not r.get("longest")
        }

    ref, uns = by("ref"), by("unsloth")
    lines = [
        f"{'row':<16}{'impl':<14}{'reserved':>9}{'alloc':>8}{'step s':>9}{'tok/s':>9}"
        f"{'×ref':>7}{'×uns':>7}{'mem×uns':>8}{'MFU':>6}{'loss':>8}"
    ]
    for r in results:
        failed = (
            f"{'':<16}{r['impl']:<14}  {r['failed_seq']} failed: {r['error']}"
            if r.get("failed_seq")
            else None
        )
        if not r.get("seq"):
            lines += [f"{'longest':<16}{r['impl']:<14}  (nothing fit)"] + [failed] * bool(failed)
            continue
        key = (r["seq"], r["batch"])
        row = f"{r['seq']}x{r['batch']}" + (" longest" if r.get("longest") else "")

        def ratio(base, field, r=r):
            if not base or r.get("longest"):
                return "-"
            return f"{r[field] / base[field]:.2f}"

        mfu = f"{6 * n_params * r['tokens_per_s'] / PEAK_FLOPS:.0%}" if n_params else "-"
        lines.append(
            f"{row:<16}{r['impl']:<14}{r['peak_reserved_gib']:>9.2f}{r['peak_allocated_gib']:>8.2f}"
            f"{r['step_s']:>9.3f}{r['tokens_per_s']:>9.0f}{ratio(ref.get(key), 'tokens_per_s'):>7}"
            f"{ratio(uns.get(key), 'tokens_per_s'):>7}{ratio(uns.get(key), 'peak_reserved_gib'):>8}"
            f"{mfu:>6}{r.get('first_loss', 0):>8.3f}"
            + (f"  runs {'/'.join(map(str, r['runs']))}" if r.get("runs") else "")
        )
        if failed:
            lines.append(failed)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--extra", default="512x1:full", help="extra row:impl pairs")
    ap.add_argument(
        "--longest", default="ref:8192,12288,16384,24576;so8:16384,24576,32768,40960,49152"
    )
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(SHAPES))
    ap.add_argument("--model-dir", type=Path, help="where the random model lives (per shape)")
    ap.add_argument("--no-cap", action="store_true", help="rows without the 11.5 GiB cap")
    ap.add_argument(
        "--dynamic",
        action="store_true",
        help="keep compiled graphs across rows: rows after the first time the dynamic-size graph",
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out.json")
    ap.add_argument("--job-timeout", type=float, help="seconds one implementation may take")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="processes per implementation, taking turns; the table shows each row's median",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model_dir = args.model_dir or Path(SHAPES[args.shape])
    if args.child:
        spec = json.loads(args.child)
        if spec["impl"] == "unsloth":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import unsloth  # noqa: F401  (it patches transformers: imported first, as it asks)
        elif spec["impl"] != "ref":
            import agiasi  # noqa: F401  (its CUDA allocator default applies before the first allocation)
        if spec.get("longest"):
            res = [longest(spec["impl"], args.model_dir, spec["candidates"])]
        else:
            res = run_rows(
                spec["impl"],
                [tuple(r) for r in spec["rows"]],
                args.model_dir,
                args.steps,
                args.warmup,
                limit=not spec.get("no_cap"),
                dynamic=spec.get("dynamic", False),
            )
        print("RESULT " + json.dumps(res), flush=True)
        return
    make_random_model(args.model_dir, args.shape)
    n_params = param_count(args.model_dir)
    rows = {impl: [] for impl in filter(None, args.impls.split(","))}
    for row in filter(None, args.rows.split(",")):
        for impl in rows:
            rows[impl].append([int(x) for x in row.split("x")])
    for pair in filter(None, args.extra.split(",")):
        row, impl = pair.split(":")
        rows.setdefault(impl, []).append([int(x) for x in row.split("x")])
    # one process per implementation, its rows on one model (loading is most of a row's time)
    # --repeat: the implementations' processes take turns (ours, Unsloth, ref, ours, ...), so a
    # drift of the host's speed over the run falls on each of them alike
    jobs = [
        {"impl": i, "rows": r, "no_cap": args.no_cap, "dynamic": args.dynamic, "repeat": k}
        for k in range(args.repeat)
        for i, r in rows.items()
        if r
    ]
    for part in filter(None, args.longest.split(";")):
        impl, cands = part.split(":")
        jobs.append(
            {"impl": impl, "longest": True, "candidates": [int(c) for c in cands.split(",")]}
        )
    results = []
    for job in jobs:
        t0 = time.time()
        try:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    json.dumps(job),
                    "--model-dir",
                    str(args.model_dir),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                timeout=args.job_timeout,
            )
        except subprocess.TimeoutExpired as e:  # the rest of the jobs still run
            print(f"TIMEOUT {job} after {e.timeout:.0f} s", flush=True)
            continue
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"FAILED {job}: {out.stderr[-1500:]}", flush=True)
            continue
        for res in json.loads(line[-1][7:]):
            results.append({**res, "shape": args.shape, "repeat": job.get("repeat", 0)})
            print(
                f"{res['impl']} {res.get('seq')}x{res.get('batch')} -> "
                f"{res.get('tokens_per_s', 0):.0f} tok/s, {res.get('peak_reserved_gib', 0):.2f} GiB",
                flush=True,
            )
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"shape {args.shape}, {n_params / 1e9:.2f} B parameters")
    print(table(results, n_params))


if __name__ == "__main__":
    main()
