"""The latent cache on real clips and the tiny model's real VAE and text encoder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from happyhorse_train.data.cache_fill import fill_cache
from happyhorse_train.data.clip_rules import Bucket, ClipRules
from happyhorse_train.data.dataset import CachedClipDataset, collate_clips
from happyhorse_train.data.latent_cache import LatentCache
from happyhorse_train.data.prepare import load_manifest, prepare_clips, write_dataset_folder
from happyhorse_train.data.sampler import BucketBatchSampler
from happyhorse_train.models.happyhorse import load_pipeline
from happyhorse_train.models.happyhorse.clip_encoder import HappyHorseClipEncoder
from tests.conftest import REPO, run_script
from tests.media import write_still, write_video

RULES = ClipRules(buckets=[Bucket(9, 32, 48), Bucket(9, 48, 32)], min_frames=9)


def make_dataset(source, output, count: int, portrait_every: int = 3):
    for i in range(count):
        # 64x40 and 40x64: decord 0.6.0 mis-sizes frames exactly 48 px wide (padded rows), so avoid that width
        size = dict(width=40, height=64) if i % portrait_every == 2 else dict(width=64, height=40)
        write_video(source / f"clip_{i:02d}.mp4", 12, 24, caption=f"clip number {i}", **size)
    return refresh_dataset(source, output)


def refresh_dataset(source, output):
    result = prepare_clips(source, RULES, num_workers=1, progress=False)
    write_dataset_folder(result, source, output, RULES)
    return load_manifest(output)


@pytest.fixture(scope="module")
def encoder(demo_model_dir):
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    return HappyHorseClipEncoder(pipe, demo_model_dir, max_sequence_length=32)


def cache_contents(folder) -> dict[str, dict[str, torch.Tensor]]:
    """Copies, not views: safetensors maps shard files into memory, and a test may truncate them later."""
    cache = LatentCache(folder)
    return {key: {field: t.clone() for field, t in cache.get(key).items()} for key in sorted(cache.keys())}


def assert_same_cache(a, b, exact: bool = True):
    """Same keys, fields and shapes; the same values bitwise when `exact`, else within float32 rounding."""
    contents_a, contents_b = cache_contents(a), cache_contents(b)
    assert contents_a.keys() == contents_b.keys() and contents_a
    for key in contents_a:
        assert contents_a[key].keys() == contents_b[key].keys()
        for field in contents_a[key]:
            got, expected = contents_a[key][field], contents_b[key][field]
            if exact:
                assert torch.equal(got, expected), (key, field)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{key} {field}")


def test_second_run_encodes_nothing_and_a_new_video_only_its_clip(tmp_path, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 4)
    cache = LatentCache(tmp_path / "cache")
    first = fill_cache(manifest, cache, encoder, progress=False)
    assert (first.videos_encoded, first.texts_encoded, first.failed) == (4, 5, [])  # 4 captions + the empty one

    again = fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)
    assert (again.videos_encoded, again.texts_encoded) == (0, 0)

    write_video(tmp_path / "src" / "new.mp4", 12, 24, caption="a new clip")
    write_still(tmp_path / "src" / "still.png", 60, 40, caption="clip number 0")  # a caption already cached
    manifest = refresh_dataset(tmp_path / "src", tmp_path / "ds")
    added = fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)
    assert (added.videos_encoded, added.texts_encoded) == (2, 1)

    entry = LatentCache(tmp_path / "cache").get(sorted(k for k in cache.keys() if k.startswith("v"))[0])
    # 9 frames at 32x48 (or 48x32) -> 3 x 4 x 6 latent cells
    assert tuple(entry["mean"].shape) in {(16, 3, 4, 6), (16, 3, 6, 4)} and (entry["std"] > 0).all()


def test_a_changed_vae_invalidates_only_the_latents(tmp_path, demo_model_dir, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 3)
    fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)

    other_model = tmp_path / "model"
    shutil.copytree(demo_model_dir, other_model)
    pipe = load_pipeline(other_model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for param in pipe.vae.parameters():
            param.mul_(1.01)
    pipe.vae.save_pretrained(other_model / "vae")
    other = HappyHorseClipEncoder(load_pipeline(other_model, torch.device("cpu"), torch.float32), other_model, 32)

    assert other.video_id != encoder.video_id and other.text_id == encoder.text_id
    stats = fill_cache(manifest, LatentCache(tmp_path / "cache"), other, progress=False)
    assert (stats.videos_encoded, stats.texts_encoded) == (3, 0)


def test_a_clip_that_no_longer_decodes_is_skipped_and_recorded(tmp_path, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 4)
    (tmp_path / "src" / "clip_01.mp4").write_bytes(b"overwritten after prepare")
    (tmp_path / "src" / "clip_03.mp4").unlink()
    stats = fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)
    assert stats.videos_encoded == 2
    reasons = {Path(failure["source"]).name: failure["reason"] for failure in stats.failed}
    assert reasons["clip_01.mp4"].startswith("not a video: the bytes are")
    assert reasons["clip_03.mp4"] == "the file is gone (moved or deleted since prepare_clips)"
    assert "clip_01.mp4" in (tmp_path / "cache" / "failures-rank0.json").read_text()

    dataset = CachedClipDataset(manifest, LatentCache(tmp_path / "cache"), encoder.video_id, encoder.text_id)
    assert len(dataset) == 2 and len(dataset.missing) == 2


def test_dataset_batches_have_one_shape_and_padded_text(tmp_path, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 6)
    fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)
    dataset = CachedClipDataset(manifest, LatentCache(tmp_path / "cache"), encoder.video_id, encoder.text_id)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=BucketBatchSampler(dataset.buckets, batch_size=2, seed=0), collate_fn=collate_clips
    )
    batches = list(loader)
    assert len(batches) == 3  # 4 landscape clips -> 2 batches, 2 portrait -> 1
    shapes = {tuple(b["latent_mean"].shape) for b in batches}
    assert shapes == {(2, 16, 3, 4, 6), (2, 16, 3, 6, 4)}
    for batch in batches:
        lengths = batch["text_mask"].sum(1)
        assert batch["text_states"].shape[:2] == batch["text_mask"].shape
        assert lengths.max() == batch["text_mask"].shape[1]
        assert (batch["text_states"][~batch["text_mask"]] == 0).all()


def test_a_killed_caching_run_resumes_to_the_same_cache(tmp_path, demo_model_dir):
    clips = len(make_dataset(tmp_path / "src", tmp_path / "ds", 16))
    command = [sys.executable, "data_tools/cache_latents.py", str(tmp_path / "ds"), "--model", str(demo_model_dir)]
    command += ["--max-sequence-length", "32", "--shard-size", "1", "--no-progress"]

    process = subprocess.Popen(
        [*command, "--cache", str(tmp_path / "killed")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shards = tmp_path / "killed" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("*.safetensors"))) < 3 and process.poll() is None:
        time.sleep(0.01)
    still_running = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert still_running, "the caching run finished before it could be killed; the test proves nothing"
    written = len(list(shards.glob("*.safetensors")))
    assert 3 <= written < clips

    resumed = run_script(*command[1:], "--cache", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Generating train split" not in resumed.stderr  # datasets' bar for reading one parquet file
    assert f"encoded {clips - written} clips" in resumed.stdout  # only what the killed run had not written
    straight = run_script(*command[1:], "--cache", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    assert_same_cache(tmp_path / "killed", tmp_path / "straight")


def test_two_processes_split_the_work_under_accelerate_launch(tmp_path, demo_model_dir):
    make_dataset(tmp_path / "src", tmp_path / "ds", 6)
    args = [str(tmp_path / "ds"), "--model", str(demo_model_dir), "--max-sequence-length", "32", "--no-progress"]
    launch = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "data_tools/cache_latents.py", *args, "--cache", str(tmp_path / "two"),
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "rank 0: encoded 3 clips" in launch.stdout and "rank 1: encoded 3 clips" in launch.stdout
    single = run_script("data_tools/cache_latents.py", *args, "--cache", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    # accelerate launch gives each worker one intra-op thread and the single process has two: the matmul
    # reductions run in another order, so the encodings agree to float32 rounding (4.9e-7 seen), not bitwise.
    assert_same_cache(tmp_path / "two", tmp_path / "one", exact=False)


def test_a_torn_cache_index_is_rebuilt_from_the_shards(tmp_path, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 2)
    fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, progress=False)
    LatentCache(tmp_path / "cache")  # picks up the new shards and writes the index
    index = tmp_path / "cache" / "index.json"
    whole = index.read_text()
    index.write_text(whole[: len(whole) // 2])  # a kill mid-write
    cache = LatentCache(tmp_path / "cache")
    assert index.read_text() == whole  # rebuilt, as it was
    assert fill_cache(manifest, cache, encoder, progress=False).videos_encoded == 0  # nothing re-encoded


def test_a_deleted_shard_is_named_and_a_missing_model_folder_is_one_line(tmp_path, encoder):
    manifest = make_dataset(tmp_path / "src", tmp_path / "ds", 2)
    fill_cache(manifest, LatentCache(tmp_path / "cache"), encoder, shard_size=1, progress=False)
    LatentCache(tmp_path / "cache")  # writes the index
    shard = sorted((tmp_path / "cache" / "shards").glob("*.safetensors"))[0]
    shard.unlink()
    cache = LatentCache(tmp_path / "cache")
    gone = 2 + 3 - len(cache)  # 2 clips, 3 captions (the empty one too)
    assert cache.check(verify=False) == [
        f"cache: {shard.name} ({gone} entries) is gone from {shard.parent}; its entries are encoded again"
    ]
    stats = fill_cache(manifest, cache, encoder, progress=False)
    assert stats.videos_encoded + stats.texts_encoded == gone > 0

    missing = run_script("data_tools/cache_latents.py", str(tmp_path / "ds"), "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: model folder not found: {tmp_path / 'nope'}" in missing.stderr
