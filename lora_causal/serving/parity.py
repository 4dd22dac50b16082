"""The parity check: the exported GGUF read back and compared with the merged model it came from.

The reference is always the source model (the merged Hugging Face folder), never a second reader of the same file:
transformers' GGUF reader undoes exactly the layout llama.cpp assumes, so two readers agree on a wrongly laid out
file. Compared on fixed prompts (plain text, the chat template rendered with its special tokens, and the user's
own): token ids from both tokenizers, max |delta logit|, mean KL, top-1 agreement, greedy continuations, and the
stop tokens llama.cpp will honour. When llama-cpp-python is installed the same comparison runs in llama.cpp itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lora_causal.core.errors import first_line

PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.",
               "Q: What is two plus two?\nA: four. Q: What color is the sky?\nA:",
               "1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and then eleven")
PROBE_CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello! How are you?"},
              {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "What do cows drink?"}]
GREEDY_TOKENS = 16
# Mean KL (merged || export) above which an export is refused: 16/32-bit types must reproduce the model; 8-bit adds
# rounding noise, K-quants more (a wrong tensor layout measures near 1 on the test model, see README).
KL_GATES = {"f32": 1e-4, "f16": 1e-3, "bf16": 1e-2, "q8_0": 0.1}
KQUANT_KL_GATE = 0.5


def kl_gate(kind: str) -> float:
    return KL_GATES.get(kind, KQUANT_KL_GATE)


def probe_prompts(tokenizer: Any, extra: list[str]) -> list[tuple[str, str]]:
    """(label, text) pairs; the chat probe is the training chat template rendered with a generation prompt."""
    prompts = [(f"text {i + 1}", text) for i, text in enumerate(PROBE_TEXTS)]
    if isinstance(tokenizer.chat_template, str):
        try:
            prompts.append(("chat template", tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)))
        except Exception as exc:  # noqa: BLE001 - a template may refuse a system turn; the plain probes remain
            prompts.append(("chat template (not rendered: " + first_line(exc, 80) + ")", PROBE_TEXTS[0]))
    prompts += [(f"--prompt {i + 1}", text) for i, text in enumerate(extra)]
    return prompts


def _greedy(model: Any, ids: list[int], count: int) -> list[int]:
    import torch

    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=count, do_sample=False, pad_token_id=0, eos_token_id=None)
    return output[0, len(ids):].tolist()


def gguf_metadata(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Scalar metadata and the token list of a GGUF file (gguf's reader)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        try:
            values[key] = field.contents()
        except Exception:  # noqa: BLE001, S112 - an exotic field is not needed by the checks
            continue
    tokens = reader.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in reader.fields else []
    return values, tokens


def compare_export(merged: Path, gguf_file: Path, kind: str, prompts: list[str],
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """The parity report of `gguf_file` against the merged model in `merged`; report["passed"] is the verdict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_causal.serving.fidelity import compare, logits_for
    from lora_causal.serving.gguf_vocab import eos_ids, stop_token_ids_in_gguf

    say("reading the merged model and the exported file back (transformers' GGUF reader)")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    source = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, device_map={"": "cpu"}).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    exported = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                    device_map={"": "cpu"}).eval()
    rows, source_ids, mismatched = [], [], []
    for label, text in probe_prompts(tokenizer, prompts):
        ids = list(tokenizer(text)["input_ids"])
        other = list(exported_tokenizer(text)["input_ids"])
        if ids != other:
            mismatched.append(label)
        source_ids.append(ids)
        rows.append({"prompt": label, "tokens": len(ids), "token_ids_equal": ids == other})
    source_logits, exported_logits = logits_for(source, source_ids), logits_for(exported, source_ids)
    for row, a, b in zip(rows, source_logits, exported_logits):
        row.update(compare([b], [a]))
    totals = compare(exported_logits, source_logits)
    greedy = [_greedy(source, ids, GREEDY_TOKENS) == _greedy(exported, ids, GREEDY_TOKENS) for ids in source_ids]
    for row, equal in zip(rows, greedy):
        row["greedy_equal"] = equal
    metadata, tokens = gguf_metadata(gguf_file)
    wanted = eos_ids(merged, tokenizer)
    stops = stop_token_ids_in_gguf(metadata, tokens)
    gate = kl_gate(kind)
    failures = []
    if mismatched:
        failures.append(f"the exported tokenizer splits {', '.join(mismatched)} differently")
    if totals["mean_kl"] > gate:
        failures.append(f"mean KL {totals['mean_kl']:.3g} is above the {kind} gate {gate:g}")
    missing = [i for i in wanted if i not in stops]
    if missing:
        failures.append(f"llama.cpp would not stop on end token ids {missing}")
    report = {
        "reader": "transformers",
        "prompts": rows,
        **totals,
        "greedy_equal": sum(greedy) / len(greedy),
        "greedy_tokens": GREEDY_TOKENS,
        "kl_gate": gate,
        "stop_token_ids": {"generation_config": wanted, "llama_cpp_stops_on": stops,
                           "texts": [tokens[i] for i in wanted if i < len(tokens)]},
        "chat_template_equal": metadata.get("tokenizer.chat_template") == tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str) else None,
        "failures": failures,
        "passed": not failures,
    }
    if report["chat_template_equal"] is False:
        failures.append("the chat template in the file differs from the model's")
        report["passed"] = False
    runtime = llama_cpp_parity(gguf_file, source_ids, source_logits, gate)
    if runtime is not None:
        report["llama_cpp"] = runtime
        failures += [f"llama.cpp: {failure}" for failure in runtime["failures"]]
        report["passed"] = not failures
    return report


def llama_cpp_parity(gguf_file: Path, ids: list[list[int]], reference: list[Any], gate: float) -> dict[str, Any] | None:
    """The same logits comparison inside llama.cpp (llama-cpp-python), or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np
    import torch

    from lora_causal.serving.fidelity import compare

    model = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=max(len(row) for row in ids) + 8, logits_all=True,
                            verbose=False, n_threads=1)
    logits = []
    for row in ids:
        model.reset()
        model.eval(row)
        logits.append(torch.from_numpy(np.array(model.scores[: len(row)], dtype=np.float32)))
    totals = compare(logits, reference)
    failures = [f"mean KL {totals['mean_kl']:.3g} is above the gate {gate:g}"] if totals["mean_kl"] > gate else []
    return {"version": getattr(llama_cpp, "__version__", "unknown"), **totals, "failures": failures}
