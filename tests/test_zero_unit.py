"""ZeRO's settings and partition, in one process (no MPI)."""

import pytest

import hvdagents as hva
from hvdagents.strategies.config import Sync
from hvdagents.strategies.sharded import checkpoint_strategy, rounds, shard_ranges


@pytest.mark.parametrize("value,error,message", [
    (0, ValueError, "ZeRO.stage must be 1 or 2; got 0"), (3, ValueError, "ZeRO.stage must be 1 or 2; got 3"),
    (True, TypeError, "ZeRO.stage must be an int; got bool True"),
    ("2", TypeError, "ZeRO.stage must be an int; got str '2'"),
])
def test_zero_stage_is_validated_naming_the_field_and_the_value(value, error, message):
    with pytest.raises(error, match=message):
        hva.ZeRO(stage=value)


def test_zero_is_frozen_and_defaults_to_stage_1():
    zero = hva.ZeRO()
    assert zero.stage == 1 and hva.ZeRO(stage=2).stage == 2
    with pytest.raises(AttributeError):
        zero.stage = 2


@pytest.mark.parametrize("length", [0, 1, 3, 66, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_ranges_tile_the_vector_in_rank_order_balanced_to_one_element(length, size):
    ranges = shard_ranges(length, size)
    assert ranges[0][0] == 0 and ranges[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # longer ones first


@pytest.mark.parametrize("length,size,per_round", [(66, 4, 5), (66, 4, 1 << 24), (1001, 3, 64), (3, 4, 2)])
def test_each_round_splits_as_horovod_splits_its_concatenation(length, size, per_round):
    parts = rounds(length, size, per_round)
    for r, (lo, hi) in enumerate(shard_ranges(length, size)):  # a rank's parts tile its range
        mine = [round_[r] for round_ in parts]
        assert mine[0][0] == lo and mine[-1][1] == hi and all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    for round_ in parts:  # Horovod gives rank r the r-th block of the shard_ranges split of the total
        sizes = [hi - lo for lo, hi in round_]
        assert sizes == [hi - lo for lo, hi in shard_ranges(sum(sizes), size)]
        assert sum(sizes) <= max(per_round, size) + size


def test_a_zero_checkpoint_is_a_sync_checkpoint():
    assert checkpoint_strategy(hva.ZeRO(stage=2)) == "Sync" == checkpoint_strategy(Sync())
    assert checkpoint_strategy(hva.LocalSGD()) == "LocalSGD"


# -- Keras: which optimizers ZeRO can cut into ranges (hvdagents.frameworks.keras_sharded) --------------
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "Adadelta", "Lion"])
def test_keras_optimizers_updated_element_by_element_are_accepted(name):
    keras = pytest.importorskip("keras")
    from hvdagents.frameworks.keras_sharded import refuse_unshardable

    refuse_unshardable(getattr(keras.optimizers, name)(learning_rate=0.01, global_clipnorm=1.0))  # no error


def _excluding(optimizer, **exclude):
    optimizer.exclude_from_weight_decay(**exclude)
    return optimizer


@pytest.mark.parametrize("build,message", [
    (lambda k: k.optimizers.Adafactor(), "cannot shard keras.optimizers.Adafactor: ZeRO applies each rank's range"),
    (lambda k: k.optimizers.Nadam(), "cannot shard keras.optimizers.Nadam: "),
    (lambda k: type("MyAdam", (k.optimizers.Adam,), {})(), r"cannot shard .*MyAdam: "),
    (lambda k: k.optimizers.LossScaleOptimizer(k.optimizers.Adam()),
     "cannot shard keras.optimizers.LossScaleOptimizer"),
    (lambda k: k.optimizers.Adam(clipnorm=1.0), "Adam with clipnorm=1.0: it clips each variable's gradient by"),
    (lambda k: k.optimizers.SGD(use_ema=True), "SGD with use_ema=True: it keeps a moving average"),
    (lambda k: k.optimizers.AdamW(gradient_accumulation_steps=2), "AdamW with gradient_accumulation_steps=2"),
    (lambda k: _excluding(k.optimizers.AdamW(weight_decay=0.1), var_names=["bias"]),
     "AdamW after exclude_from_weight_decay"),
    (lambda k: _excluding(k.optimizers.AdamW(weight_decay=0.1), var_list=[k.Variable([1.0])]),
     "AdamW after exclude_from_weight_decay"),
])
def test_keras_optimizers_that_couple_elements_or_keep_whole_copies_are_refused_by_name(build, message):
    keras = pytest.importorskip("keras")
    from hvdagents.errors import UsageError
    from hvdagents.frameworks.keras_sharded import refuse_unshardable

    with pytest.raises(UsageError, match=message) as caught:
        refuse_unshardable(build(keras))
    assert "hva.Sync()" in str(caught.value)
