"""An Ollama Modelfile next to the exported GGUF: `FROM`, an explicit `PARAMETER stop` for every end token, and an
explicit `TEMPLATE` when the model's chat template is ChatML (checked by rendering both on the same messages).

Explicit stops matter: a model whose end-of-turn token is not among the engine's stops "never stops". For other
chat templates no TEMPLATE is written and Ollama falls back to what it derives from the file's
tokenizer.chat_template (not verified here); the report says so.
"""

from __future__ import annotations

from typing import Any

CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")


def _render_chatml(messages: list[dict[str, str]]) -> str:
    """What CHATML_TEMPLATE renders for `messages` (Ollama ranges over every message, system included)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer: Any) -> str | None:
    """CHATML_TEMPLATE when the model's own chat template renders exactly like it, else None."""
    from lora_causal.serving.parity import PROBE_CHAT

    if not isinstance(tokenizer.chat_template, str):
        return None
    try:
        rendered = tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses the probe is simply not ChatML
        return None
    return CHATML_TEMPLATE if rendered == _render_chatml(PROBE_CHAT) else None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, stop_texts: list[str], template: str | None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quote(text)}" for text in dict.fromkeys(stop_texts)]
    return "\n".join(lines) + "\n"
