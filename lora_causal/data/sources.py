"""Where rows come from: a local file, a local folder of shards, or a Hub dataset.

A source is identified by its content (local files are hashed, streaming) so a prepared dataset can be reused
exactly while the data is unchanged. Its rows are streamed into an Arrow file of three columns, `file` (index
into `Source.file_names`), `location` ("line 7", "shard-01.jsonl line 7", "row 3") and `json` (the row as JSON
text), without holding the dataset in memory; tokenizing processes parse them, so a malformed line is reported
with its file and line by whoever meets it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.recipe import DATA_FILE_SUFFIXES
from lora_causal.core.recipe_file import looks_local

CSV_FIELD_LIMIT = 1 << 30  # characters in one CSV field: any text a row can hold
WRITE_BATCH_ROWS = 20_000  # rows per Arrow record batch while streaming a source
HASH_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (`hashlib.file_digest` is Python 3.11+)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Source:
    """One dataset named by a recipe's data section (train or eval)."""

    where: str  # "data.train" or "data.eval", for messages
    path: str
    split: str = "train"
    config: str | None = None
    data_files: list[str] | None = None
    revision: str | None = None
    files: list[Path] = field(default_factory=list)  # local files, in reading order
    _hub: Any = None  # the loaded Hub dataset
    commit: str | None = None  # the Hub commit the requested revision resolved to when it was loaded

    @classmethod
    def resolve(cls, settings: Any, where: str) -> Source:
        """The source of a DataSource/EvalSection: checks that it exists (a Hub dataset is loaded here)."""
        source = cls(where, settings.path, settings.split, settings.config, settings.data_files, settings.revision)
        local = Path(settings.path)
        hub_keys = [name for name in ("config", "data_files", "revision") if getattr(settings, name) is not None]
        if local.exists() or looks_local(settings.path):
            if hub_keys:
                raise UserError(f"{where}.{hub_keys[0]}: applies to Hub datasets only, and '{settings.path}' is a local "
                                "path; remove it")
            source.files = _local_files(local, where)
        else:
            source._hub = _load_hub(source)
        return source

    def identity(self) -> dict[str, Any]:
        """What the rows depend on: the files' names and content hashes, or the Hub dataset's coordinates with the
        commit its revision resolved to (a fix pushed to the Hub is a new commit, whatever its size)."""
        if self._hub is not None:
            cache_files = [(Path(f["filename"]).name, Path(f["filename"]).stat().st_size) for f in self._hub.cache_files]
            return {"hub": self.path, "config": self.config, "split": self.split, "commit": self.commit,
                    "data_files": self.data_files, "rows": len(self._hub), "cache_files": cache_files,
                    "features": str(self._hub.features)}
        root = Path(self.path)
        return {"files": [(self._label(file) or file.name, file_digest(file)) for file in self.files],
                "folder": root.is_dir()}

    def size_hint(self) -> int:
        """Bytes of local data, or rows of a Hub dataset times 1000 (to choose a number of processes)."""
        if self._hub is not None:
            return len(self._hub) * 1000
        return sum(file.stat().st_size for file in self.files)

    def _label(self, file: Path) -> str:
        """How a file is named in row locations: nothing for a single file, its relative path in a folder."""
        root = Path(self.path)
        return str(file.relative_to(root)) if root.is_dir() else ""

    def write_rows(self, target: Path) -> int:
        """Stream every row into the Arrow file `target` (location, json); returns the number of rows."""
        import pyarrow as pa

        schema = pa.schema([("file", pa.int32()), ("location", pa.string()), ("json", pa.large_string())])
        count = 0
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for number, locations, texts in self._row_batches():
                columns = [pa.array([number] * len(locations), pa.int32()), pa.array(locations, pa.string()),
                           pa.array(texts, pa.large_string())]
                writer.write_batch(pa.record_batch(columns, schema=schema))
                count += len(locations)
        return count

    @property
    def file_names(self) -> list[str]:
        """Names of the source's files, as error messages give them (the Hub id for a Hub dataset)."""
        return [self.path] if self._hub is not None else [self._label(file) or file.name for file in self.files]

    def _row_batches(self) -> Iterator[tuple[int, list[str], list[str]]]:
        if self._hub is not None:
            rows = ((f"row {index}", json.dumps(row, ensure_ascii=False, default=str)) for index, row in enumerate(self._hub))
            for locations, texts in _batches(rows):
                yield 0, locations, texts
            return
        for number, file in enumerate(self.files):
            label = self._label(file)
            prefix = f"{label} " if label else ""
            reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
            try:
                rows = ((prefix + location, text) for location, text in reader[file.suffix.lower()](file, self.where))
                for locations, texts in _batches(rows):
                    yield number, locations, texts
            except UnicodeDecodeError:
                raise UserError(f"{self.where}: {file} is not UTF-8 text (is it a binary file?)") from None
            except PermissionError:
                raise UserError(f"{self.where}: {file} cannot be read (permission denied)") from None


def _batches(rows: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    locations: list[str] = []
    texts: list[str] = []
    for location, text in rows:
        locations.append(location)
        texts.append(text)
        if len(locations) >= WRITE_BATCH_ROWS:
            yield locations, texts
            locations, texts = [], []
    if locations:
        yield locations, texts


def _local_files(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in DATA_FILE_SUFFIXES
                       and not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise UserError(f"{where}: the folder '{path}' holds no .jsonl, .json, .csv or .parquet files; point to a "
                            "data file or to a folder of shards")
        return files
    if not path.exists():
        raise UserError(f"{where}: file not found: {path}")
    if path.suffix.lower() not in DATA_FILE_SUFFIXES:
        raise UserError(f"{where}: '{path.name}' has an unsupported type; use .jsonl, .json, .csv or .parquet")
    return [path]


def _jsonl_rows(file: Path, where: str) -> Iterator[tuple[str, str]]:
    """Lines as they are (parsed by the tokenizing processes); blank lines are skipped, a byte-order mark (as some
    editors write) is dropped, and a line that is not UTF-8 is named."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: {file.name} line {number} is not UTF-8 text; save the file as UTF-8 (or is it "
                                "a binary file?)") from None
            if line.strip():
                yield f"line {number}", line


def _json_rows(file: Path, where: str) -> Iterator[tuple[str, str]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))  # a byte-order mark is dropped
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: {file.name} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: {file.name}: nested too deeply to read; give a JSON list of objects") from None
    if not isinstance(data, list):
        raise UserError(f"{where}: {file.name} must hold a JSON list of objects (for one object a line, use .jsonl)")
    for index, row in enumerate(data):
        yield f"item {index}", json.dumps(row, ensure_ascii=False)


def _csv_rows(file: Path, where: str) -> Iterator[tuple[str, str]]:
    """Rows of a CSV file with a header. `utf-8-sig` drops the byte-order mark Excel writes (otherwise the first
    column's name would start with it), and fields may be as long as the data needs (the csv module's default
    limit is 128 KiB)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with file.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader, None)
                if header is None:
                    return
                while True:
                    start = reader.line_num + 1  # a quoted field may span lines: report where the record starts
                    record = next(reader, None)
                    if record is None:
                        break
                    if not any(cell.strip() for cell in record):
                        continue
                    if len(record) != len(header):
                        raise UserError(
                            f"{where}: {file.name} line {start}: {len(record)} fields, but the header has "
                            f"{len(header)}; quote fields that contain commas"
                        )
                    yield f"line {start}", json.dumps(dict(zip(header, record)), ensure_ascii=False)
            except csv.Error as exc:
                raise UserError(f"{where}: {file.name} line {reader.line_num}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(file: Path, where: str) -> Iterator[tuple[str, str]]:
    import pyarrow
    import pyarrow.parquet as parquet

    try:
        batches = parquet.ParquetFile(file).iter_batches(batch_size=WRITE_BATCH_ROWS)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {index}", json.dumps(row, ensure_ascii=False, default=str)
                index += 1
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{where}: {file.name} is not a readable Parquet file ({first_line(exc)})") from None


def hub_arguments(source: Source) -> dict[str, Any]:
    """The keyword arguments `datasets.load_dataset` gets for a Hub source."""
    arguments: dict[str, Any] = {"path": source.path, "split": source.split}
    if source.config is not None:
        arguments["name"] = source.config
    if source.data_files is not None:
        arguments["data_files"] = source.data_files
    if source.revision is not None:
        arguments["revision"] = source.revision
    return arguments


def _load_hub(source: Source) -> Any:
    import datasets

    arguments = hub_arguments(source)
    described = ", ".join(f"{key} {value!r}" for key, value in arguments.items() if key != "path")
    try:  # load_dataset's own steps, keeping the builder: its hash is the commit the revision resolved to
        split = arguments.pop("split")
        builder = datasets.load_dataset_builder(**arguments)
        builder.download_and_prepare()
        source.commit = builder.hash
        return builder.as_dataset(split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot get it"
        hint = "" if source.config else "; if it has several configurations, name one with config (e.g. config: main)"
        raise UserError(
            f"{source.where}: '{source.path}' is not a local file and could not be loaded from the Hub with "
            f"{described} ({first_line(exc)}){hint}"
        ) from None


def parse_row(file_name: str, location: str, text: str, where: str) -> Any:
    """A row stored by `write_rows`, parsed; a JSONL line that is not JSON is reported with its file and line."""
    shown = location if location.startswith(file_name) else f"{file_name} {location}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: {shown}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: {shown}: nested too deeply to read; a row is an object of text fields") from None
