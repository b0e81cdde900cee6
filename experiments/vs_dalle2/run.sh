#!/usr/bin/env bash
# This project's decoder (train.py decoder=base_cliptext) against DALLE2-pytorch's at the same wall-clock budget on
# the built-in emoji data (leak-free split): both trained at the same time, each pinned to its own core with one
# torch thread, decoded with the same sampler from every val item's real z_i and caption, scored the same way under
# the conditioning CLIP and the judge. See experiments/vs_dalle2/README.md.
#   VS_DALLE2_PYTHON=/path/to/venv-with-the-vs_dalle2-extra/bin/python bash experiments/vs_dalle2/run.sh
# Settings (environment):
#   BUDGET_S (2400)        training seconds of each decoder
#   CLIP, JUDGE            the conditioning CLIP and the judge (exported CLIP files; copied into the run first)
#   VS_DALLE2_PYTHON       a Python with dalle2-pytorch (`pip install -e .[vs_dalle2]`); default: python
#   EXPERIMENT (vs_dalle2) this project's decoder: conf/experiment/vs_dalle2.yaml, or one of its ablation files
#                          (e.g. vs_dalle2/min_snr)
#   NAME (unclip_pl)       this project's run name; UNCLIP_OVERRIDES: extra train.py overrides for it, e.g.
#                          decoder.module.model.unet.resblock_cross_attn=true
#   SKIP_DALLE2=1          train and decode only this project's decoder (a DALLE2-pytorch run of the same RUNS is
#                          scored beside it when present)
#   RUNS (logs/vs_dalle2/runs), OUT (experiments/vs_dalle2/results)
#   Smaller runs: LIMIT_TRAIN / LIMIT_VAL (items prepared), MAX_STEPS, BATCH (64), DECODE_LIMIT / UNGUIDED_LIMIT
#   (val items decoded guided / unguided; default all), WARMUP (100) and LR (1e-3) of both, MIN_LOSS_DROP (0.2),
#   DATA_ROOT (data/emoji), IMAGE_SIZE (32: give the decoder's size to train.py too, decoder.image_size=...),
#   D2_ARGS (extra train-dalle2 arguments, e.g. its shape: --dim 16 --dim-mults 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUDGET_S=${BUDGET_S:-2400}
RUNS=${RUNS:-logs/vs_dalle2/runs}
OUT=${OUT:-experiments/vs_dalle2/results}
CLIP=${CLIP:-data/cache/clip/ar_vs_diffusion-clip.pt}
JUDGE=${JUDGE:-logs/ar_vs_diffusion/runs/judge/clip.pt}
PY=${PY:-python}
D2_PY=${VS_DALLE2_PYTHON:-python}
NAME=${NAME:-unclip_pl}
EXPERIMENT=${EXPERIMENT:-vs_dalle2}
BATCH=${BATCH:-64}
MAX_STEPS=${MAX_STEPS:-0}
WARMUP=${WARMUP:-100}
LR=${LR:-1e-3}   # both decoders; this project's decoder default (conf/decoder/base.yaml)
DATA_ROOT=${DATA_ROOT:-data/emoji}
IMAGE_SIZE=${IMAGE_SIZE:-32}
DRIVER=experiments/vs_dalle2/vs_dalle2.py
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# bf16 autocast where the CPU has native bf16 (as the project's trainer.precision=bf16-mixed), float32 elsewhere
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PREC=bf16; PRECISION=bf16-mixed; else
  PREC=fp32; PRECISION=32-true; fi
if [ "${SKIP_DALLE2:-0}" != 1 ] && ! "$D2_PY" -c "import dalle2_pytorch" 2>/dev/null; then
  echo "vs_dalle2: $D2_PY cannot import dalle2_pytorch: install the vs_dalle2 extra there (pip install -e '.[vs_dalle2]')" \
    "and set VS_DALLE2_PYTHON to it" >&2
  exit 2
fi
for f in "$CLIP" "$JUDGE"; do [ -f "$f" ] || { echo "vs_dalle2: no CLIP file $f (set CLIP / JUDGE)" >&2; exit 2; }; done
mkdir -p "$RUNS/clips" "$OUT"
on_core() {  # on_core CORE LOG COMMAND...: in the background, pinned to CORE, in a session of its own
  local core=$1 log=$2
  shift 2
  taskset -c "$core" setsid -w "$@" >"$log" 2>&1 &
  PIDS+=($!)
}
PIDS=()
wait_all() {  # wait for the on_core jobs; fails when any of them failed
  local rc=0 p
  for p in "${PIDS[@]}"; do wait "$p" || rc=1; done
  PIDS=()
  return $rc
}
# The CLIPs are copied once, so a CLIP retrained meanwhile elsewhere cannot change this run's conditioning.
[ -f "$RUNS/clips/clip.pt" ] || cp "$CLIP" "$RUNS/clips/clip.pt"
[ -f "$RUNS/clips/judge.pt" ] || cp "$JUDGE" "$RUNS/clips/judge.pt"
CLIP=$RUNS/clips/clip.pt
JUDGE=$RUNS/clips/judge.pt
DATA=$RUNS/data.pt
[ -f "$DATA" ] || taskset -c 0 "$PY" $DRIVER prepare --clip "$CLIP" --out "$DATA" --data-root "$DATA_ROOT" \
  --image-size "$IMAGE_SIZE" \
  ${LIMIT_TRAIN:+--limit-train $LIMIT_TRAIN} ${LIMIT_VAL:+--limit-val $LIMIT_VAL}

MINUTES=$(awk "BEGIN {print $BUDGET_S / 60}")
MAX_TIME=$(printf '00:%02d:%02d:%02d' $((BUDGET_S / 3600)) $((BUDGET_S % 3600 / 60)) $((BUDGET_S % 60)))
UNCLIP_STEPS=$([ "$MAX_STEPS" -gt 0 ] && echo "$MAX_STEPS" || echo 100000000)
start_load=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s)
# [core 0] this project's decoder through train.py (its loader, the CLIP text tower in the step); no validation
# inside the budget (DALLE2-pytorch's loop has none either).
set -f  # the overrides hold brackets (lists), not file patterns
# shellcheck disable=SC2086
on_core 0 "$RUNS/train_$NAME.log" "$PY" train.py experiment="$EXPERIMENT" clip.loader.checkpoint="$CLIP" \
  run_name="$NAME" hydra.run.dir="$RUNS/$NAME" data.batch_size="$BATCH" trainer.max_time="$MAX_TIME" \
  trainer.max_steps="$UNCLIP_STEPS" trainer.precision="$PRECISION" decoder.module.warmup_steps="$WARMUP" \
  decoder.module.optimizer.lr="$LR" data.root="$DATA_ROOT" ${UNCLIP_OVERRIDES:-}
# [core 1] DALLE2-pytorch's decoder from the same tensors in memory
if [ "${SKIP_DALLE2:-0}" != 1 ]; then
  on_core 1 "$RUNS/train_dalle2.log" "$D2_PY" $DRIVER train-dalle2 --data "$DATA" --out "$RUNS/dalle2" \
    --minutes "$MINUTES" --max-steps "$MAX_STEPS" --batch-size "$BATCH" --warmup "$WARMUP" --precision "$PREC" \
    --lr "$LR" --min-loss-drop "${MIN_LOSS_DROP:-0.2}" ${D2_ARGS:-}
fi
set +f
fail=0
wait_all || fail=1
t1=$(date +%s)
end_load=$(cut -d' ' -f1-3 /proc/loadavg)
[ -f "$RUNS/$NAME/checkpoints/last.ckpt" ] || { echo "vs_dalle2: train.py left no checkpoint; see $RUNS/train_$NAME.log" >&2; exit 1; }
[ "$fail" = 0 ] || { echo "vs_dalle2: a training run failed; see $RUNS/train_*.log" >&2; exit 1; }
"$PY" $DRIVER train-info --ckpt "$RUNS/$NAME/checkpoints/last.ckpt" --minutes "$MINUTES" --batch-size "$BATCH" \
  --out "$RUNS/$NAME/train.json"

# Decoding: every val item (seed = its index), DDIM 25 steps, guidance 3 and unguided; one core each.
DEC=(--data "$DATA" ${DECODE_LIMIT:+--limit $DECODE_LIMIT} ${UNGUIDED_LIMIT:+--unguided-limit $UNGUIDED_LIMIT}
     --precision "$PREC")
on_core 0 "$RUNS/decode_$NAME.log" "$PY" $DRIVER decode --kind unclip_pl --ckpt "$RUNS/$NAME/checkpoints/last.ckpt" \
  --out "$RUNS/$NAME/samples.pt" "${DEC[@]}"
if [ "${SKIP_DALLE2:-0}" != 1 ]; then
  on_core 1 "$RUNS/decode_dalle2.log" "$D2_PY" $DRIVER decode --kind dalle2 --ckpt "$RUNS/dalle2/dalle2.pt" \
    --out "$RUNS/dalle2/samples.pt" "${DEC[@]}"
fi
wait_all || { echo "vs_dalle2: decoding failed; see $RUNS/decode_*.log" >&2; exit 1; }
# The conditioning probe: noise-prediction error on every val item with its own, another item's and no conditioning.
on_core 0 "$RUNS/probe_$NAME.log" "$PY" $DRIVER probe --kind unclip_pl --ckpt "$RUNS/$NAME/checkpoints/last.ckpt" \
  --data "$DATA" --out "$RUNS/$NAME/probe.json" --precision "$PREC"
if [ "${SKIP_DALLE2:-0}" != 1 ]; then
  on_core 1 "$RUNS/probe_dalle2.log" "$D2_PY" $DRIVER probe --kind dalle2 --ckpt "$RUNS/dalle2/dalle2.pt" \
    --data "$DATA" --out "$RUNS/dalle2/probe.json" --precision "$PREC"
fi
wait_all || { echo "vs_dalle2: the probe failed; see $RUNS/probe_*.log" >&2; exit 1; }
t2=$(date +%s)

# Scoring: every decoded run of RUNS (this one, and any other of the same RUNS), both CLIPs.
samples=() names=() infos=()
for d in "$RUNS"/*/; do
  d=${d%/}
  if [ -f "$d/samples.pt" ] && [ -f "$d/train.json" ]; then
    samples+=("$d/samples.pt"); names+=("$(basename "$d")"); infos+=("$d/train.json")
  fi
done
taskset -c 0 "$PY" $DRIVER score --data "$DATA" --samples "${samples[@]}" --names "${names[@]}" \
  --train-info "${infos[@]}" --clip "$CLIP" --judge "$JUDGE" --out "$OUT"
t3=$(date +%s)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
printf '{"cpu": "%s", "cores": %d, "budget_s": %d, "precision": "%s", "load_avg_at_start": "%s", "load_avg_after_training": "%s", "train_s": %d, "decode_s": %d, "score_s": %d}\n' \
  "$cpu" "$(nproc --all)" "$BUDGET_S" "$PREC" "$start_load" "$end_load" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) \
  | tee "$OUT/run_$NAME.json"
