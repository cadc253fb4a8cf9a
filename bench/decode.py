"""llama.cpp decode speed of a GGUF with the soul folded vs the same base exported without one.

The fold changes only the values of the head weight, so the two files have identical shapes
and types and the expected ratio is 1.00. Both are exported here from the shipped tiny model
(Q8_0 and Q4_K_M), then each decodes the same greedy 128 tokens, alternating A/B for 5 rounds.

    python bench/decode.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from agiasi.checkpoint.step_folder import write_step
    from agiasi.demo import tiny_model_path
    from agiasi.eval.models import GGUFModel
    from agiasi.export import ExportConfig, export
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

    base = tiny_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for soul in (True, False):
            w = AGIASI_SO8T_Wrapper(
                str(base), device="cpu", quantization="none", soul=soul, lora_dropout=0.0
            )
            if soul:
                with torch.no_grad():
                    w.alpha.fill_(1.618)
                    w.so8_rotation.skew_params.normal_(0, 0.3)
            ck = write_step(w, tmp / f"ck_{soul}" / "step_1", step=1)
            export(
                ExportConfig(
                    checkpoint=str(ck),
                    out=str(tmp / f"ex_{soul}"),
                    gguf="q8_0,q4_k_m",
                    measure=False,
                    merge_base="w16",
                ),
                log=lambda m: None,
            )
            for t in ("q8_0", "q4_k_m"):
                files[(soul, t)] = next((tmp / f"ex_{soul}").glob(f"*-{t}.gguf"))
        for t in ("q8_0", "q4_k_m"):
            speeds = {True: [], False: []}
            models = {s: GGUFModel(files[(s, t)], n_ctx=512) for s in (True, False)}
            prompt = models[True].tokenize("Debian パッケージを")
            for _ in range(5):
                for s in (True, False):
                    t0 = time.perf_counter()
                    models[s].greedy(prompt, 128)
                    speeds[s].append(128 / (time.perf_counter() - t0))
            a, b = statistics.median(speeds[True]), statistics.median(speeds[False])
            rows.append((t, a, b, a / b))
            for m in models.values():
                m.close()
    print(f"{'type':<8}{'soul folded tok/s':>20}{'no soul tok/s':>16}{'ratio':>8}")
    for t, a, b, r in rows:
        print(f"{t:<8}{a:>20.0f}{b:>16.0f}{r:>8.3f}")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n", 1)[0]).parse_args()
    main()
