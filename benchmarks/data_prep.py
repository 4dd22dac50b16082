"""Data preparation benchmark: lora_causal's cached, parallel preparation vs TRL's SFTTrainer preparation.

    python benchmarks/data_prep.py all --out benchmarks/results/<date>-cpu-data-prep [--rows 200000 --chats 50000]

Writes synthetic data (prompt/completion rows of ~420 tokens and 4-8 turn chats, seeded), then measures, each in
a fresh process: lora_causal's first preparation (empty cache) and second (cache hit), TRL's default preparation
(`load_dataset("json")` + `SFTTrainer`, first with an empty datasets cache and again with it warm), and both
preparations under `accelerate launch` with 2 processes (peak RSS of each rank). The tokenizer is the demo's
(recipes/demo/tiny-llama). Results: results.json and README.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "demo" / "tiny-llama"
WORDS = ("the quick brown fox jumps over lazy dog river bank city capital country people water food music "
         "history science model answer question because however therefore small large early late north south").split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_data(folder: Path, rows: int, chats: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pc, chat = folder / "prompt_completion.jsonl", folder / "chats.jsonl"
    with pc.open("w") as out:
        for _ in range(rows):
            prompt = f"Q: {_sentence(rng, rng.randint(20, 60))}\nA:"
            completion = " " + " ".join(_sentence(rng, rng.randint(8, 16)) for _ in range(rng.randint(3, 6)))
            out.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    with chat.open("w") as out:
        for _ in range(chats):
            turns = rng.randint(4, 8)
            messages = [{"role": "user" if t % 2 == 0 else "assistant", "content": _sentence(rng, rng.randint(8, 40))}
                        for t in range(turns)]
            out.write(json.dumps({"messages": messages}) + "\n")
    return {"prompt_completion": str(pc), "messages": str(chat)}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data_section(path: str, fmt: str, cache: str, max_length: int) -> object:
    from lora_causal.core.recipe import DataSection

    return DataSection.model_validate({"train": {"path": path, "format": fmt}, "max_length": max_length,
                                       "cache_dir": cache})


def run_ours(path: str, fmt: str, cache: str, max_length: int) -> dict:
    from transformers import AutoTokenizer

    from lora_causal.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    start = time.perf_counter()
    prepared = prepare_data(_data_section(path, fmt, cache, max_length), tokenizer, 0)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(_peak_rss_mib()), "worker_peak_rss_mib": round(children),
            "examples": len(prepared.train), "tokens": prepared.train_report.tokens}


def run_shared(path: str, fmt: str, cache: str, max_length: int) -> dict:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from lora_causal.data.prepare import prepare_shared

    state = PartialState(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    start = time.perf_counter()
    prepared = prepare_shared(_data_section(path, fmt, cache, max_length), tokenizer, 0, state)
    total = sum(1 for _ in prepared.train.dataset.select_columns(["length"]).iter(batch_size=4096))  # touch every row
    seconds = time.perf_counter() - start
    result = {"rank": state.process_index, "seconds": round(seconds, 2), "peak_rss_mib": round(_peak_rss_mib()),
              "examples": len(prepared.train), "batches_read": total}
    state.destroy_process_group()
    return result


def run_trl(path: str, fmt: str, hf_cache: str) -> dict:
    os.environ["HF_DATASETS_CACHE"] = hf_cache
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lora_causal.model.synthetic import materialize_random_model

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = AutoModelForCausalLM.from_pretrained(materialize_random_model(TOKENIZER, 0))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        dataset = load_dataset("json", data_files=path, split="train")
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=out, report_to="none", use_cpu=True),
                             train_dataset=dataset, processing_class=tokenizer)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(_peak_rss_mib()), "examples": len(trainer.train_dataset),
            "max_length": trainer.args.max_length, "dataset_num_proc": trainer.args.dataset_num_proc}


def _in_process(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _launched(*args: str) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), __file__, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"launch failed: {result.stderr[-3000:]}")
    return sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')),
                  key=lambda r: r["rank"])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def run_all(out: Path, rows: int, chats: int, max_length: int, skip_trl: bool) -> dict:
    from importlib import metadata

    work = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    try:
        files = make_data(work / "data", rows, chats)
        report: dict = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "system": platform.platform()},
            "versions": {name: metadata.version(name) for name in
                         ("lora_causal", "transformers", "tokenizers", "datasets", "trl", "pyarrow", "accelerate")},
            "rows": {"prompt_completion": rows, "messages": chats}, "max_length": max_length,
            "load_before": _load(), "results": {},
        }
        for fmt, path in files.items():
            results = report["results"][fmt] = {"file_mib": round(Path(path).stat().st_size / 2**20, 1)}
            cache = str(work / f"cache-{fmt}")
            results["ours_first"] = _in_process("ours", path, fmt, cache, str(max_length))
            results["ours_second"] = _in_process("ours", path, fmt, cache, str(max_length))
            shared_cache = str(work / f"cache-shared-{fmt}")
            results["ours_2proc_first"] = _launched("shared", path, fmt, shared_cache, str(max_length))
            results["ours_2proc_second"] = _launched("shared", path, fmt, shared_cache, str(max_length))
            if not skip_trl:
                hf_cache = str(work / f"hf-{fmt}")
                results["trl_first"] = _in_process("trl", path, fmt, hf_cache)
                results["trl_second"] = _in_process("trl", path, fmt, hf_cache)
                results["speedup_first_vs_trl"] = round(results["trl_first"]["seconds"] / results["ours_first"]["seconds"], 2)
            report["load_during"] = _load()
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    every = sub.add_parser("all")
    every.add_argument("--out", required=True)
    every.add_argument("--rows", type=int, default=200_000)
    every.add_argument("--chats", type=int, default=50_000)
    every.add_argument("--max-length", type=int, default=1024)
    every.add_argument("--skip-trl", action="store_true")
    for name in ("ours", "shared"):
        one = sub.add_parser(name)
        for argument in ("path", "fmt", "cache", "max_length"):
            one.add_argument(argument)
    trl = sub.add_parser("trl")
    for argument in ("path", "fmt", "hf_cache"):
        trl.add_argument(argument)
    args = parser.parse_args()
    if args.command == "all":
        print(json.dumps(run_all(Path(args.out), args.rows, args.chats, args.max_length, args.skip_trl), indent=1))
    elif args.command == "ours":
        print(json.dumps(run_ours(args.path, args.fmt, args.cache, int(args.max_length))))
    elif args.command == "shared":
        print(json.dumps(run_shared(args.path, args.fmt, args.cache, int(args.max_length))))
    else:
        print(json.dumps(run_trl(args.path, args.fmt, args.hf_cache)))


if __name__ == "__main__":
    main()
