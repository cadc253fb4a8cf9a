"""Peak memory of reading and tokenizing a dataset before training (CPU, shipped tokenizer).

Each case runs in its own process and reports its peak RSS above the same process after the
imports and the tokenizer loaded: ours (``agiasi.data.load_data``) and, as the reference, the
Hugging Face way (``datasets.load_dataset("text", sample_by="paragraph")`` + a batched
tokenizing ``map``, Arrow on disk). Inputs are made here from the shipped sample:

* ``text``: a plain-text file of SIZE MB, one paragraph a line, no blank line (one document:
  the shape that took 9 GB for 100 MB before), tokenized into 512-token blocks;
* ``record``: one JSONL record whose ``text`` is 10 MB.

    python bench/data_memory.py --size-mb 1024 --json bench/data/data_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, path: str, impl: str) -> None:
    from transformers import AutoTokenizer

    from agiasi.shipped import tiny_model_path

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    tok("warm up")
    if impl == "reference":
        import datasets  # noqa: F401 - imported before the baseline, like ours
    from agiasi.data import load_data

    base = _rss_mb()
    t0 = time.time()
    if impl == "agiasi":
        data = load_data(path, tok, 512)
        tokens = data.train_tokens
    else:
        import datasets

        with tempfile.TemporaryDirectory() as cache:
            builder = "text" if kind == "text" else "json"
            kw = {"sample_by": "paragraph"} if kind == "text" else {}
            ds = datasets.load_dataset(
                builder, data_files=path, split="train", cache_dir=cache, **kw
            )
            ds = ds.map(
                lambda b: tok(b["text"], add_special_tokens=False),
                batched=True,
                remove_columns=ds.column_names,
            )
            tokens = sum(len(x) for x in ds["input_ids"])
    print(
        json.dumps(
            {"tokens": tokens, "seconds": time.time() - t0, "peak_above_mb": _rss_mb() - base}
        )
    )


def make_inputs(folder: Path, size_mb: int) -> dict[str, Path]:
    from agiasi.shipped import default_dataset

    sample = default_dataset().read_text(encoding="utf-8").replace("\n\n", "\n")
    text = folder / "big.txt"
    chunk = sample.encode("utf-8")
    with open(text, "wb") as fh:
        for _ in range(size_mb * 2**20 // len(chunk) + 1):
            fh.write(chunk)
    record = folder / "one_record.jsonl"
    body = (sample * (10 * 2**20 // len(chunk) + 1)).encode("utf-8")[: 10 * 2**20]
    text_10mb = body.decode("utf-8", errors="ignore")
    record.write_text(json.dumps({"text": text_10mb}, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"text": text, "record": record}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--impls", default="agiasi,reference")
    ap.add_argument("--kinds", default="text,record")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "IMPL"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.size_mb)
        for kind, path in inputs.items():
            if kind not in args.kinds.split(","):
                continue
            for impl in args.impls.split(","):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(path), impl],
                    capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode != 0:
                    row = {"error": out.stderr.strip().splitlines()[-1][:200]}
                else:
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(kind=kind, impl=impl, file_mb=round(path.stat().st_size / 2**20, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
