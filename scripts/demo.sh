#!/usr/bin/env bash
# The main job on a CPU machine: set up, build the tiny demo model and clips, turn the clips into a
# dataset, cache their latents, train a LoRA (validation samples included), and render with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python data_tools/make_demo.py --out demo
# The demo clips are 144x96 (and one 96x144), 48 frames: 17-frame buckets of that size, two windows each.
python data_tools/prepare_clips.py demo/clips demo/dataset --bucket 17x96x144 --bucket 17x144x96 --mode sliding
python data_tools/cache_latents.py demo/dataset --model demo/model --max-sequence-length 64
run="runs/demo-$(date +%Y%m%d-%H%M%S)"   # a new folder each time: an earlier run is never overwritten
python train.py +experiment=demo output_dir="$run"
python sample.py model.path=demo/model output_dir="$run/samples" "loras=[$run/lora]" \
    'prompts=["a red circle moving left to right on a dark background"]'
echo "demo done: LoRA in $run/lora, loss curve $run/loss_curve.png, videos in $run/validation and $run/samples"
