"""Build a Phi-3-style sentencepiece tokenizer (for the shipped tiny model and for tests).

sentencepiece trains the model; transformers converts it to its tokenizer (needs protobuf).
What we add by hand is only Phi-3's conventions: its special tokens as user-defined pieces (so
they live inside ``tokenizer.model`` with fixed ids, which llama.cpp's Phi-3 vocabulary reads),
byte fallback, no BOS, ``<|endoftext|>`` as EOS/pad, and Phi-3.5's chat template.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_phi3_tokenizer(
    text_files: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 1000,
    character_coverage: float = 0.98,
    max_sentences: int = 200_000,
):
    """Train a unigram sentencepiece model on ``text_files`` and save an HF tokenizer folder
    (``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``) in ``out_dir``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in text_files),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            byte_fallback=True,
            character_coverage=character_coverage,
            user_defined_symbols=PHI3_SPECIALS,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
        shutil.copy(f"{prefix}.model", out / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": PHI3_SPECIALS[1:]})
    tok.save_pretrained(str(out))  # writes tokenizer.json; tokenizer.model stays
    return tok
