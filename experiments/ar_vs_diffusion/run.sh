#!/usr/bin/env bash
# The autoregressive prior against the diffusion prior on the built-in emoji data (leak-free split), the same
# wall-clock budget for both, trained at the same time with one core each; one decoder decodes both; then the side
# by side table of experiments/ar_vs_diffusion/README.md.
#   bash experiments/ar_vs_diffusion/run.sh       # about 60-75 minutes on 2 CPU cores
# Every run here has one torch thread, is pinned to one core (taskset), two at a time, and runs in a session of its
# own (setsid: with the kernel's autogroup scheduling, a session is what gets its share of the CPU): on a shared
# machine a two-thread run waits for its slower thread at every op. Order: [core 0] the conditioning CLIP, the embedding of
# the shards, the decoder, beside [core 1] the judge CLIP; then both priors side by side (nothing else of this
# experiment running); then the two evals side by side; then the table and grids.
# Budgets and lengths: conf/experiment/ar_vs_diffusion/*.yaml (CLIPs 10 epochs; decoder 15 minutes; priors 12
# minutes each). A decoder or prior whose run holds checkpoints/last.ckpt is not trained again (delete
# logs/ar_vs_diffusion/runs/<stage> to retrain it).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=logs/ar_vs_diffusion/runs
LOGS=logs/ar_vs_diffusion
OUT=${OUT:-experiments/ar_vs_diffusion/results}
CLIP=data/cache/clip/ar_vs_diffusion-clip.pt   # clip.loader.checkpoint of conf/experiment/ar_vs_diffusion.yaml
JUDGE=$RUNS/judge/clip.pt
mkdir -p "$OUT" "$LOGS"
# float32 for the decoder on AVX2-only CPUs (no native bf16), bf16 autocast where the CPU has it
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=${PRECISION:-bf16-mixed}; else
  PRECISION=${PRECISION:-32-true}; fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
on_core() {  # on_core CORE LOG COMMAND...: in the background, pinned to CORE, in a session of its own
  local core=$1 log=$2
  shift 2
  taskset -c "$core" setsid -w "$@" >"$log" 2>&1 &
}
core0() { taskset -c 0 setsid -w "$@"; }  # the same in the foreground
stamp() { date +%s; }
t0=$(stamp)

# 1. [core 1] The judge CLIP, in the background until step 3. The CLIPs always run: a finished run resumes and
#    stops at once, a stopped one continues (a stopped CLIP run leaves its clip.pt too, so its file proves nothing).
on_core 1 "$LOGS/train_judge.log" python train.py experiment=ar_vs_diffusion/judge
# 2. [core 0] The conditioning CLIP; the emoji shards embedded with it once (what the priors and the decoder read);
#    the decoder.
core0 python train.py experiment=ar_vs_diffusion/clip >"$LOGS/train_clip.log" 2>&1
t1=$(stamp)
core0 python -c "
import os
from unclip_pl.clip.frozen import load_clip
from unclip_pl.data.emoji import EmojiDataModule
clip = load_clip('unclip-tiny', checkpoint='$CLIP')
EmojiDataModule(root=os.path.abspath('data/emoji'), needs=('tokens', 'img_emb', 'txt_emb'), clip=clip, num_workers=0,
                tokenizer=clip.loader_tokenizer).prepare_data()"
[ -f $RUNS/decoder/checkpoints/last.ckpt ] || core0 python train.py experiment=ar_vs_diffusion/decoder \
  trainer.precision="$PRECISION" data.num_workers=0 >"$LOGS/train_decoder.log" 2>&1
t2=$(stamp)
wait  # the judge
t3=$(stamp)

# 3. The two priors at the same time, one core each, the same 12-minute budget.
for p in diffusion ar; do
  if [ ! -f $RUNS/$p/checkpoints/last.ckpt ]; then
    on_core "$([ $p = diffusion ] && echo 0 || echo 1)" "$LOGS/train_$p.log" python train.py experiment=ar_vs_diffusion/$p
  fi
done
wait
t4=$(stamp)

# 4. Generated images through the same decoder: the same seeded random 96 of the 219 val images (their distinct
#    captions are the retrieval pool), the prior variant only, DPM-Solver++ 10 steps, scored by the conditioning
#    CLIP and by the judge; one core each, side by side.
D=$RUNS/decoder/checkpoints/last.ckpt
EVAL_N=${EVAL_N:-96}
for p in diffusion ar; do
  on_core "$([ $p = diffusion ] && echo 0 || echo 1)" "$LOGS/eval_$p.log" python eval.py \
    checkpoints.prior=$RUNS/$p/checkpoints/last.ckpt checkpoints.decoder=$D "variants=[prior]" "splits=[val]" \
    max_samples.val="$EVAL_N" settings.decoder.sampler=dpmpp_2m settings.decoder.steps=10 upsample=false \
    judge="$JUDGE" batch_size=48 diversity.captions=4 hydra.run.dir="$LOGS/eval_$p"
done
wait
t5=$(stamp)

# 5. The table (parameters, training speed, val metrics, sampling speed, the eval figures), one thread.
python experiments/ar_vs_diffusion/compare.py --diffusion $RUNS/diffusion/checkpoints/last.ckpt \
  --ar $RUNS/ar/checkpoints/last.ckpt --eval-diffusion "$LOGS/eval_diffusion" --eval-ar "$LOGS/eval_ar" --out "$OUT"
for p in diffusion ar; do
  cp "$LOGS/eval_$p/val_prior.png" "$OUT/val_$p.png"
  cp "$LOGS/eval_$p/results.md" "$OUT/eval_$p.md"
done
# 6. The paper's figure 7 (caption only / text embedding / prior embedding rows) with each prior, side by side.
for p in diffusion ar; do
  on_core "$([ $p = diffusion ] && echo 0 || echo 1)" "$LOGS/conditioning_$p.log" python sample.py \
    mode=conditioning checkpoints.prior=$RUNS/$p/checkpoints/last.ckpt checkpoints.decoder=$D \
    settings.decoder.sampler=dpmpp_2m settings.decoder.steps=10 'prompt=[grinning face,red heart,pizza,sun]' \
    hydra.run.dir="$LOGS/conditioning_$p"
done
wait
for p in diffusion ar; do cp "$LOGS/conditioning_$p/conditioning.png" "$OUT/conditioning_$p.png"; done
t6=$(stamp)
printf '{"clip_s": %d, "embedding_and_decoder_s": %d, "judge_wait_s": %d, "priors_s": %d, "eval_s": %d, "compare_and_grids_s": %d, "total_s": %d}\n' \
  $((t1-t0)) $((t2-t1)) $((t3-t2)) $((t4-t3)) $((t5-t4)) $((t6-t5)) $((t6-t0)) | tee "$OUT/timings.json"
