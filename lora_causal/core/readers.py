"""Reading the small JSON files other tools or earlier runs left behind (manifest.json, adapter_config.json,
config.json, merge_report.json), so that a damaged one is one error line naming the file and the fix.

A file can be missing, unreadable, not UTF-8, not JSON, nested so deeply that the parser overflows the stack
(RecursionError), or JSON of the wrong shape (a list where an object belongs): each becomes a `UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_causal.core.errors import UserError

MAX_JSON_BYTES = 64 << 20  # a config or manifest is kilobytes; anything this large is not one


def read_json(path: Path, fix: str) -> Any:
    """The JSON value in `path`; any problem is a UserError naming the file and ending with `fix`."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"'{path}' is larger than {MAX_JSON_BYTES >> 20} MiB, too large for this kind of file; {fix}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"'{path}' does not exist; {fix}") from None
    except IsADirectoryError:
        raise UserError(f"'{path}' is a folder, not a JSON file; {fix}") from None
    except PermissionError:
        raise UserError(f"'{path}' cannot be read (permission denied); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text, so not JSON; {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from None
    except RecursionError:
        raise UserError(f"'{path}' is nested too deeply to read; {fix}") from None


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """`read_json` for files that must hold one JSON object (`{...}`)."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise UserError(f"'{path}' must hold a JSON object ({{...}}), and it holds a {type(value).__name__}; {fix}")
    return value
