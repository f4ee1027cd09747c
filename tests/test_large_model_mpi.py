"""A model past MPI's 2 GiB message limit constructs, checkpoints and resumes (2 ranks).

600M float32 parameters are 2.4 GB: before hvdagents broadcast state tensor by tensor, rank
0's state went through one pickled ``bcast`` and Open MPI refused it."""

import pytest

from mpirun import run_job

N_PARAMETERS = 600_000_000


@pytest.mark.parametrize("strategy", ["sync", "localsgd", "easgd"])
def test_a_600m_parameter_model_constructs_checkpoints_and_resumes(strategy, tmp_path):
    job = run_job("large_model.py", np=2, args=[strategy, str(N_PARAMETERS), str(tmp_path)], timeout=240).check()
    (result,) = job.results()
    assert result["n"] == N_PARAMETERS
    assert result["constructed"] and result["resumed"]
    assert result["epochs"] == [1, 1]
