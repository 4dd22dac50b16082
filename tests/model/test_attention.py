"""Varlen attention honours every model's attention: GQA, sliding windows, logit softcapping.

Each packed sequence must get the logits it gets alone through the model's own attention (sdpa, or eager for
Gemma-2), on both paths:
- the exact per-sequence path (the CPU's, and the fallback for what the kernel cannot do);
- the CUDA branch: the real argument preparation of `flash_varlen_arguments` fed to a CPU stand-in for
  `torch.nn.attention.varlen.varlen_attn` that implements the kernel's documented semantics and checks the
  argument types the kernel insists on (int32 boundaries, int max lengths, a (left, right) window tuple).
Tiny models: Llama (GQA), Mistral (sliding window 4), Gemma-2 (softcapping + window 4). Sequences are longer
than the window, so a window that is ignored or off by one changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_packing import _alone, _packed

import lora_causal.model.attention as attention
from lora_causal.core.recipe import ModelSection, QuantizationSection
from lora_causal.data.collator import CausalLMCollator
from lora_causal.model.loading import load_base_model

TOLERANCE = 1e-4
SEQUENCES = [[1, 53, 30, 77, 41, 12, 9, 33, 2], [1, 99, 12, 2], [1, 45, 46, 47, 48, 49, 50, 51, 52, 60, 61, 2]]
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2}
CONFIGS = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": 4},
    "gemma2": {"model_type": "gemma2", "head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16},
}
NEW_KERNEL = frozenset({"scale", "window_size", "enable_gqa"})  # torch 2.12+
OLD_KERNEL = frozenset({"scale", "is_causal", "enable_gqa"})  # torch 2.10 / 2.11: no window


def stand_in_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None,
                         enable_gqa=False):
    """CPU stand-in for varlen_attn: the kernel's semantics, and its insistence on argument types."""
    assert q.dim() == k.dim() == v.dim() == 3, "layout must be [tokens, heads, dim]"
    assert cu_q.dtype == cu_k.dtype == torch.int32, "cumulative lengths must be int32"
    assert type(max_q) is int and type(max_k) is int, "max lengths must be Python ints"
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert (window_size is None) != (is_causal is None), "one causality convention at a time"
    left, right = window_size if window_size is not None else (-1, 0)
    assert isinstance(window_size, tuple) or window_size is None, "window_size is a (left, right) tuple"
    if q.shape[1] != k.shape[1]:
        assert enable_gqa, "GQA needs enable_gqa=True"
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = torch.empty_like(q)
    for index in range(len(cu_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_q[index], cu_q[index + 1], cu_k[index], cu_k[index + 1]))
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * scale
        i = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        j = torch.arange(ke - ks)[None, :]
        allowed = torch.ones_like(scores[0], dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", weights, v[ks:ke])
    return out


def _pretend_cuda(monkeypatch: pytest.MonkeyPatch, parameters: frozenset[str], kernel) -> None:
    """Take the CUDA branch on the CPU: an H100-class device in bf16, this kernel signature, the stand-in kernel."""
    real_verdict = attention.kernel_verdict
    monkeypatch.setattr(attention, "kernel_parameters", lambda: parameters)
    monkeypatch.setattr(attention, "kernel_verdict",
                        lambda device_type, capability, dtype_name, **k: real_verdict("cuda", (9, 0), "bfloat16", **k))
    monkeypatch.setattr(attention, "call_kernel", kernel)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**COMMON, **CONFIGS[request.param]}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _load(folder: Path, attn: str):
    model = load_base_model(ModelSection(name_or_path=str(folder), attn_implementation=attn),
                            QuantizationSection(mode="none"), seed=0)
    return model.eval()


def _worst(model, reference) -> float:
    return max(float((packed - _alone(reference, ids)).abs().max()) for ids, packed in zip(SEQUENCES, _packed(model, SEQUENCES)))


def test_exact_path_matches_each_model_alone(model_dir: Path) -> None:
    reference, varlen = _load(model_dir, "auto"), _load(model_dir, "varlen")
    assert _worst(varlen, reference) < TOLERANCE


@pytest.mark.parametrize("parameters", [NEW_KERNEL, OLD_KERNEL], ids=["torch-2.12+", "torch-2.10"])
def test_cuda_branch_arguments_against_a_kernel_stand_in(model_dir: Path, parameters, monkeypatch) -> None:
    """The CUDA branch as it runs on a GPU, kernel replaced by the stand-in; what it cannot do takes the exact path."""
    kernel_calls: list[dict] = []
    exact_calls: list[int] = []

    def stand_in(*args, **options):
        kernel_calls.append(options)
        return stand_in_varlen_attn(*args, **options)

    real_exact = attention.exact_packed_attention
    _pretend_cuda(monkeypatch, parameters, stand_in)
    monkeypatch.setattr(attention, "exact_packed_attention", lambda *a, **k: exact_calls.append(1) or real_exact(*a, **k))
    reference, varlen = _load(model_dir, "auto"), _load(model_dir, "varlen")
    assert _worst(varlen, reference) < TOLERANCE
    config = varlen.config
    kernel_ok = config.model_type == "llama" or (config.model_type == "mistral" and "window_size" in parameters)
    layers = config.num_hidden_layers
    if kernel_ok:
        assert len(kernel_calls) == layers and not exact_calls
        options = kernel_calls[0]
        assert options["enable_gqa"] is True
        assert options["scale"] == pytest.approx(varlen.model.layers[0].self_attn.scaling)
        if "window_size" in parameters:
            window = getattr(config, "sliding_window", None)
            assert options["window_size"] == ((window - 1, 0) if window else (-1, 0))
        else:
            assert options["is_causal"] is True and "window_size" not in options
    else:  # softcapping (Gemma-2), or a window the kernel cannot take: the exact path, every layer
        assert not kernel_calls and len(exact_calls) == layers


def test_window_off_by_one_would_be_caught(model_dir: Path, monkeypatch) -> None:
    """The stand-in comparison is sharp: a window one token too wide changes the logits of a windowed model."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(model_dir).model_type != "mistral":
        pytest.skip("only the Mistral config has a plain sliding window")
    real = attention.flash_varlen_arguments

    def too_wide(*args, **kwargs):
        positional, options = real(*args, **kwargs)
        left, right = options["window_size"]
        return positional, {**options, "window_size": (left + 1, right)}

    _pretend_cuda(monkeypatch, NEW_KERNEL, stand_in_varlen_attn)
    monkeypatch.setattr(attention, "flash_varlen_arguments", too_wide)
    reference, varlen = _load(model_dir, "auto"), _load(model_dir, "varlen")
    assert _worst(varlen, reference) > 1e-3


def test_padded_batches_and_generation_keep_the_models_attention(model_dir: Path) -> None:
    reference, varlen = _load(model_dir, "auto"), _load(model_dir, "varlen")
    padded = CausalLMCollator(pad_token_id=0)([{"input_ids": ids} for ids in SEQUENCES])
    padded.pop("labels")
    with torch.no_grad():
        mask = padded["attention_mask"].bool()
        assert torch.allclose(varlen(**padded).logits[mask], reference(**padded).logits[mask], atol=TOLERANCE)
        prompt = torch.tensor([SEQUENCES[2][:7]])  # longer than the window
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert varlen.generate(input_ids=prompt, **kwargs).tolist() == reference.generate(input_ids=prompt, **kwargs).tolist()


@pytest.mark.parametrize(
    ("device", "capability", "dtype", "extra", "expected"),
    [
        ("cuda", (9, 0), "bfloat16", {}, None),
        ("cuda", (8, 0), "float16", {"sliding_window": 4096}, None),
        ("cuda", (7, 5), "float16", {}, "compute capability 8.0+, this GPU has 7.5"),
        ("cuda", (9, 0), "float32", {}, "not float32"),
        ("cuda", (9, 0), "bfloat16", {"dropout": 0.1}, "no attention dropout"),
        ("cuda", (9, 0), "bfloat16", {"softcap": 50.0}, "softcapping"),
        ("cpu", None, "float32", {}, "not on a CUDA GPU"),
    ],
)
def test_kernel_verdict(device, capability, dtype, extra, expected) -> None:
    verdict = attention.kernel_verdict(device, capability, dtype, parameters=NEW_KERNEL, **extra)
    if expected is None:
        assert verdict is None
    else:
        assert expected in verdict
    if device == "cuda" and "sliding_window" in extra:
        assert "window_size" in attention.kernel_verdict(device, capability, dtype, parameters=OLD_KERNEL, **extra)
