"""kinema.interrupt's deferral: inside stops_deferred() a first stop signal is only recorded (with one line on
stderr) and raised after the block; a second one raises at once, as outside the block."""

import os
import signal

import pytest

from kinema.interrupt import Terminated, stop_if_requested, stop_on_signals, stop_requested, stops_deferred


def test_a_first_signal_waits_for_the_end_of_the_block(capsys):
    finished = []
    with pytest.raises(Terminated), stop_on_signals():
        with stops_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            stop_if_requested()  # nothing is raised inside the block
            finished.append("unit of work")
        assert stop_requested()
        finished.append("after the block")
        stop_if_requested()
        finished.append("never")
    assert finished == ["unit of work", "after the block"]
    assert "stopping once this step is done and saved" in capsys.readouterr().err
    assert not stop_requested()  # stop_on_signals forgets the stop on the way out


def test_a_second_signal_stops_at_once():
    finished = []
    with pytest.raises(KeyboardInterrupt), stop_on_signals(), stops_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append("first signal recorded")
        os.kill(os.getpid(), signal.SIGINT)
        finished.append("never")
    assert finished == ["first signal recorded"]


def test_without_deferral_a_signal_raises_where_it_lands():
    with pytest.raises(Terminated), stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the signal should have raised")
