"""GPU pinning decisions (pure functions; the device calls need a GPU machine)."""

import pytest

from hvdagents.devices import check_pin_possible, pin_process, pinned_visible_devices
from hvdagents.errors import UsageError


@pytest.mark.parametrize(
    ("local_rank", "env", "gpus", "expected"),
    [
        (1, {}, 4, "1"),                                   # all GPUs visible: narrow to our own
        (0, {}, 0, None),                                  # no GPU: nothing to do
        (1, {"CUDA_VISIBLE_DEVICES": "3"}, 8, None),       # the launcher bound one GPU already
        (1, {"CUDA_VISIBLE_DEVICES": "4,6"}, 8, "6"),      # the ids the launcher left us
        (0, {"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, 0, "GPU-a1"),  # UUIDs are kept
        (3, {"CUDA_VISIBLE_DEVICES": "0,1"}, 2, "1"),      # more ranks than GPUs: shared, with a warning
    ],
)
def test_visible_devices_after_pinning(local_rank, env, gpus, expected, recwarn):
    assert pinned_visible_devices(local_rank, 4, env, gpus) == expected


def test_a_pin_that_can_no_longer_take_effect_is_an_error_naming_the_fix():
    check_pin_possible(torch_cuda_started=False)
    with pytest.raises(UsageError, match=r"Call hva.init\(\) first"):
        check_pin_possible(torch_cuda_started=True)


def test_pin_process_narrows_the_environment_it_is_given():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert pin_process(1, 2, env) == "3"
    assert env == {"CUDA_VISIBLE_DEVICES": "3"}
    assert pin_process(0, 1, env) is None  # one visible: left alone
