"""The Flash kernel's limits are part of the plan, behind the same seam (`call_kernel`): head dims over 256 (Gemma-4's
global layers, 512) take the exact path, and MLA's value head dim, smaller than the query's (DeepSeek-V2/V3,
MiniCPM3, GLM-4.x-Flash, LongCat), is zero-padded for the kernel and the output cropped, as transformers' flash
integration does. A CPU stand-in with the kernel's insistence on one head dim receives the arguments."""

from __future__ import annotations

import pytest
import torch
from test_attention import NEW_KERNEL, stand_in_varlen_attn

import lora_causal.model.attention as attention
from lora_causal.model.batching import AttentionNeeds, DeviceInfo, plan_batching

H100 = DeviceInfo("cuda", "NVIDIA H100", (9, 0))


def _packed(qk_dim: int, v_dim: int, heads: int = 4, kv_heads: int = 2, lengths=(5, 3, 7)):
    generator = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    q = torch.randn(1, heads, tokens, qk_dim, generator=generator)
    k = torch.randn(1, kv_heads, tokens, qk_dim, generator=generator)
    v = torch.randn(1, kv_heads, tokens, v_dim, generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, cu, max(lengths)


class _Module:
    training = False


@pytest.mark.parametrize(("qk_dim", "v_dim"), [(192, 128), (96, 64), (64, 64)], ids=["deepseek-v3", "minicpm3", "plain"])
def test_mla_value_is_padded_for_the_kernel_and_cropped(monkeypatch, qk_dim: int, v_dim: int) -> None:
    seen = []

    def kernel(q, k, v, *args, **options):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] <= attention.FLASH_MAX_HEAD_DIM, "one head dim, at most 256"
        assert torch.equal(v[..., v_dim:], torch.zeros_like(v[..., v_dim:])), "V padded with zeros"
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return stand_in_varlen_attn(q, k, v, *args, **options)

    monkeypatch.setattr(attention, "kernel_parameters", lambda: NEW_KERNEL)
    monkeypatch.setattr(attention, "_capability", lambda device: (9, 0))
    real_verdict = attention.kernel_verdict
    monkeypatch.setattr(attention, "kernel_verdict", lambda d, c, t, **k: real_verdict("cuda", c, "bfloat16", **k))
    monkeypatch.setattr(attention, "call_kernel", kernel)
    q, k, v, cu, longest = _packed(qk_dim, v_dim)
    scale = qk_dim ** -0.5
    output, _ = attention.varlen_attention_forward(_Module(), q, k, v, None, scaling=scale, cu_seq_lens_q=cu,
                                                   cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    assert seen == [((15, 4, qk_dim), (15, 2, qk_dim), (15, 2, qk_dim))]  # [tokens, heads, dim], V at the query's dim
    assert output.shape == (1, 15, 4, v_dim)
    exact = attention.exact_packed_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                             scale)
    assert torch.allclose(output[0], exact, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "v_head_dim", "expected"), [
    (512, None, "head dim 512 is over the Flash kernel's limit of 256"),
    (256, None, None),
    (192, 128, None),
    (128, 192, "value head dim 192 is larger than the query's 128"),
    (100, None, "not a multiple of 8"),
])
def test_kernel_verdict_on_head_dims(head_dim: int, v_head_dim: int | None, expected: str | None) -> None:
    verdict = attention.kernel_verdict("cuda", (9, 0), "bfloat16", parameters=NEW_KERNEL, head_dim=head_dim,
                                       v_head_dim=v_head_dim)
    assert verdict == expected if expected is None else expected in verdict


def test_exact_path_is_taken_at_run_time_over_the_limit(monkeypatch) -> None:
    monkeypatch.setattr(attention, "kernel_parameters", lambda: NEW_KERNEL)
    real_verdict = attention.kernel_verdict
    monkeypatch.setattr(attention, "kernel_verdict", lambda d, c, t, **k: real_verdict("cuda", (9, 0), "bfloat16", **k))
    monkeypatch.setattr(attention, "call_kernel", lambda *a, **k: pytest.fail("the kernel must not get head dim 512"))
    q, k, v, cu, longest = _packed(512, 512, lengths=(3, 4))
    output, _ = attention.varlen_attention_forward(_Module(), q, k, v, None, scaling=0.05, cu_seq_lens_q=cu,
                                                   cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    assert output.shape == (1, 7, 4, 512)


def _needs(model_type: str, **values) -> AttentionNeeds:
    from transformers import AutoConfig

    return AttentionNeeds.from_config(AutoConfig.for_model(model_type, **values))


def test_plan_reads_head_dims_from_configs() -> None:
    deepseek = _needs("deepseek_v3")
    assert (deepseek.head_dim, deepseek.v_head_dim) == (192, 128)
    gemma4 = _needs("gemma4")
    assert gemma4.head_dim == 512  # the global layers' per-layer head_dim, not the sliding layers' 256
    llama = _needs("llama", hidden_size=4096, num_attention_heads=32)
    assert (llama.head_dim, llama.v_head_dim) == (128, None)


def test_plan_verdicts_on_a_flash_gpu() -> None:
    mla = plan_batching("auto", "auto", "bfloat16", H100, AttentionNeeds("llama", head_dim=192, v_head_dim=128),
                        NEW_KERNEL)
    assert mla.padding_free and mla.attn_implementation == "varlen" and "Flash Attention" in mla.kernel
    assert "value head dim 128 padded to 192 and cropped" in mla.reason
    wide = plan_batching("auto", "auto", "bfloat16", H100, AttentionNeeds("llama", head_dim=512), NEW_KERNEL)
    assert not wide.padding_free and "head dim 512 is over the Flash kernel's limit of 256" in wide.reason
    plain = plan_batching("auto", "auto", "bfloat16", H100, AttentionNeeds("llama", head_dim=128), NEW_KERNEL)
    assert plain.padding_free and "padded" not in plain.reason
