"""Where a training step's time goes: torch.profiler over 3 steps of one implementation.

python bench/profile_step.py --impl nosoul --seq 512 --batch 1   (after bench/train.py made
the random model in /tmp/phi35-random; any of bench/train.py's implementation names, unsloth
and so8co-d0 included; --model-dir /tmp/llama-phidims-random for the Llama shape)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import build  # noqa: E402


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="nosoul")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/phi35-random"))
    args = ap.parse_args()
    if args.impl == "unsloth":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (before transformers, as it asks)
    model, step_loss = build(args.impl, args.model_dir, args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, 32000, (args.batch, args.seq)).cuda()

    def step():
        loss = step_loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    n_kernels = sum(e.count for e in ka if e.device_type.name == "CUDA") / 3
    cuda_total = sum(e.self_device_time_total for e in ka) / 3 / 1e3
    print(
        f"{args.impl} {args.seq}x{args.batch}: {n_kernels:.0f} CUDA kernels/step, "
        f"GPU busy {cuda_total:.1f} ms/step"
    )
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
