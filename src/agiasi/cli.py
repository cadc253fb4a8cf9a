"""The command line: a thin layer mapping flags 1:1 onto config dataclass fields.

Every flag ``--some-name`` is the field ``some_name`` of a config dataclass; each subcommand calls
one stage function. Errors raised as :class:`agiasi.errors.AgiasiError` print one line and exit 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from agiasi.errors import AgiasiError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "int | None": int,
    "float | None": float,
    "list[str] | None": _parse_list,
    "list[str]": _parse_list,
}


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: Sequence[str] = (),
    positional: Sequence[str] = (),
    help_text: dict[str, str] | None = None,
) -> None:
    """One ``--flag`` per dataclass field (``snake_case`` → ``--kebab-case``).

    Defaults are left as ``None`` on the parser so that a YAML config file can sit between the
    dataclass defaults and the flags (flags > file > defaults); :func:`build_config` merges them.
    """
    help_text = help_text or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = help_text.get(f.name, "")
        if f.name in positional:
            parser.add_argument(f.name, help=helptext)
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{helptext} (default: {default})".strip(),
            )
            continue
        conv = _TYPES.get(str(f.type), str)
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument(
            flag,
            dest=f.name,
            type=conv,
            default=None,
            help=f"{helptext} (default: {shown})".strip(),
        )


def build_config(cls: type, args: argparse.Namespace, file_values: dict[str, Any] | None = None):
    """dataclass defaults < config file < explicit flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in names:
            raise AgiasiError(
                f"unknown key {key!r} in the config file; valid keys are the flag names: "
                + ", ".join(sorted(n.replace("_", "-") for n in names))
            )
        if isinstance(value, str) and _TYPES.get(str(_field(cls, name).type)) is _parse_list:
            value = _parse_list(value)
        values[name] = value
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise AgiasiError(
            "missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    return cls(**values)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# --------------------------------------------------------------------------- subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    from agiasi.model import ModelConfig, describe, format_info

    cfg = build_config(ModelConfig, args)
    info = describe(cfg.base_model, cfg)
    print(format_info(info))
    return 0


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise AgiasiError(f"config file not found: {path!r}") from None
    except yaml.YAMLError as e:
        raise AgiasiError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise AgiasiError(f"config file {path!r} must be a mapping of flag names to values")
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from agiasi.train import TrainConfig, train

    file_values = _read_yaml(args.config) if args.config else None
    cfg = build_config(TrainConfig, args, file_values)
    train(cfg)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from agiasi.export import ExportConfig, export

    export(build_config(ExportConfig, args))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json as _json

    from agiasi.evaluate import EvalConfig, evaluate

    cfg = build_config(EvalConfig, args)
    r = evaluate(cfg)
    if cfg.json:
        print(_json.dumps(r, ensure_ascii=False, indent=2))
    else:
        print(
            f"{r['kind']} {r['model']}\n  perplexity {r['perplexity']:.3f} on {r['tokens']} tokens of "
            f"{r['text']}\n  window {r['window']} tokens, stride {r['stride']} (non-overlapping), "
            f"{r['chars_per_token']:.2f} chars/token"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from agiasi.demo import DemoConfig, demo

    demo(build_config(DemoConfig, args))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from agiasi.generate import GenerateConfig, generate

    generate(build_config(GenerateConfig, args))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from agiasi.generate import GenerateConfig, chat

    chat(build_config(GenerateConfig, args))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from agiasi.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


TRAIN_HELP = {
    "base_model": "hub id or local folder of the causal LM to inject",
    "dataset": ".txt (one paragraph a line), .jsonl (text or chat messages) or HF dataset folder; "
    "default: the shipped Japanese sample",
    "resume": "'auto' (newest complete step_N in --output-dir) or a step folder",
    "soul": "--no-soul runs the control: plain QLoRA through the same loop and data",
    "grad_accum": "micro-batches per optimizer step",
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    from agiasi.train import TrainConfig

    p.add_argument("--config", help="YAML file whose keys are flag names; flags override it")
    add_dataclass_args(p, TrainConfig, help_text=TRAIN_HELP)


def build_parser() -> argparse.ArgumentParser:
    from agiasi.model import ModelConfig

    parser = argparse.ArgumentParser(
        prog="agiasi",
        description="Inject a trainable SO(8) soul into a causal LM, train it with QLoRA, export it.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "info",
        help="architecture, hidden size, LoRA targets, trainable counts, soul kind and phase",
        description="Describe what agiasi would build on MODEL (reads only its config).",
    )
    add_dataclass_args(
        p,
        ModelConfig,
        positional=("base_model",),
        skip=("gradient_checkpointing",),
        help_text={"base_model": "hub id or local folder of a causal LM"},
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "train",
        help="train LoRA + soul with the alpha annealing (resumable, DDP under torchrun)",
        description="The note's phase-transition training. Writes OUTPUT/step_N folders, "
        "metrics.jsonl and phase_transition.png.",
    )
    add_train_args(p)
    p.set_defaults(func=_cmd_train)

    from agiasi.export import ExportConfig

    p = sub.add_parser(
        "export",
        help="merge LoRA, fold the soul, write HF + GGUF + Modelfile + card + report",
        description="One plain model from a step folder, with the fidelity of every stage measured.",
    )
    add_dataclass_args(
        p,
        ExportConfig,
        positional=("checkpoint",),
        help_text={
            "checkpoint": "a step_N folder written by `agiasi train`",
            "out": "output folder (refused if it exists, unless --force)",
            "gguf": "comma list of f32,f16,bf16,q8_0,q4_k_m,q5_k_m,q6_k ('' for none)",
            "merge_base": "auto: nf4 for NF4-trained checkpoints, else w16; w16: merge into the "
            "original weights; nf4: into the NF4-dequantized weights the LoRA was trained against",
            "base_model": "override the base model recorded in the checkpoint (e.g. a local copy)",
            "output_tensor_type": "GGUF type of the head (it carries the soul), e.g. q8_0",
            "num_ctx": "context for llama.cpp parity and the Modelfile (≤ the original window)",
            "measure": "--no-measure skips the parity report",
            "text": "text for perplexity (default: the shipped held-out Japanese sample)",
        },
    )
    p.set_defaults(func=_cmd_export)

    from agiasi.demo import DemoConfig
    from agiasi.evaluate import EvalConfig

    p = sub.add_parser(
        "eval",
        help="perplexity of a checkpoint, an HF folder or a GGUF (llama.cpp) on a text",
        description="Token-level perplexity over non-overlapping windows; chars/token reported so "
        "tokenizers compare. Default text: the shipped held-out Japanese sample.",
    )
    add_dataclass_args(
        p,
        EvalConfig,
        positional=("model",),
        help_text={
            "model": "step_N folder, HF model folder or .gguf file",
            "text": "UTF-8 text file",
            "window": "tokens per window (default: 512, or the model's trained context if shorter)",
            "max_tokens": "evaluate at most this many tokens of the text",
            "n_ctx": "llama.cpp context for GGUF files",
            "json": "print JSON",
        },
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the shipped tiny Japanese model (no network, no GPU)",
        description="inject -> train -> checkpoint -> export HF + GGUF -> llama.cpp -> report",
    )
    add_dataclass_args(p, DemoConfig, help_text={"out": "working folder (replaced each run)"})
    p.set_defaults(func=_cmd_demo)

    from agiasi.generate import GenerateConfig

    gen_help = {
        "model": "step_N folder (soul applied) or exported HF folder",
        "temperature": "0 = greedy",
        "chat_template": "wrap --prompt as a user turn in the tokenizer's chat template",
    }
    p = sub.add_parser("generate", help="one streamed completion from a checkpoint or HF folder")
    add_dataclass_args(p, GenerateConfig, positional=("model",), help_text=gen_help)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("chat", help="interactive streamed chat with the model's chat template")
    add_dataclass_args(
        p, GenerateConfig, positional=("model",), skip=("prompt",), help_text=gen_help
    )
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("plot", help="PNG of loss and alpha/gate over steps with phase bands")
    p.add_argument("run", help="an `agiasi train` output dir (has metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN/phase_transition.png)")
    p.set_defaults(func=_cmd_plot)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecation notes, config hints) drowns our own output; --debug keeps it."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    if not debug:
        _quiet_libraries()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except AgiasiError as e:
        if debug:
            raise
        print(f"agiasi: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("agiasi: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, full traceback with --debug
        if debug:
            raise
        print(
            f"agiasi: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
