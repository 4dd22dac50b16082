"""Ctrl-C / SIGTERM during training: finish the step, save a checkpoint and the adapter so far, exit 130 / 143.

With several processes the decision is agreed at every step end (the largest signal number any process got), so
a signal that reaches one process, or lands on different sides of a step on different processes, stops them all
after the same step; the checkpoint and the adapter are then saved by all together, and they leave together.
"""

from __future__ import annotations

import functools
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lora_causal.core.errors import RunInterrupted

if TYPE_CHECKING:
    from lora_causal.core.rundir import RunDirectory


@functools.cache
def graceful_stop_class() -> type:
    """A TrainerCallback that turns SIGINT/SIGTERM into "finish this step, save a checkpoint, stop"."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self) -> None:
            self.signal_number: int | None = None

        def _handle(self, signal_number: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
            if self.signal_number is not None:
                raise KeyboardInterrupt  # a second signal stops at once
            self.signal_number = signal_number
            sys.stderr.write("\nstopping after this step and saving a checkpoint (signal again to stop at once)\n")

        @contextmanager
        def listening(self) -> Any:
            """Install the handlers for the duration of training (main thread only), then restore the old ones."""
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            from lora_causal.core.processes import agree_max

            agreed = agree_max(self.signal_number or 0, timeout_s=args.ddp_timeout)
            if agreed:
                self.signal_number = agreed
                control.should_save = True
                control.should_training_stop = True
            return control

    return GracefulStop


def stop_on_signal(signal_number: int, trainer: Any, run_dir: RunDirectory, manifest: dict[str, Any], is_main: bool,
                   save_adapter: Callable[[Path], None]) -> None:
    """After a SIGINT/SIGTERM stop: keep the adapter so far, mark the run interrupted, say how to resume."""
    from lora_causal.core.rundir import last_complete_checkpoint

    step = trainer.state.global_step
    checkpoint = last_complete_checkpoint(run_dir.checkpoints)
    save_adapter(run_dir.path / "adapter")
    if is_main:
        run_dir.update_manifest({**manifest, "status": "interrupted", "global_step": step,
                                 "error": f"stopped by {signal.Signals(signal_number).name}"})
    trainer.accelerator.wait_for_everyone()  # leave together: a launcher ends the others when one process exits
    raise RunInterrupted(
        f"stopped by {signal.Signals(signal_number).name} at step {step}: checkpoint {checkpoint} and the adapter so "
        f"far ({run_dir.path / 'adapter'}) are saved; run the same command again to resume",
        128 + signal_number,
    )


