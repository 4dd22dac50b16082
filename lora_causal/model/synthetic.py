"""Synthetic models and tokenizers: random weights from a config, tiny byte-level BPE tokenizers.

Used by `model.init: random` (demo, benchmarks) and by the tests, so that nothing needs the Hub. Weights are
built once per (config, seed), saved with `save_pretrained` and then loaded back through the same 4-bit path
a real checkpoint takes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lora_causal.core.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Where synthetic weights are kept: $LORA_CAUSAL_CACHE, else ~/.cache/lora_causal."""
    return Path(os.environ.get("LORA_CAUSAL_CACHE", Path.home() / ".cache" / "lora_causal")).expanduser()


def materialize_random_model(
    config_dir: Path, seed: int, root: Path | None = None, device: str = "cpu", writer: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Save random weights for `config_dir/config.json` (seeded) once, and return the folder holding them.

    `device: cuda` draws the weights on the GPU (an 8B model in seconds instead of minutes); the values then differ
    from a CPU draw with the same seed, so the cache keeps them apart. With several processes on a machine only
    the `writer` draws and saves (to a staging folder renamed into place); the others wait for the folder.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = config_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"model.init: random needs a config.json in '{config_dir}', and there is none")
    key = f"|seed={seed}" + (f"|device={device}" if device != "cpu" else "")
    digest = hashlib.sha256(config_file.read_bytes() + key.encode()).hexdigest()[:16]
    target = (root or cache_root()) / "random-init" / digest
    if (target / "config.json").is_file():
        return target
    if not writer:
        from lora_causal.core.processes import wait_for

        wait_for(target / "config.json", f"the random weights of {config_file} (with several machines, "
                 "LORA_CAUSAL_CACHE must be a folder they share)", timeout_s=1800)
        return target
    try:
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read '{config_file}': {exc}") from None
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    from lora_causal.core.rundir import staging_folder

    staging = staging_folder(target.parent, f".{digest}-")
    try:
        with torch.random.fork_rng(devices=[] if device == "cpu" else None), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with BOS/EOS/pad and ChatML turn tokens.

    It prepends BOS when asked for special tokens, like Llama tokenizers, and carries a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
