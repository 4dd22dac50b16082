"""Merging: exactness of both bases, the report, loading without peft, generation, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.cli import main
from lora_causal.core.recipe_file import load_recipe
from lora_causal.model.loading import load_base_model
from lora_causal.serving.adapters import locate_adapter, with_adapter
from lora_causal.serving.fidelity import compare, logits_for
from lora_causal.serving.merging import merge_adapter
from lora_causal.training.run import run_training

PROMPTS = ["Q: What color is the sky?\nA: blue.", "Q: What do cows drink?\nA: water."]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished run whose adapter moved far from zero (high learning rate)."""
    folder = tmp_path_factory.mktemp("merge-run")
    data = write_jsonl(folder / "qa.jsonl", QA_ROWS * 2)
    tree = base_recipe(tiny_model_dir, data, folder / "run", train={"max_steps": 6, "learning_rate": 1.0e-2})
    run_training(load_recipe(write_recipe(folder / "recipe.yaml", tree)), say=lambda *_: None)
    return folder / "run"


def _ids(run: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def _merged_logits(folder: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return logits_for(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), prompts)


def _reference_logits(run: Path, prompts: list[list[int]], quantized: bool) -> list[torch.Tensor]:
    from lora_causal.serving.merging import load_dense_base

    source = locate_adapter(str(run))
    base = load_base_model(source.model, source.quantization, source.seed) if quantized else load_dense_base(source, torch.float32)
    return logits_for(with_adapter(base, source.adapter), prompts)


def test_original_merge_in_float32_reproduces_base_plus_adapter(trained_run: Path, tmp_path: Path) -> None:
    merge_adapter(str(trained_run), str(tmp_path / "m"), base="original", dtype_name="float32", prompts=PROMPTS, say=lambda *_: None)
    prompts = _ids(trained_run)
    merged = _merged_logits(tmp_path / "m", prompts)
    reference = _reference_logits(trained_run, prompts, quantized=False)
    assert compare(merged, reference)["max_abs_logit_diff"] < 1e-5
    adapter_effect = compare(reference, _merged_logits_of_base(trained_run, prompts))["max_abs_logit_diff"]
    assert adapter_effect > 0.1  # the adapter really changes the model, so the check above means something


def _merged_logits_of_base(run: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from lora_causal.serving.merging import load_dense_base

    return logits_for(load_dense_base(locate_adapter(str(run)), torch.float32), prompts)


def test_nf4_roundtrip_reproduces_the_model_as_trained(trained_run: Path, tmp_path: Path) -> None:
    for base in ("original", "nf4-roundtrip"):
        merge_adapter(str(trained_run), str(tmp_path / base), base=base, dtype_name="float32", prompts=PROMPTS, say=lambda *_: None)
    prompts = _ids(trained_run)
    as_trained = _reference_logits(trained_run, prompts, quantized=True)
    roundtrip = compare(_merged_logits(tmp_path / "nf4-roundtrip", prompts), as_trained)
    original = compare(_merged_logits(tmp_path / "original", prompts), as_trained)
    assert roundtrip["max_abs_logit_diff"] < 1e-2  # well inside bfloat16 rounding (~4e-3 relative)
    assert roundtrip["top1_agreement"] == 1.0
    assert roundtrip["max_abs_logit_diff"] < original["max_abs_logit_diff"] / 10


def test_report_is_written_printed_and_consistent(trained_run: Path, tmp_path: Path, capsys) -> None:
    code = main(["merge", str(trained_run), "--out", str(tmp_path / "m"), "--base", "nf4-roundtrip",
                 "--dtype", "float32", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert {"base", "dtype", "base_model", "adapter", "prompts", "tokens", "vs_trained_4bit_adapter",
            "vs_unquantized_adapter", "perplexity", "verdict"} <= set(report)
    assert report["prompts"] == 2 and report["tokens"] == sum(len(ids) for ids in _ids(trained_run))
    assert report["verdict"].startswith("faithful") and report["verdict"] in printed
    prompts = _ids(trained_run)
    merged = _merged_logits(tmp_path / "m", prompts)
    direct = compare(merged, _reference_logits(trained_run, prompts, quantized=False))
    recorded = report["vs_unquantized_adapter"]
    assert recorded["top1_agreement"] == pytest.approx(direct["top1_agreement"])
    assert recorded["mean_kl"] == pytest.approx(direct["mean_kl"], rel=1e-3, abs=1e-7)
    assert recorded["max_abs_logit_diff"] == pytest.approx(direct["max_abs_logit_diff"], rel=1e-3, abs=1e-5)
    ppl = report["perplexity"]
    assert ppl["merged"] == pytest.approx(ppl["trained_4bit_adapter"], rel=1e-3)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_what_ships_with_a_merged_model_names_no_local_absolute_path(trained_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import os

    adapter_config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == os.path.relpath(tiny_model_dir, trained_run / "adapter")
    out = tmp_path / "m"
    merge_adapter(str(trained_run), str(out), base="original", dtype_name="float32", prompts=PROMPTS, say=lambda *_: None)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["format"] == "lora_causal-merge-report" and "out" not in report
    assert not os.path.isabs(report["adapter"])
    absolute = [text for text in _strings(report) if os.path.isabs(text) or str(tmp_path.parent) in text]
    assert absolute == [], absolute
    # --force replaces an earlier merge (ours), never another folder
    merge_adapter(str(trained_run), str(out), base="original", dtype_name="float32", prompts=PROMPTS, force=True,
                  say=lambda *_: None)
    assert (out / "model.safetensors").is_file()


def test_merged_folder_loads_and_generates_without_peft(trained_run: Path, tmp_path: Path) -> None:
    merge_adapter(str(trained_run), str(tmp_path / "m"), base="original", dtype_name="bfloat16", prompts=PROMPTS, say=lambda *_: None)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    script = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(tmp_path / 'm')!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)\n"
        "ids = tok('Q: What color is the sky?\\nA:', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=4, do_sample=False)\n"
        "print(out.shape[1] - ids['input_ids'].shape[1], model.dtype)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    new_tokens, dtype = result.stdout.split()
    assert 1 <= int(new_tokens) <= 4 and dtype == "torch.bfloat16"


def test_generate_from_the_run_and_from_its_roundtrip_merge_agree(trained_run: Path, tmp_path: Path, capsys) -> None:
    merge_adapter(str(trained_run), str(tmp_path / "m"), base="nf4-roundtrip", dtype_name="float32", prompts=PROMPTS, say=lambda *_: None)
    capsys.readouterr()
    assert main(["generate", str(trained_run), "--prompt", "Q: What color is the sky?\nA:", "--max-new-tokens", "6"]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "m"), "--prompt", "Q: What color is the sky?\nA:", "--max-new-tokens", "6"]) == 0
    from_merged = capsys.readouterr().out
    assert from_run == from_merged and from_run.strip()


def _other_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(other)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(other)
    return other


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing adapter", r"adapter not found: '.*nothing-here' does not exist"),
        ("not an adapter", r"is neither a lora_causal run directory .* nor an adapter folder"),
        ("adapter for another base", r"does not fit base model '.*other-model'.*pass the base it was trained on"),
        ("existing output", r"output folder '.*taken' exists and is not empty; choose another --out or pass --force"),
        ("unknown dtype", r"argument --dtype: invalid choice: 'float8'"),
        ("unknown base", r"argument --base: invalid choice: 'nf5'"),
    ],
)
def test_bad_merge_input(case: str, pattern: str, trained_run: Path, tiny_model_dir: Path, tmp_path: Path, capfd) -> None:
    import re

    out = tmp_path / "out"
    args = {
        "missing adapter": ["merge", str(tmp_path / "nothing-here"), "--out", str(out)],
        "not an adapter": ["merge", str(tmp_path), "--out", str(out)],
        "adapter for another base": ["merge", str(trained_run), "--out", str(out),
                                     "--base-model", str(_other_model(tmp_path, tiny_model_dir))],
        "existing output": ["merge", str(trained_run), "--out", str(tmp_path / "taken")],
        "unknown dtype": ["merge", str(trained_run), "--out", str(out), "--dtype", "float8"],
        "unknown base": ["merge", str(trained_run), "--out", str(out), "--base", "nf5"],
    }[case]
    if case == "existing output":
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "keep.txt").write_text("mine")
    capfd.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no staging folder left
    if case == "existing output":
        assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_generate_samples_reproducibly_with_a_seed_and_raw_prompts(trained_run: Path, capsys) -> None:
    args = ["generate", str(trained_run), "--prompt", "Q: What color is the sky?\nA:", "--max-new-tokens", "8",
            "--temperature", "1.5"]
    answers = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]  # same seed, same sample
    assert main(["generate", str(trained_run), "--prompt", "the dog", "--raw", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_nf4_roundtrip_of_an_int8_adapter_is_refused_before_loading(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1},
                       quantization={"mode": "int8", "double_quant": False})
    run_training(load_recipe(write_recipe(tmp_path / "r.yaml", tree)), say=lambda *_: None)
    capfd.readouterr()
    code = main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--base", "nf4-roundtrip"])
    err = capfd.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "error: --base nf4-roundtrip needs a 4-bit trained adapter; this one trained with int8"
    ]  # no loading progress before it: refused before any weights load
    assert not (tmp_path / "out").exists()
