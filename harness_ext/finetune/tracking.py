"""Training logs for experiment trackers (``report_to``): TensorBoard, Weights & Biases, trackio through accelerate.

As transformers' ``Trainer`` and TRL do, ``--report-to tensorboard`` sends the training loss and learning
rate of every logged step to the tracker; accelerate does the writing (``Accelerator(log_with=...)``,
``init_trackers``, ``log``, ``end_training``). Local files go under ``OUTPUT_DIR/runs/<RUN_NAME>``
(TensorBoard event files; wandb and trackio keep their own stores and read their usual environment
variables, e.g. ``WANDB_MODE=offline``). A tracker whose package is missing is refused at setup, before
any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness_ext.core.errors import NeedlesError

RUN_NAME = "needles-finetune"  # accelerate's project name: the TensorBoard folder under OUTPUT_DIR/runs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> pip package


def trackers(report_to: list[str] | None) -> list[str]:
    """The trackers to use (``none`` alone, or an empty list: none); refuses a tracker whose package is missing."""
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    wanted = [name for name in (report_to or []) if name != "none"]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "trackio": is_trackio_available}
    for name in wanted:
        if not available[name]():
            raise NeedlesError(
                f"--report-to {name}: the {PACKAGES[name]} package is not installed",
                fix=f"pip install {PACKAGES[name]}  (or pip install 'lm-eval-needles[tracking]'), or drop --report-to",
            )
    return wanted


def accelerator_kwargs(names: list[str], out: Path) -> dict:
    """``Accelerator`` keyword arguments that route the trackers' files under ``out/runs``."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": names,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")),
    }


def start(accelerator: Any, names: list[str], config: dict) -> None:
    """Open the trackers with the run's configuration (lists and dicts as JSON text: TensorBoard's hparams
    take only scalars)."""
    if not names:
        return
    import json

    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str) for k, v in config.items()}
    accelerator.init_trackers(RUN_NAME, config=flat)


def log_step(accelerator: Any, names: list[str], row: dict) -> None:
    """One history row of the recipe (``train_log.json``) as tracker scalars, at its optimizer step."""
    if names:
        accelerator.log({"train/loss": row["loss"], "train/learning_rate": row["lr"]}, step=row["step"])


def finish(accelerator: Any, names: list[str]) -> None:
    """Flush and close the trackers."""
    if names:
        accelerator.end_training()
