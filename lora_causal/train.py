"""Recipe -> SFTConfig -> SFTTrainer -> run directory. The only module that imports trl.

TRL trains on our pre-tokenized dataset with our collator: `skip_prepare_dataset` stops it re-tokenizing,
truncating or re-labelling, and `remove_unused_columns=False` lets `prompt_length` reach the collator.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.config import Recipe
from lora_causal.errors import DISK_ERRNOS, RunInterrupted, UserError, first_line

if TYPE_CHECKING:
    from trl import SFTConfig

    from lora_causal.metrics import TokenMeter
    from lora_causal.rundir import RunDirectory


def build_sft_config(recipe: Recipe, output_dir: str, has_eval: bool) -> SFTConfig:
    """The SFTConfig for a recipe (no weights are touched)."""
    import torch
    from trl import SFTConfig

    from lora_causal.model import resolve_compute_dtype

    train = recipe.train
    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    if train.activation_offloading and not torch.cuda.is_available():
        raise UserError("train.activation_offloading moves activations between a GPU and the CPU; there is no GPU here, "
                        "so set it to false")
    try:
        return SFTConfig(
            output_dir=output_dir,
            num_train_epochs=train.epochs,
            max_steps=train.max_steps or -1,
            # with a token budget, one micro-batch is one pack of examples
            per_device_train_batch_size=1 if train.token_budget else train.micro_batch_size,
            per_device_eval_batch_size=1 if train.token_budget else train.micro_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler,
            warmup_steps=train.warmup_ratio,  # a float below 1 is a share of the total steps
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            optim=train.optimizer,
            seed=train.seed,
            data_seed=train.seed,
            bf16=compute_dtype == torch.bfloat16,
            fp16=compute_dtype == torch.float16,
            gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
            activation_offloading=train.activation_offloading,
            logging_steps=train.logging_steps,
            logging_first_step=True,
            disable_tqdm=True,  # lora_causal.progress shows progress instead
            save_strategy="steps",
            save_steps=recipe.output.save_steps,
            save_total_limit=recipe.output.save_total_limit,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=(train.eval_steps or train.logging_steps) if has_eval else None,
            report_to=list(recipe.output.report_to) or "none",
            # Our dataset is tokenized and our collator builds the labels: TRL must not touch either.
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            max_length=None,
            packing=False,
            padding_free=False,  # padding-free batches come from our collator, not TRL's
            dataloader_num_workers=0,  # the token meter counts batches in this process
            dataloader_pin_memory=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),
            ddp_find_unused_parameters=False,  # every adapter weight takes part in every forward
            ddp_timeout=train.collective_timeout_s,
        )
    except (ValueError, ImportError) as exc:
        raise UserError(f"train: the settings cannot run here: {first_line(exc)}") from None


def check_max_length(recipe: Recipe, config: Any) -> None:
    """Refuse a data.max_length beyond the model's position limit (read from its config, no weights)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and recipe.data.max_length > limit:
        raise UserError(
            f"data.max_length: {recipe.data.max_length} exceeds the model's maximum positions ({limit}); "
            f"set data.max_length to {limit} or less"
        )


def check_sharding(recipe: Recipe, sharded: bool | None = None) -> None:
    """Refuse, before anything loads, what FSDP or ZeRO-3 cannot shard."""
    import torch

    from lora_causal.model import resolve_compute_dtype
    from lora_causal.processes import launcher_engine, sharded_training

    engine = launcher_engine()
    if engine is not None and not torch.cuda.is_available():
        raise UserError(f"the accelerate config asks for {engine}, which needs GPUs, and this machine has none; launch "
                        "with recipes/accelerate/cpu_ddp.yaml on a CPU")
    if not (sharded_training() if sharded is None else sharded):
        return
    if recipe.quantization.mode == "int8":
        raise UserError("quantization.mode: int8 weights cannot be sharded by FSDP or ZeRO-3; use nf4 (4-bit weights are "
                        "stored in the compute dtype so they shard), or launch with recipes/accelerate/ddp.yaml")
    compute = str(resolve_compute_dtype(recipe.quantization.compute_dtype)).removeprefix("torch.")
    if recipe.lora.dtype not in ("auto", compute):
        raise UserError(f"lora.dtype: {recipe.lora.dtype} adapters beside a {compute} base cannot be sharded together by "
                        f"FSDP or ZeRO-3 (one dtype per sharded unit); set lora.dtype: auto (= {compute} when sharded)")


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]
    samples: list[dict[str, str]]
    resumed_from: Path | None
    merge_report: dict[str, Any] | None = None
    is_main_process: bool = True


def run_training(recipe: Recipe, say: Any = print, require_resume: bool = False) -> TrainResult:
    """Train the recipe's adapter and fill its run directory. Input problems raise `UserError` before any write.

    With `require_resume`, there must be an unfinished run of this recipe in output.dir to continue.
    """
    from lora_causal.processes import check_same_recipe, process_state

    state = process_state(recipe.train.collective_timeout_s)
    if not state.is_main_process:
        say = _silent  # one process speaks for all
    try:
        check_same_recipe(recipe.fingerprint())
        check_sharding(recipe)
        return _run(recipe, state, say, require_resume)
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()  # a clean teardown, not a crash when the interpreter exits


def _silent(*args: Any, **kwargs: Any) -> None:
    """Non-main processes say nothing."""


def _run(recipe: Recipe, state: Any, say: Any, require_resume: bool) -> TrainResult:
    from lora_causal.batching import apply_plan, model_config, plan_for_recipe
    from lora_causal.checks import enforce, run_checks
    from lora_causal.data import render_prompt_ids
    from lora_causal.model import load_tokenizer
    from lora_causal.prepare import prepare_shared
    from lora_causal.rundir import RunDirectory
    from lora_causal.trackers import check_trackers_installed

    check_trackers_installed(recipe.output.report_to)
    if recipe.model.trust_remote_code:  # said before any of that code can run
        say(f"model.trust_remote_code is true: Python code shipped with '{recipe.model.name_or_path}' will run here")
    # where the run goes is decided (without writing) before the data is read, so a refusal comes at once
    run_dir = RunDirectory.plan(recipe.output.dir, recipe.fingerprint(), recipe.output.overwrite)
    if require_resume and run_dir.resume_from is None:
        raise UserError(
            f"--resume: '{recipe.output.dir}' holds no unfinished run of this recipe with a complete checkpoint; "
            "run without --resume to start one"
        )
    tokenizer = load_tokenizer(recipe.model)
    config = model_config(recipe)
    check_max_length(recipe, config)
    plan = plan_for_recipe(recipe, config=config)
    say(plan.line())
    data = prepare_shared(recipe.data, tokenizer, recipe.train.seed, state, say)
    findings = run_checks(data, recipe.data, recipe.checks, tokenizer, recipe.train.micro_batch_size, recipe.train.seed)
    enforce(findings)
    say(f"data: {data.train_report.summary()}")
    say("checks: " + "; ".join(finding.line() for finding in findings))
    if data.eval_report is not None:
        say(f"eval data: {data.eval_report.summary()}")
    sft_config = build_sft_config(apply_plan(recipe, plan), str(run_dir.checkpoints), has_eval=data.eval is not None)
    source = recipe.data.train
    prompts = [render_prompt_ids(tokenizer, source.format, text, source.template) for text in recipe.output.sample_prompts]
    try:
        result = _train(recipe, plan, tokenizer, data, run_dir, sft_config, prompts, state.is_main_process, say)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        if state.is_main_process:
            run_dir.clean_up_after_failure()
        raise UserError(
            f"{os.strerror(exc.errno).lower()} while writing {exc.filename or recipe.output.dir}; free space (or "
            "choose another output.dir) and run the same command again: it resumes from the last complete checkpoint"
        ) from None
    result.is_main_process = state.is_main_process
    if state.is_main_process and recipe.output.merge is not None:
        result.merge_report = _merge_run(recipe, result.run_dir, say)
    return result


@functools.cache
def trainer_class() -> type:
    """SFTTrainer that counts the real and supervised tokens of every batch it trains on.

    Counting in `training_step` sees exactly the trained batches; a collator-side count would run ahead of
    training by the batch the dataloader prefetches.
    """
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, meter: TokenMeter | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.meter = meter

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if self.meter is not None:
                self.meter.add(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
            """The loss per supervised token over the whole evaluation set (all processes), as training weighs it.

            Trainer's own evaluation averages per-batch means by examples, so it depends on the batching and on
            the number of processes; this sums the token losses and divides once.
            """
            import torch

            dataloader = self.get_eval_dataloader(eval_dataset)
            model = self._wrap_model(self.model, training=False, dataloader=dataloader)
            was_training = model.training
            model.eval()
            start = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.args.device)
            tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)
            # TRL's compute_loss divides by `num_items_in_batch` and, when tokens are averaged across processes,
            # multiplies by the process count (DDP then averages gradients): undo both to get this batch's sum
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            for inputs in dataloader:
                inputs = self._prepare_inputs(inputs)
                count = (inputs["labels"][..., 1:] != -100).sum()
                with torch.no_grad(), self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs, num_items_in_batch=count)
                loss_sum += loss.detach().double() * count.clamp(min=1) / scale
                tokens += count
            loss_sum, tokens = self.accelerator.reduce(loss_sum, "sum"), self.accelerator.reduce(tokens, "sum")
            metrics = {f"{metric_key_prefix}_loss": float(loss_sum / tokens.clamp(min=1)),
                       f"{metric_key_prefix}_supervised_tokens": int(tokens),
                       f"{metric_key_prefix}_runtime": round(time.perf_counter() - start, 4)}
            if was_training:
                model.train()
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return CountingSFTTrainer


def build_trainer(  # noqa: PLR0913
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: Any,
    sft_config: SFTConfig,
    meter: TokenMeter | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """SFTTrainer over our tokenized examples (memory-mapped, used as they are) and our collator (whose batches
    `meter` counts, if given)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from lora_causal.batching import resolved
    from lora_causal.collator import CausalLMCollator
    from lora_causal.data import Examples, model_columns
    from lora_causal.even_split import top_up
    from lora_causal.model import set_adapter_dtype

    recipe = resolved(recipe)
    collator: Any = CausalLMCollator(
        pad_token_id=tokenizer.pad_token_id,
        mask_prompt=recipe.data.mask_prompt,
        padding_free=recipe.train.padding_free,
        pad_to_multiple_of=recipe.train.pad_to_multiple_of,
    )
    train = data.train if isinstance(data.train, Examples) else Examples.from_list(data.train)
    evaluation = data.eval if data.eval is None or isinstance(data.eval, Examples) else Examples.from_list(data.eval)
    train_dataset = train.model_dataset()
    eval_dataset = evaluation.model_dataset() if evaluation else None
    if recipe.train.token_budget:
        from lora_causal.packing import PackCollator, pack_examples, pack_indices

        budget = recipe.train.token_budget
        collator = PackCollator(collator, train.model_dataset())
        train_dataset = Dataset.from_list(pack_indices(train.lengths(), budget))  # indices into train
        if evaluation:  # held-out data is small: its packs carry the examples themselves
            eval_dataset = Dataset.from_list(pack_examples(model_columns(evaluation), budget))
    # whole optimizer steps on every process: filler rows (no target) instead of accelerate's repeated examples
    processes, pad_id = sft_config.world_size, tokenizer.pad_token_id
    train_rows = sft_config.per_device_train_batch_size * processes * sft_config.gradient_accumulation_steps
    eval_rows = sft_config.per_device_eval_batch_size * processes
    trainer = trainer_class()(
        meter=meter,
        model=model,
        args=sft_config,
        data_collator=collator,
        train_dataset=top_up(train_dataset, train_rows, pad_id),
        eval_dataset=top_up(eval_dataset, eval_rows, pad_id) if eval_dataset is not None else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; lora_causal.progress prints lines instead
    # TRL stores adapters of quantized models in bf16; keep the recipe's choice
    set_adapter_dtype(model, recipe.lora.dtype, recipe.quantization.compute_dtype)
    return trainer


def _train(recipe, plan, tokenizer, data, run_dir: RunDirectory, sft_config, prompts, is_main, say) -> TrainResult:  # noqa: ANN001, PLR0913
    from dataclasses import asdict

    from lora_causal.batching import apply_plan
    from lora_causal.generation import greedy_answers
    from lora_causal.metrics import MetricsCallback, TokenMeter
    from lora_causal.model import attach_lora, load_base_model, trainable_report
    from lora_causal.processes import sharded_training
    from lora_causal.progress import TrainingDisplay
    from lora_causal.rundir import base_manifest, now, write_json_atomic
    from lora_causal.summary import read_metrics, summarize, write_loss_plot
    from lora_causal.trackers import arrange_tracker_callbacks

    as_run = apply_plan(recipe, plan)  # `auto` batching made concrete; the run folder keeps the recipe as written
    model = attach_lora(load_base_model(as_run.model, as_run.quantization, as_run.train.seed), as_run.lora, as_run.train.seed)
    say(trainable_report(model))
    sharded = sharded_training()
    # samples are answered by the main process; a sharded model answers only with every process taking part, so
    # under FSDP/ZeRO-3 they are answered after training, on a whole copy (see _answers_on_a_whole_copy)
    prompts_now = prompts if is_main and not sharded else []
    before = greedy_answers(model, tokenizer, prompts_now, recipe.output.sample_max_new_tokens) if prompts_now else []

    manifest = base_manifest(recipe.fingerprint(), recipe.train.seed, data.fingerprint, Path.cwd())
    manifest["base_model"] = recipe.model.model_dump(mode="json")
    manifest["batching"] = asdict(plan)
    if is_main:
        run_dir.start(manifest, recipe.to_yaml())
        write_json_atomic(run_dir.path / "data_report.json", data.as_dict())
    if run_dir.resume_from is not None:
        say(f"resuming from {run_dir.resume_from}")

    meter = TokenMeter()
    metrics = MetricsCallback(run_dir.path / "metrics.jsonl", is_main, meter)
    stop = _graceful_stop_class()()
    display = TrainingDisplay(is_main)  # after metrics: it shows what MetricsCallback adds to the logs
    trainer = build_trainer(as_run, model, tokenizer, data, sft_config, meter=meter, callbacks=[metrics, stop, display])
    arrange_tracker_callbacks(trainer, recipe.output.report_to, run_dir.path, is_main)
    try:
        with stop.listening(), display:  # leaving the block ends the live display, so an error prints below it
            trainer.train(resume_from_checkpoint=str(run_dir.resume_from) if run_dir.resume_from else None)
    except BaseException as exc:
        if is_main:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                run_dir.update_manifest({**manifest, "status": status, "error": f"{exc.__class__.__name__}: {exc}"})
            except OSError:
                pass  # the disk may be why we failed; the error itself is what matters
            run_dir.clean_up_after_failure()
        raise
    if is_main:
        write_loss_plot(run_dir.path)
    if stop.signal_number is not None:
        _stop_on_signal(stop.signal_number, trainer, model, tokenizer, run_dir, manifest, is_main)

    after = greedy_answers(model, tokenizer, prompts_now, recipe.output.sample_max_new_tokens) if prompts_now else []
    _save_adapter(trainer, model, tokenizer, run_dir.path / "adapter", is_main)
    global_step, processes = trainer.state.global_step, trainer.args.world_size
    if sharded and is_main and prompts:
        del trainer, model  # the sharded model goes before a whole copy comes
        before, after = _answers_on_a_whole_copy(as_run, run_dir.path / "adapter", tokenizer, prompts)
    samples = [
        {"prompt": prompt, "before": b, "after": a}
        for prompt, b, a in zip(recipe.output.sample_prompts, before, after)
    ]
    if is_main:
        if samples:
            write_json_atomic(run_dir.path / "samples.json", samples)
        losses = metrics.losses()
        manifest.update(
            status="completed",
            finished=now(),
            global_step=global_step,
            processes=processes,
            resumed_from=str(run_dir.resume_from) if run_dir.resume_from else None,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            adapter="adapter",
        )
        manifest["summary"] = summarize(manifest, read_metrics(run_dir.path)).as_dict()
        run_dir.update_manifest(manifest)
    return TrainResult(run_dir.path, metrics.losses(), samples, run_dir.resume_from)


def _answers_on_a_whole_copy(recipe: Recipe, adapter: Path, tokenizer: Any, prompts: list[list[int]]) -> tuple[list, list]:
    """Sample answers (before: adapter off, after: on) from a whole 4-bit copy of the base on this process's device,
    with the saved adapter: after sharded training, no process holds the whole model."""
    import gc

    import torch

    from lora_causal.generation import greedy_answers
    from lora_causal.merge import with_adapter
    from lora_causal.model import load_base_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = with_adapter(load_base_model(recipe.model, recipe.quantization, recipe.train.seed, sharded=False), adapter)
    tokens = recipe.output.sample_max_new_tokens
    with model.disable_adapter():  # the base as it was before training (LoRA starts as the identity)
        before = greedy_answers(model, tokenizer, prompts, tokens)
    return before, greedy_answers(model, tokenizer, prompts, tokens)


def _merge_run(recipe: Recipe, run_dir: Path, say: Any) -> dict[str, Any]:
    """output.merge: merge the finished run's adapter (its own failure leaves the adapter in place)."""
    import gc

    from lora_causal.merge import merge_adapter

    settings = recipe.output.merge
    target = Path(settings.dir) if Path(settings.dir).is_absolute() else run_dir / settings.dir
    gc.collect()  # the training model went out of scope with _train; free it before loading the base again
    return merge_adapter(
        str(run_dir), str(target), base=settings.base, dtype_name=settings.dtype, force=True,
        num_prompts=settings.num_prompts, say=say,
    )


def _stop_on_signal(signal_number: int, trainer: Any, model: Any, tokenizer: Any, run_dir: RunDirectory,
                    manifest: dict[str, Any], is_main: bool) -> None:
    """After a SIGINT/SIGTERM stop: keep the adapter so far, mark the run interrupted, say how to resume."""
    from lora_causal.rundir import last_complete_checkpoint

    step = trainer.state.global_step
    checkpoint = last_complete_checkpoint(run_dir.checkpoints)
    _save_adapter(trainer, model, tokenizer, run_dir.path / "adapter", is_main)
    if is_main:
        run_dir.update_manifest({**manifest, "status": "interrupted", "global_step": step,
                                 "error": f"stopped by {signal.Signals(signal_number).name}"})
    raise RunInterrupted(
        f"stopped by {signal.Signals(signal_number).name} at step {step}: checkpoint {checkpoint} and the adapter so "
        f"far ({run_dir.path / 'adapter'}) are saved; run the same command again to resume",
        128 + signal_number,
    )


@functools.cache
def _graceful_stop_class() -> type:
    """A TrainerCallback that turns SIGINT/SIGTERM into "finish this step, save a checkpoint, stop"."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self) -> None:
            self.signal_number: int | None = None

        def _handle(self, signal_number: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
            if self.signal_number is not None:
                raise KeyboardInterrupt  # a second signal stops at once
            self.signal_number = signal_number
            sys.stderr.write("\nstopping after this step and saving a checkpoint (signal again to stop at once)\n")

        @contextmanager
        def listening(self) -> Any:
            """Install the handlers for the duration of training (main thread only), then restore the old ones."""
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.signal_number is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

    return GracefulStop


def _save_adapter(trainer: Any, model: Any, tokenizer: Any, target: Path, is_main: bool) -> None:
    from lora_causal.processes import sharded_training
    from lora_causal.saving import save_adapter

    save_adapter(trainer, model, tokenizer, target, is_main, sharded_training())


SFT_SUMMARY_KEYS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "warmup_steps", "optim", "bf16", "fp16", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_offloading", "seed",
)


def _public_fields(config: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if not isinstance(value, (bool, int, float, str, type(None))) else value
            for key, value in config.items() if not key.startswith("_") and value is not None}


def describe_configs(recipe: Recipe) -> dict[str, Any]:
    """Build the BitsAndBytesConfig, LoraConfig and SFTConfig of a recipe (no weights) and summarise them."""
    from lora_causal.model import build_lora_config, build_quantization_config, resolve_compute_dtype
    from lora_causal.trackers import check_trackers_installed

    check_trackers_installed(recipe.output.report_to)
    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    quantization = build_quantization_config(recipe.quantization, compute_dtype)
    lora = build_lora_config(recipe.lora)
    sft = build_sft_config(recipe, str(Path(recipe.output.dir) / "checkpoints"), has_eval=recipe.data.eval is not None)
    sft_values = sft.to_dict()  # enums as their values
    return {
        "BitsAndBytesConfig": _public_fields(quantization.to_dict()) if quantization else None,
        "LoraConfig": {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "target_modules": lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules),
            "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora,
            "bias": lora.bias,
            "modules_to_save": lora.modules_to_save,
        },
        "SFTConfig": {
            **{key: sft_values[key] for key in SFT_SUMMARY_KEYS},
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
        },
    }
