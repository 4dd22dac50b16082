"""What a merge changed, measured: logits of the merged model against a reference on sample prompts.

max |delta logit|, mean KL, top-1 agreement and perplexity; the verdict says whether the merged model is faithful.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from lora_causal.serving.adapters import AdapterSource

FAITHFUL_KL = 1e-3


FAITHFUL_TOP1 = 0.99


def sample_prompts(source: AdapterSource, tokenizer: Any, user_prompts: list[str], count: int, max_tokens: int) -> list[list[int]]:
    """Token ids to compare on: the user's prompts, else `count` examples drawn (seeded) from the run's data (from
    its prepared cache entry, or by tokenizing only the drawn rows)."""
    if user_prompts:
        ids = [list(tokenizer(text)["input_ids"])[:max_tokens] for text in user_prompts]
        return [sequence for sequence in ids if len(sequence) >= 2] or _no_prompts()
    if source.recipe is None:
        return _no_prompts()
    from lora_causal.data.prepare import sample_examples

    try:
        chosen = sample_examples(source.recipe.data, tokenizer, source.recipe.train.seed, count)
    except UserError as exc:
        raise UserError(f"cannot read the run's data for sample prompts ({exc}); pass --prompt TEXT instead") from None
    return [example["input_ids"][:max_tokens] for example in chosen] or _no_prompts()


def _no_prompts() -> list[list[int]]:
    raise UserError("no prompts to measure the merge on: pass --prompt TEXT (one or more), or merge a run directory")


def logits_for(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 CPU logits of each prompt (no padding, one at a time)."""
    import torch

    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
            outputs.append(logits.float().cpu())
    return outputs


def compare(merged: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """max |delta logit|, mean KL(reference || merged) per position, top-1 agreement."""
    import torch

    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for m, r in zip(merged, reference):
        max_diff = max(max_diff, float((m - r).abs().max()))
        log_m, log_r = torch.log_softmax(m, dim=-1), torch.log_softmax(r, dim=-1)
        kl_sum += float((log_r.exp() * (log_r - log_m)).sum(dim=-1).clamp(min=0).sum())
        agree += int((m.argmax(dim=-1) == r.argmax(dim=-1)).sum())
        positions += m.shape[0]
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl_sum / positions, "top1_agreement": agree / positions}


def perplexity(logits: list[torch.Tensor], prompts: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all positions of all prompts."""
    import torch

    total, count = 0.0, 0
    for output, ids in zip(logits, prompts):
        targets = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(output[:-1], targets, reduction="sum"))
        count += len(ids) - 1
    return math.exp(total / max(count, 1))


def verdict(base: str, vs_trained: dict[str, float], vs_unquantized: dict[str, float]) -> str:
    faithful = vs_trained["top1_agreement"] >= FAITHFUL_TOP1 and vs_trained["mean_kl"] <= FAITHFUL_KL
    shift = (
        f"top-1 agreement {vs_trained['top1_agreement']:.1%}, mean KL {vs_trained['mean_kl']:.2e}, "
        f"max |delta logit| {vs_trained['max_abs_logit_diff']:.3g} vs the model as trained (4-bit base + adapter)"
    )
    if base == "nf4-roundtrip":
        return ("faithful: " if faithful else "NOT faithful: ") + shift
    return (
        ("small train/serve shift: " if faithful else "large train/serve shift (consider --base nf4-roundtrip): ")
        + shift
        + f"; top-1 agreement {vs_unquantized['top1_agreement']:.1%} vs the adapter on the unquantized base"
    )
