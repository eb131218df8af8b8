"""Load a diffusers transformer folder straight into quantized base weights, one tensor at a time.

`from_pretrained` followed by quantizing would first hold the whole model in the compute dtype (16 GB
of host RAM for an 8B model in bf16). Here the model is built on the meta device and each tensor is
read from the safetensors file(s) on its own: a linear of a repeated block becomes its quantized layer
on the target device at once, and every other tensor goes to the device in the compute dtype. Host RAM
then holds at most a tensor or two beyond what ends up on the device.
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from happyhorse_train.errors import UserInputError
from happyhorse_train.memory.quantize import (
    check_format,
    kept_in_float32,
    mark_quantized,
    quantizable_linear_names,
    quantized_linear_from_weights,
)
from happyhorse_train.models.layout import check_model_folder

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
GiB = 2**30


def peak_host_ram_bytes() -> int:
    """This process's peak resident set size so far (a high-water mark; never goes down).

    On Linux it is VmHWM from /proc/self/status rather than getrusage's ru_maxrss: ru_maxrss carries over
    from the parent across fork and exec, so a process started by a big one (pytest, `accelerate launch`)
    starts out at its parent's peak. ru_maxrss remains the fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes elsewhere


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_freed_host_memory() -> None:
    """Hand memory that was freed back to the OS (glibc: malloc_trim).

    glibc keeps freed blocks of a few MB on its heap for reuse, and the fp8/int8 results allocated in
    between pin the heap, so without this the freed bf16/float32 temporaries of every layer add up in
    RSS. Measured, loading a 318 MiB bf16 transformer: peak RSS +326 MiB to fp8 and +418 MiB to NF4
    without this, +187 MiB and +177 MiB with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file of `folder` holds each tensor: the single file, or the shards an index names."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise UserInputError(f"{index}: not a readable safetensors index ({error}); re-save the model "
                                 "with save_pretrained") from error
        files = {name: folder / shard for name, shard in weight_map.items()}
        missing = sorted({str(path) for path in files.values() if not path.is_file()})
        if missing:
            raise UserInputError(f"{index} names shard(s) that are not there: {', '.join(missing)}; "
                                 "copy the complete model folder")
        return files
    if single.is_file():
        return {name: single for name in _read_keys(single)}
    raise UserInputError(
        f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {folder}; point at a diffusers-layout transformer "
        "folder with safetensors weights (a .bin checkpoint: load it once and re-save it with save_pretrained)"
    )


def _read_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as file:
            return list(file.keys())
    except (OSError, SafetensorError) as error:
        raise UserInputError(f"{path}: not a readable safetensors file ({error}); re-download or re-save it") from error


def _read_tensors(files: dict[str, Path], names: list[str]) -> Iterator[torch.Tensor]:
    """The named tensors, read on the CPU in their stored dtype.

    Each read opens the file anew: safetensors maps the file, and pages read through a handle held open
    stay resident in this process, so one handle for the whole load would count the whole file in RSS.
    """
    for name in names:
        try:
            with safe_open(files[name], framework="pt") as file:
                tensor = file.get_tensor(name)
        except (OSError, SafetensorError) as error:
            raise UserInputError(f"{files[name]}: cannot read {name} ({error}); re-download or re-save it") from error
        yield tensor


def _place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, device, dtype: torch.dtype | None) -> None:
    """Put `tensor` (cast to `dtype` if given) in place of the model's parameter or buffer `name`, frozen."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    expected = owner._parameters.get(leaf, owner._buffers.get(leaf))
    if expected is not None and expected.shape != tensor.shape:
        raise UserInputError(f"{name} has shape {tuple(tensor.shape)} in the weights but {tuple(expected.shape)} "
                             "in the model built from config.json; the folder's config and weights do not match")
    placed = tensor.to(device, dtype)
    if placed is tensor:  # no copy made: it still lives in the file's memory map, one map per tensor read
        placed = tensor.clone()
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(placed, requires_grad=False)
    else:
        owner._buffers[leaf] = placed


def build_on_meta(transformer_class, folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise UserInputError(f"no config.json in {folder}; point at a diffusers-layout transformer folder")
    try:
        config = transformer_class.load_config(folder)
    except (OSError, ValueError) as error:
        raise UserInputError(f"{folder / 'config.json'}: {error}") from error
    # Parameters on meta (no memory); buffers made for real, since non-persistent ones (e.g. RoPE tables)
    # are not in the weights file.
    with init_empty_weights():
        return transformer_class.from_config(config)


def _device_bytes(model: nn.Module) -> int:
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for param in model.parameters():  # bitsandbytes keeps its scales outside parameters and buffers
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                         if isinstance(t, torch.Tensor))
        scales = getattr(param, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


def _format_bytes(count: int) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / 2**20:.1f} MiB"


def load_quantized_transformer(transformer_class, folder: str | Path, fmt: str, device: torch.device | str,
                               compute_dtype: torch.dtype, *, log: Callable[[str], None] = logger.info) -> nn.Module:
    """The transformer in `folder` on `device`, its repeated blocks' linears in `fmt`, the rest in `compute_dtype`.

    Like `transformer_class.from_pretrained(folder, torch_dtype=compute_dtype)` (identical for "bf16"):
    in eval mode, tensors under `_keep_in_fp32_modules` kept in float32, non-float tensors in their own
    dtype. Unlike it, every parameter is frozen, and the model is never whole in host RAM. `log` gets one
    summary line (layers quantized, bytes on the device, this process's peak host RAM).
    """
    check_format(fmt)
    name_or_path, folder, device = folder, Path(folder), torch.device(device)
    files = tensor_files(folder)
    model = build_on_meta(transformer_class, folder)
    expected = set(model.state_dict())  # names as built, before layers are swapped
    linear_names = quantizable_linear_names(model) if fmt != "bf16" else []
    consumed = _load_quantized_linears(model, linear_names, files, folder, fmt, device, compute_dtype)
    _load_other_tensors(model, [n for n in files if n not in consumed], expected, files, folder, device, compute_dtype)
    _finish(model, folder, device)
    model.register_to_config(_name_or_path=name_or_path)  # as from_pretrained records it
    if fmt != "bf16":
        mark_quantized(model, fmt)
    log(f"loaded transformer ({fmt}): {len(linear_names)} linear layers quantized, "
        f"{_format_bytes(_device_bytes(model))} on {device.type}, peak host RAM {_format_bytes(peak_host_ram_bytes())}")
    return model


def _load_quantized_linears(model: nn.Module, names: list[str], files: dict[str, Path], folder: Path, fmt: str, device,
                            compute_dtype) -> set[str]:
    """Swap each named linear for its quantized layer, made from its own tensors; returns the tensor names used."""
    consumed = set()
    for name in names:
        layer = model.get_submodule(name)
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if layer.bias is not None else [])
        _check_present(keys, files, folder)
        weight, *bias = _read_tensors(files, keys)
        if weight.shape != layer.weight.shape:
            raise UserInputError(f"{name}.weight has shape {tuple(weight.shape)} in the weights but "
                                 f"{tuple(layer.weight.shape)} in the model built from config.json")
        model.set_submodule(name, quantized_linear_from_weights(weight, *(bias or [None]), fmt, compute_dtype, device))
        consumed.update(keys)
        del weight, bias
        _release_freed_host_memory()
    return consumed


def _load_other_tensors(model: nn.Module, names: list[str], expected: set[str], files: dict[str, Path], folder: Path,
                        device, compute_dtype) -> None:
    """Every other tensor to `device`: floats in `compute_dtype`, or float32 under `_keep_in_fp32_modules`."""
    unexpected = [name for name in names if name not in expected]
    if unexpected:  # as from_pretrained does: extra tensors are ignored, with a warning
        logger.warning("%s: ignoring %d tensor(s) the model does not have, e.g. %s", folder, len(unexpected),
                       unexpected[0])
    names = [name for name in names if name in expected]
    for name, tensor in zip(names, _read_tensors(files, names)):
        dtype = None
        if tensor.is_floating_point():
            dtype = torch.float32 if kept_in_float32(model, name) else compute_dtype
        _place_tensor(model, name, tensor, device, dtype)
        del tensor
        _release_freed_host_memory()


def _check_present(keys: list[str], files: dict[str, Path], folder: Path) -> None:
    missing = [key for key in keys if key not in files]
    if missing:
        raise UserInputError(f"the weights in {folder} lack {', '.join(missing)}; the folder's config and "
                             "weights do not match")


def _finish(model: nn.Module, folder: Path, device: torch.device) -> None:
    """Check every weight arrived, move the buffers made at build time to `device`, freeze, eval mode."""
    still_empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise UserInputError(f"the weights in {folder} lack {len(still_empty)} tensor(s) the model needs, e.g. "
                             f"{', '.join(still_empty[:3])}; the folder's config and weights do not match")
    for module in model.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[leaf] = buffer.to(device)
    model.requires_grad_(False)
    model.eval()


def base_transformer(spec, path, base_weights: str, device, dtype, log=print,
                     deferred: bool = False) -> nn.Module | None:
    """The transformer to hand to spec.load_pipeline(transformer=...): None for base_weights="bf16" (the
    pipeline loads it itself); otherwise quantized, streamed onto `device` now, or with `deferred=True` a
    weightless meta-device model (its config readable) that `place_transformer` fills in later."""
    if base_weights == "bf16":
        return None
    folder = check_model_folder(path, spec.pipeline_class.__name__, spec.components) / "transformer"
    if deferred:
        return build_on_meta(spec.transformer_class, folder)
    return load_quantized_transformer(spec.transformer_class, folder, base_weights, device, dtype, log=log)


def place_transformer(pipe, spec, path, base_weights: str, device, dtype, log=print) -> None:
    """After load_pipeline(..., transformer_to_device=False): the transformer onto `device` (moved from host RAM,
    or, if quantized, streamed in now)."""
    if base_weights == "bf16":
        pipe.transformer.to(device)
    else:
        pipe.transformer = base_transformer(spec, path, base_weights, device, dtype, log)
