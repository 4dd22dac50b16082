"""The prepared-data cache: where entries live, their keys, how one is published, read back and cleared.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError
from lora_causal.data.dataset import DataReport, Examples, RawRows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_causal.core.recipe import DataSection, DataSource, EvalSection

ENTRY_FORMAT = 1  # bump when the entry layout or the tokenization rules change


VERSIONED = ("transformers", "tokenizers", "datasets", "pyarrow", "jinja2", "lora_causal")


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
    from lora_causal.core.rundir import package_versions

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
def locked(cache: Path, key: str, say: Any) -> Any:
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


def remove_partials(cache: Path, key: str) -> None:
    """Partial entries of this key left by processes that died mid-write (called with the lock held)."""
    for partial in cache.glob(f".{key}.*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def place(staging: Path, target: Path) -> None:
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


def cache_problem(exc: OSError, cache: Path) -> UserError:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return UserError(f"{reason} while preparing data in the cache folder {cache}; free space there, or set "
                     "data.cache_dir (or LORA_CAUSAL_CACHE) to another folder")
