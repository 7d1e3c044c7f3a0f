"""Issue 10's fault-injection trials at CI size (benchmarks/fault_trials.py runs them at scale):
a real learner process SIGKILLed at random moments of ingest (3 trials) and paused past the
actors' timeout (1 trial), an actor process SIGKILLed and restarted (3 times), an actor SIGKILLed
with its unacked chunks all within spool.memory_chunks while the learner is paused or down (2
trials). The trials and their checks live in tests/fault_trials.py; each failure names its seed."""

import pytest

from fault_trials import (ROWS, Params, actor_kill_while_learner_away_trial, actor_restart_trial, sigkill_trial,
                          sigstop_trial)
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.store_check import check_store
from replay_peers import ACT_DIM, OBS_DIM, make_chunk

SENT = len(Params().actors) * Params().chunks * ROWS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_learner_killed_at_a_random_moment_keeps_committed_rows_and_then_stores_every_chunk_once(tmp_path, seed):
    result = sigkill_trial(tmp_path, seed)
    print(result)
    assert result.rows == SENT and result.lost_seqs == 0


def test_a_learner_paused_past_the_timeout_loses_and_duplicates_nothing_once_resumed(tmp_path):
    result = sigstop_trial(tmp_path, seed=0)
    print(result)
    assert result.rows == SENT and result.lost_seqs == 0


def test_an_actor_killed_and_restarted_leaves_no_duplicate_and_no_gap(tmp_path):
    result = actor_restart_trial(tmp_path, seed=0, kills=3)
    print(result)
    assert result.rows == (20 * 3 + 40) * ROWS and result.faults == 3


@pytest.mark.parametrize("learner", ["paused", "down"])
def test_an_actor_killed_while_the_learner_is_away_keeps_every_spooled_chunk(tmp_path, learner):
    """The learner acks 10 chunks, is paused (SIGSTOP) or killed; the actor spools 47 more, all
    within spool.memory_chunks, and is SIGKILLed; restarted on its spool once the learner is back,
    it resends them: each of its chunks stored once, those 47 as the killed run sent them."""
    result = actor_kill_while_learner_away_trial(tmp_path, seed=0, learner=learner, acked=10, spooled=47)
    print(result)
    assert result.rows == (10 + 47 + 20) * ROWS and result.lost_seqs == 0


def test_a_reopening_writer_removes_the_temp_files_a_killed_writer_left(tmp_path):
    """Found by the SIGKILL trials: a learner killed while writing its commit record left
    ``.commit.json.<pid>.tmp``, and `o2o-store check` said NOT OK on the recovered store for ever."""
    store = ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)
    store.append(make_chunk("a", 0))
    store.close()
    left = [tmp_path / "replay" / ".commit.json.4242.tmp", tmp_path / "replay" / "data" / "obs" / "c" / "0.ab12.partial"]
    for path in left:
        path.write_text("{")
    assert sorted(check_store(tmp_path / "replay").leftovers) == ["temp files"]
    ReplayStore.open(tmp_path / "replay", "a").close()
    assert not any(path.exists() for path in left)
    assert check_store(tmp_path / "replay").ok
