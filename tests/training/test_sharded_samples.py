"""After sharded training the sample answers need a whole 4-bit copy of the base on the main process: when it cannot
fit they are skipped with a notice and the run still completes (a small device is simulated through the memory
check's seam; sharding itself needs GPUs, so the run here is one CPU process that takes the sharded path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.core.recipe_file import load_recipe


@pytest.mark.slow
def test_sample_answers_are_skipped_when_the_whole_copy_cannot_fit(tmp_path: Path, tiny_model_dir: Path,
                                                                   monkeypatch) -> None:
    from lora_causal.core import processes
    from lora_causal.model import memory
    from lora_causal.model.skeleton import model_config
    from lora_causal.training.run import run_training

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base_recipe(
        tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1},
        output={"dir": str(tmp_path / "run"), "sample_prompts": ["Q: What is two plus two?\nA:"]})))
    fits, needed, free = memory.whole_copy_fits(recipe, model_config(recipe.model))
    assert fits and 0 < needed < free  # the tiny base fits on this machine: without the check the answers would come
    monkeypatch.setattr(processes, "sharded_training", lambda: True)
    monkeypatch.setattr(memory, "free_bytes", lambda: needed - 1)  # a device one byte too small
    said: list[str] = []
    result = run_training(recipe, say=lambda *args: said.append(" ".join(map(str, args))))
    notices = [line for line in said if line.startswith("sample answers skipped")]
    assert len(notices) == 1 and "GiB free; answer them later with `lora-causal generate" in notices[0], said
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and result.samples == []
    assert not (tmp_path / "run" / "samples.json").exists()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
