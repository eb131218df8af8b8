#!/usr/bin/env bash
# The main job on a CPU machine: set up, build the tiny demo model and clips, render a video from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python data_tools/make_demo.py --out demo
python sample.py model.path=demo/model output_dir=samples \
    'prompts=["a red circle moving left to right on a dark background"]'
