"""llama.cpp's own tools, when the user has them: its converter for families our writer does not cover, and its
quantizer for K-quants (which gguf-py cannot produce). Nothing is downloaded: `LLAMA_CPP_DIR` names a llama.cpp
checkout (built, for `llama-quantize`), or `llama-quantize` is on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from lora_causal.core.errors import UserError

KQUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_DIR = "LLAMA_CPP_DIR"


def llama_cpp_dir() -> Path | None:
    value = os.environ.get(LLAMA_CPP_DIR, "").strip()
    return Path(value).expanduser() if value else None


def find_quantizer() -> Path | None:
    """llama-quantize from $LLAMA_CPP_DIR (build/bin or the top folder) or PATH."""
    folder = llama_cpp_dir()
    candidates = [folder / "build" / "bin" / "llama-quantize", folder / "llama-quantize"] if folder else []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("llama-quantize")
    return Path(found) if found else None


def require_quantizer(kind: str) -> Path:
    quantizer = find_quantizer()
    if quantizer is None:
        raise UserError(f"--type {kind} is a K-quant, which only llama.cpp's quantizer writes, and none was found; build "
                        f"llama.cpp and set {LLAMA_CPP_DIR} to its folder (or put llama-quantize on PATH), or choose "
                        "--type f16, bf16 or q8_0")
    return quantizer


def quantize(quantizer: Path, source: Path, out: Path, kind: str) -> str:
    """Run llama-quantize source -> out; returns its output's last lines (fallback notices included)."""
    result = subprocess.run([str(quantizer), str(source), str(out), kind.upper()], capture_output=True, text=True,
                            check=False, timeout=6 * 3600)
    if result.returncode != 0 or not out.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"llama-quantize failed ({tail[0][:200]}); check the llama.cpp build in {quantizer.parent}")
    return "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])


def find_converter() -> Path:
    folder = llama_cpp_dir()
    if folder is None:
        raise UserError(f"this model needs llama.cpp's converter; set {LLAMA_CPP_DIR} to a llama.cpp checkout (the folder "
                        "holding convert_hf_to_gguf.py), nothing is downloaded")
    script = folder / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"{LLAMA_CPP_DIR}='{folder}' holds no convert_hf_to_gguf.py; point it at a llama.cpp checkout")
    return script


def convert(script: Path, merged: Path, out: Path, kind: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py as a subprocess of this interpreter (it brings its own gguf-py)."""
    if kind not in CONVERTER_TYPES:
        raise UserError(f"--type {kind}: llama.cpp's converter writes {', '.join(CONVERTER_TYPES)}; K-quants are made from those")
    result = subprocess.run([sys.executable, str(script), str(merged), "--outfile", str(out), "--outtype", kind],
                            capture_output=True, text=True, check=False, timeout=6 * 3600)
    if result.returncode == 0 and out.is_file():
        return
    text = result.stderr + result.stdout
    if "BPE pre-tokenizer was not recognized" in text:
        raise UserError(f"llama.cpp's converter in '{script.parent}' does not know this tokenizer's pre-tokenizer (it is "
                        "newer than the checkout); update the llama.cpp checkout")
    tail = text.strip().splitlines()[-1:] or ["no output"]
    raise UserError(f"llama.cpp's convert_hf_to_gguf.py failed: {tail[0][:300]}")
