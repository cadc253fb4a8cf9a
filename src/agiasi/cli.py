"""The command line: a thin layer mapping flags 1:1 onto config dataclass fields.

Every flag ``--some-name`` is the field ``some_name`` of a config dataclass; each subcommand calls
one stage function. Errors raised as :class:`agiasi.errors.AgiasiError` print one line and exit 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError, first_line, out_of_memory_facts
from agiasi.flags import FlagParser as _Parser
from agiasi.flags import add_dataclass_args, build_config
from agiasi.model.config import RUNTIME_FIELDS
from agiasi.process import configure_process

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


# --------------------------------------------------------------------------- subcommands


def _cmd_info(args: argparse.Namespace) -> int:
    from agiasi.info import info
    from agiasi.model import ModelConfig

    info(build_config(ModelConfig, args))
    return 0


MAX_CONFIG_BYTES = 1 << 20


def _no_alias_loader():
    """PyYAML's safe loader without aliases: a flat file of flags never needs ``*name``, and a
    0.5 KB file of nested aliases expands to billions of items wherever it is walked."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(
                    f"line {event.start_mark.line + 1} uses a YAML alias (*{event.anchor}); "
                    "write the value out instead"
                )
            return super().compose_node(parent, index)

    return Loader


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    _NoAliasLoader = _no_alias_loader()

    p = Path(path)
    if not p.exists():
        raise AgiasiError(f"config file not found: {path!r}")
    if not p.is_file():
        raise AgiasiError(f"config file {path!r} is not a file")
    from agiasi.textfiles import decode_bytes

    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise AgiasiError(
            f"config file {path!r} is {p.stat().st_size:,} bytes; a file of flags is a few "
            f"hundred (at most {MAX_CONFIG_BYTES:,} are read)"
        )
    text = decode_bytes(p.read_bytes(), p, "config file")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader) or {}
    except (yaml.YAMLError, RecursionError) as e:
        raise AgiasiError(f"config file {path!r} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise AgiasiError(f"config file {path!r} must be a mapping of flag names to values")
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from agiasi.train import TrainConfig, train

    file_values = _read_yaml(args.config) if args.config else None
    cfg = build_config(TrainConfig, args, file_values)
    train(cfg)
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from agiasi.train import TrainConfig
    from agiasi.train.estimate import estimate_command

    file_values = _read_yaml(args.config) if args.config else None
    estimate_command(build_config(TrainConfig, args, file_values), as_json=args.json)
    return 0


def _estimate_flags(p) -> None:
    _config_file_flag(p)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _cmd_export(args: argparse.Namespace) -> int:
    from agiasi.process import gc_paused

    with gc_paused(freeze=args.process_ends):  # from the imports on
        from agiasi.export import ExportConfig, export

        export(build_config(ExportConfig, args))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from agiasi.eval import EvalConfig, run_eval

    run_eval(build_config(EvalConfig, args))
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


def _cmd_data(args: argparse.Namespace) -> int:
    from agiasi.data import DataConfig, preview_data

    preview_data(build_config(DataConfig, args))
    return 0


def _cmd_studio(args: argparse.Namespace) -> int:
    from agiasi.studio.entry import StudioConfig, studio

    studio(build_config(StudioConfig, args))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from agiasi.train.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


@dataclasses.dataclass(frozen=True)
class _Command:
    """One subcommand: its help, the config dataclass whose fields are its flags (imported
    when the parser is built, so ``agiasi --help`` stays fast) and the handler calling its stage."""

    name: str
    help: str
    description: str | None
    handler: Any
    config: str | None = None  # "module:Class"
    positional: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    extra: Any = None  # a function adding flags that are not config fields

    def add_to(self, sub) -> None:
        import importlib

        p = sub.add_parser(self.name, help=self.help, description=self.description)
        if self.config:
            module, cls = self.config.split(":")
            config = getattr(importlib.import_module(module), cls)
            add_dataclass_args(p, config, positional=self.positional, skip=self.skip)
        if self.extra:
            self.extra(p)
        p.set_defaults(func=self.handler)


def _config_file_flag(p) -> None:
    p.add_argument("--config", help="YAML file whose keys are flag names; flags override it")


def _plot_flags(p) -> None:
    p.add_argument("run", help="an `agiasi train` output dir (has metrics.jsonl)")
    p.add_argument("--out", help="PNG path or folder (default: RUN/phase_transition.png)")


COMMANDS = [
    _Command(
        "info",
        "architecture, hidden size, LoRA targets, trainable counts, soul kind and phase; for "
        "a .gguf file its tensor types and importance matrix",
        "Describe what agiasi would build on MODEL (reads only its config).",
        _cmd_info,
        "agiasi.model.config:ModelConfig",
        positional=("base_model",),
        skip=RUNTIME_FIELDS,  # `info` reads a config only: how a model would run does not apply
    ),
    _Command(
        "train",
        "train LoRA + soul with the alpha annealing (resumable, DDP under torchrun)",
        "The note's phase-transition training. Writes OUTPUT/step_N folders, "
        "metrics.jsonl and phase_transition.png.",
        _cmd_train,
        "agiasi.train.config:TrainConfig",
        extra=_config_file_flag,
    ),
    _Command(
        "estimate",
        "will it fit? the plan and the predicted peak GPU memory of `agiasi train`'s flags",
        "Reads the model's config.json (no weights) and the data's token counts, and prints "
        "parameters, trainable parameters, steps and tokens and the predicted peak GPU memory "
        "broken down (weights, adapter with its gradients and AdamW state, checkpoints, one "
        "layer's working set, head and loss, workspace, the allocator's slack, the CUDA "
        "context) and host memory. Takes every flag of `agiasi train`.",
        _cmd_estimate,
        "agiasi.train.config:TrainConfig",
        skip=("dry_run",),
        extra=_estimate_flags,
    ),
    _Command(
        "export",
        "merge LoRA, fold the soul, write HF + GGUF + Modelfile + card + report",
        "One plain model from a step folder, with the fidelity of every stage measured.",
        _cmd_export,
        "agiasi.export.run:ExportConfig",
        positional=("checkpoint",),
    ),
    _Command(
        "eval",
        "perplexity, or JGLUE accuracy (--task), of a checkpoint, an HF folder or a GGUF",
        "Token-level perplexity over non-overlapping windows; chars/token reported so "
        "tokenizers compare. Default text: the shipped held-out Japanese sample. With --task: "
        "JCommonsenseQA / JNLI multiple choice as lm-evaluation-harness scores it; --compare "
        "puts models side by side with a confidence interval and a verdict.",
        _cmd_eval,
        "agiasi.eval.perplexity:EvalConfig",
        positional=("model",),
    ),
    _Command(
        "demo",
        "the whole pipeline on the shipped tiny Japanese model (no network, no GPU)",
        "inject -> train -> checkpoint -> export HF + GGUF -> llama.cpp -> report",
        _cmd_demo,
        "agiasi.demo:DemoConfig",
    ),
    _Command(
        "generate",
        "one streamed completion from a checkpoint or HF folder",
        None,
        _cmd_generate,
        "agiasi.generate:GenerateConfig",
        positional=("model",),
    ),
    _Command(
        "chat",
        "interactive streamed chat with the model's chat template",
        None,
        _cmd_chat,
        "agiasi.generate:GenerateConfig",
        positional=("model",),
        skip=("prompt",),
    ),
    _Command(
        "data",
        "preview a dataset as training will see it (format, counts, one marked example)",
        "The detected format and file kind, examples and tokens, what --max-length "
        "cuts, role counts, and one example through the chat template with the trained spans "
        "marked. Reads only the first --sample records of each source.",
        _cmd_data,
        "agiasi.data.preview:DataConfig",
        positional=("dataset",),
    ),
    _Command(
        "studio",
        "the web workbench: model, data, a training form, live charts (pip install 'agiasi[studio]')",
        "A local web page over the same commands: the training form is generated from "
        "`agiasi train`'s flags, runs are `agiasi train` subprocesses, the charts follow "
        "metrics.jsonl. Listens on loopback; another --host needs a token (one is made and "
        "printed). Reads and writes only under --root.",
        _cmd_studio,
        "agiasi.studio.entry:StudioConfig",
    ),
    _Command(
        "plot",
        "PNG of loss and alpha/gate over steps with phase bands",
        None,
        _cmd_plot,
        extra=_plot_flags,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agiasi",
        description="Inject a trainable SO(8) soul into a causal LM, train it with QLoRA, export it.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_to(sub)
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, torchrun stopping its ranks) taken like Ctrl-C: the same
    clean stop — locks released, temporary folders removed — and exit code 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def console() -> int:
    """The ``agiasi`` command and ``python -m agiasi``: :func:`main` in a process that ends with
    the command, so what the imports and a bounded command made may be frozen out of the
    cyclic collector's sight (:func:`agiasi.process.gc_paused`). A caller that goes on after
    :func:`main` (tests, scripts) gets no freezing: a garbage cycle frozen there would never be
    collected."""
    return main(process_ends=True)


def main(argv: Sequence[str] | None = None, *, process_ends: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import signal
    import threading

    from agiasi.process import gc_paused

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    try:
        with gc_paused(freeze=process_ends):  # the libraries' and the configs' imports
            if not debug:
                _quiet_libraries()
            configure_process()
            parser = build_parser()
            args = parser.parse_args(argv)
        args.process_ends = process_ends
        return int(args.func(args) or 0)
    except AgiasiError as e:
        if debug:
            raise
        print(f"agiasi: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"agiasi: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # a bug: say so in one line, full traceback with --debug
        if debug:
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(
                f"agiasi: error: the disk is full{where} ({e.strerror}); free space and run "
                "again (step folders and exports are written whole or not at all)",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        if type(e).__name__ == "OutOfMemoryError":  # torch's, named: the CLI does not import torch
            # (`agiasi train` says which of its own flags would need less)
            print(
                f"agiasi: error: the GPU ran out of memory{out_of_memory_facts(e)}; another "
                "process may hold the card, or run on the CPU (--device cpu, where the command "
                "takes it)",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        print(
            f"agiasi: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
