"""Every fenced command and code sample in README.md runs, as written.

``bash`` blocks: each line is run from the repository root (``make test`` is the command CI
itself runs through ``.ci/run``, so it is checked to be exactly that rather than run inside
itself). ``python`` blocks: each runs under ``mpirun -np 2``.
"""

import re

import pytest

from mpirun import REPO, run_command, run_job

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
COMMANDS = [line.split("  #")[0].strip() for kind, body in BLOCKS if kind == "bash"
            for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
SAMPLES = [body for kind, body in BLOCKS if kind == "python"]
#: The README's own test command: CI runs it (.ci/run), so running it here would recurse.
TEST_COMMAND = "make test"


def test_readme_starts_with_the_demo_and_test_commands():
    assert COMMANDS[:2] == ["make demo", TEST_COMMAND]
    assert "exec make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != TEST_COMMAND])
def test_readme_command_runs(command):
    job = run_command(["bash", "-c", f"PATH={REPO}/.venv/bin:$PATH; {command}"], timeout=600, cwd=REPO)
    job.check()
    if command == "make demo":
        accuracies = [float(a) for a in re.findall(r"final test accuracy: ([0-9.]+)", job.stdout)]
        assert len(accuracies) == 2 and min(accuracies) >= 0.95
    if "--dry-run" in command:
        assert ("srun" in job.stdout) or ("mpirun" in job.stdout) or ("horovodrun" in job.stdout)
    if " plot " in command:
        assert (REPO / "runs" / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_readme_code_sample_runs_on_2_ranks(index, tmp_path):
    script = tmp_path / f"readme_sample_{index}.py"
    script.write_text(SAMPLES[index])
    run_job(script, np=2, timeout=240).check()
