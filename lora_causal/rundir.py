"""The run directory: where a run goes, whether it resumes, atomic writes and the manifest.

Layout of `output.dir`:
    recipe.yaml      the resolved recipe (every default filled in)
    manifest.json    status, library versions, seed, dataset fingerprint, git commit, results
    data_report.json what tokenization kept, truncated and dropped
    metrics.jsonl    one JSON line per log (loss, lr, tokens, tokens/s, supervised tokens, peak memory, eval loss)
    loss.png         train and eval loss against the step (lora_causal.summary)
    tensorboard/     event files, when output.report_to has tensorboard
    checkpoints/     trainer checkpoints, for resuming
    adapter/         the final LoRA adapter (peft format) and the tokenizer
    samples.json     answers to output.sample_prompts before and after training

Nothing is created until the inputs have been checked, so a bad recipe or bad data leaves no directory behind.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from lora_causal import __version__
from lora_causal.errors import UserError

MANIFEST = "manifest.json"
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
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a fresh staging folder beside `target`, then move it into place in one rename.

    If `write` fails, the staging folder is removed: nothing half-written is left beside `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        replace_dir_atomic(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "lora_causal": __version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
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
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_can_create(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created: under a file, or in a folder we cannot write."""
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir():
        raise UserError(f"{what}: '{parent}' is a file, so '{path}' cannot be created; choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write to '{parent}' (permission denied); choose another folder")


@dataclass
class RunDirectory:
    """Where a run writes, decided up front; `start` is the first write."""

    path: Path
    resume_from: Path | None  # a checkpoint to resume from, or None for a fresh run
    replace_existing: bool  # an old run is there and output.overwrite allows replacing it
    created: bool = False  # set by start() when this invocation made the folder

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def plan(cls, folder: str, recipe_fingerprint: str, overwrite: bool) -> RunDirectory:
        """Decide fresh run, resume or refusal for `folder`, without writing anything."""
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise UserError(f"output.dir: '{path}' is a file; choose a folder")
        if not path.exists() or not any(path.iterdir()):
            check_can_create(path, "output.dir")
            return cls(path, None, False)
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"output.dir: cannot write to '{path}' (permission denied); choose another folder")
        manifest = read_manifest(path)
        if manifest is None:
            raise UserError(
                f"output.dir: '{path}' is not empty and holds no lora_causal run; choose a new or empty folder"
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
            f"output.dir: '{path}' holds an unfinished run of a different recipe; choose another output.dir or set "
            "output.overwrite=true to replace it"
        )

    def start(self, manifest: dict[str, Any], recipe_yaml: str) -> None:
        """Create (or clear, when replacing) the folder and write the resolved recipe and a running manifest."""
        if self.replace_existing:
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.created = not self.path.exists() or not any(self.path.iterdir())
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            remove_incomplete_checkpoints(self.checkpoints)
        write_text_atomic(self.path / "recipe.yaml", recipe_yaml)
        self.update_manifest(manifest)

    def update_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.path / MANIFEST, manifest)

    def clean_up_after_failure(self) -> None:
        """After a failure: drop half-written checkpoints, and the whole folder if this run made it and has
        no complete checkpoint to resume from (so nothing half-written is left behind)."""
        remove_incomplete_checkpoints(self.checkpoints)
        if self.created and last_complete_checkpoint(self.checkpoints) is None:
            shutil.rmtree(self.path, ignore_errors=True)


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
