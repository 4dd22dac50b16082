"""Every causal-LM architecture transformers ships, classified: which batching is exact for it, and which loss head.

The fast path (padding-free rows with varlen attention) is used for an architecture only where it is shown exact
for it: `tests/model/test_conformance.py` builds every architecture of transformers' causal-LM auto mapping tiny
on the CPU and checks, for the path this table sends it to, each packed (or padded) example's logits against the
example alone through the model's eager attention, and the step loss against the by-hand mean over supervised
next tokens. Verdicts:
- PADDING_FREE: padding-free rows + varlen attention are exact (the sweep shows it, and the modeling code has no
  state carried along the sequence, no attention sinks, no chunked attention, no sparse-attention indexer);
- PADDED: routed to padded batches with the model's own attention, which the sweep shows exact; the reason says
  why packed rows are not (an explicit `train.padding_free: true` or `token_budget` is refused for these);
- REFUSED: no path is exact; refused before any weights load, with the reason.
The loss head: FUSED is TRL's fused LM head (it projects the last hidden state through the output embedding, with
the config's softcapping and scale); OWN is the loss from the logits of the model's own forward (extra head
layers, output scaling TRL does not read, an auxiliary router loss TRL computes wrongly or cannot compute).
An architecture missing here (a newer transformers) takes the padded path and the model's own head, which are
exact for every model, and the sweep fails until it is classified.
"""

from __future__ import annotations

from dataclasses import dataclass

PADDING_FREE, PADDED, REFUSED = "padding_free", "padded", "refused"
FUSED, OWN = "fused", "own"

EXACT = ""
STATE = ("layers carry state along the sequence (convolutions, recurrent or linear attention, SSMs), so one packed "
         "example would leak into the next")
SINKS = "its attention has sinks (s_aux), which varlen attention does not compute"
CHUNKED = "its chunked attention lives in the mask, which packed rows do not carry"
INDEXER = "its sparse-attention indexer needs the attention mask, which packed rows do not carry"
POSITIONS = "its positions are numbered RoBERTa-style from the padding index, not from packed position ids"
BOUNDARIES = ("its layers do not keep packed examples apart (boundaries or position ids not passed on to attention, "
              "or positions not from position ids): the conformance sweep measured packed rows wrong")
NO_CUSTOM = "its attention takes no custom attention function, so packed rows cannot get varlen attention"
UNTESTED = "it cannot be built tiny by the conformance sweep, so packed rows are not shown exact for it"
PADDING_DEPENDENT = "its outputs depend on the batch's padding (the conformance sweep measured padded batches wrong)"
UNCLASSIFIED = "it is not in lora_causal's classification of architectures yet (a newer transformers?)"


@dataclass(frozen=True)
class Family:
    """What lora_causal knows of one architecture."""

    model_type: str
    verdict: str  # PADDING_FREE, PADDED or REFUSED
    reason: str  # why not padding-free ("" when it is)
    head: str  # FUSED (TRL's fused LM head) or OWN (the model's own logits)
    classified: bool = True


def family(model_type: str) -> Family:
    """The classification of `model_type`; an unknown one is padded with the model's own head."""
    entry = TABLE.get(model_type)
    if entry is None:
        return Family(model_type, PADDED, UNCLASSIFIED, OWN, classified=False)
    return Family(model_type, *entry)


def padding_free_types() -> list[str]:
    """The architectures that train padding-free by default (README lists them)."""
    return sorted(name for name, (verdict, _, _) in TABLE.items() if verdict == PADDING_FREE)


# model_type: (verdict, reason, loss head); regenerate with the sweep when transformers is upgraded
TABLE: dict[str, tuple[str, str, str]] = {
    "afmoe": (PADDING_FREE, EXACT, FUSED),
    "apertus": (PADDING_FREE, EXACT, FUSED),
    "apertus1p5_text": (PADDING_FREE, EXACT, FUSED),
    "arcee": (PADDING_FREE, EXACT, FUSED),
    "aria_text": (PADDING_FREE, EXACT, FUSED),
    "axk1": (PADDING_FREE, EXACT, FUSED),
    "axk2": (PADDED, INDEXER, FUSED),
    "bailing_hybrid": (PADDED, UNTESTED, OWN),
    "bamba": (PADDED, STATE, FUSED),
    "bart": (PADDED, BOUNDARIES, FUSED),
    "beam": (PADDING_FREE, EXACT, FUSED),
    "bert": (PADDED, BOUNDARIES, OWN),
    "bert-generation": (PADDED, BOUNDARIES, FUSED),
    "big_bird": (PADDED, BOUNDARIES, OWN),
    "bigbird_pegasus": (PADDED, BOUNDARIES, FUSED),
    "biogpt": (PADDED, NO_CUSTOM, FUSED),
    "bitnet": (PADDING_FREE, EXACT, FUSED),
    "blenderbot": (PADDED, BOUNDARIES, FUSED),
    "blenderbot-small": (PADDED, BOUNDARIES, FUSED),
    "bloom": (PADDED, BOUNDARIES, FUSED),
    "blt": (PADDED, UNTESTED, OWN),
    "camembert": (PADDED, POSITIONS, OWN),
    "codegen": (PADDING_FREE, EXACT, FUSED),
    "cohere": (PADDING_FREE, EXACT, FUSED),
    "cohere2": (PADDING_FREE, EXACT, FUSED),
    "cohere2_moe": (PADDING_FREE, EXACT, FUSED),
    "cohere_compass_text": (PADDED, UNTESTED, OWN),
    "cpmant": (REFUSED, PADDING_DEPENDENT, OWN),
    "ctrl": (PADDING_FREE, EXACT, FUSED),
    "cwm": (PADDING_FREE, EXACT, FUSED),
    "data2vec-text": (PADDED, POSITIONS, OWN),
    "dbrx": (PADDED, UNTESTED, OWN),
    "deepseek_v2": (PADDED, UNTESTED, OWN),
    "deepseek_v3": (PADDING_FREE, EXACT, FUSED),
    "deepseek_v32": (PADDED, INDEXER, FUSED),
    "deepseek_v4": (PADDED, SINKS, OWN),
    "diffllama": (PADDING_FREE, EXACT, FUSED),
    "doge": (PADDED, BOUNDARIES, OWN),
    "dory": (PADDING_FREE, EXACT, FUSED),
    "dots1": (PADDED, UNTESTED, OWN),
    "dots3_note": (PADDED, UNTESTED, OWN),
    "dots3_note_text": (PADDED, UNTESTED, OWN),
    "electra": (PADDED, BOUNDARIES, OWN),
    "emu3": (PADDING_FREE, EXACT, FUSED),
    "ernie": (PADDED, BOUNDARIES, OWN),
    "ernie4_5": (PADDING_FREE, EXACT, FUSED),
    "ernie4_5_moe": (PADDING_FREE, EXACT, FUSED),
    "exaone": (PADDING_FREE, EXACT, FUSED),
    "exaone4": (PADDING_FREE, EXACT, FUSED),
    "exaone_moe": (PADDING_FREE, EXACT, FUSED),
    "falcon": (PADDED, NO_CUSTOM, FUSED),
    "falcon_h1": (PADDED, STATE, FUSED),
    "falcon_mamba": (PADDED, STATE, FUSED),
    "flex_olmo": (PADDING_FREE, EXACT, FUSED),
    "flint": (PADDED, SINKS, FUSED),
    "fuyu": (PADDING_FREE, EXACT, FUSED),
    "gemma": (PADDING_FREE, EXACT, FUSED),
    "gemma2": (PADDING_FREE, EXACT, FUSED),
    "gemma3": (PADDING_FREE, EXACT, FUSED),
    "gemma3_text": (PADDING_FREE, EXACT, FUSED),
    "gemma3n": (PADDED, UNTESTED, OWN),
    "gemma3n_text": (PADDED, UNTESTED, OWN),
    "gemma4": (PADDING_FREE, EXACT, FUSED),
    "gemma4_assistant": (PADDED, UNTESTED, OWN),
    "gemma4_text": (PADDING_FREE, EXACT, FUSED),
    "gemma4_unified": (PADDING_FREE, EXACT, FUSED),
    "gemma4_unified_assistant": (PADDED, UNTESTED, OWN),
    "gemma4_unified_text": (PADDING_FREE, EXACT, FUSED),
    "git": (PADDED, BOUNDARIES, FUSED),
    "glm": (PADDING_FREE, EXACT, FUSED),
    "glm4": (PADDING_FREE, EXACT, FUSED),
    "glm4_moe": (PADDING_FREE, EXACT, FUSED),
    "glm4_moe_lite": (PADDING_FREE, EXACT, FUSED),
    "glm_moe_dsa": (PADDED, INDEXER, FUSED),
    "got_ocr2": (PADDING_FREE, EXACT, FUSED),
    "gpt-sw3": (PADDING_FREE, EXACT, FUSED),
    "gpt2": (PADDING_FREE, EXACT, FUSED),
    "gpt_bigcode": (PADDING_FREE, EXACT, FUSED),
    "gpt_neo": (PADDED, NO_CUSTOM, FUSED),
    "gpt_neox": (PADDING_FREE, EXACT, FUSED),
    "gpt_neox_japanese": (PADDED, NO_CUSTOM, FUSED),
    "gpt_oss": (PADDED, SINKS, FUSED),
    "gptj": (PADDING_FREE, EXACT, FUSED),
    "granite": (PADDING_FREE, EXACT, FUSED),
    "granite_swa": (PADDED, SINKS, FUSED),
    "granitemoe": (PADDING_FREE, EXACT, OWN),
    "granitemoe_swa": (PADDED, SINKS, OWN),
    "granitemoehybrid": (PADDED, STATE, OWN),
    "granitemoeshared": (PADDED, STATE, OWN),
    "helium": (PADDING_FREE, EXACT, FUSED),
    "hrm_text": (PADDING_FREE, EXACT, FUSED),
    "hunyuan_v1_dense": (PADDING_FREE, EXACT, FUSED),
    "hunyuan_v1_moe": (PADDING_FREE, EXACT, FUSED),
    "hy_v3": (PADDING_FREE, EXACT, FUSED),
    "hy_v4": (PADDED, SINKS, FUSED),
    "hyperclovax": (PADDING_FREE, EXACT, FUSED),
    "inkling2_loop_text": (PADDED, SINKS, FUSED),
    "inkling2_text": (PADDED, SINKS, FUSED),
    "inkling_text": (PADDED, STATE, OWN),
    "internlm3": (PADDING_FREE, EXACT, FUSED),
    "iquestcoder": (PADDING_FREE, EXACT, FUSED),
    "jais2": (PADDING_FREE, EXACT, FUSED),
    "jamba": (PADDED, STATE, FUSED),
    "jetmoe": (PADDING_FREE, EXACT, FUSED),
    "kimi_linear": (PADDED, UNTESTED, OWN),
    "kolibri1": (PADDING_FREE, EXACT, FUSED),
    "laguna": (PADDING_FREE, EXACT, FUSED),
    "lara_mini": (PADDED, STATE, FUSED),
    "lfm2": (PADDED, STATE, FUSED),
    "lfm2_moe": (PADDED, STATE, FUSED),
    "lfm3": (PADDED, STATE, FUSED),
    "llama": (PADDING_FREE, EXACT, FUSED),
    "llama4": (PADDED, CHUNKED, OWN),
    "llama4_text": (PADDED, CHUNKED, OWN),
    "longcat_flash": (PADDING_FREE, EXACT, FUSED),
    "mamba": (PADDED, STATE, FUSED),
    "mamba2": (PADDED, STATE, FUSED),
    "marian": (PADDED, BOUNDARIES, FUSED),
    "mbart": (PADDED, BOUNDARIES, FUSED),
    "megatron-bert": (PADDED, BOUNDARIES, OWN),
    "mellum": (PADDING_FREE, EXACT, FUSED),
    "mimo_v2_flash": (PADDED, SINKS, FUSED),
    "minicpm3": (PADDING_FREE, EXACT, FUSED),
    "minimax": (PADDED, STATE, FUSED),
    "minimax_m2": (PADDING_FREE, EXACT, FUSED),
    "minimax_m3_vl_text": (PADDED, STATE, FUSED),
    "ministral": (PADDING_FREE, EXACT, FUSED),
    "ministral3": (PADDING_FREE, EXACT, FUSED),
    "mistral": (PADDING_FREE, EXACT, FUSED),
    "mixtral": (PADDING_FREE, EXACT, FUSED),
    "mllama": (PADDING_FREE, EXACT, OWN),
    "modernbert-decoder": (PADDING_FREE, EXACT, OWN),
    "moshi": (PADDING_FREE, EXACT, FUSED),
    "moss_transcribe_diarize": (PADDING_FREE, EXACT, FUSED),
    "mpt": (PADDED, BOUNDARIES, FUSED),
    "musicgen": (PADDED, UNTESTED, OWN),
    "musicgen_melody": (PADDED, UNTESTED, OWN),
    "mvp": (PADDED, BOUNDARIES, FUSED),
    "nanochat": (PADDING_FREE, EXACT, FUSED),
    "nemotron": (PADDED, BOUNDARIES, FUSED),
    "nemotron_h": (PADDED, STATE, FUSED),
    "olmo": (PADDING_FREE, EXACT, FUSED),
    "olmo2": (PADDING_FREE, EXACT, FUSED),
    "olmo3": (PADDING_FREE, EXACT, FUSED),
    "olmo_hybrid": (PADDED, STATE, FUSED),
    "olmoe": (PADDING_FREE, EXACT, FUSED),
    "openai-gpt": (PADDED, BOUNDARIES, FUSED),
    "opt": (PADDING_FREE, EXACT, FUSED),
    "pegasus": (PADDED, BOUNDARIES, FUSED),
    "persimmon": (PADDING_FREE, EXACT, FUSED),
    "phi": (PADDING_FREE, EXACT, FUSED),
    "phi3": (PADDING_FREE, EXACT, FUSED),
    "phi4_multimodal": (PADDING_FREE, EXACT, FUSED),
    "phimoe": (PADDING_FREE, EXACT, OWN),
    "plbart": (PADDED, BOUNDARIES, FUSED),
    "prophetnet": (REFUSED, PADDING_DEPENDENT, OWN),
    "qwen2": (PADDING_FREE, EXACT, FUSED),
    "qwen2_moe": (PADDING_FREE, EXACT, FUSED),
    "qwen3": (PADDING_FREE, EXACT, FUSED),
    "qwen3_5": (PADDED, STATE, FUSED),
    "qwen3_5_moe": (PADDED, STATE, FUSED),
    "qwen3_5_moe_text": (PADDED, STATE, FUSED),
    "qwen3_5_text": (PADDED, STATE, FUSED),
    "qwen3_moe": (PADDING_FREE, EXACT, FUSED),
    "qwen3_next": (PADDED, STATE, FUSED),
    "qwen4_exp": (PADDED, UNTESTED, OWN),
    "qwen4_exp_text": (PADDED, UNTESTED, OWN),
    "recurrent_gemma": (PADDED, STATE, OWN),
    "reformer": (PADDED, UNTESTED, OWN),
    "rembert": (PADDED, BOUNDARIES, OWN),
    "roberta": (PADDED, POSITIONS, OWN),
    "roberta-prelayernorm": (PADDED, POSITIONS, OWN),
    "roc_bert": (PADDED, BOUNDARIES, OWN),
    "roformer": (PADDED, BOUNDARIES, OWN),
    "rwkv": (PADDED, STATE, FUSED),
    "sarvam_mla": (PADDING_FREE, EXACT, FUSED),
    "sarvam_moe": (PADDING_FREE, EXACT, FUSED),
    "seed_oss": (PADDING_FREE, EXACT, FUSED),
    "smollm3": (PADDING_FREE, EXACT, FUSED),
    "solar_open": (PADDING_FREE, EXACT, FUSED),
    "stablelm": (PADDED, BOUNDARIES, FUSED),
    "starcoder2": (PADDING_FREE, EXACT, FUSED),
    "trocr": (PADDED, POSITIONS, FUSED),
    "vaultgemma": (PADDING_FREE, EXACT, FUSED),
    "whisper": (PADDED, NO_CUSTOM, FUSED),
    "xglm": (PADDED, BOUNDARIES, FUSED),
    "xlm": (PADDED, BOUNDARIES, FUSED),
    "xlm-roberta": (PADDED, POSITIONS, OWN),
    "xlm-roberta-xl": (PADDED, POSITIONS, OWN),
    "xlnet": (PADDED, BOUNDARIES, FUSED),
    "xlstm": (PADDED, STATE, OWN),
    "xmod": (PADDED, UNTESTED, OWN),
    "youtu": (PADDING_FREE, EXACT, FUSED),
    "zamba": (PADDED, UNTESTED, OWN),
    "zamba2": (PADDED, UNTESTED, OWN),
    "zaya": (PADDED, STATE, FUSED),
}
