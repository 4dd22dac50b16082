"""Label guardrails firing and not firing, `inspect` output, and the HTML page marking the right tokens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import QA_ROWS, base_recipe, write_jsonl, write_recipe

from lora_causal.cli import main
from lora_causal.core.errors import UserError
from lora_causal.core.recipe_file import load_recipe
from lora_causal.data.checks import run_checks
from lora_causal.data.collator import CausalLMCollator
from lora_causal.data.prepare import prepare_data
from lora_causal.model.loading import load_tokenizer
from lora_causal.training.run import run_training

CHAT = [
    {"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]}
]
# Closes a turn only when the next one starts: the last assistant turn never gets its end-of-turn token.
LATE_CLOSING_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_end|>\n<|im_start|>assistant\n' }}{% endif %}"
)


def _recipe(tmp_path: Path, model_dir: Path, rows: list, fmt: str = "prompt_completion", **sections):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    tree = base_recipe(model_dir, data, tmp_path / "run", **sections)
    tree["data"]["train"]["format"] = fmt
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", tree))


def _findings(recipe, tokenizer=None):
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer, 0)
    return {f.check: f for f in run_checks(prepared, recipe.data, recipe.checks, tokenizer, 2)}


def test_all_checks_pass_on_clean_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    findings = _findings(_recipe(tmp_path, tiny_model_dir, QA_ROWS))
    assert set(findings) == {"eos", "boundary", "truncation"}
    assert all(f.passed for f in findings.values()), [f.line() for f in findings.values()]
    assert findings["eos"].detail.endswith("is a target in 4 of 4 checked examples")


def test_eos_check_fires_when_truncation_cuts_every_eos(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "Q: hi\nA:", "completion": " blue blue blue blue blue blue blue blue blue."}] * 3
    recipe = _recipe(tmp_path, tiny_model_dir, rows, data={"max_length": 12}, checks={"max_truncated_share": 1.0})
    eos = _findings(recipe)["eos"]
    assert not eos.passed
    assert "is a target in 0 of 3 checked examples (rows line 1, line 2, line 3)" in eos.line()
    assert "raise data.max_length" in eos.line()


def test_pad_equal_to_eos_does_not_trip_the_eos_check(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, QA_ROWS)
    tokenizer = load_tokenizer(recipe.model)
    tokenizer.pad_token = tokenizer.eos_token  # pad == eos: padding is masked by position, EOS stays a target
    assert _findings(recipe, tokenizer)["eos"].passed


def test_end_of_turn_check_fires_for_a_template_that_leaves_it_out(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, CHAT, fmt="messages", data={"max_length": 128})
    tokenizer = load_tokenizer(recipe.model)
    assert _findings(recipe, tokenizer)["end_of_turn"].passed  # ChatML closes each assistant turn with <|im_end|>
    tokenizer.chat_template = LATE_CLOSING_TEMPLATE
    finding = _findings(recipe, tokenizer)["end_of_turn"]
    assert not finding.passed
    assert "0 of 2 assistant turns end with a supervised special token (rows line 1)" in finding.line()


def test_end_of_turn_passes_when_some_turns_are_cut_by_truncation(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, CHAT, fmt="messages", data={"max_length": 72})  # cuts the 2nd turn
    finding = _findings(recipe)["end_of_turn"]
    assert finding.passed and finding.detail.startswith("1 of 2 assistant turns")


def test_end_of_turn_fires_only_when_no_turn_is_closed(tmp_path: Path, tiny_model_dir: Path) -> None:
    single = [{"messages": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello!"}]}]
    recipe = _recipe(tmp_path, tiny_model_dir, single * 2, fmt="messages")
    tokenizer = load_tokenizer(recipe.model)
    tokenizer.chat_template = LATE_CLOSING_TEMPLATE
    finding = _findings(recipe, tokenizer)["end_of_turn"]
    assert not finding.passed and "0 of 2 assistant turns" in finding.line() and "checks.skip: [end_of_turn]" in finding.line()


def test_boundary_check_fires_for_trailing_spaces_in_prompts(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "Q: What does the dog like?\nA: ", "completion": "food."}] * 3 + QA_ROWS
    finding = _findings(_recipe(tmp_path, tiny_model_dir, rows))["boundary"]
    assert not finding.passed
    assert "3 of 7 prompt/completion pairs tokenize differently joined (rows line 1, line 2, line 3)" in finding.line()
    relaxed = _recipe(tmp_path, tiny_model_dir, rows, checks={"max_boundary_mismatch_share": 0.5})
    assert _findings(relaxed)["boundary"].passed


def test_truncation_check_uses_the_recipe_threshold(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = QA_ROWS + [{"prompt": "Q: What do cows drink?\nA:", "completion": " water " * 30}]  # QA rows fit in 32
    strict = _findings(_recipe(tmp_path, tiny_model_dir, rows, data={"max_length": 32}, checks={"max_truncated_share": 0.1}))
    assert not strict["truncation"].passed and "1 of 5 examples (20%) were cut" in strict["truncation"].line()
    lenient = _findings(_recipe(tmp_path, tiny_model_dir, rows, data={"max_length": 32}, checks={"max_truncated_share": 0.25}))
    assert lenient["truncation"].passed


def test_failed_check_stops_training_before_anything_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "Q: What does the dog like?\nA: ", "completion": "the food."}] * 4
    with pytest.raises(UserError, match=r"check boundary failed: 4 of 4 .*raise checks\.max_boundary_mismatch_share"):
        run_training(_recipe(tmp_path, tiny_model_dir, rows), say=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_skipped_check_lets_training_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "Q: What does the dog like?\nA: ", "completion": "the food."}] * 4
    recipe = _recipe(tmp_path, tiny_model_dir, rows, checks={"skip": ["boundary"]}, train={"max_steps": 1})
    lines: list[str] = []
    run_training(recipe, say=lines.append)
    assert any("boundary: skipped" in line for line in lines)


def test_inspect_prints_positions_and_writes_html_marking_the_trained_tokens(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, QA_ROWS)
    html_path, png_path = tmp_path / "inspect.html", tmp_path / "lengths.png"
    code = main(["inspect", str(tmp_path / "recipe.yaml"), "--n", "2", "--html", str(html_path), "--png", str(png_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "example 1 of 2 · line 1" in out and "trained to predict" in out and "masked" in out
    assert "'·four'" in out or "'·f'" in out  # the first completion token is shown as a target
    assert "eos: ok" in out
    # the default token budget (2 x 64) packs each step of 2 examples into one micro-batch
    assert ("token budget 128, one process: 1 micro-batch per optimizer step and process (without a budget: 1 micro-batch of 2 "
            "examples)" in " ".join(out.split()))  # the console wraps long lines
    assert max(len(line) for line in out.splitlines()) <= 80  # readable at 80 columns
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = html_path.read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "<script" not in page
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer, 0)
    collator = CausalLMCollator(tokenizer.pad_token_id, mask_prompt=True)
    examples = page.split("<h2>Example ")[1:]
    assert len(examples) == 2
    for example, html_part in zip(prepared.train, examples):
        marks = re.findall(r"class='tok (target|masked)' data-pos='(\d+)'", html_part)
        labels = collator([example])["labels"][0].tolist()
        expected = [("target" if pos > 0 and label != -100 else "masked", str(pos)) for pos, label in enumerate(labels)]
        assert marks == expected
        assert sum(1 for state, _ in marks if state == "target") == len(example["input_ids"]) - example["prompt_length"]


def test_inspect_exits_2_on_a_failed_check(tmp_path: Path, tiny_model_dir: Path, capfd) -> None:
    rows = [{"prompt": "Q: What does the dog like?\nA: ", "completion": "the food."}] * 2
    _recipe(tmp_path, tiny_model_dir, rows)
    assert main(["inspect", str(tmp_path / "recipe.yaml")]) == 2
    captured = capfd.readouterr()
    assert "check boundary failed" in captured.out  # shown in the checks section
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: check boundary failed: 2 of 2")


@pytest.mark.parametrize("override", ["data.max_length=4096", "lora.target_modules=[q_proj,nope]"])
def test_inspect_refuses_what_validate_and_train_refuse_before_tokenizing(tmp_path: Path, tiny_model_dir: Path,
                                                                          capsys, override: str) -> None:
    from conftest import assert_one_line_error, call_cli

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    cache = tmp_path / "cache"
    verdicts = []
    for command in ("validate", "inspect", "train"):
        code = call_cli([command, str(recipe), override, f"data.cache_dir={cache}"])
        captured = capsys.readouterr()
        verdicts.append(assert_one_line_error(code, captured.err, r"^error: (data\.max_length|lora\.target_modules): "))
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert not cache.exists() and not (tmp_path / "run").exists()  # refused before any data was tokenized


def test_histogram_bins_cover_the_lengths_and_end_at_the_longest() -> None:
    from lora_causal.commands.inspection import histogram_rows

    rows = histogram_rows([5, 6, 17, 64], bins=10)
    labels = [label for label, _, _ in rows]
    assert labels[0].startswith("5-") and labels[-1].endswith("-64")  # not 60-65 when nothing is longer than 64
    assert sum(count for _, count, _ in rows) == 4
    assert histogram_rows([7]) == [("7-7", 1, "█" * 40)]
