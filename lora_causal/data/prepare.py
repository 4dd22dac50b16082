"""Prepare tokenized data once, into the cache (`lora_causal.data.cache`), and memory-map it in every process.

A source's entry is reused when complete, else tokenized (`lora_causal.data.shards`) into a private staging
folder and published by rename. Several launched processes: each machine's first process prepares while the
others poll for its launch marker (no collective, so no timeout), then every process memory-maps the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import DISK_ERRNOS, ReportedElsewhere, UserError
from lora_causal.data.cache import (
    Entry,
    cache_problem,
    claimed,
    data_cache_dir,
    entry_key,
    publish,
    remove_dead_partials,
    staging_folder,
    tokenizer_digest,
)
from lora_causal.data.dataset import DataReport, PreparedData, RawRows, check_not_empty, split_indices, target_count
from lora_causal.data.shards import build_entry, truncate
from lora_causal.data.sources import Source
from lora_causal.data.tokenizing import RowTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_causal.core.recipe import DataSection, DataSource, EvalSection

POLL_S = 0.2
DEFAULT_PATIENCE_S = 1800.0  # train.collective_timeout_s's default: how long a silent preparer is waited for
STALE_LAUNCH_S = 7 * 24 * 3600


# ---------------------------------------------------------------------------------------------------------
# Where and under which key


# ---------------------------------------------------------------------------------------------------------
# Entries


def prepare_source(source: Source, settings: DataSource | EvalSection, fmt: str, data: DataSection,
                   tokenizer: PreTrainedTokenizerBase, tokenizer_hash: str, say: Any = None,
                   patience_s: float = DEFAULT_PATIENCE_S) -> Entry:
    """The cache entry of one source: reused when complete and verified, else tokenized (with `data.num_proc`
    processes) into this process's own staging folder and published (`lora_causal.data.cache`)."""
    say = say or (lambda *args: None)
    row_tokenizer = RowTokenizer(tokenizer, settings, fmt, source.where)  # refuses a chat format without template
    key = entry_key(source.identity(), settings, fmt, data, tokenizer_hash)
    cache = data_cache_dir(data)
    target = cache / key
    if data.cache:
        entry = Entry.read(target)
        if entry is not None:
            return entry
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with claimed(cache, key, say, patience_s, lambda: Entry.read(target) if data.cache else None) as waited_for:
            if waited_for is not None:  # prepared by the process we waited for
                return waited_for
            entry = Entry.read(target) if data.cache else None
            if entry is not None:  # published between the first look and the lock
                return entry
            remove_dead_partials(cache, key)
            if data.cache and (target / "entry.json").exists():  # there, but its sizes or digests do not match
                say(f"the prepared entry of {source.where} in {cache} is damaged (a file's size or digest differs); "
                    "preparing it again")
            staging = staging_folder(cache, key)
            staging.mkdir()
            try:
                meta = build_entry(source, row_tokenizer, data, staging)
                meta["key"] = key
                return publish(staging, target, meta)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS or isinstance(exc, PermissionError):
            raise cache_problem(exc, cache) from None
        raise


# ---------------------------------------------------------------------------------------------------------
# Whole recipes: one process, or several


def _sources(data: DataSection) -> list[tuple[str, Any, str]]:
    """(where, settings, format) of the train source and of a separate eval source."""
    sources = [("data.train", data.train, data.train.format)]
    if data.eval is not None and data.eval.path is not None:  # rendered with the training template unless it has one
        settings = data.eval.model_copy(update={"template": data.eval_template()})
        sources.append(("data.eval", settings, data.eval.format or data.train.format))
    return sources


def prepare_entries(data: DataSection, tokenizer: PreTrainedTokenizerBase, say: Any = None,
                    patience_s: float = DEFAULT_PATIENCE_S) -> list[Entry]:
    """The cache entries of the recipe's data (train, then a separate eval source), prepared if needed."""
    tokenizer_hash = tokenizer_digest(tokenizer)
    entries = []
    for where, settings, fmt in _sources(data):
        source = Source.resolve(settings, where)
        entries.append(prepare_source(source, settings, fmt, data, tokenizer, tokenizer_hash, say, patience_s))
    return entries


def load_prepared(entries: list[Entry], data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """PreparedData over complete entries (memory-mapped), with the seeded eval split applied."""
    train_entry = entries[0]
    train, train_report = train_entry.examples(), train_entry.report()
    check_not_empty(train_report, data, "data.train")
    evaluation, eval_report = None, None
    fingerprint = hashlib.sha256(train_entry.meta["digest"].encode())
    if data.eval is not None and data.eval.split_ratio is not None:
        kept, held_out = split_indices(len(train), data.eval.split_ratio, seed)
        train, evaluation = train.select(kept), train.select(held_out)
        train_report, eval_report = train.measure(train_report), evaluation.measure(DataReport(rows=len(held_out)))
        fingerprint.update(f"|split {data.eval.split_ratio} seed {seed}".encode())
    elif len(entries) > 1:
        evaluation, eval_report = entries[1].examples(), entries[1].report()
        check_not_empty(eval_report, data, "data.eval")
        fingerprint.update(entries[1].meta["digest"].encode())
    settings = data.train
    return PreparedData(
        train=train, eval=evaluation, train_report=train_report, eval_report=eval_report,
        fingerprint=fingerprint.hexdigest(), train_rows=train_entry.rows(),
        row_tokenizer=RowTokenizer(tokenizer, settings, settings.format, "data.train"),
    )


def prepare_data(data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, say: Any = None,
                 patience_s: float = DEFAULT_PATIENCE_S) -> PreparedData:
    """Read, tokenize (or reuse from the cache) and split the recipe's data. Raises `UserError` on bad input."""
    return load_prepared(prepare_entries(data, tokenizer, say, patience_s), data, tokenizer, seed)


def _launch_marker(data: DataSection, launch: str, node: int) -> Path:
    return data_cache_dir(data) / "launches" / f"{launch}-{node}.json"


def _write_marker(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("*.json"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_LAUNCH_S:
                old.unlink()
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(content))
    staging.replace(path)


def prepare_shared(data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, state: Any,
                   say: Any = None, patience_s: float = DEFAULT_PATIENCE_S) -> PreparedData:
    """Several launched processes: each machine's first process prepares (with a heartbeat), the others poll its
    launch marker (no collective that could time out), then all memory-map the same entries.

    A failure of the preparing process is reported by it alone; the waiting ones exit with its status
    (`ReportedElsewhere`). A preparer that dies without a word (kill -9, the OOM killer) or falls silent for
    `patience_s` (train.collective_timeout_s) ends the wait with one line.
    """
    if state.num_processes == 1:
        return prepare_data(data, tokenizer, seed, say, patience_s)
    from accelerate.utils import broadcast_object_list

    from lora_causal.core.liveness import Watch, heartbeat

    launch = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(launch, from_process=0)  # everyone is here already: a name for this launch, no waiting
    marker = _launch_marker(data, launch[0], state.process_index - state.local_process_index)
    beat = marker.with_suffix(".beat")
    if state.is_local_main_process:
        try:
            beat.parent.mkdir(parents=True, exist_ok=True)
            with heartbeat(beat):
                entries = prepare_entries(data, tokenizer, say, patience_s)
        except UserError:
            _write_marker(marker, {"ok": False, "exit_code": 2})
            raise
        except BaseException:
            _write_marker(marker, {"ok": False, "exit_code": 1})
            raise
        _write_marker(marker, {"ok": True, "entries": [str(entry.path) for entry in entries]})
        return load_prepared(entries, data, tokenizer, seed)
    watch = Watch(beat, patience_s)
    while not marker.is_file():
        why = watch.check()
        if why is not None and not marker.is_file():
            raise UserError(
                f"the process that prepares the data on this machine {why} without finishing it; run the same command "
                "again (it prepares the data anew), or raise train.collective_timeout_s if preparing is only slow",
                own=True,
            )
        time.sleep(POLL_S)
    outcome = json.loads(marker.read_text())
    if not outcome["ok"]:
        raise ReportedElsewhere(outcome["exit_code"])
    entries = [Entry.read(Path(path), verify=False) for path in outcome["entries"]]  # verified by the preparer
    if any(entry is None for entry in entries):
        raise UserError(f"the data prepared by the first process is not readable from this one ({outcome['entries']}); "
                        "put data.cache_dir on a file system every process of a machine shares")
    return load_prepared(entries, data, tokenizer, seed)


def sample_examples(data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, count: int) -> list[dict[str, Any]]:
    """`count` examples drawn (seeded) from the recipe's training data, without tokenizing all of it: from the
    cache entry when there is one, else by tokenizing only drawn rows."""
    settings = data.train
    source = Source.resolve(settings, "data.train")
    key = entry_key(source.identity(), settings, settings.format, data, tokenizer_digest(tokenizer))
    entry = Entry.read(data_cache_dir(data) / key) if data.cache else None
    if entry is not None:
        examples = entry.examples()
        chosen = random.Random(seed).sample(range(len(examples)), min(count, len(examples)))
        return [examples[index] for index in chosen]
    row_tokenizer = RowTokenizer(tokenizer, settings, settings.format, "data.train")
    with tempfile.TemporaryDirectory(prefix="lora-causal-rows-") as folder:
        rows = RawRows.write(source, Path(folder) / "rows.arrow")
        picked: list[dict[str, Any]] = []
        for index in random.Random(seed).sample(range(len(rows)), len(rows)):
            location, row = rows.row(index)
            try:
                ids, prompt_length, mask = row_tokenizer(location, row)
            except UserError:
                continue
            if len(ids) > data.max_length:
                if data.truncation == "drop":
                    continue
                ids, prompt_length, mask = truncate(ids, prompt_length, mask, data)
            if target_count(ids, prompt_length, mask, data.mask_prompt):
                picked.append({"input_ids": ids, "prompt_length": prompt_length, "row": location})
            if len(picked) == count:
                break
        return picked
