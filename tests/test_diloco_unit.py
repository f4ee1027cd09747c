"""DiLoCo in one process: its settings, the fragment schedule and the outer optimizer, each
against a reference written here (the multi-rank behaviour: tests/test_diloco_torch_mpi.py and
tests/test_diloco_keras_mpi.py)."""

import numpy as np
import pytest
import torch

import hvdagents as hva
from hvdagents.strategies.diloco import DiLoCoRunner, OuterSGD, fragment_ranges, fragment_sent_after, last_sent
from hvdagents.strategies.registry import make_runner

#: (call, exception type, words the message must hold).
BAD = [
    (lambda: hva.DiLoCo(inner_steps=0), ValueError, ["DiLoCo.inner_steps", "0"]),
    (lambda: hva.DiLoCo(inner_steps=2.0), TypeError, ["DiLoCo.inner_steps", "2.0"]),
    (lambda: hva.DiLoCo(outer_lr=0.0), ValueError, ["DiLoCo.outer_lr", "0.0"]),
    (lambda: hva.DiLoCo(outer_lr=float("nan")), ValueError, ["DiLoCo.outer_lr", "nan"]),
    (lambda: hva.DiLoCo(outer_lr="0.7"), TypeError, ["DiLoCo.outer_lr", "'0.7'"]),
    (lambda: hva.DiLoCo(outer_momentum=1.0), ValueError, ["DiLoCo.outer_momentum", "[0, 1)", "1.0"]),
    (lambda: hva.DiLoCo(outer_momentum=-0.1), ValueError, ["DiLoCo.outer_momentum", "-0.1"]),
    (lambda: hva.DiLoCo(outer_momentum=False), TypeError, ["DiLoCo.outer_momentum", "bool"]),
    (lambda: hva.DiLoCo(nesterov=1), TypeError, ["DiLoCo.nesterov", "1"]),
    (lambda: hva.DiLoCo(inner_steps=10, fragments=3), ValueError, ["DiLoCo.inner_steps", "multiple", "3", "10"]),
    (lambda: hva.DiLoCo(fragments=0), ValueError, ["DiLoCo.fragments", "0"]),
    (lambda: hva.DiLoCo(inner_steps=8, fragments=4, overlap=2), ValueError, ["DiLoCo.overlap", "< ", "2"]),
    (lambda: hva.DiLoCo(overlap=-1), ValueError, ["DiLoCo.overlap", "-1"]),
    (lambda: hva.DiLoCo(wire_dtype="bfloat16"), ValueError, ["DiLoCo.wire_dtype", "bfloat16", "Horovod", "float16"]),
    (lambda: hva.DiLoCo(wire_dtype="int8"), ValueError, ["DiLoCo.wire_dtype", "'int8'"]),
]


@pytest.mark.parametrize("call, kind, words", BAD)
def test_bad_settings_are_refused_naming_the_field_and_the_value(call, kind, words):
    with pytest.raises(kind) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_good_settings_are_frozen_and_map_to_the_diloco_runner():
    s = hva.DiLoCo(inner_steps=8, fragments=4, overlap=1, wire_dtype="float16", outer_momentum=0)
    assert (s.inner_steps, s.outer_lr, s.outer_momentum, s.nesterov) == (8, 0.7, 0, True)
    with pytest.raises(AttributeError):
        s.inner_steps = 3
    assert isinstance(make_runner(s), DiLoCoRunner)
    assert make_runner(hva.DiLoCo()).snapshot_shape(7) == (2, 7)


def reference_schedule(steps, H, P):
    """Written from the docstring's rule, not the library's arithmetic: fragment k goes out at
    steps (k+1)·H/P, then every H steps."""
    sent = {}
    for k in range(P):
        t = (k + 1) * H // P
        while t <= steps:
            sent[t] = k
            t += H
    return [sent.get(t) for t in range(1, steps + 1)]


@pytest.mark.parametrize("H, P", [(1, 1), (5, 1), (4, 2), (6, 3), (8, 4), (12, 12)])
def test_every_fragment_is_sent_once_every_inner_steps_on_the_reference_schedule(H, P):
    steps = 3 * P * H
    got = [fragment_sent_after(t, H, P) for t in range(1, steps + 1)]
    assert got == reference_schedule(steps, H, P)
    # after P·H steps (and after every H steps) each fragment went out exactly once per H steps
    for window in range(0, steps, H):
        assert sorted(k for k in got[window:window + H] if k is not None) == list(range(P))
    sent_in_ph = [k for k in got[:P * H] if k is not None]
    assert sorted(set(sent_in_ph)) == list(range(P)) and len(sent_in_ph) == P * P
    for k in range(P):  # last_sent agrees with the schedule at every step
        for t in range(0, steps + 1):
            expected = max([s for s in range(1, t + 1) if got[s - 1] == k], default=0)
            assert last_sent(t, k, H, P) == expected


def test_fragments_cover_the_vector_in_order_balanced_to_one_element():
    ranges = fragment_ranges(10, 3)
    assert ranges == [(0, 4), (4, 7), (7, 10)]
    assert fragment_ranges(5, 1) == [(0, 5)]


def nesterov_reference(theta, deltas, lr, mu, nesterov):
    """The outer step as the DiLoCo paper states it (PyTorch SGD's rule), written out: v is
    the momentum, the first step's v is the pseudo-gradient itself."""
    theta = theta.copy()
    v = None
    for d in deltas:
        v = d.copy() if v is None else mu * v + d
        theta = theta - lr * (d + mu * v if nesterov else v)
    return theta, v


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_sgd_matches_the_update_rule_and_torch_sgd_over_5_rounds(nesterov):
    rng = np.random.default_rng(3)
    theta0 = rng.normal(size=50)
    deltas = [rng.normal(scale=0.1, size=50) for _ in range(5)]
    outer = OuterSGD(0.7, 0.9, nesterov)
    theta, buffer = theta0.copy(), np.zeros(50)
    for d in deltas:
        outer.step(theta, buffer, d)
    want, v = nesterov_reference(theta0, deltas, 0.7, 0.9, nesterov)
    assert np.max(np.abs(theta - want)) < 1e-12 and np.max(np.abs(buffer - v)) < 1e-12
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=nesterov)
    for d in deltas:
        p.grad = torch.from_numpy(d.copy())
        sgd.step()
    assert np.max(np.abs(p.detach().numpy() - theta)) < 1e-12
    # and the update is not plain SGD: momentum moved it
    assert np.max(np.abs(theta - (theta0 - 0.7 * sum(deltas)))) > 1e-3


def test_outer_sgd_without_momentum_is_a_step_of_lr_times_the_pseudo_gradient():
    theta, buffer = np.array([1.0, 2.0]), np.zeros(2)
    OuterSGD(1.0, 0.0, True).step(theta, buffer, np.array([0.25, -0.5]))
    assert theta.tolist() == [0.75, 2.5] and buffer.tolist() == [0.0, 0.0]
