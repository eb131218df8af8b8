#!/usr/bin/env bash
# Every GPU measurement the open issues (7: memory, 8: speed) still need, for a session lent an H200.
# The device tool runs one command for at most 10 minutes, so the list comes in three parts; each writes its
# logs and JSON to $OUT (or ./gpu-results), and docs/benchmarks.md says where each figure goes.
#
# Here, once:   ../shared/tools/gpu_wheels.sh core      (diffusers, hydra, datasets, decord into .whl/core)
# Then three device calls, each with carry [".whl/core"]:
#   bash benchmarks/gpu_checklist.sh 1    # pytest tests/gpu, then the 8b LoRA step vs the baseline (issue 8)
#   bash benchmarks/gpu_checklist.sh 2    # the 24 GiB-capped run (issue 7), full fine-tune at 49 frames, inference
#   bash benchmarks/gpu_checklist.sh 3    # FSDP under a plain accelerate launch on the GPU (issue 7)
set -uo pipefail
part=${1:?usage: gpu_checklist.sh 1|2|3}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl/core ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/core/*.whl || exit 1
  export PYTHONPATH="$HOME/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"

run() {  # name, seconds, command...: one check, its output in $out/name.log whatever happens
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]}"
}

case $part in
  1)
    run gpu-tests 200 python3 -m pytest -q -s tests/gpu --ignore tests/gpu/test_fsdp_cuda.py
    run lora-step 330 python3 benchmarks/train_step.py --preset 8b --size 720x480x121 --lora-rank 32 --steps 5 \
      --warmup 2 --compile --saved-attention-blocks 8 --numerics-size 144x96x17 --json "$out/lora_step.json"
    ;;
  2)
    run capped-24gib 240 python3 benchmarks/train_step.py --preset 8b --size 720x480x121 --lora-rank 32 --steps 3 \
      --warmup 1 --skip-numerics --gpu-memory-cap 24 --offload-activations --blocks-to-swap 22 \
      --json "$out/capped_24gib.json"
    run full-step 180 python3 benchmarks/train_step.py --preset 8b --size 720x480x49 --mode full --steps 3 --warmup 2 \
      --skip-numerics --compile --json "$out/full_step.json"
    run inference 150 python3 benchmarks/inference_forward.py --preset 8b --size 720x480x121 --steps 5 --warmup 2 \
      --compile --json "$out/inference.json"
    ;;
  3)
    run fsdp-gpu 300 python3 -m pytest -q -s tests/gpu/test_fsdp_cuda.py
    ;;
  *) echo "unknown part $part: use 1, 2 or 3" >&2; exit 2 ;;
esac
