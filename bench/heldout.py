"""The two held-out texts the training benchmarks score on, and that score: the shipped
``heldout_ja.txt`` (the Mew manual's part the training sample is not) and
``bench/data/heldout_history_ja.txt`` (the Debian project's history, another domain)."""

from __future__ import annotations

from pathlib import Path

SECOND_HELDOUT = Path(__file__).resolve().parent / "data" / "heldout_history_ja.txt"


def heldout_texts() -> dict[str, Path]:
    from agiasi.shipped import default_heldout

    return {"mew": default_heldout(), "history": SECOND_HELDOUT}


def heldout_ppl(model: Path, eval_tokens: int, window: int = 256) -> dict[str, float]:
    """Perplexity of a step folder or HF folder on both texts (the shipped model's window)."""
    from agiasi.eval.perplexity import EvalConfig, evaluate

    return {
        name: evaluate(
            EvalConfig(model=str(model), text=str(t), window=window, max_tokens=eval_tokens)
        )["perplexity"]
        for name, t in heldout_texts().items()
    }
