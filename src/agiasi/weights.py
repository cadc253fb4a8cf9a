"""HF safetensors weights read and written one tensor at a time.

The format is simple and fixed — an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` padded to 8 bytes, then the raw row-major
little-endian bytes. Both directions are written here by hand because the ``safetensors``
library offers neither in the form a 3.8 B model on a 16 GB machine needs:

* writing: it serializes a whole dict at once (the model in memory); :func:`write_sharded`
  computes every header from the shapes up front and streams the data;
* reading: ``safe_open`` maps whole files, and every page a read touches stays resident in
  the process (streaming an 805 MB file through it raised peak RSS by 836 MB; through plain
  reads, :class:`LazyWeights`, by 99 MB — one tensor).

Files written here are read back by the ``safetensors`` library itself in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from agiasi.errors import AgiasiError

# The HF names of the two tensors the soul and a tied head concern; every stage uses these.
HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"

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


# --------------------------------------------------------------------------- reading


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyWeights:
    """Tensor names and shapes of a folder's safetensors, read one tensor at a time with plain
    file reads (see the module docstring for why not ``safe_open``)."""

    def __init__(self, folder: Path):
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise AgiasiError(f"{folder} has no .safetensors weights")
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in files:
            start, header = _read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, start, info)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2]["shape"])

    def get(self, key: str) -> torch.Tensor:
        path, start, info = self._where[key]
        begin, end = info["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled: it is read over
        view = memoryview(raw.numpy())
        with open(path, "rb", buffering=0) as fh:
            fh.seek(start + begin)
            got = 0
            while got < len(view):  # one read returns at most ~2 GiB on Linux
                n = fh.readinto(view[got:])
                if not n:
                    raise AgiasiError(f"{path} is truncated (tensor {key}); fetch the model again")
                got += n
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start, header) of a safetensors file, checked enough to trust the offsets."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            width = torch.tensor([], dtype=_ST_DTYPES[info["dtype"]]).element_size()
            if not 0 <= begin <= end <= size - 8 - n or end - begin != width * math.prod(
                info["shape"]
            ):
                raise ValueError(f"tensor {name} lies outside the file")
    except (OSError, ValueError, KeyError, TypeError, struct.error, RecursionError) as e:
        raise AgiasiError(
            f"could not read the weights in {path} ({e}); an interrupted download?"
        ) from None
    return 8 + n, header


def load_streamed(folder: Path, hf_config: Any, dtype: torch.dtype, device: torch.device):
    """The causal LM of an HF folder built on ``device`` and filled tensor by tensor.

    ``from_pretrained`` reads through ``safe_open`` (whole files mapped: a 7.3 GB bf16 file
    stays resident while a model loads to the GPU); here host memory holds one tensor. Returns
    None when the files do not match the model's keys exactly (then use ``from_pretrained``).
    """
    from transformers import AutoModelForCausalLM

    weights = LazyWeights(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    params = model.state_dict()
    files = set(weights.keys())
    if not files <= set(params) or any(tuple(params[k].shape) != weights.shape(k) for k in files):
        return None
    buffers = set(dict(model.named_buffers()))
    if any(k not in files and k not in buffers and not _tied_head(model, k) for k in params):
        return None
    with torch.no_grad():
        for key in weights.keys():
            params[key].copy_(weights.get(key))
    return model.eval()


def _tied_head(model, key: str) -> bool:
    """The one weight a file may lack besides buffers: a head tied to the input embedding."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return key == HEAD_KEY and head is not None and head.weight is emb.weight


def check_plain(keys) -> None:
    """Refuse weights that still carry LoRA or soul tensors (a state dict or its keys)."""
    bad = [k for k in keys if "lora_" in k or "soul" in k or "so8_rotation" in k]
    bad += [k for k in keys if ".base_layer." in k]
    if bad:
        raise AgiasiError(
            f"the merged model still has {len(bad)} LoRA/soul tensor(s), e.g. {bad[0]}; "
            "merge the adapter and fold the soul before saving"
        )
