"""One training run per output folder: a lock on `<output_dir>/.run.lock`, held for the run's life.

Two runs on one folder would overwrite each other's checkpoints, metrics and exports. The lock is a kernel
`flock` on a descriptor that stays open until the process ends, so a run that dies in any way (SIGKILL, the
OOM killer, a lost node) releases it: a later run finds the file unlocked and takes it over. The file's
content (holder's pid, host and start time) is only for the messages; the flock alone decides.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch

from happyhorse_train.errors import UserInputError

LOCK_FILE = ".run.lock"


class RunLock:
    """The lock on one output folder, taken by `acquire`; kept by holding this object (and its fd)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.fd: int | None = None
        self.pid = os.getpid()

    def acquire(self, log=print) -> RunLock:
        """Take the lock, or raise UserInputError naming the live run that holds it."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: programs this run executes must not keep the folder locked after it ends.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                # A filesystem without locks (e.g. Lustre mounted without -o flock) must not stop training.
                log(f"output_dir {self.output_dir}: cannot lock {self.path} ({error.strerror}); two runs on "
                    "this folder would not be refused")
                return self
            raise UserInputError(in_use_message(self.output_dir, holder)) from None
        previous = _read(fd)
        if previous:  # a run that ended cleanly leaves the file empty (release)
            log(f"output_dir {self.output_dir}: took over the lock of a run that is no longer running "
                f"(pid {previous.get('pid', '?')})")
        _write(fd, {"pid": self.pid, "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.fd = fd
        atexit.register(self.release)  # a clean exit (errors included) empties the file: no takeover message
        return self

    def release(self) -> None:
        # Only the process that locked: a forked DataLoader worker shares the fd but must not clear it.
        # The file is emptied, never deleted: a run that opened it just before a deletion would lock a
        # dead inode while a third run creates and locks a new file.
        if self.fd is None or os.getpid() != self.pid:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the last descriptor unlocks
        self.fd = None


def in_use_message(output_dir: Path, holder: dict) -> str:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
           if holder else "still starting up")
    return (f"{output_dir} is in use by another training run ({who}): wait for it to finish, stop it, or "
            "choose another output_dir")


def lock_output_dir(accelerator, output_dir: Path) -> RunLock | None:
    """The main process's lock on `output_dir` (None on the others); every process raises the same error
    when a live run holds it, rather than the others waiting forever at their next collective."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire(accelerator.print)
        except UserInputError as error:
            refusal = str(error)
    failed = torch.tensor(float(refusal is not None), device=accelerator.device)
    if accelerator.reduce(failed, "max").item():
        # The other processes read the holder from the file, as the main process did (when they share it).
        raise UserInputError(refusal or in_use_message(output_dir, _read_path(Path(output_dir) / LOCK_FILE)))
    return lock


def _read(fd: int) -> dict:
    """The holder recorded in the open lock file; {} when empty or unreadable (half-written by a starting run)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_path(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
