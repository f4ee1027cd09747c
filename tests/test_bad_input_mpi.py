"""Bad input that differs between ranks, on 2 real ranks (``tests/scripts/bad_input.py``): rank 1
passes another strategy, another field value, a wrong type, another ``HVDAGENTS_WINDOWS``; each
case must raise the same error on every rank, naming the field, and the job must go on (no rank
left waiting in a collective) and end. Single-process cases: ``tests/test_bad_input_unit.py``."""

import pytest

from mpirun import run_job

#: case -> (exception type on every rank, words every rank's message holds).
TORCH_CASES = {
    "strategy_kind": ("ValueError", ["same strategy settings", "rank 0 makes TorchAgent(strategy=Sync(",
                                     "rank 1 makes TorchAgent(strategy=Downpour("]),
    "localsgd_period": ("ValueError", ["LocalSGD.period is 2 on rank 0 but 3 on rank 1"]),
    "sync_compression": ("ValueError", ["Sync.compression is None on rank 0 but 'fp16' on rank 1"]),
    "easgd_alpha": ("ValueError", ["EASGD.alpha is 0.1 on rank 0 but 0.2 on rank 1"]),
    "downpour_max_staleness": ("ValueError", ["Downpour.max_staleness is None on rank 0 but 2 on rank 1"]),
    "gossip_seed": ("ValueError", ["Gossip.seed is 0 on rank 0 but 1 on rank 1"]),
    "strategy_wrong_type": ("TypeError", ["strategy must be one of", "got str"]),
    "model_wrong_type": ("TypeError", ["model must be a torch.nn.Module", "NoneType"]),
    "model_differs": ("ModelMismatchError", ["the model differs between ranks", "0.weight"]),
    "gossip_weights_for_other_size": ("ValueError", ["Gossip.weights must be 2x2 for 2 ranks"]),
    "windows_env_differs": ("ValueError", ["HVDAGENTS_WINDOWS must be the same on every rank",
                                           "rank 0: auto, rank 1: relay"]),
    "windows_env_bad": ("ValueError", ["HVDAGENTS_WINDOWS must be one of", "'rdma'"]),
    "agent_windows_env_differs": ("ValueError", ["HVDAGENTS_WINDOWS must be the same on every rank"]),
    "window_n_differs": ("ValueError", ["ParameterWindow must be created with the same arguments",
                                        "rank 0: (4,", "rank 1: (5,"]),
    "window_n_wrong_type": ("TypeError", ["ParameterWindow n must be an int", "4.0"]),
    "window_dtype_bad": ("ValueError", ["ParameterWindow dtype must be float32 or float64"]),
    "optimizer_reused": ("UsageError", ["this optimizer already belongs to an open TorchAgent"]),
}
KERAS_CASES = {
    "keras_model_not_compiled": ("UsageError", ["KerasAgent needs a compiled model"]),
    "keras_strategy_kind": ("ValueError", ["rank 0 makes KerasAgent(strategy=Sync(",
                                           "rank 1 makes KerasAgent(strategy=EASGD("]),
    "keras_localsgd_period": ("ValueError", ["LocalSGD.period is 2 on rank 0 but 3 on rank 1"]),
}
#: Ranks: rank 1's input differs; the error must be rank 0's and rank 1's alike.
RANKS = (0, 1)


@pytest.fixture(scope="module", params=["torch", "keras"])
def job(request):
    return request.param, run_job("bad_input.py", np=2, args=[request.param], timeout=150)


def test_every_rank_raises_the_same_error_naming_the_field(job):
    framework, result = job
    cases = TORCH_CASES if framework == "torch" else KERAS_CASES
    seen = {(r["case"], r["rank"]): r for r in result.results()}
    problems = []
    for case, (kind, words) in cases.items():
        for rank in RANKS:
            got = seen.get((case, rank))
            if got is None:
                problems.append(f"{case}: no result from rank {rank} (left waiting?)")
            elif got["error"] != kind or not all(w in got["message"] for w in words):
                problems.append(f"{case} rank {rank}: {got['error']}: {got['message']!r}; wanted {kind} with {words}")
        if (case, 0) in seen and (case, 1) in seen:  # the same message, rank 0 adding where it came from
            here, there = seen[(case, 1)]["message"], seen[(case, 0)]["message"]
            if there not in (here, here + " (on rank 1)"):
                problems.append(f"{case}: rank 0 said {there!r}, rank 1 {here!r}")
    assert not problems, "\n".join(problems) + f"\n--- output ---\n{result.output[-4000:]}"


def test_the_job_goes_on_and_ends(job):
    _, result = job
    healthy = [r for r in result.results() if r["case"] == "healthy"]
    assert sorted(r["rank"] for r in healthy) == list(RANKS), result.output[-4000:]
    assert all(r["identical"] and r["finite"] for r in healthy), healthy
    result.check()  # exited 0, within the timeout
