#!/usr/bin/env bash
# The GPU check: GPU tests, then `lora-causal bench` (stock vs lora_causal) on the Llama-3.2-1B and
# Llama-3.1-8B shapes, about 8 minutes on one H100/H200. Prints a short table last.
#
#   benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#
# OUTPUT_FOLDER defaults to $OUT_DIR, else $OUT, else benchmarks/results/<date>-<gpu>. Environment knobs:
#   SHAPES="llama-3.2-1b llama-3.1-8b"  STEPS=20  WARMUP=3  MB_1B=8  MB_8B=4
#   ARMS_1B="stock,lora_causal,lora_causal+padding_free,lora_causal+varlen"  ARMS_8B="stock,lora_causal"
#   MAX_CONTEXT=1   also bisect the longest 8B sequence under 24 GiB (several minutes more)
# Needs trl, peft, bitsandbytes, datasets and pydantic importable (see ../shared/gpu/README.md for carried wheels).
# On a CPU it runs too (SHAPES=tiny STEPS=4), as a dry run of the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
device=$("$python" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tr ' ' '-')
out=${1:-${OUT_DIR:-${OUT:-benchmarks/results/$(date +%F)-$device}}}
shapes=${SHAPES:-llama-3.2-1b llama-3.1-8b}
steps=${STEPS:-20}
warmup=${WARMUP:-3}
mkdir -p "$out"
echo "device: $device; results in $out"

"$python" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -3 || true

for shape in $shapes; do
  case $shape in
    *8b*|*7b*) micro_batch=${MB_8B:-4}; arms=${ARMS_8B:-stock,lora_causal} ;;
    *1b*) micro_batch=${MB_1B:-8}; arms=${ARMS_1B:-stock,lora_causal,lora_causal+padding_free,lora_causal+varlen} ;;
    *) micro_batch=4; arms=${ARMS_1B:-stock,lora_causal,lora_causal+padding_free,lora_causal+varlen} ;;
  esac
  echo "== bench $shape (arms $arms, micro-batch $micro_batch, $steps steps)"
  "$python" -m lora_causal bench --shape "$shape" --arms "$arms" --out "$out/$shape" --steps "$steps" \
    --warmup "$warmup" --micro-batch "$micro_batch" 2>&1 | tee "$out/$shape.log" | tail -2
done

if [ "${MAX_CONTEXT:-0}" = 1 ]; then
  "$python" -m lora_causal bench --shape llama-3.1-8b --max-context --memory-cap-gib 24 \
    --arms "${ARMS_CONTEXT:-stock,lora_causal+offload}" \
    --out "$out/llama-3.1-8b-max-context" 2>&1 | tee "$out/max-context.log" | tail -6
fi

echo
echo "== summary ($device)"
for shape in $shapes; do
  [ -f "$out/$shape/bench.md" ] && cat "$out/$shape/bench.md" && echo
done
