"""Every example once per epoch (filler rows, not repeats), and losses weighted per supervised token.

The losses here are computed by the trainer itself (TRL's compute_loss with its fused LM head, which shifts the
labels and normalises), not by the model's own loss function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.data.collator import CausalLMCollator
from lora_causal.data.even_split import fillers_needed, top_up


def test_top_up_adds_fillers_only_to_complete_the_last_step() -> None:
    from datasets import Dataset

    rows = [{"input_ids": [5, 6, 7], "prompt_length": 1}, {"input_ids": [8, 9], "prompt_length": 0}] * 5 + [
        {"input_ids": [4, 2], "prompt_length": 1}]
    dataset = Dataset.from_list(rows)
    assert [fillers_needed(11, n) for n in (1, 4, 8, 11, 12)] == [0, 1, 5, 0, 1]
    assert top_up(dataset, 11, pad_token_id=0) is dataset
    padded = top_up(dataset, 8, pad_token_id=0)
    assert len(padded) == 16 and padded["filler"] == [False] * 11 + [True] * 5
    assert padded[:11]["input_ids"] == [row["input_ids"] for row in rows]  # the real rows untouched, in order
    assert padded[15] == {"input_ids": [0], "prompt_length": 0, "filler": True}


def test_fillers_have_no_target_in_every_collator_mode() -> None:
    features = [{"input_ids": [5, 6, 7], "prompt_length": 1, "filler": False}, {"input_ids": [0], "prompt_length": 0, "filler": True}]
    padded = CausalLMCollator(pad_token_id=0)(features)
    assert padded["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    packed = CausalLMCollator(pad_token_id=0, padding_free=True, mask_prompt=True)(features)
    assert packed["labels"].tolist() == [[-100, 6, 7, -100]]
    assert padded["filler_tokens"] == packed["filler_tokens"] == 1  # so the token meter counts real data only
    assert "filler_tokens" not in CausalLMCollator(pad_token_id=0)(features[:1])


def test_the_token_meter_leaves_fillers_out() -> None:
    from lora_causal.training.metrics import TokenMeter

    features = [{"input_ids": [5, 6, 7]}, {"input_ids": [0], "filler": True}]
    for padding_free in (False, True):
        meter, batch = TokenMeter(), CausalLMCollator(pad_token_id=0, padding_free=padding_free)(features)
        meter.add(batch, batch.pop("filler_tokens"))
        assert (meter.tokens, meter.target_tokens) == (3, 2)


def test_fillers_in_token_budget_packs() -> None:
    from datasets import Dataset

    from lora_causal.data.packing import PackCollator, pack_examples

    packs = pack_examples([{"input_ids": [5, 6, 7], "prompt_length": 1}, {"input_ids": [8, 9], "prompt_length": 0}] * 3, 5)
    dataset = top_up(Dataset.from_list(packs), 4, pad_token_id=0)
    assert len(dataset) == 4 and dataset["filler"] == [False, False, False, True]
    batch = PackCollator(CausalLMCollator(pad_token_id=0, padding_free=True))([dataset[3], dataset[0]])
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, -100, 9]]


def _trainer(tmp_path: Path, model_dir: Path, rows: list[dict], padding_free: bool, micro_batch: int):
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.data.prepare import prepare_data
    from lora_causal.model.loading import attach_lora, load_base_model, load_tokenizer
    from lora_causal.training.trainer import build_sft_config, build_trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    eval_data = write_jsonl(tmp_path / "eval.jsonl", rows)
    tree = base_recipe(model_dir, data, tmp_path / "run", train={"padding_free": padding_free, "micro_batch_size": micro_batch})
    tree["data"]["eval"] = {"path": str(eval_data), "format": "prompt_completion"}
    recipe = load_recipe(write_recipe(tmp_path / f"r-{padding_free}-{micro_batch}.yaml", tree))
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer, recipe.train.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, 0), recipe.lora, 0)
    with torch.no_grad():  # a non-zero adapter, so the loss is the adapted model's
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trainer = build_trainer(recipe, model, tokenizer, prepared, build_sft_config(recipe, str(tmp_path / "ckpt"), True))
    return trainer, model, tokenizer, prepared


def test_eval_loss_is_per_supervised_token_whatever_the_batching(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Padded or padding-free, 1 or 3 examples per batch (a short last batch): the same eval loss, by hand too."""
    rows = QA_ROWS + [{"prompt": "Q: Say a long answer please?\nA:", "completion": " the dog likes food and the cat likes milk."}]
    results = {}
    for padding_free in (False, True):
        for micro_batch in (1, 3):
            trainer, model, tokenizer, prepared = _trainer(tmp_path / f"{padding_free}{micro_batch}", tiny_model_dir, rows,
                                                            padding_free, micro_batch)
            results[padding_free, micro_batch] = trainer.evaluate()["eval_loss"]
    # by hand: the summed cross-entropy of every supervised next token, over their number
    sums = _summed_losses(model, prepared.eval)
    total, count = sum(loss for loss, _ in sums), sum(n for _, n in sums)
    assert len(set(round(value, 5) for value in results.values())) == 1, results
    assert results[True, 1] == pytest.approx(total / count, abs=1e-5)
    # the per-example average the stock evaluation would report differs on these uneven lengths
    per_example = [loss / n for loss, n in sums]
    assert abs(sum(per_example) / len(per_example) - total / count) > 1e-3


def _summed_losses(model, examples) -> list[tuple[float, int]]:
    """Per example: the summed cross-entropy of its supervised next tokens (the model alone, no trainer), and their count."""
    model.eval()
    sums = []
    for example in examples:
        ids = example["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        mask = torch.arange(1, len(ids)) >= example["prompt_length"]
        sums.append((float(F.cross_entropy(logits[mask], torch.tensor(ids[1:])[mask], reduction="sum")), int(mask.sum())))
    return sums


def test_training_loss_of_the_trainer_is_the_seed_articles_mean(tmp_path: Path, tiny_model_dir: Path) -> None:
    """One training step's logged loss, from TRL's own compute_loss, equals the mean next-token cross-entropy over
    the supervised positions of the batch (labels mirror input_ids; the model shifts), packed or padded."""
    rows = [{"prompt": "the dog", "completion": " likes food"}, {"prompt": "Q: What do cows drink?\nA:", "completion": " water."}]
    losses = {}
    for padding_free in (False, True):
        trainer, model, tokenizer, prepared = _trainer(tmp_path / str(padding_free), tiny_model_dir, rows, padding_free, 2)
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        losses[padding_free] = float(trainer.compute_loss(model, dict(batch), num_items_in_batch=None))
    sums = _summed_losses(model, prepared.train)
    total, count = sum(loss for loss, _ in sums), sum(n for _, n in sums)
    assert losses[False] == pytest.approx(total / count, abs=1e-5)
    assert losses[True] == pytest.approx(total / count, abs=1e-5)
