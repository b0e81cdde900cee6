#!/usr/bin/env bash
# The autoregressive prior against the diffusion prior on the built-in emoji data (leak-free split), the same
# wall-clock budget for both, trained at the same time with one core each; one decoder decodes both; then the side
# by side table of experiments/ar_vs_diffusion/README.md.
#   bash experiments/ar_vs_diffusion/run.sh       # about 65-75 minutes on 2 CPU cores
# Budgets live in conf/experiment/ar_vs_diffusion/{diffusion,ar,decoder}.yaml (12, 12 and 15 minutes). The two
# CLIPs are the emoji cascade's (conf/experiment/emoji_cascade/{clip,judge}.yaml, 15 epochs each) and are reused
# when they exist; a stage whose run directory already holds checkpoints/last.ckpt is not trained again.
# Order: CLIP, embedding; both priors side by side; the decoder with the judge beside it; the two evals side by
# side; the table and grids.
# Needs two cores: each prior (and each eval) is pinned to one with taskset and one torch thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=logs/ar_vs_diffusion/runs
LOGS=logs/ar_vs_diffusion
OUT=${OUT:-experiments/ar_vs_diffusion/results}
JUDGE=logs/emoji_cascade/runs/judge/clip.pt
mkdir -p "$OUT" "$LOGS"
# float32 for the decoder on AVX2-only CPUs (no native bf16), bf16 autocast where the CPU has it
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=${PRECISION:-bf16-mixed}; else
  PRECISION=${PRECISION:-32-true}; fi
one_core() {  # one_core CORE LOG COMMAND...: in the background on one core with one thread
  local core=$1 log=$2
  shift 2
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c "$core" "$@" >"$log" 2>&1 &
}
stamp() { date +%s; }
t0=$(stamp)

# 1. The conditioning CLIP (the cache every stage loads), as in the emoji cascade.
[ -f data/cache/clip/unclip-tiny.pt ] || python train.py experiment=emoji_cascade/clip
# ... and the emoji shards embedded with it once (what the priors and the decoder read), before two runs start.
python -c "
import os
from unclip_pl.clip.frozen import load_clip
from unclip_pl.data.emoji import EmojiDataModule
clip = load_clip('unclip-tiny', checkpoint='data/cache/clip/unclip-tiny.pt')
EmojiDataModule(root=os.path.abspath('data/emoji'), needs=('tokens', 'img_emb', 'txt_emb'), clip=clip, num_workers=0,
                tokenizer=clip.loader_tokenizer).prepare_data()"
t1=$(stamp)

# 2. The two priors at the same time, one core each, the same 12-minute budget, nothing else of this experiment
#    running beside them.
for p in diffusion ar; do
  if [ ! -f $RUNS/$p/checkpoints/last.ckpt ]; then
    one_core $([ $p = diffusion ] && echo 0 || echo 1) "$LOGS/train_$p.log" python train.py experiment=ar_vs_diffusion/$p
  fi
done
wait
t2=$(stamp)

# 3. The decoder (15 minutes) and, beside it, the judge CLIP of the emoji cascade (15 epochs, not time-budgeted:
#    sharing the cores costs the decoder steps, not the judge anything but time).
if [ ! -f "$JUDGE" ]; then
  python train.py experiment=emoji_cascade/judge >"$LOGS/train_judge.log" 2>&1 &
fi
[ -f $RUNS/decoder/checkpoints/last.ckpt ] ||
  python train.py experiment=ar_vs_diffusion/decoder trainer.precision="$PRECISION"
wait
t3=$(stamp)

# 4. Generated images through the same decoder, val split (219 images, all distinct captions), the prior variant
#    only, scored by the conditioning CLIP and by the judge; one core each, side by side.
D=$RUNS/decoder/checkpoints/last.ckpt
for p in diffusion ar; do
  one_core $([ $p = diffusion ] && echo 0 || echo 1) "$LOGS/eval_$p.log" python eval.py \
    checkpoints.prior=$RUNS/$p/checkpoints/last.ckpt checkpoints.decoder=$D "variants=[prior]" "splits=[val]" \
    settings.decoder.sampler=dpmpp_2m settings.decoder.steps=20 upsample=false judge="$JUDGE" batch_size=48 \
    diversity.captions=4 hydra.run.dir="$LOGS/eval_$p"
done
wait
t4=$(stamp)

# 5. The table (parameters, training speed, val metrics, sampling speed, the eval figures), one thread.
python experiments/ar_vs_diffusion/compare.py --diffusion $RUNS/diffusion/checkpoints/last.ckpt \
  --ar $RUNS/ar/checkpoints/last.ckpt --eval-diffusion "$LOGS/eval_diffusion" --eval-ar "$LOGS/eval_ar" --out "$OUT"
for p in diffusion ar; do
  cp "$LOGS/eval_$p/val_prior.png" "$OUT/val_$p.png"
  cp "$LOGS/eval_$p/results.md" "$OUT/eval_$p.md"
done
# 6. The paper's figure 7 (caption only / text embedding / prior embedding rows) with each prior.
for p in diffusion ar; do
  python sample.py mode=conditioning checkpoints.prior=$RUNS/$p/checkpoints/last.ckpt checkpoints.decoder=$D \
    settings.decoder.sampler=dpmpp_2m settings.decoder.steps=20 'prompt=[grinning face,red heart,pizza,sun]' \
    hydra.run.dir="$LOGS/conditioning_$p"
  cp "$LOGS/conditioning_$p/conditioning.png" "$OUT/conditioning_$p.png"
done
t5=$(stamp)
printf '{"clip_and_embedding_s": %d, "priors_s": %d, "decoder_and_judge_s": %d, "eval_s": %d, "compare_and_grids_s": %d, "total_s": %d}\n' \
  $((t1-t0)) $((t2-t1)) $((t3-t2)) $((t4-t3)) $((t5-t4)) $((t5-t0)) | tee "$OUT/timings.json"
