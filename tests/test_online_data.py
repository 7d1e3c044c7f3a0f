"""Learner-side online data: committed rows become trainable when their episode ends,
with the store's Cal-QL MC returns; eval rows are not trained on; batches mix by ratio."""

import numpy as np

from o2o.transport import wire
from o2o.datasets.mc_return import trajectory_return_to_go
from o2o.datasets.replay_store import ReplayStore
from o2o.learner.buffer import TransitionBuffer
from o2o.learner.online_data import OnlineData, UpdateLimiter, mixed_batch

OBS, ACT = 3, 2
LOW, HIGH = -np.ones(ACT, np.float32) * 2, np.ones(ACT, np.float32) * 2


def chunk(seq, episode, step, n, end=False, eval=False, reward=-1.0):
    rng = np.random.default_rng(seq)
    flags = np.zeros(n, np.uint8)
    last = flags.copy()
    if end:
        last[-1] = 1
    return wire.TransitionChunk(
        actor_id="a", seq=seq, policy_version=1, episode_id=episode, step=step,
        obs=rng.normal(size=(n, OBS)).astype(np.float32), action=rng.uniform(-2, 2, (n, ACT)).astype(np.float32),
        reward=np.full(n, reward, np.float32), next_obs=rng.normal(size=(n, OBS)).astype(np.float32),
        terminated=last, truncated=flags, success=flags, eval=eval,
    )  # fmt: skip


def make(tmp_path):
    store = ReplayStore.create(tmp_path / "replay", OBS, ACT, gamma=0.9, reward_scale=2.0, reward_bias=1.0,
                               failure_reward=-1.0)  # fmt: skip
    buffer = TransitionBuffer(OBS, ACT, 1000, "cpu")
    data = OnlineData(buffer, LOW, HIGH, reward_scale=2.0, reward_bias=1.0)
    return store, buffer, data


def commit(store, data, *chunks):
    for c in chunks:
        store.append(c)
    store.commit(collect=True)
    data.on_commit(store.last_commit)
    return data.drain()


def test_rows_become_trainable_when_their_episode_ends(tmp_path):
    store, buffer, data = make(tmp_path)
    assert commit(store, data, chunk(0, episode=0, step=0, n=4, reward=0.0)) == 0
    assert data.committed_rows == 4 and len(buffer) == 0
    assert commit(store, data, chunk(1, episode=0, step=4, n=3, end=True, reward=0.0)) == 7
    scaled = np.full(7, 0.0 * 2 + 1.0, np.float32)
    terminal = np.zeros(7)
    terminal[-1] = 1
    np.testing.assert_allclose(buffer.columns["mc_return"][:7].numpy(), trajectory_return_to_go(scaled, terminal, 0.9))
    np.testing.assert_allclose(buffer.columns["reward"][:7].numpy(), scaled)
    assert buffer.columns["done"][:7].tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert buffer.columns["action"][:7].abs().max() <= 1.0  # env units -> [-1, 1]
    episodes = data.pop_episodes()
    assert len(episodes) == 1 and episodes[0]["length"] == 7


def test_sparse_failure_episode_gets_the_failure_return(tmp_path):
    store, buffer, data = make(tmp_path)
    commit(store, data, chunk(0, episode=0, step=0, n=5, end=True, reward=-1.0))
    failure = -1.0 * 2.0 + 1.0
    np.testing.assert_allclose(buffer.columns["mc_return"][:5].numpy(), failure / (1 - 0.9), rtol=1e-6)


def test_eval_episodes_are_not_trained_on(tmp_path):
    store, buffer, data = make(tmp_path)
    commit(store, data, chunk(0, episode=0, step=0, n=5, end=True, eval=True))
    assert len(buffer) == 0
    assert data.pop_episodes()[0]["eval"] is True


def test_restart_reloads_trainable_rows_from_the_store(tmp_path):
    store, _, data = make(tmp_path)
    commit(store, data, chunk(0, 0, 0, 5, end=True), chunk(1, 1, 0, 3))
    store.close()
    reopened = ReplayStore.open(tmp_path / "replay", "a")
    fresh = OnlineData(TransitionBuffer(OBS, ACT, 1000, "cpu"), LOW, HIGH, 2.0, 1.0)
    assert fresh.load_store(reopened) == 5
    # The open episode's rows are found again when it ends after the restart.
    assert commit(reopened, fresh, chunk(2, 1, 3, 2, end=True)) == 5
    assert fresh.trainable_rows == 10


def test_mixed_batches_follow_the_ratio():
    offline = TransitionBuffer(OBS, ACT, 10, "cpu")
    online = TransitionBuffer(OBS, ACT, 10, "cpu")
    ones = np.ones((10, OBS), np.float32)
    common = dict(action=np.zeros((10, ACT), np.float32), next_obs=ones, done=np.zeros(10), mc_return=np.zeros(10))
    offline.add(obs=ones * 0, reward=np.zeros(10), **common)
    assert mixed_batch(offline, online, 8, 0.25).obs.sum() == 0  # no online data yet: offline only
    online.add(obs=ones, reward=np.ones(10), **common)
    batch = mixed_batch(offline, online, 8, 0.25)
    assert batch.reward.tolist() == [0.0] * 2 + [1.0] * 6


def test_limiter_waits_for_data_and_reports_lag():
    limiter = UpdateLimiter(utd=2.0, warmup_rows=100, max_ahead=10)
    assert limiter.allowed(updates=0, rows=50) == 0  # warm-up
    assert limiter.allowed(updates=0, rows=105) == 20
    assert limiter.allowed(updates=20, rows=105) == 0  # would overfit a slow fleet: wait
    assert limiter.behind(updates=0, rows=200) == 200  # a fast fleet: the learner owes updates


def test_limiter_holds_a_fast_fleet_with_hysteresis():
    limiter = UpdateLimiter(utd=1.0, warmup_rows=0, max_ahead=0, max_rows_ahead=100)
    assert not limiter.hold(updates=0, trainable_rows=90, holding=False)
    assert limiter.hold(updates=0, trainable_rows=150, holding=False)
    assert limiter.hold(updates=80, trainable_rows=150, holding=True)  # 70 ahead: still above half
    assert not limiter.hold(updates=120, trainable_rows=150, holding=True)


def test_rows_that_never_train_cannot_hold_the_fleet_while_the_learner_waits(tmp_path):
    """The flow-control deadlock: eval rows (and open or abandoned episodes) are committed but
    never trainable. Held on committed rows, the fleet stayed held once they outnumbered the
    hold threshold, while the learner waited for trainable data: nothing ever moved again."""
    store, _, data = make(tmp_path)
    limiter = UpdateLimiter(utd=1.0, warmup_rows=0, max_ahead=10, max_rows_ahead=20)
    commit(store, data, chunk(0, 0, 0, 10, end=True), chunk(1, 1, 0, 30, end=True, eval=True), chunk(2, 2, 0, 5))
    assert (data.committed_rows, data.trainable_rows, data.trainable_committed) == (45, 10, 10)
    updates = limiter.allowed(0, data.trainable_rows)  # the learner trains as far as the data allows ...
    assert updates == 20 and limiter.allowed(updates, data.trainable_rows) == 0  # ... then waits for data,
    assert not limiter.hold(updates, data.trainable_committed, holding=True)  # so the fleet must be released


def test_trainable_rows_are_counted_in_the_ingest_thread_before_drain(tmp_path):
    # The ingest thread holds a fast fleet at once: it counts trainable rows from the commit alone.
    store, _, data = make(tmp_path)
    for c in (chunk(0, 0, 0, 6, end=True), chunk(1, 1, 0, 4, end=True, eval=True), chunk(2, 2, 0, 3)):
        store.append(c)
    store.commit(collect=True)
    data.on_commit(store.last_commit)
    assert data.trainable_committed == 6 and data.trainable_rows == 0
    data.drain()
    assert data.trainable_rows == data.trainable_committed == 6
