"""The importance matrix: which input columns of each weight matter, measured on calibration
text, so that llama.cpp's quantizer spends its precision where the activations are.

For a linear layer ``y = x Wᵀ`` the quantizer minimises ``Σ_j a_j (w_ij − q(w_ij))²`` per row
instead of the plain squared error, with ``a_j = (1/N) Σ_t x_tj²`` — the mean square of input
column j over the N calibration tokens that passed through the layer. llama.cpp's
``llama-imatrix`` tool collects exactly these sums (``<tensor>.in_sum2``) and counts
(``<tensor>.counts``) for every ``blk.*`` matrix multiplication of the F16 GGUF; here they come
from the merged + folded HF model (the same weights the GGUF holds, in fp32), one decoder layer
in memory at a time:

1. the text is tokenized once, cut into chunks of ``chunk_size`` tokens, and each chunk's first
   token is replaced by BOS where the tokenizer adds one — as ``llama-imatrix`` does (each chunk
   is its own sequence; the head is not collected, as without ``--process-output``);
2. one pass through the decoder with every layer replaced by a recorder gives each layer's exact
   inputs (the embedded tokens for layer 0, and the masks and position embeddings HF passes to
   each layer), without any layer's weights;
3. layer by layer: its weights are read from the folder, every chunk goes through it with a
   hook on each ``nn.Linear`` adding ``Σ_t x_t²`` (float64) to the tensor's GGUF name, and the
   output becomes the next layer's input; then the weights are freed.

Written as llama.cpp's own ``imatrix.gguf`` (``general.type = imatrix``), so
``llama-quantize --imatrix`` reads it too, and handed to the quantizer as the C array of
``llama_model_imatrix_data`` that llama-cpp-python exposes (means, ending in a null entry).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agiasi.errors import AgiasiError
from agiasi.weights import HEAD_KEY, LazyWeights

DEFAULT_CHUNK = 512  # llama-imatrix's default context
DEFAULT_TOKENS = 512 * 128  # 128 chunks: within the 100–200 the common calibration sets use
# bytes of one layer's activations per group of chunks (the CPU's caches like small groups)
ACTIVATION_BUDGET = {"cuda": 2 * 2**30, "cpu": 512 * 2**20}


@dataclass
class Imatrix:
    """Per GGUF tensor name: the column sums of x² (float64) and how many tokens made them."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK
    chunks: int = 0
    datasets: list[str] = field(default_factory=list)

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer takes: sum / count per column, computed as llama-quantize computes
        it from the file (float32 sums divided in float32), so a file quantized again with
        ``llama-quantize --imatrix imatrix.gguf`` comes out byte-identical."""
        return {
            n: s.astype(np.float32) / np.float32(self.counts[n])
            if self.counts[n]
            else np.ones_like(s, np.float32)
            for n, s in self.sums.items()
        }


def calibration_chunks(tokenizer, text: str, chunk_size: int, max_tokens: int) -> torch.Tensor:
    """``(n_chunks, chunk_size)`` token ids cut as ``llama-imatrix`` cuts them."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and ids[:1] == [bos]
    n = min(len(ids), max_tokens) // chunk_size
    if n < 1 or len(ids) < 2 * chunk_size:
        raise AgiasiError(
            f"the calibration text has {len(ids)} tokens; the importance matrix needs at least "
            f"{2 * chunk_size} (two chunks of {chunk_size}), as llama-imatrix does"
        )
    chunks = torch.tensor(ids[: n * chunk_size], dtype=torch.long).view(n, chunk_size)
    if add_bos:
        chunks[:, 0] = bos
    return chunks


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during the first pass: keeps what the layer is given."""

    def __init__(self, inputs: list):
        super().__init__()
        self.inputs = inputs

    def forward(self, hidden, *args, **kwargs):
        self.inputs.append((hidden, args, kwargs))
        return hidden


def compute_imatrix(
    hf_dir: Path,
    hf_config,
    chunks: torch.Tensor,
    gguf_names: dict[str, str],
    device: torch.device,
    log=None,
) -> Imatrix:
    """Sum x² per input column of every decoder-layer linear layer over ``chunks``.

    ``gguf_names`` maps HF weight keys to GGUF tensor names (the GGUF writer's own map), so the
    result is keyed exactly as llama.cpp names the tensors it quantizes.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    weights = LazyWeights(hf_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.eval()
    decoder = model.get_decoder()
    layers = decoder.layers
    prefix = {m: n for n, m in model.named_modules()}
    layer_keys = [
        [k for k in weights.keys() if k.startswith(prefix[layer] + ".")] for layer in layers
    ]
    in_layers = {k for keys in layer_keys for k in keys}
    for name, buf in list(model.named_buffers()):
        _set(model, name, buf.to(device))
    for key in weights.keys():
        if key not in in_layers and key != HEAD_KEY:
            _set(model, key, weights.get(key).to(device, torch.float32))
    im = Imatrix(chunk_size=chunks.shape[1], chunks=chunks.shape[0])
    with torch.no_grad():
        group = _group_size(hf_config, chunks, ACTIVATION_BUDGET.get(device.type, 2**29))
        groups = _record_inputs(decoder, layers, chunks, device, group)
        for i, layer in enumerate(layers):
            acc: dict[str, torch.Tensor] = {}
            hooks = _collect_into(im, acc, layer, prefix, gguf_names)
            for key in layer_keys[i]:
                _set(model, key, weights.get(key).to(device, torch.float32))
            for g in groups:
                hidden, args, kwargs = g[i]
                out = layer(hidden, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if i + 1 < len(layers):
                    g[i + 1] = (out, *g[i + 1][1:])
                g[i] = None  # this layer's input is no longer needed
            for h in hooks:
                h.remove()
            im.sums.update({n: t.cpu().numpy() for n, t in acc.items()})
            for key in layer_keys[i]:
                _set(model, key, torch.empty(weights.shape(key), device="meta"))
            if log:
                log(f"export: importance matrix, layer {i + 1}/{len(layers)}")
    return im


def _set(model, key: str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, key, value.device, value=value)


def _group_size(hf_config, chunks: torch.Tensor, budget: int) -> int:
    """Chunks per call of a layer: the widest activation (the MLP's up projection, or the
    attention scores) × a few live copies within ``budget`` bytes."""
    t = chunks.shape[1]
    width = max(
        2 * int(getattr(hf_config, "intermediate_size", 0) or 0),
        4 * int(hf_config.hidden_size),
        int(hf_config.num_attention_heads) * t,
    )
    per_chunk = t * width * 4 * 3
    return max(1, min(chunks.shape[0], budget // per_chunk))


def _record_inputs(decoder, layers, chunks, device, group: int) -> list[list]:
    """Per group of chunks, per layer: (hidden or None, args, kwargs) as HF calls the layer."""
    real = list(layers)
    groups = []
    try:
        for start in range(0, chunks.shape[0], group):
            inputs: list = []
            for j in range(len(real)):
                layers[j] = _Recorder(inputs)
            decoder(input_ids=chunks[start : start + group].to(device), use_cache=False)
            hidden0 = inputs[0][0]
            groups.append(
                [(hidden0 if j == 0 else None, a, k) for j, (_, a, k) in enumerate(inputs)]
            )
    finally:
        for j, layer in enumerate(real):
            layers[j] = layer
    return groups


def _collect_into(im: Imatrix, acc: dict, layer, prefix: dict, gguf_names: dict[str, str]):
    """Forward pre-hooks adding Σ x² per input column of each linear layer to ``acc``."""
    hooks = []
    for module in layer.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = gguf_names.get(prefix[module] + ".weight")
        if name is None:
            continue

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            # fp32 within one call (≤ a group of chunks), float64 across calls; kept on the
            # device until the layer is done (no host sync per call)
            s = x.float().pow(2).sum(0).double()
            acc[name] = acc[name] + s if name in acc else s
            im.counts[name] = im.counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_pre_hook(hook))
    return hooks


# ---------------------------------------------------------------- llama.cpp's file and C API


def write_imatrix(path: Path, im: Imatrix) -> Path:
    """``imatrix.gguf`` in llama.cpp's layout (what ``llama-imatrix`` writes), atomically."""
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # an imatrix file names no architecture
    w.add_string("general.type", "imatrix")
    # llama-quantize refuses a matrix without all three keys ("missing imatrix metadata"), and
    # gguf-py drops an empty array: an unnamed source is named so
    w.add_array("imatrix.datasets", list(im.datasets) or ["(unnamed)"])
    w.add_uint32("imatrix.chunk_count", im.chunks)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.sums):
        w.add_tensor(f"{name}.in_sum2", im.sums[name].astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(im.counts[name])]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def read_imatrix(path: Path) -> Imatrix:
    """An ``imatrix.gguf`` (ours or ``llama-imatrix``'s); one clear line if it is not one."""
    import gguf

    from agiasi.gguf.header import check_gguf_header

    check_gguf_header(path, "importance matrix")
    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise AgiasiError(f"{path} is not a GGUF importance matrix: {e}") from None
    kind = r.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise AgiasiError(f"{path} is not an importance matrix (general.type is not 'imatrix')")
    im = Imatrix(
        chunk_size=int(r.fields["imatrix.chunk_size"].contents()),
        chunks=int(r.fields["imatrix.chunk_count"].contents()),
        datasets=list(r.fields["imatrix.datasets"].contents())
        if "imatrix.datasets" in r.fields
        else [],
    )
    for t in r.tensors:
        data = np.asarray(t.data, np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            _check_values(path, t.name, data, "sums of squared activations")
            im.sums[t.name[: -len(".in_sum2")]] = data.astype(np.float64)
        elif t.name.endswith(".counts"):
            _check_values(path, t.name, data, "counts")
            im.counts[t.name[: -len(".counts")]] = int(round(float(data.sum())))
    if set(im.sums) != set(im.counts) or not im.sums:
        raise AgiasiError(f"{path}: the importance matrix has unmatched or no sums and counts")
    return im


def _check_values(path: Path, name: str, data: np.ndarray, what: str) -> None:
    """Sums of squares and counts are finite and never negative: a matrix that says otherwise
    (damaged, or made from a diverged model) would steer the quantizer to nonsense while the
    export reports success (a Q4_K_M at perplexity 61,623 instead of 42.8)."""
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise AgiasiError(
            f"{path}: {name} holds {float(data[i])} at entry {i}; an importance matrix's {what} are "
            "finite and never negative (a damaged file, or one made from a diverged model)"
        )


def check_matches(im: Imatrix, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse an importance matrix made for another model: every name it holds must be a
    matrix of the model with that many input columns, and it must cover the model's layers."""
    wrong = [n for n in im.sums if n not in shapes]
    if wrong:
        raise AgiasiError(
            f"{where} is an importance matrix for another model: it has {wrong[0]!r}, which this "
            "model does not have"
        )
    for n, s in im.sums.items():
        if s.shape[0] != shapes[n][-1]:
            raise AgiasiError(
                f"{where} is an importance matrix for another model: {n} has {s.shape[0]} "
                f"columns there and {shapes[n][-1]} here"
            )
    # every decoder matrix (what llama-imatrix collects): a partial matrix would leave some
    # tensors quantized without it, and the IQ types refuse that halfway through the export
    want = [n for n, shape in shapes.items() if n.startswith("blk.") and len(shape) == 2]
    missing = [n for n in want if n not in im.sums]
    if missing:
        raise AgiasiError(
            f"{where} covers {len(want) - len(missing)} of this model's {len(want)} decoder "
            f"matrices (no {missing[0]}): made for another model, or from a partial run"
        )


class QuantizerImatrix:
    """The means as the ``llama_model_imatrix_data`` array ``llama_model_quantize`` takes,
    ending in a null entry; keeps the buffers alive as long as the object lives."""

    def __init__(self, im: Imatrix, file_name: str = "imatrix.gguf"):
        import llama_cpp

        self.file_name = file_name
        self.dataset = im.datasets[0] if im.datasets else ""
        self.chunks = im.chunks
        means = im.means()
        self._keep = [(n.encode(), np.ascontiguousarray(v, np.float32)) for n, v in means.items()]
        Entry = llama_cpp.llama_model_imatrix_data
        self.array = (Entry * (len(self._keep) + 1))()
        for i, (name, v) in enumerate(self._keep):
            self.array[i].name = name
            self.array[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self.array[i].size = v.size
        self.array[len(self._keep)].name = None
        self.n_entries = len(self._keep)

    def pointer(self):
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def gguf_names(cfg: dict, keys) -> dict[str, str]:
    """HF weight key → GGUF tensor name, through the GGUF writer's own map."""
    from agiasi.architectures import gguf_architecture
    from agiasi.gguf.arch import tensor_name_map, writer_for

    arch = writer_for(gguf_architecture(cfg.get("model_type", "")))
    name_map = tensor_name_map(arch, cfg)
    names = {}
    for k in keys:
        if k != HEAD_KEY and not arch.skip(
            k
        ):  # the head is not collected (llama-imatrix's default)
            name = name_map.get_name(k, try_suffixes=(".weight", ".bias"))
            if name is not None:
                names[k] = name
    return names
