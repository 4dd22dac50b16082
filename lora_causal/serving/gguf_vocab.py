"""The tokenizer half of a GGUF file: vocabulary, merges, token types, special ids, chat template, stop tokens.

Only byte-level BPE tokenizers (tokenizer.json) whose pre-tokenizer is one llama.cpp knows by name are written:
llama.cpp picks its split regex from `tokenizer.ggml.pre` (`src/llama-vocab.cpp`, `llm_tokenizer_bpe`), and its own
converter finds that name by hashing the tokenizer's output against a table. We read the pre-tokenizer's structure
instead and accept three exact shapes: GPT-2's ByteLevel split ("gpt-2"), Llama-3's regex ("llama-bpe") and
Qwen2's regex ("qwen2"). Anything else (SentencePiece vocabularies, other regexes) is refused with the way out:
llama.cpp's own converter (`--converter llama.cpp`).

Stop tokens: llama.cpp ends generation on the ids in `tokenizer.ggml.eos_token_id`, `eot_token_id` and
`eom_token_id`, and on tokens whose text is one of a fixed list (`<|im_end|>`, `<|eot_id|>`, ...; `llama-vocab.cpp`,
the "find EOT token" and EOG blocks). A `generation_config.eos_token_id` list is carried as eos + eot + eom, and
`stop_token_ids_in_gguf` predicts the set llama.cpp will stop on, so the parity report can prove the list survived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Token texts llama.cpp treats as end of generation whatever the metadata says (llama-vocab.cpp).
LLAMACPP_EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                                "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
REFUSE_FIX = "export it with llama.cpp's converter instead: --converter llama.cpp with LLAMA_CPP_DIR set to a llama.cpp checkout"


@dataclass
class Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_ids: list[int]  # the first is tokenizer.ggml.eos_token_id; the next two go to eot and eom
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    stop_texts: list[str] = field(default_factory=list)


def _pre_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer, or a UserError."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"the GGUF writer handles byte-level BPE tokenizers, and this one is {model.get('type')}"
                        f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; {REFUSE_FIX}")
    name = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        name = "gpt-2"
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 2:
        split, level = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex") if split.get("type") == "Split" else None
        if level.get("type") == "ByteLevel" and not level.get("use_regex", True) and not level.get("add_prefix_space") \
                and split.get("behavior") == "Isolated" and not split.get("invert"):
            name = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex)
    if name is None:
        raise UserError(f"this tokenizer's pre-tokenizer ({pre.get('type')}) is not one the GGUF writer can name for "
                        f"llama.cpp (GPT-2, Llama-3 or Qwen2 splits); {REFUSE_FIX}")
    if bool(model.get("ignore_merges")) != (name == "llama-bpe"):
        raise UserError(f"this tokenizer sets ignore_merges={bool(model.get('ignore_merges'))}, which llama.cpp's "
                        f"'{name}' pre-tokenizer does not; {REFUSE_FIX}")
    return name


def eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    """generation_config.json's eos_token_id (one id or a list), else the tokenizer's EOS."""
    ids: list[int] = []
    generation = folder / "generation_config.json"
    if generation.is_file():
        value = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")
        ids = [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return list(dict.fromkeys(ids))


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Everything the tokenizer contributes to the GGUF, from a saved Hugging Face model folder."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"'{folder}' has no tokenizer.json (a fast tokenizer); the GGUF writer reads the vocabulary "
                        f"from it; {REFUSE_FIX}")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = _pre_name(data)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens and the model's embedding {vocab_size} rows; resize the "
                        "model's embeddings to the tokenizer before exporting")
    special = {int(index) for index, added in tokenizer.added_tokens_decoder.items() if added.special}
    added = {int(index) for index in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for index in range(vocab_size):  # rows past the tokenizer (padding for fast matmuls) get unused placeholders
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(TOKEN_UNUSED if token is None else TOKEN_CONTROL if index in special
                     else TOKEN_USER_DEFINED if index in added else TOKEN_NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in data["model"].get("merges") or []]
    probe = tokenizer("a")["input_ids"]
    stops = eos_ids(folder, tokenizer)
    return Vocab(pre, tokens, types, merges, tokenizer.bos_token_id, stops, tokenizer.pad_token_id,
                 bool(probe) and probe[0] == tokenizer.bos_token_id, tokenizer.chat_template if
                 isinstance(tokenizer.chat_template, str) else None, [tokens[i] for i in stops if i < len(tokens)])


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write the tokenizer keys with gguf's GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    for index, add in zip(vocab.eos_ids[:3], (writer.add_eos_token_id, writer.add_eot_token_id, writer.add_eom_token_id)):
        add(index)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def check_stop_tokens(vocab: Vocab) -> None:
    """Refuse a list of end tokens llama.cpp could not stop on (more than eos/eot/eom and not in its text list)."""
    lost = [vocab.tokens[i] for i in vocab.eos_ids[3:] if vocab.tokens[i] not in LLAMACPP_EOG_TEXTS]
    if lost:
        raise UserError(f"generation_config.json lists {len(vocab.eos_ids)} end tokens and a GGUF file carries three "
                        f"(eos, eot, eom); llama.cpp would not stop on {', '.join(lost)}; shorten the list")


def stop_token_ids_in_gguf(metadata: dict[str, Any], tokens: list[str]) -> list[int]:
    """The ids llama.cpp ends generation on, predicted from a GGUF file's metadata (see the module docstring)."""
    ids = {metadata[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if isinstance(metadata.get(key), int)}
    ids |= {index for index, token in enumerate(tokens) if token in LLAMACPP_EOG_TEXTS}
    return sorted(ids)
