"""The training loss is the model's own, per supervised token over the whole step, for every class training takes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))


def _trainer(model, tokenizer_dir: Path, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from lora_causal.data.collator import CausalLMCollator
    from lora_causal.training.trainer import trainer_class

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     report_to="none", use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False, max_length=None, learning_rate=0.0)
    data = Dataset.from_list([{"input_ids": [5, 6, 7]}])
    return trainer_class()(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(
        tokenizer_dir), data_collator=CausalLMCollator(pad_token_id=0, padding_free=True))


@pytest.mark.parametrize(("model_type", "head"), [("gemma4", "fused"), ("bert", "own")])
def test_step_loss_is_the_per_token_mean_over_micro_batches(model_type, head, tmp_path, tiny_model_dir) -> None:
    """Gemma-4's class says accepts_loss_kwargs = False, so Trainer would average micro-batch means; BERT's head
    has a transform layer TRL's fused head drops. Both must give the by-hand per-token mean of the whole step."""
    import torch
    from conformance_kit import build

    from lora_causal.data.collator import CausalLMCollator
    from lora_causal.training.trainer import loss_head

    model = build(model_type)
    assert loss_head(model) == head
    if model_type == "gemma4":
        assert type(model).accepts_loss_kwargs is False  # the case this test exists for
    trainer = _trainer(model, tiny_model_dir, tmp_path)
    assert trainer.model_accepts_loss_kwargs is True
    collate = CausalLMCollator(pad_token_id=0, padding_free=False)
    micro = [collate([{"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]}]), collate([{"input_ids": [20, 21, 22]}])]
    count = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro)
    model.eval()
    with torch.no_grad():
        step = sum(float(trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(count)))
                   for batch in micro)
        total = 0.0
        for batch in micro:
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="sum"))
        mean_of_means = sum(float(trainer.compute_loss(model, dict(b), num_items_in_batch=None)) for b in micro) / 2
    assert math.isclose(step, total / count, rel_tol=1e-5), (step, total / count)
    assert not math.isclose(mean_of_means, total / count, rel_tol=1e-3)  # what a per-micro-batch mean would give


def test_a_model_without_a_position_limit_is_not_refused_for_its_length(tmp_path: Path) -> None:
    """XLNet's config says max_position_embeddings = -1 (no limit): it used to ask for data.max_length -1 or less."""
    from conftest import base_recipe
    from transformers import AutoConfig

    from lora_causal.core.errors import UserError
    from lora_causal.core.recipe import Recipe
    from lora_causal.training.preflight import check_max_length

    recipe = Recipe.model_validate(base_recipe(tmp_path, tmp_path / "t.jsonl", tmp_path / "run"))
    check_max_length(recipe, AutoConfig.for_model("xlnet"))  # no refusal
    with pytest.raises(UserError, match="set data.max_length to 32 or less"):
        check_max_length(recipe, AutoConfig.for_model("llama", max_position_embeddings=32))
