"""What a step folder's ``soul.json`` says, typed: every stage reads a checkpoint through
:class:`StepRecord`, so each fact has one spelling and one legacy default.

``soul.json`` (written by :func:`agiasi.checkpoint.step_folder.soul_manifest`) holds the base model and its
shape, the step, the wrapper's options (``model``), the soul's record (``soul``: kind, hidden
size, mix, α, gate, phase, orthogonality error; ``null`` for a control run), the base's weight
fingerprint and the step's validation figures. The soul's mix is stored once, in ``soul``;
folders written before that kept it in ``model.soul_mix``, and folders from before the option
existed have neither: they were trained with the design note's residual mix (``LEGACY_MIX``).
The file is data from disk: every field is type-checked here, and a malformed one is one error
naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.soul import LEGACY_MIX

MIXES = ("convex", "residual")


@dataclass(frozen=True)
class SoulRecord:
    """The soul's section: what a fold needs (kind, hidden size, mix) and what people read."""

    kind: str
    hidden_size: int
    mix: str
    init: str | None = None
    alpha_mode: str | None = None
    alpha: float | None = None
    gate: float | None = None
    phase: str | None = None
    ortho_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "init": self.init,
            "hidden_size": self.hidden_size,
            "alpha_mode": self.alpha_mode,
            "mix": self.mix,
            "alpha": self.alpha,
            "gate": self.gate,
            "phase": self.phase,
            "ortho_error": self.ortho_error,
        }


@dataclass(frozen=True)
class StepRecord:
    """``soul.json`` of one step folder."""

    model: dict[str, Any]
    soul: SoulRecord | None
    base_model: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    step: int | None = None
    base_weights: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None

    @property
    def mix(self) -> str:
        """The mix the soul was trained with (a control run: what its options say)."""
        return self.soul.mix if self.soul else _mix(self.model.get("soul_mix"), "model.soul_mix")

    @classmethod
    def from_json(cls, data: Any, where: str) -> StepRecord:
        if not isinstance(data, dict) or "model" not in data:
            raise AgiasiError(f"{where} is not an agiasi checkpoint manifest")
        model = data["model"]
        if not isinstance(model, dict):
            raise AgiasiError(f"{where}: 'model' must be a mapping of options")
        return cls(
            model=model,
            soul=_soul(data.get("soul"), model, where),
            base_model=_typed(data, "base_model", str, where),
            model_type=_typed(data, "model_type", str, where),
            hidden_size=_typed(data, "hidden_size", int, where),
            vocab_size=_typed(data, "vocab_size", int, where),
            step=_typed(data, "step", int, where),
            base_weights=_typed(data, "base_weights", dict, where),
            eval=_typed(data, "eval", dict, where),
        )


def _typed(data: dict[str, Any], key: str, kind: type, where: str):
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AgiasiError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _mix(value: Any, where: str) -> str:
    mix = value or LEGACY_MIX
    if mix not in MIXES:
        raise AgiasiError(f"soul.json: unknown soul mix {mix!r} (convex or residual) in {where}")
    return mix


def _soul(soul: Any, model: dict[str, Any], where: str) -> SoulRecord | None:
    if soul is None:
        return None
    if not isinstance(soul, dict):
        raise AgiasiError(f"{where}: 'soul' must be a mapping or null")
    kind, hidden = soul.get("kind"), soul.get("hidden_size")
    if not isinstance(kind, str) or not isinstance(hidden, int) or isinstance(hidden, bool):
        raise AgiasiError(f"{where}: the soul record needs its 'kind' and 'hidden_size'")

    def opt(key: str, types: tuple[type, ...]):
        v = soul.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise AgiasiError(f"{where}: soul '{key}' has the wrong type ({v!r})")
        return v

    return SoulRecord(
        kind=kind,
        hidden_size=hidden,
        mix=_mix(soul.get("mix") or model.get("soul_mix"), where),
        init=opt("init", (str,)),
        alpha_mode=opt("alpha_mode", (str,)),
        alpha=opt("alpha", (int, float)),
        gate=opt("gate", (int, float)),
        phase=opt("phase", (str,)),
        ortho_error=opt("ortho_error", (int, float)),
    )
