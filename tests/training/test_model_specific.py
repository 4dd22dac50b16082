"""Models with needs of their own: Mamba-based ones (what peft and a quantized dt_proj cannot do, refused before any
weights load) and random weights for a config shipped as Python code."""

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


def test_random_weights_for_a_remote_code_config_honour_trust_remote_code(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    """model.init: random with a config shipped as Python code: the weights are drawn with the recipe's
    trust_remote_code (no interactive prompt, no 'pass trust_remote_code=True' after the data is prepared)."""
    import json
    import shutil

    folder = tmp_path / "remote"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(model_type="myllama", architectures=["MyLlama"],
                  auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLlama"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_my.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'myllama'\n")
    (folder / "modeling_my.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_my import MyConfig\n\n\n"
        "class MyLlama(LlamaForCausalLM):\n    config_class = MyConfig\n")
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(folder, data, tmp_path / "run", train={"max_steps": 1})
    tree["model"].update(init="random", trust_remote_code=True)
    assert call_cli(["train", str(write_recipe(tmp_path / "r.yaml", tree))]) == 0, capfd.readouterr().err[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
