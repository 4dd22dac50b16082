"""Pre-flight: everything knowable before any weights load, checked by `validate` and by `train` up front.

What can be known from the recipe, the model's config (a weightless skeleton on the meta device) and the file
system is refused here, in one line, before a tokenizer, data or weights load and before any folder exists:
- trackers: every `output.report_to` tracker installed (lora_causal.trackers names the `pip install`);
- the model: config.json readable and an object, a causal LM (not an encoder-decoder), remote code only when
  `model.trust_remote_code: true`, data.max_length within its positions;
- LoRA: every `lora.target_modules` and `lora.modules_to_save` name matches a module of the skeleton, and target
  modules are layers LoRA can wrap (the available linear layer names are listed);
- sharding: what FSDP / ZeRO-3 cannot shard, and a launcher asking for GPUs on a machine without one;
- outputs: `output.dir`, `output.merge.dir` and `data.cache_dir` can be created (no NUL, names the file system accepts, not under
  a file, writable), and the merge folder is neither part of the run folder nor somebody else's non-empty folder.
The seed range and other single-value rules live in the recipe schema (lora_causal.config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_causal.config import Recipe
from lora_causal.errors import UserError, first_line

MAX_LISTED_NAMES = 24


def check_before_loading(recipe: Recipe) -> Any:
    """Run every pre-flight check of a recipe; return the model's config (read once, no weights)."""
    from lora_causal.batching import model_config
    from lora_causal.trackers import check_trackers_installed

    check_trackers_installed(recipe.output.report_to)
    check_outputs(recipe)
    check_sharding(recipe)
    config = model_config(recipe)
    check_max_length(recipe, config)
    check_lora_targets(recipe, model_skeleton(recipe, config))
    return config


# ---------------------------------------------------------------------------------------------------------
# The model


def load_model_config(name_or_path: str, revision: str | None, trust_remote_code: bool, what: str = "model") -> Any:
    """A model's config (config.json only, no weights); every failure is one line naming `what`."""
    from transformers import AutoConfig

    from lora_causal.readers import read_json_object

    from lora_causal.config import looks_local

    folder = Path(name_or_path)
    if looks_local(name_or_path) and not folder.exists():
        raise UserError(f"{what}: '{name_or_path}' does not exist; give an existing folder or a Hub model id")
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{what}: '{folder}' has no config.json; give a model folder (saved with save_pretrained) "
                            "or a Hub model id")
        config = read_json_object(folder / "config.json", "give a model folder with a valid config.json")
        if not isinstance(config.get("model_type"), str) and "auto_map" not in config:
            raise UserError(f"{what}: '{folder}/config.json' names no model_type, so it is not a transformers model "
                            "config; give a model folder saved with save_pretrained")
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load model '{name_or_path}': {first_line(exc)}") from None
    except RecursionError:
        raise UserError(f"cannot load model '{name_or_path}': its config.json is nested too deeply to read") from None


def model_skeleton(recipe: Recipe, config: Any) -> Any:
    """The recipe's model built on the meta device from its config: module names and shapes, no weights."""
    return build_skeleton(config, recipe.model.trust_remote_code, recipe.model.name_or_path, "model.name_or_path")


def build_skeleton(config: Any, trust_remote_code: bool, name: str, what: str = "base model") -> Any:
    """A causal LM built from `config` on the meta device (no memory, no weights); a config of another kind of
    model (an encoder-decoder, a vision model) is one short line naming `what`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UserError(
                f"{what}: '{name}' is a {getattr(config, 'model_type', 'unknown')} model ({type(config).__name__}), "
                "not a causal language model; choose a decoder-only model such as a Llama, Qwen or Mistral checkpoint"
            ) from None
        raise UserError(f"cannot build model '{name}' from its config: {first_line(exc)}") from None
    except (ImportError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise UserError(f"cannot build model '{name}' from its config: {first_line(exc)}") from None


def check_max_length(recipe: Recipe, config: Any) -> None:
    """Refuse a data.max_length beyond the model's position limit (read from its config, no weights)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and recipe.data.max_length > limit:
        raise UserError(
            f"data.max_length: {recipe.data.max_length} exceeds the model's maximum positions ({limit}); "
            f"set data.max_length to {limit} or less"
        )


def _wrappable_types() -> tuple[type, ...]:
    """Module types peft's LoRA can wrap (linear layers, GPT-2's Conv1D, embeddings, convolutions)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def linear_layer_names(skeleton: Any) -> list[str]:
    """The distinct last names of the skeleton's linear layers (what lora.target_modules usually lists)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = skeleton.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output}
    return sorted(names)


def _matches(key: str, target: str) -> bool:
    """peft's rule for a listed name: the module's full name, or its last dotted part(s)."""
    return key == target or key.endswith(f".{target}")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_NAMES])
    return shown + (f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else "")


def check_lora_targets(recipe: Recipe, skeleton: Any) -> None:
    """Every lora.target_modules name must match layers LoRA can wrap; every modules_to_save name a module."""
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
        wrappable = _wrappable_types()
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

    from lora_causal.model import resolve_compute_dtype
    from lora_causal.processes import launcher_engine, sharded_training

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


def merge_target(recipe: Recipe) -> Path | None:
    """Where output.merge writes the merged model: output.merge.dir, inside output.dir unless absolute."""
    if recipe.output.merge is None:
        return None
    from lora_causal.paths import expand

    folder = expand(recipe.output.merge.dir, "output.merge.dir")
    return folder if folder.is_absolute() else Path(recipe.output.dir) / folder


def check_outputs(recipe: Recipe) -> None:
    """output.dir and output.merge.dir can be created, and the merge folder clobbers nothing."""
    import os

    from lora_causal.paths import check_can_create
    from lora_causal.rundir import RUN_ENTRIES, RUN_MARKER, is_merged_dir

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
