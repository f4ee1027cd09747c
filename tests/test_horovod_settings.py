"""Horovod's settings: measured defaults that never override the user, the timeline and
autotuning as user features (unit tests, then one 2-rank job)."""

import json

import pytest

from hvdagents import horovod_settings as hs
from mpirun import run_job


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(hs, "_requests", {})
    monkeypatch.setattr(hs, "_applied", set())


def test_a_shorter_cycle_only_where_ranks_have_a_core_to_spare():
    assert hs.defaults(1.0) == {} and hs.defaults(0.5) == {}  # Horovod's 1 ms: measured faster there
    assert hs.defaults(2.0) == {"HOROVOD_CYCLE_TIME": hs.SPARE_CORE_CYCLE_TIME_MS}


def test_defaults_fill_only_what_the_user_left_unset():
    env = {"HOROVOD_FUSION_THRESHOLD": "1000"}
    assert hs.apply(8, env) == {"HOROVOD_CYCLE_TIME": hs.SPARE_CORE_CYCLE_TIME_MS}
    assert env["HOROVOD_FUSION_THRESHOLD"] == "1000"
    env = {"HOROVOD_CYCLE_TIME": "5"}
    assert hs.apply(8, env) == {} and env["HOROVOD_CYCLE_TIME"] == "5"


def test_in_force_names_who_chose_each_value():
    env = {"HOROVOD_CYCLE_TIME": "5", "HOROVOD_STALL_CHECK_DISABLE": "1"}
    hs.requested(timeline="/tmp/t.json")
    hs.apply(8, env)
    found = {s.name: (s.value, s.source) for s in hs.in_force(8, env)}
    assert found["HOROVOD_CYCLE_TIME"] == ("5", "user")
    assert found["HOROVOD_TIMELINE"] == ("/tmp/t.json", "hva.init")
    assert found["HOROVOD_FUSION_THRESHOLD"] == (str(128 * 2**20), "horovod")
    assert found["HOROVOD_STALL_CHECK_DISABLE"] == ("1", "user")  # any other HOROVOD_* shown too
    assert found["HOROVOD_HIERARCHICAL_ALLREDUCE"] == ("0", "horovod")
    assert {s.name: s.source for s in hs.in_force(8, {})}["HOROVOD_CYCLE_TIME"] == "hvdagents"  # before apply
    assert {s.name: s.source for s in hs.in_force(1, {})}["HOROVOD_CYCLE_TIME"] == "horovod"
    env = {}
    hs.apply(8, env)
    assert {s.name: s.source for s in hs.in_force(8, env)}["HOROVOD_CYCLE_TIME"] == "hvdagents"


def test_cores_per_rank_shares_the_node_unless_bound():
    import os

    allowed = len(os.sched_getaffinity(0))
    if allowed == os.cpu_count():
        assert hs.cores_per_rank(2) == allowed / 2 and hs.cores_per_rank(1) == allowed
    else:
        assert hs.cores_per_rank(2) == allowed


def test_requests_are_checked():
    with pytest.raises(TypeError, match="autotune must be True or False; got 'yes'"):
        hs.requested(autotune="yes")
    with pytest.raises(ValueError, match="timeline must be a file path"):
        hs.requested(timeline="")
    with pytest.raises(TypeError, match="timeline must be a file path .*got int 5"):
        hs.requested(timeline=5)
    with pytest.raises(TypeError, match="autotune_log must be a file path .*got bytes"):
        hs.requested(autotune_log=b"/tmp/log.csv")
    assert "HOROVOD_TIMELINE" not in hs.requested()  # a refused request records nothing


@pytest.mark.parametrize("mode", ["timeline", "autotune"])
def test_timeline_is_written_and_parses_as_json(tmp_path, mode):
    path = tmp_path / "timeline.json"
    found = sorted(run_job("timeline.py", np=2, args=[str(path), mode], timeout=180).check().results(),
                   key=lambda r: r["rank"])
    events = json.loads(path.read_text())
    assert isinstance(events, list) and events, "an empty timeline"
    names = {e.get("name") for e in events} | {e.get("args", {}).get("name") for e in events}
    assert any("allreduce" in str(n).lower() for n in names), sorted(map(str, names))[:20]
    for r in found:
        assert r["settings"]["HOROVOD_TIMELINE"] == [str(path), "hva.init"]
        assert r["settings"]["HOROVOD_CYCLE_TIME"] == (
            [hs.SPARE_CORE_CYCLE_TIME_MS, "hvdagents"] if r["cores"] >= hs.SPARE_CORES_PER_RANK else ["1", "horovod"])
        assert r["settings"]["HOROVOD_AUTOTUNE"] == (["1", "hva.init"] if mode == "autotune" else ["0", "horovod"])
        assert "came after Horovod started" in r["late"]
