"""Where training metrics go: metrics.jsonl and loss_curve.png always; W&B or TensorBoard when configured.

metrics.jsonl holds a line per optimizer step (`loss`, ...) and a line per eval (`eval_loss`, ...), each with its
step; step 0 is the eval before training.
"""

from __future__ import annotations

import json
from pathlib import Path

from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.files import write_atomic

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


class RunLog:
    """Per-step metrics appended to <output_dir>/metrics.jsonl (main process only), and a tracker."""

    def __init__(self, accelerator, output_dir: Path, cfg, resumed_step: int):
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        self.logger = cfg.logging.logger
        if accelerator.is_main_process:
            self._truncate_after(resumed_step)
        if self.logger != "none":
            from omegaconf import OmegaConf

            init_kwargs = {}
            if self.logger == "wandb":
                init_kwargs["wandb"] = {
                    "mode": cfg.logging.wandb_mode,
                    "dir": str(output_dir),
                    "name": cfg.logging.run_name or output_dir.name,
                }
            accelerator.init_trackers(
                cfg.logging.project, config=_flat(OmegaConf.to_container(cfg, resolve=True)), init_kwargs=init_kwargs
            )

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines so each step appears once."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path, metric=None) if row["step"] <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log_step(self, metrics: dict, step: int, to_tracker: bool) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if to_tracker and self.logger != "none":
            self.accelerator.log(metrics, step=step)

    def log_videos(self, paths: list[Path], prompts: list[str], step: int) -> None:
        if self.logger != "wandb" or not self.accelerator.is_main_process:
            return  # TensorBoard's video logging needs moviepy; the mp4 files are in the run folder either way
        import wandb

        videos = [wandb.Video(str(path), caption=prompt, format="mp4") for path, prompt in zip(paths, prompts)]
        self.accelerator.get_tracker("wandb").log({"validation": videos}, step=step)

    def finish(self) -> None:
        if self.logger != "none":
            self.accelerator.end_training()
        if self.accelerator.is_main_process:
            try:
                write_atomic(self.path.with_name(LOSS_CURVE_FILE), lambda png: write_loss_curve(self.path, png))
            except OSError as error:  # the weights and metrics are written by now; only the picture is lost
                raise RunHalted(f"could not write {LOSS_CURVE_FILE} ({error}): is the disk full? everything else "
                                f"of the run is written ({METRICS_FILE} holds the losses)") from error


def read_metrics(path: Path, metric: str | None = "loss") -> list[dict]:
    """The rows of a metrics.jsonl that carry `metric` (by default the training steps'); None: every row."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line can be torn (a kill mid-write); others are damage
                raise UserInputError(f"{path} line {number} is not JSON: repair or delete that line") from None
    return [row for row in rows if metric is None or metric in row]


def write_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """The training loss (and its running mean) with the eval losses on the same axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path, metric=None)
    if not rows:
        return
    figure = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    steps, losses = [r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r]
    axes.plot(steps, losses, linewidth=0.8, alpha=0.5, label="training loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        windows = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        axes.plot(steps, smooth, linewidth=1.8, label=f"training loss, mean of {window}")
    for key in ("eval_loss_held_out", "eval_loss_train"):
        evals = [(r["step"], r[key]) for r in rows if key in r]
        if evals:
            axes.plot(*zip(*evals), marker="o", linewidth=1.5, label=key.replace("_", " "))
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching loss")
    axes.set_title(f"losses ({metrics_path.parent.name})")
    axes.legend()
    figure.savefig(png_path, dpi=100, format="png")  # (a temporary name has no .png)


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": value} so every tracker shows it as a table."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            plain = isinstance(value, (int, float, str, bool)) or value is None
            flat[f"{prefix}{key}"] = value if plain else str(value)
    return flat
