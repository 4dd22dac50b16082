"""The shared cache under stress: racing writers without flock, dead preparers and their workers, silent lock
holders, waiters whose preparer is killed, corrupted entries of the right size, and what `cache clear` removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, base_recipe, free_port, run_cli, write_jsonl, write_recipe

from lora_causal.core.liveness import pid_alive
from lora_causal.core.recipe import DataSection
from lora_causal.data.cache import Entry, clear_cache
from lora_causal.data.dataset import model_columns
from lora_causal.data.prepare import prepare_data

ROWS = [{"prompt": f"Q: What is {a} plus {b}?\nA:", "completion": f" {a + b}."} for a in range(6) for b in range(4)]


def _data(path: Path, cache: Path, **extra) -> DataSection:
    return DataSection.model_validate({"train": {"path": str(path), "format": "prompt_completion"}, "max_length": 64,
                                       "cache_dir": str(cache), **extra})


def _entries(cache: Path) -> list[Path]:
    return [child for child in cache.iterdir() if child.is_dir() and len(child.name) == 32]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


NO_FLOCK = (  # a file system without flock (Lustre without -o flock, some FUSE mounts): every flock call fails so
    "import errno, fcntl\n"
    "def flock(*args):\n"
    "    raise OSError(errno.ENOLCK, 'No locks available')\n"
    "fcntl.flock = flock\n"
)


def _racer(data_path: Path, cache: Path, tokenizer_dir: Path, go: Path, ready: Path) -> subprocess.Popen[str]:
    code = NO_FLOCK + (
        "import json, os, time\n"
        "from pathlib import Path\n"
        "from transformers import AutoTokenizer\n"
        "from lora_causal.core.recipe import DataSection\n"
        "from lora_causal.data.prepare import prepare_data\n"
        f"data = DataSection.model_validate({{'train': {{'path': {str(data_path)!r}, 'format': 'prompt_completion'}},"
        f" 'max_length': 64, 'cache_dir': {str(cache)!r}, 'num_proc': 1}})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})\n"
        f"Path({str(ready)!r}).touch()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.005)\n"
        "prepared = prepare_data(data, tokenizer, 0)\n"
        "print(json.dumps({'fingerprint': prepared.fingerprint, 'examples': len(prepared.train)}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_two_processes_race_on_one_cache_without_flock(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 400)
    cache, go = tmp_path / "cache", tmp_path / "go"
    racers = [_racer(path, cache, tiny_model_dir, go, tmp_path / f"ready{n}") for n in range(2)]
    _wait(lambda: all((tmp_path / f"ready{n}").exists() for n in range(2)), 120, "both racers to load")
    go.touch()
    most_at_once = 0
    while any(racer.poll() is None for racer in racers):
        most_at_once = max(most_at_once, len(list(cache.glob(".*.partial"))) if cache.is_dir() else 0)
        time.sleep(0.01)
    outputs = [racer.communicate() for racer in racers]
    for racer, (out, err) in zip(racers, outputs):
        assert racer.returncode == 0, err[-3000:]
        assert err.count("has no file locks (no locks available)") == 1, err[-2000:]  # one notice, no traceback
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] and results[0]["examples"] == len(ROWS) * 400
    assert most_at_once == 2, "the two preparations did not overlap: the race was not tested"
    assert len(_entries(cache)) == 1 and not list(cache.glob(".*.partial"))
    assert Entry.read(_entries(cache)[0]) is not None


def test_a_corrupted_entry_of_the_right_size_is_not_used(tmp_path: Path, tiny_tokenizer) -> None:
    data = _data(write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache")
    expected = model_columns(prepare_data(data, tiny_tokenizer, 0).train)
    (entry,) = _entries(tmp_path / "cache")
    shard = next(entry.glob("examples-*.arrow"))
    content = bytearray(shard.read_bytes())
    content[-200:-100] = bytes(100)  # zeros where tokens were (a crash before the data reached the disk): same size
    shard.write_bytes(bytes(content))
    assert Entry.read(entry) is None and Entry.read(entry, verify=False) is not None
    assert model_columns(prepare_data(data, tiny_tokenizer, 0).train) == expected
    assert Entry.read(entry) is not None and not list((tmp_path / "cache").glob(".*.partial"))


def test_data_cache_false_keeps_an_identical_entry_in_place(tmp_path: Path, tiny_tokenizer) -> None:
    """Another node may be about to open the entry: a fresh preparation with the same tokens replaces nothing."""
    data = _data(write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache")
    prepare_data(data, tiny_tokenizer, 0)
    (entry,) = _entries(tmp_path / "cache")
    inode = entry.stat().st_ino
    prepare_data(data.model_copy(update={"cache": False}), tiny_tokenizer, 0)
    assert entry.stat().st_ino == inode and not list((tmp_path / "cache").glob(".*.partial"))


def test_cache_clear_removes_every_leftover_of_ours(tmp_path: Path, tiny_tokenizer) -> None:
    cache = tmp_path / "cache"
    prepare_data(_data(write_jsonl(tmp_path / "d.jsonl", ROWS), cache), tiny_tokenizer, 0)
    (entry,) = _entries(cache)
    leftovers = [cache / f".{entry.name}.1234-old.partial", cache / f".{entry.name}.0a1b2c3d-77-0badc0de-old.partial",
                 cache / f".{entry.name}.0a1b2c3d-77-0badc0de.partial"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "rows.arrow").write_bytes(b"x" * 10)
    files = [cache / f".{entry.name}.lock", cache / f".{entry.name}.beat", cache / f".{entry.name}.beat.99.tmp"]
    for file in files:
        file.write_text("{}")
    (cache / "launches").mkdir()
    (cache / "launches" / f"{'a' * 32}-0.beat").write_text("{}")
    (cache / "notes.txt").write_text("mine")
    (cache / ".hidden.partial").mkdir()  # not one of our names
    removed, size = clear_cache(cache)
    assert removed == 1 and size > 30
    assert sorted(child.name for child in cache.iterdir()) == [".hidden.partial", "notes.txt"]


def test_a_silent_lock_holder_is_not_waited_for(tmp_path: Path, tiny_tokenizer) -> None:
    """A process that holds the lock but never shows life (hung, or on a machine whose locks we see): after the
    patience, this process prepares its own copy and says so."""
    from lora_causal.data.cache import data_cache_dir, entry_key, tokenizer_digest
    from lora_causal.data.sources import Source

    data = _data(write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache")
    key = entry_key(Source.resolve(data.train, "data.train").identity(), data.train, "prompt_completion", data,
                    tokenizer_digest(tiny_tokenizer))
    lock = data_cache_dir(data) / f".{key}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"handle = os.open({str(lock)!r}, os.O_CREAT | os.O_RDWR)\n"
                               "fcntl.flock(handle, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        said: list[str] = []
        start = time.monotonic()
        prepared = prepare_data(data, tiny_tokenizer, 0, say=said.append, patience_s=1.0)
        assert time.monotonic() - start < 30 and len(prepared.train) == len(ROWS)
        assert said[0].startswith("waiting for another process") and "gave no sign of life for" in said[1], said
    finally:
        holder.kill()
        holder.wait()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_kill_9_of_the_preparer_alone_then_a_rerun_prepares_and_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Its tokenizing workers die with it and hold no lock: the rerun does not wait for anyone."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 2000)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1})
    tree["data"].update(cache_dir=str(tmp_path / "cache"), num_proc=2)
    tree["output"]["sample_prompts"] = []
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    first = subprocess.Popen([sys.executable, "-m", "lora_causal", "train", str(recipe)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: list((tmp_path / "cache").glob(".*.partial/examples-*.arrow")) or first.poll() is not None, 180,
              "the workers to start tokenizing")
        workers = _children(first.pid)
        assert first.poll() is None and len(workers) >= 2, "the preparation ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)  # the preparer alone, not its process group
        first.wait()
        _wait(lambda: not any(pid_alive(pid) for pid in workers), 10, "the orphaned workers to die")
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    rerun = run_cli("train", str(recipe), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "waiting for another process" not in rerun.stdout + rerun.stderr
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "completed"




@pytest.mark.slow
def test_waiters_of_a_killed_preparer_end_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two processes started by hand (no launcher kills the survivor): kill -9 of the preparing rank 0; rank 1
    stops waiting at once, with one line that says what happened and what to do."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 2000)
    tree = base_recipe(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 1, "collective_timeout_s": 600})
    tree["data"].update(cache_dir=str(tmp_path / "cache"), num_proc=1)
    recipe = write_recipe(tmp_path / "recipe.yaml", tree)
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "lora_causal", "train", str(recipe)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait(lambda: list((tmp_path / "cache").glob(".*.partial/rows.arrow")) or ranks[0].poll() is not None, 180,
              "rank 0 to start preparing")
        assert ranks[0].poll() is None and ranks[1].poll() is None
        os.kill(ranks[0].pid, signal.SIGKILL)
        ranks[0].wait()
        killed = time.monotonic()
        _, err = ranks[1].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for process in ranks:
            process.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert ranks[1].returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: the process that prepares the data on this machine ended (process ")
    assert "run the same command again" in lines[0] and waited < 30
