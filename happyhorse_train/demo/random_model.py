"""Build a random checkpoint of a preset (any backbone) and save it as a real diffusers-layout folder.

Every component, the tokenizer included, is made here from the preset: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import load_preset

# The tokenizer learns its merges from these words; byte-level BPE still encodes any text at all.
TOKENIZER_CORPUS = [
    "a red circle moving left to right on a black background",
    "a blue square moving top to bottom on a dark background",
    "a green triangle drifting slowly across a grey background",
    "a yellow ball bouncing, camera static, soft lighting",
    "a white dot orbiting the centre, slow camera pan, warm light",
    "cinematic, close-up, wide shot, tracking shot, zoom in, zoom out, sunset, night, rain, horse running",
]
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def build_tokenizer(vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that appends `</s>`, with pad id 0 and eos id 1 as in T5."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=model_max_length
    )


def _like_a_trained_vae(vae: AutoencoderKLWan, z_dim: int) -> None:
    """Give a random VAE the posterior of a trained one: narrow (std e^-4) around means of about unit spread.

    A randomly initialized VAE's posterior std (~1) dwarfs the spread of its means (~0.2), so its sampled
    latents would be mostly noise and nothing trained on them could be learned. `quant_conv` emits the
    means in its first z_dim channels and the log-variances in the rest.
    """
    with torch.no_grad():
        vae.quant_conv.weight[z_dim:] = 0.0
        vae.quant_conv.bias[z_dim:] = -8.0
        vae.quant_conv.weight[:z_dim] *= 5.0
        vae.quant_conv.bias[:z_dim] *= 5.0


def build_random_pipeline(preset: dict | str, seed: int = 0, vae: AutoencoderKLWan | None = None):
    """Random-weight components sized by the preset, in float32 on the CPU, in eval mode as from_pretrained gives them.

    `vae` replaces the random VAE (the demo passes its trained one). (Freshly built modules start in training mode,
    where the text encoder's dropout would make sampling random.)
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(**preset["tokenizer"])
    z_dim = preset["vae"].get("z_dim", 16)
    if vae is None:
        vae = AutoencoderKLWan(**preset["vae"], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        _like_a_trained_vae(vae, z_dim)
    text_config = UMT5Config(**{**preset["text_encoder"], "vocab_size": len(tokenizer)}, pad_token_id=0,
                             eos_token_id=1, decoder_start_token_id=0)
    spec = get_spec(preset["backbone"])
    return spec.pipeline_class(
        transformer=spec.transformer_class(**preset["transformer"]).eval(),
        vae=vae.eval(),
        text_encoder=UMT5EncoderModel(text_config).eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**preset["scheduler"]),
        **_image_encoder(preset),
        **preset.get("pipeline", {}),
    )


def _image_encoder(preset: dict) -> dict:
    """A random CLIP vision encoder and its image processor, for a preset that names one (Wan 2.1 I2V)."""
    if not preset.get("image_encoder"):
        return {}
    import transformers

    # Without torchvision, transformers falls back to the PIL processor anyway, with a warning each time.
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    config = transformers.CLIPVisionConfig(**preset["image_encoder"])
    return {"image_encoder": transformers.CLIPVisionModel(config).eval(),
            "image_processor": processor(**preset.get("image_processor", {}))}


def write_random_model(out_dir: str | Path, preset: dict | str = "tiny", seed: int = 0,
                       vae: AutoencoderKLWan | None = None) -> Path:
    out_dir = Path(out_dir)
    build_random_pipeline(preset, seed, vae).save_pretrained(out_dir)
    return out_dir
