"""Train the demo VAE (the tiny preset's AutoencoderKLWan) on random synthetic scenes and write it as a diffusers
folder, with per-channel latent statistics measured on the demo clips. Its output is committed in
happyhorse_train/demo/tiny_vae; make_demo.py puts it in the demo model. About 25 minutes on two CPU cores.

Three phases of longer scenes: 5 frames learn to encode a frame chunk, 9 and then 17 frames (the demo's
length) teach the causal encoder and decoder to carry their cache across chunks; trained on 5 frames
alone, colours drift from the fifth frame on (demo-clip MSE 0.027 over 17 frames, 0.002 over the first 5).

    python data_tools/train_demo_vae.py                       # -> happyhorse_train/demo/tiny_vae
    python data_tools/train_demo_vae.py --steps 20 5 2 --out /tmp/vae
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.demo.autoencoder import TRAINED_VAE, measure, narrow_posterior, train_vae  # noqa: E402
from happyhorse_train.demo.clips import DEMO_CLIPS  # noqa: E402
from happyhorse_train.errors import report_user_errors  # noqa: E402
from happyhorse_train.models.presets import load_preset  # noqa: E402

PHASE_FRAMES = (5, 9, 17)
PHASE_LR = (3e-3, 1e-3, 5e-4)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TRAINED_VAE, help=f"output folder (default: {TRAINED_VAE})")
    parser.add_argument("--steps", type=int, nargs=3, default=[2400, 600, 300], metavar=("FIVE", "NINE", "SEVENTEEN"),
                        help="optimizer steps on 5-, 9- and 17-frame scenes (default: 2400 600 300)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the scenes")
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**load_preset("tiny")["vae"])
    narrow_posterior(vae)
    for phase, (steps, num_frames, lr) in enumerate(zip(args.steps, PHASE_FRAMES, PHASE_LR)):
        errors = train_vae(vae, steps, seed=args.seed + phase, num_frames=num_frames, lr=lr)
    report = measure(vae, DEMO_CLIPS)
    vae.register_to_config(latents_mean=report.pop("latents_mean"), latents_std=report.pop("latents_std"))
    vae.save_pretrained(args.out)
    tail = errors[-100:]  # in the VAE's [-1, 1] units: a quarter of that in the report's [0, 1]
    report = {"steps": dict(zip(PHASE_FRAMES, args.steps)), "seed": args.seed,
              "training_mse_last_100_steps": sum(tail) / len(tail) / 4, **report}
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: demo-clip reconstruction MSE {report['reconstruction_mse']:.5f} "
          f"(their pixel variance {report['pixel_variance']:.5f})")


if __name__ == "__main__":
    main()
