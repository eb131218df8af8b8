#!/usr/bin/env bash
# The main job on a CPU machine: set up, build the tiny demo model and clips, turn the clips into a
# dataset, cache their latents, train a LoRA (validation samples included), and render with and without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python data_tools/make_demo.py --out demo
# The demo clips are 144x96 (and one 96x144), 48 frames: 17-frame buckets of that size, two windows each.
python data_tools/prepare_clips.py demo/clips demo/dataset --bucket 17x96x144 --bucket 17x144x96 --mode sliding
python data_tools/cache_latents.py demo/dataset --model demo/model --max-sequence-length 64
run="runs/demo-$(date +%Y%m%d-%H%M%S)"   # a new folder each time: an earlier run is never overwritten
# Longer and harder than the demo experiment's quick defaults (which the tests build on), so that the LoRA shows:
# the base is random, so the adapter also takes the timestep path and the in/out projections (docs/training.md).
python train.py +experiment=demo output_dir="$run" trainer.max_steps=1000 trainer.checkpoint_every=500 \
    eval.every=250 validation.every=500 optimizer.lr=1e-2 optimizer.scheduler=cosine lora.rank=32 lora.alpha=32 \
    flow.sigma_sampling=uniform flow.shift=3 \
    'lora.target_modules=[to_q,to_k,to_v,to_gate,to_out,gate_proj,up_proj,down_proj,video_in,proj_out,time_modulation.1,time_embed.0,time_embed.2]'
python - "$run/metrics.jsonl" <<'PY'
import sys
from pathlib import Path
from happyhorse_train.training.run_log import read_metrics
rows = read_metrics(Path(sys.argv[1]), "eval_loss")
print(f"eval loss (fixed noise): {rows[0]['eval_loss']:.3f} at step {rows[0]['step']}, "
      f"{rows[-1]['eval_loss']:.3f} at step {rows[-1]['step']}")
PY
# The same seed with and without the LoRA, beside the training clip: one contact sheet PNG per prompt.
python sample.py model.path=demo/model output_dir="$run/samples" "loras=[$run/lora]" num_inference_steps=30 \
    contact_sheet=true reference_dataset=demo/dataset \
    'prompts=["a red circle moving left to right on a dark background","a blue square moving top to bottom on a white background"]'
echo "demo done: LoRA in $run/lora, loss curve $run/loss_curve.png, videos in $run/validation and $run/samples,"
echo "contact sheets (training clip / base model / with the LoRA) in $run/samples/*_sheet.png"
