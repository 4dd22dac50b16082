"""End to end through real processes: the demo recipe, `validate`, and `accelerate launch -m lora_causal`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, REPO, base_recipe, launch_command, run_cli, write_jsonl, write_recipe

pytestmark = pytest.mark.slow


def test_demo_recipe_learns_its_answers(tmp_path: Path) -> None:
    result = run_cli("train", "recipes/demo.yaml", f"output.dir={tmp_path / 'demo'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    run = tmp_path / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["last_loss"] < manifest["first_loss"] / 10  # the loss falls by more than 10x
    samples = json.loads((run / "samples.json").read_text())
    assert [s["after"] for s in samples] == ["Paris.", "Tokyo.", "Nairobi."]
    assert all(s["before"] != s["after"] for s in samples)
    assert f"run summary: {run}" in result.stdout and "after training" in result.stdout
    assert (run / "loss.png").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # the adapter names its base as the demo's config folder, relative to itself: not this machine's weights cache
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == os.path.relpath(REPO / "recipes" / "demo" / "tiny-llama", run / "adapter")
    # output.merge: the NF4-roundtrip merge reproduces the model as trained, and answers the same
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["base"] == "nf4-roundtrip" and report["verdict"].startswith("faithful")
    assert str(tmp_path) not in json.dumps(report) and str(Path.home()) not in json.dumps(report)
    assert "verdict: faithful" in result.stdout
    answer = run_cli("generate", str(run / "merged"), "--prompt", "Q: What is the capital of Italy?\nA:")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() == "Rome."


def test_validate_prints_the_resolved_recipe_through_the_console_script() -> None:
    script = Path(sys.executable).parent / "lora-causal"
    result = subprocess.run([str(script), "validate", "recipes/demo.yaml", "train.learning_rate=1e-3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.001" in result.stdout
    assert f"name_or_path: {REPO / 'recipes' / 'demo' / 'tiny-llama'}" in result.stdout
    assert "# BitsAndBytesConfig:" in result.stdout and "# LoraConfig:" in result.stdout
    assert "# recipe is valid" in result.stdout


def test_accelerate_launch_runs_the_same_code_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "unused", train={"max_steps": 2}))
    direct = run_cli("train", str(recipe), f"output.dir={tmp_path / 'direct'}")
    assert direct.returncode == 0, direct.stderr[-3000:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launched = subprocess.run(
        launch_command("--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
         "-m", "lora_causal", "train", str(recipe), f"output.dir={tmp_path / 'launched'}"),
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    first = load_file(tmp_path / "direct" / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "launched" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    # same seed, same data order, same code: equal up to float reduction order (accelerate may set other thread counts)
    assert all(torch.allclose(first[name], second[name], atol=1e-6) for name in first)
