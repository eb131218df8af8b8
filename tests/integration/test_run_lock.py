"""One run per output folder, with real train.py processes: a second run on a live folder is refused in one line
and leaves the first alone; the lock of a run that died is taken over. (The lock itself: tests/unit/test_run_lock.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.integration.conftest import FAST
from tests.integration.test_train import losses, train

LOCK = ".run.lock"


def settings(model, dataset, out, steps: int) -> list[str]:
    return [f"model.path={model}", f"data.dataset={dataset}", f"output_dir={out}", f"trainer.max_steps={steps}",
            "data.batch_size=2", "trainer.checkpoint_every=0"]


def test_a_second_run_on_a_live_output_dir_is_refused_and_the_first_goes_on(dataset, demo_model_dir, tmp_path):
    out = tmp_path / "out"
    # Far more steps than it will take: it is stopped by SIGTERM once the second run was refused.
    first = subprocess.Popen(
        [sys.executable, "train.py", "+experiment=demo", *FAST, *settings(demo_model_dir, dataset, out, 100_000)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not losses(out):
            time.sleep(0.05)
        assert first.poll() is None and losses(out), "the first run never started training"

        second = train(*settings(demo_model_dir, dataset, out, 2))
        assert second.returncode == 2
        [error] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert f"{out} is in use by another training run (pid {first.pid} on host " in error
        assert "Traceback" not in second.stderr and "Loading pipeline components" not in second.stderr
        assert first.poll() is None, "the refused run disturbed the first"
        os.kill(first.pid, signal.SIGTERM)  # checkpoints and ends with status 0
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    assert (out / LOCK).read_text() == ""  # released on a clean exit: the next run takes it silently


def test_the_lock_of_a_run_that_died_is_taken_over_with_a_message(dataset, demo_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # As a SIGKILLed run leaves it: its record, and no process holding the flock.
    (out / LOCK).write_text(json.dumps({"pid": 4_000_000, "host": "node-7", "since": "2020-01-01 00:00:00"}))
    result = train(*settings(demo_model_dir, dataset, out, 2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"output_dir {out}: took over the lock of a run that is no longer running (pid 4000000)" in result.stdout
    assert len(losses(out)) == 2

