"""Recipe files: safe YAML loading, `key=value` overrides, relative paths, and one-line validation errors.

A recipe is strict: unknown keys and wrong types are errors that name the dotted path and, for typos,
suggest the closest valid key. Relative paths written in the recipe resolve against the recipe file's
folder; relative paths given as command-line overrides resolve against the current directory.
This module imports no torch.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import DATA_FILE_SUFFIXES, RECIPE_VERSION, Recipe

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
    from lora_causal.core.paths import expand

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
    from lora_causal.core.paths import expand

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
