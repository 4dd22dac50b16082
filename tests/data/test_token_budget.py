"""Token-budget micro-batches: best-fit-decreasing packing, and training on packs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.core.errors import UserError
from lora_causal.core.recipe_file import load_recipe
from lora_causal.data.collator import CausalLMCollator
from lora_causal.data.packing import PackCollator, best_fit_decreasing, pack_examples
from lora_causal.training.plan import resolve_plan
from lora_causal.training.run import run_training


def test_best_fit_decreasing_by_hand() -> None:
    # longest first: 9, 8 and 6 each open a bin (rooms 1, 2, 4); 4 fits only the 6-bin, 2 fits the 8-bin best,
    # and 1 fits the 9-bin
    lengths = [4, 9, 2, 6, 8, 1]
    bins = best_fit_decreasing(lengths, budget=10)
    assert sorted(sorted(lengths[i] for i in group) for group in bins) == [[1, 9], [2, 8], [4, 6]]


@pytest.mark.parametrize("seed", range(5))
def test_packs_respect_the_budget_and_keep_every_example_once(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, budget=256)
    assert sorted(i for group in bins for i in group) == list(range(300))
    assert all(sum(lengths[i] for i in group) <= 256 for group in bins)
    assert len(bins) <= -(-sum(lengths) // 256) + 2  # close to the lower bound: packs are nearly full
    assert bins == best_fit_decreasing(lengths, budget=256)  # deterministic


def test_items_longer_than_the_budget_are_refused() -> None:
    with pytest.raises(ValueError, match="item 1 has 300 tokens, more than the budget 256"):
        best_fit_decreasing([10, 300], budget=256)


def test_pack_collator_builds_one_padding_free_row_per_pack() -> None:
    examples = [{"input_ids": [1, 2, 3], "prompt_length": 1}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9]}]
    packs = pack_examples(examples, budget=6)
    collate = PackCollator(CausalLMCollator(pad_token_id=0, mask_prompt=True, padding_free=True))
    rows = [collate([pack]) for pack in packs]
    assert all(row["input_ids"].shape[1] <= 6 for row in rows)
    assert sorted(token for row in rows for token in row["input_ids"][0].tolist()) == list(range(1, 10))


def test_packs_of_indices_and_their_fillers() -> None:
    from datasets import Dataset

    from lora_causal.data.even_split import top_up
    from lora_causal.data.packing import pack_indices

    examples = [{"input_ids": [1, 2, 3], "prompt_length": 1}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9]}]
    packs = top_up(Dataset.from_list(pack_indices([3, 2, 4], budget=6)), 3, pad_token_id=0)  # 2 packs + 1 filler
    collate = PackCollator(CausalLMCollator(pad_token_id=0, mask_prompt=True, padding_free=True), examples)
    by_index = collate([packs[0], packs[1]])
    by_value = PackCollator(collate.collator)([{"pack": [examples[i] for i in p["pack"]]} for p in (packs[0], packs[1])])
    assert all(by_index[key].tolist() == by_value[key].tolist() for key in ("input_ids", "labels", "position_ids"))
    filler = collate([packs[2]])
    assert packs[2]["filler"] and filler["input_ids"].tolist() == [[0]] and filler["labels"].tolist() == [[-100]]


def _epoch(tmp_path: Path, model_dir: Path, name: str, **train: object) -> tuple[list[dict], dict]:
    """Train one epoch of 16 examples (20-25 tokens each); the logged steps and the trained adapter."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(model_dir, data, tmp_path / name, train={"epochs": 1.0, "logging_steps": 1, **train})
    del tree["train"]["max_steps"]
    result = run_training(load_recipe(write_recipe(tmp_path / f"{name}.yaml", tree)), say=lambda *_: None)
    logs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return logs, load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))


def test_a_token_budget_changes_the_micro_batches_not_what_a_step_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 4 examples per step (micro-batch 2 x accumulation 2): in one pack (budget 1024) or in several (budget 64)
    whole, whole_adapter = _epoch(tmp_path, tiny_model_dir, "whole", micro_batch_size=2, gradient_accumulation=2,
                                  token_budget=1024)
    tight, tight_adapter = _epoch(tmp_path, tiny_model_dir, "tight", micro_batch_size=2, gradient_accumulation=2,
                                  token_budget=64)
    assert len(whole) == len(tight) == 4  # 16 examples, 4 per optimizer step, whatever the budget
    assert [step["supervised_tokens"] for step in whole] == [step["supervised_tokens"] for step in tight]
    for a, b in zip(whole, tight):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"])
    assert whole_adapter.keys() == tight_adapter.keys()
    for key, value in whole_adapter.items():
        torch.testing.assert_close(tight_adapter[key], value, rtol=1e-4, atol=1e-6)


def test_a_budget_trains_the_steps_trainer_draws_without_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    # the default (auto) budget packs each step of 2 x 3 examples into one row; false runs 3 micro-batches of 2:
    # the same examples in every step, so the same losses step by step and the same adapter
    budget, budget_adapter = _epoch(tmp_path, tiny_model_dir, "budget", micro_batch_size=2, gradient_accumulation=3)
    plain, plain_adapter = _epoch(tmp_path, tiny_model_dir, "plain", micro_batch_size=2, gradient_accumulation=3,
                                  token_budget=False)
    assert len(budget) == len(plain) == 3  # 16 examples, 6 per step: 3 steps, the last topped up
    assert [step["supervised_tokens"] for step in budget] == [step["supervised_tokens"] for step in plain]
    for a, b in zip(budget, plain):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"])
    for key, value in plain_adapter.items():
        torch.testing.assert_close(budget_adapter[key], value, rtol=1e-4, atol=1e-6)


def test_the_default_budget_packs_each_step_into_one_micro_batch_here(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"micro_batch_size": 2, "gradient_accumulation": 3})
    plan = resolve_plan(load_recipe(write_recipe(tmp_path / "r.yaml", tree)))
    assert plan.recipe.train.token_budget == "auto"
    assert plan.as_run.train.token_budget == 2 * 64  # micro_batch_size x data.max_length, on padding-free rows
    off = resolve_plan(load_recipe(tmp_path / "r.yaml", ["train.padding_free=false"]))
    assert off.as_run.train.token_budget is False  # padded batches: micro-batches of examples, as written
    assert resolve_plan(load_recipe(tmp_path / "r.yaml", ["train.token_budget=false"])).as_run.train.token_budget is False


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.token_budget=512", "train.padding_free=false"],
         r"train\.token_budget: packs examples into padding-free rows; set train\.padding_free: true or auto"),
        (["train.token_budget=512", "train.pad_to_multiple_of=8"], r"token_budget: packs padding-free rows, but pad_to_multiple_of pads"),
        (["train.token_budget=32", "train.padding_free=true"], r"train\.token_budget \(32\) is smaller than data\.max_length \(64\)"),
        (["train.token_budget=true"], r"train\.token_budget"),
        (["train.token_budget=0"], r"train\.token_budget"),
    ],
)
def test_token_budget_conflicts(overrides: list[str], pattern: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run")
    with pytest.raises(UserError, match=pattern):
        load_recipe(write_recipe(tmp_path / "r.yaml", tree), overrides)


def test_running_out_of_gpu_memory_says_what_to_lower(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.training.run import out_of_memory_line

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    budget = resolve_plan(load_recipe(tmp_path / "r.yaml")).as_run
    line = out_of_memory_line(budget, 12)
    assert line.startswith("train: the GPU ran out of memory after 12 optimizer steps with micro-batches of up to 128 "
                           "tokens (train.token_budget); set a smaller train.token_budget")
    assert "train.activation_offloading: true" in line and "\n" not in line
    padded = resolve_plan(load_recipe(tmp_path / "r.yaml", ["train.token_budget=false", "train.padding_free=false",
                                                            "train.activation_offloading=true"])).as_run
    line = out_of_memory_line(padded, 0)
    assert "micro-batches of 2 examples of up to 64 tokens; set a smaller train.micro_batch_size" in line
    assert "activation_offloading" not in line
