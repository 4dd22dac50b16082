"""The command line's grammar: every `lora-causal` subcommand, its arguments, options and help text.

A usage error prints one `error:` line naming the fix (see `--help`) and exits with status 2, like every other
problem with the user's input.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from lora_causal import __version__

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The `lora-causal` parser: every subcommand with its arguments and help."""
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
                            "lora_causal+packed_sdpa, lora_causal+no_checkpointing, lora_causal+no_budget, "
                            "lora_causal+budget_x2, lora_causal+liger (GPU, liger-kernel), lora_causal+offload (GPU), "
                            "lora_causal+offload_liger (GPU)")
    bench.add_argument("--micro-batch", type=int, default=4)
    bench.add_argument("--grad-accum", type=int, default=4,
                       help="examples per optimizer step = micro-batch x this (default 4 x 4 = 16, a realistic global batch)")
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
