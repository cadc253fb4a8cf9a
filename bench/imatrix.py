"""agiasi's importance matrix against llama.cpp's own ``llama-imatrix``, and what it buys.

Part 1 (cross-check): ``llama-imatrix`` is built from the llama.cpp source inside the
llama-cpp-python sdist of the installed version (``pip download --no-binary``, then cmake for
that one target; ~8 min on 2 cores, cached in ``--build-dir``), run on the model's F32 GGUF with
the same text, context (chunk size) and chunk count as agiasi, KV cache in F32 (``-ctk f32
-ctv f32``: its default F16 cache rounds the attention inputs). The two matrices are compared
tensor by tensor: the name set, the token counts, and every column sum within ``RTOL`` of itself.

Part 2 (effect): each type quantized from the F16 GGUF with and without agiasi's matrix, and
KL(F16 ‖ quant) and top-1 agreement on held-out text that is not the calibration text (the
shipped held-out sample vs the shipped training sample), plus file sizes.

    python bench/imatrix.py                       # the shipped model, both parts
    python bench/imatrix.py --model DIR --skip-crosscheck --types q4_k_m,iq4_xs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Both sides compute x² sums of fp32 activations of the same fp32 weights; they differ in
# kernels and in summation order (llama.cpp: one fp32 accumulator per column over all tokens;
# agiasi: fp32 within a group of chunks, float64 across), ~1e-4 of a sum at most over 50k
# tokens. 1e-3 (the figure) leaves a margin a real difference (another token, another
# chunking, a missed BOS) exceeds by orders of magnitude.
RTOL = 1e-3


def build_llama_imatrix(build_dir: Path) -> Path:
    import llama_cpp

    exe = build_dir / "llama.cpp" / "build" / "bin" / "llama-imatrix"
    if exe.exists() and exe.with_name("llama-quantize").exists():
        return exe
    build_dir.mkdir(parents=True, exist_ok=True)
    version = llama_cpp.__version__
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"llama-cpp-python=={version}",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(build_dir),
        ],
        check=True,
    )
    sdist = next(build_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(build_dir)], check=True)
    src = build_dir / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    (build_dir / "llama.cpp").symlink_to(src)
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DGGML_OPENMP=OFF",
    ]
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *flags], check=True)
    subprocess.run(
        [
            "cmake",
            "--build",
            str(src / "build"),
            "--target",
            "llama-imatrix",
            f"-j{os.cpu_count() or 1}",
        ],
        check=True,
    )
    return exe


def ours(model: Path, text: str, chunk: int, tokens: int):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from agiasi.gguf.imatrix import calibration_chunks, compute_imatrix, gguf_names
    from agiasi.weights import LazyWeights

    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    chunks = calibration_chunks(tok, text, chunk, tokens)
    names = gguf_names(cfg.to_dict(), LazyWeights(model).keys())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    im = compute_imatrix(model, cfg, chunks, names, device)
    return im, time.perf_counter() - start


def crosscheck(model: Path, work: Path, text_file: Path, chunk: int, tokens: int, exe: Path):
    from agiasi.gguf.imatrix import read_imatrix
    from agiasi.gguf.writer import write_gguf

    text = text_file.read_text(encoding="utf-8")
    im, t_ours = ours(model, text, chunk, tokens)
    im.datasets = [text_file.name]
    f32 = write_gguf(model, work / "f32.gguf", "f32")
    write_gguf(model, work / "f16.gguf", "f16")
    out = work / "llama-imatrix.gguf"
    cmd = [
        str(exe),
        "-m",
        str(f32),
        "-f",
        str(text_file),
        "-o",
        str(out),
        "-c",
        str(chunk),
        "-b",
        str(chunk),
        "--chunks",
        str(im.chunks),
        "-ctk",
        "f32",
        "-ctv",
        "f32",
        "--no-ppl",
        "-t",
        str(os.cpu_count() or 1),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    t_ref = time.perf_counter() - start
    ref = read_imatrix(out)
    worst, where = 0.0, None
    for n, s in ref.sums.items():
        rel = float((np.abs(im.sums[n] - s) / np.maximum(np.abs(s), 1e-30)).max())
        if rel > worst:
            worst, where = rel, n
    row = {
        "quantize_tool_equal": same_as_llama_quantize(work, im, exe.with_name("llama-quantize")),
        "names_equal": set(im.sums) == set(ref.sums),
        "entries": len(ref.sums),
        "counts_equal": all(im.counts[n] == ref.counts[n] for n in ref.counts),
        "chunks": [im.chunks, ref.chunks],
        "chunk_size": chunk,
        "max_rel_diff": worst,
        "worst_tensor": where,
        "ok": worst <= RTOL,
        "seconds_agiasi": round(t_ours, 2),
        "seconds_llama_imatrix": round(t_ref, 2),
    }
    return row, im


def same_as_llama_quantize(work: Path, im, tool: Path) -> bool:
    """Our C-API quantization with the matrix against ``llama-quantize --imatrix`` on the same
    file: every tensor byte-equal and the same ``quantize.imatrix.*`` keys."""
    import gguf

    from agiasi.gguf.imatrix import QuantizerImatrix, write_imatrix
    from agiasi.gguf.quantize import quantize_gguf

    f16 = work / "f16.gguf"
    if not f16.exists():
        raise SystemExit("write the F16 GGUF first")
    path = write_imatrix(work / "imatrix.gguf", im)
    subprocess.run(
        [str(tool), "--imatrix", str(path), str(f16), str(work / "tool.gguf"), "q4_k_m", "2"],
        check=True,
        capture_output=True,
    )
    ours_q = quantize_gguf(
        f16, work / "api.gguf", "q4_k_m", imatrix=QuantizerImatrix(im, str(path))
    )
    a, b = gguf.GGUFReader(str(work / "tool.gguf")), gguf.GGUFReader(str(ours_q))
    same = all(
        np.array_equal(np.asarray(t.data), np.asarray(u.data))
        for t, u in zip(a.tensors, b.tensors, strict=True)
    )
    keys = [k for k in a.fields if k.startswith("quantize.imatrix")]
    return (
        same
        and bool(keys)
        and all(a.fields[k].contents() == b.fields[k].contents() for k in keys if k in b.fields)
        and set(keys) <= set(b.fields)
    )


def effect(model: Path, work: Path, im, types: list[str], heldout: Path, n_tokens: int):
    from transformers import AutoTokenizer

    from agiasi.eval.models import GGUFModel
    from agiasi.export.parity import compare_all
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE
    from agiasi.gguf.imatrix import QuantizerImatrix
    from agiasi.gguf.quantize import quantize_gguf
    from agiasi.gguf.writer import write_gguf

    tok = AutoTokenizer.from_pretrained(model)
    f16 = write_gguf(model, work / "f16.gguf", "f16")
    ids = tok(heldout.read_text(encoding="utf-8"), verbose=False)["input_ids"][:n_tokens]
    win = im.chunk_size
    windows = [ids[i : i + win] for i in range(0, len(ids) - 1, win)]
    ref = GGUFModel(f16, n_ctx=win)
    want = [ref.logits(w) for w in windows]
    ref.close()
    matrix = QuantizerImatrix(im)
    rows = {}
    for t in types:
        for label, m in (("without", None), ("with", matrix)):
            if m is None and GGUF_TYPE_TABLE[t].needs_imatrix:
                continue
            path = quantize_gguf(f16, work / f"{t}-{label}.gguf", t, imatrix=m)
            g = GGUFModel(path, n_ctx=win)
            got = compare_all(want, [g.logits(w) for w in windows])
            g.close()
            rows[f"{t} {label}"] = {
                "kl": got["mean_kl"],
                "top1": got["top1"],
                "bytes": path.stat().st_size,
            }
        if f"{t} without" in rows:
            rows[f"{t} with"]["kl_ratio"] = rows[f"{t} with"]["kl"] / rows[f"{t} without"]["kl"]
    return {"heldout_tokens": len(ids), "rows": rows}


def gpu_memory_row(model: Path, text: str, chunk: int, tokens: int, cap_gib: float) -> dict:
    """On a GPU capped at ``cap_gib`` (a 12 GB card): agiasi's streamed matrix (fp32, one layer
    resident) against the whole model resident in bf16 with the same hooks (the plain way)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from agiasi.gguf.imatrix import calibration_chunks, gguf_names
    from agiasi.weights import LazyWeights

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    im, seconds = ours(model, text, chunk, tokens)
    row = {
        "ours_seconds": round(seconds, 1),
        "ours_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "tokens": im.chunks * im.chunk_size,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tok, cfg = AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)
    chunks = calibration_chunks(tok, text, chunk, tokens)
    names = gguf_names(cfg.to_dict(), LazyWeights(model).keys())
    start = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    sums = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in names:

            def hook(_, a, g=names[f"{name}.weight"]):
                x = a[0].reshape(-1, a[0].shape[-1]).float()
                sums[g] = sums.get(g, 0) + x.pow(2).sum(0)

            mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        for i in range(0, len(chunks), 8):
            m.model(input_ids=chunks[i : i + 8].cuda(), use_cache=False)
    torch.cuda.synchronize()
    row["whole_bf16_seconds"] = round(time.perf_counter() - start, 1)
    row["whole_bf16_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["max_rel_diff_vs_bf16"] = max(
        float((np.abs(im.sums[g] - sums[g].double().cpu().numpy()) / im.sums[g].max()).max())
        for g in sums
    )
    return row


def main() -> int:
    from agiasi.shipped import default_dataset, default_heldout, tiny_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=tiny_model_path())
    ap.add_argument("--text", type=Path, default=default_dataset(), help="calibration text")
    ap.add_argument("--heldout", type=Path, default=default_heldout())
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument(
        "--types",
        default="q6_k,q5_k_m,q4_k_m,q4_k_s,q4_0,iq4_nl,iq4_xs,q3_k_l,q3_k_m,iq3_m,iq3_xxs,"
        "q2_k,q2_k_s,iq2_m,iq2_xs",
    )
    ap.add_argument("--build-dir", type=Path, default=Path(tempfile.gettempdir()) / "agiasi-llama")
    ap.add_argument("--skip-crosscheck", action="store_true")
    ap.add_argument("--out", type=Path, help="append the result as one JSON line")
    ap.add_argument("--shape", help="phi-3.5-mini: a random-weight model of that shape (GPU)")
    ap.add_argument("--cap-gib", type=float, default=11.5)
    args = ap.parse_args()
    result: dict = {"model": str(args.shape or args.model), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.shape:
            sys.path.insert(0, str(Path(__file__).parent))
            from export import build_model

            args.model = work / "model"
            build_model(args.shape, args.model)
            text = args.text.read_text(encoding="utf-8")
            result["gpu"] = gpu_memory_row(args.model, text, args.chunk, args.tokens, args.cap_gib)
            print(json.dumps(result["gpu"], indent=1))
            if args.out:
                with args.out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(result) + "\n")
            return 0
        if args.skip_crosscheck:
            im, _ = ours(args.model, args.text.read_text(encoding="utf-8"), args.chunk, args.tokens)
        else:
            exe = build_llama_imatrix(args.build_dir)
            result["crosscheck"], im = crosscheck(
                args.model, work, args.text, args.chunk, args.tokens, exe
            )
            print(json.dumps(result["crosscheck"], indent=1))
        result["effect"] = effect(
            args.model, work, im, args.types.split(","), args.heldout, args.heldout_tokens
        )
    for name, r in result["effect"]["rows"].items():
        ratio = f"  KL ratio {r['kl_ratio']:.3f}" if "kl_ratio" in r else ""
        print(f"{name:<18} KL {r['kl']:.4f}  top-1 {r['top1']:.3f}  {r['bytes']:>9} B{ratio}")
    if args.out:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")
    return 0 if result.get("crosscheck", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
