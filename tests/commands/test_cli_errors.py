"""Bad input through the CLI: exit code 2, one clear line on stderr, no traceback, no run directory left behind."""

from __future__ import annotations

import os
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import QA_ROWS, assert_one_line_error, base_recipe, call_cli, run_cli, write_jsonl, write_recipe

from lora_causal.cli import main


def _setup(tmp_path: Path, model_dir: Path, rows: list[Any] | None = None, **sections: dict) -> dict:
    data = write_jsonl(tmp_path / "data.jsonl", QA_ROWS if rows is None else rows)
    return base_recipe(model_dir, data, tmp_path / "run", **sections)


def _edit(tree: dict, dotted: str, value: Any) -> dict:
    node = tree
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return tree


Case = Callable[[Path, Path], tuple[list[str], str]]


def _recipe_case(change: Callable[[dict, Path], Any], pattern: str, command: str = "train") -> Case:
    def build(tmp_path: Path, model_dir: Path) -> tuple[list[str], str]:
        tree = _setup(tmp_path, model_dir)
        tree = change(tree, tmp_path) or tree
        recipe = write_recipe(tmp_path / "recipe.yaml", tree)
        return [command, str(recipe)], pattern

    return build


def _data_case(content: str | bytes, pattern: str, suffix: str = ".jsonl", fmt: str = "prompt_completion") -> Case:
    def build(tmp_path: Path, model_dir: Path) -> tuple[list[str], str]:
        data = tmp_path / f"data{suffix}"
        data.write_bytes(content if isinstance(content, bytes) else content.encode())
        tree = base_recipe(model_dir, data, tmp_path / "run")
        tree["data"]["train"]["format"] = fmt
        return ["train", str(write_recipe(tmp_path / "recipe.yaml", tree))], pattern

    return build


CASES: dict[str, Case] = {
    "unknown key with suggestion": _recipe_case(
        lambda t, _: t["lora"].update(rank=8), r"lora\.rank: unknown key \(did you mean 'r'\?\)"
    ),
    "unknown section": _recipe_case(lambda t, _: t.update(trainer={}), r"trainer: unknown key \(did you mean 'train'\?\)"),
    "wrong type": _recipe_case(
        lambda t, _: _edit(t, "train.micro_batch_size", "four"), r"train\.micro_batch_size: input should be a valid integer"
    ),
    "bad choice with suggestion": _recipe_case(
        lambda t, _: _edit(t, "quantization.mode", "nf5"), r"quantization\.mode: 'nf5' is not one of .*did you mean 'nf4'"
    ),
    "negative learning rate": _recipe_case(
        lambda t, _: _edit(t, "train.learning_rate", -1.0e-4), r"train\.learning_rate: input should be greater than 0"
    ),
    "missing required section": _recipe_case(lambda t, _: t.pop("output"), r"output: required key is missing"),
    "unsupported recipe version": _recipe_case(lambda t, _: t.update(recipe_version=2), r"recipe_version 2 is not supported"),
    "nan value": _recipe_case(lambda t, _: _edit(t, "lora.dropout", float("nan")), r"lora\.dropout: nan is not a finite number"),
    "conflicting padding options": _recipe_case(
        lambda t, _: t["train"].update(padding_free=True, pad_to_multiple_of=8), r"train\.pad_to_multiple_of: pads rows, but padding_free: true has no padding"
    ),
    "mask_prompt without a prompt": _recipe_case(
        lambda t, _: t["data"].update(train={**t["data"]["train"], "format": "text"}, mask_prompt=True),
        r"data\.mask_prompt: true needs a prompt",
    ),
    "lm_head as a LoRA target": _recipe_case(
        lambda t, _: _edit(t, "lora.target_modules", ["q_proj", "lm_head"]), r"lora\.target_modules: must not include 'lm_head'"
    ),
    "missing data file": _recipe_case(
        lambda t, p: _edit(t, "data.train.path", str(p / "nope.jsonl")), r"data\.train: file not found: .*nope\.jsonl"
    ),
    "unknown model path": _recipe_case(
        lambda t, p: _edit(t, "model.name_or_path", str(p / "no-model")), r"model\.name_or_path: '.*no-model' does not exist"
    ),
    "unknown hub model offline": _recipe_case(
        lambda t, _: _edit(t, "model.name_or_path", "nobody/no-such-model"), r"cannot load model 'nobody/no-such-model'"
    ),
    "unknown hub dataset offline": _recipe_case(
        lambda t, _: _edit(t, "data.train.path", "nobody/no-such-dataset"),
        r"data\.train: 'nobody/no-such-dataset' is not a local file and could not be loaded from the Hub",
    ),
    "max_length beyond the model": _recipe_case(
        lambda t, _: _edit(t, "data.max_length", 4096), r"data\.max_length: 4096 exceeds the model's maximum positions \(128\)"
    ),
    "malformed jsonl line": _data_case(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"data\.train: data\.jsonl line 2: not valid JSON"
    ),
    "missing column": _data_case(
        '{"prompt": "a", "completion": "b"}\n{"question": "a", "completion": "b"}\n',
        r"data\.train: line 2: no 'prompt' field .*data\.train\.columns",
    ),
    "wrong field type": _data_case('{"prompt": "a", "completion": 3}\n', r"line 1: 'completion' must be text, got int"),
    "null field": _data_case('{"prompt": "a", "completion": null}\n', r"line 1: 'completion' is null; give it text or remove the row"),
    "empty dataset": _data_case("\n\n", r"data\.train: the dataset has no rows"),
    "zero targets after truncation": _data_case(
        json.dumps({"prompt": "Q: What color is the sky? " * 30, "completion": " blue."}) + "\n",
        r"none of the 1 examples is left to train on \(1 had zero target tokens",
    ),
    "binary data file": _data_case(bytes(range(256)) * 4, r"is not UTF-8 text"),
    "ragged csv": _data_case("prompt,completion\na,b\nc,d,e\n", r"data\.csv line 3: 3 fields, but the header has 2", ".csv"),
    "unknown chat role": _data_case(
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n",
        r"message 0 has unknown role 'wizard'",
        fmt="messages",
    ),
    "json that is not a list": _data_case('{"prompt": "a"}', r"must hold a JSON list of objects", ".json"),
    "bad override": lambda p, m: (["validate", str(write_recipe(p / "r.yaml", _setup(p, m))), "train.learning_rate"], r"expected key=value"),
    "override with a typo": lambda p, m: (
        ["validate", str(write_recipe(p / "r.yaml", _setup(p, m))), "train.learning_rat=1e-4"],
        r"train\.learning_rat: unknown key \(did you mean 'learning_rate'\?\)",
    ),
    "recipe not a mapping": lambda p, m: (["validate", str(write_recipe(p / "r.yaml", "- just\n- a list\n"))], r"must be a YAML mapping"),
    "yaml syntax error": lambda p, m: (["validate", str(write_recipe(p / "r.yaml", "model: {name: [\n"))], r"r\.yaml: line \d+: not valid YAML"),
    "missing recipe file": lambda p, m: (["train", str(p / "absent.yaml")], r"recipe file not found"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(name: str, tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    args, pattern = CASES[name](tmp_path, tiny_model_dir)
    code = main(args)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_not_overwritten(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", _setup(tmp_path, tiny_model_dir, train={"max_steps": 1}))
    assert main(["train", str(recipe)]) == 0
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    capfd.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"error: output.dir: '{tmp_path / 'run'}' already holds a finished run; choose another output.dir or "
                   "set output.overwrite=true to replace it"]
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest


def test_a_foreign_folder_is_never_used(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "recipe.yaml", _setup(tmp_path, tiny_model_dir, output={"overwrite": True}))
    assert main(["train", str(recipe)]) == 2
    assert "holds no lora_causal run" in capfd.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["train", "validate"])
def test_real_process_prints_one_line_and_exits_2(command: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    tree = _setup(tmp_path, tiny_model_dir)
    tree["lora"]["alpah"] = 16
    result = run_cli(command, str(write_recipe(tmp_path / "recipe.yaml", tree)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: " + f"{tmp_path / 'recipe.yaml'}: lora.alpah: unknown key (did you mean 'alpha'?)"]
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


def test_real_process_data_error_leaves_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    tree = _setup(tmp_path, tiny_model_dir, rows=[{"prompt": "a"}])
    result = run_cli("train", str(write_recipe(tmp_path / "recipe.yaml", tree)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 1: no 'completion' field" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_overrides_may_follow_options(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    from lora_causal.cli import _parse

    args = _parse(["inspect", "r.yaml", "train.seed=1", "--n", "1", "data.max_length=64"])
    assert (args.n, args.overrides) == (1, ["train.seed=1", "data.max_length=64"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _parse(["inspect", "r.yaml", "--n", "1", "--bogus"])
    assert stopped.value.code == 2 and "unrecognized arguments: --bogus" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["show", "run", "x=1"])  # show takes no overrides


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    """While one process trains into output.dir (holding its run lock), another is refused in one line and writes
    nothing there; a lock left by a killed process is no lock (the kernel drops it)."""
    import fcntl
    import os

    from lora_causal.core.rundir import RUN_LOCK

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model_dir, data, run, train={"max_steps": 1}))
    run.mkdir()
    holder = os.open(run / RUN_LOCK, os.O_CREAT | os.O_RDWR)  # another process's hold on the folder
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        capfd.readouterr()
        code = call_cli(["train", str(recipe)])
        out, err = capfd.readouterr()
        assert_one_line_error(code, err, r"another lora-causal process is training into .* right now", out)
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]
    finally:
        os.close(holder)  # as when that process ends, however it ends
    assert call_cli(["train", str(recipe)]) == 0, capfd.readouterr().err[-2000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("user", "expected"), [({}, "expandable_segments:True"),
                                                ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, "max_split_size_mb:64"),
                                                ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None)])
def test_expandable_segments_by_default_the_users_setting_wins(monkeypatch, user, expected) -> None:
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LORA_CAUSAL_DEFAULT_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so what main() sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    assert call_cli(["--help"]) == 0
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected
