"""Sharding is read from accelerate's own machinery: the environment `accelerate launch` exports for a config file
(parsed by accelerate's launcher code) and the DeepSpeed plugin accelerate builds from it, so a ZeRO stage given in
`deepspeed_config_file` (exported only as the file's path) is seen, not only `zero_stage`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_causal.core import processes
from lora_causal.core.errors import UserError


def _launch(tmp_path: Path, monkeypatch, deepspeed_config: dict, ds_file: dict | None = None) -> None:
    """Export what `accelerate launch --config_file` exports for a DeepSpeed config, and a GPU launch's state."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    if ds_file is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds_file))
        deepspeed_config = {**deepspeed_config, "deepspeed_config_file": str(tmp_path / "ds.json")}
    config = tmp_path / "accelerate.json"
    config.write_text(json.dumps({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                  "deepspeed_config": deepspeed_config, "num_machines": 1, "num_processes": 2,
                                  "machine_rank": 0, "use_cpu": False}))
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "-m", "lora_causal", "train", "r.yaml"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, environment = prepare_deepspeed_cmd_env(args)
    for key, value in environment.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    # a CPU cannot start a DeepSpeed process group: the state a GPU launch creates, as far as sharding reads it
    monkeypatch.setattr(processes, "state_if_started", lambda: SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


@pytest.mark.parametrize(("stage", "sharded"), [(3, True), (2, False), (1, False)])
def test_zero_stage_from_deepspeed_config_file(tmp_path: Path, monkeypatch, stage: int, sharded: bool) -> None:
    _launch(tmp_path, monkeypatch, {"zero3_init_flag": stage == 3},
            {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"})
    import os

    assert "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in os.environ  # only the file's path is exported
    assert processes.deepspeed_zero_stage() == stage
    assert processes.sharded_training() is sharded


def test_zero_stage_from_the_accelerate_config(tmp_path: Path, monkeypatch) -> None:
    _launch(tmp_path, monkeypatch, {"zero_stage": 3, "offload_optimizer_device": "none"})
    assert processes.deepspeed_zero_stage() == 3 and processes.sharded_training()


def test_unreadable_deepspeed_config_is_one_line(tmp_path: Path, monkeypatch) -> None:
    _launch(tmp_path, monkeypatch, {}, {"train_micro_batch_size_per_gpu": "auto"})  # no zero_optimization
    with pytest.raises(UserError, match=r"^the DeepSpeed config .*ds\.json cannot be read: .*ZeRO") as error:
        processes.sharded_training()
    assert "\n" not in str(error.value)


def test_no_deepspeed_no_stage(monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert processes.deepspeed_zero_stage() is None


def _agree(rank: int, port: int, backend: str, results: object) -> None:
    import torch.distributed as dist

    from lora_causal.core import processes

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if backend == "accelerate":
        processes.process_state(60)  # gloo on the CPU: the default group is reused
    else:
        dist.init_process_group(backend, rank=rank, world_size=2)
        processes.state_if_started = lambda: type("State", (), {"num_processes": 2})()  # only the group matters here
    first = processes.agree_max(7 if rank else 2, timeout_s=60)
    second = processes.agree_max(0, timeout_s=60)
    group = processes.host_group(60)
    results.put((rank, first, second, group is processes.host_group(60), dist.get_backend(group),
                 group is dist.group.WORLD))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["accelerate", "cpu:gloo"])
def test_agree_max_runs_on_a_host_group(backend: str) -> None:
    """Two processes agree on the largest value over gloo; a default group that is not plain gloo (NCCL on GPUs;
    here a per-device backend) gets one gloo group, created once."""
    import torch.multiprocessing as mp
    from conftest import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_agree, args=(free_port(), backend, results), nprocs=2, start_method="spawn")
    found = sorted(results.get(timeout=60) for _ in range(2))
    reuses_world = backend == "accelerate"
    assert found == [(rank, 7, 0, True, "gloo", reuses_world) for rank in (0, 1)]
