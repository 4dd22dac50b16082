"""TRL's SFTTrainer as lora_causal runs it: the SFTConfig of a recipe, the trainer over our tokenized examples and our
collator, and its two additions (token counting, per-token evaluation). The only module that imports trl.

TRL trains on our pre-tokenized dataset with our collator: `skip_prepare_dataset` stops it re-tokenizing,
truncating or re-labelling, and `remove_unused_columns=False` lets `prompt_length` reach the collator.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.recipe import Recipe

if TYPE_CHECKING:
    from trl import SFTConfig

    from lora_causal.training.metrics import TokenMeter


def build_sft_config(recipe: Recipe, output_dir: str, has_eval: bool) -> SFTConfig:
    """The SFTConfig for a recipe (no weights are touched)."""
    import torch
    from trl import SFTConfig

    from lora_causal.model.loading import resolve_compute_dtype

    train = recipe.train
    budget = train.explicit_token_budget is not None  # auto only reaches here resolved (training.plan)
    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    if train.activation_offloading and not torch.cuda.is_available():
        raise UserError("train.activation_offloading moves activations between a GPU and the CPU; there is no GPU here, "
                        "so set it to false")
    try:
        return SFTConfig(
            output_dir=output_dir,
            num_train_epochs=train.epochs,
            max_steps=train.max_steps or -1,
            # with a token budget, one micro-batch is one pack of examples, and build_trainer sets the accumulation
            # (the packs of one optimizer step) from the data
            per_device_train_batch_size=1 if budget else train.micro_batch_size,
            per_device_eval_batch_size=1 if budget else train.micro_batch_size,
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
            # Trainer's filter reads every micro-batch's loss back (a host sync) to average a non-finite one away;
            # unfiltered, a nan or inf loss reaches the logged loss, where the progress display reports it
            logging_nan_inf_filter=False,
            disable_tqdm=True,  # lora_causal.training.progress shows progress instead
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
            # from pinned memory, a batch's copy to the GPU need not wait for the GPU's queue to drain
            accelerator_config={"non_blocking": True} if torch.cuda.is_available() else None,
            use_cpu=not torch.cuda.is_available(),
            ddp_find_unused_parameters=False,  # every adapter weight takes part in every forward
            ddp_timeout=train.collective_timeout_s,
        )
    except (ValueError, ImportError) as exc:
        raise UserError(f"train: the settings cannot run here: {first_line(exc)}") from None


@functools.cache
def trainer_class() -> type:
    """SFTTrainer that counts the real and supervised tokens of every batch it trains on.

    Counting in `training_step` sees exactly the trained batches; a collator-side count would run ahead of
    training by the batch the dataloader prefetches.
    """
    from trl import SFTTrainer

    from lora_causal.training.step_metrics import StepMetrics, fused_applies, fused_loss

    class CountingSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, meter: TokenMeter | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.meter = meter
            # Both losses below divide by the step's supervised-token count: let Trainer count it for every class,
            # also those with `accepts_loss_kwargs = False` (Gemma-4), and not divide again by the accumulation steps
            self.model_accepts_loss_kwargs = True
            self.own_head = loss_head(self.model) == "own"
            self.step_metrics = StepMetrics()

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """TRL's fused-head loss where the classification shows it exact (its metrics kept on the device, see
            lora_causal.training.step_metrics); the model's own head otherwise."""
            if self.own_head:
                return own_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if fused_applies(self, return_outputs):
                return fused_loss(self, model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """TRL's log, after the metrics kept on the device are read (the only host sync they cost)."""
            self.step_metrics.flush(self, "train" if self.model.training else "eval")
            super().log(logs, start_time)

        @property
        def budget_steps(self) -> Any:
            """The token-budget plan of the training data (lora_causal.data.budget_steps), or None."""
            return getattr(self.data_collator, "steps", None)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            """Token-budget packs come in their planned order: the shuffle is in the packs (data.budget_steps)."""
            from lora_causal.data.budget_steps import BudgetStepSampler

            if self.budget_steps is not None and (train_dataset is None or train_dataset is self.train_dataset):
                return BudgetStepSampler(self.budget_steps)
            return super()._get_train_sampler(train_dataset)

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            fillers = inputs.pop("filler_tokens", 0)  # the collator's count of filler tokens: not for the model
            if self.meter is not None:
                self.meter.add(inputs, fillers)
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
                inputs.pop("filler_tokens", None)
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
            self.log(metrics)  # in eval mode, so TRL adds its eval metrics (token accuracy, entropy) to the log
            if was_training:
                model.train()
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return CountingSFTTrainer


def loss_head(model: Any) -> str:
    """"fused" (TRL's fused LM head) or "own" (the model's logits), as lora_causal.model.families classifies it."""
    from lora_causal.model.families import family

    from_peft = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family(getattr(from_peft.config, "model_type", "")).head


def own_loss(trainer: Any, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
    """The step's loss from the model's own logits (its head layers, scaling and softcapping included), summed over
    supervised next tokens and divided by the step's count; the model's own auxiliary router loss added as TRL does."""
    from lora_causal.model.losses import own_head_loss

    logits_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits_inputs["use_cache"] = False
    if trainer.aux_loss_enabled:
        logits_inputs["output_router_logits"] = True
    outputs = model(**logits_inputs)
    from lora_causal.training.step_metrics import step_loss

    loss = own_head_loss(outputs.logits, inputs["labels"], num_items_in_batch)
    aux = getattr(outputs, "aux_loss", None) if trainer.aux_loss_enabled else None
    loss = step_loss(trainer, loss, aux, num_items_in_batch)
    return (loss, outputs) if return_outputs else loss


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

    from lora_causal.data.collator import CausalLMCollator
    from lora_causal.data.dataset import Examples, model_columns
    from lora_causal.data.even_split import top_up
    from lora_causal.model.loading import set_adapter_dtype
    from lora_causal.training.plan import resolved

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
    processes, pad_id = sft_config.world_size, tokenizer.pad_token_id
    if not recipe.train.token_budget:
        # whole optimizer steps on every process: filler rows (no target) instead of accelerate's repeated examples
        train_rows = sft_config.per_device_train_batch_size * processes * sft_config.gradient_accumulation_steps
        train_dataset = top_up(train_dataset, train_rows, pad_id)
    else:
        from lora_causal.data.budget_steps import SlotCollator
        from lora_causal.data.packing import PackCollator, pack_examples

        budget = recipe.train.token_budget
        steps = budget_steps(recipe, train.lengths(), processes)  # whole steps of packs, fillers included
        collator = SlotCollator(steps, PackCollator(collator, train_dataset))  # packs index the examples
        train_dataset = steps.slot_dataset()
        sft_config.gradient_accumulation_steps = steps.rounds
        if evaluation:  # held-out data is small: its packs carry the examples themselves
            eval_dataset = Dataset.from_list(pack_examples(model_columns(evaluation), budget))
    eval_rows = sft_config.per_device_eval_batch_size * processes
    trainer = trainer_class()(
        meter=meter,
        model=model,
        args=sft_config,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=top_up(eval_dataset, eval_rows, pad_id) if eval_dataset is not None else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; lora_causal.training.progress prints lines instead
    # TRL stores adapters of quantized models in bf16; keep the recipe's choice
    set_adapter_dtype(model, recipe.lora.dtype, recipe.quantization.compute_dtype)
    return trainer


def budget_steps(recipe: Recipe, lengths: Any, processes: int) -> Any:
    """The token-budget packs of every optimizer step (lora_causal.data.budget_steps) for this recipe's data."""
    from lora_causal.data.budget_steps import BudgetSteps, planned_epochs

    train = recipe.train
    per_step = train.micro_batch_size * train.gradient_accumulation * processes
    return BudgetSteps(list(lengths), per_step, int(train.token_budget), processes, train.seed,
                       planned_epochs(len(lengths), per_step, train.epochs, train.max_steps))


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
    from lora_causal.model.loading import build_lora_config, build_quantization_config, resolve_compute_dtype
    from lora_causal.training.trackers import check_trackers_installed

    check_trackers_installed(recipe.output.report_to)
    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    quantization = build_quantization_config(recipe.quantization, compute_dtype)
    lora = build_lora_config(recipe.lora)
    sft = build_sft_config(recipe, str(Path(recipe.output.dir) / "checkpoints"), has_eval=recipe.data.eval is not None)
    sft_values = sft.to_dict()  # enums as their values
    if recipe.train.explicit_token_budget is not None:
        sft_values["gradient_accumulation_steps"] = "the packs of one step (train.token_budget; set from the data)"
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
