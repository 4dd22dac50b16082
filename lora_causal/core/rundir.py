"""The run directory: where a run goes, whether it resumes, atomic writes and the manifest.

Layout of `output.dir`:
    recipe.yaml      the resolved recipe (every default filled in)
    manifest.json    status, library versions, seed, dataset fingerprint, git commit, results
    data_report.json what tokenization kept, truncated and dropped
    metrics.jsonl    one JSON line per log (loss, lr, tokens, tokens/s, supervised tokens, peak memory, eval loss)
    loss.png         train and eval loss against the step (lora_causal.training.summary)
    tensorboard/     event files, when output.report_to has tensorboard
    checkpoints/     trainer checkpoints, for resuming
    adapter/         the final LoRA adapter (peft format) and the tokenizer
    samples.json     answers to output.sample_prompts before and after training
    .lora_causal_run.json  the marker that makes the folder a run: {"format": "lora_causal-run", "version": 1}

Nothing is created until the inputs have been checked, so a bad recipe or bad data leaves no directory behind.
Ownership: only a folder holding the marker is treated as a run (resumed, refused as finished, or replaced with
output.overwrite); replacing removes only the entries in RUN_ENTRIES, their temporary leftovers and merged models
(folders with a tagged merge report), never anything else a user keeps in the folder.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from lora_causal import __version__
from lora_causal.core.errors import UserError
from lora_causal.core.paths import first_missing
from lora_causal.core.runlock import RUN_LOCK, busy, held_by_another, hold

MANIFEST = "manifest.json"
RUN_MARKER = ".lora_causal_run.json"  # {"format": RUN_FORMAT, "version": 1, ...}: this folder is a lora_causal run
RUN_FORMAT = "lora_causal-run"
RUN_FORMAT_VERSION = 1
# Everything lora_causal writes at the top of a run folder (plus output.merge.dir, recognised by its merge report):
# what output.overwrite may remove. Anything else in the folder belongs to someone else and stays.
RUN_ENTRIES = ("recipe.yaml", MANIFEST, "data_report.json", "metrics.jsonl", "checkpoints", "adapter", "samples.json",
               "merged", "loss.png", "tensorboard")
MERGE_REPORT = "merge_report.json"
MERGE_REPORT_FORMAT = "lora_causal-merge-report"
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like any file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, standard_json(data, indent=2) + "\n")


def standard_json(data: Any, indent: int | None = None) -> str:
    """JSON that every reader takes: a non-finite float (a nan loss) becomes null, not Python's bare NaN."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=indent, sort_keys=False, allow_nan=False)


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written `staging` folder to `target`, replacing an older `target` only at the end."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def staging_folder(parent: Path, prefix: str) -> Path:
    """A new private-named folder in `parent` to fill before one rename publishes it; its mode follows the umask
    like any folder (mkdtemp's 0700 would keep a served model or an export from other users and containers)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a fresh staging folder beside `target`, then move it into place in one rename.

    If `write` fails, the staging folder is removed: nothing half-written is left beside `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target.parent, f".{target.name}-")
    try:
        write(staging)
        replace_dir_atomic(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def library_versions() -> dict[str, str]:
    """Python, lora_causal and the training stack's versions, for manifests and benchmark reports."""
    return {"python": platform.python_version(), "lora_causal": __version__,
            **package_versions(TRACKED_PACKAGES, missing="not installed")}


def package_versions(names: tuple[str, ...], missing: str) -> dict[str, str]:
    """Installed versions of `names` (`missing` for a package that is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = missing
    return versions


def git_commit(folder: Path) -> str | None:
    """The commit (with '+dirty' for local changes) of the git checkout holding `folder`, if any."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` that was fully written (the trainer writes trainer_state.json last)."""
    if not folder.is_dir():
        return None
    complete = [
        child for child in folder.iterdir()
        if child.is_dir() and re.fullmatch(r"checkpoint-\d+", child.name) and (child / "trainer_state.json").is_file()
    ]
    return max(complete, key=lambda child: int(child.name.split("-")[1]), default=None)


def remove_incomplete_checkpoints(folder: Path) -> list[str]:
    """Delete checkpoints a crash or a full disk left half-written; return their names."""
    removed = []
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and re.fullmatch(r"checkpoint-\d+", child.name) and not (child / "trainer_state.json").is_file():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The run's manifest, or None when it is missing or damaged (callers that need it say so)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The run marker of `folder` if it is one of ours (the right format tag), else None."""
    try:
        marker = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != RUN_FORMAT or not isinstance(marker.get("version"), int):
        return None
    return marker


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` is a lora_causal run folder: it holds our marker with our format tag."""
    return folder.is_dir() and read_marker(folder) is not None


def is_merged_dir(folder: Path) -> bool:
    """Whether `folder` holds a model written by `lora-causal merge` (a merge report with our format tag)."""
    try:
        report = json.loads((folder / MERGE_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and report.get("format") == MERGE_REPORT_FORMAT


def _is_ours(child: Path) -> bool:
    """An entry of a run folder that lora_causal wrote: a listed name, the temporary file or folder of one
    (an atomic write cut short), or a merged model (output.merge.dir)."""
    name = child.name
    if name in RUN_ENTRIES or name in (RUN_MARKER, RUN_LOCK):
        return True
    if name.startswith(".") and any(name.startswith((f".{entry}.", f".{entry}-")) for entry in (*RUN_ENTRIES, RUN_MARKER)):
        return True
    return child.is_dir() and not child.is_symlink() and is_merged_dir(child)


def remove_run_entries(folder: Path) -> list[str]:
    """Delete what lora_causal wrote in a run folder, and nothing else; return the names removed."""
    removed = []
    for child in sorted(folder.iterdir()):
        if child.name in (RUN_MARKER, RUN_LOCK) or not _is_ours(child):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(child.name)
    return removed


def check_can_create(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created (see lora_causal.core.paths.check_can_create)."""
    from lora_causal.core.paths import check_can_create as check

    check(path, what, "folder")


@dataclass
class RunDirectory:
    """Where a run writes, decided up front; `start` is the first write.

    A run folder is recognised by its marker (RUN_MARKER, with our format tag), never by a file name that other
    tools also use: a folder with a stray manifest.json is not a run. Replacing a run (output.overwrite) removes
    only what lora_causal wrote there; anything else in the folder stays.
    """

    path: Path
    resume_from: Path | None  # a checkpoint to resume from, or None for a fresh run
    replace_existing: bool  # an old run is there and output.overwrite allows replacing it
    created: bool = False  # set by start() when this invocation made the folder (or found it empty)
    made: Path | None = None  # the outermost folder start() created (the run folder or a parent of it)
    lock: int | None = field(default=None, repr=False)  # the open, flock-ed RUN_LOCK while this process writes

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def plan(cls, folder: str, recipe_fingerprint: str, overwrite: bool,
             recipe_data: dict[str, Any] | None = None) -> RunDirectory:
        """Decide fresh run, resume or refusal for `folder`, without writing anything (`recipe_data`, the recipe's
        dump, lets a refusal name what changed)."""
        path = Path(folder)
        check_can_create(path, "output.dir")
        if held_by_another(path / RUN_LOCK):
            raise busy(path)
        if not path.exists() or all(child.name == RUN_LOCK for child in path.iterdir()):
            return cls(path, None, False)
        if read_marker(path) is None:
            raise UserError(
                f"output.dir: '{path}' is not empty and holds no lora_causal run (no {RUN_MARKER}); choose a new or "
                "empty folder"
            )
        manifest = read_manifest(path)
        if manifest is None:
            if overwrite:
                return cls(path, None, True)
            raise UserError(
                f"output.dir: '{path}' holds a lora_causal run whose {MANIFEST} is missing or damaged, so it can be "
                "neither resumed nor trusted as finished; set output.overwrite=true to replace the run, or choose "
                "another output.dir"
            )
        same_recipe = manifest.get("recipe_fingerprint") == recipe_fingerprint
        if manifest.get("status") == "completed":
            if overwrite:
                return cls(path, None, True)
            raise UserError(
                f"output.dir: '{path}' already holds a finished run; choose another output.dir or set "
                "output.overwrite=true to replace it"
            )
        checkpoint = last_complete_checkpoint(path / "checkpoints")
        if same_recipe and checkpoint is not None:
            return cls(path, checkpoint, False)
        if same_recipe or overwrite:
            return cls(path, None, True)
        raise UserError(
            f"output.dir: '{path}' holds an unfinished run of a different recipe{_changes(path, recipe_data)}; "
            "choose another output.dir or set output.overwrite=true to replace it"
        )

    def start(self, manifest: dict[str, Any], recipe_yaml: str) -> None:
        """Create (or clear what an old run wrote, when replacing) the folder, mark it as a run, and write the
        resolved recipe and a running manifest."""
        self.made = first_missing(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._hold_lock()  # before anything is removed or written: a run in progress here is refused first
        if self.replace_existing:
            remove_run_entries(self.path)
        elif self.resume_from is None and read_marker(self.path) is not None:
            raise UserError(f"output.dir: a run appeared in '{self.path}' while this one was starting (another "
                            "process); run the same command again to resume or refuse it, or choose another output.dir")
        self.created = self.made is not None or all(child.name == RUN_LOCK for child in self.path.iterdir())
        if self.resume_from is not None:
            remove_incomplete_checkpoints(self.checkpoints)
        write_json_atomic(self.path / RUN_MARKER, {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION,
                                                   "recipe_fingerprint": manifest.get("recipe_fingerprint")})
        write_text_atomic(self.path / "recipe.yaml", recipe_yaml)
        self.update_manifest(manifest)

    def _hold_lock(self) -> None:
        """Hold the run lock until this run ends (see lora_causal.core.runlock)."""
        self.lock = hold(self.path / RUN_LOCK)

    def release(self) -> None:
        """Let go of the run lock (a process that runs again, in tests or scripts, must not refuse itself)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def update_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.path / MANIFEST, manifest)

    def clean_up_after_failure(self) -> None:
        """After a failure: drop half-written checkpoints; if this run started the folder and has no complete
        checkpoint to resume from, remove what it wrote, and the folders it created (so nothing half-written is
        left behind, and nothing that was there before is touched)."""
        remove_incomplete_checkpoints(self.checkpoints)
        if not self.created or last_complete_checkpoint(self.checkpoints) is not None or not self.path.is_dir():
            return
        try:
            remove_run_entries(self.path)
            (self.path / RUN_MARKER).unlink(missing_ok=True)
            (self.path / RUN_LOCK).unlink(missing_ok=True)
            if self.made is not None:
                for folder in [self.path, *self.path.parents]:
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()
                    if folder == self.made:
                        break
        except OSError:
            pass  # best effort: the error that brought us here is what the user needs to see


def base_manifest(recipe_fingerprint: str, seed: int, data_fingerprint: str, recipe_dir: Path) -> dict[str, Any]:
    return {
        "status": "running",
        "started": now(),
        "command": " ".join(sys.argv),
        "recipe_fingerprint": recipe_fingerprint,
        "seed": seed,
        "dataset_fingerprint": data_fingerprint,
        "git_commit": git_commit(recipe_dir),
        "versions": library_versions(),
        "platform": platform.platform(),
    }


def _changes(path: Path, recipe_data: dict[str, Any] | None) -> str:
    """` (train.x: was 1, now 2; ...)`: what differs from the recipe the run in `path` started with, or ''."""
    import yaml

    from lora_causal.core.recipe import changed_fields

    try:
        changes = changed_fields(yaml.safe_load((path / "recipe.yaml").read_text()), recipe_data or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return ""
    return f" ({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''})" if recipe_data and changes else ""
