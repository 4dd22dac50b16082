"""The training step without host syncs: TRL's fused-head loss, and its metrics kept on the device until a log.

TRL 1.16's `SFTTrainer.compute_loss` gathers and reads back (`.item()`) the entropy, the token accuracy, the token
count (and the MoE aux loss) of every micro-batch: a device->host sync each time, so the host waits for the GPU's
whole queue before it can queue the next micro-batch. `fused_loss` computes the same loss the same way (TRL's fused
LM head, `model(**inputs, fused_lm_head=True)`), and `StepMetrics` keeps each micro-batch's sums as device tensors;
at a log (`flush`, from the trainer's `log`) they are gathered across processes and logged under TRL's keys:
`entropy`, `mean_token_accuracy`, `num_tokens` (and `aux_loss`), `eval_`-prefixed in evaluation. Entropy and
accuracy are per supervised token over everything since the last log, where TRL averages per-micro-batch means:
the same number when one micro-batch is logged, and unlike TRL's independent of how steps are cut into
micro-batches (token budgets, filler micro-batches, processes).

The gather at a log assumes every process ran the same number of micro-batches since the last log, which holds
because every process trains whole optimizer steps and evaluates the same number of batches (filler rows, see
lora_causal.data.even_split).

What stays a sync on a GPU, out of this module's reach: TRL's fused head compacts the supervised positions with a
boolean index (`hidden_states[mask]`) on Triton devices, whose size the host must read (see README, "Host syncs").
"""

from __future__ import annotations

from typing import Any

MODES = ("train", "eval")


def fused_applies(trainer: Any, return_outputs: bool) -> bool:
    """Whether `fused_loss` computes what TRL's compute_loss would (else the caller keeps TRL's)."""
    if return_outputs or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return False
    if trainer.args.loss_type not in ("nll", "dft") or getattr(trainer, "_tp_size", 1) != 1:
        return False
    config = getattr(trainer.accelerator, "parallelism_config", None)
    return not (config is not None and getattr(config, "sp_enabled", False))


def fused_loss(trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """TRL 1.16's fused-head loss (its plain branch, same arithmetic), the metrics recorded on the device."""
    import torch

    inputs["use_cache"] = False
    if trainer.aux_loss_enabled:
        inputs["output_router_logits"] = True
    outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    if trainer.args.loss_type == "dft":
        per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    loss = step_loss(trainer, loss, outputs.aux_loss if trainer.aux_loss_enabled else None, num_items_in_batch)
    trainer.step_metrics.record("train" if trainer.model.training else "eval", outputs, inputs,
                                aux=trainer.aux_loss_enabled)
    return loss


def step_loss(trainer: Any, loss: Any, aux: Any, num_items_in_batch: Any) -> Any:
    """A micro-batch's token loss (already divided by the step's supervised tokens) as Trainer and TRL scale it:
    times the processes when tokens are counted across them (DDP then averages the gradients), plus the router's
    auxiliary loss (`aux`, or None), a per-micro-batch mean, spread over the accumulated micro-batches."""
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    if aux is not None:
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + trainer.router_aux_loss_coef * aux / steps
    return loss


class StepMetrics:
    """Per-micro-batch metric sums on the device, read (one gather, one reduce) only when the trainer logs."""

    def __init__(self) -> None:
        self._entropy: dict[str, list[Any]] = {mode: [] for mode in MODES}  # per micro-batch, sum over positions
        self._correct: dict[str, list[Any]] = {mode: [] for mode in MODES}  # top-1 hits
        self._valid: dict[str, list[Any]] = {mode: [] for mode in MODES}  # supervised positions
        self._aux: dict[str, list[Any]] = {mode: [] for mode in MODES}
        self._ran = dict.fromkeys(MODES, False)
        self._device_tokens: Any = 0  # training tokens from attention masks since the last flush
        self._host_tokens = 0  # training tokens of padding-free rows (their length, known on the host)

    def record(self, mode: str, outputs: Any, inputs: dict[str, Any], aux: bool = False) -> None:
        """Keep one micro-batch's sums (queued device work, nothing read back)."""
        self._ran[mode] = True
        self._valid[mode].append(outputs.label_mask.sum())
        self._entropy[mode].append(outputs.entropy.detach().sum())
        self._correct[mode].append(outputs.is_top1.sum())
        if aux:
            self._aux[mode].append(outputs.aux_loss.detach())
        if mode != "train":
            return
        if "attention_mask" in inputs:
            self._device_tokens = self._device_tokens + inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            self._host_tokens += int(inputs["position_ids"].size(1))
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")

    def flush(self, trainer: Any, mode: str) -> None:
        """Append to TRL's `trainer._metrics[mode]` what TRL's compute_loss would have, micro-batch by micro-batch,
        and add the training tokens to `trainer._total_train_tokens`. A collective: every process logs together."""
        import torch

        accelerator = trainer.accelerator
        tokens = torch.as_tensor(self._device_tokens, device=accelerator.device).reshape(1) + self._host_tokens
        self._device_tokens, self._host_tokens = 0, 0
        trainer._total_train_tokens += int(accelerator.reduce(tokens, "sum").item())
        if not self._ran[mode]:
            return
        self._ran[mode] = False
        metrics = trainer._metrics[mode]
        if self._valid[mode]:
            processes = accelerator.num_processes

            def summed(values: list[Any]) -> Any:  # [micro-batches], each summed over the processes
                stacked = accelerator.gather(torch.stack(values))
                return stacked.reshape(processes, len(values)).sum(0)

            valid, entropy, correct = (summed(values).sum() for values in
                                       (self._valid[mode], self._entropy[mode], self._correct[mode]))
            # per supervised token over every micro-batch since the last log (TRL averages per-micro-batch means,
            # which weighs tokens by how a step is cut: token-budget packs and filler micro-batches would change it)
            metrics["entropy"].append(float(entropy / valid) if valid > 0 else 0.0)
            metrics["mean_token_accuracy"].append(float(correct / valid) if valid > 0 else 0.0)
            if self._aux[mode]:
                stacked = accelerator.gather(torch.stack(self._aux[mode]))
                metrics["aux_loss"].extend(stacked.reshape(processes, -1).mean(0).tolist())
        for values in (self._valid, self._entropy, self._correct, self._aux):
            values[mode].clear()
        metrics["num_tokens"] = [trainer._total_train_tokens]
