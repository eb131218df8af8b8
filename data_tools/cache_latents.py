"""Encode a clip dataset's clips (VAE) and captions (text encoder) once, into a latent cache.

    python data_tools/cache_latents.py DATASET --model demo/model [--cache DATASET/cache]
    accelerate launch --multi_gpu --num_processes 2 data_tools/cache_latents.py DATASET --model ...  # split the work

Only entries missing from the cache are encoded: re-running after adding clips encodes just those, and a
killed run picks up where it stopped. Clips that fail to decode are skipped and listed in failures-rank*.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.errors import report_user_errors  # noqa: E402


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="clip dataset folder (from prepare_clips.py)")
    parser.add_argument("--model", type=Path, required=True, help="diffusers-layout model folder")
    parser.add_argument("--cache", type=Path, help="cache folder (default: DATASET/cache)")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens kept (default 512)")
    parser.add_argument("--shard-size", type=int, default=32, help="clips per shard file (default 32)")
    parser.add_argument("--dtype", default="auto", help="model precision: auto, float32, bfloat16")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from happyhorse_train.data.cache_fill import fill_cache
    from happyhorse_train.data.latent_cache import LatentCache
    from happyhorse_train.data.loss_masks import fill_masks
    from happyhorse_train.data.prepare import load_manifest
    from happyhorse_train.models.backbones import spec_for_folder
    from happyhorse_train.runtime import distributed_state, resolve_dtype

    state = distributed_state()
    manifest = load_manifest(args.dataset)
    spec = spec_for_folder(args.model, args.max_sequence_length)
    # Only the encoders run here: the transformer stays in host RAM (the 8B one and its encoders overfill 24 GB).
    dtype = resolve_dtype(args.dtype, state.device)
    pipe = spec.load_pipeline(args.model, state.device, dtype, transformer_to_device=False)
    encoder = spec.clip_encoder(pipe, args.model)
    cache = LatentCache(args.cache or args.dataset / "cache")
    if state.is_main_process:
        for line in cache.check(verify=True):
            print(line)
    state.wait_for_everyone()
    cache.refresh()

    stats = fill_cache(manifest, cache, encoder, state.process_index, state.num_processes, args.shard_size,
                       progress=not args.no_progress)
    for failure in fill_masks(manifest, cache, encoder.video_id, pipe.vae_scale_factor_temporal,
                              pipe.vae_scale_factor_spatial, state.process_index, state.num_processes):
        print(f"  failed: loss mask {failure['source']}: {failure['reason']}")
    print(
        f"rank {state.process_index}: encoded {stats.videos_encoded} clips and {stats.texts_encoded} captions "
        f"in {stats.seconds:.1f} s; {len(stats.failed)} failed"
    )
    for failure in stats.failed:
        print(f"  failed: {failure.get('source', failure.get('caption'))}: {failure['reason']}")
    state.wait_for_everyone()
    if state.is_main_process:
        cache.refresh(write_index=True)
        print(f"cache {cache.folder}: {len(cache)} entries "
              f"({stats.videos_needed} clips, {stats.texts_needed} captions needed)")


if __name__ == "__main__":
    main()
