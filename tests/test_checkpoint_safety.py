"""Checkpoints: written atomically and durably, never a mix after a crash, never running code
when loaded. Single process: the functions of ``hvdagents.checkpoint`` here, the agents in
plain processes (a world of one) through ``tests/scripts/checkpoint_faults.py``.

The kill test SIGKILLs the writing process at 10 points spread over ``save_checkpoint`` of a
270 MB checkpoint (5 under Keras), per framework. Only rank 0 ever writes, so one process is the
writing rank. Each writer is a process of its own, forked by one launch that imported the
framework once (``checkpoint_faults.py writers``): the next one loads and checks what the
killed one left, as a restarted job would.
What a kill cannot show: that the fsync of the directory makes the rename survive a power
loss (the page cache survives a killed process); the order of the fsyncs is checked instead.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

from hvdagents import checkpoint
from hvdagents.checkpoint import CheckpointError, check_archive, read_arrays, write_arrays, write_atomic
from mpirun import SCRIPTS, job_env, run_command

SCRIPT = SCRIPTS / "checkpoint_faults.py"
KILLS = {"torch": 10, "keras": 5}  # a Keras writer takes ~4 s to start (its model, the load)


# -- write_atomic ---------------------------------------------------------------------------------
def test_write_atomic_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "ckpt", lambda f: f.write(b"data"))
    assert events == ["fsync file", "rename", "fsync dir"]


def test_write_atomic_removes_its_own_leftovers_only(tmp_path):
    target = tmp_path / "ckpt.pt"
    write_atomic(target, lambda f: f.write(b"old"))
    left = tmp_path / ".ckpt.pt.abcd_123.tmp"  # what a killed writer of ckpt.pt leaves
    others = [tmp_path / ".ckpt.pt.x.abcd_123.tmp", tmp_path / ".other.abcd_123.tmp", tmp_path / "ckpt.pt.tmp"]
    for path in [left, *others]:
        path.write_bytes(b"half")
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert not left.exists()
    assert all(p.exists() for p in others)  # another target's temporary, the user's own files


# -- reading -------------------------------------------------------------------------------------
def test_a_truncated_or_corrupted_archive_is_refused_naming_the_fault(tmp_path):
    good = tmp_path / "good"
    arrays = [np.arange(100_000, dtype=np.float32), np.ones((3, 4))]
    write_atomic(good, lambda f: write_arrays(f, {"v": 1}, {"weights": arrays}))
    with check_archive(str(good)) as archive:
        meta, tree = read_arrays(str(good), archive)
    assert meta == {"v": 1} and all(np.array_equal(a, b) for a, b in zip(tree["weights"], arrays))
    data = good.read_bytes()
    (tmp_path / "half").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"'.*half' is truncated or corrupted: a zip archive without"):
        check_archive(str(tmp_path / "half"))
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo("arrays/0.npy")
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200_000] ^= 1
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"'.*flipped' is truncated or corrupted: Bad CRC-32 for file 'arrays/0"):
        check_archive(str(tmp_path / "flipped"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint hvdagents wrote"):
        check_archive(str(tmp_path / "empty"))


def test_arrays_and_plain_values_round_trip_without_pickle_and_the_rest_is_refused_by_name(tmp_path):
    import ml_dtypes

    extra = {"epoch": 3, "loss": float("nan"), "pair": (1, "a"), "keys": {1: [None, True]},
             "scalar": np.float32(0.5), "table": np.arange(6).reshape(2, 3),
             "half": np.ones(3, dtype=ml_dtypes.bfloat16)}
    path = tmp_path / "c"
    write_atomic(path, lambda f: write_arrays(f, {}, {"extra": extra}))
    with check_archive(str(path)) as archive:
        back = read_arrays(str(path), archive)[1]["extra"]
    assert back.keys() == extra.keys() and np.isnan(back["loss"])
    assert back["pair"] == (1, "a") and back["keys"] == {1: [None, True]} and back["epoch"] == 3
    assert type(back["scalar"]) is np.float32 and back["scalar"] == 0.5
    assert np.array_equal(back["table"], extra["table"])
    assert back["half"].dtype == extra["half"].dtype and np.array_equal(back["half"], extra["half"])
    with pytest.raises(CheckpointError, match=r"extra\['when'\] is a datetime.date, which cannot be stored"):
        import datetime

        write_arrays(open(tmp_path / "d", "wb"), {}, {"extra": {"when": datetime.date.today()}})
    with pytest.raises(CheckpointError, match=r"extra\['objs'\] is a NumPy array of dtype object"):
        write_arrays(open(tmp_path / "e", "wb"), {}, {"extra": {"objs": np.array([None, 1], dtype=object)}})


def test_headers_that_differ_are_refused_naming_the_difference():
    model = [("fc.weight", (4, 8), "float32"), ("fc.bias", (4,), "float32")]
    mine = checkpoint.header("torch", model, {"class": "SGD", "groups": [2]}, "Sync")
    checkpoint.check_header("f", mine, mine)
    cases = [
        ({**mine, "framework": "keras"}, r"another framework: the file is Keras \(KerasAgent\), this agent is PyTorch"),
        ({**mine, "version": 0}, "format version 0; this hvdagents reads version 1"),
        ({**mine, "model": [["fc.weight", [5, 8], "float32"], mine["model"][1]]},
         r"another model: parameter 'fc.weight' has shape \(5, 8\) float32 in the checkpoint but shape \(4, 8\)"),
        ({**mine, "model": mine["model"][:1]}, "this model has parameter 'fc.bias' that the checkpoint lacks"),
        ({**mine, "optimizer": {"class": "Adam", "groups": [2]}}, "class is 'Adam' in the checkpoint but 'SGD'"),
        ({**mine, "strategy": "Downpour"}, "another strategy: Downpour in the checkpoint, Sync in this agent"),
        ({"weights": []}, "is not an hvdagents checkpoint"),
    ]
    for saved, message in cases:
        with pytest.raises(CheckpointError, match=message):
            checkpoint.check_header("f", saved, mine)


# -- the agents, in plain processes ----------------------------------------------------------------
def _plain(args, timeout=180):
    job = run_command([sys.executable, str(SCRIPT), *args], timeout=timeout).check()
    return job.results()


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(framework, tmp_path):
    results = {r["case"]: r for r in _plain(["unsafe", framework, str(tmp_path)])}
    crafted = {"torch": ["bare pickle", "torch.save archive"], "keras": ["bare pickle", "array archive"]}[framework]
    for case in crafted:
        r = results[case]
        assert r["proof"], f"{case}: the crafted file must run code when unpickled as before"
        assert r["error"] and r["error"].startswith(f"{r['path']!r} is not a safe checkpoint"), r
        assert "nothing in it ran" in r["error"]
        assert not r["ran"] and r["unchanged"], r
    refused = results["extra at save"]
    assert "extra value 'hook'" in refused["error"] and "Nothing was written" in refused["error"]
    assert refused["kept"] and refused["leftovers"] == []
    assert results["extra round trip"]["extra"] == (
        "[('epoch', 7), ('nested', {'a': [1, None, True]}), ('note', 'ok'), ('pair', (1, 2.5))]")


class _Writers:
    """``checkpoint_faults.py writers``: one launch, a fresh writer process per :meth:`start`."""

    def __init__(self, framework, directory, deadline):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "writers", framework, str(directory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=job_env(), start_new_session=True)
        self.pid = None
        # a hang anywhere (a writer, a read of its output) ends at the deadline: the launch is
        # killed and every read after it sees the end of its output
        self.watchdog = threading.Timer(deadline - time.monotonic(), self.kill_all)
        self.watchdog.start()

    def start(self, saves, until, deadline):
        """Start a writer of ``saves`` saves; its lines up to the first starting with ``until``."""
        self.proc.stdin.write(f"{saves}\n")
        self.proc.stdin.flush()
        lines = self.lines_until(until, deadline)
        (self.pid,) = [int(line.split()[1]) for line in lines if line.startswith("WRITER ")]
        return lines

    def kill(self):
        os.killpg(self.pid, signal.SIGKILL)

    def lines_until(self, prefix, deadline):
        """stdout lines up to and including the first starting with ``prefix``; an error if the
        writer ends first, or the deadline passes."""
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith(prefix):
                return lines
            if line.startswith("EXITED "):
                break
        self.close()
        raise AssertionError(f"the writer did not print {prefix!r} in time; it printed: {lines}")

    def ended(self, deadline):
        """The rest of the writer's lines, up to its end; with the exit status."""
        lines = self.lines_until(f"EXITED {self.pid} ", deadline)
        return lines[:-1], int(lines[-1].split()[2])

    def kill_all(self):
        """Kill the launch and a writer still running (it has a process group of its own)."""
        for group in (self.proc.pid, self.pid):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, TypeError):  # gone already; no writer started
                pass

    def close(self):
        self.watchdog.cancel()
        self.kill_all()
        self.proc.wait(30)


def _loaded(lines):
    import json

    (r,) = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ") and "loaded" in line]
    return r


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_sigkill_at_any_point_of_save_leaves_the_previous_checkpoint_whole(framework, tmp_path):
    deadline = time.monotonic() + 600
    writers = _Writers(framework, tmp_path, deadline)
    try:
        _kill_at_any_point_of_save(writers, framework, tmp_path, deadline)
    finally:
        writers.close()


def _kill_at_any_point_of_save(writers, framework, tmp_path, deadline):
    lines = writers.start(1, "SAVED", deadline)
    assert writers.ended(deadline)[1] == 0
    seconds = float(lines[-1].split()[2])
    size = (tmp_path / "ckpt").stat().st_size
    assert size > 200e6
    rng = random.Random(23)
    # spread over the first 70 % of the write as first measured: a later save that runs faster
    # (a warm page cache) still has every kill inside it
    kills = KILLS[framework]
    delays = [0.7 * seconds * (i + rng.random()) / kills for i in range(kills)]
    saved, landed_mid_write = 0, 0
    for delay in delays:
        lines = writers.start(1000, "SAVING", deadline)
        time.sleep(delay)
        writers.kill()
        rest, status = writers.ended(deadline)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, rest)
        r = _loaded(lines)
        # the previous writer's last whole save, or (killed between its rename and its SAVED
        # line) the one after it: the old file or the new one, whole, never a mix
        assert r["intact"] and r["loaded"] in (saved, saved + 1), (delay, saved, r)
        saved = r["loaded"]
        assert len(r["leftovers"]) <= 1 and all(checkpoint._temporary_names(tmp_path / "ckpt").fullmatch(n)
                                                for n in r["leftovers"]), r
        progress = [line for line in [lines[-1], *rest] if line.startswith("SAV")]
        finished = [int(line.split()[1]) for line in progress if line.startswith("SAVED")]
        saved = max(finished, default=saved)  # a kill after a whole save: that one stands
        landed_mid_write += progress[-1].startswith("SAVING")
    lines = writers.start(1, "RESULT {\"done\"", deadline)
    assert writers.ended(deadline)[1] == 0
    r = _loaded(lines)
    assert r["intact"] and r["loaded"] in (saved, saved + 1), (saved, r)
    assert '"leftovers": []' in lines[-1]  # the next save removed the killed writer's file
    assert landed_mid_write >= kills // 2, f"only {landed_mid_write} of {kills} kills landed inside a save"
