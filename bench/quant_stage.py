"""The quantized-GGUF stage against llama.cpp's own quantizer, on the same F16 file.

Q8_0: agiasi writes it on the export's stream with torch (``agiasi.gguf.writer.q8_0_bytes``);
the reference is ``llama_model_quantize`` (llama-cpp-python's binding of what ``llama-quantize``
runs) from the F16 GGUF with as many threads as the CPU has, as ``llama-quantize`` uses them.
Both rows do the whole job from the F16 file: read every tensor, quantize, write a file. Ours
also checks every Q8_0 tensor it made against the bytes llama.cpp wrote for it (the tensors
llama.cpp keeps in another type — norms — are skipped: the export plans those the same way).

Q4_K_M: agiasi calls the same ``llama_model_quantize`` (``agiasi.gguf.quantize``) with the same
thread count, so its time is llama.cpp's; the row is printed so the table shows it.

    python bench/quant_stage.py OUT/model-f16.gguf [--rows q8_0,q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path


def llama_quantize(src: Path, dst: Path, gguf_type: str) -> float:
    """llama.cpp's quantizer as agiasi calls it (``agiasi.gguf.quantize.quantize_gguf``:
    ``llama_model_quantize``, ``nthread`` = the CPU count, as ``llama-quantize`` runs)."""
    from agiasi.gguf.quantize import quantize_gguf

    t0 = time.perf_counter()
    quantize_gguf(src, dst, gguf_type)
    return time.perf_counter() - t0


def ours_q8_0(src: Path, dst: Path) -> tuple[float, dict[str, object]]:
    """Every F16 tensor that llama.cpp's Q8_0 file holds as Q8_0, quantized by torch and written
    out; the time covers reading, quantizing and writing."""
    import gguf
    import torch

    from agiasi.gguf.writer import q8_0_bytes

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(src)
    made = {}
    with open(dst, "wb") as fh:
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.F16:
                continue
            with warnings.catch_warnings():  # read-only: q8_0_bytes never writes its input
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(t.data)  # the file's pages, as llama.cpp's mmap
            q = q8_0_bytes(data)
            fh.write(q.data)
            made[t.name] = (fh.tell() - q.nbytes, q.nbytes)
    elapsed = time.perf_counter() - t0
    return elapsed, made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("f16", type=Path)
    ap.add_argument("--rows", default="q8_0,q4_k_m")
    args = ap.parse_args()
    import gguf
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory(dir=args.f16.parent) as tmp:
        tmp = Path(tmp)
        if "q8_0" in args.rows:
            ref = tmp / "llama-q8_0.gguf"
            t_ref = llama_quantize(args.f16, ref, "q8_0")
            t_ours, made = ours_q8_0(args.f16, tmp / "ours-q8_0.bin")
            ours = np.memmap(tmp / "ours-q8_0.bin", dtype=np.uint8, mode="r")
            checked = same = 0
            for t in gguf.GGUFReader(ref).tensors:
                if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and t.name in made:
                    start, n = made[t.name]
                    checked += 1
                    same += bool(
                        np.array_equal(np.asarray(t.data).reshape(-1), ours[start : start + n])
                    )
            rows.append({"stage": "Q8_0 from the F16 file", "llama.cpp s": round(t_ref, 2),
                         "ours s": round(t_ours, 2), "ours / llama.cpp": round(t_ours / t_ref, 2),
                         "tensors byte-equal": f"{same}/{checked}"})  # fmt: skip
        if "q4_k_m" in args.rows:
            t_k = llama_quantize(args.f16, tmp / "llama-q4_k_m.gguf", "q4_k_m")
            rows.append({"stage": "Q4_K_M from the F16 file (agiasi calls this same quantizer)",
                         "llama.cpp s": round(t_k, 2)})  # fmt: skip
    for r in rows:
        print(json.dumps(r, ensure_ascii=False))


if __name__ == "__main__":
    main()
