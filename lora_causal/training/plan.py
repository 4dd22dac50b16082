"""The resolved plan of a run: what pre-flight learned from a recipe, read once, frozen, and handed down by part.

`resolve_plan` turns a `Recipe` into a `RunPlan`: the recipe as written (its fingerprint names the run), the
recipe as it runs here (`auto` batching and attention made concrete for this device and model), the model's
config (config.json, read once, no weights), the batching plan with its reason, where the outputs go, and the
processes. Each step of a run takes only its part: the data layer `plan.as_run.data`, the model layer
`plan.as_run.model` / `.quantization` / `.lora`, the trainer the whole `as_run` recipe, the run folder
`plan.recipe.output`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_causal.core.recipe import Recipe
    from lora_causal.model.batching import BatchingPlan, DeviceInfo


@dataclass(frozen=True)
class Topology:
    """The launched processes, as far as a run is concerned."""

    num_processes: int = 1
    process_index: int = 0
    is_main: bool = True
    sharded: bool = False  # FSDP or DeepSpeed ZeRO-3: no process holds the whole model

    @classmethod
    def of(cls, state: Any) -> Topology:
        """The topology of accelerate's process `state`."""
        from lora_causal.core.processes import sharded_training

        return cls(int(state.num_processes), int(state.process_index), bool(state.is_main_process), sharded_training())


@dataclass(frozen=True)
class RunPlan:
    """Everything decided about a run before its data and weights load."""

    recipe: Recipe  # as written: the run folder keeps it, its fingerprint names the run
    as_run: Recipe  # `auto` batching and attention made concrete for this machine
    model_config: Any  # the model's transformers config (no weights)
    batching: BatchingPlan
    topology: Topology
    merge_target: Path | None  # where output.merge writes, if it is set


def merge_target(recipe: Recipe) -> Path | None:
    """Where output.merge writes the merged model: output.merge.dir, inside output.dir unless absolute."""
    if recipe.output.merge is None:
        return None
    from lora_causal.core.paths import expand

    folder = expand(recipe.output.merge.dir, "output.merge.dir")
    return folder if folder.is_absolute() else Path(recipe.output.dir) / folder


def with_batching(recipe: Recipe, batching: BatchingPlan) -> Recipe:
    """The recipe with the plan's concrete batching, attention and token budget in place of `auto`."""
    model = recipe.model.model_copy(update={"attn_implementation": batching.attn_implementation})
    train = recipe.train.model_copy(update={"padding_free": batching.padding_free,
                                            "token_budget": token_budget(recipe, batching.padding_free)})
    return recipe.model_copy(update={"model": model, "train": train})


def token_budget(recipe: Recipe, padding_free: bool) -> int | bool:
    """`train.token_budget` as it runs: a number of tokens, or False (micro-batches of micro_batch_size examples).

    auto is micro_batch_size x data.max_length where rows are padding-free: the largest micro-batch the recipe
    allows without a budget, so the peak memory of a run is the one its worst padded micro-batch would reach."""
    train = recipe.train
    if train.token_budget != "auto":
        return train.token_budget
    if not padding_free or train.pad_to_multiple_of is not None:
        return False
    return train.micro_batch_size * recipe.data.max_length


def budget_line(as_run: Recipe) -> str | None:
    """What a token budget does to the micro-batches, in words (None without a budget)."""
    train = as_run.train
    if train.token_budget is False:
        return None
    examples = train.micro_batch_size * train.gradient_accumulation
    return (f"micro-batches: up to {train.token_budget} tokens each (train.token_budget), packed from the "
            f"{examples} example{'' if examples == 1 else 's'} of each optimizer step "
            "(micro_batch_size x gradient_accumulation, per process)")


def resolve_plan(recipe: Recipe, model_config: Any = None, device: DeviceInfo | None = None,
                 topology: Topology | None = None) -> RunPlan:
    """The plan of `recipe` on this machine; `model_config` when pre-flight has already read it."""
    from lora_causal.model.batching import plan_for_model
    from lora_causal.model.skeleton import model_config as read_model_config

    config = model_config if model_config is not None else read_model_config(recipe.model)
    batching = plan_for_model(recipe.model, recipe.quantization, recipe.train, device=device, config=config)
    return RunPlan(recipe, with_batching(recipe, batching), config, batching, topology or Topology(),
                   merge_target(recipe))


def resolved(recipe: Recipe) -> Recipe:
    """The recipe as it runs here: `auto` batching resolved for this device and model (unchanged if concrete)."""
    train = recipe.train
    if train.padding_free != "auto" and recipe.model.attn_implementation != "auto" and train.token_budget != "auto":
        return recipe
    return resolve_plan(recipe).as_run
