"""`lora-causal {train,validate,show,inspect,merge,generate,bench,cache,check-serving,export}`: argument parsing and dispatch only.

Problems with the user's input (`UserError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lora_causal import __version__
from lora_causal.errors import DISK_ERRNOS, ReportedElsewhere, RunInterrupted, UserError, disk_errno

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-causal", description="QLoRA fine-tuning of causal LMs from strict YAML recipes.")
    parser.add_argument("--version", action="version", version=f"lora_causal {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    overrides_help = "recipe overrides such as train.learning_rate=1e-4 (values are YAML)"

    train = commands.add_parser("train", help="train a LoRA adapter from a recipe")
    train.add_argument("recipe", help="path to a YAML recipe")
    train.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)
    train.add_argument("--resume", action="store_true",
                       help="require an unfinished run in output.dir and continue it (rerunning resumes anyway)")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in output.dir")

    validate = commands.add_parser("validate", help="check a recipe and build its configs without loading weights")
    validate.add_argument("recipe", help="path to a YAML recipe")
    validate.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)
    validate.add_argument("--serving", action="append", default=[], metavar="ENGINE",
                          help="also check the adapter this recipe trains against a serving engine: vllm, sglang, "
                               "llamacpp or all (repeatable)")

    show = commands.add_parser("show", help="print a run's summary and write its loss plot (finished or running)")
    show.add_argument("run_dir", metavar="RUN_DIR", help="a run's output.dir")

    inspect = commands.add_parser("inspect", help="show which tokens are trained, dataset statistics and label checks")
    inspect.add_argument("recipe", help="path to a YAML recipe")
    inspect.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)
    inspect.add_argument("--n", type=int, default=5, help="examples to show (default 5)")
    inspect.add_argument("--html", help="also write a self-contained HTML page here")
    inspect.add_argument("--png", help="also write the length histogram as a PNG here")

    bench = commands.add_parser("bench", help="benchmark speed and memory against the stock Hugging Face setup")
    bench.add_argument("--shape", default="tiny", help="tiny, llama-3.2-1b, llama-3.1-8b, qwen2.5-7b, or a config.json")
    bench.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    bench.add_argument("--arms", default="stock,lora_causal",
                       help="comma-separated: stock, lora_causal (the project's defaults), lora_causal+padded, "
                            "lora_causal+packed_sdpa, lora_causal+no_checkpointing, lora_causal+offload (GPU only)")
    bench.add_argument("--micro-batch", type=int, default=4)
    bench.add_argument("--grad-accum", type=int, default=1)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3, help="steps left out of the measurements")
    bench.add_argument("--median", type=int, default=512, help="median example length (lognormal)")
    bench.add_argument("--sigma", type=float, default=0.7, help="lognormal sigma of the example lengths")
    bench.add_argument("--max-length", type=int, default=2048)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--max-context", action="store_true", help="find the longest single sequence under --memory-cap-gib")
    bench.add_argument("--memory-cap-gib", type=float, default=24.0)
    bench.add_argument("--context-lengths", help="with --max-context: probe these comma-separated lengths, no bisection")
    bench.add_argument("--profile", action="store_true",
                       help="profile each arm's last warm-up step (torch.profiler) into profile-ARM.txt")

    merge = commands.add_parser("merge", help="merge an adapter into its base model and measure the merge")
    merge.add_argument("source", metavar="RUN_DIR_OR_ADAPTER", help="a run directory or an adapter folder")
    merge.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")
    merge.add_argument("--base", choices=["original", "nf4-roundtrip"], default="original",
                       help="original: pristine base weights (serving); nf4-roundtrip: the NF4 weights training saw")
    merge.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    merge.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    merge.add_argument("--prompt", action="append", default=[], help="a prompt to measure on (repeatable)")
    merge.add_argument("--num-prompts", type=int, default=8, help="examples drawn from the run's data otherwise")
    merge.add_argument("--base-model", help="override the base model named by the run or adapter")
    merge.add_argument("--revision", help="revision of --base-model")

    generate = commands.add_parser("generate", help="sample from a merged model, a run directory or an adapter")
    generate.add_argument("source", metavar="MODEL_DIR_OR_RUN_DIR")
    generate.add_argument("--prompt", required=True, help="rendered like the training prompts (see --raw)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--raw", action="store_true", help="tokenize the prompt as is, without the training format")
    serving = commands.add_parser("check-serving", help="check an adapter or recipe against vLLM, SGLang, llama.cpp")
    serving.add_argument("source", metavar="ADAPTER_OR_RECIPE", help="a run directory, an adapter folder or a recipe")
    serving.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)
    serving.add_argument("--engine", action="append", default=[], required=True,
                         help="vllm, sglang, llamacpp or all (repeatable, or comma-separated)")
    serving.add_argument("--base-model", help="the base model's folder, when the adapter's recorded one is elsewhere")

    export = commands.add_parser("export", help="export a merged model as GGUF, checked against the merged model")
    export.add_argument("source", metavar="RUN_DIR_OR_MERGED", help="a run directory with a merged model, or a merged folder")
    export.add_argument("--format", choices=["gguf"], default="gguf")
    export.add_argument("--type", default="f16", help="f32, f16, bf16, q8_0, or a K-quant (q4_k_m, q5_k_m, q6_k, ...) when "
                        "llama.cpp's llama-quantize is installed")
    export.add_argument("--out", help="the .gguf file to write (default: MERGED/model-TYPE.gguf)")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.add_argument("--prompt", action="append", default=[], help="a prompt to compare on (repeatable)")
    export.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile next to the file")
    export.add_argument("--converter", choices=["auto", "builtin", "llama.cpp"], default="auto",
                        help="builtin: lora_causal's writer (llama, mistral, qwen2); llama.cpp: convert_hf_to_gguf.py "
                             "from $LLAMA_CPP_DIR; auto: builtin where supported, else llama.cpp")
    cache = commands.add_parser("cache", help="manage the prepared (tokenized) data cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    clear = cache_commands.add_parser("clear", help="delete every prepared dataset in the cache folder")
    clear.add_argument("--dir", help="the cache folder (default: $LORA_CAUSAL_CACHE/data or ~/.cache/lora_causal/data)")
    return parser


def _cache_clear(folder: str | None) -> None:

    from lora_causal.paths import check_can_create, expand
    from lora_causal.prepare import clear_cache, default_cache_dir

    if folder is not None and not folder.strip():
        raise UserError("--dir: give the cache folder, or leave --dir out for the default one")
    target = expand(folder, "--dir") if folder else default_cache_dir()
    check_can_create(target, "--dir", "folder")
    removed, size = clear_cache(target)
    print(f"removed {removed} prepared datasets ({size / 2**20:.1f} MiB) from {target}")


def _quiet_libraries() -> None:
    """Keep library chatter (deprecation notes, kernel hub hints) out of the way of our own messages."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # progress bars redraw with carriage returns: noise in a log file or a pipe
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _validate(recipe_path: str, overrides: Sequence[str], serving: Sequence[str] = ()) -> int:
    import json

    from lora_causal.batching import plan_for_recipe
    from lora_causal.config import load_recipe
    from lora_causal.preflight import check_before_loading
    from lora_causal.trainer import describe_configs

    recipe = load_recipe(recipe_path, overrides)
    model_config = check_before_loading(recipe)
    configs = describe_configs(recipe)
    print(recipe.to_yaml(), end="")
    print("# built without loading weights:")
    for name, built in configs.items():
        print(f"# {name}: {json.dumps(built, default=str)}")
    print(f"# {plan_for_recipe(recipe, config=model_config).line()}")
    print(f"# recipe is valid (fingerprint {recipe.fingerprint()})")
    if serving:
        from lora_causal.serving.check import check_serving, format_results, parse_engines

        facts, results = check_serving(recipe_path, parse_engines(list(serving)), overrides)
        print("\n".join(f"# {line}" for line in format_results(facts, results).splitlines()))
        return 0 if all(result.ok for result in results) else 1
    return 0


def _check_serving(args: argparse.Namespace) -> int:
    from lora_causal.serving.check import check_serving, format_results, parse_engines

    facts, results = check_serving(args.source, parse_engines(args.engine), args.overrides, args.base_model)
    print(format_results(facts, results))
    return 0 if all(result.ok for result in results) else 1


def _export(args: argparse.Namespace) -> int:
    from lora_causal.serving.export import export_gguf, format_export_report

    report = export_gguf(args.source, args.type, out=args.out, force=args.force, prompts=args.prompt,
                         modelfile=not args.no_modelfile, converter=args.converter)
    print(format_export_report(report))
    return 0


def _train(recipe_path: str, overrides: Sequence[str], resume: bool = False, overwrite: bool = False) -> None:
    from rich.console import Console

    from lora_causal.config import load_recipe
    from lora_causal.train import run_training

    console = Console(highlight=False, soft_wrap=True)
    recipe = load_recipe(recipe_path, [*overrides, *(["output.overwrite=true"] if overwrite else [])])
    result = run_training(recipe, say=console.print, require_resume=resume)
    if not result.is_main_process:
        return
    from lora_causal.summary import LOSS_PLOT, print_summary, read_run, summarize

    print_summary(console, summarize(*read_run(result.run_dir)), result.run_dir, result.run_dir / LOSS_PLOT)
    if result.samples:
        from rich.table import Table

        table = Table(title="answers to output.sample_prompts", show_lines=True)
        for column in ("prompt", "before training", "after training"):
            table.add_column(column, overflow="fold")
        for sample in result.samples:
            table.add_row(sample["prompt"], sample["before"], sample["after"])
        console.print(table)
    console.print(f"adapter saved to {result.run_dir / 'adapter'}")
    if result.merge_report is not None:
        from lora_causal.merge import format_report

        console.print(format_report(result.merge_report))
        console.print(f"merged model saved to {result.merge_report['out']}")


def _show(run_dir: str) -> None:
    from rich.console import Console

    from lora_causal.paths import expand
    from lora_causal.summary import show_run

    show_run(expand(run_dir, "RUN_DIR"), Console(highlight=False, soft_wrap=True))


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from lora_causal.checks import enforce
    from lora_causal.config import load_recipe
    from lora_causal.inspection import inspect_recipe

    from lora_causal.paths import check_can_create, expand

    if args.n < 1:
        raise UserError("--n must be at least 1")
    outputs: dict[str, Path | None] = {"--html": None, "--png": None}
    for option, value in (("--html", args.html), ("--png", args.png)):
        if value is not None:
            if not value.strip():
                raise UserError(f"{option}: give a file name")
            outputs[option] = expand(value, option)
            check_can_create(outputs[option], option, "file")
    if outputs["--html"] is not None and outputs["--html"] == outputs["--png"]:
        raise UserError("--html and --png name the same file; give each its own")
    recipe = load_recipe(args.recipe, args.overrides)
    console = Console(highlight=False, soft_wrap=False, width=None)
    findings = inspect_recipe(recipe, args.n, console, outputs["--html"], outputs["--png"])
    enforce(findings)  # a failed check is reported once more, as the one error line, with exit status 2
    return 0


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lora_causal.bench import ARMS, markdown_table, run_bench, run_max_context

    arms = tuple(arm.strip() for arm in args.arms.split(",") if arm.strip())
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms: unknown arm {unknown[0] if unknown else '(none)'}; choose from {', '.join(ARMS)}")
    from lora_causal.paths import check_can_create, expand

    for name in ("micro_batch", "grad_accum", "steps", "median", "max_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    for name in ("sigma", "memory_cap_gib"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    _check_seed(args.seed)
    if not args.out.strip():
        raise UserError("--out: give a folder")
    args.out = str(expand(args.out, "--out"))
    check_can_create(Path(args.out), "--out", "folder")
    command = " ".join(["lora-causal", *sys.argv[1:]])
    lengths = None
    if args.context_lengths:
        try:
            lengths = [int(value) for value in args.context_lengths.split(",") if value.strip()]
        except ValueError:
            raise UserError(f"--context-lengths: '{args.context_lengths}' is not a comma-separated list of integers") from None
        if not lengths or min(lengths) < 1:
            raise UserError("--context-lengths: give positive token counts, such as 32768,81920")
    if args.max_context:
        report = run_max_context(args.shape, Path(args.out), args.memory_cap_gib, arms, seed=args.seed, command=command,
                                 lengths=lengths)
        print((Path(args.out) / "max_context.md").read_text(), end="")
        return
    report = run_bench(args.shape, Path(args.out), arms, args.micro_batch, args.grad_accum, args.steps, args.warmup,
                       args.median, args.sigma, args.max_length, args.seed, command=command, profile=args.profile)
    print(markdown_table(report), end="")
    if "speedup_vs_stock" in report:
        ratios = ", ".join(f"{arm} {ratio}x" for arm, ratio in report["speedup_vs_stock"].items() if arm != "stock")
        print(f"tokens/s vs stock: {ratios}; same tokens trained by every arm: {report.get('same_tokens')}")
    print(f"written to {args.out}/bench.json, bench.md, bench.png")


def _merge(args: argparse.Namespace) -> None:
    from lora_causal.merge import format_report, merge_adapter

    if args.num_prompts < 1:
        raise UserError("--num-prompts must be at least 1")
    if any(not prompt.strip() for prompt in args.prompt):
        raise UserError("--prompt: an empty prompt measures nothing; give text, or leave --prompt out to use the run's data")
    if args.revision is not None and args.base_model is None:
        raise UserError("--revision applies to --base-model; pass both, or neither")
    report = merge_adapter(
        args.source, args.out, base=args.base, dtype_name=args.dtype, force=args.force, prompts=args.prompt,
        num_prompts=args.num_prompts, base_model=args.base_model, revision=args.revision,
    )
    print(format_report(report))
    print(f"merged model saved to {args.out}")


def _generate(args: argparse.Namespace) -> None:
    from lora_causal.generation import generate_text

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not args.prompt.strip():
        raise UserError("--prompt: the prompt is empty; give the text to answer")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, not {args.temperature}")
    _check_seed(args.seed)
    print(generate_text(args.source, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.raw))


def _check_seed(seed: int) -> None:
    from lora_causal.config import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED} (the seeds numpy accepts), not {seed}")


def _say_once(text: str) -> None:
    """Under accelerate launch every process meets the same error: the main one says it, all exit alike."""
    from lora_causal.processes import speaks

    if speaks():
        sys.stderr.write(text)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Arguments; `key=value` overrides may also come after options (`inspect RECIPE --n 1 data.max_length=64`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = hasattr(args, "overrides")
        if not takes_overrides or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    _quiet_libraries()
    try:
        if args.command == "validate":
            return _validate(args.recipe, args.overrides, args.serving)
        elif args.command == "check-serving":
            return _check_serving(args)
        elif args.command == "export":
            return _export(args)
        elif args.command == "show":
            _show(args.run_dir)
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "merge":
            _merge(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "cache":
            _cache_clear(args.dir)
        else:
            _train(args.recipe, args.overrides, args.resume, args.overwrite)
    except UserError as exc:
        _say_once(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except RunInterrupted as exc:
        _say_once(f"{exc}\n")
        return exc.exit_code
    except ReportedElsewhere as exc:  # another process of this launch printed the error
        return exc.exit_code
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            _say_once(f"error: the file system refuses a name as too long: '{exc.filename}'; choose a shorter path\n")
            return EXIT_USER_ERROR
        if exc.errno not in DISK_ERRNOS:
            raise
        _say_once(f"error: {os.strerror(exc.errno).lower()} while writing {exc.filename or 'output'}; free space "
                  "or choose another output folder\n")
        return EXIT_USER_ERROR
    except Exception as exc:  # safetensors reports a full disk with its own exception type
        code = disk_errno(exc)
        if code is None:
            raise
        _say_once(f"error: {os.strerror(code).lower()} while writing weights; free space or choose another output "
                  "folder\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; run the same command again to resume from the last checkpoint\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
