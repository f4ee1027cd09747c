"""PreemptionFlag in one process: the handler, the world-of-one agreement, exit, restore.

The multi-rank agreement and the whole requeue round trip run for real in
tests/test_slurm.py (``test_requeue_checkpoints_on_usr1_and_resumes``)."""

import os
import signal
import threading

import pytest

from hvdagents.errors import ClosedError, UsageError
from hvdagents.preemption import REQUEUE_EXIT_CODE, PreemptionFlag


class WorldOfOne:
    def Get_size(self):
        return 1

    def Barrier(self):
        raise AssertionError("a world of one needs no barrier")


def test_signal_sets_the_flag_and_should_stop_latches():
    with PreemptionFlag(comm=WorldOfOne()) as flag:
        assert not flag.requested and not flag.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal == signal.SIGUSR1
        assert flag.should_stop() and flag.should_stop()


def test_other_signals_and_request_from_code():
    with PreemptionFlag((signal.SIGUSR2, signal.SIGTERM), comm=WorldOfOne()) as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signal == signal.SIGTERM and flag.should_stop()
    with PreemptionFlag(comm=WorldOfOne()) as flag:
        flag.request()
        assert flag.should_stop() and flag.signal is None


def test_close_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a[0]))
    try:
        flag = PreemptionFlag(comm=WorldOfOne())
        assert signal.getsignal(signal.SIGUSR1) == flag._handle
        flag.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and not flag.requested
        with pytest.raises(ClosedError):
            flag.should_stop()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_exit_for_requeue_exits_with_the_requeue_code():
    with PreemptionFlag(comm=WorldOfOne()) as flag:
        with pytest.raises(SystemExit) as info:
            flag.exit_for_requeue()
    assert info.value.code == REQUEUE_EXIT_CODE == 75


def test_outside_the_main_thread_is_refused():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_make_flag()))
    thread.start()
    thread.join()
    assert isinstance(errors[0], UsageError) and "main thread" in str(errors[0])


def _make_flag():
    try:
        PreemptionFlag(comm=WorldOfOne())
    except UsageError as exc:
        return exc
    return None


def test_sbatch_template_and_module_agree_on_the_exit_code():
    from mpirun import REPO

    text = (REPO / "slurm" / "requeue.sbatch").read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in text
