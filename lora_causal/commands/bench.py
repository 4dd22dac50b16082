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
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_causal.commands.bench_arms import DEFAULT_ARMS, ArmResult, BenchSpec, synthetic_lengths
from lora_causal.core.errors import UserError
from lora_causal.core.rundir import library_versions
from lora_causal.data.dataset import padding_fraction

# dense bf16 TFLOP/s by device name, the more specific names first (PCIe and NVL cards run at lower clocks)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


# ---------------------------------------------------------------------------------------------------------
# Synthetic data


# ---------------------------------------------------------------------------------------------------------
# One arm, in its own process


def _arm_in_subprocess(spec: BenchSpec, timeout: int) -> ArmResult:
    """Run an arm in a fresh process (clean memory statistics, no state shared between arms)."""
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as folder:
        spec_file, result_file = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        try:
            process = subprocess.run(
                [sys.executable, "-m", "lora_causal.commands.bench_arms", str(spec_file), str(result_file)],
                capture_output=True, text=True, timeout=timeout, env=arm_environment(spec.arm, os.environ),
            )
        except subprocess.TimeoutExpired:
            return ArmResult(arm=spec.arm, ok=False, error=f"timed out after {timeout}s")
        if process.returncode != 0 or not result_file.is_file():
            tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
            return ArmResult(arm=spec.arm, ok=False, error=f"exit {process.returncode}: {tail[0][:300]}")
        return ArmResult(**json.loads(result_file.read_text()))


def arm_environment(arm: str, environ: dict[str, str] | Any) -> dict[str, str]:
    """The environment of an arm's process: this one's, but the stock arm runs without the allocator setting that
    `lora-causal` itself defaults to (core.processes.gpu_memory_defaults); a user's own setting reaches every arm."""
    from lora_causal.core.processes import without_our_allocator_default

    env = {**environ, "PYTHONUNBUFFERED": "1"}
    return without_our_allocator_default(env) if arm == "stock" else env


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
        "micro_batches_per_step": result.micro_batches_per_step,
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
    rows = ["| arm | tokens/s | supervised tokens/s | step s | micro-batches/step | peak alloc GiB | peak reserved GiB | "
            "peak RSS GiB | MFU | load s | first losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in report["arms"]:
        if not arm["ok"]:
            rows.append(f"| {arm['arm']} | failed: {arm['error']} | | | | | | | | | |")
            continue
        arm = {key: "-" if value is None else value for key, value in arm.items()}  # not measured here (CPU)
        rows.append(
            f"| {arm['arm']} | {arm['tokens_per_s']:,.0f} | {arm['supervised_tokens_per_s']:,.0f} | {arm['step_s']} | "
            f"{arm.get('micro_batches_per_step', '')} | "
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
    gaps = report.get("first_loss_gap_vs_stock")
    if gaps:
        plans.append("- largest difference of the first losses from stock's, step by step (same examples in each "
                     "step): " + ", ".join(f"{arm} {gap}" for arm, gap in gaps.items() if arm != "stock"))
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
    import io

    from lora_causal.core.rundir import write_bytes_atomic

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------
# The command


def prepare_model(shape: str, seed: int) -> tuple[Path, dict[str, int]]:
    """Random weights for a shape, saved once (cached), and its parameter counts."""
    from lora_causal.model.shapes import parameter_counts, write_shape_config
    from lora_causal.model.synthetic import materialize_random_model, train_tiny_tokenizer

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
    shape: str, out: Path, arms: tuple[str, ...] = DEFAULT_ARMS, micro_batch: int = 4, grad_accum: int = 4, steps: int = 20,
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
    from lora_causal.core.rundir import write_json_atomic, write_text_atomic

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
        plan = f", {results[-1]['batching']}" if results[-1].get("batching") else ""
        say(f"  {arm}: " + (f"{results[-1]['tokens_per_s']:,.0f} tokens/s{plan}" if results[-1]["ok"]
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
    if stock is not None and stock["first_losses"]:
        # every arm trains the same examples in each step (token-budget arms draw Trainer's own shuffle), so the
        # first losses compare step by step: the largest difference from stock's
        report["first_loss_gap_vs_stock"] = {
            arm["arm"]: round(max(abs(a - b) for a, b in zip(arm["first_losses"], stock["first_losses"])), 4)
            for arm in ok if arm["first_losses"]}
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
    from lora_causal.core.rundir import write_json_atomic, write_text_atomic

    write_json_atomic(out / "max_context.json", report)
    lines = [f"Longest single sequence that trains under {cap_gib} GiB, **{shape}**, {report['date']}:", "",
             "| arm | longest sequence (tokens) |", "| --- | --- |"]
    lines += [f"| {arm} | {value['longest']} |" for arm, value in found.items()]
    if lengths:
        lines += ["", f"Probed lengths only: {', '.join(map(str, sorted(lengths)))} (no bisection)."]
    write_text_atomic(out / "max_context.md", "\n".join(lines) + "\n")
    return report


