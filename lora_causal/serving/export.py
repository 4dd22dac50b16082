"""`lora-causal export RUN_OR_MERGED --format gguf --type TYPE`: a merged model as a GGUF file, with an Ollama
Modelfile and a parity report (export_report.json), written to a new folder only when the parity check passes.

Pipeline: find the merged model (a run's merged folder, or a merged folder), write the GGUF into a staging folder
(our writer, or llama.cpp's converter from LLAMA_CPP_DIR), read it back and compare it with the merged model
(lora_causal.serving.parity), then rename the staging folder into place. K-quants are made by llama.cpp's
quantizer from an f16 file that passed the check first, and are checked again. A failed check removes the staging
folder: nothing is left that looks like an export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lora_causal.core.errors import UserError

REPORT = "export_report.json"
REPORT_FORMAT = "lora_causal-export-report"
CONVERTERS = ("auto", "builtin", "llama.cpp")


def find_merged(path: str) -> Path:
    """The merged model of a run directory, or a merged (plain transformers) model folder."""
    from lora_causal.core.paths import expand
    from lora_causal.core.recipe_file import load_recipe
    from lora_causal.core.rundir import is_merged_dir, is_run_dir

    folder = expand(path, "RUN_DIR_OR_MERGED")
    if not folder.exists():
        raise UserError(f"'{folder}' does not exist; give a run directory with a merged model, or a merged model folder")
    if is_run_dir(folder):
        recipe = load_recipe(folder / "recipe.yaml")
        configured = Path(recipe.output.merge.dir) if recipe.output.merge else Path("merged")
        candidates = [configured if configured.is_absolute() else folder / configured, folder / "merged"]
        candidates += sorted(child for child in folder.iterdir() if child.is_dir())
        for candidate in candidates:
            if is_merged_dir(candidate):
                return candidate
        raise UserError(f"the run in '{folder}' has no merged model; merge it first: lora-causal merge {folder} "
                        f"--out {folder / 'merged'}")
    if (folder / "adapter_config.json").is_file():
        raise UserError(f"'{folder}' is a LoRA adapter, not a merged model; merge it first: lora-causal merge {folder} --out MERGED")
    if not (folder / "config.json").is_file() or next(folder.glob("*.safetensors"), None) is None:
        raise UserError(f"'{folder}' is neither a lora_causal run directory nor a model folder (config.json and "
                        "*.safetensors); give the folder written by `lora-causal merge`")
    return folder


def default_out(path: str, merged: Path, kind: str) -> Path:
    from lora_causal.core.paths import expand
    from lora_causal.core.rundir import is_run_dir

    source = expand(path, "RUN_DIR_OR_MERGED")
    return source / f"gguf-{kind}" if is_run_dir(source) else merged.with_name(f"{merged.name}-gguf-{kind}")


def check_out(out: Path, force: bool) -> None:
    """A new or empty folder; --force replaces only an earlier export (a folder with our export report)."""
    import json

    from lora_causal.core.paths import check_can_create

    check_can_create(out, "--out", "folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"output folder '{out}' exists and is not empty; choose another --out or pass --force")
        try:
            ours = json.loads((out / REPORT).read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"--out: '{out}' is not empty and holds no lora_causal export (--force replaces only an "
                            "earlier export); choose a new or empty folder")
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out: '{out}' is a file; give a folder for the GGUF file, its Modelfile and report")


def _plan(merged: Path, kind: str, converter: str) -> tuple[str, str, Path | None]:
    """(converter used, type written first, quantizer) after refusing what cannot be done, before any work."""
    from lora_causal.serving.gguf_writer import FAMILIES, WRITER_TYPES, check_supported, read_config
    from lora_causal.serving.quantize import KQUANTS, find_converter, require_quantizer

    if kind not in (*WRITER_TYPES, *KQUANTS):
        raise UserError(f"--type {kind}: choose from {', '.join(WRITER_TYPES)}, or a K-quant ({', '.join(KQUANTS)})")
    if converter not in CONVERTERS:
        raise UserError(f"--converter must be one of {', '.join(CONVERTERS)}, not '{converter}'")
    config = read_config(merged)
    if config.get("quantization_config"):
        check_supported(config)  # the bitsandbytes refusal
    quantizer = require_quantizer(kind) if kind in KQUANTS else None
    first = "f16" if quantizer else kind
    if converter == "auto":
        converter = "builtin" if config.get("model_type") in FAMILIES else "llama.cpp"
    if converter == "builtin":
        check_supported(config)
    else:
        try:
            find_converter()
        except UserError as exc:
            raise UserError(f"the GGUF writer supports {', '.join(FAMILIES)} models and this is a "
                            f"{config.get('model_type')} model; {exc}") from None
    return converter, first, quantizer


def export_gguf(  # noqa: PLR0913
    path: str, kind: str = "f16", out: str | None = None, force: bool = False, prompts: list[str] | None = None,
    modelfile: bool = True, converter: str = "auto", say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, check and (only when the check passes) keep. Returns the report, also saved as OUT/export_report.json."""
    from lora_causal.core.paths import expand
    from lora_causal.core.rundir import package_versions, write_dir_atomic, write_json_atomic, write_text_atomic
    from lora_causal.serving import gguf_writer, quantize
    from lora_causal.serving.merging import public_reference
    from lora_causal.serving.modelfile import modelfile_text, ollama_template
    from lora_causal.serving.parity import compare_export

    kind = kind.strip().lower()
    if any(not prompt.strip() for prompt in prompts or []):
        raise UserError("--prompt: an empty prompt measures nothing; give text, or leave --prompt out")
    merged = find_merged(path)
    target = expand(out, "--out") if out else default_out(path, merged, kind)
    check_out(target, force)
    converter, first, quantizer = _plan(merged, kind, converter)
    _require_reader()
    name = f"{gguf_writer.model_name(merged)}-{kind}.gguf"
    report: dict[str, Any] = {"format": REPORT_FORMAT, "version": 1, "type": kind, "file": name, "converter": converter,
                              "source": public_reference(merged, target.resolve())}

    def write(staging: Path) -> None:
        first_file = staging / (name if first == kind else f"intermediate-{first}.gguf")
        say(f"exporting {merged} as GGUF ({first}, {converter} converter)")
        if converter == "builtin":
            report["writer"] = gguf_writer.write_gguf(merged, first_file, first, say=say)
        else:
            quantize.convert(quantize.find_converter(), merged, first_file, first)
        parity = compare_export(merged, first_file, first, prompts or [], say=say)
        if quantizer is not None:
            report["intermediate_f16_parity"] = parity
            if parity["passed"]:
                say(f"quantizing to {kind} with {quantizer}")
                report["quantizer_log"] = quantize.quantize(quantizer, first_file, staging / name, kind)
                first_file.unlink()
                parity = compare_export(merged, staging / name, kind, prompts or [], say=say)
        report["parity"] = parity
        report["size_bytes"] = (staging / name).stat().st_size if (staging / name).exists() else None
        report["versions"] = package_versions(("gguf", "transformers", "torch", "llama_cpp_python"), missing="not installed")
        if not parity["passed"]:
            say(format_export_report(report))
            raise UserError(f"the exported file does not reproduce the merged model ({'; '.join(parity['failures'])}); "
                            "nothing was written; report this with the lines above")
        if modelfile:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(merged)
            template = ollama_template(tokenizer)
            stops = list(parity["stop_token_ids"]["texts"]) + (["<|im_end|>"] if template else [])
            write_text_atomic(staging / "Modelfile", modelfile_text(name, stops, template))
            report["modelfile"] = {"file": "Modelfile", "template": "chatml" if template else None,
                                   "stops": list(dict.fromkeys(stops))}
        write_json_atomic(staging / REPORT, report)

    write_dir_atomic(target.resolve(), write)
    return {**report, "out": str(target)}


def _require_reader() -> None:
    """The parity check reads the file back with transformers, which needs the gguf package (the export extra)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("GGUF export needs the gguf package; install lora-causal's export extra: pip install "
                        "'lora-causal[export]'")


def format_export_report(report: dict[str, Any]) -> str:
    parity = report.get("parity") or {}
    lines = [f"export {report['file']} ({report['type']}, {report['converter']} converter), checked on "
             f"{len(parity.get('prompts', []))} prompts against the merged model:"]
    for row in parity.get("prompts", []):
        lines.append(f"  {row['prompt']}: {row['tokens']} tokens, ids {'equal' if row['token_ids_equal'] else 'DIFFER'}, "
                     f"max |delta logit| {row['max_abs_logit_diff']:.3g}, KL {row['mean_kl']:.3g}, top-1 "
                     f"{row['top1_agreement']:.1%}, greedy {'equal' if row['greedy_equal'] else 'differs'}")
    if parity:
        lines.append(f"  all: max |delta logit| {parity['max_abs_logit_diff']:.3g}, mean KL {parity['mean_kl']:.3g} "
                     f"(gate {parity['kl_gate']:g}), top-1 agreement {parity['top1_agreement']:.2%}, greedy "
                     f"{parity['greedy_tokens']}-token continuations equal {parity['greedy_equal']:.0%}")
        stops = parity["stop_token_ids"]
        lines.append(f"  stop tokens: generation_config {stops['generation_config']} ({', '.join(stops['texts'])}); "
                     f"llama.cpp stops on {stops['llama_cpp_stops_on']}")
        if "llama_cpp" in parity:
            runtime = parity["llama_cpp"]
            lines.append(f"  llama.cpp {runtime['version']}: max |delta logit| {runtime['max_abs_logit_diff']:.3g}, "
                         f"mean KL {runtime['mean_kl']:.3g}, top-1 {runtime['top1_agreement']:.2%}")
        else:
            lines.append("  llama.cpp runtime: not installed (pip install llama-cpp-python to check inside llama.cpp too)")
        lines.append("  verdict: " + ("passed" if parity["passed"] else "REFUSED: " + "; ".join(parity["failures"])))
    if "modelfile" in report:
        template = report["modelfile"]["template"]
        lines.append(f"  Modelfile: {len(report['modelfile']['stops'])} stop parameters, "
                     + ("ChatML TEMPLATE" if template else "no TEMPLATE (Ollama reads the file's chat template)"))
    if "out" in report:
        lines.append(f"written to {report['out']}")
    return "\n".join(lines)
