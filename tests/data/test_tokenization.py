"""Tokenization: exact prompt boundaries, chat assistant-only masking, truncation and dropped examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import DataSection
from lora_causal.data.collator import CausalLMCollator
from lora_causal.data.dataset import model_columns, split_examples
from lora_causal.data.tokenizing import ALPACA_TEMPLATE_NO_INPUT
from lora_causal.data.prepare import prepare_data


def _data(path: Path, fmt: str, **extra) -> DataSection:
    return DataSection.model_validate({"train": {"path": str(path), "format": fmt}, **extra})


def _labels(example: dict, tokenizer, mask_prompt: bool = True) -> list[int]:
    return CausalLMCollator(tokenizer.pad_token_id, mask_prompt=mask_prompt)([example])["labels"][0].tolist()


def test_prompt_completion_boundary_is_exact(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"prompt": "Q: What color is the sky?\nA:", "completion": " blue."}]
    prepared = prepare_data(_data(write_jsonl(tmp_path / "d.jsonl", rows), "prompt_completion"), tiny_tokenizer, 0)
    (example,) = prepared.train
    prompt_ids = tiny_tokenizer(rows[0]["prompt"])["input_ids"]
    completion_ids = tiny_tokenizer(rows[0]["completion"], add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert prompt_ids[0] == tiny_tokenizer.bos_token_id  # the prompt carries the special tokens
    assert example["input_ids"] == prompt_ids + completion_ids + [eos]
    assert example["prompt_length"] == len(prompt_ids)
    labels = _labels(example, tiny_tokenizer)
    assert labels == [-100] * len(prompt_ids) + completion_ids + [eos]
    assert tiny_tokenizer.decode([t for t in labels if t != -100]) == " blue.<|eos|>"


def test_eos_is_not_doubled(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"prompt": "Q: hi\nA:", "completion": " hello<|eos|>"}]
    prepared = prepare_data(_data(write_jsonl(tmp_path / "d.jsonl", rows), "prompt_completion"), tiny_tokenizer, 0)
    ids = prepared.train[0]["input_ids"]
    assert ids[-1] == tiny_tokenizer.eos_token_id and ids[-2] != tiny_tokenizer.eos_token_id


def test_text_format_trains_every_token(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the dog likes food"}])
    (example,) = prepare_data(_data(path, "text"), tiny_tokenizer, 0).train
    assert example["prompt_length"] == 0
    assert example["input_ids"] == tiny_tokenizer("the dog likes food")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert _labels(example, tiny_tokenizer) == example["input_ids"]


def test_alpaca_maps_onto_prompt_and_completion(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "2 and 2", "output": "4"}]
    prepared = prepare_data(_data(write_jsonl(tmp_path / "a.jsonl", rows), "alpaca"), tiny_tokenizer, 0)
    first, second = prepared.train
    prompt = ALPACA_TEMPLATE_NO_INPUT.replace("{instruction}", "Say hi")
    assert first["input_ids"][: first["prompt_length"]] == tiny_tokenizer(prompt)["input_ids"]
    assert tiny_tokenizer.decode(second["input_ids"][: second["prompt_length"]], skip_special_tokens=True).endswith(
        "### Input:\n2 and 2\n\n### Response:\n"
    )


def test_columns_map_other_field_names(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "Q: hi\nA:", "answer": " yes."}])
    data = DataSection.model_validate(
        {"train": {"path": str(path), "format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}}}
    )
    (example,) = prepare_data(data, tiny_tokenizer, 0).train
    assert example["prompt_length"] == len(tiny_tokenizer("Q: hi\nA:")["input_ids"])


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
]


def test_chat_masks_everything_but_assistant_turns(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}])
    (example,) = prepare_data(_data(path, "messages"), tiny_tokenizer, 0).train
    labels = _labels(example, tiny_tokenizer)
    trained = [tiny_tokenizer.decode([t]) for t in labels if t != -100]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the two assistant turns, each with its end-of-turn token (and the newline the template puts after it)
    text = tiny_tokenizer.decode([t for t in labels if t != -100])
    assert text == "Hello!<|im_end|>\nFine, thanks.<|im_end|>\n"
    assert sum(1 for t in labels if t == im_end) == 2
    # nothing from the system or user turns is trained
    assert "Hi there" not in "".join(trained) and "How are you" not in "".join(trained)
    # the mask boundary is exact: the token before each assistant turn is the generation prompt's newline
    full = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tiny_tokenizer.decode(example["input_ids"]) == full
    first_target = next(i for i, t in enumerate(labels) if t != -100)
    assert tiny_tokenizer.decode(example["input_ids"][:first_target]).endswith("<|im_start|>assistant\n")


def test_chat_template_that_rewrites_history_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # drops every assistant turn but the last one (like templates that strip earlier reasoning)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(UserError, match="rewrites history"):
        prepare_data(_data(path, "messages"), tokenizer, 0)


def test_truncation_keep_start_and_keep_end(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"prompt": "Q: What color is the sky?\nA:", "completion": " blue. blue. blue. blue."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = prepare_data(_data(path, "prompt_completion"), tiny_tokenizer, 0).train[0]
    length = len(full["input_ids"]) - 3  # cut three tokens: fewer than the prompt holds
    assert full["prompt_length"] > 3
    start = prepare_data(_data(path, "prompt_completion", max_length=length), tiny_tokenizer, 0)
    assert start.train[0]["input_ids"] == full["input_ids"][:length]
    assert start.train[0]["prompt_length"] == full["prompt_length"]
    assert start.train_report.truncated == 1
    end = prepare_data(_data(path, "prompt_completion", max_length=length, truncation="keep_end"), tiny_tokenizer, 0)
    cut = len(full["input_ids"]) - length
    assert end.train[0]["input_ids"] == full["input_ids"][cut:]
    assert end.train[0]["prompt_length"] == full["prompt_length"] - cut


def test_examples_without_targets_are_dropped_and_counted(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [
        {"prompt": "Q: What color is the sky?\nA:", "completion": " blue."},
        {"prompt": "Q: What do cows drink? " * 5 + "\nA:", "completion": " water."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fits = len(tiny_tokenizer(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]) + 1  # + EOS
    assert len(tiny_tokenizer(rows[1]["prompt"])["input_ids"]) >= fits  # the long prompt fills the whole window
    prepared = prepare_data(_data(path, "prompt_completion", max_length=fits), tiny_tokenizer, 0)
    assert len(prepared.train) == 1
    assert prepared.train_report.dropped_no_targets == 1 and prepared.train_report.truncated == 1
    dropped = prepare_data(_data(path, "prompt_completion", max_length=fits, truncation="drop"), tiny_tokenizer, 0)
    assert dropped.train_report.dropped_too_long == 1 and dropped.train_report.dropped_no_targets == 0


def test_every_example_without_targets_is_an_error(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: What color is the sky?\nA:", "completion": " blue."}])
    with pytest.raises(UserError, match="none of the 1 examples"):
        prepare_data(_data(path, "prompt_completion", max_length=4), tiny_tokenizer, 0)


def test_eval_split_is_seeded_and_disjoint(tmp_path: Path, tiny_tokenizer) -> None:
    examples = [{"input_ids": [1, i, 2], "prompt_length": 1} for i in range(10, 30)]
    train_a, eval_a = split_examples(examples, 0.2, seed=3)
    train_b, eval_b = split_examples(examples, 0.2, seed=3)
    assert (train_a, eval_a) == (train_b, eval_b)
    assert len(eval_a) == 4 and len(train_a) == 16
    assert {e["input_ids"][1] for e in train_a}.isdisjoint(e["input_ids"][1] for e in eval_a)


def test_fingerprint_changes_with_the_data(tmp_path: Path, tiny_tokenizer) -> None:
    one = write_jsonl(tmp_path / "1.jsonl", [{"text": "the dog likes food"}])
    two = write_jsonl(tmp_path / "2.jsonl", [{"text": "the cat likes milk"}])
    first = prepare_data(_data(one, "text"), tiny_tokenizer, 0).fingerprint
    assert first == prepare_data(_data(one, "text"), tiny_tokenizer, 0).fingerprint
    assert first != prepare_data(_data(two, "text"), tiny_tokenizer, 0).fingerprint


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_other_file_types_read_the_same_rows(tmp_path: Path, tiny_tokenizer, suffix: str) -> None:
    import csv
    import json

    rows = [{"prompt": "Q: hi\nA:", "completion": " yes, surely."}, {"prompt": "Q: bye\nA:", "completion": " no."}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    reference = prepare_data(_data(write_jsonl(tmp_path / "r.jsonl", rows), "prompt_completion"), tiny_tokenizer, 0)
    prepared = prepare_data(_data(path, "prompt_completion"), tiny_tokenizer, 0)
    assert model_columns(prepared.train) == model_columns(reference.train)
    assert prepared.train[0]["row"] == {".json": "item 0", ".csv": "line 2", ".parquet": "row 0"}[suffix]
