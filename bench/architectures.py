"""Fidelity per row of the architecture table, on the tiny models of the tests: our export (soul
folded, LoRA merged, after 3 NF4 training steps) against llama.cpp's own converter (on the base
model: it cannot fold a soul) — each GGUF F32 against transformers on Japanese text.

    python bench/architectures.py --converter PATH/convert_hf_to_gguf.py   # CPU, ~1 min

The converter ships in llama-cpp-python's source distribution (vendor/llama.cpp); without
``--converter`` only our columns are printed. Relative = max |Δlogit| / logit range.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def gguf_vs_hf(gguf_path: Path, hf_dir: Path, texts: list[str]) -> tuple[float, str, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agiasi.eval.models import GGUFModel

    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    g = GGUFModel(gguf_path, n_ctx=512)
    rel, agree, n, same = 0.0, 0, 0, True
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = g.logits(ids)
        rel = max(rel, float(np.abs(got - ref).max() / (ref.max() - ref.min())))
        agree, n = agree + int((got.argmax(-1) == ref.argmax(-1)).sum()), n + len(ids)
        same &= g.tokenize(text) == ids
    g.close()
    return rel, f"{agree}/{n}", same


def _train(model: Path, out: Path, *flags: str) -> str:
    """3 NF4 steps, the architecture test's settings."""
    from agiasi.cli import main
    from agiasi.shipped import default_dataset

    argv = ["train", *flags, "--base-model", str(model), "--dataset", str(default_dataset()),
            "--output-dir", str(out), "--max-steps", "3", "--save-steps", "3",
            "--warmup-steps", "1", "--annealing-steps", "2", "--batch-size", "2",
            "--max-length", "64", "--learning-rate", "1e-2", "--soul-learning-rate", "5e-2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return str(out / "step_3")


def _export(ckpt: str, out: Path, gguf: str) -> int:
    from agiasi.cli import main

    return main(["export", ckpt, "--out", str(out), "--gguf", gguf, "--num-ctx", "512",
                 "--no-measure"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    args = ap.parse_args()
    from agiasi.architectures import ARCHITECTURES
    from agiasi.testing.zoo import JA_TEXTS, ZOO, ZOO_MODEL_TYPE, build_tiny_arch

    rows = []
    for kind in ZOO:
        d = Path(tempfile.mkdtemp(prefix=f"arch_{kind}_"))
        base = build_tiny_arch(kind, d / "base")
        # llama.cpp's gemma/gemma2 have no output tensor: GGUF only for --no-soul runs
        tied_only = ARCHITECTURES[ZOO_MODEL_TYPE[kind]].gguf_tied_head_only
        flags = ("--no-soul",) if tied_only else ()
        ckpt = _train(base, d / "run", *flags)
        assert _export(ckpt, d / "out", "f32") == 0
        ours = gguf_vs_hf(next((d / "out").glob("*-f32.gguf")), d / "out" / "hf", JA_TEXTS)
        ref = None
        if args.converter:
            env = dict(os.environ, PYTHONPATH=str(args.converter.parent / "gguf-py"))
            p = subprocess.run(
                [sys.executable, str(args.converter), str(base), "--outtype", "f32",
                 "--outfile", str(d / "ref.gguf")],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if p.returncode == 0:
                ref = gguf_vs_hf(d / "ref.gguf", base, JA_TEXTS)
            else:  # e.g. a BPE vocabulary whose probe-string hash it does not know
                ref = p.stderr.strip().splitlines()[-1][:90]
        rows.append((kind + (" (--no-soul)" if flags else ""), ours, ref))
    print(
        "\nrow                   ours: rel    top-1    tokens   llama.cpp converter: rel  top-1    tokens"
    )
    for kind, o, r in rows:
        if isinstance(r, tuple):
            ref = f"{r[0]:>10.1e}  {r[1]:>8}  {str(r[2]):>6}"
        else:
            ref = f"failed: {r}" if r else "         -"
        print(f"{kind:<20} {o[0]:>10.1e}  {o[1]:>8}  {str(o[2]):>6}   {ref}")


if __name__ == "__main__":
    main()
