"""The prepared-data cache: keys, reuse, partial and concurrent writes, parallel tokenization, sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl

from lora_causal.core.errors import UserError
from lora_causal.core.liveness import host_tag
from lora_causal.core.recipe import ChecksSection, DataSection
from lora_causal.data.cache import Entry, clear_cache
from lora_causal.data.checks import run_checks
from lora_causal.data.dataset import model_columns
from lora_causal.data.prepare import prepare_data, sample_examples
from lora_causal.data.tokenizing import RowTokenizer

ROWS = [
    {"prompt": f"Q: What is {a} plus {b}?\nA:", "completion": f" {a + b}.", "text": f"the dog likes {a} foods",
     "instruction": f"Add {a} and {b}", "input": "", "output": f"{a + b}", "question": f"Q: {a} and {b}?\nA:"}
    for a in range(6) for b in range(4)
]


def _data(path: Path, cache: Path, fmt: str = "prompt_completion", **extra) -> DataSection:
    train = {"path": str(path), "format": fmt, **extra.pop("train", {})}
    return DataSection.model_validate({"train": train, "max_length": 512, "cache_dir": str(cache), **extra})


def _entries(cache: Path) -> set[str]:
    return {child.name for child in cache.iterdir() if child.is_dir() and not child.name.startswith((".", "launches"))}


def _reference(data: DataSection, tokenizer, rows: list[dict]) -> list[dict]:
    """What the examples must be: each row tokenized on its own (no cache, no batching, no processes)."""
    tokenize = RowTokenizer(tokenizer, data.train, data.train.format, "data.train")
    out = []
    for index, row in enumerate(rows):
        ids, prompt_length, mask = tokenize(f"line {index + 1}", row)
        out.append({"input_ids": ids, "prompt_length": prompt_length, **({"target_mask": mask} if mask else {})})
    return out


def test_same_recipe_hits_the_cache_and_labels_match_without_it(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = _data(path, tmp_path / "cache")
    first = prepare_data(data, tiny_tokenizer, 0)
    (entry,) = _entries(tmp_path / "cache")
    mtime = (tmp_path / "cache" / entry / "entry.json").stat().st_mtime_ns
    again = prepare_data(data, tiny_tokenizer, 0)
    assert (tmp_path / "cache" / entry / "entry.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    uncached = prepare_data(data.model_copy(update={"cache": False}), tiny_tokenizer, 0)
    expected = _reference(data, tiny_tokenizer, ROWS)
    assert model_columns(first.train) == model_columns(again.train) == model_columns(uncached.train) == expected
    assert first.fingerprint == again.fingerprint == uncached.fingerprint
    assert first.train_report == again.train_report


def _with_tokenizer_template(tokenizer):
    changed = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    changed.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|im_end|>\n")
    return changed


@pytest.mark.parametrize("change", ["content", "format", "columns", "template", "tokenizer", "max_length", "truncation",
                                    "mask_prompt", "versions"])
def test_each_key_component_misses_the_cache(tmp_path: Path, tiny_tokenizer, change: str, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    fmt = "alpaca" if change == "template" else "prompt_completion"
    base = _data(path, cache, fmt)
    prepare_data(base, tiny_tokenizer, 0)
    tokenizer = tiny_tokenizer
    data = base
    if change == "content":
        write_jsonl(path, [*ROWS, ROWS[0]])  # same path, new content
    elif change == "format":
        data = _data(path, cache, "text", mask_prompt=False)
    elif change == "columns":
        data = _data(path, cache, train={"columns": {"prompt": "question"}})
    elif change == "template":
        data = _data(path, cache, "alpaca", train={"template": "Do this: {instruction}\n"})
    elif change == "tokenizer":
        tokenizer = _with_tokenizer_template(tiny_tokenizer)
    elif change == "max_length":
        data = base.model_copy(update={"max_length": 20})
    elif change == "truncation":
        data = base.model_copy(update={"truncation": "keep_end"})
    elif change == "mask_prompt":
        data = base.model_copy(update={"mask_prompt": False})
    else:
        from lora_causal.data import cache as cache_module

        monkeypatch.setattr(cache_module, "library_versions", lambda: {"transformers": "0.0.0-other"})
    before = _entries(cache)
    prepare_data(data, tokenizer, 0)
    assert len(_entries(cache) - before) == 1, f"changing {change} must prepare a new entry"
    prepare_data(data, tokenizer, 0)
    assert len(_entries(cache) - before) == 1, f"the same {change} again must hit the cache"


def test_num_proc_and_seed_are_not_part_of_the_key(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = _data(path, tmp_path / "cache", eval={"split_ratio": 0.25})
    first = prepare_data(data, tiny_tokenizer, 0)
    other = prepare_data(data.model_copy(update={"num_proc": 2}), tiny_tokenizer, 1)
    assert len(_entries(tmp_path / "cache")) == 1
    assert len(first.eval) == len(other.eval) == 6 and first.fingerprint != other.fingerprint  # another split


def test_parallel_processes_give_the_same_examples_and_the_first_error(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    from lora_causal.data import shards

    monkeypatch.setattr(shards, "SHARD_ROWS", 100)  # several shards from a small file
    rows = ROWS * 40
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = prepare_data(_data(path, tmp_path / "one", num_proc=1), tiny_tokenizer, 0)
    three = prepare_data(_data(path, tmp_path / "three", num_proc=3), tiny_tokenizer, 0)
    assert model_columns(one.train) == model_columns(three.train)
    assert one.train_report == three.train_report and one.fingerprint == three.fingerprint
    assert json.loads(next((tmp_path / "three").glob("*/entry.json")).read_text())["processes"] == 3
    broken = [dict(row) for row in rows]
    broken[900]["completion"] = 7  # in a late shard
    broken[300].pop("completion")  # in an earlier shard: this one is reported
    path = write_jsonl(tmp_path / "bad.jsonl", broken)
    with pytest.raises(UserError, match=r"^data\.train: line 301: no 'completion' field"):
        prepare_data(_data(path, tmp_path / "bad", num_proc=3), tiny_tokenizer, 0)
    assert not _entries(tmp_path / "bad") and not list((tmp_path / "bad").glob(".*.partial"))


def test_partial_and_damaged_entries_are_rebuilt(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    data = _data(path, cache)
    expected = model_columns(prepare_data(data, tiny_tokenizer, 0).train)
    (key,) = _entries(cache)
    entry = cache / key
    shard = next(entry.glob("examples-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:100])  # a cut file: its size no longer matches entry.json
    assert Entry.read(entry) is None
    dead = cache / f".{key}.{host_tag()}-{_dead_pid()}-0badc0de.partial"  # left by a killed process of this machine
    alive = cache / f".{key}.0000beef-{os.getpid()}-0badc0de.partial"  # another machine's writer, still at work
    dead.mkdir()
    alive.mkdir()
    said: list[str] = []
    assert model_columns(prepare_data(data, tiny_tokenizer, 0, say=said.append).train) == expected
    assert any("is damaged" in line and "preparing it again" in line for line in said), said  # not silently
    assert Entry.read(entry) is not None and not dead.exists() and alive.is_dir()
    alive.rmdir()
    (entry / "entry.json").unlink()  # never completed
    assert model_columns(prepare_data(data, tiny_tokenizer, 0).train) == expected


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _preparer(data_path: Path, cache: Path, tokenizer_dir: Path, num_proc: int = 1) -> subprocess.Popen[str]:
    code = (
        "import sys, json\n"
        "from transformers import AutoTokenizer\n"
        "from lora_causal.core.recipe import DataSection\n"
        "from lora_causal.data.prepare import prepare_data\n"
        f"data = DataSection.model_validate({{'train': {{'path': {str(data_path)!r}, 'format': 'prompt_completion'}},"
        f" 'max_length': 512, 'cache_dir': {str(cache)!r}, 'num_proc': {num_proc}}})\n"
        f"prepared = prepare_data(data, AutoTokenizer.from_pretrained({str(tokenizer_dir)!r}), 0)\n"
        "print(json.dumps({'fingerprint': prepared.fingerprint, 'examples': len(prepared.train)}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_a_killed_preparation_leaves_nothing_that_is_used(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 2000)  # long enough to be caught mid-write
    cache = tmp_path / "cache"
    process = _preparer(path, cache, tiny_model_dir)
    deadline = time.time() + 120
    while not list(cache.glob(".*.partial/examples-*.arrow")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the preparation ended before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not _entries(cache) and list(cache.glob(".*.partial"))
    prepared = prepare_data(_data(path, cache), tiny_tokenizer, 0)
    assert len(prepared.train) == len(ROWS) * 2000 and len(_entries(cache)) == 1
    assert not list(cache.glob(".*.partial"))


def test_concurrent_preparations_of_the_same_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 200)
    cache = tmp_path / "cache"
    processes = [_preparer(path, cache, tiny_model_dir, num_proc) for num_proc in (1, 2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] and results[0]["examples"] == len(ROWS) * 200
    assert len(_entries(cache)) == 1 and not list(cache.glob(".*.partial"))


def test_a_folder_of_shards_is_one_dataset(tmp_path: Path, tiny_tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:10])
    pq.write_table(pa.Table.from_pylist(ROWS[10:]), folder / "b.parquet")
    (folder / "README.txt").write_text("not data")
    prepared = prepare_data(_data(folder, tmp_path / "cache"), tiny_tokenizer, 0)
    single = prepare_data(_data(write_jsonl(tmp_path / "all.jsonl", ROWS), tmp_path / "cache"), tiny_tokenizer, 0)
    assert model_columns(prepared.train) == model_columns(single.train)
    assert prepared.train[0]["row"] == "a.jsonl line 1" and prepared.train[10]["row"] == "b.parquet row 0"
    (folder / "c.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"data\.train: c\.jsonl line 2: not valid JSON"):
        prepare_data(_data(folder, tmp_path / "cache"), tiny_tokenizer, 0)


def test_boundary_problems_only_in_the_tail_are_caught(tmp_path: Path, tiny_tokenizer) -> None:
    good = [{"prompt": f"Q: What is {n}?\nA:", "completion": " food."} for n in range(300)]
    bad = [{"prompt": f"Q: What does dog {n} like?\nA: ", "completion": "food."} for n in range(300)]  # trailing spaces
    path = write_jsonl(tmp_path / "d.jsonl", good + bad)  # a clean file with a bad one appended
    data = _data(path, tmp_path / "cache")
    prepared = prepare_data(data, tiny_tokenizer, 0)
    findings = {f.check: f for f in run_checks(prepared, data, ChecksSection(sample_size=256), tiny_tokenizer, 8, seed=3)}
    assert not findings["boundary"].passed, findings["boundary"].line()
    assert "(rows line 3" in findings["boundary"].detail or "(rows line 4" in findings["boundary"].detail  # the tail
    clean = prepare_data(_data(write_jsonl(tmp_path / "g.jsonl", good), tmp_path / "cache"), tiny_tokenizer, 0)
    assert {f.check: f for f in run_checks(clean, data, ChecksSection(sample_size=256), tiny_tokenizer)}["boundary"].passed


def test_merge_samples_without_tokenizing_everything(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = _data(path, tmp_path / "cache")
    drawn = sample_examples(data, tiny_tokenizer, 0, 3)  # nothing cached yet: only drawn rows are tokenized
    assert len(drawn) == 3 and not (tmp_path / "cache").exists()
    by_row = {f"line {index + 1}": example for index, example in enumerate(_reference(data, tiny_tokenizer, ROWS))}
    assert all(example["input_ids"] == by_row[example["row"]]["input_ids"] for example in drawn)
    prepare_data(data, tiny_tokenizer, 0)
    cached = sample_examples(data, tiny_tokenizer, 0, 3)
    assert len(cached) == 3 and all(example["input_ids"] == by_row[example["row"]]["input_ids"] for example in cached)


def test_hub_settings_reach_load_dataset_and_errors_name_them(tmp_path: Path, tiny_tokenizer) -> None:
    from lora_causal.data.sources import Source, hub_arguments

    settings = DataSection.model_validate({"train": {"path": "openai/gsm8k", "format": "prompt_completion",
                                                     "config": "main", "revision": "abc123",
                                                     "data_files": ["main/train-*.parquet"], "split": "test"}}).train
    source = Source("data.train", settings.path, settings.split, settings.config, settings.data_files, settings.revision)
    assert hub_arguments(source) == {"path": "openai/gsm8k", "split": "test", "name": "main",
                                     "data_files": ["main/train-*.parquet"], "revision": "abc123"}
    with pytest.raises(UserError, match=r"data\.train: 'openai/gsm8k' is not a local file and could not be loaded from "
                                        r"the Hub with split 'test', name 'main', data_files .*revision 'abc123'"):
        Source.resolve(settings, "data.train")  # offline in the tests
    local = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match=r"data\.train\.config: applies to Hub datasets only"):
        prepare_data(_data(local, tmp_path / "cache", train={"config": "main"}), tiny_tokenizer, 0)


def test_cache_clear_removes_entries(tmp_path: Path, tiny_tokenizer) -> None:
    prepare_data(_data(write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"), tiny_tokenizer, 0)
    removed, size = clear_cache(tmp_path / "cache")
    assert removed == 1 and size > 0 and not _entries(tmp_path / "cache")


def test_hub_sources_are_keyed_by_the_resolved_commit(tmp_path: Path) -> None:
    """datasets' builder (offline here, on a data folder) hands its hash, the resolved commit for a Hub dataset, to
    the source's identity; the requested revision is not the key."""
    import datasets

    from lora_causal.data.sources import Source, _load_hub

    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    source = Source("data.train", str(folder), "train", revision="main")
    source._hub = _load_hub(source)
    expected = datasets.load_dataset_builder(str(folder)).hash
    identity = source.identity()
    assert source.commit == expected and identity["commit"] == expected and "revision" not in identity
    assert identity["rows"] == len(ROWS)


def test_a_byte_order_mark_is_read_past_and_a_line_that_is_not_utf8_is_named(tmp_path: Path, tiny_tokenizer) -> None:
    """Editors that write a UTF-8 byte-order mark are common; a latin-1 line among UTF-8 ones is named by its line."""
    lines = [json.dumps(row) for row in ROWS[:3]]
    for suffix, text in (("jsonl", "\n".join(lines) + "\n"), ("json", "[" + ", ".join(lines) + "]")):
        path = tmp_path / f"bom.{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        plain = tmp_path / f"plain.{suffix}"
        plain.write_text(text, encoding="utf-8")
        with_bom = prepare_data(_data(path, tmp_path / f"cache-{suffix}"), tiny_tokenizer, 0)
        without = prepare_data(_data(plain, tmp_path / f"cache-plain-{suffix}"), tiny_tokenizer, 0)
        assert model_columns(with_bom.train) == model_columns(without.train) and len(with_bom.train) == 3
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((lines[0] + "\n").encode() + '{"prompt": "caf\xe9", "completion": " x"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.jsonl line 2 is not UTF-8 text; save the file as UTF-8"):
        prepare_data(_data(latin, tmp_path / "cache-latin"), tiny_tokenizer, 0)
