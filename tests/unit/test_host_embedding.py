"""The input embedding kept on the host (``--offload-embeddings``): what the CPU can check. The
matrix is read in place by the GPU's own gather (agiasi.host_embedding), so the equality of loss,
gradients and generation runs in the GPU tier (tests/gpu/test_cuda.py); here, the refusals and
the CPU run that leaves the embedding alone."""

import pytest
import torch

from agiasi.errors import AgiasiError
from agiasi.host_embedding import keep_input_embedding_on_host
from tests.helpers import make_wrapper


def test_a_tied_head_is_refused(tiny_llama_tied):
    w = make_wrapper(tiny_llama_tied)
    with pytest.raises(AgiasiError, match="ties its head to the input embedding"):
        keep_input_embedding_on_host(w.causal_lm, torch.device("cuda"))


def test_a_trained_embedding_is_refused(tiny_phi3):
    w = make_wrapper(tiny_phi3)
    w.causal_lm.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(AgiasiError, match="input embedding is being trained"):
        keep_input_embedding_on_host(w.causal_lm, torch.device("cuda"))


def test_a_device_that_is_not_cuda_is_refused(tiny_phi3):
    w = make_wrapper(tiny_phi3)
    with pytest.raises(AgiasiError, match="needs a CUDA device, not cpu"):
        keep_input_embedding_on_host(w.causal_lm, torch.device("cpu"))


def test_on_the_cpu_the_flag_leaves_the_embedding_alone(tiny_phi3):
    plain = make_wrapper(tiny_phi3)
    w = make_wrapper(tiny_phi3, offload_embeddings=True)
    assert w.embedding_on_host is False and w.embedding_bytes_on_host == 0
    emb = w.causal_lm.get_input_embeddings()
    assert type(emb.weight) is torch.nn.Parameter and emb.weight.device.type == "cpu"
    assert torch.equal(emb.weight, plain.causal_lm.get_input_embeddings().weight)
