"""Tiny models of every causal-LM architecture, and the checks the conformance sweep runs on each (no weights load).

`tiny_config(model_type)` shrinks transformers' default config of an architecture (few layers, small hidden
size, small windows and chunks, few experts, small vocabulary); `probe(model_type)` builds it once in float32
and measures, for each path a plan can pick, how far it is from the truth:
- `packed`: each example of a padding-free row through lora_causal's varlen attention, against the example
  alone through the model's eager attention (largest absolute logit difference);
- `padded`: each example of a right-padded batch through the model's default attention, against the same;
- `fused_loss` / `own_loss`: TRL's fused LM-head loss and lora_causal's own-head loss on the packed row (or
  the padded batch), against the by-hand mean over supervised next tokens of the examples alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, WINDOW, EXPERTS = 4, 64, 4, 2, 16, 96, 256, 6, 4
LENGTHS = (9, 5, 11)  # the examples of one step: longer than the window and the chunk
TOLERANCE = 1e-4

_SHRINK = {  # config keys -> tiny value
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": 1,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM,
    "intermediate_size": FFN, "n_inner": FFN, "ffn_dim": FFN, "decoder_ffn_dim": FFN, "encoder_ffn_dim": FFN,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "sliding_window": WINDOW, "attention_chunk_size": WINDOW, "window_size": WINDOW, "attention_window_size": WINDOW,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "global_head_dim": 32, "rotary_dim": 8, "mamba_d_state": 8, "ssm_state_size": 8, "state_size": 8,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_chunk_size": 8, "chunk_size": 8, "mamba_d_conv": 4, "moe_k": 2,
    "time_step_rank": 8, "mamba_dt_rank": 8,
    "max_position_embeddings": 128, "n_positions": 128, "max_seq_len": 128,
}


# architectures whose default config hides what they are (all-attention hybrids) or cannot be shrunk key by key
_OVERRIDES: dict[str, dict[str, Any]] = {
    "lfm2": {"full_attn_idxs": [1, 3]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "gpt_neo": {"attention_types": [[["global", "local"], 2]]},
    "mamba2": {"num_heads": 8, "head_dim": 16},
}
_NONE_DEFAULTS = {"head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS}


def _shrink(values: dict[str, Any], vocab: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(values.get("qk_rope_head_dim"), int) and "head_dim" in values:
        out["head_dim"] = _SHRINK["qk_rope_head_dim"]  # MLA: the rotary part is the config's head_dim
    if isinstance(values.get("kv_lora_rank"), int) and "num_key_value_heads" in values:
        out["num_key_value_heads"] = HEADS  # MLA expands keys and values to every head
    for key, value in values.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, dict) and key.endswith("config"):
            out[key] = _shrink(value, vocab)
        elif key in _NONE_DEFAULTS and value is None and isinstance(values.get("hidden_size"), int):
            out[key] = _NONE_DEFAULTS[key]
        elif key in ("head_dim", "num_key_value_heads") and key in out:
            continue
        elif key in _SHRINK and isinstance(value, int) and not isinstance(value, bool) and value > _SHRINK[key]:
            out[key] = _SHRINK[key]
        elif key == "vocab_size" and vocab and isinstance(value, int) and value > VOCAB:
            out[key] = VOCAB
        elif key.endswith("layer_types") and isinstance(value, list) and len(value) > LAYERS:
            kinds = list(dict.fromkeys(value))  # keep every kind of layer the architecture has
            out[key] = (kinds * LAYERS)[:LAYERS] if len(kinds) > 1 else value[:LAYERS]
    return out


def _token_ids_fit(values: dict[str, Any]) -> bool:
    for key, value in values.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, dict) and not _token_ids_fit(value):
            return False
        if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            return False
        if key.endswith("token_id") and isinstance(value, list) and any(v >= VOCAB for v in value if isinstance(v, int)):
            return False
    return True


def tiny_config(model_type: str) -> Any:
    """The architecture's default config, shrunk (float32, eager attention; dropout off)."""
    from transformers import AutoConfig

    values = AutoConfig.for_model(model_type).to_dict()
    overrides = {**_shrink(values, vocab=_token_ids_fit(values)), **_OVERRIDES.get(model_type, {})}
    config = AutoConfig.for_model(model_type, **overrides)
    return config


@dataclass
class Probe:
    model_type: str
    error: str | None = None  # why it could not be built or run tiny
    packed: float | None = None  # largest logit difference, padding-free rows with varlen attention
    padded: float | None = None  # the same, right-padded batch with the model's default attention
    fused_loss: float | None = None  # |TRL fused loss - by-hand mean|, on the padded batch
    own_loss: float | None = None  # |the model's own head loss - by-hand mean|, on the padded batch
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it crashed


def _examples(vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    high = max(8, min(vocab, VOCAB))
    return [torch.randint(4, high, (length,), generator=generator).tolist() for length in LENGTHS]


def _alone(model: Any, examples: list[list[int]]) -> list[Any]:
    import torch

    return [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float() for ids in examples]


def _by_hand_loss(alone: list[Any], batch_labels: list[list[int]]) -> float:
    import torch

    total, count = 0.0, 0
    for logits, labels in zip(alone, batch_labels):
        targets = torch.tensor(labels[1:])
        keep = targets != -100
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def _segments(logits: Any, lengths: list[int], padded: bool) -> list[Any]:
    if padded:
        return [logits[row, :length] for row, length in enumerate(lengths)]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return [logits[0, starts[i]:starts[i + 1]] for i in range(len(lengths))]


def _difference(outputs: list[Any], reference: list[Any]) -> float:
    worst = max(float((out.float() - ref).abs().max()) for out, ref in zip(outputs, reference))
    return worst if math.isfinite(worst) else math.inf


def batch_for(padding_free: bool, examples: list[list[int]]) -> dict[str, Any]:
    from lora_causal.data.collator import CausalLMCollator

    features = [{"input_ids": ids, "prompt_length": 2} for ids in examples]
    return CausalLMCollator(pad_token_id=0, mask_prompt=True, padding_free=padding_free)(features)


def build(model_type: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def set_attention(model: Any, name: str) -> None:
    model.set_attn_implementation(name)


def default_attention(model: Any) -> str:
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def run_path(model: Any, padding_free: bool, examples: list[list[int]], loss: str) -> tuple[list[Any], float]:
    """Logits per example and the step loss of one path: `loss` is "fused" (TRL's head) or "own" (the model's)."""
    from lora_causal.model.losses import own_head_loss

    batch = batch_for(padding_free, examples)
    lengths = [len(ids) for ids in examples]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits
    outputs = _segments(logits, lengths, padded=not padding_free)
    if loss == "fused":
        value = model(**batch, use_cache=False, fused_lm_head=True).loss
    else:
        value = own_head_loss(logits, batch["labels"], None)
    return outputs, float(value)


def probe(model_type: str) -> Probe:
    """Measure every path on a tiny build of `model_type` (float32, no gradients)."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from lora_causal.model.attention import register

    result = Probe(model_type)
    try:
        model = build(model_type)
    except Exception as exc:  # noqa: BLE001 - recorded as the reason the architecture cannot be built tiny
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return result
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else VOCAB
    examples = _examples(vocab)
    with torch.no_grad():
        try:
            alone = _alone(model, examples)
        except Exception as exc:  # noqa: BLE001
            result.error = f"eager forward: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            return result
        labels = [batch_for(False, [ids])["labels"][0].tolist() for ids in examples]
        truth = _by_hand_loss(alone, labels)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        for name, padding_free, attention in (("packed", True, register()), ("padded", False, default_attention(model))):
            try:
                set_attention(model, attention)
                outputs, _ = run_path(model, padding_free, examples, "own")
                setattr(result, name, _difference(outputs, alone))
            except Exception as exc:  # noqa: BLE001
                result.errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        set_attention(model, default_attention(model))
        for name in ("fused", "own"):
            try:
                _, value = run_path(model, False, examples, name)
                setattr(result, f"{name}_loss", abs(value - truth))
            except Exception as exc:  # noqa: BLE001
                result.errors[f"{name}_loss"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return result


def aux_applies(model: Any) -> bool:
    """TRL's rule: an auxiliary router loss is trained where the config has `output_router_logits` and a coef."""
    text = model.config.get_text_config()
    return hasattr(text, "output_router_logits") and bool(getattr(text, "router_aux_loss_coef", 0.0))


def aux_losses(model: Any, examples: list[list[int]]) -> tuple[Any, Any]:
    """(TRL's fused-head auxiliary loss, the model's own) on a padded batch, with router logits on."""
    import torch

    model.config.get_text_config().output_router_logits = True
    batch = batch_for(False, examples)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        own = model(**inputs, use_cache=False, output_router_logits=True).aux_loss
        fused = model(**batch, use_cache=False, fused_lm_head=True).aux_loss
    return fused, own
