"""hva.elastic in one process: the data position's guarantee, what is refused, and a State's
commit / restore / sync in a world of one (the multi-worker behaviour: test_elastic_mpi.py)."""

import numpy as np
import pytest
import torch

import hvdagents as hva
from hvdagents.elastic import elastic_launch, elastic_problem, epoch_batch


def consume(n, batch_size, sizes_by_step, epoch=1, seed=0):
    """Walk one epoch with the world size changing as ``sizes_by_step`` says (the size of
    every step, the last repeated); return each step's per-rank index arrays."""
    position, steps = 0, []
    while True:
        size = sizes_by_step[min(len(steps), len(sizes_by_step) - 1)]
        parts = [epoch_batch(n, position, batch_size, epoch=epoch, seed=seed, rank=r, size=size) for r in range(size)]
        if parts[0] is None:
            assert all(p is None for p in parts)
            return steps, position
        assert len({p[1] for p in parts}) == 1  # every rank agrees on the next position
        steps.append([p[0] for p in parts])
        position = parts[0][1]


@pytest.mark.parametrize("sizes", [[3], [3, 3, 2, 2, 2, 3], [1, 4, 2], [2] * 5 + [3]])
def test_every_sample_of_an_epoch_once_whatever_the_world_did(sizes):
    n, batch = 203, 8
    steps, position = consume(n, batch, sizes)
    seen = np.concatenate([idx for step in steps for idx in step])
    assert len(seen) == len(set(seen.tolist()))  # none twice
    order = np.random.default_rng((0, 1)).permutation(n)
    assert np.array_equal(np.sort(seen), np.sort(order[:position]))  # exactly the epoch's first `position`
    last_size = sizes[min(len(steps), len(sizes) - 1)]
    assert n - position < last_size  # at most size - 1 dropped at the end
    for step in steps:
        lengths = [len(idx) for idx in step]
        assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_a_roll_back_consumes_the_same_samples_again_re_split():
    n, batch = 100, 4
    first = [epoch_batch(n, 24, batch, epoch=2, rank=r, size=3) for r in range(3)]
    again = [epoch_batch(n, 24, batch, epoch=2, rank=r, size=2) for r in range(2)]  # after a reset to 2
    order = np.random.default_rng((0, 2)).permutation(n)
    assert np.array_equal(np.sort(np.concatenate([f[0] for f in first])), np.sort(order[24:36]))
    assert np.array_equal(np.sort(np.concatenate([a[0] for a in again])), np.sort(order[24:32]))
    assert (first[0][1], again[0][1]) == (36, 32)
    assert not np.array_equal(epoch_batch(n, 0, 4, epoch=0, rank=0, size=1)[0],
                              epoch_batch(n, 0, 4, epoch=1, rank=0, size=1)[0])  # a new order each epoch


def test_epoch_batch_refuses_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batch(10, 0, 0, epoch=0, rank=0, size=1)
    with pytest.raises(ValueError, match="position"):
        epoch_batch(10, 11, 2, epoch=0, rank=0, size=1)


def test_elastic_launch_is_read_from_horovodruns_variables():
    assert elastic_launch({"HOROVOD_ELASTIC": "1", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1"})
    assert not elastic_launch({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1"})  # horovodrun --gloo -np N
    assert not elastic_launch({"HOROVOD_ELASTIC": "1"})


@pytest.mark.parametrize("strategy", [hva.Downpour(), hva.EASGD(alpha=0.5), hva.Gossip(),
                                      hva.AsyncDiLoCo(inner_steps=4), hva.LocalSGD(), hva.ZeRO(), hva.Sync(),
                                      hva.DiLoCo(inner_steps=4)])
def test_what_cannot_be_elastic_is_refused_naming_the_way_out(strategy):
    refused = elastic_problem("TorchAgent", strategy)
    if isinstance(strategy, (hva.Sync, hva.LocalSGD, hva.DiLoCo)):
        assert refused is None
        return
    kind, message = refused
    assert issubclass(kind, hva.UsageError)
    assert type(strategy).__name__ in message and "checkpoint and requeue" in message


def test_max_staleness_is_refused_and_keras_is_not():
    kind, message = elastic_problem("TorchAgent", hva.Downpour(max_staleness=2))
    assert "asynchronous" in message and "checkpoint and requeue" in message
    assert elastic_problem("KerasAgent", hva.Sync()) is None and elastic_problem("KerasAgent", hva.LocalSGD()) is None
    kind, message = elastic_problem("KerasAgent", hva.ZeRO())
    assert "ZeRO" in message and "checkpoint and requeue" in message
    kind, message = elastic_problem("JaxAgent", hva.Sync())
    assert "TorchAgent and KerasAgent" in message and "JaxAgent" in message


def make(strategy=None, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    return model, optimizer, hva.TorchAgent(model, optimizer, strategy=strategy or hva.Sync())


def step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
    optimizer.step()


def snapshot(model, optimizer):
    tensors = [t.clone() for t in model.state_dict().values()]
    tensors += [t.clone() for st in optimizer.state_dict()["state"].values() for t in st.values()]
    return tensors


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("strategy", [hva.Sync(), hva.LocalSGD(period=3),
                                      hva.DiLoCo(inner_steps=2, outer_momentum=0.5)])
def test_restore_puts_back_the_last_commit_every_time(strategy):
    model, optimizer, agent = make(strategy)
    state = hva.elastic.State(agent, epoch=0, position=0)
    for s in range(3):
        step(model, optimizer, s)
    state.epoch, state.position = 1, 24
    state.commit()
    committed, counters = snapshot(model, optimizer), agent.runner_state.to_dict()
    for attempt in range(2):  # twice: the second restore must not see what the steps after the first changed
        for s in range(4):
            step(model, optimizer, 10 + s)
        state.epoch, state.position = 7, 99
        assert not same(snapshot(model, optimizer), committed)
        state.restore()
        assert same(snapshot(model, optimizer), committed), attempt
        assert agent.runner_state.to_dict() == counters and (state.epoch, state.position) == (1, 24)
    agent.close()


def test_sync_in_a_world_of_one_keeps_the_commit_and_diloco_outer_state():
    model, optimizer, agent = make(hva.DiLoCo(inner_steps=2, outer_momentum=0.5))
    state = hva.elastic.State(agent, epoch=0)
    for s in range(4):
        step(model, optimizer, s)  # two outer steps: momentum is not zero any more
    state.commit()
    outer = agent._runner.snapshot().copy()
    committed = snapshot(model, optimizer)
    step(model, optimizer, 9)
    step(model, optimizer, 10)  # an outer step after the commit
    state.sync()  # rank 0 takes its commit back, outer state included
    assert same(snapshot(model, optimizer), committed)
    assert np.array_equal(agent._runner.snapshot(), outer) and np.any(outer[1] != 0)
    agent.close()


def test_values_names_and_agents_are_checked():
    model, optimizer, agent = make()
    with pytest.raises(ValueError, match="'commit'"):
        hva.elastic.State(agent, commit=1)
    with pytest.raises(ValueError, match="'_x'"):
        hva.elastic.State(agent, _x=1)
    with pytest.raises(TypeError, match="an agent"):
        hva.elastic.State(model)
    with pytest.raises(TypeError, match="hva.elastic.State"):
        hva.elastic.run(lambda s: None)(object())
    agent.close()


def test_run_calls_train_with_the_state_after_a_sync():
    model, optimizer, agent = make()
    state = hva.elastic.State(agent, epoch=3)

    @hva.elastic.run
    def train(state, extra):
        step(model, optimizer, 0)
        state.epoch += extra
        state.commit()
        return state.epoch

    assert train(state, 2) == 5 and agent.runner_state.step == 1
    agent.close()


def test_under_an_elastic_launch_steps_before_run_are_refused(monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    model, optimizer, agent = make()
    with pytest.raises(hva.UsageError, match="hva.elastic.run"):
        step(model, optimizer, 0)
    state = hva.elastic.State(agent)
    monkeypatch.delenv("HOROVOD_GLOO_RENDEZVOUS_ADDR")  # no driver to register with in this process
    hva.elastic.run(lambda state: step(model, optimizer, 1))(state)  # after the sync: allowed
    agent.close()
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    with pytest.raises(hva.UsageError, match="checkpoint and requeue"):
        hva.TorchAgent(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                       strategy=hva.ZeRO())


def keras_agent(strategy, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return hva.KerasAgent(model, strategy=strategy)


def keras_step(agent, seed):
    rng = np.random.default_rng(seed)
    agent.train_on_batch(rng.standard_normal((8, 6)).astype("float32"), rng.standard_normal((8, 2)).astype("float32"))


def keras_snapshot(agent):
    """Weights and every optimizer variable (Adam's moments, its iteration counter)."""
    return [np.array(v.numpy()) for v in [*agent.model.weights, *agent.model.optimizer.variables]]


def keras_same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("strategy", [hva.Sync(), hva.LocalSGD(period=3),
                                      hva.DiLoCo(inner_steps=2, outer_momentum=0.5)])
def test_keras_restore_and_sync_put_back_the_last_commit(strategy):
    agent = keras_agent(strategy)
    state = hva.elastic.State(agent, epoch=0, position=0)
    for s in range(3):
        keras_step(agent, s)
    state.epoch, state.position = 1, 24
    state.commit()
    committed, counters = keras_snapshot(agent), agent.runner_state.to_dict()
    assert counters["step"] == 3 and int(agent.model.optimizer.iterations.numpy()) == 3
    for attempt in range(2):  # twice: the second restore must not see what the steps after the first changed
        for s in range(4):
            keras_step(agent, 10 + s)
        state.epoch, state.position = 7, 99
        assert not keras_same(keras_snapshot(agent), committed)
        state.restore()
        assert keras_same(keras_snapshot(agent), committed), attempt
        assert agent.runner_state.to_dict() == counters and (state.epoch, state.position) == (1, 24)
    keras_step(agent, 20)
    state.sync()  # in a world of one: rank 0 takes its own commit back
    assert keras_same(keras_snapshot(agent), committed) and agent.runner_state.to_dict() == counters
    agent.close()


def test_keras_run_trains_inside_after_the_sync():
    agent = keras_agent(hva.Sync())
    state = hva.elastic.State(agent, epoch=3)

    @hva.elastic.run
    def train(state, extra):
        keras_step(agent, 0)
        state.epoch += extra
        state.commit()
        return state.epoch

    assert train(state, 2) == 5 and agent.runner_state.step == 1
    agent.close()


def test_keras_horovod_op_errors_become_horovods_internal_error():
    import tensorflow as tf
    from horovod.common.exceptions import HorovodInternalError

    from hvdagents.elastic import _lost_peer_errors

    agent = keras_agent(hva.Sync())
    lost = tf.errors.UnknownError(None, None, "Horovod has been shut down. [[{{node HorovodGroupedAllreduce_x}}]]")
    with pytest.raises(HorovodInternalError):
        with _lost_peer_errors(agent):
            raise lost
    with pytest.raises(tf.errors.InvalidArgumentError):  # the user's own error stays what it is
        with _lost_peer_errors(agent):
            raise tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [8,2] vs. [8,3]")
    agent.close()
