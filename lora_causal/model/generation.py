"""Greedy answers from a model: the before/after samples of training and the default of `lora-causal generate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Decode each prompt (token ids) greedily, one at a time (no padding), and return the new text."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    try:
        with torch.no_grad():
            for ids in prompts:
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                answers.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
