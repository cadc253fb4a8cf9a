"""Training speed and memory: agiasi vs plain PEFT QLoRA on Phi-3.5-mini's exact shape.

A random-weight model with Phi-3.5-mini's config costs the same memory and time as the real
one. Every (row, implementation) pair runs in its own process on a clean GPU, and the driver
prints one table with ratios to the reference measured in the same run:

    python bench/train.py                      # all rows, prints the table, writes bench/out.json
    python bench/train.py --rows 512x1 --impls ref,so8

Implementations:
    ref     plain PEFT QLoRA: NF4 (double quant, bf16 compute), prepare_model_for_kbit_training,
            gradient checkpointing, LoRA r16 on qkv_proj+o_proj, the model's own loss, AdamW
    so8     agiasi's training step with the so8 soul (AGIASI_SO8T_Wrapper, chunked head+loss)
    full    the same with the note's dense orthogonal soul
    nosoul  agiasi's step without the soul (isolates the soul's cost)
    so8c, nosoulc   the same with --compile (each decoder layer torch.compile'd)
    so8o    so8 with --offload-activations (checkpointed layer inputs in pinned CPU memory)
    IMPL@N  the MLP tiled at N tokens (--mlp-tile N; @0 never; default 8192)
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
ROWS = ["512x1", "512x8", "2048x1", "4096x1"]
IMPLS = ["ref", "so8", "nosoul"]
LIMIT_GIB = 11.5


def make_random_model(path: Path) -> None:
    """Random bf16 weights with Phi-3.5-mini's shape, initialised on the GPU (fast)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return
    cfg = AutoConfig.from_pretrained(CONFIG.parent)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def build(impl: str, model_dir: Path):
    import torch

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
                target_modules=["qkv_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        )
        model.train()

        def step_loss(ids):
            return model(input_ids=ids, labels=ids).loss

        return model, step_loss
    from agiasi import AGIASI_SO8T_Wrapper

    impl, _, tile = impl.partition("@")  # so8o@4096: the MLP tiled at 4096 tokens (@0: never)
    kwargs = {
        "soul": not impl.startswith("nosoul"),
        "rotation": "full" if impl == "full" else "so8",
        "compile": impl.endswith("c"),
        "offload_activations": impl.endswith("o"),
        **({"mlp_tile": int(tile)} if tile else {}),
    }
    w = AGIASI_SO8T_Wrapper(
        str(model_dir), device="cuda", quantization="nf4", gradient_checkpointing=True, **kwargs
    )
    w.train()
    if w.soul is not None:
        with torch.no_grad():
            w.alpha.fill_(1.618)  # the gate open, as at the end of the schedule

    def step_loss(ids):
        return w(ids, labels=ids, return_logits=False).loss

    return w, step_loss


def run_one(
    impl: str, seq: int, batch: int, model_dir: Path, steps: int, warmup: int, limit: bool
) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    if limit:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(LIMIT_GIB * 2**30 / total)
    model, step_loss = build(impl, model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 32000, (batch, seq), generator=g).cuda()
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    med = statistics.median(times)
    return {
        "impl": impl,
        "seq": seq,
        "batch": batch,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "step_s": med,
        "tokens_per_s": seq * batch / med,
        "first_loss": losses[0],
        "trainable": sum(p.numel() for p in params),
    }


def longest(impl: str, model_dir: Path, candidates: list[int]) -> dict:
    """Increasing lengths in one process under an 11.5 GiB cap; the last one that ran."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(LIMIT_GIB * 2**30 / total)
    model, step_loss = build(impl, model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    best = None
    for seq in candidates:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 32000, (1, seq)).cuda()
        try:
            t0 = time.perf_counter()
            for _ in range(2):
                loss = step_loss(ids)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / 2
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
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
    return best or {"impl": impl, "seq": 0, "longest": True}


def table(results: list[dict]) -> str:
    ref = {
        (r["seq"], r["batch"]): r for r in results if r["impl"] == "ref" and not r.get("longest")
    }
    plain = {
        (r["impl"], r["seq"], r["batch"]): r
        for r in results
        if r["impl"].startswith("nosoul") and not r.get("longest")
    }
    lines = [
        f"{'row':<16}{'impl':<8}{'reserved':>9}{'alloc':>8}{'step s':>9}{'tok/s':>9}"
        f"{'×ref':>7}{'mem×ref':>8}{'loss':>8}{'soul cost':>18}"
    ]
    for r in results:
        if not r.get("seq"):
            lines.append(f"{'longest':<16}{r['impl']:<8}  (nothing fit)")
            continue
        key = (r["seq"], r["batch"])
        row = f"{r['seq']}x{r['batch']}" + (" longest" if r.get("longest") else "")
        base = ref.get(key)
        speed = (
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"
            if base and not r.get("longest")
            else "-"
        )
        mem = (
            f"{r['peak_reserved_gib'] / base['peak_reserved_gib']:.2f}"
            if base and not r.get("longest")
            else "-"
        )
        cost = "-"
        ns = plain.get(("nosoulc" if r["impl"].endswith("c") else "nosoul", *key))
        if r["impl"] in ("so8", "full", "so8c") and ns and not r.get("longest"):
            cost = (
                f"{100 * (r['step_s'] / ns['step_s'] - 1):+.1f}% "
                f"{1024 * (r['peak_reserved_gib'] - ns['peak_reserved_gib']):+.0f}MiB"
            )
        lines.append(
            f"{row:<16}{r['impl']:<8}{r['peak_reserved_gib']:>9.2f}{r['peak_allocated_gib']:>8.2f}"
            f"{r['step_s']:>9.3f}{r['tokens_per_s']:>9.0f}{speed:>7}{mem:>8}{r.get('first_loss', 0):>8.3f}{cost:>18}"
        )
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
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/phi35-random"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["impl"] != "ref":
            import agiasi  # noqa: F401  (its CUDA allocator default applies before the first allocation)
        if spec.get("longest"):
            res = longest(spec["impl"], args.model_dir, spec["candidates"])
        else:
            res = run_one(
                spec["impl"],
                spec["seq"],
                spec["batch"],
                args.model_dir,
                args.steps,
                args.warmup,
                limit=False,
            )
        print("RESULT " + json.dumps(res), flush=True)
        return
    make_random_model(args.model_dir)
    jobs = []
    for row in filter(None, args.rows.split(",")):
        seq, batch = (int(x) for x in row.split("x"))
        for impl in filter(None, args.impls.split(",")):
            jobs.append({"impl": impl, "seq": seq, "batch": batch})
    for pair in filter(None, args.extra.split(",")):
        row, impl = pair.split(":")
        seq, batch = (int(x) for x in row.split("x"))
        jobs.append({"impl": impl, "seq": seq, "batch": batch})
    for part in filter(None, args.longest.split(";")):
        impl, cands = part.split(":")
        jobs.append(
            {"impl": impl, "longest": True, "candidates": [int(c) for c in cands.split(",")]}
        )
    results = []
    for job in jobs:
        t0 = time.time()
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
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"FAILED {job}: {out.stderr[-1500:]}", flush=True)
            continue
        res = json.loads(line[-1][7:])
        results.append(res)
        print(
            f"{job} -> {res.get('tokens_per_s', 0):.0f} tok/s, {res.get('peak_reserved_gib', 0):.2f} GiB "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
