"""``--report-to tensorboard,wandb,trackio,mlflow``: every line of ``metrics.jsonl`` also goes to
the trackers people already watch, under the same names.

Each backend is its library, used as its users use it; agiasi writes nothing of its own format.
Where they store things (all inside the run folder unless the user's environment says
otherwise, so a run carries its history):

* ``tensorboard`` — ``RUN/tensorboard/`` event files (``torch.utils.tensorboard``): every number
  as a scalar, the phase as text, the config as text, the phase plot as an image at each save.
* ``wandb`` — ``RUN/wandb/``; offline unless ``WANDB_MODE`` says otherwise (no network here is
  the common case; ``wandb sync`` uploads later). The run's id is agiasi's run id, so a resume
  continues the same W&B run.
* ``trackio`` — its local SQLite store in ``RUN/trackio/`` (``TRACKIO_DIR`` respected), the run
  named by ``--run-name`` (default: the run folder's name), resumed by that name.
* ``mlflow`` — a SQLite store ``RUN/mlflow.db`` with artifacts in ``RUN/mlartifacts/`` (MLflow 3
  retired its file store; ``MLFLOW_TRACKING_URI`` respected); the config as
  parameters, the numbers as metrics, the plot as an artifact; a resume reopens the run tagged
  with agiasi's run id.

Numbers go everywhere; the phase (a string) goes where strings go (TensorBoard text, W&B). Only
rank 0 reports. A backend that is not installed is one line naming the pip command, before
any work (:func:`check_backends`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError

BACKENDS = ("tensorboard", "wandb", "trackio", "mlflow")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def parse_backends(text: str | None) -> list[str]:
    if not text or text.strip().lower() == "none":
        return []
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise AgiasiError(
            f"--report-to {unknown[0]!r} is not one of {', '.join(BACKENDS)} (or none)"
        )
    return list(dict.fromkeys(names))


def check_backends(text: str | None) -> list[str]:
    """The backends asked for, each importable, or one line naming what to install."""
    import importlib.util

    names = parse_backends(text)
    for name in names:
        if importlib.util.find_spec(PACKAGE[name]) is None:
            raise AgiasiError(
                f"--report-to {name} needs the {PACKAGE[name]} package: pip install "
                f"{PACKAGE[name]} (or pip install 'agiasi[report]' for every tracker)"
            )
    return names


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(float(v))
    }  # fmt: skip


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in config.items()}


class Reporter:
    """The trackers of one run (rank 0)."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, run_id: str,
                 config: dict[str, Any]):  # fmt: skip
        self.out_dir = Path(out_dir)
        self.backends: list[Any] = []
        for name in names:
            try:
                self.backends.append(_OPENERS[name](self.out_dir, run_name, run_id, config))
            except Exception as e:  # the tracker's own refusal, in one line
                self.close()
                raise AgiasiError(
                    f"--report-to {name}: {type(e).__name__}: {str(e)[:300]}"
                ) from None

    def log(self, record: dict[str, Any]) -> None:
        for b in self.backends:
            b.log(record)

    def image(self, png: Path, step: int) -> None:
        for b in self.backends:
            b.image(png, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()


class _TensorBoard:
    def __init__(self, out_dir, run_name, run_id, config):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.w.add_text("config", json.dumps(config, ensure_ascii=False, indent=1), 0)

    def log(self, record):
        step = int(record["step"])
        for k, v in _numbers(record).items():
            self.w.add_scalar(k, v, step)
        if isinstance(record.get("phase"), str):
            self.w.add_text("phase", record["phase"], step)
        self.w.flush()

    def image(self, png, step):
        import numpy as np
        from PIL import Image

        self.w.add_image("phase_transition", np.asarray(Image.open(png).convert("RGB")), step,
                         dataformats="HWC")  # fmt: skip
        self.w.flush()

    def close(self):
        self.w.close()


class _WandB:
    def __init__(self, out_dir, run_name, run_id, config):
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "agiasi"), name=run_name,
                              id=run_id, resume="allow", dir=str(out_dir), mode=mode,
                              config=_flat_config(config))  # fmt: skip

    def log(self, record):
        data = dict(_numbers(record))
        if isinstance(record.get("phase"), str):
            data["phase"] = record["phase"]
        self.run.log(data, step=int(record["step"]))

    def image(self, png, step):
        import wandb

        self.run.log({"phase_transition": wandb.Image(str(png))}, step=step)

    def close(self):
        self.run.finish()


class _Trackio:
    def __init__(self, out_dir, run_name, run_id, config):
        os.environ.setdefault("TRACKIO_DIR", str(out_dir / "trackio"))
        import trackio

        self.t = trackio
        self.project = os.environ.get("TRACKIO_PROJECT", "agiasi")
        trackio.init(project=self.project, name=run_name, config=_flat_config(config),
                     resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)  # fmt: skip

    def log(self, record):
        self.t.log(_numbers(record), step=int(record["step"]))

    def image(self, png, step):
        self.t.log({"phase_transition": self.t.Image(str(png))}, step=step)

    def close(self):
        self.t.finish()


class _MLflow:
    def __init__(self, out_dir, run_name, run_id, config):
        import mlflow

        self.m = mlflow
        own = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = (
            os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        )
        mlflow.set_tracking_uri(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "agiasi")
        if own and mlflow.get_experiment_by_name(name) is None:  # artifacts beside the database
            mlflow.create_experiment(
                name, artifact_location=(out_dir / "mlartifacts").resolve().as_uri()
            )
        mlflow.set_experiment(name)
        found = mlflow.search_runs(filter_string=f"tags.agiasi_run_id = '{run_id}'",
                                   output_format="list")  # fmt: skip
        if found:
            self.run = mlflow.start_run(run_id=found[0].info.run_id)
        else:
            self.run = mlflow.start_run(run_name=run_name, tags={"agiasi_run_id": run_id})
            params = {k: str(v)[:500] for k, v in _flat_config(config).items()}
            mlflow.log_params(params)

    def log(self, record):
        self.m.log_metrics(_numbers(record), step=int(record["step"]))

    def image(self, png, step):
        self.m.log_artifact(str(png), artifact_path=f"plots/step_{step}")

    def close(self):
        self.m.end_run()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio, "mlflow": _MLflow}
