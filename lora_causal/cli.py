"""`lora-causal {train,validate}`: argument parsing and dispatch only.

Problems with the user's input (`UserError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lora_causal import __version__
from lora_causal.errors import UserError

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
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)

    validate = commands.add_parser("validate", help="check a recipe and build its configs without loading weights")
    validate.add_argument("recipe", help="path to a YAML recipe")
    validate.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (deprecation notes, kernel hub hints) out of the way of our own messages."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _validate(recipe_path: str, overrides: Sequence[str]) -> None:
    import json

    from lora_causal.config import load_recipe
    from lora_causal.train import describe_configs

    recipe = load_recipe(recipe_path, overrides)
    configs = describe_configs(recipe)
    print(recipe.to_yaml(), end="")
    print("# built without loading weights:")
    for name, config in configs.items():
        print(f"# {name}: {json.dumps(config, default=str)}")
    print(f"# recipe is valid (fingerprint {recipe.fingerprint()})")


def _train(recipe_path: str, overrides: Sequence[str]) -> None:
    from rich.console import Console

    from lora_causal.config import load_recipe
    from lora_causal.train import run_training

    console = Console(highlight=False)
    recipe = load_recipe(recipe_path, overrides)
    result = run_training(recipe, say=console.print)
    if result.losses:
        console.print(
            f"loss: {result.losses[0]:.4f} at the first step -> {result.losses[-1]:.4f} at the last "
            f"({len(result.losses)} logged steps)"
        )
    if result.samples:
        from rich.table import Table

        table = Table(title="answers to output.sample_prompts", show_lines=True)
        for column in ("prompt", "before training", "after training"):
            table.add_column(column, overflow="fold")
        for sample in result.samples:
            table.add_row(sample["prompt"], sample["before"], sample["after"])
        console.print(table)
    console.print(f"adapter saved to {result.run_dir / 'adapter'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "validate":
            _validate(args.recipe, args.overrides)
        else:
            _train(args.recipe, args.overrides)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; run the same command again to resume from the last checkpoint\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
