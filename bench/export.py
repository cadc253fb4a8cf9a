"""Export memory and time: agiasi's streaming export against PEFT's merge + save and llama.cpp's
own converter, one process each, on the same machine and model.

Rows (each a separate process; peak RSS is the child's own ``VmHWM``, wall from start to exit):

* ``ours hf``            ``agiasi export CK --gguf "" --no-measure``  (merge + fold → HF folder)
* ``ours hf+f16+q8_0``   ``agiasi export CK --gguf f16,q8_0 --no-measure``
* ``ours + measure``     ``agiasi export CK --gguf f16,q8_0``  (the fidelity report too)
* ``peft merge+save``    bf16 base + ``PeftModel.from_pretrained(CK)`` → ``merge_and_unload()`` →
                         ``save_pretrained`` (no soul: PEFT cannot fold it)
* ``llama.cpp convert``  ``convert_hf_to_gguf.py BASE --outtype f16`` (the base, no LoRA, no soul)

The reference for ``ours hf+f16+q8_0`` is PEFT merge + llama.cpp convert run back to back (their
wall times add, their peaks do not). The model is a random-weight model of the given config
(``--shape phi-3.5-mini``: Phi-3.5-mini's exact config, 3.8 B parameters, bf16 safetensors) and
the checkpoint a real ``agiasi train`` step folder (2 steps).

    python bench/export.py --shape tiny-llama --converter PATH/vendor/llama.cpp      # CPU
    python bench/export.py --shape phi-3.5-mini --converter PATH --work /tmp/bx      # GPU box
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    kib = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    sys.stderr.write(f'\\nPEAK_KIB {kib}\\n')\n"
    "atexit.register(_peak)\n"
)
PEFT_MERGE = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "from peft import PeftModel\n"
    "base, ck, out = sys.argv[1:4]\n"
    "m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)\n"
    "m = PeftModel.from_pretrained(m, ck).merge_and_unload()\n"
    "m.save_pretrained(out)\n"
)
AGIASI = "import sys\nfrom agiasi.cli import main\nsys.exit(main(sys.argv[1:]))\n"
CONVERT = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def measured(name: str, code: str, args: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``python -c code args`` as its own process; wall time and its own peak RSS."""
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-c", PEAK + code, *args], env=env, capture_output=True, text=True
    )
    wall = time.time() - t0
    log.write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    kib = int(p.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    row = {"impl": name, "wall_s": round(wall, 1), "peak_rss_gib": round(kib / 2**20, 2)}
    # the export's own progress lines that end in "(…, N s)": its stages, timed by itself
    stages = re.findall(r"export: (.+?) \((?:[^()]*, )?([\d.]+) s\)\s*$", p.stdout + p.stderr, re.M)
    if stages:
        row["stages_s"] = {what: float(s) for what, s in stages}
    print(json.dumps(row), flush=True)
    return row


def build_model(shape: str, out: Path) -> int:
    """A random-weight model of ``shape`` with the shipped tiny tokenizer, bf16 safetensors."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_dir = ROOT / "src" / "agiasi" / "assets" / "tiny-ja-phi3"
    if shape == "phi-3.5-mini":
        cfg = AutoConfig.from_pretrained(ROOT / "src/agiasi/assets/configs/phi-3.5-mini-shape")
    elif shape == "tiny-llama":  # ~0.5 B parameters: a CPU-sized stand-in
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    else:
        raise SystemExit(f"unknown shape {shape}")
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, k, tok_cfg.get(k))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, out / f)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny-llama", choices=["tiny-llama", "phi-3.5-mini"])
    ap.add_argument("--converter", type=Path, required=True, help="llama.cpp source folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/agiasi_bench_export"))
    ap.add_argument("--rows", default="hf,hf_gguf,measure,peft,convert")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    env_convert = {
        **env,
        "PYTHONPATH": f"{args.converter}:{args.converter / 'gguf-py'}:{env['PYTHONPATH']}",
    }
    base, run = work / "base", work / "run"
    t0 = time.time()
    if not (base / "config.json").exists():
        n = build_model(args.shape, base)
        (work / "n_params").write_text(str(n))
        print(
            f"built {args.shape}: {n / 1e9:.2f} B parameters in {time.time() - t0:.0f} s",
            flush=True,
        )
    n_params = int((work / "n_params").read_text())
    ck = run / "step_2"
    if not ck.exists():
        t1 = time.time()
        subprocess.run(
            [sys.executable, "-m", "agiasi", "train", "--base-model", str(base), "--output-dir",
             str(run), "--max-steps", "2", "--save-steps", "2", "--max-length", "256",
             "--warmup-steps", "0", "--annealing-steps", "1", "--no-progress", "--overwrite"],
            env=env, check=True,
        )  # fmt: skip
        print(f"trained a 2-step checkpoint in {time.time() - t1:.0f} s", flush=True)
    rows = []
    wanted = args.rows.split(",")
    plan = {
        "hf": ("ours hf", AGIASI, ["export", str(ck), "--gguf", "", "--no-measure"]),
        "hf_gguf": (
            "ours hf+f16+q8_0",
            AGIASI,
            ["export", str(ck), "--gguf", "f16,q8_0", "--no-measure"],
        ),
        "measure": (
            "ours hf+f16+q8_0 + measure",
            AGIASI,
            ["export", str(ck), "--gguf", "f16,q8_0"],
        ),
        "peft": ("peft merge+save", PEFT_MERGE, [str(base), str(ck)]),
        "convert": (
            "llama.cpp convert f16",
            CONVERT,
            [str(args.converter / "convert_hf_to_gguf.py"), str(base), "--outtype", "f16"],
        ),
    }
    for key in wanted:
        name, code, cmd = plan[key]
        out = work / f"out_{key}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        if key == "convert":
            cmd = [*cmd, "--outfile", str(out.with_suffix(".gguf"))]
            out.with_suffix(".gguf").unlink(missing_ok=True)
        elif key == "peft":
            cmd = [*cmd, str(out)]
        else:
            cmd = [*cmd, "--out", str(out)]
        rows.append(
            measured(name, code, cmd, env_convert if key == "convert" else env, work / f"{key}.log")
        )
        if key == "convert":
            out.with_suffix(".gguf").unlink(missing_ok=True)
        else:
            shutil.rmtree(out, ignore_errors=True)  # keep the disk free for the next row

    by = {r["impl"]: r for r in rows}
    ref_peft, ref_conv = by.get("peft merge+save"), by.get("llama.cpp convert f16")
    print(f"\n{args.shape}: {n_params / 1e9:.2f} B parameters, one bf16 copy "
          f"{2 * n_params / 2**30:.2f} GiB\n")  # fmt: skip
    print(f"{'impl':<30} {'wall s':>8} {'peak RSS GiB':>13}  vs reference")
    for r in rows:
        note = ""
        if r["impl"] == "ours hf" and ref_peft:
            note = (
                f"wall x{r['wall_s'] / ref_peft['wall_s']:.2f}, "
                f"RSS x{r['peak_rss_gib'] / ref_peft['peak_rss_gib']:.2f} of PEFT"
            )
        if r["impl"].startswith("ours hf+f16") and ref_peft and ref_conv:
            ref_wall = ref_peft["wall_s"] + ref_conv["wall_s"]
            ref_rss = max(ref_peft["peak_rss_gib"], ref_conv["peak_rss_gib"])
            note = f"wall x{r['wall_s'] / ref_wall:.2f} of PEFT+convert ({ref_wall:.0f} s), RSS x{r['peak_rss_gib'] / ref_rss:.2f}"
        print(f"{r['impl']:<30} {r['wall_s']:>8.1f} {r['peak_rss_gib']:>13.2f}  {note}")
    if args.json:
        args.json.write_text(
            json.dumps({"shape": args.shape, "n_params": n_params, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
