"""Tokenizing one data source into the Arrow shards of a cache entry, in worker processes or in this one.

Rows are split into shards of SHARD_ROWS (so the layout and the digest do not depend on the number of
processes); `data.num_proc` processes (forked where the platform allows) each tokenize contiguous shards in
batches, and the first bad row in file order is the one reported.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError
from lora_causal.data.cache import ENTRY_FORMAT
from lora_causal.data.dataset import DataReport, target_count
from lora_causal.data.sources import Source, parse_row
from lora_causal.data.tokenizing import RowTokenizer

if TYPE_CHECKING:

    from lora_causal.core.recipe import DataSection

_WORKER: dict[str, Any] = {}


BATCH_ROWS = 256  # rows per tokenizer call
FLUSH_EXAMPLES = 2048  # examples per Arrow record batch
SHARD_ROWS = 10_000  # rows per shard: the layout (and the digest) does not depend on the number of processes
MAX_LISTED = 20  # row locations kept per finding
PROGRESS_FROM_ROWS = 2000  # tokenizing fewer rows is quick enough to need no progress bar
SMALL_DATA_BYTES = 4 << 20  # less data than this is tokenized in one process
MAX_DEFAULT_PROCESSES = 8


def default_num_proc(requested: int | None, size_bytes: int) -> int:
    """data.num_proc, else one process for small data and min(CPU cores, 8) otherwise."""
    if requested is not None:
        return requested
    if size_bytes < SMALL_DATA_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_DEFAULT_PROCESSES))


def _init_worker(row_tokenizer: RowTokenizer, data: DataSection, rows_path: str, file_names: list[str],
                 counter: Any, parent_pid: int | None = None) -> None:
    if parent_pid is not None:  # a forked worker: it dies with its parent and holds none of the parent's locks
        from lora_causal.core.liveness import die_with_parent
        from lora_causal.data.cache import release_inherited_locks

        die_with_parent(parent_pid)
        release_inherited_locks()
    _WORKER.update(row_tokenizer=row_tokenizer, data=data, rows_path=rows_path, file_names=file_names, counter=counter)


def truncate(ids: list[int], prompt_length: int, mask: list[int] | None, data: DataSection) -> tuple[list[int], int, Any]:
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
        ids, prompt_length, mask = truncate(ids, prompt_length, mask, data)
    targets = target_count(ids, prompt_length, mask, data.mask_prompt)
    if targets == 0:
        report.dropped_no_targets += 1
        return
    writer.add(ids, prompt_length, mask, location, row_index, targets)
    report.examples += 1
    report.tokens += len(ids)
    report.target_tokens += targets
    report.longest = max(report.longest, len(ids))


def build_entry(source: Source, row_tokenizer: RowTokenizer, data: DataSection, staging: Path) -> dict[str, Any]:
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
    live = rows >= PROGRESS_FROM_ROWS and sys.stderr.isatty()  # a bar redraws: only on a terminal
    if rows >= PROGRESS_FROM_ROWS and not live:
        print(f"tokenizing {source.where}: {rows:,} rows in {processes} process{'es' if processes > 1 else ''}",
              flush=True)  # progress, not a problem: stdout (stderr holds one line per error)
    with tqdm(total=rows, desc=f"tokenizing {source.where}", unit="rows", disable=not live, file=sys.stderr) as progress:
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
                             initargs=(*arguments, counter, os.getpid())) as pool:
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
