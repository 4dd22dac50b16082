"""Our GGUF writer, on the `gguf` package (gguf-py from PyPI), for the families we test: Llama, Mistral, Qwen2.

Tensor names come from gguf's own `get_tensor_name_map`. Llama and Mistral q_proj/k_proj rows are permuted from
Hugging Face's rotate-half rotary layout into the interleaved pairs llama.cpp's Llama graph expects (the layout
llama.cpp's `convert_hf_to_gguf.py` writes for LlamaModel, and which transformers' GGUF loader undoes in
`LlamaTensorProcessor`); Qwen2 uses NeoX rotary in llama.cpp and is written unpermuted. A wrong layout is caught by
the parity check (lora_causal.serving.parity), never by reading the file back with a second GGUF reader.

Types: f32; f16 and bf16 (matrices; norms and biases stay f32, as llama.cpp writes them); q8_0 (gguf's numpy
quantizer; a matrix whose rows are not a multiple of 32 values stays f16). K-quants need llama.cpp's quantizer
(lora_causal.serving.quantize).

Refused, with llama.cpp's converter as the way out: other families, rope scaling (llama.cpp stores Llama-3 scaling
as an extra tensor that transformers' reader ignores, so parity could not be proven), sliding-window attention,
checkpoints still carrying a bitsandbytes quantization_config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lora_causal.core.errors import UserError

WRITER_TYPES = ("f32", "f16", "bf16", "q8_0")
FAMILIES = ("llama", "mistral", "qwen2")
CONVERTER_FIX = "export it with llama.cpp's converter: --converter llama.cpp with LLAMA_CPP_DIR set to a llama.cpp checkout"


@dataclass(frozen=True)
class Family:
    arch: str  # gguf MODEL_ARCH member name
    permute_qk: bool


FAMILY = {"llama": Family("LLAMA", True), "mistral": Family("LLAMA", True), "qwen2": Family("QWEN2", False)}


def read_config(folder: Path) -> dict[str, Any]:
    from lora_causal.core.readers import read_json_object

    return read_json_object(folder / "config.json", "export a folder saved by `lora-causal merge` (or save_pretrained)")


def check_supported(config: dict[str, Any]) -> None:
    """Refuse, before any work, a model this writer cannot write faithfully."""
    if config.get("quantization_config"):
        raise UserError("this model still carries a quantization_config (bitsandbytes weights); GGUF needs plain 16-bit "
                        "weights: export the folder written by `lora-causal merge`")
    family = config.get("model_type")
    if family not in FAMILY:
        raise UserError(f"the GGUF writer supports {', '.join(FAMILIES)} models, and this is a {family} model; {CONVERTER_FIX}")
    scaling = config.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise UserError(f"this model uses {scaling.get('rope_type', scaling.get('type'))} rope scaling, which the GGUF "
                        f"writer does not write; {CONVERTER_FIX}")
    if config.get("use_sliding_window") or (family == "mistral" and config.get("sliding_window")):
        raise UserError(f"this model uses sliding-window attention, which the GGUF writer does not write; {CONVERTER_FIX}")


def permute_qk(weights: Any, heads: int) -> Any:
    """Hugging Face rotate-half rows -> llama.cpp's interleaved rotary pairs, per head (q: all heads, k: KV heads)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(folder: Path) -> list[tuple[str, Path]]:
    """(name, file) for every tensor of a safetensors checkpoint (one file or an index)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{folder}' holds no .safetensors weights; export the folder written by `lora-causal merge`")
    names = []
    for file in files:
        with safe_open(str(file), framework="np") as handle:
            names += [(name, file) for name in handle.keys()]  # noqa: SIM118
    return names


def _encode(data: Any, kind: str, gguf: Any) -> tuple[Any, Any]:
    """(array, raw_dtype) for add_tensor: vectors stay f32; matrices take the export type."""
    import numpy as np

    types = gguf.GGMLQuantizationType
    data = data.astype(np.float32)
    if data.ndim == 1 or kind == "f32":
        return data, None
    if kind == "f16" or (kind == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), None
    qtype = types.BF16 if kind == "bf16" else types.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(folder: Path, out: Path, kind: str, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write `folder`'s model as `out` (a .gguf file) in `kind`; returns what was written, for the report."""
    import gguf

    from lora_causal.serving.gguf_vocab import add_vocab, check_stop_tokens, read_vocab

    if kind not in WRITER_TYPES:
        raise UserError(f"--type {kind}: the GGUF writer writes {', '.join(WRITER_TYPES)}")
    config = read_config(folder)
    check_supported(config)
    family = FAMILY[config["model_type"]]
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    vocab = read_vocab(folder, int(config["vocab_size"]))
    check_stop_tokens(vocab)
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    # transformers' GGUF reader tells Mistral from Llama by the model name.
    writer.add_name(f"{config['model_type']}-lora_causal-export")
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    add_vocab(writer, vocab)
    tied = bool(config.get("tie_word_embeddings"))
    written = 0
    from safetensors import safe_open

    for name, file in _tensors(folder):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        stem, _, suffix = name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise UserError(f"the GGUF writer has no GGUF name for tensor '{name}' of this {config['model_type']} model; "
                            + CONVERTER_FIX)
        with safe_open(str(file), framework="pt") as handle:
            data = handle.get_tensor(name).float().numpy()
        if family.permute_qk and stem.endswith("self_attn.q_proj") and suffix == "weight":
            data = permute_qk(data, heads)
        elif family.permute_qk and stem.endswith("self_attn.k_proj") and suffix == "weight":
            data = permute_qk(data, kv_heads)
        array, raw = _encode(data, kind, gguf)
        writer.add_tensor(f"{mapped}.{suffix}", array, raw_dtype=raw)
        written += 1
    say(f"writing {written} tensors ({kind}) to {out.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": written, "tokenizer_pre": vocab.pre,
            "vocab_size": len(vocab.tokens), "stop_tokens": vocab.stop_texts, "eos_token_ids": vocab.eos_ids,
            "chat_template": vocab.chat_template is not None}


def model_name(folder: Path) -> str:
    """A file name stem for the export: the folder's name, else the model type."""
    name = folder.resolve().name
    return name if name and name not in (".", "/") else json.loads((folder / "config.json").read_text()).get("model_type", "model")
