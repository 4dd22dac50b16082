"""Build the quantization and LoRA configs, load the base model and tokenizer, attach the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.processes import sharded_training, state_if_started
from lora_causal.core.recipe import LoraSection, ModelSection, QuantizationSection
from lora_causal.core.recipe_file import looks_local

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`auto` -> bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def build_quantization_config(
    section: QuantizationSection, compute_dtype: torch.dtype, sharded: bool | None = None
) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for a recipe's quantization section (None for mode: none).

    `sharded` (default: whether this process trains under FSDP or ZeRO-3) stores the packed 4-bit weights in the
    compute dtype, so the sharding engine can flatten them with the rest.
    """
    from transformers import BitsAndBytesConfig

    if section.mode == "none":
        return None
    if section.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.mode,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP and ZeRO-3 shard the packed 4-bit weights with the rest, so they must share the float dtype.
        bnb_4bit_quant_storage=compute_dtype if (sharded_training() if sharded is None else sharded) else None,
    )


def build_lora_config(section: LoraSection) -> LoraConfig:
    """The peft LoraConfig for a recipe's lora section."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        bias=section.bias,
        modules_to_save=list(section.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def device_map_for_process(sharded: bool | None = None) -> dict[str, Any] | None:
    """Put the whole model on this process's device: its GPU under accelerate/torchrun, else GPU 0 or the CPU.

    Under FSDP and ZeRO-3 (`sharded`, default: as this process trains) the sharding engine places the weights, so
    no device map is given.
    """
    import torch

    if sharded_training() if sharded is None else sharded:
        return None
    if torch.cuda.is_available():
        state = state_if_started()
        return {"": state.local_process_index if state is not None else torch.cuda.current_device()}
    return {"": "cpu"}


def _check_local(path: str, what: str) -> None:
    if looks_local(path) and not Path(path).exists():
        raise UserError(f"{what}: '{path}' does not exist; give an existing folder or a Hub model id")


def load_tokenizer(section: ModelSection) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it has a pad token (the EOS token when it has none).

    Padding is masked by position, so a pad token equal to EOS never hides the real EOS from the loss.
    """
    from transformers import AutoTokenizer

    source = section.tokenizer or section.name_or_path
    _check_local(source, "model.tokenizer" if section.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{source}': {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{source}' has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    section: ModelSection, quantization: QuantizationSection, seed: int, sharded: bool | None = None
) -> PreTrainedModel:
    """Load the frozen base: quantized per the recipe, on this process's device, not upcast to fp32.

    `sharded` (default: whether this process trains under FSDP/ZeRO-3) leaves placement to the sharding engine;
    False loads a whole copy onto this process's device.

    Gradient checkpointing (non-reentrant) is switched on by the trainer from the SFTConfig.
    """
    from transformers import AutoModelForCausalLM

    compute_dtype = resolve_compute_dtype(quantization.compute_dtype)
    weights = section.name_or_path
    if section.init == "random":
        from lora_causal.model.synthetic import materialize_random_model

        _check_local(weights, "model.name_or_path")
        from lora_causal.core.processes import speaks

        # one process draws and saves (transformers writes only on global rank 0 once a process group exists); the
        # others, on every machine, wait for the folder: with several machines the cache must be shared
        weights = str(materialize_random_model(Path(weights), seed=seed, writer=speaks(),
                                               trust_remote_code=section.trust_remote_code))
    else:
        _check_local(weights, "model.name_or_path")
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype,
        "device_map": device_map_for_process(sharded),
        "revision": section.revision if section.init == "pretrained" else None,
        "trust_remote_code": section.trust_remote_code,
    }
    quantization_config = build_quantization_config(quantization, compute_dtype, sharded)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if section.attn_implementation == "varlen":
        from lora_causal.model.attention import register

        kwargs["attn_implementation"] = register()
    elif section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load model '{section.name_or_path}': {first_line(exc)}") from None
    model.config.use_cache = False  # transformers honours packed position_ids only without a KV cache
    if section.init == "random":  # the base is named by its config folder, not by the cache folder of its weights
        model.config.name_or_path = model.name_or_path = section.name_or_path
    keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model: PreTrainedModel) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; return how many layers were set.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight to an inference-only layout the
    first time it runs in eval mode without grad (sampling, evaluation). Later training steps then go through a
    kernel with no autograd support, and gradients stop flowing through the frozen layers into earlier adapters.
    Training must survive evaluation, so the conversion is switched off per layer.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def attach_lora(model: PreTrainedModel, section: LoraSection, seed: int) -> PeftModel:
    """Wrap the frozen base with a trainable LoRA adapter in the recipe's adapter dtype.

    LoRA A matrices start random, so the RNG is seeded first: the same recipe gives the same adapter whether it
    runs through `lora-causal`, `python -m` or `accelerate launch`.
    """
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    peft_model = get_peft_model(model, build_lora_config(section))
    set_adapter_dtype(peft_model, section.dtype)
    return peft_model


def adapter_dtype_name(dtype_name: str, sharded: bool | None = None, compute_dtype: str = "auto") -> str:
    """The adapter dtype of `lora.dtype`: auto is float32, or the compute dtype when FSDP/ZeRO-3 shard the model."""
    if dtype_name != "auto":
        return dtype_name
    if sharded_training() if sharded is None else sharded:
        return str(resolve_compute_dtype(compute_dtype)).removeprefix("torch.")
    return "float32"


def set_adapter_dtype(model: PeftModel, dtype_name: str, compute_dtype: str = "auto") -> None:
    """Store every trainable (adapter) parameter in `lora.dtype`; frozen base weights are left as loaded."""
    import torch

    dtype = getattr(torch, adapter_dtype_name(dtype_name, compute_dtype=compute_dtype))
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def trainable_report(model: PeftModel) -> str:
    """One line: trainable parameters, all parameters (4-bit weights counted unpacked), and the share."""
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
