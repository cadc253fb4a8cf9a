"""What ``agiasi export`` checks before it writes anything: an output folder it may use (and,
with ``--force``, only an earlier export), enough disk, finite checkpoint tensors, special ids
inside the vocabulary, merged keys that fit the config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from agiasi.errors import AgiasiError
from agiasi.outputs import check_output_folder
from agiasi.weights import HEAD_KEY

REPORT = "export_report.json"


def check_special_ids(hf_cfg, shapes: dict[str, tuple[int, ...]]) -> None:
    """BOS/EOS/PAD ids inside the vocabulary: llama.cpp and generate() index with them."""
    vocab = shapes[HEAD_KEY][0] if HEAD_KEY in shapes else None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_cfg, name, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        for i in ids:
            if i is None:
                continue
            if not isinstance(i, int) or i < 0 or (vocab is not None and i >= vocab):
                raise AgiasiError(
                    f"the base model's {name} {i!r} is not a token id of its vocabulary "
                    f"(0 … {vocab - 1 if vocab else '?'}); fix its config.json"
                )


def refuse_nonfinite(tensors, where: Path) -> None:
    """A checkpoint holding nan/inf exports nothing: every figure of it would be meaningless,
    and an argmax over NaN logits even agrees with itself (top-1 "100 %")."""
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AgiasiError(
                f"{where} holds non-finite values (nan/inf) in {name}: the run diverged before "
                "this step; export an earlier step folder (or retrain with a lower --learning-rate)"
            )


# What an export writes at its top level: --force replaces a folder holding only these (and
# its report), never a folder of the user's own files.
EXPORT_ENTRIES = ("hf", "Modelfile", "README.md", REPORT, "imatrix.gguf")


def check_output_path(
    out: Path, ckpt: Path, base_id: str, force: bool, inputs: dict[str, str | None] | None = None
) -> None:
    """Refuse an --out that would destroy what the export reads (the checkpoint, its run, the
    base, and ``inputs``: the --text, --imatrix and --calibration files), or that cannot be
    written; ``--force`` replaces only an earlier export."""
    protected = {"the checkpoint": ckpt.resolve()}
    for what, given in (inputs or {}).items():
        if given:
            protected[what] = Path(given).expanduser().resolve()
    run = ckpt.resolve().parent
    if any((run / n).exists() for n in ("train_config.json", "metrics.jsonl")):
        protected["the checkpoint's run folder"] = run
    if Path(base_id).expanduser().exists():
        protected["the base model"] = Path(base_id).expanduser().resolve()
    # one rule with every output flag: not over an input, not inside another command's folder,
    # writable (agiasi.outputs)
    check_output_folder(out, "--out", protected)
    if out.exists() and not out.is_dir():
        raise AgiasiError(f"--out {out} is a file; pass a folder path")
    if out.exists() and not force:
        raise AgiasiError(f"{out} already exists; pass --force to replace it")
    if out.exists():
        names = sorted(p.name for p in out.iterdir())
        foreign = [n for n in names if n not in EXPORT_ENTRIES and not n.endswith(".gguf")]
        if REPORT not in names or foreign or out.is_symlink():
            found = ", ".join(foreign[:4] or names[:4]) or "nothing"
            raise AgiasiError(
                f"--force replaces only an earlier export, and {out} is not one (no {REPORT}"
                f"{'' if REPORT not in names or not foreign else ' alone'}; it holds {found}); "
                "pick another --out or remove it yourself"
            )


def check_keys_fit(shapes: dict[str, tuple[int, ...]], new_cfg) -> None:
    from agiasi.model.loading import meta_model

    expected = {k: tuple(v.shape) for k, v in meta_model(new_cfg).state_dict().items()}
    missing = sorted(k for k in set(expected) - set(shapes) if not k.endswith("inv_freq"))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        raise AgiasiError(
            f"the merged weights do not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )


def check_free_disk(out: Path, n_params: int, dtype: torch.dtype, types: list[str]) -> None:
    """Refuse an export that cannot fit on the output's disk (estimated from the shapes)."""
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE, KQUANT_TYPES

    per = torch.tensor([], dtype=dtype).element_size()
    need = n_params * per
    need += sum(n_params * GGUF_TYPE_TABLE[t].bytes_per_param for t in types)
    if any(t in KQUANT_TYPES for t in types) and "f16" not in types:
        need += n_params * 2  # the F16 the quantizer reads, removed afterwards
    need = int(need * 1.05) + 64 * 2**20
    existing = next(p for p in [out.resolve(), *out.resolve().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise AgiasiError(
            f"not enough disk space for this export in {existing}: it needs about "
            f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
        )
