"""How the shipped tiny Japanese Phi-3 (src/agiasi/assets/tiny-ja-phi3) was made.

Two stages, because the tokenizer is trained on the CPU and the model on a GPU machine that
cannot see ../shared:

    # 1. here: tokenizer + token ids (held-out files excluded)
    python scripts/build_tiny_model.py tokenize --corpus ../shared/corpus/ja --work .gpu/tiny
    # 2. on the GPU machine: train from scratch, write the HF folder
    python scripts/build_tiny_model.py train --work .gpu/tiny --out .gpu/tiny/model
    # 3. here: copy .gpu/tiny/model into src/agiasi/assets/tiny-ja-phi3

Architecture: Phi3ForCausalLM, hidden 256, intermediate 768 (multiples of 256, so Q4_K really
applies in llama.cpp), 6 layers, 4 heads (head_dim 64), vocab 8000 (sentencepiece unigram, byte
fallback, Phi-3's special tokens and chat template), context 256 (the length it is trained on: a
longer window measures extrapolation, not the model), untied head, stored in bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

HELD_OUT = ("mew-info-ja.ja.txt", "debian-history-ja.ja.txt")  # whole files, never trained on
VOCAB = 8000
SEQ = 256


def tokenize(corpus: Path, work: Path) -> None:
    import numpy as np

    from agiasi.testing.tokenizer import build_phi3_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in corpus.glob("*.ja.txt") if p.name not in HELD_OUT)
    t0 = time.time()
    tok = build_phi3_tokenizer(
        files,
        work / "tokenizer",
        vocab_size=VOCAB,
        character_coverage=0.9995,
        max_sentences=1_000_000,
    )
    print(f"tokenizer: {len(tok)} pieces in {time.time() - t0:.0f}s")
    eos = tok.eos_token_id
    for split, names in (("train", [f.name for f in files]), ("heldout", list(HELD_OUT))):
        ids: list[int] = []
        for name in names:
            text = (corpus / name).read_text(encoding="utf-8")
            for doc in text.split("\n\n"):
                if doc.strip():
                    ids.extend(tok(doc.strip(), add_special_tokens=False)["input_ids"] + [eos])
        np.array(ids, dtype=np.uint16).tofile(work / f"{split}.u16")
        print(f"{split}: {len(ids):,} tokens from {len(names)} files")


def train(work: Path, out: Path, steps: int, batch: int, lr: float) -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from agiasi.testing.tokenizer import PHI3_CHAT_TEMPLATE

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    cfg = Phi3Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        original_max_position_embeddings=SEQ,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
        rope_theta=10000.0,
    )
    cfg.architectures = ["Phi3ForCausalLM"]
    model = Phi3ForCausalLM(cfg).to(dev).train()
    train_ids = torch.from_numpy(np.fromfile(work / "train.u16", dtype=np.uint16).astype(np.int64))
    held = torch.from_numpy(np.fromfile(work / "heldout.u16", dtype=np.uint16).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    n = train_ids.numel() - SEQ - 1
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 200)
        cos = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * cos)
        starts = torch.randint(0, n, (batch,), generator=g)
        x = torch.stack([train_ids[s : s + SEQ + 1] for s in starts]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        nll, cnt = 0.0, 0
        for s in range(0, held.numel() - SEQ - 1, SEQ):
            x = held[s : s + SEQ + 1].unsqueeze(0).to(dev)
            nll += model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item() * (SEQ - 1)
            cnt += SEQ - 1
    ppl = math.exp(nll / cnt)
    print(f"held-out perplexity {ppl:.2f} ({cnt:,} tokens, window {SEQ})")
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="12MB")  # files ≤ 16 MiB
    tok.chat_template = PHI3_CHAT_TEMPLATE
    tok.save_pretrained(out)
    shutil.copy(work / "tokenizer" / "tokenizer.model", out / "tokenizer.model")
    prompts = ["Debian パッケージを", "このコマンドは", "日本語の", "ファイルを"]
    samples = {}
    model.to(torch.float32)
    for p in prompts:
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
        gen = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.1)
        samples[p] = tok.decode(gen[0], skip_special_tokens=True)
        print("sample:", samples[p])
    (out / "training_report.json").write_text(
        json.dumps(
            {
                "heldout_files": HELD_OUT,
                "heldout_ppl": ppl,
                "heldout_window": SEQ,
                "steps": steps,
                "batch": batch,
                "seq": SEQ,
                "lr": lr,
                "train_tokens": int(train_ids.numel()),
                "samples": samples,
                "seconds": time.time() - t0,
            },
            ensure_ascii=False,
            indent=2,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("tokenize")
    a.add_argument("--corpus", type=Path, required=True)
    a.add_argument("--work", type=Path, required=True)
    b = sub.add_parser("train")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    if args.cmd == "tokenize":
        tokenize(args.corpus, args.work)
    else:
        train(args.work, args.out, args.steps, args.batch, args.lr)


if __name__ == "__main__":
    main()
