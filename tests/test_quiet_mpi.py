"""Only rank 0 speaks: TensorFlow's start-up notices appear once per job, not once per rank,
and everything else a rank writes to stderr still arrives (hvdagents/quiet.py)."""

import sys

from mpirun import SCRIPTS, run_command, run_job

NOTICE = "oneDNN custom operations are on"
#: The test jobs' environment turns oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), which also hides
#: its notice; here it is on, as on a user's machine.
ONEDNN_ON = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def test_tensorflow_start_up_notices_come_from_rank_0_alone():
    alone = run_command([sys.executable, "-c", "import tensorflow"], timeout=120, env=ONEDNN_ON).check()
    per_process = alone.output.count(NOTICE)
    assert per_process >= 1  # what one process prints here (the case is real)
    job = run_job(SCRIPTS / "quiet_ranks.py", np=2, timeout=180, env=ONEDNN_ON).check()
    assert job.output.count(NOTICE) == per_process, job.output  # rank 0's only, not 2x
    for rank in (0, 1):
        assert f"rank {rank} still speaks on stderr" in job.stderr
