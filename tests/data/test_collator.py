"""Exact tensors for every rule of the collator's API (documented in collator.py and README)."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch

import lora_causal.data.collator as collator_module
from lora_causal.data.collator import CausalLMCollator

PAD = 0
EOS = 2


def test_docstring_examples_hold() -> None:
    failures, tried = doctest.testmod(collator_module, verbose=False)
    assert tried > 0 and failures == 0


def test_labels_mirror_input_ids_unshifted() -> None:
    batch = CausalLMCollator(pad_token_id=PAD)([{"input_ids": [5, 6, 7, 8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1]]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long


def test_right_padding_is_masked_by_position() -> None:
    batch = CausalLMCollator(pad_token_id=PAD)([{"input_ids": [5, 6, 7]}, {"input_ids": [9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [9, -100, -100]]


def test_pad_equal_to_eos_keeps_the_real_eos_supervised() -> None:
    batch = CausalLMCollator(pad_token_id=EOS)([{"input_ids": [5, 6, EOS]}, {"input_ids": [7, EOS]}])
    assert batch["input_ids"].tolist() == [[5, 6, EOS], [7, EOS, EOS]]
    # the real EOS (position 2 of row 0, position 1 of row 1) is a target; only the pad position is -100
    assert batch["labels"].tolist() == [[5, 6, EOS], [7, EOS, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_prompt_masking_at_the_exact_boundary() -> None:
    features = [{"input_ids": [10, 11, 12, 13, 14], "prompt_length": 3}, {"input_ids": [20, 21], "prompt_length": 0}]
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=True)(features)
    assert batch["labels"].tolist() == [[-100, -100, -100, 13, 14], [20, 21, -100, -100, -100]]


def test_prompt_length_is_ignored_without_mask_prompt() -> None:
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=False)([{"input_ids": [10, 11, 12], "prompt_length": 2}])
    assert batch["labels"].tolist() == [[10, 11, 12]]


def test_missing_prompt_length_defaults_to_zero() -> None:
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=True)([{"input_ids": [10, 11, 12]}])
    assert batch["labels"].tolist() == [[10, 11, 12]]


def test_whole_prompt_masks_every_position() -> None:
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=True)([{"input_ids": [10, 11], "prompt_length": 2}])
    assert batch["labels"].tolist() == [[-100, -100]]


def test_target_mask_hides_later_user_turns() -> None:
    feature = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "prompt_length": 2, "target_mask": [0, 0, 1, 1, 0, 0, 1]}
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=True)([feature])
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, -100, -100, 7]]


def test_pad_to_multiple_of_rounds_the_length_up() -> None:
    batch = CausalLMCollator(pad_token_id=PAD, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8, 9, -100, -100, -100], [1, -100, -100, -100, -100, -100, -100, -100]]


def test_pad_to_multiple_of_keeps_an_exact_multiple() -> None:
    batch = CausalLMCollator(pad_token_id=PAD, pad_to_multiple_of=2)([{"input_ids": [5, 6]}])
    assert batch["input_ids"].shape == (1, 2)


def test_padding_free_concatenates_and_resets_positions() -> None:
    features = [
        {"input_ids": [10, 11, 12], "prompt_length": 1},
        {"input_ids": [20, 21]},
        {"input_ids": [30, 31, 32, 33], "prompt_length": 2},
    ]
    batch = CausalLMCollator(pad_token_id=PAD, padding_free=True)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # every sequence start is -100, so the last token of one example never learns to predict the next example
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21, -100, 31, 32, 33]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4


def test_padding_free_with_prompt_masking() -> None:
    features = [{"input_ids": [10, 11, 12], "prompt_length": 2}, {"input_ids": [20, 21, 22], "prompt_length": 1}]
    batch = CausalLMCollator(pad_token_id=PAD, mask_prompt=True, padding_free=True)(features)
    assert batch["labels"].tolist() == [[-100, -100, 12, -100, 21, 22]]


def test_padded_and_padding_free_supervise_the_same_positions() -> None:
    features = [{"input_ids": [10, 11, 12, EOS], "prompt_length": 2}, {"input_ids": [20, EOS], "prompt_length": 1}]
    padded = CausalLMCollator(pad_token_id=EOS, mask_prompt=True)(features)
    packed = CausalLMCollator(pad_token_id=EOS, mask_prompt=True, padding_free=True)(features)
    scored_padded = int((padded["labels"][:, 1:] != -100).sum())
    scored_packed = int((packed["labels"][:, 1:] != -100).sum())
    assert scored_padded == scored_packed == 3


def test_inputs_are_not_mutated() -> None:
    features = [{"input_ids": [10, 11, 12], "prompt_length": 2, "target_mask": [0, 0, 1]}, {"input_ids": [20]}]
    snapshot = copy.deepcopy(features)
    for collator in (
        CausalLMCollator(pad_token_id=PAD, mask_prompt=True),
        CausalLMCollator(pad_token_id=PAD, mask_prompt=True, padding_free=True),
        CausalLMCollator(pad_token_id=PAD, pad_to_multiple_of=8),
    ):
        collator(features)
        assert features == snapshot


def test_accepts_tensors_and_tuples() -> None:
    batch = CausalLMCollator(pad_token_id=PAD)([{"input_ids": torch.tensor([5, 6])}, {"input_ids": (7,)}])
    assert batch["labels"].tolist() == [[5, 6], [7, -100]]


@pytest.mark.parametrize(
    ("kwargs", "features", "message"),
    [
        ({}, [], "empty list"),
        ({}, [{"input_ids": []}], "empty input_ids"),
        ({}, [{"labels": [1]}], "no input_ids"),
        ({"mask_prompt": True}, [{"input_ids": [1, 2], "prompt_length": 3}], "prompt_length"),
        ({"mask_prompt": True}, [{"input_ids": [1, 2], "prompt_length": -1}], "prompt_length"),
        ({"mask_prompt": True}, [{"input_ids": [1, 2], "target_mask": [1]}], "target_mask"),
    ],
)
def test_bad_features_raise_clear_errors(kwargs: dict, features: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CausalLMCollator(pad_token_id=PAD, **kwargs)(features)


def test_bad_construction_is_rejected() -> None:
    with pytest.raises(ValueError, match="padding-free"):
        CausalLMCollator(pad_token_id=PAD, padding_free=True, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="pad_token_id"):
        CausalLMCollator(pad_token_id=-1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        CausalLMCollator(pad_token_id=PAD, pad_to_multiple_of=0)
