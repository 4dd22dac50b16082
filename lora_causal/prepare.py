"""Prepare tokenized data once: a cache of memory-mapped Arrow datasets shared by every process and command.

A data source (train or eval) is tokenized into a cache entry, a folder named by a key over everything that
changes its tokens: the data's content (files hashed), the format, column mapping and alpaca template, the
tokenizer's saved files (chat template included), max_length, truncation, mask_prompt, and the versions of
lora_causal, transformers, tokenizers, datasets, pyarrow and jinja2. Not in the key: num_proc, the seed and the
eval split (applied when an entry is read), the checks.

Layout of the cache folder (`data.cache_dir`, else $LORA_CAUSAL_CACHE/data, else ~/.cache/lora_causal/data):
    <key>/rows.arrow             the source's rows as JSON text, with their locations (for checks and errors)
    <key>/examples-NNNNN.arrow   tokenized examples, one file per shard of 10,000 rows, in row order
    <key>/entry.json             what the entry holds (report, digest, files and sizes); written last
    .<key>.lock                  held while one process prepares this key; others wait on it
    .<key>.<pid>-<random>.partial  an entry being written; renamed to <key> when complete
    launches/<id>-<node>.json    how a multi-process launch's preparation ended, for the waiting processes
An entry is used only when entry.json is present and every file has the size it records; a partial entry (a
process killed mid-write, a full disk) is never renamed into place and is removed by the next preparation.
Two preparations of the same key serialize on the lock (where the system has flock); the rename decides
otherwise, and the loser's identical copy is discarded.

Tokenizing runs in `data.num_proc` processes (forked where the platform allows), each over contiguous shards of
rows, in batches; the first bad row in file order is the one reported. Several launched processes: each
machine's first process prepares while the others poll for its launch marker (no collective, so no timeout),
then every process memory-maps the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.data import DataReport, Examples, PreparedData, RawRows, check_not_empty, split_indices, target_count
from lora_causal.errors import DISK_ERRNOS, ReportedElsewhere, UserError
from lora_causal.sources import Source, parse_row
from lora_causal.tokenizing import RowTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_causal.config import DataSection, DataSource, EvalSection

ENTRY_FORMAT = 1  # bump when the entry layout or the tokenization rules change
BATCH_ROWS = 256  # rows per tokenizer call
FLUSH_EXAMPLES = 2048  # examples per Arrow record batch
SHARD_ROWS = 10_000  # rows per shard: the layout (and the digest) does not depend on the number of processes
SMALL_DATA_BYTES = 4 << 20  # less data than this is tokenized in one process
MAX_DEFAULT_PROCESSES = 8
MAX_LISTED = 20  # row locations kept per finding
PROGRESS_FROM_ROWS = 2000  # tokenizing fewer rows is quick enough to need no progress bar
POLL_S = 0.2
STALE_LAUNCH_S = 7 * 24 * 3600
VERSIONED = ("transformers", "tokenizers", "datasets", "pyarrow", "jinja2", "lora_causal")


# ---------------------------------------------------------------------------------------------------------
# Where and under which key


def default_cache_dir() -> Path:
    """$LORA_CAUSAL_CACHE/data, else ~/.cache/lora_causal/data."""
    root = os.environ.get("LORA_CAUSAL_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lora_causal") / "data"


def data_cache_dir(data: DataSection) -> Path:
    """The cache folder: data.cache_dir, else the default one."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()


ENTRY_NAME = re.compile(r"[0-9a-f]{32}")
PARTIAL_NAME = re.compile(r"\.[0-9a-f]{32}\.\d+-[0-9a-f]{8}\.partial")
LOCK_NAME = re.compile(r"\.[0-9a-f]{32}\.lock")
LAUNCH_NAME = re.compile(r"[0-9a-f]{32}-\d+\.json(\.\d+\.tmp)?|[0-9a-f]{32}-\d+\.\d+\.tmp")


def clear_cache(folder: Path) -> tuple[int, int]:
    """Delete every entry (complete or partial), lock and launch marker under `folder`; (entries, bytes) removed.

    Only what the cache writes is touched, recognised by its names (a 32-digit hex key, its partial and lock
    names, launch markers): pointed at a folder of other things by mistake, it removes none of them.
    """
    if not folder.is_dir():
        return 0, 0
    entries = size = 0
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink() and (ENTRY_NAME.fullmatch(child.name) or PARTIAL_NAME.fullmatch(child.name)):
            size += sum(file.stat().st_size for file in child.rglob("*") if file.is_file())
            entries += (child / "entry.json").is_file()
            shutil.rmtree(child, ignore_errors=True)
        elif child.is_file() and LOCK_NAME.fullmatch(child.name):
            child.unlink(missing_ok=True)
    launches = folder / "launches"
    if launches.is_dir() and not launches.is_symlink():
        for marker in launches.iterdir():
            if marker.is_file() and LAUNCH_NAME.fullmatch(marker.name):
                marker.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            launches.rmdir()  # only when nothing else is in it
    return entries, size


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the files `save_pretrained` writes (vocabulary, merges, special tokens, chat template)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="lora-causal-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The versions that change tokens, part of every cache key."""
    from lora_causal.rundir import package_versions

    return package_versions(VERSIONED, missing="absent")


def entry_key(source_identity: dict[str, Any], settings: DataSource | EvalSection, fmt: str, data: DataSection,
              tokenizer_hash: str) -> str:
    """The cache key of one source prepared under these settings."""
    parts = {
        "entry_format": ENTRY_FORMAT,
        "source": source_identity,
        "format": fmt,
        "columns": dict(sorted((settings.columns or {}).items())),
        "template": getattr(settings, "template", None),
        "tokenizer": tokenizer_hash,
        "max_length": data.max_length,
        "truncation": data.truncation,
        "mask_prompt": data.mask_prompt,
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def default_num_proc(requested: int | None, size_bytes: int) -> int:
    """data.num_proc, else one process for small data and min(CPU cores, 8) otherwise."""
    if requested is not None:
        return requested
    if size_bytes < SMALL_DATA_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_DEFAULT_PROCESSES))


# ---------------------------------------------------------------------------------------------------------
# Entries


@dataclass
class Entry:
    """A complete cache entry."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> Entry | None:
        """The entry at `path` if it is complete (entry.json present, every file at its recorded size)."""
        try:
            meta = json.loads((path / "entry.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("entry_format") != ENTRY_FORMAT:
            return None
        for name, size in meta.get("files", {}).items():
            try:
                if (path / name).stat().st_size != size:
                    return None
            except OSError:
                return None
        return cls(path, meta)

    def examples(self) -> Examples:
        from datasets import Dataset, concatenate_datasets

        parts = [Dataset.from_file(str(self.path / name)) for name in self.meta["shards"]]
        return Examples(concatenate_datasets(parts) if len(parts) > 1 else parts[0])

    def report(self) -> DataReport:
        return DataReport(**self.meta["report"])

    def rows(self) -> RawRows:
        return RawRows(self.path / "rows.arrow", self.meta["file_names"], self.meta["where"])


@contextlib.contextmanager
def _locked(cache: Path, key: str, say: Any) -> Any:
    """Hold the key's lock file (flock) while preparing; a second preparer waits here."""
    try:
        import fcntl
    except ImportError:  # no flock here: the rename into place decides
        yield
        return
    handle = os.open(cache / f".{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that prepares the same data ({cache})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _remove_partials(cache: Path, key: str) -> None:
    """Partial entries of this key left by processes that died mid-write (called with the lock held)."""
    for partial in cache.glob(f".{key}.*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _place(staging: Path, target: Path) -> None:
    """Rename a finished entry into place; an entry already there (a rebuild) is replaced."""
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}-old.partial")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if Entry.read(target) is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process placed the same entry first


def _cache_problem(exc: OSError, cache: Path) -> UserError:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return UserError(f"{reason} while preparing data in the cache folder {cache}; free space there, or set "
                     "data.cache_dir (or LORA_CAUSAL_CACHE) to another folder")


def prepare_source(source: Source, settings: DataSource | EvalSection, fmt: str, data: DataSection,
                   tokenizer: PreTrainedTokenizerBase, tokenizer_hash: str, say: Any = None) -> Entry:
    """The cache entry of one source: reused when complete, else tokenized (with `data.num_proc` processes)."""
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
        with _locked(cache, key, say):
            entry = Entry.read(target) if data.cache else None
            if entry is not None:  # prepared by the process we waited for
                return entry
            _remove_partials(cache, key)
            staging = cache / f".{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
            staging.mkdir()
            try:
                meta = _build(source, row_tokenizer, data, staging)
                meta["key"] = key
                (staging / "entry.json").write_text(json.dumps(meta, indent=1))
                _place(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS or isinstance(exc, PermissionError):
            raise _cache_problem(exc, cache) from None
        raise
    entry = Entry.read(target)
    if entry is None:  # pragma: no cover - only if the folder is changed under us
        raise UserError(f"the prepared data in {target} disappeared while it was being read; run again")
    return entry


# ---------------------------------------------------------------------------------------------------------
# Tokenizing shards (in worker processes, or in this one)

_WORKER: dict[str, Any] = {}


def _init_worker(row_tokenizer: RowTokenizer, data: DataSection, rows_path: str, file_names: list[str],
                 counter: Any) -> None:
    _WORKER.update(row_tokenizer=row_tokenizer, data=data, rows_path=rows_path, file_names=file_names, counter=counter)


def _truncate(ids: list[int], prompt_length: int, mask: list[int] | None, data: DataSection) -> tuple[list[int], int, Any]:
    if data.truncation == "keep_start":
        return ids[: data.max_length], min(prompt_length, data.max_length), mask[: data.max_length] if mask else mask
    cut = len(ids) - data.max_length
    return ids[cut:], max(prompt_length - cut, 0), mask[cut:] if mask else mask


class _ShardWriter:
    """Buffers examples and writes them as Arrow record batches; digests what it wrote, column by column."""

    def __init__(self, path: Path, chat: bool) -> None:
        import pyarrow as pa

        self.pa = pa
        fields = [("input_ids", pa.list_(pa.int32())), ("prompt_length", pa.int32())]
        if chat:
            fields.append(("target_mask", pa.list_(pa.int8())))
        fields += [("row", pa.string()), ("row_index", pa.int64()), ("length", pa.int32()), ("targets", pa.int32())]
        self.schema = pa.schema(fields)
        self.chat = chat
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.digests = {name: hashlib.sha256() for name in ("input_ids", "length", "prompt_length", "target_mask")
                        if name in self.schema.names}
        self.buffer: dict[str, list] = {name: [] for name in self.schema.names}

    def add(self, ids: list[int], prompt_length: int, mask: list[int] | None, row: str, row_index: int, targets: int) -> None:
        for name, value in zip(self.schema.names, (ids, prompt_length, *((mask,) if self.chat else ()), row, row_index,
                                                   len(ids), targets)):
            self.buffer[name].append(value)
        if len(self.buffer["row"]) >= FLUSH_EXAMPLES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer["row"]:
            return
        batch = self.pa.record_batch([self.pa.array(self.buffer[f.name], f.type) for f in self.schema], schema=self.schema)
        for name, digest in self.digests.items():
            column = batch.column(name)
            values = column.values if name in ("input_ids", "target_mask") else column
            digest.update(values.to_numpy(zero_copy_only=False).tobytes())
        self.writer.write_batch(batch)
        self.buffer = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def _tokenize_shard(task: tuple[int, int, int, str]) -> dict[str, Any]:
    """Tokenize rows [start, stop) into an Arrow file; returns counts, a digest, and the first error if any."""
    import pyarrow as pa

    index, start, stop, out_path = task
    row_tokenizer: RowTokenizer = _WORKER["row_tokenizer"]
    data: DataSection = _WORKER["data"]
    names: list[str] = _WORKER["file_names"]
    report = DataReport(rows=stop - start)
    writer = _ShardWriter(Path(out_path), row_tokenizer.fmt == "messages")
    error = None
    with pa.memory_map(_WORKER["rows_path"]) as source:
        table = pa.ipc.open_stream(source).read_all().slice(start, stop - start)
        try:
            for offset in range(0, stop - start, BATCH_ROWS):
                chunk = table.slice(offset, BATCH_ROWS).to_pydict()
                items = [(location, parse_row(names[file], location, text, row_tokenizer.where))
                         for file, location, text in zip(chunk["file"], chunk["location"], chunk["json"])]
                for number, (tokens, (location, _)) in enumerate(zip(row_tokenizer.batch(items), items)):
                    _keep(writer, report, data, tokens, location, start + offset + number)
                if _WORKER.get("counter") is not None:
                    with _WORKER["counter"].get_lock():
                        _WORKER["counter"].value += len(items)
        except UserError as exc:
            error = str(exc)
        finally:
            writer.close()
    digest = "".join(digest.hexdigest() for digest in writer.digests.values())
    return {"index": index, "report": asdict(report), "digest": digest, "error": error}


def _keep(writer: _ShardWriter, report: DataReport, data: DataSection, tokens: Any, location: str, row_index: int) -> None:
    """Truncate, filter and count one tokenized row; write it if it is kept."""
    ids, prompt_length, mask = tokens
    if len(ids) > data.max_length:
        if data.truncation == "drop":
            report.dropped_too_long += 1
            return
        report.truncated += 1
        if len(report.truncated_rows) < MAX_LISTED:
            report.truncated_rows.append(location)
        ids, prompt_length, mask = _truncate(ids, prompt_length, mask, data)
    targets = target_count(ids, prompt_length, mask, data.mask_prompt)
    if targets == 0:
        report.dropped_no_targets += 1
        return
    writer.add(ids, prompt_length, mask, location, row_index, targets)
    report.examples += 1
    report.tokens += len(ids)
    report.target_tokens += targets
    report.longest = max(report.longest, len(ids))


def _build(source: Source, row_tokenizer: RowTokenizer, data: DataSection, staging: Path) -> dict[str, Any]:
    """Write the rows and the tokenized shards into `staging`; raise the first bad row's error."""
    rows = source.write_rows(staging / "rows.arrow")
    if rows == 0:
        raise UserError(f"{source.where}: the dataset has no rows; add examples or point to another file")
    shard_count = -(-rows // SHARD_ROWS)
    processes = min(default_num_proc(data.num_proc, source.size_hint()), shard_count)
    bounds = [rows * number // shard_count for number in range(shard_count + 1)]
    tasks = [(n, bounds[n], bounds[n + 1], str(staging / f"examples-{n:05d}.arrow")) for n in range(shard_count)]
    results = _run_shards(tasks, processes, row_tokenizer, data, staging, source, rows)
    errors = [result for result in results if result["error"]]
    if errors:
        raise UserError(min(errors, key=lambda result: result["index"])["error"])
    report = DataReport(rows=rows)
    digest = hashlib.sha256()
    for result in sorted(results, key=lambda result: result["index"]):
        digest.update(result["digest"].encode())
        part = result["report"]
        for name in ("examples", "truncated", "dropped_too_long", "dropped_no_targets", "tokens", "target_tokens"):
            setattr(report, name, getattr(report, name) + part[name])
        report.longest = max(report.longest, part["longest"])
        report.truncated_rows = (report.truncated_rows + part["truncated_rows"])[:MAX_LISTED]
    shards = [Path(task[3]).name for task in tasks]
    return {
        "entry_format": ENTRY_FORMAT,
        "where": source.where,
        "format": row_tokenizer.fmt,
        "file_names": source.file_names,
        "report": asdict(report),
        "digest": digest.hexdigest(),
        "shards": shards,
        "files": {name: (staging / name).stat().st_size for name in ["rows.arrow", *shards]},
        "processes": processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run_shards(tasks: list[tuple[int, int, int, str]], processes: int, row_tokenizer: RowTokenizer,
                data: DataSection, staging: Path, source: Source, rows: int) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    arguments = (row_tokenizer, data, str(staging / "rows.arrow"), source.file_names)
    # a context manager: an error in the middle of the rows still ends the progress line before it is reported
    with tqdm(total=rows, desc=f"tokenizing {source.where}", unit="rows", disable=rows < PROGRESS_FROM_ROWS,
              file=sys.stderr) as progress:
        if processes == 1:
            _init_worker(*arguments, None)
            results = []
            for task in tasks:
                results.append(_tokenize_shard(task))
                progress.update(task[2] - task[1])
                if results[-1]["error"]:
                    break
            _WORKER.clear()
            return results
        return _run_in_pool(tasks, processes, arguments, progress)


def _run_in_pool(tasks: list[tuple[int, int, int, str]], processes: int, arguments: tuple, progress: Any) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    counter = context.Value("q", 0)
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                             initargs=(*arguments, counter)) as pool:
        pending = {pool.submit(_tokenize_shard, task): task[0] for task in tasks}
        first_error = len(tasks)
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            progress.update(counter.value - progress.n)
            for future in done:
                pending.pop(future)
                results.append(future.result())
                if results[-1]["error"]:
                    first_error = min(first_error, results[-1]["index"])
            for future, index in list(pending.items()):  # shards after a bad row are not needed
                if index > first_error and future.cancel():
                    pending.pop(future)
    return results


# ---------------------------------------------------------------------------------------------------------
# Whole recipes: one process, or several


def _sources(data: DataSection) -> list[tuple[str, Any, str]]:
    """(where, settings, format) of the train source and of a separate eval source."""
    sources = [("data.train", data.train, data.train.format)]
    if data.eval is not None and data.eval.path is not None:
        sources.append(("data.eval", data.eval, data.eval.format or data.train.format))
    return sources


def prepare_entries(data: DataSection, tokenizer: PreTrainedTokenizerBase, say: Any = None) -> list[Entry]:
    """The cache entries of the recipe's data (train, then a separate eval source), prepared if needed."""
    tokenizer_hash = tokenizer_digest(tokenizer)
    entries = []
    for where, settings, fmt in _sources(data):
        source = Source.resolve(settings, where)
        entries.append(prepare_source(source, settings, fmt, data, tokenizer, tokenizer_hash, say))
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


def prepare_data(data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, say: Any = None) -> PreparedData:
    """Read, tokenize (or reuse from the cache) and split the recipe's data. Raises `UserError` on bad input."""
    return load_prepared(prepare_entries(data, tokenizer, say), data, tokenizer, seed)


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
                   say: Any = None) -> PreparedData:
    """Several launched processes: each machine's first process prepares, the others poll its launch marker
    (no collective that could time out), then all memory-map the same entries.

    A failure of the preparing process is reported by it alone; the waiting ones exit with its status
    (`ReportedElsewhere`).
    """
    if state.num_processes == 1:
        return prepare_data(data, tokenizer, seed, say)
    from accelerate.utils import broadcast_object_list

    launch = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(launch, from_process=0)  # everyone is here already: a name for this launch, no waiting
    marker = _launch_marker(data, launch[0], state.process_index - state.local_process_index)
    if state.is_local_main_process:
        try:
            entries = prepare_entries(data, tokenizer, say)
        except UserError:
            _write_marker(marker, {"ok": False, "exit_code": 2})
            raise
        except BaseException:
            _write_marker(marker, {"ok": False, "exit_code": 1})
            raise
        _write_marker(marker, {"ok": True, "entries": [str(entry.path) for entry in entries]})
        return load_prepared(entries, data, tokenizer, seed)
    while not marker.is_file():
        time.sleep(POLL_S)
    outcome = json.loads(marker.read_text())
    if not outcome["ok"]:
        raise ReportedElsewhere(outcome["exit_code"])
    entries = [Entry.read(Path(path)) for path in outcome["entries"]]
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
                ids, prompt_length, mask = _truncate(ids, prompt_length, mask, data)
            if target_count(ids, prompt_length, mask, data.mask_prompt):
                picked.append({"input_ids": ids, "prompt_length": prompt_length, "row": location})
            if len(picked) == count:
                break
        return picked
