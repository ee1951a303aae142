#!/usr/bin/env bash
# The GPU checks of #18 as one device command; every step is time-boxed and writes its figures under
# $OUT as it goes, so a run cut short still returns what it had.
#
#   On the device (after ../shared/gpu/prepare-bundle.sh 0.3.36 bitsandbytes==0.50.2 trl==1.16.0
#   datasets==5.2.0 dill multiprocess gguf ... here; carry .gpubundle):
#     bash bench/gpu_suite.sh
#   Here, each step small, on the CPU (a rehearsal of the script itself):
#     OUT=/tmp/gpu-dry bash bench/gpu_suite.sh --cpu-dry-run
# One call stops starting steps when BUDGET seconds (default 560) are spent; steps that finished are
# marked under $WORK, so running the same command again on the still-warm machine goes on from there
# (the CUDA build alone takes ~5.5 minutes: expect two calls).
#
# Steps: imports -> the CUDA llama-cpp-python build (reused when /tmp/site has it) -> a random 1B Llama
# (SmolLM2 tokenizer) as HF, F16 and Q4_K_M -> pytest -m gpu -> decode, all layers offloaded vs CPU and
# the engine vs raw llama-cpp-python on the GPU -> bf16 LoRA SFT and QLoRA NF4 SFT, crofter vs plain TRL
# -> the accelerate launcher with one process -> embeddings on CUDA vs raw encode.
# steps.txt lists each step with its exit status and seconds; each step's output is in STEP.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
WORK=${WORK:-/tmp/crofter-gpu}
mkdir -p "$WORK"

BUDGET=${BUDGET:-560}  # seconds this call may use (a device command gets at most 600)
START=$SECONDS
mkdir -p "$WORK/done"

step() {  # step NAME SECONDS COMMAND...: time-boxed within the budget, logged, never stops the suite
  local name=$1 limit=$2; shift 2
  if [ -f "$WORK/done/$name" ]; then  # finished in an earlier call on this (still warm) machine
    echo "$name done earlier" | tee -a "$OUT/steps.txt"
    cp "$WORK/done/$name".json "$OUT/" 2>/dev/null
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 20 ]; then
    echo "$name skipped: this call's budget is spent (run the suite again: done steps are kept)" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
  if [ $rc = 0 ]; then
    touch "$WORK/done/$name"
    cp "$OUT/$name.json" "$WORK/done/$name.json" 2>/dev/null
  fi
}

if [ $DRY = 1 ]; then
  SIZE=tiny; STEPS=3; BATCH=2; LENGTH=64; TOKENS=16; TEXTS=64; MODES="fp32"
else
  SIZE=1b; STEPS=30; BATCH=8; LENGTH=512; TOKENS=256; TEXTS=4000; MODES="bf16 qlora"
  if [ ! -d /tmp/site/llama_cpp ]; then
    step build 480 bash .gpubundle/build-llama-cuda.sh
  fi
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
fi
PY=${PYTHON:-python3}
[ $DRY = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python

step imports 60 $PY bench/gpu_steps.py imports "$OUT/imports.json"
step model 420 $PY bench/gpu_steps.py model --size $SIZE --out "$WORK" --json "$OUT/model.json"
HF=$WORK/llama-$SIZE
Q4=$WORK/llama-$SIZE-Q4_K_M.gguf
step gpu_tests 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/app/test_gpu.py
step decode 300 $PY bench/gpu_steps.py decode --gguf "$Q4" --tokens $TOKENS --out "$OUT/decode.json"
for mode in $MODES; do
  step "sft_$mode" 420 $PY bench/gpu_steps.py sft --hf "$HF" --mode "$mode" --steps $STEPS --batch $BATCH \
    --length $LENGTH --out "$OUT/sft_$mode.json"
done
printf '%s\n' '{"instruction": "What do bees make?", "output": "Honey."}' '{"instruction": "What is ice?", "output": "Frozen water."}' \
  > "$WORK/tiny.jsonl"
rm -rf "$WORK/accel-run"  # a run folder left by a cut-off call
step accelerate 300 $PY -m app.cli tune sft --base "$HF" --data "$WORK/tiny.jsonl" --out "$WORK/accel-run" \
  --max-steps 2 --launcher accelerate --gpus 1 --json
step embed 240 $PY bench/gpu_steps.py embed --texts $TEXTS --out "$OUT/embed.json"
echo "figures in $OUT"
