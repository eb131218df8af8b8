"""benchmarks/train_step.py: the toolkit's step computes the textbook flow-matching loss and gradients."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toolkit_loss_and_lora_grads_match_hand_written_baseline():
    result = _bench().numerics_check(preset="tiny", size=(144, 96, 17), mode="lora", rank=8, device="cpu")
    assert result["dtype"] == "torch.float32"
    assert result["grad_tensors_compared"] > 0
    assert result["loss_toolkit"] == pytest.approx(result["loss_baseline"], rel=1e-5)
    assert result["loss_rel_diff"] <= 1e-5
    assert result["grad_max_rel_diff"] <= 1e-5, result["grad_worst_param"]


def test_toolkit_with_kept_attention_matches_the_baseline_too():
    memory = _bench().memory_settings(SimpleNamespace(
        base_weights="bf16", offload_activations=False, blocks_to_swap=0, saved_attention_blocks=2))
    result = _bench().numerics_check(preset="tiny", size=(144, 96, 17), rank=8, device="cpu", memory=memory)
    assert result["loss_rel_diff"] <= 1e-5 and result["grad_max_rel_diff"] <= 1e-5, result["grad_worst_param"]


def test_inference_benchmark_guided_batch_equals_two_forwards(tmp_path):
    out = tmp_path / "inference.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "inference_forward.py"), "--preset", "tiny", "--size",
               "144x96x17", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    # One batch of (prompt, padded and masked empty prompt) computes what two separate forwards compute.
    assert result["guided_output_max_rel_diff"] < 1e-5 and result["forward_output_max_rel_diff"] < 1e-5
    assert result["forward_ratio_baseline_over_toolkit"] > 0 and result["guided_ratio_baseline_over_toolkit"] > 0


def test_numerics_check_notices_a_different_step():
    bench = _bench()
    textbook = bench.baseline_loss
    bench.baseline_loss = lambda model, x0, noise, sigma, text, device: textbook(
        model, x0, noise, sigma * 1.01, text, device
    )
    result = bench.numerics_check(preset="tiny", size=(144, 96, 17), mode="lora", rank=8, device="cpu")
    assert result["grad_max_rel_diff"] > 1e-3


def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--size", "144x96x17", "--steps", "2",
               "--warmup", "1", "--device", "cpu", "--json", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    for side in ("toolkit", "baseline"):
        assert len(result[side]["step_times_s"]) == 2
        assert result[side]["median_step_s"] > 0
        assert 0 < result[side]["mfu"]
        assert result[side]["peak_memory_bytes"] > 0
    assert result["ratio_baseline_over_toolkit"] > 0
    assert result["matmul_peak_flops"] > 0
    numerics = result["numerics"]
    assert numerics["loss_rel_diff"] <= 1e-5 and numerics["grad_max_rel_diff"] <= 1e-5
