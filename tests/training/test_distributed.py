"""Several processes through `accelerate launch` (gloo on the CPU): same tokens, same losses, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QA_ROWS, REPO, base_recipe, free_port, launch_command, run_cli, write_jsonl, write_recipe

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
TOLERANCE = 1e-5  # same examples per step and token-normalised loss: equal up to float reduction order


def _launch(log: Path, *args: str) -> subprocess.Popen[str]:
    """Start a launcher writing to files (pipes could fill up and stall a process its peers wait for)."""
    with (log.with_suffix(".out")).open("w") as out, (log.with_suffix(".err")).open("w") as err:
        return subprocess.Popen(
            launch_command(*args),
            cwd=REPO, stdout=out, stderr=err, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )


def _finish(process: subprocess.Popen[str], log: Path) -> tuple[str, str]:
    process.wait(timeout=300)
    return log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()




def _two_nodes(tmp_path: Path, recipe: Path, rank0: list[str], rank1: list[str]
               ) -> tuple[list[subprocess.Popen[str]], list[tuple[str, str]]]:
    """Two "machines" of one process each on loopback (accelerate's multi-node launch), each with its own overrides;
    the launchers and their (stdout, stderr), once both end."""
    port = str(free_port())
    nodes = [
        _launch(tmp_path / f"node{rank}", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                "--dynamo_backend", "no", "-m", "lora_causal", "train", str(recipe), *extra)
        for rank, extra in ((0, rank0), (1, rank1))
    ]
    return nodes, [_finish(node, tmp_path / f"node{rank}") for rank, node in enumerate(nodes)]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _supervised(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["supervised_tokens"] for line in lines if '"supervised_tokens"' in line]


def _assert_same_adapter(first: Path, second: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(first / "adapter" / "adapter_model.safetensors"), load_file(second / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=TOLERANCE) for k in a)


@pytest.fixture(scope="module")
def recipe_and_single_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A recipe with micro-batches of 2, and its single-process run at the same global batch (2 x 2 accumulation)."""
    folder = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(folder / "qa.jsonl", QA_ROWS * 2)
    tree = base_recipe(tiny_model_dir, data, folder / "unused", train={"max_steps": 4, "micro_batch_size": 2})
    recipe = write_recipe(folder / "recipe.yaml", tree)
    single = run_cli("train", str(recipe), f"output.dir={folder / 'single'}", "train.gradient_accumulation=2")
    assert single.returncode == 0, single.stderr[-2000:]
    return recipe, folder / "single"


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(recipe_and_single_run, tmp_path: Path) -> None:
    recipe, single = recipe_and_single_run
    log = tmp_path / "launch"
    process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
                      "-m", "lora_causal", "train", str(recipe), f"output.dir={tmp_path / 'ddp'}")
    out, err = _finish(process, log)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "destroy_process_group" not in err  # clean teardown
    assert out.count("adapter saved to") == 1 and out.count("data: ") == 1  # one process speaks and writes
    assert out.count("\nstep 4/4 ") == 1 and out.count("run summary:") == 1  # and only it shows progress
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    assert _supervised(tmp_path / "ddp") == _supervised(single)  # the same tokens, summed over processes
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(single), abs=TOLERANCE)
    _assert_same_adapter(tmp_path / "ddp", single)


@pytest.mark.slow
def test_two_processes_train_each_example_once_on_uneven_data_with_accumulation(tmp_path: Path, tiny_model_dir: Path) -> None:
    """11 examples, global batch 8 (2 processes x 2 x 2 accumulation): the last step is short. No example may train
    twice, and the run must equal one process at the same global batch (2 x 4 accumulation), eval loss included."""
    data = write_jsonl(tmp_path / "qa.jsonl", (QA_ROWS * 3)[:11])
    eval_data = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS + QA_ROWS[:1])
    tree = base_recipe(tiny_model_dir, data, tmp_path / "unused",
                       train={"epochs": 2, "micro_batch_size": 2, "gradient_accumulation": 2, "logging_steps": 1,
                              "eval_steps": 2})
    tree["data"]["eval"] = {"path": str(eval_data), "format": "prompt_completion"}
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    single = run_cli("train", str(recipe), f"output.dir={tmp_path / 'single'}", "train.gradient_accumulation=4")
    assert single.returncode == 0, single.stderr[-2000:]
    log = tmp_path / "launch"
    process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
                      "-m", "lora_causal", "train", str(recipe), f"output.dir={tmp_path / 'ddp'}")
    out, err = _finish(process, log)
    assert process.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "single" / "data_report.json").read_text())
    targets = report["train"]["target_tokens"]
    assert _supervised(tmp_path / "single")[-1] == _supervised(tmp_path / "ddp")[-1] == 2 * targets  # once per epoch
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(single_dir := tmp_path / "single"), abs=TOLERANCE)
    evals = [[json.loads(line)["eval_loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
             for run in (single_dir, tmp_path / "ddp")]
    assert evals[0] and evals[0] == pytest.approx(evals[1], abs=TOLERANCE)
    _assert_same_adapter(tmp_path / "ddp", single_dir)


@pytest.mark.slow
def test_two_nodes_on_loopback(recipe_and_single_run, tmp_path: Path) -> None:
    recipe, single = recipe_and_single_run
    nodes, results = _two_nodes(tmp_path, recipe, [f"output.dir={tmp_path / 'nodes'}"], [f"output.dir={tmp_path / 'nodes'}"])
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    assert results[0][0].count("adapter saved to") == 1 and "adapter saved to" not in results[1][0]
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(single), abs=TOLERANCE)
    _assert_same_adapter(tmp_path / "nodes", single)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_launch_what_lora_causal_expects(config: Path, monkeypatch) -> None:
    """Each config, read by `accelerate launch`'s own argument handling, exports the environment lora_causal reads
    (not just YAML that parses): FSDP for the FSDP config, ZeRO stage 3 for DeepSpeed, no engine for the others."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from lora_causal.core.processes import launcher_engine

    loaded = load_config_from_file(str(config))
    if "zero3" in config.name:  # accelerate exports the stage from deepspeed_config.zero_stage; sharded_training reads it
        assert loaded.deepspeed_config["zero_stage"] == 3 and loaded.distributed_type == "DEEPSPEED"
        return
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "lora_causal", "train", "r.yaml"])
    args = _validate_launch_command(args)[0]
    environment = prepare_multi_gpu_env(args) if args.multi_gpu or args.use_fsdp else {}
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        if name.startswith("ACCELERATE_USE_"):
            monkeypatch.setenv(name, value)
    expected_engine = "FSDP" if "fsdp" in config.name else None
    assert launcher_engine() == expected_engine
    if expected_engine:  # FSDP-QLoRA needs the original parameters off (mixed 4-bit/float units) and layer wrapping
        assert environment["FSDP_USE_ORIG_PARAMS"] == "false" and environment["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    if "single" in config.name:
        assert args.num_processes == 1
    else:
        assert args.num_processes >= 2


def test_sharded_training_stores_4bit_weights_in_the_compute_dtype() -> None:
    from lora_causal.core.recipe import QuantizationSection
    from lora_causal.model.loading import build_quantization_config, device_map_for_process

    plain = build_quantization_config(QuantizationSection(), torch.bfloat16, sharded=False)
    assert plain.bnb_4bit_quant_storage == torch.uint8 and device_map_for_process(sharded=False) == {"": "cpu"}
    sharded = build_quantization_config(QuantizationSection(), torch.bfloat16, sharded=True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16 and device_map_for_process(sharded=True) is None


def test_fsdp_asked_of_a_cpu_run_is_not_sharded(monkeypatch) -> None:
    """accelerate runs FSDP configs on the CPU as plain DDP; the topology comes from its state, not the environment."""
    from lora_causal.core.processes import process_state, sharded_training

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    process_state()
    assert sharded_training() is False


@pytest.mark.slow
def test_errors_are_printed_once_and_every_process_exits_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(QA_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    for args in ([str(recipe)], [str(recipe), "lora.rank=8"]):  # a data error, a recipe error
        log = tmp_path / f"launch{len(args)}"
        process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
                          "-m", "lora_causal", "train", *args)
        out, err = _finish(process, log)
        assert process.returncode != 0
        assert err.count("error: ") == 1, err[-3000:]
        # no process shows a traceback of ours or aborts; the launcher's own failure report names exit status 2
        assert "lora_causal/" not in err and "terminate called" not in err and "[rank" not in err, err[-3000:]
        assert "exitcode  : 2" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_processes_running_different_recipes_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run",
                                                               train={"max_steps": 2}))
    nodes, results = _two_nodes(tmp_path, recipe, ["train.learning_rate=1e-4"], ["train.learning_rate=1e-3"])
    assert all(node.returncode != 0 for node in nodes)
    assert all("exitcode  : 2" in err for _, err in results)  # both processes refused, with the usage status
    assert "error: process 1 runs a recipe with fingerprint" in results[0][1] and "error:" not in results[1][1]
    assert "start every process with the same recipe" in results[0][1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_first_runs_on_an_empty_cache_write_the_random_model_once(tmp_path: Path) -> None:
    """The demo's random weights: two processes, an empty cache each time, five times in a row."""
    for attempt in range(5):
        cache = tmp_path / f"cache{attempt}"
        log = tmp_path / f"launch{attempt}"
        with (log.with_suffix(".out")).open("w") as out, (log.with_suffix(".err")).open("w") as err:
            process = subprocess.Popen(
                launch_command("--config_file",
                 str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "-m", "lora_causal", "train",
                 str(REPO / "recipes" / "demo.yaml"), "train.max_steps=1", "train.epochs=1", "output.sample_prompts=[]",
                 "output.merge=null", f"output.dir={tmp_path / f'run{attempt}'}", "data.eval=null", "train.eval_steps=null"),
                cwd=REPO, stdout=out, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LORA_CAUSAL_CACHE": str(cache)},
            )
        _, err_text = _finish(process, log)
        assert process.returncode == 0, err_text[-2000:]
        folders = list((cache / "random-init").iterdir())
        assert len(folders) == 1 and (folders[0] / "config.json").is_file()


@pytest.mark.slow
def test_fsdp2_gathers_the_adapter_alone(tmp_path: Path) -> None:
    """FSDP2 runs on the CPU with gloo when driven directly (accelerate's FSDP plugin does not: it falls back to DDP
    there): the adapter is gathered weight by weight, whole and exact, without the base."""
    result = tmp_path / "result.json"
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "scripts" / "fsdp2_adapter_gather.py"), str(result)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert json.loads(result.read_text()) == {"ok": True, "tensors": 2 * 2 * 7, "base_in_it": False}


def test_sharded_runs_refuse_what_cannot_be_sharded_and_pick_the_adapter_dtype(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lora_causal.core.errors import UserError
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.model.loading import adapter_dtype_name
    from lora_causal.training.preflight import check_sharding

    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    check_sharding(load_recipe(path), sharded=True)  # nf4, lora.dtype auto: fine
    check_sharding(load_recipe(path, ["quantization.mode=int8"]), sharded=False)  # DDP shards nothing
    with pytest.raises(UserError, match=r"quantization\.mode: int8 weights cannot be sharded by FSDP or ZeRO-3; use nf4"):
        check_sharding(load_recipe(path, ["quantization.mode=int8"]), sharded=True)
    with pytest.raises(UserError, match=r"lora\.dtype: bfloat16 adapters beside a float32 base cannot be sharded"):
        check_sharding(load_recipe(path, ["lora.dtype=bfloat16"]), sharded=True)  # the CPU computes in float32
    assert adapter_dtype_name("auto", sharded=False) == "float32"
    assert adapter_dtype_name("auto", sharded=True, compute_dtype="bfloat16") == "bfloat16"
    assert adapter_dtype_name("float32", sharded=True, compute_dtype="bfloat16") == "float32"  # explicit is kept


@pytest.mark.slow
def test_an_fsdp_config_on_a_cpu_machine_is_refused_before_anything_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run"))
    log = tmp_path / "launch"
    process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp_qlora.yaml"), "--num_processes",
                      "1", "-m", "lora_causal", "train", str(recipe))
    _, err = _finish(process, log)
    assert "error: the accelerate config asks for FSDP, which needs GPUs" in err and "exitcode  : 2" in err
    assert not (tmp_path / "run").exists()


SLOW_CHATML = (  # a chat template that idles ~1 s per render: a preparation far longer than the timeout below
    "{% for i in range(100000) %}{% for j in range(60) %}{% endfor %}{% endfor %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.slow
def test_a_preparation_longer_than_the_collective_timeout_still_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil
    import time

    from transformers import AutoTokenizer

    tokenizer_dir = tmp_path / "slow-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = SLOW_CHATML
    tokenizer.save_pretrained(tokenizer_dir)
    chats = [{"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
             for row in QA_ROWS * 8]
    # 8 s: short beside the preparation (about 1 s per chat render here), long enough for the collectives that do
    # exist (the recipe check, training) between processes started a moment apart
    tree = base_recipe(tiny_model_dir, write_jsonl(tmp_path / "chats.jsonl", chats), tmp_path / "run",
                       model={"tokenizer": str(tokenizer_dir)},
                       train={"max_steps": 2, "micro_batch_size": 2, "collective_timeout_s": 8})
    tree["data"]["train"]["format"] = "messages"
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    log = tmp_path / "launch"
    start = time.monotonic()
    process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
                      "-m", "lora_causal", "train", str(recipe))
    out, err = _finish(process, log)
    elapsed = time.monotonic() - start
    assert process.returncode == 0, err[-3000:]
    assert elapsed > 2 * 8, f"the preparation took {elapsed:.0f} s in all, not long enough to test the timeout"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.slow
def test_a_data_error_stops_every_process_with_one_message(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [*QA_ROWS, {"prompt": "Q: hi\nA:"}]
    tree = base_recipe(tiny_model_dir, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "run")
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    log = tmp_path / "launch"
    process = _launch(log, "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
                      "-m", "lora_causal", "train", str(recipe))
    _, err = _finish(process, log)
    assert process.returncode != 0
    assert err.count("error: data.train: line 5: no 'completion' field") == 1, err[-3000:]
    assert "Traceback" not in err.split("error: data.train")[0]


@pytest.mark.slow
def test_a_recipe_only_one_process_refuses_is_reported_by_the_main_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Rank 1 alone has a typo (a machine with a stale copy of the recipe): rank 0 says what it is, in one line."""
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS * 2)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(tiny_model_dir, data, tmp_path / "run",
                                                               train={"max_steps": 2}))
    nodes, results = _two_nodes(tmp_path, recipe, [], ["train.learning_rat=1e-3"])
    assert all(node.returncode != 0 for node in nodes)
    assert all("exitcode  : 2" in err for _, err in results), results[0][1][-2000:]
    lines = [line for line in results[0][1].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: process 1 of 2 refused its recipe: ") and "learning_rat" in lines[0]
    assert "start every process with the same recipe file" in lines[0] and "error:" not in results[1][1]
    assert not (tmp_path / "run").exists()
