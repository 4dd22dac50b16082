"""Hostile input across recipe, data, CLI and merge: exit 2, one clear line, no traceback, nothing half-written.

(tests/commands/test_cli_errors.py holds the first 30 cases: typos, types, missing files, malformed rows, ...)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import QA_ROWS, assert_one_line_error, base_recipe, call_cli, write_jsonl, write_recipe


def _recipe_file(tmp_path: Path, model_dir: Path, rows: list[Any] | None = None, fmt: str = "prompt_completion",
                 **sections: Any) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", QA_ROWS if rows is None else rows)
    tree = base_recipe(model_dir, data, tmp_path / "run", **sections)
    tree["data"]["train"]["format"] = fmt
    return write_recipe(tmp_path / "recipe.yaml", tree)


def _text_recipe(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""

Case = Callable[[Path, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {
    "alias bomb": lambda t, m: (["validate", str(_text_recipe(t, ALIAS_BOMB))], r"anchors and aliases .* are not allowed"),
    "empty recipe file": lambda t, m: (["validate", str(_text_recipe(t, ""))], r"must be a YAML mapping"),
    "binary recipe file": lambda t, m: (["validate", str(_text_recipe(t, bytes(range(256))))], r"cannot read the recipe"),
    "huge integer": lambda t, m: (["validate", str(_recipe_file(t, m)), "lora.r=1000000000000000000000000"], r"lora\.r: .* is too large"),
    "float overflow": lambda t, m: (["validate", str(_recipe_file(t, m)), "train.learning_rate=1e400"], r"train\.learning_rate: inf is not a finite number"),
    "nan learning rate": lambda t, m: (["validate", str(_recipe_file(t, m)), "train.learning_rate=.nan"], r"train\.learning_rate: nan is not a finite number"),
    "empty model path": lambda t, m: (["validate", str(_recipe_file(t, m)), "model.name_or_path="], r"model\.name_or_path: (string should have at least 1 character|input should be a valid string)"),
    "list instead of a section": lambda t, m: (["validate", str(_recipe_file(t, m)), "lora=[1, 2]"], r"lora: input should be a valid dictionary"),
    "unknown format with suggestion": lambda t, m: (["validate", str(_recipe_file(t, m)), "data.train.format=message"], r"data\.train\.format: 'message' is not one of .*did you mean 'messages'"),
    "columns for another format": lambda t, m: (["validate", str(_recipe_file(t, m)), "data.train.columns={text: body}"], r"data\.train\.columns: 'text' is not a field of format 'prompt_completion'"),
    "template outside alpaca": lambda t, m: (["validate", str(_recipe_file(t, m)), "data.train.template='{instruction}'"], r"data\.train\.template: applies to format 'alpaca' only"),
    "zero max_length": lambda t, m: (["validate", str(_recipe_file(t, m)), "data.max_length=0"], r"data\.max_length: input should be greater than 0"),
    "split ratio of one or more": lambda t, m: (["validate", str(_recipe_file(t, m)), "data.eval={split_ratio: 1.5}"], r"data\.eval\.split_ratio: input should be less than 1"),
    "missing recipe_version": lambda t, m: (["validate", str(_text_recipe(t, "model: {name_or_path: x}\n"))], r"recipe_version: required key is missing"),
    "empty completion": lambda t, m: (["train", str(_recipe_file(t, m, [{"prompt": "Q: hi\nA:", "completion": "  "}]))], r"line 1: 'completion' is empty; fill it or remove the row"),
    "empty assistant content": lambda t, m: (["train", str(_recipe_file(t, m, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}], fmt="messages"))], r"line 1: message 1 \(assistant\) has empty content"),
    "message without a role": lambda t, m: (["train", str(_recipe_file(t, m, [{"messages": [{"content": "hi"}]}], fmt="messages"))], r"line 1: message 0 must be an object with role and content"),
    "messages not a list": lambda t, m: (["train", str(_recipe_file(t, m, [{"messages": "hi"}], fmt="messages"))], r"line 1: 'messages' must be a non-empty list of messages"),
    "row that is not an object": lambda t, m: (["train", str(_recipe_file(t, m, [["Q: hi", "A"]]))], r"line 1: expected an object with fields, got list"),
    "text parquet file": lambda t, m: (["train", str(_recipe_file(t, m)), f"data.train.path={_write(t / 'fake.parquet', 'not parquet')}"], r"fake\.parquet is not a readable Parquet file"),
    "data folder without data files": lambda t, m: (["train", str(_recipe_file(t, m)), f"data.train.path={_folder(t / 'empty', 'notes.txt')}"], r"the folder '.*empty' holds no \.jsonl, \.json, \.csv or \.parquet files"),
    "unsupported data file type": lambda t, m: (["train", str(_recipe_file(t, m)), f"data.train.path={_write(t / 'data.txt', 'hi')}"], r"'data\.txt' has an unsupported type"),
    "output dir under a file": lambda t, m: (["train", str(_recipe_file(t, m)), f"output.dir={_write(t / 'afile', 'x')}/run"], r"output\.dir: '.*afile' is a file, so .* cannot be created"),
    "activation offloading without a GPU": lambda t, m: (["validate", str(_recipe_file(t, m)), "train.activation_offloading=true"], r"train\.activation_offloading moves activations between a GPU and the CPU; there is no GPU here"),
    "eval_steps without eval data": lambda t, m: (["validate", str(_recipe_file(t, m)), "train.eval_steps=5"], r"train\.eval_steps is set but there is no data\.eval"),
    "resume with nothing to resume": lambda t, m: (["train", str(_recipe_file(t, m)), "--resume"], r"--resume: '.*run' holds no unfinished run of this recipe"),
    "unknown command": lambda t, m: (["fly"], r"argument command: invalid choice: 'fly'"),
    "missing recipe argument": lambda t, m: (["train"], r"the following arguments are required: recipe"),
    "inspect with no examples": lambda t, m: (["inspect", str(_recipe_file(t, m)), "--n", "0"], r"--n must be at least 1"),
    "generate zero tokens": lambda t, m: (["generate", str(t), "--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens must be at least 1"),
    "generate from nothing": lambda t, m: (["generate", str(t / "absent"), "--prompt", "hi"], r"adapter not found: '.*absent' does not exist"),
    "merge with zero prompts": lambda t, m: (["merge", str(t), "--out", str(t / "o"), "--num-prompts", "0"], r"--num-prompts must be at least 1"),
    "merge an unfinished run": lambda t, m: (["merge", str(_unfinished_run(t)), "--out", str(t / "o")], r"holds no finished adapter \(run status: running\); train it first"),
    "merge an adapter naming no base": lambda t, m: (["merge", str(_bare_adapter(t)), "--out", str(t / "o")], r"names no base model; pass --base-model"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _folder(path: Path, *names: str) -> Path:
    path.mkdir()
    for name in names:
        (path / name).write_text("hi")
    return path


def _unfinished_run(tmp_path: Path) -> Path:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / ".lora_causal_run.json").write_text(json.dumps({"format": "lora_causal-run", "version": 1}))
    (run / "recipe.yaml").write_text("recipe_version: 1\n")
    (run / "manifest.json").write_text(json.dumps({"status": "running"}))
    return run


def _bare_adapter(tmp_path: Path) -> Path:
    adapter = tmp_path / "bare-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return adapter


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name: str, tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    import torch

    if "without a GPU" in name and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, pattern = CASES[name](tmp_path, tiny_model_dir)
    capfd.readouterr()
    code = call_cli(args)
    out, err = capfd.readouterr()
    assert_one_line_error(code, err, pattern, out)
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_unicode_and_spaces_in_paths_work(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    folder = tmp_path / "dåta földer with spaces"
    folder.mkdir()
    data = write_jsonl(folder / "ünïcode dätä.jsonl", QA_ROWS + [{"prompt": "Q: Grüße?\nA:", "completion": " 你好 🙂."}])
    tree = base_recipe(tiny_model_dir, data, folder / "rün öut", train={"max_steps": 1})
    recipe = write_recipe(folder / "recipé.yaml", tree)
    assert call_cli(["train", str(recipe)]) == 0, capfd.readouterr().err[-2000:]
    assert (folder / "rün öut" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 96 KiB tmpfs: room for the recipe and manifest, not for a checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_gives_one_line_and_leaves_nothing_half_written(tmp_path: Path, tiny_model_dir: Path, tiny_disk: Path, capfd) -> None:
    recipe = _recipe_file(tmp_path, tiny_model_dir, QA_ROWS * 2, output={"dir": str(tiny_disk / "run"), "save_steps": 1})
    capfd.readouterr()
    code = call_cli(["train", str(recipe)])
    out, err = capfd.readouterr()
    line = assert_one_line_error(code, err, r"no space left on device while writing .*; free space .* resumes from the last complete checkpoint",
                                 out, after_progress=True)
    assert str(tiny_disk) in line
    assert list(tiny_disk.iterdir()) == []  # the run made the folder, had no complete checkpoint: all removed


def test_a_bad_row_deep_in_a_large_file_is_reported_on_its_own_line(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    rows = QA_ROWS * 625 + [{"prompt": "Q: hi\nA:"}]  # 2,500 good rows (a progress bar is shown), then a bad one
    recipe = _recipe_file(tmp_path, tiny_model_dir, rows)
    capfd.readouterr()
    code = call_cli(["train", str(recipe)])
    out, err = capfd.readouterr()
    assert "tokenizing data.train: 2,501 rows" in out  # progress was shown: off a terminal, one line on stdout
    assert_one_line_error(code, err, r"data\.train: line 2501: no 'completion' field", out, after_progress=True)
    assert not (tmp_path / "run").exists()
