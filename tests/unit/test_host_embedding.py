"""The input embedding kept on the host (``--offload-embeddings``): the same rows, so the same
loss and LoRA gradients bit for bit; the module, its class and its parameter names unchanged; a
tied head refused. On the CPU the wrapper leaves the embedding alone (there is nothing to free),
so these tests install the hooks with the CPU as the target device to run them; the GPU tier
runs the real transfer (tests/gpu/test_cuda.py)."""

import pytest
import torch
import transformers

from agiasi.errors import AgiasiError
from agiasi.host_embedding import keep_input_embedding_on_host
from tests.helpers import make_wrapper, randomize_lora, randomize_soul


def _tiny_gemma_untied(out):
    """Gemma scales the looked-up rows by √hidden in its own forward: the rows must still pass
    through that code when they come in as inputs_embeds."""
    cfg = transformers.GemmaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg.architectures = ["GemmaForCausalLM"]
    transformers.GemmaForCausalLM(cfg).save_pretrained(out)
    return out


def _loss_and_grads(w, ids, labels):
    out = w(ids, labels=labels, return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.clone() for n, p in w.named_parameters() if p.requires_grad
    }


def _pair(path):
    def build():
        torch.manual_seed(0)
        w = make_wrapper(path, gradient_checkpointing=True).train()
        randomize_lora(w)
        randomize_soul(w)
        return w

    plain, hosted = build(), build()
    assert keep_input_embedding_on_host(hosted.causal_lm, torch.device("cpu")) == 0
    hosted.embedding_on_host = True  # what the wrapper sets for a GPU run
    return plain, hosted


@pytest.mark.parametrize("arch", ["phi3", "gemma"])
def test_rows_from_the_host_give_the_same_loss_and_gradients(arch, tiny_phi3, tmp_path):
    path = tiny_phi3 if arch == "phi3" else _tiny_gemma_untied(tmp_path / "gemma")
    plain, hosted = _pair(path)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_p, grads_p = _loss_and_grads(plain, ids, labels)
    loss_h, grads_h = _loss_and_grads(hosted, ids, labels)
    # the same gather and then the same decoder ops in the same order: equal, not close
    assert torch.equal(loss_p, loss_h)
    assert grads_p.keys() == grads_h.keys() and grads_p
    for name, g in grads_p.items():
        assert torch.equal(g, grads_h[name]), name
    # the model's own module, class and parameter names: checkpoints and exports see no change
    assert type(hosted.causal_lm.get_input_embeddings()) is type(
        plain.causal_lm.get_input_embeddings()
    )
    assert list(hosted.state_dict()) == list(plain.state_dict())


def test_generation_passes_ids_through_the_hooks(tiny_phi3):
    """HF's generate hands the embedding module the ids itself (no inputs_embeds): the hooks
    move them to the host and the rows back."""
    plain, hosted = _pair(tiny_phi3)
    prompt = torch.tensor([[5, 9, 17, 33]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(prompt, **kw), hosted.generate(prompt, **kw))


def test_a_tied_head_is_refused(tiny_llama_tied):
    w = make_wrapper(tiny_llama_tied)
    with pytest.raises(AgiasiError, match="ties its head to the input embedding"):
        keep_input_embedding_on_host(w.causal_lm, torch.device("cpu"))


def test_on_the_cpu_the_flag_leaves_the_embedding_alone(tiny_phi3):
    w = make_wrapper(tiny_phi3, offload_embeddings=True)
    assert w.embedding_on_host is False
    emb = w.causal_lm.get_input_embeddings()
    assert not emb._forward_hooks and not emb._forward_pre_hooks
