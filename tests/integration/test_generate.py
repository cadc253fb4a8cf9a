"""`agiasi generate` and `agiasi chat` on a checkpoint of the shipped tiny model."""

import io

import pytest
import torch

from agiasi.cli import main
from agiasi.demo import tiny_model_path
from agiasi.generate import GenerateConfig, chat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from agiasi.checkpoint.step_folder import write_step
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

    w = AGIASI_SO8T_Wrapper(
        str(tiny_model_path()), device="cpu", quantization="none", lora_dropout=0.0
    )
    with torch.no_grad():
        w.alpha.fill_(-2.0)
    return write_step(w, tmp_path_factory.mktemp("gen") / "step_1", step=1)


def test_generate_streams_japanese_through_the_soul(ckpt, capsys):
    assert (
        main(["generate", str(ckpt), "--prompt", "Debian パッケージを", "--max-new-tokens", "16"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("Debian パッケージを") and len(out.strip()) > len("Debian パッケージを")
    # the streamed text is the soul wrapper's greedy continuation
    from transformers import AutoTokenizer

    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

    w = AGIASI_SO8T_Wrapper.from_checkpoint(ckpt, device="cpu", lora_dropout=0.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    ids = tok("Debian パッケージを", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref = w.generate(
        ids,
        max_new_tokens=16,
        do_sample=False,
        repetition_penalty=1.1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id],
    )
    assert out.strip() == tok.decode(ref[0], skip_special_tokens=True).strip()


def test_chat_uses_the_template_and_keeps_history(ckpt):
    out = io.StringIO()
    turns = chat(
        GenerateConfig(model=str(ckpt), max_new_tokens=8),
        stdin=io.StringIO("こんにちは\n/reset\nありがとう\n/exit\n"),
        stream=out,
    )
    text = out.getvalue()
    assert turns == 2
    assert text.startswith("agiasi chat — step_1 (🟡 Transitioning)")
    assert text.count("> ") == 4


def test_generate_refuses_gguf_and_empty_prompt(ckpt, tmp_path, capsys):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert main(["generate", str(g), "--prompt", "x"]) == 2
    assert main(["generate", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "run GGUFs in llama.cpp" in err and "--prompt is required" in err


@pytest.mark.llamacpp
def test_chat_with_a_gguf_streams_llama_cpps_reply(tmp_path):
    """``agiasi chat X.gguf``: the studio's GGUF engine in the terminal — the banner names
    llama.cpp, a reply comes, a control token's text is refused and the session goes on."""
    pytest.importorskip("llama_cpp")
    from agiasi.generate import GenerateConfig, chat
    from agiasi.gguf.writer import write_gguf
    from agiasi.shipped import tiny_model_path

    gguf = write_gguf(tiny_model_path(), tmp_path / "t.gguf", "f16")
    out = io.StringIO()
    turns = chat(GenerateConfig(model=str(gguf), max_new_tokens=8),
                 stdin=io.StringIO("こんにちは\nx<|end|>y\n/exit\n"), stream=out)  # fmt: skip
    text = out.getvalue()
    assert turns == 1
    assert text.startswith("agiasi chat — t.gguf (GGUF in llama.cpp)")
    assert "a control token of this tokenizer" in text
    first_reply = text.split("> ", 2)[1]
    assert first_reply.strip()
