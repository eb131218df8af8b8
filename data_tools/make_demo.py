"""Write the demo: a random checkpoint of a preset (tiny HappyHorse by default, diffusers layout) with the
committed trained demo VAE (happyhorse_train/demo/tiny_vae, made by data_tools/train_demo_vae.py), and six
synthetic captioned clips.

    python data_tools/make_demo.py                 # -> demo/model and demo/clips
    python data_tools/make_demo.py --out /tmp/demo --preset tiny --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.demo.autoencoder import load_trained_vae  # noqa: E402
from happyhorse_train.demo.clips import write_demo_clips  # noqa: E402
from happyhorse_train.demo.random_model import write_random_model  # noqa: E402
from happyhorse_train.errors import report_user_errors  # noqa: E402
from happyhorse_train.models.presets import load_preset  # noqa: E402


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    parser.add_argument("--preset", default="tiny", help="model preset from configs/model (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--skip-clips", action="store_true", help="write only the checkpoint")
    parser.add_argument("--random-vae", action="store_true",
                        help="a random VAE instead of the trained one (which fits the tiny preset only)")
    args = parser.parse_args(argv)

    vae = None if args.random_vae else load_trained_vae(load_preset(args.preset)["vae"])
    model_dir = write_random_model(args.out / "model", args.preset, args.seed, vae)
    kind = "random" if vae is None else "trained"
    print(f"wrote a random {args.preset} checkpoint (with a {kind} VAE) to {model_dir}")
    if not args.skip_clips:
        clips = write_demo_clips(args.out / "clips")
        print(f"wrote {len(clips)} captioned clips to {args.out / 'clips'}")


if __name__ == "__main__":
    main()
