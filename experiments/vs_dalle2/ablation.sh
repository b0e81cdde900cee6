#!/usr/bin/env bash
# The decoder ablation (experiments/vs_dalle2/README.md): one Hydra multirun over the files of
# conf/experiment/vs_dalle2/ (each changes one thing of the comparison's decoder), every run for the same wall-clock
# budget with one torch thread; the sweep is split over the cores (one multirun pinned to each, the runs of one core
# in sequence), so runs never share a core. Then every run is probed and decoded the same way and scored by both CLIPs.
#   bash experiments/vs_dalle2/ablation.sh
# Settings (environment):
#   BUDGET_S (480)       training seconds of each run
#   ABLATIONS            the files of conf/experiment/vs_dalle2/ to run (default: all of them)
#   CLIP, JUDGE          the conditioning CLIP and the judge, as in run.sh (copied once into logs/vs_dalle2/runs/clips)
#   DECODE_LIMIT (64)    val items decoded per run (guidance 3); the baseline is decoded at guidance 1 and 5 too,
#                        and with its raw (not averaged) weights
#   RUNS (logs/vs_dalle2/runs) where run.sh keeps the CLIP copies and the prepared val data (made here if missing)
#   OVERRIDES, MAX_STEPS extra train.py overrides of every run, and a step cap (smaller runs: also DATA_ROOT,
#                        IMAGE_SIZE, LIMIT_TRAIN, LIMIT_VAL as in run.sh)
#   SKIP_TRAIN=1         only probe, decode and score the runs already in ABL (jobs whose output exists are skipped)
#   POST_CORES           the cores that probe and decode (default: all)
#   ABL (logs/vs_dalle2/ablation), OUT (experiments/vs_dalle2/results_ablation)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUDGET_S=${BUDGET_S:-480}
ABL=${ABL:-logs/vs_dalle2/ablation}
OUT=${OUT:-experiments/vs_dalle2/results_ablation}
RUNS=${RUNS:-logs/vs_dalle2/runs}
CLIPS=$RUNS/clips
CLIP=${CLIP:-data/cache/clip/ar_vs_diffusion-clip.pt}
JUDGE=${JUDGE:-logs/ar_vs_diffusion/runs/judge/clip.pt}
DECODE_LIMIT=${DECODE_LIMIT:-64}
PY=${PY:-python}
DRIVER=experiments/vs_dalle2/vs_dalle2.py
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PREC=bf16; PRECISION=bf16-mixed; else
  PREC=fp32; PRECISION=32-true; fi
mkdir -p "$CLIPS" "$ABL" "$OUT"
for f in "$CLIP" "$JUDGE"; do [ -f "$f" ] || [ -f "$CLIPS/$(basename "$f")" ] || { echo "ablation: no CLIP file $f" >&2; exit 2; }; done
[ -f "$CLIPS/clip.pt" ] || cp "$CLIP" "$CLIPS/clip.pt"
[ -f "$CLIPS/judge.pt" ] || cp "$JUDGE" "$CLIPS/judge.pt"
DATA=$RUNS/data.pt
DATA_ROOT=${DATA_ROOT:-data/emoji}
[ -f "$DATA" ] || taskset -c 0 "$PY" $DRIVER prepare --clip "$CLIPS/clip.pt" --out "$DATA" --data-root "$DATA_ROOT" \
  --image-size "${IMAGE_SIZE:-32}" ${LIMIT_TRAIN:+--limit-train $LIMIT_TRAIN} ${LIMIT_VAL:+--limit-val $LIMIT_VAL}
read -r -a ALL <<< "${ABLATIONS:-$(ls conf/experiment/vs_dalle2 | sed 's/\.yaml$//' | tr '\n' ' ')}"
NCORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc itself obeys OMP_NUM_THREADS (1 here)
MAX_TIME=$(printf '00:%02d:%02d:%02d' $((BUDGET_S / 3600)) $((BUDGET_S % 3600 / 60)) $((BUDGET_S % 60)))
PIDS=()
wait_all() { local rc=0 p; for p in "${PIDS[@]}"; do wait "$p" || rc=1; done; PIDS=(); return $rc; }

if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  set -f   # ${run_name} and the overrides are not file patterns
  for ((c = 0; c < NCORES; c++)); do   # runs c, c + NCORES, ... on core c
    mine=()
    for ((i = c; i < ${#ALL[@]}; i += NCORES)); do mine+=("vs_dalle2/${ALL[i]}"); done
    [ ${#mine[@]} -gt 0 ] || continue
    list=$(IFS=,; echo "${mine[*]}")
    # shellcheck disable=SC2086
    taskset -c "$c" setsid -w "$PY" train.py -m experiment="$list" trainer.max_time="$MAX_TIME" \
      trainer.precision="$PRECISION" clip.loader.checkpoint="$CLIPS/clip.pt" hydra.sweep.dir="$ABL/core$c" \
      'hydra.sweep.subdir=${run_name}' data.root="$DATA_ROOT" ${MAX_STEPS:+trainer.max_steps=$MAX_STEPS} \
      ${OVERRIDES:-} >"$ABL/sweep_core$c.log" 2>&1 &
    PIDS+=($!)
  done
  set +f
  wait_all || { echo "ablation: a sweep failed; see $ABL/sweep_core*.log" >&2; exit 1; }
fi

# Probe (all val items) and decode (the first DECODE_LIMIT, guidance 3) every run, one run per core at a time.
rundir() { local d; for d in "$ABL"/core*/"$1"; do [ -f "$d/checkpoints/last.ckpt" ] && { echo "$d"; return; }; done; }
jobs_for() {  # the probe ($2 = probe) or decode ($2 = decode) commands of run $1 whose output is not there yet
  local r=$1 d ck g="3"
  d=$(rundir "$r")
  ck=$d/checkpoints/last.ckpt
  job() { [ -f "$1" ] || echo "$PY $DRIVER $2 --kind unclip_pl --ckpt $ck --data $DATA --out $1 --precision $PREC ${*:3}"; }
  [ "$r" = baseline ] && g="1 3 5"
  if [ "$2" = probe ]; then
    job "$d/probe.json" probe
    [ "$r" != baseline ] || job "$ABL/baseline_raw/probe.json" probe --weights raw
  else
    job "$d/samples.pt" decode --limit "$DECODE_LIMIT" --guidance $g --unguided-limit 0
    [ "$r" != baseline ] || job "$ABL/baseline_raw/samples.pt" decode --limit "$DECODE_LIMIT" --unguided-limit 0 --weights raw
  fi
}
mkdir -p "$ABL/baseline_raw"
queue=()
for r in "${ALL[@]}"; do
  [ -n "$(rundir "$r")" ] || { echo "ablation: no run $r with a checkpoint in $ABL/core*" >&2; exit 1; }
done
for what in probe decode; do   # every probe first: they rank the runs before any decoding ends
  for r in "${ALL[@]}"; do
    while IFS= read -r line; do queue+=("$line"); done < <(jobs_for "$r" "$what")
  done
done
read -r -a CORE_LIST <<< "${POST_CORES:-$(seq -s ' ' 0 $((NCORES - 1)))}"
for ((k = 0; k < ${#CORE_LIST[@]}; k++)); do   # jobs k, k + cores, ... in sequence on the k-th core
  c=${CORE_LIST[k]}
  (
    for ((i = k; i < ${#queue[@]}; i += ${#CORE_LIST[@]})); do
      # shellcheck disable=SC2086
      taskset -c "$c" ${queue[i]} || exit 1
    done
  ) >>"$ABL/post_core$c.log" 2>&1 &
  PIDS+=($!)
done
wait_all || { echo "ablation: probing or decoding failed; see $ABL/post_core*.log" >&2; exit 1; }

samples=() names=()
for r in "${ALL[@]}"; do samples+=("$(rundir "$r")/samples.pt"); names+=("$r"); done
[ -f "$ABL/baseline_raw/samples.pt" ] && { samples+=("$ABL/baseline_raw/samples.pt"); names+=(baseline_raw); }
taskset -c 0 "$PY" $DRIVER score --data "$DATA" --samples "${samples[@]}" --names "${names[@]}" \
  --clip "$CLIPS/clip.pt" --judge "$CLIPS/judge.pt" --out "$OUT" --grid-items 12
taskset -c 0 "$PY" $DRIVER ablation-table --runs "$ABL" --names "${ALL[@]}" --results "$OUT/results.json" \
  --budget-s "$BUDGET_S" --out "$OUT/ablation.md"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
printf '{"cpu": "%s", "cores": %d, "budget_s": %d, "precision": "%s"}\n' "$cpu" "$NCORES" "$BUDGET_S" "$PREC" \
  | tee "$OUT/run.json"
