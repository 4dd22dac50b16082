"""Varlen attention for padding-free batches, registered through transformers' AttentionInterface.

A padding-free batch is one row of concatenated sequences with `cu_seq_lens_q/k` marking their starts. Varlen
attention computes causal attention inside each sequence and never across them, with no T x T mask:
- on CUDA with bf16/fp16: `torch.nn.attention.varlen.varlen_attn` (Flash Attention inside PyTorch; its keyword
  for causality and GQA changed across torch versions, so it is called according to its signature);
- elsewhere (CPU, float32): scaled_dot_product_attention sequence by sequence, the exact reference.
Anything that is not a packed row (generation, padded batches) goes to the regular sdpa path.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NAME = "lora_causal_varlen"


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


def varlen_attention_forward(  # noqa: PLR0913
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: query/key/value [batch, heads, tokens, dim] -> [batch, tokens, heads, dim]."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    lengths_q, lengths_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    max_q = int(kwargs.get("max_length_q") or lengths_q.max())
    max_k = int(kwargs.get("max_length_k") or lengths_k.max())
    dropout = dropout if module.training else 0.0
    flash_ready = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
    kernel = _torch_varlen() if flash_ready else None
    output = None
    if kernel is not None:
        output = kernel(q, k, v, cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32), max_q, max_k, scale)
    if output is None:
        output = blockwise_attention(q, k, v, cu_q, cu_k, scale, dropout)
    return output.unsqueeze(0), None


def blockwise_attention(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, scale: float, dropout: float = 0.0) -> Any:
    """Causal attention within each sequence of a packed row, one sdpa call per sequence (reference path)."""
    import torch
    import torch.nn.functional as F

    outputs = []
    gqa = q.shape[1] != k.shape[1]
    for index in range(len(cu_q) - 1):
        qs, qe, ks, ke = (int(cu_q[index]), int(cu_q[index + 1]), int(cu_k[index]), int(cu_k[index + 1]))
        block = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None],
            is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa,
        )
        outputs.append(block[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


@functools.cache
def _torch_varlen() -> Any:
    """`varlen_attn` adapted to one call shape, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters

    def call(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, scale: float) -> Any:
        options: dict[str, Any] = {}
        if "scale" in parameters:
            options["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            return None
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in parameters:
                options["enable_gqa"] = True
            else:
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if "is_causal" in parameters:  # torch 2.10 and 2.11
            options["is_causal"] = True
        else:  # torch 2.12+: causal is a (left, right) window with nothing to the right
            options["window_size"] = (-1, 0)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    return call
