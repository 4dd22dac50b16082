"""The prepared-data cache: where entries live, their keys, how one is published, verified, read back and cleared.

A data source (train or eval) is tokenized into a cache entry, a folder named by a key over everything that
changes its tokens: the data's content (local files hashed; a Hub dataset's resolved commit), the format, column
mapping and alpaca template, the tokenizer's saved files (chat template included), max_length, truncation,
mask_prompt, and the versions of lora_causal, transformers, tokenizers, datasets, pyarrow and jinja2. Not in the
key: num_proc, the seed and the eval split (applied when an entry is read), the checks.

Layout of the cache folder (`data.cache_dir`, else $LORA_CAUSAL_CACHE/data, else ~/.cache/lora_causal/data):
    <key>/rows.arrow             the source's rows as JSON text, with their locations (for checks and errors)
    <key>/examples-NNNNN.arrow   tokenized examples, one file per shard of 10,000 rows, in row order
    <key>/entry.json             what the entry holds (report, digest, files with sizes and sha256); written last
    .<key>.<host>-<pid>-<random>.partial  one writer's entry being written (its own name: writers never share one)
    .<key>.lock, .<key>.beat     the lock one preparer holds (where flock works) and its heartbeat for waiters
    launches/<id>-<node>.json|.beat  how a launch's preparation ended, and its preparer's heartbeat
Publication is correct without locks: each writer fills its own staging folder, fsyncs it, and renames it to
<key> in one step (the rename fails if another writer got there first: its copy is verified and ours discarded).
A published entry is never deleted while a process may read it; it is replaced only when it fails verification
(or, with data.cache false, when a fresh preparation gives other tokens), moved aside first. Staging folders are
removed only when their writer is known dead (this machine, pid gone) or silent for a day. An entry is used only
when entry.json is present and every file has its recorded size and sha256. The lock only spares duplicate work:
a file system without flock (ENOLCK, EOPNOTSUPP) is announced once and every preparer then writes its own copy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError
from lora_causal.data.dataset import DataReport, Examples, RawRows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_causal.core.recipe import DataSection, DataSource, EvalSection

ENTRY_FORMAT = 2  # bump when the entry layout or the tokenization rules change (2: per-file sha256)


VERSIONED = ("transformers", "tokenizers", "datasets", "pyarrow", "jinja2", "lora_causal")


def default_cache_dir() -> Path:
    """$LORA_CAUSAL_CACHE/data, else ~/.cache/lora_causal/data."""
    root = os.environ.get("LORA_CAUSAL_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lora_causal") / "data"


def data_cache_dir(data: DataSection) -> Path:
    """The cache folder: data.cache_dir, else the default one."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()


ENTRY_NAME = re.compile(r"[0-9a-f]{32}")


PARTIAL_NAME = re.compile(r"\.[0-9a-f]{32}\.[0-9A-Za-z-]+\.partial")  # staging folders, and entries moved aside


LOCK_NAME = re.compile(r"\.[0-9a-f]{32}\.(lock|beat(\.\d+\.tmp)?)")


LAUNCH_NAME = re.compile(r"[0-9a-f]{32}-\d+\.(json|beat)(\.\d+\.tmp)?|[0-9a-f]{32}-\d+\.\d+\.tmp")

NO_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
STALE_PARTIAL_S = 24 * 3600  # a staging folder of another machine, untouched this long, is a dead writer's
LOCK_POLL_S = 0.5
LOCK_FDS: set[int] = set()  # lock files this process holds open: forked workers close them (release_inherited_locks)
_SAID_NO_LOCKS: set[str] = set()


def clear_named_cache(folder: Path) -> tuple[int, int, Path]:
    """`clear_cache` for a folder a user named: the data cache itself, or a cache root such as $LORA_CAUSAL_CACHE,
    whose prepared data lives in its data/ (both are cleared); (entries, bytes, the folder to name as cleared)."""
    removed, size = clear_cache(folder)
    if (folder / "data").is_dir():
        more, more_size = clear_cache(folder / "data")
        return removed + more, size + more_size, folder / "data"
    return removed, size, folder


def clear_cache(folder: Path) -> tuple[int, int]:
    """Delete every entry (complete, partial or moved aside), lock, heartbeat and launch marker under `folder`;
    (entries, bytes) removed.

    Only what the cache writes is touched, recognised by its names (a 32-digit hex key, its partial, lock and
    heartbeat names, launch markers): pointed at a folder of other things by mistake, it removes none of them.
    """
    if not folder.is_dir():
        return 0, 0
    entries = size = 0
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink() and (ENTRY_NAME.fullmatch(child.name) or PARTIAL_NAME.fullmatch(child.name)):
            size += sum(file.stat().st_size for file in child.rglob("*") if file.is_file())
            entries += ENTRY_NAME.fullmatch(child.name) is not None and (child / "entry.json").is_file()
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
    def read(cls, path: Path, verify: bool = True) -> Entry | None:
        """The entry at `path` if it is complete: entry.json present, every file at its recorded size and (with
        `verify`) its recorded sha256. Processes that read what their machine's preparer has just verified skip
        the digests."""
        from lora_causal.data.sources import file_digest

        try:
            meta = json.loads((path / "entry.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("entry_format") != ENTRY_FORMAT:
            return None
        files, digests = meta.get("files", {}), meta.get("sha256", {})
        if set(files) != set(digests) or not set(meta.get("shards", [])) <= set(files):
            return None
        try:
            if any((path / name).stat().st_size != size for name, size in files.items()):
                return None
            if verify and any(file_digest(path / name) != digests[name] for name in files):
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


def release_inherited_locks() -> None:
    """In a forked worker: close the lock files inherited from the parent, so that only the parent holds them (a
    worker outliving a killed parent must not keep every later preparation waiting)."""
    for handle in list(LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(handle)
    LOCK_FDS.clear()


@contextlib.contextmanager
def claimed(cache: Path, key: str, say: Any, patience_s: float, ready: Any) -> Iterator[Entry | None]:
    """Prepare `key` alone where the file system has flock: hold its lock (and a heartbeat) while preparing.

    Yields None when this process should prepare, or the entry another process published while this one waited
    (`ready()` looks for it). A holder that is gone or silent for `patience_s` is not waited for any longer: this
    process prepares its own copy (publication is correct without the lock). Without flock, one notice per folder.
    """
    from lora_causal.core.liveness import Watch, heartbeat

    try:
        import fcntl
    except ImportError:  # no flock on this platform: the rename into place decides
        yield None
        return
    handle = os.open(cache / f".{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    LOCK_FDS.add(handle)
    try:
        held = _try_lock(fcntl, handle, cache)
        if held is False:
            say(f"waiting for another process that prepares the same data ({cache})")
            watch = Watch(cache / f".{key}.beat", patience_s)
            while held is False:
                time.sleep(LOCK_POLL_S)
                entry = ready()
                if entry is not None:
                    yield entry
                    return
                held = _try_lock(fcntl, handle, cache)
                why = watch.check() if held is False else None
                if why is not None:
                    say(f"the process that prepares the same data {why}; preparing it here instead")
                    held = None
        with heartbeat(cache / f".{key}.beat") if held else contextlib.nullcontext():
            yield None
    finally:
        LOCK_FDS.discard(handle)
        os.close(handle)  # releases the lock


def _try_lock(fcntl: Any, handle: int, cache: Path) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock (said once)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in NO_LOCK_ERRNOS:
            raise
        if str(cache) not in _SAID_NO_LOCKS:
            _SAID_NO_LOCKS.add(str(cache))
            sys.stderr.write(f"note: the file system of {cache} has no file locks ({os.strerror(exc.errno).lower()}); "
                             "processes preparing the same data each write their own copy and the first complete one "
                             "is kept\n")
        return None


def staging_folder(cache: Path, key: str) -> Path:
    """A staging folder no other writer can have: this machine, this process, a random part."""
    from lora_causal.core.liveness import host_tag

    return cache / f".{key}.{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


def remove_dead_partials(cache: Path, key: str) -> None:
    """Staging folders of this key whose writers are dead: of this machine with their process gone, or of any
    machine when nothing in them changed for STALE_PARTIAL_S. Another live writer's folder is never touched."""
    from lora_causal.core.liveness import host_tag, pid_alive

    for partial in cache.glob(f".{key}.*.partial"):
        match = re.fullmatch(rf"\.{key}\.([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}\.partial", partial.name)
        if match and match.group(1) == host_tag() and not pid_alive(int(match.group(2))):
            shutil.rmtree(partial, ignore_errors=True)
            continue
        with contextlib.suppress(OSError):
            newest = max([partial.stat().st_mtime, *(file.stat().st_mtime for file in partial.iterdir())])
            if time.time() - newest > STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)


def _fsync(path: Path, directory: bool = False) -> None:
    handle = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(handle)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync a folder
            raise
    finally:
        os.close(handle)


def publish(staging: Path, target: Path, meta: dict[str, Any]) -> Entry:
    """Record the staged files' sizes and sha256 in entry.json, fsync everything, and rename the folder into place.

    If another writer published first, its entry is used when it verifies and ours is discarded. An entry that
    fails verification, or (data.cache false) holds other tokens than ours, is moved aside and replaced.
    """
    from lora_causal.data.sources import file_digest

    names = list(meta["files"])
    meta["files"] = {name: (staging / name).stat().st_size for name in names}
    meta["sha256"] = {name: file_digest(staging / name) for name in names}
    (staging / "entry.json").write_text(json.dumps(meta, indent=1))
    for name in [*names, "entry.json"]:
        _fsync(staging / name)
    _fsync(staging, directory=True)
    for _ in range(3):
        try:
            staging.rename(target)
            _fsync(target.parent, directory=True)
            return Entry(target, meta)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        existing = Entry.read(target)
        if existing is not None and existing.meta.get("digest") == meta["digest"]:
            shutil.rmtree(staging, ignore_errors=True)  # another writer published the same entry first
            return existing
        aside = staging.with_name(staging.name.replace(".partial", "-old.partial"))
        with contextlib.suppress(FileNotFoundError):  # another writer may be moving it too
            target.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)  # damaged, or other tokens: processes that opened it keep their files
    raise OSError(errno.EBUSY, f"{target} keeps being replaced by other processes")


def cache_problem(exc: OSError, cache: Path) -> UserError:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return UserError(f"{reason} while preparing data in the cache folder {cache}; free space there, or set "
                     "data.cache_dir (or LORA_CAUSAL_CACHE) to another folder")
