"""Real faults, injected into real runs: signals, bad numbers, full disks, corrupt caches, wrong paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from happyhorse_train.demo.clips import DEMO_CLIPS
from tests.conftest import REPO, run_script
from tests.integration.conftest import FAST, make_dataset
from tests.integration.test_train import eval_losses, losses, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("reliability_data"), DEMO_CLIPS)


def common(model: Path, dataset: Path, out: Path, steps: int) -> list[str]:
    return [
        f"model.path={model}", f"data.dataset={dataset}", f"output_dir={out}", f"trainer.max_steps={steps}",
        "data.batch_size=2",
    ]


SIGNAL_RUN_STEPS = 30


# An eval loss every 10 steps: the resumed run computes some of them, the stopped one the others.
SIGNAL_RUN = ["trainer.checkpoint_every=0", "eval.every=10"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, demo_model_dir, tmp_path_factory) -> Path:
    """The run a signalled and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    straight = train(*common(demo_model_dir, dataset, out, SIGNAL_RUN_STEPS), *SIGNAL_RUN)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert sorted(eval_losses(out)) == [0, 10, 20, 30]
    return out


def test_a_signal_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    uninterrupted, dataset, demo_model_dir, tmp_path
):
    signal_to_send = signal.SIGTERM  # (SIGINT takes the same handler: tests/unit/test_stop_request.py)
    steps = SIGNAL_RUN_STEPS
    out = tmp_path / "signalled"
    args = [
        sys.executable, "train.py", "+experiment=demo", *FAST, *common(demo_model_dir, dataset, out, steps),
        *SIGNAL_RUN,
    ]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(losses(out)) < 4:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be signalled"
    os.kill(process.pid, signal_to_send)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped_at = len(losses(out))
    assert f"stopped by {signal_to_send.name} at step {stopped_at}" in stdout and stopped_at < steps
    assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()

    resumed = train(*common(demo_model_dir, dataset, out, steps), *SIGNAL_RUN, "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(uninterrupted)
    assert eval_losses(out) == eval_losses(uninterrupted)  # one process both times: bitwise


def test_overflowing_steps_are_skipped_then_the_run_halts_with_finite_state(dataset, demo_model_dir, tmp_path):
    # lr 1e30: Adam's first step moves every LoRA weight by ~1e30 (still finite); from then on the forward
    # overflows, so every step's gradient is non-finite and must be skipped, three in a row halting the run.
    result = train(*common(demo_model_dir, dataset, tmp_path, 20), "optimizer.lr=1e30", "optimizer.max_grad_norm=0",
                   "trainer.checkpoint_every=1", "trainer.max_consecutive_nonfinite=3")
    assert result.returncode == 2
    assert "3 steps in a row had a non-finite loss or gradient (at step 1)" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert all(
        torch.isfinite(v).all() for state in optimizer["state"].values() for v in state.values() if torch.is_tensor(v)
    )


def test_a_nan_clip_skips_its_steps_and_training_goes_on(dataset, demo_model_dir, tmp_path):
    from happyhorse_train.data.latent_cache import LatentCache

    cache_dir = tmp_path / "cache"
    filled = run_script(
        "data_tools/cache_latents.py", str(dataset), "--model", str(demo_model_dir), "--cache", str(cache_dir),
        "--max-sequence-length", "32", "--no-progress",
    )
    assert filled.returncode == 0, filled.stderr[-2000:]
    cache = LatentCache(cache_dir)
    # A landscape clip (latent 4 x 6): the lone portrait clip never fills a batch of 2, so it never trains.
    key = next(k for k in sorted(cache.keys()) if k.startswith("v") and cache.get(k)["mean"].shape[-1] == 6)
    shard = cache.shard_dir / cache._location[key]
    tensors = {name: tensor.clone() for name, tensor in load_file(shard).items()}
    tensors[f"{key}/mean"] = torch.full_like(tensors[f"{key}/mean"], float("nan"))
    # A well-formed shard whose name is its checksum, as only a faulty encoder could leave it (the cache's
    # own writer refuses non-finite values, and the start-up check would re-encode a tampered file).
    import hashlib

    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt"})
    shard.unlink()
    (cache.shard_dir / f"b2-{hashlib.blake2b(data, digest_size=16).hexdigest()}.safetensors").write_bytes(data)
    (cache_dir / "index.json").unlink()

    result = train(*common(demo_model_dir, dataset, tmp_path / "out", 8), f"data.cache={cache_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    from happyhorse_train.training.run_log import read_metrics

    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9)) and metrics[-1]["skipped_steps"] >= 1
    lora = load_file(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())


def run_with_file_size_limit(args: list[str], limit_bytes: int) -> subprocess.CompletedProcess:
    """Run with RLIMIT_FSIZE: a write past the limit fails with EFBIG, as a write to a full disk fails."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, preexec_fn=limit, timeout=600
    )


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_works(dataset, demo_model_dir, tmp_path):
    out = tmp_path / "out"
    # caches and checkpoints step 2
    first = train(*common(demo_model_dir, dataset, out, 2), "trainer.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    # The next checkpoint's files (~180 KB of LoRA weights, more of optimizer state) do not fit under 100 KB.
    limited = run_with_file_size_limit(
        [
            "train.py", "+experiment=demo", *FAST, *common(demo_model_dir, dataset, out, 4),
            "trainer.checkpoint_every=2", "resume=latest",
        ],
        100_000,
    )
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "could not write the step-4 checkpoint" in limited.stderr and "step-00000002, is intact" in limited.stderr
    assert "Traceback" not in limited.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # no half-written step 4 left

    resumed = train(*common(demo_model_dir, dataset, out, 4), "trainer.checkpoint_every=2", "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(losses(out)) == 4


def test_a_full_disk_while_caching_loses_nothing_and_a_rerun_completes(dataset, demo_model_dir, tmp_path):
    args = [
        "data_tools/cache_latents.py", str(dataset), "--model", str(demo_model_dir),
        "--max-sequence-length", "32", "--no-progress",
    ]
    # a shard of 2 clips is ~19 KB
    limited = run_with_file_size_limit([*args, "--cache", str(tmp_path / "cache"), "--shard-size", "2"], 12_000)
    assert limited.returncode == 2 and "could not write a cache shard" in limited.stderr
    assert "Traceback" not in limited.stderr
    shards = tmp_path / "cache" / "shards"
    assert not [p for p in shards.iterdir() if not p.name.endswith(".safetensors")]  # no temporary file left behind
    rerun = run_script(*args, "--cache", str(tmp_path / "cache"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    straight = run_script(*args, "--cache", str(tmp_path / "straight"))
    assert straight.returncode == 0
    from tests.integration.test_cache import assert_same_cache

    assert_same_cache(tmp_path / "cache", tmp_path / "straight")


def test_a_model_folder_missing_a_component_is_one_line_before_loading(dataset, demo_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(demo_model_dir, broken)
    shutil.rmtree(broken / "vae")
    result = train(*common(broken, dataset, tmp_path / "out", 2))
    assert result.returncode == 2 and "is missing the component(s) vae" in result.stderr
    assert "Traceback" not in result.stderr and "Loading pipeline components" not in result.stderr


def test_an_output_folder_that_cannot_be_made_is_refused_before_loading(dataset, demo_model_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    # root can write anywhere, but not under a file
    result = train(*common(demo_model_dir, dataset, tmp_path / "a_file" / "run", 2))
    assert result.returncode == 2 and "is not writable" in result.stderr and "Traceback" not in result.stderr
    assert "Loading pipeline components" not in result.stderr


def test_resuming_with_another_number_of_processes_says_why_it_cannot(dataset, demo_model_dir, tmp_path):
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = run_script(*launcher, "train.py", "+experiment=demo", *FAST, *common(demo_model_dir, dataset, tmp_path, 2))
    assert two.returncode == 0, two.stderr[-2000:]
    one = train(*common(demo_model_dir, dataset, tmp_path, 4), "resume=latest")
    assert one.returncode == 2
    assert "was written by 2 process(es), this run has 1: resume with the same number of processes" in one.stderr


def test_corrupt_cache_shards_are_detected_moved_aside_and_re_encoded(dataset, demo_model_dir, tmp_path):
    from happyhorse_train.data.latent_cache import LatentCache
    from tests.integration.test_cache import cache_contents

    cache_dir = tmp_path / "cache"
    args = ["data_tools/cache_latents.py", str(dataset), "--model", str(demo_model_dir), "--max-sequence-length", "32",
            "--no-progress", "--shard-size", "1"]
    assert run_script(*args, "--cache", str(cache_dir)).returncode == 0
    before = cache_contents(cache_dir)
    shards = sorted((cache_dir / "shards").glob("*.safetensors"))
    flipped, truncated = shards[0], shards[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: the header still parses
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    result = train(*common(demo_model_dir, dataset, tmp_path / "out", 2), f"data.cache={cache_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cache: {flipped.name} moved to" in result.stdout and "checksum mismatch" in result.stdout
    assert f"cache: {truncated.name} moved to" in result.stdout
    assert sorted(p.name for p in (cache_dir / "corrupt").iterdir()) == sorted([flipped.name, truncated.name])
    after = cache_contents(cache_dir)  # every entry is back, re-encoded to the same values
    assert after.keys() == before.keys()
    differing = [
        (k, f, (after[k][f] - before[k][f]).abs().max().item())
        for k in before
        for f in before[k]
        if not torch.equal(after[k][f], before[k][f])
    ]
    assert differing == []
    assert LatentCache(cache_dir).verify() == []


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_latest_picks_it(
    dataset, demo_model_dir, tmp_path
):
    from happyhorse_train.training.checkpoint import list_checkpoints, resolve_resume

    out = tmp_path / "out"
    # A full fine-tune checkpoints the whole transformer and its Adam states every step: writes long enough to hit.
    args = [sys.executable, "train.py", "+experiment=demo", *FAST, *common(demo_model_dir, dataset, out, 200),
            "trainer.mode=full", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints, caught = out / "checkpoints", None
    deadline = time.monotonic() + 300
    while caught is None and time.monotonic() < deadline and process.poll() is None:
        if checkpoints.is_dir() and list_checkpoints(out):
            caught = next((p for p in checkpoints.iterdir() if p.name.endswith(".tmp")), None)
    if caught is not None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert caught is not None, "no checkpoint write was caught in progress; the test proves nothing"
    assert caught.exists(), "the half-written checkpoint should still be on disk after SIGKILL"

    complete = list_checkpoints(out)
    assert complete and all(not p.name.startswith(".") for p in complete)
    latest = resolve_resume(out, "latest", print)
    assert latest == complete[-1] and int(latest.name.split("-")[1]) < int(caught.name.split("-")[1].split(".")[0])
    resumed = train(*common(demo_model_dir, dataset, out, int(latest.name.split("-")[1]) + 2), "trainer.mode=full",
                    "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2", "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest}" in resumed.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # the stale temporary was cleared


def test_damaged_checkpoints_and_a_torn_metrics_line_fall_back_to_the_newest_intact_checkpoint(
    dataset, demo_model_dir, tmp_path
):
    from tests.unit.test_checkpoint import flip_bytes

    out = tmp_path / "out"
    every = ["trainer.checkpoint_every=2", "trainer.keep_checkpoints=3", "eval.every=0"]
    first = train(*common(demo_model_dir, dataset, out, 6), *every)
    assert first.returncode == 0, first.stderr[-2000:]
    straight = losses(out)
    checkpoints = out / "checkpoints"
    flip_bytes(checkpoints / "step-00000006" / "trainable.safetensors")  # used in silence before manifests
    (checkpoints / "step-00000004" / "optimizer.pt").write_bytes(b"")
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 7, "lo')  # a kill mid-write

    named = train(*common(demo_model_dir, dataset, out, 8), *every, f"resume={checkpoints / 'step-00000006'}")
    assert named.returncode == 2 and named.stderr.strip().splitlines()[-1].startswith("error: resume=")
    assert "the checkpoint is damaged (trainable.safetensors does not match its checksum)" in named.stderr

    resumed = train(*common(demo_model_dir, dataset, out, 8), *every, "resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-00000006 is damaged (trainable.safetensors does not match its checksum)" in resumed.stdout
    assert "step-00000004 is damaged (optimizer.pt has 0 bytes" in resumed.stdout
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2" in resumed.stdout
    again = losses(out)
    assert len(again) == 8 and again[:6] == straight  # steps 3-6 redone exactly, each logged once


def test_a_failed_final_write_is_one_line_and_resume_latest_writes_the_weights(dataset, demo_model_dir, tmp_path):
    # An OSError at the final writes, as a full disk gives: the LoRA's folder name is taken by a file, the loss
    # curve's by a folder.
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora").write_text("in the way")
    failed = train(*common(demo_model_dir, dataset, out, 2), "eval.every=0")
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the trained weights into {out} (")
    assert f"the last complete checkpoint, {out / 'checkpoints' / 'step-00000002'}, is intact" in last
    (out / "lora").unlink()
    (out / "loss_curve.png").mkdir()
    resumed = train(*common(demo_model_dir, dataset, out, 2), "eval.every=0", "resume=latest")
    assert resumed.returncode == 2 and "wrote the LoRA" in resumed.stdout
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert resumed.stderr.strip().splitlines()[-1].startswith("error: could not write loss_curve.png (")
