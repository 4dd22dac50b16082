"""Paths the user gives (recipe keys, command-line options), checked before anything is written.

- `expand` turns `~` and `~user` into home folders; a `~user` that does not exist is a one-line error, not the
  RuntimeError pathlib raises.
- `check_can_create` refuses, before any work, an output the file system would refuse later: a name with a NUL
  character, a name or path longer than the file system allows, a path under a file, a folder we may not write
  to, a file path that is a folder (or a folder path that is a file).
Every message names the recipe key or option (`what`) so the user knows what to change.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lora_causal.core.errors import UserError

NAME_MAX = 255  # bytes in one path component on Linux/macOS file systems, when pathconf cannot tell
PATH_MAX = 4096


def expand(value: str | Path, what: str) -> Path:
    """`value` with `~` / `~user` expanded; NUL characters and unknown users are refused, naming `what`."""
    text = str(value)
    if "\0" in text:
        raise UserError(f"{what}: the path contains a NUL character; remove it")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory." for ~user with no such user
        user = text[1:].split("/", 1)[0]
        raise UserError(f"{what}: '{text}' starts with ~{user}, and there is no user '{user}' here; write the "
                        "folder out in full") from None


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError):
        return default


def _existing_ancestor(path: Path) -> Path:
    """The nearest of `path` and its parents that exists (checked without following a too-long name)."""
    for candidate in [path, *path.parents]:
        try:
            if candidate.exists() or candidate.is_symlink():
                return candidate
        except OSError:  # a component too long to even look up: keep climbing
            continue
    return Path(path.anchor or ".")


def check_name_lengths(path: Path, what: str) -> None:
    """Refuse a path whose components or whole length the file system refuses (ENAMETOOLONG, later)."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    base = _existing_ancestor(absolute)
    folder = base if base.is_dir() else base.parent
    name_max, path_max = _limit(folder, "PC_NAME_MAX", NAME_MAX), _limit(folder, "PC_PATH_MAX", PATH_MAX)
    for part in absolute.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise UserError(f"{what}: the name '{shown}' is {len(os.fsencode(part))} bytes long, and this file system "
                            f"allows {name_max}; choose a shorter name")
    if len(os.fsencode(str(absolute))) >= path_max:
        raise UserError(f"{what}: the path is {len(os.fsencode(str(absolute)))} bytes long, and this file system "
                        f"allows {path_max - 1}; choose a shorter path")


def check_can_create(path: Path, what: str, kind: str = "folder") -> None:
    """Refuse, before any work, a `kind` ("folder" or "file") at `path` that could not be written there.

    An existing folder passes for kind "folder" (whether it may be used is the caller's decision); an existing
    file passes for kind "file" (it is replaced).
    """
    if "\0" in str(path):
        raise UserError(f"{what}: the path contains a NUL character; remove it")
    check_name_lengths(path, what)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        raise UserError(f"{what}: '{path}' cannot be used ({os.strerror(exc.errno or errno.EINVAL).lower()}); "
                        "choose another path") from None
    if exists and kind == "folder" and not is_dir:
        raise UserError(f"{what}: '{path}' is a file; choose a folder")
    if exists and kind == "file" and is_dir:
        raise UserError(f"{what}: '{path}' is a folder; give a file name, such as '{path / 'out'}'")
    parent = _existing_ancestor(path if not exists else path.parent)
    if not parent.is_dir():
        raise UserError(f"{what}: '{parent}' is a file, so '{path}' cannot be created; choose another folder")
    writable = path if exists and kind == "folder" else parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write to '{writable}' (permission denied); choose another folder")


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what `mkdir(parents=True)` would create first)."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing
