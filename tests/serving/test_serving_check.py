"""`check-serving`: real peft adapters built to break each serving rule, the server flags that fit, the recipe-time
check (`validate --serving`), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QA_ROWS, assert_one_line_error, base_recipe, write_jsonl, write_recipe

from lora_causal.serving.check import check_serving
from lora_causal.serving.rules import smallest_vllm_rank


def _save_adapter(base_dir: Path, out: Path, prepare=None, **lora: object) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if prepare is not None:
        prepare(model)
    get_peft_model(model, LoraConfig(r=lora.pop("r", 8), lora_alpha=16, **lora)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("adapters")

    def extra_linear(model: object) -> None:
        model.model.layers[0].mlp.extra_proj = torch.nn.Linear(64, 64, bias=False)

    def resize(model: object) -> None:
        model.resize_token_embeddings(model.config.vocab_size + 8)

    built = {
        "clean": _save_adapter(tiny_model_dir, root / "clean", target_modules="all-linear"),
        "rank24": _save_adapter(tiny_model_dir, root / "rank24", target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 24}),
        "rank600": _save_adapter(tiny_model_dir, root / "rank600", r=600, target_modules=["q_proj"]),
        "modules_to_save": _save_adapter(tiny_model_dir, root / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "dora": _save_adapter(tiny_model_dir, root / "dora", target_modules=["q_proj"], use_dora=True),
        "bias": _save_adapter(tiny_model_dir, root / "bias", target_modules=["q_proj"], bias="lora_only"),
        "resized": _save_adapter(tiny_model_dir, root / "resized", resize, target_modules=["q_proj", "embed_tokens"]),
        "extra": _save_adapter(tiny_model_dir, root / "extra", extra_linear, target_modules=["q_proj", "extra_proj"]),
    }
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    # a tokenizer with 8 new tokens saved beside the resized adapter, in the added_tokens.json layout SGLang reads
    (root / "resized" / "added_tokens.json").write_text(json.dumps({f"<new{i}>": vocab + i for i in range(8)}))
    return built


def _errors(path: Path, engine: str) -> list[str]:
    _, results = check_serving(str(path), [engine])
    return [finding.problem for finding in results[0].findings if finding.severity == "error"]


def test_a_plain_all_linear_adapter_is_servable_everywhere_with_fitting_flags(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    _, results = check_serving(str(adapters["clean"]), ["vllm", "sglang", "llamacpp"])
    assert [(result.engine, result.ok, result.findings) for result in results] == [
        ("vllm", True, []), ("sglang", True, []), ("llamacpp", True, [])]
    assert results[0].command == (f"vllm serve {tiny_model_dir} --enable-lora --max-lora-rank 8 --lora-modules "
                                  f"adapter={adapters['clean']}")
    assert "--lora-target-modules down_proj,gate_up_proj,o_proj,qkv_proj " in results[1].command


def test_rank_is_rounded_up_to_a_value_vllm_accepts_and_refused_above_512(adapters: dict[str, Path]) -> None:
    assert [smallest_vllm_rank(rank) for rank in (1, 2, 8, 9, 24, 300, 512, 513)] == [1, 8, 8, 16, 32, 320, 512, None]
    _, results = check_serving(str(adapters["rank24"]), ["vllm", "sglang"])
    assert results[0].ok and "--max-lora-rank 32 " in results[0].command  # r=8, rank_pattern q_proj=24
    assert "--max-lora-rank 24 " in results[1].command
    assert _errors(adapters["rank600"], "vllm") == ["rank 600 is above 512, the largest --max-lora-rank vLLM accepts"]


def test_modules_to_save_is_refused_by_vllm_and_llamacpp_and_silently_dropped_by_sglang(adapters: dict[str, Path]) -> None:
    vllm = _errors(adapters["modules_to_save"], "vllm")
    assert vllm[0].startswith("vLLM refuses modules_to_save (lm_head)")
    assert vllm[1] == "vLLM refuses tensors that are not LoRA weights: lm_head.weight ('unsupported LoRA weight')"
    assert _errors(adapters["modules_to_save"], "sglang") == [
        "SGLang drops the full copies of modules_to_save without an error (lora.py _process_weight), so the server "
        "answers with the base model's lm_head"]
    assert any("lm_head.weight" in problem for problem in _errors(adapters["modules_to_save"], "llamacpp"))


def test_dora_is_refused_by_every_engine(adapters: dict[str, Path]) -> None:
    for engine, name in (("vllm", "vLLM"), ("sglang", "SGLang"), ("llamacpp", "llama.cpp")):
        assert _errors(adapters["dora"], engine)[0] == f"{name} does not load DoRA adapters (use_dora is true)"
    assert any("lora_magnitude_vector" in problem for problem in _errors(adapters["dora"], "vllm"))


def test_bias_is_refused_by_vllm_only(adapters: dict[str, Path]) -> None:
    assert _errors(adapters["bias"], "vllm") == ["vLLM refuses adapters with bias: lora_only (peft_helper.py validate_legal)"]
    assert _errors(adapters["bias"], "sglang") == []


def test_a_resized_vocabulary_and_added_tokens_are_caught(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    vllm = _errors(adapters["resized"], "vllm")
    assert any(f"has {vocab + 8} rows, the base model {vocab}" in problem for problem in vllm), vllm
    assert any(f"lora_embedding_A has {vocab + 8} columns" in problem for problem in vllm), vllm
    assert any(problem.startswith("the adapter adds 8 tokens to the vocabulary") for problem in _errors(adapters["resized"], "sglang"))


def test_a_target_the_engine_cannot_wrap_is_refused(adapters: dict[str, Path]) -> None:
    assert _errors(adapters["extra"], "vllm") == [
        "vLLM cannot wrap extra_proj in a llama model (it wraps down_proj, embed_tokens, gate_proj, k_proj, lm_head, "
        "o_proj, q_proj, up_proj, v_proj)"]


def test_validate_checks_the_adapter_a_recipe_will_train(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import call_cli

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    good = write_recipe(tmp_path / "good.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run", lora={"r": 24}))
    assert call_cli(["validate", str(good), "--serving", "vllm"]) == 0
    assert "--max-lora-rank 32 " in capsys.readouterr().out
    bad = write_recipe(tmp_path / "bad.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run",
                                                           lora={"use_dora": True, "modules_to_save": ["lm_head"]}))
    assert call_cli(["check-serving", str(bad), "--engine", "vllm,sglang"]) == 1
    out = capsys.readouterr().out
    assert "vllm: NOT servable (2 errors)" in out and "sglang: NOT servable (2 errors)" in out
    assert "fix: set lora.use_dora: false, or merge the adapter" in out
    assert not (tmp_path / "run").exists()


def test_bad_input_is_one_line(tmp_path: Path, adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import call_cli

    cases = [
        (["check-serving", str(adapters["clean"]), "--engine", "tgi"], r"unknown engine 'tgi'; choose from vllm, sglang, llamacpp"),
        (["check-serving", str(tmp_path / "missing"), "--engine", "vllm"], r"does not exist"),
        (["check-serving", str(tmp_path), "--engine", "vllm"], r"holds no adapter_config.json, so it is not a LoRA adapter"),
        (["check-serving", str(adapters["clean"]), "x=1", "--engine", "vllm"], r"overrides apply to recipes"),
    ]
    for args, pattern in cases:
        code = call_cli(args)
        captured = capsys.readouterr()
        assert_one_line_error(code, captured.err, pattern, captured.out)


def test_a_random_init_run_is_served_from_its_generated_weights(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    """A base given as a config alone (model.init: random) has no weights in its folder: the server command of the
    run names the folder that holds the weights it trained on, not the config folder."""
    import shutil

    from conftest import call_cli

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, config_only / name)
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    tree = base_recipe(config_only, data, tmp_path / "run", train={"max_steps": 1})
    tree["model"]["init"] = "random"
    assert call_cli(["train", str(write_recipe(tmp_path / "r.yaml", tree))]) == 0, capfd.readouterr().err[-2000:]
    capfd.readouterr()
    assert call_cli(["check-serving", str(tmp_path / "run"), "--engine", "vllm"]) == 0
    out = capfd.readouterr().out
    command = next(line for line in out.splitlines() if "vllm serve" in line)
    assert "random-init" in command and str(config_only) not in command, out
