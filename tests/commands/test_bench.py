"""The benchmark runs on the CPU, reports every field, and both arms train the same tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, call_cli

from lora_causal.commands.bench import flops_per_token, run_bench, run_max_context
from lora_causal.commands.bench_arms import synthetic_lengths
from lora_causal.data.dataset import padding_fraction


def test_synthetic_lengths_are_seeded_clipped_and_centred() -> None:
    lengths = synthetic_lengths(4000, median=512, sigma=0.7, max_length=2048, seed=3)
    assert lengths == synthetic_lengths(4000, median=512, sigma=0.7, max_length=2048, seed=3)
    assert min(lengths) >= 16 and max(lengths) == 2048
    assert 470 < sorted(lengths)[len(lengths) // 2] < 555


def test_padding_fraction_by_hand() -> None:
    assert padding_fraction([2, 4, 3, 3], batch_size=2) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([2, 4, 3, 3], batch_size=2, multiple=8) == pytest.approx(1 - 12 / 32)


def test_flops_per_token_for_8b_counts_attention_forward_and_backward(tmp_path: Path) -> None:
    from lora_causal.model.shapes import parameter_counts, write_shape_config

    counts = parameter_counts(write_shape_config("llama-3.1-8b", tmp_path))
    assert 7.4e9 < counts["matmul"] < 7.6e9
    attention = 4 * 32 * 4096 * 256  # QK^T and AV forward at a mean context of 256, for 32 layers of width 4096
    assert flops_per_token(counts, mean_context=256) == 4 * counts["matmul"] + 3 * attention  # backward = 2x forward
    assert 30e9 < flops_per_token(counts, mean_context=256) < 32e9


def test_peak_flops_tell_sxm_from_pcie() -> None:
    from lora_causal.commands.bench import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("Tesla T4") is None


ARMS = ("stock", "lora_causal", "lora_causal+padded", "lora_causal+packed_sdpa", "lora_causal+no_checkpointing",
        "lora_causal+no_budget")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One CPU bench of every lever arm against stock (each arm in its own process), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    report = run_bench("tiny", out, arms=ARMS, steps=4, warmup=1, micro_batch=2, grad_accum=2, median=64,
                       max_length=128, say=lambda *_: None, profile=True)
    return report, out


@pytest.mark.slow
def test_cpu_smoke_run_reports_and_both_arms_see_the_same_tokens(tiny_bench) -> None:
    report, out = tiny_bench
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md", "bench.png"}
    saved = json.loads((out / "bench.json").read_text())
    assert saved["shape"] == "tiny" and saved["date"] and saved["hardware"]["cpu_count"] >= 1
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(saved["versions"])
    arms = {arm["arm"]: arm for arm in report["arms"]}
    stock, ours = arms["stock"], arms["lora_causal"]
    assert stock["ok"] and ours["ok"]
    for arm in (stock, ours):
        assert arm["tokens_per_s"] > 0 and arm["supervised_tokens_per_s"] > 0 and arm["step_s"] > 0
        assert arm["peak_rss_gib"] > 0 and arm["load_s"] > 0 and arm["measured_steps"] == 3
        assert len(arm["first_losses"]) == 4
    assert 0 < stock["padding_share"] < 1 and ours["padding_share"] == 0.0  # the CPU default packs rows
    assert "padding-free rows" in ours["batching"] and stock["batching"] == ""
    assert report["same_tokens"] is True
    assert stock["tokens_total"] == ours["tokens_total"] == sum(synthetic_lengths(16, 64, 0.7, 128, 0))
    # same model, same examples in every step (the token budget draws Trainer's shuffle): the same losses
    assert stock["first_losses"] == pytest.approx(ours["first_losses"], abs=1e-3)
    assert report["first_loss_gap_vs_stock"]["lora_causal"] < 1e-3
    # 4 examples per step of at most 128 tokens, in as few micro-batches of the default budget (2 x 128) as hold them
    from lora_causal.data.budget_steps import BudgetSteps

    rounds = BudgetSteps(synthetic_lengths(16, 64, 0.7, 128, 0), 4, 256, 1, seed=0, epochs=1).rounds
    assert stock["micro_batches_per_step"] == 2 and ours["micro_batches_per_step"] == rounds
    speedup = report["speedup_vs_stock"]
    assert speedup["stock"] == 1.0  # the ratio of each arm's measured tokens/s to stock's, not just any positive number
    assert speedup["lora_causal"] == pytest.approx(ours["tokens_per_s"] / stock["tokens_per_s"], abs=1e-3)
    assert "| lora_causal |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_lever_arms_train_the_same_tokens_as_stock(tiny_bench) -> None:
    report, out = tiny_bench
    assert [arm["arm"] for arm in report["arms"]] == list(ARMS) and all(arm["ok"] for arm in report["arms"])
    assert report["same_tokens"] is True
    arms = {arm["arm"]: arm for arm in report["arms"]}
    padded = [arms["stock"], arms["lora_causal+padded"]]
    packed = [arms["lora_causal+packed_sdpa"], arms["lora_causal+no_checkpointing"], arms["lora_causal+no_budget"]]
    assert arms["lora_causal+no_budget"]["micro_batches_per_step"] == 2
    assert all(arm["padding_share"] == 0.0 for arm in packed) and all(arm["padding_share"] > 0 for arm in padded)
    assert "sdpa, block-diagonal mask" in arms["lora_causal+packed_sdpa"]["batching"]
    for arm in ARMS:  # the last warm-up step of each arm, profiled
        table = (out / f"profile-{arm}.txt").read_text()
        assert f"{arm}, tiny, step 0:" in table and "Self CPU" in table and "aten::" in table
    first = arms["stock"]["first_losses"][0]
    assert all(arm["first_losses"][0] == pytest.approx(first, abs=1e-3) for arm in packed)  # exact packing


@pytest.mark.slow
def test_max_context_bisects_under_a_memory_cap(tmp_path: Path) -> None:
    roomy = run_max_context("tiny", tmp_path / "roomy", cap_gib=100.0, arms=("lora_causal",), high=512, say=lambda *_: None)
    assert roomy["arms"]["lora_causal"]["longest"] == 512  # doubled up to the highest length asked for
    assert [p["length"] for p in roomy["arms"]["lora_causal"]["probes"]] == [256, 512]
    probed = run_max_context("tiny", tmp_path / "probed", cap_gib=100.0, arms=("lora_causal",), lengths=[300, 700],
                             say=lambda *_: None)
    assert probed["arms"]["lora_causal"]["longest"] == 700
    assert [p["length"] for p in probed["arms"]["lora_causal"]["probes"]] == [300, 700]
    tight = run_max_context("tiny", tmp_path / "tight", cap_gib=0.01, arms=("lora_causal",), high=768, say=lambda *_: None)
    assert tight["arms"]["lora_causal"]["longest"] is None
    assert (tmp_path / "tight" / "max_context.md").is_file()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--arms", "stock,fast"], r"--arms: unknown arm fast"),
        (["--arms", "stock,lora_causal,stock"], r"--arms: stock is named twice"),
        (["--steps", "3", "--warmup", "3"], r"--warmup \(3\) must be smaller than --steps \(3\)"),
        (["--shape", "gpt-9"], r"--shape: 'gpt-9' is neither a named shape"),
        (["--micro-batch", "0"], r"--micro-batch must be at least 1"),
        (["--max-context", "--context-lengths", "8k,16k"], r"--context-lengths: '8k,16k' is not a comma-separated list"),
    ],
)
def test_bad_bench_arguments(args: list[str], pattern: str, tmp_path: Path, capfd) -> None:
    capfd.readouterr()
    code = call_cli(["bench", "--out", str(tmp_path / "b"), *args])
    out, err = capfd.readouterr()
    assert_one_line_error(code, err, pattern, out)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("model_type", ["vit", "t5", "clip_text_model"])
def test_shape_that_is_not_a_causal_lm_is_one_line(model_type: str, tmp_path: Path, capfd) -> None:
    """A config.json AutoModelForCausalLM cannot build: one error line, exit 2, no traceback, nothing written."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path / "cfg")
    capfd.readouterr()
    code = call_cli(["bench", "--out", str(tmp_path / "b"), "--shape", str(tmp_path / "cfg" / "config.json")])
    out, err = capfd.readouterr()
    assert_one_line_error(code, err, rf"--shape: '.*config\.json' is a {model_type} config, which is not a causal "
                                     r"language model", out)
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_only_the_stock_arm_runs_without_lora_causals_allocator_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_causal.core.processes import gpu_memory_defaults
    from lora_causal.commands.bench import arm_environment

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LORA_CAUSAL_DEFAULT_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so what gpu_memory_defaults sets is undone after the test
        monkeypatch.delenv(name)
    gpu_memory_defaults()  # what `lora-causal bench` does at its entry
    assert arm_environment("lora_causal", os.environ)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in arm_environment("stock", os.environ)
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}  # a user's own setting reaches every arm
    assert arm_environment("stock", mine)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
