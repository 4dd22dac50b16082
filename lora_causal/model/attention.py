"""Varlen attention for padding-free batches, registered through transformers' AttentionInterface.

A padding-free batch is one row of concatenated sequences with `cu_seq_lens_q/k` marking their starts. Varlen
attention computes causal attention inside each sequence and never across them, with no tokens x tokens mask.
It honours what the model's attention layer asks for: GQA, the scale, a sliding window (`sliding_window`, as
Mistral, Gemma-2/3 and Phi-3 pass it) and logit softcapping (`softcap`, Gemma-2).

Two paths, chosen up front by `kernel_verdict` from the device, dtype and the layer's needs, and said once:
- flash: `torch.nn.attention.varlen.varlen_attn` (Flash Attention inside PyTorch) on CUDA GPUs of compute
  capability 8.0+ in bf16/fp16. `flash_varlen_arguments` prepares its arguments (the kernel's layout, int32
  cumulative lengths, max lengths as ints, causality and window as the kernel's (left, right) tuple or its older
  `is_causal` flag, GQA) and `call_kernel` is the one call into it, so tests on the CPU drive the argument
  preparation against a CPU stand-in with the kernel's semantics.
- exact: attention computed sequence by sequence (sdpa, or an explicit softmax where softcapping is needed).
  The reference on the CPU (where it is also the fast path: no padding, no mask) and the fallback for what the
  kernel cannot do (softcapping, attention dropout, float32, GPUs older than Ampere, a torch without varlen_attn).
Anything that is not a packed row (generation, padded batches) is computed like the model's own attention.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

NAME = "lora_causal_varlen"
FLASH_MIN_CAPABILITY = (8, 0)  # Flash Attention 2 kernels need Ampere or newer

logger = logging.getLogger(__name__)


@functools.cache
def register() -> str:
    """Register the attention and its mask function under NAME (once per process); return NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for packed rows and plain causal input (the kernel knows the boundaries); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Choosing the path


@functools.cache
def kernel_parameters() -> frozenset[str] | None:
    """The keyword parameters of this torch's `varlen_attn`, or None where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def kernel_verdict(  # noqa: PLR0913
    device_type: str, capability: tuple[int, int] | None, dtype_name: str, *, dropout: float = 0.0,
    softcap: float | None = None, sliding_window: int | None = None, parameters: frozenset[str] | None = None,
) -> str | None:
    """None when the flash kernel computes this attention exactly; otherwise why the exact path must be taken."""
    if device_type != "cuda":
        return "not on a CUDA GPU"
    if parameters is None:
        return "this torch has no torch.nn.attention.varlen.varlen_attn"
    if "scale" not in parameters:
        return "this torch's varlen_attn takes no scale (models scale attention their own way)"
    if capability is not None and tuple(capability) < FLASH_MIN_CAPABILITY:
        return f"Flash Attention needs compute capability 8.0+, this GPU has {capability[0]}.{capability[1]}"
    if dtype_name not in ("bfloat16", "float16"):
        return f"Flash Attention computes in bfloat16/float16, not {dtype_name}"
    if dropout:
        return "the kernel has no attention dropout"
    if softcap is not None:
        return "the kernel cannot apply attention logit softcapping"
    if sliding_window is not None and "window_size" not in parameters:
        return "this torch's varlen_attn takes no window_size for the model's sliding window"
    return None


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------------------
# The attention function


def varlen_attention_forward(  # noqa: PLR0913
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: query/key/value [batch, heads, tokens, dim] -> [batch, tokens, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    dropout = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cu_q = kwargs.get("cu_seq_lens_q")
    if attention_mask is not None:
        # padded batches and generation: the model's own masked attention (softcapping needs the explicit softmax)
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        return masked_attention(query, key, value, attention_mask, scale, softcap, dropout), None
    if cu_q is None or query.shape[0] != 1:
        # rows without padding or boundaries (a lone prompt, a KV-cache step): each row is one causal sequence
        return sequence_attention(query, key, value, scale, window, softcap, dropout), None
    cu_k = kwargs.get("cu_seq_lens_k")
    return _packed_attention(module, query, key, value, cu_q, cu_q if cu_k is None else cu_k, kwargs.get("max_length_q"),
                             kwargs.get("max_length_k"), scale, window, softcap, dropout), None


def _packed_attention(  # noqa: PLR0913
    module: Any, query: Any, key: Any, value: Any, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, scale: float,
    window: int | None, softcap: float | None, dropout: float,
) -> Any:
    """One packed row [1, heads, tokens, dim] -> [1, tokens, heads, dim], by the flash kernel or exactly."""
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, dim]
    reason = kernel_verdict(
        q.device.type, _capability(q.device), str(q.dtype).removeprefix("torch."), dropout=dropout, softcap=softcap,
        sliding_window=window, parameters=kernel_parameters(),
    )
    if reason is None:
        args, options = flash_varlen_arguments(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, kernel_parameters())
        output = call_kernel(*args, **options)
    else:
        if q.device.type == "cuda":  # on the CPU the exact path is the normal one, nothing to say
            _say_once(f"{NAME}: exact per-sequence attention instead of Flash Attention ({reason}); correct but slower "
                      f"(layer {type(module).__name__})")
        output = exact_packed_attention(q, k, v, cu_q, cu_k, scale, window, softcap, dropout)
    return output.unsqueeze(0)


def _capability(device: Any) -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def flash_varlen_arguments(  # noqa: PLR0913
    q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, scale: float, window: int | None,
    parameters: frozenset[str] | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for `varlen_attn` (q/k/v [tokens, heads, dim]).

    transformers' `sliding_window` W lets a token see itself and the W - 1 before it; the kernel's window is
    (left, right) tokens beside the query, so W becomes (W - 1, 0). Causal without a window is (-1, 0) on torch
    2.12+, `is_causal=True` on 2.10/2.11.
    """
    import torch

    parameters = parameters or frozenset()
    device = q.device
    cu_q = cu_q.to(device=device, dtype=torch.int32)
    cu_k = cu_k.to(device=device, dtype=torch.int32)
    # max lengths are ints: the collator gives them; deriving them from the boundaries costs one host sync
    max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
    options: dict[str, Any] = {"scale": scale}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if "window_size" in parameters:
        options["window_size"] = (window - 1 if window is not None else -1, 0)
    else:
        options["is_causal"] = True
    return (q, k, v, cu_q, cu_k, max_q, max_k), options


def call_kernel(*args: Any, **options: Any) -> Any:
    """The one call into the CUDA kernel (the seam the CPU tests replace with a stand-in)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, **options)


# ---------------------------------------------------------------------------------------------------------
# Exact paths


def exact_packed_attention(  # noqa: PLR0913
    q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, scale: float, window: int | None = None,
    softcap: float | None = None, dropout: float = 0.0,
) -> Any:
    """Causal attention within each sequence of a packed row [tokens, heads, dim], sequence by sequence.

    The boundaries are read once (one host sync per call on a GPU).
    """
    import torch

    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outputs = []
    for index in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[index], starts_q[index + 1], starts_k[index], starts_k[index + 1]
        block = sequence_attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                   v[ks:ke].transpose(0, 1)[None], scale, window, softcap, dropout)
        outputs.append(block[0])
    return torch.cat(outputs, dim=0)


def blockwise_attention(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, scale: float, dropout: float = 0.0) -> Any:
    """Plain causal attention per packed sequence (no window, no softcap): the reference the tests compare with."""
    return exact_packed_attention(q, k, v, cu_q, cu_k, scale, dropout=dropout)


def sequence_attention(  # noqa: PLR0913
    q: Any, k: Any, v: Any, scale: float, window: int | None = None, softcap: float | None = None,
    dropout: float = 0.0,
) -> Any:
    """Causal attention over whole rows, [batch, heads, tokens, dim] -> [batch, tokens, heads, dim].

    Queries are the last tokens of the keys (a KV-cache step has fewer queries than keys).
    """
    import torch

    length, key_length = q.shape[2], k.shape[2]
    if window is None and softcap is None and length in (1, key_length):
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scale, dropout_p=dropout,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
    query_position = torch.arange(key_length - length, key_length, device=q.device)[:, None]
    key_position = torch.arange(key_length, device=q.device)[None, :]
    allowed = key_position <= query_position
    if window is not None:
        allowed &= key_position > query_position - window
    return masked_attention(q, k, v, allowed[None, None], scale, softcap, dropout)


def masked_attention(  # noqa: PLR0913
    query: Any, key: Any, value: Any, mask: Any, scale: float, softcap: float | None = None, dropout: float = 0.0,
) -> Any:
    """Explicit softmax attention (what the models' eager path computes): [b, h, t, d] -> [b, t, h, d].

    `mask` is a boolean "may attend" mask or an additive float mask, broadcastable to [b, h, t, keys].
    """
    import torch

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask[..., : key.shape[2]]
        # the dtype minimum, not -inf: a fully masked (padding) row stays finite instead of spreading NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()

