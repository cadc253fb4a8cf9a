"""``export(config)``: one plain model — LoRA merged, soul folded — as HF and GGUF, with proof.

Steps: base state dict (original 16-bit weights, or the NF4-dequantized weights the LoRA was
trained against) → :func:`merge_lora` → :func:`fold_soul` (untie a tied head first) →
:func:`check_plain` → HF folder → GGUF files → Modelfile, model card, ``export_report.json``.

Merge and fold are pure functions on state dicts. PEFT's ``merge_and_unload`` works on live
modules; we need the merge on an arbitrary base state dict (16-bit or dequantized NF4), so the
one line ``W += (α/r)·B A`` is written here.

Everything goes to ``.OUT.tmp-<pid>`` first and is renamed to ``OUT`` at the end
(:func:`agiasi.checkpoint.atomic_folder`): a killed export leaves no folder that looks complete.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from agiasi._faults import maybe_crash
from agiasi.errors import AgiasiError

MERGE_BASES = ("w16", "nf4")
MERGE_BASE_CHOICES = ("auto", *MERGE_BASES)
# Comparing both merge bases needs two fp32 models on the CPU at once; above this size it is
# skipped (and the choice rests on the small-model measurements).
COMPARE_MERGE_BASES_MAX_PARAMS = 1_500_000_000
PARITY_PROMPTS = [
    "日本語の文章を生成します。",
    "Debian パッケージを作成する手順を説明してください。",
    "このコマンドはファイルの一覧を表示します。",
    "今日はとても良い天気ですね。",
]


@dataclass
class ExportConfig:
    """Flags of ``agiasi export`` (``--merge-base`` ↔ ``merge_base``)."""

    checkpoint: str = ""
    out: str = ""
    gguf: str = "f16,q8_0,q4_k_m"
    merge_base: str = "auto"
    base_model: str | None = None
    dtype: str = "auto"
    output_tensor_type: str | None = None
    num_ctx: int = 4096
    force: bool = False
    measure: bool = True
    text: str | None = None


# --------------------------------------------------------------------------- pure functions


def merge_lora(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], lora_alpha: float, r: int
) -> dict[str, torch.Tensor]:
    """New state dict with ``W + (lora_alpha / r) · B A`` for every LoRA pair (float64 math)."""
    scaling = lora_alpha / r
    out = dict(base)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        if ".lora_A." in key or ".lora_B." in key:
            stem, rest = key.split(".lora_", 1)
            pairs.setdefault(stem, {})[rest[0]] = t
        else:
            raise AgiasiError(f"unexpected adapter tensor {key!r} (only LoRA A/B are merged)")
    for stem, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AgiasiError(f"LoRA pair for {stem!r} is incomplete (have {sorted(ab)})")
        target = _base_key(stem) + ".weight"
        if target not in base:
            raise AgiasiError(f"LoRA targets {target!r}, which the base model does not have")
        w = base[target]
        delta = ab["B"].double() @ ab["A"].double()
        out[target] = (w.double() + scaling * delta).to(w.dtype)
    return out


def _base_key(peft_stem: str) -> str:
    stem = peft_stem
    for prefix in ("base_model.model.", "base_model."):
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
            break
    return stem


def fold_soul(
    sd: dict[str, torch.Tensor],
    rotation: torch.Tensor,
    alpha: float,
    tied: bool,
    head_key: str = "lm_head.weight",
    embed_key: str = "model.embed_tokens.weight",
) -> dict[str, torch.Tensor]:
    """New state dict whose head is ``W + g·W R``; a tied head is untied into its own tensor."""
    from agiasi.soul import fold_into

    out = dict(sd)
    if head_key in out and not tied:
        head = out[head_key]
    elif embed_key in out:
        head = out[embed_key].clone()  # untie: the embedding stays as it was
    else:
        raise AgiasiError(f"cannot fold: neither {head_key} nor {embed_key} is in the state dict")
    gate = 1.0 / (1.0 + math.exp(-float(alpha)))
    out[head_key] = fold_into(head, rotation.double(), gate)
    return out


def check_plain(sd: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict that still carries LoRA or soul tensors."""
    bad = [
        k for k in sd if "lora_" in k or "soul" in k or "so8_rotation" in k or ".base_layer." in k
    ]
    if bad:
        raise AgiasiError(
            f"the merged model still has {len(bad)} LoRA/soul tensor(s), e.g. {bad[0]}; "
            "merge the adapter and fold the soul before saving"
        )


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """What the NF4 model computed with: quantize to NF4 (blocksize 64, double quant) and back."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(
        w.float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    return bnbf.dequantize_4bit(q, state).to(w.dtype)


# --------------------------------------------------------------------------- the stage


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(cfg: ExportConfig, log=_say) -> dict[str, Any]:
    """Merge, fold, write HF + GGUF + Modelfile + card + report into ``cfg.out``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agiasi.checkpoint import ADAPTER_WEIGHTS, SOUL_PT, read_manifest, safe_torch_load
    from agiasi.gguf import (
        KQUANT_TYPES,
        SENTENCEPIECE_ARCHS,
        _arch,
        parse_types,
        quantize_gguf,
        trained_context,
        write_gguf,
    )
    from agiasi.model import ModelConfig, load_config

    if not cfg.checkpoint or not cfg.out:
        raise AgiasiError("export needs a checkpoint folder and --out")
    if cfg.merge_base not in MERGE_BASE_CHOICES:
        raise AgiasiError(
            f"--merge-base must be one of {', '.join(MERGE_BASE_CHOICES)}, got {cfg.merge_base!r}"
        )
    types = parse_types(cfg.gguf) if cfg.gguf else []
    if cfg.output_tensor_type:
        parse_types(cfg.output_tensor_type)
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise AgiasiError(f"{out} already exists; pass --force to replace it")
    ckpt = Path(cfg.checkpoint)
    manifest = read_manifest(ckpt)
    mcfg = ModelConfig.from_dict(manifest["model"])
    base_id = cfg.base_model or mcfg.base_model
    mcfg.base_model = base_id
    hf_cfg = load_config(base_id, mcfg.trust_remote_code)
    have = (
        getattr(hf_cfg, "model_type", None),
        getattr(hf_cfg, "hidden_size", None),
        getattr(hf_cfg, "vocab_size", None),
    )
    want = (manifest.get("model_type"), manifest.get("hidden_size"), manifest.get("vocab_size"))
    if have != want:
        raise AgiasiError(
            f"checkpoint {str(ckpt)!r} was trained on another base model "
            f"({manifest.get('base_model')!r}: model_type {want[0]}, hidden {want[1]}, "
            f"vocab {want[2]}); {base_id!r} is model_type {have[0]}, hidden {have[1]}, vocab {have[2]}"
        )
    context = trained_context(hf_cfg.to_dict())
    if context and cfg.num_ctx > context:
        log(f"export: num_ctx {cfg.num_ctx} → {context}, the context {base_id} was trained on")
        cfg = replace(cfg, num_ctx=context)
    base_path = Path(base_id)

    if (
        hf_cfg.model_type in SENTENCEPIECE_ARCHS
        and types
        and not (base_path / "tokenizer.model").is_file()
    ):
        raise AgiasiError(
            f"{base_id} has no tokenizer.model, which the GGUF vocabulary of a "
            f"{hf_cfg.model_type} model needs; put the base model's tokenizer.model there"
        )
    if types:
        _arch(hf_cfg.model_type)  # unknown architecture: fail before writing anything
    if cfg.merge_base == "auto":
        # Measured (export_report.json "merge_bases"): the LoRA learned its delta against the
        # NF4-dequantized weights, and merging into those reproduces the trained model far more
        # closely than merging into the original 16-bit weights. See the closing note of issue 4.
        cfg = replace(cfg, merge_base="nf4" if mcfg.quantization == "nf4" else "w16")
    if cfg.merge_base == "nf4" and mcfg.quantization != "nf4":
        raise AgiasiError("--merge-base nf4 only makes sense for a checkpoint trained with NF4")
    dtype = (
        getattr(torch, cfg.dtype)
        if cfg.dtype != "auto"
        else (
            getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None) or torch.float32
        )
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    from agiasi.checkpoint import atomic_folder, clean_stale_temp

    for stale in clean_stale_temp(out):
        log(f"export: removed {stale.name}, left half-written by a killed export")
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        log(f"export: loading {base_id} in {str(dtype).removeprefix('torch.')}")
        base_model = AutoModelForCausalLM.from_pretrained(str(base_id), dtype=dtype)
        tied = bool(getattr(base_model.config, "tie_word_embeddings", False))
        n_params = sum(p.numel() for p in base_model.parameters())
        # No copies: the dict holds the model's own tensors, the module goes, and every step
        # below replaces entries instead of duplicating the whole model.
        sd = dict(base_model.state_dict())
        del base_model
        if tied:
            sd.pop("lm_head.weight", None)
        lora_cfg = json.loads((ckpt / "adapter_config.json").read_text())
        adapter = load_file(str(ckpt / ADAPTER_WEIGHTS))
        kinds = [cfg.merge_base]
        if cfg.measure and mcfg.quantization == "nf4":
            if n_params <= COMPARE_MERGE_BASES_MAX_PARAMS:
                kinds = list(MERGE_BASES)
            else:
                log(
                    "export: merge bases not compared (two fp32 copies of this model would not "
                    "fit in memory); see the tiny-model numbers in the docs"
                )
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for base_kind in kinds:
            if base_kind == "nf4":
                src = {
                    k: (nf4_roundtrip(v) if _is_quantized_linear(k, v) else v)
                    for k, v in sd.items()
                }
            else:
                src = sd
            merged[base_kind] = merge_lora(src, adapter, lora_cfg["lora_alpha"], lora_cfg["r"])
            del src
        del sd
        soul_info = manifest.get("soul")
        if soul_info is not None:
            soul_state = safe_torch_load(ckpt / SOUL_PT)
            rotation = _rotation_from_state(soul_info, soul_state)
            alpha = float(soul_state["alpha"])
            merged = {k: fold_soul(v, rotation, alpha, tied) for k, v in merged.items()}
        elif tied:
            for v in merged.values():
                v["lm_head.weight"] = v["model.embed_tokens.weight"].clone()
        final = merged[cfg.merge_base]
        check_plain(final)

        # ---- HF folder: the state dict straight to sharded safetensors (no second model)
        hf_dir = tmp / "hf"
        new_cfg = copy.deepcopy(hf_cfg)  # already read and checked above
        new_cfg.tie_word_embeddings = False
        if hasattr(new_cfg, "get_text_config"):
            new_cfg.get_text_config().tie_word_embeddings = False
        with torch.device("meta"):
            expected = set(AutoModelForCausalLM.from_config(new_cfg).state_dict())
        missing = sorted(k for k in expected - set(final) if not k.endswith("inv_freq"))
        unexpected = sorted(set(final) - expected)
        if missing or unexpected:
            raise AgiasiError(
                f"merged weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        from huggingface_hub import save_torch_state_dict

        hf_dir.mkdir()
        new_cfg.save_pretrained(str(hf_dir))
        save_torch_state_dict(
            {k: v.to(dtype).contiguous() for k, v in final.items()},
            str(hf_dir),
            max_shard_size="4GB",
            metadata={"format": "pt"},
        )
        if cfg.measure and len(merged) == 1:
            merged = {cfg.merge_base: {}}  # nothing else needs the tensors
        del final
        tok = AutoTokenizer.from_pretrained(str(base_id))
        tok.save_pretrained(str(hf_dir))
        maybe_crash("export_hf_written")
        for extra in ("tokenizer.model", "generation_config.json", "added_tokens.json"):
            if (base_path / extra).is_file() and not (hf_dir / extra).exists():
                shutil.copy(base_path / extra, hf_dir / extra)
        if not (hf_dir / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(new_cfg).save_pretrained(str(hf_dir))
        log(
            f"export: HF folder written ({sum(f.stat().st_size for f in hf_dir.iterdir()) / 2**20:.1f} MiB)"
        )

        # ---- GGUF
        ggufs: dict[str, Path] = {}
        stem = (base_path.name if base_path.exists() else base_id.split("/")[-1]) + "-agiasi"
        need_f16 = any(t in KQUANT_TYPES for t in types)
        for t in [t for t in types if t not in KQUANT_TYPES] + (
            ["f16"] if need_f16 and "f16" not in types else []
        ):
            ggufs[t] = write_gguf(hf_dir, tmp / f"{stem}-{t}.gguf", t, cfg.output_tensor_type)
            maybe_crash("export_gguf_written")
            log(f"export: {ggufs[t].name}")
        for t in [t for t in types if t in KQUANT_TYPES]:
            ggufs[t] = quantize_gguf(ggufs["f16"], tmp / f"{stem}-{t}.gguf", t)
            log(f"export: {ggufs[t].name}")
        if need_f16 and "f16" not in types:
            ggufs.pop("f16").unlink()

        # ---- report
        report: dict[str, Any] = {
            "checkpoint": str(ckpt),
            "base_model": base_id,
            "merge_base": cfg.merge_base,
            "soul": soul_info,
            "num_ctx": cfg.num_ctx,
            "files": {},
        }
        if cfg.measure:
            from agiasi.evaluate import parity_report

            report.update(
                parity_report(
                    ckpt,
                    mcfg,
                    merged,
                    new_cfg,
                    hf_dir,
                    ggufs,
                    tok,
                    cfg.num_ctx,
                    cfg.text,
                    log,
                    cfg.merge_base,
                )
            )
        for t, p in ggufs.items():
            report["files"][t] = p.name
        (tmp / "export_report.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n"
        )
        (tmp / "Modelfile").write_text(modelfile(tok, ggufs, cfg.num_ctx), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(report, cfg, hf_cfg), encoding="utf-8")
        result["report"] = report

    # Everything goes to a temp sibling and is renamed in one step (checkpoint.atomic_folder,
    # the same mechanism as step folders): a killed export leaves nothing under `out`.
    atomic_folder(out, write)
    report = result["report"]
    if cfg.measure:
        log(format_report(report))
    log(f"export: done → {out}")
    return report


def _is_quantized_linear(key: str, t: torch.Tensor) -> bool:
    """bitsandbytes quantizes every nn.Linear but the head (embeddings and norms stay)."""
    return (
        t.ndim == 2
        and key.endswith(".weight")
        and "embed" not in key
        and not key.startswith("lm_head")
    )


def _rotation_from_state(info: dict[str, Any], state: dict[str, Any]) -> torch.Tensor:
    from agiasi.soul import Soul, SoulConfig

    soul = Soul(SoulConfig(hidden_size=info["hidden_size"], rotation=info["kind"]))
    soul.rotation.load_state_dict(state["so8_rotation"])
    with torch.no_grad():
        return soul.rotation_matrix(torch.float64)


# --------------------------------------------------------------------------- Modelfile & card


def modelfile(tok, ggufs: dict[str, Path], num_ctx: int) -> str:
    """Ollama Modelfile from the tokenizer's own chat template and stop tokens."""
    pick = next((t for t in ("q4_k_m", "q8_0", "f16", "bf16", "f32") if t in ggufs), None)
    lines = ["# Generated by agiasi export."]
    lines.append(f"FROM ./{ggufs[pick].name}" if pick else "FROM ./hf")
    stops = [s for s in ("<|end|>", "<|endoftext|>", "<|user|>") if s in tok.get_vocab()]
    if getattr(tok, "eos_token", None) and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    if "<|user|>" in tok.get_vocab():  # Phi-3's template, in Ollama's Go template syntax
        lines.append(
            'TEMPLATE """{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}'
            "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n"
            '{{ .Response }}<|end|>\n"""'
        )
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines.append(
        f"# num_ctx {num_ctx}: llama.cpp picks LongRoPE's long or short factors from the context "
        "size, HF from the sequence length; a context within the original window keeps HF behaviour."
    )
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def model_card(report: dict[str, Any], cfg: ExportConfig, hf_cfg) -> str:
    soul = report.get("soul")
    parts = [
        f"# {Path(report['base_model']).name} + agiasi soul",
        "",
        f"Base model: `{report['base_model']}`. LoRA merged into the "
        f"{'original 16-bit' if cfg.merge_base == 'w16' else 'NF4-dequantized'} weights; "
        + (
            f"soul ({soul['kind']}, α = {soul['alpha']:.4f}, gate = {soul['gate']:.4f}) folded into "
            "the LM head (W' = W + g·W R), so this is a plain model: no agiasi code is needed."
            if soul
            else "no soul (control run)."
        ),
        "",
        "## Files",
        "",
        "- `hf/`: Hugging Face folder (`AutoModelForCausalLM.from_pretrained('hf')`).",
    ]
    for t, name in report.get("files", {}).items():
        parts.append(
            f"- `{name}`: GGUF {t.upper()} for llama.cpp / Ollama (`ollama create NAME -f Modelfile`)."
        )
    parts += [
        "",
        "## Context size",
        "",
        f"Use a context of at most {cfg.num_ctx} tokens (the Modelfile sets `num_ctx {cfg.num_ctx}`). "
        "For LongRoPE models llama.cpp chooses the long or short RoPE factors from the *context size* "
        "it is given, while transformers chooses by the *sequence length*: with a larger context "
        "the GGUF silently computes a different model (see `long_context` in the report).",
        "",
        "## Measured fidelity",
        "",
        "```",
        format_report(report) if "parity" in report else "(not measured)",
        "```",
    ]
    return "\n".join(parts) + "\n"


def format_report(report: dict[str, Any]) -> str:
    rows = ["stage                         max|Δlogit|   top-1    mean KL    greedy   ppl"]
    p = report.get("parity", {})
    for name, r in p.items():
        rows.append(
            f"{name:<29} {_f(r.get('max_abs_dlogit')):>11} {_pct(r.get('top1')):>7} "
            f"{_f(r.get('mean_kl')):>10} {str(r.get('greedy_equal', '-')):>8} {_f(r.get('ppl')):>7}"
        )
    if "merge_bases" in report:
        for k, v in report["merge_bases"].items():
            rows.append(
                f"merge base {k:<6} vs trained wrapper: max|Δlogit| {_f(v['max_abs_dlogit'])}, "
                f"top-1 {_pct(v['top1'])}, mean KL {_f(v['mean_kl'])}"
            )
    return "\n".join(rows)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
