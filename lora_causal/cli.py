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

from lora_causal.arguments import EXIT_USER_ERROR, build_parser
from lora_causal.core.errors import DISK_ERRNOS, ReportedElsewhere, RunInterrupted, UserError, disk_errno


def _cache_clear(folder: str | None) -> None:

    from lora_causal.core.paths import check_can_create, expand
    from lora_causal.data.cache import clear_cache, clear_named_cache, default_cache_dir

    if folder is not None and not folder.strip():
        raise UserError("--dir: give the cache folder, or leave --dir out for the default one")
    target = expand(folder, "--dir") if folder else default_cache_dir()
    check_can_create(target, "--dir", "folder")
    if folder and not target.is_dir():
        raise UserError(f"--dir: '{target}' is not a folder; give the data cache folder (data.cache_dir, or "
                        "$LORA_CAUSAL_CACHE/data), or leave --dir out for the default one")
    removed, size, target = clear_named_cache(target) if folder else (*clear_cache(target), target)
    print(f"removed {removed} prepared dataset{'' if removed == 1 else 's'} ({size / 2**20:.1f} MiB) from {target}")


def _quiet_libraries() -> None:
    """Keep library chatter (deprecation notes, kernel hub hints) out of the way of our own messages."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # progress bars redraw with carriage returns: noise in a log file or a pipe
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # e.g. "Flattening the indices"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _validate(recipe_path: str, overrides: Sequence[str], serving: Sequence[str] = ()) -> int:
    import json

    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.training.plan import budget_line
    from lora_causal.training.preflight import plan_run
    from lora_causal.training.trainer import describe_configs

    if serving:  # the engines are named right before anything is read or printed
        from lora_causal.serving.check import parse_engines

        engines = parse_engines(list(serving))
    recipe = load_recipe(recipe_path, overrides)
    plan = plan_run(recipe)
    configs = describe_configs(plan.as_run)
    print(recipe.to_yaml(), end="")
    print("# built without loading weights:")
    for name, built in configs.items():
        print(f"# {name}: {json.dumps(built, default=str)}")
    print(f"# {plan.batching.line()}")
    budget = budget_line(plan.as_run)
    if budget:
        print(f"# {budget}")
    print(f"# recipe is valid (fingerprint {recipe.fingerprint()})")
    if serving:
        from lora_causal.serving.check import check_serving, format_results

        facts, results = check_serving(recipe_path, engines, overrides)
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

    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.training.run import run_training

    console = Console(highlight=False, soft_wrap=True)
    try:
        recipe = load_recipe(recipe_path, [*overrides, *(["output.overwrite=true"] if overwrite else [])])
    except UserError as exc:
        from lora_causal.core.processes import share_startup_error

        share_startup_error(exc)  # launched processes: the main one learns why this one cannot start
        raise
    result = run_training(recipe, say=console.print, require_resume=resume)
    if not result.is_main_process:
        return
    from lora_causal.training.summary import LOSS_PLOT, print_summary, read_run, summarize

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
        from lora_causal.serving.merging import format_report

        console.print(format_report(result.merge_report))
        console.print(f"merged model saved to {result.merge_report['out']}")


def _show(run_dir: str) -> None:
    from rich.console import Console

    from lora_causal.core.paths import expand
    from lora_causal.training.summary import show_run

    show_run(expand(run_dir, "RUN_DIR"), Console(highlight=False, soft_wrap=True))


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from lora_causal.commands.inspection import inspect_recipe
    from lora_causal.core.paths import check_can_create, expand
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.data.checks import enforce

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

    from lora_causal.commands.bench import markdown_table, run_bench, run_max_context
    from lora_causal.commands.bench_arms import ARMS

    arms = tuple(arm.strip() for arm in args.arms.split(",") if arm.strip())
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms: unknown arm {unknown[0] if unknown else '(none)'}; choose from {', '.join(ARMS)}")
    repeated = next((arm for index, arm in enumerate(arms) if arm in arms[:index]), None)
    if repeated:
        raise UserError(f"--arms: {repeated} is named twice; name each arm once (each runs in a fresh process anyway)")
    from lora_causal.core.paths import check_can_create, expand

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
    from lora_causal.serving.merging import format_report, merge_adapter

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
    from lora_causal.commands.generate import generate_text

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not args.prompt.strip():
        raise UserError("--prompt: the prompt is empty; give the text to answer")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, not {args.temperature}")
    _check_seed(args.seed)
    print(generate_text(args.source, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.raw))


def _check_seed(seed: int) -> None:
    from lora_causal.core.recipe import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED} (the seeds numpy accepts), not {seed}")


def _say_once(text: str, own: bool = False) -> None:
    """Under accelerate launch every process meets the same error: the main one says it, all exit alike. An error
    only this process met (`own`: the process it waited for is gone) is said by this process."""
    from lora_causal.core.processes import speaks

    if own or speaks():
        sys.stderr.write(text)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Arguments; `key=value` overrides may also come after options (`inspect RECIPE --n 1 data.max_length=64`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = hasattr(args, "overrides")
        if not takes_overrides or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from lora_causal.core.processes import gpu_memory_defaults

    gpu_memory_defaults()
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
        _say_once(f"error: {exc}\n", exc.own)
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
    except KeyboardInterrupt:  # a running trainer saves on a signal and says so itself; this is everything else
        resume = ("; run the same command again: it resumes from the last complete checkpoint if the run has one, "
                  "else starts afresh") if args.command == "train" else ""
        sys.stderr.write(f"interrupted{resume}\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
