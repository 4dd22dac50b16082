"""Padding-free batches are exact: each packed sequence gets the logits and loss it would get alone.

Tolerance: 1e-4 on float32 logits (the same matmuls, summed in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_causal.core.recipe import ModelSection, QuantizationSection
from lora_causal.data.collator import CausalLMCollator
from lora_causal.model.loading import load_base_model

TOLERANCE = 1e-4
SEQUENCES = [[1, 53, 30, 77, 41, 2], [1, 99, 12, 2], [1, 45, 46, 47, 48, 49, 50, 2]]


@pytest.fixture(scope="module", params=["sdpa", "eager", "varlen"])
def model(request: pytest.FixtureRequest, tiny_model_dir: Path):
    section = ModelSection(name_or_path=str(tiny_model_dir), attn_implementation=request.param)
    loaded = load_base_model(section, QuantizationSection(), seed=0)
    loaded.eval()
    return loaded


def _alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _packed(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    batch = CausalLMCollator(pad_token_id=0, padding_free=True)([{"input_ids": ids} for ids in sequences])
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    return [logits[start:end] for start, end in zip(bounds, bounds[1:])]


def test_each_packed_sequence_has_its_logits_alone(model, monkeypatch) -> None:
    import lora_causal.model.attention as attention

    calls = []
    real = attention.exact_packed_attention
    monkeypatch.setattr(attention, "exact_packed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ids, packed in zip(SEQUENCES, _packed(model, SEQUENCES)):
        assert torch.allclose(packed, _alone(model, ids), atol=TOLERANCE), (packed - _alone(model, ids)).abs().max()
    # the varlen model really took the packed path (one call per layer); the others never touch it
    expected = model.config.num_hidden_layers if model.config._attn_implementation == attention.NAME else 0
    assert len(calls) == expected


def test_each_packed_sequence_has_its_loss_alone(model) -> None:
    batch = CausalLMCollator(pad_token_id=0, padding_free=True)([{"input_ids": ids} for ids in SEQUENCES])
    with torch.no_grad():
        packed_loss = model(**batch, use_cache=False).loss
    alone = [F.cross_entropy(_alone(model, ids)[:-1], torch.tensor(ids[1:]), reduction="sum") for ids in SEQUENCES]
    scored = sum(len(ids) - 1 for ids in SEQUENCES)
    assert int((batch["labels"][:, 1:] != -100).sum()) == scored  # boundaries masked, nothing else
    assert torch.allclose(packed_loss, sum(alone) / scored, atol=TOLERANCE)


def test_changing_one_sequence_leaves_the_others_unchanged(model) -> None:
    before = _packed(model, SEQUENCES)
    changed = [SEQUENCES[0], [1, 7, 8, 9, 10, 11, 2], SEQUENCES[2]]
    after = _packed(model, changed)
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert torch.allclose(before[2], after[2], atol=1e-6)
    assert not torch.allclose(before[1], after[1][: len(SEQUENCES[1])], atol=1e-3)


def test_varlen_model_still_generates_and_runs_padded_batches(tiny_model_dir: Path) -> None:
    section = ModelSection(name_or_path=str(tiny_model_dir), attn_implementation="varlen")
    varlen = load_base_model(section, QuantizationSection(), seed=0)
    reference = load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(), seed=0)
    padded = CausalLMCollator(pad_token_id=0)([{"input_ids": ids} for ids in SEQUENCES])
    padded.pop("labels")
    with torch.no_grad():
        mask = padded["attention_mask"].bool()
        assert torch.allclose(varlen(**padded).logits[mask], reference(**padded).logits[mask], atol=TOLERANCE)
        prompt = torch.tensor([SEQUENCES[0][:3]])
        out_varlen = varlen.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        out_reference = reference.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out_varlen.tolist() == out_reference.tolist()


def test_varlen_needs_padding_free(tmp_path: Path) -> None:
    from lora_causal.core.errors import UserError
    from lora_causal.core.recipe_file import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe_version: 1\nmodel: {name_or_path: ./m, attn_implementation: varlen}\n"
                      "data: {train: {path: d.jsonl, format: text}}\noutput: {dir: out}\n")
    with pytest.raises(UserError, match=r"model\.attn_implementation: varlen works on padding-free batches"):
        load_recipe(recipe, ["train.padding_free=false"])
    assert load_recipe(recipe).model.attn_implementation == "varlen"  # padding_free: auto packs rows for it
    assert load_recipe(recipe, ["train.padding_free=true"]).model.attn_implementation == "varlen"
