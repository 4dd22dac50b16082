"""The launched processes: topology (from accelerate's state), the recipe check across ranks, one writer for shared
files, and who speaks.

Under `accelerate launch` (or torchrun) every process runs the same command. Topology comes from accelerate's
`PartialState`; before it exists (a recipe that does not even load), the launcher's RANK is the only topology
there is, and it decides who prints the error. Files that several processes need (the random demo weights, the
prepared data) are written once, by the main process, atomically; the others wait for them without a collective,
so a long write never trips the process group's timeout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from lora_causal.core.errors import UserError

WAIT_POLL_S = 0.5


def process_state(timeout_s: float | None = None) -> Any:
    """This process's place among the launched ones, created once per process.

    Without CUDA the processes talk over gloo; accelerate only sets that up when asked for the CPU from the first
    call. `timeout_s` bounds every collective (the first call decides; later calls get the same state).
    """
    import torch
    from accelerate import PartialState

    kwargs: dict[str, Any] = {"cpu": not torch.cuda.is_available()}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=timeout_s)
    return PartialState(**kwargs)


def state_if_started() -> Any:
    """accelerate's state if this process has created it, else None (creating it would start a process group)."""
    from accelerate import PartialState

    return PartialState() if PartialState._shared_state else None


def speaks() -> bool:
    """Whether this process reports to the user: the main process, or the only one."""
    state = state_if_started()
    if state is not None:
        return bool(state.is_main_process)
    return os.environ.get("RANK", "0") == "0"  # before any process group: the launcher's rank


def sharded_training() -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, as accelerate's state has it (FSDP asked of a CPU run is plain DDP).

    accelerate fixes the ZeRO stage only when the trainer builds its DeepSpeed plugin; until then the stage is the
    one `accelerate launch` exported from its config.
    """
    from accelerate.utils import DistributedType

    state = state_if_started()
    if state is None:
        return False
    if state.distributed_type == DistributedType.FSDP:
        return True
    return state.distributed_type == DistributedType.DEEPSPEED and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def launcher_engine() -> str | None:
    """The sharding engine `accelerate launch` was asked for by its config (FSDP or DeepSpeed), if any: what the
    user asked, before accelerate decides whether this machine can do it."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return "DeepSpeed"
    return None


def check_same_recipe(fingerprint: str) -> None:
    """Every process must run the same resolved recipe; refuse (on every process) if one differs."""
    state = state_if_started()
    if state is None or state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    fingerprints = gather_object([fingerprint])
    odd = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if odd:
        raise UserError(
            f"process {odd[0]} runs a recipe with fingerprint {fingerprints[odd[0]]}, process 0 runs "
            f"{fingerprints[0]}; start every process with the same recipe file and overrides"
        )


def wait_for(marker: Path, what: str, timeout_s: float, failure: Path | None = None,
             say: Callable[[str], Any] | None = None) -> None:
    """Wait (polling the file system, no collective) until `marker` exists; stop early if `failure` appears.

    A failure file holds the writer's one-line error: the waiting process raises it too, so every process exits
    with the same status, and only the main process prints it.
    """
    start = last_said = time.monotonic()
    while not marker.exists():
        if failure is not None and failure.exists():
            raise UserError(failure.read_text(encoding="utf-8").strip() or f"{what} failed on the main process")
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise UserError(f"waited {timeout_s:.0f}s for the main process to write {what} ({marker}); raise "
                            "train.collective_timeout_s or look at the main process's output")
        if say is not None and time.monotonic() - last_said > 30:
            say(f"waiting for the main process to write {what} ({waited:.0f}s)")
            last_said = time.monotonic()
        time.sleep(WAIT_POLL_S)
