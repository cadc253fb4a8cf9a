"""The input embedding kept on the host (``--offload-embeddings``): what the CPU can check. The
matrix is read in place by the GPU's own gather (agiasi.model.host_embedding), so the equality of loss,
gradients and generation runs in the GPU tier (tests/gpu/test_cuda.py); here, the refusals and
the CPU run that leaves the embedding alone."""

import pytest
import torch

from agiasi.errors import AgiasiError
from agiasi.model.host_embedding import keep_input_embedding_on_host
from tests.helpers import make_wrapper


def _as_built(w):
    return w


def _trained(w):
    w.causal_lm.get_input_embeddings().weight.requires_grad_(True)
    return w


@pytest.mark.parametrize(
    "model, change, device, message",
    [
        ("tiny_llama_tied", _as_built, "cuda", "ties its head to the input embedding"),
        ("tiny_phi3", _trained, "cuda", "input embedding is being trained"),
        ("tiny_phi3", _as_built, "cpu", "needs a CUDA device, not cpu"),
    ],
)
def test_what_cannot_live_on_the_host_is_refused(model, change, device, message, request):
    """Refused before anything moves, so these run without a card."""
    w = change(make_wrapper(request.getfixturevalue(model)))
    with pytest.raises(AgiasiError, match=message):
        keep_input_embedding_on_host(w.causal_lm, torch.device(device))


def test_on_the_cpu_the_flag_leaves_the_embedding_alone(tiny_phi3):
    plain = make_wrapper(tiny_phi3)
    w = make_wrapper(tiny_phi3, offload_embeddings=True)
    assert w.embedding_on_host is False and w.embedding_bytes_on_host == 0
    emb = w.causal_lm.get_input_embeddings()
    assert type(emb.weight) is torch.nn.Parameter and emb.weight.device.type == "cpu"
    assert torch.equal(emb.weight, plain.causal_lm.get_input_embeddings().weight)
