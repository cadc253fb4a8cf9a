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

# The Llama-3 / Qwen2 split patterns live with the GGUF vocabulary code, which must name them for
# llama.cpp; the test tokenizers of those families are built from the same patterns.
from agiasi.gguf.vocab import BPE_SPLIT_PATTERNS

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
    normalization: str = "nmt_nfkc",
    style: str = "phi3",
    model_type: str = "unigram",
):
    """Train a unigram sentencepiece model on ``text_files`` and save an HF tokenizer folder
    (``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``) in ``out_dir``.

    ``normalization="identity"`` is what Llama-2, Phi-3 and Gemma ship: llama.cpp applies no
    sentencepiece normalization, so only an identity vocabulary tokenizes NFKC-sensitive text
    (half-width katakana, full-width digits) the same in llama.cpp as in HF. ``style="gemma"``
    makes Gemma's conventions instead of Phi-3's: no space prepended to the text (llama.cpp's
    gemma vocabularies are read without one), BOS added, ``GemmaTokenizer``. ``model_type="bpe"``
    is the kind of sentencepiece model Llama-2, Mistral and Gemma ship."""
    if style not in ("phi3", "gemma"):
        raise ValueError("style must be phi3 or gemma")
    gemma = style == "gemma"
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
            model_type=model_type,
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
            normalization_rule_name=normalization,
            add_dummy_prefix=not gemma,
        )
        shutil.copy(f"{prefix}.model", out / "tokenizer.model")
    config = _spm_tokenizer_config(gemma)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": PHI3_SPECIALS[1:]})
    tok.save_pretrained(str(out))  # writes tokenizer.json; tokenizer.model stays
    return tok


def _spm_tokenizer_config(gemma: bool) -> dict:
    """Phi-3's tokenizer_config.json conventions (no BOS added), or Gemma's (BOS added,
    ``<|end|>`` as EOS)."""
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
    if gemma:
        config.update(tokenizer_class="GemmaTokenizer", add_bos_token=True, eos_token="<|end|>")
    return config


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_bpe_tokenizer(
    text_files: Sequence[str | Path],
    out_dir: str | Path,
    style: str = "llama-bpe",
    vocab_size: int = 1000,
):
    """Train a byte-level BPE tokenizer shaped like Llama-3's (``style="llama-bpe"``: BOS added,
    merges ignored for whole-word matches) or Qwen2's (``"qwen2"``: NFC, no BOS) and save it as an
    HF folder with ``tokenizer.json`` only, as those models ship (no ``tokenizer.model``).

    The ``tokenizers`` library trains it; what is written here by hand is only each family's
    conventions (special tokens at the end of the vocabulary, BOS rule, chat template).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if style not in BPE_SPLIT_PATTERNS:
        raise ValueError(f"style must be one of {', '.join(BPE_SPLIT_PATTERNS)}")
    llama3 = style == "llama-bpe"
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    if not llama3:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERNS[style]), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in text_files], trainer)
    names, template = _add_family_specials(tok, llama3)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **names)
    fast.chat_template = template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def _add_family_specials(tok, llama3: bool) -> tuple[dict, str]:
    """Each family's specials go at the end of the vocabulary, as both ship them; Llama-3 adds BOS
    through the post-processor (so ``add_special_tokens`` means what it means there), Qwen2 adds
    none. Returns the tokenizer's special-token names and the chat template."""
    from tokenizers import processors

    specials = LLAMA3_SPECIALS if llama3 else QWEN2_SPECIALS
    tok.add_special_tokens(specials)
    if not llama3:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, QWEN2_CHAT_TEMPLATE
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    names = {"bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
    return names, LLAMA3_CHAT_TEMPLATE
