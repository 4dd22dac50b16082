#!/usr/bin/env bash
# The GPU check, in order of importance, inside a time budget: the GPU tests (the real varlen kernel, whole
# optimizer steps under torch.cuda.set_sync_debug_mode, 4-bit training and merge on CUDA), `lora-causal bench` on
# the Llama-3.1-8B shape at a global batch of 16 (micro-batch 4 x accumulation 4): stock vs the defaults (token-budget
# micro-batches) vs one lever each (no budget, twice the budget, Liger's kernels), with a torch.profiler summary of
# one step of each, then single-sequence probes near 80k tokens on the 8B shape under 24 GiB, FSDP-QLoRA through
# accelerate on one device (the demo recipe), and the lever arms on the Llama-3.2-1B shape. A stage that would start
# after the budget is skipped (and says so), so the script ends in time with what it measured.
#
#   benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#
# OUTPUT_FOLDER defaults to $OUT_DIR, else $OUT, else benchmarks/results/<date>-<gpu>. Environment knobs:
#   (the 8B arms take about a minute each; bench.json is rewritten after every arm, so a cut keeps the first ones)
#   BUDGET_S=540  STEPS_8B=10  STEPS_1B=12  WARMUP=3  MB_1B=8  MB_8B=4  GA_8B=4  GA_1B=2
#   ARMS_8B="stock,lora_causal,lora_causal+no_budget,lora_causal+liger,lora_causal+budget_x2"
#   ARMS_1B="stock,lora_causal,lora_causal+no_budget,lora_causal+no_checkpointing"
#   CONTEXT_ARMS="lora_causal+offload_liger,lora_causal+offload"  CONTEXT_LENGTHS=81920
#   SHAPE_8B=llama-3.1-8b  SHAPE_1B=llama-3.2-1b   (SHAPE_8B=tiny SHAPE_1B=tiny for a CPU dry run of the script)
#   STAGES="tests bench8b context fsdp bench1b"   the stages to run, in this order of importance
# Needs trl, peft, bitsandbytes, datasets and pydantic importable (carried wheels on a machine without them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
device=$("$python" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tr ' ' '-')
out=${1:-${OUT_DIR:-${OUT:-benchmarks/results/$(date +%F)-$device}}}
budget=${BUDGET_S:-540}
warmup=${WARMUP:-3}
shape_8b=${SHAPE_8B:-llama-3.1-8b}
shape_1b=${SHAPE_1B:-llama-3.2-1b}
mkdir -p "$out"
echo "device: $device; results in $out; budget ${budget}s"

# stage NAME ESTIMATE_S COMMAND...: run it if it can finish within the budget, bounded by what is left
stage() {
  local name=$1 estimate=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt "$estimate" ]; then
    echo "== skipped $name: ${left}s left of the budget, it needs about ${estimate}s"
    return 0
  fi
  echo "== $name (${left}s left)"
  timeout --signal=TERM "$left" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E "it/s\]|s/it\]" | tail -n 8
}

"$python" - <<'EOF' 2>&1 | tee "$out/environment.txt"
import inspect, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as exc:
    print("no varlen_attn:", exc)
EOF

stages=" ${STAGES:-tests bench8b context fsdp bench1b} "
wanted() { [[ "$stages" == *" $1 "* ]]; }

wanted tests && stage gpu-tests 90 "$python" -m pytest -q -m gpu tests -p no:cacheprovider -o addopts=""
wanted bench8b && stage "bench-$shape_8b" 300 "$python" -m lora_causal bench --shape "$shape_8b" \
  --arms "${ARMS_8B:-stock,lora_causal,lora_causal+no_budget,lora_causal+liger,lora_causal+budget_x2}" \
  --out "$out/$shape_8b" --steps "${STEPS_8B:-10}" --warmup "$warmup" --micro-batch "${MB_8B:-4}" \
  --grad-accum "${GA_8B:-4}" --profile
wanted context && stage "max-context-$shape_8b" 100 "$python" -m lora_causal bench --shape "$shape_8b" --max-context \
  --memory-cap-gib 24 --arms "${CONTEXT_ARMS:-lora_causal+offload_liger,lora_causal+offload}" \
  --context-lengths "${CONTEXT_LENGTHS:-81920}" --out "$out/$shape_8b-max-context"
# FSDP-QLoRA on the single-device path: the demo recipe through the FSDP config with one process
wanted fsdp && stage fsdp-qlora 60 "$python" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp_qlora.yaml \
  --num_processes 1 -m lora_causal train recipes/demo.yaml train.epochs=1 train.max_steps=4 output.merge=null \
  data.eval=null train.eval_steps=null "output.dir=$out/fsdp-run"
wanted bench1b && stage "bench-$shape_1b" 100 "$python" -m lora_causal bench --shape "$shape_1b" \
  --arms "${ARMS_1B:-stock,lora_causal,lora_causal+no_budget,lora_causal+no_checkpointing}" \
  --out "$out/$shape_1b" --steps "${STEPS_1B:-12}" --warmup "$warmup" --micro-batch "${MB_1B:-8}" \
  --grad-accum "${GA_1B:-2}"

echo
echo "== summary ($device, ${SECONDS}s)"
for folder in "$out/$shape_8b" "$out/$shape_1b"; do
  [ -f "$folder/bench.md" ] && cat "$folder/bench.md" && echo
done
[ -f "$out/$shape_8b-max-context/max_context.md" ] && cat "$out/$shape_8b-max-context/max_context.md"
[ -f "$out/fsdp-run/manifest.json" ] && echo "fsdp-qlora: $(grep -o '"status": "[a-z]*"' "$out/fsdp-run/manifest.json")" \
  && ls "$out/fsdp-run/adapter" && cat "$out/fsdp-run/samples.json" 2>/dev/null
exit 0
