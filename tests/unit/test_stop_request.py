"""The trainer's StopRequest: Ctrl-C (SIGINT) and a scheduler's SIGTERM both ask for a stop at the next step.

What the trainer does on that request (a checkpoint, then a resume that matches an uninterrupted run) is
tests/integration/test_reliability.py's, with SIGTERM."""

import os
import signal

import pytest

from happyhorse_train.training.trainer import StopRequest


@pytest.mark.parametrize("signal_to_send", [signal.SIGINT, signal.SIGTERM])
def test_either_signal_is_caught_and_the_previous_handlers_come_back(signal_to_send):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    request = StopRequest()
    try:
        os.kill(os.getpid(), signal_to_send)  # would end the test process were it not caught
        assert request.signal_name == signal_to_send.name
    finally:
        request.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before
