"""What a person watching `lora-causal train` sees while the trainer runs.

`TrainingDisplay` is a transformers `TrainerCallback` with two faces, chosen once from where stdout goes:

- a terminal: one live rich display (step/total, epoch, elapsed, ETA, smoothed loss, learning rate, tokens/s,
  supervised tokens/s, peak memory), redrawn a few times a second; evaluation results are printed as lines above
  it. While it is shown, `sys.stdout`/`sys.stderr` and the logging handlers that write to them are routed through
  rich, so warnings land above the display instead of tearing it.
- anything else (CI, `nohup`, a pipe, a file): one plain line per logging step and per evaluation, e.g.
  `step 10/16 epoch 0.56 loss 1.2345 smooth 1.3012 lr 1.9e-04 grad_norm 0.52 tok/s 2,345 sup_tok/s 1,234
  mem 0.41GiB elapsed 0:00:12 eta 0:00:07`, with no carriage returns or dicts.

The numbers come from the trainer's logs, which `lora_causal.training.metrics.MetricsCallback` has already extended with
tokens/s, supervised tokens/s and peak memory (so it must come before this callback); metrics.jsonl stays the
machine-readable record. Only the main process draws. The trainer's own printer (raw dicts) and tqdm bar are
turned off where the trainer is built (`disable_tqdm`, `remove_callback(PrinterCallback)`).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import AbstractContextManager
from typing import Any

from transformers import TrainerCallback

from lora_causal.training.summary import format_duration

SMOOTHING = 0.6  # weight of the past in the loss's exponential moving average (TensorBoard's default)


def _number(value: float) -> str:
    return f"{value:,.0f}"


class SmoothedLoss:
    """Exponential moving average with TensorBoard's start-up correction (the first value is not pulled to 0)."""

    def __init__(self, weight: float = SMOOTHING) -> None:
        self.weight = weight
        self._average = 0.0
        self._count = 0

    def add(self, value: float) -> float:
        self._count += 1
        self._average = self.weight * self._average + (1 - self.weight) * value
        return self.value

    @property
    def value(self) -> float | None:
        if not self._count:
            return None
        return self._average / (1 - self.weight**self._count)


def train_line(step: int, max_steps: int, logs: dict[str, Any], smoothed: float | None, elapsed: float,
               eta: float | None) -> str:
    """One greppable line for a training log: `step N/M epoch E loss L ...` (fields missing from `logs` left out)."""
    parts = [f"step {step}/{max_steps}"]
    if "epoch" in logs:
        parts.append(f"epoch {logs['epoch']:.2f}")
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if smoothed is not None:
        parts.append(f"smooth {smoothed:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad_norm {logs['grad_norm']:.3g}")
    if "tokens_per_s" in logs:
        parts.append(f"tok/s {_number(logs['tokens_per_s'])}")
    if "supervised_tokens_per_s" in logs:
        parts.append(f"sup_tok/s {_number(logs['supervised_tokens_per_s'])}")
    if "peak_mem_gib" in logs:
        parts.append(f"mem {logs['peak_mem_gib']:.2f}GiB")
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)


def eval_line(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """One greppable line for an evaluation: `eval step N/M loss L [accuracy A] runtime S`."""
    parts = [f"eval step {step}/{max_steps}"]
    if "eval_loss" in logs:
        parts.append(f"loss {logs['eval_loss']:.4f}")
    if "eval_mean_token_accuracy" in logs:  # TRL's share of supervised tokens predicted right
        parts.append(f"accuracy {logs['eval_mean_token_accuracy']:.4f}")
    if "eval_runtime" in logs:
        parts.append(f"runtime {logs['eval_runtime']:.1f}s")
    return " ".join(parts)


class _Live(AbstractContextManager):
    """The terminal face: a rich Live display, with logging handlers that write to the terminal routed through it."""

    def __init__(self, console: Any, render: Any) -> None:
        from rich.live import Live

        self.live = Live(console=console, get_renderable=render, refresh_per_second=4, transient=False,
                         redirect_stdout=True, redirect_stderr=True)
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def __enter__(self) -> _Live:
        to_stdout, to_stderr = (sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__)
        self.live.start(refresh=True)  # from here on sys.stdout and sys.stderr print above the display
        for handler in _stream_handlers():
            old = handler.stream
            target = sys.stdout if old in to_stdout else sys.stderr if old in to_stderr else None
            if target is not None:
                handler.setStream(target)
                self._rerouted.append((handler, old))
        return self

    def __exit__(self, *exc: object) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted.clear()
        self.live.stop()


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every logging StreamHandler of the root and the named loggers (files excluded)."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers
            if type(handler) is logging.StreamHandler]


class TrainingDisplay(TrainerCallback):
    """Live progress in a terminal, one line per log elsewhere; silent on every process but the main one.

    Use it as a context manager around `trainer.train()` too: leaving the block ends the live display, so an error
    raised mid-training is printed on a clean line, below the last frame.
    """

    def __init__(self, is_main_process: bool = True, console: Any = None, interactive: bool | None = None) -> None:
        from rich.console import Console

        self.enabled = is_main_process
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.interactive = self.console.is_interactive if interactive is None else interactive
        self.smoothed = SmoothedLoss()
        self.latest: dict[str, Any] = {}
        self.max_steps = 0
        self.step = 0
        self.epoch = 0.0
        self.num_epochs: float | None = None
        self.evaluating: tuple[int, int] | None = None  # (batches done, batches) during an evaluation
        self._start_time: float | None = None
        self._start_step = 0
        self._live: _Live | None = None

    # -- timing ------------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return 0.0 if self._start_time is None else time.perf_counter() - self._start_time

    def eta(self) -> float | None:
        """Seconds left at the pace of the steps done in this session (resumed steps excluded)."""
        done = self.step - self._start_step
        if done <= 0 or self._start_time is None:
            return None
        return self.elapsed() / done * max(self.max_steps - self.step, 0)

    # -- trainer events ----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.max_steps = state.max_steps
        self.step = self._start_step = state.global_step
        self.num_epochs = getattr(state, "num_train_epochs", None) or args.num_train_epochs
        self._start_time = time.perf_counter()
        if not self.enabled:
            return
        if self.interactive:
            self._live = _Live(self.console, self.render)
            self._live.__enter__()
        else:
            resumed = f", resuming at step {self._start_step}" if self._start_step else ""
            every = "step" if args.logging_steps == 1 else f"{args.logging_steps} steps"
            steps = f"{self.max_steps} step{'' if self.max_steps == 1 else 's'}"
            self._say(f"training: {steps}{resumed}; a line every {every}")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.step = state.global_step
        self.epoch = state.epoch or 0.0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):  # noqa: ANN001
        try:
            total = len(eval_dataloader) if eval_dataloader is not None else 0
        except TypeError:
            total = 0
        done = self.evaluating[0] + 1 if self.evaluating else 1
        self.evaluating = (done, total)

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.evaluating = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if not logs:
            return
        self.step = state.global_step
        if "loss" in logs:
            self.smoothed.add(float(logs["loss"]))
            self.latest = dict(logs)
            if self.enabled and not self.interactive:
                self._say(train_line(self.step, self.max_steps, logs, self.smoothed.value, self.elapsed(), self.eta()))
        elif "eval_loss" in logs and self.enabled:
            self._say(eval_line(self.step, self.max_steps, logs))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.step = state.global_step
        self.close()

    # -- output ------------------------------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        """A line above the live display (or on its own in plain mode); never wrapped, so it stays greppable."""
        self.console.print(line, crop=False, overflow="ignore", soft_wrap=True, markup=False)

    def close(self) -> None:
        """End the live display (its last frame stays on screen)."""
        if self._live is not None:
            live, self._live = self._live, None
            live.__exit__(None, None, None)

    def __enter__(self) -> TrainingDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self) -> Any:
        """The live display: a bar with step/total, epoch, elapsed and ETA; below it the latest measurements."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        top = Table.grid(padding=(0, 1))
        top.add_row(
            Text("training", style="bold"),
            ProgressBar(total=max(self.max_steps, 1), completed=self.step, width=30),
            Text(f"step {self.step}/{self.max_steps}"),
            Text(f"epoch {self.epoch:.2f}" + (f"/{self.num_epochs:g}" if self.num_epochs else "")),
            Text(f"elapsed {format_duration(self.elapsed())}"),
            Text(f"eta {format_duration(self.eta())}", style="cyan"),
        )
        logs = self.latest
        fields = []
        if "loss" in logs:
            fields.append(f"loss {logs['loss']:.4f}")
            fields.append(f"smoothed {self.smoothed.value:.4f}")
        if "learning_rate" in logs:
            fields.append(f"lr {logs['learning_rate']:.2e}")
        if "tokens_per_s" in logs:
            fields.append(f"tok/s {_number(logs['tokens_per_s'])}")
        if "supervised_tokens_per_s" in logs:
            fields.append(f"supervised tok/s {_number(logs['supervised_tokens_per_s'])}")
        if "peak_mem_gib" in logs:
            fields.append(f"peak mem {logs['peak_mem_gib']:.2f} GiB")
        if self.evaluating is not None:
            done, total = self.evaluating
            fields.append(f"evaluating {done}/{total}" if total else "evaluating")
        bottom = Text("  ".join(fields) if fields else "waiting for the first logged step", style="dim" if not fields else "")
        return Group(top, bottom)
