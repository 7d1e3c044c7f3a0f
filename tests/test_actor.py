"""The actor: onnxruntime policy, spool, link and control loop (real sockets, MuJoCo, onnxruntime)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from o2o.actor.config import ActorConfig, LinkConfig, PolicyConfig, SpoolConfig
from o2o.actor.loop import Actor
from o2o.actor.main import assemble, wait_for_learner
from o2o.actor.onnx_policy import Exploration, OnnxPolicy, PolicyExpectation, PolicyMismatch
from o2o.actor.seams import FixedPolicySource, MemorySink
from o2o.envs import make_actor_env
from o2o.transport.spool import Spool, SpoolError, SpoolFull
from o2o.datasets.replay_store import ReplayStore
from o2o.transport.ingest import IngestServer

PUSHER_OBS, PUSHER_ACT = 23, 7


# ---------------------------------------------------------------- helpers


def export(tmp: Path, task: str, obs_dim: int, action_dim: int, bound: float, version: int, seed: int) -> bytes:
    import torch

    from o2o.learner.checkpoint import AgentSpec
    from o2o.learner.export_onnx import export_policy

    torch.manual_seed(seed)
    spec = AgentSpec(task=task, obs_dim=obs_dim, action_dim=action_dim, action_low=[-bound] * action_dim,
                     action_high=[bound] * action_dim, algo={}, net={"policy_hidden": [64, 64], "critic_hidden": [8]})  # fmt: skip
    path = export_policy(spec.build_agent(), spec, tmp / f"{task}-{version}.onnx", version=version, exporter="torchscript")
    return path.read_bytes()


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("policies")
    return {
        "pusher": export(tmp, "pusher", PUSHER_OBS, PUSHER_ACT, 2.0, 0, seed=0),
        "pusher-other": export(tmp, "pusher", PUSHER_OBS, PUSHER_ACT, 2.0, 0, seed=1),
        "pointmaze": export(tmp, "pointmaze-umaze", 8, 2, 1.0, 0, seed=0),
    }


def wait_for(condition, what: str, timeout: float = 30.0, state=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; state: {state()}" if state else ""))
        time.sleep(0.01)


def config(tmp: Path, learner: str | None, **fields) -> ActorConfig:
    link = LinkConfig(heartbeat_s=0.1, timeout_s=0.5, drain_s=5.0, **fields.pop("link", {}))
    spool = SpoolConfig(**{"dir": str(tmp / "spool"), **fields.pop("spool", {})})
    policy = PolicyConfig(**fields.pop("policy", {}))
    base = dict(task="pusher", actor_id="t1", learner=learner, chunk_rows=20, log_every_s=1e9)
    return ActorConfig(**{**base, **fields}, link=link, spool=spool, policy=policy)


def linked_actor(cfg: ActorConfig):
    """An actor connected to the learner and holding its first policy."""
    env, sink, source, link = assemble(cfg)
    wait_for_learner(link, cfg)
    wait_for(lambda: link.latest() is not None, "the learner's first policy")
    return Actor(env, sink, source, cfg), link


@pytest.fixture
def server(tmp_path, policies):
    store = ReplayStore.create_for_task(tmp_path / "store", "pusher")
    srv = IngestServer(store, commit_interval_s=0.005).start()
    srv.publish_policy(0, policies["pusher"])
    yield srv
    srv.stop()


def all_acked(link) -> bool:
    return link.stats.acked_seq == link.status().next_seq - 1 and len(link.spool) == 0


def restart(server: IngestServer, policy: bytes) -> IngestServer:
    """A new server on the same endpoint and store (the learner back after an outage), publishing version 0."""
    new = IngestServer(server.store, server.endpoint, commit_interval_s=0.005).start()
    new.publish_policy(0, policy)
    return new


def check_store_in_order(store: ReplayStore, rows: int, episode_len: int = 100) -> dict:
    """The store holds ``rows`` rows of actor t1, each (episode, step) once, in seq order, episodes whole."""
    data = store.read()
    assert len(data["step"]) == rows
    keys = list(zip(data["episode_id"].tolist(), data["step"].tolist()))
    assert keys == sorted(set(keys)), "rows are duplicated or out of order"
    episodes = store.episodes()
    done = episodes["ended"]
    assert (episodes["length"][done] == episode_len).all() and episodes["contiguous"][done].all()
    return data


# ---------------------------------------------------------------- no torch


def test_actor_process_never_imports_torch(tmp_path, server):
    script = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: print("TORCH_MODULES", sorted(m for m in sys.modules if m.split(".")[0] == "torch")))
        import o2o.actor.config, o2o.transport.link, o2o.actor.loop, o2o.actor.onnx_policy, o2o.actor.seams, o2o.transport.spool
        from o2o.actor.main import main
        sys.argv = ["o2o-actor", "task=pusher", "learner={server.endpoint}", "actor_id=no-torch", "max_episodes=2",
                    "spool.dir={tmp_path}/spool", "stats_file={tmp_path}/stats.json"]
        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TORCH_MODULES []" in result.stdout, result.stdout[-2000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["actor"]["steps"] == 200 and stats["actor"]["policy_version"] == 0
    assert server.stats()["actors"]["no-torch"]["rows"] == 200


# ---------------------------------------------------------------- policy


def test_policy_metadata_mismatch_is_refused(tmp_path, policies, server):
    with pytest.raises(PolicyMismatch, match=r"task 'pointmaze-umaze' \(actor: 'pusher'\).*obs_dim=8, action_dim=2"):
        OnnxPolicy(policies["pointmaze"], PolicyExpectation("pusher", PUSHER_OBS, PUSHER_ACT), version=1)
    with pytest.raises(PolicyMismatch, match="onnxruntime cannot load it"):
        OnnxPolicy(b"not an onnx file", version=1)
    # Published by the learner: refused, counted, and the actor keeps acting with version 0.
    actor, link = linked_actor(config(tmp_path, server.endpoint))
    try:
        wait_for(lambda: link.latest() is not None, "policy version 0")
        server.publish_policy(1, policies["pointmaze"])
        wait_for(lambda: link.policies.refused == 1, "the refusal")
        assert link.latest().version == 0
        assert actor.run(max_steps=30) == "done"
        assert actor.version == 0
    finally:
        link.close()
    # At start-up from a file: a clear error and exit status 2.
    bad = tmp_path / "maze.onnx"
    bad.write_bytes(policies["pointmaze"])
    result = subprocess.run([sys.executable, "-m", "o2o.actor.main", "task=pusher", "learner=null", "actor_id=x",
                             f"policy.path={bad}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "does not fit this actor: task 'pointmaze-umaze' (actor: 'pusher')" in result.stderr


def test_zero_noise_gives_the_deterministic_action(policies):
    import torch

    from o2o.learner.checkpoint import AgentSpec
    from o2o.learner.export_onnx import ExportablePolicy as TorchPolicy

    policy = OnnxPolicy(policies["pusher"], PolicyExpectation("pusher", PUSHER_OBS, PUSHER_ACT), version=0)
    torch.manual_seed(0)
    spec = AgentSpec(task="pusher", obs_dim=PUSHER_OBS, action_dim=PUSHER_ACT, action_low=[-2.0] * PUSHER_ACT,
                     action_high=[2.0] * PUSHER_ACT, algo={}, net={"policy_hidden": [64, 64], "critic_hidden": [8]})  # fmt: skip
    module = TorchPolicy.from_agent(spec.build_agent(), spec)  # the same seed: the same weights as the export
    obs = np.random.default_rng(0).normal(size=(5, PUSHER_OBS)).astype(np.float32) * 3
    with torch.no_grad():
        want = module(torch.from_numpy(obs), torch.zeros(5, PUSHER_ACT)).numpy()
    for seed in (0, 1):
        quiet = Exploration(PUSHER_ACT, scale=0.0, seed=seed)
        got = np.stack([policy.act(o, quiet.draw()) for o in obs])
        np.testing.assert_allclose(got, want, atol=1e-5)
    noisy_a, noisy_b = Exploration(PUSHER_ACT, 1.0, seed=3), Exploration(PUSHER_ACT, 1.0, seed=3)
    sampled = np.stack([policy.act(o, noisy_a.draw()) for o in obs])
    assert np.abs(sampled - want).max() > 1e-2  # noise changes the action ...
    np.testing.assert_array_equal(sampled, np.stack([policy.act(o, noisy_b.draw()) for o in obs]))  # ... reproducibly
    half = Exploration(PUSHER_ACT, 0.5, seed=3).draw().copy()
    np.testing.assert_allclose(half, 0.5 * Exploration(PUSHER_ACT, 1.0, seed=3).draw(), rtol=1e-6)


@pytest.mark.parametrize("swap", ["step", "episode"])
def test_new_policy_is_swapped_in_between_steps_or_at_episode_end(tmp_path, policies, server, swap):
    actor, link = linked_actor(config(tmp_path, server.endpoint, policy={"swap": swap}))
    try:
        assert actor.run(max_steps=50) == "done"  # half of a 100-step Pusher episode with version 0
        server.publish_policy(1, policies["pusher-other"])
        wait_for(lambda: link.latest().version == 1, "policy version 1 to be built")
        assert actor.run(max_steps=150) == "done"
        wait_for(lambda: all_acked(link), "acks")
    finally:
        link.close()
    rows = check_store_in_order(server.store, 200)
    versions = rows["policy_version"].reshape(2, 100)  # two whole episodes
    if swap == "step":
        assert (versions[0, :50] == 0).all() and (versions[0, 50:] == 1).all()
    else:
        assert (versions[0] == 0).all()
    assert (versions[1] == 1).all()
    assert [s[:2] for s in actor.stats.swaps] == [[0, 0], [1, 50 if swap == "step" else 100]]


# ---------------------------------------------------------------- spool


def frames_of(seq: int, size: int = 1000) -> list[bytes]:
    rng = np.random.default_rng(seq)
    return [f"header {seq}".encode(), rng.bytes(size), rng.bytes(size // 10)]


def as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def test_spool_writes_every_chunk_through_to_disk_and_caches_the_oldest(tmp_path):
    spool = Spool(memory_chunks=4, folder=tmp_path, max_disk_bytes=1 << 20, segment_bytes=3000)
    for seq in range(10):
        spool.put(seq, frames_of(seq))
    stats = spool.stats()
    assert (stats.depth, stats.disk_chunks, stats.memory_only_chunks) == (10, 10, 0)  # every chunk on disk
    assert (stats.first_seq, stats.last_seq) == (0, 9)
    assert (stats.memory_chunks, stats.spilled_chunks) == (4, 6)  # seqs 0-3 cached, 4-9 on disk only
    assert len(list(tmp_path.glob("seg-*"))) == 5  # two ~1.2 kB records per 3 kB segment
    for seq in range(10):
        assert as_bytes(spool.get(seq)) == frames_of(seq)
    assert spool.stats().disk_reads == 6  # the cached ones never touch the disk
    with pytest.raises(ValueError, match="must increase"):
        spool.put(5, frames_of(5))
    assert spool.ack(5) == 6 and spool.first_seq == 6 and spool.stats().memory_chunks == 0
    assert len(list(tmp_path.glob("seg-*"))) == 2  # the acked segment files are deleted
    spool.get(6)  # read from disk once, then cached: the oldest chunk past an empty cache
    assert spool.stats().memory_chunks == 1 and as_bytes(spool.get(6)) == frames_of(6)
    assert spool.stats().disk_reads == 7
    assert spool.drop(7) and not spool.drop(7)
    assert spool.next_held(7) == 8 and spool.stats().rejected_chunks == 1 and spool.next_held(10) is None
    assert spool.ack(9) == 3 and len(spool) == 0 and spool.stats().memory_chunks == 0
    spool.put(10, frames_of(10))  # into the emptied segment being written, and cached
    stats = spool.stats()
    assert (stats.disk_chunks, stats.memory_chunks) == (1, 1) and len(list(tmp_path.glob("seg-*"))) == 1
    spool.ack(10)
    spool.close()
    assert not list(tmp_path.glob("seg-*"))  # an empty segment is not left behind


def test_spool_keeps_every_unacked_chunk_across_a_kill_a_restart_and_a_torn_record(tmp_path):
    spool = Spool(memory_chunks=3, folder=tmp_path, meta={"actor_id": "a"})
    for seq in range(8):
        spool.put(seq, frames_of(seq))
    spool.close(spill=False)  # as a killed process leaves it: nothing more is written at close
    last = sorted(tmp_path.glob("seg-*"))[-1]
    with open(last, "ab") as f:
        f.write(b"REC1\x08\x00\x00\x00")  # a record torn by the crash
    spool = Spool(memory_chunks=3, folder=tmp_path, meta={"actor_id": "a"})
    assert (spool.first_seq, spool.last_seq, len(spool)) == (0, 7, 8)  # the 3 cached ones too
    assert [as_bytes(spool.get(s)) for s in range(8)] == [frames_of(s) for s in range(8)]
    spool.ack(4)
    spool.put(8, frames_of(8))
    assert spool.close(spill=True) == 0  # nothing was only in memory
    spool = Spool(memory_chunks=3, folder=tmp_path, meta={"actor_id": "a"})
    assert (spool.first_seq, len(spool)) == (5, 4)
    assert [as_bytes(spool.get(s)) for s in range(5, 9)] == [frames_of(s) for s in range(5, 9)]
    with pytest.raises(SpoolError, match="in use by another actor"):
        Spool(folder=tmp_path, meta={"actor_id": "a"})
    spool.close()
    with pytest.raises(SpoolError, match="holds unacked chunks of"):
        Spool(folder=tmp_path, meta={"actor_id": "b"})


def test_spool_full_refuses_and_reports_no_room(tmp_path):
    memory_only = Spool(memory_chunks=2)
    memory_only.put(0, frames_of(0))
    assert memory_only.has_room() and not memory_only.has_room(extra_chunks=1)
    memory_only.put(1, frames_of(1))
    assert not memory_only.has_room()
    with pytest.raises(SpoolFull, match="no disk spool"):
        memory_only.put(2, frames_of(2))
    memory_only.put(2, frames_of(2), force=True)  # a chunk already taken is never dropped
    stats = memory_only.stats()
    assert len(memory_only) == 3 and (stats.memory_only_chunks, stats.disk_chunks, stats.depth) == (3, 0, 3)
    small_disk = Spool(memory_chunks=4, folder=tmp_path, max_disk_bytes=3000)
    for seq in range(2):  # 2 x 1.2 kB records: the disk cap counts every unacked chunk, cached or not
        small_disk.put(seq, frames_of(seq))
    assert not small_disk.has_room()
    with pytest.raises(SpoolFull, match="3000 bytes on disk"):
        small_disk.put(2, frames_of(2))
    small_disk.ack(1)  # acked: the room of the segment being written is reused
    assert small_disk.has_room(extra_chunks=1)
    for seq in range(2, 6):
        small_disk.put(seq, frames_of(seq))
        small_disk.ack(seq)
        assert small_disk.stats().disk_bytes <= 3000
    small_disk.close()
    assert not list(tmp_path.glob("seg-*"))


# ---------------------------------------------------------------- link + spool against a real learner


def test_learner_outage_chunks_are_spooled_then_replayed_in_order(tmp_path, policies, server):
    actor, link = linked_actor(config(tmp_path, server.endpoint, spool={"memory_chunks": 3}))
    try:
        actor.run(max_steps=200)
        wait_for(lambda: all_acked(link), "acks before the outage")
        server.stop()  # the learner goes away ...
        assert actor.run(max_steps=400) == "done"  # ... the actor keeps acting (link.on_learner_lost=continue)
        # The link thread spools the last chunk on its next turn (late on a loaded machine).
        wait_for(lambda: link.learner_lost and len(link.spool) == 20, "the outage noticed, every chunk spooled")
        spooled = link.spool.stats()
        assert spooled.depth == spooled.disk_chunks == 20  # 400 steps / 20 rows, every one on disk ...
        assert spooled.memory_chunks == 3  # ... the first 3 cached in memory too
        server = restart(server, policies["pusher"])  # ... and comes back
        wait_for(lambda: all_acked(link), "the spool to be replayed and acked")
        assert not link.learner_lost and link.stats.reconnects >= 1
        assert link.spool.stats().disk_chunks == 0
    finally:
        link.close()
        server.stop()
    assert not list((tmp_path / "spool" / "t1").glob("seg-*"))
    check_store_in_order(server.store, 600)
    assert server.store.committed_seq("t1") == 29


def test_restarted_actor_resends_its_disk_spool_and_continues_the_sequence(tmp_path, policies, server):
    cfg = config(tmp_path, server.endpoint, spool={"memory_chunks": 2})
    actor, link = linked_actor(cfg)
    actor.run(max_steps=100)
    wait_for(lambda: all_acked(link), "acks")
    server.stop()
    actor.run(max_steps=150)  # mid-episode, learner down: 8 chunks spooled (2 of them cached in memory)
    link.close(drain_s=0)
    assert link.spool.stats().disk_chunks == 8  # seqs 5-12, the 2 cached ones included
    assert len(list((tmp_path / "spool" / "t1").glob("seg-*"))) >= 1
    server = restart(server, policies["pusher"])
    actor, link = linked_actor(cfg)  # a new actor process, same actor_id and spool folder
    try:
        assert link.status().next_seq == 13  # after the 8 spooled chunks (seqs 5-12), not after the committed seq 4
        actor.run(max_steps=50)
        wait_for(lambda: all_acked(link), "the old spool and the new chunks to be acked")
    finally:
        link.close()
        server.stop()
    assert server.stats()["actors"]["t1"]["lost_seqs"] == 0
    assert server.store.committed_seq("t1") == 15
    data = server.store.read()
    assert len(data["step"]) == 300
    episodes = server.store.episodes()
    # Episode ids are the seq of their first chunk; the restarted actor abandoned the open episode 10
    # (50 steps) and began episode 13, still open.
    assert episodes["episode_id"].tolist() == [0, 5, 10] and episodes["ended"].tolist() == [True, True, False]
    assert episodes["length"].tolist() == [100, 100, 50]


@pytest.mark.parametrize("on_full", ["stop", "pause"])
def test_full_spool_stops_or_pauses_without_dropping_data(tmp_path, policies, server, on_full):
    cfg = config(tmp_path, server.endpoint, spool={"memory_chunks": 3, "dir": None, "on_full": on_full})
    actor, link = linked_actor(cfg)
    server.stop()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("reason", actor.run(max_steps=300)))
    runner.start()
    try:
        if on_full == "stop":
            runner.join(timeout=60)
            assert outcome["reason"] == "spool full" and actor.stats.steps == 60
            wait_for(lambda: len(link.spool) == 3, "the 3 chunks of 20 rows to be spooled")  # all kept
        else:
            wait_for(lambda: actor.paused, "the env to be paused", state=lambda: (actor.summary(), link.summary()))
            assert actor.stats.steps == 60 and runner.is_alive()
        server = restart(server, policies["pusher"])
        if on_full == "pause":
            runner.join(timeout=60)
            assert outcome["reason"] == "done" and actor.stats.pauses >= 1
        wait_for(lambda: all_acked(link), "acks after the learner came back")
    finally:
        actor.request_stop()
        runner.join(timeout=60)
        link.close()
        server.stop()
    assert len(server.store) == actor.stats.steps == (60 if on_full == "stop" else 300)


def test_learner_hold_pauses_the_actor_between_episodes_only(tmp_path, server):
    actor, link = linked_actor(config(tmp_path, server.endpoint, control_hz=500.0))  # 0.2 s per episode
    server.set_hold(True)
    wait_for(lambda: link.status().held, "the hold to reach the actor")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("reason", actor.run(max_steps=10_000)))
    runner.start()
    try:
        wait_for(lambda: actor.holding, "the actor to wait before its first episode")
        assert actor.stats.steps == 0
        server.set_hold(False)
        wait_for(lambda: actor.stats.steps >= 30, "the released actor to step")
        server.set_hold(True)  # mid-episode: the episode is finished first
        wait_for(lambda: actor.holding, "the actor to wait at the next episode boundary")
        assert actor.stats.steps % 100 == 0 and actor.stats.steps >= 100
        server.set_hold(False)
        steps = actor.stats.steps
        wait_for(lambda: actor.stats.steps > steps, "the actor to resume")
    finally:
        actor.request_stop()
        runner.join(timeout=60)
        link.close()
    assert outcome["reason"] == "stop requested" and actor.stats.holds == 2


# ---------------------------------------------------------------- loop: eval, clipping, control rate


BOUND = 0.2  # the test policy's deterministic actions are ~0.1-0.35 on these observations


class NarrowPusherLike(gym.Env):
    """Pusher-sized observations and a narrow action space; records the actions it gets."""

    def __init__(self, slow_every: int = 0, slow_s: float = 0.0, nan_at_step: int = -1):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (PUSHER_OBS,), np.float32)
        self.action_space = gym.spaces.Box(-BOUND, BOUND, (PUSHER_ACT,), np.float32)
        self.slow_every, self.slow_s, self.nan_at_step = slow_every, slow_s, nan_at_step
        self.observations, self.actions = [], []

    def _obs(self) -> np.ndarray:
        obs = self.np_random.normal(0.0, 10.0, PUSHER_OBS).astype(np.float32)
        if len(self.actions) == self.nan_at_step:
            obs[3] = np.nan  # a sensor glitch
        self.observations.append(obs)
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action):
        self.actions.append(np.array(action))
        if self.slow_every and len(self.actions) % self.slow_every == 0:
            time.sleep(self.slow_s)
        return self._obs(), 0.0, False, False, {"success": False}


def dry_actor(policies, **fields) -> tuple[Actor, gym.Env, MemorySink]:
    cfg = config(Path("."), None, env=f"{__name__}:NarrowPusherLike", max_episode_steps=10, **fields)
    env = make_actor_env(cfg.task, cfg.env, cfg.env_kwargs, cfg.max_episode_steps)
    policy = OnnxPolicy(policies["pusher"], PolicyExpectation("pusher", PUSHER_OBS, PUSHER_ACT), version=0)
    sink = MemorySink(keep=True)
    return Actor(env, sink, FixedPolicySource(policy), cfg), env, sink


def test_actions_are_clipped_to_the_env_and_counted(policies):
    actor, env, _ = dry_actor(policies, policy={"noise_scale": 0.0})
    actor.run(max_steps=40)
    inner = env.unwrapped
    actions = np.stack(inner.actions)
    assert np.abs(actions).max() <= BOUND
    raw = np.stack([actor.policy.act(obs) for obs in _acting_observations(inner.observations, episode_len=10, steps=40)])
    outside = int((np.abs(raw) > BOUND).any(axis=1).sum())
    assert 0 < outside < 40 and actor.stats.clipped_steps == outside
    np.testing.assert_allclose(actions, np.clip(raw, -BOUND, BOUND))


def _acting_observations(observations: list, episode_len: int, steps: int) -> list:
    """The observations actions were taken in: each episode's reset obs and all but its last step's."""
    per_episode = episode_len + 1
    acted = []
    for start in range(0, steps // episode_len * per_episode, per_episode):
        acted += observations[start : start + episode_len]
    return acted


def test_eval_episodes_are_deterministic_and_flagged(policies):
    actor, env, sink = dry_actor(policies, eval_every=2, eval_episodes=1)
    assert actor.run(max_episodes=6) == "done"
    flags = [c.eval for c in sink.chunks]
    assert flags == [False, False, True, False, False, True]  # 10-step episodes, 20-row chunks: one chunk each
    policy = actor.policy
    for chunk in sink.chunks:
        deterministic = np.clip(np.stack([policy.act(o) for o in chunk.obs]), -BOUND, BOUND)
        assert np.allclose(chunk.action, deterministic, atol=1e-6) == chunk.eval
    assert [c.episode_id for c in sink.chunks] == [c.seq for c in sink.chunks]
    assert actor.stats.eval_episodes == 2 and len(actor.stats.eval_returns) == 2


def test_control_rate_pads_steps_and_counts_overruns(policies):
    free, _, _ = dry_actor(policies, env_kwargs={"slow_every": 3, "slow_s": 0.06})
    free.run(max_steps=9)
    assert free.stats.overruns == 0  # no control rate: nothing to overrun
    paced, _, _ = dry_actor(policies, control_hz=25.0, env_kwargs={"slow_every": 3, "slow_s": 0.06})
    paced.run(max_steps=9)
    assert 3 <= paced.stats.overruns <= 9  # every 60 ms step overruns the 40 ms period


def test_a_non_finite_observation_stops_the_loop_and_is_never_sent(policies):
    actor, env, sink = dry_actor(policies, env_kwargs={"nan_at_step": 5})
    reason = actor.run(max_steps=20)
    assert "non-finite observation" in reason
    assert len(env.unwrapped.actions) == 5 and np.isfinite(np.stack(env.unwrapped.actions)).all()
    assert sink.n_rows == 4  # the 4 transitions before the faulty one are still sent
    assert all(np.isfinite(c.next_obs).all() for c in sink.chunks)


def free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_actor_without_a_learner_times_out_or_stops_on_sigterm_without_hanging(tmp_path):
    base = [sys.executable, "-m", "o2o.actor.main", "task=pusher", f"learner={free_endpoint()}", "actor_id=lonely",
            f"spool.dir={tmp_path}"]  # fmt: skip
    timed_out = subprocess.run([*base, "link.connect_timeout_s=1"], capture_output=True, text=True, timeout=120)
    assert timed_out.returncode == 3 and "did not answer within 1.0 s" in timed_out.stdout
    waiting = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in waiting.stdout:  # SIGTERM once it waits for the learner
        if "connecting to learner" in line:
            break
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=60) == 0
