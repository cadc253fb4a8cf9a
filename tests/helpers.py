"""Builders for tiny random models saved as HF folders (what users pass as --base-model), and
command lines for the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# What `agiasi train` writes in every step folder: the note's three files, soul.json, and what
# resume needs. Spelled out here, not taken from the code, so the tests check the layout.
TRAINED_STEP_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "soul.json",
    "soul.pt",
    "train_config.json",
    "trainer_state.pt",
]

# what PyTorch's caching allocator says when a 12 GB card is full (its own wording, one line)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 11.50 GiB of "
    "which 20.00 MiB is free. Of the allocated memory 10.75 GiB is allocated by PyTorch, and "
    "312.00 MiB is reserved by PyTorch but unallocated."
)


def cli_args(command: str, *extra: str, **flags) -> list[str]:
    """``COMMAND --field-name value …`` from config field names; True → ``--flag``, False →
    ``--no-flag`` (the CLI maps every dataclass field to a flag this way)."""
    args = [command]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        if value is True or value is False:
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args + list(extra)


def write_records(recs: list[dict], kind: str, folder: Path) -> str:
    """Records as a dataset of ``kind`` in ``folder``: txt (their ``text`` fields between blank
    lines), jsonl, folder (of one jsonl), json, parquet, csv, tsv or hf-disk; returns what to pass
    as ``--dataset``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        p = folder / "d.txt"
        p.write_text("\n\n".join(r["text"] for r in recs) + "\n", encoding="utf-8")
    elif kind in ("jsonl", "folder"):
        p = folder / "d.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
        if kind == "folder":
            return str(folder)
    elif kind == "json":
        p = folder / "d.json"
        p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(recs), str(p))
    elif kind in ("csv", "tsv"):
        import csv

        p = folder / f"d.{kind}"
        with open(p, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(
                fh, fieldnames=list(recs[0]), delimiter="," if kind == "csv" else "\t"
            )
            w.writeheader()
            w.writerows(recs)
    elif kind == "hf-disk":
        import datasets

        p = folder / "ds"
        datasets.Dataset.from_list(recs).save_to_disk(str(p))
    else:
        raise AssertionError(kind)
    return str(p)


def cli_cmd(command: str, *extra: str, **flags) -> list[str]:
    """The same as a separate process: ``python -m agiasi COMMAND …``."""
    return [sys.executable, "-m", "agiasi", *cli_args(command, *extra, **flags)]


def build_tiny_phi3(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 128,
    seed: int = 0,
    longrope: bool = False,
) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    kwargs = {}
    if longrope:
        half = hidden // 4 // 2
        kwargs["rope_scaling"] = {
            "type": "longrope",
            "long_factor": [1.0 + 0.1 * i for i in range(half)],
            "short_factor": [1.0 + 0.01 * i for i in range(half)],
        }
        # llama.cpp pads its context to a multiple of 256, so the original window must be larger
        # than that for a short-context run to stay on the short factors
        kwargs["original_max_position_embeddings"] = 512
        kwargs["max_position_embeddings"] = 2048
    cfg = Phi3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=kwargs.pop("max_position_embeddings", 256),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kwargs,
    )
    cfg.architectures = ["Phi3ForCausalLM"]
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return Path(out)


def build_tiny_llama(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 128,
    tie: bool = False,
    seed: int = 0,
    heads: int = 4,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie,
        head_dim=hidden // heads,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return Path(out)


def make_wrapper(path, device="cpu", **overrides):
    from agiasi import AGIASI_SO8T_Wrapper

    opts = {"quantization": "none", "dtype": "float32", "lora_dropout": 0.0}
    opts.update(overrides)
    return AGIASI_SO8T_Wrapper(str(path), device=device, **opts)


def randomize_soul(wrapper, alpha: float = 0.7, seed: int = 1) -> None:
    """Give the soul a non-trivial R and an open gate, so equivalence tests mean something."""
    g = torch.Generator().manual_seed(seed)
    soul = wrapper.soul
    with torch.no_grad():
        soul.alpha.fill_(alpha)
        if soul.config.rotation == "so8":
            soul.rotation.skew_params.copy_(
                torch.randn(soul.rotation.skew_params.shape, generator=g)
            )
        else:
            h = soul.config.hidden_size
            q, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
            soul.rotation.weight = q


def randomize_lora(wrapper, seed: int = 2, scale: float = 0.05) -> None:
    """LoRA B starts at zero; give it values so merge tests see a real delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.base_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def sample_text() -> Path:
    from agiasi.shipped import default_dataset

    return default_dataset()


def build_tiny_phi3_with_tokenizer(
    out: Path, hidden: int = 64, layers: int = 2, seed: int = 0, vocab_size: int = 1000
) -> Path:
    """Tiny Phi-3 with a Japanese sentencepiece tokenizer trained on the shipped sample."""
    from agiasi.testing.tokenizer import build_phi3_tokenizer

    tok = build_phi3_tokenizer([sample_text()], out, vocab_size=vocab_size)
    build_tiny_phi3(out, hidden=hidden, layers=layers, vocab=len(tok), seed=seed)
    # keep the model's special ids consistent with the tokenizer
    import json

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out)


def build_tiny_llama_with_tokenizer(
    out: Path, tie: bool = True, hidden: int = 64, seed: int = 0, vocab_size: int = 1000
) -> Path:
    """Tiny Llama-family model (tied head by default) with a sentencepiece tokenizer."""
    import json

    from agiasi.testing.tokenizer import build_phi3_tokenizer

    tok = build_phi3_tokenizer([sample_text()], out, vocab_size=vocab_size)
    build_tiny_llama(out, hidden=hidden, vocab=len(tok), tie=tie, seed=seed)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out)


def build_tiny_phi3_longrope_with_tokenizer(out: Path, seed: int = 0) -> Path:
    from agiasi.testing.tokenizer import build_phi3_tokenizer

    tok = build_phi3_tokenizer([sample_text()], out, vocab_size=1000)
    build_tiny_phi3(out, vocab=len(tok), seed=seed, longrope=True)
    import json

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out)


def make_checkpoint(model_dir: Path, out: Path, seed: int = 1, **overrides) -> Path:
    """A step folder with a non-trivial LoRA and soul, without spending time on training."""
    from agiasi.checkpoint.step_folder import write_step

    w = make_wrapper(model_dir, **overrides)
    randomize_soul(w, alpha=1.3, seed=seed)
    randomize_lora(w, seed=seed + 1)
    return write_step(w, out, step=10)


def step_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA tensors, α and the rotation of a step folder, for bit-for-bit comparisons."""
    from safetensors.torch import load_file

    out = dict(load_file(step_dir / "adapter_model.safetensors"))
    soul = torch.load(step_dir / "soul.pt", weights_only=True)
    out["alpha"] = soul["alpha"]
    out.update({f"soul.{k}": v for k, v in soul["so8_rotation"].items()})
    return out


# Two runs that differ only in the order fp32 gradients are summed (ranks vs accumulation):
# rounding (unit roundoff 6e-8) enters every step's gradient, and Adam's normalised update
# magnifies a relative gradient error where gradients are small (LoRA A while B is near zero).
# Across 6 steps the largest difference seen was 3e-6 of the tensor's own magnitude with AVX512
# kernels and ~1e-5 with AVX2 ones; 1e-4 of the magnitude leaves 10x headroom. A real fault
# (ranks seeing the wrong data, a missing reduction) moves the weights by the size of the
# updates themselves, lr x steps ~ 5e-2 of the magnitude: 500x above the bound.
SUM_ORDER_RTOL = 1e-4


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Step tensors of two runs equal up to the order of fp32 sums (see SUM_ORDER_RTOL)."""
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max())
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= SUM_ORDER_RTOL * max(scale, 1e-12), (k, diff, scale)


# --------------------------------------------------------------------------- the architecture zoo
# One tiny random model per row of agiasi's architecture table, each with its family's real
# features (GQA, tied embeddings, biases, soft-capping, RoPE scaling) and a tokenizer of the kind
# the family ships, trained on the package's sample text: no hub, no network.

from agiasi.testing.zoo import ZOO, build_tiny_arch  # noqa: E402,F401 - the zoo lives in the package (bench uses it)
