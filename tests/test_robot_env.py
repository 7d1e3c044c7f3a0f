"""The robot-env protocol (envs/robot.py) and the actor driving user envs through its seams.

The envs here are real gymnasium envs named by import path (``test_robot_env:Class``), as a
user's robot package would be; the sinks are ``MemorySink``s whose status a test sets, the
way the link's thread does (notifying ``changed``).
"""

from __future__ import annotations

import signal
import threading

import gymnasium as gym
import numpy as np
import pytest
from test_actor import wait_for

from o2o.actor.config import ActorConfig, PolicyConfig, SpoolConfig
from o2o.actor.loop import Actor
from o2o.actor.seams import FixedPolicySource, MemorySink, SinkStatus
from o2o.envs import HoldableEnv, check_actor_env, hold_env, load_env_class, make_actor_env

# ---------------------------------------------------------------- user envs, as a robot package defines them


CLOSED: list[str] = []  # names of the arm classes whose close() ran


class PlainArm(gym.Env):
    """A 2-joint arm without ``hold()``: the observation is the joint positions and velocities."""

    def __init__(self, limit: float = 1.0):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = gym.spaces.Box(-limit, limit, (2,), np.float32)
        self.q = np.zeros(2, np.float32)
        self.actions: list[np.ndarray] = []

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.q, self.q * 0.5]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.q = self.np_random.uniform(-0.1, 0.1, 2).astype(np.float32)
        return self._obs(), {}

    def step(self, action):
        self.actions.append(np.array(action))
        self.q = self.q + 0.1 * np.asarray(action, np.float32)
        return self._obs(), float(-np.abs(self.q).sum()), False, False, {"success": False}

    def close(self):
        CLOSED.append(type(self).__name__)


class HoldingArm(PlainArm):
    """The same arm with the optional ``hold()`` hook (envs.HoldableEnv): it counts the requests."""

    def __init__(self, limit: float = 1.0):
        super().__init__(limit)
        self.holds = 0
        self.held_at_step: list[int] = []

    def hold(self) -> None:
        self.holds += 1
        self.held_at_step.append(len(self.actions))


class DictArm(gym.Env):
    """Goal-conditioned observations as a Dict; keys out of alphabetical order on purpose."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict({
            "observation": gym.spaces.Box(-np.inf, np.inf, (3,), np.float64),
            "desired_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
        })  # fmt: skip
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.t = 0

    def _obs(self) -> dict:
        return {"observation": np.array([self.t, self.t + 0.5, -self.t]), "desired_goal": np.array([10.0, 20.0])}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, False, False, {"success": self.t == 3}


class DiscreteArm(PlainArm):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Discrete(3)


class UnboundedArm(PlainArm):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


class ImageArm(PlainArm):
    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)


class NotAnEnv:
    pass


def make_arm() -> PlainArm:
    return PlainArm()


# ---------------------------------------------------------------- the protocol


def test_a_user_env_by_import_path_without_hold():
    env = make_actor_env("pusher", f"{__name__}:PlainArm", {"limit": 0.5}, max_episode_steps=7)
    assert isinstance(env.unwrapped, PlainArm) and not isinstance(env.unwrapped, HoldableEnv)
    np.testing.assert_array_equal(env.action_space.high, [0.5, 0.5])  # built with env_kwargs
    assert env.observation_space.shape == (4,)
    assert hold_env(env) is False  # nothing to ask: the helper says so and does nothing
    env.reset(seed=0)
    truncated = [env.step(np.zeros(2, np.float32))[3] for _ in range(7)]
    assert truncated == [False] * 6 + [True]  # max_episode_steps wraps a time limit around it


def test_a_user_env_with_hold_is_asked_through_its_wrappers():
    env = make_actor_env("pusher", f"{__name__}:HoldingArm", max_episode_steps=5)
    assert isinstance(env.unwrapped, HoldableEnv)
    assert hold_env(env) is True and env.unwrapped.holds == 1  # found behind the TimeLimit wrapper
    assert load_env_class(f"{__name__}:HoldingArm") is HoldingArm


def test_a_dict_observation_is_flattened_in_alphabetical_key_order():
    env = make_actor_env("fetch-push", f"{__name__}:DictArm")
    assert env.observation_space == gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32
    np.testing.assert_array_equal(obs, [10.0, 20.0, 0.0, 0.5, 0.0])  # desired_goal, then observation
    obs, *_ = env.step(np.zeros(2, np.float32))
    np.testing.assert_array_equal(obs, [10.0, 20.0, 1.0, 1.5, -1.0])


@pytest.mark.parametrize(
    "path, message",
    [
        ("test_robot_env.PlainArm", "expected an import path 'package.module:ClassName'"),
        (":PlainArm", "expected an import path"),
        ("test_robot_env:", "expected an import path"),
        ("no_such_robot_pkg.envs:Arm", "cannot import it (No module named 'no_such_robot_pkg'); is its package installed"),
        ("test_robot_env:MissingArm", "cannot import it (module 'test_robot_env' has no attribute 'MissingArm')"),
        ("test_robot_env:NotAnEnv", "is <class 'test_robot_env.NotAnEnv'>, not a gymnasium.Env subclass"),
        ("test_robot_env:make_arm", "not a gymnasium.Env subclass"),  # a factory function is not a class
    ],
)
def test_bad_import_paths_are_refused_with_what_to_fix(path, message):
    with pytest.raises(ValueError) as refused:
        make_actor_env("pusher", path)
    assert str(refused.value).startswith(f"env={path!r}") and message in str(refused.value)


@pytest.mark.parametrize(
    "cls, message",
    [
        ("DiscreteArm", "the env's action space is Discrete(3): o2o actors need a 1-D Box"),
        ("UnboundedArm", "is unbounded: actions could not be clipped"),
        ("ImageArm", "observation space is Box(0, 255, (8, 8, 3), uint8): o2o actors need a 1-D Box (or a Dict of them)"),
    ],
)
def test_spaces_an_actor_cannot_drive_are_refused_and_the_env_closed(cls, message):
    CLOSED.clear()
    with pytest.raises(ValueError) as refused:
        make_actor_env("pusher", f"{__name__}:{cls}")
    assert message in str(refused.value)
    assert CLOSED == [cls]  # a robot's connection is not left open by a refused configuration


def test_check_actor_env_takes_any_env_and_an_unknown_task_gets_suggestions():
    assert check_actor_env(PlainArm()).observation_space.shape == (4,)
    with pytest.raises(KeyError, match="unknown task 'pushr'. Did you mean pusher"):
        make_actor_env("pushr", f"{__name__}:PlainArm")


# ---------------------------------------------------------------- the actor drives them through its seams


class GatedSink(MemorySink):
    """A MemorySink whose room, hold and stop a test sets, notifying ``changed`` as the link does;
    ``capacity`` chunks (None = no limit) make it full, as a spool nobody acks."""

    def __init__(self, room: bool = True, held: bool = False, capacity: int | None = None):
        super().__init__(keep=True)
        self.gate = {"room": room, "held": held, "stop": None}
        self.capacity = capacity

    def set(self, capacity: int | None = None, **gate) -> None:
        self.capacity = capacity
        self.gate.update(gate)
        with self.changed:
            self.changed.notify_all()

    def status(self) -> SinkStatus:
        status = super().status()._replace(**self.gate)
        return status._replace(room=status.room and (self.capacity is None or self.n_chunks < self.capacity))


def arm_actor(cls: str, sink: MemorySink, **fields) -> Actor:
    cfg = ActorConfig(task="pusher", actor_id="arm-1", learner=None, env=f"{__name__}:{cls}", chunk_rows=4,
                      max_episode_steps=10, log_every_s=1e9, policy=PolicyConfig(act_before_policy=True),
                      spool=SpoolConfig(on_full="pause"), **fields)  # fmt: skip
    env = make_actor_env(cfg.task, cfg.env, cfg.env_kwargs, cfg.max_episode_steps)
    return Actor(env, sink, FixedPolicySource(None), cfg)


def run_in_thread(actor: Actor, **limits) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("reason", actor.run(**limits)))
    runner.start()
    return runner, outcome


@pytest.mark.parametrize("cls", ["PlainArm", "HoldingArm"])
def test_a_full_sink_pauses_the_arm_which_holds_if_it_can_then_resumes(cls):
    sink = GatedSink(capacity=2)  # full after two chunks of 4 rows
    actor = arm_actor(cls, sink)
    runner, outcome = run_in_thread(actor, max_steps=20)
    try:
        wait_for(lambda: actor.paused, "the actor to pause for room")
        assert actor.stats.steps == 8 and runner.is_alive()  # mid-episode, as the third chunk would begin
        arm = actor.env.unwrapped
        if cls == "HoldingArm":
            assert arm.holds == 1 and arm.held_at_step == [8]  # asked once, as the pause began
        sink.set(capacity=None)  # an ack frees room: the wait ends on the notification
        runner.join(timeout=30)
    finally:
        actor.request_stop()
        runner.join(timeout=30)
    assert outcome["reason"] == "done" and actor.stats.steps == 20 and actor.stats.pauses == 1
    assert not actor.paused and len(arm.actions) == 20
    # Two 10-step episodes in chunks of 4, 4 and 2 rows, numbered without a gap.
    assert [c.seq for c in sink.chunks] == list(range(6)) and [c.n for c in sink.chunks] == [4, 4, 2] * 2


def test_a_stop_request_or_a_sink_stop_ends_any_wait():
    held = GatedSink(held=True)
    actor = arm_actor("PlainArm", held)
    runner, outcome = run_in_thread(actor, max_steps=100)
    wait_for(lambda: actor.holding, "the held actor to wait before its first episode")
    actor.request_stop()
    runner.join(timeout=30)
    assert outcome["reason"] == "stop requested" and actor.stats.steps == 0 and not actor.holding
    full = GatedSink(room=False)
    actor = arm_actor("HoldingArm", full)
    runner, outcome = run_in_thread(actor, max_steps=100)
    wait_for(lambda: actor.paused, "the actor to pause for room")
    full.set(stop="learner lost (test)")
    runner.join(timeout=30)
    assert outcome["reason"] == "learner lost (test)" and actor.stats.steps == 0


def test_a_released_hold_starts_the_next_episode():
    sink = GatedSink(held=True)
    actor = arm_actor("PlainArm", sink)
    runner, outcome = run_in_thread(actor, max_episodes=2)
    try:
        wait_for(lambda: actor.holding, "the held actor to wait")
        assert actor.stats.steps == 0
        sink.set(held=False)
        runner.join(timeout=30)
    finally:
        actor.request_stop()
        runner.join(timeout=30)
    assert outcome["reason"] == "done" and actor.stats.steps == 20 and actor.stats.holds == 1


def test_a_signal_handler_stops_a_waiting_loop_on_its_own_thread():
    # o2o-actor's SIGTERM handler calls request_stop on the thread that waits: it must not deadlock.
    sink = GatedSink(held=True)
    actor = arm_actor("PlainArm", sink)
    previous = signal.signal(signal.SIGALRM, lambda *_: actor.request_stop())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert actor.run(max_steps=100) == "stop requested"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert actor.stats.steps == 0 and actor.stats.holds == 1


def test_the_dict_arm_is_recorded_flat_by_the_loop():
    sink = MemorySink(keep=True)
    actor = arm_actor("DictArm", sink)
    assert actor.run(max_steps=3) == "done"
    (chunk,) = sink.chunks
    np.testing.assert_array_equal(chunk.obs[:, :2], [[10.0, 20.0]] * 3)
    np.testing.assert_array_equal(chunk.next_obs[:, 2], [1.0, 2.0, 3.0])
    assert chunk.success.tolist() == [0, 0, 1]
