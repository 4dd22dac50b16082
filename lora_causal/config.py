"""Recipe schema, YAML loading, `key=value` overrides and one-line validation errors.

A recipe is strict: unknown keys and wrong types are errors that name the dotted path and, for typos,
suggest the closest valid key. Relative paths written in the recipe resolve against the recipe file's
folder; relative paths given as command-line overrides resolve against the current directory.
This module imports no torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_causal.errors import UserError

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

    @model_validator(mode="after")
    def _exactly_one_source(self) -> EvalSection:
        if (self.path is None) == (self.split_ratio is None):
            raise ValueError("set exactly one of path or split_ratio")
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
    # the CPU), padded batches otherwise; false is the stock path (see lora_causal.batching)
    padding_free: Literal["auto"] | bool = "auto"
    # Pack examples (best fit decreasing) into micro-batches of at most this many tokens instead of
    # micro_batch_size examples; needs padding_free. Examples per optimizer step then vary, tokens do not.
    token_budget: PositiveInt | None = None
    pad_to_multiple_of: PositiveInt | None = None
    logging_steps: PositiveInt = 10
    eval_steps: PositiveInt | None = None  # defaults to logging_steps when there is eval data
    # Seconds a process waits in a collective (all-reduce, barrier) before the run fails (several processes only).
    collective_timeout_s: PositiveInt = 1800

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
        if self.token_budget is not None and self.padding_free is False:
            raise ValueError("token_budget packs examples into padding-free rows; set train.padding_free: true or auto")
        if self.token_budget is not None and self.pad_to_multiple_of is not None:
            raise ValueError("token_budget packs padding-free rows, but pad_to_multiple_of pads rows; remove one of them")
        if self.token_budget is not None and "micro_batch_size" in self.model_fields_set:
            raise ValueError("token_budget replaces micro_batch_size (micro-batches hold tokens, not examples); "
                             "remove micro_batch_size")
        return self


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
        if self.train.token_budget is not None and self.train.token_budget < self.data.max_length:
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
        data = self.model_dump(mode="json")
        for key in ("overwrite", "sample_prompts", "sample_max_new_tokens", "report_to", "merge"):
            data["output"].pop(key, None)
        for key in ("num_proc", "cache", "cache_dir"):  # how the data is prepared, not what is trained
            data["data"].pop(key, None)
        for source in (data["data"]["train"], data["data"].get("eval") or {}):
            for key in ("config", "data_files", "revision"):  # unset Hub keys: fingerprints of older recipes hold
                if source.get(key) is None:
                    source.pop(key, None)
        data["train"].pop("collective_timeout_s", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# YAML loading


class _DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice."""


MAX_YAML_DEPTH = 64  # sections and lists nested deeper than this are not a recipe (and would exhaust the stack)


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that reads `2e-4` as a number (YAML 1.1 would keep it a string), refuses aliases, duplicate keys
    and nesting deeper than MAX_YAML_DEPTH.

    Aliases (`*name`) are refused because a few nested ones expand to billions of nodes ("billion laughs").
    A duplicate key would silently replace the first (a second `train:` section drops the first one), so both
    lines are named.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in recipes; write the values out",
                event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep; a recipe is a few sections of values",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _DuplicateKey(f"line {line}: key '{key}' appears twice (first on line {first_line[key]}); "
                                        "keep one (a repeated section or key would replace the first silently)")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))

_MAX_YAML_BYTES = 1 << 20


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML safely (no Python objects); syntax errors become one-line `UserError`s."""
    if len(text) > _MAX_YAML_BYTES:
        raise UserError(f"{where}: larger than 1 MiB; a recipe is a short YAML file")
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to read; a recipe is a few sections of values") from None
    except _DuplicateKey as exc:
        raise UserError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}:{line}: not valid YAML ({problem})") from None


# ---------------------------------------------------------------------------------------------------------
# Paths

# Recipe keys that hold paths, and whether a value that does not exist locally may be a Hub id.
_PATH_KEYS: dict[tuple[str, ...], bool] = {
    ("model", "name_or_path"): True,
    ("model", "tokenizer"): True,
    ("data", "train", "path"): True,
    ("data", "eval", "path"): True,
    ("data", "cache_dir"): False,
    ("output", "dir"): False,
}


def looks_local(value: str) -> bool:
    """True for values written as file-system paths rather than Hub ids."""
    return (
        value.startswith((".", "/", "~"))
        or value.endswith(DATA_FILE_SUFFIXES)
        or "\\" in value
        or value.count("/") > 1
    )


def _resolve_path(value: str, base: Path, may_be_hub_id: bool, what: str) -> str:
    from lora_causal.paths import expand

    candidate = expand(value, what)
    if candidate.is_absolute():
        return str(candidate)
    resolved = (base / candidate).resolve()
    if not may_be_hub_id or looks_local(value) or _exists(resolved):
        return str(resolved)
    return value  # a Hub id such as meta-llama/Llama-3.1-8B


def _exists(path: Path) -> bool:
    """Path.exists, False for paths the file system refuses to look up (a name too long): reported where used."""
    try:
        return path.exists()
    except OSError:
        return False


def _get(tree: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


def _resolve_paths(tree: dict, base: Path, only: set[tuple[str, ...]] | None = None) -> None:
    """Resolve the path keys of `tree` against `base`; with `only`, just those set by these key paths."""
    for keys, may_be_hub_id in _PATH_KEYS.items():
        if only is not None and not any(keys[: len(prefix)] == prefix for prefix in only):
            continue
        value = _get(tree, keys)
        if isinstance(value, str) and value:
            _set(tree, keys, _resolve_path(value, base, may_be_hub_id, ".".join(keys)))


# ---------------------------------------------------------------------------------------------------------
# Overrides


def apply_override(tree: dict, assignment: str) -> tuple[str, ...]:
    """Apply one `dotted.key=value` (value parsed as YAML) to a raw recipe tree; return the key path."""
    key, sep, raw_value = assignment.partition("=")
    keys = tuple(part.strip() for part in key.split("."))
    if not sep or not all(keys):
        raise UserError(f"override '{assignment}': expected key=value with a dotted key, e.g. train.learning_rate=1e-4")
    value = parse_yaml(raw_value, f"override '{assignment}'") if raw_value.strip() else ""
    node = tree
    for depth, part in enumerate(keys[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(keys[: depth + 1])
            raise UserError(f"override '{assignment}': {dotted} is a value, not a section")
        node = child
    node[keys[-1]] = value
    return keys


# ---------------------------------------------------------------------------------------------------------
# Validation errors

# Names other tools (TRL, peft, axolotl) use for our keys: suggested in errors, never accepted silently.
KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "output_dir": "dir",
    "model_name_or_path": "name_or_path",
    "base_model": "name_or_path",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_quant_type": "mode",
}


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the schema section at `loc` (for did-you-mean suggestions)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format_error(error: dict[str, Any]) -> str:
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    # Union members show up as extra loc parts; keep the recipe path only.
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p.startswith("list[") or p.startswith("literal["))))
    path = ".".join(str(part) for part in loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _section_fields(loc[:-1])
        alias = KNOWN_ALIASES.get(str(loc[-1]))
        close = [alias] if alias in valid else difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (valid keys: {', '.join(valid)})" if valid else "")
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        got = error.get("input")
        close = difflib.get_close_matches(str(got), re.findall(r"'([^']*)'", expected), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: {got!r} is not one of {expected}{hint}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        # a section's rule that starts with one of its keys is reported at that key
        first = re.split(r"[ :]", message, maxsplit=1)[0]
        if first in _section_fields(loc) and message[len(first) :].startswith((" ", ":")):
            path = f"{path}.{first}" if loc else first
            message = message[len(first) :].lstrip(": ")
    got = error.get("input")
    shown = "" if kind == "value_error" or isinstance(got, (dict, list)) else f" (got {got!r})"
    if not loc and message.split(".", 1)[0] in Recipe.model_fields:
        return f"{message}{shown}"  # a cross-section rule already names its keys (train.eval_steps ...)
    return f"{path}: {message[0].lower() + message[1:]}{shown}"


def _first_errors(exc: ValidationError) -> str:
    # A union (e.g. target_modules) reports one error per member; keep one line per recipe path.
    lines: dict[str, str] = {}
    for error in exc.errors():
        line = _format_error(error)
        lines.setdefault(line.split(":", 1)[0], line)
    return "; ".join(lines.values())


def _check_numbers(tree: Any, path: str = "") -> None:
    """Reject NaN/inf and absurdly large numbers anywhere in the recipe with their dotted path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            _check_numbers(value, f"{path}.{index}")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise UserError(f"{path}: {tree} is not a finite number")
    elif isinstance(tree, int) and not isinstance(tree, bool) and abs(tree) > 2**62:
        raise UserError(f"{path}: {tree} is too large")


def build_recipe(tree: Any, where: str) -> Recipe:
    """Validate a raw (already path-resolved) recipe tree."""
    if not isinstance(tree, dict):
        raise UserError(f"{where}: a recipe must be a YAML mapping of sections (model, data, output, ...)")
    if "recipe_version" in tree and tree["recipe_version"] != RECIPE_VERSION:
        raise UserError(
            f"{where}: recipe_version {tree['recipe_version']!r} is not supported; this lora_causal reads "
            f"recipe_version: {RECIPE_VERSION}"
        )
    _check_numbers(tree)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{where}: {_first_errors(exc)}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), cwd: Path | None = None) -> Recipe:
    """Read, override, resolve and validate a recipe file."""
    from lora_causal.paths import expand

    recipe_path = expand(path, "recipe")
    try:
        is_file = recipe_path.is_file()
    except OSError as exc:
        raise UserError(f"recipe file cannot be looked up: {recipe_path} ({exc.strerror})") from None
    if not is_file:
        raise UserError(f"recipe file not found: {recipe_path}")
    try:
        if recipe_path.stat().st_size > _MAX_YAML_BYTES:
            raise UserError(f"{recipe_path}: larger than 1 MiB; a recipe is a short YAML file")
        text = recipe_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{recipe_path}: cannot read the recipe ({exc.__class__.__name__}: {exc})") from None
    tree = parse_yaml(text, str(recipe_path))
    if not isinstance(tree, dict):
        raise UserError(f"{recipe_path}: a recipe must be a YAML mapping of sections (model, data, output, ...)")
    _resolve_paths(tree, recipe_path.resolve().parent)
    overridden: set[tuple[str, ...]] = set()
    for assignment in overrides:
        overridden.add(apply_override(tree, assignment))
    _resolve_paths(tree, (cwd or Path.cwd()).resolve(), only=overridden)
    return build_recipe(tree, str(recipe_path))
