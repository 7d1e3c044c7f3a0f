"""Learner-side online data: committed rows become trainable when their episode ends,
with the store's Cal-QL MC returns; eval rows are not trained on; batches mix by ratio."""

import numpy as np
import pytest

from o2o.datasets.data_settings import DataSettings
from o2o.transport import wire
from o2o.datasets.mc_return import trajectory_return_to_go
from o2o.datasets.replay_store import ReplayStore, row_columns
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
    store = ReplayStore.create(tmp_path / "replay", OBS, ACT, data=DataSettings(0.9, 2.0, 1.0),
                               failure_reward=-1.0)  # fmt: skip
    buffer = TransitionBuffer(OBS, ACT, 1000, "cpu")
    data = OnlineData(buffer, LOW, HIGH, DataSettings(0.9, 2.0, 1.0))
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
    assert buffer.columns["terminated"][:7].tolist() == [0, 0, 0, 0, 0, 0, 1]
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
    fresh = OnlineData(TransitionBuffer(OBS, ACT, 1000, "cpu"), LOW, HIGH, DataSettings(0.9, 2.0, 1.0))
    assert fresh.load_store(reopened) == 5
    # The open episode's rows are found again when it ends after the restart.
    assert commit(reopened, fresh, chunk(2, 1, 3, 2, end=True)) == 5
    assert fresh.trainable_rows == 10


def test_mixed_batches_follow_the_ratio():
    offline = TransitionBuffer(OBS, ACT, 10, "cpu")
    online = TransitionBuffer(OBS, ACT, 10, "cpu")
    ones = np.ones((10, OBS), np.float32)
    common = dict(action=np.zeros((10, ACT), np.float32), next_obs=ones, terminated=np.zeros(10), mc_return=np.zeros(10))
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


# ---------------------------------------------------------------- one path for a transition


def fleet_chunk(actor: str, seq: int, n: int = 256, episode_len: int = 100, eval: bool = False,
                obs_dim: int = OBS, act_dim: int = ACT):  # fmt: skip
    """Chunk ``seq`` of an actor whose episodes last ``episode_len`` steps (chunks span episodes)."""
    rng = np.random.default_rng([ord(actor), seq])
    g = seq * n + np.arange(n)
    step = g % episode_len
    return wire.TransitionChunk(
        actor_id=actor, seq=seq, policy_version=1, episode_id=int(g[0] // episode_len), step=int(step[0]),
        obs=rng.normal(size=(n, obs_dim)).astype(np.float32), action=rng.uniform(-2, 2, (n, act_dim)).astype(np.float32),
        reward=rng.normal(size=n).astype(np.float32), next_obs=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminated=(step == episode_len - 1).astype(np.uint8), truncated=np.zeros(n, np.uint8),
        success=np.zeros(n, np.uint8), eval=eval,
    )  # fmt: skip


def test_closed_rows_reach_the_buffer_exactly_as_the_store_holds_them(tmp_path):
    """Rows arrive in the buffer from the commit that closes their episode (``event.closed``),
    across commits, interleaved actors and a restart, without the learner keeping a copy."""
    store, buffer, data = make(tmp_path)
    for seq in range(3):  # 2 actors, 100-step episodes across 256-row chunks: ends in later commits
        commit(store, data, fleet_chunk("a", seq), fleet_chunk("e", seq, eval=True))
    store.close()
    store = ReplayStore.open(tmp_path / "replay", "a")  # open episodes rebuilt from disk
    data.drain()
    commit(store, data, fleet_chunk("a", 3), fleet_chunk("e", 3, eval=True))
    rows = store.read()
    train = np.isfinite(rows["mc_return"]) & ~rows["eval"]
    assert train.sum() == 1000 and data.trainable_rows == data.trainable_committed == 1000
    # Same rows as the store's (episode by episode, in the order they closed: the store's row order here).
    np.testing.assert_array_equal(buffer.columns["obs"][:1000].numpy(), rows["obs"][train])
    np.testing.assert_array_equal(buffer.columns["next_obs"][:1000].numpy(), rows["next_obs"][train])
    np.testing.assert_array_equal(buffer.columns["mc_return"][:1000].numpy(), rows["mc_return"][train])
    np.testing.assert_allclose(buffer.columns["reward"][:1000].numpy(), rows["reward"][train] * 2.0 + 1.0)
    assert buffer.columns["terminated"][:1000].sum() == 10
    assert data.committed_rows == len(store) == 2048


def test_load_store_streams_only_the_rows_that_fit_the_buffer(tmp_path):
    store, _, _ = make(tmp_path)
    for seq in range(8):
        store.append(fleet_chunk("a", seq))
        store.append(fleet_chunk("e", seq, eval=True))
    store.commit()  # 2 x 2048 rows: 2000 of "a" trainable, "e"'s eval, 2 x 48 of open episodes
    reads = []

    class Recording(ReplayStore):
        def read(self, start=0, stop=None, columns=None, **kwargs):
            reads.append((start, columns))
            return super().read(start, stop, columns, **kwargs)

    store.close()
    reopened = Recording.open(tmp_path / "replay", "r")
    buffer = TransitionBuffer(OBS, ACT, 300, "cpu")
    data = OnlineData(buffer, LOW, HIGH, DataSettings(0.9, 2.0, 1.0))
    assert data.load_store(reopened, chunk=512) == 2000  # every trainable row counts (the updates allowed)
    assert (data.committed_rows, data.trainable_committed, len(buffer)) == (4096, 2000, 300)
    full = [start for start, columns in reads if columns is None or "obs" in columns]
    assert full and min(full) >= 4096 - 1024  # whole rows read only where the last 300 lie
    rows = reopened.read()
    train = np.isfinite(rows["mc_return"]) & ~rows["eval"]
    last = np.sort(rows["obs"][train][-300:], axis=0)  # the last 300, in the buffer's ring order
    np.testing.assert_array_equal(np.sort(buffer.columns["obs"].numpy(), axis=0), last)


def test_learner_memory_stays_flat_over_ten_buffers_of_rows(tmp_path):
    """The learner keeps nothing but its bounded buffer: after a first buffer's worth of rows,
    ingesting 9 more (real commits to a real store, through ``OnlineData``) allocates no more
    than a few commits' worth at any moment. The old host mirror kept every committed row and
    grew with them (a week of a fleet's rows: out of memory)."""
    import gc
    import tracemalloc

    obs_dim, act_dim = 23, 7  # Pusher's
    # 4 x 512 rows: one commit, one Zarr chunk; 4 commits a buffer, 40 in all (81,920 rows: the old mirror
    # outgrew its first 65,536 rows while traced below).
    capacity, chunk_rows, actors = 8192, 512, ("a", "b", "c", "e")
    # fsync=False: durability is not what is measured here, and 40 fsynced commits take seconds.
    store = ReplayStore.create(tmp_path / "replay", obs_dim, act_dim, data=DataSettings(0.9, 2.0, 1.0), chunk_rows=len(actors) * chunk_rows,
                               fsync=False)  # fmt: skip
    buffer = TransitionBuffer(obs_dim, act_dim, capacity, "cpu")
    data = OnlineData(buffer, -2 * np.ones(act_dim), 2 * np.ones(act_dim), DataSettings(0.9, 2.0, 1.0))
    seq = 0
    row_bytes = sum(np.dtype(c.dtype).itemsize * int(np.prod(c.shape)) for c in row_columns(obs_dim, act_dim).values())

    def ingest(rows: int) -> int:
        nonlocal seq
        biggest = 0
        for _ in range(rows // (len(actors) * chunk_rows)):
            for actor in actors:  # "e" is an evaluator: committed, never trained on
                store.append(fleet_chunk(actor, seq, chunk_rows, eval=actor == "e", obs_dim=obs_dim, act_dim=act_dim))
            store.commit(collect=True)
            event = store.last_commit
            biggest = max(biggest, (event.stop - event.start) * row_bytes)  # one commit's new rows
            data.on_commit(event)
            data.drain()
            data.pop_episodes()  # the learner logs them
            seq += 1
        return biggest

    ingest(capacity)  # the first buffer's worth: buffers and arrays reach their steady size
    gc.collect()
    tracemalloc.start()
    try:
        commit_bytes = ingest(9 * capacity)
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == 10 * capacity and len(buffer) == capacity
    assert data.trainable_rows > 7 * capacity  # the rows did go through
    # Bounded by a commit's size, not by the rows ingested: the commit's transient copies, zarr's
    # chunk images and the episodes table's chunk (~8x one commit's rows here, whatever the row
    # count); retained: the last event (``last_commit``) and the open episodes' rows. The old
    # mirror held every row: 28 MB once past its initial 65536 rows, ~55x one commit.
    assert peak < 16 * commit_bytes, (peak, commit_bytes)
    assert retained < 8 * commit_bytes, (retained, commit_bytes)


def test_the_exploring_agents_q_bound_widens_with_online_rewards():
    """OOO's bound_q_functions on the exploring agent: [min r, max r] / (1 - gamma) over the offline
    rewards, widened by each online chunk's (scaled) rewards as they enter the buffer."""
    from o2o.learner.calql import CalQLAgent
    from o2o.learner.config import CalQLConfig, NetworkConfig
    from o2o.learner.q_bound import QBound

    agent = CalQLAgent(OBS, ACT, CalQLConfig(q_target_clip=True, discount=0.9),
                       NetworkConfig(policy_hidden=[8], critic_hidden=[8]))  # fmt: skip
    bound = QBound(agent, 0.9, np.array([0.0, 0.5, 1.0], np.float32))
    assert agent.td_target_bounds.tolist() == pytest.approx([0.0, 10.0])
    buffer = TransitionBuffer(OBS, ACT, 100, "cpu", online=True)
    data = OnlineData(buffer, -np.ones(ACT), np.ones(ACT), DataSettings(reward_scale=2.0), on_rewards=bound.widen)
    rows = lambda r: dict(obs=np.zeros((2, OBS), np.float32), action=np.zeros((2, ACT), np.float32),  # noqa: E731
                          raw_reward=np.array(r, np.float32), next_obs=np.zeros((2, OBS), np.float32),
                          terminated=np.zeros(2), mc_return=np.zeros(2, np.float32))  # fmt: skip
    data.add_rows(**rows([1.5, 0.2]))  # scaled: 3.0, 0.4
    assert agent.td_target_bounds.tolist() == pytest.approx([0.0, 30.0])
    data.add_rows(**rows([-1.0, 0.0]))  # scaled: -2.0
    assert agent.td_target_bounds.tolist() == pytest.approx([-20.0, 30.0])
    data.add_rows(**rows([0.1, 0.3]))  # inside: no change
    assert agent.td_target_bounds.tolist() == pytest.approx([-20.0, 30.0])
