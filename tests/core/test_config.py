"""Recipe schema: strictness, overrides, path resolution, and every shipped recipe validating."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, write_recipe

from lora_causal.core.errors import UserError
from lora_causal.core.recipe_file import load_recipe

MINIMAL = """\
recipe_version: 1
model: {name_or_path: models/tiny}
data:
  train: {path: data/train.jsonl, format: prompt_completion}
train: {learning_rate: 2e-4}
output: {dir: runs/x}
"""


def test_relative_recipe_paths_resolve_against_the_recipe_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "project" / "recipes"
    (folder / "models" / "tiny").mkdir(parents=True)  # exists next to the recipe, so it is a path, not a Hub id
    recipe_file = write_recipe(folder / "r.yaml", MINIMAL)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(recipe_file)
    assert recipe.model.name_or_path == str(folder / "models" / "tiny")
    assert recipe.data.train.path == str(folder / "data" / "train.jsonl")
    assert recipe.output.dir == str(folder / "runs" / "x")


def test_override_paths_resolve_against_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "recipes" / "models" / "tiny").mkdir(parents=True)
    recipe_file = write_recipe(tmp_path / "recipes" / "r.yaml", MINIMAL)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(recipe_file, ["output.dir=out/run1", "data.train.path=d.jsonl"])
    assert recipe.output.dir == str(elsewhere / "out" / "run1")
    assert recipe.data.train.path == str(elsewhere / "d.jsonl")
    assert recipe.model.name_or_path == str(tmp_path / "recipes" / "models" / "tiny")


def test_hub_ids_are_not_turned_into_paths(tmp_path: Path) -> None:
    text = MINIMAL.replace("models/tiny", "meta-llama/Llama-3.1-8B").replace("data/train.jsonl", "yahma/alpaca-cleaned")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text))
    assert recipe.model.name_or_path == "meta-llama/Llama-3.1-8B"
    assert recipe.data.train.path == "yahma/alpaca-cleaned"


def test_overrides_are_yaml_values_validated_like_the_recipe(tmp_path: Path) -> None:
    recipe_file = write_recipe(tmp_path / "r.yaml", MINIMAL)
    recipe = load_recipe(recipe_file, ["train.learning_rate=1e-5", "lora.target_modules=[q_proj, v_proj]", "train.max_steps=7"])
    assert recipe.train.learning_rate == 1e-5
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.max_steps == 7
    with pytest.raises(UserError, match=r"train\.max_steps: input should be a valid integer"):
        load_recipe(recipe_file, ["train.max_steps=seven"])
    with pytest.raises(UserError, match=r"train\.learning_rate is a value, not a section"):
        load_recipe(recipe_file, ["train.learning_rate.x=1"])


def test_scientific_notation_without_a_dot_is_a_number(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", MINIMAL))
    assert recipe.train.learning_rate == pytest.approx(2e-4)


def test_types_are_strict(tmp_path: Path) -> None:
    recipe_file = write_recipe(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(UserError, match=r"train\.micro_batch_size: input should be a valid integer.*got 4\.5"):
        load_recipe(recipe_file, ["train.micro_batch_size=4.5"])
    with pytest.raises(UserError, match=r"lora\.use_dora: input should be a valid boolean"):
        load_recipe(recipe_file, ["lora.use_dora=1"])
    with pytest.raises(UserError, match=r"data\.eval: set exactly one of path or split_ratio"):
        load_recipe(recipe_file, ["data.eval={split_ratio: 0.1, path: e.jsonl}"])


def test_several_problems_are_reported_together_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        load_recipe(write_recipe(tmp_path / "r.yaml", MINIMAL), ["lora.lora_alpha=8", "train.lr=1e-4"])
    message = str(caught.value)
    assert "\n" not in message
    assert "lora.lora_alpha: unknown key (did you mean 'alpha'?)" in message
    assert "train.lr: unknown key (did you mean 'learning_rate'?)" in message


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    text = MINIMAL + "extra: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_fingerprint_ignores_presentation_only_fields(tmp_path: Path) -> None:
    recipe_file = write_recipe(tmp_path / "r.yaml", MINIMAL)
    base = load_recipe(recipe_file).fingerprint()
    assert load_recipe(recipe_file, ["output.sample_prompts=[hi]", "output.overwrite=true"]).fingerprint() == base
    assert load_recipe(recipe_file, ["train.learning_rate=1e-3"]).fingerprint() != base


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml"} and len(SHIPPED) >= 3


@pytest.mark.parametrize("recipe_file", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates_and_builds_its_configs(recipe_file: Path, tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from lora_causal.model.loading import build_lora_config, build_quantization_config, resolve_compute_dtype
    from lora_causal.training.trainer import build_sft_config

    recipe = load_recipe(recipe_file)
    quantization = build_quantization_config(recipe.quantization, resolve_compute_dtype(recipe.quantization.compute_dtype))
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert isinstance(build_lora_config(recipe.lora), LoraConfig)
    sft = build_sft_config(recipe, str(tmp_path / "checkpoints"), has_eval=recipe.data.eval is not None)
    assert isinstance(sft, SFTConfig)
    assert sft.dataset_kwargs == {"skip_prepare_dataset": True} and sft.remove_unused_columns is False
    if recipe.train.gradient_checkpointing:  # non-reentrant wherever a recipe checkpoints (the demo does not)
        assert sft.gradient_checkpointing and sft.gradient_checkpointing_kwargs == {"use_reentrant": False}
    else:
        assert not sft.gradient_checkpointing
