"""Signs of life between processes that share only a file system: a heartbeat one process writes while it works,
a watch another process keeps on it, and worker processes that die with their parent.

A heartbeat file holds {"host", "pid", "beat"} and is rewritten every BEAT_S seconds by a thread of the working
process. A watcher decides on its own monotonic clock (no clocks are compared between machines): the worker is
*gone* when it ran on this host and its process no longer exists (killed, out of memory), *silent* when the file
has not changed for `patience_s` (a hung process, or one on another machine that died).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BEAT_S = 2.0


def host_tag() -> str:
    """This machine, as 8 hex digits fit for file names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@contextlib.contextmanager
def heartbeat(path: Path, interval_s: float = BEAT_S) -> Iterator[None]:
    """Rewrite `path` every `interval_s` seconds (from a thread) while the block runs; remove it afterwards."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "beat": 0}
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")

    def beat() -> None:
        info["beat"] += 1
        staging.write_text(json.dumps(info))
        os.replace(staging, path)

    beat()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(OSError):  # a full disk or a lost mount: the watcher sees silence
                beat()

    thread = threading.Thread(target=loop, name="lora-causal-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


class Watch:
    """A watcher's view of a heartbeat file; `check()` says why the worker is not alive, or None while it is."""

    def __init__(self, path: Path, patience_s: float) -> None:
        self.path = path
        self.patience_s = patience_s
        self.seen: str | None = None
        self.changed = time.monotonic()
        self.worker: dict[str, Any] | None = None

    def check(self) -> str | None:
        try:
            text: str | None = self.path.read_text()
        except OSError:
            text = None
        if text != self.seen:
            self.seen, self.changed = text, time.monotonic()
            with contextlib.suppress(ValueError, TypeError):
                self.worker = json.loads(text) if text else self.worker
        worker = self.worker or {}
        if worker.get("host") == socket.gethostname() and isinstance(worker.get("pid"), int) and not pid_alive(worker["pid"]):
            return f"ended (process {worker['pid']} is gone: killed, or out of memory?)"
        silent = time.monotonic() - self.changed
        if silent > self.patience_s:
            where = f" (process {worker['pid']} on {worker['host']})" if worker else ""
            return f"gave no sign of life for {silent:.0f} s{where}"
        return None


def die_with_parent(parent_pid: int) -> None:
    """In a forked worker: be killed when the parent dies (Linux), instead of living on, orphaned, holding what the
    parent held; exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)
