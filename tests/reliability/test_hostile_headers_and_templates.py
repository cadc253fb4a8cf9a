"""Input that claims more than it holds never costs memory or time: GGUF headers, config.json
sizes, YAML alias bombs, chat templates that loop or grow, huge text files where a slice is
asked for. Each case runs under an address-space cap (``resource.setrlimit``) in a child process
and must end in seconds with one clear line. Also: a given importance matrix is checked before
anything is written, and a few-shot pool never shows an item its own answer."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from agiasi.errors import AgiasiError

CAP_BYTES = 3 << 30  # address space of the child: torch + transformers need ~1.5 GiB of it


def run_capped(code: str, timeout: float = 60) -> tuple[int, str, float]:
    """``code`` in a child under the address-space cap; (exit code, stderr, seconds)."""
    prelude = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES}))
        """
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return p.returncode, p.stderr, time.monotonic() - t0


def cli_capped(argv: list[str], timeout: float = 60) -> tuple[int, str, float]:
    return run_capped(f"import sys\nfrom agiasi.cli import main\nsys.exit(main({argv!r}))", timeout)


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf(kv: bytes, n_kv: int = 1, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv


GGUF_CASES = {
    "array of 2^40 u8": _gguf(_gguf_string(b"a") + struct.pack("<IIQ", 9, 0, 1 << 40)),
    "array of 2^40 strings": _gguf(_gguf_string(b"a") + struct.pack("<IIQ", 9, 8, 1 << 40)),
    "2^60 key/value pairs": _gguf(b"", n_kv=1 << 60),
    "2^50 tensors": _gguf(b"", n_kv=0, n_tensors=1 << 50),
    "a key of 2^40 bytes": _gguf(struct.pack("<Q", 1 << 40)),
    "a string value of 2^40 bytes": _gguf(_gguf_string(b"a") + struct.pack("<IQ", 8, 1 << 40)),
    "arrays nested without end": _gguf(_gguf_string(b"a") + struct.pack("<IIQ", 9, 9, 1) * 6),
    "an unknown value type": _gguf(_gguf_string(b"a") + struct.pack("<I", 99)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GGUF_CASES))
@pytest.mark.parametrize("command", ["info", "export-imatrix"])
def test_a_gguf_header_that_claims_too_much_is_refused_in_bounded_memory(tmp_path, name, command):
    p = tmp_path / "evil.gguf"
    p.write_bytes(GGUF_CASES[name])
    if command == "info":
        rc, err, took = cli_capped(["info", str(p)])
        line = err.strip().splitlines()[-1]
        assert rc == 2 and line.startswith("agiasi: error: "), err
    else:
        rc, err, took = run_capped(
            f"from agiasi.gguf.imatrix import read_imatrix\nfrom pathlib import Path\n"
            f"read_imatrix(Path({str(p)!r}))"
        )
        line = err.strip().splitlines()[-1]
        assert rc == 1 and line.startswith("agiasi.errors.AgiasiError: "), err
    assert "is not a readable GGUF file" in line, line
    assert took < 30


def test_the_header_walk_accepts_real_files(tmp_path):
    """The same walk passes the files the gguf library writes (strings, arrays, tensors)."""
    import gguf

    from agiasi.gguf.header import check_gguf_header

    w = gguf.GGUFWriter(str(tmp_path / "ok.gguf"), arch="llama")
    w.add_array("tokenizer.ggml.tokens", ["あ", "い", "<|end|>"] * 1000)
    w.add_array("x.floats", [1.0, 2.0])
    w.add_string("general.name", "名前")
    w.add_tensor("t", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_gguf_header(tmp_path / "ok.gguf")
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(AgiasiError, match="ends inside its header|claims"):
        check_gguf_header(tmp_path / "cut.gguf")


CONFIG_CASES = {
    "hidden_size 1e9": ({"hidden_size": 1e9}, "hidden_size 1000000000.0"),
    "hidden_size 2^31": ({"hidden_size": 1 << 31}, "hidden_size 2147483648"),
    "num_hidden_layers 1e5": ({"num_hidden_layers": 100000}, "num_hidden_layers 100000"),
    "vocab_size 10^12": ({"vocab_size": 10**12}, "vocab_size 1000000000000"),
    "intermediate_size -1": ({"intermediate_size": -1}, "intermediate_size -1"),
    "heads as text": ({"num_attention_heads": "32"}, "num_attention_heads '32'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_a_config_with_impossible_sizes_is_refused_before_anything_is_built(
    tiny_phi3, tmp_path, name
):
    import shutil

    change, shown = CONFIG_CASES[name]
    model = tmp_path / "m"
    shutil.copytree(tiny_phi3, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    rc, err, took = cli_capped(["info", str(model)])
    line = err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("agiasi: error: ") and shown in line, err
    assert "not a size any model agiasi builds has" in line
    assert took < 30


YAML_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    + ["dataset: *i"]
)


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(YAML_BOMB)
    assert cfg.stat().st_size < 1024
    rc, err, took = cli_capped(["train", "--config", str(cfg), "--base-model", "x"])
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "uses a YAML alias (*a)" in line, err
    assert took < 30


def test_a_nested_value_is_never_formatted_whole():
    from agiasi.options import coerce
    from agiasi.train.config import TrainConfig

    deep: list = ["x"] * 10
    for _ in range(9):
        deep = [deep] * 10  # 10^10 leaves if walked
    with pytest.raises(AgiasiError) as e:
        coerce(TrainConfig, "dataset", deep, "config file")
    assert len(str(e.value)) < 300 and "is a list, not a value a flag takes" in str(e.value)


TEMPLATES = {
    "a string of 5 GB": ("{{ 'x' * 5000000000 }}", "past agiasi's bound"),
    "a huge power": ("{{ 7 ** 100000000 }}", "past agiasi's bound"),
    "a filter with a huge width": ("{{ 'x' | center(5000000000) }}", "past agiasi's bound"),
    "a method with a huge width": ("{{ 'x'.ljust(5000000000) }}", "past agiasi's bound"),
    "doubling with ~ in a loop": (
        "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "grew the process by more than",
    ),
    "a loop without end": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "did not finish rendering",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("use", ["train", "modelfile", "calibration"])
def test_a_hostile_template_is_stopped_in_bounded_time_and_memory(
    tiny_phi3_tok, tmp_path, name, use
):
    """Each place that renders the model's template, on a copy of the tiny model whose
    template is hostile: training's tokenizer, the export's Modelfile check, calibration."""
    import shutil

    template, message = TEMPLATES[name]
    model = tmp_path / "m"
    shutil.copytree(tiny_phi3_tok, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (model / extra).unlink(missing_ok=True)
    msgs = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}]
    call = {
        "train": "from agiasi.data.tokenize import render_chat as f\nf(tok, msgs, 'record 1')",
        "modelfile": "from agiasi.export.ollama import _jinja as f\nf(tok, msgs, True)",
        "calibration": "from agiasi.templates import render_text as f\nf(tok, msgs, 'cal')",
    }[use]
    rc, err, took = run_capped(
        f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(model)!r})
        msgs = {msgs!r}
        {call}
        """.replace("\n        ", "\n"),
        timeout=90,
    )
    line = err.strip().splitlines()[-1]
    assert rc == 1 and line.startswith("agiasi.errors.AgiasiError: "), err[-2000:]
    assert message in line, line
    assert took < 45


def test_a_long_valid_record_is_not_a_template_loop(tiny_phi3_tok):
    """Tokenizing is outside the render's budget: a 2 MB answer renders in milliseconds and
    tokenizes for longer than the budget allows a render."""
    from transformers import AutoTokenizer

    from agiasi.data.tokenize import render_chat

    tok = AutoTokenizer.from_pretrained(tiny_phi3_tok)
    long = "吾輩は猫である。名前はまだ無い。\n" * 120_000
    ids = render_chat(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": long}], "r"
    )
    assert len(ids) > 100_000


def test_a_stopped_render_leaves_no_thread_running(tiny_phi3_tok):
    import threading

    from agiasi import templates

    before = threading.active_count()
    with pytest.raises(AgiasiError, match="did not finish"):
        old = templates.RENDER_SECONDS
        templates.RENDER_SECONDS = 0.5
        try:
            templates.bounded(lambda: [0 for _ in iter(int, 1)], "spin")
        finally:
            templates.RENDER_SECONDS = old
    time.sleep(0.2)
    assert threading.active_count() <= before + 1  # the fresh worker of the next render at most
    assert templates.bounded(lambda: "ok", "after") == "ok"


@pytest.mark.slow
def test_eval_reads_only_the_slice_it_scores(tmp_path):
    """``eval --max-tokens 2048`` of a 200 MB file: kilobytes read, seconds, capped memory (it
    once aborted with a Rust backtrace, and 50 MB peaked at 4.5 GB)."""
    from agiasi.shipped import default_heldout, tiny_model_path

    big = tmp_path / "big.txt"
    piece = default_heldout().read_bytes()
    with open(big, "wb") as fh:
        for _ in range(200 * 2**20 // len(piece) + 1):
            fh.write(piece)
    rc, err, took = run_capped(
        f"""
        import json, resource
        from agiasi.eval.perplexity import EvalConfig, evaluate
        r = evaluate(EvalConfig(model={str(tiny_model_path())!r}, text={str(big)!r},
                                max_tokens=2048, window=256))
        print(json.dumps(r), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """,
        timeout=120,
    )
    assert rc == 0, err[-2000:]
    assert took < 60


@pytest.mark.slow
def test_data_samples_a_huge_text_file_in_bounded_memory(tmp_path):
    """``agiasi data`` once kept every token of a big text file (~13 bytes of RAM a byte)."""
    big = tmp_path / "big.txt"
    line = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
    with open(big, "w", encoding="utf-8") as fh:
        for _ in range(8):
            fh.write(line * 40_000 + "\n")  # 8 documents of 4 MB
    assert big.stat().st_size > 30 * 2**20
    rc, err, took = cli_capped(["data", str(big), "--json"], timeout=120)
    assert rc == 0, err[-2000:]
    assert took < 90


def _imatrix(tmp_path, sums, counts):
    from agiasi.gguf.imatrix import Imatrix, write_imatrix

    im = Imatrix(chunk_size=64, chunks=2, datasets=["x"])
    im.sums["blk.0.attn_qkv.weight"] = np.asarray(sums, np.float64)
    im.counts["blk.0.attn_qkv.weight"] = counts
    return write_imatrix(tmp_path / "im.gguf", im)


@pytest.mark.parametrize(
    ("sums", "counts", "message"),
    [
        ([1.0, -2.0, 3.0], 10, "holds -2.0 at entry 1"),
        ([1.0, float("nan"), 3.0], 10, "holds nan at entry 1"),
        ([float("inf"), 1.0, 3.0], 10, "holds inf at entry 0"),
        ([1.0, 2.0, 3.0], -5, "counts"),
    ],
    ids=["negative-sum", "nan-sum", "inf-sum", "negative-count"],
)
def test_a_given_importance_matrix_is_checked_before_use(tmp_path, sums, counts, message):
    from agiasi.gguf.imatrix import read_imatrix

    path = _imatrix(tmp_path, sums, counts)
    with pytest.raises(AgiasiError, match="finite and never negative") as e:
        read_imatrix(path)
    assert message in str(e.value)


def test_an_absurd_quant_fails_the_export_check():
    from agiasi.export.files import failed_check

    measured = {"parity": {"hf": {"ppl": 42.8}, "gguf q4_k_m vs hf": {"ppl": 61623.0},
                           "gguf q8_0 vs hf": {"ppl": 42.9}}}  # fmt: skip
    stage, why = failed_check(measured)
    assert stage == "gguf q4_k_m vs hf" and "61,623.0" in why and "broken" in why
    measured["parity"]["gguf q4_k_m vs hf"]["ppl"] = 47.1  # a real Q4_K_M's loss
    assert failed_check(measured) is None


def test_the_few_shot_pool_never_holds_a_scored_item(tmp_path):
    from agiasi.eval.tasks import TASKS, prepare, read_items
    from agiasi.shipped import jglue_file

    task = TASKS["jcommonsenseqa"]
    valid = read_items(task, jglue_file(task.valid_file))[:40]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in valid))
    pool = [dict(r) for r in valid[:20]]  # the same items under their own ids
    pool += [{**r, task.id_field: 10**6 + i} for i, r in enumerate(valid[20:30])]  # new ids
    pool += read_items(task, jglue_file(task.train_file))[:5]  # five honest shots
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool))
    ts = prepare(task, data=scored, fewshot_data=pool_file, num_fewshot=3)
    assert "less 30 item(s) that are also scored" in ts.fewshot_from
    scored_ids = {r[task.id_field] for r in valid}
    scored_q = {r["question"] for r in valid}
    for shots in ts.shots:
        assert all(s[task.id_field] not in scored_ids and s["question"] not in scored_q
                   for s in shots)  # fmt: skip
    with pytest.raises(AgiasiError, match="also scored and were left out"):
        prepare(task, data=scored, fewshot_data=pool_file, num_fewshot=6)
