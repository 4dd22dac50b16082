"""`lora-causal train`: recipe -> run directory, one step after another.

1. processes: accelerate's state (with the recipe's collective timeout), the same recipe on every process, nothing
   that cannot be sharded (`run_training`);
2. preflight: trackers installed, the run folder decided (nothing written), the model's config read for the
   position limit and the batching plan (`_prepare`);
3. data: prepared once into the shared cache and memory-mapped, label checks (`_prepare`);
4. model: the 4-bit base with LoRA, sample answers before training (`_train`);
5. training: TRL's SFTTrainer (`lora_causal.training.trainer`) with metrics, the progress display, trackers and a
   graceful stop on signals (`_train`);
6. outputs: adapter, samples, manifest and summary, loss plot (`_train`), then `output.merge` (`_merge_run`).
Input problems raise `UserError` before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lora_causal.core.errors import UserError, disk_errno
from lora_causal.core.recipe import Recipe

if TYPE_CHECKING:
    from lora_causal.core.rundir import RunDirectory
    from lora_causal.training.plan import RunPlan

Say = Callable[..., Any]


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]
    samples: list[dict[str, str]]
    resumed_from: Path | None
    merge_report: dict[str, Any] | None = None
    is_main_process: bool = True


@dataclass
class RunContext:
    """What the steps of one run share."""

    plan: RunPlan
    run_dir: RunDirectory
    tokenizer: Any
    prompts: list[list[int]]  # output.sample_prompts as token ids
    say: Say


def run_training(recipe: Recipe, say: Say = print, require_resume: bool = False) -> TrainResult:
    """Train the recipe's adapter and fill its run directory. Input problems raise `UserError` before any write.

    With `require_resume`, there must be an unfinished run of this recipe in output.dir to continue.
    """
    from lora_causal.core.processes import check_same_recipe, process_state
    from lora_causal.training.plan import Topology
    from lora_causal.training.preflight import plan_run

    state = process_state(recipe.train.collective_timeout_s)
    if not state.is_main_process:
        say = _silent  # one process speaks for all
    try:
        check_same_recipe(recipe.fingerprint())
        if recipe.model.trust_remote_code:  # said before any of that code can run (reading the config may)
            say(f"model.trust_remote_code is true: Python code shipped with '{recipe.model.name_or_path}' will run here")
        plan = plan_run(recipe, Topology.of(state))  # everything knowable before weights load or a folder exists
        context, data = _prepare(plan, state, say, require_resume)
        try:
            try:
                result = _train(context, data)
            except Exception as exc:  # a full disk: OSError, or safetensors' own error type
                code = disk_errno(exc)
                if code is None:
                    raise
                if plan.topology.is_main:
                    context.run_dir.clean_up_after_failure()
                raise UserError(
                    f"{os.strerror(code).lower()} while writing {getattr(exc, 'filename', None) or recipe.output.dir}; "
                    "free space (or choose another output.dir) and run the same command again: it resumes from the "
                    "last complete checkpoint"
                ) from None
            result.is_main_process = plan.topology.is_main
            if plan.topology.is_main and recipe.output.merge is not None:
                result.merge_report = _merge_run(plan, result.run_dir, say)
            return result
        finally:
            context.run_dir.release()  # the run folder is free for the next run (of this process too)
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()  # a clean teardown, not a crash when the interpreter exits


def _silent(*args: Any, **kwargs: Any) -> None:
    """Non-main processes say nothing."""


def _prepare(plan: RunPlan, state: Any, say: Say, require_resume: bool) -> tuple[RunContext, Any]:
    """The run folder decided, then the data prepared: nothing is written to the run folder yet."""
    from lora_causal.core.rundir import RunDirectory
    from lora_causal.data.checks import enforce, run_checks
    from lora_causal.data.tokenizing import render_prompt_ids
    from lora_causal.data.prepare import prepare_shared
    from lora_causal.model.loading import load_tokenizer
    from lora_causal.training.plan import budget_line

    recipe = plan.recipe
    # where the run goes is decided (without writing) before the data is read, so a refusal comes at once
    run_dir = RunDirectory.plan(recipe.output.dir, recipe.fingerprint(), recipe.output.overwrite,
                                recipe.model_dump(mode="json"))
    if require_resume and run_dir.resume_from is None:
        raise UserError(
            f"--resume: '{recipe.output.dir}' holds no unfinished run of this recipe with a complete checkpoint; "
            "run without --resume to start one"
        )
    tokenizer = load_tokenizer(recipe.model)
    say(plan.batching.line())
    budget = budget_line(plan.as_run)
    if budget:
        say(budget)

    data = prepare_shared(recipe.data, tokenizer, recipe.train.seed, state, say, recipe.train.collective_timeout_s)
    if run_dir.resume_from is not None:
        check_resume_continues(run_dir.path, data.fingerprint, batch_layout(plan))
    findings = run_checks(data, recipe.data, recipe.checks, tokenizer, recipe.train.micro_batch_size, recipe.train.seed)
    enforce(findings)
    say(f"data: {data.train_report.summary()}")
    say("checks: " + "; ".join(finding.line() for finding in findings))
    if data.eval_report is not None:
        say(f"eval data: {data.eval_report.summary()}")
    source = recipe.data.train
    prompts = [render_prompt_ids(tokenizer, source.format, text, source.template) for text in recipe.output.sample_prompts]
    context = RunContext(plan, run_dir, tokenizer, prompts, say)
    return context, data


def batch_layout(plan: RunPlan) -> dict[str, int]:
    """What fixes which examples each optimizer step trains: the processes and the rows of one global step (the
    filler top-up and the shuffled order follow from them)."""
    train = plan.as_run.train
    processes = plan.topology.num_processes
    layout = {"processes": processes, "rows_per_step": train.micro_batch_size * processes * train.gradient_accumulation}
    return {**layout, "token_budget": train.token_budget} if train.token_budget else layout


def check_resume_continues(folder: Path, data_fingerprint: str, layout: dict[str, int]) -> None:
    """Refuse to resume a run that would not continue exactly: other data, or another global batch layout (the
    trainer skips the steps already done by position, so they must be the same examples in the same order)."""
    from lora_causal.core.rundir import read_manifest

    previous = read_manifest(folder) or {}
    fresh = "or start afresh with --overwrite (output.overwrite=true) or another output.dir"
    old_data = previous.get("dataset_fingerprint")
    if old_data is not None and old_data != data_fingerprint:
        raise UserError(f"output.dir: the unfinished run in '{folder}' was trained on other data (dataset fingerprint "
                        f"{old_data[:12]}, now {data_fingerprint[:12]}), so resuming it would not continue it; restore "
                        f"that data, {fresh}")
    old = previous.get("layout")
    if isinstance(old, dict) and old != layout and old.get("processes") == layout["processes"]:
        raise UserError(f"output.dir: the unfinished run in '{folder}' was cut into steps of {old.get('rows_per_step')} "
                        f"examples with token budget {old.get('token_budget', 'none')}, and this launch makes steps of "
                        f"{layout['rows_per_step']} with token budget {layout.get('token_budget', 'none')} (a budget "
                        "of auto depends on the device's batching), so the steps already trained would not be the same "
                        f"examples; resume it where it started, {fresh}")
    if isinstance(old, dict) and old != layout:
        raise UserError(f"output.dir: the unfinished run in '{folder}' started with {old.get('processes')} processes "
                        f"({old.get('rows_per_step')} rows per step) and this launch has {layout['processes']} "
                        f"({layout['rows_per_step']}), so the steps already trained would not be the same examples; "
                        f"launch {old.get('processes')} processes to resume it, {fresh}")


def _stop_on_nonfinite_loss(step: int, as_run: Recipe, run_dir: Any, manifest: dict[str, Any], is_main: bool) -> None:
    """The loss became nan or infinite: training stopped at that log, no adapter is saved (its weights would be
    too), the run is marked failed, and the user is told what to change."""
    train = as_run.train
    line = (f"train: the loss became nan or infinite by step {step} (training stopped there, no adapter saved: its "
            f"weights would not be numbers); lower train.learning_rate (now {train.learning_rate}) or "
            f"train.max_grad_norm (now {train.max_grad_norm}), or check the data, then start afresh with "
            "--overwrite (checkpoints from that step on hold the same non-numbers)")
    if is_main:
        run_dir.update_manifest({**manifest, "status": "failed", "error": line})
    raise UserError(line)


def out_of_memory_line(as_run: Recipe, step: int) -> str:
    """What to change when the device runs out of memory during training, in one line."""
    train = as_run.train
    if train.token_budget:
        size = f"micro-batches of up to {train.token_budget} tokens (train.token_budget)"
        lower = ("a smaller train.token_budget (at least data.max_length; a step still trains micro_batch_size x "
                 "gradient_accumulation examples, in more micro-batches)")
    else:
        size = f"micro-batches of {train.micro_batch_size} examples of up to {as_run.data.max_length} tokens"
        lower = "a smaller train.micro_batch_size (and a larger gradient_accumulation)"
    others = [name for name, off in (("train.gradient_checkpointing: true", not train.gradient_checkpointing),
                                     ("train.activation_offloading: true", not train.activation_offloading)) if off]
    return (f"train: the GPU ran out of memory after {step} optimizer steps with {size}; set {lower}, "
            f"{', '.join([*others, 'or a smaller data.max_length'])}, then run again (a saved checkpoint resumes)")


def _train(context: RunContext, data: Any) -> TrainResult:  # noqa: PLR0915 - one run, step by step
    """Load the model, train it, and write the run's outputs."""
    from lora_causal.core.rundir import base_manifest, now, write_json_atomic
    from lora_causal.model.generation import greedy_answers
    from lora_causal.model.loading import attach_lora, load_base_model, trainable_report
    from lora_causal.training.metrics import MetricsCallback, TokenMeter
    from lora_causal.training.progress import TrainingDisplay
    from lora_causal.training.saving import save_adapter
    from lora_causal.training.stopping import graceful_stop_class, stop_on_signal
    from lora_causal.training.summary import read_metrics, summarize, write_loss_plot
    from lora_causal.training.trackers import arrange_tracker_callbacks
    from lora_causal.training.trainer import build_sft_config, build_trainer

    plan, run_dir, tokenizer, say = context.plan, context.run_dir, context.tokenizer, context.say
    recipe, as_run, is_main, sharded = plan.recipe, plan.as_run, plan.topology.is_main, plan.topology.sharded
    max_new_tokens = recipe.output.sample_max_new_tokens

    # the model, and its answers before training
    model = attach_lora(load_base_model(as_run.model, as_run.quantization, as_run.train.seed), as_run.lora, as_run.train.seed)
    say(trainable_report(model))
    # a sharded model answers only with every process taking part: under FSDP/ZeRO-3 the samples are answered after
    # training, on a whole copy (_answers_on_a_whole_copy)
    prompts_now = context.prompts if is_main and not sharded else []
    before = greedy_answers(model, tokenizer, prompts_now, max_new_tokens) if prompts_now else []

    # the run folder starts here
    manifest = base_manifest(recipe.fingerprint(), recipe.train.seed, data.fingerprint, Path.cwd())
    manifest["base_model"] = recipe.model.model_dump(mode="json")
    manifest["batching"] = asdict(plan.batching)
    manifest["layout"] = batch_layout(plan)
    if is_main:
        run_dir.start(manifest, recipe.to_yaml())
        write_json_atomic(run_dir.path / "data_report.json", data.as_dict())
    if run_dir.resume_from is not None:
        say(f"resuming from {run_dir.resume_from}")

    # training
    sft_config = build_sft_config(as_run, str(run_dir.checkpoints), has_eval=data.eval is not None)
    meter = TokenMeter()
    metrics = MetricsCallback(run_dir.path / "metrics.jsonl", is_main, meter)
    if run_dir.resume_from is not None:
        metrics.resume_from(run_dir.resume_from)  # token totals count on from the checkpoint
    stop = graceful_stop_class()()
    display = TrainingDisplay(is_main)  # after metrics: it shows what MetricsCallback adds to the logs
    trainer = build_trainer(as_run, model, tokenizer, data, sft_config, meter=meter, callbacks=[metrics, stop, display])
    arrange_tracker_callbacks(trainer, recipe.output.report_to, run_dir.path, is_main)
    steps = trainer.budget_steps
    if steps is not None:
        say(f"token budget: {steps.describe(as_run.train.micro_batch_size, as_run.train.gradient_accumulation)}")

    def save(target: Path) -> None:
        save_adapter(trainer, model, tokenizer, target, is_main, sharded)

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
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, on a GPU: say what to change, in one line
            raise UserError(out_of_memory_line(as_run, trainer.state.global_step)) from exc
        raise
    if is_main:
        write_loss_plot(run_dir.path)
    if metrics.nonfinite_step is not None:
        _stop_on_nonfinite_loss(metrics.nonfinite_step, as_run, run_dir, manifest, is_main)
    if stop.signal_number is not None:
        stop_on_signal(stop.signal_number, trainer, run_dir, manifest, is_main, save)

    # outputs
    after = greedy_answers(model, tokenizer, prompts_now, max_new_tokens) if prompts_now else []
    save(run_dir.path / "adapter")
    global_step, processes = trainer.state.global_step, trainer.args.world_size
    if sharded and is_main and context.prompts:
        del trainer, model, save  # the sharded model goes before a whole copy comes
        before, after = _answers_on_a_whole_copy(plan, run_dir.path / "adapter", tokenizer, context.prompts, say)
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


def _answers_on_a_whole_copy(plan: RunPlan, adapter: Path, tokenizer: Any, prompts: list[list[int]],
                             say: Say) -> tuple[list, list]:
    """Sample answers (before: adapter off, after: on) from a whole 4-bit copy of the base on this process's device,
    with the saved adapter: after sharded training, no process holds the whole model. Skipped, with a notice, when
    the copy cannot fit (estimated up front, or out of memory while loading): the run is complete without them."""
    import gc

    import torch

    from lora_causal.model.generation import greedy_answers
    from lora_causal.model.loading import load_base_model
    from lora_causal.model.memory import whole_copy_fits
    from lora_causal.serving.adapters import with_adapter

    recipe = plan.as_run
    later = (f"answer them later with `lora-causal generate {adapter.parent} --prompt ...` on a machine where the base "
             "fits whole")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fits, needed, free = whole_copy_fits(recipe, plan.model_config)
    if not fits:
        say(f"sample answers skipped: a whole 4-bit copy of the base needs about {needed / 2**30:.1f} GiB and this "
            f"process's device has {free / 2**30:.1f} GiB free; {later}")
        return [], []
    try:
        model = with_adapter(load_base_model(recipe.model, recipe.quantization, recipe.train.seed, sharded=False), adapter)
        tokens = recipe.output.sample_max_new_tokens
        with model.disable_adapter():  # the base as it was before training (LoRA starts as the identity)
            before = greedy_answers(model, tokenizer, prompts, tokens)
        return before, greedy_answers(model, tokenizer, prompts, tokens)
    except torch.cuda.OutOfMemoryError:
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        say(f"sample answers skipped: the device ran out of memory holding a whole 4-bit copy of the base; {later}")
        return [], []


def _merge_run(plan: RunPlan, run_dir: Path, say: Any) -> dict[str, Any]:
    """output.merge: merge the finished run's adapter (its own failure leaves the adapter in place)."""
    import gc

    from lora_causal.serving.merging import merge_adapter

    settings, target = plan.recipe.output.merge, plan.merge_target
    gc.collect()  # the training model went out of scope with _train; free it before loading the base again
    return merge_adapter(
        str(run_dir), str(target), base=settings.base, dtype_name=settings.dtype, force=True,
        num_prompts=settings.num_prompts, say=say,
    )
