"""Hostile input to every subcommand, refused the way README promises.

Each case runs `lora_causal.cli.main` in this process and checks: exit status 2, exactly one stderr line starting
`error: ` that matches what the case is about (and, where it matters, does not say something misleading), no
traceback, and nothing created, changed or removed under the test's folder (a snapshot of the whole tree before
and after). Every model a case can reach is *weightless*: its config and tokenizer are real, its weights file is
garbage, so a case that got as far as loading weights would fail with a different message. That is how
"refused before any weights load" is checked without looking inside any library.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import QA_ROWS, assert_one_line_error, base_recipe, call_cli, write_jsonl, write_recipe

MARKER = {"format": "lora_causal-run", "version": 1}


@dataclass
class Case:
    args: list[str]
    pattern: str  # must match the one error line
    absent: tuple[str, ...] = ()  # must not appear in it (a misleading fix)


@pytest.fixture(scope="session")
def weightless_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's config and tokenizer, with a weights file no loader can read."""
    folder = tmp_path_factory.mktemp("weightless")
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    (folder / "model.safetensors").write_bytes(b"these are not weights")
    return folder


@pytest.fixture(scope="session")
def adapter_template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA adapter (r=8 on q_proj and v_proj) of the tiny Llama, saved with its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@dataclass
class Ctx:
    """Builds a case's inputs under `tmp` (a fresh folder per case)."""

    tmp: Path
    model: Path
    adapter_template: Path
    made: list[Path] = field(default_factory=list)

    def file(self, name: str, content: str | bytes = "x") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def folder(self, name: str, files: dict[str, str] | None = None) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for file_name, content in (files or {}).items():
            (path / file_name).write_text(content)
        return path

    def tree(self, rows: list[Any] | None = None, fmt: str = "prompt_completion", **sections: Any) -> dict[str, Any]:
        data = write_jsonl(self.tmp / "data.jsonl", QA_ROWS if rows is None else rows)
        tree = base_recipe(self.model, data, self.tmp / "run", **sections)
        tree["data"]["train"]["format"] = fmt
        return tree

    def recipe(self, text: str | None = None, rows: list[Any] | None = None, fmt: str = "prompt_completion",
               **sections: Any) -> str:
        tree = text if text is not None else self.tree(rows, fmt, **sections)
        return str(write_recipe(self.tmp / "recipe.yaml", tree))

    def model_folder(self, name: str, config: Any, raw: str | None = None, extra: dict[str, str] | None = None) -> Path:
        """A model folder: the weightless tokenizer and weights, with this config.json."""
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        (folder / "config.json").write_text(raw if raw is not None else json.dumps(config))
        for file_name, content in (extra or {}).items():
            (folder / file_name).write_text(content)
        return folder

    def adapter(self, name: str = "adapter", config: dict[str, Any] | None = None, raw_config: str | None = None,
                weights: bytes | None = None) -> Path:
        folder = self.tmp / name
        shutil.copytree(self.adapter_template, folder)
        settings = json.loads((folder / "adapter_config.json").read_text())
        settings["base_model_name_or_path"] = str(self.model)
        settings.update(config or {})
        (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(settings))
        if weights is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights)
        return folder

    def run(self, name: str = "done", manifest: Any = None, raw_manifest: str | None = None, marker: Any = MARKER,
            **adapter: Any) -> Path:
        """A finished run folder as lora_causal writes it (marker, recipe, manifest, adapter/)."""
        folder = self.folder(name)
        if marker is not None:
            (folder / ".lora_causal_run.json").write_text(json.dumps(marker))
        write_recipe(folder / "recipe.yaml", self.tree())
        manifest = {"status": "completed", "recipe_fingerprint": "x"} if manifest is None else manifest
        (folder / "manifest.json").write_text(raw_manifest if raw_manifest is not None else json.dumps(manifest))
        self.adapter(f"{name}/adapter", **adapter)
        return folder

    def merged(self, name: str = "merged", report: Any = None, raw_report: str | None = None, config: Any = None) -> Path:
        """A merged model folder: a plain model (weightless) with a merge report."""
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        report = {"format": "lora_causal-merge-report", "prompt_format": "prompt_completion"} if report is None else report
        (folder / "merge_report.json").write_text(raw_report if raw_report is not None else json.dumps(report))
        return folder


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _yaml_nested(depth: int) -> str:
    return "recipe_version: 1\nx: " + _nested(depth) + "\n"


LONG = "n" * 300
T5 = {"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2, "d_kv": 8, "d_ff": 32, "vocab_size": 300}
MAMBA = {"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 1, "vocab_size": 300, "state_size": 4}
REMOTE = {"model_type": "mycustom", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                                 "AutoModelForCausalLM": "modeling_my.MyModel"}}
REMOTE_FILES = {"configuration_my.py": "from transformers import PretrainedConfig\n\n\nclass MyConfig(PretrainedConfig):\n"
                                       "    model_type = 'mycustom'\n"}
NO_USER = "~no_such_user_lora_causal"
LATIN_CSV = "prompt,completion\nd\xe9j\xe0,vu\n".encode("latin-1")
BOM_CSV = "\ufeffprompt,answer\nQ: hi?,A: hello.\n".encode("utf-8")
BIG_FIELD_CSV = ("prompt,completion\n\"" + "Q " * 100_000 + "\",A\nq,a,extra\n").encode("utf-8")
CHAT_ROW = {"messages": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello!"}]}
USER_ONLY = {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there!"}]}
DEEP_OBJECT = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _tiny_config(ctx: Ctx) -> dict[str, Any]:
    return json.loads((ctx.model / "config.json").read_text())


def _adapter_of_a_config_only_base(ctx: Ctx) -> Path:
    """An adapter naming its base relative to itself (as lora_causal saves them), a folder with a config only (the
    demo's random base)."""
    ctx.folder("cfg", {"config.json": json.dumps(_tiny_config(ctx))})
    return ctx.adapter(config={"base_model_name_or_path": "../cfg"})


def _run_with_metrics(ctx: Ctx, metrics: str) -> Path:
    run = ctx.run()
    (run / "metrics.jsonl").write_text(metrics)
    return run


def _duplicate_section(ctx: Ctx) -> str:
    text = yaml.safe_dump(ctx.tree(), sort_keys=False)
    return text + "train:\n  max_steps: 100\n"


def _duplicate_inner_key(ctx: Ctx) -> str:
    text = yaml.safe_dump(ctx.tree(), sort_keys=False)
    return text.replace("lora:\n  r: 8\n", "lora:\n  r: 8\n  r: 16\n")


def _foreign_with_manifest(ctx: Ctx) -> Path:
    return ctx.folder("run", {"index.html": "<h1>my web app</h1>", "manifest.json": '{"name": "app", "status": "completed"}'})


def _run_for_recipe(ctx: Ctx, manifest: str | None, marker: Any = MARKER) -> str:
    """A recipe whose output.dir already holds a run folder with this manifest text (None: no manifest)."""
    recipe = ctx.recipe()
    folder = ctx.folder("run", {"notes.txt": "keep me"})
    if marker is not None:
        (folder / ".lora_causal_run.json").write_text(json.dumps(marker))
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    return recipe


CASES: dict[str, Callable[[Ctx], Case]] = {
    # ---- recipes: YAML -------------------------------------------------------------------------------------
    "yaml: duplicate section": lambda c: Case(["validate", c.recipe(_duplicate_section(c))],
                                              r"line \d+: key 'train' appears twice \(first on line \d+\)"),
    "yaml: duplicate section, train": lambda c: Case(["train", c.recipe(_duplicate_section(c))],
                                                     r"key 'train' appears twice"),
    "yaml: duplicate key in a section": lambda c: Case(["validate", c.recipe(_duplicate_inner_key(c))],
                                                       r"line \d+: key 'r' appears twice \(first on line \d+\)"),
    "yaml: duplicate key in an override": lambda c: Case(["validate", c.recipe(), "lora={r: 4, r: 8}"],
                                                         r"override 'lora=\{r: 4, r: 8\}': line 1: key 'r' appears twice"),
    "yaml: duplicate key, inspect": lambda c: Case(["inspect", c.recipe(_duplicate_section(c))], r"key 'train' appears twice"),
    "yaml: nested 100000 deep": lambda c: Case(["validate", c.recipe(_yaml_nested(100_000))], r"nested more than 64 levels deep"),
    "yaml: nested 65 deep": lambda c: Case(["validate", c.recipe(_yaml_nested(65))], r"nested more than 64 levels deep"),
    "validate --serving: unknown engine": lambda c: Case(["validate", c.recipe(), "--serving", "bogus"], r"--engine: unknown engine .bogus."),
    "yaml: nested override": lambda c: Case(["validate", c.recipe(), f"lora.r={_nested(5000)}"], r"nested more than 64 levels deep"),
    "yaml: nested mapping override": lambda c: Case(["train", c.recipe(), "x=" + "{a: " * 200 + "1" + "}" * 200],
                                                    r"nested more than 64 levels deep"),
    "yaml: file over 1 MiB": lambda c: Case(["validate", c.recipe("# " + "x" * (1 << 20) + "\n")], r"larger than 1 MiB"),
    "yaml: alias in an override": lambda c: Case(["validate", c.recipe(), "lora={r: &a 4, alpha: *a}"], r"anchors and aliases"),
    # ---- recipes: values only the libraries would refuse later --------------------------------------------
    "seed -1, validate": lambda c: Case(["validate", c.recipe(), "train.seed=-1"], r"train\.seed: -1 is outside 0\.\.4294967295"),
    "seed -1, train": lambda c: Case(["train", c.recipe(), "train.seed=-1"], r"train\.seed: -1 is outside 0\.\.4294967295"),
    "seed 2**32": lambda c: Case(["train", c.recipe(), "train.seed=4294967296"], r"train\.seed: 4294967296 is outside"),
    "seed in the recipe file": lambda c: Case(["inspect", c.recipe(train={"seed": -5})], r"train\.seed: -5 is outside"),
    # ---- recipes: paths -----------------------------------------------------------------------------------
    "recipe under an unknown ~user": lambda c: Case(["validate", f"{NO_USER}/r.yaml"], r"recipe: .*there is no user 'no_such_user_lora_causal'"),
    "recipe name too long": lambda c: Case(["validate", str(c.tmp / f"{LONG}.yaml")], r"recipe file cannot be looked up: .*name too long"),
    "data path under an unknown ~user": lambda c: Case(["train", c.recipe(), f"data.train.path={NO_USER}/d.jsonl"],
                                                       r"data\.train\.path: .*there is no user"),
    "model path under an unknown ~user": lambda c: Case(["validate", c.recipe(), f"model.name_or_path={NO_USER}/m"],
                                                        r"model\.name_or_path: .*there is no user"),
    "output.dir under an unknown ~user": lambda c: Case(["train", c.recipe(), f"output.dir={NO_USER}/run"],
                                                        r"output\.dir: .*there is no user"),
    "output.dir with a NUL": lambda c: Case(["train", c.recipe(), 'output.dir="run\\0x"'], r"output\.dir: the path contains a NUL character"),
    "output.dir name too long, train": lambda c: Case(["train", c.recipe(), f"output.dir={c.tmp / LONG}"],
                                                      r"output\.dir: the name 'n{20}\.\.\.n{12}' is 300 bytes long, and this file system allows 255"),
    "output.dir name too long, validate": lambda c: Case(["validate", c.recipe(), f"output.dir={c.tmp / LONG / 'run'}"],
                                                         r"output\.dir: the name .* is 300 bytes long"),
    "output.dir path too long": lambda c: Case(["train", c.recipe(), "output.dir=" + str(c.tmp / "/".join(["p" * 200] * 25))],
                                               r"output\.dir: the path is \d+ bytes long, and this file system allows"),
    "output.dir under a file, validate": lambda c: Case(["validate", c.recipe(), f"output.dir={c.file('afile')}/run"],
                                                        r"output\.dir: '.*afile' is a file, so .* cannot be created"),
    "output.dir is a file": lambda c: Case(["train", c.recipe(), f"output.dir={c.file('afile')}"], r"output\.dir: '.*afile' is a file; choose a folder"),
    # ---- run folders: ownership ---------------------------------------------------------------------------
    "stray manifest.json is not a run": lambda c: (_foreign_with_manifest(c), Case(
        ["train", c.recipe()], r"output\.dir: '.*run' is not empty and holds no lora_causal run \(no \.lora_causal_run\.json\)",
        absent=("overwrite",)))[1],
    "stray manifest.json is not a run, --overwrite": lambda c: (_foreign_with_manifest(c), Case(
        ["train", c.recipe(), "--overwrite"], r"holds no lora_causal run", absent=("overwrite",)))[1],
    "stray manifest.json, output.overwrite": lambda c: (_foreign_with_manifest(c), Case(
        ["train", c.recipe(), "output.overwrite=true"], r"holds no lora_causal run", absent=("overwrite",)))[1],
    "stray manifest.json, --resume": lambda c: (_foreign_with_manifest(c), Case(
        ["train", c.recipe(), "--resume"], r"holds no lora_causal run"))[1],
    "marker of another format": lambda c: Case(["train", _run_for_recipe(c, '{"status": "completed"}', {"format": "other", "version": 1}), "--overwrite"],
                                               r"holds no lora_causal run", absent=("overwrite",)),
    "marker that is not JSON": lambda c: Case(["train", _run_for_recipe(c, '{"status": "completed"}', "{{{"), "--overwrite"],
                                              r"holds no lora_causal run"),
    "run with a corrupt manifest": lambda c: Case(["train", _run_for_recipe(c, '{"status": "comp')],
                                                  r"holds a lora_causal run whose manifest\.json is missing or damaged.*output\.overwrite=true"),
    "run with a corrupt manifest, --resume": lambda c: Case(["train", _run_for_recipe(c, "not json"), "--resume"],
                                                            r"manifest\.json is missing or damaged"),
    "run with a manifest that is a list": lambda c: Case(["train", _run_for_recipe(c, "[1, 2]")], r"manifest\.json is missing or damaged"),
    "run with a deeply nested manifest": lambda c: Case(["train", _run_for_recipe(c, _nested(100_000))], r"manifest\.json is missing or damaged"),
    "run without a manifest": lambda c: Case(["train", _run_for_recipe(c, None)], r"manifest\.json is missing or damaged"),
    "finished run": lambda c: Case(["train", _run_for_recipe(c, '{"status": "completed"}')], r"already holds a finished run"),
    "unfinished run of another recipe": lambda c: Case(["train", _run_for_recipe(c, '{"status": "running", "recipe_fingerprint": "other"}')],
                                                       r"holds an unfinished run of a different recipe"),
    "resume with no checkpoint": lambda c: Case(["train", c.recipe(), "--resume"], r"--resume: .* holds no unfinished run"),
    # ---- trackers (none is installed in the test environment: the test below checks that) --------------------
    "tracker not installed, validate": lambda c: Case(["validate", c.recipe(), "output.report_to=[mlflow]"],
                                                      r"output\.report_to: mlflow is not installed; install it with `pip install mlflow`"),
    "tracker not installed, train": lambda c: Case(["train", c.recipe(), "output.report_to=[wandb]"], r"output\.report_to: wandb is not installed"),
    "second tracker not installed": lambda c: Case(["train", c.recipe(), "output.report_to=[trackio]"], r"trackio is not installed"),
    # ---- the model, from its config -----------------------------------------------------------------------
    "config.json is a list": lambda c: Case(["validate", c.recipe(), f"model.name_or_path={c.model_folder('m', [1, 2])}"],
                                            r"config\.json' must hold a JSON object \(\{\.\.\.\}\), and it holds a list"),
    "config.json is a list, train": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('m', [1, 2])}"],
                                                   r"config\.json' must hold a JSON object"),
    "config.json is a string": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('m', 'llama')}"],
                                              r"holds a str"),
    "config.json is not JSON": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('m', None, raw='{model_type: llama')}"],
                                              r"config\.json' is not valid JSON \(line 1: "),
    "config.json nested 100000 deep": lambda c: Case(["validate", c.recipe(), f"model.name_or_path={c.model_folder('m', None, raw=DEEP_OBJECT)}"],
                                                     r"config\.json' is nested too deeply to read"),
    "config.json not UTF-8": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('m', None, raw=chr(0xFF) * 3)}"],
                                            r"config\.json' is not valid JSON|config\.json' is not UTF-8"),
    "config.json without model_type": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('m', {'hidden_size': 8})}"],
                                                     r"config\.json' names no model_type"),
    "model folder without config.json": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.folder('empty-model', {'README.md': 'hi'})}"],
                                                       r"model\.name_or_path: '.*empty-model' has no config\.json"),
    "not a causal LM (t5)": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('t5', T5)}"],
                                           r"^error: model\.name_or_path: '.*t5' is a t5 model \(T5Config\), not a causal language model; .{0,120}$"),
    "token budget on a padded-only family, inspect": lambda c: Case(
        ["inspect", c.recipe(), f"model.name_or_path={c.model_folder('mamba', MAMBA)}", "train.token_budget=1024",
         "quantization.mode=none", "lora.target_modules=[in_proj]"],
        r"^error: train\.token_budget: packed rows would train mamba wrongly"),
    "not a causal LM, validate": lambda c: Case(["validate", c.recipe(), f"model.name_or_path={c.model_folder('t5', T5)}"],
                                                r"is a t5 model \(T5Config\), not a causal language model"),
    "remote code without trust": lambda c: Case(["train", c.recipe(), f"model.name_or_path={c.model_folder('remote', REMOTE, extra=REMOTE_FILES)}"],
                                                r"ships its own Python code, which runs only when the recipe sets model\.trust_remote_code: true"),
    "remote code without trust, validate": lambda c: Case(["validate", c.recipe(), f"model.name_or_path={c.model_folder('remote', REMOTE, extra=REMOTE_FILES)}"],
                                                          r"model\.trust_remote_code: true", absent=("trust_remote_code=True",)),
    "max_length beyond the model": lambda c: Case(["train", c.recipe(), "data.max_length=129"], r"data\.max_length: 129 exceeds the model's maximum positions \(128\)"),
    # ---- LoRA targets, from a weightless skeleton ---------------------------------------------------------
    "target module typo among two": lambda c: Case(["train", c.recipe(), "lora.target_modules=[q_proj, v_prj]"],
                                                   r"lora\.target_modules: 'v_prj' matches no module of .* \(found: q_proj\); its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    "target modules that match nothing": lambda c: Case(["train", c.recipe(), "lora.target_modules=[query, value]"],
                                                        r"'query', 'value' matches no module"),
    "target modules that match nothing, validate": lambda c: Case(["validate", c.recipe(), "lora.target_modules=[qkv_proj]"],
                                                                  r"'qkv_proj' matches no module"),
    "target module that is a block": lambda c: Case(["train", c.recipe(), "lora.target_modules=[mlp]"],
                                                    r"lora\.target_modules: 'mlp' names LlamaMLP modules, which LoRA cannot wrap"),
    "target module that is a norm": lambda c: Case(["train", c.recipe(), "lora.target_modules=[input_layernorm, q_proj]"],
                                                   r"'input_layernorm' names LlamaRMSNorm modules"),
    "target module by a wrong full name": lambda c: Case(["train", c.recipe(), "lora.target_modules=[model.layers.9.self_attn.q_proj]"],
                                                         r"'model\.layers\.9\.self_attn\.q_proj' matches no module"),
    "modules_to_save that match nothing": lambda c: Case(["train", c.recipe(), "lora.modules_to_save=[score]"],
                                                         r"lora\.modules_to_save: 'score' matches no module .* its layers are named"),
    # ---- output.merge -------------------------------------------------------------------------------------
    "merge dir under a file": lambda c: Case(["train", c.recipe(), f"output.merge={{dir: {c.file('afile')}/merged}}"],
                                             r"output\.merge\.dir: '.*afile' is a file, so .* cannot be created", absent=("--out",)),
    "merge dir under a file, validate": lambda c: Case(["validate", c.recipe(), f"output.merge={{dir: {c.file('afile')}/m}}"],
                                                       r"output\.merge\.dir: '.*afile' is a file"),
    "merge dir is a file": lambda c: Case(["train", c.recipe(), f"output.merge={{dir: {c.file('afile')}}}"], r"output\.merge\.dir: '.*afile' is a file; choose a folder"),
    "merge dir over the checkpoints": lambda c: Case(["train", c.recipe(), "output.merge={dir: checkpoints}"],
                                                     r"output\.merge\.dir: 'checkpoints' is where the run keeps its checkpoints"),
    "merge dir over the adapter": lambda c: Case(["train", c.recipe(), "output.merge={dir: adapter/x}"], r"is where the run keeps its adapter"),
    "merge dir over the manifest": lambda c: Case(["validate", c.recipe(), "output.merge={dir: manifest.json}"], r"is where the run keeps its manifest\.json"),
    "merge dir is the run folder": lambda c: Case(["train", c.recipe(), "output.merge={dir: .}"], r"output\.merge\.dir: .* would hold the run folder itself"),
    "merge dir holds the run folder": lambda c: Case(["train", c.recipe(), "output.merge={dir: ..}"], r"would hold the run folder itself"),
    "merge dir is somebody's folder": lambda c: Case(["train", c.recipe(), f"output.merge={{dir: {c.folder('site', {'index.html': 'x'})}}}"],
                                                     r"output\.merge\.dir: '.*site' is not empty and holds no merged model of lora_causal"),
    "merge dir name too long": lambda c: Case(["validate", c.recipe(), f"output.merge={{dir: {LONG}}}"], r"output\.merge\.dir: the name .* is 300 bytes long"),
    "merge dir with a NUL": lambda c: Case(["train", c.recipe(), 'output.merge={dir: "m\\0"}'], r"output\.merge\.dir: the path contains a NUL character"),
    "merge dir under an unknown ~user": lambda c: Case(["train", c.recipe(), f"output.merge={{dir: '{NO_USER}/m'}}"], r"output\.merge\.dir: .*there is no user"),
    # ---- train / validate / inspect arguments -------------------------------------------------------------
    "train without a recipe": lambda c: Case(["train"], r"the following arguments are required: recipe \(see", absent=("key=value",)),
    "validate without a recipe": lambda c: Case(["validate"], r"required: recipe \(see", absent=("key=value",)),
    "inspect without a recipe": lambda c: Case(["inspect"], r"required: recipe \(see", absent=("key=value",)),
    "inspect --html is a folder": lambda c: Case(["inspect", c.recipe(), "--html", str(c.folder("page"))], r"--html: '.*page' is a folder; give a file name"),
    "inspect --html under a file": lambda c: Case(["inspect", c.recipe(), "--html", f"{c.file('afile')}/page.html"], r"--html: '.*afile' is a file, so"),
    "inspect --html in a missing folder under a file": lambda c: Case(["inspect", c.recipe(), "--html", f"{c.file('afile')}/a/b/page.html"], r"--html: '.*afile' is a file"),
    "inspect --png is a folder": lambda c: Case(["inspect", c.recipe(), "--png", str(c.folder("pics"))], r"--png: '.*pics' is a folder"),
    "inspect --png under a file": lambda c: Case(["inspect", c.recipe(), "--png", f"{c.file('afile')}/h.png"], r"--png: '.*afile' is a file"),
    "inspect --png name too long": lambda c: Case(["inspect", c.recipe(), "--png", str(c.tmp / f"{LONG}.png")], r"--png: the name .* is 304 bytes long"),
    "inspect --html under an unknown ~user": lambda c: Case(["inspect", c.recipe(), "--html", f"{NO_USER}/p.html"], r"--html: .*there is no user"),
    "inspect --html and --png the same file": lambda c: Case(["inspect", c.recipe(), "--html", str(c.tmp / "x"), "--png", str(c.tmp / "x")],
                                                             r"--html and --png name the same file"),
    "inspect --html empty": lambda c: Case(["inspect", c.recipe(), "--html", ""], r"--html: give a file name"),
    "inspect --html with a NUL": lambda c: Case(["inspect", c.recipe(), "--html", "p\0.html"], r"--html: the path contains a NUL character"),
    # ---- merge --------------------------------------------------------------------------------------------
    "merge --out is a file": lambda c: Case(["merge", str(c.run()), "--out", str(c.file("afile"))], r"--out: '.*afile' is a file; choose a folder"),
    "merge --out under a file": lambda c: Case(["merge", str(c.run()), "--out", f"{c.file('afile')}/m"], r"--out: '.*afile' is a file, so"),
    "merge --force over somebody's folder": lambda c: Case(["merge", str(c.run()), "--out", str(c.folder("site", {"index.html": "x"})), "--force"],
                                                           r"--out: '.*site' is not empty and holds no merged model of lora_causal"),
    "merge --force over the run itself": lambda c: Case(["merge", str(c.run()), "--out", str(c.tmp / "done"), "--force"], r"holds no merged model of lora_causal"),
    "merge --force over the home of a merge report of another tool": lambda c: Case(
        ["merge", str(c.run()), "--out", str(c.folder("other", {"merge_report.json": '{"verdict": "x"}'})), "--force"], r"holds no merged model"),
    "merge --out name too long": lambda c: Case(["merge", str(c.run()), "--out", str(c.tmp / LONG)], r"--out: the name .* is 300 bytes long"),
    "merge --out with a NUL": lambda c: Case(["merge", str(c.run()), "--out", "m\0"], r"--out: the path contains a NUL character"),
    "merge --out under an unknown ~user": lambda c: Case(["merge", str(c.run()), "--out", f"{NO_USER}/m"], r"--out: .*there is no user"),
    "merge a source under an unknown ~user": lambda c: Case(["merge", f"{NO_USER}/run", "--out", str(c.tmp / "m")], r"adapter: .*there is no user"),
    "merge a run with a corrupt manifest": lambda c: Case(["merge", str(c.run(raw_manifest="{")), "--out", str(c.tmp / "m")],
                                                          r"manifest\.json' is not valid JSON \(line 1: .*\); the run's manifest is damaged"),
    "merge a run whose manifest is a list": lambda c: Case(["merge", str(c.run(raw_manifest="[]")), "--out", str(c.tmp / "m")], r"manifest\.json' must hold a JSON object"),
    "merge a run with a deeply nested manifest": lambda c: Case(["merge", str(c.run(raw_manifest=_nested(100_000))), "--out", str(c.tmp / "m")],
                                                                r"manifest\.json' is nested too deeply to read"),
    "merge a folder with a stray manifest": lambda c: Case(["merge", str(c.run(marker=None)), "--out", str(c.tmp / "m")],
                                                           r"is neither a lora_causal run directory \(no \.lora_causal_run\.json\) nor an adapter folder .*its adapter is in"),
    "merge an adapter with a corrupt config": lambda c: Case(["merge", str(c.adapter(raw_config='{"r": 8,')), "--out", str(c.tmp / "m")],
                                                             r"adapter_config\.json' is not valid JSON"),
    "merge an adapter whose config is a list": lambda c: Case(["merge", str(c.adapter(raw_config="[8]")), "--out", str(c.tmp / "m")],
                                                              r"adapter_config\.json' must hold a JSON object"),
    "merge an adapter with a deeply nested config": lambda c: Case(["merge", str(c.adapter(raw_config=_nested(100_000))), "--out", str(c.tmp / "m")],
                                                                   r"adapter_config\.json' is nested too deeply"),
    "merge an adapter of another kind": lambda c: Case(["merge", str(c.adapter(config={"peft_type": "PREFIX_TUNING"})), "--out", str(c.tmp / "m")],
                                                       r"describes a PREFIX_TUNING adapter; lora_causal merges LoRA adapters only"),
    "merge an adapter whose base is not text": lambda c: Case(["merge", str(c.adapter(config={"base_model_name_or_path": 5})), "--out", str(c.tmp / "m")],
                                                              r"base_model_name_or_path must be text"),
    "merge an adapter whose rank disagrees with its config": lambda c: Case(
        ["merge", str(c.adapter(config={"r": 16})), "--out", str(c.tmp / "m")],
        r"does not match its own adapter_config\.json: layer .* has rank r=8 in adapter_model\.safetensors, and adapter_config\.json says r=16",
        absent=("--base-model",)),
    "merge a run whose adapter rank disagrees": lambda c: Case(["merge", str(c.run(config={"r": 4})), "--out", str(c.tmp / "m")],
                                                               r"rank r=8 in adapter_model\.safetensors, and adapter_config\.json says r=4", absent=("--base-model",)),
    "merge an adapter with a rank that is not a number": lambda c: Case(["merge", str(c.adapter(config={"r": "eight"})), "--out", str(c.tmp / "m")],
                                                                        r"r must be a positive integer"),
    "merge an adapter with damaged weights": lambda c: Case(["merge", str(c.adapter(weights=b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")), "--out", str(c.tmp / "m")],
                                                            r"adapter_model\.safetensors' is not a readable safetensors file"),
    "merge an adapter for a base of another shape": lambda c: Case(
        ["merge", str(c.adapter()), "--out", str(c.tmp / "m"), "--base-model", str(c.model_folder("wide", {**_tiny_config(c), "hidden_size": 32, "intermediate_size": 64}))],
        r"does not fit base model .*wide.*adapter expects 64 features, base has 32\); pass the base it was trained on with --base-model"),
    "merge onto a t5 base": lambda c: Case(["merge", str(c.adapter()), "--out", str(c.tmp / "m"), "--base-model", str(c.model_folder("t5", T5))],
                                           r"base model: '.*t5' is a t5 model \(T5Config\), not a causal language model"),
    "merge onto a base whose config is a list": lambda c: Case(["merge", str(c.adapter()), "--out", str(c.tmp / "m"), "--base-model", str(c.model_folder("b", [1]))],
                                                               r"config\.json' must hold a JSON object"),
    "merge onto a missing local base": lambda c: Case(["merge", str(c.adapter()), "--out", str(c.tmp / "m"), "--base-model", str(c.tmp / "nothing")],
                                                      r"base model: '.*nothing' does not exist"),
    "merge an adapter whose base is a config only": lambda c: Case(
        ["merge", str(_adapter_of_a_config_only_base(c)), "--out", str(c.tmp / "m")],
        r"holds a config but no weights .*merge the run directory instead"),
    "merge with an empty --prompt": lambda c: Case(["merge", str(c.run()), "--out", str(c.tmp / "m"), "--prompt", ""], r"--prompt: an empty prompt measures nothing"),
    "merge with a blank --prompt": lambda c: Case(["merge", str(c.run()), "--out", str(c.tmp / "m"), "--prompt", "hi", "--prompt", "  "], r"an empty prompt"),
    "merge --revision without --base-model": lambda c: Case(["merge", str(c.run()), "--out", str(c.tmp / "m"), "--revision", "main"], r"--revision applies to --base-model"),
    "merge with no --out": lambda c: Case(["merge", str(c.run())], r"the following arguments are required: --out"),
    # ---- generate -----------------------------------------------------------------------------------------
    "generate --temperature nan": lambda c: Case(["generate", str(c.merged()), "--prompt", "hi", "--temperature", "nan"], r"--temperature must be 0 \(greedy\) or a positive number, not nan"),
    "generate --temperature inf": lambda c: Case(["generate", str(c.merged()), "--prompt", "hi", "--temperature", "inf"], r"not inf"),
    "generate --temperature -1": lambda c: Case(["generate", str(c.merged()), "--prompt", "hi", "--temperature", "-1"], r"not -1\.0"),
    "generate --temperature text": lambda c: Case(["generate", str(c.merged()), "--prompt", "hi", "--temperature", "hot"], r"argument --temperature: invalid float value"),
    "generate an empty --prompt": lambda c: Case(["generate", str(c.merged()), "--prompt", ""], r"--prompt: the prompt is empty"),
    "generate a blank --prompt": lambda c: Case(["generate", str(c.merged()), "--prompt", " \n "], r"--prompt: the prompt is empty"),
    "generate --seed -1": lambda c: Case(["generate", str(c.merged()), "--prompt", "hi", "--seed", "-1"], r"--seed must be between 0 and 4294967295"),
    "generate from under an unknown ~user": lambda c: Case(["generate", f"{NO_USER}/m", "--prompt", "hi"], r"MODEL_DIR_OR_RUN_DIR: .*there is no user"),
    "generate with a corrupt merge report": lambda c: Case(["generate", str(c.merged(raw_report="{oops")), "--prompt", "hi"], r"merge_report\.json' is not valid JSON"),
    "generate with a merge report that is a list": lambda c: Case(["generate", str(c.merged(raw_report="[]")), "--prompt", "hi"], r"merge_report\.json' must hold a JSON object"),
    "generate with a deeply nested merge report": lambda c: Case(["generate", str(c.merged(raw_report=_nested(100_000))), "--prompt", "hi"], r"merge_report\.json' is nested too deeply"),
    "generate with a prompt format that is not text": lambda c: Case(["generate", str(c.merged(report={"prompt_format": 3})), "--prompt", "hi"], r"prompt_format must be text"),
    "generate from a model whose config is a list": lambda c: Case(["generate", str(c.model_folder("m", [1])), "--prompt", "hi"], r"config\.json' must hold a JSON object"),
    "generate from a t5 model": lambda c: Case(["generate", str(c.model_folder("t5", T5)), "--prompt", "hi"], r"model: '.*t5' is a t5 model \(T5Config\), not a causal language model"),
    "generate from a run with a corrupt manifest": lambda c: Case(["generate", str(c.run(raw_manifest="{")), "--prompt", "hi"], r"manifest\.json' is not valid JSON"),
    "generate from an unfinished run": lambda c: Case(["generate", str(c.run(manifest={"status": "running"})), "--prompt", "hi"], r"holds no finished adapter \(run status: running\)"),
    "generate from an adapter with a corrupt config": lambda c: Case(["generate", str(c.adapter(raw_config="nope")), "--prompt", "hi"], r"adapter_config\.json' is not valid JSON"),
    "generate from an adapter whose rank disagrees": lambda c: Case(["generate", str(c.adapter(config={"r": 16})), "--prompt", "hi"],
                                                                    r"has rank r=8 in adapter_model\.safetensors, and adapter_config\.json says r=16", absent=("--base-model",)),
    "generate from a folder with a stray manifest": lambda c: Case(["generate", str(c.folder("app", {"manifest.json": "{}"})), "--prompt", "hi"], r"is neither a lora_causal run directory"),
    "generate without --prompt": lambda c: Case(["generate", str(c.merged())], r"the following arguments are required: --prompt"),
    # ---- data files ---------------------------------------------------------------------------------------
    "csv with a byte-order mark names the real missing field": lambda c: Case(
        ["train", c.recipe(), f"data.train.path={c.file('excel.csv', BOM_CSV)}"],
        r"data\.train: line 2: no 'completion' field \(format prompt_completion reads prompt, completion; this row has prompt, answer\)"),
    "csv row with a field over 128 KiB and a bad row after it": lambda c: Case(
        ["train", c.recipe(), f"data.train.path={c.file('big.csv', BIG_FIELD_CSV)}"], r"big\.csv line 3: 3 fields, but the header has 2"),
    "csv that is not UTF-8": lambda c: Case(["train", c.recipe(), f"data.train.path={c.file('latin.csv', LATIN_CSV)}"],
                                            r"latin\.csv is not UTF-8 text"),
    "jsonl row nested 100000 deep": lambda c: Case(["train", c.recipe(), f"data.train.path={c.file('deep.jsonl', DEEP_OBJECT + chr(10))}"],
                                                   r"data\.train: deep\.jsonl line 1: nested too deeply to read"),
    "json file nested 100000 deep": lambda c: Case(["train", c.recipe(), f"data.train.path={c.file('deep.json', _nested(100_000))}"],
                                                   r"data\.train: deep\.json: nested too deeply to read"),
    "jsonl row nested 100000 deep, inspect": lambda c: Case(["inspect", c.recipe(), f"data.train.path={c.file('deep.jsonl', DEEP_OBJECT + chr(10))}"],
                                                            r"nested too deeply to read"),
    "chat row without an assistant turn": lambda c: Case(["train", c.recipe(rows=[CHAT_ROW, USER_ONLY], fmt="messages")],
                                                         r"data\.train: line 2: the conversation has no assistant turn, so none of its tokens is a target",
                                                         absent=("max_length",)),
    "chat row that opens with the assistant": lambda c: Case(
        ["train", c.recipe(rows=[CHAT_ROW, {"messages": [{"role": "assistant", "content": "Hello!"}, *CHAT_ROW["messages"]]}],
                           fmt="messages")],
        r"data\.train: line 2: the conversation opens with an assistant message, whose role header cannot be told apart",
        absent=("max_length",)),
    "chat rows that are all system and user": lambda c: Case(["inspect", c.recipe(rows=[USER_ONLY, USER_ONLY], fmt="messages")],
                                                             r"line 1: the conversation has no assistant turn", absent=("max_length",)),
    "data.cache_dir under a file": lambda c: Case(["train", c.recipe(), f"data.cache_dir={c.file('afile')}/cache"], r"data\.cache_dir: '.*afile' is a file, so"),
    "data.cache_dir under an unknown ~user": lambda c: Case(["validate", c.recipe(), f"data.cache_dir={NO_USER}/cache"], r"data\.cache_dir: .*there is no user"),
    # ---- show ---------------------------------------------------------------------------------------------
    "show a folder that does not exist": lambda c: Case(["show", str(c.tmp / "nothing")], r"'.*nothing' is not a folder"),
    "show a file": lambda c: Case(["show", str(c.file("afile"))], r"'.*afile' is not a folder"),
    "show a folder with a stray manifest": lambda c: Case(["show", str(c.folder("app", {"manifest.json": '{"status": "completed"}', "metrics.jsonl": '{"step": 1, "loss": 1.0}\n'}))],
                                                          r"'.*app' is not a lora_causal run folder \(no \.lora_causal_run\.json\)"),
    "show a run with a corrupt manifest": lambda c: Case(["show", str(c.run(raw_manifest="{"))], r"manifest\.json' is not valid JSON"),
    "show a run with a deeply nested manifest": lambda c: Case(["show", str(c.run(raw_manifest=_nested(100_000)))], r"manifest\.json' is nested too deeply"),
    "show a run whose manifest is a list": lambda c: Case(["show", str(c.run(raw_manifest="[]"))], r"manifest\.json' must hold a JSON object"),
    "show a run with no metrics": lambda c: Case(["show", str(c.run())], r"no metrics\.jsonl yet"),
    "show a run with a deeply nested metrics line": lambda c: Case(["show", str(_run_with_metrics(c, DEEP_OBJECT + "\n"))], r"metrics\.jsonl line 1: not valid JSON"),
    "show under an unknown ~user": lambda c: Case(["show", f"{NO_USER}/run"], r"RUN_DIR: .*there is no user"),
    "show without a run": lambda c: Case(["show"], r"the following arguments are required: RUN_DIR"),
    # ---- cache --------------------------------------------------------------------------------------------
    "cache clear --dir a file": lambda c: Case(["cache", "clear", "--dir", str(c.file("afile"))], r"--dir: '.*afile' is a file; choose a folder"),
    "cache clear --dir under a file": lambda c: Case(["cache", "clear", "--dir", f"{c.file('afile')}/cache"], r"--dir: '.*afile' is a file, so"),
    "cache clear --dir under an unknown ~user": lambda c: Case(["cache", "clear", "--dir", f"{NO_USER}/cache"], r"--dir: .*there is no user"),
    "cache clear --dir empty": lambda c: Case(["cache", "clear", "--dir", ""], r"--dir: give the cache folder"),
    "cache clear --dir with a NUL": lambda c: Case(["cache", "clear", "--dir", "c\0"], r"--dir: the path contains a NUL character"),
    "cache without a subcommand": lambda c: Case(["cache"], r"required: cache_command"),
    # ---- bench --------------------------------------------------------------------------------------------
    "bench --out is a file": lambda c: Case(["bench", "--out", str(c.file("afile"))], r"--out: '.*afile' is a file; choose a folder"),
    "bench --out under a file": lambda c: Case(["bench", "--out", f"{c.file('afile')}/b"], r"--out: '.*afile' is a file, so"),
    "bench --out under an unknown ~user": lambda c: Case(["bench", "--out", f"{NO_USER}/b"], r"--out: .*there is no user"),
    "bench --out with a NUL": lambda c: Case(["bench", "--out", "b\0"], r"--out: the path contains a NUL character"),
    "bench --out name too long": lambda c: Case(["bench", "--out", str(c.tmp / LONG)], r"--out: the name .* is 300 bytes long"),
    "bench --out empty": lambda c: Case(["bench", "--out", ""], r"--out: give a folder"),
    "bench --sigma nan": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--sigma", "nan"], r"--sigma must be a positive number, not nan"),
    "bench --sigma -1": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--sigma", "-1"], r"--sigma must be a positive number"),
    "bench --memory-cap-gib 0": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--memory-cap-gib", "0"], r"--memory-cap-gib must be a positive number"),
    "bench --memory-cap-gib inf": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--memory-cap-gib", "inf"], r"--memory-cap-gib must be a positive number, not inf"),
    "bench --warmup -1": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--warmup", "-1"], r"--warmup must be 0 or more"),
    "bench --warmup over --steps": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--warmup", "5", "--steps", "5"], r"--warmup \(5\) must be smaller than --steps \(5\)"),
    "bench --seed -1": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--seed", "-1"], r"--seed must be between 0 and 4294967295"),
    "bench --steps 0": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--steps", "0"], r"--steps must be at least 1"),
    "bench --arms unknown": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--arms", "stock,turbo"], r"--arms: unknown arm turbo"),
    "bench --arms empty": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--arms", ","], r"--arms: unknown arm \(none\)"),
    "bench --context-lengths text": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--max-context", "--context-lengths", "a,b"], r"--context-lengths: 'a,b' is not a comma-separated list"),
    "bench --context-lengths zero": lambda c: Case(["bench", "--out", str(c.tmp / "b"), "--max-context", "--context-lengths", "0"], r"--context-lengths: give positive token counts"),
    "bench without --out": lambda c: Case(["bench"], r"the following arguments are required: --out"),
}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root`: type, size, modification time and (for files) a content hash."""
    entries: dict[str, tuple[Any, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
        entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest)
    return entries


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused(name: str, tmp_path: Path, weightless_model: Path, adapter_template: Path, capfd, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths a case writes land in the snapshot too
    case = CASES[name](Ctx(tmp_path, weightless_model, adapter_template))
    before = snapshot(tmp_path)
    capfd.readouterr()
    code = call_cli(case.args)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert re.search(case.pattern, line), line
    for text in case.absent:
        assert text not in line, line
    assert "Traceback" not in err + out
    assert "trainable params" not in out  # no model was built with an adapter
    assert snapshot(tmp_path) == before, "the refused command created, changed or removed files"


def test_the_tracker_cases_run_without_those_trackers() -> None:
    import importlib.util

    assert all(importlib.util.find_spec(name) is None for name in ("mlflow", "wandb", "trackio"))


def test_there_are_enough_hostile_cases() -> None:
    commands = {name.split(" ")[0].rstrip(":") for name in CASES}
    assert len(CASES) >= 120, len(CASES)
    assert {"merge", "generate", "bench", "inspect"} <= commands


def test_the_error_line_of_a_foreign_model_is_short(tmp_path: Path, weightless_model: Path, adapter_template: Path, capfd) -> None:
    """transformers lists every causal LM class (thousands of characters) for a model of another kind."""
    ctx = Ctx(tmp_path, weightless_model, adapter_template)
    code = call_cli(["validate", ctx.recipe(), f"model.name_or_path={ctx.model_folder('t5', T5)}"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err) < 300 + len(str(tmp_path)), err


# ---------------------------------------------------------------------------------------------------------
# What the refusals must not cost: unusual but valid input is read, and replacing a run keeps what is not ours


def test_a_csv_with_a_byte_order_mark_and_a_field_over_128_kib_is_read(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    import csv

    data = tmp_path / "excel.csv"
    with data.open("w", encoding="utf-8-sig", newline="") as handle:  # utf-8-sig writes the BOM, as Excel does
        csv.writer(handle).writerows([["prompt", "completion"], ["Q: What is two plus two?\nA:", " four."],
                                      ["Q " * 100_000, " blue."]])
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", data={"truncation": "keep_end"}, checks={"skip": ["truncation"]})
    code = call_cli(["inspect", str(write_recipe(tmp_path / "recipe.yaml", tree)), "--n", "1"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    assert re.search(r"examples\s+2\b", out), out[-2000:]  # both rows: the BOM did not rename 'prompt', the long field fit


def test_overwrite_replaces_only_what_the_run_wrote(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1}))
    assert call_cli(["train", str(recipe)]) == 0, capfd.readouterr().err[-2000:]
    run = tmp_path / "run"
    assert json.loads((run / ".lora_causal_run.json").read_text())["format"] == "lora_causal-run"
    (run / "notes.txt").write_text("mine")
    (run / "my-analysis").mkdir()
    (run / "my-analysis" / "plot.py").write_text("print(1)")
    (run / ".manifest.json.x1y2z3").write_text("{")  # a temporary file an interrupted atomic write left behind
    old_adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert call_cli(["train", str(recipe), "--overwrite"]) == 0, capfd.readouterr().err[-2000:]
    assert (run / "notes.txt").read_text() == "mine" and (run / "my-analysis" / "plot.py").is_file()
    assert not (run / ".manifest.json.x1y2z3").exists()
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns != old_adapter
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"


def test_cache_clear_removes_cache_entries_and_nothing_else(tmp_path: Path, capfd) -> None:
    cache = tmp_path / "cache"
    key = "0123456789abcdef" * 2
    (cache / key).mkdir(parents=True)
    (cache / key / "entry.json").write_text("{}")
    (cache / f".{key}.123-abcdef01.partial").mkdir()
    (cache / f".{key}.lock").write_text("")
    (cache / "launches").mkdir()
    (cache / "launches" / f"{key}-0.json").write_text("{}")
    (cache / "photos").mkdir()
    (cache / "photos" / "cat.jpg").write_text("meow")
    (cache / "notes.txt").write_text("mine")
    assert call_cli(["cache", "clear", "--dir", str(cache)]) == 0
    assert "removed 1 prepared dataset (" in capfd.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt", "photos"]
    assert (cache / "photos" / "cat.jpg").read_text() == "meow"


def test_cache_clear_finds_the_data_folder_of_lora_causal_cache_and_refuses_a_missing_folder(tmp_path: Path, capfd) -> None:
    """$LORA_CAUSAL_CACHE holds the prepared data in data/: giving the variable's folder clears that, not nothing;
    a folder that is not there is a typo, not 'removed 0'."""
    key = "0123456789abcdef" * 2
    entry = tmp_path / "root" / "data" / key
    entry.mkdir(parents=True)
    (entry / "entry.json").write_text("{}")
    capfd.readouterr()
    assert call_cli(["cache", "clear", "--dir", str(tmp_path / "root")]) == 0
    assert f"removed 1 prepared dataset (0.0 MiB) from {tmp_path / 'root' / 'data'}" in capfd.readouterr().out
    assert not entry.exists()
    code = call_cli(["cache", "clear", "--dir", str(tmp_path / "nowhere")])
    out, err = capfd.readouterr()
    assert_one_line_error(code, err, r"--dir: '.*nowhere' is not a folder; give the data cache folder", out)
