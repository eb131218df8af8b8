"""Where and in what precision to run, from the "auto"-able strings the configs use."""

from __future__ import annotations

import torch

from happyhorse_train.errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise UserInputError(f"device={name!r} is not a device name (cpu, cuda, cuda:N, auto)") from error


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserInputError(f"dtype={name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def distributed_state():
    """Accelerate's process state. Without CUDA it asks for CPU processes explicitly: accelerate's multi-process
    launcher does not tell its children to use the CPU, and they would each run alone as rank 0 of 1."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
