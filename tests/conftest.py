"""Shared fixtures: offline environment, a tiny tokenizer and Llama-shaped model saved to disk, recipe helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several workers: a thread each (and for the processes they start)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "the dog likes food",
    "the cat likes milk",
    "Q: What is two plus two?\nA: four.",
    "Q: What color is the sky?\nA: blue.",
    "Q: What do cows drink?\nA: water.",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "system user assistant You are helpful. Hi there! Hello! How are you? Fine, thanks.",
]
QA_ROWS = [
    {"prompt": "Q: What is two plus two?\nA:", "completion": " four."},
    {"prompt": "Q: What color is the sky?\nA:", "completion": " blue."},
    {"prompt": "Q: What do cows drink?\nA:", "completion": " water."},
    {"prompt": "Q: What does the dog like?\nA:", "completion": " food."},
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LORA_CAUSAL_CACHE"] = str(tmp_path_factory.mktemp("lora-causal-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (random weights, init range 0.1) with a byte-level BPE tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_causal.model.synthetic import train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tiny_tokenizer(CORPUS, vocab_size=300)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def base_recipe(model_dir: Path, data_path: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small valid recipe tree; keyword sections are merged over the defaults."""
    recipe: dict[str, Any] = {
        "recipe_version": 1,
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"mode": "nf4"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": {"path": str(data_path), "format": "prompt_completion"}, "max_length": 64},
        "train": {"max_steps": 4, "micro_batch_size": 2, "learning_rate": 1.0e-3, "logging_steps": 1, "seed": 0},
        "output": {"dir": str(output_dir), "save_steps": 2},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def write_recipe(path: Path, tree: Any) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False) if not isinstance(tree, str) else tree, encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m lora_causal ARGS` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lora_causal", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port nobody listens on now (for a launch's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(*args: str) -> list[str]:
    """`accelerate launch ARGS` on a rendezvous port of its own (unless ARGS name one): launches from tests running
    side by side (pytest-xdist workers) never meet on accelerate's default port."""
    port = [] if "--main_process_port" in args else ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *port, *args]


def call_cli(args: list[str]) -> int:
    """`lora_causal.cli.main` in this process; argparse's own exits become return codes."""
    from lora_causal.cli import main

    try:
        return main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def assert_one_line_error(code: int, err: str, pattern: str, out: str = "", after_progress: bool = False) -> str:
    """Exit status 2, exactly one non-empty stderr line starting with 'error: ' and matching `pattern`, no traceback.

    `after_progress`: the failure came mid-run, so progress-bar output (tqdm lines) may precede the error line.
    """
    import re

    if after_progress:
        err = "\n".join(re.sub(r"[^\r\n]*(\d+%\||it/s\]|s/it\])[^\r\n]*", "", line) for line in err.split("\n"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err + out
    return lines[0]
