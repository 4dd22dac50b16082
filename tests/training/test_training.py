"""Training on a tiny 4-bit model: LoRA weights change, base weights do not, outputs land in the run directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.core.recipe import Recipe
from lora_causal.core.recipe_file import load_recipe
from lora_causal.data.prepare import prepare_data
from lora_causal.model.loading import attach_lora, load_base_model, load_tokenizer
from lora_causal.training.run import run_training
from lora_causal.training.trainer import build_sft_config, build_trainer


def _recipe(tmp_path: Path, model_dir: Path, **sections) -> Recipe:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    path = write_recipe(tmp_path / "recipe.yaml", base_recipe(model_dir, data, tmp_path / "run", **sections))
    return load_recipe(path)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model (4-bit packed weights and their quantization statistics included), copied."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_training_changes_every_lora_weight_and_no_base_weight(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, train={"max_steps": 3, "logging_steps": 1})
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, recipe.train.seed), recipe.lora, 0)
    assert model.base_model.model.is_loaded_in_4bit
    before = _state(model)
    trainer = build_trainer(recipe, model, tokenizer, data, build_sft_config(recipe, str(tmp_path / "ckpt"), False))
    trainer.train()
    after = _state(model)

    lora = [name for name in before if "lora_" in name]
    base = [name for name in before if "lora_" not in name]
    assert len(lora) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in each of 2 blocks (all-linear)
    assert any(".absmax" in name or "quant_state" in name for name in base)  # the 4-bit statistics are compared too
    unchanged_lora = [name for name in lora if torch.equal(before[name], after[name])]
    changed_base = [name for name in base if not torch.equal(before[name], after[name])]
    assert unchanged_lora == []
    assert changed_base == []
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_evaluation_does_not_stop_gradients_through_4bit_layers(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference after an eval forward; training must not notice."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(recipe.model)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, 0), recipe.lora, 0)
    model.enable_input_require_grads()
    ids = torch.tensor([tokenizer("the dog likes food")["input_ids"]])
    first_layer_a = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)
    with torch.no_grad():  # make lora_B non-zero so gradients reach lora_A
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)

    def grad_of_first_layer() -> torch.Tensor:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return first_layer_a.grad.detach().clone()

    reference = grad_of_first_layer()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert reference.abs().sum() > 0
    assert torch.allclose(grad_of_first_layer(), reference, atol=1e-6)


def test_run_directory_holds_adapter_recipe_manifest_and_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, output={"sample_prompts": ["Q: What color is the sky?\nA:"]})
    result = run_training(recipe, say=lambda *_: None)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        ".lora_causal_run.json", ".lora_causal_run.lock", "adapter", "checkpoints", "data_report.json", "loss.png", "manifest.json",
        "metrics.jsonl", "recipe.yaml", "samples.json",
    ]
    from lora_causal.core.rundir import RUN_ENTRIES  # everything the run wrote is something overwrite may remove

    assert {p.name for p in run.iterdir()} - {".lora_causal_run.json", ".lora_causal_run.lock"} <= set(RUN_ENTRIES)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == 4
    assert manifest["seed"] == 0 and len(manifest["dataset_fingerprint"]) == 64
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(manifest["versions"])
    assert load_recipe(run / "recipe.yaml").fingerprint() == recipe.fingerprint()  # the resolved recipe reloads
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert len(train_logs) == 4
    assert all(r["supervised_tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in train_logs)
    assert train_logs[-1]["supervised_tokens"] > train_logs[0]["supervised_tokens"]
    assert all(r["supervised_tokens_per_s"] > 0 and 0 < r["elapsed_s"] for r in train_logs)
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    # the summary in the manifest is read back from those records
    summary = manifest["summary"]
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["logged_steps"] == 4
    assert (summary["first_loss"], summary["last_loss"]) == (train_logs[0]["loss"], train_logs[-1]["loss"])
    assert summary["tokens"] == train_logs[-1]["tokens"] and summary["supervised_tokens"] == train_logs[-1]["supervised_tokens"]
    assert summary["peak_mem_gib"] == max(r["peak_mem_gib"] for r in train_logs)
    assert summary["eval_loss"] is None  # no eval data in this recipe
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((run / "samples.json").read_text())[0].keys() == {"prompt", "before", "after"}


def test_saved_adapter_reproduces_the_trained_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel

    recipe = _recipe(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.train.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, 0), recipe.lora, 0)
    build_trainer(recipe, model, tokenizer, data, build_sft_config(recipe, str(tmp_path / "ckpt"), False)).train()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("the dog likes food")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_base_model(recipe.model, recipe.quantization, 0), tmp_path / "adapter")
        reloaded.eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


def test_rerun_resumes_from_the_last_checkpoint_and_matches(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    recipe = _recipe(tmp_path, tiny_model_dir, train={"max_steps": 4, "logging_steps": 1}, output={"save_steps": 2})
    run_training(recipe, say=lambda *_: None)
    run = Path(recipe.output.dir)
    uninterrupted = load_file(run / "adapter" / "adapter_model.safetensors")

    # make it look like a run killed after its step-2 checkpoint
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    result = run_training(recipe, say=lambda *_: None)
    assert result.resumed_from is not None and result.resumed_from.name == "checkpoint-2"
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name], atol=1e-6), name


def test_padding_free_training_runs_with_the_same_supervised_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    losses = {}
    for padding_free in (False, True):
        folder = tmp_path / f"padding_free_{padding_free}"
        folder.mkdir()
        recipe = _recipe(
            folder, tiny_model_dir,
            train={"max_steps": 2, "logging_steps": 1, "padding_free": padding_free, "learning_rate": 1.0e-4},
        )
        result = run_training(recipe, say=lambda *_: None)
        records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        losses[padding_free] = ([r["loss"] for r in steps], steps[-1]["supervised_tokens"])
    (padded_losses, padded_tokens), (packed_losses, packed_tokens) = losses[False], losses[True]
    assert padded_tokens == packed_tokens
    # same examples per step, same loss normalisation: block-diagonal attention makes the losses agree
    assert padded_losses == pytest.approx(packed_losses, abs=2e-3)


@pytest.mark.parametrize(
    ("quantization", "lora"),
    [
        ({"mode": "int8", "double_quant": False}, {}),
        ({"mode": "none", "double_quant": False}, {}),
        ({"mode": "nf4"}, {"use_dora": True}),
        ({"mode": "nf4"}, {"use_rslora": True, "bias": "lora_only", "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}),
    ],
    ids=["int8", "unquantized", "nf4-dora", "nf4-rslora-bias-subset"],
)
def test_other_quantization_modes_and_lora_options_train(
    tmp_path: Path, tiny_model_dir: Path, quantization: dict, lora: dict
) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, quantization=quantization, lora=lora, train={"max_steps": 2})
    result = run_training(recipe, say=lambda *_: None)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)  # not NaN, not inf
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == lora.get("use_dora", False)
    assert config["use_rslora"] == lora.get("use_rslora", False)


CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there!"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "Fine, thanks."}]},
    {"messages": [{"role": "user", "content": "What do cows drink?"}, {"role": "assistant", "content": "water."}]},
]
ALPACA_ROWS = [{"instruction": "Name a color.", "input": "", "output": "blue."},
               {"instruction": "Add.", "input": "two plus two", "output": "four."}]


@pytest.mark.parametrize(
    ("fmt", "rows", "extra"),
    [
        ("messages", CHAT_ROWS * 3, {}),
        ("alpaca", ALPACA_ROWS * 3, {"template": "Q: {instruction} {input}\nA:"}),
        ("text", [{"text": "the dog likes food"}, {"text": "the cat likes milk"}] * 3, {"mask_prompt": False}),
        ("messages", CHAT_ROWS * 3, {"eval": {"split_ratio": 0.34}}),
    ],
    ids=["messages", "alpaca", "text", "messages-padding-free-with-eval"],
)
def test_every_format_trains_end_to_end(tmp_path: Path, tiny_model_dir: Path, fmt: str, rows: list, extra: dict) -> None:
    extra = dict(extra)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    template = extra.pop("template", None)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 3, "logging_steps": 1},
                       data={"max_length": 128, **extra})
    tree["data"]["train"]["format"] = fmt
    if template:
        tree["data"]["train"]["template"] = template
    if "eval" in extra:
        tree["train"].update(padding_free=True, eval_steps=2)
    result = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", tree)), say=lambda *_: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 3
    if "eval" in extra:
        assert any("eval_loss" in r and r["eval_loss"] == r["eval_loss"] for r in records)  # evaluated, not NaN
