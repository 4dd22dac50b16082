"""A run's summary and loss plot, read from its files: what `lora-causal show RUN_DIR` and the end of training print.

Works on a finished, a still-running and an interrupted or resumed run alike, because it reads only what the run has
written so far: `manifest.json` (status) and `metrics.jsonl` (one JSON object per log, appended by
`lora_causal.training.metrics.MetricsCallback`). A resumed run appends a second attempt to the same file: a log
whose `attempt` differs from the previous one's (or, in older files, whose `elapsed_s` or `step` goes backwards)
starts a new attempt, steps logged twice keep their last record, times are summed over attempts, and token totals
continue from the checkpoint an attempt resumed (`tokens_at_start`; in older files, which restart them, they are
summed over attempts); tokens/s counts what each attempt computed, redone steps included. The last line of a run
still being written may be cut off mid-write; that one line is skipped, any other unreadable line is an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class RunSummary:
    status: str
    steps: int
    epoch: float | None
    seconds: float | None  # training time, evaluation included, summed over attempts
    tokens: int | None  # real tokens trained up to the last step (older runs: summed over attempts)
    supervised_tokens: int | None
    tokens_per_s: float | None
    peak_mem_gib: float | None
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None  # at the last evaluation
    eval_step: int | None
    logged_steps: int
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_duration(seconds: float | None) -> str:
    """`H:MM:SS` (or `-` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`; a missing or unreadable file is a `UserError`."""
    path = run_dir / METRICS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no {METRICS} yet (the run has not logged a step); wait for the first "
                        "logging step or check the folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if number == len(lines):  # no newline yet: a line being written right now
                continue
            raise UserError(f"{path} line {number}: not valid JSON; the file is damaged (each line is one log "
                            "record written by training)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path} line {number}: not a log record (expected an object with a 'step'); "
                            "the file is damaged") from None
        records.append(record)
    return records


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run folder's manifest and metrics records, or a `UserError` saying why it is not a readable run."""
    from lora_causal.core.readers import read_json_object
    from lora_causal.core.rundir import RUN_MARKER, is_run_dir

    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a folder; give the output.dir of a training run")
    if not is_run_dir(run_dir):  # a folder with a manifest.json of some other tool is not ours to read or write
        raise UserError(f"'{run_dir}' is not a lora_causal run folder (no {RUN_MARKER}); give the output.dir of a "
                        "training run")
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"'{run_dir}' has no manifest.json yet; the run has not started writing, wait a moment")
    manifest = read_json_object(run_dir / "manifest.json", "the run's manifest is damaged; train the run again")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir / METRICS}: no step logged yet; wait for the first logging step")
    return manifest, records


def split_attempts(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group records by training attempt: records name their attempt; in files written before they did, a record
    whose step or elapsed time goes backwards starts a new one."""
    attempts: list[list[dict[str, Any]]] = []
    previous: dict[str, Any] | None = None
    for record in records:
        if previous is not None and "attempt" in record and "attempt" in previous:
            restarted = record["attempt"] != previous["attempt"]
        else:
            restarted = previous is not None and (
                record["step"] < previous["step"]
                or record.get("elapsed_s", float("inf")) < previous.get("elapsed_s", 0.0)
            )
        if not attempts or restarted:
            attempts.append([])
        attempts[-1].append(record)
        previous = record
    return attempts


def by_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records holding `key`, one per step (the last written wins), in step order."""
    values = {record["step"]: float(record[key]) for record in records if isinstance(record.get(key), (int, float))}
    return sorted(values.items())


def summarize(manifest: dict[str, Any], records: list[dict[str, Any]]) -> RunSummary:
    """The summary of a run from its manifest and metrics records."""
    losses = by_step(records, "loss")
    evals = by_step(records, "eval_loss")
    attempts = split_attempts(records)
    train_logs = [[record for record in attempt if "loss" in record] for attempt in attempts]
    last_train = [logs[-1] for logs in train_logs if logs]

    def total(key: str) -> int | None:
        if last_train and "tokens_at_start" in last_train[-1]:  # totals continue across attempts
            value = last_train[-1].get(key)
            return value if isinstance(value, int) else None
        values = [record[key] for record in last_train if isinstance(record.get(key), int)]  # older runs
        return sum(values) if values else None

    tokens = total("tokens")
    # throughput counts what every attempt computed, steps redone after a resume included
    computed = sum(record["tokens"] - record.get("tokens_at_start", 0) for record in last_train
                   if isinstance(record.get("tokens"), int))
    train_seconds = sum(record.get("elapsed_s", 0.0) for record in last_train)
    seconds = [max((r.get("elapsed_s", 0.0) for r in attempt), default=0.0) for attempt in attempts]
    peaks = [record["peak_mem_gib"] for record in records if isinstance(record.get("peak_mem_gib"), (int, float))]
    epochs = [record["epoch"] for record in records if isinstance(record.get("epoch"), (int, float))]
    return RunSummary(
        status=str(manifest.get("status", "unknown")),
        steps=max((record["step"] for record in records), default=0),
        epoch=round(epochs[-1], 2) if epochs else None,
        seconds=round(sum(seconds), 1) if any(seconds) else None,
        tokens=tokens,
        supervised_tokens=total("supervised_tokens"),
        tokens_per_s=round(computed / train_seconds, 1) if computed and train_seconds > 0 else None,
        peak_mem_gib=max(peaks) if peaks else None,
        first_loss=losses[0][1] if losses else None,
        last_loss=losses[-1][1] if losses else None,
        eval_loss=evals[-1][1] if evals else None,
        eval_step=evals[-1][0] if evals else None,
        logged_steps=len(losses),
        attempts=len(attempts),
    )


def loss_plot_png(records: list[dict[str, Any]], title: str) -> bytes:
    """A PNG of train loss (line) and eval loss (markers) against the optimizer step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    losses, evals = by_step(records, "loss"), by_step(records, "eval_loss")
    if losses:
        axes.plot(*zip(*losses), color="#3a7d44", label="train loss")
    if evals:
        axes.plot(*zip(*evals), color="#c0392b", marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if losses or evals:
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_loss_plot(run_dir: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """Write (or refresh) `run_dir/loss.png` atomically from the run's metrics; return its path."""
    from lora_causal.core.rundir import write_bytes_atomic

    records = read_metrics(run_dir) if records is None else records
    path = run_dir / LOSS_PLOT
    write_bytes_atomic(path, loss_plot_png(records, f"{run_dir.resolve().name}: loss"))
    return path


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    """The summary as (label, value) rows, unknown values shown as `-`."""

    def value(number: float | None, fmt: str) -> str:
        return "-" if number is None else format(number, fmt)

    tokens = value(summary.tokens, ",")
    if summary.supervised_tokens is not None:
        tokens += f" ({summary.supervised_tokens:,} supervised)"
    eval_loss = value(summary.eval_loss, ".4f")
    if summary.eval_step is not None:
        eval_loss += f" (step {summary.eval_step})"
    steps = str(summary.steps) + (f" (epoch {summary.epoch:g})" if summary.epoch is not None else "")
    if summary.attempts > 1:
        steps += f", over {summary.attempts} attempts"
    return [
        ("status", summary.status),
        ("steps", steps),
        ("time", format_duration(summary.seconds) if summary.seconds is not None else "-"),
        ("tokens", tokens),
        ("tokens/s", value(summary.tokens_per_s, ",.0f")),
        ("peak memory", "-" if summary.peak_mem_gib is None else f"{summary.peak_mem_gib:.2f} GiB"),
        ("first loss", value(summary.first_loss, ".4f")),
        ("last loss", value(summary.last_loss, ".4f") + f" ({summary.logged_steps} logged steps)"),
        ("eval loss", eval_loss),
    ]


def print_summary(console: Any, summary: RunSummary, run_dir: Path, plot: Path | None) -> None:
    """The summary as aligned `label  value` lines under a title (plain text: readable in a log, greppable)."""
    rows = summary_rows(summary) + ([("loss plot", str(plot))] if plot is not None else [])
    width = max(len(label) for label, _ in rows)
    console.print(f"run summary: {run_dir}", crop=False, overflow="ignore")
    for label, text in rows:
        console.print(f"  {label:<{width}}  {text}", crop=False, overflow="ignore", markup=False)


def show_run(run_dir: Path, console: Any) -> RunSummary:
    """`lora-causal show`: print a run's summary and write its loss plot, from its files."""
    manifest, records = read_run(run_dir)
    summary = summarize(manifest, records)
    try:
        plot = write_loss_plot(run_dir, records)
    except PermissionError:
        raise UserError(f"cannot write {run_dir / LOSS_PLOT} (permission denied); run show where the run folder "
                        "is writable") from None
    print_summary(console, summary, run_dir, plot)
    if summary.status == "running":
        age = time.time() - (run_dir / METRICS).stat().st_mtime
        console.print(f"the run is still going (or stopped without a trace): last log written {_ago(age)}")
    return summary
