"""Checks that refuse a run before any weights load or any folder is created."""

from __future__ import annotations

from typing import Any

from lora_causal.config import Recipe
from lora_causal.errors import UserError


def check_max_length(recipe: Recipe, config: Any) -> None:
    """Refuse a data.max_length beyond the model's position limit (read from its config, no weights)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and recipe.data.max_length > limit:
        raise UserError(
            f"data.max_length: {recipe.data.max_length} exceeds the model's maximum positions ({limit}); "
            f"set data.max_length to {limit} or less"
        )


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
