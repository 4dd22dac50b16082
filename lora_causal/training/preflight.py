"""Pre-flight: everything knowable before any weights load, checked by `validate` and by `train` up front.

What can be known from the recipe, the model's config (a weightless skeleton on the meta device) and the file
system is refused here, in one line, before a tokenizer, data or weights load and before any folder exists:
- trackers: every `output.report_to` tracker installed (lora_causal.training.trackers names the `pip install`);
- the model: config.json readable and an object, a causal LM (not an encoder-decoder), remote code only when
  `model.trust_remote_code: true`, data.max_length within its positions;
- LoRA: every `lora.target_modules` and `lora.modules_to_save` name matches a module of the skeleton, and target
  modules are layers LoRA can wrap (the available linear layer names are listed);
- sharding: what FSDP / ZeRO-3 cannot shard, and a launcher asking for GPUs on a machine without one;
- outputs: `output.dir`, `output.merge.dir` and `data.cache_dir` can be created (no NUL, names the file system accepts, not under
  a file, writable), and the merge folder is neither part of the run folder nor somebody else's non-empty folder.
The seed range and other single-value rules live in the recipe schema (lora_causal.core.recipe).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import Recipe

if TYPE_CHECKING:
    from lora_causal.training.plan import RunPlan, Topology

MAX_LISTED_NAMES = 24


def check_before_loading(recipe: Recipe) -> Any:
    """Run every pre-flight check of a recipe; return the model's config (read once, no weights)."""
    from lora_causal.model.skeleton import build_skeleton, model_config
    from lora_causal.training.trackers import check_trackers_installed

    check_trackers_installed(recipe.output.report_to)
    check_outputs(recipe)
    check_sharding(recipe)
    config = model_config(recipe.model)
    check_max_length(recipe, config)
    check_lora_targets(recipe, build_skeleton(config, recipe.model.trust_remote_code, recipe.model.name_or_path,
                                              "model.name_or_path"))
    check_mamba(recipe, config)
    return config


def plan_run(recipe: Recipe, topology: Topology | None = None) -> RunPlan:
    """Every pre-flight check, then the run's resolved plan (the model's config is read once, for both)."""
    from lora_causal.training.plan import resolve_plan

    return resolve_plan(recipe, model_config=check_before_loading(recipe), topology=topology)


# ---------------------------------------------------------------------------------------------------------
# The model


def check_max_length(recipe: Recipe, config: Any) -> None:
    """Refuse a data.max_length beyond the model's position limit (read from its config, no weights)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < recipe.data.max_length:  # XLNet says -1: no limit
        raise UserError(
            f"data.max_length: {recipe.data.max_length} exceeds the model's maximum positions ({limit}); "
            f"set data.max_length to {limit} or less"
        )


def _matches(key: str, target: str) -> bool:
    """peft's rule for a listed name: the module's full name, or its last dotted part(s)."""
    return key == target or key.endswith(f".{target}")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_NAMES])
    return shown + (f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else "")


# peft refuses LoRA on these modules of Mamba-based models, but only once the weights are loaded
# (peft/tuners/tuners_utils.py, _check_lora_target_modules_mamba): refused here, before anything loads
MAMBA_MODEL_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")
MAMBA_NO_LORA = ("out_proj", "conv1d")
# transformers multiplies these models' dt_proj weight directly (modeling_mamba.py, modeling_falcon_mamba.py:
# `self.dt_proj.weight @ ...`), which a 4- or 8-bit packed weight cannot do
DT_PROJ_MODEL_TYPES = ("mamba", "falcon_mamba")


def check_mamba(recipe: Recipe, config: Any) -> None:
    """What Mamba-based models cannot do with LoRA or quantization, refused before any weights load."""
    model_type = getattr(config, "model_type", "")
    if model_type in DT_PROJ_MODEL_TYPES and recipe.quantization.mode != "none":
        raise UserError(f"quantization.mode: {recipe.quantization.mode} cannot load {model_type}: its dt_proj weight is "
                        "multiplied directly, which a quantized weight cannot be; set quantization.mode: none")
    if model_type not in MAMBA_MODEL_TYPES:
        return
    targets = recipe.lora.target_modules
    if targets == "all-linear":
        raise UserError(f"lora.target_modules: all-linear would put LoRA on {' and '.join(MAMBA_NO_LORA)} of {model_type}, "
                        "which peft refuses for Mamba-based models; list the layers to adapt, e.g. "
                        "[in_proj, x_proj] (and q_proj, k_proj, v_proj where the model has attention)")
    bad = sorted({target.rsplit(".", 1)[-1] for target in targets} & set(MAMBA_NO_LORA))
    if bad:
        raise UserError(f"lora.target_modules: {', '.join(bad)} of {model_type} cannot take LoRA (peft refuses them for "
                        "Mamba-based models); remove them from the list")


def check_lora_targets(recipe: Recipe, skeleton: Any) -> None:
    """Every lora.target_modules name must match layers LoRA can wrap; every modules_to_save name a module."""
    from lora_causal.model.skeleton import linear_layer_names, wrappable_types

    modules = [(name, module) for name, module in skeleton.named_modules() if name]
    available = linear_layer_names(skeleton)
    targets = recipe.lora.target_modules
    if targets == "all-linear":
        if not available:
            raise UserError(f"lora.target_modules: all-linear finds no linear layers in '{recipe.model.name_or_path}'; "
                            "list the modules to adapt by name")
    else:
        missing = [target for target in targets if not any(_matches(name, target) for name, _ in modules)]
        if missing:
            found = [target for target in targets if target not in missing]
            also = f" (found: {', '.join(found)})" if found else ""
            raise UserError(
                f"lora.target_modules: {', '.join(repr(name) for name in missing)} matches no module of "
                f"'{recipe.model.name_or_path}'{also}; its linear layers are {_listed(available)}"
            )
        wrappable = wrappable_types()
        for target in targets:
            kinds = sorted({type(module).__name__ for name, module in modules
                            if _matches(name, target) and not isinstance(module, wrappable)})
            if kinds:
                raise UserError(
                    f"lora.target_modules: '{target}' names {', '.join(kinds)} modules, which LoRA cannot wrap; name "
                    f"linear layers instead: {_listed(available)}"
                )
    absent = [name for name in recipe.lora.modules_to_save if not any(_matches(key, name) for key, _ in modules)]
    if absent:
        tops = sorted({key.rsplit(".", 1)[-1] for key, module in modules if not list(module.children())})
        raise UserError(f"lora.modules_to_save: {', '.join(repr(name) for name in absent)} matches no module of "
                        f"'{recipe.model.name_or_path}'; its layers are named {_listed(tops)}")


# ---------------------------------------------------------------------------------------------------------
# Launch


def check_sharding(recipe: Recipe, sharded: bool | None = None) -> None:
    """Refuse, before anything loads, what FSDP or ZeRO-3 cannot shard."""
    import torch

    from lora_causal.core.processes import launcher_engine, sharded_training
    from lora_causal.model.loading import resolve_compute_dtype

    engine = launcher_engine()
    if engine is not None and not torch.cuda.is_available():
        raise UserError(f"the accelerate config asks for {engine}, which needs GPUs, and this machine has none; launch "
                        "with recipes/accelerate/cpu_ddp.yaml on a CPU")
    if not (sharded_training() if sharded is None else sharded):
        return
    if recipe.quantization.mode == "int8":
        raise UserError("quantization.mode: int8 weights cannot be sharded by FSDP or ZeRO-3; use nf4 (4-bit weights are "
                        "stored in the compute dtype so they shard), or launch with recipes/accelerate/ddp.yaml")
    compute = str(resolve_compute_dtype(recipe.quantization.compute_dtype)).removeprefix("torch.")
    if recipe.lora.dtype not in ("auto", compute):
        raise UserError(f"lora.dtype: {recipe.lora.dtype} adapters beside a {compute} base cannot be sharded together by "
                        f"FSDP or ZeRO-3 (one dtype per sharded unit); set lora.dtype: auto (= {compute} when sharded)")


# ---------------------------------------------------------------------------------------------------------
# Outputs


def check_outputs(recipe: Recipe) -> None:
    """output.dir and output.merge.dir can be created, and the merge folder clobbers nothing."""
    import os

    from lora_causal.core.paths import check_can_create
    from lora_causal.core.rundir import RUN_ENTRIES, RUN_MARKER, is_merged_dir
    from lora_causal.training.plan import merge_target

    run = Path(recipe.output.dir)
    check_can_create(run, "output.dir")
    if recipe.data.cache_dir is not None:
        check_can_create(Path(recipe.data.cache_dir), "data.cache_dir")
    target = merge_target(recipe)
    if target is None:
        return
    check_can_create(target, "output.merge.dir")
    run_abs, target_abs = Path(os.path.abspath(run)), Path(os.path.abspath(target))
    if target_abs == run_abs or target_abs in run_abs.parents:
        raise UserError(f"output.merge.dir: '{target}' would hold the run folder itself; choose a folder of its own, such "
                        "as merged")
    if run_abs in target_abs.parents:
        first = target_abs.relative_to(run_abs).parts[0]
        if first in (name for name in (*RUN_ENTRIES, RUN_MARKER) if name != "merged"):
            raise UserError(f"output.merge.dir: '{recipe.output.merge.dir}' is where the run keeps its {first}; choose "
                            "another name, such as merged")
    if target.is_dir() and any(target.iterdir()) and not is_merged_dir(target):
        raise UserError(f"output.merge.dir: '{target}' is not empty and holds no merged model of lora_causal; choose a "
                        "new or empty folder")
