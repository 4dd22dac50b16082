"""Token-budget micro-batches: best-fit-decreasing packing of examples into packs of at most N tokens.

Each pack becomes one padding-free row (the collator's padding-free mode), so micro-batches hold about the same
number of tokens whatever the lengths, and no padding is computed. The trainer then takes one pack per
micro-batch; shuffling, sharding across processes and resuming work on packs as they would on examples.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable


def best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= `budget`, longest items first, each into the
    fullest bin it still fits (a new bin when none does). Deterministic: ties keep the input order."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    too_long = [index for index, length in enumerate(lengths) if length > budget]
    if too_long:
        raise ValueError(f"item {too_long[0]} has {lengths[too_long[0]]} tokens, more than the budget {budget}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted: the fullest bins first
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (budget - length, len(bins) - 1))
            continue
        room, number = free.pop(slot)
        bins[number].append(index)
        bisect.insort(free, (room - length, number))
    return [sorted(items) for items in bins]


def pack_examples(examples: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Examples grouped into packs (`{"pack": [example, ...]}`) of at most `budget` tokens each."""
    groups = best_fit_decreasing([len(example["input_ids"]) for example in examples], budget)
    return [{"pack": [examples[index] for index in group]} for group in groups]


@dataclass(frozen=True)
class PackCollator:
    """Flattens the packs of a micro-batch into one list of examples for a padding-free collator."""

    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.collator([{**example, "filler": True} if feature.get("filler") else example
                              for feature in features for example in feature["pack"]])
