"""The seed article's example: labels are input_ids, and the model's loss is next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lora_causal.core.recipe import ModelSection, QuantizationSection
from lora_causal.data.collator import CausalLMCollator
from lora_causal.model.loading import load_base_model


def test_the_dog_likes_food(tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(), seed=0)
    assert model.is_loaded_in_4bit  # the real bitsandbytes NF4 path, on the CPU

    ids = tiny_tokenizer("the dog likes food")["input_ids"]
    batch = CausalLMCollator(pad_token_id=tiny_tokenizer.pad_token_id)([{"input_ids": ids}])
    assert batch["labels"].tolist() == [ids]  # labels mirror input_ids: no pre-shift

    with torch.no_grad():
        output = model(**batch)
    logits = output.logits[0].float()
    # predict token k from tokens < k: logits at k-1 score token k
    by_hand = torch.stack(
        [-F.log_softmax(logits[k - 1], dim=-1)[ids[k]] for k in range(1, len(ids))]
    ).mean()
    assert torch.allclose(output.loss.float(), by_hand, atol=1e-5), (output.loss, by_hand)
    # a pre-shifted label would train next-next-token prediction and give a different loss
    shifted = F.cross_entropy(logits[:-2], torch.tensor(ids[2:]))
    assert not torch.allclose(output.loss.float(), shifted, atol=1e-3)
