"""Write an HF checkpoint's safetensors shards tensor by tensor.

The ``safetensors`` library serializes a whole dict at once, so saving a 3.8 B model needs all of
it in memory. The format is simple and fixed — an 8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}`` padded to 8 bytes, then the raw row-major
little-endian bytes — so this writer (by hand: no library offers it) computes every header from
the shapes up front and then streams the data, one tensor in memory at a time. Files are read
back by the ``safetensors`` library itself in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from agiasi.errors import AgiasiError

_DTYPES = {
    torch.float64: ("F64", 8),
    torch.float32: ("F32", 4),
    torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 2),
}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def plan_shards(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int
) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    if dtype not in _DTYPES:
        raise AgiasiError(f"cannot write {dtype} weights to safetensors here")
    size = _DTYPES[dtype][1]
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_sharded(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int = 4 * 2**30,
) -> list[Path]:
    """Write ``tensors`` (yielded in ``shapes`` order, each cast to ``dtype``) as HF shards plus
    ``model.safetensors.index.json`` when there is more than one. Returns the shard paths."""
    groups = plan_shards(shapes, dtype, max_shard_bytes)
    names = shard_names(len(groups))
    tag, size = _DTYPES[dtype]
    it = iter(tensors)
    paths = []
    weight_map: dict[str, str] = {}
    total = 0
    for group, fname in zip(groups, names, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in group:
            n = math.prod(shapes[name]) * size
            header[name] = {
                "dtype": tag,
                "shape": list(shapes[name]),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        path = folder / fname
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name in group:
                got_name, t = next(it)
                if got_name != name or tuple(t.shape) != tuple(shapes[name]):
                    raise AgiasiError(
                        f"internal: expected {name} {shapes[name]}, got {got_name} {tuple(t.shape)}"
                    )
                data = t.detach().to("cpu", dtype).contiguous().view(torch.uint8).reshape(-1)
                fh.write(data.numpy().data)
        total += offset
        paths.append(path)
    if len(paths) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths
