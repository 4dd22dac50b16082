"""One benchmark arm, run in a process of its own: the stock Hugging Face QLoRA setup or this project's defaults.

The stock arm is what the TRL and peft docs show: a BitsAndBytesConfig NF4 model, a LoraConfig passed to
SFTTrainer, TRL's own collator and defaults. The lora_causal arms run the project's own trainer, with one lever
changed each (`LEVERS`). Both train the same synthetic examples and are timed by the same callback.
`python -m lora_causal.commands.bench_arms SPEC.json RESULT.json` runs one arm and writes its measurements.
"""


from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_causal.core.errors import first_line

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
    # micro-batches of micro_batch_size examples (the default before token budgets): what the budget buys
    "lora_causal+no_budget": {"train": {"token_budget": False}},
    # twice the default token budget (2 x micro_batch_size x max_length): does a bigger budget pay, and fit?
    "lora_causal+budget_x2": {"budget_factor": 2},
    # Liger's fused RMSNorm, RoPE and SwiGLU kernels through TRL's use_liger_kernel (needs liger-kernel and a GPU)
    "lora_causal+liger": {"sft": {"use_liger_kernel": True}},
    # for --max-context: both (Liger's fused norm and SwiGLU cut the recomputed layer's peak, offloading the rest)
    "lora_causal+offload_liger": {"train": {"activation_offloading": True}, "sft": {"use_liger_kernel": True}},
}


ARMS = ("stock", *LEVERS)


DEFAULT_ARMS = ("stock", "lora_causal")


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
    micro_batches_per_step: int = 0  # per process: gradient accumulation as the trainer ran it
    profile: str = ""  # torch.profiler's table of the profiled step, top kernels by time


def synthetic_lengths(count: int, median: int, sigma: float, max_length: int, seed: int, min_length: int = 16) -> list[int]:
    """Example lengths drawn from a lognormal (given median and sigma), clipped to [min_length, max_length]."""
    rng = random.Random(seed)
    return [max(min_length, min(max_length, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(count)]


def synthetic_examples(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (ids below 16 avoided: they tend to be special tokens)."""
    rng = random.Random(seed + 1)
    low = min(16, vocab - 1)
    return [[rng.randrange(low, vocab) for _ in range(length)] for length in lengths]


def _timing_callback(result: ArmResult, meter: Any, profile_step: int | None = None) -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.perf_counter()
            self.tokens = self.targets = self.padded = 0
            self.profiler: Any = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            result.micro_batches_per_step = int(args.gradient_accumulation_steps)
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

    from lora_causal.training.metrics import TokenMeter
    from lora_causal.training.trainer import trainer_class

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
    from lora_causal.core.recipe import Recipe
    from lora_causal.data.dataset import DataReport, PreparedData
    from lora_causal.model.loading import attach_lora, load_base_model, load_tokenizer
    from lora_causal.training.metrics import TokenMeter
    from lora_causal.training.plan import resolve_plan
    from lora_causal.training.trainer import build_sft_config, build_trainer

    lever = LEVERS[spec.arm]
    recipe = Recipe.model_validate({
        "recipe_version": 1,
        "model": {"name_or_path": spec.model_dir, **lever.get("model", {})},
        "lora": {"r": spec.lora_r, "alpha": spec.lora_alpha},
        "data": {"train": {"path": "synthetic.jsonl", "format": "text"}, "max_length": max(spec.lengths)},
        "train": {"max_steps": spec.steps, "micro_batch_size": spec.micro_batch, "gradient_accumulation": spec.grad_accum,
                  "learning_rate": 2e-4, "logging_steps": 1, "seed": spec.seed, "warmup_ratio": 0.0,
                  "lr_scheduler": "linear", **lever.get("train", {}),
                  **({"token_budget": lever["budget_factor"] * spec.micro_batch * max(spec.lengths)}
                     if "budget_factor" in lever else {})},
        "output": {"dir": workdir, "save_steps": 10**9},
    })
    plan = resolve_plan(recipe)  # what `lora-causal train` would run here
    budget = plan.as_run.train.token_budget
    result.batching = plan.batching.line() + (f"; micro-batches of up to {budget} tokens" if budget else "")
    recipe = plan.as_run
    start = time.perf_counter()
    tokenizer = load_tokenizer(recipe.model)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, spec.seed), recipe.lora, spec.seed)
    data = PreparedData(train=[{"input_ids": ids, "prompt_length": 0} for ids in examples], eval=None,
                        train_report=DataReport(), eval_report=None, fingerprint="synthetic")
    args = build_sft_config(recipe, workdir, has_eval=False)
    args.save_strategy, args.disable_tqdm = "no", True
    for key, value in lever.get("sft", {}).items():
        setattr(args, key, value)
    meter = TokenMeter()
    trainer = build_trainer(recipe, model, tokenizer, data, args, meter=meter,
                            callbacks=[_timing_callback(result, meter, spec.profile_step)])
    result.load_s = time.perf_counter() - start  # like the stock arm: model, adapter and trainer ready
    trainer.train()


def run_arm(spec: BenchSpec) -> ArmResult:
    """Train one arm on the spec's examples and measure it (in this process)."""
    import torch

    from lora_causal.training.metrics import peak_rss_gib

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


def main_worker(argv: list[str]) -> int:
    """`python -m lora_causal.commands.bench SPEC.json RESULT.json`: run one arm, write its measurements."""
    spec = BenchSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_arm(spec)
    Path(argv[1]).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    raise SystemExit(main_worker(sys.argv[1:]))
