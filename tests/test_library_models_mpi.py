"""Models from a library the project does not write (transformers GPT-2 with tied embeddings, a
BatchNorm ResNet), every strategy, 2 ranks (tests/scripts/library_models.py)."""

import pytest

from mpirun import run_job

STRATEGIES = ["sync", "localsgd", "downpour", "easgd", "gossip"]


@pytest.fixture(scope="module")
def results():
    job = run_job("library_models.py", np=2, timeout=300).check()
    return {(r["model"], r["strategy"]): r for r in job.results()}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", ["gpt2", "resnet"])
def test_every_strategy_ends_in_one_model_that_trained(results, model, strategy):
    result = results[(model, strategy)]
    assert result["identical"], result  # parameters and buffers (BatchNorm statistics) alike
    assert result["moved"] > 1e-3, result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpt2s_tied_embedding_stays_tied(results, strategy):
    assert results[("gpt2", strategy)]["tied"]


def test_resnet_has_batchnorm_buffers_to_agree_on(results):
    assert results[("resnet", "sync")]["buffers"] > 0


def test_sync_gpt2_equals_one_process_on_the_full_batch(results):
    assert results[("gpt2", "sync")]["max_rel"] < 1e-9
