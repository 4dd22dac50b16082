"""GPU checks (skipped without CUDA): the bf16 defaults, real CUDA 4-bit training, and a merge on the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

pytestmark = pytest.mark.gpu


def test_auto_compute_dtype_is_bf16_on_recent_gpus() -> None:
    from lora_causal.model import resolve_compute_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_compute_dtype("auto") == expected


def test_training_on_the_gpu_changes_lora_weights_and_merges(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.config import load_recipe
    from lora_causal.merge import merge_adapter
    from lora_causal.train import run_training

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 4)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 8, "learning_rate": 5.0e-3})
    result = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", tree)), say=lambda *_: None)
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert records[-1]["peak_mem_gib"] > 0
    report = merge_adapter(str(result.run_dir), str(tmp_path / "merged"), base="nf4-roundtrip", dtype_name="bfloat16",
                           say=lambda *_: None)
    assert report["vs_trained_4bit_adapter"]["top1_agreement"] > 0.95
