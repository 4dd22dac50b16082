"""`lora-causal bench`: memory and speed of this project's defaults against the stock Hugging Face QLoRA setup.

Every arm runs in its own process on the same synthetic examples, the same examples per optimizer step, and
is measured by the same code: non-pad and supervised tokens/s, step time, peak memory, MFU, the first losses
and the load time. The stock arm is what the TRL and peft docs show: a BitsAndBytesConfig NF4 model, a
LoraConfig passed to SFTTrainer, TRL's own collator and defaults.

FLOPs per token (for MFU) = 4 * N_matmul + 12 * layers * hidden * mean_context, where N_matmul counts every
weight a token is multiplied through (lm_head included). The base is frozen, so the backward pass computes
activation gradients (2N) but no weight gradients; recomputation by gradient checkpointing is not counted
(these are model FLOPs, not hardware FLOPs). The attention term is causal QK^T and AV: 4 * hidden * context
forward, twice that backward (gradients of Q, K and V all flow back to the adapters).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_causal.data import padding_fraction
from lora_causal.errors import UserError, first_line
from lora_causal.rundir import library_versions

# lora_causal arms: exactly the project's defaults (`auto` batching: padding-free + varlen where exact), then one
# change each on top of them, for comparison.
LEVERS: dict[str, dict[str, Any]] = {
    "lora_causal": {},
    # the stock batching (padded rows, the model's own attention) with our collator and adapter settings
    "lora_causal+padded": {"train": {"padding_free": False}},
    # packed rows, but the model's sdpa with the block-diagonal mask transformers builds from position_ids
    "lora_causal+packed_sdpa": {"train": {"padding_free": True}, "model": {"attn_implementation": "sdpa"}},
    # no recomputation in the backward pass: faster where memory allows
    "lora_causal+no_checkpointing": {"train": {"gradient_checkpointing": False}},
    # for --max-context: activations parked in CPU memory between forward and backward (GPU only)
    "lora_causal+offload": {"train": {"activation_offloading": True}},
}
ARMS = ("stock", *LEVERS)
DEFAULT_ARMS = ("stock", "lora_causal")
# dense bf16 TFLOP/s by device name, the more specific names first (PCIe and NVL cards run at lower clocks)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass
class BenchSpec:
    """Everything one arm needs; the same spec (but the arm) goes to every arm."""

    arm: str
    model_dir: str  # random weights, saved once
    shape: str
    lengths: list[int]  # one synthetic example per entry, in training order
    vocab: int
    micro_batch: int
    grad_accum: int
    steps: int
    warmup: int
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    max_context: int | None = None  # probe: one sequence of this length, one step
    profile_step: int | None = None  # profile this optimizer step (0-based) with torch.profiler


@dataclass
class ArmResult:
    arm: str
    ok: bool = True
    error: str | None = None
    load_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # non-pad tokens per optimizer step
    target_tokens: list[int] = field(default_factory=list)
    padded_tokens: list[int] = field(default_factory=list)  # positions computed, padding included
    losses: list[float] = field(default_factory=list)
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_rss_gib: float = 0.0
    device: str = ""
    batching: str = ""  # the plan line of lora_causal arms
    profile: str = ""  # torch.profiler's table of the profiled step, top kernels by time


# ---------------------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_lengths(count: int, median: int, sigma: float, max_length: int, seed: int, min_length: int = 16) -> list[int]:
    """Example lengths drawn from a lognormal (given median and sigma), clipped to [min_length, max_length]."""
    rng = random.Random(seed)
    return [max(min_length, min(max_length, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(count)]


def synthetic_examples(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (ids below 16 avoided: they tend to be special tokens)."""
    rng = random.Random(seed + 1)
    low = min(16, vocab - 1)
    return [[rng.randrange(low, vocab) for _ in range(length)] for length in lengths]


# ---------------------------------------------------------------------------------------------------------
# One arm, in its own process


def _timing_callback(result: ArmResult, meter: Any, profile_step: int | None = None) -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.perf_counter()
            self.tokens = self.targets = self.padded = 0
            self.profiler: Any = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if profile_step is not None and state.global_step == profile_step:
                self.profiler = _start_profiler()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self.profiler is not None:
                result.profile = _stop_profiler(self.profiler)
                self.profiler = None
            now = time.perf_counter()
            result.step_s.append(now - self.last)
            result.tokens.append(meter.tokens - self.tokens)
            result.target_tokens.append(meter.target_tokens - self.targets)
            result.padded_tokens.append(meter.padded - self.padded)
            self.last, self.tokens, self.targets, self.padded = now, meter.tokens, meter.target_tokens, meter.padded

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

    return StepTimer()


def _start_profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def _stop_profiler(profiler: Any, rows: int = 20) -> str:
    """The profiled step's top operators by self time on the device (the CPU without one)."""
    import torch

    profiler.__exit__(None, None, None)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def _stock_args(spec: BenchSpec, output_dir: str) -> Any:
    import torch
    from trl import SFTConfig

    on_cpu = not torch.cuda.is_available()
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=spec.micro_batch, gradient_accumulation_steps=spec.grad_accum,
        max_steps=spec.steps, logging_steps=1, save_strategy="no", report_to="none", seed=spec.seed,
        learning_rate=2e-4, disable_tqdm=True, use_cpu=on_cpu, dataloader_pin_memory=not on_cpu,
    )
    # TRL defaults as documented, except: max_length covers the data (TRL's default 1024 would silently cut the
    # stock arm's examples, and the arms must train the same tokens), and bf16 is off on a CPU (TRL refuses it).
    return SFTConfig(**common, max_length=max(spec.lengths), **({"bf16": False} if on_cpu else {}))


def _run_stock(spec: BenchSpec, examples: list[list[int]], result: ArmResult, workdir: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora_causal.metrics import TokenMeter
    from lora_causal.trainer import trainer_class

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    start = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, quantization_config=bnb, dtype=compute,
                                                 device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    meter = TokenMeter()
    trainer = trainer_class()(
        meter=meter, model=model, args=_stock_args(spec, workdir),
        train_dataset=Dataset.from_dict({"input_ids": examples}), peft_config=peft_config,
        processing_class=AutoTokenizer.from_pretrained(spec.model_dir),
        callbacks=[_timing_callback(result, meter, spec.profile_step)],
    )
    result.load_s = time.perf_counter() - start
    trainer.train()


def _run_lora_causal(spec: BenchSpec, examples: list[list[int]], result: ArmResult, workdir: str) -> None:
    from lora_causal.batching import apply_plan, plan_for_recipe
    from lora_causal.config import Recipe
    from lora_causal.data import DataReport, PreparedData
    from lora_causal.metrics import TokenMeter
    from lora_causal.model import attach_lora, load_base_model, load_tokenizer
    from lora_causal.trainer import build_sft_config, build_trainer

    lever = LEVERS[spec.arm]
    recipe = Recipe.model_validate({
        "recipe_version": 1,
        "model": {"name_or_path": spec.model_dir, **lever.get("model", {})},
        "lora": {"r": spec.lora_r, "alpha": spec.lora_alpha},
        "data": {"train": {"path": "synthetic.jsonl", "format": "text"}, "max_length": max(spec.lengths)},
        "train": {"max_steps": spec.steps, "micro_batch_size": spec.micro_batch, "gradient_accumulation": spec.grad_accum,
                  "learning_rate": 2e-4, "logging_steps": 1, "seed": spec.seed, "warmup_ratio": 0.0,
                  "lr_scheduler": "linear", **lever.get("train", {})},
        "output": {"dir": workdir, "save_steps": 10**9},
    })
    plan = plan_for_recipe(recipe)  # what `lora-causal train` would run here
    result.batching = plan.line()
    recipe = apply_plan(recipe, plan)
    start = time.perf_counter()
    tokenizer = load_tokenizer(recipe.model)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, spec.seed), recipe.lora, spec.seed)
    data = PreparedData(train=[{"input_ids": ids, "prompt_length": 0} for ids in examples], eval=None,
                        train_report=DataReport(), eval_report=None, fingerprint="synthetic")
    args = build_sft_config(recipe, workdir, has_eval=False)
    args.save_strategy, args.disable_tqdm = "no", True
    meter = TokenMeter()
    trainer = build_trainer(recipe, model, tokenizer, data, args, meter=meter,
                            callbacks=[_timing_callback(result, meter, spec.profile_step)])
    result.load_s = time.perf_counter() - start  # like the stock arm: model, adapter and trainer ready
    trainer.train()


def run_arm(spec: BenchSpec) -> ArmResult:
    """Train one arm on the spec's examples and measure it (in this process)."""
    import torch

    from lora_causal.metrics import peak_rss_gib

    result = ArmResult(arm=spec.arm, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu")
    examples = synthetic_examples(spec.lengths, spec.vocab, spec.seed)
    runner = _run_stock if spec.arm == "stock" else _run_lora_causal
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec.arm}-") as workdir:
        try:
            runner(spec, examples, result, workdir)
        except torch.OutOfMemoryError as exc:
            result.ok, result.error = False, f"out of memory: {first_line(exc)}"
    if torch.cuda.is_available():
        result.peak_allocated_gib = torch.cuda.max_memory_allocated() / 2**30
        result.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    result.peak_rss_gib = peak_rss_gib()
    return result


def _arm_in_subprocess(spec: BenchSpec, timeout: int) -> ArmResult:
    """Run an arm in a fresh process (clean memory statistics, no state shared between arms)."""
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as folder:
        spec_file, result_file = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        try:
            process = subprocess.run(
                [sys.executable, "-m", "lora_causal.bench", str(spec_file), str(result_file)],
                capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except subprocess.TimeoutExpired:
            return ArmResult(arm=spec.arm, ok=False, error=f"timed out after {timeout}s")
        if process.returncode != 0 or not result_file.is_file():
            tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
            return ArmResult(arm=spec.arm, ok=False, error=f"exit {process.returncode}: {tail[0][:300]}")
        return ArmResult(**json.loads(result_file.read_text()))


# ---------------------------------------------------------------------------------------------------------
# Summaries


def flops_per_token(counts: dict[str, int], mean_context: float) -> float:
    """Model FLOPs per trained token: matmuls forward + activation gradients, attention forward + backward."""
    return 4 * counts["matmul"] + 12 * counts["layers"] * counts["hidden"] * mean_context


def peak_tflops(device: str) -> float | None:
    return next((value for name, value in PEAK_TFLOPS.items() if name in device), None)


def summarise(result: ArmResult, warmup: int, counts: dict[str, int], mean_context: float) -> dict[str, Any]:
    """Throughput over the steps after warm-up, memory, MFU and the first losses of one arm."""
    if not result.ok:
        return {"arm": result.arm, "ok": False, "error": result.error}
    measured = slice(min(warmup, max(len(result.step_s) - 1, 0)), None)
    seconds = sum(result.step_s[measured]) or float("nan")
    tokens, targets = sum(result.tokens[measured]), sum(result.target_tokens[measured])
    tokens_per_s = tokens / seconds
    peak = peak_tflops(result.device)
    mfu = tokens_per_s * flops_per_token(counts, mean_context) / (peak * 1e12) if peak else None
    return {
        "arm": result.arm, "ok": True, "device": result.device, "batching": result.batching,
        "load_s": round(result.load_s, 2),
        "measured_steps": len(result.step_s[measured]),
        "step_s": round(seconds / max(len(result.step_s[measured]), 1), 4),
        "tokens_per_s": round(tokens_per_s, 1), "supervised_tokens_per_s": round(targets / seconds, 1),
        "peak_allocated_gib": _round(result.peak_allocated_gib), "peak_reserved_gib": _round(result.peak_reserved_gib),
        "peak_rss_gib": _round(result.peak_rss_gib), "mfu": _round(mfu, 4),
        "tokens_total": sum(result.tokens), "supervised_tokens_total": sum(result.target_tokens),
        "padding_share": round(1 - sum(result.tokens) / max(sum(result.padded_tokens), 1), 4),
        "first_losses": [round(loss, 4) for loss in result.losses[:5]],
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| arm | tokens/s | supervised tokens/s | step s | peak alloc GiB | peak reserved GiB | peak RSS GiB | MFU | load s | first losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in report["arms"]:
        if not arm["ok"]:
            rows.append(f"| {arm['arm']} | failed: {arm['error']} | | | | | | | | |")
            continue
        rows.append(
            f"| {arm['arm']} | {arm['tokens_per_s']:,.0f} | {arm['supervised_tokens_per_s']:,.0f} | {arm['step_s']} | "
            f"{arm['peak_allocated_gib']} | {arm['peak_reserved_gib']} | {arm['peak_rss_gib']} | {arm['mfu']} | "
            f"{arm['load_s']} | {', '.join(map(str, arm['first_losses']))} |"
        )
    data = report["data"]
    head = (f"**{report['shape']}** on {report['hardware'].get('gpu', report['hardware']['cpu'])}, {report['date']}: "
            f"{data['examples']} examples, lengths lognormal median {data['median']} (sigma {data['sigma']}, max "
            f"{data['max_length']}, mean {data['mean_length']:.0f}), micro-batch {data['micro_batch']} x accumulation "
            f"{data['grad_accum']}, {report['steps']} steps ({report['warmup']} warm-up), padding share at this "
            f"batch size {data['padding_share']:.1%}.")
    plans = [f"- {arm['arm']}: {arm['batching']}" for arm in report["arms"] if arm.get("batching")]
    return head + "\n\n" + "\n".join(rows) + "\n" + ("\n" + "\n".join(plans) + "\n" if plans else "")


def chart_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in report["arms"] if arm["ok"]]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    names = [arm["arm"] for arm in arms]
    colours = ["#888" if name == "stock" else "#3a7d44" for name in names]
    speed.bar(names, [arm["tokens_per_s"] for arm in arms], color=colours)
    speed.set_title("non-pad tokens/s (higher is better)")
    memory.bar(names, [arm["peak_allocated_gib"] or arm["peak_rss_gib"] for arm in arms], color=colours)
    for axes in (speed, memory):
        axes.tick_params(axis="x", labelrotation=15, labelsize=8)
    memory.set_title("peak GPU allocated GiB" if arms and arms[0]["peak_allocated_gib"] is not None else "peak RSS GiB")
    figure.suptitle(f"{report['shape']} on {report['hardware'].get('gpu', report['hardware']['cpu'])}")
    figure.tight_layout()
    from lora_causal.rundir import write_bytes_atomic
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------
# The command


def prepare_model(shape: str, seed: int) -> tuple[Path, dict[str, int]]:
    """Random weights for a shape, saved once (cached), and its parameter counts."""
    from lora_causal.shapes import parameter_counts, write_shape_config
    from lora_causal.synthetic import materialize_random_model, train_tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-shape-") as folder:
        config_dir = write_shape_config(shape, Path(folder))
        counts = parameter_counts(config_dir)
        import torch

        weights = materialize_random_model(config_dir, seed=seed, device="cuda" if torch.cuda.is_available() else "cpu")
    if not (weights / "tokenizer.json").is_file():  # the trainers need a tokenizer; synthetic ids need no real one
        tokenizer = train_tiny_tokenizer(["synthetic benchmark text"], vocab_size=300)
        tokenizer.save_pretrained(weights)
    return weights, counts


def run_bench(  # noqa: PLR0913
    shape: str, out: Path, arms: tuple[str, ...] = DEFAULT_ARMS, micro_batch: int = 4, grad_accum: int = 1, steps: int = 20,
    warmup: int = 3, median: int = 512, sigma: float = 0.7, max_length: int = 2048, seed: int = 0,
    timeout: int = 3600, say: Any = print, command: str = "", profile: bool = False,
) -> dict[str, Any]:
    """Benchmark the arms on one shape; write bench.json, bench.md and bench.png into `out`.

    bench.json and bench.md are rewritten after every arm, so a run stopped part-way keeps what it measured. With
    `profile`, the last warm-up step of each arm is profiled into profile-ARM.txt (top operators by device time).
    """
    if warmup >= steps:
        raise UserError(f"--warmup ({warmup}) must be smaller than --steps ({steps})")
    weights, counts = prepare_model(shape, seed)
    out.mkdir(parents=True, exist_ok=True)
    max_length = min(max_length, counts["max_positions"])
    lengths = synthetic_lengths(steps * micro_batch * grad_accum, median, sigma, max_length, seed)
    mean_context = sum(lengths) / len(lengths) / 2  # a token attends to half its sequence on average (causal)
    from lora_causal.rundir import write_json_atomic, write_text_atomic

    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for arm in arms:
        say(f"running arm {arm} ({steps} steps of {micro_batch} x {grad_accum} examples)")
        spec = BenchSpec(arm=arm, model_dir=str(weights), shape=shape, lengths=lengths, vocab=counts["vocab"],
                         micro_batch=micro_batch, grad_accum=grad_accum, steps=steps, warmup=warmup, seed=seed,
                         profile_step=max(warmup - 1, 0) if profile else None)
        result = _arm_in_subprocess(spec, timeout)
        if result.profile:
            write_text_atomic(out / f"profile-{arm}.txt", f"{arm}, {shape}, step {spec.profile_step}:\n{result.profile}")
        results.append(summarise(result, warmup, counts, mean_context))
        say(f"  {arm}: " + (f"{results[-1]['tokens_per_s']:,.0f} tokens/s, {results[-1]['batching']}" if results[-1]["ok"]
                             else f"failed: {results[-1]['error']}"))
        report = _bench_report(shape, command, counts, mean_context, steps, warmup, lengths, median, sigma, max_length,
                               micro_batch, grad_accum, seed, results)
        write_json_atomic(out / "bench.json", report)
        write_text_atomic(out / "bench.md", markdown_table(report))
    chart_png(report, out / "bench.png")
    return report


def _bench_report(  # noqa: PLR0913
    shape: str, command: str, counts: dict[str, int], mean_context: float, steps: int, warmup: int, lengths: list[int],
    median: int, sigma: float, max_length: int, micro_batch: int, grad_accum: int, seed: int,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    report = {
        "shape": shape, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "hardware": hardware(), "versions": library_versions(), "parameters": counts,
        "flops_per_token": flops_per_token(counts, mean_context), "steps": steps, "warmup": warmup,
        "data": {"examples": len(lengths), "median": median, "sigma": sigma, "max_length": max_length,
                 "mean_length": sum(lengths) / len(lengths), "micro_batch": micro_batch, "grad_accum": grad_accum,
                 "padding_share": padding_fraction(lengths, micro_batch), "seed": seed},
        "arms": results,
    }
    ok = [arm for arm in results if arm["ok"]]
    stock = next((arm for arm in ok if arm["arm"] == "stock"), None)
    if stock is not None and stock["tokens_per_s"]:
        report["speedup_vs_stock"] = {arm["arm"]: round(arm["tokens_per_s"] / stock["tokens_per_s"], 3) for arm in ok}
        if stock["peak_allocated_gib"]:
            report["memory_vs_stock"] = {arm["arm"]: round(arm["peak_allocated_gib"] / stock["peak_allocated_gib"], 3) for arm in ok}
    if len(ok) > 1:
        report["same_tokens"] = len({(arm["tokens_total"], arm["supervised_tokens_total"]) for arm in ok}) == 1
    return report


def run_max_context(  # noqa: PLR0913
    shape: str, out: Path, cap_gib: float, arms: tuple[str, ...] = DEFAULT_ARMS, low: int = 256, high: int | None = None,
    step: int = 256, seed: int = 0, timeout: int = 3600, say: Any = print, command: str = "",
    lengths: list[int] | None = None,
) -> dict[str, Any]:
    """Bisect, per arm, the longest single sequence whose training step fits under `cap_gib` (GPU allocated, or
    peak RSS on a CPU); write max_context.json and .md into `out`. With `lengths`, probe just those lengths
    (longest fitting one reported), which takes a few probes instead of a whole bisection."""
    weights, counts = prepare_model(shape, seed)
    out.mkdir(parents=True, exist_ok=True)
    high = min(high or counts["max_positions"], counts["max_positions"])
    found: dict[str, Any] = {}
    for arm in arms:
        probes: list[dict[str, Any]] = []

        def fits(length: int, arm: str = arm, probes: list = probes) -> bool:
            spec = BenchSpec(arm=arm, model_dir=str(weights), shape=shape, lengths=[length], vocab=counts["vocab"],
                             micro_batch=1, grad_accum=1, steps=1, warmup=0, seed=seed, max_context=length)
            result = _arm_in_subprocess(spec, timeout)
            peak = result.peak_allocated_gib if result.peak_allocated_gib is not None else result.peak_rss_gib
            ok = result.ok and peak <= cap_gib
            probes.append({"length": length, "ok": ok, "peak_gib": _round(peak), "error": result.error})
            say(f"  {arm}: {length} tokens -> {'fits' if ok else 'does not fit'} ({_round(peak)} GiB)")
            return ok

        best = None
        lo, hi = low // step, high // step  # bisect over multiples of `step`
        if lengths:
            best = max((length for length in sorted(lengths) if length <= high and fits(length)), default=None)
        elif fits(lo * step):
            best = lo * step
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(mid * step):
                    lo, best = mid, mid * step
                else:
                    hi = mid - 1
        found[arm] = {"longest": best, "probes": probes}
    report = {"shape": shape, "cap_gib": cap_gib, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "hardware": hardware(), "versions": library_versions(), "arms": found,
              "search": {"lengths": sorted(lengths)} if lengths else {"low": low, "high": high, "step": step}}
    from lora_causal.rundir import write_json_atomic, write_text_atomic

    write_json_atomic(out / "max_context.json", report)
    lines = [f"Longest single sequence that trains under {cap_gib} GiB, **{shape}**, {report['date']}:", "",
             "| arm | longest sequence (tokens) |", "| --- | --- |"]
    lines += [f"| {arm} | {value['longest']} |" for arm, value in found.items()]
    if lengths:
        lines += ["", f"Probed lengths only: {', '.join(map(str, sorted(lengths)))} (no bisection)."]
    write_text_atomic(out / "max_context.md", "\n".join(lines) + "\n")
    return report


def main_worker(argv: list[str]) -> int:
    """`python -m lora_causal.bench SPEC.json RESULT.json`: run one arm, write its measurements."""
    spec = BenchSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_arm(spec)
    Path(argv[1]).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    raise SystemExit(main_worker(sys.argv[1:]))
