"""The export streams: peak memory stays near one bf16 copy of the model, whatever its size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_checkpoint, sample_text

pytestmark = pytest.mark.slow

# The child reports its own peak: getrusage(RUSAGE_CHILDREN) would count the pytest process's
# pages too (Linux carries the pre-exec high-water mark of a forked child across exec).
RUN_AND_REPORT_PEAK = (
    "import sys\n"
    "from agiasi.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('PEAK_KIB', peak)\n"
    "sys.exit(rc)\n"
)


def build_random_llama(out, hidden=1024, layers=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    from agiasi.testing.tokenizer import build_phi3_tokenizer

    tok = build_phi3_tokenizer([sample_text()], out, vocab_size=1000)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def test_export_peak_memory_is_under_one_and_a_half_bf16_copies(tmp_path):
    """245 M parameters (469 MB in bf16): HF folder + F16 + Q8_0 in a subprocess; its peak RSS
    (imports included) stays under 1.5x one bf16 copy. Loading the model whole would alone take
    one copy, merging it a second."""
    n_params = build_random_llama(tmp_path / "base")
    ckpt = make_checkpoint(tmp_path / "base", tmp_path / "run" / "step_1")
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS of the child is read from /proc (Linux)")
    cmd = [sys.executable, "-c", RUN_AND_REPORT_PEAK, "export", str(ckpt)]
    cmd += ["--out", str(tmp_path / "out"), "--gguf", "f16,q8_0", "--no-measure"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK_KIB")[-1].split()[0]) * 1024
    bf16_copy = 2 * n_params
    print(f"export peak RSS {peak / 2**20:.0f} MiB, one bf16 copy {bf16_copy / 2**20:.0f} MiB")
    assert peak < 1.5 * bf16_copy
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [
        "Modelfile",
        "README.md",
        "base-agiasi-f16.gguf",
        "base-agiasi-q8_0.gguf",
        "export_report.json",
        "hf",
    ]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["measure"]["status"] == "skipped (--no-measure)"
