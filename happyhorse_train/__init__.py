"""happyhorse-train: fine-tuning and LoRA training for the HappyHorse-1.0 text-to-video transformer."""

import logging

# bitsandbytes tries to fetch a CPU kernel from a hub on AVX512-bf16 machines and warns when it cannot;
# we never fetch from a hub, so that warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["HappyHorsePipeline", "HappyHorseTransformer3DModel", "load_pipeline"]


def __getattr__(name: str):
    # Lazy, so the data tools and their worker processes do not pay for importing diffusers.
    if name in __all__:
        from happyhorse_train.models import happyhorse

        return getattr(happyhorse, name)
    raise AttributeError(f"module 'happyhorse_train' has no attribute {name!r}")
