"""A trained adapter on disk: where it is, what base and recipe it was trained on, whether it fits that base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.recipe import ModelSection, QuantizationSection, Recipe
from lora_causal.core.recipe_file import load_recipe

if TYPE_CHECKING:
    pass


@dataclass
class AdapterSource:
    """An adapter folder and what it was trained on."""

    adapter: Path
    model: ModelSection  # the base model; init: random bases are rebuilt from their config and seed
    quantization: QuantizationSection
    seed: int
    recipe: Recipe | None  # present for run directories


def locate_adapter(path: str, base_model: str | None = None, revision: str | None = None) -> AdapterSource:
    """Read a run directory (marker, manifest, recipe and adapter/) or a bare adapter folder (adapter_config.json)."""
    from lora_causal.core.paths import expand
    from lora_causal.core.readers import read_json_object
    from lora_causal.core.rundir import MANIFEST, RUN_MARKER, is_run_dir

    folder = expand(path, "adapter")
    if not folder.exists():
        raise UserError(f"adapter not found: '{folder}' does not exist; give a run directory or an adapter folder")
    if is_run_dir(folder):
        manifest = read_json_object(folder / MANIFEST, "the run's manifest is damaged; train the run again")
        if manifest.get("status") != "completed" or not (folder / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"'{folder}' holds no finished adapter (run status: {manifest.get('status')}); train it first")
        recipe = load_recipe(folder / "recipe.yaml")
        model = recipe.model
        if base_model is not None:
            model = model.model_copy(update={"name_or_path": base_model, "init": "pretrained", "revision": revision})
        return AdapterSource(folder / "adapter", model, recipe.quantization, recipe.train.seed, recipe)
    if not (folder / "adapter_config.json").is_file():
        inside = (f"; its adapter is in '{folder / 'adapter'}'" if (folder / "adapter" / "adapter_config.json").is_file()
                  else "")
        raise UserError(f"'{folder}' is neither a lora_causal run directory (no {RUN_MARKER}) nor an adapter folder (no "
                        f"adapter_config.json){inside}")
    config = read_json_object(folder / "adapter_config.json", "save the adapter again with peft's save_pretrained")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"'{folder}/adapter_config.json' describes a {config.get('peft_type')} adapter; lora_causal "
                        "merges LoRA adapters only")
    recorded = config.get("base_model_name_or_path")
    if base_model is None and recorded is not None and not isinstance(recorded, str):
        raise UserError(f"'{folder}/adapter_config.json': base_model_name_or_path must be text; pass --base-model")
    name = base_model or (_recorded_base(folder, recorded) if recorded else None)
    if not name:
        raise UserError(f"'{folder}/adapter_config.json' names no base model; pass --base-model")
    base_folder = Path(name)
    if base_folder.is_dir() and (base_folder / "config.json").is_file() and not any(
        next(base_folder.glob(pattern), None) is not None for pattern in ("*.safetensors", "*.bin")
    ):
        raise UserError(f"the base of '{folder}' is '{base_folder}', which holds a config but no weights (a "
                        "model.init: random base, drawn from its config with the run's seed); merge the run directory "
                        "instead, or pass the weights with --base-model")
    recorded_revision = config.get("revision") if isinstance(config.get("revision"), str) else None
    model = ModelSection(name_or_path=name, revision=revision or recorded_revision)
    return AdapterSource(folder, model, QuantizationSection(), 0, None)


def _recorded_base(adapter: Path, recorded: str) -> str:
    """The base named by an adapter: a path relative to the adapter folder (how lora_causal records a local
    base, see lora_causal.training.saving) when that exists, else the name as written (a Hub id or an absolute path)."""
    relative = adapter / recorded
    if not Path(recorded).is_absolute() and relative.exists():
        return str(relative.resolve())
    return recorded


def adapter_tokenizer(source: AdapterSource) -> Any:
    """The tokenizer saved with the adapter (lora_causal runs save it there), else the base model's."""
    from transformers import AutoTokenizer

    folder = source.adapter if (source.adapter / "tokenizer_config.json").is_file() else source.model.tokenizer or source.model.name_or_path
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=source.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{folder}': {first_line(exc)}") from None


def weights_folder(source: AdapterSource) -> str:
    if source.model.init == "random":
        from lora_causal.model.synthetic import materialize_random_model

        return str(materialize_random_model(Path(source.model.name_or_path), seed=source.seed,
                                            trust_remote_code=source.model.trust_remote_code))
    return source.model.name_or_path


def _adapter_ranks(source: AdapterSource) -> tuple[int, dict[str, int]]:
    """The rank (r) and per-module rank_pattern an adapter's own config declares."""
    from lora_causal.core.readers import read_json_object

    config = read_json_object(source.adapter / "adapter_config.json", "save the adapter again with peft's save_pretrained")
    rank, pattern = config.get("r", 8), config.get("rank_pattern") or {}
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(pattern, dict):
        raise UserError(f"'{source.adapter}/adapter_config.json': r must be a positive integer and rank_pattern an object; "
                        "save the adapter again with peft's save_pretrained")
    return rank, {str(key): value for key, value in pattern.items() if isinstance(value, int)}


def _declared_rank(name: str, rank: int, pattern: dict[str, int]) -> int:
    """peft's rule: a rank_pattern key matching the module's name (or its last dotted parts) wins over r."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return rank


def _features(layer: Any, side: str) -> int | None:
    """A layer's input or output width: nn.Linear's in/out_features, or GPT-2 Conv1D's nx/nf."""
    if layer is None:
        return None
    value = getattr(layer, f"{side}_features", None)
    return value if value is not None else getattr(layer, "nx" if side == "in" else "nf", None)


def check_adapter_fits(source: AdapterSource) -> None:
    """Before loading any weights: the adapter's tensors agree with its own config (its rank), and their shapes
    fit a weightless skeleton of the base."""
    from safetensors import safe_open

    from lora_causal.model.skeleton import build_skeleton, load_model_config

    weights = source.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"'{source.adapter}' has no adapter_model.safetensors; only safetensors adapters are read")
    rank, pattern = _adapter_ranks(source)
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            shapes = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"'{weights}' is not a readable safetensors file ({first_line(exc)}); save the adapter "
                        "again") from None
    lora = {key: shape for key, shape in shapes.items() if ".lora_A." in key or ".lora_B." in key}
    for key, shape in lora.items():
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        found = shape[0] if ".lora_A." in key else (shape[1] if len(shape) > 1 else None)
        declared = _declared_rank(name, rank, pattern)
        if len(shape) < 2 or found != declared:
            raise UserError(
                f"the adapter in '{source.adapter}' does not match its own adapter_config.json: layer {name} has "
                f"rank r={found} in adapter_model.safetensors, and adapter_config.json says r={declared}; put the "
                "adapter_config.json saved with these weights back (or set r to match)"
            )
    model = source.model
    config = load_model_config(model.name_or_path, model.revision if model.init == "pretrained" else None,
                               model.trust_remote_code, "base model")
    modules = dict(build_skeleton(config, model.trust_remote_code, model.name_or_path).named_modules())
    for key, shape in lora.items():
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        layer = modules.get(name)
        expected = _features(layer, "in" if ".lora_A." in key else "out")
        found = shape[1] if ".lora_A." in key else shape[0]
        if layer is None or expected != found:
            has = f"base has {expected}" if layer is not None else "the base has no such layer"
            raise UserError(
                f"the adapter in '{source.adapter}' does not fit base model '{model.name_or_path}' "
                f"(layer {name}: adapter expects {found} features, {has}); pass the base it was "
                "trained on with --base-model"
            )


def with_adapter(model: Any, adapter: Path) -> Any:
    """Attach a saved adapter for inference; a mismatch with the base becomes a one-line error."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"cannot attach the adapter in '{adapter}' to base model '{model.name_or_path}' ({first_line(exc)})"
        ) from None
    peft_model.eval()
    return peft_model
