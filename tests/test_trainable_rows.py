"""One rule for the trainable rows of a replay store (``datasets/trainable_rows.py``), read by the
online learner's restart (``OnlineData.load_store``) and the retrain (``select_store_rows``) alike."""

from __future__ import annotations

import numpy as np

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import TransitionChunk
from o2o.datasets.trainable_rows import trainable_rows
from o2o.learner.buffer import TransitionBuffer
from o2o.learner.online_data import OnlineData
from o2o.learner.retrain import select_store_rows

OBS, ACT = 3, 2
SETTINGS = DataSettings(0.9, 2.0, 1.0)


def chunk(actor: str, seq: int, episode: int, step: int, rewards, end: bool, eval_: bool = False,
          version: int = 1) -> TransitionChunk:  # fmt: skip
    n = len(rewards)
    last = np.zeros(n, np.uint8)
    last[-1] = end
    obs = np.full((n, OBS), 100 * seq + 10 * episode, np.float32) + np.arange(n, dtype=np.float32)[:, None]
    return TransitionChunk(
        actor_id=actor, seq=seq, policy_version=version, episode_id=episode, step=step, obs=obs,
        action=np.zeros((n, ACT), np.float32), reward=np.asarray(rewards, np.float32), next_obs=obs + 1,
        terminated=last, truncated=np.zeros(n, np.uint8), success=np.zeros(n, np.uint8), eval=eval_,
    )  # fmt: skip


def make_store(path) -> ReplayStore:
    """Rows 0-2: a's episode 0 (ends); 3-4: b's eval episode (ends); 5-6: a's episode 1, first part;
    7: b's episode 1, abandoned (b starts episode 2 at row 8 without ending it); 8-9: b's episode 2
    (ends); 10: a's episode 1 ends (so it ends after row 10: outside a prefix of 10 rows); 11: b's
    episode 3, still open."""
    store = ReplayStore.create(path, OBS, ACT, data=SETTINGS, chunk_rows=4)
    store.append(chunk("a", 0, 0, 0, [1, 2, 3], True))
    store.append(chunk("b", 0, 0, 0, [5, 5], True, eval_=True))
    store.append(chunk("a", 1, 1, 0, [1, 1], False, version=2))
    store.append(chunk("b", 1, 1, 0, [7], False))
    store.append(chunk("b", 2, 2, 0, [4, 4], True, version=3))
    store.append(chunk("a", 2, 1, 2, [2], True, version=3))
    store.append(chunk("b", 3, 3, 0, [9], False))
    store.commit()
    return store


def test_the_rule_keeps_rows_of_episodes_ended_within_the_prefix(tmp_path):
    store = make_store(tmp_path / "replay")
    rows = trainable_rows(store)
    assert rows.stop == 12 and rows.episodes == 3
    kept = rows.read(0, rows.stop, ["reward", "mc_return"])
    np.testing.assert_array_equal(kept["reward"], [1, 2, 3, 1, 1, 4, 4, 2])  # raw rewards, store order
    assert np.isfinite(kept["mc_return"]).all()
    assert [rows.count(a, a + 4) for a in (0, 4, 8)] == [3, 2, 3]
    assert trainable_rows(store, include_eval=True).read(0, 12, ["reward"])["reward"].tolist()[3:5] == [5, 5]
    # The first 10 rows: a's episode 1 ends at row 10, outside, so its rows 5-6 are not kept.
    prefix = trainable_rows(store, until_row=10)
    assert prefix.stop == 10 and prefix.episodes == 2
    np.testing.assert_array_equal(prefix.read(0, 12, ["reward"])["reward"], [1, 2, 3, 4, 4])
    # Versions up to 2: the prefix stops before row 8 (version 3); only a's episode 0 ended in it.
    by_version = trainable_rows(store, until_version=2)
    assert by_version.stop == 8 and by_version.read(0, 12, ["reward"])["reward"].tolist() == [1, 2, 3]
    store.close()


def test_the_learner_restart_and_the_retrain_read_the_same_rows(tmp_path):
    store = make_store(tmp_path / "replay")
    store.close()
    for include_eval in (False, True):
        reader = ReplayStore.open(tmp_path / "replay", "r")
        selection = select_store_rows(reader, train_on_eval=include_eval)
        buffer = TransitionBuffer(OBS, ACT, 100, "cpu")
        data = OnlineData(buffer, -np.ones(ACT), np.ones(ACT), SETTINGS, train_on_eval=include_eval)
        with ReplayStore.open(tmp_path / "replay", "a") as writer:  # as the learner opens it
            assert data.load_store(writer, chunk=4) == len(selection.transitions)
        n = len(buffer)
        np.testing.assert_array_equal(buffer.columns["obs"][:n].numpy(), selection.transitions.obs)
        np.testing.assert_array_equal(buffer.columns["reward"][:n].numpy(), selection.transitions.reward)
        np.testing.assert_array_equal(buffer.columns["mc_return"][:n].numpy(), selection.transitions.mc_return)
