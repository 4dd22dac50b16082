"""Mamba-based models: what peft and a quantized dt_proj cannot do is refused before any weights load."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QA_ROWS, assert_one_line_error, base_recipe, call_cli, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("tiny-mamba")
    AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("changes", "pattern"), [
    ({}, r"quantization\.mode: nf4 cannot load mamba: its dt_proj weight is multiplied directly.*mode: none"),
    ({"quantization": {"mode": "none"}}, r"lora\.target_modules: all-linear would put LoRA on out_proj and conv1d of mamba"),
    ({"quantization": {"mode": "none"}, "lora": {"target_modules": ["in_proj", "out_proj"]}},
     r"lora\.target_modules: out_proj of mamba cannot take LoRA"),
])
def test_refused_before_loading(mamba_dir: Path, tmp_path: Path, capfd, changes: dict, pattern: str) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(mamba_dir, data, tmp_path / "run", lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    for section, values in changes.items():
        tree[section] = {**tree[section], **values}
    capfd.readouterr()
    code = call_cli(["validate", str(write_recipe(tmp_path / "r.yaml", tree))])
    out, err = capfd.readouterr()
    assert_one_line_error(code, err, pattern, out)
    assert not (tmp_path / "run").exists()


def test_the_layers_peft_accepts_validate(mamba_dir: Path, tmp_path: Path, capfd) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(mamba_dir, data, tmp_path / "run", quantization={"mode": "none"},
                       lora={"r": 4, "alpha": 8, "target_modules": ["in_proj", "x_proj"]})
    assert call_cli(["validate", str(write_recipe(tmp_path / "r.yaml", tree))]) == 0, capfd.readouterr().err[-2000:]
