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
    file reads (see the module docstring for why not ``safe_open``).

    Which files make the model is decided as transformers decides it: the index
    (``model.safetensors.index.json``) when there is one — only its files, each tensor from the
    file it names — else ``model.safetensors``, else the folder's one ``.safetensors`` file. A
    stray file beside the shards (an old download) is never read, and a tensor held by two of
    the model's files is refused rather than taken from whichever comes last.
    """

    def __init__(self, folder: Path):
        folder = Path(folder)
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        self._headers: dict[str, tuple[int, str]] = {}  # file → (size, sha256 of its header)
        weight_map = _index_map(folder)
        files = model_weight_files(folder, weight_map)
        seen: dict[str, str] = {}
        for f in files:
            start, header, digest = _read_header(f)
            self._headers[f.name] = (f.stat().st_size, digest)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in seen:
                    raise AgiasiError(
                        f"{folder}: tensor {name} is in both {seen[name]} and {f.name}; which one "
                        "the model uses would depend on the load order. Remove the stale file"
                    )
                seen[name] = f.name
                if weight_map is None or weight_map.get(name) == f.name:
                    self._where[name] = (f, start, info)
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if n not in self._where]
            if missing:
                raise AgiasiError(
                    f"{folder / INDEX} puts {missing[0]} in {weight_map[missing[0]]}, which does "
                    "not hold it; an interrupted download?"
                )

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """The model's weight files: size and header hash each (what a checkpoint records of its
        base, so that a base that changed since training is noticed)."""
        return {
            n: {"size": size, "header_sha256": h} for n, (size, h) in sorted(self._headers.items())
        }

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


def base_fingerprint(base_id: str) -> dict[str, dict[str, Any]] | None:
    """:meth:`LazyWeights.fingerprint` of a base model given as a folder or a hub id already in
    the local cache; None where its files are not on this machine."""
    folder = Path(base_id).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base_id, local_files_only=True))
        except Exception:  # not cached, no hub library, not an id: nothing to record
            return None
    try:
        return LazyWeights(folder).fingerprint()
    except AgiasiError:
        return None


def _index_map(folder: Path) -> dict[str, str] | None:
    """The index's tensor → file map, checked (file names stay inside the folder)."""
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("no weight_map")
        for name, fname in weight_map.items():
            if not isinstance(name, str) or not isinstance(fname, str):
                raise ValueError("names must be strings")
            if Path(fname).name != fname or fname in (".", ".."):
                raise ValueError(f"{fname!r} is not a file name in the folder")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise AgiasiError(f"{path} is not a usable weight index ({e})") from None
    return weight_map


def model_weight_files(folder: Path, weight_map: dict[str, str] | None = None) -> list[Path]:
    """The safetensors files that make the model (see :class:`LazyWeights`)."""
    folder = Path(folder)
    if weight_map is None:
        weight_map = _index_map(folder)
    if weight_map is not None:
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise AgiasiError(f"{folder / INDEX} names {missing[0]}, which is not in {folder}")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AgiasiError(f"{folder} has no .safetensors weights")
    if len(files) > 1:
        raise AgiasiError(
            f"{folder} has {len(files)} .safetensors files ({', '.join(f.name for f in files[:3])}"
            f"…) but no {INDEX} saying which make the model"
        )
    return files


def _read_header(path: Path) -> tuple[int, dict[str, Any], str]:
    """(data start, header, sha256 of the header bytes) of a safetensors file, checked enough
    to trust the offsets."""
    import hashlib

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("header length out of range")
            raw = fh.read(n)
            header = json.loads(raw)
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
    return 8 + n, header, hashlib.sha256(raw).hexdigest()


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
