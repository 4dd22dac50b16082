"""GPU checks (skipped without CUDA): the bf16 defaults, real CUDA 4-bit training, and a merge on the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

pytestmark = pytest.mark.gpu


def test_auto_compute_dtype_is_bf16_on_recent_gpus() -> None:
    from lora_causal.model.loading import resolve_compute_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_compute_dtype("auto") == expected


def test_training_on_the_gpu_changes_lora_weights_and_merges(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.serving.merging import merge_adapter
    from lora_causal.training.run import run_training

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 8, "learning_rate": 5.0e-3})
    result = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", tree)), say=lambda *_: None)
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert records[-1]["peak_mem_gib"] > 0
    report = merge_adapter(str(result.run_dir), str(tmp_path / "merged"), base="nf4-roundtrip", dtype_name="bfloat16",
                           say=lambda *_: None)
    assert report["vs_trained_4bit_adapter"]["top1_agreement"] > 0.95


def test_flash_varlen_kernel_is_exact_for_gqa_and_windows(tmp_path: Path, monkeypatch) -> None:
    """The real kernel (bf16, CUDA): packed sequences get the logits they get alone through sdpa."""
    from test_attention import COMMON, CONFIGS, SEQUENCES
    from transformers import AutoConfig, AutoModelForCausalLM

    import lora_causal.model.attention as attention
    from lora_causal.core.recipe import ModelSection, QuantizationSection
    from lora_causal.data.collator import CausalLMCollator
    from lora_causal.model.loading import load_base_model

    calls: list[dict] = []
    real_kernel = attention.call_kernel
    monkeypatch.setattr(attention, "call_kernel", lambda *a, **k: calls.append(k) or real_kernel(*a, **k))
    for name in ("llama", "mistral"):
        values = {**COMMON, **CONFIGS[name]}
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        quantization = QuantizationSection(mode="none", compute_dtype="bfloat16")
        reference = load_base_model(ModelSection(name_or_path=str(tmp_path / name)), quantization, 0).eval()
        varlen = load_base_model(ModelSection(name_or_path=str(tmp_path / name), attn_implementation="varlen"),
                                 quantization, 0).eval()
        batch = CausalLMCollator(pad_token_id=0, padding_free=True)([{"input_ids": ids} for ids in SEQUENCES])
        batch.pop("labels")
        calls.clear()
        with torch.no_grad():
            packed = varlen(**{k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}, use_cache=False).logits[0]
            bounds = batch["cu_seq_lens_q"].tolist()
            for ids, start, end in zip(SEQUENCES, bounds, bounds[1:]):
                alone = reference(input_ids=torch.tensor([ids], device="cuda")).logits[0]
                assert (packed[start:end].float() - alone.float()).abs().max() < 5e-2, name
        assert len(calls) == config.num_hidden_layers, "the flash kernel must serve every layer"
        window = getattr(config, "sliding_window", None)
        if "window_size" in attention.kernel_parameters():
            assert calls[0]["window_size"] == ((window - 1, 0) if window else (-1, 0))


def test_token_meter_adds_without_host_synchronisation() -> None:
    from lora_causal.training.metrics import TokenMeter

    meter = TokenMeter()
    labels = torch.tensor([[-100, 5, 6, -100]], device="cuda")
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long, device="cuda"), "labels": labels,
             "attention_mask": torch.tensor([[1, 1, 1, 0]], device="cuda")}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            meter.add(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (meter.tokens, meter.target_tokens, meter.padded) == (9, 6, 12)


def test_default_batching_on_this_gpu_is_padding_free_varlen(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.training.plan import resolve_plan

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run")))
    chosen = resolve_plan(recipe).batching
    capable = torch.cuda.get_device_capability(0) >= (8, 0)
    assert chosen.padding_free is capable and (chosen.attn_implementation == "varlen") is capable, chosen.line()
