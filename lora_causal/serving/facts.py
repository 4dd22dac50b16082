"""What an adapter (or a recipe, before training) declares, read offline: the facts the serving rules judge.

A trained adapter gives its `adapter_config.json`, the tensor names and shapes in the header of
`adapter_model.safetensors` (no weights are loaded), its `added_tokens.json` if any, and its base model's
`config.json`. A recipe gives the LoRA config peft would save for it (`lora_causal.model.build_lora_config`) and its
base model's config; it has no tensors yet, so the tensor rules are predicted from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError, first_line

# The linear layers of the families whose module names we know (Hugging Face names, which vLLM and SGLang keep):
# what `target_modules: all-linear` becomes on them.
LINEAR_LAYERS: dict[str, tuple[str, ...]] = {
    family: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for family in ("llama", "mistral", "qwen2", "qwen3")
}
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class AdapterFacts:
    """One adapter's serving-relevant facts. `tensors` is None for a recipe (nothing trained yet)."""

    where: str  # the adapter folder or the recipe file, for messages
    config: dict[str, Any]  # adapter_config.json (or what peft would save for the recipe)
    tensors: dict[str, tuple[int, ...]] | None
    base: str | None  # the base model's name or folder
    base_config: dict[str, Any] | None  # its config.json, or None when it cannot be read offline
    base_problem: str | None = None  # why base_config is None
    added_tokens: dict[str, int] = field(default_factory=dict)
    is_recipe: bool = False

    @property
    def model_type(self) -> str | None:
        return (self.base_config or {}).get("model_type")

    @property
    def vocab_size(self) -> int | None:
        value = (self.base_config or {}).get("vocab_size")
        return value if isinstance(value, int) else None

    @property
    def ranks(self) -> list[int]:
        """r and every rank in rank_pattern (what a server's --max-lora-rank must cover)."""
        pattern = self.config.get("rank_pattern") or {}
        values = [self.config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [])]
        return [value for value in values if isinstance(value, int) and not isinstance(value, bool)]

    def target_names(self) -> list[str] | str:
        """The last name component of every module the adapter adapts (from tensors when trained), or the string
        target_modules ("all-linear") when a recipe's base family is unknown."""
        if self.tensors is not None:
            names = set()
            for key in self.tensors:
                for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
                    if marker in key:
                        names.add(key.split(marker)[0].rsplit(".", 1)[-1])
            return sorted(names)
        targets = self.config.get("target_modules")
        if isinstance(targets, str):
            return list(LINEAR_LAYERS[self.model_type]) if self.model_type in LINEAR_LAYERS else targets
        return sorted({str(name).rsplit(".", 1)[-1] for name in targets or []})


def is_recipe_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in RECIPE_SUFFIXES


def _base_config(name: str | None, trust_remote_code: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """The base model's config as a dict (local folder, or the Hub cache; never a download)."""
    if not name:
        return None, "the adapter names no base model (pass --base-model)"
    from lora_causal.model.skeleton import load_model_config

    try:
        config = load_model_config(name, None, trust_remote_code, "base model")
    except UserError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - offline Hub lookups fail with several error types
        return None, first_line(exc)
    text = getattr(config, "get_text_config", lambda: config)()
    values = text.to_dict()
    values.setdefault("model_type", getattr(config, "model_type", None))
    values["tie_word_embeddings"] = bool(getattr(text, "tie_word_embeddings", values.get("tie_word_embeddings", False)))
    return values, None


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="np") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"'{weights}' is not a readable safetensors file ({first_line(exc)}); save the adapter again") from None


def _recorded_base(adapter: Path, recorded: str) -> str:
    """A base recorded relative to the adapter folder (how lora_causal saves a local base) or as written."""
    relative = adapter / recorded
    return str(relative.resolve()) if not Path(recorded).is_absolute() and relative.exists() else recorded


def adapter_facts(path: str, base_model: str | None = None) -> AdapterFacts:
    """Facts of a run directory's adapter, or of an adapter folder."""
    from lora_causal.core.paths import expand
    from lora_causal.core.readers import read_json, read_json_object
    from lora_causal.core.rundir import is_run_dir

    folder = expand(path, "ADAPTER_OR_RECIPE")
    if not folder.exists():
        raise UserError(f"'{folder}' does not exist; give a run directory, an adapter folder or a recipe file")
    run_base = None
    if is_run_dir(folder):
        if base_model is None:  # the weights the run trained on: a random-init base lives in the weights cache
            from lora_causal.serving.adapters import locate_adapter, weights_folder

            run_base = weights_folder(locate_adapter(str(folder)))
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"'{folder}' holds no adapter_config.json, so it is not a LoRA adapter; give a run directory, "
                        "an adapter folder or a recipe (.yaml)")
    config = read_json_object(folder / "adapter_config.json", "save the adapter again with peft's save_pretrained")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"'{folder}' holds a {config.get('peft_type')} adapter; the serving engines load LoRA adapters only")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"'{folder}' has no adapter_model.safetensors; the serving engines read safetensors adapters")
    recorded = config.get("base_model_name_or_path")
    base = base_model or run_base or (_recorded_base(folder, recorded) if isinstance(recorded, str) and recorded else None)
    base_config, problem = _base_config(base)
    added: dict[str, int] = {}
    if (folder / "added_tokens.json").is_file():
        raw = read_json(folder / "added_tokens.json", "save the tokenizer again with save_pretrained")
        added = {str(k): v for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}
    return AdapterFacts(str(folder), config, _tensor_shapes(weights), base, base_config, problem, added)


def recipe_facts(path: str, overrides: list[str] | tuple[str, ...] = ()) -> AdapterFacts:
    """Facts predicted from a recipe: the adapter config peft will save for it and its base model's config."""
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.model.loading import build_lora_config

    recipe = load_recipe(path, list(overrides))
    config = build_lora_config(recipe.lora).to_dict()
    config["target_modules"] = (recipe.lora.target_modules if isinstance(recipe.lora.target_modules, str)
                                else list(recipe.lora.target_modules))
    base_config, problem = _base_config(recipe.model.name_or_path, recipe.model.trust_remote_code)
    return AdapterFacts(str(path), config, None, recipe.model.name_or_path, base_config, problem, is_recipe=True)


def gather_facts(path: str, overrides: list[str] | tuple[str, ...] = (), base_model: str | None = None) -> AdapterFacts:
    """Facts of a recipe file (by its .yaml suffix) or of a trained adapter."""
    candidate = Path(path).expanduser()
    if is_recipe_path(candidate):
        if base_model is not None:
            raise UserError("--base-model applies to adapters; a recipe names its base in model.name_or_path")
        return recipe_facts(path, overrides)
    if overrides:
        raise UserError("key=value overrides apply to recipes; an adapter's settings are fixed in adapter_config.json")
    return adapter_facts(path, base_model)
