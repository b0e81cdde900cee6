#!/usr/bin/env bash
# Everything the speed targets ask to measure, in one call of about 10 minutes on an H100/H200:
#   1. bench_prior.py --compile    training samples/s, model TFLOP/s and % of the measured bf16 peak; sampling emb/s
#   1b. bench_ar_prior.py --compile the AR prior: training tokens/s and TFLOP/s; sampling emb/s with/without K/V cache
#   2. bench_decoder.py --compile  decoder training, DDIM-50 guided sampling, upsampler at 256x256, peak memory
#   3. a short bf16 fit of each stage on the built-in emoji data (trainer=gpu): prior, decoder, upsampler
# Each part has its own time limit, and no part starts after DEADLINE seconds, so a slow compile cannot eat the rest.
# PARTS picks the parts (default all, in this order), e.g. PARTS="bench_prior bench_decoder" for a first short call.
# Results land in $OUT: summary.txt (device, torch, rc and time of each part), bench.md (the tables, to paste into
# experiments/bench/README.md), <part>.log, fit_<stage>.csv (the fits' logged metrics, perf/samples_per_sec included).
#
# On the GPU machine, with the project installed (CUDA build of torch):
#   bash experiments/bench/gpu_check.sh
# A dry run of the same parts on this CPU, with tiny sizes: DEVICE=cpu bash experiments/bench/gpu_check.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-logs/gpu_check}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-540}
PARTS=${PARTS:-bench_prior bench_ar_prior bench_decoder fit_prior fit_decoder fit_upsampler}
RUNS=${RUNS:-/tmp/unclip_gpu_check_runs}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  local left=$((DEADLINE - ($(date +%s) - T0)))
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped (deadline of $DEADLINE s reached)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
  BENCH=(--device cuda --compile)
  TRAINER=(trainer=gpu)
  STEPS=300
else  # dry run: the reduced CPU sizes of the bench scripts and a few steps per stage
  echo "dry run on $(nproc) CPU cores" | tee "$OUT/summary.txt"
  BENCH=(--device cpu)
  TRAINER=(trainer=cpu)
  STEPS=4
fi
"$PY" -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/summary.txt"

part bench_prior 200 "$PY" experiments/bench/bench_prior.py "${BENCH[@]}" --out "$OUT/bench.md"
part bench_ar_prior 180 "$PY" experiments/bench/bench_ar_prior.py "${BENCH[@]}" --out "$OUT/bench.md"
part bench_decoder 240 "$PY" experiments/bench/bench_decoder.py "${BENCH[@]}" --out "$OUT/bench.md"

FIT=("${TRAINER[@]}" logger=csv "trainer.max_steps=$STEPS" trainer.log_every_n_steps=10 trainer.check_val_every_n_epoch=1)
# The prior's run also prepares the emoji shards, trains the small CLIP and embeds the shards (cached for the others).
part fit_prior 150 "$PY" train.py prior=diffusion "${FIT[@]}" "hydra.run.dir=$RUNS/prior"
part fit_decoder 90 "$PY" train.py decoder=base "${FIT[@]}" "hydra.run.dir=$RUNS/decoder"
part fit_upsampler 60 "$PY" train.py upsampler=emoji "${FIT[@]}" "hydra.run.dir=$RUNS/upsampler"
for stage in prior decoder upsampler; do
  cp "$RUNS/$stage/csv/metrics.csv" "$OUT/fit_$stage.csv" 2>/dev/null || true
done
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/summary.txt"
