"""Process-wide settings, in one place: :func:`configure_process`, called by the CLI at start
and by :func:`agiasi.train.loop.train` (it is idempotent, and a value the user set is kept).

Environment switches agiasi reads (all optional; documented in docs/DESIGN.md):

=========================  ==============================================================
``PYTORCH_CUDA_ALLOC_CONF`` set to ``expandable_segments:True`` unless the user set it
``AGIASI_CUDNN_SDPA=1``     keep cuDNN's attention on CUDA (off by default under DDP)
``AGIASI_CPU_AFFINITY=1``   pin each local rank of a distributed run to its own CPU block
``AGIASI_LLAMA_LOG=1``      show llama.cpp's own log lines (silenced by default)
``AGIASI_MEMLOG=1``         add peak RSS to the export's progress lines (benchmarks)
``AGIASI_FAULT=point:n``    SIGKILL at a named point (the reliability tests' crash injection)
``TORCHINDUCTOR_CACHE_DIR`` one per ``ATEN_CPU_CAPABILITY`` value when that is set (below)
=========================  ==============================================================

Process-wide state outside this module, on purpose: ``loading._WARNED`` (each warning once a
process: a thousand-step run must not repeat one a step) and ``quantize._LOG_CALLBACK`` (the
ctypes callback that silences llama.cpp; llama.cpp keeps the raw pointer, so Python must keep
the object alive for the life of the process). Nothing else holds state between calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from agiasi.errors import AgiasiError


def configure_process(training: bool = False) -> None:
    """Settings that must be in place before CUDA initialises or training starts."""
    # Fewer reserved-but-unused bytes in PyTorch's CUDA allocator: on a 12 GB card that headroom
    # is the difference between fitting and not. Read at the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # torch.compile's on-disk cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: a
    # kernel compiled on an AVX512 run, reused by a run forced to AVX2 kernels on the same
    # machine, returned values of 1e37 (measured, torch 2.13; tests/unit/model/test_nf4.py caught
    # it). Each forced capability gets its own cache.
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import getpass
        import tempfile

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a container's uid without a passwd entry
            user = str(os.getpid())
        name = f"torchinductor_{user}_{cap}"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), name)
    if not training:
        return
    import torch

    # On H100/H200 PyTorch prefers cuDNN's attention, which spends 2-3 ms of host time a call
    # (torch.profiler, bench/RESULTS.md). Alone a GPU hides that (one GPU ran as fast either
    # way, so a lone process keeps PyTorch's choice, the one bench/train.py measures); under
    # DDP each rank's micro-batch took 0.27-0.29 s against 0.24-0.26 s alone, and 2 GPUs gave
    # 1.58-1.70x one. With flash attention (same math) the ranks run as fast as a lone GPU:
    # 1.93-2.01x. torchrun sets WORLD_SIZE before this runs. AGIASI_CUDNN_SDPA=1 keeps cuDNN.

    distributed = env_count("WORLD_SIZE", 1, least=1) > 1
    if distributed and torch.cuda.is_available() and os.environ.get("AGIASI_CUDNN_SDPA") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


def env_count(name: str, default: int, least: int = 0) -> int:
    """A count the launcher (torchrun, accelerate) puts in the environment: ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``. Unset means ``default``; a value that is not a whole
    number ≥ ``least`` is refused by name (it would otherwise surface as int()'s traceback)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise AgiasiError(
            f"{name}={raw!r} in the environment is not a whole number >= {least}; launchers "
            f"such as torchrun set it: unset it to run one process"
        )
    return value


@contextmanager
def gc_paused(freeze: bool = False) -> Iterator[None]:
    """Python's cyclic collector off for a bounded piece of work, back as it was after.

    Why: importing torch, transformers and bitsandbytes creates about a million objects, and
    the collector's passes over them while the imports run cost ~1.3 s of a 0.4 B model's CPU
    export (1.8 s counted by ``gc.callbacks``, bench/RESULTS.md); the streamed work after them
    makes no garbage cycles worth finding. Memory is not held by it: tensors are freed by
    reference counting, and the explicit ``gc.collect()`` of
    :func:`agiasi.model.loading.release_memory` still runs. Not for open-ended work (training
    has its own schedule in ``agiasi.train.loop``; the studio server keeps the collector).

    ``freeze``: what is alive at the end moves to the collector's permanent generation
    (``gc.freeze``), so the first pass after the pause and the full pass at interpreter exit do
    not scan it again (0.2 s and 0.4 s). For imported modules, which live as long as the
    process, and for a command's last work before the process ends: a garbage cycle frozen
    there is never collected."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if freeze:
                gc.freeze()
            gc.enable()
