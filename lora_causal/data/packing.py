"""Token-budget micro-batches: best-fit-decreasing packing of examples into packs of at most N tokens.

Each pack becomes one padding-free row (the collator's padding-free mode), so micro-batches hold about the same
number of tokens whatever the lengths, and no padding is computed. The trainer then takes one pack per
micro-batch; shuffling, sharding across processes and resuming work on packs as they would on examples.
For prepared (memory-mapped) data the packs hold example indices, computed from the stored lengths, and the
collator fetches the examples of each micro-batch: nothing is materialised up front.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from lora_causal.data.even_split import filler_like


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


def pack_indices(lengths: Sequence[int], budget: int) -> list[dict[str, list[int]]]:
    """Packs of example indices (`{"pack": [index, ...]}`) of at most `budget` tokens each."""
    return [{"pack": group} for group in best_fit_decreasing(lengths, budget)]


@dataclass(frozen=True)
class PackCollator:
    """Flattens the packs of a micro-batch into one list of examples for a padding-free collator.

    Packs hold examples, or indices into `examples` (see `pack_indices`). A filler pack of indices becomes one
    pad token with no target, as `even_split` makes fillers of packs that hold examples.
    """

    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
    examples: Sequence[Mapping[str, Any]] | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        examples = []
        for feature in features:
            for item in feature["pack"]:
                example = self.examples[item] if isinstance(item, int) else item
                if feature.get("filler"):
                    example = filler_like(example, self.collator.pad_token_id) if isinstance(item, int) else {**example, "filler": True}
                examples.append(example)
        return self.collator(examples)
