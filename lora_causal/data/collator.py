"""`CausalLMCollator`: tokenized examples -> model-ready batches with causal-LM labels.

A causal LM learns to predict token k from tokens < k. Hugging Face models shift internally, so the
labels here are a *copy* of `input_ids`, never pre-shifted; -100 marks positions that are not targets.

Rules (a stable API: tests/data/test_collator.py checks each one with exact tensors):
1. `labels` mirror `input_ids` position by position for every real token.
2. Padding positions get -100 by position, never by token id: when pad == eos the real EOS stays supervised.
3. With `mask_prompt=True`, positions `t < prompt_length` get -100.
4. Padded mode: right padding; `input_ids`, `attention_mask` (1 = real), `labels`, all [batch, length] int64;
   `pad_to_multiple_of` rounds the length up.
5. Padding-free mode: one row [1, total] with `input_ids`, `labels`, `position_ids` restarting at 0 for each
   sequence, `cu_seq_lens_q/k` (int32), `max_length_q/k`; no `attention_mask`. The label at every sequence
   start is -100, so no token is trained to predict the next example.
6. It never mutates its input.

Extensions: for multi-turn chat, a feature may carry `target_mask` (one 0/1 per token, 1 = target); with
`mask_prompt=True` positions whose mask is 0 also get -100 (user turns after the first assistant turn). A feature
with `filler: True` has no target at all (every label -100): it only keeps processes in step (see even_split); a
batch holding fillers also carries `filler_tokens` (their token count), which the trainer takes out before the
model sees the batch, so token counts stay counts of real data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CausalLMCollator:
    """Collate `{"input_ids": [...], "prompt_length": int}` features into a causal-LM batch.

    >>> c = CausalLMCollator(pad_token_id=0, mask_prompt=True)
    >>> batch = c([{"input_ids": [5, 6, 7, 2], "prompt_length": 2}, {"input_ids": [8, 2]}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7, 2], [8, 2, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]])
    >>> batch["labels"].tolist()
    [[-100, -100, 7, 2], [8, 2, -100, -100]]
    >>> packed = CausalLMCollator(pad_token_id=0, padding_free=True)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    >>> packed["labels"].tolist(), packed["position_ids"].tolist(), packed["cu_seq_lens_q"].tolist()
    ([[-100, 6, 7, -100, 9]], [[0, 1, 2, 0, 1]], [0, 3, 5])
    """

    pad_token_id: int
    mask_prompt: bool = False
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {self.pad_token_id!r}")
        if self.pad_to_multiple_of is not None:
            if self.padding_free:
                raise ValueError("pad_to_multiple_of has no meaning in padding-free mode (there is no padding)")
            if self.pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(features) == 0:
            raise ValueError("cannot collate an empty list of features")
        sequences = [_input_ids(feature, index) for index, feature in enumerate(features)]
        labels = [self._labels(feature, ids, index) for index, (feature, ids) in enumerate(zip(features, sequences))]
        batch = _padding_free_batch(sequences, labels) if self.padding_free else self._padded_batch(sequences, labels)
        fillers = sum(len(ids) for feature, ids in zip(features, sequences) if feature.get("filler"))
        if fillers:
            batch["filler_tokens"] = fillers
        return batch

    def _labels(self, feature: Mapping[str, Any], ids: list[int], index: int) -> list[int]:
        if feature.get("filler"):
            return [IGNORE_INDEX] * len(ids)
        labels = list(ids)
        if not self.mask_prompt:
            return labels
        prompt_length = feature.get("prompt_length", 0)
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 <= prompt_length <= len(ids):
            raise ValueError(
                f"feature {index}: prompt_length must be an int in [0, {len(ids)}], got {prompt_length!r}"
            )
        for position in range(prompt_length):
            labels[position] = IGNORE_INDEX
        target_mask = feature.get("target_mask")
        if target_mask is not None:
            if len(target_mask) != len(ids):
                raise ValueError(
                    f"feature {index}: target_mask has {len(target_mask)} entries for {len(ids)} input_ids"
                )
            for position, is_target in enumerate(target_mask):
                if not is_target:
                    labels[position] = IGNORE_INDEX
        return labels

    def _padded_batch(self, sequences: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
        import torch

        length = max(len(ids) for ids in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        label_tensor = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(zip(sequences, labels)):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            label_tensor[row, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


def _input_ids(feature: Mapping[str, Any], index: int) -> list[int]:
    ids = feature.get("input_ids") if isinstance(feature, Mapping) else None
    if ids is None:
        raise ValueError(f"feature {index} has no input_ids")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not ids:
        raise ValueError(f"feature {index} has empty input_ids")
    return ids


def _padding_free_batch(sequences: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    import torch

    flat_ids: list[int] = []
    flat_labels: list[int] = []
    positions: list[int] = []
    boundaries = [0]
    for ids, row_labels in zip(sequences, labels):
        flat_ids.extend(ids)
        flat_labels.append(IGNORE_INDEX)  # a sequence start is never a target of the previous sequence
        flat_labels.extend(row_labels[1:])
        positions.extend(range(len(ids)))
        boundaries.append(boundaries[-1] + len(ids))
    longest = max(len(ids) for ids in sequences)
    cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([flat_ids], dtype=torch.long),
        "labels": torch.tensor([flat_labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens.clone(),
        "max_length_q": longest,
        "max_length_k": longest,
    }
