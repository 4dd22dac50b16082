"""The conformance sweep: every causal-LM architecture transformers ships, through the path the default plan picks.

For each architecture of transformers' causal-LM auto mapping, built tiny on the CPU (conformance_kit: 4 layers,
hidden 64, windows and chunks of 6, 4 experts, float32), the plan lora_causal resolves with its defaults
(`train.padding_free: auto`, `model.attn_implementation: auto`) must be exact: each example of the batch it builds
(packed row or padded batch) has the logits of that example alone through the model's eager attention (1e-4),
and the loss through the head the classification picks (TRL's fused head or the model's own) is the by-hand mean
over supervised next tokens; where TRL adds a router auxiliary loss it must be the model's own. An architecture
refused by the classification must be refused by the plan; one that cannot be built tiny must not be classified
padding-free; one the table does not know (a newer transformers) fails here until it is classified.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conformance_kit import (
    TOLERANCE,
    _alone,
    _by_hand_loss,
    _difference,
    _examples,
    aux_applies,
    aux_losses,
    batch_for,
    build,
    default_attention,
    run_path,
    set_attention,
    tiny_config,
)

from lora_causal.core.errors import UserError
from lora_causal.model.batching import AttentionNeeds, DeviceInfo, plan_batching
from lora_causal.model.families import FUSED, PADDING_FREE, REFUSED, TABLE, UNTESTED, family

CPU = DeviceInfo("cpu", "cpu")


def _architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


ARCHITECTURES = _architectures()


def test_every_architecture_is_classified_and_the_table_is_printed(capsys: pytest.CaptureFixture) -> None:
    unknown = [name for name in ARCHITECTURES if not family(name).classified]
    counts = Counter(family(name).verdict for name in ARCHITECTURES)
    with capsys.disabled():
        print(f"\nconformance: {len(ARCHITECTURES)} causal-LM architectures: "
              + ", ".join(f"{verdict} {count}" for verdict, count in sorted(counts.items())))
        for name in ARCHITECTURES:
            found = family(name)
            print(f"  {name:28s} {found.verdict:12s} head={found.head:5s} {found.reason}")
    assert not unknown, (f"transformers ships architectures lora_causal has not classified: {unknown}; run the sweep "
                         "and add them to lora_causal/model/families.py")
    assert not set(TABLE) - set(ARCHITECTURES), "the table names architectures transformers no longer ships"


@pytest.mark.slow  # about two minutes for all of them on 2 cores: in the full suite, not the inner loop
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_default_plan_is_exact(model_type: str) -> None:  # noqa: PLR0912
    import torch

    from lora_causal.model.attention import kernel_parameters, register

    found = family(model_type)
    if found.verdict == REFUSED:
        with pytest.raises(UserError, match=model_type):
            plan_batching("auto", "auto", "float32", CPU, AttentionNeeds(model_type), kernel_parameters())
        return
    try:
        model = build(model_type)
        examples = _examples(model.get_output_embeddings().weight.shape[0])
        with torch.no_grad():
            alone = _alone(model, examples)
    except Exception as exc:  # noqa: BLE001 - an architecture that cannot be built tiny: never padding-free
        assert found.verdict != PADDING_FREE and found.reason == UNTESTED, f"{model_type} did not build: {exc}"
        return
    # the recipe's config is the architecture's own (a composite one for emu3, mllama), not the text model's
    chosen = plan_batching("auto", "auto", "float32", CPU, AttentionNeeds.from_config(tiny_config(model_type)),
                           kernel_parameters())
    assert chosen.padding_free == (found.verdict == PADDING_FREE), chosen.line()
    if found.head == FUSED:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    set_attention(model, register() if chosen.attn_implementation == "varlen" else default_attention(model))
    labels = [batch_for(False, [ids])["labels"][0].tolist() for ids in examples]
    with torch.no_grad():
        outputs, loss = run_path(model, chosen.padding_free, examples, found.head)
    difference = _difference(outputs, alone)
    assert difference < TOLERANCE, f"{model_type} ({chosen.line()}): logits off by {difference}"
    truth = _by_hand_loss(alone, labels)
    assert math.isclose(loss, truth, abs_tol=TOLERANCE), f"{model_type}: loss {loss} by hand {truth} ({found.head})"
    if found.head == FUSED and aux_applies(model):
        fused, own = aux_losses(model, examples)
        assert own is None or math.isclose(float(fused), float(own), abs_tol=TOLERANCE), model_type


def test_readme_lists_exactly_the_padding_free_architectures() -> None:
    from conftest import REPO

    from lora_causal.model.families import padding_free_types

    text = (REPO / "README.md").read_text()
    start = text.index("<!-- padding-free list")
    block = text[text.index("\n", start): text.index("<!-- end of padding-free list -->")]
    listed = [name.strip().strip("`") for name in block.split(",") if name.strip()]
    assert listed == padding_free_types()
