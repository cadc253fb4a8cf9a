"""Where the memory of one long training step goes (Phi-3.5-mini shape, NF4, offloaded
checkpointing): the mask and attention path the decoder layers get, allocated memory after the
forward, the peak of forward and backward, and the largest live tensors at the backward peak.

    python bench/long_context_probe.py --seq 32768 --impl so8o
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import torch
    from train import build, make_random_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--impl", default="so8o")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/phi35-random"))
    args = ap.parse_args()
    make_random_model(args.model_dir)
    model, step_loss = build(args.impl, args.model_dir)
    seen = {}
    lm = model.causal_lm if hasattr(model, "causal_lm") else model.get_base_model()
    decoder = lm.get_decoder()
    layer0 = decoder.layers[0]

    def pre(mod, a, kw):
        m = kw.get("attention_mask")
        seen["mask"] = None if m is None else [list(m.shape), str(m.dtype)]
        seen["attn_impl"] = getattr(decoder.config, "_attn_implementation", None)

    h = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    ids = torch.randint(0, 32000, (1, args.seq)).cuda()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step_loss(ids)
    after_fwd = torch.cuda.memory_allocated()
    peak_fwd = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    peak_bwd = torch.cuda.max_memory_allocated()
    h.remove()
    gib = 2**30
    print(
        json.dumps(
            {
                "seq": args.seq,
                "impl": args.impl,
                **seen,
                "weights_gib": round(base / gib, 2),
                "after_forward_gib": round(after_fwd / gib, 2),
                "peak_forward_gib": round(peak_fwd / gib, 2),
                "peak_backward_gib": round(peak_bwd / gib, 2),
            }
        )
    )
    snap = torch.cuda.memory_stats()
    print("num_alloc_retries", snap.get("num_alloc_retries"))


if __name__ == "__main__":
    main()
