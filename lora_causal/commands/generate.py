"""`lora-causal generate`: a continuation from a merged model, a plain model folder, a run directory or an adapter."""

from __future__ import annotations

from typing import Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.model.generation import greedy_answers


def load_for_generation(path: str) -> tuple[Any, Any, str | None, str | None]:
    """(model, tokenizer, prompt format, template) from a merged/plain model folder, a run directory or an adapter.

    A run directory or adapter runs as trained: the 4-bit base with the adapter on top.
    """
    from lora_causal.core.paths import expand
    from lora_causal.core.rundir import is_run_dir
    from lora_causal.model.loading import load_base_model
    from lora_causal.serving.adapters import adapter_tokenizer, check_adapter_fits, locate_adapter, with_adapter
    from lora_causal.core.rundir import MERGE_REPORT as REPORT

    folder = expand(path, "MODEL_DIR_OR_RUN_DIR")
    is_adapter = (folder / "adapter_config.json").is_file() or is_run_dir(folder)
    if folder.is_dir() and (folder / "config.json").is_file() and not is_adapter:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lora_causal.core.readers import read_json_object
        from lora_causal.model.loading import device_map_for_process
        from lora_causal.model.skeleton import build_skeleton, load_model_config

        build_skeleton(load_model_config(str(folder), None, False, "model"), False, str(folder), "model")
        fmt = None
        if (folder / REPORT).is_file():
            fmt = read_json_object(folder / REPORT, "delete it (then --raw prompts are used) or merge again").get("prompt_format")
            if fmt is not None and not isinstance(fmt, str):
                raise UserError(f"'{folder / REPORT}': prompt_format must be text; merge again or delete the report")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=device_map_for_process())
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load a model from '{folder}': {first_line(exc)}") from None
        return model, tokenizer, fmt, None
    source = locate_adapter(str(folder))
    check_adapter_fits(source)
    tokenizer = adapter_tokenizer(source)
    model = with_adapter(load_base_model(source.model, source.quantization, source.seed), source.adapter)
    train = source.recipe.data.train if source.recipe else None
    return model, tokenizer, train.format if train else None, train.template if train else None


def generate_text(  # noqa: PLR0913
    path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, raw: bool = False
) -> str:
    """Sample a continuation of `prompt` (rendered like the training prompts unless `raw`)."""
    import torch
    from transformers import set_seed

    from lora_causal.data.tokenizing import render_prompt_ids

    model, tokenizer, fmt, template = load_for_generation(path)
    ids = render_prompt_ids(tokenizer, None if raw else fmt, prompt, template)
    if temperature <= 0:
        return greedy_answers(model, tokenizer, [ids], max_new_tokens)[0]
    set_seed(seed)
    model.eval()
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=True, temperature=temperature, use_cache=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
