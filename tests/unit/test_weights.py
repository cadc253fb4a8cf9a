"""safetensors read and written one tensor at a time: files the library itself reads back,
a loader equal to ``from_pretrained``, clear errors for damaged files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agiasi.errors import AgiasiError
from agiasi.weights import INDEX, LazyWeights, load_streamed, plan_shards, write_sharded


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(300, generator=g),
        "c.bias": torch.randn(7, 5, 3, generator=g),
        "d.weight": torch.randn(128, 64, generator=g),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_shard", [10**9, 20_000])
def test_written_shards_read_back_with_safetensors(tmp_path, dtype, max_shard):
    ts = _tensors()
    shapes = {k: tuple(v.shape) for k, v in ts.items()}
    paths = write_sharded(tmp_path, shapes, iter(ts.items()), dtype, max_shard_bytes=max_shard)
    assert (len(paths) > 1) == (max_shard == 20_000)
    seen = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    assert set(seen) == set(ts)
    for k, v in ts.items():
        assert seen[k].dtype == dtype and torch.equal(seen[k], v.to(dtype)), k
    if len(paths) > 1:
        index = json.loads((tmp_path / INDEX).read_text())
        assert set(index["weight_map"]) == set(ts)
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in [t.to(dtype) for t in ts.values()]
        )
    # and our own reader reads the library's files and ours alike
    lazy = LazyWeights(tmp_path)
    assert sorted(lazy.keys()) == sorted(ts)
    for k, v in ts.items():
        assert lazy.shape(k) == tuple(v.shape) and torch.equal(lazy.get(k), v.to(dtype))


def test_shard_plan_keeps_order_and_puts_a_big_tensor_alone():
    shapes = {"x": (10,), "big": (1000,), "y": (10,)}
    assert plan_shards(shapes, torch.float32, 100) == [["x"], ["big"], ["y"]]


def test_lazy_weights_reads_the_library_files(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "model.safetensors")
    lazy = LazyWeights(tmp_path)
    for k, v in ts.items():
        assert torch.equal(lazy.get(k), v)


def test_damaged_files_are_clear_errors(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AgiasiError, match="an interrupted download"):
        LazyWeights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AgiasiError, match="an interrupted download"):
        LazyWeights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(AgiasiError, match="has no .safetensors weights"):
        LazyWeights(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_phi3", "tiny_llama_tied"])
def test_streamed_load_equals_from_pretrained(request, fixture):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    cfg = AutoConfig.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    got = load_streamed(path, cfg, torch.float32, torch.device("cpu"))
    assert got is not None and not got.training
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def _merge_plan(folder, tensors, lora):
    from agiasi.export.merge import MergePlan

    save_file(tensors, str(folder / "model.safetensors"))
    return MergePlan(
        base=LazyWeights(folder),
        lora=lora,
        scaling=2.0,
        merge_base="w16",
        dtype=torch.float32,
        tied=False,
        soul=None,
    )


def test_merged_tensors_read_ahead_yields_what_the_plain_stream_does(tmp_path):
    """The worker thread that merges the next tensor while this one is written changes nothing
    in what comes out or in which order."""
    from agiasi.export.merge import merge_tensor, merged_tensors

    g = torch.Generator().manual_seed(3)
    ts = {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g),
        **{
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(16, 24, generator=g)
            for i in range(6)
        },
        "lm_head.weight": torch.randn(40, 16, generator=g),
    }
    key = "model.layers.2.mlp.down_proj.weight"
    a, b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
    plan = _merge_plan(tmp_path, ts, {key: (a, b)})
    plain = list(merged_tensors(plan, ahead=0))
    ahead = list(merged_tensors(plan, ahead=1))
    assert [k for k, _ in ahead] == [k for k, _ in plain] == list(ts)
    for (_, x), (_, y) in zip(plain, ahead, strict=True):
        assert torch.equal(x, y)
    merged = dict(ahead)
    assert torch.equal(merged[key], merge_tensor(ts[key], a, b, 2.0, torch.float32))
    assert not torch.equal(merged[key], ts[key])


def test_merged_tensors_read_ahead_reports_a_bad_tensor_in_its_place(tmp_path):
    """A non-finite merge fails when its tensor's turn comes (the ones before it are yielded
    first), and a consumer that stops early leaves no worker running."""
    import threading

    from agiasi.export.merge import merged_tensors

    ts = {f"w{i}.weight": torch.ones(8, 8) for i in range(5)}
    ts["w3.weight"][0, 0] = float("inf")
    ts["lm_head.weight"] = torch.ones(8, 8)
    plan = _merge_plan(tmp_path, ts, {})
    seen = []
    with pytest.raises(AgiasiError, match=r"w3\.weight is non-finite"):
        for k, _ in merged_tensors(plan, ahead=1):
            seen.append(k)
    assert seen == ["w0.weight", "w1.weight", "w2.weight"]
    stream = merged_tensors(plan, ahead=1)
    assert next(stream)[0] == "w0.weight"
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("agiasi-merge")]
