"""Which training settings fit your GPU and host RAM, and which of those is fastest.

    python data_tools/plan_memory.py --preset 8b --gpu-memory 24 --host-ram 64 --size 720x480x121 --lora-rank 32
    python data_tools/plan_memory.py --preset 8b --gpu-memory 80 --gpus 4 --host-ram 512 --size 720x480x49 --full

Prints a table of candidate settings (frozen-base format, gradient checkpointing, activation offload, block
swap, optimizer, and for several GPUs the accelerate config) with the estimated peak GPU memory, peak host
RAM and step time of each, then the fastest that fits with the overrides to paste. Parameter bytes and
activation bytes are measured on the meta device (no memory, a few seconds); bandwidths and kernel rates are
stated assumptions (happyhorse_train/planner/assumptions.py). Exit status: 0 with a pick, 1 when nothing fits,
2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.errors import UserInputError, report_user_errors  # noqa: E402


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return parse


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="configs/model/<name>.yaml (tiny, 8b, wan2.1-14b...) or a path")
    parser.add_argument("--gpu-memory", type=_positive(float), required=True, metavar="GIB", help="one GPU's memory")
    parser.add_argument("--host-ram", type=_positive(float), required=True, metavar="GIB", help="the machine's RAM")
    parser.add_argument("--gpus", type=_positive(int), default=1, help="GPUs on the machine (default 1)")
    parser.add_argument("--size", required=True, metavar="WxHxF", help="clip width x height x frames, e.g. 720x480x121")
    parser.add_argument("--batch-size", type=_positive(int), default=1, help="clips per GPU per step (default 1)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--lora-rank", type=_positive(int), default=32, help="train a LoRA of this rank (default 32)")
    what.add_argument("--full", action="store_true", help="full fine-tune instead of a LoRA")
    parser.add_argument("--text-tokens", type=_positive(int),
                        help="prompt tokens per clip (default: the preset's sample.max_sequence_length)")
    parser.add_argument("--encoders-freed", action="store_true",
                        help="the text encoder and VAE are freed after caching (default: kept in RAM for validation)")
    parser.add_argument("--tflops", type=_positive(float), help="achieved bf16 TFLOP/s per GPU (default 440: H200)")
    parser.add_argument("--pcie-gbps", type=_positive(float), help="host<->GPU GB/s each way (default 25, PCIe 5 x16)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    args = parser.parse_args(argv)

    from happyhorse_train import planner

    width, height, frames = planner.parse_size(args.size)
    speeds = {k: v for k, v in (("tflops", args.tflops), ("pcie_gbps", args.pcie_gbps)) if v is not None}
    request = planner.PlanRequest(
        preset=args.preset, gpu_memory_gib=args.gpu_memory, host_ram_gib=args.host_ram, width=width, height=height,
        frames=frames, num_gpus=args.gpus, batch_size=args.batch_size, lora_rank=None if args.full else args.lora_rank,
        text_tokens=args.text_tokens, encoders_in_host_ram=not args.encoders_freed, **speeds,
    )
    try:
        result = planner.plan(request)
    except ValueError as error:  # e.g. a preset file whose model config the backbone's class refuses
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(f"preset {args.preset}: {error}") from error

    if args.json:
        print(json.dumps(planner.plan_to_dict(result), indent=2))
    else:
        print(planner.render_plan(result), end="")  # it ends with why nothing fits, when nothing does
    if result.pick is None:
        if args.json:
            print(f"error: {result.why_nothing_fits()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
