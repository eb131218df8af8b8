"""Data throughput: the toolkit's decoding for prepare (the probe) and for the cache (decode + resize, no VAE),
each against the raw decoder (decord) reading the same frames at the same decode size in the same run.

    python benchmarks/data_throughput.py                    # 4 files of 3 s: about a minute on two cores
    python benchmarks/data_throughput.py --seconds 10 --repeats 3 --sizes 1920x1080,1280x720,720x480 --json out.json

Makes its own videos with ffmpeg in a temporary folder: testsrc2 (optionally with grain, --noise), H.264 in mp4,
one key frame every --gop frames (0: libx264's default, 250). Sizes x frame rates, --seconds each.

(a) probe: `video.probe` per file (opens the file at its size for the first frame and the fps, then decodes every
    frame at 64x64 to count them) and `count_decodable_frames` alone, vs decord `get_batch` of every frame at
    64x64 in chunks of 32.
(b) cache decode: the clips `prepare_clips` plans (sliding windows of --window frames at 24 fps every --stride,
    so they overlap), as pixels at their bucket size, without the VAE:
      before     `clip_pixels` per clip: a reader per clip, which decodes and resizes all the clip's frames
      toolkit    `decode_clips`: one reader per file, every source frame decoded and resized once
      raw/clip   decord get_batch of each clip's source frames at the source size (one reader per file, clips in
                 start order); the data issue's bar: toolkit >= 0.8 of this
      raw/pass   decord get_batch of each file's needed source frames once, in chunks of 16: the decoder's share
                 of the toolkit's work; the toolkit's ratio to it (on source frames) shows what the resize costs
(c) overlap: `fill_cache` with decode_ahead=1 (a thread decodes the next clip during the encode) vs 0, over the
    clips of the first --sizes entry, beside decode_clips alone and the encoder alone (runs alternating), with a
    stand-in encoder that sleeps as long per clip as the toolkit's decode takes (the CPU is free meanwhile, as
    while a GPU encodes); with --vae-clips N also the demo's trained tiny VAE (diffusers AutoencoderKLWan,
    happyhorse_train/demo/tiny_vae) on N clips, a real CPU encoder, competing with the decoder for the cores:
    slow (6 s or more a 17x480x720 clip on two cores).

Prints tables of frames, seconds, frames/s, clips/s and toolkit/raw ratios; the best of --repeats runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import decord
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from happyhorse_train.data.cache_fill import clip_pixels, fill_cache  # noqa: E402
from happyhorse_train.data.clip_decode import CHUNK_FRAMES, decode_clips  # noqa: E402
from happyhorse_train.data.clip_rules import (  # noqa: E402
    Bucket,
    ClipRules,
    clip_frame_indices,  # noqa: E402
)
from happyhorse_train.data.latent_cache import LatentCache  # noqa: E402
from happyhorse_train.data.prepare import prepare_clips  # noqa: E402
from happyhorse_train.data.video import count_decodable_frames, probe  # noqa: E402

# --- videos and clips ------------------------------------------------------------------------------------------


def ffmpeg_exe() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg  # the toolkit's own dependency ships a static ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_videos(folder: Path, sizes, rates, seconds: float, gop: int, noise: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for width, height in sizes:
        for fps in rates:
            path = folder / f"testsrc2_{width}x{height}_{fps}fps.mp4"
            command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                       "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"]
            command += ["-vf", f"noise=alls={noise}:allf=t"] if noise else []
            command += ["-g", str(gop)] if gop else []
            subprocess.run([*command, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
            paths.append(path)
    return paths


def plan_rows(folder: Path, args) -> list[dict]:
    height, width = args.bucket
    rules = ClipRules(target_fps=24.0, min_frames=args.window, mode="sliding", stride=args.stride,
                      buckets=[Bucket(args.window, height, width), Bucket(args.window, width, height)],
                      missing_caption="empty")
    result = prepare_clips(folder, rules, num_workers=1, progress=False)
    if result.dropped:
        raise SystemExit(f"prepare dropped files: {result.dropped}")
    return result.rows


def _reader(path, width: int = -1, height: int = -1):
    return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)


# --- measuring -------------------------------------------------------------------------------------------------


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """The fastest of `repeats` runs of each; the runs alternate, so a change in the machine's load hits all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(best_time(fn, 1))
    return {name: min(seconds) for name, seconds in times.items()}


def raw_count(paths) -> None:
    for path in paths:
        reader = _reader(path, 64, 64)
        total = len(reader)
        for start in range(0, total, 32):
            reader.get_batch(list(range(start, min(start + 32, total))))


def raw_per_clip(rows) -> None:
    for rows_of_file in by_file(rows).values():
        reader = _reader(rows_of_file[0]["source"])
        for row in rows_of_file:
            reader.get_batch(clip_frame_indices(row)).asnumpy()


def raw_one_pass(rows) -> None:
    for rows_of_file in by_file(rows).values():
        reader = _reader(rows_of_file[0]["source"])
        needed = unique_frames(rows_of_file)
        for start in range(0, len(needed), CHUNK_FRAMES):
            reader.get_batch(needed[start : start + CHUNK_FRAMES]).asnumpy()


def by_file(rows) -> dict[str, list[dict]]:
    files: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: (row["source"], row["start_frame"])):
        files.setdefault(row["source"], []).append(row)
    return files


def unique_frames(rows) -> list[int]:
    return sorted(set().union(*(clip_frame_indices(row) for row in rows)))


def line(name, frames, seconds, clips=None, base=None) -> dict:
    """A table row; `base` is the table's raw row it is compared with (ratio = its seconds / these, on equal frames)."""
    return {"path": name, "frames": frames, "seconds": seconds, "frames_per_s": frames / seconds, "clips": clips,
            "clips_per_s": clips / seconds if clips else None, "base": base}


def with_ratios(lines: list[dict]) -> list[dict]:
    for r in lines:
        r["ratio"] = lines[r["base"]]["seconds"] / r["seconds"] if r["base"] is not None else None
    return lines


def probe_table(paths, repeats: int) -> list[dict]:
    frames = sum(len(_reader(path)) for path in paths)
    t = best_times({"raw": lambda: raw_count(paths),
                    "counted": lambda: [count_decodable_frames(_reader(path, 64, 64)) for path in paths],
                    "probed": lambda: [probe(path) for path in paths]}, repeats)
    raw, counted, probed = t["raw"], t["counted"], t["probed"]
    return with_ratios([line("raw decord, every frame at 64x64", frames, raw, len(paths)),
                        line("count_decodable_frames", frames, counted, len(paths), base=0),
                        line("probe (prepare)", frames, probed, len(paths), base=0)])


def decode_table(rows, repeats: int) -> list[dict]:
    frames = sum(row["num_frames"] for row in rows)
    source_frames = sum(len(unique_frames(rows_of_file)) for rows_of_file in by_file(rows).values())
    keyed = [(row["clip_id"], row) for row in rows]
    t = best_times({"raw": lambda: raw_per_clip(rows), "toolkit": lambda: [None for _ in decode_clips(keyed)],
                    "before": lambda: [clip_pixels(row) for row in rows], "one_pass": lambda: raw_one_pass(rows)},
                   repeats)
    raw, toolkit, before, one_pass = t["raw"], t["toolkit"], t["before"], t["one_pass"]
    return with_ratios([line("raw/clip: decord, each clip's frames", frames, raw, len(rows)),
                        line("before: clip_pixels per clip", frames, before, len(rows), base=0),
                        line("toolkit: decode_clips", frames, toolkit, len(rows), base=0),
                        line("raw/pass: decord, each frame once", source_frames, one_pass),
                        line("toolkit: decode_clips, source frames", source_frames, toolkit, base=3)])


# --- overlap of decoding and encoding --------------------------------------------------------------------------


class IdleEncoder:
    """What fill_cache asks of an encoder, sleeping `seconds` a clip: the CPU is free meanwhile, as while a GPU
    encodes (a real CPU encoder: TinyVaeEncoder)."""

    kind, video_id, text_id = "idle", "stand-in:idle", "text:stand-in"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def encode_video(self, pixels: torch.Tensor, first_frame=None) -> dict[str, torch.Tensor]:
        time.sleep(self.seconds)
        summary = pixels.mean(dim=(2, 3))  # small, finite, and it reads every pixel
        return {"mean": summary, "std": summary.abs() + 1.0}

    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"text": torch.zeros(1, 4)} for _ in captions]


class TinyVaeEncoder(IdleEncoder):
    """The demo's trained tiny VAE, encoding as models/clip_encoder.VaeClipEncoder does."""

    def __init__(self):
        from diffusers import AutoencoderKLWan

        self.kind, self.video_id = "tiny VAE", "vae:demo-tiny"
        self.vae = AutoencoderKLWan.from_pretrained(ROOT / "happyhorse_train" / "demo" / "tiny_vae").eval()

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, first_frame=None) -> dict[str, torch.Tensor]:
        dist = self.vae.encode(pixels[None]).latent_dist
        return {"mean": dist.mean[0], "std": dist.std[0]}


def overlap_table(rows, folder: Path, decode_seconds: float, args) -> list[dict]:
    seconds = args.encode_seconds or decode_seconds / len(rows)
    out = [time_overlap(rows, folder, IdleEncoder(seconds), args.repeats)]
    if args.vae_clips:
        out.append(time_overlap(rows[: args.vae_clips], folder, TinyVaeEncoder(), args.repeats))
    return out


def time_overlap(rows, folder: Path, encoder, repeats: int) -> dict:
    """decode_clips alone, the encoder alone, and fill_cache with decode_ahead 0 and 1, alternating."""
    pixels = clip_pixels(rows[0])  # what it encodes does not change its time

    def fill(ahead: int) -> None:
        cache = folder / f"cache-{time.perf_counter_ns()}"
        stats = fill_cache(rows, LatentCache(cache), encoder, progress=False, decode_ahead=ahead)
        assert stats.videos_encoded == len(rows) and not stats.failed, stats.failed
        shutil.rmtree(cache)

    t = best_times({"decode": lambda: [None for _ in decode_clips([(r["clip_id"], r) for r in rows])],
                    "encode": lambda: [encoder.encode_video(pixels) for _ in rows],
                    "ahead0": lambda: fill(0), "ahead1": lambda: fill(1)}, repeats)
    return {"encoder": encoder.kind, "clips": len(rows), "frames": sum(row["num_frames"] for row in rows),
            "decode_s": t["decode"], "encode_s": t["encode"], "ahead0_s": t["ahead0"], "ahead1_s": t["ahead1"],
            "speedup": t["ahead0"] / t["ahead1"], "ideal_s": max(t["decode"], t["encode"])}


# --- printing --------------------------------------------------------------------------------------------------


def print_lines(title: str, lines: list[dict], ratio_name: str) -> None:
    print(f"\n{title}")
    print(f"| {'path':<40} | {'frames':>7} | {'seconds':>8} | {'frames/s':>9} | {'clips/s':>8} | {ratio_name:>12} |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 14}|")
    for r in lines:
        clips = f"{r['clips_per_s']:.2f}" if r["clips_per_s"] else ""
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        print(f"| {r['path']:<40} | {r['frames']:>7} | {r['seconds']:>8.3f} | {r['frames_per_s']:>9.1f} "
              f"| {clips:>8} | {ratio:>12} |")


def print_overlap(lines: list[dict]) -> None:
    print("\noverlap: fill_cache, decode_ahead 0 vs 1 (decode: decode_clips alone; encode: the encoder alone)")
    print(f"| {'encoder':<8} | {'clips':>5} | {'decode s':>8} | {'encode s':>8} | {'ahead=0 s':>9} | {'ahead=1 s':>9} "
          f"| {'speedup':>7} | {'ideal s':>7} |")
    print(f"|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
    for r in lines:
        print(f"| {r['encoder']:<8} | {r['clips']:>5} | {r['decode_s']:>8.2f} | {r['encode_s']:>8.2f} "
              f"| {r['ahead0_s']:>9.2f} | {r['ahead1_s']:>9.2f} | {r['speedup']:>7.2f} | {r['ideal_s']:>7.2f} |")


def total(lines_per_group: list[list[dict]]) -> list[dict]:
    """The groups' rows summed: the same paths over every file."""
    out = []
    for same in zip(*lines_per_group):
        clips = sum(r["clips"] for r in same) if same[0]["clips"] else None
        sums = (sum(r["frames"] for r in same), sum(r["seconds"] for r in same))
        out.append(line(same[0]["path"], *sums, clips, same[0]["base"]))
    return with_ratios(out)


# --- main ------------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1280x720,720x480", help="WxH of the test videos, comma-separated")
    parser.add_argument("--fps", default="24,30", help="their frame rates, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each video")
    parser.add_argument("--gop", type=int, default=0, help="frames between key frames (0: libx264's default, 250)")
    parser.add_argument("--noise", type=int, default=0, help="ffmpeg noise strength (grain: a heavier stream)")
    parser.add_argument("--window", type=int, default=17, help="clip frames at 24 fps (4k+1)")
    parser.add_argument("--stride", type=int, default=8, help="frames between window starts at 24 fps")
    parser.add_argument("--bucket", default="480x720", help="HxW the clips are resized and cropped to")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path; the fastest is kept")
    parser.add_argument("--encode-seconds", type=float, default=None, help="the idle encoder's time per clip "
                        "(default: the toolkit's decode time per clip)")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--vae-clips", type=int, default=0, help="also time the overlap with the demo tiny VAE "
                        "on this many clips (slow on a CPU)")
    parser.add_argument("--keep", default=None, help="make the videos in this folder and keep them")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.bucket = tuple(int(v) for v in args.bucket.split("x"))
    folder = Path(args.keep or tempfile.mkdtemp(prefix="data_throughput_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, folder: Path) -> dict:
    started = time.perf_counter()
    paths = make_videos(folder / "videos", parse_sizes(args.sizes), [int(v) for v in args.fps.split(",")],
                        args.seconds, args.gop, args.noise)
    rows = plan_rows(folder / "videos", args)
    print(f"{len(paths)} videos ({args.seconds:g} s each, gop {args.gop or 250}, noise {args.noise}), {len(rows)} "
          f"clips of {args.window} frames every {args.stride} at 24 fps -> {args.bucket[0]}x{args.bucket[1]}; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; made in "
          f"{time.perf_counter() - started:.1f} s")
    # Also the warm-up: first calls load libraries and kernels.
    firsts = [(row["clip_id"], row) for row in rows[:3]]
    same = all(torch.equal(pixels, clip_pixels(row)) for _, row, pixels in decode_clips(firsts))
    print(f"decode_clips gives clip_pixels' pixels bitwise on the first 3 clips: {same}")

    probes, decodes = [], []
    for size in parse_sizes(args.sizes):
        group_paths = [p for p in paths if f"_{size[0]}x{size[1]}_" in p.name]
        group_rows = [r for r in rows if Path(r["source"]) in group_paths]
        probes.append(probe_table(group_paths, args.repeats))
        decodes.append(decode_table(group_rows, args.repeats))
        print_lines(f"probe, {size[0]}x{size[1]} files", probes[-1], "toolkit/raw")
        print_lines(f"cache decode, {size[0]}x{size[1]} files", decodes[-1], "toolkit/raw")
    out = {"args": dict(vars(args)), "pixels_bitwise_equal": same, "probe": probes, "decode": decodes}
    if len(decodes) > 1:
        out["probe_all"], out["decode_all"] = total(probes), total(decodes)
        print_lines("probe, all files", out["probe_all"], "toolkit/raw")
        print_lines("cache decode, all files", out["decode_all"], "toolkit/raw")
    if not args.skip_overlap:
        first = parse_sizes(args.sizes)[0]
        group = [r for r in rows if (r["width"], r["height"]) == first]
        toolkit = next(r["seconds"] for r in decodes[0] if r["path"] == "toolkit: decode_clips")
        out["overlap"] = overlap_table(group, folder, toolkit, args)
        print_overlap(out["overlap"])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
