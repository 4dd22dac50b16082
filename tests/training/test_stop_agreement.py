"""A stop signal that reaches one of two processes stops both after the same step, with a complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QA_ROWS, REPO, base_recipe, launch_command, write_jsonl, write_recipe


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), None)


def _logged_steps(run: Path) -> int:
    try:
        return sum('"loss"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    run = tmp_path / "run"
    tree = base_recipe(tiny_model_dir, data, run, train={"max_steps": 400, "micro_batch_size": 1},
                       output={"dir": str(run), "save_steps": 1000, "sample_prompts": []})
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    log = tmp_path / "launch"
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        launcher = subprocess.Popen(
            launch_command("--config_file",
             str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "-m", "lora_causal", "train", str(recipe)),
            cwd=REPO, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while _logged_steps(run) < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, log.with_suffix(".err").read_text()[-3000:]
            time.sleep(0.05)
        (rank_1,) = [pid for pid in _descendants(launcher.pid) if _rank_of(pid) == "1"]
        os.kill(rank_1, signal.SIGTERM)  # one process only, mid-run: the other never sees a signal
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
    err_text = log.with_suffix(".err").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    step = manifest["global_step"]
    assert manifest["status"] == "interrupted" and 3 <= step < 400, err_text[-3000:]
    assert f"stopped by SIGTERM at step {step}: checkpoint" in err_text, err_text[-3000:]
    state = json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step  # the checkpoint is complete, at the step every process stopped after
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "exitcode  : 143" in err_text and "Traceback" not in err_text.split("stopped by SIGTERM")[0]
