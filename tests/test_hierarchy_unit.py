"""The node-leader hierarchy in one process: the settings (LocalSGD's two-level period and
``hierarchical``; DiLoCo's, Downpour's, EASGD's and AsyncDiLoCo's ``hierarchical``), the bytes
formula, the two-level schedule and the refusals (the multi-rank behaviour: tests/test_hierarchy_mpi.py)."""

from types import SimpleNamespace

import numpy as np
import pytest

import hvdagents as hva
from hvdagents.errors import LauncherError
from hvdagents.strategies.hierarchy import _f16_sum, cross_node_bytes, node_hierarchy
from hvdagents.strategies.registry import make_runner

#: (call, exception type, words the message must hold).
BAD = [
    (lambda: hva.LocalSGD(period=8, node_period=3), ValueError,
     ["LocalSGD.period", "multiple", "LocalSGD.node_period (3)", "period=8"]),
    (lambda: hva.LocalSGD(period=2, node_period=4), ValueError, ["multiple", "node_period (4)", "period=2"]),
    (lambda: hva.LocalSGD(node_period=0), ValueError, ["LocalSGD.node_period", ">= 1", "0"]),
    (lambda: hva.LocalSGD(node_period=2.0), TypeError, ["LocalSGD.node_period", "2.0"]),
    (lambda: hva.LocalSGD(hierarchical=1), TypeError, ["LocalSGD.hierarchical", "bool", "1"]),
    (lambda: hva.LocalSGD(hierarchical="yes"), TypeError, ["LocalSGD.hierarchical", "'yes'"]),
    (lambda: hva.DiLoCo(hierarchical=None), TypeError, ["DiLoCo.hierarchical", "bool", "None"]),
    (lambda: hva.Downpour(hierarchical=1), TypeError, ["Downpour.hierarchical", "bool", "1"]),
    (lambda: hva.EASGD(hierarchical="yes"), TypeError, ["EASGD.hierarchical", "bool", "'yes'"]),
    (lambda: hva.AsyncDiLoCo(hierarchical=None), TypeError, ["AsyncDiLoCo.hierarchical", "bool", "None"]),
]


@pytest.mark.parametrize("call, kind, words", BAD)
def test_bad_settings_are_refused_naming_the_field_and_the_value(call, kind, words):
    with pytest.raises(kind) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_good_settings_are_kept_and_frozen():
    s = hva.LocalSGD(period=12, node_period=4, hierarchical=True)
    assert (s.period, s.node_period, s.hierarchical) == (12, 4, True)
    assert hva.LocalSGD().node_period is None and hva.LocalSGD().hierarchical is False
    assert hva.DiLoCo(hierarchical=True).hierarchical and not hva.DiLoCo().hierarchical
    for centre in (hva.Downpour, hva.EASGD, hva.AsyncDiLoCo):  # the centre strategies too
        assert centre(hierarchical=True).hierarchical and not centre().hierarchical
    with pytest.raises(AttributeError):
        s.hierarchical = False


@pytest.mark.parametrize("nodes, local_size", [(2, 2), (2, 4), (4, 2), (3, 8)])
def test_hierarchy_sends_local_size_times_fewer_bytes_across_nodes(nodes, local_size):
    n, b = 1_000_003, 4
    flat = cross_node_bytes(n, b, nodes, local_size, hierarchical=False)
    tree = cross_node_bytes(n, b, nodes, local_size, hierarchical=True)
    # a leader sends 2(L-1)/L of the vector between nodes; flat, every rank of the node does
    assert abs(tree - 2 * (nodes - 1) / nodes * n * b) <= 1
    assert abs(flat / tree - local_size) < 1e-6
    assert cross_node_bytes(n, b, 1, local_size, hierarchical=True) == 0  # one node: nothing crosses


def test_the_float16_sum_op_adds_in_float16():
    a = np.array([1.0, 2048.0, -0.5], dtype=np.float16)
    b = np.array([2.0, 1.0, 0.25], dtype=np.float16)
    inout = b.copy()
    _f16_sum(memoryview(a.view(np.uint8)), memoryview(inout.view(np.uint8)), None)
    assert inout.tolist() == (a + b).tolist()  # 2048 + 1 rounds to 2048 in float16, as Horovod's sum does
    assert inout[1] == 2048.0


def test_a_hierarchy_under_a_gloo_launch_is_refused_naming_the_fix():
    params = SimpleNamespace(context=SimpleNamespace(mpi_world=False))
    with pytest.raises(LauncherError, match="horovodrun --gloo.*hierarchical=False"):
        node_hierarchy(params)


@pytest.mark.parametrize("period, node_period, steps", [(6, 2, 13), (4, 4, 9), (3, None, 7)])
def test_two_level_period_averages_in_the_node_at_k1_and_everywhere_at_k2(period, node_period, steps):
    runner = make_runner(hva.LocalSGD(period=period, node_period=node_period))
    done = []
    runner._average = lambda params, node_only=False: done.append((runner.state.step, node_only))
    for _ in range(steps):
        runner.after_step(None)
    expected = []
    for t in range(1, steps + 1):
        if t % period == 0:
            expected.append((t, False))
        elif node_period is not None and t % node_period == 0:
            expected.append((t, True))
    assert done == expected and any(not node for _, node in done)
    runner.finish(None)  # the steps since the last average over all ranks: one more
    assert done[-1] == (steps, False)
