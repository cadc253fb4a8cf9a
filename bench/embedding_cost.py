"""What ``--offload-embeddings`` costs a step, measured in one process on one model.

bench/train.py runs each implementation in its own process, so a few percent between ``so8co-d0``
and ``so8coe-d0`` mixes the flag's cost with process-to-process noise. Here one model switches
its input embedding between the card (``card``) and pinned host memory read in place by the
GPU's gather (``host``: agiasi.model.host_embedding, what the flag does), the two interleaved over
several rounds at each row; a profiled step of each gives the GPU's busy time (what the card
no longer holds is bench/train.py's peak memory, each row in its own process):

    python bench/embedding_cost.py --rows 512x8,4096x1 [--shape llama-phi-dims] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SHAPES, build, cap_memory, make_random_model, make_step  # noqa: E402

VARIANTS = ("card", "host")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from agiasi.model.host_embedding import keep_input_embedding_on_host

    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="so8co-d0", help="bench/train.py's name, without flag e")
    ap.add_argument("--rows", default="512x8,4096x1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model_dir = Path(SHAPES[args.shape])
    make_random_model(model_dir, args.shape)
    cap_memory()
    rows = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",")]
    w, step_loss = build(args.impl, model_dir, max(s for s, _ in rows))
    step, _ = make_step(w, step_loss)
    emb = w.causal_lm.get_input_embeddings()
    on_card = emb.weight
    keep_input_embedding_on_host(w.causal_lm, w.device_)
    on_host = emb.weight

    def use(variant: str) -> None:
        emb.weight = on_card if variant == "card" else on_host

    results = []
    for seq, batch in rows:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        g = torch.Generator().manual_seed(1234)
        ids_host = torch.randint(0, 32000, (batch, seq), generator=g).pin_memory()
        times = {v: [] for v in VARIANTS}
        for r in range(args.rounds + 1):  # round 0: compilation and warm-up, untimed
            for v in VARIANTS:
                use(v)
                for i in range(2 + args.steps):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    loss = step(ids_host)  # from pinned host memory, as the trainer's batches
                    torch.cuda.synchronize()
                    if r and i >= 2:
                        times[v].append(time.perf_counter() - t0)
                float(loss)
        row = {"seq": seq, "batch": batch, "variants": {}}
        for v in VARIANTS:
            use(v)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    step(ids_host)
                torch.cuda.synchronize()
            ka = prof.key_averages()
            gpu_ms = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA") / 2e3
            host_ops = {
                e.key: round(e.self_cpu_time_total / 2e3, 3)
                for e in ka
                if e.device_type.name == "CPU"
                and any(
                    k in e.key
                    for k in (
                        "embedding",
                        "index_select",
                        "copy_",
                        "_to_copy",
                        "Memcpy",
                        "Synchronize",
                        "HostAlloc",
                        "pin_memory",
                        "empty",
                    )
                )
                and e.self_cpu_time_total > 200
            }
            med = statistics.median(times[v])
            row["variants"][v] = {
                "step_ms": med * 1e3,
                "tokens_per_s": seq * batch / med,
                "spread_ms": (max(times[v]) - min(times[v])) * 1e3,
                "gpu_busy_ms": gpu_ms,
                "host_ops_ms": dict(sorted(host_ops.items(), key=lambda kv: -kv[1])[:12]),
            }
            print(
                f"{seq}x{batch} {v:<9} {med * 1e3:7.1f} ms  gpu busy {gpu_ms:7.1f} ms  "
                f"{json.dumps(row['variants'][v]['host_ops_ms'])}",
                flush=True,
            )
        results.append(row)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
