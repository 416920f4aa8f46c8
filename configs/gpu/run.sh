#!/usr/bin/env bash
# Train the bundled models' next candidates on a lent GPU machine, in one device call (docs/bundled.md, "On a lent
# GPU"). Here first: `python configs/gpu/device.py pack`. Then the call: command `bash configs/gpu/run.sh`, carry
# [".gpu"], timeout_s 600. It renders the recipe's dataset as PNG-frame folders and runs two lanes side by side,
# each stage ended by `kinema train --time-limit` so the whole script ends within KINEMA_GPU_SECONDS:
#   tiny: a patch-1 kinema-tiny DiT from scratch on the shipped Slice VAE (docs/bundled.md, eleventh session);
#   ad4:  kinema-tiny-ad on 16x16 latents: a 4x image VAE, the image UNet, then the motion stage from the shipped
#         motion module (fifteenth session).
# Each lane's bundle (float16, as kinema ships it) and its runs' logs come back in $OUT as tar parts; here,
# `python configs/gpu/device.py unpack DIR runs/gpu` puts them back together for `kinema eval --model FOLDER`.
set -euo pipefail

TOTAL=${KINEMA_GPU_SECONDS:-540}          # the call's limit is 600 s: this leaves a minute for the unexpected
CLIPS=${KINEMA_GPU_CLIPS:-8000}
WORKERS=${KINEMA_GPU_WORKERS:-6}          # data-loading processes per run; the machine has 16 cores, two lanes
RENDER_WORKERS=${KINEMA_GPU_RENDER_WORKERS:-12}
DIT_BATCH=${KINEMA_GPU_DIT_BATCH:-64}
VAE_BATCH=${KINEMA_GPU_VAE_BATCH:-64}
IMAGE_BATCH=${KINEMA_GPU_IMAGE_BATCH:-128}
MOTION_BATCH=${KINEMA_GPU_MOTION_BATCH:-16}
PY=${KINEMA_GPU_PYTHON:-python3}
WORK=${KINEMA_GPU_WORK:-/tmp/kinema-gpu}
OUT=${OUT:-$WORK/out}
HOLD_OUT=red:triangle:left,green:square:grow,blue:circle:down,yellow:triangle:rotate_cw,white:square:up,purple:circle:right,orange:square:rotate_ccw,cyan:triangle:shrink

began=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - began) )); }
share() { local seconds=$(( ($(left) - $2) * $1 / 100 )); echo $(( seconds > 10 ? seconds : 10 )); }

rm -rf "$WORK/site" "$WORK/data" "$WORK/tiny" "$WORK/ad4" "$WORK/bundle" "$WORK/logs"
mkdir -p "$WORK" "$OUT"
$PY configs/gpu/device.py setup "$WORK/site" ${KINEMA_GPU_FORCE_AV_STAND_IN:+--force-av-stand-in}
export PYTHONPATH="$WORK/site:$PWD" PYTHONUNBUFFERED=1
# float32 matrix products on the tensor cores (TF32, 10-bit mantissa inputs, float32 sums): several times the plain
# float32 rate on an H100, where these small models are otherwise short of arithmetic; convolutions do so already.
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
kinema() { $PY -m kinema "$@"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# --device cuda, run nowhere else yet: each bundled model's text-, image-to-video and extend on the GPU against the
# CPU, same seeds (a few seconds; a failure is reported and the training goes on).
$PY configs/gpu/device_check.py > "$OUT/device-check.json" || echo "device check failed: see $OUT/device-check.json"

DATA=$WORK/data
kinema data synth --out "$DATA" --n "$CLIPS" --seed 11 --frames 16 --size 64 --image-fraction 0.1 \
    --hold-out "$HOLD_OUT" --video-format png --workers "$RENDER_WORKERS"
$PY configs/gpu/device.py captions "$WORK/site" "$DATA/metadata.json"
echo "data ready after $(( $(date +%s) - began )) s"

# Every run: the PNG dataset, no cache (the GPU encodes each batch faster than the cache is read), a checkpoint
# only where the time limit ends it, steps that the limit reaches first.
common=(--no-progress --set "data.root=$DATA" --set data.cache=null --set "data.num_workers=$WORKERS"
        --set train.deterministic=false --set checkpoint.every=1000000 --set validation.every=0
        --set log.tensorboard=false --set train.steps=1000000)
bundle() {  # bundle FOLDER NAME [MOTION_MODULE]
    $PY - "$@" <<'EOF'
import sys
from kinema.models.initial import bundle_model
extra = {"motion_module.safetensors": sys.argv[3]} if len(sys.argv) > 3 else None
print("bundled", bundle_model(sys.argv[1], sys.argv[2], extra=extra))
EOF
}

lane_tiny() {
    kinema init-model kinema-tiny --vae kinema/bundled/kinema-tiny/vae --patch-size 1 --out "$WORK/tiny/start"
    kinema train configs/train/kinema-tiny-dit.yaml "${common[@]}" --set "model.path=$WORK/tiny/start" \
        --set "output=$WORK/tiny/dit" --set "train.batch_size=$DIT_BATCH" --time-limit "$(share 100 30)"
    bundle "$WORK/tiny/dit/final/model" "$WORK/bundle/kinema-tiny-p1"
}

lane_ad4() {
    kinema init-model kinema-tiny-ad --vae-downsample 4 --out "$WORK/ad4/init"
    kinema train configs/train/kinema-tiny-ad-vae.yaml "${common[@]}" --set "model.path=$WORK/ad4/init" \
        --set "output=$WORK/ad4/vae" --set "train.batch_size=$VAE_BATCH" --time-limit "$(share 20 30)"
    kinema init-model kinema-tiny-ad --vae "$WORK/ad4/vae/final/vae" --scale-data "$DATA" --out "$WORK/ad4/image-start"
    kinema train configs/train/kinema-tiny-ad-image-snr.yaml "${common[@]}" --set "model.path=$WORK/ad4/image-start" \
        --set "output=$WORK/ad4/image" --set "train.batch_size=$IMAGE_BATCH" --set train.learning_rate=3e-4 \
        --set train.lr_schedule=constant_with_warmup --set train.warmup_steps=200 --time-limit "$(share 62 30)"
    kinema train configs/train/kinema-tiny-ad-motion.yaml "${common[@]}" --set "model.path=$WORK/ad4/image/final/model" \
        --set model.motion_module=kinema/bundled/kinema-tiny-ad/motion_module.safetensors \
        --set "output=$WORK/ad4/motion" --set "train.batch_size=$MOTION_BATCH" --time-limit "$(share 100 30)"
    bundle "$WORK/ad4/image/final/model" "$WORK/bundle/kinema-tiny-ad4" "$WORK/ad4/motion/final/motion_module.safetensors"
}

# Each lane's output goes to its own log in $OUT, which comes back even if the call is cut off.
lane_tiny >"$OUT/tiny.log" 2>&1 & tiny=$!
lane_ad4 >"$OUT/ad4.log" 2>&1 & ad4=$!
status=0
wait $tiny || { echo "lane tiny failed: see tiny.log"; status=1; }
wait $ad4 || { echo "lane ad4 failed: see ad4.log"; status=1; }

logs=()
for run in "$WORK"/tiny/dit "$WORK"/ad4/vae "$WORK"/ad4/image "$WORK"/ad4/motion; do
    [ -f "$run/logs.csv" ] && mkdir -p "$WORK/logs/$(basename "$(dirname "$run")")-$(basename "$run")" \
        && cp "$run/logs.csv" "$WORK/logs/$(basename "$(dirname "$run")")-$(basename "$run")/"
done
[ -d "$WORK/logs" ] && logs=("$WORK/logs")
for name in kinema-tiny-p1 kinema-tiny-ad4; do
    [ -d "$WORK/bundle/$name" ] && $PY configs/gpu/device.py collect "$name" "$OUT" "$WORK/bundle/$name"
done
[ ${#logs[@]} -gt 0 ] && $PY configs/gpu/device.py collect logs "$OUT" "${logs[@]}"
tail -n 3 "$OUT"/*.log
echo "done after $(( $(date +%s) - began )) s of $TOTAL"
exit $status
