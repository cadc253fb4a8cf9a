"""The GGUF writer's per-architecture pieces that need no llama.cpp: vocabulary kinds, the BPE
pre-tokenizer name, Llama-3.1's RoPE factors, and what is refused before any work."""

import json

import pytest
import torch

from agiasi.architectures import ARCHITECTURES, vocabulary_kind
from agiasi.errors import AgiasiError
from agiasi.gguf.arch import GGUF_WRITERS, llama3_rope_factors
from agiasi.gguf.vocab import bpe_pre_tokenizer
from tests.helpers import sample_text


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    from agiasi.testing.tokenizer import build_bpe_tokenizer

    out = {}
    for style in ("llama-bpe", "qwen2"):
        d = tmp_path_factory.mktemp(style)
        build_bpe_tokenizer([sample_text()], d, style=style, vocab_size=400)
        out[style] = d
    return out


def test_pre_tokenizer_is_named_from_the_split_pattern(bpe_dirs):
    for style, d in bpe_dirs.items():
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        assert bpe_pre_tokenizer(tj) == style


def test_unknown_or_non_byte_level_pre_tokenizers_are_refused(bpe_dirs):
    tj = json.loads((bpe_dirs["qwen2"] / "tokenizer.json").read_text(encoding="utf-8"))
    split = tj["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}|", r"\p{N}{1,2}|")
    with pytest.raises(AgiasiError, match="not a pre-tokenizer agiasi can name for llama.cpp"):
        bpe_pre_tokenizer(tj)
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(AgiasiError, match="not a byte-level BPE vocabulary"):
        bpe_pre_tokenizer(tj)
    with pytest.raises(AgiasiError, match="not a byte-level BPE vocabulary"):
        bpe_pre_tokenizer({"model": {"type": "Unigram"}, "pre_tokenizer": None})


def test_vocabulary_kind_follows_the_files(tmp_path, bpe_dirs):
    llama, qwen2 = ARCHITECTURES["llama"], ARCHITECTURES["qwen2"]
    assert vocabulary_kind(llama, bpe_dirs["llama-bpe"]) == "bpe"
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert vocabulary_kind(llama, tmp_path) == "sentencepiece"  # Llama-2 ships both
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(AgiasiError, match=r"no tokenizer.json \(byte-level BPE\)"):
        vocabulary_kind(qwen2, tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(AgiasiError, match="no tokenizer.model or tokenizer.json"):
        vocabulary_kind(llama, tmp_path)


def test_llama3_rope_factors_equal_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = llama3_rope_factors(cfg.to_dict())
    assert factors.shape == (32,)
    # every band is exercised: kept (1), divided by the factor (8) and interpolated between
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert ((factors > 1.0) & (factors < 8.0)).any()
    assert torch.allclose(default / factors.double(), scaled.double(), rtol=1e-6)


@pytest.mark.parametrize(
    "writer, rope",
    [
        ("llama", {"rope_type": "yarn", "factor": 4.0}),
        ("qwen2", {"rope_type": "yarn", "factor": 4.0}),
        ("qwen2", {"rope_type": "llama3", "factor": 8.0}),
    ],
)
def test_rope_types_llama_cpp_would_run_differently_are_refused(writer, rope):
    with pytest.raises(AgiasiError, match=f"RoPE type '{rope['rope_type']}' is not one"):
        GGUF_WRITERS[writer].check({"rope_parameters": rope}, {})


def test_gemma2_refuses_a_head_that_is_not_the_embedding_and_other_query_scales():
    g2 = GGUF_WRITERS["gemma2"]
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "num_hidden_layers": 2}
    emb = torch.randn(10, 64)
    g2.check(cfg, _Weights({"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone()}))
    folded = {"model.embed_tokens.weight": emb, "lm_head.weight": emb * 1.01}
    with pytest.raises(AgiasiError, match="output matrix from the input embedding"):
        g2.check(cfg, _Weights(folded))
    with pytest.raises(AgiasiError, match="query_pre_attn_scalar 24 != head_dim 16"):
        g2.check({**cfg, "query_pre_attn_scalar": 24}, _Weights({}))


class _Weights(dict):
    def get(self, key):  # LazyWeights.get
        return self[key]


def test_every_architecture_finds_its_gguf_writer_and_every_writer_is_used():
    """The two halves of the architecture registry agree: the table's llama.cpp name and the
    writer class's own."""
    from agiasi.architectures import ARCHITECTURES
    from agiasi.gguf.arch import writer_for

    used = set()
    for entry in ARCHITECTURES.values():
        if entry.gguf is None:
            with pytest.raises(AgiasiError, match="no GGUF writer"):
                writer_for(entry)
            continue
        writer = writer_for(entry)
        assert writer.gguf_name == entry.gguf, entry.model_type
        used.add(writer.gguf_name)
    assert used == set(GGUF_WRITERS)
