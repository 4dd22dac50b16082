"""The training loss through the model's own head: per-token cross-entropy over the model's logits.

TRL's fused LM head projects the backbone's last hidden state through the output embedding alone; models whose
head does more (BERT-style transform layers, output scaling, logit softcapping, ...) get the wrong loss from it.
For those, the loss is computed from the logits the model's own forward returns, summed over the supervised next
tokens and divided by the step's token count (`num_items_in_batch`), so micro-batches of a step weigh every
token the same, whatever the class says about `accepts_loss_kwargs`.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def own_head_loss(logits: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Sum of -log p(next token) over supervised positions of `labels` (unshifted, -100 = ignored), divided by
    `num_items_in_batch` (the step's count) or, if None, by this batch's count."""
    import torch

    targets = labels[..., 1:].to(logits.device)
    scores = logits[..., :-1, :].float()
    total = torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)
