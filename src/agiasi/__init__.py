"""agiasi: inject a trainable SO(8) soul in front of an LLM's head, train with QLoRA, export."""

import logging as _logging

# bitsandbytes' CPU backend tries an optional hub kernel on import and logs a warning without
# it; NF4 still runs on bitsandbytes' own kernels, so the warning only confuses users.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from agiasi.errors import AgiasiError  # noqa: E402
from agiasi.process import gc_paused  # noqa: E402

with gc_paused():  # the soul imports torch: not scanned while it loads (no freeze: a
    # library import must not pin its host program's garbage; the console entry freezes)
    from agiasi.soul import PHI, Soul, SoulConfig, fold_into, phase_status  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # The wrapper pulls in transformers and peft: import it lazily so `agiasi --help` is fast.
    if name == "AGIASI_SO8T_Wrapper":
        from agiasi.model import wrapper as model

        return model.AGIASI_SO8T_Wrapper
    if name == "ModelConfig":
        from agiasi.model import config as model_config

        return model_config.ModelConfig
    raise AttributeError(f"module 'agiasi' has no attribute {name!r}")


__all__ = [
    "AGIASI_SO8T_Wrapper",
    "AgiasiError",
    "ModelConfig",
    "PHI",
    "Soul",
    "SoulConfig",
    "fold_into",
    "phase_status",
]
