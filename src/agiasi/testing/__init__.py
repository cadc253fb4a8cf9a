"""Tiny models and tokenizers built on the spot for tests, benchmarks and scripts (no hub), and
the studio server as a subprocess for the browser tests and its benchmark; not used by any
command.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    studio: StudioProcess free_port
    tokenizer: PHI3_CHAT_TEMPLATE build_bpe_tokenizer build_phi3_tokenizer
    zoo: JA_TEXTS ZOO ZOO_MODEL_TYPE build_tiny_arch
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
