"""Preference-tuning speed and memory: agiasi's DPO / ORPO vs TRL's DPOTrainer + PEFT QLoRA vs
Unsloth's DPO, on Phi-3.5-mini's shape (random weights: same memory and time as the real model).

Every implementation runs in its own process on a clean GPU under an 11.5 GiB cap (a 12 GB
card), each row a batch of B pairs whose prompt and answers make 1,024-token sequences (prompt
512, each answer 512: 2·B rows of 1,024), one optimizer step timed as the trainer runs it: the
reference's forward (DPO; none for ORPO), the policy's forward and backward over chosen and
rejected, clipping, AdamW. Tokens/s counts both answers' rows.

    python bench/dpo.py                           # every implementation, prints the table
    python bench/dpo.py --impls agiasi-dpo,trl --rows 1,4

Implementations (LoRA r16/α32 on qkv_proj + o_proj, dropout 0 — TRL's ``disable_dropout`` —,
NF4 with bf16 compute, gradient checkpointing):
    agiasi-dpo   agiasi's loop step (``train.loop.micro_step``) with ``--method dpo``: the so8
                 soul, the reference as agiasi builds it from a fresh adapter, the chunked
                 per-sequence log-probs; flags as the README's 12 GB command (offloaded
                 activations and embedding); ``-c`` appended: --compile
    agiasi-orpo  the same with ``--method orpo`` (no reference forward)
                 suffixes: ``-c`` --compile, ``-p`` no offloading (both: ``-cp``)
    trl          TRL's ``DPOTrainer.compute_loss`` on its own collated batch, PEFT QLoRA
                 (prepare_model_for_kbit_training), reference = adapter disabled (TRL's way)
    unsloth      the same through Unsloth (FastLanguageModel 4-bit, its gradient checkpointing,
                 its patched TRL trainer)
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

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SHAPES, cap_memory, lora_targets, make_random_model  # noqa: E402  bench/train.py

IMPLS = ["agiasi-dpo", "agiasi-orpo", "trl", "unsloth"]
PROMPT, ANSWER = 512, 512
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a smoke test of the code paths


def random_pairs(batch: int, seed: int = 1234) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, 32000, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(PROMPT), "chosen_ids": ids(ANSWER), "rejected_ids": ids(ANSWER)}
            for _ in range(batch)]  # fmt: skip


def optimizer_step(model, loss_of):
    """``(step(examples) -> loss, params)``: the loss, backward, clip, AdamW — every row alike."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-6)

    def step(examples):
        loss = loss_of(examples)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params


def build_trl(impl: str, model_dir: Path, tmp: Path):
    """TRL's DPOTrainer (or Unsloth's patched one) around a 4-bit LoRA model; returns
    ``(step(examples) -> loss, params)``."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    targets = lora_targets(model_dir)
    if impl == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=PROMPT + ANSWER, dtype=torch.bfloat16,
            load_in_4bit=True, local_files_only=True,
        )  # fmt: skip
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, target_modules=targets, bias="none",
            use_gradient_checkpointing="unsloth", random_state=0,
        )  # fmt: skip
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb, dtype=torch.bfloat16,
            device_map={"": 0 if DEVICE == "cuda" else DEVICE},
        )  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
        tok = AutoTokenizer.from_pretrained(model_dir)
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp), per_device_train_batch_size=1, report_to=[], bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        gradient_checkpointing=True, max_length=None, disable_dropout=True, beta=0.1,
    )  # fmt: skip
    dummy = Dataset.from_list([{"prompt": "t5", "chosen": "t6", "rejected": "t7"}])
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    model = trainer.model
    model.train()

    def loss_of(examples):
        batch = {k: v.to(DEVICE) for k, v in trainer.data_collator(examples).items()}
        return trainer.compute_loss(model, batch)

    return optimizer_step(model, loss_of)


def build_agiasi(impl: str, model_dir: Path):
    import torch

    from agiasi.data.batching import collate_pairs
    from agiasi.data.preference import PairExample
    from agiasi.data.tokenize import IGNORE
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper
    from agiasi.process import configure_process
    from agiasi.train.config import TrainConfig
    from agiasi.train.loop import micro_step
    from agiasi.train.reference import Reference

    configure_process(training=True)
    parts = impl.split("-")  # agiasi-dpo[-cp]
    method, flags = parts[1], parts[2] if len(parts) > 2 else ""
    cfg = TrainConfig(
        base_model=str(model_dir), method=method, quantization="nf4", lora_dropout=0.0,
        lora_targets=lora_targets(model_dir), gradient_checkpointing=True,
        offload_activations="p" not in flags, offload_embeddings="p" not in flags,
        compile="c" in flags,
    )  # fmt: skip
    w = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=DEVICE)
    w.train()
    with torch.no_grad():
        w.alpha.fill_(1.618)  # the gate open, as after SFT's anneal
    reference = Reference(w, adapter_trained=False) if method == "dpo" else None

    def loss_of(examples):
        pairs = [
            PairExample(e["prompt_ids"] + e["chosen_ids"], [IGNORE] * PROMPT + e["chosen_ids"],
                        e["prompt_ids"] + e["rejected_ids"], [IGNORE] * PROMPT + e["rejected_ids"],
                        PROMPT, False, i)
            for i, e in enumerate(examples)
        ]  # fmt: skip
        return micro_step(w, collate_pairs(pairs, 3), cfg, reference)[0]

    return optimizer_step(w, loss_of)


def run(impl: str, batches: list[int], model_dir: Path, steps: int, warmup: int) -> list[dict]:
    import tempfile

    import torch

    cap_memory()
    with tempfile.TemporaryDirectory() as tmp:
        if impl.startswith("agiasi"):
            step, params = build_agiasi(impl, model_dir)
        else:
            step, params = build_trl(impl, model_dir, Path(tmp))
        out = []
        for b in sorted(batches):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            examples = random_pairs(b)
            times, losses = [], []
            for i in range(warmup + steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = step(examples)
                torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                losses.append(float(loss))
            med = statistics.median(times)
            tokens = 2 * b * (PROMPT + ANSWER)
            out.append({
                "impl": impl, "pairs": b, "tokens": tokens, "step_s": med,
                "tokens_per_s": tokens / med,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "losses": losses, "trainable": sum(p.numel() for p in params),
            })  # fmt: skip
            print("ROW " + json.dumps(out[-1]), flush=True)  # kept if a later row fails
    return out


def table(results: list[dict]) -> str:
    ref = {r["pairs"]: r for r in results if r["impl"] == "trl"}
    lines = ["impl         pairs  tok/s   × TRL  reserved GiB  × TRL  allocated GiB  first loss"]
    for r in sorted(results, key=lambda r: (r["pairs"], r["impl"])):
        t = ref.get(r["pairs"])
        sp = f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}" if t else "  -"
        mem = f"{r['peak_reserved_gib'] / t['peak_reserved_gib']:.2f}" if t else "  -"
        lines.append(
            f"{r['impl']:12} {r['pairs']:5} {r['tokens_per_s']:7.0f} {sp:>6} "
            f"{r['peak_reserved_gib']:12.2f} {mem:>6} {r['peak_allocated_gib']:14.2f}  "
            f"{r['losses'][0]:.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rows", default="1,4", help="pairs per batch")
    ap.add_argument("--model-dir", type=Path, default=Path(SHAPES["phi-3.5-mini"]))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--job-timeout", type=float, default=400)
    ap.add_argument("--out", type=Path, default=Path("bench/out_dpo.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(x) for x in args.rows.split(",")]
    if args.child:
        if args.child == "unsloth":
            import unsloth  # noqa: F401  (patches transformers and TRL: imported first)
        elif args.child.startswith("agiasi"):
            import agiasi  # noqa: F401  (its allocator default before the first allocation)
        res = run(args.child, batches, args.model_dir, args.steps, args.warmup)
        print("RESULT " + json.dumps(res), flush=True)
        return
    make_random_model(args.model_dir)
    results = []
    for impl in args.impls.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", impl, "--rows", args.rows,
               "--model-dir", str(args.model_dir), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.job_timeout)
        except subprocess.TimeoutExpired:
            print(f"TIMEOUT {impl}", flush=True)
            continue
        done = [json.loads(x[4:]) for x in out.stdout.splitlines() if x.startswith("ROW ")]
        results += done
        if out.returncode != 0:
            err = [x for x in out.stderr.splitlines() if "Error" in x][-1:] or [out.stderr[-800:]]
            print(f"FAILED {impl} after {len(done)} row(s): {err[0][:600]}", flush=True)
            continue
        print(f"{impl} done in {time.time() - t0:.0f} s", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
