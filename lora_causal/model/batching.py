"""Which batching and attention a run uses, and why: `train.padding_free: auto` and `model.attn_implementation: auto`.

Padding-free batches (one packed row per micro-batch, no padding computed) with varlen attention are the default
wherever they are exact for the model and fast on the device:
- on a CUDA GPU that Flash Attention's varlen kernel serves (compute capability 8.0+, bf16/fp16 compute, no
  attention dropout, no logit softcapping, a sliding window only where the kernel takes one): padding-free +
  varlen (Flash Attention);
- on the CPU: padding-free + varlen computed sequence by sequence (no padding and no tokens x tokens mask; the
  fastest arm of the CPU benchmark);
- otherwise (older GPUs, float32, softcapping models such as Gemma-2, attention dropout, models that take no
  custom attention function): padded batches with the model's own attention, the stock path.
`train.padding_free: false` is the stock path on any device; explicit settings are honoured where they are exact.

Before any of that, the architecture's classification (lora_causal.model.families, checked architecture by
architecture by the conformance sweep) decides whether packed rows can be exact at all: an architecture routed
to padded batches (state carried along the sequence, attention sinks, chunked attention, RoBERTa-style
positions, layers that do not pass the boundaries, ...) gets them with the reason, and an explicit request for
packed rows there is refused in one line; an architecture no path is exact for is refused before weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_causal.core.recipe import ModelSection, QuantizationSection, TrainSection

VARLEN = "varlen"


@dataclass(frozen=True)
class DeviceInfo:
    """The device a process trains on, as far as the choice of kernels is concerned."""

    type: str  # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] | None = None

    @classmethod
    def current(cls) -> DeviceInfo:
        import torch

        if torch.cuda.is_available():
            return cls("cuda", torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)))
        return cls("cpu", "cpu")


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model's attention layers ask of an attention function (read from its config, no weights)."""

    model_type: str
    softcap: float | None = None
    sliding_window: int | None = None
    dropout: float = 0.0
    custom_attention: bool = True  # the model class takes attention functions registered with AttentionInterface
    head_dim: int | None = None  # the largest query/key head dim of any layer
    v_head_dim: int | None = None  # the value head dim where it differs (MLA)

    @classmethod
    def from_config(cls, config: Any, trust_remote_code: bool = False) -> AttentionNeeds:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(
            model_type=getattr(config, "model_type", "unknown"),
            softcap=getattr(text, "attn_logit_softcapping", None),
            sliding_window=getattr(text, "sliding_window", None),
            dropout=float(getattr(text, "attention_dropout", 0.0) or 0.0),
            custom_attention=not trust_remote_code and _takes_custom_attention(config),
            **head_dims(text),
        )


def head_dims(text: Any) -> dict[str, int | None]:
    """The largest query/key head dim of any layer and the value head dim (MLA: qk_nope + qk_rope and v_head_dim;
    Gemma-4: the per-layer head_dim of its global layers), read from the config's values."""
    values = text.to_dict() if hasattr(text, "to_dict") else {}
    qk = values.get("qk_head_dim")
    if qk is None and values.get("qk_nope_head_dim") is not None and values.get("qk_rope_head_dim") is not None:
        qk = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
    if qk is None:
        qk = values.get("head_dim")
    if qk is None and values.get("hidden_size") and values.get("num_attention_heads"):
        qk = values["hidden_size"] // values["num_attention_heads"]
    layers = [layer.get("head_dim") for layer in (values.get("per_layer_config") or {}).values() if isinstance(layer, dict)]
    dims = [dim for dim in (qk, values.get("global_head_dim"), *layers) if isinstance(dim, int)]
    value = values.get("v_head_dim")
    return {"head_dim": max(dims) if dims else None, "v_head_dim": value if isinstance(value, int) and value != qk else None}


def _takes_custom_attention(config: Any) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return bool(getattr(model_class, "_supports_attention_backend", False))


@dataclass(frozen=True)
class BatchingPlan:
    padding_free: bool
    attn_implementation: str  # the recipe value the model loads with: "varlen", "auto" (the model's own), ...
    kernel: str  # what computes attention, in words
    reason: str

    def line(self) -> str:
        batches = "padding-free rows" if self.padding_free else "padded batches"
        return f"batching: {batches}, attention: {self.kernel} ({self.reason})"


def plan_batching(  # noqa: PLR0911, PLR0912, PLR0913
    padding_free: bool | str, attn_implementation: str, compute_dtype: str, device: DeviceInfo, needs: AttentionNeeds,
    kernel_parameters: frozenset[str] | None, token_budget: bool = False, pad_to_multiple_of: bool = False,
) -> BatchingPlan:
    """Resolve the `auto` settings for one device and model; explicit settings pass through unchanged where they
    are exact for the architecture, and are refused (UserError) where they are not."""
    from lora_causal.model.attention import kernel_verdict

    routed = _routed_by_family(padding_free, attn_implementation, needs, token_budget)
    if routed is not None:
        return routed

    verdict = kernel_verdict(device.type, device.capability, compute_dtype, dropout=needs.dropout,
                             softcap=needs.softcap, sliding_window=needs.sliding_window, parameters=kernel_parameters,
                             head_dim=needs.head_dim, v_head_dim=needs.v_head_dim)
    flash = verdict is None
    varlen_kernel = "varlen, Flash Attention kernel" if flash else "varlen, exact per-sequence"
    packed_own = "the model's own, with a block-diagonal mask from position_ids"
    cause = ""
    if padding_free == "auto" and (token_budget or attn_implementation == VARLEN):
        padding_free = True  # both need packed rows
        cause = "train.token_budget; " if token_budget else ""
    elif padding_free == "auto" and (pad_to_multiple_of or attn_implementation != "auto"):
        padding_free = False  # padding to a multiple, or an attention chosen by hand: padded batches
    if attn_implementation == VARLEN:
        caveat = "" if flash or device.type == "cpu" else f"; no Flash Attention: {verdict}"
        return BatchingPlan(True, VARLEN, varlen_kernel, f"model.attn_implementation: varlen{caveat}")
    if attn_implementation != "auto":
        return BatchingPlan(bool(padding_free), attn_implementation,
                            f"{attn_implementation}, block-diagonal mask" if padding_free else attn_implementation,
                            f"model.attn_implementation: {attn_implementation}")
    if padding_free is False:
        return BatchingPlan(False, "auto", "the model's default", "train.padding_free: false, the stock path")
    asked = cause or ("train.padding_free: true; " if padding_free is True else "")
    if not needs.custom_attention:
        if padding_free is True:
            return BatchingPlan(True, "auto", packed_own, f"{asked}{needs.model_type} takes no custom attention function")
        return BatchingPlan(False, "auto", "the model's default",
                            f"{needs.model_type} takes no custom attention function, so the stock path")
    if device.type == "cpu":
        return BatchingPlan(True, VARLEN, varlen_kernel, f"{asked}on the CPU: no padding and no tokens x tokens mask")
    if flash:
        padded_v = (f"; value head dim {needs.v_head_dim} padded to {needs.head_dim} and cropped, as transformers' "
                    "flash integration does" if needs.v_head_dim is not None else "")
        return BatchingPlan(True, VARLEN, varlen_kernel,
                            f"{asked}{device.name} runs Flash Attention's varlen kernel in {compute_dtype}{padded_v}")
    if padding_free is True:  # asked for, but the kernel cannot serve it: still exact, with a mask
        return BatchingPlan(True, "auto", packed_own, f"{asked}no varlen kernel here: {verdict}")
    return BatchingPlan(False, "auto", "the model's default", f"the stock path, since {verdict}")


def _routed_by_family(padding_free: bool | str, attn_implementation: str, needs: AttentionNeeds,
                      token_budget: bool) -> BatchingPlan | None:
    """The padded plan of an architecture classified padded (None for the others); refusals as UserError."""
    from lora_causal.core.errors import UserError
    from lora_causal.model.families import PADDED, REFUSED, family

    found = family(needs.model_type)
    name = needs.model_type
    if found.verdict == REFUSED:
        raise UserError(f"model.name_or_path: {name} models cannot be trained exactly by lora_causal: {found.reason}; "
                        "choose a model of another architecture")
    if found.verdict != PADDED:
        return None
    asked = ("train.token_budget" if token_budget else "model.attn_implementation: varlen"
             if attn_implementation == VARLEN else "train.padding_free: true" if padding_free is True else None)
    if asked is not None and not found.classified:
        return None  # asked for by hand on an architecture not classified yet: honoured
    if asked is not None:
        raise UserError(f"{asked}: packed rows would train {name} wrongly, since {found.reason}; remove it (padded "
                        "batches are exact for this model)" if asked == "train.token_budget" else
                        f"{asked}: packed rows would train {name} wrongly, since {found.reason}; set "
                        f"{asked.split(':')[0]}: auto (padded batches, exact for this model)")
    own = attn_implementation if attn_implementation != "auto" else "the model's default"
    return BatchingPlan(False, attn_implementation, own, f"{name}: padded batches, since {found.reason}")


def plan_for_model(model: ModelSection, quantization: QuantizationSection, train: TrainSection,
                   device: DeviceInfo | None = None, config: Any = None) -> BatchingPlan:
    """The batching plan for these recipe sections on this machine's device (reads the model's config, no weights)."""
    from lora_causal.model.attention import kernel_parameters
    from lora_causal.model.loading import resolve_compute_dtype
    from lora_causal.model.skeleton import model_config

    device = device or DeviceInfo.current()
    config = config if config is not None else model_config(model)
    dtype = str(resolve_compute_dtype(quantization.compute_dtype)).removeprefix("torch.")
    return plan_batching(
        train.padding_free, model.attn_implementation, dtype, device,
        AttentionNeeds.from_config(config, model.trust_remote_code), kernel_parameters(),
        token_budget=train.explicit_token_budget is not None, pad_to_multiple_of=train.pad_to_multiple_of is not None,
    )
