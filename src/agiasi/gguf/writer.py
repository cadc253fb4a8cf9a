"""GGUF files through the ``gguf`` library: from a plain HF folder, or while its tensors stream.

The file format, the tensor-name table (``gguf.get_tensor_name_map``), the quantizers for
Q8_0/BF16 (``gguf.quants``) and the special-token reader (``gguf.SpecialVocab``) are the
library's; what each llama.cpp architecture adds is :mod:`agiasi.gguf.arch`. K-quants (Q4_K_M,
Q5_K_M, Q6_K) and, when it is installed, Q8_0 come from ``llama_cpp.llama_model_quantize``
(:mod:`agiasi.gguf.quantize`); nothing is built or downloaded.

:class:`GGUFStream` writes the header from the tensor *shapes* and then takes each tensor as it
is produced, so the export writes its F16 GGUF from the merged tensors on their way into the HF
shards instead of reading the written folder back (a 3.8 B model: 7 GiB less to read and
convert). :func:`write_gguf` is the same writer fed from a folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError
from agiasi.gguf.arch import (
    GGUFArch,
    rope_theta_of,
    tensor_name_map,
    writer_for,
)
from agiasi.gguf.file_types import DIRECT_TYPES
from agiasi.weights import EMBED_KEY, HEAD_KEY, check_plain


class GGUFStream:
    """One GGUF file whose tensors arrive one at a time, in the order of ``shapes``.

    The header (metadata, vocabulary, tensor infos) is written on construction, from the config,
    the tokenizer files in ``hf_dir`` and ``shapes`` (HF name → shape, the order the tensors will
    come in; the head, if any, last). :meth:`add` takes every HF tensor — names the
    architecture skips are dropped — and :meth:`finish` appends the extra tensors (RoPE factors)
    and moves the file into place. Until then it is a dot-named temporary file that
    :meth:`abort` removes. Checks that need tensor values (Gemma's head) are the caller's: the
    export makes them on the base model before the merge.
    """

    def __init__(
        self,
        out_path: Path,
        hf_dir: Path,
        cfg: dict,
        shapes: dict[str, tuple[int, ...]],
        gguf_type: str,
        output_tensor_type: str | None = None,
    ):
        import gguf

        from agiasi.architectures import vocabulary_kind

        if gguf_type not in DIRECT_TYPES:
            raise AgiasiError(
                f"write_gguf writes {', '.join(DIRECT_TYPES)}; {gguf_type} needs quantize_gguf"
            )
        check_plain(shapes)
        entry, self.arch = _writer(cfg)
        self.cfg, self.out_path = cfg, Path(out_path)
        self.tmp = self.out_path.with_name(f".{self.out_path.name}.tmp")
        self.extra = self.arch.extra_tensors(cfg)
        self._w = gguf.GGUFWriter(str(self.tmp), self.arch.gguf_name)
        try:
            _common_parameters(self._w, cfg, hf_dir, gguf_type)
            self.arch.parameters(self._w, cfg)
            self.arch.vocabulary(
                self._w, hf_dir, int(cfg["vocab_size"]), vocabulary_kind(entry, hf_dir)
            )
            self.plan = _tensor_plan(
                self._w, self.arch, cfg, shapes, self.extra, gguf_type, output_tensor_type
            )
            self._w.write_header_to_file()
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
        except BaseException:
            self.abort()
            raise
        self._next = 0

    def takes(self, hf_name: str) -> bool:
        """Whether the file holds this HF tensor (the architecture may have no place for it)."""
        return not (self.arch.skip(hf_name) or hf_name.endswith("rotary_emb.inv_freq"))

    def add(self, hf_name: str, t: torch.Tensor) -> None:
        """The tensor ``hf_name`` (the head: the head's value, tied or not); others are dropped."""
        if not self.takes(hf_name):
            return
        want, _, ttype = self.plan[self._next] if self._next < len(self.plan) else (None,) * 3
        if hf_name != want:
            raise AgiasiError(f"internal: GGUF stream expected {want}, got {hf_name}")
        data = self.arch.transform(hf_name, t.detach(), self.cfg)
        self._w.write_tensor_data(_tensor_bytes(data, ttype))
        self._next += 1

    def finish(self) -> Path:
        for hf_name, t in self.extra.items():
            self.add(hf_name, t)
        if self._next != len(self.plan):
            self.abort()
            raise AgiasiError(
                f"internal: GGUF stream ended at {self._next} of {len(self.plan)} tensors"
            )
        self._w.close()
        os.replace(self.tmp, self.out_path)
        return self.out_path

    def abort(self) -> None:
        self._w.close()
        self.tmp.unlink(missing_ok=True)


def write_gguf(
    hf_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    gguf_type: str = "f16",
    output_tensor_type: str | None = None,
) -> Path:
    """Write ``out_path`` (F32/F16/BF16/Q8_0) from a plain HF folder (no agiasi keys).

    Memory holds one tensor at a time (a 3.8 B model in F32 is 15 GB): the header comes from the
    shapes, the data streams.
    """
    from agiasi.weights import LazyWeights

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    sd = LazyWeights(hf_dir)
    _writer(cfg)[1].check(cfg, sd)
    shapes = {k: sd.shape(k) for k in sd.keys() if k != HEAD_KEY}
    head_source = HEAD_KEY if HEAD_KEY in sd else None
    if head_source is None and cfg.get("tie_word_embeddings", False) and EMBED_KEY in sd:
        head_source = EMBED_KEY
    if head_source is not None:
        shapes[HEAD_KEY] = sd.shape(head_source)
    stream = GGUFStream(Path(out_path), hf_dir, cfg, shapes, gguf_type, output_tensor_type)
    try:
        for name in shapes:
            if stream.takes(name):
                stream.add(name, sd.get(head_source if name == HEAD_KEY else name))
        return stream.finish()
    except BaseException:
        stream.abort()
        raise


def _writer(cfg: dict) -> tuple[Any, GGUFArch]:
    """The architecture entry of a config and its GGUF writer."""
    from agiasi.architectures import gguf_architecture

    entry = gguf_architecture(cfg.get("model_type", ""))
    return entry, writer_for(entry)


def _common_parameters(w, cfg: dict, hf_dir: Path, gguf_type: str) -> None:
    import gguf

    name = cfg.get("_name_or_path") or hf_dir.name
    w.add_name(str(Path(str(name)).name))
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    n_head = int(cfg["num_attention_heads"])
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(rope_theta_of(cfg))
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )


def _tensor_plan(
    w, arch: GGUFArch, cfg, shapes, extra, gguf_type: str, output_tensor_type: str | None
) -> list:
    """Tensor infos into the header; returns ``(hf name, GGUF name, GGML type)`` in order."""
    import gguf

    if HEAD_KEY not in shapes:
        raise AgiasiError("the HF folder has no lm_head.weight and does not tie embeddings")
    name_map = tensor_name_map(arch, cfg)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    sources = [k for k in shapes if not k.endswith("rotary_emb.inv_freq") and k != HEAD_KEY]
    plan = []
    for hf_name in [*sources, HEAD_KEY, *extra]:
        if arch.skip(hf_name):
            continue
        if hf_name in extra:
            gname, shape = hf_name, tuple(extra[hf_name].shape)
        else:
            gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise AgiasiError(f"no GGUF name for tensor {hf_name!r} ({cfg['model_type']})")
            shape = tuple(shapes[hf_name])
        want = output_tensor_type if gname == "output.weight" and output_tensor_type else gguf_type
        if len(shape) <= 1 or gname.startswith("rope_"):
            ttype = gguf.GGMLQuantizationType.F32
        elif want == "q8_0" and shape[-1] % 32 != 0:
            ttype = gguf.GGMLQuantizationType.F16
        else:
            ttype = qtype[want]
        if ttype == gguf.GGMLQuantizationType.F32:
            dtype, nbytes = np.float32, 4 * math.prod(shape)
        elif ttype == gguf.GGMLQuantizationType.F16:
            dtype, nbytes = np.float16, 2 * math.prod(shape)
        else:  # quantized: the writer takes the byte shape and derives the element shape
            shape = gguf.quants.quant_shape_to_byte_shape(shape, ttype)
            dtype, nbytes = np.uint8, math.prod(shape)
        w.add_tensor_info(gname, shape, np.dtype(dtype), nbytes, raw_dtype=ttype)
        plan.append((hf_name, gname, ttype))
    return plan


def _tensor_bytes(t: torch.Tensor, ttype) -> np.ndarray:
    """F32/F16 converted by torch (multithreaded, the same IEEE rounding as numpy's astype, which
    took 20 s on one core for a 3.8 B model); Q8_0 by :func:`q8_0_bytes` (torch, the same bytes
    as gguf-py's); other types quantized by gguf-py."""
    import gguf

    if ttype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if ttype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if ttype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % Q8_0_BLOCK == 0:
        return q8_0_bytes(t)
    return gguf.quants.quantize(t.to(torch.float32).numpy(), ttype)


Q8_0_BLOCK = 32


def q8_0_bytes(t: torch.Tensor) -> np.ndarray:
    """ggml's Q8_0 of ``t`` (blocks of 32 along the last axis: an fp16 scale ``d = max|x| / 127``
    and 32 int8 ``roundf(x / d)``), the same bytes as gguf-py's ``quants.Q8_0`` — itself
    bit-exact with ggml-quants.c's reference — written as the same float32 operations in torch.

    Why not gguf-py's: numpy runs it on one core (a 3.8 B model's Q8_0 took longer than the
    whole merge); llama.cpp's quantizer would need the F16 file written and read back first.
    Chunks of 8,192 blocks keep the elementwise passes in the CPU's cache (7× faster than
    whole-tensor passes on a 49 M-value embedding, and no tensor-sized temporaries), and the
    passes are few: rounding half away from zero is the int8 cast's truncation plus the
    truncated doubled remainder (±1 exactly where |remainder| ≥ ½, with no ``x + 0.5`` that
    rounds 0.49999997 up): 0.6× the time of gguf-py's formula written pass for pass in torch,
    on one thread or two. tests/unit/gguf/test_q8_0.py checks byte equality, rounding ties and
    zero blocks included."""
    x = t.reshape(-1, Q8_0_BLOCK)
    out = np.empty((x.shape[0], 2 + Q8_0_BLOCK), dtype=np.uint8)
    dst = torch.from_numpy(out)
    step = 8192
    for b0 in range(0, x.shape[0], step):
        c = x[b0 : b0 + step].to(torch.float32)  # may be ``t`` itself: not written to
        d = c.abs().amax(dim=1, keepdim=True).div_(127)  # aminmax(dim=1): 6× slower
        v = c * torch.where(d == 0, 0.0, 1 / d)
        whole = v.to(torch.int8)  # toward zero; |v| <= 127
        # ±1 where the remainder is ≥ ½; ``whole`` cast first: a float - int8 operation runs
        # torch's unvectorized type-promoting loop, 8× slower than the cast and a float one
        half_up = v.sub_(whole.to(torch.float32)).mul_(2).to(torch.int8)
        dst[b0 : b0 + step, :2] = d.to(torch.float16).view(torch.uint8)
        dst[b0 : b0 + step, 2:] = whole.add_(half_up).view(torch.uint8)
    return out.reshape(*t.shape[:-1], -1)
