"""Named model shapes for benchmarks: the published configs of real models, without their weights.

Weights are random (seeded) and built once by `synthetic.materialize_random_model`; speed and memory depend on
the shape, not on the values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "initializer_range": 0.1, "tie_word_embeddings": False,
        "dtype": "float32",
    },
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_ROPE},
        "bos_token_id": 128000, "eos_token_id": 128001, "dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 500000.0, "factor": 8.0, **_LLAMA3_ROPE},
        "bos_token_id": 128000, "eos_token_id": 128001, "dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "bos_token_id": 151643, "eos_token_id": 151643, "dtype": "bfloat16",
    },
}


def write_shape_config(shape: str, folder: Path) -> Path:
    """Write the config.json of a named shape (or copy a given config.json) into `folder`; return the folder."""
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    if shape in SHAPES:
        values = dict(SHAPES[shape])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        path = Path(shape)
        if not path.is_file():
            raise UserError(f"--shape: '{shape}' is neither a named shape ({', '.join(SHAPES)}) nor a config.json file")
        try:
            config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
        except (OSError, ValueError) as exc:
            raise UserError(f"--shape: cannot read '{path}' as a model config ({exc})") from None
    config.save_pretrained(folder)
    return folder


def parameter_counts(config_dir: Path) -> dict[str, int]:
    """Parameters in matmuls (what each token multiplies through, lm_head included) and in embeddings."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    linear = sum(module.weight.numel() for module in model.modules() if module.__class__.__name__ == "Linear")
    return {"matmul": linear, "embedding": embedding, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "vocab": config.vocab_size,
            "max_positions": getattr(config, "max_position_embeddings", 2048),
            "dtype": json.loads(config.to_json_string()).get("dtype") or "float32"}
