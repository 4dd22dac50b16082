"""What each serving engine refuses, or silently ignores, in a LoRA adapter; read from the engines' own sources.

vLLM 0.33.0 (wheel from PyPI):
- `vllm/config/lora.py`: `MaxLoRARanks`, the only values `--max-lora-rank` accepts (default 16).
- `vllm/lora/peft_helper.py`: `_validate_features` (modules_to_save only classifier/score, no DoRA, no lora_bias,
  no PiSSA/OLoRA/CorDA/LoftQ inits, no aLoRA, layer_replication, BD-LoRA, QALoRA), `validate_legal` (max rank over
  r and rank_pattern against --max-lora-rank; bias must be "none").
- `vllm/lora/utils.py`: `parse_fine_tuned_lora_name` (only lora_A/lora_B weights, lora_embedding_A/B, and
  score/classifier weights; anything else is "unsupported LoRA weight"), `is_base_embedding_weights`
  (`embed_tokens.base_layer.weight` and `lm_head.base_layer.weight` are skipped: a resized vocabulary is not served).
- `vllm/lora/lora_model.py`: `check_unexpected_modules` (a module's last name must be one vLLM can wrap),
  lora_embedding_A's second dimension must equal the base vocabulary size.
- `vllm/model_executor/models/llama.py`, `qwen2.py`: `packed_modules_mapping` and `embedding_modules` (q/k/v_proj
  pack into qkv_proj, gate/up_proj into gate_up_proj; embed_tokens and lm_head are wrappable).
SGLang 0.5.23 (wheel from PyPI):
- `sglang/srt/lora/lora_manager.py`: `validate_new_adapter` (no DoRA; no tokens added to the vocabulary; rank within
  --max-lora-rank and targets within --lora-target-modules).
- `sglang/srt/lora/lora_config.py`: added_tokens.json ids at or above the base vocabulary count as added tokens.
- `sglang/srt/lora/utils.py`: `get_normalized_target_modules` (a string target_modules must be "all" or
  "all-linear"; q/k/v_proj normalise to qkv_proj, gate/up_proj to gate_up_proj).
- `sglang/srt/lora/lora.py`: `_process_weight` keeps full embed_tokens/lm_head weights only when that module is in
  target_modules, and skips them otherwise with a debug log (modules_to_save are dropped silently).
llama.cpp (`convert_lora_to_gguf.py`, ggml-org/llama.cpp): only lora_A/lora_B (and lora_embedding_A/B) tensors;
  `*.base_layer.weight` is skipped; any other tensor (full lm_head/embed_tokens from modules_to_save, DoRA's
  lora_magnitude_vector) stops the conversion with "Not a lora_A or lora_B tensor".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_causal.serving.facts import AdapterFacts

ENGINES = ("vllm", "sglang", "llamacpp")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
VLLM_UNSUPPORTED_FEATURES = {"alora_invocation_tokens": "Activated LoRA (aLoRA)", "layer_replication": "layer_replication",
                             "use_bdlora": "block-diagonal LoRA (BD-LoRA)", "use_qalora": "QALoRA",
                             "trainable_token_indices": "trainable tokens (trainable_token_indices)"}
# Families whose vLLM/SGLang implementations we read: they support LoRA and wrap these module names.
WRAPPABLE = {family: {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
             for family in ("llama", "mistral", "qwen2", "qwen3")}
SGLANG_NORMALIZED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                     "up_proj": "gate_up_proj"}
NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp"}
MERGE_FIX = "or merge the adapter (lora-causal merge) and serve the merged model"


@dataclass(frozen=True)
class Finding:
    """One problem: `error` = the engine refuses the adapter or serves something else than was trained."""

    engine: str
    severity: str  # "error" or "warning"
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.severity}: {self.problem}; fix: {self.fix}"


def smallest_vllm_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that covers `rank` (None above 512)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def _lora_fields(facts: AdapterFacts) -> tuple[str, str]:
    """How to name a setting in a fix: the recipe key for recipes, the adapter_config key for adapters."""
    return ("lora.", "set lora.") if facts.is_recipe else ("", "retrain with lora.")


def _unparsable_tensors(facts: AdapterFacts) -> list[str]:
    """Tensor names vLLM's parse_fine_tuned_lora_name rejects (after skipping base_layer weights)."""
    bad = []
    for key in facts.tensors or {}:
        if ".base_layer." in key:
            continue
        parts = key.split(".")
        if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
            continue
        if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            continue
        if len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in ("score", "classifier"):
            continue
        bad.append(key.removeprefix("base_model.model."))
    return sorted(bad)


def _vocab_rules(facts: AdapterFacts, engine: str) -> list[Finding]:
    """Resized vocabularies: a saved embed_tokens/lm_head base layer, or lora_embedding_A wider than the base."""
    findings = []
    vocab = facts.vocab_size
    for key, shape in (facts.tensors or {}).items():
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")) and vocab is not None:
            if shape and shape[0] != vocab:
                findings.append(Finding(engine, "error", f"the adapter carries a resized vocabulary ({key.split('.')[-4]} "
                                        f"has {shape[0]} rows, the base model {vocab}); {NAMES[engine]} serves the base "
                                        "vocabulary and skips these weights", "train without adding tokens, "
                                        f"{MERGE_FIX}"))
        if key.endswith(".lora_embedding_A") and vocab is not None and len(shape) == 2 and shape[1] != vocab:
            findings.append(Finding(engine, "error", f"lora_embedding_A has {shape[1]} columns and the base vocabulary "
                                    f"{vocab} rows; {NAMES[engine]} needs them equal", f"train without resizing the vocabulary, {MERGE_FIX}"))
    return findings


def _common_features(facts: AdapterFacts, engine: str) -> list[Finding]:
    prefix, retrain = _lora_fields(facts)
    findings = []
    if facts.config.get("use_dora"):
        findings.append(Finding(engine, "error", f"{NAMES[engine]} does not load DoRA adapters ({prefix}use_dora is true)",
                                f"{retrain}use_dora: false, {MERGE_FIX}"))
    saved = facts.config.get("modules_to_save") or []
    if saved and engine != "vllm":
        what = ("drops the full copies of modules_to_save without an error (lora.py _process_weight), so the server "
                "answers with the base model's" if engine == "sglang" else "refuses tensors that are not lora_A/lora_B "
                "(convert_lora_to_gguf.py: 'Not a lora_A or lora_B tensor') such as the full copies of")
        findings.append(Finding(engine, "error", f"{NAMES[engine]} {what} {', '.join(saved)}", f"{retrain}"
                                f"modules_to_save: [] (LoRA on those layers instead), {MERGE_FIX}"))
    return findings


def vllm_findings(facts: AdapterFacts) -> list[Finding]:
    """vLLM 0.33's refusals (see the module docstring for the source of each)."""
    prefix, retrain = _lora_fields(facts)
    config, findings = facts.config, _common_features(facts, "vllm")
    rank = max(facts.ranks or [0])
    if smallest_vllm_rank(rank) is None:
        findings.append(Finding("vllm", "error", f"rank {rank} is above 512, the largest --max-lora-rank vLLM accepts",
                                f"{retrain}r: 512 or less, {MERGE_FIX}"))
    saved = [name for name in config.get("modules_to_save") or [] if name not in ("classifier", "score")]
    if saved:
        findings.append(Finding("vllm", "error", f"vLLM refuses modules_to_save ({', '.join(saved)}): it loads only LoRA "
                                "weights (peft_helper.py)", f"{retrain}modules_to_save: [] (LoRA on those layers "
                                f"instead), {MERGE_FIX}"))
    if config.get("bias", "none") != "none":
        findings.append(Finding("vllm", "error", f"vLLM refuses adapters with bias: {config.get('bias')} "
                                "(peft_helper.py validate_legal)", f"{retrain}bias: none, {MERGE_FIX}"))
    if config.get("lora_bias"):
        findings.append(Finding("vllm", "error", "vLLM refuses LoRA bias (lora_bias: true)", f"retrain without lora_bias, {MERGE_FIX}"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        findings.append(Finding("vllm", "error", f"vLLM refuses init_lora_weights: {init} (it changes the base weights)",
                                "convert it with peft's path_initial_model_for_weight_conversion, " + MERGE_FIX))
    for key, name in VLLM_UNSUPPORTED_FEATURES.items():
        if config.get(key):
            findings.append(Finding("vllm", "error", f"vLLM does not support {name}", f"retrain without {key}, {MERGE_FIX}"))
    bad = _unparsable_tensors(facts) if facts.tensors is not None else []
    if bad:
        findings.append(Finding("vllm", "error", f"vLLM refuses tensors that are not LoRA weights: {', '.join(bad[:3])}"
                                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") + " ('unsupported LoRA weight')",
                                f"retrain without modules_to_save and DoRA, {MERGE_FIX}"))
    findings += _vocab_rules(facts, "vllm") + _target_rules(facts, "vllm")
    return _dedupe(findings)


def sglang_findings(facts: AdapterFacts) -> list[Finding]:
    """SGLang 0.5.23's refusals and silent drops."""
    findings = _common_features(facts, "sglang")
    targets = facts.config.get("target_modules")
    if isinstance(targets, str) and targets not in ("all", "all-linear"):
        findings.append(Finding("sglang", "error", f"target_modules '{targets}' is a string other than 'all' or "
                                "'all-linear', which SGLang refuses", "give target_modules as a list of module names"))
    vocab = facts.vocab_size
    added = sorted(token for token, index in facts.added_tokens.items() if vocab is not None and index >= vocab)
    if added:
        findings.append(Finding("sglang", "error", f"the adapter adds {len(added)} tokens to the vocabulary "
                                f"({', '.join(added[:3])}); SGLang refuses adapters that add tokens",
                                f"train without adding tokens, {MERGE_FIX}"))
    findings += _vocab_rules(facts, "sglang") + _target_rules(facts, "sglang")
    return _dedupe(findings)


def llamacpp_findings(facts: AdapterFacts) -> list[Finding]:
    """llama.cpp's adapter converter (convert_lora_to_gguf.py): only LoRA pairs become a GGUF adapter."""
    findings = _common_features(facts, "llamacpp")
    if facts.tensors is not None:
        bad = [key for key in _unparsable_tensors(facts) if not key.endswith(("_layernorm.weight", ".norm.weight"))]
        if bad:
            findings.append(Finding("llamacpp", "error", f"convert_lora_to_gguf.py stops at tensors that are not "
                                    f"lora_A/lora_B: {', '.join(bad[:3])}", "retrain without modules_to_save and DoRA, "
                                    "or export the merged model as GGUF instead (lora-causal export)"))
    findings += _vocab_rules(facts, "llamacpp")
    return _dedupe(findings)


def _target_rules(facts: AdapterFacts, engine: str) -> list[Finding]:
    """Targets the engine cannot wrap, architectures whose LoRA support we have not read, tied embeddings."""
    family = facts.model_type
    names = facts.target_names()
    if facts.base_config is None:
        return [Finding(engine, "warning", f"the base model's config could not be read ({facts.base_problem}), so the "
                        "vocabulary and target-module rules were not checked", "pass --base-model with a local copy")]
    if family not in WRAPPABLE:
        return [Finding(engine, "warning", f"the base model is a {family} model, whose LoRA support in {NAMES[engine]} this "
                        f"checker has not read ({', '.join(sorted(WRAPPABLE))} only)", "check the engine's model "
                        "implementation supports LoRA on these targets")]
    findings = []
    unknown = sorted(set(names) - WRAPPABLE[family]) if not isinstance(names, str) else []
    if unknown:
        findings.append(Finding(engine, "error", f"{NAMES[engine]} cannot wrap {', '.join(unknown)} in a {family} model (it "
                                f"wraps {', '.join(sorted(WRAPPABLE[family]))})", "retrain targeting those layers only, "
                                + MERGE_FIX))
    tied = bool((facts.base_config or {}).get("tie_word_embeddings"))
    touched = {"lm_head", "embed_tokens"} & (set(names) | set(facts.config.get("modules_to_save") or []))
    if tied and touched:
        findings.append(Finding(engine, "warning", f"the base model ties lm_head to embed_tokens and the adapter "
                                f"changes {', '.join(sorted(touched))}; engines serve the tied weights their own way",
                                "compare the served answers with `lora-causal generate`, " + MERGE_FIX))
    return findings


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, kept = set(), []
    for finding in findings:
        if (finding.severity, finding.problem) not in seen:
            seen.add((finding.severity, finding.problem))
            kept.append(finding)
    return kept


def serve_flags(engine: str, facts: AdapterFacts, name: str = "adapter") -> str:
    """The server command line that fits the adapter (with BASE and the adapter path to fill in)."""
    rank = max(facts.ranks or [1])
    where = "ADAPTER_DIR" if facts.is_recipe else facts.where
    base = facts.base or "BASE_MODEL"
    names = facts.target_names()
    if engine == "vllm":
        value = smallest_vllm_rank(rank) or 512
        return f"vllm serve {base} --enable-lora --max-lora-rank {value} --lora-modules {name}={where}"
    if engine == "sglang":
        targets = "all" if isinstance(names, str) else ",".join(sorted({SGLANG_NORMALIZED.get(n, n) for n in names}))
        return (f"python -m sglang.launch_server --model-path {base} --enable-lora --max-lora-rank {rank} "
                f"--lora-target-modules {targets} --lora-paths {name}={where}")
    return (f"python convert_lora_to_gguf.py {where} --base {base} --outtype f16  # then llama-server -m BASE.gguf "
            "--lora ADAPTER.gguf")


FINDERS = {"vllm": vllm_findings, "sglang": sglang_findings, "llamacpp": llamacpp_findings}
