"""happyhorse-train: fine-tuning and LoRA training for the HappyHorse-1.0 text-to-video transformer."""

import logging

# bitsandbytes tries to fetch a CPU kernel from a hub on AVX512-bf16 machines and warns when it cannot;
# we never fetch from a hub, so that warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from happyhorse_train.models.happyhorse import (  # noqa: E402
    HappyHorsePipeline,
    HappyHorseTransformer3DModel,
    load_pipeline,
)

__all__ = ["HappyHorsePipeline", "HappyHorseTransformer3DModel", "load_pipeline"]
