"""Write the package's Japanese text samples from the corpus (run on a machine that has it).

Both come from the Mew manual (mew-info-ja, BSD-3-Clause), a file the shipped tiny model was
*not* trained on (``build_tiny_model.py`` holds it out whole):

- ``heldout_ja.txt``: its first whole lines up to 30,000 bytes — the evaluation text;
- ``sample_ja.txt``: every line after those — the demo's and ``agiasi train``'s default data.

Why not the model's own training text: fine-tuning a model on text it was pretrained on rewards
sharper (over-confident) predictions on that text and raises perplexity everywhere else, which
says nothing about the soul. Training on one part of an unseen manual and evaluating on another
is what a user does with their own domain, and it is what the demo measures.

    python scripts/make_sample_data.py ../shared/corpus/ja
"""

from __future__ import annotations

import argparse
from pathlib import Path

SOURCE = "mew-info-ja.ja.txt"
HELDOUT_BYTES = 30_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path, help="the folder holding mew-info-ja.ja.txt")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "src/agiasi/assets/data"
    )
    args = ap.parse_args()
    lines = (args.corpus / SOURCE).read_text(encoding="utf-8").splitlines(keepends=True)
    size, cut = 0, 0
    while cut < len(lines) and size + len(lines[cut].encode()) <= HELDOUT_BYTES:
        size += len(lines[cut].encode())
        cut += 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout_ja.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (args.out / "sample_ja.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    print(f"heldout_ja.txt: {cut} lines, {size} bytes; sample_ja.txt: {len(lines) - cut} lines")


if __name__ == "__main__":
    main()
