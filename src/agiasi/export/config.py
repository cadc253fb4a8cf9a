"""What an export is asked for (:class:`ExportConfig`, the flags) and what its plan decided
(:class:`ExportPlan`): data only, so the stages (``hf``, ``quant``, ``measure``) import their
inputs from here rather than from the orchestrator that calls them (``run``), and no module of
the package imports in a circle."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from agiasi.export.merge import MergePlan
from agiasi.model.loading import DType
from agiasi.options import option

MergeBase = Literal["auto", "w16", "nf4"]
MERGE_BASE_CHOICES: tuple[str, ...] = get_args(MergeBase)


@dataclass
class ExportConfig:
    """Flags of ``agiasi export`` (``--merge-base`` ↔ ``merge_base``)."""

    checkpoint: str = option(help="a step_N folder written by `agiasi train`, or its run folder")
    out: str = option(help="output folder (refused if it exists, unless --force)")
    step: str | None = option(
        None, "with a run folder: best (lowest validation loss), last, or a step number"
    )
    gguf: str = option(
        "f16,q8_0,q4_k_m",
        "comma list of GGUF types ('' for none): f32 f16 bf16 q8_0, and through llama.cpp's "
        "quantizer q6_k q5_k_m q5_k_s q4_k_m q4_k_s q4_0 iq4_nl iq4_xs q3_k_l q3_k_m iq3_m "
        "iq3_xxs q2_k q2_k_s iq2_m iq2_xs",
    )
    merge_base: MergeBase = option(
        "auto",
        "auto: nf4 for NF4-trained checkpoints, else w16; w16: merge into the original weights; "
        "nf4: into the NF4-dequantized weights the LoRA was trained against",
    )
    base_model: str | None = option(
        None, "override the base model recorded in the checkpoint (e.g. a local copy)"
    )
    dtype: DType = option("auto", "dtype of the HF weights; auto: the base model's own")
    output_tensor_type: str | None = option(
        None, "GGUF type of the head (it carries the soul), e.g. q8_0"
    )
    num_ctx: int = option(
        4096, "context for llama.cpp parity and the Modelfile (≤ the trained window)", ge=16
    )
    force: bool = option(False, "replace --out if it exists")
    measure: bool = option(True, "--no-measure skips the fidelity report")
    text: str | None = option(
        None, "text for perplexity (default: the shipped held-out Japanese sample)"
    )
    trust_remote_code: bool = option(
        False, "allow a base model that runs its own code (never taken from the checkpoint)"
    )
    imatrix: str = option(
        "auto",
        "importance matrix for llama.cpp's quantizer: auto (computed for the types at or below "
        "4 bits), none, or an imatrix.gguf file (used for every quantized type)",
    )
    calibration: str | None = option(
        None,
        "text or dataset the importance matrix is computed on (default: the run's validation "
        "data, else the shipped Japanese sample)",
    )
    calibration_tokens: int = option(
        65536, "token budget of the importance matrix (chunks of 512 or the model's context)", ge=32
    )
    benchmark: str | None = option(
        None,
        "TASK[:N]: JGLUE accuracy of the trained wrapper, the HF folder and every GGUF on the "
        "same N items, in the report and the card (jcommonsenseqa or jnli; N default 100)",
    )


@dataclass
class ExportPlan:
    """What :func:`plan_export` decided; the later stages only carry it out."""

    cfg: ExportConfig  # merge_base and num_ctx resolved
    checkpoint: Path
    manifest: Any  # agiasi.checkpoint.record.StepRecord
    model_config: Any  # agiasi.model.wrapper.ModelConfig, base model resolved
    base_id: str
    base_dir: Path
    hf_config: Any
    dtype: torch.dtype
    types: list[str]
    out: Path
    merge: MergePlan
    shapes: dict[str, tuple[int, ...]]
    n_params: int
    run_ggufs: bool  # llama-cpp-python is there to run the GGUFs in the measure
    imatrix_types: list[str] = field(default_factory=list)  # quantized with the matrix
    calibration: Any = None  # agiasi.export.calibration.Calibration, when the matrix is computed
    imatrix_file: Path | None = None  # --imatrix FILE
    given_imatrix: Any = None  # agiasi.gguf.imatrix.Imatrix read from it (checked in the plan)

    @property
    def stem(self) -> str:
        """The exported files' name: the base's folder or hub name, with what a Modelfile's
        ``FROM`` line cannot hold (whitespace, quotes, backslashes, controls) made ``-``, so a
        base in ``My Models/borea 3.8b`` still exports its GGUFs."""
        base = Path(self.base_id)
        name = base.name if base.exists() else self.base_id.split("/")[-1]
        name = re.sub(r"[\s\"'\\\x00-\x1f\x7f]+", "-", name).strip("-") or "model"
        return name + "-agiasi"
