"""`train.padding_free: auto` / `model.attn_implementation: auto`: which batching and attention a run gets, and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QA_ROWS, base_recipe, run_cli, write_jsonl, write_recipe

from lora_causal.model.batching import AttentionNeeds, DeviceInfo, plan_batching
from lora_causal.training.plan import resolve_plan

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5))
CPU = DeviceInfo("cpu", "cpu")
KERNEL = frozenset({"scale", "window_size", "enable_gqa"})
OLD_KERNEL = frozenset({"scale", "is_causal", "enable_gqa"})
LLAMA = AttentionNeeds("llama")
MISTRAL = AttentionNeeds("mistral", sliding_window=4096)
GEMMA2 = AttentionNeeds("gemma2", softcap=50.0, sliding_window=4096)


def plan(device=H100, needs=LLAMA, dtype="bfloat16", padding_free="auto", attn="auto", kernel=KERNEL, **extra):
    return plan_batching(padding_free, attn, dtype, device, needs, kernel, **extra)


def test_cuda_default_is_padding_free_with_flash_varlen() -> None:
    chosen = plan()
    assert (chosen.padding_free, chosen.attn_implementation) == (True, "varlen")
    assert "Flash Attention kernel" in chosen.kernel and "H100" in chosen.reason
    assert plan(needs=MISTRAL).attn_implementation == "varlen"  # the window goes to the kernel


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"device": T4, "dtype": "float16"}, "compute capability 8.0+, this GPU has 7.5"),
        ({"dtype": "float32"}, "not float32"),
        ({"needs": GEMMA2}, "softcapping"),
        ({"needs": AttentionNeeds("llama", dropout=0.1)}, "dropout"),
        ({"needs": MISTRAL, "kernel": OLD_KERNEL}, "window_size"),
        ({"kernel": None}, "no torch.nn.attention.varlen"),
    ],
)
def test_cuda_falls_back_to_the_stock_path_and_says_why(kwargs, why) -> None:
    chosen = plan(**kwargs)
    assert (chosen.padding_free, chosen.attn_implementation) == (False, "auto")
    assert why in chosen.reason and why in chosen.line()


def test_cpu_default_is_padding_free_with_exact_varlen() -> None:
    for needs in (LLAMA, MISTRAL, GEMMA2):  # the exact path computes windows and softcapping itself
        chosen = plan(device=CPU, needs=needs, dtype="float32")
        assert (chosen.padding_free, chosen.attn_implementation, chosen.kernel) == (True, "varlen", "varlen, exact per-sequence")


def test_explicit_settings_are_honoured() -> None:
    assert (plan(padding_free=False).padding_free, plan(padding_free=False).attn_implementation) == (False, "auto")
    assert plan(padding_free=False).reason == "train.padding_free: false, the stock path"
    sdpa = plan(attn="sdpa")
    assert (sdpa.padding_free, sdpa.attn_implementation) == (False, "sdpa")
    packed_sdpa = plan(attn="sdpa", padding_free=True)
    assert (packed_sdpa.padding_free, packed_sdpa.attn_implementation) == (True, "sdpa")
    forced = plan(device=T4, dtype="float16", attn="varlen")  # asked for: exact path, and the line says why
    assert (forced.padding_free, forced.attn_implementation, forced.kernel) == (True, "varlen", "varlen, exact per-sequence")
    assert "7.5" in forced.reason
    packed_old_gpu = plan(device=T4, dtype="float16", padding_free=True)
    assert (packed_old_gpu.padding_free, packed_old_gpu.attn_implementation) == (True, "auto")
    assert plan(device=T4, dtype="float16", token_budget=True).padding_free is True
    assert plan(pad_to_multiple_of=True).padding_free is False


def test_models_without_custom_attention_keep_their_own() -> None:
    chosen = plan(needs=AttentionNeeds("remote", custom_attention=False))
    assert (chosen.padding_free, chosen.attn_implementation) == (False, "auto")
    assert "takes no custom attention function" in chosen.reason


def test_needs_are_read_from_real_configs() -> None:
    from transformers import AutoConfig

    gemma = AttentionNeeds.from_config(AutoConfig.for_model("gemma2", attn_logit_softcapping=50.0, sliding_window=64))
    assert (gemma.softcap, gemma.sliding_window, gemma.custom_attention) == (50.0, 64, True)
    qwen = AttentionNeeds.from_config(AutoConfig.for_model("qwen2", use_sliding_window=False))
    assert qwen.sliding_window is None  # the window is configured but off
    llama = AttentionNeeds.from_config(AutoConfig.for_model("llama"))
    assert (llama.softcap, llama.sliding_window, llama.dropout) == (None, None, 0.0)
    assert not AttentionNeeds.from_config(AutoConfig.for_model("llama"), trust_remote_code=True).custom_attention


def test_validate_says_which_batching(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.core.recipe_file import load_recipe

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    recipe_path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    assert resolve_plan(load_recipe(recipe_path), device=CPU).batching.padding_free is True
    result = run_cli("validate", str(recipe_path))
    assert result.returncode == 0, result.stderr
    assert "# batching: padding-free rows, attention: varlen, exact per-sequence (on the CPU" in result.stdout
    stock = run_cli("validate", str(recipe_path), "train.padding_free=false")
    assert "# batching: padded batches, attention: the model's default (train.padding_free: false" in stock.stdout
