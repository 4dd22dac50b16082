"""Saving the trained adapter: by the main process alone, or gathered from a sharded model without the base.

Under FSDP2 (parameters are DTensors) and DeepSpeed ZeRO-3 only the adapter's weights are gathered, one at a
time, to whole tensors: a few million values, never the 4-bit base. FSDP1 flattens adapter and base weights into
shared units, so there the adapter comes out of the full state dict (peft's documented way), which gathers the
base to the main process's CPU memory too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def gather_adapter_state(model: Any) -> dict[str, Any] | None:
    """Whole copies (on the CPU) of every trainable parameter, by name; every process must call it (collectives).

    Returns None for FSDP1's flattened parameters, which cannot be gathered one by one.
    """
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if any(type(parameter).__name__ == "FlatParameter" or name.startswith("_fsdp_wrapped_module")
           or "._fsdp_wrapped_module." in name for name, parameter in trainable):
        return None
    zero3 = [parameter for _, parameter in trainable if hasattr(parameter, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return {name: parameter.detach().to("cpu", copy=True) for name, parameter in trainable}
    state = {}
    for name, parameter in trainable:  # the same order on every process, so the gathers pair up
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter  # DTensor under FSDP2
        state[name] = full.detach().to("cpu", copy=True)
    return state


def record_base_reference(staging: Path, target: Path) -> None:
    """Name a local base in adapter_config.json relative to the adapter folder (`target`), not by an absolute path
    only this machine resolves; Hub ids stay as they are. `lora-causal merge`/`generate` resolve it back."""
    import json
    import os

    config_file = staging / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and os.path.isabs(base) and Path(base).exists():
        config["base_model_name_or_path"] = os.path.relpath(base, target.resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(trainer: Any, model: Any, tokenizer: Any, target: Path, is_main: bool, sharded: bool) -> None:
    """Write the adapter and tokenizer to a staging folder, then move it into place in one rename."""
    from lora_causal.core.rundir import replace_dir_atomic, write_dir_atomic

    if not sharded:
        if is_main:
            write_dir_atomic(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging),
                                                      record_base_reference(staging, target)))
        return
    trainer.accelerator.wait_for_everyone()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    state = gather_adapter_state(unwrapped)
    if state is not None:
        if is_main:
            write_dir_atomic(target, lambda staging: (unwrapped.save_pretrained(staging, state_dict=state),
                                                      tokenizer.save_pretrained(staging),
                                                      record_base_reference(staging, target)))
        trainer.accelerator.wait_for_everyone()
        return
    # FSDP1: every process takes part in building the full state dict, saved into a staging folder all can name
    staging = target.with_name(f".{target.name}-staging")
    if is_main and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if is_main:
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run keeps its recipe instead
        tokenizer.save_pretrained(staging)
        record_base_reference(staging, target)
        replace_dir_atomic(staging, target)
