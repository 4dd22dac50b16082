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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.config import ModelSection, QuantizationSection, Recipe, load_recipe
from lora_causal.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

BASES = ("original", "nf4-roundtrip")
DTYPES = ("bfloat16", "float16", "float32")
REPORT = "merge_report.json"
FAITHFUL_TOP1 = 0.99
FAITHFUL_KL = 1e-3


@dataclass
class AdapterSource:
    """An adapter folder and what it was trained on."""

    adapter: Path
    model: ModelSection  # the base model; init: random bases are rebuilt from their config and seed
    quantization: QuantizationSection
    seed: int
    recipe: Recipe | None  # present for run directories


def locate_adapter(path: str, base_model: str | None = None, revision: str | None = None) -> AdapterSource:
    """Read a run directory (manifest + adapter/) or a bare adapter folder (adapter_config.json)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"adapter not found: '{folder}' does not exist; give a run directory or an adapter folder")
    if (folder / "recipe.yaml").is_file() and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("status") != "completed" or not (folder / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"'{folder}' holds no finished adapter (run status: {manifest.get('status')}); train it first")
        recipe = load_recipe(folder / "recipe.yaml")
        model = recipe.model
        if base_model is not None:
            model = model.model_copy(update={"name_or_path": base_model, "init": "pretrained", "revision": revision})
        return AdapterSource(folder / "adapter", model, recipe.quantization, recipe.train.seed, recipe)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"'{folder}' is neither a lora_causal run directory nor an adapter folder (no adapter_config.json)")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    name = base_model or config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"'{folder}/adapter_config.json' names no base model; pass --base-model")
    model = ModelSection(name_or_path=name, revision=revision or config.get("revision"))
    return AdapterSource(folder, model, QuantizationSection(), 0, None)


def adapter_tokenizer(source: AdapterSource) -> Any:
    """The tokenizer saved with the adapter (lora_causal runs save it there), else the base model's."""
    from transformers import AutoTokenizer

    folder = source.adapter if (source.adapter / "tokenizer_config.json").is_file() else source.model.tokenizer or source.model.name_or_path
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=source.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{folder}': {first_line(exc)}") from None


def _weights_folder(source: AdapterSource) -> str:
    if source.model.init == "random":
        from lora_causal.synthetic import materialize_random_model

        return str(materialize_random_model(Path(source.model.name_or_path), seed=source.seed))
    return source.model.name_or_path


def check_adapter_fits(source: AdapterSource) -> None:
    """Compare the adapter's LoRA shapes with a weightless skeleton of the base, before loading any weights."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = source.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"'{source.adapter}' has no adapter_model.safetensors; only safetensors adapters are read")
    try:
        config = AutoConfig.from_pretrained(
            source.model.name_or_path,
            revision=source.model.revision if source.model.init == "pretrained" else None,
            trust_remote_code=source.model.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load base model '{source.model.name_or_path}': {first_line(exc)}") from None
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=source.model.trust_remote_code)
    modules = dict(skeleton.named_modules())
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            layer = modules.get(name)
            shape = tensors.get_slice(key).get_shape()
            expected = getattr(layer, "in_features", None) if ".lora_A." in key else getattr(layer, "out_features", None)
            found = shape[1] if ".lora_A." in key else shape[0]
            if layer is None or expected != found:
                raise UserError(
                    f"the adapter in '{source.adapter}' does not fit base model '{source.model.name_or_path}' "
                    f"(layer {name}: adapter expects {found} features, base has {expected}); pass the base it was "
                    "trained on with --base-model"
                )


def load_dense_base(source: AdapterSource, dtype: torch.dtype) -> Any:
    """The unquantized base model in `dtype`, on the CPU (merging needs no GPU)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            _weights_folder(source),
            dtype=dtype,
            revision=source.model.revision if source.model.init == "pretrained" else None,
            trust_remote_code=source.model.trust_remote_code,
            device_map={"": "cpu"},
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load base model '{source.model.name_or_path}': {first_line(exc)}") from None


def with_adapter(model: Any, adapter: Path) -> Any:
    """Attach a saved adapter for inference; a mismatch with the base becomes a one-line error."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"the adapter in '{adapter}' does not fit base model '{model.name_or_path}' ({first_line(exc)}); "
            "pass the base it was trained on with --base-model"
        ) from None
    peft_model.eval()
    return peft_model


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


def sample_prompts(source: AdapterSource, tokenizer: Any, user_prompts: list[str], count: int, max_tokens: int) -> list[list[int]]:
    """Token ids to compare on: the user's prompts, else `count` examples drawn (seeded) from the run's data (from
    its prepared cache entry, or by tokenizing only the drawn rows)."""
    if user_prompts:
        ids = [list(tokenizer(text)["input_ids"])[:max_tokens] for text in user_prompts]
        return [sequence for sequence in ids if len(sequence) >= 2] or _no_prompts()
    if source.recipe is None:
        return _no_prompts()
    from lora_causal.prepare import sample_examples

    try:
        chosen = sample_examples(source.recipe.data, tokenizer, source.recipe.train.seed, count)
    except UserError as exc:
        raise UserError(f"cannot read the run's data for sample prompts ({exc}); pass --prompt TEXT instead") from None
    return [example["input_ids"][:max_tokens] for example in chosen] or _no_prompts()


def _no_prompts() -> list[list[int]]:
    raise UserError("no prompts to measure the merge on: pass --prompt TEXT (one or more), or merge a run directory")


def logits_for(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 CPU logits of each prompt (no padding, one at a time)."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
            outputs.append(logits.float().cpu())
    return outputs


def compare(merged: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """max |delta logit|, mean KL(reference || merged) per position, top-1 agreement."""
    import torch

    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for m, r in zip(merged, reference):
        max_diff = max(max_diff, float((m - r).abs().max()))
        log_m, log_r = torch.log_softmax(m, dim=-1), torch.log_softmax(r, dim=-1)
        kl_sum += float((log_r.exp() * (log_r - log_m)).sum(dim=-1).clamp(min=0).sum())
        agree += int((m.argmax(dim=-1) == r.argmax(dim=-1)).sum())
        positions += m.shape[0]
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl_sum / positions, "top1_agreement": agree / positions}


def perplexity(logits: list[torch.Tensor], prompts: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all positions of all prompts."""
    import torch

    total, count = 0.0, 0
    for output, ids in zip(logits, prompts):
        targets = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(output[:-1], targets, reduction="sum"))
        count += len(ids) - 1
    return math.exp(total / max(count, 1))


def verdict(base: str, vs_trained: dict[str, float], vs_unquantized: dict[str, float]) -> str:
    faithful = vs_trained["top1_agreement"] >= FAITHFUL_TOP1 and vs_trained["mean_kl"] <= FAITHFUL_KL
    shift = (
        f"top-1 agreement {vs_trained['top1_agreement']:.1%}, mean KL {vs_trained['mean_kl']:.2e}, "
        f"max |delta logit| {vs_trained['max_abs_logit_diff']:.3g} vs the model as trained (4-bit base + adapter)"
    )
    if base == "nf4-roundtrip":
        return ("faithful: " if faithful else "NOT faithful: ") + shift
    return (
        ("small train/serve shift: " if faithful else "large train/serve shift (consider --base nf4-roundtrip): ")
        + shift
        + f"; top-1 agreement {vs_unquantized['top1_agreement']:.1%} vs the adapter on the unquantized base"
    )


# ---------------------------------------------------------------------------------------------------------
# The whole merge


def check_output(out: Path, force: bool) -> None:
    from lora_causal.rundir import check_can_create

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"output folder '{out}' exists and is not empty; choose another --out or pass --force")
    check_can_create(out, "--out")


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

    from lora_causal.model import load_base_model
    from lora_causal.rundir import write_dir_atomic, write_json_atomic

    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, not '{base}'")
    if dtype_name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype_name}'")
    target = Path(out).expanduser().resolve()
    check_output(target, force)
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
        "base": base,
        "dtype": dtype_name,
        "base_model": source.model.model_dump(mode="json"),
        "adapter": str(source.adapter),
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
        "out": str(target),
        "verdict": verdict(base, vs_trained, vs_unquantized),
    }

    def write(staging: Path) -> None:
        merged.config.use_cache = True
        merged.save_pretrained(staging, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / REPORT, report)

    write_dir_atomic(target, write)
    return report


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
