"""Whether a whole quantized copy of a base fits on this process's device: asked before the sample answers of a
sharded run, where the usual reason to shard is a base too big for one GPU.

The size is estimated from the weightless skeleton: linear layers (what bitsandbytes quantizes; the output head
stays unquantized) at 0.5 bytes per weight in nf4 and 1 in int8, everything else in the compute dtype, plus
HEADROOM for the adapter, activations of a few short answers and the allocator. `free_bytes` is the seam a test
replaces to simulate a small device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_causal.core.recipe import Recipe

HEADROOM = 1.2
BYTES_PER_QUANTIZED_WEIGHT = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}


def whole_copy_bytes(recipe: Recipe, config: Any) -> int:
    """Estimated bytes of a whole quantized copy of the recipe's base (from its config, no weights)."""
    import torch

    from lora_causal.model.loading import resolve_compute_dtype
    from lora_causal.model.skeleton import build_skeleton

    skeleton = build_skeleton(config, recipe.model.trust_remote_code, recipe.model.name_or_path)
    compute = torch.finfo(resolve_compute_dtype(recipe.quantization.compute_dtype)).bits // 8
    quantized = BYTES_PER_QUANTIZED_WEIGHT.get(recipe.quantization.mode, compute)
    head = skeleton.get_output_embeddings()
    total = 0.0
    for module in skeleton.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear) and module is not head:
            total += module.weight.numel() * quantized + sum(p.numel() for p in own if p is not module.weight) * compute
        else:
            total += sum(p.numel() for p in own) * compute
    return int(total * HEADROOM)


def free_bytes() -> int:
    """Free memory where this process would load the copy: its GPU, else the machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def whole_copy_fits(recipe: Recipe, config: Any) -> tuple[bool, int, int]:
    """(fits, bytes needed, bytes free) for a whole quantized copy of the base on this process's device."""
    needed, free = whole_copy_bytes(recipe, config), free_bytes()
    return needed <= free, needed, free
