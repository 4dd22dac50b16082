"""Every example exactly once per epoch, whatever the number of processes.

With N processes, accelerate hands micro-batch i of the shuffled dataset to process i mod N. When the dataset does
not divide into whole optimizer steps (micro-batch x processes x accumulation), accelerate's `even_batches` fills
the last step by repeating examples from the start of the epoch, so those examples train twice. Instead the dataset
is topped up with *filler* rows: one pad token, no target (the collator gives them label -100 everywhere). The
loss is normalised by the supervised tokens of the whole optimizer step (all processes, all accumulated
micro-batches), so a filler changes nothing but keeps every process stepping in lockstep.

The top-up depends only on the global batch, not on how it is split: one process with micro-batch 2B and two with
micro-batch B shuffle the same padded dataset the same way and train the same examples in every step.
"""

from __future__ import annotations

from typing import Any

FILLER = "filler"  # the column marking filler rows


def filler_like(row: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """A filler row with the same columns as `row`: one pad token and no target (a pack holds one such example)."""
    if "pack" in row:  # a token-budget pack: the flag is on the pack, the collator passes it to its example
        if isinstance(row["pack"][0], int):  # a pack of indices: the collator makes its example one pad token
            return {**row, "pack": row["pack"][:1], FILLER: True}
        return {**row, "pack": [_one_pad_token(row["pack"][0], pad_token_id)], FILLER: True}
    return {**_one_pad_token(row, pad_token_id), FILLER: True}


def _one_pad_token(example: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    example = {**example, "input_ids": [pad_token_id]}
    if "prompt_length" in example:
        example["prompt_length"] = 0
    if example.get("target_mask") is not None:
        example["target_mask"] = [0]
    return example


def fillers_needed(rows: int, rows_per_step: int) -> int:
    """How many filler rows make `rows` a whole number of steps of `rows_per_step`."""
    return -rows % rows_per_step


def top_up(dataset: Any, rows_per_step: int, pad_token_id: int) -> Any:
    """`dataset` (a datasets.Dataset) with filler rows appended up to a whole number of steps; unchanged if whole."""
    from datasets import Dataset, concatenate_datasets

    count = fillers_needed(len(dataset), rows_per_step)
    if count == 0 or len(dataset) == 0:
        return dataset
    if FILLER not in dataset.column_names:
        dataset = dataset.add_column(FILLER, [False] * len(dataset))
    filler = filler_like(dataset[0], pad_token_id)
    return concatenate_datasets([dataset, Dataset.from_list([filler] * count, features=dataset.features)])


def is_filler(feature: Any) -> bool:
    return bool(feature.get(FILLER, False)) if hasattr(feature, "get") else False
