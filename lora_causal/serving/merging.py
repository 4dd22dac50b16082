"""Merge a LoRA adapter into its base model, and measure what the merge changed.

Two honest bases, chosen explicitly and reported:
- `original`: the pristine base weights in the chosen dtype. What serving wants; it differs slightly from the
  NF4-rounded base the adapter was trained against.
- `nf4-roundtrip`: the base weights exactly as training saw them (each 4-bit layer dequantized), so the merged
  model reproduces the model as trained.

The fidelity report compares the merged model with the adapter on the 4-bit base (as trained) and with the
adapter on the unquantized base: max |delta logit|, mean KL, top-1 agreement and each model's perplexity.
Memory: one dense copy of the base plus its 4-bit copy at most; the merged folder is written to a temporary
folder and renamed at the end, so a crash never leaves half a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.recipe import ModelSection
from lora_causal.core.rundir import MERGE_REPORT as REPORT
from lora_causal.core.rundir import MERGE_REPORT_FORMAT
from lora_causal.serving.adapters import (
    AdapterSource,
    adapter_tokenizer,
    check_adapter_fits,
    locate_adapter,
    weights_folder,
    with_adapter,
)
from lora_causal.serving.fidelity import compare, logits_for, perplexity, sample_prompts, verdict

if TYPE_CHECKING:
    import torch

BASES = ("original", "nf4-roundtrip")
DTYPES = ("bfloat16", "float16", "float32")


def load_dense_base(source: AdapterSource, dtype: torch.dtype) -> Any:
    """The unquantized base model in `dtype`, on the CPU (merging needs no GPU)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            weights_folder(source),
            dtype=dtype,
            revision=source.model.revision if source.model.init == "pretrained" else None,
            trust_remote_code=source.model.trust_remote_code,
            device_map={"": "cpu"},
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load base model '{source.model.name_or_path}': {first_line(exc)}") from None


def copy_nf4_weights_into(dense: Any, quantized: Any, progress: bool | None = None) -> int:
    """Overwrite each dense Linear weight with the dequantized 4-bit weight training used; return the count.

    `progress`: show a progress bar (default: only when stderr is a terminal)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from tqdm.auto import tqdm

    dense_modules = dict(dense.named_modules())
    layers = [(name, module) for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    for name, layer in tqdm(layers, desc="dequantizing NF4 layers", disable=None if progress is None else not progress):
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        target = dense_modules.get(name)
        if target is None or tuple(target.weight.shape) != tuple(layer.weight.quant_state.shape):
            raise UserError(f"the 4-bit and dense models disagree on layer '{name}'; they are not the same base")
        with torch.no_grad():
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            target.weight.copy_(weight.to(target.weight.dtype))
    return len(layers)


# ---------------------------------------------------------------------------------------------------------
# Fidelity


# ---------------------------------------------------------------------------------------------------------
# The whole merge


def check_output(out: Path, force: bool, what: str = "--out") -> None:
    """`out` can be created; a non-empty one is replaced only with `force`, and only when it holds an earlier merge
    (a folder with lora_causal's merge report): never somebody else's folder."""
    from lora_causal.core.paths import check_can_create
    from lora_causal.core.rundir import is_merged_dir

    check_can_create(out, what)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"output folder '{out}' exists and is not empty; choose another {what} or pass --force")
        if not is_merged_dir(out):
            raise UserError(f"{what}: '{out}' is not empty and holds no merged model of lora_causal (--force replaces only "
                            "an earlier merge); choose a new or empty folder")


def public_reference(path: Path | str, merged: Path) -> str:
    """How the merge report names a local file or folder: relative to the merged folder when they are close
    (`../adapter`), else by its name only, so the report never carries a machine's absolute paths."""
    import os

    path = Path(path)
    relative = os.path.relpath(path, merged)
    return relative if relative.split(os.sep).count("..") <= 2 else path.name


def public_model(model: ModelSection, merged: Path) -> dict[str, Any]:
    """The base model's recipe section with local paths made public references (Hub ids stay as they are)."""
    from lora_causal.core.recipe_file import looks_local

    values = model.model_dump(mode="json")
    for key in ("name_or_path", "tokenizer"):
        value = values.get(key)
        if isinstance(value, str) and (Path(value).is_absolute() or looks_local(value)):
            values[key] = public_reference(value, merged)
    return values


def merge_adapter(  # noqa: PLR0913
    path: str,
    out: str,
    base: str = "original",
    dtype_name: str = "bfloat16",
    force: bool = False,
    prompts: list[str] | None = None,
    num_prompts: int = 8,
    max_prompt_tokens: int = 256,
    base_model: str | None = None,
    revision: str | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Merge, save and measure. Returns the report (also written to OUT/merge_report.json)."""
    import torch

    from lora_causal.core.rundir import write_dir_atomic, write_json_atomic
    from lora_causal.model.loading import load_base_model

    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, not '{base}'")
    if dtype_name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype_name}'")
    from lora_causal.core.paths import expand

    target = expand(out, "--out")
    check_output(target, force)
    target = target.resolve()
    source = locate_adapter(path, base_model, revision)
    if base == "nf4-roundtrip" and source.quantization.mode not in ("nf4", "fp4"):
        raise UserError(f"--base nf4-roundtrip needs a 4-bit trained adapter; this one trained with {source.quantization.mode}")
    check_adapter_fits(source)
    dtype = getattr(torch, dtype_name)
    tokenizer = adapter_tokenizer(source)
    sample = sample_prompts(source, tokenizer, prompts or [], num_prompts, max_prompt_tokens)

    say(f"loading the 4-bit base as trained ({source.quantization.mode}) with the adapter")
    quantized = with_adapter(load_base_model(source.model, source.quantization, source.seed), source.adapter)
    trained_logits = logits_for(quantized, sample)

    say(f"loading the unquantized base in {dtype_name}")
    dense = with_adapter(load_dense_base(source, dtype), source.adapter)
    unquantized_logits = logits_for(dense, sample)
    dense = dense.unload()  # the bare base again, adapter layers removed without merging
    if base == "nf4-roundtrip":
        copy_nf4_weights_into(dense, quantized)
    del quantized

    say(f"merging the adapter into the {base} base")
    merged = with_adapter(dense, source.adapter).merge_and_unload()
    merged_logits = logits_for(merged, sample)
    vs_trained = compare(merged_logits, trained_logits)
    vs_unquantized = compare(merged_logits, unquantized_logits)
    report = {
        "format": MERGE_REPORT_FORMAT,
        "version": 1,
        "base": base,
        "dtype": dtype_name,
        "base_model": public_model(source.model, target),
        "adapter": public_reference(source.adapter, target),
        "trained_quantization": source.quantization.model_dump(mode="json"),
        "prompts": len(sample),
        "tokens": sum(len(ids) for ids in sample),
        "vs_trained_4bit_adapter": vs_trained,
        "vs_unquantized_adapter": vs_unquantized,
        "perplexity": {
            "merged": perplexity(merged_logits, sample),
            "trained_4bit_adapter": perplexity(trained_logits, sample),
            "unquantized_adapter": perplexity(unquantized_logits, sample),
        },
        "prompt_format": source.recipe.data.train.format if source.recipe else None,
        "verdict": verdict(base, vs_trained, vs_unquantized),
    }

    def write(staging: Path) -> None:
        merged.config.use_cache = True
        merged.save_pretrained(staging, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / REPORT, report)

    write_dir_atomic(target, write)
    return {**report, "out": str(target)}  # the caller's own path; the file travels with the model, so it has none


def format_report(report: dict[str, Any]) -> str:
    lines = [f"merge ({report['base']}, {report['dtype']}) measured on {report['prompts']} prompts, {report['tokens']} tokens:"]
    for key, label in (("vs_trained_4bit_adapter", "vs 4-bit base + adapter (as trained)"),
                       ("vs_unquantized_adapter", "vs unquantized base + adapter")):
        m = report[key]
        lines.append(
            f"  {label}: max |delta logit| {m['max_abs_logit_diff']:.3g}, mean KL {m['mean_kl']:.3g}, "
            f"top-1 agreement {m['top1_agreement']:.2%}"
        )
    p = report["perplexity"]
    lines.append(
        f"  perplexity: merged {p['merged']:.4g}, as trained {p['trained_4bit_adapter']:.4g}, "
        f"unquantized + adapter {p['unquantized_adapter']:.4g}"
    )
    lines.append(f"  verdict: {report['verdict']}")
    return "\n".join(lines)
