"""Token-budget micro-batches that keep the recipe's examples per optimizer step.

An optimizer step trains `examples_per_step` examples (micro_batch_size x gradient_accumulation x processes, as
without a budget), drawn by a seeded shuffle of each epoch (every epoch its own draw, the same on every process):
Trainer's own draw (`epoch_steps`). The examples of a step are packed, best fit decreasing, into padding-free
micro-batches of at most `budget` tokens, so a step of short examples takes one or two big micro-batches instead of
`gradient_accumulation` small ones. Trainer accumulates a fixed number of micro-batches per step, so every step gets
the same number per process (`rounds`): the most that any step of any planned epoch needs. A step that needs fewer
has its fullest packs split in two (balanced by tokens); a step with fewer examples than packs (the last of an
epoch) gets filler packs (one pad token, no target; see even_split). The loss divides by the supervised tokens of
the whole step, so how a step is cut into micro-batches changes only floating-point rounding.

`BudgetSteps` holds the plan; the trainer's dataset is its slots (`slot_dataset`, one row per pack), which
`BudgetStepSampler` hands out in order and `SlotCollator` turns into the packs of the current epoch. The sampler
learns the epoch from Trainer's `set_epoch` (through accelerate), so a resumed run rebuilds the same packs and
skips the steps it has done by position. The collator runs in the training process (no dataloader workers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_causal.data.even_split import FILLER
from lora_causal.data.packing import best_fit_decreasing

# how many epochs are planned in full to find `rounds`; later epochs (max_steps far past the data) reuse their packs
MAX_PLANNED_EPOCHS = 64
SLOT = "slot"


def epoch_steps(count: int, per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each optimizer step of `epoch`, drawn as Trainer draws them without a budget.

    Without a budget the examples, topped up with fillers to whole steps (even_split), are shuffled by accelerate's
    seedable sampler: `torch.randperm` with a generator seeded `seed + epoch` (transformers passes `data_seed`, which
    lora_causal sets to train.seed), and each optimizer step takes the next `per_step` of them, whatever the number
    of processes. The same draw here makes a run with a budget train the same examples in every step as the same
    recipe with `token_budget: false` (tests/data/test_token_budget.py checks it against a real run).
    """
    import torch

    from lora_causal.data.even_split import fillers_needed

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(count + fillers_needed(count, per_step), generator=generator).tolist()
    steps = [[index for index in order[start:start + per_step] if index < count]
             for start in range(0, len(order), per_step)]
    return [step for step in steps if step]


def pack_step(step: Sequence[int], lengths: Sequence[int], budget: int, packs: int | None = None) -> list[list[int]]:
    """The examples of one step in packs of at most `budget` tokens: as few as best fit decreasing makes, or exactly
    `packs` of them (fullest packs split in two; empty lists stand for filler packs when examples run out)."""
    groups = [[step[index] for index in group] for group in best_fit_decreasing([lengths[i] for i in step], budget)]
    return groups if packs is None else split_packs(groups, lengths, budget, packs)


def split_packs(groups: list[list[int]], lengths: Sequence[int], budget: int, packs: int) -> list[list[int]]:
    """A step's fewest packs (`pack_step` without `packs`) made exactly `packs`: the fullest split in two, empty
    lists (filler packs) once nothing is left to split; fullest first."""
    groups = [list(group) for group in groups]
    if len(groups) > packs:
        raise ValueError(f"a step needs {len(groups)} packs of {budget} tokens, more than the {packs} planned")
    while len(groups) < packs:
        splittable = [group for group in groups if len(group) > 1]
        if not splittable:
            groups.append([])  # a filler pack: nothing left to split
            continue
        fullest = max(splittable, key=lambda group: (sum(lengths[i] for i in group), -groups.index(group)))
        groups.remove(fullest)
        groups.extend(_halves(fullest, lengths))
    return sorted(groups, key=lambda group: (-sum(lengths[i] for i in group), group))


def _halves(group: list[int], lengths: Sequence[int]) -> list[list[int]]:
    """`group` in two non-empty parts of about equal tokens (longest first, each to the lighter part)."""
    parts: list[list[int]] = [[], []]
    totals = [0, 0]
    for index in sorted(group, key=lambda i: (-lengths[i], i)):
        lighter = 0 if (totals[0], len(parts[0])) <= (totals[1], len(parts[1])) else 1
        parts[lighter].append(index)
        totals[lighter] += lengths[index]
    return [sorted(part) for part in parts]


@dataclass
class BudgetSteps:
    """The packs of every step of every epoch, built on demand: item `slot` is one pack of the current `epoch`."""

    lengths: Sequence[int]
    examples_per_step: int
    budget: int
    processes: int
    seed: int
    epochs: int  # epochs planned in full (at least the ones training will run, up to MAX_PLANNED_EPOCHS)
    rounds: int = field(init=False)  # micro-batches per process per optimizer step
    epoch: int = field(init=False, default=0)  # the epoch being trained (set by BudgetStepSampler)
    _cache: dict[int, list[list[int]]] = field(init=False, default_factory=dict, repr=False, compare=False)
    _first_epoch: list[list[list[int]]] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("there are no examples to pack")
        needed = 0
        for epoch in range(max(1, min(self.epochs, MAX_PLANNED_EPOCHS))):
            fewest = [pack_step(step, self.lengths, self.budget)
                      for step in epoch_steps(len(self.lengths), self.examples_per_step, self.seed, epoch)]
            needed = max(needed, *(len(groups) for groups in fewest))
            if epoch == 0:
                self._first_epoch = fewest  # training starts there: its packs are not worked out twice
        self.rounds = -(-needed // self.processes)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.examples_per_step)

    @property
    def packs_per_step(self) -> int:
        return self.rounds * self.processes

    def __len__(self) -> int:
        return self.steps_per_epoch * self.packs_per_step

    def epoch_packs(self, epoch: int) -> list[list[int]]:
        """Every pack of `epoch`, step after step (epochs past the planned ones repeat the last planned one's draw
        in a new order of steps)."""
        if epoch not in self._cache:
            self._cache.clear()  # one epoch at a time
            planned = min(epoch, MAX_PLANNED_EPOCHS - 1)
            if planned == 0 and self._first_epoch:
                fewest, self._first_epoch = self._first_epoch, []  # used once: a later request works it out again
            else:
                fewest = [pack_step(step, self.lengths, self.budget)
                          for step in epoch_steps(len(self.lengths), self.examples_per_step, self.seed, planned)]
            if planned != epoch:
                fewest = list(fewest)
                random.Random(self.seed * 7_919 + epoch).shuffle(fewest)
            self._cache[epoch] = [pack for groups in fewest
                                  for pack in split_packs(groups, self.lengths, self.budget, self.packs_per_step)]
        return self._cache[epoch]

    def __getitem__(self, slot: int) -> dict[str, Any]:
        pack = self.epoch_packs(self.epoch)[slot]
        return {"pack": pack, FILLER: False} if pack else {"pack": [0], FILLER: True}

    def slot_dataset(self) -> Any:
        """The trainer's dataset: one row (`{"slot": n}`) per pack of an epoch."""
        from datasets import Dataset

        return Dataset.from_dict({SLOT: list(range(len(self)))})

    def describe(self, micro_batch_size: int, gradient_accumulation: int) -> str:
        """The micro-batches per optimizer step and process, against the recipe without a budget, in words."""
        def count(number: int, word: str) -> str:
            return f"{number} {word}{'' if number == 1 else 'es' if word.endswith('h') else 's'}"

        line = (f"{count(self.rounds, 'micro-batch')} per optimizer step and process (without a budget: "
                f"{count(gradient_accumulation, 'micro-batch')} of {count(micro_batch_size, 'example')}); the packs "
                f"fill {self.fill():.0%} of the budget")
        if self.rounds > gradient_accumulation:
            line += ("; more micro-batches than without a budget: a larger train.token_budget (or auto) makes fewer, "
                     "false makes them of examples")
        return line

    def fill(self, epoch: int = 0) -> float:
        """The share of the budget the packs of `epoch` use, fillers included (1.0: every micro-batch full)."""
        packs = self.epoch_packs(epoch)
        return sum(self.lengths[i] for pack in packs for i in pack) / (len(packs) * self.budget)


class BudgetStepSampler:
    """The slots of `BudgetSteps` in order; Trainer (through accelerate) sets the epoch, which picks the packs."""

    def __init__(self, steps: BudgetSteps) -> None:
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        self.steps.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.steps)))

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class SlotCollator:
    """Slot rows -> the packs they stand for in the current epoch -> `collator` (a PackCollator); rows that are
    packs already (evaluation's) pass through."""

    steps: BudgetSteps
    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.collator([self.steps[int(feature[SLOT])] if SLOT in feature else feature for feature in features])


def planned_epochs(examples: int, examples_per_step: int, epochs: float, max_steps: int | None) -> int:
    """The whole epochs Trainer will start: ceil(epochs), or as many as `max_steps` optimizer steps need."""
    steps_per_epoch = -(-examples // examples_per_step)
    if max_steps:
        return -(-max_steps // steps_per_epoch)
    return max(1, -(-int(epochs * 1000) // 1000))
