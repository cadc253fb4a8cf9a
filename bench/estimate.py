"""Will it fit? ``agiasi estimate``'s predicted peak GPU memory against the peak measured on a card.

Each configuration (a set of `agiasi train` flags) runs in its own process on a clean GPU under
an 11.5 GiB cap, its rows (length × batch) one after another on one loaded model (peak memory
reset and the cache emptied between rows), two optimizer steps a row (AdamW's state exists from
the first), the wrapper built from the flags exactly as `agiasi train` builds it. The driver
prints predicted vs measured reserved and allocated peaks, the error of each, and the worst:

    python bench/estimate.py --shape phi-3.5-mini --configs "default:512x1,4096x1;c:4096x1"
    python bench/estimate.py --fit bench/data/X.json ...   # least-squares FIT from measured rows

Configurations (comma-free names; several flags joined with +): default (agiasi train's
defaults), d0 (--lora-dropout 0), c (--compile), o (--offload-activations), e
(--offload-embeddings), nosoul, full (--rotation full), nogc (--no-gradient-checkpointing),
bf16 (--quantization none: bf16 base with LoRA), tileN (--mlp-tile N). e.g. c+o+e+d0.
Each row also records the memory right after loading (the weights, checked exactly against the
estimate's), and the process's peak host RSS. The model is bench/train.py's random-weight one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import train as bt  # noqa: E402  (bench/train.py: shapes, random models, the cap)

REPO = Path(__file__).resolve().parents[1]

FLAGS = {
    "default": {},
    "d0": {"lora_dropout": 0.0},
    "c": {"compile": True},
    "o": {"offload_activations": True},
    "e": {"offload_embeddings": True},
    "nosoul": {"soul": False},
    "full": {"rotation": "full"},
    "nogc": {"gradient_checkpointing": False},
    "bf16": {"quantization": "none"},
}


def flags_of(name: str) -> dict:
    out: dict = {}
    for part in name.split("+"):
        if part.startswith("tile"):
            out["mlp_tile"] = int(part[4:])
        elif part in FLAGS:
            out.update(FLAGS[part])
        else:
            raise SystemExit(f"unknown configuration part {part!r}")
    return out


def train_config(model_dir: Path, name: str, seq: int = 512, batch: int = 1):
    from agiasi.train.config import TrainConfig

    targets = bt.lora_targets(model_dir)
    return TrainConfig(
        base_model=str(model_dir),
        lora_targets=targets,
        max_length=seq,
        batch_size=batch,
        **flags_of(name),
    )


def child(
    name: str, rows: list[tuple[int, int]], model_dir: Path, steps: int, device: str = "cuda"
) -> list[dict]:
    """``device="cpu"`` runs the same code without memory figures (a smoke test of the bench)."""
    import torch

    from agiasi import AGIASI_SO8T_Wrapper
    from agiasi.process import configure_process

    configure_process(training=True)
    cuda = device == "cuda"
    if not cuda:  # no allocator to ask: the figures read 0
        for f in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            setattr(torch.cuda, f, lambda *a, **k: None)
        for f in ("memory_allocated", "max_memory_reserved", "max_memory_allocated"):
            setattr(torch.cuda, f, lambda *a, **k: 1)
    else:
        bt.cap_memory()
    cfg = train_config(model_dir, name)
    w = AGIASI_SO8T_Wrapper(config=cfg.model_config(), device=device)
    w.train()
    if w.soul is not None:
        with torch.no_grad():
            w.alpha.fill_(1.618)
    loaded = torch.cuda.memory_allocated()
    params = [p for p in w.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator().manual_seed(0)
    vocab = min(32000, w.causal_lm.get_input_embeddings().weight.shape[0])
    out = []
    for seq, batch in sorted(rows, key=lambda r: r[0] * r[1]):
        torch._dynamo.reset()
        opt.state.clear()  # each row a fresh run: AdamW's state is created by its first step
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        row = {"config": name, "seq": seq, "batch": batch, "loaded_allocated": loaded}
        try:
            for _ in range(steps):
                loss = w(ids, labels=ids, return_logits=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            row["oom"] = str(e).splitlines()[0][:200]
            del e
            opt.zero_grad(set_to_none=True)
        row["peak_reserved"] = torch.cuda.max_memory_reserved()
        row["peak_allocated"] = torch.cuda.max_memory_allocated()
        row["host_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["trainable"] = sum(p.numel() for p in params)
        out.append(row)
        print(f"  {name} {seq}x{batch}: {row['peak_reserved'] / 2**30:.2f} GiB", file=sys.stderr)
    return out


def predicted(model_dir: Path, row: dict) -> dict:
    from agiasi.train.estimate import GIB, dtype_bytes, model_shape, predict

    cfg = train_config(model_dir, row["config"], row["seq"], row["batch"])
    shape = model_shape(cfg)
    e = predict(cfg, shape, b=dtype_bytes(cfg))
    loaded = shape.weight_bytes - (
        shape.embedding_bytes if cfg.offload_embeddings and not shape.tied else 0
    )
    return {
        "pred_reserved": e.reserved,
        "pred_allocated": e.allocated,
        "pred_parts": e.parts,
        "pred_loaded": loaded + 4 * (shape.lora_parameters + shape.soul_parameters),
        "err_reserved": e.reserved / row["peak_reserved"] - 1,
        "err_allocated": e.allocated / row["peak_allocated"] - 1,
        "gib": GIB,
    }


TRAIN_FLAGS = {  # the bench's configuration parts as `agiasi train` flags
    "default": [],
    "d0": ["--lora-dropout", "0"],
    "c": ["--compile"],
    "o": ["--offload-activations"],
    "e": ["--offload-embeddings"],
    "nosoul": ["--no-soul"],
    "full": ["--rotation", "full"],
    "nogc": ["--no-gradient-checkpointing"],
    "bf16": ["--quantization", "none"],
}


def train_row(model_dir: Path, name: str, seq: int, batch: int) -> dict:
    """The same configuration through `agiasi train` itself (2 steps on the shipped Japanese
    sample, packed to ``seq``): the trainer's own peaks from its metrics.jsonl."""
    import shutil

    e2e = Path(f"{model_dir}-e2e")
    if not e2e.exists():  # the random weights with the shipped tokenizer (the bench's has none)
        e2e.mkdir()
        for f in model_dir.iterdir():
            if f.suffix in (".safetensors", ".json") and not f.name.startswith("tokenizer"):
                (e2e / f.name).symlink_to(f)
        tiny = REPO / "src/agiasi/assets/tiny-ja-phi3"
        for f in (
            "tokenizer.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ):
            shutil.copy(tiny / f, e2e / f)
    out = Path(f"/tmp/estimate-e2e-{name}-{seq}x{batch}")
    flags = [f for part in name.split("+") for f in (
        ["--mlp-tile", part[4:]] if part.startswith("tile") else TRAIN_FLAGS[part])]  # fmt: skip
    cmd = [sys.executable, "-m", "agiasi", "train", "--base-model", str(e2e), "--output-dir", str(out),
           "--overwrite", "--max-steps", "2", "--save-steps", "2", "--max-length", str(seq),
           "--batch-size", str(batch), "--lora-targets", ",".join(bt.lora_targets(model_dir)),
           "--no-progress", *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"config": name, "seq": seq, "batch": batch, "failed": done.stderr[-1500:]}
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "peak_reserved_gib" in x]
    shutil.rmtree(out, ignore_errors=True)
    if not m:
        return {"config": name, "seq": seq, "batch": batch, "failed": "no CUDA peaks in metrics"}
    return {
        "config": name, "seq": seq, "batch": batch, "via": "agiasi train",
        "peak_reserved": max(x["peak_reserved_gib"] for x in m) * 2**30,
        "peak_allocated": max(x["peak_mem_gib"] for x in m) * 2**30,
        "loaded_allocated": 0,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    g = 2**30
    out = [
        "| shape | configuration | tokens | measured reserved / allocated GiB | predicted reserved / allocated GiB | error reserved | error allocated | measured in | weights after load, measured / predicted GiB |",
        "|---|---|---|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        if "oom" in r:
            out.append(
                f"| {r['shape']} | {r['config']} | {r['seq']}×{r['batch']} | out of memory | {r['pred_reserved'] / g:.2f} | | | |"
            )
            continue
        via = " (agiasi train)" if r.get("via") else ""
        out.append(
            f"| {r['shape']} | {r['config']}{via} | {r['seq']}×{r['batch']} | "
            f"{r['peak_reserved'] / g:.2f} / {r['peak_allocated'] / g:.2f} | "
            f"{r['pred_reserved'] / g:.2f} / {r['pred_allocated'] / g:.2f} | "
            f"{100 * r['err_reserved']:+.1f} % | {100 * r['err_allocated']:+.1f} % | "
            f"{r.get('src', '')} | "
            + (
                f"{r['loaded_allocated'] / g:.3f} / {r['pred_loaded'] / g:.3f} |"
                if r.get("loaded_allocated")
                else "– |"
            )
        )
    ok = [r for r in rows if "oom" not in r]
    if ok:
        worst = max(ok, key=lambda r: abs(r["err_reserved"]))
        under = min(r["err_reserved"] for r in ok)
        out.append(
            f"\nworst reserved error {100 * worst['err_reserved']:+.1f} % "
            f"({worst['shape']} {worst['config']} {worst['seq']}×{worst['batch']}); "
            f"most under {100 * under:+.1f} %; {len(ok)} rows"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(bt.SHAPES))
    ap.add_argument("--configs", default="default:512x1,4096x1")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out_estimate.json")
    ap.add_argument("--job-timeout", type=float, default=300)
    ap.add_argument(
        "--table",
        type=Path,
        nargs="*",
        help="only print the table of these JSON files (predictions recomputed)",
    )
    ap.add_argument(
        "--train-rows", default="", help="CONFIG:SEQxBATCH,… run through `agiasi train`"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = Path(bt.SHAPES[args.shape])
    if args.table:
        rows = [r for f in args.table for r in json.loads(f.read_text())]
        for r in rows:
            r.update(predicted(bt.config_dir(r["shape"]), r))
        print(table(rows))
        return
    if args.child:
        spec = json.loads(args.child)
        import agiasi  # noqa: F401  (the allocator's settings before the first allocation)

        res = child(spec["config"], [tuple(x) for x in spec["rows"]], model_dir, args.steps)
        print("RESULT " + json.dumps(res), flush=True)
        return
    bt.make_random_model(model_dir, args.shape)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for part in filter(None, args.configs.split(";")):
        name, _, rows = part.partition(":")
        rows = [[int(x) for x in r.split("x")] for r in rows.split(",")]
        t0 = time.time()
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({"config": name, "rows": rows}),
                 "--shape", args.shape, "--steps", str(args.steps)],
                capture_output=True, text=True, timeout=args.job_timeout,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"TIMEOUT {name}", flush=True)
            continue
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"FAILED {name}: {out.stderr[-1500:]}", flush=True)
            continue
        for r in json.loads(line[-1][7:]):
            r["shape"] = args.shape
            r.update(predicted(model_dir, r))
            results.append(r)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    for item in filter(None, args.train_rows.split(",")):
        name, _, row = item.partition(":")
        seq, batch = (int(x) for x in row.split("x"))
        r = train_row(model_dir, name, seq, batch)
        r["shape"] = args.shape
        if "failed" in r:
            print(f"FAILED agiasi train {item}: {r['failed']}", flush=True)
            continue
        r.update(predicted(model_dir, r))
        results.append(r)
        args.out.write_text(json.dumps(results, indent=1))
    print(table([r for r in results if r["shape"] == args.shape]))


if __name__ == "__main__":
    main()
