"""What training shows: plain lines off a terminal, a live display on one, the summary, the loss plot,
`lora-causal show`, and trackers (TensorBoard event files read back; a missing tracker refused up front)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QA_ROWS, REPO, assert_one_line_error, base_recipe, call_cli, run_cli, write_jsonl, write_recipe

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
STEPS = 4
TRAIN_LINE = re.compile(
    r"^step (\d+)/4 epoch \d+\.\d\d loss \d+\.\d{4} smooth \d+\.\d{4} lr \d\.\d\de[-+]\d\d grad_norm \S+ "
    r"tok/s [\d,]+ sup_tok/s [\d,]+ mem \d+\.\d\dGiB elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d$"
)
EVAL_LINE = re.compile(r"^eval step (\d+)/4 loss \d+\.\d{4}( accuracy \d\.\d{4})? runtime \d+\.\ds$")


def _recipe(folder: Path, model_dir: Path, **sections: dict) -> Path:
    train = write_jsonl(folder / "qa.jsonl", QA_ROWS * 2)
    held_out = write_jsonl(folder / "held_out.jsonl", QA_ROWS[:2])
    tree = base_recipe(model_dir, train, folder / "run",
                       train={"max_steps": STEPS, "logging_steps": 1, "eval_steps": 2}, **sections)
    tree["data"]["eval"] = {"path": str(held_out)}
    return write_recipe(folder / "recipe.yaml", tree)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One short run with evaluation, its output piped (not a terminal), TensorBoard on where installed."""
    folder = tmp_path_factory.mktemp("progress")
    output = {"report_to": ["tensorboard"]} if HAS_TENSORBOARD else {}
    recipe = _recipe(folder, tiny_model_dir, output=output)
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", result


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_piped_output_is_one_plain_line_per_log_without_dicts_or_carriage_returns(finished) -> None:
    run, result = finished
    assert "\r" not in result.stdout + result.stderr  # no progress bar redraws, ours or the libraries'
    assert "{'" not in result.stdout + result.stderr and "{\"" not in result.stdout  # no raw dicts
    lines = result.stdout.splitlines()
    train_lines = [line for line in lines if line.startswith("step ")]
    assert [int(TRAIN_LINE.match(line).group(1)) for line in train_lines] == [1, 2, 3, 4], train_lines
    eval_lines = [line for line in lines if line.startswith("eval step ")]
    assert [int(EVAL_LINE.match(line).group(1)) for line in eval_lines] == [2, 4], eval_lines
    # the lines carry the numbers metrics.jsonl records
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert [line.split(" loss ")[1].split()[0] for line in train_lines] == [f"{loss:.4f}" for loss in losses]
    assert "training: 4 steps; a line every step" in lines


def test_the_summary_and_loss_plot_come_from_the_run_files(finished) -> None:
    run, result = finished
    records = _records(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["steps"] == STEPS and summary["logged_steps"] == STEPS and summary["attempts"] == 1
    assert summary["first_loss"] == train[0]["loss"] and summary["last_loss"] == train[-1]["loss"]
    assert summary["eval_loss"] == evals[-1]["eval_loss"] and summary["eval_step"] == STEPS
    assert summary["tokens"] == train[-1]["tokens"] > summary["supervised_tokens"] == train[-1]["supervised_tokens"] > 0
    assert summary["tokens_per_s"] == round(train[-1]["tokens"] / train[-1]["elapsed_s"], 1)
    printed = result.stdout.split(f"run summary: {run}\n", 1)[1].splitlines()
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in printed[:10])
    assert rows["status"] == "completed" and rows["steps"].startswith(f"{STEPS} (epoch ")
    assert rows["first loss"] == f"{train[0]['loss']:.4f}"
    assert rows["last loss"] == f"{train[-1]['loss']:.4f} ({STEPS} logged steps)"
    assert rows["eval loss"] == f"{evals[-1]['eval_loss']:.4f} (step {STEPS})"
    assert rows["tokens"] == f"{train[-1]['tokens']:,} ({train[-1]['supervised_tokens']:,} supervised)"
    assert rows["loss plot"] == str(run / "loss.png")
    from PIL import Image

    with Image.open(run / "loss.png") as image:
        assert image.format == "PNG" and image.size == (700, 360)


def test_show_prints_a_finished_runs_summary_and_rewrites_its_plot(finished) -> None:
    run, result = finished
    (run / "loss.png").unlink()
    shown = run_cli("show", str(run))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == result.stdout[result.stdout.index("run summary:"):result.stdout.index("adapter saved to")]
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_show_reads_a_run_still_being_written(finished, tmp_path: Path) -> None:
    """A running run: manifest 'running', metrics.jsonl ending in a line being written (no newline yet)."""
    import shutil

    run = tmp_path / "running"
    shutil.copytree(finished[0], run)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first_two_steps = [line for line in lines if json.loads(line)["step"] <= 2]
    (run / "metrics.jsonl").write_text("\n".join(first_two_steps) + "\n" + lines[len(first_two_steps)][:20])
    shown = run_cli("show", str(run))
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^  status\s+running$", shown.stdout, re.M)
    assert re.search(r"^  steps\s+2 \(epoch ", shown.stdout, re.M)
    assert "the run is still going (or stopped without a trace): last log written" in shown.stdout


@pytest.mark.parametrize("case", ["missing", "file", "not-a-run", "no-metrics", "corrupt-metrics", "empty-metrics"])
def test_show_refuses_what_is_not_a_readable_run(case: str, finished, tmp_path: Path, capsys) -> None:
    import shutil

    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
    elif case == "not-a-run":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    elif case != "missing":
        shutil.copytree(finished[0], target)
        metrics = target / "metrics.jsonl"
        if case == "no-metrics":
            metrics.unlink()
        elif case == "empty-metrics":
            metrics.write_text("")
        else:
            lines = metrics.read_text().splitlines()
            metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    code = call_cli(["show", str(target)])
    captured = capsys.readouterr()
    expected = {
        "missing": "is not a folder", "file": "is not a folder", "not-a-run": r"not a lora_causal run folder \(no \.lora_causal_run\.json",
        "no-metrics": "no metrics.jsonl yet", "corrupt-metrics": "metrics.jsonl line 2: not valid JSON",
        "empty-metrics": "no step logged yet",
    }[case]
    assert_one_line_error(code, captured.err, expected, captured.out)
    assert captured.out == ""


def test_summary_of_a_resumed_run_sums_its_attempts() -> None:
    from lora_causal.training.summary import summarize

    first = [
        {"step": 1, "loss": 6.0, "tokens": 100, "supervised_tokens": 10, "elapsed_s": 1.0, "peak_mem_gib": 0.5},
        {"step": 10, "loss": 5.0, "tokens": 1000, "supervised_tokens": 100, "elapsed_s": 10.0, "peak_mem_gib": 0.6},
        {"step": 10, "eval_loss": 5.5, "elapsed_s": 11.0},
        {"step": 20, "loss": 4.0, "tokens": 2000, "supervised_tokens": 200, "elapsed_s": 20.0, "peak_mem_gib": 0.6},
    ]
    # resumed from checkpoint-10: step 20 is trained (and logged) again, counters and clock restart
    second = [
        {"step": 20, "loss": 3.9, "tokens": 1000, "supervised_tokens": 100, "elapsed_s": 9.0, "peak_mem_gib": 0.7},
        {"step": 30, "loss": 3.0, "tokens": 2000, "supervised_tokens": 200, "elapsed_s": 18.0, "peak_mem_gib": 0.7},
        {"step": 30, "eval_loss": 4.5, "elapsed_s": 19.0},
    ]
    summary = summarize({"status": "completed"}, first + second)
    assert summary.attempts == 2 and summary.steps == 30
    assert (summary.first_loss, summary.last_loss, summary.logged_steps) == (6.0, 3.0, 4)  # step 20 once, the rerun's
    assert (summary.tokens, summary.supervised_tokens) == (4000, 400)
    assert summary.seconds == 39.0 and summary.tokens_per_s == round(4000 / 38.0, 1)
    assert (summary.eval_loss, summary.eval_step, summary.peak_mem_gib) == (4.5, 30, 0.7)


def test_attempts_are_told_apart_by_their_id_whatever_the_timing() -> None:
    """Stopped at step 11 (one past a log) and resumed slowly: neither step nor clock goes back, the id changes."""
    from lora_causal.training.summary import split_attempts

    first = [{"step": 10, "attempt": "a", "loss": 5.0, "elapsed_s": 5.0}]
    second = [{"step": 20, "attempt": "b", "loss": 4.0, "elapsed_s": 21.0},
              {"step": 30, "attempt": "b", "loss": 3.0, "elapsed_s": 22.0}]
    assert split_attempts(first + second) == [first, second]
    assert len(split_attempts([{k: v for k, v in r.items() if k != "attempt"} for r in first + second])) == 1


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'lora-causal[tensorboard]')")
def test_tensorboard_event_files_hold_the_logged_scalars(finished) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finished
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "train/tokens_per_s", "train/peak_mem_gib"} <= scalars
    records = _records(run)
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == logged
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_a_tracker_that_is_not_installed_is_refused_before_anything_starts(tmp_path: Path, tiny_model_dir: Path,
                                                                            capsys) -> None:
    from lora_causal.training.trackers import TRACKERS, tracker_installed

    missing = next((name for name in TRACKERS if not tracker_installed(name)), None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    recipe = _recipe(tmp_path, tiny_model_dir, output={"report_to": [missing]})
    for command in ("validate", "train"):
        code = call_cli([command, str(recipe)])
        captured = capsys.readouterr()
        assert_one_line_error(code, captured.err, rf"^error: output.report_to: {missing} is not installed; install it "
                                                  r"with `pip install .*` or remove", captured.out)
        assert not (tmp_path / "run").exists()


def test_the_live_display_routes_warnings_and_log_lines_above_itself(tmp_path: Path) -> None:
    from rich.console import Console
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_causal.training.progress import TrainingDisplay

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    display = TrainingDisplay(console=console)
    assert display.interactive
    logger = logging.getLogger("lora_causal.test_progress")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=1, report_to="none", use_cpu=True)
    state = TrainerState(max_steps=8, global_step=0)
    try:
        with display:
            display.on_train_begin(args, state, TrainerControl())
            state.global_step, state.epoch = 2, 0.5
            display.on_step_end(args, state, TrainerControl())
            display.on_log(args, state, TrainerControl(), logs={"loss": 1.5, "learning_rate": 1e-4,
                                                                "tokens_per_s": 1234.5, "peak_mem_gib": 0.25})
            sys.stderr.write("UserWarning: a library warning\n")  # what warnings.warn writes
            logger.warning("a logged warning")
            print("a printed line")
            display.on_log(args, state, TrainerControl(), logs={"eval_loss": 2.25, "eval_runtime": 0.5})
        assert handler.stream is sys.stderr  # restored
    finally:
        logger.removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    lines = [line.strip() for line in re.split(r"[\r\n]+", text)]
    for message in ("a logged warning", "a printed line", "eval step 2/8 loss 2.2500 runtime 0.5s"):
        assert message in lines, lines  # printed whole, on its own line, above the display
    assert any(line.endswith("UserWarning: a library warning") for line in lines), lines
    assert any(line.startswith("training") and "step 2/8" in line and "eta 0:" in line for line in lines), lines
    assert any("loss 1.5000" in line and "tok/s 1,234" in line and "peak mem 0.25 GiB" in line for line in lines)


def test_a_terminal_run_draws_step_total_and_eta_under_a_pseudo_terminal(tmp_path: Path, tiny_model_dir: Path) -> None:
    import fcntl
    import pty
    import termios

    recipe = _recipe(tmp_path, tiny_model_dir)
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "lora_causal", "train", str(recipe)], cwd=REPO,
                               stdin=child, stdout=child, stderr=child,
                               env={**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"})
    os.close(child)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert process.returncode == 0, text[-3000:]
    assert re.search(r"training .*step 4/4 .*elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d", text), text[-3000:]
    assert re.search(r"loss \d+\.\d{4}  smoothed \d+\.\d{4}  lr ", text), text[-3000:]
    assert re.search(r"(^|\r)eval step 4/4 loss ", text, re.M), text[-3000:]  # a line above the display
    assert "{'" not in text and " smooth " not in text  # no dicts; no plain log lines on a terminal
    assert "run summary:" in text


def test_summary_of_a_resumed_run_continues_its_token_totals() -> None:
    from lora_causal.training.summary import summarize

    first = [
        {"step": 10, "loss": 5.0, "tokens": 1000, "supervised_tokens": 100, "tokens_at_start": 0, "elapsed_s": 10.0},
        {"step": 20, "loss": 4.0, "tokens": 2000, "supervised_tokens": 200, "tokens_at_start": 0, "elapsed_s": 20.0},
    ]
    # resumed from checkpoint-10 (1000 tokens seen): step 20 is trained again, the totals continue from the checkpoint
    second = [
        {"step": 20, "loss": 3.9, "tokens": 2000, "supervised_tokens": 200, "tokens_at_start": 1000, "elapsed_s": 9.0},
        {"step": 30, "loss": 3.0, "tokens": 3000, "supervised_tokens": 300, "tokens_at_start": 1000, "elapsed_s": 18.0},
    ]
    summary = summarize({"status": "completed"}, [{**r, "attempt": "a"} for r in first] +
                        [{**r, "attempt": "b"} for r in second])
    assert (summary.tokens, summary.supervised_tokens) == (3000, 300)  # what the finished run trained, once
    assert summary.tokens_per_s == round((2000 + 2000) / 38.0, 1)  # what was computed, the redone steps too
