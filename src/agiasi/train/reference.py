"""DPO's reference: the *starting* model's log-probabilities of each pair's answers.

TRL gets the reference of a LoRA run by switching the adapter off. With the soul that is wrong
twice: the soul sits outside the adapter, and after SFT (``--init-from``) the adapter is not
fresh. The reference here is the starting model exactly — base + starting adapter + starting
soul — on the one NF4 base already loaded:

* **frozen copy** (default): the starting soul is deep-copied and frozen (a few KiB for
  ``so8``); the starting adapter is a second PEFT adapter ``ref`` copied from the trained one
  (TRL does the same since PR #4723), or — when the run starts from a fresh adapter, whose B
  matrices are 0 — the adapter simply switched off, which computes exactly the same. One extra
  forward pass a step, without gradients, in eval mode (no dropout draws: the RNG stream, and so
  a resume, is the same as without it).
* **precomputed** (``--precompute-reference``): the same model scores every training and
  validation pair once before the first step; the log-probabilities go to
  ``reference_logps.safetensors`` in the run folder, keyed to the pairs' tokens, so a resume
  reads them back instead of scoring again, and training needs no reference forward.

Both give the same numbers up to the order of floating-point sums (a batch's padding width
changes how a matmul is blocked); ``tests/integration/train/test_preference.py`` compares them.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch

from agiasi.checkpoint.run_folder import REFERENCE as REFERENCE_FILE
from agiasi.errors import AgiasiError

REF_ADAPTER = "ref"


def pairs_fingerprint(pairs) -> str:
    """A hash of the pairs' tokens and labels, in order: what a saved table belongs to."""
    h = hashlib.sha256()
    for p in pairs:
        for seq in (p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels):
            h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


class Reference:
    """The starting model, frozen beside the trained one (see the module's docstring)."""

    def __init__(self, wrapper, adapter_trained: bool):
        self.soul = None
        if wrapper.soul is not None:
            self.soul = copy.deepcopy(wrapper.soul)
            for p in self.soul.parameters():
                p.requires_grad_(False)
        self.adapter = None
        peft = wrapper.base_model
        if adapter_trained:
            peft.add_adapter(REF_ADAPTER, peft.peft_config["default"])
            with torch.no_grad():
                for name, param in peft.named_parameters():
                    if ".default." in name:
                        peft.get_parameter(name.replace(".default.", f".{REF_ADAPTER}.")).copy_(
                            param
                        )
            peft.set_adapter("default")  # trainable again; "ref" frozen
            self.adapter = REF_ADAPTER
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def _active(self, wrapper):
        """The wrapper runs as the starting model for the block: eval mode, the reference's
        adapter (or none), no gradients."""
        peft = wrapper.base_model
        was_training = wrapper.training
        wrapper.eval()
        try:
            with torch.no_grad():
                if self.adapter is None:
                    with peft.disable_adapter():
                        yield
                else:
                    peft.set_adapter(self.adapter, inference_mode=True)
                    try:
                        yield
                    finally:
                        peft.set_adapter("default")
        finally:
            wrapper.train(was_training)

    def score(self, wrapper, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting model's summed log-probs of a pair batch: (chosen (B,), rejected (B,))."""
        with self._active(wrapper):
            logps, _, _ = wrapper.sequence_logps(
                batch["input_ids"], batch["attention_mask"], batch["labels"], soul=self.soul
            )
        b = logps.shape[0] // 2
        return logps[:b], logps[b:]

    def logps(self, wrapper, batch, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's pair of log-prob vectors for ``batch``: from the table when there
        is one, else scored now."""
        if split in self.tables:
            chosen, rejected = self.tables[split]
            idx = batch["pair_index"]
            return chosen[idx], rejected[idx]
        return self.score(wrapper, batch)

    def precompute(self, wrapper, pairs, pad_id: int, batch_size: int, split: str, say) -> None:
        """Score every pair of ``split`` once (in their order) and keep the table."""
        from agiasi.data.batching import collate_pairs

        chosen, rejected = [], []
        for i in range(0, len(pairs), batch_size):
            c, r = self.score(wrapper, collate_pairs(pairs[i : i + batch_size], pad_id))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        self.tables[split] = (torch.cat(chosen), torch.cat(rejected))
        say(f"reference: scored {len(pairs)} {split} pair(s) once (--precompute-reference)")

    def save(self, out_dir: Path, fingerprints: dict[str, str]) -> None:
        """The tables, atomically, with the fingerprint of the pairs each belongs to."""
        import os

        from safetensors.torch import save_file

        tensors = {}
        for split, (c, r) in self.tables.items():
            tensors[f"{split}.chosen"], tensors[f"{split}.rejected"] = c, r
        path = Path(out_dir) / REFERENCE_FILE
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata=fingerprints)
        os.replace(tmp, path)

    def load(self, out_dir: Path, fingerprints: dict[str, str]) -> bool:
        """The saved tables, if they belong to these pairs (a resume); False if there are none."""
        from safetensors import SafetensorError, safe_open

        path = Path(out_dir) / REFERENCE_FILE
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta != fingerprints:
                    raise AgiasiError(
                        f"{path} was computed for other pairs than this run's; delete it to "
                        "score the reference again"
                    )
                for split in fingerprints:
                    self.tables[split] = (
                        f.get_tensor(f"{split}.chosen"),
                        f.get_tensor(f"{split}.rejected"),
                    )
        except (SafetensorError, OSError) as e:
            raise AgiasiError(f"{path} is not readable ({e}); delete it to score again") from None
        return True
