"""Experiment trackers (`output.report_to`): refused up front when not installed, and fed our measurements.

The trainer creates one callback per tracker (transformers' integrations). Two things are ours:
- `check_trackers_installed` runs before anything starts (validate, and train before reading data), so a missing
  package is one error line naming the `pip install`, not a traceback after the model has loaded.
- `arrange_tracker_callbacks` moves the tracker callbacks after ours, so they receive the tokens/s, supervised
  tokens/s and peak memory that `MetricsCallback` adds to each log, and points TensorBoard at
  `output.dir/tensorboard` (the trainer's default would bury it under checkpoints/runs/DATE_HOST).
W&B offline mode needs nothing from us: `WANDB_MODE=offline` is read by wandb itself.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError

# tracker -> (importable modules, any one of which is enough; how to install it)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'lora-causal[tensorboard]'"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "trackio": (("trackio",), "pip install trackio"),
}
TENSORBOARD_DIR = "tensorboard"


def tracker_installed(name: str) -> bool:
    modules, _ = TRACKERS[name]
    return any(importlib.util.find_spec(module) is not None for module in modules)


def check_trackers_installed(report_to: Sequence[str]) -> None:
    """Refuse a tracker in `output.report_to` whose package is missing (one line naming the install command)."""
    missing = [name for name in report_to if name in TRACKERS and not tracker_installed(name)]
    if missing:
        name = missing[0]
        raise UserError(
            f"output.report_to: {name} is not installed; install it with `{TRACKERS[name][1]}` or remove {name} from "
            "output.report_to"
        )


def arrange_tracker_callbacks(trainer: Any, report_to: Sequence[str], run_dir: Path, is_main_process: bool) -> None:
    """Re-add the trainer's tracker callbacks at the end of its list; TensorBoard writes to run_dir/tensorboard."""
    if not report_to:
        return
    from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks

    for callback_class in get_reporting_integration_callbacks(list(report_to)):
        callback = trainer.pop_callback(callback_class)
        if callback is None:
            continue
        if isinstance(callback, TensorBoardCallback) and is_main_process:
            callback = TensorBoardCallback(tb_writer=_summary_writer(run_dir / TENSORBOARD_DIR))
        trainer.add_callback(callback)


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(folder))
