"""GGUF export: the real file written and read back through transformers' GGUF reader against the merged model; a
deliberately broken layout (no Q/K row permutation) refused by the parity check on a sharp tiny model; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CORPUS, assert_one_line_error, call_cli

from lora_causal.core.errors import UserError
from lora_causal.serving import gguf_writer
from lora_causal.serving.export import export_gguf
from lora_causal.serving.parity import gguf_metadata

pytest.importorskip("gguf")


def _sharp_model(folder: Path, family: str) -> Path:
    """A tiny model whose attention is peaked and position-sensitive (q/k weights std 0.6, others 0.15), so a wrong
    rotary layout changes its predictions; with an end-token list [EOS, <|im_end|>] in generation_config."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig

    from lora_causal.model.synthetic import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(CORPUS, vocab_size=300)
    tokenizer.save_pretrained(folder)
    # vocab_size 320: padded past the tokenizer's 300 tokens, as real checkpoints often are
    config = CONFIG_MAPPING[family](vocab_size=320, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.6 if ("q_proj" in name or "k_proj" in name) else 0.15)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end], bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sharp_model(tmp_path_factory.mktemp("sharp") / "merged", "llama")


def _quiet(*_: object) -> None:
    return None


def test_f16_export_reproduces_the_merged_model_with_its_stop_tokens(sharp_llama: Path, tmp_path: Path) -> None:
    report = export_gguf(str(sharp_llama), "f16", out=str(tmp_path / "out"), say=_quiet)
    parity = report["parity"]
    assert parity["passed"] and parity["failures"] == []
    assert parity["mean_kl"] < 1e-3 and parity["top1_agreement"] >= 0.98
    assert all(row["token_ids_equal"] for row in parity["prompts"]) and len(parity["prompts"]) == 4
    assert parity["stop_token_ids"] == {"generation_config": [2, 4], "llama_cpp_stops_on": [2, 4],
                                        "texts": ["<|eos|>", "<|im_end|>"]}
    assert parity["chat_template_equal"] is True
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["Modelfile", "export_report.json", "merged-f16.gguf"]
    metadata, tokens = gguf_metadata(tmp_path / "out" / "merged-f16.gguf")
    assert (metadata["general.architecture"], metadata["tokenizer.ggml.pre"], metadata["tokenizer.ggml.eos_token_id"],
            metadata["tokenizer.ggml.eot_token_id"], len(tokens)) == ("llama", "gpt-2", 2, 4, 320)
    assert (tmp_path / "out" / "Modelfile").read_text() == (
        'FROM ./merged-f16.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|eos|>"\nPARAMETER stop "<|im_end|>"\n')
    saved = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert saved["format"] == "lora_causal-export-report" and saved["parity"]["mean_kl"] == parity["mean_kl"]


def test_a_missing_qk_permutation_fails_the_parity_check_and_leaves_nothing(
    sharp_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gguf_writer, "permute_qk", lambda weights, heads: weights)  # the classic converter bug
    with pytest.raises(UserError, match=r"does not reproduce the merged model \(mean KL .* is above the f16 gate 0.001\)"):
        export_gguf(str(sharp_llama), "f16", out=str(tmp_path / "out"), say=_quiet)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging leftover


def test_broken_layout_is_far_outside_the_gate(sharp_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate is not marginal: the correct file measures orders of magnitude below it, the broken one far above."""
    from lora_causal.serving.parity import compare_export

    gguf_writer.write_gguf(sharp_llama, tmp_path / "good.gguf", "f16", say=_quiet)
    monkeypatch.setattr(gguf_writer, "permute_qk", lambda weights, heads: weights)
    gguf_writer.write_gguf(sharp_llama, tmp_path / "bad.gguf", "f16", say=_quiet)
    good = compare_export(sharp_llama, tmp_path / "good.gguf", "f16", [], say=_quiet)
    bad = compare_export(sharp_llama, tmp_path / "bad.gguf", "f16", [], say=_quiet)
    assert good["mean_kl"] < 1e-4 < 0.5 < bad["mean_kl"]
    assert bad["top1_agreement"] < 0.5 < 0.95 < good["top1_agreement"]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_export(family: str, tmp_path: Path) -> None:
    merged = _sharp_model(tmp_path / "merged", family)
    report = export_gguf(str(merged), "f16", out=str(tmp_path / "out"), say=_quiet, modelfile=False)
    assert report["parity"]["passed"] and report["parity"]["mean_kl"] < 1e-3
    assert report["writer"]["architecture"] == ("qwen2" if family == "qwen2" else "llama")
    assert not (tmp_path / "out" / "Modelfile").exists()


def test_q8_0_passes_its_gate_with_quantization_noise(sharp_llama: Path, tmp_path: Path) -> None:
    report = export_gguf(str(sharp_llama), "q8_0", out=str(tmp_path / "out"), say=_quiet)
    assert report["parity"]["passed"] and 1e-4 < report["parity"]["mean_kl"] < 0.1


def test_refusals_are_one_line_and_write_nothing(sharp_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    from lora_causal.core.rundir import RUN_FORMAT, RUN_MARKER

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    quantized = tmp_path / "bnb"
    quantized.mkdir()
    for item in sharp_llama.iterdir():
        (quantized / item.name).write_bytes(item.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    gpt2 = tmp_path / "gpt2"
    (gpt2).mkdir()
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text(json.dumps({"format": RUN_FORMAT, "version": 1}))
    (run / "recipe.yaml").write_text(f"recipe_version: 1\nmodel: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: "
                                     f"{{path: {tiny_model_dir / 'config.json'}, format: text}}}}\noutput: {{dir: {run}}}\n")
    capsys.readouterr()  # the fixtures' own save progress
    cases = [
        (["export", str(sharp_llama), "--type", "q4_k_m"], r"K-quant, which only llama.cpp's quantizer writes"),
        (["export", str(sharp_llama), "--type", "q4_0"], r"--type q4_0: choose from f32, f16, bf16, q8_0"),
        (["export", str(quantized)], r"still carries a quantization_config"),
        (["export", str(gpt2)], r"supports llama, mistral, qwen2 models and this is a gpt2 model; .*set LLAMA_CPP_DIR"),
        (["export", str(run)], r"has no merged model; merge it first"),
        (["export", str(tmp_path / "missing")], r"does not exist"),
    ]
    for args, pattern in cases:
        code = call_cli([*args, "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        assert_one_line_error(code, captured.err, pattern, captured.out)
    assert not (tmp_path / "out").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    code = call_cli(["export", str(sharp_llama), "--out", str(tmp_path / "other"), "--force"])
    assert_one_line_error(code, capsys.readouterr().err, r"holds no lora_causal export")


def test_llama_cpp_runtime_agrees_when_installed(sharp_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="opt-in: llama-cpp-python compiles llama.cpp (about 30 minutes on 2 cores)")
    report = export_gguf(str(sharp_llama), "f16", out=str(tmp_path / "out"), say=_quiet)
    assert report["parity"]["llama_cpp"]["mean_kl"] < 1e-3
