"""A command's form, generated from its config dataclass — never written twice.

Every field of :class:`agiasi.train.TrainConfig` becomes one input with the flag's own help,
bounds and choices (:mod:`agiasi.options`); a submitted form becomes the config by the same
typed conversion a flag or a ``--config`` file goes through, and its errors are the CLI's own
lines. The command the page shows and runs is built from the config, as is the YAML.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agiasi import options
from agiasi.errors import AgiasiError

# The groups the form shows, in order; a field not named here lands in "advanced", so a new
# flag appears on the page without anyone touching this file (a test checks every field shows).
GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("base_model", "quantization", "dtype", "lora_r", "lora_alpha", "lora_dropout",
              "lora_targets"),
    "data": ("dataset", "dataset_format", "dataset_columns", "max_length", "packing",
             "eval_dataset", "eval_split", "eval_steps", "eval_max_tokens"),
    "objective": ("method", "init_from", "beta", "dpo_loss", "label_smoothing", "orpo_lambda",
                  "precompute_reference"),
    "soul": ("soul", "soul_mix", "rotation", "rotation_init", "alpha_mode", "alpha_start",
             "alpha_target", "warmup_steps", "annealing_steps", "ortho_weight",
             "soul_learning_rate"),
    "optimizer": ("max_steps", "batch_size", "grad_accum", "learning_rate", "lr_scheduler",
                  "lr_warmup_steps", "lr_warmup_ratio", "min_lr_ratio", "weight_decay",
                  "max_grad_norm", "seed"),
    "run": ("output_dir", "save_steps", "early_stopping_patience", "overwrite", "device",
            "gradient_checkpointing", "offload_activations", "offload_embeddings", "compile"),
}  # fmt: skip
# What the page sets itself: the bar is for terminals, Resume is its own button.
HIDDEN = ("progress", "resume", "dry_run")
# Fields naming files or folders: they must stay under the studio's root.
PATH_FIELDS = ("dataset", "eval_dataset", "output_dir", "init_from", "base_model")


def form_schema(
    cls: type, groups: dict[str, tuple[str, ...]] | None = None
) -> list[dict[str, Any]]:
    """``[{"group", "fields": [{name, flag, kind, default, help, choices, min, max, …}]}]``;
    ``groups`` defaults to the training form's (another command's fields keep their order)."""
    groups = GROUPS if groups is None else groups
    hints = options.field_types(cls)
    by_group: dict[str, list[dict[str, Any]]] = {g: [] for g in (*groups, "advanced")}
    placed = {name: g for g, names in groups.items() for name in names}
    for f in dataclasses.fields(cls):
        if f.name in HIDDEN:
            continue
        convert, choices, optional = options.converter(hints[f.name])
        kind = {
            options.parse_bool: "bool",
            options.parse_int: "int",
            options.parse_float: "float",
            options.parse_list: "list",
        }.get(convert, "choice" if choices else "text")
        default = f.default if f.default is not dataclasses.MISSING else None
        meta = f.metadata
        field = {
            "name": f.name,
            "flag": options.flag_name(f.name),
            "kind": kind,
            "default": ",".join(default) if isinstance(default, list) else default,
            "required": f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING,
            "optional": optional,
            "help": meta.get("help", ""),
            "bounds": options.help_for(f).removeprefix(meta.get("help", "")).strip(" []"),
            "choices": list(choices) if choices else None,
            "min": meta.get("ge", meta.get("gt")),
            "max": meta.get("le", meta.get("lt")),
            "path": f.name in PATH_FIELDS,
        }
        by_group[placed.get(f.name, "advanced")].append(field)
    return [{"group": g, "fields": fs} for g, fs in by_group.items() if fs]


def config_from_form(cls: type, values: dict[str, Any], prog: str = "agiasi train",
                     positional: tuple[str, ...] = ()):  # fmt: skip
    """Submitted values (strings from inputs, booleans from boxes; empty = the default) → the
    config, through the command's own parser: the same conversion, bounds and error lines as
    the flags typed in a terminal."""
    from agiasi.flags import parse_config

    names = {f.name for f in dataclasses.fields(cls)}
    argv: list[str] = []
    for key, value in values.items():
        if key not in names or key in HIDDEN:
            raise AgiasiError(f"unknown field {key!r}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key in positional:
            argv.insert(0, str(value).strip())
            continue
        flag = options.flag_name(key)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            text = ",".join(value) if isinstance(value, list) else str(value).strip()
            argv.append(f"{flag}={text}")  # "=": a value starting with "-" stays a value
    return parse_config(cls, prog, argv, positional=positional)


def changed_fields(cfg) -> dict[str, Any]:
    """The fields whose values differ from the defaults, in declaration order."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if value != default and f.name not in HIDDEN:
            out[f.name] = value
    return out


def flags_of(cfg, positional: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild ``cfg`` on the command line (defaults left out); the fields in
    ``positional`` are the command's positional arguments and left out here
    (:func:`positionals_of`)."""
    argv: list[str] = []
    for name, value in changed_fields(cfg).items():
        if name in positional:
            continue
        flag = options.flag_name(name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, ",".join(value)]
        elif isinstance(value, float):
            argv += [flag, repr(value)]
        else:
            argv += [flag, str(value)]
    return argv


def positionals_of(cfg, positional: tuple[str, ...]) -> list[str]:
    """The values of the positional fields that are set, in order."""
    return [str(getattr(cfg, n)) for n in positional if getattr(cfg, n) is not None]


def yaml_of(cfg) -> str:
    """The same settings as a ``--config`` file (keys = flag names)."""
    import yaml

    data = {name.replace("_", "-"): value for name, value in changed_fields(cfg).items()}
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def shell_line(argv: list[str]) -> str:
    """``agiasi train …`` as a user would paste it into a POSIX shell."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
