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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.config import ModelSection, QuantizationSection, Recipe, load_recipe
from lora_causal.errors import UserError, first_line
from lora_causal.rundir import MERGE_REPORT as REPORT
from lora_causal.rundir import MERGE_REPORT_FORMAT

if TYPE_CHECKING:
    import torch

BASES = ("original", "nf4-roundtrip")
DTYPES = ("bfloat16", "float16", "float32")
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
    """Read a run directory (marker, manifest, recipe and adapter/) or a bare adapter folder (adapter_config.json)."""
    from lora_causal.paths import expand
    from lora_causal.readers import read_json_object
    from lora_causal.rundir import MANIFEST, RUN_MARKER, is_run_dir

    folder = expand(path, "adapter")
    if not folder.exists():
        raise UserError(f"adapter not found: '{folder}' does not exist; give a run directory or an adapter folder")
    if is_run_dir(folder):
        manifest = read_json_object(folder / MANIFEST, "the run's manifest is damaged; train the run again")
        if manifest.get("status") != "completed" or not (folder / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"'{folder}' holds no finished adapter (run status: {manifest.get('status')}); train it first")
        recipe = load_recipe(folder / "recipe.yaml")
        model = recipe.model
        if base_model is not None:
            model = model.model_copy(update={"name_or_path": base_model, "init": "pretrained", "revision": revision})
        return AdapterSource(folder / "adapter", model, recipe.quantization, recipe.train.seed, recipe)
    if not (folder / "adapter_config.json").is_file():
        inside = (f"; its adapter is in '{folder / 'adapter'}'" if (folder / "adapter" / "adapter_config.json").is_file()
                  else "")
        raise UserError(f"'{folder}' is neither a lora_causal run directory (no {RUN_MARKER}) nor an adapter folder (no "
                        f"adapter_config.json){inside}")
    config = read_json_object(folder / "adapter_config.json", "save the adapter again with peft's save_pretrained")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"'{folder}/adapter_config.json' describes a {config.get('peft_type')} adapter; lora_causal "
                        "merges LoRA adapters only")
    recorded = config.get("base_model_name_or_path")
    if base_model is None and recorded is not None and not isinstance(recorded, str):
        raise UserError(f"'{folder}/adapter_config.json': base_model_name_or_path must be text; pass --base-model")
    name = base_model or (_recorded_base(folder, recorded) if recorded else None)
    if not name:
        raise UserError(f"'{folder}/adapter_config.json' names no base model; pass --base-model")
    base_folder = Path(name)
    if base_folder.is_dir() and (base_folder / "config.json").is_file() and not any(
        next(base_folder.glob(pattern), None) is not None for pattern in ("*.safetensors", "*.bin")
    ):
        raise UserError(f"the base of '{folder}' is '{base_folder}', which holds a config but no weights (a "
                        "model.init: random base, drawn from its config with the run's seed); merge the run directory "
                        "instead, or pass the weights with --base-model")
    recorded_revision = config.get("revision") if isinstance(config.get("revision"), str) else None
    model = ModelSection(name_or_path=name, revision=revision or recorded_revision)
    return AdapterSource(folder, model, QuantizationSection(), 0, None)


def _recorded_base(adapter: Path, recorded: str) -> str:
    """The base named by an adapter: a path relative to the adapter folder (how lora_causal records a local
    base, see lora_causal.saving) when that exists, else the name as written (a Hub id or an absolute path)."""
    relative = adapter / recorded
    if not Path(recorded).is_absolute() and relative.exists():
        return str(relative.resolve())
    return recorded


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


def _adapter_ranks(source: AdapterSource) -> tuple[int, dict[str, int]]:
    """The rank (r) and per-module rank_pattern an adapter's own config declares."""
    from lora_causal.readers import read_json_object

    config = read_json_object(source.adapter / "adapter_config.json", "save the adapter again with peft's save_pretrained")
    rank, pattern = config.get("r", 8), config.get("rank_pattern") or {}
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(pattern, dict):
        raise UserError(f"'{source.adapter}/adapter_config.json': r must be a positive integer and rank_pattern an object; "
                        "save the adapter again with peft's save_pretrained")
    return rank, {str(key): value for key, value in pattern.items() if isinstance(value, int)}


def _declared_rank(name: str, rank: int, pattern: dict[str, int]) -> int:
    """peft's rule: a rank_pattern key matching the module's name (or its last dotted parts) wins over r."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return rank


def _features(layer: Any, side: str) -> int | None:
    """A layer's input or output width: nn.Linear's in/out_features, or GPT-2 Conv1D's nx/nf."""
    if layer is None:
        return None
    value = getattr(layer, f"{side}_features", None)
    return value if value is not None else getattr(layer, "nx" if side == "in" else "nf", None)


def check_adapter_fits(source: AdapterSource) -> None:
    """Before loading any weights: the adapter's tensors agree with its own config (its rank), and their shapes
    fit a weightless skeleton of the base."""
    from safetensors import safe_open

    from lora_causal.preflight import build_skeleton, load_model_config

    weights = source.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"'{source.adapter}' has no adapter_model.safetensors; only safetensors adapters are read")
    rank, pattern = _adapter_ranks(source)
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            shapes = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"'{weights}' is not a readable safetensors file ({first_line(exc)}); save the adapter "
                        "again") from None
    lora = {key: shape for key, shape in shapes.items() if ".lora_A." in key or ".lora_B." in key}
    for key, shape in lora.items():
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        found = shape[0] if ".lora_A." in key else (shape[1] if len(shape) > 1 else None)
        declared = _declared_rank(name, rank, pattern)
        if len(shape) < 2 or found != declared:
            raise UserError(
                f"the adapter in '{source.adapter}' does not match its own adapter_config.json: layer {name} has "
                f"rank r={found} in adapter_model.safetensors, and adapter_config.json says r={declared}; put the "
                "adapter_config.json saved with these weights back (or set r to match)"
            )
    model = source.model
    config = load_model_config(model.name_or_path, model.revision if model.init == "pretrained" else None,
                               model.trust_remote_code, "base model")
    modules = dict(build_skeleton(config, model.trust_remote_code, model.name_or_path).named_modules())
    for key, shape in lora.items():
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        layer = modules.get(name)
        expected = _features(layer, "in" if ".lora_A." in key else "out")
        found = shape[1] if ".lora_A." in key else shape[0]
        if layer is None or expected != found:
            has = f"base has {expected}" if layer is not None else "the base has no such layer"
            raise UserError(
                f"the adapter in '{source.adapter}' does not fit base model '{model.name_or_path}' "
                f"(layer {name}: adapter expects {found} features, {has}); pass the base it was "
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
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"cannot attach the adapter in '{adapter}' to base model '{model.name_or_path}' ({first_line(exc)})"
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


def check_output(out: Path, force: bool, what: str = "--out") -> None:
    """`out` can be created; a non-empty one is replaced only with `force`, and only when it holds an earlier merge
    (a folder with lora_causal's merge report): never somebody else's folder."""
    from lora_causal.paths import check_can_create
    from lora_causal.rundir import is_merged_dir

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
    from lora_causal.config import looks_local

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

    from lora_causal.model import load_base_model
    from lora_causal.rundir import write_dir_atomic, write_json_atomic

    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, not '{base}'")
    if dtype_name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype_name}'")
    from lora_causal.paths import expand

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
