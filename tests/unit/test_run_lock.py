"""The output folder's run lock (training/run_lock.py) and the launcher-death signal (training/distributed.py).

Two real train.py runs on one folder, and a stale lock taken over by a real run: tests/integration/test_run_lock.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from happyhorse_train.errors import UserInputError
from happyhorse_train.training.run_lock import LOCK_FILE, RunLock, lock_output_dir
from tests.conftest import REPO


def test_a_held_lock_refuses_a_second_taker_in_one_line_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(UserInputError) as refused:
            RunLock(tmp_path).acquire()  # its own open(): flock conflicts across descriptors, even in one process
        message = str(refused.value)
        assert message.startswith(f"{tmp_path} is in use by another training run (pid {os.getpid()} on host "
                                  f"{socket.gethostname()}, since ")
        assert message.endswith("): wait for it to finish, stop it, or choose another output_dir")
        assert "\n" not in message
    finally:
        first.release()


def test_a_released_lock_is_taken_again_without_a_takeover_message(tmp_path):
    RunLock(tmp_path).acquire().release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # emptied, not deleted
    said = []
    RunLock(tmp_path).acquire(said.append).release()
    assert said == []


def test_the_lock_of_a_dead_run_is_taken_over_with_a_message(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 4_000_000, "host": "gone", "since": "2020-01-01 00:00:00"}))
    said = []
    lock = RunLock(tmp_path).acquire(said.append)
    try:
        assert said == [f"output_dir {tmp_path}: took over the lock of a run that is no longer running (pid 4000000)"]
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from happyhorse_train.training.run_lock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel alone frees the lock
        holder.wait()
    said = []
    RunLock(tmp_path).acquire(said.append).release()
    assert said == [f"output_dir {tmp_path}: took over the lock of a run that is no longer running (pid {holder.pid})"]


class OneProcess:
    """What lock_output_dir asks of an Accelerator, for one process."""

    is_main_process, device = True, torch.device("cpu")

    def reduce(self, tensor, reduction):
        return tensor

    def print(self, *args):
        pass


def test_lock_output_dir_raises_the_holders_message(tmp_path):
    first = lock_output_dir(OneProcess(), tmp_path)
    try:
        with pytest.raises(UserInputError, match="is in use by another training run"):
            lock_output_dir(OneProcess(), tmp_path)
    finally:
        first.release()


def test_a_process_not_started_by_a_launcher_asks_for_no_signal(monkeypatch):
    from happyhorse_train.training.distributed import stop_with_launcher

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert stop_with_launcher() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    # A "launcher" that starts a worker (LOCAL_RANK set) and waits; killing it must end the worker.
    worker = ("import os, time; from happyhorse_train.training.distributed import stop_with_launcher; "
              f"assert stop_with_launcher(); open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
              "time.sleep(60)")
    launcher = ("import os, subprocess, sys; "
                f"subprocess.run([sys.executable, '-c', {worker!r}], env={{**os.environ, 'LOCAL_RANK': '0'}})")
    process = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
            assert time.monotonic() < deadline and process.poll() is None, "the worker never started"
            time.sleep(0.05)
        worker_pid = int((tmp_path / "pid").read_text())
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    try:
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived its launcher"
            time.sleep(0.05)
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's new parent may be slow to reap it, or never, in a container)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
