"""A model's config and its skeleton: what can be known of a model before any weights load.

The config comes from config.json alone; the skeleton is the causal LM built from it on the meta device (module
names and shapes, no memory). Every failure is one line naming the recipe key or option it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line

if TYPE_CHECKING:
    from lora_causal.core.recipe import ModelSection


def load_model_config(name_or_path: str, revision: str | None, trust_remote_code: bool, what: str = "model") -> Any:
    """A model's config (config.json only, no weights); every failure is one line naming `what`."""
    from transformers import AutoConfig

    from lora_causal.core.readers import read_json_object
    from lora_causal.core.recipe_file import looks_local

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


def model_config(model: ModelSection) -> Any:
    """The recipe model's config (config.json only, no weights); a damaged or foreign config is one error line."""
    return load_model_config(model.name_or_path, model.revision, model.trust_remote_code,
                             "model.name_or_path")


def wrappable_types() -> tuple[type, ...]:
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
