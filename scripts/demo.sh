#!/usr/bin/env bash
# The main job on a CPU machine: set up, build the tiny demo model and clips, turn the clips into a
# dataset and cache their latents, and render a video from the model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python data_tools/make_demo.py --out demo
# The demo clips are 144x96 (and one 96x144), 48 frames: 17-frame buckets of that size, two windows each.
python data_tools/prepare_clips.py demo/clips demo/dataset --bucket 17x96x144 --bucket 17x144x96 --mode sliding
python data_tools/cache_latents.py demo/dataset --model demo/model --max-sequence-length 64
python sample.py model.path=demo/model output_dir=samples \
    'prompts=["a red circle moving left to right on a dark background"]'
