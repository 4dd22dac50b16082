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
STARTUP_ERROR_TIMEOUT_S = 600  # how long a process with a broken recipe waits for the others to compare


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
    """True under FSDP or DeepSpeed ZeRO-3, as accelerate's state has it (FSDP asked of a CPU run is plain DDP)."""
    from accelerate.utils import DistributedType

    state = state_if_started()
    if state is None:
        return False
    if state.distributed_type == DistributedType.FSDP:
        return True
    return state.distributed_type == DistributedType.DEEPSPEED and deepspeed_zero_stage() == 3


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage accelerate uses: the active DeepSpeed plugin's once accelerate's state holds one (the trainer
    builds it), else the stage of the plugin accelerate builds from what `accelerate launch` exported, so a stage
    given in `deepspeed_config_file` (exported only as the file's path) counts as well as `zero_stage`. None
    without DeepSpeed."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        plugin = AcceleratorState().deepspeed_plugin
        if plugin is not None:
            return int(plugin.zero_stage)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("1", "true"):
        return None
    from accelerate.utils import DeepSpeedPlugin

    try:
        return int(DeepSpeedPlugin().zero_stage)  # reads ACCELERATE_DEEPSPEED_ZERO_STAGE / _CONFIG_FILE as accelerate does
    except (OSError, ValueError) as exc:
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the accelerate config")
        raise UserError(f"the DeepSpeed config {source} cannot be read: {str(exc).splitlines()[0]}") from None


def launcher_engine() -> str | None:
    """The sharding engine `accelerate launch` was asked for by its config (FSDP or DeepSpeed), if any: what the
    user asked, before accelerate decides whether this machine can do it."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return "DeepSpeed"
    return None


def check_same_recipe(fingerprint: str | None, error: str | None = None) -> None:
    """Every process must run the same resolved recipe; refuse (on every process) if one differs, or if one could
    not load its recipe at all (`error`: a machine with a stale copy of the file), naming it, so that the main
    process, which speaks, learns why."""
    state = state_if_started()
    if state is None or state.num_processes == 1:
        if error is not None:
            raise UserError(error)
        return
    from accelerate.utils import gather_object

    reports = gather_object([(fingerprint, error)])
    failed = [(rank, text) for rank, (_, text) in enumerate(reports) if text is not None]
    if error is not None:
        raise UserError(error)
    if failed:
        rank, text = failed[0]
        raise UserError(f"process {rank} of {len(reports)} refused its recipe: {text}; start every process with the "
                        "same recipe file (a machine may hold an older copy of it)")
    fingerprints = [value for value, _ in reports]
    odd = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if odd:
        raise UserError(
            f"process {odd[0]} runs a recipe with fingerprint {fingerprints[odd[0]]}, process 0 runs "
            f"{fingerprints[0]}; start every process with the same recipe file and overrides"
        )


def share_startup_error(exc: UserError) -> None:
    """A launched process whose recipe does not load: take part in the recipe check with the error instead of a
    fingerprint, so the main process reports it (otherwise only the launcher's failure report would reach the user);
    raises the error. Nothing to do for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or state_if_started() is not None:
        return
    state = process_state(STARTUP_ERROR_TIMEOUT_S)
    try:
        check_same_recipe(None, str(exc))
    finally:
        state.destroy_process_group()  # torn down before exit: a live group can abort the interpreter at exit


def agree_max(value: int, timeout_s: float | None = None) -> int:
    """The largest `value` of all launched processes (a collective; the value itself with one process): how the
    processes agree on a decision one of them made, such as stopping after this step on a signal.

    It runs on the host (gloo, see `host_group`): a GPU all-reduce would be queued behind the step's work and read
    back, draining the GPU's queue at every step end."""
    state = state_if_started()
    if state is None or state.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group(timeout_s))
    return int(tensor.item())


_host_groups: dict[int, Any] = {}


def host_group(timeout_s: float | None = None) -> Any:
    """A gloo process group of all processes, for collectives on host values: the default group when it is gloo,
    else one created on first use (a collective: every process makes its first call at the same point) with
    `timeout_s` (train.collective_timeout_s), then reused."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if dist.get_backend(world) == "gloo":
        return world
    if id(world) not in _host_groups:
        from datetime import timedelta

        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        _host_groups[id(world)] = dist.new_group(backend="gloo", timeout=timeout)
    return _host_groups[id(world)]


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
                            "train.collective_timeout_s or look at the main process's output", own=True)
        if say is not None and time.monotonic() - last_said > 30:
            say(f"waiting for the main process to write {what} ({waited:.0f}s)")
            last_said = time.monotonic()
        time.sleep(WAIT_POLL_S)


DEFAULT_ALLOC_CONF_MARK = "LORA_CAUSAL_DEFAULT_ALLOC_CONF"  # set beside the allocator default this module chose


def gpu_memory_defaults() -> None:
    """Expandable segments for torch's CUDA allocator unless the user configured it (`PYTORCH_CUDA_ALLOC_CONF`
    or `PYTORCH_ALLOC_CONF`): micro-batches of varying length fragment fixed-size segments. Set at the process
    entry, before torch initialises CUDA (it reads the setting then)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        os.environ[DEFAULT_ALLOC_CONF_MARK] = "1"  # ours, not the user's: the bench's stock arm runs without it


def without_our_allocator_default(environ: dict[str, str]) -> dict[str, str]:
    """`environ` less the allocator setting `gpu_memory_defaults` chose (a user's own setting stays)."""
    env = dict(environ)
    if env.pop(DEFAULT_ALLOC_CONF_MARK, None):
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    return env
