"""Examples → micro-batches: a seeded order that resumes from one number, rank slices, packing.

The order is a seeded permutation per epoch, so a data position (micro-batches seen) is all a
resume needs, and ranks of a distributed run take disjoint slices of every global batch.
"""

from __future__ import annotations

import torch

from agiasi.data.tokenize import IGNORE, Example
from agiasi.errors import AgiasiError


class BatchStream:
    """Deterministic, resumable, rank-sharded micro-batches.

    Micro-batch ``k`` of the whole run is positions ``[k·B·W, (k+1)·B·W)`` of the concatenated
    per-epoch permutations (B = batch size per rank, W = world size); rank r takes the slice
    ``[r·B, (r+1)·B)`` of it. The state is just ``k``.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
        pin_memory: bool = False,
        collate_fn=None,
    ):
        if batch_size < 1:
            raise AgiasiError(f"--batch-size must be at least 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = position
        self.pin_memory = pin_memory  # for a GPU: copies that do not stall the host
        self.collate = collate_fn or collate  # preference pairs: collate_pairs
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perm_cache[epoch]

    def _index(self, flat: int) -> int:
        n = len(self.examples)
        return self._perm(flat // n)[flat % n]

    def next(self) -> dict[str, torch.Tensor]:
        global_bs = self.batch_size * self.world_size
        base = self.position * global_bs + self.rank * self.batch_size
        items = [self.examples[self._index(base + i)] for i in range(self.batch_size)]
        self.position += 1
        batch = self.collate(items, self.pad_id)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


def collate(items: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors. Packed rows also get ``position_ids``; their padding is a segment of
    its own (positions from 0, no targets), so no real token attends to it or from it."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    packed = any(x.position_ids is not None for x in items)
    pos = torch.zeros((len(items), width), dtype=torch.long) if packed else None
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
        if pos is not None:
            pos[i, :n] = torch.tensor(x.position_ids if x.position_ids is not None else range(n))
            pos[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pos is not None:
        batch["position_ids"] = pos
    return batch


def collate_pairs(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs → 2·B right-padded rows, every chosen answer first and then every
    rejected one (one forward pass scores both), and each pair's index in its list (where a
    precomputed reference log-probability is found)."""
    rows = [Example(p.chosen_ids, p.chosen_labels) for p in items]
    rows += [Example(p.rejected_ids, p.rejected_labels) for p in items]
    batch = collate(rows, pad_id)
    batch["pair_index"] = torch.tensor([p.index for p in items], dtype=torch.long)
    return batch


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Several examples per row of at most ``max_length`` tokens, in their order (greedy: an
    example opens a new row when it does not fit the current one). Each example keeps its labels
    except its first token, which must not be predicted from the previous example's last."""
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, labels, pos))
            ids, labels, pos = [], [], []
        # text blocks are int32 arrays: `list += array` is numpy's broadcasting add, not extend
        ids.extend(_as_list(ex.input_ids))
        labels += [IGNORE, *_as_list(ex.labels)[1:]]
        pos += range(len(ex.input_ids))
    if ids:
        rows.append(Example(ids, labels, pos))
    return rows


def _as_list(x) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)
