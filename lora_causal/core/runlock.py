"""The run folder's lock: one process writes a run at a time.

The process that trains into output.dir holds an flock on RUN_LOCK in it for as long as the run lasts (the kernel
drops it when the process ends, even by kill -9). A second process that would train into the same folder is
refused before it prepares anything, instead of interleaving its checkpoints and metrics with the first one's.
On a file system without flock the run goes unguarded, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_causal.core.errors import UserError

RUN_LOCK = ".lora_causal_run.lock"


def held_by_another(lock: Path) -> bool:
    """Whether some process holds the run lock `lock` now (asked without keeping it, or creating the file)."""
    import fcntl

    try:
        handle = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock here: nothing to tell
    finally:
        os.close(handle)  # closing drops the shared lock, if it was taken
    return False


def busy(folder: Path) -> UserError:
    """The refusal for a run folder another process is writing."""
    return UserError(f"output.dir: another lora-causal process is training into '{folder}' right now; wait for it to "
                     "finish (then run again to resume or refuse), or choose another output.dir")


def hold(lock: Path) -> int | None:
    """Take the run lock `lock` (created with the umask's mode) and return its open descriptor, which holds it until
    closed; None on a file system without flock. Another holder: `busy`."""
    import fcntl

    mask = os.umask(0)
    os.umask(mask)
    handle = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~mask)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise busy(lock.parent) from None
    except OSError:
        os.close(handle)
        return None
    return handle
