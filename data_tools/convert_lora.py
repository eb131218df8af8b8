"""Convert a LoRA file between the diffusers and ComfyUI layouts (docs/lora-formats.md).

    python data_tools/convert_lora.py runs/x/lora/pytorch_lora_weights.safetensors out.safetensors --to comfyui
    python data_tools/convert_lora.py comfy_lora.safetensors out_dir/ --to diffusers --backbone wan

The backbone decides the module names on the ComfyUI side (Wan: its original names); it is read from a
file this toolkit wrote, or given with --backbone. Tensors are copied unchanged, never rescaled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.errors import UserInputError, report_user_errors  # noqa: E402


def _backbone(header: dict, given: str | None) -> str:
    if given:
        return given
    ours = header.get("happyhorse_train")
    if ours:
        return json.loads(ours)["config"]["model"]["backbone"]
    raise UserInputError("this file does not say which backbone it is for: pass --backbone (happyhorse or wan)")


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", type=Path, help="a LoRA .safetensors file (or a folder holding pytorch_lora_weights.safetensors)"
    )
    parser.add_argument("output", type=Path, help="the file to write (a folder: the layout's usual file name in it)")
    parser.add_argument("--to", choices=["comfyui", "diffusers"], required=True, help="the layout to write")
    parser.add_argument("--backbone", choices=["happyhorse", "wan"], help="default: read from the file")
    args = parser.parse_args(argv)

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from happyhorse_train.files import write_atomic
    from happyhorse_train.models import lora_formats as formats
    from happyhorse_train.models.backbones import get_spec

    source = formats.resolve_lora_file(args.source)
    tensors = load_file(source)
    with safe_open(source, framework="pt") as handle:
        header = handle.metadata() or {}
    spec = get_spec(_backbone(header, args.backbone))
    kept = {key: value for key, value in header.items() if key == "happyhorse_train"}

    if args.to == "comfyui":
        if not all(key.startswith(formats.DIFFUSERS_PREFIX) for key in tensors):
            raise UserInputError(f"{source} is not in the diffusers layout (keys start with 'transformer.')")
        alpha = formats.unpack_adapter_metadata(header).get("lora_alpha")
        if alpha is None:
            raise UserInputError(f"{source} has no lora_alpha in its header; cannot write ComfyUI's alpha keys")
        converted = spec.lora_to_comfyui(tensors, alpha)
        out_header, name = kept, formats.COMFYUI_WEIGHT_NAME
    else:
        converted, alpha = spec.lora_from_comfyui(tensors)
        modules = sorted({key.removeprefix(formats.DIFFUSERS_PREFIX).rsplit(".lora_", 1)[0] for key in converted})
        rank = next(t.shape[0] for k, t in converted.items() if k.endswith("lora_A.weight"))
        metadata = formats.pack_adapter_metadata(formats.adapter_metadata(rank, alpha, modules))
        out_header, name = {**kept, "lora_adapter_metadata": metadata}, formats.LORA_WEIGHT_NAME
    output = args.output / name if args.output.suffix != ".safetensors" else args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    out_header = {"format": "pt", **out_header}
    write_atomic(output, lambda temporary: save_file(converted, str(temporary), metadata=out_header))
    layers = sum(k.endswith(("lora_A.weight", "lora_down.weight")) for k in converted)
    print(f"wrote {output} ({args.to} layout, {layers} layers)")


if __name__ == "__main__":
    main()
