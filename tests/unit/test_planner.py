"""The memory planner's numbers against measurements: the meta-device parameter, LoRA and activation counts
equal the bytes of real tensors in a real CPU training step, activations grow linearly with tokens, and the
CLI picks a setting that fits (or says why nothing does)."""

from __future__ import annotations

import json
import re

import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from happyhorse_train import planner
from happyhorse_train.memory.ffn_chunks import chunk_feed_forwards
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.happyhorse.spec import HappyHorseSpec
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel, SwiGLU
from happyhorse_train.models.presets import load_preset
from happyhorse_train.planner.measure import LiveTensorBytes
from happyhorse_train.training.adapters import make_trainable
from tests.conftest import run_script

SMALL_CLIP = (144, 96, 17)  # width, height, frames: 5 x 12 x 18 latent cells -> 270 video tokens
TEXT_TOKENS = 16
RANK = 4


def _trained_model(preset_name: str, lora_rank: int | None, folder):
    """A preset's transformer, random, saved and loaded back by diffusers as the trainer loads it (bf16 for a
    LoRA, keeping the modules the class keeps in fp32; fp32 for a full fine-tune), then made trainable by the
    trainer's own code (LoRA adapters fp32, gaussian init so every path carries gradient). (model, spec)."""
    preset = load_preset(preset_name)
    spec = get_spec(preset["backbone"], TEXT_TOKENS)
    torch.manual_seed(0)
    spec.transformer_class(**preset["transformer"]).save_pretrained(folder)
    dtype = torch.float32 if lora_rank is None else torch.bfloat16
    model = spec.transformer_class.from_pretrained(folder, torch_dtype=dtype)
    lora = OmegaConf.create({"rank": lora_rank or 1, "alpha": lora_rank or 1, "dropout": 0.0, "target_modules": None,
                             "init": "gaussian"})
    mode = "full" if lora_rank is None else "lora"
    make_trainable(model, mode, lora, spec, torch.bfloat16)
    return model.train(), spec


def _saved_by_a_real_step(preset_name: str, model, spec, checkpointing: bool):
    """Run one real CPU training step at SMALL_CLIP (bf16 autocast, as the trainer) and return ({storage
    address: bytes} of everything autograd saved, weights excluded; the storage addresses of the blocks'
    inputs; those of their first input, the hidden states)."""
    preset = load_preset(preset_name)
    latent = planner.latent_shape(preset, *SMALL_CLIP)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent, generator=generator)
    text = torch.randn(1, TEXT_TOKENS, preset["transformer"]["text_dim"], generator=generator)
    mask = None  # unpadded text: the trainer passes no mask (training/step.py)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, block_inputs, hidden_states = {}, set(), set()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def remember_inputs(module, args):
        block_inputs.update(a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor))
        hidden_states.add(args[0].untyped_storage().data_ptr())

    hooks = [block.register_forward_pre_hook(remember_inputs) for block in model.blocks]
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        with planner.flash_like_attention():  # the backward's recompute must see the same attention
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    prediction = spec.predict_velocity(model, latents, torch.tensor([500.0]), text, mask)
                loss = F.mse_loss(prediction.float(), torch.randn(prediction.shape, generator=generator))
            loss.backward()  # the step really runs, the flash-like attention's backward included
    finally:
        for hook in hooks:
            hook.remove()
        model.disable_gradient_checkpointing()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return saved, block_inputs, hidden_states


def test_meta_parameter_and_lora_bytes_equal_a_real_models_tensors():
    preset = load_preset("tiny")
    facts = planner.model_facts(preset, RANK)
    torch.manual_seed(0)
    model = HappyHorseTransformer3DModel(**preset["transformer"])
    lora = OmegaConf.create({"rank": RANK, "alpha": RANK, "dropout": 0.0, "target_modules": None, "init": "default"})
    make_trainable(model, "lora", lora, HappyHorseSpec(), torch.bfloat16)  # as the trainer does
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert facts.base_bytes("bf16") == sum(p.numel() * p.element_size() for p in frozen)
    assert 4 * facts.lora_params == sum(p.numel() * p.element_size() for p in trained)  # fp32 adapters
    assert facts.total_params == sum(p.numel() for p in frozen)
    assert facts.block_params == [sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in model.blocks]


@pytest.mark.parametrize("base_format", ["int8", "nf4"])
def test_quantized_block_bytes_equal_bitsandbytes_quantized_tensors(base_format):
    facts = planner.model_facts(load_preset("tiny"), None)
    torch.manual_seed(0)
    model = HappyHorseTransformer3DModel(**load_preset("tiny")["transformer"]).to(torch.bfloat16)
    for block, planned in zip(model.blocks, facts.block_bytes):
        real = 0
        for module in block.modules():
            if type(module) is torch.nn.Linear:
                if base_format == "nf4":
                    packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
                    real += packed.nbytes + state.absmax.nbytes
                else:
                    values, row_scales, _ = bnb_functional.int8_vectorwise_quant(module.weight.data.half())
                    real += values.nbytes + row_scales.nbytes
                real += 0 if module.bias is None else module.bias.nbytes  # biases stay bf16
        linear_params = {id(p) for m in block.modules() if type(m) is torch.nn.Linear for p in m.parameters()}
        real += sum(p.nbytes for p in block.parameters() if id(p) not in linear_params)  # norms, modulation
        assert planned[base_format] == real


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # fp32 RMSNorm weights, bf16 input
@pytest.mark.parametrize("preset, lora_rank", [("tiny", RANK), ("tiny", None), ("wan-tiny", RANK), ("wan-tiny", None)])
def test_meta_activation_bytes_equal_a_real_cpu_steps_saved_tensors(preset, lora_rank, tmp_path):
    """The planner's meta-device count (autocast emulated for matmuls) against a real CPU step under real
    autocast, both with the flash-like attention (diffusers' dispatch for Wan). CPU autocast also runs a few
    other ops in fp32, so the totals may differ slightly; the checkpointed block inputs agree to the byte."""
    profile = planner.measure_activations(preset, *SMALL_CLIP, lora_rank=lora_rank, text_tokens=TEXT_TOKENS)
    model, spec = _trained_model(preset, lora_rank, tmp_path)

    saved, _, _ = _saved_by_a_real_step(preset, model, spec, checkpointing=False)
    assert profile.saved_total == pytest.approx(sum(saved.values()), rel=0.01)

    saved, block_inputs, hidden_states = _saved_by_a_real_step(preset, model, spec, checkpointing=True)
    assert profile.boundary == sum(nbytes for address, nbytes in saved.items() if address in block_inputs)
    # What activation offload moves to host RAM: each block's hidden-state input.
    hidden = sum(nbytes for address, nbytes in saved.items() if address in hidden_states)
    assert profile.hidden_states() == hidden
    # With checkpointing only the block inputs are kept, besides what lies outside the blocks.
    assert profile.boundary + profile.saved_outside_blocks == pytest.approx(sum(saved.values()), rel=0.01)
    assert profile.video_tokens == 270 and profile.text_tokens == TEXT_TOKENS


def test_flash_like_attention_matches_sdpa_forward_and_backward():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = False
    ours = planner.FlashLikeAttention.apply(q, k, v, mask)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, reference)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected)


def test_activations_grow_linearly_with_tokens():
    """At twice the tokens (width and prompt both doubled) the 8b model saves twice the bytes: a flash-like
    kernel keeps no tokens x tokens term. Attention FLOPs, by contrast, quadruple."""
    one = planner.measure_activations("8b", 480, 320, 17, lora_rank=32, text_tokens=128)
    two = planner.measure_activations("8b", 960, 320, 17, lora_rank=32, text_tokens=256)
    assert two.sequence_tokens == 2 * one.sequence_tokens
    assert two.saved_total / one.saved_total == pytest.approx(2.0, rel=0.01)
    assert two.boundary / one.boundary == pytest.approx(2.0, rel=0.01)
    assert max(two.saved_per_block) / max(one.saved_per_block) == pytest.approx(2.0, rel=0.01)
    assert two.attention_flops / one.attention_flops == pytest.approx(4.0, rel=0.01)


def test_cli_picks_a_setting_that_fits_a_24_gib_card():
    result = run_script("data_tools/plan_memory.py", "--preset", "8b", "--gpu-memory", "24", "--host-ram", "64",
                        "--size", "720x480x121", "--lora-rank", "32")
    assert result.returncode == 0, result.stderr
    pick = re.search(r"^pick: .*?([\d.]+) GiB GPU, ([\d.]+) GiB host RAM", result.stdout, re.MULTILINE)
    assert pick, result.stdout
    assert float(pick.group(1)) <= 24 * 0.9 and float(pick.group(2)) <= 64 * 0.9
    paste = r"train\.py trainer\.mode=lora lora\.rank=32 memory\.base_weights=\S+ .*memory\.blocks_to_swap=\d+"
    assert re.search(paste, result.stdout)
    assert "text encoder and VAE are assumed off the GPU" in result.stdout


def test_cli_says_why_nothing_fits(capsys):
    from data_tools.plan_memory import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "8b", "--gpu-memory", "4", "--host-ram", "8", "--size", "720x480x49", "--full", "--json"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert plan["pick"] is None and not any(c["fits"] for c in plan["candidates"])
    assert err.startswith("error: no setting fits: the smallest GPU estimate is ")
    assert "usable per GPU" in err and "host RAM" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "preset, size, message",
    [
        ("nope", "720x480x121", r"^error: no model preset 'nope'; known presets: 8b, 8b-i2v, tiny, wan-tiny"),
        ("8b", "720x480", r"^error: size '720x480' is not WIDTHxHEIGHTxFRAMES"),
        ("8b", "720x481x121", r"^error: height=481 does not fit the model: it must be a multiple of 16"),
        ("8b", "720x480x120", r"^error: num_frames=120 is not of the form 4k\+1"),
    ],
)
def test_cli_bad_preset_or_size_is_a_one_line_error(capsys, preset, size, message):
    from data_tools.plan_memory import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", preset, "--gpu-memory", "24", "--host-ram", "64", "--size", size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(message, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("num_gpus", [1, 2])
def test_the_picked_override_line_passes_train_py_config_schema(num_gpus):
    """The pick's printed command line, composed with train.py's Hydra config: every override exists in the
    schema and lands as the planner meant it; an accelerate config it names is shipped."""
    from hydra import compose, initialize_config_dir

    from happyhorse_train.config import register_configs
    from happyhorse_train.models.presets import CONFIG_DIR

    request = planner.PlanRequest(preset="8b", gpu_memory_gib=24, host_ram_gib=64 * num_gpus, width=720, height=480,
                                  frames=121, num_gpus=num_gpus, lora_rank=32)
    result = planner.plan(request)
    pick = result.pick
    assert pick is not None, planner.render_plan(result)
    line = re.search(r"^  (accelerate launch .*?)?train\.py (.*)$", planner.render_plan(result), re.MULTILINE)
    assert line, planner.render_plan(result)
    if num_gpus > 1:
        assert pick.setting.accelerate_config is not None
        config_file = re.search(r"--config_file (\S+) --num_processes (\d+) ", line.group(1))
        assert config_file and config_file.group(1) == pick.setting.accelerate_file()
        assert int(config_file.group(2)) == num_gpus
        assert (CONFIG_DIR.parent / config_file.group(1)).is_file()
    else:
        assert line.group(1) is None and pick.setting.accelerate_config is None

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        overrides = ["model=8b", "data.dataset=unused", "output_dir=unused", *line.group(2).split()]
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.mode == "lora" and cfg.lora.rank == 32
    assert cfg.memory.base_weights == pick.setting.base_weights
    assert cfg.trainer.gradient_checkpointing == pick.setting.gradient_checkpointing
    assert cfg.memory.offload_activations == pick.setting.offload_activations
    assert cfg.memory.blocks_to_swap == pick.setting.blocks_to_swap
    assert cfg.optimizer.name == pick.setting.optimizer


def test_candidate_accelerate_configs_are_shipped():
    from happyhorse_train.models.presets import CONFIG_DIR
    from happyhorse_train.planner.assumptions import ACCELERATE_CONFIGS

    request = planner.PlanRequest(preset="tiny", gpu_memory_gib=24, host_ram_gib=64, width=64, height=64, frames=5,
                                  num_gpus=2)
    used = {s.accelerate_config for s in planner.candidate_settings(request)}
    assert used == set(ACCELERATE_CONFIGS)
    for name in used:
        assert (CONFIG_DIR / "accelerate" / f"{name}.yaml").is_file(), name


def test_live_tensor_bytes_counts_what_a_forward_holds_at_its_worst_moment():
    mlp = SwiGLU(64, 256).to("meta")
    x = torch.empty(2, 1000, 64, device="meta")
    hidden = 2 * 1000 * 256 * 4  # one float32 (batch, tokens, ffn) tensor
    with torch.no_grad(), LiveTensorBytes([*mlp.parameters(), x]) as whole:
        out = mlp(x)
    assert whole.peak == 3 * hidden  # silu(gate), up and their product, until down_proj's output frees them
    assert whole.live == out.numel() * 4

    chunk_feed_forwards(mlp, ("SwiGLU",), chunk_tokens=500)
    with torch.no_grad(), LiveTensorBytes([*mlp.parameters(), x]) as chunked:
        mlp(x)
    assert chunked.peak == 3 * hidden // 2 + 2 * 500 * 64 * 4  # half the hidden state, beside the first chunk's output


def test_chunked_mlps_cut_the_8b_guided_forwards_working_memory():
    whole = planner.measure.measure_inference_peak("8b", 720, 480, 121)
    chunked = planner.measure.measure_inference_peak("8b", 720, 480, 121, ffn_chunk_tokens=8192)
    assert 10 * 2**30 < whole < 14 * 2**30  # 12.0 GiB when measured; the MLP's three hidden tensors are 6.8
    assert chunked < 0.65 * whole


def test_the_vae_working_memory_is_measured_for_encode_and_decode():
    peaks = planner.measure.measure_vae_peaks("8b", 720, 480, 17)
    # Measured: encode 4.5 GiB, decode 6.3 GiB (6.7 at 121 frames: the Wan VAE runs causally, a few frames at a time)
    assert 3 * 2**30 < peaks["encode"] < peaks["decode"] < 8 * 2**30


def test_fsdp_shards_a_full_fine_tune_and_sharded_engines_count_the_whole_model_before_sharding():
    # 8B full fine-tune: 4 x 80 GB takes FSDP and ZeRO-3 (weights, gradients and states / 4); on 4 x 24 GB the
    # fp32 transformer alone (32 GB) is on each GPU before `prepare` shards it, so nothing fits.
    big = planner.plan(planner.PlanRequest(preset="8b", gpu_memory_gib=80, host_ram_gib=512, width=720, height=480,
                                           frames=49, num_gpus=4, lora_rank=None))
    by_config = {e.setting.accelerate_config: e for e in big.estimates if e.setting.changed_overrides() == [
        f"[{e.setting.accelerate_config}]"]}
    assert by_config["fsdp"].fits and by_config["deepspeed_zero3"].fits and not by_config["multi_gpu"].fits
    # ... and ends by gathering the fp32 model into process 0's host RAM
    assert by_config["fsdp"].host_peak_moment == "saving"
    assert by_config["fsdp"].host_terms["final weights gathered on process 0"] == 4 * big.facts.total_params
    # fp32 weights / 4 plus two gathered bf16 blocks, against ZeRO-2's whole bf16 copy
    assert by_config["fsdp"].gpu_terms["weights"] < 0.7 * by_config["deepspeed_zero2"].gpu_terms["weights"]
    small = planner.plan(planner.PlanRequest(preset="8b", gpu_memory_gib=24, host_ram_gib=512, width=720, height=480,
                                             frames=49, num_gpus=4, lora_rank=None))
    assert small.pick is None
    offload = min((e for e in small.estimates if e.setting.accelerate_config == "deepspeed_zero3_offload"),
                  key=lambda e: e.gpu_peak)
    assert offload.gpu_peak_moment == "loading, before sharding"
    assert offload.gpu_terms["whole transformer"] == 4 * small.facts.total_params
