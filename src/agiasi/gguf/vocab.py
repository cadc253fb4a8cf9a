"""The tokenizer half of a GGUF: a sentencepiece vocabulary from ``tokenizer.model``, a byte-level
BPE one from ``tokenizer.json`` (with the pre-tokenizer llama.cpp must use, named from the split
pattern), and the specials, chat template, BOS/EOS and space-prefix settings read from the HF
tokenizer's own behaviour, so that llama.cpp tokenizes exactly as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

from agiasi.errors import AgiasiError


def _sentencepiece_vocab(hf_dir: Path, vocab_size: int):
    """tokens/scores/types from tokenizer.model, plus added tokens (special → CONTROL)."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    path = hf_dir / "tokenizer.model"
    if not path.is_file():
        raise AgiasiError(
            f"{hf_dir} has no tokenizer.model: llama.cpp's vocabulary for this architecture is "
            "the sentencepiece model. Copy tokenizer.model from the base model into the folder."
        )
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    t = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [t.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (
            t.UNKNOWN
            if sp.IsUnknown(i)
            else t.CONTROL
            if sp.IsControl(i)
            else t.UNUSED
            if sp.IsUnused(i)
            else t.BYTE
            if sp.IsByte(i)
            else t.NORMAL
        )
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        for tok in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
            i = int(tok["id"])
            if i >= vocab_size:
                continue
            tokens[i] = tok["content"].encode("utf-8")
            scores[i] = -1000.0
            types[i] = t.CONTROL if tok.get("special") else t.USER_DEFINED
    return tokens, scores, types


# Byte-level BPE vocabularies of the Llama-3 and Qwen2 families. The split patterns are the ones
# their tokenizer.json files hold (llama.cpp recognises the same two as the pre-tokenizers it
# calls "llama-bpe" and "qwen2"); they differ only in how digits group (three at a time vs one).
BPE_SPLIT_PATTERNS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``) of a byte-level BPE
    tokenizer.json, read from its split pattern.

    llama.cpp's converter hashes the token ids of a probe string instead, which names a known
    released vocabulary but nothing else (a retrained or extended vocabulary has a new hash); the
    split pattern is what llama.cpp actually reimplements, so that is what is matched here. A
    pattern llama.cpp does not know is refused: with the wrong pre-tokenizer llama.cpp would
    tokenize differently from HF and no error would say so.
    """
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise AgiasiError(
            "tokenizer.json is not a byte-level BPE vocabulary (model "
            f"{model.get('type')!r}, pre-tokenizers {kinds}); agiasi's GGUF writer reads "
            "sentencepiece (tokenizer.model) and byte-level BPE vocabularies"
        )
    patterns = [(st.get("pattern") or {}).get("Regex") for st in steps if st.get("type") == "Split"]
    for name, known in BPE_SPLIT_PATTERNS.items():
        if patterns == [known]:
            return name
    raise AgiasiError(
        f"tokenizer.json splits text with {patterns[0] if patterns else 'no pattern'!r}, which "
        f"is not a pre-tokenizer agiasi can name for llama.cpp ({', '.join(BPE_SPLIT_PATTERNS)})"
        "; llama.cpp would tokenize differently from the HF tokenizer"
    )


def _bpe_vocab(hf_dir: Path, vocab_size: int) -> tuple[list[bytes], list[int], str]:
    """Tokens (byte-level strings, as llama.cpp's ``gpt2`` vocabulary stores them), token types
    (added special → CONTROL, other added → USER_DEFINED) and the pre-tokenizer name."""
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = bpe_pre_tokenizer(tj)
    t = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [t.UNUSED] * vocab_size
    for text, i in tj["model"]["vocab"].items():
        if int(i) < vocab_size:
            tokens[int(i)], types[int(i)] = text.encode("utf-8"), t.NORMAL
    for tok in tj.get("added_tokens", []):
        i = int(tok["id"])
        if i >= vocab_size:
            raise AgiasiError(
                f"tokenizer.json has token {tok['content']!r} at id {i}, past the model's "
                f"vocab_size {vocab_size}"
            )
        tokens[i] = tok["content"].encode("utf-8")
        types[i] = t.CONTROL if tok.get("special") else t.USER_DEFINED
    return tokens, types, pre


def sentencepiece_vocabulary(w, hf_dir: Path, vocab: int) -> None:
    """Tokens, scores and types from tokenizer.model; specials and chat template from the
    tokenizer files (gguf-py's SpecialVocab); ``<|end|>`` as end-of-turn where there is one."""
    import gguf

    tokens, scores, types = _sentencepiece_vocab(hf_dir, vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=vocab)
    _set_added_specials(special, hf_dir, w)
    special.add_to_gguf(w, quiet=True)
    if b"<|end|>" in tokens:
        w.add_eot_token_id(tokens.index(b"<|end|>"))


def bpe_vocabulary(w, hf_dir: Path, vocab: int) -> None:
    """Byte-level BPE (Llama-3, Qwen2): tokens, types, merges, the pre-tokenizer llama.cpp needs
    to split text as HF does, specials and chat template (gguf-py's SpecialVocab)."""
    import gguf

    tokens, types, pre = _bpe_vocab(hf_dir, vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab)
    if not special.merges:
        raise AgiasiError(f"{hf_dir / 'tokenizer.json'} has no BPE merges")
    _set_added_specials(special, hf_dir)
    special.add_to_gguf(w, quiet=True)


def _set_added_specials(special, hf_dir: Path, w=None) -> None:
    """Whether llama.cpp puts BOS / EOS around text and (sentencepiece, ``w`` given) a space
    before it, set to what the HF tokenizer does by default. Read from the tokenizer's
    behaviour, not from the architecture: transformers 5 no longer writes ``add_bos_token`` into
    tokenizer_config.json, and without the key llama.cpp adds BOS to every sentencepiece prompt —
    a token a Phi-3 never saw there; and a Gemma-2 whose tokenizer prepends "▁" (Metaspace,
    ``prepend_scheme: first``) tokenized 61 of 62 Japanese lines differently when the space
    prefix was taken from the architecture."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if w is not None:
        pieces = tok.convert_ids_to_tokens(tok("x", add_special_tokens=False)["input_ids"])
        w.add_add_space_prefix(bool(pieces) and pieces[0].startswith("\u2581"))
    ids = tok("a")["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and ids[:1] == [
        tok.bos_token_id
    ]
    special.add_special_token["eos"] = (
        tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id
    )
