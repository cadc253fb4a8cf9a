"""What ``--offload-embeddings`` costs a step, measured in one process on one model.

bench/train.py runs each implementation in its own process, so a few percent between ``so8co-d0``
and ``so8coe-d0`` mixes the flag's cost with process-to-process noise. Here one model switches
between its embedding on the card and in host memory (the flag's own hooks), the variants
interleaved over several rounds at each row, and a profiled step of each says where the
difference goes (the host's gather and copy, a wait for the GPU, the GPU's idle time):

    python bench/embedding_cost.py --rows 512x8,4096x1 [--shape llama-phi-dims] [--out f.json]

Variants: ``card`` (the embedding on the GPU), ``host`` (on the host, the ids arriving on the GPU
as bench/train.py feeds them: one wait per step), ``host-ids`` (on the host, the ids from host
memory as ``agiasi train`` feeds them), ``host-t4`` (``host-ids`` with 4 CPU threads), and
``uva`` (bench/train.py's flag ``u``), a candidate for the flag's next form: the weight in pinned host memory, seen by the GPU
through unified addressing as a CUDA tensor (the module's own parameter, so no hooks), so the
lookup is the usual CUDA gather reading its rows across the bus: no host work and no wait in the
step. The ``allocated_gib`` of each variant says whether the weight still counts on the card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SHAPES, build, cap_memory, make_random_model, make_step, uva_view  # noqa: E402

VARIANTS = ("card", "host", "host-ids", "host-t4", "uva")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from agiasi.host_embedding import keep_input_embedding_on_host

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
    threads = torch.get_num_threads()
    on_card = emb.weight.detach()
    uva = uva_view(on_card.cpu().pin_memory())
    del on_card

    def use(variant: str) -> None:
        # back to the card first, then to the variant's place
        if w.embedding_on_host:
            emb._forward_pre_hooks.clear()
            emb._forward_hooks.clear()
            emb.to(w.device_)
            w.embedding_on_host = False
        elif emb.weight.data_ptr() == uva.data_ptr():
            emb.weight = torch.nn.Parameter(uva.clone(), requires_grad=False)
        if variant == "uva":
            emb.weight = torch.nn.Parameter(uva, requires_grad=False)
        elif variant != "card":
            keep_input_embedding_on_host(w.causal_lm, w.device_)
            w.embedding_on_host = True
        torch.set_num_threads(4 if variant == "host-t4" else threads)
        torch.cuda.empty_cache()

    results = []
    for seq, batch in rows:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        g = torch.Generator().manual_seed(1234)
        ids_host = torch.randint(0, 32000, (batch, seq), generator=g).pin_memory()
        ids_card = ids_host.cuda()
        times = {v: [] for v in VARIANTS}
        for r in range(args.rounds + 1):  # round 0: compilation and warm-up, untimed
            for v in VARIANTS:
                use(v)
                ids = ids_card if v in ("card", "host") else ids_host
                for i in range(2 + args.steps):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    loss = step(ids)  # the wrapper reads labels where they are; loss on the GPU
                    torch.cuda.synchronize()
                    if r and i >= 2:
                        times[v].append(time.perf_counter() - t0)
                float(loss)
        row = {"seq": seq, "batch": batch, "threads": threads, "variants": {}}
        for v in VARIANTS:
            use(v)
            ids = ids_card if v in ("card", "host") else ids_host
            allocated = torch.cuda.memory_allocated() / 2**30
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    step(ids)
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
                "allocated_gib": allocated,
                "host_ops_ms": dict(sorted(host_ops.items(), key=lambda kv: -kv[1])[:12]),
            }
            print(
                f"{seq}x{batch} {v:<9} {med * 1e3:7.1f} ms  gpu busy {gpu_ms:7.1f} ms  "
                f"{allocated:.3f} GiB  "
                f"{json.dumps(row['variants'][v]['host_ops_ms'])}",
                flush=True,
            )
        results.append(row)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
