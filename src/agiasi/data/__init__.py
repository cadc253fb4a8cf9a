"""Datasets → token examples → batches, one module per step:

``files`` (file kinds → rows) → ``formats`` (rows → text or chat records) → ``load`` (sources,
validation split, the entry :func:`load_data`) → ``tokenize`` (records → examples) →
``batching`` (examples → resumable, rank-sharded, optionally packed micro-batches);
``preview`` is what ``agiasi data`` prints.
"""

from agiasi.data.batching import BatchStream, collate, pack
from agiasi.data.load import (
    Data,
    default_dataset,
    default_heldout,
    load_data,
    load_records,
    split_eval,
)
from agiasi.data.tokenize import IGNORE, Example, tokenize_records

__all__ = [
    "IGNORE",
    "BatchStream",
    "Data",
    "Example",
    "collate",
    "default_dataset",
    "default_heldout",
    "load_data",
    "load_records",
    "pack",
    "split_eval",
    "tokenize_records",
]
