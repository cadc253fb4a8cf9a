"""Stage 2 of an export (:mod:`agiasi.export.run`): the HF folder, with the streamed GGUFs.

The merged, folded weights go from the base's safetensors into HF shards tensor by tensor
(:mod:`agiasi.export.merge`, :mod:`agiasi.weights`), and each tensor on its way also into every GGUF
that gguf-py writes (:class:`agiasi.gguf.writer.GGUFStream`), so memory holds about two tensors and
no GGUF reads the folder back.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from agiasi._faults import maybe_crash
from agiasi.export.config import ExportPlan
from agiasi.export.files import exported_config, read_json
from agiasi.export.merge import merged_tensors


def write_hf_folder(plan: ExportPlan, hf_dir: Path, folder: Path, log) -> tuple:
    """Config, tokenizer (+ ``tokenizer.model``), generation config, then the merged weights in
    one stream: each tensor goes into the HF shards and, on the same pass, into every GGUF that
    gguf-py writes (:func:`agiasi.export.quant.streamed_types`; F16 when K-quants or llama.cpp's
    Q8_0 follow), so no GGUF reads the folder back.

    Returns the tokenizer (the Modelfile and the measure use it) and the GGUFs written.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from agiasi.export.quant import streamed_types
    from agiasi.gguf.writer import GGUFStream
    from agiasi.weights import write_sharded

    start = time.perf_counter()
    hf_dir.mkdir()
    new_cfg = exported_config(plan.hf_config, plan.dtype)
    new_cfg.save_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(plan.base_dir))
    tok.save_pretrained(str(hf_dir))
    for extra in ("tokenizer.model", "generation_config.json", "added_tokens.json"):
        if (plan.base_dir / extra).is_file() and not (hf_dir / extra).exists():
            shutil.copy(plan.base_dir / extra, hf_dir / extra)
    if not (hf_dir / "generation_config.json").exists():
        GenerationConfig.from_model_config(new_cfg).save_pretrained(str(hf_dir))
    types = streamed_types(plan.types)
    cfg_json = read_json(hf_dir / "config.json")
    streams: dict[str, GGUFStream] = {}
    try:
        for t in types:
            streams[t] = GGUFStream(
                folder / f"{plan.stem}-{t}.gguf",
                hf_dir,
                cfg_json,
                plan.shapes,
                t,
                plan.cfg.output_tensor_type,
            )
        log(
            f"export: merging ({plan.cfg.merge_base} base) and folding into "
            f"{hf_dir.parent.name}, {str(plan.dtype).removeprefix('torch.')}, "
            f"{len(plan.shapes)} tensors"
            + (f"; GGUF {', '.join(types)} on the same pass" if types else "")
        )
        with _heap_kept(), _cores_shared(), _Teed(streams) as teed:
            write_sharded(hf_dir, plan.shapes, teed(merged_tensors(plan.merge)), plan.dtype)
        maybe_crash("export_hf_written")
        ggufs = {t: s.finish() for t, s in streams.items()}
    except BaseException:
        for s in streams.values():
            s.abort()
        raise
    size = sum(f.stat().st_size for f in hf_dir.iterdir())
    log(f"export: HF folder written ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    for g in ggufs.values():
        maybe_crash("export_gguf_written")
        log(f"export: {g.name}")
    return tok, ggufs


@contextmanager
def _heap_kept():
    """glibc returns a freed block above its trim threshold to the kernel at once, and maps
    blocks above the mmap threshold afresh: every tensor of the stream (read, converted,
    quantized, each a fresh buffer of the same few sizes) then page-faults its memory in again —
    3 of a 0.4 B model's 7.4 s of system time on 2 cores, 2.5 s of its 18 s (bench/RESULTS.md).
    While the stream runs, freed memory is kept for the next tensor (32 MiB, glibc's largest
    mmap threshold; no trimming); afterwards the defaults return and the heap is trimmed."""
    from agiasi.model.loading import glibc

    libc = glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    try:
        yield
    finally:
        libc.mallopt(m_trim_threshold, 128 * 2**10)  # glibc's defaults
        libc.mallopt(m_mmap_threshold, 128 * 2**10)
        libc.malloc_trim(0)


@contextmanager
def _cores_shared():
    """While the stream runs, two threads compute on the CPU at once — the merge worker (NF4
    round trip, LoRA, fold) and the GGUF streams (F16 and Q8_0 conversion) — and each of
    torch's operations would start its own team of all the cores' threads: on 2 cores, threads
    spinning and waking each other (a 0.4 B model's export took 11.5–12.1 s that way against
    9.8–11.3 s, bench/RESULTS.md). Each gets half the cores instead.
    Where there is a GPU the merge's heavy parts run there, and the writer keeps every core."""
    n = torch.get_num_threads()
    if torch.cuda.is_available() or n < 2:  # a CUDA merge, and the NF4 round trip, go to it
        yield
        return
    torch.set_num_threads(max(1, n // 2))
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Teed:
    """Passes tensors on unchanged, each also handed to every GGUF stream on its way.

    Each stream converts and writes on its own thread while the caller writes the same tensor
    into the HF shard and the merge worker prepares the next: copying bytes into the page cache
    is CPU work in the writing thread, and the three files' writes one after another on one
    thread were the stream's bottleneck (5.6 of a 0.4 B model's 9.5 s on 2 cores,
    bench/RESULTS.md). A stream's writes finish before it gets the next tensor (GGUF order),
    so at most one tensor is in flight per stream: the tensor is alive then anyway. Leaving the
    ``with`` waits for the last tensor's writes (the consumer stops pulling at the last tensor,
    so the generator alone would never get there) and raises the first error of any."""

    def __init__(self, streams: dict):
        self.streams = streams
        self.pending: list = []
        self.pool = None

    def __enter__(self) -> _Teed:
        if self.streams:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(len(self.streams), thread_name_prefix="agiasi-gguf")
        return self

    def __call__(self, tensors):
        for name, t in tensors:
            self.wait()
            if self.pool is not None:
                self.pending = [self.pool.submit(s.add, name, t) for s in self.streams.values()]
            yield name, t

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            if self.pool is not None:  # before any abort closes the files
                self.pool.shutdown(wait=True, cancel_futures=True)
