"""Never lose a run: kill -9 and rerun, SIGINT/SIGTERM checkpoints, and the security rules."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, REPO, base_recipe, call_cli, run_cli, write_jsonl, write_recipe

pytestmark = pytest.mark.slow
STEPS = 40  # long enough that a kill or a signal at checkpoint-10 lands mid-run, short enough to rerun
TOLERANCE = 1e-5  # resumed and uninterrupted adapters agree to float rounding (same seed, data order, RNG state)


@pytest.fixture(scope="module")
def recipe_and_reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A recipe long enough to interrupt, and the adapter of its uninterrupted run."""
    folder = tmp_path_factory.mktemp("resilience")
    data = write_jsonl(folder / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(tiny_model_dir, data, folder / "unused",
                       train={"max_steps": STEPS, "logging_steps": 10, "learning_rate": 1.0e-3},
                       output={"save_steps": 10})
    recipe = write_recipe(folder / "recipe.yaml", tree)
    result = run_cli("train", str(recipe), f"output.dir={folder / 'reference'}")
    assert result.returncode == 0, result.stderr[-2000:]
    return recipe, folder / "reference" / "adapter" / "adapter_model.safetensors"


def _start(recipe: Path, output: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_causal", "train", str(recipe), f"output.dir={output}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_checkpoint(output: Path, step: int, process: subprocess.Popen[str], timeout: float = 240) -> None:
    marker = output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, f"training ended before checkpoint-{step}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} after {timeout}s"
        time.sleep(0.01)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """A command run in this process (the interrupted runs are real processes; what follows them need not be)."""
    code = call_cli(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_same_adapter(first: Path, second: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOLERANCE), (name, (a[name] - b[name]).abs().max())


def test_kill_9_then_rerun_ends_with_the_uninterrupted_adapter(recipe_and_reference, tmp_path: Path, capsys) -> None:
    recipe, reference = recipe_and_reference
    output = tmp_path / "run"
    process = _start(recipe, output)
    _wait_for_checkpoint(output, 10, process)
    process.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    process.communicate()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "running" and not (output / "adapter").exists()
    code, shown, err = _cli(capsys, "show", str(output))  # what a killed run left is still readable
    assert code == 0, err
    assert re.search(r"^  status\s+running$", shown, re.M) and "the run is still going" in shown

    code, out, err = _cli(capsys, "train", str(recipe), f"output.dir={output}")
    assert code == 0, err[-2000:]
    assert "resuming from" in out
    assert json.loads((output / "manifest.json").read_text())["resumed_from"].startswith(str(output / "checkpoints"))
    _assert_same_adapter(output / "adapter" / "adapter_model.safetensors", reference)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_adapter_then_resumes(recipe_and_reference, tmp_path: Path, signal_number: int,
                                                          capsys) -> None:
    recipe, reference = recipe_and_reference
    output = tmp_path / "run"
    process = _start(recipe, output)
    _wait_for_checkpoint(output, 10, process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, err[-2000:]
    assert "Traceback" not in err
    name = signal.Signals(signal_number).name
    final = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(final) == 1 and f"stopped by {name} at step" in final[0]
    assert final[0].endswith("run the same command again to resume")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    step = manifest["global_step"]
    assert 10 <= step < STEPS
    assert (output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()  # saved at the stop
    assert (output / "adapter" / "adapter_model.safetensors").is_file()  # the adapter so far
    assert (output / "loss.png").is_file()  # the plot so far
    code, shown, err = _cli(capsys, "show", str(output))
    assert code == 0, err
    assert re.search(r"^  status\s+interrupted$", shown, re.M)
    assert re.search(rf"^  steps\s+{step} \(epoch ", shown, re.M), shown

    code, out, err = _cli(capsys, "train", str(recipe), f"output.dir={output}", "--resume")
    assert code == 0, err[-2000:]
    assert f"resuming from {output / 'checkpoints' / f'checkpoint-{step}'}" in out
    _assert_same_adapter(output / "adapter" / "adapter_model.safetensors", reference)
    # the resumed run's summary spans both attempts and every step
    assert re.search(rf"^  steps\s+{STEPS} \(epoch .*\), over 2 attempts$", out, re.M), out


def test_a_half_written_checkpoint_is_skipped_on_resume(recipe_and_reference, tmp_path: Path, capsys) -> None:
    recipe, reference = recipe_and_reference
    output = tmp_path / "run"
    process = _start(recipe, output)
    _wait_for_checkpoint(output, 10, process)
    process.kill()
    process.communicate()
    # as if the kill had landed in the middle of writing the next checkpoint
    partial = output / "checkpoints" / "checkpoint-999"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    code, out, err = _cli(capsys, "train", str(recipe), f"output.dir={output}")
    assert code == 0, err[-2000:]
    assert "checkpoint-999" not in out and not partial.exists()
    _assert_same_adapter(output / "adapter" / "adapter_model.safetensors", reference)


def test_no_user_file_is_ever_unpickled() -> None:
    """Our code never calls pickle, and torch.load only with weights_only=True."""
    for source in (REPO / "lora_causal").rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("pickle", "dill", "cloudpickle") for name in names), source
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(getattr(node.func, "value", None), "id", None) == "torch":
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert keywords.get("weights_only") is True, f"{source}:{node.lineno}"


def test_trust_remote_code_is_off_by_default_and_announced_when_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.training.run import run_training

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1})
    assert load_recipe(write_recipe(tmp_path / "r.yaml", tree)).model.trust_remote_code is False
    tree["model"]["trust_remote_code"] = True
    lines: list[str] = []
    run_training(load_recipe(write_recipe(tmp_path / "r.yaml", tree)), say=lambda line: lines.append(str(line)))
    assert "trust_remote_code is true" in lines[0] and "will run here" in lines[0]  # before anything is loaded


def test_a_failed_folder_write_leaves_no_staging_folder(tmp_path: Path) -> None:
    from lora_causal.core.rundir import write_dir_atomic

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("previous adapter")

    def fail(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_dir_atomic(target, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left
    assert (target / "old.txt").read_text() == "previous adapter"  # the old one untouched
    write_dir_atomic(target, lambda staging: (staging / "new.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
