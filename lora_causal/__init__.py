"""lora_causal: QLoRA fine-tuning of Hugging Face causal LMs from strict YAML recipes.

The public API for scripts (everything else is internal and may change between releases):

    from lora_causal import load_recipe, run_training, merge_adapter, CausalLMCollator

- `load_recipe(path, overrides=())` -> `Recipe`: a recipe file read strictly (`UserError` names what to fix);
- `resolve_plan(recipe)` -> `RunPlan`: what a run would do here (batching, attention, outputs), no weights loaded;
- `run_training(recipe)` -> `TrainResult`: train the adapter and fill the run folder, as `lora-causal train` does;
- `merge_adapter(run_or_adapter_dir, out_dir)` -> report: merge into the base and measure the merge;
- `CausalLMCollator(pad_token_id, mask_prompt=False, padding_free=False, pad_to_multiple_of=None)`: the collator.
Names load on first use, so `import lora_causal` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_recipe": "lora_causal.core.recipe_file",
    "Recipe": "lora_causal.core.recipe",
    "UserError": "lora_causal.core.errors",
    "resolve_plan": "lora_causal.training.plan",
    "RunPlan": "lora_causal.training.plan",
    "run_training": "lora_causal.training.run",
    "TrainResult": "lora_causal.training.run",
    "merge_adapter": "lora_causal.serving.merging",
    "CausalLMCollator": "lora_causal.data.collator",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lora_causal' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
