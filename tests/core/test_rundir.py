"""Folders the run writes are published whole, and readable by others the way the umask says."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lora_causal.core.rundir import write_dir_atomic


def test_a_published_folder_follows_the_umask_not_mkdtemps_0700(tmp_path: Path) -> None:
    """A merged model or an export is served by other users and containers: mkdtemp's 0700 would lock them out."""
    previous = os.umask(0o022)
    try:
        write_dir_atomic(tmp_path / "merged", lambda staging: (staging / "config.json").write_text("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
