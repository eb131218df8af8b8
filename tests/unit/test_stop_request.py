"""The trainer's StopRequest: Ctrl-C (SIGINT), a scheduler's SIGTERM and a STOP file ask for a stop at the next step.

What the trainer does on that request (a checkpoint, then a resume that matches an uninterrupted run) is
tests/integration/test_reliability.py's, with SIGTERM."""

import os
import signal
from pathlib import Path

import pytest

from happyhorse_train.training.trainer import StopRequest


@pytest.mark.parametrize("signal_to_send", [signal.SIGINT, signal.SIGTERM])
def test_either_signal_is_caught_and_the_previous_handlers_come_back(signal_to_send):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    request = StopRequest(Path("no/such/STOP"))
    try:
        os.kill(os.getpid(), signal_to_send)  # would end the test process were it not caught
        assert request.reason == signal_to_send.name
    finally:
        request.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_stop_file_is_seen_once_and_removed(tmp_path):
    from accelerate import Accelerator

    stop_file = tmp_path / "STOP"
    with StopRequest(stop_file) as request:
        accelerator = Accelerator(cpu=True)
        assert not request.agreed(accelerator)
        stop_file.touch()
        assert request.agreed(accelerator) and request.reason == str(stop_file)
        assert not stop_file.exists()
