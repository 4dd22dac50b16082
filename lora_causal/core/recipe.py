"""The recipe schema: every section, its keys, types, defaults and the rules across keys.

A recipe is strict: unknown keys and wrong types are errors (worded by `lora_causal.core.recipe_file`, which also
reads the YAML and applies `key=value` overrides). This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RECIPE_VERSION = 1
DATA_FORMATS = ("text", "prompt_completion", "alpaca", "messages")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Canonical fields each data format reads; `columns` maps them to a file's own column names.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
}

PositiveInt = Annotated[int, Field(gt=0)]
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds 0..2**32-1, and transformers.set_seed seeds numpy
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    """The base model: a Hub id or a local folder."""

    name_or_path: str = Field(min_length=1)
    revision: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    # `random` builds the weights from the folder's config.json (seeded by train.seed) instead of loading
    # them: for demos, tests and benchmarks. The weights are saved once and loaded through the real path.
    init: Literal["pretrained", "random"] = "pretrained"
    trust_remote_code: bool = False
    # varlen: lora_causal's varlen attention for padding-free batches (Flash Attention inside PyTorch on CUDA).
    attn_implementation: Literal["auto", "eager", "sdpa", "varlen", "flash_attention_2", "flash_attention_3"] = "auto"


class QuantizationSection(_Section):
    """How the frozen base is stored: 4-bit NF4 (QLoRA) by default."""

    mode: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    double_quant: bool = True
    # auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    @model_validator(mode="after")
    def _double_quant_needs_4bit(self) -> QuantizationSection:
        if self.mode in ("int8", "none") and self.double_quant and "double_quant" in self.model_fields_set:
            raise ValueError(f"double_quant applies to 4-bit modes (nf4, fp4) only, not mode '{self.mode}'; remove it")
        return self


class LoraSection(_Section):
    """The adapter attached to the frozen base."""

    r: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: Fraction = 0.0
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []
    # float32 adapters keep small optimizer updates that bfloat16 would round away; they cost little memory.
    # adapter weights: auto = float32 (small optimizer updates survive), or the compute dtype under FSDP/ZeRO-3,
    # whose mixed precision holds one dtype per sharded unit
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _no_lm_head_adapter(self) -> LoraSection:
        if isinstance(self.target_modules, list) and "lm_head" in self.target_modules:
            raise ValueError(
                "target_modules must not include 'lm_head' (TRL scores tokens from lm_head.weight directly, so an "
                "adapter there is never trained); use modules_to_save: [lm_head] to train it fully"
            )
        return self


class DataSource(_Section):
    """One file (JSONL, JSON, CSV, Parquet), a folder of .jsonl or .parquet shards, or one Hub dataset id."""

    path: str = Field(min_length=1)
    format: Literal["text", "prompt_completion", "alpaca", "messages"]
    split: str = "train"  # for Hub datasets
    # Hub datasets only: the configuration (e.g. gsm8k's "main"), which of its files, and which commit or branch.
    config: str | None = None
    data_files: list[str] | None = None
    revision: str | None = None
    columns: dict[str, str] = {}  # canonical field -> the file's column name, e.g. {prompt: question}
    # alpaca only: a template with {instruction} and {input}; defaults to the Stanford Alpaca prompts.
    template: str | None = None

    @model_validator(mode="after")
    def _check_columns_and_template(self) -> DataSource:
        allowed = FORMAT_FIELDS[self.format]
        for key in self.columns:
            if key not in allowed:
                raise ValueError(
                    f"columns: '{key}' is not a field of format '{self.format}' (fields: {', '.join(allowed)})"
                )
        if self.template is not None:
            if self.format != "alpaca":
                raise ValueError("template applies to format 'alpaca' only; remove it")
            if "{instruction}" not in self.template:
                raise ValueError("template must contain '{instruction}'")
        return self


class EvalSection(_Section):
    """Held-out data: a separate source, or a fraction split off the training rows."""

    path: str | None = None
    format: Literal["text", "prompt_completion", "alpaca", "messages"] | None = None  # defaults to train's
    split: str = "train"
    config: str | None = None
    data_files: list[str] | None = None
    revision: str | None = None
    columns: dict[str, str] | None = None
    split_ratio: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None
    # alpaca only: the eval file's prompt template; defaults to data.train.template, so eval loss is measured on
    # the prompts training used.
    template: str | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> EvalSection:
        if (self.path is None) == (self.split_ratio is None):
            raise ValueError("set exactly one of path or split_ratio")
        if self.template is not None:
            if self.path is None:
                raise ValueError("template applies to an eval file (path); rows split off with split_ratio use "
                                 "data.train.template")
            if "{instruction}" not in self.template:
                raise ValueError("template must contain '{instruction}'")
        return self


class DataSection(_Section):
    train: DataSource
    eval: EvalSection | None = None
    mask_prompt: bool = True  # prompt tokens (everything but assistant/completion tokens) get label -100
    max_length: PositiveInt = 2048
    # keep_start cuts the end of long examples, keep_end cuts their start, drop removes them.
    truncation: Literal["keep_start", "keep_end", "drop"] = "keep_start"
    # Tokenizing processes; default: min(CPU cores, 8), and 1 for small files.
    num_proc: PositiveInt | None = None
    # Tokenized data is kept (memory-mapped Arrow) and reused while nothing that changes its tokens changes.
    # false: prepare it afresh this time. cache_dir defaults to $LORA_CAUSAL_CACHE/data or ~/.cache/lora_causal/data.
    cache: bool = True
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _eval_template_is_alpaca(self) -> DataSection:
        if self.eval is not None and self.eval.template is not None and (self.eval.format or self.train.format) != "alpaca":
            raise ValueError("eval.template applies to format 'alpaca' only; remove it")
        return self

    def eval_template(self) -> str | None:
        """The alpaca template of a separate eval file: its own, else the training one (None: the defaults)."""
        if self.eval is None or (self.eval.format or self.train.format) != "alpaca":
            return None
        return self.eval.template if self.eval.template is not None else self.train.template

    @model_validator(mode="after")
    def _mask_prompt_needs_prompt(self) -> DataSection:
        if self.train.format == "text" and self.mask_prompt and "mask_prompt" in self.model_fields_set:
            raise ValueError(
                "mask_prompt: true needs a prompt, but format 'text' has none (every token is a target); "
                "remove mask_prompt or use format prompt_completion"
            )
        return self


class TrainSection(_Section):
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = None  # when set, overrides epochs
    micro_batch_size: PositiveInt = 4
    gradient_accumulation: PositiveInt = 1
    learning_rate: PositiveFloat = 2.0e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Fraction = 0.03
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    max_grad_norm: PositiveFloat = 1.0
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"] = "adamw_torch"
    seed: int = 42  # 0..MAX_SEED
    gradient_checkpointing: bool = True
    # Keep checkpointed activations in CPU memory between forward and backward (long context; needs a GPU).
    activation_offloading: bool = False
    # auto: padding-free rows with varlen attention where that is exact and fast here (CUDA + Flash Attention, or
    # the CPU), padded batches otherwise; false is the stock path (see lora_causal.model.batching)
    padding_free: Literal["auto"] | bool = "auto"
    # Micro-batches of at most this many tokens, packed (best fit decreasing) from the examples of each optimizer
    # step: a step still trains micro_batch_size x gradient_accumulation examples (per process), in as few
    # micro-batches as the budget allows. auto: micro_batch_size x data.max_length (the largest micro-batch the
    # recipe allows anyway) wherever batches are padding-free; false: micro_batch_size examples per micro-batch.
    token_budget: Literal["auto", False] | PositiveInt = "auto"
    pad_to_multiple_of: PositiveInt | None = None
    logging_steps: PositiveInt = 10
    eval_steps: PositiveInt | None = None  # defaults to logging_steps when there is eval data
    # Seconds a process waits in a collective (all-reduce, barrier) before the run fails (several processes only).
    collective_timeout_s: PositiveInt = 1800

    @field_validator("token_budget", mode="before")
    @classmethod
    def _budget_is_tokens_auto_or_false(cls, value: Any) -> Any:
        if value == "auto" or value is False or (type(value) is int and value > 0):
            return value
        raise ValueError(f"{value!r} is not a token budget; write a positive number of tokens, auto (the default: "
                         "micro_batch_size x data.max_length on padding-free rows) or false (no budget)")

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"{seed} is outside 0..{MAX_SEED}, the seeds numpy (and so transformers.set_seed) accepts; "
                             "choose a seed in that range")
        return seed

    @model_validator(mode="after")
    def _padding_modes_agree(self) -> TrainSection:
        if self.padding_free is True and self.pad_to_multiple_of is not None:
            raise ValueError(
                "pad_to_multiple_of pads rows, but padding_free: true has no padding; remove one of them"
            )
        budget = self.explicit_token_budget
        if budget is not None and self.padding_free is False:
            raise ValueError("token_budget packs examples into padding-free rows; set train.padding_free: true or auto, "
                             "or token_budget: false")
        if budget is not None and self.pad_to_multiple_of is not None:
            raise ValueError("token_budget packs padding-free rows, but pad_to_multiple_of pads rows; set "
                             "token_budget: false or remove pad_to_multiple_of")
        return self

    @property
    def explicit_token_budget(self) -> int | None:
        """The budget written as a number (None for auto and false)."""
        return None if isinstance(self.token_budget, str) or self.token_budget is False else self.token_budget


class MergeSection(_Section):
    """Merge the adapter into its base at the end of training (see `lora-causal merge`)."""

    base: Literal["original", "nf4-roundtrip"] = "original"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    dir: str = Field(default="merged", min_length=1)  # inside output.dir unless absolute
    num_prompts: PositiveInt = 8  # examples of the run's data the fidelity report is measured on


class OutputSection(_Section):
    dir: str = Field(min_length=1)
    overwrite: bool = False  # replace a finished run in dir (an unfinished run of the same recipe resumes)
    save_steps: PositiveInt = 100  # checkpoint interval, for resuming
    save_total_limit: PositiveInt = 2
    sample_prompts: list[str] = []  # answered before and after training, to show what the model learned
    sample_max_new_tokens: PositiveInt = 32
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []
    merge: MergeSection | None = None


class ChecksSection(_Section):
    """Label guardrails, run on a sample before every training run and by `lora-causal inspect`."""

    sample_size: PositiveInt = 512  # examples whose labels are built and checked
    max_truncated_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.2
    max_boundary_mismatch_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.1
    skip: list[Literal["eos", "end_of_turn", "boundary", "truncation"]] = []


class Recipe(_Section):
    """A whole recipe. Paths in it are already resolved (absolute) once it is built by `load_recipe`."""

    recipe_version: Literal[1]
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection
    checks: ChecksSection = ChecksSection()

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Recipe:
        if self.model.attn_implementation == "varlen" and (
            self.train.padding_free is False or self.train.pad_to_multiple_of is not None
        ):
            raise ValueError(
                "model.attn_implementation: varlen works on padding-free batches; set train.padding_free: true "
                "(and no pad_to_multiple_of) or choose another attention"
            )
        if self.train.explicit_token_budget is not None and self.train.explicit_token_budget < self.data.max_length:
            raise ValueError(
                f"train.token_budget ({self.train.token_budget}) is smaller than data.max_length "
                f"({self.data.max_length}), so the longest examples would fit in no micro-batch; raise it"
            )
        if self.train.eval_steps is not None and self.data.eval is None:
            raise ValueError("train.eval_steps is set but there is no data.eval to evaluate on; add data.eval or remove it")
        if self.lora.use_dora and self.quantization.mode == "int8":
            raise ValueError("lora.use_dora is not supported with quantization.mode: int8; use nf4 or turn DoRA off")
        return self

    def to_yaml(self) -> str:
        """The resolved recipe, every default filled in, as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """A short hash of the resolved recipe, minus fields that do not change what is trained."""
        data = trained_fields(self.model_dump(mode="json"))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def trained_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe's fields (its `model_dump(mode="json")`, or a run folder's recipe.yaml) that name what is trained:
    the fingerprint's input."""
    data = json.loads(json.dumps(data))  # a copy
    for key in ("overwrite", "sample_prompts", "sample_max_new_tokens", "report_to", "merge"):
        data.get("output", {}).pop(key, None)
    for key in ("num_proc", "cache", "cache_dir"):  # how the data is prepared, not what is trained
        data.get("data", {}).pop(key, None)
    for source in (data.get("data", {}).get("train") or {}, data.get("data", {}).get("eval") or {}):
        for key in ("config", "data_files", "revision"):  # unset Hub keys: fingerprints of older recipes hold
            if source.get(key) is None:
                source.pop(key, None)
    data.get("train", {}).pop("collective_timeout_s", None)
    return data


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`section.key: was X, now Y` for every trained field that differs between two recipes' dumps."""
    old, new = (trained_fields(old), trained_fields(new)) if not prefix else (old, new)
    changes = []
    for key in [*old, *(key for key in new if key not in old)]:
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += changed_fields(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: was {json.dumps(before)}, now {json.dumps(after)}")
    return changes
