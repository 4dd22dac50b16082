"""Token-budget steps: the recipe's examples per optimizer step, packed into a fixed number of micro-batches."""

from __future__ import annotations

import random

import pytest

from lora_causal.data.budget_steps import (
    MAX_PLANNED_EPOCHS,
    BudgetSteps,
    BudgetStepSampler,
    epoch_steps,
    pack_step,
    planned_epochs,
)


def _lengths(count: int, seed: int, longest: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [max(1, min(longest, round(rng.lognormvariate(2.5, 0.8)))) for _ in range(count)]


def test_steps_of_an_epoch_are_a_seeded_shuffle() -> None:
    steps = epoch_steps(10, 4, seed=3, epoch=0)
    assert len(steps) == 3 and all(len(step) <= 4 for step in steps)  # 2 fillers (dropped) make 3 whole steps
    assert sorted(i for step in steps for i in step) == list(range(10))
    assert steps == epoch_steps(10, 4, seed=3, epoch=0)  # every process draws the same
    assert steps != epoch_steps(10, 4, seed=3, epoch=1)  # and each epoch its own


def test_a_step_is_split_into_exactly_the_planned_packs() -> None:
    lengths = [30, 30, 10, 10, 5, 50]
    fewest = pack_step([0, 1, 2, 3], lengths, budget=64)  # 80 tokens: two packs, the 30s apart
    assert len(fewest) == 2 and all(sum(lengths[i] for i in pack) <= 64 for pack in fewest)
    packs = pack_step([0, 1, 2, 3], lengths, budget=64, packs=3)
    assert sorted(i for pack in packs for i in pack) == [0, 1, 2, 3] and len(packs) == 3
    assert all(sum(lengths[i] for i in pack) <= 64 for pack in packs)
    # fewer examples than packs: empty packs stand for fillers
    assert pack_step([5], lengths, budget=64, packs=3) == [[5], [], []]
    with pytest.raises(ValueError, match="needs 2 packs of 64 tokens, more than the 1 planned"):
        pack_step([0, 1, 5], lengths, budget=64, packs=1)


@pytest.mark.parametrize(("seed", "processes", "per_step", "budget"), [(0, 1, 16, 128), (1, 2, 16, 96), (2, 4, 24, 64),
                                                                      (3, 3, 5, 64), (4, 1, 1, 64)])
def test_every_epoch_trains_every_example_once_in_steps_of_the_recipes_size(
    seed: int, processes: int, per_step: int, budget: int,
) -> None:
    lengths = _lengths(203, seed)
    steps = BudgetSteps(lengths, per_step, budget, processes, seed, epochs=3)
    packs_per_step = steps.rounds * processes
    for epoch in range(3):
        steps.epoch = epoch
        packs = [steps[slot] for slot in range(len(steps))]
        assert len(packs) == steps.steps_per_epoch * packs_per_step
        trained = [i for pack in packs if not pack["filler"] for i in pack["pack"]]
        assert sorted(trained) == list(range(len(lengths)))  # every example once, no repeats
        assert all(sum(lengths[i] for i in pack["pack"]) <= budget for pack in packs if not pack["filler"])
        for number, expected in enumerate(epoch_steps(len(lengths), per_step, seed, epoch)):
            step = packs[number * packs_per_step:(number + 1) * packs_per_step]
            assert sorted(i for pack in step if not pack["filler"] for i in pack["pack"]) == sorted(expected)
    # the fewest rounds that hold the fullest step: one fewer would not
    needed = max(len(pack_step(step, lengths, budget)) for epoch in range(3)
                 for step in epoch_steps(len(lengths), per_step, seed, epoch))
    assert (steps.rounds - 1) * processes < needed <= steps.rounds * processes


def test_short_examples_take_fewer_micro_batches_than_the_accumulation() -> None:
    lengths = [20] * 64  # 16 examples per step (4 x 4) of 20 tokens: 320 tokens, one pack of 512
    steps = BudgetSteps(lengths, 16, 512, 1, seed=0, epochs=1)
    assert steps.rounds == 1 and steps.fill() == pytest.approx(320 / 512)


def test_the_sampler_gets_the_epoch_through_accelerate_and_a_resume_skip() -> None:
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    lengths = _lengths(40, 5)
    steps = BudgetSteps(lengths, 8, 96, 2, seed=5, epochs=2)
    rows = list(range(len(steps)))

    def shard(process: int, skip: int = 0) -> list[list[int]]:
        loader = DataLoader(rows, batch_size=1, sampler=BudgetStepSampler(steps), collate_fn=lambda f: steps[f[0]]["pack"])
        loader = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
        if skip:
            loader = skip_first_batches(loader, skip)
        loader.set_epoch(1)
        return list(loader)

    epoch_one = steps.epoch_packs(1)
    assert shard(0) == [epoch_one[slot] for slot in range(0, len(steps), 2)]  # process p gets slots p, p + 2, ...
    assert shard(1) == [epoch_one[slot] for slot in range(1, len(steps), 2)]
    assert shard(1, skip=steps.rounds) == shard(1)[steps.rounds:]  # a resumed epoch skips whole steps of the same packs
    assert epoch_one != steps.epoch_packs(0)


def test_planned_epochs() -> None:
    assert planned_epochs(100, 16, 3.0, None) == 3
    assert planned_epochs(100, 16, 0.5, None) == 1
    assert planned_epochs(100, 16, 1.0, 20) == 3  # 7 steps per epoch
    lengths = _lengths(8, 1)
    many = BudgetSteps(lengths, 4, 64, 1, seed=1, epochs=10**6)  # max_steps far past tiny data: capped planning
    assert sorted(i for pack in many.epoch_packs(MAX_PLANNED_EPOCHS + 5) for i in pack) == list(range(8))


@pytest.mark.parametrize(("count", "per_step", "seed", "epoch"), [(10, 4, 3, 0), (37, 8, 42, 2), (16, 16, 0, 1)])
def test_steps_are_the_ones_trainers_own_shuffle_draws(count: int, per_step: int, seed: int, epoch: int) -> None:
    # without a budget: examples topped up with fillers to whole steps, shuffled by accelerate's seedable sampler
    # seeded with data_seed (= train.seed), each step the next per_step of them
    from accelerate.data_loader import SeedableRandomSampler

    from lora_causal.data.even_split import fillers_needed

    rows = count + fillers_needed(count, per_step)
    sampler = SeedableRandomSampler(data_source=range(rows), data_seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    trainer_steps = [[i for i in order[start:start + per_step] if i < count] for start in range(0, rows, per_step)]
    assert epoch_steps(count, per_step, seed, epoch) == [step for step in trainer_steps if step]


def test_the_budget_is_described_against_the_recipe_without_one() -> None:
    steps = BudgetSteps([20] * 64, 16, 512, 1, seed=0, epochs=1)
    assert steps.describe(4, 4) == ("1 micro-batch per optimizer step and process (without a budget: 4 micro-batches "
                                    "of 4 examples); the packs fill 62% of the budget")
    tight = BudgetSteps([300] * 8, 8, 600, 1, seed=0, epochs=1)  # a budget below 8 x 300: more than 1 micro-batch
    assert tight.describe(8, 1).startswith("4 micro-batches per optimizer step and process (without a budget: 1 "
                                           "micro-batch of 8 examples)")
    assert "more micro-batches than without a budget: a larger train.token_budget (or auto)" in tight.describe(8, 1)
    assert "1 micro-batch of 1 example)" in BudgetSteps([5], 1, 64, 1, seed=0, epochs=1).describe(1, 1)
