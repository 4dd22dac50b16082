"""An alpaca eval file is rendered with the training template (data.train.template) unless data.eval.template
says otherwise, so eval loss is measured on the prompts training used; the key is alpaca-only and strictly typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl
from pydantic import ValidationError

from lora_causal.core.recipe import DataSection
from lora_causal.data.dataset import model_columns
from lora_causal.data.prepare import prepare_data
from lora_causal.data.tokenizing import fill_alpaca_template

ROWS = [{"instruction": f"Add {a} and {b}", "input": "", "output": f"{a + b}"} for a in range(3) for b in range(3)]
TRAIN_TEMPLATE = "Do this: {instruction}\nAnswer: "
EVAL_TEMPLATE = "Eval only: {instruction}\n=> "


def _data(tmp_path: Path, **eval_extra) -> DataSection:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held_out = write_jsonl(tmp_path / "eval.jsonl", ROWS[:4])
    return DataSection.model_validate({
        "train": {"path": str(train), "format": "alpaca", "template": TRAIN_TEMPLATE},
        "eval": {"path": str(held_out), **eval_extra}, "max_length": 512, "cache_dir": str(tmp_path / "cache"),
    })


def _prompts(prepared, tokenizer) -> list[str]:
    return [tokenizer.decode(e["input_ids"][: e["prompt_length"]]) for e in model_columns(prepared.eval)]


def _expected(tokenizer, template: str) -> list[str]:
    prompts = [fill_alpaca_template(row["instruction"], "", template) for row in ROWS[:4]]
    return [tokenizer.decode(tokenizer(prompt)["input_ids"]) for prompt in prompts]


@pytest.mark.parametrize("eval_format", [None, "alpaca"], ids=["format-inherited", "format-alpaca"])
def test_alpaca_eval_file_uses_the_training_template(tmp_path: Path, tiny_tokenizer, eval_format) -> None:
    data = _data(tmp_path, **({"format": eval_format} if eval_format else {}))
    assert _prompts(prepare_data(data, tiny_tokenizer, 0), tiny_tokenizer) == _expected(tiny_tokenizer, TRAIN_TEMPLATE)


def test_eval_template_overrides_and_is_part_of_the_cache_key(tmp_path: Path, tiny_tokenizer) -> None:
    inherited = _prompts(prepare_data(_data(tmp_path), tiny_tokenizer, 0), tiny_tokenizer)
    own = _prompts(prepare_data(_data(tmp_path, template=EVAL_TEMPLATE), tiny_tokenizer, 0), tiny_tokenizer)
    assert inherited == _expected(tiny_tokenizer, TRAIN_TEMPLATE)
    assert own == _expected(tiny_tokenizer, EVAL_TEMPLATE)


@pytest.mark.parametrize(("extra", "message"), [
    ({"template": "no placeholder"}, "must contain '{instruction}'"),
    ({"template": 3}, "template"),
    ({"format": "prompt_completion", "template": EVAL_TEMPLATE}, "eval.template applies to format 'alpaca' only"),
])
def test_eval_template_is_checked(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _data(tmp_path, **extra)


def test_eval_template_with_split_ratio_is_refused() -> None:
    with pytest.raises(ValidationError, match="split_ratio use data.train.template"):
        DataSection.model_validate({"train": {"path": "t.jsonl", "format": "alpaca"},
                                    "eval": {"split_ratio": 0.2, "template": EVAL_TEMPLATE}})
