"""Render videos from a model folder (HappyHorse-1.0 or Wan), optionally with LoRAs.

    python sample.py model.path=demo/model 'prompts=["a blue square moving top to bottom"]'
    python sample.py model=8b model.path=/models/happyhorse-1.0 'loras=[out/style.safetensors]' 'lora_scales=[0.8]'
    python sample.py model=8b model.path=/models/happyhorse-1.0 memory.offload_models=true memory.ffn_chunk_tokens=8192

Every option: configs/sample.yaml. Videos go to `output_dir` (default samples/).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from happyhorse_train.config import register_configs
from happyhorse_train.errors import UserInputError, report_user_errors
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.rendering.contact_sheet import write_lora_sheets
from happyhorse_train.rendering.sample_pipeline import apply_loras, load_inference_pipeline
from happyhorse_train.rendering.videos import condition_images, render_conditioned, save_videos
from happyhorse_train.runtime import resolve_device, resolve_dtype

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if not cfg.prompts:
        raise UserInputError("no prompts given; e.g. 'prompts=[\"a red circle moving left to right\"]'")
    if cfg.model.path is None:
        raise UserInputError(f"model.path is not set: point it at a {cfg.model.preset} diffusers-layout model folder")
    device = resolve_device(cfg.device)
    spec = get_spec(cfg.model.backbone, cfg.max_sequence_length)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.contact_sheet and not cfg.loras:
        raise UserInputError("contact_sheet=true compares the base model with LoRAs: give loras=[...] too")
    pipe = load_inference_pipeline(spec, cfg.model.path, device, dtype, cfg.memory, cfg.compile)
    video_latent_shape(pipe, cfg.height, cfg.width, cfg.num_frames)  # fail on a bad size before encoding anything
    apply_loras(pipe, spec, list(cfg.loras), list(cfg.lora_scales))  # each file checked: one line, not peft's
    paths = [cfg.image] if isinstance(cfg.image, str) else list(cfg.image or [])
    images = condition_images(spec, pipe.transformer, paths, len(cfg.prompts), "image")
    base = None
    if cfg.contact_sheet:
        pipe.disable_lora()
        base = render_conditioned(pipe, list(cfg.prompts), cfg, images)
        pipe.enable_lora()

    videos = render_conditioned(pipe, list(cfg.prompts), cfg, images)
    for path in save_videos(videos, list(cfg.prompts), cfg.output_dir, cfg.fps, tag=f"_seed{cfg.seed}"):
        print(f"wrote {path}")
    if base is not None:
        for path in write_lora_sheets(list(cfg.prompts), base, videos, cfg.output_dir, cfg.reference_dataset):
            print(f"wrote {path} (rows: training clip if the dataset has one, base model, with the LoRAs)")


if __name__ == "__main__":
    main()
