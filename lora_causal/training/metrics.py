"""Training measurements: supervised and real tokens per batch, tokens/s, peak memory, metrics.jsonl."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_causal.core.rundir import standard_json


class TokenMeter:
    """Running totals of the batches training has consumed.

    Counts computed on the GPU stay there (adding them queues work, it never waits for the GPU); a total is
    read back, one host sync, only when it is asked for (once per logging step).
    """

    def __init__(self) -> None:
        self.padded = 0  # positions computed, padding included (known from shapes, no device work)
        self._host_tokens = 0  # real tokens of batches without an attention mask (all of them are real)
        self._device_tokens: Any = 0  # real (non-pad) tokens counted from attention masks
        self._device_targets: Any = 0  # positions the loss scores

    def add(self, batch: Mapping[str, Any], filler_tokens: int = 0) -> None:
        """Count a batch; `filler_tokens` of it are filler rows (see even_split), computed but not data."""
        self._device_targets = self._device_targets + (batch["labels"][..., 1:] != -100).sum()
        self.padded += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self._host_tokens -= int(filler_tokens)
        if mask is None:
            self._host_tokens += batch["input_ids"].numel()
        else:
            self._device_tokens = self._device_tokens + mask.sum()

    @property
    def tokens(self) -> int:
        """Real (non-pad) tokens so far."""
        return self._host_tokens + int(self._device_tokens)

    @property
    def target_tokens(self) -> int:
        """Supervised positions so far."""
        return int(self._device_targets)


def peak_rss_gib() -> float:
    """The process's peak resident memory (ru_maxrss is bytes on macOS, KiB elsewhere)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_gib()


def _sum_over_processes(*values: int) -> list[int]:
    """The totals of all processes (every process logs at the same steps, so all of them get here)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


TOKENS_FILE = "lora_causal_tokens.json"  # in each checkpoint: the tokens trained up to it


class MetricsCallback(TrainerCallback):
    """Adds token counts, tokens/s, supervised tokens/s (all processes together) and peak memory (this process) to
    each training log, the seconds since training started to every log, and appends each log to metrics.jsonl
    (main process only).

    Per training log: `tokens` and `supervised_tokens` are totals since the run started (a resumed run adds what the
    checkpoint it resumes from had seen, `TOKENS_FILE`, written with every checkpoint), `tokens_per_s` and
    `supervised_tokens_per_s` cover the interval since the previous training log, `elapsed_s` the time since
    training started in this process. Every record in metrics.jsonl also names its `attempt` (one id per process
    that trained), so a summary can tell a resumed run's attempts apart whatever the timing. Callbacks that read
    these fields (the progress display, trackers) must come after this one.
    """

    def __init__(self, path: Path, is_main_process: bool, meter: TokenMeter) -> None:
        self.meter = meter
        self.base = (0, 0)  # tokens and supervised tokens trained before this attempt (resumed runs)
        self.nonfinite_step: int | None = None  # the step whose logged loss was nan or infinite
        self.path = path
        self.is_main_process = is_main_process
        self.history: list[dict[str, Any]] = []
        self._start_time = self._last_time = time.perf_counter()
        self._last_tokens = self._last_target_tokens = 0
        self.attempt = uuid.uuid4().hex[:12]

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self._start_time = self._last_time = time.perf_counter()
        self._last_tokens, self._last_target_tokens = self.meter.tokens, self.meter.target_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if logs is None:
            return
        if "loss" in logs:
            tokens, target_tokens = _sum_over_processes(self.meter.tokens, self.meter.target_tokens)
            elapsed = max(time.perf_counter() - self._last_time, 1e-9)
            logs["tokens"] = tokens + self.base[0]
            logs["supervised_tokens"] = target_tokens + self.base[1]
            logs["tokens_at_start"] = self.base[0]  # of this attempt: what it trained is the difference
            if not math.isfinite(float(logs["loss"])) and self.nonfinite_step is None:
                self.nonfinite_step = state.global_step  # training stops here (nothing after it can recover)
                control.should_training_stop = True
            logs["tokens_per_s"] = round((tokens - self._last_tokens) / elapsed, 1)
            logs["supervised_tokens_per_s"] = round((target_tokens - self._last_target_tokens) / elapsed, 1)
            logs["peak_mem_gib"] = round(peak_memory_gib(), 3)
            self._last_time, self._last_tokens, self._last_target_tokens = time.perf_counter(), tokens, target_tokens
        logs["elapsed_s"] = round(time.perf_counter() - self._start_time, 3)
        record = {"step": state.global_step, "attempt": self.attempt,
                  **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        self.history.append(record)
        if self.is_main_process:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(standard_json(record) + "\n")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True  # the last step is always logged: the summary's totals end where training did
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        """Every process takes part (a sum over processes); the main one writes the totals into the checkpoint."""
        totals = _sum_over_processes(self.meter.tokens, self.meter.target_tokens)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.is_main_process and folder.is_dir():
            (folder / TOKENS_FILE).write_text(json.dumps({"tokens": totals[0] + self.base[0],
                                                          "supervised_tokens": totals[1] + self.base[1]}))

    def resume_from(self, checkpoint: Path) -> None:
        """Count on from the totals `checkpoint` had seen (none if it predates them)."""
        try:
            seen = json.loads((checkpoint / TOKENS_FILE).read_text())
            self.base = (int(seen["tokens"]), int(seen["supervised_tokens"]))
        except (OSError, ValueError, KeyError, TypeError):
            self.base = (0, 0)

    def losses(self) -> list[float]:
        return [record["loss"] for record in self.history if "loss" in record]
