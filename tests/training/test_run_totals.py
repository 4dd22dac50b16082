"""What a run reports about itself: the last step is always logged, token totals continue across a resume, and a
loss that stops being a number ends the run in one line instead of saving an adapter of non-numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import QA_ROWS, assert_one_line_error, base_recipe, call_cli, write_jsonl, write_recipe

from lora_causal.core.recipe_file import load_recipe
from lora_causal.training.metrics import TOKENS_FILE
from lora_causal.training.run import run_training


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_last_step_is_logged_and_totals_continue_after_a_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 5, "logging_steps": 2},
                       output={"save_steps": 2, "save_total_limit": 5})
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tree))
    run_training(recipe, say=lambda *_: None)
    run = tmp_path / "run"
    whole = [record for record in _records(run) if "loss" in record]
    assert [record["step"] for record in whole] == [1, 2, 4, 5]  # logging_steps 2, and the last step
    saved = json.loads((run / "checkpoints" / "checkpoint-2" / TOKENS_FILE).read_text())
    assert saved == {"tokens": whole[1]["tokens"], "supervised_tokens": whole[1]["supervised_tokens"]}

    # as a kill -9 after checkpoint 2 leaves it: running, later checkpoints and outputs gone
    for name in ("checkpoint-4", "checkpoint-5"):
        if (run / "checkpoints" / name).exists():
            shutil.rmtree(run / "checkpoints" / name)
    (run / "adapter").exists() and shutil.rmtree(run / "adapter")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(run) if r["step"] <= 2))
    result = run_training(recipe, say=lambda *_: None)
    assert result.resumed_from is not None and result.resumed_from.name == "checkpoint-2"
    resumed = [record for record in _records(run) if "loss" in record and record["step"] > 2]
    assert [record["step"] for record in resumed] == [4, 5]
    for again, first in zip(resumed, whole[2:]):  # the same totals as the run that was not interrupted
        assert (again["tokens"], again["supervised_tokens"]) == (first["tokens"], first["supervised_tokens"])


def test_a_loss_that_is_not_a_number_stops_the_run_in_one_line(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run",
                       train={"max_steps": 30, "logging_steps": 1, "learning_rate": 1.0e30, "max_grad_norm": 1.0e30,
                              "warmup_ratio": 0.0, "lr_scheduler": "constant"})
    code = call_cli(["train", str(write_recipe(tmp_path / "recipe.yaml", tree))])
    captured = capfd.readouterr()
    assert_one_line_error(code, captured.err, r"train: the loss became nan or infinite by step \d+ \(training stopped "
                          r"there, no adapter saved.*lower train\.learning_rate \(now 1e\+30\)", captured.out,
                          after_progress=True)
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    manifest_text = (run / "manifest.json").read_text()
    assert "NaN" not in manifest_text and json.loads(manifest_text)["status"] == "failed"
    text = (run / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # standard JSON: a non-number is null
    losses = [json.loads(line).get("loss", 0.0) for line in text.splitlines() if '"loss"' in line]
    assert losses[-1] is None and len(losses) < 30  # stopped at the first non-number


def test_an_unfinished_run_of_another_recipe_is_refused_naming_what_changed(tmp_path: Path, tiny_model_dir: Path) -> None:
    import pytest

    from lora_causal.core.errors import UserError

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 2}, output={"save_steps": 1})
    path = write_recipe(tmp_path / "recipe.yaml", tree)
    run_training(load_recipe(path), say=lambda *_: None)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    changed = load_recipe(path, ["train.token_budget=2048", "train.micro_batch_size=1", "output.overwrite=false"])
    with pytest.raises(UserError, match=r"holds an unfinished run of a different recipe \(train\.micro_batch_size: "
                                        r"was 2, now 1; train\.token_budget: was \"auto\", now 2048\); choose another"):
        run_training(changed, say=lambda *_: None)
