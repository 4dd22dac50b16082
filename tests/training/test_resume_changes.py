"""Resume continues a run exactly or refuses: other data, or another number of processes, is refused in one line
before anything in the run folder changes; the same data and layout resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import (
    QA_ROWS,
    REPO,
    assert_one_line_error,
    base_recipe,
    launch_command,
    run_cli,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.slow


def _as_if_killed_after_the_last_checkpoint(run: Path) -> bytes:
    """The state a kill -9 between the last checkpoint and the end leaves: status still running."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    return (run / "manifest.json").read_bytes()


def test_resume_refuses_changed_data_and_process_count_and_continues_otherwise(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 2},
                       output={"dir": str(tmp_path / "run"), "save_steps": 1, "sample_prompts": []})
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    first = run_cli("train", str(recipe))
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    assert json.loads((run / "manifest.json").read_text())["layout"] == {"processes": 1, "rows_per_step": 2,
                                                                           "token_budget": 128}
    before = _as_if_killed_after_the_last_checkpoint(run)

    write_jsonl(data, [*QA_ROWS * 2, QA_ROWS[0]])  # the same file, one row more
    changed = run_cli("train", str(recipe))
    assert_one_line_error(changed.returncode, changed.stderr, r"output\.dir: the unfinished run in .* was trained on "
                          r"other data .*restore that data, or start afresh with --overwrite", changed.stdout)
    assert (run / "manifest.json").read_bytes() == before

    write_jsonl(data, QA_ROWS * 2)
    log = tmp_path / "launch"
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        two = subprocess.run(launch_command("--config_file",
                              str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "-m", "lora_causal", "train",
                              str(recipe)), cwd=REPO, stdout=out, stderr=err, timeout=300,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    err_text = log.with_suffix(".err").read_text()
    assert two.returncode != 0 and "exitcode  : 2" in err_text, err_text[-3000:]
    assert err_text.count("error: output.dir: the unfinished run in") == 1, err_text[-3000:]
    assert "started with 1 processes (2 rows per step) and this launch has 2 (4), so the steps already trained would not" \
           " be the same examples; launch 1 processes to resume it" in err_text
    assert (run / "manifest.json").read_bytes() == before

    same = run_cli("train", str(recipe))  # nothing changed: it resumes and finishes
    assert same.returncode == 0, same.stderr[-2000:]
    assert "resuming from" in same.stdout
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
